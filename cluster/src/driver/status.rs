//! What the driver reports about its replicas ([`ShardStatus`]), for
//! NodeStatus, phctl and the tests.

use super::{Driver, Role, ShardStatus};
use pigeonhole_engine::raft::{StateRole, Storage as _};
use std::sync::atomic::AtomicU64;

/// Node-wide counts the driver keeps since start, read without asking it
/// (shared with the node's handle).
#[derive(Debug, Default)]
pub struct DriverCounters {
    /// Replicas deleted by stale-replica GC (`gc`).
    pub stale_replicas_deleted: AtomicU64,
}

impl Driver {
    pub(super) fn status(&self) -> Vec<ShardStatus> {
        // Replicas ingesting a snapshot are out of `replicas` meanwhile,
        // but still this node's.
        let mut all: Vec<(&u64, &super::replica::Replica)> = self
            .replicas
            .iter()
            .chain(self.ingests.iter().map(|(s, i)| (s, &i.replica)))
            .collect();
        all.sort_unstable_by_key(|(s, _)| **s);
        all.into_iter()
            .map(|(shard, r)| {
                let raft = &r.raw.raft;
                let conf = raft.prs().conf().to_conf_state();
                ShardStatus {
                    shard: *shard,
                    role: match raft.state {
                        StateRole::Leader => Role::Leader,
                        StateRole::Follower => Role::Follower,
                        StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
                    },
                    leader: raft.leader_id,
                    term: raft.term,
                    commit: raft.raft_log.committed,
                    applied: raft.raft_log.applied,
                    handed_bytes: r.handed_bytes,
                    last_index: raft.raft_log.last_index(),
                    first_index: r.raw.store().first_index().unwrap_or(0),
                    joint: !conf.voters_outgoing.is_empty(),
                    voters: conf.voters,
                    learners: conf.learners,
                    asleep: r.asleep,
                    snapshot_sends: self
                        .snapshot_sends
                        .range((*shard, 0)..=(*shard, u64::MAX))
                        .map(|((_, to), n)| (*to, n.load(std::sync::atomic::Ordering::Relaxed)))
                        .collect(),
                    catching_up: self.catching_up.get(shard).map(|c| c.reason.clone()),
                    driver: self.index,
                }
            })
            .collect()
    }
}
