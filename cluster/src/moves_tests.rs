use super::*;

const SETTLE_MS: u64 = 15_000;

fn shards(n: u64, voters: &[u64]) -> BTreeMap<u64, ShardView> {
    (1..=n)
        .map(|s| {
            let vs = voters.to_vec();
            let preferred = vs[usize::try_from(s).unwrap() % vs.len()];
            (
                s,
                ShardView {
                    voters: vs,
                    learners: vec![],
                    preferred,
                    preferred_version: 0,
                },
            )
        })
        .collect()
}

fn up(nodes: &[u64]) -> BTreeMap<u64, NodeState> {
    nodes.iter().map(|n| (*n, NodeState::Up)).collect()
}

fn config() -> Config {
    Config {
        paused: false,
        moves_max: 2,
        split_size_bytes: SPLIT_SIZE_BYTES_DEFAULT,
        version: 0,
    }
}

static NO_ZONES: Zones = BTreeMap::new();
static NO_SIZES: crate::balance::Sizes = BTreeMap::new();
static NO_NODES: BTreeSet<u64> = BTreeSet::new();
static NO_TARGETS: BTreeMap<u64, Target> = BTreeMap::new();
static NO_STRAYS: BTreeSet<(u64, u64)> = BTreeSet::new();

/// A round's inputs with nothing but the shards, node states and the nodes
/// heard from: no zones, sizes, leaders-only drains, targets or stray
/// learners; the default settings; at 1 s.
fn inputs<'a>(
    shards: &'a BTreeMap<u64, ShardView>,
    states: &'a BTreeMap<u64, NodeState>,
    alive: &'a BTreeSet<u64>,
) -> Inputs<'a> {
    Inputs {
        shards,
        states,
        alive,
        gone: &NO_NODES,
        zones: &NO_ZONES,
        sizes: &NO_SIZES,
        keep_replicas: &NO_NODES,
        targets: &NO_TARGETS,
        stray_learners: &NO_STRAYS,
        config: config(),
        now_unix_ms: 1_000,
        cancel_settle_ms: SETTLE_MS,
    }
}

fn targets_of(d: &Decision) -> Vec<Target> {
    d.writes
        .iter()
        .filter_map(|w| match w {
            MetaWrite::Target(t) => Some(t.clone()),
            MetaWrite::Preferred { .. } => None,
        })
        .collect()
}

#[test]
fn new_nodes_get_moves_up_to_the_limit_one_per_shard() {
    let s = shards(8, &[1, 2, 3]);
    let states = up(&[1, 2, 3, 4, 5]);
    let alive: BTreeSet<u64> = (1..=5).collect();
    let inp = inputs(&s, &states, &alive);
    let d = decide(&inp);
    let asked = targets_of(&d);
    assert_eq!(asked.len(), 2, "{d:?}");
    assert_ne!(asked[0].shard, asked[1].shard);
    for t in &asked {
        assert_eq!(t.state, MoveState::Active);
        assert!([4, 5].contains(&t.to) && [1, 2, 3].contains(&t.from), "{t:?}");
        assert_eq!(t.started_unix_ms, 1_000);
    }
    assert!(d.planned.len() > 2 && !d.balanced());
    assert!(d.planned_leaders.is_empty(), "leaders wait for the replicas");

    // Paused: the same plan is shown, nothing is asked for.
    let paused = Inputs {
        config: Config {
            paused: true,
            ..config()
        },
        ..inp
    };
    let p = decide(&paused);
    assert!(p.writes.is_empty() && p.planned == d.planned);

    // A dead or draining newcomer gets nothing.
    let mut states = up(&[1, 2, 3, 4]);
    states.insert(5, NodeState::Draining);
    let alive: BTreeSet<u64> = (1..=3).collect();
    let d = decide(&Inputs {
        states: &states,
        alive: &alive,
        ..paused
    });
    assert!(d.planned.is_empty(), "{d:?}");
    assert!(!d.balanced(), "an up node not heard from is not balanced: {d:?}");
}

#[test]
fn targets_settle_from_the_shard_map() {
    let mut s = shards(3, &[1, 2, 3]);
    let states = up(&[1, 2, 3, 4]);
    let alive: BTreeSet<u64> = (1..=4).collect();
    let t = |shard, to, state| Target {
        shard,
        from: 1,
        to,
        state,
        started_unix_ms: 0,
        state_since_unix_ms: 0,
        version: 7,
    };
    // 1: finished (4 a voter, 1 gone); 2: a learner on a node that died;
    // 3: cancelled 30 s ago, its learner already removed; 4: overtaken (an
    // operator made 4 a voter beside 1).
    s.get_mut(&1).unwrap().voters = vec![4, 2, 3];
    s.get_mut(&2).unwrap().learners = vec![4];
    s.insert(
        4,
        ShardView {
            voters: vec![1, 4, 3],
            ..ShardView::default()
        },
    );
    let targets = BTreeMap::from([
        (1, t(1, 4, MoveState::Active)),
        (2, t(2, 4, MoveState::Active)),
        (3, t(3, 4, MoveState::Cancelled)),
        (4, t(4, 4, MoveState::Active)),
    ]);
    let alive_wo4: BTreeSet<u64> = (1..=3).collect();
    let gone4 = BTreeSet::from([4]);
    let inp = Inputs {
        shards: &s,
        states: &states,
        alive: &alive_wo4,
        gone: &gone4,
        zones: &Zones::new(),
        sizes: &crate::balance::Sizes::new(),
        keep_replicas: &BTreeSet::new(),
        targets: &targets,
        stray_learners: &BTreeSet::new(),
        config: Config {
            paused: true,
            ..config()
        },
        now_unix_ms: SETTLE_MS,
        cancel_settle_ms: SETTLE_MS,
    };
    let d = decide(&inp);
    let w = targets_of(&d);
    assert_eq!(
        w.iter().map(|t| (t.shard, t.state)).collect::<Vec<_>>(),
        vec![
            (1, MoveState::Done),
            (2, MoveState::Cancelled),
            (3, MoveState::Done),
            (4, MoveState::Cancelled)
        ]
    );
    assert!(w.iter().all(|t| t.version == 7), "writes are over the version read");
    assert!(
        w.iter()
            .all(|t| t.state_since_unix_ms == SETTLE_MS && t.started_unix_ms == 0),
        "{w:?}"
    );
    assert_eq!(
        d.in_flight.len(),
        2,
        "cancelled moves stay until their learner is gone and 30 s passed"
    );
    // Node 4 not heard from for a moment only (busy ingesting a snapshot):
    // its moves are held, not called off; the finished one still closes.
    let d = decide(&Inputs { gone: &NO_NODES, ..inp });
    assert_eq!(
        targets_of(&d).iter().map(|t| (t.shard, t.state)).collect::<Vec<_>>(),
        vec![(1, MoveState::Done), (3, MoveState::Done), (4, MoveState::Cancelled)],
        "a silent target does not cancel its move (4 is overtaken, not silent)"
    );
    let inp = Inputs { gone: &NO_NODES, ..inp };
    // Cancelled a moment ago, with no learner in the map yet (its
    // AddLearner may still land): not closed yet.
    let just = BTreeMap::from([(
        3,
        Target {
            state_since_unix_ms: 1,
            ..t(3, 4, MoveState::Cancelled)
        },
    )]);
    assert!(targets_of(&decide(&Inputs { targets: &just, ..inp })).is_empty());

    // A draining source with the loop paused: the move is called off
    // (`phctl node drain` moves it); running, the loop's own move goes on.
    let mut draining = states.clone();
    draining.insert(1, NodeState::Draining);
    let only2 = BTreeMap::from([(2, t(2, 4, MoveState::Active))]);
    let d = decide(&Inputs {
        states: &draining,
        alive: &alive,
        targets: &only2,
        ..inp
    });
    assert_eq!(targets_of(&d).first().map(|t| t.state), Some(MoveState::Cancelled));
    let d = decide(&Inputs {
        states: &draining,
        alive: &alive,
        targets: &only2,
        config: config(),
        ..inp
    });
    assert!(
        targets_of(&d).iter().all(|t| t.shard != 2),
        "running: shard 2's move is not called off: {d:?}"
    );
    assert!(d.in_flight.iter().any(|t| t.shard == 2 && t.state == MoveState::Active));

    // With node 4 alive, shard 2's move goes on; too old, it is cancelled.
    let inp = Inputs { alive: &alive, ..inp };
    assert!(targets_of(&decide(&inp)).iter().all(|t| t.shard != 2));
    let late = Inputs {
        now_unix_ms: MOVE_DURATION_MS_MAX + 1,
        ..inp
    };
    assert!(targets_of(&decide(&late)).contains(&Target {
        state: MoveState::Cancelled,
        state_since_unix_ms: MOVE_DURATION_MS_MAX + 1,
        ..t(2, 4, MoveState::Active)
    }));
}

/// The loop against a model of the cluster: every round's targets are
/// carried out at once (as the shard leaders would), until the loop has
/// nothing left to do. It must end balanced: replicas and preferred
/// leaders within one per up node, each shard's replicas on distinct
/// nodes in distinct zones, and no round asking for more than the limit.
#[test]
fn the_loop_reaches_balance_with_zones() {
    let zones: Zones = [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]
        .into_iter()
        .map(|(n, z)| (n, z.to_string()))
        .collect();
    let mut s = shards(16, &[1, 2, 3]);
    let states = up(&[1, 2, 3, 4, 5]);
    let alive: BTreeSet<u64> = (1..=5).collect();
    let mut targets: BTreeMap<u64, Target> = BTreeMap::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 200, "no convergence");
        let d = decide(&Inputs {
            shards: &s,
            states: &states,
            alive: &alive,
            gone: &NO_NODES,
            zones: &zones,
            sizes: &crate::balance::Sizes::new(),
            keep_replicas: &BTreeSet::new(),
            targets: &targets,
            stray_learners: &BTreeSet::new(),
            config: config(),
            now_unix_ms: rounds,
            cancel_settle_ms: SETTLE_MS,
        });
        assert!(d.in_flight.iter().filter(|t| t.state == MoveState::Active).count() <= 2);
        if d.writes.is_empty() {
            assert!(d.balanced(), "{d:?}");
            break;
        }
        for w in d.writes {
            match w {
                MetaWrite::Target(t) => {
                    // Compare-and-set, as the engine applies it.
                    let stored = targets.get(&t.shard).map_or(0, |x| x.version);
                    assert_eq!(t.version, stored, "a write over a version it did not read: {t:?}");
                    if t.state == MoveState::Active {
                        let v = s.get_mut(&t.shard).unwrap();
                        for x in v.voters.iter_mut() {
                            if *x == t.from {
                                *x = t.to;
                            }
                        }
                    }
                    targets.insert(
                        t.shard,
                        Target {
                            version: t.version + 1,
                            ..t
                        },
                    );
                }
                MetaWrite::Preferred {
                    shard,
                    node,
                    if_version,
                } => {
                    let v = s.get_mut(&shard).unwrap();
                    assert_eq!(if_version, v.preferred_version);
                    assert!(v.voters.contains(&node));
                    v.preferred = node;
                    v.preferred_version += 1;
                }
            }
        }
    }
    let mut replicas: BTreeMap<u64, usize> = BTreeMap::new();
    let mut preferred: BTreeMap<u64, usize> = BTreeMap::new();
    for v in s.values() {
        let distinct: BTreeSet<&str> = v.voters.iter().map(|n| zones[n].as_str()).collect();
        assert_eq!(distinct.len(), 3, "{v:?}");
        for n in &v.voters {
            *replicas.entry(*n).or_default() += 1;
        }
        *preferred.entry(v.preferred).or_default() += 1;
    }
    assert_eq!(replicas.len(), 5, "every node holds replicas: {replicas:?}");
    // Zone c has one node, which keeps every shard; the others even out.
    assert_eq!(replicas[&3], 16);
    let others: Vec<usize> = [1, 2, 4, 5].iter().map(|n| replicas[n]).collect();
    assert!(
        others.iter().max().unwrap() - others.iter().min().unwrap() <= 1,
        "{replicas:?}"
    );
    let p: Vec<usize> = (1..=5).map(|n| preferred.get(&n).copied().unwrap_or(0)).collect();
    assert!(p.iter().max().unwrap() - p.iter().min().unwrap() <= 1, "{preferred:?}");
    assert!(targets.values().all(|t| t.state == MoveState::Done));
}

#[test]
fn even_preferred_leaders_are_left_alone_and_stale_ones_replaced() {
    let mut s = shards(6, &[1, 2, 3]);
    let states = up(&[1, 2, 3]);
    let alive: BTreeSet<u64> = (1..=3).collect();
    let none = BTreeMap::new();
    let inp = |s: &BTreeMap<u64, ShardView>| {
        decide(&Inputs {
            shards: s,
            states: &states,
            alive: &alive,
            gone: &NO_NODES,
            zones: &Zones::new(),
            sizes: &crate::balance::Sizes::new(),
            keep_replicas: &BTreeSet::new(),
            targets: &none,
            stray_learners: &BTreeSet::new(),
            config: config(),
            now_unix_ms: 0,
            cancel_settle_ms: SETTLE_MS,
        })
    };
    // Two each, but not what a fresh plan would pick (it would give shard
    // 2 to node 1): no change.
    for (shard, p) in [(1, 3), (2, 3), (3, 1), (4, 1), (5, 2), (6, 2)] {
        s.get_mut(&shard).unwrap().preferred = p;
    }
    let d = inp(&s);
    assert!(d.writes.is_empty() && d.balanced(), "{d:?}");
    // A shard whose preferred node left its voters gets a new one.
    let v = s.get_mut(&4).unwrap();
    v.voters = vec![2, 3, 5];
    v.preferred_version = 3;
    let d = inp(&s);
    assert!(d.writes.iter().any(|w| matches!(
        w,
        MetaWrite::Preferred { shard: 4, node, if_version: 3 } if [2, 3].contains(node)
    )));
}

/// A learner no move owns (here: on shard 2, node 5), once the caller has
/// seen it long enough, gets a cancelled move so the shard's leader removes
/// it; a move's own learner is owned; nothing is cancelled while paused.
/// A shard whose move closes in a round may get its next move in the same
/// round, over the closed one's new version.
#[test]
fn unowned_learners_are_removed_and_versions_chain_within_a_round() {
    let mut s = shards(4, &[1, 2, 3]);
    s.get_mut(&2).unwrap().learners = vec![5];
    s.get_mut(&1).unwrap().voters = vec![4, 2, 3];
    let states = up(&[1, 2, 3, 4, 5]);
    let alive: BTreeSet<u64> = (1..=5).collect();
    let targets = BTreeMap::from([(
        1,
        Target {
            shard: 1,
            from: 1,
            to: 4,
            state: MoveState::Active,
            started_unix_ms: 0,
            state_since_unix_ms: 0,
            version: 7,
        },
    )]);
    let strays = BTreeSet::from([(2, 5)]);
    let inp = Inputs {
        shards: &s,
        states: &states,
        alive: &alive,
        gone: &NO_NODES,
        zones: &Zones::new(),
        sizes: &crate::balance::Sizes::new(),
        keep_replicas: &BTreeSet::new(),
        targets: &targets,
        stray_learners: &strays,
        config: config(),
        now_unix_ms: 10,
        cancel_settle_ms: SETTLE_MS,
    };
    let d = decide(&inp);
    assert_eq!(d.unowned_learners, BTreeSet::from([(2, 5)]));
    let w = targets_of(&d);
    assert!(
        w.contains(&Target {
            shard: 2,
            from: 0,
            to: 5,
            state: MoveState::Cancelled,
            started_unix_ms: 10,
            state_since_unix_ms: 10,
            version: 0,
        }),
        "{w:?}"
    );
    // Shard 1's move closed (version 7 → 8); a new move of it in the same
    // round writes over 8.
    let on1: Vec<&Target> = w.iter().filter(|t| t.shard == 1).collect();
    assert_eq!(on1.first().map(|t| (t.state, t.version)), Some((MoveState::Done, 7)));
    assert_eq!(
        on1.get(1).map(|t| (t.state, t.version)),
        Some((MoveState::Active, 8)),
        "{on1:?}"
    );
    // Not seen long enough, or paused: left alone.
    let none = BTreeSet::new();
    let d = decide(&Inputs {
        stray_learners: &none,
        ..inp
    });
    assert!(targets_of(&d).iter().all(|t| t.shard != 2));
    let d = decide(&Inputs {
        config: Config {
            paused: true,
            ..config()
        },
        ..inp
    });
    assert!(targets_of(&d).iter().all(|t| t.shard != 2));
}

/// A draining node is emptied by the loop: its preferred leaderships go
/// to up voters at once, and its replicas move to up nodes (two at a
/// time), also when it is down; a drain of leaderships only keeps its
/// replicas; paused, nothing is asked for.
#[test]
fn the_loop_empties_a_draining_node_leaderships_first() {
    let s = shards(4, &[1, 2, 3]);
    let mut states = up(&[1, 2, 3, 4]);
    states.insert(1, NodeState::Draining);
    let alive: BTreeSet<u64> = (1..=4).collect();
    let inp = inputs(&s, &states, &alive);
    let d = decide(&inp);
    // Every shard has a voter on node 1; node 4 is the only up node that
    // lacks them.
    assert_eq!(d.planned.len(), 4, "{d:?}");
    assert!(d.planned.iter().all(|m| m.from == 1 && m.to == 4), "{d:?}");
    let asked = targets_of(&d);
    assert_eq!(asked.len(), 2, "moves_max at once: {d:?}");
    assert!(asked.iter().all(|t| t.from == 1 && t.to == 4));
    // The shards node 1 is the preferred leader of get another one now,
    // while the replicas still move.
    let preferred_on_1: Vec<u64> = s.iter().filter(|(_, v)| v.preferred == 1).map(|(s, _)| *s).collect();
    assert!(!preferred_on_1.is_empty());
    assert_eq!(
        d.planned_leaders.keys().copied().collect::<Vec<_>>(),
        preferred_on_1,
        "{d:?}"
    );
    assert!(d.planned_leaders.values().all(|n| [2, 3].contains(n)));
    let preferred_writes = d
        .writes
        .iter()
        .filter(|w| matches!(w, MetaWrite::Preferred { .. }))
        .count();
    assert_eq!(preferred_writes, preferred_on_1.len());
    assert!(!d.balanced());

    // Down, it is emptied all the same.
    let alive_wo1: BTreeSet<u64> = (2..=4).collect();
    let down = decide(&Inputs {
        alive: &alive_wo1,
        ..inp
    });
    assert_eq!(targets_of(&down).len(), 2, "{down:?}");

    // Leaderships only: its replicas stay, its leaderships go.
    let keep = BTreeSet::from([1]);
    let d = decide(&Inputs {
        keep_replicas: &keep,
        ..inp
    });
    assert!(d.planned.iter().all(|m| m.from != 1), "{d:?}");
    assert!(targets_of(&d).is_empty(), "{d:?}");
    assert!(d.planned_leaders.values().all(|n| *n != 1) && !d.planned_leaders.is_empty());

    // Paused: shown, not asked for.
    let paused = decide(&Inputs {
        config: Config {
            paused: true,
            ..config()
        },
        ..inp
    });
    assert!(paused.writes.is_empty() && paused.planned.len() == 4);
}

/// Voters on two draining nodes: the shard leaves both, one move at a
/// time (the other draining voter counts as usable while it is heard
/// from), and the cluster is not balanced until both are empty. With one
/// of the two down, only the move off the down one may go (its source
/// may be down; a down voter that stays would leave the joint
/// configuration without a quorum margin).
#[test]
fn a_shard_on_two_draining_nodes_is_moved_off_both() {
    let s = shards(1, &[1, 4, 5]);
    let mut states = up(&[1, 2, 3, 4, 5]);
    states.insert(4, NodeState::Draining);
    states.insert(5, NodeState::Draining);
    let alive: BTreeSet<u64> = (1..=5).collect();
    let inp = inputs(&s, &states, &alive);
    let d = decide(&inp);
    assert_eq!(d.planned.len(), 2, "{d:?}");
    assert!(d
        .planned
        .iter()
        .all(|m| [4, 5].contains(&m.from) && [2, 3].contains(&m.to)));
    let asked = targets_of(&d);
    assert_eq!(asked.len(), 1, "one move per shard at a time: {d:?}");
    assert_eq!(asked[0].from, 4);
    assert_eq!(d.draining_held, BTreeSet::from([4, 5]));
    assert!(!d.balanced());

    let alive_wo5: BTreeSet<u64> = (1..=4).collect();
    let d = decide(&Inputs {
        alive: &alive_wo5,
        ..inp
    });
    let asked = targets_of(&d);
    assert_eq!(asked.len(), 1, "{d:?}");
    assert_eq!(asked[0].from, 5, "only the move off the down node: {d:?}");

    // Emptied: balanced once nothing else is left (a drained node holds
    // nothing; the other up nodes take the shard).
    let done = shards(1, &[1, 2, 3]);
    let d = decide(&Inputs { shards: &done, ..inp });
    assert!(d.draining_held.is_empty() && d.planned.is_empty(), "{d:?}");
}

/// A shard on two draining nodes, one of them down, with one free target:
/// the target goes to the down node's replica (that move can go: the live
/// draining voter and the third make a quorum of both configurations),
/// not to the live one's, which would wait for the down voter forever.
#[test]
fn a_down_draining_voter_gets_the_free_target_first() {
    let s = shards(1, &[1, 2, 3]);
    let mut states = up(&[1, 2, 3, 4]);
    states.insert(1, NodeState::Draining);
    states.insert(2, NodeState::Draining);
    let alive_wo2: BTreeSet<u64> = [1, 3, 4].into();
    let d = decide(&inputs(&s, &states, &alive_wo2));
    assert_eq!(
        d.planned,
        vec![Move {
            shard: 1,
            from: 2,
            to: 4
        }],
        "{d:?}"
    );
    assert_eq!(targets_of(&d).len(), 1, "{d:?}");
}
