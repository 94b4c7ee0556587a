//! `phbench`: one load generator for Pigeonhole and the systems it is
//! compared with (etcd, NATS JetStream), so that every system sees the same
//! load from the same code: same concurrency, payloads, mailboxes and key
//! distribution. `scripts/bench-compare` starts the clusters and calls it.
//!
//! ```text
//! phbench run --system pigeonhole --endpoints 127.0.0.1:7071,... --in-flight 64 --seconds 10
//! phbench run --system etcd --endpoints http://127.0.0.1:23791,... --in-flight 64
//! phbench run --system nats --endpoints nats://127.0.0.1:4222 --in-flight 64
//! phbench report --input results.jsonl --svg docs/bench-compare.svg
//! ```
//!
//! - **Closed loop** (`--in-flight N`): N workers, each sends its next
//!   append when the previous one is acknowledged. **Open loop**
//!   (`--rate R`): appends are issued on a fixed schedule, and latency is
//!   measured from the scheduled time, so a stall is not hidden
//!   (coordinated omission).
//! - An "append" is, per system: Pigeonhole `Append` (idempotency key =
//!   worker and counter); etcd `put m/<run>/<user>/<n>`; NATS JetStream
//!   publish to `mbox.<user>` on an R3 file stream, with `Nats-Msg-Id` for
//!   dedup, waiting for the stream's ack. Every run uses a fresh random
//!   namespace, so no key or message id repeats across runs: a repeat
//!   would be a cheap dedup hit, not an append.
//! - Reported (one JSON line): appends/s in the measured window, latency
//!   p50/p99/p99.9 (HDR histogram, µs), errors, and, with `--server-pids`,
//!   the servers' CPU-seconds per 1,000 appends (utime + stime from
//!   /proc/PID/stat) and bytes written to storage per append
//!   (/proc/PID/io `write_bytes`); always, the load generator's own
//!   CPU-seconds per 1,000 appends (/proc/self/stat) and the share of the
//!   machine's CPU time left idle in the window (/proc/stat, idle + iowait).
//!   On a machine the servers and the load generator share, those two say
//!   whether a run was bound by CPU, and how much of it the client took.

use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use rand::Rng;
use rand_distr::Distribution;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pigeonhole_benches::procstat::{clock_ticks, idle_pct, machine_ticks, proc_cpu_s, proc_totals};

#[derive(Debug, Parser)]
#[command(name = "phbench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive one system and print one JSON line of results.
    Run(RunArgs),
    /// Aggregate result lines: a markdown table (medians of repetitions)
    /// and an SVG plot of throughput against p99 latency.
    Report {
        /// JSON lines written by `run`.
        #[arg(long)]
        input: std::path::PathBuf,
        /// Where to write the plot.
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
        /// Where to write the p99-over-time plot of runs with a timeline.
        #[arg(long)]
        timeline_svg: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum System {
    Pigeonhole,
    Etcd,
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Appends only.
    Append,
    /// Appends, and readers that Sync every mailbox from their cursors
    /// (Pigeonhole only): reports delivery latency.
    AppendSync,
    /// Appends, and one resuming Subscribe over every mailbox (Pigeonhole
    /// only): reports delivery latency.
    Subscribe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dist {
    Uniform,
    Zipf,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// The system under load.
    #[arg(long, value_enum)]
    system: System,
    /// Its endpoints, comma-separated.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// A label for the report (e.g. `pigeonhole-nofsync`) [default: the system].
    #[arg(long)]
    label: Option<String>,
    /// Closed loop: requests in flight.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Open loop: appends per second (replaces the closed loop).
    #[arg(long)]
    rate: Option<u64>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Warm-up seconds (load, not measured).
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Distinct mailboxes (users).
    #[arg(long, default_value_t = 1_000)]
    mailboxes: u64,
    /// How users are picked.
    #[arg(long, value_enum, default_value_t = Dist::Uniform)]
    dist: Dist,
    /// Server pids, for CPU and write accounting.
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// What runs beside the appends.
    #[arg(long, value_enum, default_value_t = Workload::Append)]
    workload: Workload,
    /// Reader tasks of `append-sync` (each polls its share of mailboxes).
    #[arg(long, default_value_t = 4)]
    readers: u64,
    /// Pigeonhole only: let the SDK coalesce concurrent appends to one node
    /// into AppendBatch calls. Off, every append is a unary call, as the
    /// other systems are measured.
    #[arg(long)]
    coalesce: bool,
    /// Steady state: appends that must have completed (at `in_flight`)
    /// before the warm-up starts, so the measured window pays for memtable
    /// flushes and compactions (`scripts/bench-compare` STEADY=1: 5 M).
    #[arg(long, default_value_t = 0)]
    prefill: u64,
    /// Also report p50/p99 and appends for each second of the measured
    /// window (`timeline` in the output; `report --timeline-svg` plots it).
    #[arg(long)]
    timeline: bool,
    /// Repetition number, copied into the output.
    #[arg(long, default_value_t = 1)]
    rep: u32,
    /// Pigeonhole only: talk TLS, checking nodes against this CA (PEM).
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Pigeonhole only: the client certificate (its identity needs append).
    #[arg(long)]
    tls_cert: Option<std::path::PathBuf>,
    /// Pigeonhole only: the key of --tls-cert.
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
}

#[path = "phbench/target.rs"]
mod target;
use target::Target;

/// Largest latency recorded, µs (60 s); larger values are clamped.
const LATENCY_US_MAX: u64 = 60_000_000;
/// Open loop: most appends outstanding before the generator stops issuing
/// (and counts the rest as errors), so a stalled system cannot exhaust
/// memory.
const OPEN_LOOP_OUTSTANDING_MAX: u64 = 100_000;

/// Microseconds since this process's first call: the clock of payload
/// stamps (writers and readers share the process).
fn run_id() -> u32 {
    static RUN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *RUN.get_or_init(rand::random)
}

/// The namespace of this run: new mailboxes every run, so readers never
/// see another run's messages and keys never collide with an earlier run's
/// (which would turn appends into dedup hits, for Pigeonhole and NATS alike).
fn namespace() -> String {
    format!("b{}", run_id())
}

fn now_us() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The delivery latency of a message whose payload was stamped by
/// [`Target::append`].
fn delivery_us(payload: &[u8]) -> Option<u64> {
    let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(now_us().saturating_sub(u64::from_le_bytes(head)))
}

/// Picks users: uniform or Zipf (s = 1.1) over `n` mailboxes.
#[derive(Clone)]
struct Users {
    n: u64,
    zipf: Option<rand_distr::Zipf<f64>>,
}

impl Users {
    fn new(n: u64, d: Dist) -> Users {
        let zipf = match d {
            Dist::Uniform => None,
            #[allow(clippy::cast_precision_loss)]
            Dist::Zipf => rand_distr::Zipf::new(n, 1.1).ok(),
        };
        Users { n: n.max(1), zipf }
    }

    fn pick(&self, rng: &mut impl Rng) -> u64 {
        match &self.zipf {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some(z) => (z.sample(rng) as u64).saturating_sub(1),
            None => rng.gen_range(0..self.n),
        }
    }
}

/// Most seconds a timeline records (one histogram each).
const TIMELINE_SECONDS_MAX: usize = 3_600;

struct Shared {
    hist: Mutex<Histogram<u64>>,
    /// Successful appends since the start, measured or not (for prefill).
    total: AtomicU64,
    /// Per-second histograms of the measured window, when asked for.
    timeline: Option<Mutex<Vec<Histogram<u64>>>>,
    /// When the measured window started.
    t0: std::sync::OnceLock<Instant>,
    measuring: AtomicBool,
    done: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
    last_error: Mutex<Option<String>>,
    delivery: Mutex<Histogram<u64>>,
    delivered: AtomicU64,
}

impl Shared {
    fn delivered(&self, payload: &[u8]) {
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        if let (Some(us), Ok(mut h)) = (delivery_us(payload), self.delivery.lock()) {
            let _ = h.record(us.clamp(1, LATENCY_US_MAX));
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record(&self, started: Instant, r: Result<(), String>) {
        if r.is_ok() {
            self.total.fetch_add(1, Ordering::Relaxed);
        }
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        match r {
            Ok(()) => {
                let us = u64::try_from(started.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .clamp(1, LATENCY_US_MAX);
                if let Ok(mut h) = self.hist.lock() {
                    let _ = h.record(us);
                }
                if let (Some(tl), Some(t0)) = (&self.timeline, self.t0.get()) {
                    let sec = usize::try_from(t0.elapsed().as_secs()).unwrap_or(usize::MAX);
                    if let (true, Ok(mut tl)) = (sec < TIMELINE_SECONDS_MAX, tl.lock()) {
                        while tl.len() <= sec {
                            let Ok(h) = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 2) else {
                                break;
                            };
                            tl.push(h);
                        }
                        if let Some(h) = tl.get_mut(sec) {
                            let _ = h.record(us);
                        }
                    }
                }
                self.done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut l) = self.last_error.lock() {
                    *l = Some(e);
                }
            }
        }
    }
}

async fn run(a: RunArgs) -> Result<serde_json::Value, String> {
    let target = Target::connect(&a).await?;
    let hist = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3).map_err(|e| e.to_string())?;
    let mut tasks = tokio::task::JoinSet::new();
    let shared = Arc::new(Shared {
        hist: Mutex::new(hist),
        total: AtomicU64::new(0),
        timeline: a.timeline.then(|| Mutex::new(Vec::new())),
        t0: std::sync::OnceLock::new(),
        measuring: AtomicBool::new(false),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        last_error: Mutex::new(None),
        delivery: Mutex::new(Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3).map_err(|e| e.to_string())?),
        delivered: AtomicU64::new(0),
    });
    if a.workload != Workload::Append {
        let Target::Pigeonhole(client) = &target else {
            return Err("append-sync and subscribe run against pigeonhole only".into());
        };
        readers(&a, client, &shared, &mut tasks)?;
    }
    let users = Users::new(a.mailboxes, a.dist);
    // The payload's length; `Target::append` fills each message afresh.
    let payload: Arc<Vec<u8>> = Arc::new(vec![0; a.payload_bytes]);
    match a.rate {
        None => {
            for w in 0..a.in_flight {
                let (mut t, s, u, p) = (target.clone(), Arc::clone(&shared), users.clone(), Arc::clone(&payload));
                let worker = w as u64;
                tasks.spawn(async move {
                    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(worker);
                    let mut n = 0u64;
                    while !s.stop.load(Ordering::Relaxed) {
                        n += 1;
                        let user = u.pick(&mut rng);
                        let started = Instant::now();
                        let r = t.append(user, worker, n, &p).await;
                        s.record(started, r);
                    }
                });
            }
        }
        Some(rate) => {
            let (t, s, u, p) = (target.clone(), Arc::clone(&shared), users.clone(), Arc::clone(&payload));
            tasks.spawn(async move {
                let outstanding = Arc::new(AtomicU64::new(0));
                let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
                let start = Instant::now();
                let mut n = 0u64;
                while !s.stop.load(Ordering::Relaxed) {
                    let due = start + interval.mul_f64(n as f64);
                    tokio::time::sleep_until(due.into()).await;
                    n += 1;
                    if outstanding.load(Ordering::Relaxed) >= OPEN_LOOP_OUTSTANDING_MAX {
                        s.record(due, Err("open loop: too many outstanding".into()));
                        continue;
                    }
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    let (mut t, s, o, p) = (t.clone(), Arc::clone(&s), Arc::clone(&outstanding), Arc::clone(&p));
                    let user = u.pick(&mut rand::thread_rng());
                    tokio::spawn(async move {
                        let r = t.append(user, 0, n, &p).await;
                        // From the scheduled time: a late start is latency.
                        s.record(due, r);
                        o.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            });
        }
    }
    let prefill_started = Instant::now();
    if a.prefill > 0 {
        let mut reported = Instant::now();
        while shared.total.load(Ordering::Relaxed) < a.prefill {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if reported.elapsed() >= Duration::from_secs(30) {
                reported = Instant::now();
                let n = shared.total.load(Ordering::Relaxed);
                eprintln!(
                    "phbench: prefill {n} of {} ({:.0}/s)",
                    a.prefill,
                    n as f64 / prefill_started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let prefill_s = prefill_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let (cpu0, written0) = proc_totals(&a.server_pids);
    let ticks = clock_ticks();
    let client0 = proc_cpu_s("self", ticks).unwrap_or(0.0);
    let machine0 = machine_ticks();
    let t0 = Instant::now();
    let _ = shared.t0.set(t0);
    shared.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, written1) = proc_totals(&a.server_pids);
    let client1 = proc_cpu_s("self", ticks).unwrap_or(0.0);
    let machine1 = machine_ticks();
    shared.stop.store(true, Ordering::Relaxed);
    // Workers finish their request in flight; do not wait forever.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let done = shared.done.load(Ordering::Relaxed);
    let h = shared.hist.lock().map_err(|_| "histogram lock")?.clone();
    let dh = shared.delivery.lock().map_err(|_| "histogram lock")?.clone();
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let delivery = |q: f64| {
        if delivered == 0 {
            serde_json::Value::Null
        } else {
            dh.value_at_quantile(q).into()
        }
    };
    let per_k = |x: f64| if done == 0 { 0.0 } else { x * 1000.0 / done as f64 };
    let timeline: Option<Vec<serde_json::Value>> = match &shared.timeline {
        Some(tl) => Some(
            tl.lock()
                .map_err(|_| "timeline lock")?
                .iter()
                .enumerate()
                // A request that ends after the window closed lands in one
                // more, partial second: leave it out.
                .take(usize::try_from(a.seconds).unwrap_or(usize::MAX))
                .map(|(i, h)| {
                    serde_json::json!({
                        "s": i,
                        "appends": h.len(),
                        "p50_us": h.value_at_quantile(0.50),
                        "p99_us": h.value_at_quantile(0.99),
                    })
                })
                .collect(),
        ),
        None => None,
    };
    Ok(serde_json::json!({
        "label": a.label.clone().unwrap_or_else(|| format!("{:?}", a.system).to_lowercase()),
        "system": format!("{:?}", a.system).to_lowercase(),
        "rep": a.rep,
        "in_flight": if a.rate.is_some() { serde_json::Value::Null } else { a.in_flight.into() },
        "rate": a.rate,
        "payload_bytes": a.payload_bytes,
        "mailboxes": a.mailboxes,
        "coalesce": a.coalesce,
        "prefill": a.prefill,
        "prefill_s": prefill_s,
        "dist": format!("{:?}", a.dist).to_lowercase(),
        "seconds": elapsed,
        "appends": done,
        "appends_per_s": done as f64 / elapsed,
        "errors": shared.errors.load(Ordering::Relaxed),
        "last_error": shared.last_error.lock().ok().and_then(|l| l.clone()),
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "workload": format!("{:?}", a.workload).to_lowercase(),
        "delivered": delivered,
        "delivery_p50_us": delivery(0.50),
        "delivery_p99_us": delivery(0.99),
        "delivery_p999_us": delivery(0.999),
        "server_cpu_s_per_1k": if a.server_pids.is_empty() { serde_json::Value::Null } else { per_k(cpu1 - cpu0).into() },
        "client_cpu_s_per_1k": per_k(client1 - client0),
        "machine_idle_pct": idle_pct(machine0, machine1),
        "timeline": timeline,
        "server_write_bytes_per_append": if a.server_pids.is_empty() { serde_json::Value::Null } else { (per_k((written1 - written0) as f64) / 1000.0).into() },
    }))
}

/// Starts the readers of `append-sync` and `subscribe`: every message they
/// read is a delivery, timed from its stamp.
fn readers(
    a: &RunArgs,
    client: &pigeonhole_client::Client,
    shared: &Arc<Shared>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), String> {
    let ns = namespace();
    let mb = |u: u64| pigeonhole_client::mailbox(&ns, format!("user-{u}").as_bytes());
    match a.workload {
        Workload::Append => {}
        Workload::AppendSync => {
            for r in 0..a.readers.max(1) {
                let (c, s) = (client.clone(), Arc::clone(shared));
                let mine: Vec<pigeonhole_client::pb::MailboxId> =
                    (0..a.mailboxes).filter(|u| u % a.readers.max(1) == r).map(mb).collect();
                tasks.spawn(async move {
                    let mut cursors = vec![0u64; mine.len()];
                    while !s.stop.load(Ordering::Relaxed) {
                        let mut any = false;
                        for (m, cursor) in mine.iter().zip(cursors.iter_mut()) {
                            let opts = pigeonhole_client::SyncOptions {
                                max_messages: 1_000,
                                ..Default::default()
                            };
                            if let Ok(page) = c.sync(m, *cursor, opts).await {
                                for msg in &page.messages {
                                    s.delivered(&msg.payload);
                                }
                                any |= !page.messages.is_empty();
                                *cursor = page.messages.last().map_or(*cursor, |m| m.seq);
                            }
                        }
                        if !any {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                });
            }
        }
        Workload::Subscribe => {
            let mut sub = client
                .subscribe((0..a.mailboxes).map(|u| (mb(u), 0)).collect(), 0)
                .map_err(|e| e.to_string())?;
            let s = Arc::clone(shared);
            tasks.spawn(async move {
                while !s.stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                        Ok(Some(Ok(pigeonhole_client::Event::Messages { messages, .. }))) => {
                            for m in &messages {
                                s.delivered(&m.payload);
                            }
                        }
                        Ok(Some(_) | None) => break,
                        Err(_) => {}
                    }
                }
            });
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match Cli::parse().command {
        Command::Run(a) => match run(a).await {
            Ok(v) => {
                println!("{v}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("phbench: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Report {
            input,
            svg,
            timeline_svg,
        } => match pigeonhole_benches::report::report(&input, svg.as_deref(), timeline_svg.as_deref()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("phbench: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
