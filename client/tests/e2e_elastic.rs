//! End to end, a cluster's whole elastic life in one run through real
//! processes (issue 13's end-to-end sequence): three nodes under SDK load;
//! two nodes join and the placement loop balances them in; eight shards
//! are split (the loop paused meanwhile, as an operator splitting many
//! shards would) and the loop balances the twelve; node 1 is drained (the
//! loop moves its replicas) and removed; the four left restart one by one
//! (drained of leaderships, stopped with SIGTERM, started, undrained). The
//! SDK writers must see no failed request, and every acknowledged append
//! must be stored exactly once, in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Replicas per node id from `phctl node list` (removed nodes left out).
async fn replicas_per_node(cluster: &Cluster) -> Vec<(u64, u64)> {
    let doc = phctl_json_off_thread(cluster, &["node", "list", "-o", "json"]).await;
    doc["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] != "removed")
        .map(|n| (n["id"].as_u64().unwrap(), n["replicas"].as_u64().unwrap()))
        .collect()
}

/// `cluster balance --wait` until balanced; then replicas per node are
/// within one of each other over `nodes`, and sum to `total`.
async fn balanced(cluster: &Cluster, nodes: &[u64], total: u64) {
    let doc = balance_wait(cluster).await;
    assert_eq!(doc["balanced"], true, "{doc}");
    let per = replicas_per_node(cluster).await;
    let ids: Vec<u64> = per.iter().map(|(n, _)| *n).collect();
    assert_eq!(ids, nodes, "{per:?}");
    let counts: Vec<u64> = per.iter().map(|(_, c)| *c).collect();
    assert_eq!(counts.iter().sum::<u64>(), total, "{per:?}");
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "replicas per node {per:?} after {doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_split_drain_and_roll_under_load_fail_no_request_and_lose_nothing() {
    let mut cluster = Cluster::start();
    cluster.wait_healthy(Duration::from_secs(30));
    let client = sdk(&cluster).await;
    let users = users();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers_until(&client, &users, "e", Duration::from_millis(5), usize::MAX, &stop);

    // Grow: two nodes join; the loop alone balances them in.
    let joined: Vec<u64> = tokio::task::block_in_place(|| vec![cluster.join_new(""), cluster.join_new("")]);
    assert_eq!(joined, vec![4, 5]);
    balanced(&cluster, &[1, 2, 3, 4, 5], SHARDS * 3).await;

    // Split: each shard, then each new one (eight splits, twelve shards).
    phctl_json_off_thread(&cluster, &["cluster", "placement", "--pause", "-o", "json"]).await;
    let mut to_split: Vec<u64> = (1..=SHARDS).collect();
    let mut made = Vec::new();
    for round in 0..2 {
        let mut next = Vec::new();
        for shard in &to_split {
            let id = shard.to_string();
            let doc = phctl_json_off_thread(
                &cluster,
                &["shard", "split", &id, "-o", "json", "--timeout-ms", "10000"],
            )
            .await;
            next.push(doc["new_shard"]["id"].as_u64().unwrap());
        }
        made.extend(next.iter().copied());
        assert_eq!(next.len(), 4, "round {round}");
        to_split = next;
    }
    assert_eq!(made.len(), 8);
    // The node the SDK asks learns the last splits from their records,
    // written just after each split applies.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let routing = loop {
        client.refresh().await.unwrap();
        let routing = client.routing();
        if routing.shards.len() == 12 || std::time::Instant::now() > deadline {
            break routing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(routing.shards.len(), 12, "{:?}", routing.shards);
    let mut next = Some(0u64);
    for s in &routing.shards {
        assert_eq!(Some(s.range_start), next, "ranges tile the space: {:?}", routing.shards);
        next = s.range_end;
    }
    assert_eq!(next, None);
    phctl_json_off_thread(&cluster, &["cluster", "placement", "--resume", "-o", "json"]).await;
    balanced(&cluster, &[1, 2, 3, 4, 5], 12 * 3).await;

    // Shrink: node 1 drained (the loop moves its replicas), removed, stopped.
    let doc = phctl_long_op(&cluster, &["node", "drain", "1"]).await;
    assert!(
        doc["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains("by the placement loop")),
        "{doc}"
    );
    phctl_json_off_thread(&cluster, &["node", "remove", "1", "-o", "json"]).await;
    let status = tokio::task::block_in_place(|| cluster.stop(1));
    assert!(status.success(), "node 1 did not stop cleanly: {status}");
    tokio::task::block_in_place(|| cluster.wait_healthy(Duration::from_secs(30)));
    balanced(&cluster, &[2, 3, 4, 5], 12 * 3).await;

    // Roll: each node left, in turn.
    for node in 2..=5u64 {
        roll(&mut cluster, node).await;
    }

    stop.store(true, Ordering::Relaxed);
    let acked = join_writers(writers, "the joins, splits, drain, removal and rolling restart").await;
    assert!(acked.len() > 200, "the writers made little progress: {}", acked.len());
    assert_logs_on_some_node(&cluster, &[2, 3, 4, 5], &users, &acked).await;
}
