//! The placement loop's two halves in the driver (the decisions are pure,
//! in `crate::moves`):
//! - on the metadata group's leader, every placement round: gather the
//!   inputs (the shard map from the metadata replica, node states and
//!   zones, which peers this node hears from, the move targets and the
//!   loop's settings), call [`moves::decide`] and propose its writes to the
//!   metadata group as one compare-and-set proposal, never two at once;
//! - on every node, every placement round: for each move in flight on a
//!   shard this node leads, take [`moves::next_step`] (a conf change or a
//!   leader transfer) straight into the Raft group.
//!
//! Nobody waits for an answer: each round reads the replicated state again,
//! so a lost proposal, a leader change or a restart only delays a step.
//! The same inputs answer `Admin.GetPlacement` ([`Driver::placement_view`]).

use super::replica::context;
use super::Driver;
use crate::config::SHARD_COUNT_MAX;
use crate::error::ClusterError;
use crate::moves::{self, Config, Decision, Inputs, LeaderView, MetaWrite, ShardView, Step, Target};
use crate::node::MembershipChange;
use crate::nodes::NodeState;
use crate::placement::{preferred_leader_key, META_SHARD, PREFERRED_LEADER_PREFIX, SHARD_RECORD_PREFIX};
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::raft::StateRole;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// What `Admin.GetPlacement` answers with.
#[derive(Debug, Clone)]
pub struct PlacementView {
    pub config: Config,
    pub decision: Decision,
    /// Data shards per node.
    pub load: BTreeMap<u64, NodeLoad>,
    /// Balance is by bytes, not replica count (`balance::by_bytes`).
    pub by_bytes: bool,
    /// This node leads the metadata group (and runs the loop).
    pub runs_loop: bool,
    /// Shard → where its move in flight stands (`moves::step_name`).
    pub steps: BTreeMap<u64, &'static str>,
}

/// One node's data shards, as `GetPlacement` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLoad {
    /// Voters.
    pub replicas: u32,
    /// Last known leaderships (the shard map's hints).
    pub leaders: u32,
    /// Preferred leaderships.
    pub preferred: u32,
    /// Bytes of the shards it holds voters of (`balance::weights`).
    pub bytes: u64,
}

/// What one look at the metadata replica gives.
struct Round {
    config: Config,
    decision: Decision,
    load: BTreeMap<u64, NodeLoad>,
    by_bytes: bool,
    steps: BTreeMap<u64, &'static str>,
}

fn limit() -> usize {
    usize::try_from(SHARD_COUNT_MAX).unwrap_or(usize::MAX)
}

impl Driver {
    fn leads(&self, shard: u64) -> bool {
        self.replicas
            .get(&shard)
            .is_some_and(|r| r.raw.raft.state == StateRole::Leader)
    }

    fn hears_from(&self, node: u64) -> bool {
        node == self.node_id || self.peers.get(&node).is_some_and(|p| !p.down)
    }

    /// The move targets from this node's metadata replica (none without one).
    fn move_targets(&self) -> BTreeMap<u64, Target> {
        self.engine
            .system_scan(META_SHARD, moves::MOVE_PREFIX, limit())
            .map(|r| moves::decode_targets(&r))
            .unwrap_or_default()
    }

    /// Everything [`moves::decide`] looks at, from the metadata replica.
    /// Returns the decision and the per-node load, or the engine's error.
    fn decide_now(&self) -> Result<Round, ClusterError> {
        let records = self.engine.system_scan(META_SHARD, SHARD_RECORD_PREFIX, limit())?;
        let map = self.map.overlay(&records);
        let preferred: BTreeMap<u64, (u64, u64)> = self
            .engine
            .system_scan(META_SHARD, PREFERRED_LEADER_PREFIX, limit())?
            .iter()
            .filter_map(|v| {
                let (shard, node) = crate::placement::decode_preferred_leaders(std::slice::from_ref(v))
                    .into_iter()
                    .next()?;
                Some((shard, (node, v.version)))
            })
            .collect();
        let shards: BTreeMap<u64, ShardView> = map
            .shards
            .iter()
            .map(|d| {
                let (p, pv) = preferred.get(&d.id).copied().unwrap_or((d.preferred_leader, 0));
                (
                    d.id,
                    ShardView {
                        voters: d.replicas.clone(),
                        learners: d.learners.clone(),
                        preferred: p,
                        preferred_version: pv,
                    },
                )
            })
            .collect();
        let entries = crate::nodes::decode_states(&self.engine.system_scan(
            META_SHARD,
            crate::nodes::NODE_RECORD_PREFIX,
            crate::nodes::NODES_MAX,
        )?);
        let mut states: BTreeMap<u64, NodeState> = map.nodes.keys().map(|n| (*n, NodeState::Up)).collect();
        let mut zones = crate::balance::Zones::new();
        let mut keep_replicas = BTreeSet::new();
        for (n, e) in &entries {
            states.insert(*n, e.state);
            zones.insert(*n, e.zone.clone());
            if e.keep_replicas {
                keep_replicas.insert(*n);
            }
        }
        let alive: BTreeSet<u64> = states.keys().copied().filter(|n| self.hears_from(*n)).collect();
        let silent_max = Duration::from_millis(self.tuning.move_target_silent_ms_max);
        let gone: BTreeSet<u64> = states
            .keys()
            .copied()
            .filter(|n| *n != self.node_id && self.peers.get(n).is_none_or(|p| p.last_seen.elapsed() >= silent_max))
            .collect();
        let config_value = self
            .engine
            .system_scan(META_SHARD, moves::PLACEMENT_CONFIG_KEY, 1)?
            .into_iter()
            .find(|v| v.key == moves::PLACEMENT_CONFIG_KEY);
        let config = moves::decode_config(config_value.as_ref());
        let targets = self.move_targets();
        let stray_learners: BTreeSet<(u64, u64)> = self
            .unowned_learners
            .iter()
            .filter(|(_, seen)| seen.elapsed() >= Duration::from_millis(moves::STRAY_LEARNER_MS))
            .map(|(k, _)| *k)
            .collect();
        let now_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        // A count from before the shard's last split (another epoch) is of
        // a range it no longer has: not counted until its leader counts
        // again (then it weighs the mean, like a new shard).
        let sizes: crate::balance::Sizes = crate::sizes::decode_records(&self.engine.system_scan(
            META_SHARD,
            crate::sizes::SIZE_PREFIX,
            limit(),
        )?)
        .into_iter()
        .filter(|(s, r)| map.shard(*s).is_some_and(|d| d.epoch == r.epoch))
        .map(|(s, r)| (s, r.bytes))
        .collect();
        let decision = moves::decide(&Inputs {
            shards: &shards,
            states: &states,
            alive: &alive,
            gone: &gone,
            zones: &zones,
            keep_replicas: &keep_replicas,
            sizes: &sizes,
            targets: &targets,
            stray_learners: &stray_learners,
            config,
            now_unix_ms,
            cancel_settle_ms: self
                .tuning
                .request_timeout_ms
                .saturating_mul(moves::CANCEL_SETTLE_REQUEST_TIMEOUTS),
        });
        let mut load: BTreeMap<u64, NodeLoad> = states
            .iter()
            .filter(|(_, s)| **s != NodeState::Removed)
            .map(|(n, _)| (*n, NodeLoad::default()))
            .collect();
        let voters: BTreeMap<u64, Vec<u64>> = shards.iter().map(|(s, v)| (*s, v.voters.clone())).collect();
        let weights = crate::balance::weights(&voters, &sizes).unwrap_or_default();
        for d in &map.shards {
            for v in &d.replicas {
                let l = load.entry(*v).or_default();
                l.replicas += 1;
                l.bytes = l.bytes.saturating_add(weights.get(&d.id).copied().unwrap_or(0));
            }
            if let Some(l) = load.get_mut(&d.leader_hint) {
                l.leaders += 1;
            }
            if let Some(s) = shards.get(&d.id) {
                if let Some(l) = load.get_mut(&s.preferred) {
                    l.preferred += 1;
                }
            }
        }
        let by_bytes = crate::balance::by_bytes(&voters, &decision.eligible, &weights);
        let steps = decision
            .in_flight
            .iter()
            .map(|t| (t.shard, moves::step_name(t, shards.get(&t.shard))))
            .collect();
        Ok(Round {
            config,
            decision,
            load,
            by_bytes,
            steps,
        })
    }

    /// `Admin.GetPlacement`'s answer, from this node's metadata replica.
    pub(super) fn placement_view(&self) -> Result<PlacementView, ClusterError> {
        let r = self.decide_now()?;
        Ok(PlacementView {
            config: r.config,
            decision: r.decision,
            load: r.load,
            by_bytes: r.by_bytes,
            runs_loop: self.leads(META_SHARD),
            steps: r.steps,
        })
    }

    /// One placement round (every `placement_every_ticks`).
    pub(super) fn placement_round(&mut self) {
        if self.leads(META_SHARD) {
            self.place();
        }
        self.carry_out_moves();
    }

    /// On the metadata leader: decide, and propose the writes.
    fn place(&mut self) {
        if let Some(rx) = self.place_write.as_mut() {
            match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return,
                _ => self.place_write = None,
            }
        }
        // A leader that has not applied everything it knows committed
        // would decide from an older map (a new leader, just elected).
        let caught_up = self
            .replicas
            .get(&META_SHARD)
            .is_some_and(|r| r.raw.raft.raft_log.applied >= r.raw.raft.raft_log.committed);
        if !caught_up {
            return;
        }
        let Ok(Round { decision, .. }) = self.decide_now() else {
            return; // the engine's failure surfaces on the apply path
        };
        // How long each unowned learner has been seen (this leader's memory
        // only: a new leader starts the clock again, which only delays).
        let now = Instant::now();
        self.unowned_learners
            .retain(|k, _| decision.unowned_learners.contains(k));
        for k in &decision.unowned_learners {
            self.unowned_learners.entry(*k).or_insert(now);
        }
        if decision.writes.is_empty() {
            return;
        }
        let ops: Vec<cmd::Op> = decision
            .writes
            .iter()
            .take(moves::WRITES_PER_ROUND_MAX)
            .map(write_op)
            .collect();
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let Some(meta) = self.replicas.get_mut(&META_SHARD) else {
            return;
        };
        meta.queued.push_back(super::replica::QueuedProposal {
            bytes: ops.iter().map(prost::Message::encoded_len).sum(),
            ops,
            reply,
            deadline: now + Duration::from_millis(self.tuning.request_timeout_ms),
            queued_at: now,
            stages: None,
        });
        self.waiting.insert(META_SHARD);
        self.wake(META_SHARD, true);
        self.place_write = Some(rx);
    }

    /// On every node: the next step of each move in flight on a shard this
    /// node leads.
    fn carry_out_moves(&mut self) {
        let targets = self.move_targets();
        self.moves_in_flight = targets.values().any(Target::in_flight);
        for t in targets.values().filter(|t| t.in_flight()) {
            if !self.leads(t.shard) {
                continue;
            }
            let Some(r) = self.replicas.get(&t.shard) else { continue };
            let raft = &r.raw.raft;
            let cs = raft.prs().conf().to_conf_state();
            let busy = raft.has_pending_conf() || !cs.voters_outgoing.is_empty() || raft.lead_transferee.is_some();
            let prs = raft.prs();
            let matched = |n: u64| prs.get(n).map(|p| p.matched);
            let alive = |n: u64| self.hears_from(n);
            let step = moves::next_step(
                t,
                &LeaderView {
                    me: self.node_id,
                    voters: &cs.voters,
                    learners: &cs.learners,
                    busy,
                    committed: raft.raft_log.committed,
                    matched: &matched,
                    alive: &alive,
                },
            );
            let changes = match step {
                Step::Wait(_) => continue,
                Step::TransferLeader(n) => {
                    if let Some(r) = self.replicas.get_mut(&t.shard) {
                        r.raw.transfer_leader(n);
                    }
                    self.wake(t.shard, true);
                    continue;
                }
                Step::AddLearner(n) => vec![MembershipChange::AddLearner(n)],
                Step::RemoveLearner(n) => vec![MembershipChange::Remove(n)],
                Step::Promote { to, from } => vec![MembershipChange::AddVoter(to), MembershipChange::Remove(from)],
            };
            let id = self.next_id();
            let node_id = self.node_id;
            if let Some(r) = self.replicas.get_mut(&t.shard) {
                if r.raw
                    .propose_conf_change(context(node_id, id), crate::node::conf_change_v2(&changes))
                    .is_ok()
                {
                    self.dirty.insert(t.shard);
                }
            }
            self.wake(t.shard, true);
        }
    }
}

/// The metadata write for one of the loop's decisions (compare-and-set).
fn write_op(w: &MetaWrite) -> cmd::Op {
    let (key, value, if_version) = match w {
        MetaWrite::Target(t) => (moves::move_key(t.shard), t.encode(), t.version),
        MetaWrite::Preferred {
            shard,
            node,
            if_version,
        } => (preferred_leader_key(*shard), node.to_be_bytes().to_vec(), *if_version),
    };
    cmd::Op {
        op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
            key,
            value,
            version: if_version.saturating_add(1),
            if_version: Some(if_version),
        })),
    }
}
