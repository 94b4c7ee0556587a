//! TLS for Pigeonhole's one port (client API and node-to-node traffic).
//!
//! Why a crate of its own: the server (`pigeonhole-cluster`), the SDK and
//! `phctl` (`pigeonhole-client`, which depends on the wire contract only) and
//! the Jepsen harness all need the same three things, and neither of the
//! first two may depend on the other:
//!
//! - [`TlsFiles`]: the PEM files a process is given (CA, certificate, key),
//!   read again whenever they change, so certificates rotate without a
//!   restart ([`files`]);
//! - [`server::ServerTls`]: the server's acceptor, which verifies client
//!   certificates against the CA when they are offered, and turns a TCP
//!   listener into a stream of TLS connections tonic serves
//!   ([`server::incoming`]);
//! - [`client::endpoint`]: a tonic endpoint for `host:port`, over TLS when
//!   files are given, presenting the client certificate if there is one;
//! - [`peer::PeerCert`]: who a verified peer certificate names (its common
//!   name and subject alternative names), for the node-to-node check and
//!   for client identities (docs/security.md).
//!
//! The crypto is rustls with the ring provider (no OpenSSL), chosen
//! explicitly so that no process-wide default provider is needed.

pub mod client;
#[cfg(feature = "dev")]
pub mod dev;
pub mod files;
pub mod peer;
pub mod server;

pub use files::TlsFiles;
pub use peer::PeerCert;

/// The common name of every node's certificate. A certificate with this
/// name is a node's: it may open the Raft transport, if it also names the
/// host of the member it claims to be (docs/security.md).
pub const NODE_COMMON_NAME: &str = "node";

/// What can go wrong setting up TLS. Each names the file or the setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file was read but holds no usable PEM of the kind expected.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        what: String,
    },
    /// rustls refused the configuration (say, a key that does not match
    /// the certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider every config of this crate is built with.
pub(crate) fn provider() -> std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}
