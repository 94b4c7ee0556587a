//! A running node: the handle the serving layer (and tests) call.
//!
//! [`Node::start`] (in `start`) opens the engine, bootstraps this node's
//! replicas on first start (from the static initial cluster, as etcd does),
//! and starts the driver threads (`driver::pool`). Every call goes through
//! the bounded inbox of its shard's driver; a full inbox is a retryable
//! `Overloaded`, never a blocked caller.

use crate::driver::{Inbound, ProposeResult, ShardStatus};
use crate::error::ClusterError;
use crate::nodes::{NodeState, NodeStateEntry, NODE_RECORD_PREFIX};
use crate::placement::{ShardMap, META_SHARD, SHARD_RECORD_PREFIX};
use crate::transport::NodeInbox;
use crate::watch::Watchers;
use crossbeam_channel::TrySendError;
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState};
use pigeonhole_engine::Engine;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

mod placement;
pub use placement::PlacementChange;
mod start;
pub use start::BOOTSTRAP_INDEX;
pub(crate) use start::{check_identity, identity_shard_count, write_durably};
mod weak;
pub use weak::WeakNode;

/// The raft-rs conf change of `changes` (several go through a joint
/// configuration, which the group leaves by itself).
pub(crate) fn conf_change_v2(changes: &[MembershipChange]) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    for c in changes {
        let (t, node) = match *c {
            MembershipChange::AddLearner(n) => (ConfChangeType::AddLearnerNode, n),
            MembershipChange::AddVoter(n) => (ConfChangeType::AddNode, n),
            MembershipChange::Remove(n) => (ConfChangeType::RemoveNode, n),
        };
        let mut s = ConfChangeSingle::default();
        s.set_change_type(t);
        s.node_id = node;
        cc.mut_changes().push(s);
    }
    cc
}

/// A membership change of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a non-voting replica on the node (it catches up by snapshot).
    AddLearner(u64),
    /// Make the node a voter (a learner is promoted).
    AddVoter(u64),
    /// Remove the node's replica.
    Remove(u64),
}

struct NodeInner {
    id: u64,
    cluster_id: u64,
    engine: Engine,
    map: Arc<ShardMap>,
    routing: Arc<crate::placement::Routing>,
    drivers: Arc<crate::driver::pool::Drivers>,
    inbox: NodeInbox,
    /// The driver threads; empty once stopped.
    threads: Mutex<Vec<JoinHandle<Result<(), ClusterError>>>>,
    request_timeout: Duration,
    inbox_capacity: usize,
    ops_per_entry_max: usize,
    entry_bytes_max: usize,
    watchers: Arc<Watchers>,
    counters: Arc<crate::driver::DriverCounters>,
    bootstrap: crate::config::BootstrapParams,
}

impl Drop for NodeInner {
    /// The last handle going away stops the driver and waits for it, so no
    /// thread is left inside RocksDB when the engine (or the process) ends.
    fn drop(&mut self) {
        let handles = std::mem::take(self.threads.get_mut().unwrap_or_else(PoisonError::into_inner));
        if !handles.is_empty() {
            self.drivers.stop_all();
            for h in handles {
                let _ = h.join();
            }
        }
    }
}

/// A running node. Clones share it; dropping the last one stops it.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// This node's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The cluster id frames are checked against.
    pub fn cluster_id(&self) -> u64 {
        self.inner.cluster_id
    }

    /// The storage engine (for reads after [`Node::read_barrier`], and for
    /// stale reads).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The shard map as this node's replica of the metadata group has it:
    /// the bootstrap layout with every replicated change laid over it
    /// (membership, leader hints, splits), and the splits this node has
    /// applied whose records it has not seen yet (the driver's map,
    /// `Node::routing`, is the base). A local, possibly slightly stale read:
    /// leader hints are hints, and a request sent to a former leader is
    /// forwarded or answered with a retryable error.
    pub fn shard_map(&self) -> Result<ShardMap, ClusterError> {
        let limit = usize::try_from(crate::config::SHARD_COUNT_MAX).unwrap_or(usize::MAX);
        let records = self.meta_scan(SHARD_RECORD_PREFIX, limit)?;
        let mut map = self.routing().overlay(&records);
        let states = self.node_states()?;
        for (node, address) in crate::nodes::joined_addresses(&states) {
            map.nodes.entry(node).or_insert_with(|| address.to_string());
        }
        Ok(map)
    }

    /// System values of the metadata group under `prefix`, from this node's
    /// replica. A node without one (a removed node, whose replica was
    /// deleted) answers `NotReplica`, which clients treat as "ask another
    /// node", not as a failure of the request.
    pub(crate) fn meta_scan(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<pigeonhole_engine::SystemValue>, ClusterError> {
        match self.inner.engine.system_scan(META_SHARD, prefix, limit) {
            Err(pigeonhole_engine::EngineError::NoSuchShard(_)) => Err(ClusterError::NotReplica {
                shard: META_SHARD,
                node: self.inner.id,
                replicas: Vec::new(),
            }),
            other => Ok(other?),
        }
    }

    /// Node states as this node's replica of the metadata group has them
    /// (a local read, like [`Node::shard_map`]); nodes without a record are
    /// up and are not listed.
    pub fn node_states(&self) -> Result<BTreeMap<u64, NodeStateEntry>, ClusterError> {
        let records = self.meta_scan(NODE_RECORD_PREFIX, crate::nodes::NODES_MAX)?;
        Ok(crate::nodes::decode_states(&records))
    }

    /// `node`'s state (up if it has no record).
    pub fn node_state(&self, node: u64) -> Result<NodeState, ClusterError> {
        Ok(self.node_states()?.get(&node).map_or(NodeState::Up, |e| e.state))
    }

    /// What this node was bootstrapped from (a joining node is handed it).
    pub fn bootstrap_params(&self) -> &crate::config::BootstrapParams {
        &self.inner.bootstrap
    }

    /// Sets `node`'s state through the metadata group, after a read barrier
    /// so that the rules ([`crate::nodes::check_transition`]) see every
    /// earlier change. Returns (previous, new). The write applies only over
    /// the record the rules were checked against (`if_version`): of two
    /// concurrent calls for one node, the second fails with a retryable
    /// `Busy` and is checked again when retried.
    pub async fn set_node_state(&self, node: u64, state: NodeState) -> Result<(NodeState, NodeState), ClusterError> {
        self.change_node_state(node, state, false).await
    }

    /// [`Node::set_node_state`]; with `leaders_only` and DRAINING, the
    /// placement loop leaves the node's replicas where they are (a drain of
    /// leaderships for a restart). A full drain over a leaders-only one (or
    /// back) rewrites the record.
    pub async fn change_node_state(
        &self,
        node: u64,
        state: NodeState,
        leaders_only: bool,
    ) -> Result<(NodeState, NodeState), ClusterError> {
        if !self.shard_map()?.nodes.contains_key(&node) {
            return Err(ClusterError::InvalidArgument {
                field: "node",
                reason: format!("node {node} is not in the cluster"),
            });
        }
        if state == NodeState::Unspecified {
            return Err(ClusterError::InvalidArgument {
                field: "state",
                reason: "must be UP, DRAINING or REMOVED".into(),
            });
        }
        self.read_barrier(META_SHARD).await?;
        let current = self.node_states()?.get(&node).cloned().unwrap_or_default();
        crate::nodes::check_transition(&self.shard_map()?, node, current.state, state)
            .map_err(|reason| ClusterError::Refused { reason })?;
        let keep_replicas = leaders_only && state == NodeState::Draining;
        if current.state == state && current.keep_replicas == keep_replicas {
            return Ok((state, state));
        }
        let next = crate::nodes::NodeStateEntry {
            keep_replicas,
            ..current.clone()
        };
        let op = cmd::Op {
            op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                key: crate::nodes::node_record_key(node),
                value: crate::nodes::encode_record(node, state, &next),
                version: current.version.saturating_add(1),
                // Only over the record the rules were checked against.
                if_version: Some(current.version),
            })),
        };
        self.propose_meta_cas(op, &format!("node {node}'s record")).await?;
        Ok((current.state, state))
    }

    /// Makes this node's record say `zone` (its `--zone`; empty: none), after
    /// a read barrier on the metadata group, over the record it read
    /// (`if_version`). Returns whether it wrote. A node with no record and
    /// no zone writes nothing; a removed node is left alone.
    pub async fn record_zone(&self, zone: &str) -> Result<bool, ClusterError> {
        crate::nodes::check_zone(zone).map_err(|reason| ClusterError::InvalidArgument { field: "zone", reason })?;
        self.read_barrier(META_SHARD).await?;
        let node = self.inner.id;
        let current = self.node_states()?.get(&node).cloned().unwrap_or_default();
        if current.zone == zone || current.state == NodeState::Removed {
            return Ok(false);
        }
        let entry = crate::nodes::NodeStateEntry {
            zone: zone.to_string(),
            ..current.clone()
        };
        let op = cmd::Op {
            op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                key: crate::nodes::node_record_key(node),
                value: crate::nodes::encode_record(node, current.state, &entry),
                version: current.version.saturating_add(1),
                if_version: Some(current.version),
            })),
        };
        self.propose_meta_cas(op, &format!("node {node}'s record")).await?;
        Ok(true)
    }

    /// Records `node` as the preferred leader of `shard` in the metadata
    /// group (after a read barrier there, so the checks see every earlier
    /// change): the shard's leader then hands leadership to it within a
    /// rebalance round. `node` must be an up voter of the shard.
    pub async fn set_preferred_leader(&self, shard: u64, node: u64) -> Result<(), ClusterError> {
        self.read_barrier(META_SHARD).await?;
        let map = self.shard_map()?;
        let Some(desc) = map.shard(shard) else {
            return Err(ClusterError::NoSuchShard {
                shard,
                first: map.shards.first().map_or(0, |s| s.id),
                last: map.shards.last().map_or(0, |s| s.id),
            });
        };
        if !desc.replicas.contains(&node) {
            return Err(ClusterError::InvalidArgument {
                field: "node",
                reason: format!(
                    "node {node} is not a voter of shard {shard} (voters {:?})",
                    desc.replicas
                ),
            });
        }
        let state = self.node_state(node)?;
        if !crate::nodes::takes_new_work(state) {
            return Err(ClusterError::Refused {
                reason: format!(
                    "node {node} is {}: it takes no new leadership",
                    crate::nodes::state_name(state)
                ),
            });
        }
        let key = crate::placement::preferred_leader_key(shard);
        let version = self.meta_scan(&key, 1)?.first().map_or(0, |v| v.version);
        let op = cmd::Op {
            op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                key,
                value: node.to_be_bytes().to_vec(),
                version: version.saturating_add(1),
                if_version: Some(version),
            })),
        };
        self.propose_meta_cas(op, &format!("shard {shard}'s preferred leader"))
            .await
    }

    /// Proposes one compare-and-set write to the metadata group. A write
    /// whose version check failed (a concurrent writer got in first) is
    /// BUSY, retryable: the caller reads again and re-checks its rules.
    pub(crate) async fn propose_meta_cas(&self, op: cmd::Op, what: &str) -> Result<(), ClusterError> {
        match self.propose(META_SHARD, vec![op]).await?.into_iter().next() {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(ClusterError::Busy {
                shard: META_SHARD,
                reason: format!("{what} changed meanwhile ({e}); retry"),
            }),
            None => Err(ClusterError::Raft("a proposal of one op returned no result".into())),
        }
    }

    /// The map every node derived at bootstrap (no replicated changes).
    pub fn bootstrap_map(&self) -> &ShardMap {
        &self.inner.map
    }

    /// The map requests are routed by here: the bootstrap map with the
    /// shard records and this node's own splits laid over it (kept by the
    /// driver; cheap, no read).
    pub fn routing(&self) -> Arc<ShardMap> {
        self.inner.routing.get()
    }

    /// The leader of `shard` as its replica here last heard (0: none, or no
    /// replica here). A hint for clients, not a promise.
    pub fn leader_hint(&self, shard: u64) -> u64 {
        self.inner.routing.leader(shard)
    }

    /// The registry of waiting readers: a long-poll or Subscribe stream
    /// registers the mailboxes it follows and is woken when apply changes
    /// one of them, or when a shard of them loses its leader here.
    pub fn watchers(&self) -> &Arc<Watchers> {
        &self.inner.watchers
    }

    /// Counts the driver keeps since start (NodeStatus reports them).
    pub fn counters(&self) -> &crate::driver::DriverCounters {
        &self.inner.counters
    }

    /// Limits a request must fit in (ops, bytes) to be proposed whole.
    pub fn entry_limits(&self) -> (usize, usize) {
        (self.inner.ops_per_entry_max, self.inner.entry_bytes_max)
    }

    /// Where transports deliver inbound traffic.
    pub fn inbox(&self) -> NodeInbox {
        self.inner.inbox.clone()
    }

    /// Sends the request `make` builds around a reply channel, and waits
    /// for the driver's answer.
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ClusterError>>) -> Inbound,
    ) -> Result<T, ClusterError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| ClusterError::Stopped)?
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.request_timeout
    }

    /// The earlier of the caller's deadline and the node's own request
    /// timeout: a caller can shorten the wait, never lengthen it.
    fn deadline_until(&self, until: Option<Instant>) -> Instant {
        let own = self.deadline();
        until.map_or(own, |u| u.min(own))
    }

    fn send(&self, m: Inbound) -> Result<(), ClusterError> {
        self.inner.drivers.try_send(m).map_err(|e| match e {
            TrySendError::Full(_) => ClusterError::Overloaded {
                node: self.inner.id,
                capacity: self.inner.inbox_capacity,
            },
            TrySendError::Disconnected(_) => ClusterError::Stopped,
        })
    }

    /// Replicates `ops` on `shard` and returns one result per op, after the
    /// entry is committed on a majority (each fsync'd) and applied here.
    /// Works on any replica: a follower's proposal goes to the leader.
    pub async fn propose(&self, shard: u64, ops: Vec<cmd::Op>) -> ProposeResult {
        self.propose_until(shard, ops, None).await
    }

    /// [`Node::propose`] that gives up at `until` (a client's deadline), or
    /// at the node's request timeout if that comes first. Giving up answers
    /// `Timeout`: the entry may still commit, which is why writes carry
    /// idempotency keys.
    pub async fn propose_until(&self, shard: u64, ops: Vec<cmd::Op>, until: Option<Instant>) -> ProposeResult {
        // One request must fit one Raft entry: it is never split, so an
        // oversized one is refused here, naming the limit.
        if ops.len() > self.inner.ops_per_entry_max {
            return Err(ClusterError::InvalidArgument {
                field: "ops",
                reason: format!(
                    "{} ops in one request; the limit is {}",
                    ops.len(),
                    self.inner.ops_per_entry_max
                ),
            });
        }
        let bytes: usize = ops.iter().map(prost::Message::encoded_len).sum();
        if bytes > self.inner.entry_bytes_max {
            return Err(ClusterError::InvalidArgument {
                field: "ops",
                reason: format!(
                    "{bytes} bytes in one request; the limit is {}",
                    self.inner.entry_bytes_max
                ),
            });
        }
        let deadline = self.deadline_until(until);
        let stages = crate::stages::current();
        crate::stages::stamp(stages.as_ref(), crate::stages::Stage::Sent);
        let call = self.call(|reply| Inbound::Propose {
            shard,
            ops,
            reply,
            deadline,
            stages,
        });
        within(shard, "proposal", until, call).await
    }

    /// Waits until this replica has applied everything committed before the
    /// call (ReadIndex, confirmed by a quorum): a read of the engine after it
    /// returns is linearizable.
    pub async fn read_barrier(&self, shard: u64) -> Result<(), ClusterError> {
        self.read_barrier_until(shard, None).await
    }

    /// [`Node::read_barrier`] that gives up at `until` or at the node's
    /// request timeout, whichever comes first.
    pub async fn read_barrier_until(&self, shard: u64, until: Option<Instant>) -> Result<(), ClusterError> {
        let deadline = self.deadline_until(until);
        let call = self.call(|reply| Inbound::Read { shard, reply, deadline });
        within(shard, "read index", until, call).await
    }

    /// Changes the replicas of `shard` (call on its leader). Returns the new
    /// configuration once the change is applied here.
    pub async fn change_membership(&self, shard: u64, changes: &[MembershipChange]) -> Result<ConfState, ClusterError> {
        let cc = conf_change_v2(changes);
        let deadline = self.deadline();
        self.call(|reply| Inbound::ConfChange {
            shard,
            cc,
            reply,
            deadline,
        })
        .await
    }

    /// Asks the leader of `shard` (this node) to hand leadership to `to`.
    /// Returns once the request is made; watch [`Node::status`] for the result.
    pub async fn transfer_leader(&self, shard: u64, to: u64) -> Result<(), ClusterError> {
        self.call(|reply| Inbound::TransferLeader { shard, to, reply }).await
    }

    /// Starts an election for `shard` on this node.
    pub async fn campaign(&self, shard: u64) -> Result<(), ClusterError> {
        self.call(|reply| Inbound::Campaign { shard, reply }).await
    }

    /// Clears the catching-up mark of this node's replica of `shard`
    /// (D49), accepting that writes it lost may be lost; answers why it
    /// was set.
    pub async fn accept_replica_loss(&self, shard: u64) -> Result<String, ClusterError> {
        self.call(|reply| Inbound::AcceptReplicaLoss { shard, reply }).await
    }

    /// The state of every replica on this node.
    pub async fn status(&self) -> Result<Vec<ShardStatus>, ClusterError> {
        // Each driver reports its own replicas.
        let mut answers = Vec::with_capacity(self.inner.drivers.count());
        for tx in self.inner.drivers.inboxes() {
            let (reply, rx) = oneshot::channel();
            tx.try_send(Inbound::Status { reply }).map_err(|e| match e {
                TrySendError::Full(_) => ClusterError::Overloaded {
                    node: self.inner.id,
                    capacity: self.inner.inbox_capacity,
                },
                TrySendError::Disconnected(_) => ClusterError::Stopped,
            })?;
            answers.push(rx);
        }
        let mut all = Vec::new();
        for rx in answers {
            all.extend(rx.await.map_err(|_| ClusterError::Stopped)?);
        }
        all.sort_unstable_by_key(|s| s.shard);
        Ok(all)
    }

    /// Stops the drivers and waits for them. Waiting callers get
    /// `Stopped`. Answers the first driver's error, if any stopped on one.
    pub fn stop(&self) -> Result<(), ClusterError> {
        let handles = std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(PoisonError::into_inner));
        if handles.is_empty() {
            return Ok(());
        }
        // A full inbox cannot refuse Stop for long: the driver drains it.
        self.inner.drivers.stop_all();
        let mut result = Ok(());
        for h in handles {
            let res = h
                .join()
                .map_err(|_| ClusterError::Raft("driver thread panicked".into()))
                .and_then(|r| r);
            if result.is_ok() {
                result = res;
            }
        }
        result
    }

    /// Whether every driver thread is still running (one that stopped on
    /// an error stops the others).
    pub fn is_running(&self) -> bool {
        let threads = self.inner.threads.lock().unwrap_or_else(PoisonError::into_inner);
        !threads.is_empty() && threads.iter().all(|h| !h.is_finished())
    }
}

/// Waits for `call` until `until`, to the millisecond. The driver checks its
/// own deadlines once per loop turn (up to a tick late), which is fine for
/// its cleanup but not for a client whose gRPC deadline is about to pass:
/// the caller's timer must fire first so it answers DEADLINE_EXCEEDED
/// itself. The request stays queued in the driver until its (equal)
/// deadline there, and may still commit: writes carry idempotency keys.
async fn within<T>(
    shard: u64,
    what: &'static str,
    until: Option<Instant>,
    call: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    let Some(until) = until else {
        return call.await;
    };
    let started = Instant::now();
    match tokio::time::timeout_at(until.into(), call).await {
        Ok(r) => r,
        Err(_) => Err(ClusterError::Timeout {
            shard,
            what,
            waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }),
    }
}
