//! An in-process transport for tests and benchmarks: every node in one
//! process, messages handed straight to the receiver's inbox, through a chain
//! of filters that can drop, delay, partition and isolate (the shape of
//! TiKV's `transport_simulate.rs`).
//!
//! Snapshots take the same path as in production: the sender exports chunks
//! from its engine and the receiver spools them to disk before its driver
//! sees anything. Filters apply to snapshots too, so a partition blocks them.

use super::{Envelope, NodeInbox, SnapshotJob, Transport};
use crossbeam_channel::{unbounded, Sender};
use pigeonhole_engine::EngineError;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// What a filter decides for one envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on (to the next filter, then the receiver).
    Pass,
    /// Lose it.
    Drop,
    /// Deliver it this much later.
    Delay(Duration),
}

/// One link in the filter chain.
pub trait Filter: Send + Sync + std::fmt::Debug {
    /// The fate of an envelope from `from` to `to` (`snapshot`: a snapshot stream).
    fn check(&self, from: u64, to: u64, snapshot: bool) -> Verdict;

    /// May remove single messages from an envelope that passed `check`.
    fn filter_msgs(&self, _from: u64, _to: u64, _msgs: &mut Vec<super::ShardMsg>) {}

    /// May drop a snapshot stream of `shard` that passed `check`.
    fn drops_snapshot_of(&self, _from: u64, _to: u64, _shard: u64) -> bool {
        false
    }
}

/// Cuts every link between the two sides (both directions).
#[derive(Debug, Clone)]
pub struct Partition {
    /// One side.
    pub a: HashSet<u64>,
    /// The other side.
    pub b: HashSet<u64>,
}

impl Partition {
    /// Splits `a` from `b`.
    pub fn new(a: &[u64], b: &[u64]) -> Self {
        Partition {
            a: a.iter().copied().collect(),
            b: b.iter().copied().collect(),
        }
    }
}

impl Filter for Partition {
    fn check(&self, from: u64, to: u64, _: bool) -> Verdict {
        let cut = (self.a.contains(&from) && self.b.contains(&to)) || (self.b.contains(&from) && self.a.contains(&to));
        if cut {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

/// Cuts one node off from everyone.
#[derive(Debug, Clone, Copy)]
pub struct Isolate(pub u64);

impl Filter for Isolate {
    fn check(&self, from: u64, to: u64, _: bool) -> Verdict {
        if from == self.0 || to == self.0 {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

/// Drops a fraction of envelopes on every link.
#[derive(Debug, Clone, Copy)]
pub struct DropRate {
    /// Percent dropped, 0..=100.
    pub percent: u32,
}

impl Filter for DropRate {
    fn check(&self, _: u64, _: u64, _: bool) -> Verdict {
        if rand::thread_rng().gen_range(0..100) < self.percent {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

/// Delays every envelope on every link by a fixed time (order is kept).
#[derive(Debug, Clone, Copy)]
pub struct Delay(pub Duration);

impl Filter for Delay {
    fn check(&self, _: u64, _: u64, _: bool) -> Verdict {
        Verdict::Delay(self.0)
    }
}

/// Drops every snapshot stream (to test that a follower waits for one).
#[derive(Debug, Clone, Copy)]
pub struct DropSnapshots;

impl Filter for DropSnapshots {
    fn check(&self, _: u64, _: u64, snapshot: bool) -> Verdict {
        if snapshot {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

/// Drops raft messages of the given types sent to one node (e.g. MsgAppend:
/// the node still hears heartbeats and ReadIndex answers, but gets no
/// entries, so its apply falls behind its known commit index).
#[derive(Debug, Clone)]
pub struct DropMessageTypes {
    /// The receiving node.
    pub to: u64,
    /// The types dropped.
    pub types: Vec<pigeonhole_engine::raft::eraftpb::MessageType>,
}

impl Filter for DropMessageTypes {
    fn check(&self, _: u64, _: u64, _: bool) -> Verdict {
        Verdict::Pass
    }

    fn filter_msgs(&self, _from: u64, to: u64, msgs: &mut Vec<super::ShardMsg>) {
        if to == self.to {
            msgs.retain(|m| !self.types.contains(&m.msg.get_msg_type()));
        }
    }
}

/// Drops every raft message and snapshot of one shard, or of every data
/// shard, to and from one node: the node keeps hearing the rest (its
/// metadata replica stays current) while its replicas of those shards hear
/// nothing.
#[derive(Debug, Clone, Copy)]
pub struct CutShard {
    /// The node cut off.
    pub node: u64,
    /// The shard whose traffic is dropped; `None`: every data shard (all
    /// but the metadata group).
    pub shard: Option<u64>,
}

impl CutShard {
    fn cuts(&self, from: u64, to: u64, shard: u64) -> bool {
        (from == self.node || to == self.node)
            && match self.shard {
                Some(s) => shard == s,
                None => shard != crate::placement::META_SHARD,
            }
    }
}

impl Filter for CutShard {
    fn check(&self, _: u64, _: u64, _: bool) -> Verdict {
        Verdict::Pass
    }

    fn filter_msgs(&self, from: u64, to: u64, msgs: &mut Vec<super::ShardMsg>) {
        msgs.retain(|m| !self.cuts(from, to, m.shard));
    }

    fn drops_snapshot_of(&self, from: u64, to: u64, shard: u64) -> bool {
        self.cuts(from, to, shard)
    }
}

/// Counts of what the router did, for tests that assert on traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStats {
    /// Envelopes handed to an inbox.
    pub delivered: u64,
    /// Envelopes dropped by a filter, a missing node or a full inbox.
    pub dropped: u64,
    /// Raft messages (not envelopes) delivered.
    pub messages: u64,
    /// Snapshot streams completed.
    pub snapshots: u64,
}

#[derive(Debug, Default)]
struct RouterState {
    nodes: RwLock<HashMap<u64, NodeInbox>>,
    filters: RwLock<Vec<(u64, Arc<dyn Filter>)>>,
    next_filter: Mutex<u64>,
    stats: Mutex<RouterStats>,
    /// Snapshot streams still running (each holds an engine open).
    snapshots_in_flight: std::sync::atomic::AtomicUsize,
}

/// The in-process network. Clone it; every clone is the same network.
#[derive(Debug, Clone)]
pub struct Router {
    state: Arc<RouterState>,
    delayed: Sender<(Instant, Envelope)>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Router {
    /// An empty network.
    pub fn new() -> Self {
        let state = Arc::new(RouterState::default());
        let (tx, rx) = unbounded::<(Instant, Envelope)>();
        let weak = Arc::downgrade(&state);
        // One thread delivers delayed envelopes in order; it ends when the
        // router is gone.
        std::thread::Builder::new()
            .name("router-delay".into())
            .spawn(move || {
                while let Ok((at, env)) = rx.recv() {
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    let Some(state) = weak.upgrade() else { return };
                    Router::deliver_now(&state, env);
                }
            })
            .ok();
        Router { state, delayed: tx }
    }

    /// The transport for node `id`.
    pub fn transport(&self, id: u64) -> Arc<LocalTransport> {
        Arc::new(LocalTransport {
            router: self.clone(),
            node_id: id,
        })
    }

    /// Connects a node's inbox (again, after a restart).
    pub fn register(&self, inbox: NodeInbox) {
        write(&self.state.nodes).insert(inbox.node_id, inbox);
    }

    /// Disconnects a node (it is down: everything sent to it is lost).
    pub fn unregister(&self, id: u64) {
        write(&self.state.nodes).remove(&id);
    }

    /// Adds a filter; returns its handle for [`Router::remove_filter`].
    pub fn add_filter(&self, f: impl Filter + 'static) -> u64 {
        let mut n = self.state.next_filter.lock().unwrap_or_else(PoisonError::into_inner);
        *n += 1;
        write(&self.state.filters).push((*n, Arc::new(f)));
        *n
    }

    /// Removes one filter.
    pub fn remove_filter(&self, handle: u64) {
        write(&self.state.filters).retain(|(h, _)| *h != handle);
    }

    /// Removes every filter (heals the network).
    pub fn clear_filters(&self) {
        write(&self.state.filters).clear();
    }

    /// Waits (up to `timeout`) until no snapshot stream is running, so a
    /// harness can be sure no thread still holds an engine. Returns whether
    /// they all ended.
    pub fn wait_snapshots(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self
            .state
            .snapshots_in_flight
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
        {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Traffic counters so far.
    pub fn stats(&self) -> RouterStats {
        *self.state.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn verdict(&self, from: u64, to: u64, snapshot: bool) -> Verdict {
        let mut delay = Duration::ZERO;
        for (_, f) in read(&self.state.filters).iter() {
            match f.check(from, to, snapshot) {
                Verdict::Pass => {}
                Verdict::Drop => return Verdict::Drop,
                Verdict::Delay(d) => delay += d,
            }
        }
        if delay.is_zero() {
            Verdict::Pass
        } else {
            Verdict::Delay(delay)
        }
    }

    fn count(&self, f: impl FnOnce(&mut RouterStats)) {
        f(&mut self.state.stats.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn deliver_now(state: &RouterState, env: Envelope) {
        let n = env.msgs.len() as u64;
        let ok = read(&state.nodes)
            .get(&env.to)
            .is_some_and(|inbox| inbox.deliver(env).unwrap_or(false));
        let mut s = state.stats.lock().unwrap_or_else(PoisonError::into_inner);
        if ok {
            s.delivered += 1;
            s.messages += n;
        } else {
            s.dropped += 1;
        }
    }

    fn route(&self, mut env: Envelope) {
        for (_, f) in read(&self.state.filters).iter() {
            f.filter_msgs(env.from, env.to, &mut env.msgs);
        }
        match self.verdict(env.from, env.to, false) {
            Verdict::Pass => Router::deliver_now(&self.state, env),
            Verdict::Drop => self.count(|s| s.dropped += 1),
            Verdict::Delay(d) => {
                let _ = self.delayed.send((Instant::now() + d, env));
            }
        }
    }

    fn stream_snapshot(&self, job: &SnapshotJob, msg: pigeonhole_engine::raft::eraftpb::Message) -> Result<(), String> {
        if self.verdict(job.from, job.to, true) == Verdict::Drop
            || read(&self.state.filters)
                .iter()
                .any(|(_, f)| f.drops_snapshot_of(job.from, job.to, job.shard))
        {
            return Err("dropped by a filter".into());
        }
        let inbox = read(&self.state.nodes)
            .get(&job.to)
            .cloned()
            .ok_or_else(|| format!("node {} is not connected", job.to))?;
        let mut w = inbox.begin_snapshot(job.from, job.shard).map_err(|e| e.to_string())?;
        job.engine
            .export_snapshot(job.shard, job.chunk_bytes, |chunk| {
                let bytes = chunk.encode();
                let n = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                job.rate.acquire(n);
                job.sent_bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                w.write_chunk(&bytes)
                    .map_err(|e| EngineError::InvalidCall(format!("spool: {e}")))
            })
            .map_err(|e| e.to_string())?;
        // A partition that started mid-stream loses the stream.
        if self.verdict(job.from, job.to, true) == Verdict::Drop {
            return Err("dropped by a filter".into());
        }
        match inbox.snapshot_ready(w, msg) {
            Ok(true) => Ok(()),
            Ok(false) => Err("receiver inbox full or gone".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// One node's handle on the [`Router`].
#[derive(Debug)]
pub struct LocalTransport {
    router: Router,
    node_id: u64,
}

impl Transport for LocalTransport {
    fn send(&self, env: Envelope) {
        debug_assert_eq!(env.from, self.node_id);
        self.router.route(env);
    }

    fn send_snapshot(&self, job: SnapshotJob) {
        let router = self.router.clone();
        router
            .state
            .snapshots_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        // Export reads the whole shard: keep it off the driver's thread.
        std::thread::spawn(move || {
            let mut job = job;
            let msg = std::mem::take(&mut job.msg);
            let res = router.stream_snapshot(&job, msg);
            if res.is_ok() {
                router.count(|s| s.snapshots += 1);
            }
            let report = std::mem::replace(&mut job.report, Box::new(|_| {}));
            report(res.is_ok());
            drop(job);
            router
                .state
                .snapshots_in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
    }
}
