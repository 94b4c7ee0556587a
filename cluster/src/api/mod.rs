//! The client-facing gRPC API: `pigeonhole.v1.Mailbox` ([`mailbox`]) and the
//! mapping of every error to a status with rich details ([`status`]).

pub mod mailbox;
pub mod status;

pub use mailbox::{ApiLimits, MailboxService};
