//! `GET /v1/events`: the audit log as it grows, as Server-Sent Events
//! (DESIGN section 14). Auditors only, like `GET /v1/audit`.
//!
//! - One event per committed audit record, in `seq` order: `id:` is the
//!   record's `seq`, `event: audit`, `data:` the record as `GET /v1/audit`
//!   returns it.
//! - Resumable: a reconnecting client sends `Last-Event-ID` (or
//!   `since_seq`) and gets every record after it, none twice. Without
//!   either, the stream starts after the newest record.
//! - Filters: `task_id`, `kind` (in the ledger query), `agent` (on each
//!   record).
//! - The ledger is read every [`POLL_EVERY`], so records written by other
//!   replicas (one PostgreSQL ledger) show up too.
//! - Bounded: at most [`MAX_STREAMS`] streams at once (one more is refused
//!   `rate_limited` with `Retry-After`), a comment line every
//!   [`HEARTBEAT_EVERY`] keeps idle ones open through proxies, and a stream
//!   ends after [`MAX_STREAM_AGE`] (the client resumes with
//!   `Last-Event-ID`). A ledger that cannot be read ends the stream: it
//!   never skips records.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use portcullis_config::Role;
use portcullis_store::{AuditQuery, EventKind};
use serde::Deserialize;

use crate::error::ApiError;
use crate::server::RequestId;
use crate::state::Gateway;
use crate::tasks::respond;

/// How often the ledger is read for new records.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// How often an idle stream gets a comment line.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);
/// How long one stream lasts before the gateway ends it.
pub const MAX_STREAM_AGE: Duration = Duration::from_secs(3600);
/// Most streams open at once.
pub const MAX_STREAMS: usize = 64;
/// Records read per ledger query.
const PAGE: usize = 500;
/// Longest accepted filter value, in bytes.
const MAX_FILTER_BYTES: usize = 256;

/// The filters of a stream.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventParams {
    pub task_id: Option<String>,
    pub agent: Option<String>,
    pub kind: Option<String>,
    pub since_seq: Option<u64>,
}

/// A checked [`EventParams`].
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    task_id: Option<String>,
    agent: Option<String>,
    kind: Option<EventKind>,
    /// Records after this seq; `None`: after the newest at the start.
    after: Option<u64>,
}

impl Filter {
    /// Checks `p`; `Last-Event-ID` in `headers` wins over `since_seq`.
    pub(crate) fn parse(p: EventParams, headers: &HeaderMap) -> Result<Self, ApiError> {
        let nonempty = |v: Option<String>, what: &str| -> Result<Option<String>, ApiError> {
            match v.filter(|s| !s.is_empty()) {
                Some(s) if s.len() > MAX_FILTER_BYTES => Err(ApiError::bad_request(format!(
                    "{what} longer than {MAX_FILTER_BYTES} bytes"
                ))),
                other => Ok(other),
            }
        };
        let kind = match nonempty(p.kind, "kind")? {
            Some(k) => Some(
                k.parse::<EventKind>()
                    .map_err(|_| ApiError::bad_request("unknown event kind"))?,
            ),
            None => None,
        };
        let last = match headers.get("last-event-id") {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        ApiError::bad_request("Last-Event-ID must be the id of an event")
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            task_id: nonempty(p.task_id, "task_id")?,
            agent: nonempty(p.agent, "agent")?,
            kind,
            after: last.or(p.since_seq),
        })
    }
}

/// `GET /v1/events` — auditors.
pub(crate) async fn events(
    State(gw): State<Arc<Gateway>>,
    rid: RequestId,
    headers: HeaderMap,
    params: Result<Query<EventParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        gw.require_admin(&headers, Role::Auditor)?;
        let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let filter = Filter::parse(p, &headers)?;
        stream(&gw, filter).await
    }
    .await;
    respond(&rid, result)
}

/// The stream of `filter`, for a caller already allowed to read the audit
/// log (an auditor's token, or a console session with that role).
pub(crate) async fn stream(gw: &Arc<Gateway>, filter: Filter) -> Result<Response, ApiError> {
    let permit = gw
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::throttled(format!("{MAX_STREAMS} event streams are open"), 5))?;
    let after = match filter.after {
        Some(seq) => seq,
        None => gw
            .store
            .chain_head()
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
            .map_or(0, |(seq, _)| seq),
    };
    let (tx, response) = crate::sse::channel();
    let gw = Arc::downgrade(gw);
    tokio::spawn(async move {
        let _permit = permit;
        let ends = tokio::time::Instant::now() + MAX_STREAM_AGE;
        let mut after = after;
        let mut quiet_since = tokio::time::Instant::now();
        // The client learns the retry delay for a reconnect.
        if tx
            .send(axum::body::Bytes::from_static(b"retry: 1000\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let Some(g) = gw.upgrade() else { return };
            let query = AuditQuery {
                task_id: filter.task_id.clone(),
                kind: filter.kind,
                since_seq: Some(after),
                limit: Some(PAGE),
            };
            let page = g.store.audit(&query).await;
            drop(g);
            let records = match page {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "event stream: ledger read failed; ending the stream");
                    return;
                }
            };
            let full = records.len() >= PAGE;
            for record in records {
                after = record.seq;
                if let Some(agent) = &filter.agent
                    && record.event.agent_id.as_deref() != Some(agent.as_str())
                {
                    continue;
                }
                let Ok(data) = serde_json::to_string(&record) else {
                    return;
                };
                let id = record.seq.to_string();
                if tx
                    .send(crate::sse::event(Some(&id), Some("audit"), &data))
                    .await
                    .is_err()
                {
                    return;
                }
                quiet_since = tokio::time::Instant::now();
            }
            if full {
                continue;
            }
            let now = tokio::time::Instant::now();
            if now >= ends {
                return;
            }
            if now.saturating_duration_since(quiet_since) >= HEARTBEAT_EVERY {
                if tx.send(crate::sse::heartbeat()).await.is_err() {
                    return;
                }
                quiet_since = now;
            }
            tokio::select! {
                () = tokio::time::sleep(POLL_EVERY) => {}
                () = tx.closed() => return,
            }
        }
    });
    Ok(response)
}
