//! What the engine answers for a call.

use serde::Serialize;

use crate::Reason;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The call may go ahead.
    Allow,
    /// The call must not reach the upstream.
    Deny,
}

/// A workflow move that an allowed call (or an explicit transition request)
/// makes when it is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// The state the task is in.
    pub from: String,
    /// The state the task moves to.
    pub to: String,
    /// The new state is marked `reverify`: the access token must be rotated.
    pub reverify: bool,
    /// The new state is final: the task is finished.
    pub is_final: bool,
    /// Entering the new state needs approval.
    pub approval: bool,
}

/// The engine's answer for one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Allow or deny.
    pub decision: Outcome,
    /// Why it was denied; `None` when allowed.
    pub reason: Option<Reason>,
    /// A human explanation. Never contains argument values or secrets.
    pub detail: String,
    /// The `@id`s of the Cedar policies that decided (forbids that matched,
    /// or policies whose evaluation failed).
    pub policy_ids: Vec<String>,
    /// The tool the decision is about.
    pub tool: String,
    /// The workflow move an allowed call makes, if any.
    pub transition: Option<Transition>,
}

impl Decision {
    /// An allow for `tool`.
    pub fn allow(tool: &str, transition: Option<Transition>) -> Self {
        Self {
            decision: Outcome::Allow,
            reason: None,
            detail: String::new(),
            policy_ids: Vec::new(),
            tool: tool.to_owned(),
            transition,
        }
    }

    /// A denial of `tool` for `reason`.
    pub fn deny(tool: &str, reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            decision: Outcome::Deny,
            reason: Some(reason),
            detail: detail.into(),
            policy_ids: Vec::new(),
            tool: tool.to_owned(),
            transition: None,
        }
    }

    /// This denial, naming the policies that made it.
    #[must_use]
    pub fn with_policies(mut self, policy_ids: Vec<String>) -> Self {
        self.policy_ids = policy_ids;
        self
    }

    /// True when the call may go ahead.
    pub fn is_allowed(&self) -> bool {
        self.decision == Outcome::Allow
    }
}
