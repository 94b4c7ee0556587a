//! Node configuration: identity, the static initial cluster, and the Raft
//! tuning knobs. Every limit is a named field with its unit last, and
//! [`RaftTuning::validate`] rejects combinations that would break liveness
//! (e.g. hibernating before an election could time out).

use crate::error::ClusterError;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The static initial cluster, `1=host:port,2=host:port,...` (as etcd's
/// `--initial-cluster`): node id → raft transport address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialCluster {
    /// Node id (≥ 1) → address.
    pub nodes: BTreeMap<u64, String>,
}

/// At most this many nodes in a static initial cluster.
pub const INITIAL_NODES_MAX: usize = 64;

impl InitialCluster {
    /// Parses `1=127.0.0.1:7071,2=...`.
    pub fn parse(s: &str) -> Result<Self, ClusterError> {
        let bad = |why: String| ClusterError::Config(format!("--initial-cluster {s:?}: {why}"));
        let mut nodes = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, addr) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not id=host:port")))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| bad(format!("node id {id:?} is not a positive integer")))?;
            if id == 0 {
                return Err(bad("node id 0 is reserved (raft uses it for 'none')".into()));
            }
            let addr = addr.trim();
            if addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(bad(format!("address {addr:?} is not host:port")));
            }
            if nodes.insert(id, addr.to_string()).is_some() {
                return Err(bad(format!("node id {id} appears twice")));
            }
        }
        if nodes.is_empty() {
            return Err(bad("no nodes".into()));
        }
        if nodes.len() > INITIAL_NODES_MAX {
            return Err(bad(format!("{} nodes; the limit is {INITIAL_NODES_MAX}", nodes.len())));
        }
        Ok(InitialCluster { nodes })
    }

    /// A one-node cluster (the no-flags mode).
    pub fn single(addr: &str) -> Self {
        InitialCluster {
            nodes: BTreeMap::from([(1, addr.to_string())]),
        }
    }

    /// The ids, ascending.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Every node but `node`: the peers it talks to.
    pub fn peers_of(&self, node: u64) -> BTreeMap<u64, String> {
        self.nodes
            .iter()
            .filter(|(id, _)| **id != node)
            .map(|(id, a)| (*id, a.clone()))
            .collect()
    }
}

/// Bounds of `RaftTuning::snapshot_send_bytes_per_s`: below 64 KiB/s a
/// 1 MiB chunk takes 16 s; above 10 GiB/s the budget limits nothing.
pub const SNAPSHOT_SEND_BYTES_PER_S_MIN: u64 = 64 << 10;
/// See [`SNAPSHOT_SEND_BYTES_PER_S_MIN`].
pub const SNAPSHOT_SEND_BYTES_PER_S_MAX: u64 = 10 << 30;

/// Raft timing and batching. Ticks are the unit of raft-rs's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftTuning {
    /// Length of one tick.
    pub tick_ms: u64,
    /// Followers start an election after this many ticks without a leader
    /// (raft-rs randomises it into [election_ticks, 2 × election_ticks)).
    pub election_ticks: usize,
    /// A leader heartbeats every this many ticks.
    pub heartbeat_ticks: usize,
    /// A shard with nothing in flight stops ticking after this many quiet
    /// ticks (hibernation). 0 disables hibernation.
    pub hibernate_after_ticks: u32,
    /// A node that has not heard from a peer for this long treats it as down
    /// and wakes every hibernating shard, so elections can happen.
    pub peer_down_after_ms: u64,
    /// Node-level liveness heartbeats go to every peer this often.
    pub node_heartbeat_ms: u64,
    /// A proposal or read waits at most this long for a leader, a commit or
    /// an apply, then fails with a retryable error.
    pub request_timeout_ms: u64,
    /// Ops packed into one Raft entry, at most (≤ the engine's limit).
    pub ops_per_entry_max: usize,
    /// Payload bytes packed into one Raft entry, at most (one op may exceed it).
    pub entry_bytes_max: usize,
    /// Compact a shard's log once it holds more entries than this.
    pub log_entries_max: u64,
    /// ... or more bytes than this (estimated from appended entry sizes).
    pub log_bytes_max: u64,
    /// Entries kept behind the applied index at compaction, so a briefly
    /// slow follower catches up from the log and not by snapshot.
    pub log_retain_entries: u64,
    /// Bytes per snapshot chunk on the wire.
    pub snapshot_chunk_bytes: usize,
    /// Snapshot bytes this node sends per second, at most, over every
    /// snapshot it sends at once (`transport::SendRate`): catch-ups and
    /// replica moves must not starve foreground traffic of disk and network.
    pub snapshot_send_bytes_per_s: u64,
    /// Raft messages the driver takes from its inbox per loop, at most.
    pub inbox_batch_max: usize,
    /// Capacity of the driver's inbox (requests and raft messages).
    pub inbox_capacity: usize,
    /// Move leadership of a shard back to its preferred node when that node
    /// is caught up, checked every this many ticks (0 disables).
    pub rebalance_every_ticks: u64,
    /// The placement loop runs every this many ticks: the metadata leader
    /// decides replica moves and preferred leaders (`crate::moves`), and
    /// shard leaders take the moves' next steps. 0 disables it on this
    /// node (tests that place replicas by hand).
    pub placement_every_ticks: u64,
    /// A shard's leader proposes dedup garbage collection (ExpireDedup, up to
    /// the engine's per-op limit) every this many ticks while the shard is
    /// awake; a hibernating shard is collected when it next wakes. 0 disables.
    pub expire_dedup_every_ticks: u64,
    /// A replica of a shard whose record in the metadata group leaves this
    /// node out, and whose log ends before the record's `handed_index`,
    /// missed its own removal: it is deleted once that has held this long
    /// (stale-replica GC, `driver::gc`). 0 disables.
    pub stale_replica_after_ms: u64,
    /// A replica move whose target node has not been heard from for this
    /// long is cancelled (`moves::MOVE_TARGET_SILENT_MS_MAX`, the default;
    /// a shorter silence only holds the move). At least
    /// `peer_down_after_ms`.
    pub move_target_silent_ms_max: u64,
    /// NOT DURABLE: never fsync the Raft log. An acknowledged write then
    /// survives a process crash (it is in the OS page cache) but not a
    /// machine crash or power loss on a majority. For benchmarks against
    /// systems that do not fsync either; off unless asked for by name.
    pub unsafe_no_fsync: bool,
    /// Apply worker threads (`driver::applier`): each shard is applied by
    /// one of them, different shards in parallel. Default:
    /// [`default_apply_threads`] for this machine.
    pub apply_threads: usize,
    /// Raft driver threads (`driver::pool`): each runs its share of the
    /// node's replicas, with its own Raft log write and fsync per turn.
    /// The apply workers are shared out among them. Default:
    /// [`default_driver_threads`] for this machine.
    pub driver_threads: usize,
}

/// Most apply workers a node runs. RocksDB takes one memtable writer at a
/// time (the data CF's hash memtable needs it), so past a few workers more
/// threads only wait for that writer.
pub const APPLY_THREADS_MAX: usize = 16;

/// The apply pool's size for a machine with `cores` cores: a quarter of
/// them, 1 to 4. Apply was about a third of a node's CPU in the write-path
/// profiles (the gRPC calls and the Raft transport on the tokio runtime,
/// which has a worker per core, took the most), and past 4 workers the
/// single memtable writer bounds them (D64). A 2-vCPU machine gets 1.
pub fn apply_threads_for(cores: usize) -> usize {
    (cores / 4).clamp(1, 4)
}

/// [`apply_threads_for`] this machine's available parallelism.
pub fn default_apply_threads() -> usize {
    apply_threads_for(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

/// Most Raft drivers a node runs. Each writes and fsyncs the one Raft log
/// on its own (the log takes one writer at a time), so many drivers on a
/// slow disk queue on its fsyncs.
pub const DRIVER_THREADS_MAX: usize = 16;

/// The driver pool's size for a machine with `cores` cores: an eighth of
/// them, 1 to 4. A driver used about a sixth of a node's CPU in the
/// write-path profiles (D64's 2-vCPU host: drivers 18 % of all samples
/// over three nodes), so one driver keeps up until a node has several
/// times the cores of that host. Unmeasured above 2 cores (D65). A 2- to
/// 15-core machine gets 1.
pub fn driver_threads_for(cores: usize) -> usize {
    (cores / 8).clamp(1, 4)
}

/// [`driver_threads_for`] this machine's available parallelism.
pub fn default_driver_threads() -> usize {
    driver_threads_for(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            hibernate_after_ticks: 20,
            peer_down_after_ms: 1_000,
            node_heartbeat_ms: 200,
            request_timeout_ms: 5_000,
            ops_per_entry_max: 4_096,
            entry_bytes_max: 8 << 20,
            log_entries_max: 20_000,
            log_bytes_max: 64 << 20,
            log_retain_entries: 2_000,
            snapshot_chunk_bytes: 1 << 20,
            // TiKV's default for snapshot I/O; a 1 GiB replica moves in ~10 s.
            snapshot_send_bytes_per_s: 100 << 20,
            inbox_batch_max: 8_192,
            inbox_capacity: 65_536,
            rebalance_every_ticks: 50,
            placement_every_ticks: 10,
            expire_dedup_every_ticks: 600,
            stale_replica_after_ms: 10_000,
            move_target_silent_ms_max: crate::moves::MOVE_TARGET_SILENT_MS_MAX,
            unsafe_no_fsync: false,
            apply_threads: default_apply_threads(),
            driver_threads: default_driver_threads(),
        }
    }
}

impl RaftTuning {
    /// Rejects settings that would break liveness or exceed engine limits.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |s: String| Err(ClusterError::Config(s));
        if self.tick_ms == 0 || self.heartbeat_ticks == 0 {
            return bad("tick_ms and heartbeat_ticks must be > 0".into());
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return bad(format!(
                "election_ticks ({}) must exceed heartbeat_ticks ({})",
                self.election_ticks, self.heartbeat_ticks
            ));
        }
        if self.hibernate_after_ticks != 0 && (self.hibernate_after_ticks as usize) < self.heartbeat_ticks * 2 {
            return bad("hibernate_after_ticks must be 0 or at least 2 heartbeats".into());
        }
        if self.node_heartbeat_ms == 0 || self.peer_down_after_ms < self.node_heartbeat_ms * 2 {
            return bad("peer_down_after_ms must be at least 2 node heartbeats".into());
        }
        if self.move_target_silent_ms_max < self.peer_down_after_ms {
            return bad(format!(
                "move_target_silent_ms_max ({}) must be at least peer_down_after_ms ({})",
                self.move_target_silent_ms_max, self.peer_down_after_ms
            ));
        }
        if !(1..=4_096).contains(&self.ops_per_entry_max) {
            return bad(format!(
                "ops_per_entry_max {} is outside 1..=4096",
                self.ops_per_entry_max
            ));
        }
        if self.entry_bytes_max < (2 << 20) || self.entry_bytes_max > 64 << 20 {
            // At least one maximal op (1 MiB payload plus framing) must fit.
            return bad(format!(
                "entry_bytes_max {} is outside 2 MiB..=64 MiB",
                self.entry_bytes_max
            ));
        }
        if self.log_retain_entries >= self.log_entries_max {
            return bad("log_retain_entries must be below log_entries_max".into());
        }
        if self.snapshot_chunk_bytes == 0 || self.snapshot_chunk_bytes > 16 << 20 {
            return bad("snapshot_chunk_bytes must be in 1..=16 MiB".into());
        }
        if !(SNAPSHOT_SEND_BYTES_PER_S_MIN..=SNAPSHOT_SEND_BYTES_PER_S_MAX).contains(&self.snapshot_send_bytes_per_s) {
            return bad(format!(
                "snapshot_send_bytes_per_s {} is outside {SNAPSHOT_SEND_BYTES_PER_S_MIN}..={SNAPSHOT_SEND_BYTES_PER_S_MAX}",
                self.snapshot_send_bytes_per_s
            ));
        }
        if self.inbox_capacity == 0 || self.inbox_batch_max == 0 {
            return bad("inbox sizes must be > 0".into());
        }
        if !(1..=APPLY_THREADS_MAX).contains(&self.apply_threads) {
            return bad(format!(
                "apply_threads {} is outside 1..={APPLY_THREADS_MAX}",
                self.apply_threads
            ));
        }
        if !(1..=DRIVER_THREADS_MAX).contains(&self.driver_threads) {
            return bad(format!(
                "driver_threads {} is outside 1..={DRIVER_THREADS_MAX}",
                self.driver_threads
            ));
        }
        Ok(())
    }
}

/// What every node derives the bootstrap shard map from. A node that joins
/// later is handed these (`Admin.JoinNode`) and keeps them in its data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapParams {
    /// The nodes the cluster was first started with.
    pub initial_cluster: InitialCluster,
    /// Data shards created at bootstrap.
    pub shard_count: u64,
    /// Replicas per shard.
    pub replication_factor: usize,
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id: a key of `initial_cluster`, or (`joined`) the id the
    /// metadata group gave it.
    pub node_id: u64,
    /// The node joined a running cluster (`--join`): it is not in
    /// `initial_cluster`, creates no replica at start, and `cluster_id` is
    /// the one it was handed.
    pub joined: bool,
    /// Data directory (the engine's RocksDB, the identity file, snapshots).
    pub data_dir: PathBuf,
    /// The static initial cluster.
    pub initial_cluster: InitialCluster,
    /// Identifies the cluster on the wire; derived from the initial cluster
    /// unless set.
    pub cluster_id: Option<u64>,
    /// Data shards created at bootstrap (fixed afterwards). Default:
    /// [`default_shard_count`] of the initial cluster's size.
    pub shard_count: u64,
    /// Replicas per shard: 1, 3 or 5 (capped at the node count).
    pub replication_factor: usize,
    /// Raft tuning.
    pub raft: RaftTuning,
    /// Storage engine options.
    pub engine: pigeonhole_engine::EngineOptions,
    /// The backup this node's data dir was restored from (its manifest's
    /// SHA-256, `crate::restore::RESTORED_FROM_FILE`): part of the cluster
    /// id, so a node started on an empty data dir beside restored ones
    /// (a forgotten restore) is refused on the wire instead of serving
    /// empty shards to the restored cluster.
    pub restored_from: Option<String>,
}

/// Shards per cluster, at most (each costs a Raft group on 3 nodes).
pub const SHARD_COUNT_MAX: u64 = 65_536;

/// Shards a cluster is bootstrapped with when no count is given, per node of
/// the initial cluster (D59). Why few: every Raft entry, message, fsync'd
/// log write and applied-index row is paid per shard that has work in a
/// driver turn, so the appends of one turn spread over fewer shards share
/// those costs (8 shards against 64 on 3 nodes: -15 % server CPU per append,
/// +16 % appends/s, docs/benchmarks.md). Why a multiple of the node count:
/// leaders start evenly spread (4/4/4 on 3 nodes), and a lost or drained
/// node's leaderships split evenly over the other two (6/6). Going lower
/// bought nothing measured (6 shards on 3 nodes were no cheaper than 12).
/// Shards still split by size (D39), so a cluster gains shards as it grows
/// in data.
pub const DEFAULT_SHARDS_PER_INITIAL_NODE: u64 = 4;
/// The default shard count's floor: a one- or two-node cluster still gets
/// shards to split off and to move when nodes are added.
pub const DEFAULT_SHARD_COUNT_MIN: u64 = 8;
/// The default shard count's ceiling (an initial cluster of 64 nodes); more
/// is a choice for `--shards`.
pub const DEFAULT_SHARD_COUNT_MAX: u64 = 256;

/// The shard count a cluster of `initial_nodes` is bootstrapped with when
/// none is given: [`DEFAULT_SHARDS_PER_INITIAL_NODE`] per node, within
/// [`DEFAULT_SHARD_COUNT_MIN`]..=[`DEFAULT_SHARD_COUNT_MAX`]. Every node of
/// an initial cluster is given the same member list, so all of them derive
/// the same count (and a node that derived another would have another
/// cluster id and be refused on the wire).
pub fn default_shard_count(initial_nodes: usize) -> u64 {
    u64::try_from(initial_nodes)
        .unwrap_or(u64::MAX)
        .saturating_mul(DEFAULT_SHARDS_PER_INITIAL_NODE)
        .clamp(DEFAULT_SHARD_COUNT_MIN, DEFAULT_SHARD_COUNT_MAX)
}

impl NodeConfig {
    /// A config with defaults for `node_id` in `initial_cluster`.
    pub fn new(node_id: u64, data_dir: impl Into<PathBuf>, initial_cluster: InitialCluster) -> Self {
        let shard_count = default_shard_count(initial_cluster.nodes.len());
        NodeConfig {
            node_id,
            joined: false,
            data_dir: data_dir.into(),
            initial_cluster,
            cluster_id: None,
            shard_count,
            replication_factor: 3,
            raft: RaftTuning::default(),
            engine: pigeonhole_engine::EngineOptions::default(),
            restored_from: None,
        }
    }

    /// The no-flags mode: a one-node cluster (replication factor 1) whose
    /// raft transport would listen on `raft_addr`.
    pub fn single_node(data_dir: impl Into<PathBuf>, raft_addr: &str) -> Self {
        let mut c = NodeConfig::new(1, data_dir, InitialCluster::single(raft_addr));
        c.replication_factor = 1;
        c
    }

    /// Checks the whole config.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let initial = self.initial_cluster.nodes.contains_key(&self.node_id);
        if self.joined && (initial || self.node_id == 0 || self.cluster_id.is_none()) {
            return Err(ClusterError::Config(format!(
                "a joined node needs an id outside the initial cluster {:?} and the cluster id it was \
                 handed (node id {}, cluster id {:?})",
                self.initial_cluster.ids(),
                self.node_id,
                self.cluster_id
            )));
        }
        if !self.joined && !initial {
            return Err(ClusterError::Config(format!(
                "node id {} is not in the initial cluster {:?}",
                self.node_id,
                self.initial_cluster.ids()
            )));
        }
        if !(1..=SHARD_COUNT_MAX).contains(&self.shard_count) {
            return Err(ClusterError::Config(format!(
                "shard count {} is outside 1..={SHARD_COUNT_MAX}",
                self.shard_count
            )));
        }
        if ![1, 3, 5].contains(&self.replication_factor) {
            return Err(ClusterError::Config(format!(
                "replication factor {} is not 1, 3 or 5",
                self.replication_factor
            )));
        }
        if self.raft.ops_per_entry_max > self.engine.limits.ops_per_command_max {
            // The engine rejects a whole entry with more ops than its limit,
            // which would fail every request packed into it.
            return Err(ClusterError::Config(format!(
                "ops_per_entry_max {} exceeds the engine's ops_per_command_max {}",
                self.raft.ops_per_entry_max, self.engine.limits.ops_per_command_max
            )));
        }
        self.raft.validate()
    }

    /// The cluster id: explicit, or a hash of the initial cluster, so two
    /// clusters started with different member lists never talk to each other.
    pub fn effective_cluster_id(&self) -> u64 {
        self.cluster_id.unwrap_or_else(|| {
            let mut s = String::new();
            for (id, addr) in &self.initial_cluster.nodes {
                s.push_str(&format!("{id}={addr};"));
            }
            s.push_str(&format!("shards={}", self.shard_count));
            if let Some(backup) = &self.restored_from {
                s.push_str(&format!(";restored={backup}"));
            }
            crate::hash::user_hash(s.as_bytes())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_initial_cluster() {
        let c = InitialCluster::parse("1=127.0.0.1:7071, 2=h2:7071,3=[::1]:9").unwrap();
        assert_eq!(c.ids(), vec![1, 2, 3]);
        assert_eq!(c.nodes[&3], "[::1]:9");
        for bad in ["", "1", "0=a:1", "1=a:1,1=b:2", "x=a:1", "1=a", "1=:80", "1=a:99999"] {
            let e = InitialCluster::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--initial-cluster"), "{bad}: {e}");
        }
    }

    #[test]
    fn default_shard_count_is_four_per_initial_node_within_bounds() {
        let got: Vec<u64> = [0, 1, 2, 3, 5, 16, 64, 65, usize::MAX]
            .iter()
            .map(|n| default_shard_count(*n))
            .collect();
        assert_eq!(got, vec![8, 8, 8, 12, 20, 64, 256, 256, 256]);
        let three = InitialCluster::parse("1=a:1,2=b:1,3=c:1").unwrap();
        for id in three.ids() {
            let c = NodeConfig::new(id, "/tmp/x", three.clone());
            assert_eq!(c.shard_count, 12);
            c.validate().unwrap();
        }
    }

    #[test]
    fn config_refuses_entries_the_engine_would_reject() {
        let mut c = NodeConfig::single_node("/tmp/x", "127.0.0.1:1");
        assert!(c.validate().is_ok());
        c.engine.limits.ops_per_command_max = 100;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("ops_per_entry_max 4096") && e.contains("100"), "{e}");
        let mut c = NodeConfig::single_node("/tmp/x", "127.0.0.1:1");
        c.raft.entry_bytes_max = 1 << 20;
        assert!(c.validate().unwrap_err().to_string().contains("entry_bytes_max"));
    }

    #[test]
    fn tuning_validation_catches_liveness_breaks() {
        assert!(RaftTuning::default().validate().is_ok());
        let t = RaftTuning {
            election_ticks: 2,
            ..RaftTuning::default()
        };
        assert!(t.validate().is_err());
        let t = RaftTuning {
            hibernate_after_ticks: 1,
            ..RaftTuning::default()
        };
        assert!(t.validate().is_err());
        let t = RaftTuning {
            ops_per_entry_max: 5_000,
            ..RaftTuning::default()
        };
        assert!(t.validate().is_err());
        for apply_threads in [0, APPLY_THREADS_MAX + 1] {
            let t = RaftTuning {
                apply_threads,
                ..RaftTuning::default()
            };
            let e = t.validate().unwrap_err().to_string();
            assert!(e.contains("apply_threads") && e.contains("1..=16"), "{e}");
        }
        for driver_threads in [0, DRIVER_THREADS_MAX + 1] {
            let t = RaftTuning {
                driver_threads,
                ..RaftTuning::default()
            };
            let e = t.validate().unwrap_err().to_string();
            assert!(e.contains("driver_threads") && e.contains("1..=16"), "{e}");
        }
    }

    #[test]
    fn the_driver_pool_is_an_eighth_of_the_cores_from_one_to_four() {
        let got: Vec<usize> = [0, 1, 2, 8, 15, 16, 24, 32, 128]
            .iter()
            .map(|c| driver_threads_for(*c))
            .collect();
        assert_eq!(got, vec![1, 1, 1, 1, 1, 2, 3, 4, 4]);
        assert!((1..=DRIVER_THREADS_MAX).contains(&default_driver_threads()));
    }

    #[test]
    fn the_apply_pool_is_a_quarter_of_the_cores_from_one_to_four() {
        let got: Vec<usize> = [0, 1, 2, 4, 7, 8, 16, 64]
            .iter()
            .map(|c| apply_threads_for(*c))
            .collect();
        assert_eq!(got, vec![1, 1, 1, 1, 1, 2, 4, 4]);
        assert!((1..=APPLY_THREADS_MAX).contains(&default_apply_threads()));
    }
}
