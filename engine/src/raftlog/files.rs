//! The Raft log's files: an append-only sequence of segment files shared by
//! every shard on the node (tikv/raft-engine's model), and the in-memory
//! index that says where each live entry is.
//!
//! Why not RocksDB (format 1 kept the log in a column family): an entry
//! written there went through the WAL, a memtable insert, a flush to an SST
//! and a compaction that finally dropped it, all for data that lives for
//! seconds. Here an entry is written once, read back from memory (the entry
//! cache) or with one `pread`, and its space is reclaimed by deleting whole
//! files.
//!
//! The rules that keep it correct (each one has a test):
//! - **One record per group commit.** [`LogFiles::append`] writes one record
//!   with one `write` and, for `Durability::Fsync`, one fdatasync. The index
//!   changes only after that returned, so readers never see what a crash
//!   could take back.
//! - **A failed write or fsync breaks the log for good.** The page cache may
//!   have dropped the data (fsyncgate), so every later append fails too and
//!   the node must restart and recover from what is on disk.
//! - **Every segment starts with a checkpoint** of every shard's state (hard
//!   state, truncation, last index). So the oldest segment can be deleted as
//!   soon as none of its entries is live: what else it said is superseded.
//! - **Purge deletes oldest first** and recovery keeps only the longest run
//!   of consecutively numbered segments ending with the newest, so an
//!   interrupted purge (some unlinks on disk, some not) leaves nothing stale.
//!   Anything live that went missing shows up as a hole in a shard's log,
//!   and opening fails.
//! - **Segment GC (rewrite).** A shard whose old entries pin the oldest
//!   segment (an idle shard that never reaches its compaction threshold)
//!   gets those entries copied forward in a Rewrite record, fsync'd before
//!   the old segment is deleted.
//! - **Torn tails.** Only the newest segment can end in a torn record (every
//!   older one was complete before the next was created), and only its last
//!   record: each record is fsync'd before the next is written. Recovery cuts
//!   a bad record there if nothing but zeros follows the space it claims. A
//!   bad record anywhere else, or one followed by data, is damage to
//!   acknowledged writes, and the open fails instead of dropping them.
//!
//! - **Segments are preallocated** to `segment_bytes` once their header is
//!   durable (`preallocate`), so the fdatasync of an append does not also
//!   commit a new file length. The unwritten space reads as zeros: the end
//!   of the data to recovery, which cuts it from the newest segment before
//!   that becomes an older one (an older segment ends with its last
//!   record, and the writer fills each segment past its preallocation
//!   before it starts the next).
//!
//! Locks: `writer` (the active segment) is taken by appends, purge and
//! rewrite, which are all one writer's work; `index` briefly by everyone.
//! Order: writer, then index. Entry reads take only `index`, then read the
//! file through an `Arc<File>`, which stays valid even if a purge unlinks it.

use super::index::{Index, Loc, Segment, ShardIndex};
use super::record::{self, Found, RecordBuilder, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use crate::engine::{lock, Durability};
use crate::error::EngineError;
use raft::eraftpb::Entry;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Sizes of the log's files.
#[derive(Debug, Clone, Copy)]
pub struct LogFilesOptions {
    /// A segment is closed once it holds at least this many bytes.
    pub segment_bytes: u64,
    /// Past this many segments, the entries pinning the oldest one are
    /// copied forward so it can be deleted (segment GC).
    pub segments_soft_max: usize,
    /// Segment GC copies at most this many bytes of entries, or nothing:
    /// more means logs that are long because they are busy, which their
    /// own compaction frees, and the copy would stall every shard's
    /// writes meanwhile (it runs inside an append).
    pub gc_bytes_max: u64,
}

impl Default for LogFilesOptions {
    fn default() -> Self {
        LogFilesOptions {
            segment_bytes: 32 << 20,
            segments_soft_max: 16,
            // An eighth of a segment: what idle shards pin is a few
            // entries each; busy logs were copied whole before (up to a
            // segment, 0.6-1 s of stall per new segment in the steady
            // state, docs/benchmarks.md).
            gc_bytes_max: 4 << 20,
        }
    }
}

/// What one append's housekeeping did, for the slow-write warning.
#[derive(Debug, Default)]
struct Housekept {
    purged: usize,
    purge: std::time::Duration,
    rewritten_bytes: u64,
    gc: std::time::Duration,
}

/// A Raft log append (write and fdatasync) or its housekeeping (purge,
/// segment GC) that takes this long is logged as slow.
const LOG_WRITE_SLOW: std::time::Duration = std::time::Duration::from_millis(200);

pub(crate) fn log_corruption(reason: String) -> EngineError {
    EngineError::corruption("raft-log", b"", reason)
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> EngineError {
    EngineError::LogIo(format!("{what} {}: {e}", path.display()))
}

#[derive(Debug)]
struct Writer {
    file: Arc<File>,
    seg: u64,
    size: u64,
    /// Set by the first failed write or fsync; every later append fails.
    broken: Option<String>,
    /// The active segment when segment GC last ran: it runs at most once
    /// per segment, so a GC that cannot help costs nothing per append.
    gc_ran_at_seg: u64,
    /// Record bytes written since the log was opened (for metrics).
    bytes_written: u64,
    /// fdatasyncs of appended records since the log was opened.
    fsyncs: u64,
}

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

/// The segment files and their index.
#[derive(Debug)]
pub(crate) struct LogFiles {
    dir: PathBuf,
    options: LogFilesOptions,
    writer: Mutex<Writer>,
    index: Mutex<Index>,
    recovery: LogRecovery,
    /// Purges and GCs that failed, and the last error (shared with the
    /// purge thread).
    housekeeping: super::purge::Failures,
    /// Deletes purged segments' files, off the append path. Declared last:
    /// dropped last, once nothing else can hand it work.
    purger: super::purge::Purger,
}

/// The log's files now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Segment files on disk.
    pub segments: usize,
    /// The number of the segment being appended to.
    pub newest_segment: u64,
    /// Purges or segment GCs that failed since the log was opened (each is
    /// retried after the next write); a node should report this.
    pub housekeeping_failures: u64,
    /// The last such failure.
    pub last_housekeeping_error: Option<String>,
    /// Record bytes appended since the log was opened (segment GC's
    /// rewrites included).
    pub bytes_written: u64,
    /// fdatasyncs of appended records since the log was opened.
    pub fsyncs: u64,
}

fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016x}.phlog"))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), EngineError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

/// What [`LogFiles::open_with`] calls on damage: what recovery found, and
/// every shard the log knows.
pub(crate) type OnDamage<'a> = dyn FnMut(&LogRecovery, &[u64]) -> Result<(), EngineError> + 'a;

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
        let failures: super::purge::Failures = Arc::default();
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
            recovery,
            housekeeping: Arc::clone(&failures),
            purger: super::purge::Purger::start(dir, failures)?,
        };
        {
            let mut w = lock(&files.writer);
            files.housekeep(&mut w, &mut Housekept::default())?;
        }
        Ok(files)
    }

    /// Every shard the log holds state for, ascending.
    pub(crate) fn shard_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = lock(&self.index).shards.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// What the last open found.
    pub(crate) fn recovery(&self) -> &LogRecovery {
        &self.recovery
    }

    /// The shard's log state (a default, empty one if the log never saw it).
    pub(crate) fn shard(&self, shard: u64) -> ShardIndex {
        let ix = lock(&self.index);
        ix.shards
            .get(&shard)
            .map(|s| ShardIndex {
                hard: s.hard.clone(),
                truncated: s.truncated,
                last: s.last,
                entries: Default::default(),
            })
            .unwrap_or_default()
    }

    /// The term of a live entry.
    pub(crate) fn term(&self, shard: u64, index: u64) -> Option<u64> {
        lock(&self.index)
            .shards
            .get(&shard)
            .and_then(|s| s.entries.get(index))
            .map(|l| l.term)
    }

    /// Reads entries `low..high` of `shard`, stopping early once their
    /// encoded size passes `max_bytes` (always at least one entry).
    pub(crate) fn read(
        &self,
        shard: u64,
        low: u64,
        high: u64,
        max_bytes: Option<u64>,
    ) -> Result<Vec<Entry>, EngineError> {
        let mut plan: Vec<(Arc<File>, u64, Loc)> = Vec::new();
        if low >= high {
            return Ok(Vec::new());
        }
        {
            let ix = lock(&self.index);
            let s = ix
                .shards
                .get(&shard)
                .ok_or_else(|| log_corruption(format!("shard {shard} has no log")))?;
            let mut size = 0u64;
            for i in low..high {
                let loc = *s
                    .entries
                    .get(i)
                    .ok_or_else(|| log_corruption(format!("shard {shard}: entry {i} is not in the log")))?;
                size += u64::from(loc.len);
                if !plan.is_empty() && max_bytes.is_some_and(|m| size > m) {
                    break;
                }
                let file = ix
                    .segments
                    .get(&loc.seg)
                    .ok_or_else(|| log_corruption(format!("shard {shard}: entry {i} is in a deleted segment")))?
                    .file
                    .clone();
                plan.push((file, i, loc));
            }
        }
        let mut out = Vec::with_capacity(plan.len());
        let mut buf = Vec::new();
        let mut k = 0;
        while let Some((file, _, first)) = plan.get(k) {
            // One pread for a run of entries that sit back to back in one
            // record (entry header bytes in between).
            let mut end = k + 1;
            let mut span_end = first.offset + u64::from(first.len);
            while let Some((_, _, next)) = plan.get(end) {
                if next.seg != first.seg || next.offset != span_end + record::ENTRY_HEADER_BYTES {
                    break;
                }
                span_end = next.offset + u64::from(next.len);
                end += 1;
            }
            let span = usize::try_from(span_end - first.offset)
                .map_err(|_| log_corruption(format!("shard {shard}: a read span does not fit in memory")))?;
            buf.resize(span, 0);
            file.read_exact_at(&mut buf, first.offset)
                .map_err(|e| io_err("read", &segment_path(&self.dir, first.seg), e))?;
            for (_, index, loc) in plan.get(k..end).unwrap_or_default() {
                let from = usize::try_from(loc.offset - first.offset).unwrap_or(usize::MAX);
                let bytes = buf.get(from..from.saturating_add(loc.len as usize)).unwrap_or_default();
                let e: Entry = protobuf::Message::parse_from_bytes(bytes)
                    .map_err(|err| log_corruption(format!("shard {shard}: entry {index} does not decode: {err}")))?;
                if e.index != *index || e.term != loc.term {
                    return Err(log_corruption(format!(
                        "shard {shard}: expected entry {index} term {}, read entry {} term {}",
                        loc.term, e.index, e.term
                    )));
                }
                out.push(e);
            }
            k = end;
        }
        Ok(out)
    }

    /// Writes one record and, with `Fsync`, makes it durable; only then does
    /// the index change. Then deletes segments nothing needs any more, and
    /// runs segment GC if there are too many.
    pub(crate) fn append(&self, rec: RecordBuilder, durability: Durability) -> Result<(), EngineError> {
        let mut w = lock(&self.writer);
        let started = std::time::Instant::now();
        self.append_locked(&mut w, rec, durability)?;
        let written = started.elapsed();
        // The record is durable and indexed. What follows is housekeeping,
        // and its failure must not turn a durable write into an error: it is
        // counted (`LogStats`) and retried after the next write. (A failed
        // GC *write* breaks the log like any failed write, so the next
        // append reports it.)
        let mut done = Housekept::default();
        if let Err(e) = self.housekeep(&mut w, &mut done) {
            super::purge::note_failure(&self.housekeeping, &e);
        }
        // Every Raft write of the node waits behind this one (etcd warns
        // of a slow fdatasync the same way): say which part was slow.
        if written.max(done.purge).max(done.gc) >= LOG_WRITE_SLOW {
            tracing::warn!(
                write_ms = written.as_millis(),
                fsync = durability == Durability::Fsync,
                purge_ms = done.purge.as_millis(),
                segments_purged = done.purged,
                gc_ms = done.gc.as_millis(),
                gc_bytes = done.rewritten_bytes,
                segment = w.seg,
                "slow Raft log write: every shard of this node waited for it"
            );
        }
        Ok(())
    }

    fn housekeep(&self, w: &mut Writer, done: &mut Housekept) -> Result<(), EngineError> {
        let t = std::time::Instant::now();
        done.purged += self.purge(w)?;
        done.purge += t.elapsed();
        if lock(&self.index).segments.len() > self.options.segments_soft_max && w.gc_ran_at_seg != w.seg {
            w.gc_ran_at_seg = w.seg;
            let t = std::time::Instant::now();
            done.rewritten_bytes += self.rewrite(w)?;
            done.gc += t.elapsed();
            let t = std::time::Instant::now();
            done.purged += self.purge(w)?;
            done.purge += t.elapsed();
        }
        Ok(())
    }

    /// Segments, the newest segment's number, and housekeeping failures.
    pub(crate) fn stats(&self) -> LogStats {
        let (newest_segment, bytes_written, fsyncs) = {
            let w = lock(&self.writer);
            (w.seg, w.bytes_written, w.fsyncs)
        };
        let segments = lock(&self.index).segments.len();
        let (housekeeping_failures, last_housekeeping_error) = lock(&self.housekeeping).clone();
        LogStats {
            segments,
            newest_segment,
            housekeeping_failures,
            last_housekeeping_error,
            bytes_written,
            fsyncs,
        }
    }

    fn append_locked(&self, w: &mut Writer, rec: RecordBuilder, durability: Durability) -> Result<(), EngineError> {
        if let Some(why) = &w.broken {
            return Err(EngineError::LogIo(format!(
                "the Raft log failed earlier and takes no more writes until restart: {why}"
            )));
        }
        let (bytes, mut ops) = rec.finish().map_err(EngineError::InvalidCall)?;
        if w.size >= self.options.segment_bytes {
            // Its commit-only tail (written without fsync) becomes durable
            // before it stops being the newest segment: recovery forgives
            // a torn tail in the newest segment only.
            w.file
                .sync_data()
                .map_err(|e| io_err("fsync", &segment_path(&self.dir, w.seg), e))
                .inspect_err(|e| w.broken = Some(e.to_string()))?;
            let seg = w.seg + 1;
            let (file, size) = {
                let ix = lock(&self.index);
                create_segment(&self.dir, seg, &ix, self.options.segment_bytes)
            }
            .inspect_err(|e| w.broken = Some(e.to_string()))?;
            lock(&self.index).segments.insert(
                seg,
                Segment {
                    file: file.clone(),
                    live: 0,
                },
            );
            w.file = file;
            w.seg = seg;
            w.size = size;
        }
        let at = w.size;
        let path = || segment_path(&self.dir, w.seg);
        let written = w.file.write_all_at(&bytes, at).and_then(|()| {
            if durability == Durability::Fsync {
                w.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            let err = io_err("write", &path(), e);
            w.broken = Some(err.to_string());
            return Err(err);
        }
        w.size += bytes.len() as u64;
        w.bytes_written += bytes.len() as u64;
        w.fsyncs += u64::from(durability == Durability::Fsync);
        let mut ix = lock(&self.index);
        for mut op in ops.drain(..) {
            op.rebase(at);
            ix.apply(op, w.seg);
        }
        Ok(())
    }

    /// Drops the oldest segments from the index while none of their
    /// entries is live, and hands their files to the purge thread
    /// (`super::purge`), oldest first. Returns how many it dropped.
    fn purge(&self, w: &Writer) -> Result<usize, EngineError> {
        let mut doomed = Vec::new();
        {
            let mut ix = lock(&self.index);
            while let Some((&seg, s)) = ix.segments.first_key_value() {
                if seg >= w.seg || s.live > 0 {
                    break;
                }
                ix.segments.remove(&seg);
                doomed.push(seg);
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let n = doomed.len();
        let paths = doomed.into_iter().map(|seg| segment_path(&self.dir, seg)).collect();
        self.purger.delete(paths)?;
        Ok(n)
    }

    /// Segment GC: copies forward the live entries of the shards that pin
    /// the oldest segment (all their entries outside the active segment),
    /// in one fsync'd Rewrite record. Skipped when that would copy more than
    /// `gc_bytes_max`: such a log is long because it is busy, and its own
    /// compaction will free the segment sooner than a copy would.
    /// Returns the bytes of entries it copied.
    fn rewrite(&self, w: &mut Writer) -> Result<u64, EngineError> {
        let mut plan: Vec<(u64, u64, u64)> = Vec::new(); // shard, first, last
        let mut bytes = 0u64;
        {
            let ix = lock(&self.index);
            let Some(&oldest) = ix.segments.keys().next() else {
                return Ok(0);
            };
            if oldest >= w.seg {
                return Ok(0);
            }
            for (&shard, s) in &ix.shards {
                let Some((first, loc)) = s.entries.first() else {
                    continue;
                };
                if loc.seg != oldest {
                    continue;
                }
                let mut last = first;
                for (i, l) in s.entries.iter_from(first) {
                    if l.seg >= w.seg {
                        break;
                    }
                    bytes += u64::from(l.len) + record::ENTRY_HEADER_BYTES;
                    last = i;
                }
                plan.push((shard, first, last));
            }
            if bytes > self.options.gc_bytes_max {
                return Ok(0);
            }
        }
        if plan.is_empty() {
            return Ok(0);
        }
        let mut rec = RecordBuilder::default();
        for (shard, first, last) in plan {
            let entries = self.read(shard, first, last + 1, None)?;
            rec.entries(shard, true, &entries).map_err(EngineError::InvalidCall)?;
        }
        self.append_locked(w, rec, Durability::Fsync)?;
        Ok(bytes)
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

/// Creates segment `seg` holding its header and a checkpoint of every shard
/// in `ix`, durable (file and directory) before it returns.
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

fn create_segment(dir: &Path, seg: u64, ix: &Index, preallocate_bytes: u64) -> Result<(Arc<File>, u64), EngineError> {
    let path = segment_path(dir, seg);
    let mut rec = RecordBuilder::default();
    let mut shards: Vec<_> = ix.shards.iter().collect();
    shards.sort_unstable_by_key(|(id, _)| **id);
    for (&shard, s) in shards {
        rec.checkpoint(shard, s.truncated, s.last, &s.hard);
    }
    let (body, _) = rec.finish().map_err(EngineError::InvalidCall)?;
    let mut bytes = record::segment_header(seg).to_vec();
    bytes.extend_from_slice(&body);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_err("create", &path, e))?;
    file.write_all_at(&bytes, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err("write", &path, e))?;
    // Only now, with the header durable: a crash must never leave a
    // segment-sized file of zeros where a header should be (that is
    // damage to recovery, not a segment that was never completed).
    preallocate(&file, preallocate_bytes.max(bytes.len() as u64), &path)?;
    sync_dir(dir)?;
    Ok((Arc::new(file), bytes.len() as u64))
}

/// Allocates the segment's blocks and sets its length to `len` ahead of
/// the appends, then makes that durable, as etcd does for its WAL files.
/// An fdatasync after an append that grew the file must also commit the
/// new length to the file system's journal; into allocated space it need
/// not (measured on this ext4: 184 against 122 us per 400-byte append
/// and fdatasync, p50; docs/benchmarks.md). The space reads as zeros,
/// which recovery tells from records (`Found::End`) and cuts at the next
/// open (`LogRecovery::unwritten_bytes`). A file system without
/// `fallocate` (EOPNOTSUPP, ENOSYS) gets plain appends; any other failure fails
/// the segment's creation, as a failed write would.
fn preallocate(file: &File, len: u64, path: &Path) -> Result<(), EngineError> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => {}
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => return Ok(()),
        Err(e) => return Err(io_err("fallocate", path, e.into())),
    }
    file.sync_all().map_err(|e| io_err("fsync", path, e))
}

#[cfg(test)]
#[path = "files_tests.rs"]
mod tests;
