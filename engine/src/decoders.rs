//! Every decoder of bytes the engine reads back from its own files, in one
//! place, run exactly as the read paths run them (checksum first, then the
//! record body).
//!
//! Why it exists: stored bytes are untrusted too (a torn write, a flipped
//! bit, an operator's mistake), so each decoder must return a typed
//! [`EngineError`] for ANY input, never panic and never allocate without
//! bound. The fuzz targets (`fuzz/`, `phfuzz`) drive these functions with
//! arbitrary and mutated bytes; [`seal`] lets them build values whose
//! checksum passes, so the record bodies behind it get fuzzed as well.

use crate::codec;
use crate::error::EngineError;
use crate::keys::CF_DATA;
use crate::records::{
    check_marker, decode_cursor, decode_system, encode_cursor, encode_marker, encode_system, DedupEntry, MailboxMeta,
    MessageView, ShardMeta, ShardState,
};
use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};

/// Frames `body` as the engine stores it under `key` (checksum + body).
pub fn seal(key: &[u8], body: &[u8]) -> Vec<u8> {
    codec::seal(key, body)
}

/// Decodes `value`, read from the data column family under `key`, as every
/// record type the data column family holds; one result per type.
pub fn data_value(key: &[u8], value: &[u8]) -> Vec<Result<(), EngineError>> {
    let body = match codec::open(CF_DATA, key, value) {
        Ok(b) => b,
        Err(e) => return vec![Err(e)],
    };
    vec![
        ShardMeta::decode(key, body).map(drop),
        MailboxMeta::decode(key, body).map(drop),
        MessageView::decode(key, body).map(drop),
        DedupEntry::decode(key, body).map(drop),
        decode_cursor(key, body).map(drop),
        check_marker(key, body),
        decode_system(key, body).map(drop),
    ]
}

/// Decodes `bytes` as a Raft log record (the bytes after a segment header,
/// `raftlog::record`): once as a whole framed record (length, crc, body,
/// then each entry's protobuf) and once as a bare body, so that mutated
/// bodies reach the body decoder past the crc. One result per path.
pub fn raft_log_record(bytes: &[u8]) -> Vec<Result<(), EngineError>> {
    use crate::raftlog::record::{decode_body, read_record, Found, IndexOp};
    let corrupt = |reason: String| crate::raftlog::files::log_corruption(reason);
    let framed = match read_record(bytes, 0) {
        Found::Record { ops, .. } => ops.iter().try_for_each(|op| match op {
            IndexOp::Entries { entries, .. } => entries.iter().try_for_each(|e| {
                let at = usize::try_from(e.offset).map_err(|_| corrupt("offset".into()))?;
                let b = bytes
                    .get(at..at.saturating_add(e.len as usize))
                    .ok_or_else(|| corrupt("entry out of bounds".into()))?;
                Entry::parse_from_bytes(b).map(drop).map_err(|e| corrupt(e.to_string()))
            }),
            _ => Ok(()),
        }),
        Found::End => Err(corrupt("no record".into())),
        Found::Torn(w) | Found::Corrupt(w) => Err(corrupt(w)),
    };
    vec![framed, decode_body(bytes, 0).map(drop).map_err(corrupt)]
}

/// One valid body of every data-column-family record type, as written by
/// the engine: seeds for the fuzz targets.
pub fn sample_data_bodies() -> Vec<Vec<u8>> {
    let meta = ShardMeta {
        state: ShardState::Ready,
        applied_index: 42,
        applied_term: 3,
        time_ms: 1_700_000_000_000,
        conf_state: crate::conf_state_with_voters(&[1, 2, 3]),
        space: 7,
        range: crate::records::HashRange {
            start: 1 << 62,
            end: Some(1 << 63),
        },
    };
    let message = MessageView {
        time_ms: 1_700_000_000_000,
        idempotency_key: b"key-1",
        payload: b"an encrypted payload",
        deleted: false,
    };
    let dedup = DedupEntry {
        seq: 7,
        time_ms: 1_700_000_000_000,
        payload_crc: 0xdead_beef,
        expires_ms: 0,
    };
    let mailbox = MailboxMeta {
        last_seq: 9,
        low_watermark: 3,
        cursor_count: 2,
        payload_bytes: 1_234,
        held: false,
    };
    let held = MailboxMeta { held: true, ..mailbox };
    let mut out = vec![
        mailbox.encode(),
        held.encode(),
        message.encode(),
        dedup.encode(),
        encode_cursor(5),
        encode_marker(),
        encode_system(4, b"a shard record"),
    ];
    out.extend(meta.encode().ok());
    out
}

/// One valid Raft log record holding every op type: a seed for the fuzz
/// targets.
pub fn sample_raft_log_records() -> Vec<Vec<u8>> {
    let entry = Entry {
        index: 12,
        term: 2,
        data: b"a command".to_vec().into(),
        context: vec![0; 16].into(),
        ..Default::default()
    };
    let hs = HardState {
        term: 2,
        vote: 1,
        commit: 11,
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut rec = crate::raftlog::record::RecordBuilder::default();
    if rec.entries(4, false, &[entry]).is_err() {
        return out;
    }
    rec.hard_state(4, &hs);
    rec.compact(4, 5, 1);
    rec.reset(5, 7, 1);
    rec.checkpoint(6, (5, 1), (12, 2), &hs);
    out.extend(rec.finish().ok().map(|(b, _)| b));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_decodes_and_a_torn_one_is_corruption() {
        let body = crate::records::MailboxMeta::default().encode();
        let v = seal(b"k", &body);
        assert!(data_value(b"k", &v).get(1).is_some_and(Result::is_ok));
        let torn = &v[..v.len() - 1];
        assert!(matches!(
            data_value(b"k", torn).as_slice(),
            [Err(EngineError::Corruption { .. })]
        ));
        assert!(raft_log_record(&[]).iter().all(Result::is_err));
    }

    #[test]
    fn every_sample_body_decodes_as_some_record_type() {
        for body in sample_data_bodies() {
            let v = seal(b"k", &body);
            assert!(data_value(b"k", &v).iter().any(Result::is_ok), "{body:?}");
        }
        for rec in sample_raft_log_records() {
            assert!(raft_log_record(&rec).first().is_some_and(Result::is_ok), "{rec:?}");
        }
    }
}
