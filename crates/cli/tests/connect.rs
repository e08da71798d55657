//! `portcullis connect`: a stdio MCP server in front of a real gateway's
//! `/mcp` (the real binary twice: `serve` with the demo upstream, and
//! `connect` speaking newline-delimited JSON-RPC on its stdin/stdout).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{BIN, BOOTSTRAP, free_port, portcullis, start_server, write_config};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct Stdio2 {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Stdio2 {
    async fn send(&mut self, v: Value) {
        self.stdin
            .write_all(format!("{v}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn recv(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .expect("an answer in time")
            .unwrap()
            .expect("a line");
        serde_json::from_str(&line).unwrap()
    }
}

#[tokio::test]
async fn a_stdio_client_reaches_the_gateway_in_both_eras() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(dir.path(), &listen, "");
    assert!(
        portcullis(dir.path(), &["keygen", "--out", "keys/k1.ed25519"])
            .status
            .success()
    );
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    let _server = start_server(dir.path(), &base, &http, "serve.log").await;
    let task: Value = http
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(BOOTSTRAP)
        .json(&json!({"agent_id": "ingest-bot", "goal": "g"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = task["access_token"].as_str().unwrap();

    let mut child = tokio::process::Command::new(BIN)
        .args(["connect", "--url", &format!("{base}/mcp")])
        .env("PORTCULLIS_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut io = Stdio2 {
        stdin: child.stdin.take().unwrap(),
        lines: BufReader::new(child.stdout.take().unwrap()).lines(),
        child,
    };
    // Legacy: initialize opens a session through the bridge.
    io.send(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "desk", "version": "1"}}})).await;
    let init = io.recv().await;
    assert_eq!(init["result"]["protocolVersion"], "2025-11-25", "{init}");
    io.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    io.send(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .await;
    let list = io.recv().await;
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["warehouse.connect", "warehouse.query"], "{list}");
    io.send(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "warehouse.connect", "arguments": {"database": "analytics"}}})).await;
    let call = io.recv().await;
    assert_eq!(call["id"], 3);
    assert_eq!(call["result"]["isError"], false, "{call}");
    // A denial keeps its MCP shape through the bridge.
    io.send(json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "warehouse.query", "arguments": {"sql": "SELECT * FROM customers"}}})).await;
    let denied = io.recv().await;
    assert_eq!(
        denied["result"]["_meta"]["portcullis/reason"], "policy_forbid",
        "{denied}"
    );
    // Modern: a request carrying the 2026-07-28 envelope goes stateless.
    io.send(json!({"jsonrpc": "2.0", "id": 5, "method": "server/discover", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}})).await;
    let discover = io.recv().await;
    assert_eq!(
        discover["result"]["supportedVersions"],
        json!(["2026-07-28"]),
        "{discover}"
    );
    // Completing the task revokes the token: the bridge turns the 401 into a JSON-RPC error.
    let done = http
        .post(format!(
            "{base}/v1/tasks/{}/complete",
            task["task_id"].as_str().unwrap()
        ))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    io.send(json!({"jsonrpc": "2.0", "id": 6, "method": "tools/list"}))
        .await;
    let refused = io.recv().await;
    assert_eq!(refused["id"], 6);
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token_revoked"),
        "{refused}"
    );
    drop(io.stdin);
    let status = tokio::time::timeout(Duration::from_secs(10), io.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}
