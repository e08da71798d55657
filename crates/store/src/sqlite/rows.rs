//! Records to columns and back. Every decode is checked: a row that does not
//! decode is [`StoreError::Corrupt`], never a default value.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_core::anomaly::Watch;
use portcullis_core::{Grant, Task, TaskStatus, Timestamp};
use rusqlite::Row;
use serde::{Deserialize, Serialize};

use crate::{
    AuditEvent, Checkpoint, ElevationRecord, ElevationStatus, HeldCall, RefreshRecord, Result,
    StoreError, TaskRecord, TokenKind, TokenRecord, ToolPin,
};

/// A `u64` as SQLite's `INTEGER` (`i64`); larger values are refused.
pub fn to_int(what: &str, value: u64) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{what} {value} exceeds the storable range")))
}

/// A stored `INTEGER` back to `u64`; negative values are corrupt.
pub fn to_uint(what: &str, value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {value}")))
}

fn to_ts(what: &str, value: i64) -> Result<Timestamp> {
    to_uint(what, value).map(Timestamp)
}

/// The `tasks.body` JSON: the fields of a [`Task`] that are not columns.
#[derive(Serialize)]
struct TaskBodyRef<'a> {
    goal: &'a str,
    tools: &'a BTreeSet<String>,
    grants: &'a [Grant],
    calls: u64,
    tool_calls: &'a BTreeMap<String, u64>,
    watch: &'a Watch,
}

#[derive(Deserialize)]
struct TaskBody {
    goal: String,
    tools: BTreeSet<String>,
    grants: Vec<Grant>,
    calls: u64,
    tool_calls: BTreeMap<String, u64>,
    /// Absent in rows written before the anomaly rules existed.
    #[serde(default)]
    watch: Watch,
}

/// The columns of one `tasks` row, in table order.
#[derive(Debug)]
pub struct TaskRow {
    pub id: String,
    pub agent_id: String,
    pub agent_type: String,
    pub state: String,
    pub status: &'static str,
    pub version: i64,
    pub deadline: i64,
    pub started_at: i64,
    pub body: String,
}

impl TaskRow {
    /// Encodes a record for `INSERT`/`UPDATE`.
    pub fn encode(record: &TaskRecord) -> Result<Self> {
        let task = &record.task;
        let body = serde_json::to_string(&TaskBodyRef {
            goal: &task.goal,
            tools: &task.tools,
            grants: &task.grants,
            calls: task.calls,
            tool_calls: &task.tool_calls,
            watch: &task.watch,
        })
        .map_err(|e| StoreError::Corrupt(format!("encode task {}: {e}", task.id)))?;
        Ok(Self {
            id: task.id.clone(),
            agent_id: task.agent_id.clone(),
            agent_type: task.agent_type.clone(),
            state: task.state.clone(),
            status: task.status.as_str(),
            version: to_int("task version", task.version)?,
            deadline: to_int("task deadline", record.deadline.0)?,
            started_at: to_int("task started_at", task.started_at.0)?,
            body,
        })
    }
}

/// The raw columns of `SELECT` [`TASK_COLUMNS`].
#[derive(Debug)]
pub struct RawTask {
    pub(crate) id: String,
    pub(crate) agent_id: String,
    pub(crate) agent_type: String,
    pub(crate) state: String,
    pub(crate) status: String,
    pub(crate) version: i64,
    pub(crate) deadline: i64,
    pub(crate) started_at: i64,
    pub(crate) body: String,
}

/// The column list [`RawTask::from_row`] expects.
pub const TASK_COLUMNS: &str =
    "id, agent_id, agent_type, state, status, version, deadline, started_at, body";

impl RawTask {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            agent_id: row.get(1)?,
            agent_type: row.get(2)?,
            state: row.get(3)?,
            status: row.get(4)?,
            version: row.get(5)?,
            deadline: row.get(6)?,
            started_at: row.get(7)?,
            body: row.get(8)?,
        })
    }

    pub fn decode(self) -> Result<TaskRecord> {
        let status = match self.status.as_str() {
            "active" => TaskStatus::Active,
            "completed" => TaskStatus::Completed,
            "halted" => TaskStatus::Halted,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "task {}: unknown status {other:?}",
                    self.id
                )));
            }
        };
        let body: TaskBody = serde_json::from_str(&self.body)
            .map_err(|e| StoreError::Corrupt(format!("task {}: body: {e}", self.id)))?;
        Ok(TaskRecord {
            deadline: to_ts("task deadline", self.deadline)?,
            task: Task {
                version: to_uint("task version", self.version)?,
                started_at: to_ts("task started_at", self.started_at)?,
                id: self.id,
                agent_id: self.agent_id,
                agent_type: self.agent_type,
                goal: body.goal,
                state: self.state,
                status,
                tools: body.tools,
                grants: body.grants,
                calls: body.calls,
                tool_calls: body.tool_calls,
                watch: body.watch,
            },
        })
    }
}

/// The column list [`RawToken::from_row`] expects.
pub const TOKEN_COLUMNS: &str =
    "jti, task_id, agent_id, kind, issued_at, expires_at, revoked_at, revoke_reason";

/// The raw columns of `SELECT` [`TOKEN_COLUMNS`].
#[derive(Debug)]
pub struct RawToken {
    pub(crate) jti: String,
    pub(crate) task_id: String,
    pub(crate) agent_id: String,
    pub(crate) kind: String,
    pub(crate) issued_at: i64,
    pub(crate) expires_at: i64,
    pub(crate) revoked_at: Option<i64>,
    pub(crate) revoke_reason: Option<String>,
}

impl RawToken {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            jti: row.get(0)?,
            task_id: row.get(1)?,
            agent_id: row.get(2)?,
            kind: row.get(3)?,
            issued_at: row.get(4)?,
            expires_at: row.get(5)?,
            revoked_at: row.get(6)?,
            revoke_reason: row.get(7)?,
        })
    }

    pub fn decode(self) -> Result<TokenRecord> {
        let kind: TokenKind = self
            .kind
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("token {}: {e}", self.jti)))?;
        Ok(TokenRecord {
            kind,
            issued_at: to_ts("token issued_at", self.issued_at)?,
            expires_at: to_ts("token expires_at", self.expires_at)?,
            revoked_at: self
                .revoked_at
                .map(|at| to_ts("token revoked_at", at))
                .transpose()?,
            jti: self.jti,
            task_id: self.task_id,
            agent_id: self.agent_id,
            revoke_reason: self.revoke_reason,
        })
    }
}

/// The column list [`RawRefresh::from_row`] expects.
pub const REFRESH_COLUMNS: &str = "hash, task_id, agent_id, issued_at, idle_expires_at, spent_at";

/// The raw columns of `SELECT` [`REFRESH_COLUMNS`].
#[derive(Debug)]
pub struct RawRefresh {
    pub(crate) hash: String,
    pub(crate) task_id: String,
    pub(crate) agent_id: String,
    pub(crate) issued_at: i64,
    pub(crate) idle_expires_at: i64,
    pub(crate) spent_at: Option<i64>,
}

impl RawRefresh {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            hash: row.get(0)?,
            task_id: row.get(1)?,
            agent_id: row.get(2)?,
            issued_at: row.get(3)?,
            idle_expires_at: row.get(4)?,
            spent_at: row.get(5)?,
        })
    }

    pub fn decode(self) -> Result<RefreshRecord> {
        Ok(RefreshRecord {
            issued_at: to_ts("refresh issued_at", self.issued_at)?,
            idle_expires_at: to_ts("refresh idle_expires_at", self.idle_expires_at)?,
            spent_at: self
                .spent_at
                .map(|at| to_ts("refresh spent_at", at))
                .transpose()?,
            hash: self.hash,
            task_id: self.task_id,
            agent_id: self.agent_id,
        })
    }
}

/// The raw columns of `SELECT seq, event FROM audit_events`.
#[derive(Debug)]
pub struct RawEvent {
    pub(crate) seq: i64,
    pub(crate) event: String,
}

impl RawEvent {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: row.get(0)?,
            event: row.get(1)?,
        })
    }

    /// The record is the `event` JSON; its `seq` is the row's key (the copy
    /// inside the JSON is not read, so a record moved to another row
    /// carries that row's seq, and its hash no longer matches).
    pub fn decode(self) -> Result<AuditEvent> {
        let seq = to_uint("audit seq", self.seq)?;
        let mut record: AuditEvent = serde_json::from_str(&self.event)
            .map_err(|e| StoreError::Corrupt(format!("audit event {seq}: {e}")))?;
        record.seq = seq;
        Ok(record)
    }
}

/// The column list [`RawCheckpoint::from_row`] expects.
pub const CHECKPOINT_COLUMNS: &str = "seq, hash, ts, kid, sig";

/// The raw columns of `SELECT` [`CHECKPOINT_COLUMNS`].
#[derive(Debug, PartialEq, Eq)]
pub struct RawCheckpoint {
    pub seq: i64,
    pub hash: String,
    pub ts: i64,
    pub kid: String,
    pub sig: String,
}

impl RawCheckpoint {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: row.get(0)?,
            hash: row.get(1)?,
            ts: row.get(2)?,
            kid: row.get(3)?,
            sig: row.get(4)?,
        })
    }

    /// Encodes a checkpoint for `INSERT`.
    pub fn encode(checkpoint: &Checkpoint) -> Result<Self> {
        Ok(Self {
            seq: to_int("checkpoint seq", checkpoint.seq)?,
            hash: checkpoint.hash.clone(),
            ts: to_int("checkpoint ts", checkpoint.ts.0)?,
            kid: checkpoint.kid.clone(),
            sig: checkpoint.sig.clone(),
        })
    }

    pub fn decode(self) -> Result<Checkpoint> {
        Ok(Checkpoint {
            seq: to_uint("checkpoint seq", self.seq)?,
            ts: to_ts("checkpoint ts", self.ts)?,
            hash: self.hash,
            kid: self.kid,
            sig: self.sig,
        })
    }
}

/// The column list [`RawElevation::from_row`] expects.
pub const ELEVATION_COLUMNS: &str = "id, task_id, agent_id, tool, reason, status, requested_at, \
     decided_at, decided_by, note, expires_at, held";

/// The raw columns of `SELECT` [`ELEVATION_COLUMNS`].
#[derive(Debug)]
pub struct RawElevation {
    pub(crate) id: String,
    pub(crate) task_id: String,
    pub(crate) agent_id: String,
    pub(crate) tool: String,
    pub(crate) reason: String,
    pub(crate) status: String,
    pub(crate) requested_at: i64,
    pub(crate) decided_at: Option<i64>,
    pub(crate) decided_by: Option<String>,
    pub(crate) note: Option<String>,
    pub(crate) expires_at: Option<i64>,
    pub(crate) held: Option<String>,
}

impl RawElevation {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            task_id: row.get(1)?,
            agent_id: row.get(2)?,
            tool: row.get(3)?,
            reason: row.get(4)?,
            status: row.get(5)?,
            requested_at: row.get(6)?,
            decided_at: row.get(7)?,
            decided_by: row.get(8)?,
            note: row.get(9)?,
            expires_at: row.get(10)?,
            held: row.get(11)?,
        })
    }

    pub fn decode(self) -> Result<ElevationRecord> {
        let status: ElevationStatus = self
            .status
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("elevation {}: {e}", self.id)))?;
        Ok(ElevationRecord {
            status,
            requested_at: to_ts("elevation requested_at", self.requested_at)?,
            decided_at: self
                .decided_at
                .map(|at| to_ts("elevation decided_at", at))
                .transpose()?,
            expires_at: self
                .expires_at
                .map(|at| to_ts("elevation expires_at", at))
                .transpose()?,
            held: self
                .held
                .as_deref()
                .map(|text| HeldCall::decode(&self.id, text))
                .transpose()?,
            id: self.id,
            task_id: self.task_id,
            agent_id: self.agent_id,
            tool: self.tool,
            reason: self.reason,
            decided_by: self.decided_by,
            note: self.note,
        })
    }
}

/// The column list [`RawPin::from_row`] expects.
pub const PIN_COLUMNS: &str = "tool, upstream, hash, definition, pinned_at, approved_by";

/// The raw columns of `SELECT` [`PIN_COLUMNS`].
#[derive(Debug)]
pub struct RawPin {
    pub(crate) tool: String,
    pub(crate) upstream: String,
    pub(crate) hash: String,
    pub(crate) definition: String,
    pub(crate) pinned_at: i64,
    pub(crate) approved_by: String,
}

impl RawPin {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            tool: row.get(0)?,
            upstream: row.get(1)?,
            hash: row.get(2)?,
            definition: row.get(3)?,
            pinned_at: row.get(4)?,
            approved_by: row.get(5)?,
        })
    }

    /// The `definition` column must hold a JSON object, as written.
    pub fn decode(self) -> Result<ToolPin> {
        let definition: serde_json::Value =
            serde_json::from_str(&self.definition).map_err(|e| {
                StoreError::Corrupt(format!("pin of tool {}: definition: {e}", self.tool))
            })?;
        if !definition.is_object() {
            return Err(StoreError::Corrupt(format!(
                "pin of tool {}: the definition is not a JSON object",
                self.tool
            )));
        }
        Ok(ToolPin {
            definition,
            pinned_at: to_ts("pin pinned_at", self.pinned_at)?,
            tool: self.tool,
            upstream: self.upstream,
            hash: self.hash,
            approved_by: self.approved_by,
        })
    }
}
