//! Shard snapshots: export on one engine, ingest on another, and the ways a
//! stream can be wrong or cut short.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::field_reassign_with_default,
    clippy::useless_vec,
    clippy::cast_possible_truncation,
    clippy::type_complexity
)]

mod common;

use common::*;
use pigeonhole_engine::{Engine, EngineError, EngineOptions, ReadError, ShardState, SnapshotChunk, SyncQuery};

fn populated() -> Shard {
    let mut s = Shard::new();
    for i in 0..200u32 {
        let uid = format!("user-{}", i % 17);
        s.one(append(
            "ns",
            uid.as_bytes(),
            &i.to_be_bytes(),
            &vec![u8::try_from(i % 251).unwrap(); 300],
        ))
        .unwrap();
    }
    s.one(ack("ns", b"user-1", b"phone", 3)).unwrap();
    s.one(trim("ns", b"user-2", 4)).unwrap();
    s.one(delete("ns", b"user-3", 2)).unwrap();
    s
}

fn export(s: &Shard, chunk_bytes: usize) -> Vec<SnapshotChunk> {
    let mut chunks = Vec::new();
    s.engine()
        .export_snapshot::<EngineError>(s.id, chunk_bytes, |c| {
            // Round-trip every chunk through its wire encoding.
            chunks.push(SnapshotChunk::decode(&c.encode())?);
            Ok(())
        })
        .unwrap();
    chunks
}

fn all_reads(e: &Engine, shard: u64) -> Vec<String> {
    (0..17)
        .map(|i| {
            let uid = format!("user-{i}");
            let info = e.mailbox_info(shard, "ns", uid.as_bytes()).unwrap();
            let q = SyncQuery {
                namespace: "ns",
                user_id: uid.as_bytes(),
                after_seq: info.low_watermark - 1,
                max_messages: 1000,
                max_bytes: 0,
            };
            let page = e.sync(shard, &q).unwrap();
            let cursors = e.cursors(shard, "ns", uid.as_bytes()).unwrap();
            format!("{info:?} {page:?} {cursors:?}")
        })
        .collect()
}

#[test]
fn export_then_ingest_reproduces_the_shard_exactly() {
    let src = populated();
    let chunks = export(&src, 8 << 10);
    assert!(chunks.len() > 5, "small chunks force a multi-chunk stream");
    assert!(chunks.last().unwrap().last && chunks.iter().filter(|c| c.last).count() == 1);

    // The destination already has different, newer-looking data for the shard.
    let mut dst = Shard::new();
    for i in 0..50u8 {
        dst.one(append("ns", b"stale-user", &[i], b"old")).unwrap();
        // Also a longer history for a mailbox the snapshot holds: its head
        // is now cached in memory at seq 50.
        dst.one(append("ns", b"user-0", &[i, i], b"old")).unwrap();
    }
    let mut ing = dst.engine().ingest_snapshot(dst.id).unwrap();
    let mut summary = None;
    for c in &chunks {
        summary = ing.push(c).unwrap();
    }
    let summary = summary.unwrap();
    assert_eq!(summary.index, src.index);
    assert_eq!(all_reads(src.engine(), src.id), all_reads(dst.engine(), dst.id));
    assert_eq!(
        dst.sync("ns", b"stale-user", 0).last_seq,
        0,
        "old keys of the range are gone"
    );
    let meta = dst.engine().shard_meta(dst.id).unwrap().unwrap();
    assert_eq!((meta.applied_index, meta.state), (src.index, ShardState::Ready));
    // The dedup index came along.
    dst.index = src.index;
    assert!(appended(1, true)(&dst.one(append(
        "ns",
        b"user-0",
        &0u32.to_be_bytes(),
        &[0; 300]
    ))));
    // A new append continues the snapshot's history, not the cached head of
    // the history the ingest replaced.
    let last = src.sync("ns", b"user-0", 0).last_seq;
    assert!(last < 50);
    assert!(appended(last + 1, false)(
        &dst.one(append("ns", b"user-0", b"new", b"new"))
    ));
}

#[test]
fn corrupt_reordered_or_foreign_chunks_are_refused() {
    let src = populated();
    let chunks = export(&src, 8 << 10);
    let mut bytes = chunks[1].encode();
    bytes[40] ^= 1;
    assert!(SnapshotChunk::decode(&bytes)
        .unwrap_err()
        .to_string()
        .contains("checksum"));

    let dst = Shard::new();
    let mut ing = dst.engine().ingest_snapshot(dst.id).unwrap();
    // A second concurrent ingest of the same shard is refused.
    assert!(dst.engine().ingest_snapshot(dst.id).is_err());
    ing.push(&chunks[0]).unwrap();
    assert!(ing.push(&chunks[2]).unwrap_err().to_string().contains("expected 1"));
    let mut other_shard = chunks[1].clone();
    other_shard.shard = 8;
    assert!(ing.push(&other_shard).is_err());
    let mut other_index = chunks[1].clone();
    other_index.index += 1;
    assert!(ing.push(&other_index).is_err());
    // A record whose value was altered (chunk crc recomputed) fails the value's own crc.
    let mut tampered = chunks[1].clone();
    let n = tampered.data.len();
    tampered.data[n - 1] ^= 1;
    assert!(matches!(ing.push(&tampered), Err(EngineError::Corruption { .. })));
}

#[test]
fn an_interrupted_ingest_leaves_a_shard_that_says_so_until_ingested_again() {
    let src = populated();
    let chunks = export(&src, 8 << 10);
    let mut dst = Shard::new();
    dst.one(append("ns", b"user-0", b"x", b"y")).unwrap();
    {
        let mut ing = dst.engine().ingest_snapshot(dst.id).unwrap();
        ing.push(&chunks[0]).unwrap();
        ing.push(&chunks[1]).unwrap();
        // Dropped here: the sender died mid-stream.
    }
    dst.reopen(EngineOptions::default());
    let q = SyncQuery {
        namespace: "ns",
        user_id: b"user-0",
        after_seq: 0,
        max_messages: 0,
        max_bytes: 0,
    };
    assert!(matches!(
        dst.engine().sync(dst.id, &q),
        Err(ReadError::Engine(EngineError::ShardIncomplete(_)))
    ));
    assert!(matches!(
        dst.engine().apply(dst.id, &[], pigeonhole_engine::Durability::NoFsync),
        Err(EngineError::ShardIncomplete(_))
    ));
    assert!(matches!(
        dst.engine().export_snapshot::<EngineError>(dst.id, 1 << 20, |_| Ok(())),
        Err(EngineError::ShardIncomplete(_))
    ));
    let mut ing = dst.engine().ingest_snapshot(dst.id).unwrap();
    for c in &chunks {
        ing.push(c).unwrap();
    }
    assert_eq!(all_reads(src.engine(), src.id), all_reads(dst.engine(), dst.id));
}

#[test]
fn a_stream_without_its_last_chunk_never_completes() {
    let src = populated();
    let chunks = export(&src, 1 << 20);
    assert_eq!(chunks.len(), 1);
    let dst = Shard::new();
    let mut ing = dst.engine().ingest_snapshot(dst.id).unwrap();
    let mut not_last = chunks[0].clone();
    not_last.last = false;
    assert_eq!(ing.push(&not_last).unwrap(), None);
    assert_eq!(
        dst.engine().shard_meta(dst.id).unwrap().unwrap().state,
        ShardState::Ingesting
    );
}
