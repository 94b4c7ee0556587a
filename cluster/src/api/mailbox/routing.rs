//! Where a Mailbox request's mailbox lives, and what a caller is told when
//! it called a node that is not the best one to answer: the shard by the
//! placement hash, the leader hints on a forwarded write's answer, the new
//! owner in WRONG_SHARD after a split, and a replica in NOT_REPLICA for a
//! local read. Kept apart from the handlers (`super`), which only call
//! these.

use super::MailboxService;
use crate::api::status::{invalid, op_error_at, read_error, wrong_shard_owned};
use pigeonhole_engine::ReadError;
use pigeonhole_proto::v1 as pb;
use tonic::{Response, Status};

impl MailboxService {
    /// Validates a mailbox id and finds its shard.
    pub(super) fn route(&self, mb: Option<&pb::MailboxId>) -> Result<(String, Vec<u8>, u64), Status> {
        self.route_at("", mb)
    }

    /// [`Self::route`] for a mailbox at `prefix` in the request (e.g.
    /// `items[3].`): errors name the field by its full path.
    pub(in crate::api) fn route_at(
        &self,
        prefix: &str,
        mb: Option<&pb::MailboxId>,
    ) -> Result<(String, Vec<u8>, u64), Status> {
        let mb = mb.ok_or_else(|| invalid(&format!("{prefix}mailbox"), "is required"))?;
        self.node
            .engine()
            .options()
            .limits
            .check_mailbox(&mb.namespace, &mb.user_id)
            .map_err(|e| op_error_at(prefix, &e))?;
        let shard = self
            .node
            .routing()
            .shard_for_user(&mb.user_id)
            .map(|s| s.id)
            .ok_or_else(|| Status::internal("no shard covers this user id"))?;
        // The request's span (crate::metrics) names what it touches; a
        // batch's items (prefixed) would each overwrite it: not recorded.
        if prefix.is_empty() {
            tracing::Span::current()
                .record("namespace", mb.namespace.as_str())
                .record("shard", shard);
        }
        Ok((mb.namespace.clone(), mb.user_id.clone(), shard))
    }

    /// `msg` as a write's answer, with the leader hints of the `shards` it
    /// wrote that this node does not lead ([`pigeonhole_proto::hints`]):
    /// the write was forwarded, and the caller can send the next one to
    /// the leader.
    pub(super) fn hinted<T>(&self, msg: T, shards: impl IntoIterator<Item = u64>) -> Response<T> {
        let me = self.node.id();
        let pairs = shards.into_iter().filter_map(|shard| {
            let leader = self.node.leader_hint(shard);
            let forwarded = leader != 0 && leader != me;
            if forwarded {
                crate::metrics::forwarded_write(shard);
            }
            forwarded.then_some((shard, leader))
        });
        let mut resp = Response::new(msg);
        if let Some(v) = pigeonhole_proto::hints::format(pairs).and_then(|v| v.parse().ok()) {
            resp.metadata_mut().insert(pigeonhole_proto::hints::LEADERS_HEADER, v);
        }
        resp
    }

    /// WRONG_SHARD for a mailbox (of user hash `hash`) that a split moved
    /// out of `shard`, with the entry of the shard holding it now.
    pub(super) fn moved(&self, shard: u64, range: pigeonhole_engine::HashRange, hash: Option<u64>) -> Status {
        let map = self.node.routing();
        let owner = hash.and_then(|h| map.shard_for_hash(h));
        let msg = format!(
            "mailbox is not in shard {shard}'s hash range {range}: the shard was split; route again{}",
            owner.map_or(String::new(), |o| format!(" (shard {} holds it now)", o.id))
        );
        wrong_shard_owned(msg, shard, range, owner)
    }

    /// A read's error, WRONG_SHARD with the new owner's entry.
    pub(super) fn read_failed(&self, e: &ReadError, user_id: &[u8]) -> Status {
        match e {
            ReadError::WrongShard { shard, range } => {
                self.moved(*shard, *range, Some(pigeonhole_proto::placement::user_hash(user_id)))
            }
            // A STALE read goes to the engine without the driver, which
            // names the shard's replicas in a proposal's NOT_REPLICA; the
            // shard map gives the same hint here.
            ReadError::Engine(pigeonhole_engine::EngineError::NoSuchShard(shard)) => {
                crate::api::status::not_replica_read(*shard, self.replica_hint(*shard))
            }
            other => read_error(other),
        }
    }

    /// A node other than this one that holds a replica of `shard`, the last
    /// known leader first, from the routing map every node keeps (0 = none
    /// known). Not from the metadata group's records: a node may have no
    /// replica of that group (just joined), and this is only a hint.
    fn replica_hint(&self, shard: u64) -> u64 {
        let me = self.node.id();
        let map = self.node.routing();
        let Some(desc) = map.shard(shard) else {
            return 0;
        };
        if desc.leader_hint != me && desc.replicas.contains(&desc.leader_hint) {
            return desc.leader_hint;
        }
        desc.replicas.iter().copied().find(|n| *n != me).unwrap_or(0)
    }
}
