//! Membership changes in an in-process cluster: a replica moved to a new
//! node, and a joint change under load.

use super::common::*;
use pigeonhole_cluster::{ClusterError, MembershipChange};
use pigeonhole_engine::raft::Storage as _;
use std::time::Duration;

#[tokio::test]
async fn membership_change_moves_a_replica_to_a_new_node() {
    // Four nodes in the map; shard 1 starts on nodes 1, 2 and 3.
    let mut c = TestCluster::with_members(4, 4, 1, 3, fast_tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    for i in 0..30 {
        append(c.node(leader), shard, "ivy", &format!("k{i}"), b"v")
            .await
            .unwrap();
    }
    assert!(c.status(4, shard).await.is_none(), "node 4 starts without a replica");
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(4)])
        .await
        .unwrap();
    assert_eq!(cs.learners, vec![4]);
    c.eventually("learner catches up", 10, || async {
        c.status(4, shard).await.is_some_and(|s| s.applied >= 30)
    })
    .await;
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::AddVoter(4)])
        .await
        .unwrap();
    assert!(cs.voters.contains(&4) && cs.learners.is_empty());
    // Remove a replica that is not the leader.
    let gone = (1..=3).find(|n| *n != leader).unwrap();
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::Remove(gone)])
        .await
        .unwrap();
    assert!(!cs.voters.contains(&gone));
    // Removing it again is refused: raft-rs would apply it as a no-op, and
    // beside an AddVoter (a move whose source another change took out) it
    // would leave the shard a voter too many.
    let again = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::Remove(gone)])
        .await;
    assert!(
        matches!(&again, Err(ClusterError::Refused { reason }) if reason.contains("not a member")),
        "{again:?}"
    );
    c.eventually("removed replica stops", 5, || async {
        c.status(gone, shard).await.is_none()
    })
    .await;
    // Replica GC: the removed node deletes its copy of the shard.
    c.eventually("removed replica's data is deleted", 5, || async {
        let e = c.node(gone).engine();
        e.shard_meta(shard).unwrap().is_none() && e.raft_log(shard).unwrap().last_index().unwrap() == 0
    })
    .await;
    assert!(!c.node(gone).engine().shard_ids().unwrap().contains(&shard));
    // The new configuration commits writes, and node 4 holds them.
    append(c.node(leader), shard, "ivy", "after", b"v").await.unwrap();
    c.node(4).read_barrier(shard).await.unwrap();
    assert_eq!(read_all(c.node(4), shard, "ivy").len(), 31);
    // The removed node's proposals are refused, not silently lost.
    let err = append(c.node(gone), shard, "ivy", "x", b"v").await.unwrap_err();
    assert!(matches!(err, ClusterError::NotReplica { .. }), "{err}");
    // Every node's copy of the metadata group converges on the new replicas.
    let mut want: Vec<u64> = cs.voters.clone();
    want.sort_unstable();
    c.eventually("every node's shard map shows the new replicas", 10, || async {
        (1..=4).all(|id| {
            let m = c.node(id).shard_map().unwrap();
            let s = m.shard(shard).unwrap();
            let mut got = s.replicas.clone();
            got.sort_unstable();
            got == want && s.learners.is_empty() && s.leader_hint == leader
        })
    })
    .await;
    // And the membership survives a restart of the new voter.
    c.restart(4);
    c.eventually("restarted learner-turned-voter rejoins", 10, || async {
        c.status(4, shard)
            .await
            .is_some_and(|s| s.voters.contains(&4) && s.leader != 0)
    })
    .await;
    // The removed node can be added back: it starts empty and is caught up
    // by a snapshot.
    let leader = c.leader(shard).await;
    append(c.node(leader), shard, "ivy", "before-readd", b"v")
        .await
        .unwrap();
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(gone)])
        .await
        .unwrap();
    assert_eq!(cs.learners, vec![gone]);
    c.eventually("re-added node catches up", 10, || async {
        c.status(gone, shard).await.is_some_and(|s| s.learners.contains(&gone))
    })
    .await;
    c.node(gone).read_barrier(shard).await.unwrap();
    assert_eq!(read_all(c.node(gone), shard, "ivy").len(), 32);
}

#[tokio::test]
async fn a_joint_membership_change_under_load_completes() {
    // Replace a voter in ONE change (joint consensus) while writes flow, so
    // the change commits in the same batch as data entries.
    let mut tuning = fast_tuning();
    tuning.hibernate_after_ticks = 0;
    let c = TestCluster::with_members(4, 4, 1, 3, tuning);
    let shard = 1;
    let leader = c.leader(shard).await;
    c.node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(4)])
        .await
        .unwrap();
    c.eventually("learner catches up", 10, || async {
        c.status(4, shard).await.is_some_and(|s| s.applied >= 6)
    })
    .await;
    let out = (1..=3).find(|n| *n != leader).unwrap();
    let writer = {
        let n = c.node(leader).clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let _ = append(&n, shard, "nia", &format!("k{i}"), b"v").await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::AddVoter(4), MembershipChange::Remove(out)])
        .await
        .unwrap();
    assert!(
        !cs.voters_outgoing.is_empty(),
        "the change enters a joint configuration"
    );
    writer.await.unwrap();
    // raft-rs leaves the joint configuration by itself (auto-leave); it must
    // get there even though the change committed among data entries.
    c.eventually("the shard leaves the joint configuration", 10, || async {
        c.status(leader, shard)
            .await
            .is_some_and(|s| !s.joint && s.voters.contains(&4) && !s.voters.contains(&out))
    })
    .await;
    // Two changes at once: the second is refused as busy, not timed out.
    let n = c.node(leader);
    let (first, second) = ([MembershipChange::AddLearner(out)], [MembershipChange::Remove(out)]);
    let (a, b) = tokio::join!(n.change_membership(shard, &first), n.change_membership(shard, &second),);
    assert!(a.is_ok(), "{a:?}");
    assert!(matches!(b, Err(ClusterError::Busy { .. })), "{b:?}");
    c.node(leader)
        .change_membership(shard, &[MembershipChange::Remove(out)])
        .await
        .unwrap();
    // And further membership changes work.
    c.node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(out)])
        .await
        .unwrap();
}
