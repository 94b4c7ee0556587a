//! The record types stored as values, with their encodings. Each record's
//! layout is documented in docs/storage-format.md.

use crate::codec::{Reader, Writer};
use crate::error::EngineError;
use crate::keys::CF_DATA;
use protobuf::Message as _;
use raft::eraftpb::ConfState;

const V1: u8 = 1;

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
        Ok(Writer::with_version(V1, 33 + cs.len())
            .u8(state)
            .u64(self.applied_index)
            .u64(self.applied_term)
            .u64(self.time_ms)
            .u32(u32::try_from(cs.len()).unwrap_or(u32::MAX))
            .bytes(&cs)
            .0)
    }

    pub(crate) fn decode(key: &[u8], body: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(CF_DATA, key, body, V1)?;
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
        r.finish()?;
        Ok(ShardMeta {
            state,
            applied_index,
            applied_term,
            time_ms,
            conf_state,
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
}

impl Default for MailboxMeta {
    fn default() -> Self {
        MailboxMeta {
            last_seq: 0,
            low_watermark: 1,
            cursor_count: 0,
            payload_bytes: 0,
        }
    }
}

impl MailboxMeta {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Writer::with_version(V1, 28)
            .u64(self.last_seq)
            .u64(self.low_watermark)
            .u32(self.cursor_count)
            .u64(self.payload_bytes)
            .0
    }
    pub(crate) fn decode(key: &[u8], body: &[u8]) -> Result<Self, EngineError> {
        let mut r = Reader::new(CF_DATA, key, body, V1)?;
        let m = MailboxMeta {
            last_seq: r.u64()?,
            low_watermark: r.u64()?,
            cursor_count: r.u32()?,
            payload_bytes: r.u64()?,
        };
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

/// The (empty) body of a dedup expiry index entry.
pub(crate) fn encode_expiry_marker() -> Vec<u8> {
    vec![V1]
}

pub(crate) fn check_expiry_marker(key: &[u8], body: &[u8]) -> Result<(), EngineError> {
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
