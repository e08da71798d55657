//! The PostgreSQL backend: one database shared by every gateway replica of
//! a cluster (DESIGN section 8). `docs/postgres.md` is the operator's guide;
//! this is the reference.
//!
//! [`PostgresStore::connect`] parses a libpq-style URL
//! (`postgres://user:password@host:5432/db`, or the key=value form),
//! applies [`PostgresOptions`], migrates the schema and returns a store with
//! a small pool of connections. It passes the backend-independent
//! [`testsuite`](crate::testsuite) unchanged (`tests/postgres.rs`).
//!
//! # Schema (version 4)
//!
//! The tables, columns and meanings are those of the SQLite backend (see
//! the [`sqlite`](crate::sqlite) module doc, which documents each column),
//! with PostgreSQL types: times and integers are `BIGINT` (unix
//! milliseconds; a `u64` above `i64::MAX` is refused as
//! [`StoreError::Corrupt`], never wrapped), strings `TEXT`. Text keys and
//! the columns reads order by are `COLLATE "C"`, so ordering is byte order,
//! as in Rust and SQLite, whatever the database's default collation. The
//! database must be UTF-8 (checked on every new connection).
//!
//! | table | holds |
//! |---|---|
//! | `schema_migrations` | `version` BIGINT PK, `name`, `applied_at` (ms): one row per applied migration |
//! | `tasks` | `id` PK, `agent_id`, `agent_type`, `state`, `status`, `version` (the CAS version), `deadline`, `started_at`, `body` (JSON of the other [`Task`](portcullis_core::Task) fields); indexed on `status` (migration 3, for [`Store::task_counts`]) |
//! | `tokens` | `jti` PK, `task_id` (FK `tasks`), `agent_id`, `kind`, `issued_at`, `expires_at`, `revoked_at`, `revoke_reason`; indexed on `(task_id, issued_at, jti)` |
//! | `refresh_tokens` | `hash` PK (SHA-256 hex; never the token), `task_id` (FK), `agent_id`, `issued_at`, `idle_expires_at`, `spent_at`; indexed on `task_id` |
//! | `audit_events` | `seq` BIGINT PK, copies of `ts`, `kind`, `task_id`, `prev_hash`, `hash` for indexes and lookups, and `event`: the whole record as JSON text, exactly as [`AuditEvent`] serializes (the authoritative record; read back with the row's `seq`); indexed on `(task_id, seq)` and `(kind, seq)` |
//! | `chain_head` | one row: `seq`, the highest seq ever given (the append lock, see below) |
//! | `checkpoints` | `seq` PK, `hash`, `ts`, `kid`, `sig` |
//! | `elevations` | `id` PK, `task_id` (FK), `agent_id`, `tool`, `reason`, `status`, `requested_at`, `decided_at`, `decided_by`, `note`, `expires_at`, `held` (JSON of the held call, or NULL), with the same CHECKs tying `status` to the decision columns; indexed on `(status, requested_at, id)`, `(requested_at, id)`, `task_id` |
//! | `tool_pins` | `tool` PK, `upstream`, `hash`, `definition` (JSON text), `pinned_at`, `approved_by` |
//!
//! `event` and `definition` are `TEXT`, not `jsonb`: `jsonb` would reorder
//! keys and refuse `\u0000`, and the chain needs the record byte for byte.
//!
//! # Migrations
//!
//! [`PostgresStore::connect`] creates `schema_migrations` if needed and
//! applies every missing migration in **one** transaction that first takes
//! a transaction-scoped advisory lock (`pg_advisory_xact_lock`, keyed on the
//! schema): of replicas starting together one migrates, the others wait for
//! its commit and find nothing to do. A schema whose version is newer than
//! this build ([`SCHEMA_VERSION`]) is refused ([`StoreError::Unavailable`]):
//! an old binary never writes a newer layout. [`Store::ping`] also fails
//! once the schema is no longer this build's version.
//!
//! # Commits: a writer task with group commit
//!
//! Each store runs one writer task with a connection of its own.
//! [`Store::commit`] sends its batch over a bounded channel
//! ([`QUEUE_DEPTH`] batches) and waits for the reply ([`Store::queue_depth`]
//! counts the batches sent, or waiting for room, and not yet taken by the
//! task). The task takes one
//! batch, plus whatever else is queued up to [`PostgresOptions::max_group`],
//! and applies them all in **one** transaction, each batch inside its own
//! savepoint:
//!
//! ```text
//! BEGIN ISOLATION LEVEL READ COMMITTED
//!   SELECT seq FROM chain_head WHERE id FOR UPDATE      -- the chain lock, always first
//!   SAVEPOINT batch
//!   <ops of batch 1>  RELEASE SAVEPOINT batch; SAVEPOINT batch
//!   <ops of batch 2 fail>  ROLLBACK TO SAVEPOINT batch   -> batch 2 gets its error now
//!   <ops of batch 3>  RELEASE SAVEPOINT batch; SAVEPOINT batch
//!   UPDATE chain_head …; SELECT pg_notify(…)            -- if anything was appended / revoked
//! COMMIT                                                 -> batches 1 and 3 get Ok
//! ```
//!
//! So each batch is atomic (all of its ops or none), a failing batch rolls
//! back alone with the first failing op's error, and the batches of a group
//! share one WAL flush: with many callers, throughput is many batches per
//! fsync instead of one. Replies are sent only after COMMIT returns. If the
//! transaction itself fails (connection lost, COMMIT error), every batch of
//! the group that was not already refused gets
//! [`StoreError::Unavailable`] and nothing of the group is kept. With
//! `max_group = 1` every batch is its own transaction.
//!
//! The ops have exactly the SQLite writer's semantics and errors, and every
//! check-then-act is also race-free against other replicas under READ
//! COMMITTED (even though, holding the chain lock, groups of different
//! replicas do not overlap):
//!
//! * [`Op::UpdateTask`] is `UPDATE … WHERE id = $1 AND version = $expected`:
//!   of two updates from one version, in one group or two replicas, exactly
//!   one wins and the other gets [`StoreError::Conflict`];
//! * [`Op::DecideElevation`] is `UPDATE … WHERE id = $1 AND status =
//!   'pending'` (decided exactly once, cluster-wide);
//! * [`Op::SpendRefresh`] reads the row `FOR UPDATE` (spent once);
//! * [`Op::RevokeToken`] and [`Op::RevokeTaskTokens`] update only unrevoked
//!   rows, so [`Committed::revoked`] lists each jti once, cluster-wide;
//! * duplicate keys and unknown tasks are constraint violations (SQLSTATE
//!   class 23), mapped to [`StoreError::Conflict`].
//!
//! A batch that PostgreSQL aborts to break a deadlock (`40P01`, possible
//! only with sessions outside Portcullis, since all Portcullis writers take
//! the chain lock first) or for a serialization failure (`40001`) is rolled
//! back to its savepoint and applied again, up to [`MAX_ATTEMPTS`] times in
//! all.
//!
//! A caller that stops waiting (its future dropped, or the operation
//! timeout passed) does not withdraw its batch: it may still commit, as
//! [`Store::commit`] documents. A group that takes longer than
//! [`PostgresOptions::operation_timeout`] is abandoned: its connection is
//! closed, the server rolls the transaction back (releasing the chain
//! lock), its callers get [`StoreError::Unavailable`], and the task
//! reconnects for the next group. When the task is gone (closed, or its
//! runtime shut down) every commit is [`StoreError::Unavailable`].
//!
//! # The hash chain across replicas
//!
//! The log must stay one total order, gap-free, whatever replica appends.
//! Every group first takes the row lock of the one-row `chain_head` table,
//! held to COMMIT or ROLLBACK, so the groups of the whole cluster are
//! serialized, in commit order. Holding it, the group reads the newest
//! record (`seq`, `hash`) in a second statement (under READ COMMITTED a
//! statement started after the lock was granted sees the previous holder's
//! records), gives each appended record the next seq — above both the
//! newest record's and `chain_head.seq` (the high-water mark, like SQLite's
//! `AUTOINCREMENT`: seqs are never reused even if the newest rows were
//! deleted behind the store's back, which then shows as a gap) — and its
//! `prev_hash`/`hash` exactly as the SQLite writer does
//! ([`chain::record_hash`](crate::chain::record_hash) over the same
//! record, stored as the same JSON), and finally moves `chain_head.seq`. A
//! batch rolled back to its savepoint takes its records with it and the
//! writer restores its view of the chain: no seq consumed, no link. A
//! failed group takes everything with it, `chain_head` included. The log
//! verifies with [`chain::verify`](crate::chain::verify) exactly like
//! SQLite's.
//!
//! The cost: groups of the whole cluster commit one at a time, each waiting
//! for its WAL flush. A single caller commits at about one batch per
//! flush; concurrent callers share flushes (see `docs/postgres.md` for
//! measured rates).
//!
//! # Revocations: LISTEN/NOTIFY
//!
//! A committed batch that revoked tokens ([`Committed::revoked`]) runs
//! `pg_notify('portcullis_revoked', jti)` for each, inside its transaction:
//! PostgreSQL delivers notifications at COMMIT, never for a rolled-back
//! batch. (A jti longer than a notification holds, 7999 bytes, is announced
//! as an empty payload, read as [`Revocation::Resync`].) The channel is
//! [`PostgresOptions::notify_channel`]. Notifications are database-wide,
//! not per schema: ledgers in several schemas of one database should use
//! distinct channels (an extra notification only costs a cache miss).
//!
//! [`PostgresStore::listen_revocations`] opens a dedicated connection,
//! `LISTEN`s, and returns a receiver of [`Revocation`]s; a task forwards
//! every notification (from any replica, this one included) within
//! milliseconds of the COMMIT. It checks the connection every
//! [`PostgresOptions::listen_heartbeat`] with a round trip; when the
//! connection is lost it reconnects with exponential backoff (100 ms to
//! 5 s) and then sends [`Revocation::Resync`], because what was committed
//! while it was not listening is unknown. If the receiver falls
//! [`REVOCATION_QUEUE`] behind, notifications are dropped and a
//! [`Revocation::Resync`] follows. The task ends when the receiver is
//! dropped or the store closed. Wiring this into the gateway's token cache
//! (DESIGN section 8: "LISTEN/NOTIFY plus a bounded local cache") is done
//! separately, in the gateway.
//!
//! # Bounds and failures
//!
//! * At most [`PostgresOptions::pool_size`] connections for reads (a
//!   caller waits at most [`PostgresOptions::acquire_timeout`] for one),
//!   plus the writer task's and one per revocation listener; at most
//!   [`QUEUE_DEPTH`] batches queued for the writer (a caller waits at most
//!   the operation timeout for room).
//! * Every session runs with `statement_timeout`
//!   ([`PostgresOptions::statement_timeout`]) and
//!   `idle_in_transaction_session_timeout`
//!   ([`PostgresOptions::idle_in_transaction_timeout`]: a stuck client
//!   cannot hold the chain lock for long), set as startup options, and a
//!   `synchronous_commit` of `off` is turned back `on` (an acknowledged
//!   batch must survive a server crash).
//! * Every operation as a whole is bounded by
//!   [`PostgresOptions::operation_timeout`]; a connection abandoned
//!   mid-operation is closed, never reused.
//! * Reads are capped like SQLite's ([`MAX_ROWS`](crate::MAX_ROWS),
//!   [`MAX_AUDIT_LIMIT`](crate::MAX_AUDIT_LIMIT)); [`Store::pins`] is not
//!   capped, by contract.
//! * Connection, I/O, timeout and server errors are
//!   [`StoreError::Unavailable`] (fail closed); constraint violations
//!   [`StoreError::Conflict`]; a value PostgreSQL cannot hold (SQLSTATE
//!   class 22, e.g. a NUL character in a string) or a stored value that
//!   does not decode [`StoreError::Corrupt`]. A lookup of a key containing
//!   NUL finds nothing.
//! * No message ever contains the URL or the password (`tokio_postgres`'
//!   own `Config` debug output redacts it, and this module prints neither).
//! * TLS: the URL's `sslmode` and `sslrootcert` have libpq's meanings
//!   ([`configure`], [`portcullis_tls::postgres`]); every connection of the
//!   store (pool, writer, revocation listener) is made through the same
//!   rustls connector.
//!
//! # Reads and the pool
//!
//! Reads run on a pool of connections, one statement each (its own
//! implicit transaction, so it sees every batch committed before it
//! started, by any replica). The pool is this module's own (a semaphore and
//! a list of idle connections, each with its prepared statements) rather
//! than `deadpool-postgres`: it is a few dozen lines, adds no dependency,
//! and closes a connection abandoned mid-operation instead of recycling
//! it.

mod listen;
mod pool;
mod read;
mod schema;
mod writer;

use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use self::listen::{REVOCATION_QUEUE, Revocation};
use self::pool::{Checks, Pool};
pub use self::schema::LATEST_VERSION as SCHEMA_VERSION;
use self::writer::Request;
use crate::queue::QueueGauge;
use crate::{
    AuditEvent, AuditQuery, Checkpoint, Committed, ElevationCursor, ElevationRecord,
    ElevationStatus, Op, RefreshRecord, Result, Store, StoreError, TaskCounts, TaskRecord,
    TokenRecord, ToolPin,
};

/// The default revocation channel ([`PostgresOptions::notify_channel`]).
pub const REVOCATION_CHANNEL: &str = "portcullis_revoked";

/// Attempts per batch when PostgreSQL aborts it for a deadlock or a
/// serialization failure.
pub const MAX_ATTEMPTS: usize = 3;

/// Batches that may wait for the writer task before callers are held back.
pub const QUEUE_DEPTH: usize = 4096;

/// Longest schema or channel name PostgreSQL keeps (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER: usize = 63;

/// How to connect a [`PostgresStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The schema holding the ledger's tables, set as the sessions'
    /// `search_path`; it must exist. A lowercase identifier (`[a-z_][a-z0-9_]*`,
    /// at most 63 bytes). `None` (default): the server's `search_path`
    /// (usually `public`).
    pub schema: Option<String>,
    /// Most connections open at once for reads (at least 1); the writer
    /// task and each revocation listener have one more of their own.
    /// Default 8.
    pub pool_size: usize,
    /// Most batches the writer task applies in one transaction (group
    /// commit; at least 1, and 1 means one transaction per batch). Default
    /// 256.
    pub max_group: usize,
    /// How long a caller waits for a free connection. Default 5 s.
    pub acquire_timeout: Duration,
    /// How long establishing a connection may take. Default 5 s.
    pub connect_timeout: Duration,
    /// The sessions' `statement_timeout` (rounded to milliseconds, at least
    /// 1). Default 5 s.
    pub statement_timeout: Duration,
    /// The sessions' `idle_in_transaction_session_timeout`: a session idle
    /// inside a transaction this long is ended by the server, releasing its
    /// locks (the chain lock included). Default 10 s.
    pub idle_in_transaction_timeout: Duration,
    /// Bound on one whole [`Store`] call (a commit with all its statements,
    /// or a read), on top of the server-side timeouts. Default 30 s.
    pub operation_timeout: Duration,
    /// The `LISTEN`/`NOTIFY` channel of revocations, a lowercase identifier.
    /// Default [`REVOCATION_CHANNEL`].
    pub notify_channel: String,
    /// How often the revocation listener checks its connection (and how
    /// long the check may take). Default 5 s.
    pub listen_heartbeat: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: None,
            pool_size: 8,
            max_group: 256,
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
            notify_channel: REVOCATION_CHANNEL.to_owned(),
            listen_heartbeat: Duration::from_secs(5),
        }
    }
}

/// The PostgreSQL ledger. See the module doc for its layout, the chain's
/// serialization across replicas, and revocation propagation.
pub struct PostgresStore {
    pool: Pool,
    writer: mpsc::Sender<Request>,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    listen: listen::Settings,
    operation_timeout: Duration,
    closed: watch::Sender<bool>,
    queue: QueueGauge,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the connection settings: they hold the password.
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool)
            .field("channel", &self.listen.channel)
            .field("operation_timeout", &self.operation_timeout)
            .finish_non_exhaustive()
    }
}

/// The TLS side of every connection to one database: `sslmode` and
/// `sslrootcert` of its URL, with libpq's meanings
/// ([`portcullis_tls::postgres`]).
#[derive(Clone)]
pub struct TlsConnector(MakeRustlsConnect);

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsConnector")
    }
}

impl TlsConnector {
    /// What `tokio_postgres::Config::connect` takes.
    pub fn make(&self) -> MakeRustlsConnect {
        self.0.clone()
    }
}

/// Parses a PostgreSQL URL: tokio-postgres' `Config` (its `sslmode` set
/// from the URL's, `verify-*` as `require`) and the TLS connector that
/// verifies as the URL asks. Errors never contain the URL.
pub fn configure(url: &str) -> Result<(Config, TlsConnector)> {
    let invalid = |why: String| StoreError::Unavailable(format!("invalid PostgreSQL URL: {why}"));
    let (url, tls) =
        portcullis_tls::postgres::PgTls::from_url(url).map_err(|e| invalid(e.to_string()))?;
    let mut config: Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| invalid(describe(&e)))?;
    use portcullis_tls::postgres::SslMode as Mode;
    // A `key=value` string keeps the `sslmode` tokio-postgres read from it
    // (`PgTls` only takes it out of the URL form).
    let url_form = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if url_form {
        config.ssl_mode(match tls.mode {
            Mode::Disable => tokio_postgres::config::SslMode::Disable,
            Mode::Prefer => tokio_postgres::config::SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
    }
    let client = match tls.client_config() {
        Ok(Some(c)) => c,
        Ok(None) => portcullis_tls::trusting_nothing()
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL TLS: {e}")))?,
        Err(e) => return Err(StoreError::Unavailable(format!("PostgreSQL TLS: {e}"))),
    };
    Ok((
        config,
        TlsConnector(MakeRustlsConnect::new((*client).clone())),
    ))
}

impl PostgresStore {
    /// Connects to the database at `url`, brings its schema up to
    /// [`SCHEMA_VERSION`] (refusing a newer one) and returns the store.
    ///
    /// Fails with [`StoreError::Unavailable`] when the URL does not parse,
    /// an option is invalid, the server cannot be reached or refuses the
    /// login, the database is not UTF-8, the schema does not exist, or the
    /// schema is newer than this build. The error never contains the
    /// password.
    pub async fn connect(url: &str, options: &PostgresOptions) -> Result<Self> {
        let (mut config, tls) = configure(url)?;
        check_options(options)?;
        config.connect_timeout(options.connect_timeout);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let mut session = config.get_options().unwrap_or_default().to_owned();
        session.push_str(&format!(
            " -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            millis(options.statement_timeout),
            millis(options.idle_in_transaction_timeout)
        ));
        if let Some(schema) = &options.schema {
            session.push_str(&format!(" -c search_path={schema}"));
        }
        config.options(session.trim_start());
        let mut listen_config = config.clone();
        if config.get_application_name().is_none() {
            config.application_name("portcullis");
            listen_config.application_name("portcullis-revocations");
        }

        let checks = Checks {
            schema: options.schema.clone(),
        };
        let pool = Pool::new(
            config.clone(),
            tls.clone(),
            checks.clone(),
            options.pool_size,
            options.acquire_timeout,
        );
        {
            let mut pooled = pool.get().await?;
            let migrated =
                bounded(options.operation_timeout, schema::migrate(pooled.conn()?)).await;
            if migrated.is_some() {
                pooled.done();
            }
            migrated.unwrap_or_else(|| Err(timed_out("migrate", options.operation_timeout)))?;
        }

        let (writer, requests) = mpsc::channel(QUEUE_DEPTH);
        let writer_task = tokio::spawn(writer::run(
            writer::Settings {
                config,
                tls: tls.clone(),
                checks,
                channel: options.notify_channel.clone(),
                max_group: options.max_group,
                group_timeout: options.operation_timeout,
            },
            requests,
        ));
        Ok(Self {
            pool,
            writer,
            writer_task: Mutex::new(Some(writer_task)),
            listen: listen::Settings {
                config: listen_config,
                tls,
                channel: options.notify_channel.clone(),
                heartbeat: options.listen_heartbeat,
                connect_timeout: options.connect_timeout,
            },
            operation_timeout: options.operation_timeout,
            closed: watch::Sender::new(false),
            queue: QueueGauge::default(),
        })
    }

    /// Subscribes to revocations committed by any replica sharing the
    /// database (this one included): every jti revoked by a batch committed
    /// after this returns arrives as [`Revocation::Token`], within
    /// milliseconds, or is covered by a later [`Revocation::Resync`] (after
    /// a lost connection, or when the receiver fell behind). Each call opens
    /// its own `LISTEN` connection, kept (and re-established with backoff)
    /// until the receiver is dropped or the store closed.
    ///
    /// Fails with [`StoreError::Unavailable`] when the first `LISTEN`
    /// cannot be set up.
    pub async fn listen_revocations(&self) -> Result<mpsc::Receiver<Revocation>> {
        let started = tokio::time::timeout(
            self.operation_timeout,
            listen::start(self.listen.clone(), self.closed.subscribe()),
        )
        .await;
        started.unwrap_or_else(|_| Err(timed_out("listen for revocations", self.operation_timeout)))
    }

    /// Stops the store: batches already queued are committed, later calls
    /// fail with [`StoreError::Unavailable`], idle connections are closed,
    /// revocation listeners stop (their receivers then yield `None`), and
    /// this returns once the writer task has ended (or the operation
    /// timeout passed). Dropping the store without `close` does the same in
    /// the background.
    pub async fn close(&self) {
        self.closed.send_replace(true);
        self.pool.close();
        // If the writer is already gone there is nothing to stop.
        let _ = self.writer.send(Request::Close).await;
        let task = self.writer_task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = tokio::time::timeout(self.operation_timeout, task).await;
        }
    }

    /// Runs a read on a pooled connection, bounded (getting the connection
    /// included) by the operation timeout.
    async fn read<T, F>(&self, context: &str, query: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut pool::Conn) -> Result<T>,
    {
        let run = async {
            let mut pooled = self.pool.get().await?;
            let result = query(pooled.conn()?).await;
            pooled.done();
            result
        };
        // Abandoned mid-query, the pooled connection is closed on drop.
        bounded(self.operation_timeout, run)
            .await
            .unwrap_or_else(|| Err(timed_out(context, self.operation_timeout)))
    }
}

/// `future`, or `None` if it did not finish within `limit`.
async fn bounded<T>(limit: Duration, future: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, future).await.ok()
}

fn timed_out(context: &str, limit: Duration) -> StoreError {
    StoreError::Unavailable(format!(
        "{context}: no answer from PostgreSQL within {limit:?}"
    ))
}

fn millis(duration: Duration) -> u128 {
    duration.as_millis().max(1)
}

/// A lowercase SQL identifier that needs no quoting.
fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b == b'_' || b.is_ascii_lowercase());
    first_ok
        && name.len() <= MAX_IDENTIFIER
        && bytes.all(|b| b == b'_' || b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn check_options(options: &PostgresOptions) -> Result<()> {
    let refuse = |why: String| {
        Err(StoreError::Unavailable(format!(
            "PostgreSQL options: {why}"
        )))
    };
    if let Some(schema) = &options.schema
        && !is_identifier(schema)
    {
        return refuse(format!(
            "schema {schema:?} is not a lowercase identifier ([a-z_][a-z0-9_]*, at most \
             {MAX_IDENTIFIER} bytes)"
        ));
    }
    if !is_identifier(&options.notify_channel) {
        return refuse(format!(
            "notify channel {:?} is not a lowercase identifier",
            options.notify_channel
        ));
    }
    let durations = [
        ("acquire_timeout", options.acquire_timeout),
        ("connect_timeout", options.connect_timeout),
        ("statement_timeout", options.statement_timeout),
        (
            "idle_in_transaction_timeout",
            options.idle_in_transaction_timeout,
        ),
        ("operation_timeout", options.operation_timeout),
        ("listen_heartbeat", options.listen_heartbeat),
    ];
    for (name, duration) in durations {
        if duration.is_zero() {
            return refuse(format!("{name} must be positive"));
        }
    }
    Ok(())
}

/// A `tokio_postgres` error in words: the server's message (with its
/// detail and SQLSTATE) or the client-side error and its causes.
pub(super) fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{db} (SQLSTATE {})", db.code().code());
    }
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Maps a `tokio_postgres` error to the store's error kinds.
pub(super) fn store_error(context: &str, error: &tokio_postgres::Error) -> StoreError {
    let message = format!("{context}: {}", describe(error));
    match error.code().map(|code| code.code()) {
        // integrity_constraint_violation: unique, foreign key, check, not null.
        Some(code) if code.starts_with("23") => StoreError::Conflict(message),
        // data_exception: a value PostgreSQL cannot hold.
        Some(code) if code.starts_with("22") => StoreError::Corrupt(message),
        _ => StoreError::Unavailable(message),
    }
}

/// An error that always means "cannot answer" (connection, schema setup).
pub(super) fn unavailable(context: &str, error: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("{context}: {}", describe(error)))
}

/// A stored value that does not decode.
pub(super) fn corrupt(context: &str, error: &tokio_postgres::Error) -> StoreError {
    StoreError::Corrupt(format!("{context}: {}", describe(error)))
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn commit(&self, ops: Vec<Op>) -> Result<Committed> {
        let (reply, answer) = oneshot::channel();
        let limit = self.operation_timeout;
        let queued = self.queue.ticket();
        let request = Request::Commit { ops, reply, queued };
        let sent = tokio::time::timeout(limit, self.writer.send(request))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!("store writer queue still full after {limit:?}"))
            })?;
        sent.map_err(|_| StoreError::Unavailable("store writer is gone".into()))?;
        // Past the limit the batch's outcome is unknown: it may still commit.
        tokio::time::timeout(limit, answer)
            .await
            .map_err(|_| timed_out("commit", limit))?
            .map_err(|_| StoreError::Unavailable("store writer stopped before answering".into()))?
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRecord>> {
        self.read("read task", async |conn| read::task(conn, id).await)
            .await
    }

    async fn token(&self, jti: &str) -> Result<Option<TokenRecord>> {
        self.read("read token", async |conn| read::token(conn, jti).await)
            .await
    }

    async fn refresh(&self, hash: &str) -> Result<Option<RefreshRecord>> {
        self.read("read refresh token", async |conn| {
            read::refresh(conn, hash).await
        })
        .await
    }

    async fn task_tokens(&self, task_id: &str) -> Result<Vec<TokenRecord>> {
        self.read("read task tokens", async |conn| {
            read::task_tokens(conn, task_id).await
        })
        .await
    }

    async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>> {
        self.read("read audit events", async |conn| {
            read::audit(conn, query).await
        })
        .await
    }

    async fn elevation(&self, id: &str) -> Result<Option<ElevationRecord>> {
        self.read("read elevation", async |conn| {
            read::elevation(conn, id).await
        })
        .await
    }

    async fn elevations(
        &self,
        status: Option<ElevationStatus>,
        after: Option<&ElevationCursor>,
        limit: usize,
    ) -> Result<Vec<ElevationRecord>> {
        self.read("read elevations", async |conn| {
            read::elevations(conn, status, after, limit).await
        })
        .await
    }

    async fn checkpoints(&self, since_seq: Option<u64>, limit: usize) -> Result<Vec<Checkpoint>> {
        self.read("read checkpoints", async |conn| {
            read::checkpoints(conn, since_seq, limit).await
        })
        .await
    }

    async fn chain_head(&self) -> Result<Option<(u64, String)>> {
        self.read("read the chain head", async |conn| {
            read::chain_head(conn).await
        })
        .await
    }

    async fn pins(&self) -> Result<Vec<ToolPin>> {
        self.read("read tool pins", async |conn| read::pins(conn).await)
            .await
    }

    async fn tool_used(&self, agent_id: &str, tool: &str) -> Result<bool> {
        self.read("read tool use", async |conn| {
            read::tool_used(conn, agent_id, tool).await
        })
        .await
    }

    async fn pin(&self, tool: &str) -> Result<Option<ToolPin>> {
        self.read("read tool pin", async |conn| read::pin(conn, tool).await)
            .await
    }

    async fn task_counts(&self) -> Result<TaskCounts> {
        self.read("count tasks", async |conn| read::task_counts(conn).await)
            .await
    }

    fn queue_depth(&self) -> u64 {
        self.queue.depth()
    }

    async fn ping(&self) -> Result<()> {
        // Both halves must work: a store that reads but cannot write is not
        // ready.
        if self.writer.is_closed() {
            return Err(StoreError::Unavailable("store writer is gone".into()));
        }
        self.read("ping", async |conn| {
            let version = schema::current_version(conn).await?;
            if version == SCHEMA_VERSION {
                Ok(())
            } else {
                Err(StoreError::Unavailable(format!(
                    "database schema version {version} is not the version this build supports \
                     ({SCHEMA_VERSION})"
                )))
            }
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }
}

#[cfg(test)]
mod tls_tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use tokio_postgres::config::SslMode;

    use super::configure;

    #[test]
    fn sslmode_reaches_tokio_postgres_in_both_url_forms() {
        let mode = |url: &str| configure(url).unwrap().0.get_ssl_mode();
        assert_eq!(mode("postgres://u@db/x"), SslMode::Prefer);
        assert_eq!(mode("postgres://u@db/x?sslmode=disable"), SslMode::Disable);
        assert_eq!(
            mode("postgres://u@db/x?sslmode=verify-full&sslrootcert=system"),
            SslMode::Require
        );
        assert_eq!(mode("host=db user=u sslmode=require"), SslMode::Require);
        assert_eq!(mode("host=db user=u sslmode=disable"), SslMode::Disable);
    }

    #[test]
    fn a_bad_sslmode_is_refused_without_the_password() {
        let e = configure("postgres://u:hunter2@db/x?sslmode=verify-full")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslrootcert") && !e.contains("hunter2"), "{e}");
    }
}
