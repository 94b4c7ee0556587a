//! `phfuzz`: runs the fuzz targets (see `pigeonhole_fuzz::targets`).
//!
//! ```text
//! phfuzz --seconds 600                  # every target, 10 minutes each
//! phfuzz --target command --seconds 60  # one target
//! phfuzz --list
//! ```
//! A failing input is printed as hex and written to `--crash-dir`. The exit
//! code is 0 when every target ran clean, 1 when one failed, 2 on bad usage
//! and 3 on a hang.

use clap::Parser;
use pigeonhole_fuzz::runner::{hex, run, Budget};
use pigeonhole_fuzz::targets::TARGETS;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "phfuzz", about = "Fuzzes every decoder of untrusted bytes in Pigeonhole")]
struct Args {
    /// Targets to run (default: all).
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Random seed (a run is repeatable for a seed and an input count).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where failing inputs are written.
    #[arg(long, default_value = "phfuzz-crashes")]
    crash_dir: PathBuf,
    /// List the targets and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for t in TARGETS {
            println!("{}", t.name);
        }
        return ExitCode::SUCCESS;
    }
    for name in &args.targets {
        if !TARGETS.iter().any(|t| t.name == name) {
            eprintln!("phfuzz: no target {name:?} (see --list)");
            return ExitCode::from(2);
        }
    }
    let mut failed = false;
    println!("| target | inputs | inputs/s | mean bytes | decoded | corpus | VmPeak growth |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for t in TARGETS {
        if !args.targets.is_empty() && !args.targets.iter().any(|n| n == t.name) {
            continue;
        }
        match run(t, args.seed, Budget::Time(Duration::from_secs(args.seconds))) {
            Ok(s) => {
                let secs = s.elapsed.as_secs_f64().max(1e-9);
                println!(
                    "| {} | {} | {:.0} | {} | {:.1} % | {} | {} MiB |",
                    s.target,
                    s.execs,
                    s.execs as f64 / secs,
                    s.input_bytes_mean,
                    100.0 * s.decoded as f64 / s.execs.max(1) as f64,
                    s.corpus,
                    s.vm_growth_bytes >> 20
                );
            }
            Err(f) => {
                failed = true;
                let _ = std::fs::create_dir_all(&args.crash_dir);
                let path = args.crash_dir.join(format!("{}-seed{}.bin", f.target, args.seed));
                let _ = std::fs::write(&path, &f.input);
                eprintln!(
                    "phfuzz: {}: {}; input ({} bytes, saved to {}): {}",
                    f.target,
                    f.what,
                    f.input.len(),
                    path.display(),
                    hex(&f.input)
                );
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
