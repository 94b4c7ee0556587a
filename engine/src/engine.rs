//! The engine handle: one RocksDB per node for the state machines of every
//! shard replica on the node (column families in [`crate::keys`]), and one
//! segmented Raft log for all their logs (`raftlog::files`, in the
//! `raft-log` directory inside the RocksDB directory). One log rather than
//! one per shard is what makes group commit possible: the Raft writes of
//! many shards go into one record and one fdatasync.

use crate::codec;
use crate::error::EngineError;
use crate::keys::{self, CF_DATA, CF_META, CF_RAFT};
use crate::limits::Limits;
use crate::raftlog::LogCache;
use crate::records::{ShardMeta, ShardState};
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// How durable a write must be when the call returns.
///
/// For the Raft log (segment files), `Fsync` means the record was
/// fdatasync'd. The state machine (column
/// family `data`) is written WITHOUT the WAL (D26): its writes reach disk
/// when RocksDB flushes the memtable, and `Fsync` there means that flush
/// happened before the call returned. So a state-machine write with
/// `NoFsync` is lost by a process crash, not only a machine crash, until
/// the next flush; that is safe only because the node replays those entries
/// from the Raft log, and never compacts the log past the applied index of
/// the last flush ([`Engine::flush_data`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Durable before returning: the log record fdatasync'd, or the
    /// state machine's memtable flushed.
    Fsync,
    /// In memory (and, for the Raft log, in its segment file's page cache)
    /// only.
    NoFsync,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Limits enforced on every op.
    pub limits: Limits,
    /// How long an idempotency key keeps deduplicating after its message was
    /// trimmed or deleted, in shard time. Default 7 days.
    pub dedup_window_ms: u64,
    /// RocksDB block cache, bytes.
    pub block_cache_bytes: usize,
    /// RocksDB write buffer (memtable) per column family, bytes.
    pub write_buffer_bytes: usize,
    /// Mailbox heads kept in memory per shard (see [`crate::heads`]); 0
    /// turns the cache off. About 120 bytes each with 30-byte mailbox ids.
    pub heads_cached_per_shard_max: usize,
    /// An append writes its mailbox's head row only when its seq is a
    /// multiple of this (1 to [`crate::HEAD_ROW_EVERY_APPENDS_MAX`]; see
    /// [`crate::HEAD_ROW_EVERY_APPENDS`] and storage-format invariant I9).
    /// Any value reads any data dir: the rebuild scans up to the maximum.
    pub head_row_every_appends: u64,
    /// An apply call with at least this many appends reads their dedup
    /// keys in one batched lookup, fewer one by one (D51; see
    /// [`DEDUP_PREFETCH_MIN_APPENDS_DEFAULT`]). 0 behaves as 1.
    pub dedup_prefetch_min_appends: usize,
    /// Segment sizes of the Raft log.
    pub raft_log: crate::raftlog::LogFilesOptions,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            limits: Limits::default(),
            dedup_window_ms: 7 * 24 * 3600 * 1000,
            block_cache_bytes: 256 << 20,
            write_buffer_bytes: 64 << 20,
            heads_cached_per_shard_max: HEADS_CACHED_PER_SHARD_DEFAULT,
            head_row_every_appends: crate::HEAD_ROW_EVERY_APPENDS,
            dedup_prefetch_min_appends: DEDUP_PREFETCH_MIN_APPENDS_DEFAULT,
            raft_log: crate::raftlog::LogFilesOptions::default(),
        }
    }
}

/// Default of [`EngineOptions::dedup_prefetch_min_appends`]. Measured
/// (D51): with one append per call the batched lookup cost 14 % more than
/// a plain one (RocksDB's MultiGet sets up per call, and the keys are
/// copied), with 64 it saved 13–17 %, with 256 12–16 %.
pub const DEDUP_PREFETCH_MIN_APPENDS_DEFAULT: usize = 16;

/// Default of [`EngineOptions::heads_cached_per_shard_max`]: 32 Ki heads,
/// about 4 MiB per shard.
pub const HEADS_CACHED_PER_SHARD_DEFAULT: usize = 32 << 10;

/// What a shard's apply lock guards besides the right to apply.
#[derive(Debug)]
pub(crate) struct ApplyState {
    /// Recently used mailbox heads (see [`crate::heads`]).
    pub heads: crate::heads::HeadCache,
}

/// Per-shard in-memory handles.
#[derive(Debug)]
pub(crate) struct ShardHandles {
    /// Serialises apply and snapshot ingest of one shard: the state machine is
    /// single-writer per shard, and the engine enforces it rather than trusting
    /// every caller. It also guards the shard's in-memory apply state.
    pub apply: Mutex<ApplyState>,
    /// The shard's Raft log bounds and hard state, loaded on first use
    /// from the log files' index and then kept in step by `write_raft`
    /// (both change only after the same durable write). A copy, kept per
    /// shard because raft-rs reads it on every step, and the index behind
    /// it is one lock for the whole node.
    pub log: RwLock<Option<LogCache>>,
    /// A snapshot ingest of this shard is under way.
    pub ingesting: std::sync::atomic::AtomicBool,
    /// The most recently written log entries (see `raftlog::EntryCache`).
    pub entries: Mutex<crate::raftlog::EntryCache>,
}

pub(crate) struct Inner {
    pub db: DB,
    pub log: crate::raftlog::files::LogFiles,
    pub options: EngineOptions,
    shards: Mutex<HashMap<u64, Arc<ShardHandles>>>,
}

impl ShardHandles {
    fn new(heads_max: usize) -> ShardHandles {
        ShardHandles {
            apply: Mutex::new(ApplyState {
                heads: crate::heads::HeadCache::new(heads_max),
            }),
            log: RwLock::new(None),
            ingesting: std::sync::atomic::AtomicBool::new(false),
            entries: Mutex::new(crate::raftlog::EntryCache::default()),
        }
    }
}

/// A node's storage engine. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.inner.db.path())
            .finish_non_exhaustive()
    }
}

/// Hash buckets of the data CF's memtable: 8 bytes each, per memtable.
/// More buckets than active mailboxes keeps each bucket's skiplist short.
const MEMTABLE_BUCKETS: usize = 1 << 20;

/// L0 files of the data CF that start a compaction into L1 (RocksDB's
/// default is 4). Appends land all over the data CF's key space (every
/// mailbox is written), so every L0->L1 compaction rewrites the whole of
/// L1: eight files per compaction rewrite L1 half as often for the same
/// bytes flushed. Measured in the steady state (D57): with
/// [`DATA_SST_TARGET_BYTES`], 30 % less compaction CPU and 27 % fewer
/// bytes written per append. A lookup that misses the memtable probes up
/// to eight L0 files' filters instead of four; that cost did not show.
pub(crate) const DATA_L0_COMPACTION_TRIGGER_FILES: i32 = 8;

/// The data CF's SST file size at L1 (RocksDB's default is 64 MiB). An
/// L1->L2 compaction rewrites the L2 files that overlap the L1 file it
/// picked, whole: smaller files waste less at the two ends of that
/// overlap, and give the picker (least overlap first) more choice.
pub(crate) const DATA_SST_TARGET_BYTES: u64 = 16 << 20;

/// Read options for a scan that crosses memtable buckets (more than one
/// mailbox or tag; `keys::memtable_bucket`). Without total_order_seek such
/// a scan would see only the seek key's bucket in the memtable.
pub(crate) fn total_order() -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_total_order_seek(true);
    ro
}

impl Engine {
    /// Opens (creating if needed) the engine at `path`.
    pub fn open(path: impl AsRef<Path>, options: EngineOptions) -> Result<Engine, EngineError> {
        options.limits.validate().map_err(EngineError::InvalidCall)?;
        if !(1..=crate::HEAD_ROW_EVERY_APPENDS_MAX).contains(&options.head_row_every_appends) {
            return Err(EngineError::InvalidCall(format!(
                "head_row_every_appends must be 1 to {}, got {}",
                crate::HEAD_ROW_EVERY_APPENDS_MAX,
                options.head_row_every_appends
            )));
        }
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        // The WAL carries only synced writes (the format version, bootstrap,
        // catching-up marks): a torn last record is a write that was never
        // acknowledged, and is dropped; a bad record anywhere else is
        // damage, and fails the open as corruption, which rebuilds the state
        // machine (D50). Point-in-time recovery, RocksDB's default, would
        // silently drop every record after it: a catching-up mark among
        // them, and the replica would vote with a log that lost writes.
        db_opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        // Fewer, larger WAL syncs are what group commit is for; RocksDB's own
        // background syncing of SSTs is spread out to avoid stalls.
        db_opts.set_bytes_per_sync(1 << 20);
        // The data CF's hash-skiplist memtable takes one writer at a time.
        db_opts.set_allow_concurrent_memtable_write(false);

        let cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes)?;
        let cf = |name: &str| {
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            // Point lookups of absent keys (a new idempotency key, a missing
            // mailbox) are the common case on the write path.
            table.set_bloom_filter(10.0, false);
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_size(options.write_buffer_bytes);
            // A bloom filter over whole keys in the memtable too: most dedup
            // lookups miss, and without it each miss walks the skiplist
            // (profiled: skiplist search and memcmp dominated apply).
            o.set_memtable_whole_key_filtering(true);
            o.set_memtable_prefix_bloom_ratio(0.1);
            if name == CF_DATA {
                // A hash of small skiplists, one per mailbox and tag
                // (`keys::memtable_bucket`): an insert walks only its
                // mailbox's few keys. Scans across buckets set
                // total_order_seek (`total_order`).
                o.set_prefix_extractor(rocksdb::SliceTransform::create(
                    "pigeonhole.memtable_bucket.v1",
                    keys::memtable_bucket,
                    None,
                ));
                o.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
                    bucket_count: MEMTABLE_BUCKETS,
                    height: 4,
                    branching_factor: 4,
                });
                // Payloads are end-to-end encrypted: block compression finds
                // nothing to save in them (RocksDB then stores the block
                // uncompressed anyway) and costs CPU in every flush and
                // compaction (profiled: snappy ~3 % of an apply run).
                o.set_compression_type(rocksdb::DBCompressionType::None);
                o.set_level_zero_file_num_compaction_trigger(DATA_L0_COMPACTION_TRIGGER_FILES);
                o.set_target_file_size_base(DATA_SST_TARGET_BYTES);
            }
            ColumnFamilyDescriptor::new(name, o)
        };
        // Column family `raft` held the log in format 1; it is still opened
        // (and stays empty) so that a format-1 directory opens far enough to
        // be refused by the version check below, with a message.
        // Which column families an existing database holds, read before
        // the open creates any that are missing (see `check_column_families`).
        if path.as_ref().join("CURRENT").exists() {
            crate::format::check_column_families(path.as_ref())?;
        }
        let db = DB::open_cf_descriptors(&db_opts, path.as_ref(), [cf(CF_META), cf(CF_RAFT), cf(CF_DATA)])?;
        crate::format::check_format_version(&db)?;
        // Damage in the log (§8.5): the shards that may have lost what they
        // acknowledged are marked, durably, before the salvaged log is
        // (D49), so a crash in between finds them again.
        let log = crate::raftlog::files::LogFiles::open_with(
            &path.as_ref().join("raft-log"),
            options.raft_log,
            &mut |recovery, known| {
                // Shards with state but nothing in the log: damage took
                // the only record of them (an idle shard's checkpoint), and
                // with it their term and vote.
                let mut suspect = recovery.suspect_shards(known);
                suspect.extend(data_shard_ids(&db)?.into_iter().filter(|s| !known.contains(s)));
                suspect.sort_unstable();
                suspect.dedup();
                let reason = format!(
                    "Raft log damage: {}",
                    recovery.damage.first().map_or("", String::as_str)
                );
                tracing::error!(
                    damage = ?recovery.damage,
                    cut_shards = ?recovery.cut_shards,
                    catching_up = ?suspect,
                    "the Raft log is damaged: the damage was skipped, the shards that lost entries cut \
                     before it, and these replicas will catch up from their peers before they vote again"
                );
                crate::catchup::mark(&db, &suspect, &reason)
            },
        )?;
        let found_segments = log.recovery().segments;
        let engine = Engine {
            inner: Arc::new(Inner {
                db,
                log,
                options,
                shards: Mutex::new(HashMap::new()),
            }),
        };
        // The log is created before the first shard is (bootstrap writes the
        // log first), and always keeps a segment; so shards without any log
        // segment mean the log directory was lost. Starting anyway would
        // forget every shard's vote and term: the node could vote twice in
        // one term.
        if found_segments == 0 {
            if let Some(shard) = engine.shard_ids()?.first() {
                return Err(crate::raftlog::files::log_corruption(format!(
                    "the Raft log directory has no segment, but the state machine holds shard {shard}: \
                     the log was lost; refusing to start without every shard's vote and term"
                )));
            }
        }
        Ok(engine)
    }

    /// The options the engine was opened with.
    pub fn options(&self) -> &EngineOptions {
        &self.inner.options
    }

    pub(crate) fn db(&self) -> &DB {
        &self.inner.db
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily, EngineError> {
        self.inner
            .db
            .cf_handle(name)
            .ok_or_else(|| EngineError::InvalidCall(format!("column family {name} is missing")))
    }

    pub(crate) fn shard(&self, shard: u64) -> Result<Arc<ShardHandles>, EngineError> {
        if shard == u64::MAX {
            return Err(EngineError::InvalidCall("shard id u64::MAX is reserved".into()));
        }
        let heads_max = self.inner.options.heads_cached_per_shard_max;
        let mut map = lock(&self.inner.shards);
        Ok(map
            .entry(shard)
            .or_insert_with(|| Arc::new(ShardHandles::new(heads_max)))
            .clone())
    }

    /// Mailbox heads held in memory, summed over this node's shards.
    pub fn heads_cached(&self) -> usize {
        let shards: Vec<Arc<ShardHandles>> = lock(&self.inner.shards).values().cloned().collect();
        shards.iter().map(|h| lock(&h.apply).heads.len()).sum()
    }

    /// Writes state-machine data (column family `data`) without the WAL;
    /// `Fsync` then flushes the column family. Every write to `data` after
    /// bootstrap goes through here: one that went through the WAL after
    /// unflushed WAL-less ones could be replayed after a crash without
    /// them, and the column family would no longer hold a prefix of its
    /// history.
    pub(crate) fn write_data(&self, batch: WriteBatch, durability: Durability) -> Result<(), EngineError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.inner.db.write_opt(batch, &wo)?;
        if durability == Durability::Fsync {
            self.flush_data()?;
        }
        Ok(())
    }

    /// Flushes the state machine's memtables to disk and waits: every
    /// state-machine write made before the call is durable when it returns.
    /// The node calls it (off its driver thread) before it compacts a
    /// shard's Raft log past the applied index it last made durable.
    pub fn flush_data(&self) -> Result<(), EngineError> {
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        self.inner.db.flush_cf_opt(self.cf(CF_DATA)?, &fo)?;
        Ok(())
    }

    /// Writes through RocksDB's WAL: only a shard's first apply state, at
    /// bootstrap, and the format version.
    pub(crate) fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), EngineError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(durability == Durability::Fsync);
        self.inner.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Reads and checks the framed value at `key` in `cf`.
    pub(crate) fn get_body(&self, cf_name: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        let cf = self.cf(cf_name)?;
        match self.inner.db.get_pinned_cf(cf, key)? {
            Some(v) => Ok(Some(codec::open(cf_name, key, &v)?.to_vec())),
            None => Ok(None),
        }
    }

    /// The shard's apply state, or None if the shard was never created here.
    pub fn shard_meta(&self, shard: u64) -> Result<Option<ShardMeta>, EngineError> {
        let key = keys::shard_meta(shard);
        self.get_body(CF_DATA, &key)?
            .map(|b| ShardMeta::decode(&key, &b))
            .transpose()
    }

    /// The shard's apply state, failing unless it exists and is complete.
    pub(crate) fn ready_shard_meta(&self, shard: u64) -> Result<ShardMeta, EngineError> {
        let meta = self.shard_meta(shard)?.ok_or(EngineError::NoSuchShard(shard))?;
        if meta.state != ShardState::Ready {
            return Err(EngineError::ShardIncomplete(shard));
        }
        Ok(meta)
    }

    /// Creates a shard replica that starts at `index`/`term` with `conf_state`
    /// (raft-rs's "initial configuration"): apply state and an empty log
    /// truncated at `index`. Fails if the shard already exists here.
    pub fn bootstrap_shard(
        &self,
        shard: u64,
        conf_state: raft::eraftpb::ConfState,
        index: u64,
        term: u64,
    ) -> Result<(), EngineError> {
        self.bootstrap_shards(vec![(shard, conf_state)], index, term)
    }

    /// [`Engine::bootstrap_shard`] for several shards in one write: one Raft
    /// log record holds every shard's log (so a crash leaves all of them or
    /// none), then one RocksDB batch every shard's apply state. A crash
    /// between the two leaves every log at `index` and no state, which the
    /// caller can tell from damage and bootstrap again. Fails, writing
    /// nothing, if any shard already exists here.
    pub fn bootstrap_shards(
        &self,
        shards: Vec<(u64, raft::eraftpb::ConfState)>,
        index: u64,
        term: u64,
    ) -> Result<(), EngineError> {
        let mut rb = crate::raftlog::RaftBatch::default();
        // Shard ids ascending, each lock held to the write: nothing else
        // creates these shards meanwhile.
        let mut shards = shards;
        shards.sort_unstable_by_key(|(shard, _)| *shard);
        let mut handles = Vec::with_capacity(shards.len());
        for (shard, _) in &shards {
            if *shard >= crate::split::SPACE_PRIVATE_MIN {
                return Err(EngineError::InvalidCall(format!(
                    "shard ids are below {}, got {shard}",
                    crate::split::SPACE_PRIVATE_MIN
                )));
            }
            handles.push(self.shard(*shard)?);
        }
        let _applies: Vec<_> = handles.iter().map(|h| lock(&h.apply)).collect();
        for (shard, conf_state) in shards {
            if self.shard_meta(shard)?.is_some() {
                return Err(EngineError::InvalidCall(format!("shard {shard} already exists")));
            }
            let meta = ShardMeta {
                applied_index: index,
                applied_term: term,
                conf_state,
                ..ShardMeta::new_own(shard, ShardState::Ready)
            };
            rb.put_shard_meta(self, shard, &meta)?;
            rb.reset_log(self, shard, index, term)?;
            let store = self.raft_log(shard)?;
            let mut hs = store.hard_state()?;
            hs.term = hs.term.max(term);
            hs.commit = hs.commit.max(index);
            rb.set_hard_state(&store, &hs)?;
        }
        self.write_raft(rb, Durability::Fsync)
    }

    /// Deletes this node's replica of `shard` (replica GC, after the node
    /// applied its own removal from the shard's configuration, or found
    /// from the cluster's records that it was removed; the cluster crate's
    /// stale-replica GC): every
    /// state-machine key of the shard, its apply state included, and every
    /// entry of its Raft log. Only the log's term and vote stay (with commit
    /// 0): a node must never vote twice in one term, even for a group it has
    /// left and may join again. Re-creating the shard later starts empty.
    ///
    /// Crash-safe by order, and idempotent: the log goes first (fsync'd),
    /// then the state (a range delete, durable at the next flush). A crash
    /// in between leaves the apply state over an empty log, which the
    /// node's start-up repair turns back into a consistent replica. If that
    /// state's configuration excludes this node, start-up removes it again;
    /// if it still lists the node (a stale replica, which never applied its
    /// removal), the replica is loaded and found stale again. The other order could
    /// leave a log without apply state: a replica created again later would
    /// then meet committed entries it never applied.
    ///
    /// The caller must make sure nothing applies to or ingests into the
    /// shard any more (the node has dropped its replica and waited for the
    /// apply worker).
    pub fn destroy_shard(&self, shard: u64) -> Result<(), EngineError> {
        let handles = self.shard(shard)?;
        if handles.ingesting.load(std::sync::atomic::Ordering::Acquire) {
            return Err(EngineError::InvalidCall(format!(
                "shard {shard}: cannot delete a replica while a snapshot is being ingested into it"
            )));
        }
        let mut apply = lock(&handles.apply);
        apply.heads.clear();
        let store = self.raft_log(shard)?;
        let mut hs = store.hard_state()?;
        hs.commit = 0;
        let mut rb = crate::raftlog::RaftBatch::default();
        rb.reset_log(self, shard, 0, 0)?;
        rb.set_hard_state(&store, &hs)?;
        self.write_raft(rb, Durability::Fsync)?;
        let meta = self.shard_meta(shard)?;
        let wb = self.delete_shard_state(shard, meta.as_ref())?;
        self.write_data(wb, Durability::NoFsync)?;
        Ok(())
    }

    /// Ids of every shard with state on this node, ascending.
    pub fn shard_ids(&self) -> Result<Vec<u64>, EngineError> {
        data_shard_ids(&self.inner.db)
    }

    /// Flushes memtables to SST files (for tests and clean shutdown). The
    /// data CF is written without the WAL (D26): until a flush its rows are
    /// durable only through the Raft log, which is why the log is never
    /// compacted past the last flush's applied index.
    pub fn flush(&self) -> Result<(), EngineError> {
        for name in [CF_META, CF_RAFT, CF_DATA] {
            self.inner.db.flush_cf(self.cf(name)?)?;
        }
        Ok(())
    }
}

/// Ids of every shard with state in the `data` CF of `db`, ascending.
fn data_shard_ids(db: &DB) -> Result<Vec<u64>, EngineError> {
    let cf = db
        .cf_handle(CF_DATA)
        .ok_or_else(|| EngineError::InvalidCall(format!("column family {CF_DATA} is missing")))?;
    let mut out = Vec::new();
    let mut it = db.raw_iterator_cf_opt(cf, total_order());
    it.seek_to_first();
    while let Some(key) = it.key() {
        let shard = u64::from_be_bytes(
            key.get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| EngineError::corruption(CF_DATA, key, "key shorter than a shard id"))?,
        );
        // A shard's meta row is the first key of its id's prefix; a
        // prefix without one is a data space only (D38: the rows of a
        // shard split from a shard now gone, or a private space).
        if key == keys::shard_meta(shard).as_slice() {
            out.push(shard);
        }
        match shard.checked_add(1) {
            Some(next) => it.seek(next.to_be_bytes()),
            None => break,
        }
    }
    it.status()?;
    Ok(out)
}

thread_local! {
    /// Whether this thread has turned RocksDB's perf counters off.
    static PERF_COUNTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Turns RocksDB's perf counters off for the calling thread (once per
/// thread; later calls cost a thread-local read).
///
/// Why: RocksDB counts into a thread-local `perf_context` by default
/// (`kEnableCount`), on every key compare of every memtable insert and
/// iterator step. Debian's librocksdb is a shared library, so each of those
/// thread-local accesses is a `__tls_get_addr` call (3 to 6 % of the
/// servers' CPU in every profile). Nothing reads the counters; with them
/// off, RocksDB reads only the thread-local perf level. Called at the top of
/// the engine's hot entry points (apply, reads) rather than at thread
/// start, so no thread that uses the engine (apply worker, tokio workers,
/// blocking pools, tests) can be missed.
pub(crate) fn perf_counters_off() {
    PERF_COUNTERS_OFF.with(|off| {
        if !off.get() {
            rocksdb::perf::set_perf_stats(rocksdb::perf::PerfStatsLevel::Disable);
            off.set(true);
        }
    });
}

/// Locks a mutex, recovering from poisoning: the guarded data is `()` or a
/// cache that is rebuilt from disk, so a panicked holder leaves nothing torn.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
