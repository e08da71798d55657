//! One planner for the library and the service (DESIGN section 12): the
//! embedded library (`portcullis::Portcullis`) and the service over real
//! HTTP (SQLite ledger, in-process upstreams), loaded from the same
//! configuration file and run on the same clock, give the same verdict and
//! end in the same task state for the same random sequence of calls —
//! workflow moves, budgets, Cedar, configured approvals and the `rate`,
//! `distinct_tools` and `denials` anomaly rules (halts included) — and
//! leave the same kinds of audit records, in the same order, in their
//! ledgers (what only the service has aside: tokens, and the outcomes of
//! forwarded calls).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use portcullis::{Portcullis, TaskStatus};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Random sequences tried, each on a fresh task on both sides.
const SEQUENCES: u64 = 24;
/// Calls per sequence (the budget is lower, so budgets run out too).
const STEPS: usize = 40;

/// Anomaly rules close enough together that random sequences trip each.
const ANOMALY: &str = r#"rate = { calls = 4, seconds = 3, action = "deny" }
distinct_tools = { count = 4, seconds = 6, action = "require_approval" }
denials = { count = 12, action = "halt" }"#;

/// A small xorshift generator: the sequences are reproducible from the
/// seed printed on failure, with no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One call of the menu: allowed ones in every state of the workflow,
/// policy denials, schema denials, a tool outside the agent's allowlist,
/// an unknown tool, and high-risk calls that need an approval.
fn pick(rng: &mut Rng) -> (&'static str, Value) {
    match rng.below(14) {
        0 | 1 => ("warehouse.connect", json!({ "database": "analytics" })),
        2 => ("warehouse.connect", json!({ "database": "prod" })),
        3 => ("warehouse.connect", json!({})),
        4 => ("warehouse.query", json!({ "sql": "select a from t" })),
        5 => ("warehouse.query", json!({ "sql": "select * from t" })),
        6 => (
            "warehouse.query",
            json!({ "sql": "select a", "limit": 5000 }),
        ),
        7 => ("files.read", json!({ "path": "/data/in.csv" })),
        8 => ("files.read", json!({ "path": "/etc/passwd" })),
        9 => (
            "warehouse.validate",
            json!({ "table": "events", "rows": [{ "a": 1 }] }),
        ),
        10 => (
            "warehouse.transform",
            json!({ "table": "events", "steps": ["trim"] }),
        ),
        11 => (
            "warehouse.insert",
            json!({ "table": "staging_events", "rows": [] }),
        ),
        12 => ("warehouse.drop", json!({ "table": "events" })),
        _ => ("warehouse.nonesuch", json!({})),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_and_the_service_plan_every_call_alike() {
    let h = Harness::with(Options {
        approval: true,
        anomaly: Some(ANOMALY),
        max_calls_per_task: 5,
        ..Options::default()
    })
    .await;
    let mut loaded = portcullis::LoadedConfig::load(&h.dir.path().join("portcullis.toml")).unwrap();
    // The library's own ledger, beside the service's.
    let ledger = tempfile::tempdir().unwrap();
    loaded.config.store.url = format!("sqlite://{}", ledger.path().join("lib.db").display());
    let lib = Portcullis::open_loaded(&loaded, h.clock.clone()).unwrap();

    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let mut halts = 0;
    let mut records = std::collections::BTreeMap::<String, usize>::new();
    for seed in 1..=SEQUENCES {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let s = h.start_task(None).await;
        let task = off_runtime(|| lib.start_task("ingest-bot", "nightly load", None)).unwrap();
        for step in 0..STEPS {
            if rng.below(4) == 0 {
                h.advance_secs(rng.below(4));
            }
            let (tool, args) = pick(&mut rng);
            let a = h.call(&s.access, &s.task_id, tool, args.clone()).await;
            let d = off_runtime(|| lib.decide(&task.id, tool, &args));
            let service = if a.status == StatusCode::OK {
                assert_eq!(a.body["decision"], "allow", "{}", a.text);
                "allow".to_owned()
            } else {
                a.error().to_owned()
            };
            let library = if d.is_allowed() {
                "allow".to_owned()
            } else {
                d.reason.expect("a denial has a reason").to_string()
            };
            let at = format!("seed {seed}, step {step}: {tool} {args}");
            assert_eq!(service, library, "{at}: service {}", a.text);
            // Neither side may rotate the token here: `write` (the only
            // reverify state) needs an approval, which no one gives.
            assert!(a.body.get("access_token").is_none(), "{at}: {}", a.text);
            let mine = lib.task(&task.id).unwrap();
            if d.is_allowed() {
                assert_eq!(a.body["state"], mine.state.as_str(), "{at}");
            }
            *seen.entry(service).or_default() += 1;
            if mine.status == TaskStatus::Halted {
                // The service revokes a halted task's tokens: its later
                // answers are about the token, not the plan.
                halts += 1;
                break;
            }
        }
        let mine = lib.task(&task.id).unwrap();
        let theirs = h.task(&s.task_id).await;
        let at = format!("seed {seed}");
        assert_eq!(theirs["state"], mine.state.as_str(), "{at}: {theirs}");
        let status = match mine.status {
            TaskStatus::Active => "active",
            TaskStatus::Completed => "completed",
            TaskStatus::Halted => "halted",
        };
        assert_eq!(theirs["status"], status, "{at}: {theirs}");
        let service_kinds = kinds(
            h.audit(&s.task_id)
                .await
                .iter()
                .map(|r| r["kind"].as_str().unwrap().to_owned()),
        );
        let query = portcullis_store::AuditQuery {
            task_id: Some(task.id.clone()),
            limit: Some(1000),
            ..Default::default()
        };
        let library_kinds = kinds(
            off_runtime(|| lib.ledger().unwrap().audit(&query))
                .unwrap()
                .iter()
                .map(|r| r.event.kind.as_str().to_owned()),
        );
        assert_eq!(service_kinds, library_kinds, "{at}");
        for kind in &library_kinds {
            *records.entry(kind.clone()).or_default() += 1;
        }
    }
    // The sequences reached every kind of verdict this test is about; a
    // change that made them all allow (or all deny) would fail here.
    for reason in [
        "allow",
        "policy_forbid",
        "args_invalid",
        "tool_not_granted",
        "tool_unknown",
        "state_violation",
        "limit_exceeded",
        "approval_required",
        "rate_limited",
    ] {
        assert!(seen.contains_key(reason), "no {reason} among {seen:?}");
    }
    assert!(halts > 0, "no sequence was halted by the denials rule");
    // Its runtime must not be dropped inside this test's either.
    off_runtime(move || drop(lib));
    for kind in [
        "task.started",
        "call.allowed",
        "call.denied",
        "state.transition",
        "anomaly",
        "elevation.requested",
        "task.halted",
    ] {
        assert!(records.contains_key(kind), "no {kind} among {records:?}");
    }
}

/// The kinds of audit records both ledgers keep, in order: all but the
/// tokens' (the library has none) and the outcomes of forwarded calls
/// (the library decides without forwarding).
fn kinds(all: impl Iterator<Item = String>) -> Vec<String> {
    all.filter(|k| !k.starts_with("token.") && k != "call.completed")
        .collect()
}

/// Runs `f` on a thread of its own: the embedded ledger drives its store
/// on a runtime of its own, which must not run inside this test's.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}
