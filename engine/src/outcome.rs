//! The types of apply's input and output: the committed entries handed to
//! `Engine::apply` and what each entry and op produced. Kept apart from the
//! state machine (`apply`) so that callers read the contract in one place.

use crate::error::OpError;
use raft::eraftpb::ConfState;

/// One committed Raft entry handed to [`Engine::apply`].
#[derive(Debug, Clone)]
pub struct ApplyEntry<'a> {
    /// The entry's Raft index.
    pub index: u64,
    /// The entry's Raft term.
    pub term: u64,
    /// What the entry carries.
    pub kind: EntryKind<'a>,
}

/// The payload of a committed entry, as far as the state machine cares.
#[derive(Debug, Clone)]
pub enum EntryKind<'a> {
    /// No command (e.g. the empty entry a new leader appends).
    Empty,
    /// An encoded `pigeonhole.internal.v1.Command`: the Raft entry's own
    /// buffer, so decoding it copies no payload (the append's payload is a
    /// slice of it until the message record is built).
    Command(&'a bytes::Bytes),
    /// A configuration change; the node computed the resulting ConfState
    /// with raft-rs and the engine records it with the applied index, so that
    /// a snapshot carries the configuration of exactly its index.
    ConfChange(ConfState),
}

/// What applying one entry produced.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryOutcome {
    /// At or below the applied index: skipped, nothing changed.
    AlreadyApplied,
    /// An empty entry or a configuration change: only the index moved.
    Applied,
    /// The entry's bytes are not a valid command; nothing but the index moved.
    Rejected(OpError),
    /// A command: one result per op, in op order.
    Command {
        /// The shard time the command ran at (ms since the Unix epoch).
        time_ms: u64,
        /// Per-op results.
        results: Vec<Result<OpOutput, OpError>>,
        /// [`crate::mailbox_fingerprint`]s of the mailboxes whose messages
        /// or low watermark this command changed (an append that stored, a
        /// trim, a delete), in op order, possibly repeated: the node wakes
        /// only the readers that follow these.
        changed: Vec<u64>,
    },
}

/// The successful result of one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutput {
    /// Append: the seq (the original one if `duplicate`).
    Appended {
        /// The message's seq.
        seq: u64,
        /// The key was seen before; nothing was written.
        duplicate: bool,
        /// The message's commit time.
        time_ms: u64,
    },
    /// Ack: the cursor after the op.
    Acked {
        /// The device's cursor.
        cursor: u64,
        /// Whether it moved.
        advanced: bool,
    },
    /// Trim: the new low watermark.
    Trimmed {
        /// Lowest stored seq after the trim.
        low_watermark: u64,
        /// Messages removed by this op.
        removed: u64,
    },
    /// Delete: whether this op made the tombstone.
    Deleted {
        /// False if the message already was a tombstone.
        deleted: bool,
    },
    /// PutSystem: the value was stored at this version.
    SystemPut {
        /// The stored version.
        version: u64,
    },
    /// ExpireDedup: entries removed.
    DedupExpired {
        /// Dedup entries removed.
        removed: u64,
    },
    /// Retain: what one retention op did (D43).
    Retained {
        /// Mailboxes examined.
        mailboxes: u64,
        /// Messages removed.
        removed: u64,
        /// The encoded mailbox id the next op starts at; None when the pass
        /// reached the namespace's last mailbox.
        next: Option<Vec<u8>>,
    },
    /// Hold: the mailbox's legal hold after the op.
    Held {
        /// Whether the mailbox is held now.
        held: bool,
        /// False if it already was in that state.
        changed: bool,
    },
    /// Split: the new shard exists on this replica, holding `range`, at
    /// this entry's index.
    Split {
        /// The new shard's id.
        new_shard: u64,
        /// The user hashes it took.
        range: crate::records::HashRange,
        /// False if the new shard was already here (a snapshot of it
        /// arrived before this replica applied the split): only the
        /// parent's range shrank, and the parent's rows of the new range
        /// were deleted.
        created: bool,
    },
}
