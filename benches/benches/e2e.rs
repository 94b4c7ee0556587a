//! Client + gRPC end to end (criterion): three `pigeonhole` servers on
//! 127.0.0.1 (in this process, each with its own engine, fsync on, and its
//! own port), driven by the Rust client SDK — the path the routing tier
//! takes. Figures: docs/benchmarks.md; the cross-system comparison is
//! `scripts/bench-compare` (phbench).
//!
//! - `e2e/append/1_in_flight`: one `Client::append` at a time.
//! - `e2e/append/64_concurrent`: 64 appends to 64 mailboxes at once.
//! - `e2e/append_idle_subscribers/{0,100}_streams`: the 64-concurrent
//!   appends again, before and after opening 100 Subscribe streams over
//!   10,000 other mailboxes each (spread over the three nodes). A quiet
//!   stream must cost nothing: the two figures stay within 10 %. Under
//!   `cargo test` (one pass, debug build) it opens 4 streams of 1,000;
//!   `E2E_IDLE_STREAMS=10x1000` sets the count and size.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pigeonhole_client::{mailbox, Client, ClientConfig};
use pigeonhole_cluster::server::{run, ServerConfig};
use pigeonhole_cluster::InitialCluster;
use std::time::Duration;

#[path = "../../cluster/tests/server_common/ports.rs"]
mod ports;
use ports::free_port;

fn e2e(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut stops = Vec::new();
    let mut servers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut cfg = ServerConfig::single_node_default();
        cfg.node_id = u64::try_from(i).unwrap() + 1;
        cfg.data_dir = dir.path().join(format!("n{}", i + 1));
        cfg.listen = format!("127.0.0.1:{port}").parse().unwrap();
        cfg.initial_cluster = InitialCluster::parse(&initial).unwrap();
        cfg.shard_count = 8;
        cfg.replication_factor = 3;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        servers.push(rt.spawn(run(cfg, async move {
            let _ = rx.await;
        })));
    }
    let endpoints: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let client = rt.block_on(async {
        let client = Client::connect(ClientConfig::new(endpoints)).await.unwrap();
        // Until every shard has a leader, appends wait for elections.
        for u in 0..64 {
            client
                .append(
                    &mailbox("bench", format!("warm-{u}").as_bytes()),
                    vec![1],
                    b"warm".to_vec(),
                )
                .await
                .unwrap();
        }
        client.refresh().await.unwrap();
        client
    });
    let payload = pigeonhole_benches::incompressible(256);
    let mut n = 0u64;
    let mut g = c.benchmark_group("e2e/append");
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(1));
    g.bench_function("1_in_flight", |b| {
        let mb = mailbox("bench", b"user-1");
        b.iter(|| {
            n += 1;
            rt.block_on(client.append(
                &mb,
                pigeonhole_benches::incompressible(payload.len()),
                format!("a{n}").into_bytes(),
            ))
            .unwrap();
        });
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("64_concurrent", |b| {
        b.iter(|| rt.block_on(append_64(&client, &payload, &mut n)));
    });
    g.finish();

    // The same load with idle Subscribe streams open.
    let full = std::env::args().any(|a| a == "--bench");
    let (streams_n, per_stream) = if full { (100, 10_000) } else { (4, 1_000) };
    // E2E_IDLE_STREAMS=NxM overrides (e.g. a smaller run against older code).
    let (streams_n, per_stream) = std::env::var("E2E_IDLE_STREAMS")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once('x')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((streams_n, per_stream));
    let mut g = c.benchmark_group("e2e/append_idle_subscribers");
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(64));
    let mut concurrent = |b: &mut criterion::Bencher<'_>| b.iter(|| rt.block_on(append_64(&client, &payload, &mut n)));
    g.bench_function("0_streams", &mut concurrent);
    let idle = rt.block_on(open_idle_streams(&ports, streams_n, per_stream));
    g.bench_function(format!("{streams_n}_streams"), &mut concurrent);
    g.finish();
    drop(idle);
    for s in stops {
        let _ = s.send(());
    }
    rt.block_on(async {
        for s in servers {
            let _ = tokio::time::timeout(Duration::from_secs(10), s).await;
        }
    });
}

/// 64 appends to 64 mailboxes at once, each with a new key (`n` counts).
async fn append_64(client: &Client, payload: &[u8], n: &mut u64) {
    let mut set = tokio::task::JoinSet::new();
    for u in 0..64 {
        *n += 1;
        let (c, p) = (client.clone(), pigeonhole_benches::incompressible(payload.len()));
        let key = format!("c{n}").into_bytes();
        set.spawn(async move {
            c.append(&mailbox("bench", format!("user-{u}").as_bytes()), p, key)
                .await
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
}

/// Opens `streams` Subscribe streams, round-robin over the nodes, each
/// following `per_stream` mailboxes that nobody writes.
async fn open_idle_streams(
    ports: &[u16],
    streams: usize,
    per_stream: usize,
) -> Vec<tonic::Streaming<pigeonhole_proto::v1::SubscribeResponse>> {
    use pigeonhole_proto::v1 as pb;
    let mut out = Vec::with_capacity(streams);
    for s in 0..streams {
        let port = ports[s % ports.len()];
        let mut c = pb::mailbox_client::MailboxClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20);
        let req = pb::SubscribeRequest {
            mailboxes: (0..per_stream)
                .map(|j| pb::MailboxCursor {
                    mailbox: Some(pb::MailboxId {
                        namespace: "idle".into(),
                        user_id: format!("idle-{s}-{j}").into_bytes(),
                    }),
                    after_seq: 0,
                })
                .collect(),
            max_in_flight: 0,
        };
        out.push(c.subscribe(req).await.unwrap().into_inner());
    }
    out
}

criterion_group!(benches, e2e);
criterion_main!(benches);
