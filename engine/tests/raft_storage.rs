//! The Raft log store against raft-rs's storage contract: the cases raft-rs's
//! own MemStorage tests cover (term, entries, first/last index, compaction,
//! snapshots, append with conflicts, applying a snapshot), plus what only a
//! persistent, shared store has: reopen, group commit of many shards, and a
//! real RawNode committing through it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::field_reassign_with_default,
    clippy::useless_vec,
    clippy::cast_possible_truncation,
    clippy::type_complexity
)]

use pigeonhole_engine::raft::eraftpb::{Entry, HardState, SnapshotMetadata};
use pigeonhole_engine::raft::{self, GetEntriesContext, Storage, StorageError};
use pigeonhole_engine::{
    conf_state_with_voters, ApplyEntry, Durability, Engine, EngineError, EngineOptions, EntryKind, RaftBatch,
    RaftLogStore,
};
use protobuf::Message as _;

fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e
}

fn size_of(e: &Entry) -> u64 {
    u64::from(e.compute_size())
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

/// An engine whose shard 1 log holds entries 3..=5 with terms 3,4,5 after a
/// truncation at index 3 (like MemStorage's tests: "snapshot" at 3/3).
fn setup() -> (tempfile::TempDir, Engine, RaftLogStore) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    engine
        .bootstrap_shard(1, conf_state_with_voters(&[1, 2, 3]), 3, 3)
        .unwrap();
    let store = engine.raft_log(1).unwrap();
    let mut b = RaftBatch::default();
    b.append(&store, &[entry(4, 4), entry(5, 5)]).unwrap();
    engine.write_raft(b, Durability::Fsync).unwrap();
    (dir, engine, store)
}

fn store_err<T: std::fmt::Debug>(r: raft::Result<T>) -> StorageError {
    match r {
        Err(raft::Error::Store(e)) => e,
        other => panic!("expected a storage error, got {other:?}"),
    }
}

#[test]
fn term_of_each_index() {
    let (_d, _e, s) = setup();
    assert_eq!(store_err(s.term(2)), StorageError::Compacted);
    assert_eq!(s.term(3).unwrap(), 3);
    assert_eq!(s.term(4).unwrap(), 4);
    assert_eq!(s.term(5).unwrap(), 5);
    assert_eq!(store_err(s.term(6)), StorageError::Unavailable);
}

#[test]
fn entries_with_bounds_and_size_limits() {
    let (_d, _e, s) = setup();
    let mut b = RaftBatch::default();
    b.append(&s, &[entry(6, 6)]).unwrap();
    _e.write_raft(b, Durability::Fsync).unwrap();
    let all = [entry(4, 4), entry(5, 5), entry(6, 6)];
    assert_eq!(store_err(s.entries(2, 6, None, ctx())), StorageError::Compacted);
    assert_eq!(store_err(s.entries(3, 4, None, ctx())), StorageError::Compacted);
    assert_eq!(s.entries(4, 5, None, ctx()).unwrap(), all[..1].to_vec());
    assert_eq!(s.entries(4, 7, None, ctx()).unwrap(), all.to_vec());
    // max_size: always at least one entry, then as many as fit.
    assert_eq!(s.entries(4, 7, 0, ctx()).unwrap(), all[..1].to_vec());
    let two = size_of(&all[0]) + size_of(&all[1]);
    assert_eq!(s.entries(4, 7, two, ctx()).unwrap(), all[..2].to_vec());
    assert_eq!(
        s.entries(4, 7, two + size_of(&all[2]) / 2, ctx()).unwrap(),
        all[..2].to_vec()
    );
    assert_eq!(s.entries(4, 7, two + size_of(&all[2]), ctx()).unwrap(), all.to_vec());
    assert_eq!(s.entries(4, 7, u64::MAX, ctx()).unwrap(), all.to_vec());
    // Beyond the last index is an error, never a panic.
    assert_eq!(store_err(s.entries(4, 8, None, ctx())), StorageError::Unavailable);
}

#[test]
fn first_and_last_index() {
    let (_d, e, s) = setup();
    assert_eq!(s.first_index().unwrap(), 4);
    assert_eq!(s.last_index().unwrap(), 5);
    let mut b = RaftBatch::default();
    b.append(&s, &[entry(6, 5)]).unwrap();
    e.write_raft(b, Durability::Fsync).unwrap();
    assert_eq!(s.last_index().unwrap(), 6);
    // Compaction needs the entries applied first.
    apply_empty(&e, 4..=5);
    let mut b = RaftBatch::default();
    b.compact(&s, 5).unwrap();
    e.write_raft(b, Durability::Fsync).unwrap();
    assert_eq!(s.first_index().unwrap(), 5);
}

fn apply_empty(e: &Engine, idx: std::ops::RangeInclusive<u64>) {
    let entries: Vec<_> = idx
        .map(|i| ApplyEntry {
            index: i,
            term: i,
            kind: EntryKind::Empty,
        })
        .collect();
    e.apply(1, &entries, Durability::Fsync).unwrap();
}

#[test]
fn compact_like_memstorage() {
    let (_d, e, s) = setup();
    apply_empty(&e, 4..=5);
    // (compact index, first index after, term at first-1, entries left)
    for (compact, first, term, left) in [(2, 4, 3, 2), (3, 4, 3, 2), (4, 4, 3, 2), (5, 5, 4, 1)] {
        let mut b = RaftBatch::default();
        b.compact(&s, compact).unwrap();
        e.write_raft(b, Durability::Fsync).unwrap();
        assert_eq!(s.first_index().unwrap(), first, "compact {compact}");
        assert_eq!(s.term(first - 1).unwrap(), term);
        assert_eq!(s.entries(first, 6, None, ctx()).unwrap().len(), left);
    }
    // Past the last index, or past what is applied: refused, not a panic.
    let mut b = RaftBatch::default();
    assert!(matches!(b.compact(&s, 7), Err(EngineError::InvalidCall(_))));
    let mut b2 = RaftBatch::default();
    b2.append(&s, &[entry(6, 6)]).unwrap();
    e.write_raft(b2, Durability::Fsync).unwrap();
    let mut b = RaftBatch::default();
    let err = b.compact(&s, 7).unwrap_err();
    assert!(err.to_string().contains("unapplied"), "{err}");
}

#[test]
fn create_snapshot_reflects_applied_state() {
    let (_d, e, s) = setup();
    let cs = conf_state_with_voters(&[1, 2, 3]);
    // Applied index is 3 (the bootstrap): a request above it must wait.
    assert_eq!(
        store_err(s.snapshot(4, 2)),
        StorageError::SnapshotTemporarilyUnavailable
    );
    let snap = s.snapshot(3, 2).unwrap();
    assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (3, 3));
    apply_empty(&e, 4..=5);
    let snap = s.snapshot(4, 2).unwrap();
    assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (5, 5));
    assert_eq!(snap.get_metadata().get_conf_state(), &cs);
    assert!(snap.data.starts_with(pigeonhole_engine::SNAPSHOT_DATA_MAGIC));
    assert_eq!(&snap.data[8..], &1u64.to_be_bytes());
    // For a node the applied configuration does not hold yet (a learner
    // whose AddLearner is committed but not applied): not yet, because its
    // raft-rs would ignore the snapshot after the whole state was sent.
    assert_eq!(
        store_err(s.snapshot(4, 4)),
        StorageError::SnapshotTemporarilyUnavailable
    );
}

#[test]
fn append_replaces_conflicting_suffix() {
    // (entries to append, expected log from index 4)
    let cases: Vec<(Vec<Entry>, Result<Vec<Entry>, ()>)> = vec![
        (vec![entry(4, 4), entry(5, 5)], Ok(vec![entry(4, 4), entry(5, 5)])),
        (
            vec![entry(4, 4), entry(5, 6), entry(6, 6)],
            Ok(vec![entry(4, 4), entry(5, 6), entry(6, 6)]),
        ),
        (
            vec![entry(4, 4), entry(5, 5), entry(6, 5)],
            Ok(vec![entry(4, 4), entry(5, 5), entry(6, 5)]),
        ),
        // Truncate the incoming entries before the first index: refused (raft never does it).
        (vec![entry(2, 3), entry(3, 3), entry(4, 5)], Err(())),
        // Truncate the existing entries and append.
        (vec![entry(4, 5)], Ok(vec![entry(4, 5)])),
        // Direct append.
        (vec![entry(6, 5)], Ok(vec![entry(4, 4), entry(5, 5), entry(6, 5)])),
        // A gap is refused.
        (vec![entry(7, 5)], Err(())),
        // Not consecutive.
        (vec![entry(6, 5), entry(8, 5)], Err(())),
    ];
    for (i, (ents, want)) in cases.into_iter().enumerate() {
        let (_d, e, s) = setup();
        let mut b = RaftBatch::default();
        match (b.append(&s, &ents), want) {
            (Ok(()), Ok(want)) => {
                e.write_raft(b, Durability::Fsync).unwrap();
                let last = s.last_index().unwrap();
                assert_eq!(s.entries(4, last + 1, None, ctx()).unwrap(), want, "case {i}");
                assert_eq!(last, want.last().unwrap().index);
                assert_eq!(s.term(last).unwrap(), want.last().unwrap().term);
            }
            (Err(EngineError::InvalidCall(_)), Err(())) => {
                assert_eq!(s.last_index().unwrap(), 5, "case {i}: nothing changed");
            }
            (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn apply_snapshot_truncates_log_and_refuses_old_ones() {
    let (_d, e, s) = setup();
    let mut md = SnapshotMetadata::default();
    md.index = 10;
    md.term = 7;
    md.set_conf_state(conf_state_with_voters(&[1, 2]));
    let mut b = RaftBatch::default();
    b.apply_snapshot(&s, &md).unwrap();
    e.write_raft(b, Durability::Fsync).unwrap();
    assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (11, 10));
    assert_eq!(s.term(10).unwrap(), 7);
    assert_eq!(store_err(s.term(5)), StorageError::Compacted);
    let hs = s.hard_state().unwrap();
    assert_eq!((hs.term, hs.commit), (7, 10));
    // An older snapshot than the log's first index is out of date.
    md.index = 4;
    let mut b = RaftBatch::default();
    assert!(matches!(
        b.apply_snapshot(&s, &md),
        Err(EngineError::SnapshotOutOfDate {
            index: 4,
            first_index: 11,
            ..
        })
    ));
}

#[test]
fn log_and_hard_state_survive_reopen() {
    let (dir, e, s) = setup();
    let mut hs = HardState::default();
    hs.term = 5;
    hs.vote = 2;
    hs.commit = 5;
    let mut b = RaftBatch::default();
    b.set_hard_state(&s, &hs).unwrap();
    b.append(&s, &[entry(6, 5)]).unwrap();
    e.write_raft(b, Durability::Fsync).unwrap();
    drop((s, e));
    let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    let s = e.raft_log(1).unwrap();
    let st = s.initial_state().unwrap();
    assert_eq!(st.hard_state, hs);
    assert_eq!(st.conf_state, conf_state_with_voters(&[1, 2, 3]));
    assert_eq!(
        (s.first_index().unwrap(), s.last_index().unwrap(), s.term(6).unwrap()),
        (4, 6, 5)
    );
    // A truncated tail stays truncated after reopen.
    let mut b = RaftBatch::default();
    b.append(&s, &[entry(5, 6)]).unwrap();
    e.write_raft(b, Durability::Fsync).unwrap();
    drop((s, e));
    let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    let s = e.raft_log(1).unwrap();
    assert_eq!((s.last_index().unwrap(), s.term(5).unwrap()), (5, 6));
}

#[test]
fn one_batch_persists_many_shards() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    let stores: Vec<_> = (0..64u64)
        .map(|shard| {
            e.bootstrap_shard(shard, conf_state_with_voters(&[1]), 0, 0).unwrap();
            e.raft_log(shard).unwrap()
        })
        .collect();
    let mut b = RaftBatch::default();
    for s in &stores {
        b.append(s, &[entry(1, 1), entry(2, 1)]).unwrap();
        let mut hs = HardState::default();
        hs.term = 1;
        hs.commit = 2;
        b.set_hard_state(s, &hs).unwrap();
        // Nothing is visible before the batch is written.
        assert_eq!(s.last_index().unwrap(), 0);
    }
    e.write_raft(b, Durability::Fsync).unwrap();
    for s in &stores {
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.hard_state().unwrap().commit, 2);
    }
    drop((stores, e));
    let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    for shard in 0..64 {
        assert_eq!(e.raft_log(shard).unwrap().last_index().unwrap(), 2);
    }
}

#[test]
fn a_raw_node_commits_through_the_store() {
    use pigeonhole_engine::raft::{Config, RawNode};
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    e.bootstrap_shard(1, conf_state_with_voters(&[1]), 0, 0).unwrap();
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let cfg = Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 3,
        ..Default::default()
    };
    let mut node = RawNode::new(&cfg, e.raft_log(1).unwrap(), &logger).unwrap();
    node.campaign().unwrap();
    let cmd = pigeonhole_engine::command::Command {
        time_ms: 1,
        ops: vec![pigeonhole_engine::command::Op {
            op: Some(pigeonhole_engine::command::op::Op::Append(
                pigeonhole_engine::command::AppendOp {
                    namespace: "ns".into(),
                    user_id: b"u".to_vec(),
                    idempotency_key: b"k".to_vec(),
                    payload: b"hello".to_vec().into(),
                    expected_last_seq: None,
                },
            )),
        }],
    };
    let mut proposed = false;
    for _ in 0..10 {
        if !node.has_ready() {
            if node.raft.state == raft::StateRole::Leader && !proposed {
                node.propose(vec![], prost::Message::encode_to_vec(&cmd)).unwrap();
                proposed = true;
                continue;
            }
            break;
        }
        let mut rd = node.ready();
        let store = node.store().clone();
        let mut b = RaftBatch::default();
        b.append(&store, rd.entries()).unwrap();
        if let Some(hs) = rd.hs() {
            b.set_hard_state(&store, hs).unwrap();
        }
        e.write_raft(b, Durability::Fsync).unwrap();
        let apply = |ents: Vec<Entry>| {
            let applies: Vec<_> = ents
                .iter()
                .map(|en| ApplyEntry {
                    index: en.index,
                    term: en.term,
                    kind: if en.data.is_empty() {
                        EntryKind::Empty
                    } else {
                        EntryKind::Command(&en.data)
                    },
                })
                .collect();
            e.apply(1, &applies, Durability::NoFsync).unwrap();
        };
        apply(rd.take_committed_entries());
        let mut light = node.advance(rd);
        apply(light.take_committed_entries());
        node.advance_apply();
    }
    assert!(proposed);
    let page = e
        .sync(
            1,
            &pigeonhole_engine::SyncQuery {
                namespace: "ns",
                user_id: b"u",
                after_seq: 0,
                max_messages: 0,
                max_bytes: 0,
            },
        )
        .unwrap();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].payload, b"hello");
}

/// Bootstrapping several shards is one write: all of them or, when one
/// already exists, none (a first start cut short must find every shard's
/// log at the bootstrap point or none, never some).
#[test]
fn bootstrap_shards_writes_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    engine
        .bootstrap_shards(
            vec![(2, conf_state_with_voters(&[1])), (1, conf_state_with_voters(&[1]))],
            5,
            5,
        )
        .unwrap();
    let err = engine
        .bootstrap_shards(
            vec![(2, conf_state_with_voters(&[1])), (0, conf_state_with_voters(&[1]))],
            5,
            5,
        )
        .unwrap_err();
    assert!(err.to_string().contains("shard 2 already exists"), "{err}");
    drop(engine);
    let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
    assert_eq!(engine.shard_ids().unwrap(), vec![1, 2]);
    assert_eq!(engine.raft_log_shard_ids(), vec![1, 2]);
    for shard in [1, 2] {
        let store = engine.raft_log(shard).unwrap();
        assert_eq!((store.first_index().unwrap(), store.last_index().unwrap()), (6, 5));
        assert_eq!(store.hard_state().unwrap().commit, 5);
    }
}
