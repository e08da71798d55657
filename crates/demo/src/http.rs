//! The Streamable HTTP transport: one endpoint, `/mcp`, HTTP/1.1 with
//! keep-alive.
//!
//! A POST whose `MCP-Protocol-Version` header names a modern version (or
//! any version the handshake era does not know, or none on a
//! `server/discover`) is answered statelessly: the routing headers and the
//! `_meta` envelope are checked with [`era::check_modern`], a result is
//! HTTP 200 and an error carries [`era::http_status_for`] its code.
//!
//! Any other POST belongs to the handshake era: `initialize` opens a
//! session (its id comes back in `Mcp-Session-Id`), and every later POST
//! must carry a known session id (missing: 400, unknown: 404). `DELETE`
//! ends a session; `GET` is 405, as this server never starts a stream of
//! its own. Answers are single `application/json` bodies, which the
//! specification allows in place of an SSE stream; notifications get 202.
//!
//! Bounds: bodies over [`MAX_BODY`] are 413, at most [`MAX_SESSIONS`]
//! sessions live at once (the oldest goes first), and at most
//! [`MAX_CONNECTIONS`] connections are served at once.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use portcullis_mcp::era::{self, Era, RoutingHeaders};
use portcullis_mcp::jsonrpc::{self, ErrorObject, INVALID_REQUEST, Incoming as Parsed};
use portcullis_mcp::{Id, Message};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{DemoError, DemoServer};

/// The endpoint.
pub const PATH: &str = "/mcp";
/// Largest request body, in bytes.
pub const MAX_BODY: usize = 1 << 20;
/// Most live handshake-era sessions.
pub const MAX_SESSIONS: usize = 10_000;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = Response<Full<Bytes>>;

/// Serves `server` on `listener` until the task is dropped.
pub async fn serve(server: DemoServer, listener: TcpListener) -> Result<(), DemoError> {
    let own_origin = listener
        .local_addr()
        .map(|a| format!("http://{a}"))
        .unwrap_or_default();
    let state = Arc::new(State {
        server,
        sessions: Sessions::default(),
        own_origin,
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return Ok(());
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait, then go on.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(state.handle(req).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
}

struct State {
    server: DemoServer,
    sessions: Sessions,
    /// `http://ADDR` of the listener: with loopback, the only `Origin`
    /// served.
    own_origin: String,
}

impl State {
    async fn handle(&self, req: Request<Incoming>) -> Reply {
        if req.uri().path() != PATH {
            return plain(StatusCode::NOT_FOUND, "not found");
        }
        // A browser page must not drive this server (DNS rebinding): the
        // same `Origin` check as the gateway's `/mcp`.
        if let Some(origin) = req.headers().get(header::ORIGIN)
            && !origin
                .to_str()
                .is_ok_and(|o| era::origin_allowed(o, &self.own_origin))
        {
            let body = json!({"jsonrpc": "2.0", "id": null, "error": {
                "code": INVALID_REQUEST,
                "message": "Origin not allowed"
            }});
            let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
            *r.status_mut() = StatusCode::FORBIDDEN;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return r;
        }
        match *req.method() {
            Method::POST => self.post(req).await,
            Method::DELETE => self.delete(req.headers()),
            _ => {
                let mut r = plain(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "this server sends no stream of its own: POST requests, DELETE a session",
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
                r
            }
        }
    }

    async fn post(&self, req: Request<Incoming>) -> Reply {
        if !accepts(req.headers()) {
            return plain(
                StatusCode::NOT_ACCEPTABLE,
                "Accept must allow application/json or text/event-stream",
            );
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return too_large();
        }
        let (parts, body) = req.into_parts();
        let bytes = match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Err(_) => return plain(StatusCode::BAD_REQUEST, "the body could not be read"),
        };
        let message = match jsonrpc::parse(&bytes, MAX_BODY) {
            Err(jsonrpc::ParseError::TooLarge { .. }) => return too_large(),
            Err(e) => return rpc_error(StatusCode::BAD_REQUEST, None, &e.to_error()),
            Ok(Parsed::Batch(_)) => {
                let e = ErrorObject::new(INVALID_REQUEST, "batches are not supported");
                return rpc_error(StatusCode::BAD_REQUEST, None, &e);
            }
            Ok(Parsed::One(Err(invalid))) => {
                let error = invalid.to_error();
                return rpc_error(StatusCode::BAD_REQUEST, invalid.id, &error);
            }
            Ok(Parsed::One(Ok(m))) => m,
        };
        let headers = &parts.headers;
        let version = headers
            .get(era::HEADER_PROTOCOL_VERSION)
            .and_then(|v| v.to_str().ok());
        let modern = match version {
            Some(v) => !era::LEGACY_VERSIONS.contains(&v),
            None => message.method() == Some("server/discover"),
        };
        if modern {
            self.modern(headers, message).await
        } else {
            self.legacy(headers, message).await
        }
    }

    /// The stateless path.
    async fn modern(&self, headers: &HeaderMap, message: Message) -> Reply {
        let Message::Request { id, method, params } = message else {
            return accepted();
        };
        let routing = routing_headers(headers);
        let outcome = match era::check_modern(&method, params.as_ref(), Some(&routing)) {
            Ok(_) => {
                self.server
                    .handle(Era::Modern, &method, params.as_ref())
                    .await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(result) => json_reply(StatusCode::OK, Message::result(id, result).to_json()),
            Err(e) => rpc_error(status_for(e.code), Some(id), &e),
        }
    }

    /// The handshake-era path.
    async fn legacy(&self, headers: &HeaderMap, message: Message) -> Reply {
        if let Message::Request { id, method, params } = &message
            && method == "initialize"
        {
            let result = self
                .server
                .handle(Era::Legacy, method, params.as_ref())
                .await;
            let session = self.sessions.open();
            let mut reply = match result {
                Ok(r) => json_reply(StatusCode::OK, Message::result(id.clone(), r).to_json()),
                Err(e) => return rpc_error(StatusCode::OK, Some(id.clone()), &e),
            };
            if let Ok(v) = HeaderValue::from_str(&session) {
                reply.headers_mut().insert(era::HEADER_SESSION, v);
            }
            return reply;
        }
        let id = match &message {
            Message::Request { id, .. } => Some(id.clone()),
            _ => None,
        };
        match headers
            .get(era::HEADER_SESSION)
            .and_then(|v| v.to_str().ok())
        {
            None => {
                let e = ErrorObject::new(
                    INVALID_REQUEST,
                    "missing Mcp-Session-Id header (send initialize first)",
                );
                return rpc_error(StatusCode::BAD_REQUEST, id, &e);
            }
            Some(s) if !self.sessions.contains(s) => {
                let e = ErrorObject::new(INVALID_REQUEST, "session not found");
                return rpc_error(StatusCode::NOT_FOUND, id, &e);
            }
            Some(_) => {}
        }
        match message {
            Message::Request { id, method, params } => {
                let outcome = self
                    .server
                    .handle(Era::Legacy, &method, params.as_ref())
                    .await;
                let m = match outcome {
                    Ok(r) => Message::result(id, r),
                    Err(e) => Message::error(id, e),
                };
                json_reply(StatusCode::OK, m.to_json())
            }
            _ => accepted(),
        }
    }

    fn delete(&self, headers: &HeaderMap) -> Reply {
        match headers
            .get(era::HEADER_SESSION)
            .and_then(|v| v.to_str().ok())
        {
            None => plain(StatusCode::BAD_REQUEST, "missing Mcp-Session-Id header"),
            Some(s) if self.sessions.close(s) => plain(StatusCode::OK, ""),
            Some(_) => plain(StatusCode::NOT_FOUND, "session not found"),
        }
    }
}

/// The live handshake-era sessions.
#[derive(Default)]
struct Sessions {
    table: RwLock<SessionTable>,
    counter: AtomicU64,
    /// Keys the session-id hash; random per process.
    keys: RandomState,
}

#[derive(Default)]
struct SessionTable {
    live: HashMap<Box<str>, ()>,
    /// Ids in opening order, for evicting the oldest.
    order: VecDeque<Box<str>>,
}

impl Sessions {
    /// Opens a session and returns its id: 128 bits of a keyed hash of a
    /// counter, unique and hard to guess (this is a demo server, not an
    /// authentication boundary).
    fn open(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{:016x}{:016x}",
            self.keys.hash_one((n, 0u8)),
            self.keys.hash_one((n, 1u8))
        );
        let mut t = self.table.write().unwrap_or_else(PoisonError::into_inner);
        while t.live.len() >= MAX_SESSIONS {
            match t.order.pop_front() {
                Some(old) => {
                    t.live.remove(&old);
                }
                None => break,
            }
        }
        t.live.insert(id.clone().into_boxed_str(), ());
        t.order.push_back(id.clone().into_boxed_str());
        id
    }

    fn contains(&self, id: &str) -> bool {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .live
            .contains_key(id)
    }

    fn close(&self, id: &str) -> bool {
        let mut t = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let found = t.live.remove(id).is_some();
        if found {
            t.order.retain(|o| &**o != id);
        }
        found
    }
}

/// Whether `Accept` (if present) allows a JSON or SSE answer.
fn accepts(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::ACCEPT).iter().peekable();
    if values.peek().is_none() {
        return true;
    }
    values.filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').any(|item| {
            let media = item.split(';').next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("application/json")
                || media.eq_ignore_ascii_case("text/event-stream")
                || media == "*/*"
                || media.eq_ignore_ascii_case("application/*")
        })
    })
}

/// The routing headers as received; a repeated one is noted.
fn routing_headers(headers: &HeaderMap) -> RoutingHeaders {
    let mut duplicated = None;
    let mut one = |name: &'static str| {
        let mut all = headers.get_all(name).iter();
        let first = all.next()?;
        if all.next().is_some() && duplicated.is_none() {
            duplicated = Some(name);
        }
        first.to_str().ok().map(str::to_owned)
    };
    let protocol_version = one(era::HEADER_PROTOCOL_VERSION);
    let method = one(era::HEADER_METHOD);
    let name = one(era::HEADER_NAME);
    RoutingHeaders {
        protocol_version,
        method,
        name,
        duplicated,
    }
}

fn status_for(code: i64) -> StatusCode {
    StatusCode::from_u16(era::http_status_for(code)).unwrap_or(StatusCode::BAD_REQUEST)
}

fn json_reply(status: StatusCode, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn rpc_error(status: StatusCode, id: Option<Id>, e: &ErrorObject) -> Reply {
    let body = match id {
        Some(id) => Message::error(id, e.clone()).to_json(),
        None => json!({ "jsonrpc": "2.0", "id": Value::Null, "error": e.to_value() }).to_string(),
    };
    json_reply(status, body)
}

fn plain(status: StatusCode, text: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn accepted() -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::ACCEPTED;
    r
}

fn too_large() -> Reply {
    let e = ErrorObject::new(
        INVALID_REQUEST,
        format!("the body exceeds {MAX_BODY} bytes"),
    );
    let mut r = rpc_error(StatusCode::PAYLOAD_TOO_LARGE, None, &e);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accept_is_lenient_but_not_blind() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        assert!(!accepts(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json;q=0.9, text/event-stream"),
        );
        assert!(accepts(&h));
    }

    #[test]
    fn repeated_routing_headers_are_noted() {
        let mut h = HeaderMap::new();
        h.append(era::HEADER_METHOD, HeaderValue::from_static("tools/list"));
        h.append(era::HEADER_METHOD, HeaderValue::from_static("tools/call"));
        h.append(era::HEADER_NAME, HeaderValue::from_static("echo"));
        let r = routing_headers(&h);
        assert_eq!(r.duplicated, Some(era::HEADER_METHOD));
        assert_eq!(r.name.as_deref(), Some("echo"));
        assert_eq!(r.protocol_version, None);
    }

    #[test]
    fn sessions_open_close_and_stay_bounded() {
        let s = Sessions::default();
        let a = s.open();
        let b = s.open();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(s.contains(&a));
        assert!(s.close(&a));
        assert!(!s.close(&a));
        assert!(!s.contains(&a));
        assert!(s.contains(&b));
    }
}
