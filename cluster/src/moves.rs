//! The placement loop's replica moves: what the metadata group records
//! about them, what its leader decides each round ([`decide`]), and what a
//! shard's leader does next to carry one out ([`next_step`]).
//!
//! Shaped after PD's operators, split by who knows what. The metadata
//! leader sees the whole cluster (node states, zones, every shard's
//! replicas), so it plans, and records one [`MoveTarget`] per shard under
//! `move/` + shard id. Only a shard's leader sees its group's progress (how
//! far a learner has caught up, whether a change is pending), so it takes
//! the steps: add the new node as a learner, wait until it has caught up,
//! hand leadership away if the leader itself leaves, then promote the
//! learner and remove the old replica in one joint change. Both sides are
//! pure functions here, called from `driver::place`; every step is decided
//! from the replicated state alone, so a crash or a leader change anywhere
//! resumes the move where it stands, and nothing waits on an answer.
//!
//! A move ends when the shard's record in the metadata group shows it done
//! (the metadata leader then marks the target DONE), or is cancelled when
//! its target node stops being up, goes unheard for
//! [`MOVE_TARGET_SILENT_MS_MAX`], or the move outlives
//! [`MOVE_DURATION_MS_MAX`]; a cancelled move's learner is removed by the
//! shard's leader before the target is marked DONE. A shorter silence of
//! the target only holds the move's steps: calling a move off on a pause
//! or a brief partition would throw its snapshot away and send the next
//! move's (before D61 a node ingesting a large snapshot was silent for
//! seconds; its ingest is now off the driver, which keeps heartbeating).

use crate::balance::{per_node, plan, plan_leaders, Move, Zones};
use crate::nodes::NodeState;
use pigeonhole_proto::internal::v1::{MoveState, MoveTarget, PlacementConfig};
use prost::Message as _;
use std::collections::{BTreeMap, BTreeSet};

#[path = "moves_step.rs"]
mod step;
pub use step::{next_step, LeaderView, Step};

/// System key prefix of move targets in the metadata group.
pub const MOVE_PREFIX: &[u8] = b"move/";
/// System key of the placement loop's settings.
pub const PLACEMENT_CONFIG_KEY: &[u8] = b"config/placement";
/// Moves in flight at once when the settings say nothing.
pub const MOVES_MAX_DEFAULT: u32 = 2;
/// Moves in flight at once, at most: each streams a snapshot, and the
/// node's snapshot budget is shared by all of them.
pub const MOVES_MAX_LIMIT: u32 = 64;
/// A move not over after this long is cancelled (a learner that never
/// catches up must not hold a shard's moves forever).
pub const MOVE_DURATION_MS_MAX: u64 = 30 * 60 * 1_000;
/// A move whose target node has not been heard from for this long is
/// cancelled (the default of `RaftTuning::move_target_silent_ms_max`). Not the failure detector's second (`peer_down_after_ms`):
/// a node's heartbeats come from its Raft driver, which a long turn
/// holds up (before D61 an ingest of a 90 MiB snapshot held it up to
/// 4.4 s on a 2-vCPU host), and a move called off then is started again
/// later with a new snapshot, each one of them wasted (docs/benchmarks.md,
/// "Snapshots sent again while growing"). A
/// target that is really gone holds one learner for this long; the
/// shard's voters are untouched meanwhile.
pub const MOVE_TARGET_SILENT_MS_MAX: u64 = 30 * 1_000;
/// A learner that has acknowledged something (a snapshot or appends)
/// and is within this many entries of the leader's commit index counts
/// as caught up: under load the commit index moves on while the learner
/// acknowledges, so "equal" could take arbitrarily long. The joint change's
/// new quorum does not need it to vote at once.
pub const CATCH_UP_SLACK_ENTRIES: u64 = 64;
/// A cancelled move is closed only this many request timeouts after its
/// cancellation (and once its learner is gone): an AddLearner proposed
/// just before is then committed and in the shard map, or lost, so no
/// learner is left unowned (15 s with the default 5 s timeout).
pub const CANCEL_SETTLE_REQUEST_TIMEOUTS: u64 = 3;
/// A data-shard learner that no move in flight owns (a move's AddLearner
/// that landed after it was closed, a stale metadata replica on a shard
/// leader, a `shard move` left half-way) is removed once it has been seen
/// unowned this long, by a cancelled move the loop records for it. Long
/// enough for an operator's `shard move` (with the loop paused, nothing is
/// removed).
pub const STRAY_LEARNER_MS: u64 = 10 * 60 * 1_000;
/// Metadata writes per round, at most (one proposal; the engine takes at
/// most 4,096 ops per command). The next round continues.
pub const WRITES_PER_ROUND_MAX: usize = 256;

/// The system key of `shard`'s move target.
pub fn move_key(shard: u64) -> Vec<u8> {
    crate::placement::shard_key(MOVE_PREFIX, shard)
}

/// A move target with the version of its system value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub shard: u64,
    pub from: u64,
    pub to: u64,
    pub state: MoveState,
    pub started_unix_ms: u64,
    /// When it entered `state`.
    pub state_since_unix_ms: u64,
    /// The stored version (writes are compare-and-set over it).
    pub version: u64,
}

impl Target {
    /// Neither done nor never started.
    pub fn in_flight(&self) -> bool {
        matches!(self.state, MoveState::Active | MoveState::Cancelled)
    }

    /// The encoded record.
    pub fn encode(&self) -> Vec<u8> {
        MoveTarget {
            shard: self.shard,
            from: self.from,
            to: self.to,
            state: self.state as i32,
            started_unix_ms: self.started_unix_ms,
            state_since_unix_ms: self.state_since_unix_ms,
        }
        .encode_to_vec()
    }
}

/// Shard → target, from the metadata group's `move/` values; a value that
/// does not decode, or names another shard than its key, is skipped.
pub fn decode_targets(records: &[pigeonhole_engine::SystemValue]) -> BTreeMap<u64, Target> {
    records
        .iter()
        .filter_map(|v| {
            let t = MoveTarget::decode(v.value.as_slice()).ok()?;
            (v.key == move_key(t.shard)).then_some(())?;
            let state = MoveState::try_from(t.state).ok()?;
            Some((
                t.shard,
                Target {
                    shard: t.shard,
                    from: t.from,
                    to: t.to,
                    state,
                    started_unix_ms: t.started_unix_ms,
                    state_since_unix_ms: t.state_since_unix_ms,
                    version: v.version,
                },
            ))
        })
        .collect()
}

/// The placement loop's settings and their stored version (0: absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub paused: bool,
    pub moves_max: u32,
    /// A shard is split once its leader counts this many bytes
    /// ([`SPLIT_NEVER`]: never).
    pub split_size_bytes: u64,
    pub version: u64,
}

/// The automatic split threshold when the settings say nothing: a shard
/// that size still moves within the 60 s a move of 1 GiB is allowed.
pub const SPLIT_SIZE_BYTES_DEFAULT: u64 = 1 << 30;
/// The lowest threshold one may set: below it shards would multiply
/// toward the shard-count limit for little gain.
pub const SPLIT_SIZE_BYTES_MIN: u64 = 1 << 20;
/// The threshold that turns automatic splits off.
pub const SPLIT_NEVER: u64 = u64::MAX;

/// The settings from the metadata group's value, if any; a value that does
/// not decode reads as the defaults (the loop keeps running).
pub fn decode_config(value: Option<&pigeonhole_engine::SystemValue>) -> Config {
    let c = value.and_then(|v| PlacementConfig::decode(v.value.as_slice()).ok().map(|c| (c, v.version)));
    let (paused, moves_max, split, version) = match c {
        Some((c, version)) => (c.paused, c.moves_max, c.split_size_bytes, version),
        None => (false, 0, 0, value.map_or(0, |v| v.version)),
    };
    Config {
        paused,
        moves_max: if moves_max == 0 {
            MOVES_MAX_DEFAULT
        } else {
            moves_max.min(MOVES_MAX_LIMIT)
        },
        split_size_bytes: if split == 0 {
            SPLIT_SIZE_BYTES_DEFAULT
        } else {
            split.max(SPLIT_SIZE_BYTES_MIN)
        },
        version,
    }
}

/// One data shard as the loop sees it (from the shard map).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardView {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// The preferred leader now in force, and the version of its
    /// `leader/` record (0: none, the bootstrap map's choice).
    pub preferred: u64,
    pub preferred_version: u64,
}

/// What [`decide`] looks at.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub shards: &'a BTreeMap<u64, ShardView>,
    /// Every node of the cluster and its state (a node with no record: up).
    pub states: &'a BTreeMap<u64, NodeState>,
    /// Nodes the deciding node hears from (itself included).
    pub alive: &'a BTreeSet<u64>,
    /// Nodes the deciding node has not heard from for
    /// `RaftTuning::move_target_silent_ms_max` ([`MOVE_TARGET_SILENT_MS_MAX`]
    /// by default) or more (never itself): moves to them are called off.
    pub gone: &'a BTreeSet<u64>,
    pub zones: &'a Zones,
    /// Draining nodes whose replicas stay (a drain of leaderships only);
    /// the replicas of every other draining node are moved away.
    pub keep_replicas: &'a BTreeSet<u64>,
    /// Shard → bytes, from the `size/` records its leaders write (D39).
    pub sizes: &'a crate::balance::Sizes,
    pub targets: &'a BTreeMap<u64, Target>,
    /// (shard, node) learners the caller has seen unowned by any move for
    /// [`STRAY_LEARNER_MS`] (see [`Decision::unowned_learners`]).
    pub stray_learners: &'a BTreeSet<(u64, u64)>,
    pub config: Config,
    pub now_unix_ms: u64,
    /// How long a cancelled move stays before it is closed
    /// ([`CANCEL_SETTLE_REQUEST_TIMEOUTS`] request timeouts).
    pub cancel_settle_ms: u64,
}

/// A write the loop makes to the metadata group (compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaWrite {
    /// Store this target (its `version` is the one it replaces).
    Target(Target),
    /// Make `node` the shard's preferred leader over `if_version`.
    Preferred { shard: u64, node: u64, if_version: u64 },
}

/// One round's outcome: the writes to make (on the metadata leader, when
/// the loop is not paused; target clean-up happens even when paused), and
/// what `GetPlacement` shows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub writes: Vec<MetaWrite>,
    /// Targets still in flight after this round's clean-up.
    pub in_flight: Vec<Target>,
    /// Replica moves still to make, the ones asked for now included.
    pub planned: Vec<Move>,
    /// Preferred-leader changes still to make (shard → node).
    pub planned_leaders: BTreeMap<u64, u64>,
    /// Nodes that take new work (up and alive).
    pub eligible: BTreeSet<u64>,
    /// Up nodes the deciding node does not hear from (dead, or joined so
    /// recently that it has not learnt of them): the plan leaves them out,
    /// so the cluster does not count as balanced while there are any.
    pub unreachable: BTreeSet<u64>,
    /// (shard, node) learners of data shards that no move in flight owns.
    pub unowned_learners: BTreeSet<(u64, u64)>,
    /// Draining nodes (not drained of leaderships only) that still hold a
    /// voter, with or without a move planned for it: a drain is not over.
    pub draining_held: BTreeSet<u64>,
}

impl Decision {
    /// Nothing in flight, nothing to do, and every up node heard from.
    pub fn balanced(&self) -> bool {
        self.in_flight.is_empty()
            && self.planned.is_empty()
            && self.planned_leaders.is_empty()
            && self.unreachable.is_empty()
            && self.draining_held.is_empty()
    }
}

fn state_of(states: &BTreeMap<u64, NodeState>, node: u64) -> NodeState {
    states.get(&node).copied().unwrap_or(NodeState::Up)
}

/// Where a target stands after looking at its shard: `None` when it stays
/// as it is, else its new state. A move is never closed straight from
/// ACTIVE unless it finished: calling it off goes through CANCELLED, whose
/// learner (or one still being added) the shard's leader removes.
fn settle(t: &Target, s: Option<&ShardView>, inp: &Inputs) -> Option<MoveState> {
    let Some(s) = s else {
        return Some(MoveState::Done); // no such shard any more
    };
    match t.state {
        MoveState::Active => {
            let finished = s.voters.contains(&t.to) && !s.voters.contains(&t.from) && !s.learners.contains(&t.from);
            if finished {
                return Some(MoveState::Done);
            }
            // Another change (an operator's move) took `from` out, or made
            // `to` a voter beside it: this move's own steps never leave
            // either state (its promotion swaps the two in one change), and
            // removing `from` now would leave the shard a replica short.
            let overtaken = s.voters.contains(&t.from) == s.voters.contains(&t.to);
            // Silent for a moment (not in `alive`) only holds the steps
            // (`next_step` waits for a target not heard from).
            let target_gone = state_of(inp.states, t.to) != NodeState::Up || inp.gone.contains(&t.to);
            // A removed source is `node remove --force`'s to rebuild, and
            // a draining one, while the loop is paused, `node drain`'s to
            // move: two movers of one replica could leave the shard a
            // voter too many. (Running, the loop itself empties draining
            // nodes, and phctl only watches.)
            let source_draining = match state_of(inp.states, t.from) {
                NodeState::Removed => true,
                NodeState::Draining => inp.config.paused,
                NodeState::Up | NodeState::Unspecified => false,
            };
            let too_long = inp.now_unix_ms.saturating_sub(t.started_unix_ms) > MOVE_DURATION_MS_MAX;
            (overtaken || target_gone || source_draining || too_long).then_some(MoveState::Cancelled)
        }
        MoveState::Cancelled => {
            let settled = inp.now_unix_ms.saturating_sub(t.state_since_unix_ms) >= inp.cancel_settle_ms;
            (!s.learners.contains(&t.to) && settled).then_some(MoveState::Done)
        }
        MoveState::Done | MoveState::Unspecified => None,
    }
}

/// One round of the placement loop: settle the targets in flight, then
/// plan replica moves over the configuration the moves in flight will
/// leave, ask for up to `moves_max` of them (one per shard, only on shards
/// with no learner, no move in flight and every voter up and alive), and
/// once no replica move is left, even out the preferred leaders.
pub fn decide(inp: &Inputs) -> Decision {
    let mut d = Decision::default();
    let mut in_flight: BTreeMap<u64, Target> = BTreeMap::new();
    // The version each shard's target has once this round's writes apply.
    let mut version: BTreeMap<u64, u64> = inp.targets.iter().map(|(s, t)| (*s, t.version)).collect();
    for (shard, t) in inp.targets.iter().filter(|(_, t)| t.in_flight()) {
        match settle(t, inp.shards.get(shard), inp) {
            Some(state) => {
                let next = Target {
                    state,
                    state_since_unix_ms: inp.now_unix_ms,
                    ..t.clone()
                };
                if state == MoveState::Cancelled {
                    in_flight.insert(*shard, next.clone());
                }
                version.insert(*shard, t.version.saturating_add(1));
                d.writes.push(MetaWrite::Target(next));
            }
            None => {
                in_flight.insert(*shard, t.clone());
            }
        }
    }
    d.eligible = inp
        .states
        .iter()
        .filter(|(n, s)| **s == NodeState::Up && inp.alive.contains(n))
        .map(|(n, _)| *n)
        .collect();
    d.unreachable = inp
        .states
        .iter()
        .filter(|(n, s)| **s == NodeState::Up && !inp.alive.contains(n))
        .map(|(n, _)| *n)
        .collect();
    // Learners no move owns; the ones seen long enough get a cancelled move
    // of their own, so the shard's leader removes them.
    for (shard, s) in inp.shards {
        for l in &s.learners {
            if in_flight.get(shard).is_none_or(|t| t.to != *l) {
                d.unowned_learners.insert((*shard, *l));
            }
        }
    }
    if !inp.config.paused {
        for (shard, node) in d.unowned_learners.intersection(inp.stray_learners) {
            if in_flight.contains_key(shard) {
                continue;
            }
            let t = Target {
                shard: *shard,
                from: 0,
                to: *node,
                state: MoveState::Cancelled,
                started_unix_ms: inp.now_unix_ms,
                state_since_unix_ms: inp.now_unix_ms,
                version: version.get(shard).copied().unwrap_or(0),
            };
            version.insert(*shard, t.version.saturating_add(1));
            in_flight.insert(*shard, t.clone());
            d.writes.push(MetaWrite::Target(t));
        }
    }
    // The configuration the moves in flight will leave.
    let mut voters: BTreeMap<u64, Vec<u64>> = inp.shards.iter().map(|(s, v)| (*s, v.voters.clone())).collect();
    for t in in_flight.values().filter(|t| t.state == MoveState::Active) {
        for v in voters.get_mut(&t.shard).into_iter().flatten() {
            if *v == t.from {
                *v = t.to;
            }
        }
    }
    let evacuate: BTreeSet<u64> = inp
        .states
        .iter()
        .filter(|(n, s)| **s == NodeState::Draining && !inp.keep_replicas.contains(n))
        .map(|(n, _)| *n)
        .collect();
    // The ones not heard from first (see `balance::evacuate`).
    let mut evacuate_order: Vec<u64> = evacuate.iter().copied().collect();
    evacuate_order.sort_by_key(|n| (inp.alive.contains(n), *n));
    d.draining_held = evacuate
        .iter()
        .copied()
        .filter(|n| inp.shards.values().any(|s| s.voters.contains(n)))
        .collect();
    d.planned = plan(&voters, &d.eligible, inp.zones, inp.sizes, &evacuate_order);
    let active = in_flight.values().filter(|t| t.state == MoveState::Active).count();
    let room = usize::try_from(inp.config.moves_max)
        .unwrap_or(usize::MAX)
        .saturating_sub(active);
    if !inp.config.paused && room > 0 {
        let mut asked: BTreeSet<u64> = BTreeSet::new();
        for m in &d.planned {
            if asked.len() >= room {
                break;
            }
            let Some(s) = inp.shards.get(&m.shard) else { continue };
            // A shard of one voter is not moved: its leader is the replica
            // that would leave, with no voter to hand leadership to. The
            // replica leaving a draining node may be down (the others
            // still make a quorum of both configurations); every other
            // voter must be heard from, and up or being emptied itself (a
            // shard with voters on two draining nodes moves one at a time;
            // a node drained of leaderships only may be restarting).
            let ready = !in_flight.contains_key(&m.shard)
                && !asked.contains(&m.shard)
                && s.learners.is_empty()
                && s.voters.len() >= 2
                && s.voters.iter().all(|v| {
                    let usable = d.eligible.contains(v) || evacuate.contains(v);
                    usable && (*v == m.from || inp.alive.contains(v))
                });
            if !ready {
                continue;
            }
            asked.insert(m.shard);
            let t = Target {
                shard: m.shard,
                from: m.from,
                to: m.to,
                state: MoveState::Active,
                started_unix_ms: inp.now_unix_ms,
                state_since_unix_ms: inp.now_unix_ms,
                version: version.get(&m.shard).copied().unwrap_or(0),
            };
            in_flight.insert(m.shard, t.clone());
            d.writes.push(MetaWrite::Target(t));
        }
    }
    d.in_flight = in_flight.into_values().collect();
    // Leaderships first: a draining node's preferred leaderships go at
    // once (the rebalancer then hands the leaderships over within a
    // round, 5 s), while its replicas move a few at a time (a move off the
    // leader hands leadership over first, `next_step`); the rest are
    // evened out once no replica move is left.
    d.planned_leaders = if d.in_flight.is_empty() && d.planned.is_empty() {
        leader_changes(inp)
    } else {
        let voters: BTreeMap<u64, Vec<u64>> = inp.shards.iter().map(|(s, v)| (*s, v.voters.clone())).collect();
        let current: BTreeMap<u64, u64> = inp.shards.iter().map(|(s, v)| (*s, v.preferred)).collect();
        // To a voter heard from: the rebalancer hands over to no other.
        crate::balance::leaders_off(&voters, &up_nodes(inp), &d.eligible, &current)
    };
    if !inp.config.paused {
        for (shard, node) in &d.planned_leaders {
            let if_version = inp.shards.get(shard).map_or(0, |s| s.preferred_version);
            d.writes.push(MetaWrite::Preferred {
                shard: *shard,
                node: *node,
                if_version,
            });
        }
    }
    d
}

/// Preferred-leader changes that put every up node within one preferred
/// leadership of the others, or none when the choices in force already
/// are as even as a new plan would be and each names an up voter (no
/// churn: a fresh plan may differ from an equally good one in force).
fn leader_changes(inp: &Inputs) -> BTreeMap<u64, u64> {
    let up = up_nodes(inp);
    let voters: BTreeMap<u64, Vec<u64>> = inp.shards.iter().map(|(s, v)| (*s, v.voters.clone())).collect();
    let current: BTreeMap<u64, u64> = inp.shards.iter().map(|(s, v)| (*s, v.preferred)).collect();
    let want = plan_leaders(&voters, &up, &current);
    let spread =
        |m: &BTreeMap<u64, usize>| m.values().max().copied().unwrap_or(0) - m.values().min().copied().unwrap_or(0);
    let valid = want.keys().all(|s| {
        current
            .get(s)
            .is_some_and(|p| up.contains(p) && voters.get(s).is_some_and(|vs| vs.contains(p)))
    });
    if valid && spread(&per_node(&current, &up)) <= spread(&per_node(&want, &up)) {
        return BTreeMap::new();
    }
    want.into_iter().filter(|(s, n)| current.get(s) != Some(n)).collect()
}

/// Nodes whose state is up (heard from or not).
fn up_nodes(inp: &Inputs) -> BTreeSet<u64> {
    inp.states
        .iter()
        .filter(|(_, s)| **s == NodeState::Up)
        .map(|(n, _)| *n)
        .collect()
}

/// Where a move in flight stands, from its shard's map entry (what
/// `GetPlacement` shows).
pub fn step_name(t: &Target, s: Option<&ShardView>) -> &'static str {
    let Some(s) = s else { return "shard gone" };
    match t.state {
        MoveState::Cancelled => "removing learner",
        _ if s.learners.contains(&t.to) => "catching up",
        _ if s.voters.contains(&t.to) => "promoting",
        _ => "adding learner",
    }
}

#[cfg(test)]
#[path = "moves_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "moves_step_tests.rs"]
mod step_tests;
