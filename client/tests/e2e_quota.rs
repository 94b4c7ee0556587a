//! Namespaces' limits end to end on a real node: a namespace over its
//! appends/s or bytes/s is refused with RESOURCE_EXHAUSTED and a RetryInfo
//! delay while another namespace on the same shards is not; the SDK waits
//! the delay out and gets every append through; phctl sets and lists. A
//! namespace at its storage quota is refused (ask again in a round) while
//! another is not, and takes appends again once trimmed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{free_port, server_bin, Procs};
use pigeonhole_client::{pb, retry_delay, Client};
use pigeonhole_proto::v1::mailbox_client::MailboxClient;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

fn append(ns: &str, key: String, payload: Vec<u8>) -> pb::AppendRequest {
    pb::AppendRequest {
        mailbox: Some(pb::MailboxId {
            namespace: ns.into(),
            user_id: b"alice".to_vec(),
        }),
        payload: payload.into(),
        idempotency_key: key.into_bytes(),
        expected_last_seq: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_over_its_limit_is_refused_with_a_delay_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, addr, client) = one_node(dir.path(), 2).await;
    let r = client.set_namespace("noisy", Some(20), None).await.unwrap();
    assert!(r.created);
    client.set_namespace("big", None, Some(10_000)).await.unwrap();
    let mut raw = MailboxClient::connect(format!("http://{addr}")).await.unwrap();

    // Within a second every node enforces it: hammer until it refuses.
    let mut n = 0u64;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        n += 1;
        match raw.append(append("noisy", format!("w{n}"), b"x".to_vec())).await {
            Ok(_) => assert!(Instant::now() < deadline, "the limit was never enforced"),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                break;
            }
        }
    }

    // For 3 s: noisy as fast as one caller goes, quiet alongside.
    let quiet = {
        let mut q = raw.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                q.append(append("quiet", format!("q{i}"), b"x".to_vec()))
                    .await
                    .unwrap_or_else(|s| panic!("quiet append {i} refused: {s:?}"));
            }
        })
    };
    let (mut ok, mut refused) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        n += 1;
        match raw.append(append("noisy", format!("w{n}"), b"x".to_vec())).await {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                let d = retry_delay(&s).expect("a RetryInfo delay");
                assert!(d > Duration::ZERO && d <= Duration::from_secs(1), "{d:?}");
                assert!(
                    s.message().contains("\"noisy\"") && s.message().contains("appends_per_s"),
                    "{s:?}"
                );
                refused += 1;
                // Not a spin: a caller that honours nothing still pauses.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap();
    assert!(refused > 0);
    // At most the rate plus one bucket (20) and a rounding's worth.
    let bound = (20 * ms).div_ceil(1_000) + 20 + 2;
    assert!(ok <= bound, "{ok} appends in {ms} ms at 20/s");
    quiet.await.unwrap();

    // The SDK waits out the delays and gets every append through.
    let mb = pigeonhole_client::mailbox("noisy", b"bob");
    tokio::time::sleep(Duration::from_millis(1_100)).await; // a full bucket
    let t = Instant::now();
    for i in 0..40 {
        client.append(&mb, b"y".to_vec(), format!("sdk{i}")).await.unwrap();
    }
    // 20 from the bucket, 20 more at 20/s: at least about a second.
    assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());

    // Bytes: two 4 KB payloads fit 10,000 bytes/s, a third at once does not.
    for i in 0..2 {
        raw.append(append("big", format!("b{i}"), vec![0; 4_000]))
            .await
            .unwrap();
    }
    let s = raw
        .append(append("big", "b2".into(), vec![0; 4_000]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("bytes_per_s"), "{s:?}");

    // phctl lists what was set; a limit lifted lets everything through.
    let out = Command::new(env!("CARGO_BIN_EXE_phctl"))
        .args(["--endpoints", &addr, "-o", "json", "namespace", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let noisy = v["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "noisy")
        .unwrap();
    assert_eq!(noisy["appends_per_s"], 20);
    let out = Command::new(env!("CARGO_BIN_EXE_phctl"))
        .args([
            "--endpoints",
            &addr,
            "namespace",
            "set",
            "noisy",
            "--appends-per-s",
            "0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    for i in 0..100 {
        raw.append(append("noisy", format!("free{i}"), b"x".to_vec()))
            .await
            .unwrap();
    }
}

/// Starts one node with `shards` data shards; its address and an SDK
/// client.
async fn one_node(dir: &std::path::Path, shards: u32) -> (Procs, String, Client) {
    let addr = format!("127.0.0.1:{}", free_port());
    let node = Procs(vec![Command::new(server_bin())
        .args(["--listen", &addr, "--shards", &shards.to_string()])
        .arg("--data-dir")
        .arg(dir.join("n1"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()]);
    let client = common::connect_when_up(std::slice::from_ref(&addr), Duration::from_secs(30)).await;
    (node, addr, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_at_its_storage_quota_is_refused_until_trimmed() {
    const QUOTA: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (_node, addr, client) = one_node(dir.path(), 1).await;
    client
        .set_namespace_fields(pb::SetNamespaceRequest {
            name: "capped".into(),
            storage_bytes_max: Some(QUOTA),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut raw = MailboxClient::connect(format!("http://{addr}")).await.unwrap();
    // 1 KiB appends until refused. The bound (docs/operations.md
    // "Quotas"): a shard is counted when it grew by at least 4 MiB of log
    // or, while the namespace holds half its quota, every 10 s round it
    // was written in, and nodes read the counts every second; so a
    // namespace is refused past its quota by at most 4 MiB plus what it
    // wrote in the last round and a poll (12 s, said generously).
    let (mut n, mut stored_payload) = (0u64, 0u64);
    let mut timeline: std::collections::VecDeque<(Instant, u64)> = std::collections::VecDeque::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let refusal = loop {
        n += 1;
        match raw.append(append("capped", format!("c{n}"), vec![1; 1_024])).await {
            Ok(_) => stored_payload += 1_024,
            Err(s) => break s,
        }
        timeline.push_back((Instant::now(), stored_payload));
        while timeline
            .front()
            .is_some_and(|(t, _)| t.elapsed() > Duration::from_secs(12))
        {
            timeline.pop_front();
        }
        assert!(Instant::now() < deadline, "never refused after {stored_payload} bytes");
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    // Ask again no sooner than the next count (the size checker's round).
    assert_eq!(retry_delay(&refusal), Some(Duration::from_secs(10)));
    let d = tonic_types::StatusExt::get_error_details(&refusal);
    assert_eq!(d.error_info().unwrap().reason, "STORAGE_QUOTA_EXCEEDED");
    // Not before the quota (counted bytes include keys and dedup entries,
    // so less than the quota in payloads may fill it), not past the bound.
    assert!(
        stored_payload >= QUOTA / 2,
        "refused at {stored_payload} bytes of payload"
    );
    let last_round = stored_payload - timeline.front().map_or(0, |(_, b)| *b);
    assert!(
        stored_payload - last_round <= QUOTA + (4 << 20),
        "{stored_payload} bytes stored before the refusal, {last_round} of them in the last 12 s"
    );
    // The SDK honours the delay only within its deadline: with the
    // default 10 s one, it fails at once instead of sleeping into it.
    let t = Instant::now();
    let e = client
        .append(&pigeonhole_client::mailbox("capped", b"alice"), b"z".to_vec(), "sdk")
        .await
        .unwrap_err();
    assert_eq!(e.status().unwrap().code(), Code::ResourceExhausted);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Another namespace on the same shard is not limited.
    for i in 0..50 {
        raw.append(append("open", format!("o{i}"), vec![1; 1_024]))
            .await
            .unwrap();
    }
    let listed = client.namespaces().await.unwrap();
    let capped = listed.iter().find(|n| n.name == "capped").unwrap();
    assert!(capped.stored_bytes >= QUOTA, "{capped:?}");

    // Trimmed: the next count finds room and appends go through again.
    let mb = pigeonhole_client::mailbox("capped", b"alice");
    let last = client.cursors(&mb).await.unwrap().last_seq;
    client.trim(&mb, last).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    loop {
        i += 1;
        match raw.append(append("capped", format!("again{i}"), vec![1; 10])).await {
            Ok(_) => break,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
        assert!(Instant::now() < deadline, "still refused after the trim");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An Append refused as invalid takes nothing from its namespace's rate:
/// its caller hears what is wrong with it (INVALID_ARGUMENT, not
/// QUOTA_EXCEEDED), and the valid append after it still fits. Red when the
/// rate was charged before the append was checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_append_is_refused_as_invalid_and_takes_no_quota() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, addr, client) = one_node(dir.path(), 2).await;
    // 1 append/s: a bucket of one second, one token.
    client.set_namespace("tight", Some(1), None).await.unwrap();
    let mut raw = MailboxClient::connect(format!("http://{addr}")).await.unwrap();
    // Until the node enforces it, and then the bucket is empty.
    let deadline = Instant::now() + Duration::from_secs(5);
    for n in 0.. {
        match raw.append(append("tight", format!("fill-{n}"), b"x".to_vec())).await {
            Ok(_) => assert!(Instant::now() < deadline, "the limit was never enforced"),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                break;
            }
        }
    }
    // One token again.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let s = raw
        .append(append("tight", String::new(), b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("idempotency_key"), "{}", s.message());
    raw.append(append("tight", "after-the-invalid-one".into(), b"x".to_vec()))
        .await
        .unwrap_or_else(|s| panic!("the invalid append used up the namespace's token: {s:?}"));
}
