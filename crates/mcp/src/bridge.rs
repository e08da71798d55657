//! `portcullis connect`: a stdio MCP server that relays to the gateway's
//! `/mcp`, for desktop clients that only start MCP servers as processes.
//!
//! Each line on stdin is one JSON-RPC message, POSTed to the URL with the
//! task token; what comes back (a JSON body, or each event of an SSE
//! stream) is written to stdout, one message per line. The era follows the
//! client: a request whose `_meta` names a modern version goes out with the
//! stateless routing headers; anything else rides the legacy session that
//! the client's `initialize` opened (its `Mcp-Session-Id` is kept and
//! sent, and the session is deleted at end of input). An HTTP refusal that
//! is not JSON-RPC (a 401 for a revoked token, say) becomes a JSON-RPC
//! error for the request, so the client is never left waiting. When a call
//! enters a `reverify` state, the gateway returns a new token in the
//! result's `_meta`; the bridge switches to it, since the old one is dead.
//! Nothing is logged to stdout but protocol messages.
//!
//! An `https://` URL is verified against the system trust roots
//! (`SSL_CERT_FILE`/`SSL_CERT_DIR` name others; see `portcullis-tls`).

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};

use crate::client::MAX_MESSAGE_BYTES;
use crate::era;
use crate::jsonrpc::{self, Id, Incoming, Message};
use crate::sse;

/// `_meta` key under which the gateway returns a rotated access token.
pub const META_ACCESS_TOKEN: &str = "portcullis/access_token";

/// Whether `new` is a rotation of `current`: both JWTs name the same
/// `task_id` and `sub`. Only the claims are read, not the signature, which
/// is the gateway's to check; this only keeps the bridge from switching to
/// a token of some other task.
fn is_rotation_of(current: &str, new: &str) -> bool {
    fn binding(token: &str) -> Option<(String, String)> {
        use base64::Engine as _;
        let payload = token.split('.').nth(1)?;
        if payload.len() > 16 * 1024 {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?;
        let claims: Value = serde_json::from_slice(&bytes).ok()?;
        Some((
            claims.get("task_id")?.as_str()?.to_owned(),
            claims.get("sub")?.as_str()?.to_owned(),
        ))
    }
    match (binding(current), binding(new)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

struct Bridge {
    uri: Uri,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    token: Mutex<String>,
    session: Mutex<Option<HeaderValue>>,
    version: Mutex<Option<HeaderValue>>,
    out: tokio::sync::Mutex<tokio::io::Stdout>,
}

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A bad URL or token.
    #[error("{0}")]
    Setup(String),
    /// stdin or stdout failed.
    #[error("stdio: {0}")]
    Io(#[from] std::io::Error),
}

/// Relays stdin/stdout to `url` with `token` until stdin ends.
pub async fn run(url: &str, token: &str) -> Result<(), BridgeError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| BridgeError::Setup(format!("bad url {url:?}: {e}")))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(BridgeError::Setup(
                "only http:// and https:// URLs are supported".to_owned(),
            ));
        }
    };
    // No ALPN here: the connector sets it.
    let tls = if https {
        portcullis_tls::client_config(&portcullis_tls::ClientTls::default(), &[])
    } else {
        portcullis_tls::trusting_nothing()
    }
    .map_err(|e| BridgeError::Setup(format!("tls: {e}")))?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let builder = HttpsConnectorBuilder::new().with_tls_config((*tls).clone());
    let connector = if https {
        builder.https_only()
    } else {
        builder.https_or_http()
    }
    .enable_http1()
    .wrap_connector(http);
    HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| BridgeError::Setup("the token is not a valid header value".to_owned()))?;
    let bridge = Arc::new(Bridge {
        uri,
        client: Client::builder(TokioExecutor::new()).build(connector),
        token: Mutex::new(token.to_owned()),
        session: Mutex::new(None),
        version: Mutex::new(None),
        out: tokio::sync::Mutex::new(tokio::io::stdout()),
    });
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        line.clear();
        match crate::client::read_line(&mut stdin, &mut line, MAX_MESSAGE_BYTES).await {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                bridge
                    .emit_error(None, jsonrpc::INVALID_REQUEST, "message too large")
                    .await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let message = match jsonrpc::parse(&line, MAX_MESSAGE_BYTES) {
            Ok(Incoming::One(Ok(m))) => m,
            Ok(_) | Err(_) => {
                bridge
                    .emit_error(
                        None,
                        jsonrpc::INVALID_REQUEST,
                        "not a single JSON-RPC message",
                    )
                    .await?;
                continue;
            }
        };
        // `initialize` must finish before anything else is sent: later
        // requests need the session it opens.
        let is_init = message.method() == Some("initialize");
        let b = bridge.clone();
        if is_init {
            b.relay(message).await?;
        } else {
            tasks.spawn(async move { b.relay(message).await });
        }
        while let Some(done) = tasks.try_join_next() {
            if let Ok(Err(e)) = done {
                return Err(e);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            return Err(e);
        }
    }
    bridge.end_session().await;
    Ok(())
}

impl Bridge {
    async fn emit(&self, value: &Value) -> Result<(), BridgeError> {
        let mut text = value.to_string();
        text.push('\n');
        let mut out = self.out.lock().await;
        out.write_all(text.as_bytes()).await?;
        out.flush().await?;
        Ok(())
    }

    async fn emit_error(
        &self,
        id: Option<&Id>,
        code: i64,
        message: &str,
    ) -> Result<(), BridgeError> {
        let id = id.map_or(Value::Null, Id::to_value);
        self.emit(&json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
            .await
    }

    fn request(&self, method: Method, message: Option<&Message>) -> Option<Request<Full<Bytes>>> {
        let token = self
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut b = Request::builder()
            .method(method)
            .uri(self.uri.clone())
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::ACCEPT, "application/json, text/event-stream");
        let modern = message
            .and_then(Message::params)
            .and_then(|p| p.get("_meta"))
            .and_then(|m| m.get(era::META_PROTOCOL_VERSION))
            .and_then(Value::as_str)
            .filter(|v| era::Era::of(v) == Some(era::Era::Modern));
        match (modern, message) {
            (Some(version), Some(m)) => {
                b = b.header(era::HEADER_PROTOCOL_VERSION, version);
                if let Some(method) = m.method() {
                    b = b.header(era::HEADER_METHOD, method);
                    if let Some(name) =
                        era::name_param(method).and_then(|k| m.params()?.get(k)?.as_str())
                    {
                        b = b.header(era::HEADER_NAME, era::encode_header_value(name));
                    }
                }
            }
            _ => {
                if let Some(s) = self
                    .session
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
                {
                    b = b.header(era::HEADER_SESSION, s);
                }
                if let Some(v) = self
                    .version
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
                {
                    b = b.header(era::HEADER_PROTOCOL_VERSION, v);
                }
            }
        }
        let body = message
            .map(|m| Bytes::from(m.to_json()))
            .unwrap_or_default();
        if message.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(body)).ok()
    }

    async fn relay(&self, message: Message) -> Result<(), BridgeError> {
        let id = match &message {
            Message::Request { id, .. } => Some(id.clone()),
            _ => None,
        };
        let Some(req) = self.request(Method::POST, Some(&message)) else {
            return self.fail(id.as_ref(), "could not build the request").await;
        };
        let response = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                return self
                    .fail(id.as_ref(), &format!("gateway unreachable: {e}"))
                    .await;
            }
        };
        let status = response.status();
        if message.method() == Some("initialize")
            && let Some(s) = response.headers().get(era::HEADER_SESSION)
        {
            *self.session.lock().unwrap_or_else(PoisonError::into_inner) = Some(s.clone());
        }
        let is_sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_sse {
            let mut body = response.into_body();
            let mut decoder = sse::Decoder::new(MAX_MESSAGE_BYTES);
            while let Some(Ok(frame)) = body.frame().await {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                let Ok(events) = decoder.feed(data) else {
                    break;
                };
                for event in events {
                    if let Ok(v) = serde_json::from_str::<Value>(&event.data) {
                        self.forward(v).await?;
                    }
                }
            }
            return Ok(());
        }
        let bytes = match Limited::new(response.into_body(), MAX_MESSAGE_BYTES)
            .collect()
            .await
        {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                return self
                    .fail(id.as_ref(), &format!("reading the answer: {e}"))
                    .await;
            }
        };
        if bytes.is_empty() {
            if status.is_success() {
                return Ok(());
            }
            return self
                .fail(id.as_ref(), &format!("gateway answered HTTP {status}"))
                .await;
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) if v.get("jsonrpc").is_some() => self.forward(v).await,
            Ok(v) => {
                // The gateway's own error shape ({error, detail}).
                let why = format!(
                    "gateway answered HTTP {status}: {} {}",
                    v.get("error").and_then(Value::as_str).unwrap_or_default(),
                    v.get("detail").and_then(Value::as_str).unwrap_or_default()
                );
                self.fail(id.as_ref(), why.trim_end()).await
            }
            Err(_) => {
                self.fail(id.as_ref(), &format!("gateway answered HTTP {status}"))
                    .await
            }
        }
    }

    /// Writes a message from the gateway, noting a negotiated version and a
    /// rotated token on the way.
    async fn forward(&self, v: Value) -> Result<(), BridgeError> {
        if let Some(result) = v.get("result") {
            if let Some(version) = result.get("protocolVersion").and_then(Value::as_str)
                && let Ok(h) = HeaderValue::from_str(version)
            {
                *self.version.lock().unwrap_or_else(PoisonError::into_inner) = Some(h);
            }
            if let Some(t) = result
                .get("_meta")
                .and_then(|m| m.get(META_ACCESS_TOKEN))
                .and_then(Value::as_str)
                && HeaderValue::from_str(&format!("Bearer {t}")).is_ok()
            {
                let mut token = self.token.lock().unwrap_or_else(PoisonError::into_inner);
                // The gateway strips its namespace from upstream results, so
                // this field is its own; still, a rotation never changes the
                // task or the agent, so a token that names another is not
                // taken (the gateway checks every token it gets anyway).
                if is_rotation_of(&token, t) {
                    t.clone_into(&mut token);
                }
            }
        }
        self.emit(&v).await
    }

    async fn fail(&self, id: Option<&Id>, why: &str) -> Result<(), BridgeError> {
        match id {
            Some(id) => {
                self.emit_error(Some(id), jsonrpc::CONNECTION_CLOSED, why)
                    .await
            }
            // A notification has no answer to carry the failure.
            None => Ok(()),
        }
    }

    async fn end_session(&self) {
        let has = self
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if has && let Some(req) = self.request(Method::DELETE, None) {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), self.client.request(req))
                    .await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn jwt(claims: &Value) -> String {
        let b64 = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        format!("{}.{}.sig", b64(&json!({"alg": "EdDSA"})), b64(claims))
    }

    /// Regression: the bridge took any `portcullis/access_token` in a
    /// result as its new token; an upstream could plant one (the gateway
    /// now strips that namespace too). A token of another task or agent is
    /// never adopted.
    #[test]
    fn only_a_rotation_of_the_same_task_and_agent_is_adopted() {
        let current = jwt(&json!({"task_id": "t1", "sub": "bot", "jti": "a"}));
        let rotated = jwt(&json!({"task_id": "t1", "sub": "bot", "jti": "b"}));
        let other_task = jwt(&json!({"task_id": "t2", "sub": "bot"}));
        let other_agent = jwt(&json!({"task_id": "t1", "sub": "evil"}));
        assert!(is_rotation_of(&current, &rotated));
        assert!(!is_rotation_of(&current, &other_task));
        assert!(!is_rotation_of(&current, &other_agent));
        assert!(!is_rotation_of(&current, "not-a-jwt"));
        assert!(!is_rotation_of("opaque", &rotated));
    }
}
