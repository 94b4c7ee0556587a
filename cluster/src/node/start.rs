//! Starting a node: the data dir's identity, the engine's open (with the
//! damage checks of D50), the first start's bootstrap of this node's
//! replicas from the static initial cluster (as etcd does), and the driver
//! thread. Kept apart from the handle's calls (`node.rs`) because it runs
//! once, before any of them, and is where a start's failures are decided:
//! refused (another cluster's dir, an unfinished restore), or damage that
//! is marked and rebuilt from the peers.

use super::{Node, NodeInner};
use crate::config::NodeConfig;
use crate::driver::pool::Drivers;
use crate::driver::{Driver, DriverParts};
use crate::error::ClusterError;
use crate::placement::{meta_members, ShardMap, META_SHARD};
use crate::transport::{NodeInbox, SnapshotSpool, Transport};
use crate::watch::Watchers;
use crossbeam_channel::bounded;
use pigeonhole_engine::conf_state_with_voters;
use pigeonhole_engine::raft::eraftpb::ConfState;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Index and term every bootstrapped replica starts at (raft-rs's initial
/// configuration must sit at an index > 0; 5/5 as TiKV uses).
pub const BOOTSTRAP_INDEX: u64 = 5;
const BOOTSTRAP_TERM: u64 = 5;
const IDENTITY_FILE: &str = "cluster-identity";

impl Node {
    /// Opens (or bootstraps) the node and starts its driver.
    ///
    /// Damage RocksDB's open does not see (a data block, read only when
    /// the start itself reads a shard's rows) is marked like damage found
    /// at the open, and the start is made once more, which rebuilds the
    /// state machine from the peers (D50), or, with no peers to rebuild
    /// from, says so. Once only: damage found again right after a rebuild
    /// is returned.
    pub fn start(cfg: NodeConfig, transport: Arc<dyn Transport>) -> Result<Node, ClusterError> {
        match Self::start_once(cfg.clone(), Arc::clone(&transport)) {
            Err(ClusterError::Engine(e)) if e.is_state_damage() => {
                // Everything the first start opened is closed by now.
                tracing::error!(
                    damage = %e,
                    "the state machine's files are damaged (found while starting): they are moved aside and \
                     every replica here is rebuilt from its peers"
                );
                crate::damage::mark(&cfg.data_dir, &e.to_string())?;
                Self::start_once(cfg, transport)
            }
            other => other,
        }
    }

    fn start_once(cfg: NodeConfig, transport: Arc<dyn Transport>) -> Result<Node, ClusterError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir)?;
        if cfg.data_dir.join(crate::restore::RESTORE_MARKER).exists() {
            return Err(ClusterError::Config(format!(
                "data dir {}: a restore into it did not finish; run `pigeonhole restore` again",
                cfg.data_dir.display()
            )));
        }
        let cluster_id = cfg.effective_cluster_id();
        check_identity(&cfg, cluster_id)?;
        let map = Arc::new(ShardMap::bootstrap(
            &cfg.initial_cluster,
            cfg.shard_count,
            cfg.replication_factor,
        ));
        // What a first start creates here: the metadata shard, then this
        // node's data shards.
        let mut bootstrap_shards = vec![META_SHARD];
        bootstrap_shards.extend(map.shards_on(cfg.node_id));
        let engine = crate::damage::open_engine(&cfg, &bootstrap_shards, BOOTSTRAP_INDEX)?;
        // A node that joined starts empty: the metadata group's leader adds
        // its learner there, and data replicas are moved to it.
        // A new node bootstraps every shard it starts with; one whose first
        // bootstrap a crash cut short, the shards it left at the log only.
        // (A node whose Raft log knows shards otherwise is not new, even
        // with no state: its state machine was rebuilt, D50.)
        let bootstrap = if cfg.joined {
            Vec::new()
        } else if engine.shard_ids()?.is_empty() && engine.raft_log_shard_ids().is_empty() {
            bootstrap_shards
        } else {
            crate::damage::interrupted_bootstrap(&engine, &bootstrap_shards, BOOTSTRAP_INDEX)?
        };
        // All in one write (one log record, then one state batch): a crash
        // leaves every shard's log or none, never some shards missing.
        let mut confs = Vec::with_capacity(bootstrap.len());
        for shard in bootstrap {
            let conf = if shard == META_SHARD {
                let (voters, learners) = meta_members(&cfg.initial_cluster);
                ConfState {
                    voters,
                    learners,
                    ..Default::default()
                }
            } else {
                conf_state_with_voters(&map.shard(shard).ok_or(ClusterError::Stopped)?.replicas)
            };
            confs.push((shard, conf));
        }
        if !confs.is_empty() {
            engine.bootstrap_shards(confs, BOOTSTRAP_INDEX, BOOTSTRAP_TERM)?;
        }
        let spool = Arc::new(SnapshotSpool::open(cfg.data_dir.join("snap"))?);
        let watchers = Arc::new(Watchers::default());
        let counters = Arc::new(crate::driver::DriverCounters::default());
        let routing = Arc::new(crate::placement::Routing::new(map.clone()));
        // The pool of drivers (D65): each its own inbox and share of the
        // replicas.
        let count = cfg.raft.driver_threads.max(1);
        let inboxes: Vec<_> = (0..count).map(|_| bounded(cfg.raft.inbox_capacity)).collect();
        let drivers = Drivers::new(inboxes.iter().map(|(tx, _)| tx.clone()).collect(), routing.clone());
        let inbox = NodeInbox {
            node_id: cfg.node_id,
            drivers: drivers.clone(),
            spool: spool.clone(),
        };
        let mut built = Vec::with_capacity(count);
        for (index, (tx, rx)) in inboxes.into_iter().enumerate() {
            built.push(Driver::new(DriverParts {
                node_id: cfg.node_id,
                index,
                drivers: drivers.clone(),
                engine: engine.clone(),
                tuning: cfg.raft.clone(),
                transport: Arc::clone(&transport),
                inbox: (tx, rx),
                map: map.clone(),
                routing: routing.clone(),
                spool: spool.clone(),
                watchers: watchers.clone(),
                counters: counters.clone(),
            })?);
        }
        let mut threads = Vec::with_capacity(count);
        for (index, driver) in built.into_iter().enumerate() {
            let name = if count == 1 {
                format!("raft-driver-{}", cfg.node_id)
            } else {
                format!("raft-driver-{}-{index}", cfg.node_id)
            };
            match spawn_driver(name, driver, drivers.clone()) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    drivers.stop_all();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(Node {
            inner: Arc::new(NodeInner {
                id: cfg.node_id,
                cluster_id,
                engine,
                map,
                routing,
                drivers,
                inbox,
                threads: Mutex::new(threads),
                request_timeout: Duration::from_millis(cfg.raft.request_timeout_ms),
                inbox_capacity: cfg.raft.inbox_capacity,
                ops_per_entry_max: cfg.raft.ops_per_entry_max,
                entry_bytes_max: cfg.raft.entry_bytes_max,
                watchers,
                counters,
                bootstrap: crate::config::BootstrapParams {
                    initial_cluster: cfg.initial_cluster.clone(),
                    shard_count: cfg.shard_count,
                    replication_factor: cfg.replication_factor,
                },
            }),
        })
    }
}

/// Runs one driver on a thread of its own. A driver that stops on an
/// error stops the node's other drivers too (the node serves nothing until
/// it restarts, as with one driver); it lets go of its inbox first, so two
/// drivers stopping at once never wait on each other's full inboxes.
fn spawn_driver(
    name: String,
    mut driver: Driver,
    drivers: Arc<Drivers>,
) -> std::io::Result<std::thread::JoinHandle<Result<(), ClusterError>>> {
    std::thread::Builder::new().name(name).spawn(move || {
        let res = driver.run_loop();
        driver.shutdown();
        drop(driver);
        if let Err(e) = &res {
            tracing::error!(error = %e, "a Raft driver stopped: this node serves nothing until it restarts");
            drivers.stop_all();
        }
        if let Err(ClusterError::Engine(e)) = &res {
            // Damage to this node's files: rebuilt, not served (D50).
            crate::damage::check(e);
        }
        res
    })
}

/// The identity file pins the node id, cluster id and shard layout to the
/// data dir, so restarting with other flags fails instead of corrupting.
pub(crate) fn check_identity(cfg: &NodeConfig, cluster_id: u64) -> Result<(), ClusterError> {
    let path = cfg.data_dir.join(IDENTITY_FILE);
    let want = format!(
        "node_id={}\ncluster_id={cluster_id}\nshard_count={}\nreplication_factor={}\n",
        cfg.node_id, cfg.shard_count, cfg.replication_factor
    );
    match std::fs::read_to_string(&path) {
        Ok(have) if have == want => Ok(()),
        Ok(have) => Err(ClusterError::Config(format!(
            "data dir {} belongs to another node or cluster:\n{have}but the flags say:\n{want}",
            cfg.data_dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_durably(&path, want.as_bytes()),
        Err(e) => Err(e.into()),
    }
}

/// The shard count the identity file in `data_dir` pins, if the dir has
/// one: what a node restarted without `--shards` serves with, so a data dir
/// bootstrapped under another default (64 before D59) keeps its layout
/// instead of being refused as another cluster's.
pub(crate) fn identity_shard_count(data_dir: &Path) -> Result<Option<u64>, ClusterError> {
    let path = data_dir.join(IDENTITY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let value = text.lines().find_map(|l| l.strip_prefix("shard_count="));
    match value.map(str::parse::<u64>) {
        Some(Ok(n)) => Ok(Some(n)),
        _ => Err(ClusterError::Config(format!(
            "{} has no valid shard_count line:\n{text}",
            path.display()
        ))),
    }
}

pub(crate) fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
