//! A move's steps on its shard's leader ([`next_step`]): the half of
//! `moves.rs` that only a shard's leader can take, because only it sees
//! its group's progress (matched indexes, pending changes, who it hears
//! from). Pure, like `decide`: every step follows from the replicated
//! state and the leader's view, so a crash or a leader change resumes a
//! move where it stands.

use super::{Target, CATCH_UP_SLACK_ENTRIES};
use pigeonhole_proto::internal::v1::MoveState;

/// What a shard's leader does next for a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Add `to` as a learner.
    AddLearner(u64),
    /// Hand leadership to this voter: the leader itself leaves.
    TransferLeader(u64),
    /// One joint change: `to` becomes a voter and `from` goes.
    Promote { to: u64, from: u64 },
    /// A cancelled move's learner goes.
    RemoveLearner(u64),
    /// Nothing now (why, for logs and tests).
    Wait(&'static str),
}

/// The shard as its leader sees it.
pub struct LeaderView<'a> {
    pub me: u64,
    pub voters: &'a [u64],
    pub learners: &'a [u64],
    /// A membership change is pending or half-way (joint), or a leader
    /// transfer is under way: no new change now.
    pub busy: bool,
    pub committed: u64,
    /// The log index each member has acknowledged (its matched index).
    pub matched: &'a dyn Fn(u64) -> Option<u64>,
    /// Whether this node hears from a node (itself: always).
    pub alive: &'a dyn Fn(u64) -> bool,
}

impl std::fmt::Debug for LeaderView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderView")
            .field("me", &self.me)
            .field("voters", &self.voters)
            .field("learners", &self.learners)
            .field("busy", &self.busy)
            .field("committed", &self.committed)
            .finish_non_exhaustive()
    }
}

/// The next step of `t` on the shard's leader.
pub fn next_step(t: &Target, v: &LeaderView) -> Step {
    let voter = |n: u64| v.voters.contains(&n);
    let learner = |n: u64| v.learners.contains(&n);
    match t.state {
        MoveState::Active => {
            if voter(t.to) && !voter(t.from) {
                return Step::Wait("done; the metadata leader closes it");
            }
            if !voter(t.from) || voter(t.to) {
                // Only another change leaves these (see `settle`): never
                // remove `from` beside a `to` someone else promoted.
                return Step::Wait("overtaken by another change");
            }
            if v.busy {
                return Step::Wait("a membership change or leader transfer is under way");
            }
            if !voter(t.to) && !learner(t.to) {
                return if (v.alive)(t.to) {
                    Step::AddLearner(t.to)
                } else {
                    Step::Wait("the target node is not heard from")
                };
            }
            if learner(t.to) {
                // Nothing acknowledged yet (matched 0) is never caught up,
                // however short the log: a learner only acknowledges a
                // snapshot or appends that leave it holding everything up
                // to its matched index.
                let matched = (v.matched)(t.to).unwrap_or(0);
                if matched == 0 || matched.saturating_add(CATCH_UP_SLACK_ENTRIES) < v.committed {
                    return Step::Wait("the learner is catching up");
                }
            }
            if !(v.alive)(t.to) {
                // Promoting a dead learner in place of a live voter would
                // leave the shard with two live replicas.
                return Step::Wait("the target node is not heard from");
            }
            if t.from == v.me {
                // Leadership goes first, to a live voter that stays.
                return match v
                    .voters
                    .iter()
                    .copied()
                    .find(|n| *n != t.from && *n != t.to && (v.alive)(*n))
                {
                    Some(n) => Step::TransferLeader(n),
                    None => Step::Wait("no live voter to hand leadership to"),
                };
            }
            Step::Promote { to: t.to, from: t.from }
        }
        MoveState::Cancelled if learner(t.to) && !v.busy => Step::RemoveLearner(t.to),
        MoveState::Cancelled => Step::Wait("the cancelled move's learner is gone or a change is under way"),
        MoveState::Done | MoveState::Unspecified => Step::Wait("not in flight"),
    }
}
