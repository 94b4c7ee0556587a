//! Checking `Admin.ChangeMembership` requests and reading their outcome:
//! which changes a request names (each refused with the field and the
//! limit), and whether the configuration Raft applied shows a change
//! (raft-rs refuses some changes at apply time without an error). Pure
//! functions, apart from `admin.rs`'s service so they have unit tests of
//! their own.

use super::admin::MEMBERSHIP_CHANGES_MAX;
use super::status::invalid;
use crate::MembershipChange;
use pigeonhole_proto::v1 as pb;
use tonic::Status;

/// Checks a ChangeMembership request's changes; `known` says whether a node
/// id is in the cluster.
pub(super) fn membership_changes(
    items: &[pb::MembershipChange],
    known: impl Fn(u64) -> bool,
) -> Result<Vec<MembershipChange>, Status> {
    if items.is_empty() || items.len() > MEMBERSHIP_CHANGES_MAX {
        return Err(invalid(
            "changes",
            format!("{} changes; 1 to {MEMBERSHIP_CHANGES_MAX} are allowed", items.len()),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    items
        .iter()
        .map(|c| {
            if c.node == 0 || !known(c.node) {
                return Err(invalid("changes", format!("node {} is not in the cluster", c.node)));
            }
            if !seen.insert(c.node) {
                return Err(invalid("changes", format!("node {} is named twice", c.node)));
            }
            match pb::MembershipChangeKind::try_from(c.kind) {
                Ok(pb::MembershipChangeKind::AddLearner) => Ok(MembershipChange::AddLearner(c.node)),
                Ok(pb::MembershipChangeKind::AddVoter) => Ok(MembershipChange::AddVoter(c.node)),
                Ok(pb::MembershipChangeKind::Remove) => Ok(MembershipChange::Remove(c.node)),
                _ => Err(invalid(
                    "changes",
                    format!("node {}: the kind is unset or unknown", c.node),
                )),
            }
        })
        .collect()
}

/// Whether the configuration after a change shows it (raft-rs leaves the
/// configuration as it was when it refuses a change at apply time). A
/// removed voter may still be an outgoing voter of a joint configuration.
pub(super) fn took_effect(c: &MembershipChange, cs: &pigeonhole_engine::raft::eraftpb::ConfState) -> bool {
    match *c {
        MembershipChange::AddLearner(n) => cs.learners.contains(&n) || cs.learners_next.contains(&n),
        MembershipChange::AddVoter(n) => cs.voters.contains(&n),
        MembershipChange::Remove(n) => !cs.voters.contains(&n) && !cs.learners.contains(&n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: pb::MembershipChangeKind, node: u64) -> pb::MembershipChange {
        pb::MembershipChange {
            kind: kind as i32,
            node,
        }
    }

    #[test]
    fn membership_requests_are_checked_and_name_the_field() {
        use pb::MembershipChangeKind::{AddLearner, AddVoter, Remove, Unspecified};
        let known = |n: u64| (1..=4).contains(&n);
        let ok = membership_changes(&[item(AddVoter, 4), item(Remove, 1)], known).unwrap();
        assert_eq!(ok, vec![MembershipChange::AddVoter(4), MembershipChange::Remove(1)]);
        let bad: Vec<(Vec<pb::MembershipChange>, &str)> = vec![
            (vec![], "0 changes"),
            ((1..=9).map(|n| item(AddLearner, n)).collect(), "9 changes"),
            (vec![item(AddLearner, 7)], "node 7 is not in the cluster"),
            (vec![item(AddLearner, 0)], "node 0 is not in the cluster"),
            (vec![item(AddLearner, 2), item(Remove, 2)], "named twice"),
            (vec![item(Unspecified, 2)], "kind is unset"),
        ];
        for (items, want) in bad {
            let s = membership_changes(&items, known).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(
                s.message().contains("changes") && s.message().contains(want),
                "{}",
                s.message()
            );
        }
    }

    #[test]
    fn a_change_raft_refused_is_seen_in_the_configuration() {
        use pigeonhole_engine::raft::eraftpb::ConfState;
        let joint = ConfState {
            voters: vec![2, 3, 4],
            voters_outgoing: vec![1, 2, 3],
            ..Default::default()
        };
        assert!(took_effect(&MembershipChange::AddVoter(4), &joint));
        assert!(
            took_effect(&MembershipChange::Remove(1), &joint),
            "an outgoing voter is removed"
        );
        let unchanged = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        assert!(
            !took_effect(&MembershipChange::Remove(1), &unchanged),
            "the last voter stays"
        );
        assert!(!took_effect(&MembershipChange::AddLearner(2), &unchanged));
    }
}
