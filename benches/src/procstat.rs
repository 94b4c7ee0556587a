//! What a load generator reads from /proc to put a run's figures in
//! context: the servers' CPU-seconds and bytes written (`/proc/PID/stat`,
//! `/proc/PID/io`), its own CPU time, and the machine's idle share
//! (`/proc/stat`). Linux only; an unreadable file reads as zero (or null),
//! so a run still reports its throughput and latencies.

/// Percent of the machine's CPU time spent idle (or waiting for I/O)
/// between two `machine_ticks` readings; null if /proc/stat was unreadable.
pub fn idle_pct(before: (u64, u64), after: (u64, u64)) -> serde_json::Value {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return serde_json::Value::Null;
    }
    (after.0.saturating_sub(before.0) as f64 * 100.0 / total as f64).into()
}

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime of one process (`self` or a pid), in seconds.
pub fn proc_cpu_s(pid: &str, ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that ends the command name: utime is the 12th,
    // stime the 13th.
    let rest = stat.rsplit(')').next()?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Some((num(11) + num(12)) / ticks)
}

/// The machine's CPU time so far, from /proc/stat's `cpu` line: (idle +
/// iowait, total), in ticks.
pub fn machine_ticks() -> (u64, u64) {
    cpu_ticks(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
}

/// (idle + iowait, total) from the text of /proc/stat.
pub fn cpu_ticks(stat: &str) -> (u64, u64) {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (idle, v.iter().sum())
}

/// CPU-seconds and bytes written of the servers, from /proc.
pub fn proc_totals(pids: &[u32]) -> (f64, u64) {
    let ticks = clock_ticks();
    let mut cpu = 0.0;
    let mut written = 0u64;
    for pid in pids {
        cpu += proc_cpu_s(&pid.to_string(), ticks).unwrap_or(0.0);
        if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
            for line in io.lines() {
                if let Some(v) = line.strip_prefix("write_bytes: ") {
                    written += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    (cpu, written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machines_idle_share_counts_idle_and_iowait_over_every_state() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 5 50 300 40 2 3 0 7 0\ncpu0 50 2 25 150 20 1 1 0 3 0\nintr 1\n";
        assert_eq!(cpu_ticks(stat), (340, 500));
        assert_eq!(cpu_ticks("intr 1\n"), (0, 0));
        assert_eq!(idle_pct((340, 500), (390, 700)), serde_json::json!(25.0));
        assert_eq!(idle_pct((1, 1), (1, 1)), serde_json::Value::Null);
    }
}
