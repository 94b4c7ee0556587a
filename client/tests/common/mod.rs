//! The end-to-end harness: real `pigeonhole` processes on loopback (a
//! [`Cluster`]), `phctl` through assert_cmd, and the readers the tests
//! check acknowledged appends with. Shared by `e2e.rs` and `e2e_nodes.rs`;
//! each test binary uses part of it.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use assert_cmd::Command as Cmd;
use pigeonhole_client::{mailbox, pb, Client};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const NODES: u64 = 3;
pub const SHARDS: u64 = 4;
pub const USERS: usize = 8;
pub const WRITERS: usize = 4;
pub const APPENDS_PER_WRITER: usize = 120;
/// The kill happens once this many appends were acknowledged.
pub const KILL_AFTER_ACKS: u64 = 100;

pub fn server_bin() -> PathBuf {
    let phctl = PathBuf::from(env!("CARGO_BIN_EXE_phctl"));
    let bin = phctl.with_file_name("pigeonhole");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p pigeonhole-cluster` (scripts/test does)",
        bin.display()
    );
    bin
}

pub struct Node {
    pub id: u64,
    pub port: u16,
    pub child: Option<Child>,
    /// Started with `--join` (its data dir is named by port: the id comes
    /// from the cluster).
    pub joined: bool,
    /// `--zone` (empty: none).
    pub zone: String,
}

impl Drop for Node {
    /// A failing test must not leave servers running.
    fn drop(&mut self) {
        self.kill();
    }
}

impl Node {
    /// SIGTERM, then waits for the exit: the node stops as an operator's
    /// `systemctl stop` would stop it. Returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("node is running");
        let term = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success(), "kill -TERM failed");
        c.wait().unwrap()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub initial: String,
}

/// Starts `node`'s server process: from the initial cluster's flags, or
/// (a node that joins) with `--join seeds` and a data dir named by port.
/// A node that has joined (it has an id) restarts with neither: its data
/// dir's `joined-cluster` says everything.
fn spawn_node(dir: &std::path::Path, node: &Node, initial: &str, seeds: &str) -> Child {
    let mut cmd = Command::new(server_bin());
    cmd.args(["--listen", &format!("127.0.0.1:{}", node.port)]);
    if !node.zone.is_empty() {
        cmd.args(["--zone", &node.zone]);
    }
    let data = if node.joined {
        if node.id == 0 {
            cmd.args(["--join", seeds]);
        }
        dir.join(format!("p{}", node.port))
    } else {
        cmd.args(["--node-id", &node.id.to_string()])
            .args(["--initial-cluster", initial])
            .args(["--shards", &SHARDS.to_string()]);
        dir.join(format!("n{}", node.id))
    };
    cmd.arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[path = "../../../cluster/tests/server_common/ports.rs"]
mod ports;
pub use ports::free_port;

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_n(NODES)
    }

    /// `n` nodes (the servers replicate each shard 3 times).
    pub fn start_n(n: u64) -> Cluster {
        Cluster::start_zoned(&vec![""; usize::try_from(n).unwrap()])
    }

    /// One node per entry of `zones`, started with `--zone` (none for "").
    pub fn start_zoned(zones: &[&str]) -> Cluster {
        let n = zones.len();
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            nodes: Vec::new(),
            initial,
        };
        for (i, port) in ports.into_iter().enumerate() {
            let id = u64::try_from(i).unwrap() + 1;
            c.nodes.push(Node {
                id,
                port,
                child: None,
                joined: false,
                zone: zones[i].to_string(),
            });
            c.spawn(id);
        }
        c
    }

    pub fn spawn(&mut self, id: u64) {
        let seeds = self.initial_addresses();
        let node = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        node.child = Some(spawn_node(self.dir.path(), node, &self.initial, &seeds));
    }

    /// The initial nodes' addresses, `host:port,...` (what `--join` asks).
    fn initial_addresses(&self) -> String {
        self.initial
            .split(',')
            .filter_map(|m| m.split_once('=').map(|(_, a)| a))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts a new node with `--join` (asking the initial nodes), waits
    /// until the cluster has given it an id (its data dir's
    /// `joined-cluster` file), and returns that id.
    pub fn join_new(&mut self, zone: &str) -> u64 {
        let mut node = Node {
            id: 0,
            port: free_port(),
            child: None,
            joined: true,
            zone: zone.to_string(),
        };
        node.child = Some(spawn_node(
            self.dir.path(),
            &node,
            &self.initial,
            &self.initial_addresses(),
        ));
        let file = self.dir.path().join(format!("p{}", node.port)).join("joined-cluster");
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&file) {
                break t;
            }
            assert!(Instant::now() < deadline, "node on port {} never joined", node.port);
            std::thread::sleep(Duration::from_millis(50));
        };
        node.id = text
            .lines()
            .find_map(|l| l.strip_prefix("node_id="))
            .unwrap()
            .parse()
            .unwrap();
        let id = node.id;
        self.nodes.push(node);
        id
    }

    pub fn kill(&mut self, id: u64) {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap().kill();
    }

    pub fn stop(&mut self, id: u64) -> std::process::ExitStatus {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap().stop()
    }

    pub fn endpoints(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn addr(&self, id: u64) -> String {
        let n = self.nodes.iter().find(|n| n.id == id).unwrap();
        format!("127.0.0.1:{}", n.port)
    }

    pub fn phctl(&self) -> Cmd {
        let mut c = Cmd::cargo_bin("phctl").unwrap();
        c.env("PIGEONHOLE_ENDPOINTS", self.endpoints())
            .timeout(Duration::from_secs(60));
        c
    }

    /// Waits until `phctl cluster status` exits 0: every node up, every
    /// shard led.
    /// Pauses the servers' placement loop (cluster-wide, in the metadata
    /// group), for tests that place replicas by hand: a move the test makes
    /// must not be evened out again under it.
    pub fn pause_placement(&self) {
        let out = self
            .phctl()
            .args(["cluster", "placement", "--pause", "-o", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }

    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let out = self.phctl().args(["cluster", "status", "-o", "json"]).output().unwrap();
            if out.status.code() == Some(0) {
                let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(doc["healthy"], true, "exit 0 means healthy: {doc}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not healthy: exit {:?}, {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

pub fn users() -> Vec<pb::MailboxId> {
    (0..USERS)
        .map(|u| mailbox("chat", format!("user-{u}").as_bytes()))
        .collect()
}

/// How many appends writer `w`'s schedule sends to user `u`.
pub fn expected_count(u: usize) -> u64 {
    let per_writer = (0..APPENDS_PER_WRITER).filter(|i| i % USERS == u).count();
    u64::try_from(per_writer * WRITERS).unwrap()
}

/// The whole log of `mb` as `node` has it (linearizable: ReadIndex on that
/// node, so a lagging replica catches up first).
pub async fn read_all(addr: &str, mb: &pb::MailboxId) -> Result<Vec<pb::Message>, tonic::Status> {
    let mut c = pb::mailbox_client::MailboxClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut out: Vec<pb::Message> = Vec::new();
    loop {
        let page = c
            .sync(pb::SyncRequest {
                mailbox: Some(mb.clone()),
                after_seq: out.last().map_or(0, |m| m.seq),
                max_messages: 1_000,
                max_bytes: 0,
                wait_ms: 0,
                consistency: pb::ReadConsistency::Linearizable as i32,
            })
            .await?
            .into_inner();
        let more = page.has_more;
        out.extend(page.messages);
        if !more {
            return Ok(out);
        }
    }
}

pub async fn leader_of(client: &Client, shard: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for node in client.routing().nodes.keys().copied() {
            if let Ok(s) = client.node_status(node, false).await {
                if s.replicas
                    .iter()
                    .any(|r| r.shard == shard && r.role == pb::ReplicaRole::Leader as i32)
                {
                    return node;
                }
            }
        }
        assert!(Instant::now() < deadline, "shard {shard} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Appends the writers got acknowledged: (user index, key = payload, seq).
pub type Acked = Vec<(usize, Vec<u8>, u64)>;

/// Starts [`WRITERS`] tasks through the SDK, each appending
/// [`APPENDS_PER_WRITER`] messages round-robin over `users` (idempotency
/// key = payload = `{tag}{writer}-{i}`), pausing `pause` after each. Each
/// task returns what was acknowledged, or its first failed request.
pub fn spawn_writers(
    client: &Client,
    users: &[pb::MailboxId],
    tag: &str,
    pause: Duration,
) -> tokio::task::JoinSet<Result<Acked, String>> {
    let never = Arc::new(AtomicBool::new(false));
    spawn_writers_until(client, users, tag, pause, APPENDS_PER_WRITER, &never)
}

/// [`spawn_writers`] with `max` appends per writer, or fewer if `stop` is
/// set first.
pub fn spawn_writers_until(
    client: &Client,
    users: &[pb::MailboxId],
    tag: &str,
    pause: Duration,
    max: usize,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinSet<Result<Acked, String>> {
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let client = client.clone();
        let users = users.to_vec();
        let tag = tag.to_string();
        let stop = stop.clone();
        writers.spawn(async move {
            let mut done = Acked::new();
            for i in 0..max {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let u = i % users.len();
                let key = format!("{tag}{w}-{i}").into_bytes();
                let r = client.append(&users[u], key.clone(), key.clone()).await;
                let r = r.map_err(|e| format!("{}: {e}", String::from_utf8_lossy(&key)))?;
                done.push((u, key, r.seq));
                tokio::time::sleep(pause).await;
            }
            Ok(done)
        });
    }
    writers
}

/// Waits for the writers; a failed request fails the test, naming `during`.
pub async fn join_writers(mut writers: tokio::task::JoinSet<Result<Acked, String>>, during: &str) -> Acked {
    let mut acked = Acked::new();
    while let Some(r) = writers.join_next().await {
        acked.extend(
            r.unwrap()
                .unwrap_or_else(|e| panic!("an SDK request failed during {during}: {e}")),
        );
    }
    acked
}

/// `got` (user `u`'s whole log) holds exactly `u`'s acknowledged appends:
/// seqs 1..=n with no gap, each at the seq it was acknowledged with, with
/// the payload acknowledged for it.
pub fn assert_log_matches(u: usize, got: &[pb::Message], acked: &Acked) {
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=got.len() as u64).collect::<Vec<_>>(),
        "user {u}: gaps or disorder"
    );
    let mine: Vec<&(usize, Vec<u8>, u64)> = acked.iter().filter(|a| a.0 == u).collect();
    assert_eq!(got.len(), mine.len(), "user {u}: stored and acknowledged counts differ");
    for (_, key, seq) in mine {
        let m = &got[usize::try_from(*seq).unwrap() - 1];
        assert_eq!(
            (m.idempotency_key.as_slice(), m.payload.as_ref()),
            (key.as_slice(), key.as_slice()),
            "user {u} seq {seq}"
        );
    }
}

/// `phctl cluster balance --apply`, two moves at once, JSON out, 10 s per
/// request and 60 s in all.
/// `phctl cluster balance --wait`: follows the servers' placement loop
/// until it reports balance.
pub const BALANCE_WAIT: &[&str] = &["cluster", "balance", "--wait", "-o", "json"];

pub const BALANCE_APPLY: &[&str] = &[
    "cluster",
    "balance",
    "--apply",
    "--concurrency",
    "2",
    "-o",
    "json",
    "--timeout-ms",
    "10000",
    "--wait-ms",
    "60000",
];

/// A phctl run's exit code and output, for assertion messages.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs phctl off the async workers (it takes seconds, and the SDK
/// writers need those threads), expects success, and returns its JSON.
pub async fn phctl_json_off_thread(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let endpoints = cluster.endpoints();
    let args: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_phctl"))
            .env("PIGEONHOLE_ENDPOINTS", endpoints)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A long phctl operation (a drain, a forced removal): JSON output, 10 s
/// per request and 60 s in all, run off the async workers.
pub async fn phctl_long_op(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json", "--timeout-ms", "10000", "--wait-ms", "60000"]);
    phctl_json_off_thread(cluster, &all).await
}

/// An SDK client of `cluster` whose requests (retries included) may take
/// 30 s, long enough to ride out the failovers and moves the tests cause.
pub async fn sdk(cluster: &Cluster) -> Client {
    let mut cfg = pigeonhole_client::ClientConfig::new(cluster.endpoints().split(',').map(String::from));
    cfg.request_timeout = Duration::from_secs(30);
    Client::connect(cfg).await.unwrap()
}

/// Every user's log, read from the first of `nodes` that holds its shard
/// (the others answer NOT_REPLICA; after moves that may be any node),
/// holds exactly its acknowledged appends.
pub async fn assert_logs_on_some_node(cluster: &Cluster, nodes: &[u64], users: &[pb::MailboxId], acked: &Acked) {
    for (u, user) in users.iter().enumerate() {
        let mut got = None;
        for n in nodes {
            if let Ok(log) = read_all(&cluster.addr(*n), user).await {
                got = Some(log);
                break;
            }
        }
        assert_log_matches(u, &got.expect("some node holds the shard"), acked);
    }
}

/// One step of a rolling restart: `node` drained of its leaderships, stopped
/// with SIGTERM, started again, the cluster healthy, the node undrained.
pub async fn roll(cluster: &mut Cluster, node: u64) {
    let id = node.to_string();
    let doc = phctl_long_op(cluster, &["node", "drain", &id, "--leaders-only"]).await;
    assert_eq!(doc["node"], node, "{doc}");
    let status = tokio::task::block_in_place(|| cluster.stop(node));
    assert!(status.success(), "node {node} did not stop cleanly: {status}");
    cluster.spawn(node);
    tokio::task::block_in_place(|| cluster.wait_healthy(Duration::from_secs(30)));
    phctl_json_off_thread(cluster, &["node", "undrain", &id, "-o", "json"]).await;
}

/// `phctl cluster balance --wait` (BALANCE_WAIT's, 600 s at most), off the
/// async workers; expects success and returns its JSON. When the wait gives
/// up, prints where the cluster stood first (balance, nodes, every shard).
pub async fn balance_wait(cluster: &Cluster) -> serde_json::Value {
    let endpoints = cluster.endpoints();
    let out = tokio::task::spawn_blocking(move || {
        let phctl = |args: &[&str]| {
            std::process::Command::new(env!("CARGO_BIN_EXE_phctl"))
                .env("PIGEONHOLE_ENDPOINTS", &endpoints)
                .args(args)
                .output()
                .unwrap()
        };
        let out = phctl(BALANCE_WAIT);
        if !out.status.success() {
            eprintln!("{}", text(&phctl(&["cluster", "balance"])));
            eprintln!("{}", text(&phctl(&["node", "list"])));
            eprintln!("{}", text(&phctl(&["shard", "list"])));
            let list = phctl(&["shard", "list", "-o", "json"]);
            let ids: Vec<u64> = serde_json::from_slice::<serde_json::Value>(&list.stdout)
                .ok()
                .and_then(|d| {
                    d["shards"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|s| s["id"].as_u64()).collect())
                })
                .unwrap_or_default();
            for id in ids {
                eprintln!("{}", text(&phctl(&["shard", "show", &id.to_string()])));
            }
        }
        out
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Server processes killed when dropped (a failing test leaves none).
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` nodes on loopback serving TLS (and so access control) with the
/// node certificate `node`, data under `dir`; their `host:port`s.
pub fn start_tls_cluster(dir: &std::path::Path, node: &pigeonhole_tls::TlsFiles, n: usize) -> (Procs, Vec<String>) {
    let endpoints: Vec<String> = (0..n).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let initial = endpoints
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Procs(Vec::new());
    for (i, addr) in endpoints.iter().enumerate() {
        procs.0.push(
            Command::new(server_bin())
                .args(["--node-id", &(i + 1).to_string(), "--initial-cluster", &initial])
                .args(["--listen", addr, "--shards", "4"])
                .arg("--data-dir")
                .arg(dir.join(format!("n{}", i + 1)))
                .arg("--tls-ca")
                .arg(&node.ca)
                .arg("--tls-cert")
                .arg(node.cert.as_ref().unwrap())
                .arg("--tls-key")
                .arg(node.key.as_ref().unwrap())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
    }
    (procs, endpoints)
}

/// An SDK client of `endpoints`, once one of them answers (at most `within`).
pub async fn connect_when_up(endpoints: &[String], within: Duration) -> Client {
    let deadline = Instant::now() + within;
    loop {
        match Client::connect(pigeonhole_client::ClientConfig::new(endpoints.iter().cloned())).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "no node came up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
