//! Subscribe readers: processes that follow every workload mailbox on one
//! Subscribe stream and record each delivered event, as the routing tier's
//! delivery path would consume them.
//!
//! A reader keeps one cursor per mailbox (the last seq delivered). When its
//! stream ends — the node was killed, paused or partitioned (a replica cut
//! off from its leader ends its streams with UNAVAILABLE), or shut down — it
//! records why and resumes from those cursors on the next node. The checker
//! then requires, per reader and mailbox, that the deliveries across all of
//! its streams are exactly seqs 1, 2, 3, … in order, each equal to the final
//! log: no gap, no duplicate, no reordering, across resumes.

use super::cluster;
use super::recorder::Recorder;
use super::workload::{failed, held, msgs, Mailbox};
use crate::history::{Kind, Op, F};
use pigeonhole_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a reader blocked on its stream looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);
/// Pause before resuming after a stream ended.
const RESUME_BACKOFF: Duration = Duration::from_millis(100);

/// Runs Subscribe reader `p`, starting on `first_node` of `nodes`, until `stop`.
pub async fn reader(
    p: u64,
    first_node: u64,
    nodes: u64,
    mbs: Arc<Vec<Mailbox>>,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut cursors: HashMap<String, u64> = HashMap::new();
    let mut node = first_node;
    while !stop.load(Ordering::Relaxed) {
        // A node serves the mailboxes of the shards it has a replica of:
        // those it holds now (replicas move), or, if it does not answer,
        // those it held at the start.
        let here: Vec<&Mailbox> = match held(node, &mbs).await {
            Some(now) => now.iter().filter_map(|i| mbs.get(*i)).collect(),
            None => mbs.iter().filter(|m| m.replicas.contains(&node)).collect(),
        };
        let ended = if here.is_empty() {
            None
        } else {
            follow(p, node, &here, &mut cursors, &rec, &stop).await?
        };
        if let Some(status) = ended {
            let mut inv = Op::new(p, Kind::Invoke, F::Subscribe);
            inv.node = Some(node);
            rec.record(inv);
            let mut d = failed(Op::new(p, Kind::Info, F::Subscribe), &status);
            d.kind = Kind::Info;
            d.node = Some(node);
            rec.record(d);
            tokio::time::sleep(RESUME_BACKOFF).await;
        }
        node = node % nodes + 1;
    }
    Ok(())
}

/// One stream on `node`, until it ends (Some: why) or `stop` (None).
async fn follow(
    p: u64,
    node: u64,
    here: &[&Mailbox],
    cursors: &mut HashMap<String, u64>,
    rec: &Recorder,
    stop: &AtomicBool,
) -> Result<Option<tonic::Status>, String> {
    let mut client = pb::mailbox_client::MailboxClient::new(cluster::channel(node)?);
    let req = pb::SubscribeRequest {
        mailboxes: here
            .iter()
            .map(|m| pb::MailboxCursor {
                mailbox: Some(m.id.clone()),
                after_seq: cursors.get(&m.name).copied().unwrap_or(0),
            })
            .collect(),
        max_in_flight: 0,
    };
    let mut start = tonic::Request::new(req);
    start.set_timeout(Duration::from_secs(2));
    let mut stream = match client.subscribe(start).await {
        Ok(s) => s.into_inner(),
        Err(s) => return Ok(Some(s)),
    };
    let names: HashMap<(String, Vec<u8>), &str> = here
        .iter()
        .map(|m| ((m.id.namespace.clone(), m.id.user_id.clone()), m.name.as_str()))
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let next = match tokio::time::timeout(STOP_POLL, stream.message()).await {
            Err(_) => continue,
            Ok(Err(s)) => return Ok(Some(s)),
            Ok(Ok(None)) => return Ok(Some(tonic::Status::unavailable("stream closed by the server"))),
            Ok(Ok(Some(ev))) => ev,
        };
        let batch = match next.event {
            Some(pb::subscribe_response::Event::Messages(b)) => b,
            // The workload never trims: a trimmed cursor is an error.
            other => return Err(format!("reader {p}: unexpected Subscribe event {other:?}")),
        };
        let id = batch.mailbox.unwrap_or_default();
        let Some(name) = names.get(&(id.namespace, id.user_id)) else {
            return Err(format!("reader {p}: an event for a mailbox it does not follow"));
        };
        let cursor = cursors.entry((*name).to_string()).or_insert(0);
        let mut inv = Op::new(p, Kind::Invoke, F::Deliver);
        inv.node = Some(node);
        inv.mailbox = Some((*name).to_string());
        inv.after_seq = Some(*cursor);
        let mut d = inv.clone();
        d.kind = Kind::Ok;
        d.messages = Some(msgs(&batch.messages));
        rec.record(inv);
        rec.record(d);
        *cursor = batch.messages.last().map_or(*cursor, |m| m.seq);
    }
    Ok(None)
}
