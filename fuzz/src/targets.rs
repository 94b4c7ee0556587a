//! The fuzz targets: one per decoder of untrusted bytes. Each takes any
//! byte string; it must return (true when the bytes decoded) and never
//! panic, hang or allocate without bound. A target also runs what the
//! server does next with what decoded (validation, apply, ingest), since a
//! decoder's output is only as safe as its first consumer.
//!
//! | target | bytes from | runs |
//! | --- | --- | --- |
//! | `api_request` | a client | every pigeonhole.v1 request decoder, the codec's error mapping, the pre-Raft limit checks |
//! | `command` | the Raft log | the internal command decoder, the limit checks, and apply on a real engine |
//! | `raft_frame` | a peer | RaftFrame / SnapshotFrame decode, then every raft-rs message in it |
//! | `snapshot_chunk` | a peer, the spool | SnapshotChunk decode (raw, and with a fixed checksum), then ingest |
//! | `stored_data` | disk | every data-column-family record decoder (raw, and sealed with a valid checksum) |
//! | `stored_raft` | disk | Raft log segment records (framed, and bare bodies), with each entry's protobuf |
//! | `config` | an operator | the TOML config file and its range checks |
//!
//! A target reports a violated property (beyond "no panic") by panicking
//! itself; the runner catches and reports it like any other panic.
#![allow(clippy::panic)]

use pigeonhole_cluster::settings::Settings;
use pigeonhole_cluster::transport::grpc::decode_frame;
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::raft::eraftpb::{Entry, Message, MessageType};
use pigeonhole_engine::{
    conf_state_with_voters, decoders, ApplyEntry, Durability, Engine, EngineOptions, EntryKind, SnapshotChunk,
};
use pigeonhole_proto::internal::v1 as internal;
use pigeonhole_proto::v1 as pb;
use prost::Message as _;
use protobuf::Message as _;

/// The shard the `command` target applies to.
const APPLY_SHARD: u64 = 1;
/// The shard the `snapshot_chunk` target ingests into.
const INGEST_SHARD: u64 = 2;

/// State a target may keep across inputs: a real engine in a temp dir.
#[derive(Debug)]
pub struct Ctx {
    engine: Engine,
    /// The next index `command` applies at.
    index: u64,
    _dir: tempfile::TempDir,
}

impl Ctx {
    /// A fresh engine with the two shards the targets use.
    pub fn new() -> Result<Ctx, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let engine = Engine::open(dir.path(), EngineOptions::default()).map_err(|e| e.to_string())?;
        for shard in [APPLY_SHARD, INGEST_SHARD] {
            engine
                .bootstrap_shard(shard, conf_state_with_voters(&[1]), 0, 0)
                .map_err(|e| e.to_string())?;
        }
        Ok(Ctx {
            engine,
            index: 0,
            _dir: dir,
        })
    }
}

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name (`phfuzz --target NAME`).
    pub name: &'static str,
    /// Valid inputs to start mutating from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Runs one input; true if it decoded.
    pub run: fn(&mut Ctx, &[u8]) -> bool,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "api_request",
        seeds: api_seeds,
        run: api_request,
    },
    Target {
        name: "command",
        seeds: command_seeds,
        run: command,
    },
    Target {
        name: "raft_frame",
        seeds: frame_seeds,
        run: raft_frame,
    },
    Target {
        name: "snapshot_chunk",
        seeds: chunk_seeds,
        run: snapshot_chunk,
    },
    Target {
        name: "stored_data",
        seeds: data_seeds,
        run: stored_data,
    },
    Target {
        name: "stored_raft",
        seeds: raft_seeds,
        run: stored_raft,
    },
    Target {
        name: "config",
        seeds: config_seeds,
        run: config,
    },
];

fn mailbox(user: &str) -> Option<pb::MailboxId> {
    Some(pb::MailboxId {
        namespace: "chat".into(),
        user_id: user.as_bytes().to_vec(),
    })
}

fn append_req(user: &str, key: &str) -> pb::AppendRequest {
    pb::AppendRequest {
        mailbox: mailbox(user),
        payload: b"ciphertext".to_vec().into(),
        idempotency_key: key.as_bytes().to_vec(),
        expected_last_seq: Some(3),
    }
}

fn api_seeds() -> Vec<Vec<u8>> {
    vec![
        append_req("ann", "k1").encode_to_vec(),
        pb::AppendBatchRequest {
            items: vec![append_req("ann", "k1"), append_req("bob", "k2")],
        }
        .encode_to_vec(),
        pb::SyncRequest {
            mailbox: mailbox("ann"),
            after_seq: 4,
            max_messages: 10,
            max_bytes: 1 << 16,
            wait_ms: 100,
            consistency: 1,
        }
        .encode_to_vec(),
        pb::SubscribeRequest {
            mailboxes: vec![pb::MailboxCursor {
                mailbox: mailbox("ann"),
                after_seq: 2,
            }],
            max_in_flight: 64,
        }
        .encode_to_vec(),
        pb::AckRequest {
            mailbox: mailbox("ann"),
            device_id: b"phone".to_vec(),
            seq: 3,
        }
        .encode_to_vec(),
        pb::TransferLeaderRequest { shard: 3, to_node: 2 }.encode_to_vec(),
    ]
}

/// Decodes `data` as `T`; on failure maps the error as the server's codec
/// does (which parses prost's message for the field path).
fn decode_as<T: prost::Message + Default>(name: &str, data: &[u8]) -> Option<T> {
    match T::decode(data) {
        Ok(m) => Some(m),
        Err(e) => {
            let status = pigeonhole_proto::codec::decode_status(name, &e);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}: {status:?}");
            None
        }
    }
}

fn api_request(_: &mut Ctx, data: &[u8]) -> bool {
    let limits = pigeonhole_engine::Limits::default();
    let mut decoded = false;
    if let Some(r) = decode_as::<pb::AppendRequest>("AppendRequest", data) {
        decoded = true;
        if let Some(mb) = r.mailbox {
            let op = cmd::op::Op::Append(cmd::AppendOp {
                namespace: mb.namespace,
                user_id: mb.user_id,
                idempotency_key: r.idempotency_key,
                payload: r.payload,
                expected_last_seq: r.expected_last_seq,
            });
            let _ = limits.check_op(&op);
        }
    }
    decoded |= decode_as::<pb::AppendBatchRequest>("AppendBatchRequest", data).is_some();
    decoded |= decode_as::<pb::SyncRequest>("SyncRequest", data).is_some();
    decoded |= decode_as::<pb::SubscribeRequest>("SubscribeRequest", data).is_some();
    decoded |= decode_as::<pb::AckRequest>("AckRequest", data).is_some();
    decoded |= decode_as::<pb::GetCursorsRequest>("GetCursorsRequest", data).is_some();
    decoded |= decode_as::<pb::TrimRequest>("TrimRequest", data).is_some();
    decoded |= decode_as::<pb::DeleteRequest>("DeleteRequest", data).is_some();
    decoded |= decode_as::<pb::TransferLeaderRequest>("TransferLeaderRequest", data).is_some();
    decoded |= decode_as::<pb::NodeStatusRequest>("NodeStatusRequest", data).is_some();
    decoded
}

fn op(o: cmd::op::Op) -> cmd::Op {
    cmd::Op { op: Some(o) }
}

fn command_seeds() -> Vec<Vec<u8>> {
    let ops = vec![
        op(cmd::op::Op::Append(cmd::AppendOp {
            namespace: "chat".into(),
            user_id: b"ann".to_vec(),
            idempotency_key: b"k1".to_vec(),
            payload: b"ciphertext".to_vec().into(),
            expected_last_seq: None,
        })),
        op(cmd::op::Op::Ack(cmd::AckOp {
            namespace: "chat".into(),
            user_id: b"ann".to_vec(),
            device_id: b"phone".to_vec(),
            seq: 1,
        })),
        op(cmd::op::Op::Trim(cmd::TrimOp {
            namespace: "chat".into(),
            user_id: b"ann".to_vec(),
            up_to_seq: 1,
            dedup_window_ms: 0,
        })),
        op(cmd::op::Op::Delete(cmd::DeleteOp {
            namespace: "chat".into(),
            user_id: b"ann".to_vec(),
            seq: 1,
            dedup_window_ms: 60_000,
        })),
        op(cmd::op::Op::Retain(cmd::RetainOp {
            namespace: "chat".into(),
            ttl_ms: 86_400_000,
            messages_per_mailbox_max: 1_000,
            trim_acked: true,
            dedup_window_ms: 0,
            from_mailbox: Vec::new(),
            mailboxes_max: 100,
            messages_max: 1_000,
        })),
        op(cmd::op::Op::Hold(cmd::HoldOp {
            namespace: "chat".into(),
            user_id: b"ann".to_vec(),
            held: true,
        })),
        op(cmd::op::Op::ExpireDedup(cmd::ExpireDedupOp { max_entries: 10 })),
        op(cmd::op::Op::PutSystem(cmd::PutSystemOp {
            key: b"shard/1".to_vec(),
            value: b"record".to_vec(),
            version: 2,
            if_version: Some(0),
        })),
    ];
    let mut out: Vec<Vec<u8>> = ops
        .iter()
        .map(|o| {
            cmd::Command {
                time_ms: 1_700_000_000_000,
                ops: vec![o.clone()],
            }
            .encode_to_vec()
        })
        .collect();
    out.push(
        cmd::Command {
            time_ms: 1_700_000_000_000,
            ops,
        }
        .encode_to_vec(),
    );
    out
}

fn command(ctx: &mut Ctx, data: &[u8]) -> bool {
    let decoded = match cmd::Command::decode(data) {
        Ok(c) => {
            let limits = &ctx.engine.options().limits;
            for o in c.ops.iter().filter_map(|o| o.op.as_ref()) {
                let _ = limits.check_op(o);
            }
            true
        }
        Err(_) => false,
    };
    // Apply the bytes as the next committed entry: a bad command must be a
    // per-entry rejection, never an engine error.
    ctx.index += 1;
    let data = bytes::Bytes::copy_from_slice(data);
    let entry = ApplyEntry {
        index: ctx.index,
        term: 1,
        kind: EntryKind::Command(&data),
    };
    if let Err(e) = ctx.engine.apply(APPLY_SHARD, &[entry], Durability::NoFsync) {
        panic!("apply of a command from the log failed with an engine error: {e}");
    }
    decoded
}

fn raft_message_bytes() -> Vec<Vec<u8>> {
    let append = Message {
        msg_type: MessageType::MsgAppend,
        to: 2,
        from: 1,
        term: 3,
        log_term: 3,
        index: 10,
        commit: 9,
        entries: vec![Entry {
            index: 11,
            term: 3,
            data: b"command".to_vec().into(),
            context: vec![0; 16].into(),
            ..Default::default()
        }]
        .into(),
        ..Default::default()
    };
    let hb = Message {
        msg_type: MessageType::MsgHeartbeat,
        to: 2,
        from: 1,
        term: 3,
        commit: 9,
        context: b"read-ctx".to_vec().into(),
        ..Default::default()
    };
    [append, hb].iter().filter_map(|m| m.write_to_bytes().ok()).collect()
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let msgs = raft_message_bytes();
    let frame = internal::RaftFrame {
        cluster_id: 7,
        from_node: 1,
        to_node: 2,
        messages: msgs
            .iter()
            .map(|m| internal::ShardMessage {
                shard: 4,
                message: m.clone(),
            })
            .collect(),
    };
    let snap = internal::SnapshotFrame {
        cluster_id: 7,
        from_node: 1,
        to_node: 2,
        shard: 4,
        chunk: b"chunk bytes".to_vec(),
        raft_message: msgs.first().cloned().unwrap_or_default(),
    };
    vec![frame.encode_to_vec(), snap.encode_to_vec()]
}

fn raft_frame(_: &mut Ctx, data: &[u8]) -> bool {
    let mut decoded = false;
    if let Ok(frame) = internal::RaftFrame::decode(data) {
        decoded |= decode_frame(frame).is_ok();
    }
    if let Ok(frame) = internal::SnapshotFrame::decode(data) {
        decoded |= Message::parse_from_bytes(&frame.raft_message).is_ok();
    }
    decoded |= Message::parse_from_bytes(data).is_ok();
    decoded
}

/// Chunk seeds WITHOUT their trailing checksum: the target adds a valid one
/// (and also tries the bytes as they are).
fn chunk_seeds() -> Vec<Vec<u8>> {
    let Ok(ctx) = Ctx::new() else { return Vec::new() };
    for cmd in command_seeds() {
        ctx_apply(&ctx, &cmd);
    }
    let mut chunks = Vec::new();
    let _ = ctx
        .engine
        .export_snapshot::<pigeonhole_engine::EngineError>(APPLY_SHARD, 256, |c| {
            let mut bytes = c.encode();
            bytes.truncate(bytes.len().saturating_sub(4));
            chunks.push(bytes);
            Ok(())
        });
    chunks
}

fn ctx_apply(ctx: &Ctx, data: &[u8]) {
    let index = ctx
        .engine
        .shard_meta(APPLY_SHARD)
        .ok()
        .flatten()
        .map_or(0, |m| m.applied_index)
        + 1;
    let data = bytes::Bytes::copy_from_slice(data);
    let _ = ctx.engine.apply(
        APPLY_SHARD,
        &[ApplyEntry {
            index,
            term: 1,
            kind: EntryKind::Command(&data),
        }],
        Durability::NoFsync,
    );
}

fn snapshot_chunk(ctx: &mut Ctx, data: &[u8]) -> bool {
    let raw = SnapshotChunk::decode(data).is_ok();
    let mut fixed = data.to_vec();
    fixed.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
    let Ok(mut chunk) = SnapshotChunk::decode(&fixed) else {
        return raw;
    };
    // Ingest it (as the first chunk of a stream for our shard): the records
    // inside are untrusted too. Errors are expected; panics are not.
    chunk.shard = INGEST_SHARD;
    chunk.seq_no = 0;
    if let Ok(mut ingest) = ctx.engine.ingest_snapshot(INGEST_SHARD) {
        let _ = ingest.push(&chunk);
    }
    true
}

fn keyed(data: &[u8], seal: bool) -> (Vec<u8>, Vec<u8>) {
    let key = b"\x00\x00\x00\x00\x00\x00\x00\x01\x02chat\x00ann".to_vec();
    let value = if seal {
        decoders::seal(&key, data)
    } else {
        data.to_vec()
    };
    (key, value)
}

fn data_seeds() -> Vec<Vec<u8>> {
    decoders::sample_data_bodies()
}

fn stored_data(_: &mut Ctx, data: &[u8]) -> bool {
    stored(data, decoders::data_value)
}

/// Runs `decode` on `data` as stored (the checksum almost always fails) and
/// sealed with a valid checksum, so the record decoders behind it run.
/// One of `engine::decoders`' stored-value decoders.
type StoredDecoder = fn(&[u8], &[u8]) -> Vec<Result<(), pigeonhole_engine::EngineError>>;

fn stored(data: &[u8], decode: StoredDecoder) -> bool {
    let mut decoded = false;
    for seal in [false, true] {
        let (k, v) = keyed(data, seal);
        decoded |= decode(&k, &v).iter().any(Result::is_ok);
    }
    decoded
}

fn raft_seeds() -> Vec<Vec<u8>> {
    decoders::sample_raft_log_records()
}

fn stored_raft(_: &mut Ctx, data: &[u8]) -> bool {
    decoders::raft_log_record(data).iter().any(Result::is_ok)
}

fn config_seeds() -> Vec<Vec<u8>> {
    [
        "node_id = 2\ndata_dir = \"/var/lib/pigeonhole\"\nlisten = \"0.0.0.0:7070\"\n\
         advertise = \"10.0.0.2:7070\"\ninitial_cluster = \"1=10.0.0.1:7070,2=10.0.0.2:7070,3=10.0.0.3:7070\"\n\
         shards = 64\nreplication_factor = 3\n\n[limits]\nrequest_bytes_max = 16777216\n\
         request_timeout_ms = 5000\nbatch_items_max = 1024\n",
        "shards = 8\n[limits]\nrequest_timeout_ms = 100\n",
        "",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn config(_: &mut Ctx, data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    match Settings::from_toml(&text) {
        Ok(s) => {
            let _ = s.into_server_config();
            true
        }
        Err(_) => false,
    }
}
