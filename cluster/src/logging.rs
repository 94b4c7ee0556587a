//! Logs (issue 15, part 2; docs/operations.md "Logs"): `tracing` events,
//! written to stderr as text or as one JSON object per line
//! (`--log-format`), filtered by an `EnvFilter` directive (`--log-level`,
//! e.g. `info` or `info,raft=debug`) that an operator can change while the
//! node runs (`phctl node log-level`, Admin.SetLogLevel).
//!
//! raft-rs logs through `slog`; [`raft_logger`] forwards its records to
//! `tracing` under the target `raft`, so one filter and one format cover
//! both, and a record is formatted only if the filter lets it through.
//!
//! Every gRPC request runs in a `request` span (method, request id, and
//! the namespace and shard once routed; `crate::metrics`'s layer opens it),
//! so a line logged while serving it names the request.

use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `2026-12-05T18:00:00.000Z  INFO request{method=...}: message k=v`.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: text or json")),
        }
    }
}

/// The filter directive a node starts with unless told otherwise.
pub const DEFAULT_FILTER: &str = "info";
/// Filter directives, at most this long (they come over the wire too).
pub const FILTER_BYTES_MAX: usize = 1_024;

struct Installed {
    handle: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Mutex<String>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

fn parse(filter: &str) -> Result<EnvFilter, String> {
    if filter.len() > FILTER_BYTES_MAX {
        return Err(format!("filter: {} bytes; at most {FILTER_BYTES_MAX}", filter.len()));
    }
    EnvFilter::builder()
        .parse(filter)
        .map_err(|e| format!("filter {filter:?}: {e}"))
}

/// Installs the process's log subscriber (once; a second call is refused).
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let (layer, handle) = reload::Layer::new(parse(filter)?);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(layer);
    let installed = match format {
        LogFormat::Text => registry.with(fmt.with_ansi(false)).try_init(),
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
    installed.map_err(|e| format!("logging: {e}"))?;
    INSTALLED
        .set(Installed {
            handle,
            current: std::sync::Mutex::new(filter.to_string()),
        })
        .map_err(|_| "logging: initialised twice".to_string())
}

/// Replaces the filter; returns the one it replaces. Err if the directive
/// does not parse or no subscriber was installed by [`init`] (a node in a
/// test process).
pub fn set_filter(filter: &str) -> Result<String, String> {
    let parsed = parse(filter)?;
    let installed = INSTALLED
        .get()
        .ok_or_else(|| "this process logs through no reloadable filter".to_string())?;
    // Under the lock, so the filter reported is the one in force even when
    // two changes race.
    let mut current = installed
        .current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    installed
        .handle
        .reload(parsed)
        .map_err(|e| format!("filter {filter:?}: {e}"))?;
    Ok(std::mem::replace(&mut *current, filter.to_string()))
}

/// The filter in force, if [`init`] ran.
pub fn filter() -> Option<String> {
    INSTALLED.get().map(|i| {
        i.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    })
}

/// A `slog` logger for raft-rs whose records become `tracing` events under
/// the target `raft` (with the record's key-values in the message).
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}

/// Forwards slog records to tracing.
#[derive(Debug, Clone, Copy)]
struct TracingDrain;

/// Collects a record's key-values as ` k=v` text.
struct Kv(String);

impl slog::Serializer for Kv {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV as _;
        let level = match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::Level::ERROR,
            slog::Level::Warning => tracing::Level::WARN,
            slog::Level::Info => tracing::Level::INFO,
            slog::Level::Debug => tracing::Level::DEBUG,
            slog::Level::Trace => tracing::Level::TRACE,
        };
        // Format only what the filter lets through.
        macro_rules! forward {
            ($lvl:expr) => {
                if tracing::enabled!(target: "raft", $lvl) {
                    let mut kv = Kv(String::new());
                    let _ = record.kv().serialize(record, &mut kv);
                    let _ = values.serialize(record, &mut kv);
                    tracing::event!(target: "raft", $lvl, "{}{}", record.msg(), kv.0);
                }
            };
        }
        match level {
            tracing::Level::ERROR => forward!(tracing::Level::ERROR),
            tracing::Level::WARN => forward!(tracing::Level::WARN),
            tracing::Level::INFO => forward!(tracing::Level::INFO),
            tracing::Level::DEBUG => forward!(tracing::Level::DEBUG),
            _ => forward!(tracing::Level::TRACE),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_and_bounded() {
        assert!(parse("info,raft=debug,pigeonhole_cluster::driver=trace").is_ok());
        assert!(parse("info,raft=loud").is_err());
        assert!(parse(&"a".repeat(FILTER_BYTES_MAX + 1))
            .unwrap_err()
            .contains("at most"));
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
