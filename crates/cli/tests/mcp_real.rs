//! The real `portcullis serve` binary in front of REAL MCP servers, talked to
//! by REAL MCP clients.
//!
//! Servers (from npm and PyPI, installed by `.ci/run`): the reference
//! filesystem, memory and everything (Streamable HTTP) servers, and
//! `mcp-server-git` and `mcp-server-time`. For each one, through `/mcp`:
//!
//! 1. `tools/list` shows only the agent's ACL, under `<upstream>.<tool>`,
//!    though the server advertises more;
//! 2. an allowed call returns the server's real answer (and has its real
//!    effect: a file on disk, a staged file, a fetched URL);
//! 3. a denied call never reaches the server, shown by an effect that would
//!    be visible had it gone through (no file, nothing staged, no entity, no
//!    request on a listener) and by the audit log;
//! 4. (time server) pinning: the same ledger behind a server whose tool
//!    definitions changed blocks the tool (`tool_definition_changed`) until
//!    `portcullis drift --approve` re-approves it, which the running gateway
//!    notices by itself.
//!
//! Clients: the `mcp` Python SDK (2.x) in both eras and the MCP Inspector CLI
//! list, call and get denied through the gateway.
//!
//! Every test prints `SKIP: …` and passes when a part it needs is missing.
//! `PORTCULLIS_NPM_DIR` (default `/var/tmp/portcullis-npm`) holds the npm
//! packages; the PyPI ones are found on `PATH`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::{ADMIN, BIN, BOOTSTRAP, BOOTSTRAP_SHA256, Server, free_port, portcullis};

/// A second agent's bootstrap secret and its SHA-256.
const READER: &str = "mcp-real-reader-secret";
const READER_SHA256: &str = "ddfa1f23df21e1339e6a930f2c7a3f78649825afc032e6de26d22a72f7f17a35";
const MODERN: &str = "2026-07-28";
/// How long a gateway (or an upstream) may take to come up.
const STARTUP: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------
// What is installed

fn npm_dir() -> PathBuf {
    std::env::var_os("PORTCULLIS_NPM_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp/portcullis-npm"), PathBuf::from)
}

/// `dist/index.js` of an `@modelcontextprotocol/<package>` server.
fn npm_server(package: &str) -> Option<String> {
    let p = npm_dir()
        .join("node_modules/@modelcontextprotocol")
        .join(package)
        .join("dist/index.js");
    if p.exists() && found("node", "install Node.js") {
        Some(p.display().to_string())
    } else {
        if !p.exists() {
            eprintln!(
                "SKIP: @modelcontextprotocol/{package} not installed under {} (run .ci/run)",
                npm_dir().display()
            );
        }
        None
    }
}

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

fn found(program: &str, hint: &str) -> bool {
    let ok = on_path(program);
    if !ok {
        eprintln!("SKIP: {program} not on PATH ({hint})");
    }
    ok
}

/// The `mcp` Python SDK, 2.x (the `Client(mode=…)` API).
fn python_sdk() -> bool {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata as m, mcp.client.client, mcp.client.streamable_http; \
             assert m.version('mcp').split('.')[0] == '2'",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: the mcp 2.x Python SDK is not importable by python3 (pip install mcp)");
    }
    ok
}

/// The Inspector CLI's entry point (`inspector-cli/build/index.js`: the
/// `--cli` mode of `@modelcontextprotocol/inspector` runs exactly it).
fn inspector_cli() -> Option<PathBuf> {
    let base = npm_dir().join("node_modules/@modelcontextprotocol");
    let entry = [
        "inspector-cli/build/index.js",
        "inspector/cli/build/index.js",
    ]
    .iter()
    .map(|p| base.join(p))
    .find(|p| p.exists());
    if entry.is_none() {
        eprintln!(
            "SKIP: the MCP Inspector CLI is not installed under {} (run .ci/run)",
            npm_dir().display()
        );
    }
    entry.filter(|_| found("node", "install Node.js"))
}

// ---------------------------------------------------------------------------
// Configuration

struct ToolSpec {
    name: &'static str,
    access: &'static str,
    /// An explicit `args_schema` (TOML inline table); `None`: the upstream's
    /// pinned `inputSchema` applies. Cedar sees `context.args` fields only
    /// through an explicit schema, so the tools a policy reads have one.
    schema: Option<&'static str>,
}

const fn read(name: &'static str) -> ToolSpec {
    ToolSpec {
        name,
        access: "read",
        schema: None,
    }
}

const fn write(name: &'static str) -> ToolSpec {
    ToolSpec {
        name,
        access: "write",
        schema: None,
    }
}

const fn with_schema(mut t: ToolSpec, schema: &'static str) -> ToolSpec {
    t.schema = Some(schema);
    t
}

struct AgentSpec {
    id: &'static str,
    bootstrap_sha256: &'static str,
    acl: &'static [&'static str],
}

/// A TOML basic string (JSON's escapes are TOML's).
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn stdio_upstream(name: &str, command: &[&str]) -> String {
    let command: Vec<String> = command.iter().map(|c| q(c)).collect();
    format!(
        "[[upstreams]]\nname = {}\ntransport = \"stdio\"\ncommand = [{}]\ncredential = {{ kind = \"none\" }}\n",
        q(name),
        command.join(", ")
    )
}

fn http_upstream(name: &str, url: &str) -> String {
    format!(
        "[[upstreams]]\nname = {}\ntransport = \"http\"\nurl = {}\ncredential = {{ kind = \"jwt\" }}\n",
        q(name),
        q(url)
    )
}

/// One agent type (`work` allows every tool, then `done`), the given
/// upstreams, tools, agents and Cedar policies.
fn write_config(
    dir: &Path,
    listen: &str,
    upstreams: &str,
    tools: &[ToolSpec],
    agents: &[AgentSpec],
    cedar: &str,
) {
    let mut c = format!(
        r#"[server]
listen = "{listen}"
issuer = "http://{listen}"

[store]
url = "sqlite://ledger.db"

[tokens]
access_ttl = "10m"
refresh_idle_ttl = "30m"
task_max_lifetime = "8h"
signing_key = "keys/k1.ed25519"

[[admins]]
name = "ops"
roles = ["admin", "auditor"]
token_sha256 = "{}"

{upstreams}
"#,
        common::ADMIN_SHA256
    );
    for t in tools {
        let upstream = t.name.split('.').next().unwrap();
        let risk = if t.access == "write" { "high" } else { "low" };
        c += &format!(
            "[[tools]]\nname = {}\nupstream = {}\nrisk = \"{risk}\"\naccess = \"{}\"\n",
            q(t.name),
            q(upstream),
            t.access
        );
        if let Some(s) = t.schema {
            c += &format!("args_schema = {s}\n");
        }
        c += "\n";
    }
    let all: Vec<String> = tools.iter().map(|t| q(t.name)).collect();
    c += &format!(
        "[[agent_types]]\nname = \"worker\"\ninitial = \"work\"\nstates = [\n  {{ name = \"work\", tools = [{}], next = [\"done\"] }},\n  {{ name = \"done\", final = true }},\n]\n\n",
        all.join(", ")
    );
    for a in agents {
        let acl: Vec<String> = a.acl.iter().map(|t| q(t)).collect();
        c += &format!(
            "[[agents]]\nid = {}\ntype = \"worker\"\ntools = [{}]\nbootstrap_sha256 = \"{}\"\n\n",
            q(a.id),
            acl.join(", "),
            a.bootstrap_sha256
        );
    }
    if !cedar.is_empty() {
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("policies/rules.cedar"), cedar).unwrap();
        c += "[policies]\ncedar = [\"policies/*.cedar\"]\n";
    }
    std::fs::write(dir.join("portcullis.toml"), c).unwrap();
    // The configuration, its policies included, is valid as written.
    let out = portcullis(dir, &["check", "--config", "portcullis.toml"]);
    assert!(
        out.status.success(),
        "check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn keygen(dir: &Path) {
    let out = portcullis(dir, &["keygen", "--out", "keys/k1.ed25519"]);
    assert!(out.status.success(), "keygen: {out:?}");
}

/// Runs a command, killed (and the test failed) after `limit`.
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    // Drain the pipes on threads so a chatty child cannot block.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `portcullis drift --config portcullis.toml [--approve T]`, run in `dir`
/// (a relative config path: the regression case of an empty base
/// directory). Returns the exit code and `(tool, status, detail)` lines.
fn drift(dir: &Path, approve: Option<&str>) -> (i32, Vec<(String, String, String)>) {
    let mut cmd = Command::new(BIN);
    cmd.args(["drift", "--config", "portcullis.toml"])
        .current_dir(dir);
    if let Some(t) = approve {
        cmd.args(["--approve", t]);
    }
    let out = run_within(&mut cmd, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split_whitespace();
            let tool = parts.next().unwrap_or_default().to_owned();
            let status = parts.next().unwrap_or_default().to_owned();
            let detail = parts.collect::<Vec<_>>().join(" ");
            (tool, status, detail)
        })
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

fn drift_status<'a>(lines: &'a [(String, String, String)], tool: &str) -> (&'a str, &'a str) {
    let l = lines
        .iter()
        .find(|l| l.0 == tool)
        .unwrap_or_else(|| panic!("no drift line for {tool}: {lines:?}"));
    (l.1.as_str(), l.2.as_str())
}

// ---------------------------------------------------------------------------
// The gateway and a small MCP client of our own (2026-07-28, stateless)

struct Gateway {
    dir: PathBuf,
    base: String,
    http: reqwest::Client,
    /// The `serve` process, killed when the gateway is dropped.
    _server: Server,
}

struct Task {
    id: String,
    token: String,
}

impl Gateway {
    /// `portcullis serve --config portcullis.toml` in `dir` (a relative
    /// config path on purpose: stdio upstreams must start from it).
    async fn start(dir: &Path, listen: &str, log: &str) -> Self {
        let base = format!("http://{listen}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let server = common::start_server_within(
            dir,
            Path::new("portcullis.toml"),
            &base,
            &http,
            log,
            STARTUP,
        )
        .await;
        Self {
            dir: dir.to_path_buf(),
            base,
            http,
            _server: server,
        }
    }

    fn log(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                all += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        all
    }

    async fn task(&self, agent: &str, secret: &str) -> Task {
        let r = self
            .http
            .post(format!("{}/v1/tasks", self.base))
            .bearer_auth(secret)
            .json(&json!({ "agent_id": agent, "goal": "real MCP servers" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        Task {
            id: v["task_id"].as_str().unwrap().to_owned(),
            token: v["access_token"].as_str().unwrap().to_owned(),
        }
    }

    async fn audit(&self, task: &Task) -> Vec<Value> {
        let r = self
            .http
            .get(format!(
                "{}/v1/audit?task_id={}&limit=1000",
                self.base, task.id
            ))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        v["records"].as_array().unwrap().clone()
    }

    /// One stateless (2026-07-28) JSON-RPC request to `/mcp`; the response
    /// body.
    async fn rpc(&self, task: &Task, method: &str, mut params: Value) -> Value {
        params["_meta"] = json!({
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
        });
        let mut req = self
            .http
            .post(format!("{}/mcp", self.base))
            .bearer_auth(&task.token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", MODERN)
            .header("mcp-method", method);
        if let Some(name) = params.get("name").and_then(Value::as_str) {
            req = req.header("mcp-name", name);
        }
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let r = req.json(&body).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method}: HTTP {status}: {text}\n{}", self.log()));
        // The stateless era answers a result with 200 and an invalid-params
        // error (such as "Unknown tool") with 400.
        let expected = if v.get("result").is_some() { 200 } else { 400 };
        assert_eq!(
            status.as_u16(),
            expected,
            "{method}: {text}\n{}",
            self.log()
        );
        v
    }

    async fn tools(&self, task: &Task) -> Vec<Value> {
        let v = self.rpc(task, "tools/list", json!({})).await;
        assert_eq!(v["result"]["cacheScope"], "private", "{v}");
        v["result"]["tools"].as_array().unwrap().clone()
    }

    async fn tool_names(&self, task: &Task) -> BTreeSet<String> {
        self.tools(task)
            .await
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn call(&self, task: &Task, tool: &str, arguments: Value) -> Value {
        self.rpc(
            task,
            "tools/call",
            json!({ "name": tool, "arguments": arguments }),
        )
        .await
    }

    /// An allowed call: its `CallToolResult`.
    async fn call_ok(&self, task: &Task, tool: &str, arguments: Value) -> Value {
        let v = self.call(task, tool, arguments).await;
        let r = &v["result"];
        assert!(
            r.is_object() && r["isError"] != true,
            "{tool} should succeed: {v}\n{}",
            self.log()
        );
        r.clone()
    }
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// All the text of a `CallToolResult`.
fn text_of(result: &Value) -> String {
    result["content"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// DESIGN section 10: a denial other than "unknown tool" is a result with
/// `isError`, `denied: <reason>: …` and `_meta["portcullis/reason"]`.
fn assert_denied(v: &Value, reason: &str) {
    let r = &v["result"];
    assert_eq!(r["isError"], true, "{v}");
    assert_eq!(r["_meta"]["portcullis/reason"], reason, "{v}");
    assert!(
        text_of(r).starts_with(&format!("denied: {reason}: ")),
        "{v}"
    );
}

/// A tool not on the ACL: -32602 `Unknown tool: NAME`, as for a tool that
/// does not exist.
fn assert_unknown_tool(v: &Value, tool: &str) {
    assert_eq!(v["error"]["code"], -32602, "{v}");
    assert_eq!(
        v["error"]["message"],
        format!("Unknown tool: {tool}"),
        "{v}"
    );
    assert_eq!(v["error"]["data"]["reason"], "tool_unknown", "{v}");
    assert!(v.get("result").is_none(), "{v}");
}

fn records<'a>(audit: &'a [Value], kind: &str, tool: &str) -> Vec<&'a Value> {
    audit
        .iter()
        .filter(|r| r["kind"] == kind && r["tool"] == tool)
        .collect()
}

fn git(repo: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .args(args)
        .current_dir(repo)
        .output()
        .unwrap()
}

/// Waits until something accepts TCP connections on `port`.
async fn wait_for_port(port: u16, what: &str, child: &mut Server, log: &Path) {
    let started = Instant::now();
    while started.elapsed() < STARTUP {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "{what} exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not listen on {port} within {STARTUP:?}");
}

/// A plain HTTP server on a thread that answers every GET with a small
/// text body and records the request lines it saw.
fn fetch_recorder() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).into_owned();
            log.lock()
                .unwrap()
                .push(head.lines().next().unwrap_or_default().to_owned());
            let body = "fetched through portcullis\n";
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    (port, seen)
}

// ---------------------------------------------------------------------------
// The servers

const FS_WRITE_SCHEMA: &str = r#"{ type = "object", properties = { path = { type = "string" }, content = { type = "string" } }, required = ["path", "content"], additionalProperties = false }"#;
const FS_POLICY: &str = r#"
@id("no-secret-files")
forbid(principal, action, resource == Tool::"fs.write_file")
when { context.args.path like "*secret*" };
"#;

/// The filesystem server's tools, of which the agent gets three.
fn fs_tools() -> Vec<ToolSpec> {
    vec![
        read("fs.read_text_file"),
        read("fs.list_directory"),
        with_schema(write("fs.write_file"), FS_WRITE_SCHEMA),
        write("fs.move_file"),
    ]
}

const FS_AGENT: AgentSpec = AgentSpec {
    id: "fs-bot",
    bootstrap_sha256: BOOTSTRAP_SHA256,
    acl: &["fs.read_text_file", "fs.list_directory", "fs.write_file"],
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_server() {
    let Some(script) = npm_server("server-filesystem") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let root = root.canonicalize().unwrap();
    std::fs::write(
        root.join("hello.txt"),
        "hello from the real filesystem server\n",
    )
    .unwrap();
    keygen(dir);
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(
        dir,
        &listen,
        &stdio_upstream("fs", &["node", &script, &root.display().to_string()]),
        &fs_tools(),
        &[FS_AGENT],
        FS_POLICY,
    );
    let gw = Gateway::start(dir, &listen, "serve.log").await;
    let t = gw.task("fs-bot", BOOTSTRAP).await;

    // 1. Filtered: the ACL's three of the server's fourteen tools, with the
    // server's own definitions (pinned), under gateway names.
    let tools = gw.tools(&t).await;
    let listed: BTreeSet<String> = tools
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        listed,
        names(&["fs.list_directory", "fs.read_text_file", "fs.write_file"])
    );
    let read_def = tools
        .iter()
        .find(|t| t["name"] == "fs.read_text_file")
        .unwrap();
    assert!(
        read_def["description"]
            .as_str()
            .unwrap()
            .contains("complete contents of a file"),
        "{read_def}"
    );
    assert_eq!(
        read_def["inputSchema"]["properties"]["path"]["type"],
        "string"
    );

    // 2. Allowed: the file's real content; a real write lands on disk.
    let hello = root.join("hello.txt").display().to_string();
    let r = gw
        .call_ok(&t, "fs.read_text_file", json!({ "path": hello }))
        .await;
    assert_eq!(
        text_of(&r),
        "hello from the real filesystem server\n",
        "{r}"
    );
    let notes = root.join("notes.txt");
    gw.call_ok(
        &t,
        "fs.write_file",
        json!({ "path": notes.display().to_string(), "content": "written via the gateway" }),
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "written via the gateway"
    );

    // 3. Denied by policy: the file is never written.
    let secret = root.join("secret.txt");
    let v = gw
        .call(
            &t,
            "fs.write_file",
            json!({ "path": secret.display().to_string(), "content": "exfiltrated" }),
        )
        .await;
    assert_denied(&v, "policy_forbid");
    assert!(!secret.exists(), "a denied write reached the server");
    // Not on the ACL (though registered): unknown, and nothing moved.
    let v = gw
        .call(
            &t,
            "fs.move_file",
            json!({ "source": hello, "destination": root.join("moved.txt").display().to_string() }),
        )
        .await;
    assert_unknown_tool(&v, "fs.move_file");
    assert!(root.join("hello.txt").exists() && !root.join("moved.txt").exists());
    // Arguments that break the server's pinned inputSchema never leave
    // the gateway either.
    let v = gw
        .call(&t, "fs.read_text_file", json!({ "path": 42 }))
        .await;
    assert_denied(&v, "args_invalid");
    // The real listing agrees: two files, no secret.
    let r = gw
        .call_ok(
            &t,
            "fs.list_directory",
            json!({ "path": root.display().to_string() }),
        )
        .await;
    let listing = text_of(&r);
    assert!(
        listing.contains("hello.txt") && listing.contains("notes.txt"),
        "{listing}"
    );
    assert!(!listing.contains("secret"), "{listing}");

    let audit = gw.audit(&t).await;
    let denied = records(&audit, "call.denied", "fs.write_file");
    assert_eq!(denied.len(), 1, "{audit:?}");
    assert_eq!(denied[0]["reason"], "policy_forbid");
    assert_eq!(denied[0]["policy_ids"], json!(["no-secret-files"]));
    assert_eq!(records(&audit, "call.completed", "fs.write_file").len(), 1);
    assert_eq!(
        records(&audit, "call.denied", "fs.move_file")[0]["reason"],
        "tool_not_granted",
        "the audit keeps the true reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_server() {
    let Some(script) = npm_server("server-memory") else {
        return;
    };
    if !found("env", "coreutils") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let memory_file = dir.join("memory.jsonl");
    keygen(dir);
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(
        dir,
        &listen,
        &stdio_upstream(
            "memory",
            &[
                "env",
                &format!("MEMORY_FILE_PATH={}", memory_file.display()),
                "node",
                &script,
            ],
        ),
        &[
            write("memory.create_entities"),
            read("memory.read_graph"),
            read("memory.search_nodes"),
        ],
        &[
            AgentSpec {
                id: "writer",
                bootstrap_sha256: BOOTSTRAP_SHA256,
                acl: &["memory.create_entities", "memory.read_graph"],
            },
            AgentSpec {
                id: "reader",
                bootstrap_sha256: READER_SHA256,
                acl: &["memory.read_graph", "memory.search_nodes"],
            },
        ],
        "",
    );
    let gw = Gateway::start(dir, &listen, "serve.log").await;
    let reader = gw.task("reader", READER).await;
    let writer = gw.task("writer", BOOTSTRAP).await;

    // 1. Each agent sees its own ACL of the server's nine tools.
    assert_eq!(
        gw.tool_names(&reader).await,
        names(&["memory.read_graph", "memory.search_nodes"])
    );
    assert_eq!(
        gw.tool_names(&writer).await,
        names(&["memory.create_entities", "memory.read_graph"])
    );

    // 3. The reader may not create: unknown tool, and nothing is created.
    let entity = |name: &str| json!({ "entities": [{ "name": name, "entityType": "person", "observations": ["seen in mcp_real"] }] });
    let v = gw
        .call(&reader, "memory.create_entities", entity("Mallory"))
        .await;
    assert_unknown_tool(&v, "memory.create_entities");

    // 2. The writer may: the server's real answer, then its real graph.
    let r = gw
        .call_ok(&writer, "memory.create_entities", entity("Alice"))
        .await;
    assert!(r.to_string().contains("Alice"), "{r}");
    let graph = gw.call_ok(&reader, "memory.read_graph", json!({})).await;
    let entities: Vec<&str> = graph["structuredContent"]["entities"]
        .as_array()
        .unwrap_or_else(|| panic!("{graph}"))
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        entities,
        ["Alice"],
        "only the allowed create reached the server: {graph}"
    );
    let found = gw
        .call_ok(
            &reader,
            "memory.search_nodes",
            json!({ "query": "Mallory" }),
        )
        .await;
    assert_eq!(found["structuredContent"]["entities"], json!([]), "{found}");
    let stored = std::fs::read_to_string(&memory_file).unwrap();
    assert!(
        stored.contains("Alice") && !stored.contains("Mallory"),
        "{stored}"
    );

    let audit = gw.audit(&reader).await;
    let denied = records(&audit, "call.denied", "memory.create_entities");
    assert_eq!(denied.len(), 1, "{audit:?}");
    assert_eq!(denied[0]["reason"], "tool_not_granted");
    assert!(records(&audit, "call.allowed", "memory.create_entities").is_empty());
}

const GZIP_SCHEMA: &str = r#"{ type = "object", properties = { name = { type = "string" }, data = { type = "string" }, outputType = { type = "string", enum = ["resourceLink", "resource"] } }, required = ["data"], additionalProperties = false }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_server_over_streamable_http() {
    let Some(script) = npm_server("server-everything") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The upstream: its own process, Streamable HTTP (answers in SSE).
    let port = free_port();
    let up_log = dir.join("everything.log");
    let f = std::fs::File::create(&up_log).unwrap();
    let mut upstream = Server(
        Command::new("node")
            .args([script.as_str(), "streamableHttp"])
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap(),
    );
    wait_for_port(port, "server-everything", &mut upstream, &up_log).await;
    // Where its gzip tool fetches from: a listener that records requests.
    let (fetch_port, fetched) = fetch_recorder();

    keygen(dir);
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(
        dir,
        &listen,
        &http_upstream("everything", &format!("http://127.0.0.1:{port}/mcp")),
        &[
            read("everything.echo"),
            read("everything.get-sum"),
            with_schema(write("everything.gzip-file-as-resource"), GZIP_SCHEMA),
        ],
        &[AgentSpec {
            id: "bot",
            bootstrap_sha256: BOOTSTRAP_SHA256,
            acl: &["everything.echo", "everything.gzip-file-as-resource"],
        }],
        r#"
@id("no-forbidden-fetches")
forbid(principal, action, resource == Tool::"everything.gzip-file-as-resource")
when { context.args.data like "*forbidden*" };
"#,
    );
    let gw = Gateway::start(dir, &listen, "serve.log").await;
    let t = gw.task("bot", BOOTSTRAP).await;

    // 1. Two of the server's thirteen tools.
    assert_eq!(
        gw.tool_names(&t).await,
        names(&["everything.echo", "everything.gzip-file-as-resource"])
    );
    // 2. The real echo.
    let r = gw
        .call_ok(
            &t,
            "everything.echo",
            json!({ "message": "hello through portcullis" }),
        )
        .await;
    assert_eq!(text_of(&r), "Echo: hello through portcullis", "{r}");
    // 3. A denied fetch first: the listener must never see it...
    let v = gw
        .call(
            &t,
            "everything.gzip-file-as-resource",
            json!({ "data": format!("http://127.0.0.1:{fetch_port}/forbidden.txt") }),
        )
        .await;
    assert_denied(&v, "policy_forbid");
    // ...then an allowed one, which the server really fetches and gzips.
    let r = gw
        .call_ok(
            &t,
            "everything.gzip-file-as-resource",
            json!({
                "name": "allowed.txt.gz",
                "data": format!("http://127.0.0.1:{fetch_port}/allowed.txt"),
                "outputType": "resource",
            }),
        )
        .await;
    let resource = &r["content"][0]["resource"];
    assert_eq!(resource["mimeType"], "application/gzip", "{r}");
    // base64 of the gzip magic (1f 8b 08).
    assert!(
        resource["blob"].as_str().unwrap().starts_with("H4sI"),
        "{r}"
    );
    let seen = fetched.lock().unwrap().clone();
    assert_eq!(seen, ["GET /allowed.txt HTTP/1.1"], "{seen:?}");
    // Not on the ACL.
    let v = gw
        .call(&t, "everything.get-sum", json!({ "a": 1, "b": 2 }))
        .await;
    assert_unknown_tool(&v, "everything.get-sum");

    let audit = gw.audit(&t).await;
    let tool = "everything.gzip-file-as-resource";
    assert_eq!(records(&audit, "call.denied", tool).len(), 1, "{audit:?}");
    assert_eq!(records(&audit, "call.allowed", tool).len(), 1);
    assert_eq!(records(&audit, "call.completed", tool).len(), 1);
    drop(gw);
    drop(upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_server() {
    if !found("git", "install git") || !found("mcp-server-git", "pip install mcp-server-git") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let repo = repo.canonicalize().unwrap();
    assert!(git(&repo, &["init", "-q"]).status.success());
    std::fs::write(repo.join("README.md"), "# a real repository\n").unwrap();
    std::fs::write(repo.join("secrets.env"), "API_KEY=do-not-commit\n").unwrap();
    let repo_path = repo.display().to_string();
    keygen(dir);
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(
        dir,
        &listen,
        &stdio_upstream("git", &["mcp-server-git", "--repository", &repo_path]),
        &[
            read("git.git_status"),
            with_schema(
                write("git.git_add"),
                r#"{ type = "object", properties = { repo_path = { type = "string" }, files = { type = "array", items = { type = "string" }, minItems = 1 } }, required = ["repo_path", "files"], additionalProperties = false }"#,
            ),
            write("git.git_commit"),
        ],
        &[AgentSpec {
            id: "bot",
            bootstrap_sha256: BOOTSTRAP_SHA256,
            acl: &["git.git_status", "git.git_add"],
        }],
        r#"
@id("never-stage-secrets")
forbid(principal, action, resource == Tool::"git.git_add")
when { context.args.files.contains("secrets.env") };
"#,
    );
    let gw = Gateway::start(dir, &listen, "serve.log").await;
    let t = gw.task("bot", BOOTSTRAP).await;

    // 1. Two of the server's twelve tools.
    assert_eq!(
        gw.tool_names(&t).await,
        names(&["git.git_add", "git.git_status"])
    );
    // 2. The real status of the real repository.
    let status = text_of(
        &gw.call_ok(&t, "git.git_status", json!({ "repo_path": repo_path }))
            .await,
    );
    assert!(status.contains("No commits yet"), "{status}");
    assert!(
        status.contains("README.md") && status.contains("secrets.env"),
        "{status}"
    );
    gw.call_ok(
        &t,
        "git.git_add",
        json!({ "repo_path": repo_path, "files": ["README.md"] }),
    )
    .await;
    // 3. Staging the secrets is forbidden, alone or among others; committing
    // is not on the ACL.
    for files in [json!(["secrets.env"]), json!(["README.md", "secrets.env"])] {
        let v = gw
            .call(
                &t,
                "git.git_add",
                json!({ "repo_path": repo_path, "files": files }),
            )
            .await;
        assert_denied(&v, "policy_forbid");
    }
    let v = gw
        .call(
            &t,
            "git.git_commit",
            json!({ "repo_path": repo_path, "message": "leak" }),
        )
        .await;
    assert_unknown_tool(&v, "git.git_commit");
    // The repository, read by git itself: README staged, the secrets not,
    // no commit.
    let porcelain = String::from_utf8(git(&repo, &["status", "--porcelain"]).stdout).unwrap();
    let mut lines: Vec<&str> = porcelain.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["?? secrets.env", "A  README.md"], "{porcelain}");
    assert!(
        !git(&repo, &["rev-parse", "--verify", "-q", "HEAD"])
            .status
            .success(),
        "a denied commit reached the server"
    );
    let status = text_of(
        &gw.call_ok(&t, "git.git_status", json!({ "repo_path": repo_path }))
            .await,
    );
    assert!(status.contains("Changes to be committed"), "{status}");

    let audit = gw.audit(&t).await;
    assert_eq!(records(&audit, "call.denied", "git.git_add").len(), 2);
    assert_eq!(records(&audit, "call.completed", "git.git_add").len(), 1);
    assert!(records(&audit, "call.allowed", "git.git_commit").is_empty());
}

const TIME_POLICY: &str = r#"
@id("no-pyongyang")
forbid(principal, action, resource == Tool::"time.get_current_time")
when { context.args.timezone like "*Pyongyang*" };
"#;

fn time_config(dir: &Path, listen: &str, local_timezone: &str) {
    write_config(
        dir,
        listen,
        &stdio_upstream(
            "time",
            &["mcp-server-time", "--local-timezone", local_timezone],
        ),
        &[
            with_schema(
                read("time.get_current_time"),
                r#"{ type = "object", properties = { timezone = { type = "string" } }, required = ["timezone"], additionalProperties = false }"#,
            ),
            read("time.convert_time"),
        ],
        &[AgentSpec {
            id: "bot",
            bootstrap_sha256: BOOTSTRAP_SHA256,
            acl: &["time.get_current_time"],
        }],
        TIME_POLICY,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_server_and_pinning() {
    if !found("mcp-server-time", "pip install mcp-server-time") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    keygen(dir);
    let listen = format!("127.0.0.1:{}", free_port());
    time_config(dir, &listen, "Etc/UTC");
    let gw = Gateway::start(dir, &listen, "serve-1.log").await;
    let t = gw.task("bot", BOOTSTRAP).await;

    // 1. One of the server's two tools.
    assert_eq!(gw.tool_names(&t).await, names(&["time.get_current_time"]));
    // 2. The server's real structured answer.
    let r = gw
        .call_ok(
            &t,
            "time.get_current_time",
            json!({ "timezone": "Etc/UTC" }),
        )
        .await;
    let now = &r["structuredContent"];
    assert_eq!(now["timezone"], "Etc/UTC", "{r}");
    assert!(now["datetime"].as_str().unwrap().contains('T'), "{r}");
    assert_eq!(now["is_dst"], false, "{r}");
    // 3. Denied by policy, and audited as denied, never as forwarded.
    let v = gw
        .call(
            &t,
            "time.get_current_time",
            json!({ "timezone": "Asia/Pyongyang" }),
        )
        .await;
    assert_denied(&v, "policy_forbid");
    let v = gw
        .call(
            &t,
            "time.convert_time",
            json!({ "source_timezone": "Etc/UTC", "time": "12:00", "target_timezone": "Asia/Tokyo" }),
        )
        .await;
    assert_unknown_tool(&v, "time.convert_time");
    let audit = gw.audit(&t).await;
    let tool = "time.get_current_time";
    let denied = records(&audit, "call.denied", tool);
    assert_eq!(denied.len(), 1, "{audit:?}");
    assert_eq!(denied[0]["args"]["timezone"], "Asia/Pyongyang");
    assert_eq!(denied[0]["reason"], "policy_forbid");
    assert_eq!(denied[0]["policy_ids"], json!(["no-pyongyang"]));
    let allowed = records(&audit, "call.allowed", tool);
    assert_eq!(allowed.len(), 1, "{audit:?}");
    assert_eq!(allowed[0]["args"]["timezone"], "Etc/UTC");
    assert_eq!(
        records(&audit, "call.completed", tool).len(),
        1,
        "only the allowed call completed: {audit:?}"
    );
    // Nothing drifted yet: both tools were pinned at first use.
    let (code, lines) = drift(dir, None);
    assert_eq!(code, 0, "{lines:?}");
    assert_eq!(drift_status(&lines, tool).0, "ok", "{lines:?}");
    assert_eq!(drift_status(&lines, "time.convert_time").0, "ok");
    drop(gw);

    // 4. The same ledger behind a server whose definitions changed (the
    // local timezone is spelled into every inputSchema).
    let listen = format!("127.0.0.1:{}", free_port());
    time_config(dir, &listen, "America/New_York");
    let gw = Gateway::start(dir, &listen, "serve-2.log").await;
    let t = gw.task("bot", BOOTSTRAP).await;
    assert!(
        gw.tool_names(&t).await.is_empty(),
        "a blocked definition is not listed"
    );
    let v = gw.call(&t, tool, json!({ "timezone": "Etc/UTC" })).await;
    assert_denied(&v, "tool_definition_changed");
    assert!(text_of(&v["result"]).contains("inputSchema"), "{v}");

    let (code, lines) = drift(dir, None);
    assert_eq!(code, 1, "{lines:?}");
    let (status, detail) = drift_status(&lines, tool);
    assert_eq!(status, "changed", "{lines:?}");
    assert!(
        detail.contains("inputSchema") && detail.contains("America/New_York"),
        "{detail}"
    );
    assert_eq!(drift_status(&lines, "time.convert_time").0, "changed");

    // Re-approve one tool; the other stays changed (so still exit 1).
    let (code, lines) = drift(dir, Some(tool));
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(drift_status(&lines, tool).0, "approved", "{lines:?}");
    assert_eq!(drift_status(&lines, "time.convert_time").0, "changed");

    // The running gateway notices by itself (it rereads a blocked pin at
    // most once a second).
    let started = Instant::now();
    let r = loop {
        let v = gw.call(&t, tool, json!({ "timezone": "Etc/UTC" })).await;
        if v["result"]["isError"] == false {
            break v["result"].clone();
        }
        assert_denied(&v, "tool_definition_changed");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still blocked 5 s after the approval: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(r["structuredContent"]["timezone"], "Etc/UTC", "{r}");
    // Listed again, now that its new definition is approved.
    assert_eq!(gw.tool_names(&t).await, names(&[tool]));
    let (code, lines) = drift(dir, None);
    assert_eq!(code, 1, "{lines:?}");
    let (status, detail) = drift_status(&lines, tool);
    assert_eq!(status, "ok", "{lines:?}");
    assert!(detail.contains("admin-cli"), "{detail}");
    assert_eq!(drift_status(&lines, "time.convert_time").0, "changed");
}

// ---------------------------------------------------------------------------
// Real clients

fn python_client(gw: &Gateway, token: &str, mode: &str, steps: &Value) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_client.py");
    let out = run_within(
        Command::new("python3")
            .arg(script)
            .arg(format!("{}/mcp", gw.base))
            .arg(mode)
            .arg(steps.to_string())
            .env("PORTCULLIS_MCP_TOKEN", token),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "python client ({mode}): {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn inspector(gw: &Gateway, cli: &Path, token: &str, args: &[&str]) -> Output {
    let preload = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/inspector_auth.mjs");
    run_within(
        Command::new("node")
            .arg("--import")
            .arg(preload)
            .arg(cli)
            .arg(format!("{}/mcp", gw.base))
            .args(["--transport", "http"])
            .args(args)
            .env("PORTCULLIS_MCP_TOKEN", token),
        Duration::from_secs(60),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_through_the_gateway() {
    let Some(script) = npm_server("server-filesystem") else {
        return;
    };
    let python = python_sdk();
    let inspector_cli = inspector_cli();
    if !python && inspector_cli.is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let root = root.canonicalize().unwrap();
    std::fs::write(root.join("hello.txt"), "read by a real client\n").unwrap();
    keygen(dir);
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(
        dir,
        &listen,
        &stdio_upstream("fs", &["node", &script, &root.display().to_string()]),
        &fs_tools(),
        &[FS_AGENT],
        FS_POLICY,
    );
    let gw = Gateway::start(dir, &listen, "serve.log").await;
    let acl = names(&["fs.list_directory", "fs.read_text_file", "fs.write_file"]);
    let hello = root.join("hello.txt").display().to_string();
    let secret = root.join("secret.txt");

    if python {
        let steps = json!([
            { "op": "list" },
            { "op": "call", "name": "fs.read_text_file", "arguments": { "path": hello } },
            { "op": "call", "name": "fs.write_file", "arguments": { "path": secret.display().to_string(), "content": "x" } },
            { "op": "call", "name": "fs.move_file", "arguments": { "source": hello, "destination": "/tmp/x" } },
        ]);
        for mode in ["legacy", MODERN] {
            let t = gw.task("fs-bot", BOOTSTRAP).await;
            let out = python_client(&gw, &t.token, mode, &steps);
            let listed: BTreeSet<String> = out[0]["tools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .collect();
            assert_eq!(listed, acl, "{mode}");
            let read = &out[1]["result"];
            assert_eq!(text_of(read), "read by a real client\n", "{mode}: {read}");
            assert_ne!(read["isError"], true, "{mode}: {read}");
            // The modern era's answers carry the gateway's serverInfo in
            // `_meta` (no handshake); the legacy ones do not.
            assert_eq!(
                read["_meta"]["io.modelcontextprotocol/serverInfo"]["name"].is_string(),
                mode == MODERN,
                "{mode}: {read}"
            );
            assert_denied(&out[2], "policy_forbid");
            assert_unknown_tool(&out[3], "fs.move_file");
            assert!(!secret.exists());
            // The gateway saw each era for what it is: the same decisions
            // audited under the task.
            let audit = gw.audit(&t).await;
            assert_eq!(
                records(&audit, "call.completed", "fs.read_text_file").len(),
                1
            );
            assert_eq!(records(&audit, "call.denied", "fs.write_file").len(), 1);
        }
    }

    if let Some(cli) = inspector_cli {
        let t = gw.task("fs-bot", BOOTSTRAP).await;
        let out = inspector(&gw, &cli, &t.token, &["--method", "tools/list"]);
        assert!(
            out.status.success(),
            "inspector tools/list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        let listed: BTreeSet<String> = listed["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(listed, acl);

        let arg = format!("path={hello}");
        let out = inspector(
            &gw,
            &cli,
            &t.token,
            &[
                "--method",
                "tools/call",
                "--tool-name",
                "fs.read_text_file",
                "--tool-arg",
                &arg,
            ],
        );
        assert!(
            out.status.success(),
            "inspector tools/call: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(text_of(&r), "read by a real client\n", "{r}");

        let path = format!("path={}", secret.display());
        let out = inspector(
            &gw,
            &cli,
            &t.token,
            &[
                "--method",
                "tools/call",
                "--tool-name",
                "fs.write_file",
                "--tool-arg",
                &path,
                "content=x",
            ],
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "inspector denied call: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_denied(&json!({ "result": r }), "policy_forbid");
        assert!(!secret.exists());

        let out = inspector(
            &gw,
            &cli,
            &t.token,
            &[
                "--method",
                "tools/call",
                "--tool-name",
                "fs.move_file",
                "--tool-arg",
                "source=a",
                "destination=b",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("-32602") && err.contains("Unknown tool: fs.move_file"),
            "{err}"
        );

        // Without the token, the Inspector is turned away (401).
        let out = run_within(
            Command::new("node")
                .arg(&cli)
                .arg(format!("{}/mcp", gw.base))
                .args(["--transport", "http", "--method", "tools/list"]),
            Duration::from_secs(60),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("token_missing"), "{err}");
    }
}
