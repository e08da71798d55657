//! Scenario files: a data-driven list of calls and the decision each must
//! get, run against an engine. Every example ships one (`scenarios.toml`),
//! the test suite runs them all, and `portcullis demo` prints them.
//!
//! ```toml
//! [[scenario]]
//! name = "SQL wildcards are forbidden"
//! agent = "ingest-bot"
//! goal = "wildcard"
//! tools = ["warehouse.connect", "warehouse.query"]   # optional task grant
//! steps = [
//!   { tool = "warehouse.query", args = { sql = "select *" }, expect = "policy_forbid",
//!     policy_ids = ["no-sql-wildcards"], state = "connect" },
//!   { transition = "validate", expect = "allow", reverify = false },
//!   { advance = "20m", tool = "…", args = {}, expect = "allow" },
//! ]
//! ```
//!
//! `expect` is `allow` or a reason code. `state` is the task's state after
//! the step; `reverify` whether the step's transition enters a `reverify`
//! state; `advance` moves the scenario's clock before the step.
//!
//! Calls are decided by the planner the service uses
//! ([`portcullis_core::Engine::plan_use`]), so a scenario shows what
//! `portcullis serve` would answer: a call that needs an approval expects
//! `approval_required`, and the `[anomaly]` rules count and fire.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis_config::{Duration, LoadedConfig};
use portcullis_core::{Decision, Engine, ManualClock, Reason, Task, Timestamp};
use serde::Deserialize;
use serde_json::Value;

use crate::Error;

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Its scenarios, run in order, each on a fresh task.
    pub scenario: Vec<Scenario>,
}

/// One scenario: a task and the steps taken in it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What it shows.
    pub name: String,
    /// The agent.
    pub agent: String,
    /// The task's goal.
    #[serde(default)]
    pub goal: String,
    /// The task's grant; the whole allowlist when absent.
    #[serde(default)]
    pub tools: Option<Vec<String>>,
    /// The steps.
    pub steps: Vec<Step>,
}

/// One call or transition and what must come of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// A tool to call…
    #[serde(default)]
    pub tool: Option<String>,
    /// …with these arguments.
    #[serde(default)]
    pub args: Option<Value>,
    /// Or a state to move to.
    #[serde(default)]
    pub transition: Option<String>,
    /// `allow` or a reason code.
    pub expect: String,
    /// The policies that must be named, in sorted order.
    #[serde(default)]
    pub policy_ids: Option<Vec<String>>,
    /// The task's state after the step.
    #[serde(default)]
    pub state: Option<String>,
    /// Whether the step's transition must enter a `reverify` state.
    #[serde(default)]
    pub reverify: Option<bool>,
    /// Time to let pass before the step.
    #[serde(default)]
    pub advance: Option<Duration>,
}

/// What one step got.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The scenario's name.
    pub scenario: String,
    /// 1-based step number.
    pub step: usize,
    /// `tool` or `→ state`.
    pub action: String,
    /// The decision (for transitions, an equivalent decision).
    pub decision: Decision,
    /// The task's state after the step.
    pub state: String,
    /// Every way the outcome differs from the expectation; empty when it matches.
    pub mismatches: Vec<String>,
}

impl ScenarioFile {
    /// Reads a scenario file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Runs every scenario of `scenarios` against the configuration at
/// `config`, on a stopped clock.
pub fn run_files(config: &Path, scenarios: &Path) -> Result<Vec<StepOutcome>, Error> {
    let loaded = LoadedConfig::load(config)?;
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    let engine = portcullis_core::build(&loaded, clock.clone())?;
    let file = ScenarioFile::load(scenarios).map_err(|msg| {
        Error::Config(
            portcullis_config::Finding::new(PathBuf::from(scenarios), None, "", msg).into(),
        )
    })?;
    Ok(run(&engine, &clock, &file))
}

/// Runs `file` against `engine`, whose clock is `clock`.
pub fn run(engine: &Engine, clock: &ManualClock, file: &ScenarioFile) -> Vec<StepOutcome> {
    let mut out = Vec::new();
    // Which tools each agent has had allowed, across the file's tasks, as
    // the service's ledger remembers them (the `new_tool` rule).
    let mut used = HashSet::new();
    for (n, scenario) in file.scenario.iter().enumerate() {
        let task_id = format!("scenario-{}", n + 1);
        let task = engine.start_task(
            &task_id,
            &scenario.agent,
            &scenario.goal,
            scenario.tools.as_deref(),
        );
        let mut task: Task = match task {
            Ok(t) => t,
            Err(denial) => {
                out.push(StepOutcome {
                    scenario: scenario.name.clone(),
                    step: 0,
                    action: "start task".to_owned(),
                    decision: Decision::deny("", denial.reason, denial.detail),
                    state: String::new(),
                    mismatches: vec!["the task could not be started".to_owned()],
                });
                continue;
            }
        };
        for (i, step) in scenario.steps.iter().enumerate() {
            if let Some(d) = step.advance {
                clock.advance(d.as_millis());
            }
            let (action, decision) = match (&step.tool, &step.transition) {
                (Some(tool), None) => {
                    let args = step
                        .args
                        .clone()
                        .unwrap_or_else(|| Value::Object(Default::default()));
                    let d = crate::decide_call(engine, &mut task, &mut used, tool, &args);
                    (tool.clone(), d)
                }
                (None, Some(to)) => {
                    let d = match engine.transition(&task, to) {
                        Ok(t) => {
                            task.apply_transition(&t);
                            Decision::allow("", Some(t))
                        }
                        Err(denial) => Decision::deny("", denial.reason, denial.detail),
                    };
                    (format!("-> {to}"), d)
                }
                _ => {
                    let d = Decision::deny(
                        "",
                        Reason::InternalError,
                        "a step needs exactly one of tool or transition",
                    );
                    ("(malformed step)".to_owned(), d)
                }
            };
            let mismatches = compare(step, &decision, &task);
            out.push(StepOutcome {
                scenario: scenario.name.clone(),
                step: i + 1,
                action,
                decision,
                state: task.state.clone(),
                mismatches,
            });
        }
    }
    out
}

fn compare(step: &Step, decision: &Decision, task: &Task) -> Vec<String> {
    let mut problems = Vec::new();
    let got = decision.reason.map_or("allow", Reason::as_str);
    if got != step.expect {
        problems.push(format!(
            "expected {}, got {got} ({})",
            step.expect, decision.detail
        ));
    }
    if let Some(ids) = &step.policy_ids
        && ids != &decision.policy_ids
    {
        problems.push(format!(
            "expected policies {ids:?}, got {:?}",
            decision.policy_ids
        ));
    }
    if let Some(state) = &step.state
        && state != &task.state
    {
        problems.push(format!("expected state {state}, got {}", task.state));
    }
    if let Some(reverify) = step.reverify {
        let got = decision.transition.as_ref().is_some_and(|t| t.reverify);
        if got != reverify {
            problems.push(format!("expected reverify = {reverify}, got {got}"));
        }
    }
    if step.tool.is_some() == step.transition.is_some() {
        problems.push("a step needs exactly one of tool or transition".to_owned());
    }
    problems
}
