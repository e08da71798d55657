//! Regression tests for "policies that silently stop applying": a forbid
//! rule that reads an argument Cedar was not shown (undeclared, typed
//! `number`, a union, or typed only by the pinned `inputSchema`) was proven
//! impossible by validation and left out, so the call it forbids passed.
//! Now every argument a policy reads either reaches Cedar or the call is
//! refused with `args_invalid`, and `check` reports the rule.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use portcullis_core::{Engine, ManualClock, PinStatus, Reason, Task};
use serde_json::{Value, json};

const POLICIES: &str = r#"
@id("bounded-reads")
forbid(principal, action, resource)
when { context.args has limit && context.args.limit > 1000 };
"#;

/// A configuration whose tool `fs.read` has `schema` (TOML inline table),
/// or no `args_schema` at all when `schema` is `None`.
fn config(schema: Option<&str>) -> String {
    let schema = schema.map_or(String::new(), |s| format!("args_schema = {s}"));
    format!(
        r#"
[[upstreams]]
name = "fs"
transport = "stdio"
command = ["fs-server"]

[[tools]]
name = "fs.read"
upstream = "fs"
risk = "low"
access = "read"
{schema}

[[agent_types]]
name = "reader"
initial = "read"
states = [
  {{ name = "read", tools = ["fs.read"], next = ["done"] }},
  {{ name = "done", final = true }},
]

[[agents]]
id = "bot"
type = "reader"
tools = ["fs.read"]
bootstrap_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

[policies]
cedar = ["policies/*.cedar"]
"#
    )
}

fn build(schema: Option<&str>) -> Result<(Engine, tempfile::TempDir), String> {
    let dir = tempfile::tempdir().unwrap();
    let loaded = common::load_in(dir.path(), &config(schema), POLICIES);
    let clock = Arc::new(ManualClock::new(common::START));
    portcullis_core::build(&loaded, clock)
        .map(|engine| (engine, dir))
        .map_err(|f| f.to_string())
}

fn engine_with(schema: Option<&str>) -> (Engine, tempfile::TempDir) {
    build(schema).unwrap_or_else(|f| panic!("{f}"))
}

fn task(engine: &Engine) -> Task {
    engine.start_task("t1", "bot", "read", None).unwrap()
}

fn reason(engine: &Engine, args: &Value) -> &'static str {
    engine
        .decide(&task(engine), "fs.read", args)
        .reason
        .map_or("allow", Reason::as_str)
}

#[test]
fn a_forbid_on_an_undeclared_argument_still_applies() {
    // No schema known yet (no args_schema, no pin): `limit` reaches no
    // policy, so a call that carries it is refused, never allowed.
    let (open, _dir) = engine_with(None);
    assert_eq!(
        reason(&open, &json!({ "path": "/data/a", "limit": 100_000 })),
        "args_invalid"
    );
    let d = open.decide(
        &task(&open),
        "fs.read",
        &json!({ "path": "/data/a", "limit": 100_000 }),
    );
    assert!(
        d.detail.contains("/limit") && d.detail.contains("bounded-reads"),
        "{}",
        d.detail
    );
    assert_eq!(reason(&open, &json!({ "path": "/data/a" })), "allow");
    // A configured schema that admits `limit` without declaring it: the
    // rule could never apply, so the configuration is refused.
    let err = build(Some(
        r#"{ type = "object", properties = { path = { type = "string" } }, required = ["path"] }"#,
    ))
    .expect_err("an undeclared argument read by a policy is a finding");
    assert!(
        err.contains("policies/p.cedar:2")
            && err.contains("bounded-reads")
            && err.contains("fs.read")
            && err.contains("context.args.limit"),
        "{err}"
    );
    // Closed to undeclared properties: `limit` cannot be sent at all.
    let (closed, _dir) = engine_with(Some(
        r#"{ type = "object", properties = { path = { type = "string" } }, required = ["path"], additionalProperties = false }"#,
    ));
    assert_eq!(
        reason(&closed, &json!({ "path": "/data/a", "limit": 100_000 })),
        "args_invalid"
    );
    assert_eq!(reason(&closed, &json!({ "path": "/data/a" })), "allow");
}

#[test]
fn a_forbid_on_a_number_typed_argument_applies() {
    let (engine, _dir) = engine_with(Some(
        r#"{ type = "object", properties = { path = { type = "string" }, limit = { type = "number" } }, required = ["path"] }"#,
    ));
    assert_eq!(
        reason(&engine, &json!({ "path": "/data/a", "limit": 100_000 })),
        "policy_forbid"
    );
    assert_eq!(
        reason(&engine, &json!({ "path": "/data/a", "limit": 1e5 })),
        "policy_forbid"
    );
    assert_eq!(
        reason(&engine, &json!({ "path": "/data/a", "limit": 10 })),
        "allow"
    );
    // Not a whole number: Cedar cannot compare it exactly, so it is refused.
    for limit in [json!(1000.5), json!(2.5), json!(1e300)] {
        assert_eq!(
            reason(&engine, &json!({ "path": "/data/a", "limit": limit })),
            "args_invalid",
            "{limit}"
        );
    }
}

#[test]
fn a_forbid_on_an_anyof_argument_applies_or_refuses() {
    // One Cedar type behind the union: the rule applies.
    for schema in [
        r#"{ type = "object", properties = { path = { type = "string" }, limit = { anyOf = [ { type = "integer" }, { type = "null" } ] } }, required = ["path"] }"#,
        r#"{ type = "object", properties = { path = { type = "string" }, limit = { type = ["integer", "null"] } }, required = ["path"] }"#,
        r#"{ type = "object", properties = { path = { type = "string" }, limit = { oneOf = [ { type = "integer", maximum = 10 }, { type = "integer", minimum = 100 } ] } }, required = ["path"] }"#,
    ] {
        let (engine, _dir) = engine_with(Some(schema));
        assert_eq!(
            reason(&engine, &json!({ "path": "/data/a", "limit": 100_000 })),
            "policy_forbid",
            "{schema}"
        );
        assert_eq!(
            reason(&engine, &json!({ "path": "/data/a", "limit": 5 })),
            "allow",
            "{schema}"
        );
    }
    // `null` has no Cedar value: refused when a policy reads it.
    let (engine, _dir) = engine_with(Some(
        r#"{ type = "object", properties = { path = { type = "string" }, limit = { type = ["integer", "null"] } }, required = ["path"] }"#,
    ));
    assert_eq!(
        reason(&engine, &json!({ "path": "/data/a", "limit": null })),
        "args_invalid"
    );
    // Members of different Cedar types: configured, a finding; pinned,
    // refused when the argument is sent.
    let mixed = r#"{ type = "object", properties = { path = { type = "string" }, limit = { anyOf = [ { type = "integer" }, { type = "string" } ] } }, required = ["path"] }"#;
    let err = build(Some(mixed)).expect_err("a finding");
    assert!(
        err.contains("bounded-reads") && err.contains("context.args.limit"),
        "{err}"
    );
    let (pinned, _dir) = engine_with(None);
    pinned.set_pin(
        "fs.read",
        PinStatus::Pinned {
            input_schema: Some(json!({
                "type": "object",
                "properties": {
                    "path": { "type": "string" },
                    "limit": { "anyOf": [{ "type": "integer" }, { "type": "string" }] }
                },
                "required": ["path"]
            })),
        },
    );
    for limit in [json!(100_000), json!("100000")] {
        assert_eq!(
            reason(&pinned, &json!({ "path": "/data/a", "limit": limit })),
            "args_invalid"
        );
    }
    assert_eq!(reason(&pinned, &json!({ "path": "/data/a" })), "allow");
}

#[test]
fn pinned_schema_tools_are_held_to_arg_policies() {
    let schema = json!({
        "type": "object",
        "properties": {
            "path": { "type": "string" },
            "limit": { "type": "integer" }
        },
        "required": ["path"]
    });
    let (pinned, _dir) = engine_with(None);
    assert_eq!(
        pinned.set_pin(
            "fs.read",
            PinStatus::Pinned {
                input_schema: Some(schema.clone()),
            },
        ),
        Some(PinStatus::Pinned {
            input_schema: Some(schema),
        })
    );
    assert_eq!(
        reason(&pinned, &json!({ "path": "/data/a", "limit": 100_000 })),
        "policy_forbid"
    );
    // The same schema configured decides every call the same way.
    let (configured, _dir2) = engine_with(Some(
        r#"{ type = "object", properties = { path = { type = "string" }, limit = { type = "integer" } }, required = ["path"] }"#,
    ));
    for args in [
        json!({ "path": "/data/a", "limit": 100_000 }),
        json!({ "path": "/data/a", "limit": 10 }),
        json!({ "path": "/data/a", "limit": 1.5 }),
        json!({ "path": "/data/a" }),
        json!({ "path": "/data/a", "other": 1 }),
        json!({ "limit": 5 }),
    ] {
        let (a, b) = (
            pinned.decide(&task(&pinned), "fs.read", &args),
            configured.decide(&task(&configured), "fs.read", &args),
        );
        assert_eq!((a.reason, a.policy_ids), (b.reason, b.policy_ids), "{args}");
    }
    // A pin typing `limit` as a number: the rule applies as well.
    pinned.set_pin(
        "fs.read",
        PinStatus::Pinned {
            input_schema: Some(json!({
                "type": "object",
                "properties": { "path": { "type": "string" }, "limit": { "type": "number" } }
            })),
        },
    );
    assert_eq!(
        reason(&pinned, &json!({ "path": "/data/a", "limit": 5000.0 })),
        "policy_forbid"
    );
    // Back to unchecked: nothing types `limit`, so it is refused.
    pinned.set_pin("fs.read", PinStatus::Unchecked);
    assert_eq!(
        reason(&pinned, &json!({ "path": "/data/a", "limit": 5 })),
        "args_invalid"
    );
}
