//! The MCP wire parsers on arbitrary bytes: JSON-RPC framing, the modern
//! era's envelope and routing-header check, and the SSE decoder.
//!
//! Properties checked (beyond "no panic"):
//!
//! 1. Every message `jsonrpc::parse` accepts survives `to_json` → `parse`
//!    unchanged, alone and as a batch; an invalid message names the id the
//!    input carried, or none.
//! 2. `era::check_modern` only answers with its three error codes; routing
//!    headers can only add refusals (a request that passes with headers
//!    passes without them, with the same envelope); headers derived
//!    faithfully from the body change nothing; `Mcp-Name` values round-trip
//!    through `encode_header_value` / `decode_header_value`.
//! 3. The SSE decoder gives the same events and the same error whether the
//!    bytes arrive whole or in up to three chunks, and every accepted
//!    message, written with `sse::encode`, decodes back to its exact JSON.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_mcp::era::{self, RoutingHeaders};
use portcullis_mcp::jsonrpc::{
    self, HEADER_MISMATCH, INVALID_PARAMS, Incoming, Message, UNSUPPORTED_PROTOCOL_VERSION,
};
use portcullis_mcp::sse::{self, Decoder, Event, SseError};
use serde_json::Value;

const LIMIT: usize = 1 << 20;
const SSE_LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    framing(data);
    sse_chunking(data);
});

fn framing(data: &[u8]) {
    let Ok(incoming) = jsonrpc::parse(data, LIMIT) else {
        return;
    };
    // The raw value, to compare ids of invalid messages with.
    let raw: Value = serde_json::from_slice(data).unwrap_or(Value::Null);
    let (items, raws): (Vec<_>, Vec<Value>) = match incoming {
        Incoming::One(m) => (vec![m], vec![raw]),
        Incoming::Batch(ms) => {
            let raws = match raw {
                Value::Array(a) => a,
                _ => panic!("a batch parsed from a non-array"),
            };
            assert_eq!(ms.len(), raws.len());
            (ms, raws)
        }
    };
    let mut valid = Vec::new();
    for (item, raw) in items.into_iter().zip(raws) {
        match item {
            Ok(m) => {
                round_trip(&m);
                modern(&m, data);
                sse_encoding(&m);
                valid.push(m);
            }
            Err(invalid) => {
                if let Some(id) = &invalid.id {
                    assert_eq!(raw.get("id"), Some(&id.to_value()), "{invalid:?}");
                }
                assert_eq!(invalid.to_error().code, jsonrpc::INVALID_REQUEST);
            }
        }
    }
    // The valid elements again, as one batch.
    if !valid.is_empty() && valid.len() <= jsonrpc::MAX_BATCH {
        let batch = Value::Array(valid.iter().map(Message::to_value).collect());
        match jsonrpc::parse(batch.to_string().as_bytes(), usize::MAX) {
            Ok(Incoming::Batch(again)) => {
                let again: Vec<Message> = again
                    .into_iter()
                    .map(|m| m.unwrap_or_else(|e| panic!("batch element refused: {e}")))
                    .collect();
                assert_eq!(again, valid);
            }
            other => panic!("a batch read back as {other:?}"),
        }
    }
}

/// `to_json` → `parse` gives back the same message.
fn round_trip(m: &Message) {
    let json = m.to_json();
    match jsonrpc::parse(json.as_bytes(), usize::MAX) {
        Ok(Incoming::One(Ok(again))) => assert_eq!(&again, m, "{json}"),
        other => panic!("{json} read back as {other:?}"),
    }
}

/// The modern-era checks on a request or notification.
fn modern(m: &Message, data: &[u8]) {
    let Some(method) = m.method() else {
        return;
    };
    let params = m.params();
    let bare = era::check_modern(method, params, None);
    if let Err(e) = &bare {
        assert!(
            [INVALID_PARAMS, UNSUPPORTED_PROTOCOL_VERSION].contains(&e.code),
            "{e:?}"
        );
    }
    if let Ok(env) = &bare {
        assert!(era::MODERN_VERSIONS.contains(&env.protocol_version.as_str()));
    }

    // Headers as an honest client writes them from the body.
    let meta = params.and_then(|p| p.get("_meta"));
    let version = meta.and_then(|m| m.get(era::META_PROTOCOL_VERSION));
    let body_name = era::name_param(method).and_then(|k| params.and_then(|p| p.get(k)));
    let honest = RoutingHeaders {
        protocol_version: version.and_then(Value::as_str).map(str::to_owned),
        method: Some(method.to_owned()),
        name: body_name
            .and_then(Value::as_str)
            .map(era::encode_header_value),
        duplicated: None,
    };
    if let Some(name) = body_name.and_then(Value::as_str) {
        let encoded = era::encode_header_value(name);
        assert_eq!(
            era::decode_header_value(&encoded).as_deref(),
            Some(name),
            "{encoded}"
        );
        // What goes on the wire is a valid HTTP header value.
        assert!(encoded.bytes().all(|b| (0x20..0x7f).contains(&b)));
    }
    let with_honest = era::check_modern(method, params, Some(&honest));
    if version.is_some_and(Value::is_string) {
        assert_eq!(with_honest, bare, "honest headers {honest:?}");
    }

    // Headers bent by the input: each field kept, dropped, or replaced by
    // text from the input; maybe a duplicate.
    let sel = data.last().copied().unwrap_or(0);
    let text = String::from_utf8_lossy(data.get(..data.len().min(32)).unwrap_or_default());
    let bend = |shift: u8, honest: Option<String>| match (sel >> shift) & 3 {
        0 | 1 => honest,
        2 => None,
        _ => Some(text.clone().into_owned()),
    };
    let bent = RoutingHeaders {
        protocol_version: bend(0, honest.protocol_version.clone()),
        method: bend(2, honest.method.clone()),
        name: bend(4, honest.name.clone()),
        duplicated: (sel >> 6 == 3).then_some(era::HEADER_NAME),
    };
    let with_bent = era::check_modern(method, params, Some(&bent));
    match &with_bent {
        Ok(env) => assert_eq!(bare.as_ref(), Ok(env), "headers may only add refusals"),
        Err(e) => assert!(
            [
                INVALID_PARAMS,
                HEADER_MISMATCH,
                UNSUPPORTED_PROTOCOL_VERSION
            ]
            .contains(&e.code),
            "{e:?}"
        ),
    }
    if bent.duplicated.is_some() {
        assert!(with_bent.is_err());
    }
}

/// A message written as one SSE event decodes back to its exact JSON.
fn sse_encoding(m: &Message) {
    let json = m.to_json();
    let mut d = Decoder::new(usize::MAX);
    let events = d
        .feed(sse::encode(&json, Some("7")).as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        events,
        vec![Event {
            event: Some("message".to_owned()),
            data: json,
            id: Some("7".to_owned()),
        }]
    );
}

/// Whole and chunked feeding agree, on events and on the first error.
fn sse_chunking(data: &[u8]) {
    let whole = Decoder::new(SSE_LIMIT).feed(data);

    let len = data.len();
    let a = usize::from(data.first().copied().unwrap_or(0)) % (len + 1);
    let b = a + usize::from(data.get(1).copied().unwrap_or(0)) % (len - a + 1);
    let mut chunked = Decoder::new(SSE_LIMIT);
    let mut events = Vec::new();
    let mut result: Result<(), SseError> = Ok(());
    for chunk in [data.get(..a), data.get(a..b), data.get(b..)] {
        match chunked.feed(chunk.unwrap_or_default()) {
            Ok(got) => events.extend(got),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    match (whole, result) {
        (Ok(all), Ok(())) => assert_eq!(all, events, "split at {a}, {b}"),
        (Err(e1), Err(e2)) => assert_eq!(e1, e2, "split at {a}, {b}"),
        (w, c) => panic!("whole {w:?} but chunked {c:?} (split at {a}, {b})"),
    }
}
