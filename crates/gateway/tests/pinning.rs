//! Pinning end to end with a real stdio upstream (`mutable_server.py`):
//! first use pins, `notifications/tools/list_changed` with a new
//! description blocks the tool (`tool_definition_changed`, audited, left
//! out of `tools/list`, nothing forwarded), the pinned `inputSchema`
//! checks arguments, and a re-approval (`federation::drift` with
//! `approve`, what `portcullis drift --approve` runs) unblocks the running
//! gateway without a restart. Skips with a notice when python3 is missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use serde_json::{Value, json};

const SECRET: &str = "pinning-test-bootstrap-secret";
const ADMIN: &str = "pinning-test-admin";

fn config(listen: &str, script: &str, state: &str) -> String {
    let sha = portcullis_token::sha256_hex(SECRET.as_bytes());
    let admin = portcullis_token::sha256_hex(ADMIN.as_bytes());
    format!(
        r#"
[server]
listen = "{listen}"
issuer = "http://{listen}"
[store]
url = "sqlite://ledger.db"
[tokens]
signing_key = "keys/k.ed25519"
[[admins]]
name = "ops"
roles = ["admin", "auditor"]
token_sha256 = "{admin}"
[[upstreams]]
name = "m"
transport = "stdio"
command = ["python3", "{script}", "{state}"]
credential = {{ kind = "none" }}
[[tools]]
name = "m.target"
upstream = "m"
risk = "low"
access = "read"
[[tools]]
name = "m.mutate"
upstream = "m"
risk = "low"
access = "read"
[[agent_types]]
name = "t"
initial = "work"
states = [ {{ name = "work", tools = ["m.target", "m.mutate"], next = ["done"] }}, {{ name = "done", final = true }} ]
[[agents]]
id = "bot"
type = "t"
tools = ["m.target", "m.mutate"]
bootstrap_sha256 = "{sha}"
"#
    )
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn rpc(&self, method: &str, params: Value) -> Value {
        let mut params = params;
        params["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}});
        let mut req = self
            .http
            .post(format!("{}/mcp", self.base))
            .bearer_auth(&self.token)
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", method);
        if let Some(n) = params.get("name").and_then(Value::as_str) {
            req = req.header("mcp-name", n);
        }
        req.json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn call(&self, tool: &str, args: Value) -> Value {
        self.rpc("tools/call", json!({"name": tool, "arguments": args}))
            .await["result"]
            .clone()
    }

    async fn listed(&self) -> Vec<String> {
        self.rpc("tools/list", json!({})).await["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

#[tokio::test]
async fn a_changed_definition_is_blocked_until_re_approved() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: python3 not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mutable_server.py");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap().to_string();
    let cfg = dir.path().join("portcullis.toml");
    let state = dir.path().join("server-state.txt");
    std::fs::write(&cfg, config(&listen, script, &state.display().to_string())).unwrap();
    portcullis_gateway::run::keygen(&dir.path().join("keys/k.ed25519")).unwrap();
    let (gw, loaded, _sqlite) = portcullis_gateway::run::build(&cfg).await.unwrap();
    let store = gw.store().clone();
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
    let c = Client {
        http: http.clone(),
        base: base.clone(),
        token: started["access_token"].as_str().unwrap().to_owned(),
    };

    // First use pinned both tools.
    let pins = store.pins().await.unwrap();
    assert_eq!(
        pins.iter().map(|p| p.tool.as_str()).collect::<Vec<_>>(),
        ["m.mutate", "m.target"]
    );
    assert!(pins.iter().all(|p| p.approved_by == "first-use"));
    assert_eq!(c.listed().await, ["m.target", "m.mutate"]);
    let ok = c.call("m.target", json!({"text": "hi"})).await;
    assert_eq!(ok["structuredContent"]["text"], "hi", "{ok}");
    // The pinned inputSchema applies (no args_schema configured).
    let bad = c.call("m.target", json!({"text": 5})).await;
    assert_eq!(bad["_meta"]["portcullis/reason"], "args_invalid", "{bad}");

    // The server changes `target` and says so.
    c.call("m.mutate", json!({})).await;
    let mut blocked = Value::Null;
    for _ in 0..100 {
        blocked = c.call("m.target", json!({"text": "hi"})).await;
        if blocked["_meta"]["portcullis/reason"] == "tool_definition_changed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        blocked["_meta"]["portcullis/reason"], "tool_definition_changed",
        "{blocked}"
    );
    assert!(
        blocked["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("description"),
        "{blocked}"
    );
    assert_eq!(
        c.listed().await,
        ["m.mutate"],
        "a blocked tool is not listed"
    );
    let audit: Value = http
        .get(format!("{base}/v1/audit?kind=anomaly"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let anomalies = audit["records"].as_array().unwrap();
    assert_eq!(
        anomalies.len(),
        1,
        "one change, one anomaly record: {audit}"
    );
    assert_eq!(anomalies[0]["reason"], "tool_definition_changed");

    // drift reports it; approving pins the new definition; the running gateway follows.
    let now = portcullis_core::Clock::now(&portcullis::SystemClock);
    let report = portcullis_gateway::federation::drift(&loaded, store.as_ref(), &[], "ops", now)
        .await
        .unwrap();
    let target = report.iter().find(|l| l.tool == "m.target").unwrap();
    assert_eq!(target.status, "changed");
    assert!(
        target.detail.contains("attacker.example"),
        "{}",
        target.detail
    );
    assert!(target.is_drift());
    let report = portcullis_gateway::federation::drift(
        &loaded,
        store.as_ref(),
        &["m.target".to_owned()],
        "ops",
        now,
    )
    .await
    .unwrap();
    assert_eq!(
        report.iter().find(|l| l.tool == "m.target").unwrap().status,
        "approved"
    );
    assert_eq!(
        store.pin("m.target").await.unwrap().unwrap().approved_by,
        "ops"
    );
    let mut again = Value::Null;
    for _ in 0..60 {
        again = c.call("m.target", json!({"text": "back"})).await;
        if again["structuredContent"]["text"] == "back" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again["structuredContent"]["text"], "back", "{again}");
}
