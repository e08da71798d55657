//! Reason codes: the stable strings of DESIGN section 2, used in API
//! responses, audit records and metrics. The string form of each variant is a
//! contract with external tests and dashboards: never rename one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a call (or token, or request) was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// No token was presented.
    TokenMissing,
    /// The token is malformed, badly signed or uses a forbidden algorithm.
    TokenInvalid,
    /// The token's `exp` has passed.
    TokenExpired,
    /// The token, or its task, has been revoked.
    TokenRevoked,
    /// The token was minted for another audience.
    WrongAudience,
    /// The token's task is not the task named in the request.
    TaskMismatch,
    /// The task is completed, halted or otherwise not running.
    TaskNotActive,
    /// No such tool in the registry.
    ToolUnknown,
    /// The tool is not on the agent's allowlist, nor in the task's grant.
    ToolNotGranted,
    /// The task's workflow state does not allow the tool or transition.
    StateViolation,
    /// A budget is spent.
    LimitExceeded,
    /// Calls are coming too fast.
    RateLimited,
    /// The arguments do not match the tool's schema or bounds.
    ArgsInvalid,
    /// A Cedar forbid policy matched.
    PolicyForbid,
    /// A human or policy must approve first.
    ApprovalRequired,
    /// An anomaly rule halted the task.
    AnomalyHalt,
    /// The upstream's tool definition changed since it was pinned.
    ToolDefinitionChanged,
    /// The upstream could not be reached.
    UpstreamUnavailable,
    /// Something failed inside the gateway; the call is denied.
    InternalError,
}

impl Reason {
    /// Every reason code, in the order of DESIGN section 2.
    pub const ALL: [Self; 19] = [
        Self::TokenMissing,
        Self::TokenInvalid,
        Self::TokenExpired,
        Self::TokenRevoked,
        Self::WrongAudience,
        Self::TaskMismatch,
        Self::TaskNotActive,
        Self::ToolUnknown,
        Self::ToolNotGranted,
        Self::StateViolation,
        Self::LimitExceeded,
        Self::RateLimited,
        Self::ArgsInvalid,
        Self::PolicyForbid,
        Self::ApprovalRequired,
        Self::AnomalyHalt,
        Self::ToolDefinitionChanged,
        Self::UpstreamUnavailable,
        Self::InternalError,
    ];

    /// The stable reason code.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TokenMissing => "token_missing",
            Self::TokenInvalid => "token_invalid",
            Self::TokenExpired => "token_expired",
            Self::TokenRevoked => "token_revoked",
            Self::WrongAudience => "wrong_audience",
            Self::TaskMismatch => "task_mismatch",
            Self::TaskNotActive => "task_not_active",
            Self::ToolUnknown => "tool_unknown",
            Self::ToolNotGranted => "tool_not_granted",
            Self::StateViolation => "state_violation",
            Self::LimitExceeded => "limit_exceeded",
            Self::RateLimited => "rate_limited",
            Self::ArgsInvalid => "args_invalid",
            Self::PolicyForbid => "policy_forbid",
            Self::ApprovalRequired => "approval_required",
            Self::AnomalyHalt => "anomaly_halt",
            Self::ToolDefinitionChanged => "tool_definition_changed",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::InternalError => "internal_error",
        }
    }

    /// True for the reasons that concern the presented token itself; the
    /// HTTP surface answers these with 401.
    pub const fn is_token_error(self) -> bool {
        matches!(
            self,
            Self::TokenMissing
                | Self::TokenInvalid
                | Self::TokenExpired
                | Self::TokenRevoked
                | Self::WrongAudience
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason code {0:?}")]
pub struct UnknownReason(String);

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.chars().take(64).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_string_and_serde() {
        for reason in Reason::ALL {
            assert_eq!(reason.as_str().parse::<Reason>(), Ok(reason));
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
        assert!("nope".parse::<Reason>().is_err());
    }
}
