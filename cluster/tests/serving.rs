//! The served Mailbox API over nodes of the in-process cluster (the
//! filtering router), called without a socket: what a request costs before
//! it reaches Raft, what a Subscribe stream costs while it waits and after
//! its client goes, how it ends when its replica is cut off, and how reads
//! pending on a follower behave when the leader dies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{fast_tuning, TestCluster};
use pigeonhole_cluster::api::{ApiLimits, MailboxService};
use pigeonhole_cluster::transport::local::{DropMessageTypes, Isolate};
use pigeonhole_cluster::{ClusterError, RaftTuning, Role};
use pigeonhole_engine::raft::eraftpb::MessageType;
use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::mailbox_server::Mailbox;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::{Code, Request};
use tonic_types::StatusExt;

fn service(c: &TestCluster, id: u64) -> (MailboxService, tokio::sync::watch::Sender<bool>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (MailboxService::new(c.node(id).clone(), ApiLimits::default(), rx), tx)
}

fn mailbox(user: &str) -> Option<pb::MailboxId> {
    Some(pb::MailboxId {
        namespace: "app".into(),
        user_id: user.as_bytes().to_vec(),
    })
}

fn append(user: &str, key: &str, payload: Vec<u8>) -> pb::AppendRequest {
    pb::AppendRequest {
        mailbox: mailbox(user),
        payload: payload.into(),
        idempotency_key: key.as_bytes().to_vec(),
        expected_last_seq: None,
    }
}

fn subscribe(users: impl Iterator<Item = String>) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        mailboxes: users
            .map(|u| pb::MailboxCursor {
                mailbox: mailbox(&u),
                after_seq: 0,
            })
            .collect(),
        max_in_flight: 0,
    }
}

fn quiet_tuning() -> RaftTuning {
    RaftTuning {
        // No background proposals: the log moves only for our requests.
        expire_dedup_every_ticks: 0,
        ..fast_tuning()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_subscribe_streams_cost_nothing_and_cancelled_ones_stop() {
    let c = TestCluster::new(1, 4, 1, quiet_tuning());
    for shard in 1..=4 {
        c.leader(shard).await;
    }
    let (svc, _closing) = service(&c, 1);
    let watchers = c.node(1).watchers().clone();
    let mut streams = Vec::new();
    for i in 0..10 {
        let req = subscribe((0..2_000).map(|j| format!("quiet-{i}-{j}")));
        streams.push(svc.subscribe(Request::new(req)).await.unwrap().into_inner());
    }
    let counts = watchers.counts();
    assert_eq!((counts.streams, counts.stream_mailboxes), (10, 20_000));

    // Writes to mailboxes nobody follows wake no stream.
    let before = watchers.wakeups();
    for k in 0..50 {
        svc.append(Request::new(append(
            &format!("busy-{}", k % 5),
            &format!("k{k}"),
            vec![1; 64],
        )))
        .await
        .unwrap();
    }
    assert_eq!(
        watchers.wakeups(),
        before,
        "a write to an unfollowed mailbox woke a stream"
    );

    // A write to a followed mailbox wakes exactly its stream, which delivers it.
    svc.append(Request::new(append("quiet-3-7", "only", b"hello".to_vec())))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), streams[3].next())
        .await
        .expect("the followed mailbox's message was not delivered")
        .unwrap()
        .unwrap();
    match ev.event {
        Some(pb::subscribe_response::Event::Messages(m)) => {
            assert_eq!(m.mailbox, mailbox("quiet-3-7"));
            assert_eq!(m.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(watchers.wakeups(), before + 1);

    // The clients cancel: every stream stops and unregisters within 1 s,
    // though none of their mailboxes is written again.
    drop(streams);
    let cancelled = Instant::now();
    while watchers.counts().streams != 0 {
        assert!(
            cancelled.elapsed() < Duration::from_secs(1),
            "cancelled streams still open after 1 s: {:?}",
            watchers.counts()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(watchers.counts().stream_mailboxes, 0);
    assert!(!watchers.any());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_a_limit_never_reaches_the_log() {
    let c = TestCluster::new(1, 1, 1, quiet_tuning());
    c.leader(1).await;
    let (svc, _closing) = service(&c, 1);
    svc.append(Request::new(append("u", "k0", b"ok".to_vec())))
        .await
        .unwrap();
    let last_index = |c: &TestCluster| {
        let c = c.node(1).clone();
        async move {
            let st = c.status().await.unwrap();
            let s = st.iter().find(|s| s.shard == 1).unwrap();
            (s.last_index, s.commit)
        }
    };
    let before = last_index(&c).await;

    // One payload byte over 1 MiB: refused naming `payload` and 1 MiB.
    let err = svc
        .append(Request::new(append("u", "k1", vec![0; (1 << 20) + 1])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let v = err.get_error_details().bad_request().unwrap().field_violations[0].clone();
    assert_eq!(v.field, "payload");
    assert!(v.description.contains("1048576"), "{}", v.description);
    // Other fields and RPCs are checked before Raft too.
    let err = svc.append(Request::new(append("u", "", vec![1]))).await.unwrap_err();
    assert_eq!(
        err.get_error_details().bad_request().unwrap().field_violations[0].field,
        "idempotency_key"
    );
    let err = svc
        .ack(Request::new(pb::AckRequest {
            mailbox: mailbox("u"),
            device_id: Vec::new(),
            seq: 1,
        }))
        .await
        .unwrap_err();
    assert_eq!(
        err.get_error_details().bad_request().unwrap().field_violations[0].field,
        "device_id"
    );
    assert_eq!(last_index(&c).await, before, "a refused request reached the log");

    // In a batch, each bad item is named by its path; good items commit.
    let mut bad_ns = append("u", "k3", vec![1]);
    bad_ns.mailbox.as_mut().unwrap().namespace = "No Such".into();
    let res = svc
        .append_batch(Request::new(pb::AppendBatchRequest {
            items: vec![
                append("u", "k2", vec![1]),
                append("u", "k4", vec![0; (1 << 20) + 1]),
                bad_ns,
            ],
        }))
        .await
        .unwrap()
        .into_inner();
    let err_of = |i: usize| match &res.results[i].result {
        Some(pb::append_result::Result::Error(e)) => e.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    assert!(matches!(res.results[0].result, Some(pb::append_result::Result::Ok(_))));
    let e = err_of(1);
    assert_eq!(e.code, Code::InvalidArgument as i32);
    assert!(e.message.contains("items[1].payload"), "{}", e.message);
    assert!(
        err_of(2).message.contains("items[2].mailbox.namespace"),
        "{}",
        err_of(2).message
    );
    let after = last_index(&c).await;
    assert_eq!(after.0, before.0 + 1, "only the good item's entry may be in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_on_a_cut_off_replica_ends_unavailable() {
    let c = TestCluster::new(3, 1, 3, fast_tuning());
    let leader = c.leader(1).await;
    let (lsvc, _c1) = service(&c, leader);
    lsvc.append(Request::new(append("u", "k1", b"one".to_vec())))
        .await
        .unwrap();
    for cut in [(1..=3).find(|n| *n != leader).unwrap(), leader] {
        let (svc, _c2) = service(&c, cut);
        let mut stream = svc
            .subscribe(Request::new(subscribe(std::iter::once("u".to_string()))))
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert!(matches!(first.event, Some(pb::subscribe_response::Event::Messages(_))));
        // Idle long enough to hibernate: detection must not rely on ticks.
        c.wait_all_asleep().await;
        let filter = c.router.add_filter(Isolate(cut));
        let t0 = Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap_or_else(|_| panic!("the stream on cut-off node {cut} stayed silent for 5 s"));
        let status = end.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.get_error_details().error_info().unwrap().reason, "NO_LEADER");
        // peer_down_after_ms (300) + election timeout (100–200 ms) + slack.
        assert!(t0.elapsed() < Duration::from_millis(1_500), "took {:?}", t0.elapsed());
        assert!(stream.next().await.is_none(), "the stream ends after the error");
        c.router.remove_filter(filter);
        c.leader(1).await;
        assert_eq!(c.node(cut).watchers().counts().streams, 0);
    }
}

async fn reads_pending_on_a_follower_end_soon_after_a_new_leader(winner_is_reader: bool) {
    // Ticks of 50 ms: one election timeout is 500–1,000 ms, far below the
    // 5 s request timeout a lost ReadIndex used to wait for.
    let tuning = RaftTuning {
        tick_ms: 50,
        election_ticks: 10,
        peer_down_after_ms: 600,
        node_heartbeat_ms: 100,
        request_timeout_ms: 5_000,
        hibernate_after_ticks: 0,
        ..quiet_tuning()
    };
    let election_ms = tuning.tick_ms * tuning.election_ticks as u64;
    let mut c = TestCluster::new(3, 1, 3, tuning);
    let old = c.leader(1).await;
    let reader = (1..=3).find(|n| *n != old).unwrap();
    let other = (1..=3).find(|n| *n != old && *n != reader).unwrap();
    // The leader dies; the follower still believes in it, so the reads it
    // takes now are forwarded to a dead node.
    c.stop(old);
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let node = c.node(reader).clone();
        reads.spawn(async move {
            let r = node.read_barrier(1).await;
            (r, Instant::now())
        });
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let winner = if winner_is_reader { reader } else { other };
    // Only `winner` can win: the other candidate's vote requests to it are
    // lost (it needs the winner's vote, the winner needs only its own and
    // the other's).
    c.router.add_filter(DropMessageTypes {
        to: winner,
        types: vec![MessageType::MsgRequestPreVote, MessageType::MsgRequestVote],
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_leader_at = loop {
        let st = c.status(reader, 1).await.unwrap();
        let ws = c.status(winner, 1).await.unwrap();
        if ws.role == Role::Leader && st.leader == winner {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    while let Some(done) = reads.join_next().await {
        let (res, at) = done.unwrap();
        let late = at.saturating_duration_since(new_leader_at);
        assert!(
            late <= Duration::from_millis(election_ms),
            "a pending read ended {late:?} after the new leader appeared (election timeout {election_ms} ms): {res:?}"
        );
        match res {
            Ok(()) => {}
            Err(ClusterError::NoLeader { .. } | ClusterError::NotLeader { .. } | ClusterError::Dropped { .. }) => {}
            Err(e) => panic!("not a retryable error: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_pending_on_a_follower_survive_a_leader_kill_when_another_node_wins() {
    reads_pending_on_a_follower_end_soon_after_a_new_leader(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_pending_on_a_follower_survive_a_leader_kill_when_it_wins_itself() {
    reads_pending_on_a_follower_end_soon_after_a_new_leader(true).await;
}

/// A STALE Sync on a node without a replica of the mailbox's shard goes to
/// the engine without the driver; it must still name a node that holds one
/// (`leader_hint`), as a proposal's NOT_REPLICA does, so a client can
/// route there instead of trying nodes at random.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_read_on_a_node_without_the_shard_names_a_replica() {
    // 4 nodes, 3 replicas per shard: every shard is missing from one node.
    let c = TestCluster::new(4, 4, 3, quiet_tuning());
    for shard in 1..=4 {
        c.leader(shard).await;
    }
    let map = c.node(1).shard_map().unwrap();
    // A user, its shard, and a node without a replica of that shard.
    let (user, shard, outsider) = (0..10_000)
        .map(|i| format!("stale-{i}"))
        .find_map(|u| {
            let d = map.shard_for_user(u.as_bytes()).unwrap();
            let outsider = (1..=4).find(|n| !d.replicas.contains(n))?;
            Some((u, d.id, outsider))
        })
        .unwrap();
    let holders = map.shard(shard).unwrap().replicas.clone();
    let (svc, _closing) = service(&c, outsider);
    let st = svc
        .sync(Request::new(pb::SyncRequest {
            mailbox: mailbox(&user),
            after_seq: 0,
            max_messages: 0,
            max_bytes: 0,
            wait_ms: 0,
            consistency: pb::ReadConsistency::Stale.into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    let info = st.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "NOT_REPLICA", "{st:?}");
    let hint: u64 = info.metadata.get("leader_hint").expect("leader_hint").parse().unwrap();
    assert!(holders.contains(&hint), "hint {hint} is not one of {holders:?}: {st:?}");
}
