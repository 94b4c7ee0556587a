//! The client side: a tonic endpoint for `host:port`, over TLS when files
//! are given.
//!
//! The files are read each time an endpoint is made, so a process that
//! reconnects (the node-to-node transport does, on every broken stream)
//! presents its newest certificate without a restart. The server's name is
//! checked against the host of the address (a DNS name or an IP address in
//! the certificate's subject alternative names).

use crate::{TlsError, TlsFiles};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// `addr` without a scheme or trailing slash.
pub fn strip_scheme(addr: &str) -> &str {
    addr.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
}

/// The tonic TLS config for `files`: the CA to check servers against, and
/// the client certificate if `files` has one.
pub fn client_config(files: &TlsFiles) -> Result<ClientTlsConfig, TlsError> {
    // Parse first, so a bad file is named here rather than failing every
    // handshake later.
    files.load_ca()?;
    let ca = std::fs::read(&files.ca).map_err(|source| TlsError::Io {
        path: files.ca.display().to_string(),
        source,
    })?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = files.identity_pem()? {
        config = config.identity(Identity::from_pem(cert, key));
    }
    Ok(config)
}

/// An endpoint for `addr` (`host:port`, a scheme is ignored): `https` with
/// `files`' config, else plaintext `http`.
pub fn endpoint(addr: &str, tls: Option<&TlsFiles>) -> Result<Endpoint, String> {
    let addr = strip_scheme(addr);
    match tls {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(|e| format!("bad address {addr:?}: {e}")),
        Some(files) => {
            let config = client_config(files).map_err(|e| e.to_string())?;
            Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| format!("bad address {addr:?}: {e}"))?
                .tls_config(config)
                .map_err(|e| format!("TLS for {addr:?}: {e}"))
        }
    }
}
