//! Step 7 of the loop: applying what every shard committed in one engine
//! write, feeding conf changes to raft-rs in log order, answering the
//! callers on this node from the local results, and waking the readers of
//! the mailboxes that changed.

use super::replica::{fail_all, is_member, parse_context, Pending};
use super::{ms_since, Driver};
use crate::error::ClusterError;
use crate::placement::META_SHARD;
use pigeonhole_engine::raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType};
use pigeonhole_engine::raft::StateRole;
use pigeonhole_engine::{ApplyEntry, Durability, EntryKind, EntryOutcome};
use protobuf::Message as _;

impl Driver {
    /// Applies what every shard committed this turn in ONE engine write,
    /// then answers whoever on this node waits for those entries.
    pub(super) fn apply_all(&mut self, work: &[(u64, Vec<Entry>)]) -> Result<(), ClusterError> {
        // (shard, index into `work`, entries for the engine)
        let mut batches: Vec<(u64, usize, Vec<ApplyEntry<'_>>)> = Vec::with_capacity(work.len());
        let mut conf_replies = Vec::new();
        let mut removed = Vec::new();
        for (w, (shard, entries)) in work.iter().enumerate() {
            let shard = *shard;
            if entries.is_empty() {
                continue;
            }
            let Some(r) = self.replicas.get_mut(&shard) else {
                continue;
            };
            let mut batch = Vec::with_capacity(entries.len());
            let mut last_conf = None;
            for e in entries {
                let kind = match e.get_entry_type() {
                    EntryType::EntryNormal if e.data.is_empty() => EntryKind::Empty,
                    EntryType::EntryNormal => EntryKind::Command(&e.data),
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
                        last_conf = Some(cs.clone());
                        if shard != META_SHARD && r.raw.raft.state == StateRole::Leader {
                            self.map_dirty.insert(shard);
                        }
                        if let Some((node, id)) = parse_context(&e.context) {
                            if node == self.node_id {
                                conf_replies.push((id, cs.clone()));
                            }
                        }
                        EntryKind::ConfChange(cs)
                    }
                };
                batch.push(ApplyEntry {
                    index: e.index,
                    term: e.term,
                    kind,
                });
            }
            if last_conf.is_some_and(|cs| !is_member(&cs, self.node_id)) {
                removed.push(shard);
            }
            batches.push((shard, w, batch));
        }
        if batches.is_empty() {
            return Ok(());
        }
        let refs: Vec<(u64, &[ApplyEntry<'_>])> = batches.iter().map(|(s, _, b)| (*s, b.as_slice())).collect();
        // The Raft log is durable, so the apply need not be: after a crash
        // the unsynced tail of applies is replayed from the log. The next
        // fsync'd Raft write makes these durable too (same WAL, in order).
        let outcomes = self.engine.apply_many(&refs, Durability::NoFsync)?;
        drop(refs);
        for ((_, w, _), outcomes) in batches.iter().zip(outcomes) {
            let Some((_, entries)) = work.get(*w) else {
                continue;
            };
            for (e, outcome) in entries.iter().zip(outcomes) {
                if let EntryOutcome::Command { changed, .. } = &outcome {
                    self.watchers.mailboxes_changed(changed);
                }
                let Some((node, id)) = parse_context(&e.context) else {
                    continue;
                };
                if node != self.node_id {
                    continue;
                }
                if let Some(p) = self.pending.remove(&id) {
                    answer(p, outcome);
                }
            }
        }
        for (id, cs) in conf_replies {
            if let Some(p) = self.pending_conf.remove(&id) {
                let _ = p.reply.send(Ok(cs));
            }
        }
        for shard in removed {
            self.remove_replica(shard);
        }
        Ok(())
    }

    pub(super) fn remove_replica(&mut self, shard: u64) {
        self.watchers.leader_lost(shard);
        if let Some(r) = self.replicas.remove(&shard) {
            fail_all(shard, r, |shard| ClusterError::NotReplica {
                shard,
                node: self.node_id,
                replicas: Vec::new(),
            });
        }
    }
}

pub(super) fn answer(p: Pending, outcome: EntryOutcome) {
    match outcome {
        EntryOutcome::Command { results, .. } => {
            let mut it = results.into_iter();
            for (reply, n) in p.parts {
                let _ = reply.send(Ok(it.by_ref().take(n).collect()));
            }
        }
        EntryOutcome::Rejected(e) => {
            for (reply, n) in p.parts {
                let _ = reply.send(Ok(vec![Err(e.clone()); n]));
            }
        }
        // Applied before (via a snapshot): the results are not known here.
        EntryOutcome::AlreadyApplied | EntryOutcome::Applied => {
            for (reply, _) in p.parts {
                let _ = reply.send(Err(ClusterError::Timeout {
                    shard: p.shard,
                    what: "proposal (applied by snapshot, result unknown)",
                    waited_ms: ms_since(p.proposed_at),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pigeonhole_engine::{OpError, OpOutput};
    use std::time::Instant;
    use tokio::sync::oneshot;

    type Rx = oneshot::Receiver<crate::driver::ProposeResult>;

    /// A pending entry owned by callers with `sizes` ops each.
    fn pending(sizes: &[usize]) -> (Pending, Vec<Rx>) {
        let mut parts = Vec::new();
        let mut rxs = Vec::new();
        for n in sizes {
            let (tx, rx) = oneshot::channel();
            parts.push((tx, *n));
            rxs.push(rx);
        }
        let p = Pending {
            shard: 1,
            parts,
            deadline: Instant::now(),
            proposed_at: Instant::now(),
        };
        (p, rxs)
    }

    fn appended(seq: u64) -> Result<OpOutput, OpError> {
        Ok(OpOutput::Appended {
            seq,
            duplicate: false,
            time_ms: 0,
        })
    }

    #[test]
    fn each_caller_gets_its_own_ops_results_in_order() {
        let (p, mut rxs) = pending(&[2, 1, 3]);
        let results = (1..=6).map(appended).collect();
        answer(
            p,
            EntryOutcome::Command {
                time_ms: 0,
                results,
                changed: Vec::new(),
            },
        );
        let got: Vec<Vec<u64>> = rxs
            .iter_mut()
            .map(|rx| {
                rx.try_recv()
                    .unwrap()
                    .unwrap()
                    .into_iter()
                    .map(|r| match r {
                        Ok(OpOutput::Appended { seq, .. }) => seq,
                        other => panic!("{other:?}"),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(got, vec![vec![1, 2], vec![3], vec![4, 5, 6]]);
    }

    #[test]
    fn a_rejected_entry_fails_every_op_and_an_unknown_outcome_is_a_timeout() {
        let (p, mut rxs) = pending(&[2, 1]);
        answer(p, EntryOutcome::Rejected(OpError::MalformedCommand("x".into())));
        assert_eq!(rxs[0].try_recv().unwrap().unwrap().len(), 2);
        assert!(rxs[1].try_recv().unwrap().unwrap().iter().all(Result::is_err));
        let (p, mut rxs) = pending(&[1]);
        answer(p, EntryOutcome::AlreadyApplied);
        assert!(matches!(rxs[0].try_recv().unwrap(), Err(ClusterError::Timeout { .. })));
    }
}
