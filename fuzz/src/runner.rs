//! Runs one target for a budget of time or inputs, and fails on:
//! - a panic (caught, with the input saved and printed);
//! - a hang: one input running longer than [`INPUT_MS_MAX`] (a watchdog
//!   thread reports it and exits the process, since a stuck thread cannot
//!   be stopped from outside);
//! - unbounded allocation: the process's virtual memory peak (`VmPeak`)
//!   growing more than [`VM_GROWTH_BYTES_MAX`] past where it stood after
//!   warm-up. (An allocation larger than the machine can back aborts the
//!   process outright, which fails the run too.)

use crate::mutate::mutate;
use crate::targets::{Ctx, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Longest one input may run.
pub const INPUT_MS_MAX: u64 = 10_000;
/// Largest growth of the virtual memory peak after warm-up.
pub const VM_GROWTH_BYTES_MAX: u64 = 4 << 30;
/// Inputs kept for further mutation, at most (besides the seeds).
pub const CORPUS_MAX: usize = 4_096;
/// Shortest input kept for further mutation. Without coverage feedback,
/// "it decoded" is the only signal, and nearly any byte string of a few
/// bytes decodes as protobuf: keeping those would let the corpus decay into
/// tiny inputs that exercise nothing (seen: every protobuf target settling
/// at the same 50 % decode rate).
const KEEP_BYTES_MIN: usize = 8;
/// Inputs run before the memory baseline is taken.
const WARMUP_EXECS: u64 = 2_000;

/// How long to run.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// For this long.
    Time(Duration),
    /// For this many inputs.
    Execs(u64),
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Stats {
    /// The target.
    pub target: &'static str,
    /// Inputs run.
    pub execs: u64,
    /// Inputs that decoded.
    pub decoded: u64,
    /// Inputs kept for mutation at the end.
    pub corpus: usize,
    /// Mean length of the inputs run, bytes.
    pub input_bytes_mean: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Growth of VmPeak after warm-up, bytes.
    pub vm_growth_bytes: u64,
}

/// Why a run failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The target.
    pub target: &'static str,
    /// What went wrong.
    pub what: String,
    /// The input that did it (empty for a memory failure).
    pub input: Vec<u8>,
}

/// The process's `VmPeak`, in bytes (0 where /proc is missing).
pub fn vm_peak_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Hex of an input, for reports.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Watchdog {
    started_ms: Arc<AtomicU64>,
    input: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(target: &'static str, epoch: Instant) -> Watchdog {
        let started_ms = Arc::new(AtomicU64::new(0));
        let input = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (s, i, d) = (started_ms.clone(), input.clone(), done.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let at = s.load(Ordering::Relaxed);
                let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                if at != 0 && now.saturating_sub(at) > INPUT_MS_MAX {
                    let input = i.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    eprintln!(
                        "phfuzz: {target}: HANG: one input ran over {INPUT_MS_MAX} ms; input ({} bytes): {}",
                        input.len(),
                        hex(&input)
                    );
                    std::process::exit(3);
                }
            }
        });
        Watchdog {
            started_ms,
            input,
            done,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Runs `target` from `seed` until `budget` is spent.
pub fn run(target: &Target, seed: u64, budget: Budget) -> Result<Stats, Failure> {
    let fail = |what: String, input: Vec<u8>| Failure {
        target: target.name,
        what,
        input,
    };
    let mut ctx = Ctx::new().map_err(|e| fail(format!("set-up: {e}"), Vec::new()))?;
    let mut rng = StdRng::seed_from_u64(seed);
    // The seeds stay for the whole run, and half of all mutants start from
    // one, so the structure of valid encodings is never lost.
    let mut seeds = (target.seeds)();
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut kept: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut input_bytes: u64 = 0;
    let epoch = Instant::now();
    let dog = Watchdog::start(target.name, epoch);
    let (mut execs, mut decoded) = (0u64, 0u64);
    let mut baseline = 0u64;
    let mut growth = 0u64;
    // Every seed runs unmutated first: they must pass as they are.
    let mut queue: Vec<Vec<u8>> = seeds.clone();
    loop {
        let spent = match budget {
            Budget::Time(d) => epoch.elapsed() >= d,
            Budget::Execs(n) => execs >= n,
        };
        if spent && queue.is_empty() {
            break;
        }
        let input = queue.pop().unwrap_or_else(|| {
            let pick = |rng: &mut StdRng| {
                let pool = if corpus.is_empty() || rng.gen() {
                    &seeds
                } else {
                    &corpus
                };
                pool.get(rng.gen_range(0..pool.len())).cloned().unwrap_or_default()
            };
            let (a, b) = (pick(&mut rng), pick(&mut rng));
            mutate(&mut rng, &a, &b)
        });
        input_bytes += input.len() as u64;
        dog.input
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone_from(&input);
        dog.started_ms.store(
            u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1),
            Ordering::Relaxed,
        );
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.run)(&mut ctx, &input)));
        dog.started_ms.store(0, Ordering::Relaxed);
        execs += 1;
        match outcome {
            Ok(true) => {
                decoded += 1;
                // `kept` holds the fingerprints of what the corpus holds now,
                // never more: the runner's own memory stays bounded.
                if input.len() >= KEEP_BYTES_MIN && kept.insert(fingerprint(&input)) {
                    if corpus.len() < CORPUS_MAX {
                        corpus.push(input);
                    } else {
                        let i = rng.gen_range(0..corpus.len());
                        if let Some(slot) = corpus.get_mut(i) {
                            kept.remove(&fingerprint(slot));
                            *slot = input;
                        }
                    }
                }
            }
            Ok(false) => {}
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_else(|| "a panic".into());
                return Err(fail(format!("PANIC: {msg}"), input));
            }
        }
        if execs == WARMUP_EXECS {
            baseline = vm_peak_bytes();
        }
        if execs > WARMUP_EXECS && execs % 1_000 == 0 {
            growth = vm_peak_bytes().saturating_sub(baseline);
            if growth > VM_GROWTH_BYTES_MAX {
                return Err(fail(
                    format!("MEMORY: VmPeak grew by {growth} bytes after warm-up (limit {VM_GROWTH_BYTES_MAX})"),
                    Vec::new(),
                ));
            }
        }
    }
    Ok(Stats {
        target: target.name,
        execs,
        decoded,
        corpus: corpus.len(),
        input_bytes_mean: input_bytes / execs.max(1),
        elapsed: epoch.elapsed(),
        vm_growth_bytes: growth,
    })
}

/// A 64-bit hash of an input, to keep each kept input once.
fn fingerprint(input: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut h);
    h.finish()
}
