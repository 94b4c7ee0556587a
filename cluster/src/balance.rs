//! The placement loop's plans, as pure functions of the shard map, the
//! node states and the zones: which replica moves bring the up nodes'
//! replica counts within one of each other (keeping each shard's replicas
//! in different zones), and which preferred leaders put every up node
//! within one leadership of the others. Pure so that they are unit-tested
//! here, and so that the loop on the metadata leader (`driver::place`) and
//! `Admin.GetPlacement` (what `phctl cluster balance` shows) compute the
//! same plan from the same inputs.
//!
//! Balance is by replica count while the nodes hold little (a mean below
//! [`BYTES_BALANCE_MIN`] per node) or the shards are of about one size, and
//! by bytes when they differ (the largest at least [`BYTES_SPREAD_MIN`]
//! times the smallest): each shard weighs its size as its leader last
//! counted it (`size/` records, D39), so a node with a few large shards and
//! one with many small ones can both be balanced. D36 and D39 say why, and
//! what PD's scores add.

use std::collections::{BTreeMap, BTreeSet};

/// Shard → bytes, as its leader last counted them (a shard without a
/// count weighs the mean of the counted ones).
pub type Sizes = BTreeMap<u64, u64>;

/// Balance is by bytes once the up nodes hold this much each on average:
/// below it, moves by bytes would shuffle shards too small to matter, and
/// an empty cluster that grows must still spread its replicas (by count).
pub const BYTES_BALANCE_MIN: u64 = 64 << 20;
/// Balance is by bytes only when the largest shard weighs at least this
/// many times the smallest ("when shards differ in size"). Well above 2:
/// splits at a size make halves of about half that size, so a spread near
/// 2 is the normal state of a growing cluster, and a threshold there would
/// flip between the modes (each undoing the other's moves).
pub const BYTES_SPREAD_MIN: u64 = 4;
/// By bytes, a node may hold up to 1/n of the mean node's bytes more than
/// another before a move is planned: sizes are counted now and then, and a
/// move costs a snapshot, so near-balance is left alone.
pub const BYTES_TOLERANCE_DIV: u64 = 8;

/// One planned replica move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub shard: u64,
    pub from: u64,
    pub to: u64,
}

/// Replicas per up node (a node with none counts as 0).
pub fn counts(voters: &BTreeMap<u64, Vec<u64>>, up: &BTreeSet<u64>) -> BTreeMap<u64, usize> {
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

/// Node → failure domain (`pigeonhole --zone`); a node without one maps
/// to "" or is absent.
pub type Zones = BTreeMap<u64, String>;

fn zone_of(zones: &Zones, node: u64) -> &str {
    zones.get(&node).map_or("", String::as_str)
}

/// Whether `to` may take the replica of a shard with voters `vs` that
/// `from` gives up: it holds none, and its zone (if any) is not one of the
/// other voters' zones.
pub fn zone_free(vs: &[u64], from: u64, to: u64, zones: &Zones) -> bool {
    let z = zone_of(zones, to);
    !vs.contains(&to) && (z.is_empty() || !vs.iter().any(|v| *v != from && zone_of(zones, *v) == z))
}

/// The moves that put every shard's replicas in different zones where the
/// up nodes allow, and then bring the up nodes' replica counts within one
/// of each other:
/// 1. spread: a voter that shares a zone with another voter of its shard
///    moves to the up node with the fewest replicas in a zone the shard
///    does not use yet (nodes without a zone take any shard);
/// 2. counts: repeatedly, from the fullest node to the emptiest node that
///    can take one of its replicas (at least two fewer, the lowest-id
///    shard it lacks whose other voters leave its zone free), so a shard
///    never gets two replicas on one node or, by a move, two in one zone.
///
/// Stops when balanced or when no such move exists. `voters` is shard →
/// voters. With `sizes` saying the nodes hold [`BYTES_BALANCE_MIN`] or more
/// on average, step 2 is by bytes instead ([`even_bytes`]). Before both,
/// every voter on a node of `evacuate_from` (draining, its replicas to go;
/// in the order given) moves to an up node ([`evacuate`]).
pub fn plan(
    voters: &BTreeMap<u64, Vec<u64>>,
    up: &BTreeSet<u64>,
    zones: &Zones,
    sizes: &Sizes,
    evacuate_from: &[u64],
) -> Vec<Move> {
    let mut voters = voters.clone();
    let mut moves = Vec::new();
    evacuate(&mut voters, &mut moves, up, zones, evacuate_from);
    let total: usize = voters.values().map(Vec::len).sum();
    let shards: Vec<u64> = voters.keys().copied().collect();
    for shard in shards {
        // Each move ends one shared zone, so a shard needs at most one per voter.
        for _ in 0..total {
            let Some(vs) = voters.get(&shard).cloned() else { break };
            let dup = vs.iter().enumerate().find_map(|(i, v)| {
                let z = zone_of(zones, *v);
                (!z.is_empty() && vs.iter().take(i).any(|w| zone_of(zones, *w) == z)).then_some(*v)
            });
            let Some(from) = dup else { break };
            let c = counts(&voters, up);
            let Some(to) = up
                .iter()
                .copied()
                .filter(|n| zone_free(&vs, from, *n, zones) && !zone_of(zones, *n).is_empty())
                .min_by_key(|n| (c.get(n).copied().unwrap_or(0), *n))
            else {
                break;
            };
            move_voter(&mut voters, &mut moves, Move { shard, from, to });
        }
    }
    if let Some(weights) = byte_weights(&voters, up, sizes) {
        even_bytes(&mut voters, &mut moves, up, zones, &weights);
        return moves;
    }
    // Each move lowers the spread's sum of squares, so this bound is never
    // the reason to stop; it only makes the loop's end evident.
    for _ in 0..=total {
        let c = counts(&voters, up);
        let mut fulls: Vec<(usize, u64)> = c.iter().map(|(n, k)| (*k, *n)).collect();
        fulls.sort_unstable_by_key(|(k, n)| (std::cmp::Reverse(*k), *n));
        let mut empties = fulls.clone();
        empties.sort_unstable();
        let next = fulls.iter().find_map(|&(high, full)| {
            empties
                .iter()
                .take_while(|(low, _)| low + 1 < high)
                .find_map(|&(_, empty)| {
                    voters
                        .iter()
                        .find(|(_, vs)| vs.contains(&full) && zone_free(vs, full, empty, zones))
                        .map(|(shard, _)| Move {
                            shard: *shard,
                            from: full,
                            to: empty,
                        })
                })
        });
        let Some(m) = next else { break };
        move_voter(&mut voters, &mut moves, m);
    }
    moves
}

/// Each shard's weight in bytes (a shard without a count weighs the mean
/// of the counted ones), or None when nothing is counted.
pub fn weights(voters: &BTreeMap<u64, Vec<u64>>, sizes: &Sizes) -> Option<Sizes> {
    let known: Vec<u64> = voters.keys().filter_map(|s| sizes.get(s).copied()).collect();
    let known_count = u64::try_from(known.len()).ok().filter(|n| *n > 0)?;
    let mean_shard = known.iter().fold(0u64, |a, b| a.saturating_add(*b)) / known_count;
    Some(
        voters
            .keys()
            .map(|s| (*s, sizes.get(s).copied().unwrap_or(mean_shard)))
            .collect(),
    )
}

/// Whether balance is by bytes: the shards differ in size (the largest
/// weighs at least [`BYTES_SPREAD_MIN`] times the smallest; shards of
/// about one size balance more precisely by count, within one replica) and
/// the up nodes hold [`BYTES_BALANCE_MIN`] or more on average by `weights`.
pub fn by_bytes(voters: &BTreeMap<u64, Vec<u64>>, up: &BTreeSet<u64>, weights: &Sizes) -> bool {
    let sizes = voters.keys().map(|s| weights.get(s).copied().unwrap_or(0));
    let (lo, hi) = sizes.fold((u64::MAX, 0u64), |(lo, hi), w| (lo.min(w), hi.max(w)));
    if hi == 0 || hi < lo.saturating_mul(BYTES_SPREAD_MIN) {
        return false;
    }
    let held: u64 = node_bytes(voters, up, weights)
        .values()
        .fold(0u64, |a, b| a.saturating_add(*b));
    u64::try_from(up.len())
        .ok()
        .filter(|n| *n > 0)
        .is_some_and(|n| held / n >= BYTES_BALANCE_MIN)
}

/// The weights to balance by, when balance is by bytes.
fn byte_weights(voters: &BTreeMap<u64, Vec<u64>>, up: &BTreeSet<u64>, sizes: &Sizes) -> Option<Sizes> {
    weights(voters, sizes).filter(|w| by_bytes(voters, up, w))
}

/// Bytes per up node (a node with none: 0).
pub fn node_bytes(voters: &BTreeMap<u64, Vec<u64>>, up: &BTreeSet<u64>, weights: &Sizes) -> BTreeMap<u64, u64> {
    let mut b: BTreeMap<u64, u64> = up.iter().map(|n| (*n, 0)).collect();
    for (shard, vs) in voters {
        let w = weights.get(shard).copied().unwrap_or(0);
        for v in vs {
            if let Some(n) = b.get_mut(v) {
                *n = n.saturating_add(w);
            }
        }
    }
    b
}

/// Step 2 by bytes: repeatedly, from the fullest node to the emptiest one
/// that holds at least the tolerance (1/[`BYTES_TOLERANCE_DIV`] of the mean
/// node) less, the largest shard it can take (zones as in [`plan`]) that
/// weighs at most half the difference, so the receiver never ends fuller
/// than the giver. Each such move lowers the sum of squared node bytes
/// (by 2w(d - w) > 0), so it ends; it stops when no pair and shard qualify.
fn even_bytes(
    voters: &mut BTreeMap<u64, Vec<u64>>,
    moves: &mut Vec<Move>,
    up: &BTreeSet<u64>,
    zones: &Zones,
    weights: &Sizes,
) {
    let total: usize = voters.values().map(Vec::len).sum();
    let weight = |s: &u64| weights.get(s).copied().unwrap_or(0);
    // Each move lowers the sum of squares; the bound only makes the end
    // evident (a shard moves at most a few times in one plan).
    for _ in 0..=total.saturating_mul(4) {
        let b = node_bytes(voters, up, weights);
        let nodes = u64::try_from(b.len()).unwrap_or(u64::MAX).max(1);
        let mean = b.values().fold(0u64, |a, x| a.saturating_add(*x)) / nodes;
        let tolerance = (mean / BYTES_TOLERANCE_DIV).max(1);
        let mut fulls: Vec<(u64, u64)> = b.iter().map(|(n, x)| (*x, *n)).collect();
        fulls.sort_unstable_by_key(|(x, n)| (std::cmp::Reverse(*x), *n));
        let mut empties = fulls.clone();
        empties.sort_unstable();
        let next = fulls.iter().find_map(|&(high, full)| {
            empties
                .iter()
                .take_while(|(low, _)| high.saturating_sub(*low) > tolerance)
                .find_map(|&(low, empty)| {
                    let half = (high - low) / 2;
                    voters
                        .iter()
                        .filter(|(s, vs)| {
                            let w = weight(s);
                            w > 0 && w <= half && vs.contains(&full) && zone_free(vs, full, empty, zones)
                        })
                        .max_by_key(|(s, _)| (weight(s), std::cmp::Reverse(**s)))
                        .map(|(shard, _)| Move {
                            shard: *shard,
                            from: full,
                            to: empty,
                        })
                })
        });
        let Some(m) = next else { break };
        move_voter(voters, moves, m);
    }
}

/// Step 0: each voter on a node of `from` (draining) moves to the up node
/// with the fewest replicas that lacks the shard, one whose zone the
/// shard's other voters leave free if there is one (a drain still empties
/// a node when zones cannot be kept apart, as `phctl node drain` did). A
/// shard no up node can take keeps its replica there. Leaving nodes are
/// served in `from`'s order, for each shard: the caller puts the ones that
/// are down first, so a shard on a down and a live draining node gives the
/// one free target to the down one's replica, the move that can go (the
/// other's would need the down voter for its quorum).
fn evacuate(
    voters: &mut BTreeMap<u64, Vec<u64>>,
    moves: &mut Vec<Move>,
    up: &BTreeSet<u64>,
    zones: &Zones,
    from: &[u64],
) {
    let shards: Vec<u64> = voters.keys().copied().collect();
    // Counted once and kept up to date: this runs on the metadata leader's
    // driver thread, and a draining node may hold thousands of shards.
    let mut c = counts(voters, up);
    for shard in shards {
        for leaving in from {
            let Some(vs) = voters.get(&shard).cloned() else { break };
            if !vs.contains(leaving) {
                continue;
            }
            let best = |zone_kept: bool| {
                up.iter()
                    .copied()
                    .filter(|n| !vs.contains(n) && (!zone_kept || zone_free(&vs, *leaving, *n, zones)))
                    .min_by_key(|n| (c.get(n).copied().unwrap_or(0), *n))
            };
            if let Some(to) = best(true).or_else(|| best(false)) {
                *c.entry(to).or_default() += 1;
                move_voter(
                    voters,
                    moves,
                    Move {
                        shard,
                        from: *leaving,
                        to,
                    },
                );
            }
        }
    }
}

fn move_voter(voters: &mut BTreeMap<u64, Vec<u64>>, moves: &mut Vec<Move>, m: Move) {
    for v in voters.get_mut(&m.shard).into_iter().flatten() {
        if *v == m.from {
            *v = m.to;
        }
    }
    moves.push(m);
}

/// Leaders per shard that put every up node within one leadership of the
/// others where the voter sets allow. First greedily: shards in id order,
/// each to the up voter with the fewest leaderships so far, preferring the
/// current leader on a tie (no needless transfer), then the lowest id. The
/// greedy pass alone can leave a node with none (it never looks ahead: seen
/// after two nodes joined and took only some shards' replicas), so
/// [`even_out`] then shifts leaderships along chains of shards. A shard
/// without an up voter keeps no entry.
pub fn plan_leaders(
    voters: &BTreeMap<u64, Vec<u64>>,
    up: &BTreeSet<u64>,
    current: &BTreeMap<u64, u64>,
) -> BTreeMap<u64, u64> {
    let mut count: BTreeMap<u64, usize> = up.iter().map(|n| (*n, 0)).collect();
    let mut plan = BTreeMap::new();
    for (shard, vs) in voters {
        let now = current.get(shard).copied().unwrap_or(0);
        let best = vs
            .iter()
            .filter_map(|v| count.get(v).map(|c| (*c, *v != now, *v)))
            .min()
            .map(|(_, _, v)| v);
        if let Some(v) = best {
            *count.entry(v).or_default() += 1;
            plan.insert(*shard, v);
        }
    }
    even_out(&mut plan, voters, up);
    plan
}

/// New preferred leaders for the shards whose preferred leader (`current`)
/// is not up (a draining node gives its leaderships up before its replicas
/// move): each to its `eligible` (up and heard from) voter with the fewest
/// preferred leaderships so far, then the lowest id. Other shards keep
/// theirs; a shard without an eligible voter gets no entry.
pub fn leaders_off(
    voters: &BTreeMap<u64, Vec<u64>>,
    up: &BTreeSet<u64>,
    eligible: &BTreeSet<u64>,
    current: &BTreeMap<u64, u64>,
) -> BTreeMap<u64, u64> {
    let mut count = per_node(current, up);
    let mut out = BTreeMap::new();
    for (shard, vs) in voters {
        if current.get(shard).is_some_and(|p| up.contains(p)) {
            continue;
        }
        let best = vs
            .iter()
            .filter(|v| eligible.contains(v))
            .filter_map(|v| count.get(v).map(|c| (*c, *v)))
            .min()
            .map(|(_, v)| v);
        if let Some(v) = best {
            *count.entry(v).or_default() += 1;
            out.insert(*shard, v);
        }
    }
    out
}

/// Evens `plan` (shard → leader) out: while some node leads at least two
/// more shards than another node it can reach through a chain "a shard
/// this node leads has that node as an up voter", it moves one leadership
/// along the chain (every node on it keeps its count but the two ends).
/// Each step lowers the sum of squared counts, so it ends; at the end no
/// such chain exists, which is the best the voter sets allow (the
/// augmenting-path argument of max flow).
pub fn even_out(plan: &mut BTreeMap<u64, u64>, voters: &BTreeMap<u64, Vec<u64>>, up: &BTreeSet<u64>) {
    loop {
        let count = per_node(plan, up);
        let mut by_count: Vec<(usize, u64)> = count.iter().map(|(n, c)| (*c, *n)).collect();
        by_count.sort_unstable_by(|a, b| b.cmp(a));
        let Some(path) = by_count
            .iter()
            .find_map(|(c, src)| chain_from(*src, *c, plan, voters, up, &count))
        else {
            return;
        };
        for (shard, to) in path {
            plan.insert(shard, to);
        }
    }
}

/// A chain of (shard, new leader) from `src` (leading `src_count` shards)
/// to a node leading at most `src_count - 2`, by breadth-first search.
fn chain_from(
    src: u64,
    src_count: usize,
    plan: &BTreeMap<u64, u64>,
    voters: &BTreeMap<u64, Vec<u64>>,
    up: &BTreeSet<u64>,
    count: &BTreeMap<u64, usize>,
) -> Option<Vec<(u64, u64)>> {
    // node → (the node it was reached from, the shard that links them)
    let mut parent: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([src]);
    while let Some(x) = queue.pop_front() {
        for (shard, _) in plan.iter().filter(|(_, l)| **l == x) {
            for y in voters.get(shard).into_iter().flatten() {
                if *y == src || !up.contains(y) || parent.contains_key(y) {
                    continue;
                }
                parent.insert(*y, (x, *shard));
                if count.get(y).copied().unwrap_or(0) + 2 <= src_count {
                    let mut path = Vec::new();
                    let mut at = *y;
                    while let Some((from, shard)) = parent.get(&at).copied() {
                        path.push((shard, at));
                        if from == src {
                            return Some(path);
                        }
                        at = from;
                    }
                    return None;
                }
                queue.push_back(*y);
            }
        }
    }
    None
}

pub fn per_node(leaders: &BTreeMap<u64, u64>, up: &BTreeSet<u64>) -> BTreeMap<u64, usize> {
    let mut c: BTreeMap<u64, usize> = up.iter().map(|n| (*n, 0)).collect();
    for n in leaders.values() {
        if let Some(k) = c.get_mut(n) {
            *k += 1;
        }
    }
    c
}

#[cfg(test)]
#[path = "balance_tests.rs"]
mod tests;
