//! The first two steps of the request path as layers, in order:
//!
//! 1. [`authenticate`]: the bearer access token is verified (signature,
//!    claims, revocation) and its claims put in the request's extensions as
//!    [`TaskCaller`]; any failure answers 401 before a handler runs.
//! 2. [`bind_task`]: the `{task_id}` of the path must be the token's task
//!    (`task_mismatch`, 403).
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

use crate::pipeline::bind;
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

/// Step 1: authenticate the task token.
pub(crate) async fn authenticate(
    State(gw): State<Arc<Gateway>>,
    mut req: Request,
    next: Next,
) -> Response {
    let rid = request_id(&req);
    match gw.authenticate(req.headers()).await {
        Ok(claims) => {
            req.extensions_mut().insert(TaskCaller(Arc::new(claims)));
            next.run(req).await
        }
        Err(e) => e.with_request_id(&rid.0).into_response(),
    }
}

/// Step 2: bind the token to the task named in the path.
pub(crate) async fn bind_task(
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
        Err(e) => e.with_request_id(&rid.0).into_response(),
    }
}
