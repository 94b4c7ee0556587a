//! The client's deadline, from the `grpc-timeout` request header, so that a
//! request gives up when its caller has stopped waiting instead of holding a
//! proposal slot or a ReadIndex for the node's full `request_timeout_ms`.
//!
//! tonic's server also enforces the header, but by dropping the handler and
//! answering CANCELLED. The handlers stop [`DEADLINE_MARGIN_MS`] earlier, so
//! the client sees the code the API promises (DEADLINE_EXCEEDED for a write
//! whose outcome is unknown; an empty page for a long-poll) instead.

use std::time::{Duration, Instant};
use tonic::Request;

/// How long before the client's deadline a handler stops waiting, so that
/// its own answer wins the race with tonic's timer and the network.
pub const DEADLINE_MARGIN_MS: u64 = 20;

/// The instant a handler should give up by, if the client set a deadline.
pub fn of<T>(req: &Request<T>, received: Instant) -> Option<Instant> {
    let header = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(header)?;
    let budget = timeout.saturating_sub(Duration::from_millis(DEADLINE_MARGIN_MS));
    Some(received + budget)
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
}
