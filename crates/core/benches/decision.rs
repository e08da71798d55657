//! One in-process decision (ACL, workflow state, budgets, argument bounds and
//! JSON Schema, Cedar forbid policies) against a generated registry of 200
//! tools over 10 upstreams, one agent allowed all of them, and 1,000 Cedar
//! forbid policies. DESIGN section 11: p50 ≤ 10 µs, p99 ≤ 25 µs, flat as
//! policies grow.
//!
//! Criterion groups (one run, so the ratios are measured together):
//!
//! - `decide/indexed`: an allowed call, evaluating only the tool's slice of
//!   the policies (the normal engine);
//! - `decide/unsliced`: the same call on the same configuration built with
//!   [`Engine::without_policy_index`], which evaluates all policies;
//! - `decide/indexed_forbid`: a call that a policy forbids;
//! - `decide_by_policy_count/{indexed,unsliced}/{100,1000,10000}`: the
//!   allowed call with 100, 1,000 and 10,000 policies, spread evenly over the
//!   200 tools (so a tool's own slice grows with the total: about 0.5, 5 and
//!   50 scoped policies per tool, plus the 5 unscoped ones);
//! - `decide_by_policy_count/indexed_fixed_slice/{100,1000,10000}`: the same
//!   totals, but the called tool keeps 5 scoped policies of its own and the
//!   rest go to the other 199 tools, which is what the per-tool index is
//!   meant to make free.
//!
//! Criterion reports means and medians only, so after the groups a
//! percentile pass times `PORTCULLIS_BENCH_CALLS` (default 100,000)
//! individual decisions with `Instant` and prints p50/p90/p99/p99.9/max. It
//! is skipped in criterion's smoke mode (`-- --test`, or `cargo test
//! --benches`), with `--profile-time`, and with `PORTCULLIS_BENCH_CALLS=0`.
//!
//! Every benchmarked call is checked before it is timed: the allowed call
//! must be allowed for every tool it is made with, the forbidden one denied
//! with `policy_forbid` by the expected policy, so a typo in the generated
//! configuration cannot turn the benchmark into a measurement of a denial.

// A benchmark is a test-like target: a failed setup should stop it loudly,
// and the generated tables are indexed by construction. The workspace lints
// that forbid these are for code on the request path.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use portcullis_config::LoadedConfig;
use portcullis_core::{Engine, ManualClock, Reason, Task, Timestamp};
use serde_json::{Value, json};

const UPSTREAMS: [&str; 10] = [
    "warehouse",
    "files",
    "crm",
    "tickets",
    "billing",
    "search",
    "mail",
    "calendar",
    "storage",
    "analytics",
];
const TOOLS_PER_UPSTREAM: usize = 20;
const TOOLS: usize = UPSTREAMS.len() * TOOLS_PER_UPSTREAM;
/// Policies that name no tool and so are in every tool's slice.
const UNSCOPED: usize = 5;
/// The configuration the DESIGN target is stated for.
const POLICIES: usize = 1_000;
const POLICY_COUNTS: [usize; 3] = [100, 1_000, 10_000];
const AGENT: &str = "bench-bot";

/// The four kinds of tool in the registry, each with its own argument schema
/// and policy templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Query,
    Read,
    Write,
    Search,
}

impl Kind {
    fn of(tool: usize) -> Self {
        match tool % TOOLS_PER_UPSTREAM % 4 {
            0 => Self::Query,
            1 => Self::Read,
            2 => Self::Write,
            _ => Self::Search,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Query => "query",
            Self::Read => "read",
            Self::Write => "write",
            Self::Search => "search",
        }
    }

    /// `risk` and `access`.
    fn risk_access(self) -> (&'static str, &'static str) {
        match self {
            Self::Write => ("high", "write"),
            Self::Query | Self::Read | Self::Search => ("low", "read"),
        }
    }

    /// The argument schema, as a TOML inline table.
    fn args_schema(self) -> &'static str {
        match self {
            Self::Query => {
                r#"{ type = "object", properties = { sql = { type = "string", maxLength = 4096 }, limit = { type = "integer", minimum = 1, maximum = 100000 }, table = { type = "string", maxLength = 128, pattern = "^[a-z_][a-z0-9_]*$" }, rows = { type = "array", maxItems = 1000, items = { type = "object", properties = { id = { type = "integer" }, name = { type = "string", maxLength = 256 }, status = { type = "string", enum = ["active", "pending", "closed"] } }, required = ["id"], additionalProperties = false } }, tags = { type = "array", maxItems = 16, items = { type = "string", maxLength = 32 } } }, required = ["sql", "table"], additionalProperties = false }"#
            }
            Self::Read => {
                r#"{ type = "object", properties = { path = { type = "string", maxLength = 1024 }, limit = { type = "integer", minimum = 1 }, offset = { type = "integer", minimum = 0 }, encoding = { enum = ["utf-8", "base64"] } }, required = ["path"], additionalProperties = false }"#
            }
            Self::Write => {
                r#"{ type = "object", properties = { table = { type = "string", maxLength = 128, pattern = "^[a-z_][a-z0-9_]*$" }, rows = { type = "array", maxItems = 1000, items = { type = "object", properties = { id = { type = "integer" }, name = { type = "string", maxLength = 256 }, status = { type = "string", enum = ["active", "pending", "closed"] } }, required = ["id"], additionalProperties = false } }, mode = { type = "string", enum = ["append", "upsert", "replace"] }, dry_run = { type = "boolean" } }, required = ["table", "rows"], additionalProperties = false }"#
            }
            Self::Search => {
                r#"{ type = "object", properties = { query = { type = "string", maxLength = 512 }, limit = { type = "integer", minimum = 1 }, filters = { type = "array", maxItems = 16, items = { type = "string", maxLength = 64 } }, fields = { type = "array", maxItems = 32, items = { type = "string", maxLength = 64 } } }, required = ["query"], additionalProperties = false }"#
            }
        }
    }

    /// The `round`-th policy of template `template` (0..5) for a tool of
    /// this kind: its id suffix and its `when` condition. Every condition
    /// is false for the allowed call of [`allowed_args`].
    fn policy(self, template: usize, round: usize) -> (&'static str, String) {
        match (self, template) {
            (Self::Query, 0) => ("no-sql-wildcards", r#"context.args.sql like "*\**""#.to_owned()),
            (Self::Query, 1) => (
                "no-ddl",
                r#"context.args.sql like "*DROP *" || context.args.sql like "*TRUNCATE *" || context.args.sql like "*ALTER *""#.to_owned(),
            ),
            (Self::Query, 2) => (
                "table-not-sensitive",
                format!(
                    r#"context.args.table like "secret_*" || context.args.table like "*_pii" || context.args.table == "audit_log_{round}""#
                ),
            ),
            (Self::Query, 3) => (
                "limit-cap",
                format!(
                    "(context.args has limit && context.args.limit > {}) || context.task.tool_calls > {}",
                    500 + round,
                    10_000 + round
                ),
            ),
            (Self::Query, _) => (
                "no-pii-tags",
                format!(
                    r#"context.args has tags && context.args.tags.containsAny(["pii", "phi", "secret-{round}"])"#
                ),
            ),
            (Self::Read, 0) => (
                "files-under-data",
                r#"!(context.args.path like "/data/*")"#.to_owned(),
            ),
            (Self::Read, 1) => (
                "no-path-traversal",
                r#"context.args.path like "*..*""#.to_owned(),
            ),
            (Self::Read, 2) => (
                "no-key-material",
                format!(
                    r#"context.args.path like "*/.ssh/*" || context.args.path like "*.pem" || context.args.path like "/data/secret{round}/*""#
                ),
            ),
            (Self::Read, 3) => (
                "bounded-offset",
                format!(
                    "context.args has offset && context.args.offset > {}",
                    1_000_000 + round
                ),
            ),
            (Self::Read, _) => (
                "binary-only-for-ops",
                format!(
                    r#"context.args has encoding && context.args.encoding == "base64" && principal.type != "ops{round}""#
                ),
            ),
            (Self::Write, 0) => (
                "staging-only",
                r#"!(context.args.table like "staging_*")"#.to_owned(),
            ),
            (Self::Write, 1) => (
                "no-replace",
                r#"context.args has mode && context.args.mode == "replace""#.to_owned(),
            ),
            (Self::Write, 2) => (
                "no-ledger",
                format!(r#"context.args.table like "*_pii" || context.args.table == "ledger_{round}""#),
            ),
            (Self::Write, 3) => (
                "dry-run-outside-work",
                r#"context.args has dry_run && !context.args.dry_run && context.task.state != "work""#
                    .to_owned(),
            ),
            (Self::Write, _) => (
                "high-risk-budget",
                format!(
                    r#"resource.risk == "high" && context.task.tool_calls >= {}"#,
                    100 + round
                ),
            ),
            (Self::Search, 0) => (
                "no-credential-search",
                r#"context.args.query like "*password*""#.to_owned(),
            ),
            (Self::Search, 1) => (
                "no-ssn-field",
                r#"context.args has fields && context.args.fields.contains("ssn")"#.to_owned(),
            ),
            (Self::Search, 2) => (
                "tenant-scoped",
                format!(
                    r#"context.args has filters && context.args.filters.containsAny(["tenant:*", "org:any{round}"])"#
                ),
            ),
            (Self::Search, 3) => (
                "search-limit",
                format!(
                    "context.args has limit && context.args.limit > {}",
                    200 + round
                ),
            ),
            (Self::Search, _) => (
                "no-internal-sites",
                format!(r#"context.args.query like "*site:internal{round}*""#),
            ),
        }
    }
}

fn tool_name(tool: usize) -> String {
    let upstream = UPSTREAMS[tool / TOOLS_PER_UPSTREAM];
    let kind = Kind::of(tool);
    format!(
        "{upstream}.{}_{:02}",
        kind.verb(),
        tool % TOOLS_PER_UPSTREAM
    )
}

/// The unscoped policies: `(id, condition)`.
const UNSCOPED_POLICIES: [(&str, &str); UNSCOPED] = [
    (
        "bounded-reads",
        "context.args has limit && context.args.limit > 1000",
    ),
    (
        "no-writes-when-done",
        r#"resource.access == "write" && context.task.state == "done""#,
    ),
    ("task-call-budget", "context.task.calls > 100000"),
    (
        "no-traversal-anywhere",
        r#"context.args has path && context.args.path like "*..*""#,
    ),
    (
        "no-quarantined-agents",
        r#"principal.type == "quarantined""#,
    ),
];

/// How the tool-scoped policies are spread over the tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Round-robin over all tools: every slice grows with the total.
    Even,
    /// Tool 0 gets exactly its five templates, the rest go round-robin to
    /// the other tools: tool 0's slice stays the same as the total grows.
    FixedFirst,
}

/// Tool-scoped policies of tool 0 under [`Layout::FixedFirst`].
const FIXED_OWN: usize = 5;

/// The configuration file and its policy files (name, text) for `policies`
/// policies: [`UNSCOPED`] in `common.cedar`, the rest spread over the tools
/// as `layout` says (a tool gets its templates 0, 1, 2, … in turn), one file
/// per upstream.
fn generate(policies: usize, layout: Layout) -> (String, Vec<(String, String)>) {
    let mut toml = String::new();
    for upstream in UPSTREAMS {
        writeln!(
            toml,
            "[[upstreams]]\nname = \"{upstream}\"\ntransport = \"stdio\"\ncommand = [\"{upstream}-server\"]\n"
        )
        .unwrap();
    }
    let names: Vec<String> = (0..TOOLS).map(tool_name).collect();
    for (t, name) in names.iter().enumerate() {
        let kind = Kind::of(t);
        let (risk, access) = kind.risk_access();
        let upstream = UPSTREAMS[t / TOOLS_PER_UPSTREAM];
        writeln!(
            toml,
            "[[tools]]\nname = \"{name}\"\nupstream = \"{upstream}\"\nrisk = \"{risk}\"\naccess = \"{access}\"\nargs_schema = {}\n",
            kind.args_schema()
        )
        .unwrap();
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let list = quoted.join(", ");
    writeln!(
        toml,
        "[[agent_types]]\nname = \"worker\"\ninitial = \"work\"\nstates = [\n  {{ name = \"work\", tools = [{list}], next = [\"done\"] }},\n  {{ name = \"done\", final = true }},\n]\n"
    )
    .unwrap();
    writeln!(
        toml,
        "[[agents]]\nid = \"{AGENT}\"\ntype = \"worker\"\ntools = [{list}]\nbootstrap_sha256 = \"{}\"\n",
        "0".repeat(64)
    )
    .unwrap();
    toml.push_str("[policies]\ncedar = [\"policies/*.cedar\"]\n");

    let mut files: Vec<(String, String)> = UPSTREAMS
        .iter()
        .map(|u| (format!("{u}.cedar"), String::new()))
        .collect();
    let mut common = String::new();
    for (id, when) in UNSCOPED_POLICIES.iter().take(policies) {
        writeln!(
            common,
            "@id(\"{id}\")\nforbid(principal, action, resource)\nwhen {{ {when} }};\n"
        )
        .unwrap();
    }
    files.push(("common.cedar".to_owned(), common));
    let scoped = policies.saturating_sub(UNSCOPED);
    let placed = (0..scoped).map(|p| match layout {
        Layout::Even => (p % TOOLS, p / TOOLS),
        Layout::FixedFirst if p < FIXED_OWN => (0, p),
        Layout::FixedFirst => {
            let q = p - FIXED_OWN;
            (1 + q % (TOOLS - 1), q / (TOOLS - 1))
        }
    });
    for (t, nth) in placed {
        let (template, round) = (nth % 5, nth / 5);
        let (suffix, when) = Kind::of(t).policy(template, round);
        let name = &names[t];
        let id = if round == 0 {
            format!("{name}/{suffix}")
        } else {
            format!("{name}/{suffix}-{round}")
        };
        let text = &mut files[t / TOOLS_PER_UPSTREAM].1;
        writeln!(
            text,
            "@id(\"{id}\")\nforbid(principal, action, resource == Tool::\"{name}\")\nwhen {{ {when} }};\n"
        )
        .unwrap();
    }
    (toml, files)
}

/// Builds the engine for `policies` generated policies laid out as
/// `layout`; prints how long the build took (it is not part of any timed
/// figure).
fn engine(policies: usize, layout: Layout) -> Engine {
    let (toml, files) = generate(policies, layout);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    for (name, text) in &files {
        std::fs::write(dir.path().join("policies").join(name), text).unwrap();
    }
    let config_path = dir.path().join("portcullis.toml");
    std::fs::write(&config_path, &toml).unwrap();
    let started = Instant::now();
    let loaded = LoadedConfig::parse(&toml, Path::new(&config_path))
        .unwrap_or_else(|f| panic!("generated config does not load: {f:?}"));
    let clock = Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)));
    let engine = portcullis_core::build(&loaded, clock)
        .unwrap_or_else(|f| panic!("generated config does not build: {f:?}"));
    assert_eq!(engine.policy_count(), policies);
    assert_eq!(engine.tools().count(), TOOLS);
    eprintln!(
        "setup: {TOOLS} tools, {policies} policies ({layout:?}): engine built in {:.2?}",
        started.elapsed()
    );
    engine
}

/// A realistic allowed call of a query tool: about 400 bytes of JSON.
fn allowed_args() -> Value {
    json!({
        "sql": "SELECT o.id, o.customer_id, o.total_cents, o.status FROM orders o \
                WHERE o.created_at >= '2024-01-01' AND o.status = 'pending' \
                ORDER BY o.created_at DESC",
        "limit": 100,
        "table": "orders",
        "rows": [
            { "id": 1001, "name": "alpha", "status": "active" },
            { "id": 1002, "name": "bravo", "status": "pending" },
            { "id": 1003, "name": "charlie", "status": "pending" },
            { "id": 1004, "name": "delta", "status": "closed" }
        ],
        "tags": ["reporting", "daily"]
    })
}

/// The same call with a wildcard select, which `<tool>/no-sql-wildcards`
/// forbids.
fn forbidden_args() -> Value {
    let mut args = allowed_args();
    args["sql"] =
        json!("SELECT * FROM orders o WHERE o.status = 'pending' ORDER BY o.created_at DESC");
    args
}

/// The query tools, which the benchmarked calls go to in turn.
fn query_tools() -> Vec<String> {
    (0..TOOLS)
        .filter(|&t| Kind::of(t) == Kind::Query)
        .map(tool_name)
        .collect()
}

fn start(engine: &Engine) -> Task {
    engine
        .start_task("bench-task", AGENT, "nightly orders report", None)
        .unwrap()
}

/// Checks, untimed, that `args` is allowed for every tool in `tools`.
fn assert_allowed(engine: &Engine, task: &Task, tools: &[String], args: &Value) {
    for tool in tools {
        let d = engine.decide(task, tool, args);
        assert!(
            d.is_allowed(),
            "{tool}: expected allow, got {:?} {} {:?}",
            d.reason,
            d.detail,
            d.policy_ids
        );
        assert!(d.transition.is_none(), "{tool}: unexpected transition");
    }
}

/// Checks, untimed, that `args` is forbidden for every tool in `tools` by
/// its `no-sql-wildcards` policy.
fn assert_forbidden(engine: &Engine, task: &Task, tools: &[String], args: &Value) {
    for tool in tools {
        let d = engine.decide(task, tool, args);
        assert_eq!(
            d.reason,
            Some(Reason::PolicyForbid),
            "{tool}: expected policy_forbid, got {:?} {}",
            d.reason,
            d.detail
        );
        let expected = format!("{tool}/no-sql-wildcards");
        assert!(
            d.policy_ids.contains(&expected),
            "{tool}: forbidden by {:?}, expected {expected}",
            d.policy_ids
        );
    }
}

/// One engine configuration under test, with its calls checked.
struct Setup {
    indexed: Engine,
    unsliced: Engine,
    task: Task,
    tools: Vec<String>,
    allowed: Value,
}

impl Setup {
    fn new(policies: usize) -> Self {
        let indexed = engine(policies, Layout::Even);
        let unsliced = engine(policies, Layout::Even).without_policy_index();
        let task = start(&indexed);
        let tools = query_tools();
        let allowed = allowed_args();
        assert_allowed(&indexed, &task, &tools, &allowed);
        assert_allowed(&unsliced, &task, &tools, &allowed);
        Self {
            indexed,
            unsliced,
            task,
            tools,
            allowed,
        }
    }
}

/// Times one decision per iteration, going round the query tools.
fn bench_decide(
    b: &mut criterion::Bencher<'_>,
    engine: &Engine,
    task: &Task,
    tools: &[String],
    args: &Value,
) {
    let mut i = 0usize;
    b.iter(|| {
        let tool = &tools[i % tools.len()];
        i = i.wrapping_add(1);
        black_box(engine.decide(black_box(task), black_box(tool), black_box(args)))
    });
}

fn decide(c: &mut Criterion, setup: &Setup) {
    let forbidden = forbidden_args();
    assert_forbidden(&setup.indexed, &setup.task, &setup.tools, &forbidden);
    assert_forbidden(&setup.unsliced, &setup.task, &setup.tools, &forbidden);

    let mut group = c.benchmark_group("decide");
    group.bench_function("indexed", |b| {
        bench_decide(b, &setup.indexed, &setup.task, &setup.tools, &setup.allowed);
    });
    group.bench_function("unsliced", |b| {
        bench_decide(
            b,
            &setup.unsliced,
            &setup.task,
            &setup.tools,
            &setup.allowed,
        );
    });
    group.bench_function("indexed_forbid", |b| {
        bench_decide(b, &setup.indexed, &setup.task, &setup.tools, &forbidden);
    });
    group.finish();
}

fn decide_by_policy_count(c: &mut Criterion, at_target: &Setup) {
    let mut group = c.benchmark_group("decide_by_policy_count");
    for count in POLICY_COUNTS {
        let owned;
        let setup = if count == POLICIES {
            at_target
        } else {
            owned = Setup::new(count);
            &owned
        };
        group.bench_with_input(BenchmarkId::new("indexed", count), setup, |b, s| {
            bench_decide(b, &s.indexed, &s.task, &s.tools, &s.allowed);
        });
        // Unsliced with 10,000 policies takes milliseconds a call: 100
        // samples would take minutes, 20 are plenty at that size.
        group.sample_size(if count > POLICIES { 20 } else { 100 });
        group.bench_with_input(BenchmarkId::new("unsliced", count), setup, |b, s| {
            bench_decide(b, &s.unsliced, &s.task, &s.tools, &s.allowed);
        });
        group.sample_size(100);
    }
    // The same totals, but the called tool's own slice held at 5 scoped +
    // 5 unscoped policies: what the index makes independent of the total.
    let allowed = allowed_args();
    let tool = vec![tool_name(0)];
    for count in POLICY_COUNTS {
        let engine = engine(count, Layout::FixedFirst);
        let task = start(&engine);
        assert_allowed(&engine, &task, &tool, &allowed);
        assert_forbidden(&engine, &task, &tool, &forbidden_args());
        group.bench_with_input(
            BenchmarkId::new("indexed_fixed_slice", count),
            &engine,
            |b, e| bench_decide(b, e, &task, &tool, &allowed),
        );
    }
    group.finish();
}

/// Times `calls` individual decisions and prints their percentiles.
fn percentiles(
    label: &str,
    engine: &Engine,
    task: &Task,
    tools: &[String],
    args: &Value,
    calls: usize,
) {
    // Warm caches and branch predictors as criterion's warm-up would.
    for i in 0..calls.min(10_000) {
        black_box(engine.decide(task, &tools[i % tools.len()], args));
    }
    let mut ns: Vec<u64> = Vec::with_capacity(calls);
    for i in 0..calls {
        let tool = &tools[i % tools.len()];
        let started = Instant::now();
        let d = engine.decide(black_box(task), black_box(tool), black_box(args));
        let elapsed = started.elapsed();
        black_box(d);
        ns.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }
    ns.sort_unstable();
    let at = |q: f64| {
        // Nearest-rank percentile.
        let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len());
        Duration::from_nanos(ns[rank - 1])
    };
    let mean = Duration::from_nanos(ns.iter().sum::<u64>() / ns.len() as u64);
    println!(
        "percentiles {label:<24} n={calls} mean={mean:>9.2?} p50={:>9.2?} p90={:>9.2?} p99={:>9.2?} p99.9={:>9.2?} max={:>9.2?}",
        at(0.50),
        at(0.90),
        at(0.99),
        at(0.999),
        Duration::from_nanos(ns[ns.len() - 1]),
    );
}

/// The cost of the timer itself, to read the percentiles against.
fn timer_overhead() {
    let mut ns: Vec<u64> = (0..100_000)
        .map(|_| {
            let started = Instant::now();
            u64::try_from(black_box(started).elapsed().as_nanos()).unwrap_or(u64::MAX)
        })
        .collect();
    ns.sort_unstable();
    println!(
        "percentiles {:<24} p50={:?} p99={:?}",
        "timer_overhead",
        Duration::from_nanos(ns[ns.len() / 2]),
        Duration::from_nanos(ns[ns.len() * 99 / 100]),
    );
}

fn percentile_calls() -> usize {
    let args: Vec<String> = std::env::args().collect();
    let benchmarking = args.iter().any(|a| a == "--bench")
        && !args
            .iter()
            .any(|a| a == "--test" || a == "--list" || a.starts_with("--profile-time"));
    if !benchmarking {
        return 0;
    }
    std::env::var("PORTCULLIS_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn main() {
    let setup = Setup::new(POLICIES);
    let mut c = Criterion::default().configure_from_args();
    decide(&mut c, &setup);
    decide_by_policy_count(&mut c, &setup);

    let calls = percentile_calls();
    if calls > 0 {
        timer_overhead();
        let forbidden = forbidden_args();
        let s = &setup;
        percentiles(
            "decide/indexed",
            &s.indexed,
            &s.task,
            &s.tools,
            &s.allowed,
            calls,
        );
        percentiles(
            "decide/unsliced",
            &s.unsliced,
            &s.task,
            &s.tools,
            &s.allowed,
            calls,
        );
        percentiles(
            "decide/indexed_forbid",
            &s.indexed,
            &s.task,
            &s.tools,
            &forbidden,
            calls,
        );
    }
    c.final_summary();
}
