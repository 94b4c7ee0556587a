//! Access control end to end, on a real 3-node TLS cluster: every RPC ×
//! {no credentials, wrong namespace, wrong role, right role} with client
//! certificates and with bearer tokens; nothing of one namespace visible
//! through another's identity (reads, Subscribe, errors and their details);
//! a cross-namespace append grant; and revocations enforced on every node
//! within a second.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use pigeonhole_client::{pb, Client, ClientConfig};
use pigeonhole_proto::v1::admin_client::AdminClient;
use pigeonhole_proto::v1::mailbox_client::MailboxClient;
use pigeonhole_tls::dev::{DevCa, Leaf};
use pigeonhole_tls::TlsFiles;
use std::time::{Duration, Instant};
use tonic::{Code, Request, Status};

/// How a test caller presents itself.
#[derive(Clone, Debug)]
struct Creds {
    tls: TlsFiles,
    token: Option<String>,
}

/// What every test call goes through: adds the token, if any.
type Hook = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send + Sync>;
type Intercepted = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Hook>;

async fn channel(addr: &str, c: &Creds) -> (MailboxClient<Intercepted>, AdminClient<Intercepted>) {
    let ch = pigeonhole_tls::client::endpoint(addr, Some(&c.tls))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header = c.token.as_ref().map(|t| {
        format!("Bearer {t}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .unwrap()
    });
    let mk = |h: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>| -> Hook {
        Box::new(move |mut r: Request<()>| {
            if let Some(h) = &h {
                r.metadata_mut().insert("authorization", h.clone());
            }
            Ok(r)
        })
    };
    (
        MailboxClient::with_interceptor(ch.clone(), mk(header.clone())),
        AdminClient::with_interceptor(ch, mk(header)),
    )
}

fn mb(ns: &str, user: &str) -> Option<pb::MailboxId> {
    Some(pb::MailboxId {
        namespace: ns.into(),
        user_id: user.as_bytes().to_vec(),
    })
}

/// The RPCs of the matrix and the role each needs.
const RPCS: [(&str, pb::Role); 10] = [
    ("Append", pb::Role::Append),
    ("AppendBatch", pb::Role::Append),
    ("Sync", pb::Role::Read),
    ("Subscribe", pb::Role::Read),
    ("Ack", pb::Role::Read),
    ("GetCursors", pb::Role::Read),
    ("Trim", pb::Role::Trim),
    ("Delete", pb::Role::Trim),
    ("Admin.GetPlacement", pb::Role::Admin),
    ("Admin.SetMailboxHold", pb::Role::Admin),
];

/// Calls `rpc` on namespace `ns` (user "alice"); the status, or Ok.
async fn call(addr: &str, c: &Creds, rpc: &str, ns: &str) -> Result<(), Status> {
    let (mut m, mut a) = channel(addr, c).await;
    let key = format!("k-{}", rand_suffix());
    match rpc {
        "Append" => m
            .append(pb::AppendRequest {
                mailbox: mb(ns, "alice"),
                payload: b"hello".to_vec().into(),
                idempotency_key: key.into_bytes(),
                expected_last_seq: None,
            })
            .await
            .map(|_| ()),
        "AppendBatch" => {
            let r = m
                .append_batch(pb::AppendBatchRequest {
                    items: vec![pb::AppendRequest {
                        mailbox: mb(ns, "alice"),
                        payload: b"hello".to_vec().into(),
                        idempotency_key: key.into_bytes(),
                        expected_last_seq: None,
                    }],
                })
                .await?
                .into_inner();
            match r.results[0].result.as_ref().unwrap() {
                pb::append_result::Result::Ok(_) => Ok(()),
                pb::append_result::Result::Error(e) => Err(Status::new(Code::from_i32(e.code), e.message.clone())),
            }
        }
        "Sync" => m
            .sync(pb::SyncRequest {
                mailbox: mb(ns, "alice"),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "Subscribe" => m
            .subscribe(pb::SubscribeRequest {
                mailboxes: vec![pb::MailboxCursor {
                    mailbox: mb(ns, "alice"),
                    after_seq: 0,
                }],
                max_in_flight: 0,
            })
            .await
            .map(|_| ()),
        "Ack" => m
            .ack(pb::AckRequest {
                mailbox: mb(ns, "alice"),
                device_id: b"phone".to_vec(),
                seq: 1,
            })
            .await
            .map(|_| ()),
        "GetCursors" => m
            .get_cursors(pb::GetCursorsRequest {
                mailbox: mb(ns, "alice"),
            })
            .await
            .map(|_| ()),
        "Trim" => m
            .trim(pb::TrimRequest {
                mailbox: mb(ns, "alice"),
                up_to_seq: 0,
            })
            .await
            .map(|_| ()),
        "Delete" => m
            .delete(pb::DeleteRequest {
                mailbox: mb(ns, "alice"),
                seq: 1_000_000,
            })
            .await
            .map(|_| ()),
        "Admin.GetPlacement" => a.get_placement(pb::GetPlacementRequest {}).await.map(|_| ()),
        // A legal hold is a compliance officer's act: admin, not `trim`.
        "Admin.SetMailboxHold" => a
            .set_mailbox_hold(pb::SetMailboxHoldRequest {
                mailbox: mb(ns, "alice"),
                held: false,
            })
            .await
            .map(|_| ()),
        other => panic!("no rpc {other}"),
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn role_name(r: pb::Role) -> &'static str {
    match r {
        pb::Role::Append => "append",
        pb::Role::Read => "read",
        pb::Role::Trim => "trim",
        pb::Role::Admin => "admin",
        pb::Role::Unspecified => "?",
    }
}

/// Another role than `r`, on the same namespace.
fn other_role(r: pb::Role) -> pb::Role {
    match r {
        pb::Role::Append => pb::Role::Read,
        _ => pb::Role::Append,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_checks_its_role_on_its_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let ca = DevCa::new("auth test CA").unwrap();
    let node = ca.write(&certs, "node", &Leaf::node(["127.0.0.1"])).unwrap();
    let root = ca.write(&certs, "root", &Leaf::client("root")).unwrap();
    let (_procs, endpoints) = common::start_tls_cluster(dir.path(), &node, 3);
    let mut cfg = ClientConfig::new(endpoints.clone());
    cfg.tls = Some(root.clone());
    cfg.request_timeout = Duration::from_secs(10);
    let deadline = Instant::now() + Duration::from_secs(60);
    let admin = loop {
        match Client::connect(cfg.clone()).await {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "cluster never came up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // One identity per (role, namespace "whatsapp"), each reached by a
    // certificate and by a token.
    let mut by_role = std::collections::BTreeMap::new();
    for (_, role) in RPCS {
        let name = format!("wa-{}", role_name(role));
        if by_role.contains_key(&name) {
            continue;
        }
        admin.put_identity(&name).await.unwrap();
        let ns = if role == pb::Role::Admin { "*" } else { "whatsapp" };
        admin.grant(&name, ns, role).await.unwrap();
        let cert = ca.write(&certs, &name, &Leaf::client(&name)).unwrap();
        let token = admin.create_token(&name, 0, "matrix").await.unwrap().token;
        by_role.insert(name, (cert, token));
    }
    let ca_only = TlsFiles::ca_only(&node.ca);
    let creds = |name: &str, by_token: bool| -> Creds {
        let (cert, token) = &by_role[name];
        if by_token {
            Creds {
                tls: ca_only.clone(),
                token: Some(token.clone()),
            }
        } else {
            Creds {
                tls: cert.clone(),
                token: None,
            }
        }
    };
    // Every node enforces the book it has read: wait until node 1 has it.
    let addr = &endpoints[0];
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(addr, &creds("wa-append", true), "Append", "whatsapp")
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "grants never reached node 1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for by_token in [false, true] {
        for (rpc, role) in RPCS {
            let ns = "whatsapp";
            // No credentials at all.
            let none = Creds {
                tls: ca_only.clone(),
                token: None,
            };
            let s = call(addr, &none, rpc, ns).await.unwrap_err();
            assert_eq!(s.code(), Code::Unauthenticated, "{rpc} without credentials: {s:?}");
            // The right role on the namespace.
            let right = creds(&format!("wa-{}", role_name(role)), by_token);
            match call(addr, &right, rpc, ns).await {
                Ok(()) => {}
                // Past the check, into the mailbox: the seq is not there.
                Err(s) if rpc == "Delete" && s.code() == Code::NotFound => {}
                Err(s) => panic!("{rpc} with role {} (token {by_token}): {s:?}", role_name(role)),
            }
            if role == pb::Role::Admin {
                // Admin is cluster-wide: no namespace to get wrong.
                let s = call(addr, &creds("wa-read", by_token), rpc, ns).await.unwrap_err();
                assert_eq!(s.code(), Code::PermissionDenied, "{rpc} without admin: {s:?}");
                assert!(s.message().contains("admin"), "{s:?}");
                continue;
            }
            // The right role on another namespace.
            let s = call(addr, &right, rpc, "messenger").await.unwrap_err();
            assert_eq!(s.code(), Code::PermissionDenied, "{rpc} on another namespace: {s:?}");
            assert!(
                s.message().contains(role_name(role)) && s.message().contains("\"messenger\""),
                "{rpc}: the error names the role and the namespace: {s:?}"
            );
            // Another role on the namespace.
            let wrong = creds(&format!("wa-{}", role_name(other_role(role))), by_token);
            let s = call(addr, &wrong, rpc, ns).await.unwrap_err();
            assert_eq!(s.code(), Code::PermissionDenied, "{rpc} with the wrong role: {s:?}");
            assert!(s.message().contains(role_name(role)), "{s:?}");
        }
    }

    // Nothing of "whatsapp" is visible through a "messenger" identity.
    admin.put_identity("ms-app").await.unwrap();
    for r in [pb::Role::Append, pb::Role::Read, pb::Role::Trim] {
        admin.grant("ms-app", "messenger", r).await.unwrap();
    }
    let ms_cert = ca.write(&certs, "ms-app", &Leaf::client("ms-app")).unwrap();
    let ms = Creds {
        tls: ms_cert,
        token: None,
    };
    let wa_writer = creds("wa-append", false);
    let (mut m, _) = channel(addr, &wa_writer).await;
    m.append(pb::AppendRequest {
        mailbox: mb("whatsapp", "bob"),
        payload: b"whatsapp-secret-payload".to_vec().into(),
        idempotency_key: b"secret-1".to_vec(),
        expected_last_seq: None,
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(addr, &ms, "Append", "messenger").await.is_err() {
        assert!(Instant::now() < deadline, "ms-app's grants never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut m, _) = channel(addr, &ms).await;
    for s in [
        m.sync(pb::SyncRequest {
            mailbox: mb("whatsapp", "bob"),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .unwrap_err(),
        m.subscribe(pb::SubscribeRequest {
            mailboxes: vec![
                pb::MailboxCursor {
                    mailbox: mb("messenger", "bob"),
                    after_seq: 0,
                },
                pb::MailboxCursor {
                    mailbox: mb("whatsapp", "bob"),
                    after_seq: 0,
                },
            ],
            max_in_flight: 0,
        })
        .await
        .map(|_| ())
        .unwrap_err(),
        m.get_cursors(pb::GetCursorsRequest {
            mailbox: mb("whatsapp", "bob"),
        })
        .await
        .map(|_| ())
        .unwrap_err(),
        // An append with a stale expected_last_seq would name the mailbox's
        // last seq in its error details: refused before that.
        m.append(pb::AppendRequest {
            mailbox: mb("whatsapp", "bob"),
            payload: b"x".to_vec().into(),
            idempotency_key: b"probe".to_vec(),
            expected_last_seq: Some(0),
        })
        .await
        .map(|_| ())
        .unwrap_err(),
    ] {
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
        assert!(s.details().is_empty(), "a refusal carries no details: {s:?}");
        assert!(!s.message().contains("secret") && !s.message().contains("seq"), "{s:?}");
    }

    // A cross-namespace grant: ms-app may append to whatsapp, and only that.
    admin.grant("ms-app", "whatsapp", pb::Role::Append).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while call(addr, &ms, "Append", "whatsapp").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the cross-namespace grant was not enforced within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        call(addr, &ms, "Sync", "whatsapp").await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Revocations reach every node within a second: a token, then a grant.
    let tok = creds("wa-read", true);
    for a in &endpoints {
        let deadline = Instant::now() + Duration::from_secs(10);
        while call(a, &tok, "Sync", "whatsapp").await.is_err() {
            assert!(Instant::now() < deadline, "{a} never accepted the token");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A stream and a long-poll opened with the token before its revocation
    // end with it.
    let (mut m, _) = channel(addr, &tok).await;
    let mut stream = m
        .subscribe(pb::SubscribeRequest {
            mailboxes: vec![pb::MailboxCursor {
                mailbox: mb("whatsapp", "carol"),
                after_seq: 0,
            }],
            max_in_flight: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut m2, _) = channel(addr, &tok).await;
    let poll = tokio::spawn(async move {
        m2.sync(pb::SyncRequest {
            mailbox: mb("whatsapp", "carol"),
            wait_ms: 30_000,
            ..Default::default()
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let token_id = by_role["wa-read"]
        .1
        .trim_start_matches("ph_")
        .split('.')
        .next()
        .unwrap()
        .to_string();
    admin.revoke_token(&token_id).await.unwrap();
    let revoked = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the Subscribe stream outlived its revoked token by a second");
    assert_eq!(ended.unwrap_err().code(), Code::Unauthenticated);
    let polled = tokio::time::timeout(Duration::from_secs(1), poll)
        .await
        .expect("the long-poll outlived its revoked token by a second")
        .unwrap();
    assert_eq!(polled.unwrap_err().code(), Code::Unauthenticated);
    for a in &endpoints {
        loop {
            match call(a, &tok, "Sync", "whatsapp").await {
                Err(s) if s.code() == Code::Unauthenticated => break,
                other => assert!(
                    revoked.elapsed() < Duration::from_secs(1),
                    "{a} still took a revoked token after 1 s: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    admin.revoke("ms-app", "whatsapp", pb::Role::Append).await.unwrap();
    let revoked = Instant::now();
    for a in &endpoints {
        loop {
            match call(a, &ms, "Append", "whatsapp").await {
                Err(s) if s.code() == Code::PermissionDenied => break,
                other => assert!(
                    revoked.elapsed() < Duration::from_secs(1),
                    "{a} still honoured a revoked grant after 1 s: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Managing auth needs admin; and the book's rules come back named.
    let s = call(addr, &ms, "Admin.GetPlacement", "").await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let e = admin.put_identity("root").await.unwrap_err();
    assert_eq!(e.status().unwrap().code(), Code::InvalidArgument, "{e}");
    let e = admin.grant("ms-app", "messenger", pb::Role::Admin).await.unwrap_err();
    assert!(e.to_string().contains("namespace"), "{e}");
    let e = admin.grant("nobody", "messenger", pb::Role::Read).await.unwrap_err();
    assert_eq!(e.status().unwrap().code(), Code::NotFound, "{e}");
    let r = admin.delete_identity("wa-append").await.unwrap();
    assert_eq!(r.tokens_revoked, 1);
}
