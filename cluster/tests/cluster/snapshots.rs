//! Snapshots in an in-process cluster: a lagging follower catches up by
//! one, within the node's send budget, again after one is lost, and a
//! crash in the middle of its ingest is repaired at the next start.

use super::common::*;
use pigeonhole_cluster::transport::local::DropSnapshots;
use std::time::Duration;

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
