//! `portcullis._native`: the embedded gateway ([`portcullis::Portcullis`]
//! opened on its SQLite ledger) as a Python module.
//!
//! `Task.call(tool, args, invoke=fn)` is the whole call path in-process:
//! the planner decides, the write-ahead record is made durable, `fn(args)`
//! runs only if the call was allowed, and its outcome is chained into the
//! ledger. The GIL is released while Rust decides and writes, so other
//! Python threads run meanwhile.
//!
//! Arguments cross into Rust as JSON values: `None`, `bool`, `int` (within
//! 64 bits), finite `float`, `str`, `list`/`tuple` and `dict` with `str`
//! keys, at most [`MAX_DEPTH`] levels deep. Anything else is a
//! `TypeError` before any decision: nothing is guessed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use portcullis::{Decision, Denial, Portcullis};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// Deepest argument structure accepted.
pub const MAX_DEPTH: usize = 64;

/// The Python error classes live in `portcullis._errors`.
fn error_class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("portcullis._errors")?.getattr(name)
}

fn error(py: Python<'_>, class: &str, message: String) -> PyErr {
    match error_class(py, class).and_then(|c| c.call1((message,))) {
        Ok(e) => PyErr::from_value(e),
        Err(e) => e,
    }
}

/// The typed exception of a denial: `Denied`, `ApprovalPending` or
/// `TaskHalted`, with its reason code.
fn denied(py: Python<'_>, reason: &str, detail: &str, policy_ids: &[String]) -> PyErr {
    let made = py
        .import("portcullis._errors")
        .and_then(|m| m.getattr("denial"))
        .and_then(|f| f.call1((reason, detail, policy_ids.to_vec())));
    match made {
        Ok(e) => PyErr::from_value(e),
        Err(e) => e,
    }
}

fn from_decision(py: Python<'_>, d: &Decision) -> PyErr {
    let reason = d.reason.map_or("internal_error", |r| r.as_str());
    denied(py, reason, &d.detail, &d.policy_ids)
}

fn from_denial(py: Python<'_>, d: &Denial) -> PyErr {
    denied(py, d.reason.as_str(), &d.detail, &[])
}

/// A Python value as JSON (see the module doc for what is accepted).
fn to_json(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err(format!(
            "arguments nest deeper than {MAX_DEPTH} levels"
        )));
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // bool before int: a Python bool is an int.
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err(PyValueError::new_err("an integer argument exceeds 64 bits"));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value())
            .map(Value::Number)
            .ok_or_else(|| PyValueError::new_err("a float argument is not finite"));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_owned()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (k, v) in d.iter() {
            let key = k
                .cast::<PyString>()
                .map_err(|_| PyTypeError::new_err("argument keys must be str"))?
                .to_str()?
                .to_owned();
            map.insert(key, to_json(&v, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return l.iter().map(|v| to_json(&v, depth + 1)).collect();
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t.iter().map(|v| to_json(&v, depth + 1)).collect();
    }
    Err(PyTypeError::new_err(format!(
        "arguments must be JSON-like (dict, list, str, int, float, bool, None), not {}",
        obj.get_type().name()?
    )))
}

/// An embedded gateway: a configuration, its engine and its ledger.
#[pyclass(frozen, module = "portcullis")]
#[derive(Debug)]
struct Gateway {
    gate: Arc<Portcullis>,
}

#[pymethods]
impl Gateway {
    /// Loads and checks the configuration at `path` and opens the embedded
    /// ledger of its `store.url`.
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        match py.detach(|| Portcullis::open(&path)) {
            Ok(gate) => Ok(Self {
                gate: Arc::new(gate),
            }),
            Err(portcullis::Error::Config(findings)) => {
                Err(error(py, "ConfigError", findings.to_string()))
            }
            Err(e @ portcullis::Error::Ledger(_)) => Err(error(py, "LedgerError", e.to_string())),
        }
    }

    /// Loads and checks the configuration at `path`, without a ledger:
    /// decisions in memory, nothing recorded (for tests and measurement;
    /// `open` is the embedded shape).
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        match py.detach(|| Portcullis::load(&path)) {
            Ok(gate) => Ok(Self {
                gate: Arc::new(gate),
            }),
            Err(portcullis::Error::Config(findings)) => {
                Err(error(py, "ConfigError", findings.to_string()))
            }
            Err(e @ portcullis::Error::Ledger(_)) => Err(error(py, "LedgerError", e.to_string())),
        }
    }

    /// Starts a task for `agent_id` (recorded in the ledger).
    #[pyo3(signature = (agent_id, *, goal, tools = None))]
    fn start_task(
        &self,
        py: Python<'_>,
        agent_id: &str,
        goal: &str,
        tools: Option<Vec<String>>,
    ) -> PyResult<Task> {
        let gate = self.gate.clone();
        let started = py.detach(|| gate.start_task(agent_id, goal, tools.as_deref()));
        match started {
            Ok(task) => Ok(Task {
                gate: self.gate.clone(),
                id: task.id,
                agent_id: task.agent_id,
            }),
            Err(d) => Err(from_denial(py, &d)),
        }
    }

    /// Makes every queued record durable and closes the ledger.
    fn close(&self, py: Python<'_>) {
        let gate = self.gate.clone();
        py.detach(|| gate.close());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        "portcullis.Gateway(...)".to_owned()
    }
}

/// A task of an embedded gateway.
#[pyclass(frozen, module = "portcullis")]
#[derive(Debug)]
struct Task {
    gate: Arc<Portcullis>,
    id: String,
    agent_id: String,
}

impl Task {
    fn snapshot(&self) -> PyResult<portcullis::Task> {
        self.gate
            .task(&self.id)
            .ok_or_else(|| PyValueError::new_err("no such task"))
    }

    /// Decides (and records) a call; raises the typed denial.
    fn decide(&self, py: Python<'_>, tool: &str, args: &Value) -> PyResult<()> {
        let gate = self.gate.clone();
        let decision = py.detach(|| gate.decide(&self.id, tool, args));
        if decision.is_allowed() {
            return Ok(());
        }
        // A call on a halted task answers `anomaly_halt`, as the service
        // answers the token of a halted task: only a resume lifts it.
        let halted = decision.reason == Some(portcullis::Reason::TaskNotActive)
            && self
                .gate
                .task(&self.id)
                .is_some_and(|t| t.status == portcullis::TaskStatus::Halted);
        if halted {
            return Err(denied(py, "anomaly_halt", &decision.detail, &[]));
        }
        Err(from_decision(py, &decision))
    }
}

#[pymethods]
impl Task {
    #[getter]
    fn task_id(&self) -> &str {
        &self.id
    }

    #[getter]
    fn agent_id(&self) -> &str {
        &self.agent_id
    }

    #[getter]
    fn state(&self) -> PyResult<String> {
        Ok(self.snapshot()?.state)
    }

    #[getter]
    fn status(&self) -> PyResult<&'static str> {
        Ok(self.snapshot()?.status.as_str())
    }

    /// Decides the call, makes its write-ahead record durable, runs
    /// `invoke(args)` only if allowed, records the outcome and returns
    /// `invoke`'s result.
    #[pyo3(signature = (tool, args = None, *, invoke))]
    fn call<'py>(
        &self,
        py: Python<'py>,
        tool: &str,
        args: Option<Bound<'py, PyAny>>,
        invoke: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = match args {
            Some(a) => a,
            None => PyDict::new(py).into_any(),
        };
        let json = to_json(&args, 0)?;
        if !json.is_object() {
            return Err(PyTypeError::new_err("arguments must be a dict"));
        }
        self.decide(py, tool, &json)?;
        let started = Instant::now();
        let outcome = invoke.call1((args,));
        let latency = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let gate = self.gate.clone();
        match outcome {
            Ok(result) => {
                // The digest covers the result's JSON; a result that is not
                // JSON-like is digested by its repr.
                let text = match to_json(&result, 0) {
                    Ok(v) => v.to_string(),
                    Err(_) => result.repr()?.to_str()?.to_owned(),
                };
                py.detach(|| gate.record_outcome(&self.id, tool, Ok(&text), latency))
                    .map_err(|e| denied(py, "internal_error", &e.to_string(), &[]))?;
                Ok(result)
            }
            Err(err) => {
                // The exception's class, never its message (it may hold
                // data the audit must not keep).
                let kind = err
                    .get_type(py)
                    .name()
                    .map(|n| format!("the tool raised {n}"))
                    .unwrap_or_else(|_| "the tool raised".to_owned());
                let recorded =
                    py.detach(|| gate.record_outcome(&self.id, tool, Err(&kind), latency));
                if let Err(e) = recorded {
                    return Err(denied(py, "internal_error", &e.to_string(), &[]));
                }
                Err(err)
            }
        }
    }

    /// Decides and records the call without running anything.
    #[pyo3(signature = (tool, args = None))]
    fn authorize(
        &self,
        py: Python<'_>,
        tool: &str,
        args: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let json = match args {
            Some(a) => to_json(&a, 0)?,
            None => Value::Object(Map::new()),
        };
        if !json.is_object() {
            return Err(PyTypeError::new_err("arguments must be a dict"));
        }
        self.decide(py, tool, &json)
    }

    /// Moves the task to state `to`: `(from, to, reverify)`.
    fn transition(&self, py: Python<'_>, to: &str) -> PyResult<(String, String, bool)> {
        let gate = self.gate.clone();
        match py.detach(|| gate.transition(&self.id, to)) {
            Ok(t) => Ok((t.from, t.to, t.reverify)),
            Err(d) => Err(from_denial(py, &d)),
        }
    }

    /// Ends the task; later calls are denied `task_not_active`.
    fn complete(&self, py: Python<'_>) -> PyResult<()> {
        let gate = self.gate.clone();
        match py.detach(|| gate.complete(&self.id)) {
            Ok(_) => Ok(()),
            Err(d) => Err(from_denial(py, &d)),
        }
    }

    fn __repr__(&self) -> String {
        format!("portcullis.Task(task_id={:?})", self.id)
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Gateway>()?;
    m.add_class::<Task>()?;
    Ok(())
}
