//! The read side: one statement per read, on a pooled connection, each its
//! own implicit transaction (so it sees every batch committed before it
//! started, by any replica). Rows decode through the same checked
//! conversions as the SQLite backend's.

use tokio_postgres::Row;

use super::corrupt;
use super::pool::Conn;
use super::store_error;
use crate::sqlite::rows::{
    RawCheckpoint, RawElevation, RawEvent, RawPin, RawRefresh, RawTask, RawToken, to_uint,
};
use crate::{
    AuditEvent, AuditQuery, Checkpoint, ElevationCursor, ElevationRecord, ElevationStatus,
    MAX_ROWS, RefreshRecord, Result, StoreError, TaskCounts, TaskRecord, TokenRecord, ToolPin,
};

/// A query bound as a `BIGINT`; anything past `i64::MAX` means "no bound",
/// which `i64::MAX` expresses exactly.
fn clamp(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// PostgreSQL text cannot hold NUL, so no stored key contains one: a key
/// with NUL matches nothing (rather than failing as a bad parameter).
fn storable(key: &str) -> bool {
    !key.contains('\0')
}

async fn query(
    conn: &mut Conn,
    context: &str,
    sql: &'static str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Row>> {
    let statement = conn
        .statement(sql)
        .await
        .map_err(|e| store_error(context, &e))?;
    conn.client
        .query(&statement, params)
        .await
        .map_err(|e| store_error(context, &e))
}

async fn query_opt(
    conn: &mut Conn,
    context: &str,
    sql: &'static str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Row>> {
    let statement = conn
        .statement(sql)
        .await
        .map_err(|e| store_error(context, &e))?;
    conn.client
        .query_opt(&statement, params)
        .await
        .map_err(|e| store_error(context, &e))
}

fn task_row(row: &Row) -> std::result::Result<RawTask, tokio_postgres::Error> {
    Ok(RawTask {
        id: row.try_get(0)?,
        agent_id: row.try_get(1)?,
        agent_type: row.try_get(2)?,
        state: row.try_get(3)?,
        status: row.try_get(4)?,
        version: row.try_get(5)?,
        deadline: row.try_get(6)?,
        started_at: row.try_get(7)?,
        body: row.try_get(8)?,
    })
}

fn token_row(row: &Row) -> std::result::Result<RawToken, tokio_postgres::Error> {
    Ok(RawToken {
        jti: row.try_get(0)?,
        task_id: row.try_get(1)?,
        agent_id: row.try_get(2)?,
        kind: row.try_get(3)?,
        issued_at: row.try_get(4)?,
        expires_at: row.try_get(5)?,
        revoked_at: row.try_get(6)?,
        revoke_reason: row.try_get(7)?,
    })
}

fn refresh_row(row: &Row) -> std::result::Result<RawRefresh, tokio_postgres::Error> {
    Ok(RawRefresh {
        hash: row.try_get(0)?,
        task_id: row.try_get(1)?,
        agent_id: row.try_get(2)?,
        issued_at: row.try_get(3)?,
        idle_expires_at: row.try_get(4)?,
        spent_at: row.try_get(5)?,
    })
}

fn event_row(row: &Row) -> std::result::Result<RawEvent, tokio_postgres::Error> {
    Ok(RawEvent {
        seq: row.try_get(0)?,
        event: row.try_get(1)?,
    })
}

fn checkpoint_row(row: &Row) -> std::result::Result<RawCheckpoint, tokio_postgres::Error> {
    Ok(RawCheckpoint {
        seq: row.try_get(0)?,
        hash: row.try_get(1)?,
        ts: row.try_get(2)?,
        kid: row.try_get(3)?,
        sig: row.try_get(4)?,
    })
}

fn elevation_row(row: &Row) -> std::result::Result<RawElevation, tokio_postgres::Error> {
    Ok(RawElevation {
        id: row.try_get(0)?,
        task_id: row.try_get(1)?,
        agent_id: row.try_get(2)?,
        tool: row.try_get(3)?,
        reason: row.try_get(4)?,
        status: row.try_get(5)?,
        requested_at: row.try_get(6)?,
        decided_at: row.try_get(7)?,
        decided_by: row.try_get(8)?,
        note: row.try_get(9)?,
        expires_at: row.try_get(10)?,
        held: row.try_get(11)?,
    })
}

fn pin_row(row: &Row) -> std::result::Result<RawPin, tokio_postgres::Error> {
    Ok(RawPin {
        tool: row.try_get(0)?,
        upstream: row.try_get(1)?,
        hash: row.try_get(2)?,
        definition: row.try_get(3)?,
        pinned_at: row.try_get(4)?,
        approved_by: row.try_get(5)?,
    })
}

/// Decodes every row with `raw` (column types) then `decode` (values).
fn decode_all<R, T>(
    context: &str,
    rows: &[Row],
    raw: fn(&Row) -> std::result::Result<R, tokio_postgres::Error>,
    decode: fn(R) -> Result<T>,
) -> Result<Vec<T>> {
    rows.iter()
        .map(|row| raw(row).map_err(|e| corrupt(context, &e)).and_then(decode))
        .collect()
}

fn decode_opt<R, T>(
    context: &str,
    row: Option<Row>,
    raw: fn(&Row) -> std::result::Result<R, tokio_postgres::Error>,
    decode: fn(R) -> Result<T>,
) -> Result<Option<T>> {
    row.map(|row| raw(&row).map_err(|e| corrupt(context, &e)).and_then(decode))
        .transpose()
}

pub(super) async fn task(conn: &mut Conn, id: &str) -> Result<Option<TaskRecord>> {
    if !storable(id) {
        return Ok(None);
    }
    let context = "read task";
    let row = query_opt(
        conn,
        context,
        "SELECT id, agent_id, agent_type, state, status, version, deadline, started_at, body \
         FROM tasks WHERE id = $1",
        &[&id],
    )
    .await?;
    decode_opt(context, row, task_row, RawTask::decode)
}

pub(super) async fn token(conn: &mut Conn, jti: &str) -> Result<Option<TokenRecord>> {
    if !storable(jti) {
        return Ok(None);
    }
    let context = "read token";
    let row = query_opt(
        conn,
        context,
        "SELECT jti, task_id, agent_id, kind, issued_at, expires_at, revoked_at, revoke_reason \
         FROM tokens WHERE jti = $1",
        &[&jti],
    )
    .await?;
    decode_opt(context, row, token_row, RawToken::decode)
}

pub(super) async fn refresh(conn: &mut Conn, hash: &str) -> Result<Option<RefreshRecord>> {
    if !storable(hash) {
        return Ok(None);
    }
    let context = "read refresh token";
    let row = query_opt(
        conn,
        context,
        "SELECT hash, task_id, agent_id, issued_at, idle_expires_at, spent_at \
         FROM refresh_tokens WHERE hash = $1",
        &[&hash],
    )
    .await?;
    decode_opt(context, row, refresh_row, RawRefresh::decode)
}

pub(super) async fn task_tokens(conn: &mut Conn, task_id: &str) -> Result<Vec<TokenRecord>> {
    if !storable(task_id) {
        return Ok(Vec::new());
    }
    let context = "read task tokens";
    // The latest MAX_ROWS, returned oldest first.
    let rows = query(
        conn,
        context,
        "SELECT jti, task_id, agent_id, kind, issued_at, expires_at, revoked_at, revoke_reason \
         FROM (SELECT * FROM tokens WHERE task_id = $1 \
               ORDER BY issued_at DESC, jti DESC LIMIT $2) AS latest \
         ORDER BY issued_at, jti",
        &[&task_id, &clamp(MAX_ROWS)],
    )
    .await?;
    decode_all(context, &rows, token_row, RawToken::decode)
}

pub(super) async fn audit(conn: &mut Conn, audit_query: &AuditQuery) -> Result<Vec<AuditEvent>> {
    let context = "read audit events";
    if audit_query.task_id.as_deref().is_some_and(|t| !storable(t)) {
        return Ok(Vec::new());
    }
    let since = clamp(audit_query.since_seq.unwrap_or(0));
    let limit = clamp(audit_query.effective_limit());
    let kind = audit_query.kind.map(|k| k.as_str());
    // One fixed statement per filter combination, so each uses its index.
    let rows = match (audit_query.task_id.as_deref(), kind) {
        (Some(task_id), Some(kind)) => {
            query(
                conn,
                context,
                "SELECT seq, event FROM audit_events WHERE task_id = $1 AND kind = $2 \
                 AND seq > $3 ORDER BY seq LIMIT $4",
                &[&task_id, &kind, &since, &limit],
            )
            .await?
        }
        (Some(task_id), None) => {
            query(
                conn,
                context,
                "SELECT seq, event FROM audit_events WHERE task_id = $1 AND seq > $2 \
                 ORDER BY seq LIMIT $3",
                &[&task_id, &since, &limit],
            )
            .await?
        }
        (None, Some(kind)) => {
            query(
                conn,
                context,
                "SELECT seq, event FROM audit_events WHERE kind = $1 AND seq > $2 \
                 ORDER BY seq LIMIT $3",
                &[&kind, &since, &limit],
            )
            .await?
        }
        (None, None) => {
            query(
                conn,
                context,
                "SELECT seq, event FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&since, &limit],
            )
            .await?
        }
    };
    decode_all(context, &rows, event_row, RawEvent::decode)
}

pub(super) async fn elevation(conn: &mut Conn, id: &str) -> Result<Option<ElevationRecord>> {
    if !storable(id) {
        return Ok(None);
    }
    let context = "read elevation";
    let row = query_opt(
        conn,
        context,
        "SELECT id, task_id, agent_id, tool, reason, status, requested_at, decided_at, \
         decided_by, note, expires_at, held FROM elevations WHERE id = $1",
        &[&id],
    )
    .await?;
    decode_opt(context, row, elevation_row, RawElevation::decode)
}

/// `SELECT <every column> FROM elevations <rest>`, as one literal.
macro_rules! select_elevations {
    ($rest:literal) => {
        concat!(
            "SELECT id, task_id, agent_id, tool, reason, status, requested_at, decided_at, \
             decided_by, note, expires_at, held FROM elevations ",
            $rest
        )
    };
}

pub(super) async fn elevations(
    conn: &mut Conn,
    status: Option<ElevationStatus>,
    after: Option<&ElevationCursor>,
    limit: usize,
) -> Result<Vec<ElevationRecord>> {
    let context = "read elevations";
    let limit = clamp(limit.min(MAX_ROWS));
    // A cursor id with NUL names nothing stored: the page after it is the
    // one after its time alone.
    let after = after.map(|c| {
        let id: String = c.id.chars().filter(|ch| *ch != '\0').collect();
        (clamp(c.requested_at.0), id)
    });
    // One statement per shape, each served by an index on
    // (status, requested_at, id) or (requested_at, id).
    let rows = match (status, &after) {
        (Some(status), Some((at, id))) => {
            query(
                conn,
                context,
                select_elevations!(
                    "WHERE status = $1 \
                     AND (requested_at, id) > ($2, $3) ORDER BY requested_at, id LIMIT $4"
                ),
                &[&status.as_str(), at, id, &limit],
            )
            .await?
        }
        (Some(status), None) => {
            query(
                conn,
                context,
                select_elevations!(
                    "WHERE status = $1 \
                     ORDER BY requested_at, id LIMIT $2"
                ),
                &[&status.as_str(), &limit],
            )
            .await?
        }
        (None, Some((at, id))) => {
            query(
                conn,
                context,
                select_elevations!(
                    "WHERE (requested_at, id) > ($1, $2) \
                     ORDER BY requested_at, id LIMIT $3"
                ),
                &[at, id, &limit],
            )
            .await?
        }
        (None, None) => {
            query(
                conn,
                context,
                select_elevations!("ORDER BY requested_at, id LIMIT $1"),
                &[&limit],
            )
            .await?
        }
    };
    decode_all(context, &rows, elevation_row, RawElevation::decode)
}

pub(super) async fn checkpoints(
    conn: &mut Conn,
    since_seq: Option<u64>,
    limit: usize,
) -> Result<Vec<Checkpoint>> {
    let context = "read checkpoints";
    let since = clamp(since_seq.unwrap_or(0));
    let limit = clamp(limit.min(MAX_ROWS));
    let rows = query(
        conn,
        context,
        "SELECT seq, hash, ts, kid, sig FROM checkpoints WHERE seq > $1 ORDER BY seq LIMIT $2",
        &[&since, &limit],
    )
    .await?;
    decode_all(context, &rows, checkpoint_row, RawCheckpoint::decode)
}

pub(super) async fn chain_head(conn: &mut Conn) -> Result<Option<(u64, String)>> {
    let context = "read the chain head";
    let row = query_opt(
        conn,
        context,
        "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
        &[],
    )
    .await?;
    decode_opt(
        context,
        row,
        |row| Ok((row.try_get::<_, i64>(0)?, row.try_get::<_, String>(1)?)),
        |(seq, hash)| Ok((to_uint("audit seq", seq)?, hash)),
    )
}

pub(super) async fn pins(conn: &mut Conn) -> Result<Vec<ToolPin>> {
    let context = "read tool pins";
    let rows = query(
        conn,
        context,
        "SELECT tool, upstream, hash, definition, pinned_at, approved_by FROM tool_pins \
         ORDER BY tool",
        &[],
    )
    .await?;
    decode_all(context, &rows, pin_row, RawPin::decode)
}

pub(super) async fn tool_used(conn: &mut Conn, agent_id: &str, tool: &str) -> Result<bool> {
    if !storable(agent_id) || !storable(tool) {
        return Ok(false);
    }
    let row = query_opt(
        conn,
        "read tool use",
        "SELECT 1 FROM agent_tools WHERE agent_id = $1 AND tool = $2",
        &[&agent_id, &tool],
    )
    .await?;
    Ok(row.is_some())
}

pub(super) async fn pin(conn: &mut Conn, tool: &str) -> Result<Option<ToolPin>> {
    if !storable(tool) {
        return Ok(None);
    }
    let context = "read tool pin";
    let row = query_opt(
        conn,
        context,
        "SELECT tool, upstream, hash, definition, pinned_at, approved_by FROM tool_pins \
         WHERE tool = $1",
        &[&tool],
    )
    .await?;
    decode_opt(context, row, pin_row, RawPin::decode)
}

pub(super) async fn task_counts(conn: &mut Conn) -> Result<TaskCounts> {
    let context = "count tasks";
    // One scan of the `tasks_status` index (migration 3) over the
    // unfinished tasks only.
    let row = query_opt(
        conn,
        context,
        "SELECT count(*) FILTER (WHERE status = 'active'), \
         count(*) FILTER (WHERE status = 'halted') \
         FROM tasks WHERE status IN ('active', 'halted')",
        &[],
    )
    .await?;
    decode_opt(
        context,
        row,
        |row| Ok((row.try_get::<_, i64>(0)?, row.try_get::<_, i64>(1)?)),
        |(active, halted)| {
            Ok(TaskCounts {
                active: to_uint("active task count", active)?,
                halted: to_uint("halted task count", halted)?,
            })
        },
    )
    .and_then(|counts| {
        counts.ok_or_else(|| StoreError::Corrupt(format!("{context}: no row from an aggregate")))
    })
}
