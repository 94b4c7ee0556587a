//! The model's trims, deletes and retention (`Model::trim_to`,
//! `Model::retain`): the half of `model.rs`'s model that removes messages
//! and starts their keys' dedup windows.

use super::*;

impl Model {
    /// Removes `[low, up_to]` of a mailbox (low <= up_to <= last_seq) and
    /// starts the removed live messages' windows; returns how many.
    pub(super) fn trim_to(&mut self, ns: &str, uid: &[u8], up_to: u64, window: u64) -> u64 {
        let id = (ns.to_string(), uid.to_vec());
        let b = self.boxes.get_mut(&id).unwrap();
        let removed = up_to - b.low + 1;
        let doomed: Vec<(u64, Msg)> = b.msgs.range(..=up_to).map(|(s, m)| (*s, m.clone())).collect();
        b.low = up_to + 1;
        for (seq, m) in doomed {
            self.boxes.get_mut(&id).unwrap().msgs.remove(&seq);
            if !m.deleted {
                self.start_window(ns, uid, seq, &m.key, window);
            }
        }
        removed
    }

    /// Retention, written from its specification (D43): the namespace's
    /// mailboxes that ever had a message, in encoded-id order from
    /// `from_mailbox`; held ones visited and passed over; each trimmed up
    /// to the highest seq the TTL, the maximum and the acks let go, within
    /// what is left of the op's message budget.
    pub(super) fn retain(&mut self, r: &pigeonhole_engine::command::RetainOp) -> Result<OpOutput, OpError> {
        let invalid = |field: &'static str| OpError::InvalidArgument {
            field,
            reason: String::new(),
        };
        if r.mailboxes_max == 0 || r.mailboxes_max > pigeonhole_engine::RETAIN_MAILBOXES_MAX {
            return Err(invalid("retain.mailboxes_max"));
        }
        if r.messages_max == 0 || r.messages_max > pigeonhole_engine::RETAIN_MESSAGES_MAX {
            return Err(invalid("retain.messages_max"));
        }
        let ns_key = mb_key(&r.namespace, b"");
        let ns_prefix = &ns_key[..1 + r.namespace.len()];
        if !r.from_mailbox.is_empty() && !r.from_mailbox.starts_with(ns_prefix) {
            return Err(invalid("retain.from_mailbox"));
        }
        let mut ids: Vec<(Vec<u8>, Vec<u8>)> = self
            .boxes
            .iter()
            // Every mailbox that ever had a message (the directory).
            .filter(|((n, _), b)| *n == r.namespace && b.last_seq >= 1)
            .map(|((n, u), _)| (mb_key(n, u), u.clone()))
            .filter(|(k, _)| *k >= r.from_mailbox)
            .collect();
        ids.sort();
        let cutoff = if r.ttl_ms == 0 {
            None
        } else {
            self.time.checked_sub(r.ttl_ms)
        };
        let mut budget = u64::from(r.messages_max);
        let (mut visited, mut removed) = (0, 0);
        for (k, uid) in ids {
            if visited == u64::from(r.mailboxes_max) {
                return Ok(OpOutput::Retained {
                    mailboxes: visited,
                    removed,
                    next: Some(k),
                });
            }
            visited += 1;
            let b = &self.boxes[&(r.namespace.clone(), uid.clone())];
            if b.held {
                continue;
            }
            let (low, last) = (b.low, b.last_seq);
            if last < low {
                continue; // everything trimmed already
            }
            let mut up = low - 1;
            if r.messages_per_mailbox_max != 0 && last - up > r.messages_per_mailbox_max {
                up = up.max(last - r.messages_per_mailbox_max);
            }
            if r.trim_acked {
                if let Some(min) = b.cursors.values().min() {
                    up = up.max(*min);
                }
            }
            let cap = (low - 1 + budget).min(last);
            if let Some(cutoff) = cutoff {
                for (seq, m) in b.msgs.range(low..=cap) {
                    if m.time <= cutoff {
                        up = up.max(*seq);
                    }
                }
            }
            let up = up.min(cap);
            if up >= low {
                let n = self.trim_to(&r.namespace, &uid, up, r.dedup_window_ms);
                removed += n;
                budget -= n;
            }
            if budget == 0 {
                return Ok(OpOutput::Retained {
                    mailboxes: visited,
                    removed,
                    next: Some(k),
                });
            }
        }
        // The specification, said independently of the steps above: the
        // op stays within its bounds, and a pass that reached the end left
        // nothing its policy lets go in a mailbox it may trim.
        assert!(removed <= u64::from(r.messages_max) && visited <= u64::from(r.mailboxes_max));
        for ((n, u), b) in &self.boxes {
            if *n != r.namespace || b.held || b.last_seq == 0 || mb_key(n, u) < r.from_mailbox {
                continue;
            }
            let stored = b.last_seq + 1 - b.low;
            assert!(
                r.messages_per_mailbox_max == 0 || stored <= r.messages_per_mailbox_max,
                "{b:?}"
            );
            if let Some(cutoff) = cutoff {
                assert!(b.msgs.values().all(|m| m.time > cutoff), "{b:?}");
            }
            if let (true, Some(min)) = (r.trim_acked, b.cursors.values().min()) {
                assert!(b.low > *min, "{b:?}");
            }
        }
        Ok(OpOutput::Retained {
            mailboxes: visited,
            removed,
            next: None,
        })
    }
}
