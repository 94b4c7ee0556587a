//! Handling what arrives in the driver's inbox: client proposals and reads
//! are queued on their shard, admin requests (conf change, leader
//! transfer, campaign, status) are answered or started, Raft messages are
//! stepped, snapshot reports are passed to raft-rs.

use super::replica::{context, PendingConf, QueuedProposal, ReadWaiter, Replica};
use super::{op_bytes, raft_err, Driver, Inbound};
use crate::error::ClusterError;
use crate::placement::META_SHARD;
use crate::transport::{Envelope, ShardMsg};
use pigeonhole_engine::raft::eraftpb::MessageType;
use pigeonhole_engine::raft::{SnapshotStatus, StateRole};
use prost::Message as _;
use std::time::Instant;
use tokio::sync::oneshot;

impl Driver {
    /// Handles one inbox item; false means stop.
    pub(super) fn handle(&mut self, m: Inbound) -> Result<bool, ClusterError> {
        match m {
            Inbound::Propose {
                shard,
                ops,
                reply,
                deadline,
                stages,
            } => {
                crate::stages::stamp(stages.as_ref(), crate::stages::Stage::Dequeued);
                if ops.is_empty() {
                    let _ = reply.send(Ok(Vec::new()));
                    return Ok(true);
                }
                let bytes = ops.iter().map(op_bytes).sum();
                self.enqueue(shard, reply, |r, reply| {
                    r.queued.push_back(QueuedProposal {
                        ops,
                        bytes,
                        reply,
                        deadline,
                        queued_at: Instant::now(),
                        stages,
                    });
                });
            }
            Inbound::Read { shard, reply, deadline } => {
                self.enqueue(shard, reply, |r, reply| {
                    r.reads_queued.push(ReadWaiter {
                        reply,
                        deadline,
                        queued_at: Instant::now(),
                    });
                });
            }
            Inbound::ConfChange {
                shard,
                cc,
                reply,
                deadline,
            } => {
                let id = self.next_id();
                let node_id = self.node_id;
                let r = match self.led_replica(shard) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(true);
                    }
                };
                let cs = r.raw.raft.prs().conf().to_conf_state();
                let joint = !cs.voters_outgoing.is_empty();
                if r.raw.raft.has_pending_conf() || joint {
                    // raft-rs would turn the proposal into an empty entry and
                    // the caller would only see a timeout; say why instead.
                    let _ = reply.send(Err(ClusterError::Busy {
                        shard,
                        reason: "a membership change is still being applied".into(),
                    }));
                    return Ok(true);
                }
                // Removing a node that is not a member would be a no-op in
                // raft-rs, so a move whose source another change already
                // took out would still add its target: one voter too many.
                let gone = cc.get_changes().iter().find(|c| {
                    c.get_change_type() == pigeonhole_engine::raft::eraftpb::ConfChangeType::RemoveNode
                        && !cs.voters.contains(&c.node_id)
                        && !cs.learners.contains(&c.node_id)
                });
                if let Some(c) = gone {
                    let _ = reply.send(Err(ClusterError::Refused {
                        reason: format!(
                            "node {} is not a member of shard {shard} (voters {:?}, learners {:?}): the configuration \
                             changed meanwhile; look again",
                            c.node_id, cs.voters, cs.learners
                        ),
                    }));
                    return Ok(true);
                }
                match r.raw.propose_conf_change(context(node_id, id), cc) {
                    Ok(()) => {
                        self.pending_conf.insert(id, PendingConf { shard, reply, deadline });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ClusterError::InvalidArgument {
                            field: "conf_change",
                            reason: e.to_string(),
                        }));
                    }
                }
                self.wake(shard, true);
            }
            Inbound::TransferLeader { shard, to, reply } => {
                let r = match self.led_replica(shard) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(true);
                    }
                };
                if !r.raw.raft.prs().conf().voters().contains(to) {
                    let _ = reply.send(Err(ClusterError::InvalidArgument {
                        field: "to_node",
                        reason: format!("node {to} is not a voter of shard {shard}"),
                    }));
                    return Ok(true);
                }
                r.raw.transfer_leader(to);
                let _ = reply.send(Ok(()));
                self.wake(shard, true);
            }
            Inbound::Campaign { shard, reply } => {
                if self.is_catching_up(shard) {
                    let _ = reply.send(Err(ClusterError::Refused {
                        reason: format!(
                            "shard {shard}: this replica is catching up after storage damage and does not campaign \
                             until it holds what its shard had committed"
                        ),
                    }));
                    return Ok(true);
                }
                let Some(r) = self.replicas.get_mut(&shard) else {
                    let _ = reply.send(Err(self.not_replica(shard)));
                    return Ok(true);
                };
                let res = r.raw.campaign().map_err(raft_err);
                let _ = reply.send(res);
                self.wake(shard, true);
            }
            Inbound::AcceptReplicaLoss { shard, reply } => {
                let _ = reply.send(self.accept_replica_loss(shard));
            }
            Inbound::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Inbound::Placement { reply } => {
                let _ = reply.send(self.placement_view());
            }
            Inbound::Raft(env) => self.on_envelope(env)?,
            Inbound::SnapshotReady { from, shard, path, msg } => self.on_snapshot(from, shard, &path, msg)?,
            Inbound::SnapshotReport { shard, to, ok } => {
                self.snapshot_sends.remove(&(shard, to));
                if let Some(r) = self.replicas.get_mut(&shard) {
                    let status = if ok {
                        SnapshotStatus::Finish
                    } else {
                        SnapshotStatus::Failure
                    };
                    r.raw.report_snapshot(to, status);
                    if !ok {
                        r.raw.report_unreachable(to);
                    }
                }
                self.wake(shard, true);
            }
            Inbound::SnapshotIngested { shard } => self.finish_ingest(shard)?,
            Inbound::Flushed { applied, ok } => self.on_flushed(applied, ok),
            Inbound::Stop => return Ok(false),
        }
        Ok(true)
    }

    /// Queues a request on its shard's replica (or answers `NotReplica`),
    /// and makes sure the loop looks at the shard.
    pub(super) fn enqueue<T>(
        &mut self,
        shard: u64,
        reply: oneshot::Sender<Result<T, ClusterError>>,
        push: impl FnOnce(&mut Replica, oneshot::Sender<Result<T, ClusterError>>),
    ) {
        match self.replicas.get_mut(&shard) {
            Some(r) => push(r, reply),
            None => {
                let _ = reply.send(Err(self.not_replica(shard)));
                return;
            }
        }
        self.waiting.insert(shard);
        self.wake(shard, true);
    }

    /// The replica of `shard` if this node holds it and leads it; otherwise
    /// the error that says where to go.
    pub(super) fn led_replica(&mut self, shard: u64) -> Result<&mut Replica, ClusterError> {
        if !self.replicas.contains_key(&shard) {
            return Err(self.not_replica(shard));
        }
        let r = self.replicas.get_mut(&shard).ok_or(ClusterError::Stopped)?;
        if r.raw.raft.state != StateRole::Leader {
            return Err(ClusterError::NotLeader {
                shard,
                leader: r.raw.raft.leader_id,
            });
        }
        Ok(r)
    }

    pub(super) fn not_replica(&self, shard: u64) -> ClusterError {
        if shard != META_SHARD && self.map.shard(shard).is_none() {
            // Not a shard of this cluster at all: retrying cannot help.
            return ClusterError::NoSuchShard {
                shard,
                first: self.map.shards.first().map_or(0, |s| s.id),
                last: self.map.shards.last().map_or(0, |s| s.id),
            };
        }
        ClusterError::NotReplica {
            shard,
            node: self.node_id,
            replicas: self.replicas_of(shard),
        }
    }

    /// Who holds `shard` as far as this node knows, the last known leader
    /// first (the client's redirect hint): the shard's record in this node's
    /// metadata replica, or the bootstrap layout if it has none. Never the
    /// bootstrap layout alone: after a move it names the node that lost the
    /// replica, and a client sent back to it would spin (the Jepsen
    /// membership run saw one node answer so 1,673 times in 40 s).
    pub(super) fn replicas_of(&self, shard: u64) -> Vec<u64> {
        let record = self
            .engine
            .system_scan(META_SHARD, &crate::placement::shard_record_key(shard), 1)
            .ok()
            .and_then(|values| values.into_iter().next())
            .and_then(|v| pigeonhole_proto::internal::v1::ShardRecord::decode(v.value.as_slice()).ok())
            .filter(|r| r.shard == shard);
        let Some(r) = record else {
            return self.map.shard(shard).map(|s| s.replicas.clone()).unwrap_or_default();
        };
        let mut out = r.voters;
        if let Some(i) = out.iter().position(|n| *n == r.leader_hint) {
            out.swap(0, i);
        }
        out
    }

    pub(super) fn on_envelope(&mut self, env: Envelope) -> Result<(), ClusterError> {
        if let Some(p) = self.peers.get_mut(&env.from) {
            p.last_seen = Instant::now();
            if p.down {
                p.down = false;
                // A peer came back: wake everything so leaders probe it and
                // bring its replicas up to date.
                self.wake_all();
            }
        }
        for ShardMsg { shard, msg } in env.msgs {
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                // Snapshots arrive only through the spool, with their state;
                // a bare MsgSnapshot would move raft-rs past the engine.
                continue;
            }
            if !self.replicas.contains_key(&shard) && !self.maybe_create(shard, &msg)? {
                continue;
            }
            let mut msg = msg;
            if self.is_catching_up(shard) && super::catchup::blocked(msg.get_msg_type()) {
                // It must not vote or campaign until it holds what its
                // shard had committed (D49); the candidate times out.
                continue;
            }
            // A heartbeat committing past this replica's log (its leader's
            // `matched` is stale: the replica lost entries to damage, or an
            // operator accepted the loss) is lowered, on every replica:
            // raft-rs would stop the node on it.
            if let Some(reject) = self
                .replicas
                .get(&shard)
                .and_then(|r| super::catchup::clamp_heartbeat(r, &mut msg))
            {
                self.outbox
                    .entry(reject.to)
                    .or_default()
                    .push(ShardMsg { shard, msg: reject });
                self.dirty.insert(shard);
            }
            if let Some(r) = self.replicas.get_mut(&shard) {
                if msg.get_msg_type() == MessageType::MsgAppendResponse
                    && msg.get_context() == super::catchup::CATCHING_UP
                {
                    r.peers_catching_up.insert(msg.from, Instant::now());
                }
            }
            if let Some(r) = self.replicas.get_mut(&shard) {
                if super::catchup::reset_lost_follower(r, &msg) {
                    tracing::warn!(
                        shard,
                        follower = msg.from,
                        log_ends_at = msg.reject_hint,
                        "a follower's log ends before what it had acknowledged (storage damage there): \
                         replicating to it again from its end"
                    );
                }
            }
            self.heard_from_leader(shard, &msg);
            let quiet_msg = matches!(
                msg.get_msg_type(),
                MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse
            );
            self.wake(shard, !quiet_msg);
            if let Some(r) = self.replicas.get_mut(&shard) {
                let forwarded = msg.get_msg_type() == MessageType::MsgPropose;
                // Step errors are stale or foreign messages; raft-rs already
                // ignores what it must, so they are not fatal.
                let stepped = r.raw.step(msg).is_ok();
                if forwarded && stepped && r.raw.raft.state == StateRole::Leader {
                    super::replica::bcast_commit_until(r, r.raw.raft.raft_log.last_index());
                }
            }
        }
        Ok(())
    }
}
