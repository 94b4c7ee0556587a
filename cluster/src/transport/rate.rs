//! The snapshot send budget: ONE per node, shared by every snapshot the
//! node sends, so catch-ups and replica moves never take more than
//! `RaftTuning::snapshot_send_bytes_per_s` of the disk and network that
//! foreground traffic needs (TiKV limits snapshot I/O the same way).
//!
//! Shaped as a schedule rather than a token bucket: each chunk reserves the
//! next free slot on a shared timeline (its length is the chunk's bytes at
//! the configured rate) and its sender sleeps until the slot starts. The
//! first chunk after an idle spell goes at once, so the burst is one chunk
//! (`snapshot_chunk_bytes`, 1 MiB by default); over any longer stretch the
//! node sends at most the rate, however many snapshots run at once. The
//! senders are export threads (blocking), never the driver, so the sleep
//! delays nothing else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The node's snapshot send budget.
#[derive(Debug)]
pub struct SendRate {
    bytes_per_s: u64,
    /// When the next chunk may start (None: never used).
    next: Mutex<Option<Instant>>,
    sent_bytes: AtomicU64,
    waited_ms: AtomicU64,
}

impl SendRate {
    /// A budget of `bytes_per_s` (at least 1; the settings bound it).
    pub fn new(bytes_per_s: u64) -> Self {
        SendRate {
            bytes_per_s: bytes_per_s.max(1),
            next: Mutex::new(None),
            sent_bytes: AtomicU64::new(0),
            waited_ms: AtomicU64::new(0),
        }
    }

    /// Reserves the slot for `bytes` at `now`; returns how long the caller
    /// must wait before sending them.
    fn reserve(&self, now: Instant, bytes: u64) -> Duration {
        let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(self.bytes_per_s);
        let cost = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = match *next {
            Some(t) if t > now => t,
            _ => now,
        };
        *next = Some(start + cost);
        start - now
    }

    /// Waits (sleeping the calling thread) until `bytes` may be sent.
    pub fn acquire(&self, bytes: u64) {
        let wait = self.reserve(Instant::now(), bytes);
        if !wait.is_zero() {
            std::thread::sleep(wait);
            let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            self.waited_ms.fetch_add(ms, Ordering::Relaxed);
        }
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes let through so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Relaxed)
    }

    /// Milliseconds senders slept for the budget so far.
    pub fn waited_ms(&self) -> u64 {
        self.waited_ms.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn chunks_are_spaced_by_their_size_at_the_rate() {
        let r = SendRate::new(4 * MIB);
        let t0 = Instant::now();
        assert_eq!(r.reserve(t0, MIB), Duration::ZERO, "the first chunk goes at once");
        assert_eq!(r.reserve(t0, MIB), Duration::from_millis(250));
        assert_eq!(r.reserve(t0, 2 * MIB), Duration::from_millis(500));
        // 4 MiB reserved from t0: the next slot starts 1 s after t0.
        assert_eq!(
            r.reserve(t0 + Duration::from_millis(100), MIB),
            Duration::from_millis(900)
        );
    }

    #[test]
    fn concurrent_senders_share_one_budget() {
        // Two snapshots interleaving their chunks get the rate between them,
        // not each.
        let r = SendRate::new(MIB);
        let t0 = Instant::now();
        let waits: Vec<Duration> = (0..6).map(|_| r.reserve(t0, MIB / 2)).collect();
        let secs: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(secs, vec![0, 500, 1000, 1500, 2000, 2500]);
    }

    #[test]
    fn an_idle_spell_is_not_saved_up_into_a_burst() {
        let r = SendRate::new(MIB);
        let t0 = Instant::now();
        assert_eq!(r.reserve(t0, MIB), Duration::ZERO);
        // Ten idle seconds later: one chunk goes at once, the next waits its
        // full cost, as if the budget had never been idle.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(r.reserve(later, MIB), Duration::ZERO);
        assert_eq!(r.reserve(later, MIB), Duration::from_secs(1));
    }

    #[test]
    fn acquire_counts_what_it_let_through_and_waited() {
        let r = SendRate::new(64 * 1024);
        r.acquire(1024);
        r.acquire(3 * 1024); // waits 1024 B at 64 KiB/s = 15.6 ms
        assert_eq!(r.sent_bytes(), 4 * 1024);
        assert!(r.waited_ms() >= 15, "waited {} ms", r.waited_ms());
    }
}
