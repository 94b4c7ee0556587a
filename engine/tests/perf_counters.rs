//! RocksDB's per-thread perf counters are off on every thread that applies
//! or reads through the engine (they cost a `__tls_get_addr` per key
//! compare with Debian's shared librocksdb, and nothing reads them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::*;
use rocksdb::perf::{PerfContext, PerfMetric};

/// Runs `f` on a thread of its own, so it starts with RocksDB's default
/// perf level (counting on), as a new worker thread would.
fn on_a_fresh_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().expect("test thread panicked")
}

#[test]
fn applies_and_reads_count_no_key_compares_on_a_thread_that_used_the_engine() {
    let counted = on_a_fresh_thread(|| {
        let mut s = Shard::new();
        // The first apply on this thread turns the counters off.
        assert!(s.one(append("ns", b"warm", b"k0", b"x")).is_ok());
        let mut ctx = PerfContext::default();
        ctx.reset();
        for i in 0..50u32 {
            let key = format!("k{i}");
            let uid = format!("u{}", i % 7);
            assert!(s.one(append("ns", uid.as_bytes(), key.as_bytes(), b"payload")).is_ok());
        }
        let page = s.sync("ns", b"u3", 0);
        assert!(!page.messages.is_empty(), "the reads must have read something");
        ctx.metric(PerfMetric::UserKeyComparisonCount)
    });
    assert_eq!(counted, 0, "RocksDB counted key compares: perf counters are on");
}

#[test]
fn a_thread_that_only_reads_counts_no_key_compares_either() {
    let mut s = Shard::new();
    for i in 0..20u32 {
        assert!(s
            .one(append("ns", b"reader", format!("k{i}").as_bytes(), b"payload"))
            .is_ok());
    }
    let engine = s.engine().clone();
    let counted = on_a_fresh_thread(move || {
        let q = pigeonhole_engine::SyncQuery {
            namespace: "ns",
            user_id: b"reader",
            after_seq: 0,
            max_messages: 0,
            max_bytes: 0,
        };
        // The first read turns the counters off; the second is measured.
        engine.sync(SHARD, &q).unwrap();
        let mut ctx = PerfContext::default();
        ctx.reset();
        let page = engine.sync(SHARD, &q).unwrap();
        assert_eq!(page.messages.len(), 20);
        ctx.metric(PerfMetric::UserKeyComparisonCount)
    });
    assert_eq!(counted, 0, "RocksDB counted key compares: perf counters are on");
}
