//! Held approvals (`[approval] hold`) over real HTTP: a call that needs a
//! person's approval waits for the decision and then answers as if it had
//! never waited — the tool's result when approved, `approval_required`
//! with the elevation's id when denied or when nobody decided in time.
//! REST `/calls` and MCP `tools/call` in both eras (2025-11-25 with
//! progress notifications on the request's event stream), the caps on
//! held calls, the binding of an approval to the call's arguments, and
//! (with PostgreSQL) an approval on one replica releasing a hold on
//! another.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn held(hold: &str, per_task: u32, total: u32) -> Options {
    Options {
        approval: true,
        approval_table: Some(format!(
            "hold = \"{hold}\"\nmax_held_per_task = {per_task}\nmax_held = {total}"
        )),
        ..Options::default()
    }
}

/// A task in `transform`: its next `warehouse.insert` enters `write`,
/// which needs approval (and the tool is high-risk, approved per call).
async fn to_transform(h: &Harness) -> Started {
    let s = h.start_task(None).await;
    for (tool, args) in [
        ("warehouse.connect", json!({ "database": "a" })),
        (
            "warehouse.validate",
            json!({ "table": "staging_a", "rows": [] }),
        ),
        (
            "warehouse.transform",
            json!({ "table": "staging_a", "steps": ["trim"] }),
        ),
    ] {
        h.call_ok(&s.access, &s.task_id, tool, args).await;
    }
    s
}

/// The pending elevations of `task_id`, oldest first.
async fn pending(h: &Harness, task_id: &str) -> Vec<Value> {
    let a = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.body["elevations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["task_id"] == task_id)
        .cloned()
        .collect()
}

/// Waits (up to 10 s) until `task_id` has `n` pending elevations.
async fn wait_pending(h: &Harness, task_id: &str, n: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let list = pending(h, task_id).await;
        if list.len() >= n {
            return list;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{n} pending elevations never appeared: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn decide(h: &Harness, base: &str, id: &str, verb: &str, note: &str) {
    let a = h
        .client
        .post(format!("{base}/v1/elevations/{id}/{verb}"))
        .bearer_auth(APPROVER)
        .json(&json!({ "note": note }))
        .send()
        .await
        .unwrap();
    let a = Answer::read(a).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

fn insert_args(id: u64) -> Value {
    json!({ "table": "staging_a", "rows": [{ "id": id }] })
}

/// A REST call in the background.
fn spawn_call(
    h: &Arc<Harness>,
    s: &Started,
    args: Value,
) -> tokio::task::JoinHandle<(Answer, Duration)> {
    let (h, s) = (h.clone(), s.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        let a = h
            .call(&s.access, &s.task_id, "warehouse.insert", args)
            .await;
        (a, started.elapsed())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_a_held_call_approved_answers_with_the_tools_result() {
    let h = Arc::new(Harness::with(held("20s", 4, 16)).await);
    let s = to_transform(&h).await;
    let before = h.upstream_calls();
    let call = spawn_call(&h, &s, insert_args(1));
    let list = wait_pending(&h, &s.task_id, 1).await;
    assert_eq!(list[0]["held"]["args"], insert_args(1));
    // Nothing reached the upstream while the call waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.upstream_calls(), before);
    assert!(!call.is_finished());
    let id = list[0]["id"].as_str().unwrap().to_owned();
    decide(&h, &h.base, &id, "approve", "looks right").await;
    let (a, _) = call.await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["decision"], "allow");
    assert_eq!(a.body["result"]["echo"], insert_args(1), "{}", a.text);
    assert_eq!(a.body["state"], "write");
    assert!(a.body["access_token"].is_string(), "reverify rotates");
    assert_eq!(h.upstream_calls(), before + 1);
    // In the ledger: held, approved, then allowed and completed.
    let records = h.audit(&s.task_id).await;
    assert_in_order(
        &records,
        &[
            "call.denied",
            "elevation.requested",
            "elevation.approved",
            "call.allowed",
            "state.transition",
        ],
    );
    // The approval was for one call: it is spent.
    assert!(pending(&h, &s.task_id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_a_held_call_denied_answers_approval_required_with_the_elevation_id() {
    let h = Arc::new(Harness::with(held("20s", 4, 16)).await);
    let s = to_transform(&h).await;
    let before = h.upstream_calls();
    let call = spawn_call(&h, &s, insert_args(1));
    let list = wait_pending(&h, &s.task_id, 1).await;
    let id = list[0]["id"].as_str().unwrap().to_owned();
    decide(&h, &h.base, &id, "deny", "not tonight").await;
    let (a, waited) = call.await.unwrap();
    assert_error(&a, 403, "approval_required");
    assert_eq!(a.body["elevation_id"], id.as_str(), "{}", a.text);
    let detail = a.body["detail"].as_str().unwrap();
    assert!(detail.contains(&id), "{detail}");
    assert!(
        detail.contains("denied") && detail.contains("not tonight"),
        "{detail}"
    );
    assert!(waited < Duration::from_secs(15), "released by the denial");
    assert_eq!(h.upstream_calls(), before);
    assert_eq!(h.task(&s.task_id).await["state"], "transform");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_a_held_call_times_out_as_approval_required_and_stays_pending() {
    let h = Arc::new(Harness::with(held("1s", 4, 16)).await);
    let s = to_transform(&h).await;
    let before = h.upstream_calls();
    let (a, waited) = spawn_call(&h, &s, insert_args(1)).await.unwrap();
    assert_error(&a, 403, "approval_required");
    assert!(
        waited >= Duration::from_millis(900),
        "it waited: {waited:?}"
    );
    let list = pending(&h, &s.task_id).await;
    assert_eq!(list.len(), 1);
    let id = list[0]["id"].as_str().unwrap();
    let detail = a.body["detail"].as_str().unwrap();
    assert!(
        detail.contains(id) && detail.contains("no decision"),
        "{detail}"
    );
    assert_eq!(h.upstream_calls(), before);

    // Approved later, the same call goes through at once.
    decide(&h, &h.base, id, "approve", "").await;
    let a = h
        .call_ok(&s.access, &s.task_id, "warehouse.insert", insert_args(1))
        .await;
    assert_eq!(a.body["result"]["echo"], insert_args(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_hold_approval_required_answers_at_once() {
    let h = Arc::new(Harness::with(held("0s", 4, 16)).await);
    let s = to_transform(&h).await;
    let (a, _) = spawn_call(&h, &s, insert_args(1)).await.unwrap();
    assert_error(&a, 403, "approval_required");
    assert!(a.body["detail"].as_str().unwrap().contains("elv_"));
    let id = a.body["elevation_id"].as_str().unwrap();
    assert_eq!(pending(&h, &s.task_id).await[0]["id"], id);
}

/// Regression guard: a call held by an anomaly rule's `require_approval`
/// (here `new_tool`) answered `approval_required` at once even with a
/// hold; now it waits like a configured approval, and the person's
/// approval completes it with the tool's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_held_by_an_anomaly_rule_waits_and_completes_once_approved() {
    let h = Arc::new(
        Harness::with(Options {
            anomaly: Some(r#"new_tool = "require_approval""#),
            ..held("20s", 4, 16)
        })
        .await,
    );
    let s = h.start_task(None).await;
    let before = h.upstream_calls();
    let args = json!({ "database": "analytics" });
    let call = {
        let (h, s, args) = (h.clone(), s.clone(), args.clone());
        tokio::spawn(async move {
            h.call(&s.access, &s.task_id, "warehouse.connect", args)
                .await
        })
    };
    let list = wait_pending(&h, &s.task_id, 1).await;
    assert_eq!(list[0]["held"]["rule"], "new_tool", "{list:?}");
    assert_eq!(list[0]["held"]["args"], args);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.upstream_calls(), before, "nothing forwarded while held");
    assert!(!call.is_finished(), "the call waits for the approval");
    let id = list[0]["id"].as_str().unwrap().to_owned();
    decide(&h, &h.base, &id, "approve", "first use, expected").await;
    let a = call.await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["result"]["echo"], args, "{}", a.text);
    assert_eq!(h.upstream_calls(), before + 1);
}

/// Regression guard for the binding of an approval to the call's
/// arguments: two calls of one task wait with different arguments; the
/// approval of one releases that one only. The other keeps waiting, and
/// the upstream never sees its arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_for_other_arguments_does_not_release_a_held_call() {
    let h = Arc::new(Harness::with(held("3s", 4, 16)).await);
    let s = to_transform(&h).await;
    let before = h.upstream_calls();
    let first = spawn_call(&h, &s, insert_args(1));
    wait_pending(&h, &s.task_id, 1).await;
    let second = spawn_call(&h, &s, insert_args(666));
    let list = wait_pending(&h, &s.task_id, 2).await;
    let other = list
        .iter()
        .find(|e| e["held"]["args"] == insert_args(666))
        .unwrap();
    decide(&h, &h.base, other["id"].as_str().unwrap(), "approve", "").await;
    let (a, _) = second.await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["result"]["echo"], insert_args(666));
    // The first call was not released by that approval: it runs out.
    let (a, waited) = first.await.unwrap();
    assert_error(&a, 403, "approval_required");
    assert!(waited >= Duration::from_millis(2900), "{waited:?}");
    let calls = h.warehouse.calls();
    assert_eq!(h.upstream_calls(), before + 1);
    assert_eq!(calls.last().unwrap().arguments, insert_args(666));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_calls_are_capped_per_task_and_in_total() {
    let h = Arc::new(Harness::with(held("20s", 1, 2)).await);
    let s = to_transform(&h).await;
    let first = spawn_call(&h, &s, insert_args(1));
    wait_pending(&h, &s.task_id, 1).await;
    // The task's one hold is taken: the next call answers at once.
    let started = Instant::now();
    let a = h
        .call(&s.access, &s.task_id, "warehouse.insert", insert_args(2))
        .await;
    assert_error(&a, 403, "approval_required");
    assert!(
        a.body["detail"].as_str().unwrap().contains("not held"),
        "{}",
        a.text
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Another task takes the second slot of the total; a third task finds
    // none.
    let t2 = to_transform(&h).await;
    let second = spawn_call(&h, &t2, insert_args(1));
    wait_pending(&h, &t2.task_id, 1).await;
    let t3 = to_transform(&h).await;
    let a = h
        .call(&t3.access, &t3.task_id, "warehouse.insert", insert_args(1))
        .await;
    assert_error(&a, 403, "approval_required");
    assert!(
        a.body["detail"].as_str().unwrap().contains("not held"),
        "{}",
        a.text
    );

    // Decisions free the slots.
    for task in [&s.task_id, &t2.task_id] {
        for e in pending(&h, task).await {
            decide(&h, &h.base, e["id"].as_str().unwrap(), "deny", "").await;
        }
    }
    assert_error(&first.await.unwrap().0, 403, "approval_required");
    assert_error(&second.await.unwrap().0, 403, "approval_required");
    assert_eq!(h.gateway.held_calls(), 0);
}

const MODERN: &str = "2026-07-28";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_stateless_a_held_call_approved_answers_with_the_result() {
    let h = Arc::new(Harness::with(held("20s", 4, 16)).await);
    let s = to_transform(&h).await;
    let (h2, token) = (h.clone(), s.access.clone());
    let call = tokio::spawn(async move {
        let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "warehouse.insert", "arguments": insert_args(5),
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
        }}});
        let r = h2
            .client
            .post(h2.url("/mcp"))
            .bearer_auth(token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", MODERN)
            .header("mcp-method", "tools/call")
            .header("mcp-name", "warehouse.insert")
            .json(&body)
            .send()
            .await
            .unwrap();
        Answer::read(r).await
    });
    let list = wait_pending(&h, &s.task_id, 1).await;
    decide(&h, &h.base, list[0]["id"].as_str().unwrap(), "approve", "").await;
    let a = call.await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let result = &a.body["result"];
    assert_eq!(result["isError"], false, "{}", a.text);
    assert_eq!(result["structuredContent"]["echo"], insert_args(5));
}

async fn open_session(h: &Harness, token: &str) -> String {
    let r = h
        .client
        .post(h.url("/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"}}}),
        )
        .send()
        .await
        .unwrap();
    let a = Answer::read(r).await;
    assert_eq!(a.status, 200, "{}", a.text);
    a.header("mcp-session-id").unwrap().to_owned()
}

/// The `data:` payloads of the events in `text`.
fn events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter_map(|block| {
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| serde_json::from_str(&data.join("\n")).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_legacy_a_held_call_streams_progress_then_the_result() {
    let h = Arc::new(Harness::with(held("20s", 4, 16)).await);
    let s = to_transform(&h).await;
    let sid = open_session(&h, &s.access).await;
    let mut r = h
        .client
        .post(h.url("/mcp"))
        .bearer_auth(&s.access)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &sid)
        .header("mcp-protocol-version", "2025-11-25")
        .json(
            &json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
            "name": "warehouse.insert", "arguments": insert_args(3),
            "_meta": { "progressToken": "p-1" }}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    assert_eq!(r.headers()["mcp-session-id"].to_str().unwrap(), sid);
    // Read until two progress notifications have come.
    let mut text = String::new();
    while events(&text).len() < 2 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let progress = events(&text);
    let list = pending(&h, &s.task_id).await;
    let id = list[0]["id"].as_str().unwrap().to_owned();
    for p in &progress {
        assert_eq!(p["method"], "notifications/progress", "{p}");
        assert_eq!(p["params"]["progressToken"], "p-1");
        assert_eq!(p["params"]["total"], 20.0);
        let message = p["params"]["message"].as_str().unwrap();
        assert!(message.contains(&id), "{message}");
        assert!(message.contains("/console/approvals#"), "{message}");
    }
    assert!(
        progress[1]["params"]["progress"].as_f64() > progress[0]["params"]["progress"].as_f64()
    );
    assert_eq!(h.upstream_calls(), 3);
    decide(&h, &h.base, &id, "approve", "").await;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), r.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let last = events(&text).pop().unwrap();
    assert_eq!(last["id"], 9, "{last}");
    assert_eq!(last["result"]["isError"], false, "{last}");
    assert_eq!(last["result"]["structuredContent"]["echo"], insert_args(3));
    assert_eq!(h.upstream_calls(), 4);
}

/// A client that goes away while its call is held ends the hold: the
/// slot is freed, nothing is forwarded, and the request stays pending for
/// a person to decide (an approval then serves the same call later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_legacy_a_client_that_goes_away_ends_its_hold() {
    let h = Arc::new(Harness::with(held("60s", 4, 16)).await);
    let s = to_transform(&h).await;
    let sid = open_session(&h, &s.access).await;
    let before = h.upstream_calls();
    let mut r = h
        .client
        .post(h.url("/mcp"))
        .bearer_auth(&s.access)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &sid)
        .header("mcp-protocol-version", "2025-11-25")
        .json(
            &json!({"jsonrpc": "2.0", "id": 11, "method": "tools/call", "params": {
            "name": "warehouse.insert", "arguments": insert_args(4),
            "_meta": { "progressToken": 7 }}}),
        )
        .send()
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), r.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        std::str::from_utf8(&first)
            .unwrap()
            .contains("notifications/progress")
    );
    assert_eq!(h.gateway.held_calls(), 1);
    drop(r);
    let started = Instant::now();
    while h.gateway.held_calls() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the hold outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.upstream_calls(), before);
    assert_eq!(pending(&h, &s.task_id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_legacy_a_held_call_denied_is_a_denial_result() {
    let h = Arc::new(Harness::with(held("20s", 4, 16)).await);
    let s = to_transform(&h).await;
    let sid = open_session(&h, &s.access).await;
    let (h2, token, sid2) = (h.clone(), s.access.clone(), sid.clone());
    // No progress token: a plain JSON answer once decided.
    let call = tokio::spawn(async move {
        let r = h2
            .client
            .post(h2.url("/mcp"))
            .bearer_auth(token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", sid2)
            .header("mcp-protocol-version", "2025-11-25")
            .json(
                &json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {
                "name": "warehouse.insert", "arguments": insert_args(3)}}),
            )
            .send()
            .await
            .unwrap();
        Answer::read(r).await
    });
    let list = wait_pending(&h, &s.task_id, 1).await;
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let before = h.upstream_calls();
    decide(&h, &h.base, &id, "deny", "no").await;
    let a = call.await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text);
    let result = &a.body["result"];
    assert_eq!(result["isError"], true, "{}", a.text);
    assert_eq!(result["_meta"]["portcullis/reason"], "approval_required");
    let text = result["content"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("denied: approval_required: "), "{text}");
    assert!(text.contains(&id), "{text}");
    assert_eq!(h.upstream_calls(), before);
}

/// With the cluster shape, an approval given through one replica releases
/// a call held on another within a second (the held call polls the
/// elevation in the shared ledger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_approval_on_one_replica_releases_a_hold_on_another() {
    let Some(schema) = PgSchema::create("pc_hold") else {
        return;
    };
    let opts = Options {
        store_url: Some(schema.url.clone()),
        ..held("20s", 4, 16)
    };
    let a = Arc::new(Harness::with(opts.clone()).await);
    let b = Harness::with(opts).await;
    let s = to_transform(&a).await;
    let call = spawn_call(&a, &s, insert_args(8));
    let list = wait_pending(&a, &s.task_id, 1).await;
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let decided = Instant::now();
    decide(&b, &b.base, &id, "approve", "from replica b").await;
    let (answer, _) = call.await.unwrap();
    let released = decided.elapsed();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["result"]["echo"], insert_args(8));
    assert!(
        released < Duration::from_secs(1),
        "released after {released:?}"
    );
    drop(schema);
}
