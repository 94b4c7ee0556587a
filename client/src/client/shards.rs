//! Admin calls about one node or one shard: a node's status and replica
//! sizes, leader transfer and membership changes, the last two sent to the
//! shard's leader whatever node the map names. Separate from `client.rs`
//! because they are an operator's surface (phctl, the rebalancer's tests),
//! not the routing tier's hot path.

use super::{with_timeout, Client, Conn, Retry, Route};
use crate::error::{is_retryable, status_detail, Error};
use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::admin_client::AdminClient;
use std::future::Future;
use std::time::Duration;
use tonic::{Code, Status};

impl Client {
    /// `Admin.NodeStatus` of one node (one attempt, the attempt timeout);
    /// `include_sizes` adds each replica's state-machine size.
    pub async fn node_status(&self, node: u64, include_sizes: bool) -> Result<pb::NodeStatusResponse, Error> {
        self.node_status_request(
            node,
            pb::NodeStatusRequest {
                include_sizes,
                size_shards: Vec::new(),
            },
        )
        .await
    }

    /// `Admin.NodeStatus` of one node with the state-machine sizes of
    /// `shards`' replicas only (one bounded scan each).
    pub async fn replica_sizes(&self, node: u64, shards: &[u64]) -> Result<pb::NodeStatusResponse, Error> {
        self.node_status_request(
            node,
            pb::NodeStatusRequest {
                include_sizes: true,
                size_shards: shards.to_vec(),
            },
        )
        .await
    }

    async fn node_status_request(
        &self,
        node: u64,
        req: pb::NodeStatusRequest,
    ) -> Result<pb::NodeStatusResponse, Error> {
        if self.node_addr(node).is_none() {
            // A node that joined after this client read the map (or a map
            // read from a metadata replica that had not applied the join).
            self.refresh().await?;
        }
        let mut admin = self.admin_at(node)?;
        let t = self.inner.config.attempt_timeout;
        let req = with_timeout(req, t);
        match tokio::time::timeout(t, admin.node_status(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) if is_retryable(s.code()) => Err(Error::Exhausted {
                attempts: 1,
                elapsed_ms: 0,
                last: s,
            }),
            Ok(Err(s)) => Err(Error::Rejected(s)),
            Err(_) => Err(Error::Exhausted {
                attempts: 1,
                elapsed_ms: u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
                last: Status::deadline_exceeded(format!("node {node} did not answer")),
            }),
        }
    }

    /// Asks `shard`'s leader to hand leadership to `to`. Finds the leader
    /// (following NOT_LEADER hints) within the call's deadline; returns once
    /// the transfer has started.
    pub async fn transfer_leader(&self, shard: u64, to: u64) -> Result<(), Error> {
        self.call_leader(shard, |mut admin, budget| async move {
            let req = with_timeout(pb::TransferLeaderRequest { shard, to_node: to }, budget);
            admin.transfer_leader(req).await.map(|_| ())
        })
        .await
    }

    /// Changes `shard`'s replicas (the conf-change primitive; several
    /// changes go through a joint configuration). Finds the leader
    /// (following NOT_LEADER hints) and retries while an earlier change is
    /// still being applied, within the call's deadline; returns the
    /// configuration once the change is applied on the leader.
    pub async fn change_membership(
        &self,
        shard: u64,
        changes: &[pb::MembershipChange],
    ) -> Result<pb::ChangeMembershipResponse, Error> {
        self.call_leader(shard, |mut admin, budget| {
            let req = with_timeout(
                pb::ChangeMembershipRequest {
                    shard,
                    changes: changes.to_vec(),
                },
                budget,
            );
            async move { admin.change_membership(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Runs an admin call that only `shard`'s leader can answer: on a node
    /// picked from the route, following NOT_LEADER hints (FAILED_PRECONDITION
    /// with a `leader_hint`) and retrying retryable statuses within the
    /// client's deadline.
    async fn call_leader<T, F, Fut>(&self, shard: u64, mut call: F) -> Result<T, Error>
    where
        F: FnMut(AdminClient<Conn>, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let cfg = &self.inner.config;
        let mut retry = Retry::new(cfg, self.timeout);
        loop {
            let route = self.shard_of(Route::Shard(shard))?;
            let node = self.pick(&route, retry.attempts)?;
            let budget = retry.attempt_budget(cfg, Duration::ZERO);
            let admin = self.admin_at(node)?;
            retry.attempts += 1;
            let s = match tokio::time::timeout(budget, call(admin, budget)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(s)) => s,
                Err(_) => Status::deadline_exceeded(format!("node {node} did not answer")),
            };
            let not_leader = s.code() == Code::FailedPrecondition && status_detail(&s, "leader_hint").is_some();
            if !is_retryable(s.code()) && !not_leader {
                return Err(Error::Rejected(s));
            }
            let hinted = self.learn(shard, node, &s);
            if !hinted {
                self.maybe_refresh().await;
            }
            retry.pause(s, !hinted).await?;
        }
    }
}
