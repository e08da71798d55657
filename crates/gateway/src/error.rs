//! The one error shape of the HTTP surface (DESIGN section 9):
//! `{"error": <reason code>, "detail": …, "request_id": …}`.
//!
//! `error` is always a reason code of DESIGN section 2 — a client, a SIEM
//! rule or a metric never meets a code outside that list; `detail` says the
//! specifics, the status says the class.
//!
//! Status codes: token errors (`token_*`, `wrong_audience`) are 401 with
//! `WWW-Authenticate: Bearer error="invalid_token"` (a missing token gets
//! `Bearer` alone); every other denial is 403; malformed requests are 400
//! and oversized bodies 413 (both `args_invalid`), unknown routes and
//! resources 404 and a known route with another method 405 (both
//! `args_invalid`: the request names nothing served), a caller without the
//! role 403 `tool_not_granted`, a decision on something already decided
//! 409 `state_violation`, and a failing store 503 (`internal_error`):
//! whatever goes wrong inside, the call is not made. A source over the rate
//! of unauthenticated refusals ([`crate::refusals`]) is answered 403
//! `rate_limited` like any denial, with `Retry-After: 1` to say when to try
//! again.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use portcullis_core::Reason;
use serde_json::json;

/// What kind of failure, beyond the reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A denial with a reason code.
    Denied(Reason),
    /// The request itself is malformed.
    BadRequest,
    /// The body is larger than `server.max_body_bytes`.
    TooLarge,
    /// No such route or resource.
    NotFound,
    /// The route exists, but not with this method.
    MethodNotAllowed,
    /// The store or another dependency failed: fail closed.
    Unavailable,
    /// An authenticated admin lacks the role.
    Forbidden,
    /// The resource is not in a state that allows this (e.g. an elevation
    /// already decided).
    Conflict,
}

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    kind: Kind,
    detail: String,
    request_id: String,
    policy_ids: Vec<String>,
    /// Answer with `Retry-After` (seconds): when to try again.
    retry_after: Option<u32>,
    /// The elevation request an `approval_required` denial filed for the
    /// call (answered as `elevation_id`).
    elevation_id: Option<String>,
}

impl ApiError {
    /// A denial with `reason`.
    pub fn denied(reason: Reason, detail: impl Into<String>) -> Self {
        Self::new(Kind::Denied(reason), detail)
    }

    /// A denial with `reason` whose `detail` the gateway wrote itself and
    /// may show even for `upstream_unavailable` or `internal_error` (a
    /// timeout, a cancellation): no text from a store, an upstream or the
    /// operating system goes in here.
    pub fn denied_public(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            kind: Kind::Denied(reason),
            detail: detail.into(),
            request_id: String::new(),
            policy_ids: Vec::new(),
            retry_after: None,
            elevation_id: None,
        }
    }

    /// `rate_limited`, answered 403 (a denial, DESIGN section 9) with
    /// `Retry-After: retry_after_secs`:
    /// a source refused too often (see [`crate::refusals`]).
    pub fn throttled(detail: impl Into<String>, retry_after_secs: u32) -> Self {
        let mut e = Self::denied(Reason::RateLimited, detail);
        e.retry_after = Some(retry_after_secs);
        e
    }

    /// A malformed request.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(Kind::BadRequest, detail)
    }

    /// A failing dependency; the detail is logged, not shown.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, detail)
    }

    /// An error of `kind`.
    ///
    /// A failure inside the gateway or of what it depends on (`kind`
    /// [`Kind::Unavailable`], or a denial with `internal_error` or
    /// `upstream_unavailable`) keeps `detail` out of the answer: store and
    /// upstream errors name hosts, files, roles and SQL, which are not for
    /// an agent or an unauthenticated caller. The detail is logged here, in
    /// the request's span (so under its `request_id`), and the answer says
    /// only what failed.
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        let detail = match private_failure(kind) {
            Some(public) => {
                tracing::error!(cause = %detail, kind = ?kind, "failed inside the gateway");
                public.to_owned()
            }
            None => detail,
        };
        Self {
            kind,
            detail,
            request_id: String::new(),
            policy_ids: Vec::new(),
            retry_after: None,
            elevation_id: None,
        }
    }

    /// Names the policies that decided.
    #[must_use]
    pub fn with_policies(mut self, ids: Vec<String>) -> Self {
        self.policy_ids = ids;
        self
    }

    /// The same denial, naming the elevation request it filed for the call.
    #[must_use]
    pub fn with_elevation(mut self, id: impl Into<String>) -> Self {
        self.elevation_id = Some(id.into());
        self
    }

    /// The elevation request this denial filed for the call, if any.
    pub fn elevation_id(&self) -> Option<&str> {
        self.elevation_id.as_deref()
    }

    /// The same error with another `detail` (written by the gateway).
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Tags the error with the request's id.
    #[must_use]
    pub fn with_request_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.request_id);
        self
    }

    /// The reason code, when this is a denial.
    pub fn reason(&self) -> Option<Reason> {
        match self.kind {
            Kind::Denied(r) => Some(r),
            _ => None,
        }
    }

    /// The policies named by a `policy_forbid` denial.
    pub fn policy_ids(&self) -> &[String] {
        &self.policy_ids
    }

    /// The human detail.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The kind of failure.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The reason code of the body's `error` (DESIGN section 2).
    pub fn code(&self) -> Reason {
        match self.kind {
            Kind::Denied(r) => r,
            Kind::BadRequest | Kind::TooLarge | Kind::NotFound | Kind::MethodNotAllowed => {
                Reason::ArgsInvalid
            }
            Kind::Unavailable => Reason::InternalError,
            Kind::Forbidden => Reason::ToolNotGranted,
            Kind::Conflict => Reason::StateViolation,
        }
    }

    fn status(&self) -> StatusCode {
        match self.kind {
            Kind::Denied(r) if r.is_token_error() => StatusCode::UNAUTHORIZED,
            // Every other denial, internal_error and upstream_unavailable
            // included, is a 403 (DESIGN section 9).
            Kind::Denied(_) => StatusCode::FORBIDDEN,
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::Conflict => StatusCode::CONFLICT,
        }
    }
}

/// What an answer says instead of the detail of a failure inside the
/// gateway; `None` for every other kind, whose detail is the caller's.
fn private_failure(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Unavailable => Some(
            "the ledger did not answer; nothing was decided or forwarded \
             (the gateway log has the cause under this request_id)",
        ),
        Kind::Denied(Reason::InternalError) => {
            Some("internal error (the gateway log has the cause under this request_id)")
        }
        Kind::Denied(Reason::UpstreamUnavailable) => Some(
            "the upstream is unavailable (the gateway log has the cause under this request_id)",
        ),
        _ => None,
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = json!({
            "error": self.code().as_str(),
            "detail": self.detail,
            "request_id": self.request_id,
        });
        if !self.policy_ids.is_empty() {
            crate::tasks::put(&mut body, "policy_ids", json!(self.policy_ids));
        }
        if let Some(id) = &self.elevation_id {
            crate::tasks::put(&mut body, "elevation_id", json!(id));
        }
        let mut response = (status, axum::Json(body)).into_response();
        if let Kind::Denied(reason) = self.kind
            && reason.is_token_error()
        {
            let challenge = if reason == Reason::TokenMissing {
                HeaderValue::from_static("Bearer")
            } else {
                HeaderValue::from_static("Bearer error=\"invalid_token\"")
            };
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}
