//! Versioned migrations, run by [`super::SqliteStore::open`]. The layout each
//! one produces is described in the [`super`] module doc.

use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::rows::to_uint;
use super::{sql_error, unavailable};
use crate::{AuditEvent, NewEvent, Result, StoreError, chain};

/// One schema change. `version`s start at 1 and increase by one.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
    /// Rewrites existing rows after `sql`, in the same transaction.
    rows: Option<fn(&Connection) -> Result<()>>,
}

// INVARIANT: never edit or reorder a released migration; add a new one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "ledger",
        sql: "
CREATE TABLE tasks (
    id          TEXT    NOT NULL PRIMARY KEY,
    agent_id    TEXT    NOT NULL,
    agent_type  TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('active', 'completed', 'halted')),
    version     INTEGER NOT NULL CHECK (version >= 0),
    deadline    INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    body        TEXT    NOT NULL
) STRICT;

CREATE TABLE tokens (
    jti            TEXT    NOT NULL PRIMARY KEY,
    task_id        TEXT    NOT NULL REFERENCES tasks (id),
    agent_id       TEXT    NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN ('access', 'hop')),
    issued_at      INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    revoked_at     INTEGER,
    revoke_reason  TEXT
) STRICT;
CREATE INDEX tokens_task ON tokens (task_id, issued_at);

CREATE TABLE refresh_tokens (
    hash             TEXT    NOT NULL PRIMARY KEY,
    task_id          TEXT    NOT NULL REFERENCES tasks (id),
    agent_id         TEXT    NOT NULL,
    issued_at        INTEGER NOT NULL,
    idle_expires_at  INTEGER NOT NULL,
    spent_at         INTEGER
) STRICT;
CREATE INDEX refresh_tokens_task ON refresh_tokens (task_id);

CREATE TABLE audit_events (
    seq      INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    ts       INTEGER NOT NULL,
    kind     TEXT    NOT NULL,
    task_id  TEXT,
    event    TEXT    NOT NULL
) STRICT;
CREATE INDEX audit_events_task ON audit_events (task_id, seq);
CREATE INDEX audit_events_kind ON audit_events (kind, seq);
",
        rows: None,
    },
    Migration {
        version: 2,
        name: "elevations",
        sql: "
CREATE TABLE elevations (
    id            TEXT    NOT NULL PRIMARY KEY,
    task_id       TEXT    NOT NULL REFERENCES tasks (id),
    agent_id      TEXT    NOT NULL,
    tool          TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('pending', 'approved', 'denied')),
    requested_at  INTEGER NOT NULL,
    decided_at    INTEGER,
    decided_by    TEXT,
    note          TEXT,
    expires_at    INTEGER,
    CHECK ((status = 'pending') = (decided_at IS NULL)),
    CHECK ((status = 'pending') = (decided_by IS NULL)),
    CHECK ((status = 'approved') = (expires_at IS NOT NULL))
) STRICT;
CREATE INDEX elevations_status ON elevations (status, requested_at);
CREATE INDEX elevations_task ON elevations (task_id);
",
        rows: None,
    },
    Migration {
        version: 3,
        name: "audit chain",
        // The defaults exist only because SQLite cannot add a NOT NULL
        // column without one; `chain_existing_events` fills both columns of
        // every existing row in the same transaction, and the writer always
        // sets them.
        sql: "
ALTER TABLE audit_events ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_events ADD COLUMN hash TEXT NOT NULL DEFAULT '';

CREATE TABLE checkpoints (
    seq   INTEGER NOT NULL PRIMARY KEY CHECK (seq >= 1),
    hash  TEXT    NOT NULL CHECK (length(hash) = 64),
    ts    INTEGER NOT NULL,
    kid   TEXT    NOT NULL,
    sig   TEXT    NOT NULL
) STRICT;
",
        rows: Some(chain_existing_events),
    },
    Migration {
        version: 4,
        name: "tool pins",
        sql: "
CREATE TABLE tool_pins (
    tool         TEXT    NOT NULL PRIMARY KEY,
    upstream     TEXT    NOT NULL,
    hash         TEXT    NOT NULL CHECK (length(hash) = 64),
    definition   TEXT    NOT NULL,
    pinned_at    INTEGER NOT NULL,
    approved_by  TEXT    NOT NULL
) STRICT;
",
        rows: None,
    },
    Migration {
        version: 5,
        name: "agent tool use",
        sql: "
CREATE TABLE agent_tools (
    agent_id    TEXT    NOT NULL,
    tool        TEXT    NOT NULL,
    first_used  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, tool)
) STRICT;
INSERT OR IGNORE INTO agent_tools (agent_id, tool, first_used)
    SELECT json_extract(event, '$.agent_id'), json_extract(event, '$.tool'), min(ts)
    FROM audit_events
    WHERE kind = 'call.allowed'
      AND json_type(event, '$.agent_id') = 'text'
      AND json_type(event, '$.tool') = 'text'
    GROUP BY 1, 2;
",
        rows: None,
    },
    Migration {
        version: 6,
        name: "task status index",
        // For `Store::task_counts` (the `portcullis_tasks` gauges): counts
        // by status without a scan of every task ever run.
        sql: "
CREATE INDEX tasks_status ON tasks (status);
",
        rows: None,
    },
    Migration {
        version: 7,
        name: "held calls",
        // The call behind a request the gateway filed for a held call
        // (`HeldCall`, JSON): what the approver sees and the approval binds
        // to. NULL for requests agents made, and for every earlier row.
        sql: "
ALTER TABLE elevations ADD COLUMN held TEXT;
",
        rows: None,
    },
];

/// The schema version this build writes and understands.
pub const LATEST_VERSION: i64 = 7;

/// Rows read per step when migration 3 chains existing events.
const CHAIN_PAGE: i64 = 1000;

/// Migration 3: gives every event written before the chain existed its
/// place in it, in `seq` order from [`chain::GENESIS`], exactly as the
/// writer would have, and rewrites its `event` JSON as the full record. An
/// event that does not decode cannot be chained: the migration (and so the
/// open) fails with [`StoreError::Corrupt`] and nothing is changed.
fn chain_existing_events(conn: &Connection) -> Result<()> {
    let mut prev_hash = chain::GENESIS.to_owned();
    let mut after = 0_i64;
    loop {
        let page: Vec<(i64, String)> = conn
            .prepare("SELECT seq, event FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .and_then(|mut stmt| {
                stmt.query_map(params![after, CHAIN_PAGE], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?
                .collect()
            })
            .map_err(|e| sql_error("migration 3: read audit events", &e))?;
        if page.is_empty() {
            return Ok(());
        }
        for (seq, json) in page {
            let event: NewEvent = serde_json::from_str(&json).map_err(|e| {
                StoreError::Corrupt(format!(
                    "migration 3: audit event {seq} does not decode, so it cannot be chained: {e}"
                ))
            })?;
            let mut record = AuditEvent {
                seq: to_uint("audit seq", seq)?,
                event,
                prev_hash,
                hash: String::new(),
            };
            let json = chain::seal(&mut record);
            conn.execute(
                "UPDATE audit_events SET event = ?2, prev_hash = ?3, hash = ?4 WHERE seq = ?1",
                params![seq, json, record.prev_hash, record.hash],
            )
            .map_err(|e| sql_error("migration 3: chain audit events", &e))?;
            prev_hash = record.hash;
            after = seq;
        }
    }
}

/// Brings the database up to [`LATEST_VERSION`], one transaction per
/// migration. Refuses a database whose version is newer than this build.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    apply_up_to(conn, LATEST_VERSION)?;
    // Also catches a future version when every known migration was applied.
    let current = current_version(conn)?;
    if current != LATEST_VERSION {
        return Err(StoreError::Unavailable(format!(
            "database schema version {current} is not the version this build supports \
             ({LATEST_VERSION}); upgrade portcullis"
        )));
    }
    Ok(())
}

/// Applies every migration up to and including `target` that the database
/// lacks. Only [`migrate`] (with [`LATEST_VERSION`]) and tests that build an
/// older database call it.
fn apply_up_to(conn: &mut Connection, target: i64) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version     INTEGER NOT NULL PRIMARY KEY,
            name        TEXT    NOT NULL,
            applied_at  INTEGER NOT NULL
        ) STRICT;",
    )
    .map_err(|e| unavailable("create schema_migrations", &e))?;

    for migration in MIGRATIONS.iter().filter(|m| m.version <= target) {
        // IMMEDIATE takes the write lock before reading the version, so two
        // processes opening the same new file cannot both apply a migration.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| unavailable("begin migration", &e))?;
        let current = current_version(&tx)?;
        if current > LATEST_VERSION {
            return Err(StoreError::Unavailable(format!(
                "database schema version {current} is newer than this build supports \
                 ({LATEST_VERSION}); upgrade portcullis"
            )));
        }
        if current >= migration.version {
            continue;
        }
        tx.execute_batch(migration.sql)
            .map_err(|e| unavailable(&format!("migration {}", migration.version), &e))?;
        if let Some(rows) = migration.rows {
            rows(&tx)?;
        }
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![migration.version, migration.name, now_millis()],
        )
        .map_err(|e| unavailable("record migration", &e))?;
        tx.commit()
            .map_err(|e| unavailable(&format!("commit migration {}", migration.version), &e))?;
    }
    Ok(())
}

/// The highest applied migration, 0 for a fresh database.
pub fn current_version(conn: &Connection) -> Result<i64> {
    conn.query_row("SELECT max(version) FROM schema_migrations", [], |row| {
        row.get::<_, Option<i64>>(0)
    })
    .optional()
    .map(|v| v.flatten().unwrap_or(0))
    .map_err(|e| unavailable("read schema version", &e))
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::{SqliteOptions, SqliteStore, configure_writer};
    use crate::testsuite::{
        approve, decided, sample_elevation, sample_event, sample_pin, sample_task,
    };
    use crate::{AuditQuery, ElevationStatus, EventKind, Op, Store};

    fn tables(conn: &Connection) -> Vec<String> {
        conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn migration_rows(conn: &Connection) -> Vec<(i64, String)> {
        conn.prepare("SELECT version, name FROM schema_migrations ORDER BY version")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    /// Writes rows the way the version-1 and version-2 writer did (events
    /// as bare `NewEvent` JSON, seqs from AUTOINCREMENT).
    fn write_old_rows(conn: &Connection, task: &crate::TaskRecord, events: &[NewEvent]) {
        let row = crate::sqlite::rows::TaskRow::encode(task).unwrap();
        conn.execute(
            "INSERT INTO tasks (id, agent_id, agent_type, state, status, version, deadline, \
             started_at, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                row.id,
                row.agent_id,
                row.agent_type,
                row.state,
                row.status,
                row.version,
                row.deadline,
                row.started_at,
                row.body
            ],
        )
        .unwrap();
        for event in events {
            conn.execute(
                "INSERT INTO audit_events (ts, kind, task_id, event) VALUES (?1, ?2, ?3, ?4)",
                params![
                    i64::try_from(event.ts.0).unwrap(),
                    event.kind.as_str(),
                    event.task_id,
                    serde_json::to_string(event).unwrap()
                ],
            )
            .unwrap();
        }
    }

    async fn all_records(store: &SqliteStore) -> Vec<crate::AuditEvent> {
        let mut all = Vec::new();
        loop {
            let page = store
                .audit(&AuditQuery {
                    since_seq: all.last().map(|e: &crate::AuditEvent| e.seq),
                    limit: Some(crate::MAX_AUDIT_LIMIT),
                    ..AuditQuery::default()
                })
                .await
                .unwrap();
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }

    /// A database written by the version-1 layout is upgraded in place on
    /// open, keeps its data, and then holds elevations and a chained log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_1_database_is_upgraded_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");

        let mut conn = Connection::open(&path).unwrap();
        configure_writer(&conn, &SqliteOptions::default()).unwrap();
        apply_up_to(&mut conn, 1).unwrap();
        assert_eq!(current_version(&conn).unwrap(), 1);
        assert!(!tables(&conn).contains(&"elevations".to_owned()));
        let old = sample_task("old");
        let started = sample_event(EventKind::TaskStarted, "old");
        write_old_rows(&conn, &old, std::slice::from_ref(&started));
        drop(conn);

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.task("old").await.unwrap(), Some(old));
        let events = store.audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(events[0].event, started);
        assert_eq!(events[0].prev_hash, chain::GENESIS);

        let request = sample_elevation("e1", "old");
        let approval = approve("e1", "alice");
        let committed = store
            .commit(vec![
                Op::InsertElevation(request.clone()),
                Op::Append(sample_event(EventKind::ElevationRequested, "old")),
            ])
            .await
            .unwrap();
        assert_eq!(committed.seqs, vec![2], "seqs continue across the upgrade");
        store.commit(vec![approval.clone()]).await.unwrap();
        assert_eq!(
            store
                .elevations(Some(ElevationStatus::Approved), None, 10)
                .await
                .unwrap(),
            vec![decided(&request, &approval)]
        );
        let records = all_records(&store).await;
        assert_eq!(records[1].prev_hash, records[0].hash);
        let report = chain::verify(records.into_iter().map(Ok), &[], &|_| false);
        assert!(report.is_ok(), "{report:?}");
        store.close().await;

        let conn = Connection::open(&path).unwrap();
        assert_eq!(
            migration_rows(&conn),
            vec![
                (1, "ledger".to_owned()),
                (2, "elevations".to_owned()),
                (3, "audit chain".to_owned()),
                (4, "tool pins".to_owned()),
                (5, "agent tool use".to_owned()),
                (6, "task status index".to_owned()),
                (7, "held calls".to_owned())
            ]
        );
        drop(conn);
        // Reopening applies nothing again.
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            store.elevation("e1").await.unwrap().map(|e| e.status),
            Some(ElevationStatus::Approved)
        );
        store.close().await;
        let conn = Connection::open(&path).unwrap();
        assert_eq!(migration_rows(&conn).len(), 7);
        assert_eq!(current_version(&conn).unwrap(), LATEST_VERSION);
    }

    /// A version-3 database (chained log, checkpoints) gains `tool_pins`
    /// on open, keeps its log and chain, and then stores pins.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_3_database_gains_tool_pins_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut conn = Connection::open(&path).unwrap();
        configure_writer(&conn, &SqliteOptions::default()).unwrap();
        apply_up_to(&mut conn, 2).unwrap();
        write_old_rows(
            &conn,
            &sample_task("old"),
            &[sample_event(EventKind::TaskStarted, "old")],
        );
        apply_up_to(&mut conn, 3).unwrap();
        assert_eq!(current_version(&conn).unwrap(), 3);
        assert!(!tables(&conn).contains(&"tool_pins".to_owned()));
        drop(conn);

        let store = SqliteStore::open(&path).unwrap();
        assert!(store.pins().await.unwrap().is_empty());
        let pin = sample_pin("warehouse.query", "first-use");
        let committed = store
            .commit(vec![
                Op::PinTool(pin.clone()),
                Op::Append(sample_event(EventKind::ConfigLoaded, "old")),
            ])
            .await
            .unwrap();
        assert_eq!(committed.seqs, vec![2], "seqs continue across the upgrade");
        assert_eq!(store.pin("warehouse.query").await.unwrap(), Some(pin));
        let records = all_records(&store).await;
        let report = chain::verify(records.into_iter().map(Ok), &[], &|_| false);
        assert!(report.is_ok(), "{report:?}");
        store.close().await;

        let conn = Connection::open(&path).unwrap();
        assert!(tables(&conn).contains(&"tool_pins".to_owned()));
        assert_eq!(
            migration_rows(&conn).last(),
            Some(&(7, "held calls".to_owned()))
        );
        assert_eq!(current_version(&conn).unwrap(), LATEST_VERSION);
    }

    /// Migration 3 chains every event written before it, in seq order, as
    /// the writer would have (across its read pages), keeps the seqs' high
    /// water mark, and the writer continues the chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migration_3_chains_existing_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut conn = Connection::open(&path).unwrap();
        configure_writer(&conn, &SqliteOptions::default()).unwrap();
        apply_up_to(&mut conn, 2).unwrap();
        let count = usize::try_from(CHAIN_PAGE).unwrap() * 2 + 7;
        let events: Vec<NewEvent> = (0..count)
            .map(|i| {
                let mut event = sample_event(EventKind::CallAllowed, "old");
                event.detail = Some(format!("call {i}"));
                event.args = Some(serde_json::json!({"i": i, "ratio": 0.1, "s": "é\u{1}"}));
                event
            })
            .collect();
        write_old_rows(&conn, &sample_task("old"), &events);
        // The newest seqs were used once and deleted: they stay used.
        conn.execute_batch(
            "INSERT INTO audit_events (ts, kind, task_id, event) VALUES (1, 'anomaly', NULL, '{}');
             DELETE FROM audit_events WHERE seq = (SELECT max(seq) FROM audit_events);",
        )
        .unwrap();
        drop(conn);

        let store = SqliteStore::open(&path).unwrap();
        let records = all_records(&store).await;
        assert_eq!(records.len(), count);
        assert_eq!(
            records.iter().map(|r| r.event.clone()).collect::<Vec<_>>(),
            events
        );
        let mut prev = chain::GENESIS.to_owned();
        for record in &records {
            assert_eq!(record.prev_hash, prev);
            assert_eq!(chain::record_hash(record), record.hash);
            prev = record.hash.clone();
        }
        let last = u64::try_from(count).unwrap();
        assert_eq!(
            store.chain_head().await.unwrap(),
            Some((last, prev.clone()))
        );
        // The stored JSON is the full record, in canonical form.
        let conn = Connection::open(&path).unwrap();
        let (json, prev_col, hash_col): (String, String, String) = conn
            .query_row(
                "SELECT event, prev_hash, hash FROM audit_events WHERE seq = 5",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            json,
            crate::canonical_json(&serde_json::to_value(&records[4]).unwrap())
        );
        assert_eq!(
            (prev_col, hash_col),
            (records[3].hash.clone(), records[4].hash.clone())
        );
        drop(conn);

        let next = store
            .commit(vec![Op::Append(sample_event(
                EventKind::TaskCompleted,
                "old",
            ))])
            .await
            .unwrap();
        // Seq `count + 1` was used (and deleted) before the migration: the
        // gap is in the log, for a verifier to see.
        assert_eq!(next.seqs, vec![last + 2]);
        let records = all_records(&store).await;
        assert_eq!(records.last().unwrap().prev_hash, prev);
        let report = chain::verify(records.into_iter().map(Ok), &[], &|_| false);
        assert_eq!(report.first_bad.map(|p| p.seq), Some(last + 1));
        store.close().await;
    }

    /// An old event that does not decode cannot be chained: the open fails
    /// as corrupt and the database is left as it was.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migration_3_refuses_an_undecodable_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut conn = Connection::open(&path).unwrap();
        configure_writer(&conn, &SqliteOptions::default()).unwrap();
        apply_up_to(&mut conn, 2).unwrap();
        write_old_rows(
            &conn,
            &sample_task("old"),
            &[sample_event(EventKind::TaskStarted, "old")],
        );
        conn.execute_batch(
            "INSERT INTO audit_events (ts, kind, task_id, event) VALUES (1, 'anomaly', NULL, '[]')",
        )
        .unwrap();
        drop(conn);
        match SqliteStore::open(&path) {
            Err(StoreError::Corrupt(message)) => assert!(message.contains("event 2"), "{message}"),
            other => panic!("expected a corrupt event: {other:?}"),
        }
        let conn = Connection::open(&path).unwrap();
        assert_eq!(current_version(&conn).unwrap(), 2);
        assert!(!tables(&conn).contains(&"checkpoints".to_owned()));
    }

    /// Applying up to a version stops there, and a later `migrate` finishes
    /// the job without touching what is already applied.
    #[test]
    fn migrations_apply_in_order_and_stop_at_the_target() {
        let mut conn = Connection::open_in_memory().unwrap();
        apply_up_to(&mut conn, 1).unwrap();
        assert_eq!(migration_rows(&conn).len(), 1);
        apply_up_to(&mut conn, 1).unwrap();
        assert_eq!(migration_rows(&conn).len(), 1);
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(
            migration_rows(&conn)
                .iter()
                .map(|(v, _)| *v)
                .collect::<Vec<_>>(),
            (1..=LATEST_VERSION).collect::<Vec<_>>()
        );
    }
}
