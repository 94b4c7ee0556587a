//! Retention and legal holds (D43): the state machine's side of a
//! namespace's retention policy.
//!
//! Why retention is an op in the log and not a timer on each replica: the
//! policy lives in the metadata group and time on a replica is the shard
//! clock, so the shard leader proposes a `RetainOp` carrying the policy and
//! every replica trims the same messages at the same index, as trims do.
//! The op is the policy applied to a slice of the namespace's mailboxes:
//! it visits them in key order from `from_mailbox`, at most
//! `mailboxes_max` of them, removes at most `messages_max` messages, and
//! returns where the next op starts, so one entry's apply is bounded
//! whatever the policy and the mailboxes' sizes.
//!
//! Which mailboxes a pass sees: those with at least one stored message
//! key (a live message or a tombstone), found by stepping through the
//! namespace's message keys one mailbox at a time (one seek each). A
//! mailbox with none has nothing to trim.

use crate::apply::{OpResult, StateMachine};
use crate::error::EngineError;
use crate::keys::{self, CF_DATA};
use crate::outcome::OpOutput;
use crate::records::{decode_cursor, MailboxMeta, MessageView};
use pigeonhole_proto::internal::v1 as cmd;

impl StateMachine<'_, '_, '_> {
    pub(crate) fn retain(&mut self, r: &cmd::RetainOp) -> OpResult {
        let ns_start = keys::namespace_messages(self.space, &r.namespace);
        let done = |mailboxes, removed, next| {
            Ok(Ok(OpOutput::Retained {
                mailboxes,
                removed,
                next,
            }))
        };
        let Some(ns_end) = keys::prefix_end(&ns_start) else {
            return done(0, 0, None);
        };
        let mut at = if r.from_mailbox.is_empty() {
            ns_start
        } else {
            keys::message_prefix(self.space, &r.from_mailbox)
        };
        // Messages appended at or before `cutoff` are past the TTL.
        let cutoff = (r.ttl_ms != 0).then(|| self.now_ms.checked_sub(r.ttl_ms)).flatten();
        let mut budget = u64::from(r.messages_max);
        let (mut visited, mut removed) = (0u64, 0u64);
        loop {
            let Some(mb) = self.next_mailbox(&at, &ns_end)? else {
                return done(visited, removed, None);
            };
            if visited == u64::from(r.mailboxes_max) {
                return done(visited, removed, Some(mb));
            }
            visited += 1;
            at = keys::prefix_end(&keys::message_prefix(self.space, &mb)).unwrap_or_else(|| ns_end.clone());
            // A shared space (D38) holds the other half's mailboxes too:
            // visited (so the op stays bounded) but not touched.
            let hash = crate::split::mailbox_hash(&mb)
                .ok_or_else(|| EngineError::corruption(CF_DATA, &mb, "message key names no parsable mailbox"))?;
            if !self.range.is_full() && !self.range.contains(hash) {
                continue;
            }
            let uid = mb.get(1 + r.namespace.len() + 2..).unwrap_or_default().to_vec();
            let (mbk, mut meta) = self.mailbox(&r.namespace, &uid)?;
            if meta.held {
                continue;
            }
            if let Some(up_to) = self.retain_target(&mbk, &meta, r, cutoff, budget)? {
                let n = self.trim_to(&mbk, &mut meta, up_to, r.dedup_window_ms)?;
                removed += n;
                budget = budget.saturating_sub(n);
                self.changed.push(crate::mailbox_fingerprint(&r.namespace, &uid));
            }
            if budget == 0 {
                // It may have more past the budget: the next op starts here.
                return done(visited, removed, Some(mbk));
            }
        }
    }

    /// The first mailbox with a message key in `[at, end)`, as its encoded
    /// id.
    fn next_mailbox(&self, at: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        let mut found = None;
        self.txn.scan_across(at, end, 1, |k, _| {
            let mb = k
                .get(9..)
                .and_then(keys::split_mailbox)
                .map(|(mb, _)| mb.to_vec())
                .ok_or_else(|| EngineError::corruption(CF_DATA, k, "message key names no parsable mailbox"))?;
            found = Some(mb);
            Ok(true)
        })?;
        Ok(found)
    }

    /// The seq the policy trims `mb` up to, if it trims anything: the
    /// highest of what the TTL, the per-mailbox maximum and the devices'
    /// acks let go, and at most `budget` messages past the low watermark.
    fn retain_target(
        &self,
        mb: &[u8],
        meta: &MailboxMeta,
        r: &cmd::RetainOp,
        cutoff: Option<u64>,
        budget: u64,
    ) -> Result<Option<u64>, EngineError> {
        let (low, last) = (meta.low_watermark, meta.last_seq);
        if last < low || budget == 0 {
            return Ok(None);
        }
        let mut up_to = low - 1;
        if r.messages_per_mailbox_max != 0 && last - up_to > r.messages_per_mailbox_max {
            up_to = up_to.max(last - r.messages_per_mailbox_max);
        }
        if r.trim_acked && meta.cursor_count > 0 {
            let mut min = u64::MAX;
            let start = keys::cursor_prefix(self.space, mb);
            let end = keys::prefix_end(&start).unwrap_or_default();
            self.txn.scan(&start, &end, |k, body| {
                min = min.min(decode_cursor(k, body)?);
                Ok(())
            })?;
            if min != u64::MAX {
                up_to = up_to.max(min.min(last));
            }
        }
        let cap = (low - 1).saturating_add(budget).min(last);
        if let Some(cutoff) = cutoff {
            // Times never fall along a mailbox (the shard clock is
            // monotonic), so the first message says whether any is old
            // enough, and the old ones are a prefix.
            let start = keys::message(self.space, mb, low);
            let end = keys::message(self.space, mb, cap.saturating_add(1));
            let mut first_old = false;
            self.txn.scan_limited(
                &start,
                &keys::message(self.space, mb, low.saturating_add(1)),
                1,
                |k, body| {
                    first_old = MessageView::decode(k, body)?.time_ms <= cutoff;
                    Ok(true)
                },
            )?;
            if first_old {
                self.txn.scan(&start, &end, |k, body| {
                    if MessageView::decode(k, body)?.time_ms <= cutoff {
                        up_to = up_to.max(keys::checked_message_seq(k)?);
                    }
                    Ok(())
                })?;
            }
        }
        let up_to = up_to.min(cap);
        Ok((up_to >= low).then_some(up_to))
    }

    pub(crate) fn hold(&mut self, h: &cmd::HoldOp) -> OpResult {
        let (mb, mut meta) = self.mailbox(&h.namespace, &h.user_id)?;
        if meta.held == h.held {
            return Ok(Ok(OpOutput::Held {
                held: h.held,
                changed: false,
            }));
        }
        meta.held = h.held;
        self.put_mailbox(&mb, &meta, true);
        Ok(Ok(OpOutput::Held {
            held: h.held,
            changed: true,
        }))
    }
}
