//! One test per step of the decision order (DESIGN section 1), each reason
//! code the engine produces reached at least once, and the order itself.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeSet;

use portcullis_core::{Grant, Reason, Task, TaskStatus};
use serde_json::{Value, json};

fn started(engine: &portcullis_core::Engine, agent: &str) -> Task {
    engine.start_task("t1", agent, "test", None).unwrap()
}

fn reason(d: &portcullis_core::Decision) -> &'static str {
    d.reason.map_or("allow", Reason::as_str)
}

#[test]
fn allowed_call_counts_and_stays_in_state() {
    let (engine, _, _dir) = common::engine();
    let mut task = started(&engine, "bot");
    let d = engine.decide(&task, "wh.read", &json!({ "q": "select" }));
    assert_eq!(reason(&d), "allow");
    assert_eq!(d.transition, None);
    task.apply(&d);
    assert_eq!(
        (task.calls, task.calls_of("wh.read"), task.state.as_str()),
        (1, 1, "a")
    );
}

#[test]
fn step1_task_not_active() {
    let (engine, _, _dir) = common::engine();
    for status in [TaskStatus::Completed, TaskStatus::Halted] {
        let mut task = started(&engine, "bot");
        task.status = status;
        let d = engine.decide(&task, "wh.read", &json!({ "q": "x" }));
        assert_eq!(reason(&d), "task_not_active");
        // It comes before everything else, even an unknown tool.
        assert_eq!(
            reason(&engine.decide(&task, "nope", &json!({}))),
            "task_not_active"
        );
        assert_eq!(
            engine.transition(&task, "b").unwrap_err().reason,
            Reason::TaskNotActive
        );
    }
}

#[test]
fn step2_tool_unknown() {
    let (engine, _, _dir) = common::engine();
    let task = started(&engine, "bot");
    for name in ["wh.delete", "", "wh.read ", "WH.READ", "wh.read\u{0}"] {
        assert_eq!(
            reason(&engine.decide(&task, name, &json!({ "q": "x" }))),
            "tool_unknown",
            "{name:?}"
        );
    }
}

#[test]
fn step3_tool_not_granted() {
    let (engine, clock, _dir) = common::engine();
    let mut task = started(&engine, "bot");
    // Registered, allowed in the state, but not on bot's allowlist.
    task.state = "b".to_owned();
    assert_eq!(
        reason(&engine.decide(&task, "wh.admin", &json!({}))),
        "tool_not_granted"
    );

    // On the allowlist but outside the task's narrowed grant.
    let narrow = engine
        .start_task("t2", "bot", "narrow", Some(&["wh.check".to_owned()]))
        .unwrap();
    assert_eq!(narrow.tools, BTreeSet::from(["wh.check".to_owned()]));
    assert_eq!(
        reason(&engine.decide(&narrow, "wh.read", &json!({ "q": "x" }))),
        "tool_not_granted"
    );
    assert_eq!(
        reason(&engine.decide(&narrow, "wh.check", &json!({}))),
        "allow"
    );

    // A live elevation grants it; an expired one does not.
    task.grants.push(Grant {
        tool: "wh.admin".to_owned(),
        expires_at: portcullis_core::Clock::now(&*clock).plus_millis(1000),
        once: false,
        answers: portcullis_core::GrantFor::Elevation,
        args_digest: None,
    });
    assert_eq!(
        reason(&engine.decide(&task, "wh.admin", &json!({}))),
        "allow"
    );
    clock.advance(1000);
    assert_eq!(
        reason(&engine.decide(&task, "wh.admin", &json!({}))),
        "tool_not_granted"
    );
}

#[test]
fn start_task_rejects_tools_outside_the_allowlist() {
    let (engine, _, _dir) = common::engine();
    let err = engine
        .start_task("t", "bot", "", Some(&["wh.admin".to_owned()]))
        .unwrap_err();
    assert_eq!(err.reason, Reason::ToolNotGranted);
    let err = engine
        .start_task("t", "bot", "", Some(&["wh.nope".to_owned()]))
        .unwrap_err();
    assert_eq!(
        err.reason,
        Reason::ToolNotGranted,
        "an unknown tool is not revealed"
    );
    assert!(engine.start_task("t", "ghost", "", None).is_err());
}

#[test]
fn step4_state_violation_and_auto_advance() {
    let (engine, _, _dir) = common::engine();
    let mut task = started(&engine, "bot");
    // wh.write belongs to b, a next state of a: auto-advance, marked reverify.
    let d = engine.decide(&task, "wh.write", &json!({ "table": "staging" }));
    assert_eq!(reason(&d), "allow");
    let t = d.transition.clone().unwrap();
    assert_eq!(
        (t.from.as_str(), t.to.as_str(), t.reverify, t.is_final),
        ("a", "b", true, false)
    );
    task.apply(&d);
    assert_eq!(task.state, "b");
    // From b, wh.check (state a) auto-advances back along the b → a edge.
    let d = engine.decide(&task, "wh.check", &json!({}));
    assert_eq!(d.transition.map(|t| t.to), Some("a".to_owned()));

    // In the final state nothing is allowed.
    let to_end = engine.transition(&task, "end").unwrap();
    assert!(to_end.is_final);
    task.apply_transition(&to_end);
    let d = engine.decide(&task, "wh.read", &json!({ "q": "x" }));
    assert_eq!(reason(&d), "state_violation");

    // Without auto_advance, a tool of the next state is a violation.
    let stepper = started(&engine, "stepper");
    let d = engine.decide(&stepper, "wh.write", &json!({ "table": "staging" }));
    assert_eq!(reason(&d), "state_violation");
    // Explicit transitions follow edges only.
    assert_eq!(
        engine.transition(&stepper, "end").unwrap_err().reason,
        Reason::StateViolation
    );
    assert_eq!(
        engine.transition(&stepper, "nowhere").unwrap_err().reason,
        Reason::StateViolation
    );
    assert_eq!(engine.transition(&stepper, "b").unwrap().to, "b");
}

#[test]
fn step5_limit_exceeded() {
    let (engine, _, _dir) = common::engine();
    let mut task = started(&engine, "bot");
    // Per tool: two writes.
    for _ in 0..2 {
        let d = engine.decide(&task, "wh.write", &json!({ "table": "staging" }));
        assert_eq!(reason(&d), "allow");
        task.apply(&d);
    }
    let d = engine.decide(&task, "wh.write", &json!({ "table": "staging" }));
    assert_eq!(reason(&d), "limit_exceeded");
    task.apply(&d);
    assert_eq!(task.calls, 2, "a denial is not counted");
    // Per task: six calls in all.
    for _ in 0..4 {
        let d = engine.decide(&task, "wh.check", &json!({}));
        assert_eq!(reason(&d), "allow");
        task.apply(&d);
    }
    assert_eq!(
        reason(&engine.decide(&task, "wh.check", &json!({}))),
        "limit_exceeded"
    );
}

#[test]
fn step6_args_invalid() {
    let (engine, _, _dir) = common::engine();
    let task = started(&engine, "bot");
    let cases: Vec<(Value, &str)> = vec![
        (json!("just a string"), "object"),
        (json!([1, 2]), "object"),
        (json!(null), "object"),
        (json!({}), "required"),
        (json!({ "q": 5 }), "type"),
        (json!({ "q": "x", "limit": "many" }), "type"),
        (json!({ "q": "x", "limit": 1.5 }), "type"),
    ];
    for (args, keyword) in cases {
        let d = engine.decide(&task, "wh.read", &args);
        assert_eq!(reason(&d), "args_invalid", "{args}");
        assert!(d.detail.contains(keyword), "{args}: {}", d.detail);
    }
    // An integer the schema accepts but Cedar cannot hold is denied, not dropped.
    let d = engine.decide(&task, "wh.read", &json!({ "q": "x", "limit": u64::MAX }));
    assert_eq!(reason(&d), "args_invalid");
    // Details never echo values.
    let d = engine.decide(&task, "wh.read", &json!({ "q": 123_456_789 }));
    assert!(!d.detail.contains("123456789"), "{}", d.detail);
}

#[test]
fn step6_huge_and_deep_arguments_are_denied_without_panic() {
    let (engine, _, _dir) = common::engine();
    let task = started(&engine, "bot");
    let mut deep = json!("x");
    for _ in 0..100 {
        deep = json!({ "q": deep });
    }
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &deep)),
        "args_invalid"
    );
    let wide = json!({ "q": "x", "rows": vec![json!({"a": 1}); 20_000] });
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &wide)),
        "args_invalid"
    );
    let long = json!({ "q": "x".repeat(2 << 20) });
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &long)),
        "args_invalid"
    );
}

#[test]
fn step7_policy_forbid_names_policies() {
    let (engine, _, _dir) = common::engine();
    let task = started(&engine, "bot");
    let d = engine.decide(&task, "wh.read", &json!({ "q": "top secret" }));
    assert_eq!(
        (reason(&d), d.policy_ids.clone()),
        ("policy_forbid", vec!["no-secrets".to_owned()])
    );
    let d = engine.decide(&task, "wh.read", &json!({ "q": "a secret", "limit": 500 }));
    assert_eq!(d.policy_ids, ["bounded", "no-secrets"]);
    // Context attributes: agent type, tool access and the state the call runs in.
    let mut stepper = started(&engine, "stepper");
    stepper.tools.insert("wh.write".to_owned());
    stepper.state = "a".to_owned();
    let t = engine.transition(&stepper, "b").unwrap();
    stepper.apply_transition(&t);
    assert_eq!(
        reason(&engine.decide(&stepper, "wh.write", &json!({ "table": "x" }))),
        "allow"
    );
    assert_eq!(
        engine
            .decide(&stepper, "wh.write", &json!({ "table": "prod" }))
            .policy_ids,
        ["no-prod-writes"]
    );
}

#[test]
fn step7_policy_evaluation_error_is_internal_error() {
    let (engine, _, _dir) = common::engine();
    let task = started(&engine, "bot");
    let d = engine.decide(&task, "wh.read", &json!({ "q": "x", "limit": 42 }));
    assert_eq!(reason(&d), "internal_error", "{}", d.detail);
    assert_eq!(d.policy_ids, ["overflows"]);
    assert!(!d.is_allowed());
}

#[test]
fn inconsistent_task_is_internal_error() {
    let (engine, _, _dir) = common::engine();
    let mut task = started(&engine, "bot");
    task.state = "gone".to_owned();
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &json!({ "q": "x" }))),
        "internal_error"
    );
    let mut task = started(&engine, "bot");
    task.agent_id = "ghost".to_owned();
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &json!({ "q": "x" }))),
        "internal_error"
    );
    let mut task = started(&engine, "bot");
    task.agent_type = "manual".to_owned();
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &json!({ "q": "x" }))),
        "internal_error"
    );
}

#[test]
fn order_first_failing_step_decides() {
    let (engine, _, _dir) = common::engine();
    let mut task = started(&engine, "bot");
    // Wrong state AND bad args AND forbidden: the state check comes first.
    task.state = "end".to_owned();
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &json!({ "q": 1 }))),
        "state_violation"
    );
    // Budget spent AND bad args: the budget comes first.
    let mut task = started(&engine, "bot");
    task.calls = 6;
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &json!({ "q": 1 }))),
        "limit_exceeded"
    );
    // Bad args AND forbidden: the schema comes first.
    let task = started(&engine, "bot");
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &json!({ "q": "secret", "limit": "x" }))),
        "args_invalid"
    );
}

#[test]
fn every_engine_reason_code_is_reached() {
    // The codes the engine itself decides. The others are decided by the
    // layers around it: tokens (token_*, wrong_audience), task binding
    // (task_mismatch), anomaly rules (rate_limited, anomaly_halt,
    // approval_required), upstream pinning and transport
    // (tool_definition_changed, upstream_unavailable).
    let (engine, _, _dir) = common::engine();
    let mut reached = BTreeSet::new();
    let base = started(&engine, "bot");
    let mut done = base.clone();
    done.status = TaskStatus::Completed;
    let mut spent = base.clone();
    spent.calls = 100;
    let mut broken = base.clone();
    broken.state = "gone".to_owned();
    let mut in_end = base.clone();
    in_end.state = "end".to_owned();
    let cases = [
        (&done, "wh.read", json!({ "q": "x" })),
        (&base, "nope", json!({})),
        (&base, "wh.admin", json!({})),
        (&in_end, "wh.read", json!({ "q": "x" })),
        (&spent, "wh.read", json!({ "q": "x" })),
        (&base, "wh.read", json!({})),
        (&base, "wh.read", json!({ "q": "secret" })),
        (&broken, "wh.read", json!({ "q": "x" })),
        (&base, "wh.read", json!({ "q": "x" })),
    ];
    for (task, tool, args) in cases {
        reached.insert(reason(&engine.decide(task, tool, &args)));
    }
    let expected: BTreeSet<&str> = [
        "allow",
        "task_not_active",
        "tool_unknown",
        "tool_not_granted",
        "state_violation",
        "limit_exceeded",
        "args_invalid",
        "policy_forbid",
        "internal_error",
    ]
    .into();
    assert_eq!(reached, expected);
}

#[test]
fn unsliced_policy_set_decides_the_same() {
    let (indexed, _, _dir) = common::engine();
    let (whole, _, _dir2) = common::engine();
    let whole = whole.without_policy_index();
    let task = started(&indexed, "bot");
    for (tool, args) in [
        ("wh.read", json!({ "q": "x" })),
        ("wh.read", json!({ "q": "secret", "limit": 500 })),
        ("wh.read", json!({ "q": "x", "limit": 42 })),
        ("wh.write", json!({ "table": "prod" })),
        ("wh.write", json!({ "table": "staging" })),
        ("wh.check", json!({})),
    ] {
        let a = indexed.decide(&task, tool, &args);
        let b = whole.decide(&task, tool, &args);
        assert_eq!(
            (a.decision, a.reason, &a.policy_ids),
            (b.decision, b.reason, &b.policy_ids),
            "{tool} {args}"
        );
    }
}

#[test]
fn check_tool_runs_steps_one_to_five_without_arguments() {
    let (engine, _, _dir) = common::engine();
    let task = started(&engine, "bot");
    assert!(engine.check_tool(&task, "wh.read").is_allowed());
    let d = engine.check_tool(&task, "wh.write");
    assert_eq!(d.transition.map(|t| t.to), Some("b".to_owned()));
    assert_eq!(
        reason(&engine.check_tool(&task, "wh.admin")),
        "tool_not_granted"
    );
    assert_eq!(reason(&engine.check_tool(&task, "wh.nope")), "tool_unknown");
    let mut done = task.clone();
    done.state = "end".to_owned();
    assert_eq!(
        reason(&engine.check_tool(&done, "wh.read")),
        "state_violation"
    );
}

#[test]
fn phase_tools_are_the_state_and_everything_after_it() {
    let (engine, _, _dir) = common::engine();
    assert_eq!(
        engine.phase_tools("manual", "a").unwrap(),
        ["wh.read", "wh.write"]
    );
    assert_eq!(engine.phase_tools("manual", "b").unwrap(), ["wh.write"]);
    assert!(engine.phase_tools("manual", "end").unwrap().is_empty());
    // etl's b can go back to a: everything stays reachable.
    assert_eq!(
        engine.phase_tools("etl", "b").unwrap(),
        ["wh.read", "wh.write", "wh.check", "wh.admin"]
    );
    assert!(engine.phase_tools("etl", "nowhere").is_none());
}

#[test]
fn step6_pinned_definitions_block_changed_tools_and_supply_the_schema() {
    use portcullis_core::PinStatus;
    let (engine, _, _dir) = common::engine();
    let task = started(&engine, "bot");
    // `wh.check` has no configured schema: until pinned, any object passes.
    assert_eq!(
        reason(&engine.decide(&task, "wh.check", &json!({"x": 1}))),
        "allow"
    );
    // Pinned with an inputSchema: that schema now applies.
    let schema = json!({"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"], "additionalProperties": false});
    engine.set_pin(
        "wh.check",
        PinStatus::Pinned {
            input_schema: Some(schema),
        },
    );
    assert_eq!(
        reason(&engine.decide(&task, "wh.check", &json!({"x": 1}))),
        "args_invalid"
    );
    assert_eq!(
        reason(&engine.decide(&task, "wh.check", &json!({"id": 1}))),
        "allow"
    );
    // A configured schema wins over the pinned one.
    engine.set_pin(
        "wh.read",
        PinStatus::Pinned {
            input_schema: Some(json!({"type": "object", "required": ["nope"]})),
        },
    );
    assert_eq!(
        reason(&engine.decide(&task, "wh.read", &json!({"q": "s"}))),
        "allow"
    );
    // A changed definition blocks the tool, after the ACL and state checks
    // (a tool outside the state still says so), before the arguments.
    engine.set_pin(
        "wh.check",
        PinStatus::Changed {
            detail: "description changed".into(),
        },
    );
    let d = engine.decide(&task, "wh.check", &json!({"id": 1}));
    assert_eq!(reason(&d), "tool_definition_changed");
    assert_eq!(d.detail, "description changed");
    assert_eq!(
        reason(&engine.check_tool(&task, "wh.check")),
        "tool_definition_changed"
    );
    engine.set_pin("wh.admin", PinStatus::Changed { detail: "x".into() });
    assert_eq!(
        reason(&engine.decide(&task, "wh.admin", &json!({}))),
        "tool_not_granted"
    );
    // An uncompilable pinned schema is not trusted: the tool is blocked.
    let applied = engine.set_pin("wh.check", PinStatus::Pinned { input_schema: Some(json!({"type": "object", "properties": {"a": {"$ref": "http://example.invalid/s.json"}}})) });
    assert!(
        matches!(applied, Some(PinStatus::Changed { .. })),
        "{applied:?}"
    );
    assert_eq!(
        reason(&engine.decide(&task, "wh.check", &json!({"id": 1}))),
        "tool_definition_changed"
    );
    // Re-approval clears it.
    engine.set_pin("wh.check", PinStatus::Pinned { input_schema: None });
    assert_eq!(
        reason(&engine.decide(&task, "wh.check", &json!({"x": 1}))),
        "allow"
    );
    assert_eq!(engine.set_pin("nope.tool", PinStatus::Unchecked), None);
}
