//! Nodes that join a running cluster (`pigeonhole --join host:port`).
//!
//! Why it is shaped this way:
//! - **The metadata group hands out ids.** Ids must never repeat (a removed
//!   id reused could be mistaken for the old replica by a stale message), so
//!   the next id is one more than every id the cluster ever had, written as
//!   a node record only if none of that id exists (`if_version: 0`): two
//!   concurrent joins that pick the same id cannot both win, the loser
//!   retries.
//! - **A join is idempotent per token.** The joining node draws a random
//!   token and keeps it in its data dir (`join-token`) before it asks, so a
//!   join whose answer was lost, or a node that crashed before writing its
//!   identity, asks again and gets the same id. Another token for the
//!   address of a node that is not removed is refused: a wiped node must
//!   never come back under its old id, whose votes and log it lost.
//! - **The new node starts empty.** It is handed the bootstrap parameters
//!   (initial cluster, shard count, replication factor) so it derives the
//!   same bootstrap map as every other node, and the cluster id its frames
//!   carry. It keeps them in `joined-cluster`; restarts read that file and
//!   ask no one. The metadata group's leader gives it a learner within a
//!   rebalance round (`nodes::meta_changes`); data replicas come when moved
//!   there (`phctl cluster balance --apply`).
//! - **Every node learns the new address from its own metadata replica**
//!   (the driver's `learn_peers`), so no membership list is ever passed
//!   around by hand.

use crate::config::{BootstrapParams, InitialCluster};
use crate::error::ClusterError;
use crate::nodes::{NodeState, NodeStateEntry, NODES_MAX};
use crate::placement::META_SHARD;
use crate::Node;
use pigeonhole_engine::command as cmd;
use pigeonhole_proto::v1 as pb;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest `host:port` a node may join with.
pub const ADDRESS_BYTES_MAX: usize = 255;
/// Members a joining node may be given to ask, at most.
pub const JOIN_SEEDS_MAX: usize = 16;
/// How long a joining node keeps asking before it gives up.
pub const JOIN_WAIT_MS_MAX: u64 = 120_000;
const JOIN_ATTEMPT_MS: u64 = 5_000;
const TOKEN_FILE: &str = "join-token";
const JOINED_FILE: &str = "joined-cluster";

/// What the metadata group decided for a join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinPlan {
    /// The same token joined before: its id again.
    Existing(u64),
    /// A new id.
    New(u64),
}

/// Checks `address`: `host:port` where host is a name or IPv4 address
/// (letters, digits, `.`, `-`) or a bracketed IPv6 address, port 1 to
/// 65535, at most [`ADDRESS_BYTES_MAX`] bytes, and not an unspecified
/// address (`0.0.0.0`, `[::]`: one to listen on, not to be dialled). Strict
/// because the address is stored, handed to every later joiner and parsed
/// back from `joined-cluster` (where `,` and `=` separate entries): a bad
/// one must be refused before it is recorded.
pub fn check_address(address: &str) -> Result<(), String> {
    if address.len() > ADDRESS_BYTES_MAX {
        return Err(format!("{} bytes; the limit is {ADDRESS_BYTES_MAX}", address.len()));
    }
    let Some((host, _)) = address
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
    else {
        return Err(format!("{address:?} is not host:port"));
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => !v6.is_empty() && v6.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'),
        None => host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
    };
    if !host_ok {
        return Err(format!("{address:?}: {host:?} is not a host name or IP address"));
    }
    if host == "0.0.0.0" || host == "[::]" {
        return Err(format!(
            "{address:?} is an unspecified address: listen on it, but advertise one others can dial"
        ));
    }
    Ok(())
}

/// Decides a join from the initial nodes' addresses and the node records.
/// A pure function of its inputs, so every rule is unit-tested.
pub fn plan_join(
    initial: &BTreeMap<u64, String>,
    states: &BTreeMap<u64, NodeStateEntry>,
    address: &str,
    token: u64,
) -> Result<JoinPlan, String> {
    let state = |n: u64| states.get(&n).map_or(NodeState::Up, |e| e.state);
    let holders = initial
        .iter()
        .map(|(n, a)| (*n, a.as_str(), 0))
        .chain(states.iter().map(|(n, e)| (*n, e.address.as_str(), e.join_token)))
        .filter(|(_, a, _)| *a == address);
    for (node, _, node_token) in holders {
        let removed = state(node) == NodeState::Removed;
        match (node_token == token, removed) {
            (true, false) => return Ok(JoinPlan::Existing(node)),
            (true, true) => {
                return Err(format!(
                    "node {node}, which joined with this token, was removed; a removed node never comes \
                     back: start it with an empty data dir to join as a new node"
                ))
            }
            (false, false) => {
                return Err(format!(
                    "{address} is node {node}'s address ({}); remove that node first (phctl node remove \
                     {node}), or join with another address",
                    crate::nodes::state_name(state(node))
                ))
            }
            (false, true) => {} // a removed node's address may be reused
        }
    }
    let ids: std::collections::BTreeSet<u64> = initial.keys().chain(states.keys()).copied().collect();
    if ids.len() >= NODES_MAX {
        return Err(format!(
            "the cluster has had {} nodes; the limit is {NODES_MAX} (removed ones count: ids are never reused)",
            ids.len()
        ));
    }
    let last = ids.last().copied().unwrap_or(0);
    last.checked_add(1)
        .map(JoinPlan::New)
        .ok_or_else(|| "no node id is left".to_string())
}

/// Serves `Admin.JoinNode` on any node: a read barrier on the metadata
/// group, [`plan_join`], then the new node's record, written only if no
/// record of that id exists (`if_version: 0`), so a concurrent join that
/// chose the same id loses and retries. Returns the
/// id and every node's address.
pub async fn admit(
    node: &Node,
    address: &str,
    token: u64,
    zone: &str,
) -> Result<(u64, BTreeMap<u64, String>), ClusterError> {
    check_address(address).map_err(|reason| ClusterError::InvalidArgument {
        field: "address",
        reason,
    })?;
    crate::nodes::check_zone(zone).map_err(|reason| ClusterError::InvalidArgument { field: "zone", reason })?;
    if token == 0 {
        return Err(ClusterError::InvalidArgument {
            field: "join_token",
            reason: "must not be 0".into(),
        });
    }
    node.read_barrier(META_SHARD).await?;
    let states = node.node_states()?;
    let plan = plan_join(&node.bootstrap_params().initial_cluster.nodes, &states, address, token)
        .map_err(|reason| ClusterError::Refused { reason })?;
    let id = match plan {
        JoinPlan::Existing(id) => id,
        JoinPlan::New(id) => {
            let entry = NodeStateEntry {
                address: address.to_string(),
                join_token: token,
                zone: zone.to_string(),
                ..Default::default()
            };
            let op = cmd::Op {
                op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                    key: crate::nodes::node_record_key(id),
                    value: crate::nodes::encode_record(id, NodeState::Up, &entry),
                    version: 1,
                    if_version: Some(0),
                })),
            };
            match node.propose(META_SHARD, vec![op]).await?.into_iter().next() {
                Some(Ok(_)) => id,
                Some(Err(e)) => {
                    return Err(ClusterError::Busy {
                        shard: META_SHARD,
                        reason: format!("another node joined as node {id} meanwhile ({e}); retry"),
                    })
                }
                None => return Err(ClusterError::Raft("a proposal of one op returned no result".into())),
            }
        }
    };
    Ok((id, node.shard_map()?.nodes))
}

/// What a joined node keeps in its data dir and starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The id the cluster gave it.
    pub node_id: u64,
    /// The cluster's id.
    pub cluster_id: u64,
    /// The bootstrap parameters.
    pub params: BootstrapParams,
    /// Every node's address when it joined (the driver learns later ones).
    pub nodes: BTreeMap<u64, String>,
}

impl Joined {
    fn encode(&self) -> String {
        let list = |m: &BTreeMap<u64, String>| m.iter().map(|(n, a)| format!("{n}={a}")).collect::<Vec<_>>().join(",");
        format!(
            "node_id={}\ncluster_id={}\nshard_count={}\nreplication_factor={}\ninitial_cluster={}\nnodes={}\n",
            self.node_id,
            self.cluster_id,
            self.params.shard_count,
            self.params.replication_factor,
            list(&self.params.initial_cluster.nodes),
            list(&self.nodes),
        )
    }

    fn decode(text: &str) -> Result<Joined, String> {
        let mut fields = BTreeMap::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?} is not key=value"))?;
            fields.insert(k, v);
        }
        let get = |k: &str| fields.get(k).copied().ok_or_else(|| format!("{k} is missing"));
        let num = |k: &str| get(k)?.parse::<u64>().map_err(|_| format!("{k} is not a number"));
        let cluster = |k: &str| InitialCluster::parse(get(k)?).map_err(|e| format!("{k}: {e}"));
        // The address book may outgrow an initial cluster's 64 nodes.
        let book = |k: &str| -> Result<BTreeMap<u64, String>, String> {
            get(k)?
                .split(',')
                .map(|m| {
                    let (id, addr) = m
                        .split_once('=')
                        .ok_or_else(|| format!("{k}: {m:?} is not id=host:port"))?;
                    let id = id.parse::<u64>().map_err(|_| format!("{k}: {id:?} is not a node id"))?;
                    check_address(addr).map_err(|e| format!("{k}: {e}"))?;
                    Ok((id, addr.to_string()))
                })
                .collect()
        };
        Ok(Joined {
            node_id: num("node_id")?,
            cluster_id: num("cluster_id")?,
            params: BootstrapParams {
                initial_cluster: cluster("initial_cluster")?,
                shard_count: num("shard_count")?,
                replication_factor: usize::try_from(num("replication_factor")?)
                    .map_err(|_| "replication_factor is too large".to_string())?,
            },
            nodes: book("nodes")?,
        })
    }

    fn from_response(r: pb::JoinNodeResponse) -> Result<Joined, String> {
        let map = |list: Vec<pb::NodeInfo>| list.into_iter().map(|n| (n.id, n.address)).collect();
        let joined = Joined {
            node_id: r.node_id,
            cluster_id: r.cluster_id,
            params: BootstrapParams {
                initial_cluster: InitialCluster {
                    nodes: map(r.initial_cluster),
                },
                shard_count: r.shard_count,
                replication_factor: usize::try_from(r.replication_factor).unwrap_or(usize::MAX),
            },
            nodes: map(r.nodes),
        };
        // Through the text form, so a bad answer fails here, not at start.
        Joined::decode(&joined.encode())
    }
}

/// The cluster this data dir joined, if it has joined one.
pub fn load(data_dir: &Path) -> Result<Option<Joined>, ClusterError> {
    let path = data_dir.join(JOINED_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Joined::decode(&text)
            .map(Some)
            .map_err(|e| ClusterError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Joins through `seeds` (tried in turn until one admits the node, for up
/// to [`JOIN_WAIT_MS_MAX`]), unless `data_dir` already joined a cluster:
/// then that cluster, asking no one. Refusals (a bad address, an address in
/// use) end it at once with the cluster's reason.
pub async fn join(
    data_dir: &Path,
    advertise: &str,
    seeds: &[String],
    zone: &str,
    tls: Option<&pigeonhole_tls::TlsFiles>,
) -> Result<Joined, ClusterError> {
    if let Some(j) = load(data_dir)? {
        return Ok(j);
    }
    std::fs::create_dir_all(data_dir)?;
    let token = token(data_dir)?;
    let deadline = Instant::now() + Duration::from_millis(JOIN_WAIT_MS_MAX);
    let mut delay = Duration::from_millis(200);
    let mut last_error = String::from("no seed was asked");
    for seed in seeds.iter().cycle() {
        if Instant::now() >= deadline {
            break;
        }
        match ask(seed, advertise, token, zone, tls).await {
            Ok(r) => {
                let joined = Joined::from_response(r)
                    .map_err(|e| ClusterError::Config(format!("{seed} answered JoinNode badly: {e}")))?;
                crate::node::write_durably(&data_dir.join(JOINED_FILE), joined.encode().as_bytes())?;
                return Ok(joined);
            }
            Err(s) if retryable(s.code()) => {
                last_error = format!("{seed}: {}", s.message());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(s) => {
                return Err(ClusterError::Config(format!(
                    "{seed} refused the join: {:?}: {}",
                    s.code(),
                    s.message()
                )))
            }
        }
    }
    Err(ClusterError::Config(format!(
        "could not join through {seeds:?} within {JOIN_WAIT_MS_MAX} ms; last error: {last_error}"
    )))
}

/// Whether a seed's answer is worth asking again (or another seed). A
/// seed that does not answer within [`JOIN_ATTEMPT_MS`] ends the call on
/// this side as CANCELLED (tonic's client timeout, `Endpoint::timeout`),
/// not DEADLINE_EXCEEDED, and asking again is safe: the token makes a
/// join that did go through answer the same id (D34).
fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Aborted
    )
}

/// This data dir's join token: drawn once and kept before the first ask.
fn token(data_dir: &Path) -> Result<u64, ClusterError> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|t| *t != 0)
            .ok_or_else(|| ClusterError::Config(format!("{} holds no token", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let t = rand::random::<u64>().max(1);
            crate::node::write_durably(&path, format!("{t}\n").as_bytes())?;
            Ok(t)
        }
        Err(e) => Err(e.into()),
    }
}

async fn ask(
    seed: &str,
    advertise: &str,
    token: u64,
    zone: &str,
    tls: Option<&pigeonhole_tls::TlsFiles>,
) -> Result<pb::JoinNodeResponse, tonic::Status> {
    let endpoint = pigeonhole_tls::client::endpoint(seed, tls)
        .map_err(|e| tonic::Status::invalid_argument(format!("seed {seed:?}: {e}")))?
        .connect_timeout(Duration::from_millis(JOIN_ATTEMPT_MS))
        .timeout(Duration::from_millis(JOIN_ATTEMPT_MS));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect: {e}")))?;
    let mut client = pb::admin_client::AdminClient::new(channel);
    let r = client
        .join_node(pb::JoinNodeRequest {
            address: advertise.to_string(),
            join_token: token,
            zone: zone.to_string(),
        })
        .await?;
    Ok(r.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_that_times_out_or_is_away_is_asked_again_and_a_refusal_ends_the_join() {
        use tonic::Code;
        for c in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unknown,
            Code::Aborted,
        ] {
            assert!(retryable(c), "{c:?}");
        }
        for c in [
            Code::InvalidArgument,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::PermissionDenied,
        ] {
            assert!(!retryable(c), "{c:?}");
        }
    }

    fn initial() -> BTreeMap<u64, String> {
        (1..=3).map(|n| (n, format!("10.0.0.{n}:7070"))).collect()
    }

    fn joined(node: u64, state: NodeState, token: u64) -> (u64, NodeStateEntry) {
        (
            node,
            NodeStateEntry {
                state,
                version: 1,
                address: format!("10.0.0.{node}:7070"),
                join_token: token,
                zone: String::new(),
                keep_replicas: false,
            },
        )
    }

    #[test]
    fn joins_get_fresh_ids_and_retries_get_the_same_one() {
        let none = BTreeMap::new();
        assert_eq!(plan_join(&initial(), &none, "10.0.0.4:7070", 9), Ok(JoinPlan::New(4)));
        let states = BTreeMap::from([joined(4, NodeState::Up, 9)]);
        assert_eq!(
            plan_join(&initial(), &states, "10.0.0.4:7070", 9),
            Ok(JoinPlan::Existing(4))
        );
        assert_eq!(plan_join(&initial(), &states, "10.0.0.5:7070", 5), Ok(JoinPlan::New(5)));
        // Ids are never reused: a removed node's id stays taken, and an
        // initial node's record (no address) counts too.
        let states = BTreeMap::from([
            joined(4, NodeState::Removed, 9),
            (3, NodeStateEntry::default()),
            (7, NodeStateEntry::default()),
        ]);
        assert_eq!(plan_join(&initial(), &states, "10.0.0.9:7070", 1), Ok(JoinPlan::New(8)));
    }

    #[test]
    fn an_address_in_use_is_refused_and_a_removed_ones_is_free() {
        let states = BTreeMap::from([joined(4, NodeState::Draining, 9)]);
        let e = plan_join(&initial(), &states, "10.0.0.4:7070", 10).unwrap_err();
        assert!(e.contains("node 4's address (draining)"), "{e}");
        let e = plan_join(&initial(), &BTreeMap::new(), "10.0.0.2:7070", 10).unwrap_err();
        assert!(e.contains("node 2's address (up)"), "{e}");
        // Node 2 removed: its machine may join again, as a new node.
        let states = BTreeMap::from([(
            2,
            NodeStateEntry {
                state: NodeState::Removed,
                ..Default::default()
            },
        )]);
        assert_eq!(
            plan_join(&initial(), &states, "10.0.0.2:7070", 10),
            Ok(JoinPlan::New(4))
        );
        // ... but not under the token of a node that was removed.
        let states = BTreeMap::from([joined(4, NodeState::Removed, 9)]);
        let e = plan_join(&initial(), &states, "10.0.0.4:7070", 9).unwrap_err();
        assert!(e.contains("was removed"), "{e}");
    }

    #[test]
    fn the_node_count_is_bounded() {
        let states: BTreeMap<u64, NodeStateEntry> = (4..=u64::try_from(NODES_MAX).unwrap())
            .map(|n| joined(n, NodeState::Removed, n))
            .collect();
        let e = plan_join(&initial(), &states, "10.9.9.9:7070", 1).unwrap_err();
        assert!(e.contains("limit is 1024"), "{e}");
    }

    #[test]
    fn addresses_are_checked() {
        for ok in [
            "h:1",
            "10.0.0.4:7070",
            "node-4.example:7070",
            "[::1]:7070",
            "[fe80::1]:1",
        ] {
            assert_eq!(check_address(ok), Ok(()), "{ok}");
        }
        for bad in ["", "h", ":80", "h:0", "h:x", "h:70000"] {
            assert!(check_address(bad).unwrap_err().contains("is not host:port"), "{bad}");
        }
        // What would corrupt the stored address book, or cannot be dialled.
        for bad in [
            "10.0.0.4:7070,10.0.0.5:7070",
            "a=b:1",
            "h x:1",
            "h\n:1",
            "[]:1",
            "[x]:1",
        ] {
            assert!(check_address(bad).unwrap_err().contains("not a host name"), "{bad}");
        }
        for bad in ["0.0.0.0:7070", "[::]:7070"] {
            assert!(check_address(bad).unwrap_err().contains("unspecified"), "{bad}");
        }
        assert!(check_address(&format!("{}:1", "h".repeat(300)))
            .unwrap_err()
            .contains("limit is 255"));
    }

    #[test]
    fn the_joined_file_round_trips_and_bad_files_name_the_field() {
        let j = Joined {
            node_id: 4,
            cluster_id: 99,
            params: BootstrapParams {
                initial_cluster: InitialCluster { nodes: initial() },
                shard_count: 64,
                replication_factor: 3,
            },
            nodes: (1..=4).map(|n| (n, format!("10.0.0.{n}:7070"))).collect(),
        };
        assert_eq!(Joined::decode(&j.encode()), Ok(j.clone()));
        let text = j.encode().replace("shard_count=64\n", "");
        assert!(Joined::decode(&text).unwrap_err().contains("shard_count is missing"));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        crate::node::write_durably(&dir.path().join(JOINED_FILE), j.encode().as_bytes()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(j));
        let t = token(dir.path()).unwrap();
        assert!(t != 0 && token(dir.path()).unwrap() == t, "the token is kept");
    }
}
