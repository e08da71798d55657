//! `portcullis demo-server` as a real process: over stdio in both eras,
//! with `--drift` and `--root`, over `--http`, and against the official MCP
//! Python SDK when it is installed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::{BIN, Server, free_port};

const MODERN: &str = "2026-07-28";

fn modern_meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "cli-test", "version": "1"},
    })
}

/// A demo server on stdio; killed on drop if still running.
struct StdioPeer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl StdioPeer {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .arg("demo-server")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn send(&mut self, message: &Value) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{message}").unwrap();
        stdin.flush().unwrap();
    }

    /// Sends a request and returns its answer (the next line on stdout).
    fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(20))
            .expect("an answer on stdout");
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["jsonrpc"], "2.0", "{line}");
        assert_eq!(answer["id"], id, "{line}");
        answer
    }

    /// Closes stdin and waits for a clean exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "demo-server exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "demo-server did not exit on EOF");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for StdioPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn stdio_speaks_both_eras() {
    let mut p = StdioPeer::start(&["warehouse"]);

    // Legacy: initialize, initialized, tools/list, tools/call.
    let init = p.call(
        1,
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}),
    );
    assert_eq!(init["result"]["protocolVersion"], "2025-11-25");
    assert_eq!(
        init["result"]["serverInfo"]["name"],
        "portcullis-demo-warehouse"
    );
    assert_eq!(init["result"]["capabilities"]["tools"]["listChanged"], true);
    p.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    let list = p.call(2, "tools/list", json!({}));
    let tools = list["result"]["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 6);
    for t in tools {
        assert_eq!(t["inputSchema"]["additionalProperties"], false, "{t}");
        assert!(t["annotations"].is_object(), "{t}");
    }
    let echo = p.call(
        3,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "over stdio"}}),
    );
    assert_eq!(echo["result"]["content"][0]["text"], "over stdio");
    assert_eq!(echo["result"]["isError"], false);
    let query = p.call(
        4,
        "tools/call",
        json!({"name": "query", "arguments": {"sql": "SELECT region, count(*) AS n FROM customers GROUP BY region ORDER BY region"}}),
    );
    assert_eq!(query["result"]["structuredContent"]["row_count"], 3);
    let refused = p.call(
        5,
        "tools/call",
        json!({"name": "query", "arguments": {"sql": "DELETE FROM customers"}}),
    );
    assert_eq!(refused["result"]["isError"], true);
    let unknown = p.call(6, "tools/call", json!({"name": "rm", "arguments": {}}));
    assert_eq!(unknown["error"]["code"], -32602);
    assert_eq!(unknown["error"]["message"], "Unknown tool: rm");

    // Modern: discover and call, each request with its envelope.
    let discover = p.call(7, "server/discover", json!({"_meta": modern_meta()}));
    assert_eq!(discover["result"]["supportedVersions"], json!([MODERN]));
    assert_eq!(discover["result"]["resultType"], "complete");
    assert_eq!(
        discover["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "portcullis-demo-warehouse"
    );
    let echo = p.call(
        8,
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "modern"}, "_meta": modern_meta()}),
    );
    assert_eq!(echo["result"]["content"][0]["text"], "modern");
    assert_eq!(echo["result"]["resultType"], "complete");
    let list = p.call(9, "tools/list", json!({"_meta": modern_meta()}));
    assert_eq!(list["result"]["ttlMs"], 0);
    assert_eq!(list["result"]["cacheScope"], "private");

    // A discover without its envelope gets the envelope error.
    let bare = p.call(10, "server/discover", json!({}));
    assert_eq!(bare["error"]["code"], -32602);

    p.finish();
}

#[test]
fn drift_changes_the_query_description() {
    let description = |args: &[&str]| {
        let mut p = StdioPeer::start(args);
        let list = p.call(1, "tools/list", json!({"_meta": modern_meta()}));
        p.finish();
        list["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "query")
            .unwrap()["description"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let plain = description(&["warehouse"]);
    let drifted = description(&["warehouse", "--drift"]);
    assert_ne!(plain, drifted);
    assert!(drifted.contains("Also accepts DELETE statements."));
}

#[test]
fn files_are_rooted_and_the_database_can_be_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/in.csv"), "id,name\n1,a\n").unwrap();
    std::fs::write(dir.path().join("secret"), "no").unwrap();

    let mut p = StdioPeer::start(&["files", "--root", root.to_str().unwrap()]);
    let read = p.call(
        1,
        "tools/call",
        json!({"name": "read", "arguments": {"path": "/data/in.csv"}}),
    );
    assert_eq!(read["result"]["content"][0]["text"], "id,name\n1,a\n");
    let escape = p.call(
        2,
        "tools/call",
        json!({"name": "read", "arguments": {"path": "/../secret"}}),
    );
    assert_eq!(escape["result"]["isError"], true);
    let list = p.call(
        3,
        "tools/call",
        json!({"name": "list", "arguments": {"path": "/data"}}),
    );
    assert_eq!(list["result"]["content"][0]["text"], "in.csv\n");
    p.finish();

    let db = dir.path().join("w.db");
    let mut p = StdioPeer::start(&["warehouse", "--db", db.to_str().unwrap()]);
    let insert = p.call(
        1,
        "tools/call",
        json!({"name": "insert", "arguments": {"table": "staging_customers", "rows": [{"id": 7, "name": "kept"}]}}),
    );
    assert_eq!(insert["result"]["structuredContent"]["inserted"], 1);
    p.finish();
    let mut p = StdioPeer::start(&["warehouse", "--db", db.to_str().unwrap()]);
    let rows = p.call(
        1,
        "tools/call",
        json!({"name": "query", "arguments": {"sql": "SELECT name FROM staging_customers"}}),
    );
    assert_eq!(
        rows["result"]["structuredContent"]["rows"],
        json!([{"name": "kept"}])
    );
    p.finish();
}

/// Starts `demo-server warehouse --http` on a free port and waits for it.
fn start_http() -> (Server, String) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(BIN)
        .args(["demo-server", "warehouse", "--http", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "demo-server --http did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, format!("http://{addr}/mcp"))
}

#[test]
fn http_flag_serves_streamable_http() {
    let (_server, url) = start_http();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let resp = http
            .post(&url)
            .header("mcp-protocol-version", MODERN)
            .header("mcp-method", "tools/call")
            .header("mcp-name", "echo")
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "http"}, "_meta": modern_meta()}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["result"]["content"][0]["text"], "http");

        // The body names another tool than the header: -32020, HTTP 400.
        let resp = http
            .post(&url)
            .header("mcp-protocol-version", MODERN)
            .header("mcp-method", "tools/call")
            .header("mcp-name", "echo")
            .json(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "insert", "arguments": {}, "_meta": modern_meta()}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], -32020);
    });
}

/// Whether `python3` with the `mcp` SDK is installed.
fn python_sdk() -> bool {
    Command::new("python3")
        .args(["-c", "import mcp.client.client, mcp.client.stdio"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn official_python_sdk_talks_to_it() {
    if !python_sdk() {
        eprintln!("skipped: python3 with the `mcp` package is not installed");
        return;
    }
    let (_server, url) = start_http();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/demo_server_py.py");
    let mut child = Command::new("python3")
        .args([script, BIN, &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes as the script runs, so a chatty logger cannot block it.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the Python SDK check timed out");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        status.success(),
        "python SDK check failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for label in [
        "stdio/legacy",
        "http/legacy",
        "stdio/2026-07-28",
        "http/2026-07-28",
        "stdio/auto",
        "http/auto",
    ] {
        assert!(
            stdout.contains(&format!("ok {label} ")),
            "{label}: {stdout}"
        );
    }
}
