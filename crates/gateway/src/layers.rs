//! The first two steps of the request path as layers, in order:
//!
//! 1. [`authenticate`]: the bearer access token is verified (signature,
//!    claims, revocation) and its claims put in the request's extensions as
//!    [`TaskCaller`]; any failure answers 401 before a handler runs.
//! 2. [`bind_task`]: the `{task_id}` of the path must be the token's task
//!    (`task_mismatch`, 403).
//!
//! Both refusals are audited (`call.denied` with the reason). A refusal by
//! an authenticated caller (a token of another task) is recorded before the
//! answer goes out, like every other denial; a refusal of a caller without
//! a valid credential is counted per source and recorded in aggregate, one
//! record per source and window, and a source over the rate is answered
//! `rate_limited` without touching the ledger ([`crate::refusals`]): a
//! flood of bad tokens neither grows the log per request nor queues ahead
//! of real calls at the ledger writer.
//!
//! They wrap every route that only a task's own token may call. What
//! follows — the decision, the per-hop credential, the write-ahead record,
//! forwarding and the outcome — runs in `pipeline`, in that order, because
//! it needs the parsed body and shares one ledger transaction.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use portcullis_token::Claims;

use portcullis_store::{EventKind, NewEvent, Op};

use crate::error::ApiError;
use crate::pipeline::{bind, ledger_deadline, within_deadline};
use crate::server::RequestId;
use crate::state::Gateway;

/// The authenticated task token of a request.
#[derive(Debug, Clone)]
pub(crate) struct TaskCaller(pub Arc<Claims>);

fn request_id(req: &Request) -> RequestId {
    req.extensions()
        .get::<RequestId>()
        .cloned()
        .unwrap_or(RequestId(String::new()))
}

/// Step 1: authenticate the task token. A refusal is audited against the
/// task the path names (the caller is unknown).
pub(crate) async fn authenticate(
    State(gw): State<Arc<Gateway>>,
    Path(params): Path<HashMap<String, String>>,
    mut req: Request,
    next: Next,
) -> Response {
    let rid = request_id(&req);
    let deadline = ledger_deadline();
    match gw.authenticate(req.headers(), deadline).await {
        Ok(claims) => {
            req.extensions_mut().insert(TaskCaller(Arc::new(claims)));
            next.run(req).await
        }
        Err(e) => {
            let answer = audit_refusal(&gw, params.get("task_id"), None, &e, deadline).await;
            answer.with_request_id(&rid.0).into_response()
        }
    }
}

/// Records a refusal that happened before a call was decided (a failed
/// authentication, a token of another task) as `call.denied`.
///
/// - The caller is unknown (`agent_id` is `None`: no valid credential):
///   the refusal is counted against the request's source and recorded in
///   aggregate ([`Gateway::count_refusal`]); the answer may become
///   `rate_limited` (403). Nothing waits for the ledger.
/// - The caller is known: the refusal is its own record, committed before
///   the answer. If it cannot be written, the answer becomes the ledger
///   failure: no refusal goes unrecorded silently. The record is due by
///   `deadline` (the request's, when the refusal came from a ledger step
///   that had one).
pub(crate) async fn audit_refusal(
    gw: &Gateway,
    task_id: Option<&String>,
    agent_id: Option<&str>,
    refusal: &ApiError,
    deadline: tokio::time::Instant,
) -> ApiError {
    // A ledger that did not answer is no refusal of the caller: it is
    // answered as the failure it is (503), neither counted against the
    // source nor ever turned into `rate_limited` — many callers behind one
    // address (a load balancer, loopback) would otherwise be told they
    // flood when the ledger is down.
    if matches!(refusal.kind(), crate::error::Kind::Unavailable)
        || refusal.reason() == Some(portcullis_core::Reason::InternalError)
    {
        return refusal.clone();
    }
    let Some(agent_id) = agent_id else {
        // Bounded: the path is the caller's input.
        let task: Option<String> = task_id.map(|t| t.chars().take(128).collect());
        return gw.count_refusal(task.as_deref(), refusal);
    };
    let mut event = NewEvent::new(gw.now(), EventKind::CallDenied);
    // Bounded: the path is the caller's input.
    event.task_id = task_id.map(|t| t.chars().take(128).collect());
    event.agent_id = Some(agent_id.to_owned());
    event.decision = Some("deny".to_owned());
    event.reason = refusal.reason().map(|r| r.as_str().to_owned());
    event.detail = Some(refusal.detail().chars().take(256).collect());
    let recorded = within_deadline("recording the refusal", deadline, async {
        gw.commit(vec![Op::Append(event)])
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))
    })
    .await;
    match recorded {
        Ok(_) => refusal.clone(),
        Err(e) => e,
    }
}

/// Step 2: bind the token to the task named in the path.
pub(crate) async fn bind_task(
    State(gw): State<Arc<Gateway>>,
    Path(params): Path<HashMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let rid = request_id(&req);
    let bound = match (req.extensions().get::<TaskCaller>(), params.get("task_id")) {
        (Some(caller), Some(task_id)) => bind(&caller.0, task_id),
        // Wired wrongly: fail closed.
        _ => Err(crate::state::internal(
            "task binding without a caller or a task id",
        )),
    };
    match bound {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let agent = req
                .extensions()
                .get::<TaskCaller>()
                .map(|c| c.0.sub.clone());
            let answer = audit_refusal(
                &gw,
                params.get("task_id"),
                agent.as_deref(),
                &e,
                ledger_deadline(),
            )
            .await;
            answer.with_request_id(&rid.0).into_response()
        }
    }
}
