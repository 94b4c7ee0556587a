//! Mailbox → shard placement: a stable 64-bit hash of the user id, placed
//! into contiguous hash ranges.
//!
//! The hash itself lives in `pigeonhole_proto::placement`, because clients
//! route with it too; it is pinned by test vectors there. This module adds
//! how the server cuts the hash space into shard ranges.
//!
//! Ranges (not `hash % n`) are what let a later issue split a shard: a split
//! halves one range and moves no other mailbox.

pub use pigeonhole_proto::placement::user_hash;

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
