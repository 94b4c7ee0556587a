//! End to end, a rolling restart through real processes (issue 13,
//! deliverable 5): each node of a 3-node cluster in turn is drained of its
//! leaderships (`phctl node drain --leaders-only`; its replicas stay, and
//! the other two keep every shard's quorum), stopped with SIGTERM, started
//! again and undrained, while SDK writers append throughout.
//!
//! The writers use a request deadline (`ROLL_REQUEST_TIMEOUT`) shorter than
//! a failover, so a node stopped while it still led a shard would fail
//! requests (the node's peers need `peer_down_after_ms` plus an election
//! timeout, at least 2 s with the defaults, to elect a new leader): zero
//! failed requests means the drain really handed everything off first.
//! Every acknowledged append must then be stored once, in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_client::{Client, ClientConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Each request's whole budget, retries included: ample for an append on
/// a loaded 2-core machine (tens of ms), short of a failover (≥ 2 s).
const ROLL_REQUEST_TIMEOUT: Duration = Duration::from_millis(1_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_load_fails_no_request_and_loses_nothing() {
    let mut cluster = Cluster::start();
    cluster.wait_healthy(Duration::from_secs(30));
    let mut cfg = ClientConfig::new(cluster.endpoints().split(',').map(String::from));
    cfg.request_timeout = ROLL_REQUEST_TIMEOUT;
    cfg.attempt_timeout = ROLL_REQUEST_TIMEOUT;
    let client = Client::connect(cfg).await.unwrap();
    let users = users();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers_until(&client, &users, "r", Duration::from_millis(5), usize::MAX, &stop);

    for node in 1..=NODES {
        roll(&mut cluster, node).await;
    }

    stop.store(true, Ordering::Relaxed);
    let acked = join_writers(writers, "the rolling restart").await;
    assert!(
        acked.len() > 100,
        "the writers made little progress: {} appends",
        acked.len()
    );
    for (u, user) in users.iter().enumerate() {
        let got = read_all(&cluster.addr(1), user).await.unwrap();
        assert_log_matches(u, &got, &acked);
    }
}
