//! End to end, backup and restore through real processes (issue 15,
//! deliverable 3): a 3-node cluster with a split shard and a namespace
//! record is backed up by `phctl backup create` while SDK writers append;
//! `phctl backup verify` passes; `pigeonhole restore` seeds a NEW 2-node
//! cluster (another node count, another replication factor) from it. There,
//! every append acknowledged before the backup started is present exactly
//! once, at its seq, in order; nothing is there that was not acknowledged;
//! an idempotent retry of a backed-up append returns its original seq; the
//! split and the namespace record came along; new appends are taken.
//! Then a backup with one flipped byte is refused by verify and by restore.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_client::{pb, Client, SyncOptions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// (user index, key = payload, seq, when the ack came back).
type Timed = Arc<Mutex<Vec<(usize, Vec<u8>, u64, Instant)>>>;

fn spawn_timed_writers(
    client: &Client,
    users: &[pb::MailboxId],
    stop: &Arc<AtomicBool>,
    acked: &Timed,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (client, users, stop, acked) = (client.clone(), users.to_vec(), stop.clone(), acked.clone());
        set.spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let u = (i + w) % users.len();
                let key = format!("b{w}-{i}").into_bytes();
                let r = client
                    .append(&users[u], key.clone(), key.clone())
                    .await
                    .unwrap_or_else(|e| panic!("append {} failed: {e}", String::from_utf8_lossy(&key)));
                acked.lock().unwrap().push((u, key, r.seq, Instant::now()));
                i += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        });
    }
    set
}

/// `pigeonhole restore` (or the server, with `restore` None) for node `id`
/// of `initial`, data in `data`.
fn server(initial: &str, id: usize, addr: &str, data: &Path, restore_from: Option<&Path>) -> Command {
    let mut c = Command::new(server_bin());
    if let Some(from) = restore_from {
        c.arg("restore").arg("--from").arg(from);
    }
    c.args(["--node-id", &id.to_string(), "--initial-cluster", initial])
        .args(["--listen", addr, "--shards", &SHARDS.to_string()])
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn phctl(endpoints: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_phctl"))
        .env("PIGEONHOLE_ENDPOINTS", endpoints)
        .args(args)
        .output()
        .unwrap()
}

async fn whole_log(client: &Client, mb: &pb::MailboxId) -> Vec<pb::Message> {
    let mut out: Vec<pb::Message> = Vec::new();
    loop {
        let opts = SyncOptions {
            max_messages: 1_000,
            consistency: pb::ReadConsistency::Linearizable,
            ..SyncOptions::default()
        };
        let page = client.sync(mb, out.last().map_or(0, |m| m.seq), opts).await.unwrap();
        let more = page.has_more;
        out.extend(page.messages);
        if !more {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_load_restores_into_a_new_cluster_of_another_size() {
    let cluster = Cluster::start();
    cluster.wait_healthy(Duration::from_secs(30));
    let split = phctl_json_off_thread(
        &cluster,
        &["shard", "split", "1", "-o", "json", "--timeout-ms", "10000"],
    )
    .await;
    let new_shard = split["new_shard"]["id"].as_u64().unwrap();
    phctl_json_off_thread(
        &cluster,
        &["namespace", "create", "chat", "--ttl-s", "86400", "-o", "json"],
    )
    .await;
    let client = sdk(&cluster).await;
    let users = users();
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Timed = Arc::default();
    let writers = spawn_timed_writers(&client, &users, &stop, &acked);
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < 200 {
        assert!(Instant::now() < deadline, "the writers are stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Outside the cluster's directory, which goes with it.
    let keep = tempfile::tempdir().unwrap();
    let backup_dir = keep.path().join("backup");
    let started = Instant::now();
    let doc = phctl_json_off_thread(
        &cluster,
        &[
            "backup",
            "create",
            "--to",
            backup_dir.to_str().unwrap(),
            "-o",
            "json",
            "--chunk-bytes",
            "4096",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writers.join_all().await;
    assert_eq!(
        doc["shards"],
        SHARDS + 2,
        "four shards, the split's new one and the metadata group: {doc}"
    );
    assert_eq!(doc["bootstrap_shard_count"], SHARDS, "{doc}");
    let acked = acked.lock().unwrap().clone();
    let before: Vec<_> = acked.iter().filter(|a| a.3 < started).cloned().collect();
    assert!(
        before.len() >= 200,
        "the load ran before the backup: {} acks",
        before.len()
    );
    assert!(acked.len() > before.len(), "the load ran during the backup too");

    let verify = phctl("", &["backup", "verify", backup_dir.to_str().unwrap(), "-o", "json"]);
    assert!(verify.status.success(), "{}", text(&verify));
    drop(client);
    drop(cluster);

    // A new cluster of two nodes (replication factor 1 there).
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let initial = format!("1={},2={}", addrs[0], addrs[1]);
    // The bootstrap shard count must match the backup's.
    let wrong = Command::new(server_bin())
        .args(["restore", "--from", backup_dir.to_str().unwrap(), "--node-id", "1"])
        .args(["--initial-cluster", &initial, "--shards", "8"])
        .arg("--data-dir")
        .arg(dir.path().join("wrong"))
        .output()
        .unwrap();
    assert!(
        !wrong.status.success() && text(&wrong).contains("--shards 4"),
        "{}",
        text(&wrong)
    );
    for (i, addr) in addrs.iter().enumerate() {
        let out = server(
            &initial,
            i + 1,
            addr,
            &dir.path().join(format!("n{}", i + 1)),
            Some(&backup_dir),
        )
        .output()
        .unwrap();
        assert!(out.status.success(), "restore of node {}: {}", i + 1, text(&out));
        assert!(text(&out).contains("restored"), "{}", text(&out));
    }
    // Both restored nodes are in one new cluster, named by the backup: a
    // node started on an empty dir with the same flags is not in it.
    let identity = |i: usize| std::fs::read_to_string(dir.path().join(format!("n{i}/cluster-identity"))).unwrap();
    let cluster_id = |text: &str| text.lines().find(|l| l.starts_with("cluster_id=")).unwrap().to_string();
    assert_eq!(cluster_id(&identity(1)), cluster_id(&identity(2)));
    let spawn = |i: usize| {
        let mut c = server(&initial, i, &addrs[i - 1], &dir.path().join(format!("n{i}")), None);
        c.stdout(Stdio::null()).stderr(Stdio::inherit());
        c.spawn().unwrap()
    };
    let mut procs = Procs(vec![spawn(1), spawn(2)]);
    let mut cfg = pigeonhole_client::ClientConfig::new(addrs.iter().cloned());
    cfg.request_timeout = Duration::from_secs(30);
    let restored = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(cfg.clone()).await {
                Ok(c) => break c,
                Err(e) => assert!(Instant::now() < deadline, "the restored cluster never answered: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    // Every log: seqs 1..=n, each message one that was acknowledged, at its
    // acknowledged seq, once; every ack from before the backup is there.
    for (u, mb) in users.iter().enumerate() {
        let log = whole_log(&restored, mb).await;
        let seqs: Vec<u64> = log.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=log.len() as u64).collect::<Vec<_>>(),
            "user {u}: gaps or disorder"
        );
        for m in &log {
            let a = acked
                .iter()
                .find(|a| a.0 == u && a.1 == m.idempotency_key)
                .unwrap_or_else(|| panic!("user {u} seq {}: a message never acknowledged", m.seq));
            assert_eq!((a.2, a.1.as_slice()), (m.seq, m.payload.as_ref()), "user {u}");
        }
        for (_, key, seq, _) in before.iter().filter(|a| a.0 == u) {
            let m = log
                .get(usize::try_from(*seq).unwrap() - 1)
                .unwrap_or_else(|| panic!("user {u}: seq {seq}, acknowledged before the backup, is missing"));
            assert_eq!(&m.idempotency_key, key, "user {u} seq {seq}");
        }
    }
    // The dedup index came along: a retry returns the original seq.
    let (u, key, seq, _) = before.last().unwrap().clone();
    let again = restored.append(&users[u], key.clone(), key).await.unwrap();
    assert_eq!(again.seq, seq, "an idempotent retry after the restore");
    let fresh = restored
        .append(&users[u], &b"after-restore"[..], b"after-restore".to_vec())
        .await
        .unwrap();
    assert_eq!(fresh.seq, whole_log(&restored, &users[u]).await.len() as u64);
    // The split and the namespace record came along, and the records the
    // new leaders write keep the split's epochs and ranges.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let map = restored.shard_map().await.unwrap();
    let epochs: Vec<(u64, u64, u64)> = map.shards.iter().map(|s| (s.id, s.epoch, s.parent)).collect();
    assert!(
        epochs.contains(&(1, 1, 0)) && epochs.contains(&(new_shard, 1, 1)),
        "{epochs:?}"
    );
    let endpoints = addrs.join(",");
    let list = phctl(&endpoints, &["shard", "list", "-o", "json"]);
    assert!(list.status.success(), "{}", text(&list));
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let ids: Vec<u64> = list["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 5, "{list}");
    assert!(ids.contains(&new_shard), "{list}");
    let ns = phctl(&endpoints, &["namespace", "show", "chat", "-o", "json"]);
    assert!(ns.status.success() && text(&ns).contains("86400"), "{}", text(&ns));
    // A restart of a restored node keeps everything.
    let _ = procs.0[1].kill();
    let _ = procs.0[1].wait();
    procs.0[1] = spawn(2);
    for (u, mb) in users.iter().enumerate() {
        let log = whole_log(&restored, mb).await;
        assert!(
            log.len() >= before.iter().filter(|a| a.0 == u).count(),
            "user {u} after a restart"
        );
        assert_eq!(
            log.last().map(|m| m.seq),
            Some(log.len() as u64),
            "user {u} after a restart"
        );
    }
    drop(procs);

    // One flipped byte in a data shard's file: refused by both.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for e in std::fs::read_dir(&backup_dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let victim = bad.join(pigeonhole_backup::file_name(1));
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let verify = phctl("", &["backup", "verify", bad.to_str().unwrap()]);
    assert_eq!(verify.status.code(), Some(1), "{}", text(&verify));
    assert!(
        text(&verify).contains(&pigeonhole_backup::file_name(1)),
        "{}",
        text(&verify)
    );
    let data = dir.path().join("from-bad");
    let out = server(&initial, 1, &addrs[0], &data, Some(&bad)).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("backup refused") && text(&out).contains("corrupt"),
        "{}",
        text(&out)
    );
    assert!(!data.join("db").exists(), "nothing is written from a corrupt backup");
}

/// A data dir whose restore did not finish is refused at start.
#[test]
fn a_node_refuses_a_half_restored_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("RESTORE-INCOMPLETE"), "x").unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let out = server(&format!("1={addr}"), 1, &addr, dir.path(), None)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("restore"), "{}", text(&out));
}
