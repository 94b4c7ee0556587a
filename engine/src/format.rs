//! The directory's format at open: the checks that refuse what this build
//! cannot read or what damage left behind, and the conversion of the one
//! older format it can. Kept apart from the engine handle because each runs
//! once, before the handle exists, against the bare database, and because
//! this is the code that changes with every format version
//! (docs/storage-format.md §4).

use crate::codec;
use crate::engine::total_order;
use crate::error::EngineError;
use crate::keys::{self, CF_DATA, CF_META, CF_RAFT};
use rocksdb::{Options, WriteBatch, WriteOptions, DB};
use std::path::Path;

/// The on-disk format this build reads and writes. Format 2 moved the Raft
/// log out of RocksDB into segment files; a format-1 directory is refused.
/// Format 3 added the mailbox directory (D43); a format-2 directory is
/// converted at open ([`build_directory`]).
pub const FORMAT_VERSION: u32 = 3;

/// The format converted at open to [`FORMAT_VERSION`].
const FORMAT_CONVERTED: u32 = 2;

/// Refuses a database whose MANIFEST forgot a column family that it once
/// held, as damage to the state machine (docs/decisions.md D50). Runs
/// before the open, which would create the missing family and so hide
/// the damage from the next open.
///
/// RocksDB reads zeros in a MANIFEST as the end of its preallocated space,
/// so damage that zeroes the middle of one opens without an error and
/// with every later edit gone: the creation of the `data` column family
/// among them, whose rows then silently vanish (the WAL's records for a
/// family it does not know are skipped), while the Raft log, in its own
/// files, still knows every shard. A missing family is legitimate only
/// when the first open of a new directory crashed before creating it; that
/// open had not yet written the format version nor created the Raft log's
/// directory, so either one's presence means the family was lost.
pub(crate) fn check_column_families(path: &Path) -> Result<(), EngineError> {
    let before = DB::list_cf(&Options::default(), path)?;
    let missing: Vec<&str> = [CF_RAFT, CF_DATA]
        .into_iter()
        .filter(|name| !before.iter().any(|b| b == name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let lost = |why: &str| {
        Err(EngineError::corruption(
            CF_META,
            b"MANIFEST",
            format!(
                "the database's MANIFEST no longer lists column families {missing:?}, yet {why}: \
                 their rows are lost"
            ),
        ))
    };
    if path.join("raft-log").exists() {
        return lost("the Raft log directory exists");
    }
    let db = DB::open_cf_for_read_only(&Options::default(), path, &before, false)?;
    let cf = db
        .cf_handle(CF_META)
        .ok_or_else(|| EngineError::InvalidCall(format!("column family {CF_META} is missing")))?;
    if db.get_cf(cf, keys::FORMAT_VERSION_KEY)?.is_some() {
        return lost("the format version was written");
    }
    Ok(())
}

pub(crate) fn check_format_version(db: &DB) -> Result<(), EngineError> {
    let cf = db
        .cf_handle(CF_META)
        .ok_or_else(|| EngineError::InvalidCall(format!("column family {CF_META} is missing")))?;
    let key = keys::FORMAT_VERSION_KEY;
    match db.get_cf(cf, key)? {
        Some(v) => {
            let body = codec::open(CF_META, key, &v)?;
            let found = u32::from_be_bytes(
                body.try_into()
                    .map_err(|_| EngineError::corruption(CF_META, key, "format version is not 4 bytes"))?,
            );
            if found == FORMAT_CONVERTED {
                let mailboxes = build_directory(db)?;
                set_format_version(db)?;
                tracing::info!(
                    "converted the data directory from format {found} to {FORMAT_VERSION}: \
                     {mailboxes} mailbox directory keys written"
                );
            } else if found != FORMAT_VERSION {
                return Err(EngineError::InvalidCall(format!(
                    "data was written in format {found}; this build reads format {FORMAT_VERSION}"
                )));
            }
        }
        None => set_format_version(db)?,
    }
    Ok(())
}

fn set_format_version(db: &DB) -> Result<(), EngineError> {
    let cf = db
        .cf_handle(CF_META)
        .ok_or_else(|| EngineError::InvalidCall(format!("column family {CF_META} is missing")))?;
    let key = keys::FORMAT_VERSION_KEY;
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.put_cf_opt(cf, key, codec::seal(key, &FORMAT_VERSION.to_be_bytes()), &wo)?;
    Ok(())
}

/// Format 2 → 3: enters every mailbox that ever had a message (a stored
/// message, or a head row with `last_seq >= 1`: a mailbox trimmed empty)
/// in the mailbox directory (`shard | 07 | mb`, D43), the set an append
/// keeps from then on, so every replica lists the same mailboxes at the
/// same index whichever index it converted at. One total-order pass over
/// the data CF, seeking past each mailbox's messages; the state machine
/// is written without the WAL (D26), so the keys are flushed before the
/// version says 3, and a crash before that converts again (the puts are
/// idempotent). Returns how many keys were put (a mailbox with a head row
/// and messages counts twice).
fn build_directory(db: &DB) -> Result<u64, EngineError> {
    let cf = db
        .cf_handle(CF_DATA)
        .ok_or_else(|| EngineError::InvalidCall(format!("column family {CF_DATA} is missing")))?;
    let mut ro = total_order();
    ro.fill_cache(false);
    let mut it = db.raw_iterator_cf_opt(cf, ro);
    it.seek_to_first();
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    let mut wb = WriteBatch::default();
    let mut count = 0u64;
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let (space, tag) = match (k.get(..8), k.get(8)) {
            (Some(s), Some(t)) => (u64::from_be_bytes(s.try_into().unwrap_or([0; 8])), *t),
            _ => {
                it.next();
                continue;
            }
        };
        let mb = k.get(9..).and_then(keys::split_mailbox).map(|(mb, _)| mb.to_vec());
        let entered = match (tag, mb) {
            (keys::tag::MESSAGE, Some(mb)) => Some(mb),
            (keys::tag::MAILBOX, Some(mb)) => {
                let row = crate::records::MailboxMeta::decode(k, codec::open(CF_DATA, k, v)?)?;
                (row.last_seq >= 1).then_some(mb)
            }
            _ => None,
        };
        if let Some(mb) = entered {
            let dir = keys::mailbox_dir(space, &mb);
            wb.put_cf(cf, &dir, codec::seal(&dir, &crate::records::encode_marker()));
            count += 1;
            if wb.size_in_bytes() >= 4 << 20 {
                db.write_opt(std::mem::take(&mut wb), &wo)?;
            }
            if tag == keys::tag::MESSAGE {
                // Past the mailbox's other messages.
                if let Some(next) = keys::prefix_end(&keys::message_prefix(space, &mb)) {
                    it.seek(&next);
                    continue;
                }
            }
        }
        it.next();
    }
    it.status()?;
    db.write_opt(wb, &wo)?;
    let mut fo = rocksdb::FlushOptions::default();
    fo.set_wait(true);
    db.flush_cf_opt(cf, &fo)?;
    Ok(count)
}
