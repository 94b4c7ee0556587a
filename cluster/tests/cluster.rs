//! Replication behaviour of an in-process cluster: every test runs real nodes
//! (engines in temp dirs, the real driver) over the filtering router.

mod common;

use common::*;
use pigeonhole_cluster::transport::local::{DropMessageTypes, DropRate, DropSnapshots, Isolate, Partition};
use pigeonhole_cluster::{ClusterError, MembershipChange, RaftTuning, Role};
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
async fn lagging_follower_catches_up_by_snapshot() {
    let mut tuning = fast_tuning();
    tuning.log_entries_max = 40;
    tuning.log_retain_entries = 5;
    tuning.snapshot_chunk_bytes = 4096; // many chunks
    let mut c = TestCluster::new(3, 1, 3, tuning);
    let shard = 1;
    let leader = c.leader(shard).await;
    let lagger = (1..=3).find(|n| *n != leader).unwrap();
    c.stop(lagger);
    for i in 0..150 {
        let key = format!("s{i}");
        append_retrying(c.node(leader), shard, "erin", &key, &[7u8; 300], 10).await;
    }
    // Compaction ran: the log no longer reaches back to the lagger.
    c.eventually("leader compacts", 10, || async {
        c.status(leader, shard).await.is_some_and(|s| s.first_index > 50)
    })
    .await;
    let snaps_before = c.router.stats().snapshots;
    c.start(lagger);
    c.eventually("lagger catches up", 15, || async {
        c.status(lagger, shard).await.is_some_and(|s| s.applied >= 150)
    })
    .await;
    assert!(
        c.router.stats().snapshots > snaps_before,
        "caught up without a snapshot"
    );
    let got = read_all(c.node(lagger), shard, "erin");
    assert_eq!(got.len(), 150);
    assert_eq!(got.last().unwrap().0, 150);
}

/// Snapshots go at most at the node's send budget: a catch-up of about
/// 200 KiB at 64 KiB/s cannot take less than about 2.5 s (a lower bound,
/// which no scheduling noise can break; without the budget it takes
/// ~100 ms).
#[tokio::test]
async fn snapshots_are_sent_within_the_nodes_budget() {
    let mut tuning = fast_tuning();
    tuning.log_entries_max = 40;
    tuning.log_retain_entries = 5;
    tuning.snapshot_chunk_bytes = 16 << 10;
    tuning.snapshot_send_bytes_per_s = 64 << 10;
    let mut c = TestCluster::new(3, 1, 3, tuning);
    let shard = 1;
    let leader = c.leader(shard).await;
    let lagger = (1..=3).find(|n| *n != leader).unwrap();
    c.stop(lagger);
    let payload_bytes = 1024;
    let appends = 200;
    for i in 0..appends {
        let key = format!("r{i}");
        append_retrying(c.node(leader), shard, "gus", &key, &vec![9u8; payload_bytes], 10).await;
    }
    c.eventually("leader compacts", 10, || async {
        c.status(leader, shard).await.is_some_and(|s| s.first_index > 50)
    })
    .await;
    let snaps_before = c.router.stats().snapshots;
    let started = std::time::Instant::now();
    c.start(lagger);
    c.eventually("lagger catches up", 30, || async {
        c.status(lagger, shard).await.is_some_and(|s| s.applied >= appends)
    })
    .await;
    let took = started.elapsed();
    assert!(
        c.router.stats().snapshots > snaps_before,
        "caught up without a snapshot"
    );
    // The payloads alone are 200 KiB; every chunk after the first waits.
    let floor_s = (appends * payload_bytes as u64 - (16 << 10)) as f64 / f64::from(64u32 << 10);
    assert!(
        took.as_secs_f64() >= floor_s,
        "a snapshot of more than {} KiB arrived in {took:?} at 64 KiB/s (floor {floor_s:.2} s)",
        appends * payload_bytes as u64 / 1024
    );
    assert_eq!(read_all(c.node(lagger), shard, "gus").len() as u64, appends);
}

#[tokio::test]
async fn snapshot_is_retried_after_it_is_lost() {
    let mut tuning = fast_tuning();
    tuning.log_entries_max = 20;
    tuning.log_retain_entries = 2;
    let mut c = TestCluster::new(3, 1, 3, tuning);
    let shard = 1;
    let leader = c.leader(shard).await;
    let lagger = (1..=3).find(|n| *n != leader).unwrap();
    c.stop(lagger);
    for i in 0..60 {
        append_retrying(c.node(leader), shard, "fay", &format!("k{i}"), b"v", 10).await;
    }
    let block = c.router.add_filter(DropSnapshots);
    c.start(lagger);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        c.status(lagger, shard).await.unwrap().applied < 60,
        "no snapshot should get through"
    );
    c.router.remove_filter(block);
    c.eventually("lagger catches up once snapshots flow", 15, || async {
        c.status(lagger, shard).await.is_some_and(|s| s.applied >= 60)
    })
    .await;
    assert_eq!(read_all(c.node(lagger), shard, "fay").len(), 60);
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
async fn membership_change_moves_a_replica_to_a_new_node() {
    // Four nodes in the map; shard 1 starts on nodes 1, 2 and 3.
    let mut c = TestCluster::with_members(4, 4, 1, 3, fast_tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    for i in 0..30 {
        append(c.node(leader), shard, "ivy", &format!("k{i}"), b"v")
            .await
            .unwrap();
    }
    assert!(c.status(4, shard).await.is_none(), "node 4 starts without a replica");
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(4)])
        .await
        .unwrap();
    assert_eq!(cs.learners, vec![4]);
    c.eventually("learner catches up", 10, || async {
        c.status(4, shard).await.is_some_and(|s| s.applied >= 30)
    })
    .await;
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::AddVoter(4)])
        .await
        .unwrap();
    assert!(cs.voters.contains(&4) && cs.learners.is_empty());
    // Remove a replica that is not the leader.
    let gone = (1..=3).find(|n| *n != leader).unwrap();
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::Remove(gone)])
        .await
        .unwrap();
    assert!(!cs.voters.contains(&gone));
    // Removing it again is refused: raft-rs would apply it as a no-op, and
    // beside an AddVoter (a move whose source another change took out) it
    // would leave the shard a voter too many.
    let again = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::Remove(gone)])
        .await;
    assert!(
        matches!(&again, Err(ClusterError::Refused { reason }) if reason.contains("not a member")),
        "{again:?}"
    );
    c.eventually("removed replica stops", 5, || async {
        c.status(gone, shard).await.is_none()
    })
    .await;
    // Replica GC: the removed node deletes its copy of the shard.
    c.eventually("removed replica's data is deleted", 5, || async {
        let e = c.node(gone).engine();
        e.shard_meta(shard).unwrap().is_none() && e.raft_log(shard).unwrap().last_index().unwrap() == 0
    })
    .await;
    assert!(!c.node(gone).engine().shard_ids().unwrap().contains(&shard));
    // The new configuration commits writes, and node 4 holds them.
    append(c.node(leader), shard, "ivy", "after", b"v").await.unwrap();
    c.node(4).read_barrier(shard).await.unwrap();
    assert_eq!(read_all(c.node(4), shard, "ivy").len(), 31);
    // The removed node's proposals are refused, not silently lost.
    let err = append(c.node(gone), shard, "ivy", "x", b"v").await.unwrap_err();
    assert!(matches!(err, ClusterError::NotReplica { .. }), "{err}");
    // Every node's copy of the metadata group converges on the new replicas.
    let mut want: Vec<u64> = cs.voters.clone();
    want.sort_unstable();
    c.eventually("every node's shard map shows the new replicas", 10, || async {
        (1..=4).all(|id| {
            let m = c.node(id).shard_map().unwrap();
            let s = m.shard(shard).unwrap();
            let mut got = s.replicas.clone();
            got.sort_unstable();
            got == want && s.learners.is_empty() && s.leader_hint == leader
        })
    })
    .await;
    // And the membership survives a restart of the new voter.
    c.restart(4);
    c.eventually("restarted learner-turned-voter rejoins", 10, || async {
        c.status(4, shard)
            .await
            .is_some_and(|s| s.voters.contains(&4) && s.leader != 0)
    })
    .await;
    // The removed node can be added back: it starts empty and is caught up
    // by a snapshot.
    let leader = c.leader(shard).await;
    append(c.node(leader), shard, "ivy", "before-readd", b"v")
        .await
        .unwrap();
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(gone)])
        .await
        .unwrap();
    assert_eq!(cs.learners, vec![gone]);
    c.eventually("re-added node catches up", 10, || async {
        c.status(gone, shard).await.is_some_and(|s| s.learners.contains(&gone))
    })
    .await;
    c.node(gone).read_barrier(shard).await.unwrap();
    assert_eq!(read_all(c.node(gone), shard, "ivy").len(), 32);
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
async fn a_crash_in_the_middle_of_an_ingest_is_repaired_at_start() {
    crash_in_the_middle_of_an_ingest(false).await;
}

/// The same, with the spooled snapshot damaged too (a disk fault): the
/// ingest cannot run again, so the start empties the replica (catching
/// up, D49) and its leader sends a new snapshot, instead of refusing to
/// start.
#[tokio::test]
async fn a_crash_mid_ingest_with_a_damaged_spool_catches_up_from_the_leader() {
    crash_in_the_middle_of_an_ingest(true).await;
}

#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
async fn crash_in_the_middle_of_an_ingest(damage_spool: bool) {
    let mut c = TestCluster::new(3, 1, 3, fast_tuning());
    let shard = 1;
    let leader = c.leader(shard).await;
    let victim = (1..=3).find(|n| *n != leader).unwrap();
    c.stop(victim);
    for i in 0..40 {
        append_retrying(c.node(leader), shard, "max", &format!("k{i}"), b"v", 10).await;
    }
    // What a crash mid-ingest leaves on the victim: a complete spooled
    // snapshot, and a shard whose old state is gone (marked Ingesting).
    let dir = c.dirs[&victim].path().to_path_buf();
    let spool = pigeonhole_cluster::transport::SnapshotSpool::open(dir.join("snap")).unwrap();
    let mut w = spool.begin(leader, shard).unwrap();
    let mut chunks = Vec::new();
    c.node(leader)
        .engine()
        .export_snapshot(shard, 256, |ch| {
            chunks.push(ch);
            Ok::<(), pigeonhole_engine::EngineError>(())
        })
        .unwrap();
    assert!(chunks.len() > 2, "want a multi-chunk snapshot");
    for ch in &chunks {
        w.write_chunk(&ch.encode()).unwrap();
    }
    let (_, _, spooled) = w.finish().unwrap();
    if damage_spool {
        let mut b = std::fs::read(&spooled).unwrap();
        let at = b.len() / 2;
        b[at] ^= 0x40;
        std::fs::write(&spooled, &b).unwrap();
    }
    {
        let engine = pigeonhole_engine::Engine::open(dir.join("db"), Default::default()).unwrap();
        let mut ingest = engine.ingest_snapshot(shard).unwrap();
        ingest.push(&chunks[0]).unwrap(); // begin: old state deleted, marked Ingesting
        drop(ingest); // the "crash"
        let meta = engine.shard_meta(shard).unwrap().unwrap();
        assert_eq!(meta.state, pigeonhole_engine::ShardState::Ingesting);
    }
    c.start(victim);
    if damage_spool {
        let marks = c.node(victim).engine().catching_up().unwrap();
        assert_eq!(marks.len(), 1, "{marks:?}");
        assert!(marks[0].1.contains("could not be finished"), "{marks:?}");
    } else {
        let meta = c.node(victim).engine().shard_meta(shard).unwrap().unwrap();
        assert_eq!(meta.state, pigeonhole_engine::ShardState::Ready, "re-ingested at start");
    }
    assert!(spool.complete(shard).unwrap().is_empty(), "spool removed once durable");
    c.eventually("victim catches up", 10, || async {
        c.status(victim, shard).await.is_some_and(|s| s.applied >= 40 + 5)
    })
    .await;
    append(c.node(leader), shard, "max", "after", b"v").await.unwrap();
    c.node(victim).read_barrier(shard).await.unwrap();
    assert_eq!(read_all(c.node(victim), shard, "max").len(), 41);
    if damage_spool {
        c.eventually("victim votes again", 10, || async {
            c.node(victim).engine().catching_up().unwrap().is_empty()
        })
        .await;
    }
}

#[tokio::test]
async fn a_joint_membership_change_under_load_completes() {
    // Replace a voter in ONE change (joint consensus) while writes flow, so
    // the change commits in the same batch as data entries.
    let mut tuning = fast_tuning();
    tuning.hibernate_after_ticks = 0;
    let c = TestCluster::with_members(4, 4, 1, 3, tuning);
    let shard = 1;
    let leader = c.leader(shard).await;
    c.node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(4)])
        .await
        .unwrap();
    c.eventually("learner catches up", 10, || async {
        c.status(4, shard).await.is_some_and(|s| s.applied >= 6)
    })
    .await;
    let out = (1..=3).find(|n| *n != leader).unwrap();
    let writer = {
        let n = c.node(leader).clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let _ = append(&n, shard, "nia", &format!("k{i}"), b"v").await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cs = c
        .node(leader)
        .change_membership(shard, &[MembershipChange::AddVoter(4), MembershipChange::Remove(out)])
        .await
        .unwrap();
    assert!(
        !cs.voters_outgoing.is_empty(),
        "the change enters a joint configuration"
    );
    writer.await.unwrap();
    // raft-rs leaves the joint configuration by itself (auto-leave); it must
    // get there even though the change committed among data entries.
    c.eventually("the shard leaves the joint configuration", 10, || async {
        c.status(leader, shard)
            .await
            .is_some_and(|s| !s.joint && s.voters.contains(&4) && !s.voters.contains(&out))
    })
    .await;
    // Two changes at once: the second is refused as busy, not timed out.
    let n = c.node(leader);
    let (first, second) = ([MembershipChange::AddLearner(out)], [MembershipChange::Remove(out)]);
    let (a, b) = tokio::join!(n.change_membership(shard, &first), n.change_membership(shard, &second),);
    assert!(a.is_ok(), "{a:?}");
    assert!(matches!(b, Err(ClusterError::Busy { .. })), "{b:?}");
    c.node(leader)
        .change_membership(shard, &[MembershipChange::Remove(out)])
        .await
        .unwrap();
    // And further membership changes work.
    c.node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(out)])
        .await
        .unwrap();
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
        use pigeonhole_engine::raft::Storage as _;
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
