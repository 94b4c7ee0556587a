//! `phctl node list | drain | undrain | remove`: a node's life cycle.
//!
//! A node's state (up, draining, removed) lives in the cluster's metadata
//! group (`Admin.SetNodeState`); the servers refuse new replicas and
//! leaderships on a draining or removed node, and refuse to remove a node
//! that still holds a replica. A drain moves the node's leaderships here
//! first (clients keep writing; a leader transfer takes a moment). Its
//! replicas are then moved by the placement loop in the servers (D40),
//! which phctl follows; with the loop paused, phctl moves them itself with
//! `phctl shard move`'s steps, so a drain cut short is finished by running
//! it again either way.

use crate::commands::{all_status, connect, failed, Ctx, Failure};
use crate::moves::{move_replica, until, view};
use crate::{render, Output};
use pigeonhole_client::{pb, Client};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

fn state_name(state: i32) -> &'static str {
    match pb::NodeState::try_from(state) {
        Ok(pb::NodeState::Up) => "up",
        Ok(pb::NodeState::Draining) => "draining",
        Ok(pb::NodeState::Removed) => "removed",
        _ => "unknown",
    }
}

/// What each node holds, from NodeStatus of every node: data-shard
/// replicas (voters and learners) and the shards it leads. Shard 0, the
/// metadata group, is on every node and is not counted.
#[derive(Debug, Default)]
struct Holdings {
    replicas: BTreeMap<u64, BTreeSet<u64>>,
    leads: BTreeMap<u64, BTreeSet<u64>>,
    unreachable: BTreeMap<u64, String>,
}

async fn holdings(client: &Client) -> Holdings {
    let mut h = Holdings::default();
    for (node, status) in all_status(client, false).await {
        match status {
            Ok(s) => {
                for r in s.replicas.iter().filter(|r| r.shard != 0) {
                    h.replicas.entry(node).or_default().insert(r.shard);
                    if r.role == pb::ReplicaRole::Leader as i32 {
                        h.leads.entry(node).or_default().insert(r.shard);
                    }
                }
            }
            Err(e) => {
                h.unreachable.insert(node, e);
            }
        }
    }
    h
}

fn count(m: &BTreeMap<u64, BTreeSet<u64>>, node: u64) -> usize {
    m.get(&node).map_or(0, BTreeSet::len)
}

/// `node list`.
pub async fn node_list(ctx: &Ctx) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let nodes = client.nodes().await?;
    let h = holdings(&client).await;
    let rows: Vec<Value> = nodes
        .iter()
        .map(|n| {
            json!({
                "id": n.id,
                "address": n.address,
                "zone": n.zone,
                "state": state_name(n.state),
                "leaders_only": n.leaders_only,
                "reachable": !h.unreachable.contains_key(&n.id),
                "replicas": count(&h.replicas, n.id),
                "leaders": count(&h.leads, n.id),
            })
        })
        .collect();
    match ctx.output {
        Output::Json => render::json(&json!({ "nodes": rows })),
        Output::Table => {
            let mut t = render::table(&["NODE", "ADDRESS", "ZONE", "STATE", "REACHABLE", "REPLICAS", "LEADERS"]);
            for n in &nodes {
                let down = h.unreachable.get(&n.id);
                t.add_row(vec![
                    n.id.to_string(),
                    n.address.clone(),
                    if n.zone.is_empty() { "-".into() } else { n.zone.clone() },
                    if n.leaders_only {
                        format!("{} (leaders only)", state_name(n.state))
                    } else {
                        state_name(n.state).to_string()
                    },
                    down.map_or("yes".to_string(), |e| format!("no ({e})")),
                    if down.is_some() {
                        "-".into()
                    } else {
                        count(&h.replicas, n.id).to_string()
                    },
                    if down.is_some() {
                        "-".into()
                    } else {
                        count(&h.leads, n.id).to_string()
                    },
                ]);
            }
            out!("{t}");
        }
    }
    Ok(0)
}

/// `node undrain N` and `node remove N`: one state change.
pub async fn node_set(ctx: &Ctx, node: u64, state: pb::NodeState) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let r = client.set_node_state(node, state).await?;
    match ctx.output {
        Output::Json => render::json(&json!({
            "node": node, "previous": state_name(r.previous), "state": state_name(r.state),
        })),
        Output::Table => out!("node {node}: {} -> {}", state_name(r.previous), state_name(r.state)),
    }
    Ok(0)
}

/// The steps a drain or forced removal took: printed as they happen in a
/// table, gathered for JSON.
struct Steps {
    output: Output,
    done: Vec<String>,
}

impl Steps {
    fn tell(&mut self, s: String) {
        if self.output == Output::Table {
            out!("{s}");
        }
        self.done.push(s);
    }
}

/// The nodes in state up.
async fn up_nodes(client: &Client) -> Result<BTreeSet<u64>, Failure> {
    Ok(client
        .nodes()
        .await?
        .iter()
        .filter(|n| n.state == pb::NodeState::Up as i32)
        .map(|n| n.id)
        .collect())
}

/// Moves every replica of `shards` that `node` holds to the up node with
/// the fewest replicas that lacks the shard, preferring one whose zone the
/// shard's other voters do not use (a learner on `node` is just removed),
/// with `shard move`'s steps. `h` gives the starting counts.
async fn evacuate(
    client: &Client,
    node: u64,
    shards: &[u64],
    h: &Holdings,
    deadline: Instant,
    steps: &mut Steps,
) -> Result<(), Failure> {
    let (up, zones) = crate::balance::up_and_zones(client).await?;
    let mut load: BTreeMap<u64, usize> = up
        .iter()
        .filter(|n| **n != node && !h.unreachable.contains_key(n))
        .map(|n| (*n, count(&h.replicas, *n)))
        .collect();
    // Which of `shards` have a voter on the node, for the progress count.
    let mut voting = Vec::new();
    for &shard in shards {
        let v = until("a leader of the shard", deadline, || view(client, shard)).await?;
        if v.voters.contains(&node) {
            voting.push(shard);
        }
    }
    let mut moved = 0;
    for &shard in shards {
        // Resumed meanwhile: the loop moves the rest (two movers of one
        // replica could leave a shard a voter too many).
        if !client.placement().await?.paused {
            steps.tell("the placement loop is running again: it moves the rest".to_string());
            if follow_loop(client, node, deadline, steps).await? {
                return Ok(());
            }
        }
        // A move the loop asked for on this shard before it was paused is
        // called off; its learner (perhaps on the node this drain would
        // pick) must be gone before this drain moves the shard, or the
        // drain could adopt it as its own.
        until(
            &format!("the placement loop's cancelled move of shard {shard} to end"),
            deadline,
            || async {
                let p = client.placement().await.ok()?;
                p.in_flight.iter().all(|m| m.shard != shard).then_some(())
            },
        )
        .await?;
        let v = until("a leader of the shard", deadline, || view(client, shard)).await?;
        if !v.voters.contains(&node) {
            if v.learners.contains(&node) {
                // A learner left by a move cut short: just drop it.
                drop_learner(client, shard, node, steps).await?;
            }
            continue;
        }
        // A node in a zone the shard's other voters do not use comes first.
        let target = load
            .iter()
            .filter(|(n, _)| !v.voters.contains(n) && !v.learners.contains(n))
            .min_by_key(|(n, c)| (!crate::balance::zone_free(&v.voters, node, **n, &zones), **c, **n))
            .map(|(n, _)| *n)
            .ok_or_else(|| {
                failed(format!(
                    "shard {shard}: no live up node without a replica of it can take node {node}'s (voters {:?}, \
                     up nodes {up:?}); add a node or undrain one",
                    v.voters
                ))
            })?;
        move_replica(client, shard, node, target, deadline).await?;
        *load.entry(target).or_default() += 1;
        moved += 1;
        steps.tell(format!(
            "shard {shard}: replica moved to node {target} ({moved}/{})",
            voting.len().max(moved)
        ));
    }
    Ok(())
}

/// Takes `node`'s replicas of `shards` away: while the placement loop
/// runs, it moves them itself (the node is draining) and this follows it,
/// reporting each replica as it leaves; with the loop paused (or paused
/// meanwhile), they are moved here ([`evacuate`]), never by both at once.
async fn move_off(
    client: &Client,
    node: u64,
    shards: &[u64],
    h: &Holdings,
    deadline: Instant,
    steps: &mut Steps,
) -> Result<(), Failure> {
    if follow_loop(client, node, deadline, steps).await? {
        // A learner on the node no move owns (one cut short) would block
        // the removal until the loop's stray-learner clean-up (10 min).
        for &shard in shards {
            if view(client, shard).await.is_some_and(|v| v.learners.contains(&node)) {
                drop_learner(client, shard, node, steps).await?;
            }
        }
        return Ok(());
    }
    steps.tell("the placement loop is paused: phctl moves the replicas".to_string());
    evacuate(client, node, shards, h, deadline, steps).await
}

/// Removes `node`'s learner of `shard` (a move cut short left it).
async fn drop_learner(client: &Client, shard: u64, node: u64, steps: &mut Steps) -> Result<(), Failure> {
    let remove = pb::MembershipChange {
        kind: pb::MembershipChangeKind::Remove as i32,
        node,
    };
    if let Err(e) = client.change_membership(shard, &[remove]).await {
        // The loop's clean-up of a cancelled move may have removed it first.
        if view(client, shard).await.is_some_and(|v| v.learners.contains(&node)) {
            return Err(e.into());
        }
    }
    steps.tell(format!("shard {shard}: learner on node {node} removed"));
    Ok(())
}

/// Polls (every 500 ms) in which the placement loop plans no move off a
/// draining node that still holds replicas before a drain gives up: a
/// few rounds of the loop, for it to see the new state.
const FOLLOW_IDLE_ROUNDS_MAX: u32 = 10;

/// Follows the placement loop while it empties draining `node`: Ok(true)
/// once the shard map lists the node in no shard, Ok(false) as soon as the
/// loop is paused (the caller moves the rest).
async fn follow_loop(client: &Client, node: u64, deadline: Instant, steps: &mut Steps) -> Result<bool, Failure> {
    client.refresh().await?;
    let before: BTreeMap<u64, Vec<u64>> = client
        .routing()
        .shards
        .iter()
        .filter(|s| s.replicas.contains(&node))
        .map(|s| (s.id, s.replicas.clone()))
        .collect();
    let total = before.len();
    let mut left: BTreeSet<u64> = before.keys().copied().collect();
    // Rounds in a row in which the loop had no move off the node planned or
    // in flight while the node still held replicas.
    let mut idle = 0u32;
    loop {
        let p = client.placement().await?;
        if p.paused {
            return Ok(false);
        }
        client.refresh().await?;
        let r = client.routing();
        let gone: Vec<_> = r
            .shards
            .iter()
            .filter(|s| left.contains(&s.id) && !s.replicas.contains(&node))
            .collect();
        for s in gone {
            left.remove(&s.id);
            let old = before.get(&s.id).cloned().unwrap_or_default();
            let to: Vec<String> = s
                .replicas
                .iter()
                .filter(|n| !old.contains(n))
                .map(u64::to_string)
                .collect();
            steps.tell(format!(
                "shard {}: replica moved to node {} by the placement loop ({}/{total})",
                s.id,
                to.join(", "),
                total - left.len()
            ));
        }
        // Shards split off meanwhile sit on the node too; the loop moves
        // them as well.
        let still: Vec<u64> = r
            .shards
            .iter()
            .filter(|s| s.replicas.contains(&node))
            .map(|s| s.id)
            .collect();
        if still.is_empty() {
            return Ok(true);
        }
        // Only the loop's own node's answer counts: another node plans over
        // the peers it hears from, which may leave every target out.
        let moving = p.planned.iter().chain(&p.in_flight).any(|m| m.from == node);
        idle = if moving || !p.runs_loop { 0 } else { idle + 1 };
        if idle >= FOLLOW_IDLE_ROUNDS_MAX {
            return Err(failed(format!(
                "the placement loop plans no move for node {node}'s replicas of shards {still:?}: no up node \
                 that is heard from and lacks the shard can take them (add a node or undrain one), or a shard \
                 has no other live voter"
            )));
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "timed out: the placement loop still has node {node}'s replicas of shards {still:?} to move \
                 (phctl cluster balance shows why); run the same command again to keep following"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the cluster's shard map lists `node` in no shard's voters:
/// each shard's leader writes its record to the metadata group after it
/// applies a change, a moment after the move returned, and a removal is
/// refused until the map is clear.
async fn until_map_clear(client: &Client, node: u64, deadline: Instant) -> Result<(), Failure> {
    until(
        &format!("the shard map to list no replica on node {node}"),
        deadline,
        || async {
            client.refresh().await.ok()?;
            let r = client.routing();
            r.shards.iter().all(|s| !s.replicas.contains(&node)).then_some(())
        },
    )
    .await
}

/// `node drain N`: marks the node draining (`leaders_only`: its replicas
/// stay), then moves its leaderships, then (unless `leaders_only`) has
/// its replicas moved to the up nodes that hold the fewest ([`move_off`]).
pub async fn node_drain(ctx: &Ctx, node: u64, wait: Duration, leaders_only: bool) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let deadline = Instant::now() + wait;
    let started = Instant::now();
    let h = holdings(&client).await;
    if h.unreachable.contains_key(&node) {
        return Err(failed(format!(
            "node {node} does not answer; a drain moves work off a live node (for a dead one: phctl node remove \
             {node} --force)"
        )));
    }
    let r = client
        .change_node_state(node, pb::NodeState::Draining, leaders_only)
        .await?;
    let mut steps = Steps {
        output: ctx.output,
        done: Vec::new(),
    };
    steps.tell(format!(
        "node {node}: {} -> {}{}",
        state_name(r.previous),
        state_name(r.state),
        if leaders_only { " (leaderships only)" } else { "" }
    ));
    let up = up_nodes(&client).await?;
    // 1. Leaderships first: clients keep writing while replicas move.
    for &shard in h.leads.get(&node).into_iter().flatten() {
        let v = until("a leader of the shard", deadline, || view(&client, shard)).await?;
        if v.leader != node {
            continue;
        }
        let Some(next) = v.voters.iter().copied().find(|n| *n != node && up.contains(n)) else {
            return Err(failed(format!(
                "shard {shard}: no other voter on an up node to lead (voters {:?})",
                v.voters
            )));
        };
        client.transfer_leader(shard, next).await?;
        until(&format!("node {next} to lead shard {shard}"), deadline, || async {
            view(&client, shard).await.filter(|v| v.leader != node).map(|_| ())
        })
        .await?;
        steps.tell(format!("shard {shard}: leadership moved to node {next}"));
    }
    // 2. Then every replica.
    if !leaders_only {
        let shards: Vec<u64> = h.replicas.get(&node).into_iter().flatten().copied().collect();
        move_off(&client, node, &shards, &h, deadline, &mut steps).await?;
        until_map_clear(&client, node, deadline).await?;
    }
    let ms = started.elapsed().as_millis();
    match ctx.output {
        Output::Json => render::json(&json!({
            "node": node, "leaders_only": leaders_only, "steps": steps.done, "ms": ms,
        })),
        Output::Table if leaders_only => out!(
            "node {node} drained of leaderships in {ms} ms; its replicas stay (restart it, then phctl node undrain \
             {node})"
        ),
        Output::Table => out!(
            "node {node} drained in {ms} ms: no replica and no leadership left (phctl node remove {node} takes it \
             out)"
        ),
    }
    Ok(0)
}

/// `node remove N --force`: for a node that does not answer. Marks it
/// draining, rebuilds each of its replicas on another node from the
/// surviving replicas (the same joint change as a move; the survivors are
/// a majority of the old configuration), then marks it removed.
pub async fn node_remove_dead(ctx: &Ctx, node: u64, wait: Duration) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    let deadline = Instant::now() + wait;
    let started = Instant::now();
    let h = holdings(&client).await;
    if !h.unreachable.contains_key(&node) {
        return Err(failed(format!(
            "node {node} answers: --force is for a dead node; drain a live one (phctl node drain {node}), then \
             remove it"
        )));
    }
    let r = client.set_node_state(node, pb::NodeState::Draining).await?;
    let mut steps = Steps {
        output: ctx.output,
        done: Vec::new(),
    };
    steps.tell(format!(
        "node {node}: {} -> {} (does not answer)",
        state_name(r.previous),
        state_name(r.state)
    ));
    // The dead node cannot say what it holds: every data shard is looked at.
    let shards: Vec<u64> = client.routing().shards.iter().map(|s| s.id).collect();
    move_off(&client, node, &shards, &h, deadline, &mut steps).await?;
    until_map_clear(&client, node, deadline).await?;
    let r = client.set_node_state(node, pb::NodeState::Removed).await?;
    steps.tell(format!(
        "node {node}: {} -> {}",
        state_name(r.previous),
        state_name(r.state)
    ));
    let ms = started.elapsed().as_millis();
    match ctx.output {
        Output::Json => render::json(&json!({ "node": node, "steps": steps.done, "ms": ms })),
        Output::Table => out!("node {node} removed in {ms} ms; its replicas were rebuilt on the other nodes"),
    }
    Ok(0)
}
