//! The messages between the API side of a node and its driver: what the
//! driver takes from its inbox ([`Inbound`]) and what it answers with
//! ([`ProposeResult`], [`ShardStatus`]). Kept apart so the node's handle,
//! the transport and the driver agree on one vocabulary.

use crate::error::ClusterError;
use crate::transport::Envelope;
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::raft::eraftpb::{ConfChangeV2, ConfState, Message};
use pigeonhole_engine::{OpError, OpOutput};
use std::path::PathBuf;
use std::time::Instant;
use tokio::sync::oneshot;

/// Per-op results of one proposal.
pub type ProposeResult = Result<Vec<Result<OpOutput, OpError>>, ClusterError>;

/// Everything the driver takes from its inbox.
pub(crate) enum Inbound {
    Propose {
        shard: u64,
        ops: Vec<cmd::Op>,
        reply: oneshot::Sender<ProposeResult>,
        deadline: Instant,
        /// The request's stage stamps (`crate::stages`), if it is staged.
        stages: Option<std::sync::Arc<crate::stages::Stages>>,
    },
    Read {
        shard: u64,
        reply: oneshot::Sender<Result<(), ClusterError>>,
        deadline: Instant,
    },
    ConfChange {
        shard: u64,
        cc: ConfChangeV2,
        reply: oneshot::Sender<Result<ConfState, ClusterError>>,
        deadline: Instant,
    },
    TransferLeader {
        shard: u64,
        to: u64,
        reply: oneshot::Sender<Result<(), ClusterError>>,
    },
    Campaign {
        shard: u64,
        reply: oneshot::Sender<Result<(), ClusterError>>,
    },
    /// Clears a replica's catching-up mark (D49); answers why it was set.
    AcceptReplicaLoss {
        shard: u64,
        reply: oneshot::Sender<Result<String, ClusterError>>,
    },
    Status {
        reply: oneshot::Sender<Vec<ShardStatus>>,
    },
    Placement {
        reply: oneshot::Sender<Result<super::PlacementView, ClusterError>>,
    },
    Raft(Envelope),
    SnapshotReady {
        from: u64,
        shard: u64,
        path: PathBuf,
        msg: Message,
    },
    SnapshotReport {
        shard: u64,
        to: u64,
        ok: bool,
    },
    /// A snapshot ingest running on a thread of its own finished
    /// (`snapshot::Ingest`); the driver collects it.
    SnapshotIngested {
        shard: u64,
    },
    /// The state machine was flushed (`ok`): these (shard, applied index)
    /// pairs, taken before the flush began, are durable.
    Flushed {
        applied: Vec<(u64, u64)>,
        ok: bool,
    },
    Stop,
}

/// A replica's state, as [`crate::Node::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u64,
    /// Leader / follower / candidate.
    pub role: Role,
    /// The leader this replica knows of (0 = none).
    pub leader: u64,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Bytes of the log entries handed to apply since the replica started
    /// on this node (a growth signal, not a size).
    pub handed_bytes: u64,
    /// Last log index.
    pub last_index: u64,
    /// First index still in the log (compaction moves it up).
    pub first_index: u64,
    /// Voters of the applied configuration.
    pub voters: Vec<u64>,
    /// Learners of the applied configuration.
    pub learners: Vec<u64>,
    /// In a joint configuration (a membership change is half-way).
    pub joint: bool,
    /// Hibernating: not ticking.
    pub asleep: bool,
    /// Snapshots this replica is sending: (follower, bytes sent so far).
    pub snapshot_sends: Vec<(u64, u64)>,
    /// Catching up after damage to this node's storage, and why: it does
    /// not vote until it holds what its shard had committed (D49).
    pub catching_up: Option<String>,
    /// Which of the node's Raft drivers runs it (`driver::pool`, D65).
    pub driver: usize,
}

/// A replica's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Leads the shard.
    Leader,
    /// Follows a leader (or waits for one).
    Follower,
    /// Campaigning.
    Candidate,
}
