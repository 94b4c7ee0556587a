//! Unit tests of the replica's state and pure functions, each over a
//! RawNode on a temporary engine: no cluster, no transport.

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
