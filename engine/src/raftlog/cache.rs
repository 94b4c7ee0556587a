//! The entry cache: the newest entries of each shard's log, in memory.
//! raft-rs reads those entries back right away (to apply them once
//! committed, to send them to followers, to check terms); serving them from
//! memory instead of the log files is what keeps the files write-only in
//! the steady state.

use raft::eraftpb::Entry;

/// Entries kept in memory per shard, at most (and bytes, below). The cache
/// holds the tail of the log the node just wrote: raft-rs reads those entries
/// back right away (to apply them once committed, to send them to followers,
/// to check terms), and serving that from memory instead of RocksDB's memtable
/// is what the profile asked for. The driver trims it to what is still needed
/// with [`RaftLogStore::trim_entry_cache`], so idle shards hold nothing.
pub const ENTRY_CACHE_ENTRIES_MAX: usize = 1024;
/// Bytes of entry data cached per shard, at most.
pub const ENTRY_CACHE_BYTES_MAX: usize = 4 << 20;

/// Consecutive entries, the newest of the shard's durable log.
#[derive(Debug, Default)]
pub(crate) struct EntryCache {
    entries: std::collections::VecDeque<Entry>,
    bytes: usize,
}

fn entry_bytes(e: &Entry) -> usize {
    e.data.len() + e.context.len() + 32
}

impl EntryCache {
    pub(super) fn get(&self, index: u64) -> Option<&Entry> {
        let first = self.entries.front()?.index;
        self.entries.get(usize::try_from(index.checked_sub(first)?).ok()?)
    }

    pub(super) fn covers(&self, low: u64, high: u64) -> bool {
        match (self.entries.front(), self.entries.back()) {
            (Some(f), Some(b)) => low >= f.index && high <= b.index + 1,
            _ => false,
        }
    }

    pub(super) fn apply(&mut self, op: CacheOp) {
        match op {
            CacheOp::Append(entries) => {
                let Some(first) = entries.first().map(|e| e.index) else {
                    return;
                };
                // Drop a conflicting suffix, and everything if not contiguous.
                while self.entries.back().is_some_and(|b| b.index >= first) {
                    if let Some(e) = self.entries.pop_back() {
                        self.bytes -= entry_bytes(&e);
                    }
                }
                if self.entries.back().is_some_and(|b| b.index + 1 != first) {
                    self.clear();
                }
                for e in entries {
                    self.bytes += entry_bytes(&e);
                    self.entries.push_back(e);
                }
                while self.entries.len() > ENTRY_CACHE_ENTRIES_MAX || self.bytes > ENTRY_CACHE_BYTES_MAX {
                    self.pop_front();
                }
            }
            CacheOp::TrimBelow(index) => {
                while self.entries.front().is_some_and(|f| f.index < index) {
                    self.pop_front();
                }
            }
            CacheOp::Clear => self.clear(),
        }
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= entry_bytes(&e);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// A change to the entry cache that takes effect when its batch is durable.
#[derive(Debug)]
pub(super) enum CacheOp {
    Append(Vec<Entry>),
    TrimBelow(u64),
    Clear,
}
