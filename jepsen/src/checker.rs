//! The checker: what a history and the replicas' final state must satisfy,
//! per mailbox. The server assigns sequence numbers, so every property is a
//! sort and a sweep over the history, not a search for a linearization.
//!
//! Properties (each failure is an [`Anomaly`] of the named kind):
//! - `lost`: an acknowledged append is missing from the final log, or sits
//!   at another seq than the one acknowledged (`wrong-seq`).
//! - `duplicate-key`, `duplicate-payload`: a key or a payload is stored at
//!   two seqs; `inconsistent-ack`: two acks of one key report two seqs.
//! - `gap`: the final log is not exactly seqs 1..=n; `read-gap`: a read is
//!   not contiguous from its cursor.
//! - `phantom`: a stored message no append ever attempted;
//!   `failed-visible`: one whose every attempt definitely failed.
//! - `divergent-read`: a read saw, at some seq, another message than the
//!   final log has there (so not every reader sees one order).
//! - `stale-read`: a read's `last_seq` is below the seq of an append
//!   acknowledged before the read began; `read-backwards`: a read reports a
//!   lower `last_seq` than a read that completed before it began.
//! - `append-order`: an append acknowledged before another began has the
//!   higher seq (retries that the server reports as duplicates excepted:
//!   their seq is that of the first attempt).
//! - `cursor-backwards`: a device cursor went down in real-time order;
//!   `cursor-below-ack`: an ack returned a cursor below the seq it acked.
//! - `replicas-diverge`: two replicas' final logs differ.
//! - `timestamp-decreases`: a message's commit time is below its
//!   predecessor's (the API promises non-decreasing times per shard, even
//!   when a leader's clock jumps back).
//! - Subscribe deliveries, per reader and mailbox, across all the reader's
//!   streams (it resumes from its cursor after each one ends) must be seqs
//!   1, 2, 3, … in order: `subscribe-gap` (a seq skipped),
//!   `subscribe-duplicate` (a seq delivered twice), `subscribe-reorder` (a
//!   seq below one already delivered, never delivered before); each
//!   delivered message must equal the final log's (`divergent-read`).

use crate::history::{calls, Call, Kind, Msg, Op, F};
use std::collections::{BTreeMap, HashMap, HashSet};

/// One violated property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// The property (see the module docs).
    pub kind: &'static str,
    /// The mailbox, when it concerns one.
    pub mailbox: Option<String>,
    /// What exactly.
    pub detail: String,
}

/// Final logs: node id → mailbox → messages.
pub type Finals = BTreeMap<u64, BTreeMap<String, Vec<Msg>>>;

/// Replicas read during the run, after each power loss and corruption was
/// healed: (when, node, its log of each mailbox it holds).
pub type Interim = Vec<(String, u64, BTreeMap<String, Vec<Msg>>)>;

/// Every replica read during the run must be a prefix of (or equal to) the
/// final agreed log of each mailbox: a replica may lag, but never holds a
/// message the cluster later does not, or holds one at another place
/// (issue 16). A replica that, after a power cut or damage, served a log
/// the cluster then overwrote, is found here even when its final log
/// agrees.
pub fn check_interim(finals: &Finals, interim: &Interim) -> Vec<Anomaly> {
    let reference = agree(finals, &mut Vec::new());
    let mut out = Vec::new();
    for (when, node, logs) in interim {
        for (mb, log) in logs {
            let Some(fin) = reference.get(mb) else { continue };
            if !fin.starts_with(log) {
                let at = fin
                    .iter()
                    .zip(log)
                    .position(|(x, y)| x != y)
                    .unwrap_or(fin.len().min(log.len()));
                anomaly(
                    &mut out,
                    "replica-not-prefix",
                    mb,
                    format!(
                        "{when}: node {node}'s replica held {} messages, the final log {}; they differ from index {at}",
                        log.len(),
                        fin.len()
                    ),
                );
            }
        }
    }
    out
}

/// Checks a history against the replicas' final logs.
pub fn check(history: &[Op], finals: &Finals) -> Vec<Anomaly> {
    let mut out = Vec::new();
    let calls = match calls(history) {
        Ok(c) => c,
        Err(e) => {
            out.push(Anomaly {
                kind: "malformed-history",
                mailbox: None,
                detail: e,
            });
            return out;
        }
    };
    let reference = agree(finals, &mut out);
    let mut by_mailbox: BTreeMap<&str, Vec<&Call<'_>>> = BTreeMap::new();
    for c in &calls {
        if let Some(m) = c.invoke.mailbox.as_deref() {
            by_mailbox.entry(m).or_default().push(c);
        }
    }
    let empty = Vec::new();
    let mut mailboxes: HashSet<&str> = by_mailbox.keys().copied().collect();
    mailboxes.extend(reference.keys().map(String::as_str));
    let mut mailboxes: Vec<&str> = mailboxes.into_iter().collect();
    mailboxes.sort_unstable();
    for mb in mailboxes {
        let log = reference.get(mb).unwrap_or(&empty);
        let cs = by_mailbox.get(mb).map_or(&[][..], Vec::as_slice);
        check_mailbox(mb, log, cs, &mut out);
    }
    out
}

fn anomaly(out: &mut Vec<Anomaly>, kind: &'static str, mb: &str, detail: String) {
    out.push(Anomaly {
        kind,
        mailbox: Some(mb.to_string()),
        detail,
    });
}

/// Every replica's final log of a mailbox must be identical (a node holds
/// only the mailboxes of its shards, so each mailbox is compared across the
/// nodes that have it); returns one log per mailbox.
fn agree(finals: &Finals, out: &mut Vec<Anomaly>) -> BTreeMap<String, Vec<Msg>> {
    let mut reference: BTreeMap<String, (u64, Vec<Msg>)> = BTreeMap::new();
    for (node, logs) in finals {
        for (mb, log) in logs {
            match reference.get(mb) {
                None => {
                    reference.insert(mb.clone(), (*node, log.clone()));
                }
                Some((first_node, first)) if first != log => {
                    let at = first
                        .iter()
                        .zip(log)
                        .position(|(x, y)| x != y)
                        .unwrap_or(first.len().min(log.len()));
                    anomaly(
                        out,
                        "replicas-diverge",
                        mb,
                        format!(
                            "node {first_node} has {} messages, node {node} has {}; they differ from index {at}",
                            first.len(),
                            log.len()
                        ),
                    );
                }
                Some(_) => {}
            }
        }
    }
    reference.into_iter().map(|(mb, (_, log))| (mb, log)).collect()
}

fn check_mailbox(mb: &str, log: &[Msg], cs: &[&Call<'_>], out: &mut Vec<Anomaly>) {
    // The final log: gap-free, one seq per key and per payload.
    for (i, m) in log.iter().enumerate() {
        let want = u64::try_from(i).unwrap_or(u64::MAX) + 1;
        if m.seq != want {
            anomaly(
                out,
                "gap",
                mb,
                format!("final log has seq {} at position {want}", m.seq),
            );
            break;
        }
    }
    for w in log.windows(2) {
        if let [a, b] = w {
            if b.timestamp_ms < a.timestamp_ms {
                anomaly(
                    out,
                    "timestamp-decreases",
                    mb,
                    format!(
                        "seq {} at {} ms after seq {} at {} ms",
                        b.seq, b.timestamp_ms, a.seq, a.timestamp_ms
                    ),
                );
            }
        }
    }
    let mut key_seq: HashMap<&str, u64> = HashMap::new();
    let mut payload_seq: HashMap<&str, u64> = HashMap::new();
    for m in log {
        if let Some(s) = key_seq.insert(&m.key, m.seq) {
            anomaly(
                out,
                "duplicate-key",
                mb,
                format!("key {} at seqs {s} and {}", m.key, m.seq),
            );
        }
        if let Some(s) = payload_seq.insert(&m.payload, m.seq) {
            anomaly(
                out,
                "duplicate-payload",
                mb,
                format!("payload {} at seqs {s} and {}", m.payload, m.seq),
            );
        }
    }
    let at_seq = |s: u64| -> Option<&Msg> { log.get(usize::try_from(s).ok()?.checked_sub(1)?) };

    // Appends: what was attempted, what definitely failed, what was acked.
    let appends: Vec<&&Call<'_>> = cs.iter().filter(|c| c.invoke.f == F::Append).collect();
    let mut attempted: HashMap<&str, (bool, bool)> = HashMap::new(); // key -> (any not-failed, any attempt)
    let mut acked: HashMap<&str, u64> = HashMap::new();
    for c in &appends {
        let Some(key) = c.invoke.key.as_deref() else { continue };
        let e = attempted.entry(key).or_insert((false, true));
        if c.kind() != Kind::Fail {
            e.0 = true;
        }
        if c.kind() == Kind::Ok {
            let Some(seq) = c.done.and_then(|d| d.seq) else {
                continue;
            };
            if let Some(prev) = acked.insert(key, seq) {
                if prev != seq {
                    anomaly(
                        out,
                        "inconsistent-ack",
                        mb,
                        format!("key {key} acknowledged with seq {prev} and with seq {seq}"),
                    );
                }
            }
            match at_seq(seq) {
                Some(m) if m.key == key => {
                    if Some(&m.payload) != c.invoke.payload.as_ref() {
                        anomaly(
                            out,
                            "wrong-payload",
                            mb,
                            format!("seq {seq} of key {key} holds another payload"),
                        );
                    }
                }
                Some(m) => {
                    let kind = if key_seq.contains_key(key) { "wrong-seq" } else { "lost" };
                    anomaly(
                        out,
                        kind,
                        mb,
                        format!("key {key} acknowledged at seq {seq}, which holds key {}", m.key),
                    );
                }
                None => anomaly(
                    out,
                    "lost",
                    mb,
                    format!("key {key} acknowledged at seq {seq}; the log ends at {}", log.len()),
                ),
            }
        }
    }
    for m in log {
        match attempted.get(m.key.as_str()) {
            None => anomaly(
                out,
                "phantom",
                mb,
                format!("seq {} holds key {}, never appended", m.seq, m.key),
            ),
            Some((false, _)) => anomaly(
                out,
                "failed-visible",
                mb,
                format!("seq {} holds key {}, whose every append failed", m.seq, m.key),
            ),
            Some(_) => {}
        }
    }

    // Reads: contiguous from their cursor, and equal to the final log.
    let reads: Vec<&&Call<'_>> = cs
        .iter()
        .filter(|c| matches!(c.invoke.f, F::Sync | F::Read) && c.kind() == Kind::Ok)
        .collect();
    for c in &reads {
        let Some(d) = c.done else { continue };
        let msgs = d.messages.as_deref().unwrap_or(&[]);
        let first = c.invoke.after_seq.unwrap_or(0) + 1;
        for (next, m) in (first..).zip(msgs) {
            if m.seq != next {
                anomaly(
                    out,
                    "read-gap",
                    mb,
                    format!("op {}: seq {} where {next} was due", d.index, m.seq),
                );
                break;
            }
            check_read_message(mb, &format!("op {}", d.index), m, at_seq(m.seq), out);
        }
    }

    check_deliveries(mb, cs, &at_seq, out);

    // Real time. Acked appends ordered by completion, with the running max
    // of their seqs: "the highest seq acknowledged before time t".
    let mut done_appends: Vec<(u64, u64)> = appends
        .iter()
        .filter(|c| c.kind() == Kind::Ok)
        .filter_map(|c| Some((c.done_ns(), c.done?.seq?)))
        .collect();
    done_appends.sort_unstable();
    let prefix_max = |v: &mut Vec<(u64, u64)>| {
        let mut m = 0;
        for e in v.iter_mut() {
            m = m.max(e.1);
            e.1 = m;
        }
    };
    prefix_max(&mut done_appends);
    // The running max of everything completed strictly before `t`.
    let max_before = |sorted: &[(u64, u64)], t: u64| -> u64 {
        let n = sorted.partition_point(|(done, _)| *done < t);
        n.checked_sub(1).and_then(|i| sorted.get(i)).map_or(0, |e| e.1)
    };
    for c in &reads {
        let Some(last) = c.done.and_then(|d| d.last_seq) else {
            continue;
        };
        let need = max_before(&done_appends, c.invoke.time_ns);
        if last < need {
            anomaly(
                out,
                "stale-read",
                mb,
                format!(
                    "op {}: last_seq {last}, but seq {need} was acknowledged before the read began",
                    c.invoke.index
                ),
            );
        }
    }
    let mut done_reads: Vec<(u64, u64)> = reads
        .iter()
        .filter_map(|c| Some((c.done_ns(), c.done?.last_seq?)))
        .collect();
    done_reads.sort_unstable();
    prefix_max(&mut done_reads);
    for c in &reads {
        let Some(last) = c.done.and_then(|d| d.last_seq) else {
            continue;
        };
        let before = max_before(&done_reads, c.invoke.time_ns);
        if last < before {
            anomaly(
                out,
                "read-backwards",
                mb,
                format!(
                    "op {}: last_seq {last}, but a read that completed before it began saw {before}",
                    c.invoke.index
                ),
            );
        }
    }
    for c in appends.iter().filter(|c| c.kind() == Kind::Ok) {
        let Some(d) = c.done else { continue };
        if d.duplicate == Some(true) {
            continue;
        }
        let Some(seq) = d.seq else { continue };
        let before = max_before(&done_appends, c.invoke.time_ns);
        if seq <= before {
            anomaly(
                out,
                "append-order",
                mb,
                format!(
                    "op {}: seq {seq}, but seq {before} was acknowledged before it began",
                    c.invoke.index
                ),
            );
        }
    }

    // Device cursors never go backwards.
    let mut by_device: BTreeMap<&str, Vec<&&Call<'_>>> = BTreeMap::new();
    for c in cs.iter().filter(|c| c.invoke.f == F::Ack && c.kind() == Kind::Ok) {
        if let Some(dev) = c.invoke.device.as_deref() {
            by_device.entry(dev).or_default().push(c);
        }
    }
    for (dev, acks) in by_device {
        let mut done: Vec<(u64, u64)> = acks
            .iter()
            .filter_map(|c| Some((c.done_ns(), c.done?.cursor?)))
            .collect();
        done.sort_unstable();
        prefix_max(&mut done);
        for c in &acks {
            let (Some(cursor), Some(acked)) = (c.done.and_then(|d| d.cursor), c.invoke.seq) else {
                continue;
            };
            if cursor < acked {
                anomaly(
                    out,
                    "cursor-below-ack",
                    mb,
                    format!("device {dev}: acked {acked}, cursor {cursor}"),
                );
            }
            let before = max_before(&done, c.invoke.time_ns);
            if cursor < before {
                anomaly(
                    out,
                    "cursor-backwards",
                    mb,
                    format!("device {dev}: cursor {cursor} after an earlier ack left it at {before}"),
                );
            }
        }
    }
}

/// Subscribe deliveries of one mailbox (see the module docs).
fn check_deliveries<'m>(mb: &str, cs: &[&Call<'_>], at_seq: &dyn Fn(u64) -> Option<&'m Msg>, out: &mut Vec<Anomaly>) {
    // Per reader: the next seq due and every seq delivered so far.
    let mut readers: BTreeMap<u64, (u64, HashSet<u64>)> = BTreeMap::new();
    for c in cs.iter().filter(|c| c.invoke.f == F::Deliver && c.kind() == Kind::Ok) {
        let Some(d) = c.done else { continue };
        let (next, delivered) = readers.entry(c.invoke.process).or_insert((1, HashSet::new()));
        for m in d.messages.as_deref().unwrap_or(&[]) {
            let kind = if delivered.contains(&m.seq) {
                Some("subscribe-duplicate")
            } else if m.seq < *next {
                Some("subscribe-reorder")
            } else if m.seq > *next {
                Some("subscribe-gap")
            } else {
                None
            };
            if let Some(kind) = kind {
                anomaly(
                    out,
                    kind,
                    mb,
                    format!(
                        "op {}: reader {} got seq {} where {} was due",
                        d.index, c.invoke.process, m.seq, *next
                    ),
                );
            }
            let who = format!("op {}: reader {}", d.index, c.invoke.process);
            check_read_message(mb, &who, m, at_seq(m.seq), out);
            delivered.insert(m.seq);
            *next = (*next).max(m.seq + 1);
        }
    }
}

/// A message some reader saw (`who`) must be the final log's at its seq.
fn check_read_message(mb: &str, who: &str, m: &Msg, in_log: Option<&Msg>, out: &mut Vec<Anomaly>) {
    if in_log != Some(m) {
        anomaly(
            out,
            "divergent-read",
            mb,
            format!(
                "{who}: seq {} read as key {}, final log has {:?}",
                m.seq,
                m.key,
                in_log.map(|x| &x.key)
            ),
        );
    }
}
