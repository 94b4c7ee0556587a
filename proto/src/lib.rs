//! The wire contract of Pigeonhole, generated from `proto/pigeonhole/**.proto`.
//!
//! - [`v1`] is the public API (`pigeonhole.v1`): the `Mailbox` service the
//!   routing tier calls. Its `.proto` file is the source of truth; every field
//!   documents its limits there.
//! - [`internal::v1`] is what shard Raft logs carry (`pigeonhole.internal.v1`).
//!   It is persisted, so it evolves like a storage format.
//!
//! - [`placement`] is the placement hash, which clients route with.
//! - [`codec`] is the public API's gRPC codec: a request that cannot be
//!   decoded is INVALID_ARGUMENT naming the field, not INTERNAL.
//! - [`hints`] is the leader hint a node adds to a write it answered for a
//!   shard it does not lead, so clients route the next write to the leader.
//!
//! The generated code is kept in its own crate so that the engine, the cluster
//! and the client all depend on one copy of the contract and nothing else.

/// `pigeonhole.v1`: the public Mailbox API.
#[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("pigeonhole.v1");

    /// The encoded `FileDescriptorSet` of `pigeonhole.v1`, for server
    /// reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("pigeonhole_v1_descriptor");
}

/// Internal, persisted messages.
pub mod internal {
    /// `pigeonhole.internal.v1`: the Raft command format and the node-to-node
    /// transport service.
    #[allow(missing_docs, clippy::all, clippy::pedantic, missing_debug_implementations)]
    pub mod v1 {
        tonic::include_proto!("pigeonhole.internal.v1");
    }
}

pub use prost;

pub mod codec;
pub mod hints;
pub mod placement;
