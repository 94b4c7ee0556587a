//! The `pigeonhole` server binary. It only turns flags (or PIGEONHOLE_*
//! environment variables) into a [`ServerConfig`] and calls
//! [`pigeonhole_cluster::server::run`]. With no flags it runs a single node
//! on 127.0.0.1:7070 with its data in ./pigeonhole-data.

use clap::Parser;
use pigeonhole_cluster::api::ApiLimits;
use pigeonhole_cluster::server::{run, shutdown_signal, ServerConfig};
use pigeonhole_cluster::InitialCluster;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// A Pigeonhole node: the replicated mailbox store.
#[derive(Debug, Parser)]
#[command(name = "pigeonhole", version)]
struct Flags {
    /// This node's id (a key of --initial-cluster).
    #[arg(long, env = "PIGEONHOLE_NODE_ID", default_value_t = 1)]
    node_id: u64,
    /// Where the node keeps its data.
    #[arg(long, env = "PIGEONHOLE_DATA_DIR", default_value = "./pigeonhole-data")]
    data_dir: PathBuf,
    /// The address to listen on (clients and peers alike).
    #[arg(long, env = "PIGEONHOLE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The address peers and clients reach this node at (default: --listen).
    #[arg(long, env = "PIGEONHOLE_ADVERTISE")]
    advertise: Option<String>,
    /// The static initial cluster, id=host:port,... (default: this node alone).
    #[arg(long, env = "PIGEONHOLE_INITIAL_CLUSTER")]
    initial_cluster: Option<String>,
    /// Data shards, fixed when the cluster is first started (1 to 65,536).
    #[arg(long, env = "PIGEONHOLE_SHARDS", default_value_t = 64)]
    shards: u64,
    /// Replicas per shard: 1, 3 or 5 (default: 3, or 1 for fewer than 3 nodes).
    #[arg(long, env = "PIGEONHOLE_REPLICATION_FACTOR")]
    replication_factor: Option<usize>,
}

fn config(f: Flags) -> Result<ServerConfig, String> {
    let advertise = f.advertise.unwrap_or_else(|| f.listen.to_string());
    let initial_cluster = match f.initial_cluster {
        Some(s) => InitialCluster::parse(&s).map_err(|e| e.to_string())?,
        None => InitialCluster::single(&advertise),
    };
    let nodes = initial_cluster.nodes.len();
    let replication_factor = f.replication_factor.unwrap_or(if nodes >= 3 { 3 } else { 1 });
    let mut cfg = ServerConfig::single_node_default();
    cfg.node_id = f.node_id;
    cfg.data_dir = f.data_dir;
    cfg.listen = f.listen;
    cfg.initial_cluster = initial_cluster;
    cfg.shard_count = f.shards;
    cfg.replication_factor = replication_factor;
    cfg.api = ApiLimits::default();
    Ok(cfg)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = match config(Flags::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pigeonhole: {e}");
            return ExitCode::from(2);
        }
    };
    match run(cfg, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pigeonhole: {e}");
            ExitCode::FAILURE
        }
    }
}
