//! The lost-write file system through a real FUSE mount (needs root and
//! /dev/fuse, as the Jepsen harness does): what was fsync'd survives a
//! power cut, what was not is gone, names follow their directory's fsync,
//! and a torn page keeps only its first bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use pigeonhole_jepsen::lostfs::Mounted;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

#[test]
fn a_power_cut_keeps_what_was_made_durable_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    let fs = Mounted::mount(&backing, &mnt).unwrap();

    // A file created, written and fsync'd, in a directory fsync'd: durable.
    let mut a = File::create(mnt.join("a")).unwrap();
    a.write_all(b"durable").unwrap();
    a.sync_data().unwrap();
    sync_dir(&mnt);
    // More data after that fsync: lost.
    a.write_all(b" and lost").unwrap();
    assert_eq!(
        std::fs::read(mnt.join("a")).unwrap(),
        b"durable and lost",
        "readers see unsynced data"
    );
    assert_eq!(
        std::fs::read(backing.join("a")).unwrap(),
        b"durable",
        "the disk does not"
    );
    drop(a);
    // A rename over a durable file, without a directory fsync: undone.
    let mut c = File::create(mnt.join("c.tmp")).unwrap();
    c.write_all(b"new").unwrap();
    c.sync_all().unwrap();
    drop(c);
    std::fs::write(mnt.join("d"), b"").unwrap();
    let mut d = OpenOptions::new().write(true).open(mnt.join("d")).unwrap();
    d.write_all(b"old d").unwrap();
    d.sync_all().unwrap();
    drop(d);
    sync_dir(&mnt);
    std::fs::rename(mnt.join("c.tmp"), mnt.join("d")).unwrap();
    assert_eq!(std::fs::read(mnt.join("d")).unwrap(), b"new");
    // An unlink without a directory fsync: undone.
    std::fs::remove_file(mnt.join("a")).unwrap();
    assert!(!mnt.join("a").exists());
    // A file fsync'd but its directory not: its name is lost.
    let mut b = File::create(mnt.join("b")).unwrap();
    b.write_all(b"no name").unwrap();
    b.sync_all().unwrap();
    drop(b);
    // A subdirectory, durable at once, with a file durable in it.
    std::fs::create_dir(mnt.join("sub")).unwrap();
    let mut e = File::create(mnt.join("sub/e")).unwrap();
    e.write_all(b"in sub").unwrap();
    e.sync_all().unwrap();
    sync_dir(&mnt.join("sub"));

    let loss = fs.power_loss(None).unwrap();
    assert_eq!(
        (loss.names, loss.files),
        (3, 1),
        "the rename, the unlink, b; a's tail: {loss:?}"
    );
    assert_eq!(std::fs::read(mnt.join("a")).unwrap(), b"durable");
    assert!(!mnt.join("b").exists(), "a name whose directory was never fsync'd");
    assert_eq!(
        std::fs::read(mnt.join("c.tmp")).unwrap(),
        b"new",
        "back under its old name"
    );
    assert_eq!(std::fs::read(mnt.join("d")).unwrap(), b"old d", "the rename is undone");
    assert_eq!(std::fs::read(mnt.join("sub/e")).unwrap(), b"in sub");
    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "c.tmp", "d", "sub"], "the stash is hidden");
    fs.unmount();
}

#[test]
fn a_torn_page_keeps_its_first_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (backing, mnt) = (tmp.path().join("backing"), tmp.path().join("mnt"));
    let fs = Mounted::mount(&backing, &mnt).unwrap();
    let mut f = File::create(mnt.join("log")).unwrap();
    f.write_all(&[1u8; 4096]).unwrap();
    f.sync_all().unwrap();
    sync_dir(&mnt);
    f.write_all(&[2u8; 4096]).unwrap();
    drop(f);
    let loss = fs.power_loss(Some((0, 100))).unwrap();
    assert_eq!(loss.torn.as_ref().map(|t| (t.1, t.2)), Some((1, 100)), "{loss:?}");
    let got = std::fs::read(mnt.join("log")).unwrap();
    assert_eq!(got.len(), 4196, "the torn page's first 100 bytes reached the disk");
    assert!(got[..4096].iter().all(|b| *b == 1) && got[4096..].iter().all(|b| *b == 2));
    fs.unmount();
}
