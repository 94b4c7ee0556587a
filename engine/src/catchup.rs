//! Replicas that must catch up from their peers before they vote again
//! (D49): the durable list, one key per shard in the `default` CF.
//!
//! Why a list at all: damage found in the Raft log (§8.5) can take
//! entries, a term or a vote this replica acknowledged. The salvaged log
//! is a whole prefix, but a replica that votes with it could elect a
//! leader that lacks an entry committed with its own lost acknowledgement.
//! So the node marks the shard here, durably, before the salvaged state
//! is durable, and the driver keeps the replica out of elections until it
//! has caught up past what its leader had committed after the damage was
//! found; then it clears the mark. The list lives in the `default` CF,
//! written through the WAL with a sync, because the `data` CF is written
//! without the WAL and a mark must survive a crash the moment it is made.

use crate::codec;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::keys::CF_META;
use rocksdb::{WriteBatch, WriteOptions, DB};

/// Key prefix of a shard's mark: this, then the shard id as `u64be`.
pub(crate) const CATCH_UP_PREFIX: &[u8] = b"pigeonhole/catch-up/";
/// Bytes of a mark's reason kept, at most (a damage description names a
/// file and an offset; a longer one is cut).
pub const CATCH_UP_REASON_BYTES_MAX: usize = 512;

fn key(shard: u64) -> Vec<u8> {
    let mut k = CATCH_UP_PREFIX.to_vec();
    k.extend_from_slice(&shard.to_be_bytes());
    k
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// Marks `shards` as catching up, with `reason`, in one synced write.
pub(crate) fn mark(db: &DB, shards: &[u64], reason: &str) -> Result<(), EngineError> {
    let cf = db
        .cf_handle(CF_META)
        .ok_or_else(|| EngineError::InvalidCall(format!("column family {CF_META} is missing")))?;
    let mut cut = reason.len().min(CATCH_UP_REASON_BYTES_MAX);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = reason.get(..cut).unwrap_or_default();
    let mut wb = WriteBatch::default();
    for shard in shards {
        let k = key(*shard);
        wb.put_cf(cf, &k, codec::seal(&k, reason.as_bytes()));
    }
    db.write_opt(wb, &synced())?;
    Ok(())
}

impl Engine {
    /// The shards marked as catching up, ascending, each with why.
    pub fn catching_up(&self) -> Result<Vec<(u64, String)>, EngineError> {
        let db = self.db();
        let cf = db
            .cf_handle(CF_META)
            .ok_or_else(|| EngineError::InvalidCall(format!("column family {CF_META} is missing")))?;
        let mut out = Vec::new();
        let mut it = db.raw_iterator_cf(cf);
        it.seek(CATCH_UP_PREFIX);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some(id) = k.strip_prefix(CATCH_UP_PREFIX) else {
                break;
            };
            let shard = <[u8; 8]>::try_from(id)
                .map(u64::from_be_bytes)
                .map_err(|_| EngineError::corruption(CF_META, k, "catch-up key without an 8-byte shard id"))?;
            let reason = codec::open(CF_META, k, v)?;
            out.push((shard, String::from_utf8_lossy(reason).into_owned()));
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Marks `shard` as catching up (durable when this returns).
    pub fn mark_catching_up(&self, shard: u64, reason: &str) -> Result<(), EngineError> {
        mark(self.db(), &[shard], reason)
    }

    /// Clears `shard`'s mark (durable when this returns): it has caught up.
    pub fn caught_up(&self, shard: u64) -> Result<(), EngineError> {
        let db = self.db();
        let cf = db
            .cf_handle(CF_META)
            .ok_or_else(|| EngineError::InvalidCall(format!("column family {CF_META} is missing")))?;
        db.delete_cf_opt(cf, key(shard), &synced())?;
        Ok(())
    }
}
