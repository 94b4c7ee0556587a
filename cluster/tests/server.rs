//! End to end through the real `pigeonhole` binary: a single node started as
//! a child process, driven over gRPC with the generated client. Covers every
//! unary RPC, the Sync long-poll, Subscribe, error details, deadlines,
//! server reflection, a graceful
//! SIGTERM, and a SIGKILL followed by a restart that must lose no
//! acknowledged append.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::admin_client::AdminClient;
use pigeonhole_proto::v1::mailbox_client::MailboxClient;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

mod server_common;

use server_common::{append, client, free_port, mb, start, start_with};

/// Appends, retrying while the node elects a leader after a (re)start.
async fn append_retrying(c: &mut MailboxClient<Channel>, req: pb::AppendRequest) -> pb::AppendResponse {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.append(req.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("append failed: {s:?}"),
        }
    }
}

fn sync_req(user: &str, after_seq: u64, wait_ms: u32) -> pb::SyncRequest {
    pb::SyncRequest {
        mailbox: mb(user),
        after_seq,
        max_messages: 0,
        max_bytes: 0,
        wait_ms,
        consistency: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_the_mailbox_api() {
    let dir = tempfile::tempdir().unwrap();
    // The same port across restarts: the node's address is part of its
    // cluster's identity, and a restart on another one is refused.
    let port = free_port();
    let mut s = start(dir.path(), port);
    let mut c = client(&s).await;

    // Append, and an idempotent retry.
    let r = append_retrying(&mut c, append("ann", "k1", b"hello")).await;
    assert_eq!((r.seq, r.duplicate), (1, false));
    let r = c.append(append("ann", "k1", b"hello")).await.unwrap().into_inner();
    assert_eq!((r.seq, r.duplicate), (1, true));
    // expected_last_seq mismatch: FAILED_PRECONDITION carrying last_seq.
    let mut cond = append("ann", "k2", b"x");
    cond.expected_last_seq = Some(5);
    let st = c.append(cond).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    let d = st.get_error_details();
    assert_eq!(d.error_info().unwrap().metadata["last_seq"], "1");
    // Bad input: INVALID_ARGUMENT with the field named.
    let st = c
        .append(pb::AppendRequest {
            mailbox: Some(pb::MailboxId {
                namespace: "BAD NS".into(),
                user_id: b"u".to_vec(),
            }),
            ..append("x", "k", b"v")
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let d = st.get_error_details();
    assert!(
        d.bad_request().unwrap().field_violations[0].field.contains("namespace"),
        "{st:?}"
    );

    // AppendBatch: one result per item, in order, across shards.
    let items: Vec<_> = (0..20)
        .map(|i| append(&format!("u{}", i % 5), &format!("b{i}"), b"m"))
        .collect();
    let mut bad = append("u0", "", b"m"); // no idempotency key
    bad.idempotency_key.clear();
    let mut all = items.clone();
    all.push(bad);
    let res = c
        .append_batch(pb::AppendBatchRequest { items: all })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(res.len(), 21);
    for (i, r) in res.iter().take(20).enumerate() {
        match &r.result {
            Some(pb::append_result::Result::Ok(ok)) => assert_eq!(ok.seq, (i / 5) as u64 + 1, "item {i}"),
            other => panic!("item {i}: {other:?}"),
        }
    }
    match &res[20].result {
        Some(pb::append_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert!(e.message.contains("idempotency_key"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }

    // Sync from a cursor.
    c.append(append("ann", "k2", b"world")).await.unwrap();
    let page = c.sync(sync_req("ann", 1, 0)).await.unwrap().into_inner();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(
        (page.messages[0].seq, page.messages[0].payload.as_ref()),
        (2, &b"world"[..])
    );
    assert_eq!(page.last_seq, 2);
    // Cursor ahead: OUT_OF_RANGE.
    assert_eq!(
        c.sync(sync_req("ann", 9, 0)).await.unwrap_err().code(),
        Code::OutOfRange
    );

    // Long-poll: returns as soon as a message arrives, well before wait_ms.
    let mut c2 = c.clone();
    let t = Instant::now();
    let waiting = tokio::spawn(async move { c2.sync(sync_req("ann", 2, 10_000)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.append(append("ann", "k3", b"late")).await.unwrap();
    let page = waiting.await.unwrap().unwrap().into_inner();
    assert_eq!(page.messages.len(), 1);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "long-poll did not wake: {:?}",
        t.elapsed()
    );
    // ... and returns empty when the wait expires.
    let t = Instant::now();
    let page = c.sync(sync_req("ann", 3, 300)).await.unwrap().into_inner();
    assert!(page.messages.is_empty() && t.elapsed() >= Duration::from_millis(290));

    // A long-poll longer than the client's deadline ends with an empty page
    // just before the deadline, not with an error.
    let t = Instant::now();
    let mut req = tonic::Request::new(sync_req("ann", 3, 10_000));
    req.set_timeout(Duration::from_millis(400));
    let page = c.sync(req).await.unwrap().into_inner();
    assert!(page.messages.is_empty());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // A short deadline leaves the node most of its time: a long-poll with
    // a 20 ms grpc-timeout waits 15 ms (three quarters) for a message
    // before its empty page. With a flat 20 ms margin the node had 0 ms
    // left and gave up at its timer's first tick, as an append with such a
    // deadline did (DEADLINE_EXCEEDED while its write went on). The page
    // leaves the node 5 ms before the client gives up; on a busy test
    // machine the client's own timer may still win, which is an error
    // after the wait, never before it.
    let t = Instant::now();
    let mut req = tonic::Request::new(sync_req("ann", 3, 10_000));
    req.set_timeout(Duration::from_millis(20));
    match c.sync(req).await {
        Ok(page) => assert!(page.into_inner().messages.is_empty()),
        Err(st) => assert!(matches!(st.code(), Code::DeadlineExceeded | Code::Cancelled), "{st:?}"),
    }
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(15), "{waited:?}");

    // A reused idempotency key with another payload: ALREADY_EXISTS, with
    // the original seq.
    let st = c.append(append("ann", "k1", b"not hello")).await.unwrap_err();
    assert_eq!(st.code(), Code::AlreadyExists, "{st:?}");
    assert_eq!(st.get_error_details().error_info().unwrap().metadata["seq"], "1");

    // Subscribe from a cursor beyond last_seq: OUT_OF_RANGE naming it.
    let st = c
        .subscribe(pb::SubscribeRequest {
            mailboxes: vec![pb::MailboxCursor {
                mailbox: mb("ann"),
                after_seq: 99,
            }],
            max_in_flight: 0,
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
    assert!(st.message().contains("mailboxes[0].after_seq"), "{st:?}");

    // Server reflection lists the public services (grpcurl works).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut refl = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let ask = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = refl
        .server_reflection_info(tokio_stream::iter(vec![ask]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let services: Vec<String> = match answer.message_response {
        Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("{other:?}"),
    };
    for want in ["pigeonhole.v1.Mailbox", "pigeonhole.v1.Admin", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == want), "{want} missing from {services:?}");
    }
    assert!(
        !services.iter().any(|s| s.contains("internal")),
        "the internal protocol is not advertised: {services:?}"
    );

    // Subscribe: backlog, then live messages, in order.
    let mut stream = c
        .subscribe(pb::SubscribeRequest {
            mailboxes: vec![pb::MailboxCursor {
                mailbox: mb("ann"),
                after_seq: 1,
            }],
            max_in_flight: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let mut next_live = 0;
    while seen.len() < 5 {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("subscribe stalled")
            .unwrap()
            .unwrap();
        match ev.event {
            Some(pb::subscribe_response::Event::Messages(m)) => seen.extend(m.messages.iter().map(|x| x.seq)),
            other => panic!("{other:?}"),
        }
        if seen.len() >= 2 && next_live < 3 {
            c.append(append("ann", &format!("live{next_live}"), b"l"))
                .await
                .unwrap();
            next_live += 1;
        }
    }
    assert_eq!(seen, vec![2, 3, 4, 5, 6], "backlog then live, in order, no gaps");

    // Ack, GetCursors, Trim, Delete.
    let a = c
        .ack(pb::AckRequest {
            mailbox: mb("ann"),
            device_id: b"phone".to_vec(),
            seq: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((a.cursor, a.advanced), (2, true));
    let cur = c
        .get_cursors(pb::GetCursorsRequest { mailbox: mb("ann") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cur.cursors.len(), 1);
    assert_eq!((cur.cursors[0].seq, cur.cursors[0].unread, cur.last_seq), (2, 4, 6));
    let d = c
        .delete(pb::DeleteRequest {
            mailbox: mb("ann"),
            seq: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.deleted);
    assert_eq!(
        c.delete(pb::DeleteRequest {
            mailbox: mb("ann"),
            seq: 99
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    let t = c
        .trim(pb::TrimRequest {
            mailbox: mb("ann"),
            up_to_seq: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((t.low_watermark, t.removed), (3, 2));
    let st = c.sync(sync_req("ann", 0, 0)).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "trimmed cursor");
    assert_eq!(
        st.get_error_details().error_info().unwrap().metadata["low_watermark"],
        "3"
    );

    // Admin: the shard map (with leader hints from the metadata group),
    // node status, and leader transfer's refusals.
    let mut admin = AdminClient::connect(format!("http://{}", s.addr)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let map = loop {
        let m = admin
            .get_shard_map(pb::GetShardMapRequest {})
            .await
            .unwrap()
            .into_inner();
        if m.shards.iter().all(|s| s.leader_hint == 1) || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(map.nodes.len(), 1);
    assert_eq!(map.nodes[0].address, s.addr);
    assert_eq!(map.shards.len(), 4);
    assert!(
        map.shards.iter().all(|s| s.replicas == vec![1] && s.leader_hint == 1),
        "{map:?}"
    );
    assert_eq!(map.shards[0].range_start, 0);
    assert!(map.shards[3].range_end.is_none());
    let st = admin
        .node_status(pb::NodeStatusRequest {
            include_sizes: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.node_id, 1);
    // "ann" holds messages: her shard's replica has a complete, non-zero size.
    let ann_shard = map
        .shards
        .iter()
        .find(|s| {
            let h = pigeonhole_proto::placement::user_hash(b"ann");
            pigeonhole_proto::placement::range_contains(s.range_start, s.range_end, h)
        })
        .unwrap()
        .id;
    let r = st.replicas.iter().find(|r| r.shard == ann_shard).unwrap();
    assert!(r.size_complete && r.data_keys > 0 && r.data_bytes > 0, "{r:?}");
    assert_eq!(st.replicas.len(), 5, "metadata group + 4 shards");
    // Sizes of named shards only: the others report none (and every replica
    // is still listed).
    let other = map.shards.iter().find(|s| s.id != ann_shard).unwrap().id;
    let only = admin
        .node_status(pb::NodeStatusRequest {
            include_sizes: true,
            size_shards: vec![other],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only.replicas.len(), 5);
    let sized: Vec<u64> = only
        .replicas
        .iter()
        .filter(|r| r.size_complete)
        .map(|r| r.shard)
        .collect();
    assert_eq!(sized, vec![other], "{only:?}");
    let e = admin
        .node_status(pb::NodeStatusRequest {
            include_sizes: true,
            size_shards: vec![1; 1_025],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("size_shards"), "{e:?}");
    assert!(st
        .replicas
        .iter()
        .all(|r| r.role == pb::ReplicaRole::Leader as i32 && r.applied_index >= 5));
    let e = admin
        .transfer_leader(pb::TransferLeaderRequest { shard: 1, to_node: 7 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.get_error_details().bad_request().unwrap().field_violations[0].field,
        "to_node",
        "the field is named as in the proto"
    );
    // A shard that does not exist is NOT_FOUND, never retryable.
    for shard in [99, 999_999, u64::MAX] {
        let e = admin
            .transfer_leader(pb::TransferLeaderRequest { shard, to_node: 1 })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "shard {shard}: {e:?}");
        assert_eq!(e.get_error_details().error_info().unwrap().reason, "NO_SUCH_SHARD");
    }

    // Graceful stop: SIGTERM, exit 0; a restart keeps everything.
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = s.child.wait().unwrap();
    assert!(status.success(), "graceful shutdown exit: {status:?}");
    drop(c);
    let s = start(dir.path(), port);
    let mut c = client(&s).await;
    let r = append_retrying(&mut c, append("ann", "k3", b"late")).await;
    assert_eq!((r.seq, r.duplicate), (3, true), "state and dedup survive a restart");
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_append() {
    sigkill_under_load_then_check(&[], false).await;
}

/// The state machine is written without a WAL (D26): a kill loses the
/// applies since the last flush, and the restart replays them from the Raft
/// log. With a tiny log (compaction every 32 entries per shard) the log is
/// compacted, and the state flushed, many times before the kill; the log
/// must never have been compacted past what the state machine holds on
/// disk, or the replay would have a hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_many_log_compactions_replays_what_was_not_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pigeonhole.toml");
    std::fs::write(&config, "[raft]\nlog_entries_max = 32\nlog_retain_entries = 0\n").unwrap();
    sigkill_under_load_then_check(&["--config", config.to_str().unwrap()], true).await;
}

/// Kills a node under concurrent appends, restarts it, and checks every
/// acknowledged append. `compacted`: the logs must have been compacted
/// before the kill.
async fn sigkill_under_load_then_check(extra: &[&str], compacted: bool) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut s = start_with(dir.path(), port, extra);
    let mut c = client(&s).await;
    append_retrying(&mut c, append("kim", "warm", b"w")).await;
    // Concurrent appenders; the node is killed while they run.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                let key = format!("w{w}-{i}");
                match c.append(append(&format!("user{w}"), &key, key.as_bytes())).await {
                    Ok(r) => acked.push((w, r.into_inner().seq, key)),
                    Err(_) => return acked,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    s.child.wait().unwrap();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(acked.len() > 20, "too few appends before the kill: {}", acked.len());
    drop(c);
    let s = start_with(dir.path(), port, extra);
    let mut c = client(&s).await;
    // Wait for the node to lead again.
    append_retrying(&mut c, append("kim", "after", b"a")).await;
    if compacted {
        let status = AdminClient::connect(format!("http://{}", s.addr))
            .await
            .unwrap()
            .node_status(pb::NodeStatusRequest {
                include_sizes: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let firsts: Vec<u64> = status.replicas.iter().map(|r| r.first_index).collect();
        assert!(
            firsts.iter().any(|f| *f > 32),
            "no shard's log was compacted before the kill: first indexes {firsts:?}"
        );
    }
    for w in 0..8 {
        let want: Vec<(u64, String)> = acked
            .iter()
            .filter(|(ww, _, _)| *ww == w)
            .map(|(_, seq, key)| (*seq, key.clone()))
            .collect();
        let page = c
            .sync(pb::SyncRequest {
                max_messages: 1000,
                ..sync_req(&format!("user{w}"), 0, 0)
            })
            .await
            .unwrap()
            .into_inner();
        // Every acknowledged append is there, at its seq, with gap-free seqs.
        for (i, m) in page.messages.iter().enumerate() {
            assert_eq!(m.seq, i as u64 + 1, "gap in user{w}");
        }
        for (seq, key) in want {
            let m = page
                .messages
                .get(usize::try_from(seq - 1).unwrap())
                .expect("acknowledged append lost");
            assert_eq!(m.idempotency_key, key.as_bytes(), "user{w} seq {seq}");
        }
    }
    drop(s);
}

/// Parallel tests take ports from `free_port`: it must never hand the same
/// one out twice in a process (a plain bind to port 0 gave 1,754 distinct
/// ports in 2,000 calls here), or two tests' servers race for it.
#[test]
fn free_ports_are_never_handed_out_twice() {
    let ports: Vec<u16> = (0..2_000).map(|_| free_port()).collect();
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len());
}
