//! OAuth 2 endpoints: refresh rotation and token exchange (`/oauth/token`),
//! revocation (RFC 7009), introspection (RFC 7662), and discovery (JWKS,
//! RFC 8414, RFC 9728).
//!
//! `/oauth/token` errors follow RFC 6749 section 5.2
//! (`{"error": "invalid_grant", "error_description": …}`) so OAuth clients
//! understand them; the Portcullis reason code rides along as `reason`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use portcullis_config::Role;
use portcullis_core::{Reason, TaskStatus};
use portcullis_store::{EventKind, NewEvent, Op, StoreError};
use portcullis_token::{Claims, Expect};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::metrics::TokenEvent;
use crate::server::RequestId;
use crate::state::{Gateway, internal};
use crate::tasks::respond;

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// An RFC 6749 error answer.
fn oauth_error(
    status: StatusCode,
    error: &str,
    description: &str,
    reason: Option<Reason>,
    rid: &RequestId,
) -> Response {
    let body = json!({
        "error": error,
        "error_description": description,
        "reason": reason.map(Reason::as_str),
        "request_id": rid.0,
    });
    (
        status,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}

fn invalid_grant(description: &str, reason: Reason, rid: &RequestId) -> Response {
    oauth_error(
        StatusCode::BAD_REQUEST,
        "invalid_grant",
        description,
        Some(reason),
        rid,
    )
}

/// `POST /oauth/token`.
pub(crate) async fn token(State(gw): State<Arc<Gateway>>, rid: RequestId, body: Body) -> Response {
    let form = match crate::body::read_form(body, gw.settings.max_body_bytes).await {
        Ok(f) => f,
        Err(e) => return e.with_request_id(&rid.0).into_response(),
    };
    match form.get("grant_type").map(String::as_str) {
        Some("refresh_token") => refresh(&gw, &rid, form.get("refresh_token")).await,
        Some(TOKEN_EXCHANGE) => exchange(&gw, &rid, &form).await,
        Some(_) => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "unsupported grant_type",
            None,
            &rid,
        ),
        None => oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "grant_type is required",
            None,
            &rid,
        ),
    }
}

/// Refresh rotation: the presented refresh token is spent, a new pair is
/// issued; a spent one presented again revokes the whole task.
async fn refresh(gw: &Gateway, rid: &RequestId, token: Option<&String>) -> Response {
    let Some(token) = token.filter(|t| !t.is_empty() && t.len() <= 256) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "refresh_token is required",
            None,
            rid,
        );
    };
    let hash = portcullis_token::sha256_hex(token.as_bytes());
    let now = gw.now();
    // A ledger failure is no verdict on the token: 503, so the client
    // retries instead of abandoning a task whose refresh token is fine.
    let current = match gw.store.refresh(&hash).await {
        Ok(Some(r)) => r,
        Ok(None) => return invalid_grant("unknown refresh token", Reason::TokenInvalid, rid),
        Err(e) => {
            return ApiError::unavailable(e.to_string())
                .with_request_id(&rid.0)
                .into_response();
        }
    };
    let record = match gw.store.task(&current.task_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return invalid_grant("unknown refresh token", Reason::TokenInvalid, rid),
        Err(e) => {
            return ApiError::unavailable(e.to_string())
                .with_request_id(&rid.0)
                .into_response();
        }
    };
    let task = &record.task;
    if task.status != TaskStatus::Active || now >= record.deadline {
        return invalid_grant("the task is not active", Reason::TaskNotActive, rid);
    }
    let scope = gw.phase_scope(task);
    let minted = gw
        .mint_access(task, &scope, record.deadline, now)
        .and_then(|a| gw.mint_refresh(task, record.deadline, now).map(|r| (a, r)));
    let ((access, expires_in, access_ops), (new_refresh, refresh_ops)) = match minted {
        Ok(m) => m,
        Err(e) => return e.with_request_id(&rid.0).into_response(),
    };
    let mut refreshed = NewEvent::new(now, EventKind::TokenRefreshed);
    refreshed.task_id = Some(task.id.clone());
    refreshed.agent_id = Some(task.agent_id.clone());
    let mut ops = vec![Op::SpendRefresh { hash, at: now }, Op::Append(refreshed)];
    ops.extend(access_ops);
    ops.extend(refresh_ops);
    match gw.commit(ops).await {
        Ok(_) => {
            gw.metrics.tokens(TokenEvent::Refreshed, 1);
            let body = json!({
                "access_token": access,
                "refresh_token": new_refresh.as_str(),
                "token_type": "Bearer",
                "expires_in": expires_in,
                "scope": scope.join(" "),
            });
            (
                StatusCode::OK,
                [(axum::http::header::CACHE_CONTROL, "no-store")],
                Json(body),
            )
                .into_response()
        }
        Err(StoreError::RefreshSpent { task_id }) => {
            // Reuse of a spent refresh token: someone else has a copy.
            // Revoke every token of the task (OAuth 2.1 / BCP).
            let why = "refresh token reused: every token of the task revoked".to_owned();
            let mut event = NewEvent::new(now, EventKind::TokenRevoked);
            event.task_id = Some(task_id.clone());
            event.agent_id = Some(task.agent_id.clone());
            event.reason = Some(Reason::TokenRevoked.as_str().to_owned());
            event.detail = Some(why.clone());
            let revoke = vec![
                Op::RevokeTaskTokens {
                    task_id,
                    at: now,
                    reason: why,
                },
                Op::Append(event),
            ];
            match gw.commit(revoke).await {
                Ok(_) => invalid_grant(
                    "refresh token already used; the task's tokens are revoked",
                    Reason::TokenRevoked,
                    rid,
                ),
                Err(e) => ApiError::unavailable(e.to_string())
                    .with_request_id(&rid.0)
                    .into_response(),
            }
        }
        Err(StoreError::RefreshExpired { .. }) => {
            invalid_grant("refresh token expired", Reason::TokenExpired, rid)
        }
        Err(StoreError::RefreshUnknown) => {
            invalid_grant("unknown refresh token", Reason::TokenInvalid, rid)
        }
        Err(e) => ApiError::unavailable(e.to_string())
            .with_request_id(&rid.0)
            .into_response(),
    }
}

/// Who asked for a token exchange, once their task token is known good.
struct Exchanger<'a> {
    gw: &'a Gateway,
    rid: &'a RequestId,
    claims: &'a Claims,
    resource: &'a str,
}

impl Exchanger<'_> {
    /// Refuses the exchange: records a `call.denied` naming `tool` (an
    /// attempt like a refused call), then answers RFC 6749's `error` with
    /// the reason. A ledger that cannot record the refusal makes it a 503,
    /// as for a call.
    async fn refuse(&self, error: &str, detail: &str, tool: &str, reason: Reason) -> Response {
        let mut event = NewEvent::new(self.gw.now(), EventKind::CallDenied);
        event.task_id = Some(self.claims.task_id.clone());
        event.agent_id = Some(self.claims.sub.clone());
        event.tool = Some(portcullis_core::bounded_tool_name(tool));
        event.decision = Some("deny".to_owned());
        event.reason = Some(reason.as_str().to_owned());
        event.detail = Some(format!(
            "token exchange for {}: {detail}",
            portcullis_core::bounded_tool_name(self.resource)
        ));
        if let Err(e) = self.gw.commit(vec![Op::Append(event)]).await {
            return ApiError::unavailable(e.to_string())
                .with_request_id(&self.rid.0)
                .into_response();
        }
        self.gw.metrics.decision(Some(reason));
        oauth_error(
            StatusCode::BAD_REQUEST,
            error,
            detail,
            Some(reason),
            self.rid,
        )
    }
}

/// RFC 8693 token exchange: a task token for a per-hop token of one
/// upstream, issued only if the upstream is open to exchange
/// (`token_exchange = true`) and the engine would allow every requested
/// tool for the task in its current state. Every answer after the token
/// check is on record.
async fn exchange(
    gw: &Gateway,
    rid: &RequestId,
    form: &std::collections::BTreeMap<String, String>,
) -> Response {
    let (Some(subject), Some(resource)) = (form.get("subject_token"), form.get("resource")) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "subject_token and resource are required",
            None,
            rid,
        );
    };
    // RFC 8693 section 2.1: subject_token_type is required.
    if form.get("subject_token_type").map(String::as_str) != Some(ACCESS_TOKEN_TYPE) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "subject_token_type must be an access token",
            None,
            rid,
        );
    }
    let claims = match gw.authenticate_token(subject).await {
        Ok(c) => c,
        // A ledger that did not answer is no verdict on the token.
        Err(e) if e.kind() == crate::error::Kind::Unavailable => {
            return e.with_request_id(&rid.0).into_response();
        }
        Err(e) => {
            let reason = e.reason().unwrap_or(Reason::TokenInvalid);
            return invalid_grant("subject_token is not a live task token", reason, rid);
        }
    };
    let tools: Vec<String> = form
        .get("scope")
        .map(|s| {
            s.split(' ')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    // From here on the caller is a live task: every refusal is an attempt
    // on record, naming the tool (the first of the scope when the whole
    // request is refused).
    let first_tool = tools.first().map_or("", String::as_str);
    let asker = Exchanger {
        gw,
        rid,
        claims: &claims,
        resource,
    };
    let Some(entry) = gw.upstreams.get(resource) else {
        return asker
            .refuse(
                "invalid_target",
                "unknown resource",
                first_tool,
                Reason::ToolUnknown,
            )
            .await;
    };
    if !entry.token_exchange {
        return asker
            .refuse(
                "invalid_target",
                "this resource is closed to token exchange",
                first_tool,
                Reason::ToolNotGranted,
            )
            .await;
    }
    // One tool per exchange: each per-hop token handed out is one use of
    // one tool, decided, counted and recorded like one call.
    let [tool] = tools.as_slice() else {
        return asker
            .refuse(
                "invalid_scope",
                "scope must name exactly one tool",
                first_tool,
                Reason::ArgsInvalid,
            )
            .await;
    };
    let task_id = claims.task_id.clone();
    let exchange = crate::pipeline::Use::Exchange { upstream: resource };
    let (token, expires_in) = match gw.decide_use(&claims, &task_id, tool, exchange).await {
        Ok(crate::pipeline::Authorized {
            exchanged: Some(minted),
            ..
        }) => minted,
        Ok(_) => {
            return internal("an allowed exchange minted no token")
                .with_request_id(&rid.0)
                .into_response();
        }
        // Decided and already on record (`call.denied`), like a call.
        Err(e) if crate::tasks::is_decision(&e) && e.reason() != Some(Reason::TaskNotActive) => {
            let reason = e.reason().unwrap_or(Reason::InternalError);
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                e.detail(),
                Some(reason),
                rid,
            );
        }
        Err(e) if e.reason() == Some(Reason::TaskNotActive) => {
            return invalid_grant("the task is not active", Reason::TaskNotActive, rid);
        }
        Err(e) => return e.with_request_id(&rid.0).into_response(),
    };
    gw.metrics.tokens(TokenEvent::Issued, 1);
    let body = json!({
        "access_token": token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": tool,
    });
    (
        StatusCode::OK,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}

/// Verifies a token of this gateway for any of its audiences (itself or an
/// upstream), ignoring expiry when `allow_expired`.
fn verify_any_audience(gw: &Gateway, token: &str, now: u64) -> Option<Claims> {
    std::iter::once(gw.settings.issuer.as_str())
        .chain(gw.upstreams.keys().map(String::as_str))
        .find_map(|aud| {
            let expect = Expect {
                issuer: &gw.settings.issuer,
                audience: aud,
                now,
            };
            portcullis_token::verify(&gw.ring, token, &expect).ok()
        })
}

/// `POST /oauth/revoke` (RFC 7009): always 200. Possession of a token is
/// the authority to revoke it.
pub(crate) async fn revoke(State(gw): State<Arc<Gateway>>, rid: RequestId, body: Body) -> Response {
    let form = match crate::body::read_form(body, gw.settings.max_body_bytes).await {
        Ok(f) => f,
        Err(e) => return e.with_request_id(&rid.0).into_response(),
    };
    let Some(token) = form.get("token") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is required",
            None,
            &rid,
        );
    };
    // Longer than anything we issue: an invalid token, which RFC 7009
    // answers with 200 like any other.
    if token.len() > portcullis_token::MAX_TOKEN_BYTES {
        return (StatusCode::OK, Json(json!({}))).into_response();
    }
    let now = gw.now();
    let mut ops = Vec::new();
    let mut event = NewEvent::new(now, EventKind::TokenRevoked);
    if let Some(claims) = verify_any_audience(&gw, token, now.as_secs()) {
        ops.push(Op::RevokeToken {
            jti: claims.jti.clone(),
            at: now,
            reason: "revoked by its holder (RFC 7009)".to_owned(),
        });
        event.task_id = Some(claims.task_id);
        event.agent_id = Some(claims.sub);
        event.jti = Some(claims.jti);
    } else {
        let hash = portcullis_token::sha256_hex(token.as_bytes());
        match gw.store.refresh(&hash).await {
            Ok(Some(r)) if r.spent_at.is_none() => {
                ops.push(Op::SpendRefresh { hash, at: now });
                event.task_id = Some(r.task_id);
                event.agent_id = Some(r.agent_id);
            }
            Ok(_) => {}
            // The ledger cannot say whether this is a live refresh token:
            // answering 200 would tell its holder it is dead when it may
            // not be (RFC 7009 section 2.2.1: 503, the token still exists).
            Err(e) => {
                return ApiError::unavailable(e.to_string())
                    .with_request_id(&rid.0)
                    .into_response();
            }
        }
    }
    if !ops.is_empty() {
        event.detail = Some("revoked by its holder (RFC 7009)".to_owned());
        ops.push(Op::Append(event));
        match gw.commit(ops).await {
            Ok(_) => {}
            // An expired refresh token is already useless; anything else
            // is a failure the caller must see (the token may still work).
            Err(StoreError::RefreshExpired { .. } | StoreError::RefreshSpent { .. }) => {}
            Err(e) => {
                return ApiError::unavailable(e.to_string())
                    .with_request_id(&rid.0)
                    .into_response();
            }
        }
    }
    (StatusCode::OK, Json(json!({}))).into_response()
}

/// `POST /oauth/introspect` (RFC 7662) — admin callers only.
pub(crate) async fn introspect(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        gw.require_admin(&headers, Role::Admin)
            .or_else(|_| gw.require_admin(&headers, Role::Auditor))?;
        let form = crate::body::read_form(body, gw.settings.max_body_bytes).await?;
        let token = form
            .get("token")
            .ok_or_else(|| ApiError::bad_request("token is required"))?;
        let now = gw.now();
        let inactive = Json(json!({ "active": false })).into_response();
        let Some(claims) = verify_any_audience(&gw, token, now.as_secs()) else {
            return Ok(inactive);
        };
        let live = match gw
            .store
            .token(&claims.jti)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
        {
            Some(r) => r.revoked_at.is_none(),
            None => false,
        };
        let active_task = match gw
            .store
            .task(&claims.task_id)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
        {
            Some(r) => r.task.status == TaskStatus::Active && now < r.deadline,
            None => false,
        };
        if !(live && active_task) {
            return Ok(inactive);
        }
        let body: Value = json!({
            "active": true,
            "sub": claims.sub,
            "client_id": claims.client_id,
            "task_id": claims.task_id,
            "agent_type": claims.agent_type,
            "scope": claims.scope,
            "aud": claims.aud,
            "iss": claims.iss,
            "exp": claims.exp,
            "iat": claims.iat,
            "nbf": claims.nbf,
            "jti": claims.jti,
            "token_type": "Bearer",
        });
        Ok(Json(body).into_response())
    }
    .await;
    respond(&rid, result)
}

/// `GET /.well-known/jwks.json`.
pub(crate) async fn jwks(State(gw): State<Arc<Gateway>>) -> Response {
    let now = gw.now().as_secs();
    (
        [(axum::http::header::CACHE_CONTROL, "public, max-age=60")],
        Json(gw.ring.jwks(now)),
    )
        .into_response()
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
pub(crate) async fn authorization_server(State(gw): State<Arc<Gateway>>) -> Response {
    let iss = &gw.settings.issuer;
    Json(json!({
        "issuer": iss,
        "token_endpoint": format!("{iss}/oauth/token"),
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "revocation_endpoint": format!("{iss}/oauth/revoke"),
        "introspection_endpoint": format!("{iss}/oauth/introspect"),
        "grant_types_supported": ["refresh_token", TOKEN_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "response_types_supported": [],
        "token_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
    }))
    .into_response()
}

/// `GET /.well-known/oauth-protected-resource` (RFC 9728).
pub(crate) async fn protected_resource(State(gw): State<Arc<Gateway>>) -> Response {
    let iss = &gw.settings.issuer;
    Json(json!({
        "resource": iss,
        "authorization_servers": [iss],
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "bearer_methods_supported": ["header"],
        "resource_signing_alg_values_supported": ["EdDSA"],
    }))
    .into_response()
}
