//! The client-facing gRPC API: `pigeonhole.v1.Mailbox` ([`mailbox`]; where a
//! mailbox lives and what a misrouted call is told: `mailbox::routing`),
//! `pigeonhole.v1.Admin` ([`admin`]: shard map, node status, leader
//! transfer, membership changes (checked in `membership`), access control and namespaces: [`tenancy_rpc`], backups: [`backup`]), the check of every call against
//! the caller's roles ([`crate::auth`]), and the mapping of every error to a status with rich details
//! ([`status`]). Handlers honour the client's `grpc-timeout` ([`deadline`]).

pub mod admin;
pub mod backup;
pub mod deadline;
pub mod mailbox;
mod membership;
pub mod status;
pub mod subscribe;
mod tenancy_rpc;

pub use admin::AdminService;
pub use mailbox::{ApiLimits, MailboxService};
