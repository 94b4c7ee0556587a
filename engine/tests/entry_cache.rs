//! The entry cache is invisible: whatever mix of appends (with conflicting
//! suffixes), trims and reopens happens, `entries` and `term` return exactly
//! what an in-memory model of the log says, and the same as a cold store.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::cast_possible_truncation)]

use pigeonhole_engine::raft::eraftpb::Entry;
use pigeonhole_engine::raft::{GetEntriesContext, Storage};
use pigeonhole_engine::{conf_state_with_voters, Durability, Engine, EngineOptions, RaftBatch};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` entries starting `back` entries before the end (a conflict
    /// when back > 0), with this term bump and data size.
    Append {
        back: u64,
        n: u64,
        data: usize,
    },
    /// Trim the cache below last - `keep`.
    Trim {
        keep: u64,
    },
    Reopen,
    Read {
        a: u64,
        b: u64,
        max: Option<u64>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..6, 1u64..40, 0usize..3000).prop_map(|(back, n, data)| Op::Append { back, n, data }),
        1 => (0u64..50).prop_map(|keep| Op::Trim { keep }),
        1 => Just(Op::Reopen),
        4 => (0u64..1000, 0u64..1000, prop::option::of(0u64..20_000)).prop_map(|(a, b, max)| Op::Read { a, b, max }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn cache_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        engine.bootstrap_shard(1, conf_state_with_voters(&[1]), 5, 5).unwrap();
        let mut store = engine.raft_log(1).unwrap();
        // model[i] is the entry at index 6 + i.
        let mut model: Vec<Entry> = Vec::new();
        let mut term = 5u64;
        for op in ops {
            match op {
                Op::Append { back, n, data } => {
                    let last = 5 + model.len() as u64;
                    let first = (last + 1).saturating_sub(back).max(6);
                    term += 1;
                    let entries: Vec<Entry> = (first..first + n)
                        .map(|i| Entry {
                            index: i,
                            term,
                            data: vec![(i % 251) as u8; data].into(),
                            ..Default::default()
                        })
                        .collect();
                    let mut b = RaftBatch::default();
                    b.append(&store, &entries).unwrap();
                    engine.write_raft(b, Durability::NoFsync).unwrap();
                    model.truncate((first - 6) as usize);
                    model.extend(entries);
                }
                Op::Trim { keep } => {
                    let last = 5 + model.len() as u64;
                    store.trim_entry_cache(last.saturating_sub(keep));
                }
                Op::Reopen => {
                    drop(store);
                    drop(engine);
                    engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
                    store = engine.raft_log(1).unwrap();
                }
                Op::Read { a, b, max } => {
                    let n = model.len() as u64;
                    if n == 0 {
                        continue;
                    }
                    let (lo, hi) = (6 + a % n, 6 + b % (n + 1));
                    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
                    let got = store.entries(lo, hi, max, GetEntriesContext::empty(false)).unwrap();
                    let want = &model[(lo - 6) as usize..(hi - 6) as usize];
                    // With a size limit a prefix comes back, never empty
                    // when something was asked for.
                    prop_assert!(got.len() <= want.len());
                    prop_assert!(hi == lo || !got.is_empty());
                    if max.is_none() {
                        prop_assert_eq!(got.len(), want.len());
                    }
                    for (g, w) in got.iter().zip(want) {
                        prop_assert_eq!(g, w);
                    }
                    for i in lo..hi {
                        prop_assert_eq!(store.term(i).unwrap(), model[(i - 6) as usize].term);
                    }
                }
            }
            prop_assert_eq!(store.last_index().unwrap(), 5 + model.len() as u64);
        }
    }
}
