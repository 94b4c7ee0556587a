//! Shard split in place (D38): a shard's hash range is cut in two, and the
//! upper half becomes a new shard on the same replica, at the split entry's
//! index, with the same configuration. Nothing is copied: the new shard's
//! rows stay where they are, under the parent's *data space* (the id that
//! prefixes the keys, `ShardMeta::space`), and each shard of a shared space
//! sees only the mailboxes of its own hash range.
//!
//! Why a shared space and not keys ordered by hash: every per-shard
//! operation keeps working on one contiguous key range per space (reads,
//! apply, the memtable's per-mailbox buckets), a stale replica of the parent
//! can never collide with a new replica of a child on the same node (their
//! ids differ), and a replica rebuilt from a snapshot gets a space of its
//! own again (the export re-keys the rows), so sharing only lasts as long as
//! a replica stays where it was split. The price: scans of a whole shared
//! space (snapshot export, replica deletion, dedup expiry, size) skip the
//! sibling's rows.
//!
//! This module holds the split op's apply and the helpers that decide which
//! shard a row belongs to.

use crate::apply::OpOutput;
use crate::codec;
use crate::engine::Engine;
use crate::error::{EngineError, OpError};
use crate::heads::HeadCache;
use crate::keys::{self, CF_DATA};
use crate::records::{HashRange, ShardMeta, ShardState};
use crate::txn::Txn;
use pigeonhole_proto::internal::v1::op::Op;
use pigeonhole_proto::internal::v1::{Command, SplitOp};

/// The hash that places a user's mailboxes (the one clients route by).
pub(crate) fn user_hash(user_id: &[u8]) -> u64 {
    pigeonhole_proto::placement::user_hash(user_id)
}

/// The user id of an op that names a mailbox.
pub(crate) fn user_of(op: &Op) -> Option<&[u8]> {
    match op {
        Op::Append(a) => Some(&a.user_id),
        Op::Ack(a) => Some(&a.user_id),
        Op::Trim(t) => Some(&t.user_id),
        Op::Delete(d) => Some(&d.user_id),
        Op::Hold(h) => Some(&h.user_id),
        Op::ExpireDedup(_) | Op::PutSystem(_) | Op::Split(_) | Op::Retain(_) => None,
    }
}

/// The user hash of an encoded mailbox id (`keys::mailbox`); None if it
/// does not parse.
pub(crate) fn mailbox_hash(mb: &[u8]) -> Option<u64> {
    let (mb, rest) = keys::split_mailbox(mb)?;
    if !rest.is_empty() {
        return None;
    }
    let ns_len = usize::from(*mb.first()?);
    let uid = mb.get(1 + ns_len + 2..)?;
    Some(user_hash(uid))
}

/// Whether a data-CF key of a shard's space belongs to the shard of
/// `range`. Keys that name no mailbox (the shard-wide tags: system values)
/// belong to the space's own shard only, which is never split, so they
/// count as in range. A per-mailbox key that does not parse is corruption.
pub(crate) fn key_in_range(key: &[u8], range: &HashRange) -> Result<bool, EngineError> {
    if range.is_full() {
        return Ok(true);
    }
    Ok(key_hash(key)?.is_none_or(|h| range.contains(h)))
}

/// The user hash of the mailbox a data-CF key belongs to, or None for a
/// key that names no mailbox (the shard-wide tags). A per-mailbox key that
/// does not parse is corruption.
pub(crate) fn key_hash(key: &[u8]) -> Result<Option<u64>, EngineError> {
    key_mailbox(key)?.map(checked_mailbox_hash).transpose()
}

/// The encoded mailbox id a data-CF key belongs to, or None for a key
/// that names no mailbox (the shard-wide tags). A per-mailbox key that
/// does not parse is corruption.
pub(crate) fn key_mailbox(key: &[u8]) -> Result<Option<&[u8]>, EngineError> {
    let Some((&tag, rest)) = key.get(8..).and_then(|r| r.split_first()) else {
        return Ok(None);
    };
    let mb = match tag {
        keys::tag::MAILBOX | keys::tag::MESSAGE | keys::tag::DEDUP | keys::tag::CURSOR | keys::tag::DIRECTORY => {
            keys::split_mailbox(rest).map(|(mb, _)| mb)
        }
        keys::tag::DEDUP_EXPIRY => keys::parse_dedup_expiry(key).map(|(_, mb, _)| mb),
        _ => return Ok(None),
    };
    mb.map(Some)
        .ok_or_else(|| EngineError::corruption(CF_DATA, key, "key names no parsable mailbox"))
}

/// [`mailbox_hash`] of a mailbox id taken from a stored key.
pub(crate) fn checked_mailbox_hash(mb: &[u8]) -> Result<u64, EngineError> {
    mailbox_hash(mb).ok_or_else(|| EngineError::corruption(CF_DATA, mb, "key names no parsable mailbox"))
}

/// The command's split op, if it has one: Ok when it is the command's only
/// op, else the rejection every replica gives it.
pub(crate) fn split_of(command: &Command) -> Option<Result<&SplitOp, OpError>> {
    let mut splits = command.ops.iter().filter_map(|o| match &o.op {
        Some(Op::Split(s)) => Some(s),
        _ => None,
    });
    let first = splits.next()?;
    if command.ops.len() != 1 {
        return Some(Err(OpError::InvalidArgument {
            field: "split",
            reason: "a split must be the only op of its command".into(),
        }));
    }
    Some(Ok(first))
}

impl Engine {
    /// Applies a split at entry `at` (index, term) of `shard`: the parent
    /// keeps `[start, split_hash)`, the new shard takes the rest. Written in
    /// the apply batch's transaction, so the two shards' states change in
    /// one write.
    pub(crate) fn apply_split(
        &self,
        txn: &mut Txn<'_>,
        heads: &mut HeadCache,
        shard: u64,
        meta: &mut ShardMeta,
        op: &SplitOp,
        at: (u64, u64),
    ) -> Result<Result<OpOutput, OpError>, EngineError> {
        if op.new_shard == shard || op.new_shard >= SPACE_PRIVATE_MIN {
            return Ok(Err(OpError::InvalidArgument {
                field: "split.new_shard",
                reason: format!(
                    "must name another shard than {shard}, below {SPACE_PRIVATE_MIN}, got {}",
                    op.new_shard
                ),
            }));
        }
        let Some((lower, upper)) = meta.range.split_at(op.split_hash) else {
            return Ok(Err(OpError::InvalidArgument {
                field: "split.split_hash",
                reason: format!(
                    "must lie strictly inside the shard's hash range {}, got {:#018x}",
                    meta.range, op.split_hash
                ),
            }));
        };
        let child_key = keys::shard_meta(op.new_shard);
        // The new shard may already be here: a snapshot of it arrived before
        // this replica applied the split (its leader, elected on replicas
        // that had, sent one). That state is newer; keep it. The parent's
        // rows of the upper half are then left in the parent's space, where
        // no shard's range sees them, until the space is deleted.
        let created = txn.get(&child_key)?.is_none();
        if created {
            let child = ShardMeta {
                state: ShardState::Ready,
                applied_index: at.0,
                applied_term: at.1,
                time_ms: meta.time_ms,
                conf_state: meta.conf_state.clone(),
                space: meta.space,
                range: upper,
            };
            txn.put(child_key, &child.encode()?);
        }
        meta.range = lower;
        // Heads cached for the parent may be of the half it gave away.
        heads.clear();
        Ok(Ok(OpOutput::Split {
            new_shard: op.new_shard,
            range: upper,
            created,
        }))
    }

    /// A batch deleting `shard`'s state machine (its meta row and its rows;
    /// `meta` is what its meta row says, if it has one). A space no other
    /// local shard uses goes whole (one range delete, which also takes any
    /// rows no range sees); in a shared space only the rows of the shard's
    /// range go, found by a scan of the space (D38).
    pub(crate) fn delete_shard_state(
        &self,
        shard: u64,
        meta: Option<&ShardMeta>,
    ) -> Result<rocksdb::WriteBatch, EngineError> {
        let cf = self.cf(CF_DATA)?;
        let mut wb = rocksdb::WriteBatch::default();
        wb.delete_cf(cf, keys::shard_meta(shard));
        let (space, range) = meta.map_or((shard, HashRange::FULL), |m| (m.space, m.range));
        let sharers = if meta.is_some_and(|m| never_split_in_place(shard, m)) {
            // Checked where it is cheap to: every engine and cluster test
            // runs with debug assertions.
            debug_assert!(
                self.space_sharers(space, shard).map_or(true, |s| s.is_empty()),
                "shard {shard}: a whole range in its own space, shared"
            );
            Vec::new()
        } else {
            self.space_sharers(space, shard)?
        };
        let (start, end) =
            keys::shard_range(space).ok_or_else(|| EngineError::InvalidCall(format!("space {space} is reserved")))?;
        if sharers.is_empty() {
            if space == shard {
                wb.delete_range_cf(cf, &start, &end);
            } else {
                // The space's first key is its owner's meta row: a shard
                // whose own rows went to a private space after a split in
                // place (found by a review: deleting the sibling took the
                // owner's apply state with it). Everything after it goes.
                let mut after_meta = keys::shard_meta(space);
                after_meta.push(0);
                wb.delete_range_cf(cf, &after_meta, &end);
            }
            return Ok(wb);
        }
        if meta.is_none() || range.is_full() {
            // No range of its own to tell its rows from the sharers'.
            return Ok(wb);
        }
        let mut ro = crate::engine::total_order();
        ro.set_iterate_upper_bound(end);
        let mut it = self.db().raw_iterator_cf_opt(cf, ro);
        it.seek(&start);
        let space_meta = keys::shard_meta(space);
        while let Some(k) = it.key() {
            // The space's meta row is its owner's.
            if k != space_meta.as_slice() && key_in_range(k, &range)? {
                wb.delete_cf(cf, k);
            }
            it.next();
        }
        it.status()?;
        Ok(wb)
    }

    /// The shards on this node whose rows are in `space`, other than
    /// `except`.
    pub(crate) fn space_sharers(&self, space: u64, except: u64) -> Result<Vec<u64>, EngineError> {
        let mut out = Vec::new();
        for id in self.shard_ids()? {
            if id != except && self.shard_meta(id)?.is_some_and(|m| m.space == space) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// The space a snapshot of `shard` is written into: the shard's own id
    /// unless another local shard's rows are there (a sibling split in place
    /// from it), else a private space (at or above [`SPACE_PRIVATE_MIN`])
    /// no local shard uses. An ingest never writes into a shared space: its
    /// stream may be of a range that overlaps the sibling's.
    pub(crate) fn space_for_ingest(&self, shard: u64) -> Result<u64, EngineError> {
        if self.space_sharers(shard, shard)?.is_empty() {
            return Ok(shard);
        }
        let mut next = SPACE_PRIVATE_MIN;
        for id in self.shard_ids()? {
            if let Some(m) = self.shard_meta(id)? {
                if m.space >= next {
                    next = m
                        .space
                        .checked_add(1)
                        .ok_or_else(|| EngineError::InvalidCall("no private data space left".into()))?;
                }
            }
        }
        Ok(next)
    }
}

/// Whether no other shard's rows can be in `shard`'s data space, from its
/// meta row alone: its range is whole and the space is its own id. Only a
/// split in place puts a shard's rows in another's space (the new shard
/// takes the splitting shard's space), and a split narrows the splitting
/// shard's range for good; bootstrap and an ingest take the shard's own
/// id or a private space, never another shard's id. So listing the
/// node's shards ([`Engine::space_sharers`]), which over the data CF's
/// hash memtable copies all of it (D54) and took 80-360 ms of the Raft
/// driver's turn at each replica deletion (D62), is needed only after a
/// split.
fn never_split_in_place(shard: u64, meta: &ShardMeta) -> bool {
    meta.space == shard && meta.range.is_full()
}

/// Data spaces at or above this id are private to a node (made by an
/// ingest that could not use the shard's own id); shard ids stay below it.
pub const SPACE_PRIVATE_MIN: u64 = 1 << 63;

/// Re-seals a row under another prefix (a snapshot export of a shard
/// whose space is not its id, an ingest into a private space): the same
/// key after the first 8 bytes, the same body, a checksum over the new key.
pub(crate) fn rekey(prefix: u64, key: &[u8], body: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut k = Vec::with_capacity(key.len());
    k.extend_from_slice(&prefix.to_be_bytes());
    k.extend_from_slice(key.get(8..).unwrap_or_default());
    let v = codec::seal(&k, body);
    (k, v)
}
