//! `/mcp` over real HTTP, both eras, with the in-process upstreams of the
//! shared harness (which record every call they receive, so each denial
//! also asserts that the upstream saw nothing).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{Answer, Harness};
use serde_json::{Value, json};

const MODERN: &str = "2026-07-28";

fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
    })
}

/// A modern-era request with coherent routing headers.
async fn modern(h: &Harness, token: &str, method: &str, mut params: Value) -> Answer {
    params["_meta"] = meta();
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let mut req = h
        .client
        .post(h.url("/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", method);
    if let Some(name) = params.get("name").and_then(Value::as_str) {
        req = req.header("mcp-name", name);
    }
    Answer::read(req.json(&body).send().await.unwrap()).await
}

async fn legacy_post(h: &Harness, token: &str, session: Option<&str>, body: &Value) -> Answer {
    let mut req = h
        .client
        .post(h.url("/mcp"))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream");
    if let Some(s) = session {
        req = req
            .header("mcp-session-id", s)
            .header("mcp-protocol-version", "2025-11-25");
    }
    Answer::read(req.json(body).send().await.unwrap()).await
}

async fn open_session(h: &Harness, token: &str) -> String {
    let a = legacy_post(
        h,
        token,
        None,
        &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["result"]["protocolVersion"], "2025-11-25");
    let sid = a.header("mcp-session-id").unwrap().to_owned();
    let n = legacy_post(
        h,
        token,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(n.status, 202);
    sid
}

async fn legacy_call(h: &Harness, token: &str, sid: &str, tool: &str, args: Value) -> Answer {
    legacy_post(
        h,
        token,
        Some(sid),
        &json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": tool, "arguments": args}}),
    )
    .await
}

#[tokio::test]
async fn modern_discover_list_and_call() {
    let h = Harness::start().await;
    let t = h.start_task(None).await;
    let d = modern(&h, &t.access, "server/discover", json!({})).await;
    assert_eq!(d.status, 200, "{}", d.text);
    assert_eq!(d.body["result"]["supportedVersions"], json!([MODERN]));
    assert_eq!(d.body["result"]["resultType"], "complete");

    let l = modern(&h, &t.access, "tools/list", json!({})).await;
    assert_eq!(l.body["result"]["cacheScope"], "private");
    let names: Vec<&str> = l.body["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    // The ACL of ingest-bot, not the whole registry (warehouse.drop is not on it).
    assert!(
        names.contains(&"warehouse.connect") && names.contains(&"files.read"),
        "{names:?}"
    );
    assert!(!names.contains(&"warehouse.drop"), "{names:?}");
    let connect = l.body["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "warehouse.connect")
        .unwrap();
    assert_eq!(connect["inputSchema"]["required"], json!(["database"]));

    let c = modern(
        &h,
        &t.access,
        "tools/call",
        json!({"name": "warehouse.connect", "arguments": {"database": "analytics"}}),
    )
    .await;
    assert_eq!(c.status, 200, "{}", c.text);
    assert_eq!(c.body["result"]["isError"], false, "{}", c.text);
    assert_eq!(
        c.body["result"]["structuredContent"]["echo"]["database"],
        "analytics"
    );
    assert_eq!(h.upstream_calls(), 1);
    // The same pipeline as REST: the task advanced, the audit has it.
    assert_eq!(h.task(&t.task_id).await["calls"], 1);
}

#[tokio::test]
async fn denial_shapes_follow_section_10() {
    let h = Harness::start().await;
    let t = h.start_task(None).await;
    // Not on the ACL, and unknown: the same -32602 "Unknown tool".
    for tool in ["warehouse.drop", "nope.nothing"] {
        let a = modern(
            &h,
            &t.access,
            "tools/call",
            json!({"name": tool, "arguments": {"table": "x"}}),
        )
        .await;
        assert_eq!(a.body["error"]["code"], -32602, "{}", a.text);
        assert_eq!(a.body["error"]["message"], format!("Unknown tool: {tool}"));
        assert_eq!(a.body["error"]["data"]["reason"], "tool_unknown");
    }
    // The audit keeps the true reasons.
    let reasons: Vec<String> = h
        .audit(&t.task_id)
        .await
        .iter()
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect();
    assert!(
        reasons.contains(&"tool_not_granted".to_owned()),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"tool_unknown".to_owned()), "{reasons:?}");
    // Other denials: a result with isError and the reason in _meta.
    let a = modern(
        &h,
        &t.access,
        "tools/call",
        json!({"name": "warehouse.connect", "arguments": {"database": "prod"}}),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["result"]["isError"], true, "{}", a.text);
    assert_eq!(
        a.body["result"]["_meta"]["portcullis/reason"],
        "policy_forbid"
    );
    assert!(
        a.body["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("denied: policy_forbid: ")
    );
    let a = modern(
        &h,
        &t.access,
        "tools/call",
        json!({"name": "warehouse.insert", "arguments": {"table": "staging_x", "rows": []}}),
    )
    .await;
    assert_eq!(
        a.body["result"]["_meta"]["portcullis/reason"], "state_violation",
        "{}",
        a.text
    );
    let a = modern(
        &h,
        &t.access,
        "tools/call",
        json!({"name": "warehouse.connect", "arguments": {"database": 5}}),
    )
    .await;
    assert_eq!(
        a.body["result"]["_meta"]["portcullis/reason"], "args_invalid",
        "{}",
        a.text
    );
    assert_eq!(h.upstream_calls(), 0, "no denied call reached an upstream");
}

#[tokio::test]
async fn header_mismatch_is_400_with_32020_and_reaches_nothing() {
    let h = Harness::start().await;
    let t = h.start_task(None).await;
    let body = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "warehouse.connect", "arguments": {"database": "a"}, "_meta": meta()}});
    for (method, name) in [
        ("tools/call", "files.read"),
        ("tools/list", "warehouse.connect"),
    ] {
        let r = h
            .client
            .post(h.url("/mcp"))
            .bearer_auth(&t.access)
            .header("mcp-protocol-version", MODERN)
            .header("mcp-method", method)
            .header("mcp-name", name)
            .json(&body)
            .send()
            .await
            .unwrap();
        let a = Answer::read(r).await;
        assert_eq!(a.status, 400, "{}", a.text);
        assert_eq!(a.body["error"]["code"], -32020);
        assert_eq!(a.body["id"], 3);
    }
    // A version header that disagrees with the body's envelope.
    let r = h
        .client
        .post(h.url("/mcp"))
        .bearer_auth(&t.access)
        .header("mcp-protocol-version", "2099-01-01")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "warehouse.connect")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(Answer::read(r).await.body["error"]["code"], -32020);
    assert_eq!(h.upstream_calls(), 0);
}

#[tokio::test]
async fn legacy_sessions_are_bound_to_their_task() {
    let h = Harness::start().await;
    let t = h.start_task(None).await;
    let sid = open_session(&h, &t.access).await;
    let l = legacy_post(
        &h,
        &t.access,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert!(
        l.body["result"]["tools"].as_array().unwrap().len() >= 3,
        "{}",
        l.text
    );
    let p = legacy_post(
        &h,
        &t.access,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "id": 3, "method": "ping"}),
    )
    .await;
    assert_eq!(p.body["result"], json!({}));
    let c = legacy_call(
        &h,
        &t.access,
        &sid,
        "warehouse.connect",
        json!({"database": "a"}),
    )
    .await;
    assert_eq!(c.body["result"]["isError"], false, "{}", c.text);

    // Another task's token on this session: task_mismatch, audited, nothing forwarded.
    let other = h.start_task(None).await;
    let before = h.upstream_calls();
    let m = legacy_call(
        &h,
        &other.access,
        &sid,
        "warehouse.connect",
        json!({"database": "a"}),
    )
    .await;
    assert_eq!(m.status, 403, "{}", m.text);
    assert_eq!(m.error(), "task_mismatch");
    assert_eq!(h.upstream_calls(), before);

    // No session, unknown session.
    let a = legacy_post(
        &h,
        &t.access,
        None,
        &json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}),
    )
    .await;
    assert_eq!(a.status, 400);
    let a = legacy_post(
        &h,
        &t.access,
        Some("mcp_nope"),
        &json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list"}),
    )
    .await;
    assert_eq!(a.status, 404);

    // GET: no server stream. DELETE ends the session.
    let g = h
        .client
        .get(h.url("/mcp"))
        .bearer_auth(&t.access)
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(g.status(), 405);
    let d = h
        .client
        .delete(h.url("/mcp"))
        .bearer_auth(&t.access)
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(d.status(), 200);
    let a = legacy_post(
        &h,
        &t.access,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "id": 5, "method": "ping"}),
    )
    .await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn tokens_origins_and_batches() {
    let h = Harness::start().await;
    let t = h.start_task(None).await;
    // No token: 401 with a challenge, before any JSON-RPC.
    let r = h
        .client
        .post(h.url("/mcp"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("www-authenticate").is_some());
    // A foreign Origin: 403. A loopback one is fine.
    let r = h
        .client
        .post(h.url("/mcp"))
        .bearer_auth(&t.access)
        .header("origin", "http://evil.example")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let sid = {
        let r = h.client.post(h.url("/mcp")).bearer_auth(&t.access).header("origin", "http://localhost:6274")
            .json(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
            .send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.headers()["mcp-session-id"].to_str().unwrap().to_owned()
    };
    // Batches are refused whole.
    let b = legacy_post(&h, &t.access, Some(&sid), &json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "warehouse.connect", "arguments": {"database": "a"}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "warehouse.connect", "arguments": {"database": "b"}}}
    ])).await;
    assert_eq!(b.status, 400);
    assert_eq!(b.body["error"]["code"], -32600);
    // Not JSON.
    let r = h
        .client
        .post(h.url("/mcp"))
        .bearer_auth(&t.access)
        .header("mcp-session-id", &sid)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(Answer::read(r).await.body["error"]["code"], -32700);
    assert_eq!(h.upstream_calls(), 0);
    // Completing the task revokes the token: the session is dead to it.
    let done = h
        .post_json(
            &format!("/v1/tasks/{}/complete", t.task_id),
            Some(&t.access),
            &json!({}),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.text);
    let a = legacy_post(
        &h,
        &t.access,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "id": 9, "method": "ping"}),
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(a.error(), "token_revoked");
}

#[tokio::test]
async fn reverify_rotation_rides_in_meta() {
    let h = Harness::start().await;
    let t = h.start_task(None).await;
    let steps = [
        ("warehouse.connect", json!({"database": "a"})),
        (
            "warehouse.validate",
            json!({"table": "staging_a", "rows": []}),
        ),
        (
            "warehouse.transform",
            json!({"table": "staging_a", "steps": ["trim"]}),
        ),
    ];
    for (tool, args) in steps {
        let a = modern(
            &h,
            &t.access,
            "tools/call",
            json!({"name": tool, "arguments": args}),
        )
        .await;
        assert_eq!(a.body["result"]["isError"], false, "{tool}: {}", a.text);
    }
    // Entering `write` (reverify) rotates every token of the task.
    let a = modern(&h, &t.access, "tools/call", json!({"name": "warehouse.insert", "arguments": {"table": "staging_a", "rows": [{"id": 1}]}})).await;
    assert_eq!(a.body["result"]["isError"], false, "{}", a.text);
    let fresh = a.body["result"]["_meta"]["portcullis/access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let stale = modern(&h, &t.access, "tools/list", json!({})).await;
    assert_eq!(stale.status, 401);
    let ok = modern(&h, &fresh, "tools/list", json!({})).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
}

/// Regression: an upstream's result could carry `_meta` keys in the
/// gateway's namespaces (`portcullis/access_token`, `portcullis/reason`),
/// which clients trust as the gateway's word: `portcullis connect` would
/// switch to a token the upstream chose. The gateway strips them; other
/// `_meta` keys pass.
#[tokio::test]
async fn upstream_meta_in_the_gateway_namespace_is_stripped() {
    let h = Harness::start().await;
    let t = h.start_task(None).await;
    for (tool, args) in [
        ("warehouse.connect", json!({"database": "a"})),
        ("warehouse.validate", json!({"table": "forge", "rows": []})),
    ] {
        let a = modern(
            &h,
            &t.access,
            "tools/call",
            json!({"name": tool, "arguments": args}),
        )
        .await;
        assert_eq!(a.body["result"]["isError"], false, "{tool}: {}", a.text);
        if tool == "warehouse.validate" {
            let meta = a.body["result"]["_meta"].as_object().unwrap();
            assert_eq!(meta["vendor.example/trace"], "kept", "{}", a.text);
            assert!(
                !meta
                    .keys()
                    .any(|k| k.starts_with("portcullis/") || k.starts_with("io.portcullis/")),
                "{}",
                a.text
            );
            assert!(!a.text.contains("forged"), "{}", a.text);
        }
    }
}

// ---- MCP conformance suite regressions (scripts/conformance.sh, docs/mcp-conformance.md) ----

/// server-stateless (SEP-2575): the methods 2026-07-28 removed are "Method
/// not found" on the stateless path — HTTP 404, JSON-RPC -32601, the
/// request's id kept — while the session path still serves `ping`.
#[tokio::test]
async fn conformance_removed_methods_are_404_on_the_stateless_path() {
    let h = Harness::start().await;
    let t = h.start_task(None).await;
    for method in [
        "initialize",
        "ping",
        "logging/setLevel",
        "resources/subscribe",
        "resources/unsubscribe",
    ] {
        let a = modern(&h, &t.access, method, json!({})).await;
        assert_eq!(a.status, 404, "{method}: {}", a.text);
        assert_eq!(a.body["error"]["code"], -32601, "{method}: {}", a.text);
        assert_eq!(a.body["id"], 1, "{method}: {}", a.text);
    }
    let sid = open_session(&h, &t.access).await;
    let p = legacy_post(
        &h,
        &t.access,
        Some(&sid),
        &json!({"jsonrpc": "2.0", "id": 2, "method": "ping"}),
    )
    .await;
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(p.body["result"], json!({}));
    assert_eq!(h.upstream_calls(), 0);
}
