//! Replicas catching up after damage to this node's storage (D49): they
//! take appends and snapshots as any follower does, but they do not vote,
//! campaign or take a leadership transfer until they hold everything
//! their shard had committed when the catch-up began.
//!
//! Why: the Raft log's salvage (storage-format.md §8.5) keeps a whole
//! prefix of each damaged shard's log, but the entries, term or vote lost
//! with the damage may have been acknowledged. A replica that voted with
//! the shorter log could elect a leader lacking an entry committed with
//! its own lost acknowledgement: with three replicas, the only other copy
//! may be on the leader that just failed. Not voting is enough for
//! safety, because the other replicas still form a majority that holds
//! every committed entry; what the replica acknowledges from now on it
//! really holds.
//!
//! When it may vote again: once its log holds (committed and fsync'd)
//! the index a leader answered to a ReadIndex this replica sent after the
//! catch-up began. A ReadIndex answer is the leader's commit index once it
//! has confirmed it still leads, so it covers every entry committed
//! before the request, and so every entry this replica could have helped
//! commit before the damage. The mark is then cleared in the engine
//! (durable), and the replica is an ordinary one again. A restart before
//! that starts over with a new ReadIndex.

use super::replica::context;
use super::Driver;
use pigeonhole_engine::raft::eraftpb::MessageType;
use std::collections::BTreeMap;
use std::time::Instant;

/// Ticks an unanswered catch-up ReadIndex waits before it goes again
/// (raft-rs drops one silently when the leader changes or has not yet
/// committed in its term).
const CATCH_UP_READ_RETRY_TICKS: u64 = 10;

/// One replica's catch-up.
#[derive(Debug, Clone)]
pub(super) struct CatchUp {
    /// Why (the damage found), for NodeStatus and logs.
    pub(super) reason: String,
    /// The ReadIndex in flight: its id and the tick it was sent at.
    read: Option<(u64, u64)>,
    /// The index the replica must hold before it votes again, once a
    /// leader has answered.
    pub(super) target: Option<u64>,
    since: Instant,
}

impl CatchUp {
    pub(super) fn new(reason: String) -> CatchUp {
        CatchUp {
            reason,
            read: None,
            target: None,
            since: Instant::now(),
        }
    }
}

/// Messages a catching-up replica must not act on: they would have it
/// vote (or campaign, for a leadership transfer's TimeoutNow).
pub(super) fn blocked(msg: MessageType) -> bool {
    matches!(
        msg,
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote | MessageType::MsgTimeoutNow
    )
}

/// Whether a replica that has persisted and committed up to `held` (the
/// smaller of the two) may vote again.
pub(super) fn caught_up(c: &CatchUp, held: u64) -> bool {
    c.target.is_some_and(|t| held >= t)
}

impl Driver {
    /// The marks the engine holds, at start.
    pub(super) fn load_catch_up(&mut self) -> Result<BTreeMap<u64, CatchUp>, crate::error::ClusterError> {
        let marks = self.engine.catching_up()?;
        for (shard, reason) in &marks {
            tracing::warn!(
                shard,
                reason = reason.as_str(),
                "replica is catching up after storage damage: it does not vote until it holds what its shard \
                 had committed"
            );
        }
        Ok(marks.into_iter().map(|(s, r)| (s, CatchUp::new(r))).collect())
    }

    /// Whether `shard`'s replica here is catching up.
    pub(super) fn is_catching_up(&self, shard: u64) -> bool {
        self.catching_up.contains_key(&shard)
    }

    /// Once a tick: sends (or sends again) each catch-up's ReadIndex, and
    /// clears the marks of replicas that now hold their target.
    pub(super) fn catch_up_tick(&mut self) {
        if self.catching_up.is_empty() {
            return;
        }
        let node_id = self.node_id;
        let ticks = self.ticks;
        let shards: Vec<u64> = self.catching_up.keys().copied().collect();
        for shard in shards {
            let id = self.next_id();
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            let Some(c) = self.catching_up.get_mut(&shard) else {
                continue;
            };
            let log = &r.raw.raft.raft_log;
            if caught_up(c, log.committed.min(log.persisted)) {
                if let Err(e) = self.engine.caught_up(shard) {
                    tracing::error!(shard, error = %e, "could not clear a catch-up mark; will retry");
                    continue;
                }
                tracing::info!(
                    shard,
                    index = c.target.unwrap_or(0),
                    secs = c.since.elapsed().as_secs_f64(),
                    "replica caught up after storage damage: it votes again"
                );
                self.catching_up.remove(&shard);
                continue;
            }
            if c.target.is_some() || r.raw.raft.leader_id == 0 {
                continue;
            }
            if c.read
                .is_none_or(|(_, sent)| ticks.saturating_sub(sent) >= CATCH_UP_READ_RETRY_TICKS)
            {
                c.read = Some((id, ticks));
                r.raw.read_index(context(node_id, id));
                r.asleep = false;
                self.dirty.insert(shard);
            }
        }
    }
}

/// A ReadIndex answer for `shard`: whether it was a catch-up's (then it
/// sets the target).
pub(super) fn answered(catching_up: &mut BTreeMap<u64, CatchUp>, shard: u64, id: u64, index: u64) -> bool {
    match catching_up.get_mut(&shard) {
        Some(c) if c.read.is_some_and(|(sent, _)| sent == id) => {
            c.target = Some(index);
            c.read = None;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn votes_timeouts_and_pre_votes_are_blocked_appends_are_not() {
        for t in [
            MessageType::MsgRequestVote,
            MessageType::MsgRequestPreVote,
            MessageType::MsgTimeoutNow,
        ] {
            assert!(blocked(t), "{t:?}");
        }
        for t in [
            MessageType::MsgAppend,
            MessageType::MsgHeartbeat,
            MessageType::MsgSnapshot,
            MessageType::MsgReadIndexResp,
            MessageType::MsgRequestVoteResponse,
        ] {
            assert!(!blocked(t), "{t:?}");
        }
    }

    #[test]
    fn caught_up_only_once_a_leader_answered_and_the_log_holds_its_index() {
        let mut c = CatchUp::new("test".into());
        assert!(!caught_up(&c, u64::MAX), "no answer yet: never");
        c.target = Some(100);
        assert!(!caught_up(&c, 99));
        assert!(caught_up(&c, 100));
    }
}
