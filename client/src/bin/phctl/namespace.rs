//! `phctl namespace`: namespaces' limits and retention policies, and
//! mailboxes' legal holds (docs/operations.md "Quotas", "Retention").
//! Admin role on a TLS cluster.

use crate::commands::{connect, failed, Ctx, Failure};
use crate::{render, Output};
use pigeonhole_client::pb;
use serde_json::json;

/// Which `namespace` command.
#[derive(Debug, clap::Subcommand)]
pub enum NamespaceCommand {
    /// Make a namespace's record (unlimited, keeping everything, unless
    /// fields are given).
    Create {
        name: String,
        #[command(flatten)]
        fields: Fields,
    },
    /// Change a namespace's limits or retention (what is not given stays).
    Set {
        name: String,
        #[command(flatten)]
        fields: Fields,
    },
    /// Put one mailbox under a legal hold (or release it with --release):
    /// its trims and deletes are refused and retention passes it over.
    Hold {
        name: String,
        /// The mailbox's user id (UTF-8).
        user_id: String,
        #[arg(long)]
        release: bool,
    },
    /// One namespace's record.
    Show { name: String },
    /// Every namespace's record.
    List,
}

/// A namespace's settable fields (docs/operations.md "Quotas" and
/// "Retention"); each one not given keeps its value.
#[derive(Debug, clap::Args)]
pub struct Fields {
    /// Appends per second each node takes for it (0: unlimited).
    #[arg(long)]
    appends_per_s: Option<u32>,
    /// Payload bytes per second each node takes for it (0: unlimited).
    #[arg(long)]
    bytes_per_s: Option<u64>,
    /// Trim messages older than this many seconds (0: no TTL).
    #[arg(long)]
    ttl_s: Option<u64>,
    /// Keep at most this many messages per mailbox (0: no maximum).
    #[arg(long)]
    messages_per_mailbox_max: Option<u64>,
    /// Trim what every device with a cursor has acked.
    #[arg(long)]
    trim_acked: Option<bool>,
    /// Suspend all trimming in the namespace (retention, Trim, Delete).
    #[arg(long)]
    legal_hold: Option<bool>,
    /// Seconds an idempotency key keeps deduplicating after its message
    /// is trimmed or deleted (0: the default, 7 days).
    #[arg(long)]
    dedup_window_s: Option<u64>,
    /// Refuse appends while the namespace stores this many bytes or more
    /// (counted, see docs/operations.md "Quotas"; 0: unlimited).
    #[arg(long)]
    storage_bytes_max: Option<u64>,
}

impl Fields {
    fn request(self, name: String) -> pb::SetNamespaceRequest {
        pb::SetNamespaceRequest {
            name,
            appends_per_s: self.appends_per_s,
            bytes_per_s: self.bytes_per_s,
            ttl_ms: self.ttl_s.map(|s| s.saturating_mul(1_000)),
            messages_per_mailbox_max: self.messages_per_mailbox_max,
            trim_acked: self.trim_acked,
            legal_hold: self.legal_hold,
            dedup_window_ms: self.dedup_window_s.map(|s| s.saturating_mul(1_000)),
            storage_bytes_max: self.storage_bytes_max,
        }
    }
}

fn limit(v: u64) -> String {
    if v == 0 {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

fn print(ctx: &Ctx, list: &[pb::NamespaceInfo]) {
    match ctx.output {
        Output::Json => render::json(&json!({
            "namespaces": list.iter().map(|n| json!({
                "name": n.name, "appends_per_s": n.appends_per_s, "bytes_per_s": n.bytes_per_s,
                "ttl_ms": n.ttl_ms, "messages_per_mailbox_max": n.messages_per_mailbox_max,
                "trim_acked": n.trim_acked, "legal_hold": n.legal_hold, "dedup_window_ms": n.dedup_window_ms,
                "storage_bytes_max": n.storage_bytes_max, "stored_bytes": n.stored_bytes,
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let mut t = render::table(&[
                "namespace",
                "appends/s per node",
                "bytes/s per node",
                "stored bytes",
                "storage max",
                "ttl",
                "messages per mailbox",
                "trim acked",
                "legal hold",
                "dedup window",
            ]);
            let secs = |ms: u64, zero: &str| {
                if ms == 0 {
                    zero.to_string()
                } else {
                    format!("{} s", ms / 1_000)
                }
            };
            for n in list {
                t.add_row(vec![
                    n.name.clone(),
                    limit(u64::from(n.appends_per_s)),
                    limit(n.bytes_per_s),
                    n.stored_bytes.to_string(),
                    limit(n.storage_bytes_max),
                    secs(n.ttl_ms, "none"),
                    limit(n.messages_per_mailbox_max),
                    if n.trim_acked { "yes" } else { "no" }.into(),
                    if n.legal_hold { "HELD" } else { "no" }.into(),
                    secs(n.dedup_window_ms, "default"),
                ]);
            }
            out!("{t}");
        }
    }
}

pub async fn run(ctx: &Ctx, command: NamespaceCommand) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    match command {
        NamespaceCommand::Create { name, fields } | NamespaceCommand::Set { name, fields } => {
            let r = client.set_namespace_fields(fields.request(name)).await?;
            print(ctx, r.namespace.as_slice());
        }
        NamespaceCommand::Hold { name, user_id, release } => {
            let r = client.set_mailbox_hold(&name, user_id.as_bytes(), !release).await?;
            match ctx.output {
                Output::Json => render::json(&json!({"held": r.held, "changed": r.changed})),
                Output::Table => out!(
                    "mailbox {name}/{user_id}: {}{}",
                    if r.held { "held" } else { "not held" },
                    if r.changed { "" } else { " (unchanged)" }
                ),
            }
        }
        NamespaceCommand::Show { name } => {
            let all = client.namespaces().await?;
            let one: Vec<pb::NamespaceInfo> = all.into_iter().filter(|n| n.name == name).collect();
            if one.is_empty() {
                return Err(failed(format!("namespace {name:?} has no record (it has no limits)")));
            }
            print(ctx, &one);
        }
        NamespaceCommand::List => print(ctx, &client.namespaces().await?),
    }
    Ok(0)
}
