//! The nemesis: faults, applied in cycles (quiet, fault, heal) from a seeded
//! random source, each start and end recorded in the history.
//!
//! | fault | what it does |
//! | --- | --- |
//! | `partition-leader` | cuts the leader of a random shard off from every other node |
//! | `partition-majority` | splits the nodes into a majority and a minority |
//! | `partition-one-way` | drops traffic from one node to another, one direction only |
//! | `partition-bridge` | (5 nodes) two halves that only the middle node joins |
//! | `partition-ring` | (5 nodes) each node reaches only its two ring neighbours |
//! | `kill` | SIGKILL a random node, restart it at heal |
//! | `pause` | SIGSTOP a random node, SIGCONT at heal |
//! | `pause-kill` | SIGSTOP, then SIGKILL while stopped, restart at heal (Jepsen's NATS pattern) |
//! | `clock` | skew a random node's wall clock by up to ±60 s (libfaketime), or jump it |
//! | `transfer` | move a random shard's leadership to another voter |
//! | `move` | (4 nodes) move a random shard's replica to the node without one: learner, catch-up, leadership away, one joint change (the old node then deletes its copy); a move cut short is finished by the next |
//! | `corrupt` | SIGKILL a random node (one still repairing, if any), damage a Raft log segment, an SST or the MANIFEST (bits flipped, a range zeroed, a file cut short; [`super::corrupt`]), restart it at heal |
//! | `membership` | (3 nodes, room for 5) a node joins, or one is drained and removed, or one is killed and removed with `--force` ([`super::membership`]); the servers' placement loop moves replicas meanwhile |
//!
//! Clients stay connected to every node throughout (the rules drop traffic
//! between nodes only), so they see what a partitioned node answers.

use super::cluster::{self, Cluster, SHARDS};
use super::membership;
use super::net;
use super::recorder::Recorder;
use crate::history::{Kind, Op, F, NEMESIS};
use pigeonhole_proto::v1 as pb;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use std::time::Duration;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    PartitionLeader,
    PartitionMajority,
    PartitionOneWay,
    PartitionBridge,
    PartitionRing,
    Kill,
    Pause,
    PauseKill,
    Clock,
    Transfer,
    Move,
    Membership,
    /// A power cut on one node (its unsynced writes are lost).
    PowerLoss,
    /// A power cut on a minority of the nodes at once.
    PowerLossMinority,
    /// A power cut on every node at once: the whole cluster.
    PowerLossAll,
    /// Damage to one node's Raft log while it is down (a minority).
    Corrupt,
}

/// Every fault, in the order scenarios run.
pub const ALL: [Fault; 16] = [
    Fault::PartitionLeader,
    Fault::PartitionMajority,
    Fault::PartitionOneWay,
    Fault::PartitionBridge,
    Fault::PartitionRing,
    Fault::Kill,
    Fault::Pause,
    Fault::PauseKill,
    Fault::Clock,
    Fault::Transfer,
    Fault::Move,
    Fault::Membership,
    Fault::PowerLoss,
    Fault::PowerLossMinority,
    Fault::PowerLossAll,
    Fault::Corrupt,
];

impl Fault {
    /// Its name on the command line and in the history.
    pub fn name(self) -> &'static str {
        match self {
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionMajority => "partition-majority",
            Fault::PartitionOneWay => "partition-one-way",
            Fault::PartitionBridge => "partition-bridge",
            Fault::PartitionRing => "partition-ring",
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::PauseKill => "pause-kill",
            Fault::Clock => "clock",
            Fault::Transfer => "transfer",
            Fault::Move => "move",
            Fault::Membership => "membership",
            Fault::PowerLoss => "power-loss",
            Fault::PowerLossMinority => "power-loss-minority",
            Fault::PowerLossAll => "power-loss-all",
            Fault::Corrupt => "corrupt",
        }
    }

    /// Whether the fault needs the nodes' data on lost-write file systems.
    pub fn loses_writes(self) -> bool {
        matches!(self, Fault::PowerLoss | Fault::PowerLossMinority | Fault::PowerLossAll)
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Fault> {
        ALL.into_iter().find(|f| f.name() == s)
    }

    /// Nodes the fault needs.
    pub fn nodes(self) -> u64 {
        match self {
            Fault::PartitionBridge | Fault::PartitionRing => 5,
            // A replica can only move to a node without one: 3 replicas, 4 nodes.
            Fault::Move => 4,
            _ => 3,
        }
    }

    /// Nodes the cluster may grow to (network slots).
    pub fn slots(self) -> u64 {
        match self {
            Fault::Membership => super::cluster::SLOTS_MAX,
            f => f.nodes(),
        }
    }
}

fn event(rec: &Recorder, kind: Kind, what: String) {
    let mut o = Op::new(NEMESIS, kind, F::Nemesis);
    o.nemesis = Some(what);
    rec.record(o);
}

/// Cuts both directions between every node of `a` and every node of `b`.
fn cut(a: &[u64], b: &[u64]) -> Result<(), String> {
    for x in a {
        for y in b {
            net::block(*x, *y)?;
            net::block(*y, *x)?;
        }
    }
    Ok(())
}

/// Applies one fault; returns what it did (for the history).
async fn apply(f: Fault, c: &mut Cluster, rng: &mut StdRng) -> Result<String, String> {
    let nodes: Vec<u64> = c.occupied();
    let pick = |rng: &mut StdRng| nodes.choose(rng).copied().unwrap_or(1);
    Ok(match f {
        Fault::PartitionLeader => {
            let shard = rng.gen_range(1..=SHARDS);
            let leader = match cluster::leader_of(&nodes, shard).await {
                Some(l) => l,
                None => pick(rng),
            };
            let rest: Vec<u64> = nodes.iter().copied().filter(|n| *n != leader).collect();
            cut(&[leader], &rest)?;
            format!("isolate node {leader} (leader of shard {shard})")
        }
        Fault::PartitionMajority => {
            let mut shuffled = nodes.clone();
            shuffled.shuffle(rng);
            let (minority, majority) = shuffled.split_at(nodes.len() / 2);
            cut(minority, majority)?;
            format!("split {minority:?} | {majority:?}")
        }
        Fault::PartitionOneWay => {
            let from = pick(rng);
            let to = loop {
                let t = pick(rng);
                if t != from {
                    break t;
                }
            };
            net::block(from, to)?;
            format!("drop {from} -> {to}")
        }
        Fault::PartitionBridge => {
            let mut s = nodes.clone();
            s.shuffle(rng);
            // [a, b] - c - [d, e]: c is the bridge.
            let (left, rest) = s.split_at(2);
            let right = rest.get(1..).unwrap_or(&[]);
            cut(left, right)?;
            format!("bridge {left:?} - {:?} - {right:?}", rest.first())
        }
        Fault::PartitionRing => {
            let mut s = nodes.clone();
            s.shuffle(rng);
            let n = s.len();
            for (i, x) in s.iter().enumerate() {
                for (j, y) in s.iter().enumerate() {
                    let d = (i + n - j) % n;
                    if i != j && d != 1 && d != n - 1 {
                        net::block(*y, *x)?;
                    }
                }
            }
            format!("ring {s:?}")
        }
        Fault::Kill => {
            let n = pick(rng);
            c.kill(n);
            format!("kill -9 node {n}")
        }
        Fault::Corrupt => {
            // One node: a minority of three. Restarted at heal. A node
            // still catching up from an earlier damage is damaged again
            // rather than a second one: damage stays on a minority until
            // it is repaired (two replicas of a shard catching up at once
            // leave it without a majority that may vote, by design, D49).
            let mut n = pick(rng);
            for i in &nodes {
                if cluster::status(*i)
                    .await
                    .is_some_and(|s| !s.catching_up_shards.is_empty())
                {
                    n = *i;
                }
            }
            c.kill(n);
            let data = c
                .member(n)
                .map(|m| m.data.clone())
                .ok_or_else(|| format!("node {n} has no data dir"))?;
            let what = super::corrupt::damage(&data, rng)?;
            format!("kill -9 node {n}, then damage: {what}")
        }
        Fault::PowerLoss | Fault::PowerLossMinority | Fault::PowerLossAll => {
            let mut hit = nodes.clone();
            hit.shuffle(rng);
            hit.truncate(match f {
                Fault::PowerLoss => 1,
                Fault::PowerLossMinority => (nodes.len().saturating_sub(1) / 2).max(1),
                _ => nodes.len(),
            });
            // Every machine goes dark before any disk is cut: no node
            // writes in between.
            for n in &hit {
                c.kill(*n);
            }
            let mut what = Vec::new();
            for n in &hit {
                let tear = Some((rng.gen::<u64>(), rng.gen_range(0..4096)));
                let l = c.power_loss(*n, tear)?;
                what.push(format!(
                    "node {n}: {} files, {} pages, {} names lost{}",
                    l.files,
                    l.pages,
                    l.names,
                    l.torn
                        .map(|(p, page, b)| format!(", page {page} of {} torn at {b} bytes", p.display()))
                        .unwrap_or_default()
                ));
            }
            format!("power cut: {}", what.join("; "))
        }
        Fault::Pause => {
            let n = pick(rng);
            c.pause(n)?;
            format!("SIGSTOP node {n}")
        }
        Fault::PauseKill => {
            let n = pick(rng);
            c.pause(n)?;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2_000))).await;
            c.kill(n);
            format!("SIGSTOP then kill -9 node {n}")
        }
        Fault::Clock => {
            let n = pick(rng);
            let offset: i64 = if rng.gen_bool(0.5) {
                rng.gen_range(-60..=60)
            } else {
                // A jump: far ahead or behind.
                if rng.gen_bool(0.5) {
                    3_600
                } else {
                    -3_600
                }
            };
            c.set_clock(n, offset)?;
            format!("clock of node {n} {offset:+} s")
        }
        Fault::Transfer => {
            let shard = rng.gen_range(1..=SHARDS);
            let Some(leader) = cluster::leader_of(&nodes, shard).await else {
                return Ok(format!("transfer shard {shard}: no leader to ask"));
            };
            let to = loop {
                let t = pick(rng);
                if t != leader {
                    break t;
                }
            };
            let mut admin = pb::admin_client::AdminClient::new(cluster::channel(leader)?);
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                admin.transfer_leader(pb::TransferLeaderRequest {
                    shard,
                    to_node: c.id_of(to),
                }),
            )
            .await;
            format!(
                "transfer shard {shard} from {leader} to {to}: {}",
                match r {
                    Ok(Ok(_)) => "started".to_string(),
                    Ok(Err(s)) => format!("{:?}", s.code()),
                    Err(_) => "no answer".to_string(),
                }
            )
        }
        // The move scenario never joins nodes: slot = node id.
        Fault::Move => move_replica(&nodes, rng.gen_range(1..=SHARDS), rng).await?,
        Fault::Membership => membership::change(c, rng).await?,
    })
}

/// Moves one replica of `shard` to a node without one, with the admin
/// primitives the way `phctl shard move` does; finishes a move an earlier
/// cycle left with a learner. Every refusal or timeout is described, not
/// fatal: the next cycle picks up from the configuration it finds.
async fn move_replica(nodes: &[u64], shard: u64, rng: &mut StdRng) -> Result<String, String> {
    let Some(leader) = cluster::leader_of(nodes, shard).await else {
        return Ok(format!("move shard {shard}: no leader to ask"));
    };
    let conf = |s: Option<pb::NodeStatusResponse>| {
        s.and_then(|s| s.replicas.into_iter().find(|r| r.shard == shard))
            .map(|r| (r.voters, r.learners, r.commit_index))
    };
    let Some((voters, learners, commit)) = conf(cluster::status(leader).await) else {
        return Ok(format!("move shard {shard}: leader {leader} did not answer"));
    };
    let to = match learners.first() {
        Some(l) => *l,
        None => match nodes.iter().copied().find(|n| !voters.contains(n)) {
            Some(n) => n,
            None => return Ok(format!("move shard {shard}: every node holds it")),
        },
    };
    let candidates: Vec<u64> = voters.iter().copied().filter(|v| *v != to).collect();
    let Some(from) = candidates.choose(rng).copied() else {
        return Ok(format!("move shard {shard}: no voter to move"));
    };
    let change = |kind: pb::MembershipChangeKind, node: u64| pb::MembershipChange {
        kind: kind as i32,
        node,
    };
    let call = |at: u64, changes: Vec<pb::MembershipChange>| async move {
        let mut admin = pb::admin_client::AdminClient::new(cluster::channel(at)?);
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            admin.change_membership(pb::ChangeMembershipRequest { shard, changes }),
        )
        .await;
        match r {
            Ok(Ok(_)) => Ok::<_, String>(None),
            Ok(Err(s)) => Ok(Some(format!("{:?} {}", s.code(), s.message()))),
            Err(_) => Ok(Some("no answer".to_string())),
        }
    };
    let what = format!("move shard {shard} from node {from} to node {to}");
    if learners.is_empty() {
        if let Some(e) = call(leader, vec![change(pb::MembershipChangeKind::AddLearner, to)]).await? {
            return Ok(format!("{what}: add learner: {e}"));
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if conf_applied(cluster::status(to).await, shard) >= commit {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Ok(format!(
                "{what}: learner did not catch up in 10 s (left for a later cycle)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut leader = leader;
    if leader == from {
        let Some(next) = voters.iter().copied().find(|v| *v != from && *v != to) else {
            return Ok(format!("{what}: no other voter to lead"));
        };
        let mut admin = pb::admin_client::AdminClient::new(cluster::channel(from)?);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            admin.transfer_leader(pb::TransferLeaderRequest { shard, to_node: next }),
        )
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match cluster::leader_of(nodes, shard).await {
                Some(l) if l != from => {
                    leader = l;
                    break;
                }
                _ if std::time::Instant::now() > deadline => {
                    return Ok(format!("{what}: leadership did not leave node {from}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let joint = vec![
        change(pb::MembershipChangeKind::AddVoter, to),
        change(pb::MembershipChangeKind::Remove, from),
    ];
    Ok(match call(leader, joint).await? {
        None => format!("{what}: done"),
        Some(e) => format!("{what}: promote and remove: {e}"),
    })
}

/// The applied index of `shard` in a NodeStatus (0 without a replica).
fn conf_applied(s: Option<pb::NodeStatusResponse>, shard: u64) -> u64 {
    s.and_then(|s| s.replicas.into_iter().find(|r| r.shard == shard))
        .map_or(0, |r| r.applied_index)
}

/// Heals everything: rules flushed, processes resumed or restarted, clocks
/// reset.
pub fn heal(c: &mut Cluster) -> Result<(), String> {
    net::heal(c.slots)?;
    c.recover()
}

/// Runs fault cycles from `faults` until `until`.
///
/// After each heal of a fault that hits disks (power loss, corruption),
/// every node's replicas are read as they stand (STALE reads of what each
/// has applied) into `interim`: the checker requires each to be a prefix
/// of the final agreed log ([`crate::checker::check_interim`]).
pub async fn run(
    faults: &[Fault],
    c: &mut Cluster,
    rec: &Recorder,
    rng: &mut StdRng,
    until: std::time::Instant,
    mbs: &[super::workload::Mailbox],
    interim: &mut crate::checker::Interim,
) -> Result<(), String> {
    while std::time::Instant::now() < until {
        let quiet = Duration::from_millis(rng.gen_range(1_000..3_000));
        tokio::time::sleep(quiet.min(until.saturating_duration_since(std::time::Instant::now()))).await;
        if std::time::Instant::now() >= until {
            break;
        }
        let Some(f) = faults.choose(rng).copied() else { break };
        event(rec, Kind::Invoke, f.name().to_string());
        let what = apply(f, c, rng).await?;
        event(rec, Kind::Info, what);
        let hold = Duration::from_millis(rng.gen_range(2_000..5_000));
        tokio::time::sleep(hold).await;
        heal(c)?;
        event(rec, Kind::Info, format!("heal {}", f.name()));
        if f.loses_writes() || f == Fault::Corrupt {
            for i in c.occupied() {
                if let Ok(logs) = replica_logs(i, mbs, Duration::from_secs(20)).await {
                    interim.push((format!("after {} (event {})", f.name(), rec.ops().len()), i, logs));
                }
            }
        }
    }
    Ok(())
}

/// Node `i`'s replicas of every mailbox, as it has applied them, once it
/// answers after a restart, or after it repaired damage it found (a read
/// that finds damage fails, and the node rebuilds): within `within`, else
/// the last error.
pub async fn replica_logs(
    i: u64,
    mbs: &[super::workload::Mailbox],
    within: Duration,
) -> Result<std::collections::BTreeMap<String, Vec<crate::history::Msg>>, String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match super::workload::final_logs(i, mbs).await {
            Ok(logs) => return Ok(logs),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
