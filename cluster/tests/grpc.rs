//! The production transport end to end: three nodes in this process, but
//! talking gRPC over loopback sockets, including a snapshot stream and a
//! peer that goes away and comes back (reconnect with backoff).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{append, append_retrying, fast_tuning, read_all};
use pigeonhole_cluster::transport::grpc::{GrpcTransport, RaftService};
use pigeonhole_cluster::{InitialCluster, Node, NodeConfig, Role};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

struct GrpcNode {
    node: Node,
    server: JoinHandle<()>,
}

async fn start(cfg: NodeConfig, listener: TcpListener) -> GrpcNode {
    let peers = cfg.initial_cluster.peers_of(cfg.node_id);
    let transport = GrpcTransport::new(
        cfg.effective_cluster_id(),
        peers,
        tokio::runtime::Handle::current(),
        None,
    );
    let node = Node::start(cfg, std::sync::Arc::new(transport)).unwrap();
    let svc = RaftService::new(node.cluster_id(), node.inbox()).into_server();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    GrpcNode { node, server }
}

async fn leader(nodes: &BTreeMap<u64, GrpcNode>, shard: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (id, n) in nodes {
            let st = n.node.status().await.unwrap();
            if st.iter().any(|s| s.shard == shard && s.role == Role::Leader) {
                return *id;
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_grpc_replicate_reconnect_and_snapshot() {
    let mut listeners = BTreeMap::new();
    for id in 1..=3u64 {
        listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let ic = InitialCluster {
        nodes: listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
            .collect(),
    };
    let dirs: BTreeMap<u64, tempfile::TempDir> = (1..=3).map(|id| (id, tempfile::tempdir().unwrap())).collect();
    let mut tuning = fast_tuning();
    tuning.log_entries_max = 30;
    tuning.log_retain_entries = 3;
    let cfg = |id: u64| {
        let mut c = NodeConfig::new(id, dirs[&id].path(), ic.clone());
        c.shard_count = 2;
        c.raft = tuning.clone();
        c
    };
    let mut nodes = BTreeMap::new();
    for (id, l) in listeners {
        nodes.insert(id, start(cfg(id), l).await);
    }
    let shard = 1;
    let l = leader(&nodes, shard).await;
    let follower = (1..=3).find(|n| *n != l).unwrap();
    // Through a follower: forwarded over gRPC to the leader.
    let (seq, _) = append(&nodes[&follower].node, shard, "zed", "k0", b"v").await.unwrap();
    assert_eq!(seq, 1);

    // Take the follower down (server and driver), write past compaction,
    // bring it back on the same address: peers reconnect and it catches up
    // by a snapshot streamed over gRPC.
    let addr = ic.nodes[&follower].clone();
    let GrpcNode { node, server } = nodes.remove(&follower).unwrap();
    server.abort();
    node.stop().unwrap();
    drop(node); // the last handle on its engine: frees the RocksDB lock
    let _ = server.await;
    for i in 1..100 {
        append_retrying(&nodes[&l].node, shard, "zed", &format!("k{i}"), &[1u8; 200], 10).await;
    }
    let listener = loop {
        // The old socket may linger for a moment after the abort.
        match TcpListener::bind(&addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    nodes.insert(follower, start(cfg(follower), listener).await);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = nodes[&follower].node.status().await.unwrap();
        if st.iter().any(|s| s.shard == shard && s.applied >= 100 && s.leader != 0) {
            break;
        }
        assert!(Instant::now() < deadline, "follower did not catch up: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodes[&follower].node.read_barrier(shard).await.unwrap();
    let got = read_all(&nodes[&follower].node, shard, "zed");
    assert_eq!(got.len(), 100);
    for n in nodes.values() {
        n.node.stop().unwrap();
        n.server.abort();
    }
}

#[tokio::test]
async fn frames_from_another_cluster_are_refused() {
    use pigeonhole_proto::internal::v1::raft_transport_client::RaftTransportClient;
    use pigeonhole_proto::internal::v1::RaftFrame;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::new(1, dir.path(), InitialCluster::single(&addr));
    cfg.shard_count = 1;
    cfg.replication_factor = 1;
    cfg.raft = fast_tuning();
    let n = start(cfg, listener).await;
    let mut client = RaftTransportClient::connect(format!("http://{addr}")).await.unwrap();
    let frame = RaftFrame {
        cluster_id: n.node.cluster_id() ^ 1,
        from_node: 2,
        to_node: 1,
        messages: vec![],
    };
    let err = client.send(tokio_stream::iter(vec![frame])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("cluster_id"), "{}", err.message());
    n.node.stop().unwrap();
}
