//! Approval required by the configuration: entering a state with
//! `approval = true` (by `auto_advance` or an explicit transition) and, per
//! call, the high-risk tools of an agent with `approve_high_risk`. The call
//! waits as an elevation request; an approval is good for exactly one call
//! (or one move), and a reverify move still rotates the token.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn to_transform(h: &Harness) -> Started {
    let s = h.start_task(None).await;
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.connect",
        json!({ "database": "a" }),
    )
    .await;
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.validate",
        json!({ "table": "staging_a", "rows": [] }),
    )
    .await;
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.transform",
        json!({ "table": "staging_a", "steps": ["trim"] }),
    )
    .await;
    s
}

async fn pending_for(h: &Harness, what: &str) -> String {
    let a = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    let list = a.body["elevations"].as_array().unwrap();
    let e = list
        .iter()
        .find(|e| e["tool"] == what)
        .unwrap_or_else(|| panic!("no pending {what}: {}", a.text));
    e["id"].as_str().unwrap().to_owned()
}

async fn approve(h: &Harness, id: &str) {
    let a = h
        .post_json(
            &format!("/v1/elevations/{id}/approve"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_per_call_and_per_move() {
    let h = Harness::with(Options {
        approval: true,
        ..Options::default()
    })
    .await;
    let s = to_transform(&h).await;
    let insert = json!({ "table": "staging_a", "rows": [{ "id": 1 }] });
    let before = h.upstream_calls();

    // Entering `write` (and a high-risk call): held for approval.
    let a = h
        .call(&s.access, &s.task_id, "warehouse.insert", insert.clone())
        .await;
    assert_error(&a, 403, "approval_required");
    assert!(
        a.body["detail"]
            .as_str()
            .unwrap()
            .contains("elevation request"),
        "{}",
        a.text
    );
    assert_eq!(h.upstream_calls(), before);
    assert_eq!(h.task(&s.task_id).await["state"], "transform");
    let id = pending_for(&h, "warehouse.insert").await;
    approve(&h, &id).await;

    // Approved: the call runs, enters `write`, and rotates the token.
    let a = h
        .call_ok(&s.access, &s.task_id, "warehouse.insert", insert.clone())
        .await;
    let fresh = a.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(h.task(&s.task_id).await["state"], "write");
    let a = h
        .call(&s.access, &s.task_id, "warehouse.insert", insert.clone())
        .await;
    assert_token_error(&a, "token_revoked");

    // The approval was spent: the next high-risk call waits again.
    let a = h
        .call(&fresh, &s.task_id, "warehouse.insert", insert.clone())
        .await;
    assert_error(&a, 403, "approval_required");
    let again = pending_for(&h, "warehouse.insert").await;
    assert_ne!(again, id);
    approve(&h, &again).await;
    h.call_ok(&fresh, &s.task_id, "warehouse.insert", insert.clone())
        .await;
    assert_eq!(h.upstream_calls(), before + 2);
    let task: Value = h.task(&s.task_id).await;
    assert_eq!(task["calls"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_move_into_an_approval_state_waits_too() {
    let h = Harness::with(Options {
        approval: true,
        ..Options::default()
    })
    .await;
    let s = to_transform(&h).await;
    let path = format!("/v1/tasks/{}/transition", s.task_id);
    let a = h
        .post_json(&path, Some(&s.access), &json!({ "to": "write" }))
        .await;
    assert_error(&a, 403, "approval_required");
    assert_eq!(h.task(&s.task_id).await["state"], "transform");
    let id = pending_for(&h, "state:write").await;
    approve(&h, &id).await;
    let a = h
        .post_json(&path, Some(&s.access), &json!({ "to": "write" }))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["state"], "write");
    assert!(
        a.body["access_token"].is_string(),
        "reverify rotates: {}",
        a.text
    );
}

/// Regression: a one-call approval named only the tool, so an approval of
/// the call a person saw let the agent send any other arguments. The held
/// call's redacted arguments and their digest are stored with the request
/// and shown to the approver; the approval is spent only by a call with
/// the same arguments. Another call waits (and reaches no upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_call_approval_is_bound_to_the_arguments_the_approver_saw() {
    let h = Harness::with(Options {
        approval: true,
        ..Options::default()
    })
    .await;
    let s = to_transform(&h).await;
    let seen = json!({ "table": "staging_a", "rows": [{ "id": 1 }] });
    let other = json!({ "table": "staging_a", "rows": [{ "id": 1 }, { "id": 666 }] });
    let a = h
        .call(&s.access, &s.task_id, "warehouse.insert", seen.clone())
        .await;
    assert_error(&a, 403, "approval_required");

    // The approver sees the call: the rule, the arguments, their digest.
    let list = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    let e = &list.body["elevations"][0];
    assert_eq!(e["tool"], "warehouse.insert", "{}", list.text);
    assert_eq!(e["held"]["rule"], "approval");
    assert_eq!(e["held"]["args"], seen);
    let digest = e["held"]["args_digest"].as_str().unwrap();
    assert_eq!(digest.len(), 64);
    assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
    let id = e["id"].as_str().unwrap().to_owned();
    approve(&h, &id).await;

    // Other arguments: still held, a new request, nothing forwarded.
    let before = h.upstream_calls();
    let a = h
        .call(&s.access, &s.task_id, "warehouse.insert", other.clone())
        .await;
    assert_error(&a, 403, "approval_required");
    assert_eq!(h.upstream_calls(), before);
    assert_eq!(h.task(&s.task_id).await["state"], "transform");
    let list = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    let again = list.body["elevations"].as_array().unwrap();
    assert_eq!(again.len(), 1, "{}", list.text);
    assert_eq!(again[0]["held"]["args"], other);
    assert_ne!(again[0]["held"]["args_digest"], digest);

    // The call the approver saw runs (same arguments, any key order).
    let reordered = json!({ "rows": [{ "id": 1 }], "table": "staging_a" });
    h.call_ok(&s.access, &s.task_id, "warehouse.insert", reordered)
        .await;
    assert_eq!(h.upstream_calls(), before + 1);
    assert_eq!(h.task(&s.task_id).await["state"], "write");
}

/// Regression: approving an agent's own elevation request (made with no
/// arguments) counted as the per-call approval of the tool, so an agent
/// could ask for a tool it already holds and have any call of it approved
/// without an approver seeing that call. Such a grant answers the
/// allowlist only; the call is still held for approval of its arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elevation_the_agent_asked_for_approves_no_call() {
    let h = Harness::with(Options {
        approval: true,
        ..Options::default()
    })
    .await;
    let s = to_transform(&h).await;
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/elevations", s.task_id),
            Some(&s.access),
            &json!({ "tool": "warehouse.insert", "reason": "load the batch" }),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    let id = a.body["elevation_id"].as_str().unwrap().to_owned();
    let list = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    assert!(
        list.body["elevations"][0]["held"].is_null(),
        "{}",
        list.text
    );
    approve(&h, &id).await;
    let before = h.upstream_calls();
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "warehouse.insert",
            json!({ "table": "staging_a", "rows": [{ "id": 1 }] }),
        )
        .await;
    assert_error(&a, 403, "approval_required");
    assert_eq!(h.upstream_calls(), before);
    assert_eq!(h.task(&s.task_id).await["state"], "transform");
}
