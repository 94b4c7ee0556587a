//! Helpers for the tests that drive the real `pigeonhole` binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pigeonhole_proto::v1 as pb;
use pigeonhole_proto::v1::mailbox_client::MailboxClient;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Drop for Server {
    /// A failing test must not leave a server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod ports;
pub use ports::free_port;

pub fn start(dir: &std::path::Path, port: u16) -> Server {
    start_with(dir, port, &[])
}

/// [`start`] with more command-line arguments.
pub fn start_with(dir: &std::path::Path, port: u16, extra: &[&str]) -> Server {
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_pigeonhole"))
        .args(["--data-dir", dir.to_str().unwrap(), "--listen", &addr, "--shards", "4"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Server { child, addr }
}

pub async fn client(s: &Server) -> MailboxClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = MailboxClient::connect(format!("http://{}", s.addr)).await {
            return c;
        }
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn mb(user: &str) -> Option<pb::MailboxId> {
    Some(pb::MailboxId {
        namespace: "chat".into(),
        user_id: user.as_bytes().to_vec(),
    })
}

pub fn append(user: &str, key: &str, payload: &[u8]) -> pb::AppendRequest {
    pb::AppendRequest {
        mailbox: mb(user),
        payload: payload.to_vec().into(),
        idempotency_key: key.as_bytes().to_vec(),
        expected_last_seq: None,
    }
}
