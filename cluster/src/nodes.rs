//! Node states: up, draining, removed, replicated in the metadata group.
//!
//! Why in the metadata group: every node must agree on which nodes may take
//! new replicas and leaderships, and an operator's `phctl node drain` must
//! survive the node it was typed on. The metadata group (shard
//! [`META_SHARD`]) already holds the shard records every node reads its map
//! from, so a node's state is one more system value there (key
//! [`NODE_RECORD_PREFIX`] + id), read locally by every node. A node with no
//! record is up: the nodes of `--initial-cluster` start that way. A node
//! that joined later (`crate::join`) has a record from its first moment,
//! which also carries its address: the records are the cluster's address
//! book beyond the initial cluster ([`joined_addresses`]).
//!
//! The rules ([`check_transition`]) are pure functions of the current state
//! and the shard map, so they are unit-tested here and the service only
//! reads, checks and writes:
//! - up ⇄ draining at any time;
//! - removed only once the node holds no replica (voter or learner) of any
//!   data shard, and never left again (a removed id is not reused, so a
//!   stale replica or message naming it is never mistaken for a new node).
//!
//! What a state changes: a draining or removed node gets no new replica
//! and no leadership through the Admin API (`ChangeMembership`,
//! `TransferLeader`). Moving its leaders and replicas away is `phctl node
//! drain`'s job; a placement loop that would do it by itself is not built.
//! The metadata group itself is kept in line by its leader
//! ([`meta_changes`], run from the driver's tick): a removed node leaves
//! it; learners on up nodes that are alive and caught up are promoted
//! while it has fewer voters than the largest odd number up to
//! [`META_VOTERS_MAX`] its members allow; and, when nothing else is
//! pending, every up node that joined gets a learner.

use crate::placement::{ShardMap, META_SHARD, META_VOTERS_MAX};
use crate::MembershipChange;
use pigeonhole_proto::internal::v1::NodeRecord;
use pigeonhole_proto::v1 as pb;
use prost::Message as _;
use std::collections::BTreeMap;

pub use pb::NodeState;

/// System key prefix of node records in the metadata group.
pub const NODE_RECORD_PREFIX: &[u8] = b"node/";

/// The system key of `node`'s record.
pub fn node_record_key(node: u64) -> Vec<u8> {
    let mut k = NODE_RECORD_PREFIX.to_vec();
    k.extend_from_slice(&node.to_be_bytes());
    k
}

/// Nodes a cluster ever has, at most, removed ones included (ids are never
/// reused): bounds the node-record scans and `Admin.JoinNode`.
pub const NODES_MAX: usize = 1_024;

/// A node's state and the version of the record it came from (0: no record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStateEntry {
    /// The state.
    pub state: NodeState,
    /// The system value's version; the next write uses one more.
    pub version: u64,
    /// host:port of a node that joined (`Admin.JoinNode`); empty for the
    /// nodes of `--initial-cluster`.
    pub address: String,
    /// The joining node's token (0 for initial nodes).
    pub join_token: u64,
    /// Failure domain (`--zone`); empty: none.
    pub zone: String,
    /// Draining of leaderships only: the placement loop keeps its replicas
    /// where they are (`Admin.SetNodeState`'s `leaders_only`).
    pub keep_replicas: bool,
}

impl Default for NodeStateEntry {
    fn default() -> Self {
        NodeStateEntry {
            state: NodeState::Up,
            version: 0,
            address: String::new(),
            join_token: 0,
            zone: String::new(),
            keep_replicas: false,
        }
    }
}

/// Node states from the metadata group's node records. A record that does
/// not decode, or holds an unknown state, is skipped (the node reads as up)
/// rather than failing every map read; records are written only by
/// [`crate::Node::set_node_state`], [`crate::join::admit`] and
/// [`crate::Node::record_zone`].
pub fn decode_states(records: &[pigeonhole_engine::SystemValue]) -> BTreeMap<u64, NodeStateEntry> {
    records
        .iter()
        .filter_map(|v| {
            let r = NodeRecord::decode(v.value.as_slice()).ok()?;
            let state = NodeState::try_from(r.state)
                .ok()
                .filter(|s| *s != NodeState::Unspecified)?;
            Some((
                r.node,
                NodeStateEntry {
                    state,
                    version: v.version,
                    address: r.address,
                    join_token: r.join_token,
                    zone: r.zone,
                    keep_replicas: r.keep_replicas && state == NodeState::Draining,
                },
            ))
        })
        .collect()
}

/// The encoded record of `node` in `state`, keeping what `current` says of
/// its address, join token, zone and (while draining) whether its replicas
/// stay.
pub fn encode_record(node: u64, state: NodeState, current: &NodeStateEntry) -> Vec<u8> {
    NodeRecord {
        node,
        state: state as i32,
        address: current.address.clone(),
        join_token: current.join_token,
        zone: current.zone.clone(),
        keep_replicas: current.keep_replicas && state == NodeState::Draining,
    }
    .encode_to_vec()
}

/// Longest zone name, in bytes.
pub const ZONE_BYTES_MAX: usize = 64;

/// Checks a zone name: empty (no zone), or 1 to [`ZONE_BYTES_MAX`] bytes of
/// ASCII letters, digits, `.`, `_` and `-` (it shows in tables and JSON).
pub fn check_zone(zone: &str) -> Result<(), String> {
    if zone.len() > ZONE_BYTES_MAX {
        return Err(format!("{} bytes; the limit is {ZONE_BYTES_MAX}", zone.len()));
    }
    if let Some(c) = zone
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("{zone:?} has {c:?}; use letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Addresses of the nodes that joined (`Admin.JoinNode`), removed ones
/// included: the map lists them with their state, as it does initial nodes.
pub fn joined_addresses(states: &BTreeMap<u64, NodeStateEntry>) -> impl Iterator<Item = (u64, &str)> {
    states
        .iter()
        .filter(|(_, e)| !e.address.is_empty())
        .map(|(n, e)| (*n, e.address.as_str()))
}

/// Data shards with a replica (voter or learner) on `node`.
pub fn shards_held(map: &ShardMap, node: u64) -> Vec<u64> {
    map.shards
        .iter()
        .filter(|s| s.id != META_SHARD && (s.replicas.contains(&node) || s.learners.contains(&node)))
        .map(|s| s.id)
        .collect()
}

/// Whether `node` may go from `from` to `to`; the error says why not.
pub fn check_transition(map: &ShardMap, node: u64, from: NodeState, to: NodeState) -> Result<(), String> {
    if from == NodeState::Removed && to != NodeState::Removed {
        return Err(format!("node {node} was removed; a removed node never comes back"));
    }
    if to == NodeState::Removed {
        let held = shards_held(map, node);
        if !held.is_empty() {
            return Err(format!(
                "node {node} still holds replicas of shards {held:?}; drain it first (phctl node drain {node}), or if \
                 it is dead, rebuild them elsewhere (phctl node remove {node} --force)"
            ));
        }
    }
    Ok(())
}

/// The membership changes that bring the metadata group in line with the
/// node states: every removed node leaves it, and while it has fewer
/// voters than the largest odd number at most `min(META_VOTERS_MAX,
/// members not removed)`, learners on up nodes that are `caught_up` (alive
/// and holding the committed log) are promoted, lowest id first. Only when
/// none of that is needed, every up node that joined and is not a member
/// gets a learner (additions never ride with a removal or a promotion, so
/// a change that would leave the group short of voters never waits on a
/// node that is still catching up). Empty when there is nothing to do, and when
/// the changes would leave the group without a voter.
pub fn meta_changes(
    voters: &[u64],
    learners: &[u64],
    states: &BTreeMap<u64, NodeStateEntry>,
    caught_up: impl Fn(u64) -> bool,
) -> Vec<MembershipChange> {
    let state = |n: &u64| states.get(n).map_or(NodeState::Up, |e| e.state);
    let removed = |n: &&u64| state(n) == NodeState::Removed;
    let mut changes: Vec<MembershipChange> = voters
        .iter()
        .chain(learners)
        .filter(removed)
        .map(|n| MembershipChange::Remove(*n))
        .collect();
    let kept = voters.iter().filter(|n| !removed(n)).count();
    let members = voters.iter().chain(learners).filter(|n| !removed(n)).count();
    // An odd number of voters: a fourth voter adds a node whose loss, with
    // one other, costs the quorum that three voters would have kept (and a
    // second voter of two makes either node's loss fatal).
    let want = odd_at_most(members.min(META_VOTERS_MAX));
    let mut promote: Vec<u64> = learners
        .iter()
        .copied()
        .filter(|n| state(n) == NodeState::Up && caught_up(*n))
        .collect();
    promote.sort_unstable();
    changes.extend(
        promote
            .into_iter()
            .take(want.saturating_sub(kept))
            .map(MembershipChange::AddVoter),
    );
    let voters_after = kept
        + changes
            .iter()
            .filter(|c| matches!(c, MembershipChange::AddVoter(_)))
            .count();
    if voters_after == 0 {
        return Vec::new();
    }
    if changes.is_empty() {
        let member = |n: &u64| voters.contains(n) || learners.contains(n);
        changes.extend(
            joined_addresses(states)
                .map(|(n, _)| n)
                .filter(|n| state(n) == NodeState::Up && !member(n))
                .map(MembershipChange::AddLearner),
        );
    }
    changes
}

/// The largest odd number at most `n` (0 for 0).
fn odd_at_most(n: usize) -> usize {
    if n % 2 == 0 {
        n.saturating_sub(1)
    } else {
        n
    }
}

/// Whether a node in `state` may take a new replica or a leadership.
pub fn takes_new_work(state: NodeState) -> bool {
    !matches!(state, NodeState::Draining | NodeState::Removed)
}

/// A lower-case name for messages and tables.
pub fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Up => "up",
        NodeState::Draining => "draining",
        NodeState::Removed => "removed",
        NodeState::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::ShardDesc;

    fn map() -> ShardMap {
        let shard = |id, replicas: Vec<u64>, learners: Vec<u64>| ShardDesc {
            id,
            range_start: id,
            range_end: None,
            replicas,
            learners,
            leader_hint: 0,
            preferred_leader: 0,
            epoch: 0,
            parent: 0,
        };
        ShardMap {
            shards: vec![shard(1, vec![1, 2, 3], vec![]), shard(2, vec![1, 2, 3], vec![4])],
            nodes: (1..=5).map(|n| (n, format!("127.0.0.1:{n}"))).collect(),
        }
    }

    #[test]
    fn a_node_is_removed_only_when_it_holds_no_replica_and_never_comes_back() {
        use NodeState::{Draining, Removed, Up};
        let m = map();
        assert_eq!(check_transition(&m, 5, Up, Removed), Ok(()));
        assert_eq!(check_transition(&m, 5, Draining, Removed), Ok(()));
        let voter = check_transition(&m, 1, Draining, Removed).unwrap_err();
        assert!(voter.contains("shards [1, 2]") && voter.contains("drain"), "{voter}");
        let learner = check_transition(&m, 4, Up, Removed).unwrap_err();
        assert!(learner.contains("shards [2]"), "{learner}");
        assert_eq!(check_transition(&m, 1, Up, Draining), Ok(()));
        assert_eq!(check_transition(&m, 1, Draining, Up), Ok(()));
        for to in [Up, Draining] {
            assert!(check_transition(&m, 5, Removed, to)
                .unwrap_err()
                .contains("never comes back"));
        }
        assert!(takes_new_work(Up) && !takes_new_work(Draining) && !takes_new_work(Removed));
    }

    fn states(list: &[(u64, NodeState)]) -> BTreeMap<u64, NodeStateEntry> {
        list.iter()
            .map(|(n, state)| {
                (
                    *n,
                    NodeStateEntry {
                        state: *state,
                        version: 1,
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    /// `list` plus nodes that joined at `address` `127.0.0.1:<id>`.
    fn with_joined(list: &[(u64, NodeState)], joined: &[(u64, NodeState)]) -> BTreeMap<u64, NodeStateEntry> {
        let mut out = states(list);
        for (n, state) in joined {
            out.insert(
                *n,
                NodeStateEntry {
                    state: *state,
                    version: 1,
                    address: format!("127.0.0.1:{n}"),
                    join_token: *n,
                    zone: String::new(),
                    keep_replicas: false,
                },
            );
        }
        out
    }

    const ALL: fn(u64) -> bool = |_| true;

    #[test]
    fn the_metadata_group_drops_removed_nodes_and_refills_its_voters_from_up_learners() {
        use MembershipChange::{AddVoter, Remove};
        use NodeState::{Draining, Removed};
        // Nothing to do.
        assert!(meta_changes(&[1, 2, 3], &[], &states(&[]), ALL).is_empty());
        assert!(meta_changes(&[1, 2, 3, 4, 5], &[6], &states(&[(6, Draining)]), ALL).is_empty());
        // A removed voter of four leaves; no learner to promote.
        assert_eq!(
            meta_changes(&[1, 2, 3, 4], &[], &states(&[(4, Removed)]), ALL),
            vec![Remove(4)]
        );
        // A removed voter of five is replaced by the lowest up learner, not
        // a draining one.
        assert_eq!(
            meta_changes(
                &[1, 2, 3, 4, 5],
                &[8, 7, 6],
                &states(&[(2, Removed), (6, Draining)]),
                ALL
            ),
            vec![Remove(2), AddVoter(7)]
        );
        // A removed learner just leaves.
        assert_eq!(
            meta_changes(&[1, 2, 3], &[4], &states(&[(4, Removed)]), ALL),
            vec![Remove(4)]
        );
        // Voters short of five (an earlier removal) are refilled.
        assert_eq!(meta_changes(&[1, 2, 3, 4], &[5], &states(&[]), ALL), vec![AddVoter(5)]);
        // Never to an even count: three voters and one learner stay so, and
        // one voter is not joined by a second.
        assert!(meta_changes(&[1, 2, 3], &[4], &states(&[]), ALL).is_empty());
        assert!(meta_changes(&[1], &[2], &states(&[]), ALL).is_empty());
        assert_eq!(
            meta_changes(&[1], &[2, 3], &states(&[]), ALL),
            vec![AddVoter(2), AddVoter(3)]
        );
        // ... but not from a learner that has not caught up yet.
        assert!(meta_changes(&[1, 2, 3, 4], &[5], &states(&[]), |n| n != 5).is_empty());
        // Never no voter at all.
        assert!(meta_changes(&[1], &[], &states(&[(1, Removed)]), ALL).is_empty());
    }

    #[test]
    fn nodes_that_joined_get_a_learner_once_nothing_else_is_pending() {
        use MembershipChange::{AddLearner, AddVoter, Remove};
        use NodeState::{Draining, Removed, Up};
        // Joined nodes 4 (up), 5 (draining), 6 (removed), 7 (up, already a
        // learner): only 4 is added.
        let s = with_joined(&[], &[(4, Up), (5, Draining), (6, Removed), (7, Up)]);
        assert_eq!(meta_changes(&[1, 2, 3, 7], &[], &s, ALL), vec![AddLearner(4)]);
        // A promotion goes first; the addition waits for a later round.
        assert_eq!(meta_changes(&[1, 2, 3, 8], &[7], &s, ALL), vec![AddVoter(7)]);
        // So does a removal.
        let s = with_joined(&[(2, Removed)], &[(4, Up)]);
        assert_eq!(meta_changes(&[1, 2, 3, 5, 6], &[], &s, ALL), vec![Remove(2)]);
        // Initial nodes (no address) are never added by this rule.
        assert!(meta_changes(&[1, 2], &[], &states(&[(3, Up)]), ALL).is_empty());
    }

    #[test]
    fn records_decode_to_states_and_bad_records_read_as_up() {
        let value = |node: u64, version: u64, bytes: Vec<u8>| pigeonhole_engine::SystemValue {
            key: node_record_key(node),
            version,
            value: bytes,
        };
        let joined = NodeStateEntry {
            address: "10.0.0.9:7070".into(),
            join_token: 77,
            ..Default::default()
        };
        let states = decode_states(&[
            value(2, 3, encode_record(2, NodeState::Draining, &NodeStateEntry::default())),
            value(3, 1, vec![0xff, 0xff]),
            value(
                4,
                1,
                NodeRecord {
                    node: 4,
                    state: 99,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            value(9, 2, encode_record(9, NodeState::Draining, &joined)),
        ]);
        assert_eq!(
            states.get(&2),
            Some(&NodeStateEntry {
                state: NodeState::Draining,
                version: 3,
                ..Default::default()
            })
        );
        // A state change keeps a joined node's address and token.
        assert_eq!(
            states.get(&9),
            Some(&NodeStateEntry {
                state: NodeState::Draining,
                version: 2,
                ..joined
            })
        );
        assert_eq!(states.len(), 2, "{states:?}");
        assert_eq!(
            joined_addresses(&states).collect::<Vec<_>>(),
            vec![(9, "10.0.0.9:7070")]
        );
        assert!(node_record_key(2).starts_with(NODE_RECORD_PREFIX));
    }

    #[test]
    fn zone_names_are_checked() {
        for ok in ["", "eu-west-1a", "rack_7.row2"] {
            assert_eq!(check_zone(ok), Ok(()), "{ok}");
        }
        assert!(check_zone("a b").unwrap_err().contains("' '"));
        assert!(check_zone("zöne").unwrap_err().contains("'ö'"));
        assert!(check_zone(&"z".repeat(65)).unwrap_err().contains("limit is 64"));
    }

    /// The bytes docs/storage-format.md §7.8 shows for a joined node.
    #[test]
    fn a_joined_nodes_record_has_the_documented_bytes() {
        let entry = NodeStateEntry {
            address: "10.0.0.4:7070".into(),
            join_token: 7,
            ..Default::default()
        };
        let mut want = vec![0x08, 0x04, 0x10, 0x01, 0x1a, 0x0d];
        want.extend_from_slice(b"10.0.0.4:7070");
        want.extend_from_slice(&[0x20, 0x07]);
        assert_eq!(encode_record(4, NodeState::Up, &entry), want);
        assert_eq!(want.len(), 21);
        assert_eq!(node_record_key(4), b"node/\0\0\0\0\0\0\0\x04".to_vec());
    }
}
