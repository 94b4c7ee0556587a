//! Shard sizes on a running cluster (D39): each shard's leader counts its
//! shard and records the count in the metadata group; past the split
//! threshold it splits the shard where its bytes halve, under load, losing
//! nothing; below it, or with splits off, nothing is split.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::placing::until;
use common::routed::*;
use common::*;
use pigeonhole_cluster::node::PlacementChange;
use pigeonhole_cluster::placement::META_SHARD;
use pigeonhole_cluster::sizes::{self, SizeCheck};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn quick_checks() -> SizeCheck {
    SizeCheck {
        interval: Duration::from_millis(200),
        keys_max: 1 << 20,
        grow_div: 8,
        grow_bytes_min: 64 << 10,
        age_max: Duration::from_secs(60),
        // Rounds are never put off for a full memtable here (the rule,
        // `sizes::round_due`, has unit tests of its own).
        memtable_entries_max: u64::MAX,
        defer_max: Duration::ZERO,
    }
}

/// Shard → bytes as node `id`'s metadata replica has the size records.
fn recorded(c: &TestCluster, id: u64) -> pigeonhole_cluster::balance::Sizes {
    let values = c
        .node(id)
        .engine()
        .system_scan(META_SHARD, sizes::SIZE_PREFIX, 1_000)
        .unwrap();
    sizes::decode_sizes(&values)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_past_the_split_size_is_split_under_load_and_loses_nothing() {
    let c = TestCluster::new(3, 2, 3, fast_tuning());
    for s in [1, 2] {
        c.leader(s).await;
    }
    // Off at first: the shards grow past the threshold and stay whole.
    c.node(1)
        .set_placement(PlacementChange {
            split_size_bytes: Some(u64::MAX),
            ..Default::default()
        })
        .await
        .unwrap();
    let checkers: Vec<_> = c.nodes.values().map(|n| sizes::spawn(n, quick_checks())).collect();
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(&c, "a", 1_024, &acked, &stop);
    until("both shards to be counted past 1 MiB", 60, || async {
        let s = recorded(&c, 1);
        (s.len() == 2 && s.values().all(|b| *b >= 1 << 20)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.node(1).shard_map().unwrap().shards.len(), 2, "splits are off");

    // On, at 1 MiB: every shard past it splits, again and again as the
    // halves grow, while the writers go on.
    c.node(2)
        .set_placement(PlacementChange {
            split_size_bytes: Some(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap();
    until("the shards to split", 60, || async {
        let map = c.node(3).shard_map().unwrap();
        (map.shards.len() >= 4).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // The map still tiles the hash space (where the cut falls is the
    // engine's test: the bytes halve), every shard gets counted, and every
    // acknowledged append is stored once, in order.
    let map = c.node(1).shard_map().unwrap();
    let mut next = Some(0u64);
    for s in &map.shards {
        assert_eq!(Some(s.range_start), next, "{:?}", map.shards);
        next = s.range_end;
    }
    assert_eq!(next, None);
    for s in &map.shards {
        c.leader(s.id).await;
    }
    until("every shard to be counted", 60, || async {
        let sizes = recorded(&c, 1);
        map.shards.iter().all(|s| sizes.contains_key(&s.id)).then_some(())
    })
    .await;
    check_all(&c, &acked).await;
    for h in checkers {
        h.abort();
    }
}
