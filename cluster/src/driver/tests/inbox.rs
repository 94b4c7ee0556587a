//! `inbox`: what each inbox item does, and the refusals that tell a caller
//! why instead of letting it time out.
use super::*;
use crate::node::{conf_change_v2, MembershipChange};
use crate::placement::{shard_record_key, ShardDesc};
use pigeonhole_engine::raft::eraftpb::{Message, MessageType};
use pigeonhole_proto::internal::v1::ShardRecord;

fn conf_change(
    d: &mut Driver,
    shard: u64,
    change: MembershipChange,
) -> oneshot::Receiver<Result<ConfState, ClusterError>> {
    let (reply, rx) = oneshot::channel();
    assert!(d
        .handle(Inbound::ConfChange {
            shard,
            cc: conf_change_v2(&[change]),
            reply,
            deadline: Instant::now() + Duration::from_secs(5),
        })
        .unwrap());
    rx
}

#[test]
fn a_membership_change_is_refused_while_another_is_pending_or_if_it_removes_a_non_member() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let mut gone = conf_change(&mut d, 1, MembershipChange::Remove(5));
    match gone.try_recv().unwrap() {
        Err(ClusterError::Refused { reason }) => assert!(reason.contains("node 5 is not a member"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let mut first = conf_change(&mut d, 1, MembershipChange::AddLearner(2));
    let mut second = conf_change(&mut d, 1, MembershipChange::AddLearner(3));
    assert!(
        matches!(second.try_recv().unwrap(), Err(ClusterError::Busy { shard: 1, .. })),
        "a second change while the first is not applied"
    );
    settle(&mut d);
    let cs = first.try_recv().unwrap().unwrap();
    assert_eq!((cs.voters, cs.learners), (vec![1], vec![2]));
    // Once the first is applied, the next goes through.
    let mut third = conf_change(&mut d, 1, MembershipChange::AddLearner(3));
    settle(&mut d);
    assert_eq!(third.try_recv().unwrap().unwrap().learners, vec![2, 3]);
}

/// A shard of this cluster that this node holds no replica of: the error
/// names its holders from the metadata group's record, the recorded leader
/// first, and falls back to the map without a record. A shard that does
/// not exist at all is said to be so (not retryable).
#[test]
fn a_request_for_a_shard_held_elsewhere_names_its_holders_recorded_leader_first() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let mut map = (*d.map).clone();
    map.shards.push(ShardDesc {
        id: 7,
        range_start: 0,
        range_end: Some(1),
        replicas: vec![2, 3, 4],
        learners: Vec::new(),
        leader_hint: 0,
        preferred_leader: 2,
        epoch: 0,
        parent: 0,
    });
    d.set_map(map);
    let holders = |d: &mut Driver| match propose(d, 7, vec![append_op("a")]).try_recv().unwrap() {
        Err(ClusterError::NotReplica {
            shard: 7,
            node: 1,
            replicas,
        }) => replicas,
        other => panic!("{other:?}"),
    };
    assert_eq!(holders(&mut d), vec![2, 3, 4], "the map's replicas without a record");
    let record = ShardRecord {
        shard: 7,
        voters: vec![2, 3, 5],
        leader_hint: 5,
        term: 3,
        ..Default::default()
    };
    put_system(&mut d, shard_record_key(7), record.encode_to_vec());
    assert_eq!(holders(&mut d), vec![5, 3, 2], "the record's voters, its leader first");
    let (reply, mut rx) = oneshot::channel();
    d.handle(Inbound::Campaign { shard: 99, reply }).unwrap();
    assert!(matches!(
        rx.try_recv().unwrap(),
        Err(ClusterError::NoSuchShard { shard: 99, .. })
    ));
}

/// A MsgSnapshot arrives only through the spool with its state; a bare one
/// in an envelope is dropped, or raft-rs would move past the engine (here
/// it would also depose the leader: its term is higher).
#[test]
fn a_bare_snapshot_message_in_an_envelope_is_never_stepped() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let before = status_of(&d, 1);
    let mut msg = Message::default();
    msg.set_msg_type(MessageType::MsgSnapshot);
    (msg.from, msg.to, msg.term) = (2, 1, before.term + 10);
    let md = msg.mut_snapshot().mut_metadata();
    (md.index, md.term) = (before.last_index + 100, before.term + 10);
    d.on_envelope(Envelope {
        from: 2,
        to: 1,
        msgs: vec![ShardMsg { shard: 1, msg }],
    })
    .unwrap();
    settle(&mut d);
    let after = status_of(&d, 1);
    assert_eq!((after.role, after.term), (Role::Leader, before.term));
    assert_eq!(after.applied, before.applied);
}

/// Any envelope from a peer thought down marks it up and wakes every
/// shard, so leaders probe it and bring its replicas up to date.
#[test]
fn an_envelope_from_a_peer_thought_down_marks_it_up_and_wakes_every_shard() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let long_ago = Instant::now() - Duration::from_secs(60);
    d.peers.insert(
        2,
        PeerLiveness {
            last_seen: long_ago,
            down: true,
        },
    );
    for r in d.replicas.values_mut() {
        r.asleep = true;
    }
    d.on_envelope(Envelope {
        from: 2,
        to: 1,
        msgs: Vec::new(),
    })
    .unwrap();
    let p = &d.peers[&2];
    assert!(!p.down && p.last_seen > long_ago);
    assert!(d.replicas.values().all(|r| !r.asleep), "every shard is woken");
}

#[test]
fn the_inbox_refuses_what_this_node_cannot_do() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let mut r = propose(&mut d, 99, vec![append_op("a")]);
    assert!(matches!(
        r.try_recv().unwrap(),
        Err(ClusterError::NoSuchShard { shard: 99, .. })
    ));
    let (reply, mut rx) = oneshot::channel();
    d.handle(Inbound::TransferLeader { shard: 1, to: 7, reply }).unwrap();
    assert!(matches!(
        rx.try_recv().unwrap(),
        Err(ClusterError::InvalidArgument { field: "to_node", .. })
    ));
    let mut empty = propose(&mut d, 1, Vec::new());
    assert!(empty.try_recv().unwrap().unwrap().is_empty(), "no ops, no entry");
}
