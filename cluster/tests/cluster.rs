//! Replication behaviour of an in-process cluster: every test runs real nodes
//! (engines in temp dirs, the real driver) over the filtering router.

mod common;
#[path = "cluster/membership.rs"]
mod membership;
#[path = "cluster/snapshots.rs"]
mod snapshots;

use common::*;
use pigeonhole_cluster::transport::local::{DropMessageTypes, DropRate, Isolate, Partition};
use pigeonhole_cluster::{ClusterError, RaftTuning, Role};
use pigeonhole_engine::raft::eraftpb::MessageType;
use pigeonhole_engine::raft::Storage as _;
use std::time::{Duration, Instant};

#[tokio::test]
async fn writes_replicate_and_leaders_spread() {
    let mut tuning = fast_tuning();
    tuning.rebalance_every_ticks = 10;
    let c = TestCluster::new(3, 6, 3, tuning);
    // Preferred leaders are 1,2,3,1,2,3: whoever wins the first elections,
    // leadership settles on them, two shards per node.
    c.eventually("leaders settle on their preferred nodes", 10, || async {
        let mut ok = true;
        for shard in 1..=6u64 {
            ok &= c.leader(shard).await == 1 + (shard - 1) % 3;
        }
        ok
    })
    .await;

    let user = "alice";
    let shard = shard_of(c.node(1), user);
    let leader = c.leader(shard).await;
    for i in 0..10u64 {
        let (seq, dup) = append(c.node(leader), shard, user, &format!("k{i}"), b"hello")
            .await
            .unwrap();
        assert_eq!((seq, dup), (i + 1, false));
    }
    // Every replica holds the same log once it has caught up.
    for id in 1..=3 {
        c.node(id).read_barrier(shard).await.unwrap();
        let msgs = read_all(c.node(id), shard, user);
        assert_eq!(msgs.len(), 10, "node {id}");
        assert!(msgs
            .iter()
            .enumerate()
            .all(|(i, (s, p))| *s == i as u64 + 1 && p == b"hello"));
    }
}

#[tokio::test]
async fn follower_forwards_proposals_and_answers_from_its_own_apply() {
    let c = TestCluster::new(3, 3, 3, fast_tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let (seq, _) = append(c.node(follower), shard, "bob", "via-follower", b"x")
        .await
        .unwrap();
    assert_eq!(seq, 1);
    let (seq, dup) = append(c.node(leader), shard, "bob", "via-follower", b"x")
        .await
        .unwrap();
    assert_eq!((seq, dup), (1, true), "the leader sees the follower's append");
    // Many concurrent proposals from a follower batch into few entries.
    let before = c.status(follower, shard).await.unwrap().last_index;
    let futs: Vec<_> = (0..200)
        .map(|i| {
            let n = c.node(follower).clone();
            tokio::spawn(async move { append(&n, shard, "bob", &format!("b{i}"), b"y").await })
        })
        .collect();
    let mut seqs = Vec::new();
    for f in futs {
        seqs.push(f.await.unwrap().unwrap().0);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=201).collect::<Vec<_>>(), "gap-free, no duplicates");
    let after = c.status(follower, shard).await.unwrap().last_index;
    assert!(
        after - before < 200,
        "200 proposals took {} entries: not batched",
        after - before
    );
}

/// A follower answers a forwarded proposal from its own apply, so it must
/// learn the commit index at once. With `skip_bcast_commit` it learned it
/// only from the next append or heartbeat: one append at a time through a
/// follower of a quiet shard took a heartbeat interval each (200 ms by
/// default; a benchmark client stuck on a follower after a leader change
/// fell from ~900 to ~40 appends/s). Heartbeats here come every 500 ms, so
/// ten appends without the broadcast take at least ~4.5 s.
#[tokio::test]
async fn a_follower_answers_a_forwarded_append_without_waiting_for_a_heartbeat() {
    let tuning = RaftTuning {
        election_ticks: 200,
        heartbeat_ticks: 50,
        hibernate_after_ticks: 0,
        ..fast_tuning()
    };
    let c = TestCluster::new(3, 1, 3, tuning);
    let shard = 1;
    let leader = c.leader(shard).await;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    append(c.node(leader), shard, "carol", "warm", b"x").await.unwrap();
    let started = Instant::now();
    for i in 0..10 {
        let (seq, dup) = append(c.node(follower), shard, "carol", &format!("f{i}"), b"y")
            .await
            .unwrap();
        assert_eq!((seq, dup), (i + 2, false));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2_500),
        "10 appends through a follower took {took:?}: it waited for heartbeats to learn each commit"
    );
}

#[tokio::test]
async fn leader_failover_keeps_acknowledged_writes() {
    let mut c = TestCluster::new(3, 2, 3, fast_tuning());
    let shard = 1;
    let old = c.leader(shard).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let key = format!("a{i}");
        append(c.node(old), shard, "carol", &key, key.as_bytes()).await.unwrap();
        acked.push(key);
    }
    c.stop(old);
    let new = c.leader(shard).await;
    assert_ne!(new, old);
    for i in 20..40 {
        let key = format!("a{i}");
        append_retrying(c.node(new), shard, "carol", &key, key.as_bytes(), 10).await;
        acked.push(key);
    }
    c.start(old);
    c.eventually("old leader catches up", 10, || async {
        c.status(old, shard).await.is_some_and(|s| s.applied >= 40)
    })
    .await;
    for id in 1..=3 {
        c.node(id).read_barrier(shard).await.unwrap();
        let got: Vec<Vec<u8>> = read_all(c.node(id), shard, "carol")
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let want: Vec<Vec<u8>> = acked.iter().map(|k| k.as_bytes().to_vec()).collect();
        assert_eq!(got, want, "node {id} has every acknowledged write, in order, once");
    }
}

#[tokio::test]
async fn minority_cannot_commit_and_loses_no_acknowledged_write() {
    let c = TestCluster::new(3, 1, 3, fast_tuning());
    let shard = 1;
    let old = c.leader(shard).await;
    append(c.node(old), shard, "dave", "before", b"1").await.unwrap();
    let others: Vec<u64> = (1..=3).filter(|n| *n != old).collect();
    c.router.add_filter(Partition::new(&[old], &others));

    // The isolated old leader cannot commit: its proposal fails.
    let commit_before = c.status(old, shard).await.unwrap().commit;
    let err = append(c.node(old), shard, "dave", "minority", b"m").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(
        c.status(old, shard).await.unwrap().commit,
        commit_before,
        "minority committed"
    );

    // The majority elects a leader and commits.
    let new = others[0];
    c.eventually("majority elects", 10, || async {
        c.status(new, shard)
            .await
            .is_some_and(|s| s.leader != 0 && s.leader != old)
    })
    .await;
    let (seq, _) = append_retrying(c.node(new), shard, "dave", "majority", b"2", 10).await;
    assert_eq!(seq, 2, "the minority's entry never committed");

    c.router.clear_filters();
    c.eventually("old leader rejoins as follower", 10, || async {
        c.status(old, shard)
            .await
            .is_some_and(|s| s.role == Role::Follower && s.applied >= s.commit && s.commit >= 7)
    })
    .await;
    c.node(old).read_barrier(shard).await.unwrap();
    let got: Vec<Vec<u8>> = read_all(c.node(old), shard, "dave")
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(got, vec![b"1".to_vec(), b"2".to_vec()]);
}

#[tokio::test]
async fn full_restart_keeps_state() {
    let mut c = TestCluster::new(3, 3, 3, fast_tuning());
    let mut expect = Vec::new();
    for shard in 1..=3 {
        let leader = c.leader(shard).await;
        for i in 0..5 {
            let user = format!("u{shard}");
            append(c.node(leader), shard, &user, &format!("k{i}"), b"p")
                .await
                .unwrap();
        }
        expect.push(shard);
    }
    for id in 1..=3 {
        c.stop(id);
    }
    for id in 1..=3 {
        c.start(id);
    }
    for shard in expect {
        let leader = c.leader(shard).await;
        let user = format!("u{shard}");
        // The old writes are there, and a retry of an old key is deduplicated.
        let (seq, dup) = append(c.node(leader), shard, &user, "k2", b"p").await.unwrap();
        assert_eq!((seq, dup), (3, true));
        let (seq, dup) = append(c.node(leader), shard, &user, "k5", b"p").await.unwrap();
        assert_eq!((seq, dup), (6, false));
        for id in 1..=3 {
            c.node(id).read_barrier(shard).await.unwrap();
            assert_eq!(read_all(c.node(id), shard, &user).len(), 6, "node {id} shard {shard}");
        }
    }
}

#[tokio::test]
async fn dedup_holds_across_a_leader_change() {
    let mut c = TestCluster::new(3, 1, 3, fast_tuning());
    let shard = 1;
    let old = c.leader(shard).await;
    let (seq, dup) = append(c.node(old), shard, "gus", "once", b"payload").await.unwrap();
    assert_eq!((seq, dup), (1, false));
    append(c.node(old), shard, "gus", "other", b"x").await.unwrap();
    // The first attempt committed under the old leader; it dies and the
    // client retries on whoever leads now.
    c.stop(old);
    let new = c.leader(shard).await;
    let (seq, dup) = append_retrying(c.node(new), shard, "gus", "once", b"payload", 10).await;
    assert_eq!((seq, dup), (1, true), "the retry returns the original seq");
    assert_eq!(read_all(c.node(new), shard, "gus").len(), 2);
}

#[tokio::test]
async fn leader_transfer_moves_leadership() {
    let c = TestCluster::new(3, 1, 3, fast_tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    let target = (1..=3).find(|n| *n != leader).unwrap();
    c.node(leader).transfer_leader(shard, target).await.unwrap();
    c.eventually("transfer completes", 5, || async { c.leader(shard).await == target })
        .await;
    c.eventually("every node's shard map names the new leader", 10, || async {
        (1..=3).all(|id| c.node(id).shard_map().unwrap().shard(shard).unwrap().leader_hint == target)
    })
    .await;
    // Not the leader any more: a second transfer from the old leader is refused.
    let err = c.node(leader).transfer_leader(shard, leader).await.unwrap_err();
    assert!(
        matches!(err, ClusterError::NotLeader { leader: l, .. } if l == target),
        "{err}"
    );
    append(c.node(target), shard, "hal", "k", b"v").await.unwrap();
}

#[tokio::test]
async fn reads_are_linearizable_on_followers_and_stale_reads_are_local() {
    let c = TestCluster::new(3, 1, 3, fast_tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    for i in 0..50 {
        append(c.node(leader), shard, "jo", &format!("k{i}"), b"v")
            .await
            .unwrap();
        // ReadIndex on the follower: it must see the write just acknowledged.
        c.node(follower).read_barrier(shard).await.unwrap();
        assert_eq!(read_all(c.node(follower), shard, "jo").len(), i + 1);
    }
    // A follower that knows the commit index but lacks the entries must
    // wait for them: a read released early would miss the last write.
    let block = c.router.add_filter(DropMessageTypes {
        to: follower,
        types: vec![MessageType::MsgAppend],
    });
    append(c.node(leader), shard, "jo", "while-blocked", b"v")
        .await
        .unwrap();
    let read = {
        let n = c.node(follower).clone();
        tokio::spawn(async move {
            n.read_barrier(shard).await.unwrap();
            read_all(&n, shard, "jo").len()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !read.is_finished(),
        "read returned before the follower applied the write"
    );
    c.router.remove_filter(block);
    assert_eq!(read.await.unwrap(), 51);
    // An isolated follower cannot confirm a read index: it fails, it does
    // not return possibly stale data as linearizable.
    c.router.add_filter(Isolate(follower));
    let err = c.node(follower).read_barrier(shard).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    // A stale read is still served locally.
    assert_eq!(read_all(c.node(follower), shard, "jo").len(), 51);
}

#[tokio::test]
async fn idle_shards_hibernate_and_wake() {
    let c = TestCluster::new(3, 8, 3, fast_tuning());
    for shard in 1..=8 {
        c.leader(shard).await;
    }
    c.wait_all_asleep().await;
    // Asleep means silent: no raft messages between nodes for a while (only
    // node heartbeats, which carry none).
    let before = c.router.stats().messages;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(c.router.stats().messages, before, "hibernating shards still talk");
    // A write wakes the shard and works.
    let leader = c.leader(3).await;
    append(c.node(leader), 3, "kim", "k", b"v").await.unwrap();
}

#[tokio::test]
async fn sleeping_shards_elect_a_new_leader_when_the_leader_dies() {
    let mut c = TestCluster::new(3, 3, 3, fast_tuning());
    let mut leaders = Vec::new();
    for shard in 1..=3 {
        leaders.push(c.leader(shard).await);
    }
    c.wait_all_asleep().await;
    let dead = leaders[0];
    c.stop(dead);
    // No client traffic: the node-level heartbeat alone must get shard 1 a
    // new leader.
    c.eventually("sleeping followers elect", 10, || async {
        let mut ok = true;
        for id in (1..=3).filter(|n| *n != dead) {
            ok &= c.status(id, 1).await.is_some_and(|s| s.leader != 0 && s.leader != dead);
        }
        ok
    })
    .await;
}

#[tokio::test]
async fn writes_get_through_a_lossy_network() {
    let c = TestCluster::new(3, 1, 3, fast_tuning());
    let shard = 1;
    c.leader(shard).await;
    c.router.add_filter(DropRate { percent: 20 });
    for i in 0..30 {
        let node = c.node(1 + (i % 3));
        append_retrying(node, shard, "lee", &format!("k{i}"), b"v", 20).await;
    }
    c.router.clear_filters();
    let leader = c.leader(shard).await;
    c.node(leader).read_barrier(shard).await.unwrap();
    let got = read_all(c.node(leader), shard, "lee");
    assert_eq!(got.len(), 30, "each retried append exactly once");
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let c = TestCluster::new(1, 2, 1, fast_tuning());
    c.leader(1).await;
    let err = c
        .node(1)
        .propose(99, vec![append_op("u", "k", b"v")])
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::NoSuchShard { shard: 99, .. }), "{err}");
    // A bad op is a per-op error from the state machine, not a failure.
    let res = c.node(1).propose(1, vec![append_op("u", "", b"v")]).await.unwrap();
    let e = res[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("idempotency_key"), "{e}");
    let err = c.node(1).transfer_leader(1, 7).await.unwrap_err();
    assert!(
        matches!(err, ClusterError::InvalidArgument { field: "to_node", .. }),
        "{err}"
    );
    // A request must fit one entry: too many ops, or too many bytes, is
    // refused up front with the limit named.
    let many: Vec<_> = (0..4_097).map(|i| append_op("u", &format!("k{i}"), b"v")).collect();
    let err = c.node(1).propose(1, many).await.unwrap_err();
    assert!(
        matches!(&err, ClusterError::InvalidArgument { field: "ops", reason } if reason.contains("4096")),
        "{err}"
    );
    let big: Vec<_> = (0..9)
        .map(|i| append_op("u", &format!("b{i}"), &vec![0u8; 1 << 20]))
        .collect();
    let err = c.node(1).propose(1, big).await.unwrap_err();
    assert!(
        matches!(&err, ClusterError::InvalidArgument { field: "ops", reason } if reason.contains(&(8usize << 20).to_string())),
        "{err}"
    );
    // Seven 1 MiB appends fit one entry, and commit.
    let fits: Vec<_> = (0..7)
        .map(|i| append_op("u", &format!("f{i}"), &vec![0u8; 1 << 20]))
        .collect();
    let res = c.node(1).propose(1, fits).await.unwrap();
    assert!(res.iter().all(Result::is_ok));
}

#[tokio::test]
async fn recovery_never_commits_a_divergent_log_tail() {
    let mut c = TestCluster::new(3, 1, 3, fast_tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    for i in 0..5 {
        append(c.node(leader), shard, "oz", &format!("a{i}"), b"v")
            .await
            .unwrap();
    }
    let victim = (1..=3).find(|n| *n != leader).unwrap();
    c.eventually("victim applied", 5, || async {
        c.status(victim, shard)
            .await
            .is_some_and(|s| s.applied == s.commit && s.commit >= 10)
    })
    .await;
    c.stop(victim);
    // A new term on the others, and entries in it.
    let other = (1..=3).find(|n| *n != leader && *n != victim).unwrap();
    c.node(leader).transfer_leader(shard, other).await.unwrap();
    c.eventually("transfer", 5, || async { c.leader(shard).await == other })
        .await;
    for i in 0..5 {
        append(c.node(other), shard, "oz", &format!("b{i}"), b"v")
            .await
            .unwrap();
    }
    let mut chunks = Vec::new();
    c.node(other)
        .engine()
        .export_snapshot(shard, 1 << 20, |ch| {
            chunks.push(ch);
            Ok::<(), pigeonhole_engine::EngineError>(())
        })
        .unwrap();
    let snap_index = chunks[0].index;
    // On the victim's disk: a tail of entries from its old term that never
    // committed (as a deposed leader's log has), reaching past the snapshot;
    // then a snapshot ingest that completed before a crash took the log
    // reset with it.
    let dir = c.dirs[&victim].path().to_path_buf();
    {
        use pigeonhole_engine::raft::eraftpb::Entry;
        let engine = pigeonhole_engine::Engine::open(dir.join("db"), Default::default()).unwrap();
        let store = engine.raft_log(shard).unwrap();
        let last = store.last_index().unwrap();
        let old_term = store.hard_state().unwrap().term;
        assert!(
            last < snap_index && snap_index <= last + 20,
            "last {last}, snapshot {snap_index}"
        );
        let tail: Vec<Entry> = (last + 1..=last + 20)
            .map(|index| Entry {
                index,
                term: old_term,
                ..Default::default()
            })
            .collect();
        let mut rb = pigeonhole_engine::RaftBatch::default();
        rb.append(&store, &tail).unwrap();
        engine.write_raft(rb, pigeonhole_engine::Durability::Fsync).unwrap();
        assert_ne!(
            store.term(snap_index).unwrap(),
            chunks[0].term,
            "the tail diverges at the snapshot index"
        );
        let mut ingest = engine.ingest_snapshot(shard).unwrap();
        for ch in &chunks {
            ingest.push(ch).unwrap();
        }
    }
    c.start(victim);
    assert!(c.node(victim).is_running());
    append(c.node(other), shard, "oz", "after", b"v").await.unwrap();
    c.eventually("victim catches up with the real history", 10, || async {
        c.status(victim, shard).await.is_some_and(|s| s.applied > snap_index)
    })
    .await;
    c.node(victim).read_barrier(shard).await.unwrap();
    assert_eq!(read_all(c.node(victim), shard, "oz").len(), 11);
    assert!(c.node(victim).is_running(), "the victim's driver is alive");
}

#[tokio::test]
async fn leaders_collect_expired_dedup_entries_through_the_log() {
    let mut tuning = fast_tuning();
    tuning.hibernate_after_ticks = 0;
    tuning.expire_dedup_every_ticks = 5;
    let c = TestCluster::new(3, 1, 3, tuning);
    let shard = 1;
    let leader = c.leader(shard).await;
    let start = c.status(leader, shard).await.unwrap().applied;
    // No client traffic: only the leader's ExpireDedup proposals move the
    // log, on every replica.
    c.eventually("dedup GC entries commit and apply everywhere", 10, || async {
        let mut ok = true;
        for id in 1..=3 {
            ok &= c.status(id, shard).await.is_some_and(|s| s.applied >= start + 3);
        }
        ok
    })
    .await;
}

/// A write a follower forwarded, which the leader never appended (here the
/// forward is dropped on the way, as a leader in transfer drops it), is
/// answered as soon as the follower applies the next leader's first entry:
/// a retryable outcome-unknown `LeaderChanged` naming the new leader, not
/// a `Timeout` at the request's deadline (which a client with a short
/// deadline reports as a failed write). The retry with the same key
/// appends it once.
#[tokio::test]
async fn a_forward_lost_in_a_leader_change_is_answered_at_the_change_not_the_deadline() {
    let c = TestCluster::new(3, 1, 3, fast_tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    let mut others = (1..=3).filter(|n| *n != leader);
    let (follower, next) = (others.next().unwrap(), others.next().unwrap());
    append(c.node(leader), shard, "lu", "warm", b"v").await.unwrap();
    let block = c.router.add_filter(DropMessageTypes {
        to: leader,
        types: vec![MessageType::MsgPropose],
    });
    let write = {
        let n = c.node(follower).clone();
        tokio::spawn(async move { append(&n, shard, "lu", "k", b"v").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!write.is_finished(), "the forward was not dropped");
    c.node(leader).transfer_leader(shard, next).await.unwrap();
    let err = write.await.unwrap().unwrap_err();
    assert!(
        matches!(err, ClusterError::LeaderChanged { leader: l, .. } if l == next),
        "{err}"
    );
    assert!(err.is_retryable());
    c.router.remove_filter(block);
    assert_eq!(
        append_retrying(c.node(follower), shard, "lu", "k", b"v", 10).await,
        (2, false)
    );
    c.eventually("the follower applied the retry", 10, || async {
        read_all(c.node(follower), shard, "lu").len() == 2
    })
    .await;
}
