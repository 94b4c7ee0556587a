//! The `corrupt` fault's damage: bytes of a stopped node's files flipped,
//! zeroed or cut off, as a failing disk or a bad
//! controller would leave them (issue 16). The node is then restarted; it
//! must find the damage by its checksums, keep its replica out of
//! elections until it has caught up from its peers, and lose no
//! acknowledged append (docs/decisions.md D49).
//!
//! What is damaged, and why not more:
//! - a Raft log segment (two times in three): any byte range of any
//!   segment, except the last quarter of the newest segment's data (not of
//!   its preallocated length), and the
//!   newest segment is never cut short. A bad spot with nothing durable
//!   after it is exactly what a power cut's torn write leaves, so recovery
//!   cuts it as one; no checksum can tell the two apart, and the replica
//!   then silently lacks what it lost (storage-format.md §8.5 names this
//!   case);
//! - else one of RocksDB's SSTs, its MANIFEST or its WAL: bits flipped, a range
//!   zeroed, or the file cut short. The node finds it at the open or on
//!   the first read of the block, and rebuilds its state machine from its
//!   peers (D50);
//! - a spooled snapshot (`snap/*.snap`), when the node was stopped with
//!   one (only while a snapshot is in flight, so rarely), one time in two:
//!   bits flipped, zeroed or cut. Each chunk has its own crc; an ingest cut
//!   short whose file fails is abandoned at the start, and the replica
//!   catches up from its leader;
//! - RocksDB's WAL (`db/*.log`) among the SSTs, when it holds anything
//!   (it carries only synced writes: the format version, bootstrap,
//!   catching-up marks, so it is mostly empty): a bad record fails the
//!   open as damage and the state machine is rebuilt (D50). Its last
//!   quarter is spared and it is never cut, as the newest Raft log
//!   segment's: RocksDB drops a bad tail as a torn write.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Damages one of the node's files under `data` (its data dir, the node
/// stopped): a spooled snapshot, a Raft log segment, or an SST or the
/// MANIFEST. Returns what
/// was done, for the history.
pub fn damage(data: &Path, rng: &mut StdRng) -> Result<String, String> {
    let spooled: Vec<PathBuf> = std::fs::read_dir(data.join("snap"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "snap"))
                .collect()
        })
        .unwrap_or_default();
    if !spooled.is_empty() && rng.gen_range(0..2) == 0 {
        let path = spooled.choose(rng).cloned().unwrap_or_else(|| data.join("snap"));
        let len = std::fs::metadata(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if len >= 64 {
            let what = hit(&path, len, rng.gen_range(0..len), true, rng)?;
            return Ok(format!("{} (spooled snapshot, {len} bytes): {what}", path.display()));
        }
    }
    let db = data.join("db");
    let state: Vec<PathBuf> = std::fs::read_dir(&db)
        .map_err(|e| format!("{}: {e}", db.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.ends_with(".sst")
                || name.starts_with("MANIFEST-")
                || (name.ends_with(".log") && std::fs::metadata(p).is_ok_and(|m| m.len() >= 64))
        })
        .collect();
    if state.is_empty() || rng.gen_range(0..3) < 2 {
        return damage_log(data, rng);
    }
    let path = state.choose(rng).cloned().unwrap_or_else(|| db.join("none"));
    let len = std::fs::metadata(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    // The WAL's tail is spared and it is never cut, as the newest Raft
    // log segment's: damage at its end is what a torn write leaves, which
    // recovery drops as one (only unacknowledged writes can be torn).
    let wal = path.extension().is_some_and(|x| x == "log");
    let span = if wal { len * 3 / 4 } else { len };
    if span < 64 {
        return Ok(format!("{} too short to damage ({len} bytes)", path.display()));
    }
    let what = hit(&path, span, rng.gen_range(0..span), !wal, rng)?;
    Ok(format!("{} ({len} bytes): {what}", path.display()))
}

/// Damages one of the Raft log segments under `data`.
fn damage_log(data: &Path, rng: &mut StdRng) -> Result<String, String> {
    let dir = data.join("db").join("raft-log");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "phlog"))
        .collect();
    segs.sort();
    let Some(newest) = segs.last().cloned() else {
        return Ok(format!("no segment in {}", dir.display()));
    };
    let path = segs.choose(rng).cloned().unwrap_or(newest.clone());
    let is_newest = path == newest;
    // The newest segment is preallocated (storage-format.md §8.4): its
    // length on disk is mostly zeros never written, where damage is
    // harmless. Its data ends at its last nonzero byte (near enough: a
    // record may end in zeros).
    let len = if is_newest {
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i as u64 + 1)
    } else {
        std::fs::metadata(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len()
    };
    // The 20-byte header and the checkpoint record may be hit too.
    let span = if is_newest { len * 3 / 4 } else { len };
    if span < 64 {
        return Ok(format!("{} too short to damage ({len} bytes)", path.display()));
    }
    let what = hit(&path, span, rng.gen_range(0..span), !is_newest, rng)?;
    Ok(format!(
        "{} ({} of {} segments{}, {len} bytes): {what}",
        path.display(),
        segs.iter().position(|p| *p == path).map_or(0, |i| i + 1),
        segs.len(),
        if is_newest { ", the newest" } else { "" }
    ))
}

/// Flips bits in, zeroes, or (when `may_cut`) cuts `path` at `at`, within
/// its first `span` bytes; fsync'd. Returns what it did.
fn hit(path: &Path, span: u64, at: u64, may_cut: bool, rng: &mut StdRng) -> Result<String, String> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let kind = if may_cut {
        rng.gen_range(0..3)
    } else {
        rng.gen_range(0..2)
    };
    let what = match kind {
        0 => {
            let n = rng.gen_range(1..=8u64).min(span - at);
            let mut buf = vec![0u8; usize::try_from(n).unwrap_or(1)];
            file.read_exact_at(&mut buf, at).map_err(|e| format!("read: {e}"))?;
            for b in &mut buf {
                *b ^= 1 << rng.gen_range(0..8);
            }
            file.write_all_at(&buf, at).map_err(|e| format!("write: {e}"))?;
            format!("flipped a bit in each of {n} bytes at offset {at}")
        }
        1 => {
            let n = rng.gen_range(512..=8192u64).min(span - at);
            file.write_all_at(&vec![0u8; usize::try_from(n).unwrap_or(512)], at)
                .map_err(|e| format!("write: {e}"))?;
            format!("zeroed {n} bytes at offset {at}")
        }
        _ => {
            let len = file.metadata().map_err(|e| format!("stat: {e}"))?.len();
            file.set_len(at).map_err(|e| format!("truncate: {e}"))?;
            format!("cut the file at offset {at} ({} bytes lost)", len - at)
        }
    };
    file.sync_all().map_err(|e| format!("fsync: {e}"))?;
    Ok(what)
}
