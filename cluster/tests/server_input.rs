//! Untrusted input through the real `pigeonhole` binary, as a client written
//! from the .proto files alone would send it: bytes that are not a valid
//! message, fields over their limits, and ids that do not exist. Each is the
//! caller's error (INVALID_ARGUMENT or NOT_FOUND, naming the field), never
//! INTERNAL, and never retryable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod server_common;

use bytes::BufMut;
use pigeonhole_proto::v1 as pb;
use server_common::{append, client, free_port, start};
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

/// Sends raw bytes as the request message; decodes the response as `D`.
#[derive(Debug)]
struct RawCodec<D>(PhantomData<D>);

#[derive(Debug)]
struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

#[derive(Debug)]
struct RawDecoder<D>(PhantomData<D>);

impl<D: prost::Message + Default> Decoder for RawDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::decode(buf).map(Some).map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl<D: prost::Message + Default + Send + 'static> Codec for RawCodec<D> {
    type Encode = Vec<u8>;
    type Decode = D;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder<D>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder<D> {
        RawDecoder(PhantomData)
    }
}

async fn raw_call<D: prost::Message + Default + Send + 'static>(
    ch: &Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<D, Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec(PhantomData),
    )
    .await
    .map(tonic::Response::into_inner)
}

fn field_of(s: &Status) -> String {
    s.get_error_details()
        .bad_request()
        .map(|b| b.field_violations[0].field.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_are_the_callers_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), free_port());
    let mut c = client(&s).await;
    let ch = Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // AppendRequest.mailbox = MailboxId { namespace: [0xff] }: not UTF-8.
    let bad_utf8 = vec![0x0a, 0x03, 0x0a, 0x01, 0xff];
    let e = raw_call::<pb::AppendResponse>(&ch, "/pigeonhole.v1.Mailbox/Append", bad_utf8.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(field_of(&e), "mailbox.namespace", "{e:?}");
    let e = raw_call::<pb::SyncResponse>(&ch, "/pigeonhole.v1.Mailbox/Sync", bad_utf8)
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field_of(&e).as_str()),
        (Code::InvalidArgument, "mailbox.namespace"),
        "{e:?}"
    );

    // Garbage, and a valid message cut short.
    let good = prost::Message::encode_to_vec(&append("ann", "k1", b"hello"));
    for (what, body) in [
        ("garbage", vec![0xff; 16]),
        ("truncated", good[..good.len() - 3].to_vec()),
        ("bad wire type", vec![0x0f, 0x01]),
    ] {
        for path in ["/pigeonhole.v1.Mailbox/Append", "/pigeonhole.v1.Mailbox/AppendBatch"] {
            let e = raw_call::<pb::AppendResponse>(&ch, path, body.clone())
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{what} to {path}: {e:?}");
            assert!(e.get_error_details().bad_request().is_some(), "{what}: {e:?}");
        }
        let e = raw_call::<pb::TransferLeaderResponse>(&ch, "/pigeonhole.v1.Admin/TransferLeader", body.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what} to Admin: {e:?}");
    }
    // The intact message still works on the same connection.
    let ok: pb::AppendResponse = loop {
        match raw_call(&ch, "/pigeonhole.v1.Mailbox/Append", good.clone()).await {
            Ok(r) => break r,
            Err(e) if e.code() == Code::Unavailable => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(ok.seq, 1);

    // A 15 MiB payload (under the 16 MiB request limit): refused naming the
    // payload and ITS limit, 1 MiB; not `ops` and 8 MiB.
    let e = c.append(append("ann", "big", &vec![7u8; 15 << 20])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let v = e.get_error_details().bad_request().unwrap().field_violations[0].clone();
    assert_eq!(v.field, "payload");
    assert!(v.description.contains("1048576"), "{}", v.description);
    let r = c
        .append_batch(pb::AppendBatchRequest {
            items: vec![append("ann", "k2", b"x"), append("ann", "big2", &vec![7u8; 2 << 20])],
        })
        .await
        .unwrap()
        .into_inner();
    match &r.results[1].result {
        Some(pb::append_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert!(
                e.message.contains("items[1].payload") && e.message.contains("1048576"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
}
