//! Building an [`Engine`] from a configuration, and the static checks of
//! `portcullis check` (DESIGN section 3). They are one code path: an engine
//! is only built from a configuration with no finding, and `check` is
//! "build, and list what stopped it".

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use portcullis_config::{
    Credential, CredentialKind, Duration, Finding, Findings, KeyPath, LoadedConfig, Reporter,
    Transport,
};
use serde_json::Value;

use crate::Clock;
use crate::args::Shape;
use crate::engine::{AgentDef, Engine, PinState, StateDef, ToolDef, Workflow};
use crate::policy::{PolicyIndex, ToolFacts};

/// Shortest and longest accepted `tokens.access_ttl` (DESIGN section 5).
pub const ACCESS_TTL_RANGE: (Duration, Duration) =
    (Duration::from_secs(60), Duration::from_secs(900));

/// Every static finding of a loaded configuration; empty when it is clean.
pub fn check(loaded: &LoadedConfig) -> Vec<Finding> {
    match build(loaded, Arc::new(crate::ManualClock::default())) {
        Ok(_) => Vec::new(),
        Err(findings) => findings.0,
    }
}

fn root() -> KeyPath {
    KeyPath::root()
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Names must be non-empty, printable and free of whitespace and control
/// characters, since they end up in tokens, logs and Cedar ids.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > 128 {
        Some("longer than 128 bytes")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain whitespace or control characters")
    } else {
        None
    }
}

fn check_name(report: &mut Reporter<'_>, at: &KeyPath, name: &str) {
    if let Some(problem) = name_problem(name) {
        report.at(at, format!("name {name:?} {problem}"));
    }
}

/// Reports the second and later uses of each name.
fn check_duplicates<'a>(
    report: &mut Reporter<'_>,
    what: &str,
    names: impl Iterator<Item = (KeyPath, &'a str)>,
) {
    let mut seen: HashMap<&str, KeyPath> = HashMap::new();
    for (at, name) in names {
        if let Some(first) = seen.get(name) {
            report.at(
                &at,
                format!("duplicate {what} {name:?} (first defined at {first})"),
            );
        } else {
            seen.insert(name, at);
        }
    }
}

/// Builds the engine for `loaded`, or returns every finding.
pub fn build(loaded: &LoadedConfig, clock: Arc<dyn Clock>) -> Result<Engine, Findings> {
    let cfg = &loaded.config;
    let mut report = Reporter::new(&loaded.file, &loaded.source);
    let r = &mut report;

    for finding in &loaded.policy_findings {
        r.push(finding.clone());
    }
    check_sections(loaded, r);

    // Upstreams.
    check_duplicates(
        r,
        "upstream",
        cfg.upstreams.iter().enumerate().map(|(i, u)| {
            (
                root().key("upstreams").index(i).key("name"),
                u.name.as_str(),
            )
        }),
    );
    for (i, up) in cfg.upstreams.iter().enumerate() {
        let at = root().key("upstreams").index(i);
        check_name(r, &at.key("name"), &up.name);
        if up.name.contains('.') {
            r.at(
                &at.key("name"),
                format!("upstream name {:?} must not contain '.'", up.name),
            );
        }
        match up.transport {
            Transport::Stdio => {
                if up.command.is_empty() {
                    r.at(&at.key("command"), "a stdio upstream needs a command");
                }
                if up.url.is_some() {
                    r.at(&at.key("url"), "a stdio upstream takes no url");
                }
                for (key, set) in [
                    ("ca_file", up.ca_file.is_some()),
                    ("client_cert", up.client_cert.is_some()),
                    ("client_key", up.client_key.is_some()),
                ] {
                    if set {
                        r.at(&at.key(key), "a stdio upstream takes no TLS settings");
                    }
                }
            }
            Transport::Http => {
                let https = match &up.url {
                    Some(url) if url.starts_with("http://") => false,
                    Some(url) if url.starts_with("https://") => true,
                    Some(url) => {
                        r.at(&at.key("url"), format!("{url:?} is not an http(s) URL"));
                        true
                    }
                    None => {
                        r.at(&at.key("transport"), "an http upstream needs a url");
                        true
                    }
                };
                // TLS settings on a plain-http upstream would be silently
                // unused: the operator meant https.
                for (key, set) in [
                    ("ca_file", up.ca_file.is_some()),
                    ("client_cert", up.client_cert.is_some()),
                    ("client_key", up.client_key.is_some()),
                ] {
                    if set && !https {
                        r.at(&at.key(key), "TLS settings need an https:// url");
                    }
                }
                if up.client_cert.is_some() != up.client_key.is_some() {
                    let key = if up.client_cert.is_some() {
                        "client_cert"
                    } else {
                        "client_key"
                    };
                    r.at(&at.key(key), "client_cert and client_key go together");
                }
                if !up.command.is_empty() {
                    r.at(&at.key("command"), "an http upstream takes no command");
                }
            }
        }
        check_credential(r, &at.key("credential"), &up.credential, &cfg.store.url);
        check_session(r, &at, up);
    }
    let upstreams: HashSet<&str> = cfg.upstreams.iter().map(|u| u.name.as_str()).collect();

    // Tools.
    check_duplicates(
        r,
        "tool",
        cfg.tools
            .iter()
            .enumerate()
            .map(|(i, t)| (root().key("tools").index(i).key("name"), t.name.as_str())),
    );
    let mut tools = Vec::with_capacity(cfg.tools.len());
    let mut tool_index = HashMap::new();
    for (i, tool) in cfg.tools.iter().enumerate() {
        let at = root().key("tools").index(i);
        check_name(r, &at.key("name"), &tool.name);
        if !upstreams.contains(tool.upstream.as_str()) {
            r.at(
                &at.key("upstream"),
                format!("unknown upstream {:?}", tool.upstream),
            );
        }
        let upstream_tool = match &tool.upstream_tool {
            Some(name) => {
                check_name(r, &at.key("upstream_tool"), name);
                name.clone()
            }
            None => match tool.name.strip_prefix(&format!("{}.", tool.upstream)) {
                Some(rest) if !rest.is_empty() => rest.to_owned(),
                _ => {
                    r.at(
                        &at.key("name"),
                        format!(
                            "{:?} must be \"{}.<tool>\" unless upstream_tool is given",
                            tool.name, tool.upstream
                        ),
                    );
                    String::new()
                }
            },
        };
        let schema = tool
            .args_schema
            .clone()
            .unwrap_or_else(|| serde_json::json!({ "type": "object" }));
        let schema_at = at.key("args_schema");
        // A tool with a broken schema is still registered (rejecting every
        // call), so that references to it are not reported as unknown too.
        let compiled = if schema.get("type").and_then(Value::as_str) != Some("object") {
            Err("must be an object schema (type = \"object\")".to_owned())
        } else if let Err(why) = crate::args::check_bounds(&schema) {
            Err(format!("schema too large: {why}"))
        } else {
            compile_schema(&schema)
        };
        let validator = match compiled {
            Ok(v) => v,
            Err(why) => {
                r.at(&schema_at, why);
                match jsonschema::validator_for(&serde_json::json!(false)) {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            }
        };
        tool_index.insert(tool.name.clone(), tools.len());
        tools.push(ToolDef {
            name: tool.name.clone(),
            upstream: tool.upstream.clone(),
            upstream_tool,
            risk: tool.risk,
            access: tool.access,
            shape: Shape::of_args(&schema),
            args_schema: schema,
            schema_configured: tool.args_schema.is_some(),
            approval: tool.approval,
            validator,
        });
    }
    let known_tool =
        |name: &str| tool_index.contains_key(name) || cfg.tools.iter().any(|t| t.name == name);

    // Agent types and their workflows.
    check_duplicates(
        r,
        "agent type",
        cfg.agent_types.iter().enumerate().map(|(i, t)| {
            (
                root().key("agent_types").index(i).key("name"),
                t.name.as_str(),
            )
        }),
    );
    let mut workflows = Vec::with_capacity(cfg.agent_types.len());
    let mut workflow_index = HashMap::new();
    for (i, ty) in cfg.agent_types.iter().enumerate() {
        let at = root().key("agent_types").index(i);
        check_name(r, &at.key("name"), &ty.name);
        if let Some(wf) = build_workflow(r, &at, ty, &tool_index, &known_tool) {
            workflow_index.insert(ty.name.clone(), workflows.len());
            workflows.push(wf);
        }
    }

    // Agents.
    check_duplicates(
        r,
        "agent",
        cfg.agents
            .iter()
            .enumerate()
            .map(|(i, a)| (root().key("agents").index(i).key("id"), a.id.as_str())),
    );
    let mut agents = HashMap::new();
    for (i, agent) in cfg.agents.iter().enumerate() {
        let at = root().key("agents").index(i);
        check_name(r, &at.key("id"), &agent.id);
        let wf = workflow_index.get(&agent.agent_type).copied();
        if wf.is_none() && !cfg.agent_types.iter().any(|t| t.name == agent.agent_type) {
            r.at(
                &at.key("type"),
                format!("unknown agent type {:?}", agent.agent_type),
            );
        }
        match (&agent.bootstrap_sha256, &agent.oidc) {
            (Some(h), None) if !is_sha256_hex(h) => r.at(
                &at.key("bootstrap_sha256"),
                "must be 64 hex digits (a SHA-256)",
            ),
            (Some(_), None) | (None, Some(_)) => {}
            _ => r.at(&at, "needs exactly one of bootstrap_sha256 or oidc"),
        }
        let mut acl = HashSet::new();
        let mut seen = HashSet::new();
        for (j, name) in agent.tools.iter().enumerate() {
            let tat = at.key("tools").index(j);
            if !seen.insert(name.as_str()) {
                r.at(&tat, format!("tool {name:?} listed twice"));
            }
            match tool_index.get(name) {
                Some(&t) => {
                    acl.insert(t);
                    let in_some_state = wf
                        .and_then(|w| workflows.get(w))
                        .is_none_or(|w: &Workflow| w.states.iter().any(|s| s.tools.contains(&t)));
                    if !in_some_state {
                        r.at(
                            &tat,
                            format!(
                                "tool {name:?} is allowed in no state of agent type {:?}",
                                agent.agent_type
                            ),
                        );
                    }
                }
                None if known_tool(name) => {}
                None => r.at(&tat, format!("unknown tool {name:?}")),
            }
        }
        if agent.limits.max_calls_per_task == Some(0) {
            r.at(
                &at.key("limits").key("max_calls_per_task"),
                "0 allows no call at all",
            );
        }
        let mut per_tool = HashMap::new();
        for (name, &max) in &agent.limits.per_tool {
            let lat = at.key("limits").key("per_tool").key(name.clone());
            match tool_index.get(name) {
                Some(t) if acl.contains(t) => {
                    per_tool.insert(*t, max);
                }
                Some(_) => r.at(
                    &lat,
                    format!("tool {name:?} is not on this agent's allowlist"),
                ),
                None if known_tool(name) => {}
                None => r.at(&lat, format!("unknown tool {name:?}")),
            }
        }
        if let Some(agent_type) = wf {
            agents.insert(
                agent.id.clone(),
                AgentDef {
                    agent_type,
                    acl,
                    max_calls: agent.limits.max_calls_per_task,
                    per_tool,
                    approve_high_risk: agent.approve_high_risk,
                },
            );
        }
    }

    // Policies.
    let facts: Vec<ToolFacts<'_>> = tools
        .iter()
        .map(|t| ToolFacts {
            name: &t.name,
            upstream: &t.upstream,
            risk: t.risk.as_str(),
            access: t.access.as_str(),
            shape: &t.shape,
            configured: t.schema_configured,
        })
        .collect();
    let agent_facts: Vec<(&str, &str)> = cfg
        .agents
        .iter()
        .map(|a| (a.id.as_str(), a.agent_type.as_str()))
        .collect();
    let policies = PolicyIndex::build(loaded, &facts, &agent_facts, r);
    let auto_approve = match &loaded.auto_approve {
        None => None,
        Some(Err(_)) => None, // reported by the `[elevation]` checks
        Some(Ok(text)) => {
            let tool_attrs: Vec<crate::auto_approve::ToolAttrs<'_>> = facts
                .iter()
                .map(|t| (t.name, t.risk, t.access, t.upstream))
                .collect();
            match crate::auto_approve::AutoApprove::build(text, &tool_attrs, &agent_facts) {
                Ok(a) => Some(a),
                Err(errors) => {
                    let file = cfg.elevation.auto_approve.clone().unwrap_or_default();
                    for e in errors {
                        r.at(
                            &root().key("elevation").key("auto_approve"),
                            format!("{file}: {e}"),
                        );
                    }
                    None
                }
            }
        }
    };

    let mut findings = report.into_findings();
    // Per file, in line order; the configuration file first.
    findings.sort_by(|a, b| {
        (a.file != loaded.file, &a.file, a.line.unwrap_or(0)).cmp(&(
            b.file != loaded.file,
            &b.file,
            b.line.unwrap_or(0),
        ))
    });
    let n_tools = tools.len();
    match policies {
        Some(policies) if findings.is_empty() => Ok(Engine {
            tools,
            tool_index,
            workflows,
            workflow_index,
            agents,
            policies,
            pins: std::sync::RwLock::new(vec![PinState::default(); n_tools]),
            auto_approve,
            anomaly: crate::anomaly::Rules::new(&cfg.anomaly),
            clock,
            slice_policies: true,
        }),
        _ => Err(Findings(findings)),
    }
}

fn build_workflow(
    r: &mut Reporter<'_>,
    at: &KeyPath,
    ty: &portcullis_config::AgentType,
    tool_index: &HashMap<String, usize>,
    known_tool: &dyn Fn(&str) -> bool,
) -> Option<Workflow> {
    check_duplicates(
        r,
        "state",
        ty.states
            .iter()
            .enumerate()
            .map(|(j, s)| (at.key("states").index(j).key("name"), s.name.as_str())),
    );
    // The first definition of a name wins; later ones are reported above.
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (j, st) in ty.states.iter().enumerate() {
        by_name.entry(st.name.clone()).or_insert(j);
    }
    let initial = by_name.get(&ty.initial).copied();
    if initial.is_none() {
        r.at(
            &at.key("initial"),
            format!("unknown state {:?}", ty.initial),
        );
    }
    let mut states = Vec::with_capacity(ty.states.len());
    for (j, st) in ty.states.iter().enumerate() {
        let sat = at.key("states").index(j);
        check_name(r, &sat.key("name"), &st.name);
        let mut tools = HashSet::new();
        for (k, name) in st.tools.iter().enumerate() {
            match tool_index.get(name) {
                Some(&t) => {
                    tools.insert(t);
                }
                None if known_tool(name) => {}
                None => r.at(&sat.key("tools").index(k), format!("unknown tool {name:?}")),
            }
        }
        let mut next = Vec::new();
        for (k, name) in st.next.iter().enumerate() {
            match by_name.get(name) {
                Some(&n) => next.push(n),
                None => r.at(&sat.key("next").index(k), format!("unknown state {name:?}")),
            }
        }
        if st.is_final && !st.next.is_empty() {
            r.at(&sat.key("next"), "a final state has no next states");
        }
        states.push(StateDef {
            name: st.name.clone(),
            tools,
            next,
            reverify: st.reverify,
            is_final: st.is_final,
            approval: st.approval || (ty.approval && st.reverify),
        });
    }
    if !states.iter().any(|s| s.is_final) {
        r.at(
            &at.key("states"),
            "no final state: a task of this type can never finish",
        );
    }

    // Reachability from the initial state (everything counts as reachable
    // when the initial state is unknown: that is reported already).
    let initial = initial?;
    let reachable = reach(states.len(), [initial], |i| {
        states.get(i).map(|s| s.next.clone()).unwrap_or_default()
    });
    // Reverse reachability from the final states.
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); states.len()];
    for (i, s) in states.iter().enumerate() {
        for &n in &s.next {
            if let Some(p) = preds.get_mut(n) {
                p.push(i);
            }
        }
    }
    let finals: Vec<usize> = states
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_final)
        .map(|(i, _)| i)
        .collect();
    let can_finish = reach(states.len(), finals, |i| {
        preds.get(i).cloned().unwrap_or_default()
    });
    for (j, s) in states.iter().enumerate() {
        let sat = at.key("states").index(j).key("name");
        if by_name.get(&s.name) != Some(&j) {
            // A duplicate definition: already reported as such.
            continue;
        }
        if !reachable.get(j).copied().unwrap_or(false) {
            r.at(
                &sat,
                format!(
                    "state {:?} is unreachable from the initial state {:?}",
                    s.name, ty.initial
                ),
            );
        } else if !can_finish.get(j).copied().unwrap_or(false) && states.iter().any(|s| s.is_final)
        {
            r.at(
                &sat,
                format!("state {:?} has no way to a final state", s.name),
            );
        }
    }
    // Built even when other findings exist, so later checks (tools allowed
    // in no state) still run; no engine is made while any finding stands.
    Some(Workflow {
        name: ty.name.clone(),
        initial,
        states,
        by_name,
        auto_advance: ty.auto_advance,
    })
}

/// `session` and `max_task_sessions` of upstream `up` at `at`.
fn check_session(r: &mut Reporter<'_>, at: &KeyPath, up: &portcullis_config::Upstream) {
    let Some(max) = up.max_task_sessions else {
        return;
    };
    if up.session != portcullis_config::SessionScope::PerTask {
        r.at(
            &at.key("max_task_sessions"),
            "max_task_sessions applies only with session = \"per_task\"",
        );
    } else if !(1..=portcullis_config::MAX_TASK_SESSIONS).contains(&max) {
        r.at(
            &at.key("max_task_sessions"),
            format!(
                "max_task_sessions must be 1 to {}",
                portcullis_config::MAX_TASK_SESSIONS
            ),
        );
    }
}

/// Checks that a credential has the keys its kind needs, and no others.
fn check_credential(r: &mut Reporter<'_>, cred: &KeyPath, c: &Credential, store_url: &str) {
    let kind = c.kind;
    let allowed: &[&str] = match kind {
        CredentialKind::Static => &["header", "env", "file"],
        CredentialKind::PostgresRole => &["url", "grants", "ttl"],
        CredentialKind::Jwt | CredentialKind::None => &[],
    };
    let present = [
        ("header", c.header.is_some()),
        ("env", c.env.is_some()),
        ("file", c.file.is_some()),
        ("url", c.url.is_some()),
        ("grants", c.grants.is_some()),
        ("ttl", c.ttl.is_some()),
    ];
    for (key, is_set) in present {
        if is_set && !allowed.contains(&key) {
            r.at(
                &cred.key(key),
                format!("not a key of a {} credential", kind.as_str()),
            );
        }
    }
    match kind {
        CredentialKind::Static => {
            match &c.header {
                None => r.at(cred, "a static credential needs a header"),
                Some(h)
                    if h.is_empty()
                        || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
                {
                    r.at(
                        &cred.key("header"),
                        format!("{h:?} is not a valid header name"),
                    );
                }
                Some(_) => {}
            }
            if c.env.is_some() == c.file.is_some() {
                r.at(cred, "a static credential needs exactly one of env or file");
            }
        }
        CredentialKind::PostgresRole => {
            if c.grants.as_ref().is_none_or(Vec::is_empty) {
                r.at(cred, "a postgres-role credential needs at least one grant");
            }
            if c.ttl.is_some_and(|t| t.as_millis() == 0) {
                r.at(&cred.key("ttl"), "must be longer than zero");
            }
            let pg_store =
                store_url.starts_with("postgres://") || store_url.starts_with("postgresql://");
            if c.url.is_none() && !pg_store {
                r.at(cred, "needs a url when the store is not PostgreSQL");
            }
        }
        CredentialKind::Jwt | CredentialKind::None => {}
    }
}

/// Compiles an argument schema, explaining failures in the user's terms.
pub(crate) fn compile_schema(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::validator_for(schema).map_err(|e| {
        if matches!(
            e.kind(),
            jsonschema::error::ValidationErrorKind::Referencing(_)
        ) {
            return "external $ref is not allowed: argument schemas must be self-contained"
                .to_owned();
        }
        let at = e.instance_path().to_string();
        let at = if at.is_empty() {
            String::new()
        } else {
            format!(" at {at}")
        };
        let mut msg = e.to_string();
        if msg.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|&i| msg.is_char_boundary(i))
                .unwrap_or(0);
            msg.truncate(cut);
            msg.push('…');
        }
        format!("invalid JSON Schema{at}: {msg}")
    })
}

/// Breadth-first reachability over `n` nodes.
fn reach(
    n: usize,
    starts: impl IntoIterator<Item = usize>,
    edges: impl Fn(usize) -> Vec<usize>,
) -> Vec<bool> {
    let mut seen = vec![false; n];
    let mut queue: VecDeque<usize> = VecDeque::new();
    for s in starts {
        if let Some(slot) = seen.get_mut(s)
            && !*slot
        {
            *slot = true;
            queue.push_back(s);
        }
    }
    while let Some(i) = queue.pop_front() {
        for j in edges(i) {
            if let Some(slot) = seen.get_mut(j)
                && !*slot
            {
                *slot = true;
                queue.push_back(j);
            }
        }
    }
    seen
}

/// Checks of the sections that are not registry, workflow or policy.
fn check_sections(loaded: &LoadedConfig, r: &mut Reporter<'_>) {
    let cfg = &loaded.config;
    let server = root().key("server");
    if cfg.server.listen.parse::<std::net::SocketAddr>().is_err() {
        r.at(
            &server.key("listen"),
            format!(
                "{:?} is not a socket address (host:port)",
                cfg.server.listen
            ),
        );
    }
    let issuer = &cfg.server.issuer;
    if !(issuer.starts_with("http://") || issuer.starts_with("https://")) || issuer.ends_with('/') {
        r.at(
            &server.key("issuer"),
            format!("{issuer:?} must be an http(s) URL without a trailing slash"),
        );
    }
    if !(1024..=64 * 1024 * 1024).contains(&cfg.server.max_body_bytes) {
        r.at(
            &server.key("max_body_bytes"),
            "must lie between 1024 and 67108864",
        );
    }
    let url = &cfg.store.url;
    let path_ok = url.strip_prefix("sqlite://").is_some_and(|p| !p.is_empty());
    if !path_ok && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        r.at(
            &root().key("store").key("url"),
            "must be sqlite://PATH or postgres://…",
        );
    }

    let tokens = root().key("tokens");
    let t = &cfg.tokens;
    let (lo, hi) = ACCESS_TTL_RANGE;
    if t.access_ttl < lo || t.access_ttl > hi {
        r.at(
            &tokens.key("access_ttl"),
            format!("{} is outside {lo}..{hi}", t.access_ttl),
        );
    }
    if t.refresh_idle_ttl < lo {
        r.at(
            &tokens.key("refresh_idle_ttl"),
            format!("{} is shorter than {lo}", t.refresh_idle_ttl),
        );
    }
    if t.refresh_idle_ttl > t.task_max_lifetime {
        r.at(
            &tokens.key("refresh_idle_ttl"),
            format!("{} is longer than task_max_lifetime", t.refresh_idle_ttl),
        );
    }
    if t.task_max_lifetime < t.access_ttl {
        r.at(
            &tokens.key("task_max_lifetime"),
            format!("{} is shorter than access_ttl", t.task_max_lifetime),
        );
    }
    if t.task_max_lifetime > Duration::from_secs(30 * 86_400) {
        r.at(&tokens.key("task_max_lifetime"), "longer than 30 days");
    }
    if t.signing_key.is_empty() || t.signing_key.iter().any(String::is_empty) {
        r.at(
            &tokens.key("signing_key"),
            "must name at least one key file",
        );
    }

    let audit = root().key("audit");
    let a = &cfg.audit;
    if !(0.0..=1.0).contains(&a.sample_low_risk) {
        r.at(
            &audit.key("sample_low_risk"),
            "must lie between 0.0 and 1.0",
        );
    }
    if a.checkpoint_every == 0 {
        r.at(&audit.key("checkpoint_every"), "must be at least 1");
    }
    if a.checkpoint_interval < Duration::from_secs(1)
        || a.checkpoint_interval > Duration::from_secs(86_400)
    {
        r.at(
            &audit.key("checkpoint_interval"),
            format!("{} is outside 1s..1d", a.checkpoint_interval),
        );
    }
    if a.retention_days == 0 {
        r.at(&audit.key("retention_days"), "must be at least 1");
    }
    if a.hot_days > a.retention_days {
        r.at(&audit.key("hot_days"), "longer than retention_days");
    }
    if let Some(hook) = &a.alert_webhook
        && !(hook.starts_with("http://") || hook.starts_with("https://"))
    {
        r.at(
            &audit.key("alert_webhook"),
            format!("{hook:?} is not an http(s) URL"),
        );
    }

    check_duplicates(
        r,
        "admin",
        cfg.admins
            .iter()
            .enumerate()
            .map(|(i, a)| (root().key("admins").index(i).key("name"), a.name.as_str())),
    );
    check_duplicates(
        r,
        "admin token",
        cfg.admins.iter().enumerate().map(|(i, a)| {
            (
                root().key("admins").index(i).key("token_sha256"),
                a.token_sha256.as_str(),
            )
        }),
    );
    for (i, admin) in cfg.admins.iter().enumerate() {
        let at = root().key("admins").index(i);
        check_name(r, &at.key("name"), &admin.name);
        if admin.roles.is_empty() {
            r.at(&at.key("roles"), "needs at least one role");
        }
        if !is_sha256_hex(&admin.token_sha256) {
            r.at(&at.key("token_sha256"), "must be 64 hex digits (a SHA-256)");
        }
        // An agent must never hold an approver's credential: the admin
        // token may not be an agent's bootstrap secret, or that agent could
        // approve its own elevation requests.
        if let Some(agent) = cfg.agents.iter().find(|a| {
            a.bootstrap_sha256
                .as_deref()
                .is_some_and(|b| b.eq_ignore_ascii_case(&admin.token_sha256))
        }) {
            r.at(
                &at.key("token_sha256"),
                format!(
                    "is the bootstrap secret of agent {:?}: an agent must never hold an admin token",
                    agent.id
                ),
            );
        }
    }

    let anomaly = root().key("anomaly");
    let an = &cfg.anomaly;
    if an
        .distinct_tools
        .as_ref()
        .is_some_and(|rule| rule.count == 0 || rule.seconds == 0)
    {
        r.at(
            &anomaly.key("distinct_tools"),
            "count and seconds must be at least 1",
        );
    }
    if an.denials.as_ref().is_some_and(|rule| rule.count == 0) {
        r.at(&anomaly.key("denials"), "count must be at least 1");
    }
    if an
        .rate
        .as_ref()
        .is_some_and(|rule| rule.calls == 0 || rule.seconds == 0)
    {
        r.at(&anomaly.key("rate"), "calls and seconds must be at least 1");
    }

    let elevation = root().key("elevation");
    let ttl = cfg.elevation.ttl;
    if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(86_400) {
        r.at(&elevation.key("ttl"), format!("{ttl} is outside 1m..1d"));
    }
    if let (Some(file), Some(Err(why))) = (&cfg.elevation.auto_approve, &loaded.auto_approve) {
        r.at(&elevation.key("auto_approve"), format!("{file:?}: {why}"));
    }

    let approval = root().key("approval");
    let ap = &cfg.approval;
    if ap.hold > portcullis_config::Approval::MAX_HOLD {
        r.at(
            &approval.key("hold"),
            format!(
                "{} is longer than {}",
                ap.hold,
                portcullis_config::Approval::MAX_HOLD
            ),
        );
    }
    for (key, cap) in [
        ("max_held_per_task", ap.max_held_per_task),
        ("max_held", ap.max_held),
    ] {
        if cap == 0 || cap > portcullis_config::Approval::MAX_HELD {
            r.at(
                &approval.key(key),
                format!(
                    "{cap} is outside 1..{}",
                    portcullis_config::Approval::MAX_HELD
                ),
            );
        }
    }
    if ap.max_held_per_task > ap.max_held {
        r.at(
            &approval.key("max_held_per_task"),
            "is larger than max_held",
        );
    }
}
