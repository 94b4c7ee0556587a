//! The checker against synthetic histories: one clean, and one per anomaly
//! it must catch (lost, duplicate, divergent, stale, gap, ...).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use pigeonhole_jepsen::checker::{check, Finals};
use pigeonhole_jepsen::history::{Kind, Msg, Op, F};
use std::collections::BTreeMap;

const MB: &str = "chat/u1";

/// Builds a history with a clock that ticks once per event.
#[derive(Default)]
struct H {
    ops: Vec<Op>,
}

impl H {
    fn push(&mut self, mut op: Op) -> &mut Self {
        op.index = self.ops.len() as u64;
        op.time_ns = self.ops.len() as u64 * 10;
        op.mailbox.get_or_insert_with(|| MB.to_string());
        self.ops.push(op);
        self
    }
    fn append_invoke(&mut self, p: u64, key: &str) -> &mut Self {
        let mut o = Op::new(p, Kind::Invoke, F::Append);
        o.key = Some(key.into());
        o.payload = Some(format!("v-{key}"));
        self.push(o)
    }
    fn append_done(&mut self, p: u64, kind: Kind, seq: Option<u64>, dup: bool) -> &mut Self {
        let mut o = Op::new(p, kind, F::Append);
        o.seq = seq;
        o.duplicate = seq.map(|_| dup);
        self.push(o)
    }
    /// An append acknowledged at `seq`, invoke and completion back to back.
    fn append(&mut self, p: u64, key: &str, seq: u64) -> &mut Self {
        self.append_invoke(p, key).append_done(p, Kind::Ok, Some(seq), false)
    }
    fn read(&mut self, p: u64, after: u64, seqs: &[(u64, &str)], last_seq: u64) -> &mut Self {
        let mut i = Op::new(p, Kind::Invoke, F::Sync);
        i.after_seq = Some(after);
        self.push(i);
        let mut d = Op::new(p, Kind::Ok, F::Sync);
        d.messages = Some(seqs.iter().map(|(s, k)| msg(*s, k)).collect());
        d.last_seq = Some(last_seq);
        self.push(d)
    }
    fn ack(&mut self, p: u64, device: &str, seq: u64, cursor: u64) -> &mut Self {
        let mut i = Op::new(p, Kind::Invoke, F::Ack);
        i.device = Some(device.into());
        i.seq = Some(seq);
        self.push(i);
        let mut d = Op::new(p, Kind::Ok, F::Ack);
        d.cursor = Some(cursor);
        self.push(d)
    }
}

fn msg(seq: u64, key: &str) -> Msg {
    Msg {
        seq,
        key: key.into(),
        payload: format!("v-{key}"),
        timestamp_ms: 1_000 + seq,
    }
}

fn finals(nodes: &[&[(u64, &str)]]) -> Finals {
    nodes
        .iter()
        .enumerate()
        .map(|(i, log)| {
            let msgs = log.iter().map(|(s, k)| msg(*s, k)).collect();
            (i as u64 + 1, BTreeMap::from([(MB.to_string(), msgs)]))
        })
        .collect()
}

fn kinds(h: &H, f: &Finals) -> Vec<&'static str> {
    let mut k: Vec<_> = check(&h.ops, f).into_iter().map(|a| a.kind).collect();
    k.sort_unstable();
    k.dedup();
    k
}

fn good() -> (H, Finals) {
    let mut h = H::default();
    h.append(1, "a", 1)
        .append(2, "b", 2)
        .read(3, 0, &[(1, "a"), (2, "b")], 2)
        .ack(3, "phone", 1, 1)
        .ack(3, "phone", 2, 2)
        // An unknown append that did commit, then its retry, told duplicate.
        .append_invoke(1, "c")
        .append_done(1, Kind::Info, None, false)
        .append_invoke(1, "c")
        .append_done(1, Kind::Ok, Some(3), true)
        // A failed append that is nowhere.
        .append_invoke(2, "d")
        .append_done(2, Kind::Fail, None, false)
        .read(3, 1, &[(2, "b"), (3, "c")], 3);
    let f = finals(&[&[(1, "a"), (2, "b"), (3, "c")], &[(1, "a"), (2, "b"), (3, "c")]]);
    (h, f)
}

#[test]
fn a_correct_history_passes() {
    let (h, f) = good();
    assert_eq!(check(&h.ops, &f), vec![]);
}

#[test]
fn a_lost_append_is_caught() {
    let (h, _) = good();
    let f = finals(&[&[(1, "a"), (2, "b")], &[(1, "a"), (2, "b")]]);
    assert!(kinds(&h, &f).contains(&"lost"), "{:?}", kinds(&h, &f));
}

#[test]
fn a_duplicate_is_caught() {
    let mut h = H::default();
    h.append(1, "a", 1).append(1, "a", 2);
    let f = finals(&[&[(1, "a"), (2, "a")]]);
    let k = kinds(&h, &f);
    assert!(
        k.contains(&"duplicate-key") && k.contains(&"duplicate-payload") && k.contains(&"inconsistent-ack"),
        "{k:?}"
    );
}

#[test]
fn divergent_replicas_and_reads_are_caught() {
    let (h, _) = good();
    let f = finals(&[&[(1, "a"), (2, "b"), (3, "c")], &[(1, "a"), (2, "c"), (3, "b")]]);
    assert!(kinds(&h, &f).contains(&"replicas-diverge"));
    let mut h = H::default();
    h.append(1, "a", 1).append(1, "b", 2).read(2, 0, &[(1, "b")], 2);
    let f = finals(&[&[(1, "a"), (2, "b")]]);
    assert!(kinds(&h, &f).contains(&"divergent-read"));
}

#[test]
fn stale_and_backwards_reads_are_caught() {
    let mut h = H::default();
    h.append(1, "a", 1).append(1, "b", 2).read(2, 0, &[(1, "a")], 1);
    let f = finals(&[&[(1, "a"), (2, "b")]]);
    assert_eq!(kinds(&h, &f), vec!["stale-read"]);
    let mut h = H::default();
    h.append_invoke(1, "a")
        .append_invoke(4, "b")
        .read(2, 0, &[(1, "a"), (2, "b")], 2)
        .read(3, 0, &[(1, "a")], 1)
        .append_done(1, Kind::Ok, Some(1), false)
        .append_done(4, Kind::Ok, Some(2), false);
    assert_eq!(kinds(&h, &f), vec!["read-backwards"]);
}

#[test]
fn gaps_are_caught() {
    let mut h = H::default();
    h.append(1, "a", 1).append(1, "b", 3);
    let f = finals(&[&[(1, "a"), (3, "b")]]);
    assert!(kinds(&h, &f).contains(&"gap"));
    let mut h = H::default();
    h.append(1, "a", 1)
        .append(1, "b", 2)
        .append(1, "c", 3)
        .read(2, 0, &[(1, "a"), (3, "c")], 3);
    let f = finals(&[&[(1, "a"), (2, "b"), (3, "c")]]);
    assert_eq!(kinds(&h, &f), vec!["read-gap"]);
}

#[test]
fn phantoms_and_failed_appends_that_appear_are_caught() {
    let mut h = H::default();
    h.append(1, "a", 1)
        .append_invoke(1, "b")
        .append_done(1, Kind::Fail, None, false);
    let f = finals(&[&[(1, "a"), (2, "b"), (3, "zz")]]);
    let k = kinds(&h, &f);
    assert!(k.contains(&"phantom") && k.contains(&"failed-visible"), "{k:?}");
}

#[test]
fn real_time_append_order_is_checked() {
    let mut h = H::default();
    h.append(1, "a", 2).append(2, "b", 1);
    let f = finals(&[&[(1, "b"), (2, "a")]]);
    assert_eq!(kinds(&h, &f), vec!["append-order"]);
}

#[test]
fn cursors_going_backwards_are_caught() {
    let mut h = H::default();
    h.append(1, "a", 1)
        .append(1, "b", 2)
        .ack(2, "phone", 2, 2)
        .ack(2, "phone", 1, 1);
    let f = finals(&[&[(1, "a"), (2, "b")]]);
    assert_eq!(kinds(&h, &f), vec!["cursor-backwards"]);
    let mut h = H::default();
    h.append(1, "a", 1).append(1, "b", 2).ack(2, "phone", 2, 1);
    assert_eq!(kinds(&h, &f), vec!["cursor-below-ack"]);
}

#[test]
fn a_malformed_history_is_reported_not_passed() {
    let mut h = H::default();
    h.append_invoke(1, "a").append_invoke(1, "b");
    let f = finals(&[&[]]);
    assert_eq!(kinds(&h, &f), vec!["malformed-history"]);
}

#[test]
fn histories_round_trip_through_json_lines() {
    let (h, _) = good();
    let text: String = h.ops.iter().map(|o| serde_json::to_string(o).unwrap() + "\n").collect();
    assert_eq!(pigeonhole_jepsen::history::parse(&text).unwrap(), h.ops);
}

#[test]
fn a_commit_time_going_back_is_caught() {
    let mut h = H::default();
    h.append(1, "a", 1).append(1, "b", 2);
    let mut f = finals(&[&[(1, "a"), (2, "b")]]);
    f.get_mut(&1).unwrap().get_mut(MB).unwrap()[1].timestamp_ms = 5;
    assert_eq!(kinds(&h, &f), vec!["timestamp-decreases"]);
}

impl H {
    /// A Subscribe event delivered to reader `p`.
    fn deliver(&mut self, p: u64, seqs: &[(u64, &str)]) -> &mut Self {
        let i = Op::new(p, Kind::Invoke, F::Deliver);
        self.push(i);
        let mut d = Op::new(p, Kind::Ok, F::Deliver);
        d.messages = Some(seqs.iter().map(|(s, k)| msg(*s, k)).collect());
        self.push(d)
    }
    /// A Subscribe stream of reader `p` ended; it resumes.
    fn stream_ended(&mut self, p: u64) -> &mut Self {
        let mut i = Op::new(p, Kind::Invoke, F::Subscribe);
        i.mailbox = Some(String::new());
        self.push(i);
        let mut d = Op::new(p, Kind::Info, F::Subscribe);
        d.error = Some("Unavailable: no leader".into());
        d.mailbox = Some(String::new());
        self.push(d)
    }
}

#[test]
fn subscribe_deliveries_across_resumes_are_checked() {
    let f = finals(&[&[(1, "a"), (2, "b"), (3, "c"), (4, "d")]]);
    let base = || {
        let mut h = H::default();
        h.append(1, "a", 1)
            .append(1, "b", 2)
            .append(1, "c", 3)
            .append(1, "d", 4);
        h
    };
    // Two readers, one of them resuming twice: clean.
    let mut h = base();
    h.deliver(7, &[(1, "a"), (2, "b")])
        .stream_ended(7)
        .deliver(7, &[(3, "c")])
        .stream_ended(7)
        .deliver(7, &[(4, "d")])
        .deliver(8, &[(1, "a"), (2, "b"), (3, "c"), (4, "d")]);
    assert_eq!(check(&h.ops, &f), vec![]);
    // A resume that skips a seq.
    let mut h = base();
    h.deliver(7, &[(1, "a")])
        .stream_ended(7)
        .deliver(7, &[(3, "c"), (4, "d")]);
    assert_eq!(kinds(&h, &f), vec!["subscribe-gap"]);
    // A resume that delivers a seq again.
    let mut h = base();
    h.deliver(7, &[(1, "a"), (2, "b")])
        .stream_ended(7)
        .deliver(7, &[(2, "b"), (3, "c")]);
    assert_eq!(kinds(&h, &f), vec!["subscribe-duplicate"]);
    // Out of order: 1, 3, then 2 (a gap, then a seq below one delivered).
    let mut h = base();
    h.deliver(7, &[(1, "a")])
        .deliver(7, &[(3, "c")])
        .deliver(7, &[(2, "b")]);
    assert_eq!(kinds(&h, &f), vec!["subscribe-gap", "subscribe-reorder"]);
    // A delivered message the final log does not have at that seq.
    let mut h = base();
    h.deliver(7, &[(1, "a"), (2, "c")]);
    assert_eq!(kinds(&h, &f), vec!["divergent-read"]);
}

/// Replicas read after a power cut or damage must each be a prefix of the
/// final agreed log: lagging is fine, a message the cluster later lost or
/// placed elsewhere is not.
#[test]
fn interim_replicas_must_be_prefixes_of_the_final_log() {
    let (_, f) = good();
    let read = |log: &[(u64, &str)]| BTreeMap::from([(MB.to_string(), log.iter().map(|(s, k)| msg(*s, k)).collect())]);
    let fine: pigeonhole_jepsen::checker::Interim = vec![
        ("after power-loss".into(), 1, read(&[])),
        ("after power-loss".into(), 2, read(&[(1, "a")])),
        ("after corrupt".into(), 3, read(&[(1, "a"), (2, "b"), (3, "c")])),
    ];
    assert!(pigeonhole_jepsen::checker::check_interim(&f, &fine).is_empty());
    for bad in [
        // A message the final log does not have at that place.
        read(&[(1, "a"), (2, "x")]),
        // Longer than the final log: a message the cluster later lost.
        read(&[(1, "a"), (2, "b"), (3, "c"), (4, "e")]),
    ] {
        let found = pigeonhole_jepsen::checker::check_interim(&f, &vec![("after corrupt".into(), 2, bad)]);
        assert_eq!(
            found.iter().map(|a| a.kind).collect::<Vec<_>>(),
            vec!["replica-not-prefix"]
        );
    }
}
