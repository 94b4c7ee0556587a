//! Reading the Raft log's records back (the format is in `record.rs`):
//! one record at an offset, the scan recovery makes past a bad spot for
//! records a fsync made durable, and decoding a body into index ops.
//! Apart from building records because only recovery and the tests read
//! whole segments; the append path only builds.

use super::{
    record_crc, EntryLoc, IndexOp, BODY_VERSION, ENTRY_HEADER_BYTES, RECORD_BODY_BYTES_MAX, RECORD_HEADER_BYTES,
    TAG_CHECKPOINT, TAG_COMPACT, TAG_ENTRIES, TAG_HARD_STATE, TAG_RESET, TAG_REWRITE,
};
use raft::eraftpb::HardState;

/// What [`read_record`] found at an offset.
#[derive(Debug)]
pub(crate) enum Found {
    /// A whole record: its index ops (offsets from the file's start) and
    /// where the next record starts.
    Record { ops: Vec<IndexOp>, next: u64 },
    /// The end of the data: no bytes left, or zeros where a header would be.
    End,
    /// Bytes that are not a whole, intact record (a torn write or damage).
    Torn(String),
    /// A record whose crc matches but whose body does not decode: never a
    /// torn write, always damage or a bug.
    Corrupt(String),
}

/// Reads the record starting at `offset` of `file` (a whole segment).
pub(crate) fn read_record(file: &[u8], offset: u64) -> Found {
    let Ok(start) = usize::try_from(offset) else {
        return Found::Torn("offset beyond memory".into());
    };
    let Some(rest) = file.get(start..) else {
        return Found::Torn(format!("offset {offset} is beyond the file"));
    };
    if rest.is_empty() {
        return Found::End;
    }
    let Some((head, after)) = rest.split_first_chunk::<8>() else {
        return Found::Torn(format!("{} bytes are too short for a record header", rest.len()));
    };
    if head == &[0u8; 8] {
        return Found::End;
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if u64::from(len) > RECORD_BODY_BYTES_MAX {
        return Found::Torn(format!("record length {len} is over the limit"));
    }
    let Some(body) = after.get(..len as usize) else {
        return Found::Torn(format!("record of {len} bytes runs past the end of the file"));
    };
    if record_crc(len, body) != crc {
        return Found::Torn("record checksum mismatch".into());
    }
    match decode_body(body, offset + RECORD_HEADER_BYTES) {
        Ok(ops) => Found::Record {
            ops,
            next: offset + RECORD_HEADER_BYTES + u64::from(len),
        },
        Err(e) => Found::Corrupt(e),
    }
}

/// Bytes `durable_record_after` may hash in one scan, at most: past it
/// the scan gives up and answers `true` (damage), the safe side.
const SCAN_HASH_BYTES_MAX: u64 = 256 << 20;

/// Whether a record that must have been made durable starts after
/// `offset` of `file`: an intact record (plausible body start, a length
/// that fits, a matching crc) for which `durable(ops)` says so, or one
/// whose crc matches but whose body does not decode.
///
/// Why: every record is one group commit, written after the previous
/// fsync (or, for a commit-only write, with no fsync at all), so bytes
/// after a bad spot are, in a power cut, what is left of the unsynced
/// writes: their pages reach the disk in any order, a later one torn in
/// after an earlier one lost (found by the Jepsen harness's lost-write
/// file system, issue 16). Commit-only records may stand whole after such
/// a hole; the caller's `durable` tells those from records whose fsync
/// made the bad spot durable too (then the bad spot is damage).
///
/// Cost: candidates must start a body (version byte, a plausible op
/// count, a known first tag) before their crc is computed, and the bytes
/// hashed are bounded (`SCAN_HASH_BYTES_MAX`).
pub(crate) fn durable_record_after(file: &[u8], offset: u64, mut durable: impl FnMut(&[IndexOp]) -> bool) -> bool {
    let end = scan_after(file, offset, |p, body| {
        match decode_body(body, p as u64 + RECORD_HEADER_BYTES) {
            // A commit-only record of the unsynced tail: look on.
            Ok(ops) if !durable(&ops) => Step::SkipRecord,
            _ => Step::Found,
        }
    });
    !matches!(end, ScanEnd::End)
}

/// What a scan does at an intact record (a plausible header, a matching
/// crc) it met.
enum Step {
    /// Stop here.
    Found,
    /// Go on after this record.
    SkipRecord,
    /// Go on at the next byte.
    Next,
}

/// How a scan ended.
enum ScanEnd {
    Found(u64),
    /// It hashed `SCAN_HASH_BYTES_MAX` without an answer.
    Limit,
    End,
}

/// Walks `file` from the byte after `offset`, calling `at` with the offset
/// and body of every intact record it meets (bodies are prefiltered by
/// `plausible_record`, so hashing is not done at every byte).
fn scan_after(file: &[u8], offset: u64, mut at: impl FnMut(usize, &[u8]) -> Step) -> ScanEnd {
    let Ok(start) = usize::try_from(offset) else {
        return ScanEnd::Limit;
    };
    let mut hashed = 0u64;
    let mut p = start.saturating_add(1);
    while let Some(head) = file.get(p..).and_then(|r| r.first_chunk::<8>()) {
        if let Some((len, body)) = plausible_record(file, p, head) {
            hashed += u64::from(len);
            if hashed > SCAN_HASH_BYTES_MAX {
                return ScanEnd::Limit;
            }
            if record_crc(len, body) == u32::from_be_bytes([head[4], head[5], head[6], head[7]]) {
                match at(p, body) {
                    Step::Found => return ScanEnd::Found(p as u64),
                    Step::SkipRecord => {
                        p += 8 + body.len();
                        continue;
                    }
                    Step::Next => {}
                }
            }
        }
        p += 1;
    }
    ScanEnd::End
}

/// The body of the record whose header `head` starts at `p`, if it looks
/// like one: a length that fits the file and the limit, and a body that
/// starts with the version, a plausible op count and a known tag. The
/// prefilter that keeps a scan from hashing at every byte.
fn plausible_record<'a>(file: &'a [u8], p: usize, head: &[u8; 8]) -> Option<(u32, &'a [u8])> {
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if u64::from(len) > RECORD_BODY_BYTES_MAX {
        return None;
    }
    let body = usize::try_from(len)
        .ok()
        .and_then(|n| file.get(p.saturating_add(8)..p.saturating_add(8).saturating_add(n)))?;
    let ops = body
        .get(1..5)
        .and_then(|c| <[u8; 4]>::try_from(c).ok())
        .map_or(0, u32::from_be_bytes);
    let ok = body.first() == Some(&BODY_VERSION)
        && ops >= 1
        && u64::from(ops) <= u64::from(len) / 9
        && body.get(5).is_some_and(|t| (1..=6).contains(t));
    ok.then_some((len, body))
}

/// Where the first whole, intact record after a bad spot at `offset`
/// starts (a plausible header, a matching crc, a body that decodes), if
/// any: where recovery of a damaged segment picks up again (salvage,
/// §8.5). Hashes at most `SCAN_HASH_BYTES_MAX`, then gives up (`None`:
/// the rest of the segment is skipped, the safe side, since every shard
/// that loses entries by it is found and caught up from its peers).
pub(crate) fn next_record_after(file: &[u8], offset: u64) -> Option<u64> {
    match scan_after(file, offset, |p, body| {
        match decode_body(body, p as u64 + RECORD_HEADER_BYTES) {
            Ok(_) => Step::Found,
            Err(_) => Step::Next,
        }
    }) {
        ScanEnd::Found(p) => Some(p),
        ScanEnd::Limit | ScanEnd::End => None,
    }
}

struct Reader<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let s = self
            .body
            .get(self.pos..end)
            .ok_or_else(|| format!("body ends at {} inside a field at {}", self.body.len(), self.pos))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?.first().copied().unwrap_or_default())
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().map_err(|_| "short u32")?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().map_err(|_| "short u64")?))
    }
    fn hard(&mut self) -> Result<HardState, String> {
        Ok(HardState {
            term: self.u64()?,
            vote: self.u64()?,
            commit: self.u64()?,
            ..Default::default()
        })
    }
}

/// Decodes a record body whose first byte is at `base` in its file. Never
/// panics and never allocates more than the body's size justifies: the
/// bytes are untrusted (fuzzed through `decoders::raft_log_record`).
pub(crate) fn decode_body(body: &[u8], base: u64) -> Result<Vec<IndexOp>, String> {
    let mut r = Reader { body, pos: 0 };
    let version = r.u8()?;
    if version != BODY_VERSION {
        return Err(format!("record body version {version} is not {BODY_VERSION}"));
    }
    let count = r.u32()?;
    // The smallest op is 25 bytes; a count the body cannot hold is damage.
    if u64::from(count) * 25 > body.len() as u64 {
        return Err(format!("{count} ops cannot fit in a body of {} bytes", body.len()));
    }
    let mut ops = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let tag = r.u8()?;
        let shard = r.u64()?;
        let op = match tag {
            TAG_ENTRIES | TAG_REWRITE => {
                let first = r.u64()?;
                let n = r.u32()?;
                if u64::from(n) * ENTRY_HEADER_BYTES > (body.len() - r.pos) as u64 {
                    return Err(format!("{n} entries cannot fit in what is left of the body"));
                }
                let mut entries = Vec::with_capacity(n as usize);
                for i in 0..u64::from(n) {
                    let term = r.u64()?;
                    let len = r.u32()?;
                    let offset = base + r.pos as u64;
                    r.take(len as usize)?;
                    let index = first.checked_add(i).ok_or("entry index overflows")?;
                    entries.push(EntryLoc {
                        index,
                        term,
                        offset,
                        len,
                    });
                }
                IndexOp::Entries {
                    shard,
                    first,
                    entries,
                    rewrite: tag == TAG_REWRITE,
                }
            }
            TAG_HARD_STATE => IndexOp::HardState { shard, hard: r.hard()? },
            TAG_COMPACT => IndexOp::Compact {
                shard,
                index: r.u64()?,
                term: r.u64()?,
            },
            TAG_RESET => IndexOp::Reset {
                shard,
                index: r.u64()?,
                term: r.u64()?,
            },
            TAG_CHECKPOINT => IndexOp::Checkpoint {
                shard,
                truncated: (r.u64()?, r.u64()?),
                last: (r.u64()?, r.u64()?),
                hard: r.hard()?,
            },
            other => return Err(format!("unknown op tag {other}")),
        };
        ops.push(op);
    }
    if r.pos != body.len() {
        return Err(format!("{} bytes left over after {count} ops", body.len() - r.pos));
    }
    Ok(ops)
}
