//! What one file holds between fsyncs: its unsynced writes, kept in memory
//! by page and laid over the backing file, which is the durable image.
//!
//! A reader sees the backing bytes with the unsynced pages over them, cut
//! at the logical length. `sync` writes the pages to the backing file and
//! fdatasyncs it; `lose` drops them, as a power cut drops a page cache,
//! optionally tearing one page (its first bytes reach the disk, the rest
//! do not), as a power cut in the middle of a page write does.
//!
//! A shrink followed by a growth must read zeros where the old bytes were
//! cut, though the backing file still has them until the sync: `cut`
//! remembers the shortest length since the last sync.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The page size of the model (and of the torn-write unit).
pub const PAGE_BYTES: u64 = 4096;
/// A length or offset as an index (saturating: lengths past the address
/// space cannot be held in memory anyway).
fn us(x: u64) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

/// Unsynced bytes one file may hold, at most: a write past it is
/// ENOSPC. The harness's nodes fsync every few milliseconds; a file
/// that never does is a bug this bound surfaces instead of eating RAM.
pub const DIRTY_BYTES_MAX: u64 = 256 << 20;

/// One file's unsynced state.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Page index → the whole page as readers see it.
    pages: BTreeMap<u64, Vec<u8>>,
    /// The logical length, if it changed since the last sync.
    len: Option<u64>,
    /// The shortest length since the last sync, if it was cut: backing
    /// bytes at or past it read as zeros.
    cut: Option<u64>,
}

/// A torn write at a power cut: the first `bytes` bytes of the dirty page
/// with index `page` reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tear {
    pub page: u64,
    pub bytes: u64,
}

impl Dirty {
    /// Whether nothing is unsynced.
    pub fn is_clean(&self) -> bool {
        self.pages.is_empty() && self.len.is_none() && self.cut.is_none()
    }

    /// Unsynced page indexes.
    pub fn dirty_pages(&self) -> Vec<u64> {
        self.pages.keys().copied().collect()
    }

    /// The length readers see.
    pub fn len(&self, backing: &File) -> io::Result<u64> {
        match self.len {
            Some(l) => Ok(l),
            None => Ok(backing.metadata()?.len()),
        }
    }

    /// The page as readers see it, from the backing file if it is clean.
    fn page(&self, backing: &File, index: u64) -> io::Result<Vec<u8>> {
        if let Some(p) = self.pages.get(&index) {
            return Ok(p.clone());
        }
        let mut buf = vec![0u8; us(PAGE_BYTES)];
        let start = index * PAGE_BYTES;
        let mut got = 0usize;
        while got < buf.len() {
            let Some(rest) = buf.get_mut(got..) else { break };
            match backing.read_at(rest, start + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Cut bytes read as zeros until the sync makes the cut real.
        if let Some(cut) = self.cut {
            let from = us(cut.saturating_sub(start).min(PAGE_BYTES));
            buf.get_mut(from..).into_iter().flatten().for_each(|b| *b = 0);
        }
        Ok(buf)
    }

    /// Up to `size` bytes at `offset`, as readers see them.
    pub fn read(&self, backing: &File, offset: u64, size: u64) -> io::Result<Vec<u8>> {
        let len = self.len(backing)?;
        let end = offset.saturating_add(size).min(len);
        let mut out = Vec::with_capacity(us(end.saturating_sub(offset)));
        let mut at = offset;
        while at < end {
            let index = at / PAGE_BYTES;
            let page = self.page(backing, index)?;
            let from = us(at - index * PAGE_BYTES);
            let to = us((end - index * PAGE_BYTES).min(PAGE_BYTES));
            out.extend_from_slice(page.get(from..to).unwrap_or_default());
            at = index * PAGE_BYTES + to as u64;
        }
        Ok(out)
    }

    /// Writes `data` at `offset` into the unsynced pages.
    pub fn write(&mut self, backing: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let grown = (self.pages.len() as u64 + data.len() as u64 / PAGE_BYTES + 2) * PAGE_BYTES;
        if grown > DIRTY_BYTES_MAX {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let len = self.len(backing)?;
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = at / PAGE_BYTES;
            let mut page = self.page(backing, index)?;
            let from = us(at - index * PAGE_BYTES);
            let n = rest.len().min(us(PAGE_BYTES) - from);
            let (now, later) = rest.split_at(n);
            if let Some(dst) = page.get_mut(from..from + n) {
                dst.copy_from_slice(now);
            }
            self.pages.insert(index, page);
            rest = later;
            at += n as u64;
        }
        if at > len {
            self.len = Some(at);
        }
        Ok(())
    }

    /// Sets the logical length (truncate or extend).
    pub fn set_len(&mut self, backing: &File, new_len: u64) -> io::Result<()> {
        let len = self.len(backing)?;
        if new_len < len {
            // The cut bytes of the last page become zeros; later pages go.
            let index = new_len / PAGE_BYTES;
            let keep = us(new_len - index * PAGE_BYTES);
            let mut page = self.page(backing, index)?;
            page.get_mut(keep..).into_iter().flatten().for_each(|b| *b = 0);
            self.pages.retain(|i, _| *i <= index);
            if keep > 0 || self.pages.contains_key(&index) {
                self.pages.insert(index, page);
            }
            self.cut = Some(self.cut.map_or(new_len, |c| c.min(new_len)));
        }
        self.len = Some(new_len);
        Ok(())
    }

    /// Makes everything durable: the cut, the pages, the length, then an
    /// fdatasync of the backing file.
    pub fn sync(&mut self, backing: &File) -> io::Result<()> {
        if self.is_clean() {
            return backing.sync_data();
        }
        let len = self.len(backing)?;
        if let Some(cut) = self.cut {
            backing.set_len(cut)?;
        }
        for (index, page) in &self.pages {
            let start = index * PAGE_BYTES;
            if start >= len {
                continue;
            }
            let n = us((len - start).min(PAGE_BYTES));
            backing.write_all_at(page.get(..n).unwrap_or_default(), start)?;
        }
        backing.set_len(len)?;
        backing.sync_data()?;
        *self = Dirty::default();
        Ok(())
    }

    /// A power cut: everything unsynced is gone, except the first bytes of
    /// the torn page, if any (a page that is not dirty tears nothing).
    pub fn lose(&mut self, backing: &File, tear: Option<Tear>) -> io::Result<()> {
        if let Some(t) = tear {
            if let Some(page) = self.pages.get(&t.page) {
                let n = us(t.bytes.min(PAGE_BYTES));
                backing.write_all_at(page.get(..n).unwrap_or_default(), t.page * PAGE_BYTES)?;
            }
        }
        *self = Dirty::default();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a file is, as a plain model: the bytes readers see, and the
    /// bytes on disk.
    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        SetLen(u64),
        Sync,
        Lose,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..20_000, proptest::collection::vec(any::<u8>(), 1..6_000)).prop_map(|(o, d)| Op::Write(o, d)),
            1 => (0u64..24_000).prop_map(Op::SetLen),
            1 => Just(Op::Sync),
            1 => Just(Op::Lose),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Readers always see the model's bytes; after a power cut the
        /// file is what the last sync left.
        #[test]
        fn reads_and_losses_match_a_model(initial in proptest::collection::vec(any::<u8>(), 0..9_000), ops in proptest::collection::vec(op(), 1..30)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            std::fs::write(&path, &initial).unwrap();
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut d = Dirty::default();
            let mut seen = initial.clone();
            let mut durable = initial;
            for op in ops {
                match op {
                    Op::Write(o, data) => {
                        d.write(&file, o, &data).unwrap();
                        let end = o as usize + data.len();
                        if seen.len() < end { seen.resize(end, 0); }
                        seen[o as usize..end].copy_from_slice(&data);
                    }
                    Op::SetLen(l) => {
                        d.set_len(&file, l).unwrap();
                        seen.resize(l as usize, 0);
                    }
                    Op::Sync => {
                        d.sync(&file).unwrap();
                        durable = seen.clone();
                    }
                    Op::Lose => {
                        d.lose(&file, None).unwrap();
                        seen = durable.clone();
                    }
                }
                prop_assert_eq!(d.len(&file).unwrap(), seen.len() as u64);
                let got = d.read(&file, 0, u64::MAX).unwrap();
                prop_assert!(got == seen, "readers see other bytes");
                prop_assert!(std::fs::read(&path).unwrap() == durable, "the disk holds other bytes than the last sync");
            }
            d.lose(&file, None).unwrap();
            prop_assert!(std::fs::read(&path).unwrap() == durable, "a power cut left other bytes than the last sync");
        }
    }

    #[test]
    fn a_torn_page_keeps_only_its_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut d = Dirty::default();
        d.write(&file, 4096, &[2u8; 4096]).unwrap();
        assert_eq!(d.dirty_pages(), vec![1]);
        d.lose(&file, Some(Tear { page: 1, bytes: 100 })).unwrap();
        let disk = std::fs::read(&path).unwrap();
        assert!(disk[4096..4196].iter().all(|b| *b == 2));
        assert!(disk[4196..].iter().all(|b| *b == 1));
        assert!(disk[..4096].iter().all(|b| *b == 1));
    }

    #[test]
    fn unsynced_writes_never_reach_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut d = Dirty::default();
        d.write(&file, 0, b"hello").unwrap();
        assert_eq!(d.read(&file, 0, 100).unwrap(), b"hello");
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        d.sync(&file).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    }
}
