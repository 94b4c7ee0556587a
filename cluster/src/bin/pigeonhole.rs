//! The `pigeonhole` server binary. It only turns flags, PIGEONHOLE_*
//! environment variables and an optional TOML file (`--config`) into a
//! [`ServerConfig`](pigeonhole_cluster::server::ServerConfig) and calls
//! [`pigeonhole_cluster::server::run`]. With no flags it runs a single node on
//! 127.0.0.1:7070 with its data in ./pigeonhole-data. Precedence and the file
//! format are in [`pigeonhole_cluster::settings`].

/// jemalloc, not the system allocator: apply makes many small allocations
/// per append (keys, records, decoded commands) on the driver thread, and
/// under a long run glibc's malloc took about 15 % of the servers' CPU
/// (`_int_malloc`, `malloc_consolidate`; docs/benchmarks.md). TiKV makes
/// the same choice.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::Parser;
use pigeonhole_cluster::server::{run, shutdown_signal, ServerConfig};
use pigeonhole_cluster::settings::{LimitSettings, RaftSettings, Settings, TlsSettings};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// A Pigeonhole node: the replicated mailbox store.
///
/// Every setting can come from a flag, its PIGEONHOLE_* environment
/// variable, or the TOML file given by --config, in that order of precedence.
#[derive(Debug, Parser)]
#[command(name = "pigeonhole", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Seed this node's data dir for a NEW cluster from a backup (`phctl
    /// backup create`), then exit. Run it on every node of the new cluster,
    /// with the flags the node will serve with (--shards as the backup's
    /// cluster had), before the node first starts. Any node count works.
    Restore {
        /// The backup directory.
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        flags: Flags,
    },
}

#[derive(Debug, clap::Args)]
struct Flags {
    /// A TOML config file (keys as in docs/operations.md).
    #[arg(long, env = "PIGEONHOLE_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id, a key of --initial-cluster [default: 1].
    #[arg(long, env = "PIGEONHOLE_NODE_ID")]
    node_id: Option<u64>,
    /// Where the node keeps its data [default: ./pigeonhole-data].
    #[arg(long, env = "PIGEONHOLE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The address to listen on, clients and peers alike [default: 127.0.0.1:7070].
    #[arg(long, env = "PIGEONHOLE_LISTEN")]
    listen: Option<SocketAddr>,
    /// The address peers and clients reach this node at [default: --listen].
    #[arg(long, env = "PIGEONHOLE_ADVERTISE")]
    advertise: Option<String>,
    /// The static initial cluster, id=host:port,... [default: this node alone].
    #[arg(long, env = "PIGEONHOLE_INITIAL_CLUSTER")]
    initial_cluster: Option<String>,
    /// Join a running cluster through any of its members, host:port,...:
    /// the cluster gives this node its id and it starts empty. Instead of
    /// --node-id, --initial-cluster, --shards and --replication-factor.
    /// Restarts with the same data dir ask no one.
    #[arg(long, env = "PIGEONHOLE_JOIN")]
    join: Option<String>,
    /// This node's failure domain (a rack, an availability zone): the
    /// replicas of a shard go to different zones where there are enough.
    /// Letters, digits, '.', '_', '-'; at most 64 bytes [default: none].
    #[arg(long, env = "PIGEONHOLE_ZONE")]
    zone: Option<String>,
    /// Data shards, fixed when the cluster is first started, 1 to 65,536
    /// [default: the data dir's; a new one, 4 per node of --initial-cluster,
    /// 8 to 256].
    #[arg(long, env = "PIGEONHOLE_SHARDS")]
    shards: Option<u64>,
    /// Replicas per shard: 1, 3 or 5 [default: 3, or 1 for fewer than 3 nodes].
    #[arg(long, env = "PIGEONHOLE_REPLICATION_FACTOR")]
    replication_factor: Option<usize>,
    /// NOT DURABLE: acknowledge writes without fsync. A machine crash or
    /// power loss can then lose acknowledged writes. For benchmarks only.
    #[arg(long, env = "PIGEONHOLE_UNSAFE_NO_FSYNC")]
    unsafe_no_fsync: bool,
    /// The cluster CA certificate (PEM) that peers' and clients'
    /// certificates must chain to. With --tls-cert and --tls-key, the port
    /// serves TLS only and peers are dialled with mTLS (docs/security.md).
    #[arg(long, env = "PIGEONHOLE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This node's certificate chain (PEM): common name "node", the hosts it
    /// is reached at as subject alternative names. Reloaded when it changes.
    #[arg(long, env = "PIGEONHOLE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This node's private key (PEM). Reloaded when it changes.
    #[arg(long, env = "PIGEONHOLE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address. Anyone who can reach the
    /// port can then read and write every mailbox and pose as a node.
    #[arg(long, env = "PIGEONHOLE_INSECURE")]
    insecure: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`, plain
    /// HTTP: bind it to a management network) [default: no endpoint].
    #[arg(long, env = "PIGEONHOLE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log lines as `text` or `json` (one object per line) [default: text].
    #[arg(long, env = "PIGEONHOLE_LOG_FORMAT")]
    log_format: Option<String>,
    /// Log filter: a level, or per-target directives such as
    /// `info,raft=debug`; changeable at run time (`phctl node log-level`)
    /// [default: info].
    #[arg(long, env = "PIGEONHOLE_LOG")]
    log_level: Option<String>,
    /// Requests slower than this are logged (0: every request) [default: 1000].
    #[arg(long, env = "PIGEONHOLE_SLOW_REQUEST_MS")]
    slow_request_ms: Option<u64>,
    /// Largest request, in bytes [default: 16777216].
    #[arg(long, env = "PIGEONHOLE_REQUEST_BYTES_MAX")]
    request_bytes_max: Option<usize>,
    /// Longest wait for a write or read barrier, in ms [default: 5000].
    #[arg(long, env = "PIGEONHOLE_REQUEST_TIMEOUT_MS")]
    request_timeout_ms: Option<u64>,
    /// Items per AppendBatch [default: 1024].
    #[arg(long, env = "PIGEONHOLE_BATCH_ITEMS_MAX")]
    batch_items_max: Option<usize>,
    /// Longest Sync long-poll, in ms [default: 60000].
    #[arg(long, env = "PIGEONHOLE_SYNC_WAIT_MS_MAX")]
    sync_wait_ms_max: Option<u32>,
    /// Mailboxes per Subscribe [default: 10000].
    #[arg(long, env = "PIGEONHOLE_SUBSCRIBE_MAILBOXES_MAX")]
    subscribe_mailboxes_max: Option<usize>,
    /// Largest Subscribe max_in_flight [default: 65536].
    #[arg(long, env = "PIGEONHOLE_SUBSCRIBE_IN_FLIGHT_MAX")]
    subscribe_in_flight_max: Option<u32>,
    /// Apply worker threads, 1 to 16 [default: a quarter of the cores, 1 to 4].
    #[arg(long, env = "PIGEONHOLE_APPLY_THREADS")]
    apply_threads: Option<usize>,
    /// Raft driver threads, 1 to 16 [default: an eighth of the cores, 1 to 4].
    #[arg(long, env = "PIGEONHOLE_DRIVER_THREADS")]
    driver_threads: Option<usize>,
}

fn settings(f: Flags) -> Result<Settings, String> {
    let file = match &f.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    Ok(file.overlay(Settings {
        node_id: f.node_id,
        data_dir: f.data_dir,
        listen: f.listen,
        advertise: f.advertise,
        initial_cluster: f.initial_cluster,
        join: f.join,
        zone: f.zone,
        shards: f.shards,
        replication_factor: f.replication_factor,
        // A flag can only turn it on; absent, the file decides.
        unsafe_no_fsync: f.unsafe_no_fsync.then_some(true),
        insecure: f.insecure.then_some(true),
        metrics_listen: f.metrics_listen,
        log_format: f.log_format,
        log_level: f.log_level,
        slow_request_ms: f.slow_request_ms,
        tls: TlsSettings {
            ca: f.tls_ca,
            cert: f.tls_cert,
            key: f.tls_key,
        },
        limits: LimitSettings {
            request_bytes_max: f.request_bytes_max,
            request_timeout_ms: f.request_timeout_ms,
            batch_items_max: f.batch_items_max,
            sync_wait_ms_max: f.sync_wait_ms_max,
            subscribe_mailboxes_max: f.subscribe_mailboxes_max,
            subscribe_in_flight_max: f.subscribe_in_flight_max,
        },
        // Log compaction and the snapshot budget are set in the config
        // file's [raft] table only.
        raft: RaftSettings {
            apply_threads: f.apply_threads,
            driver_threads: f.driver_threads,
            ..Default::default()
        },
    }))
}

#[tokio::main]
async fn main() -> ExitCode {
    // A panic on any thread ends the process (after the usual message and
    // backtrace), as TiKV's and Go servers' do: a node whose Raft driver or
    // apply thread died must not stay up answering `Stopped`, nor hide
    // behind a half-working port; its supervisor restarts it and recovery
    // runs. Found when a planted Raft bug panicked the driver thread and
    // the process lived on.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let cli = Cli::parse();
    let (flags, restore_from) = match cli.command {
        Some(Command::Restore { from, flags }) => (flags, Some(from)),
        None => (cli.flags, None),
    };
    let cfg = match settings(flags).and_then(Settings::into_server_config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pigeonhole: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = pigeonhole_cluster::logging::init(cfg.log_format, &cfg.log_level) {
        eprintln!("pigeonhole: {e}");
        return ExitCode::from(2);
    }
    if let Some(from) = restore_from {
        return restore(&cfg, &from);
    }
    match run(cfg, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pigeonhole: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pigeonhole restore`: seeds the data dir, prints what it did, exits.
fn restore(cfg: &ServerConfig, from: &std::path::Path) -> ExitCode {
    if !cfg.join.is_empty() {
        eprintln!("pigeonhole restore: --join adds an empty node to a running cluster; a restore seeds the nodes of --initial-cluster");
        return ExitCode::from(2);
    }
    let node_cfg = cfg.initial_node_config();
    let started = std::time::Instant::now();
    let done = pigeonhole_cluster::restore::restore(&node_cfg, from, |s| {
        tracing::info!(shard = s.id, records = s.records, bytes = s.bytes, "shard restored");
    });
    match done {
        Ok(r) => {
            println!(
                "restored {} of the backup's {} shards ({} records) into {} in {:.1} s; start the node with the same flags",
                r.replicas,
                r.shards,
                r.records,
                node_cfg.data_dir.display(),
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pigeonhole restore: {e}");
            ExitCode::FAILURE
        }
    }
}
