//! Making applied state durable, so the Raft log can be compacted.
//!
//! The state machine is written without RocksDB's WAL (D26): an apply is
//! durable only once its memtable is flushed. A crash loses the unflushed
//! applies, and the node replays them from the Raft log, starting at the
//! applied index on disk. So a shard's log must never be compacted past
//! that index. Each replica tracks it (`Replica::durable_applied`); when
//! compaction wants to go further, the driver takes every replica's applied
//! index, flushes on a thread of its own (a flush writes up to a memtable of
//! data and must not stall the loop), and on `Inbound::Flushed` raises the
//! durable indexes to what it took. RocksDB also flushes by itself when a
//! memtable fills; the driver does not see those, which only makes it
//! conservative.

use super::{Driver, Inbound};
use crossbeam_channel::TrySendError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A flush running on its own thread. The driver joins it before it goes
/// away: a thread still inside RocksDB while the process exits would touch
/// a database being torn down.
pub(super) struct FlushJob {
    handle: std::thread::JoinHandle<()>,
    /// Set when the driver stops: the thread gives up handing its answer to
    /// an inbox nobody reads any more.
    stop: Arc<AtomicBool>,
}

impl FlushJob {
    /// Waits for the thread (after telling it the driver stops).
    pub(super) fn join(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

impl Driver {
    /// Starts one flush of the state machine in the background.
    pub(super) fn start_flush(&mut self) {
        // Every apply up to these indexes is already in the memtable: apply
        // writes before raft-rs's applied index moves.
        let applied: Vec<(u64, u64)> = self
            .replicas
            .iter()
            .map(|(shard, r)| (*shard, r.raw.raft.raft_log.applied))
            .collect();
        let engine = self.engine.clone();
        let tx = self.tx.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let spawned = std::thread::Builder::new().name("state-flush".into()).spawn(move || {
            let ok = engine.flush_data().is_ok();
            // The answer must not be lost, or no flush would ever start
            // again; but a stopping driver reads nothing, so it gives up
            // then.
            let mut msg = Inbound::Flushed { applied, ok };
            loop {
                match tx.try_send(msg) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => return,
                    Err(TrySendError::Full(m)) => {
                        if stopping.load(Ordering::Relaxed) {
                            return;
                        }
                        msg = m;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        });
        // Not spawned: tried again at the next compaction check.
        if let Ok(handle) = spawned {
            self.flush_job = Some(FlushJob { handle, stop });
        }
    }

    /// A flush finished: what it covered is durable; those shards may
    /// compact now.
    pub(super) fn on_flushed(&mut self, applied: Vec<(u64, u64)>, ok: bool) {
        if let Some(job) = self.flush_job.take() {
            job.join(); // it has sent its answer: it is finishing
        }
        if !ok {
            // Tried again at the next compaction check.
            return;
        }
        for (shard, index) in applied {
            if let Some(r) = self.replicas.get_mut(&shard) {
                r.durable_applied = r.durable_applied.max(index);
                self.applied_now.insert(shard);
            }
        }
    }
}
