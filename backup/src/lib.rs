//! # pigeonhole-backup
//!
//! The on-disk format of a Pigeonhole backup, in one place for its three
//! users: `phctl backup create` writes it, `phctl backup verify` checks it
//! offline, and `pigeonhole restore` reads it into a new cluster
//! (docs/operations.md "Backup and restore"; the byte layout is in
//! docs/storage-format.md §13).
//!
//! A backup is a directory:
//! - one shard file per shard (the metadata group, shard 0, included):
//!   the shard's snapshot chunks exactly as the node streamed them
//!   (`Admin.BackupShard`), each framed with its length. Every chunk keeps
//!   its own crc32, and every stored value inside it its own crc;
//! - `MANIFEST.json`: per shard its range, the applied index and term the
//!   state is consistent at, counts, size and the file's SHA-256;
//! - `MANIFEST.sha256`: the SHA-256 of `MANIFEST.json`.
//!
//! Why shaped so: the shard files are the snapshot stream the nodes already
//! produce, check and ingest (one format, tested by every replica move),
//! so a restore is the ingest a lagging replica does. The manifest is
//! written last, so a directory without one is an unfinished backup and
//! is refused. Checks here are everything that can be checked without the
//! storage engine (checksums, framing, chunk headers against the
//! manifest, ranges that tile the hash space); the restore decodes every
//! record on top.
//!
//! A leaf crate, like `pigeonhole-tls`: phctl links it without the engine.

mod frame;
mod manifest;
mod shard_file;

pub use frame::{parse_frame, FrameHeader, FRAME_BYTES_MAX};
pub use manifest::{
    file_name, Manifest, ShardEntry, FORMAT, FORMAT_VERSION, MANIFEST_FILE, MANIFEST_SUM_FILE, SHARDS_MAX, SHARD_ID_MAX,
};
pub use shard_file::{read_shard, verify, ShardFileWriter, VerifyReport, WrittenShard};

/// What can go wrong with a backup. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not what the manifest or the format says.
    #[error("{path}: corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    /// The manifest is missing or does not describe a usable backup.
    #[error("{path}: {reason}")]
    Manifest { path: String, reason: String },
}

impl BackupError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> BackupError {
        BackupError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &std::path::Path, reason: impl Into<String>) -> BackupError {
        BackupError::Corrupt {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn manifest(path: &std::path::Path, reason: impl Into<String>) -> BackupError {
        BackupError::Manifest {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// Lower-case hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` durably: a temporary file, fsync, rename, and
/// an fsync of the directory.
pub(crate) fn write_durably(path: &std::path::Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = create_private(&tmp)?;
    f.write_all(bytes).map_err(|e| BackupError::io(&tmp, e))?;
    f.sync_all().map_err(|e| BackupError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| BackupError::io(path, e))?;
    sync_dir(path)
}

/// Creates (or truncates) `path` readable by its owner only: a backup
/// holds every message and the access-control state.
pub(crate) fn create_private(path: &std::path::Path) -> Result<std::fs::File, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| BackupError::io(path, e))
}

/// Creates `dir` (and its parents) for a backup, readable by its owner
/// only.
pub fn create_backup_dir(dir: &std::path::Path) -> Result<(), BackupError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| BackupError::io(dir, e))
}

pub(crate) fn sync_dir(path: &std::path::Path) -> Result<(), BackupError> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| BackupError::io(dir, e))?;
    }
    Ok(())
}
