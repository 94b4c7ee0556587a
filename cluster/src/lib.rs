//! # pigeonhole-cluster
//!
//! The multi-Raft node. A node hosts replicas of many shards; each shard is a
//! raft-rs `RawNode` whose log and state machine live in the node's one
//! storage engine. Mailboxes map to shards by a stable hash of the user id
//! ([`hash`], [`placement`]).
//!
//! Why this shape (see docs/architecture.md for the full write and read paths):
//! - **One driver thread per node** ([`driver`]) runs every replica: it
//!   collects the Ready of all shards and persists them with one WriteBatch
//!   and one fsync, so replication throughput comes from group commit, not
//!   from threads. raft-rs does no I/O; the driver does all of it.
//! - **Proposals are answered from local apply.** Apply is deterministic, so
//!   the node that took a request answers it when it applies the entry,
//!   whichever node led. A follower's proposal is forwarded by raft-rs itself.
//! - **The transport is a trait** ([`transport`]): gRPC between real nodes,
//!   an in-process router with drop/delay/partition filters in tests.
//! - **Idle shards hibernate**; one node-level heartbeat per peer keeps
//!   failure detection working while they sleep.
//!
//! Module map: [`auth`] (who may call what, per namespace), [`config`] (node and Raft limits), [`settings`] (the
//! server's flags, environment and config file), [`server`], [`api`], [`error`], [`hash`],
//! [`placement`] (shard map), [`nodes`] (node states), [`join`] (nodes that
//! join a running cluster), [`balance`] and [`moves`] (the placement
//! loop's plans and replica moves), [`driver`] (the loop), [`node`] (the handle),
//! [`transport`] (`local`, `grpc`, snapshot spool), [`restore`] (seeding a new cluster from a backup), [`stages`] (where a slow write spent its time), [`watch`] (which
//! waiting readers a write or a leader loss concerns).

pub mod api;
pub mod auth;
pub mod balance;
pub mod config;
pub mod damage;
pub mod driver;
pub mod error;
pub mod hash;
pub mod join;
pub mod logging;
pub mod meta_poll;
pub mod metrics;
pub mod moves;
pub mod node;
pub mod nodes;
pub mod placement;
pub mod quota;
pub mod restore;
pub mod retention;
pub mod server;
pub mod settings;
pub mod sizes;
pub mod split;
pub mod stages;
pub mod systemd;
pub mod transport;
pub mod watch;

pub use config::{BootstrapParams, InitialCluster, NodeConfig, RaftTuning};
pub use driver::{ProposeResult, Role, ShardStatus};
pub use error::ClusterError;
pub use node::{MembershipChange, Node};
pub use placement::{ShardDesc, ShardMap};
