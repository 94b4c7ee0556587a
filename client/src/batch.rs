//! `Client::append_batch`: many appends, each idempotent on its own.
//!
//! Items are grouped by the node that leads their shard and sent as one
//! AppendBatch per node, all nodes in parallel. The server answers per item;
//! items that failed retryably (and every item of a call that failed as a
//! whole) are regrouped — the leader may have moved — and resent with their
//! own idempotency keys until the call's deadline. An item is never sent
//! again once it has a definite answer, so a batch retry cannot duplicate.

use crate::client::{Client, Retry, Route};
use crate::error::{is_retryable, Error};
use pigeonhole_proto::v1 as pb;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Items per AppendBatch call: the server's default limit.
pub const BATCH_ITEMS_MAX: usize = 1_024;

/// Encoded bytes per AppendBatch call: half the server's default request
/// limit, leaving room for framing.
pub const BATCH_BYTES_MAX: usize = 8 << 20;

/// An item's failure as a status, with `last_seq` as ErrorInfo metadata when
/// the server sent it (a failed `expected_last_seq`), so callers read it the
/// same way as for a single append ([`Error::detail`]).
pub(crate) fn item_status(e: &pb::ItemError) -> Status {
    let code = Code::from_i32(e.code);
    if e.last_seq == 0 {
        return Status::new(code, e.message.clone());
    }
    let meta = std::collections::HashMap::from([("last_seq".to_string(), e.last_seq.to_string())]);
    Status::with_error_details(
        code,
        e.message.clone(),
        ErrorDetails::with_error_info("EXPECTED_LAST_SEQ_MISMATCH", "pigeonhole.v1", meta),
    )
}

/// Splits `idx` into calls of at most [`BATCH_ITEMS_MAX`] items and
/// [`BATCH_BYTES_MAX`] bytes (a single larger item still goes alone: the
/// server then names the limit it breaks).
fn chunks(items: &[pb::AppendRequest], idx: Vec<usize>) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0usize;
    for i in idx {
        let len = items.get(i).map_or(0, prost_len);
        let full = out
            .last()
            .is_none_or(|c| c.len() >= BATCH_ITEMS_MAX || bytes + len > BATCH_BYTES_MAX);
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += len;
        if let Some(c) = out.last_mut() {
            c.push(i);
        }
    }
    out
}

fn prost_len(m: &pb::AppendRequest) -> usize {
    pigeonhole_proto::prost::Message::encoded_len(m) + 4
}

pub(crate) async fn append_batch(
    client: &Client,
    items: Vec<pb::AppendRequest>,
    timeout: Duration,
) -> Vec<Result<pb::AppendResponse, Error>> {
    let mut results: Vec<Option<Result<pb::AppendResponse, Error>>> = (0..items.len()).map(|_| None).collect();
    let mut last: Vec<Option<Status>> = vec![None; items.len()];
    let mut retry = Retry::new(client.config(), timeout);
    let mut pending: Vec<usize> = (0..items.len()).collect();
    while !pending.is_empty() {
        // Group what is left by target node; remember each item's shard so
        // a failure teaches the routing table about the right shard.
        let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let mut shard_of_item: BTreeMap<usize, u64> = BTreeMap::new();
        for i in std::mem::take(&mut pending) {
            let Some(uid) = items
                .get(i)
                .and_then(|it| it.mailbox.as_ref())
                .map(|m| m.user_id.as_slice())
            else {
                if let Some(r) = results.get_mut(i) {
                    *r = Some(Err(Error::Rejected(Status::invalid_argument(format!(
                        "items[{i}].mailbox is required"
                    )))));
                }
                continue;
            };
            let target = client
                .shard_of(Route::User(uid))
                .and_then(|s| client.pick(&s, retry.attempts).map(|n| (s.id, n)));
            match target {
                Ok((shard, node)) => {
                    shard_of_item.insert(i, shard);
                    groups.entry(node).or_default().push(i);
                }
                Err(e) => {
                    if let Some(r) = results.get_mut(i) {
                        *r = Some(Err(e));
                    }
                }
            }
        }
        retry.attempts += 1;
        let budget = retry.attempt_budget(client.config(), Duration::ZERO);
        let mut calls = tokio::task::JoinSet::new();
        for (node, idx) in groups {
            for chunk in chunks(&items, idx) {
                let req = pb::AppendBatchRequest {
                    items: chunk.iter().filter_map(|i| items.get(*i).cloned()).collect(),
                };
                let stub = client.mailbox_at(node);
                let learner = client.clone();
                calls.spawn(async move {
                    let answer = match stub {
                        Ok(mut c) => {
                            let call = c.append_batch(crate::client::with_timeout(req, budget));
                            match tokio::time::timeout(budget + Duration::from_millis(100), call).await {
                                Ok(r) => r.map(|a| learner.write_answer(a)),
                                Err(_) => Err(Status::deadline_exceeded(format!("no answer from node {node}"))),
                            }
                        }
                        Err(e) => Err(Status::unavailable(e.to_string())),
                    };
                    (node, chunk, answer)
                });
            }
        }
        let mut any_hint = false;
        while let Some(joined) = calls.join_next().await {
            let Ok((node, chunk, answer)) = joined else {
                continue; // a panicked task: its items stay unanswered below
            };
            match answer {
                Ok(resp) if resp.results.len() == chunk.len() => {
                    for (i, r) in chunk.into_iter().zip(resp.results) {
                        let outcome = match r.result {
                            Some(pb::append_result::Result::Ok(ok)) => Some(Ok(ok)),
                            Some(pb::append_result::Result::Error(e)) => {
                                let s = item_status(&e);
                                if is_retryable(s.code()) {
                                    if let Some(l) = last.get_mut(i) {
                                        *l = Some(s);
                                    }
                                    pending.push(i);
                                    None
                                } else {
                                    Some(Err(Error::Rejected(s)))
                                }
                            }
                            None => Some(Err(Error::Protocol(format!("batch item {i} has no result")))),
                        };
                        if let (Some(o), Some(slot)) = (outcome, results.get_mut(i)) {
                            *slot = Some(o);
                        }
                    }
                }
                Ok(resp) => {
                    let e = format!("{} results for {} items", resp.results.len(), chunk.len());
                    for i in chunk {
                        if let Some(slot) = results.get_mut(i) {
                            *slot = Some(Err(Error::Protocol(e.clone())));
                        }
                    }
                }
                Err(s) if is_retryable(s.code()) => {
                    let shards: std::collections::BTreeSet<u64> =
                        chunk.iter().filter_map(|i| shard_of_item.get(i).copied()).collect();
                    for shard in shards {
                        any_hint |= client.learn(shard, node, &s);
                    }
                    for i in chunk {
                        if let Some(l) = last.get_mut(i) {
                            *l = Some(s.clone());
                        }
                        pending.push(i);
                    }
                }
                Err(s) => {
                    for i in chunk {
                        if let Some(slot) = results.get_mut(i) {
                            *slot = Some(Err(Error::Rejected(s.clone())));
                        }
                    }
                }
            }
        }
        if pending.is_empty() {
            break;
        }
        pending.sort_unstable();
        if retry.attempts >= 2 && !any_hint {
            client.maybe_refresh().await;
        }
        let last_status = pending
            .first()
            .and_then(|i| last.get(*i).cloned().flatten())
            .unwrap_or_else(|| Status::unavailable("retrying"));
        if let Err(gave_up) = retry.pause(last_status, !any_hint).await {
            let attempts = retry.attempts;
            let elapsed_ms = match &gave_up {
                Error::Exhausted { elapsed_ms, .. } => *elapsed_ms,
                _ => 0,
            };
            for i in std::mem::take(&mut pending) {
                if let Some(slot) = results.get_mut(i) {
                    *slot = Some(Err(Error::Exhausted {
                        attempts,
                        elapsed_ms,
                        last: last
                            .get(i)
                            .cloned()
                            .flatten()
                            .unwrap_or_else(|| Status::unavailable("retrying")),
                    }));
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::Protocol("a batch item got no answer".into()))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize) -> pb::AppendRequest {
        pb::AppendRequest {
            mailbox: None,
            payload: vec![0; n].into(),
            idempotency_key: b"k".to_vec(),
            expected_last_seq: None,
        }
    }

    #[test]
    fn chunks_respect_both_limits() {
        let items: Vec<_> = (0..2_500).map(|_| item(10)).collect();
        let c = chunks(&items, (0..2_500).collect());
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![1_024, 1_024, 452]);
        let big: Vec<_> = (0..5).map(|_| item(3 << 20)).collect();
        let c = chunks(&big, (0..5).collect());
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
        let huge = vec![item(20 << 20)];
        assert_eq!(chunks(&huge, vec![0]), vec![vec![0]], "an oversized item goes alone");
    }

    #[test]
    fn an_item_error_keeps_its_last_seq() {
        let s = item_status(&pb::ItemError {
            code: Code::FailedPrecondition as i32,
            message: "m".into(),
            last_seq: 7,
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(crate::error::status_detail(&s, "last_seq"), Some(7));
    }
}
