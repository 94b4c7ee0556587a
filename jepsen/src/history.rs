//! The history: every operation's invoke and completion, and every nemesis
//! event, in the order they happened, as JSON lines.
//!
//! The shape follows Jepsen's: a client operation is an `invoke` followed,
//! on the same process, by exactly one completion — `ok` (it happened),
//! `fail` (it definitely did not), or `info` (unknown: a timeout or a lost
//! connection; the operation may or may not have taken effect). Times are
//! nanoseconds on one monotonic clock, so real-time order is comparable
//! across processes.

use serde::{Deserialize, Serialize};

/// Invocation or completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The operation starts.
    Invoke,
    /// It took effect.
    Ok,
    /// It definitely did not take effect.
    Fail,
    /// Unknown whether it took effect.
    Info,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum F {
    /// Append `payload` with idempotency key `key`.
    Append,
    /// One Sync page after `after_seq`.
    Sync,
    /// The whole mailbox from seq 0 (several pages).
    Read,
    /// Move `device`'s cursor to `seq`.
    Ack,
    /// One event a Subscribe stream delivered: `messages` of `mailbox`,
    /// after the reader's cursor `after_seq` (recorded as an invoke and an
    /// `ok` at once).
    Deliver,
    /// A Subscribe stream ended (or could not start): an invoke and an
    /// `info` with the error, recorded when it happened; the reader then
    /// resumes from its cursors, on the next node.
    Subscribe,
    /// A fault starts or ends.
    Nemesis,
}

/// A message as a read saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msg {
    /// Its seq.
    pub seq: u64,
    /// Its idempotency key.
    pub key: String,
    /// Its payload (the workload's payloads are text).
    pub payload: String,
    /// Its commit time as the server stamped it (ms since the epoch).
    #[serde(default)]
    pub timestamp_ms: u64,
}

/// The process id of the nemesis.
pub const NEMESIS: u64 = u64::MAX;

/// One history event. Fields that an operation does not use are absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Position in the history.
    pub index: u64,
    /// Monotonic time, ns since the run started.
    pub time_ns: u64,
    /// The client process ([`NEMESIS`] for the nemesis).
    pub process: u64,
    /// The node the process talks to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// Invoke or completion.
    pub kind: Kind,
    /// The operation.
    pub f: F,
    /// `namespace/user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<String>,
    /// Append: idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Append: payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Append ok: the seq; Ack invoke: the acked seq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Append ok: whether the server called it a duplicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
    /// Sync: the cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
    /// Sync / Read ok: what was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Msg>>,
    /// Sync / Read ok: the mailbox's last seq as the server reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Ack: the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Ack ok: the cursor after the ack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<u64>,
    /// Fail / info: the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Nemesis: what it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nemesis: Option<String>,
}

impl Op {
    /// An event with only the required fields set.
    pub fn new(process: u64, kind: Kind, f: F) -> Op {
        Op {
            index: 0,
            time_ns: 0,
            process,
            node: None,
            kind,
            f,
            mailbox: None,
            key: None,
            payload: None,
            seq: None,
            duplicate: None,
            after_seq: None,
            messages: None,
            last_seq: None,
            device: None,
            cursor: None,
            error: None,
            nemesis: None,
        }
    }
}

/// A client call: an invoke and its completion (None if the run ended
/// first, which counts as `info`).
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// The invoke.
    pub invoke: &'a Op,
    /// The completion.
    pub done: Option<&'a Op>,
}

impl Call<'_> {
    /// The completion kind (`Info` when there is none).
    pub fn kind(&self) -> Kind {
        self.done.map_or(Kind::Info, |d| d.kind)
    }

    /// Completion time (`u64::MAX` when there is none: it may take effect
    /// any time after its invoke).
    pub fn done_ns(&self) -> u64 {
        self.done.map_or(u64::MAX, |d| d.time_ns)
    }
}

/// Pairs every client invoke with the next completion of its process.
/// Errors on a malformed history (a completion without an invoke, or two
/// invokes in a row on one process).
pub fn calls(history: &[Op]) -> Result<Vec<Call<'_>>, String> {
    let mut open: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut out: Vec<Call<'_>> = Vec::new();
    for op in history.iter().filter(|o| o.process != NEMESIS) {
        match op.kind {
            Kind::Invoke => {
                if let Some(i) = open.get(&op.process) {
                    return Err(format!(
                        "process {} invoked op {} before op {} completed",
                        op.process, op.index, i
                    ));
                }
                open.insert(op.process, out.len());
                out.push(Call { invoke: op, done: None });
            }
            _ => {
                let i = open
                    .remove(&op.process)
                    .ok_or_else(|| format!("op {} completes nothing on process {}", op.index, op.process))?;
                if let Some(c) = out.get_mut(i) {
                    if c.invoke.f != op.f {
                        return Err(format!("op {} completes a different operation", op.index));
                    }
                    c.done = Some(op);
                }
            }
        }
    }
    Ok(out)
}

/// Reads a JSON-lines history.
pub fn parse(text: &str) -> Result<Vec<Op>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("history line {}: {e}", i + 1)))
        .collect()
}
