//! [`Subscription`]: Subscribe that survives node failures.
//!
//! The server's Subscribe stream ends when its node dies, restarts or shuts
//! down. The helper resumes it from the last seq it delivered, so the caller
//! sees every message exactly once, in order, per mailbox, across any number
//! of reconnects:
//!
//! - **One stream per shard.** A stream reads from one node, and only a
//!   replica of a mailbox's shard can serve it; grouping by shard lets each
//!   group fail over to another replica of its own shard on its own.
//! - **Cursors live in the client.** Each shard task keeps, per mailbox, the
//!   last seq it handed to the caller and resubscribes from there. A message
//!   at or below the cursor (a redelivery after a resume) is dropped; one
//!   above cursor + 1 would be a gap and is reported as [`Error::Protocol`]
//!   instead of being delivered.
//! - **Backpressure end to end.** Events go through a bounded channel
//!   ([`EVENTS_BUFFERED_MAX`]); a task that cannot hand an event over stops
//!   reading its stream, and the server's `max_in_flight` window stops the
//!   server from reading ahead. Memory stays bounded however slow the caller.
//! - **It never gives up on a retryable failure**: a delivery service wants
//!   to keep following. Reconnects back off (up to `backoff_max`) and are
//!   counted ([`Subscription::reconnects`]). A definite refusal (bad input)
//!   ends that shard's task with the error.
//!
//! Known limit: a stream on a replica that is cut off from its shard's
//! leader but still reachable stays open and silent until the partition
//! heals (the replica cannot learn of new commits). etcd's watch has the
//! same property; its `WithRequireLeader` is the model for a later fix.

use crate::client::{Client, Retry, Route};
use crate::error::{is_retryable, Error};
use pigeonhole_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Status;

/// Events waiting for the caller, across all shard tasks.
pub const EVENTS_BUFFERED_MAX: usize = 64;

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The next messages of one mailbox: consecutive, continuing exactly
    /// after the previous event for that mailbox (or its start cursor).
    Messages {
        /// The mailbox.
        mailbox: pb::MailboxId,
        /// Messages in seq order, no gaps.
        messages: Vec<pb::Message>,
    },
    /// The mailbox's next messages were trimmed before they could be
    /// delivered. The subscription stops following it; resynchronise it
    /// (e.g. subscribe again from `low_watermark - 1`).
    Trimmed {
        /// The mailbox.
        mailbox: pb::MailboxId,
        /// Its lowest stored seq.
        low_watermark: u64,
    },
}

/// A resuming subscription. Dropping it stops every stream.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Result<Event, Error>>,
    tasks: tokio::task::JoinSet<()>,
    reconnects: Arc<AtomicU64>,
}

impl Subscription {
    /// The next event; `None` once every mailbox was dropped (trimmed) or
    /// its shard's task ended with an error that was already returned.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        self.rx.recv().await
    }

    /// How many times a stream was re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// How many shard streams are still being followed.
    pub fn streams(&self) -> usize {
        self.tasks.len()
    }
}

type Key = (String, Vec<u8>);

pub(crate) fn start(
    client: &Client,
    mailboxes: Vec<(pb::MailboxId, u64)>,
    max_in_flight: u32,
) -> Result<Subscription, Error> {
    let mut by_shard: BTreeMap<u64, Vec<(pb::MailboxId, u64)>> = BTreeMap::new();
    for (mb, after) in mailboxes {
        let shard = client.shard_of(Route::User(&mb.user_id))?;
        by_shard.entry(shard.id).or_default().push((mb, after));
    }
    let (tx, rx) = mpsc::channel(EVENTS_BUFFERED_MAX);
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (shard, subs) in by_shard {
        tasks.spawn(follow(
            client.clone(),
            shard,
            subs,
            max_in_flight,
            tx.clone(),
            Arc::clone(&reconnects),
        ));
    }
    Ok(Subscription { rx, tasks, reconnects })
}

/// Follows one shard's mailboxes until the caller goes away or a definite
/// error ends it.
async fn follow(
    client: Client,
    shard: u64,
    subs: Vec<(pb::MailboxId, u64)>,
    max_in_flight: u32,
    tx: mpsc::Sender<Result<Event, Error>>,
    reconnects: Arc<AtomicU64>,
) {
    let mut cursors: BTreeMap<Key, (pb::MailboxId, u64)> = subs
        .into_iter()
        .map(|(mb, after)| ((mb.namespace.clone(), mb.user_id.clone()), (mb, after)))
        .collect();
    // The retry state spans reconnects; it is reset after a stream works.
    let mut retry = Retry::new(client.config(), Duration::MAX / 4);
    loop {
        if cursors.is_empty() {
            return;
        }
        let route = match client.shard_of(Route::Shard(shard)) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let node = match client.pick(&route, retry.attempts) {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        retry.attempts += 1;
        let req = pb::SubscribeRequest {
            mailboxes: cursors
                .values()
                .map(|(mb, after)| pb::MailboxCursor {
                    mailbox: Some(mb.clone()),
                    after_seq: *after,
                })
                .collect(),
            max_in_flight,
        };
        let budget = client.config().attempt_timeout;
        let opened = match client.mailbox_at(node) {
            Ok(mut c) => match tokio::time::timeout(budget, c.subscribe(req)).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "node {node} did not open the stream"
                ))),
            },
            Err(e) => Err(Status::unavailable(e.to_string())),
        };
        let failure = match opened {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(ev)) => {
                        retry.reset_backoff(client.config());
                        match deliver(&mut cursors, ev) {
                            Ok(Some(event)) => {
                                if tx.send(Ok(event)).await.is_err() {
                                    return; // the caller dropped the subscription
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                        if cursors.is_empty() {
                            return;
                        }
                    }
                    Ok(None) => break Status::unavailable("the server ended the stream"),
                    Err(s) => break s,
                }
            },
            Err(s) => s,
        };
        if !is_retryable(failure.code()) {
            let _ = tx.send(Err(Error::Rejected(failure))).await;
            return;
        }
        client.learn(shard, node, &failure);
        client.maybe_refresh().await;
        reconnects.fetch_add(1, Ordering::Relaxed);
        if retry.pause(failure, true).await.is_err() {
            return; // unreachable in practice: the deadline is decades away
        }
    }
}

/// Applies one server event to the cursors and returns what the caller
/// should see: new messages only (redeliveries dropped), or an error on a
/// gap.
fn deliver(
    cursors: &mut BTreeMap<Key, (pb::MailboxId, u64)>,
    ev: pb::SubscribeResponse,
) -> Result<Option<Event>, Error> {
    match ev.event {
        Some(pb::subscribe_response::Event::Messages(m)) => {
            let mb = m
                .mailbox
                .ok_or_else(|| Error::Protocol("a Subscribe event without its mailbox".into()))?;
            let key = (mb.namespace.clone(), mb.user_id.clone());
            let Some((_, cursor)) = cursors.get_mut(&key) else {
                return Err(Error::Protocol(format!(
                    "an event for a mailbox not subscribed: {mb:?}"
                )));
            };
            let mut fresh = Vec::with_capacity(m.messages.len());
            for msg in m.messages {
                if msg.seq <= *cursor {
                    continue; // already delivered before a resume
                }
                if msg.seq != *cursor + 1 {
                    return Err(Error::Protocol(format!(
                        "gap in {}/{:?}: seq {} after {}",
                        mb.namespace, mb.user_id, msg.seq, cursor
                    )));
                }
                *cursor = msg.seq;
                fresh.push(msg);
            }
            Ok((!fresh.is_empty()).then_some(Event::Messages {
                mailbox: mb,
                messages: fresh,
            }))
        }
        Some(pb::subscribe_response::Event::Trimmed(t)) => {
            let mb = t
                .mailbox
                .ok_or_else(|| Error::Protocol("a Trimmed event without its mailbox".into()))?;
            cursors.remove(&(mb.namespace.clone(), mb.user_id.clone()));
            Ok(Some(Event::Trimmed {
                mailbox: mb,
                low_watermark: t.low_watermark,
            }))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb() -> pb::MailboxId {
        pb::MailboxId {
            namespace: "chat".into(),
            user_id: b"u".to_vec(),
        }
    }

    fn msgs(seqs: &[u64]) -> pb::SubscribeResponse {
        pb::SubscribeResponse {
            event: Some(pb::subscribe_response::Event::Messages(pb::MailboxMessages {
                mailbox: Some(mb()),
                messages: seqs
                    .iter()
                    .map(|s| pb::Message {
                        seq: *s,
                        ..pb::Message::default()
                    })
                    .collect(),
            })),
        }
    }

    fn seqs(e: Option<Event>) -> Vec<u64> {
        match e {
            Some(Event::Messages { messages, .. }) => messages.iter().map(|m| m.seq).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn redeliveries_are_dropped_and_gaps_refused() {
        let mut c = BTreeMap::from([(("chat".to_string(), b"u".to_vec()), (mb(), 2))]);
        assert_eq!(seqs(deliver(&mut c, msgs(&[1, 2, 3, 4])).unwrap()), vec![3, 4]);
        assert_eq!(deliver(&mut c, msgs(&[3, 4])).unwrap(), None, "all seen");
        assert!(matches!(deliver(&mut c, msgs(&[6])), Err(Error::Protocol(_))));
        assert_eq!(c.values().next().unwrap().1, 4, "a refused event moves nothing");
    }

    #[test]
    fn a_trimmed_mailbox_is_dropped() {
        let mut c = BTreeMap::from([(("chat".to_string(), b"u".to_vec()), (mb(), 2))]);
        let ev = pb::SubscribeResponse {
            event: Some(pb::subscribe_response::Event::Trimmed(pb::CursorTrimmed {
                mailbox: Some(mb()),
                low_watermark: 9,
            })),
        };
        assert!(matches!(
            deliver(&mut c, ev).unwrap(),
            Some(Event::Trimmed { low_watermark: 9, .. })
        ));
        assert!(c.is_empty());
    }
}
