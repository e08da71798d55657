//! What operators watch: the `/metrics` gauges read from the ledger (task
//! counts by status, the writer queue), how they behave when the ledger is
//! down or hangs, and that replicas on one PostgreSQL ledger agree on them
//! (skipped without `PORTCULLIS_TEST_POSTGRES_URL`); and what the audit log keeps under
//! `audit.sample_low_risk` (compact records for tasks outside the sample,
//! never a reduced denial, high-risk call, token event, transition or
//! halt; a choice fixed by the task id; a chain that still verifies).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// A little longer than the gateway reuses the ledger's task counts.
const PAST_CACHE: Duration = Duration::from_millis(1_100);

/// `/metrics`, asserting it answered 200.
async fn scrape(h: &Harness) -> String {
    let a = h.get("/metrics", None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.text
}

/// The value of the series written exactly `series` (name and labels).
fn value(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

fn active(text: &str) -> Option<u64> {
    value(text, "portcullis_tasks{status=\"active\"}")
}

fn halted(text: &str) -> Option<u64> {
    value(text, "portcullis_tasks{status=\"halted\"}")
}

async fn halt(h: &Harness, task_id: &str) {
    let a = h
        .post_json(
            &format!("/v1/tasks/{task_id}/halt"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_ledgers_task_counts_and_an_idle_queue() {
    let h = Harness::start().await;
    let tasks = [
        h.start_task(None).await,
        h.start_task(None).await,
        h.start_task(None).await,
        h.start_task(None).await,
    ];
    halt(&h, &tasks[0].task_id).await;
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/complete", tasks[1].task_id),
            Some(&tasks[1].access),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);

    let text = scrape(&h).await;
    assert_eq!(active(&text), Some(2), "{text}");
    assert_eq!(halted(&text), Some(1), "{text}");
    assert!(text.contains("# TYPE portcullis_tasks gauge\n"), "{text}");
    assert_eq!(
        value(&text, "portcullis_audit_queue_depth"),
        Some(0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE portcullis_audit_queue_depth gauge\n"),
        "{text}"
    );
    // Every commit so far was timed: the audit append latency.
    assert!(
        value(&text, "portcullis_ledger_commit_seconds_count").unwrap() >= 6,
        "{text}"
    );
    assert!(
        text.contains("# HELP portcullis_ledger_commit_seconds Audit append latency"),
        "{text}"
    );

    // The counts follow the ledger: a resume and a halt, seen once the
    // cached read is older than a second.
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/resume", tasks[0].task_id),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    halt(&h, &tasks[2].task_id).await;
    halt(&h, &tasks[3].task_id).await;
    tokio::time::sleep(PAST_CACHE).await;
    let text = scrape(&h).await;
    assert_eq!(active(&text), Some(1), "{text}");
    assert_eq!(halted(&text), Some(2), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_while_the_ledger_is_down_or_hangs() {
    let h = Harness::start().await;
    h.start_task(None).await;
    let text = scrape(&h).await;
    assert_eq!(active(&text), Some(1), "{text}");

    // Down: the scrape still answers, without the counts it cannot read.
    h.store.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(PAST_CACHE).await;
    assert_eq!(
        h.get("/readyz", None).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let text = scrape(&h).await;
    assert_eq!(active(&text), None, "{text}");
    assert_eq!(halted(&text), None, "{text}");
    assert_eq!(
        value(&text, "portcullis_audit_queue_depth"),
        Some(0),
        "{text}"
    );
    assert!(text.contains("portcullis_decisions_total"), "{text}");

    // Back: the counts return.
    h.store.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(PAST_CACHE).await;
    assert_eq!(active(&scrape(&h).await), Some(1));

    // Hung: scrapes, several at once, answer within the read timeout and
    // share one read of the ledger.
    h.store.stalled.store(true, Ordering::SeqCst);
    tokio::time::sleep(PAST_CACHE).await;
    let started = Instant::now();
    let (a, b, c, d) = tokio::join!(scrape(&h), scrape(&h), scrape(&h), scrape(&h));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "scrapes took {took:?}");
    for text in [a, b, c, d] {
        assert_eq!(active(&text), None, "{text}");
        assert!(text.contains("portcullis_audit_queue_depth 0"), "{text}");
    }
    h.store.stalled.store(false, Ordering::SeqCst);
    tokio::time::sleep(PAST_CACHE).await;
    assert_eq!(active(&scrape(&h).await), Some(1));
}

// ---------------------------------------------------------------------------
// Sampling of low-risk calls (`audit.sample_low_risk`).
// ---------------------------------------------------------------------------

/// The documented choice: a task is in the sample of share `rate` when the
/// first 8 bytes of the SHA-256 of its id, read as a big-endian integer,
/// are below `rate × 2^64` (every task at 1, none at 0).
fn in_sample_by_rule(task_id: &str, rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate <= 0.0 {
        return false;
    }
    let digest = Sha256::digest(task_id.as_bytes());
    let head = u64::from_be_bytes(digest[..8].try_into().unwrap());
    (head as f64) < rate * 18_446_744_073_709_551_616.0
}

const COMPACT_DETAIL: &str = "arguments not kept (audit.sample_low_risk)";

/// Drives one task through every kind of record: allowed low-risk calls
/// (one with a password), a denial, a transition, a high-risk call that
/// rotates the token, a refresh, and an admin halt. Returns every answer
/// body the gateway sent.
async fn drive(h: &Harness, s: &Started) -> Vec<String> {
    let mut answers = vec![s.body.to_string()];
    let (id, token) = (s.task_id.as_str(), s.access.as_str());
    let connect = json!({ "database": "analytics", "password": "hunter2" });
    answers.push(
        h.call_ok(token, id, "warehouse.connect", connect)
            .await
            .text,
    );
    let a = h
        .call(
            token,
            id,
            "warehouse.connect",
            json!({ "database": "prod", "password": "hunter2" }),
        )
        .await;
    assert_error(&a, 403, "policy_forbid");
    answers.push(a.text);
    let query = json!({ "sql": "select id from t", "limit": 10 });
    answers.push(h.call_ok(token, id, "warehouse.query", query).await.text);
    let read = json!({ "path": "/data/in.csv" });
    answers.push(h.call_ok(token, id, "files.read", read).await.text);
    let a = h
        .post_json(
            &format!("/v1/tasks/{id}/transition"),
            Some(token),
            &json!({ "to": "transform" }),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    answers.push(a.text);
    let steps = json!({ "table": "staging_events", "steps": ["trim"] });
    answers.push(
        h.call_ok(token, id, "warehouse.transform", steps)
            .await
            .text,
    );
    let insert = json!({ "table": "staging_events", "rows": [{ "a": 1 }] });
    let a = h.call_ok(token, id, "warehouse.insert", insert).await;
    let refresh = a.body["refresh_token"].as_str().unwrap().to_owned();
    answers.push(a.text);
    let a = h.refresh(&refresh).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    answers.push(a.text);
    let a = h
        .post_json(&format!("/v1/tasks/{id}/halt"), Some(ADMIN), &json!({}))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    answers.push(a.text);
    answers
}

/// The low-risk tools `drive` calls and gets allowed.
const LOW_RISK_ALLOWED: [&str; 4] = [
    "warehouse.connect",
    "warehouse.query",
    "files.read",
    "warehouse.transform",
];

/// Asserts what the records of a driven task keep, `full` telling whether
/// its allowed low-risk calls keep their arguments.
fn assert_records(records: &[Value], full: bool) {
    let allowed: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "call.allowed")
        .collect();
    // One record per attempt, in or out of the sample.
    let tools: Vec<&str> = allowed
        .iter()
        .map(|r| r["tool"].as_str().unwrap())
        .collect();
    assert_eq!(
        tools,
        [
            "warehouse.connect",
            "warehouse.query",
            "files.read",
            "warehouse.transform",
            "warehouse.insert"
        ]
    );
    for r in &allowed {
        let low = LOW_RISK_ALLOWED.contains(&r["tool"].as_str().unwrap());
        assert_eq!(r["decision"], "allow", "{r}");
        if low && !full {
            assert!(r.get("args").is_none(), "compact record with args: {r}");
            assert_eq!(r["detail"], COMPACT_DETAIL, "{r}");
        } else {
            assert!(r["args"].is_object(), "full record without args: {r}");
            assert_ne!(r["detail"], COMPACT_DETAIL, "{r}");
        }
    }
    // The compact form keeps every other field: who, what, the transition
    // it made.
    let query = allowed[1];
    assert_eq!(query["state_from"], "connect", "{query}");
    assert_eq!(query["state_to"], "validate", "{query}");
    assert!(query["agent_id"].is_string() && query["seq"].is_u64());
    if full {
        assert_eq!(allowed[0]["args"]["database"], "analytics");
        assert_eq!(allowed[0]["args"]["password"], "[redacted]");
    }
    // Never reduced: the high-risk call, the denial.
    assert_eq!(allowed[4]["args"]["table"], "staging_events");
    let denied: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "call.denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["reason"], "policy_forbid");
    assert_eq!(denied[0]["args"]["database"], "prod");
    assert_eq!(denied[0]["args"]["password"], "[redacted]");
    // Nor transitions, token events, outcomes and the halt.
    let count = |kind: &str| records.iter().filter(|r| r["kind"] == kind).count();
    assert_eq!(count("call.completed"), 5);
    let moves: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["kind"] == "state.transition")
        .map(|r| {
            (
                r["state_from"].as_str().unwrap(),
                r["state_to"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        moves,
        [
            ("connect", "validate"),
            ("validate", "transform"),
            ("transform", "write")
        ]
    );
    assert!(count("token.issued") >= 3, "start, reverify, refresh");
    assert_eq!(count("token.refreshed"), 1);
    assert!(count("token.revoked") >= 1);
    assert_eq!(count("task.halted"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_compact_low_risk_records_outside_the_sample_and_everything_else_whole() {
    let rate = 0.5;
    let h = Harness::with(Options {
        sample_low_risk: Some(rate),
        ..Options::default()
    })
    .await;
    // Task ids are random: start tasks until two are in and two are out.
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for _ in 0..64 {
        if inside.len() >= 2 && outside.len() >= 2 {
            break;
        }
        let s = h.start_task(None).await;
        if in_sample_by_rule(&s.task_id, rate) {
            if inside.len() < 2 {
                inside.push(s);
            }
        } else if outside.len() < 2 {
            outside.push(s);
        }
    }
    assert!(
        inside.len() == 2 && outside.len() == 2,
        "64 ids all on one side"
    );

    let mut answers = Vec::new();
    let mut all = Vec::new();
    for (s, full) in inside
        .iter()
        .map(|s| (s, true))
        .chain(outside.iter().map(|s| (s, false)))
    {
        answers.extend(drive(&h, s).await);
        let records = h.audit(&s.task_id).await;
        assert_records(&records, full);
        all.push(records);
    }
    // In or out, a task has the same records, kind for kind.
    let shape = |records: &[Value]| {
        records
            .iter()
            .map(|r| (r["kind"].clone(), r["tool"].clone(), r["decision"].clone()))
            .collect::<Vec<_>>()
    };
    for records in &all[1..] {
        assert_eq!(shape(records), shape(&all[0]));
    }
    // The secret is in no record and no answer of the gateway's own (the
    // echo upstream's `result` hands the arguments back, as it may).
    for text in answers
        .iter()
        .map(|text| {
            let mut body: Value = serde_json::from_str(text).unwrap();
            if let Some(obj) = body.as_object_mut() {
                obj.remove("result");
            }
            body.to_string()
        })
        .chain([serde_json::to_string(&all).unwrap()])
    {
        assert!(!text.contains("hunter2"), "{text}");
    }
    // The log, compact records included, verifies.
    let report = portcullis_store::testsuite::verify_log(h.store.as_ref()).await;
    assert!(report.is_ok(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_choice_is_fixed_by_the_task_id() {
    // The same ids always get the same answer from the rule, whatever the
    // order they are asked in.
    let ids: Vec<String> = (0..64).map(|i| format!("task_{i}")).collect();
    let first: Vec<bool> = ids.iter().map(|id| in_sample_by_rule(id, 0.5)).collect();
    let again: Vec<bool> = ids
        .iter()
        .rev()
        .map(|id| in_sample_by_rule(id, 0.5))
        .collect();
    assert_eq!(first, again.into_iter().rev().collect::<Vec<_>>());
    assert!(first.iter().any(|&b| b) && first.iter().any(|&b| !b));

    // A gateway follows the rule for every call of a task, all its life
    // (several calls, across a token rotation), at any rate.
    for rate in [0.25, 0.75] {
        let h = Harness::with(Options {
            sample_low_risk: Some(rate),
            ..Options::default()
        })
        .await;
        for _ in 0..6 {
            let s = h.start_task(None).await;
            let connect = json!({ "database": "analytics" });
            h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect.clone())
                .await;
            h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect)
                .await;
            let query = json!({ "sql": "select 1" });
            h.call_ok(&s.access, &s.task_id, "warehouse.query", query)
                .await;
            let want = in_sample_by_rule(&s.task_id, rate);
            let records = h.audit(&s.task_id).await;
            let kept: Vec<bool> = records
                .iter()
                .filter(|r| r["kind"] == "call.allowed")
                .map(|r| r.get("args").is_some())
                .collect();
            assert_eq!(kept, [want; 3], "task {} at rate {rate}", s.task_id);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_at_0_keeps_no_low_risk_arguments_and_at_1_all_of_them() {
    for (rate, full) in [(0.0, false), (1.0, true)] {
        let h = Harness::with(Options {
            sample_low_risk: Some(rate),
            ..Options::default()
        })
        .await;
        for _ in 0..3 {
            let s = h.start_task(None).await;
            drive(&h, &s).await;
            assert_records(&h.audit(&s.task_id).await, full);
        }
        let report = portcullis_store::testsuite::verify_log(h.store.as_ref()).await;
        assert!(report.is_ok(), "rate {rate}: {report:?}");
    }
}

// ---------------------------------------------------------------------------
// A cluster: the task gauges are the shared ledger's.
// ---------------------------------------------------------------------------

const CLUSTER_BOOTSTRAP: &str = "observability-cluster-bootstrap";
const CLUSTER_ADMIN: &str = "observability-cluster-admin";

fn replica_config(listen: &str, url: &str) -> String {
    let sha = |s: &str| portcullis_token::sha256_hex(s.as_bytes());
    format!(
        r#"
[server]
listen = "{listen}"
issuer = "http://gateway.observability.test"
[store]
url = "{url}"
[tokens]
signing_key = "keys/k.ed25519"
[[admins]]
name = "ops"
roles = ["admin"]
token_sha256 = "{admin}"
[[upstreams]]
name = "wh"
transport = "http"
url = "http://127.0.0.1:9/mcp"
credential = {{ kind = "none" }}
[[tools]]
name = "wh.read"
upstream = "wh"
risk = "low"
access = "read"
[[agent_types]]
name = "t"
initial = "work"
states = [ {{ name = "work", tools = ["wh.read"], next = ["done"] }}, {{ name = "done", final = true }} ]
[[agents]]
id = "bot"
type = "t"
tools = ["wh.read"]
bootstrap_sha256 = "{bootstrap}"
"#,
        admin = sha(CLUSTER_ADMIN),
        bootstrap = sha(CLUSTER_BOOTSTRAP),
    )
}

/// Two replicas on one PostgreSQL ledger show the same task counts, each
/// counting the tasks the other started, halted and completed. Skips
/// unless `PORTCULLIS_TEST_POSTGRES_URL` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_postgres_ledger_show_the_same_task_counts() {
    let Some(schema) = common::PgSchema::create("pc_obs") else {
        return;
    };
    let url = schema.url.clone();
    let dir = tempfile::tempdir().unwrap();
    portcullis_gateway::run::keygen(&dir.path().join("keys/k.ed25519")).unwrap();
    let mut bases = Vec::new();
    for i in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap().to_string();
        let cfg = dir.path().join(format!("replica-{i}.toml"));
        std::fs::write(&cfg, replica_config(&listen, &url)).unwrap();
        let (gw, _, _) = portcullis_gateway::run::build(&cfg).await.unwrap();
        tokio::spawn(portcullis_gateway::serve(
            listener,
            portcullis_gateway::router(gw),
            std::future::pending(),
        ));
        bases.push(format!("http://{listen}"));
    }
    let (a, b) = (&bases[0], &bases[1]);
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let started: Value = http
            .post(format!("{a}/v1/tasks"))
            .bearer_auth(CLUSTER_BOOTSTRAP)
            .json(&json!({"agent_id": "bot", "goal": "g"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tasks.push((
            started["task_id"].as_str().unwrap().to_owned(),
            started["access_token"].as_str().unwrap().to_owned(),
        ));
    }
    // B halts one and completes another.
    let r = http
        .post(format!("{b}/v1/tasks/{}/halt", tasks[0].0))
        .bearer_auth(CLUSTER_ADMIN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{b}/v1/tasks/{}/complete", tasks[1].0))
        .bearer_auth(&tasks[1].1)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for base in [a, b] {
        let r = http.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert_eq!(active(&text), Some(1), "{base}: {text}");
        assert_eq!(halted(&text), Some(1), "{base}: {text}");
        assert_eq!(
            value(&text, "portcullis_audit_queue_depth"),
            Some(0),
            "{text}"
        );
    }
}
