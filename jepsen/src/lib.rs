//! # pigeonhole-jepsen
//!
//! Jepsen-style testing in Rust (real Jepsen needs Clojars, which these
//! machines cannot reach): real `pigeonhole` processes, each in its own
//! network namespace, a workload like the routing tier's, faults, a
//! recorded history, and a checker that knows nothing of the server's code.
//!
//! - [`history`]: the operations and nemesis events, as JSON lines;
//! - [`checker`]: the properties, checked per mailbox by sort and sweep
//!   (the server assigns seqs, so nothing is NP-hard);
//! - the harness (`src/bin/pigeonhole-jepsen.rs` and `harness/`): network
//!   namespaces, the nemesis, the workload, the run loop;
//! - [`lostfs`]: a FUSE file system that loses unsynced writes at a
//!   simulated power cut.
//!
//! The checker is a library with its own tests (`tests/checker.rs`) that
//! feed it broken histories: a checker that cannot fail proves nothing.

pub mod checker;
pub mod harness;
pub mod history;
pub mod lostfs;
