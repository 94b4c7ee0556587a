//! `tick`: hibernation, the node heartbeat, learning peers, dedup
//! collection, request expiry and the shard records a leader owes the
//! metadata group.
use super::*;
use crate::nodes::{encode_record, node_record_key, NodeState, NodeStateEntry};
use crate::placement::shard_record_key;
use pigeonhole_proto::internal::v1::ShardRecord;
use replica::Part;

#[test]
fn a_quiet_shard_hibernates_after_its_ticks_and_a_request_wakes_it() {
    let tuning = RaftTuning {
        hibernate_after_ticks: 3,
        ..RaftTuning::default()
    };
    let (_dir, mut d) = driver(tuning);
    settle(&mut d);
    for _ in 0..5 {
        d.tick();
        settle(&mut d);
    }
    assert!(d.status().iter().all(|s| s.asleep), "{:?}", d.status());
    let mut r = propose(&mut d, 1, vec![append_op("a")]);
    assert!(!status_of(&d, 1).asleep);
    settle(&mut d);
    assert!(r.try_recv().unwrap().is_ok());
}

/// Every peer gets a node heartbeat; a peer not heard from for
/// `peer_down_after_ms` is marked down once, and that wakes every shard
/// (sleeping shards do not tick, so this is how they notice a dead
/// leader).
#[test]
fn the_node_heartbeat_goes_to_every_peer_and_a_silent_one_is_marked_down_once() {
    let (_dir, mut d, recorder) = recorded_driver(RaftTuning::default());
    settle(&mut d);
    let now = Instant::now();
    let silent_for = Duration::from_millis(d.tuning.peer_down_after_ms * 3);
    d.peers.insert(
        2,
        PeerLiveness {
            last_seen: now,
            down: false,
        },
    );
    d.peers.insert(
        3,
        PeerLiveness {
            last_seen: now - silent_for,
            down: false,
        },
    );
    let sleep_all = |d: &mut Driver| {
        for r in d.replicas.values_mut() {
            r.asleep = true;
        }
    };
    sleep_all(&mut d);
    d.node_heartbeat();
    assert_eq!(
        *recorder.sent.lock().unwrap(),
        vec![(2, 0), (3, 0)],
        "an empty envelope to each peer"
    );
    assert!(!d.peers[&2].down && d.peers[&3].down);
    assert!(
        d.replicas.values().all(|r| !r.asleep),
        "a peer going down wakes every shard"
    );
    sleep_all(&mut d);
    d.node_heartbeat();
    assert!(
        d.replicas.values().all(|r| r.asleep),
        "only a newly silent peer wakes them"
    );
}

/// Nodes that joined (a node record with an address) are added to the
/// transport and the liveness table once; removed nodes leave the table.
#[test]
fn learning_peers_adds_joined_nodes_once_and_drops_removed_ones() {
    let (_dir, mut d, recorder) = recorded_driver(RaftTuning::default());
    settle(&mut d);
    let joined = |address: &str| NodeStateEntry {
        address: address.into(),
        ..NodeStateEntry::default()
    };
    put_system(
        &mut d,
        node_record_key(4),
        encode_record(4, NodeState::Up, &joined("127.0.0.1:9004")),
    );
    put_system(
        &mut d,
        node_record_key(5),
        encode_record(5, NodeState::Removed, &joined("127.0.0.1:9005")),
    );
    d.peers.insert(
        5,
        PeerLiveness {
            last_seen: Instant::now(),
            down: false,
        },
    );
    d.learn_peers();
    d.learn_peers();
    assert_eq!(*recorder.added.lock().unwrap(), vec![(4, "127.0.0.1:9004".to_string())]);
    assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), vec![4]);
}

/// Dedup collection is a write through each led data shard's log (every
/// replica forgets the same entries at the same index); the metadata group
/// keeps no dedup entries and gets none.
#[test]
fn dedup_collection_is_queued_on_every_led_data_shard_and_not_the_metadata_group() {
    let tuning = RaftTuning {
        expire_dedup_every_ticks: 1,
        ..RaftTuning::default()
    };
    let (_dir, mut d) = driver(tuning);
    settle(&mut d);
    d.tick();
    let collects = |d: &Driver, shard: u64| {
        d.replicas[&shard]
            .queued
            .iter()
            .flat_map(|q| &q.ops)
            .filter(|op| matches!(op.op, Some(cmd::op::Op::ExpireDedup(_))))
            .count()
    };
    for shard in 1..=SHARDS {
        assert_eq!(collects(&d, shard), 1, "shard {shard}");
        assert!(d.waiting.contains(&shard));
    }
    assert_eq!(collects(&d, META_SHARD), 0);
    settle(&mut d);
    assert!(
        d.replicas.values().all(|r| r.queued.is_empty()),
        "the collections were proposed"
    );
}

/// A proposal or conf change still waiting for its entry at its deadline
/// is answered with a timeout at the next tick; one within its deadline
/// keeps waiting.
#[test]
fn requests_past_their_deadline_time_out_at_the_tick_and_others_wait() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let now = Instant::now();
    let mut waiting = |id: u64, deadline: Instant| {
        let (reply, rx) = oneshot::channel();
        d.pending.insert(
            id,
            Pending {
                shard: 1,
                parts: vec![Part {
                    reply,
                    ops: 1,
                    stages: None,
                }],
                deadline,
                proposed_at: now,
                term: 1,
            },
        );
        rx
    };
    let mut late = waiting(1_000_001, now - Duration::from_millis(1));
    let mut on_time = waiting(1_000_002, now + Duration::from_secs(60));
    let (reply, mut late_conf) = oneshot::channel();
    d.pending_conf.insert(
        1_000_003,
        PendingConf {
            shard: 2,
            reply,
            deadline: now - Duration::from_millis(1),
        },
    );
    d.tick();
    assert!(matches!(
        late.try_recv().unwrap(),
        Err(ClusterError::Timeout {
            shard: 1,
            what: "proposal",
            ..
        })
    ));
    assert!(matches!(
        late_conf.try_recv().unwrap(),
        Err(ClusterError::Timeout {
            shard: 2,
            what: "conf change",
            ..
        })
    ));
    assert!(on_time.try_recv().is_err(), "answered before its deadline");
    assert!(d.pending.contains_key(&1_000_002) && !d.pending.contains_key(&1_000_001));
}

/// A newly elected leader of a data shard owes the metadata group its
/// shard's record (itself as leader, its term as the version); a write
/// that failed is retried, one that landed is forgotten.
#[test]
fn a_new_leader_writes_its_shards_record_and_a_failed_write_is_retried() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    assert_eq!(
        d.map_dirty.iter().copied().collect::<Vec<_>>(),
        vec![1, 2],
        "elected leaders of the data shards"
    );
    d.write_shard_records();
    assert_eq!(d.map_writes.len(), 2);
    assert!(d.map_dirty.is_empty());
    settle(&mut d);
    d.tick();
    assert!(d.map_writes.is_empty() && d.map_dirty.is_empty(), "the write landed");
    let values = d.engine.system_scan(META_SHARD, &shard_record_key(1), 1).unwrap();
    let record = ShardRecord::decode(values[0].value.as_slice()).unwrap();
    let s1 = status_of(&d, 1);
    assert_eq!(
        (record.shard, record.leader_hint, record.term, record.voters),
        (1, 1, s1.term, vec![1])
    );
    assert_eq!(values[0].version, s1.term);

    let (reply, rx) = oneshot::channel();
    drop(reply); // the proposal was dropped (a stopping metadata leader)
    d.map_writes.push((2, rx));
    d.check_shard_record_writes();
    assert!(d.map_writes.is_empty());
    assert_eq!(d.map_dirty.iter().copied().collect::<Vec<_>>(), vec![2], "retried");
}
