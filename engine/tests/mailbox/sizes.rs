//! Shard size counts: what appends write is counted, a count stops at its
//! limit, shards counted together get what each gets alone, and the size
//! scan splits bytes by namespace.

use super::common::*;

#[test]
fn shard_size_counts_what_appends_write_and_stops_at_its_limit() {
    let mut s = Shard::new();
    let empty = s.engine().shard_size(SHARD, 1_000).unwrap();
    assert!(empty.complete);
    let payload = vec![7u8; 1_000];
    for i in 0..10u32 {
        s.one(append("chat", b"u", format!("k{i}").as_bytes(), &payload))
            .unwrap();
    }
    let full = s.engine().shard_size(SHARD, 1_000).unwrap();
    assert!(full.complete);
    // Ten 1,000-byte payloads at least (plus dedup entries and counters).
    assert!(full.bytes >= empty.bytes + 10_000, "{empty:?} -> {full:?}");
    assert!(
        full.keys >= empty.keys + 20,
        "a message and a dedup entry each: {full:?}"
    );
    let capped = s.engine().shard_size(SHARD, 3).unwrap();
    assert_eq!((capped.keys, capped.complete), (3, false));
    // Another shard's keys are not counted.
    assert_eq!(s.engine().shard_size(SHARD + 1, 1_000).unwrap().keys, 0);
}

/// Several shards counted through one iterator (`size_scans`, D54) get
/// what each gets counted alone, in any order: a scan stops at its own
/// shard's end, and a seek back to an earlier shard finds its rows, in
/// the memtable and in SSTs alike.
#[test]
fn shards_counted_together_get_what_each_gets_alone() {
    let mut s = Shard::new();
    let full = pigeonhole_engine::HashRange::FULL;
    let none = std::collections::BTreeSet::new();
    for (shard, n) in [(SHARD + 1, 3u64), (SHARD + 2, 5)] {
        s.engine()
            .bootstrap_shard(shard, pigeonhole_engine::conf_state_with_voters(&[1]), 0, 0)
            .unwrap();
        for i in 1..=n {
            let op = append("chat", b"u", format!("k{i}").as_bytes(), &[1; 300]);
            assert!(appended(i, false)(&apply_ops(s.engine(), shard, i, 1_000, vec![op])[0]));
        }
    }
    for i in 0..4u32 {
        s.one(append("chat", b"v", format!("k{i}").as_bytes(), &[2; 500]))
            .unwrap();
    }
    for flushed in [false, true] {
        if flushed {
            s.engine().flush_data().unwrap();
        }
        let alone: Vec<_> = [SHARD, SHARD + 1, SHARD + 2]
            .iter()
            .map(|&id| s.engine().size_scan(id, u64::MAX, full, &none).unwrap())
            .collect();
        // More appends, more rows: the shards' counts differ, and none is
        // another's.
        assert!(
            alone[1].size.keys < alone[0].size.keys && alone[0].size.keys < alone[2].size.keys,
            "{alone:?}"
        );
        let together = s
            .engine()
            .size_scans(
                &[(SHARD + 2, full), (SHARD, full), (SHARD + 1, full), (SHARD + 2, full)],
                u64::MAX,
                &none,
            )
            .unwrap();
        let together: Vec<_> = together.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            together,
            [&alone[2], &alone[0], &alone[1], &alone[2]].map(Clone::clone),
            "flushed {flushed}"
        );
    }
}

/// The size scan counts each namespace's mailbox rows (storage quotas,
/// D44): every byte of a namespace's messages, dedup entries and cursors
/// lands on that namespace and no other, and the namespaces' bytes add up
/// to the shard's mailbox bytes.
#[test]
fn the_size_scan_counts_bytes_per_namespace() {
    let mut s = Shard::new();
    for i in 0..20u32 {
        let key = format!("k{i}");
        assert!(appended(u64::from(i) + 1, false)(&s.one(append(
            "big",
            b"u",
            key.as_bytes(),
            &[7; 1_000]
        ))));
    }
    assert!(appended(1, false)(&s.one(append("small", b"u", b"k", b"tiny"))));
    s.one(ack("small", b"u", b"phone", 1)).unwrap();
    let count: std::collections::BTreeSet<String> = ["big", "small", "absent"].map(String::from).into();
    let scan = s
        .engine()
        .size_scan(s.id, u64::MAX, pigeonhole_engine::HashRange::FULL, &count)
        .unwrap();
    assert!(scan.namespaces_complete);
    let names: Vec<&str> = scan.namespaces.keys().map(String::as_str).collect();
    assert_eq!(names, ["big", "small"]);
    let (big, small) = (scan.namespaces["big"], scan.namespaces["small"]);
    assert!((20_000..22_000 + 20 * 200).contains(&big), "{big}");
    assert!((4..1_000).contains(&small), "{small}");
    // Only the shard's own rows (its meta row, system values) are outside.
    assert!(scan.size.bytes > big + small && scan.size.bytes - big - small < 1_000);
    // Trimming moves the count down.
    s.one(trim("big", b"u", 10)).unwrap();
    let after = s
        .engine()
        .size_scan(s.id, u64::MAX, pigeonhole_engine::HashRange::FULL, &count)
        .unwrap();
    // Only the namespaces asked for are counted.
    let only_big: std::collections::BTreeSet<String> = ["big".to_string()].into();
    let one = s
        .engine()
        .size_scan(s.id, u64::MAX, pigeonhole_engine::HashRange::FULL, &only_big)
        .unwrap();
    assert_eq!(one.namespaces.keys().collect::<Vec<_>>(), ["big"]);
    assert!(after.namespaces["big"] < big - 9_000, "{after:?}");
}
