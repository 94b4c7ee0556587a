//! Stale-replica GC: deleting this node's replica of a shard that removed
//! it while the node was down, paused or cut off.
//!
//! A replica normally deletes itself when it applies the conf change that
//! removes it (`apply`, replica GC). A node that never receives that entry
//! keeps its replica for good: the leader no longer sends to a non-member,
//! so nothing ever tells it. The copy costs disk, shows up in NodeStatus as
//! a replica the shard map does not have (the Jepsen membership run could
//! not converge because of one) and campaigns in vain from its old
//! configuration.
//!
//! The shard records in the metadata group say who is a member: each data
//! shard's leader writes its configuration together with `handed_index`,
//! the last log index it had handed to apply (conf changes take effect at
//! hand-off, so the configuration holds every change up to that index). A
//! replica here is stale when the record leaves this node out AND this
//! replica's log ends before `handed_index`: the removal (at or before that
//! index) is then an entry it has not even received. Every record is true
//! at its own index, however old (a deposed leader's too), because conf
//! changes reach raft-rs only once committed.
//!
//! A record can lag a re-add: the node is added back at index J > H while
//! this node's metadata replica still holds the record of H. Two things
//! keep such a replica: a learner caught up by appends or a snapshot ends
//! past J, beyond H, so the rule stops holding; and while it is not yet
//! caught up, the shard's leader sends it appends and heartbeats, which a
//! leader sends only to members, and each one at a term at least the
//! record's restarts the replica's clock (`heard_from_leader`). A replica
//! goes only after `stale_replica_after_ms` (10 s by default) of the rule
//! holding with no such message. TiKV does the same job by asking PD (its
//! placement service) when a peer's region epoch looks old.
//!
//! Deleting goes through replica GC (`Driver::remove_replica`), so term
//! and vote survive (storage-format.md I8) and the node never votes twice
//! in a term. A replica deleted while it was in fact a member (re-added and
//! cut off from its leader for the whole 10 s) loses nothing committed: its
//! current membership began after H, and any acknowledgement of it that a
//! commit counted would have put its log past H. It is created again empty
//! by the leader's next message and caught up by a snapshot; what remains
//! (docs/decisions.md D37) is that the leader's progress for it keeps the
//! old matched index until the empty replica rejects an append. The
//! metadata group (shard 0) has no record of its own and is not collected
//! here.

use super::Driver;
use crate::error::ClusterError;
use crate::placement::{META_SHARD, SHARD_RECORD_PREFIX};
use pigeonhole_engine::raft::eraftpb::{Message, MessageType};
use pigeonhole_engine::raft::StateRole;
use pigeonhole_proto::internal::v1::ShardRecord;
use prost::Message as _;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How often (in ticks) the driver looks for stale replicas: one prefix
/// scan of the node's own metadata replica (one small record per shard).
const STALE_CHECK_EVERY_TICKS: u64 = 10;

/// A replica the records show stale: since when, without a break, and the
/// newest record's term that showed it.
#[derive(Debug, Clone, Copy)]
pub(super) struct StaleSeen {
    since: Instant,
    record_term: u64,
}

/// True when `record` shows that a replica on `node` whose log ends at
/// `last_index` was removed before it received its removal.
pub(crate) fn is_stale(record: &ShardRecord, node: u64, last_index: u64) -> bool {
    let member = record.voters.contains(&node)
        || record.learners.contains(&node)
        || record.voters_outgoing.contains(&node)
        || record.learners_next.contains(&node);
    !member && record.handed_index > last_index
}

impl Driver {
    /// A leader's message to this node's replica of `shard` (appends,
    /// heartbeats) at a term at least the record's: a leader sends only to
    /// members, so the replica is one (added back, say, before this node's
    /// metadata replica has the record that lists it). Its clock starts
    /// again; as long as a current leader talks to it, it is never deleted.
    pub(super) fn heard_from_leader(&mut self, shard: u64, msg: &Message) {
        let from_leader = matches!(msg.get_msg_type(), MessageType::MsgAppend | MessageType::MsgHeartbeat);
        if from_leader && self.stale_since.get(&shard).is_some_and(|s| msg.term >= s.record_term) {
            self.stale_since.remove(&shard);
        }
    }

    /// Every `STALE_CHECK_EVERY_TICKS`: notes the replicas the metadata
    /// group's records show stale, and deletes those that have been stale
    /// for `stale_replica_after_ms` without a break.
    pub(super) fn collect_stale_replicas(&mut self) -> Result<(), ClusterError> {
        if self.ticks % STALE_CHECK_EVERY_TICKS != 0 {
            return Ok(());
        }
        let limit = usize::try_from(crate::config::SHARD_COUNT_MAX).unwrap_or(usize::MAX);
        let Ok(values) = self.engine.system_scan(META_SHARD, SHARD_RECORD_PREFIX, limit) else {
            return Ok(()); // no metadata replica (yet) on this node
        };
        // The same records say which shards splits made elsewhere (D38).
        self.refresh_map(&values);
        if self.tuning.stale_replica_after_ms == 0 {
            return Ok(());
        }
        let mut stale_now = BTreeMap::new();
        for v in values {
            let Ok(record) = ShardRecord::decode(v.value.as_slice()) else {
                continue;
            };
            let Some(r) = self.replicas.get(&record.shard) else {
                continue;
            };
            // A leader is a member by definition of its own log; a replica
            // whose removal is applied goes through replica GC already.
            if record.shard == META_SHARD || r.raw.raft.state == StateRole::Leader || r.remove_at.is_some() {
                continue;
            }
            if is_stale(&record, self.node_id, r.raw.raft.raft_log.last_index()) {
                stale_now.insert(record.shard, record.term);
            }
        }
        let now = Instant::now();
        self.stale_since.retain(|shard, _| stale_now.contains_key(shard));
        let limit = Duration::from_millis(self.tuning.stale_replica_after_ms);
        let mut gone = Vec::new();
        for (shard, record_term) in stale_now {
            let seen = self.stale_since.entry(shard).or_insert(StaleSeen {
                since: now,
                record_term,
            });
            seen.record_term = seen.record_term.max(record_term);
            if now.duration_since(seen.since) >= limit {
                gone.push(shard);
            }
        }
        for shard in gone {
            self.stale_since.remove(&shard);
            self.counters
                .stale_replicas_deleted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.remove_replica(shard)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(voters: &[u64], learners: &[u64], handed_index: u64) -> ShardRecord {
        ShardRecord {
            shard: 1,
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            handed_index,
            ..ShardRecord::default()
        }
    }

    #[test]
    fn the_record_encodes_as_storage_format_md_shows() {
        let r = ShardRecord {
            shard: 1,
            voters: vec![1],
            leader_hint: 1,
            preferred_leader: 1,
            term: 6,
            handed_index: 12,
            ..ShardRecord::default()
        };
        let want = [
            0x08, 0x01, 0x22, 0x01, 0x01, 0x30, 0x01, 0x38, 0x01, 0x40, 0x06, 0x48, 0x0c,
        ];
        assert_eq!(r.encode_to_vec(), want);
    }

    #[test]
    fn only_a_non_member_behind_the_record_is_stale() {
        // Removed at or before 100, and this replica ends at 80: stale.
        assert!(is_stale(&record(&[1, 3, 4], &[], 100), 2, 80));
        // Ends at or past the record's index: it was added back (a learner
        // caught up past the record) or the record is older than its log.
        assert!(!is_stale(&record(&[1, 3, 4], &[], 100), 2, 100));
        assert!(!is_stale(&record(&[1, 3, 4], &[], 100), 2, 250));
        // A member in any role is never stale, however far behind.
        assert!(!is_stale(&record(&[1, 2, 3], &[], 100), 2, 0));
        assert!(!is_stale(&record(&[1, 3], &[2], 100), 2, 0));
        let mut joint = record(&[1, 3, 4], &[], 100);
        joint.voters_outgoing = vec![1, 2, 3];
        assert!(!is_stale(&joint, 2, 0));
        let mut demoted = record(&[1, 3, 4], &[], 100);
        demoted.learners_next = vec![2];
        assert!(!is_stale(&demoted, 2, 0));
        // A record from a build without handed_index never marks anything.
        assert!(!is_stale(&record(&[1, 3, 4], &[], 0), 2, 0));
    }
}
