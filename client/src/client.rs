//! [`Client`]: one handle for a whole cluster. It learns the shard map from
//! any endpoint, sends each request straight to its shard's leader, and
//! retries what is retryable within one deadline per call.
//!
//! Why it is shaped this way:
//! - **Every call has one deadline** ([`ClientConfig::request_timeout`], or
//!   [`Client::with_timeout`]). Retries happen inside it; each attempt also
//!   sends its remaining time as `grpc-timeout`, so the server stops working
//!   on a request nobody waits for.
//! - **Retries reuse the request unchanged**, idempotency key included, so a
//!   retried append can never store a second copy: if an earlier attempt
//!   committed, the retry returns the original seq (`duplicate = true`).
//! - **Routing state is advisory.** A stale leader hint costs one hop (a
//!   follower forwards writes) or one retry; an unreachable node is avoided
//!   for [`NODE_SUSPECT_MS`] and the map is re-read from the cluster.
//! - **No lock is held across an await**: the routing table and the channel
//!   cache sit behind std mutexes taken for a few instructions.

mod auth;
mod backup;
pub use backup::BACKUP_FRAME_BYTES_MAX;
mod namespaces;
mod nodes;

pub use auth::{Conn, Credentials};
pub use namespaces::retry_delay;
mod learn;
mod shards;

use crate::coalesce::{CoalesceConfig, Coalescer};
use crate::error::{is_retryable, Error};
use crate::routing::Routing;
use crate::subscription::{self, Subscription};
use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::admin_client::AdminClient;
use pigeonhole_proto::v1::mailbox_client::MailboxClient;
use rand::Rng;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Request, Status};

/// How long a node that failed at the connection level is tried last.
pub const NODE_SUSPECT_MS: u64 = 1_000;

/// Largest response the client accepts, in bytes. A Sync page is at most
/// 4 MiB plus one message of at most 1 MiB; this leaves room.
pub const RESPONSE_BYTES_MAX: usize = 16 << 20;

/// Largest request the client sends, in bytes (the server's default limit).
pub const REQUEST_BYTES_MAX: usize = 16 << 20;

/// Client settings. Units are in the names' types ([`Duration`]).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Seed endpoints, `host:port` (or `http://host:port`). Any one live
    /// node is enough: the rest are learned from the shard map.
    pub endpoints: Vec<String>,
    /// The deadline of one call, retries included.
    pub request_timeout: Duration,
    /// The longest one attempt may take.
    pub attempt_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// First retry delay; it doubles per retry (with jitter) up to
    /// `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// Shortest interval between two shard-map reloads.
    pub map_refresh_interval_min: Duration,
    /// HTTP/2 keepalive ping interval: how fast a dead connection (and a
    /// Subscribe stream on it) is noticed.
    pub keepalive_interval: Duration,
    /// How concurrent appends to one node share calls
    /// ([`crate::coalesce`]).
    pub coalesce: CoalesceConfig,
    /// TLS: the CA the nodes' certificates must chain to, and this client's
    /// certificate if it authenticates by one. `None`: plaintext.
    pub tls: Option<pigeonhole_tls::TlsFiles>,
    /// A bearer token (`ph_<id>.<secret>`, from `phctl auth token create`),
    /// sent with every call; it names the identity instead of the client
    /// certificate. Needs `tls` (connect refuses a token over plaintext).
    pub token: Option<String>,
}

impl ClientConfig {
    /// Defaults for `endpoints`.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            request_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(1_000),
            map_refresh_interval_min: Duration::from_millis(200),
            keepalive_interval: Duration::from_secs(5),
            coalesce: CoalesceConfig::default(),
            tls: None,
            token: None,
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Route<'a> {
    /// The shard of this user id.
    User(&'a [u8]),
    /// This shard.
    Shard(u64),
}

/// A handle on a cluster. Cheap to clone; clones share connections and the
/// routing table.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
    timeout: Duration,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    routing: Mutex<Routing>,
    channels: Mutex<HashMap<String, Channel>>,
    suspects: Mutex<HashMap<u64, Instant>>,
    last_refresh: Mutex<Option<Instant>>,
    coalescer: Coalescer,
    /// The `authorization` header's value, if the client has a token.
    credentials: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn normalize(addr: &str) -> String {
    pigeonhole_tls::client::strip_scheme(addr).to_string()
}

/// Per-call attempt bookkeeping: the deadline, the attempt count and the
/// backoff.
pub(crate) struct Retry {
    started: Instant,
    deadline: Instant,
    pub(crate) attempts: u32,
    backoff: Duration,
    backoff_max: Duration,
}

impl Retry {
    pub(crate) fn new(cfg: &ClientConfig, timeout: Duration) -> Retry {
        let started = Instant::now();
        Retry {
            started,
            deadline: started + timeout,
            attempts: 0,
            backoff: cfg.backoff_initial,
            backoff_max: cfg.backoff_max,
        }
    }

    /// Time left, capped at one attempt's length (at least `floor`, for a
    /// long-poll whose attempt must outlast its wait).
    pub(crate) fn attempt_budget(&self, cfg: &ClientConfig, floor: Duration) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .min(cfg.attempt_timeout.max(floor))
    }

    /// Waits before the next attempt, or gives up with `last` when the wait
    /// would pass the deadline.
    pub(crate) async fn pause(&mut self, last: Status, wait: bool) -> Result<(), Error> {
        let delay = if wait {
            let lo = self.backoff / 2;
            let jittered = rand::thread_rng().gen_range(lo..=self.backoff);
            self.backoff = (self.backoff * 2).min(self.backoff_max);
            jittered
        } else {
            Duration::ZERO
        };
        if Instant::now() + delay >= self.deadline {
            return Err(Error::Exhausted {
                attempts: self.attempts,
                elapsed_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                last,
            });
        }
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Waits `delay` (a server's RetryInfo), or gives up if that would pass
    /// the deadline.
    pub(crate) async fn pause_for(&mut self, last: Status, delay: Duration) -> Result<(), Error> {
        if Instant::now() + delay >= self.deadline {
            return Err(Error::Exhausted {
                attempts: self.attempts,
                elapsed_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                last,
            });
        }
        tokio::time::sleep(delay).await;
        Ok(())
    }

    pub(crate) fn reset_backoff(&mut self, cfg: &ClientConfig) {
        self.backoff = cfg.backoff_initial;
    }
}

impl Client {
    /// Connects: reads the shard map from the first seed endpoint that
    /// answers. Fails with [`Error::NoEndpoint`] if none does within
    /// `request_timeout`.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::NoEndpoint("no endpoints given".into()));
        }
        let timeout = config.request_timeout;
        let credentials = match &config.token {
            None => None,
            Some(_) if config.tls.is_none() => {
                // A token over plaintext is a token given away.
                return Err(Error::NoEndpoint(
                    "token: a bearer token is sent only over TLS; give the CA (ClientConfig::tls, phctl --tls-ca)"
                        .into(),
                ));
            }
            Some(t) => {
                let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| Error::NoEndpoint("token: not printable ASCII".into()))?;
                // Never put it in HTTP/2's header compression tables.
                v.set_sensitive(true);
                Some(v)
            }
        };
        let c = Client {
            inner: Arc::new(Inner {
                credentials,
                config,
                routing: Mutex::new(Routing::default()),
                channels: Mutex::new(HashMap::new()),
                suspects: Mutex::new(HashMap::new()),
                last_refresh: Mutex::new(None),
                coalescer: Coalescer::default(),
            }),
            timeout,
        };
        let deadline = Instant::now() + timeout;
        let mut backoff = c.inner.config.backoff_initial;
        loop {
            match c.refresh().await {
                Ok(()) => return Ok(c),
                Err(e) if Instant::now() + backoff >= deadline => return Err(e),
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(c.inner.config.backoff_max);
                }
            }
        }
    }

    /// The same client with another per-call deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            inner: Arc::clone(&self.inner),
            timeout,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The per-call deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn coalescer(&self) -> &Coalescer {
        &self.inner.coalescer
    }

    /// A copy of the routing table.
    pub fn routing(&self) -> Routing {
        lock(&self.inner.routing).clone()
    }

    /// What every call carries to authenticate (the token, if any).
    pub fn credentials(&self) -> Credentials {
        Credentials(self.inner.credentials.clone())
    }

    /// A channel to `addr` (`host:port`), created lazily and cached.
    pub fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let addr = normalize(addr);
        if let Some(ch) = lock(&self.inner.channels).get(&addr) {
            return Ok(ch.clone());
        }
        let cfg = &self.inner.config;
        let ch = pigeonhole_tls::client::endpoint(&addr, cfg.tls.as_ref())
            .map_err(|e| Error::NoEndpoint(format!("endpoint {addr:?}: {e}")))?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(cfg.keepalive_interval)
            .keep_alive_timeout(cfg.keepalive_interval)
            .keep_alive_while_idle(true)
            .connect_lazy();
        lock(&self.inner.channels).insert(addr, ch.clone());
        Ok(ch)
    }

    fn node_addr(&self, node: u64) -> Option<String> {
        lock(&self.inner.routing).nodes.get(&node).cloned()
    }

    /// A Mailbox stub for `node`.
    pub(crate) fn mailbox_at(&self, node: u64) -> Result<MailboxClient<Conn>, Error> {
        let addr = self
            .node_addr(node)
            .ok_or_else(|| Error::NoEndpoint(format!("node {node} has no address in the shard map")))?;
        Ok(
            MailboxClient::with_interceptor(self.channel(&addr)?, self.credentials())
                .max_decoding_message_size(RESPONSE_BYTES_MAX)
                .max_encoding_message_size(REQUEST_BYTES_MAX),
        )
    }

    /// An Admin stub for `node`.
    pub fn admin_at(&self, node: u64) -> Result<AdminClient<Conn>, Error> {
        let addr = self
            .node_addr(node)
            .ok_or_else(|| Error::NoEndpoint(format!("node {node} has no address in the shard map")))?;
        Ok(AdminClient::with_interceptor(self.channel(&addr)?, self.credentials()))
    }

    /// Runs `f` against the shard's best node until it succeeds, fails for
    /// good, or the deadline passes. `f` gets a stub and the attempt's
    /// time budget (which it must set as the request's timeout).
    pub(crate) async fn run<T, F, Fut>(&self, route: Route<'_>, f: F) -> Result<T, Error>
    where
        F: FnMut(MailboxClient<Conn>, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.run_with(route, Duration::ZERO, f).await
    }

    /// [`Client::run`] whose attempts last at least `attempt_min`.
    pub(crate) async fn run_with<T, F, Fut>(
        &self,
        route: Route<'_>,
        attempt_min: Duration,
        mut f: F,
    ) -> Result<T, Error>
    where
        F: FnMut(MailboxClient<Conn>, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let cfg = &self.inner.config;
        let mut retry = Retry::new(cfg, self.timeout);
        loop {
            let shard = self.shard_of(route)?;
            let node = self.pick(&shard, retry.attempts)?;
            let budget = retry.attempt_budget(cfg, attempt_min);
            let stub = self.mailbox_at(node)?;
            retry.attempts += 1;
            // The client-side timer is a backstop for a connection that
            // hangs without an answer; the server normally answers first.
            let res = match tokio::time::timeout(budget + Duration::from_millis(100), f(stub, budget)).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer from node {node} within {} ms",
                    budget.as_millis()
                ))),
            };
            match res {
                Ok(v) => return Ok(v),
                // A namespace over its limit says when to come back: wait
                // that long (within the deadline), then retry the same node.
                Err(s) if namespaces::retry_delay(&s).is_some() => {
                    let delay = namespaces::retry_delay(&s).unwrap_or_default();
                    retry.pause_for(s, delay).await?;
                }
                Err(s) if !is_retryable(s.code()) => return Err(Error::Rejected(s)),
                Err(s) => {
                    let hinted = self.learn(shard.id, node, &s);
                    if retry.attempts >= 2 && !hinted {
                        self.maybe_refresh().await;
                    }
                    retry.pause(s, !hinted).await?;
                }
            }
        }
    }

    // ---- The Mailbox API ------------------------------------------------

    /// Appends `payload` to `mailbox` under `idempotency_key`. Retries reuse
    /// the key, so the message is stored at most once; `duplicate = true`
    /// means the key was seen before (possibly by an earlier attempt of this
    /// same call).
    pub async fn append(
        &self,
        mailbox: &pb::MailboxId,
        payload: impl Into<bytes::Bytes>,
        idempotency_key: impl Into<Vec<u8>>,
    ) -> Result<pb::AppendResponse, Error> {
        self.append_request(pb::AppendRequest {
            mailbox: Some(mailbox.clone()),
            payload: payload.into(),
            idempotency_key: idempotency_key.into(),
            expected_last_seq: None,
        })
        .await
    }

    /// Appends with every field under the caller's control
    /// (`expected_last_seq`, for one). Concurrent appends to one node share
    /// calls ([`crate::coalesce`], on by default).
    pub async fn append_request(&self, req: pb::AppendRequest) -> Result<pb::AppendResponse, Error> {
        let uid = user_of(req.mailbox.as_ref())?;
        self.append_coalesced(req, &uid).await
    }

    /// One append as its own unary call (with retries), within `timeout`.
    pub(crate) async fn append_unary(
        &self,
        req: pb::AppendRequest,
        timeout: Duration,
    ) -> Result<pb::AppendResponse, Error> {
        let uid = user_of(req.mailbox.as_ref())?;
        self.with_timeout(timeout)
            .run(Route::User(&uid), |mut c, t| {
                let r = with_timeout(req.clone(), t);
                async move { c.append(r).await.map(|a| self.write_answer(a)) }
            })
            .await
    }

    /// Appends many messages. One result per item, in order. Items are sent
    /// in one AppendBatch per node (the leader of their shards), in
    /// parallel; items that fail retryably are retried, with their keys,
    /// until the call's deadline. Not atomic across items.
    pub async fn append_batch(&self, items: Vec<pb::AppendRequest>) -> Vec<Result<pb::AppendResponse, Error>> {
        crate::batch::append_batch(self, items, self.timeout).await
    }

    /// Reads the messages after `after_seq` (see [`SyncOptions`]).
    pub async fn sync(
        &self,
        mailbox: &pb::MailboxId,
        after_seq: u64,
        opts: SyncOptions,
    ) -> Result<pb::SyncResponse, Error> {
        let req = pb::SyncRequest {
            mailbox: Some(mailbox.clone()),
            after_seq,
            max_messages: opts.max_messages,
            max_bytes: opts.max_bytes,
            wait_ms: u32::try_from(opts.wait.as_millis()).unwrap_or(u32::MAX),
            consistency: opts.consistency as i32,
        };
        // A long-poll may take its whole wait: give the call room for it.
        let client = if opts.wait.is_zero() {
            self.clone()
        } else {
            self.with_timeout(self.timeout.max(opts.wait + self.inner.config.attempt_timeout))
        };
        let attempt_min = if opts.wait.is_zero() {
            Duration::ZERO
        } else {
            opts.wait + self.inner.config.attempt_timeout
        };
        client
            .run_with(Route::User(&mailbox.user_id), attempt_min, |mut c, t| {
                let r = with_timeout(req.clone(), t);
                async move { c.sync(r).await.map(tonic::Response::into_inner) }
            })
            .await
    }

    /// Moves `device_id`'s cursor forward to `seq`.
    pub async fn ack(&self, mailbox: &pb::MailboxId, device_id: &[u8], seq: u64) -> Result<pb::AckResponse, Error> {
        let req = pb::AckRequest {
            mailbox: Some(mailbox.clone()),
            device_id: device_id.to_vec(),
            seq,
        };
        self.run(Route::User(&mailbox.user_id), |mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.ack(r).await.map(|a| self.write_answer(a)) }
        })
        .await
    }

    /// The mailbox's device cursors, last seq and low watermark.
    pub async fn cursors(&self, mailbox: &pb::MailboxId) -> Result<pb::GetCursorsResponse, Error> {
        let req = pb::GetCursorsRequest {
            mailbox: Some(mailbox.clone()),
        };
        self.run(Route::User(&mailbox.user_id), |mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.get_cursors(r).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Removes every message with seq <= `up_to_seq`.
    pub async fn trim(&self, mailbox: &pb::MailboxId, up_to_seq: u64) -> Result<pb::TrimResponse, Error> {
        let req = pb::TrimRequest {
            mailbox: Some(mailbox.clone()),
            up_to_seq,
        };
        self.run(Route::User(&mailbox.user_id), |mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.trim(r).await.map(|a| self.write_answer(a)) }
        })
        .await
    }

    /// Replaces message `seq` by a tombstone. A retry after a lost answer
    /// reports `deleted = false` (it already was a tombstone).
    pub async fn delete(&self, mailbox: &pb::MailboxId, seq: u64) -> Result<pb::DeleteResponse, Error> {
        let req = pb::DeleteRequest {
            mailbox: Some(mailbox.clone()),
            seq,
        };
        self.run(Route::User(&mailbox.user_id), |mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.delete(r).await.map(|a| self.write_answer(a)) }
        })
        .await
    }

    /// Follows `mailboxes` from their cursors (`after_seq`), resuming after
    /// every disconnect from the last seq delivered. See [`Subscription`].
    pub fn subscribe(&self, mailboxes: Vec<(pb::MailboxId, u64)>, max_in_flight: u32) -> Result<Subscription, Error> {
        subscription::start(self, mailboxes, max_in_flight)
    }
}

/// Sync options; `Default` is "the server's defaults, no wait,
/// linearizable".
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncOptions {
    /// At most this many messages (0 = server default, 100).
    pub max_messages: u32,
    /// At most this many payload bytes (0 = server default, 1 MiB).
    pub max_bytes: u32,
    /// Long-poll: wait up to this long for a first message.
    pub wait: Duration,
    /// Read consistency.
    pub consistency: pb::ReadConsistency,
}

pub(crate) fn with_timeout<T>(msg: T, t: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(t);
    r
}

fn user_of(mb: Option<&pb::MailboxId>) -> Result<Vec<u8>, Error> {
    mb.map(|m| m.user_id.clone())
        .ok_or_else(|| Error::Rejected(Status::invalid_argument("mailbox is required")))
}

/// A fresh random idempotency key (16 random bytes, hex): for callers that
/// do not already have a natural one (a client-generated message id is
/// better: it survives a restart of the caller).
pub fn new_idempotency_key() -> Vec<u8> {
    let bytes: [u8; 16] = rand::thread_rng().gen();
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into_bytes()
}
