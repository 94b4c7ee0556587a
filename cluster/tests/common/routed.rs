//! Clients of an in-process cluster that route by a node's map, as the
//! SDK does across splits: appends retried on misroutes until acknowledged,
//! and a check that every acknowledged append is stored exactly once.

use super::*;
use pigeonhole_cluster::Node;
use pigeonhole_engine::{OpError, OpOutput};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const USERS: usize = 48;

pub fn user(i: usize) -> String {
    format!("user-{i}")
}

/// Appends to `user` through `node`, routed by the node's map, retrying
/// retryable errors and misroutes (WrongShard) with the same key until it
/// is acknowledged. Returns the seq.
pub async fn append_routed(node: &Node, user: &str, key: &str, payload: &[u8]) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(std::time::Instant::now() < deadline, "append {key} never acknowledged");
        let shard = node.routing().shard_for_user(user.as_bytes()).unwrap().id;
        match node.propose(shard, vec![append_op(user, key, payload)]).await {
            Ok(mut r) => match r.pop() {
                Some(Ok(OpOutput::Appended { seq, .. })) => return seq,
                Some(Err(OpError::WrongShard { .. })) => {}
                other => panic!("append {key}: {other:?}"),
            },
            Err(e) if e.is_retryable() => {}
            Err(e) => panic!("append {key}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub type Acked = Arc<Mutex<BTreeMap<String, Vec<(u64, Vec<u8>)>>>>;

/// Writers appending to every user through every node until `stop`; each
/// payload is its key and `pad` bytes more.
pub fn writers(
    c: &TestCluster,
    phase: &str,
    pad: usize,
    acked: &Acked,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (w, node) in c.nodes.values().cloned().enumerate() {
        let (acked, stop, phase) = (Arc::clone(acked), Arc::clone(stop), phase.to_string());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let u = user((w * 7 + usize::try_from(n).unwrap()) % USERS);
                let key = format!("{phase}w{w}-{n}");
                let mut payload = key.clone().into_bytes();
                payload.resize(payload.len() + pad, b'.');
                let seq = append_routed(&node, &u, &key, &payload).await;
                acked.lock().unwrap().entry(u).or_default().push((seq, payload));
                n += 1;
            }
        }));
    }
    tasks
}

/// `user`'s messages on `node`'s replica of the shard node 1's routing
/// names, and that shard. Splits may still be under way (a placement loop
/// splits halves that are still past the split size after the writers
/// stop), so a replica that applied a split the route does not know yet
/// answers `WrongShard`, and a node that has not applied a split node 1's
/// route already names has no replica of the new shard yet
/// (`NoSuchShard`): the route is looked up again, for up to 10 s.
async fn read_routed(c: &TestCluster, node: &Node, user: &str) -> (u64, Vec<(u64, Vec<u8>)>) {
    let mut last = None;
    for _ in 0..500 {
        let shard = c.nodes[&1].routing().shard_for_user(user.as_bytes()).unwrap().id;
        match try_read_all(node, shard, user) {
            Ok(got) => return (shard, got),
            Err(
                e @ (pigeonhole_engine::ReadError::WrongShard { .. }
                | pigeonhole_engine::ReadError::Engine(pigeonhole_engine::EngineError::NoSuchShard(_))),
            ) => last = Some(e),
            Err(e) => panic!("{user} on shard {shard}: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{user}: no route settled in 10 s: {last:?}");
}

/// Every acknowledged append is on every replica of its mailbox's shard,
/// exactly once, at its seq; seqs have no gap.
pub async fn check_all(c: &TestCluster, acked: &Acked) {
    let acked = acked.lock().unwrap().clone();
    for (u, mut want) in acked {
        want.sort();
        for (id, node) in &c.nodes {
            let (mut shard, mut got) = read_routed(c, node, &u).await;
            for _ in 0..500 {
                if got.len() >= want.len() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                (shard, got) = read_routed(c, node, &u).await;
            }
            assert!(
                got.len() >= want.len(),
                "node {id}, shard {shard}, {u}: {} stored, {} acked; stored {:?}; acked {:?}; replica {:?}",
                got.len(),
                want.len(),
                got.iter()
                    .map(|(s, p)| (*s, String::from_utf8_lossy(p).to_string()))
                    .collect::<Vec<_>>(),
                want.iter()
                    .map(|(s, p)| (*s, String::from_utf8_lossy(p).to_string()))
                    .collect::<Vec<_>>(),
                c.status(*id, shard).await
            );
            let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
            assert_eq!(
                seqs,
                (1..=u64::try_from(got.len()).unwrap()).collect::<Vec<_>>(),
                "{u} on node {id}"
            );
            let mut payloads: Vec<&Vec<u8>> = got.iter().map(|(_, p)| p).collect();
            payloads.sort();
            payloads.dedup();
            assert_eq!(payloads.len(), got.len(), "{u} on node {id}: a payload stored twice");
            for (seq, payload) in &want {
                assert_eq!(
                    &got[usize::try_from(*seq - 1).unwrap()].1,
                    payload,
                    "{u} seq {seq} on node {id}"
                );
            }
        }
    }
}
