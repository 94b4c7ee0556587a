//! Reads served straight from a replica's applied state: Sync pages, mailbox
//! counters and device cursors. Each read runs on one RocksDB snapshot, so
//! the counters and the messages it returns agree with each other.
//!
//! Whether a read is linearizable is the cluster's business (ReadIndex before
//! calling in); the engine serves whatever this replica has applied.

use crate::codec;
use crate::engine::Engine;
use crate::error::{EngineError, ReadError};
use crate::heads::HeadRebuild;
use crate::keys::{self, CF_DATA};
use crate::records::{decode_cursor, MailboxMeta, MessageView, ShardMeta, ShardState};
use rocksdb::{ReadOptions, SnapshotWithThreadMode, DB};

/// One Sync request, already routed to its shard.
#[derive(Debug, Clone)]
pub struct SyncQuery<'a> {
    /// Namespace of the mailbox.
    pub namespace: &'a str,
    /// User id of the mailbox.
    pub user_id: &'a [u8],
    /// Return messages with seq > after_seq.
    pub after_seq: u64,
    /// At most this many messages; 0 = the default.
    pub max_messages: u32,
    /// At most this many payload bytes (the first message always comes); 0 = the default.
    pub max_bytes: u32,
}

/// A message as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMessage {
    /// Its seq.
    pub seq: u64,
    /// Commit time, ms since the Unix epoch.
    pub time_ms: u64,
    /// Its idempotency key.
    pub idempotency_key: Vec<u8>,
    /// Payload; empty for a tombstone.
    pub payload: Vec<u8>,
    /// A tombstone.
    pub deleted: bool,
}

/// One Sync page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPage {
    /// Consecutive messages after the cursor.
    pub messages: Vec<ReadMessage>,
    /// The mailbox's highest seq.
    pub last_seq: u64,
    /// The lowest stored seq.
    pub low_watermark: u64,
    /// More messages follow the page.
    pub has_more: bool,
}

/// A mailbox's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxInfo {
    /// Highest seq, 0 if none.
    pub last_seq: u64,
    /// Lowest stored seq.
    pub low_watermark: u64,
    /// Device cursors.
    pub cursor_count: u32,
    /// Payload bytes of the stored, non-deleted messages.
    pub payload_bytes: u64,
    /// Under a legal hold (D43).
    pub held: bool,
}

/// One system (cluster metadata) value, as [`Engine::system_scan`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemValue {
    /// The key, without the shard prefix.
    pub key: Vec<u8>,
    /// The version it was written at.
    pub version: u64,
    /// The value.
    pub value: Vec<u8>,
}

/// A mailbox's device cursors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursors {
    /// (device id, acked seq), ordered by device id bytes.
    pub cursors: Vec<(Vec<u8>, u64)>,
    /// Highest seq; unread = last_seq - cursor.
    pub last_seq: u64,
    /// Lowest stored seq.
    pub low_watermark: u64,
}

type Snap<'a> = SnapshotWithThreadMode<'a, DB>;

impl Engine {
    /// A consistent view of a complete shard, and the space its rows are
    /// in (`ShardMeta::space`).
    fn read_snapshot(&self, shard: u64) -> Result<(Snap<'_>, ShardMeta), EngineError> {
        crate::engine::perf_counters_off();
        let snap = self.db().snapshot();
        let key = keys::shard_meta(shard);
        let body = snap_get(self, &snap, &key)?.ok_or(EngineError::NoSuchShard(shard))?;
        let meta = ShardMeta::decode(&key, &body)?;
        if meta.state != ShardState::Ready {
            return Err(EngineError::ShardIncomplete(shard));
        }
        Ok((snap, meta))
    }

    /// [`Self::read_snapshot`] for a read of `user_id`'s mailbox: refused if
    /// a split gave the mailbox to another shard (the caller's map is old).
    fn mailbox_snapshot(&self, shard: u64, user_id: &[u8]) -> Result<(Snap<'_>, u64), ReadError> {
        let (snap, meta) = self.read_snapshot(shard)?;
        if !meta.range.is_full() && !meta.range.contains(crate::split::user_hash(user_id)) {
            return Err(ReadError::WrongShard {
                shard,
                range: meta.range,
            });
        }
        Ok((snap, meta.space))
    }

    /// The mailbox's head at `snap`: its row folded with the messages
    /// appended after the row (I9; see [`HeadRebuild`]).
    fn mailbox_meta_at(&self, snap: &Snap<'_>, space: u64, mb: &[u8]) -> Result<MailboxMeta, EngineError> {
        let key = keys::mailbox_meta(space, mb);
        let row = match snap_get(self, snap, &key)? {
            Some(b) => Some(MailboxMeta::decode(&key, &b)?),
            None => None,
        };
        let mut rebuild = HeadRebuild::new(row);
        let (first, end) = rebuild.scan_range(space, mb);
        let mut ro = ReadOptions::default();
        ro.set_snapshot(snap);
        ro.set_iterate_upper_bound(end);
        let mut it = self.db().raw_iterator_cf_opt(self.cf(CF_DATA)?, ro);
        it.seek(first);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            rebuild.message(k, codec::open(CF_DATA, k, v)?)?;
            it.next();
        }
        it.status()?;
        Ok(rebuild.finish())
    }

    /// Reads the page of messages after `q.after_seq`.
    pub fn sync(&self, shard: u64, q: &SyncQuery<'_>) -> Result<SyncPage, ReadError> {
        let limits = &self.options().limits;
        limits.check_mailbox(q.namespace, q.user_id)?;
        let max_messages = pick_limit(
            "max_messages",
            q.max_messages,
            limits.sync_messages_default,
            limits.sync_messages_max,
        )?;
        let max_bytes = pick_limit(
            "max_bytes",
            q.max_bytes,
            limits.sync_bytes_default,
            limits.sync_bytes_max,
        )?;
        let (snap, space) = self.mailbox_snapshot(shard, q.user_id)?;
        let mb = keys::mailbox(q.namespace, q.user_id);
        // The page needs the head's last seq and low watermark, not its
        // payload bytes, so instead of rebuilding the head (I9) it takes the
        // row's low watermark and, as last seq, the seq of the mailbox's
        // last message key. One forward pass finds both the page and that
        // key: the keys after the row are fewer than
        // `head_row_every_appends`. Forward only: the data CF's
        // hash-skiplist memtable cannot seek backwards.
        let row_key = keys::mailbox_meta(space, &mb);
        let row = match snap_get(self, &snap, &row_key)? {
            Some(b) => MailboxMeta::decode(&row_key, &b)?,
            None => MailboxMeta::default(),
        };
        if q.after_seq.saturating_add(1) < row.low_watermark {
            return Err(ReadError::CursorTrimmed {
                after_seq: q.after_seq,
                low_watermark: row.low_watermark,
            });
        }
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        // Seq u64::MAX is never assigned, so this bound is past every message.
        ro.set_iterate_upper_bound(keys::message(space, &mb, u64::MAX));
        let mut it = self.db().raw_iterator_cf_opt(self.cf(CF_DATA)?, ro);
        let after_row = row.last_seq.saturating_add(1);
        let first = q.after_seq.saturating_add(1);
        let mut last_seq = row.last_seq;
        // Messages between the row and the cursor only move last_seq.
        it.seek(keys::message(space, &mb, first.min(after_row)));
        while let Some(k) = it.key() {
            let seq = keys::checked_message_seq(k)?;
            if seq >= first {
                break;
            }
            last_seq = last_seq.max(seq);
            it.next();
        }
        let mut messages = Vec::new();
        let mut bytes: u64 = 0;
        let max_bytes = u64::try_from(max_bytes).unwrap_or(u64::MAX);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if messages.len() >= max_messages {
                break;
            }
            let seq = keys::checked_message_seq(k)?;
            let expect = first + keys::len_u64(&messages);
            if seq != expect {
                return Err(EngineError::corruption(
                    CF_DATA,
                    k,
                    format!("gap in mailbox: expected seq {expect}, found {seq}"),
                )
                .into());
            }
            let view = MessageView::decode(k, codec::open(CF_DATA, k, v)?)?;
            let size = keys::len_u64(view.payload);
            if !messages.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            last_seq = last_seq.max(seq);
            messages.push(ReadMessage {
                seq,
                time_ms: view.time_ms,
                idempotency_key: view.idempotency_key.to_vec(),
                payload: view.payload.to_vec(),
                deleted: view.deleted,
            });
            it.next();
        }
        // A page cut short by its limits: the keys after the row (or after
        // the page, if it reached past the row) still move last_seq.
        if it.valid() {
            if messages.last().map_or(first, |m| m.seq + 1) < after_row {
                it.seek(keys::message(space, &mb, after_row));
            }
            while let Some(k) = it.key() {
                last_seq = last_seq.max(keys::checked_message_seq(k)?);
                it.next();
            }
        }
        it.status()?;
        if q.after_seq > last_seq {
            return Err(ReadError::CursorAhead {
                after_seq: q.after_seq,
                last_seq,
            });
        }
        if first <= last_seq && messages.is_empty() {
            let k = keys::message(space, &mb, first);
            return Err(EngineError::corruption(
                CF_DATA,
                &k,
                format!("mailbox last_seq is {last_seq} but seq {first} is missing"),
            )
            .into());
        }
        let has_more = messages.last().is_some_and(|m| m.seq < last_seq);
        Ok(SyncPage {
            messages,
            last_seq,
            low_watermark: row.low_watermark,
            has_more,
        })
    }

    /// A mailbox's counters (an unknown mailbox reads as empty).
    pub fn mailbox_info(&self, shard: u64, namespace: &str, user_id: &[u8]) -> Result<MailboxInfo, ReadError> {
        self.options().limits.check_mailbox(namespace, user_id)?;
        let (snap, space) = self.mailbox_snapshot(shard, user_id)?;
        let m = self.mailbox_meta_at(&snap, space, &keys::mailbox(namespace, user_id))?;
        Ok(MailboxInfo {
            last_seq: m.last_seq,
            low_watermark: m.low_watermark,
            cursor_count: m.cursor_count,
            payload_bytes: m.payload_bytes,
            held: m.held,
        })
    }

    /// System values of `shard` whose key starts with `prefix`, in key order,
    /// at most `limit` of them: (key without the shard prefix, version, value).
    pub fn system_scan(&self, shard: u64, prefix: &[u8], limit: usize) -> Result<Vec<SystemValue>, EngineError> {
        let (snap, meta) = self.read_snapshot(shard)?;
        let start = keys::system(meta.space, prefix);
        let base = keys::system(meta.space, b"").len();
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        if let Some(end) = keys::prefix_end(&start) {
            ro.set_iterate_upper_bound(end);
        }
        let mut it = self.db().raw_iterator_cf_opt(self.cf(CF_DATA)?, ro);
        it.seek(&start);
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if out.len() >= limit {
                break;
            }
            let (version, value) = crate::records::decode_system(k, codec::open(CF_DATA, k, v)?)?;
            out.push(SystemValue {
                key: k.get(base..).unwrap_or_default().to_vec(),
                version,
                value,
            });
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// A mailbox's device cursors, ordered by device id.
    pub fn cursors(&self, shard: u64, namespace: &str, user_id: &[u8]) -> Result<Cursors, ReadError> {
        self.options().limits.check_mailbox(namespace, user_id)?;
        let (snap, space) = self.mailbox_snapshot(shard, user_id)?;
        let mb = keys::mailbox(namespace, user_id);
        let meta = self.mailbox_meta_at(&snap, space, &mb)?;
        let prefix = keys::cursor_prefix(space, &mb);
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        if let Some(end) = keys::prefix_end(&prefix) {
            ro.set_iterate_upper_bound(end);
        }
        let mut it = self.db().raw_iterator_cf_opt(self.cf(CF_DATA)?, ro);
        it.seek(&prefix);
        let mut cursors = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let body = codec::open(CF_DATA, k, v)?;
            let device = k.get(prefix.len()..).unwrap_or_default().to_vec();
            cursors.push((device, decode_cursor(k, body)?));
            it.next();
        }
        it.status()?;
        if u32::try_from(cursors.len()).ok() != Some(meta.cursor_count) {
            return Err(EngineError::corruption(
                CF_DATA,
                &keys::mailbox_meta(space, &mb),
                format!(
                    "cursor_count is {} but {} cursors are stored",
                    meta.cursor_count,
                    cursors.len()
                ),
            )
            .into());
        }
        Ok(Cursors {
            cursors,
            last_seq: meta.last_seq,
            low_watermark: meta.low_watermark,
        })
    }
}

fn snap_get(engine: &Engine, snap: &Snap<'_>, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
    match snap.get_cf(engine.cf(CF_DATA)?, key)? {
        Some(v) => Ok(Some(codec::open(CF_DATA, key, &v)?.to_vec())),
        None => Ok(None),
    }
}

fn pick_limit(field: &'static str, asked: u32, default: u32, max: u32) -> Result<usize, ReadError> {
    let v = if asked == 0 { default } else { asked };
    if v > max {
        return Err(ReadError::InvalidArgument {
            field,
            reason: format!("must be at most {max}, got {v}"),
        });
    }
    Ok(usize::try_from(v).unwrap_or(usize::MAX))
}
