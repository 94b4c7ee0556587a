//! `pigeonhole restore --from DIR`: seeds one node of a NEW cluster from a
//! backup (`phctl backup create`; docs/operations.md "Backup and restore").
//!
//! Every node of the new cluster runs it once, with the flags it will then
//! serve with, before its first start. The new cluster may have any number
//! of nodes: the backup holds shards, not replicas. Each node works out the
//! same layout from the same backup and flags (no node asks another, as at
//! bootstrap):
//! - the data shards are the backup's, with its ranges, ids and split
//!   history; a bootstrap shard goes where the new cluster's bootstrap map
//!   puts it, a shard made by a split round-robin by range order;
//! - the metadata group (shard 0) keeps what belongs to the data
//!   (namespaces, access control, placement settings, shard sizes, the
//!   next split id) and drops what belonged to the old nodes (node
//!   records, preferred leaders, moves); a fresh shard record per data
//!   shard names its new replicas.
//!
//! Each replica this node holds is created at the backup's applied index
//! and term with the new configuration and filled by the same ingest a
//! lagging replica's snapshot goes through
//! ([`pigeonhole_engine::Engine::restore_shard`]), which checks every
//! record's crc. The whole backup is verified before anything is written,
//! and the data directory carries a marker until the last shard is in:
//! the node refuses to start while the marker is there, and a restore run
//! again starts over.

use crate::config::NodeConfig;
use crate::error::ClusterError;
use crate::placement::{meta_members, shard_record_key, ShardMap, META_SHARD};
use pigeonhole_backup::{read_shard, Manifest, ShardEntry};
use pigeonhole_engine::raft::eraftpb::ConfState;
use pigeonhole_engine::{conf_state_with_voters, Engine, EngineError, HashRange, SnapshotChunk, SystemValue};
use pigeonhole_proto::internal::v1::ShardRecord;
use prost::Message as _;
use std::path::Path;

/// The file that marks a data directory whose restore has not finished.
pub const RESTORE_MARKER: &str = "RESTORE-INCOMPLETE";

/// The file that names the backup a data dir was restored from (its
/// manifest's SHA-256), which is part of the cluster id
/// (`NodeConfig::restored_from`).
pub const RESTORED_FROM_FILE: &str = "restored-from";

/// The backup `data_dir` was restored from, if it was.
pub fn restored_from(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join(RESTORED_FROM_FILE))
        .ok()
        .map(|s| s.trim().to_string())
}

/// System keys of the metadata group a restore keeps: the data's.
const KEPT_SYSTEM_KEYS: [&[u8]; 4] = [
    crate::quota::STATE_KEY,
    crate::auth::check::STATE_KEY,
    crate::moves::PLACEMENT_CONFIG_KEY,
    crate::split::NEXT_SHARD_ID_KEY,
];
/// Prefixes of kept system keys (one value per shard).
const KEPT_SYSTEM_PREFIXES: [&[u8]; 1] = [crate::sizes::SIZE_PREFIX];
/// Prefixes of the system keys that belonged to the old nodes: dropped
/// (the shard records are written anew). Any key that is neither kept nor
/// dropped is of a kind this build does not know (a backup of a newer
/// version): the restore refuses it rather than lose it silently.
const DROPPED_SYSTEM_PREFIXES: [&[u8]; 4] = [
    crate::nodes::NODE_RECORD_PREFIX,
    crate::placement::PREFERRED_LEADER_PREFIX,
    crate::moves::MOVE_PREFIX,
    crate::placement::SHARD_RECORD_PREFIX,
];

fn kept(key: &[u8]) -> bool {
    KEPT_SYSTEM_KEYS.contains(&key) || KEPT_SYSTEM_PREFIXES.iter().any(|p| key.starts_with(p))
}

fn dropped(key: &[u8]) -> bool {
    DROPPED_SYSTEM_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// What a restore did on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Replicas created here (the metadata group's included).
    pub replicas: usize,
    /// Key-value records ingested.
    pub records: u64,
    /// Shards in the backup.
    pub shards: usize,
}

/// Each data shard of the backup and its replicas in the new cluster.
pub fn restored_layout(cfg: &NodeConfig, m: &Manifest) -> Vec<(ShardEntry, Vec<u64>)> {
    let boot = ShardMap::bootstrap(&cfg.initial_cluster, m.bootstrap_shard_count, cfg.replication_factor);
    let ids = cfg.initial_cluster.ids();
    let n = ids.len().max(1);
    let rf = cfg.replication_factor.clamp(1, n);
    let mut data: Vec<&ShardEntry> = m.shards.iter().filter(|s| s.id != META_SHARD).collect();
    data.sort_by_key(|s| s.range_start);
    data.into_iter()
        .enumerate()
        .map(|(i, s)| {
            let replicas = match boot.shard(s.id) {
                Some(d) => d.replicas.clone(),
                None => (0..rf).filter_map(|k| ids.get((i + k) % n).copied()).collect(),
            };
            (s.clone(), replicas)
        })
        .collect()
}

/// Restores `from` into `cfg`'s data directory (see the module docs).
/// `progress` is called after each shard this node holds.
pub fn restore(
    cfg: &NodeConfig,
    from: &Path,
    mut progress: impl FnMut(&ShardEntry),
) -> Result<RestoreReport, ClusterError> {
    let backup = ClusterError::from;
    if cfg.joined {
        return Err(ClusterError::Config(
            "restore seeds the nodes of a new cluster from --initial-cluster; --join adds an empty node to a running one"
                .into(),
        ));
    }
    cfg.validate()?;
    let m = Manifest::load(from).map_err(backup)?;
    if cfg.shard_count != m.bootstrap_shard_count {
        return Err(ClusterError::Config(format!(
            "the backup's cluster was bootstrapped with {} shards: restore and start the new nodes with --shards {}, not {}",
            m.bootstrap_shard_count, m.bootstrap_shard_count, cfg.shard_count
        )));
    }
    // Everything is read and checked once before anything is written.
    pigeonhole_backup::verify(from, |_| {}).map_err(backup)?;
    prepare_dir(&cfg.data_dir)?;
    let marker = cfg.data_dir.join(RESTORE_MARKER);
    crate::node::write_durably(&marker, b"a restore into this directory has not finished\n")?;
    // The manifest's SHA-256 (checked against it by the load above).
    let sum_path = from.join(pigeonhole_backup::MANIFEST_SUM_FILE);
    let sum = std::fs::read_to_string(&sum_path)
        .map_err(|e| ClusterError::Config(format!("backup unreadable: {}: {e}", sum_path.display())))?;
    let sum = sum.trim().to_string();
    crate::node::write_durably(&cfg.data_dir.join(RESTORED_FROM_FILE), format!("{sum}\n").as_bytes())?;
    let cfg = &NodeConfig {
        restored_from: Some(sum),
        ..cfg.clone()
    };
    crate::node::check_identity(cfg, cfg.effective_cluster_id())?;
    let engine = Engine::open(cfg.data_dir.join("db"), cfg.engine.clone())?;
    let layout = restored_layout(cfg, &m);
    let mut report = RestoreReport {
        shards: m.shards.len(),
        ..RestoreReport::default()
    };
    let meta = m
        .shards
        .iter()
        .find(|s| s.id == META_SHARD)
        .ok_or_else(|| ClusterError::Config("backup refused: no metadata group".into()))?;
    let (voters, learners) = meta_members(&cfg.initial_cluster);
    let meta_conf = ConfState {
        voters,
        learners,
        ..Default::default()
    };
    report.records += restore_one(&engine, from, meta, meta_conf)?;
    report.replicas += 1;
    progress(meta);
    if let Some(v) = engine
        .system_scan(META_SHARD, b"", usize::MAX)?
        .iter()
        .find(|v| !kept(&v.key) && !dropped(&v.key))
    {
        return Err(ClusterError::Config(format!(
            "backup refused: its metadata holds a kind this build does not know (key {:?}); restore it with the version that took it",
            String::from_utf8_lossy(&v.key)
        )));
    }
    let records: Vec<SystemValue> = layout.iter().map(|(s, replicas)| shard_record(s, replicas)).collect();
    engine.restore_system_values(META_SHARD, kept, &records)?;
    for (s, replicas) in &layout {
        if !replicas.contains(&cfg.node_id) {
            continue;
        }
        report.records += restore_one(&engine, from, s, conf_state_with_voters(replicas))?;
        report.replicas += 1;
        progress(s);
    }
    drop(engine);
    std::fs::remove_file(&marker)?;
    std::fs::File::open(&cfg.data_dir)?.sync_all()?;
    Ok(report)
}

/// Refuses a data directory that holds a node, unless it is one a restore
/// left unfinished (then that is wiped).
fn prepare_dir(dir: &Path) -> Result<(), ClusterError> {
    let entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.collect::<Result<_, _>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if entries.is_empty() {
        std::fs::create_dir_all(dir)?;
        return Ok(());
    }
    if !dir.join(RESTORE_MARKER).exists() {
        return Err(ClusterError::Config(format!(
            "data dir {} is not empty: a restore seeds a new node only (an earlier, unfinished restore would have left {RESTORE_MARKER} there)",
            dir.display()
        )));
    }
    tracing::warn!(
        "data dir {}: an earlier restore did not finish; starting over",
        dir.display()
    );
    for e in entries {
        let path = e.path();
        if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else if e.file_name() != RESTORE_MARKER {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Creates `s`'s replica here with `conf` and ingests its file.
fn restore_one(engine: &Engine, from: &Path, s: &ShardEntry, conf: ConfState) -> Result<u64, ClusterError> {
    let mut ingest = engine.restore_shard(s.id, conf, s.applied_index, s.applied_term)?;
    let mut summary = None;
    read_shard::<ClusterError>(from, s, |_, frame| {
        let chunk = SnapshotChunk::decode(frame)?;
        summary = ingest.push(&chunk)?;
        Ok(())
    })?;
    let summary = summary.ok_or_else(|| {
        ClusterError::Engine(EngineError::Snapshot {
            shard: s.id,
            reason: "the backup stream has no last chunk".into(),
        })
    })?;
    // The state keeps rows of its filter range (the whole space for a
    // bootstrap shard never split), which must cover the manifest's range.
    let covers = |r: HashRange| {
        r.start <= s.range_start
            && match (r.end, s.range_end) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(re), Some(e)) => re >= e,
            }
    };
    if s.id != META_SHARD && !covers(summary.range) {
        return Err(ClusterError::Config(format!(
            "backup refused: shard {} keeps rows of the hash range {:?}, less than the manifest's [{}, {:?})",
            s.id, summary.range, s.range_start, s.range_end
        )));
    }
    Ok(summary.records)
}

/// The metadata group's record of a restored data shard.
fn shard_record(s: &ShardEntry, replicas: &[u64]) -> SystemValue {
    let rec = ShardRecord {
        shard: s.id,
        range_start: s.range_start,
        range_end: s.range_end,
        voters: replicas.to_vec(),
        preferred_leader: replicas.first().copied().unwrap_or(0),
        // Below any term the new cluster's leaders write at: the replicas
        // start at the backup's term and elect at a higher one.
        term: s.applied_term,
        handed_index: s.applied_index,
        epoch: s.epoch,
        parent: s.parent,
        ..Default::default()
    };
    SystemValue {
        key: shard_record_key(s.id),
        version: s.applied_term,
        value: rec.encode_to_vec(),
    }
}

impl From<pigeonhole_backup::BackupError> for ClusterError {
    fn from(e: pigeonhole_backup::BackupError) -> Self {
        match e {
            // Not the backup's fault: a permission, a missing mount.
            pigeonhole_backup::BackupError::Io { .. } => ClusterError::Config(format!("backup unreadable: {e}")),
            _ => ClusterError::Config(format!("backup refused: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node on an empty data dir beside restored ones has another cluster
    /// id, so the restored nodes refuse its frames.
    #[test]
    fn a_restored_node_is_in_another_cluster_than_a_fresh_one() {
        let fresh = NodeConfig::single_node("/tmp/x", "127.0.0.1:1");
        let restored = NodeConfig {
            restored_from: Some("ab".repeat(32)),
            ..fresh.clone()
        };
        let other = NodeConfig {
            restored_from: Some("cd".repeat(32)),
            ..fresh.clone()
        };
        assert_ne!(fresh.effective_cluster_id(), restored.effective_cluster_id());
        assert_ne!(restored.effective_cluster_id(), other.effective_cluster_id());
    }

    #[test]
    fn metadata_kinds_are_kept_dropped_or_unknown() {
        for k in [
            &b"ns/state"[..],
            b"auth/state",
            b"config/placement",
            b"shard-id/next",
            b"size/\0\0\0\0\0\0\0\x01",
        ] {
            assert!(kept(k) && !dropped(k), "{k:?}");
        }
        for k in [&b"node/\0\0\0\0\0\0\0\x01"[..], b"leader/x", b"move/x", b"shard/x"] {
            assert!(dropped(k) && !kept(k), "{k:?}");
        }
        for k in [&b"ns/other"[..], b"future/kind"] {
            assert!(!kept(k) && !dropped(k), "{k:?}");
        }
    }
}
