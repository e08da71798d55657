//! The planner: the pure part of deciding one use of a tool, shared by the
//! service's call path (`portcullis-gateway`) and the embedded library
//! (`portcullis`), so both give the same verdict for the same input —
//! approvals and anomaly rules included (DESIGN section 12).
//!
//! [`Engine::plan`] is the whole of it: it decides ([`Engine::plan_use`]:
//! the token's scope, the engine — [`Engine::decide`], or
//! [`Engine::decide_exchange`] for a token exchange — a configured
//! approval unless a one-use approval of this very use is in hand, and the
//! anomaly rules), says what the verdict does to the task (the grant an
//! approved use spends, the counters, the anomaly windows, the denial
//! count, a halt: [`Engine::after_allowed`], [`Engine::after_denied`]),
//! and lists what must be recorded and done, in audit order ([`Step`]),
//! with the alerts to send ([`Alert`]). The caller does the I/O: it looks
//! up the facts ([`Input::first_use`]), turns the steps into ledger
//! operations (the records' shapes are `portcullis_store::records`),
//! stores the task the plan returns (compare-and-swap on the version it
//! was planned on), mints what the steps ask for, and forwards.
//!
//! Nothing here reads a clock, a store or the network.

use portcullis_config::AnomalyAction;
use serde_json::Value;

use crate::anomaly::Fired;
use crate::{Decision, Engine, Reason, Task, TaskStatus, Timestamp, Transition};

/// The pseudo-rule of a configured approval (`approval`,
/// `approve_high_risk`, a state entered with `approval`): not an anomaly,
/// but it holds the use as an elevation request like `require_approval`.
pub const APPROVAL_RULE: &str = "approval";

/// What a use of a tool is.
#[derive(Debug, Clone, Copy)]
pub enum Use<'a> {
    /// A call with these arguments.
    Call(&'a Value),
    /// A token exchange for a per-hop token of this upstream: the agent
    /// calls the upstream itself, with arguments the gateway never sees.
    Exchange(&'a str),
}

/// One use to decide, and the facts the caller looked up for it.
pub struct Input<'a> {
    /// The task, as stored.
    pub task: &'a Task,
    /// The tool, by gateway name.
    pub tool: &'a str,
    /// A call or an exchange.
    pub use_: Use<'a>,
    /// Whether an allowed call is forwarded by the caller, so it needs a
    /// per-hop credential ([`Step::Credential`]; an exchange always does).
    pub forward: bool,
    /// The presenting token's scope (space-separated tools), or `None`
    /// when there is no token (the embedded library: the task's own tools
    /// and grants decide).
    pub scope: Option<&'a str>,
    /// The time of the decision.
    pub now: Timestamp,
    /// Whether the agent has never had this tool allowed (consulted only
    /// when [`crate::anomaly::Rules::watches_new_tools`]).
    pub first_use: bool,
    /// The digest a one-use approval of this use is bound to (the caller's
    /// digest of the redacted arguments); asked for only when the use
    /// needs an approval.
    pub digest: &'a (dyn Fn() -> String + Sync),
}

impl std::fmt::Debug for Input<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("task", &self.task.id)
            .field("tool", &self.tool)
            .field("use_", &self.use_)
            .field("forward", &self.forward)
            .field("scope", &self.scope)
            .field("now", &self.now)
            .field("first_use", &self.first_use)
            .finish_non_exhaustive()
    }
}

/// The verdict on one use.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The decision.
    pub decision: Decision,
    /// The rule that turned an allowed decision into a denial: a
    /// configured approval ([`APPROVAL_RULE`]) or an anomaly rule.
    pub fired: Option<Fired>,
}

/// What a denial does to the task.
#[derive(Debug, Clone, PartialEq)]
pub struct AfterDenial {
    /// The task as it must be stored, when it changed (the denial was
    /// counted, or the task halted); its version is bumped once.
    pub task: Option<Task>,
    /// Every rule that fired, in audit order: the call's own, then the
    /// `denials` rule.
    pub fired: Vec<Fired>,
    /// The task is halted by this denial; why (naming the rules).
    pub halted: Option<String>,
}

impl AfterDenial {
    /// The firing that holds the use as an elevation request, if any.
    pub fn hold(&self) -> Option<&Fired> {
        self.fired
            .iter()
            .find(|f| f.action == AnomalyAction::RequireApproval)
    }
}

/// One thing the caller records or does for a planned use, in audit order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The use's own record: `call.allowed` or `call.denied` (for an
    /// exchange, the same kinds without arguments).
    Use,
    /// `state.transition`: the allowed call moved the task.
    Transition(Transition),
    /// The call entered a `reverify` state: every token of the task is
    /// revoked (`token.revoked`) and new ones are minted for the new phase.
    Rotate,
    /// A per-hop credential for the tool's upstream (a forwarded call, or
    /// the token of an exchange).
    Credential,
    /// The agent's first allowed use of the tool, remembered for the
    /// `new_tool` rule.
    FirstUse,
    /// `anomaly`: a rule that fired.
    Anomaly(Fired),
    /// The task is halted by this denial (`task.halted`, every token
    /// revoked); why.
    Halt(String),
    /// The use is held as a pending elevation request
    /// (`elevation.requested`), within the task's cap on pending requests:
    /// the rule that holds it, and what the approver is told.
    Hold {
        /// [`APPROVAL_RULE`] or the anomaly rule.
        rule: &'static str,
        /// Why approval is needed.
        reason: String,
    },
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    /// An anomaly rule fired.
    Anomaly,
    /// The task was halted.
    TaskHalted,
    /// A use waits for a person's approval.
    ElevationRequested,
}

/// An alert to send once the plan's records are committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// What it is about.
    pub kind: AlertKind,
    /// The firing behind it.
    pub fired: Fired,
}

/// Everything a use of a tool decides: the verdict, the task after it,
/// and what to record and do, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The decision.
    pub decision: Decision,
    /// The approval and anomaly firings, in audit order: the use's own,
    /// then the `denials` rule.
    pub fired: Vec<Fired>,
    /// The task as it must be stored when the use changed it
    /// (compare-and-swap on the version of [`Input::task`]); `None` when it
    /// is unchanged.
    pub task: Option<Task>,
    /// What to record and do, in audit order.
    pub steps: Vec<Step>,
    /// The alerts to send after the records are committed.
    pub alerts: Vec<Alert>,
}

impl Plan {
    /// The halt among the steps: why the task is halted by this use.
    pub fn halted(&self) -> Option<&str> {
        self.steps.iter().find_map(|s| match s {
            Step::Halt(why) => Some(why.as_str()),
            _ => None,
        })
    }

    /// The hold among the steps: the rule and the reason.
    pub fn hold(&self) -> Option<(&'static str, &str)> {
        self.steps.iter().find_map(|s| match s {
            Step::Hold { rule, reason } => Some((*rule, reason.as_str())),
            _ => None,
        })
    }

    /// The task as it is after the use: the changed one, or `before`.
    pub fn task_or<'a>(&'a self, before: &'a Task) -> &'a Task {
        self.task.as_ref().unwrap_or(before)
    }
}

impl Engine {
    /// Plans one use: the verdict ([`Engine::plan_use`]), what it does to
    /// the task, and the records, credentials and alerts it calls for.
    /// Pure: the same input gives the same plan.
    pub fn plan(&self, input: &Input<'_>) -> Plan {
        let Verdict { decision, fired } = self.plan_use(input);
        if decision.is_allowed() {
            self.plan_allowed(input, decision)
        } else {
            self.plan_denied(input, decision, fired)
        }
    }

    fn plan_allowed(&self, input: &Input<'_>, decision: Decision) -> Plan {
        let task = self.after_allowed(input.task, &decision, input.digest, input.now);
        let mut steps = vec![Step::Use];
        if let Some(t) = &decision.transition {
            steps.push(Step::Transition(t.clone()));
            if t.reverify {
                steps.push(Step::Rotate);
            }
        }
        if input.forward || matches!(input.use_, Use::Exchange(_)) {
            steps.push(Step::Credential);
        }
        if input.first_use && self.anomaly().watches_new_tools() {
            steps.push(Step::FirstUse);
        }
        Plan {
            decision,
            fired: Vec::new(),
            task: Some(task),
            steps,
            alerts: Vec::new(),
        }
    }

    fn plan_denied(&self, input: &Input<'_>, decision: Decision, fired: Option<Fired>) -> Plan {
        let after = self.after_denied(input.task, fired);
        let mut steps = vec![Step::Use];
        steps.extend(
            after
                .fired
                .iter()
                .filter(|f| f.rule != APPROVAL_RULE)
                .cloned()
                .map(Step::Anomaly),
        );
        if let Some(why) = &after.halted {
            steps.push(Step::Halt(why.clone()));
        }
        if let Some(f) = after.hold() {
            let reason = if f.rule == APPROVAL_RULE {
                f.detail.clone()
            } else {
                format!("anomaly rule {}: {}", f.rule, f.detail)
            };
            steps.push(Step::Hold {
                rule: f.rule,
                reason,
            });
        }
        let halted = after.halted.is_some();
        let alerts = after
            .fired
            .iter()
            .map(|f| Alert {
                kind: if halted && f.action == AnomalyAction::Halt {
                    AlertKind::TaskHalted
                } else if f.rule == APPROVAL_RULE {
                    AlertKind::ElevationRequested
                } else {
                    AlertKind::Anomaly
                },
                fired: f.clone(),
            })
            .collect();
        Plan {
            decision,
            fired: after.fired,
            task: after.task,
            steps,
            alerts,
        }
    }

    /// Decides one use: token scope, engine, configured approvals, anomaly
    /// rules, in that order. Pure: the same input gives the same verdict.
    pub fn plan_use(&self, input: &Input<'_>) -> Verdict {
        let Input {
            task,
            tool,
            use_,
            forward: _,
            scope,
            now,
            first_use,
            digest,
        } = *input;
        let mut decision = self.decide_use(task, tool, use_, scope, now);
        // A use the configuration wants approved first is held, unless a
        // one-use approval of this very use (same arguments) is in hand.
        if decision.is_allowed()
            && let Some(why) = self.approval_needed(task, &decision)
            && task.approval_for(tool, Some(&digest()), now).is_none()
        {
            return Verdict {
                decision: Decision::deny(tool, Reason::ApprovalRequired, why.clone()),
                fired: Some(Fired {
                    rule: APPROVAL_RULE,
                    action: AnomalyAction::RequireApproval,
                    detail: why,
                }),
            };
        }
        // Last step before forwarding: the anomaly rules.
        if decision.is_allowed() {
            let first_use = first_use && self.anomaly().watches_new_tools();
            let approved = |rule: &str| task.anomaly_approved(tool, rule, now);
            if let Some(f) = self
                .anomaly()
                .check_call(&task.watch, tool, now, first_use, approved)
            {
                decision = Decision::deny(tool, anomaly_reason(f.action), f.detail.clone());
                return Verdict {
                    decision,
                    fired: Some(f),
                };
            }
        }
        Verdict {
            decision,
            fired: None,
        }
    }

    /// The engine's decision, after the token's own scope.
    fn decide_use(
        &self,
        task: &Task,
        tool: &str,
        use_: Use<'_>,
        scope: Option<&str>,
        now: Timestamp,
    ) -> Decision {
        if let Some(scope) = scope {
            let registered = self.tool(tool).is_some();
            let in_scope = scope.split(' ').any(|t| t == tool);
            if registered && !in_scope && !task.elevated(tool, now) {
                return Decision::deny(
                    tool,
                    Reason::ToolNotGranted,
                    "tool is outside the token's scope",
                );
            }
        }
        match use_ {
            Use::Call(args) => self.decide(task, tool, args),
            Use::Exchange(upstream) => {
                // The token is for `upstream` alone: a tool it does not
                // serve is no tool of this exchange.
                if self.tool(tool).is_some_and(|d| d.upstream != upstream) {
                    return Decision::deny(
                        tool,
                        Reason::ToolUnknown,
                        "the tool is not served by that resource",
                    );
                }
                self.decide_exchange(task, tool)
            }
        }
    }

    /// The task after an allowed use at `now`: the one-use approval it
    /// spends (when the use needed one), its counters and transition, and
    /// the anomaly windows. `digest` as in [`Input::digest`].
    pub fn after_allowed(
        &self,
        task: &Task,
        decision: &Decision,
        digest: &dyn Fn() -> String,
        now: Timestamp,
    ) -> Task {
        let mut after = task.clone();
        if self.approval_needed(task, decision).is_some()
            && let Some(i) = after.approval_for(&decision.tool, Some(&digest()), now)
        {
            after.grants.remove(i);
        }
        after.apply(decision);
        self.anomaly()
            .record_call(&mut after.watch, &decision.tool, now);
        after
    }

    /// What a denial does to the task: an active task counts it (the
    /// `denials` rule may fire), and a `halt` among the firings halts it.
    /// `fired` is the verdict's own firing.
    pub fn after_denied(&self, task: &Task, fired: Option<Fired>) -> AfterDenial {
        let rules = self.anomaly();
        let mut after = task.clone();
        let mut all: Vec<Fired> = fired.into_iter().collect();
        let active = task.status == TaskStatus::Active;
        let counted = active && rules.counts_denials();
        if counted && let Some(f) = rules.record_denial(&mut after.watch) {
            all.push(f);
        }
        let halting: Vec<&str> = all
            .iter()
            .filter(|f| f.action == AnomalyAction::Halt)
            .map(|f| f.rule)
            .collect();
        let halted = (active && !halting.is_empty())
            .then(|| format!("halted by anomaly rule {}", halting.join(", ")));
        if halted.is_some() {
            after.status = TaskStatus::Halted;
        }
        let task = (counted || halted.is_some()).then(|| {
            after.version = after.version.saturating_add(1);
            after
        });
        AfterDenial {
            task,
            fired: all,
            halted,
        }
    }
}

/// The reason code an anomaly rule's action answers with: `deny` is
/// `rate_limited` (refused for its pattern, not its content; the audit
/// names the rule), `require_approval` is `approval_required`, `halt` is
/// `anomaly_halt`.
pub fn anomaly_reason(action: AnomalyAction) -> Reason {
    match action {
        AnomalyAction::Deny => Reason::RateLimited,
        AnomalyAction::RequireApproval => Reason::ApprovalRequired,
        AnomalyAction::Halt => Reason::AnomalyHalt,
    }
}
