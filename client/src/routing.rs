//! The client's copy of the shard map, and how it picks a node for a
//! request. Pure data: no I/O, so every routing rule is unit-tested.
//!
//! A user id's shard is the one whose hash range holds
//! `pigeonhole_proto::placement::user_hash(user_id)` — the same function the
//! server places mailboxes with. A request goes to the shard's leader when
//! one is known (one hop: a follower would forward a write to the leader
//! anyway), else to its replicas in turn. The map is refreshed from
//! `Admin.GetShardMap` when requests fail; a leader hint in an
//! UNAVAILABLE status updates one shard at once, and so do the leader
//! hints a node adds to a write it answered for a shard it does not lead
//! (`pigeonhole_proto::hints`, D55).

use pigeonhole_proto::placement::{range_contains, user_hash};
use pigeonhole_proto::v1 as pb;
use std::collections::BTreeMap;

/// One shard as the client routes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRoute {
    /// The shard id.
    pub id: u64,
    /// Hash range start (inclusive).
    pub range_start: u64,
    /// Hash range end (exclusive); `None` = to `u64::MAX` inclusive.
    pub range_end: Option<u64>,
    /// Voting replicas (node ids).
    pub replicas: Vec<u64>,
    /// Last known leader; 0 = unknown.
    pub leader: u64,
}

/// The routing table: nodes and shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// Node id → `host:port`.
    pub nodes: BTreeMap<u64, String>,
    /// Shards ordered by `range_start`.
    pub shards: Vec<ShardRoute>,
}

impl Routing {
    /// The table from a GetShardMap answer. Refuses a map whose ranges do
    /// not tile the whole hash space: routing on such a map could send a
    /// user to the wrong shard.
    pub fn from_map(m: &pb::GetShardMapResponse) -> Result<Routing, String> {
        let mut shards: Vec<ShardRoute> = m
            .shards
            .iter()
            .map(|s| ShardRoute {
                id: s.id,
                range_start: s.range_start,
                range_end: s.range_end,
                replicas: s.replicas.clone(),
                leader: s.leader_hint,
            })
            .collect();
        shards.sort_by_key(|s| s.range_start);
        let mut next = Some(0u64);
        for s in &shards {
            if Some(s.range_start) != next {
                return Err(format!(
                    "shard map has a gap or overlap at shard {} (starts at {:#x})",
                    s.id, s.range_start
                ));
            }
            next = s.range_end;
        }
        if shards.is_empty() || next.is_some() {
            return Err("shard map does not cover the whole hash space".into());
        }
        Ok(Routing {
            nodes: m.nodes.iter().map(|n| (n.id, n.address.clone())).collect(),
            shards,
        })
    }

    /// The shard a user id lives on.
    pub fn shard_for(&self, user_id: &[u8]) -> Option<&ShardRoute> {
        let h = user_hash(user_id);
        // Ranges are sorted and tile the space: the last one starting at or
        // below h holds it.
        let i = self.shards.partition_point(|s| s.range_start <= h).checked_sub(1)?;
        self.shards
            .get(i)
            .filter(|s| range_contains(s.range_start, s.range_end, h))
    }

    /// A shard by id.
    pub fn shard(&self, id: u64) -> Option<&ShardRoute> {
        self.shards.iter().find(|s| s.id == id)
    }

    /// Records that `leader` leads `shard` (from a status's leader hint).
    pub fn set_leader(&mut self, shard: u64, leader: u64) {
        if let Some(s) = self.shards.iter_mut().find(|s| s.id == shard) {
            s.leader = leader;
        }
    }

    /// Applies the leader hints of a write's answer (`(shard, leader)`,
    /// from `pigeonhole_proto::hints`). Returns true when one names a node
    /// this map does not hold as a replica of that shard, or a shard it
    /// does not have: the map is old and worth refreshing. Such a hint is
    /// not applied (the map could not route to that node, or would route
    /// a split-off range wrongly).
    pub fn apply_leader_hints(&mut self, hints: &[(u64, u64)]) -> bool {
        let mut stale = false;
        for &(shard, leader) in hints {
            let known =
                self.nodes.contains_key(&leader) && self.shard(shard).is_some_and(|s| s.replicas.contains(&leader));
            if known {
                self.set_leader(shard, leader);
            } else {
                stale = true;
            }
        }
        stale
    }

    /// The node to try on attempt `attempt` (0-based) for `shard`: the known
    /// leader first, then every replica in turn, skipping nodes in `avoid`
    /// (recently unreachable) unless all are. `None` if the shard has no
    /// replica with an address.
    pub fn pick(&self, shard: &ShardRoute, attempt: u32, avoid: &[u64]) -> Option<u64> {
        let mut order: Vec<u64> = Vec::with_capacity(shard.replicas.len() + 1);
        if shard.leader != 0 {
            order.push(shard.leader);
        }
        order.extend(shard.replicas.iter().filter(|r| **r != shard.leader));
        order.retain(|n| self.nodes.contains_key(n));
        let usable: Vec<u64> = order.iter().copied().filter(|n| !avoid.contains(n)).collect();
        let from = if usable.is_empty() { &order } else { &usable };
        if from.is_empty() {
            return None;
        }
        let i = usize::try_from(attempt).unwrap_or(0) % from.len();
        from.get(i).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_hints_move_known_leaders_and_flag_an_old_map() {
        let mut r = Routing::from_map(&map([1, 2])).unwrap();
        let (a, b) = (r.shards[0].id, r.shards[1].id);
        assert!(!r.apply_leader_hints(&[(a, 3), (b, 1)]));
        assert_eq!((r.shard(a).unwrap().leader, r.shard(b).unwrap().leader), (3, 1));
        // A node the map does not know, one that is not the shard's
        // replica, a shard it does not have: not applied, the map is old.
        r.shards[0].replicas.retain(|n| *n != 2);
        for hint in [(a, 9), (a, 2), (99, 1)] {
            assert!(r.apply_leader_hints(&[hint]), "{hint:?}");
        }
        assert_eq!(r.shard(a).unwrap().leader, 3, "kept");
    }

    fn map(leaders: [u64; 2]) -> pb::GetShardMapResponse {
        pb::GetShardMapResponse {
            nodes: (1..=3)
                .map(|id| pb::NodeInfo {
                    id,
                    address: format!("127.0.0.1:{}", 7070 + id),
                    state: pb::NodeState::Up as i32,
                    zone: String::new(),
                    leaders_only: false,
                })
                .collect(),
            shards: vec![
                pb::ShardInfo {
                    id: 2,
                    range_start: 1 << 63,
                    range_end: None,
                    replicas: vec![2, 3, 1],
                    learners: vec![],
                    leader_hint: leaders[1],
                    epoch: 0,
                    parent: 0,
                },
                pb::ShardInfo {
                    id: 1,
                    range_start: 0,
                    range_end: Some(1 << 63),
                    replicas: vec![1, 2, 3],
                    learners: vec![],
                    leader_hint: leaders[0],
                    epoch: 0,
                    parent: 0,
                },
            ],
        }
    }

    #[test]
    fn users_route_by_the_placement_hash() {
        let r = Routing::from_map(&map([0, 0])).unwrap();
        for u in ["alice", "bob", "carol", ""] {
            let h = user_hash(u.as_bytes());
            let s = r.shard_for(u.as_bytes()).unwrap();
            assert_eq!(s.id, if h < (1 << 63) { 1 } else { 2 }, "{u}");
        }
    }

    #[test]
    fn a_map_with_a_hole_is_refused() {
        let mut m = map([0, 0]);
        m.shards[0].range_start += 1;
        assert!(Routing::from_map(&m).is_err());
        let mut m = map([0, 0]);
        m.shards[0].range_end = Some(u64::MAX);
        assert!(Routing::from_map(&m).is_err(), "the last range must be open");
        assert!(Routing::from_map(&pb::GetShardMapResponse::default()).is_err());
    }

    #[test]
    fn the_leader_comes_first_then_replicas_and_down_nodes_last() {
        let mut r = Routing::from_map(&map([0, 3])).unwrap();
        let s1 = r.shard(1).unwrap().clone();
        assert_eq!(
            (0..3).map(|a| r.pick(&s1, a, &[]).unwrap()).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let s2 = r.shard(2).unwrap().clone();
        assert_eq!(r.pick(&s2, 0, &[]), Some(3), "leader hint first");
        assert_eq!(r.pick(&s2, 0, &[3]), Some(2), "an unreachable leader is skipped");
        assert_eq!(r.pick(&s2, 0, &[1, 2, 3]), Some(3), "all down: try anyway");
        r.set_leader(1, 2);
        assert_eq!(r.pick(r.shard(1).unwrap(), 0, &[]), Some(2));
    }
}
