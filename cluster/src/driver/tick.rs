//! Time-driven work: the Raft tick of awake shards (with hibernation,
//! ReadIndex retries, leader rebalancing, dedup collection and request
//! expiry), the node-level heartbeat that detects dead peers for sleeping
//! shards, the shard records this node owes the metadata group, and, on
//! the metadata group's leader, keeping that group's members in line with
//! the node states (`nodes::meta_changes`).

use super::replica::{
    context, expire_queued, is_quiet, maybe_rebalance, QueuedProposal, LEADERLESS_TICKS_MAX, READ_RETRY_TICKS,
};
use super::{ms_since, Driver};
use crate::error::ClusterError;
use crate::placement::{shard_record_key, META_SHARD};
use crate::transport::Envelope;
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::raft::StateRole;
use pigeonhole_proto::internal::v1::ShardRecord;
use prost::Message as _;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often (in ticks) a node looks in its metadata replica for nodes
/// that joined: a new node is reachable from every node within a second.
const LEARN_PEERS_EVERY_TICKS: u64 = 10;

/// Placement rounds while a move is in flight, every this many ticks at
/// most (a round reads the move targets and, on the metadata leader, the
/// shard map: cheap next to the snapshot a move streams).
const PLACEMENT_BUSY_EVERY_TICKS: u64 = 2;

impl Driver {
    /// Adds every node that joined (a node record with an address) to the
    /// transport and to the liveness table, so this node sends to it and
    /// notices when it dies; drops removed nodes from the liveness table
    /// (no more heartbeats to them). Node ids are never reused, so a known
    /// id is never added twice.
    pub(super) fn learn_peers(&mut self) {
        let Ok(records) =
            self.engine
                .system_scan(META_SHARD, crate::nodes::NODE_RECORD_PREFIX, crate::nodes::NODES_MAX)
        else {
            return; // no metadata replica yet (a node that just joined)
        };
        let states = crate::nodes::decode_states(&records);
        // A removed node gets no more heartbeats, and is not counted alive.
        for (node, e) in &states {
            if e.state == crate::nodes::NodeState::Removed {
                self.peers.remove(node);
            }
        }
        for (node, address) in crate::nodes::joined_addresses(&states) {
            let removed = states
                .get(&node)
                .is_some_and(|e| e.state == crate::nodes::NodeState::Removed);
            if node == self.node_id || removed || self.peers.contains_key(&node) {
                continue;
            }
            self.transport.add_peer(node, address);
            self.peers.insert(
                node,
                super::PeerLiveness {
                    last_seen: Instant::now(),
                    down: false,
                },
            );
        }
    }

    /// Sends the node heartbeat (driver 0 only: a peer hands an envelope
    /// without messages to every one of its drivers) and marks peers not
    /// heard from for `peer_down_after_ms` down (every driver, from what
    /// reached it).
    pub(super) fn node_heartbeat(&mut self) {
        let ids: Vec<u64> = if self.index == 0 {
            self.peers.keys().copied().collect()
        } else {
            Vec::new()
        };
        for to in ids {
            self.transport.send(Envelope {
                from: self.node_id,
                to,
                msgs: Vec::new(),
            });
        }
        let limit = Duration::from_millis(self.tuning.peer_down_after_ms);
        let mut gone = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            if !p.down && p.last_seen.elapsed() > limit {
                p.down = true;
                gone.push(*id);
            }
        }
        if !gone.is_empty() {
            // Readers of shards led from a node we no longer hear from are
            // told now, not an election timeout later: they resume elsewhere.
            for (shard, r) in &self.replicas {
                if gone.contains(&r.raw.raft.leader_id) {
                    self.watchers.leader_lost(*shard);
                }
            }
            self.wake_all();
        }
    }

    pub(super) fn tick(&mut self) {
        self.ticks += 1;
        if !self.map_writes.is_empty() {
            self.check_shard_record_writes();
        }
        let hibernate = self.tuning.hibernate_after_ticks;
        let rebalance = self.tuning.rebalance_every_ticks != 0 && self.ticks % self.tuning.rebalance_every_ticks == 0;
        if self.ticks % LEARN_PEERS_EVERY_TICKS == 0 {
            self.learn_peers();
            // The gauges that need a walk over the replicas, about once a
            // second (at the default tick).
            let asleep = self.replicas.values().filter(|r| r.asleep).count();
            let lag: u64 = self
                .replicas
                .values()
                .map(|r| {
                    r.raw
                        .raft
                        .raft_log
                        .committed
                        .saturating_sub(r.raw.raft.raft_log.applied)
                })
                .sum();
            self.drivers
                .report_replicas(self.index, self.replicas.len() - asleep, asleep, lag);
        }
        let collect =
            self.tuning.expire_dedup_every_ticks != 0 && self.ticks % self.tuning.expire_dedup_every_ticks == 0;
        let expire_max = self.engine.options().limits.expire_dedup_entries_max;
        let timeout = Duration::from_millis(self.tuning.request_timeout_ms);
        let node_id = self.node_id;
        let now = Instant::now();
        let ticks = self.ticks;
        // Operators' preferred-leader choices, looked at once a round.
        let preferred = if rebalance {
            self.engine
                .system_scan(
                    META_SHARD,
                    crate::placement::PREFERRED_LEADER_PREFIX,
                    usize::try_from(crate::config::SHARD_COUNT_MAX).unwrap_or(usize::MAX),
                )
                .map(|records| crate::placement::decode_preferred_leaders(&records))
                .unwrap_or_default()
        } else {
            std::collections::BTreeMap::new()
        };
        // Nodes that take no new leadership (draining, removed): the
        // rebalancer must not hand a shard back to one while `phctl node
        // drain` moves leaderships away from it.
        let no_lead: std::collections::BTreeSet<u64> = if rebalance {
            self.engine
                .system_scan(META_SHARD, crate::nodes::NODE_RECORD_PREFIX, crate::nodes::NODES_MAX)
                .map(|records| crate::nodes::decode_states(&records))
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, e)| !crate::nodes::takes_new_work(e.state))
                .map(|(n, _)| n)
                .collect()
        } else {
            std::collections::BTreeSet::new()
        };
        if rebalance {
            // A sleeping leader does not tick, so it would never hand
            // leadership to its preferred node: wake the ones that should.
            let mut wake = Vec::new();
            let map = self.map.clone();
            for (shard, r) in self.replicas.iter_mut() {
                // An operator's or the loop's choice, else the map's (what
                // the placement loop takes as in force). A shard made by a
                // split gets its replica before its map entry, so its
                // replica's own value was 0 (no rebalancing) until this
                // fallback (found by the end-to-end elasticity test).
                if let Some(p) = preferred
                    .get(shard)
                    .copied()
                    .or_else(|| map.shard(*shard).map(|d| d.preferred_leader).filter(|p| *p != 0))
                {
                    r.preferred_leader = p;
                }
                let pref = r.preferred_leader;
                if r.asleep
                    && r.raw.raft.state == StateRole::Leader
                    && pref != node_id
                    && pref != 0
                    && !no_lead.contains(&pref)
                    && r.raw.raft.prs().conf().voters().contains(pref)
                    && !super::replica::moving(*shard, &r.raw.raft)
                {
                    wake.push(*shard);
                }
            }
            for shard in wake {
                self.wake(shard, true);
            }
        }
        for (shard, r) in self.replicas.iter_mut() {
            if r.asleep {
                continue;
            }
            let catching_up = self.catching_up.contains_key(shard);
            if !catching_up {
                // A catching-up replica is not ticked: its election timer
                // would have it campaign (D49). It only follows.
                r.raw.tick();
            }
            self.dirty.insert(*shard);
            if r.raw.raft.leader_id == 0 {
                r.leaderless_ticks = r.leaderless_ticks.saturating_add(1);
                if r.leaderless_ticks > LEADERLESS_TICKS_MAX {
                    self.watchers.leader_lost(*shard);
                }
            } else {
                r.leaderless_ticks = 0;
                // ReadIndex requests that got no answer go again.
                for read in r.reads_inflight.iter_mut() {
                    if ticks.saturating_sub(read.sent_tick) >= READ_RETRY_TICKS {
                        read.sent_tick = ticks;
                        r.raw.read_index(context(node_id, read.id));
                    }
                }
            }
            if rebalance && !no_lead.contains(&r.preferred_leader) {
                maybe_rebalance(node_id, *shard, r, &self.peers);
            }
            if collect && *shard != META_SHARD && r.raw.raft.state == StateRole::Leader {
                // Dedup GC goes through the log like any write, so every
                // replica forgets the same entries at the same index. Nobody
                // waits for the answer: the next round retries what failed.
                let op = cmd::Op {
                    op: Some(cmd::op::Op::ExpireDedup(cmd::ExpireDedupOp {
                        max_entries: expire_max,
                    })),
                };
                let (reply, _) = oneshot::channel();
                r.queued.push_back(QueuedProposal {
                    bytes: op.encoded_len(),
                    ops: vec![op],
                    reply,
                    deadline: now + timeout,
                    queued_at: now,
                    stages: None,
                });
                self.waiting.insert(*shard);
            }
            if hibernate != 0 && is_quiet(r) && !catching_up {
                r.quiet_ticks += 1;
                if r.quiet_ticks >= hibernate {
                    r.asleep = true;
                }
            } else {
                r.quiet_ticks = 0;
            }
            // Reads and proposals that waited too long.
            expire_queued(*shard, r, now);
        }
        self.catch_up_tick();
        if rebalance {
            self.reconcile_meta();
        }
        // Rounds come faster while moves are in flight: each step of a move
        // waits for a round, so the idle pace would add seconds per move.
        let every = if self.moves_in_flight {
            self.tuning.placement_every_ticks.min(PLACEMENT_BUSY_EVERY_TICKS)
        } else {
            self.tuning.placement_every_ticks
        };
        if every != 0 && self.ticks % every == 0 {
            self.placement_round();
        }
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                let waited_ms = ms_since(p.proposed_at);
                for super::replica::Part { reply, .. } in p.parts {
                    let _ = reply.send(Err(ClusterError::Timeout {
                        shard: p.shard,
                        what: "proposal",
                        waited_ms,
                    }));
                }
            }
        }
        let expired: Vec<u64> = self
            .pending_conf
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending_conf.remove(&id) {
                let _ = p.reply.send(Err(ClusterError::Timeout {
                    shard: p.shard,
                    what: "conf change",
                    waited_ms: self.tuning.request_timeout_ms,
                }));
            }
        }
    }

    /// On the metadata group's leader: proposes the membership change that
    /// drops removed nodes from the group and refills its voters from up
    /// learners (`nodes::meta_changes`), one change at a time. A leader
    /// that removes itself proposes its own removal: it leads until the
    /// change commits, then deletes its replica (replica GC), and a voter
    /// that stays is elected after an election timeout. (Handing
    /// leadership away first would shorten that gap, but the rebalancer
    /// hands it back to the group's preferred node while that node is
    /// still a voter.) Nobody waits for the change: the next round looks
    /// again.
    pub(super) fn reconcile_meta(&mut self) {
        let leads = self
            .replicas
            .get(&META_SHARD)
            .is_some_and(|r| r.raw.raft.state == StateRole::Leader);
        if !leads {
            return;
        }
        let states =
            match self
                .engine
                .system_scan(META_SHARD, crate::nodes::NODE_RECORD_PREFIX, crate::nodes::NODES_MAX)
            {
                Ok(records) => crate::nodes::decode_states(&records),
                Err(_) => return, // the engine's failure surfaces on the apply path
            };
        let id = self.next_id();
        let node_id = self.node_id;
        let peers = &self.peers;
        let Some(r) = self.replicas.get_mut(&META_SHARD) else {
            return;
        };
        let cs = r.raw.raft.prs().conf().to_conf_state();
        if r.raw.raft.has_pending_conf() || !cs.voters_outgoing.is_empty() || r.raw.raft.lead_transferee.is_some() {
            return;
        }
        // A learner is promoted only once it holds the committed log and its
        // node is alive (node heartbeats), so a new voter never stalls the
        // group's commits, and a dead one never becomes a voter.
        let committed = r.raw.raft.raft_log.committed;
        let prs = r.raw.raft.prs();
        let caught_up =
            |n: u64| prs.get(n).is_some_and(|p| p.matched >= committed) && peers.get(&n).is_some_and(|p| !p.down);
        let changes = crate::nodes::meta_changes(&cs.voters, &cs.learners, &states, caught_up);
        if changes.is_empty() {
            return;
        }
        if r.raw
            .propose_conf_change(context(node_id, id), crate::node::conf_change_v2(&changes))
            .is_ok()
        {
            self.dirty.insert(META_SHARD);
        }
    }

    /// Queues writes of the shard records this node owes the metadata group.
    /// The record's version is the writer's term: a deposed leader's late
    /// write loses to its successor's.
    pub(super) fn write_shard_records(&mut self) {
        // The metadata replica may be another driver's: the writes go to
        // its inbox then, as a client's proposal would.
        let meta_elsewhere = if self.replicas.contains_key(&META_SHARD) {
            None
        } else {
            match self.drivers.holder(META_SHARD) {
                Some(i) if i != self.index => Some(i),
                _ => return,
            }
        };
        let timeout = Duration::from_millis(self.tuning.request_timeout_ms);
        for shard in std::mem::take(&mut self.map_dirty) {
            let Some(r) = self.replicas.get(&shard) else { continue };
            if r.raw.raft.state != StateRole::Leader {
                continue;
            }
            // raft-rs's configuration holds every conf change handed to
            // apply (`apply::hand_off` feeds them in log order).
            let handed = r.handed;
            let Some(record) = self.shard_record(shard, handed) else {
                continue;
            };
            // Each record's version is its own shard's term.
            let put = |shard: u64, record: &ShardRecord| cmd::Op {
                op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                    key: shard_record_key(shard),
                    value: record.encode_to_vec(),
                    version: record.term,
                    if_version: None,
                })),
            };
            let mut ops = vec![put(shard, &record)];
            // The shards split from it here go in the same command, so the
            // map never shows the parent narrowed without them (D38); so do
            // those of its latest split whose record is still missing (a
            // leader elected since the split).
            let mut children = self.split_children.get(&shard).cloned().unwrap_or_default();
            children.extend(self.unrecorded_children(shard));
            children.sort_unstable();
            children.dedup();
            for child in children {
                if let Some(c) = self.child_record(child) {
                    ops.push(put(child, &c));
                }
            }
            let op_bytes: usize = ops.iter().map(prost::Message::encoded_len).sum();
            let (reply, rx) = oneshot::channel();
            if let Some(i) = meta_elsewhere {
                // A full inbox drops the request with its reply: the write
                // is retried (`check_shard_record_writes`).
                if let Some(tx) = self.drivers.inbox(i) {
                    let _ = tx.try_send(super::Inbound::Propose {
                        shard: META_SHARD,
                        ops,
                        reply,
                        deadline: Instant::now() + timeout,
                        stages: None,
                    });
                }
                self.map_writes.push((shard, rx));
            } else if let Some(meta) = self.replicas.get_mut(&META_SHARD) {
                meta.queued.push_back(QueuedProposal {
                    bytes: op_bytes,
                    ops,
                    reply,
                    deadline: Instant::now() + timeout,
                    queued_at: Instant::now(),
                    stages: None,
                });
                self.waiting.insert(META_SHARD);
                self.map_writes.push((shard, rx));
            }
        }
        if !self.map_writes.is_empty() && meta_elsewhere.is_none() {
            self.wake(META_SHARD, true);
        }
    }

    /// Retries record writes that failed for a retryable reason (no leader
    /// for the metadata group yet, a timeout) while this node still leads.
    pub(super) fn check_shard_record_writes(&mut self) {
        let mut retry = Vec::new();
        let mut written = Vec::new();
        self.map_writes.retain_mut(|(shard, rx)| match rx.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => true,
            Ok(Ok(results)) => {
                // A StaleVersion means a newer leader wrote already: done.
                let _ = results;
                written.push(*shard);
                false
            }
            Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => {
                retry.push(*shard);
                false
            }
        });
        self.map_dirty.extend(retry);
        for shard in written {
            self.split_children.remove(&shard);
        }
    }
}
