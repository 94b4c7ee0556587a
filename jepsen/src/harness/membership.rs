//! The `membership` fault: the node set changes under the clients, the way
//! an SRE changes it, through `phctl` and `pigeonhole --join`. Each cycle
//! makes one change:
//!
//! | change | how | when |
//! | --- | --- | --- |
//! | join | a new, empty node starts with `--join` in the lowest free slot; the servers' placement loop then moves replicas and leaderships onto it | a slot is free |
//! | drain and remove | `phctl node drain N`, then `phctl node remove N`; the process is then stopped for good | more than [`NODES_MIN`] nodes |
//! | kill and force-remove | SIGKILL, then `phctl node remove N --force` (its replicas rebuilt from the survivors) | more than [`NODES_MIN`] nodes |
//! | split | `phctl shard split S` on a random shard (D38: in place, the upper half of its range becomes a new shard) | one cycle in four, while fewer than [`SHARDS_MAX`] shards |
//!
//! A drain or forced removal cut short (its deadline passed) leaves the node
//! draining in the cluster and running here; the next membership cycle
//! finishes it first, as an SRE would run the command again. Only a node the
//! cluster reports removed leaves the harness, so the final reads and the
//! convergence check always cover every replica the cluster still lists.
//!
//! Before the final reads, [`settle`] pauses the placement loop and waits
//! for its moves in flight to end, so that the replicas stop changing; the
//! checker then reads every node that is left.

use super::cluster::{self, Cluster, PORT};
use super::net;
use pigeonhole_proto::v1 as pb;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use std::time::{Duration, Instant};

/// Nodes kept at least: every shard has three replicas, and a node leaving
/// needs a node without one to take its replicas.
pub const NODES_MIN: usize = 3;
/// How long one drain, or the rebuilds of one forced removal, may take.
const CHANGE_MS_MAX: u64 = 60_000;
/// How long a joining node may take to be given its id.
const JOIN_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long [`settle`] waits for the placement loop's moves to end.
const SETTLE_WAIT_MAX: Duration = Duration::from_secs(90);
/// Shards the nemesis splits up to (every split adds one).
pub const SHARDS_MAX: usize = 24;

/// Makes one change to the node set; returns what it did, for the history.
pub async fn change(c: &mut Cluster, rng: &mut StdRng) -> Result<String, String> {
    learn_ids(c).await;
    // A leave cut short is finished first.
    if let Some(slot) = c
        .occupied()
        .into_iter()
        .find(|s| c.member(*s).is_some_and(|m| m.leaving))
    {
        return leave(c, slot, false).await;
    }
    if rng.gen_bool(0.25) {
        if let Some(done) = split(c, rng).await? {
            return Ok(done);
        }
    }
    let slots = c.occupied();
    let can_leave = slots.len() > NODES_MIN;
    let free = c.free_slot();
    let pick = match (free, can_leave) {
        (Some(s), false) => return join(c, s).await,
        (None, false) => return Ok("membership: no change possible".into()),
        (Some(s), true) if rng.gen_bool(0.4) => return join(c, s).await,
        _ => rng.gen_range(0..2),
    };
    // Only a node whose id is known can be named to phctl.
    let known: Vec<u64> = slots.into_iter().filter(|s| c.id_of(*s) != 0).collect();
    let Some(slot) = known.choose(rng).copied() else {
        return Ok("membership: no node with a known id to take out".into());
    };
    leave(c, slot, pick == 1).await
}

/// Starts a node in `slot` with `--join` and waits for its id.
async fn join(c: &mut Cluster, slot: u64) -> Result<String, String> {
    c.join(slot)?;
    let deadline = Instant::now() + JOIN_WAIT_MAX;
    while Instant::now() < deadline {
        if let Some(id) = cluster::status(slot).await.map(|s| s.node_id).filter(|id| *id != 0) {
            c.set_id(slot, id);
            return Ok(format!("join: slot {slot} is node {id}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(format!(
        "join: slot {slot} started, no id within {} s (learnt later)",
        JOIN_WAIT_MAX.as_secs()
    ))
}

/// Takes the node in `slot` out: drain then remove, or (`force`) kill then
/// remove with `--force`. Marks it leaving until the cluster has removed it.
async fn leave(c: &mut Cluster, slot: u64, force: bool) -> Result<String, String> {
    let id = c.id_of(slot);
    c.set_leaving(slot, true);
    let wait = CHANGE_MS_MAX.to_string();
    let (how, result) = if force {
        c.kill(slot);
        let r = phctl(
            c,
            slot,
            &["node", "remove", &id.to_string(), "--force", "--wait-ms", &wait],
        )
        .await?;
        ("kill -9, then remove --force", r)
    } else {
        let drained = phctl(c, slot, &["node", "drain", &id.to_string(), "--wait-ms", &wait]).await?;
        match drained {
            Ok(_) => (
                "drain, then remove",
                phctl(c, slot, &["node", "remove", &id.to_string()]).await?,
            ),
            Err(e) => ("drain", Err(e)),
        }
    };
    Ok(match result {
        Ok(_) => {
            c.retire(slot);
            format!("leave: node {id} (slot {slot}) {how}: removed")
        }
        // The node stays (restarted at heal if it was killed), draining;
        // the next membership cycle finishes the job.
        Err(e) => format!("leave: node {id} (slot {slot}) {how}: cut short ({e}); finished later"),
    })
}

/// Splits a random shard (None when there are [`SHARDS_MAX`] already, or
/// the shard list cannot be read: the cycle makes another change).
async fn split(c: &Cluster, rng: &mut StdRng) -> Result<Option<String>, String> {
    let Ok(list) = phctl(c, 0, &["shard", "list", "-o", "json"]).await? else {
        return Ok(None);
    };
    let ids: Vec<u64> = serde_json::from_str::<serde_json::Value>(&list)
        .ok()
        .and_then(|doc| {
            doc.get("shards")?
                .as_array()
                .map(|a| a.iter().filter_map(|s| s.get("id")?.as_u64()).collect())
        })
        .unwrap_or_default();
    if ids.is_empty() || ids.len() >= SHARDS_MAX {
        return Ok(None);
    }
    let Some(shard) = ids.choose(rng).copied() else {
        return Ok(None);
    };
    Ok(Some(
        match phctl(c, 0, &["shard", "split", &shard.to_string()]).await? {
            Ok(out) => format!("split: {out}"),
            Err(e) => format!("split: shard {shard}: {e}"),
        },
    ))
}

/// Runs phctl against every occupied slot but `except`: Ok(stdout) on exit
/// 0, Err(its last line of output) otherwise. Err(..) of the outer result
/// only when phctl cannot be run at all.
async fn phctl(c: &Cluster, except: u64, args: &[&str]) -> Result<Result<String, String>, String> {
    let bin = c.phctl.as_ref().ok_or("the membership fault needs phctl (--phctl)")?;
    let endpoints: Vec<String> = c
        .occupied()
        .into_iter()
        .filter(|s| *s != except)
        .map(|s| format!("{}:{PORT}", net::node_ip(s)))
        .collect();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--endpoints").arg(endpoints.join(","));
    if let Some(t) = cluster::tls() {
        cmd.arg("--tls-ca").arg(&t.client.ca);
        if let (Some(cert), Some(key)) = (&t.client.cert, &t.client.key) {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
    }
    let out = cmd
        .args(args)
        .output()
        .await
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    if out.status.success() {
        Ok(Ok(text(&out.stdout)))
    } else {
        let err = text(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_string();
        Ok(Err(format!("phctl {} exited {}: {last}", args.join(" "), out.status)))
    }
}

/// Learns the ids of joined nodes that did not answer in time.
async fn learn_ids(c: &mut Cluster) {
    for slot in c.occupied() {
        if c.id_of(slot) == 0 {
            if let Some(id) = cluster::status(slot).await.map(|s| s.node_id).filter(|id| *id != 0) {
                c.set_id(slot, id);
            }
        }
    }
}

/// Pauses the placement loop and waits until no move is in flight, so that
/// the final reads see replicas that no longer change. Err if the moves do
/// not end within [`SETTLE_WAIT_MAX`].
pub async fn settle(c: &mut Cluster) -> Result<(), String> {
    learn_ids(c).await;
    let deadline = Instant::now() + SETTLE_WAIT_MAX;
    let mut paused = false;
    let mut last = String::new();
    while Instant::now() < deadline {
        for slot in c.occupied() {
            let Ok(ch) = cluster::channel(slot) else { continue };
            let mut admin = pb::admin_client::AdminClient::new(ch);
            if !paused {
                let r = admin
                    .set_placement(pb::SetPlacementRequest {
                        paused: Some(true),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(_) => paused = true,
                    Err(e) => {
                        last = format!("pause: {e:?}");
                        continue;
                    }
                }
            }
            match admin.get_placement(pb::GetPlacementRequest {}).await {
                Ok(p) => {
                    let p = p.into_inner();
                    if p.paused && p.in_flight.is_empty() {
                        return Ok(());
                    }
                    last = format!("{} move(s) in flight", p.in_flight.len());
                }
                Err(e) => last = format!("placement: {e:?}"),
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!(
        "the placement loop's moves did not end within {} s after the faults: {last}",
        SETTLE_WAIT_MAX.as_secs()
    ))
}
