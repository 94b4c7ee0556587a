//! Change notification for readers that wait: Sync long-polls and Subscribe
//! streams.
//!
//! Why this shape: a reader must pay only for the mailboxes a write changed,
//! never for every write on the node. A Subscribe stream may follow 10,000
//! mailboxes that stay quiet for hours; if every apply woke it to re-read
//! them all (as a node-wide "something was applied" signal would), a few
//! such streams would eat the node. So the registry is keyed by mailbox:
//! apply reports the fingerprints of the mailboxes it changed
//! ([`pigeonhole_engine::mailbox_fingerprint`]), and the driver hands them to
//! [`Watchers::mailboxes_changed`], which marks exactly the followed slots
//! dirty and wakes their readers. Each reader then re-reads only those.
//!
//! Shard-wide events reach every reader with a mailbox on the shard:
//! - a snapshot was installed ([`Watchers::shard_reset`]): any of its
//!   mailboxes may have changed, so they are all re-read;
//! - the replica lost its leader, or stopped being a replica
//!   ([`Watchers::leader_lost`]): a Subscribe stream ends with UNAVAILABLE so
//!   its client resumes on a node that can serve it (etcd's
//!   `WithRequireLeader`), instead of staying silent through a partition.
//!
//! A [`Watch`] unregisters itself when dropped, so a reader that goes away
//! (a cancelled stream, a finished long-poll) leaves nothing behind, and the
//! counts in [`Watchers::counts`] (reported by Admin NodeStatus) fall back.
//!
//! Fingerprints can collide; a collision costs a spurious re-read of one
//! mailbox, never a missed change.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;

/// What changed for one watch since it last looked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Slots (indexes into the watch's mailbox list) whose mailbox changed.
    pub slots: BTreeSet<u32>,
    /// Shards whose every mailbox may have changed (a snapshot was installed).
    pub shards: BTreeSet<u64>,
    /// A shard of this watch has no leader on this node any more (or this
    /// node stopped being its replica).
    pub leaderless: Option<u64>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.shards.is_empty() && self.leaderless.is_none()
    }
}

/// What kind of reader a watch serves (counted apart in NodeStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// A Subscribe stream.
    Stream,
    /// A Sync long-poll.
    Poll,
}

#[derive(Debug, Default)]
struct Signal {
    changes: Mutex<Changes>,
    notify: Notify,
}

impl Signal {
    fn changes(&self) -> MutexGuard<'_, Changes> {
        self.changes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn raise(&self, f: impl FnOnce(&mut Changes)) {
        f(&mut self.changes());
        // A permit is stored if the reader is not waiting yet, so a change
        // between its last look and its next wait is never lost.
        self.notify.notify_one();
    }
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    /// Fingerprint → (watch id, slot) of every reader following it.
    by_mailbox: HashMap<u64, Vec<(u64, u32)>>,
    /// Shard → ids of the watches with a mailbox on it.
    by_shard: HashMap<u64, Vec<u64>>,
    watches: HashMap<u64, Registered>,
}

/// A registered watch: its signal, its kind, and its (shard, fingerprint)s.
type Registered = (Arc<Signal>, WatchKind, Vec<(u64, u64)>);

/// Open watches, and mailboxes followed, by kind: what NodeStatus reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WatchCounts {
    /// Open Subscribe streams.
    pub streams: u64,
    /// Mailboxes the open Subscribe streams follow (summed over streams).
    pub stream_mailboxes: u64,
    /// Sync long-polls waiting.
    pub polls: u64,
}

/// The node's registry of waiting readers. Shared by the serving layer
/// (which registers) and the driver (which signals).
#[derive(Debug, Default)]
pub struct Watchers {
    registry: Mutex<Registry>,
    /// Watches open: lets the driver skip all work when nobody waits.
    open: AtomicUsize,
    /// Reader wake-ups raised so far (what a quiet reader must not cost).
    raised: AtomicU64,
}

impl Watchers {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether any reader waits: when none does, the driver reports nothing.
    pub fn any(&self) -> bool {
        self.open.load(Ordering::Relaxed) != 0
    }

    /// Registers a reader of `mailboxes`, given as (shard, fingerprint);
    /// slot `i` of the returned watch is `mailboxes[i]`.
    pub fn watch(self: &Arc<Self>, kind: WatchKind, mailboxes: Vec<(u64, u64)>) -> Watch {
        let signal = Arc::new(Signal::default());
        let mut reg = self.registry();
        reg.next_id += 1;
        let id = reg.next_id;
        let mut shards = BTreeSet::new();
        for (slot, (shard, fp)) in mailboxes.iter().enumerate() {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            reg.by_mailbox.entry(*fp).or_default().push((id, slot));
            shards.insert(*shard);
        }
        for shard in shards {
            reg.by_shard.entry(shard).or_default().push(id);
        }
        reg.watches.insert(id, (signal.clone(), kind, mailboxes));
        self.open.fetch_add(1, Ordering::Relaxed);
        Watch {
            id,
            watchers: self.clone(),
            signal,
        }
    }

    fn unwatch(&self, id: u64) {
        let mut reg = self.registry();
        let Some((_, _, mailboxes)) = reg.watches.remove(&id) else {
            return;
        };
        self.open.fetch_sub(1, Ordering::Relaxed);
        let mut shards = BTreeSet::new();
        for (shard, fp) in mailboxes {
            shards.insert(shard);
            if let Some(list) = reg.by_mailbox.get_mut(&fp) {
                list.retain(|(w, _)| *w != id);
                if list.is_empty() {
                    reg.by_mailbox.remove(&fp);
                }
            }
        }
        for shard in shards {
            if let Some(list) = reg.by_shard.get_mut(&shard) {
                list.retain(|w| *w != id);
                if list.is_empty() {
                    reg.by_shard.remove(&shard);
                }
            }
        }
    }

    /// Apply changed the mailboxes with these fingerprints: wake exactly
    /// the readers that follow them.
    pub fn mailboxes_changed(&self, fingerprints: &[u64]) {
        if !self.any() || fingerprints.is_empty() {
            return;
        }
        let reg = self.registry();
        for fp in fingerprints {
            for (id, slot) in reg.by_mailbox.get(fp).into_iter().flatten() {
                if let Some((signal, _, _)) = reg.watches.get(id) {
                    self.raised.fetch_add(1, Ordering::Relaxed);
                    signal.raise(|c| {
                        c.slots.insert(*slot);
                    });
                }
            }
        }
    }

    fn each_on_shard(&self, shard: u64, f: impl Fn(&mut Changes)) {
        if !self.any() {
            return;
        }
        let reg = self.registry();
        for id in reg.by_shard.get(&shard).into_iter().flatten() {
            if let Some((signal, _, _)) = reg.watches.get(id) {
                self.raised.fetch_add(1, Ordering::Relaxed);
                signal.raise(&f);
            }
        }
    }

    /// A snapshot replaced the shard's state: every reader of any of its
    /// mailboxes re-reads them.
    pub fn shard_reset(&self, shard: u64) {
        self.each_on_shard(shard, |c| {
            c.shards.insert(shard);
        });
    }

    /// This node's replica of `shard` has no leader (or is gone): readers
    /// that must not stay silent end.
    pub fn leader_lost(&self, shard: u64) {
        self.each_on_shard(shard, |c| {
            c.leaderless.get_or_insert(shard);
        });
    }

    /// Whether any reader follows a mailbox of `shard`.
    pub fn watches_shard(&self, shard: u64) -> bool {
        self.any() && self.registry().by_shard.contains_key(&shard)
    }

    /// Reader wake-ups raised since the node started.
    pub fn wakeups(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    /// Open watches and followed mailboxes, by kind.
    pub fn counts(&self) -> WatchCounts {
        let reg = self.registry();
        let mut c = WatchCounts::default();
        for (_, kind, mailboxes) in reg.watches.values() {
            match kind {
                WatchKind::Stream => {
                    c.streams += 1;
                    c.stream_mailboxes += mailboxes.len() as u64;
                }
                WatchKind::Poll => c.polls += 1,
            }
        }
        c
    }
}

/// One reader's registration. Dropping it unregisters the reader.
#[derive(Debug)]
pub struct Watch {
    id: u64,
    watchers: Arc<Watchers>,
    signal: Arc<Signal>,
}

impl Watch {
    /// What changed since the last look (empty if nothing), without waiting.
    pub fn take(&self) -> Changes {
        std::mem::take(&mut *self.signal.changes())
    }

    /// Waits until something changed, then returns it (cancel-safe: a
    /// change raised while the wait is abandoned is kept for the next look).
    pub async fn changed(&self) -> Changes {
        loop {
            let c = self.take();
            if !c.is_empty() {
                return c;
            }
            self.signal.notify.notified().await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.watchers.unwatch(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn only_followed_mailboxes_wake_a_reader() {
        let w = Arc::new(Watchers::default());
        let a = w.watch(WatchKind::Stream, vec![(1, 10), (1, 11), (2, 20)]);
        let b = w.watch(WatchKind::Poll, vec![(2, 21)]);
        assert_eq!(
            w.counts(),
            WatchCounts {
                streams: 1,
                stream_mailboxes: 3,
                polls: 1
            }
        );
        w.mailboxes_changed(&[99, 98]);
        assert_eq!(a.take(), Changes::default(), "an unfollowed mailbox wakes nobody");
        assert_eq!(w.wakeups(), 0);
        w.mailboxes_changed(&[11, 20, 11]);
        let c = tokio::time::timeout(Duration::from_secs(1), a.changed()).await.unwrap();
        assert_eq!(c.slots, BTreeSet::from([1, 2]));
        assert!(b.take().slots.is_empty());
        w.shard_reset(2);
        assert_eq!(a.take().shards, BTreeSet::from([2]));
        assert_eq!(b.take().shards, BTreeSet::from([2]));
        w.leader_lost(1);
        assert_eq!(a.take().leaderless, Some(1));
        assert_eq!(b.take().leaderless, None, "b has no mailbox on shard 1");
        assert!(w.watches_shard(1));
        drop(a);
        assert!(!w.watches_shard(1));
        assert_eq!(w.counts().streams, 0);
        drop(b);
        assert!(!w.any());
        assert!(w.registry().by_mailbox.is_empty() && w.registry().by_shard.is_empty());
    }

    #[tokio::test]
    async fn a_change_before_the_wait_is_not_lost() {
        let w = Arc::new(Watchers::default());
        let a = w.watch(WatchKind::Poll, vec![(1, 7)]);
        w.mailboxes_changed(&[7]);
        let c = tokio::time::timeout(Duration::from_secs(1), a.changed()).await.unwrap();
        assert_eq!(c.slots, BTreeSet::from([0]));
        // Nothing more: the next wait blocks.
        assert!(tokio::time::timeout(Duration::from_millis(50), a.changed())
            .await
            .is_err());
    }
}
