//! The TLS layer against real sockets: who is let in, who is refused, and
//! a certificate rotated under a running server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use pigeonhole_tls::dev::{DevCa, Leaf};
use pigeonhole_tls::server::{incoming, ServerTls, RELOAD_CHECK_MS};
use pigeonhole_tls::{client, PeerCert, TlsFiles};
use std::sync::Arc;
use std::time::Duration;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A server with the health service over TLS on a free loopback port.
async fn serve(files: TlsFiles) -> (String, Arc<ServerTls>) {
    let tls = ServerTls::new(files).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let stream = incoming(listener, tls.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(stream)
            .await
    });
    (addr, tls)
}

/// One health check over `tls` (or plaintext), with a short deadline.
async fn check(addr: &str, tls: Option<&TlsFiles>) -> Result<(), String> {
    let ep = client::endpoint(addr, tls)?.connect_timeout(Duration::from_secs(2));
    let ch = tokio::time::timeout(Duration::from_secs(5), ep.connect())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut h = HealthClient::new(ch);
    tokio::time::timeout(
        Duration::from_secs(5),
        h.check(HealthCheckRequest { service: String::new() }),
    )
    .await
    .map_err(|_| "call timed out".to_string())?
    .map(|_| ())
    .map_err(|e| format!("call: {e}"))
}

#[tokio::test]
async fn the_right_ca_gets_in_and_everything_else_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("test CA").unwrap();
    let server_files = ca.write(dir.path(), "server", &Leaf::node(["127.0.0.1"])).unwrap();
    let (addr, tls) = serve(server_files.clone()).await;

    // A client with a certificate of the same CA, and one with none: both
    // in (client certificates are optional at the TLS layer).
    let alice = ca.write(dir.path(), "alice", &Leaf::client("alice")).unwrap();
    check(&addr, Some(&alice)).await.unwrap();
    check(&addr, Some(&TlsFiles::ca_only(&alice.ca))).await.unwrap();
    assert_eq!(tls.handshakes_failed(), 0);

    // A client certificate of another CA is refused by the server.
    let other = DevCa::new("other CA").unwrap();
    let other_dir = dir.path().join("other");
    let mallory = other.write(&other_dir, "mallory", &Leaf::client("alice")).unwrap();
    let foreign = TlsFiles {
        ca: alice.ca.clone(),
        cert: mallory.cert.clone(),
        key: mallory.key.clone(),
    };
    let e = check(&addr, Some(&foreign)).await.unwrap_err();
    assert!(!e.is_empty());

    // An expired client certificate of the right CA is refused.
    let old = ca.write(dir.path(), "old", &Leaf::client("alice").expired()).unwrap();
    check(&addr, Some(&old)).await.unwrap_err();

    // A client that trusts another CA refuses the server.
    check(&addr, Some(&TlsFiles::ca_only(&mallory.ca))).await.unwrap_err();

    // Plaintext against the TLS port gets nowhere.
    check(&addr, None).await.unwrap_err();

    // The server saw the two bad client certificates (the client that
    // refused the server may or may not finish its side first).
    assert!(tls.handshakes_failed() >= 2, "{}", tls.handshakes_failed());
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("test CA").unwrap();
    let server_files = ca
        .write(dir.path(), "server", &Leaf::node(["127.0.0.1"]).expired())
        .unwrap();
    let (addr, _tls) = serve(server_files.clone()).await;
    let e = check(&addr, Some(&TlsFiles::ca_only(&server_files.ca)))
        .await
        .unwrap_err();
    assert!(!e.is_empty());
}

#[tokio::test]
async fn a_server_certificate_for_another_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("test CA").unwrap();
    let server_files = ca
        .write(dir.path(), "server", &Leaf::node(["10.9.9.9", "db.example"]))
        .unwrap();
    let (addr, _tls) = serve(server_files.clone()).await;
    check(&addr, Some(&TlsFiles::ca_only(&server_files.ca)))
        .await
        .unwrap_err();
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = DevCa::new("old CA").unwrap();
    let server_files = old_ca.write(dir.path(), "server", &Leaf::node(["127.0.0.1"])).unwrap();
    let (addr, tls) = serve(server_files.clone()).await;
    let old_trust = dir.path().join("old-ca.crt");
    old_ca.write_ca(&old_trust).unwrap();
    check(&addr, Some(&TlsFiles::ca_only(&old_trust))).await.unwrap();

    // Rotate to a new CA's certificate in place (renamed over the files).
    let new_ca = DevCa::new("new CA").unwrap();
    new_ca.write_ca(&server_files.ca).unwrap();
    let (cert, key) = new_ca.issue(&Leaf::node(["127.0.0.1"])).unwrap();
    pigeonhole_tls::dev::write_atomically(server_files.key.as_deref().unwrap(), key.as_bytes()).unwrap();
    pigeonhole_tls::dev::write_atomically(server_files.cert.as_deref().unwrap(), cert.as_bytes()).unwrap();

    // Within a check interval (and a bit) new connections get the new one.
    let new_trust = TlsFiles::ca_only(&server_files.ca);
    let deadline = std::time::Instant::now() + Duration::from_millis(RELOAD_CHECK_MS * 5);
    loop {
        if check(&addr, Some(&new_trust)).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tls.reloads(), 1);
    check(&addr, Some(&TlsFiles::ca_only(&old_trust))).await.unwrap_err();

    // A broken rewrite keeps the working certificate.
    std::fs::write(server_files.cert.as_deref().unwrap(), b"not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(RELOAD_CHECK_MS + 200)).await;
    check(&addr, Some(&new_trust)).await.unwrap();
    assert_eq!(tls.reloads(), 1);
}

#[test]
fn peer_certificates_name_their_hosts_and_identity() {
    let ca = DevCa::new("test CA").unwrap();
    let (pem, _) = ca.issue(&Leaf::node(["10.0.0.7", "n7.example", "::1"])).unwrap();
    let der = pigeonhole_tls::files::load_certs_pem(pem.as_bytes()).unwrap();
    let p = PeerCert::parse(der[0].as_ref()).unwrap();
    assert!(p.is_node());
    assert!(p.names_host("10.0.0.7"));
    assert!(p.names_host("N7.Example"));
    assert!(p.names_host("[::1]"));
    assert!(!p.names_host("10.0.0.8"));
    assert!(!p.names_host("n8.example"));
    let (pem, _) = ca.issue(&Leaf::client("messenger-router")).unwrap();
    let der = pigeonhole_tls::files::load_certs_pem(pem.as_bytes()).unwrap();
    let p = PeerCert::parse(der[0].as_ref()).unwrap();
    assert!(!p.is_node());
    assert_eq!(p.common_name.as_deref(), Some("messenger-router"));
    assert!(PeerCert::parse(b"junk").is_err());
}

#[test]
fn hosts_of_addresses() {
    use pigeonhole_tls::peer::host_of;
    assert_eq!(host_of("10.0.0.1:7070"), "10.0.0.1");
    assert_eq!(host_of("https://n1.example:7070/"), "n1.example");
    assert_eq!(host_of("[::1]:7070"), "::1");
    assert_eq!(host_of("::1"), "::1");
    assert_eq!(host_of("n1.example"), "n1.example");
}

#[test]
fn flags_must_make_a_whole() {
    assert_eq!(TlsFiles::from_flags(None, None, None).unwrap(), None);
    assert!(TlsFiles::from_flags(None, Some("c".into()), Some("k".into())).is_err());
    assert!(TlsFiles::from_flags(Some("ca".into()), Some("c".into()), None).is_err());
    assert!(TlsFiles::from_flags(Some("ca".into()), None, None).unwrap().is_some());
    let dir = tempfile::tempdir().unwrap();
    let missing = TlsFiles::new(dir.path().join("ca"), dir.path().join("c"), dir.path().join("k"));
    let e = ServerTls::new(missing).unwrap_err().to_string();
    assert!(e.contains(dir.path().to_str().unwrap()), "{e}");
}
