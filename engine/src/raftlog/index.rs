//! The Raft log's in-memory index: for every shard, its hard state, its
//! bounds and where each live entry is (segment, offset, length, term); for
//! every segment, how many live entries it holds, which is what purge asks.
//!
//! Why one `apply` for both: a record's ops change the index through
//! [`Index::apply`] when the record is written and again when it is
//! replayed at start-up, so a live log and a recovered one cannot disagree.
//! Entries are dropped from either end of a shard's run ([`EntryLocs`]),
//! never by scanning a shard's whole index, since this runs on every append.

use super::locs::EntryLocs;
use super::record::{EntryLoc, IndexOp};
use raft::eraftpb::HardState;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::Arc;

/// Where one live entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub seg: u64,
    pub offset: u64,
    pub len: u32,
    pub term: u64,
}

/// One shard's log as the files hold it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardIndex {
    pub hard: HardState,
    /// The last entry dropped from the front: (index, term).
    pub truncated: (u64, u64),
    /// The last entry: (index, term); equal to `truncated` when empty.
    pub last: (u64, u64),
    pub(super) entries: EntryLocs,
}

#[derive(Debug)]
pub(super) struct Segment {
    pub file: Arc<File>,
    /// Live entries stored in this segment.
    pub live: u64,
}

/// Adds `delta` to segment `seg`'s live entries.
fn count(segments: &mut BTreeMap<u64, Segment>, seg: u64, delta: i64) {
    if let Some(s) = segments.get_mut(&seg) {
        s.live = s.live.saturating_add_signed(delta);
    }
}

/// Holds `entries`, stored in segment `seg`, in shard `s`'s index.
fn insert(segments: &mut BTreeMap<u64, Segment>, s: &mut ShardIndex, entries: &[EntryLoc], seg: u64) {
    for e in entries {
        let loc = Loc {
            seg,
            offset: e.offset,
            len: e.len,
            term: e.term,
        };
        if let Some(old) = s.entries.insert(e.index, loc) {
            count(segments, old.seg, -1);
        }
    }
    count(segments, seg, i64::try_from(entries.len()).unwrap_or(i64::MAX));
}

#[derive(Debug, Default)]
pub(super) struct Index {
    pub shards: HashMap<u64, ShardIndex>,
    pub segments: BTreeMap<u64, Segment>,
}

impl Index {
    /// Drops the shard's entries at and above `from` (split, not a scan:
    /// this runs on every append).
    fn drop_from(&mut self, shard: u64, from: u64) {
        let Some(s) = self.shards.get_mut(&shard) else { return };
        let segments = &mut self.segments;
        s.entries.drop_from(from, |loc| count(segments, loc.seg, -1));
    }

    /// Drops the shard's entries at and below `through`.
    fn drop_through(&mut self, shard: u64, through: u64) {
        let Some(s) = self.shards.get_mut(&shard) else { return };
        let segments = &mut self.segments;
        s.entries.drop_through(through, |loc| count(segments, loc.seg, -1));
    }

    /// Applies one op, written to or read from segment `seg`. The same code
    /// runs for a live append and for replay, so they cannot disagree.
    pub fn apply(&mut self, op: IndexOp, seg: u64) {
        match op {
            IndexOp::Entries {
                shard,
                first,
                entries,
                rewrite: false,
            } => {
                let s = self.shards.entry(shard).or_default();
                let segments = &mut self.segments;
                s.entries.drop_from(first, |loc| count(segments, loc.seg, -1));
                insert(segments, s, &entries, seg);
                if let Some(l) = entries.last() {
                    s.last = (l.index, l.term);
                }
            }
            IndexOp::Entries {
                shard,
                mut entries,
                rewrite: true,
                ..
            } => {
                let truncated = self.shards.get(&shard).map_or(0, |s| s.truncated.0);
                entries.retain(|e| e.index > truncated);
                if !entries.is_empty() {
                    let s = self.shards.entry(shard).or_default();
                    insert(&mut self.segments, s, &entries, seg);
                }
            }
            IndexOp::HardState { shard, hard } => self.shards.entry(shard).or_default().hard = hard,
            IndexOp::Compact { shard, index, term } => {
                let s = self.shards.entry(shard).or_default();
                if index > s.truncated.0 {
                    s.truncated = (index, term);
                    if s.last.0 < index {
                        s.last = (index, term);
                    }
                    self.drop_through(shard, index);
                }
            }
            IndexOp::Reset { shard, index, term } => {
                self.drop_from(shard, 0);
                let s = self.shards.entry(shard).or_default();
                s.truncated = (index, term);
                s.last = (index, term);
            }
            IndexOp::Checkpoint {
                shard,
                truncated,
                last,
                hard,
            } => {
                self.drop_through(shard, truncated.0);
                if let Some(above) = last.0.checked_add(1) {
                    self.drop_from(shard, above);
                }
                let s = self.shards.entry(shard).or_default();
                s.truncated = truncated;
                s.last = last;
                s.hard = hard;
            }
        }
    }

    /// The shards whose log does not hold exactly the entries after its
    /// truncation up to its last index, the last with the last term, each
    /// with what is wrong; ascending.
    fn broken(&self) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for (shard, s) in &self.shards {
            let expect = s.last.0.saturating_sub(s.truncated.0);
            let ok = s.entries.len() as u64 == expect
                && s.entries.first().is_none_or(|(i, _)| i == s.truncated.0 + 1)
                && s.entries
                    .last()
                    .is_none_or(|(i, l)| i == s.last.0 && l.term == s.last.1);
            if !ok {
                let held = match (s.entries.first().map(|(i, _)| i), s.entries.last().map(|(i, _)| i)) {
                    (Some(a), Some(b)) => format!("{} entries, {a}..={b}", s.entries.len()),
                    _ => "no entries".to_string(),
                };
                out.push((
                    *shard,
                    format!(
                        "shard {shard}: the log should hold entries {}..={} (last term {}) but holds {held}: \
                         a segment holding live entries is missing or damaged",
                        s.truncated.0 + 1,
                        s.last.0,
                        s.last.1
                    ),
                ));
            }
        }
        out.sort_unstable_by_key(|(shard, _)| *shard);
        out
    }

    /// Salvage after damage (§8.5), `damage` the position (segment,
    /// offset) of the last damage found, if any:
    ///
    /// - every live entry stored before it is dropped: a lost record may
    ///   have overwritten it (a new leader's entries replacing an
    ///   uncommitted tail), and a replay without that record would keep
    ///   the old entry under the new last index and term;
    /// - every shard whose log is then not whole keeps the run of entries
    ///   that follows its truncation point without a gap, and nothing
    ///   after it; its last index becomes the end of that run;
    /// - every shard's commit index is lowered to its last index (raft-rs
    ///   refuses a commit index past the last entry).
    ///
    /// What a shard lost is caught up from its peers, and the replica must
    /// not vote until then (D49). Returns the shards changed, each with why.
    pub fn salvage(&mut self, damage: Option<(u64, u64)>) -> Vec<(u64, String)> {
        let mut changed: BTreeMap<u64, String> = BTreeMap::new();
        if let Some((dseg, dat)) = damage {
            // One pass per shard: removing entries one at a time from the
            // middle of a shard's run would cost O(n) each.
            let segments = &mut self.segments;
            for (shard, s) in &mut self.shards {
                let mut dropped = false;
                s.entries.retain(|_, loc| {
                    let keep = (loc.seg, loc.offset) >= (dseg, dat);
                    if !keep {
                        count(segments, loc.seg, -1);
                        dropped = true;
                    }
                    keep
                });
                if dropped {
                    changed
                        .entry(*shard)
                        .or_insert_with(|| format!("shard {shard}: entries stored before the damage were dropped"));
                }
            }
        }
        for (shard, why) in self.broken() {
            changed.entry(shard).or_insert(why);
        }
        let ids: Vec<u64> = self.shards.keys().copied().collect();
        for shard in ids {
            let Some(s) = self.shards.get(&shard) else { continue };
            let truncated = s.truncated;
            if changed.contains_key(&shard) {
                let mut keep = truncated;
                for (i, loc) in s.entries.iter() {
                    if i <= truncated.0 {
                        continue;
                    }
                    if i != keep.0.saturating_add(1) || (i == s.last.0 && loc.term != s.last.1) {
                        break;
                    }
                    keep = (i, loc.term);
                }
                self.drop_through(shard, truncated.0);
                self.drop_from(shard, keep.0.saturating_add(1));
                if let Some(s) = self.shards.get_mut(&shard) {
                    s.last = keep;
                }
            }
            if let Some(s) = self.shards.get_mut(&shard) {
                s.hard.commit = s.hard.commit.min(s.last.0);
            }
        }
        changed.into_iter().collect()
    }
}
