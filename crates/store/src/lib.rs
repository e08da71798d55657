//! The Portcullis ledger (DESIGN section 6): tasks with their workflow state,
//! token metadata, refresh-token hashes, revocations, elevation requests,
//! pinned tool definitions and the audit log, behind one [`Store`] trait.
//!
//! # How callers use it
//!
//! Every change goes through [`Store::commit`]: a batch of [`Op`]s applied
//! atomically and durably. A call's audit record, the task's new version and
//! the tokens it mints are one batch, so the ledger never holds half a
//! decision:
//!
//! ```no_run
//! # async fn example(store: &dyn portcullis_store::Store, record: portcullis_store::TaskRecord) -> portcullis_store::Result<()> {
//! use portcullis_core::Timestamp;
//! use portcullis_store::{EventKind, NewEvent, Op};
//!
//! let mut event = NewEvent::new(Timestamp(1_700_000_000_000), EventKind::TaskStarted);
//! event.task_id = Some(record.task.id.clone());
//! let committed = store
//!     .commit(vec![Op::InsertTask(record), Op::Append(event)])
//!     .await?;
//! assert_eq!(committed.seqs.len(), 1);
//! # Ok(()) }
//! ```
//!
//! Fail-closed: every error is typed ([`StoreError`]); none of them is ever
//! an allow. [`StoreError::Unavailable`] means "the ledger could not answer":
//! the caller denies.
//!
//! # Backends
//!
//! * [`SqliteStore`]: embedded, WAL, one writer thread with group commit
//!   (see the [`sqlite`] module for its file format and concurrency model).
//! * [`PostgresStore`]: one database shared by the replicas of a cluster
//!   (see the [`postgres`] module and `docs/postgres.md`): versioned
//!   migrations under an advisory lock, a writer task per replica with
//!   group commit, the hash chain serialized across replicas on the
//!   `chain_head` row lock, compare-and-swap and exactly-once decisions
//!   decided by the database, and revocations announced with
//!   `NOTIFY portcullis_revoked` and received with
//!   [`PostgresStore::listen_revocations`] (wiring that into the gateway's
//!   token cache is the gateway's part).
//!
//! Both pass [`testsuite::run_all`] unchanged (`tests/sqlite.rs`,
//! `tests/postgres.rs`).
//!
//! [`testsuite`] holds the backend-independent contract tests, so every
//! backend is held to the same semantics.
//!
//! # The audit log
//!
//! The log is a hash chain (`docs/audit-format.md`): every backend gives
//! each appended record its `prev_hash` and `hash` in commit order
//! ([`chain::record_hash`] over [`canonical_json`]), and stores the
//! gateway's signed [`Checkpoint`]s ([`Op::AppendCheckpoint`],
//! [`Store::checkpoints`], [`Store::chain_head`]; the text they sign is
//! [`checkpoint_message`]). [`chain::verify`] and [`chain::Verifier`] check a
//! log, streamed from [`Store::audit`] pages or an export, without the
//! store.

pub mod canonical;
pub mod chain;
pub mod lines;
mod model;
pub mod postgres;
mod queue;
pub mod records;
pub mod redact;
pub mod sqlite;
pub mod testsuite;

pub use canonical::canonical_json;
pub use model::{
    AuditEvent, AuditQuery, CHECKPOINT_EXISTS, CHECKPOINT_HASH_MISMATCH, CHECKPOINT_NO_SUCH_RECORD,
    Checkpoint, Committed, DEFAULT_AUDIT_LIMIT, ELEVATION_ALREADY_DECIDED, ElevationCursor,
    ElevationRecord, ElevationStatus, EventKind, HeldCall, MAX_AUDIT_LIMIT, MAX_CURSOR_ID_BYTES,
    MAX_PIN_DEFINITION_BYTES, MAX_ROWS, NO_SUCH_ELEVATION, NewEvent, Op, PRUNE_HEAD, PRUNE_MOVED,
    PRUNE_NOT_ANCHORED, RefreshRecord, TaskRecord, TokenKind, TokenRecord, ToolPin,
    UnknownElevationStatus, UnknownEventKind, UnknownTokenKind, checkpoint_message,
};
pub use postgres::{PostgresOptions, PostgresStore, Revocation};
pub use sqlite::{SqliteOptions, SqliteStore};

/// The result of every store operation.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Why a store operation failed. Every variant is a deny for the caller.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O error, database locked past the busy timeout, store closed, writer
    /// thread gone, schema newer than this build: the caller must fail closed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// An [`Op::UpdateTask`] compare-and-swap lost (version mismatch or no
    /// such task), an [`Op::DecideElevation`] on an elevation that is not
    /// pending (or does not exist), an [`Op::AppendCheckpoint`] that does not
    /// match a stored record, a duplicate key on insert, an insert that
    /// names a task that does not exist, or an op that is invalid in itself
    /// (a non-increasing version, an elevation decided as pending, an
    /// [`Op::PinTool`] with an empty name, a malformed hash or a definition
    /// that is not a bounded JSON object).
    #[error("store conflict: {0}")]
    Conflict(String),
    /// [`Op::SpendRefresh`]: no refresh token has this hash.
    #[error("unknown refresh token")]
    RefreshUnknown,
    /// [`Op::SpendRefresh`]: the refresh token was already spent. Reuse of a
    /// refresh token means it leaked: the caller revokes the whole task.
    #[error("refresh token already spent (task {task_id})")]
    RefreshSpent {
        /// The task the refresh token belongs to.
        task_id: String,
    },
    /// [`Op::SpendRefresh`]: the refresh token's idle window has passed.
    #[error("refresh token expired (task {task_id})")]
    RefreshExpired {
        /// The task the refresh token belongs to.
        task_id: String,
    },
    /// [`Op::CapPendingElevations`]: the task already has `max` pending
    /// elevation requests (or more).
    #[error("task {task_id} already has {max} pending elevation requests")]
    TooManyPending {
        /// The task.
        task_id: String,
        /// The cap it reached.
        max: u32,
    },
    /// A stored row that does not decode, or a value that the storage format
    /// cannot hold (an integer above `i64::MAX`).
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

/// How many tasks of the ledger are in each unfinished status
/// ([`Store::task_counts`]). Completed tasks are not counted: they only
/// grow, and counting them would cost a scan of them all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskCounts {
    /// Tasks with status `active`.
    pub active: u64,
    /// Tasks with status `halted`.
    pub halted: u64,
}

/// The outcome of a batch queued with [`Store::enqueue`].
pub type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Committed>> + Send>>;

/// A queued batch's place in its writer's queue ([`Store::enqueue_after`]):
/// a batch queued later can be made to depend on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// A batch in the writer's queue ([`Store::enqueue_after`]).
pub struct Enqueued {
    /// Its place in the queue, for a batch that depends on it.
    pub ticket: Ticket,
    /// Its outcome.
    pub pending: Pending,
}

impl std::fmt::Debug for Enqueued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enqueued")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

/// [`Store::enqueue_after`]: the batch was refused because a batch it
/// depends on was not committed.
pub const DEPENDENCY_FAILED: &str = "a batch it was planned on was not committed";

/// The ledger. Implementations are shared across tasks (`Arc<dyn Store>`).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies `ops` atomically (all or nothing) and durably (committed
    /// before return). Audit seqs are strictly increasing, gap-free within
    /// the committed order, never reused.
    ///
    /// The first failing op decides the error and nothing of the batch is
    /// kept. [`StoreError::Unavailable`] means the batch was not
    /// acknowledged: deny, and treat its outcome as unknown (it was almost
    /// certainly not applied, but an I/O error during the final fsync cannot
    /// tell). If the returned future is dropped before it completes, the
    /// batch may or may not be committed.
    async fn commit(&self, ops: Vec<Op>) -> Result<Committed>;

    /// Queues `ops` for commit behind every batch queued before them and
    /// returns once they are queued, with the outcome to wait for. A
    /// backend without a writer queue commits them before returning: an
    /// error is then returned at once, and the outcome is ready. The batch's guarantees are those of
    /// [`Store::commit`]; dropping the outcome does not cancel the commit.
    async fn enqueue(&self, ops: Vec<Op>) -> Result<Pending> {
        Ok(self.enqueue_after(ops, None).await?.pending)
    }

    /// [`Store::enqueue`], for a batch planned on the outcome of an earlier
    /// one, `after`: the writer refuses it ([`StoreError::Conflict`],
    /// [`DEPENDENCY_FAILED`]) unless that batch was committed — and so,
    /// transitively, every batch of a chain fails after the first that
    /// fails. A caller planning a task's next change on the state its
    /// previous queued change will produce chains them this way, so that
    /// nothing planned on a change that never happened is ever committed.
    ///
    /// A backend without a writer queue ([`Store::writer_queue`] false)
    /// commits before returning, so a caller knows each outcome before it
    /// could plan on it, and `after` is not needed.
    async fn enqueue_after(&self, ops: Vec<Op>, after: Option<Ticket>) -> Result<Enqueued> {
        // No queue: committed (or refused, which the caller hears now).
        let _ = after;
        let committed = self.commit(ops).await?;
        Ok(Enqueued {
            ticket: Ticket(0),
            pending: Box::pin(std::future::ready(Ok(committed))),
        })
    }

    /// Whether [`Store::enqueue`] returns before the batch is committed
    /// (a single writer applying a queue in order). Only then may a caller
    /// plan on a queued batch's outcome, chaining with
    /// [`Store::enqueue_after`].
    fn writer_queue(&self) -> bool {
        false
    }

    /// Waits until every batch queued with [`Store::enqueue`] before this
    /// call has been applied (committed or failed), so a read after it sees
    /// them. Immediate for a backend without a writer queue.
    async fn settled(&self) -> Result<()> {
        Ok(())
    }

    /// The task with this id.
    async fn task(&self, id: &str) -> Result<Option<TaskRecord>>;

    /// The token with this `jti`.
    async fn token(&self, jti: &str) -> Result<Option<TokenRecord>>;

    /// The refresh token with this hash (sha256 hex of the opaque token).
    async fn refresh(&self, hash: &str) -> Result<Option<RefreshRecord>>;

    /// The tokens of a task in issue order (`issued_at`, then `jti`); at most
    /// the latest [`MAX_ROWS`] of them.
    async fn task_tokens(&self, task_id: &str) -> Result<Vec<TokenRecord>>;

    /// Audit events matching `query`, in ascending `seq` order.
    async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>>;

    /// The elevation request with this id.
    async fn elevation(&self, id: &str) -> Result<Option<ElevationRecord>>;

    /// Elevation requests with this status (all of them when `None`), oldest
    /// first (`requested_at`, then `id`), strictly after `after` in that
    /// order when given; at most `limit` of them, and never more than
    /// [`MAX_ROWS`]. Page with `after` = [`ElevationCursor::after`] the
    /// last request read.
    async fn elevations(
        &self,
        status: Option<ElevationStatus>,
        after: Option<&ElevationCursor>,
        limit: usize,
    ) -> Result<Vec<ElevationRecord>>;

    /// Signed checkpoints of the audit chain with `seq > since_seq` (all when
    /// `None`), in ascending `seq` order; at most `limit` of them, and never
    /// more than [`MAX_ROWS`]: page with `since_seq` = the last seq read.
    async fn checkpoints(&self, since_seq: Option<u64>, limit: usize) -> Result<Vec<Checkpoint>>;

    /// The newest audit record's `seq` and `hash` (what a checkpoint
    /// signs); `None` while the log is empty.
    async fn chain_head(&self) -> Result<Option<(u64, String)>>;

    /// Every pinned tool definition ([`Op::PinTool`]), ordered by
    /// [`ToolPin::tool`] (byte order). Not capped at [`MAX_ROWS`]: a pin
    /// left out would read as a tool never pinned.
    /// Whether `agent_id` has ever had a call of `tool` allowed (the
    /// ledger's history across tasks; see [`Op::RecordToolUse`]).
    async fn tool_used(&self, agent_id: &str, tool: &str) -> Result<bool>;

    async fn pins(&self) -> Result<Vec<ToolPin>>;

    /// The pinned definition of this tool (`<upstream>.<tool>`), if it has
    /// one.
    async fn pin(&self, tool: &str) -> Result<Option<ToolPin>>;

    /// How many tasks are active and halted now, ledger-wide (every
    /// replica's tasks on a shared database), read with one indexed query
    /// on the task status.
    async fn task_counts(&self) -> Result<TaskCounts>;

    /// Commit requests of this process waiting for the ledger writer: in
    /// its queue, or waiting for room in it (`0` for a backend without a
    /// queue). A cheap atomic read, never a query.
    fn queue_depth(&self) -> u64 {
        0
    }

    /// A real round trip to the database (for `/readyz`).
    async fn ping(&self) -> Result<()>;

    /// The backend's name: `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;
}
