//! Stale-replica GC (`driver::gc`): a node that was down while a move took
//! it out of a shard never receives its own removal; once back, it deletes
//! the copy the metadata group's records show it no longer owns. A replica
//! the shard added back is kept.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_cluster::placement::META_SHARD;
use pigeonhole_cluster::transport::local::{CutShard, Filter, Verdict};
use pigeonhole_cluster::transport::ShardMsg;
use pigeonhole_cluster::{ClusterError, MembershipChange, RaftTuning};
use pigeonhole_engine::raft::eraftpb::MessageType;
use pigeonhole_engine::raft::Storage as _;
use std::time::Duration;

/// Long enough that a restarted node's replica is seen before it goes.
const STALE_AFTER_MS: u64 = 1_000;

fn tuning() -> RaftTuning {
    RaftTuning {
        stale_replica_after_ms: STALE_AFTER_MS,
        ..fast_tuning()
    }
}

/// True when `node` holds nothing of `shard`: no replica in the driver, no
/// state and no log in its engine.
async fn holds_nothing(c: &TestCluster, node: u64, shard: u64) -> bool {
    let e = c.node(node).engine();
    c.status(node, shard).await.is_none()
        && e.shard_meta(shard).unwrap().is_none()
        && e.raft_log(shard).unwrap().last_index().unwrap() == 0
}

/// Four nodes; shard 1 starts on nodes 1, 2 and 3. A follower (returned)
/// goes down with the shard's first ten entries, and the shard moves off
/// it while it is down, as the placement loop moves a replica: node 4 as a
/// learner, then promote it and remove the follower in one joint change;
/// ten more entries follow, and every running node's metadata replica has
/// the record without it.
async fn removed_while_down() -> (TestCluster, u64) {
    let mut c = TestCluster::with_members(4, 4, 1, 3, tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    for i in 0..10 {
        append(c.node(leader), shard, "ivy", &format!("a{i}"), b"v")
            .await
            .unwrap();
    }
    // A follower goes down with the shard's first ten entries.
    let gone = (1..=3).find(|n| *n != leader).unwrap();
    c.node(gone).read_barrier(shard).await.unwrap();
    c.stop(gone);
    // While it is down, the shard moves off it as the placement loop moves
    // a replica: node 4 as a learner, then promote it and remove `gone` in
    // one joint change.
    c.node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(4)])
        .await
        .unwrap();
    c.eventually("learner catches up", 10, || async {
        c.status(4, shard).await.is_some_and(|s| s.applied >= 10)
    })
    .await;
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::AddVoter(4), MembershipChange::Remove(gone)])
        .await
        .unwrap();
    assert!(cs.voters.contains(&4) && !cs.voters.contains(&gone));
    for i in 0..10 {
        append_retrying(c.node(leader), shard, "ivy", &format!("b{i}"), b"v", 10).await;
    }
    // Every running node's metadata replica shows the shard without it.
    c.eventually("the shard record leaves the removed node out", 10, || async {
        [1, 2, 3, 4].iter().filter(|n| c.nodes.contains_key(n)).all(|n| {
            let m = c.node(*n).shard_map().unwrap();
            let s = m.shard(shard).unwrap();
            !s.replicas.contains(&gone) && s.replicas.contains(&4)
        })
    })
    .await;
    (c, gone)
}

#[tokio::test]
async fn a_replica_removed_while_its_node_was_down_is_deleted_when_it_returns() {
    let (mut c, gone) = removed_while_down().await;
    let shard = 1;
    // It comes back with its old configuration: nothing in the shard will
    // ever send it its removal.
    c.start(gone);
    let st = c.status(gone, shard).await.expect("the stale replica loads at start");
    assert!(st.voters.contains(&gone), "it still believes it is a voter: {st:?}");
    c.eventually("the stale replica and its data are deleted", 15, || async {
        holds_nothing(&c, gone, shard).await
    })
    .await;
    let deleted = |n: u64| {
        c.node(n)
            .counters()
            .stale_replicas_deleted
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(deleted(gone), 1, "NodeStatus counts the deletion");
    // The members keep theirs, and every write.
    for n in [1, 2, 3, 4].into_iter().filter(|n| *n != gone) {
        assert!(c.status(n, shard).await.is_some(), "member {n} lost its replica");
    }
    // A request sent to it now is redirected to the shard's replicas as the
    // records have them, leader first, not to the bootstrap layout (which
    // still names `gone`, so a client would come straight back).
    let leader = c.leader(shard).await;
    match append(c.node(gone), shard, "ivy", "x", b"v").await {
        Err(ClusterError::NotReplica { replicas, .. }) => {
            assert!(!replicas.contains(&gone) && replicas.contains(&4), "{replicas:?}");
            assert_eq!(replicas.first(), Some(&leader), "{replicas:?}");
        }
        other => panic!("expected NotReplica, got {other:?}"),
    }
    // Added back (a learner, as every move adds), it is caught up from
    // empty, and kept: its log now reaches past the record's index.
    c.node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(gone)])
        .await
        .unwrap();
    c.eventually("the re-added learner catches up", 10, || async {
        c.status(gone, shard).await.is_some_and(|s| s.applied >= 20)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(STALE_AFTER_MS * 3)).await;
    assert!(
        c.status(gone, shard).await.is_some(),
        "a re-added replica must never be collected"
    );
    assert_eq!(deleted(gone), 1);
    c.node(gone).read_barrier(shard).await.unwrap();
    assert_eq!(read_all(c.node(gone), shard, "ivy").len(), 20);
}

#[tokio::test]
async fn a_member_that_was_down_keeps_its_replica() {
    // The rule needs the record to leave the node out: a member that only
    // fell behind (its log ends far before the record's index) stays.
    let mut c = TestCluster::new(3, 1, 3, tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    let behind = (1..=3).find(|n| *n != leader).unwrap();
    c.stop(behind);
    for i in 0..20 {
        append_retrying(c.node(leader), shard, "ivy", &format!("k{i}"), b"v", 10).await;
    }
    // A new leader rewrites the record: its index is now far past the
    // stopped node's log, which the record still lists as a voter.
    let other = (1..=3).find(|n| *n != leader && *n != behind).unwrap();
    c.node(leader).transfer_leader(shard, other).await.unwrap();
    c.eventually("the new leader's record lands", 10, || async {
        c.node(other).shard_map().unwrap().shard(shard).unwrap().leader_hint == other
    })
    .await;
    // Back, but cut off from the shard (not from the metadata group) so it
    // stays behind the record long enough for the rule to be tried.
    let cut = c.router.add_filter(CutShard {
        node: behind,
        shard: Some(shard),
    });
    c.start(behind);
    c.eventually("its metadata replica holds the new record", 10, || async {
        c.node(behind).shard_map().unwrap().shard(shard).unwrap().leader_hint == other
    })
    .await;
    tokio::time::sleep(Duration::from_millis(STALE_AFTER_MS * 3)).await;
    assert!(
        c.status(behind, shard).await.is_some(),
        "a member's replica was deleted"
    );
    let deleted = c
        .node(behind)
        .counters()
        .stale_replicas_deleted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(deleted, 0);
    c.router.remove_filter(cut);
    c.node(behind).read_barrier(shard).await.unwrap();
    assert_eq!(read_all(c.node(behind), shard, "ivy").len(), 20);
}

/// Drops appends and snapshots of one shard sent to one node; heartbeats
/// pass, so the node hears its leader but its log does not grow.
#[derive(Debug)]
struct HoldAppends {
    to: u64,
    shard: u64,
}

impl Filter for HoldAppends {
    fn check(&self, _: u64, _: u64, _: bool) -> Verdict {
        Verdict::Pass
    }

    fn filter_msgs(&self, _from: u64, to: u64, msgs: &mut Vec<ShardMsg>) {
        if to == self.to {
            msgs.retain(|m| m.shard != self.shard || m.msg.get_msg_type() != MessageType::MsgAppend);
        }
    }

    fn drops_snapshot_of(&self, _from: u64, to: u64, shard: u64) -> bool {
        to == self.to && shard == self.shard
    }
}

/// Lets through the metadata group's log to one node only up to an index:
/// later entries are cut from its appends, and its snapshots dropped.
#[derive(Debug)]
struct MetaUpTo {
    to: u64,
    index_max: u64,
}

impl Filter for MetaUpTo {
    fn check(&self, _: u64, _: u64, _: bool) -> Verdict {
        Verdict::Pass
    }

    fn filter_msgs(&self, _from: u64, to: u64, msgs: &mut Vec<ShardMsg>) {
        if to != self.to {
            return;
        }
        for m in msgs.iter_mut().filter(|m| m.shard == META_SHARD) {
            if m.msg.get_msg_type() == MessageType::MsgAppend {
                let kept: Vec<_> = m
                    .msg
                    .take_entries()
                    .into_iter()
                    .filter(|e| e.index <= self.index_max)
                    .collect();
                m.msg.set_entries(kept.into());
            }
        }
    }

    fn drops_snapshot_of(&self, _from: u64, to: u64, shard: u64) -> bool {
        to == self.to && shard == META_SHARD
    }
}

/// Added back (as a learner) while it was still down, and back with a
/// metadata replica that has the record of its removal but not the one of
/// its re-add, and with no appends of the shard yet: the rule holds from
/// the old record, but the shard's leader talks to it, so it is kept.
#[tokio::test]
async fn a_replica_added_back_before_its_record_lands_is_kept() {
    let (mut c, gone) = removed_while_down().await;
    let shard = 1;
    let members: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|n| *n != gone).collect();
    // The metadata log up to here holds the record of the removal.
    let mut meta_index = 0;
    for n in &members {
        meta_index = meta_index.max(c.status(*n, META_SHARD).await.unwrap().last_index);
    }
    let leader = c.leader(shard).await;
    c.node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(gone)])
        .await
        .unwrap();
    let held = c.router.add_filter(HoldAppends { to: gone, shard });
    let meta_held = c.router.add_filter(MetaUpTo {
        to: gone,
        index_max: meta_index,
    });
    c.start(gone);
    c.eventually("its metadata replica has the record of its removal", 10, || async {
        !c.node(gone)
            .shard_map()
            .unwrap()
            .shard(shard)
            .unwrap()
            .replicas
            .contains(&gone)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(STALE_AFTER_MS * 3)).await;
    let st = c.status(gone, shard).await;
    assert!(
        st.as_ref().is_some_and(|s| s.last_index < 20),
        "it holds its old log and no more: {st:?}"
    );
    let deleted = c
        .node(gone)
        .counters()
        .stale_replicas_deleted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(deleted, 0, "a replica its leader talks to was deleted");
    c.router.remove_filter(meta_held);
    c.router.remove_filter(held);
    c.eventually("the re-added learner catches up", 10, || async {
        c.status(gone, shard).await.is_some_and(|s| s.learners.contains(&gone))
    })
    .await;
    c.node(gone).read_barrier(shard).await.unwrap();
    assert_eq!(read_all(c.node(gone), shard, "ivy").len(), 20);
}
