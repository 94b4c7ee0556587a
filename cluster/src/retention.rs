//! Retention policies, applied (issue 14, part 4; D43; docs/operations.md
//! "Retention").
//!
//! A namespace's policy (TTL, messages per mailbox, trimming what every
//! device acked, a namespace-wide legal hold, the dedup window) is part of
//! its record in the metadata group. About once a second each node reads
//! the records (after a read barrier, so a lagging metadata replica does
//! not lag the policy) and, for every data shard it leads and every namespace with a policy, proposes a
//! `RetainOp` carrying that policy; the state machine trims what the policy
//! lets go, the same on every replica at the same index, with the shard's
//! clock (pigeonhole_engine's `retain`). So a TTL survives leader changes
//! and restarts for free: the messages' times are in the state machine and
//! the next leader proposes the next op.
//!
//! Bounds: one op visits at most [`RetentionCheck::mailboxes_per_op`]
//! mailboxes and removes at most [`RetentionCheck::messages_per_op`]
//! messages, and a round proposes at most [`RetentionCheck::ops_per_round`]
//! of them per shard and namespace, resuming where the last op stopped. A
//! pass that found nothing to trim waits [`RetentionCheck::idle_every`]
//! before the next, so an idle shard gets one small entry per namespace
//! with a policy every 10 s, not every second (it does not hibernate while
//! a policy applies to it).
//!
//! What it does not do: a namespace-wide hold stops proposals at each
//! node's next round (each round reads the records after a barrier); a
//! retain op proposed just before the hold still applies, so a hold takes
//! effect within about a second. A mailbox's own hold is in its state
//! machine and is exact.

use crate::node::Node;
use crate::placement::META_SHARD;
use crate::Role;
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::OpOutput;
use pigeonhole_proto::internal::v1::NamespaceRecord;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The retention loop's settings.
#[derive(Debug, Clone, Copy)]
pub struct RetentionCheck {
    /// How often the loop looks at the shards this node leads.
    pub interval: Duration,
    /// Mailboxes one op visits, at most (the engine allows 1 to 1,000).
    pub mailboxes_per_op: u32,
    /// Messages one op removes, at most (the engine allows 1 to 10,000).
    pub messages_per_op: u32,
    /// Ops proposed per shard and namespace in one round, at most.
    pub ops_per_round: u32,
    /// After a pass that removed nothing, the next pass waits this long.
    pub idle_every: Duration,
}

impl Default for RetentionCheck {
    fn default() -> Self {
        RetentionCheck {
            interval: Duration::from_secs(1),
            mailboxes_per_op: 1_000,
            messages_per_op: 10_000,
            ops_per_round: 8,
            idle_every: Duration::from_secs(10),
        }
    }
}

/// Where a shard's pass over a namespace stands.
#[derive(Debug, Default)]
struct Pass {
    /// The mailbox the next op starts at (empty: a new pass).
    from: Vec<u8>,
    /// Messages removed since the pass started.
    removed: u64,
    /// No new pass before this.
    not_before: Option<Instant>,
    /// The policy the pass runs under: a changed policy starts over.
    policy: NamespaceRecord,
}

/// Whether a namespace's record asks for any trimming.
pub fn has_policy(r: &NamespaceRecord) -> bool {
    !r.legal_hold && (r.ttl_ms != 0 || r.messages_per_mailbox_max != 0 || r.trim_acked)
}

/// The op that applies `r`'s policy from `from`.
pub fn retain_op(r: &NamespaceRecord, from: Vec<u8>, cfg: &RetentionCheck) -> cmd::Op {
    cmd::Op {
        op: Some(cmd::op::Op::Retain(cmd::RetainOp {
            namespace: r.name.clone(),
            ttl_ms: r.ttl_ms,
            messages_per_mailbox_max: r.messages_per_mailbox_max,
            trim_acked: r.trim_acked,
            dedup_window_ms: r.dedup_window_ms,
            from_mailbox: from,
            mailboxes_max: cfg.mailboxes_per_op,
            messages_max: cfg.messages_per_op,
        })),
    }
}

/// Starts the loop on `node`.
pub fn spawn(node: &Node, cfg: RetentionCheck) -> tokio::task::JoinHandle<()> {
    let weak = node.downgrade();
    tokio::spawn(async move {
        let mut passes: BTreeMap<(u64, String), Pass> = BTreeMap::new();
        loop {
            tokio::time::sleep(cfg.interval).await;
            let Some(node) = weak.upgrade() else { return };
            if round(&node, &cfg, &mut passes).await.is_err() {
                return; // the node stopped
            }
        }
    })
}

async fn round(node: &Node, cfg: &RetentionCheck, passes: &mut BTreeMap<(u64, String), Pass>) -> Result<(), ()> {
    // The records after a read barrier on the metadata group, not this
    // node's copy: a node whose metadata replica lags must not go on
    // trimming a namespace put under a legal hold.
    let Ok(state) = node.namespaces().await else {
        return Ok(()); // no metadata leader now: the next round
    };
    let records = state.namespaces;
    let policies: Vec<&NamespaceRecord> = records.iter().filter(|r| has_policy(r)).collect();
    if policies.is_empty() {
        passes.clear();
        return Ok(());
    }
    let statuses = node.status().await.map_err(|_| ())?;
    let leading: Vec<u64> = statuses
        .iter()
        .filter(|s| s.role == Role::Leader && s.shard != META_SHARD)
        .map(|s| s.shard)
        .collect();
    passes
        .retain(|(shard, ns), p| leading.contains(shard) && policies.iter().any(|r| r.name == *ns && **r == p.policy));
    for shard in leading {
        for r in &policies {
            let pass = passes.entry((shard, r.name.clone())).or_insert_with(|| Pass {
                policy: (*r).clone(),
                ..Pass::default()
            });
            if pass.not_before.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            pass.not_before = None;
            for _ in 0..cfg.ops_per_round {
                let op = retain_op(r, pass.from.clone(), cfg);
                let next = match node.propose(shard, vec![op]).await {
                    Ok(mut res) => match res.pop() {
                        Some(Ok(OpOutput::Retained { removed, next, .. })) => {
                            pass.removed += removed;
                            next
                        }
                        Some(Err(e)) => {
                            tracing::warn!("retention of namespace {:?} on shard {shard} refused: {e}", r.name);
                            None
                        }
                        _ => None,
                    },
                    // A timeout, no quorum, or not the leader any more: the
                    // pass resumes where it stood at the next round (here,
                    // or dropped if another node leads by then).
                    Err(_) => break,
                };
                match next {
                    Some(from) => pass.from = from,
                    None => {
                        if pass.removed == 0 {
                            pass.not_before = Some(Instant::now() + cfg.idle_every);
                        }
                        pass.removed = 0;
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_record_that_trims_and_is_not_held_has_a_policy() {
        let mut r = NamespaceRecord {
            name: "n".into(),
            appends_per_s: 10,
            ..NamespaceRecord::default()
        };
        assert!(!has_policy(&r), "limits alone are no retention");
        for set in [
            |r: &mut NamespaceRecord| r.ttl_ms = 1_000,
            |r: &mut NamespaceRecord| r.messages_per_mailbox_max = 5,
            |r: &mut NamespaceRecord| r.trim_acked = true,
        ] {
            let mut p = r.clone();
            set(&mut p);
            assert!(has_policy(&p));
            p.legal_hold = true;
            assert!(!has_policy(&p), "a held namespace is not trimmed");
        }
        r.dedup_window_ms = 5;
        assert!(!has_policy(&r), "a dedup window alone trims nothing");
    }

    #[test]
    fn the_op_carries_the_policy_and_the_bounds() {
        let r = NamespaceRecord {
            name: "n".into(),
            ttl_ms: 60_000,
            messages_per_mailbox_max: 7,
            trim_acked: true,
            dedup_window_ms: 9,
            ..NamespaceRecord::default()
        };
        let cfg = RetentionCheck::default();
        let Some(cmd::op::Op::Retain(op)) = retain_op(&r, b"from".to_vec(), &cfg).op else {
            unreachable!("retain_op makes a RetainOp")
        };
        assert_eq!(
            (
                op.namespace.as_str(),
                op.ttl_ms,
                op.messages_per_mailbox_max,
                op.trim_acked,
                op.dedup_window_ms
            ),
            ("n", 60_000, 7, true, 9)
        );
        assert_eq!(
            (op.from_mailbox, op.mailboxes_max, op.messages_max),
            (b"from".to_vec(), 1_000, 10_000)
        );
        let limits = pigeonhole_engine::Limits::default();
        assert!(limits
            .check_op(&cmd::op::Op::Retain(cmd::RetainOp {
                from_mailbox: Vec::new(),
                ..match retain_op(&r, Vec::new(), &cfg).op {
                    Some(cmd::op::Op::Retain(o)) => o,
                    _ => cmd::RetainOp::default(),
                }
            }))
            .is_ok());
    }
}
