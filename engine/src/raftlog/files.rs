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
//!   could take back. Appends of several callers at once (a node's Raft
//!   drivers) are joined into one such record (`group.rs`, D66), so they
//!   share the fdatasync instead of queueing for one each.
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
//!   bad record anywhere else, or one followed by data that a fsync made
//!   durable, is damage: since D49 the open skips it instead of failing,
//!   cuts each shard that lost live entries to the run before its hole,
//!   and reports the shards that may have lost acknowledged writes, which
//!   catch up from their peers before they vote again.
//!
//! - **Segments are preallocated** to `segment_bytes` once their header is
//!   durable (`preallocate`), so the fdatasync of an append does not also
//!   commit a new file length. The unwritten space reads as zeros: the end
//!   of the data to recovery, which cuts it from the newest segment before
//!   that becomes an older one (an older segment ends with its last
//!   record, and the writer fills each segment past its preallocation
//!   before it starts the next).
//!
//! Opening (replay, torn tails, salvage, stale segments) is in
//! `files_open.rs`; appends, reads, purge and segment GC are here.
//!
//! Locks: `writer` (the active segment) is taken by appends, purge and
//! rewrite, which are all one writer's work; `index` briefly by everyone.
//! Order: writer, then index; a group's leader takes the queue of waiting
//! appends (`group.rs`) under the writer, and never holds it while it takes
//! the index. Entry reads take only `index`, then read the
//! file through an `Arc<File>`, which stays valid even if a purge unlinks it.

use super::group::{Group, Leading, Turn};
use super::index::{Index, Loc, Segment, ShardIndex};
use super::record::{self, RecordBuilder};
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

/// The segment files and their index.
#[derive(Debug)]
pub(crate) struct LogFiles {
    dir: PathBuf,
    options: LogFilesOptions,
    writer: Mutex<Writer>,
    index: Mutex<Index>,
    /// Appends waiting to be joined into the next record.
    group: Group,
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
    /// Records written that joined the appends of more than one caller
    /// (the group commit across a node's drivers), and the appends in
    /// them.
    pub groups_joined: u64,
    /// See `groups_joined`.
    pub appends_joined: u64,
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
    ///
    /// Concurrent callers are joined into one record ([`super::group`]):
    /// each returns once the record holding its ops is durable and indexed.
    pub(crate) fn append(&self, rec: RecordBuilder, durability: Durability) -> Result<(), EngineError> {
        // The record limit is checked per caller, so that one caller's
        // oversized record fails that caller alone.
        let body_len = (rec.len() as u64).saturating_sub(record::RECORD_HEADER_BYTES);
        if body_len > record::RECORD_BODY_BYTES_MAX {
            return Err(EngineError::InvalidCall(format!(
                "a Raft log record of {body_len} bytes is over the limit of {}",
                record::RECORD_BODY_BYTES_MAX
            )));
        }
        let ticket = self.group.enqueue(rec, durability);
        loop {
            match self.group.wait(ticket) {
                Turn::Done(result) => return result,
                Turn::Lead => {
                    let mut leading = Leading::new(&self.group);
                    // The writer first, then the queue: records that
                    // arrive while the writer is busy join this group.
                    let mut w = lock(&self.writer);
                    let result = match leading.take() {
                        Some(taken) => self.write_group(&mut w, taken.rec, taken.durability),
                        None => Ok(()),
                    };
                    drop(w);
                    leading.finish(result.as_ref().map(|_| ()));
                }
            }
        }
    }

    /// Writes one (possibly merged) record, then does the housekeeping.
    fn write_group(&self, w: &mut Writer, rec: RecordBuilder, durability: Durability) -> Result<(), EngineError> {
        let started = std::time::Instant::now();
        self.append_locked(w, rec, durability)?;
        let written = started.elapsed();
        // The record is durable and indexed. What follows is housekeeping,
        // and its failure must not turn a durable write into an error: it is
        // counted (`LogStats`) and retried after the next write. (A failed
        // GC *write* breaks the log like any failed write, so the next
        // append reports it.)
        let mut done = Housekept::default();
        if let Err(e) = self.housekeep(w, &mut done) {
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
        let (groups_joined, appends_joined) = self.group.joined();
        LogStats {
            groups_joined,
            appends_joined,
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

/// Creates segment `seg` holding its header and a checkpoint of every shard
/// in `ix`, durable (file and directory) before it returns.
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

#[path = "files_open.rs"]
mod open;
pub use open::LogRecovery;

#[cfg(test)]
#[path = "files_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "files_recovery_tests.rs"]
mod recovery_tests;
