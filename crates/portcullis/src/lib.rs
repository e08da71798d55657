//! Portcullis as an embedded library.
//!
//! An agent runtime written in Rust links this crate and asks for a decision
//! before every tool call, in-process, with no sidecar and no network hop:
//!
//! ```
//! use portcullis::Portcullis;
//! use serde_json::json;
//!
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/ingestion/portcullis.toml");
//! // Load and check a configuration, build the engine.
//! let gate = Portcullis::load(dir)?;
//!
//! // Start a task for an agent: it begins in its workflow's initial state.
//! let task = gate.start_task("ingest-bot", "nightly load", None)?;
//! assert_eq!(task.state, "connect");
//!
//! // Ask before each call; an allowed decision is applied to the task
//! // (counters, and the auto-advance to the next workflow state).
//! let d = gate.decide(&task.id, "warehouse.connect", &json!({ "database": "analytics" }));
//! assert!(d.is_allowed());
//! let d = gate.decide(&task.id, "warehouse.query", &json!({ "sql": "select * from users" }));
//! assert_eq!(d.reason.map(|r| r.as_str()), Some("policy_forbid"));
//! assert_eq!(d.policy_ids, ["no-sql-wildcards"]);
//!
//! // Explicit transitions are checked against the workflow's edges.
//! let t = gate.transition(&task.id, "validate")?;
//! assert_eq!((t.from.as_str(), t.to.as_str()), ("connect", "validate"));
//!
//! // Completing the task ends it: later calls are denied.
//! gate.complete(&task.id)?;
//! let d = gate.decide(&task.id, "warehouse.query", &json!({ "sql": "select 1" }));
//! assert_eq!(d.reason.map(|r| r.as_str()), Some("task_not_active"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Tasks are kept in memory here. [`Portcullis::load`] records nothing;
//! [`Portcullis::open`] also opens the configuration's embedded SQLite
//! ledger ([`ledger`]) and records every start, decision, outcome,
//! transition and end in its hash chain, as `portcullis serve` does, so
//! `portcullis audit verify` checks it. [`Portcullis::call`] is the whole
//! call path in-process: decide, make the write-ahead record durable, run
//! the tool only if allowed, record its outcome.
//!
//! Every call is decided by the planner the service uses
//! ([`Engine::plan_use`]): the engine's checks, then the configured
//! approvals and the `[anomaly]` rules, with the same verdict for the same
//! input. The library has no approvers: a call that needs an approval, or
//! that a `require_approval` rule holds, is denied `approval_required`.
//! A `halt` rule halts the task (later calls are `task_not_active`).

pub mod ledger;
pub mod scenario;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ledger::{Ledger, LedgerError};
use portcullis_core::plan::Plan;

pub use portcullis_config as config;
pub use portcullis_config::{Finding, Findings, LoadedConfig};
pub use portcullis_core::{
    Clock, Decision, Denial, Engine, Outcome, Reason, Task, TaskStatus, Timestamp, Transition, plan,
};
use serde_json::Value;

/// The wall clock, for production use of the engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Timestamp(millis)
    }
}

/// Why a gateway could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration has problems, one finding per line.
    #[error("{0}")]
    Config(#[from] Findings),
    /// The embedded ledger could not be opened.
    #[error("{0}")]
    Ledger(#[from] LedgerError),
}

/// Why [`Portcullis::call`] did not return the tool's result.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The call was denied (its decision says why); the tool did not run.
    #[error("denied: {}: {}", .0.reason.map_or("", |r| r.as_str()), .0.detail)]
    Denied(Box<Decision>),
    /// The tool ran and failed.
    #[error("the tool failed")]
    Tool(E),
}

/// An engine and the tasks it is deciding for, in memory.
#[derive(Debug)]
pub struct Portcullis {
    engine: Engine,
    tasks: Mutex<Tasks>,
    next_id: AtomicU64,
    ledger: Option<Ledger>,
}

/// The tasks, and which tools each agent has had allowed (the `new_tool`
/// rule's memory, across tasks).
#[derive(Debug, Default)]
struct Tasks {
    by_id: HashMap<String, Task>,
    used: HashSet<(String, String)>,
}

impl Portcullis {
    /// Loads the configuration at `path`, checks it, and builds the engine
    /// on the wall clock.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        let loaded = LoadedConfig::load(path.as_ref())?;
        Self::from_loaded(&loaded, Arc::new(SystemClock))
    }

    /// Loads the configuration at `path` like [`load`](Self::load), and
    /// opens its embedded ledger (`store.url`, `sqlite://` only): every
    /// start, decision, outcome, transition and end is recorded there.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let loaded = LoadedConfig::load(path.as_ref())?;
        Self::open_loaded(&loaded, Arc::new(SystemClock))
    }

    /// [`open`](Self::open) for an already loaded configuration, on
    /// `clock`.
    pub fn open_loaded(loaded: &LoadedConfig, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        let mut gate = Self::from_loaded(loaded, clock)?;
        gate.ledger = Some(Ledger::open(loaded)?);
        Ok(gate)
    }

    /// The embedded ledger, when opened with [`open`](Self::open).
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// Builds the engine for an already loaded configuration.
    pub fn from_loaded(loaded: &LoadedConfig, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        let engine = portcullis_core::build(loaded, clock)?;
        Ok(Self::new(engine))
    }

    /// Wraps an engine.
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            tasks: Mutex::new(Tasks::default()),
            next_id: AtomicU64::new(1),
            ledger: None,
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn tasks(&self) -> MutexGuard<'_, Tasks> {
        // A panic while holding the lock cannot leave a task half-updated:
        // every update replaces whole fields after the decision is made.
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a task for `agent_id`; `tools` narrows it to part of the
    /// agent's allowlist.
    pub fn start_task(
        &self,
        agent_id: &str,
        goal: &str,
        tools: Option<&[String]>,
    ) -> Result<Task, Denial> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("task-{}-{n}", self.engine.now().as_millis());
        let task = self.engine.start_task(&id, agent_id, goal, tools)?;
        if let Some(ledger) = &self.ledger {
            ledger
                .commit(vec![Ledger::started_event(&task, self.engine.now())])
                .map_err(ledger_denial)?;
        }
        self.tasks().by_id.insert(id, task.clone());
        Ok(task)
    }

    /// Decides a call with the service's planner and applies the verdict
    /// to the task: an allowed call is counted (and moves the task along
    /// its workflow); a denial is counted for the `denials` rule and may
    /// halt the task. An unknown task id is `task_not_active`.
    ///
    /// With a ledger, the decision's record is durable before it is
    /// returned, and the verdict is applied only then; a ledger failure is
    /// a denial (`internal_error`) that leaves the task as it was.
    pub fn decide(&self, task_id: &str, tool: &str, args: &Value) -> Decision {
        let mut guard = self.tasks();
        let Tasks { by_id, used } = &mut *guard;
        let Some(task) = by_id.get_mut(task_id) else {
            return Decision::deny(tool, Reason::TaskNotActive, "no such task");
        };
        let now = self.engine.now();
        let planned = plan_call(&self.engine, task, used, tool, args, now);
        let Some(ledger) = &self.ledger else {
            return apply(task, used, planned);
        };
        match ledger.commit(ledger.plan_events(task, &planned, args, now)) {
            Ok(()) => apply(task, used, planned),
            // The task stays as it was: the call is neither recorded nor
            // counted.
            Err(e) => Decision::deny(tool, Reason::InternalError, e.to_string()),
        }
    }

    /// Records the outcome of an allowed call (`call.completed`): `Ok`
    /// with the result's JSON text (its digest is kept), `Err` with a short
    /// description of the failure (never the tool's own message, which may
    /// carry secrets). Queued into the chain; durable with the next commit.
    /// A no-op without a ledger.
    pub fn record_outcome(
        &self,
        task_id: &str,
        tool: &str,
        outcome: Result<&str, &str>,
        latency_us: u64,
    ) -> Result<(), LedgerError> {
        let Some(ledger) = &self.ledger else {
            return Ok(());
        };
        let Some(task) = self.task(task_id) else {
            return Ok(());
        };
        let event = Ledger::outcome_event(&task, tool, outcome, latency_us, self.engine.now());
        ledger.enqueue(vec![event])
    }

    /// The whole call path: decides (the write-ahead record durable first,
    /// with a ledger), runs `invoke` only if allowed, records its outcome.
    pub fn call<E>(
        &self,
        task_id: &str,
        tool: &str,
        args: &Value,
        invoke: impl FnOnce(&Value) -> Result<Value, E>,
    ) -> Result<Value, CallError<E>> {
        let decision = self.decide(task_id, tool, args);
        if !decision.is_allowed() {
            return Err(CallError::Denied(Box::new(decision)));
        }
        let started = Instant::now();
        let outcome = invoke(args);
        let latency = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let text = outcome.as_ref().map(Value::to_string);
        let recorded = self.record_outcome(
            task_id,
            tool,
            text.as_deref().map_err(|_| "the tool failed"),
            latency,
        );
        match (outcome, recorded) {
            (Err(e), _) => Err(CallError::Tool(e)),
            // The tool ran, but its outcome could not be chained: the
            // caller must not take the result as recorded.
            (Ok(_), Err(e)) => Err(CallError::Denied(Box::new(Decision::deny(
                tool,
                Reason::InternalError,
                e.to_string(),
            )))),
            (Ok(v), Ok(())) => Ok(v),
        }
    }

    /// Commits what the ledger has queued and closes it; later calls are
    /// denied `internal_error`. A no-op without a ledger.
    pub fn close(&self) {
        if let Some(ledger) = &self.ledger {
            ledger.close();
        }
    }

    /// Moves a task to state `to`, if its workflow has that edge.
    pub fn transition(&self, task_id: &str, to: &str) -> Result<Transition, Denial> {
        let mut tasks = self.tasks();
        let task = tasks.by_id.get_mut(task_id).ok_or_else(no_such_task)?;
        let transition = self.engine.transition(task, to)?;
        if let Some(ledger) = &self.ledger {
            let mut next = task.clone();
            next.apply_transition(&transition);
            let event = Ledger::transition_event(&next, &transition, self.engine.now());
            ledger.commit(vec![event]).map_err(ledger_denial)?;
        }
        task.apply_transition(&transition);
        Ok(transition)
    }

    /// Ends a task; every later call is `task_not_active`.
    pub fn complete(&self, task_id: &str) -> Result<Task, Denial> {
        let mut tasks = self.tasks();
        let task = tasks.by_id.get_mut(task_id).ok_or_else(no_such_task)?;
        if task.status != TaskStatus::Active {
            return Err(Denial {
                reason: Reason::TaskNotActive,
                detail: format!("task is {}", task.status.as_str()),
            });
        }
        // The task ends whatever the ledger says: ending fails closed.
        task.status = TaskStatus::Completed;
        task.version = task.version.saturating_add(1);
        if let Some(ledger) = &self.ledger {
            let event = Ledger::ended_event(task, "completed", self.engine.now());
            ledger.commit(vec![event]).map_err(ledger_denial)?;
        }
        Ok(task.clone())
    }

    /// A snapshot of a task.
    pub fn task(&self, task_id: &str) -> Option<Task> {
        self.tasks().by_id.get(task_id).cloned()
    }
}

/// Plans a call on `task` with the service's planner; `used` is which
/// tools each agent has had allowed. Shared by [`Portcullis::decide`] and
/// the scenario runner.
pub(crate) fn plan_call(
    engine: &Engine,
    task: &Task,
    used: &HashSet<(String, String)>,
    tool: &str,
    args: &Value,
    now: Timestamp,
) -> Plan {
    // No approver here, so no approval grant is ever bound to a digest.
    let no_digest = String::new;
    engine.plan(&plan::Input {
        task,
        tool,
        use_: plan::Use::Call(args),
        forward: false,
        scope: None,
        now,
        first_use: !used.contains(&(task.agent_id.clone(), tool.to_owned())),
        digest: &no_digest,
    })
}

/// Applies a plan to its task (and the agent's first use of the tool);
/// returns the decision.
pub(crate) fn apply(
    task: &mut Task,
    used: &mut HashSet<(String, String)>,
    planned: Plan,
) -> Decision {
    if planned.decision.is_allowed() {
        used.insert((task.agent_id.clone(), planned.decision.tool.clone()));
    }
    if let Some(after) = planned.task {
        *task = after;
    }
    planned.decision
}

/// [`plan_call`] and [`apply`], without a ledger.
pub(crate) fn decide_call(
    engine: &Engine,
    task: &mut Task,
    used: &mut HashSet<(String, String)>,
    tool: &str,
    args: &Value,
) -> Decision {
    let planned = plan_call(engine, task, used, tool, args, engine.now());
    apply(task, used, planned)
}

fn ledger_denial(e: LedgerError) -> Denial {
    Denial {
        reason: Reason::InternalError,
        detail: e.to_string(),
    }
}

fn no_such_task() -> Denial {
    Denial {
        reason: Reason::TaskNotActive,
        detail: "no such task".to_owned(),
    }
}
