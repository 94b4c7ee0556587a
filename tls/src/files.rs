//! The PEM files a process is given, and reading them.
//!
//! Files are read whole each time a config is built: a client builds one
//! per connection, the server whenever the files' inode, size or modification
//! time changes ([`Fingerprint`]). A certificate rotated by replacing its
//! files (rename over the old one, as cert-manager and certbot do) is
//! picked up without a restart.

use crate::TlsError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Largest PEM file read, in bytes: a chain of a few certificates is a few
/// KiB; anything this large is the wrong file.
pub const PEM_BYTES_MAX: u64 = 1 << 20;

/// Where a process's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This process's certificate chain. Required on a server; on a client,
    /// present it to authenticate by certificate (mTLS).
    pub cert: Option<PathBuf>,
    /// The private key of `cert`.
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// All three files.
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsFiles {
            ca: ca.into(),
            cert: Some(cert.into()),
            key: Some(key.into()),
        }
    }

    /// A CA only: a client that checks the server but presents no
    /// certificate (it authenticates with a token, or not at all).
    pub fn ca_only(ca: impl Into<PathBuf>) -> Self {
        TlsFiles {
            ca: ca.into(),
            cert: None,
            key: None,
        }
    }

    /// From optional flags: `None` when none is given; an error naming the
    /// flags when they do not make a whole (a certificate without its key,
    /// or either without a CA).
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, String> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), cert, key) => {
                if cert.is_some() != key.is_some() {
                    return Err("--tls-cert and --tls-key go together".into());
                }
                Ok(Some(TlsFiles { ca, cert, key }))
            }
            (None, _, _) => Err("--tls-cert and --tls-key need --tls-ca (the CA peers are checked against)".into()),
        }
    }

    /// The CA certificates.
    pub fn load_ca(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        load_certs(&self.ca)
    }

    /// This process's chain and key, if it has them.
    pub fn load_identity(&self) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some((load_certs(c)?, load_key(k)?))),
            _ => Ok(None),
        }
    }

    /// The raw PEM of the chain and key (tonic's client `Identity` takes PEM).
    pub fn identity_pem(&self) -> Result<Option<PemPair>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                // Parse too, so a bad file fails here with its name rather
                // than at the handshake.
                load_certs(c)?;
                load_key(k)?;
                Ok(Some((read(c)?, read(k)?)))
            }
            _ => Ok(None),
        }
    }

    /// What the files look like now (inode, size and modification time:
    /// a file renamed over the old one has a new inode even when its size
    /// and time are the same). A change means they should be read again.
    pub fn fingerprint(&self) -> Fingerprint {
        use std::os::unix::fs::MetadataExt as _;
        let stat = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.ino(), m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
        };
        Fingerprint([
            stat(&self.ca),
            self.cert.as_deref().and_then(stat),
            self.key.as_deref().and_then(stat),
        ])
    }
}

/// A certificate chain and its key, PEM text.
pub type PemPair = (Vec<u8>, Vec<u8>);

/// Inodes, sizes and modification times of a [`TlsFiles`]'s files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([Option<(u64, u64, SystemTime)>; 3]);

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    let io = |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > PEM_BYTES_MAX {
        return Err(TlsError::Pem {
            path: path.display().to_string(),
            what: format!("{len} bytes, more than the {PEM_BYTES_MAX} a PEM file may hold"),
        });
    }
    std::fs::read(path).map_err(io)
}

/// Every certificate in a PEM file; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    load_certs_pem(&read(path)?).map_err(|what| TlsError::Pem {
        path: path.display().to_string(),
        what,
    })
}

/// Every certificate in PEM text; at least one.
pub fn load_certs_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no CERTIFICATE block".into());
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        what: format!("no private key: {e}"),
    })
}
