//! The embedded SQLite backend (the sidecar and embedded default).
//!
//! # Files
//!
//! One database file at the configured path plus SQLite's `-wal` and `-shm`
//! files next to it (WAL mode). The three belong together: back up with
//! `sqlite3 <db> ".backup <copy>"` (or stop the gateway first), never by
//! copying the main file alone while it runs.
//!
//! # Schema (version 7)
//!
//! All tables are `STRICT`, so a column holds only its declared type.
//! Times are unix **milliseconds** ([`Timestamp`](portcullis_core::Timestamp))
//! stored as `INTEGER`; a `u64` above `i64::MAX` is refused
//! ([`StoreError::Corrupt`]) rather than wrapped.
//!
//! `schema_migrations`, one row per applied migration:
//!
//! | column | meaning |
//! |---|---|
//! | `version` INTEGER PK | migration number, 1, 2, … |
//! | `name` TEXT | short name of the migration |
//! | `applied_at` INTEGER | wall-clock ms when it was applied (informational) |
//!
//! `tasks`, one row per task, indexed on `status` (migration 6, for
//! [`Store::task_counts`]):
//!
//! | column | meaning |
//! |---|---|
//! | `id` TEXT PK | task id |
//! | `agent_id` TEXT | the agent running it |
//! | `agent_type` TEXT | the agent's type (its workflow) |
//! | `state` TEXT | current workflow state |
//! | `status` TEXT | `active`, `completed` or `halted` |
//! | `version` INTEGER | compare-and-swap version ([`Op::UpdateTask`]) |
//! | `deadline` INTEGER | end of the task's maximum lifetime |
//! | `started_at` INTEGER | when the task started |
//! | `body` TEXT | JSON object with the remaining [`Task`](portcullis_core::Task) fields: `{"goal": str, "tools": [str], "grants": [{"tool": str, "expires_at": ms, "once": bool, "answers": "elevation" | "approval" | {"anomaly": rule}, "args_digest"?: hex}], "calls": u64, "tool_calls": {tool: u64}}` |
//!
//! The columns are the only copy of the fields they hold; `body` never
//! repeats them.
//!
//! `tokens`, one row per issued access token or per-hop credential
//! (metadata only, never the token), indexed on `(task_id, issued_at)`:
//!
//! | column | meaning |
//! |---|---|
//! | `jti` TEXT PK | the token's `jti` claim |
//! | `task_id` TEXT | the task it is bound to (foreign key to `tasks.id`) |
//! | `agent_id` TEXT | the agent it was issued to |
//! | `kind` TEXT | `access` or `hop` |
//! | `issued_at` INTEGER | `iat` |
//! | `expires_at` INTEGER | `exp` |
//! | `revoked_at` INTEGER NULL | when it was revoked; NULL while valid |
//! | `revoke_reason` TEXT NULL | why it was revoked |
//!
//! `refresh_tokens`, one row per issued refresh token, indexed on `task_id`:
//!
//! | column | meaning |
//! |---|---|
//! | `hash` TEXT PK | SHA-256 of the opaque token, lowercase hex (the token itself is never stored) |
//! | `task_id` TEXT | the task it refreshes (foreign key to `tasks.id`) |
//! | `agent_id` TEXT | the agent it was issued to |
//! | `issued_at` INTEGER | when it was issued |
//! | `idle_expires_at` INTEGER | it must be spent strictly before this instant |
//! | `spent_at` INTEGER NULL | when it was spent, or revoked with its task; NULL while usable |
//!
//! `audit_events`, the audit log (`docs/audit-format.md`), indexed on
//! `(task_id, seq)` and `(kind, seq)`:
//!
//! | column | meaning |
//! |---|---|
//! | `seq` INTEGER PK AUTOINCREMENT | the record's sequence number; authoritative (see below) |
//! | `ts` INTEGER | the record's `ts` (copy, for range scans) |
//! | `kind` TEXT | the record's `kind`, e.g. `call.denied` (copy, for the index) |
//! | `task_id` TEXT NULL | the record's `task_id` (copy, for the index) |
//! | `event` TEXT | the whole record as JSON, exactly as [`AuditEvent`] serializes: `{"seq", "ts", "kind", …the event's fields…, "prev_hash", "hash"}` (DESIGN section 6 names, empty fields omitted); the authoritative record (migration 3; before it, the [`NewEvent`](crate::NewEvent) alone) |
//! | `prev_hash` TEXT | the record's `prev_hash` (copy; migration 3) |
//! | `hash` TEXT | the record's `hash` (copy, read for [`Store::chain_head`] and to check [`Op::AppendCheckpoint`]; migration 3) |
//!
//! On read, a record is its `event` JSON with the row's `seq`: the `seq`
//! inside the JSON is not read, so a record moved to another row takes that
//! row's seq and no longer matches its hash. The copies in `ts`, `kind`,
//! `task_id`, `prev_hash` and `hash` serve indexes and the writer's lookups
//! (chain head, checkpoint check); a reader never takes a record's content
//! from them.
//!
//! `checkpoints` (migration 3), one row per signed checkpoint of the chain:
//!
//! | column | meaning |
//! |---|---|
//! | `seq` INTEGER PK | the last record covered (at most one checkpoint per record) |
//! | `hash` TEXT | that record's `hash`, 64 hex digits (checked against the record when written) |
//! | `ts` INTEGER | when it was signed |
//! | `kid` TEXT | the signing key's id |
//! | `sig` TEXT | the Ed25519 signature, base64url, over [`checkpoint_message`](crate::checkpoint_message) (not checked by the store) |
//!
//! `elevations` (migration 2), one row per elevation request, indexed on
//! `(status, requested_at)` (the approvers' queue) and `task_id`:
//!
//! | column | meaning |
//! |---|---|
//! | `id` TEXT PK | elevation id |
//! | `task_id` TEXT | the task it is scoped to (foreign key to `tasks.id`) |
//! | `agent_id` TEXT | the agent that asked |
//! | `tool` TEXT | the tool asked for |
//! | `reason` TEXT | why the agent asked |
//! | `status` TEXT | `pending`, `approved` or `denied` |
//! | `requested_at` INTEGER | when the agent asked |
//! | `decided_at` INTEGER NULL | when it was decided; NULL exactly while pending |
//! | `decided_by` TEXT NULL | who decided; NULL exactly while pending |
//! | `note` TEXT NULL | the approver's note |
//! | `expires_at` INTEGER NULL | when an approval lapses; set exactly when approved |
//! | `held` TEXT NULL | migration 7: for a call the gateway held, the JSON of [`HeldCall`](crate::HeldCall) (`{"rule", "args_digest", "args"}`); NULL for an agent's request |
//!
//! The row is the request and its outcome; the grant itself lives in the
//! task's `body` (`grants`), written in the same batch as the approval.
//! [`Op::DecideElevation`] is `UPDATE … WHERE id = ? AND status = 'pending'`:
//! the writer thread applies batches one after the other, so of two racing
//! decisions the second finds the row decided and conflicts.
//!
//! `tool_pins` (migration 4), one row per pinned tool definition
//! ([`ToolPin`]):
//!
//! | column | meaning |
//! |---|---|
//! | `tool` TEXT PK | the gateway's tool name, `<upstream>.<tool>` |
//! | `upstream` TEXT | the upstream it comes from |
//! | `hash` TEXT | SHA-256 of the canonical JSON of `definition`, 64 lowercase hex digits (the form is checked, the digest is the gateway's) |
//! | `definition` TEXT | the pinned definition, a JSON object (at most [`MAX_PIN_DEFINITION_BYTES`](crate::MAX_PIN_DEFINITION_BYTES)) |
//! | `pinned_at` INTEGER | when it was pinned or last re-approved |
//! | `approved_by` TEXT | `first-use` or the approving admin's name |
//!
//! [`Op::PinTool`] is `INSERT … ON CONFLICT (tool) DO UPDATE`: a
//! re-approval replaces the whole row. [`Store::pins`] reads every row,
//! ordered by `tool` (binary collation, i.e. byte order).
//!
//! # The hash chain
//!
//! The writer thread gives every appended record its `prev_hash` and `hash`
//! ([`chain::record_hash`](crate::chain::record_hash)) as it inserts it,
//! so the chain follows commit order exactly. The chain head is not kept in
//! memory: each append reads the newest row's `seq` and `hash` (and
//! `sqlite_sequence`) inside the current transaction and savepoint. So a
//! batch that rolls back takes its records and its part of the chain with
//! it, a failed group leaves the head where the database has it, and the
//! chain continues across restarts (and across processes sharing the file)
//! from what is stored. The new record's seq is what `AUTOINCREMENT` would
//! give (above the highest seq ever used, inserted explicitly so it can be
//! hashed before the insert); its `prev_hash` is the newest stored record's
//! `hash` ([`chain::GENESIS`](crate::chain::GENESIS) when there is none). A
//! log whose newest rows were deleted behind the store's back is therefore
//! continued with a visible gap, never silently re-linked.
//!
//! Records written before migration 3 were chained by the migration, in
//! seq order from `GENESIS`, exactly as the writer would have chained them,
//! and their `event` JSON rewritten as the full record; an event that did
//! not decode makes the migration (and the open) fail with
//! [`StoreError::Corrupt`], changing nothing.
//!
//! [`Op::AppendCheckpoint`] is accepted only for a stored record with that
//! `hash`; the same checkpoint again is a no-op, a different one of the same
//! seq a conflict.
//!
//! `AUTOINCREMENT` (not plain rowid) guarantees a seq is never reused, even
//! after the newest rows are deleted; `sqlite_sequence` holds the high-water
//! mark and is rolled back with a failed batch, so failed batches consume no
//! seq and committed seqs are gap-free.
//!
//! # Concurrency: one writer thread, group commit
//!
//! SQLite allows one writer at a time. A dedicated OS thread owns the only
//! read-write connection; [`SqliteStore::commit`] sends its batch over a
//! bounded channel ([`QUEUE_DEPTH`] batches; callers wait when it is full)
//! with a tokio oneshot for the reply. [`Store::queue_depth`] counts the
//! batches sent (or waiting for room) and not yet taken by the thread. The thread blocks for one request,
//! then drains whatever else is queued, up to [`MAX_GROUP`] batches, and
//! applies them all in **one** `BEGIN IMMEDIATE … COMMIT` transaction:
//!
//! ```text
//! BEGIN IMMEDIATE
//!   SAVEPOINT batch  <ops of batch 1>  RELEASE batch
//!   SAVEPOINT batch  <ops of batch 2 fail>  ROLLBACK TO batch; RELEASE batch   -> batch 2 gets its error
//!   SAVEPOINT batch  <ops of batch 3>  RELEASE batch
//! COMMIT                                                                         -> batches 1 and 3 get Ok
//! ```
//!
//! A failing batch rolls back alone; the rest commit together and share one
//! fsync, which is what makes thousands of commits per second possible with
//! `synchronous = FULL`. Replies are sent only after `COMMIT` returns, so an
//! acknowledged batch is durable. If the transaction itself fails (`COMMIT`
//! error, or an error that makes SQLite abandon the transaction), every
//! batch of the group gets [`StoreError::Unavailable`] and nothing of it is
//! kept. Batches are applied in arrival order, so seqs follow commit order.
//!
//! When the thread is gone (closed, or died), the channel is closed and every
//! commit is [`StoreError::Unavailable`]: fail closed, never a panic.
//!
//! # Reads
//!
//! A pool of read-only connections ([`SqliteOptions::readers`], default 4),
//! each query run with `tokio::task::spawn_blocking`. WAL lets readers run
//! alongside the writer; each query is its own read transaction, so it sees
//! every batch acknowledged before it started.
//!
//! # Durability
//!
//! `journal_mode = WAL`, `synchronous = FULL` by default: an acknowledged
//! batch survives `kill -9` and power loss. With
//! [`SqliteOptions::synchronous_full`] off (`synchronous = NORMAL`) it
//! survives `kill -9` but the last commits may be lost on power loss.
//!
//! # The JSON Lines mirror
//!
//! With [`SqliteOptions::jsonl_mirror`] set (the gateway's `audit.jsonl`),
//! the writer thread also appends the audit log to that file, for SIEM
//! ingestion, in the format of `portcullis audit export`
//! (`docs/audit-format.md`, "Export" and "JSON Lines mirror"): every
//! committed record as one line, its stored `event` JSON byte for byte, in
//! seq order; every newly stored checkpoint as a `{"checkpoint": {…}}`
//! line after the record it covers. `portcullis audit verify --jsonl`
//! therefore works on the mirror. Redaction happens before records reach
//! the store, so the mirror holds exactly what the ledger holds. A
//! rolled-back batch writes no line, nor does a repeated (no-op)
//! checkpoint.
//!
//! **When.** Right after a group's `COMMIT` succeeds and its replies are
//! sent, the group's lines, in commit order, are appended with one
//! `write_all` and flushed, and fsynced when
//! [`SqliteOptions::synchronous_full`] is on. A commit is acknowledged
//! before its lines are in the mirror; with the mirror in sync, a request
//! sent after it (a [`Store::ping`], [`SqliteStore::close`]) is answered
//! after them. The writes happen on the writer thread, though: a mirror on
//! slow (or hung) storage slows every later group. Keep it on a local disk.
//!
//! **The ledger is the source of truth.** A mirror failure (open, write,
//! fsync) never fails or rolls back a commit: it is counted
//! ([`SqliteStore::mirror_failures`], the message in
//! [`SqliteStore::mirror_last_error`]) and the mirror falls behind. It is
//! tried again at the next committed group, catching up from the ledger.
//! [`SqliteStore::mirror_seq`] says how far it got.
//!
//! **Catching up.** At open and after a failure the mirror is behind. The
//! writer thread reads the file backwards from its end to find where it
//! stops (its last complete record line and its newest checkpoint line),
//! then appends what the ledger holds past that: the stored checkpoints
//! between the two (committed after their record's line was written), then
//! every record with a higher seq, each followed by its checkpoint. It does
//! so one page ([`CATCH_UP_PAGE`] records) at a time between groups, and
//! one page after each group so it progresses under load; memory is one
//! page and one line, whatever the sizes of the log and the file. While
//! behind, groups write no lines themselves: the catch-up reaches them in
//! order. [`SqliteStore::open_with`] returns before the catch-up ends;
//! [`SqliteStore::close`] (or the writer thread, once the store is dropped)
//! makes one last attempt and waits for it to finish. So the lines
//! of a crash between a `COMMIT` and its mirror write are appended at the
//! next open, a mirror deleted while the store is closed is rebuilt from
//! seq 1, and a mirror enabled on an existing ledger starts with the whole
//! log. (Checkpoints are taken to be committed in seq order, as the
//! gateway's checkpointer does: each signs the chain head of its time. A
//! checkpoint committed below an earlier one could be missed by a
//! catch-up.)
//!
//! **A partial last line** (a write cut short by a crash or a full disk) is
//! repaired before anything else is appended. If it is the beginning of a
//! line the catch-up is about to write (the usual case: that line's write
//! was cut), the rest of that line is written, completing it. Otherwise a
//! newline ends it and it stays behind as one unreadable line (which
//! `audit verify --jsonl` reports: delete it by hand), and the stream
//! continues after the last complete line.
//!
//! **A mirror of another ledger.** At every catch-up the last record
//! line's seq and hash are looked up in the ledger. If the ledger does not
//! hold that record (the database was restored from an older backup, or
//! the file is another database's), it is counted as a failure, and the
//! file is read further back to the last record line the ledger does hold:
//! the mirror goes on after that one (after seq 0 if none), so no record of
//! the ledger is left out (the records after it appear twice in the file,
//! once per history).
//!
//! **Rotation** is left to external tools (logrotate, or the log shipper:
//! Vector, Fluent Bit); the store never renames, truncates or deletes the
//! mirror. It holds the file open with `O_APPEND` (created if missing, with
//! the process's umask), and before every write checks that the path still
//! names that file (device and inode); if not, it creates a new file at the
//! path and writes there:
//!
//! * rename rotation (logrotate's `create`, `mv`): lines up to the rename
//!   are in the old file and the next group starts the new one, no signal
//!   needed; only a group being written during the rename itself can still
//!   land in the old file (keep `delaycompress`);
//! * `copytruncate`: writes go on at the new end of the same file (no
//!   hole); lines written between logrotate's copy and its truncation are
//!   lost from both files, which the store cannot see (logrotate's own
//!   caveat): prefer rename rotation;
//! * the file is the only record of where the mirror stopped: a restart
//!   after a rotation, before any line reached the new file, finds it empty
//!   (or missing) and rebuilds the whole log into it. Consumers can drop
//!   repeats by `seq` and `hash`.
//!
//! The mirror must be a regular file (the catch-up reads it). A relative
//! path is relative to the process's working directory; the gateway
//! resolves `audit.jsonl` against the config file's folder.
//!
//! # Migrations
//!
//! [`SqliteStore::open`] creates `schema_migrations` and applies every
//! migration newer than the stored version, each in its own `BEGIN IMMEDIATE`
//! transaction together with its `schema_migrations` row. A database whose
//! version is newer than this build knows is refused
//! ([`StoreError::Unavailable`]): an old binary must not write a newer
//! layout. Older databases are upgraded in place on open: migration 2 only
//! adds a table and its indexes; migration 3 adds the chain columns and the
//! `checkpoints` table and chains the existing audit records (see "The hash
//! chain"); migration 4 only adds the `tool_pins` table; migration 5 adds
//! `agent_tools` and fills it from the allowed calls already logged;
//! migration 6 only adds the `tasks_status` index.

mod mirror;
mod read;
pub(crate) mod rows;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params, params_from_iter};
use tokio::sync::{mpsc, oneshot};

pub use self::mirror::CATCH_UP_PAGE;
use self::mirror::{Mirror, MirrorStatus};
use self::read::ReadPool;
use self::rows::{
    CHECKPOINT_COLUMNS, ELEVATION_COLUMNS, PIN_COLUMNS, REFRESH_COLUMNS, RawCheckpoint,
    RawElevation, RawEvent, RawPin, RawRefresh, RawTask, RawToken, TASK_COLUMNS, TOKEN_COLUMNS,
    to_uint,
};
pub use self::schema::LATEST_VERSION as SCHEMA_VERSION;
pub use self::writer::MAX_GROUP;
use self::writer::Request;
use crate::queue::QueueGauge;
use crate::{
    AuditEvent, AuditQuery, Checkpoint, Committed, ElevationCursor, ElevationRecord,
    ElevationStatus, MAX_ROWS, Op, RefreshRecord, Result, Store, StoreError, TaskCounts,
    TaskRecord, TokenRecord, ToolPin,
};

/// Batches that may wait for the writer before callers are held back.
pub const QUEUE_DEPTH: usize = 4096;

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// `synchronous = FULL` (durable across power loss) when true, `NORMAL`
    /// (durable across process crashes only) when false. Default true.
    pub synchronous_full: bool,
    /// Read-only connections in the read pool (at least 1). Default 4.
    pub readers: usize,
    /// How long a connection waits for a lock held by another process before
    /// failing with [`StoreError::Unavailable`]. Default 5 s.
    pub busy_timeout: Duration,
    /// A JSON Lines mirror of the audit log at this path (`audit.jsonl`),
    /// appended to by the writer thread after each commit; see "The JSON
    /// Lines mirror" in the module doc. A relative path is relative to the
    /// process's working directory. Default `None` (no mirror).
    pub jsonl_mirror: Option<PathBuf>,
    /// Hold an exclusive lock on `<database>.serve-lock` while the store is
    /// open, and refuse to open ([`StoreError::Unavailable`]) while another
    /// process holds it. A serving gateway keeps state of its own beside
    /// the file (its cache of live tokens, its task locks), so two of them
    /// on one file would not see each other's revocations and halts; tools
    /// that only read or make one change (`audit verify`, `elevations
    /// approve`) open without it. Default false.
    pub exclusive_serving: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous_full: true,
            readers: 4,
            busy_timeout: Duration::from_secs(5),
            jsonl_mirror: None,
            exclusive_serving: false,
        }
    }
}

/// The SQLite ledger. See the module doc for its layout and concurrency.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    writer: mpsc::Sender<Request>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<ReadPool>,
    mirror: Option<Arc<MirrorStatus>>,
    queue: QueueGauge,
    /// The next batch's [`crate::Ticket`].
    tickets: AtomicU64,
    /// The locked `<database>.serve-lock` of
    /// [`SqliteOptions::exclusive_serving`]; the lock goes with the file
    /// handle: released by [`close`](Self::close) once the writer is done,
    /// or when the store is dropped or the process ends, however.
    serve_lock: Mutex<Option<std::fs::File>>,
}

/// Takes the exclusive serving lock of the database at `database`.
fn lock_for_serving(database: &Path) -> Result<std::fs::File> {
    let mut name = database.as_os_str().to_owned();
    name.push(".serve-lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Unavailable(format!("open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "{} is in use by another `portcullis serve` (it holds {}); two gateways on one \
             embedded ledger would not see each other's revocations and halts: stop the \
             other one, or share a PostgreSQL ledger between replicas",
            database.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "lock {}: {e}",
            path.display()
        ))),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with default
    /// [`SqliteOptions`]: WAL, `synchronous = FULL`, 5 s busy timeout,
    /// foreign keys on, migrations applied.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, &SqliteOptions::default())
    }

    /// Opens (creating if needed) the database at `path`.
    ///
    /// A [`jsonl_mirror`](SqliteOptions::jsonl_mirror) that names the
    /// database or one of its companion files is refused
    /// ([`StoreError::Unavailable`]); any other mirror problem never fails
    /// the open (it is counted, see [`mirror_failures`](Self::mirror_failures)).
    pub fn open_with(path: &Path, options: &SqliteOptions) -> Result<Self> {
        if let Some(mirror) = &options.jsonl_mirror {
            check_mirror_path(path, mirror)?;
        }
        let serve_lock = if options.exclusive_serving {
            Some(lock_for_serving(path)?)
        } else {
            None
        };
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| sql_error(&format!("open {}", path.display()), &e))?;
        configure_writer(&conn, options)?;
        schema::migrate(&mut conn)?;
        // Every statement the writer runs, its transaction control included
        // (about 30), stays prepared.
        conn.set_prepared_statement_cache_capacity(64);

        let readers = Arc::new(ReadPool::open(
            path.to_path_buf(),
            options.readers,
            options.busy_timeout,
        )?);

        let status = options
            .jsonl_mirror
            .as_ref()
            .map(|_| Arc::new(MirrorStatus::default()));
        let mirror = options
            .jsonl_mirror
            .clone()
            .zip(status.clone())
            .map(|(mirror, status)| Mirror::new(mirror, options.synchronous_full, status));

        let (writer, requests) = mpsc::channel(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("portcullis-store-writer".into())
            .spawn(move || writer::run(conn, requests, mirror))
            .map_err(|e| StoreError::Unavailable(format!("spawn writer thread: {e}")))?;

        Ok(Self {
            path: path.to_path_buf(),
            writer,
            writer_thread: Mutex::new(Some(thread)),
            readers,
            mirror: status,
            queue: QueueGauge::default(),
            tickets: AtomicU64::new(1),
            serve_lock: Mutex::new(serve_lock),
        })
    }

    /// How many times writing the JSON Lines mirror failed (0 without a
    /// mirror): every failed attempt counts, including the retry of each
    /// later group while the cause lasts. A failure never fails a commit.
    pub fn mirror_failures(&self) -> u64 {
        self.mirror.as_ref().map_or(0, |m| m.failures())
    }

    /// The most recent mirror failure's message (kept after the mirror
    /// recovers; `None` if it never failed or there is no mirror).
    pub fn mirror_last_error(&self) -> Option<String> {
        self.mirror.as_ref().and_then(|m| m.last_error())
    }

    /// The highest audit seq known to be in the JSON Lines mirror (0 before
    /// its first line), `None` without a mirror. Compared with
    /// [`Store::chain_head`], it is how far the mirror lags.
    pub fn mirror_seq(&self) -> Option<u64> {
        self.mirror.as_ref().map(|m| m.seq())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the store: batches already queued are committed, later calls
    /// fail with [`StoreError::Unavailable`], and this returns once the
    /// writer thread has closed its connection. Dropping the store without
    /// `close` does the same in the background.
    pub async fn close(&self) {
        self.readers.close();
        // If the writer is already gone there is nothing to stop.
        let _ = self.writer.send(Request::Close).await;
        let thread = self.writer_thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            // Joining blocks; keep it off the async workers. A writer that
            // panicked has nothing more to report than being gone.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        // Only now may another gateway take the file.
        if let Ok(mut lock) = self.serve_lock.lock() {
            lock.take();
        }
    }

    async fn send(&self, request: Request) -> Result<()> {
        self.writer
            .send(request)
            .await
            .map_err(|_| StoreError::Unavailable("store writer is gone".into()))
    }
}

/// Refuses a mirror that would write into the database's own files.
fn check_mirror_path(database: &Path, mirror: &Path) -> Result<()> {
    let companions = ["", "-wal", "-shm", "-journal"].map(|suffix| {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    });
    if companions
        .iter()
        .any(|file| mirror::same_file(file, mirror))
    {
        return Err(StoreError::Unavailable(format!(
            "the audit JSON Lines mirror {} is the database {} or one of its files",
            mirror.display(),
            database.display()
        )));
    }
    Ok(())
}

/// Runs `op` again while SQLite answers `SQLITE_BUSY`/`SQLITE_LOCKED`, for
/// at most `limit`. Switching to WAL can be refused busy without SQLite's
/// busy handler being consulted (while another connection to the file
/// closes and checkpoints the WAL, as the close-churn test does); the busy
/// timeout alone does not cover it.
fn busy_retry<T>(
    limit: std::time::Duration,
    mut op: impl FnMut() -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match op() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn configure_writer(conn: &Connection, options: &SqliteOptions) -> Result<()> {
    conn.busy_timeout(options.busy_timeout)
        .map_err(|e| sql_error("set busy timeout", &e))?;
    let mode: String = busy_retry(options.busy_timeout, || {
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
    })
    .map_err(|e| sql_error("set journal_mode", &e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "journal_mode is {mode:?}, WAL is required"
        )));
    }
    let synchronous = if options.synchronous_full {
        "FULL"
    } else {
        "NORMAL"
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(|e| sql_error("set synchronous", &e))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(|e| sql_error("enable foreign keys", &e))?;
    let foreign_keys: i64 = conn
        .pragma_query_value(None, "foreign_keys", |row| row.get(0))
        .map_err(|e| sql_error("read foreign_keys", &e))?;
    if foreign_keys != 1 {
        return Err(StoreError::Unavailable(
            "foreign keys could not be enabled".into(),
        ));
    }
    Ok(())
}

/// Maps a SQLite error to the store's error kinds.
fn sql_error(context: &str, error: &rusqlite::Error) -> StoreError {
    let message = format!("{context}: {error}");
    match error.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => StoreError::Conflict(message),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreError::Corrupt(message),
        Some(_) => StoreError::Unavailable(message),
        None => match error {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(message),
            _ => StoreError::Unavailable(message),
        },
    }
}

/// An error that always means "cannot answer" (schema setup).
fn unavailable(context: &str, error: &rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("{context}: {error}"))
}

/// A query bound as an SQL integer; anything past `i64::MAX` means "no
/// bound", which `i64::MAX` expresses exactly.
fn clamp_to_int<T: TryInto<i64>>(value: T) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn commit(&self, ops: Vec<Op>) -> Result<Committed> {
        self.enqueue(ops).await?.await
    }

    /// In the writer's queue on return: the single writer commits in queue
    /// order, so the batch lands after every batch queued before it.
    async fn enqueue_after(
        &self,
        ops: Vec<Op>,
        after: Option<crate::Ticket>,
    ) -> Result<crate::Enqueued> {
        let (reply, answer) = oneshot::channel();
        let queued = self.queue.ticket();
        let ticket = crate::Ticket(self.tickets.fetch_add(1, Ordering::Relaxed));
        self.send(Request::Commit {
            ops,
            reply,
            queued,
            ticket,
            after,
        })
        .await?;
        Ok(crate::Enqueued {
            ticket,
            pending: Box::pin(async move {
                answer.await.map_err(|_| {
                    StoreError::Unavailable("store writer stopped before answering".into())
                })?
            }),
        })
    }

    fn writer_queue(&self) -> bool {
        true
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let id = id.to_owned();
        self.readers
            .run(move |conn| {
                let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1");
                conn.prepare_cached(&sql)
                    .and_then(|mut stmt| stmt.query_row([&id], RawTask::from_row).optional())
                    .map_err(|e| sql_error("read task", &e))?
                    .map(RawTask::decode)
                    .transpose()
            })
            .await
    }

    async fn token(&self, jti: &str) -> Result<Option<TokenRecord>> {
        let jti = jti.to_owned();
        self.readers
            .run(move |conn| {
                let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE jti = ?1");
                conn.prepare_cached(&sql)
                    .and_then(|mut stmt| stmt.query_row([&jti], RawToken::from_row).optional())
                    .map_err(|e| sql_error("read token", &e))?
                    .map(RawToken::decode)
                    .transpose()
            })
            .await
    }

    async fn refresh(&self, hash: &str) -> Result<Option<RefreshRecord>> {
        let hash = hash.to_owned();
        self.readers
            .run(move |conn| {
                let sql = format!("SELECT {REFRESH_COLUMNS} FROM refresh_tokens WHERE hash = ?1");
                conn.prepare_cached(&sql)
                    .and_then(|mut stmt| stmt.query_row([&hash], RawRefresh::from_row).optional())
                    .map_err(|e| sql_error("read refresh token", &e))?
                    .map(RawRefresh::decode)
                    .transpose()
            })
            .await
    }

    async fn task_tokens(&self, task_id: &str) -> Result<Vec<TokenRecord>> {
        let task_id = task_id.to_owned();
        self.readers
            .run(move |conn| {
                // The latest MAX_ROWS, returned oldest first.
                let sql = format!(
                    "SELECT {TOKEN_COLUMNS} FROM (SELECT {TOKEN_COLUMNS} FROM tokens \
                     WHERE task_id = ?1 ORDER BY issued_at DESC, jti DESC LIMIT ?2) \
                     ORDER BY issued_at, jti"
                );
                let limit = clamp_to_int(MAX_ROWS);
                conn.prepare_cached(&sql)
                    .and_then(|mut stmt| {
                        stmt.query_map(params![task_id, limit], RawToken::from_row)?
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .map_err(|e| sql_error("read task tokens", &e))?
                    .into_iter()
                    .map(RawToken::decode)
                    .collect()
            })
            .await
    }

    async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>> {
        let task_id = query.task_id.clone();
        let kind = query.kind.map(|k| k.as_str());
        let since = clamp_to_int(query.since_seq.unwrap_or(0));
        let limit = clamp_to_int(query.effective_limit());
        self.readers
            .run(move |conn| {
                // One fixed statement per filter combination, so each can use
                // its index (`?1 IS NULL OR task_id = ?1` would defeat it).
                let mut values = Vec::with_capacity(4);
                let sql = match (task_id, kind) {
                    (Some(task_id), Some(kind)) => {
                        values.extend([Value::Text(task_id), Value::Text(kind.into())]);
                        // Without INDEXED BY the planner may walk every
                        // event of a common kind; a task's events are few.
                        "SELECT seq, event FROM audit_events INDEXED BY audit_events_task \
                         WHERE task_id = ?1 AND kind = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4"
                    }
                    (Some(task_id), None) => {
                        values.push(Value::Text(task_id));
                        "SELECT seq, event FROM audit_events WHERE task_id = ?1 \
                         AND seq > ?2 ORDER BY seq LIMIT ?3"
                    }
                    (None, Some(kind)) => {
                        values.push(Value::Text(kind.into()));
                        "SELECT seq, event FROM audit_events WHERE kind = ?1 \
                         AND seq > ?2 ORDER BY seq LIMIT ?3"
                    }
                    (None, None) => {
                        "SELECT seq, event FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                    }
                };
                values.extend([Value::Integer(since), Value::Integer(limit)]);
                conn.prepare_cached(sql)
                    .and_then(|mut stmt| {
                        stmt.query_map(params_from_iter(values), RawEvent::from_row)?
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .map_err(|e| sql_error("read audit events", &e))?
                    .into_iter()
                    .map(RawEvent::decode)
                    .collect()
            })
            .await
    }

    async fn elevation(&self, id: &str) -> Result<Option<ElevationRecord>> {
        let id = id.to_owned();
        self.readers
            .run(move |conn| {
                let sql = format!("SELECT {ELEVATION_COLUMNS} FROM elevations WHERE id = ?1");
                conn.prepare_cached(&sql)
                    .and_then(|mut stmt| stmt.query_row([&id], RawElevation::from_row).optional())
                    .map_err(|e| sql_error("read elevation", &e))?
                    .map(RawElevation::decode)
                    .transpose()
            })
            .await
    }

    async fn elevations(
        &self,
        status: Option<ElevationStatus>,
        after: Option<&ElevationCursor>,
        limit: usize,
    ) -> Result<Vec<ElevationRecord>> {
        let limit = clamp_to_int(limit.min(MAX_ROWS));
        let after = after.map(|c| (clamp_to_int(c.requested_at.0), c.id.clone()));
        self.readers
            .run(move |conn| {
                let mut values = Vec::with_capacity(4);
                let mut clauses = Vec::with_capacity(2);
                if let Some(status) = status {
                    values.push(Value::Text(status.as_str().into()));
                    clauses.push(format!("status = ?{}", values.len()));
                }
                if let Some((at, id)) = after {
                    values.push(Value::Integer(at));
                    let at_param = values.len();
                    values.push(Value::Text(id));
                    clauses.push(format!(
                        "(requested_at, id) > (?{at_param}, ?{})",
                        values.len()
                    ));
                }
                let filter = if clauses.is_empty() {
                    String::new()
                } else {
                    format!("WHERE {}", clauses.join(" AND "))
                };
                values.push(Value::Integer(limit));
                let sql = format!(
                    "SELECT {ELEVATION_COLUMNS} FROM elevations {filter} \
                     ORDER BY requested_at, id LIMIT ?{}",
                    values.len()
                );
                conn.prepare_cached(&sql)
                    .and_then(|mut stmt| {
                        stmt.query_map(params_from_iter(values), RawElevation::from_row)?
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .map_err(|e| sql_error("read elevations", &e))?
                    .into_iter()
                    .map(RawElevation::decode)
                    .collect()
            })
            .await
    }

    async fn checkpoints(&self, since_seq: Option<u64>, limit: usize) -> Result<Vec<Checkpoint>> {
        let since = clamp_to_int(since_seq.unwrap_or(0));
        let limit = clamp_to_int(limit.min(MAX_ROWS));
        self.readers
            .run(move |conn| {
                let sql = format!(
                    "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE seq > ?1 \
                     ORDER BY seq LIMIT ?2"
                );
                conn.prepare_cached(&sql)
                    .and_then(|mut stmt| {
                        stmt.query_map(params![since, limit], RawCheckpoint::from_row)?
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .map_err(|e| sql_error("read checkpoints", &e))?
                    .into_iter()
                    .map(RawCheckpoint::decode)
                    .collect()
            })
            .await
    }

    async fn chain_head(&self) -> Result<Option<(u64, String)>> {
        self.readers
            .run(|conn| {
                conn.prepare_cached("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
                    .and_then(|mut stmt| {
                        stmt.query_row([], |row| {
                            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                        })
                        .optional()
                    })
                    .map_err(|e| sql_error("read the chain head", &e))?
                    .map(|(seq, hash)| Ok((to_uint("audit seq", seq)?, hash)))
                    .transpose()
            })
            .await
    }

    async fn pins(&self) -> Result<Vec<ToolPin>> {
        self.readers
            .run(|conn| {
                let sql = format!("SELECT {PIN_COLUMNS} FROM tool_pins ORDER BY tool");
                conn.prepare_cached(&sql)
                    .and_then(|mut stmt| {
                        stmt.query_map([], RawPin::from_row)?
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .map_err(|e| sql_error("read tool pins", &e))?
                    .into_iter()
                    .map(RawPin::decode)
                    .collect()
            })
            .await
    }

    async fn tool_used(&self, agent_id: &str, tool: &str) -> Result<bool> {
        let (agent_id, tool) = (agent_id.to_owned(), tool.to_owned());
        self.readers
            .run(move |conn| {
                conn.prepare_cached("SELECT 1 FROM agent_tools WHERE agent_id = ?1 AND tool = ?2")
                    .and_then(|mut stmt| stmt.exists([&agent_id, &tool]))
                    .map_err(|e| sql_error("read tool use", &e))
            })
            .await
    }

    async fn pin(&self, tool: &str) -> Result<Option<ToolPin>> {
        let tool = tool.to_owned();
        self.readers
            .run(move |conn| {
                let sql = format!("SELECT {PIN_COLUMNS} FROM tool_pins WHERE tool = ?1");
                conn.prepare_cached(&sql)
                    .and_then(|mut stmt| stmt.query_row([&tool], RawPin::from_row).optional())
                    .map_err(|e| sql_error("read tool pin", &e))?
                    .map(RawPin::decode)
                    .transpose()
            })
            .await
    }

    async fn task_counts(&self) -> Result<TaskCounts> {
        self.readers
            .run(|conn| {
                // Two range counts on the `tasks_status` index (migration 6).
                conn.prepare_cached(
                    "SELECT (SELECT count(*) FROM tasks WHERE status = 'active'), \
                     (SELECT count(*) FROM tasks WHERE status = 'halted')",
                )
                .and_then(|mut stmt| {
                    stmt.query_row([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))
                })
                .map_err(|e| sql_error("count tasks", &e))
                .and_then(|(active, halted)| {
                    Ok(TaskCounts {
                        active: to_uint("active task count", active)?,
                        halted: to_uint("halted task count", halted)?,
                    })
                })
            })
            .await
    }

    fn queue_depth(&self) -> u64 {
        self.queue.depth()
    }

    async fn settled(&self) -> Result<()> {
        // The writer answers a ping after applying every batch queued
        // before it (in the same group or an earlier one).
        let (reply, answer) = oneshot::channel();
        self.send(Request::Ping { reply }).await?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped before answering".into()))?
    }

    async fn ping(&self) -> Result<()> {
        // Both halves must work: a store that reads but cannot write is not
        // ready.
        let (reply, answer) = oneshot::channel();
        self.send(Request::Ping { reply }).await?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("store writer stopped before answering".into())
        })??;
        self.readers
            .run(|conn| schema::current_version(conn).map(drop))
            .await
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}
