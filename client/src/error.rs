//! What a call can end with, split the way a caller must act on it (as
//! openraft splits fatal from retryable errors):
//!
//! - [`Error::Rejected`]: the cluster answered and said no. Retrying the same
//!   request cannot help (bad input, a failed `expected_last_seq`, a trimmed
//!   cursor, a reused key). The status carries the details.
//! - [`Error::Exhausted`]: every attempt failed with a retryable error until
//!   the call's deadline. For a write the outcome is unknown: call again
//!   with the same idempotency key to learn it.
//! - [`Error::NoEndpoint`]: no endpoint answered, so the client could not
//!   even learn the shard map.
//! - [`Error::Protocol`]: the cluster broke a promise the client checks
//!   (a gap or a reordering in a subscription). This is a bug report.

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster refused the request; do not retry it as is.
    #[error("rejected: {} ({:?})", .0.message(), .0.code())]
    Rejected(Status),
    /// Retryable failures until the deadline. A write may or may not have
    /// committed; retry with the same idempotency key.
    #[error("gave up after {attempts} attempts over {elapsed_ms} ms; last error: {} ({:?})", .last.message(), .last.code())]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed_ms: u64,
        /// The last attempt's status.
        last: Status,
    },
    /// No endpoint could be reached.
    #[error("no endpoint answered: {0}")]
    NoEndpoint(String),
    /// The cluster broke an ordering promise (a bug; please report it).
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl Error {
    /// The gRPC status behind the error, when there is one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Rejected(s) | Error::Exhausted { last: s, .. } => Some(s),
            _ => None,
        }
    }

    /// The gRPC code (UNAVAILABLE for `NoEndpoint`, INTERNAL for `Protocol`).
    pub fn code(&self) -> Code {
        match self {
            Error::Rejected(s) | Error::Exhausted { last: s, .. } => s.code(),
            Error::NoEndpoint(_) => Code::Unavailable,
            Error::Protocol(_) => Code::Internal,
        }
    }

    /// A numeric detail the server attached (ErrorInfo metadata), e.g.
    /// `last_seq` on a failed `expected_last_seq`, `low_watermark` on a
    /// trimmed cursor, `seq` on a reused idempotency key.
    pub fn detail(&self, key: &str) -> Option<u64> {
        self.status().and_then(|s| status_detail(s, key))
    }
}

/// A numeric ErrorInfo metadata value of a status.
pub fn status_detail(s: &Status, key: &str) -> Option<u64> {
    s.get_error_details()
        .error_info()
        .and_then(|i| i.metadata.get(key))
        .and_then(|v| v.parse().ok())
}

/// Whether a failed attempt may be retried. Every Pigeonhole write is safe to
/// repeat (appends by idempotency key, acks only move forward, trims and
/// deletes are idempotent), so anything that is not a definite answer is
/// retried:
/// - UNAVAILABLE: an election, a node down or busy, a refused connection;
/// - DEADLINE_EXCEEDED: this attempt's time ran out (outcome unknown);
/// - CANCELLED: tonic's own timer beat the server's answer;
/// - UNKNOWN: a connection that broke mid-call (tonic maps h2 resets here);
///   the server itself never answers UNKNOWN.
pub fn is_retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_answers_are_retried() {
        for c in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unknown,
        ] {
            assert!(is_retryable(c), "{c:?}");
        }
        for c in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::AlreadyExists,
            Code::OutOfRange,
            Code::NotFound,
            Code::ResourceExhausted,
            Code::Internal,
        ] {
            assert!(!is_retryable(c), "{c:?}");
        }
    }
}
