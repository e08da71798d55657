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

/// A tool granted to one task beyond its agent's allowlist, until a deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The tool.
    pub tool: String,
    /// When the grant lapses.
    pub expires_at: Timestamp,
    /// An approval good for one call only (per-call approval of a
    /// high-risk tool, or entering a state that needs approval): the call
    /// that uses it removes it.
    #[serde(default)]
    pub once: bool,
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

    /// Calls of `tool` so far.
    pub fn calls_of(&self, tool: &str) -> u64 {
        self.tool_calls.get(tool).copied().unwrap_or(0)
    }
}
