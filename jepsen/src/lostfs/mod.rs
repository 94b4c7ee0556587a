//! `lostfs`: a FUSE pass-through file system that loses what was not made
//! durable, for the power-loss nemesis (issue 16). Jepsen's LazyFS plays
//! this part in Jepsen's own analyses; this one is written for the harness
//! (Rust, in-process, driven by the nemesis directly).
//!
//! It is mounted over a node's data dir and passes everything to a
//! backing directory, except that:
//! - **data** written to a file stays in memory ([`pages::Dirty`]) until
//!   the file is fsync'd or fdatasync'd; readers see it, the backing file
//!   does not have it;
//! - **a new name** (a create, a rename, an unlink) is undone at a power
//!   cut until its directory is fsync'd: a created file disappears, a
//!   renamed file goes back under its old name (and the file it replaced
//!   comes back), an unlinked file comes back. POSIX asks for the
//!   directory fsync; ext4 often makes the name durable with the file's
//!   own fsync, but a store must not count on it. Directories themselves
//!   (mkdir, rmdir) are durable at once: the nodes make their directories
//!   at start, not on the write path.
//!
//! A power cut ([`Mounted::power_loss`]) drops all of that, optionally
//! tearing one dirty page (a prefix of it reaches the disk). The harness
//! kills the node first (a process cannot outlive its machine's power)
//! and restarts it after.
//!
//! Every open is FOPEN_DIRECT_IO and every entry and attribute has a zero
//! TTL, so the kernel caches nothing that a power cut should take away.

mod fs;
pub mod pages;

use pages::{Dirty, Tear};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// The backing directory's hidden stash of names a rename replaced or an
/// unlink removed, kept until their directory is fsync'd.
const STASH_DIR: &str = ".lostfs-stash";

/// An undoable name change, and the directory whose fsync makes it
/// durable.
#[derive(Debug)]
enum Undo {
    /// `path` was created.
    Created { dir: PathBuf, path: PathBuf },
    /// `from` was renamed to `to`; what `to` named before is in the stash.
    Renamed {
        dir: PathBuf,
        from: PathBuf,
        to: PathBuf,
        replaced: Option<PathBuf>,
    },
    /// `path` was unlinked; the file is in the stash.
    Unlinked {
        dir: PathBuf,
        path: PathBuf,
        stash: PathBuf,
    },
}

impl Undo {
    fn dir(&self) -> &Path {
        match self {
            Undo::Created { dir, .. } | Undo::Renamed { dir, .. } | Undo::Unlinked { dir, .. } => dir,
        }
    }
}

/// What a power cut took away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loss {
    /// Files that had unsynced data or length.
    pub files: usize,
    /// Unsynced pages dropped.
    pub pages: usize,
    /// Name changes undone.
    pub names: usize,
    /// The torn page, if one was torn: (file, page index, bytes kept).
    pub torn: Option<(PathBuf, u64, u64)>,
}

/// The state the FUSE session and the nemesis share.
#[derive(Debug)]
pub(crate) struct State {
    /// The backing directory.
    root: PathBuf,
    /// Inode → path relative to `root` ("" for the root).
    inodes: HashMap<u64, PathBuf>,
    /// Path → inode.
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
    /// Open handles: fh → (inode, backing file).
    handles: HashMap<u64, (u64, File)>,
    next_fh: u64,
    /// Unsynced data by inode, with a backing file to apply it to (it
    /// outlives the handles: a closed file's data is still unsynced).
    dirty: BTreeMap<u64, (File, Dirty)>,
    /// Name changes not yet durable, oldest first.
    undo: Vec<Undo>,
    stash_seq: u64,
}

impl State {
    fn new(root: PathBuf) -> State {
        let mut s = State {
            root,
            inodes: HashMap::new(),
            by_path: HashMap::new(),
            next_ino: 2,
            handles: HashMap::new(),
            next_fh: 1,
            dirty: BTreeMap::new(),
            undo: Vec::new(),
            stash_seq: 0,
        };
        s.inodes.insert(fuser::FUSE_ROOT_ID, PathBuf::new());
        s.by_path.insert(PathBuf::new(), fuser::FUSE_ROOT_ID);
        s
    }

    fn backing(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// The inode of `rel`, made if new.
    fn ino_of(&mut self, rel: &Path) -> u64 {
        if let Some(i) = self.by_path.get(rel) {
            return *i;
        }
        let i = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(i, rel.to_path_buf());
        self.by_path.insert(rel.to_path_buf(), i);
        i
    }

    /// Moves the names under `from` (itself included) to `to`.
    fn move_names(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(u64, PathBuf)> = self
            .inodes
            .iter()
            .filter(|(_, p)| p.starts_with(from))
            .map(|(i, p)| (*i, p.clone()))
            .collect();
        for (i, old) in moved {
            let rest = old.strip_prefix(from).map(Path::to_path_buf).unwrap_or_default();
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.by_path.remove(&old);
            self.by_path.insert(new.clone(), i);
            self.inodes.insert(i, new);
        }
    }

    fn forget_name(&mut self, rel: &Path) {
        if let Some(i) = self.by_path.remove(rel) {
            self.inodes.remove(&i);
            self.dirty.remove(&i);
        }
    }

    /// A fresh stash path.
    fn stash_path(&mut self) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(self.root.join(STASH_DIR))?;
        self.stash_seq += 1;
        Ok(PathBuf::from(STASH_DIR).join(self.stash_seq.to_string()))
    }

    /// An fsync of directory `dir`: its name changes become durable.
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        let (done, keep): (Vec<Undo>, Vec<Undo>) =
            std::mem::take(&mut self.undo).into_iter().partition(|u| u.dir() == dir);
        self.undo = keep;
        for u in done {
            let gone = match u {
                Undo::Renamed { replaced: Some(s), .. } | Undo::Unlinked { stash: s, .. } => Some(s),
                _ => None,
            };
            if let Some(s) = gone {
                self.forget_name(&s);
                let _ = std::fs::remove_file(self.backing(&s));
            }
        }
        File::open(self.backing(dir))?.sync_all()
    }

    /// The power cut: see the module docs.
    fn power_loss(&mut self, tear: Option<(u64, u64)>) -> std::io::Result<Loss> {
        let mut loss = Loss::default();
        // The torn page: the `n`-th dirty page over all files, keeping
        // `bytes` of it.
        let mut torn_at = None;
        if let Some((n, bytes)) = tear {
            let all: Vec<(u64, u64)> = self
                .dirty
                .iter()
                .flat_map(|(i, (_, d))| d.dirty_pages().into_iter().map(move |p| (*i, p)))
                .collect();
            let pick = usize::try_from(n).unwrap_or(0).checked_rem(all.len());
            if let Some((ino, page)) = pick.and_then(|i| all.get(i)).copied() {
                torn_at = Some((ino, Tear { page, bytes }));
            }
        }
        for (ino, (file, mut d)) in std::mem::take(&mut self.dirty) {
            loss.files += 1;
            loss.pages += d.dirty_pages().len();
            let tear = torn_at.filter(|(i, _)| *i == ino).map(|(_, t)| t);
            if let Some(t) = tear {
                let path = self.inodes.get(&ino).cloned().unwrap_or_default();
                loss.torn = Some((path, t.page, t.bytes.min(pages::PAGE_BYTES)));
            }
            d.lose(&file, tear)?;
        }
        self.handles.clear();
        while let Some(u) = self.undo.pop() {
            loss.names += 1;
            match u {
                Undo::Created { path, .. } => {
                    let _ = std::fs::remove_file(self.backing(&path));
                    self.forget_name(&path);
                }
                Undo::Renamed { from, to, replaced, .. } => {
                    std::fs::rename(self.backing(&to), self.backing(&from))?;
                    self.move_names(&to, &from);
                    if let Some(s) = replaced {
                        std::fs::rename(self.backing(&s), self.backing(&to))?;
                        self.move_names(&s, &to);
                    }
                }
                Undo::Unlinked { path, stash, .. } => {
                    std::fs::rename(self.backing(&stash), self.backing(&path))?;
                    self.move_names(&stash, &path);
                }
            }
        }
        Ok(loss)
    }
}

/// A mounted lost-write file system.
pub struct Mounted {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl Mounted {
    /// Mounts `backing` at `mountpoint` (both directories; needs root or
    /// fusermount3, and /dev/fuse).
    pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<Mounted> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let state = Arc::new(Mutex::new(State::new(backing.canonicalize()?)));
        let options = [
            fuser::MountOption::FSName("lostfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount2(fs::LostFs(state.clone()), mountpoint, &options)?;
        Ok(Mounted {
            state,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// A power cut: drops every unsynced write and name change; with
    /// `tear` = (n, bytes), the n-th dirty page (modulo their count)
    /// keeps its first `bytes` bytes. The node using it must be dead.
    pub fn power_loss(&self, tear: Option<(u64, u64)>) -> std::io::Result<Loss> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .power_loss(tear)
    }

    /// Unmounts (also done on drop).
    pub fn unmount(mut self) {
        self.session.take();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.session.take();
    }
}
