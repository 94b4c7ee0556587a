//! Key encoding. Byte-by-byte layout is in docs/storage-format.md; this file
//! and that document change together.
//!
//! Every key starts with the shard id (u64, big-endian), so that one shard's
//! state is one contiguous range in each column family: a snapshot is a range
//! scan and an ingest a range delete. Integers are big-endian so that byte
//! order is numeric order (a mailbox's messages scan in seq order). A mailbox
//! id is length-prefixed (`ns_len:u8 ns uid_len:u16 uid`), which makes it
//! self-delimiting: no mailbox's encoding is a prefix of another's, so a
//! per-mailbox prefix scan never sees a neighbour.

/// Column family with node-level metadata (format version).
pub const CF_META: &str = "default";
/// Column family that held the Raft logs in format 1; empty since format 2
/// (the log is in segment files), still opened so that a format-1
/// directory can be refused with a message.
pub const CF_RAFT: &str = "raft";
/// Column family with the state machines of all shards on the node.
pub const CF_DATA: &str = "data";

/// Data CF tags (the byte after the shard id).
pub(crate) mod tag {
    pub const SHARD_META: u8 = 0x00;
    pub const MAILBOX: u8 = 0x01;
    pub const MESSAGE: u8 = 0x02;
    pub const DEDUP: u8 = 0x03;
    pub const CURSOR: u8 = 0x04;
    pub const DEDUP_EXPIRY: u8 = 0x05;
    pub const SYSTEM: u8 = 0x06;
    pub const DIRECTORY: u8 = 0x07;
}

/// Node meta CF: the on-disk format version.
pub(crate) const FORMAT_VERSION_KEY: &[u8] = b"pigeonhole/format_version";

/// The encoded mailbox id: `ns_len:u8 ns uid_len:u16be uid`.
/// Lengths are validated by [`crate::Limits`] before a key is built; the
/// debug assertions document the invariant the casts rely on.
pub(crate) fn mailbox(ns: &str, uid: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + ns.len() + uid.len());
    push_mailbox(&mut k, ns, uid);
    k
}

fn push_mailbox(k: &mut Vec<u8>, ns: &str, uid: &[u8]) {
    debug_assert!(ns.len() <= usize::from(u8::MAX));
    debug_assert!(uid.len() <= usize::from(u16::MAX));
    k.push(u8::try_from(ns.len()).unwrap_or(u8::MAX));
    k.extend_from_slice(ns.as_bytes());
    k.extend_from_slice(&u16::try_from(uid.len()).unwrap_or(u16::MAX).to_be_bytes());
    k.extend_from_slice(uid);
}

/// Splits an encoded mailbox id off the front of `b`, returning it and the rest.
pub(crate) fn split_mailbox(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let ns_len = usize::from(*b.first()?);
    let uid_len_at = 1 + ns_len;
    let len_bytes: [u8; 2] = b.get(uid_len_at..uid_len_at + 2)?.try_into().ok()?;
    let end = uid_len_at + 2 + usize::from(u16::from_be_bytes(len_bytes));
    if end > b.len() {
        return None;
    }
    Some(b.split_at(end))
}

/// The namespace bytes of an encoded mailbox id.
pub(crate) fn mailbox_namespace(mb: &[u8]) -> Option<&[u8]> {
    let ns_len = usize::from(*mb.first()?);
    mb.get(1..1 + ns_len)
}

/// `shard | 0x07 | mb`: the mailbox directory (D43): one key per mailbox
/// that ever had a message, written with its first append, in one
/// shard-wide memtable bucket (as the expiry index), so retention steps
/// through a namespace's mailboxes with a prefix-mode scan instead of a
/// total-order one (which copies the whole hash memtable).
pub(crate) fn mailbox_dir(shard: u64, mb: &[u8]) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::DIRECTORY, mb.len());
    k.extend_from_slice(mb);
    k
}

/// `shard | 0x07 | ns_len ns`: every directory key of the namespace's
/// mailboxes starts with it (the namespace's length is in it), and no
/// other key does.
pub(crate) fn namespace_dir(shard: u64, ns: &str) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::DIRECTORY, 1 + ns.len());
    k.push(u8::try_from(ns.len()).unwrap_or(u8::MAX));
    k.extend_from_slice(ns.as_bytes());
    k
}

fn shard_tag(shard: u64, tag: u8, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + extra);
    k.extend_from_slice(&shard.to_be_bytes());
    k.push(tag);
    k
}

/// `shard | 0x00`
pub(crate) fn shard_meta(shard: u64) -> Vec<u8> {
    shard_tag(shard, tag::SHARD_META, 0)
}

/// `shard | 0x06 | key`: a system (cluster metadata) value.
pub(crate) fn system(shard: u64, key: &[u8]) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::SYSTEM, key.len());
    k.extend_from_slice(key);
    k
}

/// `shard | 0x01 | mb`
pub(crate) fn mailbox_meta(shard: u64, mb: &[u8]) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::MAILBOX, mb.len());
    k.extend_from_slice(mb);
    k
}

/// `shard | 0x02 | mb`: the prefix of all messages of a mailbox.
pub(crate) fn message_prefix(shard: u64, mb: &[u8]) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::MESSAGE, mb.len() + 8);
    k.extend_from_slice(mb);
    k
}

/// `shard | 0x02 | mb | seq:u64be`
pub(crate) fn message(shard: u64, mb: &[u8], seq: u64) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::MESSAGE, mb.len() + 8);
    k.extend_from_slice(mb);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Reads the seq at the end of a message key.
pub(crate) fn message_seq(key: &[u8]) -> Option<u64> {
    let at = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key.get(at..)?.try_into().ok()?))
}

/// `shard | 0x03 | mb | idempotency_key`
pub(crate) fn dedup(shard: u64, mb: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::DEDUP, mb.len() + key.len());
    k.extend_from_slice(mb);
    k.extend_from_slice(key);
    k
}

/// `shard | 0x04 | mb | device_id`
pub(crate) fn cursor(shard: u64, mb: &[u8], device: &[u8]) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::CURSOR, mb.len() + device.len());
    k.extend_from_slice(mb);
    k.extend_from_slice(device);
    k
}

/// `shard | 0x04 | mb`: the prefix of all cursors of a mailbox.
pub(crate) fn cursor_prefix(shard: u64, mb: &[u8]) -> Vec<u8> {
    cursor(shard, mb, &[])
}

/// `shard | 0x05 | expires_ms:u64be | mb | idempotency_key`
pub(crate) fn dedup_expiry(shard: u64, expires_ms: u64, mb: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::DEDUP_EXPIRY, 8 + mb.len() + key.len());
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k.extend_from_slice(mb);
    k.extend_from_slice(key);
    k
}

/// `shard | 0x05 | expires_ms:u64be`: the first expiry key at `expires_ms`.
pub(crate) fn dedup_expiry_bound(shard: u64, expires_ms: u64) -> Vec<u8> {
    let mut k = shard_tag(shard, tag::DEDUP_EXPIRY, 8);
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k
}

/// Splits an expiry index key into (expires_ms, mailbox, idempotency key).
pub(crate) fn parse_dedup_expiry(key: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    let rest = key.get(9..)?;
    let expires = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let (mb, idem) = split_mailbox(rest.get(8..)?)?;
    Some((expires, mb, idem))
}

/// `[shard, shard + 1)`: every key of one shard in one column family.
/// Shard ids must be below `u64::MAX` so that the end bound exists.
pub(crate) fn shard_range(shard: u64) -> Option<(Vec<u8>, Vec<u8>)> {
    let end = shard.checked_add(1)?;
    Some((shard.to_be_bytes().to_vec(), end.to_be_bytes().to_vec()))
}

/// The exclusive end of a prefix range: the prefix with its last byte
/// incremented (carrying). None if the prefix is all 0xff.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The seq of a message key, or a corruption error naming the key.
pub(crate) fn checked_message_seq(k: &[u8]) -> Result<u64, crate::error::EngineError> {
    message_seq(k).ok_or_else(|| crate::error::EngineError::corruption(CF_DATA, k, "message key without seq"))
}

/// A slice's length as u64 (saturating; lengths here are bounded by limits).
pub(crate) fn len_u64<T>(s: &[T]) -> u64 {
    u64::try_from(s.len()).unwrap_or(u64::MAX)
}

/// The data CF's memtable bucket of `key` (its prefix-extractor output):
/// `shard | tag | mailbox` for the per-mailbox tags (head row, messages,
/// dedup entries, cursors), `shard | tag` for the others, the whole key if
/// it is shorter than that or does not parse.
///
/// Why: the data CF's memtable is a hash of small skiplists, one per
/// bucket, so an insert compares keys only within its mailbox instead of
/// walking one skiplist of every key in the memtable (profiled: that walk
/// and its key compares were most of apply). Every scan that stays inside
/// one bucket may run in prefix mode; a scan across buckets must set
/// `total_order_seek` (see `Engine::total_order`).
pub(crate) fn memtable_bucket(key: &[u8]) -> &[u8] {
    let Some((&t, rest)) = key.get(8..).and_then(|r| r.split_first()) else {
        return key;
    };
    match t {
        tag::MAILBOX | tag::MESSAGE | tag::DEDUP | tag::CURSOR => match split_mailbox(rest) {
            Some((mb, _)) => key.get(..9 + mb.len()).unwrap_or(key),
            None => key,
        },
        _ => key.get(..9).unwrap_or(key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_encoding_is_self_delimiting() {
        let a = mailbox("ns", b"ab");
        let b = mailbox("ns", b"abc");
        assert!(!b.starts_with(&a));
        assert_eq!(
            split_mailbox(&[a.as_slice(), b"rest"].concat()),
            Some((a.as_slice(), &b"rest"[..]))
        );
        assert_eq!(split_mailbox(&a[..a.len() - 1]), None);
    }

    #[test]
    fn message_keys_sort_by_seq() {
        let mb = mailbox("ns", b"u");
        let k1 = message(7, &mb, 9);
        let k2 = message(7, &mb, 256);
        assert!(k1 < k2);
        assert_eq!(message_seq(&k2), Some(256));
    }

    #[test]
    fn shard_ranges_are_contiguous_and_disjoint() {
        let (s, e) = shard_range(5).unwrap();
        for k in [
            shard_meta(5),
            message(5, &mailbox("z", &[0xff; 256]), u64::MAX),
            dedup_expiry(5, u64::MAX, &[], &[]),
        ] {
            assert!(k >= s && k < e);
        }
        assert!(shard_meta(6) >= e);
        assert!(shard_range(u64::MAX).is_none());
    }

    #[test]
    fn expiry_keys_roundtrip() {
        let mb = mailbox("ns", b"user");
        let k = dedup_expiry(3, 1234, &mb, b"key-1");
        assert_eq!(parse_dedup_expiry(&k), Some((1234, mb.as_slice(), &b"key-1"[..])));
        assert!(dedup_expiry_bound(3, 1234) <= k && k < dedup_expiry_bound(3, 1235));
    }

    #[test]
    fn memtable_buckets_are_per_mailbox_and_tag_and_stable() {
        let mb = mailbox("ns", b"user");
        let other = mailbox("ns", b"user2");
        let p = message_prefix(4, &mb);
        for k in [message(4, &mb, 1), message(4, &mb, u64::MAX), p.clone()] {
            assert_eq!(memtable_bucket(&k), p.as_slice());
        }
        assert_ne!(memtable_bucket(&message(4, &other, 1)), p.as_slice());
        assert_eq!(memtable_bucket(&mailbox_meta(4, &mb)), mailbox_meta(4, &mb).as_slice());
        let d = dedup(4, &mb, b"k");
        assert_eq!(memtable_bucket(&d), &d[..d.len() - 1]);
        assert_eq!(
            memtable_bucket(&cursor(4, &mb, b"dev")),
            cursor_prefix(4, &mb).as_slice()
        );
        // Shard-wide tags share one bucket per shard and tag: every scan of
        // the expiry index stays inside it.
        let e = dedup_expiry(4, 99, &mb, b"k");
        assert_eq!(memtable_bucket(&e), &e[..9]);
        assert_eq!(memtable_bucket(&dedup_expiry_bound(4, 0)), &e[..9]);
        assert_eq!(memtable_bucket(&system(4, b"x")), &system(4, b"")[..]);
        // Short or unparsable keys are their own bucket; a bucket is its own
        // bucket (RocksDB's prefix-extractor contract).
        for k in [
            &4u64.to_be_bytes()[..],
            &[0u8; 3][..],
            &[0, 0, 0, 0, 0, 0, 0, 4, 2, 9][..],
        ] {
            assert_eq!(memtable_bucket(k), k);
        }
        for k in [message(4, &mb, 7), d.clone(), e.clone(), shard_meta(4)] {
            let b = memtable_bucket(&k);
            assert_eq!(memtable_bucket(b), b);
        }
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }
}
