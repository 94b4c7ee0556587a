//! Retention policies end to end on real processes (issue 14, part 4;
//! D43): a TTL set with phctl trims a namespace's messages, and only after
//! the TTL, across a leader transfer and across a SIGKILL and restart of
//! the leader, while another namespace in the same shard keeps everything
//! and a retried append of a trimmed message still gets its original seq
//! (the dedup window); the per-mailbox maximum, trimming what every device
//! acked, a mailbox's legal hold and a namespace-wide hold each do what
//! they say.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{leader_of, sdk, text, Cluster};
use pigeonhole_client::{mailbox, pb, Client};
use std::time::{Duration, Instant};

/// `(low_watermark, last_seq)` of `mb`.
async fn range(client: &Client, mb: &pb::MailboxId) -> (u64, u64) {
    let c = client.cursors(mb).await.unwrap();
    (c.low_watermark, c.last_seq)
}

/// Waits until `mb`'s low watermark reaches `low`; returns when it did.
async fn wait_low(client: &Client, mb: &pb::MailboxId, low: u64, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let (l, _) = range(client, mb).await;
        if l >= low {
            assert_eq!(l, low, "trimmed past {low}");
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{mb:?} never trimmed to {low} (low watermark {l})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn append_n(client: &Client, mb: &pb::MailboxId, tag: &str, n: u64) {
    for i in 0..n {
        client
            .append(mb, format!("{tag}{i}").into_bytes(), format!("{tag}{i}").into_bytes())
            .await
            .unwrap();
    }
}

fn phctl_ok(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let out = cluster.phctl().args(args).args(["-o", "json"]).output().unwrap();
    assert!(out.status.success(), "phctl {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_trims_only_after_it_passed_across_a_leader_change_and_a_restart() {
    const TTL: Duration = Duration::from_secs(3);
    let mut cluster = Cluster::start();
    cluster.wait_healthy(Duration::from_secs(60));
    let client = sdk(&cluster).await;
    let short = mailbox("short", b"alice");
    let kept = mailbox("kept", b"alice"); // same user id: same shard
    let set = phctl_ok(&cluster, &["namespace", "set", "short", "--ttl-s", "3"]);
    assert_eq!(set["namespaces"][0]["ttl_ms"], 3_000, "{set}");

    let start = Instant::now();
    append_n(&client, &short, "a", 5).await;
    append_n(&client, &kept, "k", 5).await;
    // Leadership moves before the TTL passes: the next leader trims.
    let shard = client.routing().shard_for(b"alice").unwrap().id;
    let leader = leader_of(&client, shard).await;
    let to = cluster.nodes.iter().map(|n| n.id).find(|n| *n != leader).unwrap();
    client.transfer_leader(shard, to).await.unwrap();
    let trimmed = wait_low(&client, &short, 6, Duration::from_secs(30)).await;
    assert!(
        trimmed.duration_since(start) >= TTL,
        "trimmed {:?} after the first append, before the {TTL:?} TTL",
        trimmed.duration_since(start)
    );
    assert_eq!(
        range(&client, &kept).await,
        (1, 5),
        "a namespace without a policy keeps everything"
    );
    // A retry of a trimmed message is still a duplicate (the dedup window).
    let again = client.append(&short, b"a2".to_vec(), b"a2".to_vec()).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (3, true));

    // The leader now is SIGKILLed and restarted before the next TTL passes.
    let start = Instant::now();
    append_n(&client, &short, "b", 3).await;
    let leader = leader_of(&client, shard).await;
    cluster.kill(leader);
    cluster.spawn(leader);
    let trimmed = wait_low(&client, &short, 9, Duration::from_secs(60)).await;
    assert!(trimmed.duration_since(start) >= TTL);
    assert_eq!(range(&client, &short).await, (9, 8));
    assert_eq!(range(&client, &kept).await, (1, 5));
    cluster.wait_healthy(Duration::from_secs(60));
    // Every replica trimmed the same: each node's linearizable read of
    // the mailbox's range agrees (every node holds every shard here).
    for n in cluster.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
        let mut c = pb::mailbox_client::MailboxClient::connect(format!("http://{}", cluster.addr(n)))
            .await
            .unwrap();
        let r = c
            .get_cursors(pb::GetCursorsRequest {
                mailbox: Some(short.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.low_watermark, r.last_seq), (9, 8), "node {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_acks_and_legal_holds() {
    let cluster = Cluster::start();
    cluster.wait_healthy(Duration::from_secs(60));
    let client = sdk(&cluster).await;
    let (bob, carol) = (mailbox("held", b"bob"), mailbox("held", b"carol"));
    let dave = mailbox("acked", b"dave");
    client.set_mailbox_hold("held", b"bob", true).await.unwrap();
    append_n(&client, &bob, "b", 5).await;
    append_n(&client, &carol, "c", 5).await;
    append_n(&client, &dave, "d", 6).await;
    client.ack(&dave, b"phone", 4).await.unwrap();
    client.ack(&dave, b"laptop", 2).await.unwrap();
    phctl_ok(
        &cluster,
        &["namespace", "set", "held", "--messages-per-mailbox-max", "2"],
    );
    phctl_ok(&cluster, &["namespace", "create", "acked", "--trim-acked", "true"]);

    // At most 2 per mailbox: carol keeps seqs 4 and 5; every device of
    // dave acked 2, so 1 and 2 go.
    wait_low(&client, &carol, 4, Duration::from_secs(30)).await;
    wait_low(&client, &dave, 3, Duration::from_secs(30)).await;
    client.ack(&dave, b"laptop", 5).await.unwrap();
    wait_low(&client, &dave, 5, Duration::from_secs(30)).await;

    // Bob is held: retention passed him over, and his trims are refused.
    let rounds_later = Instant::now() + Duration::from_secs(3);
    while Instant::now() < rounds_later {
        assert_eq!(range(&client, &bob).await, (1, 5));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let e = client.trim(&bob, 1).await.unwrap_err();
    let s = e.status().unwrap();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    let details = tonic_types::StatusExt::get_error_details(s);
    assert_eq!(details.error_info().unwrap().reason, "LEGAL_HOLD");
    assert!(client.delete(&bob, 1).await.is_err());
    // Released: the next pass trims him too.
    let r = client.set_mailbox_hold("held", b"bob", false).await.unwrap();
    assert!(!r.held && r.changed);
    wait_low(&client, &bob, 4, Duration::from_secs(30)).await;

    // A hold on the whole namespace stops retention and trims in it.
    let held = phctl_ok(&cluster, &["namespace", "set", "held", "--legal-hold", "true"]);
    assert_eq!(held["namespaces"][0]["legal_hold"], true);
    tokio::time::sleep(Duration::from_secs(2)).await; // every node reads it
    append_n(&client, &carol, "x", 3).await;
    let e = client.trim(&carol, 4).await.unwrap_err();
    assert_eq!(e.status().unwrap().code(), tonic::Code::FailedPrecondition);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        range(&client, &carol).await,
        (4, 8),
        "retention ran under a namespace hold"
    );
    phctl_ok(&cluster, &["namespace", "set", "held", "--legal-hold", "false"]);
    wait_low(&client, &carol, 7, Duration::from_secs(30)).await;
    let shown = phctl_ok(&cluster, &["namespace", "show", "held"]);
    assert_eq!(shown["namespaces"][0]["messages_per_mailbox_max"], 2, "{shown}");
}
