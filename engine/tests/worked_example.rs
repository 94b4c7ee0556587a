//! docs/storage-format.md §13, "Worked example", checked byte for byte: the
//! append it describes is applied, and the rows it lists are read back raw
//! from the `data` column family with RocksDB itself, not through the
//! engine. The document is the format's reference (an operator's tool, a
//! recovery script or another implementation reads it), so its example
//! must be what the code writes; a change of the format that forgets the
//! document turns this test red.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_engine::{EngineOptions, OpOutput};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Applies §13's append (shard 7, namespace "ns", user "u", key "k",
/// payload "hi", shard time 1000) to a new engine, flushes, closes it, and
/// returns a read-only RocksDB handle on its directory.
fn the_example(opts: EngineOptions) -> (Shard, rocksdb::DB) {
    let mut s = Shard::with_options(opts);
    assert_eq!((s.id, s.time_ms), (7, 1_000), "§13 runs on shard 7 at time 1000");
    match s.one(append("ns", b"u", b"k", b"hi")) {
        Ok(OpOutput::Appended {
            seq: 1,
            duplicate: false,
            time_ms: 1_000,
        }) => {}
        other => panic!("§13's append returns seq 1 at time 1000, got {other:?}"),
    }
    // The data CF is written without the WAL (D26): flush so the rows are
    // in SST files a plain RocksDB open finds.
    s.engine().flush().unwrap();
    s.close();
    let db = rocksdb::DB::open_cf_for_read_only(
        &rocksdb::Options::default(),
        s.dir.path(),
        ["default", "raft", "data"],
        false,
    )
    .unwrap();
    (s, db)
}

fn raw(db: &rocksdb::DB, key: &[u8]) -> Option<Vec<u8>> {
    db.get_cf(db.cf_handle("data").unwrap(), key).unwrap()
}

#[test]
fn the_worked_example_is_what_an_append_writes() {
    let (_s, db) = the_example(EngineOptions::default());
    // Message key and its stored value (crc | version | flags | time | key | payload).
    let message_key = hex("00 00 00 00 00 00 00 07 02 02 6e 73 00 01 75 00 00 00 00 00 00 00 01");
    assert_eq!(message_key.len(), 23);
    assert_eq!(
        raw(&db, &message_key),
        Some(hex("e4 eb 8b 93 01 00 00 00 00 00 00 00 03 e8 01 6b 68 69"))
    );
    // Dedup entry.
    assert_eq!(
        raw(&db, &hex("00 00 00 00 00 00 00 07 03 02 6e 73 00 01 75 6b")),
        Some(hex(
            "00593606 01 0000000000000001 00000000000003e8 d8932aac 0000000000000000"
        ))
    );
    // Directory key: the mailbox's first message.
    assert_eq!(
        raw(&db, &hex("00 00 00 00 00 00 00 07 07 02 6e 73 00 01 75")),
        Some(hex("bd 81 1d 8b 01"))
    );
    // No head row at seq 1 with the default head_row_every_appends (32).
    assert_eq!(raw(&db, &hex("00 00 00 00 00 00 00 07 01 02 6e 73 00 01 75")), None);
}

#[test]
fn with_a_head_row_every_append_the_examples_head_row_is_written() {
    let (_s, db) = the_example(EngineOptions {
        head_row_every_appends: 1,
        ..EngineOptions::default()
    });
    assert_eq!(
        raw(&db, &hex("00 00 00 00 00 00 00 07 01 02 6e 73 00 01 75")),
        Some(hex(
            "21b0a865 01 0000000000000001 0000000000000001 00000000 0000000000000002"
        ))
    );
}
