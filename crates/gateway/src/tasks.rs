//! `/v1/tasks…`: starting tasks, calls, decisions, transitions, and the end
//! of a task.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use portcullis_config::Role;
use portcullis_core::{Reason, TaskStatus};
use portcullis_store::{EventKind, NewEvent, Op, TaskRecord};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::alerts::{Alert, TASK_HALTED};
use crate::error::ApiError;
use crate::layers::TaskCaller;
use crate::metrics::TokenEvent;
use crate::pipeline::bind;
use crate::server::RequestId;
use crate::state::{CommitError, Gateway, deadline_of, internal};

/// Runs a handler body and tags its error with the request id.
pub(crate) fn respond(rid: &RequestId, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(r) => r,
        Err(e) => e.with_request_id(&rid.0).into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartTask {
    agent_id: String,
    #[serde(default)]
    goal: String,
    #[serde(default)]
    tools: Option<Vec<String>>,
}

/// Longest accepted task goal, in bytes.
const MAX_GOAL_BYTES: usize = 4096;

/// `POST /v1/tasks` — the orchestrator, with the agent's bootstrap secret.
pub(crate) async fn start(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let agent = gw
            .bootstrap_agent(&headers)?
            .ok_or_else(|| match crate::auth::bearer(&headers) {
                Ok(None) => ApiError::denied(Reason::TokenMissing, "no bootstrap secret"),
                _ => ApiError::denied(Reason::TokenInvalid, "unknown bootstrap secret"),
            })?
            .to_owned();
        let req: StartTask = crate::body::read_json(body, gw.settings.max_body_bytes).await?;
        if req.agent_id != agent {
            return Err(ApiError::denied(
                Reason::TokenInvalid,
                "the bootstrap secret belongs to another agent",
            ));
        }
        if req.goal.len() > MAX_GOAL_BYTES {
            return Err(ApiError::bad_request(format!(
                "goal longer than {MAX_GOAL_BYTES} bytes"
            )));
        }
        let StartedTask {
            task,
            access,
            refresh,
            expires_in,
        } = gw
            .start_task(&agent, &req.goal, req.tools.as_deref())
            .await?;
        let body = json!({
            "task_id": task.id,
            "access_token": access,
            "refresh_token": refresh.as_str(),
            "token_type": "Bearer",
            "expires_in": expires_in,
            "state": task.state,
            "tools": task.tools,
        });
        Ok((StatusCode::CREATED, no_store(), Json(body)).into_response())
    }
    .await;
    respond(&rid, result)
}

/// A task just started, with its first tokens.
#[derive(Debug)]
pub struct StartedTask {
    /// The task.
    pub task: portcullis_core::Task,
    /// Its first access token.
    pub access: String,
    /// Its first refresh token.
    pub refresh: zeroize::Zeroizing<String>,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

impl Gateway {
    /// Starts a task for an already authenticated agent: the engine's
    /// start, an access and a refresh token, and one ledger transaction
    /// with the task, both tokens and their audit events.
    pub async fn start_task(
        &self,
        agent: &str,
        goal: &str,
        tools: Option<&[String]>,
    ) -> Result<StartedTask, ApiError> {
        let now = self.now();
        let task_id = portcullis_token::random_id("task_").map_err(internal)?;
        let task = self
            .engine
            .start_task(&task_id, agent, goal, tools)
            .map_err(|d| ApiError::denied(d.reason, d.detail))?;
        let deadline = deadline_of(&task, self.settings.task_max_ms);
        let scope = self.phase_scope(&task);
        let (access, expires_in, mut ops) = self.mint_access(&task, &scope, deadline, now)?;
        let (refresh, refresh_ops) = self.mint_refresh(&task, deadline, now)?;
        let started = portcullis_store::records::started_event(&task, now);
        let mut all = vec![
            Op::InsertTask(TaskRecord {
                task: task.clone(),
                deadline,
            }),
            Op::Append(started),
        ];
        all.append(&mut ops);
        all.extend(refresh_ops);
        self.commit(all)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        self.metrics.tokens(TokenEvent::Issued, 1);
        Ok(StartedTask {
            task,
            access,
            refresh,
            expires_in,
        })
    }
}

/// Sets `key` of a JSON object body.
pub(crate) fn put(body: &mut Value, key: &str, value: Value) {
    if let Some(map) = body.as_object_mut() {
        map.insert(key.to_owned(), value);
    }
}

/// Headers of every response that carries a token.
fn no_store() -> [(axum::http::HeaderName, &'static str); 2] {
    [
        (axum::http::header::CACHE_CONTROL, "no-store"),
        (axum::http::header::PRAGMA, "no-cache"),
    ]
}

/// The task view of `GET /v1/tasks/{id}` at `now`. An active task past
/// its deadline shows as `expired`: it can do nothing any more.
fn task_view(record: &TaskRecord, now: portcullis_core::Timestamp) -> Value {
    let t = &record.task;
    let status = if t.status == TaskStatus::Active && now >= record.deadline {
        "expired"
    } else {
        t.status.as_str()
    };
    json!({
        "task_id": t.id,
        "agent_id": t.agent_id,
        "agent_type": t.agent_type,
        "goal": t.goal,
        "state": t.state,
        "status": status,
        "tools": t.tools,
        "calls": t.calls,
        "tool_calls": t.tool_calls,
        "version": t.version,
        "started_at": t.started_at.as_millis(),
        "deadline": record.deadline.as_millis(),
    })
}

/// A task token bound to `task_id`, or an admin with `role`.
async fn task_or_admin(
    gw: &Gateway,
    headers: &HeaderMap,
    task_id: &str,
    role: Role,
) -> Result<Caller, ApiError> {
    if let Some(admin) = gw.admin_of(headers)? {
        return if admin.roles.contains(&role) || admin.roles.contains(&Role::Admin) {
            Ok(Caller::Admin(admin.name.clone()))
        } else {
            Err(ApiError::new(
                crate::error::Kind::Forbidden,
                "admin lacks the role",
            ))
        };
    }
    let claims = gw
        .authenticate(headers, crate::pipeline::ledger_deadline())
        .await?;
    bind(&claims, task_id)?;
    Ok(Caller::Task(Box::new(claims)))
}

enum Caller {
    Task(Box<portcullis_token::Claims>),
    Admin(String),
}

/// `GET /v1/tasks/{id}` — the task's token, or an auditor.
pub(crate) async fn get(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        task_or_admin(&gw, &headers, &task_id, Role::Auditor).await?;
        // Not `load_task`: a task past its lifetime is over, not unknown.
        let record = gw
            .store
            .task(&task_id)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
            .ok_or_else(|| ApiError::new(crate::error::Kind::NotFound, "no such task"))?;
        Ok(Json(task_view(&record, gw.now())).into_response())
    }
    .await;
    respond(&rid, result)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallBody {
    tool: String,
    #[serde(default = "empty_object")]
    arguments: Value,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// `POST /v1/tasks/{id}/calls` — decide, record, forward, record.
pub(crate) async fn call(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(task_id): Path<String>,
    Extension(TaskCaller(claims)): Extension<TaskCaller>,
    body: Body,
) -> Response {
    let started = std::time::Instant::now();
    let result = async {
        let req: CallBody = crate::body::read_json(body, gw.settings.max_body_bytes).await?;
        // A call that needs approval may wait here for a person
        // (`[approval] hold`), holding no lock.
        let authorized = gw
            .authorize_held(&claims, &task_id, &req.tool, &req.arguments, true, None)
            .await?;
        let (upstream, call) = authorized
            .forward
            .ok_or_else(|| internal("nothing to forward"))?;
        let result = gw
            .forward(&req.tool, &upstream, call, &authorized.task)
            .await?;
        let mut body = json!({
            "decision": "allow",
            "result": result,
            "state": authorized.task.state,
        });
        if let Some(rotation) = &authorized.rotated {
            rotation.add_to(&mut body);
        }
        Ok((no_store(), Json(body)).into_response())
    }
    .await;
    gw.metrics.call_latency.observe(started.elapsed());
    respond(&rid, result)
}

/// `POST /v1/tasks/{id}/authorize` — decide and record; do not forward.
pub(crate) async fn authorize(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(task_id): Path<String>,
    Extension(TaskCaller(claims)): Extension<TaskCaller>,
    body: Body,
) -> Response {
    let result = async {
        let req: CallBody = crate::body::read_json(body, gw.settings.max_body_bytes).await?;
        match gw
            .authorize(&claims, &task_id, &req.tool, &req.arguments, false)
            .await
        {
            Ok(a) => {
                let mut body = json!({
                    "decision": "allow",
                    "reason": null,
                    "policy_ids": a.decision.policy_ids,
                    "state": a.task.state,
                });
                if let Some(rotation) = &a.rotated {
                    rotation.add_to(&mut body);
                }
                Ok((no_store(), Json(body)).into_response())
            }
            // A decided denial is an answer, not an error, in this mode;
            // authentication and binding failures stay errors.
            Err(e) if is_decision(&e) => Ok(Json(json!({
                "decision": "deny",
                "reason": e.reason().map(Reason::as_str),
                "detail": e.detail(),
                "policy_ids": e.policy_ids(),
            }))
            .into_response()),
            Err(e) => Err(e),
        }
    }
    .await;
    respond(&rid, result)
}

/// Whether `e` is a decided denial (an answer of policy-decision-point
/// mode) rather than a failure to decide. Every reason of today is named;
/// one added later stays an error answer until it is placed here.
pub(crate) fn is_decision(e: &ApiError) -> bool {
    let Some(reason) = e.reason() else {
        return false;
    };
    match reason {
        Reason::TaskNotActive
        | Reason::ToolUnknown
        | Reason::ToolNotGranted
        | Reason::StateViolation
        | Reason::LimitExceeded
        | Reason::RateLimited
        | Reason::ArgsInvalid
        | Reason::PolicyForbid
        | Reason::ApprovalRequired
        | Reason::AnomalyHalt
        | Reason::ToolDefinitionChanged => true,
        // Who is asking, and whether the gateway could decide at all.
        Reason::TokenMissing
        | Reason::TokenInvalid
        | Reason::TokenExpired
        | Reason::TokenRevoked
        | Reason::WrongAudience
        | Reason::TaskMismatch
        | Reason::UpstreamUnavailable
        | Reason::InternalError => false,
        _ => false,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransitionBody {
    to: String,
}

/// `POST /v1/tasks/{id}/transition` — move along a workflow edge.
pub(crate) async fn transition(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(task_id): Path<String>,
    Extension(TaskCaller(claims)): Extension<TaskCaller>,
    body: Body,
) -> Response {
    let result = async {
        let req: TransitionBody = crate::body::read_json(body, gw.settings.max_body_bytes).await?;
        let (gw, task_id, req, claims) = (&gw, &task_id, &req, &claims);
        let _task = gw.lock_task_for_change(task_id).await?;
        gw.retry_on_conflict(|| async move {
            let record = gw.load_task(task_id).await?;
            let now = gw.now();
            let t = match gw.engine.transition(&record.task, &req.to) {
                Ok(t) => t,
                Err(denial) => {
                    let mut event = NewEvent::new(now, EventKind::StateTransition);
                    event.task_id = Some(task_id.clone());
                    event.agent_id = Some(record.task.agent_id.clone());
                    event.state_from = Some(record.task.state.clone());
                    event.state_to = Some(req.to.chars().take(128).collect());
                    event.decision = Some("deny".to_owned());
                    event.reason = Some(denial.reason.as_str().to_owned());
                    gw.commit(vec![Op::Append(event)])
                        .await
                        .map_err(|e| ApiError::unavailable(e.to_string()))?;
                    return Err(CommitError::from(ApiError::denied(
                        denial.reason,
                        denial.detail,
                    )));
                }
            };
            let mut task = record.task.clone();
            if t.approval {
                // The move waits as an elevation request until approved;
                // the approval is good for this one move.
                let marker = format!("{}{}", crate::pipeline::STATE_APPROVAL_PREFIX, t.to);
                match task.approval_for(&marker, None, now) {
                    Some(i) => {
                        task.grants.remove(i);
                    }
                    None => {
                        let id = gw.request_approval(&record.task, &marker, now).await?;
                        return Err(CommitError::from(ApiError::denied(
                            Reason::ApprovalRequired,
                            format!(
                                "entering state {} needs approval; held as elevation request {id}",
                                t.to
                            ),
                        )));
                    }
                }
            }
            task.apply_transition(&t);
            let mut ops = vec![
                Op::UpdateTask {
                    record: TaskRecord {
                        task: task.clone(),
                        deadline: record.deadline,
                    },
                    expected_version: record.task.version,
                },
                Op::Append(portcullis_store::records::transition_event(&task, &t, now)),
            ];
            let rotated = if t.reverify {
                Some(gw.rotate(claims, &task, record.deadline, now, &mut ops)?)
            } else {
                None
            };
            match gw.commit(ops).await {
                Ok(_) => {
                    let mut body =
                        json!({ "state": task.state, "from": t.from, "reverify": t.reverify });
                    if let Some(rotation) = &rotated {
                        rotation.add_to(&mut body);
                        gw.metrics.tokens(TokenEvent::Issued, 1);
                    }
                    Ok((no_store(), Json(body)).into_response())
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }
    .await;
    respond(&rid, result)
}

pub(crate) use portcullis_store::records::ending_ops;

/// Ends a task (completed or halted): status, every token revoked, audit —
/// one transaction.
async fn end_task(
    gw: &Gateway,
    task_id: &str,
    status: TaskStatus,
    by: &str,
) -> Result<Value, ApiError> {
    let _task = gw.lock_task_for_change(task_id).await?;
    gw.retry_on_conflict(|| async move {
        let record = gw.load_task(task_id).await?;
        if record.task.status != TaskStatus::Active {
            return Err(CommitError::from(ApiError::denied(
                Reason::TaskNotActive,
                format!("task is {}", record.task.status.as_str()),
            )));
        }
        let now = gw.now();
        let mut task = record.task.clone();
        task.status = status;
        task.version = task.version.saturating_add(1);
        let why = match status {
            TaskStatus::Halted => format!("halted by {by}"),
            _ => format!("completed by {by}"),
        };
        let mut ops = vec![Op::UpdateTask {
            record: TaskRecord {
                task: task.clone(),
                deadline: record.deadline,
            },
            expected_version: record.task.version,
        }];
        ops.extend(ending_ops(&task, &why, None, now));
        match gw.commit(ops).await {
            Ok(done) => {
                gw.release_task(&task.id);
                if status == TaskStatus::Halted {
                    // After the commit: the halt stands whatever becomes of
                    // the alert. Identifiers and who halted it only.
                    gw.alert(
                        Alert::for_task(TASK_HALTED, &task, now).detail(format!("halted by {by}")),
                    );
                }
                Ok(json!({
                    "task_id": task.id,
                    "status": task.status.as_str(),
                    "revoked_tokens": done.revoked.len(),
                }))
            }
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// `POST /v1/tasks/{id}/complete` — the task's token or an admin.
pub(crate) async fn complete(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let by = match task_or_admin(&gw, &headers, &task_id, Role::Admin).await? {
            Caller::Admin(name) => format!("admin {name}"),
            Caller::Task(claims) => format!("agent {}", claims.sub),
        };
        Ok(Json(end_task(&gw, &task_id, TaskStatus::Completed, &by).await?).into_response())
    }
    .await;
    respond(&rid, result)
}

/// Longest accepted halt or resume reason, in bytes.
pub(crate) const MAX_REASON_BYTES: usize = 2048;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: String,
}

/// An optional `{"reason": …}` body (an empty body: no reason).
async fn reason_of(gw: &Gateway, body: Body) -> Result<String, ApiError> {
    let bytes = crate::body::read_bytes(body, gw.settings.max_body_bytes).await?;
    let req: ReasonBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        ReasonBody::default()
    } else {
        crate::body::parse_json(&bytes)?
    };
    if req.reason.len() > MAX_REASON_BYTES {
        return Err(ApiError::bad_request(format!(
            "reason longer than {MAX_REASON_BYTES} bytes"
        )));
    }
    Ok(req.reason.trim().to_owned())
}

/// Halts a task for `by` (`admin NAME`), with an optional `reason`: what
/// `POST /v1/tasks/{id}/halt` and the console's halt do.
pub(crate) async fn halt_task(
    gw: &Gateway,
    task_id: &str,
    by: &str,
    reason: &str,
) -> Result<Value, ApiError> {
    let by = if reason.is_empty() {
        by.to_owned()
    } else {
        format!("{by}: {reason}")
    };
    end_task(gw, task_id, TaskStatus::Halted, &by).await
}

/// `POST /v1/tasks/{id}/halt` — admin; optional body `{"reason": …}`.
pub(crate) async fn halt(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let admin = gw.require_admin(&headers, Role::Admin)?.name.clone();
        let reason = reason_of(&gw, body).await?;
        Ok(
            Json(halt_task(&gw, &task_id, &format!("admin {admin}"), &reason).await?)
                .into_response(),
        )
    }
    .await;
    respond(&rid, result)
}

/// Resumes a halted task for admin `admin`, with an optional `reason`:
/// fresh tokens (the old ones stay revoked), in the body the API answers.
pub(crate) async fn resume_task(
    gw: &Gateway,
    task_id: &str,
    admin: &str,
    reason: &str,
) -> Result<Value, ApiError> {
    let (task_id, admin, reason) = (&task_id, &admin, &reason);
    let _task = gw.lock_task_for_change(task_id).await?;
    gw.retry_on_conflict(|| async move {
        let record = gw.load_task(task_id).await?;
        if record.task.status != TaskStatus::Halted {
            return Err(CommitError::from(ApiError::denied(
                Reason::TaskNotActive,
                format!(
                    "only a halted task can resume; this one is {}",
                    record.task.status.as_str()
                ),
            )));
        }
        let now = gw.now();
        if now >= record.deadline {
            return Err(CommitError::from(ApiError::denied(
                Reason::TaskNotActive,
                "task passed its maximum lifetime",
            )));
        }
        let mut task = record.task.clone();
        task.status = TaskStatus::Active;
        task.version = task.version.saturating_add(1);
        let scope = gw.phase_scope(&task);
        let (access, expires_in, mint) = gw.mint_access(&task, &scope, record.deadline, now)?;
        let (refresh, refresh_ops) = gw.mint_refresh(&task, record.deadline, now)?;
        let mut resumed = NewEvent::new(now, EventKind::TaskStarted);
        resumed.task_id = Some(task.id.clone());
        resumed.agent_id = Some(task.agent_id.clone());
        resumed.state_to = Some(task.state.clone());
        resumed.detail = Some(if reason.is_empty() {
            format!("resumed by admin {admin}")
        } else {
            format!("resumed by admin {admin}: {reason}")
        });
        let mut ops = vec![
            Op::UpdateTask {
                record: TaskRecord {
                    task: task.clone(),
                    deadline: record.deadline,
                },
                expected_version: record.task.version,
            },
            Op::Append(resumed),
        ];
        ops.extend(mint);
        ops.extend(refresh_ops);
        match gw.commit(ops).await {
            Ok(_) => {
                gw.metrics.tokens(TokenEvent::Issued, 1);
                let body = json!({
                    "task_id": task.id,
                    "status": task.status.as_str(),
                    "state": task.state,
                    "access_token": access,
                    "refresh_token": refresh.as_str(),
                    "token_type": "Bearer",
                    "expires_in": expires_in,
                });
                Ok(body)
            }
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// `POST /v1/tasks/{id}/resume` — admin: a halted task runs again, with
/// fresh tokens (the old ones stay revoked); optional body `{"reason": …}`.
pub(crate) async fn resume(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    Path(task_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let admin = gw.require_admin(&headers, Role::Admin)?.name.clone();
        let reason = reason_of(&gw, body).await?;
        let body = resume_task(&gw, &task_id, &admin, &reason).await?;
        Ok((no_store(), Json(body)).into_response())
    }
    .await;
    respond(&rid, result)
}
