//! The decision engine: one call in, one [`Decision`] out.
//!
//! [`Engine::decide`] runs the steps of DESIGN section 1 that need no token
//! and no store, in this order; the first failing step decides:
//!
//! 1. task active ............ `task_not_active`
//! 2. registry ............... `tool_unknown`
//! 3. ACL .................... `tool_not_granted` (allowlist ∩ task grant, ∪ live elevations)
//! 4. workflow state ......... `state_violation` (with `auto_advance` to a `next` state)
//! 5. budgets ................ `limit_exceeded`
//! 6. pinned definition ...... `tool_definition_changed` (MCP upstreams)
//! 7. argument bounds, schema  `args_invalid`
//!    and arguments a policy reads that Cedar is never shown (`args_invalid`)
//! 8. Cedar forbid policies .. `policy_forbid`
//!
//! Any inconsistency (a task whose agent or state is not configured, a
//! policy evaluation error) is `internal_error`: a denial.
//!
//! The steps before (token, task binding) and after (anomaly rules, per-hop
//! credentials, forwarding, audit) belong to the service around the engine.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};

use cedar_policy::{Context, RestrictedExpression};
use portcullis_config::{Access, Risk};
use serde_json::Value;

use crate::args::{self, Shape};
use crate::policy::{PolicyIndex, ToolView, Verdict};
use crate::{Clock, Decision, Reason, Task, TaskStatus, Timestamp, Transition};

/// A registered tool.
#[derive(Debug)]
pub struct ToolDef {
    /// Gateway name.
    pub name: String,
    /// Upstream that serves it.
    pub upstream: String,
    /// Its name at the upstream.
    pub upstream_tool: String,
    /// Risk level.
    pub risk: Risk,
    /// Access kind.
    pub access: Access,
    /// The argument schema (as configured, or `{"type": "object"}`).
    pub args_schema: Value,
    /// Whether `args_schema` was configured; if not, the upstream's pinned
    /// `inputSchema` is checked too, once it is known.
    pub schema_configured: bool,
    /// Every call needs its own approval.
    pub approval: bool,
    pub(crate) validator: jsonschema::Validator,
    pub(crate) shape: Shape,
}

/// One state of a workflow.
#[derive(Debug)]
pub(crate) struct StateDef {
    pub name: String,
    pub tools: HashSet<usize>,
    pub next: Vec<usize>,
    pub reverify: bool,
    pub is_final: bool,
    /// Entering it needs approval (the state's flag, or its agent type's
    /// for a `reverify` state).
    pub approval: bool,
}

/// The workflow of one agent type.
#[derive(Debug)]
pub(crate) struct Workflow {
    pub name: String,
    pub initial: usize,
    pub states: Vec<StateDef>,
    pub by_name: HashMap<String, usize>,
    pub auto_advance: bool,
}

impl Workflow {
    fn state(&self, name: &str) -> Option<(usize, &StateDef)> {
        let i = *self.by_name.get(name)?;
        Some((i, self.states.get(i)?))
    }

    fn transition(&self, from: &StateDef, to: usize) -> Option<Transition> {
        let to = self.states.get(to)?;
        Some(Transition {
            from: from.name.clone(),
            to: to.name.clone(),
            reverify: to.reverify,
            is_final: to.is_final,
            approval: to.approval,
        })
    }
}

/// A configured agent.
#[derive(Debug)]
pub(crate) struct AgentDef {
    pub agent_type: usize,
    pub acl: HashSet<usize>,
    pub max_calls: Option<u64>,
    pub per_tool: HashMap<usize, u64>,
    pub approve_high_risk: bool,
}

/// Why a task could not be started or moved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Denial {
    /// The reason code.
    pub reason: Reason,
    /// A human explanation.
    pub detail: String,
}

impl Denial {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The decision engine, built once from a configuration and shared by every
/// call. Immutable: reload means building a new one.
pub struct Engine {
    pub(crate) tools: Vec<ToolDef>,
    pub(crate) tool_index: HashMap<String, usize>,
    pub(crate) workflows: Vec<Workflow>,
    pub(crate) workflow_index: HashMap<String, usize>,
    pub(crate) agents: HashMap<String, AgentDef>,
    pub(crate) policies: PolicyIndex,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) slice_policies: bool,
    /// Per tool (by index): what is known of its pinned upstream definition.
    pub(crate) pins: RwLock<Vec<PinState>>,
    /// `[elevation] auto_approve`, compiled.
    pub(crate) auto_approve: Option<crate::auto_approve::AutoApprove>,
    /// `[anomaly]`.
    pub(crate) anomaly: crate::anomaly::Rules,
}

/// What the service reports about an upstream tool's definition, compared
/// with its pin (see [`Engine::set_pin`]).
#[derive(Debug, Clone, PartialEq)]
pub enum PinStatus {
    /// Not compared yet (no upstream listing seen, or no upstream at all,
    /// as in the embedded library): only the configured schema applies.
    Unchecked,
    /// The upstream advertises exactly the pinned definition; its
    /// `inputSchema` (checked when no `args_schema` is configured).
    Pinned {
        /// The pinned `inputSchema`, if the definition has one.
        input_schema: Option<Value>,
    },
    /// The upstream's definition differs from the pin, or is gone: every
    /// call is `tool_definition_changed` until an admin re-approves it.
    Changed {
        /// What changed, for the denial's detail.
        detail: String,
    },
}

/// The engine's compiled form of a [`PinStatus`].
#[derive(Debug, Clone, Default)]
pub(crate) enum PinState {
    #[default]
    Unchecked,
    /// The pinned `inputSchema`'s validator, and what the tool's policies
    /// see under it (for a tool with no configured `args_schema`).
    Pinned(Option<Arc<jsonschema::Validator>>, Option<Arc<ToolView>>),
    Changed(String),
}

/// What step 6 lets through: the pinned validator and policy view, if any.
type Pinned = (Option<Arc<jsonschema::Validator>>, Option<Arc<ToolView>>);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("tools", &self.tools.len())
            .field("workflows", &self.workflows.len())
            .field("agents", &self.agents.len())
            .field("policies", &self.policies.len())
            .field("slice_policies", &self.slice_policies)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Evaluates every Cedar policy for every call instead of the tool's
    /// slice. Decisions are identical; only slower. For benchmarks that
    /// measure what the per-tool index saves.
    #[must_use]
    pub fn without_policy_index(mut self) -> Self {
        self.slice_policies = false;
        self
    }

    /// The time now, from the engine's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Records what is known of `tool`'s upstream definition. A pinned
    /// `inputSchema` that does not compile (or is not bounded) makes the
    /// tool `Changed`: a schema the gateway cannot check is not trusted.
    /// For a tool without a configured `args_schema`, the pinned
    /// `inputSchema` also types `context.args`, exactly as a configured
    /// schema would: the policies are validated against it again, and
    /// arguments they read that it does not type are refused.
    /// Returns the status applied; `None` for a tool not registered.
    pub fn set_pin(&self, tool: &str, status: PinStatus) -> Option<PinStatus> {
        let &i = self.tool_index.get(tool)?;
        let configured = self.tools.get(i).is_none_or(|t| t.schema_configured);
        let (state, applied) = match status {
            PinStatus::Unchecked => (PinState::Unchecked, PinStatus::Unchecked),
            PinStatus::Changed { detail } => (
                PinState::Changed(detail.clone()),
                PinStatus::Changed { detail },
            ),
            PinStatus::Pinned { input_schema } => {
                let compiled = match &input_schema {
                    None => Ok((None, None)),
                    Some(schema) => args::check_bounds(schema)
                        .map_err(|why| format!("schema too large: {why}"))
                        .and_then(|()| crate::build::compile_schema(schema))
                        .and_then(|v| {
                            let view = if configured {
                                None
                            } else {
                                let view = self.policies.view_for(i, Shape::of_args(schema))?;
                                Some(Arc::new(view))
                            };
                            Ok((Some(Arc::new(v)), view))
                        }),
                };
                match compiled {
                    Ok((v, view)) => (
                        PinState::Pinned(v, view),
                        PinStatus::Pinned { input_schema },
                    ),
                    Err(why) => {
                        let detail = format!("the pinned inputSchema cannot be checked: {why}");
                        (
                            PinState::Changed(detail.clone()),
                            PinStatus::Changed { detail },
                        )
                    }
                }
            }
        };
        let mut pins = self.pins.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = pins.get_mut(i) {
            *slot = state;
        }
        Some(applied)
    }

    /// Step 6 for tool `i`: the pinned validator and policy view to apply,
    /// or the denial.
    fn pin_check(&self, i: usize, tool: &str) -> Result<Pinned, Box<Decision>> {
        let pins = self.pins.read().unwrap_or_else(PoisonError::into_inner);
        match pins.get(i) {
            None | Some(PinState::Unchecked) => Ok((None, None)),
            Some(PinState::Pinned(v, view)) => Ok((v.clone(), view.clone())),
            Some(PinState::Changed(detail)) => Err(Box::new(Decision::deny(
                tool,
                Reason::ToolDefinitionChanged,
                detail.clone(),
            ))),
        }
    }

    /// Whether the `auto_approve` policies approve `task`'s request for
    /// `tool` (with the agent's stated `reason`): the ids of the permits
    /// that do, or `None` — the request then waits for a human.
    pub fn auto_approve(&self, task: &Task, tool: &str, reason: &str) -> Option<Vec<String>> {
        self.tool_index.get(tool)?;
        self.auto_approve.as_ref()?.decide(
            &task.agent_id,
            &task.agent_type,
            tool,
            reason,
            &task.state,
        )
    }

    /// Why an allowed `decision` of `task` still needs an approval before
    /// it may run — a tool with `approval = true`, a high-risk tool of an
    /// agent with `approve_high_risk`, or a move into a state that needs
    /// approval — or `None`.
    pub fn approval_needed(&self, task: &Task, decision: &Decision) -> Option<String> {
        if let Some(t) = decision.transition.as_ref().filter(|t| t.approval) {
            return Some(format!("entering state {} needs approval", t.to));
        }
        let def = self.tool(&decision.tool)?;
        let agent = self.agents.get(&task.agent_id)?;
        if def.approval {
            return Some(format!("every call of {} needs approval", def.name));
        }
        if agent.approve_high_risk && def.risk == Risk::High {
            return Some(format!(
                "every high-risk call of agent {} needs approval",
                task.agent_id
            ));
        }
        None
    }

    /// The `[anomaly]` rules.
    pub fn anomaly(&self) -> &crate::anomaly::Rules {
        &self.anomaly
    }

    /// A registered tool by gateway name.
    pub fn tool(&self, name: &str) -> Option<&ToolDef> {
        self.tool_index.get(name).and_then(|&i| self.tools.get(i))
    }

    /// Every registered tool, in configuration order.
    pub fn tools(&self) -> impl Iterator<Item = &ToolDef> {
        self.tools.iter()
    }

    /// The number of user Cedar policies loaded.
    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    /// The allowlist of `agent_id`, in registry order; `None` for an unknown agent.
    pub fn allowlist(&self, agent_id: &str) -> Option<Vec<&str>> {
        let agent = self.agents.get(agent_id)?;
        Some(
            self.tools
                .iter()
                .enumerate()
                .filter(|(i, _)| agent.acl.contains(i))
                .map(|(_, t)| t.name.as_str())
                .collect(),
        )
    }

    /// The tools callable in `state` of agent type `agent_type`.
    pub fn state_tools(&self, agent_type: &str, state: &str) -> Option<Vec<&str>> {
        let wf = self.workflows.get(*self.workflow_index.get(agent_type)?)?;
        let (_, st) = wf.state(state)?;
        let mut names: Vec<&str> = st
            .tools
            .iter()
            .filter_map(|&i| self.tools.get(i).map(|t| t.name.as_str()))
            .collect();
        names.sort_unstable();
        Some(names)
    }

    /// The tools of `state` and of every state reachable from it, in
    /// registry order: what a token minted on entering `state` may call.
    pub fn phase_tools(&self, agent_type: &str, state: &str) -> Option<Vec<&str>> {
        let wf = self.workflows.get(*self.workflow_index.get(agent_type)?)?;
        let (start, _) = wf.state(state)?;
        let mut seen = vec![false; wf.states.len()];
        let mut stack = vec![start];
        let mut tools = HashSet::new();
        while let Some(i) = stack.pop() {
            match seen.get_mut(i) {
                Some(s) if !*s => *s = true,
                _ => continue,
            }
            if let Some(st) = wf.states.get(i) {
                tools.extend(st.tools.iter().copied());
                stack.extend(st.next.iter().copied());
            }
        }
        Some(
            self.tools
                .iter()
                .enumerate()
                .filter(|(i, _)| tools.contains(i))
                .map(|(_, t)| t.name.as_str())
                .collect(),
        )
    }

    /// Starts a task for `agent_id` in its workflow's initial state.
    ///
    /// `tools` narrows the task to a subset of the allowlist (least
    /// privilege per task); `None` grants the whole allowlist. A tool outside
    /// the allowlist, or unknown, is `tool_not_granted`.
    pub fn start_task(
        &self,
        task_id: &str,
        agent_id: &str,
        goal: &str,
        tools: Option<&[String]>,
    ) -> Result<Task, Denial> {
        let agent = self
            .agents
            .get(agent_id)
            .ok_or_else(|| Denial::new(Reason::ToolNotGranted, "unknown agent"))?;
        let wf = self
            .workflows
            .get(agent.agent_type)
            .ok_or_else(|| Denial::new(Reason::InternalError, "agent type missing"))?;
        let initial = wf
            .states
            .get(wf.initial)
            .ok_or_else(|| Denial::new(Reason::InternalError, "initial state missing"))?;
        let granted: BTreeSet<String> = match tools {
            None => agent
                .acl
                .iter()
                .filter_map(|&i| self.tools.get(i).map(|t| t.name.clone()))
                .collect(),
            Some(requested) => {
                let mut set = BTreeSet::new();
                for name in requested {
                    // An unknown tool is outside the allowlist too, and is
                    // reported the same way, so a task request cannot probe
                    // the registry (DESIGN section 9).
                    let Some(&i) = self.tool_index.get(name) else {
                        return Err(Denial::new(
                            Reason::ToolNotGranted,
                            format!("{name:?} is not on the allowlist of {agent_id}"),
                        ));
                    };
                    if !agent.acl.contains(&i) {
                        return Err(Denial::new(
                            Reason::ToolNotGranted,
                            format!("{name} is not on the allowlist of {agent_id}"),
                        ));
                    }
                    set.insert(name.clone());
                }
                set
            }
        };
        Ok(Task {
            id: task_id.to_owned(),
            agent_id: agent_id.to_owned(),
            agent_type: wf.name.clone(),
            goal: goal.to_owned(),
            state: initial.name.clone(),
            status: TaskStatus::Active,
            tools: granted,
            grants: Vec::new(),
            calls: 0,
            tool_calls: Default::default(),
            version: 0,
            started_at: self.clock.now(),
            watch: crate::anomaly::Watch::default(),
        })
    }

    /// Checks an explicit move of `task` to state `to`: it must be one of
    /// the current state's `next` states.
    pub fn transition(&self, task: &Task, to: &str) -> Result<Transition, Denial> {
        if task.status != TaskStatus::Active {
            return Err(Denial::new(
                Reason::TaskNotActive,
                format!("task is {}", task.status.as_str()),
            ));
        }
        let (_, wf) = self.workflow_of(task).map_err(|d| Denial::new(d.0, d.1))?;
        let (_, from) = wf
            .state(&task.state)
            .ok_or_else(|| Denial::new(Reason::InternalError, "task is in an unknown state"))?;
        from.next
            .iter()
            .copied()
            .find(|&i| wf.states.get(i).is_some_and(|s| s.name == to))
            .and_then(|i| wf.transition(from, i))
            .ok_or_else(|| {
                Denial::new(
                    Reason::StateViolation,
                    format!("no transition from {} to {to:?}", from.name),
                )
            })
    }

    fn workflow_of(&self, task: &Task) -> Result<(&AgentDef, &Workflow), (Reason, &'static str)> {
        let agent = self
            .agents
            .get(&task.agent_id)
            .ok_or((Reason::InternalError, "the task's agent is not configured"))?;
        let wf = self
            .workflows
            .get(agent.agent_type)
            .filter(|wf| wf.name == task.agent_type)
            .ok_or((
                Reason::InternalError,
                "the task's agent type does not match the configuration",
            ))?;
        Ok((agent, wf))
    }

    /// Steps 1–5 of [`Engine::decide`] for `tool` in `task`, without
    /// arguments: would this task be allowed to call this tool now? An
    /// allowed answer carries the transition the call would make. Used
    /// where no arguments exist yet, such as issuing a per-hop credential.
    pub fn check_tool(&self, task: &Task, tool: &str) -> Decision {
        match self.gate(task, tool) {
            Ok(gate) => match self.pin_check(gate.tool_i, tool) {
                Ok(_) => Decision::allow(tool, gate.transition),
                Err(denial) => *denial,
            },
            Err(denial) => *denial,
        }
    }

    /// Decides a token exchange for `tool` in `task` (RFC 8693, at
    /// `/oauth/token`): a per-hop token with which the agent calls the
    /// upstream itself, with arguments the gateway never sees. The steps of
    /// [`Self::decide`] up to the arguments — task, ACL, state, budgets, the
    /// pin — and then two refusals that a call would not meet:
    /// - a tool of a *next* state (`state_violation`): a task moves by its
    ///   calls, which rotate the token at `reverify` states; an exchange
    ///   never moves it;
    /// - a tool that a Cedar policy applies to (`args_invalid`): the policy
    ///   could not see the arguments, so it could not hold.
    ///
    /// Pure, like `decide`; an allowed exchange is applied (counted) with
    /// [`Task::apply`] like a call.
    pub fn decide_exchange(&self, task: &Task, tool: &str) -> Decision {
        let gate = match self.gate(task, tool) {
            Ok(gate) => gate,
            Err(denial) => return *denial,
        };
        if let Some(t) = &gate.transition {
            return Decision::deny(
                tool,
                Reason::StateViolation,
                format!(
                    "a token exchange is only for tools of the task's current state {}, \
                     not of state {}",
                    t.from, t.to
                ),
            );
        }
        let (_, pinned_view) = match self.pin_check(gate.tool_i, tool) {
            Ok(found) => found,
            Err(denial) => return *denial,
        };
        let Some(view) = pinned_view
            .as_deref()
            .or_else(|| self.policies.view(gate.tool_i).map(AsRef::as_ref))
        else {
            return Decision::deny(
                tool,
                Reason::InternalError,
                "tool missing from the policy index",
            );
        };
        if self.policies.applies(view, !self.slice_policies) {
            return Decision::deny(
                tool,
                Reason::ArgsInvalid,
                "Cedar policies apply to this tool, and they could not see the arguments \
                 of a call made with an exchanged token",
            );
        }
        Decision::allow(tool, None)
    }

    /// Decides a call of `tool` with `args` in `task`. Pure: the task is not
    /// changed; apply an allowed decision with [`Task::apply`].
    pub fn decide(&self, task: &Task, tool: &str, args: &Value) -> Decision {
        let (tool_i, def, transition) = match self.gate(task, tool) {
            Ok(gate) => (gate.tool_i, gate.def, gate.transition),
            Err(denial) => return *denial,
        };
        // 6. The upstream's definition is still the pinned one.
        let (pinned, pinned_view) = match self.pin_check(tool_i, tool) {
            Ok(found) => found,
            Err(denial) => return *denial,
        };
        let Some(view) = pinned_view
            .as_deref()
            .or_else(|| self.policies.view(tool_i).map(AsRef::as_ref))
        else {
            return Decision::deny(
                tool,
                Reason::InternalError,
                "tool missing from the policy index",
            );
        };
        // 7. Arguments: bounds, then the schema (configured, else pinned).
        if let Err(why) = args::check_bounds(args) {
            return Decision::deny(
                tool,
                Reason::ArgsInvalid,
                format!("arguments too large: {why}"),
            );
        }
        if !args.is_object() {
            return Decision::deny(tool, Reason::ArgsInvalid, "arguments must be a JSON object");
        }
        let validator = match (&pinned, def.schema_configured) {
            (Some(v), false) => v.as_ref(),
            _ => &def.validator,
        };
        if let Err(err) = validator.validate(args) {
            let keyword = err.kind().keyword().to_owned();
            let at = err.instance_path().to_string();
            return Decision::deny(
                tool,
                Reason::ArgsInvalid,
                format!(
                    "{}: fails the schema's {keyword:?} rule",
                    args::display_pointer(&at)
                ),
            );
        }

        // An argument a policy reads but Cedar is never shown (undeclared,
        // or without a Cedar type) would make the policy silently not
        // apply: refused, whether or not the policy is in the slice.
        if let Some(why) = view.unseen_argument(&task.agent_id, args) {
            return Decision::deny(tool, Reason::ArgsInvalid, why);
        }

        // 8. Cedar.
        let whole = !self.slice_policies;
        if self.policies.applies(view, whole) {
            let state_name = transition
                .as_ref()
                .map_or(task.state.as_str(), |t| t.to.as_str());
            let context = match self.context(task, tool, view, args, state_name) {
                Ok(c) => c,
                Err(denial) => return *denial,
            };
            match self
                .policies
                .evaluate(view, tool_i, &task.agent_id, context, whole)
            {
                Verdict::Allow => {}
                Verdict::Forbid(ids) => {
                    let detail = format!("forbidden by {}", ids.join(", "));
                    return Decision::deny(tool, Reason::PolicyForbid, detail).with_policies(ids);
                }
                Verdict::Error(ids, why) => {
                    return Decision::deny(
                        tool,
                        Reason::InternalError,
                        format!("policy evaluation failed: {why}"),
                    )
                    .with_policies(ids);
                }
            }
        }

        Decision::allow(tool, transition)
    }

    fn context(
        &self,
        task: &Task,
        tool: &str,
        view: &ToolView,
        args: &Value,
        state: &str,
    ) -> Result<Context, Box<Decision>> {
        let used = self.policies.context_use(view, !self.slice_policies);
        let keep = used.args.as_ref();
        let args = view
            .shape
            .to_cedar_args(args, keep)
            .map_err(|why| Box::new(Decision::deny(tool, Reason::ArgsInvalid, why)))?;
        let mut pairs = vec![("args".to_owned(), args)];
        if used.task {
            let long =
                |n: u64| RestrictedExpression::new_long(i64::try_from(n).unwrap_or(i64::MAX));
            let task_record = RestrictedExpression::new_record([
                (
                    "id".to_owned(),
                    RestrictedExpression::new_string(task.id.clone()),
                ),
                (
                    "state".to_owned(),
                    RestrictedExpression::new_string(state.to_owned()),
                ),
                (
                    "goal".to_owned(),
                    RestrictedExpression::new_string(task.goal.clone()),
                ),
                ("calls".to_owned(), long(task.calls)),
                ("tool_calls".to_owned(), long(task.calls_of(tool))),
            ])
            .map_err(|e| Box::new(Decision::deny(tool, Reason::InternalError, e.to_string())))?;
            pairs.push(("task".to_owned(), task_record));
        }
        if used.agent_type {
            pairs.push((
                "agent_type".to_owned(),
                RestrictedExpression::new_string(task.agent_type.clone()),
            ));
        }
        Context::from_pairs(pairs).map_err(|e| {
            Box::new(Decision::deny(
                tool,
                Reason::InternalError,
                format!("policy context: {e}"),
            ))
        })
    }
}

/// What steps 1–5 found for an allowed tool.
struct Gate<'e> {
    tool_i: usize,
    def: &'e ToolDef,
    transition: Option<Transition>,
}

impl Engine {
    /// Steps 1–5: task active, registry, ACL, workflow state, budgets.
    fn gate(&self, task: &Task, tool: &str) -> Result<Gate<'_>, Box<Decision>> {
        let deny = |reason, detail: String| Err(Box::new(Decision::deny(tool, reason, detail)));
        // 1. Task active.
        if task.status != TaskStatus::Active {
            return deny(
                Reason::TaskNotActive,
                format!("task is {}", task.status.as_str()),
            );
        }
        let (agent, wf) = match self.workflow_of(task) {
            Ok(found) => found,
            Err((reason, detail)) => return deny(reason, detail.to_owned()),
        };

        // 2. Registry.
        let Some((tool_i, def)) = self
            .tool_index
            .get(tool)
            .and_then(|&i| self.tools.get(i).map(|d| (i, d)))
        else {
            return deny(Reason::ToolUnknown, "no such tool".to_owned());
        };

        // 3. ACL: the task's grant (a subset of the allowlist) or a live elevation.
        let now = self.clock.now();
        let granted =
            (agent.acl.contains(&tool_i) && task.tools.contains(tool)) || task.elevated(tool, now);
        if !granted {
            return deny(
                Reason::ToolNotGranted,
                "tool is not granted to this task".to_owned(),
            );
        }

        // 4. Workflow state, with auto-advance along a `next` edge.
        let Some((_, state)) = wf.state(&task.state) else {
            return deny(
                Reason::InternalError,
                "task is in an unknown state".to_owned(),
            );
        };
        let transition =
            if state.tools.contains(&tool_i) {
                None
            } else {
                let next =
                    wf.auto_advance
                        .then(|| {
                            state.next.iter().copied().find(|&n| {
                                wf.states.get(n).is_some_and(|s| s.tools.contains(&tool_i))
                            })
                        })
                        .flatten();
                match next.and_then(|n| wf.transition(state, n)) {
                    Some(t) => Some(t),
                    None => {
                        return deny(
                            Reason::StateViolation,
                            format!("not allowed in state {}", state.name),
                        );
                    }
                }
            };

        // 5. Budgets.
        if agent.max_calls.is_some_and(|max| task.calls >= max) {
            return deny(Reason::LimitExceeded, "calls per task spent".to_owned());
        }
        if agent
            .per_tool
            .get(&tool_i)
            .is_some_and(|&max| task.calls_of(tool) >= max)
        {
            return deny(
                Reason::LimitExceeded,
                "calls of this tool per task spent".to_owned(),
            );
        }
        Ok(Gate {
            tool_i,
            def,
            transition,
        })
    }
}
