//! The writer thread: owns the one read-write connection and applies batches
//! with group commit (see the [`super`] module doc).

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::mirror::{Line, Mirror};
use super::rows::{CHECKPOINT_COLUMNS, RawCheckpoint, TaskRow, to_int};
use super::sql_error;
use crate::model::{
    check_decision, check_new_elevation, check_pin, check_prune_bounds, check_prune_span,
};
use crate::queue::Queued;
use crate::{
    AuditEvent, CHECKPOINT_EXISTS, CHECKPOINT_HASH_MISMATCH, CHECKPOINT_NO_SUCH_RECORD, Checkpoint,
    Committed, DEPENDENCY_FAILED, ELEVATION_ALREADY_DECIDED, ElevationStatus, HeldCall,
    NO_SUCH_ELEVATION, NewEvent, Op, Result, StoreError, Ticket, chain,
};

/// Most batches drained into one SQLite transaction.
pub const MAX_GROUP: usize = 512;

/// What callers send to the writer thread.
#[derive(Debug)]
pub enum Request {
    /// Apply a batch atomically and reply once it is durable.
    Commit {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<Committed>>,
        /// Counts the request as waiting until the writer takes it.
        queued: Queued,
        /// Its place in the queue.
        ticket: Ticket,
        /// The batch it was planned on, if any: refused unless that one
        /// was committed.
        after: Option<Ticket>,
    },
    /// Run a query on the write connection and reply.
    Ping { reply: oneshot::Sender<Result<()>> },
    /// Finish what is queued before this request, then stop.
    Close,
}

/// The thread's body: runs until every sender is gone or [`Request::Close`].
///
/// With a JSON Lines `mirror`, the thread also keeps it up to date: a
/// mirror in sync gets each group's lines after its COMMIT; a mirror behind
/// (at open, after a failure) catches up one page per turn of the loop,
/// after each group and whenever no request is waiting, and once more at
/// the end.
pub fn run(
    mut conn: Connection,
    mut requests: mpsc::Receiver<Request>,
    mut mirror: Option<Mirror>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut failures = Failures::default();
    let mut closing = false;
    while !closing {
        let first = if let Some(mirror) = mirror.as_mut().filter(|m| m.wants_work()) {
            match requests.try_recv() {
                Ok(request) => request,
                Err(TryRecvError::Empty) => {
                    mirror.step(&conn);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            }
        } else {
            let Some(first) = requests.blocking_recv() else {
                break;
            };
            first
        };
        group.push(first);
        // Group commit: everything already queued rides on the same
        // transaction and the same fsync.
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        closing = process(&mut conn, &mut group, &mut failures, mirror.as_mut());
        // Under steady load the queue never empties: catch up here too.
        if let Some(mirror) = mirror.as_mut() {
            mirror.step(&conn);
        }
    }
    if let Some(mirror) = mirror.as_mut() {
        mirror.finish(&conn);
    }
    // Dropping `requests` here fails every request still queued (their reply
    // senders drop, callers see `Unavailable`); dropping `conn` closes the
    // database, checkpointing the WAL if this was the last connection.
}

/// Most failed batches remembered for [`Request::Commit::after`]: a batch
/// that depends on one forgotten is refused too (fail closed). Failures are
/// rare, and a dependent batch follows its predecessor closely.
pub const MAX_FAILURES: usize = 4096;

/// The batches that were not committed, for batches that depend on them.
#[derive(Debug, Default)]
struct Failures {
    failed: std::collections::BTreeSet<Ticket>,
    /// Every ticket below this one that is not in `failed` may have failed
    /// too: it was forgotten.
    forgotten_below: Ticket,
}

impl Failures {
    fn fail(&mut self, ticket: Ticket) {
        self.failed.insert(ticket);
        while self.failed.len() > MAX_FAILURES {
            if let Some(oldest) = self.failed.pop_first() {
                self.forgotten_below = self.forgotten_below.max(Ticket(oldest.0 + 1));
            }
        }
    }

    /// Whether a batch planned on `after` may go ahead.
    fn allows(&self, after: Option<Ticket>) -> bool {
        after.is_none_or(|t| t >= self.forgotten_below && !self.failed.contains(&t))
    }
}

/// A batch to apply, with where its outcome goes.
struct Batch {
    ops: Vec<Op>,
    reply: Reply,
    ticket: Ticket,
    after: Option<Ticket>,
}

/// Applies one group. Returns true when a [`Request::Close`] was seen.
fn process(
    conn: &mut Connection,
    group: &mut Vec<Request>,
    failures: &mut Failures,
    mirror: Option<&mut Mirror>,
) -> bool {
    let mut batches = Vec::new();
    let mut pings = Vec::new();
    let mut closing = false;
    for request in group.drain(..) {
        match request {
            Request::Commit {
                ops,
                reply,
                queued,
                ticket,
                after,
            } => {
                drop(queued);
                batches.push(Batch {
                    ops,
                    reply,
                    ticket,
                    after,
                });
            }
            Request::Ping { reply } => pings.push(reply),
            Request::Close => closing = true,
        }
    }
    if !batches.is_empty() {
        commit_group(conn, batches, failures, mirror);
    }
    for reply in pings {
        let result = conn
            .query_row("SELECT count(*) FROM schema_migrations", [], |row| {
                row.get::<_, i64>(0)
            })
            .map(drop)
            .map_err(|e| sql_error("ping", &e));
        // A caller that stopped waiting does not need the answer.
        let _ = reply.send(result);
    }
    closing
}

type Reply = oneshot::Sender<Result<Committed>>;

/// How a batch failed.
struct Failed {
    /// What the caller is told.
    error: StoreError,
    /// False when the enclosing transaction did not survive the failure, so
    /// every batch of the group is lost.
    group_intact: bool,
}

fn commit_group(
    conn: &mut Connection,
    batches: Vec<Batch>,
    failures: &mut Failures,
    mirror: Option<&mut Mirror>,
) {
    if let Err(e) = control(conn, "BEGIN IMMEDIATE") {
        let error = sql_error("begin", &e);
        for batch in batches {
            failures.fail(batch.ticket);
            let _ = batch
                .reply
                .send(Err(StoreError::Unavailable(error.to_string())));
        }
        return;
    }

    // Replies wait here until COMMIT succeeded: nothing is acknowledged
    // before it is durable.
    let mut applied: Vec<(Reply, Committed, Ticket)> = Vec::with_capacity(batches.len());
    let mut lost: Option<String> = None;
    // The mirror's lines of the applied batches, in commit order.
    let mut lines: Option<Vec<Line>> = mirror.is_some().then(Vec::new);
    for batch in batches {
        let Batch {
            ops,
            reply,
            ticket,
            after,
        } = batch;
        if let Some(why) = &lost {
            failures.fail(ticket);
            let _ = reply.send(Err(StoreError::Unavailable(why.clone())));
            continue;
        }
        if !failures.allows(after) {
            failures.fail(ticket);
            let _ = reply.send(Err(StoreError::Conflict(DEPENDENCY_FAILED.to_owned())));
            continue;
        }
        match apply_batch(conn, ops, lines.as_mut()) {
            Ok(committed) => applied.push((reply, committed, ticket)),
            Err(Failed {
                error,
                group_intact,
            }) => {
                if !group_intact {
                    lost = Some(format!("transaction aborted: {error}"));
                }
                // Rolled back either way: the outcome is final.
                failures.fail(ticket);
                let _ = reply.send(Err(error));
            }
        }
    }

    let outcome = match lost {
        Some(why) => Err(why),
        None => control(conn, "COMMIT").map_err(|e| format!("commit: {e}")),
    };
    match outcome {
        Ok(()) => {
            for (reply, committed, _) in applied {
                let _ = reply.send(Ok(committed));
            }
            // After the replies: the mirror never delays an acknowledgement,
            // and its failure cannot undo one.
            if let (Some(mirror), Some(lines)) = (mirror, lines) {
                mirror.committed(&lines);
            }
        }
        Err(why) => {
            if !conn.is_autocommit() {
                // Nothing to do if this fails too: the next BEGIN will fail
                // and report it.
                let _ = control(conn, "ROLLBACK");
            }
            for (reply, _, ticket) in applied {
                failures.fail(ticket);
                let _ = reply.send(Err(StoreError::Unavailable(why.clone())));
            }
        }
    }
}

/// Runs one transaction-control statement (`BEGIN IMMEDIATE`, `SAVEPOINT
/// batch`, `COMMIT`, …) from the connection's statement cache: these run
/// several times per call, and parsing them anew each time was a
/// measurable share of the writer's work.
fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Applies one batch inside its own savepoint, so that its failure undoes
/// only its own ops. Its mirror lines go to `lines` (none if it fails).
fn apply_batch(
    conn: &Connection,
    ops: Vec<Op>,
    mut lines: Option<&mut Vec<Line>>,
) -> std::result::Result<Committed, Failed> {
    control(conn, "SAVEPOINT batch").map_err(|e| Failed {
        error: sql_error("savepoint", &e),
        group_intact: false,
    })?;
    let mark = lines.as_ref().map_or(0, |lines| lines.len());
    let mut committed = Committed::default();
    for op in ops {
        if let Err(error) = apply(conn, op, &mut committed, lines.as_deref_mut()) {
            if let Some(lines) = lines {
                lines.truncate(mark);
            }
            // INVARIANT: a failed batch leaves no trace, including no
            // consumed audit seq (sqlite_sequence is rolled back with it).
            let undone =
                control(conn, "ROLLBACK TO batch").and_then(|()| control(conn, "RELEASE batch"));
            let group_intact = undone.is_ok() && !conn.is_autocommit();
            return Err(Failed {
                error,
                group_intact,
            });
        }
    }
    control(conn, "RELEASE batch").map_err(|e| Failed {
        error: sql_error("release savepoint", &e),
        group_intact: false,
    })?;
    Ok(committed)
}

fn apply(
    conn: &Connection,
    op: Op,
    committed: &mut Committed,
    lines: Option<&mut Vec<Line>>,
) -> Result<()> {
    match op {
        Op::InsertTask(record) => {
            let row = TaskRow::encode(&record)?;
            conn.prepare_cached(
                "INSERT INTO tasks (id, agent_id, agent_type, state, status, version, deadline, \
                 started_at, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    row.id,
                    row.agent_id,
                    row.agent_type,
                    row.state,
                    row.status,
                    row.version,
                    row.deadline,
                    row.started_at,
                    row.body
                ])
            })
            .map_err(|e| sql_error(&format!("insert task {:?}", row.id), &e))?;
        }
        Op::UpdateTask {
            record,
            expected_version,
        } => {
            let id = &record.task.id;
            if record.task.version <= expected_version {
                return Err(StoreError::Conflict(format!(
                    "update task {id:?}: new version {} must be greater than expected version \
                     {expected_version}",
                    record.task.version
                )));
            }
            let expected = to_int("expected version", expected_version)?;
            let row = TaskRow::encode(&record)?;
            let changed = conn
                .prepare_cached(
                    "UPDATE tasks SET agent_id = ?2, agent_type = ?3, state = ?4, status = ?5, \
                     version = ?6, deadline = ?7, started_at = ?8, body = ?9 \
                     WHERE id = ?1 AND version = ?10",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        row.id,
                        row.agent_id,
                        row.agent_type,
                        row.state,
                        row.status,
                        row.version,
                        row.deadline,
                        row.started_at,
                        row.body,
                        expected
                    ])
                })
                .map_err(|e| sql_error(&format!("update task {id:?}"), &e))?;
            if changed == 0 {
                let stored: Option<i64> = conn
                    .query_row("SELECT version FROM tasks WHERE id = ?1", [id], |row| {
                        row.get(0)
                    })
                    .optional()
                    .map_err(|e| sql_error(&format!("update task {id:?}"), &e))?;
                return Err(StoreError::Conflict(match stored {
                    None => format!("update task {id:?}: no such task"),
                    Some(version) => format!(
                        "update task {id:?}: stored version is {version}, not {expected_version}"
                    ),
                }));
            }
        }
        Op::InsertToken(token) => {
            let issued_at = to_int("token issued_at", token.issued_at.0)?;
            let expires_at = to_int("token expires_at", token.expires_at.0)?;
            let revoked_at = token
                .revoked_at
                .map(|at| to_int("token revoked_at", at.0))
                .transpose()?;
            conn.prepare_cached(
                "INSERT INTO tokens (jti, task_id, agent_id, kind, issued_at, expires_at, \
                 revoked_at, revoke_reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    token.jti,
                    token.task_id,
                    token.agent_id,
                    token.kind.as_str(),
                    issued_at,
                    expires_at,
                    revoked_at,
                    token.revoke_reason
                ])
            })
            .map_err(|e| {
                sql_error(
                    &format!("insert token {:?} of task {:?}", token.jti, token.task_id),
                    &e,
                )
            })?;
        }
        Op::RevokeToken { jti, at, reason } => {
            let at = to_int("revoked_at", at.0)?;
            let changed = conn
                .prepare_cached(
                    "UPDATE tokens SET revoked_at = ?2, revoke_reason = ?3 \
                     WHERE jti = ?1 AND revoked_at IS NULL",
                )
                .and_then(|mut stmt| stmt.execute(params![jti, at, reason]))
                .map_err(|e| sql_error(&format!("revoke token {jti:?}"), &e))?;
            if changed > 0 {
                committed.revoked.push(jti);
            }
        }
        Op::RevokeTaskTokens {
            task_id,
            at,
            reason,
        } => {
            let at = to_int("revoked_at", at.0)?;
            let context = || format!("revoke tokens of task {task_id:?}");
            let mut revoked = conn
                .prepare_cached(
                    "UPDATE tokens SET revoked_at = ?2, revoke_reason = ?3 \
                     WHERE task_id = ?1 AND revoked_at IS NULL RETURNING jti",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(params![task_id, at, reason], |row| row.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(|e| sql_error(&context(), &e))?;
            // RETURNING order is unspecified; keep the reply deterministic.
            revoked.sort_unstable();
            committed.revoked.extend(revoked);
            conn.prepare_cached(
                "UPDATE refresh_tokens SET spent_at = ?2 WHERE task_id = ?1 AND spent_at IS NULL",
            )
            .and_then(|mut stmt| stmt.execute(params![task_id, at]))
            .map_err(|e| sql_error(&context(), &e))?;
        }
        Op::InsertRefresh(refresh) => {
            let issued_at = to_int("refresh issued_at", refresh.issued_at.0)?;
            let idle_expires_at = to_int("refresh idle_expires_at", refresh.idle_expires_at.0)?;
            let spent_at = refresh
                .spent_at
                .map(|at| to_int("refresh spent_at", at.0))
                .transpose()?;
            conn.prepare_cached(
                "INSERT INTO refresh_tokens (hash, task_id, agent_id, issued_at, \
                 idle_expires_at, spent_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    refresh.hash,
                    refresh.task_id,
                    refresh.agent_id,
                    issued_at,
                    idle_expires_at,
                    spent_at
                ])
            })
            .map_err(|e| {
                sql_error(
                    &format!("insert refresh token of task {:?}", refresh.task_id),
                    &e,
                )
            })?;
        }
        Op::SpendRefresh { hash, at } => {
            let at = to_int("spent_at", at.0)?;
            let found: Option<(String, i64, Option<i64>)> = conn
                .prepare_cached(
                    "SELECT task_id, idle_expires_at, spent_at FROM refresh_tokens WHERE hash = ?1",
                )
                .and_then(|mut stmt| {
                    stmt.query_row([&hash], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                        .optional()
                })
                .map_err(|e| sql_error("spend refresh token", &e))?;
            let Some((task_id, idle_expires_at, spent_at)) = found else {
                return Err(StoreError::RefreshUnknown);
            };
            if spent_at.is_some() {
                return Err(StoreError::RefreshSpent { task_id });
            }
            if idle_expires_at <= at {
                return Err(StoreError::RefreshExpired { task_id });
            }
            conn.prepare_cached("UPDATE refresh_tokens SET spent_at = ?2 WHERE hash = ?1")
                .and_then(|mut stmt| stmt.execute(params![hash, at]))
                .map_err(|e| sql_error("spend refresh token", &e))?;
        }
        Op::Append(event) => {
            let (seq, json) = append_event(conn, event)?;
            committed.seqs.push(seq);
            if let Some(lines) = lines {
                lines.push(Line::Record { seq, json });
            }
        }
        Op::AppendCheckpoint(checkpoint) => {
            let inserted = append_checkpoint(conn, &checkpoint)?;
            if let Some(lines) = lines.filter(|_| inserted) {
                lines.push(Line::Checkpoint(checkpoint));
            }
        }
        Op::PruneAudit {
            after_seq,
            through_seq,
        } => prune_audit(conn, after_seq, through_seq)?,
        Op::InsertElevation(record) => {
            check_new_elevation(&record)?;
            let requested_at = to_int("elevation requested_at", record.requested_at.0)?;
            conn.prepare_cached(
                "INSERT INTO elevations (id, task_id, agent_id, tool, reason, status, \
                 requested_at, held) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    record.id,
                    record.task_id,
                    record.agent_id,
                    record.tool,
                    record.reason,
                    ElevationStatus::Pending.as_str(),
                    requested_at,
                    record.held.as_ref().and_then(HeldCall::encode)
                ])
            })
            .map_err(|e| {
                sql_error(
                    &format!(
                        "insert elevation {:?} of task {:?}",
                        record.id, record.task_id
                    ),
                    &e,
                )
            })?;
        }
        Op::CapPendingElevations { task_id, max } => {
            // The writer is the only one: the count and the insert after it
            // cannot interleave with another batch.
            let pending: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM elevations WHERE task_id = ?1 AND status = ?2",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![task_id, ElevationStatus::Pending.as_str()], |row| {
                        row.get(0)
                    })
                })
                .map_err(|e| sql_error(&format!("count pending elevations of {task_id:?}"), &e))?;
            if pending >= i64::from(max) {
                return Err(StoreError::TooManyPending { task_id, max });
            }
        }
        Op::DecideElevation {
            id,
            status,
            by,
            at,
            note,
            expires_at,
        } => decide_elevation(conn, &id, status, &by, at, note, expires_at)?,
        Op::RecordToolUse { agent_id, tool, at } => {
            let at = to_int("tool use at", at.0)?;
            conn.prepare_cached(
                "INSERT INTO agent_tools (agent_id, tool, first_used) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (agent_id, tool) DO NOTHING",
            )
            .and_then(|mut stmt| stmt.execute(params![agent_id, tool, at]))
            .map_err(|e| sql_error("record tool use", &e))?;
        }
        Op::PinTool(pin) => {
            let definition = check_pin(&pin)?;
            let pinned_at = to_int("pin pinned_at", pin.pinned_at.0)?;
            conn.prepare_cached(
                "INSERT INTO tool_pins (tool, upstream, hash, definition, pinned_at, \
                 approved_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (tool) DO UPDATE SET upstream = excluded.upstream, \
                 hash = excluded.hash, definition = excluded.definition, \
                 pinned_at = excluded.pinned_at, approved_by = excluded.approved_by",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    pin.tool,
                    pin.upstream,
                    pin.hash,
                    definition,
                    pinned_at,
                    pin.approved_by
                ])
            })
            .map_err(|e| sql_error(&format!("pin tool {:?}", pin.tool), &e))?;
        }
    }
    Ok(())
}

/// [`Op::Append`]: the next seq and the chain head are read inside the
/// current transaction (and savepoint), so a rolled-back batch or a failed
/// group leaves nothing behind, and the chain continues across restarts
/// from whatever the database holds. Returns the seq and the stored JSON.
fn append_event(conn: &Connection, event: NewEvent) -> Result<(u64, String)> {
    let ts = to_int("event ts", event.ts.0)?;
    // What AUTOINCREMENT would pick: above the highest seq ever used, even
    // if the newest rows were deleted since.
    let high_water: i64 = conn
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)).optional())
        .map_err(|e| sql_error("append audit event: read the seq", &e))?
        .unwrap_or(0);
    let last: Option<(i64, String)> = conn
        .prepare_cached("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
        .and_then(|mut stmt| {
            stmt.query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()
        })
        .map_err(|e| sql_error("append audit event: read the chain head", &e))?;
    let (last_seq, prev_hash) = last.unwrap_or_else(|| (0, chain::GENESIS.to_owned()));
    let seq = high_water
        .max(last_seq)
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("audit seq exhausted".into()))?;
    let mut record = AuditEvent {
        seq: u64::try_from(seq)
            .map_err(|_| StoreError::Corrupt(format!("audit seq is negative: {seq}")))?,
        event,
        prev_hash,
        hash: String::new(),
    };
    let json = chain::seal(&mut record);
    conn.prepare_cached(
        "INSERT INTO audit_events (seq, ts, kind, task_id, event, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            seq,
            ts,
            record.event.kind.as_str(),
            record.event.task_id,
            json,
            record.prev_hash,
            record.hash
        ])
    })
    .map_err(|e| sql_error("append audit event", &e))?;
    Ok((record.seq, json))
}

/// [`Op::AppendCheckpoint`]: only of a stored record, with its hash; the
/// same checkpoint again is a no-op, a different one of the same seq a
/// conflict. Returns true when it was stored now (false for the no-op).
fn append_checkpoint(conn: &Connection, checkpoint: &Checkpoint) -> Result<bool> {
    let row = RawCheckpoint::encode(checkpoint)?;
    let context = || format!("append checkpoint of seq {}", checkpoint.seq);
    let stored: Option<String> = conn
        .prepare_cached("SELECT hash FROM audit_events WHERE seq = ?1")
        .and_then(|mut stmt| stmt.query_row([row.seq], |r| r.get(0)).optional())
        .map_err(|e| sql_error(&context(), &e))?;
    match stored {
        None => return Err(StoreError::Conflict(CHECKPOINT_NO_SUCH_RECORD.to_owned())),
        Some(hash) if hash != row.hash => {
            return Err(StoreError::Conflict(CHECKPOINT_HASH_MISMATCH.to_owned()));
        }
        Some(_) => {}
    }
    let inserted = conn
        .prepare_cached(
            "INSERT INTO checkpoints (seq, hash, ts, kid, sig) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (seq) DO NOTHING",
        )
        .and_then(|mut stmt| stmt.execute(params![row.seq, row.hash, row.ts, row.kid, row.sig]))
        .map_err(|e| sql_error(&context(), &e))?;
    if inserted > 0 {
        return Ok(true);
    }
    let existing = conn
        .prepare_cached(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE seq = ?1"
        ))
        .and_then(|mut stmt| {
            stmt.query_row([row.seq], RawCheckpoint::from_row)
                .optional()
        })
        .map_err(|e| sql_error(&context(), &e))?;
    if existing.as_ref() == Some(&row) {
        Ok(false)
    } else {
        Err(StoreError::Conflict(CHECKPOINT_EXISTS.to_owned()))
    }
}

/// [`Op::PruneAudit`]: checks where the stored log starts and ends and that
/// a checkpoint covers `through_seq`, then deletes the records and the
/// checkpoints below it.
fn prune_audit(conn: &Connection, after_seq: u64, through_seq: u64) -> Result<()> {
    let context = || format!("prune audit records {}..={through_seq}", after_seq + 1);
    let span = check_prune_span(after_seq, through_seq)?;
    let (after, through) = (
        to_int("prune after_seq", span.0)?,
        to_int("prune through_seq", span.1)?,
    );
    let (oldest, newest): (Option<i64>, Option<i64>) = conn
        .prepare_cached("SELECT MIN(seq), MAX(seq) FROM audit_events")
        .and_then(|mut stmt| stmt.query_row([], |row| Ok((row.get(0)?, row.get(1)?))))
        .map_err(|e| sql_error(&context(), &e))?;
    let anchored: Option<i64> = conn
        .prepare_cached(
            "SELECT 1 FROM checkpoints c JOIN audit_events e ON e.seq = c.seq \
             WHERE c.seq = ?1 AND c.hash = e.hash",
        )
        .and_then(|mut stmt| stmt.query_row([through], |row| row.get(0)).optional())
        .map_err(|e| sql_error(&context(), &e))?;
    check_prune_bounds(after, through, oldest, newest, anchored.is_some())?;
    for sql in [
        "DELETE FROM audit_events WHERE seq <= ?1",
        "DELETE FROM checkpoints WHERE seq < ?1",
    ] {
        conn.prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute([through]))
            .map_err(|e| sql_error(&context(), &e))?;
    }
    Ok(())
}

/// [`Op::DecideElevation`]: one conditional update, so that of two
/// decisions on one request only the first applied finds it pending.
fn decide_elevation(
    conn: &Connection,
    id: &str,
    status: ElevationStatus,
    by: &str,
    at: portcullis_core::Timestamp,
    note: Option<String>,
    expires_at: Option<portcullis_core::Timestamp>,
) -> Result<()> {
    check_decision(id, status, at, expires_at)?;
    let decided_at = to_int("elevation decided_at", at.0)?;
    let expires_at = expires_at
        .map(|at| to_int("elevation expires_at", at.0))
        .transpose()?;
    let context = || format!("decide elevation {id:?}");
    let changed = conn
        .prepare_cached(
            "UPDATE elevations SET status = ?2, decided_at = ?3, decided_by = ?4, note = ?5, \
             expires_at = ?6 \
             WHERE id = ?1 AND status = 'pending' AND (?2 <> 'approved' OR agent_id <> ?4)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                id,
                status.as_str(),
                decided_at,
                by,
                note,
                expires_at
            ])
        })
        .map_err(|e| sql_error(&context(), &e))?;
    if changed > 0 {
        return Ok(());
    }
    // Nothing changed: say why.
    let stored: Option<String> = conn
        .prepare_cached("SELECT status FROM elevations WHERE id = ?1")
        .and_then(|mut stmt| stmt.query_row([id], |row| row.get(0)).optional())
        .map_err(|e| sql_error(&context(), &e))?;
    Err(StoreError::Conflict(match stored {
        None => NO_SUCH_ELEVATION.to_owned(),
        Some(stored) if stored != ElevationStatus::Pending.as_str() => {
            ELEVATION_ALREADY_DECIDED.to_owned()
        }
        // Still pending, so the update's last condition refused it.
        Some(_) => format!(
            "{}: an agent cannot approve its own elevation request",
            context()
        ),
    }))
}
