//! One shard replica as the driver holds it: its RawNode, the requests
//! queued on it, its reads at each stage (queued, ReadIndex in flight,
//! waiting for apply), and the pure functions over that state (whether it
//! may hibernate, when reads are released, what expires). Nothing here does
//! I/O, so it is tested without a cluster.

use super::{ms_since, PeerLiveness, ProposeResult};
use crate::error::ClusterError;
use pigeonhole_engine::raft::eraftpb::ConfState;
use pigeonhole_engine::raft::{RawNode, StateRole};
use pigeonhole_engine::{command as cmd, RaftLogStore};
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;
use tokio::sync::oneshot;

pub(super) struct QueuedProposal {
    pub(super) ops: Vec<cmd::Op>,
    pub(super) bytes: usize,
    pub(super) reply: oneshot::Sender<ProposeResult>,
    pub(super) deadline: Instant,
    pub(super) queued_at: Instant,
    pub(super) stages: Option<std::sync::Arc<crate::stages::Stages>>,
}

pub(super) struct ReadWaiter {
    pub(super) reply: oneshot::Sender<Result<(), ClusterError>>,
    pub(super) deadline: Instant,
    pub(super) queued_at: Instant,
}

/// A ReadIndex request in flight and the reads it covers.
pub(super) struct InflightRead {
    /// The request's id (the second half of its context).
    pub(super) id: u64,
    /// When it was last sent. raft-rs drops a ReadIndex silently when the
    /// leader it went to dies, or when a new leader has not yet committed
    /// an entry of its term; so a read still unanswered after
    /// `READ_RETRY_TICKS`, or after the replica saw a new leader, is sent
    /// again. Re-sending is safe: any answer to a request sent after the
    /// waiters queued is an index at least as new as they need.
    pub(super) sent_tick: u64,
    pub(super) waiters: Vec<ReadWaiter>,
}

/// How long a follower's word that it is catching up keeps leadership
/// away from it (it repeats the word every second while it is).
pub(super) const PEER_CATCHING_UP_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// Ticks an unanswered ReadIndex waits before it is sent again.
pub(super) const READ_RETRY_TICKS: u64 = 2;

/// Ticks a replica may be without a leader before the readers that follow
/// its mailboxes are told (so a leader transfer, which leaves a replica
/// leaderless for a few milliseconds, ends no stream).
pub(super) const LEADERLESS_TICKS_MAX: u32 = 1;

/// A proposed entry this node waits on: callers and how many ops each owns.
pub(super) struct Pending {
    pub(super) shard: u64,
    pub(super) parts: Vec<Part>,
    pub(super) deadline: Instant,
    pub(super) proposed_at: Instant,
    /// The replica's Raft term when it proposed: once an entry of a later
    /// term is committed here, one that is still pending was lost in a
    /// leader change (`Driver::fail_lost_proposals`).
    pub(super) term: u64,
}

/// One caller's share of an entry: its first `ops` results are its answer.
pub(super) struct Part {
    pub(super) reply: oneshot::Sender<ProposeResult>,
    pub(super) ops: usize,
    pub(super) stages: Option<std::sync::Arc<crate::stages::Stages>>,
}

impl Part {
    /// Stamps the caller's request, if it is staged.
    pub(super) fn stamp(&self, stage: crate::stages::Stage) {
        crate::stages::stamp(self.stages.as_ref(), stage);
    }
}

/// A conf change's caller: answered with the configuration once applied.
pub(super) type ConfReply = oneshot::Sender<Result<ConfState, ClusterError>>;

pub(super) struct PendingConf {
    pub(super) shard: u64,
    pub(super) reply: ConfReply,
    pub(super) deadline: Instant,
}

pub(super) struct Replica {
    pub(super) raw: RawNode<RaftLogStore>,
    pub(super) queued: VecDeque<QueuedProposal>,
    pub(super) reads_queued: Vec<ReadWaiter>,
    pub(super) reads_inflight: Vec<InflightRead>,
    pub(super) reads_ready: Vec<(u64, Vec<ReadWaiter>)>,
    /// The replica saw a new leader (or role): in-flight reads go again.
    pub(super) reads_resend: bool,
    /// Consecutive ticks without a known leader.
    pub(super) leaderless_ticks: u32,
    pub(super) quiet_ticks: u32,
    pub(super) asleep: bool,
    /// The last leader this replica learned of (for the leader-change
    /// metric; 0: none yet).
    pub(super) leader_seen: u64,
    pub(super) log_bytes: u64,
    pub(super) preferred_leader: u64,
    /// The applied index the state machine is known to hold on disk (as of
    /// the last flush this node waited for, or the start). The Raft log is
    /// never compacted past it: after a crash, apply resumes from the state
    /// on disk and replays the log from there (D26).
    pub(super) durable_applied: u64,
    /// The last index handed to the apply worker (raft-rs's applied index
    /// catches up to it when the worker reports).
    pub(super) handed: u64,
    /// Bytes of the log entries handed to the apply worker since this
    /// replica started here (what the size checker watches for growth).
    pub(super) handed_bytes: u64,
    /// The highest term among the entries handed to the apply worker.
    pub(super) handed_term: u64,
    /// The index of an applied-to-be conf change that removes this node:
    /// the replica goes once the worker has applied it.
    pub(super) remove_at: Option<u64>,
    /// Callers of this node's conf changes handed to the apply worker:
    /// (entry index, caller, resulting configuration), answered when the
    /// worker reports that index applied.
    pub(super) conf_answers: Vec<(u64, ConfReply, ConfState)>,
    /// On a leader: followers that said they are catching up after
    /// storage damage, and when they last said so (D49). They get no
    /// leadership transfer: they would drop its TimeoutNow, and raft-rs
    /// refuses proposals while a transfer is pending.
    pub(super) peers_catching_up: BTreeMap<u64, Instant>,
    /// On a leader: the last index of a proposal a follower forwarded
    /// (0: none waiting). Until it is committed, commits are broadcast
    /// (`skip_bcast_commit` off): the forwarding follower answers its
    /// caller from its own apply, and would otherwise learn the commit
    /// only from the next append or heartbeat, a heartbeat interval
    /// (200 ms by default) when the shard is quiet.
    pub(super) bcast_commit_until: u64,
}

impl Replica {
    /// A replica with nothing queued.
    pub(super) fn new(raw: RawNode<RaftLogStore>, preferred_leader: u64) -> Replica {
        let durable_applied = raw.raft.raft_log.applied;
        Replica {
            raw,
            queued: VecDeque::new(),
            reads_queued: Vec::new(),
            reads_inflight: Vec::new(),
            reads_ready: Vec::new(),
            reads_resend: false,
            leaderless_ticks: 0,
            leader_seen: 0,
            quiet_ticks: 0,
            asleep: false,
            log_bytes: 0,
            preferred_leader,
            durable_applied,
            handed: durable_applied,
            handed_bytes: 0,
            handed_term: 0,
            remove_at: None,
            bcast_commit_until: 0,
            conf_answers: Vec::new(),
            peers_catching_up: BTreeMap::new(),
        }
    }
}

/// Bytes of an entry context: origin node id, then proposal id.
pub(super) const CONTEXT_LEN: usize = 16;

pub(super) fn context(node: u64, id: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(CONTEXT_LEN);
    c.extend_from_slice(&node.to_be_bytes());
    c.extend_from_slice(&id.to_be_bytes());
    c
}

pub(super) fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    let (a, b) = c.split_first_chunk::<8>()?;
    let b: [u8; 8] = b.try_into().ok()?;
    Some((u64::from_be_bytes(*a), u64::from_be_bytes(b)))
}

/// Whether `node` still has a part in `cs`. During a joint change the outgoing
/// voters (and the learners to be) still count: removing the replica then
/// would take a vote the old majority still needs.
pub(super) fn is_member(cs: &ConfState, node: u64) -> bool {
    pigeonhole_engine::conf_state_holds(cs, node)
}

/// A leader that applied its own removal steps down at once, as etcd's
/// raft does with `StepDownOnRemoval` (raft-rs 0.7 has no such option):
/// raft-rs keeps no progress for a removed leader, and the next append
/// response or proposal it handles unwraps that missing progress and
/// panics (`maybe_commit`, raft.rs:943; seen in CI while node 1 was
/// drained). Its queued proposals then fail as on any lost leadership.
/// Returns whether it stepped down.
pub(super) fn step_down_if_removed(r: &mut Replica, cs: &ConfState, node: u64) -> bool {
    if r.raw.raft.state != StateRole::Leader || is_member(cs, node) {
        return false;
    }
    let term = r.raw.raft.term;
    r.raw.raft.become_follower(term, pigeonhole_engine::raft::INVALID_ID);
    true
}

/// Cached log entries are needed until applied here and, on a leader, until
/// every follower has them; older ones are read from disk if ever needed.
pub(super) fn trim_entry_cache(r: &mut Replica) {
    let raft = &r.raw.raft;
    let mut keep_from = raft.raft_log.applied + 1;
    if raft.state == StateRole::Leader {
        for (_, p) in raft.prs().iter() {
            keep_from = keep_from.min(p.matched + 1);
        }
    }
    r.raw.store().trim_entry_cache(keep_from);
}

pub(super) fn release_reads(r: &mut Replica) {
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

pub(super) fn expire_queued(shard: u64, r: &mut Replica, now: Instant) {
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

pub(super) fn fail_all(shard: u64, mut r: Replica, err: impl Fn(u64) -> ClusterError) {
    for (_, reply, _) in r.conf_answers.drain(..) {
        let _ = reply.send(Err(err(shard)));
    }
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

/// A follower's proposal was appended on this leader up to `index`:
/// broadcast commits until it is committed, so the follower that forwarded
/// it learns the commit at once (`Replica::bcast_commit_until`).
pub(super) fn bcast_commit_until(r: &mut Replica, index: u64) {
    if index > r.bcast_commit_until {
        r.bcast_commit_until = index;
        r.raw.skip_bcast_commit(false);
    }
}

/// Entries up to `committed` were committed (and handed to apply): once
/// that covers every forwarded proposal, commits ride on appends and
/// heartbeats again. The broadcast of that commit has already been queued:
/// raft-rs queues it when the commit index moves, before the entries
/// reach a Ready.
pub(super) fn bcast_commit_done(r: &mut Replica, committed: u64) {
    if r.bcast_commit_until != 0 && committed >= r.bcast_commit_until {
        r.bcast_commit_until = 0;
        r.raw.skip_bcast_commit(true);
    }
}

/// A shard may sleep when nothing is in flight: no queued work, the log fully
/// committed and applied, and (for a leader) every follower caught up.
pub(super) fn is_quiet(r: &Replica) -> bool {
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

/// Whether a replica move looks under way in `shard`: a joint
/// configuration, or (data shards only: the metadata group keeps learners
/// for good once it has more than five members) a learner. A learner left
/// by a move cut short also counts, until a drain or move removes it.
pub(super) fn moving(shard: u64, raft: &pigeonhole_engine::raft::Raft<RaftLogStore>) -> bool {
    let cs = raft.prs().conf().to_conf_state();
    let learners = shard != crate::placement::META_SHARD && (!cs.learners.is_empty() || !cs.learners_next.is_empty());
    learners || !cs.voters_outgoing.is_empty()
}

/// Hands leadership back to the shard's preferred node once it is a caught-up
/// voter and alive, so leaders stay spread after failovers. Not while the
/// shard has a learner or a joint configuration: a replica move is under
/// way (`phctl shard move`, `node drain`, `cluster balance`), and it moved
/// the leadership off the leaving node on purpose; handing it back there
/// would undo that within a round and stall the move (seen: a balance
/// waited ten minutes for a leadership the rebalancer kept taking back).
pub(super) fn maybe_rebalance(node_id: u64, shard: u64, r: &mut Replica, peers: &BTreeMap<u64, PeerLiveness>) {
    let raft = &r.raw.raft;
    let pref = r.preferred_leader;
    if raft.state != StateRole::Leader || pref == node_id || pref == 0 || raft.lead_transferee.is_some() {
        return;
    }
    if moving(shard, raft) {
        return;
    }
    if !raft.prs().conf().voters().contains(pref) || peers.get(&pref).is_none_or(|p| p.down) {
        return;
    }
    if r.peers_catching_up
        .get(&pref)
        .is_some_and(|at| at.elapsed() < PEER_CATCHING_UP_FOR)
    {
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

#[cfg(test)]
mod tests;
