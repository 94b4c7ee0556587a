//! Where one shard's live log entries are: a run of (index, location)
//! pairs kept in index order in one `VecDeque`.
//!
//! Why not a `BTreeMap`: every append asks for the last index (is this a
//! plain append after the last entry, or does it overwrite a tail?) and
//! every read asks for entries by index. A B-tree answers both by walking
//! from its root, a cache miss per level: profiled at 256 appends in flight,
//! the walk to the last key alone was about 1 % of the servers' CPU. A shard's
//! live entries are almost always one gapless run (`truncated + 1 ..= last`),
//! so here the last entry is the deque's back, and an entry is found at
//! `index - first` in O(1); a binary search covers the runs with gaps that
//! only a damaged log's replay leaves (§8.5), until salvage cuts them.
//!
//! Appends and drops at either end are O(1) per entry. Inserting an index
//! below the last one that is not already held (replay of a damaged log
//! only) shifts the deque: O(n), and rare.

use super::index::Loc;
use std::collections::VecDeque;

/// One shard's live entries, ascending by index, each index at most once.
#[derive(Debug, Clone, Default)]
pub(crate) struct EntryLocs {
    run: VecDeque<(u64, Loc)>,
}

impl EntryLocs {
    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.run.len()
    }

    /// Whether no entry is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.run.is_empty()
    }

    /// The position of `index` in the run, or where it would go.
    fn position(&self, index: u64) -> Result<usize, usize> {
        if let Some(&(first, _)) = self.run.front() {
            // The common case: no gaps, so the entry is at index - first.
            if let Some(p) = index.checked_sub(first).and_then(|d| usize::try_from(d).ok()) {
                if self.run.get(p).is_some_and(|(i, _)| *i == index) {
                    return Ok(p);
                }
            }
        }
        self.run.binary_search_by_key(&index, |(i, _)| *i)
    }

    /// The location of entry `index`.
    pub fn get(&self, index: u64) -> Option<&Loc> {
        let p = self.position(index).ok()?;
        self.run.get(p).map(|(_, l)| l)
    }

    /// Holds `loc` for `index`; returns the location it replaced.
    pub fn insert(&mut self, index: u64, loc: Loc) -> Option<Loc> {
        if self.run.back().is_none_or(|(last, _)| *last < index) {
            self.run.push_back((index, loc));
            return None;
        }
        match self.position(index) {
            Ok(p) => self.run.get_mut(p).map(|(_, l)| std::mem::replace(l, loc)),
            Err(p) => {
                self.run.insert(p, (index, loc));
                None
            }
        }
    }

    /// The lowest entry.
    pub fn first(&self) -> Option<(u64, &Loc)> {
        self.run.front().map(|(i, l)| (*i, l))
    }

    /// The highest entry.
    pub fn last(&self) -> Option<(u64, &Loc)> {
        self.run.back().map(|(i, l)| (*i, l))
    }

    /// Removes the entries at and above `from`, calling `dropped` with each.
    pub fn drop_from(&mut self, from: u64, mut dropped: impl FnMut(&Loc)) {
        if self.run.back().is_none_or(|(last, _)| *last < from) {
            return;
        }
        let p = self.run.partition_point(|(i, _)| *i < from);
        for (_, l) in self.run.drain(p..) {
            dropped(&l);
        }
    }

    /// Removes the entries at and below `through`, calling `dropped` with each.
    pub fn drop_through(&mut self, through: u64, mut dropped: impl FnMut(&Loc)) {
        if self.run.front().is_none_or(|(first, _)| *first > through) {
            return;
        }
        let p = self.run.partition_point(|(i, _)| *i <= through);
        for (_, l) in self.run.drain(..p) {
            dropped(&l);
        }
    }

    /// Keeps only the entries for which `keep` is true, in one pass.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &Loc) -> bool) {
        self.run.retain(|(i, l)| keep(*i, l));
    }

    /// Removes entry `index`; returns its location (O(n) unless at an end;
    /// use [`EntryLocs::retain`] to remove many).
    #[cfg(test)]
    pub fn remove(&mut self, index: u64) -> Option<Loc> {
        let p = self.position(index).ok()?;
        self.run.remove(p).map(|(_, l)| l)
    }

    /// Every entry, ascending.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, &Loc)> + '_ {
        self.run.iter().map(|(i, l)| (*i, l))
    }

    /// The entries at and above `from`, ascending.
    pub fn iter_from(&self, from: u64) -> impl Iterator<Item = (u64, &Loc)> + '_ {
        let p = self.run.partition_point(|(i, _)| *i < from);
        self.run.range(p..).map(|(i, l)| (*i, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn loc(seg: u64) -> Loc {
        Loc {
            seg,
            offset: seg * 10,
            len: 1,
            term: seg,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        DropFrom(u64),
        DropThrough(u64),
        Remove(u64),
        RetainSegAtLeast(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small indexes so that ops hit held entries, gaps and both ends;
        // inserts weighted so the run grows.
        prop_oneof![
            6 => (0u64..64, 0u64..1_000).prop_map(|(i, s)| Op::Insert(i, s)),
            1 => (0u64..70).prop_map(Op::DropFrom),
            1 => (0u64..70).prop_map(Op::DropThrough),
            1 => (0u64..70).prop_map(Op::Remove),
            1 => (0u64..200).prop_map(Op::RetainSegAtLeast),
        ]
    }

    proptest! {
        /// Against a BTreeMap model: every op's result, what each drop
        /// reports, and afterwards every lookup, both ends and the order.
        #[test]
        fn behaves_as_an_ordered_map(ops in proptest::collection::vec(op(), 0..200)) {
            let mut locs = EntryLocs::default();
            let mut model: BTreeMap<u64, Loc> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(i, s) => {
                        let got = locs.insert(i, loc(s)).map(|l| l.seg);
                        let want = model.insert(i, loc(s)).map(|l| l.seg);
                        prop_assert_eq!(got, want);
                    }
                    Op::DropFrom(from) => {
                        let mut got = Vec::new();
                        locs.drop_from(from, |l| got.push(l.seg));
                        let want: Vec<u64> = model.split_off(&from).values().map(|l| l.seg).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::DropThrough(through) => {
                        let mut got = Vec::new();
                        locs.drop_through(through, |l| got.push(l.seg));
                        let kept = model.split_off(&(through + 1));
                        let want: Vec<u64> = std::mem::replace(&mut model, kept).values().map(|l| l.seg).collect();
                        prop_assert_eq!(got, want);
                    }
                    Op::Remove(i) => {
                        prop_assert_eq!(locs.remove(i).map(|l| l.seg), model.remove(&i).map(|l| l.seg));
                    }
                    Op::RetainSegAtLeast(min) => {
                        locs.retain(|_, l| l.seg >= min);
                        model.retain(|_, l| l.seg >= min);
                    }
                }
                prop_assert_eq!(locs.len(), model.len());
            }
            for i in 0..72 {
                prop_assert_eq!(locs.get(i).map(|l| l.seg), model.get(&i).map(|l| l.seg));
                let got: Vec<u64> = locs.iter_from(i).map(|(j, _)| j).collect();
                let want: Vec<u64> = model.range(i..).map(|(j, _)| *j).collect();
                prop_assert_eq!(got, want);
            }
            let got: Vec<(u64, u64)> = locs.iter().map(|(i, l)| (i, l.seg)).collect();
            let want: Vec<(u64, u64)> = model.iter().map(|(i, l)| (*i, l.seg)).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(locs.first().map(|(i, _)| i), model.keys().next().copied());
            prop_assert_eq!(locs.last().map(|(i, _)| i), model.keys().next_back().copied());
        }
    }

    #[test]
    fn a_gapless_run_is_found_by_offset_and_a_gap_by_search() {
        let mut locs = EntryLocs::default();
        for i in 10..20 {
            assert_eq!(locs.insert(i, loc(i)), None);
        }
        assert_eq!(locs.get(15).map(|l| l.seg), Some(15));
        assert_eq!(locs.remove(12).map(|l| l.seg), Some(12));
        // Past the gap, index - first points one too far; the search finds it.
        assert_eq!(locs.get(15).map(|l| l.seg), Some(15));
        assert_eq!(locs.get(12), None);
        assert_eq!(locs.insert(12, loc(99)), None);
        assert_eq!(locs.get(12).map(|l| l.seg), Some(99));
        assert_eq!(
            locs.iter().map(|(i, _)| i).collect::<Vec<_>>(),
            (10..20).collect::<Vec<_>>()
        );
    }
}
