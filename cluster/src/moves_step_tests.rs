//! Unit tests of a move's steps as a shard leader takes them
//! (`next_step`), and of the move records' encoding. Apart from
//! `moves_tests.rs`, whose tests run the placement decisions over whole
//! clusters, because these need no cluster: one shard, one move.

use super::*;

struct Shard {
    voters: Vec<u64>,
    learners: Vec<u64>,
    busy: bool,
    matched: u64,
}

fn step(t: &Target, me: u64, s: &Shard, dead: u64) -> Step {
    let matched = |n: u64| (s.learners.contains(&n) || s.voters.contains(&n)).then_some(s.matched);
    let alive = |n: u64| n != dead;
    next_step(
        t,
        &LeaderView {
            me,
            voters: &s.voters,
            learners: &s.learners,
            busy: s.busy,
            committed: 1_000,
            matched: &matched,
            alive: &alive,
        },
    )
}

/// An active move of shard 1 from node 1 to node 4.
fn move_1_to_4() -> Target {
    Target {
        shard: 1,
        from: 1,
        to: 4,
        state: MoveState::Active,
        started_unix_ms: 0,
        state_since_unix_ms: 0,
        version: 1,
    }
}

#[test]
fn a_shard_leader_takes_a_moves_steps_in_order() {
    let t = move_1_to_4();
    let mut s = Shard {
        voters: vec![1, 2, 3],
        learners: vec![],
        busy: false,
        matched: 0,
    };
    assert_eq!(step(&t, 2, &s, 0), Step::AddLearner(4));
    assert!(matches!(step(&t, 2, &s, 4), Step::Wait(_)), "not to a dead node");
    s.busy = true;
    assert!(matches!(step(&t, 2, &s, 0), Step::Wait(_)));
    s.busy = false;
    s.learners = vec![4];
    s.matched = 1_000 - CATCH_UP_SLACK_ENTRIES - 1;
    assert!(matches!(step(&t, 2, &s, 0), Step::Wait(_)), "still catching up");
    s.matched = 1_000 - CATCH_UP_SLACK_ENTRIES;
    assert_eq!(step(&t, 2, &s, 0), Step::Promote { to: 4, from: 1 });
    // A learner that stopped answering after it caught up is not promoted
    // in place of a live voter.
    assert!(matches!(step(&t, 2, &s, 4), Step::Wait(_)), "dead learner");
    // The leader that leaves hands leadership to a live voter that stays.
    assert_eq!(step(&t, 1, &s, 0), Step::TransferLeader(2));
    assert_eq!(step(&t, 1, &s, 2), Step::TransferLeader(3));
    s.voters = vec![4, 2, 3];
    s.learners = vec![];
    assert!(matches!(step(&t, 2, &s, 0), Step::Wait(_)), "done");
    // An operator promoted node 4 and removed node 3 instead: node 1 must
    // stay, or the shard would be left with two replicas.
    s.voters = vec![1, 2, 4];
    assert!(matches!(step(&t, 2, &s, 0), Step::Wait(_)), "overtaken");
    // Cancelled: the learner goes, once no change is under way.
    let c = Target {
        state: MoveState::Cancelled,
        ..t
    };
    s.voters = vec![1, 2, 3];
    s.learners = vec![4];
    assert_eq!(step(&c, 2, &s, 4), Step::RemoveLearner(4));
    s.busy = true;
    assert!(matches!(step(&c, 2, &s, 4), Step::Wait(_)));
}

/// A learner that has acknowledged nothing is not promoted, even on a
/// shard whose whole log is shorter than the catch-up slack (found by
/// `tests/move_crash.rs`: a learner cut off from its shard was promoted
/// with nothing, leaving two replicas with data).
#[test]
fn a_learner_with_nothing_is_never_caught_up() {
    let t = move_1_to_4();
    let view = |matched_index: u64| {
        let matched = move |n: u64| (n == 4).then_some(matched_index);
        let alive = |_: u64| true;
        next_step(
            &t,
            &LeaderView {
                me: 2,
                voters: &[1, 2, 3],
                learners: &[4],
                busy: false,
                committed: 16,
                matched: &matched,
                alive: &alive,
            },
        )
    };
    assert!(matches!(view(0), Step::Wait(_)), "nothing acknowledged");
    assert_eq!(view(16), Step::Promote { to: 4, from: 1 });
}

#[test]
fn records_round_trip_and_bad_ones_are_skipped() {
    let t = Target {
        shard: 9,
        from: 1,
        to: 4,
        state: MoveState::Cancelled,
        started_unix_ms: 5,
        state_since_unix_ms: 6,
        version: 3,
    };
    let good = pigeonhole_engine::SystemValue {
        key: move_key(9),
        version: 3,
        value: t.encode(),
    };
    let wrong_key = pigeonhole_engine::SystemValue {
        key: move_key(8),
        ..good.clone()
    };
    let garbage = pigeonhole_engine::SystemValue {
        key: move_key(7),
        version: 1,
        value: vec![0xff, 0xff],
    };
    assert_eq!(decode_targets(&[good, wrong_key, garbage]), BTreeMap::from([(9, t)]));
    assert_eq!(decode_config(None).moves_max, MOVES_MAX_DEFAULT);
    assert_eq!(decode_config(None).split_size_bytes, SPLIT_SIZE_BYTES_DEFAULT);
    let v = pigeonhole_engine::SystemValue {
        key: PLACEMENT_CONFIG_KEY.to_vec(),
        version: 2,
        value: PlacementConfig {
            paused: true,
            moves_max: 1_000,
            split_size_bytes: 5,
        }
        .encode_to_vec(),
    };
    assert_eq!(
        decode_config(Some(&v)),
        Config {
            paused: true,
            moves_max: MOVES_MAX_LIMIT,
            split_size_bytes: SPLIT_SIZE_BYTES_MIN,
            version: 2
        }
    );
}
