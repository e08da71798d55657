//! `/mcp`: the gateway as an MCP server (Streamable HTTP), in both eras.
//!
//! Every request is authenticated with a task token first (a refusal is
//! 401, audited, before any JSON-RPC is read). Then:
//!
//! - A POST whose `MCP-Protocol-Version` names a modern version takes the
//!   **stateless** path (2026-07-28): the envelope and the routing headers
//!   are checked (`Mcp-Method`/`Mcp-Name` disagreeing with the body: 400
//!   with -32020), and `server/discover`, `tools/list` and `tools/call`
//!   are served; the methods 2026-07-28 removed (`initialize`, `ping`, …)
//!   are "Method not found" (404, -32601). Nothing is remembered between
//!   requests.
//! - Anything else takes the **session** path (2025-11-25): `initialize`
//!   opens a session bound to the token's task (answered with
//!   `Mcp-Session-Id`); later requests must name a live session, and a
//!   token of another task on it is `task_mismatch`. GET answers 405 (the
//!   gateway sends no server-initiated messages), DELETE ends the session.
//!
//! `tools/list` returns the tools of the agent's ACL that the task was
//! granted (blocked definitions are left out), under their gateway names,
//! with `cacheScope: "private"`. `tools/call` goes through the very
//! pipeline of `POST /v1/tasks/{id}/calls` (`Gateway::authorize`, then
//! `Gateway::forward`). Denials take the shapes of DESIGN section 10: a tool
//! not on the agent's ACL, or unknown, is JSON-RPC error -32602
//! `Unknown tool: NAME` with `data.reason = "tool_unknown"` either way (the
//! audit keeps the true reason); any other denial is a result with
//! `isError: true`, text `denied: <reason>: <detail>` and
//! `_meta["portcullis/reason"]`. When a call enters a `reverify` state the
//! task's tokens rotate, and the new ones ride in the result's `_meta`
//! (`portcullis/access_token`, `portcullis/refresh_token`,
//! `portcullis/expires_in`).
//!
//! `ping` is answered here. Cancellation passes through: a legacy client's
//! `notifications/cancelled` naming a call in flight on its session, or a
//! modern client closing its request, drops the upstream request, which
//! sends `notifications/cancelled` to the upstream; the call's outcome is
//! recorded as cancelled.
//!
//! Batches (JSON arrays) are refused whole (400, -32600): MCP dropped them
//! in 2025-06-18, and checking each element on its own would let one
//! request carry many calls past per-request limits. A request carrying an
//! `Origin` header is served only when that origin is the gateway's own
//! (`server.issuer`) or a loopback one (DNS-rebinding defence); otherwise
//! 403.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use portcullis_core::Reason;
use portcullis_mcp::era::{self, Era, RoutingHeaders};
use portcullis_mcp::jsonrpc::{self, ErrorObject, Id, Message};
use portcullis_token::Claims;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::server::RequestId;
use crate::state::Gateway;

/// Most live legacy sessions.
pub const MAX_SESSIONS: usize = 10_000;
/// Most live legacy sessions of one task: opening one more closes that
/// task's least recently used session, so no task can crowd out others.
pub const MAX_SESSIONS_PER_TASK: usize = 16;
/// A legacy session unused this long is forgotten.
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// `_meta` key of a denial's reason code.
pub const META_REASON: &str = "portcullis/reason";

/// One legacy-era session.
#[derive(Debug, Clone)]
struct SessionInfo {
    task_id: String,
    protocol_version: String,
    last_seen: Instant,
}

/// The live legacy sessions, and their requests in flight.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, SessionInfo>>,
    inflight: Mutex<HashMap<(String, Id), Arc<tokio::sync::Notify>>>,
}

/// Most requests in flight tracked for cancellation, over all sessions.
const MAX_INFLIGHT: usize = 65_536;

impl Sessions {
    fn track(&self, sid: &str, id: &Id) -> Arc<tokio::sync::Notify> {
        let notify = Arc::new(tokio::sync::Notify::new());
        let mut map = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() < MAX_INFLIGHT {
            map.insert((sid.to_owned(), id.clone()), notify.clone());
        }
        notify
    }

    fn untrack(&self, sid: &str, id: &Id) {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(sid.to_owned(), id.clone()));
    }

    fn cancel(&self, sid: &str, id: &Id) {
        let found = self
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(sid.to_owned(), id.clone()))
            .cloned();
        if let Some(n) = found {
            // A stored permit: the cancel holds even if the call has not
            // reached its wait yet.
            n.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionInfo>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self, task_id: &str, protocol_version: &str) -> Result<String, ApiError> {
        let id = portcullis_token::random_id("mcp_").map_err(crate::state::internal)?;
        let mut map = self.lock();
        // This task's sessions: at the cap, its least recently used one
        // goes (a client that lost its session id opens another; one that
        // opens sessions in a loop only ever displaces its own).
        let mut own: Vec<(&String, Instant)> = map
            .iter()
            .filter(|(_, s)| s.task_id == task_id)
            .map(|(k, s)| (k, s.last_seen))
            .collect();
        if own.len() >= MAX_SESSIONS_PER_TASK {
            own.sort_by_key(|(_, seen)| *seen);
            let evict: Vec<String> = own
                .iter()
                .take(own.len() + 1 - MAX_SESSIONS_PER_TASK)
                .map(|(k, _)| (*k).clone())
                .collect();
            for k in evict {
                map.remove(&k);
            }
        }
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.last_seen.elapsed() < SESSION_IDLE);
        }
        if map.len() >= MAX_SESSIONS {
            return Err(ApiError::unavailable("too many MCP sessions"));
        }
        map.insert(
            id.clone(),
            SessionInfo {
                task_id: task_id.to_owned(),
                protocol_version: protocol_version.to_owned(),
                last_seen: Instant::now(),
            },
        );
        Ok(id)
    }

    fn touch(&self, id: &str) -> Option<SessionInfo> {
        let mut map = self.lock();
        let s = map.get_mut(id)?;
        if s.last_seen.elapsed() >= SESSION_IDLE {
            map.remove(id);
            return None;
        }
        s.last_seen = Instant::now();
        Some(s.clone())
    }

    fn close(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }
}

/// What one POST answers: a JSON-RPC message with its HTTP status, or
/// 202 with nothing.
enum Answer {
    Message(StatusCode, Message),
    /// JSON-RPC error for a request whose id could not be read (`id: null`).
    NullId(StatusCode, ErrorObject),
    Accepted,
    /// An answer streamed as Server-Sent Events (a held call's progress,
    /// then its result).
    Stream(Response),
}

fn json_response(status: StatusCode, body: &Value, session: Option<&str>) -> Response {
    let mut r = (status, jsonrpc::json_text(body)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(s) = session
        && let Ok(v) = HeaderValue::from_str(s)
    {
        h.insert(era::HEADER_SESSION, v);
    }
    r
}

fn render(answer: Answer, session: Option<&str>) -> Response {
    match answer {
        Answer::Message(status, m) => json_response(status, &m.to_value(), session),
        Answer::NullId(status, e) => json_response(
            status,
            &json!({ "jsonrpc": "2.0", "id": null, "error": e.to_value() }),
            session,
        ),
        Answer::Stream(mut r) => {
            if let Some(s) = session
                && let Ok(v) = HeaderValue::from_str(s)
            {
                r.headers_mut().insert(era::HEADER_SESSION, v);
            }
            r
        }
        Answer::Accepted => {
            let mut r = StatusCode::ACCEPTED.into_response();
            if let Some(s) = session
                && let Ok(v) = HeaderValue::from_str(s)
            {
                r.headers_mut().insert(era::HEADER_SESSION, v);
            }
            r
        }
    }
}

fn error_answer(id: Id, e: ErrorObject) -> Answer {
    let status = StatusCode::from_u16(era::http_status_for(e.code)).unwrap_or(StatusCode::OK);
    Answer::Message(status, Message::error(id, e))
}

fn routing_headers(headers: &HeaderMap) -> RoutingHeaders {
    let mut out = RoutingHeaders::default();
    for (name, slot) in [
        (era::HEADER_PROTOCOL_VERSION, &mut out.protocol_version),
        (era::HEADER_METHOD, &mut out.method),
        (era::HEADER_NAME, &mut out.name),
    ] {
        let mut values = headers.get_all(name).iter();
        *slot = values
            .next()
            .map(|v| v.to_str().map(str::to_owned).unwrap_or_default());
        if values.next().is_some() && out.duplicated.is_none() {
            out.duplicated = Some(name);
        }
    }
    out
}

fn accepts(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    [
        "application/json",
        "text/event-stream",
        "*/*",
        "application/*",
    ]
    .iter()
    .any(|t| accept.contains(t))
}

/// The `/mcp` endpoint, every method.
pub(crate) async fn endpoint(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .is_ok_and(|o| era::origin_allowed(o, &gw.settings.issuer));
        if !ok {
            return json_response(
                StatusCode::FORBIDDEN,
                &json!({"jsonrpc": "2.0", "id": null, "error": {"code": jsonrpc::INVALID_REQUEST, "message": "Origin not allowed"}}),
                None,
            );
        }
    }
    let deadline = crate::pipeline::ledger_deadline();
    let claims = match gw.authenticate(&headers, deadline).await {
        Ok(c) => c,
        Err(e) => {
            let answer = crate::layers::audit_refusal(&gw, None, None, &e, deadline).await;
            return answer.with_request_id(&rid.0).into_response();
        }
    };
    let session_id = headers
        .get(era::HEADER_SESSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match method {
        // Boxed: the call's future is large, and every layer above moves
        // the endpoint's future by value; a box keeps that a pointer.
        Method::POST => Box::pin(post(&gw, &rid, &claims, &headers, session_id, body)).await,
        Method::DELETE => match session_id {
            None => bad_request("Missing Mcp-Session-Id"),
            Some(id) => match gw.mcp_sessions.touch(&id) {
                None => not_found_session(),
                Some(s) if s.task_id != claims.task_id => mismatch(&gw, &rid, &claims).await,
                Some(_) => {
                    gw.mcp_sessions.close(&id);
                    StatusCode::OK.into_response()
                }
            },
        },
        _ => {
            let mut r = StatusCode::METHOD_NOT_ALLOWED.into_response();
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
            r
        }
    }
}

fn bad_request(message: &str) -> Response {
    render(
        Answer::NullId(
            StatusCode::BAD_REQUEST,
            ErrorObject::new(jsonrpc::INVALID_REQUEST, message),
        ),
        None,
    )
}

fn not_found_session() -> Response {
    render(
        Answer::NullId(
            StatusCode::NOT_FOUND,
            ErrorObject::new(jsonrpc::INVALID_REQUEST, "Session not found"),
        ),
        None,
    )
}

async fn mismatch(gw: &Gateway, rid: &RequestId, claims: &Claims) -> Response {
    let e = ApiError::denied(
        Reason::TaskMismatch,
        "the MCP session belongs to another task",
    );
    let answer = crate::layers::audit_refusal(
        gw,
        Some(&claims.task_id),
        Some(&claims.sub),
        &e,
        crate::pipeline::ledger_deadline(),
    )
    .await;
    answer.with_request_id(&rid.0).into_response()
}

async fn post(
    gw: &Arc<Gateway>,
    rid: &RequestId,
    claims: &Claims,
    headers: &HeaderMap,
    session_id: Option<String>,
    body: Body,
) -> Response {
    if !accepts(headers) {
        return StatusCode::NOT_ACCEPTABLE.into_response();
    }
    let bytes = match crate::body::read_bytes(body, gw.settings.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.with_request_id(&rid.0).into_response(),
    };
    let value = match crate::body::parse_any(&bytes) {
        Ok(v) => v,
        Err(_) => {
            return render(
                Answer::NullId(
                    StatusCode::BAD_REQUEST,
                    ErrorObject::new(jsonrpc::PARSE_ERROR, "Parse error"),
                ),
                session_id.as_deref(),
            );
        }
    };
    let message = match jsonrpc::from_json(value) {
        Ok(jsonrpc::Incoming::One(Ok(m))) => m,
        Ok(jsonrpc::Incoming::One(Err(invalid))) => {
            let answer = match invalid.id.clone() {
                Some(id) => error_answer(id, invalid.to_error()),
                None => Answer::NullId(StatusCode::BAD_REQUEST, invalid.to_error()),
            };
            return render(answer, session_id.as_deref());
        }
        Ok(jsonrpc::Incoming::Batch(_)) | Err(_) => {
            return bad_request("batches are not supported: send one JSON-RPC message per request");
        }
    };
    let routing = routing_headers(headers);
    let modern = routing
        .protocol_version
        .as_deref()
        .is_some_and(|v| !era::LEGACY_VERSIONS.contains(&v));
    if modern {
        let answer = stateless(gw, claims, &routing, message).await;
        return render(answer, None);
    }
    // Legacy era.
    match (&message, session_id) {
        (Message::Request { id, method, params }, None) if method == "initialize" => {
            let requested = params
                .as_ref()
                .and_then(|p| p.get("protocolVersion"))
                .and_then(Value::as_str)
                .unwrap_or(era::LEGACY_VERSION);
            let version = if era::LEGACY_VERSIONS.contains(&requested) {
                requested
            } else {
                era::LEGACY_VERSION
            };
            match gw.mcp_sessions.open(&claims.task_id, version) {
                Ok(sid) => {
                    let result = json!({
                        "protocolVersion": version,
                        "capabilities": { "tools": { "listChanged": false } },
                        "serverInfo": server_info(),
                        "instructions": "Portcullis gateway: tools are federated as <upstream>.<tool>; every call is checked against the task's policy.",
                    });
                    render(
                        Answer::Message(StatusCode::OK, Message::result(id.clone(), result)),
                        Some(&sid),
                    )
                }
                Err(e) => e.with_request_id(&rid.0).into_response(),
            }
        }
        (_, None) => bad_request("Missing Mcp-Session-Id (send initialize first)"),
        (_, Some(sid)) => {
            let Some(session) = gw.mcp_sessions.touch(&sid) else {
                return not_found_session();
            };
            if session.task_id != claims.task_id {
                return mismatch(gw, rid, claims).await;
            }
            if let Some(v) = routing.protocol_version.as_deref()
                && v != session.protocol_version
            {
                return bad_request("MCP-Protocol-Version differs from the session's");
            }
            let streams = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/event-stream"));
            let answer = legacy(gw, claims, &sid, message, streams).await;
            render(answer, Some(&sid))
        }
    }
}

fn server_info() -> Value {
    json!({ "name": "portcullis", "version": env!("CARGO_PKG_VERSION") })
}

async fn legacy(
    gw: &Arc<Gateway>,
    claims: &Claims,
    sid: &str,
    message: Message,
    streams: bool,
) -> Answer {
    match message {
        Message::Notification { method, params } => {
            if method == "notifications/cancelled"
                && let Some(id) = params
                    .as_ref()
                    .and_then(|p| p.get("requestId"))
                    .and_then(Id::from_value)
            {
                gw.mcp_sessions.cancel(sid, &id);
            }
            Answer::Accepted
        }
        Message::Response { .. } => Answer::Accepted,
        Message::Request { id, method, params } => {
            // A call in flight can be cancelled from another POST of the
            // same session (`notifications/cancelled` naming its id).
            let cancel = gw.mcp_sessions.track(sid, &id);
            // A call that may be held, from a client that asked for
            // progress and reads event streams: progress notifications
            // while it waits (2025-11-25).
            if streams
                && method == "tools/call"
                && !gw.holds.hold().is_zero()
                && let Some(token) = progress_token(params.as_ref())
            {
                let answer =
                    held_with_progress(gw, claims, id.clone(), params, token, cancel).await;
                gw.mcp_sessions.untrack(sid, &id);
                return answer;
            }
            let served = serve(
                gw,
                claims,
                &method,
                params.as_ref(),
                Era::Legacy,
                Some(cancel.clone()),
                None,
            )
            .await;
            gw.mcp_sessions.untrack(sid, &id);
            match served {
                Ok(result) => Answer::Message(StatusCode::OK, Message::result(id, result)),
                Err(e) => Answer::Message(StatusCode::OK, Message::error(id, e)),
            }
        }
    }
}

async fn stateless(
    gw: &Arc<Gateway>,
    claims: &Claims,
    routing: &RoutingHeaders,
    message: Message,
) -> Answer {
    let (id, method, params) = match message {
        Message::Notification { .. } => {
            return match routing.protocol_version.as_deref() {
                Some(v) if era::MODERN_VERSIONS.contains(&v) => Answer::Accepted,
                v => Answer::NullId(
                    StatusCode::BAD_REQUEST,
                    era::unsupported_version(v.unwrap_or_default()),
                ),
            };
        }
        Message::Response { .. } => {
            return Answer::NullId(
                StatusCode::BAD_REQUEST,
                ErrorObject::new(
                    jsonrpc::INVALID_REQUEST,
                    "a client does not POST responses on the stateless path",
                ),
            );
        }
        Message::Request { id, method, params } => (id, method, params),
    };
    if let Err(e) = era::check_modern(&method, params.as_ref(), Some(routing)) {
        return error_answer(id, e);
    }
    // Stateless: a client cancels by closing its request, which drops this
    // future and the upstream request with it.
    match serve(
        gw,
        claims,
        &method,
        params.as_ref(),
        Era::Modern,
        None,
        None,
    )
    .await
    {
        Ok(mut result) => {
            if let Value::Object(o) = &mut result {
                o.insert("resultType".to_owned(), json!("complete"));
                let meta = o
                    .entry("_meta".to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = meta {
                    m.insert(era::META_SERVER_INFO.to_owned(), server_info());
                }
            }
            Answer::Message(StatusCode::OK, Message::result(id, result))
        }
        Err(e) => error_answer(id, e),
    }
}

/// The methods both eras share.
async fn serve(
    gw: &Arc<Gateway>,
    claims: &Claims,
    method: &str,
    params: Option<&Value>,
    era: Era,
    cancel: Option<Arc<tokio::sync::Notify>>,
    progress: Option<&crate::hold::Progress>,
) -> Result<Value, ErrorObject> {
    match method {
        // 2026-07-28 removed `ping` and `initialize` (with `logging/setLevel`
        // and `resources/(un)subscribe`): on the stateless path they fall
        // through to "Method not found" (-32601, HTTP 404), as SEP-2575
        // requires (MCP conformance suite, server-stateless).
        "ping" if era == Era::Legacy => Ok(json!({})),
        "server/discover" if era == Era::Modern => Ok(json!({
            "supportedVersions": era::MODERN_VERSIONS,
            "capabilities": { "tools": { "listChanged": false } },
            "cacheScope": "private",
            "ttlMs": 0,
        })),
        "initialize" if era == Era::Legacy => Err(ErrorObject::new(
            jsonrpc::INVALID_REQUEST,
            "the session is already initialized",
        )),
        "tools/list" => {
            let tools = gw.mcp_tool_list(claims).await?;
            let mut result = json!({ "tools": tools });
            if era == Era::Modern {
                crate::tasks::put(&mut result, "cacheScope", json!("private"));
                crate::tasks::put(&mut result, "ttlMs", json!(0));
            }
            Ok(result)
        }
        "tools/call" => call(gw, claims, params, cancel, progress).await,
        _ => Err(ErrorObject::new(
            jsonrpc::METHOD_NOT_FOUND,
            format!(
                "Method not found: {}",
                method.chars().take(64).collect::<String>()
            ),
        )),
    }
}

fn unknown_tool(name: &str) -> ErrorObject {
    ErrorObject::new(
        jsonrpc::INVALID_PARAMS,
        format!(
            "Unknown tool: {}",
            name.chars().take(256).collect::<String>()
        ),
    )
    .with_data(json!({ "reason": Reason::ToolUnknown.as_str() }))
}

fn denied_result(reason: Reason, detail: &str) -> Value {
    json!({
        "content": [{ "type": "text", "text": format!("denied: {}: {detail}", reason.as_str()) }],
        "isError": true,
        "_meta": { META_REASON: reason.as_str() },
    })
}

async fn call(
    gw: &Arc<Gateway>,
    claims: &Claims,
    params: Option<&Value>,
    cancel: Option<Arc<tokio::sync::Notify>>,
    progress: Option<&crate::hold::Progress>,
) -> Result<Value, ErrorObject> {
    let Some(name) = params.and_then(|p| p.get("name")).and_then(Value::as_str) else {
        return Err(ErrorObject::new(
            jsonrpc::INVALID_PARAMS,
            "tools/call needs params.name (a string)",
        ));
    };
    let arguments = match params.and_then(|p| p.get("arguments")) {
        None | Some(Value::Null) => json!({}),
        Some(a) => a.clone(),
    };
    let task_id = claims.task_id.clone();
    // Whether the tool is on the ACL matters only to the shape of a denial:
    // not looked up on the allowed path.
    let on_acl = || {
        gw.engine
            .allowlist(&claims.sub)
            .is_some_and(|acl| acl.contains(&name))
    };
    // A call that needs approval may wait here for a person
    // (`[approval] hold`), holding no lock.
    let authorized = match gw
        .authorize_held(claims, &task_id, name, &arguments, true, progress)
        .await
    {
        Ok(a) => a,
        Err(e) => return denial(e, name, on_acl()),
    };
    let Some((upstream, hop)) = authorized.forward else {
        return Ok(denied_result(Reason::InternalError, "nothing to forward"));
    };
    let started = Instant::now();
    let cancelled = async move {
        match cancel {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    let outcome = gw
        .forward_until(name, &upstream, hop, &authorized.task, cancelled)
        .await;
    gw.metrics.call_latency.observe(started.elapsed());
    let mut result = match outcome {
        Ok(r) => as_call_result(r),
        Err(e) => return denial(e, name, true),
    };
    strip_gateway_meta(&mut result);
    if let Some(rotation) = &authorized.rotated
        && let Value::Object(o) = &mut result
    {
        let meta = o
            .entry("_meta".to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = meta {
            m.insert("portcullis/access_token".to_owned(), json!(rotation.access));
            m.insert(
                "portcullis/refresh_token".to_owned(),
                json!(rotation.refresh.as_str()),
            );
            m.insert(
                "portcullis/expires_in".to_owned(),
                json!(rotation.expires_in),
            );
        }
    }
    Ok(result)
}

/// The `progressToken` of a request's `_meta` (a string or an integer).
fn progress_token(params: Option<&Value>) -> Option<Value> {
    let token = params?.get("_meta")?.get("progressToken")?;
    match token {
        Value::String(s) if s.len() <= 256 => Some(token.clone()),
        Value::Number(_) => Some(token.clone()),
        _ => None,
    }
}

/// Serves a legacy `tools/call` that may be held, from a client that asked
/// for progress: answered as plain JSON when it is decided without waiting;
/// once it is held, as an event stream of `notifications/progress` (one
/// per [`crate::hold::PROGRESS_EVERY`]) ending with the call's response.
/// A client that closes the stream ends the hold.
async fn held_with_progress(
    gw: &Arc<Gateway>,
    claims: &Claims,
    id: Id,
    params: Option<Value>,
    token: Value,
    cancel: Arc<tokio::sync::Notify>,
) -> Answer {
    let (progress_tx, mut progress) = tokio::sync::mpsc::channel::<crate::hold::Waiting>(4);
    let (done_tx, mut done) = tokio::sync::oneshot::channel();
    let (gw2, claims2) = (gw.clone(), claims.clone());
    // Cancels a forward in flight when the client goes away (recorded as
    // cancelled, like `notifications/cancelled`).
    let stop = cancel.clone();
    tokio::spawn(async move {
        let served = serve(
            &gw2,
            &claims2,
            "tools/call",
            params.as_ref(),
            Era::Legacy,
            Some(cancel),
            Some(&progress_tx),
        )
        .await;
        drop(progress_tx);
        let _ = done_tx.send(served);
    });
    // The client going away before the call is held drops this future:
    // the worker's progress channel closes, which ends a hold it reaches.
    let answer = |served: Result<Value, ErrorObject>, id: Id| match served {
        Ok(result) => Message::result(id, result),
        Err(e) => Message::error(id, e),
    };
    let first = tokio::select! {
        served = &mut done => {
            let served = served.unwrap_or_else(|_| {
                Err(ErrorObject::new(jsonrpc::INTERNAL_ERROR, "the call failed inside the gateway"))
            });
            return Answer::Message(StatusCode::OK, answer(served, id));
        }
        first = progress.recv() => first,
    };
    let Some(first) = first else {
        // The worker finished without holding: its answer follows at once.
        let served = done.await.unwrap_or_else(|_| {
            Err(ErrorObject::new(
                jsonrpc::INTERNAL_ERROR,
                "the call failed inside the gateway",
            ))
        });
        return Answer::Message(StatusCode::OK, answer(served, id));
    };
    let (tx, response) = crate::sse::channel();
    let issuer = gw.settings.issuer.clone();
    tokio::spawn(async move {
        let notify = |w: &crate::hold::Waiting| {
            let message = json!({
                "jsonrpc": "2.0",
                "method": "notifications/progress",
                "params": {
                    "progressToken": token,
                    "progress": w.waited.as_secs_f64(),
                    "total": w.hold.as_secs_f64(),
                    "message": format!(
                        "waiting for a person to approve elevation request {} ({})",
                        w.elevation_id,
                        crate::hold::approval_url(&issuer, &w.elevation_id)
                    ),
                }
            });
            crate::sse::event(None, Some("message"), &message.to_string())
        };
        if tx.send(notify(&first)).await.is_err() {
            stop.notify_one();
            return;
        }
        let mut held = true;
        loop {
            tokio::select! {
                served = &mut done => {
                    let served = served.unwrap_or_else(|_| {
                        Err(ErrorObject::new(jsonrpc::INTERNAL_ERROR, "the call failed inside the gateway"))
                    });
                    let message = answer(served, id);
                    let _ = tx
                        .send(crate::sse::event(None, Some("message"), &message.to_value().to_string()))
                        .await;
                    return;
                }
                w = progress.recv(), if held => match w {
                    Some(w) => {
                        if tx.send(notify(&w)).await.is_err() {
                            // The client is gone: the hold ends with this
                            // channel, a forward in flight is cancelled.
                            stop.notify_one();
                            return;
                        }
                    }
                    None => held = false,
                },
                () = tx.closed() => {
                    stop.notify_one();
                    return;
                }
            }
        }
    });
    Answer::Stream(response)
}

/// Removes the gateway's own `_meta` namespaces (`portcullis/…`,
/// `io.portcullis/…`) from an upstream's result: only the gateway speaks
/// there (a rotated token, a denial's reason), and an upstream that wrote
/// `portcullis/access_token` could otherwise hand the agent's client a
/// token of its choosing, or dress a result up as a denial.
fn strip_gateway_meta(result: &mut Value) {
    if let Some(Value::Object(meta)) = result.get_mut("_meta") {
        meta.retain(|k, _| !is_gateway_meta(k));
        if meta.is_empty()
            && let Value::Object(o) = result
        {
            o.remove("_meta");
        }
    }
}

fn is_gateway_meta(key: &str) -> bool {
    key.starts_with("portcullis/") || key.starts_with("io.portcullis/")
}

/// A denial in its MCP shape (section 10).
fn denial(e: ApiError, name: &str, on_acl: bool) -> Result<Value, ErrorObject> {
    match e.reason() {
        Some(Reason::ToolUnknown) => Err(unknown_tool(name)),
        Some(Reason::ToolNotGranted) if !on_acl => Err(unknown_tool(name)),
        Some(reason) => Ok(denied_result(reason, e.detail())),
        None => Ok(denied_result(Reason::InternalError, e.detail())),
    }
}

/// An upstream's answer as a `CallToolResult`: MCP upstreams already give
/// one; anything else (an in-process upstream) is wrapped.
fn as_call_result(v: Value) -> Value {
    if v.get("content").is_some_and(Value::is_array) {
        v
    } else {
        json!({
            "content": [{ "type": "text", "text": v.to_string() }],
            "structuredContent": v,
            "isError": false,
        })
    }
}

impl Gateway {
    /// The tools a task token may see: the agent's ACL ∩ the task's grant
    /// (∪ live elevations), minus tools whose definition is blocked.
    async fn mcp_tool_list(&self, claims: &Claims) -> Result<Vec<Value>, ErrorObject> {
        let record = self
            .load_task(&claims.task_id)
            .await
            .map_err(|e| ErrorObject::new(jsonrpc::INTERNAL_ERROR, e.detail().to_owned()))?;
        let now = self.now();
        let task = &record.task;
        let acl = self.engine.allowlist(&claims.sub).unwrap_or_default();
        let mut out = Vec::new();
        for def in self.engine.tools() {
            let name = def.name.as_str();
            let granted = task.tools.contains(name) || task.elevated(name, now);
            if !acl.contains(&name) || !granted {
                continue;
            }
            let Some(view) = self.pins.listing(name) else {
                continue;
            };
            let mut tool = match view {
                Value::Object(o) => o,
                _ => Map::new(),
            };
            tool.insert("name".to_owned(), json!(name));
            if def.schema_configured || !tool.contains_key("inputSchema") {
                tool.insert("inputSchema".to_owned(), def.args_schema.clone());
            }
            out.push(Value::Object(tool));
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod session_tests {
    use super::*;

    /// Regression: one task could open sessions until the global table
    /// (10,000) was full and lock every other agent out of the legacy era
    /// for 30 minutes. A task now holds at most MAX_SESSIONS_PER_TASK; the
    /// next one displaces that task's least recently used session only.
    #[test]
    fn one_task_cannot_fill_the_session_table() {
        let sessions = Sessions::default();
        let other = sessions.open("task_b", "2025-11-25").unwrap();
        let mut opened = Vec::new();
        for _ in 0..MAX_SESSIONS + 10 {
            opened.push(sessions.open("task_a", "2025-11-25").unwrap());
        }
        let of_a = sessions
            .lock()
            .values()
            .filter(|s| s.task_id == "task_a")
            .count();
        assert_eq!(of_a, MAX_SESSIONS_PER_TASK);
        // The newest of task_a live on, the oldest are gone.
        assert!(sessions.touch(opened.last().unwrap()).is_some());
        assert!(sessions.touch(&opened[0]).is_none());
        // Other tasks are unaffected: their session lives, and new ones open.
        assert!(sessions.touch(&other).is_some());
        sessions.open("task_c", "2025-11-25").unwrap();
    }
}
