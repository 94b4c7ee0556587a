//! Ports for test servers, shared by the cluster and client test helpers
//! (the client's includes this file by path).
//!
//! The OS hands out a free port for a bind to port 0, and it is free again
//! once that listener is dropped, so two tests running side by side in one
//! test binary could both be given it; the second server then fails with
//! "Address already in use" (seen in CI: a 4-node cluster started with 3
//! nodes, and a leader transfer to the missing node never happened). Every
//! port is therefore handed out at most once per process.

// Test support: a failure here is a test's failure.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Mutex;

/// Attempts at finding a port not yet handed out, at most.
const PORT_TRIES_MAX: usize = 10_000;

/// A port that is free now and that no other caller in this process got.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..PORT_TRIES_MAX {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(port)
        {
            return port;
        }
    }
    panic!("no port left that this process has not handed out already ({PORT_TRIES_MAX} tries)");
}
