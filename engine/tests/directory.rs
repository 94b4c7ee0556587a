//! The mailbox directory (D43): retention steps through a namespace's
//! mailboxes by the directory (`shard | 07 | mb`), which an append enters
//! a mailbox into. Data written before the directory existed gets one two
//! ways, and both must list exactly the mailboxes that ever had a message,
//! as appends would have: the format 2 → 3 conversion at open, and a
//! snapshot ingest from a sender whose stream carries no directory keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_engine::command::{op, Op, RetainOp};
use pigeonhole_engine::keys::CF_DATA;
use pigeonhole_engine::{EngineError, OpOutput, SnapshotChunk};

const DIRECTORY_TAG: u8 = 0x07;

/// `a` has messages, `b` had two and was trimmed empty, `c` has only a
/// cursor and `d` only a hold (neither ever had a message).
fn populated() -> Shard {
    let mut s = Shard::new();
    for i in 0..3u8 {
        assert!(appended(u64::from(i) + 1, false)(&s.one(append("t", b"a", &[i], b"x"))));
    }
    for i in 0..2u8 {
        assert!(appended(u64::from(i) + 1, false)(&s.one(append("t", b"b", &[i], b"x"))));
    }
    s.one(trim("t", b"b", 2)).unwrap();
    s.one(ack("t", b"c", b"phone", 0)).unwrap();
    s.one(Op {
        op: Some(op::Op::Hold(pigeonhole_engine::command::HoldOp {
            namespace: "t".into(),
            user_id: b"d".to_vec(),
            held: true,
        })),
    })
    .unwrap();
    s
}

/// Keeps one message per mailbox: (mailboxes visited, messages removed).
fn keep_one(s: &mut Shard) -> (u64, u64) {
    let op = Op {
        op: Some(op::Op::Retain(RetainOp {
            namespace: "t".into(),
            messages_per_mailbox_max: 1,
            mailboxes_max: 1_000,
            messages_max: 10_000,
            ..Default::default()
        })),
    };
    match s.one(op) {
        Ok(OpOutput::Retained {
            mailboxes,
            removed,
            next: None,
        }) => (mailboxes, removed),
        other => panic!("{other:?}"),
    }
}

fn is_directory_key(k: &[u8]) -> bool {
    k.get(8) == Some(&DIRECTORY_TAG)
}

#[test]
fn converting_a_format_2_directory_lists_the_mailboxes_appends_would_have() {
    let mut s = populated();
    let path = s.dir.path().to_path_buf();
    // Make it what a format-2 build wrote: no directory keys, version 2.
    let removed = s.reopen_with(|| {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, ["default", "raft", CF_DATA]).unwrap();
        let cf = db.cf_handle(CF_DATA).unwrap();
        let dir: Vec<Vec<u8>> = db
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .map(|r| r.unwrap().0.to_vec())
            .filter(|k| is_directory_key(k))
            .collect();
        for k in &dir {
            db.delete_cf(cf, k).unwrap();
        }
        let key = b"pigeonhole/format_version";
        let body = 2u32.to_be_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(key);
        crc.update(&body);
        let value = [crc.finalize().to_be_bytes().as_slice(), &body].concat();
        db.put_cf(db.cf_handle("default").unwrap(), key, value).unwrap();
        dir.len()
    });
    assert_eq!(removed, 2, "a and b were in the directory, c and d never were");
    // a and b are listed again: a trimmed to its last message, b visited.
    assert_eq!(keep_one(&mut s), (2, 2));
    // Converted once: the next open finds format 3.
    s.reopen(pigeonhole_engine::EngineOptions::default());
    assert_eq!(keep_one(&mut s), (2, 0));
}

#[test]
fn an_ingest_of_a_stream_without_directory_keys_enters_its_mailboxes() {
    let src = populated();
    let mut chunks = Vec::new();
    src.engine()
        .export_snapshot::<EngineError>(src.id, 1 << 20, |c| {
            chunks.push(c);
            Ok(())
        })
        .unwrap();
    // What a sender predating the directory streams: the same, without it.
    let mut stripped = 0;
    for c in &mut chunks {
        let (mut rest, mut data, mut records) = (c.data.as_slice(), Vec::new(), 0u32);
        while !rest.is_empty() {
            let (kl, r) = rest.split_at(4);
            let (k, r) = r.split_at(u32::from_be_bytes(kl.try_into().unwrap()) as usize);
            let (vl, r) = r.split_at(4);
            let (v, r) = r.split_at(u32::from_be_bytes(vl.try_into().unwrap()) as usize);
            rest = r;
            if is_directory_key(k) {
                stripped += 1;
                continue;
            }
            for f in [kl, k, vl, v] {
                data.extend_from_slice(f);
            }
            records += 1;
        }
        *c = SnapshotChunk {
            data,
            records,
            ..c.clone()
        };
    }
    assert_eq!(stripped, 2);
    let mut dst = Shard::new();
    let mut ing = dst.engine().ingest_snapshot(dst.id).unwrap();
    for c in &chunks {
        ing.push(c).unwrap();
    }
    drop(ing);
    dst.index = src.index;
    assert_eq!(keep_one(&mut dst), (2, 2));
}
