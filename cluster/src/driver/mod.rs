//! The node's Raft drivers: a fixed pool of threads (`driver_threads`, one
//! on a small machine), each running its share of the node's shard
//! replicas (there is no thread per shard and no fsync per request). Which
//! driver runs which shard, and the routing of what arrives, is `pool`
//! (D65); everything below is one driver.
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
//!    ONE `RaftBatch`: one Raft log record and ONE fsync (group commit);
//! 6. sends the messages that had to wait for that fsync (votes, append
//!    responses), batched per destination node;
//! 7. hands committed entries to the apply workers, which apply them on
//!    threads of their own (each shard on one of them) and answer the
//!    waiting proposals with their per-op results; their reports move each
//!    shard's applied index, which releases the reads waiting for it.
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
//! - `applier`: the apply workers, a pool of threads that write committed
//!   entries into the state machine and answer the callers;
//! - `flush`: making applied state durable so the log can be compacted;
//! - `snapshot`: crash repair at start, replica creation, ingest (on a
//!   thread of its own, so the node's other shards do not wait), sending;
//! - `gc`: deleting replicas of shards that removed this node while it was
//!   away (stale-replica GC);
//! - `split`: creating a split's new shard here, and the node's shard map
//!   (published for routing);
//! - `status`: what NodeStatus reports;
//! - `place`: the placement loop (decisions on the metadata leader, move
//!   steps on shard leaders; the logic is `crate::moves`);
//! - `pool`: the node's drivers, which one holds which shard, routing.
//!
//! This file holds the driver's state, its construction and the loop.
//!
//! Tests: the modules with pure parts (`replica`, `ready`, `applier`,
//! `catchup`, `gc`, `snapshot`, `pool`) test them in place; `tests/` steps a
//! one-node driver by hand and holds the tests of the loop as a whole, and
//! one file per module for what needs a whole driver (`tests/inbox.rs`,
//! `tests/tick.rs`, `tests/flush.rs`, `tests/split.rs`, `tests/status.rs`,
//! `tests/place.rs`, and `tests/pool.rs` for several drivers of one node).

mod applier;
mod apply;
mod catchup;
mod flush;
mod gc;
mod inbox;
mod msg;
mod place;
pub(crate) mod pool;
mod ready;
mod replica;
mod snapshot;
mod split;
mod status;
mod tick;

pub(crate) use msg::Inbound;
pub use msg::{ProposeResult, Role, ShardStatus};
pub use place::PlacementView;
pub(crate) use split::clip_end;
pub use status::DriverCounters;

use crate::config::RaftTuning;
use crate::error::ClusterError;
use crate::placement::{ShardMap, META_SHARD};
use crate::transport::{SendRate, ShardMsg, SnapshotSpool, Transport};
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

/// A driver turn (everything but the wait for work) that takes this long
/// is logged as slow, with where the time went: every shard of the node
/// waits for it.
const TURN_SLOW: Duration = Duration::from_millis(200);

/// The parts of a driver turn, as `Turn` times them.
#[derive(Clone, Copy)]
enum Phase {
    /// Heartbeats, ticks and stale replica GC.
    Tick,
    /// Handling the inbox's messages.
    Inbox,
    /// Apply reports and the shard map's writes.
    Reports,
    /// Proposing queued requests.
    Propose,
    /// Ready handling: the Raft log write, sends, handing entries to apply.
    Ready,
}

/// Times one driver turn by phase, for the slow-turn warning.
struct Turn {
    started: Instant,
    last: Instant,
    ms: [u64; 5],
}

impl Turn {
    fn new(now: Instant) -> Self {
        Turn {
            started: now,
            last: now,
            ms: [0; 5],
        }
    }

    /// The wait for work is not the turn's: it starts again after it.
    fn restart(&mut self) {
        let now = Instant::now();
        let waited = now.saturating_duration_since(self.last);
        self.started += waited;
        self.last = now;
    }

    fn lap(&mut self, phase: Phase) {
        let now = Instant::now();
        if let Some(ms) = self.ms.get_mut(phase as usize) {
            *ms = ms.saturating_add(ms_since(self.last));
        }
        self.last = now;
    }

    fn warn_if_slow(&self, node_id: u64) {
        if self.last.saturating_duration_since(self.started) >= TURN_SLOW {
            let [tick, inbox, reports, propose, ready] = self.ms;
            tracing::warn!(
                node_id,
                tick_ms = tick,
                inbox_ms = inbox,
                reports_ms = reports,
                propose_ms = propose,
                ready_ms = ready,
                "slow Raft driver turn: every shard of this node waited for it"
            );
        }
    }
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
    /// Which of the node's drivers this is (`pool`).
    index: usize,
    /// The node's drivers: who holds which shard, their inboxes.
    drivers: Arc<pool::Drivers>,
    engine: Engine,
    tuning: RaftTuning,
    transport: Arc<dyn Transport>,
    rx: Receiver<Inbound>,
    tx: Sender<Inbound>,
    /// The shard map this node knows: bootstrap, records, own splits.
    /// Changed only through `set_map`, which publishes it to `routing`.
    map: Arc<ShardMap>,
    routing: Arc<crate::placement::Routing>,
    /// Shards split here from a shard this node leads, whose records go
    /// with the parent's next record write (`driver::split`).
    split_children: BTreeMap<u64, Vec<u64>>,
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
    /// Removed replicas whose data is deleted once the apply worker reports
    /// this index applied (their last entries were still with it).
    gc_after: BTreeMap<u64, u64>,
    /// The apply worker (`applier`).
    applier: applier::Applier,
    /// The node's snapshot send budget, shared by every snapshot it sends.
    snapshot_rate: Arc<SendRate>,
    /// The state-machine flush running (`flush`), if any; at most one.
    flush_job: Option<flush::FlushJob>,
    /// Data shards this node leads whose record in the metadata group must
    /// be (re)written: it won an election or applied a membership change.
    map_dirty: BTreeSet<u64>,
    /// Record writes in flight: (shard, answer).
    map_writes: Vec<(u64, oneshot::Receiver<ProposeResult>)>,
    /// Snapshots being sent: (shard, follower) → bytes handed to the wire
    /// (NodeStatus shows them; dropped when the send is reported).
    snapshot_sends: BTreeMap<(u64, u64), Arc<std::sync::atomic::AtomicU64>>,
    /// The last placement round saw a move in flight (rounds then come
    /// every `PLACEMENT_BUSY_EVERY_TICKS`).
    moves_in_flight: bool,
    /// On the metadata leader: data-shard learners no move owns, and when
    /// this node first saw each (`place`; stray learners are removed).
    unowned_learners: BTreeMap<(u64, u64), Instant>,
    /// Replicas the metadata group's records show stale, and since when
    /// without a break (`gc`).
    stale_since: BTreeMap<u64, gc::StaleSeen>,
    /// The placement loop's metadata write in flight, if any (`place`).
    place_write: Option<oneshot::Receiver<ProposeResult>>,
    outbox: BTreeMap<u64, Vec<ShardMsg>>,
    peers: BTreeMap<u64, PeerLiveness>,
    ticks: u64,
    logger: slog::Logger,
    /// Waiting readers (long-polls, Subscribe streams): told which
    /// mailboxes apply changed, and which shards lost their leader.
    watchers: Arc<Watchers>,
    counters: Arc<DriverCounters>,
    /// Replicas catching up after storage damage, which do not vote
    /// (`catchup`, D49).
    catching_up: BTreeMap<u64, catchup::CatchUp>,
    /// Replicas whose received snapshot is being ingested on a thread of
    /// its own, taken out of `replicas` meanwhile (`snapshot`).
    ingests: BTreeMap<u64, snapshot::Ingest>,
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
    /// This driver's place in `drivers`, whose inbox `inbox` is.
    pub index: usize,
    pub drivers: Arc<pool::Drivers>,
    pub engine: Engine,
    pub tuning: RaftTuning,
    pub transport: Arc<dyn Transport>,
    pub inbox: (Sender<Inbound>, Receiver<Inbound>),
    pub map: Arc<ShardMap>,
    pub routing: Arc<crate::placement::Routing>,
    pub spool: Arc<SnapshotSpool>,
    pub watchers: Arc<Watchers>,
    pub counters: Arc<DriverCounters>,
}

impl Driver {
    /// Loads every replica on this node (repairing what a crash left).
    pub(crate) fn new(parts: DriverParts) -> Result<Self, ClusterError> {
        let DriverParts {
            node_id,
            index,
            drivers,
            engine,
            tuning,
            transport,
            inbox: (tx, rx),
            map,
            routing,
            spool,
            watchers,
            counters,
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
        let snapshot_rate = Arc::new(SendRate::new(tuning.snapshot_send_bytes_per_s));
        // The node's apply workers are shared out among its drivers.
        let apply_threads = tuning.apply_threads.div_ceil(drivers.count().max(1));
        let name = if drivers.count() == 1 {
            node_id.to_string()
        } else {
            format!("{node_id}-{index}")
        };
        let applier = applier::Applier::spawn(&name, apply_threads, &engine, &watchers)?;
        let mut d = Driver {
            node_id,
            index,
            drivers,
            engine,
            tuning,
            transport,
            rx,
            tx,
            map,
            routing,
            split_children: BTreeMap::new(),
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
            gc_after: BTreeMap::new(),
            snapshot_rate,
            applier,
            flush_job: None,
            map_dirty: BTreeSet::new(),
            map_writes: Vec::new(),
            place_write: None,
            unowned_learners: BTreeMap::new(),
            stale_since: BTreeMap::new(),
            moves_in_flight: false,
            snapshot_sends: BTreeMap::new(),
            outbox: BTreeMap::new(),
            peers,
            ticks: 0,
            logger: crate::logging::raft_logger(),
            watchers,
            counters,
            catching_up: BTreeMap::new(),
            ingests: BTreeMap::new(),
        };
        // This driver's share of the node's replicas (`pool`).
        let count = d.drivers.count();
        let mine = |shard: &u64| pool::Drivers::start_owner(*shard, count) == index;
        d.catching_up = d.load_catch_up()?;
        d.catching_up.retain(|shard, _| mine(shard));
        let mut ids = d.engine.shard_ids()?;
        ids.retain(mine);
        for &shard in &ids {
            d.recover_shard(shard)?;
        }
        // The shard records of this node's metadata replica, laid over the
        // bootstrap map before any replica starts: a leader's first record
        // is built from the map, and a split shard's bootstrap entry (the
        // range before the split, epoch 0; a split child missing) would
        // overwrite its true record (found by a review of restores, whose
        // replicas all start from records; a restart has the same race).
        let limit = usize::try_from(crate::config::SHARD_COUNT_MAX).unwrap_or(usize::MAX);
        match d
            .engine
            .system_scan(META_SHARD, crate::placement::SHARD_RECORD_PREFIX, limit)
        {
            Ok(records) => d.refresh_map(&records),
            // No metadata replica (a node that joined and has none yet), or
            // one still to be filled by a snapshot: the bootstrap map.
            Err(
                pigeonhole_engine::EngineError::NoSuchShard(_) | pigeonhole_engine::EngineError::ShardIncomplete(_),
            ) => {}
            Err(e) => return Err(e.into()),
        }
        for shard in ids {
            let Some(meta) = d.engine.shard_meta(shard)? else {
                continue;
            };
            if !is_member(&meta.conf_state, node_id) {
                // Removed from this shard and stopped before its data was
                // deleted (or written by a build without replica GC).
                d.destroy_replica(shard)?;
                continue;
            }
            d.add_replica(shard, meta.applied_index)?;
        }
        // Nodes that joined after the initial cluster: known from this
        // node's metadata replica, before any message is sent to them.
        d.learn_peers();
        // Spread leadership from the first election on: each shard's
        // preferred node campaigns at once (pre-vote keeps this from
        // disturbing a healthy leader after a restart).
        let ids: Vec<u64> = d.replicas.keys().copied().collect();
        for shard in ids {
            if let Some(r) = d.replicas.get_mut(&shard) {
                let voter = r.raw.raft.prs().conf().voters().contains(node_id);
                if r.preferred_leader == node_id && voter && !d.catching_up.contains_key(&shard) {
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
        // Callers that may race another driver claim first (`maybe_create`,
        // `on_split`); this claim then holds already.
        if !self.drivers.claim(shard, self.index) {
            return Err(ClusterError::Raft(format!(
                "shard {shard}: driver {} was to make its replica, but another driver of this node holds it",
                self.index
            )));
        }
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
            let mut turn = Turn::new(now);
            self.follow_map();
            if now >= next_hb {
                self.node_heartbeat();
                next_hb = now + hb;
            }
            if now >= next_tick {
                // An ingest whose wake-up could not be delivered is still
                // collected.
                self.finish_ingests()?;
                self.tick();
                self.collect_stale_replicas()?;
                next_tick += tick;
                if next_tick < now {
                    next_tick = now + tick;
                }
            }
            turn.lap(Phase::Tick);
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
                turn.restart();
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
            turn.lap(Phase::Inbox);
            // Applies done since the last turn: they move applied indexes,
            // release reads and may let logs compact.
            self.take_reports()?;
            if !self.map_dirty.is_empty() {
                self.write_shard_records();
            }
            turn.lap(Phase::Reports);
            self.propose_queued();
            turn.lap(Phase::Propose);
            self.process_ready()?;
            turn.lap(Phase::Ready);
            turn.warn_if_slow(self.node_id);
        }
    }

    /// Takes the node's map if another driver changed it (`split`).
    fn follow_map(&mut self) {
        let now = self.routing.get();
        if !Arc::ptr_eq(&now, &self.map) {
            self.map = now;
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
        // Ingests running finish first (their replicas are failed below
        // with the others; one cut short is re-run at the next start).
        self.join_ingests();
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
            for replica::Part { reply, .. } in p.parts {
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
        self.join_ingests();
    }
}

#[cfg(test)]
mod tests;
