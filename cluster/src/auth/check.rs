//! The check every RPC makes: who is calling (authentication), and may
//! they do this to this namespace (authorization).
//!
//! - **Who.** A bearer token (`authorization: Bearer ph_<id>.<secret>`)
//!   names its identity; without one, the verified client certificate's
//!   common name does. A certificate named `node` is a node, one named
//!   `root` is the CA holder's superuser; both hold every role. Nothing (no
//!   token, no certificate) is UNAUTHENTICATED.
//! - **What.** Each RPC needs one role on the namespace it touches
//!   (`append`, `read`, `trim`) or `admin` cluster-wide; a missing role is
//!   PERMISSION_DENIED naming the identity, the role and the namespace. The
//!   check comes before the request is looked at further, so a refused
//!   caller learns nothing of the namespace's data, not even from errors.
//! - **Where the book comes from.** Every node reads the book from its own
//!   replica of the metadata group: one key, polled every
//!   [`REFRESH_MS`], decoded only when its version changed. A grant,
//!   revocation or deleted token is enforced on every node within a
//!   second of being written (docs/security.md).
//!
//! Auth is on exactly when the node serves TLS. A plaintext node (the
//! no-flag loopback node, tests, or `--insecure`) checks nothing: without
//! TLS a token would cross the wire in the clear and there is no
//! certificate to name anyone.

use super::book::{role_name, Book, ROOT_NAME};
use crate::Node;
use pigeonhole_proto::internal::v1::AuthState;
use pigeonhole_proto::v1 as pb;
use prost::Message as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tonic::{Request, Status};

/// How often a node looks for a new book in its metadata replica.
pub const REFRESH_MS: u64 = crate::meta_poll::POLL_MS;
/// The metadata group's key of the book.
pub const STATE_KEY: &[u8] = b"auth/state";
/// Certificates whose names are remembered (per node; cleared when full).
const CERT_CACHE_MAX: usize = 4_096;
/// Longest `authorization` header read.
const HEADER_BYTES_MAX: usize = 512;
/// The prefix of every token.
pub const TOKEN_PREFIX: &str = "ph_";

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Auth is off on this node.
    Anyone,
    /// A node or the CA holder's `root`: every role.
    Super(Arc<str>),
    /// An identity of the book, by its certificate (`token` None) or by
    /// the token with this id.
    Identity {
        /// The identity's name.
        name: Arc<str>,
        /// The token it came with, if any: a long-lived stream ends when
        /// its token is revoked.
        token: Option<Arc<str>>,
    },
}

impl Caller {
    /// The name errors use.
    pub fn name(&self) -> &str {
        match self {
            Caller::Anyone => "anyone",
            Caller::Super(n) | Caller::Identity { name: n, .. } => n,
        }
    }
}

/// A node's authorizer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Auth {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    book: RwLock<(u64, Arc<Book>)>,
    /// The version of the book installed, for streams that re-check.
    version: tokio::sync::watch::Sender<u64>,
    certs: Mutex<HashMap<Vec<u8>, Option<Arc<str>>>>,
}

impl Auth {
    /// Checks nothing (a plaintext node).
    pub fn off() -> Auth {
        Auth { inner: None }
    }

    /// Checks every request against the book; starts polling `node`'s
    /// metadata replica for it.
    pub fn on(node: &Node) -> Auth {
        let inner = Arc::new(Inner {
            book: RwLock::new((0, Arc::new(Book::default()))),
            version: tokio::sync::watch::Sender::new(0),
            certs: Mutex::new(HashMap::new()),
        });
        let auth = Auth {
            inner: Some(inner.clone()),
        };
        crate::meta_poll::follow(node, STATE_KEY, Arc::downgrade(&inner), Inner::install);
        auth
    }

    /// Whether requests are checked.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The book's version this node enforces (0: none read yet).
    pub fn version(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.book().0)
    }

    /// Who `req` comes from: UNAUTHENTICATED without valid credentials.
    /// Found once per request, by [`Auth::interceptor`] before the body is
    /// decoded, and read back from the request's extensions here.
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let Some(inner) = &self.inner else {
            return Ok(Caller::Anyone);
        };
        if let Some(c) = req.extensions().get::<Caller>() {
            return Ok(c.clone());
        }
        if let Some(h) = req.metadata().get("authorization") {
            let h = h
                .to_str()
                .ok()
                .filter(|h| h.len() <= HEADER_BYTES_MAX)
                .ok_or_else(|| Status::unauthenticated("authorization: not a \"Bearer <token>\" header"))?;
            let token = h
                .strip_prefix("Bearer ")
                .ok_or_else(|| Status::unauthenticated("authorization: not a \"Bearer <token>\" header"))?;
            return inner.by_token(token.trim());
        }
        match pigeonhole_tls::PeerCert::of_request(req) {
            None => Err(Status::unauthenticated(
                "no credentials: present a client certificate of the cluster CA, or an \
                 \"authorization: Bearer <token>\" header",
            )),
            Some(Err(e)) => Err(Status::unauthenticated(format!("client certificate: {e}"))),
            Some(Ok(_)) => inner.by_cert(req),
        }
    }

    /// Authenticates a request from its headers and connection alone,
    /// before tonic decodes its body (so an unauthenticated client cannot
    /// make the node decode 16 MiB requests for nothing), and hands the
    /// caller to the handler in the request's extensions.
    pub fn interceptor(&self) -> impl tonic::service::Interceptor + Clone {
        let auth = self.clone();
        move |mut req: Request<()>| {
            let c = auth.caller(&req)?;
            req.extensions_mut().insert(c);
            Ok(req)
        }
    }

    /// Whether `caller` is someone this cluster knows: a node, `root`, or
    /// an identity of the book (a certificate of the CA whose identity was
    /// deleted, or never made, is PERMISSION_DENIED).
    pub fn known(&self, caller: &Caller) -> Result<(), Status> {
        match (caller, &self.inner) {
            (Caller::Identity { name, .. }, Some(inner)) if !inner.book().1.has_identity(name) => Err(
                Status::permission_denied(format!("identity {name:?} is not known to this cluster")),
            ),
            _ => Ok(()),
        }
    }

    /// Whether `caller` holds `role` on `namespace`; PERMISSION_DENIED
    /// naming both otherwise.
    pub fn allow(&self, caller: &Caller, namespace: &str, role: pb::Role) -> Result<(), Status> {
        let name = match caller {
            Caller::Anyone | Caller::Super(_) => return Ok(()),
            Caller::Identity { name, .. } => name,
        };
        let Some(inner) = &self.inner else { return Ok(()) };
        if inner.book().1.allows(name, namespace, role) {
            return Ok(());
        }
        Err(if role == pb::Role::Admin {
            Status::permission_denied(format!("identity {name:?} lacks the admin role (cluster-wide)"))
        } else {
            Status::permission_denied(format!(
                "identity {name:?} lacks the {} role on namespace {namespace:?}",
                role_name(role)
            ))
        })
    }

    /// Resolves once this node enforces a book other than version `seen`
    /// (at once if it already does; never with auth off): what a long-lived
    /// call (Subscribe, a Sync long-poll) waits on to re-check its caller
    /// with [`Auth::still_allowed`].
    pub async fn changed(&self, seen: u64) {
        match &self.inner {
            None => std::future::pending().await,
            Some(inner) => {
                let mut rx = inner.version.subscribe();
                if rx.wait_for(|v| *v != seen).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// [`Auth::allow`] against the book now, and the caller's token still
    /// valid: a revoked token or grant ends a stream opened before.
    pub fn still_allowed(&self, caller: &Caller, namespace: &str, role: pb::Role) -> Result<(), Status> {
        if let (Caller::Identity { token: Some(id), .. }, Some(inner)) = (caller, &self.inner) {
            if inner.book().1.token(id, super::now_unix_ms()).is_none() {
                return Err(Status::unauthenticated(
                    "token not valid (malformed, unknown, revoked or expired)",
                ));
            }
        }
        self.allow(caller, namespace, role)
    }

    /// [`Auth::caller`] then [`Auth::allow`].
    pub fn check<T>(&self, req: &Request<T>, namespace: &str, role: pb::Role) -> Result<Caller, Status> {
        let c = self.caller(req)?;
        self.allow(&c, namespace, role)?;
        Ok(c)
    }
}

impl Inner {
    fn book(&self) -> (u64, Arc<Book>) {
        let b = self.book.read().unwrap_or_else(PoisonError::into_inner);
        (b.0, b.1.clone())
    }

    fn install(&self, version: u64, value: &[u8]) {
        match AuthState::decode(value) {
            Ok(state) => {
                *self.book.write().unwrap_or_else(PoisonError::into_inner) = (version, Arc::new(Book::new(&state)));
                self.version.send_replace(version);
            }
            Err(e) => {
                // Written by this code only; a value that does not decode is
                // a bug. Keep enforcing the last good book.
                tracing::warn!("auth/state version {version} does not decode: {e}");
            }
        }
    }

    fn by_token(&self, token: &str) -> Result<Caller, Status> {
        let invalid = || Status::unauthenticated("token not valid (malformed, unknown, revoked or expired)");
        let (id, secret) = token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|t| t.split_once('.'))
            .ok_or_else(invalid)?;
        let book = self.book().1;
        let t = book.token(id, super::now_unix_ms()).ok_or_else(invalid)?;
        if !constant_time_eq(&super::sha256(secret.as_bytes()), &t.secret_sha256) {
            return Err(invalid());
        }
        Ok(Caller::Identity {
            name: Arc::from(t.identity.as_str()),
            token: Some(Arc::from(id)),
        })
    }

    fn by_cert<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let der = leaf.as_ref();
        let cached = self
            .certs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(der)
            .cloned();
        let name = match cached {
            Some(n) => n,
            None => {
                let n = pigeonhole_tls::PeerCert::parse(der)
                    .ok()
                    .and_then(|p| p.common_name)
                    .map(|n| Arc::<str>::from(n.as_str()));
                let mut cache = self.certs.lock().unwrap_or_else(PoisonError::into_inner);
                if cache.len() >= CERT_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(der.to_vec(), n.clone());
                n
            }
        };
        let name = name.ok_or_else(|| Status::unauthenticated("the client certificate has no common name"))?;
        if &*name == pigeonhole_tls::NODE_COMMON_NAME || &*name == ROOT_NAME {
            return Ok(Caller::Super(name));
        }
        Ok(Caller::Identity { name, token: None })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"ab"));
    }
}
