//! The node's pool of Raft drivers (D65): which driver runs which shard,
//! and the routing of everything that arrives for the drivers.
//!
//! A node runs `driver_threads` drivers (TiKV's batch system: a fixed pool
//! of threads, each running many replicas). Each driver is a whole
//! [`super::Driver`] over the replicas it holds, with its own inbox, its
//! own group commit (one Raft log write and one fsync per turn) and its
//! own apply workers. A shard's replica lives on one driver for its whole
//! life on the node, so its Raft state is touched by one thread, as with
//! one driver.
//!
//! Ownership is a table, not a formula, because replicas come and go:
//! - at start, each shard the node holds goes to driver `shard % count`;
//! - a replica made later (a message from a leader, a received snapshot)
//!   is made by the driver the message was routed to, which first
//!   *claims* the shard here; a claim fails if another driver holds it, so
//!   two drivers can never both make a replica of one shard;
//! - a split's new shard is made by its parent's driver (the split is
//!   applied there), and a message for a shard this node does not hold is
//!   routed to the driver of its parent if this node holds the parent: that
//!   driver knows whether its parent replica will make it (`split`);
//! - the claim is dropped when the replica's data is deleted.
//!
//! Routing: requests naming a shard go to its driver; an envelope of Raft
//! messages is split by shard; an envelope with no messages (a node
//! heartbeat, which only driver 0 sends) goes to every driver, so each one
//! tracks its peers' liveness. Status is asked of every driver by the
//! node's handle; the placement loop's view of the driver of the metadata
//! shard.

use super::{Inbound, META_SHARD};
use crate::error::ClusterError;
use crate::placement::Routing;
use crate::transport::{Envelope, ShardMsg};
use crossbeam_channel::{Sender, TrySendError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

/// How far up a chain of splits `owner` looks for a held ancestor: a
/// message for a shard split from a shard split from one held here.
/// Chains longer than this are routed by the start rule.
const PARENT_HOPS_MAX: usize = 8;

/// One driver's replica gauges (`metrics::replicas` shows their sum).
#[derive(Debug, Clone, Copy, Default)]
struct Gauges {
    awake: usize,
    asleep: usize,
    apply_lag: u64,
}

/// The node's drivers: their inboxes and which shard each holds.
#[derive(Debug)]
pub(crate) struct Drivers {
    inboxes: Vec<Sender<Inbound>>,
    /// Shard → the driver holding its replica (from its creation until its
    /// data is deleted).
    owners: Mutex<HashMap<u64, usize>>,
    routing: Arc<Routing>,
    gauges: Mutex<Vec<Gauges>>,
}

impl Drivers {
    /// The pool over these inboxes (driver `i` reads `inboxes[i]`).
    pub(crate) fn new(inboxes: Vec<Sender<Inbound>>, routing: Arc<Routing>) -> Arc<Drivers> {
        let gauges = vec![Gauges::default(); inboxes.len()];
        Arc::new(Drivers {
            inboxes,
            owners: Mutex::new(HashMap::new()),
            routing,
            gauges: Mutex::new(gauges),
        })
    }

    /// How many drivers there are.
    pub(crate) fn count(&self) -> usize {
        self.inboxes.len()
    }

    /// The driver a replica the node holds at start goes to.
    pub(crate) fn start_owner(shard: u64, count: usize) -> usize {
        let count = u64::try_from(count.max(1)).unwrap_or(u64::MAX);
        usize::try_from(shard % count).unwrap_or(0)
    }

    /// The driver holding `shard`'s replica, if one does.
    pub(crate) fn holder(&self, shard: u64) -> Option<usize> {
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&shard)
            .copied()
    }

    /// The driver that gets what arrives for `shard`: its holder; else the
    /// holder of the nearest ancestor this node holds (that replica's split
    /// makes it); else the start rule.
    pub(crate) fn owner(&self, shard: u64) -> usize {
        if self.count() == 1 {
            return 0;
        }
        let owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = owners.get(&shard) {
            return *i;
        }
        let map = self.routing.get();
        let mut at = shard;
        for _ in 0..PARENT_HOPS_MAX {
            let Some(parent) = map.shard(at).map(|d| d.parent).filter(|p| *p != 0) else {
                break;
            };
            if let Some(i) = owners.get(&parent) {
                return *i;
            }
            at = parent;
        }
        Self::start_owner(shard, self.count())
    }

    /// Records that driver `index` holds `shard`'s replica. False if
    /// another driver holds it (the caller must not make one).
    pub(crate) fn claim(&self, shard: u64, index: usize) -> bool {
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        *owners.entry(shard).or_insert(index) == index
    }

    /// Like [`Drivers::claim`], but true only if no driver held `shard`
    /// before: the caller is to make its replica.
    pub(crate) fn claim_new(&self, shard: u64, index: usize) -> bool {
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if owners.contains_key(&shard) {
            return false;
        }
        owners.insert(shard, index);
        true
    }

    /// `shard`'s replica on driver `index` is gone (its data deleted).
    pub(crate) fn release(&self, shard: u64, index: usize) {
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if owners.get(&shard) == Some(&index) {
            owners.remove(&shard);
        }
    }

    /// Driver `index`'s inbox.
    pub(crate) fn inbox(&self, index: usize) -> Option<&Sender<Inbound>> {
        self.inboxes.get(index)
    }

    /// Every driver's inbox.
    pub(crate) fn inboxes(&self) -> &[Sender<Inbound>] {
        &self.inboxes
    }

    /// Queues `m` for the driver it is for, without blocking. An envelope
    /// goes through [`Drivers::deliver`]; `Stop` and `Status` are sent to
    /// each driver by their callers (a status has one answer per driver).
    /// A refused request is dropped, and its reply with it.
    pub(crate) fn try_send(&self, m: Inbound) -> Result<(), TrySendError<()>> {
        let index = match &m {
            Inbound::Propose { shard, .. }
            | Inbound::Read { shard, .. }
            | Inbound::ConfChange { shard, .. }
            | Inbound::TransferLeader { shard, .. }
            | Inbound::Campaign { shard, .. }
            | Inbound::AcceptReplicaLoss { shard, .. }
            | Inbound::SnapshotReady { shard, .. }
            | Inbound::SnapshotReport { shard, .. }
            | Inbound::SnapshotIngested { shard } => self.owner(*shard),
            Inbound::Placement { .. } => self.owner(META_SHARD),
            Inbound::Raft(_) | Inbound::Status { .. } | Inbound::Flushed { .. } | Inbound::Stop => 0,
        };
        match self.inboxes.get(index) {
            Some(tx) => tx.try_send(m).map_err(|e| match e {
                TrySendError::Full(_) => TrySendError::Full(()),
                TrySendError::Disconnected(_) => TrySendError::Disconnected(()),
            }),
            None => Err(TrySendError::Disconnected(())),
        }
    }

    /// Delivers an envelope of Raft messages: each message to its shard's
    /// driver, and an envelope with none (a node heartbeat) to every
    /// driver. Ok(false) if any driver's inbox was full (those messages are
    /// dropped: Raft tolerates loss); Err once a driver is gone.
    pub(crate) fn deliver(&self, env: Envelope) -> Result<bool, ClusterError> {
        let send = |tx: &Sender<Inbound>, env: Envelope| match tx.try_send(Inbound::Raft(env)) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(_)) => Ok(false),
            Err(TrySendError::Disconnected(_)) => Err(ClusterError::Stopped),
        };
        if self.count() == 1 || env.msgs.is_empty() {
            let mut all = true;
            let (from, to) = (env.from, env.to);
            let mut env = Some(env);
            for tx in &self.inboxes {
                let e = env.take().unwrap_or(Envelope {
                    from,
                    to,
                    msgs: Vec::new(),
                });
                all &= send(tx, e)?;
            }
            return Ok(all);
        }
        let mut parts: BTreeMap<usize, Vec<ShardMsg>> = BTreeMap::new();
        for m in env.msgs {
            parts.entry(self.owner(m.shard)).or_default().push(m);
        }
        let mut all = true;
        for (index, msgs) in parts {
            if let Some(tx) = self.inboxes.get(index) {
                all &= send(
                    tx,
                    Envelope {
                        from: env.from,
                        to: env.to,
                        msgs,
                    },
                )?;
            }
        }
        Ok(all)
    }

    /// Sends `Stop` to every driver, waiting for room in each inbox (a
    /// driver drains its inbox, so this does not wait for long).
    pub(crate) fn stop_all(&self) {
        for tx in &self.inboxes {
            let _ = tx.send(Inbound::Stop);
        }
    }

    /// Driver `index`'s replica gauges; publishes the node's sums.
    pub(crate) fn report_replicas(&self, index: usize, awake: usize, asleep: usize, apply_lag: u64) {
        let mut gauges = self.gauges.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(g) = gauges.get_mut(index) {
            *g = Gauges {
                awake,
                asleep,
                apply_lag,
            };
        }
        let sum = sum(&gauges);
        crate::metrics::replicas(sum.awake, sum.asleep, sum.apply_lag);
    }
}

/// The node's gauges: the sum of its drivers'.
fn sum(gauges: &[Gauges]) -> Gauges {
    gauges.iter().fold(Gauges::default(), |a, g| Gauges {
        awake: a.awake.saturating_add(g.awake),
        asleep: a.asleep.saturating_add(g.asleep),
        apply_lag: a.apply_lag.saturating_add(g.apply_lag),
    })
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
