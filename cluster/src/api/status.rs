//! Errors as gRPC statuses: the code tells a client what to do, and the
//! google.rpc details (tonic-types' rich error model) carry what it needs to
//! do it, as `proto/pigeonhole/v1/mailbox.proto` specifies:
//!
//! | code | when | details |
//! | --- | --- | --- |
//! | INVALID_ARGUMENT | bad input | BadRequest naming the field and the limit |
//! | FAILED_PRECONDITION | expected_last_seq mismatch, trimmed cursor | ErrorInfo: `last_seq`, `low_watermark` |
//! | ALREADY_EXISTS | an idempotency key reused with another payload | ErrorInfo: `seq` of the original |
//! | OUT_OF_RANGE | a seq or cursor above last_seq | ErrorInfo: `last_seq` |
//! | NOT_FOUND | delete of a seq not stored | ErrorInfo: `low_watermark`, `last_seq` |
//! | RESOURCE_EXHAUSTED | too many device cursors | ErrorInfo: `limit` |
//! | UNAVAILABLE | retryable: election, unreachable or busy node | ErrorInfo: `leader_hint` when known |
//! | UNAVAILABLE | retryable: a split gave the mailbox to another shard (`WRONG_SHARD`) | ErrorInfo: `shard`, `range_start`, `range_end` (absent: through the last hash) |
//! | DEADLINE_EXCEEDED | the write's outcome is unknown; retry with the same key | — |
//! | INTERNAL | a fatal node error | — |

use crate::error::ClusterError;
use pigeonhole_engine::{EngineError, OpError, ReadError};
use std::collections::HashMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The ErrorInfo domain of every Pigeonhole error.
pub const ERROR_DOMAIN: &str = "pigeonhole.v1";

fn info(code: Code, message: String, reason: &str, meta: &[(&str, u64)]) -> Status {
    let metadata: HashMap<String, String> = meta.iter().map(|(k, v)| ((*k).to_string(), v.to_string())).collect();
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

/// A bad request field.
pub fn invalid(field: &str, reason: impl Into<String>) -> Status {
    let reason = reason.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid argument {field}: {reason}"),
        ErrorDetails::with_bad_request_violation(field, reason),
    )
}

/// The status of a per-op rejection by the state machine.
pub fn op_error(e: &OpError) -> Status {
    let msg = e.to_string();
    match e {
        OpError::InvalidArgument { field, reason } => invalid(field, reason.clone()),
        OpError::ExpectedLastSeqMismatch { actual, .. } => info(
            Code::FailedPrecondition,
            msg,
            "EXPECTED_LAST_SEQ_MISMATCH",
            &[("last_seq", *actual)],
        ),
        // mailbox.proto: the key already names another message.
        OpError::IdempotencyKeyReused { seq } => {
            info(Code::AlreadyExists, msg, "IDEMPOTENCY_KEY_REUSED", &[("seq", *seq)])
        }
        OpError::AckBeyondLastSeq { last_seq, .. } | OpError::TrimBeyondLastSeq { last_seq, .. } => {
            info(Code::OutOfRange, msg, "BEYOND_LAST_SEQ", &[("last_seq", *last_seq)])
        }
        OpError::TooManyCursors { limit } => info(
            Code::ResourceExhausted,
            msg,
            "TOO_MANY_CURSORS",
            &[("limit", u64::from(*limit))],
        ),
        OpError::SeqNotFound {
            low_watermark,
            last_seq,
            ..
        } => info(
            Code::NotFound,
            msg,
            "SEQ_NOT_FOUND",
            &[("low_watermark", *low_watermark), ("last_seq", *last_seq)],
        ),
        OpError::WrongShard { shard, range } => wrong_shard(msg, *shard, *range),
        OpError::LegalHold => info(Code::FailedPrecondition, msg, "LEGAL_HOLD", &[]),
        OpError::StaleVersion { .. } | OpError::VersionConflict { .. } | OpError::MalformedCommand(_) => {
            Status::internal(msg)
        }
    }
}

/// The mailbox left the shard in a split (D38): retryable once the caller
/// routes with a newer map; the shard's range now says which half it kept.
fn wrong_shard(msg: String, shard: u64, range: pigeonhole_engine::HashRange) -> Status {
    wrong_shard_owned(msg, shard, range, None)
}

/// [`wrong_shard`] with the new map entry of the shard that holds the
/// mailbox now (as the answering node's map has it): `owner_shard`,
/// `owner_range_start`, `owner_range_end` (absent: to the top),
/// `owner_epoch` and `owner_leader_hint` (0: unknown), so a caller can
/// route again without re-reading the whole map (TiKV's EpochNotMatch
/// carries the new regions the same way).
pub fn wrong_shard_owned(
    msg: String,
    shard: u64,
    range: pigeonhole_engine::HashRange,
    owner: Option<&crate::placement::ShardDesc>,
) -> Status {
    let mut meta = vec![("shard", shard), ("range_start", range.start)];
    if let Some(end) = range.end {
        meta.push(("range_end", end));
    }
    if let Some(o) = owner.filter(|o| o.id != shard) {
        meta.extend([
            ("owner_shard", o.id),
            ("owner_range_start", o.range_start),
            ("owner_epoch", o.epoch),
            ("owner_leader_hint", o.leader_hint),
        ]);
        if let Some(end) = o.range_end {
            meta.push(("owner_range_end", end));
        }
    }
    info(Code::Unavailable, msg, "WRONG_SHARD", &meta)
}

/// [`op_error`] for an op at `prefix` in the request (e.g. `items[3].`):
/// a bad field is named by its full path (`items[3].payload`).
pub fn op_error_at(prefix: &str, e: &OpError) -> Status {
    match e {
        OpError::InvalidArgument { field, reason } => invalid(&format!("{prefix}{field}"), reason.clone()),
        other => op_error(other),
    }
}

/// The status of a failed read.
pub fn read_error(e: &ReadError) -> Status {
    if let ReadError::Engine(engine) = e {
        // Damage to this node's files: the read fails, and the node
        // rebuilds them from its peers (D50).
        crate::damage::check(engine);
    }
    let msg = e.to_string();
    match e {
        ReadError::CursorTrimmed { low_watermark, .. } => info(
            Code::FailedPrecondition,
            msg,
            "CURSOR_TRIMMED",
            &[("low_watermark", *low_watermark)],
        ),
        ReadError::CursorAhead { last_seq, .. } => {
            info(Code::OutOfRange, msg, "CURSOR_AHEAD", &[("last_seq", *last_seq)])
        }
        ReadError::InvalidArgument { field, reason } => invalid(field, reason.clone()),
        ReadError::WrongShard { shard, range } => wrong_shard(msg, *shard, *range),
        // Not here (no replica on this node), or being replaced by a
        // snapshot: temporary, another replica can serve it.
        ReadError::Engine(EngineError::NoSuchShard(_)) => info(Code::Unavailable, msg, "NOT_REPLICA", &[]),
        ReadError::Engine(EngineError::ShardIncomplete(_)) => info(Code::Unavailable, msg, "SHARD_INCOMPLETE", &[]),
        ReadError::Engine(_) => Status::internal(msg),
    }
}

/// A local (STALE) read reached a node without a replica of `shard`:
/// NOT_REPLICA, as a proposal's answer, with `leader_hint` = a node that
/// holds one (the last known leader first; 0 = unknown).
pub fn not_replica_read(shard: u64, hint: u64) -> Status {
    info(
        Code::Unavailable,
        format!("shard {shard} has no replica on this node; read from node {hint} (0 = unknown) or route again"),
        "NOT_REPLICA",
        &[("leader_hint", hint)],
    )
}

/// [`read_error`] for the request field `field`: the message names it.
pub fn read_error_at(field: &str, e: &ReadError) -> Status {
    let s = read_error(e);
    let mut out = Status::with_details(
        s.code(),
        format!("{field}: {}", s.message()),
        s.details().to_vec().into(),
    );
    out.metadata_mut().clone_from(s.metadata());
    out
}

/// An admin call that must reach the shard's leader reached another node.
pub fn not_leader_precondition(shard: u64, leader: u64) -> Status {
    info(
        Code::FailedPrecondition,
        format!("shard {shard}: this node is not its leader; call the leader (hint: node {leader}, 0 = unknown)"),
        "NOT_LEADER",
        &[("leader_hint", leader)],
    )
}

/// A Subscribe stream ends: this node's replica of `shard` has no leader
/// (cut off from it, or no longer a replica). Retryable, on another node.
pub fn no_leader_here(shard: u64, node: u64) -> Status {
    info(
        Code::Unavailable,
        format!(
            "shard {shard} has no leader reachable from node {node}; resubscribe from the last seq received, on another node"
        ),
        "NO_LEADER",
        &[],
    )
}

/// The status of a cluster-level failure.
pub fn cluster_error(e: &ClusterError) -> Status {
    let msg = e.to_string();
    match e {
        ClusterError::InvalidArgument { field, reason } => invalid(field, reason.clone()),
        ClusterError::NotLeader { leader, .. } => {
            info(Code::Unavailable, msg, "NOT_LEADER", &[("leader_hint", *leader)])
        }
        ClusterError::NotReplica { replicas, .. } => info(
            Code::Unavailable,
            msg,
            "NOT_REPLICA",
            &[("leader_hint", replicas.first().copied().unwrap_or(0))],
        ),
        ClusterError::NoSuchShard { shard, .. } => info(Code::NotFound, msg, "NO_SUCH_SHARD", &[("shard", *shard)]),
        ClusterError::NoLeader { .. } => info(Code::Unavailable, msg, "NO_LEADER", &[]),
        ClusterError::Dropped { .. } => info(Code::Unavailable, msg, "DROPPED", &[]),
        ClusterError::LeaderChanged { leader, .. } => {
            info(Code::Unavailable, msg, "LEADER_CHANGED", &[("leader_hint", *leader)])
        }
        ClusterError::Overloaded { .. } => info(Code::Unavailable, msg, "OVERLOADED", &[]),
        ClusterError::Busy { .. } => info(Code::Unavailable, msg, "BUSY", &[]),
        ClusterError::Timeout { .. } => Status::deadline_exceeded(msg),
        ClusterError::Stopped => Status::unavailable(msg),
        ClusterError::Refused { .. } => Status::failed_precondition(msg),
        ClusterError::Engine(_) | ClusterError::Raft(_) | ClusterError::Config(_) | ClusterError::Io(_) => {
            Status::internal(msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_what_the_client_needs() {
        let s = op_error(&OpError::ExpectedLastSeqMismatch { expected: 3, actual: 7 });
        assert_eq!(s.code(), Code::FailedPrecondition);
        let d = s.get_error_details();
        let ei = d.error_info().unwrap();
        assert_eq!(ei.metadata.get("last_seq").map(String::as_str), Some("7"));

        let s = read_error(&ReadError::CursorTrimmed {
            after_seq: 1,
            low_watermark: 10,
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            s.get_error_details()
                .error_info()
                .unwrap()
                .metadata
                .get("low_watermark")
                .map(String::as_str),
            Some("10")
        );

        let s = invalid("mailbox.namespace", "at most 64 bytes");
        assert_eq!(s.code(), Code::InvalidArgument);
        let br = s.get_error_details();
        let v = &br.bad_request().unwrap().field_violations[0];
        assert_eq!(
            (v.field.as_str(), v.description.as_str()),
            ("mailbox.namespace", "at most 64 bytes")
        );

        let s = cluster_error(&ClusterError::NotLeader { shard: 1, leader: 3 });
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.get_error_details()
                .error_info()
                .unwrap()
                .metadata
                .get("leader_hint")
                .map(String::as_str),
            Some("3")
        );
        let s = cluster_error(&ClusterError::Timeout {
            shard: 1,
            what: "proposal",
            waited_ms: 5,
        });
        assert_eq!(s.code(), Code::DeadlineExceeded);
        let s = read_error(&ReadError::Engine(EngineError::NoSuchShard(4)));
        assert_eq!(
            s.code(),
            Code::Unavailable,
            "a stale read on a node without the shard is retryable"
        );
        let s = read_error(&ReadError::Engine(EngineError::ShardIncomplete(4)));
        assert_eq!(s.code(), Code::Unavailable);
    }

    /// A request that a split routed away: retryable, with the refusing
    /// shard's range and the entry of the shard that holds the mailbox now.
    #[test]
    fn wrong_shard_carries_the_new_map_entry() {
        let lower = pigeonhole_engine::HashRange {
            start: 0,
            end: Some(1 << 62),
        };
        let owner = crate::placement::ShardDesc {
            id: 5,
            range_start: 1 << 62,
            range_end: Some(1 << 63),
            replicas: vec![1, 2, 3],
            learners: vec![],
            leader_hint: 2,
            preferred_leader: 2,
            epoch: 1,
            parent: 1,
        };
        let s = wrong_shard_owned("moved".into(), 1, lower, Some(&owner));
        assert_eq!(s.code(), Code::Unavailable);
        let info = s.get_error_details().error_info().unwrap().clone();
        assert_eq!(info.reason, "WRONG_SHARD");
        let m = |k: &str| info.metadata.get(k).cloned();
        assert_eq!(m("shard").as_deref(), Some("1"));
        assert_eq!(m("range_end"), Some((1u64 << 62).to_string()));
        assert_eq!(m("owner_shard").as_deref(), Some("5"));
        assert_eq!(m("owner_range_start"), Some((1u64 << 62).to_string()));
        assert_eq!(m("owner_range_end"), Some((1u64 << 63).to_string()));
        assert_eq!(m("owner_epoch").as_deref(), Some("1"));
        assert_eq!(m("owner_leader_hint").as_deref(), Some("2"));
        // Without an owner (not in this node's map yet): the range alone.
        let s = op_error(&OpError::WrongShard { shard: 1, range: lower });
        let info = s.get_error_details().error_info().unwrap().clone();
        assert_eq!(info.reason, "WRONG_SHARD");
        assert!(!info.metadata.contains_key("owner_shard"));
    }
}
