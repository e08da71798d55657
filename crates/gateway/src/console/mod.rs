//! `/console`: the web console for approvers, operators and auditors
//! (DESIGN section 14), served by the gateway itself.
//!
//! - Server-rendered HTML (MiniJinja templates compiled into the binary,
//!   HTML auto-escaped), one stylesheet and one small script, both
//!   embedded; nothing is loaded from another origin. Every page works
//!   without JavaScript: each action is a form POSTed with a hidden CSRF
//!   field; the script only adds the live stream and keyboard shortcuts.
//! - Sign-in: `POST /console/login` with an admin token (form field
//!   `token`, checked in constant time like the API's bearer tokens) opens
//!   a session ([`session`]); `POST /console/logout` ends it.
//! - Every response carries a strict Content-Security-Policy (no inline
//!   script or style, same-origin only, no framing) and `no-store`.
//! - Roles are the API's: approvers decide elevations, admins halt,
//!   resume and approve tool definitions, auditors read tasks, the audit
//!   stream, the pins and the chain. Each action calls the very function
//!   its API endpoint calls: the console adds no power the API lacks.
//!
//! | page | role | API counterpart |
//! |---|---|---|
//! | `/console/approvals` | approver | `GET /v1/elevations`, `POST /v1/elevations/{id}/approve|deny` |
//! | `/console/tasks`, `/console/tasks/{id}` | auditor | `GET /v1/tasks/{id}`, `GET /v1/audit?task_id=` |
//! | halt / resume forms | admin | `POST /v1/tasks/{id}/halt|resume` |
//! | `/console/pins` | auditor (approve: admin) | `portcullis drift [--approve]` |
//! | `/console/stream`, `/console/events` | auditor | `GET /v1/events` |
//! | `/console/chain` | auditor | `portcullis audit verify` |

mod diagram;
pub(crate) mod session;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use portcullis_config::Role;
use portcullis_core::{Reason, TaskStatus};
use portcullis_store::{AuditQuery, ElevationStatus, EventKind};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, Kind};
use crate::state::Gateway;
use session::{COOKIE, LOGIN_COOKIE, SESSION_TTL, Session};

/// The Content-Security-Policy of every console response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Longest accepted console form body, in bytes.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// Longest accepted reason or note, in bytes (as the API's).
const MAX_NOTE_BYTES: usize = 2048;
/// Most pending approvals shown on one page.
const APPROVALS_PAGE: usize = 200;
/// Most tasks listed (the newest started).
const TASKS_SHOWN: usize = 200;
/// Most `task.started` records read to find them.
const TASKS_SCANNED: usize = 20_000;
/// Most audit records in a task's timeline.
const TIMELINE_MAX: usize = 1000;

const STYLE: &str = include_str!("assets/console.css");
const SCRIPT: &str = include_str!("assets/console.js");
const ICON: &str = include_str!("assets/favicon.svg");

/// The console's state in the gateway.
#[derive(Debug)]
pub(crate) struct Console {
    pub sessions: session::Sessions,
    templates: minijinja::Environment<'static>,
    /// Cookies get `Secure` (the gateway is served over TLS).
    secure: bool,
    workflows: Vec<portcullis_config::AgentType>,
    agents: Vec<String>,
    /// The last chain verification run from the console.
    last_check: Mutex<Option<Value>>,
    /// One verification at a time.
    verifying: tokio::sync::Mutex<()>,
}

/// The console's templates, by name.
const TEMPLATES: [(&str, &str); 9] = [
    ("base.html", include_str!("templates/base.html")),
    ("login.html", include_str!("templates/login.html")),
    ("message.html", include_str!("templates/message.html")),
    ("approvals.html", include_str!("templates/approvals.html")),
    ("tasks.html", include_str!("templates/tasks.html")),
    ("task.html", include_str!("templates/task.html")),
    ("pins.html", include_str!("templates/pins.html")),
    ("stream.html", include_str!("templates/stream.html")),
    ("chain.html", include_str!("templates/chain.html")),
];

fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // A page without a navigation bar (sign-in, errors) reads its fields
    // as empty rather than failing.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    // `.html` names: auto-escaped. A template that fails to parse is a
    // bug caught by the tests (`every_template_parses`).
    for (name, text) in TEMPLATES {
        if let Err(e) = env.add_template(name, text) {
            tracing::error!(template = name, error = %e, "console template does not parse");
        }
    }
    env
}

impl Console {
    pub(crate) fn new(cfg: &portcullis_config::Config) -> Self {
        Self {
            sessions: session::Sessions::default(),
            templates: templates(),
            secure: cfg.server.tls.is_some() || cfg.server.issuer.starts_with("https://"),
            workflows: cfg.agent_types.clone(),
            agents: cfg.agents.iter().map(|a| a.id.clone()).collect(),
            last_check: Mutex::new(None),
            verifying: tokio::sync::Mutex::new(()),
        }
    }
}

/// The console's routes, under `/console`.
pub(crate) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/console", get(home))
        .route("/console/", get(home))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/approvals", get(approvals))
        .route("/console/approvals/{id}", post(decide))
        .route("/console/tasks", get(tasks))
        .route("/console/tasks/{id}", get(task))
        .route("/console/tasks/{id}/halt", post(halt))
        .route("/console/tasks/{id}/resume", post(resume))
        .route("/console/pins", get(pins))
        .route("/console/pins/approve", post(approve_pin))
        .route("/console/stream", get(stream_page))
        .route("/console/events", get(events))
        .route("/console/chain", get(chain).post(verify_chain))
        .route("/console/assets/console.css", get(style))
        .route("/console/assets/console.js", get(script))
        .route("/console/assets/favicon.svg", get(icon))
        .layer(middleware::from_fn(security_headers))
}

/// The headers of every console response.
async fn security_headers(req: axum::extract::Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}

// ---------------------------------------------------------------- helpers

/// The value of cookie `name` in the request, if any.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(gw: &Gateway, name: &str, value: &str, max_age: u64) -> HeaderValue {
    cookie_header(gw.console.secure, name, value, max_age)
}

/// A `Set-Cookie` value: the console's path only, never readable by
/// scripts, never sent cross-site, `Secure` behind TLS.
fn cookie_header(secure: bool, name: &str, value: &str, max_age: u64) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = format!(
        "{name}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The signed-in session, or the way to the sign-in page.
#[expect(
    clippy::result_large_err,
    reason = "the error is the page answered at once, one per request"
)]
fn signed_in(gw: &Gateway, headers: &HeaderMap) -> Result<Session, Response> {
    cookie(headers, COOKIE)
        .and_then(|id| gw.console.sessions.get(id))
        .ok_or_else(|| Redirect::to("/console/login").into_response())
}

/// A signed-in session with `role`.
#[expect(
    clippy::result_large_err,
    reason = "the error is the page answered at once, one per request"
)]
fn with_role(gw: &Gateway, headers: &HeaderMap, role: Role) -> Result<Session, Response> {
    let s = signed_in(gw, headers)?;
    if s.has(role) {
        Ok(s)
    } else {
        Err(error_page(
            gw,
            Some(&s),
            &ApiError::new(
                Kind::Forbidden,
                format!("{} lacks the {} role", s.admin, role_name(role)),
            ),
        ))
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Approver => "approver",
        Role::Auditor => "auditor",
    }
}

/// A form body, read with a bound, and its CSRF token checked against the
/// session's (403 `token_invalid` when it differs).
async fn form<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    session: &Session,
    body: Body,
) -> Result<T, Response> {
    let bytes = crate::body::read_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|e| error_page(gw, Some(session), &e))?;
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).map_err(|_| {
        error_page(
            gw,
            Some(session),
            &ApiError::bad_request("the form could not be read"),
        )
    })?;
    let csrf = fields
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    if !session.csrf_ok(csrf) {
        return Err(error_page(gw, Some(session), &csrf_refused()));
    }
    serde_urlencoded::from_bytes(&bytes).map_err(|_| {
        error_page(
            gw,
            Some(session),
            &ApiError::bad_request("the form could not be read"),
        )
    })
}

/// A state-changing form: the session must hold `role`, and the form
/// must carry the session's CSRF token ([`form`]).
async fn form_as<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    headers: &HeaderMap,
    role: Role,
    body: Body,
) -> Result<(Session, T), Response> {
    let session = with_role(gw, headers, role)?;
    let f = form(gw, &session, body).await?;
    Ok((session, f))
}

/// The refusal of a form's note or reason (`what`) past
/// [`MAX_NOTE_BYTES`]; `None` when it is within.
fn note_too_long(gw: &Gateway, session: &Session, what: &str, text: &str) -> Option<Response> {
    (text.len() > MAX_NOTE_BYTES).then(|| {
        error_page(
            gw,
            Some(session),
            &ApiError::bad_request(format!("{what} longer than {MAX_NOTE_BYTES} bytes")),
        )
    })
}

fn csrf_refused() -> ApiError {
    ApiError::new(
        Kind::Denied(Reason::TokenInvalid),
        "the form's CSRF token is not this session's; reload the page and try again",
    )
}

/// Renders `name` with `ctx` (plus the navigation of `session`).
fn render(gw: &Gateway, session: Option<&Session>, name: &str, mut ctx: Value) -> Response {
    if let Some(s) = session
        && let Value::Object(o) = &mut ctx
    {
        o.insert(
            "me".to_owned(),
            json!({
                "admin": s.admin,
                "csrf": s.csrf,
                "approver": s.has(Role::Approver),
                "admin_role": s.has(Role::Admin),
                "auditor": s.has(Role::Auditor),
                "roles": s.roles.iter().map(|r| role_name(*r)).collect::<Vec<_>>(),
            }),
        );
    }
    let html = gw
        .console
        .templates
        .get_template(name)
        .and_then(|t| t.render(minijinja::Value::from_serialize(&ctx)));
    match html {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(e) => {
            tracing::error!(template = name, error = %e, "console page did not render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "internal_error: the page could not be rendered\n",
            )
                .into_response()
        }
    }
}

/// An error as a page: its status, its reason code and detail. A refused
/// CSRF token is 403 (`token_invalid` names what was wrong with the form;
/// it is not the bearer-token error the API answers 401).
fn error_page(gw: &Gateway, session: Option<&Session>, e: &ApiError) -> Response {
    let status = if e.reason() == Some(Reason::TokenInvalid) {
        StatusCode::FORBIDDEN
    } else {
        e.clone().into_response().status()
    };
    let mut r = render(
        gw,
        session,
        "message.html",
        json!({
            "title": "Refused",
            "reason": e.code().as_str(),
            "detail": e.detail(),
            "error": true,
        }),
    );
    *r.status_mut() = status;
    r
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// `n` milliseconds as a short human age ("3 s", "4 min", "2 h 5 min").
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02} UTC")
}

/// The pending approvals count for the badge (capped display).
async fn pending_count(gw: &Gateway) -> Option<usize> {
    gw.store
        .elevations(Some(ElevationStatus::Pending), None, APPROVALS_PAGE + 1)
        .await
        .ok()
        .map(|l| l.len())
}

async fn nav(gw: &Gateway, session: &Session, page: &str) -> Value {
    let badge = if session.has(Role::Approver) {
        pending_count(gw).await
    } else {
        None
    };
    json!({
        "page": page,
        "pending": badge,
        "pending_more": badge.is_some_and(|n| n > APPROVALS_PAGE),
    })
}

// ---------------------------------------------------------------- assets

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
        .into_response()
}

async fn icon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        ICON,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
        .into_response()
}

// ---------------------------------------------------------------- sign-in

async fn home(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    match signed_in(&gw, &headers) {
        Ok(s) if s.has(Role::Approver) => see_other("/console/approvals"),
        Ok(_) => see_other("/console/tasks"),
        Err(r) => r,
    }
}

async fn login_page(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if signed_in(&gw, &headers).is_ok() {
        return see_other("/console");
    }
    let Ok(token) = portcullis_token::random_token("login_") else {
        return error_page(&gw, None, &crate::state::internal("no randomness"));
    };
    let mut r = render(
        &gw,
        None,
        "login.html",
        json!({ "login_csrf": token, "issuer": gw.settings.issuer }),
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&gw, LOGIN_COOKIE, &token, 600),
    );
    r
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    login_csrf: String,
}

/// `POST /console/login`: an admin token opens a session.
async fn login(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let bytes = match crate::body::read_bytes(body, MAX_FORM_BYTES).await {
        Ok(b) => b,
        Err(e) => return error_page(&gw, None, &e),
    };
    let Ok(f) = serde_urlencoded::from_bytes::<LoginForm>(&bytes) else {
        return error_page(
            &gw,
            None,
            &ApiError::bad_request("the sign-in form could not be read"),
        );
    };
    // Double submit: the form's value must be the cookie the sign-in page
    // set, so another site cannot sign a browser in to a session of its
    // choosing.
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if expected.is_empty()
        || !bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_bytes(),
            f.login_csrf.as_bytes(),
        ))
    {
        return error_page(&gw, None, &csrf_refused());
    }
    let mut found = None;
    for admin in &gw.admins {
        if portcullis_token::matches_sha256(f.token.trim().as_bytes(), &admin.token_sha256) {
            found = Some(admin);
        }
    }
    let Some(admin) = found else {
        tracing::info!("console sign-in refused: not an admin token");
        // Counted and recorded like every unauthenticated refusal; a
        // source guessing tokens is throttled.
        let refused = gw.count_refusal(
            None,
            &ApiError::denied(Reason::TokenInvalid, "console sign-in: not an admin token"),
        );
        if refused.reason() == Some(Reason::RateLimited) {
            return error_page(&gw, None, &refused);
        }
        let mut r = render(
            &gw,
            None,
            "login.html",
            json!({
                "login_csrf": f.login_csrf,
                "failed": true,
                "issuer": gw.settings.issuer,
            }),
        );
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    };
    let Some(id) = gw.console.sessions.open(&admin.name, &admin.roles) else {
        return error_page(&gw, None, &crate::state::internal("no randomness"));
    };
    tracing::info!(admin = %admin.name, "console sign-in");
    let mut r = see_other("/console");
    let h = r.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(&gw, COOKIE, &id, SESSION_TTL.as_secs()),
    );
    h.append(header::SET_COOKIE, set_cookie(&gw, LOGIN_COOKIE, "", 0));
    r
}

#[derive(Debug, Deserialize)]
struct CsrfOnly {
    #[serde(rename = "csrf")]
    _csrf: String,
}

async fn logout(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let session = match signed_in(&gw, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = form::<CsrfOnly>(&gw, &session, body).await {
        return r;
    }
    if let Some(id) = cookie(&headers, COOKIE) {
        gw.console.sessions.end(id);
    }
    let mut r = see_other("/console/login");
    r.headers_mut()
        .append(header::SET_COOKIE, set_cookie(&gw, COOKIE, "", 0));
    r
}

// ---------------------------------------------------------------- approvals

async fn approvals(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let session = match with_role(&gw, &headers, Role::Approver) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let list = match gw
        .store
        .elevations(Some(ElevationStatus::Pending), None, APPROVALS_PAGE)
        .await
    {
        Ok(l) => l,
        Err(e) => return error_page(&gw, Some(&session), &ApiError::unavailable(e.to_string())),
    };
    let now = gw.now().as_millis();
    let mut items = Vec::new();
    for e in list {
        let task = gw.store.task(&e.task_id).await.ok().flatten();
        let (goal, status, state) = match &task {
            Some(r) => (
                r.task.goal.clone(),
                r.task.status.as_str().to_owned(),
                r.task.state.clone(),
            ),
            None => (String::new(), "unknown".to_owned(), String::new()),
        };
        let args = e
            .held
            .as_ref()
            .and_then(|h| h.args.as_ref())
            .map(|a| serde_json::to_string_pretty(a).unwrap_or_default());
        items.push(json!({
            "id": e.id,
            "task_id": e.task_id,
            "agent": e.agent_id,
            "tool": e.tool,
            "why": e.reason,
            "rule": e.held.as_ref().map(|h| h.rule.clone()),
            "args": args,
            "goal": goal,
            "task_status": status,
            "task_state": state,
            "waited": age(now.saturating_sub(e.requested_at.as_millis())),
            "requested_at": e.requested_at.as_millis(),
            "held_now": gw.holds.hold().as_secs(),
        }));
    }
    let nav = nav(&gw, &session, "approvals").await;
    render(
        &gw,
        Some(&session),
        "approvals.html",
        json!({ "nav": nav, "items": items, "title": "Approvals" }),
    )
}

#[derive(Debug, Deserialize)]
struct DecideForm {
    #[serde(rename = "csrf")]
    _csrf: String,
    decision: String,
    #[serde(default)]
    note: String,
}

/// `POST /console/approvals/{id}`: what `POST /v1/elevations/{id}/approve`
/// and `…/deny` do.
async fn decide(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (session, f) = match form_as::<DecideForm>(&gw, &headers, Role::Approver, body).await {
        Ok(sf) => sf,
        Err(r) => return r,
    };
    let status = match f.decision.as_str() {
        "approve" => ElevationStatus::Approved,
        "deny" => ElevationStatus::Denied,
        _ => {
            return error_page(
                &gw,
                Some(&session),
                &ApiError::bad_request("decision must be approve or deny"),
            );
        }
    };
    if let Some(r) = note_too_long(&gw, &session, "note", &f.note) {
        return r;
    }
    let note = Some(f.note.trim().to_owned()).filter(|n| !n.is_empty());
    match crate::elevations::decide_elevation(
        &gw,
        &id,
        status,
        format!("admin {}", session.admin),
        note,
    )
    .await
    {
        Ok(_) => see_other("/console/approvals"),
        Err(e) => error_page(&gw, Some(&session), &e),
    }
}

// ---------------------------------------------------------------- tasks

#[derive(Debug, Default, Deserialize)]
struct TaskFilter {
    #[serde(default)]
    agent: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    state: String,
}

/// A task's status as people read it: `expired` for an active task past
/// its deadline (as `GET /v1/tasks/{id}` shows it).
fn shown_status(r: &portcullis_store::TaskRecord, now: portcullis_core::Timestamp) -> &'static str {
    if r.task.status == TaskStatus::Active && now >= r.deadline {
        "expired"
    } else {
        r.task.status.as_str()
    }
}

async fn tasks(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    filter: Result<Query<TaskFilter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let session = match with_role(&gw, &headers, Role::Auditor) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Query(filter) = filter.unwrap_or_default();
    // The tasks: from their `task.started` records, newest first.
    let mut ids: Vec<String> = Vec::new();
    let mut since = None;
    let mut scanned = 0usize;
    loop {
        let page = match gw
            .store
            .audit(&AuditQuery {
                task_id: None,
                kind: Some(EventKind::TaskStarted),
                since_seq: since,
                limit: Some(portcullis_store::MAX_AUDIT_LIMIT),
            })
            .await
        {
            Ok(p) => p,
            Err(e) => {
                return error_page(&gw, Some(&session), &ApiError::unavailable(e.to_string()));
            }
        };
        let n = page.len();
        scanned += n;
        since = page.last().map(|r| r.seq).or(since);
        for r in page {
            if let Some(t) = r.event.task_id {
                ids.push(t);
            }
        }
        if n < portcullis_store::MAX_AUDIT_LIMIT || scanned >= TASKS_SCANNED {
            break;
        }
    }
    let now = gw.now();
    let mut seen = BTreeSet::new();
    let mut rows = Vec::new();
    for id in ids.iter().rev() {
        if rows.len() >= TASKS_SHOWN || !seen.insert(id.clone()) {
            continue;
        }
        let Ok(Some(r)) = gw.store.task(id).await else {
            continue;
        };
        let status = shown_status(&r, now);
        let t = &r.task;
        if (!filter.agent.is_empty() && t.agent_id != filter.agent)
            || (!filter.status.is_empty() && status != filter.status)
            || (!filter.state.is_empty() && t.state != filter.state)
        {
            continue;
        }
        rows.push(json!({
            "id": t.id,
            "agent": t.agent_id,
            "type": t.agent_type,
            "goal": t.goal,
            "state": t.state,
            "status": status,
            "calls": t.calls,
            "started": clock(t.started_at.as_millis()),
            "age": age(now.as_millis().saturating_sub(t.started_at.as_millis())),
        }));
    }
    let agents: BTreeSet<String> = gw.console.agents.iter().cloned().collect();
    let states: BTreeSet<String> = gw
        .console
        .workflows
        .iter()
        .flat_map(|w| w.states.iter().map(|s| s.name.clone()))
        .collect();
    let nav = nav(&gw, &session, "tasks").await;
    render(
        &gw,
        Some(&session),
        "tasks.html",
        json!({
            "nav": nav,
            "title": "Tasks",
            "rows": rows,
            "filter": { "agent": filter.agent, "status": filter.status, "state": filter.state },
            "agents": agents,
            "states": states,
            "statuses": ["active", "halted", "completed", "expired"],
            "capped": rows.len() >= TASKS_SHOWN,
        }),
    )
}

async fn task(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let session = match with_role(&gw, &headers, Role::Auditor) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let record = match gw.store.task(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return error_page(
                &gw,
                Some(&session),
                &ApiError::new(Kind::NotFound, "no such task"),
            );
        }
        Err(e) => return error_page(&gw, Some(&session), &ApiError::unavailable(e.to_string())),
    };
    if let Err(e) = gw.store.settled().await {
        return error_page(&gw, Some(&session), &ApiError::unavailable(e.to_string()));
    }
    let records = match gw
        .store
        .audit(&AuditQuery {
            task_id: Some(id.clone()),
            kind: None,
            since_seq: None,
            limit: Some(TIMELINE_MAX),
        })
        .await
    {
        Ok(r) => r,
        Err(e) => return error_page(&gw, Some(&session), &ApiError::unavailable(e.to_string())),
    };
    let mut taken = BTreeSet::new();
    let mut timeline = Vec::new();
    for r in &records {
        let e = &r.event;
        if e.kind == EventKind::StateTransition
            && e.decision.as_deref() != Some("deny")
            && let (Some(from), Some(to)) = (&e.state_from, &e.state_to)
        {
            taken.insert((from.clone(), to.clone()));
        }
        timeline.push(json!({
            "seq": r.seq,
            "time": clock(e.ts.as_millis()),
            "kind": e.kind.as_str(),
            "tool": e.tool,
            "decision": e.decision,
            "reason": e.reason,
            "detail": e.detail,
            "policy_ids": e.policy_ids,
            "args": e.args.as_ref().map(Value::to_string),
            "from": e.state_from,
            "to": e.state_to,
        }));
    }
    let now = gw.now();
    let t = &record.task;
    let diagram = gw
        .console
        .workflows
        .iter()
        .find(|w| w.name == t.agent_type)
        .map(|w| diagram::render(w, &t.state, &taken));
    let nav = nav(&gw, &session, "tasks").await;
    render(
        &gw,
        Some(&session),
        "task.html",
        json!({
            "nav": nav,
            "title": format!("Task {}", t.id),
            "task": {
                "id": t.id,
                "agent": t.agent_id,
                "type": t.agent_type,
                "goal": t.goal,
                "state": t.state,
                "status": shown_status(&record, now),
                "calls": t.calls,
                "tools": t.tools,
                "started": clock(t.started_at.as_millis()),
                "deadline": clock(record.deadline.as_millis()),
            },
            "diagram": diagram,
            "timeline": timeline,
            "timeline_capped": records.len() >= TIMELINE_MAX,
        }),
    )
}

#[derive(Debug, Deserialize)]
struct ReasonForm {
    #[serde(rename = "csrf")]
    _csrf: String,
    #[serde(default)]
    reason: String,
}

async fn halt(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (session, f) = match form_as::<ReasonForm>(&gw, &headers, Role::Admin, body).await {
        Ok(sf) => sf,
        Err(r) => return r,
    };
    if let Some(r) = note_too_long(&gw, &session, "reason", &f.reason) {
        return r;
    }
    let by = format!("admin {}", session.admin);
    match crate::tasks::halt_task(&gw, &id, &by, f.reason.trim()).await {
        Ok(_) => see_other(&format!("/console/tasks/{id}")),
        Err(e) => error_page(&gw, Some(&session), &e),
    }
}

async fn resume(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (session, f) = match form_as::<ReasonForm>(&gw, &headers, Role::Admin, body).await {
        Ok(sf) => sf,
        Err(r) => return r,
    };
    if let Some(r) = note_too_long(&gw, &session, "reason", &f.reason) {
        return r;
    }
    match crate::tasks::resume_task(&gw, &id, &session.admin, f.reason.trim()).await {
        // The task's new tokens, shown once (as the API answers them):
        // the agent needs them to go on.
        Ok(body) => {
            let nav = nav(&gw, &session, "tasks").await;
            render(
                &gw,
                Some(&session),
                "message.html",
                json!({
                    "nav": nav,
                    "title": "Task resumed",
                    "detail": format!("Task {id} runs again. Its earlier tokens stay revoked; hand these new ones to its agent (they are shown once)."),
                    "task_id": id,
                    "tokens": {
                        "access_token": body.get("access_token"),
                        "refresh_token": body.get("refresh_token"),
                    },
                }),
            )
        }
        Err(e) => error_page(&gw, Some(&session), &e),
    }
}

// ---------------------------------------------------------------- pins

/// A line diff of two texts (longest common subsequence; bounded).
fn line_diff(old: &str, new: &str) -> Vec<Value> {
    const MAX_LINES: usize = 400;
    let a: Vec<&str> = old.lines().take(MAX_LINES).collect();
    let b: Vec<&str> = new.lines().take(MAX_LINES).collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u16; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            let v = if a.get(i) == b.get(j) {
                lcs.get(i + 1)
                    .and_then(|r| r.get(j + 1))
                    .copied()
                    .unwrap_or(0)
                    + 1
            } else {
                let down = lcs.get(i + 1).and_then(|r| r.get(j)).copied().unwrap_or(0);
                let right = lcs.get(i).and_then(|r| r.get(j + 1)).copied().unwrap_or(0);
                down.max(right)
            };
            if let Some(cell) = lcs.get_mut(i).and_then(|r| r.get_mut(j)) {
                *cell = v;
            }
        }
    }
    let at = |i: usize, j: usize| lcs.get(i).and_then(|r| r.get(j)).copied().unwrap_or(0);
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < n || j < m {
        if i < n && j < m && a.get(i) == b.get(j) {
            out.push(json!({ "op": "same", "text": a.get(i) }));
            i += 1;
            j += 1;
        } else if i < n && (j >= m || at(i + 1, j) >= at(i, j + 1)) {
            out.push(json!({ "op": "del", "text": a.get(i) }));
            i += 1;
        } else {
            out.push(json!({ "op": "add", "text": b.get(j) }));
            j += 1;
        }
    }
    out
}

async fn pins(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let session = match with_role(&gw, &headers, Role::Auditor) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut rows = Vec::new();
    let tools: Vec<(String, String)> = gw
        .engine
        .tools()
        .map(|t| (t.name.clone(), t.upstream.clone()))
        .collect();
    for (tool, upstream) in tools {
        let pin = match gw.store.pin(&tool).await {
            Ok(p) => p,
            Err(e) => {
                return error_page(&gw, Some(&session), &ApiError::unavailable(e.to_string()));
            }
        };
        let seen = gw.seen_definition(&tool);
        let pinned_text = pin
            .as_ref()
            .map(|p| serde_json::to_string_pretty(&p.definition).unwrap_or_default());
        let seen_text = seen
            .as_ref()
            .filter(|s| s.hash.is_some())
            .map(|s| serde_json::to_string_pretty(&s.view).unwrap_or_default());
        let status = match (&pin, &seen) {
            (_, None) => "not listed yet",
            (_, Some(s)) if s.hash.is_none() => "missing",
            (None, Some(_)) => "unpinned",
            (Some(p), Some(s)) if s.hash.as_deref() == Some(p.hash.as_str()) => "ok",
            (Some(_), Some(_)) => "changed",
        };
        let diff = match (&pinned_text, &seen_text) {
            (Some(a), Some(b)) if status == "changed" => Some(line_diff(a, b)),
            _ => None,
        };
        rows.push(json!({
            "tool": tool,
            "upstream": upstream,
            "status": status,
            "blocked": seen.as_ref().is_some_and(|s| s.blocked),
            "pinned_by": pin.as_ref().map(|p| p.approved_by.clone()),
            "pinned_hash": pin.as_ref().map(|p| p.hash.clone()),
            "seen_hash": seen.as_ref().and_then(|s| s.hash.clone()),
            "pinned": pinned_text,
            "seen": seen_text,
            "diff": diff,
        }));
    }
    let nav = nav(&gw, &session, "pins").await;
    render(
        &gw,
        Some(&session),
        "pins.html",
        json!({ "nav": nav, "title": "Tool pins", "rows": rows }),
    )
}

#[derive(Debug, Deserialize)]
struct PinForm {
    #[serde(rename = "csrf")]
    _csrf: String,
    tool: String,
    hash: String,
}

/// `POST /console/pins/approve`: what `portcullis drift --approve TOOL`
/// does, for the definition the admin was shown (its hash).
async fn approve_pin(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let (session, f) = match form_as::<PinForm>(&gw, &headers, Role::Admin, body).await {
        Ok(sf) => sf,
        Err(r) => return r,
    };
    let by = format!("admin {} (console)", session.admin);
    match gw.approve_definition(&f.tool, &f.hash, &by).await {
        Ok(()) => see_other("/console/pins"),
        Err(e) => error_page(&gw, Some(&session), &e),
    }
}

// ---------------------------------------------------------------- stream

async fn stream_page(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    params: Result<Query<crate::events::EventParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let session = match with_role(&gw, &headers, Role::Auditor) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Query(p) = params.unwrap_or_default();
    let nav = nav(&gw, &session, "stream").await;
    let kinds: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    render(
        &gw,
        Some(&session),
        "stream.html",
        json!({
            "nav": nav,
            "title": "Live audit stream",
            "filter": { "task_id": p.task_id, "agent": p.agent, "kind": p.kind },
            "kinds": kinds,
        }),
    )
}

/// `GET /console/events`: `GET /v1/events` for a console session.
async fn events(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    params: Result<Query<crate::events::EventParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let session = match with_role(&gw, &headers, Role::Auditor) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let result = async {
        let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let filter = crate::events::Filter::parse(p, &headers)?;
        crate::events::stream(&gw, filter).await
    }
    .await;
    result.unwrap_or_else(|e| error_page(&gw, Some(&session), &e))
}

// ---------------------------------------------------------------- chain

async fn chain(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let session = match with_role(&gw, &headers, Role::Auditor) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let last = gw
        .console
        .last_check
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let head = gw.store.chain_head().await.ok().flatten();
    let nav = nav(&gw, &session, "chain").await;
    render(
        &gw,
        Some(&session),
        "chain.html",
        json!({
            "nav": nav,
            "title": "Audit chain",
            "last": last,
            "head": head.map(|(seq, hash)| json!({ "seq": seq, "hash": hash })),
        }),
    )
}

/// `POST /console/chain`: verifies the whole chain in the ledger (what
/// `portcullis audit verify` does), one run at a time.
async fn verify_chain(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let session = match with_role(&gw, &headers, Role::Auditor) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = form::<CsrfOnly>(&gw, &session, body).await {
        return r;
    }
    let Ok(_one) = gw.console.verifying.try_lock() else {
        return error_page(
            &gw,
            Some(&session),
            &ApiError::throttled("a verification is running; wait for it", 5),
        );
    };
    let started = std::time::Instant::now();
    // The verifier's progress callback is not `Send`: it runs on a thread
    // of its own, with a runtime of its own, over the same ledger.
    let (store, ring) = (gw.store.clone(), gw.ring.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("console-verify".to_owned())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|rt| {
                    rt.block_on(crate::audit::verify_store(
                        store.as_ref(),
                        &ring,
                        &mut |_| {},
                    ))
                });
            let _ = tx.send(outcome);
        });
    let outcome = match spawned {
        Ok(_) => rx
            .await
            .unwrap_or_else(|_| Err("the verification thread ended".to_owned())),
        Err(e) => Err(e.to_string()),
    };
    let result = match outcome {
        Ok(report) => json!({
            "ok": report.first_bad.is_none(),
            "records": report.records,
            "last_seq": report.last_seq,
            "checkpoints": report.checkpoints_verified,
            "uncovered": report.uncovered,
            "problem": report.first_bad.as_ref().map(|p| format!("{p:?}")),
            "by": session.admin,
            "at": clock(gw.now().as_millis()),
            "took_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }),
        Err(e) => {
            tracing::error!(error = %e, "chain verification could not run");
            json!({
                "ok": false,
                "problem": "the ledger could not be read (internal_error)",
                "by": session.admin,
                "at": clock(gw.now().as_millis()),
            })
        }
    };
    *gw.console
        .last_check
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(result);
    see_other("/console/chain")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        let mut env = minijinja::Environment::new();
        for (name, text) in TEMPLATES {
            if let Err(e) = env.add_template(name, text) {
                panic!("{name}: {e:#}");
            }
        }
        let env = templates();
        for (name, _) in TEMPLATES {
            env.get_template(name).unwrap();
        }
    }

    #[test]
    fn line_diff_marks_added_and_removed_lines() {
        let d = line_diff("a\nb\nc", "a\nx\nc");
        let ops: Vec<&str> = d.iter().map(|v| v["op"].as_str().unwrap()).collect();
        assert_eq!(ops, ["same", "del", "add", "same"]);
    }

    #[test]
    fn cookies_are_secure_behind_tls() {
        let tls: portcullis_config::Config =
            toml::from_str("[server]\nissuer = \"https://gw.example\"\n").unwrap();
        assert!(Console::new(&tls).secure);
        let plain: portcullis_config::Config =
            toml::from_str("[server]\nissuer = \"http://127.0.0.1:8787\"\n").unwrap();
        assert!(!Console::new(&plain).secure);
        let v = cookie_header(true, COOKIE, "cs_x", 60);
        assert_eq!(
            v.to_str().unwrap(),
            "portcullis_console=cs_x; Path=/console; HttpOnly; SameSite=Strict; Max-Age=60; Secure"
        );
    }

    #[test]
    fn cookies_are_read_by_exact_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x_portcullis_console=1; portcullis_console=abc"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
    }
}
