//! The record types stored as values, with their encodings. Each record's
//! layout is documented in docs/storage-format.md.

use crate::codec::{Reader, Writer};
use crate::error::EngineError;
use crate::keys::CF_DATA;
use protobuf::Message as _;
use raft::eraftpb::ConfState;

const V1: u8 = 1;
const V2: u8 = 2;

/// Whether a shard's data may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardState {
    /// Complete and consistent at its applied index.
    Ready,
    /// A snapshot ingest started and has not finished.
    Ingesting,
}

/// Per-shard apply state: `data` CF, key `shard | 0x00`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardMeta {
    /// See [`ShardState`].
    pub state: ShardState,
    /// The last Raft index whose effects are in the state machine.
    pub applied_index: u64,
    /// The term of that entry.
    pub applied_term: u64,
    /// The shard's clock: the max of every applied command's `time_ms`.
    pub time_ms: u64,
    /// The Raft configuration as of `applied_index`.
    pub conf_state: ConfState,
    /// Where the shard's rows live: the id that prefixes its data keys
    /// (`space | tag | ...`). A shard's own id, except for a shard made by a
    /// split in place, which keeps its parent's space (D38): the split
    /// copies nothing. A V1 record has no field; its space is the shard id.
    pub space: u64,
    /// The user hashes whose mailboxes the shard holds, `[start, end)`,
    /// `end: None` meaning through `u64::MAX`. Only the mailboxes in it
    /// are the shard's; rows of a shared space outside it belong to another
    /// shard. The full range unless the shard was split (V1: full).
    pub range: HashRange,
}

/// A half-open range of user hashes, `[start, end)`; `end: None` includes
/// `u64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashRange {
    pub start: u64,
    pub end: Option<u64>,
}

impl HashRange {
    /// Every hash.
    pub const FULL: HashRange = HashRange { start: 0, end: None };

    /// Whether `hash` is in the range.
    pub fn contains(&self, hash: u64) -> bool {
        hash >= self.start && self.end.is_none_or(|e| hash < e)
    }

    /// Whether the range covers every hash.
    pub fn is_full(&self) -> bool {
        *self == HashRange::FULL
    }

    /// Cuts the range at `at`: `[start, at)` and `[at, end)`, both
    /// non-empty, or None if `at` is not strictly inside.
    pub fn split_at(&self, at: u64) -> Option<(HashRange, HashRange)> {
        if at <= self.start || self.end.is_some_and(|e| at >= e) {
            return None;
        }
        Some((
            HashRange {
                start: self.start,
                end: Some(at),
            },
            HashRange {
                start: at,
                end: self.end,
            },
        ))
    }
}

impl std::fmt::Display for HashRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.end {
            Some(e) => write!(f, "[{:#018x}, {e:#018x})", self.start),
            None => write!(f, "[{:#018x}, end]", self.start),
        }
    }
}

impl ShardMeta {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, EngineError> {
        let cs = self
            .conf_state
            .write_to_bytes()
            .map_err(|e| EngineError::InvalidCall(format!("conf state does not encode: {e}")))?;
        let state = match self.state {
            ShardState::Ready => 0,
            ShardState::Ingesting => 1,
        };
        Ok(Writer::with_version(V2, 58 + cs.len())
            .u8(state)
            .u64(self.applied_index)
            .u64(self.applied_term)
            .u64(self.time_ms)
            .u32(u32::try_from(cs.len()).unwrap_or(u32::MAX))
            .bytes(&cs)
            .u64(self.space)
            .u64(self.range.start)
            .u8(u8::from(self.range.end.is_some()))
            .u64(self.range.end.unwrap_or(0))
            .0)
    }

    /// The apply state of a new, empty shard of its own space (bootstrap,
    /// and the marker an ingest starts with).
    pub(crate) fn new_own(shard: u64, state: ShardState) -> ShardMeta {
        ShardMeta {
            state,
            applied_index: 0,
            applied_term: 0,
            time_ms: 0,
            conf_state: ConfState::default(),
            space: shard,
            range: HashRange::FULL,
        }
    }

    pub(crate) fn decode(key: &[u8], body: &[u8]) -> Result<Self, EngineError> {
        let (mut r, version) = Reader::versioned(CF_DATA, key, body, &[V1, V2])?;
        let state = match r.u8()? {
            0 => ShardState::Ready,
            1 => ShardState::Ingesting,
            s => return Err(r.err(format!("unknown shard state {s}"))),
        };
        let applied_index = r.u64()?;
        let applied_term = r.u64()?;
        let time_ms = r.u64()?;
        let cs_len = r.u32()?;
        let cs_bytes = r.take(usize::try_from(cs_len).map_err(|_| r.err("conf state length".into()))?)?;
        let conf_state = ConfState::parse_from_bytes(cs_bytes).map_err(|e| r.err(format!("conf state: {e}")))?;
        let (space, range) = if version == V1 {
            // Written before splits existed: the shard's own id and rows.
            let shard = key
                .first_chunk::<8>()
                .map(|b| u64::from_be_bytes(*b))
                .ok_or_else(|| r.err("shard meta key without a shard id".into()))?;
            (shard, HashRange::FULL)
        } else {
            let space = r.u64()?;
            let start = r.u64()?;
            let has_end = r.u8()?;
            let end = r.u64()?;
            let end = match has_end {
                0 => None,
                1 => Some(end),
                x => return Err(r.err(format!("bad range end flag {x}"))),
            };
            if end.is_some_and(|e| e <= start) {
                return Err(r.err(format!("empty hash range [{start}, {end:?})")));
            }
            (space, HashRange { start, end })
        };
        r.finish()?;
        Ok(ShardMeta {
            state,
            applied_index,
            applied_term,
            time_ms,
            conf_state,
            space,
            range,
        })
    }
}

/// Per-mailbox counters: `data` CF, key `shard | 0x01 | mb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxMeta {
    /// Highest seq ever assigned; 0 for an empty mailbox.
    pub last_seq: u64,
    /// Lowest seq still stored (trimmed through `low_watermark - 1`).
    pub low_watermark: u64,
    /// Number of device cursors.
    pub cursor_count: u32,
    /// Sum of the payload sizes of the stored, non-deleted messages.
    pub payload_bytes: u64,
    /// Under a legal hold (D43): Trim and Delete are refused, retention
    /// passes the mailbox over.
    pub held: bool,
}

impl Default for MailboxMeta {
    fn default() -> Self {
        MailboxMeta {
            last_seq: 0,
            low_watermark: 1,
            cursor_count: 0,
            payload_bytes: 0,
            held: false,
        }
    }
}

impl MailboxMeta {
    /// V1 (28 bytes) unless the mailbox is held; a held one is V2, V1's
    /// fields and a flags byte (bit 0: held). So a directory with no hold
    /// has the bytes format 2 wrote.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let w = Writer::with_version(if self.held { V2 } else { V1 }, 29)
            .u64(self.last_seq)
            .u64(self.low_watermark)
            .u32(self.cursor_count)
            .u64(self.payload_bytes);
        if self.held {
            w.u8(MAILBOX_HELD).0
        } else {
            w.0
        }
    }
    pub(crate) fn decode(key: &[u8], body: &[u8]) -> Result<Self, EngineError> {
        let (mut r, version) = Reader::versioned(CF_DATA, key, body, &[V1, V2])?;
        let mut m = MailboxMeta {
            last_seq: r.u64()?,
            low_watermark: r.u64()?,
            cursor_count: r.u32()?,
            payload_bytes: r.u64()?,
            held: false,
        };
        if version == V2 {
            let flags = r.u8()?;
            if flags != MAILBOX_HELD {
                return Err(r.err(format!("mailbox flags 0x{flags:02x}: only 0x01 (held) is defined")));
            }
            m.held = true;
        }
        if m.low_watermark == 0 || m.low_watermark > m.last_seq.saturating_add(1) {
            return Err(r.err(format!(
                "low_watermark {} outside [1, last_seq + 1 = {}]",
                m.low_watermark,
                m.last_seq.saturating_add(1)
            )));
        }
        r.finish()?;
        Ok(m)
    }
}

const FLAG_DELETED: u8 = 1;
/// `MailboxMeta` V2's flags byte: the mailbox is under a legal hold.
const MAILBOX_HELD: u8 = 1;

/// Dedup entry: `data` CF, key `shard | 0x03 | mb | idempotency_key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupEntry {
    /// The seq the key was first appended as.
    pub seq: u64,
    /// Commit time of that append.
    pub time_ms: u64,
    /// crc32 of the original payload, to refuse a reused key with new content.
    pub payload_crc: u32,
    /// 0 while the message is stored; otherwise the shard time at which the
    /// entry stops deduplicating (trim or delete time + dedup window).
    pub expires_ms: u64,
}

impl DedupEntry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Writer::with_version(V1, 28)
            .u64(self.seq)
            .u64(self.time_ms)
            .u32(self.payload_crc)
            .u64(self.expires_ms)
            .0
    }
    pub(crate) fn decode(key: &[u8], body: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(CF_DATA, key, body, V1)?;
        let d = DedupEntry {
            seq: r.u64()?,
            time_ms: r.u64()?,
            payload_crc: r.u32()?,
            expires_ms: r.u64()?,
        };
        r.finish()?;
        Ok(d)
    }
    /// Whether the entry still deduplicates at shard time `now_ms`.
    pub(crate) fn live_at(&self, now_ms: u64) -> bool {
        self.expires_ms == 0 || self.expires_ms > now_ms
    }
}

/// A device cursor: `data` CF, key `shard | 0x04 | mb | device_id`.
pub(crate) fn encode_cursor(seq: u64) -> Vec<u8> {
    Writer::with_version(V1, 8).u64(seq).0
}

pub(crate) fn decode_cursor(key: &[u8], body: &[u8]) -> Result<u64, EngineError> {
    let mut r = Reader::new(CF_DATA, key, body, V1)?;
    let seq = r.u64()?;
    r.finish()?;
    Ok(seq)
}

/// The (empty) body of an index entry whose key says everything: the
/// dedup expiry index (`05`) and the mailbox directory (`07`).
pub(crate) fn encode_marker() -> Vec<u8> {
    vec![V1]
}

pub(crate) fn check_marker(key: &[u8], body: &[u8]) -> Result<(), EngineError> {
    Reader::new(CF_DATA, key, body, V1)?.finish()
}

/// The compacted prefix of a shard's Raft log (in memory; on disk it is the
/// log's Compact, Reset and Checkpoint ops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogState {
    /// Entries up to and including this index are gone (compacted or
    /// covered by a snapshot). The first stored entry is `truncated_index + 1`.
    pub truncated_index: u64,
    /// The term of the entry at `truncated_index`.
    pub truncated_term: u64,
}

/// One stored message or tombstone (`data` CF, key
/// `shard | 0x02 | mb | seq`), borrowed both ways: decoded without copying
/// its payload, and encoded from borrowed parts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MessageView<'a> {
    pub time_ms: u64,
    pub idempotency_key: &'a [u8],
    pub payload: &'a [u8],
    pub deleted: bool,
}

impl<'a> MessageView<'a> {
    /// The record body, built from borrowed parts: apply encodes a new
    /// message straight from the decoded command, without copying the
    /// payload into an owned record first.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let flags = if self.deleted { FLAG_DELETED } else { 0 };
        Writer::with_version(V1, 10 + self.idempotency_key.len() + self.payload.len())
            .u8(flags)
            .u64(self.time_ms)
            .u8(u8::try_from(self.idempotency_key.len()).unwrap_or(u8::MAX))
            .bytes(self.idempotency_key)
            .bytes(self.payload)
            .0
    }

    pub(crate) fn decode(key: &'a [u8], body: &'a [u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(CF_DATA, key, body, V1)?;
        let flags = r.u8()?;
        if flags & !FLAG_DELETED != 0 {
            return Err(r.err(format!("unknown message flags {flags:#x}")));
        }
        let time_ms = r.u64()?;
        let key_len = r.u8()?;
        let idempotency_key = r.take(usize::from(key_len))?;
        let payload = r.rest();
        let deleted = flags & FLAG_DELETED != 0;
        if deleted && !payload.is_empty() {
            return Err(r.err("tombstone with a payload".into()));
        }
        Ok(MessageView {
            time_ms,
            idempotency_key,
            payload,
            deleted,
        })
    }
}

/// Longest system key.
pub const SYSTEM_KEY_BYTES_MAX: usize = 256;
const SYSTEM_VERSION: u8 = 1;

/// A system value: `format:u8 version:u64 value`.
pub(crate) fn encode_system(version: u64, value: &[u8]) -> Vec<u8> {
    Writer::with_version(SYSTEM_VERSION, 8 + value.len())
        .u64(version)
        .bytes(value)
        .0
}

pub(crate) fn decode_system(key: &[u8], body: &[u8]) -> Result<(u64, Vec<u8>), EngineError> {
    let mut r = Reader::new(CF_DATA, key, body, SYSTEM_VERSION)?;
    let version = r.u64()?;
    Ok((version, r.rest().to_vec()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::{codec, keys};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
    }

    /// The Ingesting marker of shard 7 as storage-format.md §7.1 shows it.
    #[test]
    fn the_documented_marker_bytes_are_what_the_engine_writes() {
        let key = keys::shard_meta(7);
        let value = codec::seal(&key, &ShardMeta::new_own(7, ShardState::Ingesting).encode().unwrap());
        assert_eq!(hex(&key), "00 00 00 00 00 00 00 07 00");
        assert_eq!(
            hex(&value),
            "9a 55 99 f8 02 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 \
             00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"
        );
        assert_eq!(value.len(), 59);
    }

    /// A record written before splits (version 1) reads as its shard's own
    /// space over every hash; version 2 round-trips space and range.
    #[test]
    fn version_1_records_are_their_own_space_and_version_2_round_trips() {
        let key = keys::shard_meta(7);
        let mut v1 = vec![1u8, 0];
        v1.extend_from_slice(&42u64.to_be_bytes());
        v1.extend_from_slice(&3u64.to_be_bytes());
        v1.extend_from_slice(&9u64.to_be_bytes());
        v1.extend_from_slice(&0u32.to_be_bytes());
        let m = ShardMeta::decode(&key, &v1).unwrap();
        assert_eq!((m.applied_index, m.applied_term, m.time_ms), (42, 3, 9));
        assert_eq!((m.space, m.range), (7, HashRange::FULL));
        let m2 = ShardMeta {
            space: 5,
            range: HashRange {
                start: 10,
                end: Some(20),
            },
            ..m.clone()
        };
        assert_eq!(ShardMeta::decode(&key, &m2.encode().unwrap()).unwrap(), m2);
        let open = ShardMeta {
            range: HashRange { start: 10, end: None },
            ..m2.clone()
        };
        assert_eq!(ShardMeta::decode(&key, &open.encode().unwrap()).unwrap(), open);
        // An empty range, or a bad flag, is corruption.
        let mut bad = m2.encode().unwrap();
        let n = bad.len();
        bad[n - 9] = 2;
        assert!(ShardMeta::decode(&key, &bad).is_err());
        let empty = ShardMeta {
            range: HashRange {
                start: 20,
                end: Some(20),
            },
            ..m2
        };
        assert!(ShardMeta::decode(&key, &empty.encode().unwrap()).is_err());
    }

    #[test]
    fn ranges_split_only_strictly_inside() {
        let r = HashRange {
            start: 10,
            end: Some(20),
        };
        assert_eq!(r.split_at(10), None);
        assert_eq!(r.split_at(20), None);
        let (lo, hi) = r.split_at(15).unwrap();
        assert_eq!(
            (lo, hi),
            (
                HashRange {
                    start: 10,
                    end: Some(15)
                },
                HashRange {
                    start: 15,
                    end: Some(20)
                }
            )
        );
        assert!(lo.contains(14) && !lo.contains(15) && hi.contains(15) && !hi.contains(20));
        let (_, top) = HashRange::FULL.split_at(u64::MAX).unwrap();
        assert!(top.contains(u64::MAX) && !top.is_full());
    }
}
