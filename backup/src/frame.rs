//! The header of one shard snapshot chunk, as the engine encodes it
//! (`pigeonhole_engine::SnapshotChunk::encode`, docs/storage-format.md):
//!
//! `magic "PHCK" | version:u8 = 1 | shard:u64 | index:u64 | term:u64 |
//! seq_no:u32 | records:u32 | last:u8 | data_len:u32 | data | crc32:u32`,
//! big-endian, the crc over every byte before it.
//!
//! Read here without the engine so that phctl can check a backup offline;
//! the records in `data` are decoded (each with its own crc) only by the
//! restore, which has the engine.

/// The largest frame accepted: the engine's 64 MiB chunk limit plus the
/// header and crc.
pub const FRAME_BYTES_MAX: usize = (64 << 20) + 64;

const MAGIC: &[u8; 4] = b"PHCK";
const VERSION: u8 = 1;
/// Bytes before `data`.
const HEADER_BYTES: usize = 4 + 1 + 8 + 8 + 8 + 4 + 4 + 1 + 4;

/// The fields of a chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub shard: u64,
    /// The applied index the shard's state is consistent at.
    pub index: u64,
    pub term: u64,
    /// 0, 1, 2, ... in stream order.
    pub seq_no: u32,
    /// Key-value records in the chunk.
    pub records: u32,
    /// The stream's last chunk.
    pub last: bool,
}

/// Checks one frame's size, crc, magic, version and length field, and
/// returns its header.
pub fn parse_frame(frame: &[u8]) -> Result<FrameHeader, String> {
    if frame.len() > FRAME_BYTES_MAX {
        return Err(format!("frame of {} bytes exceeds {FRAME_BYTES_MAX}", frame.len()));
    }
    let (body, crc) = frame
        .split_last_chunk::<4>()
        .ok_or_else(|| format!("frame of {} bytes is shorter than its crc", frame.len()))?;
    if crc32fast::hash(body) != u32::from_be_bytes(*crc) {
        return Err("frame crc32 mismatch".into());
    }
    let mut r = Fields(body);
    if r.take::<4>()? != *MAGIC {
        return Err("not a snapshot chunk (bad magic)".into());
    }
    let [version] = r.take::<1>()?;
    if version != VERSION {
        return Err(format!("chunk version {version}, this build reads {VERSION}"));
    }
    let shard = u64::from_be_bytes(r.take()?);
    let index = u64::from_be_bytes(r.take()?);
    let term = u64::from_be_bytes(r.take()?);
    let seq_no = u32::from_be_bytes(r.take()?);
    let records = u32::from_be_bytes(r.take()?);
    let last = match r.take::<1>()? {
        [0] => false,
        [1] => true,
        [x] => return Err(format!("bad last flag {x}")),
    };
    let data_len = u32::from_be_bytes(r.take()?);
    if u64::from(data_len) + HEADER_BYTES as u64 != body.len() as u64 {
        return Err(format!(
            "chunk says {data_len} data bytes, the frame holds {}",
            body.len().saturating_sub(HEADER_BYTES)
        ));
    }
    Ok(FrameHeader {
        shard,
        index,
        term,
        seq_no,
        records,
        last,
    })
}

struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| "frame shorter than a chunk header".to_string())?;
        self.0 = rest;
        Ok(*head)
    }
}

#[cfg(test)]
pub(crate) fn encode_for_test(h: &FrameHeader, data: &[u8]) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.push(VERSION);
    v.extend_from_slice(&h.shard.to_be_bytes());
    v.extend_from_slice(&h.index.to_be_bytes());
    v.extend_from_slice(&h.term.to_be_bytes());
    v.extend_from_slice(&h.seq_no.to_be_bytes());
    v.extend_from_slice(&h.records.to_be_bytes());
    v.push(u8::from(h.last));
    v.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(data);
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_be_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_encodes_and_refuses_any_flipped_bit() {
        let h = FrameHeader {
            shard: 7,
            index: 1234,
            term: 9,
            seq_no: 3,
            records: 2,
            last: true,
        };
        let f = encode_for_test(&h, b"abcdef");
        assert_eq!(parse_frame(&f).unwrap(), h);
        for i in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                assert!(parse_frame(&g).is_err(), "flip of byte {i} bit {bit} accepted");
            }
        }
        assert!(parse_frame(&f[..f.len() - 1]).is_err());
        assert!(parse_frame(&[]).is_err());
    }
}
