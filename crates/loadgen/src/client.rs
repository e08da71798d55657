//! The MCP client side: one keep-alive HTTP/1.1 connection per [`Caller`],
//! a pre-serialised request body in which only the JSON-RPC id changes, and
//! the classification of every answer as OK or as one kind of error.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::client::conn::http1::{SendRequest, handshake};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// The protocol version this harness speaks.
pub const PROTOCOL_VERSION: &str = "2026-07-28";

const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const ACCEPT_BOTH: HeaderValue = HeaderValue::from_static("application/json, text/event-stream");
const VERSION_VALUE: HeaderValue = HeaderValue::from_static(PROTOCOL_VERSION);
const TOOLS_CALL: HeaderValue = HeaderValue::from_static("tools/call");

/// How much of an error body is kept for the report.
const SNIPPET_CHARS: usize = 400;

/// Everything needed to call one tool on one target, prepared once.
#[derive(Debug)]
pub struct Endpoint {
    /// Host to connect to (brackets of an IPv6 literal removed).
    host: String,
    /// TCP port.
    port: u16,
    /// `Host` header.
    host_header: HeaderValue,
    /// Request target in origin form (path and query).
    path: Uri,
    /// `Authorization: Bearer …` values, marked sensitive: none, or one
    /// per token; connection `i` sends token `i mod n`.
    auth: Vec<HeaderValue>,
    /// `Mcp-Name` header: the tool name.
    mcp_name: HeaderValue,
    /// Body up to the id.
    prefix: Bytes,
    /// Body after the id.
    suffix: Bytes,
}

impl Endpoint {
    /// Prepare calls of `tool` with `args` to `url` (plain `http://` only),
    /// with no bearer token.
    #[cfg(test)]
    pub fn new(url: &str, tool: &str, args: &Value) -> Result<Self, String> {
        Self::with_tokens(url, tool, args, &[])
    }

    /// Prepare calls as [`Endpoint::new`], each connection sending one of
    /// `tokens` (connection `i` the token `i mod n`; none when empty).
    pub fn with_tokens(
        url: &str,
        tool: &str,
        args: &Value,
        tokens: &[String],
    ) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "URL {url:?}: scheme {other} not supported (plain http only, no TLS client)"
                ));
            }
            None => return Err(format!("URL {url:?}: expected http://HOST:PORT/PATH")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("URL {url:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("URL {url:?}: user info is not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(80);
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("URL {url:?}: bad host: {e}"))?;
        let path: Uri = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| format!("URL {url:?}: bad path: {e}"))?;
        let mcp_name =
            HeaderValue::from_str(tool).map_err(|e| format!("tool name {tool:?}: {e}"))?;
        let mut auth = Vec::with_capacity(tokens.len());
        for t in tokens {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| "token is not a valid header value".to_owned())?;
            v.set_sensitive(true);
            auth.push(v);
        }
        let params = json!({
            "name": tool,
            "arguments": args,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": PROTOCOL_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        });
        let prefix = Bytes::from_static(br#"{"jsonrpc":"2.0","id":"#);
        let suffix = Bytes::from(format!(r#","method":"tools/call","params":{params}}}"#));
        Ok(Self {
            host,
            port,
            host_header,
            path,
            auth,
            mcp_name,
            prefix,
            suffix,
        })
    }

    /// The request body for JSON-RPC id `id`.
    #[cfg(test)]
    pub fn body_for(&self, id: u64) -> Bytes {
        let mut buf = BytesMut::new();
        self.write_body(&mut buf, id);
        buf.freeze()
    }

    fn write_body(&self, buf: &mut BytesMut, id: u64) {
        let mut digits = [0u8; 20];
        let id_text = decimal(id, &mut digits);
        buf.reserve(self.prefix.len() + id_text.len() + self.suffix.len());
        buf.extend_from_slice(&self.prefix);
        buf.extend_from_slice(id_text);
        buf.extend_from_slice(&self.suffix);
    }
}

/// `n` in decimal, written into `out` without allocating.
fn decimal(mut n: u64, out: &mut [u8; 20]) -> &[u8] {
    let mut start = out.len();
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
        start -= 1;
        if n == 0 {
            break;
        }
    }
    out.get(start..).unwrap_or_default()
}

/// The kinds of failed call, each counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No complete answer before the deadline (scheduled time + timeout),
    /// including calls that waited in the queue past it.
    Timeout,
    /// The TCP connection or the HTTP handshake failed.
    Connect,
    /// The connection broke while sending or receiving.
    Transport,
    /// The HTTP status was not 200.
    HttpStatus,
    /// The body was larger than the cap.
    BodyTooLarge,
    /// The body was not a JSON-RPC response to this request.
    BadResponse,
    /// A JSON-RPC `error` response.
    JsonRpcError,
    /// A `result` with `isError: true`.
    ToolError,
}

impl ErrorKind {
    /// Number of kinds.
    pub const COUNT: usize = 8;
    /// All kinds, in report order.
    pub const ALL: [ErrorKind; Self::COUNT] = [
        ErrorKind::Timeout,
        ErrorKind::Connect,
        ErrorKind::Transport,
        ErrorKind::HttpStatus,
        ErrorKind::BodyTooLarge,
        ErrorKind::BadResponse,
        ErrorKind::JsonRpcError,
        ErrorKind::ToolError,
    ];

    /// Stable name used in the report and the JSON document.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Transport => "transport",
            ErrorKind::HttpStatus => "http_status",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::BadResponse => "bad_response",
            ErrorKind::JsonRpcError => "jsonrpc_error",
            ErrorKind::ToolError => "tool_error",
        }
    }

    /// Position in [`ErrorKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A failed call: its kind and what was seen (an excerpt of the body).
#[derive(Debug, Clone)]
pub struct Failure {
    /// The kind.
    pub kind: ErrorKind,
    /// Human-readable detail.
    pub detail: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// The start of a body, as text, for error reports.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text.chars().take(SNIPPET_CHARS).collect();
    if text.chars().nth(SNIPPET_CHARS).is_some() {
        out.push('…');
    }
    out
}

fn starts_with_ignore_case(hay: &[u8], prefix: &[u8]) -> bool {
    hay.get(..prefix.len())
        .is_some_and(|h| h.eq_ignore_ascii_case(prefix))
}

/// The first JSON-RPC response (an object with `result` or `error`) carried
/// by a `data:` event of a `text/event-stream` body.
pub fn sse_response(body: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(body).ok()?;
    let mut data = String::new();
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    loop {
        let line = lines.next();
        match line {
            Some(l) if !l.is_empty() => {
                if let Some(rest) = l.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
                }
                // Other fields (event:, id:, retry:) and comments are ignored.
            }
            _ => {
                if !data.is_empty() {
                    if let Ok(v) = serde_json::from_str::<Value>(&data)
                        && (v.get("result").is_some() || v.get("error").is_some())
                    {
                        return Some(v);
                    }
                    data.clear();
                }
                // End of the body: nothing found.
                line?;
            }
        }
    }
}

/// Decide whether an answer to the call with JSON-RPC id `id` is OK.
pub fn classify(
    status: StatusCode,
    content_type: Option<&[u8]>,
    body: &[u8],
    id: u64,
) -> Result<(), Failure> {
    if status != StatusCode::OK {
        return Err(Failure::new(
            ErrorKind::HttpStatus,
            format!("HTTP {status}: {}", snippet(body)),
        ));
    }
    let ct = content_type.unwrap_or_default();
    let v: Value = if starts_with_ignore_case(ct, b"application/json") {
        serde_json::from_slice(body).map_err(|e| {
            Failure::new(
                ErrorKind::BadResponse,
                format!("invalid JSON ({e}): {}", snippet(body)),
            )
        })?
    } else if starts_with_ignore_case(ct, b"text/event-stream") {
        sse_response(body).ok_or_else(|| {
            Failure::new(
                ErrorKind::BadResponse,
                format!(
                    "no JSON-RPC response in the event stream: {}",
                    snippet(body)
                ),
            )
        })?
    } else {
        return Err(Failure::new(
            ErrorKind::BadResponse,
            format!(
                "unexpected content-type {:?}: {}",
                String::from_utf8_lossy(ct),
                snippet(body)
            ),
        ));
    };
    if v.get("error").is_some() {
        return Err(Failure::new(ErrorKind::JsonRpcError, snippet(body)));
    }
    let Some(result) = v.get("result").filter(|r| r.is_object()) else {
        return Err(Failure::new(
            ErrorKind::BadResponse,
            format!("no result object: {}", snippet(body)),
        ));
    };
    if v.get("id").and_then(Value::as_u64) != Some(id) {
        return Err(Failure::new(
            ErrorKind::BadResponse,
            format!("id mismatch (sent {id}): {}", snippet(body)),
        ));
    }
    if result.get("isError").and_then(Value::as_bool) == Some(true) {
        return Err(Failure::new(ErrorKind::ToolError, snippet(body)));
    }
    Ok(())
}

/// One client connection to one target, reused across calls and re-opened
/// when the server closes it.
#[derive(Debug)]
pub struct Caller {
    ep: Arc<Endpoint>,
    /// Which of the endpoint's tokens this connection sends.
    slot: usize,
    conn: Option<SendRequest<Full<Bytes>>>,
    buf: BytesMut,
    max_body: usize,
    /// Connections this caller opened.
    pub connects: u64,
}

impl Caller {
    /// A caller with no connection yet, sending the endpoint's first token.
    pub fn new(ep: Arc<Endpoint>, max_body: usize) -> Self {
        Self::in_slot(ep, max_body, 0)
    }

    /// A caller with no connection yet, sending the endpoint's token
    /// `slot mod n`.
    pub fn in_slot(ep: Arc<Endpoint>, max_body: usize, slot: usize) -> Self {
        let cap = (ep.prefix.len() + 20 + ep.suffix.len()) * 4;
        let slot = slot.checked_rem(ep.auth.len()).unwrap_or(0);
        Self {
            ep,
            slot,
            conn: None,
            buf: BytesMut::with_capacity(cap),
            max_body,
            connects: 0,
        }
    }

    async fn connect(&mut self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let connect_err = |e: &dyn std::fmt::Display| {
            Failure::new(
                ErrorKind::Connect,
                format!("{}:{}: {e}", self.ep.host, self.ep.port),
            )
        };
        let stream = TcpStream::connect((self.ep.host.as_str(), self.ep.port))
            .await
            .map_err(|e| connect_err(&e))?;
        stream.set_nodelay(true).map_err(|e| connect_err(&e))?;
        let (sender, conn) = handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_err(&e))?;
        tokio::spawn(async move {
            // A broken connection shows up in the request that used it.
            let _ = conn.await;
        });
        self.connects += 1;
        Ok(sender)
    }

    fn request(&mut self, id: u64) -> Request<Full<Bytes>> {
        self.ep.write_body(&mut self.buf, id);
        let body = self.buf.split().freeze();
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.ep.path.clone();
        let h = req.headers_mut();
        h.reserve(8);
        h.insert(HOST, self.ep.host_header.clone());
        h.insert(CONTENT_TYPE, JSON);
        h.insert(ACCEPT, ACCEPT_BOTH);
        h.insert(MCP_PROTOCOL_VERSION, VERSION_VALUE);
        h.insert(MCP_METHOD, TOOLS_CALL);
        h.insert(MCP_NAME, self.ep.mcp_name.clone());
        if let Some(auth) = self.ep.auth.get(self.slot) {
            h.insert(AUTHORIZATION, auth.clone());
        }
        req
    }

    /// Make one call with JSON-RPC id `id`. On success, returns the instant
    /// the request was handed to the connection (after any connect), from
    /// which the service time is measured.
    ///
    /// Not bounded in time by itself: the caller wraps it in a timeout.
    /// Dropping the future mid-call drops the connection with it.
    pub async fn call(&mut self, id: u64) -> Result<Instant, Failure> {
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        if sender.ready().await.is_err() {
            // The server closed an idle connection: open a fresh one.
            sender = self.connect().await?;
            sender
                .ready()
                .await
                .map_err(|e| Failure::new(ErrorKind::Connect, e.to_string()))?;
        }
        let req = self.request(id);
        let sent = Instant::now();
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Failure::new(ErrorKind::Transport, e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let collected = Limited::new(body, self.max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    Failure::new(
                        ErrorKind::BodyTooLarge,
                        format!("HTTP {}: body over {} bytes", parts.status, self.max_body),
                    )
                } else {
                    Failure::new(ErrorKind::Transport, e.to_string())
                }
            })?;
        // The whole answer was read: the connection can take the next call.
        self.conn = Some(sender);
        let body = collected.to_bytes();
        let ct = parts.headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes);
        classify(parts.status, ct, &body, id)?;
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn decimal_digits() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(7, &mut b), b"7");
        assert_eq!(decimal(1234567890, &mut b), b"1234567890");
        assert_eq!(decimal(u64::MAX, &mut b), u64::MAX.to_string().as_bytes());
    }

    #[test]
    fn body_template() {
        let ep = Endpoint::with_tokens(
            "http://127.0.0.1:9000/mcp",
            "demo.echo",
            &json!({"text": "hi"}),
            &["tok".to_owned()],
        )
        .unwrap();
        let body = ep.body_for(42);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["id"], 42);
        assert_eq!(v["method"], "tools/call");
        assert_eq!(v["params"]["name"], "demo.echo");
        assert_eq!(v["params"]["arguments"]["text"], "hi");
        assert_eq!(
            v["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"],
            PROTOCOL_VERSION
        );
        assert!(v["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"].is_object());
        assert_eq!(ep.port, 9000);
        assert_eq!(ep.path.to_string(), "/mcp");
        assert!(ep.auth.iter().all(HeaderValue::is_sensitive));

        let mut c = Caller::new(Arc::new(ep), 1024);
        let req = c.request(5);
        assert_eq!(req.headers()["mcp-name"], "demo.echo");
        assert_eq!(req.headers()["mcp-method"], "tools/call");
        assert_eq!(req.headers()["mcp-protocol-version"], PROTOCOL_VERSION);
        assert_eq!(req.headers()["host"], "127.0.0.1:9000");
        assert_eq!(req.headers()["authorization"], "Bearer tok");
        assert_eq!(req.uri(), "/mcp");
    }

    #[test]
    fn connections_take_turns_with_several_tokens() {
        let tokens: Vec<String> = ["a", "b", "c"].iter().map(|t| (*t).to_owned()).collect();
        let ep = Arc::new(
            Endpoint::with_tokens("http://127.0.0.1:9000/mcp", "t", &json!({}), &tokens).unwrap(),
        );
        let sent: Vec<String> = (0..5)
            .map(|slot| {
                let mut c = Caller::in_slot(Arc::clone(&ep), 1024, slot);
                c.request(1).headers()["authorization"]
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            sent,
            ["Bearer a", "Bearer b", "Bearer c", "Bearer a", "Bearer b"]
        );
        let none = Arc::new(Endpoint::new("http://127.0.0.1:9000/mcp", "t", &json!({})).unwrap());
        let mut c = Caller::in_slot(none, 1024, 7);
        assert!(c.request(1).headers().get("authorization").is_none());
    }

    #[test]
    fn urls() {
        let a = json!({});
        assert!(Endpoint::new("https://x/mcp", "t", &a).is_err());
        assert!(Endpoint::new("127.0.0.1:9000/mcp", "t", &a).is_err());
        assert!(Endpoint::new("http://u:p@127.0.0.1/mcp", "t", &a).is_err());
        let e = Endpoint::new("http://[::1]/", "t", &a).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 80));
    }

    const CT_JSON: Option<&[u8]> = Some(b"application/json");

    #[test]
    fn classify_json() {
        let ok = br#"{"jsonrpc":"2.0","id":3,"result":{"content":[],"isError":false}}"#;
        assert!(classify(StatusCode::OK, CT_JSON, ok, 3).is_ok());
        let no_flag = br#"{"jsonrpc":"2.0","id":3,"result":{"content":[]}}"#;
        assert!(classify(StatusCode::OK, CT_JSON, no_flag, 3).is_ok());
        let e = classify(StatusCode::OK, CT_JSON, ok, 4).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadResponse);
        let tool_err = br#"{"jsonrpc":"2.0","id":3,"result":{"content":[],"isError":true}}"#;
        let e = classify(StatusCode::OK, CT_JSON, tool_err, 3).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ToolError);
        let rpc_err = br#"{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"no"}}"#;
        let e = classify(StatusCode::OK, CT_JSON, rpc_err, 3).unwrap_err();
        assert_eq!(e.kind, ErrorKind::JsonRpcError);
        assert!(e.detail.contains("-32602"));
        let e = classify(StatusCode::UNAUTHORIZED, CT_JSON, b"denied", 3).unwrap_err();
        assert_eq!(e.kind, ErrorKind::HttpStatus);
        assert!(e.detail.contains("401") && e.detail.contains("denied"));
        let e = classify(StatusCode::OK, Some(b"text/plain"), ok, 3).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadResponse);
        let e = classify(StatusCode::OK, CT_JSON, b"{", 3).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadResponse);
    }

    #[test]
    fn classify_sse() {
        let ct: Option<&[u8]> = Some(b"text/event-stream; charset=utf-8");
        let body = b": comment\r\nevent: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\r\n\r\nevent: message\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":9,\r\ndata: \"result\":{\"isError\":false}}\r\n\r\n";
        assert!(classify(StatusCode::OK, ct, body, 9).is_ok());
        let unterminated = b"data: {\"jsonrpc\":\"2.0\",\"id\":9,\"result\":{}}";
        assert!(classify(StatusCode::OK, ct, unterminated, 9).is_ok());
        let e = classify(StatusCode::OK, ct, b"data: nope\n\n", 9).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadResponse);
        let e = classify(StatusCode::OK, ct, b"", 9).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadResponse);
    }

    #[test]
    fn snippets_are_bounded() {
        let long = vec![b'x'; 5000];
        let s = snippet(&long);
        assert_eq!(s.chars().count(), SNIPPET_CHARS + 1);
        assert_eq!(snippet(b"short"), "short");
    }
}
