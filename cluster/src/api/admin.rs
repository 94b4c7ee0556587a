//! `pigeonhole.v1.Admin`: the shard map for client routing, a node's replica
//! status and leader transfer for operators. Thin: everything comes from the
//! node ([`Node::shard_map`], [`Node::status`], [`Node::transfer_leader`]).

use super::status::{cluster_error, invalid};
use crate::{ClusterError, Node, Role};
use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

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

    async fn node_status(&self, _: Request<pb::NodeStatusRequest>) -> Result<Response<pb::NodeStatusResponse>, Status> {
        let replicas = self.node.status().await.map_err(|e| cluster_error(&e))?;
        Ok(Response::new(pb::NodeStatusResponse {
            node_id: self.node.id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            replicas: replicas
                .into_iter()
                .map(|s| pb::ReplicaStatus {
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
