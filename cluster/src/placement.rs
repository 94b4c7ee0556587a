//! The shard map: hash range → replicas → preferred leader, and the node list.
//!
//! At bootstrap every node computes the same map from the same flags
//! (`--initial-cluster`, shard count, replication factor), so no node needs
//! to ask another. Shard ids start at 1; id 0 is reserved for a metadata
//! group. Replicas go round-robin over the sorted node ids, and the first
//! replica of each shard is its preferred leader, which spreads leaders
//! evenly over the nodes from the first election on.
//!
//! After bootstrap the map changes (membership changes, elections), and the
//! changed entries live in replicated state: the metadata Raft group (shard
//! [`META_SHARD`], a replica on every node: up to five voters, the rest
//! learners) holds one [`ShardRecord`](pigeonhole_proto::internal::v1::ShardRecord)
//! per shard that changed. [`ShardMap::overlay`] lays those records over the
//! bootstrap map, so every node reads the same map from its own replica.

use crate::config::InitialCluster;
use crate::hash::{equal_range, user_hash};
use pigeonhole_proto::internal::v1::ShardRecord;
use prost::Message as _;
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

/// The map requests are routed by on this node: the driver's map (the
/// bootstrap layout, the shard records of this node's metadata replica, and
/// the splits this node applied before their records arrived), published
/// by the driver whenever it changes, read by the API on every request.
/// Beside it, the leader each local replica last heard of, which the API
/// hands to clients that wrote through a follower
/// (`pigeonhole_proto::hints`).
#[derive(Debug)]
pub struct Routing {
    map: RwLock<Arc<ShardMap>>,
    /// Shard → the leader its replica here last learned of (never 0).
    /// Written by the driver when a replica learns of a new leader (rare),
    /// read by the API once per write.
    leaders: RwLock<std::collections::HashMap<u64, u64>>,
}

impl Routing {
    pub fn new(map: Arc<ShardMap>) -> Routing {
        Routing {
            map: RwLock::new(map),
            leaders: RwLock::new(std::collections::HashMap::new()),
        }
    }

    /// The map now.
    pub fn get(&self) -> Arc<ShardMap> {
        self.map.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the map with `f` of the map now, in one step: a node's
    /// drivers each change it (their splits, the records they read), and
    /// none may undo another's change. Returns the map after.
    pub(crate) fn update(&self, f: impl FnOnce(&ShardMap) -> ShardMap) -> Arc<ShardMap> {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let next = f(&map);
        if next != **map {
            *map = Arc::new(next);
        }
        map.clone()
    }

    /// The leader of `shard` its replica here last learned of; 0 when
    /// none (no replica here, or no leader heard of yet). A hint: the
    /// leader may have changed since.
    pub fn leader(&self, shard: u64) -> u64 {
        let leaders = self.leaders.read().unwrap_or_else(PoisonError::into_inner);
        leaders.get(&shard).copied().unwrap_or(0)
    }

    /// Records that `shard`'s replica here learned of `leader` (0: its
    /// replica went; the entry is dropped).
    pub(crate) fn set_leader(&self, shard: u64, leader: u64) {
        let mut leaders = self.leaders.write().unwrap_or_else(PoisonError::into_inner);
        if leader == 0 {
            leaders.remove(&shard);
        } else {
            leaders.insert(shard, leader);
        }
    }
}

/// The metadata group's shard id.
pub const META_SHARD: u64 = 0;
/// Voters of the metadata group, at most (the other nodes are learners).
pub const META_VOTERS_MAX: usize = 5;
/// System key prefix of shard records in the metadata group.
pub const SHARD_RECORD_PREFIX: &[u8] = b"shard/";

/// System key prefix of preferred-leader choices in the metadata group:
/// `leader/` + shard id (u64be) → node id (u64be). Set by an operator
/// (`Admin.SetPreferredLeader`, `phctl cluster balance`); a shard without
/// one keeps the bootstrap map's preferred leader.
pub const PREFERRED_LEADER_PREFIX: &[u8] = b"leader/";

/// A per-shard system key in the metadata group: `prefix | shard_id:
/// u64be` (storage-format.md lists the prefixes).
pub fn shard_key(prefix: &[u8], shard: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&shard.to_be_bytes());
    k
}

/// The system key of `shard`'s preferred-leader choice.
pub fn preferred_leader_key(shard: u64) -> Vec<u8> {
    shard_key(PREFERRED_LEADER_PREFIX, shard)
}

/// Shard → preferred leader from the metadata group's choices; a value or
/// key of the wrong size is skipped (the bootstrap choice stays).
pub fn decode_preferred_leaders(records: &[pigeonhole_engine::SystemValue]) -> BTreeMap<u64, u64> {
    records
        .iter()
        .filter_map(|v| {
            let shard = v
                .key
                .get(PREFERRED_LEADER_PREFIX.len()..)?
                .try_into()
                .ok()
                .map(u64::from_be_bytes)?;
            let node = v.value.as_slice().try_into().ok().map(u64::from_be_bytes)?;
            Some((shard, node))
        })
        .collect()
}

/// The system key of `shard`'s record.
pub fn shard_record_key(shard: u64) -> Vec<u8> {
    shard_key(SHARD_RECORD_PREFIX, shard)
}

/// Voters and learners of the metadata group for these nodes.
pub fn meta_members(cluster: &InitialCluster) -> (Vec<u64>, Vec<u64>) {
    let ids = cluster.ids();
    let split = ids.len().min(META_VOTERS_MAX);
    let (v, l) = ids.split_at(split);
    (v.to_vec(), l.to_vec())
}

/// One shard's place in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardDesc {
    /// Shard id (≥ 1).
    pub id: u64,
    /// First hash in the shard's range.
    pub range_start: u64,
    /// First hash after the range; `None` = the range runs to `u64::MAX`.
    pub range_end: Option<u64>,
    /// Voting replicas.
    pub replicas: Vec<u64>,
    /// Non-voting replicas (catching up before promotion).
    pub learners: Vec<u64>,
    /// The last known leader (0 = unknown).
    pub leader_hint: u64,
    /// The node that should lead it when healthy.
    pub preferred_leader: u64,
    /// Splits the shard came out of or went through (0: none, a bootstrap
    /// shard; see `ShardRecord.epoch`).
    pub epoch: u64,
    /// The shard it was split from (0: a bootstrap shard).
    pub parent: u64,
}

/// The whole map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    /// Shards ordered by `range_start`.
    pub shards: Vec<ShardDesc>,
    /// Node id → raft transport address.
    pub nodes: BTreeMap<u64, String>,
}

impl ShardMap {
    /// The map every node derives at bootstrap.
    pub fn bootstrap(cluster: &InitialCluster, shard_count: u64, replication_factor: usize) -> ShardMap {
        let ids = cluster.ids();
        let n = ids.len().max(1);
        let rf = replication_factor.clamp(1, n);
        let shards = (0..shard_count)
            .map(|i| {
                let (range_start, range_end) = equal_range(i, shard_count);
                let first = usize::try_from(i).unwrap_or(0) % n;
                let replicas: Vec<u64> = (0..rf).filter_map(|k| ids.get((first + k) % n).copied()).collect();
                ShardDesc {
                    id: i + 1,
                    range_start,
                    range_end,
                    preferred_leader: replicas.first().copied().unwrap_or(0),
                    replicas,
                    learners: Vec::new(),
                    leader_hint: 0,
                    epoch: 0,
                    parent: 0,
                }
            })
            .collect();
        ShardMap {
            shards,
            nodes: cluster.nodes.clone(),
        }
    }

    /// This map with the replicated records laid over it. Records of shards
    /// the map does not know, or that do not decode, are skipped (a newer
    /// node may write fields this one ignores; unknown shards come with
    /// splits, a later issue).
    pub fn overlay(&self, records: &[pigeonhole_engine::SystemValue]) -> ShardMap {
        let mut out = self.clone();
        let mut added = false;
        for rec in records {
            let Ok(r) = ShardRecord::decode(rec.value.as_slice()) else {
                continue;
            };
            if r.shard == META_SHARD {
                continue;
            }
            match out.shards.iter_mut().find(|s| s.id == r.shard) {
                Some(s) => {
                    s.replicas = r.voters;
                    s.learners = r.learners;
                    s.leader_hint = r.leader_hint;
                    // A split narrows a shard's range (D38).
                    if r.epoch >= s.epoch {
                        s.range_start = r.range_start;
                        s.range_end = r.range_end;
                        s.epoch = r.epoch;
                    }
                }
                // A shard made by a split.
                None => {
                    out.shards.push(ShardDesc {
                        id: r.shard,
                        range_start: r.range_start,
                        range_end: r.range_end,
                        preferred_leader: r.preferred_leader,
                        replicas: r.voters,
                        learners: r.learners,
                        leader_hint: r.leader_hint,
                        epoch: r.epoch,
                        parent: r.parent,
                    });
                    added = true;
                }
            }
        }
        if added {
            out.shards.sort_by_key(|s| (s.range_start, s.id));
        }
        // A split's two records are written by two leaders, so one may land
        // first: a shard whose range reaches past the next shard's start has
        // not had its narrowed record yet. Ranges are only ever cut (no
        // merge), so its range ends where the next begins.
        for i in 1..out.shards.len() {
            let next_start = out.shards.get(i).map(|s| s.range_start);
            if let (Some(prev), Some(next_start)) = (out.shards.get_mut(i - 1), next_start) {
                if prev.range_end.is_none_or(|e| e > next_start) && prev.range_start < next_start {
                    prev.range_end = Some(next_start);
                }
            }
        }
        out
    }

    /// The shard that holds `user_id`'s mailboxes.
    pub fn shard_for_user(&self, user_id: &[u8]) -> Option<&ShardDesc> {
        self.shard_for_hash(user_hash(user_id))
    }

    /// The shard whose range contains `hash`.
    pub fn shard_for_hash(&self, hash: u64) -> Option<&ShardDesc> {
        let i = self.shards.partition_point(|s| s.range_start <= hash);
        let s = self.shards.get(i.checked_sub(1)?)?;
        match s.range_end {
            Some(end) if hash >= end => None,
            _ => Some(s),
        }
    }

    /// The shard with id `id`.
    pub fn shard(&self, id: u64) -> Option<&ShardDesc> {
        self.shards.iter().find(|s| s.id == id)
    }

    /// Ids of the shards with a replica on `node`.
    pub fn shards_on(&self, node: u64) -> Vec<u64> {
        self.shards
            .iter()
            .filter(|s| s.replicas.contains(&node))
            .map(|s| s.id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: u64) -> InitialCluster {
        InitialCluster {
            nodes: (1..=n).map(|i| (i, format!("127.0.0.1:{}", 7000 + i))).collect(),
        }
    }

    #[test]
    fn every_hash_has_exactly_one_shard() {
        let m = ShardMap::bootstrap(&cluster(3), 64, 3);
        for h in [
            0u64,
            1,
            u64::MAX / 64,
            u64::MAX / 64 + 1,
            u64::MAX / 2,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let s = m.shard_for_hash(h).unwrap();
            assert!(s.range_start <= h && s.range_end.is_none_or(|e| h < e));
        }
        assert_eq!(m.shard_for_hash(0).unwrap().id, 1);
        assert_eq!(m.shard_for_hash(u64::MAX).unwrap().id, 64);
    }

    #[test]
    fn leaders_and_replicas_spread() {
        let m = ShardMap::bootstrap(&cluster(5), 64, 3);
        let mut leads = BTreeMap::<u64, usize>::new();
        let mut holds = BTreeMap::<u64, usize>::new();
        for s in &m.shards {
            assert_eq!(s.replicas.len(), 3);
            let mut r = s.replicas.clone();
            r.dedup();
            assert_eq!(r.len(), 3, "replicas on distinct nodes");
            *leads.entry(s.preferred_leader).or_default() += 1;
            for n in &s.replicas {
                *holds.entry(*n).or_default() += 1;
            }
        }
        assert!(leads.values().all(|c| (12..=13).contains(c)), "{leads:?}");
        assert!(holds.values().all(|c| (38..=39).contains(c)), "{holds:?}");
        // Replication factor is capped at the node count.
        let one = ShardMap::bootstrap(&cluster(1), 4, 3);
        assert!(one.shards.iter().all(|s| s.replicas == vec![1]));
    }

    fn record(r: ShardRecord) -> pigeonhole_engine::SystemValue {
        pigeonhole_engine::SystemValue {
            key: shard_record_key(r.shard),
            version: r.term,
            value: r.encode_to_vec(),
        }
    }

    /// Split records laid over the bootstrap map: the new shard appears in
    /// range order, the parent narrows whether its own record came yet or
    /// not, and an older record (a lower epoch) never widens it again.
    #[test]
    fn split_records_tile_the_space_in_any_order() {
        let base = ShardMap::bootstrap(&cluster(3), 2, 3);
        let child = ShardRecord {
            shard: 3,
            range_start: 1 << 62,
            range_end: Some(1 << 63),
            voters: vec![1, 2, 3],
            epoch: 1,
            parent: 1,
            term: 4,
            ..Default::default()
        };
        let parent_new = ShardRecord {
            shard: 1,
            range_start: 0,
            range_end: Some(1 << 62),
            voters: vec![1, 2, 3],
            epoch: 1,
            term: 4,
            ..Default::default()
        };
        let parent_old = ShardRecord {
            shard: 1,
            range_start: 0,
            range_end: Some(1 << 63),
            voters: vec![1, 2, 3],
            term: 3,
            ..Default::default()
        };
        for records in [
            vec![record(child.clone())],
            vec![record(child.clone()), record(parent_new.clone())],
            vec![record(parent_old.clone()), record(child.clone())],
        ] {
            let m = base.overlay(&records);
            let layout: Vec<(u64, u64, Option<u64>)> =
                m.shards.iter().map(|s| (s.id, s.range_start, s.range_end)).collect();
            assert_eq!(
                layout,
                vec![(1, 0, Some(1 << 62)), (3, 1 << 62, Some(1 << 63)), (2, 1 << 63, None)],
                "{records:?}"
            );
            assert_eq!(m.shard_for_hash((1 << 62) + 5).unwrap().id, 3);
            assert_eq!(m.shard_for_hash(5).unwrap().id, 1);
            assert_eq!(m.shard(3).unwrap().parent, 1);
        }
        // The driver lays records over its own map, already narrowed by the
        // split it applied: a stale record of the parent leaves it narrow.
        let narrowed = base.overlay(&[record(child.clone()), record(parent_new)]);
        let again = narrowed.overlay(&[record(parent_old)]);
        assert_eq!(again.shard(1).unwrap().range_end, Some(1 << 62));
    }
}
