//! systemd integration for `Type=notify` units (deploy/systemd): the node
//! says READY=1 once it serves, pings the watchdog while its Raft driver
//! answers, and says STOPPING=1 when shutdown begins. Without
//! `NOTIFY_SOCKET` (not started by systemd) every call does nothing.
//!
//! Why the watchdog asks the driver: a process whose async workers run but
//! whose driver thread is stuck (a wedged disk, a deadlock) serves nothing
//! useful; systemd should restart it. So each ping waits for a status
//! answer from the driver, and a missing answer skips the ping.

use crate::node::Node;
use sd_notify::NotifyState;
use std::time::Duration;

/// Tells systemd the node serves, and starts the watchdog pings if the
/// unit asked for them (`WatchdogSec=`).
pub fn ready(node: &Node) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status("serving")]);
    let Some(usec) = watchdog_usec(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
    ) else {
        return;
    };
    // Twice per period, as sd_watchdog_enabled(3) advises.
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    let weak = node.downgrade();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            if driver_answers(&node, every).await {
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
            }
        }
    });
}

/// Whether the driver answers a status request within `within`. A full
/// inbox (a busy driver) refuses at once: asked again until `within` ends,
/// so only a driver that answers nothing in the whole period misses a ping.
async fn driver_answers(node: &Node, within: Duration) -> bool {
    let until = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(until, node.status()).await {
            Ok(Ok(_)) => return true,
            Err(_) => return false,
            Ok(Err(_)) => {
                if tokio::time::Instant::now() + Duration::from_millis(20) >= until {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The watchdog period the unit asked for, as sd_watchdog_enabled(3) reads
/// it: `WATCHDOG_USEC` set and positive, and `WATCHDOG_PID` unset or this
/// process. (The sd-notify crate's own check also refuses an unset PID,
/// which systemd's does not.)
fn watchdog_usec(usec: Option<&str>, pid: Option<&str>) -> Option<u64> {
    let usec = usec?.parse::<u64>().ok().filter(|u| *u > 0)?;
    match pid {
        None => Some(usec),
        Some(p) => (p.parse::<u32>().ok() == Some(std::process::id())).then_some(usec),
    }
}

/// Tells systemd the node is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_on_for_this_process_or_any_when_no_pid_is_named() {
        let me = std::process::id().to_string();
        assert_eq!(watchdog_usec(Some("30000000"), None), Some(30_000_000));
        assert_eq!(watchdog_usec(Some("30000000"), Some(&me)), Some(30_000_000));
        assert_eq!(watchdog_usec(Some("30000000"), Some("1")), None, "another process's");
        assert_eq!(watchdog_usec(Some("0"), None), None);
        assert_eq!(watchdog_usec(Some("x"), None), None);
        assert_eq!(watchdog_usec(None, Some(&me)), None);
    }
}
