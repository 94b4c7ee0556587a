//! In-process cluster harness: several nodes in one test process, each with a
//! real engine in a temp dir, connected by the filtering `Router`.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod placing;
pub mod routed;

use pigeonhole_cluster::transport::local::Router;
use pigeonhole_cluster::{ClusterError, InitialCluster, Node, NodeConfig, RaftTuning, Role, ShardStatus};
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::{OpOutput, SyncQuery};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

/// Fast timings so elections take ~100–200 ms.
pub fn fast_tuning() -> RaftTuning {
    RaftTuning {
        tick_ms: 10,
        election_ticks: 10,
        heartbeat_ticks: 2,
        hibernate_after_ticks: 30,
        peer_down_after_ms: 300,
        node_heartbeat_ms: 50,
        request_timeout_ms: 2_000,
        rebalance_every_ticks: 0,
        // Tests place replicas by hand unless they ask for the loop.
        placement_every_ticks: 0,
        // Pools, whatever the machine: the binary's default on a small
        // machine is one apply worker and one driver, which the e2e and
        // Jepsen runs cover. Two drivers split each node's shards (the
        // metadata shard and the even ones on the first).
        apply_threads: 2,
        driver_threads: 2,
        ..RaftTuning::default()
    }
}

pub struct TestCluster {
    pub router: Router,
    pub dirs: BTreeMap<u64, tempfile::TempDir>,
    pub nodes: BTreeMap<u64, Node>,
    pub configs: BTreeMap<u64, NodeConfig>,
}

impl TestCluster {
    /// `n` nodes, `shards` shards, replication `rf`.
    pub fn new(n: u64, shards: u64, rf: usize, tuning: RaftTuning) -> Self {
        Self::with_members(n, n, shards, rf, tuning)
    }

    /// `members` nodes in the initial cluster, of which the first `started`
    /// run now (the rest are spare nodes in the map, started later).
    pub fn with_members(members: u64, started: u64, shards: u64, rf: usize, tuning: RaftTuning) -> Self {
        let ic = InitialCluster {
            nodes: (1..=members).map(|i| (i, format!("127.0.0.1:{}", 17000 + i))).collect(),
        };
        let router = Router::new();
        let mut c = TestCluster {
            router,
            dirs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            configs: BTreeMap::new(),
        };
        for id in 1..=members {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = NodeConfig::new(id, dir.path(), ic.clone());
            cfg.shard_count = shards;
            cfg.replication_factor = rf;
            cfg.raft = tuning.clone();
            c.dirs.insert(id, dir);
            c.configs.insert(id, cfg);
        }
        for id in 1..=started {
            c.start(id);
        }
        c
    }

    /// Admits a new node at `address` through `via` (what `Admin.JoinNode`
    /// does) and starts it empty, as `pigeonhole --join` does. Returns its id.
    pub async fn join(&mut self, via: u64, address: &str, token: u64) -> u64 {
        let (id, _) = pigeonhole_cluster::join::admit(self.node(via), address, token, "")
            .await
            .unwrap();
        let params = self.node(via).bootstrap_params().clone();
        let template = &self.configs[&via];
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = NodeConfig::new(id, dir.path(), params.initial_cluster);
        cfg.joined = true;
        cfg.cluster_id = Some(self.node(via).cluster_id());
        cfg.shard_count = params.shard_count;
        cfg.replication_factor = params.replication_factor;
        cfg.raft = template.raft.clone();
        self.dirs.insert(id, dir);
        self.configs.insert(id, cfg);
        self.start(id);
        id
    }

    pub fn start(&mut self, id: u64) {
        let cfg = self.configs[&id].clone();
        // A restarted node's previous engine may still be held for a moment
        // by a snapshot it was streaming (the in-process transport's sender
        // thread owns a clone until the export ends); a real restart is a
        // new process, so only this harness waits for the lock.
        let deadline = Instant::now() + Duration::from_secs(10);
        let node = loop {
            match Node::start(cfg.clone(), self.router.transport(id)) {
                Ok(n) => break n,
                Err(e) if e.to_string().contains("LOCK") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("node {id} did not start: {e}"),
            }
        };
        self.router.register(node.inbox());
        self.nodes.insert(id, node);
    }

    /// Stops a node as a crash would look to the others: it vanishes from
    /// the network; its disk state stays.
    pub fn stop(&mut self, id: u64) {
        self.router.unregister(id);
        if let Some(n) = self.nodes.remove(&id) {
            n.stop().unwrap();
        }
    }

    pub fn restart(&mut self, id: u64) {
        self.stop(id);
        self.start(id);
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    pub async fn status(&self, id: u64, shard: u64) -> Option<ShardStatus> {
        self.nodes[&id]
            .status()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.shard == shard)
    }

    /// Waits until the running replicas of `shard` agree on one leader.
    pub async fn leader(&self, shard: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut leaders = Vec::new();
            let mut seen = Vec::new();
            let mut claimed = 0;
            for id in self.nodes.keys() {
                if let Some(s) = self.status(*id, shard).await {
                    leaders.push(s.leader);
                    if s.role == Role::Leader {
                        claimed = *id;
                    }
                    seen.push(s);
                }
            }
            if claimed != 0 && leaders.iter().all(|l| *l == claimed) {
                return claimed;
            }
            assert!(
                Instant::now() < deadline,
                "no leader for shard {shard}: {leaders:?}; replicas {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every replica on every running node hibernates.
    pub async fn wait_all_asleep(&self) {
        self.eventually("all replicas hibernate", 10, || async {
            let mut all = true;
            for n in self.nodes.values() {
                all &= n.status().await.unwrap().iter().all(|s| s.asleep);
            }
            all
        })
        .await;
    }

    /// Waits until `f` holds, or fails the test with `what`.
    pub async fn eventually<F, Fut>(&self, what: &str, secs: u64, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f().await {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop(id);
        }
        // No snapshot thread may outlive the cluster with an engine open.
        assert!(
            self.router.wait_snapshots(Duration::from_secs(10)),
            "snapshot streams still running"
        );
    }
}

/// The metadata group's (voters, learners) as its leader reports them;
/// empty while the node that claimed leadership has just deleted its
/// replica (a removed leader's replica is garbage-collected).
pub async fn meta_conf(c: &TestCluster) -> (Vec<u64>, Vec<u64>) {
    let leader = c.leader(pigeonhole_cluster::placement::META_SHARD).await;
    let Some(s) = c.status(leader, pigeonhole_cluster::placement::META_SHARD).await else {
        return (Vec::new(), Vec::new());
    };
    let mut v = s.voters.clone();
    v.sort_unstable();
    let mut l = s.learners.clone();
    l.sort_unstable();
    (v, l)
}

pub fn append_op(user: &str, key: &str, payload: &[u8]) -> cmd::Op {
    cmd::Op {
        op: Some(cmd::op::Op::Append(cmd::AppendOp {
            namespace: "app".into(),
            user_id: user.as_bytes().to_vec(),
            idempotency_key: key.as_bytes().to_vec(),
            payload: payload.to_vec().into(),
            expected_last_seq: None,
        })),
    }
}

/// Appends one message through `node`; returns (seq, duplicate).
pub async fn append(
    node: &Node,
    shard: u64,
    user: &str,
    key: &str,
    payload: &[u8],
) -> Result<(u64, bool), ClusterError> {
    let mut res = node.propose(shard, vec![append_op(user, key, payload)]).await?;
    match res.pop() {
        Some(Ok(OpOutput::Appended { seq, duplicate, .. })) => Ok((seq, duplicate)),
        other => panic!("unexpected append result {other:?}"),
    }
}

/// Retries a retryable failure until `secs` pass.
pub async fn append_retrying(node: &Node, shard: u64, user: &str, key: &str, payload: &[u8], secs: u64) -> (u64, bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match append(node, shard, user, key, payload).await {
            Ok(r) => return r,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("append {key} failed: {e}"),
        }
    }
}

/// Every message of `user`'s mailbox on `node`'s replica, as (seq, payload).
pub fn read_all(node: &Node, shard: u64, user: &str) -> Vec<(u64, Vec<u8>)> {
    try_read_all(node, shard, user).unwrap()
}

/// [`read_all`], or the replica's error (a shard that split after the
/// caller looked up its route answers `WrongShard`).
pub fn try_read_all(node: &Node, shard: u64, user: &str) -> Result<Vec<(u64, Vec<u8>)>, pigeonhole_engine::ReadError> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = node.engine().sync(
            shard,
            &SyncQuery {
                namespace: "app",
                user_id: user.as_bytes(),
                after_seq: after,
                max_messages: 1000,
                max_bytes: 0,
            },
        )?;
        for m in &page.messages {
            out.push((m.seq, m.payload.clone()));
            after = m.seq;
        }
        if !page.has_more {
            return Ok(out);
        }
    }
}

/// A shard a user maps to, per the cluster's placement.
pub fn shard_of(node: &Node, user: &str) -> u64 {
    node.shard_map().unwrap().shard_for_user(user.as_bytes()).unwrap().id
}
