//! A one-node driver stepped by hand (no loop thread), for the parts
//! that need a whole driver. This file holds the harness and the tests of
//! the loop as a whole (proposals through apply, reads, the apply pool);
//! each driver module's own tests are in the submodule of its name.
//! Multi-node behaviour is in `tests/cluster.rs`.
use super::*;
use crate::config::InitialCluster;
use crate::transport::{Envelope, SnapshotJob};
use pigeonhole_engine::conf_state_with_voters;
use pigeonhole_engine::raft::eraftpb::ConfState;
use pigeonhole_engine::raft::Storage as _;
use pigeonhole_engine::{EngineOptions, OpOutput};
use std::sync::Mutex;

mod flush;
mod inbox;
mod place;
mod pool;
mod split;
mod status;
mod tick;

/// Delivers nothing (a one-node cluster sends nothing that matters), but
/// remembers what it was asked to do, for the tests of the heartbeat and
/// of learning peers.
#[derive(Default)]
struct Recorder {
    /// (to, number of shard messages) of each envelope sent.
    sent: Mutex<Vec<(u64, usize)>>,
    added: Mutex<Vec<(u64, String)>>,
}
impl Transport for Arc<Recorder> {
    fn send(&self, env: Envelope) {
        self.sent.lock().unwrap().push((env.to, env.msgs.len()));
    }
    fn send_snapshot(&self, job: SnapshotJob) {
        (job.report)(false);
    }
    fn add_peer(&self, node: u64, address: &str) {
        self.added.lock().unwrap().push((node, address.to_string()));
    }
}

const SHARDS: u64 = 2;

fn driver(tuning: RaftTuning) -> (tempfile::TempDir, Driver) {
    driver_with(tuning, |_| {})
}

/// A driver and what its transport was asked to do.
fn recorded_driver(tuning: RaftTuning) -> (tempfile::TempDir, Driver, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let (dir, d) = build(tuning, |_| {}, Arc::new(recorder.clone()));
    (dir, d, recorder)
}

/// A driver over an engine `prepare` added to before the driver starts.
fn driver_with(tuning: RaftTuning, prepare: impl FnOnce(&Engine)) -> (tempfile::TempDir, Driver) {
    build(tuning, prepare, Arc::new(Arc::new(Recorder::default())))
}

fn build(
    tuning: RaftTuning,
    prepare: impl FnOnce(&Engine),
    transport: Arc<dyn Transport>,
) -> (tempfile::TempDir, Driver) {
    let (dir, mut all) = build_pool(tuning, prepare, transport, 1);
    (dir, all.remove(0))
}

/// `count` drivers of one node, over one engine (`pool`).
fn pool_of(count: usize) -> (tempfile::TempDir, Vec<Driver>) {
    let transport: Arc<dyn Transport> = Arc::new(Arc::new(Recorder::default()));
    build_pool(RaftTuning::default(), |_| {}, transport, count)
}

fn build_pool(
    tuning: RaftTuning,
    prepare: impl FnOnce(&Engine),
    transport: Arc<dyn Transport>,
    count: usize,
) -> (tempfile::TempDir, Vec<Driver>) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path().join("db"), EngineOptions::default()).unwrap();
    let cluster = InitialCluster::parse("1=127.0.0.1:1").unwrap();
    let map = Arc::new(ShardMap::bootstrap(&cluster, SHARDS, 1));
    engine
        .bootstrap_shard(
            META_SHARD,
            ConfState {
                voters: vec![1],
                ..Default::default()
            },
            5,
            5,
        )
        .unwrap();
    for s in map.shards_on(1) {
        engine.bootstrap_shard(s, conf_state_with_voters(&[1]), 5, 5).unwrap();
    }
    prepare(&engine);
    let inboxes: Vec<_> = (0..count).map(|_| crossbeam_channel::bounded(64)).collect();
    let routing = Arc::new(crate::placement::Routing::new(map.clone()));
    let drivers = crate::driver::pool::Drivers::new(inboxes.iter().map(|i| i.0.clone()).collect(), routing.clone());
    let spool = Arc::new(SnapshotSpool::open(dir.path().join("snap")).unwrap());
    let watchers = Arc::new(Watchers::default());
    let all = inboxes
        .into_iter()
        .enumerate()
        .map(|(index, inbox)| {
            Driver::new(DriverParts {
                node_id: 1,
                index,
                drivers: drivers.clone(),
                engine: engine.clone(),
                tuning: tuning.clone(),
                transport: transport.clone(),
                inbox,
                routing: routing.clone(),
                map: map.clone(),
                spool: spool.clone(),
                watchers: watchers.clone(),
                counters: Arc::default(),
            })
            .unwrap()
        })
        .collect();
    (dir, all)
}

/// One turn of the loop without waiting.
fn turn(d: &mut Driver) {
    d.follow_map();
    while let Ok(m) = d.rx.try_recv() {
        assert!(d.handle(m).unwrap());
    }
    d.propose_queued();
    d.process_ready().unwrap();
    // Waits for the workers' reports, for a bounded time: a report that
    // never comes fails the test instead of hanging it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.applier.lag_bytes > 0 || d.replicas.values().any(|r| r.handed > r.raw.raft.raft_log.applied) {
        if let Ok(report) = d.applier.reports.recv_timeout(Duration::from_millis(100)) {
            d.on_report(report).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "entries handed to the apply workers were never reported applied ({} bytes)",
            d.applier.lag_bytes
        );
    }
}

fn settle(d: &mut Driver) {
    for _ in 0..20 {
        turn(d);
    }
}

fn append_op(key: &str) -> cmd::Op {
    cmd::Op {
        op: Some(cmd::op::Op::Append(cmd::AppendOp {
            namespace: "ns".into(),
            user_id: b"u".to_vec(),
            idempotency_key: key.as_bytes().to_vec(),
            payload: b"p".to_vec().into(),
            expected_last_seq: None,
        })),
    }
}

/// Writes a system value into this node's metadata replica, through the
/// log, and waits for it.
fn put_system(d: &mut Driver, key: Vec<u8>, value: Vec<u8>) {
    let op = cmd::Op {
        op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
            key,
            value,
            version: 1,
            if_version: None,
        })),
    };
    let mut rx = propose(d, META_SHARD, vec![op]);
    settle(d);
    let out = rx.try_recv().unwrap().unwrap();
    assert!(matches!(out.as_slice(), [Ok(_)]), "{out:?}");
}

/// The status of one shard.
fn status_of(d: &Driver, shard: u64) -> ShardStatus {
    d.status().into_iter().find(|s| s.shard == shard).unwrap()
}

fn propose(d: &mut Driver, shard: u64, ops: Vec<cmd::Op>) -> oneshot::Receiver<ProposeResult> {
    let (reply, rx) = oneshot::channel();
    let deadline = Instant::now() + Duration::from_secs(5);
    assert!(d
        .handle(Inbound::Propose {
            shard,
            ops,
            reply,
            deadline,
            stages: None,
        })
        .unwrap());
    rx
}

#[test]
fn proposals_to_one_shard_share_an_entry_and_each_caller_gets_its_result() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let status = d.status();
    assert!(status.iter().all(|s| s.role == Role::Leader), "{status:?}");
    let last_before = status.iter().find(|s| s.shard == 1).unwrap().last_index;
    let mut a = propose(&mut d, 1, vec![append_op("a")]);
    let mut b = propose(&mut d, 1, vec![append_op("b"), append_op("a")]);
    settle(&mut d);
    let seqs = |r: ProposeResult| -> Vec<(u64, bool)> {
        r.unwrap()
            .into_iter()
            .map(|o| match o.unwrap() {
                OpOutput::Appended { seq, duplicate, .. } => (seq, duplicate),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(seqs(a.try_recv().unwrap()), vec![(1, false)]);
    assert_eq!(seqs(b.try_recv().unwrap()), vec![(2, false), (1, true)]);
    let s1 = d.status().into_iter().find(|s| s.shard == 1).unwrap();
    assert_eq!(s1.last_index, last_before + 1, "two callers, one entry");
    assert_eq!(s1.applied, s1.last_index);
}

/// A read waits for its ReadIndex and for apply to reach it; when
/// nothing is left to apply, no report of the apply worker will come,
/// and the read must still be released.
#[test]
fn a_read_is_released_when_its_index_is_applied_with_or_without_new_applies() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let read = |d: &mut Driver| {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(d
            .handle(Inbound::Read {
                shard: 1,
                reply,
                deadline
            })
            .unwrap());
        rx
    };
    let mut idle = read(&mut d);
    settle(&mut d);
    assert!(matches!(idle.try_recv(), Ok(Ok(()))), "nothing to apply");
    let mut w = propose(&mut d, 1, vec![append_op("a")]);
    let mut after_write = read(&mut d);
    settle(&mut d);
    assert!(w.try_recv().unwrap().is_ok());
    assert!(matches!(after_write.try_recv(), Ok(Ok(()))), "released after the apply");
}

/// Replica GC at start: a replica whose applied configuration no longer
/// includes this node (its removal was applied, then the node stopped
/// before deleting it) is deleted when the driver starts; only the log's
/// term and vote stay.
#[test]
fn a_replica_removed_before_a_restart_is_deleted_at_start() {
    const GONE: u64 = 9;
    let (_dir, d) = driver_with(RaftTuning::default(), |engine| {
        engine
            .bootstrap_shard(GONE, conf_state_with_voters(&[2, 3]), 40, 7)
            .unwrap();
        let store = engine.raft_log(GONE).unwrap();
        assert_eq!(store.last_index().unwrap(), 40);
    });
    assert!(!d.replicas.contains_key(&GONE));
    assert!(
        d.engine.shard_meta(GONE).unwrap().is_none(),
        "the removed replica's state is deleted"
    );
    assert!(!d.engine.shard_ids().unwrap().contains(&GONE));
    let store = d.engine.raft_log(GONE).unwrap();
    assert_eq!(store.last_index().unwrap(), 0, "its log is emptied");
    let hs = store.hard_state().unwrap();
    assert_eq!((hs.term, hs.commit), (7, 0), "the term stays, the commit goes");
    // The node's own replicas are untouched.
    assert!(d.engine.shard_meta(1).unwrap().is_some());
}

/// A received snapshot is ingested on a thread of its own: while it runs
/// (held at the test gate), the replica is out of the driver's hands and
/// the driver goes on serving the node's other shards; once it finishes,
/// the replica is back and holds the snapshot's state.
#[test]
fn a_snapshot_is_ingested_off_the_driver_while_other_shards_go_on() {
    const SNAP_INDEX: u64 = 40;
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    // The snapshot: shard 1's state at index 40 from another engine,
    // spooled as the transport spools what a leader streams.
    let src_dir = tempfile::tempdir().unwrap();
    let src = Engine::open(src_dir.path().join("db"), EngineOptions::default()).unwrap();
    src.bootstrap_shard(1, conf_state_with_voters(&[1]), SNAP_INDEX, 7)
        .unwrap();
    let mut w = d.spool.begin(2, 1).unwrap();
    src.export_snapshot(1, 1 << 10, |chunk| {
        w.write_chunk(&chunk.encode())
            .map_err(|e| pigeonhole_engine::EngineError::InvalidCall(e.to_string()))
    })
    .unwrap();
    let (_, _, path) = w.finish().unwrap();
    let mut msg = pigeonhole_engine::raft::eraftpb::Message::default();
    msg.set_msg_type(pigeonhole_engine::raft::eraftpb::MessageType::MsgSnapshot);
    (msg.from, msg.to, msg.term) = (2, 1, 7);
    let mut data = pigeonhole_engine::SNAPSHOT_DATA_MAGIC.to_vec();
    data.extend_from_slice(&1u64.to_be_bytes());
    let snap = msg.mut_snapshot();
    snap.data = data.into();
    let md = snap.mut_metadata();
    (md.index, md.term) = (SNAP_INDEX, 7);
    md.set_conf_state(conf_state_with_voters(&[1]));

    let (release, gate) = crossbeam_channel::bounded::<()>(1);
    *super::snapshot::INGEST_GATE.lock().unwrap() = Some(gate);
    let started = Instant::now();
    d.on_snapshot(2, 1, &path, msg).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the driver waited for the ingest: {:?}",
        started.elapsed()
    );
    assert!(d.ingests.contains_key(&1) && !d.replicas.contains_key(&1));
    assert!(
        d.status().iter().any(|s| s.shard == 1),
        "an ingesting replica is still reported"
    );
    // Shard 2 is served meanwhile.
    let mut a = propose(&mut d, 2, vec![append_op("a")]);
    settle(&mut d);
    assert!(a.try_recv().unwrap().is_ok(), "shard 2 answered during the ingest");
    assert!(d.ingests.contains_key(&1), "still held at the gate");
    assert!(d.engine.shard_meta(1).unwrap().unwrap().applied_index < SNAP_INDEX);

    release.send(()).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while d.ingests.contains_key(&1) {
        assert!(Instant::now() < until, "the ingest was not collected");
        if let Ok(m) = d.rx.recv_timeout(Duration::from_millis(100)) {
            assert!(d.handle(m).unwrap());
        }
    }
    assert!(d.replicas.contains_key(&1), "the replica is back");
    assert_eq!(d.engine.shard_meta(1).unwrap().unwrap().applied_index, SNAP_INDEX);
    assert!(d.replicas[&1].durable_applied >= SNAP_INDEX);
}

/// The driver's side of apply (`apply.rs`) with a pool of workers: each
/// turn's committed entries are split by owner, the reports of all the
/// workers move every shard's applied index, and every caller is answered.
/// (The order of a shard's entries across tasks is checked where it can be
/// forced, in `applier`'s own tests: here each task is applied in well
/// under the time to hand over the next.)
#[test]
fn with_a_pool_of_apply_workers_every_shard_applies_and_every_caller_is_answered() {
    let tuning = RaftTuning {
        apply_threads: 3,
        ..RaftTuning::default()
    };
    let (_dir, mut d) = driver(tuning);
    settle(&mut d);
    let mut callers = Vec::new();
    for round in 0..20 {
        for shard in 1..=SHARDS {
            let key = format!("k{round}");
            callers.push((shard, round, propose(&mut d, shard, vec![append_op(&key)])));
        }
        // Hand the round's entries over without waiting for reports, so
        // several tasks of each shard are with the workers at once.
        d.propose_queued();
        d.process_ready().unwrap();
        d.process_ready().unwrap();
    }
    settle(&mut d);
    for (shard, round, mut rx) in callers {
        match rx.try_recv().unwrap().unwrap().remove(0) {
            Ok(OpOutput::Appended { seq, duplicate, .. }) => {
                assert_eq!((seq, duplicate), (round + 1, false), "shard {shard} round {round}");
            }
            other => panic!("shard {shard} round {round}: {other:?}"),
        }
    }
    for s in d.status() {
        assert_eq!(s.applied, s.last_index, "shard {}", s.shard);
    }
}

/// `on_report` never moves raft-rs's applied index backwards or past what
/// is committed and persisted: a replica created again after a removal may
/// see reports of its earlier life, and raft-rs panics on such a move.
#[test]
fn a_report_outside_the_applied_to_committed_range_is_ignored() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    drop(propose(&mut d, 1, vec![append_op("a")]));
    settle(&mut d);
    let applied = d.replicas[&1].raw.raft.raft_log.applied;
    let committed = d.replicas[&1].raw.raft.raft_log.committed;
    assert_eq!(applied, committed);
    for index in [committed + 5, applied - 1] {
        d.on_report(applier::ApplyReport::Applied {
            shards: vec![(1, index)],
            bytes: 0,
            splits: Vec::new(),
        })
        .unwrap();
        assert_eq!(d.replicas[&1].raw.raft.raft_log.applied, applied, "report of {index}");
    }
}
