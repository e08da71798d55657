//! Elevation: a task asks, mid-flight, for a tool outside its allowlist; an
//! approver decides (DESIGN section 7).
//!
//! - The request is made with the task's own token and recorded as pending
//!   (`elevation.requested`).
//! - Only an admin token with the `approver` role can decide. Task tokens are
//!   never admin tokens, so an agent cannot approve its own request; the
//!   ledger refuses it too.
//! - An approval is one transaction: the decision, a grant added to the task
//!   (the tool, until now + `elevation.ttl`; compare-and-swap on the task
//!   version) and `elevation.approved`. A grant lets the tool pass the ACL
//!   step and the token-scope check; the workflow state, budgets, arguments
//!   and policies still apply.
//! - `[elevation] auto_approve` Cedar policies may approve a request at
//!   once (recorded as decided by `policy <ids>`); otherwise it waits, and
//!   the alert webhook is told (`elevation.requested`, with its id).
//! - A task may have at most [`MAX_PENDING_PER_TASK`] requests pending; one
//!   more is refused `limit_exceeded` and nothing of it is written (the
//!   ledger counts and inserts in one transaction,
//!   `Op::CapPendingElevations`).
//! - Approvers page through the list (`GET /v1/elevations?after=`) in the
//!   order requests were made, with an opaque cursor: a flood of requests
//!   from one task delays, but never hides, another task's request.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use portcullis_config::Role;
use portcullis_core::{Grant, GrantFor, Reason, TaskStatus};
use portcullis_store::{
    ElevationCursor, ElevationRecord, ElevationStatus, EventKind, HeldCall, NewEvent, Op,
    StoreError, TaskRecord,
};
use serde::Deserialize;
use serde_json::json;

use crate::error::{ApiError, Kind};
use crate::layers::TaskCaller;
use crate::server::RequestId;
use crate::state::{CommitError, Gateway, internal};
use crate::tasks::respond;

/// Alert kind for a request that waits for a human.
pub const ELEVATION_REQUESTED: &str = "elevation.requested";

/// Longest accepted reason or note, in bytes.
const MAX_REASON_BYTES: usize = 2048;

/// Most elevation requests one task may have pending at once.
pub const MAX_PENDING_PER_TASK: u32 = 16;

/// Most requests in one page of `GET /v1/elevations` (and the default is
/// [`DEFAULT_PAGE`]).
pub const MAX_PAGE: usize = 500;
/// Requests in a page of `GET /v1/elevations` without `limit`.
pub const DEFAULT_PAGE: usize = 100;

/// Commits a new pending request (`ops` from [`pending_request`]) under the
/// task's cap: a task already at [`MAX_PENDING_PER_TASK`] is refused
/// `limit_exceeded`, and nothing of `ops` is written.
async fn commit_capped(gw: &Gateway, task_id: &str, ops: [Op; 2]) -> Result<(), ApiError> {
    let mut batch = Vec::with_capacity(3);
    batch.push(Op::CapPendingElevations {
        task_id: task_id.to_owned(),
        max: MAX_PENDING_PER_TASK,
    });
    batch.extend(ops);
    match gw.commit(batch).await {
        Ok(_) => Ok(()),
        Err(StoreError::TooManyPending { max, .. }) => Err(ApiError::denied(
            Reason::LimitExceeded,
            format!(
                "the task already has {max} pending elevation requests, the most it may have; \
                 wait for an approver to decide one"
            ),
        )),
        Err(e) => Err(ApiError::unavailable(e.to_string())),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    tool: String,
    #[serde(default)]
    reason: String,
}

/// `POST /v1/tasks/{id}/elevations` — the task's token.
pub(crate) async fn request(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(task_id): Path<String>,
    Extension(TaskCaller(_caller)): Extension<TaskCaller>,
    body: Body,
) -> Response {
    let result = async {
        let req: RequestBody = crate::body::read_json(body, gw.settings.max_body_bytes).await?;
        if req.reason.len() > MAX_REASON_BYTES {
            return Err(ApiError::bad_request(format!(
                "reason longer than {MAX_REASON_BYTES} bytes"
            )));
        }
        let record = gw.load_task(&task_id).await?;
        if record.task.status != TaskStatus::Active {
            return Err(ApiError::denied(
                Reason::TaskNotActive,
                format!("task is {}", record.task.status.as_str()),
            ));
        }
        if gw.engine.tool(&req.tool).is_none() {
            return Err(ApiError::denied(Reason::ToolUnknown, "no such tool"));
        }
        let now = gw.now();
        let (req_tool, req_reason) = (req.tool.clone(), req.reason.clone());
        let (id, ops) = pending_request(&record.task, &req.tool, &req.reason, None, now)?;
        commit_capped(&gw, &record.task.id, ops).await?;
        // The `auto_approve` policies may decide at once; otherwise the
        // request waits for a human (and the approvers hear of it).
        if let Some(ids) = gw.engine.auto_approve(&record.task, &req_tool, &req_reason) {
            let by = format!("policy {}", ids.join(", "));
            let done = decide_elevation(&gw, &id, ElevationStatus::Approved, by, None).await?;
            return Ok((StatusCode::ACCEPTED, Json(done)).into_response());
        }
        gw.alert(crate::alerts::Alert {
            kind: ELEVATION_REQUESTED,
            task_id: Some(task_id.clone()),
            agent_id: Some(record.task.agent_id.clone()),
            reason: None,
            detail: Some(format!("{id}: {req_tool}: {req_reason}")),
            ts: now.0,
        });
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "elevation_id": id, "status": "pending" })),
        )
            .into_response())
    }
    .await;
    respond(&rid, result)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    status: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

/// `GET /v1/elevations?status=pending&limit=&after=` — approvers.
///
/// Oldest first (`requested_at`, then id), at most `limit` (default
/// [`DEFAULT_PAGE`], at most [`MAX_PAGE`]) per page; `next` is in the
/// answer when more requests follow, and is the `after` of the next page.
pub(crate) async fn list(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    headers: HeaderMap,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        gw.require_admin(&headers, Role::Approver)?;
        let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let status = match p.status.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => Some(s.parse::<ElevationStatus>().map_err(|_| {
                ApiError::bad_request("status must be pending, approved or denied")
            })?),
            None => None,
        };
        let limit = p.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
        let after = match p.after.as_deref().filter(|s| !s.is_empty()) {
            Some(text) => Some(ElevationCursor::parse(text).ok_or_else(|| {
                ApiError::bad_request("after must be the next cursor of a previous page")
            })?),
            None => None,
        };
        // One more than the page, to tell whether another page follows.
        let mut list = gw
            .store
            .elevations(status, after.as_ref(), limit.saturating_add(1))
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        let more = list.len() > limit;
        list.truncate(limit);
        let mut body = json!({ "elevations": list });
        if more && let Some(last) = list.last() {
            crate::tasks::put(
                &mut body,
                "next",
                json!(ElevationCursor::after(last).encode()),
            );
        }
        Ok(Json(body).into_response())
    }
    .await;
    respond(&rid, result)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    #[serde(default)]
    note: Option<String>,
}

/// `POST /v1/elevations/{id}/approve` — approvers.
pub(crate) async fn approve(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        &rid,
        decide(&gw, &id, &headers, body, ElevationStatus::Approved).await,
    )
}

/// `POST /v1/elevations/{id}/deny` — approvers.
pub(crate) async fn deny(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        &rid,
        decide(&gw, &id, &headers, body, ElevationStatus::Denied).await,
    )
}

async fn decide(
    gw: &Gateway,
    id: &str,
    headers: &HeaderMap,
    body: Body,
    status: ElevationStatus,
) -> Result<Response, ApiError> {
    let approver = gw.require_admin(headers, Role::Approver)?.name.clone();
    let bytes = crate::body::read_bytes(body, gw.settings.max_body_bytes).await?;
    let req: DecideBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        DecideBody::default()
    } else {
        crate::body::parse_json(&bytes)?
    };
    if req
        .note
        .as_ref()
        .is_some_and(|n| n.len() > MAX_REASON_BYTES)
    {
        return Err(ApiError::bad_request(format!(
            "note longer than {MAX_REASON_BYTES} bytes"
        )));
    }
    let done = decide_elevation(gw, id, status, format!("admin {approver}"), req.note).await?;
    Ok(Json(done).into_response())
}

/// A pending request for `tool` with a fresh id, and its record
/// ([`portcullis_store::records::pending_request`]).
pub(crate) fn pending_request(
    task: &portcullis_core::Task,
    tool: &str,
    reason: &str,
    held: Option<HeldCall>,
    now: portcullis_core::Timestamp,
) -> Result<(String, [Op; 2]), ApiError> {
    let id = portcullis_token::random_id("elv_").map_err(internal)?;
    let ops = portcullis_store::records::pending_request(&id, task, tool, reason, held, now);
    Ok((id, ops))
}

impl Gateway {
    /// Files a pending approval request for `what` (a tool, or
    /// `state:<name>`), audited and alerted; returns its id.
    pub(crate) async fn request_approval(
        &self,
        task: &portcullis_core::Task,
        what: &str,
        now: portcullis_core::Timestamp,
    ) -> Result<String, ApiError> {
        let reason = format!("approval required for {what}");
        let held = HeldCall {
            rule: crate::pipeline::APPROVAL_RULE.to_owned(),
            args_digest: None,
            args: None,
        };
        let (id, ops) = pending_request(task, what, &reason, Some(held), now)?;
        commit_capped(self, &task.id, ops).await?;
        self.alert(crate::alerts::Alert {
            kind: ELEVATION_REQUESTED,
            task_id: Some(task.id.clone()),
            agent_id: Some(task.agent_id.clone()),
            reason: Some(Reason::ApprovalRequired.as_str().to_owned()),
            detail: Some(format!("{id}: {reason}")),
            ts: now.0,
        });
        Ok(id)
    }
}

/// The grant an approval of `elevation` adds, lapsing at `until`: it
/// answers exactly what the approver was asked.
/// - An agent's request (no held call): the tool beyond the allowlist,
///   until `until` — nothing else; a call that needs approval, or that an
///   anomaly rule holds, is still held.
/// - A call held for a configured approval: that one use, with the
///   arguments the approver saw (their digest), once.
/// - A call held by an anomaly rule: that rule, for the tool, until
///   `until`; every other rule still applies.
fn grant_of(elevation: &ElevationRecord, until: portcullis_core::Timestamp) -> Grant {
    let (once, answers, args_digest) = match &elevation.held {
        None => (false, GrantFor::Elevation, None),
        Some(h) if h.rule == crate::pipeline::APPROVAL_RULE => {
            (true, GrantFor::Approval, h.args_digest.clone())
        }
        Some(h) => (false, GrantFor::Anomaly(h.rule.clone()), None),
    };
    Grant {
        tool: elevation.tool.clone(),
        expires_at: until,
        once,
        answers,
        args_digest,
    }
}

/// Decides a pending elevation, exactly once: the decision, and for an
/// approval a grant on the task until now + `elevation.ttl` (bounded by the
/// task's deadline), in one transaction with the audit record. `by` is who
/// decided (`admin NAME`, or `policy ID…` for an automatic approval).
pub(crate) async fn decide_elevation(
    gw: &Gateway,
    id: &str,
    status: ElevationStatus,
    by: String,
    note: Option<String>,
) -> Result<serde_json::Value, ApiError> {
    let (by, note) = (&by, &note);
    // An approval changes the task (a grant): under the task's lock, after
    // the commits queued for its calls.
    let task_id = gw
        .store
        .elevation(id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .ok_or_else(|| ApiError::new(Kind::NotFound, "no such elevation"))?
        .task_id;
    let _task = gw.lock_task_for_change(&task_id).await?;
    gw.retry_on_conflict(|| async move {
        let elevation = gw
            .store
            .elevation(id)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
            .ok_or_else(|| ApiError::new(Kind::NotFound, "no such elevation"))?;
        if elevation.status != ElevationStatus::Pending {
            return Err(CommitError::from(ApiError::new(
                Kind::Conflict,
                format!("elevation already {}", elevation.status.as_str()),
            )));
        }
        let now = gw.now();
        let kind = match status {
            ElevationStatus::Approved => EventKind::ElevationApproved,
            _ => EventKind::ElevationDenied,
        };
        let mut event = NewEvent::new(now, kind);
        event.task_id = Some(elevation.task_id.clone());
        event.agent_id = Some(elevation.agent_id.clone());
        event.tool = Some(elevation.tool.clone());
        event.detail = Some(match &note {
            Some(note) => format!("{id} by {by}: {note}"),
            None => format!("{id} by {by}"),
        });
        let mut ops = Vec::new();
        let mut expires_at = None;
        if status == ElevationStatus::Approved {
            let record = gw.load_task(&elevation.task_id).await?;
            if record.task.status != TaskStatus::Active {
                return Err(CommitError::from(ApiError::denied(
                    Reason::TaskNotActive,
                    format!("task is {}", record.task.status.as_str()),
                )));
            }
            let until = now
                .plus_millis(gw.settings.elevation_ttl_ms)
                .min(record.deadline);
            expires_at = Some(until);
            let mut task = record.task.clone();
            task.grants.retain(|g| g.is_live(now));
            task.grants.push(grant_of(&elevation, until));
            task.version = task.version.saturating_add(1);
            ops.push(Op::UpdateTask {
                record: TaskRecord {
                    task,
                    deadline: record.deadline,
                },
                expected_version: record.task.version,
            });
        }
        let mut all = vec![Op::DecideElevation {
            id: id.to_owned(),
            status,
            by: by.clone(),
            at: now,
            note: note.clone(),
            expires_at,
        }];
        all.extend(ops);
        all.push(Op::Append(event));
        match gw.commit(all).await {
            Ok(_) => {
                // Calls held on this request, in this process, read it now.
                gw.holds.decided();
                Ok(json!({
                "elevation_id": id,
                "status": status.as_str(),
                "task_id": elevation.task_id,
                "tool": elevation.tool,
                "decided_by": by,
                "expires_at": expires_at.map(|t| t.as_millis()),
                }))
            }
            // A race lost on the task's version is tried again (`Lost`): a
            // decision another approver made first shows up as not pending.
            Err(e) => Err(e.into()),
        }
    })
    .await
}
