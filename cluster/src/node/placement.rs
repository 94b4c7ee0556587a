//! The placement loop's handle on a node: what `Admin.GetPlacement` and
//! `Admin.SetPlacement` call. The loop itself runs in the driver
//! (`driver::place`); its settings live in the metadata group.

use super::Node;
use crate::driver::{Inbound, PlacementView};
use crate::error::ClusterError;
use crate::moves::{decode_config, Config, MOVES_MAX_LIMIT, PLACEMENT_CONFIG_KEY, SPLIT_SIZE_BYTES_MIN};
use crate::placement::META_SHARD;
use pigeonhole_engine::command as cmd;
use pigeonhole_proto::internal::v1::PlacementConfig;
use prost::Message as _;
use tokio::sync::oneshot;

/// A change of the placement loop's settings (`None`: keep).
#[derive(Debug, Clone, Copy, Default)]
pub struct PlacementChange {
    pub paused: Option<bool>,
    pub moves_max: Option<u32>,
    pub split_size_bytes: Option<u64>,
}

impl Node {
    /// The placement loop as this node's metadata replica has it, after a
    /// read barrier there (so a move asked for before the call shows).
    pub async fn placement(&self) -> Result<PlacementView, ClusterError> {
        self.read_barrier(META_SHARD).await?;
        let (reply, rx) = oneshot::channel();
        self.send(Inbound::Placement { reply })?;
        rx.await.map_err(|_| ClusterError::Stopped)?
    }

    /// Pauses or resumes the placement loop, sets its moves in flight at
    /// most (1 to [`MOVES_MAX_LIMIT`]), or the size past which shards are
    /// split (at least [`SPLIT_SIZE_BYTES_MIN`], [`crate::moves::SPLIT_NEVER`]:
    /// never); `None` keeps a setting. A write over the version read (a
    /// concurrent change is BUSY, retry).
    pub async fn set_placement(&self, change: PlacementChange) -> Result<Config, ClusterError> {
        let PlacementChange {
            paused,
            moves_max,
            split_size_bytes,
        } = change;
        if let Some(m) = moves_max {
            if !(1..=MOVES_MAX_LIMIT).contains(&m) {
                return Err(ClusterError::InvalidArgument {
                    field: "moves_max",
                    reason: format!("{m} is outside 1 to {MOVES_MAX_LIMIT}"),
                });
            }
        }
        if let Some(b) = split_size_bytes {
            if b < SPLIT_SIZE_BYTES_MIN {
                return Err(ClusterError::InvalidArgument {
                    field: "split_size_bytes",
                    reason: format!("{b} is below the minimum, {SPLIT_SIZE_BYTES_MIN} (1 MiB)"),
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
            split_size_bytes: split_size_bytes.unwrap_or(now.split_size_bytes),
            version: now.version.saturating_add(1),
        };
        let op = cmd::Op {
            op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                key: PLACEMENT_CONFIG_KEY.to_vec(),
                value: PlacementConfig {
                    paused: next.paused,
                    moves_max: next.moves_max,
                    split_size_bytes: next.split_size_bytes,
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
