//! Which RocksDB shared library this process runs on, and whether that
//! build kept RocksDB's debug assertions.
//!
//! Why this exists: the engine links RocksDB dynamically (D1), and Debian's
//! `librocksdb7.8` is built without `NDEBUG`, so every `assert()` inside
//! RocksDB runs, among them a full memtable search before each insert.
//! The same source built with `NDEBUG` (`scripts/build-rocksdb-ndebug`)
//! applies appends 17 % faster and serves Sync 25 % faster (D52). Which
//! of the two a node loaded depends on its environment (`LD_LIBRARY_PATH`),
//! not on the binary, so the server reports it at start and as a metric.
//!
//! How: the library's path is read from `/proc/self/maps`; the build is
//! judged by the text of the memtable-insert assertion
//! (`!Contains(key)`, in `HashSkipListRep::Insert` of RocksDB 7.x), which
//! the compiler keeps in the library only when assertions are compiled in.
//! A library of another RocksDB version may lack that text either way, so
//! the answer is "assertions found" or "not found", never a guarantee.

use std::path::{Path, PathBuf};

/// The assertion text looked for (RocksDB 7.x, `memtable/hash_skiplist_rep.cc`).
const ASSERT_MESSAGE: &[u8] = b"!Contains(key)";

/// What the process knows about its RocksDB library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RocksDbLibrary {
    /// The mapped file (`None`: RocksDB is linked statically, or
    /// `/proc/self/maps` could not be read).
    pub path: Option<PathBuf>,
    /// The library holds RocksDB's assertion messages: a build without
    /// `NDEBUG`, such as Debian's package. `false` when the path is unknown.
    pub debug_asserts: bool,
}

/// Looks the library up. Reads `/proc/self/maps` and the library file
/// (about 13 MiB): call it once, at start.
pub fn rocksdb_library() -> RocksDbLibrary {
    let path = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| library_in_maps(&maps));
    let debug_asserts = path
        .as_deref()
        .and_then(|p| std::fs::read(p).ok())
        .is_some_and(|bytes| holds_assert_messages(&bytes));
    RocksDbLibrary { path, debug_asserts }
}

/// The first mapped file whose name starts with `librocksdb.so`.
fn library_in_maps(maps: &str) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(Path::new)
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("librocksdb.so"))
        })
        .map(Path::to_path_buf)
}

/// Whether `bytes` hold the assertion text.
fn holds_assert_messages(bytes: &[u8]) -> bool {
    bytes.windows(ASSERT_MESSAGE.len()).any(|w| w == ASSERT_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_is_found_in_a_maps_listing() {
        let maps = "55d4c0a00000-55d4c0a01000 r--p 00000000 08:01 123 /usr/local/bin/pigeonhole\n\
                    7f00-7f01 r-xp 00000000 08:01 456 /usr/lib/x86_64-linux-gnu/libzstd.so.1.5.4\n\
                    7f02-7f03 r-xp 00000000 08:01 789 /usr/local/lib/pigeonhole/rocksdb-ndebug/librocksdb.so.7.8.3\n\
                    7ffd-7ffe rw-p 00000000 00:00 0 [stack]\n";
        assert_eq!(
            library_in_maps(maps),
            Some(PathBuf::from(
                "/usr/local/lib/pigeonhole/rocksdb-ndebug/librocksdb.so.7.8.3"
            ))
        );
        assert_eq!(
            library_in_maps("7f00-7f01 r-xp 00000000 08:01 456 /lib/libc.so.6\n"),
            None
        );
    }

    #[test]
    fn assertion_text_is_recognised_only_whole() {
        assert!(holds_assert_messages(b"\0\0SkipList\0!Contains(key)\0more"));
        assert!(!holds_assert_messages(b"\0\0SkipList\0!Contains(x)\0more"));
        assert!(!holds_assert_messages(b""));
    }

    #[test]
    fn this_process_finds_its_rocksdb_library() {
        // Any use of RocksDB maps the shared library (D1 links it
        // dynamically).
        let dir = tempfile::tempdir().unwrap();
        let _db = rocksdb::DB::open_default(dir.path()).unwrap();
        let lib = rocksdb_library();
        let path = lib.path.expect("librocksdb mapped");
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(lib.debug_asserts, holds_assert_messages(&bytes), "{}", path.display());
    }
}
