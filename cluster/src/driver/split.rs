//! Splits on the driver's side (D38). The state machine applies a
//! `SplitOp` on every replica of the parent (`pigeonhole_engine`'s split):
//! the new shard's apply state appears in the parent's data space at the
//! split entry. This module makes the rest of the node follow:
//!
//! - the apply worker reports each split it applied; the driver then
//!   creates the new shard's replica here (its Raft log starts at the split
//!   entry, through the same start-up repair that resets a log to an
//!   apply state ahead of it), with the parent's configuration;
//! - this node's shard map narrows the parent and adds the new shard at
//!   once, and is published for routing; the parent's leader campaigns for
//!   the new shard (so the same node leads both) and records the parent's
//!   new range in the metadata group, the new shard's leader its record;
//! - the map also follows the shard records of this node's metadata
//!   replica (read once a second), so a node learns of splits it did not
//!   apply itself (it holds no replica of the parent).
//!
//! A message for a shard this node does not hold creates an empty replica
//! only if no local replica still owns that shard's hash range: a replica
//! of the parent that has not applied the split yet will create the new
//! shard's replica itself, from its own rows, without a snapshot.

use super::Driver;
use crate::error::ClusterError;
use crate::placement::{shard_record_key, ShardDesc, ShardMap, META_SHARD};
use pigeonhole_engine::raft::StateRole;
use pigeonhole_engine::{HashRange, ShardState};
use pigeonhole_proto::internal::v1::ShardRecord;

/// A split the apply worker applied, that made its new shard here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SplitMade {
    pub(super) parent: u64,
    pub(super) child: u64,
    pub(super) range: HashRange,
}

impl Driver {
    /// Changes the node's shard map (shared by its drivers, read by
    /// routing) to `f` of the map now.
    pub(super) fn update_map(&mut self, f: impl FnOnce(&ShardMap) -> ShardMap) {
        self.map = self.routing.update(f);
    }

    /// Replaces the node's shard map.
    #[cfg(test)]
    pub(super) fn set_map(&mut self, map: ShardMap) {
        self.update_map(|_| map);
    }

    /// Lays shard records (from this node's metadata replica) over the map.
    pub(super) fn refresh_map(&mut self, records: &[pigeonhole_engine::SystemValue]) {
        self.update_map(|m| m.overlay(records));
    }

    /// A split applied here: the new shard's replica, and the map.
    pub(super) fn on_split(&mut self, s: &SplitMade) -> Result<(), ClusterError> {
        // Made here only if no driver of this node holds it: another may
        // have made it empty from a leader's message, or hold it since a
        // restart that replays the split (`pool`).
        if !self.replicas.contains_key(&s.child) && self.drivers.claim_new(s.child, self.index) {
            // Its apply state is in the engine (the split's write, without
            // the WAL); its log starts at the split entry (`recover_shard`
            // resets an empty log to an apply state ahead of it, and keeps
            // a log that is already there). The apply state is made durable
            // first: a log that starts at the split entry over no durable
            // apply state could never be replayed if the parent does not
            // apply the split again after a crash (its leader compacted
            // past it and sends a snapshot; found by a review). Splits are
            // rare; the flush stalls this driver turn for one memtable.
            self.engine.flush_data()?;
            self.recover_shard(s.child)?;
            let meta = self
                .engine
                .shard_meta(s.child)?
                .filter(|m| m.state == ShardState::Ready);
            let Some(meta) = meta else {
                self.drivers.release(s.child, self.index);
                return Ok(());
            };
            self.add_replica(s.child, meta.applied_index)?;
        }
        let leads_parent = self
            .replicas
            .get(&s.parent)
            .is_some_and(|r| r.raw.raft.state == StateRole::Leader);
        let (voters, learners) = self
            .replicas
            .get(&s.child)
            .map(|r| {
                let cs = r.raw.raft.prs().conf().to_conf_state();
                (cs.voters, cs.learners)
            })
            .unwrap_or_default();
        self.update_map(|now| {
            let mut map = now.clone();
            let mut epoch = 1;
            let mut preferred = 0;
            // The engine's range of a bootstrap shard is every hash (its space
            // holds only its own mailboxes); the map's end is the real one.
            let mut end = s.range.end;
            if let Some(p) = map.shards.iter_mut().find(|d| d.id == s.parent) {
                epoch = p.epoch + 1;
                preferred = p.preferred_leader;
                end = clip_end(s.range.end, p.range_end);
                p.range_end = Some(s.range.start);
                p.epoch = epoch;
            }
            if map.shard(s.child).is_none() {
                map.shards.push(ShardDesc {
                    id: s.child,
                    range_start: s.range.start,
                    range_end: end,
                    replicas: voters,
                    learners,
                    leader_hint: 0,
                    preferred_leader: preferred,
                    epoch,
                    parent: s.parent,
                });
                map.shards.sort_by_key(|d| (d.range_start, d.id));
            }
            map
        });
        if leads_parent {
            if let Some(r) = self.replicas.get_mut(&s.child) {
                if r.raw.raft.prs().conf().voters().contains(self.node_id) {
                    r.raw.campaign().map_err(super::raft_err)?;
                }
            }
            self.split_children.entry(s.parent).or_default().push(s.child);
            self.map_dirty.insert(s.parent);
        }
        self.dirty.insert(s.child);
        Ok(())
    }

    /// The record of a shard just split here from a shard this node leads,
    /// written with the parent's: the new shard's configuration, this node
    /// as its leader (it campaigns), no `handed_index` (it marks no replica
    /// stale), and the new shard's own term here as the version, which its
    /// leaders' later records never go below.
    pub(super) fn child_record(&self, child: u64) -> Option<ShardRecord> {
        // Never over a record the new shard's own leader wrote (at an equal
        // term it would win, with this node named as leader).
        let missing = self
            .engine
            .system_scan(META_SHARD, &shard_record_key(child), 1)
            .is_ok_and(|v| v.is_empty());
        missing.then(|| self.shard_record(child, 0)).flatten()
    }

    /// `shard`'s record as this node sees it: the map's range, epoch,
    /// parent and preferred leader, the local replica's configuration and
    /// term, this node as leader, and `handed_index`.
    pub(super) fn shard_record(&self, shard: u64, handed_index: u64) -> Option<ShardRecord> {
        let desc = self.map.shard(shard)?;
        let raft = &self.replicas.get(&shard)?.raw.raft;
        let conf = raft.prs().conf().to_conf_state();
        Some(ShardRecord {
            shard,
            range_start: desc.range_start,
            range_end: desc.range_end,
            voters: conf.voters,
            learners: conf.learners,
            leader_hint: self.node_id,
            preferred_leader: desc.preferred_leader,
            term: raft.term,
            handed_index,
            voters_outgoing: conf.voters_outgoing,
            learners_next: conf.learners_next,
            epoch: desc.epoch,
            parent: desc.parent,
        })
    }

    /// Shards split from `parent` (by its latest split) that this node holds
    /// and whose record its metadata replica does not have yet.
    pub(super) fn unrecorded_children(&self, parent: u64) -> Vec<u64> {
        let Some(epoch) = self.map.shard(parent).map(|d| d.epoch) else {
            return Vec::new();
        };
        self.map
            .shards
            .iter()
            .filter(|s| s.parent == parent && s.epoch == epoch && self.replicas.contains_key(&s.id))
            .filter(|s| {
                self.engine
                    .system_scan(META_SHARD, &shard_record_key(s.id), 1)
                    .is_ok_and(|v| v.is_empty())
            })
            .map(|s| s.id)
            .collect()
    }

    /// Whether `shard` was split from a shard whose replica here has not
    /// applied the split yet (its range still holds `shard`'s start): that
    /// apply will make `shard`'s replica, from local rows.
    pub(super) fn range_held_locally(&self, shard: u64) -> Result<bool, ClusterError> {
        let Some(desc) = self.map.shard(shard) else {
            return Ok(false);
        };
        if desc.parent == 0 || !self.replicas.contains_key(&desc.parent) {
            return Ok(false);
        }
        Ok(self
            .engine
            .shard_meta(desc.parent)?
            .is_some_and(|m| m.state == ShardState::Ready && m.range.contains(desc.range_start)))
    }
}

/// The lower of two range ends (None: the top of the hash space).
pub(crate) fn clip_end(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (x, None) | (None, x) => x,
    }
}
