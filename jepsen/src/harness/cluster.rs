//! The server processes: the node in slot i runs in namespace `phj-ni` at
//! 10.77.0.i:7070, under libfaketime (wall clock only, read from a file the
//! nemesis rewrites), with its data and log in the scenario's directory.
//!
//! A slot is a network position, not a node id. The initial nodes have
//! id = slot. The `membership` fault adds nodes with `--join` into free
//! slots (the cluster gives them ids: one more than any id it ever had)
//! and takes nodes out for good, freeing their slots; a slot used again
//! holds a new node with a new id and a fresh data directory. Every fault
//! and every read of the harness goes by slot; [`Cluster::id_of`] gives
//! the node id where an admin request needs one.
//!
//! Processes are started through `ip netns exec`, which execs the server in
//! place, so the child's pid is the server's: SIGKILL, SIGSTOP and SIGCONT
//! go straight to it. Pids are also written to `pids` in the run directory
//! so that the outer harness can kill strays after an interrupted run.
//!
//! A cluster started for a power-loss scenario puts each node's data dir
//! on its own lost-write file system ([`crate::lostfs`]), mounted by this
//! process over `n<slot>` with the bytes in `n<slot>.disk`;
//! [`Cluster::power_loss`] kills the node and drops what it had not made
//! durable.

use super::net;
use pigeonhole_proto::v1 as pb;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Data shards of a test cluster: few, so that a few mailboxes per shard
/// contend.
pub const SHARDS: u64 = 4;
/// The port every node listens on (in its own namespace).
pub const PORT: u16 = 7070;
/// The most slots any scenario uses (the membership scenarios' five).
pub const SLOTS_MAX: u64 = 5;

/// libfaketime's multi-threaded build, from Debian's `faketime` package.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// One slot's process state.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    paused: bool,
}

/// The node that lives in a slot.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its node id; 0 until a joining node has been given one.
    pub id: u64,
    /// Started with `--join` (else it is one of the initial cluster).
    pub joined: bool,
    /// Its data directory.
    pub data: PathBuf,
    /// Being taken out (a drain or forced removal was cut short): the
    /// membership fault finishes that before any other change.
    pub leaving: bool,
}

/// The run's TLS material: the nodes' certificate (one for every slot's
/// address) and the clients'. `None` in the global: plaintext, with
/// `--insecure` (the nodes listen on the namespaces' addresses, not
/// loopback).
#[derive(Debug, Clone)]
pub struct Tls {
    /// What every node is started with.
    pub node: pigeonhole_tls::TlsFiles,
    /// What the harness's clients and phctl present.
    pub client: pigeonhole_tls::TlsFiles,
}

static TLS: std::sync::OnceLock<Option<Tls>> = std::sync::OnceLock::new();

/// Sets the run's TLS (once, before any cluster starts): makes a CA and
/// certificates in `dir` when `on`.
pub fn set_tls(on: bool, dir: &Path) -> Result<(), String> {
    let tls = if on {
        let ca = pigeonhole_tls::dev::DevCa::new("pigeonhole-jepsen CA")?;
        let hosts: Vec<String> = (1..=SLOTS_MAX).map(net::node_ip).collect();
        Some(Tls {
            node: ca.write(dir, "node", &pigeonhole_tls::dev::Leaf::node(hosts))?,
            // The CA holder's superuser: the harness calls every RPC,
            // admin ones included (auth is on with TLS).
            client: ca.write(dir, "root", &pigeonhole_tls::dev::Leaf::client("root"))?,
        })
    } else {
        None
    };
    TLS.set(tls).map_err(|_| "TLS was set twice".to_string())
}

/// The run's TLS, if on.
pub fn tls() -> Option<&'static Tls> {
    TLS.get().and_then(Option::as_ref)
}

/// A running test cluster.
#[derive(Debug)]
pub struct Cluster {
    /// Nodes of the initial cluster (slots `1..=initial`).
    pub initial: u64,
    /// Slots the cluster may use (nodes it may grow to).
    pub slots: u64,
    server: PathBuf,
    dir: PathBuf,
    procs: BTreeMap<u64, Proc>,
    /// Slot → the node living there; a slot without an entry is free.
    members: BTreeMap<u64, Member>,
    /// Joins so far (names the joined nodes' data directories).
    joins: u64,
    /// The phctl binary, for the membership fault.
    pub phctl: Option<PathBuf>,
    /// Data dirs on lost-write file systems (power-loss scenarios only).
    lostfs: bool,
    /// Slot → its mounted file system. Declared last: unmounted after the
    /// nodes are killed (`Drop`).
    disks: BTreeMap<u64, crate::lostfs::Mounted>,
}

impl Cluster {
    /// The `--initial-cluster` value.
    fn initial_cluster(&self) -> String {
        (1..=self.initial)
            .map(|i| format!("{i}={}:{PORT}", net::node_ip(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts `nodes` servers, in slots `1..=nodes`; the cluster may grow
    /// to `slots` nodes.
    pub fn start(nodes: u64, slots: u64, server: &Path, dir: &Path) -> Result<Cluster, String> {
        Cluster::start_on(nodes, slots, server, dir, false)
    }

    /// [`Cluster::start`], with every data dir on a lost-write file system
    /// when `lostfs`.
    pub fn start_on(nodes: u64, slots: u64, server: &Path, dir: &Path, lostfs: bool) -> Result<Cluster, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut c = Cluster {
            initial: nodes,
            slots: slots.max(nodes),
            server: server.to_path_buf(),
            dir: dir.to_path_buf(),
            procs: BTreeMap::new(),
            members: BTreeMap::new(),
            joins: 0,
            phctl: None,
            lostfs,
            disks: BTreeMap::new(),
        };
        for i in 1..=nodes {
            c.members.insert(
                i,
                Member {
                    id: i,
                    joined: false,
                    data: c.dir.join(format!("n{i}")),
                    leaving: false,
                },
            );
            c.set_clock(i, 0)?;
            c.spawn(i)?;
        }
        Ok(c)
    }

    /// The occupied slots, in order.
    pub fn occupied(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    /// The lowest free slot, if any.
    pub fn free_slot(&self) -> Option<u64> {
        (1..=self.slots).find(|s| !self.members.contains_key(s))
    }

    /// The node living in `slot` (None: free).
    pub fn member(&self, slot: u64) -> Option<&Member> {
        self.members.get(&slot)
    }

    /// The node id in `slot` (0: free, or joining and not yet given one).
    pub fn id_of(&self, slot: u64) -> u64 {
        self.members.get(&slot).map_or(0, |m| m.id)
    }

    /// Marks the node in `slot` as being taken out, or not.
    pub fn set_leaving(&mut self, slot: u64, leaving: bool) {
        if let Some(m) = self.members.get_mut(&slot) {
            m.leaving = leaving;
        }
    }

    /// Records the id the cluster gave the node in `slot`.
    pub fn set_id(&mut self, slot: u64, id: u64) {
        if let Some(m) = self.members.get_mut(&slot) {
            m.id = id;
        }
    }

    /// Starts a new, empty node in the free `slot` with `--join` through
    /// the nodes in the other occupied slots.
    pub fn join(&mut self, slot: u64) -> Result<(), String> {
        if self.members.contains_key(&slot) || slot == 0 || slot > self.slots {
            return Err(format!("slot {slot} is not free"));
        }
        self.joins += 1;
        let data = self.dir.join(format!("n{slot}-join{}", self.joins));
        self.members.insert(
            slot,
            Member {
                id: 0,
                joined: true,
                data,
                leaving: false,
            },
        );
        self.set_clock(slot, 0)?;
        self.spawn(slot)
    }

    /// Takes the node in `slot` out of the harness for good (after the
    /// cluster removed it): kills its process and frees the slot. Its data
    /// directory stays, for the post-mortem.
    pub fn retire(&mut self, slot: u64) {
        self.kill(slot);
        self.procs.remove(&slot);
        self.members.remove(&slot);
    }

    fn clock_file(&self, i: u64) -> PathBuf {
        self.dir.join(format!("n{i}.faketime"))
    }

    /// Sets node `i`'s wall clock offset, in seconds; takes effect at once.
    pub fn set_clock(&self, i: u64, offset_s: i64) -> Result<(), String> {
        let spec = if offset_s >= 0 {
            format!("+{offset_s}")
        } else {
            offset_s.to_string()
        };
        std::fs::write(self.clock_file(i), spec).map_err(|e| format!("clock file: {e}"))
    }

    /// Starts the node in slot `i` (again): an initial node with its id and
    /// `--initial-cluster`, a joined one with `--join` (which a restart
    /// ignores once the node has joined).
    pub fn spawn(&mut self, i: u64) -> Result<(), String> {
        let member = self
            .members
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("slot {i} holds no node"))?;
        if self.lostfs && !self.disks.contains_key(&i) {
            let disk = self.dir.join(format!("n{i}.disk"));
            let fs = crate::lostfs::Mounted::mount(&disk, &member.data)
                .map_err(|e| format!("mount lostfs at {}: {e}", member.data.display()))?;
            self.disks.insert(i, fs);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{i}.log")))
            .map_err(|e| format!("log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net::node_ns(i)])
            .arg(&self.server)
            .args(["--listen", &format!("{}:{PORT}", net::node_ip(i))]);
        if member.joined {
            let seeds: Vec<String> = self
                .members
                .keys()
                .filter(|s| **s != i)
                .map(|s| format!("{}:{PORT}", net::node_ip(*s)))
                .collect();
            cmd.args(["--join", &seeds.join(",")]);
        } else {
            cmd.args(["--node-id", &member.id.to_string()])
                .args(["--initial-cluster", &self.initial_cluster()])
                .args(["--shards", &SHARDS.to_string()]);
        }
        match tls() {
            Some(t) => {
                cmd.arg("--tls-ca").arg(&t.node.ca);
                if let (Some(cert), Some(key)) = (&t.node.cert, &t.node.key) {
                    cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
                }
            }
            None => {
                cmd.arg("--insecure");
            }
        }
        cmd.arg("--data-dir")
            .arg(&member.data)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if Path::new(LIBFAKETIME).exists() {
            cmd.env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", self.clock_file(i))
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = cmd.spawn().map_err(|e| format!("start node {i}: {e}"))?;
        let pids = self.dir.parent().unwrap_or(&self.dir).join("pids");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pids)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{}\n", child.id()).as_bytes()));
        self.procs.insert(
            i,
            Proc {
                child: Some(child),
                paused: false,
            },
        );
        Ok(())
    }

    fn signal(&self, i: u64, sig: &str) -> Result<(), String> {
        let pid = self
            .procs
            .get(&i)
            .and_then(|p| p.child.as_ref())
            .map(Child::id)
            .ok_or_else(|| format!("node {i} is not running"))?;
        net::sh(&["kill", sig, &pid.to_string()]).map(|_| ())
    }

    /// SIGKILL node `i` (a stopped process dies too).
    pub fn kill(&mut self, i: u64) {
        if let Some(p) = self.procs.get_mut(&i) {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            p.paused = false;
        }
    }

    /// A power cut on node `i`: SIGKILL, then everything it had not made
    /// durable is dropped, one dirty page torn per `tear` (see
    /// [`crate::lostfs::Mounted::power_loss`]). `recover` restarts it.
    pub fn power_loss(&mut self, i: u64, tear: Option<(u64, u64)>) -> Result<crate::lostfs::Loss, String> {
        self.kill(i);
        let disk = self
            .disks
            .get(&i)
            .ok_or_else(|| format!("node {i} is not on a lost-write file system"))?;
        disk.power_loss(tear)
            .map_err(|e| format!("power loss on node {i}: {e}"))
    }

    /// SIGSTOP node `i`.
    pub fn pause(&mut self, i: u64) -> Result<(), String> {
        self.signal(i, "-STOP")?;
        if let Some(p) = self.procs.get_mut(&i) {
            p.paused = true;
        }
        Ok(())
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: u64) -> Result<(), String> {
        self.signal(i, "-CONT")?;
        if let Some(p) = self.procs.get_mut(&i) {
            p.paused = false;
        }
        Ok(())
    }

    /// Nodes whose process exited on its own (a start that failed, a
    /// crash), with how: a node must come back from every fault.
    pub fn exited(&mut self) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for (i, p) in &mut self.procs {
            if let Some(c) = p.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let log = std::fs::read_to_string(self.dir.join(format!("n{i}.log"))).unwrap_or_default();
                    // Its panic, else its last error line.
                    let lines: Vec<&str> = log.lines().collect();
                    let last = match lines.iter().rposition(|l| l.contains("panicked at")) {
                        Some(at) => lines.get(at..(at + 2).min(lines.len())).unwrap_or_default().join(" "),
                        None => lines
                            .iter()
                            .rev()
                            .find(|l| !l.contains(" INFO ") && !l.contains(" WARN "))
                            .map_or(String::new(), |l| (*l).to_string()),
                    };
                    out.push((*i, format!("{status}: {last}")));
                }
            }
        }
        out
    }

    /// Whether node `i` has a process (running or paused).
    pub fn is_up(&self, i: u64) -> bool {
        self.procs.get(&i).is_some_and(|p| p.child.is_some())
    }

    /// Undoes every process fault: resumes paused nodes, restarts dead
    /// ones, and resets every clock.
    pub fn recover(&mut self) -> Result<(), String> {
        for i in self.occupied() {
            self.set_clock(i, 0)?;
            let paused = self.procs.get(&i).is_some_and(|p| p.paused);
            if paused {
                self.resume(i)?;
            }
            if !self.is_up(i) {
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// Kills every node.
    pub fn stop(&mut self) {
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        for i in ids {
            self.kill(i);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A channel to node `i` (lazy: a dead node fails the call, not this).
pub fn channel(i: u64) -> Result<tonic::transport::Channel, String> {
    Ok(
        pigeonhole_tls::client::endpoint(&format!("{}:{PORT}", net::node_ip(i)), tls().map(|t| &t.client))?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(2))
            .connect_lazy(),
    )
}

/// The shard map node `i` serves, or, if it serves none (a node without
/// a replica of the metadata group answers NOT_REPLICA: ask another node,
/// as the SDK does), the map of the first other slot that answers. None
/// if no node answers within 1 s each.
pub async fn shard_map(i: u64) -> Option<pb::GetShardMapResponse> {
    for n in std::iter::once(i).chain((1..=SLOTS_MAX).filter(|n| *n != i)) {
        if let Some(map) = shard_map_of(n).await {
            return Some(map);
        }
    }
    None
}

/// The shard map node `i` itself serves, or None.
async fn shard_map_of(i: u64) -> Option<pb::GetShardMapResponse> {
    let mut c = pb::admin_client::AdminClient::new(channel(i).ok()?);
    match tokio::time::timeout(Duration::from_secs(1), c.get_shard_map(pb::GetShardMapRequest {})).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}

/// The shard `user_id` is in by `map` (splits move mailboxes to new
/// shards, D38).
pub fn shard_of(map: &pb::GetShardMapResponse, user_id: &[u8]) -> Option<u64> {
    let h = pigeonhole_proto::placement::user_hash(user_id);
    map.shards
        .iter()
        .find(|s| pigeonhole_proto::placement::range_contains(s.range_start, s.range_end, h))
        .map(|s| s.id)
}

/// NodeStatus of node `i`, or None if it does not answer within 1 s.
pub async fn status(i: u64) -> Option<pb::NodeStatusResponse> {
    let mut c = pb::admin_client::AdminClient::new(channel(i).ok()?);
    let call = c.node_status(pb::NodeStatusRequest {
        include_sizes: false,
        ..Default::default()
    });
    match tokio::time::timeout(Duration::from_secs(1), call).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}

/// The slot of the node leading `shard` at the highest term, among the
/// `slots` that answer.
pub async fn leader_of(slots: &[u64], shard: u64) -> Option<u64> {
    let mut best: Option<(u64, u64)> = None;
    for &i in slots {
        if let Some(s) = status(i).await {
            for r in s.replicas {
                if r.shard == shard && r.role == pb::ReplicaRole::Leader as i32 && best.is_none_or(|(t, _)| r.term > t)
                {
                    best = Some((r.term, i));
                }
            }
        }
    }
    best.map(|(_, n)| n)
}

/// Waits until every node answers and every shard (metadata included) has a
/// leader, or `within` passes.
pub async fn wait_ready(slots: &[u64], within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let mut ok = true;
        let mut led: BTreeMap<u64, bool> = (0..=SHARDS).map(|s| (s, false)).collect();
        for &i in slots {
            match status(i).await {
                Some(s) => {
                    for r in s.replicas {
                        if r.role == pb::ReplicaRole::Leader as i32 {
                            led.insert(r.shard, true);
                        }
                    }
                }
                None => ok = false,
            }
        }
        if ok && led.values().all(|l| *l) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "cluster not ready within {} s: leaders {led:?}",
                within.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until, for every shard, every replica reports the same applied
/// index as the others (and as its commit index): every replica has applied
/// everything committed so far. Returns that applied index per shard.
pub async fn wait_converged(slots: &[u64], within: Duration) -> Result<BTreeMap<u64, u64>, String> {
    let started = Instant::now();
    let deadline = started + within;
    loop {
        let mut applied: BTreeMap<u64, Vec<(u64, u64, u64)>> = BTreeMap::new();
        let mut members: BTreeMap<u64, usize> = BTreeMap::new();
        let mut all = true;
        for &i in slots {
            match status(i).await {
                Some(s) => {
                    for r in s.replicas {
                        members.insert(r.shard, r.voters.len() + r.learners.len());
                        applied
                            .entry(r.shard)
                            .or_default()
                            .push((i, r.applied_index, r.commit_index));
                    }
                }
                None => all = false,
            }
        }
        // Every member of every shard reports, and all report one applied
        // index, equal to their commit index.
        let converged = all
            && applied.iter().all(|(shard, rs)| {
                Some(&rs.len()) == members.get(shard)
                    && rs.iter().all(|(_, a, c)| a == c && Some(a) == rs.first().map(|f| &f.1))
            });
        if converged {
            return Ok(applied
                .iter()
                .map(|(shard, rs)| (*shard, rs.first().map_or(0, |f| f.1)))
                .collect());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "replicas did not converge within {} s: (node, applied, commit) per shard: {applied:?}",
                within.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
