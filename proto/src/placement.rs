//! The placement hash: which shard a user id lives on. It is part of the
//! wire contract because clients route with it: the client SDK hashes a user
//! id, finds the shard whose `[range_start, range_end)` (from
//! `Admin.GetShardMap`) holds the hash, and sends the request to that shard's
//! leader. The server places mailboxes with the same function.
//!
//! The hash is also part of the storage format: changing it moves every
//! mailbox to another shard, so it is pinned here, documented in
//! docs/architecture.md §2, and checked against fixed vectors computed by an
//! independent implementation. It is FNV-1a (64-bit) followed by the murmur3
//! `fmix64` finaliser: FNV alone spreads short ids poorly over the high bits
//! that pick the range; the finaliser fixes that. Both are tiny, unseeded and
//! identical on every platform. The namespace is deliberately NOT hashed: one
//! user's mailboxes in all apps live on one shard.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The placement hash of a user id. Never change it (see the module docs).
pub fn user_hash(user_id: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in user_id {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The middle of the hash range `[start, end)` (`end: None` = through
/// `u64::MAX`): where a split cuts a shard by default (D38).
pub fn range_middle(start: u64, end: Option<u64>) -> u64 {
    let end = end.map_or(u128::from(u64::MAX) + 1, u128::from);
    let start = u128::from(start);
    u64::try_from(start + end.saturating_sub(start) / 2).unwrap_or(u64::MAX)
}

/// Whether `hash` falls in the half-open range `[start, end)`, where
/// `end = None` means "to `u64::MAX` inclusive" (the last shard's range).
pub fn range_contains(start: u64, end: Option<u64>, hash: u64) -> bool {
    hash >= start && end.is_none_or(|e| hash < e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_pinned() {
        // Fixed vectors, computed by an independent implementation (Python,
        // in docs/architecture.md). If one changes, every mailbox moves.
        assert_eq!(user_hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(user_hash(b"alice"), 0x3507_d047_a67c_08f4);
        assert_eq!(user_hash(b"bob"), 0xf649_3629_e565_4ae0);
        assert_eq!(user_hash(&[0u8; 8]), 0x7bd3_144f_29c0_cc9e);
    }

    #[test]
    fn ranges_are_half_open_and_the_last_is_closed() {
        assert!(range_contains(10, Some(20), 10));
        assert!(!range_contains(10, Some(20), 20));
        assert!(!range_contains(10, Some(20), 9));
        assert!(range_contains(10, None, u64::MAX));
    }
}
