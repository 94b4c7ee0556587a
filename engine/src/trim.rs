//! Everything that removes messages from a mailbox: Trim, Delete, a
//! namespace's retention policy (D43), and the legal hold that stops them
//! all. Each removed live message starts its key's dedup window (D8),
//! whose length the op carries (the namespace's policy).
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
//! Which mailboxes a pass sees: every mailbox of the namespace that ever
//! had a message, from the mailbox directory (`shard | 07 | mb`, written
//! by a mailbox's first append), read with one prefix-mode scan per op.
//! Why a directory: the data CF's memtable is a hash of per-mailbox
//! buckets, so stepping from mailbox to mailbox through message keys needs
//! a total-order iterator, which RocksDB builds by copying the whole
//! memtable (D33), once per step; the directory is one bucket per shard.

use crate::apply::{OpResult, StateMachine};
use crate::error::{EngineError, OpError};
use crate::keys::{self, len_u64, CF_DATA};
use crate::outcome::OpOutput;
use crate::records::{decode_cursor, encode_marker, MailboxMeta, MessageView};
use pigeonhole_proto::internal::v1 as cmd;

/// A message a trim removes: (key, seq, idempotency key if live, payload bytes).
type Doomed = (Vec<u8>, u64, Option<Vec<u8>>, u64);

impl StateMachine<'_, '_, '_> {
    /// Starts the dedup window of a message that stops being stored.
    /// `window_ms` 0 is the engine's default window.
    fn start_dedup_window(&mut self, mb: &[u8], seq: u64, idem: &[u8], window_ms: u64) -> Result<(), EngineError> {
        let window_ms = if window_ms == 0 {
            self.engine.options().dedup_window_ms
        } else {
            window_ms
        };
        let dk = keys::dedup(self.space, mb, idem);
        if let Some(mut d) = self.dedup(&dk)? {
            // The key may since have been reused for a newer message (after an
            // earlier window ended); only the entry for this seq is ours.
            if d.seq == seq && d.expires_ms == 0 {
                d.expires_ms = self.now_ms.saturating_add(window_ms).max(1);
                self.txn
                    .put(keys::dedup_expiry(self.space, d.expires_ms, mb, idem), &encode_marker());
                self.txn.put(dk, &d.encode());
            }
        }
        Ok(())
    }

    pub(crate) fn trim(&mut self, t: &cmd::TrimOp) -> OpResult {
        let (mb, mut meta) = self.mailbox(&t.namespace, &t.user_id)?;
        if meta.held {
            return Ok(Err(OpError::LegalHold));
        }
        if t.up_to_seq > meta.last_seq {
            return Ok(Err(OpError::TrimBeyondLastSeq {
                up_to_seq: t.up_to_seq,
                last_seq: meta.last_seq,
            }));
        }
        if t.up_to_seq < meta.low_watermark {
            return Ok(Ok(OpOutput::Trimmed {
                low_watermark: meta.low_watermark,
                removed: 0,
            }));
        }
        let removed = self.trim_to(&mb, &mut meta, t.up_to_seq, t.dedup_window_ms)?;
        self.changed.push(crate::mailbox_fingerprint(&t.namespace, &t.user_id));
        Ok(Ok(OpOutput::Trimmed {
            low_watermark: meta.low_watermark,
            removed,
        }))
    }

    /// Removes `mb`'s messages `[low_watermark, up_to_seq]` (the caller
    /// checked `low_watermark <= up_to_seq <= last_seq`), starts their
    /// keys' dedup windows, and records the new head; returns how many.
    pub(crate) fn trim_to(
        &mut self,
        mb: &[u8],
        meta: &mut MailboxMeta,
        up_to_seq: u64,
        window_ms: u64,
    ) -> Result<u64, EngineError> {
        let start = keys::message(self.space, mb, meta.low_watermark);
        let end = keys::message(self.space, mb, up_to_seq + 1);
        // (key, seq, live idempotency key, payload bytes)
        let mut doomed: Vec<Doomed> = Vec::new();
        self.txn.scan(&start, &end, |k, body| {
            let v = MessageView::decode(k, body)?;
            let seq = keys::checked_message_seq(k)?;
            let idem = (!v.deleted).then(|| v.idempotency_key.to_vec());
            doomed.push((k.to_vec(), seq, idem, len_u64(v.payload)));
            Ok(())
        })?;
        let expected = up_to_seq - meta.low_watermark + 1;
        if len_u64(&doomed) != expected {
            return Err(EngineError::corruption(
                CF_DATA,
                &start,
                format!(
                    "mailbox should store {expected} messages in the trimmed range, found {}",
                    doomed.len()
                ),
            ));
        }
        for (key, seq, idem, bytes) in doomed {
            if let Some(idem) = idem {
                self.start_dedup_window(mb, seq, &idem, window_ms)?;
                meta.payload_bytes = meta.payload_bytes.saturating_sub(bytes);
            }
            self.txn.delete(key);
        }
        meta.low_watermark = up_to_seq + 1;
        self.put_mailbox(mb, meta, true);
        Ok(expected)
    }

    pub(crate) fn delete(&mut self, d: &cmd::DeleteOp) -> OpResult {
        let (mb, mut meta) = self.mailbox(&d.namespace, &d.user_id)?;
        if meta.held {
            return Ok(Err(OpError::LegalHold));
        }
        if d.seq < meta.low_watermark || d.seq > meta.last_seq {
            return Ok(Err(OpError::SeqNotFound {
                seq: d.seq,
                low_watermark: meta.low_watermark,
                last_seq: meta.last_seq,
            }));
        }
        let key = keys::message(self.space, &mb, d.seq);
        let body = self.txn.get(&key)?.ok_or_else(|| {
            EngineError::corruption(CF_DATA, &key, "message inside [low_watermark, last_seq] is missing")
        })?;
        let v = MessageView::decode(&key, &body)?;
        if v.deleted {
            return Ok(Ok(OpOutput::Deleted { deleted: false }));
        }
        let idem = v.idempotency_key.to_vec();
        meta.payload_bytes = meta.payload_bytes.saturating_sub(len_u64(v.payload));
        let tomb = MessageView {
            time_ms: v.time_ms,
            idempotency_key: &idem,
            payload: &[],
            deleted: true,
        };
        self.txn.put(key, &tomb.encode());
        self.start_dedup_window(&mb, d.seq, &idem, d.dedup_window_ms)?;
        self.put_mailbox(&mb, &meta, true);
        self.changed.push(crate::mailbox_fingerprint(&d.namespace, &d.user_id));
        Ok(Ok(OpOutput::Deleted { deleted: true }))
    }

    pub(crate) fn retain(&mut self, r: &cmd::RetainOp) -> OpResult {
        let ns_start = keys::namespace_dir(self.space, &r.namespace);
        let Some(ns_end) = keys::prefix_end(&ns_start) else {
            return Ok(Ok(OpOutput::Retained {
                mailboxes: 0,
                removed: 0,
                next: None,
            }));
        };
        let at = if r.from_mailbox.is_empty() {
            ns_start
        } else {
            keys::mailbox_dir(self.space, &r.from_mailbox)
        };
        // The op's mailboxes, and the one the next op starts at: one scan
        // of the directory's bucket (prefix mode), through the batch's
        // pending writes, before any trim of this op writes.
        let visit_max = usize::try_from(r.mailboxes_max).unwrap_or(usize::MAX);
        let mut mailboxes: Vec<Vec<u8>> = Vec::with_capacity(visit_max.min(1_024) + 1);
        self.txn
            .scan_limited(&at, &ns_end, visit_max.saturating_add(1), |k, _| {
                let mb = k
                    .get(9..)
                    .filter(|mb| crate::split::mailbox_hash(mb).is_some())
                    .ok_or_else(|| EngineError::corruption(CF_DATA, k, "directory key names no parsable mailbox"))?;
                mailboxes.push(mb.to_vec());
                Ok(true)
            })?;
        let mut next = (mailboxes.len() > visit_max).then(|| mailboxes.pop()).flatten();
        // Messages appended at or before `cutoff` are past the TTL.
        let cutoff = (r.ttl_ms != 0).then(|| self.now_ms.checked_sub(r.ttl_ms)).flatten();
        let mut budget = u64::from(r.messages_max);
        let (mut visited, mut removed) = (0u64, 0u64);
        for mb in mailboxes {
            visited += 1;
            // A shared space (D38) holds the other half's mailboxes too:
            // visited (so the op stays bounded) but not touched.
            let hash = crate::split::checked_mailbox_hash(&mb)?;
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
                next = Some(mbk);
                break;
            }
        }
        Ok(Ok(OpOutput::Retained {
            mailboxes: visited,
            removed,
            next,
        }))
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
            // monotonic), so the old messages are a prefix: read up to the
            // first one that is not.
            let start = keys::message(self.space, mb, low);
            let end = keys::message(self.space, mb, cap.saturating_add(1));
            self.txn.scan_while(&start, &end, |k, body| {
                if MessageView::decode(k, body)?.time_ms > cutoff {
                    return Ok(false);
                }
                up_to = up_to.max(keys::checked_message_seq(k)?);
                Ok(true)
            })?;
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
