//! Upstream MCP sessions per task (`session = "per_task"`) against a real
//! stdio server that keeps state per session (`session_server.py`): one
//! task never sees another's session state, a task's session closes when
//! the task ends, and past `max_task_sessions` the least recently used one
//! is closed. The default (`shared`) is shown sharing it, as documented.
//! Skips with a notice when python3 is missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use serde_json::{Value, json};

const SECRET: &str = "sessions-test-bootstrap-secret";

fn config(listen: &str, script: &str) -> String {
    let sha = portcullis_token::sha256_hex(SECRET.as_bytes());
    let mut text = format!(
        r#"
[server]
listen = "{listen}"
issuer = "http://{listen}"
[store]
url = "sqlite://ledger.db"
[tokens]
signing_key = "keys/k.ed25519"
[[upstreams]]
name = "shared"
transport = "stdio"
command = ["python3", "{script}"]
credential = {{ kind = "none" }}
[[upstreams]]
name = "own"
transport = "stdio"
command = ["python3", "{script}"]
credential = {{ kind = "none" }}
session = "per_task"
max_task_sessions = 2
"#
    );
    let names = [
        "shared.remember",
        "shared.recall",
        "own.remember",
        "own.recall",
    ];
    for name in names {
        let upstream = name.split('.').next().unwrap();
        text.push_str(&format!(
            "[[tools]]\nname = \"{name}\"\nupstream = \"{upstream}\"\nrisk = \"low\"\naccess = \"read\"\n"
        ));
    }
    let list = names.map(|n| format!("\"{n}\"")).join(", ");
    text.push_str(&format!(
        r#"[[agent_types]]
name = "t"
initial = "work"
states = [ {{ name = "work", tools = [{list}], next = ["done"] }}, {{ name = "done", final = true }} ]
[[agents]]
id = "bot"
type = "t"
tools = [{list}]
bootstrap_sha256 = "{sha}"
"#
    ));
    text
}

struct Task {
    id: String,
    token: String,
}

struct Gw {
    http: reqwest::Client,
    base: String,
}

impl Gw {
    async fn start(&self) -> Task {
        let v: Value = self
            .http
            .post(format!("{}/v1/tasks", self.base))
            .bearer_auth(SECRET)
            .json(&json!({"agent_id": "bot", "goal": "g"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Task {
            id: v["task_id"].as_str().unwrap().to_owned(),
            token: v["access_token"].as_str().unwrap().to_owned(),
        }
    }

    /// Calls `tool` for `task`; what the session remembered, and its pid.
    async fn call(&self, task: &Task, tool: &str, args: Value) -> (Vec<String>, u64) {
        let r = self
            .http
            .post(format!("{}/v1/tasks/{}/calls", self.base, task.id))
            .bearer_auth(&task.token)
            .json(&json!({"tool": tool, "arguments": args}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let out = &v["result"]["structuredContent"];
        let remembered = out["remembered"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect();
        (remembered, out["pid"].as_u64().unwrap())
    }

    async fn complete(&self, task: &Task) {
        let r = self
            .http
            .post(format!("{}/v1/tasks/{}/complete", self.base, task.id))
            .bearer_auth(&task.token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
}

/// Waits until process `pid` has exited (its session was closed).
async fn gone(pid: u64) -> bool {
    for _ in 0..100 {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "));
        if !alive {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_task_sessions_keep_one_tasks_state_from_another() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: python3 not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/session_server.py");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap().to_string();
    let cfg = dir.path().join("portcullis.toml");
    std::fs::write(&cfg, config(&listen, script)).unwrap();
    portcullis_gateway::run::keygen(&dir.path().join("keys/k.ed25519")).unwrap();
    let (gw, _loaded, _sqlite) = portcullis_gateway::run::build(&cfg).await.unwrap();
    tokio::spawn(portcullis_gateway::serve(
        listener,
        portcullis_gateway::router(gw),
        std::future::pending(),
    ));
    let g = Gw {
        http: reqwest::Client::new(),
        base: format!("http://{listen}"),
    };
    let (a, b) = (g.start().await, g.start().await);

    // Shared (the default): B sees what A left in the session.
    g.call(&a, "shared.remember", json!({"value": "a-secret"}))
        .await;
    let (seen, _) = g.call(&b, "shared.recall", json!({})).await;
    assert_eq!(seen, ["a-secret"]);

    // Per task: B's session is not A's.
    let (_, a_pid) = g
        .call(&a, "own.remember", json!({"value": "a-secret"}))
        .await;
    let (seen, b_pid) = g.call(&b, "own.recall", json!({})).await;
    assert!(seen.is_empty(), "B saw A's state: {seen:?}");
    assert_ne!(a_pid, b_pid);
    let (seen, again) = g.call(&a, "own.recall", json!({})).await;
    assert_eq!((seen, again), (vec!["a-secret".to_owned()], a_pid));

    // A's session ends with A.
    g.complete(&a).await;
    assert!(gone(a_pid).await, "A's session process {a_pid} outlived A");

    // At most two task sessions: a third and fourth task push out B, the
    // least recently used; B's next call opens a fresh session.
    let (c, d) = (g.start().await, g.start().await);
    g.call(&b, "own.remember", json!({"value": "b"})).await;
    let (_, c_pid) = g.call(&c, "own.recall", json!({})).await;
    let (_, d_pid) = g.call(&d, "own.recall", json!({})).await;
    assert!(gone(b_pid).await, "B's session was not evicted");
    let (seen, fresh) = g.call(&b, "own.recall", json!({})).await;
    assert!(seen.is_empty(), "{seen:?}");
    assert!(![b_pid, c_pid, d_pid].contains(&fresh));
}
