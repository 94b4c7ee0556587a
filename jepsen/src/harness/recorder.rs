//! The history recorder: stamps each event with its index and a monotonic
//! time, keeps it in memory for the checker, and appends it to
//! `history.jsonl` as it happens (so a crashed run still leaves its
//! history).

use crate::history::Op;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

/// Shared by every process and the nemesis.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    inner: Mutex<(Vec<Op>, std::io::BufWriter<std::fs::File>)>,
}

impl Recorder {
    /// A recorder writing to `path`.
    pub fn new(path: &std::path::Path) -> Result<Recorder, String> {
        let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Recorder {
            start: Instant::now(),
            inner: Mutex::new((Vec::new(), std::io::BufWriter::new(f))),
        })
    }

    /// Records one event. The lock is held while stamping, so indexes and
    /// times increase together.
    pub fn record(&self, mut op: Op) {
        let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        op.index = u64::try_from(g.0.len()).unwrap_or(u64::MAX);
        op.time_ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Ok(line) = serde_json::to_string(&op) {
            let _ = writeln!(g.1, "{line}");
        }
        g.0.push(op);
    }

    /// Every event so far (and flushes the file).
    pub fn ops(&self) -> Vec<Op> {
        let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = g.1.flush();
        g.0.clone()
    }
}
