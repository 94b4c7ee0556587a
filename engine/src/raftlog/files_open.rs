//! Opening the Raft log: replaying every segment into the index, cutting
//! a torn tail or the unwritten preallocated space from the newest
//! segment, salvaging past damage (D49), deleting segments left by an
//! interrupted purge, and starting the segment appends go to. Apart from
//! `files.rs` (appends, reads, purge, segment GC) because it runs once per
//! process start and holds the recovery rules, which `files.rs`'s module
//! docs state and `files_tests.rs` checks.

use super::super::group::Group;
use super::super::index::{Index, Segment};
use super::super::record::{self, Found, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use super::{
    create_segment, io_err, log_corruption, segment_path, sync_dir, Housekept, LogFiles, LogFilesOptions, OnDamage,
    Writer,
};
use crate::engine::lock;
use crate::error::EngineError;
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What recovery found and did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogRecovery {
    /// Segments replayed (0 when the log is new, or was lost).
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Bytes cut from the newest segment's torn tail.
    pub torn_bytes: u64,
    /// Zeros cut from the newest segment's end: space allocated ahead of
    /// the appends (`preallocate`) and never written. Not damage.
    pub unwritten_bytes: u64,
    /// Segments older than a gap in the numbering (left by an interrupted
    /// purge), deleted.
    pub stale_segments: usize,
    /// Damage found and skipped (salvage, §8.5): which file, where, what.
    /// Empty for a log that opened whole.
    pub damage: Vec<String>,
    /// Shards whose log lost live entries to the damage, cut to the whole
    /// run after their truncation point (ascending).
    pub cut_shards: Vec<u64>,
    /// Damage reached the newest segment, after which no checkpoint
    /// restates the shards' state: any shard may have lost entries or its
    /// hard state there, not only `cut_shards`.
    pub newest_damaged: bool,
}

impl LogRecovery {
    /// The shards that must catch up from their peers before they vote
    /// again (D49): every shard the log knows when the newest segment was
    /// damaged, else the shards cut.
    pub fn suspect_shards(&self, known: &[u64]) -> Vec<u64> {
        if self.newest_damaged {
            let mut all: Vec<u64> = known.iter().chain(&self.cut_shards).copied().collect();
            all.sort_unstable();
            all.dedup();
            all
        } else {
            self.cut_shards.clone()
        }
    }
}

impl LogFiles {
    /// Opens the log in `dir` (created if missing): replays every segment,
    /// cuts a torn tail, checks every shard's log is whole, and starts a new
    /// segment for appends.
    #[cfg(test)]
    pub(crate) fn open(dir: &Path, options: LogFilesOptions) -> Result<LogFiles, EngineError> {
        Self::open_with(dir, options, &mut |_, _| Ok(()))
    }

    /// [`LogFiles::open`], calling `on_damage` with what recovery found and
    /// every shard the log knows when it found damage, before the new
    /// segment's checkpoint makes the salvaged state durable: what the
    /// caller records there (which shards must catch up, D49) is then on
    /// disk before the damage stops being visible (a later open would find
    /// the cut shards whole, as the checkpoint states them).
    pub(crate) fn open_with(
        dir: &Path,
        options: LogFilesOptions,
        on_damage: &mut OnDamage<'_>,
    ) -> Result<LogFiles, EngineError> {
        if options.segment_bytes < 4096 || options.segments_soft_max < 2 {
            return Err(EngineError::InvalidCall(format!(
                "raft log: segment_bytes must be >= 4096 and segments_soft_max >= 2, got {options:?}"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        let mut numbers = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(|e| io_err("list", dir, e))? {
            let ent = ent.map_err(|e| io_err("list", dir, e))?;
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".phlog") {
                let seg = u64::from_str_radix(hex, 16)
                    .map_err(|_| log_corruption(format!("unexpected file {name} in the log directory")))?;
                numbers.push(seg);
            }
        }
        numbers.sort_unstable();
        // The longest run of consecutive numbers ending with the newest.
        let mut keep_from = 0;
        for (i, pair) in numbers.windows(2).enumerate() {
            if let [a, b] = pair {
                if *b != a + 1 {
                    keep_from = i + 1;
                }
            }
        }
        let stale: Vec<u64> = numbers.get(..keep_from).unwrap_or_default().to_vec();
        let kept: Vec<u64> = numbers.get(keep_from..).unwrap_or_default().to_vec();

        let mut index = Index::default();
        // Where the last damage was (segment, offset): any live entry
        // stored before it may have been overwritten by what was lost.
        let mut last_damage: Option<(u64, u64)> = None;
        let mut recovery = LogRecovery {
            stale_segments: stale.len(),
            ..Default::default()
        };
        let newest = kept.last().copied();
        // The newest segment, if it is removed below as never completed.
        let mut removed_newest = None;
        for &seg in &kept {
            let path = segment_path(dir, seg);
            let bytes = std::fs::read(&path).map_err(|e| io_err("read", &path, e))?;
            let is_newest = Some(seg) == newest;
            if let Err(e) = record::check_segment_header(&bytes, seg) {
                if is_newest && (bytes.len() as u64) < SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES {
                    // Created but never completed: nothing in it was acknowledged.
                    std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
                    recovery.torn_bytes += bytes.len() as u64;
                    removed_newest = Some(seg);
                    continue;
                }
                // Damage: the whole segment is skipped (left on disk, never
                // replayed), and the shards that had live entries in it
                // are found below.
                recovery
                    .damage
                    .push(format!("{}: {e}; the segment was skipped", path.display()));
                recovery.newest_damaged |= is_newest;
                last_damage = Some((seg, 0));
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_err("open", &path, e))?;
            index.segments.insert(
                seg,
                Segment {
                    file: Arc::new(file),
                    live: 0,
                },
            );
            recovery.segments += 1;
            let mut at = SEGMENT_HEADER_BYTES;
            let len = bytes.len() as u64;
            loop {
                match record::read_record(&bytes, at) {
                    Found::Record { ops, next } => {
                        for op in ops {
                            index.apply(op, seg);
                        }
                        recovery.records += 1;
                        at = next;
                    }
                    Found::End if at == len => break,
                    // The newest segment's preallocated, never written
                    // space: nothing but zeros to the end. Cut like a torn
                    // tail (this segment becomes an older one below, and
                    // an older one must end with its last record), but
                    // not counted as one.
                    Found::End
                        if is_newest
                            && usize::try_from(at)
                                .ok()
                                .and_then(|a| bytes.get(a..))
                                .is_some_and(|r| r.iter().all(|b| *b == 0)) =>
                    {
                        cut(&path, at)?;
                        recovery.unwritten_bytes += len - at;
                        break;
                    }
                    Found::End | Found::Torn(_) if is_newest && !durable_after(&bytes, at, &index) => {
                        cut(&path, at)?;
                        recovery.torn_bytes += len - at;
                        break;
                    }
                    Found::End | Found::Torn(_) | Found::Corrupt(_) => {
                        // Damage to acknowledged writes: skip to the next
                        // whole record (or the segment's end) and go on;
                        // the shards that lost live entries are found by
                        // the check below, and caught up from their peers.
                        let why = match record::read_record(&bytes, at) {
                            Found::Torn(why) | Found::Corrupt(why) => why,
                            _ => "zeros where a record should be".to_string(),
                        };
                        let resume = record::next_record_after(&bytes, at);
                        recovery.damage.push(format!(
                            "{} at offset {at}: {why}; {}",
                            path.display(),
                            match resume {
                                Some(n) => format!("{} bytes skipped", n - at),
                                None => format!("the rest of the segment ({} bytes) skipped", len - at),
                            }
                        ));
                        recovery.newest_damaged |= is_newest;
                        last_damage = Some((seg, at));
                        match resume {
                            Some(n) => at = n,
                            None => break,
                        }
                    }
                }
            }
        }
        let damage_seen = !recovery.damage.is_empty();
        for (shard, why) in index.salvage(last_damage) {
            // A shard that lost live entries: a segment was damaged, or is
            // missing (a missing one is damage too, named by its shards).
            if !damage_seen {
                recovery.damage.push(why);
            }
            recovery.cut_shards.push(shard);
        }
        if !recovery.damage.is_empty() {
            // Shards with a log: a replica deleted here (replica GC, D37)
            // keeps only its term and vote, at (0, 0), and is no one's to
            // catch up.
            let mut known: Vec<u64> = index
                .shards
                .iter()
                .filter(|(_, s)| s.last.0 > 0 || s.truncated.0 > 0)
                .map(|(id, _)| *id)
                .collect();
            known.sort_unstable();
            on_damage(&recovery, &known)?;
        }
        for seg in stale {
            let path = segment_path(dir, seg);
            std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
        }
        // The replayed newest segment may end in commit-only records never
        // fsync'd; the new segment makes it an older one, whose damage
        // recovery does not forgive.
        if let Some((&last, s)) = index.segments.iter().next_back() {
            s.file
                .sync_data()
                .map_err(|e| io_err("fsync", &segment_path(dir, last), e))?;
        }
        // Past every file kept, replayed or not: a skipped segment (a bad
        // header) stays on disk under its number. A removed unfinished one
        // is not on disk, and its number is taken again: one past it would
        // leave a gap, and the next open would take every segment before
        // the gap for a purge leftover and delete their live entries.
        let seg = kept
            .iter()
            .copied()
            .rfind(|s| Some(*s) != removed_newest)
            .max(index.segments.keys().next_back().copied())
            .map_or(1, |s| s + 1);
        let (file, size) = create_segment(dir, seg, &index, options.segment_bytes)?;
        index.segments.insert(
            seg,
            Segment {
                file: file.clone(),
                live: 0,
            },
        );
        let failures: super::super::purge::Failures = Arc::default();
        let files = LogFiles {
            dir: dir.to_path_buf(),
            options,
            writer: Mutex::new(Writer {
                file,
                seg,
                size,
                broken: None,
                gc_ran_at_seg: 0,
                bytes_written: 0,
                fsyncs: 0,
            }),
            index: Mutex::new(index),
            group: Group::default(),
            recovery,
            housekeeping: Arc::clone(&failures),
            purger: super::super::purge::Purger::start(dir, failures)?,
        };
        {
            let mut w = lock(&files.writer);
            files.housekeep(&mut w, &mut Housekept::default())?;
        }
        Ok(files)
    }
}

/// Cuts the newest segment's torn tail at `at`.
fn cut(path: &Path, at: u64) -> Result<(), EngineError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_err("open", path, e))?;
    f.set_len(at).map_err(|e| io_err("truncate", path, e))?;
    f.sync_all().map_err(|e| io_err("fsync", path, e))
}

/// Whether something made durable follows the bad spot at `at` of the
/// newest segment (`record::durable_record_after`): any record but one
/// that only moves commit indexes, keeping each shard's term and vote as
/// the records before the bad spot left them. Such records are written
/// without fsync, so they can stand whole after a torn hole; a vote or a
/// term is fsync'd before anyone hears of it, and with it everything
/// before it.
fn durable_after(bytes: &[u8], at: u64, index: &Index) -> bool {
    record::durable_record_after(bytes, at, |ops| {
        ops.iter().any(|op| match op {
            record::IndexOp::HardState { shard, hard } => index
                .shards
                .get(shard)
                .is_none_or(|s| s.hard.term != hard.term || s.hard.vote != hard.vote),
            _ => true,
        })
    })
}
