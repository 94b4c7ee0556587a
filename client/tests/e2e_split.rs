//! End to end, splitting shards through real processes (issue 13,
//! deliverable 4; D38): three nodes under SDK load, `phctl shard split` on
//! each of the four shards and then on each of the four new ones (eight
//! splits, twelve shards). No SDK request may fail (a request routed before
//! a split is refused with WRONG_SHARD and the SDK routes it again), every
//! acknowledged append is stored once, in order, every node holds a replica
//! of every shard, and a node restarted after the splits serves them all.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `phctl shard split ID` (JSON): the two shards' ids and ranges.
async fn split(cluster: &Cluster, shard: u64) -> serde_json::Value {
    let id = shard.to_string();
    phctl_json_off_thread(cluster, &["shard", "split", &id, "-o", "json", "--timeout-ms", "10000"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_splits_under_load_fail_no_request_and_lose_nothing() {
    let mut cluster = Cluster::start();
    cluster.wait_healthy(Duration::from_secs(30));
    let client = sdk(&cluster).await;
    let users = users();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers_until(&client, &users, "s", Duration::from_millis(5), usize::MAX, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut new_ids = Vec::new();
    for shard in 1..=SHARDS {
        let doc = split(&cluster, shard).await;
        assert_eq!(doc["shard"]["id"], shard, "{doc}");
        new_ids.push(doc["new_shard"]["id"].as_u64().unwrap());
    }
    for shard in new_ids.clone() {
        let doc = split(&cluster, shard).await;
        new_ids.push(doc["new_shard"]["id"].as_u64().unwrap());
    }
    let mut ids = new_ids.clone();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 8, "eight new shards, each id once: {new_ids:?}");
    assert!(ids[0] > SHARDS, "{ids:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Twelve shards whose ranges tile the hash space, each on all three
    // nodes, with a leader.
    client.refresh().await.unwrap();
    let routing = client.routing();
    assert_eq!(routing.shards.len(), 12, "{:?}", routing.shards);
    let mut next = 0u64;
    for s in &routing.shards {
        assert_eq!(s.range_start, next, "ranges tile the space: {:?}", routing.shards);
        let mut r = s.replicas.clone();
        r.sort_unstable();
        assert_eq!(r, vec![1, 2, 3], "shard {}", s.id);
        match s.range_end {
            Some(e) => next = e,
            None => assert_eq!(s.id, routing.shards.last().unwrap().id),
        }
    }
    // phctl sees the twelve, each led (the newest may still be electing).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let list = phctl_json_off_thread(&cluster, &["shard", "list", "-o", "json"]).await;
        let shards = list["shards"].as_array().unwrap();
        assert_eq!(shards.len(), 12, "{list}");
        if shards.iter().all(|s| s["leader"].as_u64().unwrap_or(0) != 0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a shard has no leader: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A node restarted after the splits comes back with all twelve.
    let status = tokio::task::block_in_place(|| cluster.stop(2));
    assert!(status.success(), "node 2 did not stop cleanly: {status}");
    cluster.spawn(2);
    tokio::task::block_in_place(|| cluster.wait_healthy(Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_millis(500)).await;

    stop.store(true, Ordering::Relaxed);
    let acked = join_writers(writers, "the splits and the restart").await;
    assert!(acked.len() > 100, "the writers made little progress: {}", acked.len());
    for n in 1..=3 {
        for (u, user) in users.iter().enumerate() {
            let got = read_all(&cluster.addr(n), user).await.unwrap();
            assert_log_matches(u, &got, &acked);
        }
    }
}
