//! The apply workers: a fixed pool of threads per node (`apply_threads`,
//! sized to the machine) that write committed entries into the state
//! machine, answer the callers on this node from the results, wake the
//! readers of the mailboxes that changed, and report back to the driver how
//! far each shard is applied.
//!
//! Each shard belongs to one worker ([`worker_of`]: its id modulo the pool's
//! size), so a shard's entries are applied by one thread in hand-off order
//! (the engine refuses an entry that skips an index), while different shards
//! apply in parallel: the engine locks per shard, and RocksDB merges the
//! workers' concurrent writes into one write group. One worker per node, as
//! on a 2-vCPU machine, is the pool of one that D29 measured (D64).
//!
//! Why a thread of its own (etcd's apply goroutine, TiKV's apply pool): an
//! apply of a few hundred appends takes milliseconds of CPU inside RocksDB's
//! memtable. On the driver thread, that time sits between one group commit
//! and the next: no Ready is collected, nothing is persisted or sent. Here,
//! the driver persists and replicates the next batch while this thread
//! applies the previous one.
//!
//! What stays on the driver, and why:
//! - raft-rs's conf-change apply (`RawNode::apply_conf_change`): RawNode is
//!   the driver's alone. The driver feeds each conf change to raft-rs when it
//!   hands the entry over, in log order, and sends the resulting
//!   configuration along; this thread writes it to the shard's state.
//! - raft-rs's applied index: moved by the driver when this thread reports
//!   (`RawNode::advance_apply_to`), so everything keyed on it (read release,
//!   log compaction, the flush that bounds compaction, hibernation) sees only
//!   what the state machine really holds.
//!
//! A worker never waits for the driver: tasks come in on an unbounded
//! channel and reports go out on another, so neither side can block the
//! other into a deadlock. The driver bounds what is in flight instead
//! ([`APPLY_LAG_BYTES_MAX`]).

use super::ms_since;
use super::replica::{Part, Pending};
use crate::error::ClusterError;
use crate::watch::Watchers;
use crossbeam_channel::{Receiver, Sender};
use pigeonhole_engine::raft::eraftpb::{ConfState, Entry, EntryType};
use pigeonhole_engine::{ApplyEntry, Durability, Engine, EngineError, EntryKind, EntryOutcome, OpOutput};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Entry bytes handed to the worker and not yet reported applied, at most.
/// Past it the driver waits for reports before it goes on: it bounds the
/// memory committed entries hold between commit and apply, and it slows a
/// leader's intake to what apply keeps up with. One task larger than this
/// (one entry may be up to 64 MiB) still goes through, alone.
pub(super) const APPLY_LAG_BYTES_MAX: u64 = 64 << 20;

/// Tasks the worker merges into one engine write, at most: one WriteBatch
/// for what several driver turns committed, when apply falls behind.
const TASKS_PER_WRITE_MAX: usize = 16;

/// One shard's share of a task: consecutive committed entries.
pub(super) struct ShardWork {
    pub(super) shard: u64,
    pub(super) entries: Vec<Entry>,
    /// The configuration each conf-change entry produced, by entry index,
    /// as raft-rs computed it at hand-off.
    pub(super) confs: Vec<(u64, ConfState)>,
    /// Proposals of this node these entries carry: (entry index, callers).
    /// (A conf change's caller is answered by the driver instead, once
    /// raft-rs has the change applied too, so the caller's next change is
    /// not refused as "still being applied".)
    pub(super) pending: Vec<(u64, Pending)>,
}

impl ShardWork {
    pub(super) fn new(shard: u64) -> ShardWork {
        ShardWork {
            shard,
            entries: Vec::new(),
            confs: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn append(&mut self, more: ShardWork) {
        self.entries.extend(more.entries);
        self.confs.extend(more.confs);
        self.pending.extend(more.pending);
    }
}

/// What one driver turn hands over: at most one `ShardWork` per shard.
pub(super) struct ApplyTask {
    pub(super) shards: Vec<ShardWork>,
    pub(super) bytes: u64,
}

/// What the worker tells the driver.
pub(super) enum ApplyReport {
    /// These shards are applied up to these indexes (the writes are in the
    /// state machine, visible to reads); `bytes` of lag are gone.
    Applied {
        shards: Vec<(u64, u64)>,
        bytes: u64,
        /// Splits applied that made their new shard here (D38).
        splits: Vec<super::split::SplitMade>,
    },
    /// The engine failed: nothing of this write landed and the worker has
    /// stopped. Fatal for the node, as it was when apply ran on the driver.
    Failed(EngineError),
}

/// One worker of the pool: its task channel and its thread.
struct Worker {
    tx: Option<Sender<ApplyTask>>,
    thread: Option<JoinHandle<()>>,
}

/// The worker that applies `shard`'s entries in a pool of `workers`: the
/// same one for the shard's whole life, so its entries keep their order.
pub(super) fn worker_of(shard: u64, workers: usize) -> usize {
    let workers = u64::try_from(workers.max(1)).unwrap_or(1);
    usize::try_from(shard % workers).unwrap_or(0)
}

/// The driver's handle on the pool.
pub(super) struct Applier {
    workers: Vec<Worker>,
    /// Every worker's reports, on one channel.
    pub(super) reports: Receiver<ApplyReport>,
    /// Entry bytes handed over and not yet reported.
    pub(super) lag_bytes: u64,
}

impl Applier {
    /// Starts `threads` workers (at least one).
    /// `name` names the threads: `apply-<name>`, or `apply-<name>-<i>`
    /// with more than one.
    pub(super) fn spawn(
        name: &str,
        threads: usize,
        engine: &Engine,
        watchers: &Arc<Watchers>,
    ) -> Result<Applier, ClusterError> {
        let (report_tx, reports) = crossbeam_channel::unbounded();
        let threads = threads.max(1);
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (tx, rx) = crossbeam_channel::unbounded();
            let (engine, watchers, report_tx) = (engine.clone(), Arc::clone(watchers), report_tx.clone());
            // One worker keeps the name profiles and docs have always shown.
            let name = if threads == 1 {
                format!("apply-{name}")
            } else {
                format!("apply-{name}-{i}")
            };
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || run(&engine, &watchers, &rx, &report_tx))
                .map_err(ClusterError::Io)?;
            workers.push(Worker {
                tx: Some(tx),
                thread: Some(thread),
            });
        }
        Ok(Applier {
            workers,
            reports,
            lag_bytes: 0,
        })
    }

    /// Hands a task over: each shard's share to the worker that owns the
    /// shard ([`worker_of`]), as one task per worker.
    pub(super) fn submit(&mut self, task: ApplyTask) -> Result<(), ClusterError> {
        let n = self.workers.len();
        let mut parts: Vec<ApplyTask> = if n == 1 {
            vec![task]
        } else {
            let mut parts: Vec<ApplyTask> = (0..n)
                .map(|_| ApplyTask {
                    shards: Vec::new(),
                    bytes: 0,
                })
                .collect();
            for w in task.shards {
                let bytes: u64 = w.entries.iter().map(|e| e.data.len() as u64).sum();
                if let Some(part) = parts.get_mut(worker_of(w.shard, n)) {
                    part.bytes = part.bytes.saturating_add(bytes);
                    part.shards.push(w);
                }
            }
            parts
        };
        for (worker, part) in self.workers.iter().zip(parts.drain(..)) {
            if part.shards.is_empty() {
                continue;
            }
            let bytes = part.bytes;
            let sent = worker.tx.as_ref().is_some_and(|tx| tx.send(part).is_ok());
            if !sent {
                return Err(ClusterError::Raft("an apply worker has stopped".into()));
            }
            self.lag_bytes = self.lag_bytes.saturating_add(bytes);
        }
        Ok(())
    }

    /// Lets every worker finish what it was handed, then waits for them.
    /// Their callers are answered from those applies; reports are left
    /// unread.
    pub(super) fn stop(&mut self) {
        for w in &mut self.workers {
            w.tx = None;
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Applier {
    /// The thread must not outlive the engine it writes to.
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(engine: &Engine, watchers: &Watchers, rx: &Receiver<ApplyTask>, reports: &Sender<ApplyReport>) {
    while let Ok(first) = rx.recv() {
        let mut tasks = vec![first];
        while tasks.len() < TASKS_PER_WRITE_MAX {
            let Ok(t) = rx.try_recv() else { break };
            tasks.push(t);
        }
        let bytes = tasks.iter().map(|t| t.bytes).sum();
        let report = match apply(engine, watchers, merge(tasks)) {
            Ok((shards, splits)) => ApplyReport::Applied { shards, bytes, splits },
            Err(e) => ApplyReport::Failed(e),
        };
        let failed = matches!(report, ApplyReport::Failed(_));
        if reports.send(report).is_err() || failed {
            return;
        }
    }
}

/// Several tasks as one: each shard once, its entries in hand-off order.
fn merge(tasks: Vec<ApplyTask>) -> Vec<ShardWork> {
    let mut by_shard: BTreeMap<u64, ShardWork> = BTreeMap::new();
    for t in tasks {
        for w in t.shards {
            match by_shard.get_mut(&w.shard) {
                Some(have) => have.append(w),
                None => {
                    by_shard.insert(w.shard, w);
                }
            }
        }
    }
    by_shard.into_values().collect()
}

/// What one write applied: each shard's last applied index, and the splits.
type Applied = (Vec<(u64, u64)>, Vec<super::split::SplitMade>);

/// Applies every shard's entries in ONE engine write, answers the callers,
/// wakes the readers. Returns each shard's last applied index, and the
/// splits that made a new shard here.
fn apply(engine: &Engine, watchers: &Watchers, work: Vec<ShardWork>) -> Result<Applied, EngineError> {
    let mut batches = Vec::with_capacity(work.len());
    for w in &work {
        let mut batch = Vec::with_capacity(w.entries.len());
        for e in &w.entries {
            let kind = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => EntryKind::Empty,
                EntryType::EntryNormal => EntryKind::Command(&e.data),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let cs = w.confs.iter().find(|(i, _)| *i == e.index).map(|(_, cs)| cs.clone());
                    EntryKind::ConfChange(cs.ok_or_else(|| {
                        EngineError::InvalidCall(format!(
                            "shard {} entry {}: a conf change handed over without its configuration",
                            w.shard, e.index
                        ))
                    })?)
                }
            };
            batch.push(ApplyEntry {
                index: e.index,
                term: e.term,
                kind,
            });
        }
        batches.push((w.shard, batch));
    }
    let refs: Vec<(u64, &[ApplyEntry<'_>])> = batches.iter().map(|(s, b)| (*s, b.as_slice())).collect();
    // The Raft log is durable, so the apply need not be: after a crash the
    // unflushed applies are replayed from the log (D26).
    let outcomes = engine.apply_many(&refs, Durability::NoFsync)?;
    drop(refs);
    drop(batches);
    let mut applied = Vec::with_capacity(work.len());
    let mut splits = Vec::new();
    let (mut entries_applied, mut dedup_hits) = (0usize, 0u64);
    for (w, outcomes) in work.into_iter().zip(outcomes) {
        let mut pending = w.pending.into_iter().peekable();
        entries_applied += w.entries.len();
        for (e, outcome) in w.entries.iter().zip(outcomes) {
            if let EntryOutcome::Command { changed, results, .. } = &outcome {
                watchers.mailboxes_changed(changed);
                for r in results {
                    if let Ok(OpOutput::Appended { duplicate: true, .. }) = r {
                        dedup_hits += 1;
                    }
                    if let Ok(OpOutput::Split {
                        new_shard,
                        range,
                        created: true,
                    }) = r
                    {
                        splits.push(super::split::SplitMade {
                            parent: w.shard,
                            child: *new_shard,
                            range: *range,
                        });
                    }
                }
            }
            // Both in log order: a walk, not a search.
            while pending.peek().is_some_and(|(i, _)| *i < e.index) {
                pending.next();
            }
            if let Some((_, p)) = pending.next_if(|(i, _)| *i == e.index) {
                answer(p, outcome);
            }
        }
        if let Some(last) = w.entries.last() {
            applied.push((w.shard, last.index));
        }
    }
    crate::metrics::applied(entries_applied, dedup_hits);
    Ok((applied, splits))
}

pub(super) fn answer(p: Pending, outcome: EntryOutcome) {
    match outcome {
        EntryOutcome::Command { results, .. } => {
            let mut it = results.into_iter();
            for part in p.parts {
                part.stamp(crate::stages::Stage::Applied);
                let _ = part.reply.send(Ok(it.by_ref().take(part.ops).collect()));
            }
        }
        EntryOutcome::Rejected(e) => {
            for part in p.parts {
                part.stamp(crate::stages::Stage::Applied);
                let _ = part.reply.send(Ok(vec![Err(e.clone()); part.ops]));
            }
        }
        // Applied before (via a snapshot): the results are not known here.
        EntryOutcome::AlreadyApplied | EntryOutcome::Applied => {
            for Part { reply, .. } in p.parts {
                let _ = reply.send(Err(ClusterError::Timeout {
                    shard: p.shard,
                    what: "proposal (applied by snapshot, result unknown)",
                    waited_ms: ms_since(p.proposed_at),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pigeonhole_engine::command as cmd;
    use pigeonhole_engine::{conf_state_with_voters, EngineOptions, OpError, OpOutput};
    use prost::Message as _;
    use std::time::{Duration, Instant};
    use tokio::sync::oneshot;

    const SHARD: u64 = 3;

    fn engine() -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path().join("db"), EngineOptions::default()).unwrap();
        engine
            .bootstrap_shard(SHARD, conf_state_with_voters(&[1]), 0, 0)
            .unwrap();
        (dir, engine)
    }

    fn append_entry(index: u64, key: &str) -> Entry {
        let op = cmd::Op {
            op: Some(cmd::op::Op::Append(cmd::AppendOp {
                namespace: "ns".into(),
                user_id: b"u".to_vec(),
                idempotency_key: key.as_bytes().to_vec(),
                payload: b"payload".to_vec().into(),
                expected_last_seq: None,
            })),
        };
        let data = cmd::Command {
            time_ms: 1,
            ops: vec![op],
        }
        .encode_to_vec();
        Entry {
            index,
            term: 1,
            data: data.into(),
            ..Default::default()
        }
    }

    fn task(entries: Vec<Entry>, pending: Vec<(u64, Pending)>) -> ApplyTask {
        let bytes = entries.iter().map(|e| e.data.len() as u64).sum();
        let mut w = ShardWork::new(SHARD);
        w.entries = entries;
        w.pending = pending;
        ApplyTask { shards: vec![w], bytes }
    }

    fn next_report(a: &Applier) -> ApplyReport {
        a.reports.recv_timeout(Duration::from_secs(10)).expect("a report")
    }

    #[test]
    fn the_worker_applies_in_order_answers_callers_and_reports_how_far_it_got() {
        let (_dir, engine) = engine();
        let mut a = Applier::spawn("1", 1, &engine, &Arc::new(Watchers::default())).unwrap();
        let (p2, mut rx2) = pending(&[1]);
        let (p3, mut rx3) = pending(&[1]);
        a.submit(task(vec![append_entry(1, "a"), append_entry(2, "b")], vec![(2, p2)]))
            .unwrap();
        a.submit(task(vec![append_entry(3, "a")], vec![(3, p3)])).unwrap();
        let mut applied = 0;
        let mut lag = a.lag_bytes;
        assert!(lag > 0);
        while applied < 3 {
            match next_report(&a) {
                ApplyReport::Applied { shards, bytes, .. } => {
                    assert_eq!(shards.len(), 1, "{shards:?}");
                    assert_eq!(shards[0].0, SHARD);
                    assert!(shards[0].1 > applied, "reports only move forward");
                    applied = shards[0].1;
                    lag -= bytes;
                }
                ApplyReport::Failed(e) => panic!("{e}"),
            }
        }
        assert_eq!(lag, 0, "every byte handed over is reported");
        let seq = |rx: &mut Rx| match rx.try_recv().unwrap().unwrap().remove(0) {
            Ok(OpOutput::Appended { seq, duplicate, .. }) => (seq, duplicate),
            other => panic!("{other:?}"),
        };
        assert_eq!(seq(&mut rx2[0]), (2, false));
        assert_eq!(
            seq(&mut rx3[0]),
            (1, true),
            "the retry of key a gets the first seq back"
        );
        assert_eq!(engine.shard_meta(SHARD).unwrap().unwrap().applied_index, 3);
    }

    #[test]
    fn a_pool_applies_each_shard_on_one_worker_in_order_and_shards_side_by_side() {
        const WORKERS: usize = 3;
        const SHARDS: u64 = 7;
        const TASKS: u64 = 60;
        let (_dir, engine) = engine();
        for shard in (1..=SHARDS).filter(|s| *s != SHARD) {
            engine
                .bootstrap_shard(shard, conf_state_with_voters(&[1]), 0, 0)
                .unwrap();
        }
        let mut a = Applier::spawn("1", WORKERS, &engine, &Arc::new(Watchers::default())).unwrap();
        // Every task carries two entries of every shard, one append each; the
        // second entry's caller waits for its seq.
        let mut callers = Vec::new();
        for t in 0..TASKS {
            let mut shards = Vec::new();
            let mut bytes = 0;
            for shard in 1..=SHARDS {
                let (i, j) = (2 * t + 1, 2 * t + 2);
                let mut w = ShardWork::new(shard);
                w.entries = vec![
                    append_entry(i, &format!("{shard}/{i}")),
                    append_entry(j, &format!("{shard}/{j}")),
                ];
                bytes += w.entries.iter().map(|e| e.data.len() as u64).sum::<u64>();
                let (p, mut rx) = pending(&[1]);
                w.pending.push((j, p));
                callers.push((shard, j, rx.remove(0)));
                shards.push(w);
            }
            a.submit(ApplyTask { shards, bytes }).unwrap();
        }
        let mut applied = std::collections::BTreeMap::new();
        let mut lag = a.lag_bytes;
        while (applied.len() as u64) < SHARDS || applied.values().any(|i| *i < 2 * TASKS) {
            match next_report(&a) {
                ApplyReport::Applied { shards, bytes, .. } => {
                    let owners: std::collections::BTreeSet<usize> =
                        shards.iter().map(|(s, _)| worker_of(*s, WORKERS)).collect();
                    assert_eq!(owners.len(), 1, "one report, one worker's shards: {shards:?}");
                    for (shard, index) in shards {
                        let before = applied.insert(shard, index).unwrap_or(0);
                        assert!(index > before, "shard {shard}: {before} then {index}");
                    }
                    lag -= bytes;
                }
                ApplyReport::Failed(e) => panic!("{e}"),
            }
        }
        assert_eq!(lag, 0, "every byte handed over is reported");
        for (shard, index, mut rx) in callers {
            match rx.try_recv().unwrap().unwrap().remove(0) {
                Ok(OpOutput::Appended { seq, duplicate, .. }) => {
                    assert_eq!((seq, duplicate), (index, false), "shard {shard} entry {index}");
                }
                other => panic!("shard {shard} entry {index}: {other:?}"),
            }
        }
        for shard in 1..=SHARDS {
            assert_eq!(engine.shard_meta(shard).unwrap().unwrap().applied_index, 2 * TASKS);
        }
    }

    #[test]
    fn an_engine_failure_is_reported_once_and_stops_the_worker() {
        let (_dir, engine) = engine();
        let mut a = Applier::spawn("1", 1, &engine, &Arc::new(Watchers::default())).unwrap();
        // Index 5 on a shard applied to 0: out of order.
        a.submit(task(vec![append_entry(5, "a")], Vec::new())).unwrap();
        assert!(matches!(
            next_report(&a),
            ApplyReport::Failed(EngineError::ApplyOutOfOrder { index: 5, .. })
        ));
        assert!(
            a.reports.recv_timeout(Duration::from_secs(10)).is_err(),
            "the worker stopped: its report channel closes"
        );
        assert!(a.submit(task(vec![append_entry(1, "a")], Vec::new())).is_err());
        assert_eq!(engine.shard_meta(SHARD).unwrap().unwrap().applied_index, 0);
    }

    #[test]
    fn a_conf_change_without_its_configuration_is_refused_not_guessed() {
        let (_dir, engine) = engine();
        let mut a = Applier::spawn("1", 1, &engine, &Arc::new(Watchers::default())).unwrap();
        let mut e = Entry {
            index: 1,
            term: 1,
            ..Default::default()
        };
        e.set_entry_type(EntryType::EntryConfChangeV2);
        a.submit(task(vec![e.clone()], Vec::new())).unwrap();
        assert!(matches!(
            next_report(&a),
            ApplyReport::Failed(EngineError::InvalidCall(_))
        ));
        // With its configuration it applies.
        let mut a = Applier::spawn("1", 1, &engine, &Arc::new(Watchers::default())).unwrap();
        let mut t = task(vec![e], Vec::new());
        t.shards[0].confs.push((1, conf_state_with_voters(&[1, 2])));
        a.submit(t).unwrap();
        assert!(matches!(next_report(&a), ApplyReport::Applied { .. }));
        let meta = engine.shard_meta(SHARD).unwrap().unwrap();
        assert_eq!(meta.conf_state.voters, vec![1, 2]);
    }

    #[test]
    fn merged_tasks_keep_each_shard_once_and_its_entries_in_order() {
        let mk = |shard: u64, indexes: &[u64]| {
            let mut w = ShardWork::new(shard);
            w.entries = indexes
                .iter()
                .map(|i| Entry {
                    index: *i,
                    ..Default::default()
                })
                .collect();
            w
        };
        let t1 = ApplyTask {
            shards: vec![mk(2, &[1, 2]), mk(1, &[7])],
            bytes: 0,
        };
        let t2 = ApplyTask {
            shards: vec![mk(1, &[8, 9])],
            bytes: 0,
        };
        let merged = merge(vec![t1, t2]);
        let got: Vec<(u64, Vec<u64>)> = merged
            .iter()
            .map(|w| (w.shard, w.entries.iter().map(|e| e.index).collect()))
            .collect();
        assert_eq!(got, vec![(1, vec![7, 8, 9]), (2, vec![1, 2])]);
    }

    type Rx = oneshot::Receiver<crate::driver::ProposeResult>;

    /// A pending entry owned by callers with `sizes` ops each.
    fn pending(sizes: &[usize]) -> (Pending, Vec<Rx>) {
        let mut parts = Vec::new();
        let mut rxs = Vec::new();
        for n in sizes {
            let (tx, rx) = oneshot::channel();
            parts.push(Part {
                reply: tx,
                ops: *n,
                stages: None,
            });
            rxs.push(rx);
        }
        let p = Pending {
            shard: 1,
            parts,
            deadline: Instant::now(),
            proposed_at: Instant::now(),
            term: 1,
        };
        (p, rxs)
    }

    fn appended(seq: u64) -> Result<OpOutput, OpError> {
        Ok(OpOutput::Appended {
            seq,
            duplicate: false,
            time_ms: 0,
        })
    }

    #[test]
    fn each_caller_gets_its_own_ops_results_in_order() {
        let (p, mut rxs) = pending(&[2, 1, 3]);
        let results = (1..=6).map(appended).collect();
        answer(
            p,
            EntryOutcome::Command {
                time_ms: 0,
                results,
                changed: Vec::new(),
            },
        );
        let got: Vec<Vec<u64>> = rxs
            .iter_mut()
            .map(|rx| {
                rx.try_recv()
                    .unwrap()
                    .unwrap()
                    .into_iter()
                    .map(|r| match r {
                        Ok(OpOutput::Appended { seq, .. }) => seq,
                        other => panic!("{other:?}"),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(got, vec![vec![1, 2], vec![3], vec![4, 5, 6]]);
    }

    #[test]
    fn a_rejected_entry_fails_every_op_and_an_unknown_outcome_is_a_timeout() {
        let (p, mut rxs) = pending(&[2, 1]);
        answer(p, EntryOutcome::Rejected(OpError::MalformedCommand("x".into())));
        assert_eq!(rxs[0].try_recv().unwrap().unwrap().len(), 2);
        assert!(rxs[1].try_recv().unwrap().unwrap().iter().all(Result::is_err));
        let (p, mut rxs) = pending(&[1]);
        answer(p, EntryOutcome::AlreadyApplied);
        assert!(matches!(rxs[0].try_recv().unwrap(), Err(ClusterError::Timeout { .. })));
    }
}
