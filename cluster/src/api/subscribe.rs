//! `Mailbox.Subscribe`: one server stream that follows many mailboxes.
//!
//! Why it is shaped this way:
//! - **It pays only for what changed.** The stream registers its mailboxes
//!   with the node's [`crate::watch::Watchers`]; apply wakes it with the
//!   slots whose mailbox changed, and it re-reads only those. A stream over
//!   10,000 quiet mailboxes costs nothing while other mailboxes are written.
//! - **It stops when its client goes.** While it waits it also watches the
//!   channel to the client: a cancelled or disconnected client drops the
//!   receiving end, and the task ends at once and unregisters (not at the
//!   next message, which for a quiet stream might never come).
//! - **It does not stay silent without a leader.** When a shard of the
//!   stream has no leader on this node (a partition, a dead leader, this
//!   replica removed), the stream ends with UNAVAILABLE so the client
//!   resumes on a node that can serve it (etcd's `WithRequireLeader`).
//! - **Start-up runs one ReadIndex per shard, all at once**, so one slow
//!   shard (a leader change) does not hold up the others one after another.

use super::mailbox::{message, MailboxService};
use super::status::{cluster_error, invalid, read_error, read_error_at};
use crate::watch::{Changes, WatchKind};
use crate::Node;
use pigeonhole_engine::{mailbox_fingerprint, ReadError, SyncQuery};
use pigeonhole_proto::v1 as pb;
use std::collections::{BTreeSet, HashSet};
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::Status;

/// Messages per Subscribe event, at most: small enough that `max_in_flight`
/// is several events, so a stream keeps flowing while the client reads.
pub const SUBSCRIBE_PAGE_MAX: u32 = 256;

type Event = Result<pb::SubscribeResponse, Status>;

struct Sub {
    ns: String,
    uid: Vec<u8>,
    shard: u64,
    cursor: u64,
    /// False once its cursor fell below the low watermark (reported once).
    live: bool,
}

/// Validates the request, runs the start-up barriers and spawns the task
/// that feeds the stream; returns the stream's receiving end.
pub(super) async fn start(
    svc: &MailboxService,
    caller: crate::auth::Caller,
    r: pb::SubscribeRequest,
    until: Option<Instant>,
) -> Result<mpsc::Receiver<Event>, Status> {
    let namespaces: BTreeSet<String> = r
        .mailboxes
        .iter()
        .filter_map(|m| m.mailbox.as_ref().map(|mb| mb.namespace.clone()))
        .collect();
    let limits = &svc.limits;
    if r.mailboxes.is_empty() || r.mailboxes.len() > limits.subscribe_mailboxes_max {
        return Err(invalid(
            "mailboxes",
            format!(
                "1 to {} mailboxes, got {}",
                limits.subscribe_mailboxes_max,
                r.mailboxes.len()
            ),
        ));
    }
    let in_flight = match r.max_in_flight {
        0 => limits.subscribe_in_flight_default,
        n if n > limits.subscribe_in_flight_max => {
            return Err(invalid(
                "max_in_flight",
                format!("at most {}, got {n}", limits.subscribe_in_flight_max),
            ))
        }
        n => n,
    };
    let mut subs = Vec::with_capacity(r.mailboxes.len());
    let mut seen = HashSet::new();
    for (i, c) in r.mailboxes.into_iter().enumerate() {
        let (ns, uid, shard) = svc.route_at(&format!("mailboxes[{i}]."), c.mailbox.as_ref())?;
        if !seen.insert((ns.clone(), uid.clone())) {
            return Err(invalid(&format!("mailboxes[{i}].mailbox"), "the mailbox appears twice"));
        }
        subs.push(Sub {
            ns,
            uid,
            shard,
            cursor: c.after_seq,
            live: true,
        });
    }
    let node = svc.node.clone();
    // Register before the barriers: a message applied after them wakes the
    // task even if it lands before the task first reads.
    let watch = node.watchers().watch(
        WatchKind::Stream,
        subs.iter()
            .map(|s| (s.shard, mailbox_fingerprint(&s.ns, &s.uid)))
            .collect(),
    );
    // One ReadIndex per shard, all in flight together: the backlog reflects
    // every write acknowledged before the call.
    let shards: BTreeSet<u64> = subs.iter().map(|s| s.shard).collect();
    let mut barriers = tokio::task::JoinSet::new();
    for shard in shards {
        let node = node.clone();
        barriers.spawn(async move { node.read_barrier_until(shard, until).await });
    }
    while let Some(done) = barriers.join_next().await {
        done.map_err(|e| Status::internal(format!("read barrier task: {e}")))?
            .map_err(|e| cluster_error(&e))?;
    }
    // What was raised while the barriers ran is covered by the full first
    // read; a "no leader" raised before the barrier succeeded is stale (a
    // leader answered it), and a lasting one is raised again every tick.
    watch.take();
    // As in Sync, a cursor beyond last_seq is an error, not a wait: after
    // the barrier this replica has every acknowledged message, so such a
    // cursor was never handed out by this cluster.
    for (i, s) in subs.iter().enumerate() {
        let q = SyncQuery {
            namespace: &s.ns,
            user_id: &s.uid,
            after_seq: s.cursor,
            max_messages: 1,
            max_bytes: 0,
        };
        match node.engine().sync(s.shard, &q) {
            Ok(_) | Err(ReadError::CursorTrimmed { .. }) => {}
            Err(e) => return Err(read_error_at(&format!("mailboxes[{i}].after_seq"), &e)),
        }
    }
    // The channel is the flow control: pages of at most `page_max`
    // messages, and at most `in_flight / page_max` of them queued, so no
    // more than `in_flight` messages (plus the page in hand) sit between
    // the task and the client. When the client reads slowly, the task
    // waits on send and stops reading ahead.
    let page_max = in_flight
        .min(node.engine().options().limits.sync_messages_max)
        .min(SUBSCRIBE_PAGE_MAX);
    let pages = usize::try_from((in_flight / page_max.max(1)).max(1)).unwrap_or(1);
    let (tx, rx) = mpsc::channel(pages);
    let feed = Feed {
        node,
        auth: svc.auth.clone(),
        caller,
        namespaces,
        subs,
        page_max,
        tx,
        closing: svc.closing.clone(),
    };
    // The feed logs in the request's span (method, id, namespaces).
    tokio::spawn(tracing::Instrument::instrument(
        feed.run(watch),
        tracing::Span::current(),
    ));
    Ok(rx)
}

/// The task behind one stream.
struct Feed {
    node: Node,
    /// Re-checked whenever this node installs a new access-control book:
    /// a revoked token or grant ends the stream within a second.
    auth: crate::auth::Auth,
    caller: crate::auth::Caller,
    /// The namespaces of the stream's mailboxes, each once.
    namespaces: BTreeSet<String>,
    subs: Vec<Sub>,
    page_max: u32,
    tx: mpsc::Sender<Event>,
    closing: tokio::sync::watch::Receiver<bool>,
}

/// Why a feed stopped.
enum Stop {
    /// The client went away: nothing to send.
    Gone,
    /// End the stream with this status (best effort: the buffer may be full).
    End(Status),
}

/// Counts an open stream and its mailboxes in the metrics while it lives.
struct OpenStream(usize);

impl OpenStream {
    fn new(mailboxes: usize) -> OpenStream {
        crate::metrics::subscribe_stream(1.0, mailboxes);
        OpenStream(mailboxes)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        crate::metrics::subscribe_stream(-1.0, self.0);
    }
}

impl Feed {
    /// Delivers the backlog of every mailbox after its cursor, then what
    /// apply changes, in per-mailbox seq order, until the client goes, the
    /// node stops, or a shard loses its leader here. `watch` is dropped
    /// (unregistered) when it returns.
    async fn run(mut self, watch: crate::watch::Watch) {
        let _open = OpenStream::new(self.subs.len());
        // Everything is dirty at first: the backlog.
        let mut dirty: BTreeSet<usize> = (0..self.subs.len()).collect();
        // 0: re-check at once against whatever book is installed now (one
        // may have come between the handler's check and this task).
        let mut book = 0;
        let stop = loop {
            if let Err(stop) = self.drain(&mut dirty).await {
                break stop;
            }
            let mut closing = self.closing.clone();
            let changes = tokio::select! {
                c = watch.changed() => c,
                () = self.tx.closed() => break Stop::Gone,
                _ = closing.wait_for(|c| *c) => break Stop::End(shutting_down()),
                () = self.auth.changed(book) => {
                    book = self.auth.version();
                    if let Some(denied) = self
                        .namespaces
                        .iter()
                        .find_map(|ns| self.auth.still_allowed(&self.caller, ns, pigeonhole_proto::v1::Role::Read).err())
                    {
                        break Stop::End(denied);
                    }
                    continue;
                }
            };
            if let Err(stop) = self.mark(&changes, &mut dirty) {
                break stop;
            }
        };
        if let Stop::End(status) = stop {
            let _ = self.tx.try_send(Err(status));
        }
    }

    /// Adds what `changes` says to `dirty`, or says why the stream ends.
    fn mark(&self, changes: &Changes, dirty: &mut BTreeSet<usize>) -> Result<(), Stop> {
        if let Some(shard) = changes.leaderless {
            return Err(Stop::End(super::status::no_leader_here(shard, self.node.id())));
        }
        dirty.extend(changes.slots.iter().filter_map(|s| usize::try_from(*s).ok()));
        if !changes.shards.is_empty() {
            for (i, s) in self.subs.iter().enumerate() {
                if changes.shards.contains(&s.shard) {
                    dirty.insert(i);
                }
            }
        }
        Ok(())
    }

    /// Sends one page per dirty mailbox per round, round after round, until
    /// every dirty mailbox is read to its end (so one busy mailbox cannot
    /// starve the others).
    async fn drain(&mut self, dirty: &mut BTreeSet<usize>) -> Result<(), Stop> {
        while !dirty.is_empty() {
            let round: Vec<usize> = dirty.iter().copied().collect();
            for i in round {
                let Some(event) = self.read_one(i)? else {
                    dirty.remove(&i);
                    continue;
                };
                let mut closing = self.closing.clone();
                tokio::select! {
                    sent = self.tx.send(Ok(pb::SubscribeResponse { event: Some(event) })) => {
                        if sent.is_err() {
                            return Err(Stop::Gone);
                        }
                    }
                    _ = closing.wait_for(|c| *c) => return Err(Stop::End(shutting_down())),
                }
            }
        }
        Ok(())
    }

    /// The next event of mailbox `i`, or None when it has nothing to send.
    fn read_one(&mut self, i: usize) -> Result<Option<pb::subscribe_response::Event>, Stop> {
        let Some(s) = self.subs.get_mut(i).filter(|s| s.live) else {
            return Ok(None);
        };
        let q = SyncQuery {
            namespace: &s.ns,
            user_id: &s.uid,
            after_seq: s.cursor,
            max_messages: self.page_max,
            max_bytes: 0,
        };
        let mailbox = |s: &Sub| {
            Some(pb::MailboxId {
                namespace: s.ns.clone(),
                user_id: s.uid.clone(),
            })
        };
        match self.node.engine().sync(s.shard, &q) {
            Ok(page) if page.messages.is_empty() => Ok(None),
            Ok(page) => {
                s.cursor = page.messages.last().map_or(s.cursor, |m| m.seq);
                Ok(Some(pb::subscribe_response::Event::Messages(pb::MailboxMessages {
                    mailbox: mailbox(s),
                    messages: page.messages.into_iter().map(message).collect(),
                })))
            }
            Err(ReadError::CursorTrimmed { low_watermark, .. }) => {
                s.live = false;
                Ok(Some(pb::subscribe_response::Event::Trimmed(pb::CursorTrimmed {
                    mailbox: mailbox(s),
                    low_watermark,
                })))
            }
            // A cursor ahead of the mailbox: nothing to send until the
            // mailbox catches up to it.
            Err(ReadError::CursorAhead { .. }) => Ok(None),
            Err(e) => Err(Stop::End(read_error(&e))),
        }
    }
}

fn shutting_down() -> Status {
    Status::unavailable("server shutting down; resubscribe from the last seq received")
}
