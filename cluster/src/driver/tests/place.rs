//! `place`: the placement loop's inputs as `Admin.GetPlacement` shows
//! them, and a move's next step carried out by the shard's leader.
use super::*;
use crate::moves::{move_key, Target};
use pigeonhole_proto::internal::v1::MoveState;

#[test]
fn the_placement_view_of_the_metadata_leader_runs_the_loop_and_counts_each_nodes_shards() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let view = d.placement_view().unwrap();
    assert!(view.runs_loop);
    let load = view.load[&1];
    assert_eq!((load.replicas, load.preferred), (2, 2), "{load:?}");
    assert!(view.steps.is_empty() && view.decision.in_flight.is_empty());
}

fn target(shard: u64, from: u64, to: u64) -> Target {
    Target {
        shard,
        from,
        to,
        state: MoveState::Active,
        started_unix_ms: 1,
        state_since_unix_ms: 1,
        version: 1,
    }
}

/// A move in flight on a shard this node leads takes its next step at the
/// placement round: the target is added as a learner. A move to a node not
/// heard from waits.
#[test]
fn a_move_in_flight_on_a_led_shard_adds_its_target_as_a_learner_if_it_is_heard_from() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    d.peers.insert(
        2,
        PeerLiveness {
            last_seen: Instant::now(),
            down: false,
        },
    );
    put_system(&mut d, move_key(1), target(1, 1, 2).encode());
    put_system(&mut d, move_key(2), target(2, 1, 3).encode());
    assert!(!d.moves_in_flight);
    d.placement_round();
    assert!(d.moves_in_flight);
    settle(&mut d);
    assert_eq!(status_of(&d, 1).learners, vec![2], "the heard-from target is added");
    assert!(status_of(&d, 2).learners.is_empty(), "node 3 is not heard from");
    let view = d.placement_view().unwrap();
    assert_eq!(view.steps.len(), 2, "{:?}", view.steps);
}
