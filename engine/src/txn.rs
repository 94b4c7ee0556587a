//! One apply batch's pending writes over the state machine (`Txn`): reads
//! see the batch's own earlier writes first, then the database, and the
//! batch becomes one WriteBatch at the end. Why a separate buffer instead
//! of writing a WriteBatch directly: the ops of one Raft entry (and of
//! several merged entries) read what earlier ops of the same batch wrote
//! (a dedup entry, a head row, messages a trim removes), and RocksDB's
//! WriteBatch cannot be read back.

use crate::codec;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::keys::CF_DATA;
use rocksdb::{ColumnFamily, ReadOptions, WriteBatch};
use std::collections::{BTreeMap, HashMap};

/// What a scan callback says of the key it was given.
enum Step {
    /// Counts towards the scan's maximum.
    Counted,
    /// Passed over.
    Skipped,
    /// Ends the scan.
    Stop,
}

/// Pending writes of one apply batch over the database.
pub(crate) struct Txn<'e> {
    engine: &'e Engine,
    cf: &'e ColumnFamily,
    /// key -> sealed value, or None for a delete.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// key -> checked body in the database (None: absent), read ahead in
    /// one batched lookup by [`Txn::prefetch`]. Valid for the whole batch:
    /// the caller holds the apply locks of every shard whose keys it
    /// prefetches, and only those shards' applies write those keys.
    /// Pending writes shadow it.
    prefetched: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'e> Txn<'e> {
    pub(crate) fn new(engine: &'e Engine) -> Result<Self, EngineError> {
        Ok(Txn {
            engine,
            cf: engine.cf(CF_DATA)?,
            writes: BTreeMap::new(),
            prefetched: HashMap::new(),
        })
    }

    /// The checked body at `key`: pending writes first, then what
    /// [`Txn::prefetch`] read, then the database.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        match self.writes.get(key) {
            Some(Some(v)) => Ok(Some(codec::open(CF_DATA, key, v)?.to_vec())),
            Some(None) => Ok(None),
            None => match self.prefetched.get(key) {
                Some(body) => Ok(body.clone()),
                None => self.engine.get_body(CF_DATA, key),
            },
        }
    }

    /// Reads the stored bodies of `keys` in one batched lookup (RocksDB's
    /// MultiGet: one pass over the memtables and each SST file's filter
    /// for all keys, instead of one whole lookup per key), for later
    /// [`Txn::get`]s. Keys with a pending write or already read are
    /// skipped. Call it only for keys of shards whose apply lock the
    /// caller holds (see `prefetched`).
    pub(crate) fn prefetch(&mut self, keys: Vec<Vec<u8>>) -> Result<(), EngineError> {
        let mut keys: Vec<Vec<u8>> = keys
            .into_iter()
            .filter(|k| !self.writes.contains_key(k) && !self.prefetched.contains_key(k))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(());
        }
        let values = self.engine.db().batched_multi_get_cf(self.cf, &keys, true);
        for (key, value) in keys.into_iter().zip(values) {
            let body = match value? {
                Some(v) => Some(codec::open(CF_DATA, &key, &v)?.to_vec()),
                None => None,
            };
            self.prefetched.insert(key, body);
        }
        Ok(())
    }

    pub(crate) fn put(&mut self, key: Vec<u8>, body: &[u8]) {
        let v = codec::seal(&key, body);
        self.writes.insert(key, Some(v));
    }

    pub(crate) fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    pub(crate) fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        self.scan_limited(start, end, usize::MAX, |k, v| f(k, v).map(|()| true))
    }

    /// Calls `f(key, body)` on live keys in `[start, end)`, in key order,
    /// merging pending writes over the database, until `max` calls have
    /// returned true (a key `f` passes over returns false). The range must
    /// lie within one memtable bucket (`keys::memtable_bucket`: one
    /// mailbox's keys of one tag, or one shard-wide tag), because the scan
    /// runs in prefix mode (D33).
    pub(crate) fn scan_limited(
        &self,
        start: &[u8],
        end: &[u8],
        max: usize,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, EngineError>,
    ) -> Result<(), EngineError> {
        self.scan_with(start, end, max, |k, v| {
            Ok(if f(k, v)? { Step::Counted } else { Step::Skipped })
        })
    }

    /// Calls `f(key, body)` on live keys in `[start, end)` in key order,
    /// as [`Txn::scan_limited`], until `f` returns false. Same bucket rule.
    pub(crate) fn scan_while(
        &self,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, EngineError>,
    ) -> Result<(), EngineError> {
        self.scan_with(start, end, usize::MAX, |k, v| {
            Ok(if f(k, v)? { Step::Counted } else { Step::Stop })
        })
    }

    fn scan_with(
        &self,
        start: &[u8],
        end: &[u8],
        max: usize,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<Step, EngineError>,
    ) -> Result<(), EngineError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let mut it = self.engine.db().raw_iterator_cf_opt(self.cf, ro);
        it.seek(start);
        let mut pending = self
            .writes
            .range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Excluded(end)))
            .peekable();
        let mut seen = 0;
        while seen < max {
            let db_key = it.key();
            let next_pending = pending.peek().map(|(k, _)| k.as_slice());
            let take_pending = match (db_key, next_pending) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(d), Some(p)) => p <= d,
            };
            if take_pending {
                let Some((k, v)) = pending.next() else { break };
                if db_key == Some(k.as_slice()) {
                    it.next(); // the pending write shadows the stored value
                }
                if let Some(v) = v {
                    match f(k, codec::open(CF_DATA, k, v)?)? {
                        Step::Counted => seen += 1,
                        Step::Skipped => {}
                        Step::Stop => break,
                    }
                }
            } else {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                match f(k, codec::open(CF_DATA, k, v)?)? {
                    Step::Counted => seen += 1,
                    Step::Skipped => {}
                    Step::Stop => break,
                }
                it.next();
            }
        }
        it.status()?;
        Ok(())
    }

    pub(crate) fn into_batch(self) -> WriteBatch {
        let mut wb = WriteBatch::default();
        for (k, v) in self.writes {
            match v {
                Some(v) => wb.put_cf(self.cf, k, v),
                None => wb.delete_cf(self.cf, k),
            }
        }
        wb
    }
}
