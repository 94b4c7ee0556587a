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

/// System keys of the metadata group a restore keeps: the data's, not the
/// old nodes'. Anything else (node records, preferred leaders, moves,
/// shard records, and any kind a newer version adds) is dropped.
const KEPT_SYSTEM_PREFIXES: [&[u8]; 5] = [
    crate::quota::STATE_KEY,
    crate::auth::check::STATE_KEY,
    crate::moves::PLACEMENT_CONFIG_KEY,
    crate::sizes::SIZE_PREFIX,
    crate::split::NEXT_SHARD_ID_KEY,
];

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
    let backup = |e: pigeonhole_backup::BackupError| ClusterError::Config(format!("backup refused: {e}"));
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
    let records: Vec<SystemValue> = layout.iter().map(|(s, replicas)| shard_record(s, replicas)).collect();
    engine.restore_system_values(
        META_SHARD,
        |k| KEPT_SYSTEM_PREFIXES.iter().any(|p| k.starts_with(p)),
        &records,
    )?;
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
        ClusterError::Config(format!("backup refused: {e}"))
    }
}
