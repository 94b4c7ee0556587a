//! Where a slow write spent its time: the stamps one request collects on
//! its way through the write path, for the slow-request log line
//! (docs/operations.md "Logs").
//!
//! The RPC layer (`metrics::GrpcMetricsLayer`) gives each unary request a
//! [`Stages`] in a task-local; [`crate::Node::propose_until`] picks it up
//! and it rides with the proposal: sent to the driver, taken from its
//! inbox, proposed to Raft, committed and handed to apply, applied and
//! answered. The layer reads the stamps only when the request turned out
//! slow; the fast path pays one allocation and a few relaxed atomic
//! stores per proposal, and nothing is formatted.
//!
//! A request with several proposals (an AppendBatch over shards, a retry
//! after a leader change) keeps the latest stamp of each stage: a stage
//! ends when its last part does. Reads (ReadIndex barriers) are not
//! staged; their line gives the total only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

tokio::task_local! {
    /// The current request's stages, set by the RPC layer.
    static CURRENT: Arc<Stages>;
}

/// The stages a request is stamped at, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Handed to the driver's inbox.
    Sent = 0,
    /// Taken from the inbox by the driver.
    Dequeued = 1,
    /// Proposed to Raft (packed into an entry).
    Proposed = 2,
    /// Committed and handed to apply.
    Committed = 3,
    /// Applied, and its caller answered.
    Applied = 4,
}

const STAGES: usize = 5;

/// One request's stamps: nanoseconds since a process-wide origin, plus
/// one (0: not reached).
#[derive(Debug, Default)]
pub struct Stages([AtomicU64; STAGES]);

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Stages {
    /// Stamps `stage` now (keeping a later stamp if there is one).
    pub fn stamp(&self, stage: Stage) {
        let ns = u64::try_from(origin().elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        if let Some(s) = self.0.get(stage as usize) {
            s.fetch_max(ns, Ordering::Relaxed);
        }
    }

    fn at(&self, stage: Stage) -> Option<Instant> {
        let ns = self.0.get(stage as usize)?.load(Ordering::Relaxed);
        (ns > 0).then(|| origin() + Duration::from_nanos(ns - 1))
    }

    /// The request's stages between `start` (the call's arrival) and `end`
    /// (its answer), as `queue=… propose=… commit=… apply=… reply=…` in
    /// milliseconds; `None` if it never reached the driver.
    pub fn describe(&self, start: Instant, end: Instant) -> Option<String> {
        let sent = self.at(Stage::Sent)?;
        let marks = [
            ("queue", self.at(Stage::Dequeued)),
            ("propose", self.at(Stage::Proposed)),
            ("commit", self.at(Stage::Committed)),
            ("apply", self.at(Stage::Applied)),
        ];
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
        let mut out = format!("handle={:.1}ms", ms(start, sent));
        let mut last = sent;
        for (name, at) in marks {
            match at {
                Some(t) => {
                    out.push_str(&format!(" {name}={:.1}ms", ms(last, t)));
                    last = t;
                }
                None => {
                    out.push_str(&format!(" {name}=(not reached)"));
                    return Some(out);
                }
            }
        }
        out.push_str(&format!(" reply={:.1}ms", ms(last, end)));
        Some(out)
    }
}

/// The current request's stages, if the RPC layer set them.
pub fn current() -> Option<Arc<Stages>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// Runs `fut` with `stages` as the current request's.
pub async fn scope<F: std::future::Future>(stages: Arc<Stages>, fut: F) -> F::Output {
    CURRENT.scope(stages, fut).await
}

/// Stamps `stages` if there are any.
pub fn stamp(stages: Option<&Arc<Stages>>, stage: Stage) {
    if let Some(s) = stages {
        s.stamp(stage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_each_stage_from_the_one_before() {
        let s = Stages::default();
        let start = Instant::now();
        assert_eq!(s.describe(start, Instant::now()), None, "never reached the driver");
        s.stamp(Stage::Sent);
        s.stamp(Stage::Dequeued);
        std::thread::sleep(Duration::from_millis(20));
        s.stamp(Stage::Proposed);
        let d = s.describe(start, Instant::now()).unwrap();
        assert!(d.contains("propose=2") && d.contains("commit=(not reached)"), "{d}");
        s.stamp(Stage::Committed);
        s.stamp(Stage::Applied);
        let d = s.describe(start, Instant::now()).unwrap();
        assert!(d.starts_with("handle=") && d.contains(" reply="), "{d}");
        assert!(!d.contains("not reached"), "{d}");
    }

    #[tokio::test]
    async fn the_current_stages_are_the_scope_s() {
        assert!(current().is_none());
        let s = Arc::new(Stages::default());
        let got = scope(s.clone(), async { current() }).await.unwrap();
        assert!(Arc::ptr_eq(&got, &s));
    }
}
