//! Node administration in the SDK: node states (up, draining, removed) and
//! the call that any node can answer. Separate from `client.rs` because it
//! is an operator's surface (phctl), not the routing tier's hot path.

use super::{with_timeout, Client, Retry};
use crate::error::is_retryable;
use crate::{pb, Error};
use pigeonhole_proto::v1::admin_client::AdminClient;
use std::future::Future;
use std::time::Duration;
use tonic::Status;

impl Client {
    /// Sets `node`'s log filter (`Admin.SetLogLevel`, that node only);
    /// returns the filter it replaced.
    pub async fn set_log_level(&self, node: u64, filter: &str) -> Result<pb::SetLogLevelResponse, Error> {
        let mut admin = self.admin_at(node)?;
        let req = with_timeout(
            pb::SetLogLevelRequest {
                filter: filter.to_string(),
            },
            self.timeout,
        );
        admin
            .set_log_level(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(Error::Rejected)
    }

    /// Clears `node`'s catching-up mark on its replica of `shard`
    /// (`Admin.AcceptReplicaLoss`): it votes again before it caught up,
    /// and writes it lost may be lost for good. Answers why it was marked.
    pub async fn accept_replica_loss(&self, node: u64, shard: u64) -> Result<pb::AcceptReplicaLossResponse, Error> {
        let mut admin = self.admin_at(node)?;
        let req = with_timeout(
            pb::AcceptReplicaLossRequest {
                shard,
                accept_loss: true,
            },
            self.timeout,
        );
        admin
            .accept_replica_loss(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(Error::Rejected)
    }

    /// The cluster's nodes with their addresses and states, from any node
    /// that answers (its replica of the metadata group).
    pub async fn nodes(&self) -> Result<Vec<pb::NodeInfo>, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(pb::GetShardMapRequest {}, budget);
            async move { admin.get_shard_map(req).await.map(|r| r.into_inner().nodes) }
        })
        .await
    }

    /// Sets `node`'s state (`Admin.SetNodeState`): DRAINING stops new
    /// replicas and leaderships going to it (and the placement loop moves
    /// its replicas away), UP undoes that, REMOVED takes it out for good
    /// once it holds no replica. Any node can answer.
    pub async fn set_node_state(&self, node: u64, state: pb::NodeState) -> Result<pb::SetNodeStateResponse, Error> {
        self.change_node_state(node, state, false).await
    }

    /// [`Client::set_node_state`]; `leaders_only` with DRAINING keeps the
    /// node's replicas where they are (a drain for a restart).
    pub async fn change_node_state(
        &self,
        node: u64,
        state: pb::NodeState,
        leaders_only: bool,
    ) -> Result<pb::SetNodeStateResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(
                pb::SetNodeStateRequest {
                    node,
                    state: state as i32,
                    leaders_only,
                },
                budget,
            );
            async move { admin.set_node_state(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Splits `shard` at `split_hash` (`Admin.SplitShard`, D38): the upper
    /// part of its hash range becomes a new shard on the same replicas. The
    /// hash is explicit, so a retry of a split that went through finds it
    /// done (the server answers with the two shards) instead of splitting
    /// again. Then re-reads the shard map.
    pub async fn split_shard(&self, shard: u64, split_hash: u64) -> Result<pb::SplitShardResponse, Error> {
        let r = self
            .call_any(|mut admin, budget| {
                let req = with_timeout(pb::SplitShardRequest { shard, split_hash }, budget);
                async move { admin.split_shard(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
        self.refresh().await?;
        Ok(r)
    }

    /// Runs an admin call any node can answer: on the known nodes in turn,
    /// retrying retryable statuses (and UNIMPLEMENTED, from a node of an
    /// older build) within the client's deadline.
    pub(super) async fn call_any<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut(AdminClient<super::Conn>, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let cfg = &self.inner.config;
        let mut retry = Retry::new(cfg, self.timeout);
        loop {
            let nodes: Vec<u64> = self.routing().nodes.keys().copied().collect();
            let Some(node) = nodes
                .get(usize::try_from(retry.attempts).unwrap_or(0) % nodes.len().max(1))
                .copied()
            else {
                return Err(Error::NoEndpoint("the shard map lists no node".into()));
            };
            let budget = retry.attempt_budget(cfg, Duration::ZERO);
            let admin = self.admin_at(node)?;
            retry.attempts += 1;
            let s = match tokio::time::timeout(budget, call(admin, budget)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(s)) => s,
                Err(_) => Status::deadline_exceeded(format!("node {node} did not answer")),
            };
            // An older build does not serve a newer call: another node
            // may (a rolling upgrade), so it counts as "ask another node".
            if !is_retryable(s.code()) && s.code() != tonic::Code::Unimplemented {
                return Err(Error::Rejected(s));
            }
            retry.pause(s, true).await?;
        }
    }
}

impl Client {
    /// Chooses the node that should lead `shard` (`Admin.SetPreferredLeader`);
    /// the shard's leader hands leadership to it within a rebalance round.
    pub async fn set_preferred_leader(&self, shard: u64, node: u64) -> Result<(), Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(pb::SetPreferredLeaderRequest { shard, node }, budget);
            async move { admin.set_preferred_leader(req).await.map(|_| ()) }
        })
        .await
    }
}

impl Client {
    /// The placement loop as a node sees it (`Admin.GetPlacement`): its
    /// settings, the replica moves in flight, the plan, and the load per
    /// node. Any node can answer.
    pub async fn placement(&self) -> Result<pb::GetPlacementResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(pb::GetPlacementRequest {}, budget);
            async move { admin.get_placement(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Pauses or resumes the placement loop, sets how many moves it runs
    /// at once, or the size past which shards are split
    /// (`Admin.SetPlacement`); a field left `None` keeps its setting.
    pub async fn set_placement(&self, change: pb::SetPlacementRequest) -> Result<pb::SetPlacementResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(change, budget);
            async move { admin.set_placement(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }
}
