//! # pigeonhole-client
//!
//! The Rust SDK the routing tier links to talk to a Pigeonhole cluster, and
//! (in `src/bin/phctl.rs`) `phctl`, the admin CLI built on it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pigeonhole_client::Error> {
//! use pigeonhole_client::{Client, ClientConfig, mailbox};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7070"])).await?;
//! let inbox = mailbox("messenger", b"alice");
//! let r = client.append(&inbox, b"ciphertext".to_vec(), b"msg-0001".to_vec()).await?;
//! let page = client.sync(&inbox, r.seq - 1, Default::default()).await?;
//! assert_eq!(page.messages[0].seq, r.seq);
//! # Ok(()) }
//! ```
//!
//! Module map:
//! - [`client`]: the [`Client`] handle, its deadlines and retry loop;
//! - [`routing`]: the shard map and node choice (pure, unit-tested);
//! - [`batch`]: `append_batch`, grouped per leader, retried per item;
//! - [`coalesce`]: concurrent appends to one node share one call;
//! - [`subscription`]: Subscribe that resumes after a failover;
//! - [`error`]: what a call ends with, split into "refused" and "gave up".
//!
//! Dependencies: only the wire contract (`pigeonhole-proto`), tonic and
//! tokio — never the server's crates.

pub mod batch;
pub mod client;
pub mod coalesce;
pub mod error;
pub mod routing;
pub mod subscription;

/// Payloads are `Bytes` (a `Vec<u8>` converts without a copy).
pub use bytes::Bytes;
pub use client::{new_idempotency_key, retry_delay, Client, ClientConfig, Conn, Credentials, SyncOptions};
pub use coalesce::{CoalesceConfig, CoalesceStats};
pub use error::Error;
pub use pigeonhole_proto::v1 as pb;
pub use pigeonhole_tls::TlsFiles;
pub use subscription::{Event, Subscription};

/// A mailbox id.
pub fn mailbox(namespace: &str, user_id: &[u8]) -> pb::MailboxId {
    pb::MailboxId {
        namespace: namespace.to_string(),
        user_id: user_id.to_vec(),
    }
}
