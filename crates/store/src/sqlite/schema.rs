//! Versioned migrations, run by [`super::SqliteStore::open`]. The layout each
//! one produces is described in the [`super`] module doc.

use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::unavailable;
use crate::{Result, StoreError};

/// One schema change. `version`s start at 1 and increase by one.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
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
    },
];

/// The schema version this build writes and understands.
pub const LATEST_VERSION: i64 = 2;

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
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::sqlite::writer::{self, Request};
    use crate::sqlite::{SqliteOptions, SqliteStore, configure_writer};
    use crate::testsuite::{approve, decided, sample_elevation, sample_event, sample_task};
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

    /// A database written by the version-1 layout (only migration 1, data
    /// committed through the writer thread) is upgraded in place on open,
    /// keeps its data, and then holds elevations.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_1_database_is_upgraded_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");

        let mut conn = Connection::open(&path).unwrap();
        configure_writer(&conn, &SqliteOptions::default()).unwrap();
        apply_up_to(&mut conn, 1).unwrap();
        assert_eq!(current_version(&conn).unwrap(), 1);
        assert!(!tables(&conn).contains(&"elevations".to_owned()));

        let (requests, queue) = mpsc::channel(4);
        let thread = std::thread::spawn(move || writer::run(conn, queue));
        let (reply, answer) = oneshot::channel();
        let old = sample_task("old");
        requests
            .send(Request::Commit {
                ops: vec![
                    Op::InsertTask(old.clone()),
                    Op::Append(sample_event(EventKind::TaskStarted, "old")),
                ],
                reply,
            })
            .await
            .unwrap();
        assert_eq!(answer.await.unwrap().unwrap().seqs, vec![1]);
        requests.send(Request::Close).await.unwrap();
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap()
            .unwrap();

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.task("old").await.unwrap(), Some(old));
        let events = store.audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);

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
                .elevations(Some(ElevationStatus::Approved), 10)
                .await
                .unwrap(),
            vec![decided(&request, &approval)]
        );
        store.close().await;

        let conn = Connection::open(&path).unwrap();
        assert_eq!(
            migration_rows(&conn),
            vec![(1, "ledger".to_owned()), (2, "elevations".to_owned())]
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
        assert_eq!(migration_rows(&conn).len(), 2);
        assert_eq!(current_version(&conn).unwrap(), LATEST_VERSION);
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
