//! Damage to the state machine's files (RocksDB: SSTs, WAL, MANIFEST;
//! a value's own checksum), found at the open or while running
//! (docs/decisions.md D50): the node rebuilds its state machine from its
//! peers instead of serving it or stopping for good.
//!
//! Why the whole state machine and not the damaged shards: one RocksDB
//! holds every replica of the node, and a damaged SST cannot be taken out
//! of it (RocksDB leaves level-0 files in `DeleteFilesInRange`, and any
//! compaction that reads the damaged block fails and stops all writes).
//! The Raft log, in its own files, is kept: it holds each replica's term
//! and vote, which a Raft peer must never forget.
//!
//! How:
//! 1. Damage found while running ([`check`]): a marker file naming it is
//!    written durably, and the process restarts itself (exec of its own
//!    binary with the same arguments: the same pid, so a supervisor sees
//!    no exit, and every file, lock and socket is closed on exec). At the
//!    open, damage RocksDB reports is marked the same way, and so is damage
//!    the start's own reads find after the open (`Node::start` then starts
//!    once more).
//! 2. At the start, with the marker present ([`rebuild_if_marked`]): every
//!    entry of `db/` but `raft-log/` moves to `damaged-<unix ms>/` in the
//!    data dir (kept for a post-mortem; the operator deletes it), and a
//!    fresh database is opened. Then `Node::start` marks every shard the
//!    Raft log knows as catching up (D49) and empties its log, keeping
//!    term and vote, and removes the marker ([`finish`]). A crash in
//!    between does it again (each step can be repeated).
//! 3. The replicas are created empty when their leaders first send, and
//!    filled by snapshots; they do not vote until caught up (D49).
//!
//! A node whose damage comes back right after a rebuild (a disk failing
//! as it is written) would restart forever; after [`RESTARTS_MAX`]
//! restarts in one process lineage, each within an hour of the one
//! before, it exits with status 75 instead (the systemd unit does not
//! restart that), with the damage in its last log line. Several threads
//! finding damage at once: the first restarts, the others wait for it.

use crate::config::NodeConfig;
use crate::error::ClusterError;
use pigeonhole_engine::{Engine, EngineError};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The marker file in the data dir: the state machine must be rebuilt.
pub const STATE_DAMAGED_MARKER: &str = "STATE-DAMAGED";
/// Self-restarts for damage in one process lineage, at most.
pub const RESTARTS_MAX: u32 = 3;
/// The environment variable that counts them across exec.
const RESTARTS_ENV: &str = "PIGEONHOLE_DAMAGE_RESTARTS";
/// Bytes of a damage description kept in the marker, at most.
const REASON_BYTES_MAX: usize = 1024;

static DATA_DIR: OnceLock<PathBuf> = OnceLock::new();
static RESTARTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// A restart more than this long after the previous one starts the count
/// again: three repaired damages months apart are not a failing disk.
const RESTARTS_WINDOW_SECS: u64 = 3_600;

/// Arms [`check`] for this process: where its marker goes.
pub fn watch(data_dir: &Path) {
    let _ = DATA_DIR.set(data_dir.to_path_buf());
}

/// Called with an engine error wherever one ends a request or the driver:
/// damage to the state machine marks it for a rebuild and restarts the
/// process; damage to the Raft log restarts it (its open salvages the
/// log, D49). Anything else returns. Does nothing before [`watch`].
pub fn check(e: &EngineError) {
    let Some(dir) = DATA_DIR.get() else { return };
    if !e.is_state_damage() && !e.is_log_damage() {
        return;
    }
    // One thread restarts the process; any other that finds damage
    // meanwhile (several readers of one bad block) waits for it.
    if RESTARTING.swap(true, std::sync::atomic::Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
    if e.is_state_damage() {
        if let Err(w) = mark(dir, &e.to_string()) {
            tracing::error!(error = %w, damage = %e, "could not write the damage marker; stopping");
            std::process::abort();
        }
        restart(&format!("state machine damage: {e}"));
    } else if e.is_log_damage() {
        restart(&format!("Raft log damage: {e}"));
    }
}

/// Writes the marker (durably: temp file, fsync, rename, fsync the dir).
pub fn mark(data_dir: &Path, reason: &str) -> std::io::Result<()> {
    let mut cut = reason.len().min(REASON_BYTES_MAX);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let tmp = data_dir.join(format!("{STATE_DAMAGED_MARKER}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(reason.get(..cut).unwrap_or_default().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(STATE_DAMAGED_MARKER))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Restarts the process in place (exec), or stops it after
/// [`RESTARTS_MAX`] restarts. Never returns.
fn restart(why: &str) -> ! {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // "<count>@<unix secs of the last restart>"
    let n: u32 = std::env::var(RESTARTS_ENV)
        .ok()
        .and_then(|v| {
            let (n, at) = v.split_once('@')?;
            let at: u64 = at.parse().ok()?;
            if now.saturating_sub(at) < RESTARTS_WINDOW_SECS {
                n.parse().ok()
            } else {
                None
            }
        })
        .unwrap_or(0);
    if n >= RESTARTS_MAX {
        tracing::error!(
            restarts = n,
            "storage damage again after {n} restarts to repair it: stopping; the disk may be failing ({why})"
        );
        std::process::exit(75);
    }
    tracing::error!("{why}: restarting this process to rebuild from the peers");
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let err = std::os::unix::process::CommandExt::exec(
        std::process::Command::new("/proc/self/exe")
            .args(args)
            .env(RESTARTS_ENV, format!("{}@{now}", n + 1)),
    );
    tracing::error!(error = %err, "could not restart the process; stopping");
    std::process::exit(75);
}

/// At the start, before the engine opens: if the marker is there, moves
/// the state machine's files aside and answers the damage it names.
pub fn rebuild_if_marked(data_dir: &Path) -> Result<Option<String>, ClusterError> {
    let marker = data_dir.join(STATE_DAMAGED_MARKER);
    let reason = match std::fs::read(&marker) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let db = data_dir.join("db");
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let aside = data_dir.join(format!("damaged-{millis}"));
    let mut moved = 0usize;
    if db.exists() {
        std::fs::create_dir_all(&aside)?;
        for ent in std::fs::read_dir(&db)? {
            let ent = ent?;
            if ent.file_name() == "raft-log" {
                continue;
            }
            std::fs::rename(ent.path(), aside.join(ent.file_name()))?;
            moved += 1;
        }
        std::fs::File::open(&db)?.sync_all()?;
        std::fs::File::open(&aside)?.sync_all()?;
        std::fs::File::open(data_dir)?.sync_all()?;
    }
    tracing::error!(
        damage = reason.as_str(),
        moved,
        aside = %aside.display(),
        "the state machine's files are damaged: they were moved aside, and every replica here is rebuilt \
         from its peers (it does not vote until caught up)"
    );
    Ok(Some(reason))
}

/// Opens the node's engine, rebuilding its state machine from the peers
/// when it is damaged: a marker left by a run before, RocksDB's own checks
/// at this open, or a state machine gone from under a Raft log that still
/// holds its shards' entries (RocksDB cannot always tell: a MANIFEST
/// whose middle reads as zeros opens as a shorter, valid one). A rebuild's
/// replicas are marked catching up and emptied, keeping term and vote.
///
/// `bootstrap_shards` are the shards a first start creates here, at
/// `bootstrap_index`: bootstrap writes a shard's log before its state, so
/// one of those with a log at that point and no state is an interrupted
/// bootstrap (`Node::start` finishes it), not damage.
pub fn open_engine(cfg: &NodeConfig, bootstrap_shards: &[u64], bootstrap_index: u64) -> Result<Engine, ClusterError> {
    let no_peers = |what: &str| {
        ClusterError::Config(format!(
            "the state machine in {} is damaged ({what}) and its shards have no other replica to rebuild \
             from: restore the data dir from a backup (`pigeonhole restore`)",
            cfg.data_dir.display(),
        ))
    };
    let marker = cfg.data_dir.join(STATE_DAMAGED_MARKER);
    if cfg.replication_factor <= 1 && marker.exists() {
        return Err(no_peers(&std::fs::read_to_string(&marker).unwrap_or_default()));
    }
    let open = || Engine::open(cfg.data_dir.join("db"), cfg.engine.clone());
    let mut rebuilt = rebuild_if_marked(&cfg.data_dir)?;
    let mut engine = match open() {
        Ok(e) => e,
        Err(e) if e.is_state_damage() && rebuilt.is_none() && cfg.replication_factor > 1 => {
            mark(&cfg.data_dir, &e.to_string())?;
            rebuilt = rebuild_if_marked(&cfg.data_dir)?;
            open()?
        }
        Err(e) => return Err(e.into()),
    };
    if rebuilt.is_none() {
        let bootstrapping = if cfg.joined { &[][..] } else { bootstrap_shards };
        let lost = state_lost_under_log(&engine, bootstrapping, bootstrap_index)?;
        if !lost.is_empty() {
            let reason =
                format!("the Raft log of shards {lost:?} starts after their state machine ends (or it is gone)");
            if cfg.replication_factor <= 1 {
                return Err(no_peers(&reason));
            }
            drop(engine);
            mark(&cfg.data_dir, &reason)?;
            rebuilt = rebuild_if_marked(&cfg.data_dir)?;
            engine = open()?;
        }
    }
    if let Some(reason) = &rebuilt {
        // Every replica this node is a Raft peer of starts over empty,
        // keeping its term and vote, and does not vote until caught up.
        for shard in engine.raft_log_shard_ids() {
            // A replica deleted here before keeps only term and vote, at
            // (0, 0): nothing to catch up.
            if last_index(&engine, shard)? == 0 {
                continue;
            }
            engine.mark_catching_up(shard, &format!("state machine rebuilt after: {reason}"))?;
            engine.destroy_shard(shard)?;
        }
        finish(&cfg.data_dir)?;
    }
    Ok(engine)
}

/// The shards whose Raft log holds entries (or a compaction point) while
/// the state machine has no apply state for them, or one older than the
/// log's first entry. Every way a replica
/// gets a log past index 0 makes its apply state durable first (a
/// snapshot is ingested before the log is reset to it, a split flushes
/// the new shard's state before its log starts), except bootstrap, whose
/// shards at the bootstrap point are left out. A log that holds a term
/// and vote only (last index 0) has nothing to lose.
fn state_lost_under_log(
    engine: &Engine,
    bootstrap_shards: &[u64],
    bootstrap_index: u64,
) -> Result<Vec<u64>, ClusterError> {
    let with_state = engine.shard_ids()?;
    let mut lost = Vec::new();
    for shard in engine.raft_log_shard_ids() {
        if with_state.contains(&shard) {
            // State older than the log's start: the entries between were
            // applied and compacted away (only ever up to a durable apply
            // index), so the state lost them (a flush the MANIFEST forgot,
            // old files put back).
            let store = engine.raft_log(shard)?;
            let first =
                pigeonhole_engine::raft::Storage::first_index(&store).map_err(|e| ClusterError::Raft(e.to_string()))?;
            // An ingest cut short (its placeholder state says applied 0) is
            // not this: the start ingests its spooled snapshot again
            // (`recover_shard`).
            let Some(meta) = engine.shard_meta(shard)? else {
                continue;
            };
            if meta.state == pigeonhole_engine::ShardState::Ingesting {
                continue;
            }
            if meta.applied_index.saturating_add(1) < first {
                lost.push(shard);
            }
            continue;
        }
        if last_index(engine, shard)? == 0 {
            continue;
        }
        if bootstrap_shards.contains(&shard) && at_bootstrap_point(engine, shard, bootstrap_index)? {
            continue;
        }
        lost.push(shard);
    }
    Ok(lost)
}

/// Of `bootstrap_shards`, those whose bootstrap a crash cut short: a log
/// at the bootstrap point and no state (bootstrap writes the log first).
pub fn interrupted_bootstrap(
    engine: &Engine,
    bootstrap_shards: &[u64],
    bootstrap_index: u64,
) -> Result<Vec<u64>, ClusterError> {
    let with_state = engine.shard_ids()?;
    let in_log = engine.raft_log_shard_ids();
    let mut out = Vec::new();
    for &shard in bootstrap_shards {
        if !with_state.contains(&shard)
            && in_log.contains(&shard)
            && at_bootstrap_point(engine, shard, bootstrap_index)?
        {
            out.push(shard);
        }
    }
    Ok(out)
}

fn at_bootstrap_point(engine: &Engine, shard: u64, bootstrap_index: u64) -> Result<bool, ClusterError> {
    let store = engine.raft_log(shard)?;
    let first = pigeonhole_engine::raft::Storage::first_index(&store).map_err(|e| ClusterError::Raft(e.to_string()))?;
    let last = pigeonhole_engine::raft::Storage::last_index(&store).map_err(|e| ClusterError::Raft(e.to_string()))?;
    Ok(last == bootstrap_index && first == bootstrap_index.saturating_add(1))
}

fn last_index(engine: &Engine, shard: u64) -> Result<u64, ClusterError> {
    let store = engine.raft_log(shard)?;
    pigeonhole_engine::raft::Storage::last_index(&store).map_err(|e| ClusterError::Raft(e.to_string()))
}

/// Removes the marker once the rebuild's marks and log resets are durable.
pub fn finish(data_dir: &Path) -> Result<(), ClusterError> {
    std::fs::remove_file(data_dir.join(STATE_DAMAGED_MARKER))?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_marked_dir_keeps_its_raft_log_and_moves_the_rest_aside() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(rebuild_if_marked(dir.path()).unwrap(), None, "no marker: nothing to do");
        let db = dir.path().join("db");
        std::fs::create_dir_all(db.join("raft-log")).unwrap();
        std::fs::write(db.join("raft-log").join("0000000000000001.phlog"), b"log").unwrap();
        std::fs::write(db.join("000012.sst"), b"sst").unwrap();
        std::fs::write(db.join("MANIFEST-000005"), b"manifest").unwrap();
        mark(dir.path(), "Corruption: block checksum mismatch in 000012.sst").unwrap();
        let reason = rebuild_if_marked(dir.path()).unwrap().unwrap();
        assert!(reason.contains("000012.sst"));
        let left: Vec<_> = std::fs::read_dir(&db)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("raft-log")]);
        assert!(db.join("raft-log").join("0000000000000001.phlog").exists());
        let aside: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("damaged-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(std::fs::read(aside[0].join("000012.sst")).unwrap(), b"sst");
        finish(dir.path()).unwrap();
        assert_eq!(rebuild_if_marked(dir.path()).unwrap(), None);
    }
}
