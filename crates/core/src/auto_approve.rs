//! `[elevation] auto_approve`: Cedar policies that approve an elevation
//! request without a human (DESIGN section 7).
//!
//! A request is evaluated as `principal = Agent::"<agent>"`,
//! `action = Action::"elevate"`, `resource = Tool::"<tool>"`, with
//! `context = { reason, state, agent_type }` (the agent's stated reason, the
//! task's workflow state, the agent's type). Entities carry the same
//! attributes as for call policies (`Agent.type`; `Tool.risk`, `access`,
//! `upstream`). Cedar's rule decides: at least one `permit` matches and no
//! `forbid` does → approved, recorded as decided by those policies' `@id`s.
//! Anything else — no match, an evaluation error — leaves the request to a
//! human: an automatic approval never happens by default.
//!
//! Example:
//!
//! ```cedar
//! @id("reads-while-validating")
//! permit(principal, action == Action::"elevate", resource)
//! when { resource.access == "read" && context.state == "validate" };
//! ```

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde_json::json;

/// The compiled auto-approve policies.
pub(crate) struct AutoApprove {
    policies: PolicySet,
    schema: Schema,
    entities: Entities,
    action: EntityUid,
    agents: HashSet<String>,
}

impl std::fmt::Debug for AutoApprove {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoApprove")
            .field("policies", &self.policies.policies().count())
            .finish_non_exhaustive()
    }
}

fn uid(type_name: &str, id: &str) -> Option<EntityUid> {
    let t = EntityTypeName::from_str(type_name).ok()?;
    Some(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

fn one_line(text: impl std::fmt::Display) -> String {
    text.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tool as the policies see it: name, risk, access, upstream.
pub(crate) type ToolAttrs<'a> = (&'a str, &'a str, &'a str, &'a str);

impl AutoApprove {
    /// Parses and validates `text` (strict mode, against the schema above).
    pub(crate) fn build(
        text: &str,
        tools: &[ToolAttrs<'_>],
        agents: &[(&str, &str)],
    ) -> Result<Self, Vec<String>> {
        let policies = PolicySet::from_str(text).map_err(|e| vec![one_line(e)])?;
        let string = json!({ "type": "String" });
        let schema_json = json!({ "": {
            "entityTypes": {
                "Agent": { "shape": { "type": "Record", "attributes": { "type": string } } },
                "Tool": { "shape": { "type": "Record", "attributes": {
                    "risk": string, "access": string, "upstream": string } } }
            },
            "actions": { "elevate": { "appliesTo": {
                "principalTypes": ["Agent"], "resourceTypes": ["Tool"],
                "context": { "type": "Record", "attributes": {
                    "reason": string, "state": string, "agent_type": string } }
            } } }
        } });
        let schema = Schema::from_json_value(schema_json).map_err(|e| vec![one_line(e)])?;
        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        let errors: Vec<String> = validation.validation_errors().map(one_line).collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut list = Vec::new();
        for (id, agent_type) in agents {
            let u = uid("Agent", id).ok_or_else(|| vec![format!("bad agent id {id:?}")])?;
            let attrs = HashMap::from([(
                "type".to_owned(),
                RestrictedExpression::new_string((*agent_type).to_owned()),
            )]);
            list.push(Entity::new(u, attrs, HashSet::new()).map_err(|e| vec![one_line(e)])?);
        }
        for (name, risk, access, upstream) in tools {
            let u = uid("Tool", name).ok_or_else(|| vec![format!("bad tool name {name:?}")])?;
            let attrs = HashMap::from([
                (
                    "risk".to_owned(),
                    RestrictedExpression::new_string((*risk).to_owned()),
                ),
                (
                    "access".to_owned(),
                    RestrictedExpression::new_string((*access).to_owned()),
                ),
                (
                    "upstream".to_owned(),
                    RestrictedExpression::new_string((*upstream).to_owned()),
                ),
            ]);
            list.push(Entity::new(u, attrs, HashSet::new()).map_err(|e| vec![one_line(e)])?);
        }
        let entities =
            Entities::from_entities(list, Some(&schema)).map_err(|e| vec![one_line(e)])?;
        let action = uid("Action", "elevate").ok_or_else(|| vec!["bad action".to_owned()])?;
        Ok(Self {
            policies,
            schema,
            entities,
            action,
            agents: agents.iter().map(|(id, _)| (*id).to_owned()).collect(),
        })
    }

    /// The `@id`s (or Cedar ids) of the permits that approve this request,
    /// or `None` when it goes to a human.
    pub(crate) fn decide(
        &self,
        agent: &str,
        agent_type: &str,
        tool: &str,
        reason: &str,
        state: &str,
    ) -> Option<Vec<String>> {
        // Only configured agents: an unknown principal is never approved,
        // even by a policy that does not name one.
        if !self.agents.contains(agent) {
            return None;
        }
        let principal = uid("Agent", agent)?;
        let resource = uid("Tool", tool)?;
        let context = Context::from_pairs([
            (
                "reason".to_owned(),
                RestrictedExpression::new_string(reason.to_owned()),
            ),
            (
                "state".to_owned(),
                RestrictedExpression::new_string(state.to_owned()),
            ),
            (
                "agent_type".to_owned(),
                RestrictedExpression::new_string(agent_type.to_owned()),
            ),
        ])
        .ok()?;
        let request = Request::new(
            principal,
            self.action.clone(),
            resource,
            context,
            Some(&self.schema),
        )
        .ok()?;
        let answer = Authorizer::new().is_authorized(&request, &self.policies, &self.entities);
        // Fail closed: an evaluation error is no approval.
        if answer.decision() != CedarDecision::Allow
            || answer.diagnostics().errors().next().is_some()
        {
            return None;
        }
        let ids = answer
            .diagnostics()
            .reason()
            .map(|pid| {
                self.policies
                    .policy(pid)
                    .and_then(|p| p.annotation("id").map(str::to_owned))
                    .unwrap_or_else(|| pid.to_string())
            })
            .collect();
        Some(ids)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TOOLS: &[ToolAttrs<'static>] = &[
        ("files.read", "low", "read", "files"),
        ("warehouse.drop", "high", "write", "warehouse"),
    ];
    const AGENTS: &[(&str, &str)] = &[("bot", "ingestion")];

    #[test]
    fn permits_approve_and_forbids_win() {
        let a = AutoApprove::build(
            r#"
@id("reads-while-validating")
permit(principal, action == Action::"elevate", resource)
when { resource.access == "read" && context.state == "validate" };
@id("never-on-friday")
forbid(principal, action, resource) when { context.reason like "*friday*" };
"#,
            TOOLS,
            AGENTS,
        )
        .unwrap();
        assert_eq!(
            a.decide("bot", "ingestion", "files.read", "need it", "validate"),
            Some(vec!["reads-while-validating".to_owned()])
        );
        assert_eq!(
            a.decide("bot", "ingestion", "files.read", "need it", "connect"),
            None
        );
        assert_eq!(
            a.decide("bot", "ingestion", "warehouse.drop", "x", "validate"),
            None
        );
        assert_eq!(
            a.decide("bot", "ingestion", "files.read", "friday fun", "validate"),
            None
        );
        assert_eq!(
            a.decide("nobody", "ingestion", "files.read", "x", "validate"),
            None
        );
    }

    #[test]
    fn invalid_policies_are_findings() {
        let e = AutoApprove::build(
            "permit(principal, action, resource) when { context.nope };",
            TOOLS,
            AGENTS,
        )
        .unwrap_err();
        assert!(!e.is_empty());
        assert!(AutoApprove::build("permit(", TOOLS, AGENTS).is_err());
    }
}
