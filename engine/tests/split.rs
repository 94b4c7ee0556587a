//! Shard split in place (D38): the state machine side. A shard's range is cut
//! at a hash; the upper half becomes a new shard whose rows stay in the
//! parent's data space. Checked against a model of every mailbox: through
//! the split, ops on both halves after it, ops routed to the wrong half,
//! snapshots of each half into other engines, replica deletion of either
//! half first, an ingest into a node where a sibling still uses the space,
//! a reopen, and a split that finds its new shard already there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{ack, append, trim};
use pigeonhole_engine::command::{op, Op, SplitOp};
use pigeonhole_engine::{
    conf_state_with_voters, Engine, EngineError, EngineOptions, HashRange, OpError, OpOutput, ReadError, SnapshotChunk,
    SyncQuery,
};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const PARENT: u64 = 7;
const CHILD: u64 = 8;
const NS: &str = "app";
const USERS: usize = 40;

fn user(i: usize) -> Vec<u8> {
    format!("user-{i}").into_bytes()
}

fn hash(uid: &[u8]) -> u64 {
    pigeonhole_proto::placement::user_hash(uid)
}

/// Each mailbox's stored messages (seq → payload) and cursors, as a replica
/// must show them.
#[derive(Default, Clone, PartialEq, Debug)]
struct Mailbox {
    last_seq: u64,
    low: u64,
    messages: BTreeMap<u64, Vec<u8>>,
    /// idempotency key → seq, for retries.
    keys: BTreeMap<Vec<u8>, u64>,
    cursors: BTreeMap<Vec<u8>, u64>,
    /// Messages trimmed (each one's dedup entry then starts its window).
    trimmed: u64,
}

/// An engine and the next index of each of its shards.
struct Node {
    dir: tempfile::TempDir,
    engine: Option<Engine>,
    index: BTreeMap<u64, u64>,
}

/// Every apply reads its dedup probes in one batched lookup (D51), so that
/// these tests cover it with shared spaces and splits in a batch; the
/// single-lookup path is the model test's default.
fn options() -> EngineOptions {
    EngineOptions {
        dedup_prefetch_min_appends: 1,
        ..EngineOptions::default()
    }
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), options()).unwrap();
        Node {
            dir,
            engine: Some(engine),
            index: BTreeMap::new(),
        }
    }

    fn e(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    fn exec(&mut self, shard: u64, ops: Vec<Op>) -> Vec<Result<OpOutput, OpError>> {
        self.exec_at(shard, 1_000, ops)
    }

    fn exec_at(&mut self, shard: u64, time_ms: u64, ops: Vec<Op>) -> Vec<Result<OpOutput, OpError>> {
        let index = {
            let i = self.index.entry(shard).or_insert(0);
            *i += 1;
            *i
        };
        common::apply_ops(self.engine.as_ref().unwrap(), shard, index, time_ms, ops)
    }

    fn one(&mut self, shard: u64, op: Op) -> Result<OpOutput, OpError> {
        self.exec(shard, vec![op]).pop().unwrap()
    }

    fn split(&mut self, shard: u64, new_shard: u64, split_hash: u64) -> Result<OpOutput, OpError> {
        self.one(
            shard,
            Op {
                op: Some(op::Op::Split(SplitOp { new_shard, split_hash })),
            },
        )
    }

    fn reopen(&mut self) {
        self.e().flush().unwrap();
        self.engine = None;
        self.engine = Some(Engine::open(self.dir.path(), options()).unwrap());
    }

    /// What a replica shows of a mailbox: every stored message and cursor.
    fn read(&self, shard: u64, uid: &[u8]) -> Result<Mailbox, ReadError> {
        let mut m = Mailbox::default();
        let mut after = 0;
        loop {
            let page = self.e().sync(
                shard,
                &SyncQuery {
                    namespace: NS,
                    user_id: uid,
                    after_seq: after,
                    max_messages: 0,
                    max_bytes: 0,
                },
            );
            let page = match page {
                Err(ReadError::CursorTrimmed { low_watermark, .. }) => {
                    after = low_watermark - 1;
                    continue;
                }
                other => other?,
            };
            m.last_seq = page.last_seq;
            m.low = page.low_watermark;
            for msg in &page.messages {
                if !msg.deleted {
                    m.messages.insert(msg.seq, msg.payload.to_vec());
                }
                after = msg.seq;
            }
            if !page.has_more {
                break;
            }
        }
        let c = self.e().cursors(shard, NS, uid)?;
        m.cursors = c.cursors.into_iter().collect();
        Ok(m)
    }
}

/// Random appends (some retried with their key), acks and trims on the
/// mailboxes `users` picks, applied to `shard` of `node` and to the model.
fn churn(
    node: &mut Node,
    shard: u64,
    users: &[usize],
    model: &mut BTreeMap<usize, Mailbox>,
    rng: &mut rand::rngs::StdRng,
    ops: usize,
) {
    for _ in 0..ops {
        let u = users[rng.gen_range(0..users.len())];
        let uid = user(u);
        let m = model.entry(u).or_default();
        match rng.gen_range(0..10) {
            0..=6 => {
                // A retry of an earlier key one time in five.
                let retry = rng.gen_range(0..5) == 0 && !m.keys.is_empty();
                let key = if retry {
                    let k: Vec<_> = m.keys.keys().cloned().collect();
                    k[rng.gen_range(0..k.len())].clone()
                } else {
                    format!("k{}-{}", m.last_seq + 1, rng.gen::<u32>()).into_bytes()
                };
                let payload = format!("payload of {key:?}").into_bytes();
                let got = node.one(shard, append(NS, &uid, &key, &payload)).unwrap();
                let OpOutput::Appended { seq, duplicate, .. } = got else {
                    panic!("{got:?}")
                };
                match m.keys.get(&key) {
                    Some(orig) => assert!(duplicate && seq == *orig, "retry of {key:?}: {got:?}"),
                    None => {
                        assert!(!duplicate && seq == m.last_seq + 1);
                        m.last_seq = seq;
                        m.messages.insert(seq, payload);
                        m.keys.insert(key, seq);
                    }
                }
            }
            7..=8 if m.last_seq > 0 => {
                let seq = rng.gen_range(1..=m.last_seq);
                node.one(shard, ack(NS, &uid, b"phone", seq)).unwrap();
                let c = m.cursors.entry(b"phone".to_vec()).or_insert(0);
                *c = (*c).max(seq);
            }
            9 if m.last_seq > 1 => {
                let up_to = rng.gen_range(1..m.last_seq);
                node.one(shard, trim(NS, &uid, up_to)).unwrap();
                let before = m.messages.len();
                m.messages.retain(|s, _| *s > up_to);
                m.trimmed += u64::try_from(before - m.messages.len()).unwrap();
            }
            _ => {}
        }
    }
}

/// What reads show of a mailbox: last seq, stored messages, cursors.
type Shown = (u64, BTreeMap<u64, Vec<u8>>, BTreeMap<Vec<u8>, u64>);

fn normalized(m: &Mailbox) -> Shown {
    (m.last_seq, m.messages.clone(), m.cursors.clone())
}

/// Every mailbox reads as the model from the shard that owns it, and is
/// refused with WrongShard by the other.
fn check(
    node: &Node,
    owner: impl Fn(usize) -> u64,
    other: impl Fn(usize) -> Option<u64>,
    model: &BTreeMap<usize, Mailbox>,
) {
    for (u, want) in model {
        let got = node.read(owner(*u), &user(*u)).unwrap();
        assert_eq!(normalized(&got), normalized(want), "user {u} on shard {}", owner(*u));
        if let Some(o) = other(*u) {
            match node.read(o, &user(*u)) {
                Err(ReadError::WrongShard { shard, .. }) => assert_eq!(shard, o),
                r => panic!("user {u} read from shard {o}, not its owner: {r:?}"),
            }
        }
    }
}

fn export(e: &Engine, shard: u64) -> Vec<SnapshotChunk> {
    let mut chunks = Vec::new();
    e.export_snapshot::<EngineError>(shard, 4 << 10, |c| {
        chunks.push(SnapshotChunk::decode(&c.encode())?);
        Ok(())
    })
    .unwrap();
    chunks
}

fn ingest(e: &Engine, shard: u64, chunks: &[SnapshotChunk]) {
    let mut ing = e.ingest_snapshot(shard).unwrap();
    let mut done = None;
    for c in chunks {
        done = ing.push(c).unwrap();
    }
    assert!(done.is_some());
}

/// A node with the parent bootstrapped and churned, the split hash at the
/// median user hash, and the model.
fn before_split(seed: u64) -> (Node, u64, BTreeMap<usize, Mailbox>, rand::rngs::StdRng) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut node = Node::new();
    node.e()
        .bootstrap_shard(PARENT, conf_state_with_voters(&[1, 2, 3]), 0, 0)
        .unwrap();
    let mut model = BTreeMap::new();
    let all: Vec<usize> = (0..USERS).collect();
    churn(&mut node, PARENT, &all, &mut model, &mut rng, 600);
    let mut hashes: Vec<u64> = (0..USERS).map(|u| hash(&user(u))).collect();
    hashes.sort_unstable();
    (node, hashes[USERS / 2], model, rng)
}

#[test]
fn a_split_copies_nothing_and_both_halves_read_and_write_as_the_model() {
    for seed in 0..4 {
        let (mut node, at, mut model, mut rng) = before_split(seed);
        let size_before = node.e().shard_size(PARENT, u64::MAX).unwrap();
        let split_index = node.index[&PARENT] + 1;
        let out = node.split(PARENT, CHILD, at).unwrap();
        assert_eq!(
            out,
            OpOutput::Split {
                new_shard: CHILD,
                range: HashRange { start: at, end: None },
                created: true
            }
        );
        node.index.insert(CHILD, split_index);
        let child = node.e().shard_meta(CHILD).unwrap().unwrap();
        assert_eq!(
            (child.space, child.applied_index, child.range.start),
            (PARENT, split_index, at)
        );
        let parent = node.e().shard_meta(PARENT).unwrap().unwrap();
        assert_eq!(
            parent.range,
            HashRange {
                start: 0,
                end: Some(at)
            }
        );
        // Nothing copied: the two halves' rows are the parent's rows from
        // before, plus the child's meta row.
        let lo = node.e().shard_size(PARENT, u64::MAX).unwrap();
        let hi = node.e().shard_size(CHILD, u64::MAX).unwrap();
        assert_eq!(lo.keys + hi.keys, size_before.keys + 1, "seed {seed}");
        assert!(lo.keys > 1 && hi.keys > 0);
        let owner = |u: usize| if hash(&user(u)) < at { PARENT } else { CHILD };
        let other = |u: usize| Some(if owner(u) == PARENT { CHILD } else { PARENT });
        check(&node, owner, other, &model);

        // Writes routed to the wrong half are refused and change nothing.
        for u in 0..USERS {
            let wrong = other(u).unwrap();
            let r = node.one(wrong, append(NS, &user(u), b"misrouted", b"x"));
            assert!(
                matches!(r, Err(OpError::WrongShard { shard, .. }) if shard == wrong),
                "{r:?}"
            );
        }
        // Both halves go on: retries of keys from before the split are
        // still deduplicated on whichever half owns the mailbox.
        let lows: Vec<usize> = (0..USERS).filter(|u| owner(*u) == PARENT).collect();
        let highs: Vec<usize> = (0..USERS).filter(|u| owner(*u) == CHILD).collect();
        churn(&mut node, PARENT, &lows, &mut model, &mut rng, 300);
        churn(&mut node, CHILD, &highs, &mut model, &mut rng, 300);
        check(&node, owner, other, &model);
        node.reopen();
        check(&node, owner, other, &model);

        // Each half's snapshot, into an empty node: its own space, its own
        // mailboxes only.
        for (shard, mine) in [(PARENT, &lows), (CHILD, &highs)] {
            let dst = Node::new();
            let chunks = export(node.e(), shard);
            // The stream carries this half's rows and no row of the other.
            let shipped: u64 = chunks.iter().map(|c| u64::from(c.records)).sum();
            assert_eq!(
                shipped,
                node.e().shard_size(shard, u64::MAX).unwrap().keys,
                "shard {shard}"
            );
            ingest(dst.e(), shard, &chunks);
            let meta = dst.e().shard_meta(shard).unwrap().unwrap();
            assert_eq!(meta.space, shard);
            assert_eq!(
                dst.e().shard_size(shard, u64::MAX).unwrap().keys,
                node.e().shard_size(shard, u64::MAX).unwrap().keys,
                "shard {shard}: the snapshot holds exactly its rows"
            );
            let part: BTreeMap<usize, Mailbox> = model
                .iter()
                .filter(|(u, _)| mine.contains(u))
                .map(|(u, m)| (*u, m.clone()))
                .collect();
            check(&dst, |_| shard, |_| None, &part);
        }
    }
}

#[test]
fn deleting_either_half_leaves_the_other_whole_and_an_ingest_never_writes_into_a_shared_space() {
    for parent_first in [true, false] {
        let (mut node, at, model, _) = before_split(7);
        let split_index = node.index[&PARENT] + 1;
        node.split(PARENT, CHILD, at).unwrap();
        node.index.insert(CHILD, split_index);
        let owner = |u: usize| if hash(&user(u)) < at { PARENT } else { CHILD };
        let parent_snapshot = export(node.e(), PARENT);
        let (gone, kept) = if parent_first { (PARENT, CHILD) } else { (CHILD, PARENT) };
        node.e().destroy_shard(gone).unwrap();
        assert_eq!(node.e().shard_ids().unwrap(), vec![kept]);
        let kept_part: BTreeMap<usize, Mailbox> = model
            .iter()
            .filter(|(u, _)| owner(**u) == kept)
            .map(|(u, m)| (*u, m.clone()))
            .collect();
        check(&node, |_| kept, |_| None, &kept_part);
        node.reopen();
        check(&node, |_| kept, |_| None, &kept_part);
        if parent_first {
            // The parent comes back by snapshot while the child still uses
            // the space under the parent's id: the rows go to a private
            // space, and both read as before.
            ingest(node.e(), PARENT, &parent_snapshot);
            let meta = node.e().shard_meta(PARENT).unwrap().unwrap();
            assert!(meta.space >= 1 << 63, "space {}", meta.space);
            check(&node, owner, |_| None, &model);
            // The child goes; the parent, whose meta row is the first key
            // of the child's space, stays whole.
            node.e().destroy_shard(CHILD).unwrap();
            assert_eq!(node.e().shard_ids().unwrap(), vec![PARENT]);
            let parent_part: BTreeMap<usize, Mailbox> = model
                .iter()
                .filter(|(u, _)| owner(**u) == PARENT)
                .map(|(u, m)| (*u, m.clone()))
                .collect();
            check(&node, |_| PARENT, |_| None, &parent_part);
            node.reopen();
            check(&node, |_| PARENT, |_| None, &parent_part);
            node.e().destroy_shard(PARENT).unwrap();
        } else {
            node.e().destroy_shard(PARENT).unwrap();
        }
        assert!(node.e().shard_ids().unwrap().is_empty());
        node.reopen();
        assert!(node.e().shard_ids().unwrap().is_empty());
    }
}

#[test]
fn a_split_that_finds_its_new_shard_already_here_only_shrinks_the_parent() {
    // Node A splits; node B is behind and gets the child's snapshot first.
    let (mut a, at, mut model, mut rng) = before_split(11);
    let mut b = Node::new();
    ingest(b.e(), PARENT, &export(a.e(), PARENT));
    b.index.insert(PARENT, a.index[&PARENT]);
    let split_index = a.index[&PARENT] + 1;
    a.split(PARENT, CHILD, at).unwrap();
    a.index.insert(CHILD, split_index);
    let owner = |u: usize| if hash(&user(u)) < at { PARENT } else { CHILD };
    let highs: Vec<usize> = (0..USERS).filter(|u| owner(*u) == CHILD).collect();
    churn(&mut a, CHILD, &highs, &mut model, &mut rng, 200);
    ingest(b.e(), CHILD, &export(a.e(), CHILD));
    let out = b.split(PARENT, CHILD, at).unwrap();
    assert!(matches!(out, OpOutput::Split { created: false, .. }), "{out:?}");
    assert_eq!(b.e().shard_meta(PARENT).unwrap().unwrap().range.end, Some(at));
    // The child's newer state stands; the parent's old rows of the upper
    // half are seen by neither.
    let other = |u: usize| Some(if owner(u) == PARENT { CHILD } else { PARENT });
    check(&b, owner, other, &model);
    let child = b.e().shard_meta(CHILD).unwrap().unwrap();
    assert_eq!((child.space, child.applied_index), (CHILD, a.index[&CHILD]));
}

#[test]
fn bad_splits_are_refused_the_same_on_every_replica_and_change_nothing() {
    let (mut node, at, model, _) = before_split(3);
    let refused = |r: Result<OpOutput, OpError>, field: &str| match r {
        Err(OpError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
        other => panic!("{other:?}"),
    };
    refused(node.split(PARENT, PARENT, at), "split.new_shard");
    refused(node.split(PARENT, 1 << 63, at), "split.new_shard");
    refused(node.split(PARENT, CHILD, 0), "split.split_hash");
    let with_another_op = node.exec(
        PARENT,
        vec![
            Op {
                op: Some(op::Op::Split(SplitOp {
                    new_shard: CHILD,
                    split_hash: at,
                })),
            },
            append(NS, b"u", b"k", b"p"),
        ],
    );
    assert!(with_another_op
        .iter()
        .all(|r| matches!(r, Err(OpError::InvalidArgument { field: "split", .. }))));
    // A split at the parent's new edge, once split, is outside its range.
    let split_index = node.index[&PARENT] + 1;
    node.split(PARENT, CHILD, at).unwrap();
    node.index.insert(CHILD, split_index);
    refused(node.split(PARENT, 9, at), "split.split_hash");
    refused(node.split(CHILD, 9, at), "split.split_hash");
    refused(node.split(CHILD, CHILD, at.wrapping_add(1)), "split.new_shard");
    assert_eq!(node.e().shard_ids().unwrap(), vec![PARENT, CHILD]);
    let owner = |u: usize| if hash(&user(u)) < at { PARENT } else { CHILD };
    check(&node, owner, |_| None, &model);
}

#[test]
fn dedup_expiry_on_a_shared_space_removes_only_its_own_shards_entries() {
    let (mut node, at, mut model, _) = before_split(5);
    let split_index = node.index[&PARENT] + 1;
    node.split(PARENT, CHILD, at).unwrap();
    node.index.insert(CHILD, split_index);
    let owner = |u: usize| if hash(&user(u)) < at { PARENT } else { CHILD };
    // Trim every mailbox through its last message: each trimmed message's
    // dedup entry starts its window (expiry index rows in the shared space).
    for u in 0..USERS {
        let m = model.entry(u).or_default();
        if m.last_seq > 0 {
            if let Ok(OpOutput::Trimmed { removed, .. }) = node.one(owner(u), trim(NS, &user(u), m.last_seq)) {
                m.trimmed += removed;
            }
        }
    }
    let mut trimmed = BTreeMap::<u64, u64>::new();
    for (u, m) in &model {
        *trimmed.entry(owner(*u)).or_default() += m.trimmed;
    }
    assert!(trimmed[&PARENT] > 0 && trimmed[&CHILD] > 0);
    // Far past the window: every entry has expired.
    let mut removed = BTreeMap::new();
    for shard in [PARENT, CHILD] {
        let results = node.exec_at(shard, 1_000 + 30 * 24 * 3_600_000, vec![common::expire(10_000)]);
        let Ok(OpOutput::DedupExpired { removed: r }) = results[0] else {
            panic!("{results:?}")
        };
        removed.insert(shard, r);
    }
    // Each shard removes the entries of its own mailboxes' trimmed messages,
    // none of the other half's.
    assert_eq!(removed, trimmed);
}

/// Retention in a shared space (D43): each half's retain op visits the
/// namespace's mailboxes of both halves (they share the keys) but trims
/// only its own, so the other half's mailboxes stay as they were.
#[test]
fn retention_on_a_shared_space_trims_only_its_own_shards_mailboxes() {
    let (mut node, at, _, _) = before_split(6);
    let split_index = node.index[&PARENT] + 1;
    node.split(PARENT, CHILD, at).unwrap();
    node.index.insert(CHILD, split_index);
    let owner = |u: usize| if hash(&user(u)) < at { PARENT } else { CHILD };
    let info = |node: &Node, u: usize| node.e().mailbox_info(owner(u), NS, &user(u)).unwrap();
    let before: Vec<_> = (0..USERS).map(|u| info(&node, u)).collect();
    let stored = |i: &pigeonhole_engine::MailboxInfo| (i.last_seq + 1).saturating_sub(i.low_watermark);
    let expected: u64 = (0..USERS)
        .filter(|u| owner(*u) == PARENT)
        .map(|u| stored(&before[u]).saturating_sub(1))
        .sum();
    assert!(expected > 0);
    let keep_one = Op {
        op: Some(op::Op::Retain(pigeonhole_engine::command::RetainOp {
            namespace: NS.into(),
            messages_per_mailbox_max: 1,
            mailboxes_max: 1_000,
            messages_max: 10_000,
            ..Default::default()
        })),
    };
    let results = node.exec(PARENT, vec![keep_one]);
    let Ok(OpOutput::Retained {
        mailboxes,
        removed,
        next,
    }) = &results[0]
    else {
        panic!("{results:?}")
    };
    assert_eq!((*removed, next.clone()), (expected, None));
    let with_messages = before.iter().filter(|i| stored(i) > 0).count();
    assert_eq!(
        *mailboxes,
        u64::try_from(with_messages).unwrap(),
        "both halves' mailboxes are visited"
    );
    for (u, was) in before.iter().enumerate() {
        let after = info(&node, u);
        if owner(u) == PARENT {
            assert!(stored(&after) <= 1, "user {u}: {after:?}");
        } else {
            assert_eq!(&after, was, "user {u} of the other half was touched");
        }
    }
}

/// The size scan's split point halves a shard's bytes, not its hash range:
/// with the big mailboxes in the top quarter of the hashes, the point moves
/// up, and a split there leaves each half near half the bytes. A shard of
/// one mailbox has no such point.
#[test]
fn the_size_scan_finds_where_a_split_halves_the_bytes() {
    let mut node = Node::new();
    node.e()
        .bootstrap_shard(PARENT, conf_state_with_voters(&[1, 2, 3]), 0, 0)
        .unwrap();
    let top_quarter = 3u64 << 62;
    for u in 0..400 {
        let big = hash(&user(u)) >= top_quarter;
        let payload = vec![b'x'; if big { 2_048 } else { 64 }];
        for m in 0..4 {
            let key = format!("k{m}");
            node.one(PARENT, append(NS, &user(u), key.as_bytes(), &payload))
                .unwrap();
        }
    }
    let scan = node
        .e()
        .size_scan(PARENT, u64::MAX, HashRange::FULL, &Default::default())
        .unwrap();
    assert!(scan.size.complete);
    assert_eq!(scan.size, node.e().shard_size(PARENT, u64::MAX).unwrap());
    let at = scan.split_at.expect("a split point");
    assert!(at > top_quarter, "the point follows the bytes: {at:#x}");
    node.split(PARENT, CHILD, at).unwrap();
    let lo = node.e().shard_size(PARENT, u64::MAX).unwrap().bytes;
    let hi = node.e().shard_size(CHILD, u64::MAX).unwrap().bytes;
    let total = lo + hi;
    for half in [lo, hi] {
        assert!(half * 10 >= total * 4, "halves {lo} and {hi}");
    }

    let mut one = Node::new();
    one.e()
        .bootstrap_shard(PARENT, conf_state_with_voters(&[1, 2, 3]), 0, 0)
        .unwrap();
    for m in 0..50 {
        let key = format!("k{m}");
        one.one(PARENT, append(NS, &user(1), key.as_bytes(), &[b'y'; 512]))
            .unwrap();
    }
    let scan = one
        .e()
        .size_scan(PARENT, u64::MAX, HashRange::FULL, &Default::default())
        .unwrap();
    assert!(scan.size.bytes > 50 * 512);
    assert_eq!(scan.split_at, None, "one mailbox cannot be split");
}
