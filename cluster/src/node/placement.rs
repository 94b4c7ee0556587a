//! The placement loop's handle on a node: what `Admin.GetPlacement` and
//! `Admin.SetPlacement` call. The loop itself runs in the driver
//! (`driver::place`); its settings live in the metadata group.

use super::Node;
use crate::driver::{Inbound, PlacementView};
use crate::error::ClusterError;
use crate::moves::{decode_config, Config, MOVES_MAX_LIMIT, PLACEMENT_CONFIG_KEY};
use crate::placement::META_SHARD;
use pigeonhole_engine::command as cmd;
use pigeonhole_proto::internal::v1::PlacementConfig;
use prost::Message as _;
use tokio::sync::oneshot;

impl Node {
    /// The placement loop as this node's metadata replica has it, after a
    /// read barrier there (so a move asked for before the call shows).
    pub async fn placement(&self) -> Result<PlacementView, ClusterError> {
        self.read_barrier(META_SHARD).await?;
        let (reply, rx) = oneshot::channel();
        self.send(Inbound::Placement { reply })?;
        rx.await.map_err(|_| ClusterError::Stopped)?
    }

    /// Pauses or resumes the placement loop, or sets its moves in flight
    /// at most (1 to [`MOVES_MAX_LIMIT`]); `None` keeps a setting. A write
    /// over the version read (a concurrent change is BUSY, retry).
    pub async fn set_placement(&self, paused: Option<bool>, moves_max: Option<u32>) -> Result<Config, ClusterError> {
        if let Some(m) = moves_max {
            if !(1..=MOVES_MAX_LIMIT).contains(&m) {
                return Err(ClusterError::InvalidArgument {
                    field: "moves_max",
                    reason: format!("{m} is outside 1 to {MOVES_MAX_LIMIT}"),
                });
            }
        }
        self.read_barrier(META_SHARD).await?;
        let stored = self
            .meta_scan(PLACEMENT_CONFIG_KEY, 1)?
            .into_iter()
            .find(|v| v.key == PLACEMENT_CONFIG_KEY);
        let now = decode_config(stored.as_ref());
        let next = Config {
            paused: paused.unwrap_or(now.paused),
            moves_max: moves_max.unwrap_or(now.moves_max),
            version: now.version.saturating_add(1),
        };
        let op = cmd::Op {
            op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                key: PLACEMENT_CONFIG_KEY.to_vec(),
                value: PlacementConfig {
                    paused: next.paused,
                    moves_max: next.moves_max,
                }
                .encode_to_vec(),
                version: next.version,
                if_version: Some(now.version),
            })),
        };
        self.propose_meta_cas(op, "the placement settings").await?;
        Ok(next)
    }
}
