//! End to end, a replica move through real processes and phctl: a leader's
//! replica moved under SDK load, and a move cut short with the new node
//! killed, finished by running the same command again (issue 13). Apart
//! from e2e.rs so that each file stays one role.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use std::time::Duration;

/// `phctl shard move -o json` succeeded, and its voters are 3, with `to`
/// and without `from`.
fn assert_moved(out: &std::process::Output, from: u64, to: u64) {
    assert!(
        out.status.success(),
        "phctl shard move: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let voters: Vec<u64> = serde_json::from_value(doc["voters"].clone()).unwrap();
    assert!(voters.contains(&to) && !voters.contains(&from), "{doc}");
    assert_eq!(voters.len(), 3, "{doc}");
}

/// `phctl shard move` under SDK load, through real processes: 4 nodes, a
/// shard's leader replica moves to the node without one. The writers see
/// no failed request, every acknowledged append is on the new replica once
/// and in order, and the old node deletes its replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phctl_moves_a_leader_replica_under_load_and_the_old_node_deletes_it() {
    let cluster = Cluster::start_n(4);
    cluster.wait_healthy(Duration::from_secs(30));
    // The move below unbalances the replica counts on purpose.
    cluster.pause_placement();
    let client = sdk(&cluster).await;
    let users = users();
    let shard = client.routing().shard_for(&users[0].user_id).unwrap().id;
    let replicas = client.routing().shard(shard).unwrap().replicas.clone();
    let to = (1..=4).find(|n| !replicas.contains(n)).unwrap();
    let from = leader_of(&client, shard).await;
    assert!(replicas.contains(&from));

    let writers = spawn_writers(&client, &users, "m", Duration::from_millis(5));
    let endpoints = cluster.endpoints();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_phctl"))
            .env("PIGEONHOLE_ENDPOINTS", endpoints)
            .args(["shard", "move", &shard.to_string(), "--from", &from.to_string()])
            .args(["--to", &to.to_string(), "-o", "json", "--timeout-ms", "10000"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_moved(&out, from, to);

    let acked = join_writers(writers, "the move").await;
    // Every acknowledged append of the moved shard's users is on the new
    // replica, once, in order, with the payload acknowledged for it.
    let moved_users: Vec<usize> = (0..USERS)
        .filter(|u| client.routing().shard_for(&users[*u].user_id).unwrap().id == shard)
        .collect();
    for u in moved_users {
        let got = read_all(&cluster.addr(to), &users[u]).await.unwrap();
        assert_log_matches(u, &got, &acked);
    }
    let st = client.node_status(from, false).await.unwrap();
    assert!(
        st.replicas.iter().all(|r| r.shard != shard),
        "node {from} still holds shard {shard}"
    );
}

/// A move cut short after its first step (phctl's deadline passes once the
/// learner is added), then the new node SIGKILLed and restarted: running
/// the same command again finishes the move, and nothing acknowledged is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_cut_short_and_a_node_killed_is_finished_by_running_it_again() {
    let mut cluster = Cluster::start_n(4);
    cluster.wait_healthy(Duration::from_secs(30));
    cluster.pause_placement();
    let client = sdk(&cluster).await;
    let users = users();
    let user = &users[1];
    let shard = client.routing().shard_for(&user.user_id).unwrap().id;
    let replicas = client.routing().shard(shard).unwrap().replicas.clone();
    let to = (1..=4).find(|n| !replicas.contains(n)).unwrap();
    let leader = leader_of(&client, shard).await;
    let from = *replicas.iter().find(|n| **n != leader).unwrap();
    for i in 0..40 {
        let key = format!("c{i}").into_bytes();
        client.append(user, key.clone(), key).await.unwrap();
    }
    let mv = |cluster: &Cluster, wait_ms: &str| {
        cluster
            .phctl()
            .args(["shard", "move", &shard.to_string(), "--from", &from.to_string()])
            .args(["--to", &to.to_string(), "--wait-ms", wait_ms, "-o", "json"])
            .output()
            .unwrap()
    };
    let first = mv(&cluster, "1");
    // Almost always cut short (exit 3) after the learner was added; if the
    // learner caught up within the first poll, the move simply finished.
    assert!(matches!(first.status.code(), Some(0 | 3)), "{first:?}");
    cluster.kill(to);
    cluster.spawn(to);
    let again = mv(&cluster, "60000");
    assert_moved(&again, from, to);
    let got = read_all(&cluster.addr(to), user).await.unwrap();
    let keys: Vec<Vec<u8>> = got.iter().map(|m| m.idempotency_key.clone()).collect();
    let want: Vec<Vec<u8>> = (0..40).map(|i| format!("c{i}").into_bytes()).collect();
    assert_eq!(
        keys, want,
        "the moved replica holds every acknowledged append, in order"
    );
    let st = client.node_status(from, false).await.unwrap();
    assert!(
        st.replicas.iter().all(|r| r.shard != shard),
        "node {from} still holds shard {shard}"
    );
}
