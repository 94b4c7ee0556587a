//! # pigeonhole-engine
//!
//! The storage engine every shard replica runs: the deterministic mailbox
//! state machine, in ONE RocksDB per node that holds many shards, and the
//! Raft log store, in ONE segmented log per node. It does no networking;
//! the cluster crate drives it.
//!
//! Why this shape:
//! - **One log per node, not per shard**, so the node can persist the Raft
//!   Ready of many shards in one record with one fdatasync (group commit,
//!   [`RaftBatch`] + [`Engine::write_raft`]); and not in RocksDB, so a log
//!   entry is written once instead of through a WAL, a memtable, a flush and
//!   a compaction (D28).
//! - **Each shard is one contiguous key range** (the shard id prefixes every
//!   key), so a snapshot is a range scan ([`Engine::export_snapshot`]) and an
//!   ingest a range replace ([`Engine::ingest_snapshot`]).
//! - **Apply is deterministic and idempotent** ([`Engine::apply`]): the
//!   applied index is written in the same WriteBatch as the effects, and time
//!   comes from the command, never from the replica's clock.
//! - **Every value is checksummed** (crc32 over key and body) and checked on
//!   read; corruption is a typed [`EngineError::Corruption`] naming the key.
//!
//! Module map: [`keys`] (key layout), `codec` (value framing), [`decoders`]
//! (every stored-bytes decoder, for the fuzz targets), `records`
//! (record types), `apply` (the state machine), `heads` (mailbox heads
//! cached in memory, so appends read nothing), `read` (Sync and cursors),
//! `raftlog` (raft-rs `Storage` over the segment files), `snapshot` (export and ingest). The format
//! is documented byte by byte in docs/storage-format.md.

mod apply;
mod catchup;
mod codec;
pub mod decoders;
mod engine;
mod error;
mod format;
mod heads;
pub mod keys;
mod library;
mod limits;
mod outcome;
mod raftlog;
mod read;
mod records;
mod restore;
mod size;
mod snapshot;
mod split;
mod trim;
mod txn;

pub use apply::{ApplyEntry, EntryKind, EntryOutcome, OpOutput};
pub use catchup::CATCH_UP_REASON_BYTES_MAX;
pub use engine::{
    Durability, Engine, EngineOptions, DEDUP_PREFETCH_MIN_APPENDS_DEFAULT, HEADS_CACHED_PER_SHARD_DEFAULT,
};
pub use error::{EngineError, HexKey, OpError, ReadError};
pub use format::FORMAT_VERSION;
pub use heads::{HEAD_ROW_EVERY_APPENDS, HEAD_ROW_EVERY_APPENDS_MAX};
pub use library::{rocksdb_library, RocksDbLibrary};
pub use limits::{mailbox_fingerprint, Limits, DEDUP_WINDOW_MS_MAX, RETAIN_MAILBOXES_MAX, RETAIN_MESSAGES_MAX};
pub use raftlog::{
    conf_state_holds, conf_state_with_voters, LogFilesOptions, LogRecovery, LogStats, RaftBatch, RaftLogStore,
    SNAPSHOT_DATA_MAGIC,
};
pub use read::{Cursors, MailboxInfo, ReadMessage, SyncPage, SyncQuery, SystemValue};
pub use records::{HashRange, ShardMeta, ShardState};
pub use restore::RESTORE_SYSTEM_VALUES_MAX;
pub use size::{Memtables, ShardSize, SizeScan};
pub use snapshot::{SnapshotChunk, SnapshotIngest, SnapshotSummary, CHUNK_BYTES_MAX};
pub use split::SPACE_PRIVATE_MIN;

/// The Raft command types (`pigeonhole.internal.v1`), re-exported so callers
/// build commands without naming the proto crate.
pub use pigeonhole_proto::internal::v1 as command;
/// raft-rs, as the engine links it.
pub use raft;
