//! The byte format of the Raft log's segment files, and the in-memory index
//! operations each record turns into (docs/storage-format.md §8 has the same
//! layout as a table).
//!
//! A segment file is a header followed by records, nothing else:
//!
//! ```text
//! header  = magic "PHRLOG01" (8) | segment number u64 | crc32 of the 16 bytes before (u32)
//! record  = body length u32 | crc32 of (length bytes ++ body) u32 | body
//! body    = version u8 (= 1) | op count u32 | op*
//! op      = tag u8 | fields
//!   1 Entries    shard u64 | first index u64 | count u32 | count x (term u64 | len u32 | raft Entry, protobuf)
//!   2 Rewrite    the same fields as Entries
//!   3 HardState  shard u64 | term u64 | vote u64 | commit u64
//!   4 Compact    shard u64 | index u64 | term u64
//!   5 Reset      shard u64 | index u64 | term u64
//!   6 Checkpoint shard u64 | truncated index u64 | truncated term u64
//!                | last index u64 | last term u64 | term u64 | vote u64 | commit u64
//! ```
//!
//! Every integer is big-endian. One record is one group commit: the Raft
//! writes of every shard in one `Engine::write_raft` (or in several such
//! calls at once, joined in call order: `group.rs`), written with one
//! `write` and made durable with one fdatasync. The crc covers the length
//! too, so a torn length cannot send recovery off into the middle of a
//! payload. Each entry's term sits outside its protobuf so that recovery can
//! index a segment without decoding a single entry.
//!
//! Why these six ops and not a key-value image of the log: the index a
//! record produces ([`IndexOp`]) is applied by exactly the same code when a
//! record is written and when it is replayed at start-up
//! ([`super::files`]), so there is one definition of what a record means.
//! Reading records back (and the scan past damage) is in `record_read.rs`.

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};

#[path = "record_read.rs"]
mod read;
pub(crate) use read::{decode_body, durable_record_after, next_record_after, read_record, Found};

/// Bytes of a segment header.
pub(crate) const SEGMENT_HEADER_BYTES: u64 = 20;
/// First bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"PHRLOG01";
/// Bytes of a record header (length and crc).
pub(crate) const RECORD_HEADER_BYTES: u64 = 8;
/// The largest record body written or accepted, bytes. A Raft Ready is
/// bounded far below this by raft-rs's `max_size_per_msg` and the inflight
/// window; a record claiming more is corruption, not a big write.
pub(crate) const RECORD_BODY_BYTES_MAX: u64 = 512 << 20;
/// Bytes in front of each entry's protobuf inside an Entries op.
pub(crate) const ENTRY_HEADER_BYTES: u64 = 12;

const BODY_VERSION: u8 = 1;
const TAG_ENTRIES: u8 = 1;
const TAG_REWRITE: u8 = 2;
const TAG_HARD_STATE: u8 = 3;
const TAG_COMPACT: u8 = 4;
const TAG_RESET: u8 = 5;
const TAG_CHECKPOINT: u8 = 6;

/// Where one entry's protobuf sits: `offset` is from the start of the record
/// while a record is being built, and from the start of the segment file
/// once the record has been written or read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryLoc {
    pub index: u64,
    pub term: u64,
    pub offset: u64,
    pub len: u32,
}

/// What one op of a record does to the in-memory index.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum IndexOp {
    /// Entries from `first` on; with `rewrite` false they replace the log's
    /// suffix from `first`, with `rewrite` true they only move where entries
    /// that are already in the log are stored (segment GC).
    Entries {
        shard: u64,
        first: u64,
        entries: Vec<EntryLoc>,
        rewrite: bool,
    },
    HardState {
        shard: u64,
        hard: HardState,
    },
    /// Drop entries up to and including `index`; the log now starts after it.
    Compact {
        shard: u64,
        index: u64,
        term: u64,
    },
    /// Drop every entry; the log is empty and truncated at `index`/`term`.
    Reset {
        shard: u64,
        index: u64,
        term: u64,
    },
    /// The shard's whole state when a segment was started, so that older
    /// segments can be deleted once none of their entries is live.
    Checkpoint {
        shard: u64,
        truncated: (u64, u64),
        last: (u64, u64),
        hard: HardState,
    },
}

impl IndexOp {
    /// Moves entry offsets from record-relative to file-relative.
    pub(crate) fn rebase(&mut self, record_offset: u64) {
        if let IndexOp::Entries { entries, .. } = self {
            for e in entries {
                e.offset += record_offset;
            }
        }
    }
}

/// Builds one record: the bytes to write and the index ops they mean.
#[derive(Debug)]
pub(crate) struct RecordBuilder {
    buf: Vec<u8>,
    ops: u32,
    index_ops: Vec<IndexOp>,
}

/// Where a record's first op starts: after its length and crc (8), body
/// version (1) and op count (4).
const BODY_OPS_AT: usize = 13;

impl Default for RecordBuilder {
    fn default() -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&[0; 8]); // length and crc, filled by finish
        buf.push(BODY_VERSION);
        buf.extend_from_slice(&[0; 4]); // op count, filled by finish
        RecordBuilder {
            buf,
            ops: 0,
            index_ops: Vec::new(),
        }
    }
}

impl RecordBuilder {
    /// Whether no op was added.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Bytes of the record so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    fn u64(&mut self, x: u64) {
        self.buf.extend_from_slice(&x.to_be_bytes());
    }

    fn u32(&mut self, x: u32) {
        self.buf.extend_from_slice(&x.to_be_bytes());
    }

    fn begin(&mut self, tag: u8) {
        self.buf.push(tag);
        self.ops += 1;
    }

    /// An Entries (or Rewrite) op: `entries`, consecutive, encoded
    /// straight into the record (no intermediate buffer: this is the
    /// append path). Nothing is added for an empty slice.
    pub fn entries(&mut self, shard: u64, rewrite: bool, entries: &[Entry]) -> Result<(), String> {
        let Some(first) = entries.first().map(|e| e.index) else {
            return Ok(());
        };
        let count = u32::try_from(entries.len()).map_err(|_| "too many entries in one op".to_string())?;
        if let Some((i, e)) = entries
            .iter()
            .enumerate()
            .find(|(i, e)| Some(e.index) != first.checked_add(*i as u64))
        {
            return Err(format!("entries are not consecutive: #{i} has index {}", e.index));
        }
        let (start_len, start_ops) = (self.buf.len(), self.ops);
        let added = self.entries_unchecked(shard, first, count, rewrite, entries);
        if added.is_err() {
            // Leave the record as it was: no half-written op.
            self.buf.truncate(start_len);
            self.ops = start_ops;
        }
        added
    }

    fn entries_unchecked(
        &mut self,
        shard: u64,
        first: u64,
        count: u32,
        rewrite: bool,
        entries: &[Entry],
    ) -> Result<(), String> {
        self.begin(if rewrite { TAG_REWRITE } else { TAG_ENTRIES });
        self.u64(shard);
        self.u64(first);
        self.u32(count);
        let mut locs = Vec::with_capacity(entries.len());
        for e in entries {
            let len = e.compute_size();
            self.u64(e.term);
            self.u32(len);
            let offset = self.buf.len() as u64;
            e.write_to_vec(&mut self.buf)
                .map_err(|err| format!("entry {} does not encode: {err}", e.index))?;
            if self.buf.len() as u64 - offset != u64::from(len) {
                return Err(format!(
                    "entry {} encoded to a size other than its computed one",
                    e.index
                ));
            }
            locs.push(EntryLoc {
                index: e.index,
                term: e.term,
                offset,
                len,
            });
        }
        self.index_ops.push(IndexOp::Entries {
            shard,
            first,
            entries: locs,
            rewrite,
        });
        Ok(())
    }

    /// A HardState op.
    pub fn hard_state(&mut self, shard: u64, hard: &HardState) {
        self.begin(TAG_HARD_STATE);
        self.u64(shard);
        self.u64(hard.term);
        self.u64(hard.vote);
        self.u64(hard.commit);
        self.index_ops.push(IndexOp::HardState {
            shard,
            hard: hard.clone(),
        });
    }

    /// A Compact op.
    pub fn compact(&mut self, shard: u64, index: u64, term: u64) {
        self.begin(TAG_COMPACT);
        self.u64(shard);
        self.u64(index);
        self.u64(term);
        self.index_ops.push(IndexOp::Compact { shard, index, term });
    }

    /// A Reset op.
    pub fn reset(&mut self, shard: u64, index: u64, term: u64) {
        self.begin(TAG_RESET);
        self.u64(shard);
        self.u64(index);
        self.u64(term);
        self.index_ops.push(IndexOp::Reset { shard, index, term });
    }

    /// A Checkpoint op.
    pub fn checkpoint(&mut self, shard: u64, truncated: (u64, u64), last: (u64, u64), hard: &HardState) {
        self.begin(TAG_CHECKPOINT);
        self.u64(shard);
        for x in [
            truncated.0,
            truncated.1,
            last.0,
            last.1,
            hard.term,
            hard.vote,
            hard.commit,
        ] {
            self.u64(x);
        }
        self.index_ops.push(IndexOp::Checkpoint {
            shard,
            truncated,
            last,
            hard: hard.clone(),
        });
    }

    /// Appends `other`'s ops after this record's, as if they had been
    /// added here: one record, one length and crc for both (the log's
    /// group commit across callers, `group.rs`).
    pub fn absorb(&mut self, other: RecordBuilder) {
        // `other`'s ops start at BODY_OPS_AT of its buffer and land at the
        // end of this one: every offset inside it moves by the difference.
        let shift = (self.buf.len() as u64).saturating_sub(BODY_OPS_AT as u64);
        self.buf
            .extend_from_slice(other.buf.get(BODY_OPS_AT..).unwrap_or_default());
        self.ops = self.ops.saturating_add(other.ops);
        self.index_ops.extend(other.index_ops.into_iter().map(|mut op| {
            op.rebase(shift);
            op
        }));
    }

    /// The record's bytes and its index ops (offsets relative to the
    /// record's start), or an error if the body is over
    /// [`RECORD_BODY_BYTES_MAX`].
    pub fn finish(mut self) -> Result<(Vec<u8>, Vec<IndexOp>), String> {
        let body_len = self.buf.len() as u64 - RECORD_HEADER_BYTES;
        if body_len > RECORD_BODY_BYTES_MAX {
            return Err(format!(
                "a Raft log record of {body_len} bytes is over the limit of {RECORD_BODY_BYTES_MAX}"
            ));
        }
        let len = u32::try_from(body_len).map_err(|_| "record over 4 GiB".to_string())?;
        let ops = self.ops.to_be_bytes();
        if let Some(slot) = self.buf.get_mut(9..13) {
            slot.copy_from_slice(&ops);
        }
        let crc = record_crc(len, self.buf.get(8..).unwrap_or_default());
        if let Some(slot) = self.buf.get_mut(0..4) {
            slot.copy_from_slice(&len.to_be_bytes());
        }
        if let Some(slot) = self.buf.get_mut(4..8) {
            slot.copy_from_slice(&crc.to_be_bytes());
        }
        Ok((self.buf, self.index_ops))
    }
}

fn record_crc(len: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_be_bytes());
    h.update(body);
    h.finalize()
}

/// A segment header for segment number `seg`.
pub(crate) fn segment_header(seg: u64) -> [u8; 20] {
    let mut h = [0u8; 20];
    let mut crc = crc32fast::Hasher::new();
    crc.update(SEGMENT_MAGIC);
    crc.update(&seg.to_be_bytes());
    let crc = crc.finalize();
    for (dst, src) in h.iter_mut().zip(
        SEGMENT_MAGIC
            .iter()
            .chain(seg.to_be_bytes().iter())
            .chain(crc.to_be_bytes().iter()),
    ) {
        *dst = *src;
    }
    h
}

/// Checks a segment header; `Err` says what is wrong with it.
pub(crate) fn check_segment_header(bytes: &[u8], seg: u64) -> Result<(), String> {
    let head = bytes
        .get(..20)
        .ok_or_else(|| format!("{} bytes is too short for a segment header", bytes.len()))?;
    if head != segment_header(seg) {
        return Err(format!("segment header is not that of segment {seg}"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::cast_possible_truncation
)]
pub(crate) mod tests {
    use super::*;

    /// A log entry for tests (here and in `files_tests.rs`).
    pub(crate) fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_record_reads_back_as_the_ops_it_was_built_from() {
        let mut b = RecordBuilder::default();
        b.entries(7, false, &[entry(10, 2, b"ab"), entry(11, 3, b"cde")])
            .unwrap();
        assert!(b.entries(7, false, &[entry(12, 3, b""), entry(14, 3, b"")]).is_err());
        let hard = HardState {
            term: 3,
            vote: 1,
            commit: 9,
            ..Default::default()
        };
        b.hard_state(7, &hard);
        b.compact(7, 8, 2);
        b.reset(9, 100, 5);
        b.checkpoint(9, (100, 5), (101, 5), &hard);
        b.entries(9, true, &[entry(101, 5, b"z")]).unwrap();
        let (bytes, built) = b.finish().unwrap();
        let mut file = segment_header(4).to_vec();
        let at = file.len() as u64;
        file.extend_from_slice(&bytes);
        check_segment_header(&file, 4).unwrap();
        assert!(check_segment_header(&file, 5).is_err());
        let Found::Record { ops, next } = read_record(&file, at) else {
            panic!("not a record")
        };
        assert_eq!(next, file.len() as u64);
        let mut expect = built;
        for op in &mut expect {
            op.rebase(at);
        }
        assert_eq!(ops, expect);
        // The entry locations point at the entry bytes.
        let IndexOp::Entries { entries, .. } = &ops[0] else {
            panic!()
        };
        let e = entries[1];
        let read = Entry::parse_from_bytes(&file[e.offset as usize..][..e.len as usize]).unwrap();
        assert_eq!(read, entry(11, 3, b"cde"));
        assert!(matches!(read_record(&file, next), Found::End));
    }

    #[test]
    fn every_truncation_and_bit_flip_is_torn_or_corrupt_never_a_record() {
        let mut b = RecordBuilder::default();
        b.entries(1, false, &[entry(1, 1, b"payload")]).unwrap();
        b.compact(1, 0, 0);
        let (bytes, _) = b.finish().unwrap();
        for cut in 1..bytes.len() {
            let found = read_record(&bytes[..cut], 0);
            assert!(matches!(found, Found::Torn(_)), "cut at {cut}: {found:?}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let found = read_record(&b, 0);
                assert!(!matches!(found, Found::Record { .. }), "flip {i}.{bit}: {found:?}");
            }
        }
    }
}
