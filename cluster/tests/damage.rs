//! Damage to a replica's Raft log, end to end through three real
//! `pigeonhole` processes (D49): the damaged node starts, skips the damage,
//! and keeps the replica out of elections until it has caught up; no
//! acknowledged append is lost, even when the damaged node and a node that
//! never had the appends are the only two up.
//!
//! The case that needs the vote block: appends acknowledged by the leader
//! L and the follower X while the third node B was down; X's copy is then
//! damaged. With L down, B and X are a majority by count, and a replica
//! that voted with X's salvaged (shorter) log could elect a leader
//! without those appends. Red without the block (`catchup::blocked`
//! always false and catching-up replicas ticked): a leader is elected from
//! B and X, and the appends are gone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::admin_client::AdminClient;
use pigeonhole_proto::v1::mailbox_client::MailboxClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Node {
    id: u64,
    port: u16,
    dir: PathBuf,
    initial: String,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pigeonhole"))
            .args(["--node-id", &self.id.to_string()])
            .args(["--initial-cluster", &self.initial])
            .args(["--shards", "1", "--insecure", "--log-level", "info"])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(&self.extra)
            .arg("--data-dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn status(&self) -> Option<pb::NodeStatusResponse> {
        let mut c = AdminClient::connect(self.url()).await.ok()?;
        let req = pb::NodeStatusRequest {
            include_sizes: false,
            size_shards: vec![],
        };
        tokio::time::timeout(Duration::from_secs(2), c.node_status(req))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }

    /// This node's replica of shard 1, if it answers.
    async fn shard1(&self) -> Option<pb::ReplicaStatus> {
        self.status().await?.replicas.into_iter().find(|r| r.shard == 1)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The node leading shard 1 (index into `nodes`), once one does.
async fn leader(nodes: &[Node], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if n.child.is_some() {
                if let Some(r) = n.shard1().await {
                    if r.role == pb::ReplicaRole::Leader as i32 {
                        return i;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader for shard 1 within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn mailbox() -> Option<pb::MailboxId> {
    Some(pb::MailboxId {
        namespace: "chat".into(),
        user_id: b"ann".to_vec(),
    })
}

async fn append(n: &Node, key: &str, payload: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = MailboxClient::connect(n.url()).await {
            let req = pb::AppendRequest {
                mailbox: mailbox(),
                payload: payload.to_vec().into(),
                idempotency_key: key.as_bytes().to_vec(),
                expected_last_seq: None,
            };
            if c.append(req).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "append {key} was never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every payload of the mailbox, in seq order, read from `n` (the leader).
async fn payloads(n: &Node) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out: Vec<Vec<u8>> = Vec::new();
    loop {
        let req = pb::SyncRequest {
            mailbox: mailbox(),
            after_seq: out.len() as u64,
            max_messages: 0,
            max_bytes: 0,
            wait_ms: 0,
            consistency: 0,
        };
        let page = match MailboxClient::connect(n.url()).await {
            Ok(mut c) => c.sync(req).await.ok().map(|p| p.into_inner()),
            Err(_) => None,
        };
        match page {
            Some(page) => {
                out.extend(page.messages.into_iter().map(|m| m.payload.to_vec()));
                if !page.has_more {
                    return out;
                }
            }
            None => {
                assert!(Instant::now() < deadline, "the mailbox could not be read");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Flips one byte of the first occurrence of `needle` in the node's Raft
/// log segments. Returns the file.
fn damage_log(dir: &Path, needle: &[u8]) -> PathBuf {
    let logdir = dir.join("db").join("raft-log");
    for ent in std::fs::read_dir(&logdir).unwrap() {
        let path = ent.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at] ^= 0x20;
            std::fs::write(&path, &bytes).unwrap();
            return path;
        }
    }
    panic!("{} not found in {}", String::from_utf8_lossy(needle), logdir.display());
}

/// Waits until `n` reports no replica catching up (it must have seen one).
async fn wait_caught_up(n: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = n.status().await {
            if s.catching_up_shards.is_empty() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {} never caught up: {:?}",
            n.id,
            n.status().await.map(|s| s.replicas)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Three nodes (not started) under `base`, each with `extra` flags.
fn three_nodes(base: &Path, extra: &[String]) -> Vec<Node> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let initial = (1..=3)
        .map(|i| format!("{i}=127.0.0.1:{}", ports[i - 1]))
        .collect::<Vec<_>>()
        .join(",");
    (1..=3u64)
        .map(|id| Node {
            id,
            port: ports[usize::try_from(id).unwrap() - 1],
            dir: base.join(format!("n{id}")),
            initial: initial.clone(),
            extra: extra.to_vec(),
            child: None,
        })
        .collect()
}

/// The leader's log is compacted past everything the damaged replica
/// lost, so it catches up by snapshot (its Raft log was cut far behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_replica_behind_the_leaders_compacted_log_catches_up_by_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("pigeonhole.toml");
    std::fs::write(&config, "[raft]\nlog_entries_max = 32\nlog_retain_entries = 0\n").unwrap();
    let mut nodes = three_nodes(tmp.path(), &["--config".to_string(), config.display().to_string()]);
    for n in &mut nodes {
        n.start();
    }
    let l = leader(&nodes, Duration::from_secs(30)).await;
    let x = (l + 1) % 3;
    let mut expected = Vec::new();
    for i in 0..10 {
        let p = format!("EARLY-{i:03}").into_bytes();
        append(&nodes[l], &format!("e{i}"), &p).await;
        expected.push(p);
    }
    for i in 0..150 {
        let p = format!("LATER-{i:03}").into_bytes();
        append(&nodes[l], &format!("l{i}"), &p).await;
        expected.push(p);
    }
    nodes[x].kill();
    // A recent record (the log keeps at most 32 entries): X's log is cut
    // before it, which may be behind the leader's first index.
    damage_log(&nodes[x].dir, b"LATER-140");
    nodes[x].start();
    wait_caught_up(&nodes[x]).await;
    // X holds it all: with the old leader down, X and the third node
    // elect a leader that has every acknowledged append.
    nodes[l].kill();
    let now = leader(&nodes, Duration::from_secs(30)).await;
    assert_eq!(payloads(&nodes[now]).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_replica_does_not_vote_until_caught_up_and_no_ack_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    // DAMAGE_KEEP=1 keeps the nodes' dirs and logs (in /tmp) for a look.
    let base: PathBuf = if std::env::var_os("DAMAGE_KEEP").is_some() {
        tempfile::TempDir::new_in("/tmp").unwrap().keep()
    } else {
        tmp.path().to_path_buf()
    };
    let mut nodes = three_nodes(&base, &[]);
    for n in &mut nodes {
        n.start();
    }
    let l = leader(&nodes, Duration::from_secs(30)).await;
    append(&nodes[l], "before", b"before-damage").await;
    let x = (l + 1) % 3;

    // First, X's copy damaged while the leader stays up: the leader still
    // believes X holds what it acknowledged, so it must notice the shorter
    // log and replicate from its end (`reset_lost_follower`), and X must
    // not stop on a heartbeat's commit index past its log
    // (`clamp_heartbeat`; found by the Jepsen corrupt fault: raft-rs
    // panicked "to_commit 108 is out of range [last_index 22]").
    for i in 0..20 {
        append(&nodes[l], &format!("p{i}"), format!("PHASE-ONE-{i:03}").as_bytes()).await;
    }
    nodes[x].kill();
    damage_log(&nodes[x].dir, b"PHASE-ONE-000");
    nodes[x].start();
    wait_caught_up(&nodes[x]).await;
    let l = leader(&nodes, Duration::from_secs(30)).await;
    let x = (l + 1) % 3;
    let b = (l + 2) % 3;

    // B down: L and X alone acknowledge these.
    nodes[b].kill();
    for i in 0..40 {
        append(
            &nodes[l],
            &format!("k{i}"),
            format!("ACKED-BY-L-AND-X-{i:03}").as_bytes(),
        )
        .await;
    }
    let expected: Vec<Vec<u8>> = std::iter::once(b"before-damage".to_vec())
        .chain((0..20).map(|i| format!("PHASE-ONE-{i:03}").into_bytes()))
        .chain((0..40).map(|i| format!("ACKED-BY-L-AND-X-{i:03}").into_bytes()))
        .collect();

    // X's copy of the first of them is damaged while it is down; then L
    // goes down too, and B and X come up: a majority by count, but X must
    // not vote with what it lost.
    nodes[x].kill();
    let damaged = damage_log(&nodes[x].dir, b"ACKED-BY-L-AND-X-000");
    nodes[l].kill();
    nodes[b].start();
    nodes[x].start();
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut seen_catching_up = false;
    while Instant::now() < deadline {
        for i in [b, x] {
            if let Some(r) = nodes[i].shard1().await {
                assert_ne!(
                    r.role,
                    pb::ReplicaRole::Leader as i32,
                    "node {} leads shard 1 with only B and the damaged X up: X voted with a log that lost \
                     acknowledged appends",
                    nodes[i].id
                );
            }
        }
        if let Some(s) = nodes[x].status().await {
            if s.catching_up_shards.contains(&1) {
                seen_catching_up = true;
                let r = s.replicas.iter().find(|r| r.shard == 1).unwrap();
                assert!(r.catching_up.contains("Raft log damage"), "{r:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The operator's way out (`phctl node repair --accept-loss`), shown
    // on the metadata group, whose log lost nothing here: refused without
    // accept_loss, then X votes for it again at once and it gets a leader
    // from B and X alone.
    let mut admin = AdminClient::connect(nodes[x].url()).await.unwrap();
    let refused = admin
        .accept_replica_loss(pb::AcceptReplicaLossRequest {
            shard: 0,
            accept_loss: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let was = admin
        .accept_replica_loss(pb::AcceptReplicaLossRequest {
            shard: 0,
            accept_loss: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(was.reason.contains("Raft log damage"), "{was:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    'meta: loop {
        for i in [b, x] {
            let st = nodes[i].status().await;
            if st
                .iter()
                .flat_map(|s| &s.replicas)
                .any(|r| r.shard == 0 && r.role == pb::ReplicaRole::Leader as i32)
            {
                break 'meta;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the metadata group got no leader after its mark was cleared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = nodes[x].status().await.unwrap();
    assert!(
        !st.catching_up_shards.contains(&0) && st.catching_up_shards.contains(&1),
        "{st:?}"
    );
    assert!(
        seen_catching_up,
        "node {} never reported shard 1 catching up after {} was damaged",
        nodes[x].id,
        damaged.display()
    );

    // L back: a leader is elected, X catches up and votes again.
    nodes[l].start();
    let now_leader = leader(&nodes, Duration::from_secs(30)).await;
    assert_eq!(payloads(&nodes[now_leader]).await, expected);
    wait_caught_up(&nodes[x]).await;

    // Now X votes, and holds what it lost: with L down again, B and X
    // elect a leader that has every acknowledged append.
    nodes[l].kill();
    let now_leader = leader(&nodes, Duration::from_secs(30)).await;
    assert_eq!(payloads(&nodes[now_leader]).await, expected);
    // Nothing exited on its own.
    for n in &mut nodes {
        if let Some(c) = n.child.as_mut() {
            assert!(c.try_wait().unwrap().is_none(), "node {} exited", n.id);
        }
    }
}

/// SIGTERM: a clean stop, which flushes the state machine to SSTs.
fn stop_cleanly(n: &mut Node) {
    let pid = n.child.as_ref().unwrap().id();
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    n.child.as_mut().unwrap().wait().unwrap();
    n.child = None;
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
        let mut b = std::fs::read(p).unwrap();
        let at = b.windows(16).position(|w| w == b"SST-PAYLOAD-0100").unwrap();
        b[at + 3] ^= 0x10;
        std::fs::write(p, &b).unwrap();
    }
    nodes[x].start();
    let pid = nodes[x].child.as_ref().unwrap().id();
    wait_replica_holds(&nodes[x], 200).await;
    let aside: Vec<_> = std::fs::read_dir(&nodes[x].dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("damaged-"))
        .collect();
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
        let mut b = std::fs::read(p).unwrap();
        b[10] ^= 0x10;
        std::fs::write(p, &b).unwrap();
    }
    nodes[x].start();
    rebuilt_and_holds(&mut nodes, x, l, 200).await;
    let aside = std::fs::read_dir(&nodes[x].dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("damaged-")
        })
        .count();
    assert_eq!(aside, 1, "the damaged files were not moved aside");
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
