//! Step 7 of the loop, the driver's side of apply: handing what every shard
//! committed to the apply worker (`applier`), and taking its reports.
//!
//! At hand-off, in log order, the driver feeds each conf change to raft-rs
//! (only the driver touches RawNode) and sends the resulting configuration
//! with the entry; it moves the callers of this node's proposals from its
//! pending table into the task, so the worker answers them from its own
//! results. On a report it moves raft-rs's applied index, which releases
//! reads, lets the log compact and may let a leader leave a joint
//! configuration; and it removes a replica whose removal is now applied,
//! deleting its data (replica GC) once the worker holds nothing more of it.

use super::applier::{ApplyReport, ApplyTask, ShardWork, APPLY_LAG_BYTES_MAX};
use super::replica::{fail_all, is_member, parse_context, release_reads, step_down_if_removed, trim_entry_cache};
use super::Driver;
use crate::error::ClusterError;
use crate::placement::META_SHARD;
use pigeonhole_engine::raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType};
use pigeonhole_engine::raft::StateRole;
use protobuf::Message as _;

impl Driver {
    /// Hands what every shard committed this turn to the apply worker, as
    /// one task. Waits for reports first if too much is already in flight.
    pub(super) fn hand_off(&mut self, work: Vec<(u64, Vec<Entry>)>) -> Result<(), ClusterError> {
        let mut task = ApplyTask {
            shards: Vec::with_capacity(work.len()),
            bytes: 0,
        };
        for (shard, entries) in work {
            let Some(last) = entries.last().map(|e| e.index) else {
                continue;
            };
            crate::metrics::committed(entries.len());
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            let mut w = ShardWork::new(shard);
            for e in &entries {
                task.bytes += e.data.len() as u64;
                r.handed_bytes = r.handed_bytes.saturating_add(e.data.len() as u64);
                let ours = parse_context(&e.context).filter(|(node, _)| *node == self.node_id);
                match e.get_entry_type() {
                    EntryType::EntryNormal => {
                        if let Some(p) = ours.and_then(|(_, id)| self.pending.remove(&id)) {
                            p.parts.iter().for_each(|p| p.stamp(crate::stages::Stage::Committed));
                            w.pending.push((e.index, p));
                        }
                    }
                    EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                        // raft-rs must see every conf change in log order,
                        // even ones the engine already holds (after a
                        // snapshot).
                        let cs = if e.get_entry_type() == EntryType::EntryConfChange {
                            let cc = ConfChange::parse_from_bytes(&e.data)
                                .map_err(|err| ClusterError::Raft(format!("bad conf change: {err}")))?;
                            r.raw.apply_conf_change(&cc)
                        } else {
                            let cc = ConfChangeV2::parse_from_bytes(&e.data)
                                .map_err(|err| ClusterError::Raft(format!("bad conf change: {err}")))?;
                            r.raw.apply_conf_change(&cc)
                        };
                        // An invalid change (e.g. removing the last voter)
                        // leaves the configuration as it was.
                        let cs = cs.unwrap_or_else(|_| r.raw.raft.prs().conf().to_conf_state());
                        if shard != META_SHARD && r.raw.raft.state == StateRole::Leader {
                            self.map_dirty.insert(shard);
                        }
                        step_down_if_removed(r, &cs, self.node_id);
                        // The replica goes once the worker has applied the
                        // change that removed it (a later change in the same
                        // run may add it back).
                        r.remove_at = (!is_member(&cs, self.node_id)).then_some(e.index);
                        if let Some(p) = ours.and_then(|(_, id)| self.pending_conf.remove(&id)) {
                            r.conf_answers.push((e.index, p.reply, cs.clone()));
                        }
                        w.confs.push((e.index, cs));
                    }
                }
            }
            r.handed = r.handed.max(last);
            super::replica::bcast_commit_done(r, last);
            let last_term = entries.last().map_or(0, |e| e.term);
            let term_moved = last_term > r.handed_term;
            r.handed_term = r.handed_term.max(last_term);
            let leader = r.raw.raft.leader_id;
            w.entries = entries;
            task.shards.push(w);
            if term_moved {
                self.fail_lost_proposals(shard, last_term, leader);
            }
        }
        if task.shards.is_empty() {
            return Ok(());
        }
        self.applier.submit(task)?;
        while self.applier.lag_bytes > APPLY_LAG_BYTES_MAX {
            self.wait_report()?;
        }
        Ok(())
    }

    /// Answers this node's proposals of `shard` that were made in a term
    /// before `term` and are still pending now that an entry of `term` is
    /// committed: each entry before it in the log is committed too, and
    /// was handed off above in log order, so a proposal still waiting was
    /// lost in a leader change (a follower's forward that a leader in
    /// transfer dropped, or an old leader's uncommitted tail). Its caller
    /// hears it now, with a retryable outcome-unknown error, instead of at
    /// its deadline. Outcome unknown: a forward that was passed on again
    /// may still be appended by the new leader after its first entry, so
    /// the caller retries with the same idempotency key, as after a
    /// timeout.
    fn fail_lost_proposals(&mut self, shard: u64, term: u64, leader: u64) {
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.shard == shard && p.term < term)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some(p) = self.pending.remove(&id) {
                for super::replica::Part { reply, .. } in p.parts {
                    let _ = reply.send(Err(ClusterError::LeaderChanged { shard, term, leader }));
                }
            }
        }
    }

    /// Blocks for one report and takes it.
    pub(super) fn wait_report(&mut self) -> Result<(), ClusterError> {
        let report = self
            .applier
            .reports
            .recv()
            .map_err(|_| ClusterError::Raft("the apply worker has stopped".into()))?;
        self.on_report(report)
    }

    /// Takes every report already there.
    pub(super) fn take_reports(&mut self) -> Result<(), ClusterError> {
        while let Ok(report) = self.applier.reports.try_recv() {
            self.on_report(report)?;
        }
        Ok(())
    }

    /// Waits until everything handed over for `shard` is applied (before a
    /// snapshot ingest replaces the shard's state, so the ingest never races
    /// entries applied before it).
    pub(super) fn wait_applied(&mut self, shard: u64) -> Result<(), ClusterError> {
        while self
            .replicas
            .get(&shard)
            .is_some_and(|r| r.handed > r.raw.raft.raft_log.applied)
        {
            self.wait_report()?;
        }
        Ok(())
    }

    pub(super) fn on_report(&mut self, report: ApplyReport) -> Result<(), ClusterError> {
        let (shards, bytes, splits) = match report {
            ApplyReport::Applied { shards, bytes, splits } => (shards, bytes, splits),
            ApplyReport::Failed(e) => return Err(e.into()),
        };
        self.applier.lag_bytes = self.applier.lag_bytes.saturating_sub(bytes);
        let mut removed = Vec::new();
        for (shard, index) in shards {
            let Some(r) = self.replicas.get_mut(&shard) else {
                // A removed replica whose last entries were still with the
                // worker: its data can go once they are applied.
                if self.gc_after.get(&shard).is_some_and(|last| index >= *last) {
                    self.gc_after.remove(&shard);
                    self.destroy_replica(shard)?;
                }
                continue;
            };
            let log = &r.raw.raft.raft_log;
            // A replica created again after a removal may see a report of
            // its earlier life: never move backwards (raft-rs would panic).
            if index <= log.applied || index > log.committed.min(log.persisted) {
                continue;
            }
            r.raw.advance_apply_to(index);
            // Only now, with raft-rs's applied index past it, is a conf
            // change done for its caller.
            let (done, later) = std::mem::take(&mut r.conf_answers)
                .into_iter()
                .partition::<Vec<_>, _>(|(at, _, _)| *at <= index);
            r.conf_answers = later;
            for (_, reply, cs) in done {
                let _ = reply.send(Ok(cs));
            }
            self.applied_now.insert(shard);
            trim_entry_cache(r);
            release_reads(r);
            if r.raw.has_ready() {
                self.dirty.insert(shard);
            }
            if r.remove_at.is_some_and(|at| at <= index) {
                removed.push(shard);
            }
        }
        for shard in removed {
            self.remove_replica(shard)?;
        }
        for s in &splits {
            self.on_split(s)?;
        }
        Ok(())
    }

    /// Drops a replica whose removal from the shard is applied here, then
    /// deletes its data: at once if the apply worker holds none of its
    /// entries, else when the worker reports the last one applied (an apply
    /// after the delete would write into a shard that no longer exists).
    pub(super) fn remove_replica(&mut self, shard: u64) -> Result<(), ClusterError> {
        self.watchers.leader_lost(shard);
        self.routing.set_leader(shard, 0);
        let Some(r) = self.replicas.remove(&shard) else {
            return Ok(());
        };
        let (handed, applied) = (r.handed, r.raw.raft.raft_log.applied);
        fail_all(shard, r, |shard| ClusterError::NotReplica {
            shard,
            node: self.node_id,
            replicas: Vec::new(),
        });
        if handed > applied {
            self.gc_after.insert(shard, handed);
            return Ok(());
        }
        self.destroy_replica(shard)
    }

    /// Replica GC: deletes this node's state and log of a shard it is no
    /// longer a member of, and the snapshots spooled for it.
    pub(super) fn destroy_replica(&mut self, shard: u64) -> Result<(), ClusterError> {
        self.engine.destroy_shard(shard)?;
        self.spool.remove_all(shard)?;
        // Another driver may make the shard's next replica here.
        self.drivers.release(shard, self.index);
        // A replica that is gone catches nothing up; one added back later
        // starts as a learner, which does not vote (D49).
        if self.catching_up.remove(&shard).is_some() {
            self.engine.caught_up(shard)?;
        }
        Ok(())
    }
}
