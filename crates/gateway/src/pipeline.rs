//! The call path after authentication, one step per function, in the order
//! of DESIGN section 1:
//!
//! ```text
//! bind (task_mismatch) → load task (task_not_active) → token scope (tool_not_granted)
//! → engine: ACL, state, budgets, args, Cedar → per-hop credential
//! → write-ahead record (committed with the task update, compare-and-swap)
//! → forward → record the outcome
//! ```
//!
//! The write-ahead record and the task update are one ledger transaction:
//! a call is either recorded and counted, or neither. A lost race on the
//! task's version re-runs the decision on the fresh task (bounded retries).

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use portcullis_config::AnomalyAction;
use portcullis_core::plan::{AlertKind, Plan, Step};
use portcullis_core::{Decision, Reason, Task, TaskStatus, Timestamp, plan};
use portcullis_store::{
    EventKind, HeldCall, NewEvent, Op, Pending, StoreError, TaskRecord, Ticket, records,
};
use portcullis_token::Claims;
use serde_json::Value;

use crate::credential::{HopRequest, ProviderError};
use crate::error::ApiError;
use crate::state::{CommitError, Gateway, internal};
use crate::upstream::UpstreamCall;

/// Longest an upstream call may take.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest each ledger-bound step before forwarding may take:
/// authentication (the token's ledger record, when it is not cached as
/// live), and the decision (waiting for the task's lock, loading the task,
/// committing the write-ahead record, minting the per-hop credential).
/// Past it the request fails closed (503 `internal_error`) instead of
/// waiting out the store's own timeouts (PostgreSQL's `operation_timeout`,
/// 30 s per operation) on a ledger that hangs. A write-ahead commit already
/// queued may still land afterwards: the call is then recorded as allowed,
/// counted, and never forwarded (it has no `call.completed` record), as for
/// any commit whose outcome its caller did not see.
pub const LEDGER_DEADLINE: Duration = Duration::from_secs(5);

/// The end of a [`LEDGER_DEADLINE`] starting now.
pub(crate) fn ledger_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + LEDGER_DEADLINE
}

/// Runs `step` until `deadline` (see [`ledger_deadline`]); past it, 503
/// `internal_error` saying that the ledger did not answer in time for
/// `what`.
pub(crate) async fn within_deadline<T>(
    what: &str,
    deadline: tokio::time::Instant,
    step: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout_at(deadline, step)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::unavailable(format!(
                "the ledger did not answer within {LEDGER_DEADLINE:?} ({what})"
            )))
        })
}

/// What a use of a tool is, for the one pipeline that decides them all.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Use<'a> {
    /// A call with these arguments; with `forward`, the per-hop credential
    /// to forward it with is minted too.
    Call { args: &'a Value, forward: bool },
    /// A token exchange (RFC 8693) for a per-hop token of `upstream`: the
    /// agent calls the upstream itself, with arguments the gateway never
    /// sees. Decided like a call — scope, ACL, state, budgets, approvals,
    /// anomaly rules — except that the arguments are unknown
    /// ([`portcullis_core::Engine::decide_exchange`]); counted and recorded
    /// like one.
    Exchange { upstream: &'a str },
}

impl Use<'_> {
    /// The arguments to record: none for an exchange.
    fn args(&self) -> &Value {
        match self {
            Use::Call { args, .. } => args,
            Use::Exchange { .. } => &Value::Null,
        }
    }

    /// What a one-use approval of this use is bound to: for a call, the
    /// digest of its redacted arguments ([`crate::state::args_digest`]);
    /// for an exchange, a digest of the upstream it is for (domain
    /// separated: the hashed text is never the canonical JSON of any
    /// arguments).
    fn digest(&self, redact: &[String]) -> String {
        match self {
            Use::Call { args, .. } => crate::state::args_digest(args, redact),
            Use::Exchange { upstream } => {
                portcullis_token::sha256_hex(format!("token exchange\n{upstream}").as_bytes())
            }
        }
    }

    /// The use as the planner sees it.
    fn planned(&self) -> plan::Use<'_> {
        match self {
            Use::Call { args, .. } => plan::Use::Call(args),
            Use::Exchange { upstream } => plan::Use::Exchange(upstream),
        }
    }

    /// The call an approver is asked about when rule `rule` holds this use.
    fn held(&self, rule: &str, redact: &[String]) -> HeldCall {
        HeldCall {
            rule: rule.to_owned(),
            args_digest: Some(self.digest(redact)),
            args: match self {
                Use::Call { args, .. } => {
                    Some(crate::state::bounded(crate::state::redact(args, redact)))
                }
                Use::Exchange { upstream } => {
                    Some(serde_json::json!({ "token_exchange": upstream }))
                }
            },
        }
    }
}

/// A call that passed every check and is recorded, ready to forward.
#[derive(Debug)]
pub(crate) struct Authorized {
    pub task: Task,
    pub decision: Decision,
    /// A new access token, when the call entered a `reverify` state.
    pub rotated: Option<Rotation>,
    /// Where and with what to forward (only when forwarding).
    pub forward: Option<(String, UpstreamCall)>,
    /// The per-hop token of a token exchange, and its lifetime in seconds.
    pub exchanged: Option<(String, u64)>,
}

/// A decided use whose records are queued for commit (or, for a denial
/// that changed the task, committed already: no `pending`).
struct Queued {
    pending: Option<Pending>,
    then: Then,
}

/// A task's cached state ([`crate::task_locks::Slot::planned`]) as the
/// attempts of one call share it.
type Planned = std::sync::Mutex<Option<(TaskRecord, Option<Ticket>)>>;

/// What to answer once a use's records are durable.
enum Then {
    Allowed {
        done: Box<Authorized>,
        /// The per-hop token to keep for reuse once it is on record.
        reuse: Option<crate::credential::Reusable>,
    },
    Denied {
        answer: ApiError,
        reason: Reason,
    },
}

/// How an attempt at a use ended when it did not allow it.
#[derive(Debug)]
enum Attempt {
    /// The answer to give: a denial, or 503.
    Answer(ApiError),
    /// Its commit lost a compare-and-swap: nothing of it was recorded or
    /// forwarded, and the task's cached state is dropped.
    Lost(StoreError),
}

impl Attempt {
    fn into_answer(self) -> ApiError {
        match self {
            Attempt::Answer(e) => e,
            Attempt::Lost(e) => ApiError::unavailable(format!(
                "the call was decided on a change of the task that was not recorded ({e}); try again"
            )),
        }
    }
}

/// Step: the token's task must be the task named in the request.
pub(crate) fn bind(claims: &Claims, task_id: &str) -> Result<(), ApiError> {
    if claims.task_id == task_id {
        Ok(())
    } else {
        Err(ApiError::denied(
            Reason::TaskMismatch,
            "the token belongs to another task",
        ))
    }
}

impl Gateway {
    /// Step: the task, which must exist and be within its lifetime.
    pub(crate) async fn load_task(&self, task_id: &str) -> Result<TaskRecord, ApiError> {
        let record = self
            .store
            .task(task_id)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
            .ok_or_else(|| ApiError::denied(Reason::TaskNotActive, "no such task"))?;
        self.live_task(record)
    }

    /// The task, unless it is active and past its lifetime.
    fn live_task(&self, record: TaskRecord) -> Result<TaskRecord, ApiError> {
        if record.task.status == TaskStatus::Active && self.now() >= record.deadline {
            return Err(ApiError::denied(
                Reason::TaskNotActive,
                "task passed its maximum lifetime",
            ));
        }
        Ok(record)
    }

    /// Decides a call, records it ahead of any forwarding, and applies it
    /// to the task. With `forward`, also mints the per-hop credential.
    /// Within [`LEDGER_DEADLINE`], or 503 `internal_error`.
    pub(crate) async fn authorize(
        &self,
        claims: &Claims,
        task_id: &str,
        tool: &str,
        args: &Value,
        forward: bool,
    ) -> Result<Authorized, ApiError> {
        self.decide_use(claims, task_id, tool, Use::Call { args, forward })
            .await
    }

    /// Decides a use of `tool` — a call, or a token exchange — records it,
    /// and applies it to the task: the one path both take. Within
    /// [`LEDGER_DEADLINE`], or 503 `internal_error`.
    pub(crate) async fn decide_use(
        &self,
        claims: &Claims,
        task_id: &str,
        tool: &str,
        use_: Use<'_>,
    ) -> Result<Authorized, ApiError> {
        within_deadline(
            "deciding and recording the call",
            ledger_deadline(),
            self.authorize_now(claims, task_id, tool, use_),
        )
        .await
    }

    /// [`Gateway::attempt_use`], once more when its commit lost a
    /// compare-and-swap: the state it was planned on was not the ledger's
    /// (another writer changed the task, or a commit it was chained to
    /// failed). Nothing of the lost attempt was recorded or forwarded; the
    /// second attempt is planned on the task read afresh.
    async fn authorize_now(
        &self,
        claims: &Claims,
        task_id: &str,
        tool: &str,
        use_: Use<'_>,
    ) -> Result<Authorized, ApiError> {
        match self.attempt_use(claims, task_id, tool, use_).await {
            Err(Attempt::Lost(_)) => {}
            done => return done.map_err(Attempt::into_answer),
        }
        self.attempt_use(claims, task_id, tool, use_)
            .await
            .map_err(Attempt::into_answer)
    }

    /// Plans a use on the task's cached state (or the ledger's), queues
    /// its records, and waits until they are durable.
    async fn attempt_use(
        &self,
        claims: &Claims,
        task_id: &str,
        tool: &str,
        use_: Use<'_>,
    ) -> Result<Authorized, Attempt> {
        // INVARIANT: the `bind_task` layer has bound `claims` to `task_id`.
        let mut guard = self.task_locks.lock(task_id).await;
        self.drain_if_poisoned(&mut guard)
            .await
            .map_err(Attempt::Answer)?;
        // The attempts share the slot's cached state (never locked across
        // an await).
        let slot = std::sync::Mutex::new(guard.planned.take());
        let queued = self
            .retry_on_conflict(|| self.plan_and_queue(claims, task_id, tool, use_, &slot))
            .await;
        guard.planned = slot.into_inner().unwrap_or_else(PoisonError::into_inner);
        let queued = match queued {
            Ok(q) => q,
            Err(e) => {
                guard.planned = None;
                return Err(Attempt::Answer(e));
            }
        };
        // The next call of the task is planned on what this one queued,
        // while this one waits for its commit (the write-ahead record must
        // be durable before anything is forwarded).
        let pin = guard.unlock();
        let outcome = match queued.pending {
            Some(pending) => {
                let started = Instant::now();
                let done = pending.await;
                self.settle(started, done).map(drop)
            }
            None => Ok(()),
        };
        match (outcome, queued.then) {
            (Ok(()), Then::Allowed { done, reuse }) => {
                // The per-hop token is on record now: later calls of the
                // same access token may reuse it.
                if let Some(r) = reuse {
                    r.keep();
                }
                self.metrics.decision(None);
                Ok(*done)
            }
            (Ok(()), Then::Denied { answer, reason }) => {
                self.metrics.decision(Some(reason));
                tracing::info!(task_id, tool, reason = reason.as_str(), "call denied");
                Err(Attempt::Answer(answer))
            }
            (Err(e), then) => {
                // Whatever was planned on this commit is refused by the
                // writer; the next call reads the task afresh.
                pin.poison();
                if let Then::Allowed { done, .. } = &then
                    && self.engine.anomaly().watches_new_tools()
                {
                    self.forget_tool_use(&done.task.agent_id, &done.decision.tool);
                }
                Err(match e {
                    StoreError::Conflict(_) => Attempt::Lost(e),
                    e => Attempt::Answer(ApiError::unavailable(e.to_string())),
                })
            }
        }
    }

    /// Under the task's lock: when a commit queued from it failed, waits
    /// until the writer has applied everything queued before now, and
    /// forgets the cached state, so that the task is read afresh.
    pub(crate) async fn drain_if_poisoned(
        &self,
        guard: &mut crate::task_locks::TaskGuard<'_>,
    ) -> Result<(), ApiError> {
        if guard.take_poison() {
            guard.planned = None;
            within_deadline("draining the ledger's queue", ledger_deadline(), async {
                self.store
                    .settled()
                    .await
                    .map_err(|e| ApiError::unavailable(e.to_string()))
            })
            .await?;
        }
        Ok(())
    }

    /// Takes the lock of a task for a change that is not a call (a
    /// transition, an end, a resume, an approval): waits until every
    /// commit this process queued for the task is applied, and drops the
    /// cached state, so that the change reads the task as the ledger has
    /// it and the next call reads it afresh after the change.
    pub(crate) async fn lock_task_for_change(
        &self,
        task_id: &str,
    ) -> Result<crate::task_locks::TaskGuard<'_>, ApiError> {
        let mut guard = self.task_locks.lock(task_id).await;
        let poisoned = guard.take_poison();
        if guard.planned.take().is_some() || poisoned {
            self.store
                .settled()
                .await
                .map_err(|e| ApiError::unavailable(e.to_string()))?;
        }
        Ok(guard)
    }

    /// The task's state for the next call: the cached state the queued
    /// commits will leave, or the ledger's; with the ticket of the commit
    /// it was planned on, if that may still be queued.
    async fn task_for_call(
        &self,
        task_id: &str,
        cached: Option<(TaskRecord, Option<Ticket>)>,
    ) -> Result<(TaskRecord, Option<Ticket>), ApiError> {
        match cached {
            Some((record, after)) => Ok((self.live_task(record)?, after)),
            None => Ok((self.load_task(task_id).await?, None)),
        }
    }

    /// Decides a use and queues its records: the part of a call that holds
    /// the task's lock. Planned on the cached state when there is one
    /// (chained to the commit that produces it); leaves in the slot the
    /// state its own records produce.
    async fn plan_and_queue(
        &self,
        claims: &Claims,
        task_id: &str,
        tool: &str,
        use_: Use<'_>,
        slot: &Planned,
    ) -> Result<Queued, CommitError> {
        // Taken, not copied: the slot gets the state this call leaves, or
        // nothing when it fails.
        let cached = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        let cached_after = cached.as_ref().and_then(|(_, t)| *t);
        let (record, after) = match self.task_for_call(task_id, cached).await {
            Ok(r) => r,
            Err(e) if e.reason() == Some(Reason::TaskNotActive) => {
                // A task that is gone or past its lifetime: still an
                // attempt, still recorded.
                let mut event = NewEvent::new(self.now(), EventKind::CallDenied);
                event.task_id = Some(task_id.to_owned());
                event.agent_id = Some(claims.sub.clone());
                event.tool = Some(portcullis_core::bounded_tool_name(tool));
                event.decision = Some("deny".to_owned());
                event.reason = Some(Reason::TaskNotActive.as_str().to_owned());
                event.detail = Some(e.detail().to_owned());
                // The slot stays empty: the next call reads the ledger.
                self.commit_after(vec![Op::Append(event)], cached_after)
                    .await?;
                return Ok(Queued {
                    pending: None,
                    then: Then::Denied {
                        answer: e,
                        reason: Reason::TaskNotActive,
                    },
                });
            }
            Err(e) => return Err(e.into()),
        };
        let now = self.now();
        // The one fact the planner needs from the ledger: whether the
        // agent ever had this tool allowed (for the `new_tool` rule).
        let first_use = self.engine.anomaly().watches_new_tools()
            && self.engine.tool(tool).is_some()
            && !self.agent_used_tool(&record.task.agent_id, tool).await?;
        let redact = &self.settings.redact;
        let digest = || use_.digest(redact);
        let input = plan::Input {
            task: &record.task,
            tool,
            use_: use_.planned(),
            forward: matches!(use_, Use::Call { forward: true, .. }),
            scope: Some(&claims.scope),
            now,
            first_use,
            digest: &digest,
        };
        let started = std::time::Instant::now();
        let mut planned = self.engine.plan(&input);
        self.metrics.decision_latency.observe(started.elapsed());
        if planned.decision.reason == Some(Reason::ToolDefinitionChanged)
            && self.recheck_pin(tool).await
        {
            // An admin re-approved the definition the upstream has now.
            planned = self.engine.plan(&input);
        }
        let queued = if planned.decision.is_allowed() {
            self.queue_allowed(claims, &record, after, planned, use_, now)
                .await
        } else {
            self.queue_denial(&record, after, planned, use_, now).await
        };
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        match queued {
            Ok((queued, next)) => {
                *slot = self.store.writer_queue().then_some(next);
                Ok(queued)
            }
            Err(e) => {
                // The cached state may be what a commit that just failed
                // was planned on.
                *slot = None;
                Err(e)
            }
        }
    }

    /// Queues a plain denial (it changes nothing), or records one that
    /// changes the task, holds the call or fires a rule, before returning
    /// ([`Gateway::commit_denial`]). Returns it with the task's state after
    /// it.
    async fn queue_denial(
        &self,
        record: &TaskRecord,
        after: Option<Ticket>,
        planned: Plan,
        use_: Use<'_>,
        now: Timestamp,
    ) -> Result<(Queued, (TaskRecord, Option<Ticket>)), CommitError> {
        let reason = planned.decision.reason.unwrap_or(Reason::InternalError);
        if planned.task.is_none() && planned.fired.is_empty() {
            let event = self.use_event(&record.task, &planned.decision, use_, now);
            let queued = self
                .store
                .enqueue_after(vec![Op::Append(event)], after)
                .await?;
            let answer = ApiError::denied(reason, planned.decision.detail.clone())
                .with_policies(planned.decision.policy_ids.clone());
            return Ok((
                Queued {
                    pending: Some(queued.pending),
                    then: Then::Denied { answer, reason },
                },
                (record.clone(), after),
            ));
        }
        let (answer, task) = self
            .commit_denial(record, after, use_, now, planned)
            .await?;
        Ok((
            Queued {
                pending: None,
                then: Then::Denied { answer, reason },
            },
            (
                TaskRecord {
                    task,
                    deadline: record.deadline,
                },
                None,
            ),
        ))
    }

    /// Records a denial and what its plan adds — the anomalies, a halt,
    /// the held call's elevation request — in one transaction
    /// (compare-and-swap on the task when it changes), then sends the
    /// plan's alerts. Returns the answer for the caller and the task.
    async fn commit_denial(
        &self,
        record: &TaskRecord,
        after: Option<Ticket>,
        use_: Use<'_>,
        now: Timestamp,
        planned: Plan,
    ) -> Result<(ApiError, Task), CommitError> {
        let changed = planned.task.is_some();
        let task = planned.task_or(&record.task).clone();
        let decision = &planned.decision;
        let mut ops: Vec<Op> = Vec::new();
        // The held call's request, under the task's cap on pending requests
        // (a guard op: past the cap the batch fails and is retried without
        // it, so the denial is still on record).
        let mut request_ops = Vec::new();
        let mut elevation_id = None;
        for step in &planned.steps {
            match step {
                Step::Use => ops.push(Op::Append(self.use_event(
                    &record.task,
                    decision,
                    use_,
                    now,
                ))),
                Step::Anomaly(f) => ops.push(Op::Append(records::anomaly_event(
                    &task,
                    &decision.tool,
                    f,
                    now,
                ))),
                Step::Halt(why) => ops.extend(records::ending_ops(
                    &task,
                    why,
                    Some(Reason::AnomalyHalt),
                    now,
                )),
                Step::Hold { rule, reason } => {
                    let held = use_.held(rule, &self.settings.redact);
                    let (id, request) = crate::elevations::pending_request(
                        &task,
                        &decision.tool,
                        reason,
                        Some(held),
                        now,
                    )?;
                    request_ops.push(Op::CapPendingElevations {
                        task_id: task.id.clone(),
                        max: crate::elevations::MAX_PENDING_PER_TASK,
                    });
                    request_ops.extend(request);
                    elevation_id = Some(id);
                }
                Step::Transition(_) | Step::Rotate | Step::Credential | Step::FirstUse => {
                    return Err(CommitError::Api(internal(
                        "a denial was planned with the steps of an allowed call",
                    )));
                }
            }
        }
        if changed {
            ops.insert(
                0,
                Op::UpdateTask {
                    record: TaskRecord {
                        task: task.clone(),
                        deadline: record.deadline,
                    },
                    expected_version: record.task.version,
                },
            );
        }
        let mut not_filed = None;
        let mut with_request = ops.clone();
        with_request.extend(request_ops);
        let committed = match self.commit_after(with_request, after).await {
            Err(StoreError::TooManyPending { max, .. }) => {
                elevation_id = None;
                not_filed = Some(max);
                self.commit_after(ops, after).await
            }
            other => other,
        };
        match committed {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) if changed => return Err(CommitError::Lost),
            Err(e) => return Err(CommitError::Api(ApiError::unavailable(e.to_string()))),
        }
        let halted = planned.halted().is_some();
        if halted {
            self.release_task(&task.id);
        }
        // After the commit: the halt and the request stand whatever becomes
        // of the alerts.
        for plan::Alert { kind, fired: f } in &planned.alerts {
            self.alert(crate::alerts::Alert {
                kind: match kind {
                    AlertKind::TaskHalted => crate::alerts::TASK_HALTED,
                    AlertKind::ElevationRequested => crate::elevations::ELEVATION_REQUESTED,
                    AlertKind::Anomaly => crate::alerts::ANOMALY,
                },
                task_id: Some(task.id.clone()),
                agent_id: Some(task.agent_id.clone()),
                reason: Some(anomaly_reason(f.action).as_str().to_owned()),
                detail: Some(match &elevation_id {
                    Some(id) if f.action == AnomalyAction::RequireApproval => {
                        format!(
                            "rule {}: {}; elevation {id} awaits an approver",
                            f.rule, f.detail
                        )
                    }
                    _ => format!("rule {}: {}", f.rule, f.detail),
                }),
                ts: now.0,
            });
        }
        let reason = decision.reason.unwrap_or(Reason::InternalError);
        let mut detail = decision.detail.clone();
        if let Some(id) = &elevation_id {
            detail = format!("{detail}; held as elevation request {id}");
        }
        if let Some(max) = not_filed {
            detail = format!(
                "{detail}; not held: the task already has {max} pending elevation requests"
            );
        }
        if halted && reason != Reason::AnomalyHalt {
            detail = format!("{detail}; the task is now halted (anomaly rule denials)");
        }
        let mut answer =
            ApiError::denied(reason, detail).with_policies(decision.policy_ids.clone());
        if let Some(id) = elevation_id {
            answer = answer.with_elevation(id);
        }
        Ok((answer, task))
    }

    /// The audit record of a decided use: a call's, and for an exchange
    /// the same kind of record (`call.allowed`/`call.denied`: it is a use
    /// of the tool) without arguments, saying it was an exchange.
    fn use_event(
        &self,
        task: &Task,
        decision: &Decision,
        use_: Use<'_>,
        now: Timestamp,
    ) -> NewEvent {
        let mut event = self.call_event(task, decision, use_.args(), now);
        if let Use::Exchange { upstream } = use_ {
            event.args = None;
            event.detail = Some(match event.detail.take() {
                Some(why) if !decision.is_allowed() => {
                    format!("token exchange for {upstream}: {why}")
                }
                _ => format!("token exchange for {upstream}"),
            });
        }
        event
    }

    /// Queues the records of an allowed use (the write-ahead record with
    /// the task's update, compare-and-swap) planned on `after`, and mints
    /// what its plan asks for: new tokens on entering a `reverify` state,
    /// the per-hop credential. Returns them with the task's state after
    /// them.
    async fn queue_allowed(
        &self,
        claims: &Claims,
        record: &TaskRecord,
        after: Option<Ticket>,
        planned: Plan,
        use_: Use<'_>,
        now: Timestamp,
    ) -> Result<(Queued, (TaskRecord, Option<Ticket>)), CommitError> {
        let Plan {
            decision,
            task,
            steps,
            ..
        } = planned;
        let task = task.ok_or_else(|| CommitError::Api(internal("an allowed use left no task")))?;
        let mut ops = vec![Op::UpdateTask {
            record: TaskRecord {
                task: task.clone(),
                deadline: record.deadline,
            },
            expected_version: record.task.version,
        }];
        let mut rotated = None;
        let mut exchanged = None;
        let mut reuse = None;
        let mut forward = None;
        let mut note_use = false;
        for step in &steps {
            match step {
                Step::Use => ops.push(Op::Append(self.use_event(
                    &record.task,
                    &decision,
                    use_,
                    now,
                ))),
                Step::Transition(t) => {
                    ops.push(Op::Append(records::transition_event(&task, t, now)));
                }
                Step::Rotate => {
                    rotated = Some(self.rotate(claims, &task, record.deadline, now, &mut ops)?);
                }
                Step::Credential => match use_ {
                    Use::Exchange { upstream } => {
                        let (token, ttl) = self.exchange_credential(
                            upstream, &task, &decision, record, now, &mut ops,
                        )?;
                        exchanged = Some((token, ttl));
                    }
                    Use::Call { args, .. } => {
                        let (to, call, kept) = self
                            .hop_credential(claims, args, &task, &decision, record, now, &mut ops)
                            .await?;
                        reuse = kept;
                        forward = Some((to, call));
                    }
                },
                Step::FirstUse => note_use = true,
                Step::Anomaly(_) | Step::Halt(_) | Step::Hold { .. } => {
                    return Err(CommitError::Api(internal(
                        "an allowed call was planned with the steps of a denial",
                    )));
                }
            }
        }
        if note_use {
            ops.push(Op::RecordToolUse {
                agent_id: task.agent_id.clone(),
                tool: decision.tool.clone(),
                at: now,
            });
        }
        let queued = self.store.enqueue_after(ops, after).await?;
        if note_use {
            // Taken back if the commit fails: a call planned meanwhile is
            // not a first use.
            self.remember_tool_use(&task.agent_id, &decision.tool);
        }
        let next = (
            TaskRecord {
                task: task.clone(),
                deadline: record.deadline,
            },
            Some(queued.ticket),
        );
        Ok((
            Queued {
                pending: Some(queued.pending),
                then: Then::Allowed {
                    done: Box::new(Authorized {
                        task,
                        decision,
                        rotated,
                        forward,
                        exchanged,
                    }),
                    reuse,
                },
            },
            next,
        ))
    }

    /// The per-hop token of a token exchange for `upstream`, with its
    /// lifetime in seconds; its records go to `ops`.
    fn exchange_credential(
        &self,
        upstream: &str,
        task: &Task,
        decision: &Decision,
        record: &TaskRecord,
        now: Timestamp,
        ops: &mut Vec<Op>,
    ) -> Result<(String, u64), CommitError> {
        let tools = [decision.tool.clone()];
        let request = HopRequest {
            upstream,
            task,
            tools: &tools,
            deadline: record.deadline,
            now,
            presented: None,
        };
        let issued = self
            .hop_jwt
            .mint_exchanged(&request)
            .map_err(|e| CommitError::Api(internal(e)))?;
        let crate::credential::Issued {
            credential,
            ttl_secs,
            ops: hop_ops,
            reuse: _,
        } = issued;
        let crate::upstream::HopCredential::Jwt { token } = credential else {
            return Err(CommitError::Api(internal(
                "the JWT provider issued something else",
            )));
        };
        ops.extend(hop_ops);
        Ok((token, ttl_secs.unwrap_or(0)))
    }

    /// Where and with what to forward an allowed call: its upstream, the
    /// call with its per-hop credential (records to `ops`), and the
    /// credential to keep for reuse once the records are durable.
    #[expect(clippy::too_many_arguments, reason = "one call's facts, all borrowed")]
    async fn hop_credential(
        &self,
        claims: &Claims,
        args: &Value,
        task: &Task,
        decision: &Decision,
        record: &TaskRecord,
        now: Timestamp,
        ops: &mut Vec<Op>,
    ) -> Result<(String, UpstreamCall, Option<crate::credential::Reusable>), CommitError> {
        let def = self
            .engine
            .tool(&decision.tool)
            .ok_or_else(|| CommitError::Api(internal("allowed tool is not registered")))?;
        let entry = self
            .upstreams
            .get(&def.upstream)
            .ok_or_else(|| CommitError::Api(internal("tool's upstream is not configured")))?;
        let tools = [decision.tool.clone()];
        let request = HopRequest {
            upstream: &def.upstream,
            task,
            tools: &tools,
            deadline: record.deadline,
            now,
            presented: Some(&claims.jti),
        };
        let issued = entry.provider.issue(&request).await.map_err(|e| {
            CommitError::Api(match e {
                ProviderError::Unavailable(why) => {
                    ApiError::denied(Reason::UpstreamUnavailable, why)
                }
                ProviderError::Internal(why) => internal(why),
            })
        })?;
        ops.extend(issued.ops);
        Ok((
            def.upstream.clone(),
            UpstreamCall {
                tool: def.upstream_tool.clone(),
                arguments: args.clone(),
                task_id: task.id.clone(),
                credential: issued.credential,
            },
            issued.reuse,
        ))
    }

    /// Revokes the presented token and mints one scoped to the new phase.
    pub(crate) fn rotate(
        &self,
        claims: &Claims,
        task: &Task,
        deadline: Timestamp,
        now: Timestamp,
        ops: &mut Vec<Op>,
    ) -> Result<Rotation, CommitError> {
        // Every earlier token of the task dies here — not only the one that
        // made the call: an older access token (from before a refresh)
        // carries the broader scope of the earlier phase, and a refresh
        // token would mint more of them.
        let why = format!("rotated on entering {} (reverify)", task.state);
        ops.push(Op::RevokeTaskTokens {
            task_id: task.id.clone(),
            at: now,
            reason: why.clone(),
        });
        let mut revoked = NewEvent::new(now, EventKind::TokenRevoked);
        revoked.task_id = Some(task.id.clone());
        revoked.agent_id = Some(task.agent_id.clone());
        revoked.jti = Some(claims.jti.clone());
        revoked.detail = Some(format!("every token of the task: {why}"));
        ops.push(Op::Append(revoked));
        let scope = self.phase_scope(task);
        let (access, expires_in, mint_ops) = self
            .mint_access(task, &scope, deadline, now)
            .map_err(CommitError::Api)?;
        let (refresh, refresh_ops) = self
            .mint_refresh(task, deadline, now)
            .map_err(CommitError::Api)?;
        ops.extend(mint_ops);
        ops.extend(refresh_ops);
        Ok(Rotation {
            access,
            expires_in,
            refresh,
        })
    }

    /// Forwards an authorized call and records the outcome.
    pub(crate) async fn forward(
        &self,
        tool: &str,
        upstream: &str,
        call: UpstreamCall,
        task: &Task,
    ) -> Result<Value, ApiError> {
        self.forward_until(tool, upstream, call, task, std::future::pending())
            .await
    }

    /// [`Gateway::forward`], given up when `cancel` resolves first (the
    /// client cancelled): the upstream request is dropped, which tells the
    /// upstream (`notifications/cancelled`), and the outcome is recorded
    /// as an error "cancelled by the client".
    pub(crate) async fn forward_until(
        &self,
        tool: &str,
        upstream: &str,
        call: UpstreamCall,
        task: &Task,
        cancel: impl std::future::Future<Output = ()>,
    ) -> Result<Value, ApiError> {
        let entry = self
            .upstreams
            .get(upstream)
            .ok_or_else(|| internal("tool's upstream is not configured"))?;
        let started = Instant::now();
        // The error's text goes to the audit record and the log; the caller
        // hears it only when the gateway itself wrote it (a timeout, a
        // cancel), never the upstream's or its transport's own words.
        let outcome = tokio::select! {
            answer = tokio::time::timeout(UPSTREAM_TIMEOUT, entry.upstream.call(call)) => match answer {
                Ok(Ok(result)) => Ok(result),
                Ok(Err(e)) => Err((e.to_string(), false)),
                Err(_) => Err((format!("no answer within {}s", UPSTREAM_TIMEOUT.as_secs()), true)),
            },
            () = cancel => Err(("cancelled by the client".to_owned(), true)),
        };
        let latency = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut event = NewEvent::new(self.now(), EventKind::CallCompleted);
        event.task_id = Some(task.id.clone());
        event.agent_id = Some(task.agent_id.clone());
        event.tool = Some(tool.to_owned());
        event.latency_us = Some(latency);
        match &outcome {
            Ok(result) => {
                event.decision = Some("allow".to_owned());
                event.result_digest = Some(portcullis_token::sha256_hex(
                    &serde_json::to_vec(result).unwrap_or_default(),
                ));
            }
            Err((why, _)) => {
                self.metrics.upstream_error();
                event.decision = Some("error".to_owned());
                event.reason = Some(Reason::UpstreamUnavailable.as_str().to_owned());
                event.detail = Some(why.clone());
            }
        }
        self.record_outcome(vec![Op::Append(event)])
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        outcome.map_err(|(why, public)| {
            if public {
                ApiError::denied_public(Reason::UpstreamUnavailable, why)
            } else {
                ApiError::denied(Reason::UpstreamUnavailable, why)
            }
        })
    }
}

pub(crate) use portcullis_core::plan::APPROVAL_RULE;
use portcullis_core::plan::anomaly_reason;

/// The elevation "tool" of an explicit move into a state that needs
/// approval: `state:<name>`.
pub(crate) const STATE_APPROVAL_PREFIX: &str = "state:";

impl Gateway {
    /// Whether `agent` has ever had `tool` allowed (ledger history, with
    /// the positive answers cached: a first use never un-happens).
    async fn agent_used_tool(&self, agent: &str, tool: &str) -> Result<bool, ApiError> {
        if self.known_tool_use(agent, tool) {
            return Ok(true);
        }
        let used = self
            .store
            .tool_used(agent, tool)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        if used {
            self.remember_tool_use(agent, tool);
        }
        Ok(used)
    }

    fn known_tool_use(&self, agent: &str, tool: &str) -> bool {
        self.tool_uses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&(agent.to_owned(), tool.to_owned()))
    }

    fn forget_tool_use(&self, agent: &str, tool: &str) {
        self.tool_uses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(agent.to_owned(), tool.to_owned()));
    }

    fn remember_tool_use(&self, agent: &str, tool: &str) {
        let mut known = self
            .tool_uses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() >= 65_536 {
            known.clear();
        }
        known.insert((agent.to_owned(), tool.to_owned()));
    }
}

/// The tokens that replace every earlier token of a task on entering a
/// `reverify` state.
#[derive(Debug)]
pub(crate) struct Rotation {
    pub access: String,
    pub expires_in: u64,
    pub refresh: zeroize::Zeroizing<String>,
}

impl Rotation {
    /// Adds the new tokens to a response body.
    pub(crate) fn add_to(&self, body: &mut serde_json::Value) {
        crate::tasks::put(body, "access_token", serde_json::json!(self.access));
        crate::tasks::put(
            body,
            "refresh_token",
            serde_json::json!(self.refresh.as_str()),
        );
        crate::tasks::put(body, "expires_in", serde_json::json!(self.expires_in));
    }
}
