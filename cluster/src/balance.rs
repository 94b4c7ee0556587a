//! The placement loop's plans, as pure functions of the shard map, the
//! node states and the zones: which replica moves bring the up nodes'
//! replica counts within one of each other (keeping each shard's replicas
//! in different zones), and which preferred leaders put every up node
//! within one leadership of the others. Pure so that they are unit-tested
//! here, and so that the loop on the metadata leader (`driver::place`) and
//! `Admin.GetPlacement` (what `phctl cluster balance` shows) compute the
//! same plan from the same inputs.
//!
//! Balance is by replica count: shards of different sizes weigh the same
//! (D36 says why, and what PD's byte- and rate-based scores add).

use std::collections::{BTreeMap, BTreeSet};

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
/// voters.
pub fn plan(voters: &BTreeMap<u64, Vec<u64>>, up: &BTreeSet<u64>, zones: &Zones) -> Vec<Move> {
    let mut voters = voters.clone();
    let mut moves = Vec::new();
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
        let moves = plan(&voters, &up, &Zones::new());
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
        assert!(plan(&voters, &up, &Zones::new()).is_empty());
    }

    #[test]
    fn leaders_are_spread_within_one_and_stay_where_they_are_on_a_tie() {
        let voters: BTreeMap<u64, Vec<u64>> = (1..=8)
            .map(|s| (s, vec![1 + s % 4, 1 + (s + 1) % 4, 1 + (s + 2) % 4]))
            .collect();
        let up: BTreeSet<u64> = (1..=4).collect();
        // Everything led by node 1 where it can be.
        let current: BTreeMap<u64, u64> = voters.iter().map(|(s, vs)| (*s, *vs.iter().min().unwrap())).collect();
        let plan = plan_leaders(&voters, &up, &current);
        assert_eq!(plan.len(), 8);
        for (s, n) in &plan {
            assert!(voters[s].contains(n), "shard {s} led by non-voter {n}");
        }
        let c = per_node(&plan, &up);
        assert!(c.values().max().unwrap() - c.values().min().unwrap() <= 1, "{c:?}");
        // Already balanced: the plan is the current leaders.
        assert_eq!(plan_leaders(&voters, &up, &plan), plan);
        // A draining node (not up) leads nothing.
        let up3: BTreeSet<u64> = (1..=3).collect();
        assert!(plan_leaders(&voters, &up3, &plan).values().all(|n| *n != 4));
    }

    /// After two nodes joined and took some shards' replicas: greedy alone
    /// left node 5 with no leadership and node 2 with three.
    #[test]
    fn leaders_reach_nodes_that_hold_only_some_shards() {
        let mut voters: BTreeMap<u64, Vec<u64>> = BTreeMap::from([
            (1, vec![3, 4, 5]),
            (2, vec![2, 4, 5]),
            (3, vec![1, 4, 5]),
            (4, vec![3, 4, 5]),
            (5, vec![1, 2, 4]),
        ]);
        for s in 6..=8 {
            voters.insert(s, vec![1, 2, 3]);
        }
        let up: BTreeSet<u64> = (1..=5).collect();
        let current = BTreeMap::from([(1, 4), (2, 2), (3, 1), (4, 3), (5, 2), (6, 1), (7, 2), (8, 3)]);
        let plan = plan_leaders(&voters, &up, &current);
        let c = per_node(&plan, &up);
        let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
        assert!(max - min <= 1, "{c:?} from {plan:?}");
        for (shard, leader) in &plan {
            assert!(voters[shard].contains(leader), "shard {shard} led by a non-voter");
        }
    }

    /// A leadership moves along a chain when no single move helps: node 1
    /// leads two shards whose other voter is node 2; node 2 leads one whose
    /// other voter is node 3, which leads none.
    #[test]
    fn leaderships_shift_along_a_chain() {
        let voters = BTreeMap::from([(1, vec![1, 2]), (2, vec![1, 2]), (3, vec![2, 3])]);
        let up: BTreeSet<u64> = (1..=3).collect();
        let mut plan = BTreeMap::from([(1, 1), (2, 1), (3, 2)]);
        even_out(&mut plan, &voters, &up);
        assert_eq!(
            per_node(&plan, &up).values().copied().collect::<Vec<_>>(),
            vec![1, 1, 1],
            "{plan:?}"
        );
        // Nothing to do when balanced, and nothing possible without a chain.
        let mut stuck = BTreeMap::from([(1, 1), (2, 1)]);
        even_out(&mut stuck, &BTreeMap::from([(1, vec![1]), (2, vec![1])]), &up);
        assert_eq!(stuck, BTreeMap::from([(1, 1), (2, 1)]));
    }

    /// Zones: shards of nodes 1 (zone a), 2 (b), 3 (c); nodes 4 (a) and 5
    /// (b) join. Every move keeps each shard in three zones, and a shard
    /// that starts with two voters in one zone is spread first.
    #[test]
    fn moves_keep_a_shards_replicas_in_different_zones() {
        let zones: Zones = [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]
            .into_iter()
            .map(|(n, z)| (n, z.to_string()))
            .collect();
        let mut voters: BTreeMap<u64, Vec<u64>> = (1..=8).map(|s| (s, vec![1, 2, 3])).collect();
        voters.insert(9, vec![1, 4, 2]); // two in zone a
        let up: BTreeSet<u64> = (1..=5).collect();
        let moves = plan(&voters, &up, &zones);
        let mut after = voters.clone();
        for m in &moves {
            let vs = after.get_mut(&m.shard).unwrap();
            assert!(vs.contains(&m.from) && !vs.contains(&m.to), "{m:?}");
            *vs.iter_mut().find(|v| **v == m.from).unwrap() = m.to;
        }
        for (shard, vs) in &after {
            let mut zs: Vec<&str> = vs.iter().map(|v| zones[v].as_str()).collect();
            zs.sort_unstable();
            zs.dedup();
            assert_eq!(zs.len(), 3, "shard {shard}: {vs:?} after {moves:?}");
        }
        // Shard 9's zone-a pair was split up first: node 3 (zone c) or no
        // other node could take it; the counts then even out as zones allow.
        assert_eq!(moves.first().map(|m| m.shard), Some(9), "{moves:?}");
        let c = counts(&after, &up);
        assert!(
            c[&4] >= 3 && c[&5] >= 3,
            "the zone-a and zone-b newcomers take their share: {c:?}"
        );
        // Without zones the same cluster evens out by counts alone.
        let plain = plan(&voters, &up, &Zones::new());
        assert!(!plain.is_empty());
    }

    #[test]
    fn nodes_that_are_not_up_are_ignored() {
        // Node 4 is draining (not in `up`): its replica stays, and it gets none.
        let voters: BTreeMap<u64, Vec<u64>> = [(1, vec![1, 2, 4]), (2, vec![1, 2, 3]), (3, vec![1, 2, 3])].into();
        let up: BTreeSet<u64> = [1, 2, 3].into();
        let moves = plan(&voters, &up, &Zones::new());
        assert!(moves.iter().all(|m| m.to != 4 && m.from != 4), "{moves:?}");
        // 1 and 2 hold 3 each, 3 holds 2: within one.
        assert!(moves.is_empty(), "{moves:?}");
    }
}
