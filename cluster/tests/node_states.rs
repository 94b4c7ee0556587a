//! Node states in process: a removed node leaves the metadata group (shard
//! 0, a replica on every node), whose leader promotes an up learner to
//! keep five voters, and a removed node's record and the rules hold on
//! every node.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_cluster::nodes::NodeState;
use pigeonhole_cluster::placement::META_SHARD;
use pigeonhole_cluster::{ClusterError, MembershipChange};

#[tokio::test]
async fn a_removed_node_leaves_the_metadata_group_and_an_up_learner_takes_its_vote() {
    let mut tuning = fast_tuning();
    // The metadata leader looks at node states on this cadence.
    tuning.rebalance_every_ticks = 5;
    // Six nodes: metadata voters 1 to 5, learner 6; one data shard on 1, 2, 3.
    let c = TestCluster::new(6, 1, 3, tuning);
    c.leader(1).await;
    assert_eq!(meta_conf(&c).await, (vec![1, 2, 3, 4, 5], vec![6]));

    // A node holding data cannot go; one that holds none can, for good.
    let refused = c.node(4).set_node_state(2, NodeState::Removed).await.unwrap_err();
    assert!(
        matches!(&refused, ClusterError::Refused { reason } if reason.contains("[1]")),
        "{refused}"
    );
    assert_eq!(
        c.node(6).set_node_state(5, NodeState::Removed).await.unwrap(),
        (NodeState::Up, NodeState::Removed)
    );
    c.eventually("node 5 leaves the metadata group and node 6 votes", 10, || async {
        meta_conf(&c).await == (vec![1, 2, 3, 4, 6], vec![])
    })
    .await;
    // Every member's replica has the record.
    for n in [1, 2, 3, 4, 6] {
        c.eventually("the record reaches every member", 5, || async {
            c.node(n).node_state(5).unwrap() == NodeState::Removed
        })
        .await;
    }
    assert!(matches!(
        c.node(1).set_node_state(5, NodeState::Up).await,
        Err(ClusterError::Refused { .. })
    ));
    // Node 5 deleted its metadata replica once it applied its removal: it
    // sends map readers elsewhere (retryable), it does not fail them.
    c.eventually("node 5 says it holds no metadata replica", 10, || async {
        matches!(
            c.node(5).shard_map(),
            Err(ClusterError::NotReplica { shard: META_SHARD, .. })
        )
    })
    .await;

    // With no learner left, a second removal only shrinks the voters.
    c.node(1).set_node_state(4, NodeState::Draining).await.unwrap();
    c.node(1).set_node_state(4, NodeState::Removed).await.unwrap();
    c.eventually("node 4 leaves the metadata group", 10, || async {
        meta_conf(&c).await == (vec![1, 2, 3, 6], vec![])
    })
    .await;
    // The metadata leader itself removed. Node 1 leads it (the rebalancer
    // keeps leadership on the group's preferred node) and holds the data
    // shard's replica, so that replica moves to node 6 first.
    assert_eq!(c.leader(META_SHARD).await, 1);
    let data_leader = c.leader(1).await;
    c.node(data_leader)
        .change_membership(1, &[MembershipChange::AddLearner(6)])
        .await
        .unwrap();
    let data_leader = c.leader(1).await;
    let target = c.status(data_leader, 1).await.unwrap().commit;
    c.eventually("node 6 catches up on the data shard", 10, || async {
        c.status(6, 1).await.is_some_and(|s| s.applied >= target)
    })
    .await;
    // Promote node 6 and drop node 1 in one change, proposed by a leader
    // other than node 1 (the rebalancer hands the data shard back to its
    // preferred node 1 within a round, hence the retries).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "node 1's data replica never moved"
        );
        let l = c.leader(1).await;
        if l == 1 {
            let _ = c.node(1).transfer_leader(1, 2).await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        }
        let change = [MembershipChange::AddVoter(6), MembershipChange::Remove(1)];
        if c.node(l).change_membership(1, &change).await.is_ok() {
            break;
        }
    }
    c.eventually("the data shard's map record drops node 1", 10, || async {
        c.node(2)
            .shard_map()
            .unwrap()
            .shard(1)
            .is_some_and(|s| !s.replicas.contains(&1))
    })
    .await;
    c.node(2).set_node_state(1, NodeState::Removed).await.unwrap();
    c.eventually("node 1 leaves the metadata group", 10, || async {
        meta_conf(&c).await == (vec![2, 3, 6], vec![])
    })
    .await;
    // Node 1 led until the change committed, then stepped down and deleted
    // its replica; a voter that stays is elected.
    c.eventually("a voter that stays leads the metadata group", 10, || async {
        c.leader(META_SHARD).await != 1
    })
    .await;
    // The data shard still takes writes.
    let leader = c.leader(1).await;
    append(c.node(leader), 1, "ann", "k1", b"v").await.unwrap();
}
