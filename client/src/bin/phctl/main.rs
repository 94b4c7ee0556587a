//! `phctl`: the Pigeonhole admin CLI. This file only parses flags and maps
//! outcomes to exit codes; the commands are in `commands.rs`, the rendering
//! (table or JSON) in `render.rs`.
//!
//! Exit codes, for scripts (also in docs/operations.md):
//! - 0: done;
//! - 1: the cluster refused the request, or the thing asked for does not
//!   exist (a bad shard id, a trimmed mailbox under `tail`);
//! - 2: bad usage (clap's own code for flag errors);
//! - 3: the cluster could not be reached, or did not answer in time;
//! - 4: `cluster status` only: the cluster answered but is degraded (a node
//!   down, or a shard without a leader).

/// `println!` that ends the process quietly when stdout is closed (e.g.
/// `phctl ... | head`) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::render::line(&format!($($arg)*))
    };
}

mod auth;
mod backup;
mod balance;
mod commands;
mod health;
mod moves;
mod namespace;
mod nodes;
mod render;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

/// Exit code: the cluster refused the request, or the object does not exist.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad flags (as clap's own usage errors).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the cluster was unreachable or did not answer in time.
pub const EXIT_UNAVAILABLE: u8 = 3;
/// Exit code: `cluster status` found the cluster degraded.
pub const EXIT_DEGRADED: u8 = 4;

/// Look at and steer a Pigeonhole cluster.
#[derive(Debug, Parser)]
#[command(name = "phctl", version)]
struct Cli {
    /// Any nodes of the cluster, host:port, comma-separated; one live node
    /// is enough.
    #[arg(
        long,
        env = "PIGEONHOLE_ENDPOINTS",
        default_value = "127.0.0.1:7070",
        value_delimiter = ',',
        global = true
    )]
    endpoints: Vec<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Deadline of each request to the cluster, retries included, in ms.
    #[arg(long, default_value_t = 5_000, global = true)]
    timeout_ms: u64,
    /// Talk TLS: the CA (PEM) the nodes' certificates must chain to.
    #[arg(long, env = "PIGEONHOLE_CLIENT_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), to authenticate by it (mTLS).
    #[arg(long, env = "PIGEONHOLE_CLIENT_TLS_CERT", global = true)]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "PIGEONHOLE_CLIENT_TLS_KEY", global = true)]
    tls_key: Option<std::path::PathBuf>,
    /// A bearer token (from `phctl auth token create`), instead of a client
    /// certificate. Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "PIGEONHOLE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// JSON (one document; `mailbox tail` prints one object per line).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The cluster as a whole.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Nodes: list, and their life cycle (drain, undrain, remove).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Shards (Raft groups).
    Shard {
        #[command(subcommand)]
        command: ShardCommand,
    },
    /// One user's mailbox.
    Mailbox {
        #[command(subcommand)]
        command: MailboxCommand,
    },
    /// Access control: identities, grants, bearer tokens (admin role).
    Auth {
        #[command(subcommand)]
        command: auth::AuthCommand,
    },
    /// Namespaces: limits, retention policies, legal holds.
    Namespace {
        #[command(subcommand)]
        command: namespace::NamespaceCommand,
    },
    /// Backups: take one while the cluster serves, check one offline
    /// (`pigeonhole restore --from DIR` seeds a new cluster from it).
    Backup {
        #[command(subcommand)]
        command: backup::BackupCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Nodes, health, version, replica and leader counts, metadata-group
    /// term and applied index. Exits 4 when degraded.
    Status,
    /// The servers' placement loop: replicas and leaderships per node, the
    /// replica moves in flight (with progress), and the plan. --wait
    /// follows the loop until the cluster is balanced; --apply makes the
    /// planned moves from phctl while the loop is paused.
    Balance {
        /// Make the planned moves from phctl (the loop must be paused).
        #[arg(long)]
        apply: bool,
        /// Wait until the placement loop reports balance (and leaderships
        /// are within one per node), printing progress.
        #[arg(long)]
        wait: bool,
        /// Moves at once with --apply, 1 to 16.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// How long --apply or --wait may take, in ms.
        #[arg(long, default_value_t = 600_000)]
        wait_ms: u64,
    },
    /// The placement loop's settings: pause it (no new moves; moves in
    /// flight finish), resume it, or set its moves at once (1 to 64).
    /// Prints the settings.
    Placement {
        #[arg(long)]
        pause: bool,
        #[arg(long)]
        resume: bool,
        #[arg(long)]
        moves_max: Option<u32>,
        /// Split a shard automatically once its leader counts this many
        /// bytes (e.g. 512MiB, 2GiB; at least 1MiB), or `off`.
        #[arg(long)]
        split_size: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Every node: address, state (up, draining, removed), whether it
    /// answers, and the data-shard replicas and leaderships it holds.
    List,
    /// Mark a node draining (it takes no new replica or leadership), then
    /// move its leaderships and then its replicas to the up nodes with the
    /// fewest replicas. Running it again finishes a drain cut short.
    Drain {
        /// The node id.
        id: u64,
        /// How long the whole drain may take, in ms.
        #[arg(long, default_value_t = 600_000)]
        wait_ms: u64,
        /// Move only the leaderships; the replicas stay. For a restart (a
        /// rolling restart, maintenance): the node's shards keep a quorum
        /// on the others while it is down, and no data moves.
        #[arg(long)]
        leaders_only: bool,
    },
    /// Ask the first endpoint's node whether it serves (grpc.health.v1
    /// Check of pigeonhole.v1.Mailbox): exit 0 if SERVING, 1 if not or no
    /// answer. For container and load-balancer health checks.
    Health,
    /// Change one node's log filter while it runs: a level (`debug`) or
    /// per-target directives (`info,raft=debug`). Not kept across a
    /// restart (start with --log-level for that).
    LogLevel {
        /// The node id.
        id: u64,
        /// The new filter.
        filter: String,
    },
    /// A node's replicas that are catching up after damage to its storage
    /// (they do not vote until they hold what their shard had committed;
    /// docs/operations.md "Disk damage"): why, and how far each has come.
    /// Exit 0 when none is, 1 when some are. With --accept-loss SHARD, the
    /// way out when two replicas of a shard were damaged at once and it
    /// has no leader: that replica votes again at once, and writes it lost
    /// may be lost for good.
    Repair {
        /// The node id.
        id: u64,
        /// Clear this shard's catching-up mark on the node.
        #[arg(long, value_name = "SHARD")]
        accept_loss: Option<u64>,
    },
    /// Mark a draining node up again (its replicas stay where they went).
    Undrain {
        /// The node id.
        id: u64,
    },
    /// Take a node out of the cluster for good. Refused while it holds a
    /// replica of any data shard: drain it first, or, for a node that is
    /// dead, give --force to rebuild its replicas elsewhere first.
    Remove {
        /// The node id.
        id: u64,
        /// The node does not answer: rebuild each of its replicas on another
        /// node from the survivors, then remove it.
        #[arg(long)]
        force: bool,
        /// With --force: how long the rebuilds may take, in ms.
        #[arg(long, default_value_t = 600_000)]
        wait_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ShardCommand {
    /// Every data shard: range, replicas, leader, term, applied index, size.
    List,
    /// One shard, replica by replica.
    Show {
        /// The shard id.
        id: u64,
    },
    /// Hand a shard's leadership to another of its voters, and wait for it.
    TransferLeader {
        /// The shard id.
        id: u64,
        /// The node to lead next.
        #[arg(long)]
        to: u64,
        /// How long to wait for the new leader, in ms (0 = do not wait).
        #[arg(long, default_value_t = 10_000)]
        wait_ms: u64,
    },
    /// Move one replica of a shard to another node, online: add a learner,
    /// let it catch up, move leadership away if needed, then promote it and
    /// remove the old replica in one joint change. Running it again
    /// finishes a move that was cut short.
    Move {
        /// The shard id.
        id: u64,
        /// The node whose replica moves.
        #[arg(long)]
        from: u64,
        /// The node that gets it.
        #[arg(long)]
        to: u64,
        /// How long the whole move may take, in ms.
        #[arg(long, default_value_t = 120_000)]
        wait_ms: u64,
    },
    /// Split a shard in place: the upper part of its hash range becomes a
    /// new shard on the same replicas. No mailbox data is copied.
    Split {
        /// The shard id.
        id: u64,
        /// The first hash of the new shard (decimal or 0x-hex); default:
        /// the middle of the shard's range.
        #[arg(long, value_parser = parse_hash)]
        at: Option<u64>,
    },
}

/// A hash in decimal or 0x-prefixed hex.
fn parse_hash(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a 64-bit hash ({e})"))
}

/// Which mailbox: a namespace and a user id.
#[derive(Debug, clap::Args)]
pub struct MailboxArgs {
    /// The namespace (app), e.g. messenger.
    pub namespace: String,
    /// The user id (UTF-8 text, or hex with --user-hex).
    pub user: String,
    /// The user id is hex.
    #[arg(long)]
    pub user_hex: bool,
}

#[derive(Debug, Subcommand)]
enum MailboxCommand {
    /// Last seq, low watermark, device cursors.
    Show {
        #[command(flatten)]
        mailbox: MailboxArgs,
    },
    /// Follow new messages (Ctrl-C to stop). Resumes across node failures.
    Tail {
        #[command(flatten)]
        mailbox: MailboxArgs,
        /// Start after this seq (default: the current last seq, i.e. only
        /// new messages).
        #[arg(long)]
        from: Option<u64>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let tls = match pigeonhole_tls::TlsFiles::from_flags(cli.tls_ca, cli.tls_cert, cli.tls_key) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("phctl: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let ctx = commands::Ctx {
        tls,
        token: cli.token,
        endpoints: cli.endpoints,
        output: cli.output,
        timeout: std::time::Duration::from_millis(cli.timeout_ms),
    };
    let result = match cli.command {
        Command::Cluster {
            command: ClusterCommand::Status,
        } => commands::cluster_status(&ctx).await,
        Command::Cluster {
            command:
                ClusterCommand::Balance {
                    apply,
                    wait,
                    concurrency,
                    wait_ms,
                },
        } => {
            balance::balance(
                &ctx,
                apply,
                wait,
                concurrency,
                std::time::Duration::from_millis(wait_ms),
            )
            .await
        }
        Command::Cluster {
            command:
                ClusterCommand::Placement {
                    pause,
                    resume,
                    moves_max,
                    split_size,
                },
        } => balance::placement(&ctx, pause, resume, moves_max, split_size).await,
        Command::Node { command } => match command {
            NodeCommand::List => nodes::node_list(&ctx).await,
            NodeCommand::Health => health::check(&ctx).await,
            NodeCommand::LogLevel { id, filter } => health::log_level(&ctx, id, &filter).await,
            NodeCommand::Repair { id, accept_loss } => health::repair(&ctx, id, accept_loss).await,
            NodeCommand::Drain {
                id,
                wait_ms,
                leaders_only,
            } => nodes::node_drain(&ctx, id, std::time::Duration::from_millis(wait_ms), leaders_only).await,
            NodeCommand::Undrain { id } => nodes::node_set(&ctx, id, pigeonhole_client::pb::NodeState::Up).await,
            NodeCommand::Remove { id, force: false, .. } => {
                nodes::node_set(&ctx, id, pigeonhole_client::pb::NodeState::Removed).await
            }
            NodeCommand::Remove {
                id,
                force: true,
                wait_ms,
            } => nodes::node_remove_dead(&ctx, id, std::time::Duration::from_millis(wait_ms)).await,
        },
        Command::Shard { command } => match command {
            ShardCommand::List => commands::shard_list(&ctx).await,
            ShardCommand::Show { id } => commands::shard_show(&ctx, id).await,
            ShardCommand::TransferLeader { id, to, wait_ms } => {
                commands::transfer_leader(&ctx, id, to, std::time::Duration::from_millis(wait_ms)).await
            }
            ShardCommand::Move { id, from, to, wait_ms } => {
                moves::shard_move(&ctx, id, from, to, std::time::Duration::from_millis(wait_ms)).await
            }
            ShardCommand::Split { id, at } => commands::shard_split(&ctx, id, at).await,
        },
        Command::Auth { command } => auth::run(&ctx, command).await,
        Command::Namespace { command } => namespace::run(&ctx, command).await,
        Command::Backup { command } => backup::run(&ctx, command).await,
        Command::Mailbox { command } => match command {
            MailboxCommand::Show { mailbox } => commands::mailbox_show(&ctx, &mailbox).await,
            MailboxCommand::Tail { mailbox, from, count } => commands::mailbox_tail(&ctx, &mailbox, from, count).await,
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("phctl: {}", e.message);
            ExitCode::from(e.exit)
        }
    }
}
