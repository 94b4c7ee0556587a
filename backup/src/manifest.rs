//! `MANIFEST.json`: what a backup holds, and the checks a manifest must
//! pass before any shard file is read.

use crate::BackupError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;

/// The manifest's name in a backup directory.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// The file holding the manifest's SHA-256 (64 hex digits and a newline).
pub const MANIFEST_SUM_FILE: &str = "MANIFEST.sha256";
/// `Manifest::format`.
pub const FORMAT: &str = "pigeonhole-backup";
/// `Manifest::version` this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Shards in one backup, at most: the cluster's 65,536 data shards and
/// the metadata group.
pub const SHARDS_MAX: usize = 65_537;
/// The largest shard id (the cluster's ids are below 2^63; the ids above
/// are the storage engine's private data spaces).
pub const SHARD_ID_MAX: u64 = (1 << 63) - 1;
/// The largest manifest read (about 300 bytes per shard).
const MANIFEST_BYTES_MAX: u64 = 64 << 20;

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Wall clock of the backing-up host when the backup started and when
    /// its last shard was in.
    pub started_unix_ms: u64,
    pub completed_unix_ms: u64,
    /// Data shards the source cluster was bootstrapped with (ids 1 to this);
    /// shards with a `parent` came from splits. A restored cluster must be
    /// started with `--shards` equal to it.
    pub bootstrap_shard_count: u64,
    /// Every shard, the metadata group (id 0) first, then by range.
    pub shards: Vec<ShardEntry>,
}

/// One shard's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub id: u64,
    /// Hash range `[range_start, range_end)`; `None` runs to the top.
    /// The metadata group's is the whole space.
    pub range_start: u64,
    pub range_end: Option<u64>,
    /// Splits the shard came out of or went through.
    pub epoch: u64,
    /// The shard it was split from; 0 for a bootstrap shard.
    pub parent: u64,
    /// The applied index and term the state is consistent at.
    pub applied_index: u64,
    pub applied_term: u64,
    /// Chunks and key-value records in the file.
    pub chunks: u32,
    pub records: u64,
    /// The file's size and SHA-256 (lower-case hex).
    pub bytes: u64,
    pub sha256: String,
}

/// A shard's file name: fixed by its id, never taken from the manifest,
/// so a manifest cannot point outside its directory.
pub fn file_name(shard: u64) -> String {
    format!("shard-{shard:020}.phb")
}

impl Manifest {
    /// Writes `MANIFEST.sha256` and then `MANIFEST.json`, each durably:
    /// a directory with a manifest holds a finished backup.
    pub fn write(&self, dir: &Path) -> Result<(), BackupError> {
        self.check(dir)?;
        let path = dir.join(MANIFEST_FILE);
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| BackupError::manifest(&path, e.to_string()))?;
        json.push(b'\n');
        let sum = format!("{}\n", crate::hex(&Sha256::digest(&json)));
        crate::write_durably(&dir.join(MANIFEST_SUM_FILE), sum.as_bytes())?;
        crate::write_durably(&path, &json)
    }

    /// Reads and checks the manifest of the backup in `dir`.
    pub fn load(dir: &Path) -> Result<Manifest, BackupError> {
        let path = dir.join(MANIFEST_FILE);
        let size = std::fs::metadata(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    BackupError::manifest(&path, "missing: not a backup, or one that never finished")
                } else {
                    BackupError::io(&path, e)
                }
            })?
            .len();
        if size > MANIFEST_BYTES_MAX {
            return Err(BackupError::manifest(
                &path,
                format!("{size} bytes exceeds the {MANIFEST_BYTES_MAX}-byte limit"),
            ));
        }
        let json = std::fs::read(&path).map_err(|e| BackupError::io(&path, e))?;
        let sum_path = dir.join(MANIFEST_SUM_FILE);
        let sum = std::fs::read_to_string(&sum_path).map_err(|e| BackupError::io(&sum_path, e))?;
        if sum.trim() != crate::hex(&Sha256::digest(&json)) {
            return Err(BackupError::corrupt(
                &path,
                format!("SHA-256 differs from {MANIFEST_SUM_FILE}"),
            ));
        }
        let m: Manifest = serde_json::from_slice(&json).map_err(|e| BackupError::manifest(&path, e.to_string()))?;
        m.check(dir)?;
        Ok(m)
    }

    /// The structural checks: format and version, unique ids, the
    /// metadata group present, bootstrap shards numbered 1 to
    /// `bootstrap_shard_count`, and data shard ranges that tile the hash
    /// space with no gap and no overlap.
    pub fn check(&self, dir: &Path) -> Result<(), BackupError> {
        let path = dir.join(MANIFEST_FILE);
        let bad = |reason: String| Err(BackupError::manifest(&path, reason));
        if self.format != FORMAT {
            return bad(format!("format {:?}, expected {FORMAT:?}", self.format));
        }
        if self.version != FORMAT_VERSION {
            return bad(format!("version {}, this build reads {FORMAT_VERSION}", self.version));
        }
        if self.shards.len() > SHARDS_MAX {
            return bad(format!("{} shards exceed the limit of {SHARDS_MAX}", self.shards.len()));
        }
        if self.bootstrap_shard_count == 0 || self.bootstrap_shard_count > self.shards.len() as u64 {
            return bad(format!(
                "bootstrap_shard_count {} is outside 1..={} (the data shards listed)",
                self.bootstrap_shard_count,
                self.shards.len().saturating_sub(1)
            ));
        }
        let mut ids = BTreeSet::new();
        for s in &self.shards {
            if s.id > SHARD_ID_MAX {
                return bad(format!("shard id {} is above the limit of {SHARD_ID_MAX}", s.id));
            }
            if !ids.insert(s.id) {
                return bad(format!("shard {} is listed twice", s.id));
            }
            if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("shard {}: sha256 is not 64 hex digits", s.id));
            }
            if s.chunks == 0 {
                return bad(format!("shard {}: no chunks", s.id));
            }
        }
        if !ids.contains(&0) {
            return bad("the metadata group (shard 0) is missing".into());
        }
        let bootstrap: Vec<u64> = self
            .shards
            .iter()
            .filter(|s| s.id != 0 && s.parent == 0)
            .map(|s| s.id)
            .collect();
        let want: Vec<u64> = (1..=self.bootstrap_shard_count).collect();
        let mut sorted = bootstrap.clone();
        sorted.sort_unstable();
        if sorted != want {
            return bad(format!(
                "bootstrap shards (no parent) are {sorted:?}, expected 1..={}",
                self.bootstrap_shard_count
            ));
        }
        let mut data: Vec<&ShardEntry> = self.shards.iter().filter(|s| s.id != 0).collect();
        data.sort_by_key(|s| s.range_start);
        let mut next = Some(0u64); // the first hash not yet covered; None = all
        for s in data {
            if next != Some(s.range_start) {
                return bad(format!(
                    "shard {} starts at hash {}, the shards before it end at {next:?}: ranges must tile the hash space",
                    s.id, s.range_start
                ));
            }
            if s.range_end.is_some_and(|e| e <= s.range_start) {
                return bad(format!("shard {} has an empty range", s.id));
            }
            next = s.range_end;
        }
        if next.is_some() {
            return bad(format!("no shard covers the hashes from {next:?} up"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, start: u64, end: Option<u64>, parent: u64) -> ShardEntry {
        ShardEntry {
            id,
            range_start: start,
            range_end: end,
            epoch: u64::from(parent != 0),
            parent,
            applied_index: 10,
            applied_term: 2,
            chunks: 1,
            records: 1,
            bytes: 0,
            sha256: "0".repeat(64),
        }
    }

    fn manifest(shards: Vec<ShardEntry>, count: u64) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            started_unix_ms: 1,
            completed_unix_ms: 2,
            bootstrap_shard_count: count,
            shards,
        }
    }

    #[test]
    fn structure_checks_catch_gaps_overlaps_and_numbering() {
        let d = Path::new("/nowhere");
        let meta = entry(0, 0, None, 0);
        let ok = manifest(
            vec![
                meta.clone(),
                entry(1, 0, Some(100), 0),
                entry(3, 100, Some(200), 1),
                entry(2, 200, None, 0),
            ],
            2,
        );
        ok.check(d).unwrap();
        let cases = [
            (manifest(vec![entry(1, 0, None, 0)], 1), "metadata group"),
            (
                manifest(vec![meta.clone(), entry(1, 0, Some(100), 0), entry(2, 101, None, 0)], 2),
                "tile",
            ),
            (
                manifest(vec![meta.clone(), entry(1, 0, Some(100), 0), entry(2, 99, None, 0)], 2),
                "tile",
            ),
            (manifest(vec![meta.clone(), entry(1, 0, Some(100), 0)], 1), "covers"),
            (manifest(vec![meta.clone(), entry(1, 0, None, 0)], 2), "bootstrap"),
            (
                manifest(vec![meta.clone(), entry(1, 0, None, 0), entry(1, 0, None, 0)], 1),
                "twice",
            ),
            (
                manifest(vec![meta.clone(), entry(1, 0, Some(5), 0), entry(2, 5, None, 1)], 2),
                "bootstrap shards",
            ),
        ];
        let huge = manifest(vec![meta.clone(), entry(1, 0, None, 0)], u64::MAX);
        let high_id = manifest(
            vec![meta.clone(), entry(1, 0, Some(5), 0), entry(1 << 63, 5, None, 1)],
            1,
        );
        let cases = cases
            .into_iter()
            .chain([(huge, "outside"), (high_id, "above the limit")]);
        for (m, want) in cases {
            let e = m.check(d).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }

    #[test]
    fn a_manifest_edited_after_writing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest(vec![entry(0, 0, None, 0), entry(1, 0, None, 0)], 1);
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        let p = dir.path().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"applied_index\": 10", "\"applied_index\": 11");
        std::fs::write(&p, text).unwrap();
        let e = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("SHA-256"), "{e}");
        std::fs::remove_file(&p).unwrap();
        let e = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("never finished"), "{e}");
    }
}
