//! Snapshots on the driver's side: repairing what a crash left at start
//! (an ingest cut short, an apply state ahead of the log), creating a
//! replica a leader is sending to, ingesting a spooled snapshot before
//! raft-rs may step past it, and handing outgoing snapshots to the
//! transport.
//!
//! An ingest runs on a thread of its own ([`Ingest`]), as TiKV applies
//! snapshots on a region worker: it writes a whole shard (hundreds of MiB
//! when a shard moves) and took the driver, and so every shard of the node
//! and its heartbeats, for over a second per snapshot (up to 4.4 s in a
//! growing cluster, D60). Meanwhile the replica is out of the driver's
//! `replicas`: nothing steps, ticks, proposes to, applies to, compacts or
//! deletes it, and a message for it is dropped (raft-rs re-sends). Its
//! MsgSnapshot is stepped when the ingest is collected, as before, only
//! if the engine then holds the snapshot's state.

use super::replica::is_member;
use super::{raft_err, Driver, Inbound};
use crate::error::ClusterError;
use crate::placement::META_SHARD;
use crate::transport::{spool, SnapshotJob};
use pigeonhole_engine::raft::eraftpb::{Message, MessageType, SnapshotMetadata};
use pigeonhole_engine::raft::Storage as _;
use pigeonhole_engine::{Durability, RaftBatch, ShardState, SNAPSHOT_DATA_MAGIC};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A snapshot ingest running on its own thread, and the replica it is for
/// (out of the driver's `replicas` until the ingest is collected).
pub(super) struct Ingest {
    pub(super) replica: super::replica::Replica,
    msg: Message,
    path: PathBuf,
    handle: std::thread::JoinHandle<Result<(), ClusterError>>,
}

impl Driver {
    /// Repairs what a crash can leave: a snapshot ingest cut short (re-run
    /// from the spooled file, or, when that file is damaged or gone, the
    /// replica emptied to catch up from its leader) and an apply state
    /// ahead of the Raft log (the ingest finished, the log reset did not).
    pub(super) fn recover_shard(&mut self, shard: u64) -> Result<(), ClusterError> {
        let Some(meta) = self.engine.shard_meta(shard)? else {
            return Ok(());
        };
        let meta = if meta.state == ShardState::Ingesting {
            // The newest complete spooled snapshot: any complete snapshot of
            // committed state newer than what the shard had will do.
            let again = match self.spool.complete(shard)?.into_iter().next() {
                Some((_, path)) => self.ingest_file(shard, &path).map_err(|e| e.to_string()),
                None => Err("no complete spooled snapshot is left".to_string()),
            };
            if let Err(why) = again {
                return self.abandon_ingest(shard, &why);
            }
            self.engine.shard_meta(shard)?.ok_or(ClusterError::Stopped)?
        } else {
            meta
        };
        let store = self.engine.raft_log(shard)?;
        let hs = store.hard_state()?;
        let last = store.last_index().map_err(raft_err)?;
        if meta.applied_index <= hs.commit {
            return Ok(());
        }
        // The applied state is ahead of the durable commit index: a snapshot
        // was ingested (or applies were written) past what the log says.
        // Only if the local log holds the applied entry itself (same index
        // and term) is its prefix the committed history, so the commit index
        // may move up to it. Otherwise the log diverges there and must be
        // restarted at the applied state, exactly as installing that
        // snapshot would; the entries dropped were never committed (log
        // matching), and a leader re-sends whatever follows.
        let log_agrees = meta.applied_index <= last && store.term(meta.applied_index).ok() == Some(meta.applied_term);
        let mut rb = RaftBatch::default();
        if log_agrees {
            let mut hs = hs;
            hs.commit = meta.applied_index;
            rb.set_hard_state(&store, &hs)?;
        } else {
            let md = SnapshotMetadata {
                index: meta.applied_index,
                term: meta.applied_term,
                ..Default::default()
            };
            rb.apply_snapshot(&store, &md)?;
        }
        self.engine.write_raft(rb, Durability::Fsync)?;
        Ok(())
    }

    /// A snapshot ingest cut short that cannot be run again (its spooled
    /// file is damaged or gone; the replica's old state is already
    /// deleted): the replica is marked catching up (D49; its log may hold
    /// entries it acknowledged), then emptied, keeping its term and vote.
    /// Its leader's next message creates it again and a new snapshot fills
    /// it; it does not vote until caught up. The mark is durable before
    /// the state goes, so a crash in between repeats this.
    fn abandon_ingest(&mut self, shard: u64, why: &str) -> Result<(), ClusterError> {
        tracing::error!(
            shard,
            why,
            "a snapshot ingest cut short cannot be finished: the replica is emptied and its leader sends \
             a new snapshot"
        );
        let reason = format!("a snapshot ingest cut short could not be finished: {why}");
        self.engine.mark_catching_up(shard, &reason)?;
        self.spool.remove_all(shard)?;
        self.engine.destroy_shard(shard)?;
        self.catching_up.insert(shard, super::catchup::CatchUp::new(reason));
        Ok(())
    }

    /// A leader of a shard this node has no replica of is sending to it: a
    /// conf change added this node (again, perhaps). Create an empty
    /// replica; the leader will send a snapshot.
    pub(super) fn maybe_create(&mut self, shard: u64, msg: &Message) -> Result<bool, ClusterError> {
        let from_leader = matches!(
            msg.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        );
        if !from_leader || (shard != META_SHARD && self.map.shard(shard).is_none()) {
            return Ok(false);
        }
        // Its replica is out of `replicas` while a snapshot is ingested.
        if self.ingests.contains_key(&shard) {
            return Ok(false);
        }
        // A replica removed here whose data is not deleted yet (the apply
        // worker still holds its last entries): the leader asks again.
        if self.gc_after.contains_key(&shard) {
            return Ok(false);
        }
        // A split's new shard whose parent replica here has not applied
        // the split yet: that apply makes the replica, from local rows.
        if self.range_held_locally(shard)? {
            return Ok(false);
        }
        // Another driver of this node holds the shard (the message was
        // routed here before that driver made its replica): it is dropped,
        // and the leader sends again, to that driver.
        if !self.drivers.claim(shard, self.index) {
            return Ok(false);
        }
        if let Some(meta) = self.engine.shard_meta(shard)? {
            if meta.state != ShardState::Ready || is_member(&meta.conf_state, self.node_id) {
                self.drivers.release(shard, self.index);
                return Ok(false);
            }
            // The state of a replica removed earlier: deleted first, so a
            // replica added back always starts empty and is caught up by a
            // snapshot (replica GC normally deleted it already).
            self.destroy_replica(shard)?;
            if !self.drivers.claim(shard, self.index) {
                return Ok(false);
            }
        }
        self.add_replica(shard, 0)?;
        Ok(true)
    }

    /// Starts ingesting a spooled snapshot on a thread of its own
    /// ([`Ingest`]); [`Driver::finish_ingest`] then steps raft-rs's
    /// MsgSnapshot. The message is stepped only if the engine holds state
    /// at least as new as the snapshot, so raft-rs never moves past state
    /// the engine lacks.
    pub(super) fn on_snapshot(
        &mut self,
        _from: u64,
        shard: u64,
        path: &std::path::Path,
        msg: Message,
    ) -> Result<(), ClusterError> {
        let md_index = msg.get_snapshot().get_metadata().index;
        let mut expect = SNAPSHOT_DATA_MAGIC.to_vec();
        expect.extend_from_slice(&shard.to_be_bytes());
        if msg.get_snapshot().data.as_ref() != expect.as_slice() || msg.get_msg_type() != MessageType::MsgSnapshot {
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        // One ingest per shard at a time; the leader sends another if this
        // one is still needed after it.
        if self.ingests.contains_key(&shard) {
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        if !self.replicas.contains_key(&shard) && !self.maybe_create(shard, &msg)? {
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        // Whatever was handed to the apply worker for this shard lands
        // before the ingest replaces its state.
        self.wait_applied(shard)?;
        let applied = self.engine.shard_meta(shard)?.map_or(0, |m| m.applied_index);
        if applied >= md_index {
            let _ = std::fs::remove_file(path);
            return self.step_snapshot(shard, md_index, msg);
        }
        let Some(replica) = self.replicas.remove(&shard) else {
            let _ = std::fs::remove_file(path);
            return Ok(());
        };
        let (engine, spool, tx) = (self.engine.clone(), Arc::clone(&self.spool), self.tx.clone());
        let file = path.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name(format!("ingest-{shard}"))
            .spawn(move || {
                #[cfg(test)]
                hold_for_test();
                let done = ingest_file(&engine, &spool, shard, &file);
                // Only a wake-up, never waited for: with the inbox full (or
                // the driver gone) the driver's next tick finds the thread
                // finished (`finish_ingests`).
                let _ = tx.try_send(Inbound::SnapshotIngested { shard });
                done
            });
        match spawned {
            Ok(handle) => {
                self.ingests.insert(
                    shard,
                    Ingest {
                        replica,
                        msg,
                        path: path.to_path_buf(),
                        handle,
                    },
                );
            }
            Err(e) => {
                // No thread: the replica stays as it was, the snapshot is
                // dropped, and the leader sends another.
                self.replicas.insert(shard, replica);
                let _ = std::fs::remove_file(path);
                tracing::warn!(shard, error = %e, "could not start a snapshot ingest thread");
            }
        }
        Ok(())
    }

    /// Collects every ingest whose thread has finished.
    pub(super) fn finish_ingests(&mut self) -> Result<(), ClusterError> {
        let done: Vec<u64> = self
            .ingests
            .iter()
            .filter(|(_, i)| i.handle.is_finished())
            .map(|(s, _)| *s)
            .collect();
        for shard in done {
            self.finish_ingest(shard)?;
        }
        Ok(())
    }

    /// Collects `shard`'s ingest (waiting for its thread if it is still
    /// running): the replica goes back to `replicas`, and on success the
    /// snapshot's MsgSnapshot is stepped. A failure that left the shard
    /// half replaced is fatal, as it always was: the spooled file is kept,
    /// and the next start re-runs the ingest from it (`recover_shard`).
    pub(super) fn finish_ingest(&mut self, shard: u64) -> Result<(), ClusterError> {
        let Some(job) = self.ingests.remove(&shard) else {
            return Ok(()); // collected already (a tick, or a second wake-up)
        };
        let Ingest {
            replica,
            msg,
            path,
            handle,
        } = job;
        self.replicas.insert(shard, replica);
        let done = handle.join().unwrap_or_else(|_| {
            Err(ClusterError::Raft(format!(
                "shard {shard}: the snapshot ingest thread panicked"
            )))
        });
        let md_index = msg.get_snapshot().get_metadata().index;
        if let Err(e) = done {
            let torn = self
                .engine
                .shard_meta(shard)?
                .is_some_and(|m| m.state == ShardState::Ingesting);
            if torn {
                // The old state is gone and the new one is not all in:
                // this replica cannot serve. Stop loudly, and KEEP the
                // spooled file: the next start re-runs the ingest from it
                // (`recover_shard`), which repairs a transient failure
                // (an I/O error); if the file fails again (damaged), the
                // start empties the replica to catch up from its leader.
                return Err(e);
            }
            // Refused before anything changed (e.g. older than our
            // state): drop it; the leader sends another if still needed.
            let _ = std::fs::remove_file(&path);
            self.wake(shard, true);
            return Ok(());
        }
        // Any mailbox of the shard may have changed.
        self.watchers.shard_reset(shard);
        // The ingest flushed what it wrote.
        if let Some(r) = self.replicas.get_mut(&shard) {
            r.durable_applied = r.durable_applied.max(md_index);
        }
        self.step_snapshot(shard, md_index, msg)
    }

    /// Waits for every ingest still running (the driver stops) and puts
    /// their replicas back, without stepping their snapshots: one that
    /// finished is stepped again from the leader's next send, one cut
    /// short is re-run at the next start.
    pub(super) fn join_ingests(&mut self) {
        for (shard, job) in std::mem::take(&mut self.ingests) {
            let _ = job.handle.join();
            self.replicas.insert(shard, job.replica);
        }
    }

    /// Steps a snapshot's MsgSnapshot into raft-rs once the engine holds
    /// state at least as new as it.
    fn step_snapshot(&mut self, shard: u64, md_index: u64, msg: Message) -> Result<(), ClusterError> {
        let applied = self.engine.shard_meta(shard)?.map_or(0, |m| m.applied_index);
        if applied >= md_index {
            self.wake(shard, true);
            if let Some(r) = self.replicas.get_mut(&shard) {
                let _ = r.raw.step(msg);
            }
        }
        Ok(())
    }

    pub(super) fn ingest_file(&self, shard: u64, path: &std::path::Path) -> Result<(), ClusterError> {
        ingest_file(&self.engine, &self.spool, shard, path)
    }

    pub(super) fn send_snapshot(&mut self, shard: u64, msg: Message) {
        let tx = self.tx.clone();
        let to = msg.to;
        let sent_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // A new send to the same follower replaces the old one's counter.
        self.snapshot_sends.insert((shard, to), Arc::clone(&sent_bytes));
        let (started, counted) = (std::time::Instant::now(), Arc::clone(&sent_bytes));
        self.transport.send_snapshot(SnapshotJob {
            from: self.node_id,
            to,
            shard,
            msg,
            engine: self.engine.clone(),
            chunk_bytes: self.tuning.snapshot_chunk_bytes,
            rate: Arc::clone(&self.snapshot_rate),
            sent_bytes,
            report: Box::new(move |ok| {
                let bytes = counted.load(std::sync::atomic::Ordering::Relaxed);
                crate::metrics::snapshot_sent(ok, bytes, started.elapsed());
                // Never silently lost: a failed transfer left unreported would
                // keep the follower in raft-rs's Snapshot state. The report
                // comes from a transport thread, so waiting a moment for room
                // in the inbox blocks nothing of the driver's.
                let _ = tx.send_timeout(Inbound::SnapshotReport { shard, to, ok }, Duration::from_secs(5));
            }),
        });
    }
}

/// Test builds only: an ingest thread waits here (at most 10 s) while a
/// test holds the gate, so a test can look at the driver mid-ingest.
#[cfg(test)]
pub(super) static INGEST_GATE: std::sync::Mutex<Option<crossbeam_channel::Receiver<()>>> = std::sync::Mutex::new(None);

#[cfg(test)]
fn hold_for_test() {
    let gate = INGEST_GATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(rx) = gate {
        let _ = rx.recv_timeout(Duration::from_secs(10));
    }
}

/// Ingests the spooled snapshot at `path` into `shard`, counted in the
/// snapshot metrics.
fn ingest_file(
    engine: &pigeonhole_engine::Engine,
    spool: &crate::transport::SnapshotSpool,
    shard: u64,
    path: &std::path::Path,
) -> Result<(), ClusterError> {
    let started = std::time::Instant::now();
    let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
    let done = ingest_spooled(engine, spool, shard, path);
    crate::metrics::snapshot_ingested(done.is_ok(), bytes, started.elapsed());
    done
}

fn ingest_spooled(
    engine: &pigeonhole_engine::Engine,
    spool: &crate::transport::SnapshotSpool,
    shard: u64,
    path: &std::path::Path,
) -> Result<(), ClusterError> {
    let mut ingest = engine.ingest_snapshot(shard)?;
    let mut done = false;
    let mut failure: Option<ClusterError> = None;
    spool::read_chunks(path, |chunk| match ingest.push(&chunk) {
        Ok(s) => {
            done = s.is_some();
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            failure = Some(e.into());
            Err(std::io::Error::other(msg))
        }
    })
    .map_err(|e| failure.take().unwrap_or(ClusterError::Io(e)))?;
    if !done {
        return Err(ClusterError::Io(std::io::Error::other(
            "spooled snapshot has no last chunk",
        )));
    }
    // The shard is whole again and durable (the last push fsyncs): no
    // spooled file of it is needed for recovery any more.
    spool.remove_all(shard)?;
    Ok(())
}
