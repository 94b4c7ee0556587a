//! One test per operation and per limit of the mailbox state machine.
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
#[path = "mailbox/sizes.rs"]
mod sizes;
#[path = "mailbox/system.rs"]
mod system;

use common::*;
use pigeonhole_engine::{
    ApplyEntry, Durability, EngineError, EngineOptions, EntryKind, EntryOutcome, Limits, OpError, OpOutput, ReadError,
    SyncQuery,
};

#[test]
fn append_numbers_each_mailbox_from_one_without_gaps() {
    let mut s = Shard::new();
    let r = s.exec(vec![
        append("messenger", b"alice", b"k1", b"a"),
        append("messenger", b"alice", b"k2", b"b"),
        append("messenger", b"bob", b"k1", b"c"),
        // Same user id in another namespace is another mailbox.
        append("whatsapp", b"alice", b"k1", b"d"),
    ]);
    assert!(appended(1, false)(&r[0]));
    assert!(appended(2, false)(&r[1]));
    assert!(appended(1, false)(&r[2]));
    assert!(appended(1, false)(&r[3]));
    assert!(appended(3, false)(&s.one(append("messenger", b"alice", b"k3", b"e"))));
    let page = s.sync("messenger", b"alice", 0);
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(page.messages[1].payload, b"b");
    assert_eq!(page.messages[1].idempotency_key, b"k2");
    assert_eq!(s.sync("whatsapp", b"alice", 0).messages[0].payload, b"d");
}

#[test]
fn duplicate_key_returns_original_seq_and_writes_nothing() {
    let mut s = Shard::new();
    assert!(appended(1, false)(&s.one(append("ns", b"u", b"key", b"hello"))));
    assert!(appended(2, false)(&s.one(append("ns", b"u", b"other", b"x"))));
    s.time_ms += 5_000;
    let r = s.one(append("ns", b"u", b"key", b"hello"));
    // The original time comes back too, not the retry's.
    assert_eq!(
        r,
        Ok(OpOutput::Appended {
            seq: 1,
            duplicate: true,
            time_ms: 1_000
        })
    );
    // Twice in one command: the second sees the first.
    let r = s.exec(vec![append("ns", b"u", b"new", b"n"), append("ns", b"u", b"new", b"n")]);
    assert!(appended(3, false)(&r[0]));
    assert!(appended(3, true)(&r[1]));
    assert_eq!(s.sync("ns", b"u", 0).messages.len(), 3);
    assert_eq!(s.sync("ns", b"u", 0).last_seq, 3);
}

#[test]
fn reused_key_with_another_payload_is_refused() {
    let mut s = Shard::new();
    s.one(append("ns", b"u", b"key", b"hello")).unwrap();
    assert_eq!(
        s.one(append("ns", b"u", b"key", b"HELLO")),
        Err(OpError::IdempotencyKeyReused { seq: 1 })
    );
    assert_eq!(s.sync("ns", b"u", 0).last_seq, 1);
}

#[test]
fn expected_last_seq_is_checked_after_dedup() {
    let mut s = Shard::new();
    assert!(appended(1, false)(&s.one(append_if("ns", b"u", b"a", b"1", 0))));
    assert_eq!(
        s.one(append_if("ns", b"u", b"b", b"2", 0)),
        Err(OpError::ExpectedLastSeqMismatch { expected: 0, actual: 1 })
    );
    // The retry of the first, committed, conditional append gets its seq back.
    assert!(appended(1, true)(&s.one(append_if("ns", b"u", b"a", b"1", 0))));
    assert!(appended(2, false)(&s.one(append_if("ns", b"u", b"b", b"2", 1))));
}

/// Apply builds the dedup keys of a call's appends before it runs their
/// ops, to read them in one lookup (D51); an append past a limit must still
/// be a rejection naming the field, never a key built from it (a namespace
/// past 255 bytes or a user id past 65,535 has no key encoding).
#[test]
fn appends_past_a_limit_in_a_batched_call_are_rejections() {
    let mut opts = EngineOptions::default();
    opts.dedup_prefetch_min_appends = 1;
    let mut s = Shard::with_options(opts);
    let r = s.exec(vec![
        append(&"a".repeat(300), b"u", b"k", b"p"),
        append("ns", &vec![1; 70_000], b"k", b"p"),
        append("ns", b"u", &vec![1; 300], b"p"),
        append("ns", b"u", b"k", b"p"),
    ]);
    let fields: Vec<_> = r
        .iter()
        .take(3)
        .map(|x| match x {
            Err(OpError::InvalidArgument { field, .. }) => *field,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(fields, vec!["mailbox.namespace", "mailbox.user_id", "idempotency_key"]);
    assert!(appended(1, false)(&r[3]));
}

#[test]
fn every_limit_is_enforced_and_named_and_writes_nothing() {
    let mut s = Shard::new();
    let l = Limits::default();
    let long_ns = "a".repeat(l.namespace_bytes_max + 1);
    let cases: Vec<(pigeonhole_engine::command::Op, &str)> = vec![
        (append("", b"u", b"k", b"p"), "mailbox.namespace"),
        (append(&long_ns, b"u", b"k", b"p"), "mailbox.namespace"),
        (append("Bad", b"u", b"k", b"p"), "mailbox.namespace"),
        (append("ns", b"", b"k", b"p"), "mailbox.user_id"),
        (
            append("ns", &vec![1; l.user_id_bytes_max + 1], b"k", b"p"),
            "mailbox.user_id",
        ),
        (append("ns", b"u", b"", b"p"), "idempotency_key"),
        (
            append("ns", b"u", &vec![1; l.idempotency_key_bytes_max + 1], b"p"),
            "idempotency_key",
        ),
        (append("ns", b"u", b"k", &vec![0; l.payload_bytes_max + 1]), "payload"),
        (ack("ns", b"u", b"", 0), "device_id"),
        (ack("ns", b"u", &vec![1; l.device_id_bytes_max + 1], 0), "device_id"),
        (expire(0), "expire_dedup.max_entries"),
        (expire(l.expire_dedup_entries_max + 1), "expire_dedup.max_entries"),
        (retain("ns", b"", 0, 1), "retain.mailboxes_max"),
        (
            retain("ns", b"", pigeonhole_engine::RETAIN_MAILBOXES_MAX + 1, 1),
            "retain.mailboxes_max",
        ),
        (retain("ns", b"", 1, 0), "retain.messages_max"),
        (
            retain("ns", b"", 1, pigeonhole_engine::RETAIN_MESSAGES_MAX + 1),
            "retain.messages_max",
        ),
        (retain("ns", b"\x02ab\x00\x01u", 1, 1), "retain.from_mailbox"),
        (retain("ns", b"\x02ns\x00\x01", 1, 1), "retain.from_mailbox"),
        (retain("Bad", b"", 1, 1), "mailbox.namespace"),
        (
            {
                let mut o = trim("ns", b"u", 0);
                if let Some(pigeonhole_engine::command::op::Op::Trim(t)) = &mut o.op {
                    t.dedup_window_ms = pigeonhole_engine::DEDUP_WINDOW_MS_MAX + 1;
                }
                o
            },
            "trim.dedup_window_ms",
        ),
    ];
    // A from_mailbox of the op's namespace is accepted.
    assert!(matches!(
        s.one(retain("ns", b"\x02ns\x00\x01u", 1, 1)),
        Ok(pigeonhole_engine::OpOutput::Retained { .. })
    ));
    for (op, field) in cases {
        match s.one(op) {
            Err(OpError::InvalidArgument { field: f, reason }) => {
                assert_eq!(f, field);
                assert!(reason.contains("must"), "{reason}");
            }
            other => panic!("{field}: expected InvalidArgument, got {other:?}"),
        }
    }
    // Exactly at the limits is fine.
    let max_payload = vec![7u8; l.payload_bytes_max];
    let max_key = vec![1u8; l.idempotency_key_bytes_max];
    let max_uid = vec![2u8; l.user_id_bytes_max];
    let ns = "z".repeat(l.namespace_bytes_max);
    assert!(appended(1, false)(&s.one(append(
        &ns,
        &max_uid,
        &max_key,
        &max_payload
    ))));
    assert_eq!(s.sync(&ns, &max_uid, 0).messages[0].payload.len(), l.payload_bytes_max);
    assert_eq!(s.sync("ns", b"u", 0).last_seq, 0, "rejected ops wrote nothing");
}

#[test]
fn command_limits_reject_the_whole_entry_but_move_the_index() {
    let mut s = Shard::new();
    let l = Limits::default();
    let too_many: Vec<_> = (0..=l.ops_per_command_max)
        .map(|i| ack("ns", b"u", format!("d{i}").as_bytes(), 0))
        .collect();
    for bytes in [
        encode(1, vec![]),
        encode(1, too_many),
        bytes::Bytes::from_static(b"\xff\xff not protobuf"),
    ] {
        s.index += 1;
        let out = s
            .engine()
            .apply(
                s.id,
                &[ApplyEntry {
                    index: s.index,
                    term: 1,
                    kind: EntryKind::Command(&bytes),
                }],
                Durability::NoFsync,
            )
            .unwrap();
        assert!(
            matches!(&out[0], EntryOutcome::Rejected(OpError::MalformedCommand(_))),
            "{out:?}"
        );
    }
    assert_eq!(s.engine().shard_meta(s.id).unwrap().unwrap().applied_index, 3);
    assert_eq!(s.engine().cursors(s.id, "ns", b"u").unwrap().cursors.len(), 0);
}

#[test]
fn sync_pages_by_count_and_bytes_and_reports_has_more() {
    let mut s = Shard::new();
    for i in 1..=10u8 {
        s.one(append("ns", b"u", &[i], &vec![i; 100])).unwrap();
    }
    let q = |after, max_messages, max_bytes| SyncQuery {
        namespace: "ns",
        user_id: b"u",
        after_seq: after,
        max_messages,
        max_bytes,
    };
    let p = s.engine().sync(s.id, &q(0, 3, 0)).unwrap();
    assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(p.has_more);
    assert_eq!((p.last_seq, p.low_watermark), (10, 1));
    let p = s.engine().sync(s.id, &q(3, 0, 250)).unwrap();
    assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4, 5]);
    // One message larger than max_bytes still comes, alone.
    let p = s.engine().sync(s.id, &q(5, 0, 10)).unwrap();
    assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![6]);
    let p = s.engine().sync(s.id, &q(8, 0, 0)).unwrap();
    assert_eq!(p.messages.len(), 2);
    assert!(!p.has_more);
    let p = s.engine().sync(s.id, &q(10, 0, 0)).unwrap();
    assert!(p.messages.is_empty() && !p.has_more);
    // An unknown mailbox is empty, not an error.
    assert_eq!(s.sync("ns", b"nobody", 0).last_seq, 0);
    let l = Limits::default();
    for (m, b, field) in [
        (l.sync_messages_max + 1, 0, "max_messages"),
        (0, l.sync_bytes_max + 1, "max_bytes"),
    ] {
        match s.engine().sync(s.id, &q(0, m, b)) {
            Err(ReadError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        s.engine().sync(s.id, &q(11, 0, 0)),
        Err(ReadError::CursorAhead {
            after_seq: 11,
            last_seq: 10
        })
    ));
}

#[test]
fn ack_moves_forward_only_and_cursors_report_unread() {
    let mut s = Shard::new();
    for i in 1..=5u8 {
        s.one(append("ns", b"u", &[i], b"p")).unwrap();
    }
    assert_eq!(
        s.one(ack("ns", b"u", b"phone", 3)),
        Ok(OpOutput::Acked {
            cursor: 3,
            advanced: true
        })
    );
    assert_eq!(
        s.one(ack("ns", b"u", b"phone", 2)),
        Ok(OpOutput::Acked {
            cursor: 3,
            advanced: false
        })
    );
    assert_eq!(
        s.one(ack("ns", b"u", b"phone", 3)),
        Ok(OpOutput::Acked {
            cursor: 3,
            advanced: false
        })
    );
    assert_eq!(
        s.one(ack("ns", b"u", b"phone", 6)),
        Err(OpError::AckBeyondLastSeq { seq: 6, last_seq: 5 })
    );
    assert_eq!(
        s.one(ack("ns", b"u", b"laptop", 0)),
        Ok(OpOutput::Acked {
            cursor: 0,
            advanced: false
        })
    );
    let c = s.engine().cursors(s.id, "ns", b"u").unwrap();
    assert_eq!(c.cursors, vec![(b"laptop".to_vec(), 0), (b"phone".to_vec(), 3)]);
    assert_eq!(c.last_seq - c.cursors[1].1, 2, "unread = last_seq - cursor");
    assert_eq!(s.engine().mailbox_info(s.id, "ns", b"u").unwrap().cursor_count, 2);
}

#[test]
fn cursor_count_is_limited() {
    let mut opts = EngineOptions::default();
    opts.limits.cursors_per_mailbox_max = 2;
    let mut s = Shard::with_options(opts);
    s.one(ack("ns", b"u", b"a", 0)).unwrap();
    s.one(ack("ns", b"u", b"b", 0)).unwrap();
    assert_eq!(
        s.one(ack("ns", b"u", b"c", 0)),
        Err(OpError::TooManyCursors { limit: 2 })
    );
    // Existing devices still ack.
    s.one(append("ns", b"u", b"k", b"p")).unwrap();
    assert!(s.one(ack("ns", b"u", b"a", 1)).is_ok());
}

#[test]
fn trim_raises_the_low_watermark_and_trimmed_cursors_are_typed_errors() {
    let mut s = Shard::new();
    for i in 1..=6u8 {
        s.one(append("ns", b"u", &[i], &[i; 10])).unwrap();
    }
    assert_eq!(
        s.one(trim("ns", b"u", 7)),
        Err(OpError::TrimBeyondLastSeq {
            up_to_seq: 7,
            last_seq: 6
        })
    );
    assert_eq!(
        s.one(trim("ns", b"u", 3)),
        Ok(OpOutput::Trimmed {
            low_watermark: 4,
            removed: 3
        })
    );
    assert_eq!(
        s.one(trim("ns", b"u", 2)),
        Ok(OpOutput::Trimmed {
            low_watermark: 4,
            removed: 0
        })
    );
    let p = s.sync("ns", b"u", 3);
    assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4, 5, 6]);
    assert_eq!(p.low_watermark, 4);
    match s.engine().sync(
        s.id,
        &SyncQuery {
            namespace: "ns",
            user_id: b"u",
            after_seq: 2,
            max_messages: 0,
            max_bytes: 0,
        },
    ) {
        Err(ReadError::CursorTrimmed {
            after_seq: 2,
            low_watermark: 4,
        }) => {}
        other => panic!("expected CursorTrimmed, got {other:?}"),
    }
    assert_eq!(s.engine().mailbox_info(s.id, "ns", b"u").unwrap().payload_bytes, 30);
    // Trim everything; new appends continue the numbering.
    assert_eq!(
        s.one(trim("ns", b"u", 6)),
        Ok(OpOutput::Trimmed {
            low_watermark: 7,
            removed: 3
        })
    );
    assert!(appended(7, false)(&s.one(append("ns", b"u", b"new", b"p"))));
    assert_eq!(s.sync("ns", b"u", 6).messages[0].seq, 7);
}

#[test]
fn delete_leaves_a_tombstone_and_order_has_no_gaps() {
    let mut s = Shard::new();
    for i in 1..=3u8 {
        s.one(append("ns", b"u", &[i], b"secret")).unwrap();
    }
    assert_eq!(s.one(delete("ns", b"u", 2)), Ok(OpOutput::Deleted { deleted: true }));
    assert_eq!(s.one(delete("ns", b"u", 2)), Ok(OpOutput::Deleted { deleted: false }));
    assert_eq!(
        s.one(delete("ns", b"u", 4)),
        Err(OpError::SeqNotFound {
            seq: 4,
            low_watermark: 1,
            last_seq: 3
        })
    );
    assert_eq!(
        s.one(delete("ns", b"u", 0)),
        Err(OpError::SeqNotFound {
            seq: 0,
            low_watermark: 1,
            last_seq: 3
        })
    );
    let p = s.sync("ns", b"u", 0);
    assert_eq!(
        p.messages.iter().map(|m| (m.seq, m.deleted)).collect::<Vec<_>>(),
        vec![(1, false), (2, true), (3, false)]
    );
    assert!(p.messages[1].payload.is_empty());
    assert_eq!(s.engine().mailbox_info(s.id, "ns", b"u").unwrap().payload_bytes, 12);
    // The deleted message's key still deduplicates.
    assert!(appended(2, true)(&s.one(append("ns", b"u", &[2], b"secret"))));
    // Trimming past a tombstone works and counts it.
    assert_eq!(
        s.one(trim("ns", b"u", 2)),
        Ok(OpOutput::Trimmed {
            low_watermark: 3,
            removed: 2
        })
    );
    assert_eq!(
        s.one(delete("ns", b"u", 1)),
        Err(OpError::SeqNotFound {
            seq: 1,
            low_watermark: 3,
            last_seq: 3
        })
    );
}

#[test]
fn dedup_holds_for_the_window_after_trim_then_expires() {
    let mut opts = EngineOptions::default();
    opts.dedup_window_ms = 10_000;
    let mut s = Shard::with_options(opts);
    s.one(append("ns", b"u", b"k1", b"p")).unwrap();
    s.one(append("ns", b"u", b"k2", b"p")).unwrap();
    s.time_ms = 2_000;
    s.one(trim("ns", b"u", 2)).unwrap(); // window ends at 12_000
    s.time_ms = 11_999;
    assert!(appended(1, true)(&s.one(append("ns", b"u", b"k1", b"p"))));
    // Nothing has expired yet.
    assert_eq!(s.one(expire(100)), Ok(OpOutput::DedupExpired { removed: 0 }));
    s.time_ms = 12_000;
    // Past the window the key is new again (lazily, before any GC)...
    assert!(appended(3, false)(&s.one(append("ns", b"u", b"k1", b"p"))));
    // ...and GC removes what is left, bounded by max_entries.
    assert_eq!(s.one(expire(100)), Ok(OpOutput::DedupExpired { removed: 1 }));
    assert_eq!(s.one(expire(100)), Ok(OpOutput::DedupExpired { removed: 0 }));
    assert!(appended(4, false)(&s.one(append("ns", b"u", b"k2", b"p"))));
}

#[test]
fn shard_time_never_goes_backwards() {
    let mut s = Shard::new();
    s.time_ms = 5_000;
    s.one(append("ns", b"u", b"a", b"p")).unwrap();
    s.time_ms = 4_000; // a new leader with a slow clock
    let r = s.one(append("ns", b"u", b"b", b"p"));
    assert_eq!(
        r,
        Ok(OpOutput::Appended {
            seq: 2,
            duplicate: false,
            time_ms: 5_000
        })
    );
    assert_eq!(s.engine().shard_meta(s.id).unwrap().unwrap().time_ms, 5_000);
}

#[test]
fn reapplying_an_index_changes_nothing_and_gaps_are_refused() {
    let s = Shard::new();
    let bytes = encode(1_000, vec![append("ns", b"u", b"k", b"p")]);
    let e = |index| ApplyEntry {
        index,
        term: 1,
        kind: EntryKind::Command(&bytes),
    };
    let out = s.engine().apply(s.id, &[e(1)], Durability::Fsync).unwrap();
    assert!(matches!(&out[0], EntryOutcome::Command { results, .. } if appended(1, false)(&results[0])));
    // The same index again (a replay after a crash) is skipped entirely.
    let out = s.engine().apply(s.id, &[e(1)], Durability::Fsync).unwrap();
    assert_eq!(out, vec![EntryOutcome::AlreadyApplied]);
    assert_eq!(s.sync("ns", b"u", 0).last_seq, 1);
    // A batch that overlaps the applied index applies only the new part.
    let bytes2 = encode(1_000, vec![append("ns", b"u", b"k2", b"p")]);
    let out = s
        .engine()
        .apply(
            s.id,
            &[
                e(1),
                ApplyEntry {
                    index: 2,
                    term: 1,
                    kind: EntryKind::Command(&bytes2),
                },
            ],
            Durability::Fsync,
        )
        .unwrap();
    assert_eq!(out[0], EntryOutcome::AlreadyApplied);
    assert!(matches!(&out[1], EntryOutcome::Command { results, .. } if appended(2, false)(&results[0])));
    match s.engine().apply(s.id, &[e(4)], Durability::Fsync) {
        Err(EngineError::ApplyOutOfOrder {
            applied: 2, index: 4, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // Empty and conf-change entries move the index only.
    let cs = pigeonhole_engine::conf_state_with_voters(&[1, 2, 3]);
    let out = s
        .engine()
        .apply(
            s.id,
            &[
                ApplyEntry {
                    index: 3,
                    term: 2,
                    kind: EntryKind::Empty,
                },
                ApplyEntry {
                    index: 4,
                    term: 2,
                    kind: EntryKind::ConfChange(cs.clone()),
                },
            ],
            Durability::Fsync,
        )
        .unwrap();
    assert_eq!(out, vec![EntryOutcome::Applied, EntryOutcome::Applied]);
    let meta = s.engine().shard_meta(s.id).unwrap().unwrap();
    assert_eq!((meta.applied_index, meta.applied_term, meta.conf_state), (4, 2, cs));
}

#[test]
fn state_survives_reopen() {
    let mut s = Shard::new();
    for i in 1..=20u8 {
        s.one(append("ns", &[i % 3], &[i], &[i; 50])).unwrap();
    }
    s.one(ack("ns", &[0], b"d", 2)).unwrap();
    s.one(trim("ns", &[1], 2)).unwrap();
    let before: Vec<_> = (0..3u8)
        .map(|u| s.sync("ns", &[u], if u == 1 { 2 } else { 0 }))
        .collect();
    s.reopen(EngineOptions::default());
    let after: Vec<_> = (0..3u8)
        .map(|u| s.sync("ns", &[u], if u == 1 { 2 } else { 0 }))
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        s.engine().cursors(s.id, "ns", &[0]).unwrap().cursors,
        vec![(b"d".to_vec(), 2)]
    );
    assert_eq!(s.engine().shard_meta(s.id).unwrap().unwrap().applied_index, 22);
    assert!(
        appended(7, true)(&s.one(append("ns", &[2], &[20], &[20; 50]))),
        "dedup index is on disk"
    );
}

#[test]
fn unknown_shards_are_errors_not_empty_answers() {
    let s = Shard::new();
    assert!(matches!(
        s.engine().sync(
            99,
            &SyncQuery {
                namespace: "ns",
                user_id: b"u",
                after_seq: 0,
                max_messages: 0,
                max_bytes: 0
            }
        ),
        Err(ReadError::Engine(EngineError::NoSuchShard(99)))
    ));
    assert!(matches!(
        s.engine().apply(99, &[], Durability::NoFsync),
        Err(EngineError::NoSuchShard(99))
    ));
    assert_eq!(s.engine().shard_ids().unwrap(), vec![SHARD]);
}
