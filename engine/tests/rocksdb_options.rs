//! The data column family's LSM shape, read back from the OPTIONS file
//! RocksDB writes at every open: what the database actually runs with,
//! not what our code meant to set. D57 chose these values by measuring
//! the steady state (compaction CPU and bytes written per append); a
//! change to them should be a measured decision too, so this test names
//! them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use pigeonhole_engine::{Engine, EngineOptions};

/// The `key=value` lines of the newest OPTIONS file's section for column
/// family `cf`.
fn cf_options(dir: &std::path::Path, cf: &str) -> Vec<(String, String)> {
    let newest = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("OPTIONS-"))
        .max_by_key(|n| n.trim_start_matches("OPTIONS-").parse::<u64>().unwrap_or(0))
        .expect("RocksDB writes an OPTIONS file at open");
    let text = std::fs::read_to_string(dir.join(newest)).unwrap();
    let header = format!("[CFOptions \"{cf}\"]");
    let mut lines = text.lines().skip_while(|l| l.trim() != header);
    assert!(lines.next().is_some(), "no section {header}");
    lines
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter_map(|l| l.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn value(opts: &[(String, String)], key: &str) -> String {
    opts.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {key} in the section"))
}

#[test]
fn the_data_cf_compacts_eight_l0_files_into_16_mib_l1_files() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    let data = cf_options(dir.path(), "data");
    assert_eq!(value(&data, "level0_file_num_compaction_trigger"), "8");
    assert_eq!(value(&data, "target_file_size_base"), (16u64 << 20).to_string());
    // Payloads are ciphertext: the data CF does not compress (engine.rs).
    assert_eq!(value(&data, "compression"), "kNoCompression");
    // The small column families keep RocksDB's defaults.
    let meta = cf_options(dir.path(), pigeonhole_engine::keys::CF_META);
    assert_eq!(value(&meta, "level0_file_num_compaction_trigger"), "4");
    drop(engine);
}

/// The size checker waits for a flush it sees coming before it scans
/// (D63), so what it reads of the memtables must follow writes and
/// flushes.
#[test]
fn the_data_memtables_follow_writes_and_a_flush() {
    let mut s = common::Shard::with_options(EngineOptions::default());
    let before = s.engine().data_memtables().unwrap();
    assert_eq!(
        before.active_bytes_max,
        u64::try_from(EngineOptions::default().write_buffer_bytes).unwrap()
    );
    for i in 0..100 {
        s.one(common::append("ns", b"u", format!("k{i}").as_bytes(), &[7; 256]))
            .unwrap();
    }
    let held = s.engine().data_memtables().unwrap();
    // Each append writes at least its message and its dedup entry, and
    // the message's 256 bytes.
    assert!(held.entries >= before.entries + 200, "{before:?} -> {held:?}");
    assert!(
        held.active_bytes >= before.active_bytes + 100 * 256,
        "{before:?} -> {held:?}"
    );
    assert_eq!(held.immutable_entries, 0, "{held:?}");
    s.engine().flush_data().unwrap();
    let after = s.engine().data_memtables().unwrap();
    assert_eq!((after.entries, after.immutable_entries), (0, 0), "{after:?}");
    assert!(after.active_bytes < held.active_bytes, "{held:?} -> {after:?}");
}
