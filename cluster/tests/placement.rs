//! The placement loop in process (issue 13, deliverable 3): the servers
//! bring a grown cluster to balance with no operator step, a move survives
//! its shard's leader and the loop's own node restarting, and a move to a
//! node that dies is cancelled and its learner removed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_cluster::placement::META_SHARD;
use pigeonhole_cluster::{RaftTuning, Role};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const SHARDS: u64 = 8;

/// Fast timings with the loop on: a placement round every 100 ms and the
/// rebalancer every 200 ms.
fn placing() -> RaftTuning {
    RaftTuning {
        placement_every_ticks: 10,
        rebalance_every_ticks: 20,
        ..fast_tuning()
    }
}

/// Shard → (leader, voters, learners), from the leaders' own status.
async fn shards(c: &TestCluster) -> BTreeMap<u64, (u64, Vec<u64>, Vec<u64>)> {
    let mut out = BTreeMap::new();
    for (id, n) in &c.nodes {
        for s in n.status().await.unwrap() {
            if s.shard != META_SHARD && s.role == Role::Leader {
                out.insert(s.shard, (*id, s.voters, s.learners));
            }
        }
    }
    out
}

/// Polls `f` every 20 ms until it yields a value, or fails with `what`.
async fn until<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bytes `node`'s replica of `shard` reports sent in a snapshot to `to`.
async fn snapshot_sent(c: &TestCluster, node: u64, shard: u64, to: u64) -> Option<u64> {
    c.status(node, shard)
        .await
        .and_then(|s| s.snapshot_sends.iter().find(|(t, _)| *t == to).map(|(_, n)| *n))
}

fn spread(counts: &BTreeMap<u64, usize>) -> usize {
    counts.values().max().unwrap() - counts.values().min().unwrap()
}

/// Replicas and leaderships per node within one, on every node in `nodes`,
/// each shard on three distinct nodes with no learner left.
async fn balanced(c: &TestCluster, shard_count: u64, nodes: &[u64]) -> bool {
    let s = shards(c).await;
    if s.len() != usize::try_from(shard_count).unwrap() {
        return false;
    }
    let mut replicas: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    let mut leaders = replicas.clone();
    for (leader, voters, learners) in s.values() {
        let distinct: BTreeSet<u64> = voters.iter().copied().collect();
        if distinct.len() != 3 || !learners.is_empty() {
            return false;
        }
        for v in voters {
            *replicas.entry(*v).or_default() += 1;
        }
        *leaders.entry(*leader).or_default() += 1;
    }
    replicas.len() == nodes.len() && spread(&replicas) <= 1 && spread(&leaders) <= 1
}

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
    let s = shards(&c).await;
    for n in [4, 5] {
        assert!(
            s.values().any(|(_, v, _)| v.contains(&n)),
            "node {n} got no replica: {s:?}"
        );
    }
    for (user, shard, seq, key) in &acked {
        for v in &s[shard].1 {
            let node = c.node(*v);
            c.eventually(&format!("{user} on node {v}"), 30, || async {
                read_all(node, *shard, user) == vec![(*seq, key.as_bytes().to_vec())]
            })
            .await;
        }
    }
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
    c.node(1).set_placement(Some(true), Some(1)).await.unwrap();
    // About 400 KiB per shard: a snapshot takes seconds at 64 KiB/s.
    let payload = vec![7u8; 8 << 10];
    for u in 0..200 {
        let user = format!("user-{u}");
        let shard = shard_of(c.node(1), &user);
        append_retrying(c.node(1), shard, &user, &format!("k{u}"), &payload, 10).await;
    }
    let d = c.join(1, "127.0.0.1:17004", 21).await;
    c.node(1).set_placement(Some(false), None).await.unwrap();
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
