//! The receiving side of a snapshot: chunks are written to a file under the
//! node's data dir as they arrive, fsync'd, and renamed to
//! `<shard>.<stream>.snap` only when the last chunk is in. The driver ingests
//! from that file. Every stream has its own name, so two streams for one
//! shard (say, across a leader change) never overwrite each other's file.
//!
//! Why a file and not memory: a shard snapshot can be far larger than the
//! memory we want to spend on it, and the file is also what makes ingest
//! crash-safe. The engine marks a shard `Ingesting` while it replaces it; if
//! the node dies then, the complete `<shard>.snap` is still on disk and the
//! node re-ingests it at start instead of serving (or losing) a torn shard;
//! if several are there, the newest (highest index) wins. The shard's files
//! are removed once an ingest is durable.
//!
//! File format: repeated `len:u32 (big-endian) chunk`, where each chunk is an
//! engine `SnapshotChunk` encoding with its own crc32.

use pigeonhole_engine::{SnapshotChunk, CHUNK_BYTES_MAX};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where snapshots are spooled.
#[derive(Debug)]
pub struct SnapshotSpool {
    dir: PathBuf,
    next_tmp: AtomicU64,
}

impl SnapshotSpool {
    /// Uses (and creates) `dir`; leftover temporary files of an earlier run
    /// are removed, complete `.snap` files are kept for recovery.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        for e in fs::read_dir(&dir)? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "tmp") {
                fs::remove_file(&p)?;
            }
        }
        Ok(SnapshotSpool {
            dir,
            next_tmp: AtomicU64::new(0),
        })
    }

    /// Complete snapshot files of `shard`, as (index, path), newest first.
    /// A file whose first chunk does not decode is skipped.
    pub fn complete(&self, shard: u64) -> std::io::Result<Vec<(u64, PathBuf)>> {
        let prefix = format!("{shard}.");
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let p = e?.path();
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !name.starts_with(&prefix) || !name.ends_with(".snap") {
                continue;
            }
            if let Some(index) = first_chunk_index(&p) {
                out.push((index, p));
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        Ok(out)
    }

    /// Removes every snapshot file of `shard` (`.snap`), also one whose
    /// first chunk does not decode: [`SnapshotSpool::complete`] skips such
    /// a file, and nothing else would ever delete it. A file still being
    /// received is a `.tmp` and stays.
    pub fn remove_all(&self, shard: u64) -> std::io::Result<()> {
        let prefix = format!("{shard}.");
        for e in fs::read_dir(&self.dir)? {
            let p = e?.path();
            let ours = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".snap"));
            if !ours {
                continue;
            }
            match fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Starts a new spool file for `shard`.
    pub fn begin(&self, from: u64, shard: u64) -> std::io::Result<SpoolWriter> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        // Unique across restarts too: a complete file of an earlier run may
        // still be waiting for recovery.
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let stream = format!("{from}-{stamp}-{n}");
        let tmp = self.dir.join(format!("{shard}.{stream}.tmp"));
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        Ok(SpoolWriter {
            from,
            shard,
            tmp,
            done: self.dir.join(format!("{shard}.{stream}.snap")),
            dir: self.dir.clone(),
            out: Some(BufWriter::new(file)),
            next_seq_no: 0,
            saw_last: false,
        })
    }
}

/// One snapshot being received.
#[derive(Debug)]
pub struct SpoolWriter {
    from: u64,
    shard: u64,
    tmp: PathBuf,
    done: PathBuf,
    dir: PathBuf,
    out: Option<BufWriter<File>>,
    next_seq_no: u32,
    saw_last: bool,
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

impl SpoolWriter {
    /// Appends one encoded chunk after checking it belongs here, in order.
    pub fn write_chunk(&mut self, encoded: &[u8]) -> std::io::Result<()> {
        let chunk = SnapshotChunk::decode(encoded).map_err(|e| invalid(e.to_string()))?;
        if chunk.shard != self.shard || chunk.seq_no != self.next_seq_no || self.saw_last {
            return Err(invalid(format!(
                "snapshot chunk shard {} seq {} out of place (want shard {} seq {})",
                chunk.shard, chunk.seq_no, self.shard, self.next_seq_no
            )));
        }
        self.next_seq_no += 1;
        self.saw_last = chunk.last;
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| invalid("spool already finished".into()))?;
        let len = u32::try_from(encoded.len()).map_err(|_| invalid("chunk too large".into()))?;
        out.write_all(&len.to_be_bytes())?;
        out.write_all(encoded)
    }

    /// Makes the file durable and complete; returns (from, shard, path).
    pub fn finish(mut self) -> std::io::Result<(u64, u64, PathBuf)> {
        if !self.saw_last {
            return Err(invalid("snapshot stream ended before its last chunk".into()));
        }
        let out = self
            .out
            .take()
            .ok_or_else(|| invalid("spool already finished".into()))?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&self.tmp, &self.done)?;
        File::open(&self.dir)?.sync_all()?;
        Ok((self.from, self.shard, self.done.clone()))
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            // Abandoned half-way: the temporary file is garbage.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The index of the snapshot in a spooled file (from its first chunk).
fn first_chunk_index(path: &Path) -> Option<u64> {
    let mut found = None;
    let _ = read_chunks_until(path, |chunk| {
        found = Some(chunk.index);
        Ok(false)
    });
    found
}

/// Reads the chunks of a spooled snapshot back, in order.
pub fn read_chunks(path: &Path, mut each: impl FnMut(SnapshotChunk) -> std::io::Result<()>) -> std::io::Result<()> {
    read_chunks_until(path, |c| each(c).map(|()| true))
}

/// Like `read_chunks`, but `each` returns whether to go on.
fn read_chunks_until(path: &Path, mut each: impl FnMut(SnapshotChunk) -> std::io::Result<bool>) -> std::io::Result<()> {
    let mut r = BufReader::new(File::open(path)?);
    let mut len = [0u8; 4];
    loop {
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let n = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if n > CHUNK_BYTES_MAX + 64 {
            return Err(invalid(format!("spooled chunk of {n} bytes exceeds the limit")));
        }
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf)?;
        if !each(SnapshotChunk::decode(&buf).map_err(|e| invalid(e.to_string()))?)? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_shards_snapshots_takes_undecodable_ones_too_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let spool = SnapshotSpool::open(dir.path()).unwrap();
        for name in ["7.1.snap", "7.2.tmp", "8.1.snap", "17.1.snap"] {
            fs::write(dir.path().join(name), b"not a snapshot chunk").unwrap();
        }
        // A `.snap` whose first chunk does not decode is not "complete"...
        assert!(spool.complete(7).unwrap().is_empty());
        // ...and is still the shard's to remove: nothing else would.
        spool.remove_all(7).unwrap();
        spool.remove_all(1).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["17.1.snap", "7.2.tmp", "8.1.snap"]);
    }
}
