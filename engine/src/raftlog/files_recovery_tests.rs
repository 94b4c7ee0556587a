//! Recovery tests of the Raft log files (`files.rs`, `files_open.rs`):
//! torn tails are cut, damage is skipped and its shard cut, lost segments
//! and purge leftovers are told apart, all at reopen.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use super::tests::{data_end, newest, one_shard_log, OPTS};
use super::*;
use crate::raftlog::record::tests::entry;
use crate::raftlog::record::SEGMENT_HEADER_BYTES;
use raft::eraftpb::HardState;

/// Segments are allocated to their full size ahead of the appends; a
/// reopen cuts the unwritten zeros from the segment it replays (which
/// becomes an older one) without calling them torn, and the log opens
/// whole again and again.
#[test]
fn a_preallocated_segment_is_cut_to_its_data_at_reopen_and_not_called_torn() {
    let dir = tempfile::tempdir().unwrap();
    drop(one_shard_log(dir.path(), 3));
    let first = newest(dir.path());
    let end = data_end(&first);
    assert!(end < OPTS.segment_bytes);
    assert_eq!(
        std::fs::metadata(&first).unwrap().len(),
        OPTS.segment_bytes,
        "not preallocated"
    );
    for round in 0..3 {
        let files = LogFiles::open(dir.path(), OPTS).unwrap();
        let rec = files.recovery();
        assert_eq!(rec.torn_bytes, 0, "round {round}: {rec:?}");
        assert!(rec.damage.is_empty(), "round {round}: {rec:?}");
        assert!(rec.unwritten_bytes > 0, "round {round}: {rec:?}");
        assert_eq!(files.shard(1).last, (3, 1));
        assert_eq!(files.read(1, 1, 4, None).unwrap().len(), 3);
        if round == 0 {
            // The replayed segment ends with its last record now (later
            // rounds may have copied its entries forward and deleted it).
            assert_eq!(std::fs::metadata(&first).unwrap().len(), end);
        }
    }
}

#[test]
fn a_torn_last_record_is_cut_and_everything_before_it_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    drop(one_shard_log(dir.path(), 3));
    let path = newest(dir.path());
    let len = data_end(&path);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 3).unwrap();
    drop(f);
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    assert!(files.recovery().torn_bytes > 0);
    assert_eq!(files.shard(1).last, (2, 1));
    assert_eq!(files.read(1, 1, 3, None).unwrap().len(), 2);
    // Appends go on after the cut, and survive another reopen.
    let mut rec = RecordBuilder::default();
    rec.entries(1, false, &[entry(3, 2, b"again")]).unwrap();
    files.append(rec, Durability::Fsync).unwrap();
    drop(files);
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    assert_eq!(files.shard(1).last, (3, 2));
    assert_eq!(files.recovery().torn_bytes, 0);
}

/// A power cut in the middle of the last (unsynced) write: its first page
/// never reached the disk, a later one did, torn. Nothing intact follows
/// the hole, so it is the torn tail and is cut (it failed the open before:
/// "zeros where a record should be"; found by the Jepsen harness's
/// lost-write file system).
#[test]
fn a_last_record_whose_first_page_was_lost_but_a_later_one_landed_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let files = one_shard_log(dir.path(), 2);
    let path = newest(dir.path());
    let start = data_end(&path);
    let mut rec = RecordBuilder::default();
    rec.entries(1, false, &[entry(3, 1, &[7u8; 12_000])]).unwrap();
    files.append(rec, Durability::Fsync).unwrap();
    drop(files);
    let mut bytes = std::fs::read(&path).unwrap();
    let start = usize::try_from(start).unwrap();
    // Its first page lost (zeros), the second landed, the rest lost.
    let first_page_end = (start / 4096 + 1) * 4096;
    bytes[start..first_page_end].fill(0);
    bytes[first_page_end + 4096..].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    assert!(files.recovery().torn_bytes > 0);
    assert_eq!(
        files.shard(1).last,
        (2, 1),
        "the torn record is gone, the two before it kept"
    );
}

/// A log of two fsync'd entries, a hard state at term 1 with vote 1, then
/// `tail` hard-state records written without fsync: (term, vote, commit).
/// Returns the offset of each tail record.
fn log_with_hard_state_tail(dir: &Path, tail: &[(u64, u64, u64)]) -> Vec<usize> {
    let files = one_shard_log(dir, 2);
    let mut rec = RecordBuilder::default();
    rec.hard_state(
        1,
        &HardState {
            term: 1,
            vote: 1,
            commit: 1,
            ..Default::default()
        },
    );
    files.append(rec, Durability::Fsync).unwrap();
    let path = newest(dir);
    let mut at = Vec::new();
    for (term, vote, commit) in tail {
        at.push(usize::try_from(data_end(&path)).unwrap());
        let mut rec = RecordBuilder::default();
        let hard = HardState {
            term: *term,
            vote: *vote,
            commit: *commit,
            ..Default::default()
        };
        rec.hard_state(1, &hard);
        files.append(rec, Durability::NoFsync).unwrap();
    }
    at
}

/// Commit-only records (written without fsync) can stand whole after a
/// hole a power cut left in the unsynced tail: the hole and everything
/// after it is cut. A term or vote after the hole would have been fsync'd,
/// and with it the hole: damage.
#[test]
fn commit_only_records_after_a_hole_are_a_torn_tail_but_a_vote_is_damage() {
    for (vote_after, fails) in [(1u64, false), (2, true)] {
        let dir = tempfile::tempdir().unwrap();
        let at = log_with_hard_state_tail(dir.path(), &[(1, 1, 2), (1, vote_after, 2)]);
        let path = newest(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at[0]..at[0] + 8].fill(0); // the first tail record's header lost
        std::fs::write(&path, &bytes).unwrap();
        let files = LogFiles::open(dir.path(), OPTS).unwrap();
        let rec = files.recovery();
        if fails {
            assert_eq!(rec.torn_bytes, 0, "a vote after the hole was cut away as torn");
            assert!(rec.newest_damaged && !rec.damage.is_empty(), "{rec:?}");
            assert_eq!(files.shard(1).hard.vote, 2, "the vote after the hole is kept");
        } else {
            assert!(
                rec.damage.is_empty(),
                "commit-only records after a hole are damage: {rec:?}"
            );
            assert!(rec.torn_bytes > 0);
            assert_eq!(files.shard(1).last, (2, 1));
            assert_eq!(
                files.shard(1).hard.commit,
                1,
                "the commit moves after the hole are gone"
            );
        }
    }
}

/// A damaged length field in the middle of the newest segment that claims
/// more bytes than the file has is damage, not a torn tail: fsync'd
/// records follow it (before, the claim past the end read as "nothing
/// after" and they were cut; found by a review). Salvage skips it and
/// cuts the shard's log before the hole (D49).
#[test]
fn a_damaged_length_before_fsynced_records_is_damage_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    drop(one_shard_log(dir.path(), 3));
    let path = newest(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // After the segment header comes the checkpoint record, then entry 1's.
    let header = usize::try_from(SEGMENT_HEADER_BYTES).unwrap();
    let checkpoint_len = u32::from_be_bytes(bytes[header..header + 4].try_into().unwrap());
    let first = header + 8 + usize::try_from(checkpoint_len).unwrap();
    assert!(bytes[first..].windows(7).position(|w| w == b"payload").unwrap() < 100);
    bytes[first] = 0x01; // its length now runs past the end of the file
    std::fs::write(&path, &bytes).unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    let rec = files.recovery();
    assert_eq!(
        rec.torn_bytes, 0,
        "fsync'd records after a damaged length were cut as torn"
    );
    assert_eq!(rec.damage.len(), 1, "{rec:?}");
    assert!(rec.newest_damaged);
    assert_eq!(rec.cut_shards, vec![1]);
    assert_eq!(files.shard(1).last, (0, 0), "entries 2 and 3 follow a hole: cut");
    assert!(lock(&files.index).shards[&1].entries.is_empty());
}

#[test]
fn a_damaged_record_with_data_after_it_is_skipped_and_its_shard_cut() {
    let dir = tempfile::tempdir().unwrap();
    drop(one_shard_log(dir.path(), 3));
    let path = newest(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // The first record after the header and the checkpoint: flip a
    // payload byte of entry 1.
    let at = bytes.windows(7).position(|w| w == b"payload").unwrap();
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    let rec = files.recovery().clone();
    assert!(rec.damage[0].contains("checksum mismatch"), "{rec:?}");
    assert!(rec.damage[0].contains("bytes skipped"), "{rec:?}");
    assert_eq!(rec.suspect_shards(&[1]), vec![1]);
    assert_eq!(files.shard(1).last, (0, 0));
    // The cut shard takes appends again (a snapshot's reset, then entries
    // after it), and a reopen finds it whole: the checkpoint of the
    // segment the salvage started states it.
    let mut r = RecordBuilder::default();
    r.reset(1, 3, 1);
    r.entries(1, false, &[entry(4, 2, b"after")]).unwrap();
    files.append(r, Durability::Fsync).unwrap();
    drop(files);
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    assert_eq!(files.shard(1).last, (4, 2));
    assert_eq!(files.read(1, 4, 5, None).unwrap().len(), 1);
    assert!(files.recovery().cut_shards.is_empty(), "{:?}", files.recovery());
}

/// Damage in an older segment: every live entry stored before it is
/// dropped (a lost record may have overwritten any of them), so both
/// shards are cut, each to the run after its truncation point (nothing:
/// their later entries start after a hole), with commit lowered to it.
#[test]
fn damage_in_an_older_segment_drops_every_entry_stored_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    for i in 1..=60u64 {
        let mut rec = RecordBuilder::default();
        rec.entries(
            1,
            false,
            &[entry(i, 1, &[b"one-payload".as_slice(), &[b'.'; 60]].concat())],
        )
        .unwrap();
        files.append(rec, Durability::Fsync).unwrap();
        let mut rec = RecordBuilder::default();
        rec.entries(
            2,
            false,
            &[entry(i, 1, &[b"two-payload".as_slice(), &[b'.'; 60]].concat())],
        )
        .unwrap();
        files.append(rec, Durability::Fsync).unwrap();
    }
    let mut rec = RecordBuilder::default();
    rec.hard_state(
        1,
        &HardState {
            term: 1,
            vote: 1,
            commit: 60,
            ..Default::default()
        },
    );
    files.append(rec, Durability::Fsync).unwrap();
    drop(files);
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "{segs:?}");
    // Flip a byte of one of shard 1's entries in the first segment.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let hits: Vec<usize> = bytes
        .windows(11)
        .enumerate()
        .filter(|(_, w)| *w == b"one-payload")
        .map(|(i, _)| i)
        .collect();
    let at = hits[hits.len() / 2];
    bytes[at] ^= 0x40;
    std::fs::write(&segs[0], &bytes).unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    let rec = files.recovery().clone();
    assert!(!rec.newest_damaged, "{rec:?}");
    assert_eq!(rec.cut_shards, vec![1, 2]);
    for shard in [1, 2] {
        let s = files.shard(shard);
        assert_eq!(s.last, (0, 0), "shard {shard}");
        assert!(lock(&files.index).shards[&shard].entries.is_empty());
    }
    assert_eq!(files.shard(1).hard.commit, 0, "commit lowered to the last index");
    assert_eq!(files.shard(1).hard.vote, 1, "the vote stays");
    // A reopen cuts nothing more: the new segment's checkpoint states the
    // cut logs (and purge has deleted the damaged segment, which no live
    // entry needs any more).
    drop(files);
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    assert!(files.recovery().cut_shards.is_empty(), "{:?}", files.recovery());
}

/// Found by a review: a lost record that overwrote entries (a new
/// leader's 6 and 7 over an uncommitted tail) left the old ones under the
/// new last index and term, a log that looked whole. Every entry stored
/// before damage is now dropped; and a commit index past what is left is
/// lowered (raft-rs refuses it).
#[test]
fn a_lost_overwrite_never_leaves_the_old_entries_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    let write = |entries: &[Entry], durability| {
        let mut rec = RecordBuilder::default();
        rec.entries(1, false, entries).unwrap();
        files.append(rec, durability).unwrap();
    };
    write(
        &(1..=4).map(|i| entry(i, 1, b"first")).collect::<Vec<_>>(),
        Durability::Fsync,
    );
    write(
        &(5..=7).map(|i| entry(i, 2, b"old-tail")).collect::<Vec<_>>(),
        Durability::Fsync,
    );
    let overwrite_at = data_end(&newest(dir.path()));
    write(
        &(6..=7).map(|i| entry(i, 3, b"OVERWRITE")).collect::<Vec<_>>(),
        Durability::Fsync,
    );
    write(&[entry(8, 3, b"after")], Durability::Fsync);
    let mut rec = RecordBuilder::default();
    rec.hard_state(
        1,
        &HardState {
            term: 3,
            vote: 2,
            commit: 8,
            ..Default::default()
        },
    );
    files.append(rec, Durability::Fsync).unwrap();
    drop(files);
    let path = newest(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(9).position(|w| w == b"OVERWRITE").unwrap();
    assert!(at as u64 > overwrite_at);
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    let rec = files.recovery().clone();
    assert!(rec.newest_damaged && rec.cut_shards == vec![1], "{rec:?}");
    for i in 1..=8 {
        assert_ne!(
            files.term(1, i),
            Some(2),
            "entry {i} of the overwritten tail is still served"
        );
    }
    let s = files.shard(1);
    assert!(
        s.hard.commit <= s.last.0,
        "commit {} past the last index {:?}",
        s.hard.commit,
        s.last
    );
    assert_eq!((s.hard.term, s.hard.vote), (3, 2));
}

/// Found by a review: a newest segment whose header is damaged was
/// skipped but kept, and the new segment took its number ("file
/// exists"), so the node could never open again.
#[test]
fn a_damaged_newest_header_is_skipped_and_the_log_opens_again() {
    let dir = tempfile::tempdir().unwrap();
    drop(one_shard_log(dir.path(), 5));
    let path = newest(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].fill(0xee);
    std::fs::write(&path, &bytes).unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    assert!(files.recovery().newest_damaged, "{:?}", files.recovery());
    let mut rec = RecordBuilder::default();
    rec.reset(1, 10, 2);
    files.append(rec, Durability::Fsync).unwrap();
    drop(files);
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    assert_eq!(files.shard(1).last, (10, 2));
    drop(files);
    assert!(LogFiles::open(dir.path(), OPTS).is_ok());
}

#[test]
fn a_lost_segment_with_live_entries_is_damage_and_a_purge_leftover_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    // Enough records for several segments; nothing is compacted, so
    // every segment holds live entries.
    drop(one_shard_log(dir.path(), 300));
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "{segs:?}");
    let saved: Vec<(PathBuf, Vec<u8>)> = segs.iter().map(|p| (p.clone(), std::fs::read(p).unwrap())).collect();
    std::fs::remove_file(&segs[1]).unwrap();
    {
        let files = LogFiles::open(dir.path(), OPTS).unwrap();
        let rec = files.recovery();
        assert!(rec.damage[0].contains("is missing or damaged"), "{rec:?}");
        assert_eq!(rec.cut_shards, vec![1]);
        assert_eq!(
            files.shard(1).last,
            (0, 0),
            "the entries before the gap are gone with it"
        );
    }
    // Put the log back as it was (the salvage started a segment after it).
    for e in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    for (p, bytes) in &saved {
        std::fs::write(p, bytes).unwrap();
    }
    // Compact everything: the purge deletes every old segment. Then put
    // back an old one, as if its unlink had not reached the disk while a
    // later one's had: it sits before a gap, and is dropped.
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    let old = std::fs::read(&segs[0]).unwrap();
    let mut rec = RecordBuilder::default();
    rec.compact(1, 300, 1);
    files.append(rec, Durability::Fsync).unwrap();
    // Dropping the log waits for the purge thread's deletions.
    drop(files);
    assert!(!segs[0].exists() && !segs[1].exists());
    std::fs::write(&segs[0], old).unwrap();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    assert_eq!(files.recovery().stale_segments, 1);
    assert!(!segs[0].exists());
    assert_eq!(files.shard(1).truncated, (300, 1));
}

/// A kill while a new segment's header was being written leaves a file
/// too short to hold it, which the next open removes. The segment that
/// open starts must take the removed one's number: one past it left a gap
/// in the numbers, and the open after that took every segment before the
/// gap for a purge leftover and deleted them with their live entries
/// (`raft_log_crash` lost acknowledged entries this way, once in CI).
#[test]
fn a_removed_unfinished_newest_segment_leaves_no_gap_in_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let count = |d: &Path| std::fs::read_dir(d).unwrap().count();
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    let segs = count(dir.path());
    // Append until the log rotates: the segment before is then full.
    let mut last = 0;
    while count(dir.path()) == segs {
        last += 1;
        let mut rec = RecordBuilder::default();
        rec.entries(1, false, &[entry(last, 1, b"payload")]).unwrap();
        files.append(rec, Durability::Fsync).unwrap();
    }
    drop(files);
    // The newest segment as a kill during its header's write leaves it.
    let path = newest(dir.path());
    std::fs::write(&path, [0u8; 3]).unwrap();
    {
        let files = LogFiles::open(dir.path(), OPTS).unwrap();
        let rec = files.recovery();
        assert!(rec.damage.is_empty() && rec.torn_bytes == 3, "{rec:?}");
        // The last append rotated first, so it went with the new segment.
        last = files.shard(1).last.0;
        assert!(last > 0);
        let mut rec = RecordBuilder::default();
        rec.entries(1, false, &[entry(last + 1, 1, b"payload")]).unwrap();
        files.append(rec, Durability::Fsync).unwrap();
    }
    let files = LogFiles::open(dir.path(), OPTS).unwrap();
    let rec = files.recovery();
    assert!(rec.damage.is_empty() && rec.stale_segments == 0, "{rec:?}");
    assert_eq!(files.shard(1).last, (last + 1, 1));
    assert_eq!(files.read(1, 1, last + 2, None).unwrap().len() as u64, last + 1);
}
