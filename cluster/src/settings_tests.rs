//! Unit tests of `settings.rs`: the merge order, every setting's range
//! check and its error text, and the shipped example config.

use super::*;

#[test]
fn the_file_format_in_the_module_docs_parses() {
    let text = "node_id = 2\ndata_dir = \"/d\"\nlisten = \"127.0.0.1:7072\"\n\
        initial_cluster = \"1=127.0.0.1:7071,2=127.0.0.1:7072,3=127.0.0.1:7073\"\n\
        shards = 8\nreplication_factor = 3\n[limits]\nrequest_timeout_ms = 2000\nbatch_items_max = 16\n";
    let cfg = Settings::from_toml(text).unwrap().into_server_config().unwrap();
    assert_eq!(cfg.node_id, 2);
    assert_eq!(cfg.shard_count, 8);
    assert_eq!(cfg.replication_factor, 3);
    assert_eq!(cfg.request_timeout_ms, 2_000);
    assert_eq!(cfg.api.batch_items_max, 16);
    assert_eq!(cfg.api.wait_ms_max, ApiLimits::default().wait_ms_max);
}

#[test]
fn flags_beat_the_file_and_the_file_beats_defaults() {
    let file = Settings::from_toml("shards = 8\nlisten = \"127.0.0.1:9000\"\n").unwrap();
    let flags = Settings {
        shards: Some(16),
        ..Settings::default()
    };
    let cfg = file.overlay(flags).into_server_config().unwrap();
    assert_eq!(cfg.shard_count, 16, "the flag wins");
    assert_eq!(cfg.listen.port(), 9000, "the file beats the default");
    assert_eq!(cfg.data_dir, PathBuf::from("./pigeonhole-data"), "the default");
}

#[test]
fn unset_shards_keep_the_data_dirs_count_or_follow_the_initial_cluster() {
    let three = "1=127.0.0.1:7071,2=127.0.0.1:7072,3=127.0.0.1:7073";
    let dir = tempfile::tempdir().unwrap();
    let settings = |shards: Option<u64>| Settings {
        data_dir: Some(dir.path().to_path_buf()),
        initial_cluster: Some(three.into()),
        listen: Some("127.0.0.1:7071".parse().unwrap()),
        shards,
        ..Settings::default()
    };
    // A new data dir: 4 per initial node.
    assert_eq!(settings(None).into_server_config().unwrap().shard_count, 12);
    assert_eq!(
        Settings::default().into_server_config().unwrap().shard_count,
        crate::config::DEFAULT_SHARD_COUNT_MIN,
        "one node"
    );
    // A data dir bootstrapped with 64 (the default before D59), its
    // identity written by the node's own writer: restarts keep 64.
    let old = settings(Some(64)).into_server_config().unwrap().initial_node_config();
    crate::node::check_identity(&old, old.effective_cluster_id()).unwrap();
    assert_eq!(settings(None).into_server_config().unwrap().shard_count, 64);
    // ...and then the node's identity check passes with no flag.
    let again = settings(None).into_server_config().unwrap().initial_node_config();
    crate::node::check_identity(&again, again.effective_cluster_id()).unwrap();
    // A flag that disagrees is the operator's, and the identity check
    // refuses it as before.
    let other = settings(Some(12)).into_server_config().unwrap().initial_node_config();
    assert_eq!(other.shard_count, 12);
    let e = crate::node::check_identity(&other, other.effective_cluster_id()).unwrap_err();
    assert!(e.to_string().contains("belongs to another node or cluster"), "{e}");
    // A damaged identity file is named, not guessed around.
    std::fs::write(dir.path().join("cluster-identity"), "node_id=1\nshard_count=x\n").unwrap();
    let e = settings(None).into_server_config().unwrap_err();
    assert!(e.starts_with("shards: ") && e.contains("shard_count"), "{e}");
}

#[test]
fn mistakes_are_named() {
    let e = Settings::from_toml("shard = 8\n").unwrap_err();
    assert!(e.contains("shard"), "{e}");
    let e = Settings::from_toml("[limits]\nrequest_timeout_ms = 5\n")
        .unwrap()
        .into_server_config()
        .unwrap_err();
    assert!(
        e.contains("limits.request_timeout_ms") && e.contains("100 to 60000"),
        "{e}"
    );
    let e = Settings {
        node_id: Some(9),
        ..Settings::default()
    }
    .into_server_config()
    .unwrap_err();
    assert!(e.contains("node_id 9"), "{e}");
}

#[test]
fn tls_settings_are_read_and_checked() {
    let cfg =
        Settings::from_toml("insecure = true\n[tls]\nca = \"/c/ca.crt\"\ncert = \"/c/n.crt\"\nkey = \"/c/n.key\"\n")
            .unwrap()
            .into_server_config()
            .unwrap();
    assert!(cfg.insecure);
    let tls = cfg.tls.unwrap();
    assert_eq!(tls.ca, PathBuf::from("/c/ca.crt"));
    assert_eq!(tls.key, Some(PathBuf::from("/c/n.key")));
    for (text, want) in [
        ("[tls]\nca = \"/c/ca.crt\"\n", "needs its certificate and key"),
        ("[tls]\ncert = \"/c/n.crt\"\nkey = \"/c/n.key\"\n", "need --tls-ca"),
        ("[tls]\nca = \"/c/ca.crt\"\ncert = \"/c/n.crt\"\n", "go together"),
    ] {
        let e = Settings::from_toml(text).unwrap().into_server_config().unwrap_err();
        assert!(e.contains(want), "{text}: {e}");
    }
    // Plaintext on a routable address needs insecure; loopback does not.
    let mut cfg = ServerConfig::single_node_default();
    cfg.check_transport_security().unwrap();
    cfg.listen = "0.0.0.0:7070".parse().unwrap();
    let e = cfg.check_transport_security().unwrap_err().to_string();
    assert!(e.contains("--insecure"), "{e}");
    cfg.insecure = true;
    cfg.check_transport_security().unwrap();
}

#[test]
fn join_settings_are_read_and_checked() {
    let cfg = Settings::from_toml("join = \"10.0.0.1:7070, 10.0.0.2:7070\"\nadvertise = \"10.0.0.9:7070\"\n")
        .unwrap()
        .into_server_config()
        .unwrap();
    assert_eq!(cfg.join, vec!["10.0.0.1:7070", "10.0.0.2:7070"]);
    assert_eq!(cfg.advertise, "10.0.0.9:7070");
    for (text, want) in [
        ("join = \"10.0.0.1:7070\"\nnode_id = 4\n", "leave node_id"),
        ("join = \"10.0.0.1:7070\"\nshards = 8\n", "leave node_id"),
        ("join = \"10.0.0.1\"\n", "join: \"10.0.0.1\" is not host:port"),
        ("join = \" , \"\n", "join: 0 members; give 1 to 16"),
        (
            "join = \"h:1\"\nadvertise = \"nope\"\n",
            "advertise: \"nope\" is not host:port",
        ),
    ] {
        let e = Settings::from_toml(text).unwrap().into_server_config().unwrap_err();
        assert!(e.contains(want), "{text:?}: {e}");
    }
    assert!(Settings::default().into_server_config().unwrap().join.is_empty());
    let cfg = Settings::from_toml("zone = \"rack-7\"\n")
        .unwrap()
        .into_server_config()
        .unwrap();
    assert_eq!(cfg.zone, "rack-7");
    let e = Settings::from_toml("zone = \"a b\"\n")
        .unwrap()
        .into_server_config()
        .unwrap_err();
    assert!(e.starts_with("zone: "), "{e}");
}

#[test]
fn raft_log_settings_are_read_and_checked() {
    let cfg = Settings::from_toml("[raft]\nlog_entries_max = 32\nlog_retain_entries = 0\n")
        .unwrap()
        .into_server_config()
        .unwrap();
    assert_eq!((cfg.log_entries_max, cfg.log_retain_entries), (32, 0));
    let e = Settings::from_toml("[raft]\nlog_entries_max = 8\n")
        .unwrap()
        .into_server_config()
        .unwrap_err();
    assert!(
        e.contains("raft.log_entries_max") && e.contains("16 to 10000000"),
        "{e}"
    );
    let e = Settings::from_toml("[raft]\nlog_entries_max = 100\nlog_retain_entries = 100\n")
        .unwrap()
        .into_server_config()
        .unwrap_err();
    assert!(e.contains("must be below"), "{e}");
    let e = Settings::from_toml("[raft]\nlog_entries = 100\n").unwrap_err();
    assert!(e.contains("log_entries"), "an unknown key is named: {e}");
}

#[test]
fn the_snapshot_send_budget_is_read_and_checked() {
    let cfg = Settings::default().into_server_config().unwrap();
    assert_eq!(cfg.snapshot_send_bytes_per_s, 100 << 20, "default");
    let cfg = Settings::from_toml("[raft]\nsnapshot_send_bytes_per_s = 1048576\n")
        .unwrap()
        .into_server_config()
        .unwrap();
    assert_eq!(cfg.snapshot_send_bytes_per_s, 1 << 20);
    for bad in ["1000", "0", "99999999999999"] {
        let e = Settings::from_toml(&format!("[raft]\nsnapshot_send_bytes_per_s = {bad}\n"))
            .unwrap()
            .into_server_config()
            .unwrap_err();
        assert!(
            e.contains("raft.snapshot_send_bytes_per_s") && e.contains("65536 to 10737418240"),
            "{e}"
        );
    }
}

/// The apply and driver pool sizes: defaults, the file, the flag over the
/// file, and the range.
#[test]
fn the_pool_sizes_are_read_and_checked() {
    type Get = fn(&crate::server::ServerConfig) -> usize;
    type Set = fn(&mut super::RaftSettings, usize);
    let pools: [(&str, usize, Get, Set); 2] = [
        (
            "apply_threads",
            crate::config::default_apply_threads(),
            |c| c.apply_threads,
            |r, n| r.apply_threads = Some(n),
        ),
        (
            "driver_threads",
            crate::config::default_driver_threads(),
            |c| c.driver_threads,
            |r, n| r.driver_threads = Some(n),
        ),
    ];
    for (name, default, get, set) in pools {
        let cfg = Settings::default().into_server_config().unwrap();
        assert_eq!(get(&cfg), default, "{name}: default");
        let file = Settings::from_toml(&format!("[raft]\n{name} = 3\n")).unwrap();
        assert_eq!(get(&file.clone().into_server_config().unwrap()), 3, "{name}: file");
        let mut flag = Settings::default();
        set(&mut flag.raft, 2);
        assert_eq!(
            get(&file.overlay(flag).into_server_config().unwrap()),
            2,
            "{name}: the flag wins"
        );
        for bad in ["0", "17"] {
            let e = Settings::from_toml(&format!("[raft]\n{name} = {bad}\n"))
                .unwrap()
                .into_server_config()
                .unwrap_err();
            assert!(e.contains(&format!("raft.{name}")) && e.contains("1 to 16"), "{e}");
        }
    }
}

/// The example config shipped with the systemd unit is a valid one.
#[test]
fn the_shipped_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/pigeonhole.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let cfg = Settings::from_toml(&text).unwrap().into_server_config().unwrap();
    assert_eq!(cfg.node_id, 1);
    assert!(cfg.tls.is_some() && cfg.metrics_listen.is_some());
}
