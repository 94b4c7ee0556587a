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
    let moves = plan(&voters, &up, &Zones::new(), &Sizes::new(), &[]);
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
    assert!(plan(&voters, &up, &Zones::new(), &Sizes::new(), &[]).is_empty());
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
    let moves = plan(&voters, &up, &zones, &Sizes::new(), &[]);
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
    let plain = plan(&voters, &up, &Zones::new(), &Sizes::new(), &[]);
    assert!(!plain.is_empty());
}

#[test]
fn nodes_that_are_not_up_are_ignored() {
    // Node 4 is draining (not in `up`): its replica stays, and it gets none.
    let voters: BTreeMap<u64, Vec<u64>> = [(1, vec![1, 2, 4]), (2, vec![1, 2, 3]), (3, vec![1, 2, 3])].into();
    let up: BTreeSet<u64> = [1, 2, 3].into();
    let moves = plan(&voters, &up, &Zones::new(), &Sizes::new(), &[]);
    assert!(moves.iter().all(|m| m.to != 4 && m.from != 4), "{moves:?}");
    // 1 and 2 hold 3 each, 3 holds 2: within one.
    assert!(moves.is_empty(), "{moves:?}");
}

/// Counts even, bytes not: node 1 holds a 1 GiB shard and a small one,
/// node 2 two small ones. By bytes the small one moves (and the large one,
/// weighing more than half the difference, stays); by count nothing would.
#[test]
fn by_bytes_a_small_shard_leaves_the_node_with_a_large_one() {
    let voters: BTreeMap<u64, Vec<u64>> = BTreeMap::from([(1, vec![1]), (2, vec![1]), (3, vec![2]), (4, vec![2])]);
    let up: BTreeSet<u64> = [1, 2].into();
    let sizes = Sizes::from([(1, 1 << 30), (2, 64 << 20), (3, 64 << 20), (4, 64 << 20)]);
    assert!(plan(&voters, &up, &Zones::new(), &Sizes::new(), &[]).is_empty());
    assert_eq!(
        plan(&voters, &up, &Zones::new(), &sizes, &[]),
        vec![Move {
            shard: 2,
            from: 1,
            to: 2
        }]
    );
}

/// Bytes even, counts not: one 1 GiB shard against eight of 128 MiB stays
/// as it is; the same layout with tiny shards is evened out by count.
#[test]
fn by_bytes_many_small_shards_balance_one_large_one() {
    let mut voters: BTreeMap<u64, Vec<u64>> = BTreeMap::from([(1, vec![1])]);
    for s in 2..=9 {
        voters.insert(s, vec![2]);
    }
    let up: BTreeSet<u64> = [1, 2].into();
    let mut sizes: Sizes = (2..=9).map(|s| (s, 128 << 20)).collect();
    sizes.insert(1, 1 << 30);
    let w = weights(&voters, &sizes).unwrap();
    assert!(by_bytes(&voters, &up, &w));
    assert!(plan(&voters, &up, &Zones::new(), &sizes, &[]).is_empty());
    // Below BYTES_BALANCE_MIN per node: by count.
    let tiny: Sizes = (1..=9).map(|s| (s, 1_000)).collect();
    let w = weights(&voters, &tiny).unwrap();
    assert!(!by_bytes(&voters, &up, &w));
    let moves = plan(&voters, &up, &Zones::new(), &tiny, &[]);
    assert_eq!(moves.len(), 3, "{moves:?}");
    // A shard without a count weighs the mean of the counted ones.
    let partial = Sizes::from([(1, 300), (2, 100)]);
    assert_eq!(weights(&voters, &partial).unwrap()[&5], 200);
}

/// Shards of about one size balance by count even when the nodes hold a
/// lot: by bytes, a tolerance of 1/8 of the mean would leave replica
/// counts several apart.
#[test]
fn shards_of_one_size_balance_by_count() {
    let mut voters: BTreeMap<u64, Vec<u64>> = (1..=16).map(|s| (s, vec![1, 2, 3])).collect();
    let up: BTreeSet<u64> = (1..=5).collect();
    let sizes: Sizes = (1..=16).map(|s| (s, (256 << 20) + s * 1_000)).collect();
    let w = weights(&voters, &sizes).unwrap();
    assert!(!by_bytes(&voters, &up, &w));
    let moves = plan(&voters, &up, &Zones::new(), &sizes, &[]);
    apply(&mut voters, &moves);
    let c = counts(&voters, &up);
    assert!(c.values().max().unwrap() - c.values().min().unwrap() <= 1, "{c:?}");
    // Halves of a split (about half the others): still by count. One a
    // quarter of the others: by bytes.
    let mut split = sizes.clone();
    split.insert(16, 128 << 20);
    assert!(!by_bytes(&voters, &up, &weights(&voters, &split).unwrap()));
    split.insert(16, 64 << 20);
    assert!(by_bytes(&voters, &up, &weights(&voters, &split).unwrap()));
}

proptest::proptest! {
    /// Any layout and sizes: the plan never puts two replicas of a shard on
    /// one node, only lowers the spread of node bytes (sum of squares), and
    /// leaves a layout it has nothing more to do for.
    #[test]
    fn by_bytes_plans_end_balanced_as_far_as_sizes_allow(
        seed_voters in proptest::collection::vec(proptest::collection::btree_set(1u64..=6, 3), 1..24),
        seed_sizes in proptest::collection::vec(0u64..(4u64 << 30), 24),
        nodes in 3u64..=6,
    ) {
        let up: BTreeSet<u64> = (1..=nodes).collect();
        let voters: BTreeMap<u64, Vec<u64>> = seed_voters
            .iter()
            .enumerate()
            .map(|(i, vs)| {
                let vs: Vec<u64> = vs.iter().map(|v| (v - 1) % nodes + 1).collect::<BTreeSet<_>>().into_iter().collect();
                (u64::try_from(i).unwrap() + 1, vs)
            })
            .collect();
        let sizes: Sizes = voters.keys().map(|s| (*s, seed_sizes[usize::try_from(*s).unwrap() - 1])).collect();
        let moves = plan(&voters, &up, &Zones::new(), &sizes, &[]);
        let mut after = voters.clone();
        apply(&mut after, &moves);
        for vs in after.values() {
            let distinct: BTreeSet<u64> = vs.iter().copied().collect();
            proptest::prop_assert_eq!(distinct.len(), vs.len());
        }
        let w = weights(&voters, &sizes).unwrap();
        if by_bytes(&voters, &up, &w) {
            let squares = |v: &BTreeMap<u64, Vec<u64>>| -> u128 {
                node_bytes(v, &up, &w).values().map(|b| u128::from(*b) * u128::from(*b)).sum()
            };
            proptest::prop_assert!(squares(&after) <= squares(&voters));
        }
        proptest::prop_assert!(plan(&after, &up, &Zones::new(), &sizes, &[]).is_empty(), "{:?}", moves);
    }
}
