//! A replica's size, counted by one scan of its rows: what `phctl shard
//! show` reports, what a shard's leader reports to the placement loop
//! (which balances by bytes once shards differ in size), and the hash at
//! which a split would halve the shard's bytes.
//!
//! Counted, not estimated: RocksDB 7.8's approximate-size API (what TiKV's
//! split checker reads from SST properties) is not exposed by the rust
//! binding we link. A scan is bounded by a key budget, skips the block
//! cache, and is run rarely by its callers (after the shard has grown by a
//! fraction of its last size, see the cluster's size checker), so its cost
//! per write stays small and bounded.
//!
//! The split point comes from a histogram of mailbox bytes over
//! [`HISTOGRAM_BUCKETS`] equal slices of the hash range: memory is fixed
//! whatever the number of mailboxes, and the point is a slice boundary,
//! precise to 1/256 of the range, which is all a halving needs.

use crate::codec;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::keys::{self, CF_DATA};
use crate::records::{HashRange, ShardMeta};

/// The data CF's memtables, from [`Engine::data_memtables`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Memtables {
    /// Entries in the active memtable and the immutable ones together.
    pub entries: u64,
    /// Entries in immutable memtables, switched out and waiting for (or
    /// in) their flush.
    pub immutable_entries: u64,
    /// Bytes the active memtable holds (its arena, the hash buckets
    /// included)…
    pub active_bytes: u64,
    /// …and the size at which RocksDB switches it out for its flush (the
    /// write buffer size).
    pub active_bytes_max: u64,
}

/// A replica's state-machine size, from [`Engine::shard_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSize {
    /// Keys counted.
    pub keys: u64,
    /// Key plus value bytes counted (before RocksDB's own compression).
    pub bytes: u64,
    /// False when the scan stopped at its key limit: then both figures are
    /// lower bounds.
    pub complete: bool,
}

/// A size scan's result: the size, where a split would halve the
/// shard's mailbox bytes, and the bytes of each namespace's mailboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeScan {
    pub size: ShardSize,
    /// Key plus value bytes of the mailbox rows (messages, dedup entries,
    /// cursors, heads, expiry markers, directory keys) of each namespace
    /// the scan was asked to count, for storage quotas (D44); a namespace
    /// with no rows is absent.
    pub namespaces: std::collections::BTreeMap<String, u64>,
    /// False when the scan stopped at its key limit (the namespaces'
    /// figures are then lower bounds).
    pub namespaces_complete: bool,
    /// The hash to split at (strictly inside the range scanned for), or
    /// None when no slice boundary leaves each side at least
    /// 1/[`SPLIT_SIDE_MIN_DIV`] of the mailbox bytes (one mailbox, or a
    /// few close together, hold most of them: splitting would not help).
    pub split_at: Option<u64>,
}

/// Slices of the hash range the split point is chosen among.
pub const HISTOGRAM_BUCKETS: usize = 256;
/// Each side of a split must keep at least this fraction (1/n) of the
/// shard's mailbox bytes.
pub const SPLIT_SIDE_MIN_DIV: u64 = 8;
/// A scan reads at most this many keys per key of its own budget
/// (`keys_max`), its siblings' included.
pub const VISITS_PER_KEY_MAX: u64 = 4;

/// The slice of `[start, end)` (end None: the top of the hash space) that
/// `hash` falls in; None outside the range.
fn bucket(hash: u64, start: u64, end: Option<u64>) -> Option<usize> {
    let end = end.map_or(1u128 << 64, u128::from);
    let (h, s) = (u128::from(hash), u128::from(start));
    if h < s || h >= end {
        return None;
    }
    let i = (h - s) * HISTOGRAM_BUCKETS as u128 / (end - s);
    usize::try_from(i).ok()
}

/// The hash where slice `i` of `[start, end)` begins.
fn boundary(i: usize, start: u64, end: Option<u64>) -> Option<u64> {
    let end = end.map_or(1u128 << 64, u128::from);
    let s = u128::from(start);
    let i = u128::try_from(i).ok()?;
    u64::try_from(s + (end - s) * i / HISTOGRAM_BUCKETS as u128).ok()
}

/// The slice boundary that splits the histogram's bytes closest to half,
/// as a hash, if each side keeps at least 1/[`SPLIT_SIDE_MIN_DIV`] of them.
pub fn middle(hist: &[u64], start: u64, end: Option<u64>) -> Option<u64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let mut left = 0u64;
    let mut best: Option<(u64, usize)> = None; // (distance from half, boundary)
    for (i, b) in hist.iter().enumerate().take(hist.len().saturating_sub(1)) {
        left += b;
        let off = left.abs_diff(total - left);
        if best.is_none_or(|(d, _)| off < d) {
            best = Some((off, i + 1));
        }
    }
    let (_, at) = best?;
    let left: u64 = hist.iter().take(at).sum();
    let side_min = total / SPLIT_SIDE_MIN_DIV;
    if left < side_min.max(1) || total - left < side_min.max(1) {
        return None;
    }
    let hash = boundary(at, start, end)?;
    (hash > start && end.is_none_or(|e| hash < e)).then_some(hash)
}

impl Engine {
    /// The state machine's size on this replica: the keys and key+value
    /// bytes of `shard` in the data CF, counted by a scan that stops after
    /// `keys_max` of its keys, or [`VISITS_PER_KEY_MAX`] times as many read
    /// in all (its own and, in a space shared after splits, its
    /// siblings'); then `complete` is false and the figures are lower
    /// bounds.
    pub fn shard_size(&self, shard: u64, keys_max: u64) -> Result<ShardSize, EngineError> {
        Ok(self
            .size_scan(shard, keys_max, HashRange::FULL, &std::collections::BTreeSet::new())?
            .size)
    }

    /// [`Engine::shard_size`], and the hash within `within` (the shard's
    /// range in the shard map; a bootstrap shard's engine range is every
    /// hash) that would split its mailbox bytes in half. With a scan cut
    /// short by `keys_max`, the point halves what was counted. The bytes
    /// of the namespaces in `count` are added up on the way (callers pass
    /// the namespaces with records, a bounded set, not every namespace a
    /// caller may have named).
    pub fn size_scan(
        &self,
        shard: u64,
        keys_max: u64,
        within: HashRange,
        count: &std::collections::BTreeSet<String>,
    ) -> Result<SizeScan, EngineError> {
        self.size_scans(&[(shard, within)], keys_max, count)?
            .pop()
            .ok_or_else(|| EngineError::InvalidCall("size scan: no result".into()))?
    }

    /// The data CF's memtables now: the entries of the active one and of
    /// those waiting for their flush (`rocksdb.num-entries-active-mem-table`,
    /// `rocksdb.num-entries-imm-mem-tables`), and how full the active one
    /// is (`rocksdb.cur-size-active-mem-table` against the write buffer
    /// size, where RocksDB switches it for a new one). A total-order
    /// iterator starts by copying every entry into one sorted skiplist
    /// (D33), so a caller with a scan it may put off (the size checker,
    /// D63) can wait for a flush it sees coming.
    pub fn data_memtables(&self) -> Result<Memtables, EngineError> {
        let cf = self.cf(CF_DATA)?;
        let db = self.db();
        let prop = |name: &str| -> Result<u64, EngineError> { Ok(db.property_int_value_cf(cf, name)?.unwrap_or(0)) };
        let active = prop("rocksdb.num-entries-active-mem-table")?;
        let immutable_entries = prop("rocksdb.num-entries-imm-mem-tables")?;
        Ok(Memtables {
            entries: active.saturating_add(immutable_entries),
            immutable_entries,
            active_bytes: prop("rocksdb.cur-size-active-mem-table")?,
            active_bytes_max: u64::try_from(self.options().write_buffer_bytes).unwrap_or(u64::MAX),
        })
    }

    /// [`Engine::size_scan`] of several shards, each `(shard, within)`, from
    /// one snapshot through one iterator: the results in the same order,
    /// each its own `Result` (a shard that is gone fails alone).
    ///
    /// Why one iterator: the data CF's memtable is a hash of per-mailbox
    /// skiplists (D33), and an iterator in total order over it starts by
    /// copying every entry of the memtable, all shards', into one sorted
    /// skiplist. One iterator per shard paid that copy once per shard
    /// (profiled: 8.6 % of a node's CPU at 256 appends in flight, when a
    /// node's size checker first counted its 20-odd shards; D54). Seeks on
    /// one iterator reuse the copy.
    pub fn size_scans(
        &self,
        shards: &[(u64, HashRange)],
        keys_max: u64,
        count: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<Result<SizeScan, EngineError>>, EngineError> {
        let snap = self.db().snapshot();
        let cf = self.cf(CF_DATA)?;
        let mut ro = crate::engine::total_order();
        ro.set_snapshot(&snap);
        // A one-off scan must not push hot blocks out of the cache.
        ro.fill_cache(false);
        // No upper bound: it is per iterator, and the iterator is shared;
        // each scan stops at its space's end itself.
        let mut it = self.db().raw_iterator_cf_opt(cf, ro);
        Ok(shards
            .iter()
            .map(|&(shard, within)| {
                let mk = keys::shard_meta(shard);
                let meta = snap.get_cf(cf, &mk)?;
                scan_one(&mut it, &mk, meta.as_deref(), shard, keys_max, within, count)
            })
            .collect())
    }
}

/// One shard's [`SizeScan`] through `it` (total order, positioned
/// anywhere), given its meta row's key and value as of the iterator's
/// snapshot.
fn scan_one(
    it: &mut rocksdb::DBRawIteratorWithThreadMode<'_, rocksdb::DB>,
    mk: &[u8],
    meta: Option<&[u8]>,
    shard: u64,
    keys_max: u64,
    within: HashRange,
    count: &std::collections::BTreeSet<String>,
) -> Result<SizeScan, EngineError> {
    let mut own_meta_bytes = None;
    let (space, range) = match meta {
        Some(raw) => {
            let m = ShardMeta::decode(mk, codec::open(CF_DATA, mk, raw)?)?;
            own_meta_bytes = Some(u64::try_from(mk.len() + raw.len()).unwrap_or(u64::MAX));
            (m.space, m.range)
        }
        None => (shard, HashRange::FULL),
    };
    let (start, end) = keys::shard_range(space).ok_or(EngineError::NoSuchShard(shard))?;
    let space_meta = keys::shard_meta(space);
    it.seek(&start);
    let mut size = ShardSize {
        keys: 0,
        bytes: 0,
        complete: true,
    };
    let mut hist = vec![0u64; HISTOGRAM_BUCKETS];
    let mut namespaces = std::collections::BTreeMap::<String, u64>::new();
    // Every key read counts against a budget too, the siblings' as well
    // (a space shared after splits is read whole by each of its
    // shards), of a few times `keys_max`, so one scan stays bounded.
    let visits_max = keys_max.saturating_mul(VISITS_PER_KEY_MAX);
    let mut visited = 0u64;
    // The shard's meta row is outside a space that is not its id's.
    if let (Some(bytes), true) = (own_meta_bytes, space != shard) {
        size.keys += 1;
        size.bytes += bytes;
    }
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if k >= end.as_slice() {
            break;
        }
        if size.keys >= keys_max || visited >= visits_max {
            size.complete = false;
            break;
        }
        visited += 1;
        // A space split in place (D38) also holds the other shard's
        // rows; the space's meta row is its owner's.
        let (mine, hash, mb) = if k == space_meta.as_slice() {
            (space == shard, None, None)
        } else {
            let mb = crate::split::key_mailbox(k)?;
            let hash = mb.map(crate::split::checked_mailbox_hash).transpose()?;
            (hash.is_none_or(|h| range.contains(h)), hash, mb)
        };
        if mine {
            let bytes = u64::try_from(k.len() + v.len()).unwrap_or(u64::MAX);
            size.keys += 1;
            size.bytes += bytes;
            if let Some(slot) = hash
                .and_then(|h| bucket(h, within.start, within.end))
                .and_then(|i| hist.get_mut(i))
            {
                *slot += bytes;
            }
            if let Some(ns) = (!count.is_empty())
                .then(|| mb.and_then(keys::mailbox_namespace))
                .flatten()
                .and_then(|ns| std::str::from_utf8(ns).ok())
            {
                if let Some(n) = namespaces.get_mut(ns) {
                    *n += bytes;
                } else if count.contains(ns) {
                    namespaces.insert(ns.to_string(), bytes);
                }
            }
        }
        it.next();
    }
    it.status()?;
    Ok(SizeScan {
        size,
        split_at: middle(&hist, within.start, within.end),
        namespaces_complete: size.complete,
        namespaces,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn buckets_cover_the_range_evenly() {
        assert_eq!(bucket(0, 0, None), Some(0));
        assert_eq!(bucket(u64::MAX, 0, None), Some(HISTOGRAM_BUCKETS - 1));
        assert_eq!(bucket(1 << 63, 0, None), Some(HISTOGRAM_BUCKETS / 2));
        assert_eq!(bucket(99, 100, Some(200)), None);
        assert_eq!(bucket(200, 100, Some(200)), None);
        assert_eq!(boundary(HISTOGRAM_BUCKETS / 2, 0, None), Some(1 << 63));
        assert_eq!(boundary(0, 1 << 62, Some(1 << 63)), Some(1 << 62));
    }

    #[test]
    fn the_middle_halves_the_bytes_not_the_range() {
        let mut hist = vec![0u64; HISTOGRAM_BUCKETS];
        // Most bytes in the top quarter: the point moves there.
        hist[10] = 100;
        hist[200] = 300;
        hist[220] = 300;
        let at = middle(&hist, 0, None).unwrap();
        assert_eq!(Some(at), boundary(201, 0, None));
        // Uniform: the range's midpoint.
        let flat = vec![7u64; HISTOGRAM_BUCKETS];
        assert_eq!(middle(&flat, 0, Some(1 << 40)), Some(1 << 39));
    }

    #[test]
    fn one_dominant_slice_is_not_split() {
        let mut hist = vec![0u64; HISTOGRAM_BUCKETS];
        hist[5] = 1_000;
        hist[100] = 10;
        assert_eq!(middle(&hist, 0, None), None);
        assert_eq!(middle(&[0; HISTOGRAM_BUCKETS], 0, None), None);
    }
}
