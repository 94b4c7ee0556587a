//! `phctl auth`: identities, grants and bearer tokens (docs/security.md).
//! Every command needs the admin role: a `root` client certificate of the
//! cluster CA, or an identity granted admin on "*".

use crate::commands::{connect, Ctx, Failure};
use crate::{render, Output};
use pigeonhole_client::pb;
use serde_json::{json, Value};

/// Which `auth` command.
#[derive(Debug, clap::Subcommand)]
pub enum AuthCommand {
    /// Identities: create, delete, list.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Bearer tokens: create (the secret is printed once), revoke.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Give an identity a role on a namespace ("*": every namespace; admin
    /// only on "*"). Granting append on another app's namespace is how one
    /// app delivers into another's mailboxes.
    Grant {
        identity: String,
        #[arg(long)]
        namespace: String,
        /// append, read, trim or admin.
        #[arg(long)]
        role: String,
    },
    /// Take a role on a namespace away from an identity.
    Revoke {
        identity: String,
        #[arg(long)]
        namespace: String,
        /// append, read, trim or admin.
        #[arg(long)]
        role: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum IdentityCommand {
    /// Create an identity (no change if it exists). Its name is what its
    /// client certificate's common name must be, if it uses one.
    Create { name: String },
    /// Delete an identity with its grants and tokens.
    Delete { name: String },
    /// Every identity with its grants, and every token (never secrets).
    List,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// A new token for an identity; printed once, never shown again.
    Create {
        identity: String,
        /// Lifetime in seconds (0: never expires).
        #[arg(long, default_value_t = 0)]
        ttl_s: u64,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Revoke a token by its id (the part between "ph_" and the dot).
    Revoke { token_id: String },
}

fn parse_role(s: &str) -> Result<pb::Role, Failure> {
    match s {
        "append" => Ok(pb::Role::Append),
        "read" => Ok(pb::Role::Read),
        "trim" => Ok(pb::Role::Trim),
        "admin" => Ok(pb::Role::Admin),
        other => Err(crate::commands::failed(format!(
            "--role {other:?}: one of append, read, trim, admin"
        ))),
    }
}

fn role_name(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Append) => "append",
        Ok(pb::Role::Read) => "read",
        Ok(pb::Role::Trim) => "trim",
        Ok(pb::Role::Admin) => "admin",
        _ => "?",
    }
}

fn identity_json(i: &pb::Identity) -> Value {
    json!({
        "name": i.name,
        "grants": i.grants.iter().map(|g| json!({"namespace": g.namespace, "role": role_name(g.role)})).collect::<Vec<_>>(),
    })
}

fn grants_text(i: &pb::Identity) -> String {
    i.grants
        .iter()
        .map(|g| format!("{}:{}", g.namespace, role_name(g.role)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_identity(ctx: &Ctx, i: &pb::Identity) {
    match ctx.output {
        Output::Json => render::json(&identity_json(i)),
        Output::Table => out!("{}  {}", i.name, grants_text(i)),
    }
}

pub async fn run(ctx: &Ctx, command: AuthCommand) -> Result<u8, Failure> {
    let client = connect(ctx).await?;
    match command {
        AuthCommand::Identity {
            command: IdentityCommand::Create { name },
        } => {
            let r = client.put_identity(&name).await?;
            if let Some(i) = r.identity {
                print_identity(ctx, &i);
            }
        }
        AuthCommand::Identity {
            command: IdentityCommand::Delete { name },
        } => {
            let r = client.delete_identity(&name).await?;
            match ctx.output {
                Output::Json => render::json(&json!({"deleted": name, "tokens_revoked": r.tokens_revoked})),
                Output::Table => out!("deleted {name} and {} token(s)", r.tokens_revoked),
            }
        }
        AuthCommand::Identity {
            command: IdentityCommand::List,
        } => {
            let a = client.auth().await?;
            match ctx.output {
                Output::Json => render::json(&json!({
                    "identities": a.identities.iter().map(identity_json).collect::<Vec<_>>(),
                    "tokens": a.tokens.iter().map(|t| json!({
                        "token_id": t.token_id, "identity": t.identity,
                        "created_unix_ms": t.created_unix_ms, "expires_unix_ms": t.expires_unix_ms,
                        "description": t.description,
                    })).collect::<Vec<_>>(),
                })),
                Output::Table => {
                    let mut t = render::table(&["identity", "grants", "tokens"]);
                    for i in &a.identities {
                        let tokens: Vec<&str> = a
                            .tokens
                            .iter()
                            .filter(|t| t.identity == i.name)
                            .map(|t| t.token_id.as_str())
                            .collect();
                        t.add_row(vec![i.name.clone(), grants_text(i), tokens.join(" ")]);
                    }
                    out!("{t}");
                }
            }
        }
        AuthCommand::Grant {
            identity,
            namespace,
            role,
        } => {
            let i = client.grant(&identity, &namespace, parse_role(&role)?).await?;
            print_identity(ctx, &i);
        }
        AuthCommand::Revoke {
            identity,
            namespace,
            role,
        } => {
            let i = client.revoke(&identity, &namespace, parse_role(&role)?).await?;
            print_identity(ctx, &i);
        }
        AuthCommand::Token {
            command:
                TokenCommand::Create {
                    identity,
                    ttl_s,
                    description,
                },
        } => {
            let r = client.create_token(&identity, ttl_s, &description).await?;
            match ctx.output {
                Output::Json => render::json(&json!({
                    "token": r.token,
                    "token_id": r.info.as_ref().map(|i| i.token_id.clone()),
                    "identity": identity,
                })),
                // The token alone on its line, for `$(phctl auth token create ...)`.
                Output::Table => out!("{}", r.token),
            }
        }
        AuthCommand::Token {
            command: TokenCommand::Revoke { token_id },
        } => {
            client.revoke_token(&token_id).await?;
            match ctx.output {
                Output::Json => render::json(&json!({"revoked": token_id})),
                Output::Table => out!("revoked token {token_id}"),
            }
        }
    }
    Ok(0)
}
