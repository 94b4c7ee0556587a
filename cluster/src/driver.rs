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
//! 7. applies committed entries, answers the waiting proposals with their
//!    per-op results, and releases reads whose index is applied.
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

use crate::config::RaftTuning;
use crate::error::ClusterError;
use crate::placement::{shard_record_key, ShardMap, META_SHARD};
use crate::transport::{spool, Envelope, ShardMsg, SnapshotJob, SnapshotSpool, Transport};
use crate::watch::Watchers;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::raft::eraftpb::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, SnapshotMetadata,
};
use pigeonhole_engine::raft::{self, RawNode, SnapshotStatus, StateRole, Storage as _};
use pigeonhole_engine::{
    ApplyEntry, Durability, Engine, EntryKind, EntryOutcome, OpError, OpOutput, RaftBatch, RaftLogStore, ShardState,
    SNAPSHOT_DATA_MAGIC,
};
use pigeonhole_proto::internal::v1::ShardRecord;
use prost::Message as _;
use protobuf::Message as _;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// Per-op results of one proposal.
pub type ProposeResult = Result<Vec<Result<OpOutput, OpError>>, ClusterError>;

/// Everything the driver takes from its inbox.
pub(crate) enum Inbound {
    Propose {
        shard: u64,
        ops: Vec<cmd::Op>,
        reply: oneshot::Sender<ProposeResult>,
        deadline: Instant,
    },
    Read {
        shard: u64,
        reply: oneshot::Sender<Result<(), ClusterError>>,
        deadline: Instant,
    },
    ConfChange {
        shard: u64,
        cc: ConfChangeV2,
        reply: oneshot::Sender<Result<ConfState, ClusterError>>,
        deadline: Instant,
    },
    TransferLeader {
        shard: u64,
        to: u64,
        reply: oneshot::Sender<Result<(), ClusterError>>,
    },
    Campaign {
        shard: u64,
        reply: oneshot::Sender<Result<(), ClusterError>>,
    },
    Status {
        reply: oneshot::Sender<Vec<ShardStatus>>,
    },
    Raft(Envelope),
    SnapshotReady {
        from: u64,
        shard: u64,
        path: PathBuf,
        msg: Message,
    },
    SnapshotReport {
        shard: u64,
        to: u64,
        ok: bool,
    },
    Stop,
}

/// A replica's state, as [`crate::Node::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u64,
    /// Leader / follower / candidate.
    pub role: Role,
    /// The leader this replica knows of (0 = none).
    pub leader: u64,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// First index still in the log (compaction moves it up).
    pub first_index: u64,
    /// Voters of the applied configuration.
    pub voters: Vec<u64>,
    /// Learners of the applied configuration.
    pub learners: Vec<u64>,
    /// In a joint configuration (a membership change is half-way).
    pub joint: bool,
    /// Hibernating: not ticking.
    pub asleep: bool,
}

/// A replica's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Leads the shard.
    Leader,
    /// Follows a leader (or waits for one).
    Follower,
    /// Campaigning.
    Candidate,
}

struct QueuedProposal {
    ops: Vec<cmd::Op>,
    bytes: usize,
    reply: oneshot::Sender<ProposeResult>,
    deadline: Instant,
    queued_at: Instant,
}

struct ReadWaiter {
    reply: oneshot::Sender<Result<(), ClusterError>>,
    deadline: Instant,
    queued_at: Instant,
}

/// A ReadIndex request in flight and the reads it covers.
struct InflightRead {
    /// The request's id (the second half of its context).
    id: u64,
    /// When it was last sent. raft-rs drops a ReadIndex silently when the
    /// leader it went to dies, or when a new leader has not yet committed
    /// an entry of its term; so a read still unanswered after
    /// `READ_RETRY_TICKS`, or after the replica saw a new leader, is sent
    /// again. Re-sending is safe: any answer to a request sent after the
    /// waiters queued is an index at least as new as they need.
    sent_tick: u64,
    waiters: Vec<ReadWaiter>,
}

/// Ticks an unanswered ReadIndex waits before it is sent again.
const READ_RETRY_TICKS: u64 = 2;

/// Ticks a replica may be without a leader before the readers that follow
/// its mailboxes are told (so a leader transfer, which leaves a replica
/// leaderless for a few milliseconds, ends no stream).
const LEADERLESS_TICKS_MAX: u32 = 1;

/// A proposed entry this node waits on: callers and how many ops each owns.
struct Pending {
    shard: u64,
    parts: Vec<(oneshot::Sender<ProposeResult>, usize)>,
    deadline: Instant,
    proposed_at: Instant,
}

struct PendingConf {
    shard: u64,
    reply: oneshot::Sender<Result<ConfState, ClusterError>>,
    deadline: Instant,
}

struct Replica {
    raw: RawNode<RaftLogStore>,
    queued: VecDeque<QueuedProposal>,
    reads_queued: Vec<ReadWaiter>,
    reads_inflight: Vec<InflightRead>,
    reads_ready: Vec<(u64, Vec<ReadWaiter>)>,
    /// The replica saw a new leader (or role): in-flight reads go again.
    reads_resend: bool,
    /// Consecutive ticks without a known leader.
    leaderless_ticks: u32,
    quiet_ticks: u32,
    asleep: bool,
    log_bytes: u64,
    preferred_leader: u64,
}

/// Raft message bytes per envelope (frame), at most, unless one message is
/// larger by itself. Well under the transport's 80 MiB frame limit: one
/// entry is at most `entry_bytes_max` (8 MiB by default, 64 MiB allowed).
pub const ENVELOPE_BYTES_MAX: usize = 16 << 20;

/// Bytes of an entry context: origin node id, then proposal id.
const CONTEXT_LEN: usize = 16;

fn context(node: u64, id: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(CONTEXT_LEN);
    c.extend_from_slice(&node.to_be_bytes());
    c.extend_from_slice(&id.to_be_bytes());
    c
}

fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    let (a, b) = c.split_first_chunk::<8>()?;
    let b: [u8; 8] = b.try_into().ok()?;
    Some((u64::from_be_bytes(*a), u64::from_be_bytes(b)))
}

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

    /// Repairs what a crash can leave: a snapshot ingest cut short (re-run
    /// from the spooled file) and an apply state ahead of the Raft log (the
    /// ingest finished, the log reset did not).
    fn recover_shard(&mut self, shard: u64) -> Result<(), ClusterError> {
        let Some(meta) = self.engine.shard_meta(shard)? else {
            return Ok(());
        };
        let meta = if meta.state == ShardState::Ingesting {
            // The newest complete spooled snapshot: any complete snapshot of
            // committed state newer than what the shard had will do.
            let (_, path) = self.spool.complete(shard)?.into_iter().next().ok_or_else(|| {
                ClusterError::Config(format!(
                    "shard {shard} was cut off during a snapshot ingest and no spooled snapshot is left"
                ))
            })?;
            self.ingest_file(shard, &path)?;
            self.engine.shard_meta(shard)?.ok_or(ClusterError::Stopped)?
        } else {
            meta
        };
        let store = self.engine.raft_log(shard)?;
        let hs = store.hard_state()?;
        let last = store.last_index().map_err(raft_err)?;
        if meta.applied_index <= hs.commit {
            return Ok(());
        }
        // The applied state is ahead of the durable commit index: a snapshot
        // was ingested (or applies were written) past what the log says.
        // Only if the local log holds the applied entry itself (same index
        // and term) is its prefix the committed history, so the commit index
        // may move up to it. Otherwise the log diverges there and must be
        // restarted at the applied state, exactly as installing that
        // snapshot would; the entries dropped were never committed (log
        // matching), and a leader re-sends whatever follows.
        let log_agrees = meta.applied_index <= last && store.term(meta.applied_index).ok() == Some(meta.applied_term);
        let mut rb = RaftBatch::default();
        if log_agrees {
            let mut hs = hs;
            hs.commit = meta.applied_index;
            rb.set_hard_state(&store, &hs)?;
        } else {
            let md = SnapshotMetadata {
                index: meta.applied_index,
                term: meta.applied_term,
                ..Default::default()
            };
            rb.apply_snapshot(&store, &md)?;
        }
        self.engine.write_raft(rb, Durability::Fsync)?;
        Ok(())
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
        self.replicas.insert(
            shard,
            Replica {
                raw,
                queued: VecDeque::new(),
                reads_queued: Vec::new(),
                reads_inflight: Vec::new(),
                reads_ready: Vec::new(),
                reads_resend: false,
                leaderless_ticks: 0,
                quiet_ticks: 0,
                asleep: false,
                log_bytes: 0,
                preferred_leader,
            },
        );
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
                match self.rx.recv_timeout(wait) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
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

    /// Handles one inbox item; false means stop.
    fn handle(&mut self, m: Inbound) -> Result<bool, ClusterError> {
        match m {
            Inbound::Propose {
                shard,
                ops,
                reply,
                deadline,
            } => {
                if ops.is_empty() {
                    let _ = reply.send(Ok(Vec::new()));
                    return Ok(true);
                }
                let bytes = ops.iter().map(op_bytes).sum();
                self.enqueue(shard, reply, |r, reply| {
                    r.queued.push_back(QueuedProposal {
                        ops,
                        bytes,
                        reply,
                        deadline,
                        queued_at: Instant::now(),
                    });
                });
            }
            Inbound::Read { shard, reply, deadline } => {
                self.enqueue(shard, reply, |r, reply| {
                    r.reads_queued.push(ReadWaiter {
                        reply,
                        deadline,
                        queued_at: Instant::now(),
                    });
                });
            }
            Inbound::ConfChange {
                shard,
                cc,
                reply,
                deadline,
            } => {
                let id = self.next_id();
                let node_id = self.node_id;
                let r = match self.led_replica(shard) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(true);
                    }
                };
                let joint = !r.raw.raft.prs().conf().to_conf_state().voters_outgoing.is_empty();
                if r.raw.raft.has_pending_conf() || joint {
                    // raft-rs would turn the proposal into an empty entry and
                    // the caller would only see a timeout; say why instead.
                    let _ = reply.send(Err(ClusterError::Busy {
                        shard,
                        reason: "a membership change is still being applied".into(),
                    }));
                    return Ok(true);
                }
                match r.raw.propose_conf_change(context(node_id, id), cc) {
                    Ok(()) => {
                        self.pending_conf.insert(id, PendingConf { shard, reply, deadline });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ClusterError::InvalidArgument {
                            field: "conf_change",
                            reason: e.to_string(),
                        }));
                    }
                }
                self.wake(shard, true);
            }
            Inbound::TransferLeader { shard, to, reply } => {
                let r = match self.led_replica(shard) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(true);
                    }
                };
                if !r.raw.raft.prs().conf().voters().contains(to) {
                    let _ = reply.send(Err(ClusterError::InvalidArgument {
                        field: "to_node",
                        reason: format!("node {to} is not a voter of shard {shard}"),
                    }));
                    return Ok(true);
                }
                r.raw.transfer_leader(to);
                let _ = reply.send(Ok(()));
                self.wake(shard, true);
            }
            Inbound::Campaign { shard, reply } => {
                let Some(r) = self.replicas.get_mut(&shard) else {
                    let _ = reply.send(Err(self.not_replica(shard)));
                    return Ok(true);
                };
                let res = r.raw.campaign().map_err(raft_err);
                let _ = reply.send(res);
                self.wake(shard, true);
            }
            Inbound::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Inbound::Raft(env) => self.on_envelope(env)?,
            Inbound::SnapshotReady { from, shard, path, msg } => self.on_snapshot(from, shard, &path, msg)?,
            Inbound::SnapshotReport { shard, to, ok } => {
                if let Some(r) = self.replicas.get_mut(&shard) {
                    let status = if ok {
                        SnapshotStatus::Finish
                    } else {
                        SnapshotStatus::Failure
                    };
                    r.raw.report_snapshot(to, status);
                    if !ok {
                        r.raw.report_unreachable(to);
                    }
                }
                self.wake(shard, true);
            }
            Inbound::Stop => return Ok(false),
        }
        Ok(true)
    }

    /// Queues a request on its shard's replica (or answers `NotReplica`),
    /// and makes sure the loop looks at the shard.
    fn enqueue<T>(
        &mut self,
        shard: u64,
        reply: oneshot::Sender<Result<T, ClusterError>>,
        push: impl FnOnce(&mut Replica, oneshot::Sender<Result<T, ClusterError>>),
    ) {
        match self.replicas.get_mut(&shard) {
            Some(r) => push(r, reply),
            None => {
                let _ = reply.send(Err(self.not_replica(shard)));
                return;
            }
        }
        self.waiting.insert(shard);
        self.wake(shard, true);
    }

    /// The replica of `shard` if this node holds it and leads it; otherwise
    /// the error that says where to go.
    fn led_replica(&mut self, shard: u64) -> Result<&mut Replica, ClusterError> {
        if !self.replicas.contains_key(&shard) {
            return Err(self.not_replica(shard));
        }
        let r = self.replicas.get_mut(&shard).ok_or(ClusterError::Stopped)?;
        if r.raw.raft.state != StateRole::Leader {
            return Err(ClusterError::NotLeader {
                shard,
                leader: r.raw.raft.leader_id,
            });
        }
        Ok(r)
    }

    fn not_replica(&self, shard: u64) -> ClusterError {
        if shard != META_SHARD && self.map.shard(shard).is_none() {
            // Not a shard of this cluster at all: retrying cannot help.
            return ClusterError::NoSuchShard {
                shard,
                first: self.map.shards.first().map_or(0, |s| s.id),
                last: self.map.shards.last().map_or(0, |s| s.id),
            };
        }
        ClusterError::NotReplica {
            shard,
            node: self.node_id,
            replicas: self.map.shard(shard).map(|s| s.replicas.clone()).unwrap_or_default(),
        }
    }

    fn on_envelope(&mut self, env: Envelope) -> Result<(), ClusterError> {
        if let Some(p) = self.peers.get_mut(&env.from) {
            p.last_seen = Instant::now();
            if p.down {
                p.down = false;
                // A peer came back: wake everything so leaders probe it and
                // bring its replicas up to date.
                self.wake_all();
            }
        }
        for ShardMsg { shard, msg } in env.msgs {
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                // Snapshots arrive only through the spool, with their state;
                // a bare MsgSnapshot would move raft-rs past the engine.
                continue;
            }
            if !self.replicas.contains_key(&shard) && !self.maybe_create(shard, &msg)? {
                continue;
            }
            let quiet_msg = matches!(
                msg.get_msg_type(),
                MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse
            );
            self.wake(shard, !quiet_msg);
            if let Some(r) = self.replicas.get_mut(&shard) {
                // Step errors are stale or foreign messages; raft-rs already
                // ignores what it must, so they are not fatal.
                let _ = r.raw.step(msg);
            }
        }
        Ok(())
    }

    /// A leader of a shard this node has no replica of is sending to it: a
    /// conf change added this node. Create an empty replica; the leader will
    /// send a snapshot.
    fn maybe_create(&mut self, shard: u64, msg: &Message) -> Result<bool, ClusterError> {
        let from_leader = matches!(
            msg.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        );
        if !from_leader || (shard != META_SHARD && self.map.shard(shard).is_none()) {
            return Ok(false);
        }
        if let Some(meta) = self.engine.shard_meta(shard)? {
            if meta.state != ShardState::Ready || is_member(&meta.conf_state, self.node_id) {
                return Ok(false);
            }
            // A replica removed earlier is being added back: resume from its
            // data. Its log is an older prefix of the same group's history,
            // so the leader simply catches it up (by log or snapshot).
            self.recover_shard(shard)?;
            self.add_replica(shard, meta.applied_index)?;
            return Ok(true);
        }
        self.add_replica(shard, 0)?;
        Ok(true)
    }

    /// Ingests a spooled snapshot, then steps raft-rs's MsgSnapshot. The
    /// message is stepped only if the engine now holds state at least as new
    /// as the snapshot, so raft-rs never moves past state the engine lacks.
    fn on_snapshot(
        &mut self,
        _from: u64,
        shard: u64,
        path: &std::path::Path,
        msg: Message,
    ) -> Result<(), ClusterError> {
        let md_index = msg.get_snapshot().get_metadata().index;
        let mut expect = SNAPSHOT_DATA_MAGIC.to_vec();
        expect.extend_from_slice(&shard.to_be_bytes());
        if msg.get_snapshot().data.as_ref() != expect.as_slice() || msg.get_msg_type() != MessageType::MsgSnapshot {
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        if !self.replicas.contains_key(&shard) && !self.maybe_create(shard, &msg)? {
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        let applied = self.engine.shard_meta(shard)?.map_or(0, |m| m.applied_index);
        if applied < md_index {
            if let Err(e) = self.ingest_file(shard, path) {
                let torn = self
                    .engine
                    .shard_meta(shard)?
                    .is_some_and(|m| m.state == ShardState::Ingesting);
                if torn {
                    // The old state is gone and the new one is not all in:
                    // this replica cannot serve. Stop loudly, and KEEP the
                    // spooled file: the next start re-runs the ingest from it
                    // (`recover_shard`), which repairs a transient failure
                    // (an I/O error); a deterministic one keeps the node from
                    // starting until an operator replaces the replica.
                    return Err(e);
                }
                // Refused before anything changed (e.g. older than our
                // state): drop it; the leader sends another if still needed.
                let _ = std::fs::remove_file(path);
                return Ok(());
            }
            // Any mailbox of the shard may have changed.
            self.watchers.shard_reset(shard);
        } else {
            let _ = std::fs::remove_file(path);
        }
        let applied = self.engine.shard_meta(shard)?.map_or(0, |m| m.applied_index);
        if applied >= md_index {
            self.wake(shard, true);
            if let Some(r) = self.replicas.get_mut(&shard) {
                let _ = r.raw.step(msg);
            }
        }
        Ok(())
    }

    fn ingest_file(&self, shard: u64, path: &std::path::Path) -> Result<(), ClusterError> {
        let mut ingest = self.engine.ingest_snapshot(shard)?;
        let mut done = false;
        let mut failure: Option<ClusterError> = None;
        spool::read_chunks(path, |chunk| match ingest.push(&chunk) {
            Ok(s) => {
                done = s.is_some();
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                failure = Some(e.into());
                Err(std::io::Error::other(msg))
            }
        })
        .map_err(|e| failure.take().unwrap_or(ClusterError::Io(e)))?;
        if !done {
            return Err(ClusterError::Io(std::io::Error::other(
                "spooled snapshot has no last chunk",
            )));
        }
        // The shard is whole again and durable (the last push fsyncs): no
        // spooled file of it is needed for recovery any more.
        self.spool.remove_all(shard)?;
        Ok(())
    }

    fn node_heartbeat(&mut self) {
        let ids: Vec<u64> = self.peers.keys().copied().collect();
        for to in ids {
            self.transport.send(Envelope {
                from: self.node_id,
                to,
                msgs: Vec::new(),
            });
        }
        let limit = Duration::from_millis(self.tuning.peer_down_after_ms);
        let mut gone = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            if !p.down && p.last_seen.elapsed() > limit {
                p.down = true;
                gone.push(*id);
            }
        }
        if !gone.is_empty() {
            // Readers of shards led from a node we no longer hear from are
            // told now, not an election timeout later: they resume elsewhere.
            for (shard, r) in &self.replicas {
                if gone.contains(&r.raw.raft.leader_id) {
                    self.watchers.leader_lost(*shard);
                }
            }
            self.wake_all();
        }
    }

    fn tick(&mut self) {
        self.ticks += 1;
        if !self.map_writes.is_empty() {
            self.check_shard_record_writes();
        }
        let hibernate = self.tuning.hibernate_after_ticks;
        let rebalance = self.tuning.rebalance_every_ticks != 0 && self.ticks % self.tuning.rebalance_every_ticks == 0;
        let collect =
            self.tuning.expire_dedup_every_ticks != 0 && self.ticks % self.tuning.expire_dedup_every_ticks == 0;
        let expire_max = self.engine.options().limits.expire_dedup_entries_max;
        let timeout = Duration::from_millis(self.tuning.request_timeout_ms);
        let node_id = self.node_id;
        let now = Instant::now();
        let ticks = self.ticks;
        for (shard, r) in self.replicas.iter_mut() {
            if r.asleep {
                continue;
            }
            r.raw.tick();
            self.dirty.insert(*shard);
            if r.raw.raft.leader_id == 0 {
                r.leaderless_ticks = r.leaderless_ticks.saturating_add(1);
                if r.leaderless_ticks > LEADERLESS_TICKS_MAX {
                    self.watchers.leader_lost(*shard);
                }
            } else {
                r.leaderless_ticks = 0;
                // ReadIndex requests that got no answer go again.
                for read in r.reads_inflight.iter_mut() {
                    if ticks.saturating_sub(read.sent_tick) >= READ_RETRY_TICKS {
                        read.sent_tick = ticks;
                        r.raw.read_index(context(node_id, read.id));
                    }
                }
            }
            if rebalance {
                maybe_rebalance(node_id, r, &self.peers);
            }
            if collect && *shard != META_SHARD && r.raw.raft.state == StateRole::Leader {
                // Dedup GC goes through the log like any write, so every
                // replica forgets the same entries at the same index. Nobody
                // waits for the answer: the next round retries what failed.
                let op = cmd::Op {
                    op: Some(cmd::op::Op::ExpireDedup(cmd::ExpireDedupOp {
                        max_entries: expire_max,
                    })),
                };
                let (reply, _) = oneshot::channel();
                r.queued.push_back(QueuedProposal {
                    bytes: op.encoded_len(),
                    ops: vec![op],
                    reply,
                    deadline: now + timeout,
                    queued_at: now,
                });
                self.waiting.insert(*shard);
            }
            if hibernate != 0 && is_quiet(r) {
                r.quiet_ticks += 1;
                if r.quiet_ticks >= hibernate {
                    r.asleep = true;
                }
            } else {
                r.quiet_ticks = 0;
            }
            // Reads and proposals that waited too long.
            expire_queued(*shard, r, now);
        }
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                let waited_ms = ms_since(p.proposed_at);
                for (reply, _) in p.parts {
                    let _ = reply.send(Err(ClusterError::Timeout {
                        shard: p.shard,
                        what: "proposal",
                        waited_ms,
                    }));
                }
            }
        }
        let expired: Vec<u64> = self
            .pending_conf
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending_conf.remove(&id) {
                let _ = p.reply.send(Err(ClusterError::Timeout {
                    shard: p.shard,
                    what: "conf change",
                    waited_ms: self.tuning.request_timeout_ms,
                }));
            }
        }
    }

    /// Queues writes of the shard records this node owes the metadata group.
    /// The record's version is the writer's term: a deposed leader's late
    /// write loses to its successor's.
    fn write_shard_records(&mut self) {
        if !self.replicas.contains_key(&META_SHARD) {
            return;
        }
        let timeout = Duration::from_millis(self.tuning.request_timeout_ms);
        for shard in std::mem::take(&mut self.map_dirty) {
            let Some(r) = self.replicas.get(&shard) else { continue };
            if r.raw.raft.state != StateRole::Leader {
                continue;
            }
            let Some(desc) = self.map.shard(shard) else { continue };
            let conf = r.raw.raft.prs().conf().to_conf_state();
            let term = r.raw.raft.term;
            let record = ShardRecord {
                shard,
                range_start: desc.range_start,
                range_end: desc.range_end,
                voters: conf.voters,
                learners: conf.learners,
                leader_hint: self.node_id,
                preferred_leader: desc.preferred_leader,
                term,
            };
            let op = cmd::Op {
                op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                    key: shard_record_key(shard),
                    value: record.encode_to_vec(),
                    version: term,
                })),
            };
            let (reply, rx) = oneshot::channel();
            if let Some(meta) = self.replicas.get_mut(&META_SHARD) {
                meta.queued.push_back(QueuedProposal {
                    bytes: op.encoded_len(),
                    ops: vec![op],
                    reply,
                    deadline: Instant::now() + timeout,
                    queued_at: Instant::now(),
                });
                self.waiting.insert(META_SHARD);
                self.map_writes.push((shard, rx));
            }
        }
        if !self.map_writes.is_empty() {
            self.wake(META_SHARD, true);
        }
    }

    /// Retries record writes that failed for a retryable reason (no leader
    /// for the metadata group yet, a timeout) while this node still leads.
    fn check_shard_record_writes(&mut self) {
        let mut retry = Vec::new();
        self.map_writes.retain_mut(|(shard, rx)| match rx.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => true,
            Ok(Ok(results)) => {
                // A StaleVersion means a newer leader wrote already: done.
                let _ = results;
                false
            }
            Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => {
                retry.push(*shard);
                false
            }
        });
        self.map_dirty.extend(retry);
    }

    /// Packs each shard's queued proposals into one entry per shard.
    fn propose_queued(&mut self) {
        let node_id = self.node_id;
        let shards: Vec<u64> = self.waiting.iter().copied().collect();
        for &shard in &shards {
            if self.replicas.get(&shard).is_none_or(|r| r.raw.raft.leader_id == 0) {
                continue;
            }
            loop {
                let id = self.next_id();
                let Some(r) = self.replicas.get_mut(&shard) else { break };
                if r.queued.is_empty() {
                    break;
                }
                let mut ops = Vec::new();
                let mut bytes = 0usize;
                let mut parts = Vec::new();
                let mut deadline = Instant::now();
                while let Some(q) = r.queued.front() {
                    let fits = ops.is_empty()
                        || (ops.len() + q.ops.len() <= self.tuning.ops_per_entry_max
                            && bytes + q.bytes <= self.tuning.entry_bytes_max);
                    if !fits {
                        break;
                    }
                    let Some(q) = r.queued.pop_front() else { break };
                    bytes += q.bytes;
                    deadline = deadline.max(q.deadline);
                    parts.push((q.reply, q.ops.len(), q.ops.len()));
                    ops.extend(q.ops);
                }
                let command = cmd::Command { time_ms: now_ms(), ops };
                let data = command.encode_to_vec();
                match r.raw.propose(context(node_id, id), data) {
                    Ok(()) => {
                        self.pending.insert(
                            id,
                            Pending {
                                shard,
                                parts: parts.into_iter().map(|(reply, n, _)| (reply, n)).collect(),
                                deadline,
                                proposed_at: Instant::now(),
                            },
                        );
                        self.dirty.insert(shard);
                    }
                    Err(e) => {
                        // Dropped (no leader yet, a transfer under way, or
                        // the uncommitted-size bound): fail these callers
                        // with a retryable error rather than hold them.
                        for (reply, _, _) in parts {
                            let _ = reply.send(Err(match e {
                                raft::Error::ProposalDropped => ClusterError::Dropped { shard },
                                ref other => ClusterError::Raft(other.to_string()),
                            }));
                        }
                        break;
                    }
                }
            }
        }
        // One ReadIndex per shard covers every read queued on it.
        for shard in shards {
            let id = self.next_id();
            let Some(r) = self.replicas.get_mut(&shard) else {
                self.waiting.remove(&shard);
                continue;
            };
            if r.raw.raft.leader_id != 0 {
                if r.reads_resend {
                    // A new leader (or role): reads sent to the old one may
                    // never be answered.
                    r.reads_resend = false;
                    for read in r.reads_inflight.iter_mut() {
                        read.sent_tick = self.ticks;
                        r.raw.read_index(context(node_id, read.id));
                    }
                    self.dirty.insert(shard);
                }
                if !r.reads_queued.is_empty() {
                    let waiters = std::mem::take(&mut r.reads_queued);
                    r.raw.read_index(context(node_id, id));
                    r.reads_inflight.push(InflightRead {
                        id,
                        sent_tick: self.ticks,
                        waiters,
                    });
                    self.dirty.insert(shard);
                }
            }
            if r.queued.is_empty() && r.reads_queued.is_empty() && !r.reads_resend {
                self.waiting.remove(&shard);
            }
        }
    }

    /// Steps 4–7 of the loop (see the module docs).
    fn process_ready(&mut self) -> Result<(), ClusterError> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut rb = RaftBatch::default();
        let mut readies = Vec::new();
        let mut snapshots = Vec::new();
        let mut must_sync = false;
        let mut late = Vec::new();
        for shard in dirty {
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            if !r.raw.has_ready() {
                continue;
            }
            let mut rd = r.raw.ready();
            must_sync |= rd.must_sync();
            // A leader may send before its fsync, but not messages of a term
            // or vote it has not made durable yet (a single voter becomes
            // leader inside one Ready): those wait for the fsync.
            let prev = r.raw.store().hard_state()?;
            let early_ok = rd.hs().is_none_or(|hs| hs.term == prev.term && hs.vote == prev.vote);
            if shard != META_SHARD && rd.ss().is_some_and(|ss| ss.raft_state == StateRole::Leader) {
                self.map_dirty.insert(shard);
            }
            if rd.ss().is_some() && !r.reads_inflight.is_empty() {
                r.reads_resend = true;
                self.waiting.insert(shard);
            }
            let msgs = rd.take_messages();
            if early_ok {
                route(&mut self.outbox, shard, msgs, &mut snapshots);
            } else {
                late.push((shard, msgs));
            }
            if !rd.snapshot().is_empty() {
                rb.apply_snapshot(r.raw.store(), rd.snapshot().get_metadata())?;
                r.log_bytes = 0;
            }
            if !rd.entries().is_empty() {
                rb.append(r.raw.store(), rd.entries())?;
                r.log_bytes += rd.entries().iter().map(|e| e.data.len() as u64).sum::<u64>();
            }
            if let Some(hs) = rd.hs() {
                rb.set_hard_state(r.raw.store(), hs)?;
            }
            for rs in rd.take_read_states() {
                if let Some(pos) = r
                    .reads_inflight
                    .iter()
                    .position(|read| parse_context(&rs.request_ctx).map(|c| c.1) == Some(read.id))
                {
                    let read = r.reads_inflight.swap_remove(pos);
                    r.reads_ready.push((rs.index, read.waiters));
                }
            }
            readies.push((shard, rd));
        }
        self.compact_logs(&mut rb)?;
        // Leaders' appends go out now, overlapping our own fsync.
        self.flush_outbox();
        if !rb.is_empty() {
            // Entries, votes, terms and snapshots must be durable before we
            // acknowledge them. A Ready that only moves the commit index does
            // not: a lost commit index is learned again from the leader (and
            // recovery raises it to the applied index), so it skips the fsync
            // that would otherwise sit between commit and apply.
            let durability = if must_sync && !self.tuning.unsafe_no_fsync {
                Durability::Fsync
            } else {
                Durability::NoFsync
            };
            self.engine.write_raft(rb, durability)?;
        }
        for (shard, msgs) in late {
            route(&mut self.outbox, shard, msgs, &mut snapshots);
        }
        let mut work = Vec::with_capacity(readies.len());
        for (shard, mut rd) in readies {
            let mut committed = rd.take_committed_entries();
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            route(&mut self.outbox, shard, rd.take_persisted_messages(), &mut snapshots);
            // advance_append, not advance: the entries are not applied yet.
            // raft-rs decides whether to leave a joint configuration when
            // `advance_apply` moves the applied index past the conf change,
            // which must happen after apply_conf_change ran (in apply_all).
            let mut light = r.raw.advance_append(rd);
            route(&mut self.outbox, shard, light.take_messages(), &mut snapshots);
            committed.extend(light.take_committed_entries());
            work.push((shard, committed));
        }
        self.apply_all(&work)?;
        for (shard, committed) in &work {
            if !committed.is_empty() {
                self.applied_now.insert(*shard);
            }
            if let Some(r) = self.replicas.get_mut(shard) {
                r.raw.advance_apply();
                trim_entry_cache(r);
                release_reads(r);
                if r.raw.has_ready() {
                    self.dirty.insert(*shard);
                }
            }
        }
        self.flush_outbox();
        for (shard, msg) in snapshots {
            self.send_snapshot(shard, msg);
        }
        Ok(())
    }

    fn send_snapshot(&self, shard: u64, msg: Message) {
        let tx = self.tx.clone();
        let to = msg.to;
        self.transport.send_snapshot(SnapshotJob {
            from: self.node_id,
            to,
            shard,
            msg,
            engine: self.engine.clone(),
            chunk_bytes: self.tuning.snapshot_chunk_bytes,
            report: Box::new(move |ok| {
                // Never silently lost: a failed transfer left unreported would
                // keep the follower in raft-rs's Snapshot state. The report
                // comes from a transport thread, so waiting a moment for room
                // in the inbox blocks nothing of the driver's.
                let _ = tx.send_timeout(Inbound::SnapshotReport { shard, to, ok }, Duration::from_secs(5));
            }),
        });
    }

    /// Sends what this turn queued, one envelope per destination, split so
    /// no envelope exceeds `ENVELOPE_BYTES_MAX` (a frame over the receiver's
    /// limit would be refused whole, heartbeats included).
    fn flush_outbox(&mut self) {
        for (to, msgs) in std::mem::take(&mut self.outbox) {
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            for m in msgs {
                let size = usize::try_from(m.msg.compute_size()).unwrap_or(usize::MAX);
                if !batch.is_empty() && bytes.saturating_add(size) > ENVELOPE_BYTES_MAX {
                    self.transport.send(Envelope {
                        from: self.node_id,
                        to,
                        msgs: std::mem::take(&mut batch),
                    });
                    bytes = 0;
                }
                bytes = bytes.saturating_add(size);
                batch.push(m);
            }
            if !batch.is_empty() {
                self.transport.send(Envelope {
                    from: self.node_id,
                    to,
                    msgs: batch,
                });
            }
        }
    }

    /// Applies what every shard committed this turn in ONE engine write,
    /// then answers whoever on this node waits for those entries.
    fn apply_all(&mut self, work: &[(u64, Vec<Entry>)]) -> Result<(), ClusterError> {
        // (shard, index into `work`, entries for the engine)
        let mut batches: Vec<(u64, usize, Vec<ApplyEntry<'_>>)> = Vec::with_capacity(work.len());
        let mut conf_replies = Vec::new();
        let mut removed = Vec::new();
        for (w, (shard, entries)) in work.iter().enumerate() {
            let shard = *shard;
            if entries.is_empty() {
                continue;
            }
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            let mut batch = Vec::with_capacity(entries.len());
            let mut last_conf = None;
            for e in entries {
                let kind = match e.get_entry_type() {
                    EntryType::EntryNormal if e.data.is_empty() => EntryKind::Empty,
                    EntryType::EntryNormal => EntryKind::Command(&e.data),
                    EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                        // raft-rs must see every conf change in log order,
                        // even ones the engine already holds (after a
                        // snapshot).
                        let cs = if e.get_entry_type() == EntryType::EntryConfChange {
                            let cc = ConfChange::parse_from_bytes(&e.data)
                                .map_err(|err| ClusterError::Raft(format!("bad conf change: {err}")))?;
                            r.raw.apply_conf_change(&cc)
                        } else {
                            let cc = ConfChangeV2::parse_from_bytes(&e.data)
                                .map_err(|err| ClusterError::Raft(format!("bad conf change: {err}")))?;
                            r.raw.apply_conf_change(&cc)
                        };
                        // An invalid change (e.g. removing the last voter)
                        // leaves the configuration as it was.
                        let cs = cs.unwrap_or_else(|_| r.raw.raft.prs().conf().to_conf_state());
                        last_conf = Some(cs.clone());
                        if shard != META_SHARD && r.raw.raft.state == StateRole::Leader {
                            self.map_dirty.insert(shard);
                        }
                        if let Some((node, id)) = parse_context(&e.context) {
                            if node == self.node_id {
                                conf_replies.push((id, cs.clone()));
                            }
                        }
                        EntryKind::ConfChange(cs)
                    }
                };
                batch.push(ApplyEntry {
                    index: e.index,
                    term: e.term,
                    kind,
                });
            }
            if last_conf.is_some_and(|cs| !is_member(&cs, self.node_id)) {
                removed.push(shard);
            }
            batches.push((shard, w, batch));
        }
        if batches.is_empty() {
            return Ok(());
        }
        let refs: Vec<(u64, &[ApplyEntry<'_>])> = batches.iter().map(|(s, _, b)| (*s, b.as_slice())).collect();
        // The Raft log is durable, so the apply need not be: after a crash
        // the unsynced tail of applies is replayed from the log. The next
        // fsync'd Raft write makes these durable too (same WAL, in order).
        let outcomes = self.engine.apply_many(&refs, Durability::NoFsync)?;
        drop(refs);
        for ((_, w, _), outcomes) in batches.iter().zip(outcomes) {
            let Some((_, entries)) = work.get(*w) else {
                continue;
            };
            for (e, outcome) in entries.iter().zip(outcomes) {
                if let EntryOutcome::Command { changed, .. } = &outcome {
                    self.watchers.mailboxes_changed(changed);
                }
                let Some((node, id)) = parse_context(&e.context) else {
                    continue;
                };
                if node != self.node_id {
                    continue;
                }
                if let Some(p) = self.pending.remove(&id) {
                    answer(p, outcome);
                }
            }
        }
        for (id, cs) in conf_replies {
            if let Some(p) = self.pending_conf.remove(&id) {
                let _ = p.reply.send(Ok(cs));
            }
        }
        for shard in removed {
            self.remove_replica(shard);
        }
        Ok(())
    }

    fn remove_replica(&mut self, shard: u64) {
        self.watchers.leader_lost(shard);
        if let Some(r) = self.replicas.remove(&shard) {
            fail_all(shard, r, |shard| ClusterError::NotReplica {
                shard,
                node: self.node_id,
                replicas: Vec::new(),
            });
        }
    }

    /// Adds compactions to `rb` for shards whose log grew past a threshold.
    fn compact_logs(&mut self, rb: &mut RaftBatch) -> Result<(), ClusterError> {
        for shard in std::mem::take(&mut self.applied_now) {
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            let store = r.raw.store();
            let first = store.first_index().map_err(raft_err)?;
            let applied = r.raw.raft.raft_log.applied;
            let len = applied.saturating_sub(first);
            if len < self.tuning.log_entries_max && r.log_bytes < self.tuning.log_bytes_max {
                continue;
            }
            let to = applied.saturating_sub(self.tuning.log_retain_entries);
            if to > first {
                rb.compact(store, to)?;
                r.log_bytes = 0;
            }
        }
        Ok(())
    }

    fn status(&self) -> Vec<ShardStatus> {
        self.replicas
            .iter()
            .map(|(shard, r)| {
                let raft = &r.raw.raft;
                let conf = raft.prs().conf().to_conf_state();
                ShardStatus {
                    shard: *shard,
                    role: match raft.state {
                        StateRole::Leader => Role::Leader,
                        StateRole::Follower => Role::Follower,
                        StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
                    },
                    leader: raft.leader_id,
                    term: raft.term,
                    commit: raft.raft_log.committed,
                    applied: raft.raft_log.applied,
                    last_index: raft.raft_log.last_index(),
                    first_index: r.raw.store().first_index().unwrap_or(0),
                    joint: !conf.voters_outgoing.is_empty(),
                    voters: conf.voters,
                    learners: conf.learners,
                    asleep: r.asleep,
                }
            })
            .collect()
    }

    /// Fails every waiter on stop.
    pub(crate) fn shutdown(&mut self) {
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

/// Whether `node` still has a part in `cs`. During a joint change the outgoing
/// voters (and the learners to be) still count: removing the replica then
/// would take a vote the old majority still needs.
fn is_member(cs: &ConfState, node: u64) -> bool {
    cs.voters.contains(&node)
        || cs.learners.contains(&node)
        || cs.voters_outgoing.contains(&node)
        || cs.learners_next.contains(&node)
}

/// Splits outgoing messages: snapshots take their own path, the rest are
/// grouped per destination node.
fn route(outbox: &mut BTreeMap<u64, Vec<ShardMsg>>, shard: u64, msgs: Vec<Message>, snaps: &mut Vec<(u64, Message)>) {
    for msg in msgs {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            snaps.push((shard, msg));
        } else {
            outbox.entry(msg.to).or_default().push(ShardMsg { shard, msg });
        }
    }
}

fn answer(p: Pending, outcome: EntryOutcome) {
    match outcome {
        EntryOutcome::Command { results, .. } => {
            let mut it = results.into_iter();
            for (reply, n) in p.parts {
                let _ = reply.send(Ok(it.by_ref().take(n).collect()));
            }
        }
        EntryOutcome::Rejected(e) => {
            for (reply, n) in p.parts {
                let _ = reply.send(Ok(vec![Err(e.clone()); n]));
            }
        }
        // Applied before (via a snapshot): the results are not known here.
        EntryOutcome::AlreadyApplied | EntryOutcome::Applied => {
            for (reply, _) in p.parts {
                let _ = reply.send(Err(ClusterError::Timeout {
                    shard: p.shard,
                    what: "proposal (applied by snapshot, result unknown)",
                    waited_ms: ms_since(p.proposed_at),
                }));
            }
        }
    }
}

/// Cached log entries are needed until applied here and, on a leader, until
/// every follower has them; older ones are read from disk if ever needed.
fn trim_entry_cache(r: &mut Replica) {
    let raft = &r.raw.raft;
    let mut keep_from = raft.raft_log.applied + 1;
    if raft.state == StateRole::Leader {
        for (_, p) in raft.prs().iter() {
            keep_from = keep_from.min(p.matched + 1);
        }
    }
    r.raw.store().trim_entry_cache(keep_from);
}

fn release_reads(r: &mut Replica) {
    let applied = r.raw.raft.raft_log.applied;
    let mut i = 0;
    while i < r.reads_ready.len() {
        if r.reads_ready.get(i).is_some_and(|(idx, _)| *idx <= applied) {
            let (_, ws) = r.reads_ready.swap_remove(i);
            for w in ws {
                let _ = w.reply.send(Ok(()));
            }
        } else {
            i += 1;
        }
    }
}

fn expire_queued(shard: u64, r: &mut Replica, now: Instant) {
    let leader = r.raw.raft.leader_id;
    let mut keep = VecDeque::with_capacity(r.queued.len());
    for q in r.queued.drain(..) {
        if q.deadline <= now {
            let _ = q.reply.send(Err(ClusterError::NoLeader {
                shard,
                waited_ms: ms_since(q.queued_at),
            }));
        } else {
            keep.push_back(q);
        }
    }
    r.queued = keep;
    let timeout = |w: ReadWaiter, what: &'static str| {
        let err = if leader == 0 {
            ClusterError::NoLeader {
                shard,
                waited_ms: ms_since(w.queued_at),
            }
        } else {
            ClusterError::Timeout {
                shard,
                what,
                waited_ms: ms_since(w.queued_at),
            }
        };
        let _ = w.reply.send(Err(err));
    };
    let expire = |ws: &mut Vec<ReadWaiter>| {
        let (old, new): (Vec<_>, Vec<_>) = ws.drain(..).partition(|w| w.deadline <= now);
        *ws = new;
        old.into_iter().for_each(|w| timeout(w, "read index"));
    };
    expire(&mut r.reads_queued);
    r.reads_inflight.iter_mut().for_each(|read| expire(&mut read.waiters));
    r.reads_inflight.retain(|read| !read.waiters.is_empty());
    r.reads_ready.iter_mut().for_each(|(_, ws)| expire(ws));
    r.reads_ready.retain(|(_, ws)| !ws.is_empty());
}

fn fail_all(shard: u64, mut r: Replica, err: impl Fn(u64) -> ClusterError) {
    for q in r.queued.drain(..) {
        let _ = q.reply.send(Err(err(shard)));
    }
    for w in r.reads_queued.drain(..) {
        let _ = w.reply.send(Err(err(shard)));
    }
    let inflight = r.reads_inflight.drain(..).map(|read| read.waiters);
    for ws in inflight.chain(r.reads_ready.drain(..).map(|(_, ws)| ws)) {
        for w in ws {
            let _ = w.reply.send(Err(err(shard)));
        }
    }
}

/// A shard may sleep when nothing is in flight: no queued work, the log fully
/// committed and applied, and (for a leader) every follower caught up.
fn is_quiet(r: &Replica) -> bool {
    if !r.queued.is_empty() || !r.reads_queued.is_empty() || !r.reads_inflight.is_empty() || !r.reads_ready.is_empty() {
        return false;
    }
    let raft = &r.raw.raft;
    let log = &raft.raft_log;
    if log.committed != log.last_index() || log.applied != log.committed {
        return false;
    }
    match raft.state {
        StateRole::Leader => {
            raft.lead_transferee.is_none()
                && !raft.has_pending_conf()
                && raft.read_only.pending_read_count() == 0
                && raft.prs().iter().all(|(id, p)| {
                    // With skip_bcast_commit a follower learns the commit
                    // index from the next heartbeat; its answer reports it.
                    p.matched == log.last_index() && (*id == raft.id || p.committed_index >= log.committed)
                })
        }
        StateRole::Follower => raft.leader_id != 0,
        StateRole::Candidate | StateRole::PreCandidate => false,
    }
}

/// Hands leadership back to the shard's preferred node once it is a caught-up
/// voter and alive, so leaders stay spread after failovers.
fn maybe_rebalance(node_id: u64, r: &mut Replica, peers: &BTreeMap<u64, PeerLiveness>) {
    let raft = &r.raw.raft;
    let pref = r.preferred_leader;
    if raft.state != StateRole::Leader || pref == node_id || pref == 0 || raft.lead_transferee.is_some() {
        return;
    }
    if !raft.prs().conf().voters().contains(pref) || peers.get(&pref).is_none_or(|p| p.down) {
        return;
    }
    let caught_up = raft
        .prs()
        .get(pref)
        .is_some_and(|p| p.matched == raft.raft_log.last_index());
    if caught_up {
        r.raw.transfer_leader(pref);
    }
}
