//! Errors, split the way a caller must react to them (after openraft's
//! fatal/retryable split):
//!
//! - [`EngineError`]: the replica itself is in trouble (I/O failure, a value
//!   that fails its checksum, an apply out of order). The node must stop
//!   serving the shard; retrying the same call will not help.
//! - [`OpError`]: one operation was rejected by the state machine. This is a
//!   deterministic *result*: every replica computes the same one, the applied
//!   index still moves, and the client gets a typed status.
//! - [`ReadError`]: a read could not be served as asked (a trimmed cursor,
//!   bad arguments) or hit an [`EngineError`].

use std::fmt;

/// A fatal error: the engine cannot complete the call and the shard's replica
/// must not keep serving as if nothing happened.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// RocksDB reported an error (I/O, out of space, ...).
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value failed its checksum or could not be decoded.
    #[error("corruption in column family {cf} at key {key}: {reason}")]
    Corruption {
        /// The column family holding the key.
        cf: &'static str,
        /// The key, hex-encoded.
        key: HexKey,
        /// What was wrong.
        reason: String,
    },
    /// Entries were handed to `apply` out of order, or with a gap.
    #[error("shard {shard}: apply out of order: applied index is {applied}, next entry is {index}")]
    ApplyOutOfOrder {
        /// The shard.
        shard: u64,
        /// The shard's applied index.
        applied: u64,
        /// The first index that is neither applied nor the next one.
        index: u64,
    },
    /// The shard is being replaced by a snapshot (or an ingest was
    /// interrupted): it must be ingested again before it is served.
    #[error("shard {0} is incomplete: a snapshot ingest is in progress or was interrupted")]
    ShardIncomplete(u64),
    /// The shard has never been bootstrapped nor ingested on this node.
    #[error("shard {0} does not exist on this node")]
    NoSuchShard(u64),
    /// A caller broke an engine API contract (e.g. a shard id out of range, a
    /// log append with a gap). A bug in the caller, reported instead of a panic.
    #[error("invalid engine call: {0}")]
    InvalidCall(String),
    /// A Raft snapshot older than the log's compacted prefix was applied.
    #[error("shard {shard}: snapshot at index {index} is older than the log's first index {first_index}")]
    SnapshotOutOfDate {
        /// The shard.
        shard: u64,
        /// The snapshot's index.
        index: u64,
        /// The log's first index.
        first_index: u64,
    },
    /// Reading or writing the Raft log's files failed. After a failed write
    /// or fsync the log refuses every later write until the node restarts
    /// and recovers from what is on disk.
    #[error("raft log: {0}")]
    LogIo(String),
    /// A snapshot chunk stream was malformed.
    #[error("snapshot stream for shard {shard}: {reason}")]
    Snapshot {
        /// The shard being ingested.
        shard: u64,
        /// What was wrong.
        reason: String,
    },
}

impl EngineError {
    pub(crate) fn corruption(cf: &'static str, key: &[u8], reason: impl Into<String>) -> Self {
        EngineError::Corruption {
            cf,
            key: HexKey(key.to_vec()),
            reason: reason.into(),
        }
    }
}

/// A key printed as hex, so a corruption error names the exact key.
#[derive(Clone, PartialEq, Eq)]
pub struct HexKey(pub Vec<u8>);

impl fmt::Display for HexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for HexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HexKey({self})")
    }
}

/// A deterministic rejection of one operation. It is part of the replicated
/// result, so it must not depend on anything but the command and the state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// A field broke a limit or a format rule. `field` is the request field's
    /// name (e.g. `mailbox.namespace`), `reason` states the limit.
    #[error("invalid argument {field}: {reason}")]
    InvalidArgument {
        /// The field, as named in pigeonhole.v1.
        field: &'static str,
        /// The rule that was broken, with the limit.
        reason: String,
    },
    /// `expected_last_seq` did not match.
    #[error("expected_last_seq {expected} does not match last_seq {actual}")]
    ExpectedLastSeqMismatch {
        /// What the caller expected.
        expected: u64,
        /// The mailbox's actual last seq.
        actual: u64,
    },
    /// The idempotency key is known for this mailbox, but with another payload.
    #[error("idempotency key already used for seq {seq} with a different payload")]
    IdempotencyKeyReused {
        /// The seq the key belongs to.
        seq: u64,
    },
    /// An ack named a seq above the mailbox's last seq.
    #[error("ack seq {seq} is beyond last_seq {last_seq}")]
    AckBeyondLastSeq {
        /// The acked seq.
        seq: u64,
        /// The mailbox's last seq.
        last_seq: u64,
    },
    /// The mailbox already has the maximum number of device cursors.
    #[error("mailbox has {limit} device cursors, the maximum")]
    TooManyCursors {
        /// The limit.
        limit: u32,
    },
    /// A trim named a seq above the mailbox's last seq.
    #[error("trim up_to_seq {up_to_seq} is beyond last_seq {last_seq}")]
    TrimBeyondLastSeq {
        /// The requested bound.
        up_to_seq: u64,
        /// The mailbox's last seq.
        last_seq: u64,
    },
    /// A delete named a seq that is not stored.
    #[error("seq {seq} not found: stored range is [{low_watermark}, {last_seq}]")]
    SeqNotFound {
        /// The requested seq.
        seq: u64,
        /// Lowest stored seq.
        low_watermark: u64,
        /// Highest seq.
        last_seq: u64,
    },
    /// A PutSystem carried an older version than the stored one.
    #[error("system value version {given} is older than the stored version {stored}")]
    StaleVersion {
        /// The op's version.
        given: u64,
        /// The stored version.
        stored: u64,
    },
    /// A PutSystem's `if_version` did not match the stored version.
    #[error("system value version is {stored}, not the expected {expected}")]
    VersionConflict {
        /// The op's `if_version`.
        expected: u64,
        /// The stored version (0: no value).
        stored: u64,
    },
    /// The Raft entry's bytes are not a valid command. Every op of it fails.
    #[error("malformed command: {0}")]
    MalformedCommand(String),
    /// Trim or Delete of a mailbox under a legal hold (D43).
    #[error("mailbox is under a legal hold: trims and deletes are refused until it is released")]
    LegalHold,
    /// The op's mailbox is not in the shard's hash range: a split gave it
    /// to another shard after the caller's map was read. Retryable with a
    /// fresh shard map.
    #[error("mailbox is not in shard {shard}'s hash range {range}: the shard was split; route again")]
    WrongShard {
        /// The shard that refused.
        shard: u64,
        /// Its hash range now.
        range: crate::records::HashRange,
    },
}

/// Why a read could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The cursor is below the low watermark: messages after it were trimmed.
    #[error("cursor {after_seq} is below the low watermark {low_watermark}: those messages were trimmed")]
    CursorTrimmed {
        /// The cursor asked for.
        after_seq: u64,
        /// The lowest stored seq.
        low_watermark: u64,
    },
    /// The cursor is above the mailbox's last seq.
    #[error("cursor {after_seq} is beyond last_seq {last_seq}")]
    CursorAhead {
        /// The cursor asked for.
        after_seq: u64,
        /// The mailbox's last seq.
        last_seq: u64,
    },
    /// A request field broke a limit.
    #[error("invalid argument {field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// The limit broken.
        reason: String,
    },
    /// The mailbox is not in the shard's hash range: a split gave it to
    /// another shard. Retryable with a fresh shard map.
    #[error("mailbox is not in shard {shard}'s hash range {range}: the shard was split; route again")]
    WrongShard {
        /// The shard asked.
        shard: u64,
        /// Its hash range now.
        range: crate::records::HashRange,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl EngineError {
    /// Whether this is damage to the state machine's files (RocksDB's
    /// checksums, or a value's own, failed): the node cannot serve that
    /// state, and rebuilds it from its peers (docs/decisions.md D50).
    /// Damage to the Raft log is not this: the log's recovery skips it at
    /// the next open (D49).
    pub fn is_state_damage(&self) -> bool {
        match self {
            EngineError::Rocks(e) => e.kind() == rocksdb::ErrorKind::Corruption,
            EngineError::Corruption { cf, .. } => *cf != "raft-log",
            _ => false,
        }
    }

    /// Whether this is damage to the Raft log's files found after the
    /// open (a restart's recovery salvages it, D49).
    pub fn is_log_damage(&self) -> bool {
        matches!(self, EngineError::Corruption { cf, .. } if *cf == "raft-log")
    }
}

impl From<rocksdb::Error> for ReadError {
    fn from(e: rocksdb::Error) -> Self {
        ReadError::Engine(EngineError::Rocks(e))
    }
}

impl From<OpError> for ReadError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::InvalidArgument { field, reason } => ReadError::InvalidArgument { field, reason },
            other => ReadError::InvalidArgument {
                field: "request",
                reason: other.to_string(),
            },
        }
    }
}
