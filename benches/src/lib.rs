//! Helpers shared by Pigeonhole's criterion suites: a fresh engine with one
//! bootstrapped shard, and generators of append commands; [`report`],
//! the table and plots of `phbench report`; and [`procstat`], the /proc
//! readings `phbench` reports with a run.

pub mod procstat;
pub mod report;

use pigeonhole_engine::command::{op, AppendOp, Command, Op};
use pigeonhole_engine::{conf_state_with_voters, Engine, EngineOptions};
use prost::Message as _;
use rand::Rng;

/// The shard the benches use.
pub const SHARD: u64 = 1;

/// An engine in a fresh temp dir with [`SHARD`] bootstrapped.
///
/// # Panics
/// If the temp dir or the engine cannot be created (a benchmark cannot run then).
#[allow(clippy::expect_used)]
pub fn fresh_engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = Engine::open(dir.path(), EngineOptions::default()).expect("open engine");
    engine
        .bootstrap_shard(SHARD, conf_state_with_voters(&[1]), 0, 0)
        .expect("bootstrap");
    (dir, engine)
}

/// Random bytes: payloads are end-to-end encrypted, so a benchmark whose
/// payloads compress would flatter RocksDB's block compression.
pub fn incompressible(bytes: usize) -> Vec<u8> {
    let mut v = vec![0; bytes];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut v);
    v
}

fn append_op(user: &str, key: Vec<u8>, payload_bytes: usize) -> Op {
    Op {
        op: Some(op::Op::Append(AppendOp {
            namespace: "bench".into(),
            user_id: user.as_bytes().to_vec(),
            idempotency_key: key,
            payload: incompressible(payload_bytes).into(),
            expected_last_seq: None,
        })),
    }
}

/// An encoded command of `n` appends to mailboxes drawn from `mailboxes`,
/// with unique idempotency keys (`index` must differ per call).
pub fn append_command(rng: &mut impl Rng, index: u64, n: usize, mailboxes: u64, payload_bytes: usize) -> bytes::Bytes {
    let ops = (0..n)
        .map(|i| {
            let user = format!("user-{}", rng.gen_range(0..mailboxes));
            append_op(&user, format!("{index}/{i}").into_bytes(), payload_bytes)
        })
        .collect();
    Command { time_ms: index, ops }.encode_to_vec().into()
}

/// An encoded command of `n` appends to one mailbox.
pub fn append_command_to(index: u64, n: usize, user: &str, payload_bytes: usize) -> bytes::Bytes {
    let ops = (0..n)
        .map(|i| append_op(user, format!("{index}/{i}").into_bytes(), payload_bytes))
        .collect();
    Command { time_ms: index, ops }.encode_to_vec().into()
}
