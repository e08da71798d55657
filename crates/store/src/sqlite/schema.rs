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
const MIGRATIONS: &[Migration] = &[Migration {
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
}];

/// The schema version this build writes and understands.
pub const LATEST_VERSION: i64 = 1;

/// Brings the database up to [`LATEST_VERSION`], one transaction per
/// migration. Refuses a database whose version is newer than this build.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version     INTEGER NOT NULL PRIMARY KEY,
            name        TEXT    NOT NULL,
            applied_at  INTEGER NOT NULL
        ) STRICT;",
    )
    .map_err(|e| unavailable("create schema_migrations", &e))?;

    for migration in MIGRATIONS {
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
