//! One node's own state, asked of that node: `phctl node health` (its
//! grpc.health.v1 status as an exit code, for container HEALTHCHECKs and
//! load balancers, deploy/Dockerfile; the first `--endpoints` entry only:
//! whether THIS node serves, not the cluster, which is `phctl cluster
//! status`), `phctl node log-level` (its log filter) and `phctl node
//! repair` (its replicas catching up after storage damage, D49).

use crate::commands::{failed, Ctx, Failure};
use crate::{render, Output};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The service whose status says the node serves (docs/operations.md,
/// Health checks).
const SERVICE: &str = "pigeonhole.v1.Mailbox";

pub async fn check(ctx: &Ctx) -> Result<u8, Failure> {
    let addr = ctx
        .endpoints
        .first()
        .ok_or_else(|| failed("no endpoint given".to_string()))?;
    let channel = pigeonhole_tls::client::endpoint(addr, ctx.tls.as_ref())
        .map_err(failed)?
        .connect_timeout(ctx.timeout)
        .timeout(ctx.timeout)
        .connect()
        .await
        .map_err(|e| failed(format!("{addr}: {e}")))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: SERVICE.to_string(),
        })
        .await
        .map_err(|s| failed(format!("{addr}: {}", s.message())))?
        .into_inner()
        .status();
    let serving = status == ServingStatus::Serving;
    match ctx.output {
        Output::Json => render::json(&json!({"endpoint": addr, "status": status.as_str_name()})),
        Output::Table => out!("{addr}: {}", status.as_str_name()),
    }
    Ok(u8::from(!serving))
}

/// `phctl node log-level ID FILTER`: that node's log filter (`Admin.SetLogLevel`).
pub async fn log_level(ctx: &Ctx, node: u64, filter: &str) -> Result<u8, Failure> {
    let client = crate::commands::connect(ctx).await?;
    let r = client.set_log_level(node, filter).await?;
    match ctx.output {
        Output::Json => render::json(&json!({"node": node, "previous": r.previous, "filter": r.filter})),
        Output::Table => out!("node {node}: log filter {:?} (was {:?})", r.filter, r.previous),
    }
    Ok(0)
}

/// `node repair`: the node's catching-up replicas, or, with
/// `accept_loss`, clear one's mark.
pub async fn repair(ctx: &Ctx, node: u64, accept_loss: Option<u64>) -> Result<u8, Failure> {
    let client = crate::commands::connect(ctx).await?;
    if let Some(shard) = accept_loss {
        let r = client.accept_replica_loss(node, shard).await?;
        match ctx.output {
            Output::Json => render::json(&json!({"node": node, "shard": shard, "was": r.reason})),
            Output::Table => out!(
                "node {node}, shard {shard}: votes again; it was catching up after: {}\n\
                 writes that replica lost may be lost for good if it helps elect a leader without them",
                r.reason
            ),
        }
        return Ok(0);
    }
    let s = client.node_status(node, false).await?;
    let catching: Vec<_> = s.replicas.iter().filter(|r| !r.catching_up.is_empty()).collect();
    match ctx.output {
        Output::Json => render::json(&json!({
            "node": node,
            "catching_up": catching.iter().map(|r| json!({
                "shard": r.shard,
                "reason": r.catching_up,
                "leader": r.leader,
                "commit_index": r.commit_index,
                "last_index": r.last_index,
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            if catching.is_empty() {
                out!("node {node}: no replica is catching up");
            } else {
                let mut t = render::table(&["SHARD", "LEADER", "COMMIT", "LAST", "WHY"]);
                for r in &catching {
                    t.add_row(vec![
                        r.shard.to_string(),
                        if r.leader == 0 {
                            "none".to_string()
                        } else {
                            r.leader.to_string()
                        },
                        r.commit_index.to_string(),
                        r.last_index.to_string(),
                        r.catching_up.clone(),
                    ]);
                }
                out!("{t}");
                out!(
                    "these replicas do not vote until they hold what their shard had committed; a shard \
                     with no leader may have two replicas catching up (--accept-loss SHARD, knowingly)"
                );
            }
        }
    }
    Ok(u8::from(!catching.is_empty()))
}
