//! Shared helpers for the engine's integration tests: a one-shard engine in a
//! temp dir and builders for commands.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use pigeonhole_engine::command::{op, AckOp, AppendOp, Command, DeleteOp, ExpireDedupOp, Op, TrimOp};
use pigeonhole_engine::{
    conf_state_with_voters, ApplyEntry, Durability, Engine, EngineOptions, EntryKind, EntryOutcome, OpError, OpOutput,
    SyncPage, SyncQuery,
};
use prost::Message as _;
use tempfile::TempDir;

pub const SHARD: u64 = 7;

pub struct Shard {
    /// None only inside `reopen`.
    db: Option<Engine>,
    pub id: u64,
    pub index: u64,
    pub time_ms: u64,
    pub dir: TempDir,
}

impl Shard {
    pub fn new() -> Self {
        Self::with_options(EngineOptions::default())
    }

    pub fn with_options(opts: EngineOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), opts).unwrap();
        engine
            .bootstrap_shard(SHARD, conf_state_with_voters(&[1]), 0, 0)
            .unwrap();
        Shard {
            db: Some(engine),
            id: SHARD,
            index: 0,
            time_ms: 1_000,
            dir,
        }
    }

    pub fn engine(&self) -> &Engine {
        self.db.as_ref().unwrap()
    }

    /// Closes the engine (a test then opens the directory itself).
    #[allow(dead_code)]
    pub fn close(&mut self) {
        self.db = None;
    }

    /// Closes and reopens the engine on the same directory.
    pub fn reopen(&mut self, opts: EngineOptions) {
        // Close the old handle first: RocksDB holds a lock on the directory.
        self.db = None;
        self.db = Some(Engine::open(self.dir.path(), opts).unwrap());
    }

    /// Closes the engine, runs `f` (which may open the directory itself),
    /// then reopens the engine.
    pub fn reopen_with<T>(&mut self, f: impl FnOnce() -> T) -> T {
        self.db = None;
        let out = f();
        self.db = Some(Engine::open(self.dir.path(), EngineOptions::default()).unwrap());
        out
    }

    /// Applies one entry carrying `ops` at the next index and returns its results.
    pub fn exec(&mut self, ops: Vec<Op>) -> Vec<Result<OpOutput, OpError>> {
        self.index += 1;
        apply_ops(self.engine(), self.id, self.index, self.time_ms, ops)
    }

    pub fn one(&mut self, op: Op) -> Result<OpOutput, OpError> {
        self.exec(vec![op]).pop().unwrap()
    }

    pub fn sync(&self, ns: &str, uid: &[u8], after: u64) -> SyncPage {
        self.engine()
            .sync(
                self.id,
                &SyncQuery {
                    namespace: ns,
                    user_id: uid,
                    after_seq: after,
                    max_messages: 0,
                    max_bytes: 0,
                },
            )
            .unwrap()
    }
}

/// Applies one entry (term 1) carrying `ops` at `index` of `shard` and
/// returns the ops' results.
pub fn apply_ops(
    engine: &Engine,
    shard: u64,
    index: u64,
    time_ms: u64,
    ops: Vec<Op>,
) -> Vec<Result<OpOutput, OpError>> {
    let bytes = encode(time_ms, ops);
    let out = engine
        .apply(
            shard,
            &[ApplyEntry {
                index,
                term: 1,
                kind: EntryKind::Command(&bytes),
            }],
            Durability::NoFsync,
        )
        .unwrap();
    match out.into_iter().next().unwrap() {
        EntryOutcome::Command { results, .. } => results,
        other => panic!("unexpected outcome {other:?}"),
    }
}

/// The encoded command, as the Raft entry's `data` (a `Bytes`) holds it.
pub fn encode(time_ms: u64, ops: Vec<Op>) -> bytes::Bytes {
    Command { time_ms, ops }.encode_to_vec().into()
}

pub fn append(ns: &str, uid: &[u8], key: &[u8], payload: &[u8]) -> Op {
    Op {
        op: Some(op::Op::Append(AppendOp {
            namespace: ns.into(),
            user_id: uid.to_vec(),
            idempotency_key: key.to_vec(),
            payload: payload.to_vec().into(),
            expected_last_seq: None,
        })),
    }
}

pub fn append_if(ns: &str, uid: &[u8], key: &[u8], payload: &[u8], expected: u64) -> Op {
    let mut o = append(ns, uid, key, payload);
    if let Some(op::Op::Append(a)) = &mut o.op {
        a.expected_last_seq = Some(expected);
    }
    o
}

pub fn ack(ns: &str, uid: &[u8], device: &[u8], seq: u64) -> Op {
    Op {
        op: Some(op::Op::Ack(AckOp {
            namespace: ns.into(),
            user_id: uid.to_vec(),
            device_id: device.to_vec(),
            seq,
        })),
    }
}

pub fn trim(ns: &str, uid: &[u8], up_to_seq: u64) -> Op {
    Op {
        op: Some(op::Op::Trim(TrimOp {
            namespace: ns.into(),
            user_id: uid.to_vec(),
            up_to_seq,
            dedup_window_ms: 0,
        })),
    }
}

pub fn delete(ns: &str, uid: &[u8], seq: u64) -> Op {
    Op {
        op: Some(op::Op::Delete(DeleteOp {
            namespace: ns.into(),
            user_id: uid.to_vec(),
            seq,
            dedup_window_ms: 0,
        })),
    }
}

pub fn expire(max_entries: u32) -> Op {
    Op {
        op: Some(op::Op::ExpireDedup(ExpireDedupOp { max_entries })),
    }
}

/// A retention op with no policy (it visits and trims nothing), for
/// argument checks.
pub fn retain(ns: &str, from_mailbox: &[u8], mailboxes_max: u32, messages_max: u32) -> Op {
    Op {
        op: Some(op::Op::Retain(pigeonhole_engine::command::RetainOp {
            namespace: ns.into(),
            from_mailbox: from_mailbox.to_vec(),
            mailboxes_max,
            messages_max,
            ..Default::default()
        })),
    }
}

pub fn appended(seq: u64, duplicate: bool) -> impl Fn(&Result<OpOutput, OpError>) -> bool {
    move |r| matches!(r, Ok(OpOutput::Appended { seq: s, duplicate: d, .. }) if *s == seq && *d == duplicate)
}

/// Runs `child_test`, an ignored test of this same test binary, with the
/// environment variable `env` set to `dir`; lets it run for `run`, then
/// SIGKILLs it (through kill(1): std cannot send SIGKILL and `unsafe` is
/// forbidden) and returns every line it printed. libtest prints
/// "test <name> ... " before the child's first line, on that same line;
/// the prefix is cut off.
#[allow(dead_code)]
pub fn run_child_then_sigkill(
    child_test: &str,
    env: &str,
    dir: &std::path::Path,
    run: std::time::Duration,
) -> Vec<String> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child_test, "--ignored", "--nocapture", "--test-threads=1"])
        .env(env, dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let prefix = format!("test {child_test} ... ");
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .map(|l| l.strip_prefix(&prefix).map(str::to_string).unwrap_or(l))
            .collect::<Vec<_>>()
    });
    std::thread::sleep(run);
    let killed = std::process::Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    child.wait().unwrap();
    reader.join().unwrap()
}
