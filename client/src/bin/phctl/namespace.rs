//! `phctl namespace`: namespaces' limits (docs/operations.md "Quotas").
//! Admin role on a TLS cluster.

use crate::commands::{connect, failed, Ctx, Failure};
use crate::{render, Output};
use pigeonhole_client::pb;
use serde_json::json;

/// Which `namespace` command.
#[derive(Debug, clap::Subcommand)]
pub enum NamespaceCommand {
    /// Make a namespace's record (unlimited unless limits are given).
    Create {
        name: String,
        /// Appends per second each node takes for it (0: unlimited).
        #[arg(long)]
        appends_per_s: Option<u32>,
        /// Payload bytes per second each node takes for it (0: unlimited).
        #[arg(long)]
        bytes_per_s: Option<u64>,
    },
    /// Change a namespace's limits (what is not given stays).
    Set {
        name: String,
        #[arg(long)]
        appends_per_s: Option<u32>,
        #[arg(long)]
        bytes_per_s: Option<u64>,
    },
    /// One namespace's record.
    Show { name: String },
    /// Every namespace's record.
    List,
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
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let mut t = render::table(&["namespace", "appends/s per node", "bytes/s per node"]);
            for n in list {
                t.add_row(vec![
                    n.name.clone(),
                    limit(u64::from(n.appends_per_s)),
                    limit(n.bytes_per_s),
                ]);
            }
            out!("{t}");
        }
    }
}

pub async fn run(ctx: &Ctx, command: NamespaceCommand) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    match command {
        NamespaceCommand::Create {
            name,
            appends_per_s,
            bytes_per_s,
        }
        | NamespaceCommand::Set {
            name,
            appends_per_s,
            bytes_per_s,
        } => {
            let r = client.set_namespace(&name, appends_per_s, bytes_per_s).await?;
            print(ctx, r.namespace.as_slice());
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
