//! Load generator for an in-process cluster: N nodes in this process, each
//! with a real engine (fsync on) in its own directory on the same disk, over
//! the in-process transport. It measures what the replication path costs:
//! group commit, apply, and the driver loop, without gRPC framing.
//!
//! Usage (see docs/benchmarks.md):
//!   cargo run --profile bench -p pigeonhole-benches --bin cluster-load -- \
//!       --in-flight 256 --seconds 20
//!
//! Clients route each append to the shard's current leader, as the routing
//! tier's client does. Reported: appends/s, latency percentiles, and process
//! CPU-seconds per 1,000 appends (all nodes share this process, so that is
//! the cluster's CPU cost).

use pigeonhole_cluster::transport::local::Router;
use pigeonhole_cluster::{InitialCluster, Node, NodeConfig, Role};
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::OpOutput;
use rand::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    nodes: u64,
    shards: u64,
    mailboxes: u64,
    payload_bytes: usize,
    in_flight: usize,
    seconds: u64,
    warmup_seconds: u64,
    write_buffer_mb: Option<usize>,
    idle_seconds: u64,
    hibernate_after_ticks: Option<u32>,
    dir: std::path::PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        nodes: 3,
        shards: 64,
        mailboxes: 10_000,
        payload_bytes: 256,
        in_flight: 256,
        seconds: 20,
        warmup_seconds: 3,
        write_buffer_mb: None,
        idle_seconds: 0,
        hibernate_after_ticks: None,
        dir: std::env::var_os("HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(".cache/pigeonhole/bench-data"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|_| format!("{flag}: {s:?} is not a number"));
        match flag.as_str() {
            "--nodes" => a.nodes = num(val()?)?,
            "--shards" => a.shards = num(val()?)?,
            "--mailboxes" => a.mailboxes = num(val()?)?,
            "--payload-bytes" => a.payload_bytes = usize::try_from(num(val()?)?).map_err(|e| e.to_string())?,
            "--in-flight" => a.in_flight = usize::try_from(num(val()?)?).map_err(|e| e.to_string())?,
            "--seconds" => a.seconds = num(val()?)?,
            "--warmup-seconds" => a.warmup_seconds = num(val()?)?,
            "--dir" => a.dir = val()?.into(),
            "--idle-seconds" => a.idle_seconds = num(val()?)?,
            "--hibernate-after-ticks" => {
                a.hibernate_after_ticks = Some(u32::try_from(num(val()?)?).map_err(|e| e.to_string())?)
            }
            "--write-buffer-mb" => a.write_buffer_mb = Some(usize::try_from(num(val()?)?).map_err(|e| e.to_string())?),
            "--help" | "-h" => {
                return Err(
                    "flags: --nodes --shards --mailboxes --payload-bytes --in-flight --seconds \
                            --warmup-seconds --write-buffer-mb --idle-seconds --hibernate-after-ticks --dir"
                        .into(),
                )
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// User + system CPU seconds of this process so far (/proc/self/stat,
/// fields 14 and 15, in clock ticks of 1/100 s on Linux).
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some((_, rest)) = s.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let ic = InitialCluster {
        nodes: (1..=args.nodes)
            .map(|i| (i, format!("127.0.0.1:{}", 27000 + i)))
            .collect(),
    };
    let router = Router::new();
    let mut nodes = BTreeMap::new();
    for id in 1..=args.nodes {
        let mut cfg = NodeConfig::new(id, args.dir.join(format!("n{id}")), ic.clone());
        cfg.shard_count = args.shards;
        cfg.replication_factor = 3;
        if let Some(t) = args.hibernate_after_ticks {
            cfg.raft.hibernate_after_ticks = t;
        }
        if let Some(mb) = args.write_buffer_mb {
            cfg.engine.write_buffer_bytes = mb << 20;
        }
        let node = Node::start(cfg, router.transport(id))?;
        router.register(node.inbox());
        nodes.insert(id, node);
    }
    // Wait for a leader everywhere and remember it (the client's routing table).
    let mut leader_of = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while leader_of.len() < usize::try_from(args.shards)? {
        for (id, n) in &nodes {
            for s in n.status().await? {
                if s.role == Role::Leader && s.shard != 0 {
                    leader_of.insert(s.shard, *id);
                }
            }
        }
        if Instant::now() > deadline {
            return Err("no leader for every shard within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let per_node: BTreeMap<u64, usize> = leader_of.values().fold(BTreeMap::new(), |mut m, l| {
        *m.entry(*l).or_default() += 1;
        m
    });
    eprintln!("leaders per node: {per_node:?}");
    if args.idle_seconds > 0 {
        // Idle cost: wait until every replica hibernates, then measure the
        // CPU the whole cluster burns with no traffic at all.
        let t = Instant::now();
        // With hibernation off nothing ever sleeps: settle for a few seconds.
        if args.hibernate_after_ticks == Some(0) {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        while args.hibernate_after_ticks != Some(0) {
            let mut asleep = true;
            for n in nodes.values() {
                asleep &= n.status().await?.iter().all(|s| s.asleep);
            }
            if asleep {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) {
                return Err("replicas did not all hibernate within 120 s".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let asleep_after = t.elapsed().as_secs_f64();
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
        let cpu = cpu_seconds() - cpu0;
        let wall = t0.elapsed().as_secs_f64();
        println!(
            "idle: nodes={} shards={} replicas={} settled_after={asleep_after:.1}s cpu={:.3}s over {wall:.1}s ({:.2}% of one core)",
            args.nodes,
            args.shards,
            args.shards * 3 + args.nodes,
            cpu,
            100.0 * cpu / wall
        );
        for node in nodes.values() {
            node.stop()?;
        }
        return Ok(());
    }
    let map = nodes.get(&1).ok_or("no node 1")?.shard_map()?;
    let nodes = Arc::new(nodes);
    let leader_of = Arc::new(leader_of);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::with_capacity(4 << 20)));
    // Fresh random bytes per append (`incompressible`): payloads are
    // end-to-end encrypted.
    let payload_bytes = args.payload_bytes;
    let mut tasks = Vec::new();
    for w in 0..args.in_flight {
        let (nodes, leader_of, map) = (nodes.clone(), leader_of.clone(), map.clone());
        let (measuring, stop, done, errors, latencies) = (
            measuring.clone(),
            stop.clone(),
            done.clone(),
            errors.clone(),
            latencies.clone(),
        );
        let mailboxes = args.mailboxes;
        tasks.push(tokio::spawn(async move {
            let mut local = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let user = format!("user-{}", rand::thread_rng().gen_range(0..mailboxes));
                let Some(shard) = map.shard_for_user(user.as_bytes()).map(|s| s.id) else {
                    break;
                };
                let Some(node) = leader_of.get(&shard).and_then(|l| nodes.get(l)) else {
                    break;
                };
                n += 1;
                let op = cmd::Op {
                    op: Some(cmd::op::Op::Append(cmd::AppendOp {
                        namespace: "bench".into(),
                        user_id: user.into_bytes(),
                        idempotency_key: format!("w{w}-{n}").into_bytes(),
                        payload: pigeonhole_benches::incompressible(payload_bytes).into(),
                        expected_last_seq: None,
                    })),
                };
                let t = Instant::now();
                let res = node.propose(shard, vec![op]).await;
                let us = u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX);
                let ok = matches!(res.as_deref(), Ok([Ok(OpOutput::Appended { .. })]));
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                        local.push(us);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if let Ok(mut l) = latencies.lock() {
                l.extend(local);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup_seconds)).await;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let n = done.load(Ordering::Relaxed);
    let mut lat = latencies.lock().map_err(|_| "poisoned")?.clone();
    lat.sort_unstable();
    let pct = |permille: usize| -> f64 {
        let i = lat.len().saturating_sub(1) * permille / 1000;
        f64::from(lat.get(i).copied().unwrap_or(0)) / 1000.0
    };
    println!(
        "nodes={} shards={} mailboxes={} payload={}B in_flight={} seconds={:.1}",
        args.nodes, args.shards, args.mailboxes, args.payload_bytes, args.in_flight, elapsed
    );
    println!(
        "appends={n} errors={} throughput={:.0}/s p50={:.2}ms p99={:.2}ms p999={:.2}ms cpu_s_per_1k={:.3}",
        errors.load(Ordering::Relaxed),
        n as f64 / elapsed,
        pct(500),
        pct(990),
        pct(999),
        if n == 0 { 0.0 } else { cpu / (n as f64 / 1000.0) }
    );
    for node in nodes.values() {
        node.stop()?;
    }
    Ok(())
}
