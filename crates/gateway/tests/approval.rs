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
