//! TLS end to end: three real `pigeonhole` processes serving TLS only and
//! replicating over mTLS, the SDK and `phctl` with and without the right
//! files, the Raft transport refusing every certificate but a member
//! node's, and the refusal to serve plaintext on a non-loopback address.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{free_port, server_bin, Procs};
use pigeonhole_client::{mailbox, Client, ClientConfig, SyncOptions};
use pigeonhole_proto::internal::v1::raft_transport_client::RaftTransportClient;
use pigeonhole_proto::internal::v1::RaftFrame;
use pigeonhole_tls::dev::{DevCa, Leaf};
use pigeonhole_tls::TlsFiles;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn client_config(endpoints: &[String], tls: Option<TlsFiles>) -> ClientConfig {
    let mut cfg = ClientConfig::new(endpoints.to_vec());
    cfg.request_timeout = Duration::from_secs(5);
    cfg.tls = tls;
    cfg
}

/// One frame from `from` on the Raft transport of `addr`, over `tls`; the
/// status the node answers with.
async fn raft_frame(addr: &str, tls: &TlsFiles, from: u64) -> tonic::Status {
    let ch = pigeonhole_tls::client::endpoint(addr, Some(tls))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let frame = RaftFrame {
        cluster_id: 0,
        from_node: from,
        to_node: 0,
        messages: Vec::new(),
    };
    let r = RaftTransportClient::new(ch).send(tokio_stream::iter(vec![frame])).await;
    r.expect_err("a frame from outside the cluster was taken")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_replicates_over_mtls_and_lets_in_only_what_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let ca = DevCa::new("pigeonhole test CA").unwrap();
    let node = ca
        .write(&certs, "node", &Leaf::node(["127.0.0.1", "localhost"]))
        .unwrap();
    // The CA holder's superuser writes; "router" has no grants (auth is on
    // with TLS: e2e_auth.rs tests roles).
    let root = ca.write(&certs, "root", &Leaf::client("root")).unwrap();
    let router = ca.write(&certs, "router", &Leaf::client("router")).unwrap();
    let stranger = ca.write(&certs, "stranger", &Leaf::node(["10.9.9.9"])).unwrap();

    let (_procs, endpoints) = common::start_tls_cluster(dir.path(), &node, 3);

    // Appends need a quorum of replicas, so they prove the nodes replicate
    // to each other over mTLS.
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match Client::connect(client_config(&endpoints, Some(root.clone()))).await {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "TLS cluster never came up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let users: Vec<String> = (0..8).map(|u| format!("user-{u}")).collect();
    for round in 0..5 {
        for u in &users {
            let mb = mailbox("chat", u.as_bytes());
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match client
                    .append(&mb, format!("m{round}").into_bytes(), format!("{u}-{round}"))
                    .await
                {
                    Ok(r) => {
                        assert_eq!(r.seq, round + 1);
                        break;
                    }
                    Err(e) => assert!(Instant::now() < deadline, "append over TLS: {e}"),
                }
            }
        }
    }
    // A client with the CA only and a bearer token reads them.
    client.put_identity("reader").await.unwrap();
    client
        .grant("reader", "chat", pigeonhole_client::pb::Role::Read)
        .await
        .unwrap();
    let mut with_token = client_config(&endpoints, Some(TlsFiles::ca_only(&node.ca)));
    with_token.token = Some(client.create_token("reader", 60, "e2e_tls").await.unwrap().token);
    // A new token is honoured by every node within a second of its answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ca_only = loop {
        match Client::connect(with_token.clone()).await {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "the new token was never honoured: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for u in &users {
        // Every node honours the token within a second of its answer, not
        // at once: the node a read goes to may not have it yet.
        let deadline = Instant::now() + Duration::from_secs(5);
        let r = loop {
            match ca_only
                .sync(&mailbox("chat", u.as_bytes()), 0, SyncOptions::default())
                .await
            {
                Ok(r) => break r,
                Err(e) => assert!(Instant::now() < deadline, "{u}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(r.messages.len(), 5, "{u}");
    }

    // Plaintext against the TLS ports, and TLS trusting another CA, get
    // nowhere.
    let mut plain = client_config(&endpoints, None);
    plain.request_timeout = Duration::from_secs(2);
    assert!(Client::connect(plain).await.is_err(), "a plaintext client was served");
    let other = DevCa::new("other CA").unwrap();
    let other_ca = dir.path().join("other-ca.crt");
    other.write_ca(&other_ca).unwrap();
    let mut wrong = client_config(&endpoints, Some(TlsFiles::ca_only(&other_ca)));
    wrong.request_timeout = Duration::from_secs(2);
    assert!(
        Client::connect(wrong).await.is_err(),
        "a client trusting another CA was served"
    );

    // phctl: with the CA, status is whole; without, it cannot reach a node.
    let status = Command::new(env!("CARGO_BIN_EXE_phctl"))
        .env("PIGEONHOLE_ENDPOINTS", endpoints.join(","))
        .arg("--tls-ca")
        .arg(&node.ca)
        .arg("--tls-cert")
        .arg(root.cert.as_ref().unwrap())
        .arg("--tls-key")
        .arg(root.key.as_ref().unwrap())
        .args(["cluster", "status"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status = Command::new(env!("CARGO_BIN_EXE_phctl"))
        .env("PIGEONHOLE_ENDPOINTS", endpoints.join(","))
        .args(["--timeout-ms", "2000", "cluster", "status"])
        .output()
        .unwrap();
    assert_eq!(
        status.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // The Raft transport: no certificate, a client's, and a node's that
    // names no member's host are each refused; nothing reaches the inbox.
    let s = raft_frame(&endpoints[1], &TlsFiles::ca_only(&node.ca), 1).await;
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    let s = raft_frame(&endpoints[1], &router, 1).await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("for nodes"), "{s:?}");
    let s = raft_frame(&endpoints[1], &stranger, 1).await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("does not name 127.0.0.1"), "{s:?}");
    let s = raft_frame(&endpoints[1], &node, 77).await;
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("node 77 is not a member"), "{s:?}");

    // And the cluster still serves.
    let r = client
        .append(&mailbox("chat", b"user-0"), b"after".to_vec(), "after")
        .await
        .unwrap();
    assert_eq!(r.seq, 6);
}

#[test]
fn plaintext_on_a_non_loopback_address_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut refused = Command::new(server_bin())
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .args(["--advertise", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path().join("a"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It must exit by itself, at once; one that serves is killed and fails
    // the test.
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = refused.kill();
            let _ = refused.wait();
            panic!("the node served plaintext on 0.0.0.0 without --insecure");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = refused.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve plaintext") && err.contains("--insecure"),
        "{err}"
    );

    // With --insecure it serves, and says what that means.
    let mut child = Procs(vec![Command::new(server_bin())
        .args(["--listen", &format!("0.0.0.0:{port}"), "--insecure"])
        .args(["--advertise", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path().join("b"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the --insecure node never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = child.0.pop().unwrap();
    let mut c = Procs(vec![c]);
    let _ = c.0[0].kill();
    let out = c.0.pop().unwrap().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WARN") && err.contains("--insecure: serving plaintext"),
        "{err}"
    );
}

#[test]
fn scripts_dev_certs_makes_a_set_a_node_and_phctl_use() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev-certs");
    let made = Command::new("bash")
        .arg(&script)
        .arg(&certs)
        .args(["--clients", "root"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _node = Procs(vec![Command::new(server_bin())
        .args(["--listen", &addr, "--shards", "2"])
        .arg("--data-dir")
        .arg(dir.path().join("n1"))
        .arg("--tls-ca")
        .arg(certs.join("ca.crt"))
        .arg("--tls-cert")
        .arg(certs.join("node.crt"))
        .arg("--tls-key")
        .arg(certs.join("node.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_phctl"))
            .args(["--endpoints", &addr, "--timeout-ms", "2000"])
            .arg("--tls-ca")
            .arg(certs.join("ca.crt"))
            .arg("--tls-cert")
            .arg(certs.join("root.crt"))
            .arg("--tls-key")
            .arg(certs.join("root.key"))
            .args(["cluster", "status"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "phctl over TLS with the script's certificates: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // A certificate without its key is a usage error, named.
    let out = Command::new(env!("CARGO_BIN_EXE_phctl"))
        .args(["--endpoints", &addr])
        .arg("--tls-ca")
        .arg(certs.join("ca.crt"))
        .arg("--tls-cert")
        .arg(certs.join("root.crt"))
        .args(["cluster", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}
