//! Several drivers of one node (`pool`): each starts its share of the
//! replicas, no two ever make a replica of one shard, and a driver without
//! the metadata replica writes its shard records through the driver with
//! it.
use super::*;
use crate::placement::{shard_record_key, ShardDesc};
use pigeonhole_engine::raft::eraftpb::{Message, MessageType};

fn settle_all(ds: &mut [Driver]) {
    for _ in 0..3 {
        for d in ds.iter_mut() {
            settle(d);
        }
    }
}

fn held(d: &Driver) -> Vec<u64> {
    d.replicas.keys().copied().collect()
}

#[test]
fn each_driver_starts_its_share_of_the_replicas_and_claims_them() {
    let (_dir, mut ds) = pool_of(2);
    settle_all(&mut ds);
    assert_eq!(held(&ds[0]), vec![META_SHARD, 2]);
    assert_eq!(held(&ds[1]), vec![1]);
    let pool = ds[0].drivers.clone();
    assert_eq!([0, 1, 2].map(|s| pool.holder(s)), [Some(0), Some(1), Some(0)]);
    for d in &ds {
        assert!(d.status().iter().all(|s| s.driver == d.index && s.role == Role::Leader));
    }
    // Each serves its own shards.
    let mut a = propose(&mut ds[1], 1, vec![append_op("a")]);
    let mut b = propose(&mut ds[0], 2, vec![append_op("b")]);
    settle_all(&mut ds);
    assert!(a.try_recv().unwrap().is_ok() && b.try_recv().unwrap().is_ok());
}

fn split_op(new_shard: u64, split_hash: u64) -> cmd::Op {
    cmd::Op {
        op: Some(cmd::op::Op::Split(cmd::SplitOp { new_shard, split_hash })),
    }
}

/// A split applied on the parent's driver makes the new shard there; if
/// another driver already holds the new shard (it made it from a leader's
/// message, or since a restart that replays the split), no second replica
/// is made, and the map still follows the split.
#[test]
fn a_split_makes_its_new_shard_on_the_parents_driver_unless_another_holds_it() {
    for other_holds_it in [false, true] {
        let (_dir, mut ds) = pool_of(2);
        settle_all(&mut ds);
        let pool = ds[1].drivers.clone();
        if other_holds_it {
            assert!(pool.claim(3, 0));
        }
        let parent = ds[1].map.shard(1).unwrap().clone();
        let at = parent.range_end.unwrap() / 2;
        let mut rx = propose(&mut ds[1], 1, vec![split_op(3, at)]);
        settle_all(&mut ds);
        assert!(rx.try_recv().unwrap().is_ok());
        assert_eq!(
            ds[1].replicas.contains_key(&3),
            !other_holds_it,
            "held elsewhere: {other_holds_it}"
        );
        assert_eq!(pool.holder(3), Some(if other_holds_it { 0 } else { 1 }));
        for d in &ds {
            assert_eq!(d.map.shard(1).unwrap().range_end, Some(at), "driver {}", d.index);
            assert!(d.map.shard(3).is_some(), "driver {} follows the node's map", d.index);
        }
    }
}

/// A leader's message for a shard another driver holds, routed here before
/// that driver made its replica, makes no replica here.
#[test]
fn a_message_for_a_shard_another_driver_holds_makes_no_replica() {
    let (_dir, mut ds) = pool_of(2);
    settle_all(&mut ds);
    ds[0].update_map(|m| {
        let mut m = m.clone();
        m.shards.push(ShardDesc {
            id: 7,
            range_start: 0,
            range_end: Some(1),
            replicas: vec![1, 2, 3],
            learners: Vec::new(),
            leader_hint: 2,
            preferred_leader: 2,
            epoch: 0,
            parent: 0,
        });
        m
    });
    let heartbeat = || {
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgHeartbeat);
        (msg.from, msg.to, msg.term) = (2, 1, 3);
        Envelope {
            from: 2,
            to: 1,
            msgs: vec![ShardMsg { shard: 7, msg }],
        }
    };
    let pool = ds[0].drivers.clone();
    assert!(pool.claim(7, 1));
    ds[0].on_envelope(heartbeat()).unwrap();
    assert!(
        !ds[0].replicas.contains_key(&7),
        "made by a driver that does not hold it"
    );
    assert_eq!(pool.holder(7), Some(1));
    // Once the holder lets go, the driver the message reached makes it.
    pool.release(7, 1);
    ds[0].on_envelope(heartbeat()).unwrap();
    assert!(ds[0].replicas.contains_key(&7));
    assert_eq!(pool.holder(7), Some(0));
}

/// Driver 1 leads shard 1 but the metadata replica is driver 0's: the
/// record goes to driver 0's inbox as a proposal, and lands.
#[test]
fn a_driver_without_the_metadata_replica_writes_records_through_the_one_with_it() {
    let (_dir, mut ds) = pool_of(2);
    settle_all(&mut ds);
    assert!(ds[1].map_dirty.contains(&1), "an elected leader owes its record");
    ds[1].write_shard_records();
    assert_eq!(ds[1].map_writes.len(), 1);
    assert_eq!(ds[0].rx.len(), 1, "the write is in driver 0's inbox");
    settle_all(&mut ds);
    ds[1].check_shard_record_writes();
    assert!(ds[1].map_writes.is_empty() && ds[1].map_dirty.is_empty(), "written");
    let values = ds[0].engine.system_scan(META_SHARD, &shard_record_key(1), 1).unwrap();
    assert_eq!(values.len(), 1);
}

/// Only driver 0 sends the node heartbeat (a peer hands an envelope without
/// messages to each of its drivers).
#[test]
fn only_the_first_driver_sends_node_heartbeats() {
    let recorder = Arc::new(Recorder::default());
    let transport: Arc<dyn Transport> = Arc::new(recorder.clone());
    let (_dir, mut ds) = build_pool(RaftTuning::default(), |_| {}, transport, 2);
    for d in ds.iter_mut() {
        d.peers.insert(
            2,
            PeerLiveness {
                last_seen: Instant::now(),
                down: false,
            },
        );
        d.node_heartbeat();
    }
    assert_eq!(*recorder.sent.lock().unwrap(), vec![(2, 0)]);
}
