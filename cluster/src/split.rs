//! `SplitShard` on the node (D38): a new shard id from the metadata group,
//! then the split op through the shard's own log. Everything after the
//! split entry applies (the new shard's replicas, the map, the records)
//! follows from the apply on every replica (`driver::split`).
//!
//! Shard ids come from one counter in the metadata group (`shard-id/next`,
//! compare-and-set), so two splits anywhere in the cluster never hand out
//! one id; a failed split wastes its id, which is harmless.

use crate::error::ClusterError;
use crate::node::Node;
use crate::placement::{ShardDesc, META_SHARD};
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::{HashRange, OpError, OpOutput};

/// The metadata group's system key of the next shard id to hand out.
pub const NEXT_SHARD_ID_KEY: &[u8] = b"shard-id/next";

/// Tries at the id counter before giving up (BUSY, retryable).
const ID_TRIES_MAX: usize = 8;

/// A split's outcome: both shards as they are now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitDone {
    pub shard: ShardDesc,
    pub new_shard: ShardDesc,
}

/// The middle of a shard's range.
pub fn middle(desc: &ShardDesc) -> u64 {
    pigeonhole_proto::placement::range_middle(desc.range_start, desc.range_end)
}

/// The split of `shard` at `at`, if `map` shows it done: the shard ends at
/// `at` and another starts there.
fn already_split(map: &crate::placement::ShardMap, shard: u64, at: u64) -> Option<SplitDone> {
    let lower = map.shard(shard).filter(|d| d.range_end == Some(at))?;
    let upper = map.shards.iter().find(|s| s.range_start == at && s.id != shard)?;
    Some(SplitDone {
        shard: lower.clone(),
        new_shard: upper.clone(),
    })
}

impl Node {
    /// Splits `shard` at `split_hash` (None: the middle of its range).
    pub async fn split_shard(&self, shard: u64, split_hash: Option<u64>) -> Result<SplitDone, ClusterError> {
        if shard == META_SHARD {
            return Err(ClusterError::InvalidArgument {
                field: "shard",
                reason: "the metadata group is never split".into(),
            });
        }
        self.read_barrier(META_SHARD).await?;
        // The driver's map with the records read now (the driver re-reads
        // them once a second), and the splits applied here that their
        // records may not show yet.
        let map = self.shard_map()?;
        let Some(desc) = map.shard(shard).cloned() else {
            // An id the counter handed out above every shard this node
            // knows, whose split's records have not reached it (they are
            // written just after the split applies): retry. (An id a failed
            // split wasted, below a shard made since, is not found.)
            let known_max = map.shards.iter().map(|s| s.id).max().unwrap_or(0);
            if shard > known_max && shard < self.stored_next_shard_id()? {
                return Err(ClusterError::Busy {
                    shard,
                    reason: format!("shard {shard} comes from a split whose record this node has not seen yet; retry"),
                });
            }
            return Err(ClusterError::NoSuchShard {
                shard,
                first: map.shards.first().map_or(0, |s| s.id),
                last: map.shards.last().map_or(0, |s| s.id),
            });
        };
        // A replica move the placement loop asked for may not show as a
        // learner yet: the new shard would inherit it, owned by no move.
        let moving = self.meta_scan(&crate::moves::move_key(shard), 1)?.iter().any(|v| {
            crate::moves::decode_targets(std::slice::from_ref(v))
                .values()
                .any(|t| t.in_flight())
        });
        if moving {
            return Err(ClusterError::Busy {
                shard,
                reason: format!("a replica move of shard {shard} is in flight; split it once the move is done"),
            });
        }
        if !desc.learners.is_empty() {
            return Err(ClusterError::Refused {
                reason: format!(
                    "shard {shard} has learners {:?} (a replica move in flight); split it once the move is done",
                    desc.learners
                ),
            });
        }
        let at = split_hash.unwrap_or_else(|| middle(&desc));
        // A retry of a split that went through: done already.
        if let Some(done) = already_split(&map, shard, at) {
            return Ok(done);
        }
        let range = HashRange {
            start: desc.range_start,
            end: desc.range_end,
        };
        if range.split_at(at).is_none() {
            return Err(ClusterError::InvalidArgument {
                field: "split_hash",
                reason: format!("must lie strictly inside shard {shard}'s hash range {range}, got {at:#018x}"),
            });
        }
        // Only a replica proposes (its proposal reaches the leader): an id
        // taken on another node would be wasted on a refused proposal, and
        // such a node may not know the shard yet if a split just made it
        // (refused as no such shard, which is not retried).
        if !self.status().await?.iter().any(|s| s.shard == shard) {
            let mut replicas = desc.replicas.clone();
            if let Some(i) = replicas.iter().position(|n| *n == desc.leader_hint) {
                replicas.swap(0, i);
            }
            return Err(ClusterError::NotReplica {
                shard,
                node: self.id(),
                replicas,
            });
        }
        let new_shard = self
            .next_shard_id(map.shards.iter().map(|s| s.id).max().unwrap_or(0))
            .await?;
        let op = cmd::Op {
            op: Some(cmd::op::Op::Split(cmd::SplitOp {
                new_shard,
                split_hash: at,
            })),
        };
        match self.propose(shard, vec![op]).await?.into_iter().next() {
            Some(Ok(OpOutput::Split { new_shard, range, .. })) => {
                let lower = ShardDesc {
                    range_end: Some(range.start),
                    epoch: desc.epoch + 1,
                    ..desc.clone()
                };
                let upper = ShardDesc {
                    id: new_shard,
                    range_start: range.start,
                    range_end: crate::driver::clip_end(range.end, desc.range_end),
                    leader_hint: desc.leader_hint,
                    epoch: desc.epoch + 1,
                    parent: shard,
                    ..desc
                };
                Ok(SplitDone {
                    shard: lower,
                    new_shard: upper,
                })
            }
            // The map this node read was older than the shard's range: a
            // split committed meanwhile. If it is this very split (a retry
            // through a node that had not applied it yet), answer with it
            // once this node's map shows it.
            Some(Err(OpError::InvalidArgument { field, reason })) => {
                let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while field == "split.split_hash" && std::time::Instant::now() < until {
                    if let Some(done) = already_split(&self.routing(), shard, at) {
                        return Ok(done);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(ClusterError::InvalidArgument { field, reason })
            }
            Some(Err(e)) => Err(ClusterError::Busy {
                shard,
                reason: format!("the split was refused: {e}"),
            }),
            Some(Ok(other)) => Err(ClusterError::Raft(format!("a split answered {other:?}"))),
            None => Err(ClusterError::Raft("a proposal of one op returned no result".into())),
        }
    }

    /// Takes the next shard id from the metadata group's counter (at least
    /// one above `highest`, the highest id this node's map knows).
    /// The id counter's stored value (0: never used; ids then start above
    /// the bootstrap shards).
    fn stored_next_shard_id(&self) -> Result<u64, ClusterError> {
        Ok(self
            .meta_scan(NEXT_SHARD_ID_KEY, 1)?
            .into_iter()
            .find(|v| v.key == NEXT_SHARD_ID_KEY)
            .and_then(|v| v.value.as_slice().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    async fn next_shard_id(&self, highest: u64) -> Result<u64, ClusterError> {
        let mut last = String::new();
        for _ in 0..ID_TRIES_MAX {
            let current = self.meta_scan(NEXT_SHARD_ID_KEY, 1)?.into_iter().next();
            let (version, stored) = match &current {
                Some(v) if v.key == NEXT_SHARD_ID_KEY => {
                    let next = v.value.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
                    (v.version, next)
                }
                _ => (0, 0),
            };
            let id = stored.max(highest.saturating_add(1));
            if id >= pigeonhole_engine::SPACE_PRIVATE_MIN {
                return Err(ClusterError::Refused {
                    reason: "no shard id left".into(),
                });
            }
            let op = cmd::Op {
                op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                    key: NEXT_SHARD_ID_KEY.to_vec(),
                    value: (id + 1).to_be_bytes().to_vec(),
                    version: version.saturating_add(1),
                    if_version: Some(version),
                })),
            };
            match self.propose_meta_cas(op, "the shard id counter").await {
                Ok(()) => return Ok(id),
                Err(ClusterError::Busy { reason, .. }) => last = reason,
                Err(e) => return Err(e),
            }
        }
        Err(ClusterError::Busy {
            shard: META_SHARD,
            reason: format!("could not take a shard id: {last}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_middle_halves_open_and_closed_ranges() {
        let d = |start, end| ShardDesc {
            id: 1,
            range_start: start,
            range_end: end,
            replicas: vec![],
            learners: vec![],
            leader_hint: 0,
            preferred_leader: 0,
            epoch: 0,
            parent: 0,
        };
        assert_eq!(middle(&d(0, None)), 1 << 63);
        assert_eq!(middle(&d(10, Some(20))), 15);
        assert_eq!(middle(&d(1 << 63, None)), (1 << 63) + (1 << 62));
    }
}
