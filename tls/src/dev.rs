//! Certificates for tests, the Jepsen harness and local clusters (feature
//! `dev`): a throwaway CA and the node and client certificates it signs.
//!
//! Production certificates come from the operator's own CA;
//! `scripts/dev-certs` makes the same set with the `openssl` tool. Keys are
//! ECDSA P-256, as rcgen makes by default.

use crate::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// What a leaf certificate says.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The subject's common name: [`crate::NODE_COMMON_NAME`] for a node, an
    /// identity's name for a client.
    pub common_name: String,
    /// Subject alternative names: DNS names or IP addresses.
    pub hosts: Vec<String>,
    /// Make it already expired (valid from 30 days ago until yesterday).
    pub expired: bool,
}

impl Leaf {
    /// A node's certificate for `hosts`.
    pub fn node<S: Into<String>>(hosts: impl IntoIterator<Item = S>) -> Leaf {
        Leaf {
            common_name: crate::NODE_COMMON_NAME.to_string(),
            hosts: hosts.into_iter().map(Into::into).collect(),
            expired: false,
        }
    }

    /// A client's certificate for the identity `name`.
    pub fn client(name: &str) -> Leaf {
        Leaf {
            common_name: name.to_string(),
            hosts: Vec::new(),
            expired: false,
        }
    }

    /// The same, already expired.
    pub fn expired(mut self) -> Leaf {
        self.expired = true;
        self
    }
}

/// A throwaway certificate authority.
#[derive(Debug)]
pub struct DevCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl DevCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<DevCa, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let pem = params.self_signed(&key).map_err(|e| e.to_string())?.pem();
        Ok(DevCa { params, key, pem })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A leaf certificate and its key, both PEM.
    pub fn issue(&self, leaf: &Leaf) -> Result<(String, String), String> {
        let mut params = CertificateParams::new(leaf.hosts.clone()).map_err(|e| e.to_string())?;
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // A node is both: it serves, and it dials its peers.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        if leaf.expired {
            params.not_before = now - Duration::days(30);
            params.not_after = now - Duration::days(1);
        } else {
            params.not_before = now - Duration::days(1);
            params.not_after = now + Duration::days(365);
        }
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes the CA to `dir/ca.crt` (if not there) and a leaf to
    /// `dir/<stem>.crt` and `dir/<stem>.key`; the files, as a process is
    /// given them.
    pub fn write(&self, dir: &Path, stem: &str, leaf: &Leaf) -> Result<TlsFiles, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ca = dir.join("ca.crt");
        self.write_ca(&ca)?;
        let (cert_pem, key_pem) = self.issue(leaf)?;
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_atomically(&key, key_pem.as_bytes())?;
        write_atomically(&cert, cert_pem.as_bytes())?;
        Ok(TlsFiles::new(ca, cert, key))
    }

    /// Writes the CA certificate to `path`.
    pub fn write_ca(&self, path: &Path) -> Result<(), String> {
        write_atomically(path, self.pem.as_bytes())
    }
}

/// Writes `bytes` to a temporary file beside `path` and renames it over
/// `path`, as certificate tools rotate files: a reader sees the old file or
/// the new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}
