//! The servers' rebalancer hands a shard's leadership back to its preferred
//! node, but not while a replica move is under way (the shard has a
//! learner): the move took the leadership off the leaving node on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_cluster::MembershipChange;
use std::time::Duration;

#[tokio::test]
async fn leadership_stays_where_a_move_put_it_until_the_move_is_done() {
    let mut tuning = fast_tuning();
    tuning.rebalance_every_ticks = 5;
    // Four nodes, one shard on 1, 2, 3 (node 1 preferred); node 4 spare.
    let c = TestCluster::new(4, 1, 3, tuning);
    c.eventually("node 1 leads shard 1", 10, || async { c.leader(1).await == 1 })
        .await;
    // A move of node 1's replica to node 4 begins: a learner on 4, then the
    // leadership handed to node 2.
    c.node(1)
        .change_membership(1, &[MembershipChange::AddLearner(4)])
        .await
        .unwrap();
    // A transfer raft-rs abandons (node 2 not caught up within an election
    // timeout) is asked for again.
    c.eventually("node 2 leads shard 1", 10, || async {
        if c.leader(1).await == 2 {
            return true;
        }
        let _ = c.node(1).transfer_leader(1, 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        false
    })
    .await;
    // Several rebalance rounds (5 ticks of 10 ms each): still node 2.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(c.leader(1).await, 2, "the rebalancer undid the move's leader transfer");
    }
    // The move is abandoned (the learner removed): the preferred node gets
    // its leadership back.
    c.node(2)
        .change_membership(1, &[MembershipChange::Remove(4)])
        .await
        .unwrap();
    c.eventually("node 1 leads shard 1 again", 10, || async { c.leader(1).await == 1 })
        .await;
}
