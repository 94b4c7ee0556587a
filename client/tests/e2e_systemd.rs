//! The server as a systemd `Type=notify` service (deploy/systemd): started
//! with a notify socket and a watchdog period, it says READY=1 once it
//! serves, pings WATCHDOG=1 within each period while its driver answers,
//! and says STOPPING=1 on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{free_port, server_bin, Procs};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The next datagram's text, or None after `within`.
fn next(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn the_node_tells_systemd_it_is_ready_alive_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut node = Procs(vec![Command::new(server_bin())
        .args(["--listen", &addr, "--shards", "1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()]);
    let pid = node.0[0].id();
    let ready = next(&sock, Duration::from_secs(30)).expect("no READY=1 within 30 s");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // The port answers by then.
    assert!(std::net::TcpStream::connect(&addr).is_ok());
    // Pings come at least once per period (1 s; every half period when
    // the driver answers at once), here for 3 s.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let m = next(&sock, Duration::from_secs(1)).expect("a watchdog period passed without a ping");
        assert_eq!(m.trim(), "WATCHDOG=1");
        pings += 1;
    }
    assert!(pings >= 3, "{pings} pings in 3 s");
    let term = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let stopping = loop {
        let m = next(&sock, Duration::from_secs(10)).expect("no STOPPING=1 after SIGTERM");
        if m.trim() != "WATCHDOG=1" {
            break m;
        }
        assert!(Instant::now() < deadline);
    };
    assert_eq!(stopping.trim(), "STOPPING=1");
    assert!(node.0[0].wait().unwrap().success());
}
