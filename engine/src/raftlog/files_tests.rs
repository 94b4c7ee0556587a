//! Tests of the Raft log files (`files.rs`): a model test through
//! rotation, purge, segment GC and reopen; the recovery cases (torn tails,
//! damage, lost segments) are in `files_recovery_tests.rs`, which shares
//! this file's log helpers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use super::*;
use crate::raftlog::record::tests::entry;
use crate::raftlog::record::Found;
use raft::eraftpb::HardState;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

pub(super) const OPTS: LogFilesOptions = LogFilesOptions {
    segment_bytes: 4096,
    segments_soft_max: 3,
    gc_bytes_max: 4096,
};

/// One shard's log as the test expects it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    truncated: (u64, u64),
    last: (u64, u64),
    hard: HardState,
    entries: BTreeMap<u64, (u64, Vec<u8>)>,
}

/// Adds one random op for `shard` to `rec` and applies it to `m`.
fn random_op(rng: &mut impl Rng, rec: &mut RecordBuilder, shard: u64, m: &mut Model, term: &mut u64) {
    match rng.gen_range(0..10) {
        0..=5 => {
            let first = rng.gen_range(m.truncated.0 + 1..=m.last.0 + 1);
            if first <= m.last.0 {
                *term += 1; // a new leader overwrites a suffix
            }
            let n = rng.gen_range(1..=4u64);
            let data: Vec<(u64, Vec<u8>)> = (first..first + n)
                .map(|i| (i, vec![rng.gen::<u8>(); rng.gen_range(1..300)]))
                .collect();
            let entries: Vec<Entry> = data.iter().map(|(i, d)| entry(*i, *term, d)).collect();
            rec.entries(shard, false, &entries).unwrap();
            m.entries.retain(|i, _| *i < first);
            for (i, d) in data {
                m.entries.insert(i, (*term, d));
            }
            m.last = (first + n - 1, *term);
        }
        6 | 7 if m.last.0 > m.truncated.0 => {
            let to = rng.gen_range(m.truncated.0 + 1..=m.last.0);
            let t = m.entries[&to].0;
            rec.compact(shard, to, t);
            m.entries.retain(|i, _| *i > to);
            m.truncated = (to, t);
        }
        8 => {
            let hard = HardState {
                term: *term,
                vote: rng.gen_range(0..4),
                commit: m.truncated.0,
                ..Default::default()
            };
            rec.hard_state(shard, &hard);
            m.hard = hard;
        }
        _ => {
            if rng.gen_ratio(1, 4) {
                let at = m.last.0 + rng.gen_range(0..10);
                rec.reset(shard, at, *term);
                m.entries.clear();
                m.truncated = (at, *term);
                m.last = (at, *term);
            }
        }
    }
}

fn check(files: &LogFiles, models: &BTreeMap<u64, Model>, step: usize) {
    for (&shard, m) in models {
        let s = files.shard(shard);
        assert_eq!(
            (s.truncated, s.last, &s.hard),
            (m.truncated, m.last, &m.hard),
            "step {step} shard {shard}"
        );
        let got = files.read(shard, m.truncated.0 + 1, m.last.0 + 1, None).unwrap();
        let want: Vec<(u64, u64, Vec<u8>)> = m.entries.iter().map(|(i, (t, d))| (*i, *t, d.clone())).collect();
        let got: Vec<(u64, u64, Vec<u8>)> = got.iter().map(|e| (e.index, e.term, e.data.to_vec())).collect();
        assert_eq!(got, want, "step {step} shard {shard}");
    }
}

/// Random appends, overwrites, compactions, resets and hard states on
/// five shards (shard 0 goes idle after its first entries, so it pins
/// the oldest segment until segment GC copies it forward), with tiny
/// segments; the log must match the model after every record and after
/// every reopen, and the number of segments must stay bounded.
#[test]
fn the_log_matches_a_model_through_rotation_purge_gc_and_reopen() {
    for seed in 0..12u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut files = LogFiles::open(dir.path(), OPTS).unwrap();
        let mut models: BTreeMap<u64, Model> = BTreeMap::new();
        let mut term = 1;
        let mut segments_max = 0;
        for step in 0..400 {
            let mut rec = RecordBuilder::default();
            for _ in 0..rng.gen_range(1..=3) {
                let shard = if step < 3 { 0 } else { rng.gen_range(1..5) };
                let m = models.entry(shard).or_default();
                random_op(&mut rng, &mut rec, shard, m, &mut term);
            }
            if !rec.is_empty() {
                files.append(rec, Durability::NoFsync).unwrap();
            }
            check(&files, &models, step);
            segments_max = segments_max.max(files.stats().segments);
            if rng.gen_ratio(1, 40) {
                drop(files);
                files = LogFiles::open(dir.path(), OPTS).unwrap();
                check(&files, &models, step);
            }
        }
        assert!(
            segments_max <= OPTS.segments_soft_max + 3,
            "seed {seed}: {segments_max} segments: segment GC did not keep up"
        );
    }
}

/// Segment GC copies a pinning log forward only when it is small
/// (`gc_bytes_max`): shard 1 writes 1.8 KB into segment 1 and goes
/// quiet; shard 2 then fills a segment per write and compacts behind
/// itself. With a 1 KiB limit shard 1's entries stay where they are and
/// segment 1 with them (a busy log compacts by itself; a copy would stall
/// every shard's writes); with a 4 KiB limit they are copied forward and
/// segment 1 is deleted.
#[test]
fn segment_gc_copies_a_pinning_log_only_when_it_is_small() {
    for (gc_bytes_max, copied) in [(1024, false), (4096, true)] {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogFilesOptions {
            segment_bytes: 4096,
            segments_soft_max: 2,
            gc_bytes_max,
        };
        let files = LogFiles::open(dir.path(), opts).unwrap();
        let first = newest(dir.path());
        let mut rec = RecordBuilder::default();
        let quiet: Vec<Entry> = (1..=6).map(|i| entry(i, 1, &[1u8; 300])).collect();
        rec.entries(1, false, &quiet).unwrap();
        files.append(rec, Durability::Fsync).unwrap();
        for i in 1..=6u64 {
            let mut rec = RecordBuilder::default();
            rec.entries(2, false, &[entry(i, 1, &[2u8; 4200])]).unwrap();
            if i > 1 {
                rec.compact(2, i - 1, 1);
            }
            files.append(rec, Durability::Fsync).unwrap();
        }
        let stats = files.stats();
        assert_eq!(files.read(1, 1, 7, None).unwrap().len(), 6);
        // Dropping the log waits for the purge thread's deletions.
        drop(files);
        assert_eq!(first.exists(), !copied, "gc_bytes_max {gc_bytes_max}: {stats:?}");
        let files = LogFiles::open(dir.path(), opts).unwrap();
        assert_eq!(files.read(1, 1, 7, None).unwrap().len(), 6);
        assert_eq!(files.read(2, 6, 7, None).unwrap().len(), 1);
    }
}

pub(super) fn one_shard_log(dir: &Path, records: u64) -> LogFiles {
    let files = LogFiles::open(dir, OPTS).unwrap();
    for i in 1..=records {
        let mut rec = RecordBuilder::default();
        rec.entries(1, false, &[entry(i, 1, b"payload")]).unwrap();
        files.append(rec, Durability::Fsync).unwrap();
    }
    files
}

/// Where a segment's last whole record ends: its length on disk is the
/// preallocated size (`preallocate`), the rest zeros.
pub(super) fn data_end(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let mut at = record::SEGMENT_HEADER_BYTES;
    while let Found::Record { next, .. } = record::read_record(&bytes, at) {
        at = next;
    }
    at
}

pub(super) fn newest(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    segs.sort();
    segs.pop().unwrap()
}

/// Records in a segment file (its whole records, up to the zeros).
fn records_in(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let mut at = record::SEGMENT_HEADER_BYTES;
    let mut n = 0;
    while let Found::Record { next, .. } = record::read_record(&bytes, at) {
        at = next;
        n += 1;
    }
    n
}

/// Waits (at most 10 s) until `n` appends are queued behind the writer.
fn wait_queued(files: &LogFiles, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while files.group.queued() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} appends queued",
            files.group.queued()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Four callers append while the writer is busy (the test holds it, as a
/// slow fdatasync would): the first to come leads, and once the writer is
/// free it writes all four appends as ONE record with one fdatasync. Each
/// caller's entries read back at the right place (the merge moves every
/// entry's offset), and again after a reopen, which replays the one
/// record.
#[test]
fn concurrent_appends_are_joined_into_one_record_and_one_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogFilesOptions {
        segment_bytes: 1 << 20,
        ..OPTS
    };
    let files = LogFiles::open(dir.path(), opts).unwrap();
    let payload = |shard: u64, i: u64| vec![u8::try_from(shard * 16 + i).unwrap(); 50 + 30 * shard as usize];
    let segment = newest(dir.path());
    let records_before = records_in(&segment);
    std::thread::scope(|s| {
        let busy = lock(&files.writer);
        let fsyncs_before = busy.fsyncs;
        let callers: Vec<_> = (1..=4u64)
            .map(|shard| {
                let files = &files;
                s.spawn(move || {
                    let mut rec = RecordBuilder::default();
                    let entries: Vec<Entry> = (1..=3).map(|i| entry(i, 1, &payload(shard, i))).collect();
                    rec.entries(shard, false, &entries).unwrap();
                    rec.hard_state(
                        shard,
                        &HardState {
                            term: 1,
                            vote: shard,
                            commit: 1,
                            ..Default::default()
                        },
                    );
                    files.append(rec, Durability::Fsync)
                })
            })
            .collect();
        wait_queued(&files, 4);
        drop(busy);
        for c in callers {
            c.join().unwrap().unwrap();
        }
        assert_eq!(files.stats().fsyncs - fsyncs_before, 1, "{:?}", files.stats());
    });
    let stats = files.stats();
    assert_eq!((stats.groups_joined, stats.appends_joined), (1, 4), "{stats:?}");
    assert_eq!(records_in(&segment) - records_before, 1);
    let check = |files: &LogFiles| {
        for shard in 1..=4u64 {
            let got: Vec<(u64, Vec<u8>)> = files
                .read(shard, 1, 4, None)
                .unwrap()
                .into_iter()
                .map(|e| (e.index, e.data.to_vec()))
                .collect();
            let want: Vec<(u64, Vec<u8>)> = (1..=3).map(|i| (i, payload(shard, i))).collect();
            assert_eq!(got, want, "shard {shard}");
            let s = files.shard(shard);
            assert_eq!((s.last, s.hard.vote), ((3, 1), shard), "shard {shard}");
        }
    };
    check(&files);
    drop(files);
    check(&LogFiles::open(dir.path(), opts).unwrap());
}

/// A group's write that fails fails every caller in the group, not only
/// the one that led it, and every append after it (the log is broken).
#[test]
fn a_failed_group_write_fails_every_caller_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    let append = |files: &LogFiles, shard: u64| {
        let mut rec = RecordBuilder::default();
        rec.entries(shard, false, &[entry(1, 1, b"x")]).unwrap();
        files.append(rec, Durability::Fsync)
    };
    std::thread::scope(|s| {
        let mut busy = lock(&files.writer);
        let callers: Vec<_> = (1..=3u64)
            .map(|shard| {
                let files = &files;
                s.spawn(move || append(files, shard))
            })
            .collect();
        wait_queued(&files, 3);
        busy.broken = Some("the disk went away (test)".to_string());
        drop(busy);
        for c in callers {
            let err = c.join().unwrap().unwrap_err();
            assert!(
                matches!(&err, EngineError::LogIo(m) if m.contains("the disk went away")),
                "{err}"
            );
        }
    });
    assert!(matches!(append(&files, 9), Err(EngineError::LogIo(_))));
    assert_eq!(files.shard(1).last.0, 0);
}
