//! `phctl backup`: take a backup of a serving cluster, and check one
//! offline (docs/operations.md "Backup and restore"; the format is the
//! `pigeonhole-backup` crate's). `pigeonhole restore` reads it into a new
//! cluster.
//!
//! `create` asks one replica of each shard (the leader first) for its
//! state (`Admin.BackupShard`: a read barrier, then one snapshot at one
//! applied index) and writes it as it streams, checking every frame. A
//! split during the backup would leave two shards each at their own index
//! with overlapping data; it is detected (the exported range differs from
//! the map's, or the map changed) and the backup fails rather than write
//! a manifest. The manifest goes last: a directory without one is not a
//! backup.

use crate::commands::{connect, failed, Ctx, Failure};
use crate::{render, Output, EXIT_FAILED, EXIT_UNAVAILABLE};
use indicatif::{ProgressBar, ProgressStyle};
use pigeonhole_backup::{Manifest, ShardEntry, ShardFileWriter, FORMAT, FORMAT_VERSION};
use pigeonhole_client::{pb, Client, Error};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The shortest wait for the next message of a shard's export (the first
/// one waits for the read barrier too).
const MESSAGE_WAIT_MIN: Duration = Duration::from_secs(10);

/// Which `backup` command.
#[derive(Debug, clap::Subcommand)]
pub enum BackupCommand {
    /// Back up every shard, the metadata group included, while the cluster
    /// serves: each shard at one applied index that holds every write
    /// acknowledged before the command started. DIR must be empty or
    /// absent.
    Create {
        /// The directory to write.
        #[arg(long)]
        to: PathBuf,
        /// Bytes per streamed chunk (up to 16 MiB).
        #[arg(long, default_value_t = 1 << 20)]
        chunk_bytes: u32,
    },
    /// Check a backup offline: the manifest's checksum and structure, and
    /// every shard file's size, SHA-256, chunk crcs and chunk headers.
    /// Exits 1 if anything is wrong, naming the file.
    Verify {
        /// The backup directory.
        dir: PathBuf,
    },
}

pub async fn run(ctx: &Ctx, cmd: BackupCommand) -> Result<u8, Failure> {
    match cmd {
        BackupCommand::Create { to, chunk_bytes } => create(ctx, &to, chunk_bytes).await,
        BackupCommand::Verify { dir } => verify(ctx, &dir),
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(&format!(
        "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what} {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    // Drawn on stderr, and only when it is a terminal.
    ProgressBar::new(len).with_style(style)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// (id, range, epoch) of every shard: what must not change during a backup.
fn layout(map: &pb::GetShardMapResponse) -> Vec<(u64, u64, Option<u64>, u64)> {
    let mut v: Vec<_> = map
        .shards
        .iter()
        .map(|s| (s.id, s.range_start, s.range_end, s.epoch))
        .collect();
    v.sort_unstable();
    v
}

async fn create(ctx: &Ctx, to: &Path, chunk_bytes: u32) -> Result<u8, Failure> {
    if std::fs::read_dir(to).map(|mut d| d.next().is_some()).unwrap_or(false) {
        return Err(failed(format!(
            "{} is not empty: a backup goes into a new directory",
            to.display()
        )));
    }
    pigeonhole_backup::create_backup_dir(to).map_err(|e| failed(e.to_string()))?;
    let started = Instant::now();
    let started_unix_ms = unix_ms();
    let client = connect(ctx).await?;
    let map = client.shard_map().await?;
    // The metadata group first: every node holds a replica of it.
    let mut jobs: Vec<(pb::ShardInfo, Vec<u64>)> = vec![(
        pb::ShardInfo {
            id: 0,
            ..Default::default()
        },
        map.nodes.iter().map(|n| n.id).collect(),
    )];
    for s in &map.shards {
        let mut nodes = vec![s.leader_hint];
        nodes.extend(s.replicas.iter().chain(&s.learners).copied());
        let mut seen = std::collections::BTreeSet::new();
        nodes.retain(|n| *n != 0 && seen.insert(*n));
        jobs.push((s.clone(), nodes));
    }
    let progress = bar(jobs.len() as u64, "shards");
    let mut entries = Vec::with_capacity(jobs.len());
    let mut total_bytes = 0u64;
    for (info, nodes) in &jobs {
        let entry = backup_one(ctx, &client, to, info, nodes, chunk_bytes)
            .await
            .inspect_err(|_| {
                progress.abandon();
            })?;
        total_bytes += entry.bytes;
        progress.set_message(render::size(total_bytes));
        progress.inc(1);
        entries.push(entry);
    }
    progress.finish_and_clear();
    let after = client.shard_map().await?;
    if layout(&after) != layout(&map) {
        return Err(failed(
            "the shard map changed during the backup (a split): it is not consistent; run it again into an empty directory"
                .into(),
        ));
    }
    let bootstrap_shard_count = map.shards.iter().filter(|s| s.parent == 0).count() as u64;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        started_unix_ms,
        completed_unix_ms: unix_ms(),
        bootstrap_shard_count,
        shards: entries,
    };
    manifest.write(to).map_err(|e| failed(e.to_string()))?;
    let records: u64 = manifest.shards.iter().map(|s| s.records).sum();
    let v = json!({
        "dir": to.display().to_string(),
        "shards": manifest.shards.len(),
        "records": records,
        "bytes": total_bytes,
        "bootstrap_shard_count": bootstrap_shard_count,
        "seconds": started.elapsed().as_secs_f64(),
    });
    match ctx.output {
        Output::Json => render::json(&v),
        Output::Table => out!(
            "backup of {} shards ({records} records, {}) written to {} in {:.1} s; restore with --shards {bootstrap_shard_count}",
            manifest.shards.len(),
            render::size(total_bytes),
            to.display(),
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(0)
}

/// One shard's file, from the first of `nodes` that can serve it.
async fn backup_one(
    ctx: &Ctx,
    client: &Client,
    dir: &Path,
    info: &pb::ShardInfo,
    nodes: &[u64],
    chunk_bytes: u32,
) -> Result<ShardEntry, Failure> {
    let mut last_err = None;
    for &node in nodes {
        match export(ctx, client, dir, info, node, chunk_bytes).await {
            Ok(e) => return Ok(e),
            // A node that cannot serve it now: the next replica may.
            Err(Export::Retry(msg)) => last_err = Some(format!("node {node}: {msg}")),
            Err(Export::Fatal(f)) => return Err(f),
        }
    }
    Err(Failure {
        message: format!(
            "shard {}: no replica could export it ({})",
            info.id,
            last_err.unwrap_or_else(|| "no replica known".into())
        ),
        exit: EXIT_UNAVAILABLE,
    })
}

enum Export {
    Retry(String),
    Fatal(Failure),
}

async fn export(
    ctx: &Ctx,
    client: &Client,
    dir: &Path,
    info: &pb::ShardInfo,
    node: u64,
    chunk_bytes: u32,
) -> Result<ShardEntry, Export> {
    let wait = ctx.timeout.max(MESSAGE_WAIT_MIN);
    // NOT_FOUND is not final: a replica whose map does not know the shard
    // yet (a split's new shard) says so; another replica may serve it.
    let retry = |e: Error| match &e {
        Error::Rejected(s)
            if matches!(
                s.code(),
                tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ) =>
        {
            Export::Fatal(failed(format!("shard {}: {}", info.id, s.message())))
        }
        _ => Export::Retry(e.to_string()),
    };
    let mut stream = client.backup_shard(node, info.id, chunk_bytes).await.map_err(retry)?;
    let fatal = |e: pigeonhole_backup::BackupError| Export::Fatal(failed(e.to_string()));
    let mut file = ShardFileWriter::create(dir, info.id).map_err(fatal)?;
    let summary = loop {
        let msg = match tokio::time::timeout(wait, stream.message()).await {
            Err(_) => return Err(Export::Retry(format!("no message for {} ms", wait.as_millis()))),
            Ok(Err(s)) => return Err(retry(Error::Rejected(s))),
            Ok(Ok(None)) => return Err(Export::Retry("the stream ended before its summary".into())),
            Ok(Ok(Some(m))) => m,
        };
        // The node checked each chunk as it read it; a frame spoiled on
        // the way is caught here, and another replica is asked.
        file.push(&msg.frame)
            .map_err(|e| Export::Retry(format!("a bad frame: {e}")))?;
        if let Some(s) = msg.summary {
            break s;
        }
    };
    let written = file.finish().map_err(|e| Export::Retry(e.to_string()))?;
    if (summary.chunks, summary.records) != (written.chunks, written.records) {
        return Err(Export::Retry(format!(
            "the node sent {} chunks and {} records, its summary says {} and {}",
            written.chunks, written.records, summary.chunks, summary.records
        )));
    }
    // The state holds rows of its filter range only (the whole space for a
    // bootstrap shard never split); a split narrows it past the map's.
    let covers = summary.range_start <= info.range_start
        && match (summary.range_end, info.range_end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a >= b,
        };
    if info.id != 0 && !covers {
        return Err(Export::Fatal(failed(format!(
            "shard {} was split during the backup (its state holds [{}, {:?}), less than the map's [{}, {:?})): run it again into an empty directory",
            info.id, summary.range_start, summary.range_end, info.range_start, info.range_end
        ))));
    }
    Ok(ShardEntry {
        id: info.id,
        range_start: if info.id == 0 { 0 } else { info.range_start },
        range_end: if info.id == 0 { None } else { info.range_end },
        epoch: info.epoch,
        parent: info.parent,
        applied_index: written.applied_index,
        applied_term: written.applied_term,
        chunks: written.chunks,
        records: written.records,
        bytes: written.bytes,
        sha256: written.sha256,
    })
}

fn verify(ctx: &Ctx, dir: &Path) -> Result<u8, Failure> {
    let manifest = Manifest::load(dir).map_err(|e| failed(e.to_string()))?;
    let total: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    let progress = bar(total, "bytes");
    let report = pigeonhole_backup::verify(dir, |s| progress.inc(s.bytes)).map_err(|e| {
        progress.abandon();
        Failure {
            message: e.to_string(),
            exit: EXIT_FAILED,
        }
    })?;
    progress.finish_and_clear();
    let v = json!({
        "dir": dir.display().to_string(),
        "ok": true,
        "shards": report.shards,
        "chunks": report.chunks,
        "records": report.records,
        "bytes": report.bytes,
        "bootstrap_shard_count": manifest.bootstrap_shard_count,
        "applied": manifest.shards.iter().map(|s| json!({"shard": s.id, "index": s.applied_index, "term": s.applied_term})).collect::<Vec<_>>(),
    });
    match ctx.output {
        Output::Json => render::json(&v),
        Output::Table => out!(
            "backup in {} is intact: {} shards, {} chunks, {} records, {}",
            dir.display(),
            report.shards,
            report.chunks,
            report.records,
            render::size(report.bytes)
        ),
    }
    Ok(0)
}
