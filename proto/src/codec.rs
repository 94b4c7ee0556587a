//! The gRPC codec of the public API: prost, except that a message the
//! server cannot decode is the CALLER's error.
//!
//! tonic's stock `ProstCodec` answers every decode failure (invalid UTF-8 in
//! a string, garbage bytes, a truncated message) with INTERNAL, which the
//! API reserves for node faults an operator is paged for (docs/api.md §4).
//! A request the server cannot decode is bad input: INVALID_ARGUMENT, with a
//! `google.rpc.BadRequest` naming the field where prost can name it
//! (`mailbox.namespace`). The same codec decodes responses on the client
//! side; there a message that cannot be decoded is the server's fault and
//! stays INTERNAL.
//!
//! Encoding is prost's, unchanged.

use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// The codec the generated `pigeonhole.v1` services and clients use.
#[derive(Debug, Clone)]
pub struct ApiCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for ApiCodec<T, U> {
    fn default() -> Self {
        ApiCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for ApiCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ApiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ApiDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`, mapping failures as the module docs say.
#[derive(Debug)]
pub struct ApiDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for ApiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| decode_status(short_type_name::<U>(), &e))
    }
}

fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

/// The status for a `message` (a type name, e.g. `AppendRequest`) that
/// failed to decode with `e`.
pub fn decode_status(message: &str, e: &prost::DecodeError) -> Status {
    let (field, reason) = split_decode_error(&e.to_string());
    if !message.ends_with("Request") {
        // A response (on the client side): the peer's fault, not ours.
        return Status::internal(format!("could not decode the {message} the server sent: {reason}"));
    }
    let field = if field.is_empty() {
        "(request)".to_string()
    } else {
        field
    };
    let text = format!("the {message} could not be decoded: {field}: {reason}");
    let details = tonic_types::ErrorDetails::with_bad_request_violation(field, reason);
    <Status as tonic_types::StatusExt>::with_error_details(Code::InvalidArgument, text, details)
}

/// Splits prost's message ("failed to decode Protobuf message:
/// MailboxId.namespace: AppendRequest.mailbox: invalid string value: data
/// is not UTF-8 encoded") into the request's field path, outermost first
/// ("mailbox.namespace"), and the reason. prost lists the innermost field
/// first, as `Type.field` segments.
fn split_decode_error(text: &str) -> (String, String) {
    let mut rest = text.strip_prefix("failed to decode Protobuf message: ").unwrap_or(text);
    let mut fields = Vec::new();
    while let Some((seg, tail)) = rest.split_once(": ") {
        let is_field = seg.split_once('.').is_some_and(|(ty, f)| {
            !ty.is_empty()
                && !f.is_empty()
                && ty.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if !is_field {
            break;
        }
        fields.push(seg.split_once('.').map_or(seg, |(_, f)| f));
        rest = tail;
    }
    fields.reverse();
    (fields.join("."), rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1 as pb;

    fn decode_err(bytes: &[u8]) -> prost::DecodeError {
        pb::AppendRequest::decode(bytes).unwrap_err()
    }

    #[test]
    fn bad_utf8_names_the_nested_field() {
        // AppendRequest.mailbox (1) = MailboxId { namespace (1) = 0xff }
        let bytes = [0x0a, 0x03, 0x0a, 0x01, 0xff];
        let s = decode_status("AppendRequest", &decode_err(&bytes));
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        let d = tonic_types::StatusExt::get_error_details(&s);
        let v = &d.bad_request().unwrap().field_violations[0];
        assert_eq!(v.field, "mailbox.namespace");
        assert!(v.description.contains("UTF-8"), "{}", v.description);
    }

    #[test]
    fn garbage_is_invalid_argument_and_responses_stay_internal() {
        let bytes = [0xff, 0xff, 0xff];
        let s = decode_status("AppendRequest", &decode_err(&bytes));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("(request)"), "{}", s.message());
        let s = decode_status("AppendResponse", &decode_err(&bytes));
        assert_eq!(s.code(), Code::Internal);
    }

    #[test]
    fn an_append_payload_is_a_slice_of_the_request_buffer_not_a_copy() {
        let req = pb::AppendRequest {
            payload: prost::bytes::Bytes::from(vec![7u8; 256]),
            idempotency_key: b"k".to_vec(),
            ..Default::default()
        };
        let wire = prost::bytes::Bytes::from(req.encode_to_vec());
        let got = pb::AppendRequest::decode(wire.clone()).unwrap();
        assert_eq!(got.payload, req.payload);
        let range = wire.as_ptr_range();
        assert!(
            range.contains(&got.payload.as_ptr()),
            "the payload was copied out of the request buffer"
        );
    }

    #[test]
    fn splits_reasons_that_contain_colons() {
        let (f, r) = split_decode_error("failed to decode Protobuf message: invalid wire type value: 7");
        assert_eq!((f.as_str(), r.as_str()), ("", "invalid wire type value: 7"));
        let (f, r) = split_decode_error("failed to decode Protobuf message: B.c: A.b: invalid wire type value: 7");
        assert_eq!((f.as_str(), r.as_str()), ("b.c", "invalid wire type value: 7"));
    }
}
