//! The node's Raft driver: ONE thread that runs every shard replica on the
//! node (there is no thread per shard and no fsync per request).
//!
//! Each turn of the loop:
//! 1. takes what arrived (client proposals and reads, raft messages,
//!    snapshots, admin calls) from one bounded inbox;
//! 2. ticks the shards that are awake, if a tick is due;
//! 3. packs each shard's queued proposals into one Raft entry (many client
//!    requests → one entry) and issues one ReadIndex per shard for the reads;
//! 4. collects the Ready of every shard that has one. Leaders' messages go
//!    out right away, before the fsync, so replication overlaps the local
//!    write (raft-rs allows a leader to send before it persists);
//! 5. persists the entries, hard states and snapshots of ALL those shards in
//!    ONE engine WriteBatch with ONE fsync (group commit);
//! 6. sends the messages that had to wait for that fsync (votes, append
//!    responses), batched per destination node;
//! 7. hands committed entries to the apply worker, which applies them on its
//!    own thread and answers the waiting proposals with their per-op
//!    results; its reports move each shard's applied index, which releases
//!    the reads waiting for it.
//!
//! Proposals carry a context of (origin node, proposal id). raft-rs forwards
//! a follower's proposal to the leader by itself; when the entry is applied,
//! every replica computes the same deterministic result, so the origin node
//! answers its caller from its OWN apply. Nothing crosses the network but the
//! Raft entry.
//!
//! Hibernation: a shard with nothing in flight for `hibernate_after_ticks`
//! stops ticking (so a leader stops heartbeating, and idle shards cost
//! nothing). Any message or request wakes it. Failure detection for sleeping
//! shards comes from one node-level heartbeat per peer: when a peer goes down
//! or comes back, every shard wakes, so elections still happen.
//!
//! Modules, by role (as TiKV's raftstore splits `peer`, `fsm`, `msg`):
//! - `msg`: what the node's handle and the transport send the driver, and
//!   what it answers;
//! - `replica`: one shard replica's state and the pure rules over it
//!   (hibernation, read release, expiry, leader rebalancing);
//! - `inbox`: handling each inbox item (step 1);
//! - `tick`: the Raft tick, the node heartbeat, shard-record writes (step 2);
//! - `ready`: proposing, collecting Readies, group commit, sending
//!   (steps 3 to 6);
//! - `apply`: handing committed entries to the apply worker and taking its
//!   reports (step 7);
//! - `applier`: the apply worker, a thread of its own that writes committed
//!   entries into the state machine and answers the callers;
//! - `flush`: making applied state durable so the log can be compacted;
//! - `snapshot`: crash repair at start, replica creation, ingest, sending;
//! - `status`: what NodeStatus reports.
//!
//! This file holds the driver's state, its construction and the loop.

mod applier;
mod apply;
mod flush;
mod inbox;
mod msg;
mod ready;
mod replica;
mod snapshot;
mod status;
mod tick;

pub(crate) use msg::Inbound;
pub use msg::{ProposeResult, Role, ShardStatus};

use crate::config::RaftTuning;
use crate::error::ClusterError;
use crate::placement::{ShardMap, META_SHARD};
use crate::transport::{ShardMsg, SnapshotSpool, Transport};
use crate::watch::Watchers;
use crossbeam_channel::{Receiver, Sender};
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::raft::{self, RawNode};
use pigeonhole_engine::Engine;
use prost::Message as _;
use replica::{fail_all, is_member, Pending, PendingConf, Replica};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn raft_err(e: raft::Error) -> ClusterError {
    ClusterError::Raft(e.to_string())
}

fn op_bytes(op: &cmd::Op) -> usize {
    op.encoded_len()
}

/// The driver's state; lives on its own thread.
pub(crate) struct Driver {
    node_id: u64,
    engine: Engine,
    tuning: RaftTuning,
    transport: Arc<dyn Transport>,
    rx: Receiver<Inbound>,
    tx: Sender<Inbound>,
    map: Arc<ShardMap>,
    spool: Arc<SnapshotSpool>,
    replicas: BTreeMap<u64, Replica>,
    pending: HashMap<u64, Pending>,
    pending_conf: HashMap<u64, PendingConf>,
    next_id: u64,
    dirty: BTreeSet<u64>,
    /// Shards with queued proposals or reads: the loop looks only at these,
    /// never at every replica, so idle shards cost nothing per turn.
    waiting: BTreeSet<u64>,
    /// Shards that applied entries this turn (compaction candidates).
    applied_now: BTreeSet<u64>,
    /// The apply worker (`applier`).
    applier: applier::Applier,
    /// The state-machine flush running (`flush`), if any; at most one.
    flush_job: Option<flush::FlushJob>,
    /// Data shards this node leads whose record in the metadata group must
    /// be (re)written: it won an election or applied a membership change.
    map_dirty: BTreeSet<u64>,
    /// Record writes in flight: (shard, answer).
    map_writes: Vec<(u64, oneshot::Receiver<ProposeResult>)>,
    outbox: BTreeMap<u64, Vec<ShardMsg>>,
    peers: BTreeMap<u64, PeerLiveness>,
    ticks: u64,
    logger: slog::Logger,
    /// Waiting readers (long-polls, Subscribe streams): told which
    /// mailboxes apply changed, and which shards lost their leader.
    watchers: Arc<Watchers>,
}

/// What ended the driver's wait.
enum Woke {
    Inbound(Inbound),
    Report(applier::ApplyReport),
    Timeout,
    Closed,
    ApplierGone,
}

struct PeerLiveness {
    last_seen: Instant,
    down: bool,
}

/// What a driver is built from (the node assembles it).
pub(crate) struct DriverParts {
    pub node_id: u64,
    pub engine: Engine,
    pub tuning: RaftTuning,
    pub transport: Arc<dyn Transport>,
    pub inbox: (Sender<Inbound>, Receiver<Inbound>),
    pub map: Arc<ShardMap>,
    pub spool: Arc<SnapshotSpool>,
    pub watchers: Arc<Watchers>,
}

impl Driver {
    /// Loads every replica on this node (repairing what a crash left).
    pub(crate) fn new(parts: DriverParts) -> Result<Self, ClusterError> {
        let DriverParts {
            node_id,
            engine,
            tuning,
            transport,
            inbox: (tx, rx),
            map,
            spool,
            watchers,
        } = parts;
        let now = Instant::now();
        let peers = map
            .nodes
            .keys()
            .filter(|id| **id != node_id)
            .map(|id| {
                (
                    *id,
                    PeerLiveness {
                        last_seen: now,
                        down: false,
                    },
                )
            })
            .collect();
        let applier = applier::Applier::spawn(node_id, engine.clone(), Arc::clone(&watchers))?;
        let mut d = Driver {
            node_id,
            engine,
            tuning,
            transport,
            rx,
            tx,
            map,
            spool,
            replicas: BTreeMap::new(),
            pending: HashMap::new(),
            pending_conf: HashMap::new(),
            // Ids must not repeat across restarts: an old entry in the log
            // with our context must never answer a new caller.
            next_id: rand::random::<u64>() >> 1,
            dirty: BTreeSet::new(),
            waiting: BTreeSet::new(),
            applied_now: BTreeSet::new(),
            applier,
            flush_job: None,
            map_dirty: BTreeSet::new(),
            map_writes: Vec::new(),
            outbox: BTreeMap::new(),
            peers,
            ticks: 0,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            watchers,
        };
        for shard in d.engine.shard_ids()? {
            d.recover_shard(shard)?;
            let Some(meta) = d.engine.shard_meta(shard)? else {
                continue;
            };
            if !is_member(&meta.conf_state, node_id) {
                // Removed from this shard; its data stays until a later
                // issue adds replica garbage collection.
                continue;
            }
            d.add_replica(shard, meta.applied_index)?;
        }
        // Spread leadership from the first election on: each shard's
        // preferred node campaigns at once (pre-vote keeps this from
        // disturbing a healthy leader after a restart).
        let ids: Vec<u64> = d.replicas.keys().copied().collect();
        for shard in ids {
            if let Some(r) = d.replicas.get_mut(&shard) {
                let voter = r.raw.raft.prs().conf().voters().contains(node_id);
                if r.preferred_leader == node_id && voter {
                    r.raw.campaign().map_err(raft_err)?;
                    d.dirty.insert(shard);
                }
            }
        }
        Ok(d)
    }

    fn raft_config(&self, applied: u64) -> raft::Config {
        raft::Config {
            id: self.node_id,
            election_tick: self.tuning.election_ticks,
            heartbeat_tick: self.tuning.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            // Bounds memory held by entries proposed but not yet committed:
            // past it, proposals fail fast instead of piling up.
            max_uncommitted_size: 256 << 20,
            // A commit rides on the next append or heartbeat instead of an
            // extra MsgAppend to every follower per commit (TiKV does the
            // same). Followers learn commits up to a heartbeat later; a
            // leader does not hibernate until every follower has reported
            // the commit index (`is_quiet`), so none is left behind asleep.
            skip_bcast_commit: true,
            // Appends queued for a follower while earlier ones are in flight
            // merge into one message.
            batch_append: true,
            ..Default::default()
        }
    }

    fn add_replica(&mut self, shard: u64, applied: u64) -> Result<(), ClusterError> {
        let store = self.engine.raft_log(shard)?;
        let cfg = self.raft_config(applied);
        cfg.validate().map_err(raft_err)?;
        let raw = RawNode::new(&cfg, store, &self.logger).map_err(raft_err)?;
        let preferred_leader = if shard == META_SHARD {
            self.map.nodes.keys().next().copied().unwrap_or(0)
        } else {
            self.map.shard(shard).map_or(0, |s| s.preferred_leader)
        };
        self.replicas.insert(shard, Replica::new(raw, preferred_leader));
        self.dirty.insert(shard);
        Ok(())
    }

    /// Runs until `Stop` or a fatal error.
    pub(crate) fn run_loop(&mut self) -> Result<(), ClusterError> {
        let tick = Duration::from_millis(self.tuning.tick_ms);
        let hb = Duration::from_millis(self.tuning.node_heartbeat_ms);
        let mut next_tick = Instant::now() + tick;
        let mut next_hb = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_hb {
                self.node_heartbeat();
                next_hb = now + hb;
            }
            if now >= next_tick {
                self.tick();
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
            }
            // Wait for work unless some shard already has some.
            let busy = self
                .dirty
                .iter()
                .any(|s| self.replicas.get(s).is_some_and(|r| r.raw.has_ready()))
                || self
                    .waiting
                    .iter()
                    .any(|s| self.replicas.get(s).is_some_and(|r| r.raw.raft.leader_id != 0));
            let first = if busy {
                self.rx.try_recv().ok()
            } else {
                let wait = next_tick.min(next_hb).saturating_duration_since(Instant::now());
                // The bodies only name what woke us: `self` is borrowed by
                // the select until it returns.
                let woke = crossbeam_channel::select! {
                    recv(self.rx) -> m => m.map_or(Woke::Closed, Woke::Inbound),
                    recv(self.applier.reports) -> r => r.map_or(Woke::ApplierGone, Woke::Report),
                    default(wait) => Woke::Timeout,
                };
                match woke {
                    Woke::Inbound(m) => Some(m),
                    Woke::Report(r) => {
                        self.on_report(r)?;
                        None
                    }
                    Woke::Timeout => None,
                    Woke::Closed => return Ok(()),
                    Woke::ApplierGone => return Err(ClusterError::Raft("the apply worker has stopped".into())),
                }
            };
            if let Some(m) = first {
                if !self.handle(m)? {
                    return Ok(());
                }
                for _ in 1..self.tuning.inbox_batch_max {
                    let Ok(m) = self.rx.try_recv() else { break };
                    if !self.handle(m)? {
                        return Ok(());
                    }
                }
            }
            // Applies done since the last turn: they move applied indexes,
            // release reads and may let logs compact.
            self.take_reports()?;
            if !self.map_dirty.is_empty() {
                self.write_shard_records();
            }
            self.propose_queued();
            self.process_ready()?;
        }
    }

    fn wake(&mut self, shard: u64, reset_quiet: bool) {
        if let Some(r) = self.replicas.get_mut(&shard) {
            r.asleep = false;
            if reset_quiet {
                r.quiet_ticks = 0;
            }
            self.dirty.insert(shard);
        }
    }

    fn wake_all(&mut self) {
        let ids: Vec<u64> = self.replicas.keys().copied().collect();
        for s in ids {
            self.wake(s, true);
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Fails every waiter on stop.
    pub(crate) fn shutdown(&mut self) {
        // What the worker was handed is applied and answered first.
        self.applier.stop();
        if let Some(job) = self.flush_job.take() {
            job.join();
        }
        // Streams of this node cannot be fed any more: they end, and their
        // clients resume elsewhere.
        for shard in self.replicas.keys() {
            self.watchers.leader_lost(*shard);
        }
        for (shard, r) in std::mem::take(&mut self.replicas) {
            fail_all(shard, r, |_| ClusterError::Stopped);
        }
        for (_, p) in self.pending.drain() {
            for (reply, _) in p.parts {
                let _ = reply.send(Err(ClusterError::Stopped));
            }
        }
        for (_, p) in self.pending_conf.drain() {
            let _ = p.reply.send(Err(ClusterError::Stopped));
        }
    }
}

impl Drop for Driver {
    /// A driver dropped without `shutdown` (a failed start, a test) still
    /// waits for its flush thread.
    fn drop(&mut self) {
        if let Some(job) = self.flush_job.take() {
            job.join();
        }
    }
}

#[cfg(test)]
mod tests {
    //! A one-node driver stepped by hand (no loop thread), for the parts
    //! that need a whole driver: the inbox, the tick, proposals through
    //! apply, status. Multi-node behaviour is in `tests/cluster.rs`.
    use super::*;
    use crate::config::InitialCluster;
    use crate::transport::{Envelope, SnapshotJob};
    use pigeonhole_engine::conf_state_with_voters;
    use pigeonhole_engine::raft::eraftpb::ConfState;
    use pigeonhole_engine::raft::Storage as _;
    use pigeonhole_engine::{EngineOptions, OpOutput};

    /// Drops everything: a one-node cluster sends nothing that matters.
    struct NoPeers;
    impl Transport for NoPeers {
        fn send(&self, _env: Envelope) {}
        fn send_snapshot(&self, job: SnapshotJob) {
            (job.report)(false);
        }
    }

    const SHARDS: u64 = 2;

    fn driver(tuning: RaftTuning) -> (tempfile::TempDir, Driver) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path().join("db"), EngineOptions::default()).unwrap();
        let cluster = InitialCluster::parse("1=127.0.0.1:1").unwrap();
        let map = Arc::new(ShardMap::bootstrap(&cluster, SHARDS, 1));
        engine
            .bootstrap_shard(
                META_SHARD,
                ConfState {
                    voters: vec![1],
                    ..Default::default()
                },
                5,
                5,
            )
            .unwrap();
        for s in map.shards_on(1) {
            engine.bootstrap_shard(s, conf_state_with_voters(&[1]), 5, 5).unwrap();
        }
        let d = Driver::new(DriverParts {
            node_id: 1,
            engine,
            tuning,
            transport: Arc::new(NoPeers),
            inbox: crossbeam_channel::bounded(64),
            map,
            spool: Arc::new(SnapshotSpool::open(dir.path().join("snap")).unwrap()),
            watchers: Arc::new(Watchers::default()),
        })
        .unwrap();
        (dir, d)
    }

    /// One turn of the loop without waiting.
    fn turn(d: &mut Driver) {
        while let Ok(m) = d.rx.try_recv() {
            assert!(d.handle(m).unwrap());
        }
        d.propose_queued();
        d.process_ready().unwrap();
        while d.applier.lag_bytes > 0 || d.replicas.values().any(|r| r.handed > r.raw.raft.raft_log.applied) {
            d.wait_report().unwrap();
        }
    }

    fn settle(d: &mut Driver) {
        for _ in 0..20 {
            turn(d);
        }
    }

    fn append_op(key: &str) -> cmd::Op {
        cmd::Op {
            op: Some(cmd::op::Op::Append(cmd::AppendOp {
                namespace: "ns".into(),
                user_id: b"u".to_vec(),
                idempotency_key: key.as_bytes().to_vec(),
                payload: b"p".to_vec().into(),
                expected_last_seq: None,
            })),
        }
    }

    fn propose(d: &mut Driver, shard: u64, ops: Vec<cmd::Op>) -> oneshot::Receiver<ProposeResult> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(d
            .handle(Inbound::Propose {
                shard,
                ops,
                reply,
                deadline
            })
            .unwrap());
        rx
    }

    #[test]
    fn proposals_to_one_shard_share_an_entry_and_each_caller_gets_its_result() {
        let (_dir, mut d) = driver(RaftTuning::default());
        settle(&mut d);
        let status = d.status();
        assert!(status.iter().all(|s| s.role == Role::Leader), "{status:?}");
        let last_before = status.iter().find(|s| s.shard == 1).unwrap().last_index;
        let mut a = propose(&mut d, 1, vec![append_op("a")]);
        let mut b = propose(&mut d, 1, vec![append_op("b"), append_op("a")]);
        settle(&mut d);
        let seqs = |r: ProposeResult| -> Vec<(u64, bool)> {
            r.unwrap()
                .into_iter()
                .map(|o| match o.unwrap() {
                    OpOutput::Appended { seq, duplicate, .. } => (seq, duplicate),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(seqs(a.try_recv().unwrap()), vec![(1, false)]);
        assert_eq!(seqs(b.try_recv().unwrap()), vec![(2, false), (1, true)]);
        let s1 = d.status().into_iter().find(|s| s.shard == 1).unwrap();
        assert_eq!(s1.last_index, last_before + 1, "two callers, one entry");
        assert_eq!(s1.applied, s1.last_index);
    }

    /// A read waits for its ReadIndex and for apply to reach it; when
    /// nothing is left to apply, no report of the apply worker will come,
    /// and the read must still be released.
    #[test]
    fn a_read_is_released_when_its_index_is_applied_with_or_without_new_applies() {
        let (_dir, mut d) = driver(RaftTuning::default());
        settle(&mut d);
        let read = |d: &mut Driver| {
            let (reply, rx) = oneshot::channel();
            let deadline = Instant::now() + Duration::from_secs(5);
            assert!(d
                .handle(Inbound::Read {
                    shard: 1,
                    reply,
                    deadline
                })
                .unwrap());
            rx
        };
        let mut idle = read(&mut d);
        settle(&mut d);
        assert!(matches!(idle.try_recv(), Ok(Ok(()))), "nothing to apply");
        let mut w = propose(&mut d, 1, vec![append_op("a")]);
        let mut after_write = read(&mut d);
        settle(&mut d);
        assert!(w.try_recv().unwrap().is_ok());
        assert!(matches!(after_write.try_recv(), Ok(Ok(()))), "released after the apply");
    }

    #[test]
    fn the_inbox_refuses_what_this_node_cannot_do() {
        let (_dir, mut d) = driver(RaftTuning::default());
        settle(&mut d);
        let mut r = propose(&mut d, 99, vec![append_op("a")]);
        assert!(matches!(
            r.try_recv().unwrap(),
            Err(ClusterError::NoSuchShard { shard: 99, .. })
        ));
        let (reply, mut rx) = oneshot::channel();
        d.handle(Inbound::TransferLeader { shard: 1, to: 7, reply }).unwrap();
        assert!(matches!(
            rx.try_recv().unwrap(),
            Err(ClusterError::InvalidArgument { field: "to_node", .. })
        ));
        let mut empty = propose(&mut d, 1, Vec::new());
        assert!(empty.try_recv().unwrap().unwrap().is_empty(), "no ops, no entry");
    }

    /// The state machine is written without a WAL (D26): the log must
    /// never be compacted past what a flush made durable, and compaction
    /// must resume once a flush did.
    #[test]
    fn the_log_is_never_compacted_past_the_durable_applied_index() {
        let tuning = RaftTuning {
            log_entries_max: 16,
            log_retain_entries: 0,
            ..RaftTuning::default()
        };
        let (_dir, mut d) = driver(tuning);
        settle(&mut d);
        let check = |d: &Driver| {
            for (shard, r) in &d.replicas {
                let first = r.raw.store().first_index().unwrap();
                assert!(
                    first - 1 <= r.durable_applied,
                    "shard {shard}: log compacted to {} past the durable applied index {}",
                    first - 1,
                    r.durable_applied
                );
            }
        };
        let mut flushes = 0;
        for i in 0..200 {
            drop(propose(&mut d, 1, vec![append_op(&format!("k{i}"))]));
            turn(&mut d);
            flushes += usize::from(d.flush_job.is_some());
            check(&d);
        }
        assert!(flushes > 0, "a long log asked for a flush");
        // Once flushes land, compaction catches up.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            turn(&mut d);
            check(&d);
            let first = d.replicas[&1].raw.store().first_index().unwrap();
            if first > 150 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the log never compacted (first index {first})"
            );
            std::thread::sleep(Duration::from_millis(10));
            drop(propose(&mut d, 1, vec![append_op("more")]));
        }
    }

    #[test]
    fn a_quiet_shard_hibernates_after_its_ticks_and_a_request_wakes_it() {
        let tuning = RaftTuning {
            hibernate_after_ticks: 3,
            ..RaftTuning::default()
        };
        let (_dir, mut d) = driver(tuning);
        settle(&mut d);
        for _ in 0..5 {
            d.tick();
            settle(&mut d);
        }
        assert!(d.status().iter().all(|s| s.asleep), "{:?}", d.status());
        let mut r = propose(&mut d, 1, vec![append_op("a")]);
        assert!(!d.status().into_iter().find(|s| s.shard == 1).unwrap().asleep);
        settle(&mut d);
        assert!(r.try_recv().unwrap().is_ok());
    }
}
