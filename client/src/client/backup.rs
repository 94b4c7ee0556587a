//! Backups in the SDK: the whole shard map (with the split history a
//! backup records) and one shard's export stream (`Admin.BackupShard`).
//! phctl's `backup create` drives them; an operator's surface, like
//! `nodes.rs`.

use super::{with_timeout, Client};
use crate::{pb, Error};

/// The largest frame a BackupShard stream may carry: a 64 MiB chunk and
/// its header (`pigeonhole_backup::FRAME_BYTES_MAX`, plus the message's
/// own framing).
pub const BACKUP_FRAME_BYTES_MAX: usize = (64 << 20) + 4096;

impl Client {
    /// The shard map as any answering node has it, every field included
    /// (`Client::routing` keeps only what routing needs).
    pub async fn shard_map(&self) -> Result<pb::GetShardMapResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(pb::GetShardMapRequest {}, budget);
            async move { admin.get_shard_map(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Starts `shard`'s backup export on `node`, which must hold a replica.
    /// No deadline on the stream as a whole (a large shard takes as long
    /// as it takes): the caller bounds the wait for each message.
    pub async fn backup_shard(
        &self,
        node: u64,
        shard: u64,
        chunk_bytes: u32,
    ) -> Result<tonic::Streaming<pb::BackupShardResponse>, Error> {
        let mut admin = self.admin_at(node)?.max_decoding_message_size(BACKUP_FRAME_BYTES_MAX);
        admin
            .backup_shard(pb::BackupShardRequest { shard, chunk_bytes })
            .await
            .map(tonic::Response::into_inner)
            .map_err(Error::Rejected)
    }
}
