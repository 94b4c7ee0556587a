//! What the client learns about the cluster: the shard map (re-read from
//! any node that answers), suspect nodes, and leaders (from failed attempts'
//! hints and from the hints on writes' OK answers). Separate from
//! `client.rs`, which sends calls and retries them, because this is the
//! advisory routing state those calls consult.

use super::{lock, normalize, Client, Route, NODE_SUSPECT_MS};
use crate::error::{status_detail, Error};
use crate::routing::{Routing, ShardRoute};
use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::admin_client::AdminClient;
use rand::Rng;
use std::time::{Duration, Instant};
use tonic::{Request, Status};

impl Client {
    /// Re-reads the shard map from any node that answers (known nodes
    /// first, then the seed endpoints).
    pub async fn refresh(&self) -> Result<(), Error> {
        *lock(&self.inner.last_refresh) = Some(Instant::now());
        let mut candidates: Vec<String> = lock(&self.inner.routing).nodes.values().cloned().collect();
        for e in &self.inner.config.endpoints {
            let e = normalize(e);
            if !candidates.contains(&e) {
                candidates.push(e);
            }
        }
        // Start at a random candidate, so many clients do not all ask one node.
        let n = candidates.len();
        let start = rand::thread_rng().gen_range(0..n.max(1));
        candidates.rotate_left(start.min(n));
        let mut last = String::from("no candidates");
        for addr in candidates {
            let mut admin = AdminClient::with_interceptor(self.channel(&addr)?, self.credentials());
            let mut req = Request::new(pb::GetShardMapRequest {});
            req.set_timeout(self.inner.config.attempt_timeout);
            let answer = tokio::time::timeout(self.inner.config.attempt_timeout, admin.get_shard_map(req)).await;
            match answer {
                Ok(Ok(m)) => match Routing::from_map(m.get_ref()) {
                    Ok(r) => {
                        *lock(&self.inner.routing) = r;
                        return Ok(());
                    }
                    Err(e) => last = format!("{addr}: {e}"),
                },
                Ok(Err(s)) => last = format!("{addr}: {} ({:?})", s.message(), s.code()),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
        Err(Error::NoEndpoint(last))
    }

    /// Refreshes the map unless that was done very recently.
    pub(crate) async fn maybe_refresh(&self) {
        let due =
            lock(&self.inner.last_refresh).is_none_or(|t| t.elapsed() >= self.inner.config.map_refresh_interval_min);
        if due {
            let _ = self.refresh().await;
        }
    }

    fn suspects(&self) -> Vec<u64> {
        let now = Instant::now();
        let mut s = lock(&self.inner.suspects);
        s.retain(|_, until| *until > now);
        s.keys().copied().collect()
    }

    /// The shard a route names.
    pub(crate) fn shard_of(&self, route: Route<'_>) -> Result<ShardRoute, Error> {
        let r = lock(&self.inner.routing);
        let s = match route {
            Route::User(u) => r.shard_for(u),
            Route::Shard(id) => r.shard(id),
        };
        s.cloned()
            .ok_or_else(|| Error::NoEndpoint(format!("no shard in the map for {route:?}")))
    }

    /// The node for attempt `attempt` on `shard`.
    pub(crate) fn pick(&self, shard: &ShardRoute, attempt: u32) -> Result<u64, Error> {
        let suspects = self.suspects();
        lock(&self.inner.routing)
            .pick(shard, attempt, &suspects)
            .ok_or_else(|| Error::NoEndpoint(format!("shard {} has no reachable replica", shard.id)))
    }

    /// Learns from a failed attempt on `node` for `shard`: a leader hint
    /// moves the shard's leader; a failure with no server details (the
    /// connection itself failed) marks the node suspect; a leader that could
    /// not commit in time loses its hint so the next attempt rotates.
    /// Returns true when a fresh leader hint makes an immediate retry worth
    /// it.
    pub(crate) fn learn(&self, shard: u64, node: u64, s: &Status) -> bool {
        if let Some(h) = status_detail(s, "leader_hint").filter(|h| *h != 0 && *h != node) {
            lock(&self.inner.routing).set_leader(shard, h);
            return true;
        }
        let from_server = tonic_types::StatusExt::get_error_details(s).error_info().is_some();
        if !from_server {
            lock(&self.inner.suspects).insert(node, Instant::now() + Duration::from_millis(NODE_SUSPECT_MS));
        }
        let mut r = lock(&self.inner.routing);
        if r.shard(shard).is_some_and(|x| x.leader == node) {
            r.set_leader(shard, 0);
        }
        false
    }

    /// Learns from a write's OK answer the leaders of shards the answering
    /// node does not lead (it forwarded the write; header
    /// [`pigeonhole_proto::hints::LEADERS_HEADER`]), so the next write goes
    /// to the leader. A hint naming a node the map does not have as a
    /// replica of that shard means the map is old: it is refreshed in the
    /// background (at most every `map_refresh_interval_min`). No request
    /// is retried on a hint: the write it came with is done.
    fn learn_leaders(&self, md: &tonic::metadata::MetadataMap) {
        let Some(v) = md
            .get(pigeonhole_proto::hints::LEADERS_HEADER)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        let hints = pigeonhole_proto::hints::parse(v);
        let stale = lock(&self.inner.routing).apply_leader_hints(&hints);
        if let (true, Ok(rt)) = (stale, tokio::runtime::Handle::try_current()) {
            let c = self.clone();
            rt.spawn(async move { c.maybe_refresh().await });
        }
    }

    /// A write's answer, its leader hints learned ([`Client::learn_leaders`]).
    pub(crate) fn write_answer<T>(&self, answer: tonic::Response<T>) -> T {
        self.learn_leaders(answer.metadata());
        answer.into_inner()
    }
}
