//! `pigeonhole.v1.Admin`: the shard map for client routing, a node's replica
//! status and leader transfer for operators. Thin: everything comes from the
//! node ([`Node::shard_map`], [`Node::status`], [`Node::transfer_leader`]).

use super::status::{cluster_error, invalid};
use crate::{ClusterError, Node, Role};
use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

/// Keys a NodeStatus size scan reads per replica at most, so that asking
/// for sizes costs at most a few hundred milliseconds per replica.
pub const SIZE_SCAN_KEYS_MAX: u64 = 100_000;

/// The service.
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Node,
}

impl AdminService {
    /// The service over `node`.
    pub fn new(node: Node) -> Self {
        AdminService { node }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_shard_map(
        &self,
        _: Request<pb::GetShardMapRequest>,
    ) -> Result<Response<pb::GetShardMapResponse>, Status> {
        let map = self.node.shard_map().map_err(|e| cluster_error(&e))?;
        Ok(Response::new(pb::GetShardMapResponse {
            nodes: map
                .nodes
                .iter()
                .map(|(id, address)| pb::NodeInfo {
                    id: *id,
                    address: address.clone(),
                })
                .collect(),
            shards: map
                .shards
                .into_iter()
                .map(|s| pb::ShardInfo {
                    id: s.id,
                    range_start: s.range_start,
                    range_end: s.range_end,
                    replicas: s.replicas,
                    learners: s.learners,
                    leader_hint: s.leader_hint,
                })
                .collect(),
        }))
    }

    async fn node_status(
        &self,
        req: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusResponse>, Status> {
        let replicas = self.node.status().await.map_err(|e| cluster_error(&e))?;
        let sizes = if req.get_ref().include_sizes {
            // A scan of many replicas is blocking RocksDB work: off the
            // async workers.
            let node = self.node.clone();
            let shards: Vec<u64> = replicas.iter().map(|s| s.shard).collect();
            tokio::task::spawn_blocking(move || {
                shards
                    .into_iter()
                    .filter_map(|id| {
                        node.engine()
                            .shard_size(id, SIZE_SCAN_KEYS_MAX)
                            .ok()
                            .map(|size| (id, size))
                    })
                    .collect::<std::collections::HashMap<_, _>>()
            })
            .await
            .map_err(|e| Status::internal(format!("size scan: {e}")))?
        } else {
            std::collections::HashMap::new()
        };
        let watching = self.node.watchers().counts();
        Ok(Response::new(pb::NodeStatusResponse {
            subscribe_streams: watching.streams,
            subscribed_mailboxes: watching.stream_mailboxes,
            sync_waiters: watching.polls,
            node_id: self.node.id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            replicas: replicas
                .into_iter()
                .map(|s| pb::ReplicaStatus {
                    data_keys: sizes.get(&s.shard).map_or(0, |z| z.keys),
                    data_bytes: sizes.get(&s.shard).map_or(0, |z| z.bytes),
                    size_complete: sizes.get(&s.shard).is_some_and(|z| z.complete),
                    shard: s.shard,
                    role: match s.role {
                        Role::Leader => pb::ReplicaRole::Leader,
                        Role::Follower => pb::ReplicaRole::Follower,
                        Role::Candidate => pb::ReplicaRole::Candidate,
                    } as i32,
                    leader: s.leader,
                    term: s.term,
                    commit_index: s.commit,
                    applied_index: s.applied,
                    last_index: s.last_index,
                    first_index: s.first_index,
                    voters: s.voters,
                    learners: s.learners,
                    asleep: s.asleep,
                })
                .collect(),
        }))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let r = req.into_inner();
        if r.to_node == 0 {
            return Err(invalid("to_node", "is required"));
        }
        match self.node.transfer_leader(r.shard, r.to_node).await {
            Ok(()) => Ok(Response::new(pb::TransferLeaderResponse {})),
            // Only the leader can transfer: say who that is, and that the
            // call must go there (retrying here cannot succeed).
            Err(ClusterError::NotLeader { leader, .. }) => Err(super::status::not_leader_precondition(r.shard, leader)),
            Err(e) => Err(cluster_error(&e)),
        }
    }
}
