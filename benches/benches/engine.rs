//! Engine micro-benchmarks (criterion). Figures and the machine they ran on
//! go in docs/benchmarks.md. They allocate with jemalloc, as the
//! `pigeonhole` server does (D27), so they measure the engine as it ships.
//!
//! - `apply/appends_N/{fsync,nofsync}`: one Raft entry carrying N appends
//!   (256-byte payloads, mailboxes drawn from 10,000), applied in one
//!   WriteBatch. Throughput is in appends. Only the apply is timed, not
//!   building the command.
//! - `sync/100_messages`: a Sync page of 100 messages from a cursor.
//! - `raft/persist_ready_64_shards`: the Ready of 64 shards (one entry of
//!   ~1 KiB and a hard state each) in one WriteBatch with one fsync.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::field_reassign_with_default,
    clippy::cast_possible_truncation
)]

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use pigeonhole_benches::{append_command, fresh_engine, SHARD};
use pigeonhole_engine::raft::eraftpb::{Entry, HardState};
use pigeonhole_engine::{conf_state_with_voters, ApplyEntry, Durability, EntryKind, RaftBatch, SyncQuery};
use rand::{Rng, SeedableRng};
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const MAILBOXES: u64 = 10_000;
const PAYLOAD_BYTES: usize = 256;

fn apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply");
    g.measurement_time(Duration::from_secs(6));
    for durability in [Durability::Fsync, Durability::NoFsync] {
        for n in [1usize, 64, 256] {
            let (_dir, engine) = fresh_engine();
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let mut index = 0u64;
            g.throughput(Throughput::Elements(n as u64));
            let name = if durability == Durability::Fsync {
                "fsync"
            } else {
                "nofsync"
            };
            g.bench_function(BenchmarkId::new(format!("appends_{n}"), name), |b| {
                // Setup runs in order before its batch's routines, so the
                // indexes stay consecutive.
                b.iter_batched(
                    || {
                        index += 1;
                        (index, append_command(&mut rng, index, n, MAILBOXES, PAYLOAD_BYTES))
                    },
                    |(index, bytes)| {
                        let e = ApplyEntry {
                            index,
                            term: 1,
                            kind: EntryKind::Command(&bytes),
                        };
                        engine.apply(SHARD, &[e], durability).unwrap()
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn sync(c: &mut Criterion) {
    let (_dir, engine) = fresh_engine();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    // One mailbox with 2,000 messages.
    for index in 1..=20u64 {
        let bytes = pigeonhole_benches::append_command_to(index, 100, "u-hot", PAYLOAD_BYTES);
        let e = ApplyEntry {
            index,
            term: 1,
            kind: EntryKind::Command(&bytes),
        };
        engine.apply(SHARD, &[e], Durability::NoFsync).unwrap();
    }
    engine.flush().unwrap();
    let mut g = c.benchmark_group("sync");
    g.throughput(Throughput::Elements(100));
    g.bench_function("100_messages", |b| {
        b.iter(|| {
            let after = rng.gen_range(0..1900);
            let q = SyncQuery {
                namespace: "bench",
                user_id: b"u-hot",
                after_seq: after,
                max_messages: 100,
                max_bytes: 0,
            };
            let page = engine.sync(SHARD, &q).unwrap();
            assert_eq!(page.messages.len(), 100);
            page
        })
    });
    g.finish();
}

fn raft_persist(c: &mut Criterion) {
    let (_dir, engine) = fresh_engine();
    let stores: Vec<_> = (100..164u64)
        .map(|s| {
            engine
                .bootstrap_shard(s, conf_state_with_voters(&[1, 2, 3]), 0, 0)
                .unwrap();
            engine.raft_log(s).unwrap()
        })
        .collect();
    let mut index = 0;
    let mut g = c.benchmark_group("raft");
    g.throughput(Throughput::Elements(64));
    g.bench_function("persist_ready_64_shards", |b| {
        b.iter(|| {
            index += 1;
            let mut batch = RaftBatch::default();
            for s in &stores {
                let mut e = Entry::default();
                e.index = index;
                e.term = 1;
                e.data = vec![0xab; 1024].into();
                batch.append(s, &[e]).unwrap();
                let mut hs = HardState::default();
                hs.term = 1;
                hs.commit = index;
                batch.set_hard_state(s, &hs).unwrap();
            }
            engine.write_raft(batch, Durability::Fsync).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, apply, sync, raft_persist);
criterion_main!(benches);
