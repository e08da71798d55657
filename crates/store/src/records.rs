//! The audit records of a planned use ([`portcullis_core::plan`]), in the
//! shapes the service and the embedded library both write, so that the
//! same plan leaves the same records in either ledger.
//!
//! Every function is pure: the caller chooses the time, the ids and what it
//! keeps of the arguments (redacted and bounded with [`crate::redact`]).

use portcullis_core::anomaly::Fired;
use portcullis_core::plan::anomaly_reason;
use portcullis_core::{Decision, Reason, Task, TaskStatus, Timestamp, Transition};

use crate::{ElevationRecord, ElevationStatus, EventKind, HeldCall, NewEvent, Op};

/// A record about `task`, of `kind`, at `now`.
fn about(task: &Task, kind: EventKind, now: Timestamp) -> NewEvent {
    let mut e = NewEvent::new(now, kind);
    e.task_id = Some(task.id.clone());
    e.agent_id = Some(task.agent_id.clone());
    e
}

/// The record of a decided use ([`portcullis_core::plan::Step::Use`]):
/// `call.allowed` or `call.denied`, with `args` as the caller keeps them
/// (redacted and bounded), the transition an allowed call makes, and a
/// denial's detail.
pub fn use_event(
    task: &Task,
    decision: &Decision,
    args: Option<serde_json::Value>,
    now: Timestamp,
) -> NewEvent {
    let allowed = decision.is_allowed();
    let kind = if allowed {
        EventKind::CallAllowed
    } else {
        EventKind::CallDenied
    };
    let mut e = about(task, kind, now);
    e.tool = Some(decision.tool.clone());
    e.decision = Some(if allowed { "allow" } else { "deny" }.to_owned());
    e.reason = decision.reason.map(|r| r.as_str().to_owned());
    e.policy_ids = decision.policy_ids.clone();
    e.args = args;
    if let Some(t) = &decision.transition {
        e.state_from = Some(t.from.clone());
        e.state_to = Some(t.to.clone());
    }
    if !allowed && !decision.detail.is_empty() {
        e.detail = Some(decision.detail.clone());
    }
    e
}

/// `state.transition`.
pub fn transition_event(task: &Task, t: &Transition, now: Timestamp) -> NewEvent {
    let mut e = about(task, EventKind::StateTransition, now);
    e.state_from = Some(t.from.clone());
    e.state_to = Some(t.to.clone());
    if t.reverify {
        e.detail = Some("reverify".to_owned());
    }
    e
}

/// `anomaly`: rule `fired` fired on a use of `tool`.
pub fn anomaly_event(task: &Task, tool: &str, fired: &Fired, now: Timestamp) -> NewEvent {
    let mut e = about(task, EventKind::Anomaly, now);
    e.tool = Some(tool.to_owned());
    e.decision = Some("deny".to_owned());
    e.reason = Some(anomaly_reason(fired.action).as_str().to_owned());
    e.detail =
        Some(format!("rule {}: {} ({:?})", fired.rule, fired.detail, fired.action).to_lowercase());
    e
}

/// The end of a task (its status says how: `task.halted` or
/// `task.completed`), and every token of it revoked (`token.revoked`):
/// the operations, in audit order.
pub fn ending_ops(task: &Task, why: &str, reason: Option<Reason>, now: Timestamp) -> [Op; 3] {
    let ended = ended_event(task, why, reason, now);
    let mut revoked = about(task, EventKind::TokenRevoked, now);
    revoked.detail = Some(format!("every token of the task: {why}"));
    [
        Op::RevokeTaskTokens {
            task_id: task.id.clone(),
            at: now,
            reason: why.to_owned(),
        },
        Op::Append(ended),
        Op::Append(revoked),
    ]
}

/// The end of a task: `task.halted` or `task.completed` (its status says
/// which), with why.
pub fn ended_event(task: &Task, why: &str, reason: Option<Reason>, now: Timestamp) -> NewEvent {
    let kind = match task.status {
        TaskStatus::Halted => EventKind::TaskHalted,
        _ => EventKind::TaskCompleted,
    };
    let mut ended = about(task, kind, now);
    ended.reason = reason.map(|r| r.as_str().to_owned());
    ended.detail = Some(why.to_owned());
    ended
}

/// `elevation.requested`: a use of `tool` waits for a person's approval;
/// `detail` names the request and why.
pub fn requested_event(task: &Task, tool: &str, detail: String, now: Timestamp) -> NewEvent {
    let mut event = about(task, EventKind::ElevationRequested, now);
    event.tool = Some(tool.to_owned());
    event.detail = Some(detail);
    event
}

/// A pending elevation request `id` for `tool` (or `state:<name>`), and
/// its `elevation.requested` record. `held` is the use it holds, when it
/// holds one.
pub fn pending_request(
    id: &str,
    task: &Task,
    tool: &str,
    reason: &str,
    held: Option<HeldCall>,
    now: Timestamp,
) -> [Op; 2] {
    let elevation = ElevationRecord {
        id: id.to_owned(),
        task_id: task.id.clone(),
        agent_id: task.agent_id.clone(),
        tool: tool.to_owned(),
        reason: reason.to_owned(),
        status: ElevationStatus::Pending,
        requested_at: now,
        decided_at: None,
        decided_by: None,
        note: None,
        expires_at: None,
        held,
    };
    let event = requested_event(task, tool, format!("{id}: {reason}"), now);
    [Op::InsertElevation(elevation), Op::Append(event)]
}

/// `task.started`: the task's first state and tools.
pub fn started_event(task: &Task, now: Timestamp) -> NewEvent {
    let mut e = about(task, EventKind::TaskStarted, now);
    e.state_to = Some(task.state.clone());
    e.detail = Some(format!(
        "tools: {}",
        task.tools.iter().cloned().collect::<Vec<_>>().join(" ")
    ));
    e
}
