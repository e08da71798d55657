//! A task as the engine sees it: which agent, which workflow state, what it
//! has spent. The engine reads a [`Task`] and never changes it; callers apply
//! an allowed [`Decision`] with [`Task::apply`] (in memory) or through the
//! ledger (compare-and-swap on [`Task::version`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{Decision, Timestamp, Transition};

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Running: calls are decided.
    Active,
    /// Finished; every token revoked.
    Completed,
    /// Stopped by an anomaly or an admin; only an admin can resume it.
    Halted,
}

impl TaskStatus {
    /// The stored and displayed form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Halted => "halted",
        }
    }
}

/// What an approved elevation answers: the one question a grant settles.
/// A grant never answers more than the approver was asked.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantFor {
    /// The tool beyond the allowlist (the agent asked for it): lets the
    /// tool pass the ACL step and the token-scope check, nothing more.
    /// Grants written before this field existed read as this.
    #[default]
    Elevation,
    /// An approval the configuration asks for (`approval`,
    /// `approve_high_risk`, a state entered with `approval`): good for one
    /// use with the arguments the approver saw.
    Approval,
    /// A call held by the named anomaly rule: that rule is satisfied for
    /// the tool until the grant lapses; every other rule still applies.
    Anomaly(String),
}

/// Something approved for one task, until a deadline: a tool beyond its
/// agent's allowlist, one call that needed approval, or calls that an
/// anomaly rule held ([`GrantFor`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The tool (or `state:<name>` for entering a state).
    pub tool: String,
    /// When the grant lapses.
    pub expires_at: Timestamp,
    /// Good for one use only: the use that spends it removes it.
    #[serde(default)]
    pub once: bool,
    /// What the grant answers.
    #[serde(default)]
    pub answers: GrantFor,
    /// For a one-use approval: the digest of the (redacted) arguments of
    /// the call the approver saw (computed by the gateway); only a use with
    /// the same digest spends it. `None` for a use without arguments (a
    /// state entered through the transition endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_digest: Option<String>,
}

impl Grant {
    /// Live at `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        self.expires_at > now
    }
}

/// One task of one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Unique id, chosen by whoever starts the task.
    pub id: String,
    /// The agent running it.
    pub agent_id: String,
    /// The agent's type, whose workflow the task follows.
    pub agent_type: String,
    /// What the orchestrator said the task is for.
    pub goal: String,
    /// The current workflow state.
    pub state: String,
    /// Running, completed or halted.
    pub status: TaskStatus,
    /// The tools this task may use: a subset of the agent's allowlist chosen
    /// at start (least privilege per task).
    pub tools: BTreeSet<String>,
    /// Approved elevations.
    pub grants: Vec<Grant>,
    /// Allowed calls so far.
    pub calls: u64,
    /// Allowed calls so far, per tool.
    pub tool_calls: BTreeMap<String, u64>,
    /// Bumped on every change, for compare-and-swap in a shared store.
    pub version: u64,
    /// When the task started.
    pub started_at: Timestamp,
    /// What the anomaly rules remember of this task (recent calls,
    /// denials); kept in the task so it shares its compare-and-swap.
    #[serde(default)]
    pub watch: crate::anomaly::Watch,
}

impl Task {
    /// Applies an allowed decision: counts the call and makes its
    /// transition. A denial changes nothing.
    pub fn apply(&mut self, decision: &Decision) {
        if !decision.is_allowed() {
            return;
        }
        self.calls = self.calls.saturating_add(1);
        let count = self.tool_calls.entry(decision.tool.clone()).or_insert(0);
        *count = count.saturating_add(1);
        if let Some(transition) = &decision.transition {
            self.move_to(transition);
        }
        self.version = self.version.saturating_add(1);
    }

    /// Applies an explicit transition (from [`crate::Engine::transition`]).
    pub fn apply_transition(&mut self, transition: &Transition) {
        self.move_to(transition);
        self.version = self.version.saturating_add(1);
    }

    fn move_to(&mut self, transition: &Transition) {
        self.state.clone_from(&transition.to);
    }

    /// Whether a live elevation lets `tool` past the allowlist.
    pub fn elevated(&self, tool: &str, now: Timestamp) -> bool {
        self.grants
            .iter()
            .any(|g| g.tool == tool && g.answers == GrantFor::Elevation && g.is_live(now))
    }

    /// The live one-use approval of `tool` (or `state:<name>`) for a use
    /// whose arguments have digest `digest`: its index in
    /// [`Task::grants`]. An approval of other arguments is no approval of
    /// these.
    pub fn approval_for(&self, tool: &str, digest: Option<&str>, now: Timestamp) -> Option<usize> {
        self.grants.iter().position(|g| {
            g.tool == tool
                && g.once
                && g.answers == GrantFor::Approval
                && g.args_digest.as_deref() == digest
                && g.is_live(now)
        })
    }

    /// Whether a live grant answers anomaly rule `rule` for `tool`.
    pub fn anomaly_approved(&self, tool: &str, rule: &str, now: Timestamp) -> bool {
        self.grants.iter().any(|g| {
            g.tool == tool
                && matches!(&g.answers, GrantFor::Anomaly(r) if r == rule)
                && g.is_live(now)
        })
    }

    /// Calls of `tool` so far.
    pub fn calls_of(&self, tool: &str) -> u64 {
        self.tool_calls.get(tool).copied().unwrap_or(0)
    }
}
