//! Shard snapshots: a shard's whole state machine (mailboxes, messages, dedup
//! index, cursors, apply state) as a stream of checksummed chunks, and the
//! ingest that replaces a shard's range with such a stream on another node.
//!
//! Export reads one RocksDB snapshot of the shard's contiguous `data` range,
//! so the stream is consistent at exactly one applied index while apply goes
//! on. Every value keeps its own stored crc (checked on export and again on
//! ingest) and every chunk has a crc over its whole frame.
//!
//! Ingest is atomic for readers and crash-safe without holding the shard in
//! memory: the first write deletes the shard's range and marks the shard
//! `Ingesting`; the chunks follow in bounded batches; the last write puts the
//! shard's real apply state (held back from the stream) with an fsync. Until
//! then every read and apply of the shard fails with `ShardIncomplete`, and a
//! crash in between leaves a shard that says so, to be ingested again. A
//! half-replaced shard is never served.

use crate::codec::{self, Reader, Writer};
use crate::engine::{lock, Durability, Engine};
use crate::error::EngineError;
use crate::keys::{self, CF_DATA};
use crate::records::{ShardMeta, ShardState};
use rocksdb::WriteBatch;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const CHUNK_MAGIC: &[u8; 4] = b"PHCK";
const CHUNK_VERSION: u8 = 1;
/// Bytes written per ingest batch before it is flushed to RocksDB.
const INGEST_BATCH_BYTES_MAX: usize = 4 << 20;
/// The largest chunk accepted (a chunk also carries one whole value, up to the
/// 1 MiB payload limit plus framing).
pub const CHUNK_BYTES_MAX: usize = 64 << 20;

/// One frame of a shard snapshot stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The shard.
    pub shard: u64,
    /// The applied index the snapshot is consistent at.
    pub index: u64,
    /// The term of that index.
    pub term: u64,
    /// 0, 1, 2, ... in stream order.
    pub seq_no: u32,
    /// Key-value records in this chunk.
    pub records: u32,
    /// The last chunk of the stream.
    pub last: bool,
    /// `records` times `key_len:u32 key value_len:u32 value`.
    pub data: Vec<u8>,
}

impl SnapshotChunk {
    /// `magic:4 version:u8 shard:u64 index:u64 term:u64 seq_no:u32 records:u32
    /// last:u8 data_len:u32 data crc32:u32` (big-endian; the crc covers every
    /// byte before it).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default()
            .bytes(CHUNK_MAGIC)
            .u8(CHUNK_VERSION)
            .u64(self.shard)
            .u64(self.index)
            .u64(self.term)
            .u32(self.seq_no)
            .u32(self.records)
            .u8(u8::from(self.last))
            .u32(u32::try_from(self.data.len()).unwrap_or(u32::MAX))
            .bytes(&self.data);
        let crc = crc32fast::hash(&w.0);
        w = w.u32(crc);
        w.0
    }

    /// Parses and checks one encoded chunk.
    pub fn decode(bytes: &[u8]) -> Result<Self, EngineError> {
        let bad = |reason: String| EngineError::Snapshot { shard: 0, reason };
        if bytes.len() > CHUNK_BYTES_MAX + 64 {
            return Err(bad(format!(
                "chunk of {} bytes exceeds the {CHUNK_BYTES_MAX}-byte limit",
                bytes.len()
            )));
        }
        let (framed, crc) = bytes
            .split_last_chunk::<4>()
            .ok_or_else(|| bad("chunk shorter than its checksum".into()))?;
        let crc = u32::from_be_bytes(*crc);
        if crc32fast::hash(framed) != crc {
            return Err(bad("chunk checksum mismatch".into()));
        }
        let (magic, rest) = framed
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("chunk too short".into()))?;
        if magic != CHUNK_MAGIC {
            return Err(bad("not a snapshot chunk".into()));
        }
        let mut r = Reader::new("snapshot", b"", rest, CHUNK_VERSION)?;
        let shard = r.u64()?;
        let index = r.u64()?;
        let term = r.u64()?;
        let seq_no = r.u32()?;
        let records = r.u32()?;
        let last = match r.u8()? {
            0 => false,
            1 => true,
            x => return Err(bad(format!("bad last flag {x}"))),
        };
        let len = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
        let data = r.take(len)?.to_vec();
        r.finish()?;
        Ok(SnapshotChunk {
            shard,
            index,
            term,
            seq_no,
            records,
            last,
            data,
        })
    }
}

/// What an export or ingest covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// The applied index of the state.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// Chunks in the stream.
    pub chunks: u32,
    /// Key-value records in the stream.
    pub records: u64,
    /// The shard's hash range in the state (a split narrows it).
    pub range: crate::records::HashRange,
}

impl Engine {
    /// Streams `shard`'s state to `sink` as chunks of about `chunk_bytes`
    /// (a chunk always holds at least one record). The state is consistent at
    /// one applied index, returned in the summary.
    pub fn export_snapshot<E: From<EngineError>>(
        &self,
        shard: u64,
        chunk_bytes: usize,
        mut sink: impl FnMut(SnapshotChunk) -> Result<(), E>,
    ) -> Result<SnapshotSummary, E> {
        let chunk_bytes = chunk_bytes.clamp(1, CHUNK_BYTES_MAX / 2);
        let snap = self.db().snapshot();
        let cf = self.cf(CF_DATA)?;
        let mk = keys::shard_meta(shard);
        let meta_raw = snap
            .get_cf(cf, &mk)
            .map_err(EngineError::from)?
            .ok_or(EngineError::NoSuchShard(shard))?;
        let meta = ShardMeta::decode(&mk, codec::open(CF_DATA, &mk, &meta_raw)?)?;
        if meta.state != ShardState::Ready {
            return Err(EngineError::ShardIncomplete(shard).into());
        }
        // The rows are read from the shard's space, only those of its hash
        // range (a space split in place holds a sibling's too), and shipped
        // under the shard's own id: the receiver keeps them in a space of
        // its own (D38).
        let space = meta.space;
        let (start, end) =
            keys::shard_range(space).ok_or_else(|| EngineError::InvalidCall(format!("space {space} is reserved")))?;
        let space_meta = keys::shard_meta(space);
        let mut ro = crate::engine::total_order();
        ro.set_snapshot(&snap);
        ro.set_iterate_upper_bound(end);
        let mut it = self.db().raw_iterator_cf_opt(cf, ro);
        it.seek(&start);
        let mut chunk = SnapshotChunk {
            shard,
            index: meta.applied_index,
            term: meta.applied_term,
            seq_no: 0,
            records: 0,
            last: false,
            data: Vec::new(),
        };
        let mut summary = SnapshotSummary {
            index: meta.applied_index,
            term: meta.applied_term,
            chunks: 0,
            records: 0,
            range: meta.range,
        };
        let mut emit = |chunk: &mut SnapshotChunk, k: &[u8], v: &[u8]| -> Result<(), E> {
            if chunk.records > 0 && chunk.data.len() + k.len() + v.len() + 8 > chunk_bytes {
                let next = SnapshotChunk {
                    seq_no: chunk.seq_no + 1,
                    records: 0,
                    data: Vec::new(),
                    ..chunk.clone()
                };
                sink(std::mem::replace(chunk, next))?;
                summary.chunks += 1;
            }
            push_record(&mut chunk.data, k, v);
            chunk.records += 1;
            summary.records += 1;
            Ok(())
        };
        if space != shard {
            // Its meta row sorts first under its own id.
            emit(&mut chunk, &mk, &meta_raw)?;
        }
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let body = codec::open(CF_DATA, k, v)?; // never ship a corrupt value
            if space == shard {
                if k == space_meta.as_slice() || crate::split::key_in_range(k, &meta.range)? {
                    emit(&mut chunk, k, v)?;
                }
            } else if k != space_meta.as_slice() && crate::split::key_in_range(k, &meta.range)? {
                let (k, v) = crate::split::rekey(shard, k, body);
                emit(&mut chunk, &k, &v)?;
            }
            it.next();
        }
        it.status().map_err(EngineError::from)?;
        chunk.last = true;
        sink(chunk)?;
        summary.chunks += 1;
        Ok(summary)
    }

    /// Starts replacing `shard`'s state with a snapshot stream. Nothing is
    /// written until the first chunk arrives.
    pub fn ingest_snapshot(&self, shard: u64) -> Result<SnapshotIngest, EngineError> {
        let handles = self.shard(shard)?;
        if handles.ingesting.swap(true, Ordering::AcqRel) {
            return Err(EngineError::InvalidCall(format!(
                "shard {shard}: another snapshot ingest is under way"
            )));
        }
        Ok(SnapshotIngest {
            engine: self.clone(),
            shard,
            space: shard,
            handles,
            state: None,
            next_seq_no: 0,
            records: 0,
            last_key: None,
            last_dir: None,
            meta: None,
            conf_state: None,
            wb: WriteBatch::default(),
            done: false,
        })
    }
}

/// Puts the mailbox directory key (D43) of a message key or of a head row
/// with `last_seq >= 1` (body `body`), once per mailbox (`last` is the
/// last one put): a stream from a node whose data predates the directory
/// carries none, and every replica must list the same mailboxes (those
/// that ever had a message, as format 3's conversion does).
fn directory(
    last: &mut Option<Vec<u8>>,
    wb: &mut WriteBatch,
    cf: &rocksdb::ColumnFamily,
    k: &[u8],
    body: &[u8],
) -> Result<(), EngineError> {
    let (Some(&tag), Some(space)) = (k.get(8), k.get(..8)) else {
        return Ok(());
    };
    let Some((mb, _)) = k.get(9..).and_then(keys::split_mailbox) else {
        return Ok(()); // a shard-wide key
    };
    let entered = match tag {
        keys::tag::MESSAGE => true,
        keys::tag::MAILBOX => crate::records::MailboxMeta::decode(k, body)?.last_seq >= 1,
        _ => false,
    };
    let space = u64::from_be_bytes(space.try_into().unwrap_or([0; 8]));
    let dir = keys::mailbox_dir(space, mb);
    if entered && last.as_ref() != Some(&dir) {
        wb.put_cf(cf, &dir, codec::seal(&dir, &crate::records::encode_marker()));
        *last = Some(dir);
    }
    Ok(())
}

fn push_record(out: &mut Vec<u8>, k: &[u8], v: &[u8]) {
    out.extend_from_slice(&u32::try_from(k.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(k);
    out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(v);
}

/// An ingest in progress; see the module docs for its crash behaviour.
pub struct SnapshotIngest {
    engine: Engine,
    shard: u64,
    /// Where the rows go: the shard's id, or a private space if a sibling
    /// split from it in place still uses that id's space (D38). Fixed by
    /// the first chunk.
    space: u64,
    handles: Arc<crate::engine::ShardHandles>,
    /// (index, term) of the stream, fixed by its first chunk.
    state: Option<(u64, u64)>,
    next_seq_no: u32,
    records: u64,
    last_key: Option<Vec<u8>>,
    /// The directory key written for the last message key (D43).
    last_dir: Option<Vec<u8>>,
    meta: Option<ShardMeta>,
    /// A restore's new configuration, written instead of the stream's
    /// (`Engine::restore_shard`).
    pub(crate) conf_state: Option<raft::eraftpb::ConfState>,
    wb: WriteBatch,
    done: bool,
}

impl std::fmt::Debug for SnapshotIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotIngest")
            .field("shard", &self.shard)
            .field("next_seq_no", &self.next_seq_no)
            .finish_non_exhaustive()
    }
}

impl Drop for SnapshotIngest {
    fn drop(&mut self) {
        self.handles.ingesting.store(false, Ordering::Release);
    }
}

impl SnapshotIngest {
    fn err(&self, reason: String) -> EngineError {
        EngineError::Snapshot {
            shard: self.shard,
            reason,
        }
    }

    /// Feeds the next chunk. Returns the summary once the last chunk is in
    /// and the shard is complete again.
    pub fn push(&mut self, chunk: &SnapshotChunk) -> Result<Option<SnapshotSummary>, EngineError> {
        if self.done {
            return Err(self.err("chunk after the last one".into()));
        }
        if chunk.shard != self.shard {
            return Err(self.err(format!("chunk belongs to shard {}", chunk.shard)));
        }
        if chunk.seq_no != self.next_seq_no {
            return Err(self.err(format!("chunk {} arrived, expected {}", chunk.seq_no, self.next_seq_no)));
        }
        match self.state {
            None => self.begin(chunk.index, chunk.term)?,
            Some(s) if s != (chunk.index, chunk.term) => {
                return Err(self.err(format!(
                    "chunk is for index {}/term {}, stream is {}/{}",
                    chunk.index, chunk.term, s.0, s.1
                )));
            }
            Some(_) => {}
        }
        self.next_seq_no += 1;
        let (start, end) = keys::shard_range(self.shard).ok_or_else(|| self.err("reserved shard id".into()))?;
        let mk = keys::shard_meta(self.shard);
        let cf = self.engine.cf(CF_DATA)?;
        let mut rest = chunk.data.as_slice();
        let mut seen = 0u32;
        while !rest.is_empty() {
            let (k, after_k) = take_field(rest).ok_or_else(|| self.err("truncated record key".into()))?;
            let (v, after_v) = take_field(after_k).ok_or_else(|| self.err("truncated record value".into()))?;
            rest = after_v;
            seen += 1;
            if k < start.as_slice() || k >= end.as_slice() {
                return Err(self.err("record key outside the shard's range".into()));
            }
            if self.last_key.as_deref().is_some_and(|last| k <= last) {
                return Err(self.err("record keys are not strictly ascending".into()));
            }
            self.last_key = Some(k.to_vec());
            let body = codec::open(CF_DATA, k, v)?;
            if k == mk.as_slice() {
                let meta = ShardMeta::decode(k, body)?;
                if meta.state != ShardState::Ready
                    || (meta.applied_index, meta.applied_term) != (chunk.index, chunk.term)
                {
                    return Err(self.err("the stream's apply state does not match its header".into()));
                }
                self.meta = Some(meta);
            } else if self.space == self.shard {
                self.wb.put_cf(cf, k, v);
                directory(&mut self.last_dir, &mut self.wb, cf, k, body)?;
            } else {
                let (k2, v) = crate::split::rekey(self.space, k, body);
                self.wb.put_cf(cf, &k2, v);
                directory(&mut self.last_dir, &mut self.wb, cf, &k2, body)?;
            }
            if self.wb.size_in_bytes() >= INGEST_BATCH_BYTES_MAX {
                self.engine
                    .write_data(std::mem::take(&mut self.wb), Durability::NoFsync)?;
            }
        }
        if seen != chunk.records {
            return Err(self.err(format!("chunk says {} records, holds {seen}", chunk.records)));
        }
        self.records += u64::from(seen);
        if !chunk.last {
            return Ok(None);
        }
        let mut meta = self
            .meta
            .take()
            .ok_or_else(|| self.err("stream ended without the shard's apply state".into()))?;
        // The sender's space is the sender's; here the rows are in ours.
        meta.space = self.space;
        if let Some(conf) = self.conf_state.take() {
            meta.conf_state = conf;
        }
        let range = meta.range;
        let mut wb = std::mem::take(&mut self.wb);
        wb.put_cf(cf, &mk, codec::seal(&mk, &meta.encode()?));
        // Durable (flushed) before the caller resets the Raft log to the
        // snapshot: a log that starts past the state machine's durable
        // applied index could never be replayed.
        self.engine.write_data(wb, Durability::Fsync)?;
        self.done = true;
        Ok(Some(SnapshotSummary {
            index: chunk.index,
            term: chunk.term,
            chunks: self.next_seq_no,
            records: self.records,
            range,
        }))
    }

    /// The first write: drop the shard's old state and mark it incomplete,
    /// under the apply lock so no apply is half-way through.
    fn begin(&mut self, index: u64, term: u64) -> Result<(), EngineError> {
        let mut apply = lock(&self.handles.apply);
        // The cached heads describe the state about to be dropped.
        apply.heads.clear();
        // Never replace newer state with older: a delayed stream must not
        // move a replica backwards.
        if let Some(cur) = self.engine.shard_meta(self.shard)? {
            if cur.state == ShardState::Ready && cur.applied_index > index {
                return Err(self.err(format!(
                    "snapshot at index {index} is older than the shard's applied index {}",
                    cur.applied_index
                )));
            }
        }
        let current = self.engine.shard_meta(self.shard)?;
        let mut wb = self.engine.delete_shard_state(self.shard, current.as_ref())?;
        self.space = self.engine.space_for_ingest(self.shard)?;
        let cf = self.engine.cf(CF_DATA)?;
        let marker = ShardMeta {
            space: self.space,
            ..ShardMeta::new_own(self.shard, ShardState::Ingesting)
        };
        let mk = keys::shard_meta(self.shard);
        wb.put_cf(cf, &mk, codec::seal(&mk, &marker.encode()?));
        // Not flushed: a crash before the next flush loses the marker and
        // the deletion together (the old state stays); after one, the
        // marker says the ingest must be run again.
        self.engine.write_data(wb, Durability::NoFsync)?;
        self.state = Some((index, term));
        Ok(())
    }
}

fn take_field(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = b.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}
