//! MessagePack by default, JSON when the message says `Content-Type: application/json`.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Bytes reserved up front for an encoded MessagePack message: most messages fit, so
/// encoding them does not grow the buffer step by step.
const MESSAGE_BYTES_HINT: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    MsgPack,
    Json,
}

impl Encoding {
    /// The encoding a message's `Content-Type` header value selects.
    pub fn from_content_type(content_type: Option<&str>) -> Encoding {
        match content_type {
            // Parameters (`; charset=utf-8`) say nothing the grid needs: JSON is UTF-8.
            Some(value)
                if value.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case(JSON_CONTENT_TYPE) =>
            {
                Encoding::Json
            }
            _ => Encoding::MsgPack,
        }
    }

    /// The header value to send with a message in this encoding (`None` for MessagePack).
    pub fn content_type(self) -> Option<&'static str> {
        match self {
            Encoding::MsgPack => None,
            Encoding::Json => Some(JSON_CONTENT_TYPE),
        }
    }
}

/// A message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The bytes are not a valid message of the expected type; the sender must fix it.
    #[error("malformed {encoding} message for {expected}: {source}")]
    Malformed {
        encoding: &'static str,
        expected: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A value could not be encoded (a bug: every wire type is encodable).
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

pub fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Result<Vec<u8>, ProtoError> {
    let what = short_type_name::<T>();
    match encoding {
        Encoding::MsgPack => {
            let mut bytes = Vec::with_capacity(MESSAGE_BYTES_HINT);
            rmp_serde::encode::write_named(&mut bytes, value)
                .map_err(|source| ProtoError::Encode { what, source: Box::new(source) })?;
            Ok(bytes)
        }
        Encoding::Json => {
            serde_json::to_vec(value).map_err(|source| ProtoError::Encode { what, source: Box::new(source) })
        }
    }
}

/// How deeply a message's arrays and maps may nest, as JSON's decoder allows: far past any
/// valid message (values nest at most `nesting_depth_max` levels), and short of the depth
/// whose recursion would overflow a thread's stack.
pub const DECODE_DEPTH_MAX: usize = 128;

pub fn decode<T: DeserializeOwned>(encoding: Encoding, bytes: &[u8]) -> Result<T, ProtoError> {
    let expected = short_type_name::<T>();
    match encoding {
        Encoding::MsgPack => {
            if let Some(problem) = msgpack_problem(bytes) {
                return Err(ProtoError::Malformed { encoding: "MessagePack", expected, source: problem.into() });
            }
            let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes);
            deserializer.set_max_depth(DECODE_DEPTH_MAX);
            T::deserialize(&mut deserializer).map_err(|source| {
                let source: Box<dyn std::error::Error + Send + Sync> = match source {
                    rmp_serde::decode::Error::DepthLimitExceeded => {
                        format!("nested deeper than {DECODE_DEPTH_MAX} levels").into()
                    }
                    other => Box::new(other),
                };
                ProtoError::Malformed { encoding: "MessagePack", expected, source }
            })
        }
        Encoding::Json => serde_json::from_slice(bytes).map_err(|source| ProtoError::Malformed {
            encoding: "JSON",
            expected,
            source: Box::new(source),
        }),
    }
}

/// How deeply [`msgpack_problem`] follows a message's arrays and maps: past what the
/// decoder takes ([`DECODE_DEPTH_MAX`]; it does not count an enum's one-entry map), so a
/// message it refuses as too deep the decoder would refuse too.
const CHECK_DEPTH_MAX: usize = 2 * DECODE_DEPTH_MAX;

/// What a MessagePack message holds that JSON has no value for, and that decoding would
/// turn into something else without a word: a float that is NaN or infinite (it would
/// become `null`), a binary value (taken as text where a string is expected), or a map key
/// that is not a string (serde takes an integer key as a field's index); and bytes after
/// the message's one value (JSON refuses them, the decoder would drop them). One pass over
/// the bytes, allocating nothing: a container's elements follow its header, and a stack
/// of how many elements each open container has left says which element is a map's key
/// and where the message ends. Bytes that are not MessagePack are left to the decoder.
fn msgpack_problem(bytes: &[u8]) -> Option<Cow<'static, str>> {
    use rmp::Marker;
    const NON_FINITE: &str = "a float that is NaN or infinite, which JSON has no value for";
    const BINARY: &str = "a binary value, which JSON has no value for (send text as a MessagePack string)";
    const KEY: &str = "a map key that is not a string (JSON has no other; send field names and map keys as \
                       MessagePack strings)";
    const TRAILING: &str = "bytes after the end of the message (send one MessagePack value per message)";
    let length = |at: usize, width: usize| -> Option<usize> {
        let field = bytes.get(at..at + width)?;
        Some(field.iter().fold(0usize, |length, byte| (length << 8) | usize::from(*byte)))
    };
    // Each open container's elements left, shifted up one bit; the low bit is set for a map.
    let mut open = [0u64; CHECK_DEPTH_MAX];
    let mut depth = 0usize;
    let mut at = 0usize;
    loop {
        let byte = *bytes.get(at)?;
        at += 1;
        let marker = Marker::from_u8(byte);
        if let Some(parent) = depth.checked_sub(1).map(|top| &mut open[top]) {
            // A map's elements alternate key and value, from an even count left.
            let is_key = *parent & 1 == 1 && (*parent >> 1) % 2 == 0;
            if is_key && !matches!(marker, Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32) {
                return Some(KEY.into());
            }
            *parent -= 2;
        }
        // The bytes to skip to the next element, and the elements of a container opened.
        let (skip, elements, map) = match marker {
            Marker::F32 => {
                let value = f32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
                if !value.is_finite() {
                    return Some(NON_FINITE.into());
                }
                (4, 0, false)
            }
            Marker::F64 => {
                let value = f64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?);
                if !value.is_finite() {
                    return Some(NON_FINITE.into());
                }
                (8, 0, false)
            }
            Marker::FixStr(length) => (usize::from(length), 0, false),
            // Read as text where a string is expected, as bytes elsewhere: neither is JSON.
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => return Some(BINARY.into()),
            Marker::Str8 => (1 + length(at, 1)?, 0, false),
            Marker::Str16 => (2 + length(at, 2)?, 0, false),
            Marker::Str32 => (4 + length(at, 4)?, 0, false),
            Marker::Ext8 => (2 + length(at, 1)?, 0, false),
            Marker::Ext16 => (3 + length(at, 2)?, 0, false),
            Marker::Ext32 => (5 + length(at, 4)?, 0, false),
            Marker::FixExt1 => (2, 0, false),
            Marker::FixExt2 => (3, 0, false),
            Marker::FixExt4 => (5, 0, false),
            Marker::FixExt8 => (9, 0, false),
            Marker::FixExt16 => (17, 0, false),
            Marker::U8 | Marker::I8 => (1, 0, false),
            Marker::U16 | Marker::I16 => (2, 0, false),
            Marker::U32 | Marker::I32 => (4, 0, false),
            Marker::U64 | Marker::I64 => (8, 0, false),
            Marker::FixArray(length) => (0, u64::from(length), false),
            Marker::Array16 => (2, length(at, 2)? as u64, false),
            Marker::Array32 => (4, length(at, 4)? as u64, false),
            Marker::FixMap(length) => (0, 2 * u64::from(length), true),
            Marker::Map16 => (2, 2 * length(at, 2)? as u64, true),
            Marker::Map32 => (4, 2 * length(at, 4)? as u64, true),
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => (0, 0, false),
            Marker::Reserved => return None,
        };
        at = at.checked_add(skip)?;
        if elements > 0 {
            let Some(slot) = open.get_mut(depth) else {
                return Some(format!("nested deeper than {DECODE_DEPTH_MAX} levels").into());
            };
            *slot = (elements << 1) | u64::from(map);
            depth += 1;
            continue;
        }
        // The element is whole: so are the containers it was the last element of.
        while depth > 0 && open[depth - 1] >> 1 == 0 {
            depth -= 1;
        }
        if depth == 0 {
            break;
        }
    }
    (at < bytes.len()).then_some(TRAILING.into())
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GateMessage, StartRun, TaskResult};

    /// A `StartRun` of flow `f` in MessagePack whose input is `depth` arrays, one in the other.
    fn start_nested(depth: usize) -> Vec<u8> {
        let mut message = vec![0x82, 0xa4];
        message.extend_from_slice(b"flow");
        message.extend_from_slice(&[0xa1, b'f', 0xa5]);
        message.extend_from_slice(b"input");
        message.extend(std::iter::repeat_n(0x91, depth));
        message.push(0x01);
        message
    }

    #[test]
    fn a_message_nested_too_deeply_is_refused_in_either_encoding_not_a_stack_overflow() {
        for depth in [DECODE_DEPTH_MAX + 1, 100_000] {
            let error = decode::<StartRun>(Encoding::MsgPack, &start_nested(depth)).expect_err("too deep");
            assert!(error.to_string().contains("nested deeper than 128 levels"), "{error}");
            let json = format!(r#"{{"flow": "f", "input": {}1{}}}"#, "[".repeat(depth), "]".repeat(depth));
            decode::<StartRun>(Encoding::Json, json.as_bytes()).expect_err("too deep");
        }
        let start = decode::<StartRun>(Encoding::MsgPack, &start_nested(100)).expect("100 levels decode");
        assert_eq!(flowgrid_model::limits::nesting_depth(&start.input), 100);
    }

    #[test]
    fn a_float_json_has_no_value_for_is_refused_not_turned_into_null() {
        #[derive(Serialize)]
        struct Sent {
            attempt: serde_json::Value,
            output: (String, Vec<u8>, f64, f32, Vec<f64>),
        }
        let attempt = serde_json::json!({"run_id": "r", "step": "s", "attempt": 1});
        // Floats inside strings and byte arrays are no floats.
        let text = String::from_utf8_lossy(&[0xcb, 0x7f, 0xf8]).into_owned();
        let fine = Sent { attempt: attempt.clone(), output: (text, vec![0xcb, 0x7f, 0xf8, 0, 0], 1.5, 2.5, vec![3.0]) };
        let fine = rmp_serde::to_vec_named(&fine).unwrap();
        let decoded = decode::<serde_json::Value>(Encoding::MsgPack, &fine).expect("finite floats decode");
        assert_eq!(decoded["output"][2], serde_json::json!(1.5));
        for (double, single) in [(f64::NAN, 1.0), (f64::INFINITY, 1.0), (1.0, f32::NEG_INFINITY)] {
            let sent = Sent { attempt: attempt.clone(), output: ("x".into(), Vec::new(), 1.0, single, vec![double]) };
            let bytes = rmp_serde::to_vec_named(&sent).unwrap();
            let error = decode::<TaskResult>(Encoding::MsgPack, &bytes).expect_err("refused");
            assert!(error.to_string().contains("NaN or infinite"), "{error}");
        }
    }

    #[test]
    fn a_binary_value_is_refused_not_taken_as_text() {
        // {"flow": <bin "chain">}: rmp-serde would read the bytes as the flow's name.
        let mut bytes = vec![0x81, 0xa4];
        bytes.extend_from_slice(b"flow");
        bytes.extend_from_slice(&[0xc4, 5]);
        bytes.extend_from_slice(b"chain");
        let error = decode::<StartRun>(Encoding::MsgPack, &bytes).expect_err("refused");
        assert!(error.to_string().contains("a binary value"), "{error}");
        let gate = serde_json::json!({"flow": "f", "run_id": "r", "limit": 1});
        let error = decode::<GateMessage>(Encoding::Json, gate.to_string().as_bytes()).expect_err("refused");
        assert!(error.to_string().contains("unknown field `limit`"), "{error}");
    }

    #[test]
    fn a_map_key_that_is_not_a_string_is_refused_not_taken_as_a_field_index() {
        // {0: "f"}: serde would take key 0 as `StartRun`'s first field, `flow`.
        let error = decode::<StartRun>(Encoding::MsgPack, &[0x81, 0x00, 0xa1, b'f']).expect_err("refused");
        assert!(error.to_string().contains("a map key that is not a string"), "{error}");
        // {"flow": "f", "input": {"a": [{"b": 1}], true: 2}}: a key after a nested value.
        let mut nested = vec![0x82, 0xa4];
        nested.extend_from_slice(b"flow");
        nested.extend_from_slice(&[0xa1, b'f', 0xa5]);
        nested.extend_from_slice(b"input");
        nested.extend_from_slice(&[0x82, 0xa1, b'a', 0x91, 0x81, 0xa1, b'b', 0x01, 0xc3, 0x02]);
        let error = decode::<StartRun>(Encoding::MsgPack, &nested).expect_err("refused");
        assert!(error.to_string().contains("a map key that is not a string"), "{error}");
        // The same with a string key decodes, a map16 too.
        let last = nested.len() - 2;
        nested[last] = 0xa1;
        nested.insert(last + 1, b'c');
        let start = decode::<StartRun>(Encoding::MsgPack, &nested).expect("string keys decode");
        assert_eq!(start.input, serde_json::json!({"a": [{"b": 1}], "c": 2}));
        let error = decode::<serde_json::Value>(Encoding::MsgPack, &[0xde, 0, 1, 0xd0, 0xff, 0xc0]).expect_err("map16");
        assert!(error.to_string().contains("a map key that is not a string"), "{error}");
    }

    #[test]
    fn bytes_after_the_message_are_refused_in_either_encoding() {
        let start = StartRun { flow: "f".into(), input: serde_json::json!([[1], {"a": []}]), ..Default::default() };
        let mut bytes = encode(Encoding::MsgPack, &start).unwrap();
        assert_eq!(decode::<StartRun>(Encoding::MsgPack, &bytes).unwrap(), start);
        bytes.push(0xc0);
        let error = decode::<StartRun>(Encoding::MsgPack, &bytes).expect_err("refused");
        assert!(error.to_string().contains("bytes after the end of the message"), "{error}");
        let mut json = encode(Encoding::Json, &start).unwrap();
        json.extend_from_slice(b" null");
        decode::<StartRun>(Encoding::Json, &json).expect_err("refused");
        // A message cut short is the decoder's to refuse.
        let error = decode::<StartRun>(Encoding::MsgPack, &bytes[..bytes.len() - 3]).expect_err("refused");
        assert!(!error.to_string().contains("bytes after"), "{error}");
    }

    #[test]
    fn both_encodings_round_trip() {
        let start = StartRun {
            flow: "demo".into(),
            version: Some(2),
            input: serde_json::json!({"items": [1, 2, 3], "name": "x"}),
            idempotency_key: Some("k".into()),
            ..Default::default()
        };
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            let bytes = encode(encoding, &start).unwrap();
            let back: StartRun = decode(encoding, &bytes).unwrap();
            assert_eq!(back, start);
        }
    }

    #[test]
    fn malformed_input_names_the_expected_type() {
        let error = decode::<TaskResult>(Encoding::Json, b"{\"attempt\": 3}").unwrap_err();
        let text = error.to_string();
        assert!(text.contains("TaskResult"), "{text}");
        assert!(text.contains("JSON"), "{text}");
    }

    #[test]
    fn a_request_with_a_field_it_does_not_have_is_refused_naming_it() {
        let misspelt = serde_json::json!({"flow": "demo", "idempotencyKey": "k"});
        let json = decode::<StartRun>(Encoding::Json, misspelt.to_string().as_bytes()).unwrap_err().to_string();
        assert!(json.contains("unknown field `idempotencyKey`"), "{json}");
        let msgpack = rmp_serde::to_vec_named(&misspelt).unwrap();
        let msgpack = decode::<StartRun>(Encoding::MsgPack, &msgpack).unwrap_err().to_string();
        assert!(msgpack.contains("idempotencyKey"), "{msgpack}");
    }

    #[test]
    fn a_null_output_is_an_output_in_both_encodings() {
        let attempt = serde_json::json!({"run_id": "r", "step": "s", "attempt": 1});
        let sent = serde_json::json!({"attempt": attempt, "output": null});
        let json = sent.to_string().into_bytes();
        let msgpack = rmp_serde::to_vec_named(&sent).unwrap();
        for (encoding, bytes) in [(Encoding::Json, json), (Encoding::MsgPack, msgpack)] {
            let result: TaskResult = decode(encoding, &bytes).unwrap();
            assert_eq!(
                (&result.output, &result.error, &result.progress),
                (&Some(serde_json::Value::Null), &None, &None)
            );
            let back: TaskResult = decode(encoding, &encode(encoding, &result).unwrap()).unwrap();
            assert_eq!(back, result);
        }
        let without = serde_json::json!({"attempt": attempt}).to_string();
        let without: TaskResult = decode(Encoding::Json, without.as_bytes()).unwrap();
        assert_eq!((without.output, without.progress), (None, None));
        // A worker that writes every field: its `null`s beside an error or a report are none.
        let error = serde_json::json!({"code": "e", "message": "m", "retryable": false});
        let every = serde_json::json!({"attempt": attempt, "output": null, "error": error, "progress": null});
        let mut every: TaskResult = decode(Encoding::Json, every.to_string().as_bytes()).unwrap();
        assert_eq!((every.take_output(), every.error.is_some(), every.progress), (None, true, None));
        let report = serde_json::json!({"attempt": attempt, "output": null, "progress": {"done": 1}});
        let mut report: TaskResult = decode(Encoding::Json, report.to_string().as_bytes()).unwrap();
        assert_eq!((report.take_output(), report.progress), (None, Some(serde_json::json!({"done": 1}))));
        let mut null: TaskResult = decode(Encoding::Json, sent.to_string().as_bytes()).unwrap();
        assert_eq!(null.take_output(), Some(serde_json::Value::Null));
    }

    #[test]
    fn content_type_selects_json() {
        assert_eq!(Encoding::from_content_type(Some("application/json")), Encoding::Json);
        assert_eq!(Encoding::from_content_type(Some("Application/JSON; charset=utf-8")), Encoding::Json);
        assert_eq!(Encoding::from_content_type(Some("application/jsonx")), Encoding::MsgPack);
        assert_eq!(Encoding::from_content_type(Some("application/msgpack")), Encoding::MsgPack);
        assert_eq!(Encoding::from_content_type(None), Encoding::MsgPack);
    }
}
