//! What the tests that run the real `portcullis` binary share: the
//! configuration, starting `serve` and waiting for it, running the CLI;
//! and, in `cluster`, replicas on PostgreSQL, nginx, a private PostgreSQL.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test support: a panic is a failed test"
)]

pub mod cluster;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
/// The bootstrap secret of `ingest-bot`; its SHA-256 is in the configuration.
pub const BOOTSTRAP: &str = "serve-test-bootstrap-secret";
pub const BOOTSTRAP_SHA256: &str =
    "84f0fe75f625a4767155cc0ae0d00f5138abb6efcfa88e1a5815e6cc698ed7be";
/// The admin token; its SHA-256 is in the configuration.
pub const ADMIN: &str = "serve-test-admin-token";
pub const ADMIN_SHA256: &str = "96f9892bad2b8acea814818036e836f8e46a18435431b6ec5f247146ad9c4a42";

/// The server process, killed when the test ends, however it ends.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A small ingestion configuration listening on `listen`; `audit` is the
/// body of its `[audit]` table.
pub fn write_config(dir: &Path, listen: &str, audit: &str) {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("policies/ingestion.cedar"),
        r#"
@id("no-sql-wildcards")
forbid(principal, action, resource == Tool::"warehouse.query")
when { context.args.sql like "*\**" };
"#,
    )
    .unwrap();
    let config = format!(
        r#"
[server]
listen = "{listen}"
issuer = "http://{listen}"

[store]
url = "sqlite://ledger.db"

[tokens]
access_ttl = "10m"
refresh_idle_ttl = "30m"
task_max_lifetime = "8h"
signing_key = "keys/k1.ed25519"

[audit]
{audit}

[[admins]]
name = "ops"
roles = ["admin", "auditor"]
token_sha256 = "{ADMIN_SHA256}"

[[upstreams]]
name = "warehouse"
transport = "stdio"
command = ["portcullis", "demo-server", "warehouse"]
credential = {{ kind = "jwt" }}

[[tools]]
name = "warehouse.connect"
upstream = "warehouse"
risk = "low"
access = "read"
args_schema = {{ type = "object", properties = {{ database = {{ type = "string" }} }}, required = ["database"], additionalProperties = false }}

[[tools]]
name = "warehouse.query"
upstream = "warehouse"
risk = "low"
access = "read"
args_schema = {{ type = "object", properties = {{ sql = {{ type = "string" }} }}, required = ["sql"], additionalProperties = false }}

[[agent_types]]
name = "ingestion"
initial = "connect"
auto_advance = true
states = [
  {{ name = "connect", tools = ["warehouse.connect"], next = ["query"] }},
  {{ name = "query",   tools = ["warehouse.query"], next = ["done"] }},
  {{ name = "done",    final = true }},
]

[[agents]]
id = "ingest-bot"
type = "ingestion"
tools = ["warehouse.connect", "warehouse.query"]
bootstrap_sha256 = "{BOOTSTRAP_SHA256}"

[policies]
cedar = ["policies/*.cedar"]
"#
    );
    std::fs::write(dir.join("portcullis.toml"), config).unwrap();
}

/// Starts `portcullis serve` and waits for `/readyz`.
pub async fn start_server(dir: &Path, base: &str, client: &reqwest::Client, log: &str) -> Server {
    start_server_within(
        dir,
        &dir.join("portcullis.toml"),
        base,
        client,
        log,
        Duration::from_secs(15),
    )
    .await
}

/// Starts `portcullis serve --config CONFIG` in `dir` (its output in
/// `dir/log`; a relative CONFIG is relative to `dir`) and waits up to
/// `within` for `/readyz` (a gateway with MCP upstreams is ready once each
/// has had its first connection attempt).
pub async fn start_server_within(
    dir: &Path,
    config: &Path,
    base: &str,
    client: &reqwest::Client,
    log: &str,
    within: Duration,
) -> Server {
    let log_path = dir.join(log);
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let server_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("serve exited early ({status}):\n{}", server_log());
        }
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not ready after {within:?}:\n{}", server_log());
}

/// Stops `serve` cleanly (SIGTERM: the head of the audit chain is signed,
/// the mirror flushed) and waits up to 10 s for it to exit; `log` tells
/// why if it does not.
pub async fn stop_server(server: &mut Server, log: &dyn Fn() -> String) {
    sigterm_and_wait(server, Duration::from_secs(10), log).await;
}

/// Sends SIGTERM to `server` and waits up to `within` for it to exit:
/// (its exit status, how long it took). Fails the test, with `log`, if it
/// is still running then.
pub async fn sigterm_and_wait(
    server: &mut Server,
    within: Duration,
    log: &dyn Fn() -> String,
) -> (std::process::ExitStatus, Duration) {
    let pid = server.0.id().to_string();
    let asked = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            return (status, asked.elapsed());
        }
        assert!(
            asked.elapsed() < within,
            "serve still running {:?} after SIGTERM:\n{}",
            asked.elapsed(),
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the CLI in `dir`.
pub fn portcullis(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}
