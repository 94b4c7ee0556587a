//! The production transport: tonic gRPC streams between nodes.
//!
//! - One long-lived client stream per peer carries [`RaftFrame`]s. Each peer
//!   has its own task and its own bounded queue, so a slow or dead peer fills
//!   only its own queue (and then loses messages, which Raft retransmits); it
//!   never blocks the driver or the other peers.
//! - A broken stream reconnects with exponential backoff (50 ms doubling to
//!   2 s, with jitter, so a restarted cluster does not reconnect in lockstep).
//! - Snapshots use a separate RPC per transfer, streaming engine chunks read
//!   on a blocking thread, so a large snapshot never delays heartbeats.
//! - Frames carry the cluster id; frames of another cluster are refused.
//! - With TLS (docs/security.md) a node dials its peers over TLS, presenting
//!   its own certificate, re-read at every connect so a rotated certificate
//!   is used from the next reconnect; and the receiving side
//!   ([`RaftService::with_peer_check`]) takes frames only from a connection
//!   whose certificate is a node's and names the host of the member the
//!   frames claim to come from.

use super::{Envelope, NodeInbox, ShardMsg, SnapshotJob, Transport};
use pigeonhole_engine::raft::eraftpb::Message;
use pigeonhole_engine::EngineError;
use pigeonhole_proto::internal::v1::raft_transport_client::RaftTransportClient;
use pigeonhole_proto::internal::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
use pigeonhole_proto::internal::v1::{RaftFrame, ShardMessage, SnapshotFrame, TransportDone};
use protobuf::Message as _;
use rand::Rng;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status, Streaming};

/// Envelopes queued per peer before new ones are dropped.
pub const PEER_QUEUE_MAX: usize = 4_096;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest frame accepted from a peer (a snapshot chunk plus framing).
pub const FRAME_BYTES_MAX: usize = 80 << 20;

type Peers = BTreeMap<u64, (String, mpsc::Sender<Envelope>)>;

/// Sends to peers over gRPC.
#[derive(Debug)]
pub struct GrpcTransport {
    cluster_id: u64,
    /// Written only when a node joins (`add_peer`); every send reads it.
    peers: std::sync::RwLock<Peers>,
    runtime: tokio::runtime::Handle,
    tls: Option<pigeonhole_tls::TlsFiles>,
}

impl GrpcTransport {
    /// Starts one sender task per peer on `runtime`. `peers` maps node id to
    /// `host:port` (this node excluded). With `tls`, peers are dialled over
    /// TLS with this node's certificate.
    pub fn new(
        cluster_id: u64,
        peers: BTreeMap<u64, String>,
        runtime: tokio::runtime::Handle,
        tls: Option<pigeonhole_tls::TlsFiles>,
    ) -> Self {
        let t = GrpcTransport {
            cluster_id,
            peers: std::sync::RwLock::new(BTreeMap::new()),
            runtime,
            tls,
        };
        for (id, addr) in peers {
            t.add_peer(id, &addr);
        }
        t
    }

    fn peers(&self) -> std::sync::RwLockReadGuard<'_, Peers> {
        self.peers.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The address a peer is known at.
    pub fn address_of(&self, node: u64) -> Option<String> {
        self.peers().get(&node).map(|(a, _)| a.clone())
    }
}

fn endpoint(addr: &str, tls: Option<&pigeonhole_tls::TlsFiles>) -> Result<Endpoint, String> {
    Ok(pigeonhole_tls::client::endpoint(addr, tls)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

fn backoff(cur: Duration) -> Duration {
    let next = (cur * 2).min(BACKOFF_MAX);
    let jitter = rand::thread_rng().gen_range(0..=u64::try_from(next.as_millis() / 4).unwrap_or(0));
    next + Duration::from_millis(jitter)
}

fn encode(cluster_id: u64, env: Envelope) -> RaftFrame {
    RaftFrame {
        cluster_id,
        from_node: env.from,
        to_node: env.to,
        messages: env
            .msgs
            .into_iter()
            .filter_map(|m| {
                Some(ShardMessage {
                    shard: m.shard,
                    message: m.msg.write_to_bytes().ok()?,
                })
            })
            .collect(),
    }
}

async fn peer_loop(
    cluster_id: u64,
    addr: String,
    tls: Option<pigeonhole_tls::TlsFiles>,
    mut rx: mpsc::Receiver<Envelope>,
) {
    let mut delay = BACKOFF_MIN;
    let mut complained = false;
    loop {
        let client = match endpoint(&addr, tls.as_ref()) {
            Ok(ep) => ep.connect().await.ok().map(RaftTransportClient::new),
            Err(e) => {
                // Unreadable TLS files: say so once, keep retrying (they
                // may be mid-rotation).
                if !complained {
                    complained = true;
                    tracing::warn!("cannot dial peer {addr}: {e}");
                }
                None
            }
        };
        if let Some(mut client) = client {
            let (tx, stream_rx) = mpsc::channel::<RaftFrame>(256);
            let call = tokio::spawn(async move { client.send(ReceiverStream::new(stream_rx)).await });
            delay = BACKOFF_MIN;
            loop {
                let Some(env) = rx.recv().await else { return };
                if tx.send(encode(cluster_id, env)).await.is_err() {
                    break; // the stream ended: reconnect
                }
                if call.is_finished() {
                    break;
                }
            }
            call.abort();
        }
        // While disconnected, drop what queues up: Raft retransmits, and old
        // heartbeats are worthless.
        let until = tokio::time::Instant::now() + delay;
        while let Ok(Some(_)) = tokio::time::timeout_at(until, rx.recv()).await {}
        if rx.is_closed() {
            return;
        }
        delay = backoff(delay);
    }
}

impl Transport for GrpcTransport {
    fn send(&self, env: Envelope) {
        if let Some((_, tx)) = self.peers().get(&env.to) {
            let _ = tx.try_send(env);
        }
    }

    fn send_snapshot(&self, job: SnapshotJob) {
        let Some(addr) = self.peers().get(&job.to).map(|(a, _)| a.clone()) else {
            (job.report)(false);
            return;
        };
        let cluster_id = self.cluster_id;
        let tls = self.tls.clone();
        self.runtime.spawn(async move {
            let ok = stream_snapshot(
                cluster_id,
                &addr,
                tls.as_ref(),
                job.from,
                job.to,
                job.shard,
                job.msg,
                job.engine,
                job.chunk_bytes,
                job.rate,
                job.sent_bytes,
            )
            .await
            .is_ok();
            (job.report)(ok);
        });
    }

    /// A node's address never changes (a join is per address), so a peer
    /// already known keeps its sender task.
    fn add_peer(&self, node: u64, address: &str) {
        let mut peers = self.peers.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if peers.contains_key(&node) {
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        self.runtime
            .spawn(peer_loop(self.cluster_id, address.to_string(), self.tls.clone(), rx));
        peers.insert(node, (address.to_string(), tx));
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_snapshot(
    cluster_id: u64,
    addr: &str,
    tls: Option<&pigeonhole_tls::TlsFiles>,
    from: u64,
    to: u64,
    shard: u64,
    msg: Message,
    engine: pigeonhole_engine::Engine,
    chunk_bytes: usize,
    rate: std::sync::Arc<super::SendRate>,
    sent_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), String> {
    let mut client = RaftTransportClient::new(endpoint(addr, tls)?.connect().await.map_err(|e| e.to_string())?)
        .max_decoding_message_size(FRAME_BYTES_MAX)
        .max_encoding_message_size(FRAME_BYTES_MAX);
    let raft_message = msg.write_to_bytes().map_err(|e| e.to_string())?;
    // A small queue: the exporter runs at most a few chunks ahead of the wire.
    let (tx, rx) = mpsc::channel::<SnapshotFrame>(4);
    let export = tokio::task::spawn_blocking(move || {
        engine.export_snapshot(shard, chunk_bytes, |chunk| {
            let last = chunk.last;
            let bytes = chunk.encode();
            let n = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
            rate.acquire(n);
            sent_bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            let frame = SnapshotFrame {
                cluster_id,
                from_node: from,
                to_node: to,
                shard,
                chunk: bytes,
                raft_message: if last { raft_message.clone() } else { Vec::new() },
            };
            tx.blocking_send(frame)
                .map_err(|_| EngineError::InvalidCall("snapshot stream closed".into()))
        })
    });
    let sent = client.snapshot(ReceiverStream::new(rx)).await;
    let exported = export.await.map_err(|e| e.to_string())?;
    exported.map_err(|e| e.to_string())?;
    sent.map_err(|e| e.to_string())?;
    Ok(())
}

/// The receiving side: a tonic service that feeds the node's inbox.
#[derive(Debug, Clone)]
pub struct RaftService {
    cluster_id: u64,
    inbox: NodeInbox,
    /// With TLS: where members are, to check a sender's certificate.
    members: Option<std::sync::Arc<GrpcTransport>>,
}

/// Whether a connection may send frames as a node: `None` when it may
/// send as any (no TLS), else the verified certificate's names.
type Sender = Option<pigeonhole_tls::PeerCert>;

impl RaftService {
    /// The service for a node's inbox.
    pub fn new(cluster_id: u64, inbox: NodeInbox) -> Self {
        RaftService {
            cluster_id,
            inbox,
            members: None,
        }
    }

    /// Takes frames only from connections whose verified certificate is a
    /// node's ([`pigeonhole_tls::NODE_COMMON_NAME`]) and names the host of
    /// the member each frame claims to come from, as `members` knows it.
    pub fn with_peer_check(mut self, members: std::sync::Arc<GrpcTransport>) -> Self {
        self.members = Some(members);
        self
    }

    /// The sender's certificate, if this service checks them: a connection
    /// without one, or with a client's, is refused here.
    fn sender<T>(&self, req: &Request<T>) -> Result<Sender, Status> {
        if self.members.is_none() {
            return Ok(None);
        }
        let cert = match pigeonhole_tls::PeerCert::of_request(req) {
            None => {
                return Err(Status::unauthenticated(
                    "the Raft transport needs a node certificate (mTLS); this connection presented none",
                ))
            }
            Some(Err(e)) => return Err(Status::unauthenticated(format!("peer certificate: {e}"))),
            Some(Ok(c)) => c,
        };
        if !cert.is_node() {
            return Err(Status::permission_denied(format!(
                "the Raft transport is for nodes: certificate common name {:?} is not {:?}",
                cert.common_name.as_deref().unwrap_or(""),
                pigeonhole_tls::NODE_COMMON_NAME
            )));
        }
        Ok(Some(cert))
    }

    /// Whether `sender` may send as `from`: its certificate names the host
    /// of `from`'s address.
    fn check_sender(&self, sender: &Sender, from: u64) -> Result<(), Status> {
        let (Some(members), Some(cert)) = (&self.members, sender) else {
            return Ok(());
        };
        let Some(addr) = members.address_of(from) else {
            return Err(Status::permission_denied(format!(
                "node {from} is not a member this node knows (yet)"
            )));
        };
        let host = pigeonhole_tls::peer::host_of(&addr);
        if !cert.names_host(host) {
            return Err(Status::permission_denied(format!(
                "the certificate does not name {host}, the host of node {from} ({addr}); it names {:?} {:?}",
                cert.dns_names, cert.ips
            )));
        }
        Ok(())
    }

    /// As a tonic server, with the frame size limit set.
    pub fn into_server(self) -> RaftTransportServer<RaftService> {
        RaftTransportServer::new(self)
            .max_decoding_message_size(FRAME_BYTES_MAX)
            .max_encoding_message_size(FRAME_BYTES_MAX)
    }

    fn check(&self, cluster_id: u64, to: u64) -> Result<(), Status> {
        if cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "cluster_id {cluster_id} is not this cluster ({})",
                self.cluster_id
            )));
        }
        if to != self.inbox.node_id() {
            return Err(Status::failed_precondition(format!(
                "frame for node {to} reached node {}",
                self.inbox.node_id()
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(&self, req: Request<Streaming<RaftFrame>>) -> Result<Response<TransportDone>, Status> {
        let sender = self.sender(&req)?;
        let mut stream = req.into_inner();
        // A stream comes from one node; its certificate is checked against
        // that node once, and again if the claimed sender ever changes.
        let mut checked_from = None;
        while let Some(frame) = stream.next().await {
            let frame = frame?;
            // Who is sending first: a stranger learns nothing, not even
            // this cluster's id.
            if checked_from != Some(frame.from_node) {
                self.check_sender(&sender, frame.from_node)?;
                checked_from = Some(frame.from_node);
            }
            self.check(frame.cluster_id, frame.to_node)?;
            self.inbox
                .deliver(decode_frame(frame)?)
                .map_err(|_| Status::unavailable("node stopped"))?;
        }
        Ok(Response::new(TransportDone {}))
    }

    async fn snapshot(&self, req: Request<Streaming<SnapshotFrame>>) -> Result<Response<TransportDone>, Status> {
        let sender = self.sender(&req)?;
        let mut stream = req.into_inner();
        let mut writer = None;
        // One snapshot, of one shard, from one sender: pinned by the first
        // frame (checked against the certificate before anything is read).
        let mut pinned: Option<(u64, u64)> = None;
        while let Some(frame) = stream.next().await {
            let frame = frame?;
            match pinned {
                None => {
                    self.check_sender(&sender, frame.from_node)?;
                    pinned = Some((frame.from_node, frame.shard));
                }
                Some(p) if p != (frame.from_node, frame.shard) => {
                    return Err(Status::invalid_argument(format!(
                        "a snapshot stream of shard {} from node {} carried a frame of shard {} from node {}",
                        p.1, p.0, frame.shard, frame.from_node
                    )));
                }
                Some(_) => {}
            }
            self.check(frame.cluster_id, frame.to_node)?;
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(
                    self.inbox
                        .begin_snapshot(frame.from_node, frame.shard)
                        .map_err(|e| Status::internal(format!("snapshot spool: {e}")))?,
                ),
            };
            w.write_chunk(&frame.chunk)
                .map_err(|e| Status::invalid_argument(format!("chunk: {e}")))?;
            if !frame.raft_message.is_empty() {
                let msg = Message::parse_from_bytes(&frame.raft_message)
                    .map_err(|e| Status::invalid_argument(format!("raft_message: {e}")))?;
                check_ends(&msg, frame.from_node, frame.to_node)
                    .map_err(|e| Status::invalid_argument(format!("raft_message: {e}")))?;
                let w = writer
                    .take()
                    .ok_or_else(|| Status::internal("snapshot writer vanished"))?;
                let handed = self
                    .inbox
                    .snapshot_ready(w, msg)
                    .map_err(|e| Status::internal(format!("snapshot spool: {e}")))?;
                if !handed {
                    // The driver's inbox is full or gone: the sender must not
                    // believe the snapshot arrived.
                    return Err(Status::unavailable("receiver busy; snapshot not taken"));
                }
                return Ok(Response::new(TransportDone {}));
            }
        }
        Err(Status::invalid_argument("snapshot stream ended before its last chunk"))
    }
}

/// Turns a frame received from a peer into an envelope, decoding each
/// raft-rs message: untrusted bytes, so any input gives a typed error (the
/// `raft_frame` fuzz target drives this function).
pub fn decode_frame(frame: RaftFrame) -> Result<Envelope, Status> {
    let mut msgs = Vec::with_capacity(frame.messages.len());
    for (i, m) in frame.messages.into_iter().enumerate() {
        let msg = Message::parse_from_bytes(&m.message)
            .map_err(|e| Status::invalid_argument(format!("messages[{i}].message: not a raft message: {e}")))?;
        check_ends(&msg, frame.from_node, frame.to_node)
            .map_err(|e| Status::invalid_argument(format!("messages[{i}]: {e}")))?;
        msgs.push(ShardMsg { shard: m.shard, msg });
    }
    Ok(Envelope {
        from: frame.from_node,
        to: frame.to_node,
        msgs,
    })
}

/// A raft message inside a frame must be from the frame's sender and to
/// its receiver (raft ids are node ids): the sender's certificate is
/// checked against the frame's `from_node` only, so a message claiming
/// another sender would let one node speak for another.
fn check_ends(msg: &Message, from: u64, to: u64) -> Result<(), String> {
    if msg.from != from || msg.to != to {
        return Err(format!(
            "a message from {} to {} in a frame from node {from} to node {to}",
            msg.from, msg.to
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn frame(from: u64, to: u64, msg_from: u64, msg_to: u64) -> RaftFrame {
        let m = Message {
            from: msg_from,
            to: msg_to,
            ..Default::default()
        };
        RaftFrame {
            cluster_id: 1,
            from_node: from,
            to_node: to,
            messages: vec![ShardMessage {
                shard: 1,
                message: m.write_to_bytes().unwrap(),
            }],
        }
    }

    #[test]
    fn a_frame_carries_only_its_senders_messages_to_its_receiver() {
        let env = decode_frame(frame(1, 2, 1, 2)).unwrap();
        assert_eq!((env.from, env.to, env.msgs.len()), (1, 2, 1));
        // Node 1's certificate checked for the frame cannot speak for node 3.
        let e = decode_frame(frame(1, 2, 3, 2)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("from 3 to 2"), "{e:?}");
        assert!(decode_frame(frame(1, 2, 1, 4)).is_err());
    }
}
