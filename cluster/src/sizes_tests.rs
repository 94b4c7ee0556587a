//! Unit tests of `sizes.rs`: when a round is due (D63's rule and the
//! memtable watch), when a shard is counted again, where it splits, and
//! what a namespace's recorded bytes sum to.

use super::*;

#[test]
fn a_round_waits_only_for_a_flush_that_is_coming_and_not_for_long() {
    let cfg = SizeCheck::default();
    let s = Duration::from_secs;
    let max = 64 << 20;
    // Many entries, the active memtable half full, filling at `rate`.
    let look = |entries: u64, imm: u64, rate: u64| {
        Some(MemtableLook {
            now: pigeonhole_engine::Memtables {
                entries,
                immutable_entries: imm,
                active_bytes: max / 2,
                active_bytes_max: max,
            },
            flushed: false,
            fill_bytes_per_s: rate,
        })
    };
    let many = cfg.memtable_entries_max + 1;
    let few = cfg.memtable_entries_max;
    // 32 MiB of room in 30 s: about 1.07 MiB/s fills it in time.
    let fast = 2 << 20;
    let slow = 1 << 20;
    let no = || false;
    // near_quota reads the metadata replica: asked only for a round
    // that would wait.
    let asked = std::cell::Cell::new(0);
    let never_asked = || {
        asked.set(asked.get() + 1);
        true
    };
    // Never before the interval, whatever the memtables hold.
    assert!(!round_due(s(9), look(0, 0, 0), never_asked, &cfg));
    assert!(!round_due(s(9), look(many, 1, fast), never_asked, &cfg));
    // Due: at once with few entries, or an unknown state...
    assert!(round_due(s(10), look(few, 0, fast), never_asked, &cfg));
    assert!(round_due(s(10), None, never_asked, &cfg));
    // ...or a memtable filling too slowly to be flushed in time...
    assert!(round_due(s(10), look(many, 0, slow), no, &cfg));
    assert!(round_due(s(10), look(many, 0, 0), no, &cfg));
    // A memtable at its size that nothing writes to is switched out
    // only by the next write: not waited for.
    let full_and_quiet = look(many, 0, 0).map(|l| MemtableLook {
        now: pigeonhole_engine::Memtables {
            active_bytes: max,
            ..l.now
        },
        ..l
    });
    assert!(round_due(s(10), full_and_quiet, no, &cfg));
    // ...but put off for a flush that is coming: one filling fast, or
    // an immutable memtable waiting for its flush...
    assert!(!round_due(s(10), look(many, 0, fast), no, &cfg));
    assert!(!round_due(s(10), look(many, 1, 0), no, &cfg));
    // ...unless a flush just ended: the memtables are as small as a
    // look every second finds them...
    let just_flushed = look(many, 0, fast).map(|l| MemtableLook { flushed: true, ..l });
    assert!(round_due(s(10), just_flushed, never_asked, &cfg));
    // ...as the time left shrinks, the same rate is no longer enough...
    assert!(round_due(s(30), look(many, 0, fast), no, &cfg));
    assert!(!round_due(s(39), look(many, 1, 0), no, &cfg));
    // ...and never past defer_max.
    assert!(round_due(s(40), look(many, 1, u64::MAX), never_asked, &cfg));
    assert_eq!(asked.get(), 0);
    // A namespace near its quota: counts are not put off (D44).
    assert!(round_due(s(10), look(many, 1, fast), || true, &cfg));
}

#[test]
fn the_watch_sees_flushes_and_fill_rates_over_a_memtables_life() {
    let mem = |entries: u64, active_bytes: u64| pigeonhole_engine::Memtables {
        entries,
        immutable_entries: 0,
        active_bytes,
        active_bytes_max: 64 << 20,
    };
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut w = MemtableWatch::default();
    let first = w.look(mem(1_000, 10 << 20), at(0));
    assert!(!first.flushed);
    assert_eq!(first.fill_bytes_per_s, 0, "no rate from one look");
    // The size grows by whole blocks: a second without one is not a
    // rate of 0, the rate is over the memtable's life.
    let second = w.look(mem(2_000, 10 << 20), at(1_000));
    assert_eq!(second.fill_bytes_per_s, 0);
    let third = w.look(mem(5_000, 14 << 20), at(4_000));
    assert_eq!(third.fill_bytes_per_s, 1 << 20);
    let fourth = w.look(mem(6_000, 14 << 20), at(5_000));
    assert!(!fourth.flushed);
    assert_eq!(fourth.fill_bytes_per_s, (4 << 20) / 5);
    // A flush: fewer entries, a new memtable; its rate starts again.
    let flushed = w.look(mem(300, 9 << 20), at(6_000));
    assert!(flushed.flushed);
    assert_eq!(flushed.fill_bytes_per_s, 0);
    let after = w.look(mem(900, 11 << 20), at(8_000));
    assert!(!after.flushed);
    assert_eq!(after.fill_bytes_per_s, 1 << 20);
    // Writes stop: a second without a block is the spacing of blocks at
    // 1 MiB/s, the rate holds (over the memtable's life)...
    let between = w.look(mem(950, 11 << 20), at(10_000));
    assert_eq!(between.fill_bytes_per_s, (2 << 20) / 4);
    // ...but past twice a block's time and a second, nothing is coming.
    let quiet = w.look(mem(950, 11 << 20), at(11_001));
    assert_eq!(quiet.fill_bytes_per_s, 0);
    // Writes again: the rate over the memtable's life is back.
    let again = w.look(mem(2_000, 12 << 20), at(12_000));
    assert_eq!(again.fill_bytes_per_s, (3 << 20) / 6);
}

#[test]
fn a_shard_is_counted_again_after_growing_by_a_fraction_of_its_size() {
    let cfg = SizeCheck::default();
    let t0 = Instant::now();
    assert!(due(None, 0, 1, t0, &cfg), "never counted");
    let last = Counted {
        bytes: 800 << 20,
        handed_bytes: 1_000,
        epoch: 1,
        at: t0,
    };
    // 1/8 of 800 MiB is 100 MiB of log.
    assert!(!due(Some(&last), 1_000 + (99 << 20), 1, t0, &cfg));
    assert!(due(Some(&last), 1_000 + (100 << 20), 1, t0, &cfg));
    // A small shard waits for the minimum step.
    let small = Counted { bytes: 1_000, ..last };
    assert!(!due(Some(&small), 1_000 + (3 << 20), 1, t0, &cfg));
    assert!(due(Some(&small), 1_000 + (4 << 20), 1, t0, &cfg));
    // A split, or a counter that went back (the replica restarted).
    assert!(due(Some(&last), 1_000, 2, t0, &cfg));
    assert!(due(Some(&last), 10, 1, t0, &cfg));
    // Old: counted again after an eighth of the step, not for less.
    let later = t0 + cfg.age_max;
    assert!(due(Some(&last), 1_000 + (100 << 20) / 8, 1, later, &cfg));
    assert!(!due(Some(&last), 1_000 + (100 << 20) / 8 - 1, 1, later, &cfg));
    assert!(!due(Some(&last), 1_000, 1, later, &cfg));
}

#[test]
fn a_shard_is_split_by_the_bytes_counted_only() {
    let config = crate::moves::decode_config(None);
    let scan = |bytes: u64, complete: bool, at: Option<u64>| pigeonhole_engine::SizeScan {
        size: pigeonhole_engine::ShardSize {
            keys: 1,
            bytes,
            complete,
        },
        split_at: at,
        namespaces: BTreeMap::new(),
        namespaces_complete: true,
    };
    let size = config.split_size_bytes;
    assert_eq!(split_point(&scan(size, true, Some(7)), &config), Some(7));
    assert_eq!(split_point(&scan(size - 1, true, Some(7)), &config), None);
    // Cut short below the size (a shared space's siblings filled the
    // budget): no split.
    assert_eq!(split_point(&scan(size - 1, false, Some(7)), &config), None);
    assert_eq!(split_point(&scan(size, true, None), &config), None, "no point");
    let never = crate::moves::Config {
        split_size_bytes: crate::moves::SPLIT_NEVER,
        ..config
    };
    assert_eq!(split_point(&scan(u64::MAX, true, Some(7)), &never), None);
}

#[test]
fn namespace_bytes_sum_the_current_epochs_records_only() {
    let rec = |shard: u64, epoch: u64, ns: &[(&str, u64)]| ShardSizeRecord {
        shard,
        epoch,
        namespaces: ns
            .iter()
            .map(|(n, b)| pigeonhole_proto::internal::v1::NamespaceBytes {
                name: (*n).into(),
                bytes: *b,
            })
            .collect(),
        ..ShardSizeRecord::default()
    };
    let records: BTreeMap<u64, ShardSizeRecord> = [
        (1, rec(1, 3, &[("a", 10), ("b", 1)])),
        (2, rec(2, 1, &[("a", 5)])),
        // Counted before a split (epoch 1, the map says 2): left out.
        (3, rec(3, 1, &[("a", 1_000)])),
        // A shard the map no longer has: left out.
        (4, rec(4, 1, &[("b", 1_000)])),
    ]
    .into_iter()
    .collect();
    let epochs = |s: u64| match s {
        1 => Some(3),
        2 => Some(1),
        3 => Some(2),
        _ => None,
    };
    let got = namespace_bytes(&records, epochs);
    assert_eq!((got["a"], got["b"], got.len()), (15, 1, 2));
}

#[test]
fn size_records_decode_under_their_own_key_only() {
    let rec = |shard: u64, key_shard: u64| pigeonhole_engine::SystemValue {
        key: size_key(key_shard),
        version: 1,
        value: ShardSizeRecord {
            shard,
            bytes: shard * 10,
            ..Default::default()
        }
        .encode_to_vec(),
    };
    let sizes = decode_sizes(&[rec(3, 3), rec(4, 9)]);
    assert_eq!(sizes, Sizes::from([(3, 30)]));
}
