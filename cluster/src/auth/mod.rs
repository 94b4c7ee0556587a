//! Access control: who may call which RPC on which namespace
//! (docs/security.md, D41).
//!
//! - [`book`]: identities, grants and tokens, the rules a change must keep,
//!   the lookups a check makes (pure);
//! - [`check`]: the per-request check (token or client certificate → an
//!   identity → its roles on the namespace), against the book each node
//!   reads from its own metadata replica;
//! - [`admin`]: the admin RPCs' writes, each a compare-and-set of the one
//!   stored book through the metadata group.

pub mod admin;
pub mod book;
pub mod check;

pub use check::{Auth, Caller};

/// SHA-256 of `data` (tokens' secrets are kept hashed).
pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().to_vec()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
