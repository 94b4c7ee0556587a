//! Append coalescing: concurrent appends to one node travel as one
//! AppendBatch, with no timer.
//!
//! Why: a unary append costs one HTTP/2 request, one server task and one
//! Raft proposal; at hundreds of appends in flight those per-call costs, not
//! the bytes, are most of the CPU on both sides. Batching by a timer (Kafka's
//! `linger.ms`) would add latency to a lone append, so this uses the
//! in-flight call itself as the window, as group commit does: while
//! [`CoalesceConfig::calls_per_node_max`] calls to a node are in flight,
//! further appends to that node queue; when a call returns, its sender takes
//! everything queued (up to the batch limits) as the next call. A lone
//! append therefore goes out at once, as a unary Append.
//!
//! Only the first attempt is coalesced, and it lasts at most half of what is
//! left of its items' earliest deadline: an item may have queued behind a
//! slow call, and a node that hangs (seen: one in its graceful stop, a
//! rolling restart's drained node the client still routed to) must leave
//! every item time for a retry elsewhere. An item that fails in it, for any
//! reason, is sent again through the ordinary per-call retry loop
//! ([`Client::append_unary`]) within what is left of its deadline. Its
//! idempotency key makes that safe, and it gives a refused item exactly the
//! status (details included) that a unary call would have had. A failed
//! call first teaches the routing table what it learned (a leader hint, a
//! dead node), so the retries go to the right place.
//!
//! Conditional appends (`expected_last_seq`) are never coalesced: they are
//! rare, and their failure carries the mailbox's `last_seq`.

use crate::client::{with_timeout, Client, Retry};
use crate::error::Error;
use pigeonhole_proto::v1 as pb;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tonic::Status;

/// Coalescing settings (part of [`crate::ClientConfig`]).
#[derive(Debug, Clone)]
pub struct CoalesceConfig {
    /// Coalesce at all. Off, every append is its own unary call.
    pub enabled: bool,
    /// Calls to one node in flight at once before appends start to queue.
    /// 1 is pure "batch while a call is in flight"; 2 lets one batch form
    /// while another is on the wire.
    pub calls_per_node_max: usize,
    /// Items in one coalesced call (at most the server's `batch_items_max`).
    pub items_per_call_max: usize,
    /// Encoded bytes of one coalesced call's items.
    pub bytes_per_call_max: usize,
    /// An append larger than this is sent on its own (unary).
    pub item_bytes_max: usize,
    /// Appends queued for one node before further ones bypass the queue
    /// (unary), so a stalled node cannot make the queue grow without bound.
    pub queued_per_node_max: usize,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        CoalesceConfig {
            enabled: true,
            calls_per_node_max: 2,
            items_per_call_max: 512,
            bytes_per_call_max: 4 << 20,
            item_bytes_max: 256 << 10,
            queued_per_node_max: 16_384,
        }
    }
}

/// The first attempt's answer for one item.
type FirstAnswer = Result<pb::AppendResponse, Status>;

/// A coalesced attempt lasts at least this long, however little its items
/// have left (shorter, and a healthy call could not finish).
const COALESCED_ATTEMPT_MIN: Duration = Duration::from_millis(50);

/// A coalesced attempt's length: half of what is left of the earliest
/// deadline among `items`, at least [`COALESCED_ATTEMPT_MIN`], at most
/// `full` (one ordinary attempt).
fn coalesced_budget(items: &[Queued], now: Instant, full: Duration) -> Duration {
    items
        .iter()
        .map(|it| it.deadline.saturating_duration_since(now))
        .min()
        .map_or(full, |left| (left / 2).max(COALESCED_ATTEMPT_MIN).min(full))
}

struct Queued {
    req: pb::AppendRequest,
    shard: u64,
    bytes: usize,
    reply: oneshot::Sender<FirstAnswer>,
    /// When the caller's whole append must be answered.
    deadline: Instant,
}

#[derive(Default)]
struct NodeQueue {
    calls: usize,
    queue: VecDeque<Queued>,
}

/// Per-node queues of appends waiting for a call slot.
#[derive(Default)]
pub(crate) struct Coalescer {
    nodes: Mutex<HashMap<u64, NodeQueue>>,
    calls: AtomicU64,
    items: AtomicU64,
}

/// What coalescing did so far, summed over this client's clones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceStats {
    /// Calls the coalescer sent (unary Appends and AppendBatches).
    pub calls: u64,
    /// Appends those calls carried. `items / calls` is the mean batch size.
    pub items: u64,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Coalescer")
    }
}

impl Coalescer {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, NodeQueue>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A node's call slot held by a sender task. If the task is dropped while
/// it holds the slot (its runtime shut down), the slot is given back, and
/// when it was the last one the queued appends are dropped: their callers
/// see the failure and retry unary, instead of waiting on a sender that will
/// never come.
struct Slot<'a> {
    coalescer: &'a Coalescer,
    node: u64,
    held: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let mut nodes = self.coalescer.lock();
        if let Some(q) = nodes.get_mut(&self.node) {
            q.calls = q.calls.saturating_sub(1);
            if q.calls == 0 {
                nodes.remove(&self.node);
            }
        }
    }
}

/// Takes the next call's items off `q`: at least one, then as many as fit.
fn take_call(q: &mut NodeQueue, cfg: &CoalesceConfig) -> Vec<Queued> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(front) = q.queue.front() {
        let fits = out.is_empty()
            || (out.len() < cfg.items_per_call_max.max(1)
                && bytes.saturating_add(front.bytes) <= cfg.bytes_per_call_max);
        if !fits {
            break;
        }
        let Some(item) = q.queue.pop_front() else { break };
        bytes = bytes.saturating_add(item.bytes);
        out.push(item);
    }
    out
}

impl Client {
    /// What coalescing did so far (first attempts only; retries are unary).
    pub fn coalesce_stats(&self) -> CoalesceStats {
        let c = self.coalescer();
        CoalesceStats {
            calls: c.calls.load(Ordering::Relaxed),
            items: c.items.load(Ordering::Relaxed),
        }
    }

    /// An append, coalesced with others to the same node when calls to it
    /// are in flight (see the module docs).
    pub(crate) async fn append_coalesced(
        &self,
        req: pb::AppendRequest,
        uid: &[u8],
    ) -> Result<pb::AppendResponse, Error> {
        let cfg = &self.config().coalesce;
        let started = Instant::now();
        let bytes = pigeonhole_proto::prost::Message::encoded_len(&req);
        let target = self
            .shard_of(crate::client::Route::User(uid))
            .and_then(|s| self.pick(&s, 0).map(|n| (s.id, n)));
        let Ok((shard, node)) = target else {
            return self.append_unary(req, self.timeout()).await;
        };
        if !cfg.enabled || req.expected_last_seq.is_some() || bytes > cfg.item_bytes_max {
            return self.append_unary(req, self.timeout()).await;
        }
        let (tx, rx) = oneshot::channel();
        // None: the node's queue is full, go unary. Some(start): queued;
        // `start` when this append also takes a free call slot.
        let queued = {
            let mut nodes = self.coalescer().lock();
            let q = nodes.entry(node).or_default();
            if q.queue.len() >= cfg.queued_per_node_max {
                None
            } else {
                q.queue.push_back(Queued {
                    req: req.clone(),
                    shard,
                    bytes,
                    reply: tx,
                    deadline: started + self.timeout(),
                });
                let start = q.calls < cfg.calls_per_node_max.max(1);
                if start {
                    q.calls += 1;
                }
                Some(start)
            }
        };
        let Some(start_sender) = queued else {
            return self.append_unary(req, self.timeout()).await;
        };
        if start_sender {
            let client = self.clone();
            tokio::spawn(async move { client.send_queued(node).await });
        }
        let first = rx
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("the coalesced call was dropped")));
        match first {
            Ok(r) => Ok(r),
            // Whatever went wrong, the ordinary retry loop takes over with
            // what is left of the deadline (see the module docs).
            Err(_) => {
                let left = self.timeout().saturating_sub(started.elapsed());
                self.append_unary(req, left).await
            }
        }
    }

    /// Sends `node`'s queued appends, one call at a time, until its queue is
    /// empty; then gives the call slot back.
    async fn send_queued(&self, node: u64) {
        let cfg = self.config().coalesce.clone();
        let mut slot = Slot {
            coalescer: self.coalescer(),
            node,
            held: true,
        };
        loop {
            let items = {
                let mut nodes = self.coalescer().lock();
                let Some(q) = nodes.get_mut(&node) else {
                    slot.held = false;
                    return;
                };
                let items = take_call(q, &cfg);
                if items.is_empty() {
                    q.calls = q.calls.saturating_sub(1);
                    if q.calls == 0 {
                        nodes.remove(&node);
                    }
                    slot.held = false;
                    return;
                }
                items
            };
            self.send_call(node, items).await;
        }
    }

    /// One attempt for `items` on `node`: unary for one item, AppendBatch
    /// for more. Every item's sender gets an answer.
    async fn send_call(&self, node: u64, items: Vec<Queued>) {
        self.coalescer().calls.fetch_add(1, Ordering::Relaxed);
        self.coalescer()
            .items
            .fetch_add(u64::try_from(items.len()).unwrap_or(u64::MAX), Ordering::Relaxed);
        // At most half of what is left of the earliest deadline among the
        // items (they may have queued behind a slow call), so that if this
        // node hangs every item keeps time for the retry loop to try another.
        let full = Retry::new(self.config(), self.timeout()).attempt_budget(self.config(), Duration::ZERO);
        let budget = coalesced_budget(&items, Instant::now(), full);
        let stub = match self.mailbox_at(node) {
            Ok(s) => s,
            Err(e) => {
                for it in items {
                    let _ = it.reply.send(Err(Status::unavailable(e.to_string())));
                }
                return;
            }
        };
        let mut stub = stub;
        let backstop = budget + Duration::from_millis(100);
        let late = || Status::deadline_exceeded(format!("no answer from node {node} within {} ms", budget.as_millis()));
        if items.len() == 1 {
            let Some(it) = items.into_iter().next() else { return };
            let call = stub.append(with_timeout(it.req, budget));
            let res = match tokio::time::timeout(backstop, call).await {
                Ok(r) => r.map(|a| self.write_answer(a)),
                Err(_) => Err(late()),
            };
            if let Err(s) = &res {
                self.learn(it.shard, node, s);
            }
            let _ = it.reply.send(res);
            return;
        }
        let (reqs, waiting): (Vec<_>, Vec<_>) = items.into_iter().map(|it| (it.req, (it.shard, it.reply))).unzip();
        let call = stub.append_batch(with_timeout(pb::AppendBatchRequest { items: reqs }, budget));
        let res = match tokio::time::timeout(backstop, call).await {
            Ok(r) => r.map(|a| self.write_answer(a)),
            Err(_) => Err(late()),
        };
        match res {
            Ok(resp) if resp.results.len() == waiting.len() => {
                for ((shard, reply), r) in waiting.into_iter().zip(resp.results) {
                    let answer = match r.result {
                        Some(pb::append_result::Result::Ok(ok)) => Ok(ok),
                        Some(pb::append_result::Result::Error(e)) => {
                            let s = crate::batch::item_status(&e);
                            self.learn(shard, node, &s);
                            Err(s)
                        }
                        None => Err(Status::internal("a batch item has no result")),
                    };
                    let _ = reply.send(answer);
                }
            }
            Ok(resp) => {
                let s = Status::internal(format!("{} results for {} items", resp.results.len(), waiting.len()));
                for (_, reply) in waiting {
                    let _ = reply.send(Err(s.clone()));
                }
            }
            Err(s) => {
                let mut taught = std::collections::BTreeSet::new();
                for (shard, reply) in waiting {
                    if taught.insert(shard) {
                        self.learn(shard, node, &s);
                    }
                    let _ = reply.send(Err(s.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(bytes: usize) -> Queued {
        let (reply, _) = oneshot::channel();
        Queued {
            req: pb::AppendRequest::default(),
            shard: 1,
            bytes,
            reply,
            deadline: Instant::now(),
        }
    }

    /// An item that queued behind a slow call gets half of what it has left,
    /// not a whole attempt, so its retry elsewhere still has time.
    #[test]
    fn a_coalesced_attempt_leaves_half_of_the_earliest_deadline() {
        let now = Instant::now();
        let full = Duration::from_millis(1_500);
        let at = |ms: u64| {
            let mut q = queued(1);
            q.deadline = now + Duration::from_millis(ms);
            q
        };
        assert_eq!(coalesced_budget(&[at(1_500)], now, full), Duration::from_millis(750));
        assert_eq!(
            coalesced_budget(&[at(1_500), at(200)], now, full),
            Duration::from_millis(100)
        );
        assert_eq!(
            coalesced_budget(&[at(10_000)], now, full),
            full,
            "capped at one attempt"
        );
        assert_eq!(coalesced_budget(&[at(20)], now, full), COALESCED_ATTEMPT_MIN, "floored");
        assert_eq!(coalesced_budget(&[], now, full), full);
    }

    #[test]
    fn a_dropped_sender_gives_its_slot_back_and_releases_the_queue() {
        let c = Coalescer::default();
        let (reply, mut rx) = oneshot::channel();
        {
            let mut nodes = c.lock();
            let q = nodes.entry(3).or_default();
            q.calls = 1;
            q.queue.push_back(Queued {
                req: pb::AppendRequest::default(),
                shard: 1,
                bytes: 1,
                reply,
                deadline: Instant::now(),
            });
        }
        drop(Slot {
            coalescer: &c,
            node: 3,
            held: true,
        });
        assert!(c.lock().is_empty(), "the last slot went, and the node's queue with it");
        assert!(
            matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
            "the waiting caller is released (it then retries unary)"
        );
    }

    #[test]
    fn a_call_takes_what_fits_and_at_least_one() {
        let cfg = CoalesceConfig {
            items_per_call_max: 3,
            bytes_per_call_max: 100,
            ..CoalesceConfig::default()
        };
        let mut q = NodeQueue::default();
        q.queue.extend((0..7).map(|_| queued(10)));
        assert_eq!(take_call(&mut q, &cfg).len(), 3, "item limit");
        assert_eq!(q.queue.len(), 4);
        let mut q = NodeQueue::default();
        q.queue.extend([queued(60), queued(30), queued(20)]);
        assert_eq!(
            take_call(&mut q, &cfg).len(),
            2,
            "byte limit: 60 + 30 fit, + 20 does not"
        );
        let mut q = NodeQueue::default();
        q.queue.push_back(queued(1_000));
        assert_eq!(take_call(&mut q, &cfg).len(), 1, "one oversized item still goes");
        assert!(take_call(&mut q, &cfg).is_empty());
    }
}
