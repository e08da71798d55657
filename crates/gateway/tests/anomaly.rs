//! The `[anomaly]` rules over real HTTP (SQLite ledger, in-process
//! upstreams that count what reaches them): each rule fires at exactly its
//! threshold and not one call earlier; a halt revokes every token, answers
//! later calls `anomaly_halt` and posts the webhook; `require_approval`
//! holds the call as an elevation; resume restores the task; and 50 calls
//! racing on one task never get more through than the rule allows.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn connect() -> Value {
    json!({ "database": "analytics" })
}

async fn anomaly_records(h: &Harness, task_id: &str) -> Vec<Value> {
    h.audit(task_id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "anomaly")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_denies_exactly_the_call_over_the_limit() {
    let h = Harness::with(Options {
        anomaly: Some(r#"rate = { calls = 3, seconds = 60, action = "deny" }"#),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    for i in 0..3 {
        let a = h
            .call(&s.access, &s.task_id, "warehouse.connect", connect())
            .await;
        assert_eq!(a.status, StatusCode::OK, "call {i}: {}", a.text);
    }
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    assert_error(&a, 403, "rate_limited");
    assert_eq!(h.upstream_calls(), 3);
    let anomalies = anomaly_records(&h, &s.task_id).await;
    assert_eq!(anomalies.len(), 1);
    assert!(
        anomalies[0]["detail"]
            .as_str()
            .unwrap()
            .contains("rule rate"),
        "{anomalies:?}"
    );
    // The window slides: a minute and one slot (60 s / 32) later the task
    // may call again.
    h.advance_secs(63);
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_halt_at_the_threshold_revoke_and_alert() {
    let r = Receiver::start(0, false).await;
    let h = Harness::with(Options {
        anomaly: Some(r#"denials = { count = 3, action = "halt" }"#),
        alert_webhook: Some(r.url.clone()),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let prod = json!({ "database": "prod" });
    for i in 0..2 {
        let a = h
            .call(&s.access, &s.task_id, "warehouse.connect", prod.clone())
            .await;
        assert_error(&a, 403, "policy_forbid");
        assert_eq!(
            h.task(&s.task_id).await["status"],
            "active",
            "after denial {i}"
        );
    }
    // The third denial halts the task, in the same transaction.
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", prod.clone())
        .await;
    assert_error(&a, 403, "policy_forbid");
    assert!(
        a.body["detail"].as_str().unwrap().contains("halted"),
        "{}",
        a.text
    );
    assert_eq!(h.task(&s.task_id).await["status"], "halted");
    // Every later call: anomaly_halt, and nothing reaches the upstream.
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    assert_error(&a, 403, "anomaly_halt");
    assert_eq!(h.upstream_calls(), 0);
    let refresh = h.refresh(&s.refresh).await;
    assert_ne!(refresh.status, StatusCode::OK, "{}", refresh.text);
    // Audited: the anomaly, the halt, the revocation.
    let kinds: Vec<String> = h
        .audit(&s.task_id)
        .await
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    for k in ["anomaly", "task.halted", "token.revoked"] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing: {kinds:?}");
    }
    // The webhook hears of it.
    let mut alerts = Vec::new();
    for _ in 0..100 {
        alerts = r.accepted();
        if !alerts.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body: Value = serde_json::from_str(&alerts[0].1).unwrap();
    assert_eq!(body["kind"], "task.halted");
    assert_eq!(body["task_id"], s.task_id.as_str());
    assert_eq!(body["reason"], "anomaly_halt");

    // Only an admin resumes, with fresh tokens.
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/resume", s.task_id),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let fresh = a.body["access_token"].as_str().unwrap().to_owned();
    h.call_ok(&fresh, &s.task_id, "warehouse.connect", connect())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_tools_hold_the_call_for_approval() {
    let h = Harness::with(Options {
        anomaly: Some(
            r#"distinct_tools = { count = 3, seconds = 60, action = "require_approval" }"#,
        ),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.query",
        json!({ "sql": "select 1" }),
    )
    .await;
    // Two distinct tools so far; the same ones again are fine.
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.query",
        json!({ "sql": "select 2" }),
    )
    .await;
    let before = h.upstream_calls();
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "files.read",
            json!({ "path": "/data/a.csv" }),
        )
        .await;
    assert_error(&a, 403, "approval_required");
    assert_eq!(h.upstream_calls(), before);
    let pending = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    let list = pending.body["elevations"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", pending.text);
    assert_eq!(list[0]["tool"], "files.read");
    let id = list[0]["id"].as_str().unwrap();
    let a = h
        .post_json(
            &format!("/v1/elevations/{id}/approve"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    h.call_ok(
        &s.access,
        &s.task_id,
        "files.read",
        json!({ "path": "/data/a.csv" }),
    )
    .await;
}

/// 50 calls race on one task against `rate = 10`: exactly 10 get through,
/// whatever the interleaving (the clock is frozen, so the window holds
/// them all; the per-task compare-and-swap serializes the decisions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_calls_never_exceed_the_rule() {
    let h = std::sync::Arc::new(
        Harness::with(Options {
            anomaly: Some(r#"rate = { calls = 10, seconds = 60, action = "deny" }"#),
            ..Options::default()
        })
        .await,
    );
    let s = h.start_task(None).await;
    let mut joins = Vec::new();
    for _ in 0..50 {
        let (h, s) = (h.clone(), s.clone());
        joins.push(tokio::spawn(async move {
            h.call(&s.access, &s.task_id, "warehouse.connect", connect())
                .await
                .status
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for j in joins {
        match j.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::FORBIDDEN => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, limited), (10, 40));
    assert_eq!(h.upstream_calls(), 10);
    assert_eq!(h.task(&s.task_id).await["calls"], 10);
}

/// `new_tool`: the first call of a tool by an agent — judged from the
/// ledger across tasks — waits for approval; once used, later tasks of the
/// agent call it freely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_use_of_a_tool_needs_approval_once_per_agent() {
    let h = Harness::with(Options {
        anomaly: Some(r#"new_tool = "require_approval""#),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    assert_error(&a, 403, "approval_required");
    assert_eq!(h.upstream_calls(), 0);
    let pending = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    let id = pending.body["elevations"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        pending.body["elevations"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("new_tool"),
        "{}",
        pending.text
    );
    let a = h
        .post_json(
            &format!("/v1/elevations/{id}/approve"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    // A new task of the same agent: the tool is no longer new.
    let t = h.start_task(None).await;
    h.call_ok(&t.access, &t.task_id, "warehouse.connect", connect())
        .await;
    // Another agent's first use is its own.
    let o = h
        .post_json(
            "/v1/tasks",
            Some(OTHER_BOOTSTRAP),
            &json!({ "agent_id": "other-bot", "goal": "g" }),
        )
        .await;
    let (oid, otok) = (
        o.body["task_id"].as_str().unwrap(),
        o.body["access_token"].as_str().unwrap(),
    );
    let a = h.call(otok, oid, "warehouse.connect", connect()).await;
    assert_error(&a, 403, "approval_required");
}

/// Regression: a lasting grant from approving one anomaly rule's hold
/// switched off every `require_approval` rule for that tool until it
/// lapsed. The grant now answers the rule that held the call: here the
/// approved first use (`new_tool`) leaves the `rate` rule in force, whose
/// hold needs its own approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_from_an_anomaly_hold_answers_that_rule_only() {
    let h = Harness::with(Options {
        anomaly: Some(
            "new_tool = \"require_approval\"\n\
             rate = { calls = 2, seconds = 60, action = \"require_approval\" }",
        ),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let approve_pending = async |rule: &str| {
        let pending = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
        let list = pending.body["elevations"].as_array().unwrap().clone();
        assert_eq!(list.len(), 1, "{}", pending.text);
        assert_eq!(list[0]["held"]["rule"], rule, "{}", pending.text);
        assert_eq!(list[0]["held"]["args"], connect());
        let id = list[0]["id"].as_str().unwrap();
        let a = h
            .post_json(
                &format!("/v1/elevations/{id}/approve"),
                Some(ADMIN),
                &json!({}),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    };
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    assert_error(&a, 403, "approval_required");
    approve_pending("new_tool").await;
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    // Two calls in the window: the rate rule holds the third, whatever
    // the new_tool approval said.
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    assert_error(&a, 403, "approval_required");
    assert_eq!(h.upstream_calls(), 2);
    approve_pending("rate").await;
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect())
        .await;
    assert_eq!(h.upstream_calls(), 3);
}

/// Regression: policy-decision-point mode (`POST …/authorize`) answered
/// 403 for `rate_limited`, `approval_required` and `anomaly_halt`, though
/// DESIGN section 9 and docs/http-api.md promise 200 `{decision: "deny",
/// reason, …}` for every decision. Each is now a 200 deny; nothing is
/// forwarded either way.
async fn authorize(h: &Harness, s: &Started) -> Answer {
    h.post_json(
        &format!("/v1/tasks/{}/authorize", s.task_id),
        Some(&s.access),
        &json!({ "tool": "warehouse.connect", "arguments": connect() }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_answers_200_deny_for_anomaly_and_approval_decisions() {
    let cases = [
        (r#"new_tool = "require_approval""#, 0, "approval_required"),
        (
            r#"rate = { calls = 1, seconds = 60, action = "deny" }"#,
            1,
            "rate_limited",
        ),
        (
            r#"rate = { calls = 1, seconds = 60, action = "halt" }"#,
            1,
            "anomaly_halt",
        ),
    ];
    for (rule, allowed_first, reason) in cases {
        let h = Harness::with(Options {
            anomaly: Some(rule),
            ..Options::default()
        })
        .await;
        let s = h.start_task(None).await;
        for _ in 0..allowed_first {
            let a = authorize(&h, &s).await;
            assert_eq!(a.status, StatusCode::OK, "{rule}: {}", a.text);
            assert_eq!(a.body["decision"], "allow", "{rule}: {}", a.text);
        }
        let a = authorize(&h, &s).await;
        assert_eq!(a.status, StatusCode::OK, "{rule}: {}", a.text);
        assert_eq!(a.body["decision"], "deny", "{rule}: {}", a.text);
        assert_eq!(a.body["reason"], reason, "{rule}: {}", a.text);
        assert_eq!(h.upstream_calls(), 0, "{rule}");
    }
}

/// Regression: a call held for approval filed a pending elevation request
/// every time, without the task's cap on pending requests, so an agent
/// repeating a held call could bury other tasks' requests. Past the cap a
/// held call is still denied and recorded, but files no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_calls_file_no_more_requests_than_the_cap() {
    let h = Harness::with(Options {
        anomaly: Some(r#"new_tool = "require_approval""#),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let cap = portcullis_gateway::elevations::MAX_PENDING_PER_TASK as usize;
    for i in 0..cap + 4 {
        let a = h
            .call(&s.access, &s.task_id, "warehouse.connect", connect())
            .await;
        assert_error(&a, 403, "approval_required");
        let detail = a.body["detail"].as_str().unwrap();
        if i < cap {
            assert!(
                detail.contains("held as elevation request"),
                "{i}: {detail}"
            );
        } else {
            assert!(detail.contains("not held"), "{i}: {detail}");
        }
    }
    let pending = h
        .get("/v1/elevations?status=pending&limit=500", Some(ADMIN))
        .await;
    let of_task = pending.body["elevations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["task_id"] == s.task_id.as_str())
        .count();
    assert_eq!(of_task, cap);
    let denied = h
        .audit(&s.task_id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "call.denied")
        .count();
    assert_eq!(denied, cap + 4, "every held call is on record");
    assert_eq!(h.upstream_calls(), 0);
}
