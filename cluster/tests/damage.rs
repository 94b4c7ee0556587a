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

#[path = "damage/state_machine.rs"]
mod state_machine;

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
