//! A short run of every fuzz target, as part of the test suite (`scripts/test`):
//! every seed unmutated, then mutants for a few seconds. The long runs are
//! `phfuzz --seconds 600` (figures in the issue notes and docs/testing).
#![allow(clippy::unwrap_used, clippy::panic)]

use pigeonhole_fuzz::runner::{hex, run, Budget};
use pigeonhole_fuzz::targets::TARGETS;
use std::time::Duration;

/// Seconds per target: enough for thousands of inputs in a debug build.
const SECONDS_PER_TARGET: u64 = 3;

#[test]
fn every_target_survives_a_short_run() {
    for t in TARGETS {
        match run(t, 20_261_128, Budget::Time(Duration::from_secs(SECONDS_PER_TARGET))) {
            Ok(s) => {
                assert!(s.execs > 100, "{}: only {} inputs ran", t.name, s.execs);
                assert!(s.decoded > 0, "{}: no input decoded: the seeds are broken", t.name);
            }
            Err(f) => panic!("{}: {}; input: {}", f.target, f.what, hex(&f.input)),
        }
    }
}

#[test]
fn every_seed_decodes() {
    let mut ctx = pigeonhole_fuzz::targets::Ctx::new().unwrap();
    for t in TARGETS {
        let seeds = (t.seeds)();
        assert!(!seeds.is_empty(), "{} has no seeds", t.name);
        for s in seeds {
            assert!((t.run)(&mut ctx, &s), "{}: a seed does not decode: {}", t.name, hex(&s));
        }
    }
}
