//! The workload: client processes doing what the routing tier does, each
//! bound to one node (Jepsen style, so the history says which node served
//! what), over a few mailboxes per shard so that appends contend.
//!
//! - **append**: a unique key and payload. An attempt whose outcome is
//!   unknown (timeout, UNAVAILABLE, a broken connection) is `info`, and the
//!   process retries the same key and payload before anything new. One in
//!   ten acknowledged appends is also re-sent at once, as a client whose
//!   ack got lost would: the server must answer with the same seq.
//! - **sync**: one page after a cursor the process has seen.
//! - **read**: the whole mailbox, page by page, from seq 0.
//! - **ack**: a device cursor (two devices per mailbox, shared by all
//!   processes) to a seq the process has seen.
//!
//! Reads are linearizable (the default). Every call has a 1 s deadline.
//!
//! A process picks its mailboxes among the shards its node holds. Replica
//! moves change that: on a NOT_REPLICA answer, and every few seconds, it
//! asks its node (NodeStatus) which shards it holds now and picks among
//! those; an unknown append to a mailbox its node no longer holds is left
//! unknown rather than retried against a node that cannot serve it.
//!
//! Beside these processes, [`super::subscriber`] runs Subscribe readers.

use super::cluster;
use super::recorder::Recorder;
use crate::history::{Kind, Msg, Op, F};
use pigeonhole_proto::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

/// One call's deadline.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Messages per page of a full read.
const READ_PAGE: u32 = 1_000;
/// A process asks its node which shards it holds at most this often after
/// a NOT_REPLICA answer, and at least this often otherwise (shards moved
/// onto it).
const HELD_REFRESH_MIN: Duration = Duration::from_millis(500);
const HELD_REFRESH_MAX: Duration = Duration::from_secs(5);

/// True for the servers' "this node holds no replica of the shard".
fn not_replica(s: &tonic::Status) -> bool {
    use tonic_types::StatusExt as _;
    s.get_error_details()
        .error_info()
        .is_some_and(|i| i.reason == "NOT_REPLICA")
}

/// The mailboxes whose shard node `node` holds now, by the shard map it
/// serves (a split may have moved a mailbox to a new shard), or None if
/// it does not answer NodeStatus and GetShardMap.
pub(crate) async fn held(node: u64, mbs: &[Mailbox]) -> Option<Vec<usize>> {
    let shards: std::collections::BTreeSet<u64> =
        cluster::status(node).await?.replicas.iter().map(|r| r.shard).collect();
    let map = cluster::shard_map(node).await?;
    Some(
        (0..mbs.len())
            .filter(|i| {
                mbs.get(*i)
                    .and_then(|m| cluster::shard_of(&map, &m.id.user_id))
                    .is_some_and(|s| shards.contains(&s))
            })
            .collect(),
    )
}

/// A mailbox of the workload.
#[derive(Debug, Clone)]
pub struct Mailbox {
    /// `namespace/user` as the history names it.
    pub name: String,
    /// The id.
    pub id: pb::MailboxId,
    /// Its shard.
    pub shard: u64,
    /// The nodes with a replica of its shard at the start (the `move`
    /// fault changes that; final reads ask each node what it holds).
    pub replicas: Vec<u64>,
}

/// Picks `per_shard` user ids for every shard of `map`.
pub fn mailboxes(map: &pb::GetShardMapResponse, per_shard: usize) -> Vec<Mailbox> {
    let mut out = Vec::new();
    for s in &map.shards {
        let mut found = 0;
        for u in 0u64.. {
            if found == per_shard {
                break;
            }
            let user = format!("user-{u}");
            let h = pigeonhole_proto::placement::user_hash(user.as_bytes());
            if pigeonhole_proto::placement::range_contains(s.range_start, s.range_end, h) {
                found += 1;
                out.push(Mailbox {
                    name: format!("jepsen/{user}"),
                    id: pb::MailboxId {
                        namespace: "jepsen".into(),
                        user_id: user.into_bytes(),
                    },
                    shard: s.id,
                    replicas: s.replicas.clone(),
                });
            }
        }
    }
    out
}

/// How a failed call completes: `fail` only when the server definitely did
/// nothing; everything else is unknown.
fn failure_kind(s: &tonic::Status) -> Kind {
    match s.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::NotFound
        | Code::ResourceExhausted => Kind::Fail,
        _ => Kind::Info,
    }
}

/// `d` completed by the error `s`: its kind ([`failure_kind`]) and text.
pub(crate) fn failed(mut d: Op, s: &tonic::Status) -> Op {
    d.kind = failure_kind(s);
    d.error = Some(format!("{:?}: {}", s.code(), s.message()));
    d
}

/// One Sync page request (no long-poll), with the call deadline.
fn sync_req(
    mb: &pb::MailboxId,
    after_seq: u64,
    max_messages: u32,
    consistency: pb::ReadConsistency,
) -> tonic::Request<pb::SyncRequest> {
    req(pb::SyncRequest {
        mailbox: Some(mb.clone()),
        after_seq,
        max_messages,
        max_bytes: 0,
        wait_ms: 0,
        consistency: consistency as i32,
    })
}

fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.set_timeout(CALL_TIMEOUT);
    r
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CALL_TIMEOUT + Duration::from_millis(200), f).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("client-side timeout")),
    }
}

pub(crate) fn msgs(ms: &[pb::Message]) -> Vec<Msg> {
    ms.iter()
        .map(|m| Msg {
            seq: m.seq,
            key: String::from_utf8_lossy(&m.idempotency_key).into_owned(),
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            timestamp_ms: m.timestamp_ms,
        })
        .collect()
}

/// Runs process `p` until `stop`.
pub async fn process(
    p: u64,
    node: u64,
    mbs: Arc<Vec<Mailbox>>,
    rec: Arc<Recorder>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed ^ p.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut client = pb::mailbox_client::MailboxClient::new(cluster::channel(node)?);
    let mut seen: HashMap<usize, u64> = HashMap::new(); // mailbox -> highest seq seen
    let mut pending: Option<(usize, String, String)> = None; // an append to retry
    let mut n = 0u64;
    // A node serves the mailboxes of the shards it has a replica of (with
    // more nodes than replicas, not all of them).
    let mut mine: Vec<usize> = (0..mbs.len())
        .filter(|i| mbs.get(*i).is_some_and(|m| m.replicas.contains(&node)))
        .collect();
    let mut refreshed = Instant::now();
    let mut moved = false; // a NOT_REPLICA answer since the last refresh
    while !stop.load(Ordering::Relaxed) {
        let due = if moved { HELD_REFRESH_MIN } else { HELD_REFRESH_MAX };
        if refreshed.elapsed() >= due {
            refreshed = Instant::now();
            if let Some(now) = held(node, &mbs).await {
                moved = false;
                mine = now;
                if pending.as_ref().is_some_and(|(mi, _, _)| !mine.contains(mi)) {
                    pending = None; // stays `info` in the history
                }
            }
        }
        if mine.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let roll: u32 = rng.gen_range(0..100);
        let mi = match &pending {
            Some((mi, _, _)) => *mi,
            None => mine.get(rng.gen_range(0..mine.len())).copied().unwrap_or(0),
        };
        let Some(mb) = mbs.get(mi) else { break };
        let op_base = |kind, f| {
            let mut o = Op::new(p, kind, f);
            o.node = Some(node);
            o.mailbox = Some(mb.name.clone());
            o
        };
        if pending.is_some() || roll < 50 {
            let (key, payload) = match pending.take() {
                Some((_, k, v)) => (k, v),
                None => {
                    n += 1;
                    (format!("p{p}-{n}"), format!("v-p{p}-{n}"))
                }
            };
            let mut resend = true;
            while resend {
                resend = false;
                let mut inv = op_base(Kind::Invoke, F::Append);
                inv.key = Some(key.clone());
                inv.payload = Some(payload.clone());
                rec.record(inv);
                let r = bounded(client.append(req(pb::AppendRequest {
                    mailbox: Some(mb.id.clone()),
                    payload: payload.clone().into_bytes().into(),
                    idempotency_key: key.clone().into_bytes(),
                    expected_last_seq: None,
                })))
                .await;
                match r {
                    Ok(a) => {
                        let mut d = op_base(Kind::Ok, F::Append);
                        d.seq = Some(a.seq);
                        d.duplicate = Some(a.duplicate);
                        rec.record(d);
                        let s = seen.entry(mi).or_default();
                        *s = (*s).max(a.seq);
                        // A client whose ack was lost sends again.
                        resend = rng.gen_range(0..10) == 0 && !stop.load(Ordering::Relaxed);
                    }
                    Err(s) => {
                        moved |= not_replica(&s);
                        let d = failed(op_base(Kind::Info, F::Append), &s);
                        let kind = d.kind;
                        rec.record(d);
                        if kind == Kind::Info {
                            pending = Some((mi, key.clone(), payload.clone()));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        } else if roll < 75 {
            let after = rng.gen_range(0..=seen.get(&mi).copied().unwrap_or(0));
            let mut inv = op_base(Kind::Invoke, F::Sync);
            inv.after_seq = Some(after);
            rec.record(inv);
            let r = bounded(client.sync(sync_req(&mb.id, after, 50, pb::ReadConsistency::Linearizable))).await;
            match r {
                Ok(page) => {
                    let mut d = op_base(Kind::Ok, F::Sync);
                    d.messages = Some(msgs(&page.messages));
                    d.last_seq = Some(page.last_seq);
                    rec.record(d);
                    let s = seen.entry(mi).or_default();
                    *s = (*s).max(page.last_seq);
                }
                Err(s) => {
                    moved |= not_replica(&s);
                    rec.record(failed(op_base(Kind::Info, F::Sync), &s));
                }
            }
        } else if roll < 85 {
            let mut inv = op_base(Kind::Invoke, F::Read);
            inv.after_seq = Some(0);
            rec.record(inv);
            let mut all: Vec<pb::Message> = Vec::new();
            let mut first_last: Option<u64> = None;
            let outcome = loop {
                let after = all.last().map_or(0, |m| m.seq);
                let r =
                    bounded(client.sync(sync_req(&mb.id, after, READ_PAGE, pb::ReadConsistency::Linearizable))).await;
                match r {
                    Ok(page) => {
                        first_last.get_or_insert(page.last_seq);
                        all.extend(page.messages);
                        if !page.has_more {
                            break Ok(());
                        }
                    }
                    Err(s) => break Err(s),
                }
            };
            match outcome {
                Ok(()) => {
                    let mut d = op_base(Kind::Ok, F::Read);
                    d.messages = Some(msgs(&all));
                    // The first page's: the read's linearization point.
                    d.last_seq = first_last;
                    rec.record(d);
                    let s = seen.entry(mi).or_default();
                    *s = (*s).max(first_last.unwrap_or(0));
                }
                Err(s) => {
                    moved |= not_replica(&s);
                    rec.record(failed(op_base(Kind::Info, F::Read), &s));
                }
            }
        } else {
            let top = seen.get(&mi).copied().unwrap_or(0);
            if top == 0 {
                continue;
            }
            let seq = rng.gen_range(1..=top);
            let device = format!("d{}", rng.gen_range(0..2));
            let mut inv = op_base(Kind::Invoke, F::Ack);
            inv.device = Some(device.clone());
            inv.seq = Some(seq);
            rec.record(inv);
            let r = bounded(client.ack(req(pb::AckRequest {
                mailbox: Some(mb.id.clone()),
                device_id: device.into_bytes(),
                seq,
            })))
            .await;
            match r {
                Ok(a) => {
                    let mut d = op_base(Kind::Ok, F::Ack);
                    d.cursor = Some(a.cursor);
                    rec.record(d);
                }
                Err(s) => {
                    moved |= not_replica(&s);
                    rec.record(failed(op_base(Kind::Info, F::Ack), &s));
                }
            }
        }
    }
    // An append left unknown stays unknown: the history says `info`.
    Ok(())
}

/// Reads every mailbox node `i` has a replica of, with STALE consistency:
/// what that replica has applied, nothing more.
pub async fn final_logs(i: u64, mbs: &[Mailbox]) -> Result<std::collections::BTreeMap<String, Vec<Msg>>, String> {
    let mut client = pb::mailbox_client::MailboxClient::new(cluster::channel(i)?);
    // The shards this node holds now (replicas may have moved).
    let held: std::collections::BTreeSet<u64> = cluster::status(i)
        .await
        .ok_or_else(|| format!("final read: node {i} did not answer NodeStatus"))?
        .replicas
        .iter()
        .map(|r| r.shard)
        .collect();
    // Where each mailbox is now, by the map the node serves, or another
    // node's if it has no replica of the metadata group (splits, D38).
    let map = cluster::shard_map(i)
        .await
        .ok_or_else(|| format!("final read: node {i} did not answer GetShardMap"))?;
    let mut out = std::collections::BTreeMap::new();
    for mb in mbs
        .iter()
        .filter(|m| cluster::shard_of(&map, &m.id.user_id).is_some_and(|s| held.contains(&s)))
    {
        let mut all: Vec<pb::Message> = Vec::new();
        loop {
            let after = all.last().map_or(0, |m| m.seq);
            let page = bounded(client.sync(sync_req(&mb.id, after, READ_PAGE, pb::ReadConsistency::Stale)))
                .await
                .map_err(|s| format!("final read of {} on node {i}: {s:?}", mb.name))?;
            all.extend(page.messages);
            if !page.has_more {
                break;
            }
        }
        out.insert(mb.name.clone(), msgs(&all));
    }
    Ok(out)
}
