//! Cancellation passes through the gateway to a real stdio upstream: a
//! legacy-era `notifications/cancelled` for a call in flight, and a
//! modern-era client that gives up (closes its request), each make the
//! gateway send `notifications/cancelled` upstream and record the call's
//! outcome as cancelled. The upstream is `slow_server.py` (stdlib Python);
//! the test skips with a notice when python3 is missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use serde_json::{Value, json};

const SECRET: &str = "cancel-test-bootstrap-secret";

fn config(listen: &str, script: &str, log: &str) -> String {
    let sha = portcullis_token::sha256_hex(SECRET.as_bytes());
    format!(
        r#"
[server]
listen = "{listen}"
issuer = "http://{listen}"
[store]
url = "sqlite://ledger.db"
[tokens]
signing_key = "keys/k.ed25519"
[[upstreams]]
name = "slow"
transport = "stdio"
command = ["python3", "{script}", "{log}"]
credential = {{ kind = "none" }}
[[tools]]
name = "slow.slow"
upstream = "slow"
risk = "low"
access = "read"
[[agent_types]]
name = "t"
initial = "work"
states = [ {{ name = "work", tools = ["slow.slow"], next = ["done"] }}, {{ name = "done", final = true }} ]
[[agents]]
id = "bot"
type = "t"
tools = ["slow.slow"]
bootstrap_sha256 = "{sha}"
"#
    )
}

async fn cancelled_ids(log: &std::path::Path, want: usize) -> Vec<String> {
    for _ in 0..100 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let ids: Vec<String> = text.lines().map(str::to_owned).collect();
        if ids.len() >= want {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the upstream saw no cancellation");
}

#[tokio::test]
async fn cancellation_reaches_the_upstream_in_both_eras() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: python3 not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/slow_server.py");
    let log = dir.path().join("cancelled.log");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap().to_string();
    let cfg = dir.path().join("portcullis.toml");
    std::fs::write(&cfg, config(&listen, script, &log.display().to_string())).unwrap();
    portcullis_gateway::run::keygen(&dir.path().join("keys/k.ed25519")).unwrap();
    let (gw, _loaded, _sqlite) = portcullis_gateway::run::build(&cfg).await.unwrap();
    tokio::spawn(portcullis_gateway::serve(
        listener,
        portcullis_gateway::router(gw),
        std::future::pending(),
    ));
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    let started: Value = http
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(SECRET)
        .json(&json!({"agent_id": "bot", "goal": "g"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = started["access_token"].as_str().unwrap().to_owned();

    // Legacy: open a session, start a call, cancel it from another POST.
    let init = http.post(format!("{base}/mcp")).bearer_auth(&token)
        .json(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
        .send().await.unwrap();
    let sid = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let call = {
        let (http, base, token, sid) = (http.clone(), base.clone(), token.clone(), sid.clone());
        tokio::spawn(async move {
            http.post(format!("{base}/mcp")).bearer_auth(&token).header("mcp-session-id", &sid)
                .json(&json!({"jsonrpc": "2.0", "id": 41, "method": "tools/call", "params": {"name": "slow.slow", "arguments": {}}}))
                .send().await.unwrap().json::<Value>().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ack = http.post(format!("{base}/mcp")).bearer_auth(&token).header("mcp-session-id", &sid)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 41, "reason": "user"}}))
        .send().await.unwrap();
    assert_eq!(ack.status(), 202);
    let answer = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    assert!(
        answer["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("cancelled by the client"),
        "{answer}"
    );
    assert_eq!(cancelled_ids(&log, 1).await.len(), 1);

    // Modern: the client gives up on its request; the upstream hears of it.
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let r = short.post(format!("{base}/mcp")).bearer_auth(&token)
        .header("mcp-protocol-version", "2026-07-28").header("mcp-method", "tools/call").header("mcp-name", "slow.slow")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "slow.slow", "arguments": {},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}}))
        .send().await;
    assert!(r.is_err(), "the slow call cannot have answered");
    assert_eq!(cancelled_ids(&log, 2).await.len(), 2);
}
