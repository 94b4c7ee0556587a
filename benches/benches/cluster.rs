//! The in-process replicated cluster (criterion): three nodes in this
//! process, each with its own engine (fsync on) and directory, over the
//! in-process transport. It measures the replication path — group commit,
//! the driver loop, apply — without gRPC. Figures: docs/benchmarks.md.
//!
//! - `cluster/append/1_in_flight`: one append at a time to a shard's leader
//!   (commit latency).
//! - `cluster/append/64_concurrent`: 64 appends proposed together and
//!   awaited (group commit at work). Throughput is in appends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pigeonhole_cluster::transport::local::Router;
use pigeonhole_cluster::{InitialCluster, Node, NodeConfig, Role};
use pigeonhole_engine::command as cmd;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SHARDS: u64 = 4;

fn append(user: &str, key: String) -> cmd::Op {
    cmd::Op {
        op: Some(cmd::op::Op::Append(cmd::AppendOp {
            namespace: "bench".into(),
            user_id: user.as_bytes().to_vec(),
            idempotency_key: key.into_bytes(),
            payload: pigeonhole_benches::incompressible(256).into(),
            expected_last_seq: None,
        })),
    }
}

fn cluster(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ic = InitialCluster {
        nodes: (1..=3).map(|i| (i, format!("127.0.0.1:{}", 27100 + i))).collect(),
    };
    let router = Router::new();
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        let mut cfg = NodeConfig::new(id, dir.path().join(format!("n{id}")), ic.clone());
        cfg.shard_count = SHARDS;
        cfg.replication_factor = 3;
        let _guard = rt.enter();
        let node = Node::start(cfg, router.transport(id)).unwrap();
        // The router delivers to registered inboxes only.
        router.register(node.inbox());
        nodes.insert(id, node);
    }
    // Shard 1's leader, and a user on shard 1.
    let (leader, shard) = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (id, n) in &nodes {
                if n.status()
                    .await
                    .unwrap()
                    .iter()
                    .any(|s| s.shard == 1 && s.role == Role::Leader)
                {
                    return (*id, 1u64);
                }
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let map = nodes[&1].bootstrap_map().clone();
    let user = (0..)
        .map(|u| format!("user-{u}"))
        .find(|u| map.shard_for_user(u.as_bytes()).map(|s| s.id) == Some(shard))
        .unwrap();
    let node = nodes[&leader].clone();
    let mut n = 0u64;
    let mut g = c.benchmark_group("cluster/append");
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(1));
    g.bench_function("1_in_flight", |b| {
        b.iter(|| {
            n += 1;
            let r = rt.block_on(node.propose(shard, vec![append(&user, format!("a{n}"))]));
            assert!(r.is_ok());
        });
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("64_concurrent", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..64 {
                    n += 1;
                    let (node, op) = (node.clone(), append(&user, format!("c{n}")));
                    set.spawn(async move { node.propose(shard, vec![op]).await.is_ok() });
                }
                while let Some(ok) = set.join_next().await {
                    assert!(ok.unwrap());
                }
            });
        });
    });
    g.finish();
    for n in nodes.values() {
        n.stop().unwrap();
    }
}

criterion_group!(benches, cluster);
criterion_main!(benches);
