//! Logs end to end (issue 15, part 2): a real node started with
//! `--log-format json`, level info and a 1 ms slow-request threshold.
//! Every stderr line is one JSON object; raft-rs's records arrive under
//! target `raft`; a slow request is logged inside its `request` span with
//! its method, request id (the caller's `x-request-id` when given),
//! namespace and shard; and `phctl node log-level` changes the filter
//! while the node runs (after `error`, slow requests log nothing).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{free_port, server_bin, Procs};
use pigeonhole_client::mailbox;
use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Waits until a logged line satisfies `pred`; returns it.
fn wait_for(
    lines: &Mutex<Vec<serde_json::Value>>,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = lines.lock().unwrap().iter().find(|l| pred(l)) {
            return l.clone();
        }
        if Instant::now() >= deadline {
            let seen: Vec<String> = lines
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(5)
                .map(ToString::to_string)
                .collect();
            panic!("no log line {what}; the last ones: {seen:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_spans_and_a_filter_changed_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(server_bin())
        .args(["--listen", &addr, "--shards", "1"])
        .args(["--log-format", "json", "--log-level", "info", "--slow-request-ms", "0"])
        .arg("--data-dir")
        .arg(dir.path().join("n1"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _node = Procs(vec![child]);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let raw = Arc::new(Mutex::new(Vec::new()));
    {
        let (lines, raw) = (lines.clone(), raw.clone());
        std::thread::spawn(move || {
            // Bytes, not `lines()`: a line that is not UTF-8 must be seen
            // (and fail the JSON check), not end the reader and block the
            // node on a full pipe.
            for line in std::io::BufReader::new(stderr).split(b'\n') {
                let Ok(line) = line else { return };
                let line = String::from_utf8_lossy(&line).into_owned();
                raw.lock().unwrap().push(line.clone());
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    lines.lock().unwrap().push(v);
                }
            }
        });
    }
    let client = common::connect_when_up(std::slice::from_ref(&addr), Duration::from_secs(30)).await;
    // raft-rs's own records, through tracing.
    let raft = wait_for(&lines, "from raft", |l| l["target"] == "raft");
    assert!(raft["level"] == "INFO" && raft["message"].is_string(), "{raft}");
    // A slow request (every request is, at 0 ms), inside its span.
    client
        .append(&mailbox("chat", b"alice"), b"hi".to_vec(), "k1")
        .await
        .unwrap();
    let slow = wait_for(&lines, "for the slow append", |l| {
        l["message"] == "slow request" && l["span"]["method"] == "pigeonhole.v1.Mailbox/Append"
    });
    assert_eq!(slow["level"], "WARN");
    assert_eq!(slow["span"]["namespace"], "chat", "{slow}");
    assert!(slow["span"]["shard"].is_number(), "{slow}");
    assert_eq!(slow["span"]["id"].as_str().unwrap().len(), 16, "{slow}");
    assert!(slow["took_ms"].is_number());
    // With its stages, each reached, in order.
    let stages = slow["stages"].as_str().unwrap_or_else(|| panic!("no stages: {slow}"));
    let names: Vec<&str> = stages
        .split(' ')
        .filter_map(|s| s.split_once('=').map(|(n, _)| n))
        .collect();
    assert_eq!(
        names,
        ["handle", "queue", "propose", "commit", "apply", "reply"],
        "{slow}"
    );
    assert!(!stages.contains("not reached") && stages.contains("ms"), "{slow}");
    // The caller's request id is kept.
    let mut raw_client = pigeonhole_proto::v1::mailbox_client::MailboxClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut req = tonic::Request::new(pigeonhole_proto::v1::AppendRequest {
        mailbox: Some(mailbox("chat", b"bob")),
        payload: b"x".to_vec().into(),
        idempotency_key: b"k2".to_vec(),
        expected_last_seq: None,
    });
    req.metadata_mut()
        .insert("x-request-id", "trace-me-42".parse().unwrap());
    raw_client.append(req).await.unwrap();
    wait_for(&lines, "with the caller's request id", |l| {
        l["span"]["id"] == "trace-me-42"
    });
    // The filter changes while the node runs: at `error`, slow requests
    // (WARN) are no longer logged.
    let out = Command::new(env!("CARGO_BIN_EXE_phctl"))
        .args(["--endpoints", &addr, "-o", "json", "node", "log-level", "1", "error"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (answer["previous"].as_str(), answer["filter"].as_str()),
        (Some("info"), Some("error"))
    );
    let slow_lines = || {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["message"] == "slow request" && l["span"]["method"] == "pigeonhole.v1.Mailbox/Append")
            .count()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = slow_lines();
    for i in 0..20 {
        client
            .append(&mailbox("chat", b"alice"), b"hi".to_vec(), format!("after{i}"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(slow_lines(), before, "slow requests were logged under an error filter");
    // A filter that does not parse is refused, naming the field.
    let bad = Command::new(env!("CARGO_BIN_EXE_phctl"))
        .args(["--endpoints", &addr, "node", "log-level", "1", "info,raft=loud"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("filter"));
    // Every line is JSON.
    let raw = raw.lock().unwrap();
    assert!(!raw.is_empty());
    for l in raw.iter() {
        assert!(serde_json::from_str::<serde_json::Value>(l).is_ok(), "not JSON: {l}");
    }
}
