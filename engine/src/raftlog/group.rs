//! Group commit across callers: concurrent appends to the Raft log are
//! joined into one record, one `write` and one fdatasync.
//!
//! Why: a node runs several Raft drivers (D65), each with its own group
//! commit of the shards it holds, and the log has one writer. Without this,
//! the second driver waited for the first's fdatasync and then paid one of
//! its own. Here the callers queue their records; whichever finds no write
//! in progress becomes the leader, waits for the writer, takes every record
//! queued by then (the ones that arrived during the previous fdatasync), and
//! writes them as ONE record: the ops of each, in queue order, under one
//! length and crc. Each caller returns once the record holding its ops is
//! durable and indexed, as before. This is LevelDB's and RocksDB's write
//! group, and TiKV's async-io write pool, over the log's one writer.
//!
//! Why one record and not several back to back: recovery forgives a torn
//! record only as the newest segment's last (`files.rs`, "Torn tails"), and
//! a power cut during one `write` of several records could leave an earlier
//! one torn and a later one whole, which reads as damage. One record is torn
//! or whole as a unit, exactly as a single caller's record always was.
//!
//! Why merging is sound: the records queued at one moment come from callers
//! that are all still waiting for their writes, so any order of them is an
//! order they could have been written in one by one; the queue keeps the
//! order in which they arrived. Their ops are applied to the index in that
//! order, by the same code as ever.
//!
//! Limits: a group takes records up to [`GROUP_BYTES_MAX`] (the first one
//! always, whatever its size), so a merged record stays far below the record
//! limit and one caller's huge record does not delay the next group by the
//! copy of another. A lone caller's record is written as it was built: no
//! copy, no extra work but one uncontended mutex.

use super::record::RecordBuilder;
use crate::engine::{lock, Durability};
use crate::error::EngineError;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Condvar, Mutex, PoisonError};

/// A group stops taking records once the merged record would pass this
/// many bytes (the first record is taken whatever its size).
pub(crate) const GROUP_BYTES_MAX: usize = 16 << 20;

/// A write that failed, as every caller in its group sees it (an
/// [`EngineError`] is not `Clone`, so each gets its own copy).
#[derive(Debug, Clone)]
enum Failure {
    LogIo(String),
    InvalidCall(String),
}

impl Failure {
    fn of(e: &EngineError) -> Failure {
        match e {
            EngineError::InvalidCall(m) => Failure::InvalidCall(m.clone()),
            EngineError::LogIo(m) => Failure::LogIo(m.clone()),
            other => Failure::LogIo(other.to_string()),
        }
    }

    fn error(&self) -> EngineError {
        match self {
            Failure::LogIo(m) => EngineError::LogIo(m.clone()),
            Failure::InvalidCall(m) => EngineError::InvalidCall(m.clone()),
        }
    }
}

#[derive(Debug)]
struct Queued {
    rec: RecordBuilder,
    durability: Durability,
}

#[derive(Debug, Default)]
struct Queue {
    /// Records not yet taken by a leader, oldest first; the first one's
    /// ticket is `taken`.
    waiting: VecDeque<Queued>,
    /// The next ticket handed out.
    next: u64,
    /// Tickets below this have been taken by a leader.
    taken: u64,
    /// Tickets below this are finished: written, or failed (`failed`).
    finished: u64,
    /// Finished tickets whose write failed, until their caller looks.
    failed: HashMap<u64, Failure>,
    /// A leader is writing (between `Turn::Lead` and `finish`).
    leading: bool,
    /// Groups written with more than one record, and the records in them
    /// (for tests and for the stats).
    groups_joined: u64,
    records_joined: u64,
}

/// What a waiting caller does next.
#[derive(Debug)]
pub(crate) enum Turn {
    /// Its record is written (or failed with this error).
    Done(Result<(), EngineError>),
    /// No write is in progress: it leads the next one.
    Lead,
}

/// Records taken by a leader, merged into one.
#[derive(Debug)]
pub(crate) struct Taken {
    pub rec: RecordBuilder,
    /// `Fsync` if any of the records asked for it.
    pub durability: Durability,
    pub tickets: Range<u64>,
}

/// The queue of records waiting to be written, shared by every caller.
#[derive(Debug, Default)]
pub(crate) struct Group {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Group {
    /// Queues a record; the ticket names it to [`Group::wait`].
    pub(crate) fn enqueue(&self, rec: RecordBuilder, durability: Durability) -> u64 {
        let mut q = lock(&self.queue);
        let ticket = q.next;
        q.next += 1;
        q.waiting.push_back(Queued { rec, durability });
        ticket
    }

    /// Blocks until `ticket` is finished or no write is in progress; in
    /// the second case the caller must lead: take ([`Group::take`]), write,
    /// and [`Group::finish`] (a [`Leading`] guard finishes on every path).
    pub(crate) fn wait(&self, ticket: u64) -> Turn {
        let mut q = lock(&self.queue);
        loop {
            if ticket < q.finished {
                return Turn::Done(q.failed.remove(&ticket).map_or(Ok(()), |f| Err(f.error())));
            }
            if !q.leading {
                q.leading = true;
                return Turn::Lead;
            }
            q = self.changed.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The leader's take: every queued record up to [`GROUP_BYTES_MAX`]
    /// merged into one, in queue order. `None` if nothing is queued (the
    /// leader's own record was taken by the leader before it).
    pub(crate) fn take(&self) -> Option<Taken> {
        let mut q = lock(&self.queue);
        let first = q.waiting.pop_front()?;
        let start = q.taken;
        let mut rec = first.rec;
        let mut fsync = first.durability == Durability::Fsync;
        let mut n = 1u64;
        while let Some(next) = q.waiting.front() {
            if rec.len().saturating_add(next.rec.len()) > GROUP_BYTES_MAX {
                break;
            }
            let Some(next) = q.waiting.pop_front() else { break };
            fsync |= next.durability == Durability::Fsync;
            rec.absorb(next.rec);
            n += 1;
        }
        q.taken = start + n;
        if n > 1 {
            q.groups_joined += 1;
            q.records_joined += n;
        }
        Some(Taken {
            rec,
            durability: if fsync { Durability::Fsync } else { Durability::NoFsync },
            tickets: start..start + n,
        })
    }

    /// Ends a leader's write: its tickets are finished with `result`, and
    /// the next caller may lead.
    pub(crate) fn finish(&self, tickets: Range<u64>, result: Result<(), &EngineError>) {
        let mut q = lock(&self.queue);
        if let Err(e) = result {
            let f = Failure::of(e);
            for t in tickets.clone() {
                q.failed.insert(t, f.clone());
            }
        }
        q.finished = q.finished.max(tickets.end);
        q.leading = false;
        drop(q);
        self.changed.notify_all();
    }

    /// Ends a leadership that took nothing.
    fn step_down(&self) {
        lock(&self.queue).leading = false;
        self.changed.notify_all();
    }

    /// Groups of more than one record written so far, and their records.
    pub(crate) fn joined(&self) -> (u64, u64) {
        let q = lock(&self.queue);
        (q.groups_joined, q.records_joined)
    }

    /// Records queued and not yet taken.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        lock(&self.queue).waiting.len()
    }
}

/// A leader's turn: finishes what it took when dropped, with an error if
/// the write did not say how it went (a panic in between), so that the
/// callers waiting on it never wait for ever.
pub(crate) struct Leading<'a> {
    group: &'a Group,
    tickets: Option<Range<u64>>,
    finished: bool,
}

impl<'a> Leading<'a> {
    /// The caller that [`Group::wait`] told to lead.
    pub(crate) fn new(group: &'a Group) -> Self {
        Leading {
            group,
            tickets: None,
            finished: false,
        }
    }

    /// Takes the queued records (see [`Group::take`]).
    pub(crate) fn take(&mut self) -> Option<Taken> {
        let taken = self.group.take()?;
        self.tickets = Some(taken.tickets.clone());
        Some(taken)
    }

    /// Finishes the taken tickets with `result`.
    pub(crate) fn finish(mut self, result: Result<(), &EngineError>) {
        self.finished = true;
        match self.tickets.take() {
            Some(t) => self.group.finish(t, result),
            None => self.group.step_down(),
        }
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        match self.tickets.take() {
            Some(t) => self.group.finish(
                t,
                Err(&EngineError::LogIo(
                    "the Raft log write leading this group did not finish".to_string(),
                )),
            ),
            None => self.group.step_down(),
        }
    }
}
