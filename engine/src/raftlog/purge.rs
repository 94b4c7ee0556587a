//! Deleting purged segment files off the append path.
//!
//! Why a thread of its own: a purge runs after an append, inside the
//! writer lock, on the caller's thread, which for a node is its Raft
//! driver. Deleting a segment (an unlink that frees 32 MiB of extents,
//! then a directory fsync that waits for the file system's journal) took
//! 0.3–0.7 s for 22 segments under the steady-state benchmark's
//! compaction load, and every shard of the node waited for it
//! (docs/benchmarks.md). The index forgets the segments at once (the
//! caller does that); only the files' deletion waits here.
//!
//! Why that is safe: a segment is handed over only once none of its
//! entries is live, and only after every older one. Deletions happen in
//! that order, one thread, oldest first, so a crash at any point leaves
//! a run of the oldest segments on disk, consecutive with the rest.
//! Recovery replays them first, and the checkpoint at the start of every
//! later segment supersedes what they said; a failed unlink that leaves
//! a gap makes recovery delete the segments before it, which hold
//! nothing live either (storage-format.md §8.4–8.5).

use crate::engine::lock;
use crate::error::EngineError;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Housekeeping failures (count, last error), shared with the log.
pub(crate) type Failures = Arc<Mutex<(u64, Option<String>)>>;

/// Counts a housekeeping failure and keeps it as the last error.
pub(crate) fn note_failure(failures: &Failures, e: &EngineError) {
    let mut f = lock(failures);
    f.0 += 1;
    f.1 = Some(e.to_string());
}

/// The thread that deletes purged segments, oldest first. Dropping it
/// waits for every deletion handed to it: a log reopened in the same
/// process must not race a deletion of its own files.
#[derive(Debug)]
pub(crate) struct Purger {
    dir: PathBuf,
    tx: Option<Sender<Vec<PathBuf>>>,
    handle: Option<JoinHandle<()>>,
}

impl Purger {
    /// Starts the thread for the segments in `dir`.
    pub(crate) fn start(dir: &Path, failures: Failures) -> Result<Purger, EngineError> {
        let (tx, rx) = channel::<Vec<PathBuf>>();
        let thread_dir = dir.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("raft-log-purge".into())
            .spawn(move || {
                while let Ok(paths) = rx.recv() {
                    if let Err(e) = delete(&thread_dir, &paths) {
                        note_failure(&failures, &e);
                        tracing::warn!(error = %e, "deleting purged Raft log segments failed; the next open deletes them");
                    }
                }
            })
            .map_err(|e| EngineError::LogIo(format!("starting the Raft log purge thread: {e}")))?;
        Ok(Purger {
            dir: dir.to_path_buf(),
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Hands `paths` (oldest first, all older than any segment handed
    /// over later) to the thread. If the thread is gone, deletes them
    /// here instead.
    pub(crate) fn delete(&self, paths: Vec<PathBuf>) -> Result<(), EngineError> {
        match self.tx.as_ref().map(|tx| tx.send(paths)) {
            Some(Ok(())) => Ok(()),
            Some(Err(std::sync::mpsc::SendError(paths))) => delete(&self.dir, &paths),
            None => Ok(()),
        }
    }
}

impl Drop for Purger {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Unlinks `paths` in order, stopping at the first failure (the segments
/// after it stay, newer than the one that failed), then fsyncs `dir`.
fn delete(dir: &Path, paths: &[PathBuf]) -> Result<(), EngineError> {
    for path in paths {
        std::fs::remove_file(path).map_err(|e| EngineError::LogIo(format!("remove {}: {e}", path.display())))?;
    }
    super::files::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_purger_waits_for_every_deletion_handed_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (1..=50).map(|i| dir.path().join(format!("{i}.seg"))).collect();
        for p in &paths {
            std::fs::write(p, b"x").unwrap();
        }
        let failures: Failures = Arc::default();
        let purger = Purger::start(dir.path(), Arc::clone(&failures)).unwrap();
        for chunk in paths.chunks(7) {
            purger.delete(chunk.to_vec()).unwrap();
        }
        drop(purger);
        assert!(paths.iter().all(|p| !p.exists()), "a segment outlived the purger");
        assert_eq!(lock(&failures).0, 0);
    }

    #[test]
    fn a_failed_deletion_is_counted_and_stops_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("3.seg");
        std::fs::write(&kept, b"x").unwrap();
        let failures: Failures = Arc::default();
        let purger = Purger::start(dir.path(), Arc::clone(&failures)).unwrap();
        // "2.seg" does not exist: the batch stops there, before 3.
        purger.delete(vec![dir.path().join("2.seg"), kept.clone()]).unwrap();
        drop(purger);
        assert!(kept.exists());
        let f = lock(&failures);
        assert_eq!(f.0, 1);
        assert!(f.1.as_deref().is_some_and(|e| e.contains("2.seg")), "{f:?}");
    }
}
