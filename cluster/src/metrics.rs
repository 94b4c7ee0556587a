//! Prometheus metrics (issue 15, part 1; docs/operations.md "Monitoring").
//!
//! What it is: every metric the node exports, named in one place, and the
//! small functions the rest of the node calls to record them, on top of the
//! `metrics` facade; and, in `rpc`, the tower layer that records every gRPC
//! request. With `--metrics-listen ADDR` the node installs the
//! Prometheus exporter (metrics-exporter-prometheus, its own HTTP listener
//! on that address: `GET /metrics`); without it no recorder is installed
//! and every call here is a no-op that costs a load of the facade's global.
//!
//! Why shaped this way:
//! - Names follow etcd's and TiKV's convention: a `pigeonhole_` prefix, the
//!   base unit in the name (`_seconds`, `_bytes`), `_total` on counters.
//! - Labels are bounded, because an unbounded label is a memory leak in
//!   every scraper: gRPC methods are the served ones (a method the server
//!   does not have is counted as `unknown`), shards are the node's (at most
//!   `SHARD_COUNT_MAX`), and namespaces are those with a record (at most
//!   1,024); appends to any other namespace count under `other`.
//! - Hot paths add to counters and histograms only (a few atomic adds);
//!   gauges that need a walk over replicas are set by the driver once a
//!   second, and RocksDB's and the Raft log's figures are sampled by a
//!   task every [`SAMPLE_EVERY`].

use crate::node::Node;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;
use std::time::Duration;

/// gRPC requests answered, by `method` and `code`.
pub const GRPC_REQUESTS: &str = "pigeonhole_grpc_requests_total";
/// Time to a gRPC response's headers (for a unary call, its answer), by
/// `method` and `code`.
pub const GRPC_DURATION: &str = "pigeonhole_grpc_request_duration_seconds";
/// Client commands proposed to Raft (entries), all shards.
pub const PROPOSALS: &str = "pigeonhole_raft_proposals_total";
/// Committed entries handed to apply.
pub const COMMITTED: &str = "pigeonhole_raft_committed_entries_total";
/// Entries applied to the state machine.
pub const APPLIED: &str = "pigeonhole_raft_applied_entries_total";
/// Sum over this node's replicas of commit index − applied index.
pub const APPLY_LAG: &str = "pigeonhole_raft_apply_lag_entries";
/// One group-commit write of every shard's Ready, by `fsync` (true/false).
pub const LOG_WRITE_DURATION: &str = "pigeonhole_raft_log_write_duration_seconds";
/// Entries made durable by one fsync'd group commit.
pub const FSYNC_BATCH: &str = "pigeonhole_raft_log_fsync_batch_entries";
/// Record bytes written to the Raft log.
pub const LOG_BYTES: &str = "pigeonhole_raft_log_written_bytes_total";
/// fdatasyncs of the Raft log.
pub const LOG_FSYNCS: &str = "pigeonhole_raft_log_fsyncs_total";
/// Raft log writes of this node's drivers that were joined into another
/// driver's record (the log's group commit across drivers).
pub const LOG_APPENDS_JOINED: &str = "pigeonhole_raft_log_appends_joined_total";
/// Times a replica learned of a new leader, by `shard`.
pub const LEADER_CHANGES: &str = "pigeonhole_raft_leader_changes_total";
/// Writes this node answered for a shard it does not lead (Raft forwarded
/// them to the leader; the answer named it), by `shard`: clients routing
/// through followers (D55).
pub const FORWARDED_WRITES: &str = "pigeonhole_forwarded_writes_total";
/// Times a replica started an election (or pre-election), by `shard`.
pub const ELECTIONS: &str = "pigeonhole_raft_elections_total";
/// Replicas by `state`: awake or asleep (hibernating).
pub const SHARDS: &str = "pigeonhole_raft_replicas";
/// Snapshots sent, by `result` (ok/failed).
pub const SNAPSHOTS_SENT: &str = "pigeonhole_snapshots_sent_total";
/// Snapshot bytes sent.
pub const SNAPSHOT_SENT_BYTES: &str = "pigeonhole_snapshot_sent_bytes_total";
/// Time from a snapshot send's start to its report.
pub const SNAPSHOT_SEND_DURATION: &str = "pigeonhole_snapshot_send_duration_seconds";
/// Snapshots received and ingested, by `result` (ok/failed).
pub const SNAPSHOTS_RECEIVED: &str = "pigeonhole_snapshots_received_total";
/// Bytes of the spooled snapshots ingested.
pub const SNAPSHOT_RECEIVED_BYTES: &str = "pigeonhole_snapshot_received_bytes_total";
/// Time to ingest a received snapshot.
pub const SNAPSHOT_INGEST_DURATION: &str = "pigeonhole_snapshot_ingest_duration_seconds";
/// Open Subscribe streams.
pub const SUBSCRIBE_STREAMS: &str = "pigeonhole_subscribe_streams";
/// Mailboxes followed by open Subscribe streams.
pub const SUBSCRIBE_MAILBOXES: &str = "pigeonhole_subscribe_followed_mailboxes";
/// Appends answered with an earlier append's seq (the idempotency key was
/// known), counted where applied.
pub const DEDUP_HITS: &str = "pigeonhole_dedup_hits_total";
/// Appends admitted by a node (authorized and within limits), by
/// `namespace`.
pub const NAMESPACE_APPENDS: &str = "pigeonhole_namespace_appends_total";
/// Payload bytes of those appends, by `namespace`.
pub const NAMESPACE_BYTES: &str = "pigeonhole_namespace_append_bytes_total";
/// RocksDB's estimate of the state machine's bytes awaiting compaction.
pub const COMPACTION_PENDING: &str = "pigeonhole_rocksdb_compaction_pending_bytes";
/// 1 while RocksDB stops writes, else 0.
pub const WRITE_STOPPED: &str = "pigeonhole_rocksdb_write_stopped";
/// RocksDB's delayed write rate while it slows writes (0 when it does not).
pub const WRITE_DELAYED_RATE: &str = "pigeonhole_rocksdb_delayed_write_rate_bytes";
/// Bytes in the state machine's memtables.
pub const MEMTABLE_BYTES: &str = "pigeonhole_rocksdb_memtable_bytes";
/// 1 when the RocksDB library this node loaded keeps RocksDB's debug
/// assertions (Debian's package), 0 for a build with `NDEBUG` (D52). Set at
/// start.
pub const ROCKSDB_DEBUG_ASSERTS: &str = "pigeonhole_rocksdb_debug_asserts";
/// Bytes of the state machine's live SST files.
pub const SST_BYTES: &str = "pigeonhole_rocksdb_sst_bytes";

/// How often RocksDB's and the log's figures are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Latency buckets, seconds: 100 µs to 10 s.
const LATENCY_BUCKETS_S: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Entries-per-fsync buckets.
const BATCH_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1_024.0, 4_096.0,
];

/// Installs the exporter on `addr` and describes every metric. Fails if the
/// address cannot be bound or a recorder is already installed in this
/// process (one node per process; in-process test clusters install none).
pub fn install(addr: SocketAddr) -> Result<(), String> {
    let installed = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS_S)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(FSYNC_BATCH.into()), &BATCH_BUCKETS))
        .and_then(PrometheusBuilder::install)
        .map_err(|e| format!("metrics endpoint on {addr}: {e}"));
    installed?;
    INSTALLED.store(true, std::sync::atomic::Ordering::Release);
    describe();
    Ok(())
}

/// Set once the exporter is installed: recordings whose labels cost an
/// allocation per call (per-namespace appends) are skipped before it.
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process exports metrics.
pub fn enabled() -> bool {
    INSTALLED.load(std::sync::atomic::Ordering::Acquire)
}

/// The counters this module exports, with their units and help texts.
const COUNTERS: &[(&str, Unit, &str)] = &[
    (GRPC_REQUESTS, Unit::Count, "gRPC requests answered, by method and code"),
    (PROPOSALS, Unit::Count, "client commands proposed to Raft"),
    (COMMITTED, Unit::Count, "committed entries handed to apply"),
    (APPLIED, Unit::Count, "entries applied to the state machine"),
    (LOG_BYTES, Unit::Bytes, "record bytes written to the Raft log"),
    (LOG_FSYNCS, Unit::Count, "fdatasyncs of the Raft log"),
    (
        LOG_APPENDS_JOINED,
        Unit::Count,
        "Raft log appends written in a record shared with another caller's",
    ),
    (
        LEADER_CHANGES,
        Unit::Count,
        "new leaders a replica learned of, by shard",
    ),
    (ELECTIONS, Unit::Count, "elections a replica started, by shard"),
    (
        FORWARDED_WRITES,
        Unit::Count,
        "writes answered for a shard another node leads, by shard",
    ),
    (SNAPSHOTS_SENT, Unit::Count, "snapshots sent, by result"),
    (SNAPSHOT_SENT_BYTES, Unit::Bytes, "snapshot bytes sent"),
    (
        SNAPSHOTS_RECEIVED,
        Unit::Count,
        "snapshots received and ingested, by result",
    ),
    (SNAPSHOT_RECEIVED_BYTES, Unit::Bytes, "spooled snapshot bytes ingested"),
    (DEDUP_HITS, Unit::Count, "appends answered with an earlier append's seq"),
    (NAMESPACE_APPENDS, Unit::Count, "appends admitted, by namespace"),
    (
        NAMESPACE_BYTES,
        Unit::Bytes,
        "payload bytes of admitted appends, by namespace",
    ),
];

/// The histograms this module exports, with their units and help texts.
const HISTOGRAMS: &[(&str, Unit, &str)] = &[
    (
        GRPC_DURATION,
        Unit::Seconds,
        "time to a gRPC response, by method and code",
    ),
    (
        LOG_WRITE_DURATION,
        Unit::Seconds,
        "one group-commit write of the Raft log, by fsync",
    ),
    (
        FSYNC_BATCH,
        Unit::Count,
        "entries made durable by one fsync'd group commit",
    ),
    (SNAPSHOT_SEND_DURATION, Unit::Seconds, "time to send a snapshot"),
    (
        SNAPSHOT_INGEST_DURATION,
        Unit::Seconds,
        "time to ingest a received snapshot",
    ),
];

/// The gauges this module exports, with their units and help texts.
const GAUGES: &[(&str, Unit, &str)] = &[
    (
        APPLY_LAG,
        Unit::Count,
        "sum over replicas of commit index minus applied index",
    ),
    (SHARDS, Unit::Count, "replicas by state (awake, asleep)"),
    (SUBSCRIBE_STREAMS, Unit::Count, "open Subscribe streams"),
    (
        SUBSCRIBE_MAILBOXES,
        Unit::Count,
        "mailboxes followed by open Subscribe streams",
    ),
    (
        COMPACTION_PENDING,
        Unit::Bytes,
        "state machine bytes awaiting compaction (RocksDB estimate)",
    ),
    (WRITE_STOPPED, Unit::Count, "1 while RocksDB stops writes"),
    (
        WRITE_DELAYED_RATE,
        Unit::Bytes,
        "RocksDB's delayed write rate while it slows writes, bytes/s",
    ),
    (MEMTABLE_BYTES, Unit::Bytes, "bytes in the state machine's memtables"),
    (
        ROCKSDB_DEBUG_ASSERTS,
        Unit::Count,
        "1 when the loaded RocksDB library keeps its debug assertions (Debian's build)",
    ),
    (SST_BYTES, Unit::Bytes, "bytes of the state machine's live SST files"),
];

fn describe() {
    for &(name, unit, help) in COUNTERS {
        describe_counter!(name, unit, help);
    }
    for &(name, unit, help) in HISTOGRAMS {
        describe_histogram!(name, unit, help);
    }
    for &(name, unit, help) in GAUGES {
        describe_gauge!(name, unit, help);
    }
}

/// Starts the task that samples RocksDB's and the Raft log's figures.
pub fn spawn_sampler(node: &Node) -> tokio::task::JoinHandle<()> {
    let weak = node.downgrade();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            let engine = node.engine();
            let log = engine.raft_log_stats();
            counter!(LOG_BYTES).absolute(log.bytes_written);
            counter!(LOG_FSYNCS).absolute(log.fsyncs);
            counter!(LOG_APPENDS_JOINED).absolute(log.appends_joined);
            for (name, property) in [
                (COMPACTION_PENDING, "rocksdb.estimate-pending-compaction-bytes"),
                (WRITE_STOPPED, "rocksdb.is-write-stopped"),
                (WRITE_DELAYED_RATE, "rocksdb.actual-delayed-write-rate"),
                (MEMTABLE_BYTES, "rocksdb.cur-size-all-mem-tables"),
                (SST_BYTES, "rocksdb.live-sst-files-size"),
            ] {
                if let Some(v) = engine.data_property(property) {
                    gauge!(name).set(v as f64);
                }
            }
        }
    })
}

// ---- Recording, called from the node -------------------------------------

/// `n` client commands proposed.
pub fn proposed(n: usize) {
    counter!(PROPOSALS).increment(n as u64);
}

/// `n` committed entries handed to apply.
pub fn committed(n: usize) {
    counter!(COMMITTED).increment(n as u64);
}

/// `n` entries applied, `dedup_hits` of them duplicates.
pub fn applied(n: usize, dedup_hits: u64) {
    counter!(APPLIED).increment(n as u64);
    if dedup_hits != 0 {
        counter!(DEDUP_HITS).increment(dedup_hits);
    }
}

/// One group-commit write took `took`; if fsync'd, it made `entries` durable.
pub fn log_written(fsync: bool, entries: usize, took: Duration) {
    histogram!(LOG_WRITE_DURATION, "fsync" => if fsync { "true" } else { "false" }).record(took.as_secs_f64());
    if fsync {
        histogram!(FSYNC_BATCH).record(entries as f64);
    }
}

/// A replica of `shard` learned of a new leader.
pub fn leader_changed(shard: u64) {
    counter!(LEADER_CHANGES, "shard" => shard.to_string()).increment(1);
}

/// This node answered a write of `shard`, which another node leads.
pub fn forwarded_write(shard: u64) {
    counter!(FORWARDED_WRITES, "shard" => shard.to_string()).increment(1);
}

/// A replica of `shard` started an election.
pub fn election(shard: u64) {
    counter!(ELECTIONS, "shard" => shard.to_string()).increment(1);
}

/// The driver's once-a-second gauges.
pub fn replicas(awake: usize, asleep: usize, apply_lag: u64) {
    gauge!(SHARDS, "state" => "awake").set(awake as f64);
    gauge!(SHARDS, "state" => "asleep").set(asleep as f64);
    gauge!(APPLY_LAG).set(apply_lag as f64);
}

/// A snapshot send ended.
pub fn snapshot_sent(ok: bool, bytes: u64, took: Duration) {
    counter!(SNAPSHOTS_SENT, "result" => if ok { "ok" } else { "failed" }).increment(1);
    counter!(SNAPSHOT_SENT_BYTES).increment(bytes);
    histogram!(SNAPSHOT_SEND_DURATION).record(took.as_secs_f64());
}

/// A received snapshot of `bytes` was ingested (or failed to be).
pub fn snapshot_ingested(ok: bool, bytes: u64, took: Duration) {
    counter!(SNAPSHOTS_RECEIVED, "result" => if ok { "ok" } else { "failed" }).increment(1);
    if ok {
        counter!(SNAPSHOT_RECEIVED_BYTES).increment(bytes);
    }
    histogram!(SNAPSHOT_INGEST_DURATION).record(took.as_secs_f64());
}

/// A Subscribe stream opened (`+1`) or closed (`-1`), following `mailboxes`.
pub fn subscribe_stream(delta: f64, mailboxes: usize) {
    gauge!(SUBSCRIBE_STREAMS).increment(delta);
    gauge!(SUBSCRIBE_MAILBOXES).increment(delta * mailboxes as f64);
}

/// An append of `payload_bytes` to `namespace` was admitted; `label` is the
/// namespace if it has a record (a bounded set), else "other".
pub fn namespace_append(label: &str, payload_bytes: usize) {
    counter!(NAMESPACE_APPENDS, "namespace" => label.to_string()).increment(1);
    counter!(NAMESPACE_BYTES, "namespace" => label.to_string()).increment(payload_bytes as u64);
}

/// Every metric name this module exports.
pub const NAMES: [&str; 32] = [
    GRPC_REQUESTS,
    GRPC_DURATION,
    PROPOSALS,
    COMMITTED,
    APPLIED,
    APPLY_LAG,
    LOG_WRITE_DURATION,
    FSYNC_BATCH,
    LOG_BYTES,
    LOG_FSYNCS,
    LOG_APPENDS_JOINED,
    LEADER_CHANGES,
    ELECTIONS,
    FORWARDED_WRITES,
    SHARDS,
    SNAPSHOTS_SENT,
    SNAPSHOT_SENT_BYTES,
    SNAPSHOT_SEND_DURATION,
    SNAPSHOTS_RECEIVED,
    SNAPSHOT_RECEIVED_BYTES,
    SNAPSHOT_INGEST_DURATION,
    SUBSCRIBE_STREAMS,
    SUBSCRIBE_MAILBOXES,
    DEDUP_HITS,
    NAMESPACE_APPENDS,
    NAMESPACE_BYTES,
    COMPACTION_PENDING,
    WRITE_STOPPED,
    WRITE_DELAYED_RATE,
    MEMTABLE_BYTES,
    SST_BYTES,
    ROCKSDB_DEBUG_ASSERTS,
];

mod rpc;
pub use rpc::{GrpcMetrics, GrpcMetricsLayer};

#[cfg(test)]
mod tests {
    use super::*;

    /// `NAMES` (what the dashboard test checks) lists exactly the metrics
    /// `describe` registers: a metric added to one and not the other
    /// would escape the dashboard check (the RocksDB library gauge once
    /// did).
    #[test]
    fn the_exported_names_are_exactly_the_described_ones() {
        let described: std::collections::BTreeSet<&str> = COUNTERS
            .iter()
            .chain(HISTOGRAMS)
            .chain(GAUGES)
            .map(|(n, _, _)| *n)
            .collect();
        let named: std::collections::BTreeSet<&str> = NAMES.iter().copied().collect();
        assert_eq!(named.len(), NAMES.len(), "a name is listed twice");
        assert_eq!(described, named);
    }

    /// The dashboard in deploy/ uses only names this module exports (a
    /// histogram's `_bucket`, `_sum` and `_count` series included), and
    /// shows every one: a renamed metric cannot leave a dead panel, and a
    /// new one is not forgotten.
    #[test]
    fn the_dashboard_uses_exactly_the_exported_names() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/pigeonhole.json"
        ))
        .unwrap_or_default();
        assert!(!text.is_empty(), "deploy/grafana/pigeonhole.json is missing");
        let mut used = std::collections::BTreeSet::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("pigeonhole_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            used.insert(&tail[..end]);
            rest = &tail[end..];
        }
        let base = |n: &str| -> String {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_string()
        };
        let exported: std::collections::BTreeSet<String> = NAMES.iter().map(|n| base(n)).collect();
        for n in &used {
            // "pigeonhole_" alone is the dashboard's uid or title prefix.
            if n.len() > "pigeonhole_".len() {
                assert!(
                    exported.contains(&base(n)),
                    "the dashboard uses {n}, which is not exported"
                );
            }
        }
        let shown: std::collections::BTreeSet<String> = used.iter().map(|n| base(n)).collect();
        for n in &exported {
            assert!(shown.contains(n), "{n} is exported but not on the dashboard");
        }
    }
}
