//! One scenario: a fresh cluster, the workload and one kind of fault for
//! the time limit, then heal, let the replicas converge, read every
//! replica's final state, and check.

use super::cluster::{self, Cluster};
use super::membership;
use super::nemesis::{self, Fault};
use super::recorder::Recorder;
use super::{subscriber, workload};
use crate::checker::{check, Anomaly, Finals};
use crate::history::{Kind, F};
use pigeonhole_proto::v1 as pb;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rounds of final reads before giving up on a stable applied state.
const FINAL_READ_ROUNDS_MAX: usize = 10;

/// Mailboxes per shard: few, so appends contend.
pub const MAILBOXES_PER_SHARD: usize = 3;

/// Subscribe readers per scenario (each follows every mailbox).
pub const SUBSCRIBE_READERS: u64 = 2;

/// What a scenario runs.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name in the report.
    pub name: String,
    /// Faults drawn from (empty: none).
    pub faults: Vec<Fault>,
    /// Nodes at the start.
    pub nodes: u64,
    /// Nodes it may grow to (the `membership` fault adds and removes).
    pub slots: u64,
    /// phctl, for the `membership` fault.
    pub phctl: Option<PathBuf>,
    /// The server binary.
    pub server: PathBuf,
    /// True for the planted-bug run: it passes only if anomalies are found.
    pub expect_anomalies: bool,
}

/// What a scenario found.
#[derive(Debug)]
pub struct Outcome {
    /// Scenario name.
    pub name: String,
    /// Client operations completed: ok, fail, info.
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
    /// Nemesis events.
    pub faults: usize,
    /// Anomalies found (or the harness error, as one anomaly).
    pub anomalies: Vec<Anomaly>,
    /// Whether the scenario met its expectation.
    pub passed: bool,
    /// Seconds from heal to converged replicas.
    pub converge_s: f64,
    /// Replicas the servers deleted as stale (removed while their node was
    /// away), summed over the nodes left at the end, each counted since its
    /// last start (NodeStatus `stale_replicas_deleted`).
    pub stale_deleted: u64,
    /// Replica reads after power losses and corruption, each checked to
    /// be a prefix of the final log (`checker::check_interim`).
    pub interim_reads: usize,
}

/// Runs one scenario in `dir`.
pub async fn scenario(s: &Scenario, seed: u64, time_limit: Duration, concurrency: u64, dir: &Path) -> Outcome {
    let mut out = Outcome {
        name: s.name.clone(),
        ok: 0,
        fail: 0,
        info: 0,
        faults: 0,
        anomalies: Vec::new(),
        passed: false,
        converge_s: 0.0,
        stale_deleted: 0,
        interim_reads: 0,
    };
    match inner(s, seed, time_limit, concurrency, dir, &mut out).await {
        Ok(anomalies) => out.anomalies = anomalies,
        Err(e) => out.anomalies.push(Anomaly {
            kind: "harness-error",
            mailbox: None,
            detail: e,
        }),
    }
    let harness_failed = out.anomalies.iter().any(|a| a.kind == "harness-error");
    out.passed = if s.expect_anomalies {
        !harness_failed && out.anomalies.iter().any(|a| a.kind != "harness-error")
    } else {
        out.anomalies.is_empty()
    };
    let report: String = out
        .anomalies
        .iter()
        .map(|a| format!("{} {} {}\n", a.kind, a.mailbox.as_deref().unwrap_or("-"), a.detail))
        .collect();
    let _ = std::fs::write(dir.join("anomalies.txt"), report);
    out
}

async fn inner(
    s: &Scenario,
    seed: u64,
    time_limit: Duration,
    concurrency: u64,
    dir: &Path,
    out: &mut Outcome,
) -> Result<Vec<Anomaly>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let lostfs = s.faults.iter().any(|f| f.loses_writes());
    let mut c = Cluster::start_on(s.nodes, s.slots, &s.server, dir, lostfs)?;
    c.phctl = s.phctl.clone();
    cluster::wait_ready(&c.occupied(), Duration::from_secs(60)).await?;
    let map = {
        let mut admin = pb::admin_client::AdminClient::new(cluster::channel(1)?);
        admin
            .get_shard_map(pb::GetShardMapRequest {})
            .await
            .map_err(|e| format!("shard map: {e:?}"))?
            .into_inner()
    };
    let mbs = Arc::new(workload::mailboxes(&map, MAILBOXES_PER_SHARD));
    let rec = Arc::new(Recorder::new(&dir.join("history.jsonl"))?);
    let stop = Arc::new(AtomicBool::new(false));
    let mut procs = tokio::task::JoinSet::new();
    for p in 0..concurrency {
        let node = p % s.nodes + 1;
        procs.spawn(workload::process(
            p,
            node,
            Arc::clone(&mbs),
            Arc::clone(&rec),
            seed,
            Arc::clone(&stop),
        ));
    }
    // Subscribe readers, process ids after the workload's, starting on
    // different nodes.
    for r in 0..SUBSCRIBE_READERS {
        procs.spawn(subscriber::reader(
            concurrency + r,
            r % s.nodes + 1,
            s.nodes,
            Arc::clone(&mbs),
            Arc::clone(&rec),
            Arc::clone(&stop),
        ));
    }
    let until = Instant::now() + time_limit;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut interim = crate::checker::Interim::new();
    let nem = nemesis::run(&s.faults, &mut c, &rec, &mut rng, until, &mbs, &mut interim).await;
    out.interim_reads = interim.len();
    // Whatever happened, heal before stopping the clients, so their last
    // operations can complete.
    let healed = nemesis::heal(&mut c);
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = procs.join_next().await {
        r.map_err(|e| format!("client task: {e}"))??;
    }
    nem?;
    healed?;
    // Every node must be back: one that exits on its own after the heal
    // (it cannot recover its disk, it crashes) is an anomaly, and the
    // final reads cannot be made.
    let exited = c.exited();
    if !exited.is_empty() {
        c.stop();
        count(out, &rec.ops());
        return Ok(exited
            .into_iter()
            .map(|(i, why)| Anomaly {
                kind: "node-lost",
                mailbox: None,
                detail: format!("node {i} did not come back after the faults were healed: {why}"),
            })
            .collect());
    }
    if s.faults.contains(&Fault::Membership) {
        membership::settle(&mut c).await?;
    }
    // A proposal whose client gave up can still commit after the clients
    // stopped (it may sit in a queue across a partition). The final reads
    // must all see one applied state: read, then check that no shard's
    // applied index moved meanwhile; if one did, read again.
    let healed_at = Instant::now();
    let mut finals = Finals::new();
    let mut stable = false;
    // Replicas that never agree on one applied state are an anomaly of
    // their own (a planted early answer leaves them so: a follower holds
    // entries a leader overwrote under its commit index); the final reads
    // are then made as they stand, for the checker to say what was lost.
    let mut no_convergence: Option<String> = None;
    for _ in 0..FINAL_READ_ROUNDS_MAX {
        let before = match cluster::wait_converged(&c.occupied(), Duration::from_secs(90)).await {
            Ok(b) => b,
            Err(e) => {
                no_convergence = Some(e);
                finals = Finals::new();
                for i in c.occupied() {
                    if let Ok(logs) = nemesis::replica_logs(i, &mbs, Duration::from_secs(10)).await {
                        finals.insert(i, logs);
                    }
                }
                break;
            }
        };
        if out.converge_s == 0.0 {
            out.converge_s = healed_at.elapsed().as_secs_f64();
        }
        finals = Finals::new();
        for i in c.occupied() {
            // A node that finds damage on this read fails it and repairs
            // itself (D50): read again for a while.
            finals.insert(i, nemesis::replica_logs(i, &mbs, Duration::from_secs(90)).await?);
        }
        let after = cluster::wait_converged(&c.occupied(), Duration::from_secs(90)).await?;
        if before == after {
            stable = true;
            break;
        }
    }
    if !stable && no_convergence.is_none() {
        return Err(format!(
            "the applied state kept moving across {FINAL_READ_ROUNDS_MAX} rounds of final reads"
        ));
    }
    for i in c.occupied() {
        if let Some(st) = cluster::status(i).await {
            out.stale_deleted += st.stale_replicas_deleted;
        }
    }
    c.stop();
    let ops = rec.ops();
    count(out, &ops);
    let mut anomalies = check(&ops, &finals);
    anomalies.extend(crate::checker::check_interim(&finals, &interim));
    if let Some(e) = no_convergence {
        anomalies.push(Anomaly {
            kind: "no-convergence",
            mailbox: None,
            detail: e,
        });
    }
    Ok(anomalies)
}

/// The outcome's operation and fault counts.
fn count(out: &mut Outcome, ops: &[crate::history::Op]) {
    for o in ops {
        match (o.f, o.kind) {
            (F::Nemesis, Kind::Invoke) => out.faults += 1,
            (F::Nemesis, _) | (_, Kind::Invoke) => {}
            (_, Kind::Ok) => out.ok += 1,
            (_, Kind::Fail) => out.fail += 1,
            (_, Kind::Info) => out.info += 1,
        }
    }
}
