//! The FUSE side of `lostfs`: each request mapped onto the backing
//! directory and the shared [`State`] (inodes by path, open handles,
//! unsynced data, undoable names). One session thread serves every
//! request, under the state's lock.

use super::{State, Undo};
use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

/// Nothing is cached by the kernel: a power cut must not leave stale names
/// or sizes behind.
const TTL: Duration = Duration::ZERO;

pub(super) struct LostFs(pub(super) Arc<Mutex<State>>);

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl LostFs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn path(&self, ino: u64) -> Result<PathBuf, i32> {
        self.inodes.get(&ino).cloned().ok_or(libc::ENOENT)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, i32> {
        Ok(self.path(parent)?.join(name))
    }

    /// Attributes as readers see them: the backing file's, with the
    /// unsynced length.
    fn attr(&self, ino: u64) -> Result<FileAttr, i32> {
        let rel = self.path(ino)?;
        let md = std::fs::symlink_metadata(self.backing(&rel)).map_err(|e| errno(&e))?;
        let size = match self.dirty.get(&ino) {
            Some((f, d)) => d.len(f).map_err(|e| errno(&e))?,
            None => md.len(),
        };
        let kind = if md.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        };
        let time = |s: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0));
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time(md.atime()),
            mtime: time(md.mtime()),
            ctime: time(md.ctime()),
            crtime: time(md.ctime()),
            kind,
            perm: u16::try_from(md.permissions().mode() & 0o7777).unwrap_or(0o600),
            nlink: u32::try_from(md.nlink()).unwrap_or(1),
            uid: md.uid(),
            gid: md.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The backing file of `ino` for its unsynced data.
    fn dirty_of(&mut self, ino: u64) -> Result<&mut (File, super::Dirty), i32> {
        if !self.dirty.contains_key(&ino) {
            let rel = self.path(ino)?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.backing(&rel))
                .map_err(|e| errno(&e))?;
            self.dirty.insert(ino, (f, super::Dirty::default()));
        }
        self.dirty.get_mut(&ino).ok_or(libc::EIO)
    }

    fn open_handle(&mut self, ino: u64, flags: i32) -> Result<u64, i32> {
        let rel = self.path(ino)?;
        let acc = flags & libc::O_ACCMODE;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(acc != libc::O_RDONLY)
            .open(self.backing(&rel))
            .map_err(|e| errno(&e))?;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, (ino, f));
        if flags & libc::O_TRUNC != 0 {
            let (f, d) = self.dirty_of(ino)?;
            d.set_len(f, 0).map_err(|e| errno(&e))?;
        }
        Ok(fh)
    }
}

impl Filesystem for LostFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state();
        let r = s.child(parent, name).and_then(|rel| {
            std::fs::symlink_metadata(s.backing(&rel)).map_err(|e| errno(&e))?;
            let ino = s.ino_of(&rel);
            s.attr(ino)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.state().attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        let r = (|| {
            let rel = s.path(ino)?;
            if let Some(m) = mode {
                std::fs::set_permissions(s.backing(&rel), std::fs::Permissions::from_mode(m)).map_err(|e| errno(&e))?;
            }
            if let Some(len) = size {
                let (f, d) = s.dirty_of(ino)?;
                d.set_len(f, len).map_err(|e| errno(&e))?;
            }
            s.attr(ino)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let mut s = self.state();
        let r = s.child(parent, name).and_then(|rel| {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(s.backing(&rel))
                .map_err(|e| errno(&e))?;
            let ino = s.ino_of(&rel);
            s.attr(ino)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        let r = (|| {
            let dir = s.path(parent)?;
            let rel = dir.join(name);
            let stash = s.stash_path().map_err(|e| errno(&e))?;
            std::fs::rename(s.backing(&rel), s.backing(&stash)).map_err(|e| errno(&e))?;
            s.move_names(&rel, &stash);
            s.undo.push(Undo::Unlinked { dir, path: rel, stash });
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        let r = s.child(parent, name).and_then(|rel| {
            std::fs::remove_dir(s.backing(&rel)).map_err(|e| errno(&e))?;
            s.forget_name(&rel);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let r = (|| {
            if flags != 0 {
                return Err(libc::EINVAL); // RENAME_NOREPLACE, RENAME_EXCHANGE: not needed by the nodes
            }
            let from = s.child(parent, name)?;
            let dir = s.path(newparent)?;
            let to = dir.join(newname);
            if std::fs::symlink_metadata(s.backing(&from))
                .map_err(|e| errno(&e))?
                .is_dir()
            {
                // Directories are durable at once (module docs).
                std::fs::rename(s.backing(&from), s.backing(&to)).map_err(|e| errno(&e))?;
                s.move_names(&from, &to);
                return Ok(());
            }
            let replaced = if s.backing(&to).exists() {
                let stash = s.stash_path().map_err(|e| errno(&e))?;
                std::fs::rename(s.backing(&to), s.backing(&stash)).map_err(|e| errno(&e))?;
                s.move_names(&to, &stash);
                Some(stash)
            } else {
                None
            };
            std::fs::rename(s.backing(&from), s.backing(&to)).map_err(|e| errno(&e))?;
            s.move_names(&from, &to);
            s.undo.push(Undo::Renamed {
                dir,
                from,
                to,
                replaced,
            });
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        match self.state().open_handle(ino, flags) {
            Ok(fh) => reply.opened(fh, fuser::consts::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        let r = (|| {
            let dir = s.path(parent)?;
            let rel = dir.join(name);
            let existed = s.backing(&rel).exists();
            if existed && flags & libc::O_EXCL != 0 {
                return Err(libc::EEXIST);
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(mode)
                .open(s.backing(&rel))
                .map_err(|e| errno(&e))?;
            if !existed {
                s.undo.push(Undo::Created { dir, path: rel.clone() });
            }
            let ino = s.ino_of(&rel);
            let fh = s.open_handle(ino, flags)?;
            Ok((s.attr(ino)?, fh))
        })();
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, 0, fh, fuser::consts::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let s = self.state();
        let offset = u64::try_from(offset).unwrap_or(0);
        let r = match (s.dirty.get(&ino), s.handles.get(&fh)) {
            (Some((f, d)), _) => d.read(f, offset, u64::from(size)),
            (None, Some((_, f))) => super::Dirty::default().read(f, offset, u64::from(size)),
            (None, None) => Err(io::Error::from_raw_os_error(libc::EBADF)),
        };
        match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state();
        let offset = u64::try_from(offset).unwrap_or(0);
        let r = s
            .dirty_of(ino)
            .and_then(|(f, d)| d.write(f, offset, data).map_err(|e| errno(&e)));
        match r {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().handles.remove(&fh);
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.state();
        let r = match s.dirty.remove(&ino) {
            Some((f, mut d)) => d.sync(&f),
            None => Ok(()),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0);
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let mut s = self.state();
        let r = (|| {
            let dir = s.path(ino)?;
            let mut names: Vec<(std::ffi::OsString, FileType)> =
                vec![(".".into(), FileType::Directory), ("..".into(), FileType::Directory)];
            for e in std::fs::read_dir(s.backing(&dir)).map_err(|e| errno(&e))? {
                let e = e.map_err(|e| errno(&e))?;
                if dir.as_os_str().is_empty() && e.file_name() == super::STASH_DIR {
                    continue;
                }
                let kind = if e.file_type().map_err(|e| errno(&e))?.is_dir() {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                names.push((e.file_name(), kind));
            }
            let start = usize::try_from(offset).unwrap_or(0);
            for (i, (name, kind)) in names.into_iter().enumerate().skip(start) {
                let child = s.ino_of(&dir.join(&name));
                let next = i64::try_from(i + 1).unwrap_or(i64::MAX);
                if reply.add(child, next, kind, &name) {
                    break;
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.state();
        let r = s.path(ino).and_then(|dir| s.sync_dir(&dir).map_err(|e| errno(&e)));
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(1 << 30, 1 << 29, 1 << 29, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _offset: i64,
        _length: i64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Preallocation is a hint to RocksDB; refusing it changes nothing.
        reply.error(libc::EOPNOTSUPP);
    }
}
