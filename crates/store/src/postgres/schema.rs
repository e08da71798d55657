//! Versioned migrations, run by [`super::PostgresStore::connect`]. The
//! layout they produce is described in the [`super`] module doc.

use std::time::{SystemTime, UNIX_EPOCH};

use super::pool::Conn;
use super::unavailable;
use crate::{Result, StoreError};

/// One schema change. `version`s start at 1 and increase by one.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// The schema version this build writes and understands.
pub const LATEST_VERSION: i64 = 4;

/// First half of the key of the advisory lock taken while migrating
/// (`'pcul'` as an integer); the second half is a hash of the schema, so
/// ledgers in different schemas of one database migrate independently.
const MIGRATION_LOCK: i32 = 0x7063_756c;

// Text columns compared or ordered on are `COLLATE "C"`: byte order, as
// Rust orders strings, whatever the database's default collation.
//
// INVARIANT: never edit or reorder a released migration; add a new one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "ledger",
        sql: r#"
CREATE TABLE tasks (
    id          TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    agent_id    TEXT   NOT NULL,
    agent_type  TEXT   NOT NULL,
    state       TEXT   NOT NULL,
    status      TEXT   NOT NULL CHECK (status IN ('active', 'completed', 'halted')),
    version     BIGINT NOT NULL CHECK (version >= 0),
    deadline    BIGINT NOT NULL,
    started_at  BIGINT NOT NULL,
    body        TEXT   NOT NULL
);

CREATE TABLE tokens (
    jti            TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    task_id        TEXT   COLLATE "C" NOT NULL REFERENCES tasks (id),
    agent_id       TEXT   NOT NULL,
    kind           TEXT   NOT NULL CHECK (kind IN ('access', 'hop')),
    issued_at      BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    revoked_at     BIGINT,
    revoke_reason  TEXT
);
CREATE INDEX tokens_task ON tokens (task_id, issued_at, jti);

CREATE TABLE refresh_tokens (
    hash             TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    task_id          TEXT   COLLATE "C" NOT NULL REFERENCES tasks (id),
    agent_id         TEXT   NOT NULL,
    issued_at        BIGINT NOT NULL,
    idle_expires_at  BIGINT NOT NULL,
    spent_at         BIGINT
);
CREATE INDEX refresh_tokens_task ON refresh_tokens (task_id);

CREATE TABLE audit_events (
    seq        BIGINT NOT NULL PRIMARY KEY CHECK (seq >= 1),
    ts         BIGINT NOT NULL,
    kind       TEXT   COLLATE "C" NOT NULL,
    task_id    TEXT   COLLATE "C",
    event      TEXT   NOT NULL,
    prev_hash  TEXT   NOT NULL CHECK (length(prev_hash) = 64),
    hash       TEXT   NOT NULL CHECK (length(hash) = 64)
);
CREATE INDEX audit_events_task ON audit_events (task_id, seq);
CREATE INDEX audit_events_kind ON audit_events (kind, seq);

CREATE TABLE chain_head (
    id   BOOLEAN NOT NULL PRIMARY KEY DEFAULT TRUE CHECK (id),
    seq  BIGINT  NOT NULL CHECK (seq >= 0)
);
INSERT INTO chain_head (id, seq) VALUES (TRUE, 0);

CREATE TABLE checkpoints (
    seq   BIGINT NOT NULL PRIMARY KEY CHECK (seq >= 1),
    hash  TEXT   NOT NULL CHECK (length(hash) = 64),
    ts    BIGINT NOT NULL,
    kid   TEXT   NOT NULL,
    sig   TEXT   NOT NULL
);

CREATE TABLE elevations (
    id            TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    task_id       TEXT   COLLATE "C" NOT NULL REFERENCES tasks (id),
    agent_id      TEXT   NOT NULL,
    tool          TEXT   NOT NULL,
    reason        TEXT   NOT NULL,
    status        TEXT   NOT NULL CHECK (status IN ('pending', 'approved', 'denied')),
    requested_at  BIGINT NOT NULL,
    decided_at    BIGINT,
    decided_by    TEXT,
    note          TEXT,
    expires_at    BIGINT,
    CHECK ((status = 'pending') = (decided_at IS NULL)),
    CHECK ((status = 'pending') = (decided_by IS NULL)),
    CHECK ((status = 'approved') = (expires_at IS NOT NULL))
);
CREATE INDEX elevations_status ON elevations (status, requested_at, id);
CREATE INDEX elevations_requested ON elevations (requested_at, id);
CREATE INDEX elevations_task ON elevations (task_id);

CREATE TABLE tool_pins (
    tool         TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    upstream     TEXT   NOT NULL,
    hash         TEXT   NOT NULL CHECK (length(hash) = 64),
    definition   TEXT   NOT NULL,
    pinned_at    BIGINT NOT NULL,
    approved_by  TEXT   NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        name: "agent tool use",
        sql: r#"
CREATE TABLE agent_tools (
    agent_id    TEXT   COLLATE "C" NOT NULL,
    tool        TEXT   COLLATE "C" NOT NULL,
    first_used  BIGINT NOT NULL,
    PRIMARY KEY (agent_id, tool)
);
INSERT INTO agent_tools (agent_id, tool, first_used)
    SELECT event::jsonb ->> 'agent_id', event::jsonb ->> 'tool', min(ts)
    FROM audit_events
    WHERE kind = 'call.allowed'
      AND jsonb_typeof(event::jsonb -> 'agent_id') = 'string'
      AND jsonb_typeof(event::jsonb -> 'tool') = 'string'
    GROUP BY 1, 2
    ON CONFLICT DO NOTHING;
"#,
    },
    Migration {
        version: 3,
        name: "task status index",
        // For `Store::task_counts` (the `portcullis_tasks` gauges): counts
        // by status without a scan of every task ever run.
        sql: r#"
CREATE INDEX tasks_status ON tasks (status);
"#,
    },
    Migration {
        version: 4,
        name: "held calls",
        // The call behind a request the gateway filed for a held call
        // (`HeldCall`, JSON): what the approver sees and the approval binds
        // to. NULL for requests agents made, and for every earlier row.
        sql: r#"
ALTER TABLE elevations ADD COLUMN held TEXT;
"#,
    },
];

/// Brings the schema up to [`LATEST_VERSION`] in one transaction, under a
/// transaction-scoped advisory lock: of replicas starting together, one
/// migrates and the others wait for it, then find nothing left to do.
/// Refuses a schema whose version is newer than this build.
pub(super) async fn migrate(conn: &mut Conn) -> Result<()> {
    let client = &conn.client;
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| unavailable("begin migration", &e))?;
    let result = migrate_in_transaction(conn).await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = conn.client.batch_execute(end).await;
    result?;
    ended.map_err(|e| unavailable("commit migration", &e))
}

async fn migrate_in_transaction(conn: &mut Conn) -> Result<()> {
    let client = &conn.client;
    client
        .execute(
            "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))",
            &[&MIGRATION_LOCK],
        )
        .await
        .map_err(|e| unavailable("take the migration lock", &e))?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version     BIGINT NOT NULL PRIMARY KEY,
                name        TEXT   NOT NULL,
                applied_at  BIGINT NOT NULL
            )",
        )
        .await
        .map_err(|e| unavailable("create schema_migrations", &e))?;
    let current = current_version(conn).await?;
    if current > LATEST_VERSION {
        return Err(StoreError::Unavailable(format!(
            "database schema version {current} is newer than this build supports \
             ({LATEST_VERSION}); upgrade portcullis"
        )));
    }
    let client = &conn.client;
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        client
            .batch_execute(migration.sql)
            .await
            .map_err(|e| unavailable(&format!("migration {}", migration.version), &e))?;
        client
            .execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[&migration.version, &migration.name, &now_millis()],
            )
            .await
            .map_err(|e| unavailable("record migration", &e))?;
    }
    let current = current_version(conn).await?;
    if current != LATEST_VERSION {
        return Err(StoreError::Unavailable(format!(
            "database schema version {current} is not the version this build supports \
             ({LATEST_VERSION}); upgrade portcullis"
        )));
    }
    // The chain head row is the append lock: it must be there.
    let heads: i64 = conn
        .client
        .query_one("SELECT count(*) FROM chain_head", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| unavailable("read chain_head", &e))?;
    if heads != 1 {
        return Err(StoreError::Corrupt(format!(
            "chain_head holds {heads} rows, not 1"
        )));
    }
    Ok(())
}

/// The highest applied migration, 0 for a fresh schema.
pub(super) async fn current_version(conn: &Conn) -> Result<i64> {
    conn.client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .and_then(|row| row.try_get::<_, Option<i64>>(0))
        .map(|v| v.unwrap_or(0))
        .map_err(|e| unavailable("read schema version", &e))
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
