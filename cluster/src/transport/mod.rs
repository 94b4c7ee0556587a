//! Node-to-node transport: how Raft messages and shard snapshots leave a node.
//!
//! The driver only sees the [`Transport`] trait, so the same driver runs over
//! gRPC in production ([`grpc`]) and over an in-process router with fault
//! filters in tests ([`local`]), as TiKV's test_raftstore does. Both obey the
//! same rules:
//! - `send` never blocks the driver: a full queue to a slow or dead peer drops
//!   messages (Raft retransmits), it never stalls the other peers;
//! - snapshots go on their own path, so a large one never delays heartbeats,
//!   and every chunk waits for the node's send budget ([`SendRate`]);
//! - the receiving side spools a snapshot to disk ([`SnapshotSpool`]) before
//!   the driver sees it, so a half-received snapshot never touches the engine.

pub mod grpc;
pub mod local;
pub mod rate;
pub(crate) mod spool;

pub use rate::SendRate;
pub use spool::{SnapshotSpool, SpoolWriter};

use crate::driver::Inbound;
use pigeonhole_engine::raft::eraftpb::Message;
use pigeonhole_engine::Engine;
use std::sync::Arc;

/// A Raft message of one shard.
#[derive(Debug, Clone)]
pub struct ShardMsg {
    /// The shard (Raft group).
    pub shard: u64,
    /// The message.
    pub msg: Message,
}

/// Messages from one node to another. No messages = a node heartbeat.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Sender node.
    pub from: u64,
    /// Receiver node.
    pub to: u64,
    /// The messages, in send order.
    pub msgs: Vec<ShardMsg>,
}

/// How a snapshot send ended, reported back to the sending driver.
pub type SnapshotReport = Box<dyn FnOnce(bool) + Send>;

/// A snapshot to stream: the engine state of `shard`, then `msg`.
pub struct SnapshotJob {
    /// Sender node.
    pub from: u64,
    /// Receiver node.
    pub to: u64,
    /// The shard.
    pub shard: u64,
    /// raft-rs's MsgSnapshot (its data names the shard, not the state).
    pub msg: Message,
    /// Where the state is read from.
    pub engine: Engine,
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// The node's snapshot send budget: every chunk waits for it.
    pub rate: Arc<SendRate>,
    /// Bytes of encoded chunks handed to the wire so far (NodeStatus shows
    /// it, so an operator sees how far a replica move's catch-up is).
    pub sent_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// Called once with whether the receiver got the whole stream.
    pub report: SnapshotReport,
}

impl std::fmt::Debug for SnapshotJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotJob")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

/// The driver's view of the network.
pub trait Transport: Send + Sync + 'static {
    /// Queues `env` for delivery. Never blocks; may drop.
    fn send(&self, env: Envelope);
    /// Streams a snapshot in the background; reports the outcome.
    fn send_snapshot(&self, job: SnapshotJob);
    /// Learns the address of a node that joined after this one started.
    /// Transports that route by node id (the in-process one) ignore it.
    fn add_peer(&self, _node: u64, _address: &str) {}
}

/// What a transport's receiving side hands messages to: the node's inbox and
/// its snapshot spool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct NodeInbox {
    pub(crate) node_id: u64,
    /// The node's drivers (each message goes to its shard's driver).
    pub(crate) drivers: Arc<crate::driver::pool::Drivers>,
    pub(crate) spool: Arc<SnapshotSpool>,
}

impl NodeInbox {
    /// The node this inbox belongs to.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Delivers raft messages. Drops them if the node is overloaded (Raft
    /// tolerates loss, and blocking here would stall the sender's stream).
    /// Returns `Err(Stopped)` once the node's driver is gone, so a server can
    /// end the stream and the peer reconnects to whatever replaced it.
    pub fn deliver(&self, env: Envelope) -> Result<bool, crate::ClusterError> {
        self.drivers.deliver(env)
    }

    /// Starts receiving a snapshot of `shard` from `from`.
    pub fn begin_snapshot(&self, from: u64, shard: u64) -> std::io::Result<SpoolWriter> {
        self.spool.begin(from, shard)
    }

    /// Hands a fully spooled snapshot to the driver.
    pub fn snapshot_ready(&self, writer: SpoolWriter, msg: Message) -> std::io::Result<bool> {
        let (from, shard, path) = writer.finish()?;
        Ok(self
            .drivers
            .try_send(Inbound::SnapshotReady { from, shard, path, msg })
            .is_ok())
    }
}
