//! `pigeonhole-jepsen`: runs fault scenarios against real `pigeonhole`
//! processes and checks the histories. This file parses flags and splits
//! the run in two:
//!
//! - the **outer** process (in the root namespace) checks the machine, makes
//!   the network namespaces, runs the inner process inside the clients'
//!   namespace, and afterwards — also after Ctrl-C or a crash of the inner
//!   one — kills stray servers and deletes every namespace it made;
//! - the **inner** process (`--inner`) runs the scenarios and prints the
//!   summary: a table, then `N passed, M failed`. Exit 0 only when every
//!   scenario passed.

use clap::Parser;
use pigeonhole_jepsen::harness::nemesis::{Fault, ALL};
use pigeonhole_jepsen::harness::net;
use pigeonhole_jepsen::harness::run::{self, Scenario};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Jepsen-style fault testing of a Pigeonhole cluster.
#[derive(Debug, Parser)]
#[command(name = "pigeonhole-jepsen")]
struct Flags {
    /// The server binary [default: `pigeonhole` beside this binary].
    #[arg(long)]
    server: Option<PathBuf>,
    /// phctl, for the membership fault [default: `phctl` beside this binary].
    #[arg(long)]
    phctl: Option<PathBuf>,
    /// A server built with the planted bug (scripts/jepsen builds one): adds
    /// a scenario that passes only if the checker catches it.
    #[arg(long)]
    planted_server: Option<PathBuf>,
    /// A server built with the planted lazy fsync (appends acknowledged
    /// before their fsync; scripts/jepsen builds one): adds a whole-cluster
    /// power-cut scenario that passes only if the checker catches it.
    #[arg(long)]
    planted_lazy_fsync: Option<PathBuf>,
    /// A server built with the planted early answer (a leader commits what
    /// only it holds; scripts/jepsen builds one): adds a leader-isolation
    /// scenario that passes only if the checker catches it.
    #[arg(long)]
    planted_answer_before_commit: Option<PathBuf>,
    /// Faults: `all`, `none`, or a comma-separated list of
    /// partition-leader, partition-majority, partition-one-way,
    /// partition-bridge, partition-ring, kill, pause, pause-kill, clock,
    /// transfer, move, membership, power-loss, power-loss-minority,
    /// power-loss-all, corrupt. Each fault is its own scenario; `all`
    /// adds a `mixed` one (the 3-node faults) and a `membership-mixed` one
    /// (node-set changes among kills and partitions).
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Run only these scenarios (comma-separated names, as in the summary),
    /// e.g. `--only membership-mixed` to replay one with its seed.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seconds of workload and faults per scenario.
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Random seed (printed; pass it again to replay the same faults).
    #[arg(long)]
    seed: Option<u64>,
    /// Client processes.
    #[arg(long, default_value_t = 6)]
    concurrency: u64,
    /// Where histories, server logs and anomaly reports go.
    #[arg(long, default_value = "jepsen-runs")]
    out: PathBuf,
    /// Run the cluster in plaintext (`--insecure`) instead of TLS. By
    /// default the harness makes a CA and certificates for the run
    /// (`<out>/certs`) and every node, client and phctl call uses TLS.
    #[arg(long)]
    plaintext: bool,
    /// Internal: run the scenarios (inside the clients' namespace).
    #[arg(long, hide = true)]
    inner: bool,
}

/// The scenarios to run, each with its position in the whole list (its
/// seed is the run's seed plus that position, so `--only` replays it).
fn scenarios(f: &Flags, server: &std::path::Path, phctl: &std::path::Path) -> Result<Vec<(usize, Scenario)>, String> {
    let phctl = Some(phctl.to_path_buf());
    let faults: Vec<Fault> = match f.nemesis.as_str() {
        "all" => ALL.to_vec(),
        "none" => Vec::new(),
        list => list
            .split(',')
            .map(|n| Fault::parse(n.trim()).ok_or_else(|| format!("unknown fault {n:?}")))
            .collect::<Result<_, _>>()?,
    };
    let mut out: Vec<Scenario> = Vec::new();
    if faults.is_empty() {
        out.push(Scenario {
            name: "none".into(),
            faults: vec![],
            nodes: 3,
            slots: 3,
            phctl: phctl.clone(),
            server: server.to_path_buf(),
            expect_anomalies: false,
        });
    }
    for fault in &faults {
        out.push(Scenario {
            name: fault.name().into(),
            faults: vec![*fault],
            nodes: fault.nodes(),
            slots: fault.slots(),
            phctl: phctl.clone(),
            server: server.to_path_buf(),
            expect_anomalies: false,
        });
    }
    if f.nemesis == "all" {
        out.push(Scenario {
            name: "mixed".into(),
            faults: ALL.into_iter().filter(|f| f.nodes() == 3 && f.slots() == 3).collect(),
            nodes: 3,
            slots: 3,
            phctl: phctl.clone(),
            server: server.to_path_buf(),
            expect_anomalies: false,
        });
        out.push(Scenario {
            name: "membership-mixed".into(),
            faults: vec![
                Fault::Membership,
                Fault::Kill,
                Fault::PauseKill,
                Fault::PartitionMajority,
                Fault::PartitionLeader,
            ],
            nodes: 3,
            slots: Fault::Membership.slots(),
            phctl: phctl.clone(),
            server: server.to_path_buf(),
            expect_anomalies: false,
        });
    }
    // Each planted server, with the fault that must expose its bug.
    let planted = [
        (&f.planted_server, "planted-skip-dedup", Fault::Kill),
        (&f.planted_lazy_fsync, "planted-lazy-fsync", Fault::PowerLossAll),
        (
            &f.planted_answer_before_commit,
            "planted-answer-before-commit",
            Fault::PartitionLeader,
        ),
    ];
    for (path, name, fault) in planted {
        if let Some(p) = path {
            out.push(Scenario {
                name: name.into(),
                faults: vec![fault],
                nodes: 3,
                slots: 3,
                phctl: None,
                server: p.clone(),
                expect_anomalies: true,
            });
        }
    }
    if !f.only.is_empty() {
        let unknown: Vec<&String> = f.only.iter().filter(|n| !out.iter().any(|s| &s.name == *n)).collect();
        if !unknown.is_empty() {
            let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
            return Err(format!("--only: no scenario {unknown:?}; these exist: {names:?}"));
        }
    }
    Ok(out
        .into_iter()
        .enumerate()
        .filter(|(_, s)| f.only.is_empty() || f.only.contains(&s.name))
        .collect())
}

async fn inner(f: Flags, seed: u64) -> Result<bool, String> {
    let server = match &f.server {
        Some(s) => s.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("pigeonhole"),
    };
    if !server.exists() {
        return Err(format!(
            "no server binary at {} (build it: cargo build -p pigeonhole-cluster)",
            server.display()
        ));
    }
    let phctl = match &f.phctl {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("phctl"),
    };
    let list = scenarios(&f, &server, &phctl)?;
    if list.iter().any(|(_, s)| s.faults.contains(&Fault::Membership)) && !phctl.exists() {
        return Err(format!(
            "the membership fault needs phctl, not found at {} (build it: cargo build -p pigeonhole-client --bin phctl)",
            phctl.display()
        ));
    }
    let time_limit = Duration::from_secs(f.time_limit);
    pigeonhole_jepsen::harness::cluster::set_tls(!f.plaintext, &f.out.join("certs"))?;
    println!(
        "pigeonhole-jepsen: seed {seed}, {} scenario(s) of {} s, {} clients, {}; output in {}",
        list.len(),
        f.time_limit,
        f.concurrency,
        if f.plaintext { "plaintext (--insecure)" } else { "TLS" },
        f.out.display()
    );
    let mut outcomes = Vec::new();
    for (i, s) in list.iter().map(|(i, s)| (*i, s)) {
        let dir = f.out.join(format!("{:02}-{}", i + 1, s.name));
        let o = run::scenario(s, seed.wrapping_add(i as u64), time_limit, f.concurrency, &dir).await;
        println!(
            "  {:<20} {:<4} ok {:>6}  fail {:>4}  info {:>4}  faults {:>3}  converged in {:>5.1} s  stale replicas deleted {}  replica reads {}  anomalies {}",
            o.name,
            if o.passed { "PASS" } else { "FAIL" },
            o.ok,
            o.fail,
            o.info,
            o.faults,
            o.converge_s,
            o.stale_deleted,
            o.interim_reads,
            o.anomalies.len()
        );
        for a in o.anomalies.iter().take(5) {
            println!("      {} {} {}", a.kind, a.mailbox.as_deref().unwrap_or("-"), a.detail);
        }
        outcomes.push(o);
    }
    println!();
    println!(
        "{:<20} {:<6} {:>8} {:>6} {:>6} {:>7} {:>10}",
        "scenario", "result", "ok", "fail", "info", "faults", "anomalies"
    );
    for o in &outcomes {
        println!(
            "{:<20} {:<6} {:>8} {:>6} {:>6} {:>7} {:>10}",
            o.name,
            if o.passed { "pass" } else { "FAIL" },
            o.ok,
            o.fail,
            o.info,
            o.faults,
            o.anomalies.len()
        );
    }
    let passed = outcomes.iter().filter(|o| o.passed).count();
    let failed = outcomes.len() - passed;
    println!("{passed} passed, {failed} failed");
    Ok(failed == 0)
}

/// Kills servers left by an inner process that died, then deletes the
/// namespaces.
fn cleanup(out: &std::path::Path) {
    if let Ok(pids) = std::fs::read_to_string(out.join("pids")) {
        for pid in pids.lines().map(str::trim).filter(|p| !p.is_empty()) {
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmd.contains("pigeonhole") && (cmd.contains("--initial-cluster") || cmd.contains("--join")) {
                let _ = net::sh(&["kill", "-9", pid]);
            }
        }
        let _ = std::fs::remove_file(out.join("pids"));
    }
    net::cleanup();
}

async fn outer(seed: u64, out: &std::path::Path) -> Result<bool, String> {
    net::preflight()?;
    let max_nodes = 5;
    net::setup(max_nodes)?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--inner".into());
    if !args.iter().any(|a| a == "--seed") {
        args.push("--seed".into());
        args.push(seed.to_string());
    }
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", net::CONTROL])
        .arg(&exe)
        .args(&args)
        .spawn()
        .map_err(|e| format!("cannot start the inner run: {e}"))?;
    // Ctrl-C reaches the inner process too (same process group); this one
    // survives it, waits, and cleans up.
    let waited = tokio::select! {
        w = tokio::task::spawn_blocking(move || child.wait()) => w.map_err(|e| e.to_string())?.map_err(|e| e.to_string()),
        _ = async {
            let _ = tokio::signal::ctrl_c().await;
            std::future::pending::<()>().await
        } => unreachable!(),
    };
    cleanup(out);
    Ok(waited?.success())
}

#[tokio::main]
async fn main() -> ExitCode {
    let f = Flags::parse();
    let seed = f.seed.unwrap_or_else(rand::random);
    let result = if f.inner {
        inner(f, seed).await
    } else {
        let out = f.out.clone();
        println!("pigeonhole-jepsen: seed {seed} (replay with --seed {seed})");
        outer(seed, &out).await
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pigeonhole-jepsen: {e}");
            ExitCode::from(2)
        }
    }
}
