//! Damage to a replica's state machine (D50), through three real
//! `pigeonhole` processes: flipped or cut SST bytes, damage only the
//! start's own reads find, a MANIFEST that forgot the column families, a
//! state machine gone or older than its Raft log. Each time the node
//! moves the damaged files aside, rebuilds the state machine from its
//! peers in the same process, and loses no acknowledged append.

use super::{append, leader, mailbox, payloads, three_nodes, wait_caught_up, Node};
use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::mailbox_client::MailboxClient;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// SIGTERM: a clean stop, which flushes the state machine to SSTs.
fn stop_cleanly(n: &mut Node) {
    let pid = n.child.as_ref().unwrap().id();
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    n.child.as_mut().unwrap().wait().unwrap();
    n.child = None;
}

/// Flips a bit of the byte at `at(contents)` of the file at `path`.
fn flip(path: &Path, at: impl FnOnce(&[u8]) -> usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = at(&b);
    b[i] ^= 0x10;
    std::fs::write(path, &b).unwrap();
}

/// What the node moved aside as damaged state machines (`damaged-*` in
/// its data dir).
fn moved_aside(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("damaged-"))
        .collect()
}

/// The SST files of the node's state machine that hold `needle`.
fn ssts_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sst"))
        .filter(|p| std::fs::read(p).unwrap().windows(needle.len()).any(|w| w == needle))
        .collect()
}

/// The node's own replica of the mailbox (a STALE read), once it serves
/// all of `want` (within 60 s).
async fn wait_replica_holds(n: &Node, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(mut c) = MailboxClient::connect(n.url()).await {
            let req = pb::SyncRequest {
                mailbox: mailbox(),
                after_seq: 0,
                max_messages: 0,
                max_bytes: 0,
                wait_ms: 0,
                consistency: pb::ReadConsistency::Stale as i32,
            };
            match c.sync(req).await {
                Ok(p) => {
                    let p = p.into_inner();
                    if p.messages.len() >= want.min(100) && u64::try_from(want).is_ok_and(|w| p.last_seq == w) {
                        return;
                    }
                    last = format!("{} messages, last seq {}", p.messages.len(), p.last_seq);
                }
                Err(e) => last = format!("{e:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("node {}'s replica never held {want} messages: {last}", n.id);
}

/// Damage to the state machine's files (an SST), found by a read while
/// running and, the second time, by RocksDB at the open: the node moves
/// them aside, keeps its Raft log, and rebuilds every replica from its
/// peers, in the same process (it restarts itself; D50). It never serves
/// the damaged bytes: the read that finds the damage fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_state_machine_files_are_rebuilt_from_the_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut nodes, l) = three_nodes_with_appends(tmp.path(), &[], "SST", 200).await;
    let x = (l + 1) % 3;
    stop_cleanly(&mut nodes[x]);
    let ssts = ssts_holding(&nodes[x].dir, b"SST-PAYLOAD-0100");
    assert!(!ssts.is_empty(), "a clean stop left no SST with the payloads");
    for p in &ssts {
        flip(p, |b| b.windows(16).position(|w| w == b"SST-PAYLOAD-0100").unwrap() + 3);
    }
    nodes[x].start();
    let pid = nodes[x].child.as_ref().unwrap().id();
    wait_replica_holds(&nodes[x], 200).await;
    let aside = moved_aside(&nodes[x].dir);
    assert_eq!(aside.len(), 1, "the damaged files were not moved aside: {aside:?}");
    assert!(
        nodes[x].child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "it exited"
    );
    assert_eq!(nodes[x].child.as_ref().unwrap().id(), pid);
    wait_caught_up(&nodes[x]).await;

    // Again, with the SST cut short: RocksDB refuses it at the open.
    stop_cleanly(&mut nodes[x]);
    let ssts = ssts_holding(&nodes[x].dir, b"SST-PAYLOAD-0100");
    assert!(
        !ssts.is_empty(),
        "the rebuilt state machine left no SST with the payloads"
    );
    for p in &ssts {
        let len = std::fs::metadata(p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    }
    nodes[x].start();
    // And it holds it all: with the old leader down, X and the third node
    // elect a leader with every acknowledged append.
    rebuilt_and_holds(&mut nodes, x, l, 200).await;
}

/// Damage RocksDB's open does not read (the first data block of every
/// SST, which holds the lowest keys, the metadata shard's meta row among
/// them), found by the start's own reads of the shards' meta rows: the
/// node must rebuild from its peers as for damage found at the open (D50),
/// not exit. A Jepsen `corrupt` run once zeroed such a block and the node
/// never came back ("block checksum mismatch ... offset 0").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_by_the_starts_own_reads_is_rebuilt_from_the_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut nodes, l) = three_nodes_with_appends(tmp.path(), &[], "START", 200).await;
    let x = (l + 1) % 3;
    stop_cleanly(&mut nodes[x]);
    // The state machine's SSTs only (those with payloads): the metadata
    // CF's are read by the open itself, which already handled damage.
    let ssts = ssts_holding(&nodes[x].dir, b"START-PAYLOAD-");
    assert!(!ssts.is_empty(), "a clean stop left no SST with the payloads");
    for p in &ssts {
        flip(p, |_| 10);
    }
    nodes[x].start();
    rebuilt_and_holds(&mut nodes, x, l, 200).await;
    let aside = moved_aside(&nodes[x].dir);
    assert_eq!(aside.len(), 1, "the damaged files were not moved aside: {aside:?}");
}

/// Zeroes the node's current MANIFEST after its first three records (the
/// default column family's: comparator, log number, file numbers), as the
/// Jepsen `corrupt` fault once did: RocksDB reads zeros as the
/// preallocated end of the file, so it opens with those edits only and
/// forgets the rest, the creation of the other column families among them.
fn zero_manifest_after_default_cf(dir: &Path) {
    let db = dir.join("db");
    let current = std::fs::read_to_string(db.join("CURRENT")).unwrap();
    let path = db.join(current.trim());
    let mut b = std::fs::read(&path).unwrap();
    // A record: checksum (4), length (2, little-endian), type (1), body.
    let mut at = 0;
    for _ in 0..3 {
        at += 7 + usize::from(u16::from_le_bytes([b[at + 4], b[at + 5]]));
    }
    assert!(
        b[at..].iter().any(|&x| x != 0),
        "the MANIFEST holds nothing after the default column family"
    );
    for byte in &mut b[at..] {
        *byte = 0;
    }
    std::fs::write(&path, &b).unwrap();
}

/// Three nodes started, `n` appends through the leader (payloads
/// `{tag}-PAYLOAD-{i:04}`); returns them and the leader's index.
async fn three_nodes_with_appends(base: &Path, extra: &[String], tag: &str, n: usize) -> (Vec<Node>, usize) {
    let mut nodes = three_nodes(base, extra);
    for node in &mut nodes {
        node.start();
    }
    let l = leader(&nodes, Duration::from_secs(30)).await;
    for i in 0..n {
        append(
            &nodes[l],
            &format!("{tag}{i}"),
            format!("{tag}-PAYLOAD-{i:04}").as_bytes(),
        )
        .await;
    }
    (nodes, l)
}

/// Node `x` came back holding all `n` appends, caught up; and with the
/// leader `l` down, `x` and the third node elect a leader holding them.
async fn rebuilt_and_holds(nodes: &mut [Node], x: usize, l: usize, n: usize) {
    wait_replica_holds(&nodes[x], n).await;
    wait_caught_up(&nodes[x]).await;
    nodes[l].kill();
    let now = leader(nodes, Duration::from_secs(30)).await;
    assert_eq!(payloads(&nodes[now]).await.len(), n);
}

/// Removes every file of `db/` but the Raft log's directory.
fn remove_state_machine(dir: &Path) {
    for e in std::fs::read_dir(dir.join("db")).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "raft-log" {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
}

/// A MANIFEST whose later edits read as zeros (the column families'
/// creation among them): RocksDB opens the rest without an error, with the
/// state machine's column families gone. The node must see that its
/// state machine vanished under a Raft log that knows its shards, and
/// rebuild it from the peers, in the same process (D50), not stop or
/// serve an empty replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_forgot_the_column_families_is_rebuilt_from_the_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut nodes, l) = three_nodes_with_appends(tmp.path(), &[], "MANIFEST", 200).await;
    let x = (l + 1) % 3;
    nodes[x].kill();
    zero_manifest_after_default_cf(&nodes[x].dir);
    nodes[x].start();
    let pid = nodes[x].child.as_ref().unwrap().id();
    wait_replica_holds(&nodes[x], 200).await;
    assert!(
        nodes[x].child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "it exited"
    );
    assert_eq!(nodes[x].child.as_ref().unwrap().id(), pid);
    rebuilt_and_holds(&mut nodes, x, l, 200).await;
}

/// The state machine's files gone (every file of `db/` but the Raft log's
/// directory): a fresh database opens without complaint under a log that
/// holds every shard's entries. The node must rebuild from its peers, not
/// stop on shards it has no state for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_machine_gone_under_its_raft_log_is_rebuilt_from_the_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut nodes, l) = three_nodes_with_appends(tmp.path(), &[], "GONE", 200).await;
    let x = (l + 1) % 3;
    nodes[x].kill();
    remove_state_machine(&nodes[x].dir);
    nodes[x].start();
    rebuilt_and_holds(&mut nodes, x, l, 200).await;
}

/// A node rebuilt while its peers are down has no replica yet (a leader's
/// first message creates each one), but every replica the Raft log knows is
/// marked catching up, and NodeStatus must say so: an operator, and the
/// Jepsen `corrupt` fault, read it to keep damage on one node at a time
/// (two replicas of a shard catching up leave it with no majority that may
/// vote, D49). It once listed only live replicas: a CI run's nemesis saw an
/// empty list on a node rebuilt 1.3 s earlier, damaged a second node, and
/// three shards had no leader for the rest of the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_node_reports_its_replicas_catching_up_before_any_leader_reaches_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut nodes, l) = three_nodes_with_appends(tmp.path(), &[], "ALONE", 20).await;
    let x = (l + 1) % 3;
    for n in nodes.iter_mut() {
        n.kill();
    }
    remove_state_machine(&nodes[x].dir);
    nodes[x].start();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = nodes[x].status().await {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "node {} never answered NodeStatus",
            nodes[x].id
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.replicas.is_empty(), "no peer is up, yet: {:?}", status.replicas);
    assert!(
        !status.catching_up_shards.is_empty(),
        "a rebuilt node reports no replica catching up"
    );
}

/// A state machine rolled back under its Raft log (older, valid files put
/// back; or a flush the MANIFEST forgot): it opens without complaint, but
/// its apply index is before the log's first entry, whose predecessors
/// were compacted away. The node must rebuild from its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_machine_older_than_its_raft_log_is_rebuilt_from_the_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("pigeonhole.toml");
    std::fs::write(&config, "[raft]\nlog_entries_max = 32\nlog_retain_entries = 0\n").unwrap();
    let extra = ["--config".to_string(), config.display().to_string()];
    let (mut nodes, l) = three_nodes_with_appends(tmp.path(), &extra, "OLD", 20).await;
    let x = (l + 1) % 3;
    stop_cleanly(&mut nodes[x]);
    // The state machine as it was after 20 appends.
    let old = tmp.path().join("old-state");
    std::fs::create_dir_all(&old).unwrap();
    let db = nodes[x].dir.join("db");
    for e in std::fs::read_dir(&db).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "raft-log" {
            std::fs::copy(e.path(), old.join(e.file_name())).unwrap();
        }
    }
    nodes[x].start();
    for i in 0..150 {
        append(&nodes[l], &format!("n{i}"), format!("NEW-{i:03}").as_bytes()).await;
    }
    wait_replica_holds(&nodes[x], 170).await;
    stop_cleanly(&mut nodes[x]);
    remove_state_machine(&nodes[x].dir);
    for e in std::fs::read_dir(&old).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), db.join(e.file_name())).unwrap();
    }
    nodes[x].start();
    rebuilt_and_holds(&mut nodes, x, l, 170).await;
}
