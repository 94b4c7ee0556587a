//! The deterministic mailbox state machine.
//!
//! `Engine::apply` takes committed Raft entries of one shard, in log order,
//! and applies them in ONE RocksDB WriteBatch together with the shard's new
//! applied index. That makes apply idempotent with respect to the log: an
//! entry at or below the stored applied index is skipped, so replaying the
//! log after a crash (or a duplicate delivery by the node) changes nothing.
//!
//! Determinism: the outcome of an entry depends only on the entry and the
//! shard's state. Time comes from the command (`Command.time_ms`, made
//! monotonic per shard), never from this replica's clock, and every limit
//! check is a pure function of the command.
//!
//! Within one batch, later entries must see the effects of earlier ones
//! (two appends to one mailbox in one batch). [`Txn`] is a small overlay of
//! pending writes over the database that point reads and range scans consult
//! first; it becomes the WriteBatch at the end.

use crate::engine::{lock, Durability, Engine};
use crate::error::{EngineError, OpError};
use crate::heads::{append_writes_head_row, HeadCache, HeadRebuild};
use crate::keys::len_u64;
use crate::keys::{self, CF_DATA};
use crate::records::{decode_cursor, encode_cursor, DedupEntry, MailboxMeta, MessageView, ShardMeta};
use crate::txn::Txn;
use pigeonhole_proto::internal::v1 as cmd;
use prost::Message as _;

use std::collections::HashMap;

pub use crate::outcome::{ApplyEntry, EntryKind, EntryOutcome, OpOutput};

impl Engine {
    /// Applies committed entries of `shard`, in order, atomically with the
    /// shard's applied index. Entries at or below the applied index are
    /// skipped; the first one above it must be `applied + 1`.
    ///
    /// An [`EngineError`] means nothing was written and the replica must stop
    /// (it is never a property of the entry: rejected commands are results).
    pub fn apply(
        &self,
        shard: u64,
        entries: &[ApplyEntry<'_>],
        durability: Durability,
    ) -> Result<Vec<EntryOutcome>, EngineError> {
        let mut out = self.apply_many(&[(shard, entries)], durability)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// [`Engine::apply`] for several shards at once, in ONE WriteBatch: a node
    /// applies what every shard committed in one loop turn with one write,
    /// instead of one write (and one WAL record) per shard. All or nothing:
    /// an error writes nothing for any shard. Each shard may appear once.
    pub fn apply_many(
        &self,
        batches: &[(u64, &[ApplyEntry<'_>])],
        durability: Durability,
    ) -> Result<Vec<Vec<EntryOutcome>>, EngineError> {
        crate::engine::perf_counters_off();
        let mut order: Vec<u64> = batches.iter().map(|(s, _)| *s).collect();
        order.sort_unstable();
        if order.windows(2).any(|w| w.first() == w.get(1)) {
            return Err(EngineError::InvalidCall("apply_many: a shard appears twice".into()));
        }
        // Lock in id order, so two callers can never deadlock.
        let handles = order.iter().map(|s| self.shard(*s)).collect::<Result<Vec<_>, _>>()?;
        let mut guards: Vec<_> = handles.iter().map(|h| lock(&h.apply)).collect();
        let mut txn = Txn::new(self)?;
        let mut all = Vec::with_capacity(batches.len());
        let mut changed = false;
        // Heads each shard changed: they enter its cache once the write holds.
        let mut written: Vec<(usize, HashMap<Vec<u8>, MailboxMeta>)> = Vec::with_capacity(batches.len());
        // Every append probes its dedup key, and most keys are new: one
        // batched lookup for all of them, across every shard of the call
        // (profiled: the probes one by one were about a fifth of apply),
        // when there are enough of them to pay for the batching (D51).
        let mut prepared = Vec::with_capacity(batches.len());
        for (shard, entries) in batches {
            let meta = self.ready_shard_meta(*shard)?;
            let commands = decode_commands(entries, meta.applied_index);
            prepared.push((meta, commands));
        }
        let appends: usize = prepared.iter().map(|(_, commands)| count_appends(commands)).sum();
        if appends >= self.options().dedup_prefetch_min_appends.max(1) {
            let probes = prepared
                .iter()
                .flat_map(|(meta, commands)| dedup_keys(meta.space, commands, &self.options().limits))
                .collect();
            txn.prefetch(probes)?;
        }
        for ((shard, entries), (mut meta, mut commands)) in batches.iter().zip(prepared) {
            let shard = *shard;
            let g = order
                .binary_search(&shard)
                .map_err(|_| EngineError::InvalidCall(format!("apply_many: shard {shard} has no lock")))?;
            let state = guards
                .get_mut(g)
                .ok_or_else(|| EngineError::InvalidCall(format!("apply_many: shard {shard} has no lock")))?;
            let mut heads = Heads {
                cache: &mut state.heads,
                changed: HashMap::new(),
            };
            let mut outcomes = Vec::with_capacity(entries.len());
            let start_index = meta.applied_index;
            for (e, command) in entries.iter().zip(commands.iter_mut()) {
                if e.index <= meta.applied_index {
                    outcomes.push(EntryOutcome::AlreadyApplied);
                    continue;
                }
                if e.index != meta.applied_index + 1 {
                    return Err(EngineError::ApplyOutOfOrder {
                        shard,
                        applied: meta.applied_index,
                        index: e.index,
                    });
                }
                let outcome = match &e.kind {
                    EntryKind::Empty => EntryOutcome::Applied,
                    EntryKind::ConfChange(cs) => {
                        meta.conf_state = cs.clone();
                        EntryOutcome::Applied
                    }
                    EntryKind::Command(bytes) => {
                        // Always decoded above (its index is past the
                        // applied index); decoding here again is only a
                        // fallback that keeps the code free of unwraps.
                        let command = match command.take() {
                            Some(c) => c,
                            None => cmd::Command::decode((*bytes).clone()),
                        };
                        self.apply_command(&mut txn, &mut heads, shard, &mut meta, command, (e.index, e.term))?
                    }
                };
                meta.applied_index = e.index;
                meta.applied_term = e.term;
                outcomes.push(outcome);
            }
            if meta.applied_index != start_index {
                txn.put(keys::shard_meta(shard), &meta.encode()?);
                changed = true;
            }
            written.push((g, heads.changed));
            all.push(outcomes);
        }
        if changed {
            self.write_data(txn.into_batch(), durability)?;
        }
        for (g, heads) in written {
            if let Some(state) = guards.get_mut(g) {
                for (mb, meta) in heads {
                    state.heads.insert(mb, meta);
                }
            }
        }
        Ok(all)
    }

    fn apply_command(
        &self,
        txn: &mut Txn<'_>,
        heads: &mut Heads<'_>,
        shard: u64,
        meta: &mut ShardMeta,
        command: Result<cmd::Command, prost::DecodeError>,
        at: (u64, u64),
    ) -> Result<EntryOutcome, EngineError> {
        let limits = &self.options().limits;
        let command = match command {
            Ok(c) => c,
            Err(e) => return Ok(EntryOutcome::Rejected(OpError::MalformedCommand(e.to_string()))),
        };
        if command.ops.is_empty() || command.ops.len() > limits.ops_per_command_max {
            return Ok(EntryOutcome::Rejected(OpError::MalformedCommand(format!(
                "a command carries 1 to {} ops, got {}",
                limits.ops_per_command_max,
                command.ops.len()
            ))));
        }
        // The shard clock never goes backwards, even if leaders' clocks do.
        meta.time_ms = meta.time_ms.max(command.time_ms);
        if let Some(split) = crate::split::split_of(&command) {
            let result = match split {
                Ok(op) => self.apply_split(txn, heads.cache, shard, meta, op, at)?,
                Err(e) => Err(e),
            };
            return Ok(EntryOutcome::Command {
                time_ms: meta.time_ms,
                results: vec![result],
                changed: Vec::new(),
            });
        }
        let mut sm = StateMachine {
            engine: self,
            txn,
            heads,
            shard,
            space: meta.space,
            range: meta.range,
            now_ms: meta.time_ms,
            changed: Vec::new(),
        };
        let mut results = Vec::with_capacity(command.ops.len());
        for op in &command.ops {
            results.push(sm.apply_op(op)?);
        }
        Ok(EntryOutcome::Command {
            time_ms: meta.time_ms,
            results,
            changed: sm.changed,
        })
    }
}

type Decoded = Option<Result<cmd::Command, prost::DecodeError>>;

/// How many append ops `commands` carry.
fn count_appends(commands: &[Decoded]) -> usize {
    commands
        .iter()
        .flatten()
        .flatten()
        .map(|c| {
            c.ops
                .iter()
                .filter(|op| matches!(op.op, Some(cmd::op::Op::Append(_))))
                .count()
        })
        .sum()
}

/// The commands of `entries` above `applied`, decoded (None for the rest).
/// Decoding from `Bytes` makes each payload a slice of the entry.
fn decode_commands(entries: &[ApplyEntry<'_>], applied: u64) -> Vec<Decoded> {
    entries
        .iter()
        .map(|e| match &e.kind {
            EntryKind::Command(bytes) if e.index > applied => Some(cmd::Command::decode((*bytes).clone())),
            _ => None,
        })
        .collect()
}

/// The dedup keys the appends of `commands` will probe, in the shard's
/// data space `space`: only of appends that pass the op checks `apply_op`
/// makes before its probe (a key is never built from a name past its
/// limit). An append that a split earlier in the batch moved out of the
/// shard's range is refused before its probe, so its key here is unused.
/// Prefetched values stay correct because every op's range and limit
/// checks come before its dedup probe (D51).
fn dedup_keys(space: u64, commands: &[Decoded], limits: &crate::limits::Limits) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for c in commands.iter().flatten().flatten() {
        if c.ops.len() > limits.ops_per_command_max {
            continue; // refused whole
        }
        for op in c.ops.iter().filter_map(|op| op.op.as_ref()) {
            if let cmd::op::Op::Append(a) = op {
                if limits.check_op(op).is_ok() {
                    out.push(keys::dedup(
                        space,
                        &keys::mailbox(&a.namespace, &a.user_id),
                        &a.idempotency_key,
                    ));
                }
            }
        }
    }
    out
}

pub(crate) type OpResult = Result<Result<OpOutput, OpError>, EngineError>;

/// A shard's head cache during one apply batch, and the heads the batch
/// changed, by mailbox key (they enter the cache only after the batch's
/// write succeeded; until then they are the batch's view of those heads).
pub(crate) struct Heads<'c> {
    pub(crate) cache: &'c mut HeadCache,
    changed: HashMap<Vec<u8>, MailboxMeta>,
}

pub(crate) struct StateMachine<'a, 't, 'c> {
    pub(crate) engine: &'a Engine,
    pub(crate) txn: &'a mut Txn<'t>,
    pub(crate) heads: &'a mut Heads<'c>,
    pub(crate) shard: u64,
    /// The id prefixing the shard's data keys (`ShardMeta::space`).
    pub(crate) space: u64,
    /// The user hashes the shard holds; ops on other mailboxes are refused.
    pub(crate) range: crate::records::HashRange,
    pub(crate) now_ms: u64,
    /// Fingerprints of the mailboxes changed so far (see `EntryOutcome`).
    pub(crate) changed: Vec<u64>,
}

/// Returns early with the op's (deterministic) rejection.
macro_rules! reject_on {
    ($e:expr) => {
        if let Err(op_err) = $e {
            return Ok(Err(op_err));
        }
    };
}

impl StateMachine<'_, '_, '_> {
    fn apply_op(&mut self, op: &cmd::Op) -> OpResult {
        use cmd::op::Op;
        if let Some(op) = &op.op {
            // The same checks the serving layer made before proposing; kept
            // here so that every replica rejects the same ops (D6).
            reject_on!(self.engine.options().limits.check_op(op));
            // After a split, a proposal routed with the old map may name a
            // mailbox the shard gave away: refused the same on every replica.
            if let Some(uid) = crate::split::user_of(op) {
                if !self.range.is_full() && !self.range.contains(crate::split::user_hash(uid)) {
                    return Ok(Err(OpError::WrongShard {
                        shard: self.shard,
                        range: self.range,
                    }));
                }
            }
        }
        match &op.op {
            Some(Op::Append(a)) => self.append(a),
            Some(Op::Ack(a)) => self.ack(a),
            Some(Op::Trim(t)) => self.trim(t),
            Some(Op::Delete(d)) => self.delete(d),
            Some(Op::ExpireDedup(x)) => self.expire_dedup(x),
            Some(Op::Retain(r)) => self.retain(r),
            Some(Op::Hold(h)) => self.hold(h),
            Some(Op::PutSystem(p)) => self.put_system(p),
            Some(Op::Split(_)) => Ok(Err(OpError::InvalidArgument {
                field: "split",
                reason: "a split must be the only op of its command".into(),
            })),
            None => Ok(Err(OpError::MalformedCommand("op with no operation set".into()))),
        }
    }

    /// The mailbox's key and head: this batch's change, else the cache,
    /// else rebuilt from the database (and then the cache holds it).
    pub(crate) fn mailbox(&mut self, ns: &str, uid: &[u8]) -> Result<(Vec<u8>, MailboxMeta), EngineError> {
        let mb = keys::mailbox(ns, uid);
        if let Some(meta) = self.heads.changed.get(&mb) {
            return Ok((mb, *meta));
        }
        if let Some(meta) = self.heads.cache.get(&mb) {
            return Ok((mb, meta));
        }
        // No op of this batch changed the mailbox (every one that does goes
        // through `put_mailbox`), so what is read is committed state, read
        // under the apply lock.
        let key = keys::mailbox_meta(self.space, &mb);
        let row = match self.txn.get(&key)? {
            Some(b) => Some(MailboxMeta::decode(&key, &b)?),
            None => None,
        };
        let mut rebuild = HeadRebuild::new(row);
        let (first, end) = rebuild.scan_range(self.space, &mb);
        self.txn.scan(&first, &end, |k, body| rebuild.message(k, body))?;
        let meta = rebuild.finish();
        self.heads.cache.insert(mb.clone(), meta);
        Ok((mb, meta))
    }

    /// Records the mailbox's new head; `write_row` also writes its head row
    /// (appends do so only every `HEAD_ROW_EVERY_APPENDS` seqs, I9).
    pub(crate) fn put_mailbox(&mut self, mb: &[u8], meta: &MailboxMeta, write_row: bool) {
        if write_row {
            self.txn.put(keys::mailbox_meta(self.space, mb), &meta.encode());
        }
        self.heads.changed.insert(mb.to_vec(), *meta);
    }

    pub(crate) fn dedup(&self, key: &[u8]) -> Result<Option<DedupEntry>, EngineError> {
        self.txn.get(key)?.map(|b| DedupEntry::decode(key, &b)).transpose()
    }

    fn append(&mut self, a: &cmd::AppendOp) -> OpResult {
        let (mb, mut meta) = self.mailbox(&a.namespace, &a.user_id)?;
        let dk = keys::dedup(self.space, &mb, &a.idempotency_key);
        let payload_crc = crc32fast::hash(&a.payload);
        // Dedup comes before the precondition: a retried conditional append
        // that already committed must get its seq back, not a mismatch.
        let mut expired = None;
        // PLANTED BUG (test-only feature, never in a real build): forget
        // every earlier append, so retries store copies. The Jepsen harness
        // runs a server built with it to prove its checker catches that.
        let seen = if cfg!(feature = "planted-bug-skip-dedup") {
            None
        } else {
            self.dedup(&dk)?
        };
        if let Some(d) = seen {
            if d.live_at(self.now_ms) {
                if d.payload_crc != payload_crc {
                    return Ok(Err(OpError::IdempotencyKeyReused { seq: d.seq }));
                }
                return Ok(Ok(OpOutput::Appended {
                    seq: d.seq,
                    duplicate: true,
                    time_ms: d.time_ms,
                }));
            }
            expired = Some(d);
        }
        if let Some(expected) = a.expected_last_seq {
            if expected != meta.last_seq {
                return Ok(Err(OpError::ExpectedLastSeqMismatch {
                    expected,
                    actual: meta.last_seq,
                }));
            }
        }
        let Some(seq) = meta.last_seq.checked_add(1).filter(|s| *s < u64::MAX) else {
            return Ok(Err(OpError::InvalidArgument {
                field: "mailbox",
                reason: "mailbox has used every sequence number".into(),
            }));
        };
        // The op will succeed: an expired, uncollected dedup entry is replaced
        // below, so its expiry index entry goes now (only now: a rejected op
        // must change nothing).
        if let Some(d) = expired {
            self.txn
                .delete(keys::dedup_expiry(self.space, d.expires_ms, &mb, &a.idempotency_key));
        }
        let msg = MessageView {
            time_ms: self.now_ms,
            idempotency_key: &a.idempotency_key,
            payload: &a.payload,
            deleted: false,
        };
        self.txn.put(keys::message(self.space, &mb, seq), &msg.encode());
        if seq == 1 {
            // The mailbox's first message: it enters the directory (D43).
            self.txn
                .put(keys::mailbox_dir(self.space, &mb), &crate::records::encode_marker());
        }
        let entry = DedupEntry {
            seq,
            time_ms: self.now_ms,
            payload_crc,
            expires_ms: 0,
        };
        self.txn.put(dk, &entry.encode());
        meta.last_seq = seq;
        meta.payload_bytes += len_u64(&a.payload);
        let every = self.engine.options().head_row_every_appends;
        self.put_mailbox(&mb, &meta, append_writes_head_row(seq, every));
        self.changed.push(crate::mailbox_fingerprint(&a.namespace, &a.user_id));
        Ok(Ok(OpOutput::Appended {
            seq,
            duplicate: false,
            time_ms: self.now_ms,
        }))
    }

    fn ack(&mut self, a: &cmd::AckOp) -> OpResult {
        let limits = &self.engine.options().limits;
        let (mb, mut meta) = self.mailbox(&a.namespace, &a.user_id)?;
        if a.seq > meta.last_seq {
            return Ok(Err(OpError::AckBeyondLastSeq {
                seq: a.seq,
                last_seq: meta.last_seq,
            }));
        }
        let ck = keys::cursor(self.space, &mb, &a.device_id);
        match self.txn.get(&ck)? {
            Some(b) => {
                let cur = decode_cursor(&ck, &b)?;
                if a.seq <= cur {
                    return Ok(Ok(OpOutput::Acked {
                        cursor: cur,
                        advanced: false,
                    }));
                }
            }
            None => {
                if meta.cursor_count >= limits.cursors_per_mailbox_max {
                    return Ok(Err(OpError::TooManyCursors {
                        limit: limits.cursors_per_mailbox_max,
                    }));
                }
                meta.cursor_count += 1;
                self.put_mailbox(&mb, &meta, true);
            }
        }
        self.txn.put(ck, &encode_cursor(a.seq));
        Ok(Ok(OpOutput::Acked {
            cursor: a.seq,
            advanced: a.seq > 0,
        }))
    }

    fn put_system(&mut self, p: &cmd::PutSystemOp) -> OpResult {
        if p.key.is_empty() || p.key.len() > crate::records::SYSTEM_KEY_BYTES_MAX {
            return Ok(Err(OpError::InvalidArgument {
                field: "put_system.key",
                reason: format!(
                    "must be 1 to {} bytes, got {}",
                    crate::records::SYSTEM_KEY_BYTES_MAX,
                    p.key.len()
                ),
            }));
        }
        reject_on!(self.engine.options().limits.check_payload(&p.value).map_err(|_| {
            OpError::InvalidArgument {
                field: "put_system.value",
                reason: format!(
                    "must be at most {} bytes, got {}",
                    self.engine.options().limits.payload_bytes_max,
                    p.value.len()
                ),
            }
        }));
        let key = keys::system(self.space, &p.key);
        let stored = match self.txn.get(&key)? {
            Some(b) => crate::records::decode_system(&key, &b)?.0,
            None => 0,
        };
        if let Some(expected) = p.if_version.filter(|e| *e != stored) {
            return Ok(Err(OpError::VersionConflict { expected, stored }));
        }
        if p.version < stored {
            return Ok(Err(OpError::StaleVersion {
                given: p.version,
                stored,
            }));
        }
        self.txn.put(key, &crate::records::encode_system(p.version, &p.value));
        Ok(Ok(OpOutput::SystemPut { version: p.version }))
    }

    fn expire_dedup(&mut self, x: &cmd::ExpireDedupOp) -> OpResult {
        let limit = self.engine.options().limits.expire_dedup_entries_max;
        if x.max_entries == 0 || x.max_entries > limit {
            return Ok(Err(OpError::InvalidArgument {
                field: "expire_dedup.max_entries",
                reason: format!("must be 1 to {limit}, got {}", x.max_entries),
            }));
        }
        let start = keys::dedup_expiry_bound(self.space, 0);
        let end = keys::dedup_expiry_bound(self.space, self.now_ms.saturating_add(1));
        let mut found: Vec<Vec<u8>> = Vec::new();
        let max = usize::try_from(x.max_entries).unwrap_or(usize::MAX);
        let range = self.range;
        self.txn.scan_limited(&start, &end, max, |k, body| {
            crate::records::check_marker(k, body)?;
            // A shared space (D38) holds the other half's entries too: only
            // this shard's count, so every replica removes the same ones.
            if !crate::split::key_in_range(k, &range)? {
                return Ok(false);
            }
            found.push(k.to_vec());
            Ok(true)
        })?;
        let mut removed = 0;
        for k in found {
            let (expires, mb, idem) = keys::parse_dedup_expiry(&k)
                .ok_or_else(|| EngineError::corruption(CF_DATA, &k, "malformed dedup expiry key"))?;
            let dk = keys::dedup(self.space, mb, idem);
            // The dedup entry may have been replaced by a newer append after an
            // earlier expiry; only remove it if this index entry is its own.
            if self.dedup(&dk)?.is_some_and(|d| d.expires_ms == expires) {
                self.txn.delete(dk);
                removed += 1;
            }
            self.txn.delete(k);
        }
        Ok(Ok(OpOutput::DedupExpired { removed }))
    }
}
