//! Helpers for tests of the placement loop and of replica moves.
//! (Lints as in `common`, whose allowances cover this module.)

use super::{fast_tuning, TestCluster};
use pigeonhole_cluster::placement::META_SHARD;
use pigeonhole_cluster::{RaftTuning, Role};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Fast timings with the loop on: a placement round every 100 ms and the
/// rebalancer every 200 ms.
pub fn placing() -> RaftTuning {
    RaftTuning {
        placement_every_ticks: 10,
        rebalance_every_ticks: 20,
        // A node restarted mid-move may miss its removal; its stale replica
        // goes within a second or so (D37), well inside the harness's
        // 10 s waits for one leader per shard.
        stale_replica_after_ms: 1_000,
        // A move to a node stopped by a test is called off within seconds
        // (30 s by default, so a node busy ingesting a large snapshot
        // keeps its move).
        move_target_silent_ms_max: 2_000,
        ..fast_tuning()
    }
}

/// Shard → (leader, voters, learners), from the leaders' own status.
pub async fn shards(c: &TestCluster) -> BTreeMap<u64, (u64, Vec<u64>, Vec<u64>)> {
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

/// `shards`, once every one of `count` shards has a leader (the map lacks
/// a shard during an election or a leader transfer).
pub async fn all_shards(c: &TestCluster, count: u64) -> BTreeMap<u64, (u64, Vec<u64>, Vec<u64>)> {
    until("a leader for every shard", 10, || async {
        let s = shards(c).await;
        (s.len() == usize::try_from(count).unwrap()).then_some(s)
    })
    .await
}

/// Polls `f` every 20 ms until it yields a value, or fails with `what`.
pub async fn until<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
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
pub async fn snapshot_sent(c: &TestCluster, node: u64, shard: u64, to: u64) -> Option<u64> {
    c.status(node, shard)
        .await
        .and_then(|s| s.snapshot_sends.iter().find(|(t, _)| *t == to).map(|(_, n)| *n))
}

pub fn spread(counts: &BTreeMap<u64, usize>) -> usize {
    counts.values().max().unwrap() - counts.values().min().unwrap()
}

/// Replicas and leaderships per node within one, on every node in `nodes`,
/// each shard on three distinct nodes with no learner left.
pub async fn balanced(c: &TestCluster, shard_count: u64, nodes: &[u64]) -> bool {
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

/// An acknowledged append: (user, shard, seq, key = payload).
pub type Acked = (String, u64, u64, String);

/// Waits until every acknowledged append is, alone and at its seq, in its
/// user's mailbox on every voter of its shard in `s`.
pub async fn acked_on_every_voter(c: &TestCluster, acked: &[Acked], s: &BTreeMap<u64, (u64, Vec<u64>, Vec<u64>)>) {
    for (user, shard, seq, key) in acked {
        for v in &s[shard].1 {
            let node = c.node(*v);
            c.eventually(&format!("{user} on node {v}"), 30, || async {
                super::read_all(node, *shard, user) == vec![(*seq, key.as_bytes().to_vec())]
            })
            .await;
        }
    }
}
