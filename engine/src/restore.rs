//! Offline restore: a shard replica built from a backup's snapshot stream
//! (`pigeonhole restore`, docs/operations.md "Backup and restore").
//!
//! A backup holds each shard's state machine at one applied index, taken
//! from a replica of another cluster. The restored replica starts exactly
//! as a bootstrapped one does (raft-rs's "initial configuration"), only at
//! the backup's index and term instead of 5/5: apply state at that index,
//! an empty Raft log truncated there, and a configuration of the NEW
//! cluster's nodes, which replaces the one in the stream. Every replica of
//! the new cluster runs the same restore from the same backup, so they
//! start identical, as bootstrapped replicas do, and elect a leader at a
//! higher term.
//!
//! Not crash-safe on its own, and it needs none: it runs before the node
//! ever serves, and the caller (`pigeonhole restore`) marks the data
//! directory incomplete until every shard is in, so a crash leaves a
//! directory that refuses to start and is restored again from scratch.

use crate::codec;
use crate::engine::{Durability, Engine};
use crate::error::EngineError;
use crate::keys::{self, CF_DATA};
use crate::read::SystemValue;
use crate::snapshot::SnapshotIngest;
use rocksdb::WriteBatch;

/// System values a restore puts in one batch, at most (a metadata group
/// holds one shard record per shard, up to 65,536, plus a few).
pub const RESTORE_SYSTEM_VALUES_MAX: usize = 1 << 20;

impl Engine {
    /// Creates `shard` here at `index`/`term` with `conf_state` and
    /// returns the ingest that fills it from a backup stream of the same
    /// index and term; the stream's configuration is replaced by
    /// `conf_state`. Fails if the shard already exists here.
    pub fn restore_shard(
        &self,
        shard: u64,
        conf_state: raft::eraftpb::ConfState,
        index: u64,
        term: u64,
    ) -> Result<SnapshotIngest, EngineError> {
        self.bootstrap_shard(shard, conf_state.clone(), index, term)?;
        let mut ingest = self.ingest_snapshot(shard)?;
        ingest.conf_state = Some(conf_state);
        Ok(ingest)
    }

    /// Rewrites a restored shard's system values outside Raft: drops every
    /// one whose key `keep` refuses, then puts `puts` (key without the
    /// shard prefix, version, value), all in one fsync'd batch. Only for a
    /// restore, before the node serves: every replica must make the same
    /// edit, and nothing else may write the shard meanwhile.
    pub fn restore_system_values(
        &self,
        shard: u64,
        keep: impl Fn(&[u8]) -> bool,
        puts: &[SystemValue],
    ) -> Result<(), EngineError> {
        if puts.len() > RESTORE_SYSTEM_VALUES_MAX {
            return Err(EngineError::InvalidCall(format!(
                "{} system values exceed the restore limit of {RESTORE_SYSTEM_VALUES_MAX}",
                puts.len()
            )));
        }
        let space = self.shard_meta(shard)?.ok_or(EngineError::NoSuchShard(shard))?.space;
        let cf = self.cf(CF_DATA)?;
        let mut wb = WriteBatch::default();
        for v in self.system_scan(shard, b"", usize::MAX)? {
            if !keep(&v.key) {
                wb.delete_cf(cf, keys::system(space, &v.key));
            }
        }
        for v in puts {
            if v.key.is_empty() || v.key.len() > crate::records::SYSTEM_KEY_BYTES_MAX {
                return Err(EngineError::InvalidCall(format!(
                    "system key of {} bytes is outside 1..={}",
                    v.key.len(),
                    crate::records::SYSTEM_KEY_BYTES_MAX
                )));
            }
            let k = keys::system(space, &v.key);
            let body = crate::records::encode_system(v.version, &v.value);
            wb.put_cf(cf, &k, codec::seal(&k, &body));
        }
        self.write_data(wb, Durability::Fsync)
    }
}
