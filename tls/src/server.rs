//! The server side: a TLS acceptor whose certificate, key and CA reload
//! from their files, and the accept loop that feeds tonic.
//!
//! Why not tonic's own `ServerTlsConfig`: it reads the files once, so a
//! rotated certificate would need a restart. Here every accepted connection
//! asks [`ServerTls::acceptor`] for the current config, which re-reads the
//! files when their inode, size or modification time changed (checked at most once
//! per [`RELOAD_CHECK_MS`]). A reload that fails (a half-written file) keeps
//! the config that works and says why, once per change.
//!
//! Client certificates are verified against the CA when offered and are not
//! required: a client may instead authenticate with a bearer token, and the
//! node-to-node service demands a node certificate itself
//! (docs/security.md). A certificate that is offered and does not verify
//! (another CA, expired, not yet valid) fails the handshake.
//!
//! Handshakes run on tasks of their own, each for at most
//! [`HANDSHAKE_MS_MAX`], so a slow or silent client never holds up the
//! accept loop. At most [`HANDSHAKES_IN_FLIGHT_MAX`] run at once; a
//! connection that arrives while all are taken is closed at once rather
//! than queued (the accept loop never waits, so a flood of silent
//! connections costs the node a few seconds of those slots, not its
//! ability to accept). Peers and clients reconnect with backoff.

use crate::files::Fingerprint;
use crate::{provider, TlsError, TlsFiles};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// How often, at most, the files are checked for a change.
pub const RELOAD_CHECK_MS: u64 = 1_000;
/// The longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_MS_MAX: u64 = 3_000;
/// Handshakes in progress at once; a connection past it is closed.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 256;
/// Connections handshaken and not yet taken by the server.
const ACCEPTED_QUEUE_MAX: usize = 64;
/// Shortest interval between two log lines about failed handshakes.
const HANDSHAKE_LOG_INTERVAL_MS: u64 = 10_000;

/// A server's TLS config, reloaded from its files when they change.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    state: Mutex<State>,
    reloads: AtomicU64,
    handshakes_failed: AtomicU64,
    handshake_logged: Mutex<Option<Instant>>,
}

#[derive(Debug)]
struct State {
    config: Arc<ServerConfig>,
    fingerprint: Fingerprint,
    checked: Instant,
    failed: Option<Fingerprint>,
}

impl ServerTls {
    /// Reads the files now: a server that cannot serve TLS fails at start,
    /// naming the file.
    pub fn new(files: TlsFiles) -> Result<Arc<ServerTls>, TlsError> {
        let fingerprint = files.fingerprint();
        let config = build(&files)?;
        Ok(Arc::new(ServerTls {
            files,
            state: Mutex::new(State {
                config,
                fingerprint,
                checked: Instant::now(),
                failed: None,
            }),
            reloads: AtomicU64::new(0),
            handshakes_failed: AtomicU64::new(0),
            handshake_logged: Mutex::new(None),
        }))
    }

    /// The files this config is read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The acceptor for a new connection: the current files' config.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.checked.elapsed() >= Duration::from_millis(RELOAD_CHECK_MS) {
            s.checked = Instant::now();
            let now = self.files.fingerprint();
            if now != s.fingerprint && s.failed != Some(now) {
                match build(&self.files) {
                    Ok(c) => {
                        s.config = c;
                        s.fingerprint = now;
                        s.failed = None;
                        self.reloads.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("TLS certificate files changed; reloaded");
                    }
                    Err(e) => {
                        // Keep serving with what works; say so once per
                        // change of the files.
                        s.failed = Some(now);
                        tracing::warn!(
                            "TLS files changed but cannot be used ({e}); still serving the previous certificate"
                        );
                    }
                }
            }
        }
        TlsAcceptor::from(s.config.clone())
    }

    /// How many times the files were reloaded.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// How many handshakes failed or timed out.
    pub fn handshakes_failed(&self) -> u64 {
        self.handshakes_failed.load(Ordering::Relaxed)
    }

    fn handshake_failed(&self, peer: std::net::SocketAddr, why: &str) {
        self.handshakes_failed.fetch_add(1, Ordering::Relaxed);
        let mut last = self.handshake_logged.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|t| t.elapsed() >= Duration::from_millis(HANDSHAKE_LOG_INTERVAL_MS)) {
            *last = Some(Instant::now());
            tracing::warn!(
                "TLS handshake from {peer} refused: {why} ({} refused so far)",
                self.handshakes_failed()
            );
        }
    }
}

fn build(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let Some((chain, key)) = files.load_identity()? else {
        return Err(TlsError::Config("a server needs --tls-cert and --tls-key".into()));
    };
    let mut roots = RootCertStore::empty();
    for ca in files.load_ca()? {
        roots
            .add(ca)
            .map_err(|e| TlsError::Config(format!("{}: not a usable CA: {e}", files.ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    // gRPC is HTTP/2 only; tonic's client insists on h2 being negotiated.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TLS connections accepted on `listener`, handshaken on tasks of their
/// own, for `tonic::transport::Server::serve_with_incoming`. The accept loop
/// ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE_MAX);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(HANDSHAKES_IN_FLIGHT_MAX));
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(_) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Nagle off, as on the plaintext path (server.rs says why).
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tls.handshake_failed(
                    peer,
                    &format!("{HANDSHAKES_IN_FLIGHT_MAX} handshakes already in progress"),
                );
                drop(tcp);
                continue;
            };
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let r = tokio::time::timeout(Duration::from_millis(HANDSHAKE_MS_MAX), acceptor.accept(tcp)).await;
                drop(permit);
                match r {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tls.handshake_failed(peer, &e.to_string()),
                    Err(_) => tls.handshake_failed(peer, &format!("no handshake within {HANDSHAKE_MS_MAX} ms")),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
