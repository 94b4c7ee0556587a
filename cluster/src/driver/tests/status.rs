//! `status`: what NodeStatus reports of each replica.
use super::*;
use crate::node::{conf_change_v2, MembershipChange};
use std::sync::atomic::AtomicU64;

#[test]
fn status_lists_replicas_in_shard_order_each_with_its_own_sends_and_damage() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    drop(propose(&mut d, 1, vec![append_op("a")]));
    settle(&mut d);
    d.snapshot_sends.insert((1, 2), Arc::new(AtomicU64::new(3)));
    d.snapshot_sends.insert((2, 3), Arc::new(AtomicU64::new(5)));
    d.catching_up
        .insert(2, catchup::CatchUp::new("rows lost to damage".into()));
    let all = d.status();
    let shards: Vec<u64> = all.iter().map(|s| s.shard).collect();
    assert_eq!(shards, vec![META_SHARD, 1, 2]);
    for s in &all {
        assert_eq!((s.role, s.leader), (Role::Leader, 1), "shard {}", s.shard);
        assert_eq!(
            (s.voters.clone(), s.learners.clone(), s.joint),
            (vec![1], vec![], false)
        );
        assert!(s.applied == s.commit && s.commit == s.last_index, "{s:?}");
        assert!(s.first_index <= s.last_index + 1, "{s:?}");
    }
    let (s1, s2) = (&all[1], &all[2]);
    assert_eq!(s1.snapshot_sends, vec![(2, 3)]);
    assert_eq!(s2.snapshot_sends, vec![(3, 5)]);
    assert_eq!(
        (s1.catching_up.clone(), s2.catching_up.clone()),
        (None, Some("rows lost to damage".into()))
    );
    assert!(
        s1.handed_bytes > s2.handed_bytes,
        "shard 1 applied an append, shard 2 did not"
    );
}

/// A membership change stuck half-way (its joint configuration can only
/// be left with the new voters, which never answer here) shows as joint,
/// with the incoming voters.
#[test]
fn a_replica_in_a_joint_configuration_is_reported_joint() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let (reply, mut rx) = oneshot::channel();
    d.handle(Inbound::ConfChange {
        shard: 1,
        cc: conf_change_v2(&[MembershipChange::AddVoter(2), MembershipChange::AddVoter(3)]),
        reply,
        deadline: Instant::now() + Duration::from_secs(5),
    })
    .unwrap();
    settle(&mut d);
    assert!(rx.try_recv().unwrap().is_ok());
    let s1 = status_of(&d, 1);
    assert!(s1.joint, "{s1:?}");
    assert_eq!(s1.voters, vec![1, 2, 3]);
    assert!(!status_of(&d, 2).joint);
}
