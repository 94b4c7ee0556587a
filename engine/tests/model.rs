//! Property test: random command sequences run against the engine and a plain
//! in-memory model of the mailbox semantics. Every op result and every read
//! must be identical, including when indexes are re-applied (which must
//! change nothing) and across a reopen of the engine.
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

mod common;
#[path = "model/retention.rs"]
mod retention;

use common::*;
use pigeonhole_engine::command::{op::Op as O, Op};
use pigeonhole_engine::{
    ApplyEntry, Durability, EngineOptions, EntryKind, EntryOutcome, OpError, OpOutput, ReadError, SyncQuery,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

const WINDOW_MS: u64 = 50;
/// Of two lengths, so that the length byte of the encoded ids is exercised.
const NAMESPACES: [&str; 2] = ["a", "bb"];
/// User ids; one of 0xff bytes, so that a key successor carries.
const USERS: [&[u8]; 4] = [b"u1", b"u2", b"u3", &[0xff, 0xff]];

#[derive(Clone, Debug, Default)]
struct Msg {
    time: u64,
    key: Vec<u8>,
    payload: Vec<u8>,
    deleted: bool,
}

#[derive(Clone, Debug)]
struct Dedup {
    seq: u64,
    time: u64,
    crc: u32,
    expires: u64,
}

#[derive(Clone, Debug)]
struct Mailbox {
    last_seq: u64,
    low: u64,
    msgs: BTreeMap<u64, Msg>,
    cursors: BTreeMap<Vec<u8>, u64>,
    dedup: HashMap<Vec<u8>, Dedup>,
    held: bool,
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox {
            last_seq: 0,
            low: 1,
            msgs: BTreeMap::new(),
            cursors: BTreeMap::new(),
            dedup: HashMap::new(),
            held: false,
        }
    }
}

/// The whole specification of a shard, written as directly as possible.
#[derive(Clone, Debug, Default)]
struct Model {
    time: u64,
    boxes: BTreeMap<(String, Vec<u8>), Mailbox>,
    /// System values: key → (version, value).
    system: BTreeMap<Vec<u8>, (u64, Vec<u8>)>,
}

fn mb_key(ns: &str, uid: &[u8]) -> Vec<u8> {
    let mut k = vec![u8::try_from(ns.len()).unwrap()];
    k.extend_from_slice(ns.as_bytes());
    k.extend_from_slice(&u16::try_from(uid.len()).unwrap().to_be_bytes());
    k.extend_from_slice(uid);
    k
}

impl Model {
    fn start_window(&mut self, ns: &str, uid: &[u8], seq: u64, key: &[u8], window: u64) {
        let now = self.time;
        let window = if window == 0 { WINDOW_MS } else { window };
        let b = self.boxes.get_mut(&(ns.to_string(), uid.to_vec())).unwrap();
        if let Some(d) = b.dedup.get_mut(key) {
            if d.seq == seq && d.expires == 0 {
                d.expires = now + window;
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Result<OpOutput, OpError> {
        let invalid = |field: &'static str| OpError::InvalidArgument {
            field,
            reason: String::new(),
        };
        let now = self.time;
        let uid_empty = match op.op.as_ref().unwrap() {
            O::Append(a) => a.user_id.is_empty(),
            O::Ack(a) => a.user_id.is_empty(),
            O::Trim(t) => t.user_id.is_empty(),
            O::Delete(d) => d.user_id.is_empty(),
            O::Hold(h) => h.user_id.is_empty(),
            O::ExpireDedup(_) | O::PutSystem(_) | O::Split(_) | O::Retain(_) => false,
        };
        if uid_empty {
            return Err(invalid("mailbox.user_id"));
        }
        match op.op.as_ref().unwrap() {
            O::Append(a) => {
                if a.idempotency_key.is_empty() {
                    return Err(invalid("idempotency_key"));
                }
                let b = self.boxes.entry((a.namespace.clone(), a.user_id.clone())).or_default();
                let crc = crc32fast::hash(&a.payload);
                if let Some(d) = b.dedup.get(&a.idempotency_key) {
                    if d.expires == 0 || d.expires > now {
                        if d.crc != crc {
                            return Err(OpError::IdempotencyKeyReused { seq: d.seq });
                        }
                        return Ok(OpOutput::Appended {
                            seq: d.seq,
                            duplicate: true,
                            time_ms: d.time,
                        });
                    }
                }
                if let Some(e) = a.expected_last_seq {
                    if e != b.last_seq {
                        return Err(OpError::ExpectedLastSeqMismatch {
                            expected: e,
                            actual: b.last_seq,
                        });
                    }
                }
                // Only a successful append replaces an expired dedup entry; a
                // rejected one changes nothing (it is still there for GC).
                b.dedup.remove(&a.idempotency_key);
                b.last_seq += 1;
                let seq = b.last_seq;
                b.msgs.insert(
                    seq,
                    Msg {
                        time: now,
                        key: a.idempotency_key.clone(),
                        payload: a.payload.to_vec(),
                        deleted: false,
                    },
                );
                b.dedup.insert(
                    a.idempotency_key.clone(),
                    Dedup {
                        seq,
                        time: now,
                        crc,
                        expires: 0,
                    },
                );
                Ok(OpOutput::Appended {
                    seq,
                    duplicate: false,
                    time_ms: now,
                })
            }
            O::Ack(a) => {
                if a.device_id.is_empty() {
                    return Err(invalid("device_id"));
                }
                let b = self.boxes.entry((a.namespace.clone(), a.user_id.clone())).or_default();
                if a.seq > b.last_seq {
                    return Err(OpError::AckBeyondLastSeq {
                        seq: a.seq,
                        last_seq: b.last_seq,
                    });
                }
                match b.cursors.get(&a.device_id) {
                    Some(&c) if a.seq <= c => Ok(OpOutput::Acked {
                        cursor: c,
                        advanced: false,
                    }),
                    _ => {
                        b.cursors.insert(a.device_id.clone(), a.seq);
                        Ok(OpOutput::Acked {
                            cursor: a.seq,
                            advanced: a.seq > 0,
                        })
                    }
                }
            }
            O::Trim(t) => {
                let b = self.boxes.entry((t.namespace.clone(), t.user_id.clone())).or_default();
                if b.held {
                    return Err(OpError::LegalHold);
                }
                if t.up_to_seq > b.last_seq {
                    return Err(OpError::TrimBeyondLastSeq {
                        up_to_seq: t.up_to_seq,
                        last_seq: b.last_seq,
                    });
                }
                if t.up_to_seq < b.low {
                    return Ok(OpOutput::Trimmed {
                        low_watermark: b.low,
                        removed: 0,
                    });
                }
                let removed = self.trim_to(&t.namespace, &t.user_id, t.up_to_seq, t.dedup_window_ms);
                let low = self.boxes[&(t.namespace.clone(), t.user_id.clone())].low;
                Ok(OpOutput::Trimmed {
                    low_watermark: low,
                    removed,
                })
            }
            O::Delete(d) => {
                let b = self.boxes.entry((d.namespace.clone(), d.user_id.clone())).or_default();
                if b.held {
                    return Err(OpError::LegalHold);
                }
                if d.seq < b.low || d.seq > b.last_seq {
                    return Err(OpError::SeqNotFound {
                        seq: d.seq,
                        low_watermark: b.low,
                        last_seq: b.last_seq,
                    });
                }
                let m = b.msgs.get_mut(&d.seq).unwrap();
                if m.deleted {
                    return Ok(OpOutput::Deleted { deleted: false });
                }
                m.deleted = true;
                m.payload.clear();
                let key = m.key.clone();
                self.start_window(&d.namespace, &d.user_id, d.seq, &key, d.dedup_window_ms);
                Ok(OpOutput::Deleted { deleted: true })
            }
            O::PutSystem(p) => {
                if p.key.is_empty() {
                    return Err(invalid("put_system.key"));
                }
                let stored = self.system.get(&p.key).map_or(0, |v| v.0);
                if let Some(expected) = p.if_version.filter(|e| *e != stored) {
                    return Err(OpError::VersionConflict { expected, stored });
                }
                if p.version < stored {
                    return Err(OpError::StaleVersion {
                        given: p.version,
                        stored,
                    });
                }
                self.system.insert(p.key.clone(), (p.version, p.value.clone()));
                Ok(OpOutput::SystemPut { version: p.version })
            }
            O::Hold(h) => {
                let b = self.boxes.entry((h.namespace.clone(), h.user_id.clone())).or_default();
                let changed = b.held != h.held;
                b.held = h.held;
                Ok(OpOutput::Held { held: h.held, changed })
            }
            O::Retain(r) => self.retain(r),
            O::Split(_) => panic!("the model generates no splits (tests/split.rs checks them)"),
            O::ExpireDedup(x) => {
                let mut expired: Vec<(u64, Vec<u8>, Vec<u8>, (String, Vec<u8>))> = Vec::new();
                for (id, b) in &self.boxes {
                    for (k, d) in &b.dedup {
                        if d.expires != 0 && d.expires <= now {
                            expired.push((d.expires, mb_key(&id.0, &id.1), k.clone(), id.clone()));
                        }
                    }
                }
                expired.sort();
                expired.truncate(usize::try_from(x.max_entries).unwrap());
                for (_, _, k, id) in &expired {
                    self.boxes.get_mut(id).unwrap().dedup.remove(k);
                }
                Ok(OpOutput::DedupExpired {
                    removed: u64::try_from(expired.len()).unwrap(),
                })
            }
        }
    }
}

/// Invalid-argument reasons are prose; compare the field only.
fn normalize(r: Result<OpOutput, OpError>) -> Result<OpOutput, OpError> {
    match r {
        Err(OpError::InvalidArgument { field, .. }) => Err(OpError::InvalidArgument {
            field,
            reason: String::new(),
        }),
        other => other,
    }
}

fn arb_op() -> impl Strategy<Value = Op> {
    let ns = prop::sample::select(NAMESPACES.to_vec());
    // Mostly valid user ids; the empty one checks validation.
    let uid =
        prop_oneof![9 => prop::sample::select(USERS.iter().map(|u| u.to_vec()).collect::<Vec<_>>()), 1 => Just(vec![])];
    let key = prop_oneof![20 => (0u8..6).prop_map(|k| vec![b'k', k]), 1 => Just(vec![])];
    let window = prop::sample::select(vec![0u64, 10, 200]);
    let payload = prop_oneof![4 => prop::collection::vec(0u8..3, 0..4), 1 => Just(vec![9u8; 40])];
    prop_oneof![
        10 => (ns.clone(), uid.clone(), key, payload, prop::option::weighted(0.2, 0u64..6)).prop_map(|(n, u, k, p, e)| {
            let mut o = append(n, &u, &k, &p);
            if let Some(O::Append(a)) = &mut o.op { a.expected_last_seq = e; }
            o
        }),
        3 => (ns.clone(), uid.clone(), prop::sample::select(vec![b"d1".to_vec(), b"d2".to_vec(), vec![]]), 0u64..8)
            .prop_map(|(n, u, d, s)| ack(n, &u, &d, s)),
        2 => (ns.clone(), uid.clone(), 0u64..8, window.clone()).prop_map(|(n, u, s, w)| {
            let mut o = trim(n, &u, s);
            if let Some(O::Trim(t)) = &mut o.op { t.dedup_window_ms = w; }
            o
        }),
        2 => (ns.clone(), uid.clone(), 0u64..8, window.clone()).prop_map(|(n, u, s, w)| {
            let mut o = delete(n, &u, s);
            if let Some(O::Delete(d)) = &mut o.op { d.dedup_window_ms = w; }
            o
        }),
        1 => (ns.clone(), uid.clone(), any::<bool>()).prop_map(|(n, u, held)| Op {
            op: Some(O::Hold(pigeonhole_engine::command::HoldOp { namespace: n.into(), user_id: u, held })),
        }),
        3 => (ns, (prop::sample::select(vec![0u64, 5, 20, 100]), prop::sample::select(vec![0u64, 1, 2, 5]), any::<bool>(), window),
              prop_oneof![4 => Just(None), 2 => prop::sample::select(USERS.iter().map(|u| u.to_vec()).collect::<Vec<_>>()).prop_map(Some), 1 => Just(Some(vec![]))],
              0u32..4, 0u32..7)
            .prop_map(|(n, (ttl, max, acked, w), from, mailboxes_max, messages_max)| {
                // A from_mailbox of the other namespace checks validation.
                let from = match from {
                    None => Vec::new(),
                    Some(u) if u.is_empty() => mb_key(if n == "a" { "bb" } else { "a" }, b"u1"),
                    Some(u) => mb_key(n, &u),
                };
                Op {
                    op: Some(O::Retain(pigeonhole_engine::command::RetainOp {
                        namespace: n.into(),
                        ttl_ms: ttl,
                        messages_per_mailbox_max: max,
                        trim_acked: acked,
                        dedup_window_ms: w,
                        from_mailbox: from,
                        mailboxes_max,
                        messages_max,
                    })),
                }
            }),
        1 => (1u32..4).prop_map(expire),
        1 => (prop::sample::select(vec![b"a".to_vec(), b"b".to_vec(), vec![]]), 0u64..4, 0u8..3, prop::option::weighted(0.3, 0u64..4))
            .prop_map(|(k, v, x, i)| Op {
                op: Some(O::PutSystem(pigeonhole_engine::command::PutSystemOp { key: k, value: vec![x], version: v, if_version: i })),
            }),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    /// A batch of entries, each with its ops and its time advance (ms, may be
    /// negative: a leader with a slow clock).
    Apply(Vec<(Vec<Op>, i64)>),
    /// Re-apply an earlier index (by position from the end).
    Replay(usize),
    Reopen,
    /// Flush the state machine's memtable to an SST, so that reads merge
    /// SSTs (prefix blooms, prefix-mode seeks) with the memtable.
    Flush,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => prop::collection::vec((prop::collection::vec(arb_op(), 1..4), (-2i64..10).prop_map(|x| x * 5)), 1..4).prop_map(Step::Apply),
        2 => (0usize..8).prop_map(Step::Replay),
        1 => Just(Step::Reopen),
        1 => Just(Step::Flush),
    ]
}

fn check_reads(s: &Shard, m: &Model) {
    let sys: Vec<(Vec<u8>, u64, Vec<u8>)> = m.system.iter().map(|(k, (v, x))| (k.clone(), *v, x.clone())).collect();
    let got: Vec<(Vec<u8>, u64, Vec<u8>)> = s
        .engine()
        .system_scan(s.id, b"", 100)
        .unwrap()
        .into_iter()
        .map(|v| (v.key, v.version, v.value))
        .collect();
    assert_eq!(got, sys);
    for ns in NAMESPACES {
        for uid in USERS {
            let mb = m
                .boxes
                .get(&(ns.to_string(), uid.to_vec()))
                .cloned()
                .unwrap_or_default();
            let info = s.engine().mailbox_info(s.id, ns, uid).unwrap();
            assert_eq!(
                (info.last_seq, info.low_watermark, info.held),
                (mb.last_seq, mb.low, mb.held),
                "{ns}/{uid:?}"
            );
            let live: u64 = mb.msgs.values().map(|x| u64::try_from(x.payload.len()).unwrap()).sum();
            assert_eq!(info.payload_bytes, live);
            for after in 0..=mb.last_seq + 1 {
                let q = SyncQuery {
                    namespace: ns,
                    user_id: uid,
                    after_seq: after,
                    max_messages: 3,
                    max_bytes: 0,
                };
                let got = s.engine().sync(s.id, &q);
                if after > mb.last_seq {
                    assert!(matches!(got, Err(ReadError::CursorAhead { .. })));
                } else if after + 1 < mb.low {
                    assert!(
                        matches!(got, Err(ReadError::CursorTrimmed { low_watermark, .. }) if low_watermark == mb.low)
                    );
                } else {
                    let page = got.unwrap();
                    let want: Vec<_> = mb.msgs.range(after + 1..).take(3).collect();
                    assert_eq!(page.messages.len(), want.len());
                    for (g, (seq, w)) in page.messages.iter().zip(want) {
                        assert_eq!(
                            (g.seq, g.time_ms, &g.idempotency_key, &g.payload, g.deleted),
                            (*seq, w.time, &w.key, &w.payload, w.deleted)
                        );
                    }
                    assert_eq!(page.has_more, after + 3 < mb.last_seq);
                }
            }
            let c = s.engine().cursors(s.id, ns, uid).unwrap();
            let want: Vec<_> = mb.cursors.iter().map(|(d, s)| (d.clone(), *s)).collect();
            assert_eq!(c.cursors, want);
        }
    }
}

/// `head_row_every` and `heads_cached` are small so that short runs cross
/// head-row writes (I9) and rebuild heads from disk in apply, not only
/// after a reopen.
/// `prefetch_min` 1 sends every apply's dedup probes through the batched
/// lookup (D51), the default almost none of this test's small batches.
fn run(steps: Vec<Step>, head_row_every: u64, heads_cached: usize, prefetch_min: usize) {
    let mut opts = EngineOptions::default();
    opts.dedup_prefetch_min_appends = prefetch_min;
    opts.dedup_window_ms = WINDOW_MS;
    opts.head_row_every_appends = head_row_every;
    opts.heads_cached_per_shard_max = heads_cached;
    let mut s = Shard::with_options(opts.clone());
    let mut m = Model::default(); // a new shard's clock starts at 0
    let mut log: Vec<bytes::Bytes> = Vec::new(); // encoded command of each index
    for step in steps {
        match step {
            Step::Apply(entries) => {
                let mut encoded = Vec::new();
                let mut expected = Vec::new();
                for (ops, dt) in entries {
                    s.time_ms = s.time_ms.saturating_add_signed(dt);
                    m.time = m.time.max(s.time_ms);
                    expected.push((m.time, ops.iter().map(|o| normalize(m.apply(o))).collect::<Vec<_>>()));
                    encoded.push(encode(s.time_ms, ops));
                }
                let first = s.index + 1;
                let batch: Vec<_> = encoded
                    .iter()
                    .enumerate()
                    .map(|(i, b)| ApplyEntry {
                        index: first + u64::try_from(i).unwrap(),
                        term: 1,
                        kind: EntryKind::Command(b),
                    })
                    .collect();
                let out = s.engine().apply(s.id, &batch, Durability::NoFsync).unwrap();
                for (o, (want_time, want)) in out.into_iter().zip(expected) {
                    match o {
                        EntryOutcome::Command { results, time_ms, .. } => {
                            assert_eq!(time_ms, want_time);
                            let got: Vec<_> = results.into_iter().map(normalize).collect();
                            assert_eq!(got, want);
                        }
                        other => panic!("{other:?}"),
                    }
                }
                s.index += u64::try_from(encoded.len()).unwrap();
                log.extend(encoded);
            }
            Step::Replay(back) => {
                if log.is_empty() {
                    continue;
                }
                let i = log.len() - 1 - back.min(log.len() - 1);
                let e = ApplyEntry {
                    index: u64::try_from(i).unwrap() + 1,
                    term: 1,
                    kind: EntryKind::Command(&log[i]),
                };
                let out = s.engine().apply(s.id, &[e], Durability::NoFsync).unwrap();
                assert_eq!(out, vec![EntryOutcome::AlreadyApplied]);
            }
            Step::Reopen => s.reopen(opts.clone()),
            Step::Flush => s.engine().flush_data().unwrap(),
        }
        check_reads(&s, &m);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, max_shrink_iters: 2000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(
        steps in prop::collection::vec(arb_step(), 1..40),
        head_row_every in prop_oneof![1u64..=4, Just(pigeonhole_engine::HEAD_ROW_EVERY_APPENDS)],
        heads_cached in prop_oneof![0usize..=3, Just(pigeonhole_engine::HEADS_CACHED_PER_SHARD_DEFAULT)],
        prefetch_min in prop_oneof![Just(1usize), Just(pigeonhole_engine::DEDUP_PREFETCH_MIN_APPENDS_DEFAULT)],
    ) {
        run(steps, head_row_every, heads_cached, prefetch_min);
    }
}
