//! A model test of workflows: random sequences of calls and transitions are
//! run through the engine and through a small reference model written
//! independently here. They must agree on every step, and three invariants
//! must hold whatever the sequence:
//!
//! - no tool is ever allowed outside the state the task ends up in;
//! - the state only changes along an edge of the workflow;
//! - a denied call changes neither the state nor any counter.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;

use portcullis_core::{Reason, Task};
use proptest::prelude::*;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy)]
enum Args {
    Valid,
    Invalid,
    Forbidden,
}

#[derive(Debug, Clone)]
enum Op {
    Call(&'static str, Args),
    Transition(&'static str),
}

const TOOLS: [&str; 5] = ["wh.read", "wh.write", "wh.check", "wh.admin", "wh.nope"];
const STATES: [&str; 4] = ["a", "b", "end", "zzz"];

fn op() -> impl Strategy<Value = Op> {
    let args = prop_oneof![
        Just(Args::Valid),
        Just(Args::Invalid),
        Just(Args::Forbidden)
    ];
    prop_oneof![
        4 => (prop::sample::select(TOOLS.to_vec()), args).prop_map(|(t, a)| Op::Call(t, a)),
        1 => prop::sample::select(STATES.to_vec()).prop_map(Op::Transition),
    ]
}

fn args_for(tool: &str, kind: Args) -> Value {
    match (tool, kind) {
        ("wh.read", Args::Valid) => json!({ "q": "rows", "limit": 10 }),
        ("wh.read", Args::Invalid) => json!({ "q": 1 }),
        ("wh.read", Args::Forbidden) => json!({ "q": "the secret" }),
        ("wh.write", Args::Valid) => json!({ "table": "staging" }),
        ("wh.write", Args::Invalid) => json!({}),
        ("wh.write", Args::Forbidden) => json!({ "table": "prod" }),
        (_, Args::Invalid) => json!("not an object"),
        _ => json!({}),
    }
}

/// The reference model of the `bot` agent of the fixture, written from the
/// configuration, not from the engine's code.
#[derive(Debug, Clone, PartialEq)]
struct Model {
    state: &'static str,
    calls: u64,
    per_tool: BTreeMap<&'static str, u64>,
}

impl Model {
    fn tools(state: &str) -> &'static [&'static str] {
        match state {
            "a" => &["wh.read", "wh.check"],
            "b" => &["wh.write", "wh.admin"],
            _ => &[],
        }
    }

    fn next(state: &str) -> &'static [&'static str] {
        match state {
            "a" => &["b"],
            "b" => &["a", "end"],
            _ => &[],
        }
    }

    /// The expected outcome of a call: the reason, or the state it runs in.
    fn call(&self, tool: &'static str, args: Args) -> Result<&'static str, &'static str> {
        if tool == "wh.nope" {
            return Err("tool_unknown");
        }
        if tool == "wh.admin" {
            return Err("tool_not_granted");
        }
        let target = if Self::tools(self.state).contains(&tool) {
            self.state
        } else {
            *Self::next(self.state)
                .iter()
                .find(|s| Self::tools(s).contains(&tool))
                .ok_or("state_violation")?
        };
        if self.calls >= 6
            || (tool == "wh.write" && self.per_tool.get(tool).copied().unwrap_or(0) >= 2)
        {
            return Err("limit_exceeded");
        }
        match args {
            Args::Invalid => Err("args_invalid"),
            Args::Forbidden if tool != "wh.check" => Err("policy_forbid"),
            _ => Ok(target),
        }
    }
}

fn counters(task: &Task) -> (String, u64, BTreeMap<String, u64>) {
    (task.state.clone(), task.calls, task.tool_calls.clone())
}

/// `PROPTEST_CASES` when set (CI raises it), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn engine_agrees_with_model(ops in prop::collection::vec(op(), 1..40)) {
        let (engine, _, _dir) = common::engine();
        let mut task = engine.start_task("m", "bot", "model", None).unwrap();
        let mut model = Model { state: "a", calls: 0, per_tool: BTreeMap::new() };

        for op in ops {
            let before = counters(&task);
            match op {
                Op::Call(tool, kind) => {
                    let decision = engine.decide(&task, tool, &args_for(tool, kind));
                    let expected = model.call(tool, kind);
                    let got = decision.reason.map_or("allow", Reason::as_str);
                    task.apply(&decision);
                    match expected {
                        Ok(target) => {
                            prop_assert_eq!(got, "allow", "{} {:?} in {}", tool, kind, model.state);
                            if target != model.state {
                                prop_assert!(Model::next(model.state).contains(&target));
                            }
                            model.state = target;
                            model.calls += 1;
                            *model.per_tool.entry(tool).or_insert(0) += 1;
                            // Never allowed outside the state it runs in.
                            prop_assert!(Model::tools(&task.state).contains(&tool));
                        }
                        Err(reason) => {
                            prop_assert_eq!(got, reason, "{} {:?} in {}", tool, kind, model.state);
                            prop_assert_eq!(counters(&task), before, "a denial changed the task");
                        }
                    }
                }
                Op::Transition(to) => {
                    let allowed = Model::next(model.state).contains(&to);
                    match engine.transition(&task, to) {
                        Ok(t) => {
                            prop_assert!(allowed, "{} -> {} is not an edge", model.state, to);
                            prop_assert_eq!(t.from.as_str(), model.state);
                            task.apply_transition(&t);
                            model.state = STATES.iter().find(|s| **s == to).copied().unwrap();
                        }
                        Err(denial) => {
                            prop_assert!(!allowed, "{} -> {} refused: {}", model.state, to, denial);
                            prop_assert_eq!(denial.reason, Reason::StateViolation);
                            prop_assert_eq!(counters(&task), before);
                        }
                    }
                }
            }
            prop_assert_eq!(task.state.as_str(), model.state);
            prop_assert_eq!(task.calls, model.calls);
        }
    }
}
