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

use std::time::{Duration, Instant};

use portcullis_config::AnomalyAction;
use portcullis_core::anomaly::Fired;
use portcullis_core::{Decision, Reason, Task, TaskStatus, Timestamp, plan};
use portcullis_store::{EventKind, HeldCall, NewEvent, Op, StoreError, TaskRecord};
use portcullis_token::Claims;
use serde_json::Value;

use crate::credential::{HopRequest, ProviderError};
use crate::error::ApiError;
use crate::state::{Gateway, internal};
use crate::upstream::UpstreamCall;

/// Most attempts at a compare-and-swap task update before giving up.
const CAS_ATTEMPTS: usize = 8;
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

    async fn authorize_now(
        &self,
        claims: &Claims,
        task_id: &str,
        tool: &str,
        use_: Use<'_>,
    ) -> Result<Authorized, ApiError> {
        // INVARIANT: the `bind_task` layer has bound `claims` to `task_id`.
        let _serial = self.task_locks.lock(task_id).await;
        for _ in 0..CAS_ATTEMPTS {
            let record = match self.load_task(task_id).await {
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
                    self.commit(vec![Op::Append(event)])
                        .await
                        .map_err(|e| ApiError::unavailable(e.to_string()))?;
                    self.metrics.decision(Some(Reason::TaskNotActive));
                    return Err(e);
                }
                Err(e) => return Err(e),
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
                scope: Some(&claims.scope),
                now,
                first_use,
                digest: &digest,
            };
            let started = std::time::Instant::now();
            let mut verdict = self.engine.plan_use(&input);
            self.metrics.decision_latency.observe(started.elapsed());
            if verdict.decision.reason == Some(Reason::ToolDefinitionChanged)
                && self.recheck_pin(tool).await
            {
                // An admin re-approved the definition the upstream has now.
                verdict = self.engine.plan_use(&input);
            }
            let plan::Verdict { decision, fired } = verdict;
            if !decision.is_allowed() {
                match self
                    .commit_denial(&record, &decision, use_, now, fired)
                    .await
                {
                    Ok(answer) => {
                        self.metrics.decision(decision.reason);
                        let reason = decision.reason.unwrap_or(Reason::InternalError);
                        tracing::info!(task_id, tool, reason = reason.as_str(), "call denied");
                        return Err(answer);
                    }
                    Err(CommitError::Lost) => continue,
                    Err(CommitError::Api(e)) => return Err(e),
                }
            }
            match self
                .commit_allowed(claims, record, decision, use_, now)
                .await
            {
                Ok(done) => {
                    self.metrics.decision(None);
                    return Ok(done);
                }
                Err(CommitError::Lost) => continue,
                Err(CommitError::Api(e)) => return Err(e),
            }
        }
        Err(ApiError::unavailable(
            "task is changing too fast; try again",
        ))
    }

    /// Records a denial — and, when the anomaly rules say so, counts it,
    /// holds the call as an elevation request, or halts the task — in one
    /// transaction (compare-and-swap on the task when it changes). Returns
    /// the answer for the caller.
    async fn commit_denial(
        &self,
        record: &TaskRecord,
        decision: &Decision,
        use_: Use<'_>,
        now: Timestamp,
        call_rule: Option<Fired>,
    ) -> Result<ApiError, CommitError> {
        let planned = self.engine.after_denied(&record.task, call_rule);
        let changed = planned.task.is_some();
        let task = planned.task.clone().unwrap_or_else(|| record.task.clone());
        let fired = &planned.fired;
        // In audit order: the denial, the anomalies, then what they cause.
        let mut events = vec![self.use_event(&record.task, decision, use_, now)];
        for f in fired.iter().filter(|f| f.rule != APPROVAL_RULE) {
            let mut e = NewEvent::new(now, EventKind::Anomaly);
            e.task_id = Some(task.id.clone());
            e.agent_id = Some(task.agent_id.clone());
            e.tool = Some(decision.tool.clone());
            e.decision = Some("deny".to_owned());
            e.reason = Some(anomaly_reason(f.action).as_str().to_owned());
            e.detail =
                Some(format!("rule {}: {} ({:?})", f.rule, f.detail, f.action).to_lowercase());
            events.push(e);
        }
        let mut ops: Vec<Op> = events.into_iter().map(Op::Append).collect();
        let mut elevation_id = None;
        // The held call's request, under the task's cap on pending requests
        // (a guard op: past the cap the batch fails and is retried without
        // it, so the denial is still on record).
        let mut request_ops = Vec::new();
        if let Some(f) = planned.hold() {
            let reason = if f.rule == APPROVAL_RULE {
                f.detail.clone()
            } else {
                format!("anomaly rule {}: {}", f.rule, f.detail)
            };
            let held = use_.held(f.rule, &self.settings.redact);
            let (id, request) = crate::elevations::pending_request(
                &task,
                &decision.tool,
                &reason,
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
        let halt = planned.halted.is_some();
        if let Some(why) = &planned.halted {
            ops.extend(crate::tasks::ending_ops(
                &task,
                why,
                Some(Reason::AnomalyHalt),
                now,
            ));
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
        let committed = match self.commit(with_request).await {
            Err(StoreError::TooManyPending { max, .. }) => {
                elevation_id = None;
                not_filed = Some(max);
                self.commit(ops).await
            }
            other => other,
        };
        match committed {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) if changed => return Err(CommitError::Lost),
            Err(e) => return Err(CommitError::Api(ApiError::unavailable(e.to_string()))),
        }
        if halt {
            self.release_task(&task.id);
        }
        // After the commit: the halt and the request stand whatever becomes
        // of the alerts.
        for f in fired {
            let kind = if halt && f.action == AnomalyAction::Halt {
                crate::alerts::TASK_HALTED
            } else if f.rule == APPROVAL_RULE {
                crate::elevations::ELEVATION_REQUESTED
            } else {
                crate::alerts::ANOMALY
            };
            self.alert(crate::alerts::Alert {
                kind,
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
        if halt && reason != Reason::AnomalyHalt {
            detail = format!("{detail}; the task is now halted (anomaly rule denials)");
        }
        Ok(ApiError::denied(reason, detail).with_policies(decision.policy_ids.clone()))
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

    async fn commit_allowed(
        &self,
        claims: &Claims,
        record: TaskRecord,
        decision: Decision,
        use_: Use<'_>,
        now: Timestamp,
    ) -> Result<Authorized, CommitError> {
        let before = record.task.version;
        let redact = &self.settings.redact;
        let task = self
            .engine
            .after_allowed(&record.task, &decision, &|| use_.digest(redact), now);
        let note_use = self.engine.anomaly().watches_new_tools()
            && !self.known_tool_use(&task.agent_id, &decision.tool);
        let mut ops = vec![
            Op::UpdateTask {
                record: TaskRecord {
                    task: task.clone(),
                    deadline: record.deadline,
                },
                expected_version: before,
            },
            Op::Append(self.use_event(&record.task, &decision, use_, now)),
        ];
        if let Some(t) = &decision.transition {
            ops.push(Op::Append(self.transition_event(&task, t, now)));
        }
        let rotated = match &decision.transition {
            Some(t) if t.reverify => {
                Some(self.rotate(claims, &task, record.deadline, now, &mut ops)?)
            }
            _ => None,
        };
        let mut exchanged = None;
        let mut reuse = None;
        let forward = if let Use::Exchange { upstream } = use_ {
            let tools = [decision.tool.clone()];
            let request = HopRequest {
                upstream,
                task: &task,
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
            exchanged = Some((token, ttl_secs.unwrap_or(0)));
            None
        } else if let Use::Call {
            args,
            forward: true,
        } = use_
        {
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
                task: &task,
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
            let (credential, hop_ops) = (issued.credential, issued.ops);
            ops.extend(hop_ops);
            reuse = issued.reuse;
            Some((
                def.upstream.clone(),
                UpstreamCall {
                    tool: def.upstream_tool.clone(),
                    arguments: args.clone(),
                    task_id: task.id.clone(),
                    credential,
                },
            ))
        } else {
            None
        };
        if note_use {
            ops.push(Op::RecordToolUse {
                agent_id: task.agent_id.clone(),
                tool: decision.tool.clone(),
                at: now,
            });
        }
        match self.commit(ops).await {
            Ok(_) => {
                if note_use {
                    self.remember_tool_use(&task.agent_id, &decision.tool);
                }
                // The per-hop token is on record now: later calls of the
                // same access token may reuse it.
                if let Some(r) = reuse {
                    r.keep();
                }
                Ok(Authorized {
                    task,
                    decision,
                    rotated,
                    forward,
                    exchanged,
                })
            }
            Err(StoreError::Conflict(_)) => Err(CommitError::Lost),
            Err(e) => Err(CommitError::Api(ApiError::unavailable(e.to_string()))),
        }
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

    /// The audit event of a state change.
    pub(crate) fn transition_event(
        &self,
        task: &Task,
        t: &portcullis_core::Transition,
        now: Timestamp,
    ) -> NewEvent {
        let mut event = NewEvent::new(now, EventKind::StateTransition);
        event.task_id = Some(task.id.clone());
        event.agent_id = Some(task.agent_id.clone());
        event.state_from = Some(t.from.clone());
        event.state_to = Some(t.to.clone());
        if t.reverify {
            event.detail = Some("reverify".to_owned());
        }
        event
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
                event.result_digest =
                    Some(portcullis_token::sha256_hex(result.to_string().as_bytes()));
            }
            Err((why, _)) => {
                self.metrics.upstream_error();
                event.decision = Some("error".to_owned());
                event.reason = Some(Reason::UpstreamUnavailable.as_str().to_owned());
                event.detail = Some(why.clone());
            }
        }
        self.commit(vec![Op::Append(event)])
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

/// Why committing an allowed call did not finish.
#[derive(Debug)]
pub(crate) enum CommitError {
    /// Another request changed the task first: decide again.
    Lost,
    /// Anything else.
    Api(ApiError),
}

impl From<ApiError> for CommitError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}
