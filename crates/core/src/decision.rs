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

/// The longest tool name, in bytes, that a decision (and so an audit record)
/// carries. Registered names are far shorter; a longer name in a request
/// is an unknown tool whose name is cut here, so a caller cannot grow the
/// audit log by the size of its request body.
pub const MAX_TOOL_NAME_BYTES: usize = 256;

/// `tool`, cut to at most [`MAX_TOOL_NAME_BYTES`] bytes on a character
/// boundary; a cut name ends in `…`.
pub fn bounded_tool_name(tool: &str) -> String {
    if tool.len() <= MAX_TOOL_NAME_BYTES {
        return tool.to_owned();
    }
    const MARK: &str = "…";
    let mut end = MAX_TOOL_NAME_BYTES - MARK.len();
    while !tool.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = tool.get(..end).unwrap_or_default().to_owned();
    cut.push_str(MARK);
    cut
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
            tool: bounded_tool_name(tool),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_are_cut_on_a_char_boundary() {
        assert_eq!(bounded_tool_name("warehouse.query"), "warehouse.query");
        let exact = "a".repeat(MAX_TOOL_NAME_BYTES);
        assert_eq!(bounded_tool_name(&exact), exact);
        for filler in ["a", "é", "日", "𝄞"] {
            let long = filler.repeat(MAX_TOOL_NAME_BYTES + 1);
            let cut = bounded_tool_name(&long);
            assert!(cut.len() <= MAX_TOOL_NAME_BYTES, "{filler}: {}", cut.len());
            assert!(cut.ends_with('…'));
            assert!(long.starts_with(cut.trim_end_matches('…')));
        }
        let denial = Decision::deny(&"x".repeat(100_000), Reason::ToolUnknown, "no such tool");
        assert!(denial.tool.len() <= MAX_TOOL_NAME_BYTES);
    }
}
