//! The RPC layer: a tower layer around every gRPC service that counts and
//! times each request by method and status code, runs it in a `request`
//! span, and logs it when slow. Apart from the metric names and recording
//! calls (the parent module) because it is the one piece that knows HTTP/2
//! and gRPC framing: which methods exist (labels stay bounded), where a
//! status code is found (a header or a trailer), and when a request ends.

use super::{GRPC_DURATION, GRPC_REQUESTS};
use metrics::{counter, histogram};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::http;

/// Counts and times every gRPC request by method and status code, runs it
/// in a `request` span (method, request id; the handler adds namespace and
/// shard), and logs it if it took longer than the slow-request threshold.
#[derive(Debug, Clone, Copy)]
pub struct GrpcMetricsLayer {
    slow: Duration,
}

impl GrpcMetricsLayer {
    /// Requests slower than `slow_ms` are logged at WARN.
    pub fn new(slow_ms: u64) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            slow: Duration::from_millis(slow_ms),
        }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner, slow: self.slow }
    }
}

/// [`GrpcMetricsLayer`]'s service.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    slow: Duration,
}

/// The request id: the caller's `x-request-id` if it sent a short printable
/// one, else a fresh random one (so logs of one request can be found).
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_string)
}

/// The status code of a response: `grpc-status` in its headers (an error
/// answered at once, "trailers-only"), else OK (a unary answer's status is
/// in its trailers, and an OK one is what comes with headers and a body).
fn code_of(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

/// The methods the node serves, by service: the only `method` label
/// values besides `unknown` (a unit test checks them against the protos).
const SERVED: [(&str, &[&str]); 5] = [
    (
        "pigeonhole.v1.Mailbox",
        &[
            "Append",
            "AppendBatch",
            "Sync",
            "Subscribe",
            "Ack",
            "GetCursors",
            "Trim",
            "Delete",
        ],
    ),
    (
        "pigeonhole.v1.Admin",
        &[
            "GetShardMap",
            "NodeStatus",
            "TransferLeader",
            "ChangeMembership",
            "SetNodeState",
            "SetPreferredLeader",
            "JoinNode",
            "GetPlacement",
            "SetPlacement",
            "SplitShard",
            "GetAuth",
            "PutIdentity",
            "DeleteIdentity",
            "Grant",
            "Revoke",
            "CreateToken",
            "RevokeToken",
            "ListNamespaces",
            "SetNamespace",
            "SetMailboxHold",
            "SetLogLevel",
            "AcceptReplicaLoss",
            "BackupShard",
        ],
    ),
    ("pigeonhole.internal.v1.RaftTransport", &["Send", "Snapshot"]),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
    ("grpc.reflection.v1.ServerReflection", &["ServerReflectionInfo"]),
];

/// Every `service/method` label, built once.
fn labels() -> &'static std::collections::HashMap<String, &'static str> {
    static LABELS: std::sync::OnceLock<std::collections::HashMap<String, &'static str>> = std::sync::OnceLock::new();
    LABELS.get_or_init(|| {
        SERVED
            .iter()
            .flat_map(|(s, ms)| ms.iter().map(move |m| format!("{s}/{m}")))
            .map(|l| (l.clone(), &*Box::leak(l.into_boxed_str())))
            .collect()
    })
}

/// The `method` label: `service/method` if the node serves it, else
/// `unknown`, whatever the answer was (an unauthenticated call to a
/// made-up method is refused before routing), so no caller can mint
/// labels.
fn method_label(path: &str) -> &'static str {
    labels().get(path.trim_start_matches('/')).copied().unwrap_or("unknown")
}

/// Records a request once: when it is answered, or, if its future is
/// dropped first (the caller's `grpc-timeout` expired, or it went away),
/// as `Cancelled`.
struct Recorder {
    method: &'static str,
    start: Instant,
    done: bool,
}

impl Recorder {
    fn record(&mut self, code: tonic::Code) -> Duration {
        self.done = true;
        let took = self.start.elapsed();
        let labels = [("method", self.method), ("code", code_name(code))];
        counter!(GRPC_REQUESTS, &labels).increment(1);
        // Streams are answered with headers at their start (Subscribe) or
        // their end (the peers' Raft streams): their time is no latency.
        if !STREAMS.contains(&self.method) {
            histogram!(GRPC_DURATION, &labels).record(took.as_secs_f64());
        }
        took
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.done {
            self.record(tonic::Code::Cancelled);
        }
    }
}

/// Methods whose calls are streams, or long-polls that wait on purpose:
/// not timed, and never "slow".
const STREAMS: [&str; 7] = [
    "pigeonhole.v1.Mailbox/Subscribe",
    "pigeonhole.v1.Admin/BackupShard",
    "pigeonhole.v1.Mailbox/Sync",
    "pigeonhole.internal.v1.RaftTransport/Send",
    "pigeonhole.internal.v1.RaftTransport/Snapshot",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

/// A code's label: tonic's name for it (`Ok`, `Unavailable`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "Ok",
        C::Cancelled => "Cancelled",
        C::Unknown => "Unknown",
        C::InvalidArgument => "InvalidArgument",
        C::DeadlineExceeded => "DeadlineExceeded",
        C::NotFound => "NotFound",
        C::AlreadyExists => "AlreadyExists",
        C::PermissionDenied => "PermissionDenied",
        C::ResourceExhausted => "ResourceExhausted",
        C::FailedPrecondition => "FailedPrecondition",
        C::Aborted => "Aborted",
        C::OutOfRange => "OutOfRange",
        C::Unimplemented => "Unimplemented",
        C::Internal => "Internal",
        C::Unavailable => "Unavailable",
        C::DataLoss => "DataLoss",
        C::Unauthenticated => "Unauthenticated",
    }
}

impl<S, B, RB> tonic::codegen::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use tracing::Instrument as _;
        let path = req.uri().path().to_string();
        let span = tracing::info_span!(
            "request",
            method = %path.trim_start_matches('/'),
            id = %request_id(req.headers()),
            namespace = tracing::field::Empty,
            shard = tracing::field::Empty,
        );
        let mut recorder = Recorder {
            method: method_label(&path),
            start: Instant::now(),
            done: false,
        };
        let slow = self.slow;
        let fut = self.inner.call(req);
        // Unary calls collect the stages of the proposals they make
        // (`crate::stages`); streams are never "slow".
        let staged = !STREAMS.contains(&recorder.method);
        let stages = staged.then(|| std::sync::Arc::new(crate::stages::Stages::default()));
        Box::pin(
            async move {
                let res = match &stages {
                    Some(s) => crate::stages::scope(s.clone(), fut).await,
                    None => fut.await,
                };
                let code = match &res {
                    Ok(r) => code_of(r.headers()),
                    Err(_) => tonic::Code::Unknown,
                };
                let took = recorder.record(code);
                if took > slow && staged {
                    let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                    match stages.and_then(|s| s.describe(recorder.start, Instant::now())) {
                        Some(stages) => tracing::warn!(took_ms, code = ?code, %stages, "slow request"),
                        None => tracing::warn!(took_ms, code = ?code, "slow request"),
                    }
                }
                res
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_the_server_lacks_mint_no_labels() {
        assert_eq!(
            method_label("/pigeonhole.v1.Mailbox/Append"),
            "pigeonhole.v1.Mailbox/Append"
        );
        assert_eq!(
            method_label("/pigeonhole.v1.Admin/SetLogLevel"),
            "pigeonhole.v1.Admin/SetLogLevel"
        );
        for made_up in [
            "/pigeonhole.v1.Mailbox/Append2",
            "/x/y-123",
            "/pigeonhole.v1.Mailbox",
            "",
            "/",
        ] {
            assert_eq!(method_label(made_up), "unknown", "{made_up}");
        }
    }

    /// The served methods are exactly the protos' rpcs (a new rpc left
    /// out would count as `unknown`).
    #[test]
    fn the_served_methods_are_the_protos_rpcs() {
        let rpcs = |text: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("rpc "))
                .filter_map(|l| l.split('(').next())
                .map(|m| m.trim().to_string())
                .collect()
        };
        for (service, proto) in [
            (
                "pigeonhole.v1.Mailbox",
                include_str!("../../../proto/pigeonhole/v1/mailbox.proto"),
            ),
            (
                "pigeonhole.v1.Admin",
                include_str!("../../../proto/pigeonhole/v1/admin.proto"),
            ),
            (
                "pigeonhole.internal.v1.RaftTransport",
                include_str!("../../../proto/pigeonhole/internal/v1/raft.proto"),
            ),
        ] {
            let served: Vec<String> = SERVED
                .iter()
                .find(|(s, _)| *s == service)
                .map(|(_, ms)| ms.iter().map(|m| (*m).to_string()).collect())
                .unwrap_or_default();
            assert_eq!(served, rpcs(proto), "{service}");
        }
    }

    #[test]
    fn an_answered_request_is_recorded_once() {
        let mut r = Recorder {
            method: method_label("/pigeonhole.v1.Mailbox/Append"),
            start: Instant::now(),
            done: false,
        };
        r.record(tonic::Code::Ok);
        assert!(r.done, "answered: its drop records nothing more");
        let dropped = Recorder {
            method: "unknown",
            start: Instant::now(),
            done: false,
        };
        assert!(!dropped.done, "dropped unanswered: recorded as Cancelled");
    }

    #[test]
    fn the_code_is_the_header_status_or_ok() {
        let mut h = http::HeaderMap::new();
        assert_eq!(code_of(&h), tonic::Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
        assert_eq!(code_of(&h), tonic::Code::ResourceExhausted);
        h.insert("grpc-status", http::HeaderValue::from_static("junk"));
        assert_eq!(code_of(&h), tonic::Code::Ok);
    }
}
