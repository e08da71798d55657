//! Cedar policies: schema generation from the registry, loading and
//! validation of the user's forbid rules, and the per-tool index.
//!
//! # The Cedar model
//!
//! - principal `Agent::"<agent id>"` with attribute `type` (its agent type);
//! - action `Action::"call"`;
//! - resource `Tool::"<tool name>"` with attributes `risk`, `access`, `upstream`;
//! - context `{ args, task: { id, state, goal, calls, tool_calls }, agent_type }`.
//!
//! `context.args` is typed per tool from the tool's argument schema (see
//! [`crate::args`]). Cedar has one context type per action, so the gateway
//! generates one schema per tool and validates each policy against the
//! schema of every tool it can apply to: a policy whose scope names
//! `resource == Tool::"t"` only against `t`'s, an unscoped one against all.
//! `context.task.state` is the state the call runs in (after an
//! auto-advance); `context.task.calls` and `tool_calls` count the allowed
//! calls of the task before this one, all tools and this tool.
//!
//! # Decisions
//!
//! Calls that pass the registry, ACL and state checks carry an implicit base
//! `permit`; user policies must be `forbid` rules. A forbid that matches
//! denies with `policy_forbid` and names its `@id`. A policy whose
//! evaluation fails denies with `internal_error`: Cedar would skip it, which
//! for a forbid is a fail-open.
//!
//! # Index
//!
//! Each tool gets its own `PolicySet`: the policies whose scope names it plus
//! the unscoped ones. A decision evaluates only that slice, so its cost does
//! not grow with the policies of other tools. A tool with no applicable
//! policy skips Cedar altogether.
//!
//! # Arguments Cedar never sees
//!
//! A policy's reads of `context.args` are attribute paths. Held against a
//! tool's [`Shape`], a read is seen, unsendable (the schema rejects it), or
//! unseen: an argument that can be sent but has no Cedar type, or is not
//! declared. Validation proves a rule that reads an unseen argument
//! impossible, and it would be dropped without a word; instead, each tool's
//! [`ToolView`] lists its unseen reads, a call that carries one is refused
//! (`args_invalid`), and `check` reports the pair when the schema is
//! configured. A tool typed by its pinned `inputSchema` gets its view when
//! the pin arrives ([`PolicyIndex::view_for`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Effect, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, PrincipalConstraint, Request,
    ResourceConstraint, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use portcullis_config::{Finding, KeyPath, LoadedConfig, Reporter, line_of};
use serde_json::{Value, json};

use crate::args::{Shape, Sight};

/// The id of the implicit base permit in every slice.
const BASE_PERMIT_ID: &str = "portcullis:base-permit";

/// What the registry tells the policy layer about one tool.
#[derive(Debug)]
pub(crate) struct ToolFacts<'a> {
    pub name: &'a str,
    pub upstream: &'a str,
    pub risk: &'a str,
    pub access: &'a str,
    pub shape: &'a Shape,
    /// The schema is configured (`args_schema`), not awaited from the pin.
    pub configured: bool,
}

/// The outcome of evaluating a tool's policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No forbid matched.
    Allow,
    /// These forbids matched.
    Forbid(Vec<String>),
    /// Evaluation failed (policy ids involved, and a description).
    Error(Vec<String>, String),
}

/// The loaded, validated and indexed policies.
#[derive(Debug)]
pub(crate) struct PolicyIndex {
    /// Every user policy plus the base permit: the unsliced set.
    whole: PolicySet,
    /// Per tool (registry order): what its policies see, from the tool's
    /// configured (or default) argument schema.
    views: Vec<Arc<ToolView>>,
    /// The user policies, kept to derive a tool's view again when its
    /// schema arrives with its pinned definition.
    policies: Vec<Loaded>,
    base: Policy,
    entities: Entities,
    action: EntityUid,
    agents: HashMap<String, EntityUid>,
    tools: Vec<EntityUid>,
    authorizer: Authorizer,
}

/// What the policies of one tool see of its calls, for one argument schema.
#[derive(Debug)]
pub(crate) struct ToolView {
    /// The Cedar shape of the arguments.
    pub(crate) shape: Shape,
    /// Its slice plus the base permit, or `None` when no user policy can
    /// match its calls.
    slice: Option<PolicySet>,
    /// What the slice reads of the context.
    context_use: ContextUse,
    /// For the unsliced set: what the policies whose scope admits the tool
    /// read (its slice, plus those proved impossible for it).
    context_use_scoped: ContextUse,
    /// Arguments those policies read that the shape never shows to Cedar.
    unseen: Vec<UnseenRead>,
}

/// An argument that a policy reads and Cedar is never shown: a call that
/// carries it is refused, since the policy would silently not apply.
#[derive(Debug)]
struct UnseenRead {
    /// Property names from the arguments object down to it.
    path: Vec<String>,
    /// `Some`: the value there is read whole, and only the parts this shape
    /// types are shown; `None`: nothing of it is shown.
    whole: Option<Shape>,
    /// Why it is not shown.
    why: String,
    /// The (first) policy that reads it.
    policy: String,
    /// The agent that policy is scoped to, if any.
    agent: Option<String>,
}

impl ToolView {
    /// A detail for `args_invalid` when `args` of a call by `agent` carry
    /// an argument a policy of the tool reads but Cedar never sees; `None`
    /// when every argument policies read is shown to them.
    pub(crate) fn unseen_argument(&self, agent: &str, args: &Value) -> Option<String> {
        let escape = |s: &str| s.replace('~', "~0").replace('/', "~1");
        self.unseen.iter().find_map(|read| {
            if read.agent.as_deref().is_some_and(|a| a != agent) {
                return None;
            }
            let mut value = args;
            for key in &read.path {
                value = value.as_object()?.get(key)?;
            }
            let rest = match &read.whole {
                None => String::new(),
                Some(shape) => shape.first_unseen(value)?,
            };
            let pointer: String = read.path.iter().map(|k| format!("/{}", escape(k))).collect();
            Some(format!(
                "{}{rest}: read by policy {:?} but never shown to it ({}); declare it in the tool's schema with a type policies can see",
                crate::args::display_pointer(&pointer),
                read.policy,
                read.why
            ))
        })
    }
}

/// Per tool: the ids of the policies validation proves can never match.
type Impossible = HashMap<usize, HashSet<String>>;

/// The Cedar entities, with the uids of agents (by id) and tools (by index).
type PolicyEntities = (Entities, HashMap<String, EntityUid>, Vec<EntityUid>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    All,
    Tool(usize),
}

#[derive(Debug)]
struct Loaded {
    policy: Policy,
    id: String,
    file: std::path::PathBuf,
    line: Option<usize>,
    /// Index of its file in `LoadedConfig::policies`.
    file_index: usize,
    target: Target,
    /// The agent its scope names, if any.
    agent: Option<String>,
    /// What it reads of `context.args`.
    reads: Vec<ArgRead>,
}

impl Loaded {
    fn admits(&self, tool: usize) -> bool {
        match self.target {
            Target::All => true,
            Target::Tool(t) => t == tool,
        }
    }
}

fn uid(type_name: &str, id: &str) -> Option<EntityUid> {
    let type_name = EntityTypeName::from_str(type_name).ok()?;
    Some(EntityUid::from_type_name_and_id(
        type_name,
        EntityId::new(id),
    ))
}

/// The Cedar schema (JSON syntax) for calls of a tool whose arguments have
/// `shape`.
pub(crate) fn schema_json(shape: &Shape) -> Value {
    let string = json!({ "type": "String" });
    let long = json!({ "type": "Long" });
    json!({
        "": {
            "entityTypes": {
                "Agent": { "shape": { "type": "Record", "attributes": { "type": string } } },
                "Tool": { "shape": { "type": "Record", "attributes": {
                    "risk": string, "access": string, "upstream": string
                } } }
            },
            "actions": {
                "call": { "appliesTo": {
                    "principalTypes": ["Agent"],
                    "resourceTypes": ["Tool"],
                    "context": { "type": "Record", "attributes": {
                        "args": shape.to_cedar_schema(),
                        "task": { "type": "Record", "attributes": {
                            "id": string, "state": string, "goal": string,
                            "calls": long, "tool_calls": long
                        } },
                        "agent_type": string
                    } }
                } }
            }
        }
    })
}

/// The first source offset a Cedar diagnostic points at.
fn diagnostic_offset(diag: &dyn Diagnostic) -> Option<usize> {
    diag.labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset())
}

fn one_line(text: impl std::fmt::Display) -> String {
    text.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl PolicyIndex {
    /// Loads, checks and indexes the policy files of `loaded`. Every problem
    /// goes to `report`; `None` when there was any.
    pub(crate) fn build(
        loaded: &LoadedConfig,
        tools: &[ToolFacts<'_>],
        agents: &[(&str, &str)],
        report: &mut Reporter<'_>,
    ) -> Option<Self> {
        let before = report.is_empty();
        let by_name: HashMap<&str, usize> =
            tools.iter().enumerate().map(|(i, t)| (t.name, i)).collect();
        let agent_ids: HashSet<&str> = agents.iter().map(|(id, _)| *id).collect();
        let policies = Self::parse_files(loaded, &by_name, &agent_ids, report);
        let (impossible, invalid) = Self::validate(loaded, &policies, tools, report);
        Self::report_never_applies(&policies, tools, &impossible, &invalid, report);
        if !before || !report.is_empty() {
            return None;
        }
        let fail = |report: &mut Reporter<'_>, what: String| {
            report.at(&KeyPath::root().key("policies"), what);
        };

        let base = match Policy::parse(
            Some(PolicyId::new(BASE_PERMIT_ID)),
            "permit(principal, action, resource);",
        ) {
            Ok(p) => p,
            Err(e) => {
                fail(
                    report,
                    format!("internal error building the base permit: {e}"),
                );
                return None;
            }
        };
        let mut whole = PolicySet::new();
        for p in policies.iter().map(|p| &p.policy).chain([&base]) {
            if let Err(e) = whole.add(p.clone()) {
                fail(report, format!("policy {}: {e}", p.id()));
                return None;
            }
        }
        let none = HashSet::new();
        let mut views = Vec::with_capacity(tools.len());
        for (i, tool) in tools.iter().enumerate() {
            let never = impossible.get(&i).unwrap_or(&none);
            match view(&policies, &base, i, tool.shape.clone(), never) {
                Ok(v) => views.push(Arc::new(v)),
                Err(e) => {
                    fail(report, format!("internal error indexing policies: {e}"));
                    return None;
                }
            }
        }

        let entities = match Self::entities(tools, agents) {
            Ok(e) => e,
            Err(e) => {
                fail(
                    report,
                    format!("internal error building policy entities: {e}"),
                );
                return None;
            }
        };
        let action = uid("Action", "call")?;
        Some(Self {
            whole,
            views,
            policies,
            base,
            entities: entities.0,
            action,
            agents: entities.1,
            tools: entities.2,
            authorizer: Authorizer::new(),
        })
    }

    /// The view of tool `tool` when its arguments have `shape` (from a
    /// pinned `inputSchema`): the policies are validated against it as at
    /// build time, and those proved impossible are left out. A policy that
    /// does not validate stays in: if it fails at run time, the call is
    /// denied (`internal_error`).
    pub(crate) fn view_for(&self, tool: usize, shape: Shape) -> Result<ToolView, String> {
        let schema = Schema::from_json_value(schema_json(&shape))
            .map_err(|e| format!("cannot derive a Cedar schema: {}", one_line(e)))?;
        let mut set = PolicySet::new();
        for p in self.policies.iter().filter(|p| p.admits(tool)) {
            set.add(p.policy.clone()).map_err(one_line)?;
        }
        let result = Validator::new(schema).validate(&set, ValidationMode::Strict);
        let invalid: HashSet<String> = result
            .validation_errors()
            .map(|e| e.policy_id().to_string())
            .collect();
        let never: HashSet<String> = result
            .validation_warnings()
            .filter(|w| matches!(w, cedar_policy::ValidationWarning::ImpossiblePolicy(_)))
            .map(|w| w.policy_id().to_string())
            .filter(|id| !invalid.contains(id))
            .collect();
        view(&self.policies, &self.base, tool, shape, &never)
    }

    /// Findings for the policy/tool pairs where a rule cannot apply as
    /// written: it reads an argument the tool can receive but Cedar is never
    /// shown, or (for a policy scoped to the tool) validation proves its
    /// condition false. Tools whose schema comes with the pinned definition
    /// are judged when the pin arrives (calls carrying an argument no policy
    /// can see are refused until then).
    fn report_never_applies(
        policies: &[Loaded],
        tools: &[ToolFacts<'_>],
        impossible: &Impossible,
        invalid: &HashSet<(String, usize)>,
        report: &mut Reporter<'_>,
    ) {
        for (i, tool) in tools.iter().enumerate() {
            if !tool.configured {
                continue;
            }
            for p in policies.iter().filter(|p| p.admits(i)) {
                if invalid.contains(&(p.id.clone(), i)) {
                    continue;
                }
                let unseen: Vec<String> = p
                    .reads
                    .iter()
                    .filter_map(|read| match tool.shape.sight(&read.path, read.presence) {
                        Sight::Seen | Sight::Unsendable => None,
                        Sight::Unseen(why) => Some(format!(
                            "{} is never shown to policies ({why}: {})",
                            read.display(),
                            why.remedy()
                        )),
                        Sight::Partial(_) => Some(format!(
                            "{} is read whole but parts of it are never shown to policies (type every part of it, and close its objects with additionalProperties = false)",
                            read.display()
                        )),
                    })
                    .fold(Vec::new(), |mut seen, line| {
                        if !seen.contains(&line) {
                            seen.push(line);
                        }
                        seen
                    });
                let here = |message: String| {
                    Finding::new(&p.file, p.line, format!("policy {:?}", p.id), message)
                };
                if !unseen.is_empty() {
                    report.push(here(format!(
                        "cannot apply to tool {} as its args_schema stands: {}",
                        tool.name,
                        unseen.join("; ")
                    )));
                } else if p.target == Target::Tool(i)
                    && impossible
                        .get(&i)
                        .is_some_and(|never| never.contains(&p.id))
                {
                    report.push(here(format!(
                        "can never apply to tool {}: its condition is false for every call the tool's args_schema admits",
                        tool.name
                    )));
                }
            }
        }
    }

    fn parse_files(
        loaded: &LoadedConfig,
        by_name: &HashMap<&str, usize>,
        agents: &HashSet<&str>,
        report: &mut Reporter<'_>,
    ) -> Vec<Loaded> {
        let mut out: Vec<Loaded> = Vec::new();
        let mut seen: HashMap<String, (std::path::PathBuf, Option<usize>)> = HashMap::new();
        for (file_index, file) in loaded.policies.iter().enumerate() {
            if let Err((offset, why)) = check_complexity(&file.text) {
                let line = Some(line_of(&file.text, offset));
                report.push(Finding::new(&file.path, line, "", why));
                continue;
            }
            let set = match PolicySet::from_str(&file.text) {
                Ok(set) => set,
                Err(errors) => {
                    for err in errors.iter() {
                        let line = diagnostic_offset(err).map(|o| line_of(&file.text, o));
                        report.push(Finding::new(
                            &file.path,
                            line,
                            "",
                            format!("syntax error: {}", one_line(err)),
                        ));
                    }
                    continue;
                }
            };
            if let Some(t) = set.templates().next() {
                let line = file
                    .text
                    .find(&t.to_string())
                    .map(|o| line_of(&file.text, o));
                report.push(Finding::new(
                    &file.path,
                    line,
                    "",
                    "policy templates are not supported",
                ));
            }
            // Cedar numbers the policies of a file `policy0`, `policy1`, …
            // in source order, and keeps each one's exact text: find each
            // text after the previous one, so identical policies get their
            // own lines, in one linear pass.
            let mut numbered: Vec<(u64, Policy)> = set
                .policies()
                .map(|p| {
                    let n = p
                        .id()
                        .to_string()
                        .trim_start_matches("policy")
                        .parse()
                        .unwrap_or(u64::MAX);
                    (n, p.clone())
                })
                .collect();
            numbered.sort_by_key(|(n, _)| *n);
            let mut cursor = 0usize;
            let mut in_file = Vec::with_capacity(numbered.len());
            for (_, p) in numbered {
                let text = p.to_string();
                let offset = file
                    .text
                    .get(cursor..)
                    .and_then(|rest| rest.find(&text))
                    .map_or(cursor, |o| cursor + o);
                cursor = offset.saturating_add(text.len()).min(file.text.len());
                in_file.push((offset, p));
            }
            // Lines counted incrementally: offsets only grow.
            let (mut counted_to, mut line_number) = (0usize, 1usize);
            for (offset, policy) in in_file {
                line_number += file
                    .text
                    .as_bytes()
                    .get(counted_to..offset)
                    .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());
                counted_to = counted_to.max(offset);
                let line = Some(line_number);
                let id = match policy.annotation("id") {
                    Some(id) => id.to_owned(),
                    None => format!("{}:{line_number}", file_label(&file.path)),
                };
                let here =
                    |msg: String| Finding::new(&file.path, line, format!("policy {id:?}"), msg);
                if id == BASE_PERMIT_ID {
                    report.push(here("this id is reserved".to_owned()));
                    continue;
                }
                if let Some((other_file, other_line)) = seen.get(&id) {
                    report.push(here(format!(
                        "duplicate policy id (also at {}:{})",
                        other_file.display(),
                        other_line.unwrap_or(0)
                    )));
                    continue;
                }
                seen.insert(id.clone(), (file.path.clone(), line));
                if policy.effect() != Effect::Forbid {
                    report.push(here(
                        "only forbid policies are allowed: calls that pass the registry, ACL and state checks are permitted implicitly".to_owned(),
                    ));
                    continue;
                }
                let principal = match policy.principal_constraint() {
                    PrincipalConstraint::Eq(p)
                    | PrincipalConstraint::In(p)
                    | PrincipalConstraint::IsIn(_, p) => Some(p),
                    PrincipalConstraint::Any | PrincipalConstraint::Is(_) => None,
                };
                if let Some(p) = &principal
                    && !(p.type_name().basename() == "Agent"
                        && agents.contains(&p.id().unescaped()))
                {
                    report.push(here(format!("principal {p} is not a configured agent")));
                    continue;
                }
                let target = match policy.resource_constraint() {
                    ResourceConstraint::Any | ResourceConstraint::Is(_) => Target::All,
                    ResourceConstraint::Eq(r)
                    | ResourceConstraint::In(r)
                    | ResourceConstraint::IsIn(_, r) => {
                        let tool = (r.type_name().basename() == "Tool")
                            .then(|| by_name.get(r.id().unescaped()).copied())
                            .flatten();
                        match tool {
                            Some(i) => Target::Tool(i),
                            None => {
                                report.push(here(format!(
                                    "resource {r} is not a tool of the registry"
                                )));
                                continue;
                            }
                        }
                    }
                };
                let agent = principal.map(|p| p.id().unescaped().to_owned());
                out.push(Loaded {
                    reads: arg_reads(&policy),
                    policy: policy.new_id(PolicyId::new(&id)),
                    id,
                    file: file.path.clone(),
                    line,
                    file_index,
                    target,
                    agent,
                });
            }
        }
        out
    }

    /// Validates every policy against the schema of every tool it applies
    /// to. Returns, per tool, the policies the typechecker proves can never
    /// match its calls (a condition that is always false for that tool's
    /// argument types, such as `context.args has limit` for a tool without
    /// `limit`): they are left out of its slice.
    /// Also returns the (policy, tool) pairs that do not validate.
    fn validate(
        loaded: &LoadedConfig,
        policies: &[Loaded],
        tools: &[ToolFacts<'_>],
        report: &mut Reporter<'_>,
    ) -> (Impossible, HashSet<(String, usize)>) {
        let mut impossible: Impossible = HashMap::new();
        let mut invalid: HashSet<(String, usize)> = HashSet::new();
        let mut reported: HashSet<(String, String)> = HashSet::new();
        // Tools with the same argument shape share one schema and one
        // validation of the unscoped policies.
        let mut shapes: BTreeMap<String, (Vec<usize>, Schema)> = BTreeMap::new();
        for (i, tool) in tools.iter().enumerate() {
            let json = schema_json(tool.shape);
            let key = json.to_string();
            if let Some((members, _)) = shapes.get_mut(&key) {
                members.push(i);
                continue;
            }
            match Schema::from_json_value(json) {
                Ok(schema) => {
                    shapes.insert(key, (vec![i], schema));
                }
                Err(e) => report.at(
                    &KeyPath::root().key("tools").index(i).key("args_schema"),
                    format!("cannot derive a Cedar schema: {}", one_line(e)),
                ),
            }
        }
        let by_id: HashMap<&str, &Loaded> = policies.iter().map(|p| (p.id.as_str(), p)).collect();
        for (members, schema) in shapes.values() {
            let mut set = PolicySet::new();
            for p in policies {
                let applies = match p.target {
                    Target::All => true,
                    Target::Tool(t) => members.contains(&t),
                };
                if applies && set.add(p.policy.clone()).is_err() {
                    continue;
                }
            }
            let validator = Validator::new(schema.clone());
            let result = validator.validate(&set, ValidationMode::Strict);
            for warning in result.validation_warnings() {
                if matches!(
                    warning,
                    cedar_policy::ValidationWarning::ImpossiblePolicy(_)
                ) {
                    for &m in members {
                        impossible
                            .entry(m)
                            .or_default()
                            .insert(warning.policy_id().to_string());
                    }
                }
            }
            // Cedar does not list a policy's type errors in a stable order
            // (two errors of one expression came out either way round from
            // one validation to the next): sort them, so that `check`
            // prints the same findings in the same order every time.
            let mut errors: Vec<_> = result.validation_errors().collect();
            errors.sort_by_cached_key(|err| {
                (
                    err.policy_id().to_string(),
                    diagnostic_offset(*err),
                    one_line(*err),
                )
            });
            for err in errors {
                let id = err.policy_id().to_string();
                invalid.extend(members.iter().map(|&m| (id.clone(), m)));
                let message = one_line(err);
                if !reported.insert((id.clone(), message.clone())) {
                    continue;
                }
                let Some(p) = by_id.get(id.as_str()) else {
                    continue;
                };
                let text = loaded.policies.get(p.file_index).map(|f| f.text.as_str());
                let line = diagnostic_offset(err)
                    .zip(text)
                    .map(|(o, text)| line_of(text, o))
                    .or(p.line);
                let tool_names: Vec<&str> = members
                    .iter()
                    .filter_map(|&m| tools.get(m).map(|t| t.name))
                    .collect();
                let for_tools = if tool_names.len() == 1 {
                    format!("tool {}", tool_names.join(""))
                } else {
                    format!("tools {}", tool_names.join(", "))
                };
                report.push(Finding::new(
                    &p.file,
                    line,
                    format!("policy {id:?}"),
                    format!("does not validate against the schema of {for_tools}: {message}"),
                ));
            }
        }
        (impossible, invalid)
    }

    fn entities(
        tools: &[ToolFacts<'_>],
        agents: &[(&str, &str)],
    ) -> Result<PolicyEntities, String> {
        let mut list = Vec::with_capacity(tools.len() + agents.len());
        let mut agent_uids = HashMap::new();
        let mut tool_uids = Vec::with_capacity(tools.len());
        for (id, agent_type) in agents {
            let u = uid("Agent", id).ok_or("bad agent uid")?;
            let attrs = HashMap::from([(
                "type".to_owned(),
                RestrictedExpression::new_string((*agent_type).to_owned()),
            )]);
            list.push(Entity::new(u.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?);
            agent_uids.insert((*id).to_owned(), u);
        }
        for tool in tools {
            let u = uid("Tool", tool.name).ok_or("bad tool uid")?;
            let attrs = HashMap::from([
                (
                    "risk".to_owned(),
                    RestrictedExpression::new_string(tool.risk.to_owned()),
                ),
                (
                    "access".to_owned(),
                    RestrictedExpression::new_string(tool.access.to_owned()),
                ),
                (
                    "upstream".to_owned(),
                    RestrictedExpression::new_string(tool.upstream.to_owned()),
                ),
            ]);
            list.push(Entity::new(u.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?);
            tool_uids.push(u);
        }
        let entities = Entities::from_entities(list, None).map_err(|e| e.to_string())?;
        Ok((entities, agent_uids, tool_uids))
    }

    /// The view of tool `tool` from its configured (or default) schema.
    pub(crate) fn view(&self, tool: usize) -> Option<&Arc<ToolView>> {
        self.views.get(tool)
    }

    /// What the policies evaluated for a call read of the context.
    pub(crate) fn context_use<'v>(&self, view: &'v ToolView, whole: bool) -> &'v ContextUse {
        if whole {
            &view.context_use_scoped
        } else {
            &view.context_use
        }
    }

    /// Number of user policies.
    pub(crate) fn len(&self) -> usize {
        self.policies.len()
    }

    /// True when some user policy can match calls of the tool of `view` (or,
    /// with `whole`, when there are any policies at all).
    pub(crate) fn applies(&self, view: &ToolView, whole: bool) -> bool {
        if whole {
            !self.policies.is_empty()
        } else {
            view.slice.is_some()
        }
    }

    /// Evaluates the policies for a call of tool `tool` by `agent`.
    pub(crate) fn evaluate(
        &self,
        view: &ToolView,
        tool: usize,
        agent: &str,
        context: Context,
        whole: bool,
    ) -> Verdict {
        let set = if whole {
            Some(&self.whole)
        } else {
            view.slice.as_ref()
        };
        let Some(set) = set else {
            return Verdict::Allow;
        };
        let (Some(principal), Some(resource)) = (self.agents.get(agent), self.tools.get(tool))
        else {
            return Verdict::Error(
                Vec::new(),
                "agent or tool missing from the policy entities".to_owned(),
            );
        };
        let request = match Request::new(
            principal.clone(),
            self.action.clone(),
            resource.clone(),
            context,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return Verdict::Error(Vec::new(), one_line(e)),
        };
        let response = self.authorizer.is_authorized(&request, set, &self.entities);
        let diagnostics = response.diagnostics();
        let errors: Vec<_> = diagnostics.errors().collect();
        if !errors.is_empty() {
            let ids = errors
                .iter()
                .map(|e| match e {
                    cedar_policy::AuthorizationError::PolicyEvaluationError(e) => {
                        e.policy_id().to_string()
                    }
                })
                .collect();
            let detail = errors.iter().map(one_line).collect::<Vec<_>>().join("; ");
            return Verdict::Error(ids, detail);
        }
        match response.decision() {
            CedarDecision::Allow => Verdict::Allow,
            CedarDecision::Deny => {
                let mut ids: Vec<String> = diagnostics
                    .reason()
                    .map(ToString::to_string)
                    .filter(|id| id != BASE_PERMIT_ID)
                    .collect();
                ids.sort();
                Verdict::Forbid(ids)
            }
        }
    }
}

/// The view of tool `tool` whose arguments have `shape`, leaving out the
/// policies in `never` (proved unable to match).
fn view(
    policies: &[Loaded],
    base: &Policy,
    tool: usize,
    shape: Shape,
    never: &HashSet<String>,
) -> Result<ToolView, String> {
    let admitted: Vec<&Loaded> = policies.iter().filter(|p| p.admits(tool)).collect();
    // The unsliced set reaches the condition of these policies only: the
    // others are scoped to other tools. Building what only they read made
    // it deny calls the slice allows (an argument out of Cedar's range that
    // no policy of this tool reads).
    let context_use_scoped = context_read_by(admitted.iter().map(|p| &p.policy));
    let applicable: Vec<&Loaded> = admitted
        .iter()
        .copied()
        .filter(|p| !never.contains(&p.id))
        .collect();
    let context_use = context_read_by(applicable.iter().map(|p| &p.policy));
    let slice = if applicable.is_empty() {
        None
    } else {
        let mut set = PolicySet::new();
        for p in applicable.iter().map(|p| &p.policy).chain([base]) {
            set.add(p.clone()).map_err(one_line)?;
        }
        Some(set)
    };
    // Every policy whose scope admits the tool counts, the impossible ones
    // above all: validation proves them impossible precisely because they
    // read what the shape does not show.
    let mut unseen: Vec<UnseenRead> = Vec::new();
    for p in &admitted {
        for read in &p.reads {
            let (whole, why) = match shape.sight(&read.path, read.presence) {
                Sight::Seen | Sight::Unsendable => continue,
                Sight::Unseen(why) => (None, why.to_string()),
                Sight::Partial(part) => (
                    Some(part),
                    "it is read whole and parts of it have no type policies can see".to_owned(),
                ),
            };
            let known = unseen.iter().any(|u| {
                u.path == read.path && u.whole == whole && (u.agent.is_none() || u.agent == p.agent)
            });
            if !known {
                unseen.push(UnseenRead {
                    path: read.path.clone(),
                    whole,
                    why,
                    policy: p.id.clone(),
                    agent: p.agent.clone(),
                });
            }
        }
    }
    Ok(ToolView {
        shape,
        slice,
        context_use,
        context_use_scoped,
        unseen,
    })
}

/// A read of `context.args` by a policy: the attribute names below it
/// (none: the record as a whole), and whether the last step is a `has`
/// test, which reads no value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ArgRead {
    path: Vec<String>,
    presence: bool,
}

impl ArgRead {
    /// `context.args.a.b`, as a policy would name it.
    fn display(&self) -> String {
        let mut out = "context.args".to_owned();
        for key in &self.path {
            out.push('.');
            out.push_str(key);
        }
        out
    }
}

/// Every read of `context.args` in `policy`.
fn arg_reads(policy: &Policy) -> Vec<ArgRead> {
    let mut out = Vec::new();
    match policy.to_json() {
        Ok(est) => walk_arg_reads(&est, &mut out),
        // Cannot be inspected: count it as reading everything.
        Err(_) => out.push(ArgRead {
            path: Vec::new(),
            presence: false,
        }),
    }
    out.sort();
    out.dedup();
    out
}

/// The read that the access `v` (`.` or `has`) makes of `context.args`,
/// when it is a chain of attribute accesses starting there.
fn args_chain(v: &Value) -> Option<ArgRead> {
    let mut path = Vec::new();
    let mut presence = false;
    let mut cur = v;
    loop {
        if is_context_args(cur) {
            path.reverse();
            return Some(ArgRead { path, presence });
        }
        let access = match (cur.get("."), cur.get("has")) {
            (Some(access), _) => access,
            // Only the outermost step can be a `has` test.
            (None, Some(access)) if path.is_empty() => {
                presence = true;
                access
            }
            _ => return None,
        };
        path.push(access.get("attr")?.as_str()?.to_owned());
        cur = access.get("left")?;
    }
}

fn walk_arg_reads(v: &Value, out: &mut Vec<ArgRead>) {
    match v {
        Value::Object(map) => {
            if let Some(read) = args_chain(v) {
                out.push(read);
                return;
            }
            for op in [".", "has"] {
                let Some(access) = map.get(op) else { continue };
                if let Some(left) = access.get("left")
                    && !is_var_context(left)
                {
                    walk_arg_reads(left, out);
                }
                // `context.task`, `context.agent_type`, `context has …`:
                // not a read of an argument.
                return;
            }
            if is_var_context(v) {
                // `context` as a whole: every argument.
                out.push(ArgRead {
                    path: Vec::new(),
                    presence: false,
                });
                return;
            }
            for child in map.values() {
                walk_arg_reads(child, out);
            }
        }
        Value::Array(items) => {
            for child in items {
                walk_arg_reads(child, out);
            }
        }
        _ => {}
    }
}

/// What of the context a set of policies reads: only that is built for a
/// decision. Policies are validated against the full schema, so a policy can
/// only reach what it names; anything it names is always passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContextUse {
    /// Top-level `context.args` attributes read (through `context.args.x`,
    /// `context.args["x"]` or `context.args has x`); `None`: all of them.
    pub args: Option<HashSet<String>>,
    /// `context.task` is read.
    pub task: bool,
    /// `context.agent_type` is read.
    pub agent_type: bool,
}

impl ContextUse {
    /// Everything: for policies that use `context` as a whole, or that
    /// cannot be inspected.
    fn all() -> Self {
        Self {
            args: None,
            task: true,
            agent_type: true,
        }
    }
}

/// What `policies` read of the context.
fn context_read_by<'p>(policies: impl Iterator<Item = &'p Policy>) -> ContextUse {
    let mut used = ContextUse {
        args: Some(HashSet::new()),
        task: false,
        agent_type: false,
    };
    for policy in policies {
        let Ok(est) = policy.to_json() else {
            return ContextUse::all();
        };
        collect(&est, &mut used);
        if used == ContextUse::all() {
            break;
        }
    }
    used
}

fn is_var_context(v: &Value) -> bool {
    v.get("Var").and_then(Value::as_str) == Some("context")
}

/// `{".": {"left": {"Var": "context"}, "attr": "args"}}`
fn is_context_args(v: &Value) -> bool {
    v.get(".").is_some_and(|dot| {
        dot.get("left").is_some_and(is_var_context)
            && dot.get("attr").and_then(Value::as_str) == Some("args")
    })
}

/// Walks a policy's JSON form and records what it reads of the context.
fn collect(v: &Value, used: &mut ContextUse) {
    match v {
        Value::Object(map) => {
            for op in [".", "has"] {
                let Some(access) = map.get(op) else { continue };
                let (Some(left), Some(attr)) = (
                    access.get("left"),
                    access.get("attr").and_then(Value::as_str),
                ) else {
                    continue;
                };
                if is_context_args(left) {
                    if let Some(args) = used.args.as_mut() {
                        args.insert(attr.to_owned());
                    }
                } else if is_var_context(left) && op == "." {
                    match attr {
                        "task" => used.task = true,
                        "agent_type" => used.agent_type = true,
                        // `context.args` itself, reached here, is used whole.
                        "args" => used.args = None,
                        _ => {}
                    }
                } else if is_var_context(left) {
                    // `context has …`: treat the context as used whole.
                    *used = ContextUse::all();
                } else {
                    collect(left, used);
                }
                return;
            }
            if is_var_context(v) {
                *used = ContextUse::all();
                return;
            }
            for child in map.values() {
                collect(child, used);
            }
        }
        Value::Array(items) => {
            for child in items {
                collect(child, used);
            }
        }
        _ => {}
    }
}

/// Deepest bracket nesting accepted in a policy file.
pub const MAX_POLICY_NESTING: usize = 32;
/// Most tokens accepted in one policy (between two `;`).
pub const MAX_POLICY_TOKENS: usize = 2_000;

/// Rejects policy text whose parse would recurse too deeply.
///
/// Cedar's parser, validator and evaluator recurse over the expression
/// tree, and a few KiB of `(((…` or `a && a && …` overflow the stack — a
/// crash, or worse a validator that gives up silently. Real policies are
/// a few dozen tokens; these bounds leave them room and keep every tree
/// shallow. Strings and `//` comments are skipped.
fn check_complexity(text: &str) -> Result<(), (usize, String)> {
    let bytes = text.as_bytes();
    let (mut depth, mut tokens, mut i) = (0usize, 0usize, 0usize);
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                // A string literal is one token; skip to its closing quote.
                i += 1;
                while let Some(&c) = bytes.get(i) {
                    match c {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                tokens += 1;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while bytes.get(i).is_some_and(|&c| c != b'\n') {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                tokens += 1;
                if depth > MAX_POLICY_NESTING {
                    return Err((
                        i,
                        format!("brackets nested deeper than {MAX_POLICY_NESTING} levels"),
                    ));
                }
            }
            b')' | b']' | b'}' => {
                depth = depth.saturating_sub(1);
                tokens += 1;
            }
            b';' => tokens = 0,
            _ if b.is_ascii_whitespace() => {}
            _ if b.is_ascii_alphanumeric() || b == b'_' => {
                while bytes
                    .get(i + 1)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    i += 1;
                }
                tokens += 1;
            }
            _ => tokens += 1,
        }
        if tokens > MAX_POLICY_TOKENS {
            return Err((
                i,
                format!("a policy longer than {MAX_POLICY_TOKENS} tokens"),
            ));
        }
        i += 1;
    }
    Ok(())
}

fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_by(text: &str) -> Option<Vec<String>> {
        let set = PolicySet::from_str(text).unwrap();
        let mut attrs: Vec<String> = context_read_by(set.policies()).args?.into_iter().collect();
        attrs.sort();
        Some(attrs)
    }

    #[test]
    fn finds_task_and_agent_type_uses() {
        let set = PolicySet::from_str(
            r#"forbid(principal, action, resource) when { context.task.calls > 3 };"#,
        )
        .unwrap();
        let used = context_read_by(set.policies());
        assert!(used.task && !used.agent_type);
        let set = PolicySet::from_str(
            r#"forbid(principal, action, resource) when { context.agent_type == "x" };"#,
        )
        .unwrap();
        let used = context_read_by(set.policies());
        assert!(!used.task && used.agent_type);
        let set = PolicySet::from_str(
            r#"forbid(principal, action, resource) when { context has task };"#,
        )
        .unwrap();
        assert_eq!(context_read_by(set.policies()), ContextUse::all());
    }

    #[test]
    fn finds_the_arguments_policies_read() {
        let named = r#"
            forbid(principal, action, resource) when { context.args.sql like "*" };
            forbid(principal, action, resource) when { context.args has limit && context.args["limit"] > 5 };
            forbid(principal, action, resource) when { context.args.opts has dry && context.task.state == "a" };
        "#;
        assert_eq!(read_by(named).unwrap(), ["limit", "opts", "sql"]);
        // No argument at all.
        assert_eq!(
            read_by(r#"forbid(principal, action, resource) when { context.agent_type == "x" };"#)
                .unwrap(),
            Vec::<String>::new()
        );
    }

    /// Found by the `tools_call_args` fuzz target (fuzz/): the unsliced set
    /// built every argument any policy reads, so an integer out of Cedar's
    /// range in `timeout_ms` of `wh.read`, read only by a policy scoped to
    /// `wh.query`, made it `args_invalid` where the index decided on the
    /// policies of `wh.read` (allow, or `policy_forbid`).
    #[test]
    fn unsliced_set_ignores_arguments_only_other_tools_policies_read() {
        use portcullis_config::PolicyFile;

        let config = r#"
[[upstreams]]
name = "wh"
transport = "stdio"
command = ["wh-server"]

[[tools]]
name = "wh.read"
upstream = "wh"
risk = "low"
access = "read"
args_schema = { type = "object", properties = { path = { type = "string" }, timeout_ms = { type = "integer" } }, required = ["path"] }

[[tools]]
name = "wh.query"
upstream = "wh"
risk = "low"
access = "read"
args_schema = { type = "object", properties = { sql = { type = "string" }, timeout_ms = { type = "integer" } }, required = ["sql"] }

[[agent_types]]
name = "reader"
initial = "read"
states = [
  { name = "read", tools = ["wh.read", "wh.query"], next = ["done"] },
  { name = "done", final = true },
]

[[agents]]
id = "bot"
type = "reader"
tools = ["wh.read", "wh.query"]
bootstrap_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;
        let policies = r#"
@id("query-timeout")
forbid(principal, action, resource == Tool::"wh.query")
when { context.args has timeout_ms && context.args.timeout_ms > 60000 };

@id("read-under-data")
forbid(principal, action, resource == Tool::"wh.read")
when { !(context.args.path like "/data/*") };
"#;
        let engine = || {
            let mut loaded = LoadedConfig::parse(config, "portcullis.toml".as_ref()).unwrap();
            loaded.policies.push(PolicyFile {
                path: "policies/p.cedar".into(),
                text: policies.to_owned(),
                entry: 0,
            });
            let clock = std::sync::Arc::new(crate::ManualClock::new(crate::Timestamp(0)));
            crate::build(&loaded, clock).unwrap()
        };
        let (indexed, whole) = (engine(), engine().without_policy_index());
        let task = indexed.start_task("t", "bot", "read", None).unwrap();
        for (tool, args) in [
            // The minimised fuzz input.
            (
                "wh.read",
                json!({ "path": "", "timeout_ms": 9_551_615_037_095_516_150_u64 }),
            ),
            ("wh.read", json!({ "path": "/data/a", "timeout_ms": 1e300 })),
            ("wh.query", json!({ "sql": "x", "timeout_ms": 90_000 })),
            ("wh.query", json!({ "sql": "x", "timeout_ms": 1e300 })),
        ] {
            let a = indexed.decide(&task, tool, &args);
            assert_eq!(a, whole.decide(&task, tool, &args), "{tool} {args}");
        }
    }

    fn reads_of(text: &str) -> Vec<(Vec<String>, bool)> {
        let set = PolicySet::from_str(text).unwrap();
        let mut out: Vec<(Vec<String>, bool)> = set
            .policies()
            .flat_map(arg_reads)
            .map(|r| (r.path, r.presence))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn finds_argument_paths_nested_and_whole_reads() {
        let path = |p: &[&str], presence| (p.iter().map(|s| (*s).to_owned()).collect(), presence);
        assert_eq!(
            reads_of(
                r#"forbid(principal, action, resource) when { context.args has limit && context.args["limit"] > 5 };"#
            ),
            [path(&["limit"], false), path(&["limit"], true)]
        );
        assert_eq!(
            reads_of(
                r#"forbid(principal, action, resource) when { context.args.opts has dry && context.args.opts.dry && context.task.state == "a" };"#
            ),
            [path(&["opts", "dry"], false), path(&["opts", "dry"], true)]
        );
        assert_eq!(
            reads_of(r#"forbid(principal, action, resource) when { context.args == {} };"#),
            [path(&[], false)]
        );
        assert_eq!(
            reads_of(r#"forbid(principal, action, resource) when { context == {} };"#),
            [path(&[], false)]
        );
        assert!(
            reads_of(
                r#"forbid(principal, action, resource) when { context has args && context.task.calls > 1 && principal.type == "x" };"#
            )
            .is_empty()
        );
    }

    #[test]
    fn whole_uses_keep_every_argument() {
        assert_eq!(
            read_by(r#"forbid(principal, action, resource) when { context.args == {} };"#),
            None
        );
        assert_eq!(
            read_by(r#"forbid(principal, action, resource) when { context has args };"#),
            None
        );
        assert_eq!(
            read_by(r#"forbid(principal, action, resource) when { context == {} };"#),
            None
        );
    }

    /// Found by the `config_load` fuzz target: `!context.args.limit > 1000`
    /// has two type errors (`!` of a Long, `>` of a Bool), which Cedar
    /// listed in either order, so `check` and `build` on the same
    /// configuration gave the same findings in different orders.
    #[test]
    fn type_errors_of_one_policy_come_in_a_stable_order() {
        use portcullis_config::PolicyFile;

        let config = r#"
[[upstreams]]
name = "files"
transport = "stdio"
command = ["files-server"]

[[tools]]
name = "files.read"
upstream = "files"
risk = "low"
access = "read"
args_schema = { type = "object", properties = { path = { type = "string" }, limit = { type = "integer" } }, required = ["path"] }
"#;
        let policies = r#"
@id("bounded-reads")
forbid(principal, action, resource)
when { context.args has limit &&!context.args.limit > 1000 };
"#;
        let findings = || {
            let mut loaded = LoadedConfig::parse_text(config, "portcullis.toml".as_ref()).unwrap();
            loaded.policies.push(PolicyFile {
                path: "policies/p.cedar".into(),
                text: policies.to_owned(),
                entry: 0,
            });
            crate::check(&loaded)
        };
        let first = findings();
        let types: Vec<&str> = first
            .iter()
            .filter(|f| f.path == "policy \"bounded-reads\"")
            .map(|f| f.message.as_str())
            .collect();
        assert_eq!(types.len(), 2, "{first:?}");
        for _ in 0..20 {
            assert_eq!(findings(), first);
        }
    }
}
