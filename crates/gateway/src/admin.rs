//! Admin endpoints that are not about one task: the audit log.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use portcullis_config::Role;
use portcullis_store::{AuditQuery, EventKind};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::server::RequestId;
use crate::state::Gateway;
use crate::tasks::respond;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditParams {
    task_id: Option<String>,
    kind: Option<String>,
    since_seq: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/audit?task_id=&kind=&since_seq=&limit=` — auditors.
pub(crate) async fn audit(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    headers: HeaderMap,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        gw.require_admin(&headers, Role::Auditor)?;
        let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let kind = match p.kind.as_deref().filter(|k| !k.is_empty()) {
            Some(k) => Some(
                k.parse::<EventKind>()
                    .map_err(|_| ApiError::bad_request("unknown event kind"))?,
            ),
            None => None,
        };
        let query = AuditQuery {
            task_id: p.task_id.filter(|t| !t.is_empty()),
            kind,
            since_seq: p.since_seq,
            limit: p.limit,
        };
        // Every answer given so far has its records in the results: the
        // completion records still queued land first.
        gw.store
            .settled()
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        let events = gw
            .store
            .audit(&query)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        let next = events.last().map(|e| e.seq);
        Ok(Json(json!({ "records": events, "next_since_seq": next })).into_response())
    }
    .await;
    respond(&rid, result)
}
