//! The server's settings, from three sources merged with a fixed
//! precedence: a command-line flag beats its `PIGEONHOLE_*` environment
//! variable (clap merges those two), which beats the TOML config file
//! (`--config`), which beats the built-in default. This is the order etcd
//! and NATS users expect: a file for the fleet, a flag for the one-off.
//!
//! Every source fills the same [`Settings`] (all fields optional), so the
//! merge is one [`Settings::overlay`] and validation happens once, in
//! [`Settings::into_server_config`], with errors that name the setting and
//! its allowed range. Unknown keys in the file are an error: a misspelt limit
//! must not be silently ignored.
//!
//! The file format (every key optional):
//!
//! ```toml
//! node_id = 1
//! data_dir = "./pigeonhole-data"
//! listen = "127.0.0.1:7070"
//! advertise = "10.0.0.1:7070"
//! initial_cluster = "1=10.0.0.1:7070,2=10.0.0.2:7070,3=10.0.0.3:7070"
//! shards = 12              # absent: 4 per initial node, 8 to 256 (D59)
//! replication_factor = 3
//! zone = "eu-west-1a"       # failure domain; empty or absent: none
//! # join = "10.0.0.1:7070,10.0.0.2:7070"   # instead of node_id, initial_cluster,
//! #                                          # shards, replication_factor
//! unsafe_no_fsync = false   # true = NOT durable (benchmarks only)
//! insecure = false          # true = plaintext on a non-loopback address
//! metrics_listen = "127.0.0.1:9090"   # Prometheus endpoint; absent: none
//! log_format = "text"       # or "json": one object per line
//! log_level = "info"        # a tracing filter: "info,raft=debug"
//! slow_request_ms = 1000    # requests slower than this are logged
//!
//! [tls]                     # all three, or none (docs/security.md)
//! ca = "/etc/pigeonhole/ca.crt"
//! cert = "/etc/pigeonhole/node.crt"
//! key = "/etc/pigeonhole/node.key"
//!
//! [limits]
//! request_bytes_max = 16777216
//! request_timeout_ms = 5000
//! batch_items_max = 1024
//! sync_wait_ms_max = 60000
//! subscribe_mailboxes_max = 10000
//! subscribe_in_flight_max = 65536
//!
//! [raft]
//! log_entries_max = 20000      # entries per shard log before compaction
//! log_retain_entries = 2000    # kept behind the applied index for followers
//! snapshot_send_bytes_per_s = 104857600   # all snapshots this node sends
//! apply_threads = 1           # apply workers; absent: a quarter of the
//!                             # cores, 1 to 4 (D64)
//! driver_threads = 1          # Raft drivers; absent: an eighth of the
//!                             # cores, 1 to 4 (D65)
//! ```

use crate::api::ApiLimits;
use crate::config::InitialCluster;
use crate::server::ServerConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

/// Largest config file read, in bytes: a config is a few hundred bytes; a
/// huge file is a mistake (wrong path), not a config.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1 << 20;

/// Settings from one source; `None` = not set by that source.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This node's id (a key of `initial_cluster`).
    pub node_id: Option<u64>,
    /// Where the node keeps its data.
    pub data_dir: Option<PathBuf>,
    /// The address to bind.
    pub listen: Option<SocketAddr>,
    /// The address peers and clients reach this node at.
    pub advertise: Option<String>,
    /// `id=host:port,...`.
    pub initial_cluster: Option<String>,
    /// `host:port,...`: members of a running cluster to join through.
    pub join: Option<String>,
    /// Failure domain.
    pub zone: Option<String>,
    /// Data shards at bootstrap.
    pub shards: Option<u64>,
    /// Replicas per shard.
    pub replication_factor: Option<usize>,
    /// NOT DURABLE: never fsync (benchmarks only).
    pub unsafe_no_fsync: Option<bool>,
    /// Serve plaintext on a non-loopback address (`--insecure`).
    pub insecure: Option<bool>,
    /// Where the Prometheus endpoint listens.
    pub metrics_listen: Option<SocketAddr>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// The log filter directive (`info`, `info,raft=debug`, ...).
    pub log_level: Option<String>,
    /// Requests slower than this are logged with their timings, ms.
    pub slow_request_ms: Option<u64>,
    /// TLS files.
    #[serde(default)]
    pub tls: TlsSettings,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitSettings,
    /// Raft log compaction.
    #[serde(default)]
    pub raft: RaftSettings,
}

/// The `[tls]` table: the node's certificate, its key, and the cluster CA
/// that peers' and clients' certificates must chain to.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The cluster CA certificate(s), PEM.
    pub ca: Option<PathBuf>,
    /// This node's certificate chain, PEM.
    pub cert: Option<PathBuf>,
    /// This node's private key, PEM.
    pub key: Option<PathBuf>,
}

/// The `[raft]` table.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RaftSettings {
    /// Entries a shard's log may hold before it is compacted.
    pub log_entries_max: Option<u64>,
    /// Entries kept behind the applied index when compacting, so a follower
    /// that lags by fewer catches up from the log, not a snapshot.
    pub log_retain_entries: Option<u64>,
    /// Snapshot bytes this node sends per second, over all its snapshots.
    pub snapshot_send_bytes_per_s: Option<u64>,
    /// Apply worker threads.
    pub apply_threads: Option<usize>,
    /// Raft driver threads.
    pub driver_threads: Option<usize>,
}

/// The `[limits]` table.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest request message, in bytes.
    pub request_bytes_max: Option<usize>,
    /// How long a node waits for a proposal or read barrier at most.
    pub request_timeout_ms: Option<u64>,
    /// Items per AppendBatch.
    pub batch_items_max: Option<usize>,
    /// Longest Sync long-poll.
    pub sync_wait_ms_max: Option<u32>,
    /// Mailboxes per Subscribe.
    pub subscribe_mailboxes_max: Option<usize>,
    /// Largest Subscribe `max_in_flight`.
    pub subscribe_in_flight_max: Option<u32>,
}

/// Allowed ranges, so that a setting can never take the node somewhere it
/// was not designed or tested for.
const REQUEST_BYTES: RangeInclusive<usize> = 4_096..=(64 << 20);
const REQUEST_TIMEOUT_MS: RangeInclusive<u64> = 100..=60_000;
const SLOW_REQUEST_MS: RangeInclusive<u64> = 0..=3_600_000;
/// At most one Raft entry's worth of ops (`RaftTuning::ops_per_entry_max`).
const BATCH_ITEMS: RangeInclusive<usize> = 1..=4_096;
const SYNC_WAIT_MS: RangeInclusive<u32> = 0..=600_000;
const SUBSCRIBE_MAILBOXES: RangeInclusive<usize> = 1..=100_000;
const SUBSCRIBE_IN_FLIGHT: RangeInclusive<u32> = 1..=(1 << 20);
const LOG_ENTRIES: RangeInclusive<u64> = 16..=10_000_000;
const APPLY_THREADS: RangeInclusive<usize> = 1..=crate::config::APPLY_THREADS_MAX;
const DRIVER_THREADS: RangeInclusive<usize> = 1..=crate::config::DRIVER_THREADS_MAX;
const LOG_RETAIN: RangeInclusive<u64> = 0..=1_000_000;
const SNAPSHOT_SEND_BYTES_PER_S: RangeInclusive<u64> =
    crate::config::SNAPSHOT_SEND_BYTES_PER_S_MIN..=crate::config::SNAPSHOT_SEND_BYTES_PER_S_MAX;

fn check<T: PartialOrd + std::fmt::Display>(name: &str, v: T, range: &RangeInclusive<T>) -> Result<T, String> {
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{name} = {v} is out of range: {} to {}",
            range.start(),
            range.end()
        ))
    }
}

/// `host:port,...`, 1 to [`crate::join::JOIN_SEEDS_MAX`] members.
fn parse_seeds(list: &str) -> Result<Vec<String>, String> {
    let seeds: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if seeds.is_empty() || seeds.len() > crate::join::JOIN_SEEDS_MAX {
        return Err(format!(
            "join: {} members; give 1 to {}",
            seeds.len(),
            crate::join::JOIN_SEEDS_MAX
        ));
    }
    for s in &seeds {
        crate::join::check_address(s).map_err(|e| format!("join: {e}"))?;
    }
    Ok(seeds)
}

impl Settings {
    /// Parses a config file's text.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| format!("config file: {e}"))
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Settings, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        if meta.len() > CONFIG_FILE_BYTES_MAX {
            return Err(format!(
                "config file {}: {} bytes; the limit is {CONFIG_FILE_BYTES_MAX}",
                path.display(),
                meta.len()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        Settings::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// `self` with every setting that `over` sets replaced by `over`'s.
    pub fn overlay(self, over: Settings) -> Settings {
        let l = self.limits;
        let o = over.limits;
        let r = self.raft;
        let ro = over.raft;
        Settings {
            node_id: over.node_id.or(self.node_id),
            data_dir: over.data_dir.or(self.data_dir),
            listen: over.listen.or(self.listen),
            advertise: over.advertise.or(self.advertise),
            initial_cluster: over.initial_cluster.or(self.initial_cluster),
            join: over.join.or(self.join),
            zone: over.zone.or(self.zone),
            shards: over.shards.or(self.shards),
            replication_factor: over.replication_factor.or(self.replication_factor),
            unsafe_no_fsync: over.unsafe_no_fsync.or(self.unsafe_no_fsync),
            insecure: over.insecure.or(self.insecure),
            metrics_listen: over.metrics_listen.or(self.metrics_listen),
            log_format: over.log_format.or(self.log_format),
            log_level: over.log_level.or(self.log_level),
            slow_request_ms: over.slow_request_ms.or(self.slow_request_ms),
            tls: TlsSettings {
                ca: over.tls.ca.or(self.tls.ca),
                cert: over.tls.cert.or(self.tls.cert),
                key: over.tls.key.or(self.tls.key),
            },
            limits: LimitSettings {
                request_bytes_max: o.request_bytes_max.or(l.request_bytes_max),
                request_timeout_ms: o.request_timeout_ms.or(l.request_timeout_ms),
                batch_items_max: o.batch_items_max.or(l.batch_items_max),
                sync_wait_ms_max: o.sync_wait_ms_max.or(l.sync_wait_ms_max),
                subscribe_mailboxes_max: o.subscribe_mailboxes_max.or(l.subscribe_mailboxes_max),
                subscribe_in_flight_max: o.subscribe_in_flight_max.or(l.subscribe_in_flight_max),
            },
            raft: RaftSettings {
                log_entries_max: ro.log_entries_max.or(r.log_entries_max),
                log_retain_entries: ro.log_retain_entries.or(r.log_retain_entries),
                snapshot_send_bytes_per_s: ro.snapshot_send_bytes_per_s.or(r.snapshot_send_bytes_per_s),
                apply_threads: ro.apply_threads.or(r.apply_threads),
                driver_threads: ro.driver_threads.or(r.driver_threads),
            },
        }
    }

    /// The server configuration: defaults for what is unset, every value
    /// checked against its range.
    pub fn into_server_config(self) -> Result<ServerConfig, String> {
        let mut cfg = ServerConfig::single_node_default();
        if let Some(id) = self.node_id {
            cfg.node_id = id;
        }
        if let Some(d) = self.data_dir {
            cfg.data_dir = d;
        }
        if let Some(l) = self.listen {
            cfg.listen = l;
        }
        let advertise = self.advertise.unwrap_or_else(|| cfg.listen.to_string());
        if let Some(seeds) = &self.join {
            if self.node_id.is_some()
                || self.initial_cluster.is_some()
                || self.shards.is_some()
                || self.replication_factor.is_some()
            {
                return Err(
                    "join: a joining node is given its id, shard count and replication factor by the \
                            cluster; leave node_id, initial_cluster, shards and replication_factor unset"
                        .into(),
                );
            }
            cfg.join = parse_seeds(seeds)?;
            crate::join::check_address(&advertise).map_err(|e| format!("advertise: {e}"))?;
        }
        cfg.advertise = advertise.clone();
        if let Some(zone) = self.zone {
            crate::nodes::check_zone(&zone).map_err(|e| format!("zone: {e}"))?;
            cfg.zone = zone;
        }
        cfg.initial_cluster = match self.initial_cluster {
            Some(s) => InitialCluster::parse(&s).map_err(|e| format!("initial_cluster: {e}"))?,
            None => InitialCluster::single(&advertise),
        };
        if !cfg.initial_cluster.ids().contains(&cfg.node_id) {
            return Err(format!(
                "node_id {} is not in initial_cluster (ids {:?})",
                cfg.node_id,
                cfg.initial_cluster.ids()
            ));
        }
        let nodes = cfg.initial_cluster.nodes.len();
        // Unset: the count the data dir was bootstrapped with, or (a new
        // one) the default for the initial cluster's size (D59).
        cfg.shard_count = match self.shards {
            Some(n) => n,
            None => crate::node::identity_shard_count(&cfg.data_dir)
                .map_err(|e| format!("shards: {e}"))?
                .unwrap_or_else(|| crate::config::default_shard_count(nodes)),
        };
        cfg.replication_factor = self.replication_factor.unwrap_or(if nodes >= 3 { 3 } else { 1 });
        cfg.unsafe_no_fsync = self.unsafe_no_fsync.unwrap_or(false);
        cfg.insecure = self.insecure.unwrap_or(false);
        cfg.metrics_listen = self.metrics_listen;
        cfg.log_format = match self.log_format.as_deref() {
            Some(f) => f.parse().map_err(|e| format!("log_format: {e}"))?,
            None => crate::logging::LogFormat::Text,
        };
        cfg.log_level = self
            .log_level
            .unwrap_or_else(|| crate::logging::DEFAULT_FILTER.to_string());
        cfg.slow_request_ms = check(
            "slow_request_ms",
            self.slow_request_ms.unwrap_or(cfg.slow_request_ms),
            &SLOW_REQUEST_MS,
        )?;
        if cfg.metrics_listen.is_some_and(|m| m == cfg.listen) {
            return Err("metrics_listen: must differ from listen (the metrics endpoint is plain HTTP)".into());
        }
        cfg.tls = match pigeonhole_tls::TlsFiles::from_flags(self.tls.ca, self.tls.cert, self.tls.key)? {
            Some(f) if f.cert.is_none() => {
                return Err("tls: a node needs its certificate and key (--tls-cert, --tls-key) besides the CA".into())
            }
            f => f,
        };
        let l = self.limits;
        let d = ApiLimits::default();
        cfg.request_bytes_max = check(
            "limits.request_bytes_max",
            l.request_bytes_max.unwrap_or(cfg.request_bytes_max),
            &REQUEST_BYTES,
        )?;
        cfg.request_timeout_ms = check(
            "limits.request_timeout_ms",
            l.request_timeout_ms.unwrap_or(cfg.request_timeout_ms),
            &REQUEST_TIMEOUT_MS,
        )?;
        cfg.api = ApiLimits {
            batch_items_max: check(
                "limits.batch_items_max",
                l.batch_items_max.unwrap_or(d.batch_items_max),
                &BATCH_ITEMS,
            )?,
            wait_ms_max: check(
                "limits.sync_wait_ms_max",
                l.sync_wait_ms_max.unwrap_or(d.wait_ms_max),
                &SYNC_WAIT_MS,
            )?,
            subscribe_mailboxes_max: check(
                "limits.subscribe_mailboxes_max",
                l.subscribe_mailboxes_max.unwrap_or(d.subscribe_mailboxes_max),
                &SUBSCRIBE_MAILBOXES,
            )?,
            subscribe_in_flight_max: check(
                "limits.subscribe_in_flight_max",
                l.subscribe_in_flight_max.unwrap_or(d.subscribe_in_flight_max),
                &SUBSCRIBE_IN_FLIGHT,
            )?,
            ..d
        };
        cfg.log_entries_max = check(
            "raft.log_entries_max",
            self.raft.log_entries_max.unwrap_or(cfg.log_entries_max),
            &LOG_ENTRIES,
        )?;
        cfg.log_retain_entries = check(
            "raft.log_retain_entries",
            self.raft.log_retain_entries.unwrap_or(cfg.log_retain_entries),
            &LOG_RETAIN,
        )?;
        cfg.snapshot_send_bytes_per_s = check(
            "raft.snapshot_send_bytes_per_s",
            self.raft
                .snapshot_send_bytes_per_s
                .unwrap_or(cfg.snapshot_send_bytes_per_s),
            &SNAPSHOT_SEND_BYTES_PER_S,
        )?;
        cfg.apply_threads = check(
            "raft.apply_threads",
            self.raft.apply_threads.unwrap_or(cfg.apply_threads),
            &APPLY_THREADS,
        )?;
        cfg.driver_threads = check(
            "raft.driver_threads",
            self.raft.driver_threads.unwrap_or(cfg.driver_threads),
            &DRIVER_THREADS,
        )?;
        if cfg.log_retain_entries >= cfg.log_entries_max {
            return Err(format!(
                "raft.log_retain_entries = {} must be below raft.log_entries_max = {}",
                cfg.log_retain_entries, cfg.log_entries_max
            ));
        }
        // The default in-flight window must fit under a lowered maximum.
        cfg.api.subscribe_in_flight_default = cfg.api.subscribe_in_flight_default.min(cfg.api.subscribe_in_flight_max);
        Ok(cfg)
    }
}

#[cfg(test)]
#[path = "settings_tests.rs"]
mod tests;
