//! What the RPC layer costs one request (criterion): the metrics count and
//! histogram, the `request` span (D46) and the stage stamps of a write
//! (`cluster/src/stages.rs`), around a service that answers at once and
//! stamps the five stages as the driver and the applier would. Compared
//! with the bare service, this is the layer's CPU per request, to set
//! against the CPU per append of docs/benchmarks.md (issue 12).
//!
//! - `rpc_layer/bare`: the service alone.
//! - `rpc_layer/layer`: behind `GrpcMetricsLayer`, logs at `info` (the
//!   default filter: the span is created), no metrics exporter.
//! - `rpc_layer/layer_exporter`: the same with the Prometheus recorder
//!   installed (as with `--metrics-listen`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use pigeonhole_cluster::stages::{self, Stage};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::codegen::http;
use tonic::codegen::Service;
use tower_layer::Layer;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Answers OK at once, after stamping the stages a write goes through.
#[derive(Clone)]
struct Write;

impl Service<http::Request<()>> for Write {
    type Response = http::Response<()>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        Box::pin(async {
            let s = stages::current();
            for stage in [
                Stage::Sent,
                Stage::Dequeued,
                Stage::Proposed,
                Stage::Committed,
                Stage::Applied,
            ] {
                stages::stamp(s.as_ref(), stage);
            }
            let mut r = http::Response::new(());
            r.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("0"));
            Ok(r)
        })
    }
}

fn request() -> http::Request<()> {
    http::Request::builder()
        .uri("/pigeonhole.v1.Mailbox/Append")
        .body(())
        .unwrap()
}

fn rpc_layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    pigeonhole_cluster::logging::init(pigeonhole_cluster::logging::LogFormat::Text, "info").unwrap();
    let mut g = c.benchmark_group("rpc_layer");
    g.bench_function("bare", |b| {
        let mut svc = Write;
        b.iter(|| rt.block_on(svc.call(request())).unwrap());
    });
    let layered = || pigeonhole_cluster::metrics::GrpcMetricsLayer::new(1_000).layer(Write);
    g.bench_function("layer", |b| {
        let mut svc = layered();
        b.iter(|| rt.block_on(svc.call(request())).unwrap());
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    pigeonhole_cluster::metrics::install(port).unwrap();
    g.bench_function("layer_exporter", |b| {
        let mut svc = layered();
        b.iter(|| rt.block_on(svc.call(request())).unwrap());
    });
    g.finish();
}

criterion_group!(benches, rpc_layer);
criterion_main!(benches);
