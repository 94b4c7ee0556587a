//! Byte-string mutations that break decoders: what a flipped bit, a torn
//! write, a hostile peer or a confused client produce.

use rand::rngs::StdRng;
use rand::Rng;

/// Inputs are cut to this length: decoders are bounded, and the runner's
/// speed matters more than giant inputs.
pub const INPUT_BYTES_MAX: usize = 64 << 10;

/// Values at the edges of integer widths.
const INTERESTING_U64: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7f).unwrap_or(0) | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).unwrap_or(0));
    out
}

fn edge_u64(rng: &mut StdRng) -> u64 {
    INTERESTING_U64
        .get(rng.gen_range(0..INTERESTING_U64.len()))
        .copied()
        .unwrap_or(0)
}

fn pos(rng: &mut StdRng, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        rng.gen_range(0..=len)
    }
}

/// Returns a mutant of `input`: 1 to 4 mutations, some using `other` (a
/// second corpus entry) for splices.
pub fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        let len = v.len();
        match rng.gen_range(0..11) {
            // Flip one bit.
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                if let Some(b) = v.get_mut(i) {
                    *b ^= 1 << rng.gen_range(0..8);
                }
            }
            // Set a byte to a random or edge value.
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                let edges = [0u8, 0xff, 0x7f, 0x80, rng.gen()];
                let x = edges.get(rng.gen_range(0..edges.len())).copied().unwrap_or(0);
                if let Some(b) = v.get_mut(i) {
                    *b = x;
                }
            }
            // Truncate (a torn write, a cut stream).
            2 => v.truncate(pos(rng, len)),
            // Delete a range.
            3 if len > 0 => {
                let a = rng.gen_range(0..len);
                let b = (a + rng.gen_range(1..=16)).min(len);
                v.drain(a..b);
            }
            // Insert random bytes.
            4 => {
                let at = pos(rng, len);
                let n = rng.gen_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                v.splice(at..at, bytes);
            }
            // Insert an edge value as a varint (a length or a tag).
            5 => {
                let at = pos(rng, len);
                let x = edge_u64(rng);
                v.splice(at..at, varint(x));
            }
            // Overwrite 4 or 8 bytes with a big-endian edge value (the
            // engine's fixed-width fields).
            6 if len >= 8 => {
                let at = rng.gen_range(0..=len - 8);
                let x = edge_u64(rng);
                let wide: bool = rng.gen();
                let bytes = if wide {
                    x.to_be_bytes().to_vec()
                } else {
                    u32::try_from(x & 0xffff_ffff).unwrap_or(0).to_be_bytes().to_vec()
                };
                v.splice(at..at + bytes.len(), bytes);
            }
            // Duplicate a range (repeated fields, repeated records).
            7 if len > 0 => {
                let a = rng.gen_range(0..len);
                let b = (a + rng.gen_range(1..=32)).min(len);
                let piece = v.get(a..b).map(<[u8]>::to_vec).unwrap_or_default();
                let at = pos(rng, v.len());
                v.splice(at..at, piece);
            }
            // Splice: our head, the other's tail.
            8 => {
                let a = pos(rng, len);
                let b = pos(rng, other.len());
                v.truncate(a);
                v.extend_from_slice(other.get(b..).unwrap_or(&[]));
            }
            // Increment or decrement a byte (lengths off by one).
            9 if len > 0 => {
                let i = rng.gen_range(0..len);
                if let Some(b) = v.get_mut(i) {
                    *b = if rng.gen() {
                        b.wrapping_add(1)
                    } else {
                        b.wrapping_sub(1)
                    };
                }
            }
            // Entirely random bytes.
            10 => {
                let n = rng.gen_range(0..64);
                v = (0..n).map(|_| rng.gen()).collect();
            }
            _ => {}
        }
    }
    v.truncate(INPUT_BYTES_MAX);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mutants_differ_and_stay_bounded() {
        let mut rng = StdRng::seed_from_u64(1);
        let input = b"some valid encoding".to_vec();
        let mut changed = 0;
        for _ in 0..1_000 {
            let m = mutate(&mut rng, &input, b"other");
            assert!(m.len() <= INPUT_BYTES_MAX);
            changed += usize::from(m != input);
        }
        assert!(changed > 900, "{changed} of 1000 mutants differ");
        assert_eq!(varint(300), vec![0xac, 0x02]);
    }
}
