//! The network: one Linux network namespace per node, one for the clients,
//! all joined by veth pairs to a bridge that lives in a namespace of its
//! own. Node i is 10.77.0.i, the clients are 10.77.0.100.
//!
//! Faults are iptables DROP rules by source address inside a node's
//! namespace: dropping at `to` everything from `from` cuts one direction.
//! Deleting a namespace deletes its rules and its veth, so cleanup is "delete
//! every namespace with our prefix", which is also what a new run does first
//! (a run that was SIGKILLed leaves nothing behind for long).
//!
//! Everything is done with the `ip` and `iptables` commands: the workspace
//! forbids `unsafe`, and these are what an operator would type.

use std::process::Command;

/// Every namespace this harness makes starts with this.
pub const PREFIX: &str = "phj-";
/// The clients' namespace.
pub const CONTROL: &str = "phj-ctl";
const BRIDGE_NS: &str = "phj-br";

/// Node `i`'s namespace.
pub fn node_ns(i: u64) -> String {
    format!("{PREFIX}n{i}")
}

/// Node `i`'s address.
pub fn node_ip(i: u64) -> String {
    format!("10.77.0.{i}")
}

/// Runs a command; an error names it and carries its stderr.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let (prog, rest) = args.split_first().ok_or("empty command")?;
    let out = Command::new(prog)
        .args(rest)
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command inside a namespace.
pub fn in_ns(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    sh(&all)
}

/// Checks that this machine can do what the harness needs, with a clear
/// message when it cannot.
pub fn preflight() -> Result<(), String> {
    if sh(&["id", "-u"])?.trim() != "0" {
        return Err("the harness needs root (network namespaces, iptables)".into());
    }
    sh(&["ip", "netns", "list"]).map_err(|e| format!("network namespaces are unavailable here: {e}"))?;
    sh(&["iptables", "--version"]).map_err(|e| format!("iptables is missing (scripts/setup installs it): {e}"))?;
    Ok(())
}

/// Deletes every namespace with our prefix.
pub fn cleanup() {
    if let Ok(list) = sh(&["ip", "netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(PREFIX) {
                let _ = sh(&["ip", "netns", "del", name]);
            }
        }
    }
}

/// Builds the bridge, `nodes` node namespaces and the control namespace.
pub fn setup(nodes: u64) -> Result<(), String> {
    cleanup();
    sh(&["ip", "netns", "add", BRIDGE_NS])?;
    in_ns(BRIDGE_NS, &["ip", "link", "add", "br0", "type", "bridge"])?;
    in_ns(BRIDGE_NS, &["ip", "link", "set", "br0", "up"])?;
    let mut hosts: Vec<(String, String)> = (1..=nodes).map(|i| (node_ns(i), node_ip(i))).collect();
    hosts.push((CONTROL.to_string(), "10.77.0.100".to_string()));
    for (i, (ns, ip)) in hosts.iter().enumerate() {
        let veth = format!("phjv{i}");
        sh(&["ip", "netns", "add", ns])?;
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        sh(&["ip", "link", "set", &veth, "netns", BRIDGE_NS])?;
        in_ns(BRIDGE_NS, &["ip", "link", "set", &veth, "master", "br0"])?;
        in_ns(BRIDGE_NS, &["ip", "link", "set", &veth, "up"])?;
        in_ns(ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        in_ns(ns, &["ip", "link", "set", "eth0", "up"])?;
        in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// Drops, at node `to`, every packet from node `from`.
pub fn block(from: u64, to: u64) -> Result<(), String> {
    in_ns(
        &node_ns(to),
        &["iptables", "-A", "INPUT", "-s", &node_ip(from), "-j", "DROP"],
    )
    .map(|_| ())
}

/// Removes every DROP rule on nodes `1..=nodes`.
pub fn heal(nodes: u64) -> Result<(), String> {
    for i in 1..=nodes {
        in_ns(&node_ns(i), &["iptables", "-F", "INPUT"])?;
    }
    Ok(())
}
