//! JSON-RPC 2.0 messages (the framing of every MCP exchange).
//!
//! A message is one JSON object with `"jsonrpc": "2.0"` and one of three
//! shapes:
//!
//! | shape | members |
//! |---|---|
//! | request | `id` (string or integer), `method`, `params`? |
//! | notification | `method`, `params`? (no `id`) |
//! | response | `id`, and exactly one of `result` or `error` `{code, message, data?}` |
//!
//! A batch is a JSON array of messages. MCP dropped batches in 2025-06-18;
//! [`parse`] still recognises them so a server can answer each element or
//! refuse the whole, rather than misreading an array.
//!
//! Ids are kept exactly as received (a string, or the integer's own digits)
//! so an answer echoes the id the peer chose. `null` ids and fractional ids
//! are refused: MCP forbids the first, and the second cannot be echoed
//! exactly by every peer.

use serde_json::{Map, Number, Value};

/// Invalid JSON was received (JSON-RPC).
pub const PARSE_ERROR: i64 = -32700;
/// The JSON sent is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// The method does not exist or is not available.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Invalid method parameters (MCP also uses it for an unknown tool).
pub const INVALID_PARAMS: i64 = -32602;
/// Internal JSON-RPC error.
pub const INTERNAL_ERROR: i64 = -32603;
/// The peer went away before answering (MCP SDK convention).
pub const CONNECTION_CLOSED: i64 = -32000;
/// No answer in time (MCP SDK convention).
pub const REQUEST_TIMEOUT: i64 = -32001;
/// An HTTP routing header disagrees with the body (2026-07-28).
pub const HEADER_MISMATCH: i64 = -32020;
/// A capability the server needs from the client is missing (2026-07-28).
pub const MISSING_REQUIRED_CLIENT_CAPABILITY: i64 = -32021;
/// The requested protocol version is not supported (2026-07-28).
pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

/// Longest accepted method name, in bytes.
pub const MAX_METHOD_LEN: usize = 256;
/// Longest accepted string id, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Most elements accepted in a batch.
pub const MAX_BATCH: usize = 64;

/// A request id: a string, or an integer kept as the peer wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    /// An integer id.
    Num(Number),
    /// A string id.
    Str(String),
}

impl Id {
    /// The id as JSON.
    pub fn to_value(&self) -> Value {
        match self {
            Self::Num(n) => Value::Number(n.clone()),
            Self::Str(s) => Value::String(s.clone()),
        }
    }

    /// Reads an id; `None` for `null`, fractions, other types, or a string
    /// longer than [`MAX_ID_LEN`].
    pub fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => Some(Self::Num(n.clone())),
            Value::String(s) if s.len() <= MAX_ID_LEN => Some(Self::Str(s.clone())),
            _ => None,
        }
    }
}

impl From<u64> for Id {
    fn from(n: u64) -> Self {
        Self::Num(Number::from(n))
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Num(n) => write!(f, "{n}"),
            Self::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorObject {
    /// The code.
    pub code: i64,
    /// A short description.
    pub message: String,
    /// Extra data, if any.
    pub data: Option<Value>,
}

impl ErrorObject {
    /// An error without data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// Adds data.
    #[must_use]
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// The error as JSON.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("code".to_owned(), Value::from(self.code));
        m.insert("message".to_owned(), Value::from(self.message.clone()));
        if let Some(d) = &self.data {
            m.insert("data".to_owned(), d.clone());
        }
        Value::Object(m)
    }

    fn from_value(v: &Value) -> Option<Self> {
        let o = v.as_object()?;
        Some(Self {
            code: o.get("code")?.as_i64()?,
            message: o.get("message")?.as_str()?.to_owned(),
            data: o.get("data").cloned(),
        })
    }
}

impl std::fmt::Display for ErrorObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// One JSON-RPC message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A call that expects an answer.
    Request {
        /// Its id.
        id: Id,
        /// The method.
        method: String,
        /// The parameters, if any.
        params: Option<Value>,
    },
    /// A call that expects none.
    Notification {
        /// The method.
        method: String,
        /// The parameters, if any.
        params: Option<Value>,
    },
    /// An answer.
    Response {
        /// The id of the request it answers.
        id: Id,
        /// The result, or the error.
        outcome: Result<Value, ErrorObject>,
    },
}

impl Message {
    /// A request.
    pub fn request(id: Id, method: &str, params: Option<Value>) -> Self {
        Self::Request {
            id,
            method: method.to_owned(),
            params,
        }
    }

    /// A notification.
    pub fn notification(method: &str, params: Option<Value>) -> Self {
        Self::Notification {
            method: method.to_owned(),
            params,
        }
    }

    /// A successful answer.
    pub fn result(id: Id, result: Value) -> Self {
        Self::Response {
            id,
            outcome: Ok(result),
        }
    }

    /// An error answer.
    pub fn error(id: Id, error: ErrorObject) -> Self {
        Self::Response {
            id,
            outcome: Err(error),
        }
    }

    /// The method of a request or notification.
    pub fn method(&self) -> Option<&str> {
        match self {
            Self::Request { method, .. } | Self::Notification { method, .. } => Some(method),
            Self::Response { .. } => None,
        }
    }

    /// The params of a request or notification.
    pub fn params(&self) -> Option<&Value> {
        match self {
            Self::Request { params, .. } | Self::Notification { params, .. } => params.as_ref(),
            Self::Response { .. } => None,
        }
    }

    /// The message as JSON.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("jsonrpc".to_owned(), Value::from("2.0"));
        match self {
            Self::Request { id, method, params } => {
                m.insert("id".to_owned(), id.to_value());
                m.insert("method".to_owned(), Value::from(method.clone()));
                if let Some(p) = params {
                    m.insert("params".to_owned(), p.clone());
                }
            }
            Self::Notification { method, params } => {
                m.insert("method".to_owned(), Value::from(method.clone()));
                if let Some(p) = params {
                    m.insert("params".to_owned(), p.clone());
                }
            }
            Self::Response { id, outcome } => {
                m.insert("id".to_owned(), id.to_value());
                match outcome {
                    Ok(r) => m.insert("result".to_owned(), r.clone()),
                    Err(e) => m.insert("error".to_owned(), e.to_value()),
                };
            }
        }
        Value::Object(m)
    }

    /// The message as one line of compact JSON (no newline).
    pub fn to_json(&self) -> String {
        json_text(&self.to_value())
    }

    /// Reads one message from a JSON value.
    pub fn from_value(v: Value) -> Result<Self, Invalid> {
        let Value::Object(mut o) = v else {
            return Err(Invalid::new(None, "a message must be a JSON object"));
        };
        let id = match o.get("id") {
            None => None,
            Some(raw) => match Id::from_value(raw) {
                Some(id) => Some(id),
                None => {
                    return Err(Invalid::new(
                        None,
                        "id must be a string or an integer (and not null)",
                    ));
                }
            },
        };
        if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err(Invalid::new(id, "jsonrpc must be \"2.0\""));
        }
        if let Some(method) = o.get("method") {
            let Some(method) = method.as_str().map(str::to_owned) else {
                return Err(Invalid::new(id, "method must be a string"));
            };
            if method.is_empty() || method.len() > MAX_METHOD_LEN {
                return Err(Invalid::new(id, "method is empty or too long"));
            }
            if o.contains_key("result") || o.contains_key("error") {
                return Err(Invalid::new(
                    id,
                    "a request carries no result or error member",
                ));
            }
            let params = o.remove("params");
            if let Some(p) = &params
                && !(p.is_object() || p.is_array())
            {
                return Err(Invalid::new(id, "params must be an object or an array"));
            }
            return Ok(match id {
                Some(id) => Self::Request { id, method, params },
                None => Self::Notification { method, params },
            });
        }
        let Some(id) = id else {
            return Err(Invalid::new(None, "a response needs an id"));
        };
        match (o.remove("result"), o.get("error")) {
            (Some(r), None) => Ok(Self::Response { id, outcome: Ok(r) }),
            (None, Some(e)) => match ErrorObject::from_value(e) {
                Some(e) => Ok(Self::Response {
                    id,
                    outcome: Err(e),
                }),
                None => Err(Invalid::new(
                    Some(id),
                    "error must be {code: integer, message: string}",
                )),
            },
            _ => Err(Invalid::new(
                Some(id),
                "a response carries exactly one of result or error",
            )),
        }
    }
}

/// A JSON value that is not a valid message; `id` is kept when it could
/// be read, so the answer can name the request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid request: {why}")]
pub struct Invalid {
    /// The request's id, if readable.
    pub id: Option<Id>,
    /// What is wrong.
    pub why: &'static str,
}

impl Invalid {
    fn new(id: Option<Id>, why: &'static str) -> Self {
        Self { id, why }
    }

    /// The error object to answer with.
    pub fn to_error(&self) -> ErrorObject {
        ErrorObject::new(INVALID_REQUEST, self.why)
    }
}

/// Why bytes could not be read as JSON-RPC at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// More bytes than allowed.
    #[error("message exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// An empty array, or one over [`MAX_BATCH`] elements.
    #[error("a batch must hold 1 to {MAX_BATCH} messages")]
    BadBatch,
}

impl ParseError {
    /// The error object to answer with (id `null` is implied).
    pub fn to_error(&self) -> ErrorObject {
        match self {
            Self::NotJson(_) => ErrorObject::new(PARSE_ERROR, "Parse error"),
            Self::TooLarge { .. } | Self::BadBatch => {
                ErrorObject::new(INVALID_REQUEST, self.to_string())
            }
        }
    }
}

/// What one body or line held.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// One message (or one invalid object).
    One(Result<Message, Invalid>),
    /// A batch: each element read on its own.
    Batch(Vec<Result<Message, Invalid>>),
}

/// Reads a body or a line: at most `limit` bytes of JSON.
pub fn parse(bytes: &[u8], limit: usize) -> Result<Incoming, ParseError> {
    if bytes.len() > limit {
        return Err(ParseError::TooLarge { limit });
    }
    // serde_json bounds nesting (128 levels), so deep input cannot exhaust
    // the stack.
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ParseError::NotJson(e.to_string()))?;
    from_json(value)
}

/// Reads an already-parsed JSON value as a message or a batch.
pub fn from_json(value: Value) -> Result<Incoming, ParseError> {
    match value {
        Value::Array(items) => {
            if items.is_empty() || items.len() > MAX_BATCH {
                return Err(ParseError::BadBatch);
            }
            Ok(Incoming::Batch(
                items.into_iter().map(Message::from_value).collect(),
            ))
        }
        other => Ok(Incoming::One(Message::from_value(other))),
    }
}

/// `value` as compact JSON text: byte for byte what `value.to_string()`
/// gives, written straight into the buffer instead of through
/// `fmt::Display` (whose per-fragment calls were a measurable share of a
/// call's work on the gateway). Serializing a `Value` cannot fail.
pub fn json_text(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    /// `json_text` replaced `to_string()` where digests are taken (a
    /// call's `result_digest`): it must give the same bytes.
    #[test]
    fn json_text_is_byte_for_byte_to_string() {
        let values = [
            json!(null),
            json!({"b": 1, "a": [1.5, -2, 1e300, true, null], "é": "\u{1}\"\\/\n\u{2028}😀"}),
            json!({"content": [{"type": "text", "text": "hi"}], "isError": false, "n": u64::MAX}),
            json!([[], {}, "", 0, -0.0, i64::MIN]),
        ];
        for v in values {
            assert_eq!(json_text(&v), v.to_string());
        }
    }

    fn one(s: &str) -> Result<Message, Invalid> {
        match parse(s.as_bytes(), 1 << 20).unwrap() {
            Incoming::One(m) => m,
            Incoming::Batch(_) => panic!("batch"),
        }
    }

    #[test]
    fn request_notification_response_round_trip() {
        for m in [
            Message::request(Id::from(7), "tools/list", Some(json!({}))),
            Message::request(Id::Str("a".into()), "ping", None),
            Message::notification("notifications/initialized", None),
            Message::result(Id::from(1), json!({"tools": []})),
            Message::error(
                Id::Str("x".into()),
                ErrorObject::new(-32602, "Unknown tool: x").with_data(json!({"reason": "r"})),
            ),
        ] {
            assert_eq!(one(&m.to_json()).unwrap(), m);
        }
    }

    #[test]
    fn ids_are_echoed_exactly() {
        let m = one(r#"{"jsonrpc":"2.0","id":18446744073709551615,"method":"ping"}"#).unwrap();
        // The digits as written, whatever the key order of the build's
        // serde_json (`preserve_order` may be on through another crate).
        assert!(
            m.to_json().contains(r#""id":18446744073709551615"#),
            "{}",
            m.to_json()
        );
    }

    #[test]
    fn invalid_shapes_are_refused_with_the_id_when_readable() {
        for (s, id) in [
            (r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#, None),
            (r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#, None),
            (
                r#"{"jsonrpc":"1.0","id":3,"method":"ping"}"#,
                Some(Id::from(3)),
            ),
            (r#"{"jsonrpc":"2.0","id":3,"method":7}"#, Some(Id::from(3))),
            (r#"{"jsonrpc":"2.0","id":3,"method":""}"#, Some(Id::from(3))),
            (
                r#"{"jsonrpc":"2.0","id":3,"method":"x","params":5}"#,
                Some(Id::from(3)),
            ),
            (
                r#"{"jsonrpc":"2.0","id":3,"result":1,"error":{"code":1,"message":"m"}}"#,
                Some(Id::from(3)),
            ),
            (r#"{"jsonrpc":"2.0","result":1}"#, None),
            (r#"[1]"#, None),
        ] {
            let got = match parse(s.as_bytes(), 1024).unwrap() {
                Incoming::One(m) => m,
                Incoming::Batch(mut v) => v.remove(0),
            };
            let err = got.unwrap_err();
            assert_eq!(err.id, id, "{s}");
            assert_eq!(err.to_error().code, INVALID_REQUEST);
        }
    }

    #[test]
    fn bounds_and_garbage() {
        assert_eq!(parse(b"{}", 1), Err(ParseError::TooLarge { limit: 1 }));
        assert!(matches!(parse(b"{", 10), Err(ParseError::NotJson(_))));
        assert_eq!(parse(b"[]", 10), Err(ParseError::BadBatch));
        let deep = "[".repeat(10_000);
        assert!(matches!(
            parse(deep.as_bytes(), 1 << 20),
            Err(ParseError::NotJson(_))
        ));
        assert_eq!(parse(b"{", 10).unwrap_err().to_error().code, PARSE_ERROR);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse(&bytes, 4096);
        }
    }
}
