//! Cluster errors, split the way a caller must treat them (as openraft does):
//! retryable ones say "try again, maybe elsewhere" and carry a hint; fatal ones
//! mean this node cannot serve and must be looked at.
//!
//! Retrying a write after a retryable error is always safe for appends,
//! because of idempotency keys: an append whose first attempt did commit
//! returns the original seq on the retry.

use pigeonhole_engine::EngineError;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No leader is known for the shard (an election is under way or a
    /// quorum is unreachable) and none appeared within the wait limit.
    #[error("shard {shard}: no leader within {waited_ms} ms")]
    NoLeader {
        /// The shard.
        shard: u64,
        /// How long the request waited.
        waited_ms: u64,
    },
    /// The request reached its deadline. For a write, the outcome is unknown:
    /// it may still commit, so retry with the same idempotency key.
    #[error("shard {shard}: {what} timed out after {waited_ms} ms; outcome unknown, retry is safe")]
    Timeout {
        /// The shard.
        shard: u64,
        /// What timed out (proposal, read index, conf change).
        what: &'static str,
        /// How long it waited.
        waited_ms: u64,
    },
    /// The proposal's log entry was replaced by another leader's: it did not
    /// commit. Retry.
    #[error("shard {shard}: proposal was dropped by a leader change; retry")]
    Dropped {
        /// The shard.
        shard: u64,
    },
    /// The shard's leader changed while the proposal was in flight, and the
    /// entries of the new term committed without it: it was most likely
    /// lost (a forward dropped by a leader in transfer, an old leader's
    /// uncommitted tail), but a forward passed on again may still commit.
    /// Outcome unknown: retry with the same idempotency key.
    #[error(
        "shard {shard}: the leader changed (term {term}, leader {leader}) before the proposal committed; \
         outcome unknown, retry is safe"
    )]
    LeaderChanged {
        /// The shard.
        shard: u64,
        /// The term whose entries committed without the proposal.
        term: u64,
        /// The leader this replica knows of, 0 if none.
        leader: u64,
    },
    /// The call needs the shard's leader and this replica is not it.
    #[error("shard {shard}: this replica is not the leader (leader hint: {leader}, 0 = unknown)")]
    NotLeader {
        /// The shard.
        shard: u64,
        /// The leader this replica knows of, 0 if none.
        leader: u64,
    },
    /// The shard cannot take this now (e.g. another membership change is
    /// still being applied). Retry later.
    #[error("shard {shard} is busy: {reason}")]
    Busy {
        /// The shard.
        shard: u64,
        /// What it is busy with.
        reason: String,
    },
    /// No such shard exists in the cluster: not a retryable condition, the
    /// id is wrong.
    #[error("shard {shard} does not exist (the cluster has shards {first} to {last})")]
    NoSuchShard {
        /// The id asked for.
        shard: u64,
        /// The lowest data shard id.
        first: u64,
        /// The highest data shard id.
        last: u64,
    },
    /// This node holds no replica of the shard.
    #[error("shard {shard} has no replica on node {node}; replicas are on {replicas:?}")]
    NotReplica {
        /// The shard.
        shard: u64,
        /// This node.
        node: u64,
        /// Voters of the shard as this node last learnt them (its copy of
        /// the shard's record; the bootstrap layout without one), the last
        /// known leader first. Empty when not known.
        replicas: Vec<u64>,
    },
    /// The node's inbox is full: it is overloaded. Retry with backoff.
    #[error("node {node} is overloaded: its inbox of {capacity} requests is full")]
    Overloaded {
        /// This node.
        node: u64,
        /// The inbox capacity.
        capacity: usize,
    },
    /// The request is malformed (names the field and the limit).
    #[error("invalid argument {field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// The rule broken.
        reason: String,
    },
    /// The request is well formed but the cluster's state forbids it (e.g.
    /// removing a node that still holds replicas). Not retryable as is.
    #[error("refused: {reason}")]
    Refused {
        /// Why, and what would make it possible.
        reason: String,
    },
    /// The node is shutting down or its driver stopped.
    #[error("node is stopped")]
    Stopped,
    /// The storage engine failed; the replica stopped. Fatal.
    #[error("storage engine: {0}")]
    Engine(#[from] EngineError),
    /// raft-rs refused a call (a bug or a misuse). Fatal.
    #[error("raft: {0}")]
    Raft(String),
    /// Node configuration is invalid. Fatal at start.
    #[error("config: {0}")]
    Config(String),
    /// I/O outside the engine (identity file, snapshot spool). Fatal.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl ClusterError {
    /// Whether retrying (after a backoff, perhaps on another node) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClusterError::NoLeader { .. }
                | ClusterError::Timeout { .. }
                | ClusterError::Dropped { .. }
                | ClusterError::LeaderChanged { .. }
                | ClusterError::NotLeader { .. }
                | ClusterError::Busy { .. }
                | ClusterError::Overloaded { .. }
                | ClusterError::NotReplica { .. }
        )
    }
}
