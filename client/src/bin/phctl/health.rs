//! One node's own state, asked of that node: `phctl node health` (its
//! grpc.health.v1 status as an exit code, for container HEALTHCHECKs and
//! load balancers, deploy/Dockerfile; the first `--endpoints` entry only:
//! whether THIS node serves, not the cluster, which is `phctl cluster
//! status`) and `phctl node log-level` (its log filter).

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
