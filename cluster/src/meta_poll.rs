//! Following one system value of the metadata group from this node's own
//! replica: the access-control book (`auth/state`) and the namespaces'
//! limits (`ns/state`) are each one value that every node must enforce
//! within a second of a change.
//!
//! Why polling: every node holds a replica of the metadata group (a voter
//! or a learner), so the value is a local point read; reading it every
//! [`POLL_MS`] and decoding only a new version costs one RocksDB lookup per
//! 100 ms, with no hook in apply and no ordering to get wrong.

use crate::Node;
use std::sync::Weak;
use std::time::Duration;

/// How often a node reads a followed value.
pub const POLL_MS: u64 = 100;

/// Reads `key` from `node`'s metadata replica every [`POLL_MS`] and hands
/// each version other than the last one handed (value and version) to
/// `install` on `target`. Stops when `target` is dropped. A node without a
/// metadata replica (being removed) keeps what it last installed.
pub fn follow<T: Send + Sync + 'static>(node: &Node, key: &'static [u8], target: Weak<T>, install: fn(&T, u64, &[u8])) {
    let node = node.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(POLL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = 0;
        loop {
            tick.tick().await;
            let Some(t) = target.upgrade() else { return };
            if let Ok(values) = node.meta_scan(key, 1) {
                if let Some(v) = values.into_iter().find(|v| v.key == key) {
                    if v.version != last {
                        last = v.version;
                        install(&t, v.version, &v.value);
                    }
                }
            }
        }
    });
}

impl Node {
    /// A followed value and its version (0 and the default when absent),
    /// after a read barrier on the metadata group, so it holds every change
    /// acknowledged before the call.
    pub async fn read_meta_value<T: prost::Message + Default>(
        &self,
        key: &[u8],
    ) -> Result<(u64, T), crate::ClusterError> {
        self.read_barrier(crate::placement::META_SHARD).await?;
        match self.meta_scan(key, 1)?.into_iter().find(|v| v.key == key) {
            None => Ok((0, T::default())),
            Some(v) => T::decode(v.value.as_slice()).map(|t| (v.version, t)).map_err(|e| {
                crate::ClusterError::Raft(format!("{} does not decode: {e}", String::from_utf8_lossy(key)))
            }),
        }
    }

    /// Writes a followed value at `version + 1` if it is still at `version`
    /// (compare-and-set; a concurrent writer makes it BUSY: read again).
    pub async fn write_meta_value(
        &self,
        key: &[u8],
        version: u64,
        value: Vec<u8>,
        what: &str,
    ) -> Result<(), crate::ClusterError> {
        use pigeonhole_proto::internal::v1 as cmd;
        let op = cmd::Op {
            op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                key: key.to_vec(),
                value,
                version: version.saturating_add(1),
                if_version: Some(version),
            })),
        };
        self.propose_meta_cas(op, what).await
    }
}
