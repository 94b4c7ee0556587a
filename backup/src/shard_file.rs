//! Shard files: `magic "PHBK" | version:u8 = 1 | shard:u64be`, then one
//! `len:u32be | frame` per snapshot chunk (docs/storage-format.md §13).
//! The manifest holds the file's size and SHA-256.
//!
//! The writer checks every frame before it writes it (crc, header, order),
//! so a backup never stores what the node did not mean to send; the
//! reader checks everything again against the manifest.

use crate::frame::{parse_frame, FrameHeader, FRAME_BYTES_MAX};
use crate::manifest::{file_name, Manifest, ShardEntry};
use crate::BackupError;
use sha2::{Digest, Sha256};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const FILE_MAGIC: &[u8; 4] = b"PHBK";
const FILE_VERSION: u8 = 1;

/// What [`ShardFileWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenShard {
    pub shard: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    pub chunks: u32,
    pub records: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// Writes one shard's file from the frames of `Admin.BackupShard`.
#[derive(Debug)]
pub struct ShardFileWriter {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
    hash: Sha256,
    shard: u64,
    /// (index, term) of the stream, from its first frame.
    state: Option<(u64, u64)>,
    chunks: u32,
    records: u64,
    bytes: u64,
    last: bool,
}

impl ShardFileWriter {
    /// Creates (or truncates) `shard`'s file in `dir`.
    pub fn create(dir: &Path, shard: u64) -> Result<ShardFileWriter, BackupError> {
        let path = dir.join(file_name(shard));
        let file = crate::create_private(&path)?;
        let mut w = ShardFileWriter {
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            shard,
            state: None,
            chunks: 0,
            records: 0,
            bytes: 0,
            last: false,
        };
        let mut head = FILE_MAGIC.to_vec();
        head.push(FILE_VERSION);
        head.extend_from_slice(&shard.to_be_bytes());
        w.write(&head)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.out.write_all(bytes).map_err(|e| BackupError::io(&self.path, e))?;
        self.hash.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Checks and appends one frame.
    pub fn push(&mut self, frame: &[u8]) -> Result<FrameHeader, BackupError> {
        let h =
            parse_frame(frame).map_err(|r| BackupError::corrupt(&self.path, format!("frame {}: {r}", self.chunks)))?;
        check_next(&self.path, self.shard, self.state, self.chunks, self.last, &h)?;
        self.state = Some((h.index, h.term));
        let len = u32::try_from(frame.len()).map_err(|_| BackupError::corrupt(&self.path, "frame over 4 GiB"))?;
        self.write(&len.to_be_bytes())?;
        self.write(frame)?;
        self.chunks += 1;
        self.records += u64::from(h.records);
        self.last = h.last;
        Ok(h)
    }

    /// Flushes and fsyncs the file; fails unless the last frame came.
    pub fn finish(mut self) -> Result<WrittenShard, BackupError> {
        let (Some((applied_index, applied_term)), true) = (self.state, self.last) else {
            return Err(BackupError::corrupt(
                &self.path,
                "the stream ended before its last chunk",
            ));
        };
        self.out.flush().map_err(|e| BackupError::io(&self.path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| BackupError::io(&self.path, e))?;
        crate::sync_dir(&self.path)?;
        Ok(WrittenShard {
            shard: self.shard,
            applied_index,
            applied_term,
            chunks: self.chunks,
            records: self.records,
            bytes: self.bytes,
            sha256: crate::hex(&self.hash.finalize()),
        })
    }
}

/// The order rules every frame of a stream follows.
fn check_next(
    path: &Path,
    shard: u64,
    state: Option<(u64, u64)>,
    seq_no: u32,
    after_last: bool,
    h: &FrameHeader,
) -> Result<(), BackupError> {
    let bad = |r: String| Err(BackupError::corrupt(path, format!("frame {seq_no}: {r}")));
    if after_last {
        return bad("a frame after the last one".into());
    }
    if h.shard != shard {
        return bad(format!("belongs to shard {}, not {shard}", h.shard));
    }
    if h.seq_no != seq_no {
        return bad(format!("has sequence number {}", h.seq_no));
    }
    if let Some((index, term)) = state {
        if (h.index, h.term) != (index, term) {
            return bad(format!(
                "is at index {}/term {}, the stream at {index}/{term}",
                h.index, h.term
            ));
        }
    }
    Ok(())
}

/// What a verify read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub shards: usize,
    pub chunks: u64,
    pub records: u64,
    pub bytes: u64,
}

/// Reads `entry`'s file and hands every frame, checked, to `each`
/// (with the header). After the last frame it checks the file's size and
/// SHA-256 and the counts against the manifest; only a frame that passed
/// its own crc and the order rules is ever handed out, but the caller
/// must treat nothing as final until this returns `Ok` (the SHA-256 is
/// known only at the end).
pub fn read_shard<E: From<BackupError>>(
    dir: &Path,
    entry: &ShardEntry,
    mut each: impl FnMut(&FrameHeader, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let path = dir.join(file_name(entry.id));
    let corrupt = |r: String| E::from(BackupError::corrupt(&path, r));
    let file = std::fs::File::open(&path).map_err(|e| BackupError::io(&path, e))?;
    let mut r = HashingReader {
        inner: BufReader::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
        path: path.clone(),
    };
    let mut head = [0u8; 13];
    r.exact(&mut head)?;
    let mut want = FILE_MAGIC.to_vec();
    want.push(FILE_VERSION);
    want.extend_from_slice(&entry.id.to_be_bytes());
    if head.as_slice() != want.as_slice() {
        return Err(corrupt("bad file header (not this shard's backup file)".into()));
    }
    let (mut chunks, mut records, mut last) = (0u32, 0u64, false);
    let state = Some((entry.applied_index, entry.applied_term));
    let mut frame = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if !r.exact_or_eof(&mut len)? {
            break;
        }
        let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if len > FRAME_BYTES_MAX {
            return Err(corrupt(format!(
                "frame {chunks} says {len} bytes, over {FRAME_BYTES_MAX}"
            )));
        }
        frame.resize(len, 0);
        r.exact(&mut frame)?;
        let h = parse_frame(&frame).map_err(|e| corrupt(format!("frame {chunks}: {e}")))?;
        check_next(&path, entry.id, state, chunks, last, &h)?;
        each(&h, &frame)?;
        chunks += 1;
        records += u64::from(h.records);
        last = h.last;
    }
    if !last {
        return Err(corrupt("the file ends before the stream's last chunk".into()));
    }
    if r.bytes != entry.bytes {
        return Err(corrupt(format!("{} bytes, the manifest says {}", r.bytes, entry.bytes)));
    }
    let sum = crate::hex(&r.hash.finalize());
    if sum != entry.sha256 {
        return Err(corrupt(format!("SHA-256 {sum}, the manifest says {}", entry.sha256)));
    }
    if (chunks, records) != (entry.chunks, entry.records) {
        return Err(corrupt(format!(
            "{chunks} chunks and {records} records, the manifest says {} and {}",
            entry.chunks, entry.records
        )));
    }
    Ok(())
}

/// Checks the whole backup in `dir` offline: the manifest, then every
/// shard file ([`read_shard`]). `progress` gets the bytes of each file
/// as it is done.
pub fn verify(dir: &Path, mut progress: impl FnMut(&ShardEntry)) -> Result<VerifyReport, BackupError> {
    let m = Manifest::load(dir)?;
    let mut report = VerifyReport::default();
    for entry in &m.shards {
        read_shard::<BackupError>(dir, entry, |_, _| Ok(()))?;
        report.shards += 1;
        report.chunks += u64::from(entry.chunks);
        report.records += entry.records;
        report.bytes += entry.bytes;
        progress(entry);
    }
    Ok(report)
}

struct HashingReader {
    inner: BufReader<std::fs::File>,
    hash: Sha256,
    bytes: u64,
    path: PathBuf,
}

impl HashingReader {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), BackupError> {
        if self.exact_or_eof(buf)? {
            Ok(())
        } else {
            Err(BackupError::corrupt(&self.path, "the file ends inside a frame"))
        }
    }

    /// Fills `buf`; `false` at a clean end of file (nothing read).
    fn exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool, BackupError> {
        let mut got = 0;
        while got < buf.len() {
            let rest = buf.get_mut(got..).unwrap_or_default();
            match self.inner.read(rest) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(BackupError::corrupt(&self.path, "the file ends inside a frame")),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BackupError::io(&self.path, e)),
            }
        }
        let done = buf.get(..got).unwrap_or_default();
        self.hash.update(done);
        self.bytes += got as u64;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_for_test;
    use crate::manifest::{FORMAT, FORMAT_VERSION};

    fn frame(shard: u64, seq_no: u32, last: bool) -> Vec<u8> {
        let h = FrameHeader {
            shard,
            index: 50,
            term: 3,
            seq_no,
            records: 2,
            last,
        };
        encode_for_test(&h, format!("records of {shard}/{seq_no}").as_bytes())
    }

    /// A two-shard backup: the metadata group and one data shard.
    fn backup(dir: &Path) -> Manifest {
        let mut shards = Vec::new();
        for (id, frames) in [(0u64, 1u32), (1, 3)] {
            let mut w = ShardFileWriter::create(dir, id).unwrap();
            for i in 0..frames {
                w.push(&frame(id, i, i + 1 == frames)).unwrap();
            }
            let s = w.finish().unwrap();
            shards.push(ShardEntry {
                id,
                range_start: 0,
                range_end: None,
                epoch: 0,
                parent: 0,
                applied_index: s.applied_index,
                applied_term: s.applied_term,
                chunks: s.chunks,
                records: s.records,
                bytes: s.bytes,
                sha256: s.sha256,
            });
        }
        let m = Manifest {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            started_unix_ms: 1,
            completed_unix_ms: 2,
            bootstrap_shard_count: 1,
            shards,
        };
        m.write(dir).unwrap();
        m
    }

    #[test]
    fn a_written_backup_verifies() {
        let dir = tempfile::tempdir().unwrap();
        backup(dir.path());
        let r = verify(dir.path(), |_| {}).unwrap();
        assert_eq!((r.shards, r.chunks, r.records), (2, 4, 8));
    }

    /// Every single-byte change of a shard file is refused, and so is a
    /// truncated or extended one.
    #[test]
    fn any_corruption_of_a_shard_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        backup(dir.path());
        let path = dir.path().join(file_name(1));
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            let e = verify(dir.path(), |_| {}).unwrap_err();
            assert!(matches!(e, BackupError::Corrupt { .. }), "byte {i}: {e}");
        }
        for bad in [&good[..good.len() - 1], &good[..good.len() - 40]] {
            std::fs::write(&path, bad).unwrap();
            assert!(verify(dir.path(), |_| {}).is_err());
        }
        let mut longer = good.clone();
        longer.extend_from_slice(&[0, 0, 0, 0]);
        std::fs::write(&path, &longer).unwrap();
        assert!(verify(dir.path(), |_| {}).is_err());
        std::fs::write(&path, &good).unwrap();
        verify(dir.path(), |_| {}).unwrap();
    }

    #[test]
    fn the_writer_refuses_streams_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardFileWriter::create(dir.path(), 4).unwrap();
        assert!(w.push(&frame(5, 0, false)).is_err(), "another shard's frame");
        assert!(w.push(&frame(4, 1, false)).is_err(), "a gap");
        w.push(&frame(4, 0, false)).unwrap();
        let mut other_index = frame(4, 1, true);
        other_index[14] ^= 1; // index field, then fix the crc
        let n = other_index.len();
        let crc = crc32fast::hash(&other_index[..n - 4]);
        other_index[n - 4..].copy_from_slice(&crc.to_be_bytes());
        assert!(w.push(&other_index).is_err(), "a frame at another index");
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("before its last chunk"), "{e}");
    }
}
