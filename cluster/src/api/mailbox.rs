//! `pigeonhole.v1.Mailbox` on a node: validates each request, routes it to
//! its shard by the placement hash, and runs it through the node (writes are
//! Raft proposals; reads are ReadIndex barriers, or stale local reads, then
//! engine reads).
//!
//! Every node serves every RPC: a write that reaches a follower is forwarded
//! to the leader by Raft, and reads are served on any replica. Long-polls
//! (`Sync.wait_ms`) and `Subscribe` wait on the node's apply notification
//! rather than polling.

mod routing;

use super::deadline;
use super::status::{cluster_error, invalid, op_error, op_error_at};
use crate::watch::WatchKind;
use crate::Node;
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::{OpError, OpOutput, ReadMessage, SyncQuery};
use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::mailbox_server::Mailbox;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// API limits (units last). The defaults are the ones mailbox.proto states.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Items per AppendBatch.
    pub batch_items_max: usize,
    /// Longest Sync long-poll.
    pub wait_ms_max: u32,
    /// Mailboxes per Subscribe stream.
    pub subscribe_mailboxes_max: usize,
    /// Default and largest Subscribe `max_in_flight`.
    pub subscribe_in_flight_default: u32,
    /// Largest Subscribe `max_in_flight`.
    pub subscribe_in_flight_max: u32,
    /// Bytes of ops proposed together for one shard of an AppendBatch.
    pub batch_group_bytes_max: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            batch_items_max: 1_024,
            wait_ms_max: 60_000,
            subscribe_mailboxes_max: 10_000,
            subscribe_in_flight_default: 1_024,
            subscribe_in_flight_max: 65_536,
            batch_group_bytes_max: 4 << 20,
        }
    }
}

/// The service.
#[derive(Debug, Clone)]
pub struct MailboxService {
    pub(super) node: Node,
    pub(super) limits: ApiLimits,
    /// Who may do what (off on a plaintext node).
    pub(super) auth: crate::auth::Auth,
    /// Namespaces' rate limits on this node (none until set).
    pub(super) quotas: crate::quota::Quotas,
    /// Becomes true when the server starts shutting down: long-polls return
    /// and Subscribe streams end, so a graceful shutdown never waits on them.
    pub(super) closing: tokio::sync::watch::Receiver<bool>,
}

impl MailboxService {
    /// The service over `node`; `closing` turns true at shutdown.
    pub fn new(node: Node, limits: ApiLimits, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        MailboxService {
            node,
            limits,
            auth: crate::auth::Auth::off(),
            quotas: crate::quota::Quotas::default(),
            closing,
        }
    }

    /// Limits appends by `quotas`.
    pub fn with_quotas(mut self, quotas: crate::quota::Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Checks every request with `auth`.
    pub fn with_auth(mut self, auth: crate::auth::Auth) -> Self {
        self.auth = auth;
        self
    }

    /// What the namespace's policy says of a Trim or Delete: refused under a
    /// namespace-wide legal hold (as this node last read the namespace
    /// records, so within a second of the hold; a mailbox's own hold is
    /// in its state machine and exact), else the dedup window its keys
    /// keep (0: the node's default).
    fn trim_policy(&self, ns: &str) -> Result<u64, Status> {
        let Some(r) = self.quotas.record(ns) else { return Ok(0) };
        if r.legal_hold {
            return Err(op_error(&OpError::LegalHold));
        }
        Ok(r.dedup_window_ms)
    }

    /// Checks an op against every limit BEFORE it is proposed: a request
    /// over a limit never reaches the Raft log (apply checks again, D6).
    fn check(&self, prefix: &str, op: &cmd::op::Op) -> Result<(), Status> {
        self.node
            .engine()
            .options()
            .limits
            .check_op(op)
            .map_err(|e| op_error_at(prefix, &e))
    }

    /// Checks and proposes one op and returns its result; gives up at `until`.
    async fn one(&self, shard: u64, op: cmd::op::Op, until: Option<Instant>) -> Result<OpOutput, Status> {
        self.check("", &op)?;
        self.propose_checked(shard, op, until).await
    }

    /// [`MailboxService::one`] for an op its caller has checked.
    async fn propose_checked(&self, shard: u64, op: cmd::op::Op, until: Option<Instant>) -> Result<OpOutput, Status> {
        let hash = op_user(&op).map(pigeonhole_proto::placement::user_hash);
        let mut res = self
            .node
            .propose_until(shard, vec![cmd::Op { op: Some(op) }], until)
            .await
            .map_err(|e| cluster_error(&e))?;
        match res.pop() {
            Some(Ok(out)) => Ok(out),
            Some(Err(OpError::WrongShard { shard, range })) => Err(self.moved(shard, range, hash)),
            Some(Err(e)) => Err(op_error(&e)),
            None => Err(Status::internal("the state machine returned no result")),
        }
    }

    async fn barrier(&self, shard: u64, consistency: i32, until: Option<Instant>) -> Result<(), Status> {
        match pb::ReadConsistency::try_from(consistency) {
            Ok(pb::ReadConsistency::Stale) => Ok(()),
            Ok(pb::ReadConsistency::Unspecified | pb::ReadConsistency::Linearizable) => self
                .node
                .read_barrier_until(shard, until)
                .await
                .map_err(|e| cluster_error(&e)),
            Err(_) => Err(invalid("consistency", format!("unknown value {consistency}"))),
        }
    }
}

/// The user id an op names.
fn op_user(op: &cmd::op::Op) -> Option<&[u8]> {
    match op {
        cmd::op::Op::Append(a) => Some(&a.user_id),
        cmd::op::Op::Ack(a) => Some(&a.user_id),
        cmd::op::Op::Trim(t) => Some(&t.user_id),
        cmd::op::Op::Delete(d) => Some(&d.user_id),
        _ => None,
    }
}

fn append_op(r: pb::AppendRequest, ns: String, uid: Vec<u8>) -> cmd::op::Op {
    cmd::op::Op::Append(cmd::AppendOp {
        namespace: ns,
        user_id: uid,
        idempotency_key: r.idempotency_key,
        payload: r.payload,
        expected_last_seq: r.expected_last_seq,
    })
}

fn appended(out: OpOutput) -> Result<pb::AppendResponse, Status> {
    match out {
        OpOutput::Appended {
            seq,
            duplicate,
            time_ms,
        } => Ok(pb::AppendResponse {
            seq,
            duplicate,
            timestamp_ms: time_ms,
        }),
        other => Err(Status::internal(format!("append returned {other:?}"))),
    }
}

pub(super) fn message(m: ReadMessage) -> pb::Message {
    pb::Message {
        seq: m.seq,
        payload: m.payload.into(),
        timestamp_ms: m.time_ms,
        idempotency_key: m.idempotency_key,
        deleted: m.deleted,
    }
}

fn item_error(status: &Status, e: Option<&OpError>) -> pb::AppendResult {
    let last_seq = match e {
        Some(OpError::ExpectedLastSeqMismatch { actual, .. }) => *actual,
        _ => 0,
    };
    pb::AppendResult {
        result: Some(pb::append_result::Result::Error(pb::ItemError {
            code: status.code() as i32,
            message: status.message().to_string(),
            last_seq,
        })),
    }
}

type SubscribeStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Mailbox for MailboxService {
    async fn append(&self, req: Request<pb::AppendRequest>) -> Result<Response<pb::AppendResponse>, Status> {
        let until = deadline::of(&req, Instant::now());
        let caller = self.auth.caller(&req)?;
        let mut r = req.into_inner();
        let (ns, uid, shard) = self.route(r.mailbox.take().as_ref())?;
        self.auth.allow(&caller, &ns, pb::Role::Append)?;
        // Checked before the namespace's rate is charged (as a batch's
        // items are): an append refused as invalid takes no quota, and its
        // caller hears what is wrong with it, not QUOTA_EXCEEDED.
        let payload_bytes = r.payload.len();
        let op = append_op(r, ns.clone(), uid);
        self.check("", &op)?;
        self.quotas.take_append(&ns, payload_bytes)?;
        let out = self.propose_checked(shard, op, until).await?;
        Ok(self.hinted(appended(out)?, [shard]))
    }

    async fn append_batch(
        &self,
        req: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchResponse>, Status> {
        let until = deadline::of(&req, Instant::now());
        let caller = self.auth.caller(&req)?;
        let items = req.into_inner().items;
        if items.is_empty() || items.len() > self.limits.batch_items_max {
            return Err(invalid(
                "items",
                format!("1 to {} items, got {}", self.limits.batch_items_max, items.len()),
            ));
        }
        let mut results: Vec<Option<pb::AppendResult>> = vec![None; items.len()];
        // Group by shard, keeping request order inside each group; each group
        // is split so one proposal stays well inside one Raft entry.
        // Each chunk keeps its encoded bytes so far, so sizing an item is
        // O(1), not a sum over the chunk (O(n^2) over a batch).
        let mut groups: BTreeMap<u64, Vec<(usize, Vec<(usize, cmd::Op)>)>> = BTreeMap::new();
        for (i, mut item) in items.into_iter().enumerate() {
            let prefix = format!("items[{i}].");
            let routed = self
                .route_at(&prefix, item.mailbox.take().as_ref())
                .and_then(|(ns, uid, shard)| {
                    // Items are independent: one the caller may not append
                    // fails alone, as an invalid one does.
                    self.auth.allow(&caller, &ns, pb::Role::Append)?;
                    let payload_bytes = item.payload.len();
                    let quota_ns = ns.clone();
                    let op = append_op(item, ns, uid);
                    self.check(&prefix, &op)?;
                    self.quotas.take_append(&quota_ns, payload_bytes)?;
                    Ok((op, shard))
                });
            match routed {
                Ok((op, shard)) => {
                    let op = cmd::Op { op: Some(op) };
                    let chunks = groups.entry(shard).or_default();
                    let op_bytes = prost::Message::encoded_len(&op);
                    let fits = chunks
                        .last()
                        .is_some_and(|(bytes, _)| bytes + op_bytes <= self.limits.batch_group_bytes_max);
                    if !fits {
                        chunks.push((0, Vec::new()));
                    }
                    if let Some((bytes, c)) = chunks.last_mut() {
                        *bytes += op_bytes;
                        c.push((i, op));
                    }
                }
                Err(status) => {
                    if let Some(slot) = results.get_mut(i) {
                        *slot = Some(item_error(&status, None));
                    }
                }
            }
        }
        let shards: Vec<u64> = groups.keys().copied().collect();
        // Different shards (and chunks) commit in parallel.
        let mut set = tokio::task::JoinSet::new();
        for (shard, chunks) in groups {
            for (_, chunk) in chunks {
                let node = self.node.clone();
                set.spawn(async move {
                    let (idx, ops): (Vec<usize>, Vec<cmd::Op>) = chunk.into_iter().unzip();
                    (idx, node.propose_until(shard, ops, until).await)
                });
            }
        }
        while let Some(joined) = set.join_next().await {
            let (idx, res) = joined.map_err(|e| Status::internal(format!("batch task: {e}")))?;
            match res {
                Ok(outs) => {
                    for (i, out) in idx.into_iter().zip(outs) {
                        let r = match out {
                            Ok(o) => match appended(o) {
                                Ok(ok) => pb::AppendResult {
                                    result: Some(pb::append_result::Result::Ok(ok)),
                                },
                                Err(s) => item_error(&s, None),
                            },
                            Err(e) => item_error(&op_error(&e), Some(&e)),
                        };
                        if let Some(slot) = results.get_mut(i) {
                            *slot = Some(r);
                        }
                    }
                }
                Err(e) => {
                    let s = cluster_error(&e);
                    for i in idx {
                        if let Some(slot) = results.get_mut(i) {
                            *slot = Some(item_error(&s, None));
                        }
                    }
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| r.ok_or_else(|| Status::internal("a batch item got no result")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.hinted(pb::AppendBatchResponse { results }, shards))
    }

    async fn sync(&self, req: Request<pb::SyncRequest>) -> Result<Response<pb::SyncResponse>, Status> {
        let received = Instant::now();
        let until = deadline::of(&req, received);
        let caller = self.auth.caller(&req)?;
        let r = req.into_inner();
        let (ns, uid, shard) = self.route(r.mailbox.as_ref())?;
        self.auth.allow(&caller, &ns, pb::Role::Read)?;
        if r.wait_ms > self.limits.wait_ms_max {
            return Err(invalid(
                "wait_ms",
                format!("at most {} ms, got {}", self.limits.wait_ms_max, r.wait_ms),
            ));
        }
        // Register BEFORE the first read, so a message applied between the
        // read and the wait still wakes us.
        let watch = self.node.watchers().watch(
            WatchKind::Poll,
            vec![(shard, pigeonhole_engine::mailbox_fingerprint(&ns, &uid))],
        );
        self.barrier(shard, r.consistency, until).await?;
        // A long-poll ends with an empty page before the client's deadline,
        // not with DEADLINE_EXCEEDED.
        let wait_end = received + Duration::from_millis(u64::from(r.wait_ms));
        let deadline = until.map_or(wait_end, |u| u.min(wait_end));
        let q = SyncQuery {
            namespace: &ns,
            user_id: &uid,
            after_seq: r.after_seq,
            max_messages: r.max_messages,
            max_bytes: r.max_bytes,
        };
        // 0: the first wait re-checks against the book installed now.
        let mut book = 0;
        loop {
            watch.take();
            let page = self
                .node
                .engine()
                .sync(shard, &q)
                .map_err(|e| self.read_failed(&e, &uid))?;
            let now = Instant::now();
            if !page.messages.is_empty() || now >= deadline {
                return Ok(Response::new(pb::SyncResponse {
                    messages: page.messages.into_iter().map(message).collect(),
                    last_seq: page.last_seq,
                    low_watermark: page.low_watermark,
                    has_more: page.has_more,
                }));
            }
            // A message applied here is committed: serving it after the
            // barrier keeps the read linearizable. Only a change of THIS
            // mailbox (or of its whole shard) wakes the poll.
            let mut closing = self.closing.clone();
            tokio::select! {
                woke = tokio::time::timeout(deadline - now, watch.changed()) => {
                    if woke.is_err() {
                        continue; // timed out: one last read, then return
                    }
                }
                // A revoked token or grant ends the poll within a second.
                () = self.auth.changed(book) => {
                    book = self.auth.version();
                    self.auth.still_allowed(&caller, &ns, pb::Role::Read)?;
                }
                _ = closing.wait_for(|c| *c) => {
                    // Shutting down: a retryable error sends the client elsewhere.
                    return Err(Status::unavailable("server shutting down; retry on another node"));
                }
            }
        }
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let until = deadline::of(&req, Instant::now());
        let caller = self.auth.caller(&req)?;
        let r = req.into_inner();
        for (i, m) in r.mailboxes.iter().enumerate() {
            if let Some(mb) = m.mailbox.as_ref() {
                self.auth
                    .allow(&caller, &mb.namespace, pb::Role::Read)
                    .map_err(|s| Status::permission_denied(format!("mailboxes[{i}]: {}", s.message())))?;
            }
        }
        let rx = super::subscribe::start(self, caller, r, until).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let until = deadline::of(&req, Instant::now());
        let caller = self.auth.caller(&req)?;
        let r = req.into_inner();
        let (ns, uid, shard) = self.route(r.mailbox.as_ref())?;
        self.auth.allow(&caller, &ns, pb::Role::Read)?;
        let op = cmd::op::Op::Ack(cmd::AckOp {
            namespace: ns,
            user_id: uid,
            device_id: r.device_id,
            seq: r.seq,
        });
        match self.one(shard, op, until).await? {
            OpOutput::Acked { cursor, advanced } => Ok(self.hinted(pb::AckResponse { cursor, advanced }, [shard])),
            other => Err(Status::internal(format!("ack returned {other:?}"))),
        }
    }

    async fn get_cursors(
        &self,
        req: Request<pb::GetCursorsRequest>,
    ) -> Result<Response<pb::GetCursorsResponse>, Status> {
        let until = deadline::of(&req, Instant::now());
        let caller = self.auth.caller(&req)?;
        let r = req.into_inner();
        let (ns, uid, shard) = self.route(r.mailbox.as_ref())?;
        self.auth.allow(&caller, &ns, pb::Role::Read)?;
        self.barrier(shard, pb::ReadConsistency::Linearizable as i32, until)
            .await?;
        let c = self
            .node
            .engine()
            .cursors(shard, &ns, &uid)
            .map_err(|e| self.read_failed(&e, &uid))?;
        Ok(Response::new(pb::GetCursorsResponse {
            cursors: c
                .cursors
                .into_iter()
                .map(|(device_id, seq)| pb::DeviceCursor {
                    device_id,
                    seq,
                    unread: c.last_seq.saturating_sub(seq),
                })
                .collect(),
            last_seq: c.last_seq,
            low_watermark: c.low_watermark,
        }))
    }

    async fn trim(&self, req: Request<pb::TrimRequest>) -> Result<Response<pb::TrimResponse>, Status> {
        let until = deadline::of(&req, Instant::now());
        let caller = self.auth.caller(&req)?;
        let r = req.into_inner();
        let (ns, uid, shard) = self.route(r.mailbox.as_ref())?;
        self.auth.allow(&caller, &ns, pb::Role::Trim)?;
        let dedup_window_ms = self.trim_policy(&ns)?;
        let op = cmd::op::Op::Trim(cmd::TrimOp {
            namespace: ns,
            user_id: uid,
            up_to_seq: r.up_to_seq,
            dedup_window_ms,
        });
        match self.one(shard, op, until).await? {
            OpOutput::Trimmed { low_watermark, removed } => {
                Ok(self.hinted(pb::TrimResponse { low_watermark, removed }, [shard]))
            }
            other => Err(Status::internal(format!("trim returned {other:?}"))),
        }
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let until = deadline::of(&req, Instant::now());
        let caller = self.auth.caller(&req)?;
        let r = req.into_inner();
        let (ns, uid, shard) = self.route(r.mailbox.as_ref())?;
        self.auth.allow(&caller, &ns, pb::Role::Trim)?;
        let dedup_window_ms = self.trim_policy(&ns)?;
        let op = cmd::op::Op::Delete(cmd::DeleteOp {
            namespace: ns,
            user_id: uid,
            seq: r.seq,
            dedup_window_ms,
        });
        match self.one(shard, op, until).await? {
            OpOutput::Deleted { deleted } => Ok(self.hinted(pb::DeleteResponse { deleted }, [shard])),
            other => Err(Status::internal(format!("delete returned {other:?}"))),
        }
    }
}
