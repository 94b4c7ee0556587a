//! The placement loop in process (issue 13, deliverable 3): the servers
//! bring a grown cluster to balance with no operator step, a move survives
//! its shard's leader and the loop's own node restarting, a move to a
//! node that dies is cancelled and its learner removed, and a draining
//! node is emptied (leaderships only, or everything).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::placing::*;
use common::*;
use pigeonhole_cluster::node::PlacementChange;
use pigeonhole_cluster::nodes::NodeState;
use pigeonhole_cluster::placement::META_SHARD;
use pigeonhole_cluster::RaftTuning;
use std::time::Duration;

const SHARDS: u64 = 8;

/// 3 nodes, 8 shards with data; 2 nodes join. The loop alone (no
/// operator call) moves replicas and leaderships until every node is
/// within one of the others; the metadata leader (where the loop runs) and
/// a moving shard's leader restart while moves are in flight. Every
/// acknowledged append is on every replica of its shard afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_balances_a_grown_cluster_by_itself() {
    let mut c = TestCluster::new(3, SHARDS, 3, placing());
    c.leader(META_SHARD).await;
    let mut acked = Vec::new();
    for u in 0..40 {
        let user = format!("user-{u}");
        let shard = shard_of(c.node(1), &user);
        let key = format!("k{u}");
        let (seq, _) = append_retrying(c.node(1), shard, &user, &key, key.as_bytes(), 10).await;
        acked.push((user, shard, seq, key));
    }
    let a = c.join(1, "127.0.0.1:17004", 11).await;
    let b = c.join(2, "127.0.0.1:17005", 12).await;
    assert_eq!((a, b), (4, 5));

    // A move in flight: restart the node running the loop, then the
    // leader of a moving shard (if it is another node).
    let moving = until("a move in flight", 30, || async {
        let p = c.node(1).placement().await;
        p.ok().and_then(|p| p.decision.in_flight.first().map(|t| t.shard))
    })
    .await;
    let meta_leader = c.leader(META_SHARD).await;
    c.restart(meta_leader);
    let shard_leader = c.leader(moving).await;
    if shard_leader != meta_leader {
        c.restart(shard_leader);
    }

    c.eventually("balance over five nodes", 90, || balanced(&c, SHARDS, &[1, 2, 3, 4, 5]))
        .await;
    let via = c.leader(META_SHARD).await;
    c.eventually("the loop reports balance", 30, || async {
        c.node(via).placement().await.is_ok_and(|p| p.decision.balanced())
    })
    .await;
    let s = all_shards(&c, SHARDS).await;
    for n in [4, 5] {
        assert!(
            s.values().any(|(_, v, _)| v.contains(&n)),
            "node {n} got no replica: {s:?}"
        );
    }
    acked_on_every_voter(&c, &acked, &s).await;
}

/// A move to a node that stops while it catches up (snapshots sent at 64
/// KiB/s, so it is still catching up) is cancelled: the shard's leader
/// removes the learner, and the loop starts nothing towards a dead node.
/// Back, the node gets its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_a_node_that_dies_is_cancelled_and_its_learner_removed() {
    let tuning = RaftTuning {
        snapshot_send_bytes_per_s: pigeonhole_cluster::config::SNAPSHOT_SEND_BYTES_PER_S_MIN,
        // A shard's snapshot in several chunks, one a second.
        snapshot_chunk_bytes: 64 << 10,
        ..placing()
    };
    let mut c = TestCluster::new(3, 4, 3, tuning);
    c.leader(META_SHARD).await;
    c.node(1)
        .set_placement(PlacementChange {
            paused: Some(true),
            moves_max: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    // About 400 KiB per shard: a snapshot takes seconds at 64 KiB/s.
    let payload = vec![7u8; 8 << 10];
    for u in 0..200 {
        let user = format!("user-{u}");
        let shard = shard_of(c.node(1), &user);
        append_retrying(c.node(1), shard, &user, &format!("k{u}"), &payload, 10).await;
    }
    let d = c.join(1, "127.0.0.1:17004", 21).await;
    c.node(1)
        .set_placement(PlacementChange {
            paused: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    let shard = until("node 4 catching up as a learner", 30, || async {
        shards(&c)
            .await
            .into_iter()
            .find(|(_, (_, _, l))| l.contains(&d))
            .map(|(s, _)| s)
    })
    .await;
    // The leader reports the snapshot it streams to the learner, and the
    // count grows chunk by chunk.
    let leader = c.leader(shard).await;
    let first = until("a snapshot send to node 4 reported", 10, || async {
        snapshot_sent(&c, leader, shard, d).await.filter(|n| *n > 0)
    })
    .await;
    until("the snapshot send to grow", 10, || async {
        snapshot_sent(&c, leader, shard, d).await.filter(|n| *n > first)
    })
    .await;
    c.stop(d);
    c.eventually("the learner removed and the move closed", 30, || async {
        let s = shards(&c).await;
        let p = c.node(1).placement().await;
        s.get(&shard)
            .is_some_and(|(_, v, l)| !l.contains(&d) && !v.contains(&d))
            && p.is_ok_and(|p| p.decision.in_flight.is_empty())
    })
    .await;
    let leader = c.leader(shard).await;
    c.eventually("the snapshot send's report", 30, || async {
        snapshot_sent(&c, leader, shard, d).await.is_none()
    })
    .await;
    // Nothing goes to the dead node meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = shards(&c).await;
    assert!(s.values().all(|(_, v, l)| !v.contains(&d) && !l.contains(&d)), "{s:?}");

    c.start(d);
    c.eventually("balance over four nodes", 120, || balanced(&c, 4, &[1, 2, 3, 4]))
        .await;
}

/// A draining node is emptied by the loop with no operator step (D40).
/// Drained of leaderships only (a restart), node 4 leads nothing and keeps
/// its replicas; drained fully, every replica leaves it, and every
/// acknowledged append is on every voter of its shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_empties_a_draining_node() {
    let c = TestCluster::new(4, SHARDS, 3, placing());
    c.leader(META_SHARD).await;
    let mut acked = Vec::new();
    for u in 0..24 {
        let user = format!("user-{u}");
        let shard = shard_of(c.node(1), &user);
        let key = format!("k{u}");
        // With four nodes, not every one holds every shard.
        let via = c.node(1).shard_map().unwrap().shard(shard).unwrap().replicas[0];
        let (seq, _) = append_retrying(c.node(via), shard, &user, &key, key.as_bytes(), 10).await;
        acked.push((user, shard, seq, key));
    }
    let on4 = |s: &std::collections::BTreeMap<u64, (u64, Vec<u64>, Vec<u64>)>| {
        s.values().filter(|(_, v, _)| v.contains(&4)).count()
    };
    let held = on4(&all_shards(&c, SHARDS).await);
    assert!(held > 0, "the bootstrap map puts replicas on node 4");
    c.eventually("node 4 to lead a shard", 30, || async {
        shards(&c).await.values().any(|(l, _, _)| *l == 4)
    })
    .await;

    c.node(2).change_node_state(4, NodeState::Draining, true).await.unwrap();
    c.eventually("node 4 to lead nothing", 30, || async {
        let s = shards(&c).await;
        s.len() == usize::try_from(SHARDS).unwrap() && s.values().all(|(l, _, _)| *l != 4)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        on4(&all_shards(&c, SHARDS).await),
        held,
        "a leaders-only drain keeps the replicas"
    );

    c.node(3)
        .change_node_state(4, NodeState::Draining, false)
        .await
        .unwrap();
    c.eventually("node 4 to hold nothing", 90, || async {
        let s = shards(&c).await;
        s.len() == usize::try_from(SHARDS).unwrap()
            && s.values()
                .all(|(l, v, ls)| *l != 4 && !v.contains(&4) && !ls.contains(&4))
    })
    .await;
    let s = all_shards(&c, SHARDS).await;
    assert!(s.values().all(|(_, v, _)| v.len() == 3), "{s:?}");
    acked_on_every_voter(&c, &acked, &s).await;
}
