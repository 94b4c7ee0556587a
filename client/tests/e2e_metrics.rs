//! The Prometheus endpoint end to end (issue 15, part 1): three real nodes
//! with `--metrics-listen`, load through the SDK (appends, retries that
//! deduplicate, a Subscribe stream), two scrapes of every node; the names
//! the dashboard and the alerts use exist, the counters move between the
//! scrapes, and labels stay bounded (a namespace without a record counts
//! as `other`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{free_port, server_bin, Procs};
use pigeonhole_client::mailbox;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` on `addr`: every sample line, `name{labels}` → value.
async fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.") && body.contains(" 200 "), "{body:.200}");
    body.lines()
        .filter(|l| l.starts_with("pigeonhole_"))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_string(), v.parse::<f64>().unwrap()))
        .collect()
}

/// The sum of every sample of `name` (any labels) across `scrapes`.
fn total(scrapes: &[BTreeMap<String, f64>], name: &str) -> f64 {
    scrapes
        .iter()
        .flat_map(|m| m.iter())
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_names_what_moves() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (p, _))| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let _nodes = Procs(
        ports
            .iter()
            .enumerate()
            .map(|(i, (p, m))| {
                Command::new(server_bin())
                    .args(["--node-id", &(i + 1).to_string(), "--initial-cluster", &initial])
                    .args(["--listen", &format!("127.0.0.1:{p}")])
                    .args(["--metrics-listen", &format!("127.0.0.1:{m}")])
                    .args(["--shards", "2"])
                    .arg("--data-dir")
                    .arg(dir.path().join(format!("n{}", i + 1)))
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let endpoints: Vec<String> = ports.iter().map(|(p, _)| format!("127.0.0.1:{p}")).collect();
    let metrics: Vec<String> = ports.iter().map(|(_, m)| format!("127.0.0.1:{m}")).collect();
    let client = common::connect_when_up(&endpoints, Duration::from_secs(60)).await;
    client.set_namespace("chat", None, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await; // every node reads the record
    let alice = mailbox("chat", b"alice");
    let mut sub = client.subscribe(vec![(alice.clone(), 0)], 0).unwrap();

    let load = |tag: &'static str| {
        let client = client.clone();
        let alice = alice.clone();
        async move {
            for i in 0..50 {
                let key = format!("{tag}{i}");
                client
                    .append(&alice, key.clone().into_bytes(), key.clone())
                    .await
                    .unwrap();
                // The same key again: answered from the dedup index.
                let again = client.append(&alice, key.clone().into_bytes(), key).await.unwrap();
                assert!(again.duplicate);
                client
                    .append(&mailbox("unlisted", b"bob"), b"x".to_vec(), format!("{tag}{i}"))
                    .await
                    .unwrap();
            }
        }
    };
    load("a").await;
    assert!(sub.next().await.unwrap().is_ok(), "the stream delivers");
    tokio::time::sleep(Duration::from_secs(6)).await; // a sampler round
    let mut first = Vec::new();
    for m in &metrics {
        first.push(scrape(m).await);
    }
    load("b").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut second = Vec::new();
    for m in &metrics {
        second.push(scrape(m).await);
    }

    // Counters that this load moves, summed over the nodes.
    for name in [
        "pigeonhole_grpc_requests_total",
        "pigeonhole_grpc_request_duration_seconds_count",
        "pigeonhole_raft_proposals_total",
        "pigeonhole_raft_committed_entries_total",
        "pigeonhole_raft_applied_entries_total",
        "pigeonhole_raft_log_written_bytes_total",
        "pigeonhole_raft_log_fsyncs_total",
        "pigeonhole_raft_log_write_duration_seconds_count",
        "pigeonhole_raft_log_fsync_batch_entries_count",
        "pigeonhole_dedup_hits_total",
        "pigeonhole_namespace_appends_total",
        "pigeonhole_namespace_append_bytes_total",
    ] {
        let (a, b) = (total(&first, name), total(&second, name));
        assert!(a > 0.0 && b > a, "{name}: {a} then {b}");
    }
    // Every append of the second round was admitted by some node, and
    // each one's retry hit the dedup index on every replica.
    let appends = |s: &[BTreeMap<String, f64>], ns: &str| {
        total(s, &format!("pigeonhole_namespace_appends_total{{namespace=\"{ns}\"}}"))
    };
    // At least (an SDK retry after a timeout is admitted again).
    assert!(appends(&second, "chat") - appends(&first, "chat") >= 100.0);
    assert!(appends(&second, "other") - appends(&first, "other") >= 50.0);
    assert!(
        second.iter().all(|m| !m.keys().any(|k| k.contains("unlisted"))),
        "a namespace without a record is not a label"
    );
    let dedup = total(&second, "pigeonhole_dedup_hits_total") - total(&first, "pigeonhole_dedup_hits_total");
    assert!(dedup >= 150.0, "50 duplicates applied on each of 3 replicas: {dedup}");
    // The Append method is labelled, with its code.
    assert!(
        total(
            &second,
            "pigeonhole_grpc_requests_total{method=\"pigeonhole.v1.Mailbox/Append\",code=\"Ok\"}"
        ) >= 150.0
    );
    // Raft's view: elections and leaders (at start), replicas by state.
    for name in [
        "pigeonhole_raft_elections_total",
        "pigeonhole_raft_leader_changes_total",
    ] {
        assert!(total(&second, name) > 0.0, "{name}");
    }
    assert_eq!(
        total(&second, "pigeonhole_raft_replicas"),
        9.0,
        "3 shards (2 data, 1 metadata) on each of 3 nodes"
    );
    for name in [
        "pigeonhole_raft_apply_lag_entries",
        "pigeonhole_rocksdb_compaction_pending_bytes",
        "pigeonhole_rocksdb_write_stopped",
        "pigeonhole_rocksdb_memtable_bytes",
    ] {
        assert!(second.iter().all(|m| m.contains_key(name)), "{name} on every node");
    }
    // One stream open, following one mailbox, on the node serving it.
    assert_eq!(total(&second, "pigeonhole_subscribe_streams"), 1.0);
    assert_eq!(total(&second, "pigeonhole_subscribe_followed_mailboxes"), 1.0);
    drop(sub);
}
