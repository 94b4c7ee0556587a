//! `phctl cluster balance [--wait | --apply]` and `phctl cluster placement`:
//! the servers' placement loop, seen and steered.
//!
//! The loop runs on the metadata group's leader (`Admin.GetPlacement`
//! says which node): it plans replica moves that bring the up nodes'
//! replica counts within one of each other (each shard's replicas in
//! different zones), asks shard leaders to make them, a few at once, and
//! then evens out preferred leaders. `cluster balance` prints what it sees:
//! replicas and leaderships per node, the moves in flight with a progress
//! bar each, and what is still planned. `--wait` follows it until the
//! cluster is balanced. `--apply` is for a paused loop: phctl then makes
//! the planned moves itself, with `shard move`'s steps.

use crate::commands::{all_status, connect, failed, Ctx, Failure};
use crate::moves::{move_replica, until};
use crate::{render, Output};
use pigeonhole_client::{pb, Client};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Moves running at once with `--apply`, at most (each one streams a snapshot).
pub const CONCURRENCY_MAX: usize = 16;

/// How often `--wait` looks again.
const WAIT_POLL: Duration = Duration::from_secs(2);

/// Node → failure domain (`pigeonhole --zone`); a node without one maps
/// to "" or is absent.
pub type Zones = BTreeMap<u64, String>;

/// Whether `to` may take the replica of a shard with voters `vs` that
/// `from` gives up: it holds none, and its zone (if any) is not one of the
/// other voters' zones (the servers' rule, `balance::zone_free`).
pub fn zone_free(vs: &[u64], from: u64, to: u64, zones: &Zones) -> bool {
    let zone_of = |n: u64| zones.get(&n).map_or("", String::as_str);
    let z = zone_of(to);
    !vs.contains(&to) && (z.is_empty() || !vs.iter().any(|v| *v != from && zone_of(*v) == z))
}

/// Up nodes and their zones, from the shard map.
pub async fn up_and_zones(client: &Client) -> Result<(BTreeSet<u64>, Zones), Failure> {
    let nodes = client.nodes().await?;
    let up = nodes
        .iter()
        .filter(|n| n.state == pb::NodeState::Up as i32)
        .map(|n| n.id)
        .collect();
    let zones = nodes.iter().map(|n| (n.id, n.zone.clone())).collect();
    Ok((up, zones))
}

/// Shard → (leader, its commit index), from NodeStatus of every node.
async fn leaders(client: &Client) -> BTreeMap<u64, (u64, u64)> {
    let mut out = BTreeMap::new();
    for (node, status) in all_status(client, false).await {
        for r in status.iter().flat_map(|s| s.replicas.iter()) {
            if r.shard != 0 && r.role == pb::ReplicaRole::Leader as i32 {
                out.insert(r.shard, (node, r.commit_index));
            }
        }
    }
    out
}

/// A move's progress, 0 to 100, and what it is based on. Catching up is
/// 10 to 90 %: while the leader streams the snapshot, the bytes it has
/// sent against the shard's state-machine size on the leader (a bounded
/// scan, so a lower bound for a large shard: the bar then stops short of
/// 90 % until the snapshot is in); after it, the learner's applied index
/// against the leader's commit index.
async fn progress(client: &Client, m: &pb::PlacementMove, leaders: &BTreeMap<u64, (u64, u64)>) -> (u32, String) {
    match m.step.as_str() {
        "promoting" => (95, String::new()),
        "catching up" => {
            let Some((leader, commit)) = leaders.get(&m.shard).copied() else {
                return (10, String::new());
            };
            let on_leader = client
                .replica_sizes(leader, &[m.shard])
                .await
                .ok()
                .and_then(|s| s.replicas.into_iter().find(|r| r.shard == m.shard));
            if let Some(r) = &on_leader {
                if let Some(send) = r.snapshot_sends.iter().find(|s| s.to == m.to) {
                    let total = r.data_bytes.max(1);
                    let share = (send.bytes_sent.min(total) * 80).checked_div(total).unwrap_or(0);
                    let of = if r.size_complete { "" } else { "≥ " };
                    return (
                        10 + u32::try_from(share).unwrap_or(80).min(79),
                        format!(
                            "snapshot {} of {of}{}",
                            render::size(send.bytes_sent),
                            render::size(r.data_bytes)
                        ),
                    );
                }
            }
            let applied = client
                .node_status(m.to, false)
                .await
                .ok()
                .and_then(|s| s.replicas.into_iter().find(|r| r.shard == m.shard))
                .map_or(0, |r| r.applied_index);
            let share = (applied.min(commit) * 80).checked_div(commit).unwrap_or(0);
            (
                10 + u32::try_from(share).unwrap_or(80),
                format!("applied {applied} of {commit}"),
            )
        }
        _ => (0, String::new()),
    }
}

fn bar(pct: u32) -> String {
    let filled = usize::try_from(pct / 5).unwrap_or(0).min(20);
    format!("[{}{}] {pct:>3}%", "#".repeat(filled), ".".repeat(20 - filled))
}

fn move_json(m: &pb::PlacementMove, pct: Option<u32>, detail: &str) -> serde_json::Value {
    json!({"shard": m.shard, "from": m.from, "to": m.to, "state": m.state, "step": m.step,
           "started_unix_ms": m.started_unix_ms, "progress_pct": pct, "progress": detail})
}

/// Prints the placement as the servers see it.
async fn show(ctx: &Ctx, client: &Client, p: &pb::GetPlacementResponse, ms: Option<u128>) {
    let leaders = leaders(client).await;
    let mut pcts = Vec::new();
    let mut details = Vec::new();
    for m in &p.in_flight {
        let (pct, detail) = progress(client, m, &leaders).await;
        pcts.push(pct);
        details.push(detail);
    }
    match ctx.output {
        Output::Json => render::json(&json!({
            "paused": p.paused,
            "moves_max": p.moves_max,
            "balanced": p.balanced,
            "loop_node": if p.runs_loop { Some(p.answered_by) } else { None },
            "by_bytes": p.by_bytes,
            "draining_held": p.draining_held,
            "nodes": p.nodes.iter().map(|n| json!({"node": n.node, "replicas": n.replicas, "bytes": n.bytes,
                "leaders": n.leaders, "preferred": n.preferred, "eligible": n.eligible})).collect::<Vec<_>>(),
            "in_flight": p.in_flight.iter().zip(&pcts).zip(&details)
                .map(|((m, pct), d)| move_json(m, Some(*pct), d))
                .collect::<Vec<_>>(),
            "planned": p.planned.iter().map(|m| move_json(m, None, "")).collect::<Vec<_>>(),
            "planned_leaders": p.planned_leaders.iter().map(|l| json!({"shard": l.shard, "node": l.node}))
                .collect::<Vec<_>>(),
            "ms": ms,
        })),
        Output::Table => {
            let mut t = render::table(&["NODE", "REPLICAS", "BYTES", "LEADERS", "PREFERRED", "TAKES NEW WORK"]);
            for n in &p.nodes {
                t.add_row(vec![
                    n.node.to_string(),
                    n.replicas.to_string(),
                    render::size(n.bytes),
                    n.leaders.to_string(),
                    n.preferred.to_string(),
                    if n.eligible { "yes" } else { "no" }.to_string(),
                ]);
            }
            out!("{t}");
            if !p.in_flight.is_empty() {
                let mut t = render::table(&["SHARD", "FROM", "TO", "STEP", "PROGRESS", ""]);
                for ((m, pct), detail) in p.in_flight.iter().zip(&pcts).zip(&details) {
                    let step = if m.state == "cancelled" {
                        format!("cancelled: {}", m.step)
                    } else {
                        m.step.clone()
                    };
                    t.add_row(vec![
                        m.shard.to_string(),
                        m.from.to_string(),
                        m.to.to_string(),
                        step,
                        bar(*pct),
                        detail.clone(),
                    ]);
                }
                out!("moves in flight:\n{t}");
            }
            if !p.planned.is_empty() {
                let mut t = render::table(&["SHARD", "REPLICA FROM", "REPLICA TO"]);
                for m in &p.planned {
                    t.add_row(vec![m.shard.to_string(), m.from.to_string(), m.to.to_string()]);
                }
                out!("planned moves:\n{t}");
            }
            if !p.planned_leaders.is_empty() {
                let mut t = render::table(&["SHARD", "PREFERRED LEADER THEN"]);
                for l in &p.planned_leaders {
                    t.add_row(vec![l.shard.to_string(), l.node.to_string()]);
                }
                out!("planned preferred leaders:\n{t}");
            }
            let state = if p.paused { "paused" } else { "running" };
            let who = if p.runs_loop {
                format!(" on node {}", p.answered_by)
            } else {
                String::new()
            };
            let summary = if p.balanced && p.by_bytes {
                "balanced: bytes per up node within 1/8 of the mean where shard sizes allow, \
                 preferred leaders within one of each other"
                    .to_string()
            } else if p.balanced {
                "balanced: replicas and preferred leaders per up node are within one of each other".to_string()
            } else if p.in_flight.is_empty() && p.planned.is_empty() && !p.draining_held.is_empty() {
                format!(
                    "draining node(s) {:?} still hold replicas that no up node it hears from can take \
                     (add a node, or undrain one)",
                    p.draining_held
                )
            } else {
                format!(
                    "{} move(s) in flight, {} planned, {} preferred-leader change(s) planned",
                    p.in_flight.len(),
                    p.planned.len(),
                    p.planned_leaders.len()
                )
            };
            let took = ms.map(|ms| format!(" ({ms} ms)")).unwrap_or_default();
            out!(
                "placement loop {state}{who}, {} move(s) at once; {summary}{took}",
                p.moves_max
            );
        }
    }
}

/// Whether the last known leaders (the map's hints) are within one of each
/// other over the nodes that take new work.
fn leaders_even(p: &pb::GetPlacementResponse) -> bool {
    let counts: Vec<u32> = p.nodes.iter().filter(|n| n.eligible).map(|n| n.leaders).collect();
    counts.iter().max().copied().unwrap_or(0) <= counts.iter().min().copied().unwrap_or(0) + 1
}

/// Runs the planned moves with `shard move`'s steps, up to `concurrency`
/// at once and never two of one shard at once (`--apply`, paused loop).
async fn run_moves(
    ctx: &Ctx,
    client: &Client,
    moves: &[pb::PlacementMove],
    concurrency: usize,
    deadline: Instant,
) -> Result<(), Failure> {
    let mut queue: Vec<(u64, u64, u64)> = moves.iter().map(|m| (m.shard, m.from, m.to)).collect();
    let mut running: BTreeSet<u64> = BTreeSet::new();
    let mut set = tokio::task::JoinSet::new();
    let mut done = 0usize;
    while !queue.is_empty() || !set.is_empty() {
        while set.len() < concurrency {
            let Some(i) = queue.iter().position(|m| !running.contains(&m.0)) else {
                break;
            };
            let m = queue.remove(i);
            running.insert(m.0);
            let c = client.clone();
            set.spawn(async move { (m, move_replica(&c, m.0, m.1, m.2, deadline).await) });
        }
        let Some(joined) = set.join_next().await else { break };
        let ((shard, from, to), r) = joined.map_err(|e| failed(format!("a move task failed: {e}")))?;
        running.remove(&shard);
        r?;
        done += 1;
        if ctx.output == Output::Table {
            out!(
                "shard {shard}: moved from node {from} to node {to} ({done}/{})",
                moves.len()
            );
        }
    }
    Ok(())
}

/// `cluster balance`.
pub async fn balance(
    ctx: &Ctx,
    apply: bool,
    wait: bool,
    concurrency: usize,
    wait_for: Duration,
) -> Result<u8, Failure> {
    if concurrency == 0 || concurrency > CONCURRENCY_MAX {
        return Err(failed(format!(
            "--concurrency must be 1 to {CONCURRENCY_MAX}, got {concurrency}"
        )));
    }
    if apply && wait {
        return Err(failed("--apply and --wait exclude each other".into()));
    }
    let client = connect(ctx).await?;
    let started = Instant::now();
    let deadline = started + wait_for;
    let p = client.placement().await?;
    if apply {
        if !p.paused {
            return Err(failed(
                "the placement loop is running and makes these moves itself: `phctl cluster balance --wait` \
                 follows it; to move replicas by hand, pause it first (`phctl cluster placement --pause`)"
                    .into(),
            ));
        }
        if !p.in_flight.is_empty() {
            return Err(failed(format!(
                "{} move(s) of the placement loop are still in flight; they finish while it is paused \
                 (`phctl cluster balance` shows them): run --apply after them",
                p.in_flight.len()
            )));
        }
        run_moves(ctx, &client, &p.planned, concurrency, deadline).await?;
        // Preferred leaders are planned once no replica move is left.
        let p = until("the moved replicas in the map", deadline, || async {
            client.placement().await.ok().filter(|p| p.planned.is_empty())
        })
        .await?;
        for l in &p.planned_leaders {
            client.set_preferred_leader(l.shard, l.node).await?;
            if ctx.output == Output::Table {
                out!("shard {}: node {} is the preferred leader", l.shard, l.node);
            }
        }
        // The servers' rebalancer hands each shard to its chosen node.
        until("the leaderships to reach their chosen nodes", deadline, || async {
            let now = leaders(&client).await;
            p.planned_leaders
                .iter()
                .all(|l| now.get(&l.shard).map(|(n, _)| *n) == Some(l.node))
                .then_some(())
        })
        .await?;
    }
    if wait {
        if p.paused {
            return Err(failed(
                "the placement loop is paused: resume it (`phctl cluster placement --resume`) or move by hand \
                 (`phctl cluster balance --apply`)"
                    .into(),
            ));
        }
        let mut last = Instant::now();
        let p = loop {
            if let Ok(p) = client.placement().await {
                if p.balanced && leaders_even(&p) {
                    break p;
                }
                if ctx.output == Output::Table && last.elapsed() >= Duration::from_secs(10) {
                    last = Instant::now();
                    show(ctx, &client, &p, None).await;
                }
            }
            if Instant::now() >= deadline {
                return Err(Failure {
                    message: "timed out waiting for the cluster to balance; `phctl cluster balance` shows where \
                              it stands"
                        .into(),
                    exit: crate::EXIT_UNAVAILABLE,
                });
            }
            tokio::time::sleep(WAIT_POLL).await;
        };
        show(ctx, &client, &p, Some(started.elapsed().as_millis())).await;
        return Ok(0);
    }
    let p = if apply { client.placement().await? } else { p };
    show(ctx, &client, &p, apply.then(|| started.elapsed().as_millis())).await;
    Ok(0)
}

/// `cluster placement [--pause | --resume] [--moves-max N] [--split-size
/// SIZE|off]`: prints the loop's settings after the change (or as they
/// are, given none).
pub async fn placement(
    ctx: &Ctx,
    pause: bool,
    resume: bool,
    moves_max: Option<u32>,
    split_size: Option<String>,
) -> Result<u8, Failure> {
    if pause && resume {
        return Err(failed("--pause and --resume exclude each other".into()));
    }
    let split_size_bytes = split_size.as_deref().map(parse_split_size).transpose()?;
    let client = connect(ctx).await?;
    let paused = if pause {
        Some(true)
    } else if resume {
        Some(false)
    } else {
        None
    };
    let (paused, moves_max, split) = if paused.is_none() && moves_max.is_none() && split_size_bytes.is_none() {
        let p = client.placement().await?;
        (p.paused, p.moves_max, p.split_size_bytes)
    } else {
        let r = client
            .set_placement(pb::SetPlacementRequest {
                paused,
                moves_max,
                split_size_bytes,
            })
            .await?;
        (r.paused, r.moves_max, r.split_size_bytes)
    };
    let never = split == u64::MAX;
    match ctx.output {
        Output::Json => render::json(&json!({"paused": paused, "moves_max": moves_max,
            "split_size_bytes": if never { None } else { Some(split) }})),
        Output::Table => out!(
            "placement loop {}, {moves_max} move(s) at once, {}",
            if paused { "paused" } else { "running" },
            if never {
                "no automatic splits".to_string()
            } else {
                format!("shards split at {}", render::size(split))
            }
        ),
    }
    Ok(0)
}

/// `--split-size`: "off", or bytes with an optional KiB/MiB/GiB/TiB suffix.
fn parse_split_size(s: &str) -> Result<u64, Failure> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(u64::MAX);
    }
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => {
            return Err(failed(format!(
                "--split-size {s:?}: a byte count with KiB, MiB, GiB or TiB, or off"
            )))
        }
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| {
            failed(format!(
                "--split-size {s:?}: a byte count with KiB, MiB, GiB or TiB, or off"
            ))
        })
}
