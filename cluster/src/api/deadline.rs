//! The client's deadline, from the `grpc-timeout` request header, so that a
//! request gives up when its caller has stopped waiting instead of holding a
//! proposal slot or a ReadIndex for the node's full `request_timeout_ms`.
//!
//! tonic's server also enforces the header, but by dropping the handler and
//! answering CANCELLED. The handlers stop a little earlier ([`margin`]: 20 ms,
//! or a quarter of a shorter timeout), so the client sees the code the API
//! promises (DEADLINE_EXCEEDED for a write whose outcome is unknown; an
//! empty page for a long-poll) instead.
//!
//! The Mailbox handlers read the deadline themselves ([`of`]), because what
//! a late answer is differs by RPC. Every Admin RPC answers the same way
//! when its caller's deadline passes, so the Admin service is wrapped once
//! in [`Deadlined`] rather than each of its handlers being changed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::http;
use tonic::{Request, Status};

/// How long before the client's deadline a handler stops waiting, at most,
/// so that its own answer wins the race with tonic's timer and the network.
pub const DEADLINE_MARGIN_MS: u64 = 20;

/// ... and at most this fraction (1 / divisor) of the client's timeout.
/// Why: a flat 20 ms left nothing of a timeout of 20 ms or less, so such a
/// call gave up at its timer's first tick (about 1 ms): an append not done
/// by then answered DEADLINE_EXCEEDED while its proposal went on and
/// committed, and a long-poll returned at once. A quarter keeps three
/// quarters of a short budget for the work and still ends the handler
/// before tonic's timer.
pub const DEADLINE_MARGIN_TIMEOUT_DIVISOR: u32 = 4;

/// The margin taken off a client's `timeout`: [`DEADLINE_MARGIN_MS`], or a
/// [`DEADLINE_MARGIN_TIMEOUT_DIVISOR`]th of a timeout too short for it.
pub fn margin(timeout: Duration) -> Duration {
    Duration::from_millis(DEADLINE_MARGIN_MS).min(timeout / DEADLINE_MARGIN_TIMEOUT_DIVISOR)
}

/// The instant a handler should give up by, if the client set a deadline.
pub fn of<T>(req: &Request<T>, received: Instant) -> Option<Instant> {
    until(req.metadata().get("grpc-timeout")?.to_str().ok()?, received)
}

/// The instant to give up by for a `grpc-timeout` header value, the margin
/// taken off.
fn until(header: &str, received: Instant) -> Option<Instant> {
    let timeout = parse_grpc_timeout(header)?;
    let budget = timeout.saturating_sub(margin(timeout));
    Some(received + budget)
}

/// What a call wrapped in [`Deadlined`] answers when its caller's deadline
/// passes first. The node may still carry out what the call asked for (a
/// proposal already made is not withdrawn), so the outcome is unknown, as a
/// Mailbox write's is at DEADLINE_EXCEEDED.
pub const EXPIRED: &str = "the call's deadline (grpc-timeout) passed before the node answered; \
                           what it asked for may or may not be done: read the state back before retrying";

/// A gRPC service whose calls stop at the caller's `grpc-timeout`, less
/// [`margin`], with DEADLINE_EXCEEDED ([`EXPIRED`]). Without
/// the header a call runs as the inner service runs it (each node call is
/// bounded by the node's own `request_timeout_ms`). Dropping the inner
/// future at the deadline is what tonic's own timeout already did, a margin
/// later and answering CANCELLED; the driver discards an answer whose caller
/// is gone.
#[derive(Debug, Clone)]
pub struct Deadlined<S> {
    inner: S,
}

impl<S> Deadlined<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Deadlined<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for Deadlined<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| until(v, Instant::now()));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Some(deadline) = deadline else {
                return fut.await;
            };
            match tokio::time::timeout_at(deadline.into(), fut).await {
                Ok(res) => res,
                Err(_) => Ok(Status::deadline_exceeded(EXPIRED).into_http()),
            }
        })
    }
}

/// Parses a `grpc-timeout` value: at most 8 ASCII digits and a unit
/// (H, M, S, m, u, n), per the gRPC over HTTP/2 spec. Anything else is
/// ignored (None), as the spec allows, rather than failing the request.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let unit = v.chars().last()?;
    let digits = v.get(..v.len() - unit.len_utf8())?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n.saturating_mul(3600)),
        'M' => Duration::from_secs(n.saturating_mul(60)),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_junk() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for junk in ["", "m", "123456789m", "12x", "-1S", "1.5S", "é"] {
            assert_eq!(parse_grpc_timeout(junk), None, "{junk:?}");
        }
    }

    /// A service whose calls answer OK after `delay`.
    #[derive(Clone)]
    struct Slow {
        delay: Duration,
    }

    impl tonic::codegen::Service<http::Request<()>> for Slow {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(http::Response::new(tonic::body::Body::empty()))
            })
        }
    }

    fn grpc_code(r: &http::Response<tonic::body::Body>) -> Option<String> {
        r.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string())
    }

    #[tokio::test]
    async fn a_wrapped_call_ends_at_its_callers_deadline_with_deadline_exceeded() {
        use tonic::codegen::Service as _;
        let mut svc = Deadlined::new(Slow {
            delay: Duration::from_secs(30),
        });
        let mut req = http::Request::new(());
        req.headers_mut().insert("grpc-timeout", "100m".parse().unwrap());
        let t = Instant::now();
        let r = svc.call(req).await.unwrap();
        let took = t.elapsed();
        // DEADLINE_EXCEEDED is code 4.
        assert_eq!(grpc_code(&r).as_deref(), Some("4"));
        assert!(took >= Duration::from_millis(100 - DEADLINE_MARGIN_MS), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn a_wrapped_call_without_a_deadline_or_within_it_is_the_inner_answer() {
        use tonic::codegen::Service as _;
        let mut svc = Deadlined::new(Slow {
            delay: Duration::from_millis(50),
        });
        // No header: the inner call runs to its end.
        let r = svc.call(http::Request::new(())).await.unwrap();
        assert_eq!(grpc_code(&r), None);
        // A deadline it meets: the inner answer, untouched.
        let mut req = http::Request::new(());
        req.headers_mut().insert("grpc-timeout", "5S".parse().unwrap());
        let r = svc.call(req).await.unwrap();
        assert_eq!(grpc_code(&r), None);
    }

    #[test]
    fn the_deadline_leaves_a_margin() {
        let mut req = Request::new(());
        let now = Instant::now();
        assert_eq!(of(&req, now), None);
        req.metadata_mut().insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(
            of(&req, now),
            Some(now + Duration::from_millis(100 - DEADLINE_MARGIN_MS))
        );
    }

    #[test]
    fn a_short_deadline_keeps_three_quarters_of_its_time() {
        let now = Instant::now();
        let at = |header: &str| until(header, now).map(|t| t.duration_since(now));
        // The flat margin from 80 ms up ...
        assert_eq!(at("1S"), Some(Duration::from_millis(980)));
        assert_eq!(at("80m"), Some(Duration::from_millis(60)));
        // ... a quarter below: a 20 ms call still has 15 ms to work (with
        // the flat margin it had none and always failed).
        assert_eq!(at("20m"), Some(Duration::from_millis(15)));
        assert_eq!(at("8m"), Some(Duration::from_millis(6)));
        assert_eq!(at("400u"), Some(Duration::from_micros(300)));
        assert_eq!(at("0m"), Some(Duration::ZERO));
    }
}
