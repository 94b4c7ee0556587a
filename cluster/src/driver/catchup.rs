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

use super::replica::{context, Replica};
use super::Driver;
use crate::transport::ShardMsg;
use pigeonhole_engine::raft::eraftpb::{Message, MessageType};
use pigeonhole_engine::raft::{ProgressState, StateRole};
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
    /// When the leader was last told (or the peers woken).
    signalled: Option<u64>,
    /// The leader (and its term) last told that this replica catches up.
    told: Option<(u64, u64)>,
    since: Instant,
}

impl CatchUp {
    pub(super) fn new(reason: String) -> CatchUp {
        CatchUp {
            reason,
            read: None,
            target: None,
            signalled: None,
            told: None,
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

/// Before a catching-up replica steps `msg`: a heartbeat's commit index
/// is lowered to the replica's last index. The leader sends
/// min(matched, commit), and its `matched` for this replica may still be
/// what the replica acknowledged before it lost entries; raft-rs stops the
/// node on a commit index past its log. The lowered index is safe: the
/// replica's log is a prefix of what it acknowledged to this leader, so
/// it agrees with the leader's up to its end.
///
/// A commit index past the log also says the leader's `matched` is stale:
/// it sends nothing more (it thinks this replica holds it all), so the
/// replica answers with a rejection naming its real end, which the leader
/// takes to replicate from there (`reset_lost_follower`). Returns it.
pub(super) fn clamp_heartbeat(r: &Replica, msg: &mut Message) -> Option<Message> {
    let last = r.raw.raft.raft_log.last_index();
    if msg.get_msg_type() != MessageType::MsgHeartbeat || msg.commit <= last {
        return None;
    }
    let reject = end_rejection(msg.to, msg.from, msg.term, msg.commit, last);
    msg.commit = last;
    Some(reject)
}

/// On a leader, before it steps `msg`: a follower that rejects an append
/// with a log ending below what the leader believes it matched has lost
/// entries (damage, D49; a follower's log never shrinks below the
/// leader's own entries otherwise). raft-rs takes that rejection for a
/// stale one and would keep sending after `matched` forever, so the
/// follower's progress goes back to its real end and probes from there.
/// A truly stale rejection costs only a resend. Returns whether it reset.
pub(super) fn reset_lost_follower(r: &mut Replica, msg: &Message) -> bool {
    if msg.get_msg_type() != MessageType::MsgAppendResponse || !msg.reject || r.raw.raft.state != StateRole::Leader {
        return false;
    }
    let Some(pr) = r.raw.raft.mut_prs().get_mut(msg.from) else {
        return false;
    };
    if pr.state == ProgressState::Snapshot || msg.reject_hint >= pr.matched {
        return false;
    }
    pr.matched = msg.reject_hint;
    pr.become_probe();
    true
}

/// The context that marks a catching-up replica's word to its leader.
pub(super) const CATCHING_UP: &[u8] = b"pigeonhole/catching-up";

/// A catching-up replica's word to its leader: an append rejection naming
/// its log's end (`reject_hint`, and `index` the same, so raft-rs probes
/// from there once `reset_lost_follower` has lowered a stale `matched`),
/// marked [`CATCHING_UP`] so the leader hands it no leadership meanwhile.
fn catching_up_word(from: u64, to: u64, term: u64, last: u64) -> Message {
    let mut m = end_rejection(from, to, term, last, last);
    m.context = CATCHING_UP.to_vec().into();
    m
}

/// An append rejection of `index` that names the sender's log end `last`
/// (what `reset_lost_follower` reads on the leader).
fn end_rejection(from: u64, to: u64, term: u64, index: u64, last: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppendResponse);
    m.from = from;
    m.to = to;
    m.term = term;
    m.reject = true;
    m.index = index;
    m.reject_hint = last;
    m
}

/// Queues a wake probe for each of `peers` but `from`.
fn wake_peers(
    outbox: &mut std::collections::BTreeMap<u64, Vec<ShardMsg>>,
    shard: u64,
    from: u64,
    peers: impl IntoIterator<Item = u64>,
) {
    for to in peers.into_iter().filter(|p| *p != from) {
        outbox.entry(to).or_default().push(ShardMsg {
            shard,
            msg: wake_probe(from, to),
        });
    }
}

/// A message that only wakes the receiving replica (the driver wakes a
/// shard on any message, and keeps it awake for the hibernation delay on
/// any but a heartbeat or its response): an append response of term 1,
/// below every term in use (replicas start at term 5), which raft-rs
/// ignores as stale.
fn wake_probe(from: u64, to: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppendResponse);
    m.from = from;
    m.to = to;
    m.term = 1;
    m
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

    /// Clears `shard`'s mark at an operator's word (`phctl node repair
    /// --accept-loss`): the replica votes again at once, accepting that
    /// writes it lost may be lost for good. Answers why it was marked.
    pub(super) fn accept_replica_loss(&mut self, shard: u64) -> Result<String, crate::error::ClusterError> {
        let Some(c) = self.catching_up.get(&shard) else {
            return Err(crate::error::ClusterError::Refused {
                reason: format!("shard {shard}: the replica on node {} is not catching up", self.node_id),
            });
        };
        let reason = c.reason.clone();
        self.engine.caught_up(shard)?;
        self.catching_up.remove(&shard);
        tracing::warn!(
            shard,
            reason = reason.as_str(),
            "catching-up mark cleared by an operator: the replica votes again before it caught up, and writes \
             it lost may be lost for good"
        );
        Ok(reason)
    }

    /// Once a tick, for each catching-up replica: every
    /// `CATCH_UP_READ_RETRY_TICKS`, tells its leader (a rejection naming
    /// its log's end, marked [`CATCHING_UP`]: the leader lowers a stale
    /// `matched` and hands it no leadership) or, with no leader known,
    /// wakes the shard's other replicas; after the first such word to the
    /// current leader, sends (or sends again) its ReadIndex; and clears
    /// the mark once the replica holds the answered index.
    pub(super) fn catch_up_tick(&mut self) {
        if self.catching_up.is_empty() {
            return;
        }
        let node_id = self.node_id;
        let ticks = self.ticks;
        let due = |at: Option<u64>| at.is_none_or(|t| ticks.saturating_sub(t) >= CATCH_UP_READ_RETRY_TICKS);
        let shards: Vec<u64> = self.catching_up.keys().copied().collect();
        for shard in shards {
            let id = self.next_id();
            if !self.replicas.contains_key(&shard) {
                // No replica yet (the state machine was rebuilt, D50): it
                // is created when the leader first sends, so wake the
                // shard's other replicas, whose leader may be asleep.
                let peers = self.replicas_of(shard);
                if let Some(c) = self.catching_up.get_mut(&shard) {
                    if due(c.signalled) {
                        c.signalled = Some(ticks);
                        wake_peers(&mut self.outbox, shard, node_id, peers);
                    }
                }
                continue;
            }
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
            let leader = r.raw.raft.leader_id;
            if due(c.signalled) {
                c.signalled = Some(ticks);
                if leader == 0 {
                    // It does not tick, so it never campaigns, and an idle
                    // shard's leader may be asleep (hibernation) and send
                    // nothing: poke the other voters, which wakes them;
                    // the leader's next heartbeat then names itself.
                    wake_peers(
                        &mut self.outbox,
                        shard,
                        node_id,
                        r.raw.raft.prs().conf().voters().ids().iter(),
                    );
                } else {
                    let last = r.raw.raft.raft_log.last_index();
                    self.outbox.entry(leader).or_default().push(ShardMsg {
                        shard,
                        msg: catching_up_word(node_id, leader, r.raw.raft.term, last),
                    });
                    c.told = Some((leader, r.raw.raft.term));
                }
                self.dirty.insert(shard);
            }
            // The ReadIndex goes only after the leader was told (on the
            // same connection, so it is handled after the word): its
            // `matched` for this replica is then no longer what the
            // replica acknowledged before the damage, and no commit counts
            // a lost acknowledgement from then on.
            if leader == 0 || c.target.is_some() || c.told != Some((leader, r.raw.raft.term)) {
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
        if !self.outbox.is_empty() {
            // Words and wake probes of replicas with nothing else to send.
            self.flush_outbox();
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
