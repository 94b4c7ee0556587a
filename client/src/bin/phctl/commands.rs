//! The phctl commands. Each gathers what it needs through the client SDK,
//! prints it (table or JSON), and returns the exit code.

use crate::render;
use crate::{MailboxArgs, Output, EXIT_DEGRADED, EXIT_FAILED, EXIT_UNAVAILABLE};
use pigeonhole_client::{pb, Client, ClientConfig, Error, Event};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What every command gets.
#[derive(Debug)]
pub struct Ctx {
    pub endpoints: Vec<String>,
    pub output: Output,
    pub timeout: Duration,
    pub tls: Option<pigeonhole_tls::TlsFiles>,
    pub token: Option<String>,
}

/// A failure to report on stderr, with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub exit: u8,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let exit = match e {
            Error::Rejected(_) | Error::Protocol(_) => EXIT_FAILED,
            Error::Exhausted { .. } | Error::NoEndpoint(_) => EXIT_UNAVAILABLE,
        };
        Failure {
            message: e.to_string(),
            exit,
        }
    }
}

pub(crate) fn failed(message: String) -> Failure {
    Failure {
        message,
        exit: EXIT_FAILED,
    }
}

pub(crate) async fn connect(ctx: &Ctx) -> Result<Client, Failure> {
    let mut cfg = ClientConfig::new(ctx.endpoints.clone());
    cfg.request_timeout = ctx.timeout;
    cfg.attempt_timeout = ctx.timeout.min(cfg.attempt_timeout);
    cfg.tls = ctx.tls.clone();
    cfg.token = ctx.token.clone();
    Ok(Client::connect(cfg).await?)
}

/// NodeStatus of every node in the map, asked concurrently; a node that
/// does not answer maps to its error text.
pub(crate) async fn all_status(client: &Client, sizes: bool) -> BTreeMap<u64, Result<pb::NodeStatusResponse, String>> {
    let mut set = tokio::task::JoinSet::new();
    for id in client.routing().nodes.keys().copied() {
        let c = client.clone();
        set.spawn(async move {
            let r = c.node_status(id, sizes).await.map_err(|e| {
                // The bare status text ("tcp connect error") reads best in a cell.
                e.status().map_or_else(|| e.to_string(), |s| s.message().to_string())
            });
            (id, r)
        });
    }
    let mut out = BTreeMap::new();
    while let Some(Ok((id, r))) = set.join_next().await {
        out.insert(id, r);
    }
    out
}

fn role(r: i32) -> &'static str {
    match pb::ReplicaRole::try_from(r) {
        Ok(pb::ReplicaRole::Leader) => "leader",
        Ok(pb::ReplicaRole::Follower) => "follower",
        Ok(pb::ReplicaRole::Candidate) => "candidate",
        _ => "unknown",
    }
}

/// The replica that leads `shard` at the highest term, over all answers.
fn leader_of(
    statuses: &BTreeMap<u64, Result<pb::NodeStatusResponse, String>>,
    shard: u64,
) -> Option<(u64, &pb::ReplicaStatus)> {
    statuses
        .iter()
        .filter_map(|(id, s)| s.as_ref().ok().map(|s| (*id, s)))
        .flat_map(|(id, s)| s.replicas.iter().map(move |r| (id, r)))
        .filter(|(_, r)| r.shard == shard && r.role == pb::ReplicaRole::Leader as i32)
        .max_by_key(|(_, r)| r.term)
}

/// `cluster status`.
pub async fn cluster_status(ctx: &Ctx) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let routing = client.routing();
    let statuses = all_status(&client, false).await;
    // A removed node is out for good (its process is usually stopped):
    // not listed here, and not counted against health (`node list` shows it).
    let removed: std::collections::BTreeSet<u64> = client
        .nodes()
        .await?
        .iter()
        .filter(|n| n.state == pb::NodeState::Removed as i32)
        .map(|n| n.id)
        .collect();
    let mut nodes = Vec::new();
    for (id, addr) in routing.nodes.iter().filter(|(id, _)| !removed.contains(id)) {
        let v = match statuses.get(id) {
            Some(Ok(s)) => {
                let meta = s.replicas.iter().find(|r| r.shard == 0);
                json!({
                    "id": id,
                    "address": addr,
                    "healthy": true,
                    "version": s.version,
                    "replicas": s.replicas.iter().filter(|r| r.shard != 0).count(),
                    "leaders": s.replicas.iter().filter(|r| r.shard != 0 && r.role == pb::ReplicaRole::Leader as i32).count(),
                    "meta_term": meta.map(|m| m.term),
                    "meta_applied_index": meta.map(|m| m.applied_index),
                    "subscribe_streams": s.subscribe_streams,
                    "subscribed_mailboxes": s.subscribed_mailboxes,
                    "sync_waiters": s.sync_waiters,
                    "stale_replicas_deleted": s.stale_replicas_deleted,
                    "catching_up_shards": s.catching_up_shards,
                })
            }
            Some(Err(e)) => json!({"id": id, "address": addr, "healthy": false, "error": e}),
            None => json!({"id": id, "address": addr, "healthy": false, "error": "no answer"}),
        };
        nodes.push(v);
    }
    let shards = routing.shards.len();
    let led = routing
        .shards
        .iter()
        .filter(|s| leader_of(&statuses, s.id).is_some())
        .count();
    let nodes_up = nodes.iter().filter(|n| n["healthy"] == true).count();
    // A replica catching up after storage damage does not vote: its shard
    // would not survive another failure, so the cluster is not healthy.
    let catching_up = nodes
        .iter()
        .any(|n| n["catching_up_shards"].as_array().is_some_and(|a| !a.is_empty()));
    let healthy = nodes_up == nodes.len() && led == shards && !catching_up;
    let doc = json!({
        "healthy": healthy,
        "nodes": nodes,
        "shards": shards,
        "shards_with_leader": led,
        "removed_nodes": removed,
    });
    match ctx.output {
        Output::Json => render::json(&doc),
        Output::Table => {
            let mut t = render::table(&[
                "NODE",
                "ADDRESS",
                "HEALTH",
                "VERSION",
                "REPLICAS",
                "LEADERS",
                "META TERM",
                "META APPLIED",
                "STREAMS",
                "FOLLOWED",
            ]);
            for n in &nodes {
                let repairing = n["catching_up_shards"].as_array().filter(|a| !a.is_empty());
                let health = if let (true, Some(shards)) = (n["healthy"] == true, repairing) {
                    let list: Vec<String> = shards.iter().map(|v| v.to_string()).collect();
                    format!("up, catching up after storage damage: shards {}", list.join(","))
                } else if n["healthy"] == true {
                    "up".to_string()
                } else {
                    format!("DOWN: {}", n["error"].as_str().unwrap_or("?"))
                };
                t.add_row(vec![
                    n["id"].to_string(),
                    n["address"].as_str().unwrap_or("").to_string(),
                    health,
                    n["version"].as_str().unwrap_or("-").to_string(),
                    cell(&n["replicas"]),
                    cell(&n["leaders"]),
                    cell(&n["meta_term"]),
                    cell(&n["meta_applied_index"]),
                    cell(&n["subscribe_streams"]),
                    cell(&n["subscribed_mailboxes"]),
                ]);
            }
            out!("{t}");
            let gone = if removed.is_empty() {
                String::new()
            } else {
                format!(" ({} removed, not listed)", removed.len())
            };
            out!(
                "{} of {} nodes up{gone}; {led} of {shards} shards have a leader: {}",
                nodes_up,
                nodes.len(),
                if healthy { "healthy" } else { "DEGRADED" }
            );
        }
    }
    Ok(if healthy { 0 } else { EXIT_DEGRADED })
}

fn cell(v: &Value) -> String {
    if v.is_null() {
        "-".to_string()
    } else {
        v.to_string()
    }
}

fn size_cell(r: &pb::ReplicaStatus) -> String {
    let prefix = if r.size_complete { "" } else { "≥ " };
    format!("{prefix}{}", render::size(r.data_bytes))
}

/// `shard list`.
pub async fn shard_list(ctx: &Ctx) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let routing = client.routing();
    let statuses = all_status(&client, true).await;
    let rows: Vec<Value> = routing
        .shards
        .iter()
        .map(|s| {
            let leader = leader_of(&statuses, s.id);
            json!({
                "id": s.id,
                "range_start": s.range_start,
                "range_end": s.range_end,
                "replicas": s.replicas,
                "leader": leader.map(|(n, _)| n),
                "term": leader.map(|(_, r)| r.term),
                "applied_index": leader.map(|(_, r)| r.applied_index),
                "data_bytes": leader.map(|(_, r)| r.data_bytes),
                "data_keys": leader.map(|(_, r)| r.data_keys),
                "size_complete": leader.map(|(_, r)| r.size_complete),
            })
        })
        .collect();
    match ctx.output {
        Output::Json => render::json(&json!({ "shards": rows })),
        Output::Table => {
            let mut t = render::table(&["SHARD", "RANGE", "REPLICAS", "LEADER", "TERM", "APPLIED", "SIZE"]);
            for s in &routing.shards {
                let leader = leader_of(&statuses, s.id);
                t.add_row(vec![
                    s.id.to_string(),
                    render::range(s.range_start, s.range_end),
                    format!("{:?}", s.replicas),
                    leader.map_or("NONE".into(), |(n, _)| n.to_string()),
                    leader.map_or("-".into(), |(_, r)| r.term.to_string()),
                    leader.map_or("-".into(), |(_, r)| r.applied_index.to_string()),
                    leader.map_or("-".into(), |(_, r)| size_cell(r)),
                ]);
            }
            out!("{t}");
        }
    }
    Ok(0)
}

/// `shard show ID`.
pub async fn shard_show(ctx: &Ctx, id: u64) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let routing = client.routing();
    let Some(shard) = routing.shard(id).cloned() else {
        let ids: Vec<u64> = routing.shards.iter().map(|s| s.id).collect();
        return Err(failed(format!(
            "no shard {id}; data shards are {}..={}",
            ids.first().copied().unwrap_or(0),
            ids.last().copied().unwrap_or(0)
        )));
    };
    let statuses = all_status(&client, true).await;
    let leader = leader_of(&statuses, id).map(|(n, _)| n);
    // The map's voters, then any other node holding a replica: a learner
    // being caught up (a move in progress), or a replica not yet deleted.
    let mut nodes = shard.replicas.clone();
    for (node, st) in &statuses {
        if let Ok(s) = st {
            if !nodes.contains(node) && s.replicas.iter().any(|r| r.shard == id) {
                nodes.push(*node);
            }
        }
    }
    let mut replicas = Vec::new();
    for node in &nodes {
        let r = match statuses.get(node) {
            Some(Ok(s)) => match s.replicas.iter().find(|r| r.shard == id) {
                Some(r) => json!({
                    "node": node,
                    "role": if r.learners.contains(node) { "learner" } else { role(r.role) },
                    "term": r.term,
                    "commit_index": r.commit_index,
                    "applied_index": r.applied_index,
                    "first_index": r.first_index,
                    "last_index": r.last_index,
                    "asleep": r.asleep,
                    "data_keys": r.data_keys,
                    "data_bytes": r.data_bytes,
                    "size_complete": r.size_complete,
                }),
                None => json!({"node": node, "error": "no replica on this node"}),
            },
            Some(Err(e)) => json!({"node": node, "error": e}),
            None => json!({"node": node, "error": "no answer"}),
        };
        replicas.push(r);
    }
    let doc = json!({
        "id": id,
        "range_start": shard.range_start,
        "range_end": shard.range_end,
        "leader": leader,
        "replicas": replicas,
    });
    match ctx.output {
        Output::Json => render::json(&doc),
        Output::Table => {
            out!(
                "shard {id}: range {}, leader {}",
                render::range(shard.range_start, shard.range_end),
                leader.map_or("NONE".to_string(), |l| format!("node {l}"))
            );
            let mut t = render::table(&[
                "NODE", "ROLE", "TERM", "COMMIT", "APPLIED", "FIRST", "LAST", "ASLEEP", "KEYS", "SIZE",
            ]);
            for r in &replicas {
                if let Some(e) = r.get("error") {
                    t.add_row(vec![
                        r["node"].to_string(),
                        format!("DOWN: {}", e.as_str().unwrap_or("?")),
                    ]);
                    continue;
                }
                let prefix = if r["size_complete"] == true { "" } else { "≥ " };
                t.add_row(vec![
                    r["node"].to_string(),
                    r["role"].as_str().unwrap_or("?").to_string(),
                    r["term"].to_string(),
                    r["commit_index"].to_string(),
                    r["applied_index"].to_string(),
                    r["first_index"].to_string(),
                    r["last_index"].to_string(),
                    r["asleep"].to_string(),
                    format!("{prefix}{}", r["data_keys"]),
                    format!("{prefix}{}", render::size(r["data_bytes"].as_u64().unwrap_or(0))),
                ]);
            }
            out!("{t}");
        }
    }
    Ok(0)
}

/// `shard transfer-leader ID --to N`.
/// `shard split ID [--at HASH]`: the middle of the shard's range unless
/// told, sent explicitly so that a retry never splits twice.
pub async fn shard_split(ctx: &Ctx, id: u64, at: Option<u64>) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let Some(shard) = client.routing().shard(id).cloned() else {
        return Err(failed(format!("no shard {id}")));
    };
    let at = at.unwrap_or_else(|| pigeonhole_proto::placement::range_middle(shard.range_start, shard.range_end));
    let r = client.split_shard(id, at).await?;
    let range = |s: &Option<pb::ShardInfo>| {
        s.as_ref().map_or_else(String::new, |s| {
            let end = s.range_end.map_or_else(|| "end".to_string(), |e| format!("{e:#018x}"));
            format!("[{:#018x}, {end})", s.range_start)
        })
    };
    match ctx.output {
        Output::Json => render::json(&json!({
            "shard": r.shard.as_ref().map(|s| json!({"id": s.id, "range": range(&r.shard), "epoch": s.epoch})),
            "new_shard": r.new_shard.as_ref().map(|s| json!({"id": s.id, "range": range(&r.new_shard), "epoch": s.epoch})),
        })),
        Output::Table => out!(
            "shard {id} split at {at:#018x}: shard {id} keeps {}, shard {} takes {}",
            range(&r.shard),
            r.new_shard.as_ref().map_or(0, |s| s.id),
            range(&r.new_shard)
        ),
    }
    Ok(0)
}

pub async fn transfer_leader(ctx: &Ctx, id: u64, to: u64, wait: Duration) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    if client.routing().shard(id).is_none() {
        return Err(failed(format!("no shard {id}")));
    }
    client.transfer_leader(id, to).await?;
    if wait.is_zero() {
        out!("shard {id}: transfer to node {to} started");
        return Ok(0);
    }
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(s) = client.node_status(to, false).await {
            if s.replicas
                .iter()
                .any(|r| r.shard == id && r.role == pb::ReplicaRole::Leader as i32)
            {
                match ctx.output {
                    Output::Json => render::json(&json!({"shard": id, "leader": to})),
                    Output::Table => out!("shard {id}: node {to} is the leader"),
                }
                return Ok(0);
            }
        }
        if Instant::now() >= deadline {
            return Err(Failure {
                message: format!(
                    "shard {id}: node {to} did not become leader within {} ms",
                    wait.as_millis()
                ),
                exit: EXIT_UNAVAILABLE,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mailbox_id(m: &MailboxArgs) -> Result<pb::MailboxId, Failure> {
    let user_id = if m.user_hex {
        let s = m.user.trim_start_matches("0x");
        if s.len() % 2 != 0 {
            return Err(failed("--user-hex: an odd number of hex digits".into()));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                s.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| failed(format!("--user-hex: {:?} is not hex", m.user)))
            })
            .collect::<Result<Vec<u8>, _>>()?
    } else {
        m.user.as_bytes().to_vec()
    };
    Ok(pigeonhole_client::mailbox(&m.namespace, &user_id))
}

/// `mailbox show NS USER`.
pub async fn mailbox_show(ctx: &Ctx, m: &MailboxArgs) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let mb = mailbox_id(m)?;
    let c = client.cursors(&mb).await?;
    let shard = client.routing().shard_for(&mb.user_id).map(|s| (s.id, s.leader));
    let cursors: Vec<Value> = c
        .cursors
        .iter()
        .map(|d| json!({"device": render::bytes(&d.device_id), "seq": d.seq, "unread": d.unread}))
        .collect();
    let doc = json!({
        "namespace": mb.namespace,
        "user": render::bytes(&mb.user_id),
        "shard": shard.map(|s| s.0),
        "last_seq": c.last_seq,
        "low_watermark": c.low_watermark,
        "cursors": cursors,
    });
    match ctx.output {
        Output::Json => render::json(&doc),
        Output::Table => {
            out!(
                "mailbox {}/{} (shard {}): last seq {}, low watermark {}, {} device cursor(s)",
                mb.namespace,
                render::bytes(&mb.user_id),
                shard.map_or("?".into(), |s| s.0.to_string()),
                c.last_seq,
                c.low_watermark,
                c.cursors.len()
            );
            if !c.cursors.is_empty() {
                let mut t = render::table(&["DEVICE", "SEQ", "UNREAD"]);
                for d in &c.cursors {
                    t.add_row(vec![
                        render::bytes(&d.device_id),
                        d.seq.to_string(),
                        d.unread.to_string(),
                    ]);
                }
                out!("{t}");
            }
        }
    }
    Ok(0)
}

/// How many payload bytes `tail` shows per message.
const TAIL_PREVIEW_BYTES: usize = 32;

/// `mailbox tail NS USER`.
pub async fn mailbox_tail(ctx: &Ctx, m: &MailboxArgs, from: Option<u64>, count: Option<u64>) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let mb = mailbox_id(m)?;
    let from = match from {
        Some(f) => f,
        None => client.cursors(&mb).await?.last_seq,
    };
    let mut sub = client.subscribe(vec![(mb.clone(), from)], 0)?;
    let mut seen = 0u64;
    if count == Some(0) {
        return Ok(0);
    }
    loop {
        let ev = tokio::select! {
            ev = sub.next() => ev,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        match ev {
            None => return Err(failed("the subscription ended".into())),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Event::Trimmed { low_watermark, .. })) => {
                return Err(failed(format!(
                    "the next messages were trimmed; low watermark is now {low_watermark}"
                )))
            }
            Some(Ok(Event::Messages { messages, .. })) => {
                for msg in messages {
                    print_message(ctx.output, &msg);
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        return Ok(0);
                    }
                }
            }
        }
    }
}

fn print_message(output: Output, m: &pb::Message) {
    match output {
        Output::Json => out!(
            "{}",
            json!({
                "seq": m.seq,
                "timestamp_ms": m.timestamp_ms,
                "idempotency_key": render::bytes(&m.idempotency_key),
                "deleted": m.deleted,
                "payload_bytes": m.payload.len(),
                "payload_hex": render::hex(&m.payload),
            })
        ),
        Output::Table => {
            let preview = m.payload.get(..TAIL_PREVIEW_BYTES).unwrap_or(&m.payload);
            let body = if m.deleted {
                "(deleted)".to_string()
            } else {
                format!(
                    "{} B {}{}",
                    m.payload.len(),
                    render::hex(preview),
                    if m.payload.len() > TAIL_PREVIEW_BYTES {
                        "…"
                    } else {
                        ""
                    }
                )
            };
            out!(
                "seq {:>8}  ts {}  key {}  {body}",
                m.seq,
                m.timestamp_ms,
                render::bytes(&m.idempotency_key)
            );
        }
    }
}
