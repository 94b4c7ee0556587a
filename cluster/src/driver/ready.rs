//! Steps 3 to 6 of the loop (module docs of `driver`): packing queued
//! proposals into one entry per shard and issuing ReadIndex, collecting
//! every shard's Ready, persisting them with one group-commit write, and
//! sending messages (early for a leader's appends, after the fsync for the
//! rest), batched per destination node.

use super::replica::{context, parse_context, release_reads, InflightRead, Part, Pending};
use super::{now_ms, raft_err, Driver};
use crate::error::ClusterError;
use crate::placement::META_SHARD;
use crate::transport::{Envelope, ShardMsg};
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::raft::eraftpb::{Message, MessageType};
use pigeonhole_engine::raft::{self, StateRole, Storage as _};
use pigeonhole_engine::{Durability, RaftBatch};
use prost::Message as _;
use protobuf::Message as _;
use std::collections::BTreeMap;
use std::time::Instant;

/// Raft message bytes per envelope (frame), at most, unless one message is
/// larger by itself. Well under the transport's 80 MiB frame limit: one
/// entry is at most `entry_bytes_max` (8 MiB by default, 64 MiB allowed).
pub const ENVELOPE_BYTES_MAX: usize = 16 << 20;

impl Driver {
    /// Packs each shard's queued proposals into one entry per shard.
    pub(super) fn propose_queued(&mut self) {
        let node_id = self.node_id;
        let shards: Vec<u64> = self.waiting.iter().copied().collect();
        for &shard in &shards {
            if self.replicas.get(&shard).is_none_or(|r| r.raw.raft.leader_id == 0) {
                continue;
            }
            loop {
                let id = self.next_id();
                let Some(r) = self.replicas.get_mut(&shard) else { break };
                if r.queued.is_empty() {
                    break;
                }
                let mut ops = Vec::new();
                let mut bytes = 0usize;
                let mut parts = Vec::new();
                let mut deadline = Instant::now();
                let mut alone = false;
                while let Some(q) = r.queued.front() {
                    // A split must be the only op of its entry (D38).
                    let q_alone = q.ops.iter().any(must_be_alone);
                    let fits = ops.is_empty()
                        || (!alone
                            && !q_alone
                            && ops.len() + q.ops.len() <= self.tuning.ops_per_entry_max
                            && bytes + q.bytes <= self.tuning.entry_bytes_max);
                    if !fits {
                        break;
                    }
                    alone = q_alone;
                    let Some(q) = r.queued.pop_front() else { break };
                    bytes += q.bytes;
                    deadline = deadline.max(q.deadline);
                    parts.push(Part {
                        reply: q.reply,
                        ops: q.ops.len(),
                        stages: q.stages,
                    });
                    ops.extend(q.ops);
                }
                let command = cmd::Command { time_ms: now_ms(), ops };
                let data = command.encode_to_vec();
                let term = r.raw.raft.term;
                match r.raw.propose(context(node_id, id), data) {
                    Ok(()) => {
                        crate::metrics::proposed(1);
                        parts.iter().for_each(|p| p.stamp(crate::stages::Stage::Proposed));
                        self.pending.insert(
                            id,
                            Pending {
                                shard,
                                parts,
                                deadline,
                                proposed_at: Instant::now(),
                                term,
                            },
                        );
                        self.dirty.insert(shard);
                    }
                    Err(e) => {
                        // Dropped (no leader yet, a transfer under way, or
                        // the uncommitted-size bound): fail these callers
                        // with a retryable error rather than hold them.
                        for Part { reply, .. } in parts {
                            let _ = reply.send(Err(match e {
                                raft::Error::ProposalDropped => ClusterError::Dropped { shard },
                                ref other => ClusterError::Raft(other.to_string()),
                            }));
                        }
                        break;
                    }
                }
            }
        }
        // One ReadIndex per shard covers every read queued on it.
        for shard in shards {
            let id = self.next_id();
            let Some(r) = self.replicas.get_mut(&shard) else {
                self.waiting.remove(&shard);
                continue;
            };
            if r.raw.raft.leader_id != 0 {
                if r.reads_resend {
                    // A new leader (or role): reads sent to the old one may
                    // never be answered.
                    r.reads_resend = false;
                    for read in r.reads_inflight.iter_mut() {
                        read.sent_tick = self.ticks;
                        r.raw.read_index(context(node_id, read.id));
                    }
                    self.dirty.insert(shard);
                }
                if !r.reads_queued.is_empty() {
                    let waiters = std::mem::take(&mut r.reads_queued);
                    r.raw.read_index(context(node_id, id));
                    r.reads_inflight.push(InflightRead {
                        id,
                        sent_tick: self.ticks,
                        waiters,
                    });
                    self.dirty.insert(shard);
                }
            }
            if r.queued.is_empty() && r.reads_queued.is_empty() && !r.reads_resend {
                self.waiting.remove(&shard);
            }
        }
    }

    /// Steps 4–7 of the loop (see the module docs).
    pub(super) fn process_ready(&mut self) -> Result<(), ClusterError> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut rb = RaftBatch::default();
        let mut readies = Vec::new();
        let mut snapshots = Vec::new();
        let mut must_sync = false;
        let mut entries_written = 0usize;
        let mut late = Vec::new();
        for shard in dirty {
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            if !r.raw.has_ready() {
                continue;
            }
            let mut rd = r.raw.ready();
            must_sync |= rd.must_sync();
            if let Some(ss) = rd.ss() {
                // An election proper (pre-vote's probe is not counted: it
                // precedes every election and most fail harmlessly).
                if ss.raft_state == StateRole::Candidate {
                    crate::metrics::election(shard);
                }
                if ss.leader_id != 0 && ss.leader_id != r.leader_seen {
                    r.leader_seen = ss.leader_id;
                    crate::metrics::leader_changed(shard);
                    // For the leader hints of writes answered here.
                    self.routing.set_leader(shard, ss.leader_id);
                }
            }
            // A leader may send before its fsync, but not messages of a term
            // or vote it has not made durable yet (a single voter becomes
            // leader inside one Ready): those wait for the fsync.
            let prev = r.raw.store().hard_state()?;
            let early_ok = rd.hs().is_none_or(|hs| hs.term == prev.term && hs.vote == prev.vote);
            if shard != META_SHARD && rd.ss().is_some_and(|ss| ss.raft_state == StateRole::Leader) {
                self.map_dirty.insert(shard);
            }
            if rd.ss().is_some() && !r.reads_inflight.is_empty() {
                r.reads_resend = true;
                self.waiting.insert(shard);
            }
            let msgs = rd.take_messages();
            if early_ok {
                route(&mut self.outbox, shard, msgs, &mut snapshots);
            } else {
                late.push((shard, msgs));
            }
            if !rd.snapshot().is_empty() {
                rb.apply_snapshot(r.raw.store(), rd.snapshot().get_metadata())?;
                r.log_bytes = 0;
            }
            if !rd.entries().is_empty() {
                entries_written += rd.entries().len();
                rb.append(r.raw.store(), rd.entries())?;
                r.log_bytes += rd.entries().iter().map(|e| e.data.len() as u64).sum::<u64>();
            }
            if let Some(hs) = rd.hs() {
                rb.set_hard_state(r.raw.store(), hs)?;
            }
            for rs in rd.take_read_states() {
                if let Some((_, id)) = parse_context(&rs.request_ctx) {
                    if super::catchup::answered(&mut self.catching_up, shard, id, rs.index) {
                        continue;
                    }
                }
                if let Some(pos) = r
                    .reads_inflight
                    .iter()
                    .position(|read| parse_context(&rs.request_ctx).map(|c| c.1) == Some(read.id))
                {
                    let read = r.reads_inflight.swap_remove(pos);
                    r.reads_ready.push((rs.index, read.waiters));
                }
            }
            readies.push((shard, rd));
        }
        self.compact_logs(&mut rb)?;
        // Leaders' appends go out now, overlapping our own fsync.
        self.flush_outbox();
        if !rb.is_empty() {
            // Entries, votes, terms and snapshots must be durable before we
            // acknowledge them. A Ready that only moves the commit index does
            // not: a lost commit index is learned again from the leader (and
            // recovery raises it to the applied index), so it skips the fsync
            // that would otherwise sit between commit and apply.
            let durability = if must_sync && !self.tuning.unsafe_no_fsync && !planted_lazy_fsync() {
                Durability::Fsync
            } else {
                Durability::NoFsync
            };
            let started = Instant::now();
            self.engine.write_raft(rb, durability)?;
            crate::metrics::log_written(durability == Durability::Fsync, entries_written, started.elapsed());
        }
        for (shard, msgs) in late {
            route(&mut self.outbox, shard, msgs, &mut snapshots);
        }
        let mut work = Vec::with_capacity(readies.len());
        for (shard, mut rd) in readies {
            let mut committed = rd.take_committed_entries();
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            route(&mut self.outbox, shard, rd.take_persisted_messages(), &mut snapshots);
            let snapshot_index = (!rd.snapshot().is_empty()).then(|| rd.snapshot().get_metadata().index);
            // advance_append, not advance: the entries are not applied yet.
            // The apply worker reports when they are, and only then does
            // raft-rs's applied index move (`on_report`).
            let mut light = r.raw.advance_append(rd);
            route(&mut self.outbox, shard, light.take_messages(), &mut snapshots);
            committed.extend(light.take_committed_entries());
            if planted_answer_before_commit(&mut r.raw.raft) {
                self.dirty.insert(shard);
            }
            if let Some(index) = snapshot_index {
                // The engine already holds the snapshot's state (ingested
                // before raft-rs was allowed to step it) and nothing older
                // is in flight (`wait_applied`).
                if index > r.raw.raft.raft_log.applied {
                    r.raw.advance_apply_to(index);
                    r.handed = r.handed.max(index);
                    self.applied_now.insert(shard);
                }
            }
            // Reads whose index is already applied go now; the rest when
            // the worker reports their index applied.
            release_reads(r);
            if r.raw.has_ready() {
                self.dirty.insert(shard);
            }
            work.push((shard, committed));
        }
        self.hand_off(work)?;
        self.flush_outbox();
        for (shard, msg) in snapshots {
            self.send_snapshot(shard, msg);
        }
        Ok(())
    }

    /// Sends what this turn queued, one envelope per destination, split so
    /// no envelope exceeds `ENVELOPE_BYTES_MAX` (a frame over the receiver's
    /// limit would be refused whole, heartbeats included).
    pub(super) fn flush_outbox(&mut self) {
        for (to, msgs) in std::mem::take(&mut self.outbox) {
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            for m in msgs {
                let size = usize::try_from(m.msg.compute_size()).unwrap_or(usize::MAX);
                if !batch.is_empty() && bytes.saturating_add(size) > ENVELOPE_BYTES_MAX {
                    self.transport.send(Envelope {
                        from: self.node_id,
                        to,
                        msgs: std::mem::take(&mut batch),
                    });
                    bytes = 0;
                }
                bytes = bytes.saturating_add(size);
                batch.push(m);
            }
            if !batch.is_empty() {
                self.transport.send(Envelope {
                    from: self.node_id,
                    to,
                    msgs: batch,
                });
            }
        }
    }

    /// Adds compactions to `rb` for shards whose log grew past a threshold.
    pub(super) fn compact_logs(&mut self, rb: &mut RaftBatch) -> Result<(), ClusterError> {
        let mut want_flush = false;
        for shard in std::mem::take(&mut self.applied_now) {
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            let store = r.raw.store();
            let first = store.first_index().map_err(raft_err)?;
            let applied = r.raw.raft.raft_log.applied;
            let len = applied.saturating_sub(first);
            if len < self.tuning.log_entries_max && r.log_bytes < self.tuning.log_bytes_max {
                continue;
            }
            let wanted = applied.saturating_sub(self.tuning.log_retain_entries);
            // Never past what the state machine holds on disk: those
            // entries are what a restart replays.
            let to = wanted.min(r.durable_applied);
            if to > first {
                rb.compact(store, to)?;
                r.log_bytes = 0;
            }
            want_flush |= wanted > r.durable_applied;
        }
        if want_flush && self.flush_job.is_none() {
            self.start_flush();
        }
        Ok(())
    }
}

/// The planted bug `planted-bug-lazy-fsync` (test builds only, see
/// cluster/Cargo.toml): whether to skip this fsync, because one ran less
/// than 2 s ago. Always false in a real build.
fn planted_lazy_fsync() -> bool {
    if !cfg!(feature = "planted-bug-lazy-fsync") {
        return false;
    }
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(2)) {
        return true;
    }
    *last = Some(Instant::now());
    false
}

/// The planted bug `planted-bug-answer-before-commit` (test builds only,
/// see cluster/Cargo.toml): a leader pretends every voter has its whole
/// log, so it commits, applies and answers what only it holds. Returns
/// whether the commit index moved. Always false in a real build.
fn planted_answer_before_commit(raft: &mut raft::Raft<pigeonhole_engine::RaftLogStore>) -> bool {
    if !cfg!(feature = "planted-bug-answer-before-commit") || raft.state != StateRole::Leader {
        return false;
    }
    let last = raft.raft_log.last_index();
    let ids: Vec<u64> = raft.prs().conf().voters().ids().iter().collect();
    for id in ids {
        if let Some(pr) = raft.mut_prs().get_mut(id) {
            pr.maybe_update(last);
        }
    }
    raft.maybe_commit()
}

/// Ops that the state machine takes only as the sole op of a command.
fn must_be_alone(op: &cmd::Op) -> bool {
    matches!(op.op, Some(cmd::op::Op::Split(_)))
}

/// Splits outgoing messages: snapshots take their own path, the rest are
/// grouped per destination node.
pub(super) fn route(
    outbox: &mut BTreeMap<u64, Vec<ShardMsg>>,
    shard: u64,
    msgs: Vec<Message>,
    snaps: &mut Vec<(u64, Message)>,
) {
    for msg in msgs {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            snaps.push((shard, msg));
        } else {
            outbox.entry(msg.to).or_default().push(ShardMsg { shard, msg });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(to: u64, t: MessageType) -> Message {
        let mut m = Message {
            to,
            ..Default::default()
        };
        m.set_msg_type(t);
        m
    }

    #[test]
    fn snapshots_take_their_own_path_and_the_rest_group_by_destination() {
        let mut outbox = BTreeMap::new();
        let mut snaps = Vec::new();
        let msgs = vec![
            msg(2, MessageType::MsgAppend),
            msg(3, MessageType::MsgSnapshot),
            msg(3, MessageType::MsgHeartbeat),
            msg(2, MessageType::MsgHeartbeat),
        ];
        route(&mut outbox, 9, msgs, &mut snaps);
        route(&mut outbox, 8, vec![msg(3, MessageType::MsgAppend)], &mut snaps);
        let kinds = |to: u64| -> Vec<(u64, MessageType)> {
            outbox[&to]
                .iter()
                .map(|m: &ShardMsg| (m.shard, m.msg.get_msg_type()))
                .collect()
        };
        assert_eq!(
            kinds(2),
            vec![(9, MessageType::MsgAppend), (9, MessageType::MsgHeartbeat)]
        );
        assert_eq!(
            kinds(3),
            vec![(9, MessageType::MsgHeartbeat), (8, MessageType::MsgAppend)]
        );
        assert_eq!(snaps.len(), 1);
        assert_eq!((snaps[0].0, snaps[0].1.to), (9, 3));
    }
}
