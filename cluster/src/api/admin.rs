//! `pigeonhole.v1.Admin`: the shard map for client routing, a node's replica
//! status, leader transfer and membership changes for operators, node
//! states, and admitting nodes that join (`crate::join`). Thin:
//! everything comes from the node ([`Node::shard_map`], [`Node::status`],
//! [`Node::transfer_leader`], [`Node::change_membership`]); this file checks
//! requests and maps results to statuses.

use super::membership::{membership_changes, took_effect};
use super::status::{cluster_error, invalid};
use crate::{ClusterError, MembershipChange, Node, Role};
use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

/// Keys a NodeStatus size scan reads per replica at most, so that asking
/// for sizes costs at most a few hundred milliseconds per replica.
pub const SIZE_SCAN_KEYS_MAX: u64 = 100_000;

/// Shards a NodeStatus may name in `size_shards`, at most.
pub const SIZE_SHARDS_MAX: usize = 1_024;

/// Changes in one ChangeMembership call, at most: a replica move needs two
/// (promote the new, remove the old); a whole shard's voters is five.
pub const MEMBERSHIP_CHANGES_MAX: usize = 8;

/// The service.
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Node,
    auth: crate::auth::Auth,
}

impl AdminService {
    /// The service over `node`, checking nothing (a plaintext node).
    pub fn new(node: Node) -> Self {
        AdminService {
            node,
            auth: crate::auth::Auth::off(),
        }
    }

    /// Checks every request with `auth`: GetShardMap needs any identity
    /// (clients route by it; it holds no mailbox data), every other RPC the
    /// admin role.
    pub fn with_auth(mut self, auth: crate::auth::Auth) -> Self {
        self.auth = auth;
        self
    }

    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.auth
            .check(req, crate::auth::book::ALL_NAMESPACES, pb::Role::Admin)
            .map(|_| ())
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_shard_map(
        &self,
        req: Request<pb::GetShardMapRequest>,
    ) -> Result<Response<pb::GetShardMapResponse>, Status> {
        let caller = self.auth.caller(&req)?;
        self.auth.known(&caller)?;
        let map = self.node.shard_map().map_err(|e| cluster_error(&e))?;
        let states = self.node.node_states().map_err(|e| cluster_error(&e))?;
        Ok(Response::new(pb::GetShardMapResponse {
            nodes: map
                .nodes
                .iter()
                .map(|(id, address)| pb::NodeInfo {
                    id: *id,
                    address: address.clone(),
                    state: states.get(id).map_or(pb::NodeState::Up, |e| e.state) as i32,
                    zone: states.get(id).map(|e| e.zone.clone()).unwrap_or_default(),
                    leaders_only: states.get(id).is_some_and(|e| e.keep_replicas),
                })
                .collect(),
            shards: map.shards.into_iter().map(shard_info).collect(),
        }))
    }

    async fn node_status(
        &self,
        req: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusResponse>, Status> {
        self.admin(&req)?;
        if req.get_ref().size_shards.len() > SIZE_SHARDS_MAX {
            return Err(invalid(
                "size_shards",
                format!("{} ids; at most {SIZE_SHARDS_MAX}", req.get_ref().size_shards.len()),
            ));
        }
        let replicas = self.node.status().await.map_err(|e| cluster_error(&e))?;
        let sizes = if req.get_ref().include_sizes {
            // A scan of many replicas is blocking RocksDB work: off the
            // async workers.
            let node = self.node.clone();
            let only = &req.get_ref().size_shards;
            let shards: Vec<u64> = replicas
                .iter()
                .map(|s| s.shard)
                .filter(|s| only.is_empty() || only.contains(s))
                .collect();
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
        // The engine's marks, not only the live replicas: after a rebuild a
        // replica exists only once its leader's first message arrived, and
        // until then it is catching up all the same. Reporting it is what
        // tells an operator (and the Jepsen nemesis) that this node may not
        // vote for that shard, so taking another of its replicas down would
        // leave the shard without a majority that may vote (D49).
        let mut catching_up_shards: std::collections::BTreeSet<u64> = replicas
            .iter()
            .filter(|s| s.catching_up.is_some())
            .map(|s| s.shard)
            .collect();
        let marks = self
            .node
            .engine()
            .catching_up()
            .map_err(|e| Status::internal(format!("catching-up marks: {e}")))?;
        catching_up_shards.extend(marks.into_iter().map(|(shard, _)| shard));
        let catching_up_shards = catching_up_shards.into_iter().collect();
        Ok(Response::new(pb::NodeStatusResponse {
            catching_up_shards,
            subscribe_streams: watching.streams,
            subscribed_mailboxes: watching.stream_mailboxes,
            sync_waiters: watching.polls,
            stale_replicas_deleted: self
                .node
                .counters()
                .stale_replicas_deleted
                .load(std::sync::atomic::Ordering::Relaxed),
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
                    catching_up: s.catching_up.unwrap_or_default(),
                    snapshot_sends: s
                        .snapshot_sends
                        .iter()
                        .map(|(to, bytes_sent)| pb::SnapshotSend {
                            to: *to,
                            bytes_sent: *bytes_sent,
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        if r.to_node == 0 {
            return Err(invalid("to_node", "is required"));
        }
        self.takes_new_work(r.to_node, "leadership").await?;
        match self.node.transfer_leader(r.shard, r.to_node).await {
            Ok(()) => Ok(Response::new(pb::TransferLeaderResponse {})),
            // Only the leader can transfer: say who that is, and that the
            // call must go there (retrying here cannot succeed).
            Err(ClusterError::NotLeader { leader, .. }) => Err(super::status::not_leader_precondition(r.shard, leader)),
            Err(e) => Err(cluster_error(&e)),
        }
    }

    async fn change_membership(
        &self,
        req: Request<pb::ChangeMembershipRequest>,
    ) -> Result<Response<pb::ChangeMembershipResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        let nodes = self.node.shard_map().map_err(|e| cluster_error(&e))?.nodes;
        let changes = membership_changes(&r.changes, |n| nodes.contains_key(&n))?;
        for c in &changes {
            if let MembershipChange::AddLearner(n) | MembershipChange::AddVoter(n) = *c {
                self.takes_new_work(n, "replica").await?;
            }
        }
        match self.node.change_membership(r.shard, &changes).await {
            Ok(cs) => {
                if let Some(refused) = changes.iter().find(|c| !took_effect(c, &cs)) {
                    return Err(Status::failed_precondition(format!(
                        "shard {}: Raft refused the change {refused:?}; the configuration stays voters {:?}, \
                         learners {:?}",
                        r.shard, cs.voters, cs.learners
                    )));
                }
                Ok(Response::new(pb::ChangeMembershipResponse {
                    voters: cs.voters,
                    learners: cs.learners,
                    voters_outgoing: cs.voters_outgoing,
                }))
            }
            Err(ClusterError::NotLeader { leader, .. }) => Err(super::status::not_leader_precondition(r.shard, leader)),
            Err(e) => Err(cluster_error(&e)),
        }
    }

    async fn split_shard(
        &self,
        req: Request<pb::SplitShardRequest>,
    ) -> Result<Response<pb::SplitShardResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        let at = (r.split_hash != 0).then_some(r.split_hash);
        let done = self
            .node
            .split_shard(r.shard, at)
            .await
            .map_err(|e| cluster_error(&e))?;
        Ok(Response::new(pb::SplitShardResponse {
            shard: Some(shard_info(done.shard)),
            new_shard: Some(shard_info(done.new_shard)),
        }))
    }

    async fn set_preferred_leader(
        &self,
        req: Request<pb::SetPreferredLeaderRequest>,
    ) -> Result<Response<pb::SetPreferredLeaderResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        self.node
            .set_preferred_leader(r.shard, r.node)
            .await
            .map_err(|e| cluster_error(&e))?;
        Ok(Response::new(pb::SetPreferredLeaderResponse {}))
    }

    async fn get_placement(
        &self,
        req: Request<pb::GetPlacementRequest>,
    ) -> Result<Response<pb::GetPlacementResponse>, Status> {
        self.admin(&req)?;
        let v = self.node.placement().await.map_err(|e| cluster_error(&e))?;
        let state_name = |s: pigeonhole_proto::internal::v1::MoveState| match s {
            pigeonhole_proto::internal::v1::MoveState::Cancelled => "cancelled",
            _ => "active",
        };
        let balanced = v.decision.balanced();
        let d = v.decision;
        Ok(Response::new(pb::GetPlacementResponse {
            paused: v.config.paused,
            moves_max: v.config.moves_max,
            in_flight: d
                .in_flight
                .iter()
                .map(|t| pb::PlacementMove {
                    shard: t.shard,
                    from: t.from,
                    to: t.to,
                    state: state_name(t.state).into(),
                    step: v.steps.get(&t.shard).copied().unwrap_or_default().into(),
                    started_unix_ms: t.started_unix_ms,
                })
                .collect(),
            planned: d
                .planned
                .iter()
                .map(|m| pb::PlacementMove {
                    shard: m.shard,
                    from: m.from,
                    to: m.to,
                    state: "planned".into(),
                    step: String::new(),
                    started_unix_ms: 0,
                })
                .collect(),
            planned_leaders: d
                .planned_leaders
                .iter()
                .map(|(shard, node)| pb::LeaderChoice {
                    shard: *shard,
                    node: *node,
                })
                .collect(),
            nodes: v
                .load
                .iter()
                .map(|(node, l)| pb::NodeLoad {
                    node: *node,
                    replicas: l.replicas,
                    leaders: l.leaders,
                    preferred: l.preferred,
                    eligible: d.eligible.contains(node),
                    bytes: l.bytes,
                })
                .collect(),
            balanced,
            answered_by: self.node.id(),
            runs_loop: v.runs_loop,
            by_bytes: v.by_bytes,
            split_size_bytes: v.config.split_size_bytes,
            draining_held: d.draining_held.iter().copied().collect(),
        }))
    }

    async fn set_placement(
        &self,
        req: Request<pb::SetPlacementRequest>,
    ) -> Result<Response<pb::SetPlacementResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        let c = self
            .node
            .set_placement(crate::node::PlacementChange {
                paused: r.paused,
                moves_max: r.moves_max,
                split_size_bytes: r.split_size_bytes,
            })
            .await
            .map_err(|e| cluster_error(&e))?;
        Ok(Response::new(pb::SetPlacementResponse {
            paused: c.paused,
            moves_max: c.moves_max,
            split_size_bytes: c.split_size_bytes,
        }))
    }

    async fn set_node_state(
        &self,
        req: Request<pb::SetNodeStateRequest>,
    ) -> Result<Response<pb::SetNodeStateResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        let state = pb::NodeState::try_from(r.state)
            .map_err(|_| invalid("state", format!("{} is not a NodeState", r.state)))?;
        let (previous, state) = self
            .node
            .change_node_state(r.node, state, r.leaders_only)
            .await
            .map_err(|e| cluster_error(&e))?;
        Ok(Response::new(pb::SetNodeStateResponse {
            previous: previous as i32,
            state: state as i32,
        }))
    }

    async fn get_auth(&self, req: Request<pb::GetAuthRequest>) -> Result<Response<pb::GetAuthResponse>, Status> {
        self.admin(&req)?;
        super::tenancy_rpc::get_auth(&self.node).await.map(Response::new)
    }

    async fn put_identity(
        &self,
        req: Request<pb::PutIdentityRequest>,
    ) -> Result<Response<pb::PutIdentityResponse>, Status> {
        self.admin(&req)?;
        super::tenancy_rpc::put_identity(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_identity(
        &self,
        req: Request<pb::DeleteIdentityRequest>,
    ) -> Result<Response<pb::DeleteIdentityResponse>, Status> {
        self.admin(&req)?;
        super::tenancy_rpc::delete_identity(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn grant(&self, req: Request<pb::GrantRequest>) -> Result<Response<pb::GrantResponse>, Status> {
        self.admin(&req)?;
        super::tenancy_rpc::grant(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Result<Response<pb::RevokeResponse>, Status> {
        self.admin(&req)?;
        super::tenancy_rpc::revoke(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.admin(&req)?;
        super::tenancy_rpc::create_token(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        self.admin(&req)?;
        super::tenancy_rpc::revoke_token(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_namespaces(
        &self,
        req: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        self.admin(&req)?;
        super::tenancy_rpc::list_namespaces(&self.node).await.map(Response::new)
    }

    async fn set_namespace(
        &self,
        req: Request<pb::SetNamespaceRequest>,
    ) -> Result<Response<pb::SetNamespaceResponse>, Status> {
        self.admin(&req)?;
        super::tenancy_rpc::set_namespace(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn set_log_level(
        &self,
        req: Request<pb::SetLogLevelRequest>,
    ) -> Result<Response<pb::SetLogLevelResponse>, Status> {
        self.admin(&req)?;
        let filter = req.into_inner().filter;
        let previous = crate::logging::set_filter(&filter).map_err(|e| invalid("filter", e))?;
        tracing::info!(%previous, %filter, "log filter changed");
        Ok(Response::new(pb::SetLogLevelResponse { previous, filter }))
    }

    async fn accept_replica_loss(
        &self,
        req: Request<pb::AcceptReplicaLossRequest>,
    ) -> Result<Response<pb::AcceptReplicaLossResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        if !r.accept_loss {
            return Err(invalid(
                "accept_loss",
                "must be true: a replica that votes before it caught up may help elect a leader without writes it lost",
            ));
        }
        let reason = self
            .node
            .accept_replica_loss(r.shard)
            .await
            .map_err(|e| cluster_error(&e))?;
        Ok(Response::new(pb::AcceptReplicaLossResponse { reason }))
    }

    type BackupShardStream = super::backup::BackupStream;

    async fn backup_shard(
        &self,
        req: Request<pb::BackupShardRequest>,
    ) -> Result<Response<Self::BackupShardStream>, Status> {
        self.admin(&req)?;
        super::backup::backup_shard(&self.node, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn set_mailbox_hold(
        &self,
        req: Request<pb::SetMailboxHoldRequest>,
    ) -> Result<Response<pb::SetMailboxHoldResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        super::tenancy_rpc::set_mailbox_hold(&self.node, r)
            .await
            .map(Response::new)
    }

    async fn join_node(&self, req: Request<pb::JoinNodeRequest>) -> Result<Response<pb::JoinNodeResponse>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        let (node_id, nodes) = crate::join::admit(&self.node, &r.address, r.join_token, &r.zone)
            .await
            .map_err(|e| cluster_error(&e))?;
        let params = self.node.bootstrap_params();
        let info = |(id, address): (&u64, &String)| pb::NodeInfo {
            id: *id,
            address: address.clone(),
            state: pb::NodeState::Up as i32,
            zone: String::new(),
            leaders_only: false,
        };
        Ok(Response::new(pb::JoinNodeResponse {
            node_id,
            cluster_id: self.node.cluster_id(),
            shard_count: params.shard_count,
            replication_factor: u32::try_from(params.replication_factor).unwrap_or(u32::MAX),
            initial_cluster: params.initial_cluster.nodes.iter().map(info).collect(),
            nodes: nodes.iter().map(info).collect(),
        }))
    }
}

impl AdminService {
    /// FAILED_PRECONDITION unless `node` may take new `work` (a replica or
    /// a leadership): draining and removed nodes take none. Reads the state
    /// after a read barrier on the metadata group, so a state an operator
    /// just set (an undrain, a drain) is seen here even if this node's
    /// metadata replica had not applied it yet.
    async fn takes_new_work(&self, node: u64, work: &str) -> Result<(), Status> {
        self.node
            .read_barrier(crate::placement::META_SHARD)
            .await
            .map_err(|e| cluster_error(&e))?;
        let state = self.node.node_state(node).map_err(|e| cluster_error(&e))?;
        if crate::nodes::takes_new_work(state) {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "node {node} is {}: it takes no new {work} (phctl node undrain {node} to undo a drain)",
            crate::nodes::state_name(state)
        )))
    }
}

/// A shard map entry on the wire.
fn shard_info(s: crate::placement::ShardDesc) -> pb::ShardInfo {
    pb::ShardInfo {
        id: s.id,
        range_start: s.range_start,
        range_end: s.range_end,
        replicas: s.replicas,
        learners: s.learners,
        leader_hint: s.leader_hint,
        epoch: s.epoch,
        parent: s.parent,
    }
}
