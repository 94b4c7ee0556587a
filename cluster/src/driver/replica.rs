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
mod tests {
    use super::*;
    use pigeonhole_engine::raft::{self, Storage as _};
    use pigeonhole_engine::{conf_state_with_voters, Durability, Engine, EngineOptions, RaftBatch};

    const SHARD: u64 = 5;

    /// A replica of node 1 in a shard whose voters are `voters`, on a fresh
    /// engine (kept alive by the returned dir).
    fn replica(voters: &[u64]) -> (tempfile::TempDir, Engine, Replica) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        engine
            .bootstrap_shard(SHARD, conf_state_with_voters(voters), 0, 0)
            .unwrap();
        let cfg = raft::Config {
            id: 1,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&cfg, engine.raft_log(SHARD).unwrap(), &logger).unwrap();
        (dir, engine, Replica::new(raw, 1))
    }

    /// Persists and acknowledges every Ready (no apply: raft-rs's applied
    /// index just follows the commit index).
    fn settle(engine: &Engine, r: &mut Replica) {
        while r.raw.has_ready() {
            let mut rd = r.raw.ready();
            let mut rb = RaftBatch::default();
            if !rd.entries().is_empty() {
                rb.append(r.raw.store(), rd.entries()).unwrap();
            }
            if let Some(hs) = rd.hs() {
                rb.set_hard_state(r.raw.store(), hs).unwrap();
            }
            engine.write_raft(rb, Durability::NoFsync).unwrap();
            let _ = rd.take_messages();
            let mut light = r.raw.advance(rd);
            let _ = light.take_messages();
            r.raw.advance_apply();
        }
    }

    fn proposal(deadline: Instant) -> (QueuedProposal, oneshot::Receiver<ProposeResult>) {
        let (reply, rx) = oneshot::channel();
        let q = QueuedProposal {
            ops: Vec::new(),
            bytes: 0,
            reply,
            deadline,
            queued_at: Instant::now(),
            stages: None,
        };
        (q, rx)
    }

    fn read(deadline: Instant) -> (ReadWaiter, oneshot::Receiver<Result<(), ClusterError>>) {
        let (reply, rx) = oneshot::channel();
        let w = ReadWaiter {
            reply,
            deadline,
            queued_at: Instant::now(),
        };
        (w, rx)
    }

    #[test]
    fn a_context_round_trips_and_a_short_one_is_refused() {
        let c = context(7, u64::MAX - 1);
        assert_eq!(c.len(), CONTEXT_LEN);
        assert_eq!(parse_context(&c), Some((7, u64::MAX - 1)));
        assert_eq!(parse_context(&c[..15]), None);
        assert_eq!(parse_context(&[]), None);
    }

    #[test]
    fn a_node_is_a_member_in_every_role_of_a_joint_configuration() {
        let cs = ConfState {
            voters: vec![1],
            learners: vec![2],
            voters_outgoing: vec![3],
            learners_next: vec![4],
            ..Default::default()
        };
        for n in 1..=4 {
            assert!(is_member(&cs, n), "node {n}");
        }
        assert!(!is_member(&cs, 5));
    }

    #[test]
    fn a_leader_that_applied_its_own_removal_steps_down_and_survives_late_acks() {
        use pigeonhole_engine::raft::eraftpb::{ConfChange, ConfChangeType, Message, MessageType};
        let (_d, engine, mut r) = replica(&[1, 2]);
        r.raw.campaign().unwrap();
        let term = r.raw.raft.term;
        let mut vote = Message::default();
        vote.set_msg_type(MessageType::MsgRequestVoteResponse);
        (vote.from, vote.to, vote.term) = (2, 1, term);
        r.raw.step(vote).unwrap();
        settle(&engine, &mut r);
        assert_eq!(r.raw.raft.state, StateRole::Leader);
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::RemoveNode);
        cc.node_id = 1;
        let cs = r.raw.apply_conf_change(&cc).unwrap();
        assert!(step_down_if_removed(&mut r, &cs, 1));
        assert_eq!(r.raw.raft.state, StateRole::Follower);
        // A follower's ack of what the old leader sent: raft-rs panicked
        // on it (no progress of its own) while this replica still led.
        let mut ack = Message::default();
        ack.set_msg_type(MessageType::MsgAppendResponse);
        (ack.from, ack.to, ack.term, ack.index) = (2, 1, term, r.raw.raft.raft_log.last_index());
        r.raw.step(ack).unwrap();
        // A member, or a replica that does not lead, is left alone.
        assert!(!step_down_if_removed(&mut r, &cs, 2));
    }

    #[test]
    fn expiry_fails_what_is_late_and_keeps_what_is_not() {
        let (_d, _e, mut r) = replica(&[1, 2, 3]);
        let past = Instant::now() - std::time::Duration::from_millis(1);
        let future = Instant::now() + std::time::Duration::from_secs(60);
        let (late, mut late_rx) = proposal(past);
        let (fresh, mut fresh_rx) = proposal(future);
        r.queued.extend([late, fresh]);
        let (late_read, mut late_read_rx) = read(past);
        r.reads_inflight.push(InflightRead {
            id: 1,
            sent_tick: 0,
            waiters: vec![late_read],
        });
        let (ready_read, mut ready_rx) = read(future);
        r.reads_ready.push((10, vec![ready_read]));
        expire_queued(SHARD, &mut r, Instant::now());
        assert!(matches!(late_rx.try_recv(), Ok(Err(ClusterError::NoLeader { .. }))));
        assert!(fresh_rx.try_recv().is_err(), "a request within its deadline waits on");
        assert_eq!(r.queued.len(), 1);
        assert!(matches!(
            late_read_rx.try_recv(),
            Ok(Err(ClusterError::NoLeader { .. }))
        ));
        assert!(r.reads_inflight.is_empty(), "a ReadIndex nobody waits for is dropped");
        assert!(ready_rx.try_recv().is_err());
        assert_eq!(r.reads_ready.len(), 1);
    }

    #[test]
    fn reads_are_released_once_apply_reaches_their_index_and_fail_all_answers_the_rest() {
        let (_d, engine, mut r) = replica(&[1]);
        r.raw.campaign().unwrap();
        settle(&engine, &mut r);
        let applied = r.raw.raft.raft_log.applied;
        assert!(applied >= 1, "the new leader's empty entry is applied");
        let future = Instant::now() + std::time::Duration::from_secs(60);
        let (now_read, mut now_rx) = read(future);
        let (later_read, mut later_rx) = read(future);
        r.reads_ready.push((applied, vec![now_read]));
        r.reads_ready.push((applied + 1, vec![later_read]));
        release_reads(&mut r);
        assert!(matches!(now_rx.try_recv(), Ok(Ok(()))));
        assert!(later_rx.try_recv().is_err(), "index {} is not applied yet", applied + 1);
        fail_all(SHARD, r, |_| ClusterError::Stopped);
        assert!(matches!(later_rx.try_recv(), Ok(Err(ClusterError::Stopped))));
    }

    #[test]
    fn commits_are_broadcast_until_the_last_forwarded_proposal_is_committed() {
        let (_d, _engine, mut r) = replica(&[1, 2, 3]);
        r.raw.skip_bcast_commit(true); // as the driver configures it (D25)
        assert!(!r.raw.raft.should_bcast_commit());
        bcast_commit_until(&mut r, 7);
        bcast_commit_until(&mut r, 5); // an older index does not lower it
        assert!(r.raw.raft.should_bcast_commit());
        bcast_commit_done(&mut r, 6);
        assert!(r.raw.raft.should_bcast_commit(), "index 7 is not committed yet");
        bcast_commit_done(&mut r, 7);
        assert!(!r.raw.raft.should_bcast_commit());
        assert_eq!(r.bcast_commit_until, 0);
    }

    #[test]
    fn a_leader_sleeps_only_once_every_follower_has_reported_the_commit() {
        let (_d, engine, mut r) = replica(&[1, 2, 3]);
        assert!(!is_quiet(&r), "a follower without a leader stays awake");
        r.raw.raft.become_candidate();
        r.raw.raft.become_leader();
        settle(&engine, &mut r);
        let last = r.raw.raft.raft_log.last_index();
        for id in [2, 3] {
            if let Some(pr) = r.raw.raft.mut_prs().get_mut(id) {
                pr.matched = last;
                pr.next_idx = last + 1;
            }
        }
        assert!(r.raw.raft.maybe_commit(), "a majority holds the entry");
        settle(&engine, &mut r);
        assert_eq!(r.raw.raft.raft_log.committed, last);
        assert!(!is_quiet(&r), "followers have not reported the commit index yet");
        for id in [2, 3] {
            if let Some(pr) = r.raw.raft.mut_prs().get_mut(id) {
                pr.update_committed(last);
            }
        }
        assert!(is_quiet(&r));
        let (q, _rx) = proposal(Instant::now() + std::time::Duration::from_secs(60));
        r.queued.push_back(q);
        assert!(!is_quiet(&r), "queued work keeps it awake");
        assert_eq!(r.raw.store().last_index().unwrap(), last);
    }

    /// A leader of node 1 in a shard of voters 1, 2, 3 with `entries`
    /// entries after its own, which follower 2 has acknowledged.
    fn leader_with_acked_follower(entries: usize) -> (tempfile::TempDir, Engine, Replica) {
        let (dir, engine, mut r) = replica(&[1, 2, 3]);
        r.raw.campaign().unwrap();
        settle(&engine, &mut r);
        let term = r.raw.raft.term;
        let mut vote = raft::eraftpb::Message::default();
        vote.set_msg_type(raft::eraftpb::MessageType::MsgRequestVoteResponse);
        vote.from = 2;
        vote.to = 1;
        vote.term = term;
        r.raw.step(vote).unwrap();
        settle(&engine, &mut r);
        assert_eq!(r.raw.raft.state, StateRole::Leader);
        for _ in 0..entries {
            r.raw.propose(vec![], b"x".to_vec()).unwrap();
        }
        settle(&engine, &mut r);
        let last = r.raw.raft.raft_log.last_index();
        let mut ack = raft::eraftpb::Message::default();
        ack.set_msg_type(raft::eraftpb::MessageType::MsgAppendResponse);
        ack.from = 2;
        ack.to = 1;
        ack.term = term;
        ack.index = last;
        r.raw.step(ack).unwrap();
        settle(&engine, &mut r);
        assert_eq!(r.raw.raft.prs().get(2).unwrap().matched, last);
        (dir, engine, r)
    }

    /// A follower that lost entries to damage says so with a rejection
    /// naming its log's end: the leader's `matched` for it comes down to
    /// that end (raft-rs alone takes a rejection below `matched` for a
    /// stale one and would count the lost acknowledgement on), and it is
    /// handed no leadership while it catches up (D49).
    #[test]
    fn a_follower_that_lost_entries_is_replicated_again_and_gets_no_leadership() {
        let (_dir, _engine, mut r) = leader_with_acked_follower(10);
        let term = r.raw.raft.term;
        let mut word = raft::eraftpb::Message::default();
        word.set_msg_type(raft::eraftpb::MessageType::MsgAppendResponse);
        word.from = 2;
        word.to = 1;
        word.term = term;
        word.reject = true;
        word.index = 3;
        word.reject_hint = 3;
        assert!(crate::driver::catchup::reset_lost_follower(&mut r, &word));
        r.raw.step(word.clone()).unwrap();
        let pr = r.raw.raft.prs().get(2).unwrap();
        assert_eq!(pr.matched, 3, "matched comes down to the follower's end");
        assert!(
            pr.next_idx <= 4,
            "it probes from the follower's end: next {}",
            pr.next_idx
        );
        // The same word again (its log now ends at or after matched) changes nothing.
        assert!(!crate::driver::catchup::reset_lost_follower(&mut r, &word));

        // Preferred leader 2 is caught up by raft-rs's count, but said it
        // is catching up: no transfer.
        r.preferred_leader = 2;
        let mut ack = raft::eraftpb::Message::default();
        ack.set_msg_type(raft::eraftpb::MessageType::MsgAppendResponse);
        ack.from = 2;
        ack.to = 1;
        ack.term = term;
        ack.index = r.raw.raft.raft_log.last_index();
        r.raw.step(ack).unwrap();
        let peers = BTreeMap::from([(
            2,
            PeerLiveness {
                last_seen: Instant::now(),
                down: false,
            },
        )]);
        r.peers_catching_up.insert(2, Instant::now());
        maybe_rebalance(1, SHARD, &mut r, &peers);
        assert_eq!(
            r.raw.raft.lead_transferee, None,
            "leadership went to a replica catching up"
        );
        r.peers_catching_up.clear();
        maybe_rebalance(1, SHARD, &mut r, &peers);
        assert_eq!(
            r.raw.raft.lead_transferee,
            Some(2),
            "the test's transfer never happens at all"
        );
    }
}
