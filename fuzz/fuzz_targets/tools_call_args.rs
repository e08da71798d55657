//! The argument path of `tools/call`: arbitrary bytes, when they are JSON,
//! become the `arguments` of a `tools/call` request, travel through the
//! JSON-RPC framing, and are decided by the engine for every tool of a small
//! configuration (argument bounds, JSON Schema, conversion for Cedar, Cedar
//! forbid policies).
//!
//! Properties checked (beyond "no panic"):
//!
//! 1. The arguments come out of the framed request exactly as they went in.
//! 2. Every decision is an allow (no reason, no policy, no transition) or an
//!    `args_invalid` / `policy_forbid` denial; a `policy_forbid` names only
//!    policies of the configuration. Anything else (`internal_error` from a
//!    context that cannot be built, say) is a bug: the policies below do no
//!    arithmetic and guard every optional attribute with `has`.
//! 3. The engine without its per-tool policy index decides exactly the same
//!    (the index is an optimisation only).
//! 4. Deciding is pure: the same call twice gives the same decision.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use portcullis_core::config::{LoadedConfig, PolicyFile};
use portcullis_core::{Engine, ManualClock, Reason, Task, Timestamp};
use portcullis_mcp::jsonrpc::{self, Id, Incoming, Message};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[[upstreams]]
name = "warehouse"
transport = "stdio"
command = ["warehouse-server"]

[[upstreams]]
name = "files"
transport = "stdio"
command = ["files-server"]

[[tools]]
name = "files.read"
upstream = "files"
risk = "low"
access = "read"
args_schema = { type = "object", properties = { path = { type = "string", maxLength = 1024 }, limit = { type = "integer", minimum = 1 }, timeout_ms = { type = "integer", minimum = 0 } }, required = ["path"], additionalProperties = false }

[[tools]]
name = "warehouse.query"
upstream = "warehouse"
risk = "low"
access = "read"
args_schema = { type = "object", properties = { sql = { type = "string", maxLength = 4096 }, limit = { type = "integer", minimum = 1 }, timeout_ms = { type = "integer", minimum = 0 } }, required = ["sql"], additionalProperties = false }

[[tools]]
name = "warehouse.insert"
upstream = "warehouse"
risk = "high"
access = "write"
args_schema = { type = "object", properties = { table = { type = "string" }, rows = { type = "array", maxItems = 1000, items = { type = "object" } } }, required = ["table", "rows"], additionalProperties = false }

[[tools]]
name = "warehouse.tag"
upstream = "warehouse"
risk = "low"
access = "write"
args_schema = { type = "object", properties = { tags = { type = "array", items = { type = "string" } }, nums = { type = "array", items = { type = "integer" } }, mode = { enum = ["fast", "safe"] }, opts = { type = "object", properties = { depth = { type = "integer" }, dry_run = { type = "boolean" }, labels = { type = "array", items = { type = "string" } } }, required = ["dry_run"] } }, additionalProperties = false }

[[tools]]
name = "warehouse.ping"
upstream = "warehouse"
risk = "low"
access = "read"

[[agent_types]]
name = "worker"
initial = "work"
states = [
  { name = "work", tools = ["files.read", "warehouse.query", "warehouse.insert", "warehouse.tag", "warehouse.ping"], next = ["done"] },
  { name = "done", final = true },
]

[[agents]]
id = "fuzz-bot"
type = "worker"
tools = ["files.read", "warehouse.query", "warehouse.insert", "warehouse.tag", "warehouse.ping"]
bootstrap_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

const POLICIES: &str = r#"
@id("no-sql-wildcards")
forbid(principal, action, resource == Tool::"warehouse.query")
when { context.args.sql like "*\**" };

@id("bounded-reads")
forbid(principal, action, resource)
when { context.args has limit && context.args.limit > 1000 };

@id("query-timeout")
forbid(principal, action, resource == Tool::"warehouse.query")
when { context.args has timeout_ms && context.args.timeout_ms > 60000 };

@id("files-under-data")
forbid(principal, action, resource == Tool::"files.read")
when { !(context.args.path like "/data/*") };

@id("no-path-traversal")
forbid(principal, action, resource == Tool::"files.read")
when { context.args.path like "*..*" };

@id("insert-into-staging-only")
forbid(principal, action, resource == Tool::"warehouse.insert")
when { !(context.args.table like "staging_*") };

@id("no-secret-tags")
forbid(principal, action, resource == Tool::"warehouse.tag")
when { context.args has tags && context.args.tags.contains("secret") };

@id("no-sentinel-numbers")
forbid(principal, action, resource == Tool::"warehouse.tag")
when { context.args has nums && context.args.nums.containsAny([0, -1, 9223372036854775807]) };

@id("shallow-only")
forbid(principal, action, resource == Tool::"warehouse.tag")
when { context.args has opts && context.args.opts has depth && context.args.opts.depth > 3 };

@id("safe-mode-is-dry")
forbid(principal, action, resource == Tool::"warehouse.tag")
when { context.args has mode && context.args.mode == "safe" && context.args has opts && !context.args.opts.dry_run };

@id("no-prod-labels")
forbid(principal, action, resource == Tool::"warehouse.tag")
when { context.args has opts && context.args.opts has labels && context.args.opts.labels.contains("prod") };
"#;

const POLICY_IDS: &[&str] = &[
    "no-sql-wildcards",
    "bounded-reads",
    "query-timeout",
    "files-under-data",
    "no-path-traversal",
    "insert-into-staging-only",
    "no-secret-tags",
    "no-sentinel-numbers",
    "shallow-only",
    "safe-mode-is-dry",
    "no-prod-labels",
];

const TOOLS: &[&str] = &[
    "files.read",
    "warehouse.query",
    "warehouse.insert",
    "warehouse.tag",
    "warehouse.ping",
];

struct Fixture {
    engine: Engine,
    /// The same configuration, every policy evaluated for every call.
    unindexed: Engine,
    task: Task,
}

fn build_engine() -> Engine {
    // The configuration and its policy file are kept in memory (no temporary
    // folder): the policy text is handed to the engine as if read from disk.
    let mut loaded = LoadedConfig::parse(CONFIG, "portcullis.toml".as_ref())
        .unwrap_or_else(|f| panic!("fuzz config: {f}"));
    loaded.policies.push(PolicyFile {
        path: "policies/fuzz.cedar".into(),
        text: POLICIES.to_owned(),
        entry: 0,
    });
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    portcullis_core::build(&loaded, clock).unwrap_or_else(|f| panic!("fuzz config: {f}"))
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let engine = build_engine();
        assert_eq!(engine.policy_count(), POLICY_IDS.len());
        let task = engine
            .start_task("fuzz-task", "fuzz-bot", "fuzz the arguments", None)
            .unwrap_or_else(|d| panic!("start_task: {d}"));
        Fixture {
            engine,
            unindexed: build_engine().without_policy_index(),
            task,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(arguments) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let fx = fixture();
    for &tool in TOOLS {
        let args = through_framing(tool, &arguments);
        let decision = fx.engine.decide(&fx.task, tool, &args);
        assert_eq!(decision.tool, tool);
        assert_eq!(decision.transition, None, "every tool is in the one state");
        match decision.reason {
            None => {
                assert!(decision.is_allowed());
                assert!(decision.policy_ids.is_empty(), "{decision:?}");
                assert!(args.is_object(), "allowed non-object arguments");
            }
            Some(Reason::ArgsInvalid) => {
                assert!(!decision.is_allowed());
                assert!(decision.policy_ids.is_empty(), "{decision:?}");
            }
            Some(Reason::PolicyForbid) => {
                assert!(!decision.is_allowed());
                assert!(!decision.policy_ids.is_empty(), "{decision:?}");
                for id in &decision.policy_ids {
                    assert!(POLICY_IDS.contains(&id.as_str()), "{decision:?}");
                }
            }
            Some(other) => panic!("unexpected denial {other}: {decision:?}"),
        }
        let unindexed = fx.unindexed.decide(&fx.task, tool, &args);
        assert_eq!(decision, unindexed, "the policy index changed a decision");
        let again = fx.engine.decide(&fx.task, tool, &args);
        assert_eq!(decision, again, "deciding twice differs");
    }
});

/// The arguments as the gateway's `tools/call` handler sees them: framed in
/// a request, read back by the JSON-RPC parser, `params.arguments` taken
/// (absent or `null` meaning `{}`, as in `crates/gateway/src/mcp.rs`).
fn through_framing(tool: &str, arguments: &Value) -> Value {
    let request = Message::request(
        Id::from(1),
        "tools/call",
        Some(json!({ "name": tool, "arguments": arguments })),
    );
    let Ok(Incoming::One(Ok(read))) = jsonrpc::parse(request.to_json().as_bytes(), usize::MAX)
    else {
        panic!("a tools/call request did not read back");
    };
    let got = read.params().and_then(|p| p.get("arguments"));
    assert_eq!(got, Some(arguments), "arguments changed in framing");
    match got {
        None | Some(Value::Null) => json!({}),
        Some(a) => a.clone(),
    }
}
