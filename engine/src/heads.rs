//! Mailbox heads in memory: the state machine's cache of each mailbox's
//! counters ([`MailboxMeta`]: last seq, low watermark, cursor count, payload
//! bytes), so an append to a mailbox written recently reads nothing from
//! RocksDB.
//!
//! Why a cache and not the whole table: mailboxes must stay cheap rows. A
//! node may hold tens of millions of them, most idle, so only recently
//! used heads stay in memory and a cold one is read from disk once.
//!
//! Why it can never be stale: the database stays the source of truth and
//! this is write-through. The cache is filled only (a) from a committed
//! head rebuilt under the shard's apply lock, or (b) with the heads an
//! apply batch changed, after that batch's write succeeded. Every writer of
//! mailbox state is the shard's apply (which holds the lock) except a
//! snapshot ingest, which clears the cache under the same lock. A crash
//! loses the cache and nothing else; recovery needs no step of its own.
//!
//! What "the database" holds for a head: the head row, written by every
//! op that changes a head except most appends, and the messages appended
//! since the row (I9). An append writes the row only every
//! [`HEAD_ROW_EVERY_APPENDS`] seqs, which takes one of an append's three
//! memtable inserts off the hot path; [`HeadRebuild`] folds the row and the
//! messages after it back into the head, for a cold load in apply and for
//! every read that needs the head's counters.
//!
//! Shape: two generations of hash maps (a cheap approximation of LRU with
//! no per-hit bookkeeping). Hits in the old generation move to the new
//! one; when the new one reaches half the capacity, the old one is dropped
//! and the new one becomes old. So at most `capacity` heads are held, and a
//! head used at least once per half-capacity distinct mailboxes stays.

use crate::error::EngineError;
use crate::keys::{self, CF_DATA};
use crate::records::{MailboxMeta, MessageView};
use std::collections::HashMap;

/// Default of [`crate::EngineOptions::head_row_every_appends`]: an append
/// writes its mailbox's head row (`shard | 01 | mb`) only when its seq is a
/// multiple of this; every other op that changes a head
/// writes the row at once. Why: the row was one of an append's three
/// memtable inserts (message, dedup entry, head), and skiplist inserts are
/// most of apply's CPU (docs/benchmarks.md). Between two row writes the
/// appended messages themselves say how the head moved, so the head is
/// the row folded with fewer than this many messages after it
/// ([`HeadRebuild`]; storage-format invariant I9). The value bounds what a
/// cold load scans (that many message values at most) against what appends
/// save (all but one row insert in this many).
pub const HEAD_ROW_EVERY_APPENDS: u64 = 32;

/// Bounds of [`crate::EngineOptions::head_row_every_appends`]. 1 writes the
/// row on every append (format 2's behaviour); the maximum bounds a cold
/// load's scan.
pub const HEAD_ROW_EVERY_APPENDS_MAX: u64 = 1024;

/// Whether an append that assigned `seq` must write its mailbox's head row.
pub(crate) fn append_writes_head_row(seq: u64, every: u64) -> bool {
    seq % every.max(1) == 0
}

/// Rebuilds a mailbox's head from its stored row (or the empty head if
/// there is none) and the messages stored after the row's `last_seq`, fed
/// in seq order. Invariant I9 (docs/storage-format.md): every message after
/// the row's `last_seq` was appended after the row was written and no
/// other op has changed the mailbox since (they all write the row), so
/// those messages are consecutive, live, and fewer than
/// [`HEAD_ROW_EVERY_APPENDS`]; anything else is corruption.
pub(crate) struct HeadRebuild {
    meta: MailboxMeta,
    after_row: u64,
    /// The scan bound: the largest `head_row_every_appends` a data dir may
    /// have been written with, not this engine's setting, because the
    /// setting may have been lowered since.
    every_max: u64,
}

impl HeadRebuild {
    /// Starts from the stored row.
    pub(crate) fn new(row: Option<MailboxMeta>) -> HeadRebuild {
        HeadRebuild {
            meta: row.unwrap_or_default(),
            after_row: 0,
            every_max: HEAD_ROW_EVERY_APPENDS_MAX,
        }
    }

    /// The message keys to feed: `[first, end)` of `mb` in `shard`, at most
    /// [`HEAD_ROW_EVERY_APPENDS_MAX`] of them (one more than I9 allows, so
    /// that a broken invariant shows instead of being cut off).
    pub(crate) fn scan_range(&self, space: u64, mb: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let first = keys::message(space, mb, self.meta.last_seq.saturating_add(1));
        let end = keys::message(space, mb, self.meta.last_seq.saturating_add(self.every_max + 1));
        (first, end)
    }

    /// Folds one message (key and checked body) into the head.
    pub(crate) fn message(&mut self, key: &[u8], body: &[u8]) -> Result<(), EngineError> {
        let seq = keys::checked_message_seq(key)?;
        let view = MessageView::decode(key, body)?;
        self.after_row += 1;
        if seq != self.meta.last_seq.saturating_add(1) || view.deleted || self.after_row >= self.every_max {
            return Err(EngineError::corruption(
                CF_DATA,
                key,
                format!(
                    "message {seq} after the mailbox's head row breaks I9 (expected live seq {}, {} after the row, at most {})",
                    self.meta.last_seq.saturating_add(1),
                    self.after_row,
                    self.every_max - 1
                ),
            ));
        }
        self.meta.last_seq = seq;
        self.meta.payload_bytes = self
            .meta
            .payload_bytes
            .saturating_add(u64::try_from(view.payload.len()).unwrap_or(u64::MAX));
        Ok(())
    }

    /// The rebuilt head.
    pub(crate) fn finish(self) -> MailboxMeta {
        self.meta
    }
}

/// One shard's cached heads, keyed by the mailbox key
/// ([`crate::keys::mailbox`]).
#[derive(Debug)]
pub(crate) struct HeadCache {
    capacity: usize,
    young: HashMap<Vec<u8>, MailboxMeta>,
    old: HashMap<Vec<u8>, MailboxMeta>,
}

impl HeadCache {
    /// A cache of at most `capacity` heads (0 turns it off).
    pub(crate) fn new(capacity: usize) -> HeadCache {
        HeadCache {
            capacity,
            young: HashMap::new(),
            old: HashMap::new(),
        }
    }

    /// The cached head of `mb`.
    pub(crate) fn get(&mut self, mb: &[u8]) -> Option<MailboxMeta> {
        if let Some(m) = self.young.get(mb) {
            return Some(*m);
        }
        let (k, m) = self.old.remove_entry(mb)?;
        self.insert(k, m);
        Some(m)
    }

    /// Records `mb`'s committed head.
    pub(crate) fn insert(&mut self, mb: Vec<u8>, meta: MailboxMeta) {
        if self.capacity == 0 {
            return;
        }
        if !self.young.contains_key(&mb) && self.young.len() >= (self.capacity / 2).max(1) {
            if self.capacity >= 2 {
                self.old = std::mem::take(&mut self.young);
            } else {
                self.young.clear();
            }
        }
        self.old.remove(&mb);
        self.young.insert(mb, meta);
    }

    /// Forgets everything (a snapshot replaced the shard's state).
    pub(crate) fn clear(&mut self) {
        self.young = HashMap::new();
        self.old = HashMap::new();
    }

    /// Heads held.
    pub(crate) fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(last_seq: u64) -> MailboxMeta {
        MailboxMeta {
            last_seq,
            ..MailboxMeta::default()
        }
    }

    proptest! {
        /// Against a model (a plain map of everything inserted): a hit is
        /// always the latest value inserted for that key, and the cache
        /// never holds more than its capacity.
        #[test]
        fn hits_are_the_latest_value_and_the_size_is_bounded(
            capacity in 0usize..16,
            ops in proptest::collection::vec((0u8..24, any::<bool>(), 0u64..1_000), 0..400),
        ) {
            let mut cache = HeadCache::new(capacity);
            let mut model: HashMap<Vec<u8>, MailboxMeta> = HashMap::new();
            for (key, write, seq) in ops {
                let k = vec![key];
                if write {
                    cache.insert(k.clone(), meta(seq));
                    model.insert(k, meta(seq));
                } else if let Some(hit) = cache.get(&k) {
                    prop_assert_eq!(Some(&hit), model.get(&k));
                }
                prop_assert!(cache.len() <= capacity, "{} heads held, capacity {}", cache.len(), capacity);
            }
        }
    }

    #[test]
    fn a_recently_used_head_survives_a_generation_change() {
        let mut c = HeadCache::new(4);
        c.insert(b"a".to_vec(), meta(1));
        c.insert(b"b".to_vec(), meta(2));
        // young is full (2): the next new key turns it old.
        c.insert(b"c".to_vec(), meta(3));
        assert_eq!(c.get(b"a"), Some(meta(1)), "a hit in the old generation moves it up");
        c.insert(b"d".to_vec(), meta(4));
        // young (c, a) was full: it became old; b, never hit, is gone.
        assert_eq!(c.get(b"b"), None);
        assert_eq!(c.get(b"a"), Some(meta(1)));
        c.clear();
        assert_eq!(c.len(), 0);
    }
}
