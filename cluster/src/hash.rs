//! Mailbox → shard placement: a stable 64-bit hash of the user id, placed
//! into contiguous hash ranges.
//!
//! The hash is part of the storage format: changing it moves every mailbox to
//! another shard, so it is pinned here, documented in docs/architecture.md,
//! and checked against fixed vectors in the tests below. It is FNV-1a (64-bit)
//! followed by the murmur3 `fmix64` finaliser: FNV alone spreads short ids
//! poorly over the high bits that pick the range; the finaliser fixes that.
//! Both are tiny, have no seed, and are identical on every platform. The
//! namespace is deliberately NOT hashed: one user's mailboxes in all apps live
//! on one shard, so cross-app delivery to that user is one Raft group.
//!
//! Ranges (not `hash % n`) are what let a later issue split a shard: a split
//! halves one range and moves no other mailbox.

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

/// The half-open hash range `[start, end)` of shard number `i` (0-based) out
/// of `n` equal ranges; the last range ends at `u64::MAX` inclusive, which is
/// expressed as `end = None`.
pub fn equal_range(i: u64, n: u64) -> (u64, Option<u64>) {
    let width = u128::from(u64::MAX) + 1;
    let start = u128::from(i) * width / u128::from(n.max(1));
    let end = (u128::from(i) + 1) * width / u128::from(n.max(1));
    let start = u64::try_from(start).unwrap_or(u64::MAX);
    let end = if end >= width {
        None
    } else {
        Some(u64::try_from(end).unwrap_or(u64::MAX))
    };
    (start, end)
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
    fn ranges_tile_the_space() {
        for n in [1u64, 2, 3, 7, 64, 1000] {
            let mut next = 0u64;
            for i in 0..n {
                let (s, e) = equal_range(i, n);
                assert_eq!(s, next, "range {i}/{n} starts where the previous ended");
                match e {
                    Some(e) => {
                        assert!(e > s);
                        next = e;
                    }
                    None => assert_eq!(i, n - 1, "only the last range is open"),
                }
            }
        }
    }

    #[test]
    fn hash_spreads_sequential_ids() {
        let n = 64u64;
        let mut counts = vec![0u32; 64];
        for u in 0..64_000u32 {
            let h = user_hash(format!("user-{u}").as_bytes());
            let i = usize::try_from((u128::from(h) * u128::from(n)) >> 64).unwrap();
            counts[i] += 1;
        }
        // 1,000 expected per range; allow ±20 %.
        assert!(counts.iter().all(|c| (800..=1200).contains(c)), "{counts:?}");
    }
}
