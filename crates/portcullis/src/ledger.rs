//! The embedded ledger: the audit chain of an in-process gateway.
//!
//! [`Portcullis::open`](crate::Portcullis::open) opens the SQLite ledger
//! named by the configuration's `store.url`, the same file format and hash
//! chain that `portcullis serve` writes, so `portcullis audit verify|tail|
//! export --config F` read it as they read a sidecar's. What goes in it, in
//! order, with the gateway's record shapes:
//!
//! - `task.started` when a task starts;
//! - `call.allowed` / `call.denied` for every decided call, **durable
//!   before the decision is returned** (the write-ahead record: an allowed
//!   call is never made without it);
//! - `call.completed` after the call ran (`decision` `allow` with the
//!   result's digest, or `error` with what failed), sequenced into the
//!   chain at once and made durable with the next commit, as the service
//!   does (a crash can lose only the outcome records of the last calls,
//!   never a write-ahead record);
//! - `state.transition`, `task.completed`, `task.halted`.
//!
//! Arguments are redacted with `audit.redact` and bounded exactly as the
//! service does ([`portcullis_store::redact`]). The ledger is synchronous
//! to its callers: it drives the store on a small runtime of its own, so
//! it must not be called from inside an async runtime's worker.
//!
//! Only `sqlite://` is an embedded ledger; a PostgreSQL `store.url` is
//! refused (a cluster's ledger belongs to its `serve` replicas).

use std::path::PathBuf;

use portcullis_config::LoadedConfig;
use portcullis_core::plan::{Plan, Step};
use portcullis_core::{Reason, Task, Timestamp, Transition};
use portcullis_store::records;
use portcullis_store::redact::{bounded, redact};
use portcullis_store::{
    AuditEvent, AuditQuery, EventKind, NewEvent, Op, SqliteOptions, SqliteStore, Store,
};
use serde_json::Value;

/// Why the ledger could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// `store.url` does not name an embedded (SQLite) ledger.
    #[error("store.url {0:?} is not an embedded ledger: use sqlite://FILE")]
    NotEmbedded(String),
    /// The store refused or failed: treat as a denial.
    #[error("ledger: {0}")]
    Store(#[from] portcullis_store::StoreError),
    /// The runtime that drives the store could not start.
    #[error("ledger runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The SQLite ledger of an embedded gateway.
#[derive(Debug)]
pub struct Ledger {
    store: SqliteStore,
    runtime: tokio::runtime::Runtime,
    redact: Vec<String>,
}

impl Ledger {
    /// Opens (creating if needed) the ledger of `loaded`'s `store.url`.
    pub fn open(loaded: &LoadedConfig) -> Result<Self, LedgerError> {
        let url = &loaded.config.store.url;
        let Some(path) = url.strip_prefix("sqlite://") else {
            return Err(LedgerError::NotEmbedded(url.clone()));
        };
        let path: PathBuf = loaded.resolve(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let store = SqliteStore::open_with(&path, &SqliteOptions::default())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            store,
            runtime,
            redact: loaded
                .config
                .audit
                .redact
                .iter()
                .map(|w| w.to_lowercase())
                .collect(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &std::path::Path {
        self.store.path()
    }

    /// Appends `events` and returns once they are durable.
    pub fn commit(&self, events: Vec<NewEvent>) -> Result<(), LedgerError> {
        let ops = events.into_iter().map(Op::Append).collect();
        self.runtime.block_on(self.store.commit(ops))?;
        Ok(())
    }

    /// Sequences `events` into the chain behind everything before them and
    /// returns once they are queued; they become durable with the next
    /// commit (or at [`close`](Self::close)).
    pub fn enqueue(&self, events: Vec<NewEvent>) -> Result<(), LedgerError> {
        let ops = events.into_iter().map(Op::Append).collect();
        // The outcome is not awaited: dropping it does not cancel the batch.
        let _pending = self.runtime.block_on(self.store.enqueue(ops))?;
        Ok(())
    }

    /// The records that `query` selects, oldest first (what `portcullis
    /// audit tail|export` read).
    pub fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>, LedgerError> {
        Ok(self.runtime.block_on(self.store.audit(query))?)
    }

    /// Commits what is queued and closes the file; later writes fail.
    pub fn close(&self) {
        self.runtime.block_on(self.store.close());
    }

    /// The `task.started` record.
    pub fn started_event(task: &Task, now: Timestamp) -> NewEvent {
        records::started_event(task, now)
    }

    /// The records of a planned call of `args` on `before` (the task as
    /// it was), in audit order, with the service's shapes
    /// ([`portcullis_store::records`]). What only the service has is not
    /// here: tokens (a rotation, the revocations of a halt), per-hop
    /// credentials, and the elevation request itself — the embedded library
    /// has no approver, so a held call is recorded as `elevation.requested`
    /// with nothing filed.
    pub fn plan_events(
        &self,
        before: &Task,
        planned: &Plan,
        args: &Value,
        now: Timestamp,
    ) -> Vec<NewEvent> {
        let after = planned.task_or(before);
        let tool = &planned.decision.tool;
        let mut events = Vec::new();
        for step in &planned.steps {
            match step {
                Step::Use => events.push(records::use_event(
                    before,
                    &planned.decision,
                    Some(bounded(redact(args, &self.redact))),
                    now,
                )),
                Step::Transition(t) => events.push(records::transition_event(after, t, now)),
                Step::Anomaly(f) => events.push(records::anomaly_event(after, tool, f, now)),
                Step::Halt(why) => events.push(records::ended_event(
                    after,
                    why,
                    Some(Reason::AnomalyHalt),
                    now,
                )),
                Step::Hold { reason, .. } => events.push(records::requested_event(
                    after,
                    tool,
                    format!("{reason} (no approver in the embedded library: not filed)"),
                    now,
                )),
                Step::Rotate | Step::Credential | Step::FirstUse => {}
            }
        }
        events
    }

    /// The `call.completed` record: `Ok` with the digest of the result's
    /// JSON text, or `Err` with what failed (never the tool's own words,
    /// which may carry secrets: the caller passes a short kind).
    pub fn outcome_event(
        task: &Task,
        tool: &str,
        outcome: Result<&str, &str>,
        latency_us: u64,
        now: Timestamp,
    ) -> NewEvent {
        let mut e = NewEvent::new(now, EventKind::CallCompleted);
        e.task_id = Some(task.id.clone());
        e.agent_id = Some(task.agent_id.clone());
        e.tool = Some(tool.to_owned());
        e.latency_us = Some(latency_us);
        match outcome {
            Ok(result_json) => {
                e.decision = Some("allow".to_owned());
                e.result_digest = Some(sha256_hex(result_json.as_bytes()));
            }
            Err(why) => {
                e.decision = Some("error".to_owned());
                e.detail = Some(why.to_owned());
            }
        }
        e
    }

    /// The `state.transition` record.
    pub fn transition_event(task: &Task, t: &Transition, now: Timestamp) -> NewEvent {
        records::transition_event(task, t, now)
    }

    /// The `task.completed` / `task.halted` record.
    pub fn ended_event(task: &Task, why: &str, now: Timestamp) -> NewEvent {
        records::ended_event(task, why, None, now)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
