//! The gateway over real HTTP: every endpoint of DESIGN section 9 that this
//! build serves, driven through a real socket with `reqwest` (and raw TCP
//! where a well-behaved client cannot misbehave enough).
//!
//! Each test stands up its own gateway (see `common`). For every denied
//! call the tests also assert that the upstream saw nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn connect_args() -> Value {
    json!({ "database": "analytics", "password": "hunter2" })
}

fn words(s: &str) -> BTreeSet<&str> {
    s.split(' ').filter(|w| !w.is_empty()).collect()
}

// ---------------------------------------------------------------------------
// 1. The whole task lifecycle.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_lifecycle_end_to_end() {
    let h = Harness::start().await;
    let start = json!({ "agent_id": "ingest-bot", "goal": "nightly load" });

    // Starting a task needs the agent's own bootstrap secret.
    let a = h.post_json("/v1/tasks", None, &start).await;
    assert_token_error(&a, "token_missing");
    let a = h
        .post_json("/v1/tasks", Some("not-the-secret"), &start)
        .await;
    assert_token_error(&a, "token_invalid");
    let a = h
        .post_json("/v1/tasks", Some(OTHER_BOOTSTRAP), &start)
        .await;
    assert_token_error(&a, "token_invalid");
    let a = h.post_json("/v1/tasks", Some(ADMIN), &start).await;
    assert_token_error(&a, "token_invalid");

    // A tool outside the ACL (registered, or not) cannot be asked for.
    let a = h
        .post_json(
            "/v1/tasks",
            Some(BOOTSTRAP),
            &json!({ "agent_id": "ingest-bot", "goal": "g", "tools": ["warehouse.connect", "warehouse.drop"] }),
        )
        .await;
    assert_error(&a, 403, "tool_not_granted");
    let a = h
        .post_json(
            "/v1/tasks",
            Some(BOOTSTRAP),
            &json!({ "agent_id": "ingest-bot", "goal": "g", "tools": ["warehouse.nope"] }),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert_shape(&a);

    // A subset of the ACL: the task, and its token's scope, hold only it.
    let subset = ["warehouse.connect", "warehouse.query", "files.read"];
    let s = h.start_task(Some(&subset)).await;
    let got: BTreeSet<&str> = s.body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(got, subset.into_iter().collect());
    let claims = h.verify(&s.access, &h.issuer);
    assert_eq!(words(&claims.scope), subset.into_iter().collect());
    // Calls to a tool outside the task's set are tool_not_granted.
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "warehouse.transform",
            json!({ "table": "t", "steps": [] }),
        )
        .await;
    assert_error(&a, 403, "tool_not_granted");

    // The whole ACL (no `tools`): the 201 body of section 9.
    let a = h.post_json("/v1/tasks", Some(BOOTSTRAP), &start).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.header("cache-control"), Some("no-store"));
    let b = &a.body;
    let task_id = b["task_id"].as_str().unwrap().to_owned();
    let access = b["access_token"].as_str().unwrap().to_owned();
    let refresh = b["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(b["token_type"], "Bearer");
    assert_eq!(b["expires_in"], 600);
    assert_eq!(b["state"], "connect");
    assert_eq!(b["tools"].as_array().unwrap().len(), 6, "{b}");
    assert!(!refresh.is_empty() && refresh != access);
    let claims = h.verify(&access, &h.issuer);
    assert_eq!(claims.task_id, task_id);
    assert_eq!(claims.sub, "ingest-bot");
    assert_eq!(claims.client_id, "ingest-bot");
    assert_eq!(claims.agent_type, "ingestion");
    assert_eq!(claims.exp - claims.iat, 600);
    assert!(!claims.scope.contains("warehouse.drop"));

    // GET the task: its own token, an auditor; not an approver, not nobody.
    let path = format!("/v1/tasks/{task_id}");
    let a = h.get(&path, Some(&access)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["state"], "connect");
    assert_eq!(a.body["status"], "active");
    assert_eq!(a.body["calls"], 0);
    let a = h.get(&path, Some(AUDITOR)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["task_id"], task_id.as_str());
    let a = h.get(&path, Some(APPROVER)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert_shape(&a);
    assert_token_error(&h.get(&path, None).await, "token_missing");
    let a = h.get("/v1/tasks/task_does_not_exist", Some(ADMIN)).await;
    assert_error(&a, 404, "args_invalid");

    // An allowed call: forwarded with a per-hop JWT, never the agent's token.
    let a = h
        .call_ok(&access, &task_id, "warehouse.connect", connect_args())
        .await;
    assert_eq!(a.body["result"]["echo"], connect_args());
    assert_eq!(a.body["state"], "connect");
    let seen = h.warehouse.calls();
    assert_eq!(seen.len(), 1);
    let call = &seen[0];
    assert_eq!(call.tool, "connect");
    assert_eq!(call.arguments, connect_args());
    assert_eq!(call.task_id, task_id);
    let hop = Harness::hop_token(call);
    assert_ne!(hop, access);
    let hop_claims = h.verify(&hop, "warehouse");
    assert_eq!(hop_claims.aud, "warehouse");
    assert_eq!(hop_claims.scope, "warehouse.connect");
    assert_eq!(hop_claims.task_id, task_id);
    assert_eq!(hop_claims.sub, "ingest-bot");
    assert!(hop_claims.exp - hop_claims.iat <= 60, "{hop_claims:?}");
    assert!(hop_claims.exp <= h.now_secs() + 60);
    assert_ne!(hop_claims.jti, claims.jti);
    // Its kid is published in the JWKS.
    let jwks = h.get("/.well-known/jwks.json", None).await;
    let kid = segment(&hop, 0)["kid"].as_str().unwrap().to_owned();
    assert!(jwks.text.contains(&kid), "{}", jwks.text);
    // The agent's token appears nowhere in what the upstream received.
    let everything = format!("{call:?} {} {hop}", call.arguments);
    assert!(!everything.contains(&access));
    assert!(!everything.contains(&refresh));
    assert!(!everything.contains(BOOTSTRAP));

    // Denials: nothing more reaches the upstream.
    let a = h
        .call(
            &access,
            &task_id,
            "warehouse.connect",
            json!({ "database": "prod" }),
        )
        .await;
    assert_error(&a, 403, "policy_forbid");
    assert_eq!(a.body["policy_ids"], json!(["no-prod-database"]));
    // (a tool of the next state, with arguments a policy forbids: no advance)
    let a = h
        .call(
            &access,
            &task_id,
            "warehouse.query",
            json!({ "sql": "select * from users" }),
        )
        .await;
    assert_error(&a, 403, "policy_forbid");
    assert_eq!(a.body["policy_ids"], json!(["no-sql-wildcards"]));
    let a = h
        .call(
            &access,
            &task_id,
            "warehouse.query",
            json!({ "sql": "select id from t", "limit": 5000 }),
        )
        .await;
    assert_error(&a, 403, "policy_forbid");
    assert_eq!(a.body["policy_ids"], json!(["bounded-reads"]));
    let a = h
        .call(&access, &task_id, "warehouse.query", json!({ "sql": 5 }))
        .await;
    assert_error(&a, 403, "args_invalid");
    let a = h
        .call(
            &access,
            &task_id,
            "warehouse.query",
            json!({ "sql": "select 1", "extra": true }),
        )
        .await;
    assert_error(&a, 403, "args_invalid");
    let a = h
        .call(
            &access,
            &task_id,
            "warehouse.query",
            json!(["not", "an", "object"]),
        )
        .await;
    assert_error(&a, 403, "args_invalid");
    let a = h
        .call(
            &access,
            &task_id,
            "warehouse.insert",
            json!({ "table": "staging_x", "rows": [] }),
        )
        .await;
    assert_error(&a, 403, "state_violation");
    let a = h.call(&access, &task_id, "warehouse.nope", json!({})).await;
    assert_error(&a, 403, "tool_unknown");
    let a = h
        .call(&access, &task_id, "warehouse.drop", json!({ "table": "t" }))
        .await;
    assert_error(&a, 403, "tool_not_granted");
    assert_eq!(h.upstream_calls(), 1, "a denied call reached an upstream");
    assert_eq!(h.task(&task_id).await["state"], "connect");

    // Policy-decision-point mode decides and audits, never forwards.
    let a = h
        .post_json(
            &format!("/v1/tasks/{task_id}/authorize"),
            Some(&access),
            &json!({ "tool": "warehouse.query", "arguments": { "sql": "select * from t" } }),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["decision"], "deny");
    assert_eq!(a.body["reason"], "policy_forbid");
    assert_eq!(a.body["policy_ids"], json!(["no-sql-wildcards"]));
    assert_eq!(h.upstream_calls(), 1);

    // Allowed: a tool of the next state auto-advances the task.
    let a = h
        .call_ok(
            &access,
            &task_id,
            "warehouse.query",
            json!({ "sql": "select id from t", "limit": 10 }),
        )
        .await;
    assert_eq!(a.body["state"], "validate");
    let a = h
        .call_ok(
            &access,
            &task_id,
            "files.read",
            json!({ "path": "/data/in.csv" }),
        )
        .await;
    assert_eq!(a.body["result"]["echo"]["path"], "/data/in.csv");
    assert_eq!(h.files.calls().len(), 1);
    assert_eq!(
        Harness::hop_token(&h.files.calls()[0]).split('.').count(),
        3
    );
    assert_eq!(
        h.verify(&Harness::hop_token(&h.files.calls()[0]), "files")
            .scope,
        "files.read"
    );
    let a = h
        .call(
            &access,
            &task_id,
            "files.read",
            json!({ "path": "/etc/passwd" }),
        )
        .await;
    assert_error(&a, 403, "policy_forbid");
    assert_eq!(a.body["policy_ids"], json!(["files-under-data"]));

    // The transition endpoint: only along an edge.
    let tpath = format!("/v1/tasks/{task_id}/transition");
    let a = h
        .post_json(&tpath, Some(&access), &json!({ "to": "write" }))
        .await;
    assert_error(&a, 403, "state_violation");
    let a = h
        .post_json(&tpath, Some(&access), &json!({ "to": "nowhere" }))
        .await;
    assert_error(&a, 403, "state_violation");
    let a = h
        .post_json(
            &tpath,
            Some(&access),
            &json!({ "to": "transform", "why": "x" }),
        )
        .await;
    assert_error(&a, 400, "args_invalid");
    let a = h
        .post_json(&tpath, Some(&access), &json!({ "to": "transform" }))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["state"], "transform");
    assert!(a.body.get("access_token").is_none(), "{}", a.text);
    let t = h.task(&task_id).await;
    assert_eq!(t["state"], "transform");
    assert_eq!(t["calls"], 3);

    // Complete: every token of the task is revoked.
    let upstream_before = h.upstream_calls();
    let a = h
        .post_json(
            &format!("/v1/tasks/{task_id}/complete"),
            Some(&access),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["status"], "completed");
    assert!(
        a.body["revoked_tokens"].as_u64().unwrap() >= 1,
        "{}",
        a.text
    );
    let a = h
        .call(
            &access,
            &task_id,
            "warehouse.transform",
            json!({ "table": "t", "steps": ["trim"] }),
        )
        .await;
    assert_token_error(&a, "token_revoked");
    assert_token_error(&h.get(&path, Some(&access)).await, "token_revoked");
    let a = h
        .post_json(&tpath, Some(&access), &json!({ "to": "write" }))
        .await;
    assert_token_error(&a, "token_revoked");
    assert_oauth_error(&h.refresh(&refresh).await, "invalid_grant", None);
    let a = h
        .post_json(
            &format!("/v1/tasks/{task_id}/complete"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_error(&a, 403, "task_not_active");
    assert_eq!(h.task(&task_id).await["status"], "completed");
    assert_eq!(h.introspect(&hop).await.body["active"], false);
    assert_eq!(h.upstream_calls(), upstream_before);

    // The audit log: auditors only, in seq order, arguments redacted.
    let q = format!("/v1/audit?task_id={task_id}");
    assert_token_error(&h.get(&q, None).await, "token_missing");
    assert_error(&h.get(&q, Some(&access)).await, 403, "tool_not_granted");
    let a = h.get(&q, Some(APPROVER)).await;
    assert_error(&a, 403, "tool_not_granted");
    let records = h.audit(&task_id).await;
    assert!(records.iter().all(|r| r["task_id"] == task_id.as_str()));
    assert_in_order(
        &records,
        &[
            "task.started",
            "token.issued",
            "call.allowed",
            "token.issued",
            "call.completed",
            "call.denied",
            "call.allowed",
            "state.transition",
            "task.completed",
            "token.revoked",
        ],
    );
    let allowed_connect = records
        .iter()
        .find(|r| r["kind"] == "call.allowed" && r["tool"] == "warehouse.connect")
        .unwrap();
    assert_eq!(allowed_connect["args"]["password"], "[redacted]");
    assert_eq!(allowed_connect["args"]["database"], "analytics");
    assert_eq!(allowed_connect["decision"], "allow");
    let denied = records
        .iter()
        .find(|r| r["kind"] == "call.denied" && r["reason"] == "policy_forbid")
        .unwrap();
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["policy_ids"], json!(["no-prod-database"]));
    let denied_kinds: BTreeSet<&str> = records
        .iter()
        .filter(|r| r["kind"] == "call.denied")
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    for r in [
        "policy_forbid",
        "args_invalid",
        "state_violation",
        "tool_unknown",
        "tool_not_granted",
    ] {
        assert!(
            denied_kinds.contains(r),
            "no call.denied with {r}: {denied_kinds:?}"
        );
    }
    let transitions: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["kind"] == "state.transition" && r.get("decision").is_none())
        .map(|r| {
            (
                r["state_from"].as_str().unwrap(),
                r["state_to"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        transitions,
        [("connect", "validate"), ("validate", "transform")]
    );
    let text = serde_json::to_string(&records).unwrap();
    for secret in ["hunter2", access.as_str(), refresh.as_str(), hop.as_str()] {
        assert!(!text.contains(secret), "a secret leaked into the audit log");
    }
    // Filters and paging.
    let a = h.get(&format!("{q}&kind=call.denied"), Some(AUDITOR)).await;
    let denied = a.body["records"].as_array().unwrap();
    assert!(denied.len() >= 5 && denied.iter().all(|r| r["kind"] == "call.denied"));
    let a = h.get(&format!("{q}&limit=2"), Some(AUDITOR)).await;
    let page = a.body["records"].as_array().unwrap();
    assert_eq!(page.len(), 2);
    let next = a.body["next_since_seq"].as_u64().unwrap();
    let a = h
        .get(&format!("{q}&since_seq={next}&limit=1"), Some(AUDITOR))
        .await;
    assert_eq!(a.body["records"][0]["seq"].as_u64().unwrap(), next + 1);
    assert_error(
        &h.get(&format!("{q}&kind=nope"), Some(AUDITOR)).await,
        400,
        "args_invalid",
    );
    assert_error(
        &h.get(&format!("{q}&since_seq=x"), Some(AUDITOR)).await,
        400,
        "args_invalid",
    );
}

// ---------------------------------------------------------------------------
// 2. Refresh rotation.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_and_reuse_revokes_the_task() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    h.advance_secs(60);

    let a = h.refresh(&s.refresh).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.header("cache-control"), Some("no-store"));
    assert_eq!(a.body["token_type"], "Bearer");
    assert_eq!(a.body["expires_in"], 600);
    let access2 = a.body["access_token"].as_str().unwrap().to_owned();
    let refresh2 = a.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(access2, s.access);
    assert_ne!(refresh2, s.refresh);
    let c2 = h.verify(&access2, &h.issuer);
    assert_eq!(c2.task_id, s.task_id);
    assert_eq!(words(a.body["scope"].as_str().unwrap()), words(&c2.scope));
    // The new pair works.
    h.call_ok(&access2, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let a = h.refresh(&refresh2).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let access3 = a.body["access_token"].as_str().unwrap().to_owned();
    h.call_ok(&access3, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let upstream_before = h.upstream_calls();

    // The first refresh token again: stolen. Everything of the task dies.
    let a = h.refresh(&s.refresh).await;
    assert_oauth_error(&a, "invalid_grant", Some("token_revoked"));
    for token in [&s.access, &access2, &access3] {
        let a = h
            .call(token, &s.task_id, "warehouse.connect", connect_args())
            .await;
        assert_token_error(&a, "token_revoked");
    }
    let latest = a.body["refresh_token"].as_str().map(str::to_owned);
    assert!(latest.is_none(), "no token on a failed refresh");
    // The refresh token issued last is spent too.
    let a = h.refresh(&refresh2).await;
    assert_oauth_error(&a, "invalid_grant", None);
    assert_eq!(h.upstream_calls(), upstream_before);
    assert_eq!(h.introspect(&access3).await.body["active"], false);

    let records = h.audit(&s.task_id).await;
    assert_in_order(
        &records,
        &[
            "task.started",
            "token.refreshed",
            "token.refreshed",
            "token.revoked",
        ],
    );
    let revoked = records
        .iter()
        .rev()
        .find(|r| r["kind"] == "token.revoked")
        .unwrap();
    assert_eq!(revoked["reason"], "token_revoked", "{revoked}");
    assert!(
        revoked["detail"].as_str().unwrap().contains("reuse"),
        "{revoked}"
    );

    // Garbage and missing refresh tokens.
    assert_oauth_error(&h.refresh("prt_garbage").await, "invalid_grant", None);
    let a = h
        .post_form("/oauth/token", None, &[("grant_type", "refresh_token")])
        .await;
    assert_oauth_error(&a, "invalid_request", None);
    let a = h
        .post_form("/oauth/token", None, &[("grant_type", "password")])
        .await;
    assert_oauth_error(&a, "unsupported_grant_type", None);
    let a = h
        .post_form(
            "/oauth/token",
            None,
            &[
                ("grant_type", "refresh_token"),
                ("grant_type", "refresh_token"),
            ],
        )
        .await;
    assert_error(&a, 400, "args_invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_refreshes_count_as_reuse() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let mut handles = Vec::new();
    for _ in 0..8 {
        let client = h.client.clone();
        let url = h.url("/oauth/token");
        let refresh = s.refresh.clone();
        handles.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .form(&[("grant_type", "refresh_token"), ("refresh_token", &refresh)])
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }));
    }
    let mut winners = Vec::new();
    let mut losers = 0;
    for handle in handles {
        let (status, body) = handle.await.unwrap();
        match status.as_u16() {
            200 => winners.push(body),
            400 => {
                assert_eq!(body["error"], "invalid_grant", "{body}");
                losers += 1;
            }
            _ => panic!("{status}: {body}"),
        }
    }
    // One refresh token, one new pair; every other use is a reuse, which
    // revokes the task's tokens, the winner's new ones included.
    assert_eq!((winners.len(), losers), (1, 7));
    let access = winners[0]["access_token"].as_str().unwrap();
    let a = h
        .call(access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_token_error(&a, "token_revoked");
    let a = h
        .refresh(winners[0]["refresh_token"].as_str().unwrap())
        .await;
    assert_oauth_error(&a, "invalid_grant", None);
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_expires_when_idle() {
    let h = Harness::start().await; // idle window 15m, access 10m
    let s = h.start_task(None).await;
    // Sliding: a refresh inside the window buys a new window.
    h.advance_secs(14 * 60);
    let a = h.refresh(&s.refresh).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let refresh2 = a.body["refresh_token"].as_str().unwrap().to_owned();
    let access2 = a.body["access_token"].as_str().unwrap().to_owned();
    // The first access token is past exp + leeway by now.
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_token_error(&a, "token_expired");
    h.advance_secs(14 * 60);
    let a = h.refresh(&refresh2).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let refresh3 = a.body["refresh_token"].as_str().unwrap().to_owned();
    let a = h
        .call(&access2, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_token_error(&a, "token_expired");
    // Idle past the window: refused.
    h.advance_secs(15 * 60 + 1);
    let a = h.refresh(&refresh3).await;
    assert_oauth_error(&a, "invalid_grant", Some("token_expired"));
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_never_extends_past_the_task_max_lifetime() {
    let h = Harness::with(Options {
        access_ttl: "10m",
        refresh_idle_ttl: "15m",
        task_max_lifetime: "20m",
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let t = h.task(&s.task_id).await;
    let deadline_ms = t["deadline"].as_u64().unwrap();
    assert_eq!(
        deadline_ms - t["started_at"].as_u64().unwrap(),
        20 * 60 * 1000
    );
    let deadline = deadline_ms / 1000;

    h.advance_secs(9 * 60);
    let a = h.refresh(&s.refresh).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["expires_in"], 600);
    let c = h.verify(a.body["access_token"].as_str().unwrap(), &h.issuer);
    assert_eq!(c.exp, h.now_secs() + 600);
    assert!(c.exp <= deadline);

    h.advance_secs(6 * 60); // 15 min in: only 5 min of the task left
    let refresh2 = a.body["refresh_token"].as_str().unwrap().to_owned();
    let a = h.refresh(&refresh2).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let access = a.body["access_token"].as_str().unwrap().to_owned();
    let refresh3 = a.body["refresh_token"].as_str().unwrap().to_owned();
    let c = h.verify(&access, &h.issuer);
    assert!(
        c.exp <= deadline,
        "exp {} past the deadline {deadline}",
        c.exp
    );
    assert!(a.body["expires_in"].as_u64().unwrap() <= 300, "{}", a.text);
    h.call_ok(&access, &s.task_id, "warehouse.connect", connect_args())
        .await;

    // At the deadline: no refresh, no call. The token dies at its exp,
    // which is the deadline at the latest.
    h.clock.set(portcullis_core::Timestamp(deadline_ms));
    let a = h.refresh(&refresh3).await;
    assert_oauth_error(&a, "invalid_grant", None);
    let a = h
        .call(&access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_token_error(&a, "token_expired");
    assert_eq!(h.introspect(&access).await.body["active"], false);
    h.advance_secs(31);
    let a = h
        .call(&access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_token_error(&a, "token_expired");
    assert_eq!(h.upstream_calls(), 1);
}

// ---------------------------------------------------------------------------
// 3. Revocation (RFC 7009) and introspection (RFC 7662).
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_always_answers_200() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    for garbage in ["garbage", "a.b.c", "", "prt_not_a_refresh_token"] {
        let a = h
            .post_form("/oauth/revoke", None, &[("token", garbage)])
            .await;
        assert_eq!(a.status, StatusCode::OK, "{garbage:?}: {}", a.text);
    }
    // Longer than any token we issue: still just an invalid token.
    let huge = "x".repeat(9000);
    let a = h
        .post_form("/oauth/revoke", None, &[("token", &huge)])
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    // Still alive after the garbage.
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let a = h
        .post_form(
            "/oauth/revoke",
            None,
            &[("token", &s.access), ("token_type_hint", "access_token")],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let before = h.upstream_calls();
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_token_error(&a, "token_revoked");
    assert!(a.body["detail"].as_str().unwrap().contains("revoked"));
    assert_eq!(h.upstream_calls(), before);
    // Again: still 200.
    let a = h
        .post_form("/oauth/revoke", None, &[("token", &s.access)])
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    // A refresh token can be revoked too.
    let a = h
        .post_form("/oauth/revoke", None, &[("token", &s.refresh)])
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_oauth_error(&h.refresh(&s.refresh).await, "invalid_grant", None);
    let records = h.audit(&s.task_id).await;
    assert!(
        records.iter().any(|r| r["kind"] == "token.revoked"),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_needs_an_admin_and_tells_the_truth() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;

    // The caller authenticates with an admin token.
    let a = h
        .post_form("/oauth/introspect", None, &[("token", &s.access)])
        .await;
    assert_token_error(&a, "token_missing");
    let a = h
        .post_form(
            "/oauth/introspect",
            Some(&s.access),
            &[("token", &s.access)],
        )
        .await;
    assert_error(&a, 403, "tool_not_granted");
    let a = h
        .post_form("/oauth/introspect", Some("nope"), &[("token", &s.access)])
        .await;
    assert_token_error(&a, "token_invalid");

    // A live token.
    let a = h.introspect(&s.access).await;
    let c = h.verify(&s.access, &h.issuer);
    assert_eq!(a.body["active"], true, "{}", a.text);
    assert_eq!(a.body["sub"], "ingest-bot");
    assert_eq!(a.body["task_id"], s.task_id.as_str());
    assert_eq!(a.body["scope"], c.scope.as_str());
    assert_eq!(a.body["aud"], h.issuer.as_str());
    assert_eq!(a.body["exp"], c.exp);
    // The auditor may introspect as well.
    let a = h
        .post_form("/oauth/introspect", Some(AUDITOR), &[("token", &s.access)])
        .await;
    assert_eq!(a.body["active"], true, "{}", a.text);

    // A per-hop token, while the task runs, then after it completed.
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let hop = Harness::hop_token(&h.warehouse.calls()[0]);
    let a = h.introspect(&hop).await;
    assert_eq!(a.body["active"], true, "{}", a.text);
    assert_eq!(a.body["aud"], "warehouse");
    assert_eq!(a.body["scope"], "warehouse.connect");

    // Garbage.
    for junk in ["garbage", "a.b.c", ""] {
        let a = h.introspect(junk).await;
        assert_eq!(a.body, json!({ "active": false }), "{junk:?}");
    }

    // Revoked.
    let other = h.start_task(None).await;
    h.post_form("/oauth/revoke", None, &[("token", &other.access)])
        .await;
    assert_eq!(
        h.introspect(&other.access).await.body,
        json!({ "active": false })
    );

    // Completed task: its per-hop token too.
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/complete", s.task_id),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(h.introspect(&hop).await.body["active"], false);
    assert_eq!(h.introspect(&s.access).await.body["active"], false);

    // Expired.
    let third = h.start_task(None).await;
    assert_eq!(h.introspect(&third.access).await.body["active"], true);
    h.advance_secs(600 + 31);
    assert_eq!(
        h.introspect(&third.access).await.body,
        json!({ "active": false })
    );
}

// ---------------------------------------------------------------------------
// 4. Token exchange (RFC 8693).
// ---------------------------------------------------------------------------

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

async fn exchange(h: &Harness, subject: &str, resource: &str, scope: &str) -> Answer {
    h.post_form(
        "/oauth/token",
        None,
        &[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", subject),
            ("subject_token_type", ACCESS_TYPE),
            ("resource", resource),
            ("scope", scope),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_mints_per_hop_tokens_only_for_allowed_tools() {
    // No Cedar policies here: a tool that policies apply to is never
    // exchanged (see `token_exchange_is_decided_like_a_call`).
    let h = Harness::with(Options {
        policies: Some(""),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;

    let a = exchange(&h, &s.access, "warehouse", "warehouse.connect").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.header("cache-control"), Some("no-store"));
    assert_eq!(a.body["issued_token_type"], ACCESS_TYPE);
    assert_eq!(a.body["token_type"], "Bearer");
    assert!(a.body["expires_in"].as_u64().unwrap() <= 60);
    assert_eq!(a.body["scope"], "warehouse.connect");
    let hop = a.body["access_token"].as_str().unwrap().to_owned();
    // Not the audience of what the gateway forwards: an upstream tells the
    // two apart, and one that accepts only its own name refuses it.
    let c = h.verify(&hop, "exchange.warehouse");
    assert_eq!(c.aud, "exchange.warehouse");
    assert_eq!(c.scope, "warehouse.connect");
    assert_eq!(c.task_id, s.task_id);
    assert!(c.exp - c.iat <= 60);

    // Not allowed in the current state (connect), with the reason.
    let a = exchange(&h, &s.access, "warehouse", "warehouse.insert").await;
    assert_oauth_error(&a, "invalid_scope", Some("state_violation"));
    // One tool per exchange: each token handed out is one use of one tool.
    let a = exchange(
        &h,
        &s.access,
        "warehouse",
        "warehouse.connect warehouse.transform",
    )
    .await;
    assert_oauth_error(&a, "invalid_scope", Some("args_invalid"));
    // Not on the ACL.
    let a = exchange(&h, &s.access, "warehouse", "warehouse.drop").await;
    assert_oauth_error(&a, "invalid_scope", Some("tool_not_granted"));
    // A tool of another upstream.
    let a = exchange(&h, &s.access, "warehouse", "files.read").await;
    assert_oauth_error(&a, "invalid_scope", None);
    assert!(a.body["reason"].is_string(), "{}", a.text);
    // No scope at all.
    let a = exchange(&h, &s.access, "warehouse", "").await;
    assert_oauth_error(&a, "invalid_scope", None);
    // An unknown resource.
    let a = exchange(&h, &s.access, "mainframe", "warehouse.connect").await;
    assert_oauth_error(&a, "invalid_target", None);
    // A subject that is not a live task token.
    let a = exchange(&h, "garbage", "warehouse", "warehouse.connect").await;
    assert_oauth_error(&a, "invalid_grant", Some("token_invalid"));
    let a = exchange(&h, &hop, "warehouse", "warehouse.connect").await;
    assert_oauth_error(&a, "invalid_grant", Some("wrong_audience"));

    // The per-hop token is no access token of the gateway.
    let a = h
        .call(&hop, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_token_error(&a, "wrong_audience");
    let a = h.get(&format!("/v1/tasks/{}", s.task_id), Some(&hop)).await;
    assert_token_error(&a, "wrong_audience");
    assert_eq!(h.upstream_calls(), 0);

    // The task ends: the per-hop token is dead too.
    h.post_json(
        &format!("/v1/tasks/{}/complete", s.task_id),
        Some(&s.access),
        &json!({}),
    )
    .await;
    assert_eq!(h.introspect(&hop).await.body["active"], false);
    let a = exchange(&h, &s.access, "warehouse", "warehouse.connect").await;
    assert_oauth_error(&a, "invalid_grant", Some("token_revoked"));
}

/// Regression: token exchange went around the call pipeline. It checked
/// only the ACL, state, budgets and pin: it skipped approvals, the anomaly
/// rules and `reverify` (a tool of the next state was granted without the
/// task moving or its token rotating), exchanges did not count against
/// budgets, and a tool whose Cedar policies constrain its arguments was
/// exchanged though no policy would ever see them. An exchange is now
/// decided by the same pipeline as a call, counted and recorded as a use of
/// the tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_is_decided_like_a_call() {
    // Anomaly rules and budgets: an exchange is a use of the tool.
    let h = Harness::with(Options {
        policies: Some(""),
        anomaly: Some(r#"rate = { calls = 2, seconds = 60, action = "deny" }"#),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let a = exchange(&h, &s.access, "warehouse", "warehouse.connect").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let a = exchange(&h, &s.access, "warehouse", "warehouse.connect").await;
    assert_oauth_error(&a, "invalid_scope", Some("rate_limited"));
    assert!(a.body["access_token"].is_null(), "{}", a.text);
    assert_eq!(h.task(&s.task_id).await["calls"], 2);
    // A tool of the next state: the task does not move, nothing is minted.
    let a = exchange(&h, &s.access, "warehouse", "warehouse.query").await;
    assert_oauth_error(&a, "invalid_scope", Some("state_violation"));
    assert_eq!(h.task(&s.task_id).await["state"], "connect");
    let uses: Vec<(String, String, String)> = h
        .audit(&s.task_id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "call.allowed" || e["kind"] == "call.denied")
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["reason"].as_str().unwrap_or("").to_owned(),
                e["detail"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(uses.len(), 4, "{uses:?}");
    assert_eq!(uses[0].0, "call.allowed");
    assert!(
        uses[0].2.starts_with("token exchange for warehouse"),
        "{uses:?}"
    );
    assert_eq!(uses[1].0, "call.allowed");
    assert_eq!(
        (uses[2].0.as_str(), uses[2].1.as_str()),
        ("call.denied", "rate_limited")
    );
    assert!(
        uses[2].2.starts_with("token exchange for warehouse"),
        "{uses:?}"
    );
    assert_eq!(uses[3].1, "state_violation");
    assert_eq!(h.upstream_calls(), 1);

    // Approvals: a use the configuration holds for approval is held the
    // same way when it is an exchange.
    let h = Harness::with(Options {
        policies: Some(""),
        anomaly: Some(r#"new_tool = "require_approval""#),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let a = exchange(&h, &s.access, "warehouse", "warehouse.connect").await;
    assert_oauth_error(&a, "invalid_scope", Some("approval_required"));
    let pending = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    assert_eq!(pending.status, StatusCode::OK, "{}", pending.text);
    let held: Vec<&Value> = pending.body["elevations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["task_id"] == s.task_id.as_str())
        .collect();
    assert_eq!(held.len(), 1, "{}", pending.text);
    assert_eq!(held[0]["tool"], "warehouse.connect");

    // Argument policies: they could never see an exchanged call's
    // arguments, so a tool they apply to is not exchanged.
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let a = exchange(&h, &s.access, "warehouse", "warehouse.connect").await;
    assert_oauth_error(&a, "invalid_scope", Some("args_invalid"));
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .contains("Cedar policies"),
        "{}",
        a.text
    );
    assert_eq!(h.upstream_calls(), 0);
}

/// Regression: token exchange was open on every upstream, so any agent
/// could trade its task token for a per-hop token and call the upstream
/// directly, around the per-call checks, and a refused exchange left no
/// trace. An upstream is now closed to exchange unless its configuration
/// says `token_exchange = true` (here `files` is closed, `warehouse` open),
/// and every refusal of a live task's exchange is a `call.denied` record
/// naming the tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closed_to_exchange_refuses_it_on_record() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let a = exchange(&h, &s.access, "files", "files.read").await;
    assert_oauth_error(&a, "invalid_target", Some("tool_not_granted"));
    assert!(a.body["access_token"].is_null(), "{}", a.text);
    let a = exchange(&h, &s.access, "warehouse", "warehouse.insert").await;
    assert_oauth_error(&a, "invalid_scope", Some("state_violation"));
    let denied: Vec<(String, String, String)> = h
        .audit(&s.task_id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "call.denied")
        .map(|e| {
            (
                e["tool"].as_str().unwrap().to_owned(),
                e["reason"].as_str().unwrap().to_owned(),
                e["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0].0, "files.read");
    assert_eq!(denied[0].1, "tool_not_granted");
    assert!(
        denied[0].2.contains("closed to token exchange"),
        "{denied:?}"
    );
    assert_eq!(denied[1].0, "warehouse.insert");
    assert_eq!(denied[1].1, "state_violation");
    assert!(
        denied[1].2.starts_with("token exchange for warehouse"),
        "{denied:?}"
    );
    assert_eq!(h.upstream_calls(), 0);
}

// ---------------------------------------------------------------------------
// 5. task_mismatch.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_one_task_cannot_touch_another() {
    let h = Harness::start().await;
    let a_task = h.start_task(None).await;
    let b_task = h.start_task(None).await;
    let b = &b_task.task_id;
    let token = &a_task.access;

    let a = h.call(token, b, "warehouse.connect", connect_args()).await;
    assert_error(&a, 403, "task_mismatch");
    let a = h
        .post_json(
            &format!("/v1/tasks/{b}/authorize"),
            Some(token),
            &json!({ "tool": "warehouse.connect", "arguments": connect_args() }),
        )
        .await;
    assert_error(&a, 403, "task_mismatch");
    let a = h.get(&format!("/v1/tasks/{b}"), Some(token)).await;
    assert_error(&a, 403, "task_mismatch");
    let a = h
        .post_json(
            &format!("/v1/tasks/{b}/transition"),
            Some(token),
            &json!({ "to": "validate" }),
        )
        .await;
    assert_error(&a, 403, "task_mismatch");
    let a = h
        .post_json(&format!("/v1/tasks/{b}/complete"), Some(token), &json!({}))
        .await;
    assert_error(&a, 403, "task_mismatch");
    // A task that does not exist is no different.
    let a = h
        .call(
            token,
            "task_nonexistent",
            "warehouse.connect",
            connect_args(),
        )
        .await;
    assert_error(&a, 403, "task_mismatch");
    assert_eq!(h.upstream_calls(), 0);
    let t = h.task(b).await;
    assert_eq!(
        (t["status"].as_str(), t["calls"].as_u64()),
        (Some("active"), Some(0))
    );
    // Another agent's task too.
    let other = h
        .post_json(
            "/v1/tasks",
            Some(OTHER_BOOTSTRAP),
            &json!({ "agent_id": "other-bot", "goal": "g" }),
        )
        .await;
    assert_eq!(other.status, StatusCode::CREATED, "{}", other.text);
    let other_id = other.body["task_id"].as_str().unwrap();
    let a = h
        .call(token, other_id, "warehouse.connect", connect_args())
        .await;
    assert_error(&a, 403, "task_mismatch");
    assert_eq!(h.upstream_calls(), 0);
}

// ---------------------------------------------------------------------------
// 6. Token attacks.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_tokens_are_rejected() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let victim = h.start_task(None).await;
    let header = segment(&s.access, 0);
    let claims = segment(&s.access, 1);
    let kid = header["kid"].as_str().unwrap().to_owned();
    let parts: Vec<&str> = s.access.split('.').collect();
    let real_key = h.signing_key();

    // The forger itself works: the genuine claims, re-signed, are accepted.
    let resigned = sign_with(&real_key, &header.to_string(), &claims.to_string());
    h.call_ok(&resigned, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_eq!(h.upstream_calls(), 1);

    let mut attacks: Vec<(&str, String, &str)> = Vec::new();
    // alg none, no signature.
    let none = json!({ "alg": "none", "typ": "at+jwt" }).to_string();
    attacks.push((
        "alg none",
        format!("{}.{}.", b64(none.as_bytes()), parts[1]),
        "token_invalid",
    ));
    let none_kid = json!({ "alg": "none", "typ": "at+jwt", "kid": kid }).to_string();
    attacks.push((
        "alg none with kid",
        format!("{}.{}.{}", b64(none_kid.as_bytes()), parts[1], parts[2]),
        "token_invalid",
    ));
    // HS256 keyed with the public key (algorithm confusion).
    let hs = json!({ "alg": "HS256", "typ": "at+jwt", "kid": kid }).to_string();
    let input = format!("{}.{}", b64(hs.as_bytes()), parts[1]);
    let x = real_key.verifying_key().to_bytes();
    let mac = hmac_sha256(&x, input.as_bytes());
    attacks.push(("HS256", format!("{input}.{}", b64(&mac)), "token_invalid"));
    let jwk_x = b64(&x);
    let mac = hmac_sha256(jwk_x.as_bytes(), input.as_bytes());
    attacks.push((
        "HS256 (x as text)",
        format!("{input}.{}", b64(&mac)),
        "token_invalid",
    ));
    // A kid the ring does not know.
    let wrong_kid = json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": "not-a-key" }).to_string();
    attacks.push((
        "wrong kid",
        sign_with(&real_key, &wrong_kid, &claims.to_string()),
        "token_invalid",
    ));
    // Tampered claims under the original signature.
    let mut to_victim = claims.clone();
    to_victim["task_id"] = json!(victim.task_id);
    attacks.push((
        "tampered task_id",
        format!(
            "{}.{}.{}",
            parts[0],
            b64(to_victim.to_string().as_bytes()),
            parts[2]
        ),
        "token_invalid",
    ));
    let mut wider = claims.clone();
    wider["scope"] = json!(format!(
        "{} warehouse.drop",
        claims["scope"].as_str().unwrap()
    ));
    attacks.push((
        "tampered scope",
        format!(
            "{}.{}.{}",
            parts[0],
            b64(wider.to_string().as_bytes()),
            parts[2]
        ),
        "token_invalid",
    ));
    // Signed by a key of the attacker's, announced under its own kid …
    let attacker = portcullis_token::SigningKey::generate(h.now_secs()).unwrap();
    let attacker_ring = portcullis_token::KeyRing::new(vec![attacker], 900).unwrap();
    let mut c = h.verify(&s.access, &h.issuer);
    c.jti = "at_forged".to_owned();
    attacks.push((
        "other key, own kid",
        portcullis_token::mint(&attacker_ring, &c).unwrap(),
        "token_invalid",
    ));
    // … and under the gateway's kid.
    let attacker = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    attacks.push((
        "other key, gateway kid",
        sign_with(&attacker, &header.to_string(), &claims.to_string()),
        "token_invalid",
    ));
    // Validly signed by the gateway's key, but `exp` is a string.
    let mut exp_string = claims.clone();
    exp_string["exp"] = json!(claims["exp"].to_string());
    attacks.push((
        "exp as a string",
        sign_with(&real_key, &header.to_string(), &exp_string.to_string()),
        "token_invalid",
    ));
    // Validly signed, but a second `task_id` smuggled in.
    let dup =
        claims
            .to_string()
            .replacen('{', &format!("{{\"task_id\":\"{}\",", victim.task_id), 1);
    attacks.push((
        "duplicate claim",
        sign_with(&real_key, &header.to_string(), &dup),
        "token_invalid",
    ));
    // Validly signed, but another issuer / a typ that is not at+jwt.
    let mut other_iss = claims.clone();
    other_iss["iss"] = json!("http://evil.example");
    attacks.push((
        "wrong issuer",
        sign_with(&real_key, &header.to_string(), &other_iss.to_string()),
        "token_invalid",
    ));
    let jwt_typ = json!({ "alg": "EdDSA", "typ": "JWT", "kid": kid }).to_string();
    attacks.push((
        "typ JWT",
        sign_with(&real_key, &jwt_typ, &claims.to_string()),
        "token_invalid",
    ));
    attacks.push(("not a JWT", "garbage".to_owned(), "token_invalid"));
    attacks.push(("huge", "a".repeat(9000), "token_invalid"));

    for (name, token, code) in &attacks {
        let a = h
            .call(token, &s.task_id, "warehouse.connect", connect_args())
            .await;
        assert_eq!(a.status.as_u16(), 401, "{name}: {}", a.text);
        assert_token_error(&a, code);
        // Tampered task ids must not reach the victim either.
        let a = h
            .call(token, &victim.task_id, "warehouse.connect", connect_args())
            .await;
        assert_eq!(a.status.as_u16(), 401, "{name} on the victim: {}", a.text);
    }
    assert_eq!(h.upstream_calls(), 1, "a forged token reached an upstream");

    // No Authorization header.
    let path = format!("/v1/tasks/{}/calls", s.task_id);
    let body = json!({ "tool": "warehouse.connect", "arguments": connect_args() });
    let a = h.post_json(&path, None, &body).await;
    assert_token_error(&a, "token_missing");
    // Another scheme.
    let r = h
        .client
        .post(h.url(&path))
        .header(
            AUTHORIZATION,
            format!("Basic {}", b64(b"ingest-bot:secret")),
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    let a = Answer::read(r).await;
    assert_token_error(&a, "token_invalid");
    let r = h
        .client
        .post(h.url(&path))
        .header(AUTHORIZATION, s.access.clone())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_token_error(&Answer::read(r).await, "token_invalid");
    // Two Authorization headers, both carrying a valid token.
    let mut two = HeaderMap::new();
    let v = HeaderValue::from_str(&format!("Bearer {}", s.access)).unwrap();
    two.append(AUTHORIZATION, v.clone());
    two.append(AUTHORIZATION, v);
    let r = h
        .client
        .post(h.url(&path))
        .headers(two)
        .json(&body)
        .send()
        .await
        .unwrap();
    let a = Answer::read(r).await;
    assert_token_error(&a, "token_invalid");
    assert!(
        a.body["detail"].as_str().unwrap().contains("more than one"),
        "{}",
        a.text
    );
    assert_eq!(h.upstream_calls(), 1);

    // Expired: at exp, with no leeway (the signature cache is warm).
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let exp = h.verify(&s.access, &h.issuer).exp;
    h.clock.set(portcullis_core::Timestamp(exp * 1000 - 1));
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    h.clock.set(portcullis_core::Timestamp(exp * 1000));
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_token_error(&a, "token_expired");
    assert_eq!(h.upstream_calls(), 3);
}

/// Regression: an access token was accepted for 30 s of leeway after its
/// `exp`, so a 1-minute token lived 90 s. It is refused from its `exp` on,
/// on the verifying gateway's clock, by the signature cache too; the
/// upstream sees nothing of the refused call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_refused_from_its_exp_with_no_leeway() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let exp = h.verify(&s.access, &h.issuer).exp;
    h.clock.set(portcullis_core::Timestamp(exp * 1000 - 1));
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_eq!(h.upstream_calls(), 1);
    for at in [exp * 1000, exp * 1000 + 1, (exp + 29) * 1000] {
        h.clock.set(portcullis_core::Timestamp(at));
        let a = h
            .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
            .await;
        assert_token_error(&a, "token_expired");
        assert_eq!(h.introspect(&s.access).await.body["active"], false);
    }
    assert_eq!(h.upstream_calls(), 1);
}

// ---------------------------------------------------------------------------
// 7. reverify states rotate the token.
// ---------------------------------------------------------------------------

/// Walks a fresh task to `transform`.
async fn to_transform(h: &Harness) -> Started {
    let s = h.start_task(None).await;
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.validate",
        json!({ "table": "events", "rows": [{ "a": 1 }] }),
    )
    .await;
    let a = h
        .call_ok(
            &s.access,
            &s.task_id,
            "warehouse.transform",
            json!({ "table": "events", "steps": ["trim", "dedupe"] }),
        )
        .await;
    assert_eq!(a.body["state"], "transform");
    assert!(a.body.get("access_token").is_none());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entering_a_reverify_state_rotates_the_token() {
    let h = Harness::start().await;
    let s = to_transform(&h).await;
    let insert = json!({ "table": "staging_events", "rows": [{ "a": 1 }] });

    // A denied call into the reverify state rotates nothing.
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "warehouse.insert",
            json!({ "table": "prod_events", "rows": [] }),
        )
        .await;
    assert_error(&a, 403, "policy_forbid");
    assert_eq!(a.body["policy_ids"], json!(["insert-into-staging-only"]));

    let before = h.upstream_calls();
    let a = h
        .call_ok(&s.access, &s.task_id, "warehouse.insert", insert.clone())
        .await;
    assert_eq!(a.body["state"], "write");
    assert_eq!(h.upstream_calls(), before + 1);
    let new = a.body["access_token"].as_str().unwrap().to_owned();
    let new_refresh = a.body["refresh_token"].as_str().unwrap().to_owned();
    assert!(a.body["expires_in"].as_u64().unwrap() > 0);
    assert_ne!(new, s.access);

    // The old token is dead, the new one works, scoped to the new phase.
    let a = h
        .call(&s.access, &s.task_id, "warehouse.insert", insert.clone())
        .await;
    assert_token_error(&a, "token_revoked");
    let c = h.verify(&new, &h.issuer);
    assert_eq!(c.scope, "warehouse.insert");
    assert_eq!(c.task_id, s.task_id);
    let a = h
        .call_ok(&new, &s.task_id, "warehouse.insert", insert)
        .await;
    assert!(
        a.body.get("access_token").is_none(),
        "no rotation inside the state"
    );
    // The new refresh token works, and what it mints keeps the new phase.
    let r = h.refresh(&new_refresh).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let refreshed = h.verify(r.body["access_token"].as_str().unwrap(), &h.issuer);
    assert_eq!(refreshed.scope, "warehouse.insert");
    // Tools of earlier phases are outside the new token's scope.
    let a = h
        .call(&new, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert_eq!(h.upstream_calls(), before + 2);

    let records = h.audit(&s.task_id).await;
    let entering = records
        .iter()
        .find(|r| r["kind"] == "state.transition" && r["state_to"] == "write")
        .unwrap();
    assert_eq!(entering["detail"], "reverify");
    assert_in_order(
        &records,
        &["state.transition", "token.revoked", "token.issued"],
    );

    // Every earlier token of the task died at the rotation, the refresh
    // token of the earlier phase included. Presenting it now is treated as
    // refresh-token reuse: it fails, and it revokes every token of the task,
    // the new ones too (fail closed: someone holds old-phase credentials).
    let r = h.refresh(&s.refresh).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.body["error"], "invalid_grant");
    let a = h
        .call(
            &new,
            &s.task_id,
            "warehouse.insert",
            json!({ "table": "staging_events", "rows": [] }),
        )
        .await;
    assert_token_error(&a, "token_revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transition_into_a_reverify_state_rotates_the_token() {
    let h = Harness::start().await;
    let s = to_transform(&h).await;
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/transition", s.task_id),
            Some(&s.access),
            &json!({ "to": "write" }),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["state"], "write");
    assert_eq!(a.body["reverify"], true);
    let new = a.body["access_token"].as_str().unwrap().to_owned();
    let a = h
        .get(&format!("/v1/tasks/{}", s.task_id), Some(&s.access))
        .await;
    assert_token_error(&a, "token_revoked");
    let c = h.verify(&new, &h.issuer);
    assert_eq!(c.scope, "warehouse.insert");
    let a = h
        .call_ok(
            &new,
            &s.task_id,
            "warehouse.insert",
            json!({ "table": "staging_events", "rows": [] }),
        )
        .await;
    assert_eq!(a.body["state"], "write");
    // The final state: no token needed after it.
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/transition", s.task_id),
            Some(&new),
            &json!({ "to": "done" }),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["state"], "done");
}

// ---------------------------------------------------------------------------
// 8. Bad input.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_never_forwarded() {
    let h = Harness::with(Options {
        max_body_bytes: 2048,
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let path = format!("/v1/tasks/{}/calls", s.task_id);
    let token = Some(s.access.as_str());

    // Larger than max_body_bytes.
    let big = json!({ "tool": "warehouse.connect", "arguments": { "database": "x".repeat(4096) } });
    let a = h.post_json(&path, token, &big).await;
    assert_error(&a, 413, "args_invalid");
    let a = h
        .post_json(
            "/v1/tasks",
            Some(BOOTSTRAP),
            &json!({ "agent_id": "ingest-bot", "goal": "x".repeat(4096) }),
        )
        .await;
    assert_error(&a, 413, "args_invalid");
    let form_big = "x".repeat(4096);
    let a = h
        .post_form("/oauth/revoke", None, &[("token", &form_big)])
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.text);
    // Chunked, without a Content-Length.
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        s.access
    );
    for _ in 0..8 {
        let chunk = format!("{{\"x\":\"{}\"}}", "y".repeat(500));
        raw.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    raw.push_str("0\r\n\r\n");
    let text = h.raw(raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("args_invalid"), "{text}");

    // Nesting deeper than 64.
    let deep = format!(
        "{{\"tool\":\"warehouse.connect\",\"arguments\":{{\"database\":\"a\",\"x\":{}1{}}}}}",
        "[".repeat(70),
        "]".repeat(70)
    );
    let a = h.post_raw(&path, token, deep).await;
    assert_error(&a, 400, "args_invalid");
    // Duplicate keys, at the top and inside the arguments.
    let dup =
        r#"{"tool":"warehouse.connect","tool":"warehouse.drop","arguments":{"database":"a"}}"#;
    let a = h.post_raw(&path, token, dup.to_owned()).await;
    assert_error(&a, 400, "args_invalid");
    let dup = r#"{"tool":"warehouse.connect","arguments":{"database":"a","database":"prod"}}"#;
    let a = h.post_raw(&path, token, dup.to_owned()).await;
    assert_error(&a, 400, "args_invalid");
    // Unknown fields.
    let a = h
        .post_json(
            &path,
            token,
            &json!({ "tool": "warehouse.connect", "arguments": { "database": "a" }, "as_admin": true }),
        )
        .await;
    assert_error(&a, 400, "args_invalid");
    let a = h
        .post_json(
            "/v1/tasks",
            Some(BOOTSTRAP),
            &json!({ "agent_id": "ingest-bot", "goal": "g", "role": "admin" }),
        )
        .await;
    assert_error(&a, 400, "args_invalid");
    // Malformed JSON, trailing bytes, wrong types, an empty body.
    for body in [
        "{\"tool\":",
        "{\"tool\":\"warehouse.connect\"} trailing",
        "{\"tool\":42}",
        "",
        "\u{feff}{\"tool\":\"warehouse.connect\"}",
        "[]",
    ] {
        let a = h.post_raw(&path, token, body.to_owned()).await;
        assert_error(&a, 400, "args_invalid");
    }
    // Nothing of that reached an upstream, or counted as a call.
    assert_eq!(h.upstream_calls(), 0);
    assert_eq!(h.task(&s.task_id).await["calls"], 0);

    // Unknown routes: 404 with the error shape.
    let a = h.get("/v1/nope", None).await;
    assert_error(&a, 404, "args_invalid");
    let a = h.post_json("/admin", Some(ADMIN), &json!({})).await;
    assert_error(&a, 404, "args_invalid");

    // Still up, and still serving the task.
    let a = h.get("/healthz", None).await;
    assert_eq!(a.status, StatusCode::OK);
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.connect",
        json!({ "database": "a" }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let limit = Duration::from_secs(13);

    // Headers one byte per second: disconnected by the 10 s header timeout.
    let drip = async {
        let started = Instant::now();
        let mut conn = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let (mut rd, mut wr) = conn.split();
        let writer = async {
            for byte in request.iter() {
                if wr.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            std::future::pending::<()>().await;
        };
        let mut buf = Vec::new();
        let reader = rd.read_to_end(&mut buf);
        let closed = tokio::time::timeout(limit, async {
            tokio::select! {
                () = writer => {},
                _ = reader => {},
            }
        })
        .await;
        assert!(closed.is_ok(), "a client dripping headers was not cut off");
        let text = String::from_utf8_lossy(&buf);
        assert!(!text.contains("200 OK"), "{text}");
        started.elapsed()
    };

    // Connects and says nothing at all.
    let silent = async {
        let started = Instant::now();
        let mut conn = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(limit, conn.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "a silent connection was kept open");
        started.elapsed()
    };

    // Headers complete, body never finished: 400 within the body timeout.
    let stalled = async {
        let started = Instant::now();
        let mut conn = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let head = format!(
            "POST /v1/tasks/{}/calls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"tool\":",
            s.task_id, s.access
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(limit, conn.read(&mut buf))
            .await
            .expect("no answer to a stalled body")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("args_invalid"), "{text}");
        started.elapsed()
    };

    let (d, q, b) = tokio::join!(drip, silent, stalled);
    for (what, took) in [("drip", d), ("silent", q), ("stalled body", b)] {
        assert!(
            took >= Duration::from_secs(9),
            "{what} cut off too early: {took:?}"
        );
        assert!(took <= limit, "{what}: {took:?}");
    }
    assert_eq!(h.upstream_calls(), 0);
    // None of it hurt the server.
    assert_eq!(h.get("/healthz", None).await.status, StatusCode::OK);
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
}

// ---------------------------------------------------------------------------
// 9. Health, metrics, discovery.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_discovery() {
    let h = Harness::start().await;
    let a = h.get("/healthz", None).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = h.get("/readyz", None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);

    let s = h.start_task(None).await;
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "warehouse.connect",
            json!({ "database": "prod" }),
        )
        .await;
    assert_error(&a, 403, "policy_forbid");

    let a = h.get("/metrics", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.header("content-type").unwrap().starts_with("text/plain"));
    assert!(a.text.contains("portcullis_decisions_total"), "{}", a.text);
    for series in [
        "portcullis_decision_seconds_bucket{le=\"0.00001\"}",
        "portcullis_decision_seconds_count 2",
        "portcullis_call_seconds_count",
        "portcullis_ledger_commit_seconds_bucket{le=\"+Inf\"}",
        "portcullis_upstream_errors_total 0",
    ] {
        assert!(a.text.contains(series), "{series} missing:\n{}", a.text);
    }
    assert!(
        a.text
            .contains("portcullis_decisions_total{decision=\"allow\",reason=\"\"} 1"),
        "{}",
        a.text
    );
    assert!(
        a.text
            .contains("portcullis_decisions_total{decision=\"deny\",reason=\"policy_forbid\"} 1"),
        "{}",
        a.text
    );

    let a = h.get("/.well-known/oauth-authorization-server", None).await;
    assert_eq!(a.status, StatusCode::OK);
    let iss = h.issuer.as_str();
    assert_eq!(a.body["issuer"], iss);
    assert_eq!(a.body["jwks_uri"], format!("{iss}/.well-known/jwks.json"));
    assert_eq!(a.body["token_endpoint"], format!("{iss}/oauth/token"));
    assert_eq!(a.body["revocation_endpoint"], format!("{iss}/oauth/revoke"));
    assert_eq!(
        a.body["introspection_endpoint"],
        format!("{iss}/oauth/introspect")
    );
    let grants = a.body["grant_types_supported"].to_string();
    assert!(grants.contains("refresh_token") && grants.contains("token-exchange"));
    let a = h.get("/.well-known/oauth-protected-resource", None).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["resource"], iss);
    assert_eq!(a.body["authorization_servers"], json!([iss]));
    assert_eq!(a.body["jwks_uri"], format!("{iss}/.well-known/jwks.json"));

    // The JWKS: the OKP key whose kid signs the access tokens.
    let a = h.get("/.well-known/jwks.json", None).await;
    assert_eq!(a.status, StatusCode::OK);
    let keys = a.body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{}", a.text);
    let key = &keys[0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["alg"], "EdDSA");
    assert_eq!(key["kid"], segment(&s.access, 0)["kid"]);
    assert_eq!(segment(&s.access, 0)["alg"], "EdDSA");
    assert_eq!(segment(&s.access, 0)["typ"], "at+jwt");
    assert!(key.get("d").is_none(), "the private key is published");
    assert_eq!(
        key["x"].as_str().unwrap(),
        b64(&h.signing_key().verifying_key().to_bytes())
    );
}

// ---------------------------------------------------------------------------
// 10. Concurrency: budgets hold under races (compare-and-swap).
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_never_exceed_the_budget() {
    let h = Harness::with(Options {
        max_calls_per_task: 20,
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let mut handles = Vec::new();
    for i in 0..50 {
        let client = h.client.clone();
        let url = h.url(&format!("/v1/tasks/{}/calls", s.task_id));
        let token = s.access.clone();
        handles.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({ "tool": "warehouse.connect", "arguments": { "database": format!("db{i}") } }))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap();
            (status, body)
        }));
    }
    let mut allowed = 0;
    let mut limited = 0;
    let mut other = Vec::new();
    for handle in handles {
        let (status, body) = handle.await.unwrap();
        match (status.as_u16(), body["error"].as_str()) {
            (200, _) => allowed += 1,
            (403, Some("limit_exceeded")) => limited += 1,
            _ => other.push((status, body)),
        }
    }
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert_eq!((allowed, limited), (20, 30));
    assert_eq!(h.task(&s.task_id).await["calls"], 20);
    assert_eq!(h.warehouse.calls().len(), 20);
    let records = h.audit(&s.task_id).await;
    let count = |k: &str| records.iter().filter(|r| r["kind"] == k).count();
    assert_eq!(count("call.allowed"), 20);
    assert_eq!(count("call.denied"), 30);
}

// ---------------------------------------------------------------------------
// Beyond the list: halt and resume, a failing upstream, odd requests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_and_resume_are_for_admins_and_rotate_everything() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let halt = format!("/v1/tasks/{}/halt", s.task_id);
    let resume = format!("/v1/tasks/{}/resume", s.task_id);

    assert_token_error(&h.post_json(&halt, None, &json!({})).await, "token_missing");
    assert_error(
        &h.post_json(&halt, Some(&s.access), &json!({})).await,
        403,
        "tool_not_granted",
    );
    assert_error(
        &h.post_json(&halt, Some(AUDITOR), &json!({})).await,
        403,
        "tool_not_granted",
    );
    assert_error(
        &h.post_json(&resume, Some(ADMIN), &json!({})).await,
        403,
        "task_not_active",
    );

    let a = h.post_json(&halt, Some(ADMIN), &json!({})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["status"], "halted");
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_error(&a, 403, "anomaly_halt");
    assert_oauth_error(&h.refresh(&s.refresh).await, "invalid_grant", None);
    assert_eq!(h.task(&s.task_id).await["status"], "halted");

    let a = h.post_json(&resume, Some(ADMIN), &json!({})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["status"], "active");
    let access = a.body["access_token"].as_str().unwrap().to_owned();
    let refresh = a.body["refresh_token"].as_str().unwrap().to_owned();
    // The old token stays dead; the new pair works.
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_token_error(&a, "token_revoked");
    h.call_ok(&access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let a = h.refresh(&refresh).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(h.upstream_calls(), 1);
    let records = h.audit(&s.task_id).await;
    assert_in_order(
        &records,
        &[
            "task.halted",
            "token.revoked",
            "task.started",
            "call.allowed",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upstream_is_upstream_unavailable() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "warehouse.validate",
            json!({ "table": "boom", "rows": [] }),
        )
        .await;
    assert_error(&a, 403, "upstream_unavailable");
    // The attempt was recorded before forwarding, and counts.
    assert_eq!(h.warehouse.calls().len(), 2);
    let t = h.task(&s.task_id).await;
    assert_eq!(t["calls"], 2);
    assert_eq!(t["state"], "validate");
    let records = h.audit(&s.task_id).await;
    let done = records
        .iter()
        .rev()
        .find(|r| r["kind"] == "call.completed")
        .unwrap();
    assert_eq!(done["decision"], "error", "{done}");
    assert_eq!(done["reason"], "upstream_unavailable", "{done}");
    assert_in_order(
        &records,
        &[
            "call.allowed",
            "call.completed",
            "call.allowed",
            "call.completed",
        ],
    );
    // A success records the digest of the result.
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.validate",
        json!({ "table": "ok", "rows": [] }),
    )
    .await;
    let records = h.audit(&s.task_id).await;
    let done = records.last().unwrap();
    assert_eq!(done["kind"], "call.completed");
    assert_eq!(done["result_digest"].as_str().unwrap().len(), 64, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_its_lifetime_is_still_visible() {
    let h = Harness::with(Options {
        task_max_lifetime: "20m",
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    h.advance_secs(20 * 60);
    // Not "no such task": it exists, and it is over.
    let a = h
        .get(&format!("/v1/tasks/{}", s.task_id), Some(AUDITOR))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["task_id"], s.task_id.as_str());
    assert_eq!(a.body["status"], "expired", "{}", a.text);
    assert_eq!(a.body["state"], "connect", "{}", a.text);
    let a = h
        .get(&format!("/v1/tasks/{}", s.task_id), Some(ADMIN))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    // Unknown tasks are still 404.
    let a = h.get("/v1/tasks/task_unknown", Some(AUDITOR)).await;
    assert_error(&a, 404, "args_invalid");
    assert_eq!(h.upstream_calls(), 0);
}

/// Regression: a call whose `tool` is not a string (or that is otherwise
/// malformed) answered 400 with `"error": "bad_request"`, and unknown
/// routes, wrong methods, oversized bodies, missing roles and repeated
/// decisions had ad-hoc codes too, none of them a DESIGN section 2 reason
/// code. Each is now a reason code (`assert_shape` checks that for every
/// error a test reads), with the specifics in `detail`; nothing reached the
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_call_answers_a_reason_code_not_bad_request() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let path = format!("/v1/tasks/{}/calls", s.task_id);
    for body in [
        json!({ "tool": 7, "arguments": {} }),
        json!({ "tool": ["warehouse.connect"], "arguments": {} }),
        json!({ "arguments": {} }),
        json!("warehouse.connect"),
    ] {
        let r = h
            .client
            .post(h.url(&path))
            .bearer_auth(&s.access)
            .json(&body)
            .send()
            .await
            .unwrap();
        let a = Answer::read(r).await;
        assert_error(&a, 400, "args_invalid");
        assert!(!a.body["detail"].as_str().unwrap().is_empty(), "{}", a.text);
    }
    let a = h.get("/v1/no-such-route", Some(ADMIN)).await;
    assert_error(&a, 404, "args_invalid");
    assert_eq!(h.upstream_calls(), 0);
}

/// Regression: the tool name of a denied call went into its audit record
/// whole, so an agent could grow the log by up to `server.max_body_bytes`
/// per call. A denial's record carries at most
/// `portcullis_core::MAX_TOOL_NAME_BYTES` of the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_tool_name_is_cut_in_the_denial_record() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let huge = format!("warehouse.{}", "x".repeat(200_000));
    let a = h.call(&s.access, &s.task_id, &huge, json!({})).await;
    assert_error(&a, 403, "tool_unknown");
    assert_eq!(h.upstream_calls(), 0);
    let denied: Vec<Value> = h
        .audit(&s.task_id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "call.denied")
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    let tool = denied[0]["tool"].as_str().unwrap();
    assert!(
        tool.len() <= portcullis_core::MAX_TOOL_NAME_BYTES,
        "{} bytes",
        tool.len()
    );
    assert!(
        tool.starts_with("warehouse.xxx") && tool.ends_with('…'),
        "{tool}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_get_the_error_shape() {
    let h = Harness::start().await;
    let a = h.get("/v1/tasks", Some(ADMIN)).await;
    assert_error(&a, 405, "args_invalid");
    assert_eq!(a.header("allow"), Some("POST"));
    let r = h.client.delete(h.url("/oauth/token")).send().await.unwrap();
    assert_error(&Answer::read(r).await, 405, "args_invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_outage_fails_closed() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    h.store.down.store(true, Ordering::SeqCst);

    let a = h.get("/readyz", None).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert_eq!(h.get("/healthz", None).await.status, StatusCode::OK);
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_error(&a, 503, "internal_error");
    let a = h
        .post_json(
            "/v1/tasks",
            Some(BOOTSTRAP),
            &json!({ "agent_id": "ingest-bot", "goal": "g" }),
        )
        .await;
    assert_error(&a, 503, "internal_error");
    let a = h
        .post_form("/oauth/introspect", Some(ADMIN), &[("token", &s.access)])
        .await;
    assert_error(&a, 503, "internal_error");
    // The ledger could not record a revocation: the holder must not be told
    // it happened (RFC 7009 section 2.2.1: 503, the token still exists).
    let a = h
        .post_form("/oauth/revoke", None, &[("token", &s.access)])
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    let a = h
        .post_form("/oauth/revoke", None, &[("token", &s.refresh)])
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    // A refresh during the outage is not an invalid grant (which tells the
    // client to give the task up): it is a failure to retry.
    let a = h.refresh(&s.refresh).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert_eq!(
        h.upstream_calls(),
        1,
        "a call was forwarded without a ledger"
    );

    // Back: nothing was lost or half-done.
    h.store.down.store(false, Ordering::SeqCst);
    assert_eq!(h.get("/readyz", None).await.status, StatusCode::OK);
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let a = h.refresh(&s.refresh).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(h.task(&s.task_id).await["calls"], 2);
}

/// Regression: a store error's text went into the answer's `detail`, to
/// agents and to unauthenticated callers alike: a driver error names the
/// ledger's host, user and sometimes its password. Answers now say only
/// what failed; the cause is logged under the request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_never_reach_callers() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    h.store.down.store(true, Ordering::SeqCst);
    let answers = [
        h.call(&s.access, &s.task_id, "warehouse.connect", connect_args())
            .await,
        h.post_json(
            "/v1/tasks",
            Some(BOOTSTRAP),
            &json!({ "agent_id": "ingest-bot", "goal": "g" }),
        )
        .await,
        h.get(&format!("/v1/tasks/{}", s.task_id), Some(ADMIN))
            .await,
        h.post_form("/oauth/introspect", Some(ADMIN), &[("token", &s.access)])
            .await,
        h.post_form("/oauth/revoke", None, &[("token", &s.access)])
            .await,
        h.refresh(&s.refresh).await,
        exchange(&h, &s.access, "warehouse", "warehouse.connect").await,
    ];
    for a in &answers {
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
        for leak in ["s3cret", "db.internal", "ledger-admin", "simulated outage"] {
            assert!(!a.text.contains(leak), "`{leak}` in {}", a.text);
        }
        assert!(
            a.header("x-request-id")
                .is_some_and(|r| r.starts_with("req_")),
            "{}",
            a.text
        );
    }
    assert_eq!(h.upstream_calls(), 0);
}

/// Regression: with the ledger down, a valid token's check fails with
/// `internal_error`, and those failures were counted as unauthenticated
/// refusals of the source: past 50 a second every caller behind one address
/// (loopback here, a load balancer in a deployment) was answered
/// `rate_limited` instead of 503, telling clients they flood when the
/// ledger is down. A ledger failure is never counted as a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_outage_is_never_answered_as_a_flood() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    h.store.down.store(true, Ordering::SeqCst);
    for i in 0..120 {
        let a = h
            .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
            .await;
        assert_error(&a, 503, "internal_error");
        assert!(a.header("retry-after").is_none(), "call {i}: {}", a.text);
    }
    h.store.down.store(false, Ordering::SeqCst);
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_eq!(h.upstream_calls(), 1);
}

/// Regression (the call path's cost): every forwarded call minted, signed
/// and recorded a per-hop token of its own (two ledger records per call).
/// A per-hop token is now reused by the later calls of the same access
/// token and tool until 80 % of its lifetime; a new access token (refresh)
/// or an older token gets a fresh one, and each is on record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_hop_tokens_are_reused_per_access_token_while_young() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let hop_of = |n: usize| Harness::hop_token(&h.warehouse.calls()[n]);
    for _ in 0..3 {
        h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
            .await;
    }
    let first = hop_of(0);
    assert_eq!(hop_of(1), first);
    assert_eq!(hop_of(2), first);
    // 80 % of the 60 s lifetime later: a fresh one.
    h.advance_secs(48);
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let second = hop_of(3);
    assert_ne!(second, first);
    // A refreshed access token: a fresh one too.
    let r = h.refresh(&s.refresh).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let access = r.body["access_token"].as_str().unwrap();
    h.call_ok(access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let third = hop_of(4);
    assert_ne!(third, second);
    assert_ne!(third, first);
    // Each distinct per-hop token is on record exactly once.
    let issued: Vec<String> = h
        .audit(&s.task_id)
        .await
        .into_iter()
        .filter(|e| {
            e["kind"] == "token.issued"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("per-hop for warehouse"))
        })
        .map(|e| e["jti"].as_str().unwrap().to_owned())
        .collect();
    let jtis: Vec<String> = [&first, &second, &third]
        .iter()
        .map(|t| h.verify(t, "warehouse").jti)
        .collect();
    assert_eq!(issued, jtis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_hop_tokens_never_outlive_the_task() {
    let h = Harness::with(Options {
        access_ttl: "1m",
        refresh_idle_ttl: "1m",
        task_max_lifetime: "1m",
        // Exchanged below: a tool under Cedar policies never is.
        policies: Some(""),
        ..Options::default()
    })
    .await;
    let s = h.start_task(None).await;
    let deadline = h.task(&s.task_id).await["deadline"].as_u64().unwrap() / 1000;
    h.advance_secs(45);
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let hop = Harness::hop_token(&h.warehouse.calls()[0]);
    let c = h.verify(&hop, "warehouse");
    assert!(
        c.exp <= deadline,
        "per-hop exp {} past the task deadline {deadline}",
        c.exp
    );
    let a = exchange(&h, &s.access, "warehouse", "warehouse.connect").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let c = h.verify(
        a.body["access_token"].as_str().unwrap(),
        "exchange.warehouse",
    );
    assert!(
        c.exp <= deadline,
        "exchanged exp {} past the task deadline {deadline}",
        c.exp
    );
    assert!(
        a.body["expires_in"].as_u64().unwrap() <= deadline - h.now_secs(),
        "{}",
        a.text
    );
}

/// A task of `other-bot`, whose allowlist is only connect and query, moved
/// into `validate`.
async fn other_bot_in_validate(h: &Harness) -> Started {
    let a = h
        .post_json(
            "/v1/tasks",
            Some(OTHER_BOOTSTRAP),
            &json!({ "agent_id": "other-bot", "goal": "look around" }),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let s = Started {
        task_id: a.body["task_id"].as_str().unwrap().to_owned(),
        access: a.body["access_token"].as_str().unwrap().to_owned(),
        refresh: a.body["refresh_token"].as_str().unwrap().to_owned(),
        body: a.body,
    };
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.query",
        json!({ "sql": "select 1" }),
    )
    .await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elevation_is_requested_by_the_task_and_decided_by_an_approver() {
    let h = Harness::start().await;
    let s = other_bot_in_validate(&h).await;
    let read = json!({ "path": "/data/extra.csv" });

    // Outside the allowlist: denied, and the upstream sees nothing.
    let before = h.upstream_calls();
    let a = h
        .call(&s.access, &s.task_id, "files.read", read.clone())
        .await;
    assert_error(&a, 403, "tool_not_granted");
    assert_eq!(h.upstream_calls(), before);

    // The task asks; only its own token can, for its own task.
    let path = format!("/v1/tasks/{}/elevations", s.task_id);
    let ask = json!({ "tool": "files.read", "reason": "need the extract" });
    let a = h.post_json(&path, None, &ask).await;
    assert_token_error(&a, "token_missing");
    let a = h
        .post_json(&path, Some(&s.access), &json!({ "tool": "nope.nope" }))
        .await;
    assert_error(&a, 403, "tool_unknown");
    let a = h.post_json(&path, Some(&s.access), &ask).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.body["status"], "pending");
    let id = a.body["elevation_id"].as_str().unwrap().to_owned();

    // Approvers list and decide; nobody else can.
    let a = h.get("/v1/elevations?status=pending", Some(AUDITOR)).await;
    assert_error(&a, 403, "tool_not_granted");
    let a = h.get("/v1/elevations?status=pending", Some(APPROVER)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let pending = a.body["elevations"].as_array().unwrap();
    assert!(
        pending
            .iter()
            .any(|e| e["id"] == id.as_str() && e["tool"] == "files.read")
    );
    let approve = format!("/v1/elevations/{id}/approve");
    // The agent cannot approve its own request: its token is no admin
    // token, and a genuine task token on the admin API is 403.
    let a = h.post_json(&approve, Some(&s.access), &json!({})).await;
    assert_error(&a, 403, "tool_not_granted");
    let a = h.post_json(&approve, Some(AUDITOR), &json!({})).await;
    assert_error(&a, 403, "tool_not_granted");
    let a = h
        .post_json(&approve, Some(APPROVER), &json!({ "note": "one extract" }))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["status"], "approved");
    assert!(a.body["expires_at"].as_u64().unwrap() > h.now_secs() * 1000);
    // Decided once.
    let a = h.post_json(&approve, Some(ADMIN), &json!({})).await;
    assert_error(&a, 409, "state_violation");

    // The grant opens the tool for this task, through every other check.
    let a = h
        .call_ok(&s.access, &s.task_id, "files.read", read.clone())
        .await;
    assert_eq!(a.body["result"]["echo"]["path"], "/data/extra.csv");
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "files.read",
            json!({ "path": "/etc/passwd" }),
        )
        .await;
    assert_error(&a, 403, "policy_forbid");

    // A denied request grants nothing.
    let a = h
        .post_json(
            &path,
            Some(&s.access),
            &json!({ "tool": "warehouse.validate" }),
        )
        .await;
    let denied = a.body["elevation_id"].as_str().unwrap().to_owned();
    let a = h
        .post_json(
            &format!("/v1/elevations/{denied}/deny"),
            Some(APPROVER),
            &json!({}),
        )
        .await;
    assert_eq!(a.body["status"], "denied", "{}", a.text);
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "warehouse.validate",
            json!({ "table": "t", "rows": [] }),
        )
        .await;
    assert_error(&a, 403, "tool_not_granted");

    // The approval expires (elevation.ttl defaults to 15 minutes). The
    // access token (10 minutes) has too, so refresh first: the grant, not
    // the token, is what must stop the call.
    let mut refresh = s.refresh.clone();
    let mut fresh = String::new();
    for _ in 0..2 {
        h.advance_secs(8 * 60);
        let r = h.refresh(&refresh).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        fresh = r.body["access_token"].as_str().unwrap().to_owned();
        refresh = r.body["refresh_token"].as_str().unwrap().to_owned();
    }
    let before = h.upstream_calls();
    let a = h.call(&fresh, &s.task_id, "files.read", read).await;
    assert_error(&a, 403, "tool_not_granted");
    assert_eq!(h.upstream_calls(), before);

    let records = h.audit(&s.task_id).await;
    assert_in_order(
        &records,
        &[
            "elevation.requested",
            "elevation.approved",
            "call.allowed",
            "elevation.requested",
            "elevation.denied",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_before_the_decision_are_audited() {
    let h = Harness::start().await;
    let a = h.start_task(None).await;
    let b = h.start_task(None).await;

    // A token of task A on task B's path: task_mismatch, recorded on B.
    let r = h
        .call(&a.access, &b.task_id, "warehouse.connect", connect_args())
        .await;
    assert_error(&r, 403, "task_mismatch");
    // No token, and a forged one: recorded on the task the path names.
    let r = h
        .post_json(
            &format!("/v1/tasks/{}/calls", b.task_id),
            None,
            &json!({ "tool": "warehouse.connect", "arguments": connect_args() }),
        )
        .await;
    assert_token_error(&r, "token_missing");
    let forged = format!("{}x", &a.access[..a.access.len() - 1]);
    let r = h
        .call(&forged, &b.task_id, "warehouse.connect", connect_args())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);

    // The two refusals without a valid credential are counted, and written
    // as one record of their source (on task B: both named it).
    assert_eq!(h.gateway.flush_refusals().await, 1);
    let records = h.audit(&b.task_id).await;
    let denied: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["kind"] == "call.denied")
        .map(|r| {
            (
                r["reason"].as_str().unwrap(),
                r["agent_id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        denied.contains(&("task_mismatch", "ingest-bot")),
        "{denied:?}"
    );
    let counted = records
        .iter()
        .find(|r| r["kind"] == "call.denied" && r["agent_id"].is_null())
        .unwrap();
    let detail = counted["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("2 refused requests from 127.0.0.1")
            && detail.contains("token_missing 1")
            && detail.contains("token_invalid 1"),
        "{counted}"
    );
    // Nothing reached the upstream, and no secret reached the log.
    assert_eq!(h.upstream_calls(), 0);
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains(&a.access) && !text.contains(&forged));
}

// ---------------------------------------------------------------------------
// The alert webhook (`audit.alert_webhook`).
// ---------------------------------------------------------------------------

/// Fast retries, so a failing receiver is given up on within a second.
fn quick_retries(attempts: u32) -> portcullis_gateway::alerts::RetryPolicy {
    portcullis_gateway::alerts::RetryPolicy {
        attempts,
        timeout: Duration::from_millis(300),
        backoff: Duration::from_millis(50),
    }
}

async fn alerting_harness(url: String, attempts: u32) -> Harness {
    Harness::with(Options {
        alert_webhook: Some(url),
        alert_policy: Some(quick_retries(attempts)),
        ..Options::default()
    })
    .await
}

/// The value of the unlabelled series `name` in `/metrics`.
async fn metric(h: &Harness, name: &str) -> u64 {
    let a = h.get("/metrics", None).await;
    a.text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits (at most 5 s) until `metric` reaches `want`.
async fn wait_for_metric(h: &Harness, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = metric(h, name).await;
        if got >= want {
            assert_eq!(got, want, "{name}");
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {got}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Halts `task_id` as the admin and asserts it answered 200 within 1 s.
async fn timed_halt(h: &Harness, task_id: &str) {
    let started = Instant::now();
    let a = h
        .post_json(
            &format!("/v1/tasks/{task_id}/halt"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(took < Duration::from_secs(1), "halt took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halting_a_task_posts_exactly_one_alert() {
    let r = Receiver::start(0, false).await;
    let h = alerting_harness(r.url.clone(), 5).await;
    // A completed task is no alert.
    let done = h.start_task(None).await;
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/complete", done.task_id),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let s = h.start_task(None).await;
    h.call_ok(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    let before = portcullis_core::Clock::now(&*h.clock).0;
    timed_halt(&h, &s.task_id).await;

    wait_for_metric(&h, "portcullis_alerts_delivered_total", 1).await;
    // Nothing more arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let accepted = r.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(r.attempts.load(Ordering::SeqCst), 1);
    let (content_type, text) = &accepted[0];
    assert_eq!(content_type, "application/json");
    let body: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        body,
        json!({
            "kind": "task.halted",
            "task_id": s.task_id,
            "agent_id": "ingest-bot",
            "reason": null,
            "detail": "halted by admin ops",
            "ts": before,
        })
    );
    // Never a token nor an argument.
    for secret in [&s.access, &s.refresh, "hunter2", "analytics"] {
        assert!(!text.contains(secret), "{text}");
    }
    assert_eq!(metric(&h, "portcullis_alerts_failed_total").await, 0);
    assert_eq!(metric(&h, "portcullis_alerts_dropped_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_delivery_is_retried_until_the_receiver_accepts() {
    let r = Receiver::start(2, false).await;
    let h = alerting_harness(r.url.clone(), 5).await;
    let s = h.start_task(None).await;
    timed_halt(&h, &s.task_id).await;
    wait_for_metric(&h, "portcullis_alerts_delivered_total", 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(r.attempts.load(Ordering::SeqCst), 3);
    assert_eq!(r.accepted().len(), 1);
    assert_eq!(metric(&h, "portcullis_alerts_failed_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_alert_receiver_never_slows_a_halt() {
    // A port with nothing listening.
    let url = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}/alerts", l.local_addr().unwrap())
    };
    let h = alerting_harness(url, 3).await;
    let s = h.start_task(None).await;
    let other = h.start_task(None).await;
    timed_halt(&h, &s.task_id).await;
    // Calls go on meanwhile.
    h.call_ok(
        &other.access,
        &other.task_id,
        "warehouse.connect",
        connect_args(),
    )
    .await;
    wait_for_metric(&h, "portcullis_alerts_failed_total", 1).await;
    assert_eq!(metric(&h, "portcullis_alerts_delivered_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_alert_receiver_never_slows_a_halt() {
    let r = Receiver::start(0, true).await;
    let h = alerting_harness(r.url.clone(), 2).await;
    let s = h.start_task(None).await;
    let other = h.start_task(None).await;
    timed_halt(&h, &s.task_id).await;
    let started = Instant::now();
    h.call_ok(
        &other.access,
        &other.task_id,
        "warehouse.connect",
        connect_args(),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(1));
    // Two attempts of 300 ms, 50 ms apart, then given up.
    wait_for_metric(&h, "portcullis_alerts_failed_total", 1).await;
    assert_eq!(r.attempts.load(Ordering::SeqCst), 2);
    assert!(r.accepted().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_alert_webhook_with_an_unreadable_ca_file_is_a_setup_error() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        alert_webhook: Some("https://alerts.example/hook".to_owned()),
        ..Options::default()
    };
    let config = write_config(dir.path(), "127.0.0.1:1", &opts);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "alert_webhook = \"https://alerts.example/hook\"",
        "alert_webhook = \"https://alerts.example/hook\"\nalert_ca_file = \"missing-ca.crt\"",
    );
    std::fs::write(&config, text).unwrap();
    let err = portcullis_gateway::run::build(&config)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing-ca.crt") && err.contains("cannot read"),
        "{err}"
    );
}

/// `[elevation] auto_approve`: a permit that matches approves at once
/// (decided by the policy, audited, the grant usable); one that does not
/// leaves the request pending for a human, and a `forbid` wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_approve_policies_decide_without_a_human() {
    let h = Harness::with(Options {
        auto_approve: Some(
            r#"
@id("reads-while-validating")
permit(principal, action == Action::"elevate", resource)
when { resource.access == "read" && context.state == "validate" };

@id("never-for-exports")
forbid(principal, action, resource) when { context.reason like "*export*" };
"#,
        ),
        ..Options::default()
    })
    .await;
    let s = other_bot_in_validate(&h).await;
    let path = format!("/v1/tasks/{}/elevations", s.task_id);

    // A forbid wins: pending.
    let a = h
        .post_json(
            &path,
            Some(&s.access),
            &json!({ "tool": "files.read", "reason": "export it all" }),
        )
        .await;
    assert_eq!(a.body["status"], "pending", "{}", a.text);
    // A high-risk write matches no permit: pending.
    let a = h
        .post_json(
            &path,
            Some(&s.access),
            &json!({ "tool": "warehouse.drop", "reason": "cleanup" }),
        )
        .await;
    assert_eq!(a.body["status"], "pending", "{}", a.text);
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "files.read",
            json!({ "path": "/data/x.csv" }),
        )
        .await;
    assert_error(&a, 403, "tool_not_granted");

    // A read while validating: approved by the policy, usable at once.
    let a = h
        .post_json(
            &path,
            Some(&s.access),
            &json!({ "tool": "files.read", "reason": "need the extract" }),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    assert_eq!(a.body["status"], "approved", "{}", a.text);
    assert_eq!(a.body["decided_by"], "policy reads-while-validating");
    let id = a.body["elevation_id"].as_str().unwrap().to_owned();
    h.call_ok(
        &s.access,
        &s.task_id,
        "files.read",
        json!({ "path": "/data/x.csv" }),
    )
    .await;
    let approved: Vec<Value> = h
        .audit(&s.task_id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == "elevation.approved")
        .collect();
    assert_eq!(approved.len(), 1);
    assert!(approved[0]["detail"].as_str().unwrap().contains(&id));
    assert!(
        approved[0]["detail"]
            .as_str()
            .unwrap()
            .contains("policy reads-while-validating")
    );
    // Decided once: a human cannot decide it again.
    let a = h
        .post_json(
            &format!("/v1/elevations/{id}/deny"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_error(&a, 409, "state_violation");
}

/// An approval belongs to its task: a new task of the same agent starts
/// without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_does_not_carry_over_to_a_new_task() {
    let h = Harness::start().await;
    let s = other_bot_in_validate(&h).await;
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/elevations", s.task_id),
            Some(&s.access),
            &json!({ "tool": "files.read", "reason": "extract" }),
        )
        .await;
    let id = a.body["elevation_id"].as_str().unwrap().to_owned();
    let a = h
        .post_json(
            &format!("/v1/elevations/{id}/approve"),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let read = json!({ "path": "/data/x.csv" });
    h.call_ok(&s.access, &s.task_id, "files.read", read.clone())
        .await;
    let t = other_bot_in_validate(&h).await;
    let before = h.upstream_calls();
    let a = h.call(&t.access, &t.task_id, "files.read", read).await;
    assert_error(&a, 403, "tool_not_granted");
    assert_eq!(h.upstream_calls(), before);
}

// ---------------------------------------------------------------------------
// Floods: unauthenticated refusals, elevation requests.
// ---------------------------------------------------------------------------

/// The `call.denied` records of refusals counted per source (no agent).
async fn counted_refusals(h: &Harness) -> Vec<Value> {
    let a = h
        .get("/v1/audit?kind=call.denied&limit=1000", Some(AUDITOR))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["agent_id"].is_null())
        .cloned()
        .collect()
}

/// The count a counted-refusal record carries ("N refused requests …").
fn refusal_count(record: &Value) -> u64 {
    let detail = record["detail"].as_str().unwrap();
    assert!(detail.contains(" refused requests from "), "{record}");
    detail.split(' ').next().unwrap().parse().unwrap()
}

/// Sends `requests` at once; their answers, in order.
async fn send_all(requests: Vec<reqwest::RequestBuilder>) -> Vec<Answer> {
    let handles: Vec<_> = requests
        .into_iter()
        .map(|r| tokio::spawn(async move { Answer::read(r.send().await.unwrap()).await }))
        .collect();
    let mut answers = Vec::with_capacity(handles.len());
    for handle in handles {
        answers.push(handle.await.unwrap());
    }
    answers
}

/// Sends `n` calls with a forged token, 16 at a time; their answers.
async fn bad_token_flood(h: &Harness, task_id: &str, forged: &str, n: usize) -> Vec<Answer> {
    let url = h.url(&format!("/v1/tasks/{task_id}/calls"));
    let body = json!({ "tool": "warehouse.connect", "arguments": connect_args() });
    let mut answers = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let requests = chunk
            .iter()
            .map(|_| h.client.post(&url).bearer_auth(forged).json(&body))
            .collect();
        answers.extend(send_all(requests).await);
    }
    answers
}

/// Regression: every request without a valid credential committed its own
/// `call.denied` record through the single ledger writer, so a flood of
/// bad tokens grew the audit log by one record per request and queued
/// ahead of real calls. Now: refusals are counted per source and written
/// as one record per source and window, with the exact count; past
/// `RATE_PER_SECOND` a source is answered 403 `rate_limited` from memory;
/// real calls in the middle go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_tokens_is_recorded_in_aggregate_and_never_starves_calls() {
    const N: usize = 400;
    let rate = portcullis_gateway::refusals::RATE_PER_SECOND as usize;
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let forged = format!("{}x", &s.access[..s.access.len() - 1]);
    let before = counted_refusals(&h).await.len();

    // The flood and real calls at once (the test clock stands still: one
    // second for the whole flood).
    let (answers, real) = tokio::join!(bad_token_flood(&h, &s.task_id, &forged, N), async {
        let mut real = Vec::new();
        for _ in 0..5 {
            real.push(
                h.call(&s.access, &s.task_id, "warehouse.connect", connect_args())
                    .await,
            );
        }
        real
    });
    for a in &real {
        assert_eq!(
            a.status,
            StatusCode::OK,
            "a real call in a flood: {}",
            a.text
        );
    }
    assert_eq!(h.upstream_calls(), 5, "the flood reached nothing upstream");
    let refused = answers
        .iter()
        .filter(|a| a.status == StatusCode::UNAUTHORIZED)
        .inspect(|a| assert_token_error(a, "token_invalid"))
        .count();
    let limited = answers
        .iter()
        .filter(|a| a.status == StatusCode::FORBIDDEN)
        .inspect(|a| {
            assert_error(a, 403, "rate_limited");
            assert_eq!(a.header("retry-after"), Some("1"), "{}", a.text);
        })
        .count();
    assert_eq!((refused, limited), (rate, N - rate));

    // Nothing was written per request.
    assert_eq!(counted_refusals(&h).await.len(), before);
    // The flush: one record for the one source, with the exact count.
    assert_eq!(h.gateway.flush_refusals().await, 1);
    let records = counted_refusals(&h).await;
    let new: Vec<&Value> = records.iter().skip(before).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let record = new[0];
    assert_eq!(refusal_count(record), N as u64);
    assert_eq!(record["task_id"], s.task_id.as_str(), "{record}");
    assert_eq!(record["decision"], "deny");
    assert_eq!(record["reason"], "rate_limited");
    let detail = record["detail"].as_str().unwrap();
    assert!(detail.contains("from 127.0.0.1"), "{detail}");
    assert!(
        detail.contains(&format!("token_invalid {rate}")),
        "{detail}"
    );
    assert!(
        detail.contains(&format!("rate_limited {}", N - rate)),
        "{detail}"
    );
    assert!(!detail.contains(&forged) && !detail.contains(&s.access));

    // A window that ended is written at the next refusal, without a flush.
    h.advance_secs(1);
    let more = bad_token_flood(&h, &s.task_id, &forged, 10).await;
    h.advance_secs(11);
    let last = bad_token_flood(&h, &s.task_id, &forged, 1).await;
    assert!(
        more.iter()
            .chain(&last)
            .all(|a| a.status == StatusCode::UNAUTHORIZED)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let records = counted_refusals(&h).await;
        if records
            .iter()
            .skip(before + 1)
            .any(|r| refusal_count(r) == 10)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ended window was not written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.gateway.flush_refusals().await, 1);
    let total: u64 = counted_refusals(&h)
        .await
        .iter()
        .skip(before)
        .map(refusal_count)
        .sum();
    assert_eq!(total, (N + 11) as u64, "every refusal counted exactly once");
}

/// Regression: a refusal of an unauthenticated request waited for the
/// ledger (its record was committed before the answer), so a flood kept
/// the ledger writer busy, and a ledger outage turned every bad token into
/// a 503. The answers are now made from memory, and the counts a failed
/// flush could not write are kept for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_refusals_never_wait_for_the_ledger() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let forged = format!("{}x", &s.access[..s.access.len() - 1]);
    let before = counted_refusals(&h).await.len();
    h.store.down.store(true, Ordering::SeqCst);
    let answers = bad_token_flood(&h, &s.task_id, &forged, 80).await;
    let rate = portcullis_gateway::refusals::RATE_PER_SECOND as usize;
    for (i, a) in answers.iter().enumerate() {
        if a.status == StatusCode::UNAUTHORIZED {
            assert_token_error(a, "token_invalid");
        } else {
            assert_error(a, 403, "rate_limited");
        }
        let _ = i;
    }
    assert_eq!(
        answers
            .iter()
            .filter(|a| a.status == StatusCode::UNAUTHORIZED)
            .count(),
        rate
    );
    // The ledger is down: nothing written, nothing lost.
    assert_eq!(h.gateway.flush_refusals().await, 0);
    h.store.down.store(false, Ordering::SeqCst);
    assert_eq!(h.gateway.flush_refusals().await, 1);
    let records = counted_refusals(&h).await;
    let counts: Vec<u64> = records.iter().skip(before).map(refusal_count).collect();
    assert_eq!(counts, vec![80]);
    assert_eq!(h.upstream_calls(), 0);
}

/// Regression: a task could file elevation requests without end, each one
/// written to the ledger, and bury other tasks' requests in the approvers'
/// list. A task now has at most 16 pending; one more is refused
/// `limit_exceeded` and nothing of it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_elevation_requests_are_capped_per_task() {
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    let other = h.start_task(None).await;
    let path = format!("/v1/tasks/{}/elevations", s.task_id);
    let ask = json!({ "tool": "files.read", "reason": "need the extract" });
    let mut ids = Vec::new();
    for _ in 0..16 {
        let a = h.post_json(&path, Some(&s.access), &ask).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
        ids.push(a.body["elevation_id"].as_str().unwrap().to_owned());
    }
    let requested = |records: &[Value]| {
        records
            .iter()
            .filter(|r| r["kind"] == "elevation.requested")
            .count()
    };
    let records_before = h.audit(&s.task_id).await;
    let a = h.post_json(&path, Some(&s.access), &ask).await;
    assert_error(&a, 403, "limit_exceeded");
    assert!(
        a.body["detail"].as_str().unwrap().contains("16 pending"),
        "{}",
        a.text
    );
    // Nothing of it written: no request, no record.
    let records = h.audit(&s.task_id).await;
    assert_eq!(records.len(), records_before.len());
    assert_eq!(requested(&records), 16);
    let a = h
        .get("/v1/elevations?status=pending&limit=500", Some(APPROVER))
        .await;
    let pending = a.body["elevations"].as_array().unwrap();
    assert_eq!(
        pending
            .iter()
            .filter(|e| e["task_id"] == s.task_id.as_str())
            .count(),
        16
    );
    assert_eq!(h.upstream_calls(), 0);
    // Another task is not held back.
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/elevations", other.task_id),
            Some(&other.access),
            &ask,
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    // A decision makes room again.
    let a = h
        .post_json(
            &format!("/v1/elevations/{}/deny", ids[0]),
            Some(APPROVER),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let a = h.post_json(&path, Some(&s.access), &ask).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
}

/// Regression: `GET /v1/elevations` returned the oldest `limit` requests
/// and no way on, so a flood of requests from one task hid every later
/// request of another task from approvers. The list now pages with a
/// cursor: every pending request is reachable, each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elevation_pages_never_hide_another_tasks_request() {
    const TASKS: usize = 20;
    const EACH: usize = 15;
    let h = Harness::start().await;
    let mut flooders = Vec::new();
    for _ in 0..TASKS {
        flooders.push(h.start_task(None).await);
    }
    let ask = json!({ "tool": "files.read", "reason": "flood" });
    let mut filed = BTreeSet::new();
    for round in 0..EACH {
        let requests = flooders
            .iter()
            .map(|t| {
                h.client
                    .post(h.url(&format!("/v1/tasks/{}/elevations", t.task_id)))
                    .bearer_auth(&t.access)
                    .json(&ask)
            })
            .collect();
        for a in send_all(requests).await {
            assert_eq!(a.status, StatusCode::ACCEPTED, "round {round}: {}", a.text);
            filed.insert(a.body["elevation_id"].as_str().unwrap().to_owned());
        }
    }
    // The request that must not be hidden comes last (the test clock
    // stood still for the flood: its requests tie on time and go by id).
    h.advance_secs(1);
    let victim = h.start_task(None).await;
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/elevations", victim.task_id),
            Some(&victim.access),
            &json!({ "tool": "files.read", "reason": "the one that matters" }),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.text);
    let victim_id = a.body["elevation_id"].as_str().unwrap().to_owned();
    filed.insert(victim_id.clone());
    assert_eq!(filed.len(), TASKS * EACH + 1);

    // The first page alone does not reach it, and says more follow.
    let a = h
        .get("/v1/elevations?status=pending&limit=50", Some(APPROVER))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(a.body["next"].is_string(), "{}", a.text);
    assert!(
        !a.body["elevations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == victim_id.as_str())
    );

    // Following `next`: every pending request, exactly once, in order.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &after {
            Some(c) => format!("/v1/elevations?status=pending&limit=37&after={c}"),
            None => "/v1/elevations?status=pending&limit=37".to_owned(),
        };
        let a = h.get(&q, Some(APPROVER)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        let page = a.body["elevations"].as_array().unwrap();
        assert!(page.len() <= 37);
        seen.extend(page.iter().map(|e| {
            (
                e["requested_at"].as_u64().unwrap(),
                e["id"].as_str().unwrap().to_owned(),
            )
        }));
        pages += 1;
        assert!(pages < 100, "paging does not end");
        match a.body["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "strictly ascending");
    let ids: Vec<String> = seen.into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), filed.len(), "each request exactly once");
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), filed);
    assert_eq!(ids.last(), Some(&victim_id));

    // A cursor that is not one is a malformed request.
    let a = h
        .get(
            "/v1/elevations?status=pending&after=not-a-cursor",
            Some(APPROVER),
        )
        .await;
    assert_error(&a, 400, "args_invalid");
}

/// Regression guard: a request refused before its body was read (here a
/// bad token) left a keep-alive connection that the server then closed
/// without saying so, so a client's next request on it failed. Now every
/// answer either leaves the connection usable or says `Connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_before_its_body_is_read_says_the_connection_closes() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let h = Harness::start().await;
    for pad in [0, 200 * 1024] {
        let body = format!(
            r#"{{"tool":"warehouse.connect","args":{{"database":"a","pad":"{}"}}}}"#,
            "x".repeat(pad)
        );
        let refused = format!(
            "POST /v1/tasks/t1/calls HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer nope\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        // The body may not all be taken: the answer can come first.
        let (mut rd, mut wr) = s.split();
        let (_, first) = tokio::join!(wr.write_all(refused.as_bytes()), async {
            let mut first = vec![0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut first))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&first[..n]).to_lowercase()
        });
        assert!(first.starts_with("http/1.1 401"), "{first}");
        let says_close = first.contains("\r\nconnection: close\r\n");
        // The next request on the same connection.
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await;
        let mut second = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut second)).await;
        let second = String::from_utf8_lossy(&second);
        assert!(
            says_close || second.starts_with("HTTP/1.1 200"),
            "body of {pad} bytes: the connection was closed without `Connection: close`: \
             first {first:?}, then {second:?}"
        );
    }

    // A request whose body was read keeps its connection.
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut ok = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut ok))
        .await
        .unwrap()
        .unwrap();
    let ok = String::from_utf8_lossy(&ok[..n]).to_lowercase();
    assert!(ok.starts_with("http/1.1 200"), "{ok}");
    assert!(!ok.contains("connection: close"), "{ok}");
}
