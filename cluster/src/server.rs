//! The `pigeonhole` server: one node, one gRPC port. The port serves the
//! client API (`pigeonhole.v1.Mailbox` and `pigeonhole.v1.Admin`), the
//! node-to-node Raft transport, `grpc.health.v1` and server reflection (v1), so a node has one address that is both what clients
//! dial and what `--initial-cluster` lists.
//!
//! Shutdown (SIGTERM or SIGINT): the server stops accepting, lets in-flight
//! requests finish, then stops the Raft driver and flushes the engine.

use crate::api::{AdminService, ApiLimits, MailboxService};
use crate::config::{InitialCluster, NodeConfig};
use crate::error::ClusterError;
use crate::transport::grpc::{GrpcTransport, RaftService};
use crate::Node;
use pigeonhole_proto::v1::admin_server::AdminServer;
use pigeonhole_proto::v1::mailbox_server::MailboxServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// How long a graceful shutdown waits for connections to close (peers'
/// Raft streams and health watches never close on their own) before it
/// stops serving anyway. Unary requests in flight finish well within it.
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;

/// How long a node keeps trying to write its `--zone` into its record.
pub const ZONE_RECORD_WAIT_MS_MAX: u64 = 600_000;

/// Largest request a client may send (AppendBatch included), by default.
pub const REQUEST_BYTES_MAX: usize = 16 << 20;

/// What the binary's flags become.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This node's id.
    pub node_id: u64,
    /// Where data lives.
    pub data_dir: PathBuf,
    /// The address to bind.
    pub listen: SocketAddr,
    /// The static initial cluster (this node's entry is its advertised
    /// address).
    pub initial_cluster: InitialCluster,
    /// Data shards (fixed at bootstrap).
    pub shard_count: u64,
    /// Replicas per shard.
    pub replication_factor: usize,
    /// API limits.
    pub api: ApiLimits,
    /// Largest request message, in bytes.
    pub request_bytes_max: usize,
    /// How long the node waits for a proposal or read barrier at most
    /// (a client's shorter deadline cuts it).
    pub request_timeout_ms: u64,
    /// NOT DURABLE: skip every fsync (`RaftTuning::unsafe_no_fsync`).
    pub unsafe_no_fsync: bool,
    /// Raft log entries per shard before compaction (`RaftTuning`).
    pub log_entries_max: u64,
    /// Entries kept behind the applied index when compacting.
    pub log_retain_entries: u64,
    /// Snapshot bytes sent per second, at most (`RaftTuning`).
    pub snapshot_send_bytes_per_s: u64,
    /// Apply worker threads (`RaftTuning::apply_threads`).
    pub apply_threads: usize,
    /// Raft driver threads (`RaftTuning::driver_threads`).
    pub driver_threads: usize,
    /// Members to ask to join through (`--join`); empty: start from
    /// `initial_cluster`. A data dir that joined before asks no one.
    pub join: Vec<String>,
    /// The address peers and clients reach this node at (what a joining
    /// node is recorded with).
    pub advertise: String,
    /// Failure domain (`--zone`); empty: none. Kept in the node's record.
    pub zone: String,
    /// TLS for the port and for this node's calls to its peers; `None`:
    /// plaintext, allowed on a loopback address or with `insecure`.
    pub tls: Option<pigeonhole_tls::TlsFiles>,
    /// Serve plaintext on a non-loopback address (`--insecure`).
    pub insecure: bool,
    /// Where the Prometheus endpoint listens (`--metrics-listen`); `None`:
    /// no endpoint, and no metrics are recorded.
    pub metrics_listen: Option<SocketAddr>,
    /// How log lines are written (`crate::logging::init`, done by the
    /// binary before `run`).
    pub log_format: crate::logging::LogFormat,
    /// The log filter directive at start.
    pub log_level: String,
    /// Requests slower than this are logged with their timings.
    pub slow_request_ms: u64,
}

impl ServerConfig {
    /// The no-flags mode: one node on 127.0.0.1:7070, data in
    /// ./pigeonhole-data.
    pub fn single_node_default() -> Self {
        let listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7070));
        ServerConfig {
            node_id: 1,
            data_dir: PathBuf::from("./pigeonhole-data"),
            listen,
            initial_cluster: InitialCluster::single(&listen.to_string()),
            shard_count: crate::config::default_shard_count(1),
            replication_factor: 1,
            api: ApiLimits::default(),
            request_bytes_max: REQUEST_BYTES_MAX,
            request_timeout_ms: crate::RaftTuning::default().request_timeout_ms,
            unsafe_no_fsync: false,
            log_entries_max: crate::config::RaftTuning::default().log_entries_max,
            log_retain_entries: crate::config::RaftTuning::default().log_retain_entries,
            snapshot_send_bytes_per_s: crate::config::RaftTuning::default().snapshot_send_bytes_per_s,
            apply_threads: crate::config::default_apply_threads(),
            driver_threads: crate::config::default_driver_threads(),
            join: Vec::new(),
            advertise: listen.to_string(),
            zone: String::new(),
            tls: None,
            insecure: false,
            metrics_listen: None,
            log_format: crate::logging::LogFormat::Text,
            log_level: crate::logging::DEFAULT_FILTER.to_string(),
            slow_request_ms: 1_000,
        }
    }

    /// Refuses plaintext on an address other hosts can reach unless
    /// `insecure` says it is meant; warns when it is. Anyone who can reach
    /// a plaintext port can read and write every mailbox and join the Raft
    /// traffic (docs/security.md).
    pub fn check_transport_security(&self) -> Result<(), ClusterError> {
        if self.tls.is_some() || self.listen.ip().is_loopback() {
            return Ok(());
        }
        if !self.insecure {
            return Err(ClusterError::Config(format!(
                "refusing to serve plaintext on {}, which is not a loopback address: give --tls-ca, \
                 --tls-cert and --tls-key (scripts/dev-certs makes a set for tests), or --insecure to \
                 serve plaintext anyway",
                self.listen
            )));
        }
        tracing::warn!(
            "--insecure: serving plaintext on {}; anyone who can reach it can read \
             and write every mailbox and talk to the cluster as a node",
            self.listen
        );
        Ok(())
    }
}

impl ServerConfig {
    /// The node config of a node of the initial cluster (not one that
    /// joined), before the Raft tuning is laid over it; `pigeonhole
    /// restore` seeds its data dir from it.
    pub fn initial_node_config(&self) -> NodeConfig {
        let mut c = NodeConfig::new(self.node_id, &self.data_dir, self.initial_cluster.clone());
        c.shard_count = self.shard_count;
        c.replication_factor = self.replication_factor;
        c.restored_from = crate::restore::restored_from(&self.data_dir);
        c
    }
}

/// How often the server checks that the Raft driver still runs.
const DRIVER_CHECK_MS: u64 = 500;

/// Runs a node until `shutdown` resolves, or its Raft driver stops on an
/// error (returned).
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ClusterError> {
    cfg.check_transport_security()?;
    let server_tls = match &cfg.tls {
        Some(files) => Some(
            pigeonhole_tls::server::ServerTls::new(files.clone())
                .map_err(|e| ClusterError::Config(format!("tls: {e}")))?,
        ),
        None => None,
    };
    // Bind before starting (or joining), so a busy port fails fast and
    // cleanly, before the cluster hands out an id.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ClusterError::Config(format!("cannot listen on {}: {e}", cfg.listen)))?;
    if let Some(addr) = cfg.metrics_listen {
        crate::metrics::install(addr).map_err(ClusterError::Config)?;
        tracing::info!("metrics on http://{addr}/metrics");
    }
    // Reading the library (13 MiB) for its assertion text takes ~10 ms:
    // off the async workers, and not waited for.
    tokio::task::spawn_blocking(report_rocksdb_library);
    // A data dir that joined a cluster belongs to it: a restart without
    // --join reads what it was handed, as one with --join does.
    let joined = if cfg.join.is_empty() {
        crate::join::load(&cfg.data_dir)?
    } else {
        Some(crate::join::join(&cfg.data_dir, &cfg.advertise, &cfg.join, &cfg.zone, cfg.tls.as_ref()).await?)
    };
    let (mut node_cfg, peers) = if let Some(j) = joined {
        let mut c = NodeConfig::new(j.node_id, &cfg.data_dir, j.params.initial_cluster.clone());
        c.joined = true;
        c.cluster_id = Some(j.cluster_id);
        c.shard_count = j.params.shard_count;
        c.replication_factor = j.params.replication_factor;
        let peers = j
            .nodes
            .iter()
            .filter(|(id, _)| **id != j.node_id)
            .map(|(id, a)| (*id, a.clone()))
            .collect();
        (c, peers)
    } else {
        (cfg.initial_node_config(), cfg.initial_cluster.peers_of(cfg.node_id))
    };
    node_cfg.raft.request_timeout_ms = cfg.request_timeout_ms;
    node_cfg.raft.unsafe_no_fsync = cfg.unsafe_no_fsync;
    node_cfg.raft.log_entries_max = cfg.log_entries_max;
    node_cfg.raft.log_retain_entries = cfg.log_retain_entries;
    node_cfg.raft.snapshot_send_bytes_per_s = cfg.snapshot_send_bytes_per_s;
    node_cfg.raft.apply_threads = cfg.apply_threads;
    node_cfg.raft.driver_threads = cfg.driver_threads;
    if cfg.unsafe_no_fsync {
        tracing::warn!(
            "--unsafe-no-fsync: writes are acknowledged without fsync; \
             a machine crash or power loss can lose acknowledged writes"
        );
    }
    node_cfg.validate()?;
    let transport = Arc::new(GrpcTransport::new(
        node_cfg.effective_cluster_id(),
        peers,
        tokio::runtime::Handle::current(),
        cfg.tls.clone(),
    ));
    let node_id = node_cfg.node_id;
    let cluster_ids = node_cfg.initial_cluster.ids();
    let joined = node_cfg.joined;
    let node = Node::start(node_cfg, transport.clone())?;
    // The record follows --zone (set, changed or dropped) once the metadata
    // group answers; placement reads zones from the records.
    // Retried with backoff for up to ZONE_RECORD_WAIT_MS_MAX (a joined node
    // gets its metadata replica within a round or two; one drained before
    // that never does), then given up with a warning until the next start.
    let recorder = node.clone();
    let zone = cfg.zone.clone();
    tokio::spawn(async move {
        let until = std::time::Instant::now() + std::time::Duration::from_millis(ZONE_RECORD_WAIT_MS_MAX);
        let mut delay = std::time::Duration::from_secs(1);
        loop {
            match recorder.record_zone(&zone).await {
                Ok(_) => return,
                Err(e) if e.is_retryable() && std::time::Instant::now() < until => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(30));
                }
                Err(e) => {
                    tracing::warn!("zone {zone:?} not recorded (it is retried at the next start): {e}");
                    return;
                }
            }
        }
    });
    // Each shard this node leads is counted now and then, for balance by
    // bytes and automatic splits (D39).
    crate::sizes::spawn(&node, crate::sizes::SizeCheck::default());
    // Namespaces' limits and retention policies, as this node reads them;
    // retention is proposed for the shards this node leads (D43).
    let quotas = crate::quota::Quotas::follow(&node);
    crate::retention::spawn(&node, crate::retention::RetentionCheck::default());
    if cfg.metrics_listen.is_some() {
        crate::metrics::spawn_sampler(&node);
    }
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<MailboxServer<MailboxService>>().await;
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    // Auth is on exactly when the port serves TLS (docs/security.md).
    let auth = if cfg.tls.is_some() {
        crate::auth::Auth::on(&node)
    } else {
        crate::auth::Auth::off()
    };
    let mailbox = MailboxServer::new(
        MailboxService::new(node.clone(), cfg.api.clone(), closing_rx)
            .with_auth(auth.clone())
            .with_quotas(quotas),
    )
    .max_decoding_message_size(cfg.request_bytes_max)
    .max_encoding_message_size(64 << 20);
    let mut raft = RaftService::new(node.cluster_id(), node.inbox());
    if cfg.tls.is_some() {
        // Over TLS, only a node certificate naming the sender's host may
        // feed this node's Raft inbox.
        raft = raft.with_peer_check(transport.clone());
    }
    let raft = raft.into_server();
    // Reflection lists the public services only: the Raft transport is for
    // peers, and its contract is internal.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pigeonhole_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("pigeonhole.v1.Mailbox")
        .with_service_name("pigeonhole.v1.Admin")
        .with_service_name("grpc.health.v1.Health")
        .build_v1()
        .map_err(|e| ClusterError::Config(format!("reflection descriptors: {e}")))?;
    tracing::info!(
        "node {node_id} serving {} on {} ({} cluster {cluster_ids:?}), data in {}",
        if server_tls.is_some() { "TLS" } else { "plaintext" },
        listener
            .local_addr()
            .map_or_else(|_| cfg.listen.to_string(), |a| a.to_string()),
        if joined { "joined; initial" } else { "initial" },
        cfg.data_dir.display()
    );
    // This process restarts itself to rebuild damaged state (D50); only
    // the server arms that, never a library user or a test.
    crate::damage::watch(&cfg.data_dir);
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    // Admin calls end at their caller's grpc-timeout (Mailbox handlers read
    // it themselves).
    let admin = crate::api::deadline::Deadlined::new(AdminServer::new(
        AdminService::new(node.clone()).with_auth(auth.clone()),
    ));
    // With auth on, callers are authenticated from headers and connection
    // before a request body is decoded (crate::auth::check).
    let router = if auth.is_on() {
        tonic::transport::Server::builder()
            .layer(crate::metrics::GrpcMetricsLayer::new(cfg.slow_request_ms))
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                mailbox,
                auth.interceptor(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                admin,
                auth.interceptor(),
            ))
            .add_service(raft)
    } else {
        tonic::transport::Server::builder()
            .layer(crate::metrics::GrpcMetricsLayer::new(cfg.slow_request_ms))
            .add_service(health_svc)
            .add_service(reflection)
            .add_service(mailbox)
            .add_service(admin)
            .add_service(raft)
    };
    // Health says SERVING and the router is built: systemd may go on.
    crate::systemd::ready(&node);
    let stopping = async move {
        shutdown.await;
        crate::systemd::stopping();
        // Long-polls and Subscribe streams end now; unary requests in
        // flight finish normally.
        let _ = closing_tx.send(true);
        health.set_not_serving::<MailboxServer<MailboxService>>().await;
        let _ = stopping_tx.send(true);
    };
    let serve: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match server_tls {
            Some(tls) => {
                Box::pin(router.serve_with_incoming_shutdown(pigeonhole_tls::server::incoming(listener, tls), stopping))
            }
            None => {
                // Nagle off on every accepted connection. tonic applies its
                // own `tcp_nodelay` only to listeners it binds itself; with
                // Nagle on, a small response queued behind an
                // unacknowledged one waits for the peer's delayed ACK
                // (~40 ms), which stalls concurrent streams.
                let incoming =
                    tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |conn| {
                        conn.and_then(|c| c.set_nodelay(true).map(|()| c))
                    });
                Box::pin(router.serve_with_incoming_shutdown(incoming, stopping))
            }
        };
    let mut serve = serve;
    // A driver that stopped on an error (one that is not damage, which
    // restarts the process, D50) leaves nothing to serve: the server stops
    // too and the process exits with that error, for its supervisor to
    // see and restart, rather than answer UNAVAILABLE while health says
    // SERVING.
    let driver = node.clone();
    let driver_stopped = async move {
        while driver.is_running() {
            tokio::time::sleep(std::time::Duration::from_millis(DRIVER_CHECK_MS)).await;
        }
    };
    let served = tokio::select! {
        r = &mut serve => r,
        () = driver_stopped => {
            tracing::error!("node {node_id}: the Raft driver stopped; stopping the server");
            Ok(())
        }
        _ = async {
            let _ = stopping_rx.wait_for(|s| *s).await;
            tokio::time::sleep(std::time::Duration::from_millis(SHUTDOWN_GRACE_MS)).await;
        } => {
            // Connections that never close by themselves (peer streams,
            // health watches) must not hold the node up forever.
            Ok(())
        }
    };
    // In-flight requests are done; stop Raft and make everything durable.
    let stopped = node.stop();
    let flushed = node.engine().flush();
    served.map_err(|e| ClusterError::Io(std::io::Error::other(e)))?;
    stopped?;
    flushed?;
    tracing::info!("node {node_id} stopped cleanly");
    Ok(())
}

/// Logs which RocksDB library this node loaded and whether it keeps RocksDB's
/// debug assertions, and sets the `pigeonhole_rocksdb_debug_asserts` gauge
/// (a no-op without a metrics endpoint). Why: the library is chosen by the
/// node's environment, not by the binary, and Debian's build (assertions
/// on) applies appends about a sixth slower than one with `NDEBUG` (D52).
fn report_rocksdb_library() {
    let lib = pigeonhole_engine::rocksdb_library();
    let path = lib.path.as_deref().map_or_else(
        || "(not found in /proc/self/maps)".to_string(),
        |p| p.display().to_string(),
    );
    if lib.debug_asserts {
        tracing::info!(
            "RocksDB library {path} keeps RocksDB's debug assertions (Debian's build): \
             scripts/build-rocksdb-ndebug builds one without (docs/operations.md, \"The RocksDB library\")"
        );
    } else {
        tracing::info!("RocksDB library {path}");
    }
    metrics::gauge!(crate::metrics::ROCKSDB_DEBUG_ASSERTS).set(if lib.debug_asserts { 1.0 } else { 0.0 });
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
