//! `phctl cluster balance [--apply] [--concurrency N]`: replicas per node
//! brought within ±1 of each other across the up nodes, by replica moves.
//!
//! The plan is a pure function of the shard map and the node states
//! ([`plan`]), so it is unit-tested here; `--apply` runs it with `shard
//! move`'s steps, up to `--concurrency` moves at once and never two of
//! one shard at once. Without `--apply` it only prints the plan. This is
//! the operator-driven form of issue 13's placement loop: the servers do
//! not yet run one by themselves. Balance is by replica count (shards of
//! different sizes weigh the same) and ignores draining nodes, whose
//! replicas are `node drain`'s to move.

use crate::commands::{connect, failed, Ctx, Failure};
use crate::moves::move_replica;
use crate::{render, Output};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Moves running at once, at most (each one streams a snapshot).
pub const CONCURRENCY_MAX: usize = 16;

/// One planned replica move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub shard: u64,
    pub from: u64,
    pub to: u64,
}

/// Replicas per up node (a node with none counts as 0).
fn counts(voters: &BTreeMap<u64, Vec<u64>>, up: &BTreeSet<u64>) -> BTreeMap<u64, usize> {
    let mut c: BTreeMap<u64, usize> = up.iter().map(|n| (*n, 0)).collect();
    for vs in voters.values() {
        for v in vs {
            if let Some(n) = c.get_mut(v) {
                *n += 1;
            }
        }
    }
    c
}

/// The moves that bring the up nodes' replica counts within one of each
/// other: repeatedly, from the fullest node to the emptiest, of the
/// lowest-id shard the fullest holds and the emptiest does not (so a shard
/// never gets two replicas on one node). Stops when balanced or when no
/// such shard exists. `voters` is shard → voters.
pub fn plan(voters: &BTreeMap<u64, Vec<u64>>, up: &BTreeSet<u64>) -> Vec<Move> {
    let mut voters = voters.clone();
    let mut moves = Vec::new();
    let total: usize = voters.values().map(Vec::len).sum();
    // Each move lowers the spread's sum of squares, so this bound is never
    // the reason to stop; it only makes the loop's end evident.
    for _ in 0..=total {
        let c = counts(&voters, up);
        let Some((&full, &high)) = c.iter().max_by_key(|(n, k)| (**k, std::cmp::Reverse(**n))) else {
            break;
        };
        let Some((&empty, &low)) = c.iter().min_by_key(|(n, k)| (**k, **n)) else {
            break;
        };
        if high <= low + 1 {
            break;
        }
        let Some((&shard, vs)) = voters
            .iter_mut()
            .find(|(_, vs)| vs.contains(&full) && !vs.contains(&empty))
        else {
            break;
        };
        for v in vs.iter_mut() {
            if *v == full {
                *v = empty;
            }
        }
        moves.push(Move {
            shard,
            from: full,
            to: empty,
        });
    }
    moves
}

/// `cluster balance`.
pub async fn balance(ctx: &Ctx, apply: bool, concurrency: usize, wait: Duration) -> Result<u8, Failure> {
    if concurrency == 0 || concurrency > CONCURRENCY_MAX {
        return Err(failed(format!(
            "--concurrency must be 1 to {CONCURRENCY_MAX}, got {concurrency}"
        )));
    }
    let client = connect(ctx).await?;
    let up: BTreeSet<u64> = client
        .nodes()
        .await?
        .iter()
        .filter(|n| n.state == pigeonhole_client::pb::NodeState::Up as i32)
        .map(|n| n.id)
        .collect();
    let voters: BTreeMap<u64, Vec<u64>> = client
        .routing()
        .shards
        .iter()
        .map(|s| (s.id, s.replicas.clone()))
        .collect();
    let moves = plan(&voters, &up);
    let before = counts(&voters, &up);
    if !apply || moves.is_empty() {
        match ctx.output {
            Output::Json => render::json(&json!({
                "replicas_per_node": before,
                "moves": moves.iter().map(|m| json!({"shard": m.shard, "from": m.from, "to": m.to})).collect::<Vec<_>>(),
                "applied": false,
            })),
            Output::Table => {
                out!("replicas per up node: {before:?}");
                if moves.is_empty() {
                    out!("balanced: every up node holds within one replica of the others");
                } else {
                    let mut t = render::table(&["SHARD", "FROM", "TO"]);
                    for m in &moves {
                        t.add_row(vec![m.shard.to_string(), m.from.to_string(), m.to.to_string()]);
                    }
                    out!("{t}");
                    out!("{} move(s) planned; run with --apply to make them", moves.len());
                }
            }
        }
        return Ok(0);
    }
    let deadline = Instant::now() + wait;
    let started = Instant::now();
    let mut queue: Vec<Move> = moves.clone();
    let mut running: BTreeSet<u64> = BTreeSet::new();
    let mut set = tokio::task::JoinSet::new();
    let mut done = 0usize;
    while !queue.is_empty() || !set.is_empty() {
        // Start what may start: under the limit, one move per shard.
        while set.len() < concurrency {
            let Some(i) = queue.iter().position(|m| !running.contains(&m.shard)) else {
                break;
            };
            let m = queue.remove(i);
            running.insert(m.shard);
            let c = client.clone();
            set.spawn(async move { (m, move_replica(&c, m.shard, m.from, m.to, deadline).await) });
        }
        let Some(joined) = set.join_next().await else { break };
        let (m, r) = joined.map_err(|e| failed(format!("a move task failed: {e}")))?;
        running.remove(&m.shard);
        r?;
        done += 1;
        if ctx.output == Output::Table {
            out!(
                "shard {}: moved from node {} to node {} ({done}/{})",
                m.shard,
                m.from,
                m.to,
                moves.len()
            );
        }
    }
    client.refresh().await?;
    let after_voters: BTreeMap<u64, Vec<u64>> = client
        .routing()
        .shards
        .iter()
        .map(|s| (s.id, s.replicas.clone()))
        .collect();
    let after = counts(&after_voters, &up);
    let ms = started.elapsed().as_millis();
    match ctx.output {
        Output::Json => render::json(&json!({
            "replicas_per_node": after,
            "moves": moves.iter().map(|m| json!({"shard": m.shard, "from": m.from, "to": m.to})).collect::<Vec<_>>(),
            "applied": true,
            "ms": ms,
        })),
        Output::Table => out!("balanced in {ms} ms: replicas per up node {after:?}"),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(voters: &mut BTreeMap<u64, Vec<u64>>, moves: &[Move]) {
        for m in moves {
            let vs = voters.get_mut(&m.shard).unwrap();
            assert!(vs.contains(&m.from) && !vs.contains(&m.to), "{m:?} on {vs:?}");
            for v in vs.iter_mut() {
                if *v == m.from {
                    *v = m.to;
                }
            }
        }
    }

    #[test]
    fn the_plan_evens_replicas_without_doubling_a_shard_on_a_node() {
        // 8 shards of 3 on nodes 1..=3; nodes 4 and 5 empty.
        let mut voters: BTreeMap<u64, Vec<u64>> = (1..=8).map(|s| (s, vec![1, 2, 3])).collect();
        let up: BTreeSet<u64> = (1..=5).collect();
        let moves = plan(&voters, &up);
        apply(&mut voters, &moves);
        let c = counts(&voters, &up);
        let (lo, hi) = (c.values().min().unwrap(), c.values().max().unwrap());
        assert!(hi - lo <= 1, "{c:?}");
        assert_eq!(c.values().sum::<usize>(), 24);
        for vs in voters.values() {
            let distinct: BTreeSet<u64> = vs.iter().copied().collect();
            assert_eq!(distinct.len(), 3, "{vs:?}");
        }
        // Balanced already: nothing to do.
        assert!(plan(&voters, &up).is_empty());
    }

    #[test]
    fn nodes_that_are_not_up_are_ignored() {
        // Node 4 is draining (not in `up`): its replica stays, and it gets none.
        let voters: BTreeMap<u64, Vec<u64>> = [(1, vec![1, 2, 4]), (2, vec![1, 2, 3]), (3, vec![1, 2, 3])].into();
        let up: BTreeSet<u64> = [1, 2, 3].into();
        let moves = plan(&voters, &up);
        assert!(moves.iter().all(|m| m.to != 4 && m.from != 4), "{moves:?}");
        // 1 and 2 hold 3 each, 3 holds 2: within one.
        assert!(moves.is_empty(), "{moves:?}");
    }
}
