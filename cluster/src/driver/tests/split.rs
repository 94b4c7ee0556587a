//! `split`: a split applied here creates the new shard's replica, narrows
//! the map and publishes it, and the parent's leader owes the metadata
//! group both records, in one command.
use super::*;
use crate::placement::{shard_record_key, ShardDesc};
use pigeonhole_engine::raft::StateRole;
use pigeonhole_proto::internal::v1::ShardRecord;
use split::clip_end;

#[test]
fn clip_end_is_the_lower_end_with_none_as_the_top_of_the_hash_space() {
    assert_eq!(clip_end(Some(5), Some(9)), Some(5));
    assert_eq!(clip_end(Some(9), Some(5)), Some(5));
    assert_eq!(clip_end(None, Some(5)), Some(5));
    assert_eq!(clip_end(Some(5), None), Some(5));
    assert_eq!(clip_end(None, None), None);
}

fn split_op(new_shard: u64, split_hash: u64) -> cmd::Op {
    cmd::Op {
        op: Some(cmd::op::Op::Split(cmd::SplitOp { new_shard, split_hash })),
    }
}

fn record(d: &Driver, shard: u64) -> Option<ShardRecord> {
    let values = d.engine.system_scan(META_SHARD, &shard_record_key(shard), 1).unwrap();
    values.first().map(|v| ShardRecord::decode(v.value.as_slice()).unwrap())
}

#[test]
fn a_split_applied_here_makes_the_new_replica_narrows_the_map_and_records_both_shards() {
    const CHILD: u64 = 3;
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    let parent = d.map.shard(1).unwrap().clone();
    let end = parent.range_end.unwrap();
    let at = parent.range_start + (end - parent.range_start) / 2;

    // Before the split, a shard whose range the local parent still holds
    // is made by the parent's own apply, never empty from a message.
    let mut planned = (*d.map).clone();
    planned.shards.push(ShardDesc {
        id: CHILD,
        range_start: at,
        range_end: Some(end),
        parent: 1,
        ..parent.clone()
    });
    d.set_map(planned);
    assert!(d.range_held_locally(CHILD).unwrap());
    assert!(!d.range_held_locally(2).unwrap(), "a bootstrap shard has no parent");
    let mut original = (*d.map).clone();
    original.shards.retain(|s| s.id != CHILD);
    d.set_map(original);

    // The records owed since the election are written first.
    d.write_shard_records();
    settle(&mut d);
    d.check_shard_record_writes();
    assert!(d.map_writes.is_empty() && d.map_dirty.is_empty());

    let mut rx = propose(&mut d, 1, vec![split_op(CHILD, at)]);
    settle(&mut d);
    let out = rx.try_recv().unwrap().unwrap();
    assert!(matches!(out.as_slice(), [Ok(OpOutput::Split { .. })]), "{out:?}");

    // The new replica, led here (the parent's leader campaigns for it).
    let child = status_of(&d, CHILD);
    assert_eq!((child.role, child.voters.clone()), (Role::Leader, vec![1]));
    assert_eq!(d.replicas[&CHILD].raw.raft.state, StateRole::Leader);
    // The map: the parent narrowed, the new shard above it, one epoch on;
    // and it is what routing sees.
    let p = d.map.shard(1).unwrap();
    let c = d.map.shard(CHILD).unwrap();
    assert_eq!(
        (p.range_start, p.range_end, p.epoch),
        (parent.range_start, Some(at), parent.epoch + 1)
    );
    assert_eq!(
        (c.range_start, c.range_end, c.epoch, c.parent),
        (at, Some(end), parent.epoch + 1, 1)
    );
    assert_eq!(*d.routing.get(), *d.map, "the new map is published for routing");
    assert!(!d.range_held_locally(CHILD).unwrap(), "the parent no longer holds it");
    // The records: owed by the parent's leader, both in one command.
    assert_eq!(d.split_children.get(&1), Some(&vec![CHILD]));
    assert_eq!(d.unrecorded_children(1), vec![CHILD]);
    assert_eq!(
        d.map_dirty.iter().copied().collect::<Vec<_>>(),
        vec![1, CHILD],
        "the parent's leader, and the new shard's (elected here)"
    );
    d.write_shard_records();
    let keys: Vec<Vec<Vec<u8>>> = d.replicas[&META_SHARD]
        .queued
        .iter()
        .map(|q| {
            q.ops
                .iter()
                .filter_map(|op| match &op.op {
                    Some(cmd::op::Op::PutSystem(p)) => Some(p.key.clone()),
                    _ => None,
                })
                .collect()
        })
        .collect();
    assert!(
        keys.contains(&vec![shard_record_key(1), shard_record_key(CHILD)]),
        "the parent's record and its new shard's go in one command: {keys:?}"
    );
    settle(&mut d);
    d.check_shard_record_writes();
    let (pr, cr) = (record(&d, 1).unwrap(), record(&d, CHILD).unwrap());
    assert_eq!((pr.range_end, pr.epoch), (Some(at), parent.epoch + 1));
    assert_eq!(
        (cr.range_start, cr.range_end, cr.parent, cr.leader_hint),
        (at, Some(end), 1, 1)
    );
    assert_eq!(
        cr.term, d.replicas[&CHILD].raw.raft.term,
        "versioned by the new shard's own term"
    );
    assert!(d.unrecorded_children(1).is_empty());
    assert!(!d.split_children.contains_key(&1), "forgotten once written");
    // And the new shard serves.
    let mut a = propose(&mut d, CHILD, vec![append_op("a")]);
    settle(&mut d);
    assert!(a.try_recv().unwrap().is_ok());
}

/// The record of a new shard is never written over one its own leader
/// wrote: at an equal term it would win, naming the wrong leader.
#[test]
fn a_new_shards_record_is_not_written_over_one_already_there() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    assert!(d.child_record(2).is_some(), "no record yet: this node writes one");
    let theirs = ShardRecord {
        shard: 2,
        leader_hint: 7,
        term: 1,
        ..Default::default()
    };
    put_system(&mut d, shard_record_key(2), theirs.encode_to_vec());
    assert_eq!(d.child_record(2), None);
}
