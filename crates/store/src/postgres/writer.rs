//! [`Store::commit`](crate::Store::commit) for PostgreSQL: a writer task per
//! store with group commit (queued batches share one transaction, each in
//! its own savepoint), the ops applied in order with the semantics (and the
//! error variants and messages) of the SQLite writer, the audit chain
//! extended under the `chain_head` row lock (see the [`super`] module doc).

use std::time::Duration;

use portcullis_core::Timestamp;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Config;
use tokio_postgres::error::SqlState;

use super::pool::{Checks, Conn, connect};
use super::{MAX_ATTEMPTS, corrupt, describe, store_error};
use crate::model::{
    check_decision, check_new_elevation, check_pin, check_prune_bounds, check_prune_span,
};
use crate::queue::Queued;
use crate::sqlite::rows::{RawCheckpoint, TaskRow, to_int, to_uint};
use crate::{
    AuditEvent, CHECKPOINT_EXISTS, CHECKPOINT_HASH_MISMATCH, CHECKPOINT_NO_SUCH_RECORD, Checkpoint,
    Committed, ELEVATION_ALREADY_DECIDED, ElevationStatus, HeldCall, NO_SUCH_ELEVATION, NewEvent,
    Op, Result, StoreError, chain,
};

/// Largest `NOTIFY` payload PostgreSQL accepts is 7999 bytes; a longer jti
/// is announced as an empty payload, which listeners take as "resync".
const MAX_NOTIFY_PAYLOAD: i32 = 7999;

/// How applying an op failed.
#[derive(Debug)]
enum Fail {
    /// The batch's outcome: its error, final.
    Store(StoreError),
    /// PostgreSQL aborted the transaction to break a deadlock or a
    /// serialization conflict: nothing was applied, the batch may be tried
    /// again.
    Retry(String),
}

impl From<StoreError> for Fail {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

type Step<T> = std::result::Result<T, Fail>;

/// [`Op::CapPendingElevations`]: the task's row is locked first, so two
/// replicas adding a request to one task count one after the other (the
/// loser counts the winner's request once it has committed).
async fn cap_pending_elevations(conn: &mut Conn, task_id: &str, max: u32) -> Step<()> {
    let context = format!("count pending elevations of task {task_id:?}");
    let lock = conn
        .statement("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE")
        .await
        .map_err(|e| db(&context, &e))?;
    conn.client
        .query_opt(&lock, &[&task_id])
        .await
        .map_err(|e| db(&context, &e))?;
    let count = conn
        .statement("SELECT COUNT(*) FROM elevations WHERE task_id = $1 AND status = $2")
        .await
        .map_err(|e| db(&context, &e))?;
    let row = conn
        .client
        .query_one(&count, &[&task_id, &ElevationStatus::Pending.as_str()])
        .await
        .map_err(|e| db(&context, &e))?;
    let pending: i64 = row.try_get(0).map_err(|e| db(&context, &e))?;
    if pending >= i64::from(max) {
        return Err(StoreError::TooManyPending {
            task_id: task_id.to_owned(),
            max,
        }
        .into());
    }
    Ok(())
}

/// A database error in `context`, as a [`Fail`].
fn db(context: &str, error: &tokio_postgres::Error) -> Fail {
    match error.code() {
        Some(code)
            if *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            Fail::Retry(format!("{context}: {}", describe(error)))
        }
        _ => Fail::Store(store_error(context, error)),
    }
}

/// A stored value that does not decode, as a [`Fail`].
fn bad_row(context: &str, error: &tokio_postgres::Error) -> Fail {
    Fail::Store(corrupt(context, error))
}

/// Where the chain stands inside the current transaction, once locked.
#[derive(Debug, Clone)]
struct Chain {
    /// The seq the next record gets.
    next_seq: i64,
    /// The `hash` of the newest stored record ([`chain::GENESIS`] if none).
    prev_hash: String,
    /// Whether this transaction appended anything (so `chain_head` must
    /// move).
    appended: bool,
}

type Reply = oneshot::Sender<Result<Committed>>;

/// What callers send to the writer task.
#[derive(Debug)]
pub(super) enum Request {
    /// Apply a batch atomically and reply once it is committed.
    Commit {
        ops: Vec<Op>,
        reply: Reply,
        /// Counts the request as waiting until the writer takes it.
        queued: Queued,
    },
    /// Finish what is queued before this request, then stop.
    Close,
}

/// How the writer task connects and bounds its work.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    /// The connection settings (the password inside is never printed).
    pub(super) config: Config,
    /// The TLS side of the connection.
    pub(super) tls: super::TlsConnector,
    /// What a new connection must satisfy.
    pub(super) checks: Checks,
    /// The revocation channel, a checked identifier.
    pub(super) channel: String,
    /// Most batches applied in one transaction.
    pub(super) max_group: usize,
    /// Bound on connecting plus applying and committing one group.
    pub(super) group_timeout: Duration,
}

/// The writer task's body: runs until every sender is gone or
/// [`Request::Close`]. It owns one connection (made on demand, made again
/// after a failure), takes whatever batches are queued (up to
/// [`Settings::max_group`]) and applies them in one transaction (group
/// commit, see the [`super`] module doc).
pub(super) async fn run(settings: Settings, mut requests: mpsc::Receiver<Request>) {
    let max_group = settings.max_group.max(1);
    let mut conn: Option<Conn> = None;
    let mut closing = false;
    while !closing {
        let Some(first) = requests.recv().await else {
            break;
        };
        let mut batches = Vec::new();
        let mut next = Some(first);
        while let Some(request) = next.take() {
            match request {
                Request::Commit { ops, reply, queued } => {
                    drop(queued);
                    batches.push((ops, reply));
                }
                Request::Close => {
                    closing = true;
                    break;
                }
            }
            if batches.len() < max_group {
                next = requests.try_recv().ok();
            }
        }
        if batches.is_empty() {
            continue;
        }
        let applied = tokio::time::timeout(
            settings.group_timeout,
            commit_group(&settings, &mut conn, batches),
        )
        .await;
        if applied.is_err() {
            // Abandoned mid-group: the replies were dropped with the group
            // (callers see `Unavailable`), and the connection is closed so
            // the server rolls back whatever was open.
            conn = None;
        }
    }
    // Dropping `requests` fails every request still queued (their reply
    // senders drop, callers see `Unavailable`); dropping `conn` closes the
    // connection.
}

/// Applies one group: BEGIN, the chain lock, each batch inside its own
/// savepoint, then COMMIT. A failing batch rolls back to its savepoint and
/// gets its error at once; the others are answered after COMMIT. If the
/// transaction itself fails, every batch of the group that was not already
/// refused gets [`StoreError::Unavailable`] and nothing of it is kept.
async fn commit_group(
    settings: &Settings,
    slot: &mut Option<Conn>,
    batches: Vec<(Vec<Op>, Reply)>,
) {
    let conn = match slot.take() {
        Some(conn) if !conn.client.is_closed() => slot.insert(conn),
        _ => match connect(&settings.config, &settings.tls, &settings.checks).await {
            Ok(conn) => slot.insert(conn),
            Err(error) => {
                for (_, reply) in batches {
                    let _ = reply.send(Err(StoreError::Unavailable(error.to_string())));
                }
                return;
            }
        },
    };
    let mut open = Open::begin(conn).await;
    // Replies wait here until COMMIT succeeded: nothing is acknowledged
    // before it is durable.
    let mut applied: Vec<(Reply, Committed)> = Vec::with_capacity(batches.len());
    for (ops, reply) in batches {
        if open.state.is_err() {
            let _ = reply.send(Err(open.lost()));
            continue;
        }
        let Ok(chain) = &mut open.state else {
            continue;
        };
        match apply_batch(conn, &ops, chain).await {
            Ok(committed) => applied.push((reply, committed)),
            Err(failed) => {
                if let Err(why) = failed.lost {
                    open.state = Err(why);
                }
                // Rolled back either way: the outcome is final.
                let _ = reply.send(Err(failed.error));
            }
        }
    }
    let outcome = match open.state {
        Ok(chain) => finish(conn, &chain, &applied, &settings.channel).await,
        Err(why) => Err(why),
    };
    match outcome {
        Ok(()) => {
            for (reply, committed) in applied {
                let _ = reply.send(Ok(committed));
            }
        }
        Err(why) => {
            // Nothing to do if this fails too: the connection is dropped
            // and the server rolls back.
            if conn.client.batch_execute("ROLLBACK").await.is_err() {
                *slot = None;
            }
            for (reply, _) in applied {
                let _ = reply.send(Err(StoreError::Unavailable(why.clone())));
            }
        }
    }
}

/// An open group transaction: the chain state, or why the transaction was
/// lost (then nothing of the group will be kept).
struct Open {
    state: std::result::Result<Chain, String>,
}

impl Open {
    /// BEGIN, take the chain lock, set the first batch's savepoint. Every
    /// group takes the lock first, whatever its ops: the writers of the
    /// whole cluster are serialized on it, so they never wait on each
    /// other's row locks in opposite orders.
    async fn begin(conn: &mut Conn) -> Self {
        let begun = conn
            .client
            .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .map_err(|e| format!("begin: {}", describe(&e)));
        let state = match begun {
            Ok(()) => match lock_chain(conn).await {
                Ok(chain) => conn
                    .client
                    .batch_execute("SAVEPOINT batch")
                    .await
                    .map(|()| chain)
                    .map_err(|e| format!("savepoint: {}", describe(&e))),
                Err(Fail::Store(error)) => Err(error.to_string()),
                Err(Fail::Retry(why)) => Err(why),
            },
            Err(why) => Err(why),
        };
        Self { state }
    }

    /// The error of a batch that could not be applied because the
    /// transaction was lost.
    fn lost(&self) -> StoreError {
        match &self.state {
            Err(why) => StoreError::Unavailable(format!("transaction aborted: {why}")),
            Ok(_) => StoreError::Unavailable("transaction aborted".into()),
        }
    }
}

/// How one batch of a group failed.
struct BatchFailed {
    /// What its caller is told.
    error: StoreError,
    /// `Err` when the group transaction did not survive the failure.
    lost: std::result::Result<(), String>,
}

/// Applies one batch inside the savepoint `batch`, so that its failure
/// undoes only its own ops. The savepoint is set when the group begins and
/// set again after each batch (`RELEASE SAVEPOINT batch; SAVEPOINT batch`
/// in one round trip); `ROLLBACK TO SAVEPOINT` keeps it, ready for the
/// next batch. A batch that PostgreSQL aborted to break a deadlock (or a
/// serialization failure) is rolled back to the savepoint and tried again,
/// up to [`MAX_ATTEMPTS`] times in all.
async fn apply_batch(
    conn: &mut Conn,
    ops: &[Op],
    chain: &mut Chain,
) -> std::result::Result<Committed, BatchFailed> {
    let mut attempt = 1;
    loop {
        let before = chain.clone();
        let mut committed = Committed::default();
        let mut result = Ok(());
        for op in ops {
            result = apply(conn, op, &mut committed, chain).await;
            if result.is_err() {
                break;
            }
        }
        let fail = match result {
            Ok(()) => {
                return match conn
                    .client
                    .batch_execute("RELEASE SAVEPOINT batch; SAVEPOINT batch")
                    .await
                {
                    Ok(()) => Ok(committed),
                    Err(e) => {
                        let why = format!("release savepoint: {}", describe(&e));
                        Err(BatchFailed {
                            error: StoreError::Unavailable(why.clone()),
                            lost: Err(why),
                        })
                    }
                };
            }
            Err(fail) => fail,
        };
        // INVARIANT: a failed batch leaves no trace, including no consumed
        // audit seq (the chain state is restored with the savepoint).
        *chain = before;
        if let Err(e) = conn
            .client
            .batch_execute("ROLLBACK TO SAVEPOINT batch")
            .await
        {
            let why = format!("rollback to savepoint: {}", describe(&e));
            return Err(BatchFailed {
                error: match fail {
                    Fail::Store(error) => error,
                    Fail::Retry(_) => StoreError::Unavailable(why.clone()),
                },
                lost: Err(why),
            });
        }
        match fail {
            Fail::Store(error) => {
                return Err(BatchFailed {
                    error,
                    lost: Ok(()),
                });
            }
            Fail::Retry(why) if attempt >= MAX_ATTEMPTS => {
                return Err(BatchFailed {
                    error: StoreError::Unavailable(format!(
                        "batch aborted {attempt} times by PostgreSQL: {why}"
                    )),
                    lost: Ok(()),
                });
            }
            Fail::Retry(_) => {
                attempt += 1;
                let pause = 5 * u64::try_from(attempt).unwrap_or(1);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}

/// The end of a group that survived: move the chain head, announce the
/// revocations (delivered by PostgreSQL at COMMIT, never for a rolled-back
/// transaction), COMMIT.
async fn finish(
    conn: &mut Conn,
    chain: &Chain,
    applied: &[(Reply, Committed)],
    channel: &str,
) -> std::result::Result<(), String> {
    let lost = |fail: Fail| match fail {
        Fail::Store(error) => error.to_string(),
        Fail::Retry(why) => why,
    };
    if chain.appended {
        let last = chain.next_seq - 1;
        let statement = conn
            .statement("UPDATE chain_head SET seq = $1 WHERE id")
            .await
            .map_err(|e| lost(db("move the chain head", &e)))?;
        conn.client
            .execute(&statement, &[&last])
            .await
            .map_err(|e| lost(db("move the chain head", &e)))?;
    }
    let revoked: Vec<&str> = applied
        .iter()
        .flat_map(|(_, committed)| committed.revoked.iter().map(String::as_str))
        .collect();
    if !revoked.is_empty() {
        let statement = conn
            .statement(
                "SELECT pg_notify($1, CASE WHEN octet_length(jti) <= $3 THEN jti ELSE '' END) \
                 FROM unnest($2::text[]) AS jti",
            )
            .await
            .map_err(|e| lost(db("notify revocations", &e)))?;
        conn.client
            .execute(&statement, &[&channel, &revoked, &MAX_NOTIFY_PAYLOAD])
            .await
            .map_err(|e| lost(db("notify revocations", &e)))?;
    }
    conn.client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| format!("commit: {}", describe(&e)))
}

/// Takes the `chain_head` row lock (held until COMMIT or ROLLBACK) and reads
/// where the chain stands. The newest record is read by a second statement,
/// after the lock is granted, so that under READ COMMITTED it sees the
/// records of the transaction that held the lock before.
async fn lock_chain(conn: &mut Conn) -> Step<Chain> {
    let context = "append audit event: lock the chain head";
    let statement = conn
        .statement("SELECT seq FROM chain_head WHERE id FOR UPDATE")
        .await
        .map_err(|e| db(context, &e))?;
    let high_water: i64 = conn
        .client
        .query_opt(&statement, &[])
        .await
        .map_err(|e| db(context, &e))?
        .ok_or_else(|| StoreError::Corrupt("the chain_head row is missing".into()))?
        .try_get(0)
        .map_err(|e| bad_row(context, &e))?;
    let context = "append audit event: read the chain head";
    let statement = conn
        .statement("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
        .await
        .map_err(|e| db(context, &e))?;
    let last = conn
        .client
        .query_opt(&statement, &[])
        .await
        .map_err(|e| db(context, &e))?
        .map(|row| Ok::<_, tokio_postgres::Error>((row.try_get::<_, i64>(0)?, row.try_get(1)?)))
        .transpose()
        .map_err(|e| bad_row(context, &e))?;
    let (last_seq, prev_hash) = last.unwrap_or_else(|| (0, chain::GENESIS.to_owned()));
    // Like SQLite's AUTOINCREMENT: above the highest seq ever given, even if
    // the newest rows were deleted since (a visible gap, never a re-link).
    let next_seq = high_water
        .max(last_seq)
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("audit seq exhausted".into()))?;
    Ok(Chain {
        next_seq,
        prev_hash,
        appended: false,
    })
}

async fn apply(conn: &mut Conn, op: &Op, committed: &mut Committed, chain: &mut Chain) -> Step<()> {
    match op {
        Op::InsertTask(record) => {
            let row = TaskRow::encode(record)?;
            let context = format!("insert task {:?}", row.id);
            let statement = conn
                .statement(
                    "INSERT INTO tasks (id, agent_id, agent_type, state, status, version, \
                     deadline, started_at, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .await
                .map_err(|e| db(&context, &e))?;
            conn.client
                .execute(
                    &statement,
                    &[
                        &row.id,
                        &row.agent_id,
                        &row.agent_type,
                        &row.state,
                        &row.status,
                        &row.version,
                        &row.deadline,
                        &row.started_at,
                        &row.body,
                    ],
                )
                .await
                .map_err(|e| db(&context, &e))?;
        }
        Op::UpdateTask {
            record,
            expected_version,
        } => update_task(conn, record, *expected_version).await?,
        Op::InsertToken(token) => {
            let issued_at = to_int("token issued_at", token.issued_at.0)?;
            let expires_at = to_int("token expires_at", token.expires_at.0)?;
            let revoked_at = token
                .revoked_at
                .map(|at| to_int("token revoked_at", at.0))
                .transpose()?;
            let context = format!("insert token {:?} of task {:?}", token.jti, token.task_id);
            let statement = conn
                .statement(
                    "INSERT INTO tokens (jti, task_id, agent_id, kind, issued_at, expires_at, \
                     revoked_at, revoke_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .await
                .map_err(|e| db(&context, &e))?;
            conn.client
                .execute(
                    &statement,
                    &[
                        &token.jti,
                        &token.task_id,
                        &token.agent_id,
                        &token.kind.as_str(),
                        &issued_at,
                        &expires_at,
                        &revoked_at,
                        &token.revoke_reason,
                    ],
                )
                .await
                .map_err(|e| db(&context, &e))?;
        }
        Op::RevokeToken { jti, at, reason } => {
            let at = to_int("revoked_at", at.0)?;
            let context = format!("revoke token {jti:?}");
            let statement = conn
                .statement(
                    "UPDATE tokens SET revoked_at = $2, revoke_reason = $3 \
                     WHERE jti = $1 AND revoked_at IS NULL",
                )
                .await
                .map_err(|e| db(&context, &e))?;
            let changed = conn
                .client
                .execute(&statement, &[jti, &at, reason])
                .await
                .map_err(|e| db(&context, &e))?;
            if changed > 0 {
                committed.revoked.push(jti.clone());
            }
        }
        Op::RevokeTaskTokens {
            task_id,
            at,
            reason,
        } => {
            let at = to_int("revoked_at", at.0)?;
            let context = format!("revoke tokens of task {task_id:?}");
            let statement = conn
                .statement(
                    "UPDATE tokens SET revoked_at = $2, revoke_reason = $3 \
                     WHERE task_id = $1 AND revoked_at IS NULL RETURNING jti",
                )
                .await
                .map_err(|e| db(&context, &e))?;
            let mut revoked = conn
                .client
                .query(&statement, &[task_id, &at, reason])
                .await
                .map_err(|e| db(&context, &e))?
                .iter()
                .map(|row| row.try_get::<_, String>(0))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad_row(&context, &e))?;
            // RETURNING order is unspecified; keep the reply deterministic.
            revoked.sort_unstable();
            committed.revoked.extend(revoked);
            let statement = conn
                .statement(
                    "UPDATE refresh_tokens SET spent_at = $2 \
                     WHERE task_id = $1 AND spent_at IS NULL",
                )
                .await
                .map_err(|e| db(&context, &e))?;
            conn.client
                .execute(&statement, &[task_id, &at])
                .await
                .map_err(|e| db(&context, &e))?;
        }
        Op::InsertRefresh(refresh) => {
            let issued_at = to_int("refresh issued_at", refresh.issued_at.0)?;
            let idle_expires_at = to_int("refresh idle_expires_at", refresh.idle_expires_at.0)?;
            let spent_at = refresh
                .spent_at
                .map(|at| to_int("refresh spent_at", at.0))
                .transpose()?;
            let context = format!("insert refresh token of task {:?}", refresh.task_id);
            let statement = conn
                .statement(
                    "INSERT INTO refresh_tokens (hash, task_id, agent_id, issued_at, \
                     idle_expires_at, spent_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .await
                .map_err(|e| db(&context, &e))?;
            conn.client
                .execute(
                    &statement,
                    &[
                        &refresh.hash,
                        &refresh.task_id,
                        &refresh.agent_id,
                        &issued_at,
                        &idle_expires_at,
                        &spent_at,
                    ],
                )
                .await
                .map_err(|e| db(&context, &e))?;
        }
        Op::SpendRefresh { hash, at } => spend_refresh(conn, hash, *at).await?,
        Op::Append(event) => {
            let seq = append_event(conn, event, chain).await?;
            committed.seqs.push(seq);
        }
        Op::AppendCheckpoint(checkpoint) => append_checkpoint(conn, checkpoint).await?,
        Op::PruneAudit {
            after_seq,
            through_seq,
        } => prune_audit(conn, *after_seq, *through_seq).await?,
        Op::InsertElevation(record) => {
            check_new_elevation(record)?;
            let requested_at = to_int("elevation requested_at", record.requested_at.0)?;
            let context = format!(
                "insert elevation {:?} of task {:?}",
                record.id, record.task_id
            );
            let statement = conn
                .statement(
                    "INSERT INTO elevations (id, task_id, agent_id, tool, reason, status, \
                     requested_at, held) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .await
                .map_err(|e| db(&context, &e))?;
            conn.client
                .execute(
                    &statement,
                    &[
                        &record.id,
                        &record.task_id,
                        &record.agent_id,
                        &record.tool,
                        &record.reason,
                        &ElevationStatus::Pending.as_str(),
                        &requested_at,
                        &record.held.as_ref().and_then(HeldCall::encode),
                    ],
                )
                .await
                .map_err(|e| db(&context, &e))?;
        }
        Op::CapPendingElevations { task_id, max } => {
            cap_pending_elevations(conn, task_id, *max).await?;
        }
        Op::DecideElevation {
            id,
            status,
            by,
            at,
            note,
            expires_at,
        } => decide_elevation(conn, id, *status, by, *at, note.as_deref(), *expires_at).await?,
        Op::RecordToolUse { agent_id, tool, at } => {
            let at = to_int("tool use at", at.0)?;
            let statement = conn
                .statement(
                    "INSERT INTO agent_tools (agent_id, tool, first_used) VALUES ($1, $2, $3) \
                     ON CONFLICT (agent_id, tool) DO NOTHING",
                )
                .await
                .map_err(|e| db("record tool use", &e))?;
            conn.client
                .execute(&statement, &[agent_id, tool, &at])
                .await
                .map_err(|e| db("record tool use", &e))?;
        }
        Op::PinTool(pin) => {
            let definition = check_pin(pin)?;
            let pinned_at = to_int("pin pinned_at", pin.pinned_at.0)?;
            let context = format!("pin tool {:?}", pin.tool);
            let statement = conn
                .statement(
                    "INSERT INTO tool_pins (tool, upstream, hash, definition, pinned_at, \
                     approved_by) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (tool) DO UPDATE SET upstream = excluded.upstream, \
                     hash = excluded.hash, definition = excluded.definition, \
                     pinned_at = excluded.pinned_at, approved_by = excluded.approved_by",
                )
                .await
                .map_err(|e| db(&context, &e))?;
            conn.client
                .execute(
                    &statement,
                    &[
                        &pin.tool,
                        &pin.upstream,
                        &pin.hash,
                        &definition,
                        &pinned_at,
                        &pin.approved_by,
                    ],
                )
                .await
                .map_err(|e| db(&context, &e))?;
        }
    }
    Ok(())
}

/// [`Op::UpdateTask`]: one conditional update. Under READ COMMITTED a
/// concurrent update of the row makes this one wait, then re-check
/// `version = expected` against the committed row: of two racing updates
/// from one version, exactly one changes the row.
async fn update_task(
    conn: &mut Conn,
    record: &crate::TaskRecord,
    expected_version: u64,
) -> Step<()> {
    let id = &record.task.id;
    if record.task.version <= expected_version {
        return Err(StoreError::Conflict(format!(
            "update task {id:?}: new version {} must be greater than expected version \
             {expected_version}",
            record.task.version
        ))
        .into());
    }
    let expected = to_int("expected version", expected_version)?;
    let row = TaskRow::encode(record)?;
    let context = format!("update task {id:?}");
    let statement = conn
        .statement(
            "UPDATE tasks SET agent_id = $2, agent_type = $3, state = $4, status = $5, \
             version = $6, deadline = $7, started_at = $8, body = $9 \
             WHERE id = $1 AND version = $10",
        )
        .await
        .map_err(|e| db(&context, &e))?;
    let changed = conn
        .client
        .execute(
            &statement,
            &[
                &row.id,
                &row.agent_id,
                &row.agent_type,
                &row.state,
                &row.status,
                &row.version,
                &row.deadline,
                &row.started_at,
                &row.body,
                &expected,
            ],
        )
        .await
        .map_err(|e| db(&context, &e))?;
    if changed > 0 {
        return Ok(());
    }
    let statement = conn
        .statement("SELECT version FROM tasks WHERE id = $1")
        .await
        .map_err(|e| db(&context, &e))?;
    let stored: Option<i64> = conn
        .client
        .query_opt(&statement, &[id])
        .await
        .map_err(|e| db(&context, &e))?
        .map(|row| row.try_get(0))
        .transpose()
        .map_err(|e| bad_row(&context, &e))?;
    Err(StoreError::Conflict(match stored {
        None => format!("update task {id:?}: no such task"),
        Some(version) => {
            format!("update task {id:?}: stored version is {version}, not {expected_version}")
        }
    })
    .into())
}

/// [`Op::SpendRefresh`]: the row is read `FOR UPDATE`, so of two replicas
/// spending one refresh token the second waits and then sees it spent.
async fn spend_refresh(conn: &mut Conn, hash: &str, at: Timestamp) -> Step<()> {
    let at = to_int("spent_at", at.0)?;
    let context = "spend refresh token";
    let statement = conn
        .statement(
            "SELECT task_id, idle_expires_at, spent_at FROM refresh_tokens WHERE hash = $1 \
             FOR UPDATE",
        )
        .await
        .map_err(|e| db(context, &e))?;
    let found = conn
        .client
        .query_opt(&statement, &[&hash])
        .await
        .map_err(|e| db(context, &e))?;
    let Some(row) = found else {
        return Err(StoreError::RefreshUnknown.into());
    };
    let read = || -> std::result::Result<(String, i64, Option<i64>), tokio_postgres::Error> {
        Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
    };
    let (task_id, idle_expires_at, spent_at) = read().map_err(|e| bad_row(context, &e))?;
    if spent_at.is_some() {
        return Err(StoreError::RefreshSpent { task_id }.into());
    }
    if idle_expires_at <= at {
        return Err(StoreError::RefreshExpired { task_id }.into());
    }
    let statement = conn
        .statement("UPDATE refresh_tokens SET spent_at = $2 WHERE hash = $1")
        .await
        .map_err(|e| db(context, &e))?;
    conn.client
        .execute(&statement, &[&hash, &at])
        .await
        .map_err(|e| db(context, &e))?;
    Ok(())
}

/// [`Op::Append`]: the record gets the next seq and links to the newest
/// record, both known because this transaction holds the chain head lock.
/// Hashed exactly as the SQLite writer hashes ([`chain::record_hash`]),
/// stored as the same JSON.
async fn append_event(conn: &mut Conn, event: &NewEvent, chain: &mut Chain) -> Step<u64> {
    let ts = to_int("event ts", event.ts.0)?;
    let seq = chain.next_seq;
    let mut record = AuditEvent {
        seq: to_uint("audit seq", seq)?,
        event: event.clone(),
        prev_hash: chain.prev_hash.clone(),
        hash: String::new(),
    };
    let json = chain::seal(&mut record);
    let context = "append audit event";
    let statement = conn
        .statement(
            "INSERT INTO audit_events (seq, ts, kind, task_id, event, prev_hash, hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await
        .map_err(|e| db(context, &e))?;
    conn.client
        .execute(
            &statement,
            &[
                &seq,
                &ts,
                &record.event.kind.as_str(),
                &record.event.task_id,
                &json,
                &record.prev_hash,
                &record.hash,
            ],
        )
        .await
        .map_err(|e| db(context, &e))?;
    chain.next_seq = seq
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("audit seq exhausted".into()))?;
    chain.prev_hash = record.hash;
    chain.appended = true;
    Ok(record.seq)
}

/// [`Op::PruneAudit`]: under the chain lock (every group holds it), checks
/// where the stored log starts and ends and that a checkpoint covers
/// `through_seq`, then deletes the records and the checkpoints below it.
async fn prune_audit(conn: &mut Conn, after_seq: u64, through_seq: u64) -> Step<()> {
    let context = format!("prune audit records {}..={through_seq}", after_seq + 1);
    let span = check_prune_span(after_seq, through_seq)?;
    let (after, through) = (
        to_int("prune after_seq", span.0)?,
        to_int("prune through_seq", span.1)?,
    );
    let statement = conn
        .statement(
            "SELECT (SELECT MIN(seq) FROM audit_events), (SELECT MAX(seq) FROM audit_events), \
             EXISTS (SELECT 1 FROM checkpoints c JOIN audit_events e ON e.seq = c.seq \
                     WHERE c.seq = $1 AND c.hash = e.hash)",
        )
        .await
        .map_err(|e| db(&context, &e))?;
    let row = conn
        .client
        .query_one(&statement, &[&through])
        .await
        .map_err(|e| db(&context, &e))?;
    let read =
        || -> std::result::Result<(Option<i64>, Option<i64>, bool), tokio_postgres::Error> {
            Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
        };
    let (oldest, newest, anchored) = read().map_err(|e| bad_row(&context, &e))?;
    check_prune_bounds(after, through, oldest, newest, anchored)?;
    for sql in [
        "DELETE FROM audit_events WHERE seq <= $1",
        "DELETE FROM checkpoints WHERE seq < $1",
    ] {
        let statement = conn.statement(sql).await.map_err(|e| db(&context, &e))?;
        conn.client
            .execute(&statement, &[&through])
            .await
            .map_err(|e| db(&context, &e))?;
    }
    Ok(())
}

/// [`Op::AppendCheckpoint`]: only of a stored record, with its hash; the
/// same checkpoint again is a no-op, a different one of the same seq a
/// conflict.
async fn append_checkpoint(conn: &mut Conn, checkpoint: &Checkpoint) -> Step<()> {
    let row = RawCheckpoint::encode(checkpoint)?;
    let context = format!("append checkpoint of seq {}", checkpoint.seq);
    let statement = conn
        .statement("SELECT hash FROM audit_events WHERE seq = $1")
        .await
        .map_err(|e| db(&context, &e))?;
    let stored: Option<String> = conn
        .client
        .query_opt(&statement, &[&row.seq])
        .await
        .map_err(|e| db(&context, &e))?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(|e| bad_row(&context, &e))?;
    match stored {
        None => return Err(StoreError::Conflict(CHECKPOINT_NO_SUCH_RECORD.to_owned()).into()),
        Some(hash) if hash != row.hash => {
            return Err(StoreError::Conflict(CHECKPOINT_HASH_MISMATCH.to_owned()).into());
        }
        Some(_) => {}
    }
    let statement = conn
        .statement(
            "INSERT INTO checkpoints (seq, hash, ts, kid, sig) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (seq) DO NOTHING",
        )
        .await
        .map_err(|e| db(&context, &e))?;
    let inserted = conn
        .client
        .execute(
            &statement,
            &[&row.seq, &row.hash, &row.ts, &row.kid, &row.sig],
        )
        .await
        .map_err(|e| db(&context, &e))?;
    if inserted > 0 {
        return Ok(());
    }
    let statement = conn
        .statement("SELECT seq, hash, ts, kid, sig FROM checkpoints WHERE seq = $1")
        .await
        .map_err(|e| db(&context, &e))?;
    let existing = conn
        .client
        .query_opt(&statement, &[&row.seq])
        .await
        .map_err(|e| db(&context, &e))?
        .map(|r| {
            Ok::<_, tokio_postgres::Error>(RawCheckpoint {
                seq: r.try_get(0)?,
                hash: r.try_get(1)?,
                ts: r.try_get(2)?,
                kid: r.try_get(3)?,
                sig: r.try_get(4)?,
            })
        })
        .transpose()
        .map_err(|e| bad_row(&context, &e))?;
    if existing.as_ref() == Some(&row) {
        Ok(())
    } else {
        Err(StoreError::Conflict(CHECKPOINT_EXISTS.to_owned()).into())
    }
}

/// [`Op::DecideElevation`]: one conditional update (`… AND status =
/// 'pending'`), so that of two decisions on one request, in this replica
/// or another, only the first committed finds it pending.
async fn decide_elevation(
    conn: &mut Conn,
    id: &str,
    status: ElevationStatus,
    by: &str,
    at: Timestamp,
    note: Option<&str>,
    expires_at: Option<Timestamp>,
) -> Step<()> {
    check_decision(id, status, at, expires_at)?;
    let decided_at = to_int("elevation decided_at", at.0)?;
    let expires_at = expires_at
        .map(|at| to_int("elevation expires_at", at.0))
        .transpose()?;
    let context = format!("decide elevation {id:?}");
    let statement = conn
        .statement(
            "UPDATE elevations SET status = $2, decided_at = $3, decided_by = $4, note = $5, \
             expires_at = $6 \
             WHERE id = $1 AND status = 'pending' AND ($2 <> 'approved' OR agent_id <> $4)",
        )
        .await
        .map_err(|e| db(&context, &e))?;
    let changed = conn
        .client
        .execute(
            &statement,
            &[&id, &status.as_str(), &decided_at, &by, &note, &expires_at],
        )
        .await
        .map_err(|e| db(&context, &e))?;
    if changed > 0 {
        return Ok(());
    }
    // Nothing changed: say why.
    let statement = conn
        .statement("SELECT status FROM elevations WHERE id = $1")
        .await
        .map_err(|e| db(&context, &e))?;
    let stored: Option<String> = conn
        .client
        .query_opt(&statement, &[&id])
        .await
        .map_err(|e| db(&context, &e))?
        .map(|row| row.try_get(0))
        .transpose()
        .map_err(|e| bad_row(&context, &e))?;
    Err(StoreError::Conflict(match stored {
        None => NO_SUCH_ELEVATION.to_owned(),
        Some(stored) if stored != ElevationStatus::Pending.as_str() => {
            ELEVATION_ALREADY_DECIDED.to_owned()
        }
        // Still pending, so the update's last condition refused it.
        Some(_) => format!("{context}: an agent cannot approve its own elevation request"),
    })
    .into())
}
