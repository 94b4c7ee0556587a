//! `Admin.BackupShard`: one shard's state for `phctl backup create`.
//!
//! The export is the snapshot machinery replica moves use
//! ([`pigeonhole_engine::Engine::export_snapshot`]): one RocksDB snapshot
//! of this node's replica, consistent at exactly one applied index, while
//! apply goes on. A read barrier (ReadIndex through the shard's leader)
//! comes first, so that index covers every write acknowledged before the
//! call: a backup started after an acknowledgement holds it, whichever
//! replica serves the export.
//!
//! The engine's exporter is blocking and runs on the blocking pool; a
//! small channel keeps it at most a few chunks ahead of the client, so a
//! slow reader holds a snapshot, not the shard's data in memory.

use super::status::{cluster_error, invalid};
use crate::{ClusterError, Node};
use pigeonhole_engine::EngineError;
use pigeonhole_proto::v1 as pb;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Bytes per frame when the request leaves it 0.
pub const BACKUP_CHUNK_BYTES_DEFAULT: usize = 1 << 20;
/// The largest `chunk_bytes` a request may ask for (a frame also holds
/// at least one whole record, up to the payload limit, past it).
pub const BACKUP_CHUNK_BYTES_MAX: usize = 16 << 20;
/// Frames exported ahead of the client, at most.
const FRAMES_AHEAD_MAX: usize = 4;
/// Exports a node serves at once, at most: each holds a RocksDB snapshot
/// (old SST files cannot be deleted while it lives) and a blocking thread
/// for as long as its client reads. More are UNAVAILABLE (reason BUSY).
pub const BACKUP_EXPORTS_MAX: usize = 4;

fn exports() -> &'static std::sync::Arc<tokio::sync::Semaphore> {
    static EXPORTS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    EXPORTS.get_or_init(|| std::sync::Arc::new(tokio::sync::Semaphore::new(BACKUP_EXPORTS_MAX)))
}

/// The response stream.
pub type BackupStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::BackupShardResponse, Status>> + Send>>;

/// Checks the request, waits for the read barrier and starts the export.
pub async fn backup_shard(node: &Node, r: pb::BackupShardRequest) -> Result<BackupStream, Status> {
    let chunk_bytes = match usize::try_from(r.chunk_bytes).unwrap_or(usize::MAX) {
        0 => BACKUP_CHUNK_BYTES_DEFAULT,
        n if n > BACKUP_CHUNK_BYTES_MAX => {
            return Err(invalid(
                "chunk_bytes",
                format!("{n} exceeds the limit of {BACKUP_CHUNK_BYTES_MAX}"),
            ))
        }
        n => n,
    };
    let shard = r.shard;
    let permit = exports().clone().try_acquire_owned().map_err(|_| {
        cluster_error(&ClusterError::Busy {
            shard,
            reason: format!("{BACKUP_EXPORTS_MAX} backup exports are under way on this node"),
        })
    })?;
    // NOT_FOUND for a shard the cluster does not have, UNAVAILABLE
    // (NOT_REPLICA) on a node without a replica: the driver answers both.
    node.read_barrier(shard).await.map_err(|e| cluster_error(&e))?;
    let engine = node.engine().clone();
    let (tx, rx) = mpsc::channel::<Result<pb::BackupShardResponse, Status>>(FRAMES_AHEAD_MAX);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut pending: Option<Vec<u8>> = None;
        let res = engine.export_snapshot(shard, chunk_bytes, |chunk| {
            // Each frame is sent once the next one exists, so the summary
            // rides on the last.
            if let Some(frame) = pending.replace(chunk.encode()) {
                tx.blocking_send(Ok(pb::BackupShardResponse { frame, summary: None }))
                    .map_err(|_| EngineError::InvalidCall("backup stream closed".into()))?;
            }
            Ok::<(), EngineError>(())
        });
        let last = match res {
            Ok(s) => Ok(pb::BackupShardResponse {
                frame: pending.unwrap_or_default(),
                summary: Some(pb::BackupShardSummary {
                    applied_index: s.index,
                    applied_term: s.term,
                    chunks: s.chunks,
                    records: s.records,
                    range_start: s.range.start,
                    range_end: s.range.end,
                }),
            }),
            // The client went away (it gave up, or asks another replica).
            Err(_) if tx.is_closed() => {
                tracing::info!(shard, "backup export ended: the client left");
                return;
            }
            Err(e) => {
                tracing::warn!(shard, "backup export failed: {e}");
                Err(cluster_error(&ClusterError::from(e)))
            }
        };
        // The client may have gone away; nothing to do then.
        let _ = tx.blocking_send(last);
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}
