//! A first start that a crash cut short. Bootstrap writes each shard's Raft
//! log (at the bootstrap point) before its state, so a crash in between
//! leaves logs without state: the next start must finish the bootstrap,
//! not take it for a state machine lost to damage (which a single-replica
//! node could never rebuild) nor start with shards it cannot serve.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_cluster::node::BOOTSTRAP_INDEX;
use pigeonhole_engine::{conf_state_with_voters, Engine, EngineOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_cut_short_after_the_logs_is_finished_at_the_next_start() {
    let mut c = TestCluster::with_members(1, 0, 1, 1, fast_tuning());
    let db = c.configs[&1].data_dir.join("db");
    // The logs of the metadata shard (0) and the data shard (1), as
    // bootstrap writes them first; then the state is lost as a crash
    // before its write would lose it (everything but the log goes).
    {
        let engine = Engine::open(&db, EngineOptions::default()).unwrap();
        for shard in [0, 1] {
            engine
                .bootstrap_shard(shard, conf_state_with_voters(&[1]), BOOTSTRAP_INDEX, BOOTSTRAP_INDEX)
                .unwrap();
        }
    }
    for e in std::fs::read_dir(&db).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "raft-log" {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    c.start(1);
    let (seq, duplicate) = append_retrying(c.node(1), 1, "u", "k1", b"after the cut-short bootstrap", 30).await;
    assert_eq!((seq, duplicate), (1, false));
    assert_eq!(
        read_all(c.node(1), 1, "u"),
        vec![(1, b"after the cut-short bootstrap".to_vec())]
    );
}
