//! The Raft log store: raft-rs's [`raft::Storage`] for every shard on the
//! node, kept in the node's segmented log files ([`files`], format in
//! [`record`]), not in RocksDB.
//!
//! Reading goes through [`RaftLogStore`], which the shard's `RawNode` owns:
//! recent entries come from an in-memory cache, older ones from the files.
//! Writing goes through [`RaftBatch`]: the node loop collects the Ready of
//! MANY shards (entries, hard state, snapshot, compaction) into one batch and
//! commits it with [`Engine::write_raft`]: ONE record and ONE fdatasync for
//! all of them. That group commit is where replication throughput comes
//! from.
//!
//! Contract (as raft-rs's `storage.rs` states its own):
//! - one writer per shard log at a time (the node loop);
//! - the in-memory bounds (first/last index, hard state) change only after
//!   the batch that changes them is written, and a batch holding entries,
//!   a snapshot or a new term or vote is written with `Durability::Fsync`,
//!   so a `RawNode` never sees such state that a crash could take back (a
//!   batch that only moves commit indexes is written without fsync, D13: a
//!   lost commit index is learned again; `--unsafe-no-fsync` drops every
//!   fsync, D21);
//! - the conf state is the *applied* one, kept with the state machine (see
//!   `ShardMeta`), so a snapshot always carries the configuration of its
//!   index;
//! - nothing here panics on a bad call: raft-rs gets a `StorageError`, the
//!   node gets an [`EngineError`].

mod cache;
pub(crate) mod files;
mod group;
mod index;
mod locs;
mod purge;
pub(crate) mod record;

pub(crate) use cache::EntryCache;
pub use files::{LogFilesOptions, LogRecovery, LogStats};

use crate::codec;
use crate::engine::{Durability, Engine, ShardHandles};
use crate::error::EngineError;
use crate::keys::{self, CF_DATA};
use crate::records::{LogState, ShardMeta, ShardState};
use cache::CacheOp;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use record::RecordBuilder;
use rocksdb::WriteBatch;
use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

/// Prefix of the `data` of every Snapshot that [`RaftLogStore::snapshot`]
/// returns, followed by the shard id (u64 big-endian). The state itself is not
/// in the message: the node streams it with [`Engine::export_snapshot`]; the
/// receiving node is expected to check the shard id before ingesting.
pub const SNAPSHOT_DATA_MAGIC: &[u8; 8] = b"PHSNAP01";

/// The in-memory view of one shard's log.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LogCache {
    pub hard_state: HardState,
    pub log: LogState,
    pub last_index: u64,
    pub last_term: u64,
}

impl LogCache {
    fn first_index(&self) -> u64 {
        self.log.truncated_index + 1
    }
}

/// raft-rs storage for one shard. Clones share the shard's cache.
#[derive(Clone)]
pub struct RaftLogStore {
    engine: Engine,
    shard: u64,
    handles: Arc<ShardHandles>,
}

impl std::fmt::Debug for RaftLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLogStore")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

fn store_err(e: EngineError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl Engine {
    /// The Raft log store of `shard` (which need not exist yet: an empty
    /// shard log reads as raft-rs's "uninitialised" storage).
    pub fn raft_log(&self, shard: u64) -> Result<RaftLogStore, EngineError> {
        let store = RaftLogStore {
            engine: self.clone(),
            shard,
            handles: self.shard(shard)?,
        };
        store.cache()?;
        Ok(store)
    }

    /// Commits a batch of Raft writes: one log record, one fdatasync with
    /// [`Durability::Fsync`]. Only after it is durable do the stores see it.
    /// A bootstrap's apply state (RocksDB) is written after the log, so a
    /// crash in between leaves a log with no shard, which the next
    /// bootstrap overwrites.
    pub fn write_raft(&self, batch: RaftBatch, durability: Durability) -> Result<(), EngineError> {
        let RaftBatch { rec, data, pending } = batch;
        if !rec.is_empty() {
            self.inner.log.append(rec, durability)?;
        }
        if !data.is_empty() {
            self.write(data, durability)?;
        }
        for p in pending.into_values() {
            *p.handles.log.write().unwrap_or_else(PoisonError::into_inner) = Some(p.cache);
            if !p.cache_ops.is_empty() {
                let mut ec = p.handles.entries.lock().unwrap_or_else(PoisonError::into_inner);
                for op in p.cache_ops {
                    ec.apply(op);
                }
            }
        }
        Ok(())
    }

    /// What opening the Raft log found (segments, records, a torn tail).
    pub fn raft_log_recovery(&self) -> LogRecovery {
        self.inner.log.recovery().clone()
    }

    /// Every shard the Raft log holds state for (a hard state, entries or
    /// a truncation point), ascending: after the state machine was lost
    /// (D50), the replicas this node still is a Raft peer of.
    pub fn raft_log_shard_ids(&self) -> Vec<u64> {
        self.inner.log.shard_ids()
    }

    /// The Raft log's files now: segments, the newest, housekeeping
    /// failures, bytes written and fsyncs.
    pub fn raft_log_stats(&self) -> LogStats {
        self.inner.log.stats()
    }

    /// An integer property of RocksDB for the state machine's column
    /// family (e.g. `rocksdb.estimate-pending-compaction-bytes`), for
    /// metrics; None if RocksDB has no such property.
    pub fn data_property(&self, name: &str) -> Option<u64> {
        let cf = self.cf(crate::keys::CF_DATA).ok()?;
        self.db().property_int_value_cf(cf, name).ok().flatten()
    }

    fn load_log_cache(&self, shard: u64) -> LogCache {
        let s = self.inner.log.shard(shard);
        LogCache {
            hard_state: s.hard,
            log: LogState {
                truncated_index: s.truncated.0,
                truncated_term: s.truncated.1,
            },
            last_index: s.last.0,
            last_term: s.last.1,
        }
    }

    fn entry_term(&self, shard: u64, index: u64) -> Result<u64, EngineError> {
        self.inner.log.term(shard, index).ok_or_else(|| {
            files::log_corruption(format!(
                "shard {shard}: log entry {index} is missing inside the log's bounds"
            ))
        })
    }
}

impl RaftLogStore {
    /// The shard this store belongs to.
    pub fn shard(&self) -> u64 {
        self.shard
    }

    pub(crate) fn cache(&self) -> Result<LogCache, EngineError> {
        if let Some(c) = self.handles.log.read().unwrap_or_else(PoisonError::into_inner).as_ref() {
            return Ok(c.clone());
        }
        let mut w = self.handles.log.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = w.as_ref() {
            return Ok(c.clone());
        }
        let c = self.engine.load_log_cache(self.shard);
        *w = Some(c.clone());
        Ok(c)
    }

    /// Drops cached entries below `index` (they are applied, and every
    /// follower that still needs them can be served from disk). Only memory
    /// changes; the log itself is untouched.
    pub fn trim_entry_cache(&self, index: u64) {
        self.handles
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(CacheOp::TrimBelow(index));
    }

    /// The durable hard state.
    pub fn hard_state(&self) -> Result<HardState, EngineError> {
        Ok(self.cache()?.hard_state)
    }

    fn applied_meta(&self) -> Result<Option<ShardMeta>, EngineError> {
        self.engine.shard_meta(self.shard)
    }

    fn entries_inner(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        let c = self.cache().map_err(store_err)?;
        if low < c.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > c.last_index + 1 {
            // raft-rs's contract says "panics"; a store must not take the node
            // down, so this is an error instead.
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::new();
        if low >= high {
            return Ok(out);
        }
        {
            let ec = self.handles.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if ec.covers(low, high) {
                let mut size = 0u64;
                for i in low..high {
                    let Some(e) = ec.get(i) else { break };
                    size += u64::from(e.compute_size());
                    if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                        break;
                    }
                    out.push(e.clone());
                }
                return Ok(out);
            }
        }
        self.engine
            .inner
            .log
            .read(self.shard, low, high, max_size)
            .map_err(store_err)
    }
}

impl raft::Storage for RaftLogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.cache().map_err(store_err)?;
        let conf_state = self
            .applied_meta()
            .map_err(store_err)?
            .map(|m| m.conf_state)
            .unwrap_or_default();
        Ok(RaftState::new(c.hard_state, conf_state))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().filter(|m| *m != raft::NO_LIMIT);
        self.entries_inner(low, high, max_size)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let c = self.cache().map_err(store_err)?;
        if idx == c.log.truncated_index {
            return Ok(c.log.truncated_term);
        }
        if idx < c.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > c.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if idx == c.last_index {
            return Ok(c.last_term);
        }
        if let Some(e) = self
            .handles
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(idx)
        {
            return Ok(e.term);
        }
        self.engine.entry_term(self.shard, idx).map_err(store_err)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.cache().map_err(store_err)?.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.cache().map_err(store_err)?.last_index)
    }

    /// The snapshot is the shard's applied state. Its metadata is returned
    /// here; its contents are streamed by the node with
    /// [`Engine::export_snapshot`].
    ///
    /// Temporarily unavailable (raft-rs asks again later) until the applied
    /// state's configuration holds `to`: a leader adds a learner to its
    /// progress set when the conf change is committed, before the state
    /// machine has applied it, and a snapshot without the learner in its
    /// configuration is ignored by the learner's raft-rs after the whole
    /// state was streamed and ingested.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let meta = match self.applied_meta().map_err(store_err)? {
            Some(m)
                if m.state == ShardState::Ready
                    && m.applied_index >= request_index
                    && conf_state_holds(&m.conf_state, to) =>
            {
                m
            }
            _ => return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)),
        };
        let mut snap = Snapshot::default();
        let md = snap.mut_metadata();
        md.index = meta.applied_index;
        md.term = meta.applied_term;
        md.set_conf_state(meta.conf_state);
        let mut data = SNAPSHOT_DATA_MAGIC.to_vec();
        data.extend_from_slice(&self.shard.to_be_bytes());
        snap.data = data.into();
        Ok(snap)
    }
}

/// Whether `node` is in `cs`, as a voter or learner on either side of a
/// joint configuration (raft-rs's own test before it restores a snapshot).
pub fn conf_state_holds(cs: &ConfState, node: u64) -> bool {
    [&cs.voters, &cs.learners, &cs.voters_outgoing, &cs.learners_next]
        .iter()
        .any(|ids| ids.contains(&node))
}

/// One shard's part of a [`RaftBatch`].
struct PendingShard {
    handles: Arc<ShardHandles>,
    /// The log as it will be once the batch is durable.
    cache: LogCache,
    /// Entry cache changes, in order.
    cache_ops: Vec<CacheOp>,
}

/// Raft writes of many shards, committed together by [`Engine::write_raft`].
#[derive(Default)]
pub struct RaftBatch {
    /// The log record: every shard's entries, hard states and truncations.
    rec: RecordBuilder,
    /// A bootstrap's apply state, for RocksDB (written after the record).
    data: WriteBatch,
    /// Each touched shard's log as it will be once the batch is durable.
    pending: HashMap<u64, PendingShard>,
}

impl std::fmt::Debug for RaftBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftBatch")
            .field("shards", &self.pending.len())
            .field("bytes", &self.size_bytes())
            .finish()
    }
}

impl RaftBatch {
    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.rec.is_empty() && self.data.is_empty()
    }

    /// Bytes of the batch so far.
    pub fn size_bytes(&self) -> usize {
        self.rec.len() + self.data.size_in_bytes()
    }

    fn pending_shard(&mut self, store: &RaftLogStore) -> Result<&mut PendingShard, EngineError> {
        Ok(match self.pending.entry(store.shard) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(PendingShard {
                handles: store.handles.clone(),
                cache: store.cache()?,
                cache_ops: Vec::new(),
            }),
        })
    }

    fn pending(&mut self, store: &RaftLogStore) -> Result<&mut LogCache, EngineError> {
        Ok(&mut self.pending_shard(store)?.cache)
    }

    /// Appends `entries` (consecutive indexes) to the shard's log, replacing
    /// any conflicting suffix, as raft-rs's `Ready::entries` requires.
    pub fn append(&mut self, store: &RaftLogStore, entries: &[Entry]) -> Result<(), EngineError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let shard = store.shard;
        let c = self.pending(store)?.clone();
        if first.index <= c.log.truncated_index {
            return Err(EngineError::InvalidCall(format!(
                "shard {shard}: append at {} overwrites the compacted log (truncated at {})",
                first.index, c.log.truncated_index
            )));
        }
        if first.index > c.last_index + 1 {
            return Err(EngineError::InvalidCall(format!(
                "shard {shard}: append at {} leaves a gap after {}",
                first.index, c.last_index
            )));
        }
        // Refuses entries that are not consecutive, adding nothing.
        self.rec
            .entries(shard, false, entries)
            .map_err(|e| EngineError::InvalidCall(format!("shard {shard}: {e}")))?;
        let p = self.pending_shard(store)?;
        p.cache.last_index = last.index;
        p.cache.last_term = last.term;
        p.cache_ops.push(CacheOp::Append(entries.to_vec()));
        Ok(())
    }

    /// Persists the shard's hard state.
    pub fn set_hard_state(&mut self, store: &RaftLogStore, hs: &HardState) -> Result<(), EngineError> {
        self.rec.hard_state(store.shard, hs);
        self.pending(store)?.hard_state = hs.clone();
        Ok(())
    }

    /// Makes the log start after a snapshot: every entry goes, the log is
    /// truncated at the snapshot's index and term, and the hard state's commit
    /// moves up to it. The snapshot's *state* must already have been ingested
    /// with [`Engine::ingest_snapshot`].
    pub fn apply_snapshot(&mut self, store: &RaftLogStore, md: &SnapshotMetadata) -> Result<(), EngineError> {
        let c = self.pending(store)?.clone();
        if md.index < c.first_index() {
            return Err(EngineError::SnapshotOutOfDate {
                shard: store.shard,
                index: md.index,
                first_index: c.first_index(),
            });
        }
        let mut hs = c.hard_state.clone();
        hs.term = hs.term.max(md.term);
        hs.commit = hs.commit.max(md.index);
        self.reset_log(&store.engine, store.shard, md.index, md.term)?;
        self.set_hard_state(store, &hs)
    }

    /// Discards entries before `compact_index` (raft-rs's `compact`). The
    /// entry at `compact_index - 1` must be applied: the log is the only copy
    /// of unapplied entries.
    pub fn compact(&mut self, store: &RaftLogStore, compact_index: u64) -> Result<(), EngineError> {
        let shard = store.shard;
        let c = self.pending(store)?.clone();
        if compact_index <= c.first_index() {
            return Ok(());
        }
        if compact_index > c.last_index + 1 {
            return Err(EngineError::InvalidCall(format!(
                "shard {shard}: compact to {compact_index} is beyond last index {}",
                c.last_index
            )));
        }
        let applied = store.engine.shard_meta(shard)?.map_or(0, |m| m.applied_index);
        if compact_index - 1 > applied {
            return Err(EngineError::InvalidCall(format!(
                "shard {shard}: compact to {compact_index} would drop unapplied entries (applied index {applied})"
            )));
        }
        let term = if compact_index - 1 == c.last_index {
            c.last_term
        } else {
            store.engine.entry_term(shard, compact_index - 1)?
        };
        self.rec.compact(shard, compact_index - 1, term);
        let log = LogState {
            truncated_index: compact_index - 1,
            truncated_term: term,
        };
        let p = self.pending_shard(store)?;
        p.cache.log = log;
        p.cache_ops.push(CacheOp::TrimBelow(compact_index));
        Ok(())
    }

    /// Empties the shard's log and truncates it at `index`/`term`.
    pub(crate) fn reset_log(&mut self, engine: &Engine, shard: u64, index: u64, term: u64) -> Result<(), EngineError> {
        let store = RaftLogStore {
            engine: engine.clone(),
            shard,
            handles: engine.shard(shard)?,
        };
        self.rec.reset(shard, index, term);
        let log = LogState {
            truncated_index: index,
            truncated_term: term,
        };
        let p = self.pending_shard(&store)?;
        p.cache.log = log;
        p.cache.last_index = index;
        p.cache.last_term = term;
        p.cache_ops.push(CacheOp::Clear);
        Ok(())
    }

    /// Bootstrap writes the apply state in the same batch as the log, after
    /// deleting every key of the shard: keys left by an earlier replica of
    /// it, whose deletion (`Engine::destroy_shard`, without the WAL) a crash
    /// may have lost, must not come back under the new apply state. This
    /// batch goes through the WAL, so the deletion is replayed with it.
    pub(crate) fn put_shard_meta(&mut self, engine: &Engine, shard: u64, meta: &ShardMeta) -> Result<(), EngineError> {
        let cf = engine.cf(CF_DATA)?;
        let (start, end) = keys::shard_range(shard)
            .ok_or_else(|| EngineError::InvalidCall(format!("shard id {shard} is reserved")))?;
        self.data.delete_range_cf(cf, start, end);
        let k = keys::shard_meta(shard);
        self.data.put_cf(cf, &k, codec::seal(&k, &meta.encode()?));
        Ok(())
    }
}

/// The conf state a bootstrap needs: the given voters.
pub fn conf_state_with_voters(voters: &[u64]) -> ConfState {
    ConfState {
        voters: voters.to_vec(),
        ..Default::default()
    }
}
