//! How much memory a node needs per mailbox: one engine (one node's
//! storage) with `--shards` shards receives appends to `--mailboxes`
//! distinct mailboxes, one message each, through the state machine's
//! apply, in batches of `--batch` appends per shard entry. Every
//! `--report-every` mailboxes it prints the process's resident memory
//! (VmRSS), its peak (VmHWM) and the mailbox heads held in memory, so the
//! bound on the head cache and RocksDB's own memory can be checked against
//! issue 12's budget (10 M mailboxes within 2 GiB of resident memory).
//!
//!   cargo run --profile bench -p pigeonhole-benches --bin mailbox-memory -- --mailboxes 10000000
//!
//! Applies without fsync (what the node does: its Raft log is the durable
//! copy), so the run measures memory, not the disk.

use pigeonhole_engine::command::{op, AppendOp, Command, Op};
use pigeonhole_engine::{conf_state_with_voters, ApplyEntry, Durability, Engine, EngineOptions, EntryKind};
use prost::Message as _;
use std::time::Instant;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn memory_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mailboxes = arg("--mailboxes", 10_000_000);
    let shards = arg("--shards", 64).max(1);
    let batch = arg("--batch", 256).max(1);
    let report_every = arg("--report-every", 1_000_000).max(1);
    let payload_bytes = usize::try_from(arg("--payload-bytes", 256))?;
    let dir = tempfile::tempdir()?;
    let engine = Engine::open(dir.path(), EngineOptions::default())?;
    for s in 1..=shards {
        engine.bootstrap_shard(s, conf_state_with_voters(&[1]), 0, 0)?;
    }
    let payload: Vec<u8> = (0..payload_bytes).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
    let mut index = vec![0u64; usize::try_from(shards)?];
    let started = Instant::now();
    let mut done = 0u64;
    println!("mailboxes,elapsed_s,rss_mib,hwm_mib,heads_cached");
    while done < mailboxes {
        // One entry of `batch` appends, each to a new mailbox, on the next
        // shard (mailboxes are spread over shards as placement spreads users).
        let shard = done / batch % shards + 1;
        let slot = usize::try_from(shard - 1)?;
        let ops: Vec<Op> = (done..(done + batch).min(mailboxes))
            .map(|u| Op {
                op: Some(op::Op::Append(AppendOp {
                    namespace: "memory".into(),
                    user_id: format!("user-{u}").into_bytes(),
                    idempotency_key: b"k".to_vec(),
                    payload: payload.clone().into(),
                    expected_last_seq: None,
                })),
            })
            .collect();
        let n = u64::try_from(ops.len())?;
        let bytes: bytes::Bytes = Command { time_ms: done, ops }.encode_to_vec().into();
        let i = index.get_mut(slot).ok_or("shard index")?;
        *i += 1;
        engine.apply(
            shard,
            &[ApplyEntry {
                index: *i,
                term: 1,
                kind: EntryKind::Command(&bytes),
            }],
            Durability::NoFsync,
        )?;
        let before = done;
        done += n;
        if done / report_every != before / report_every || done == mailboxes {
            let (rss, hwm) = memory_mib();
            println!(
                "{done},{:.0},{rss},{hwm},{}",
                started.elapsed().as_secs_f64(),
                engine.heads_cached()
            );
        }
    }
    Ok(())
}
