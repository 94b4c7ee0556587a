//! End to end, growing a cluster through real processes (issue 13,
//! deliverable 1): two nodes started with `--join` get ids 4 and 5 from
//! the cluster and start empty, every node learns their addresses,
//! the servers' placement loop moves replicas onto them as evenly as the
//! zones allow, with no operator step (`phctl cluster balance --wait` only
//! watches), and a joined node restarts under its id from its own
//! data dir, without `--join`. SDK writers append throughout: no request
//! may fail, and every acknowledged append is stored once, in order. The
//! nodes have zones (1: z1, 2: z2, 3: z3, then 4: z1, 5: z2), and every
//! shard must end with its three replicas in three zones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn node_list(cluster: &Cluster) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_phctl"))
        .env("PIGEONHOLE_ENDPOINTS", cluster.endpoints())
        .args(["node", "list", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["nodes"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_join_under_load_take_their_share_and_restart_under_their_ids() {
    let mut cluster = Cluster::start_zoned(&["z1", "z2", "z3"]);
    cluster.wait_healthy(Duration::from_secs(30));
    let client = sdk(&cluster).await;
    let users = users();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers_until(&client, &users, "j", Duration::from_millis(5), usize::MAX, &stop);

    let joined: Vec<u64> = tokio::task::block_in_place(|| vec![cluster.join_new("z1"), cluster.join_new("z2")]);
    assert_eq!(joined, vec![4, 5], "ids follow the initial cluster's");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = tokio::task::block_in_place(|| node_list(&cluster));
        let up: Vec<(u64, &str)> = rows
            .iter()
            .filter(|r| r["state"] == "up")
            .map(|r| (r["id"].as_u64().unwrap(), r["zone"].as_str().unwrap()))
            .collect();
        // Every node's zone is in its record: the joined ones' from their
        // join, the initial ones' written by each node once it started.
        if up == vec![(1, "z1"), (2, "z2"), (3, "z3"), (4, "z1"), (5, "z2")] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes are not listed up with their zones: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let doc = balance_wait(&cluster).await;
    assert_eq!(doc["balanced"], true, "{doc}");
    assert_eq!(doc["paused"], false, "{doc}");
    let counts =
        |rows: &[serde_json::Value]| -> Vec<u64> { rows.iter().map(|r| r["replicas"].as_u64().unwrap()).collect() };
    let rows = tokio::task::block_in_place(|| node_list(&cluster));
    let replicas = counts(&rows);
    // Zone z3 has one node, so it keeps a replica of every shard; z1 and z2
    // split theirs over two nodes each: as even as the zones allow.
    assert_eq!(SHARDS, 4);
    assert_eq!(replicas, vec![2, 2, 4, 2, 2], "replicas per node {rows:?} after {doc}");
    // Leaderships too: with every node a voter of some shards, within one.
    let leaders: Vec<u64> = rows.iter().map(|r| r["leaders"].as_u64().unwrap()).collect();
    assert_eq!(leaders.iter().sum::<u64>(), SHARDS, "{rows:?}");
    assert!(
        leaders.iter().max().unwrap() - leaders.iter().min().unwrap() <= 1,
        "leaders per node {leaders:?}"
    );

    // Every shard's replicas in three zones (the map read anew: the SDK's
    // may predate the moves).
    let zone = |n: u64| ["z1", "z2", "z3", "z1", "z2"][usize::try_from(n - 1).unwrap()];
    client.refresh().await.unwrap();
    for s in client.routing().shards.iter() {
        let mut zs: Vec<&str> = s.replicas.iter().map(|n| zone(*n)).collect();
        zs.sort_unstable();
        zs.dedup();
        assert_eq!(zs.len(), 3, "shard {} has replicas {:?}", s.id, s.replicas);
    }

    // A joined node restarts from its data dir, without --join: same id,
    // no new join.
    let status = tokio::task::block_in_place(|| cluster.stop(4));
    assert!(status.success(), "node 4 did not stop cleanly: {status}");
    cluster.spawn(4);
    tokio::task::block_in_place(|| cluster.wait_healthy(Duration::from_secs(30)));
    let rows = tokio::task::block_in_place(|| node_list(&cluster));
    assert_eq!(rows.len(), 5, "a restart is not a new node: {rows:?}");
    assert_eq!(counts(&rows), replicas, "{rows:?}");

    stop.store(true, Ordering::Relaxed);
    let acked = join_writers(writers, "the joins, the moves and the restart").await;
    assert!(acked.len() > 100, "the writers made little progress: {}", acked.len());
    // After the moves a user's shard may be on a joined node.
    assert_logs_on_some_node(&cluster, &[1, 2, 3, 4, 5], &users, &acked).await;
}
