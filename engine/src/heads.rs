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
//! value read under the shard's apply lock, or (b) with the values an apply
//! batch wrote, after that batch's write succeeded. Every writer of mailbox
//! heads is the shard's apply (which holds the lock) except a snapshot
//! ingest, which clears the cache under the same lock. A crash loses the
//! cache and nothing else; recovery needs no step of its own.
//!
//! Shape: two generations of hash maps (a cheap approximation of LRU with
//! no per-hit bookkeeping). Hits in the old generation move to the new
//! one; when the new one reaches half the capacity, the old one is dropped
//! and the new one becomes old. So at most `capacity` heads are held, and a
//! head used at least once per half-capacity distinct mailboxes stays.

use crate::records::MailboxMeta;
use std::collections::HashMap;

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
