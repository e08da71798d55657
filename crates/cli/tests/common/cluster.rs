//! What the cluster tests share: replicas of the real `portcullis` binary on
//! one PostgreSQL ledger (a schema of the shared test server, or a private
//! server the test may stop), the demo warehouse as their one HTTP
//! upstream, and nginx in front of them with the example's configuration
//! and health checker (`examples/cluster/`). Every process is stopped when
//! its guard drops, pass or fail.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test support: a panic is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ADMIN_SHA256, BIN, Server, free_port};

/// The bootstrap secret of an agent of the cluster configuration.
pub fn secret(agent: &str) -> String {
    format!("cluster-test-{agent}-secret")
}
/// The issuer every replica shares (the load balancer's address in a real
/// deployment; tokens are checked against it, not against a replica's
/// own address).
pub const ISSUER: &str = "http://gateway.cluster.test";

/// `PORTCULLIS_TEST_POSTGRES_URL`, or a printed `SKIP:` notice and `None`.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("PORTCULLIS_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("SKIP: {test}: PORTCULLIS_TEST_POSTGRES_URL not set");
            None
        }
    }
}

/// Runs one SQL statement with `psql`.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A fresh schema on the shared test server, dropped when this drops; its
/// `url` sets the sessions' `search_path` to it.
pub struct Schema {
    base: String,
    name: String,
    pub url: String,
}

impl Schema {
    pub fn create(base: &str) -> Self {
        let name = format!("pc_cli_{}", unique_suffix());
        psql(base, &format!("CREATE SCHEMA {name}"));
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{name}");
        Self {
            base: base.to_owned(),
            name,
            url,
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &self.base,
                "-q",
                "-c",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
            ])
            .output();
    }
}

/// 16 random lowercase hex characters, for a unique schema name.
fn unique_suffix() -> String {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    uuid.trim().replace('-', "").chars().take(16).collect()
}

/// A private PostgreSQL server for one test, which the test may stop,
/// crash and start again: `initdb` into a temporary directory, `pg_ctl`
/// on a free loopback port. Run as the `postgres` user when the test runs
/// as root (PostgreSQL refuses to run as root). Stopped (immediately) and
/// removed when this drops.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub url: String,
}

/// Where `initdb` and `pg_ctl` are: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn postgres_bin_dir() -> Option<PathBuf> {
    let from_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists());
    from_config.or_else(|| {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .collect();
        dirs.sort();
        dirs.pop()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PrivatePostgres {
    /// Creates and starts the server, or prints a `SKIP:` notice and
    /// returns `None` when PostgreSQL's server binaries are not installed.
    pub fn start(test: &str) -> Option<Self> {
        let Some(bin) = postgres_bin_dir() else {
            eprintln!(
                "SKIP: {test}: no initdb/pg_ctl (pg_config --bindir, /usr/lib/postgresql/*/bin)"
            );
            return None;
        };
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("portcullis-pg-")
            .tempdir()
            .unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if as_postgres {
            let out = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .arg(&data)
                .output()
                .unwrap();
            assert!(out.status.success(), "chown: {out:?}");
        }
        let port = free_port();
        let pg = Self {
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            as_postgres,
        };
        let initdb = pg.run(
            "initdb",
            &[
                "-D",
                pg.data().to_str().unwrap(),
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        assert!(initdb.status.success(), "initdb: {}", text(&initdb));
        pg.start_server();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn server_options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100",
            self.port,
            self.dir.path().display()
        )
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    pub fn start_server(&self) {
        let data = self.data();
        let log = self.dir.path().join("server.log");
        let options = self.server_options();
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            text(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// `pg_ctl stop -m MODE` (`fast`: disconnects sessions, clean shutdown;
    /// `immediate`: a crash, recovery at the next start).
    pub fn stop_server(&self, mode: &str) {
        let data = self.data();
        let out = self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", mode, "-w", "stop"],
        );
        assert!(out.status.success(), "pg_ctl stop: {}", text(&out));
    }

    /// `pg_ctl restart -m MODE`, waiting until the server accepts
    /// connections again.
    pub fn restart_server(&self, mode: &str) {
        let data = self.data();
        let log = self.dir.path().join("server.log");
        let options = self.server_options();
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "restart",
            ],
        );
        assert!(out.status.success(), "pg_ctl restart: {}", text(&out));
    }
}

impl PrivatePostgres {
    /// Turns TLS on (`ssl = on`) with this certificate and key (PEM) and
    /// restarts the server.
    pub fn enable_ssl(&self, cert_pem: &str, key_pem: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let data = self.data();
        let (cert, key) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if self.as_postgres {
            let out = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&cert)
                .arg(&key)
                .output()
                .unwrap();
            assert!(out.status.success(), "chown: {out:?}");
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )
        .unwrap();
        self.restart_server("fast");
    }

    /// The server's processes: the postmaster and its children.
    fn pids(&self) -> Vec<String> {
        let Ok(pidfile) = std::fs::read_to_string(self.data().join("postmaster.pid")) else {
            return Vec::new();
        };
        let Some(master) = pidfile.lines().next().map(str::trim).map(str::to_owned) else {
            return Vec::new();
        };
        let children = Command::new("pgrep")
            .args(["-P", &master])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        std::iter::once(master)
            .chain(children.split_whitespace().map(str::to_owned))
            .collect()
    }

    fn signal(&self, signal: &str) {
        let pids = self.pids();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg(signal).args(&pids).status();
        }
    }

    /// Freezes the server (SIGSTOP to every process of it): connections
    /// stay open but nothing answers, as when a network drops packets.
    pub fn freeze(&self) {
        assert!(!self.pids().is_empty(), "no server to freeze");
        self.signal("-STOP");
    }

    /// Undoes [`PrivatePostgres::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // A frozen server cannot stop.
        self.thaw();
        let data = self.data();
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The demo warehouse over Streamable HTTP, with its SQLite file in `dir`:
/// the one upstream every replica forwards to.
pub struct Upstream {
    _server: Server,
    pub port: u16,
    client: reqwest::Client,
}

impl Upstream {
    pub async fn start(dir: &Path) -> Self {
        let port = free_port();
        let log = std::fs::File::create(dir.join("upstream.log")).unwrap();
        let child = Command::new(BIN)
            .args(["demo-server", "warehouse", "--http"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--db")
            .arg(dir.join("warehouse.db"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = Server(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "upstream not listening"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            _server: server,
            port,
            client: reqwest::Client::new(),
        }
    }

    /// Runs read-only SQL on the upstream directly (not through a gateway)
    /// and returns its rows: what the upstream has really done.
    pub async fn query(&self, sql: &str) -> Vec<Value> {
        let r = self
            .client
            .post(format!("http://127.0.0.1:{}/mcp", self.port))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "query")
            .json(&json!({
                "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {
                    "name": "query",
                    "arguments": { "sql": sql },
                    "_meta": {
                        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                        "io.modelcontextprotocol/clientInfo": { "name": "cluster-test", "version": "1" },
                        "io.modelcontextprotocol/clientCapabilities": {}
                    }
                }
            }))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body["result"]["structuredContent"]["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("no rows: {body}"))
            .clone()
    }

    /// Rows of the upstream's `staging_customers` whose name is `name`.
    pub async fn staged(&self, name: &str) -> usize {
        let rows = self
            .query(&format!(
                "SELECT count(*) AS n FROM staging_customers WHERE name = '{name}'"
            ))
            .await;
        usize::try_from(rows[0]["n"].as_u64().unwrap()).unwrap()
    }
}

/// The configuration every replica runs, but for `server.listen`.
///
/// Agents (bootstrap secrets from [`secret`]):
/// * `race-bot` (`race`): `start` → `left` or `right` (one of two branches,
///   never both) → `done`; `warehouse.insert` at most once per task.
/// * `load-bot` (`load`): one state with `warehouse.echo` and
///   `warehouse.insert`, budgets that no test run exhausts.
pub fn config(listen: &str, store_url: &str, upstream_port: u16) -> String {
    let race_sha = portcullis_token::sha256_hex(secret("race-bot").as_bytes());
    let load_sha = portcullis_token::sha256_hex(secret("load-bot").as_bytes());
    format!(
        r#"
[server]
listen = "{listen}"
issuer = "{ISSUER}"

[store]
url = "{store_url}"

[tokens]
access_ttl = "10m"
signing_key = "keys/k.ed25519"

[audit]
checkpoint_every = 500
checkpoint_interval = "2s"

[[admins]]
name = "ops"
roles = ["admin", "approver", "auditor"]
token_sha256 = "{ADMIN_SHA256}"

[[upstreams]]
name = "warehouse"
transport = "http"
url = "http://127.0.0.1:{upstream_port}/mcp"
credential = {{ kind = "jwt" }}

[[tools]]
name = "warehouse.connect"
upstream = "warehouse"
risk = "low"
access = "read"

[[tools]]
name = "warehouse.query"
upstream = "warehouse"
risk = "low"
access = "read"

[[tools]]
name = "warehouse.validate"
upstream = "warehouse"
risk = "low"
access = "read"

[[tools]]
name = "warehouse.insert"
upstream = "warehouse"
risk = "high"
access = "write"

[[tools]]
name = "warehouse.echo"
upstream = "warehouse"
risk = "low"
access = "read"

[[agent_types]]
name = "race"
initial = "start"
auto_advance = true
states = [
  {{ name = "start", tools = ["warehouse.connect"], next = ["left", "right"] }},
  {{ name = "left",  tools = ["warehouse.query", "warehouse.insert"], next = ["done"] }},
  {{ name = "right", tools = ["warehouse.validate", "warehouse.insert"], next = ["done"] }},
  {{ name = "done",  final = true }},
]

[[agent_types]]
name = "load"
initial = "work"
states = [
  {{ name = "work", tools = ["warehouse.echo", "warehouse.insert"], next = ["done"] }},
  {{ name = "done", final = true }},
]

[[agents]]
id = "race-bot"
type = "race"
tools = ["warehouse.connect", "warehouse.query", "warehouse.validate", "warehouse.insert"]
bootstrap_sha256 = "{race_sha}"
limits = {{ max_calls_per_task = 100, per_tool = {{ "warehouse.insert" = 1 }} }}

[[agents]]
id = "load-bot"
type = "load"
tools = ["warehouse.echo", "warehouse.insert"]
bootstrap_sha256 = "{load_sha}"
limits = {{ max_calls_per_task = 100000000 }}
"#
    )
}

/// `n` replicas of `portcullis serve` on one ledger, sharing one signing
/// key and one configuration (but for their listen address), each with its
/// configuration `replica-<i>.toml` and log `replica-<i>.log` in `dir`
/// (`i` from 1). All are started at once (racing to migrate the schema and
/// pin the upstream's tools), then awaited.
pub struct Replicas {
    pub servers: Vec<Option<Server>>,
    pub bases: Vec<String>,
    pub dir: PathBuf,
}

impl Replicas {
    pub async fn start(dir: &Path, n: usize, store_url: &str, upstream_port: u16) -> Self {
        let key = dir.join("keys/k.ed25519");
        if !key.exists() {
            let out = super::portcullis(dir, &["keygen", "--out", key.to_str().unwrap()]);
            assert!(out.status.success(), "keygen: {out:?}");
        }
        let mut servers = Vec::new();
        let mut bases = Vec::new();
        for i in 1..=n {
            let listen = format!("127.0.0.1:{}", free_port());
            let cfg = format!("replica-{i}.toml");
            std::fs::write(dir.join(&cfg), config(&listen, store_url, upstream_port)).unwrap();
            let log = std::fs::File::create(dir.join(format!("replica-{i}.log"))).unwrap();
            let child = Command::new(BIN)
                .args(["serve", "--config", &cfg])
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            servers.push(Some(Server(child)));
            bases.push(format!("http://{listen}"));
        }
        let replicas = Self {
            servers,
            bases,
            dir: dir.to_path_buf(),
        };
        let client = reqwest::Client::new();
        for i in 0..n {
            replicas
                .wait_ready(&client, i, Duration::from_secs(60))
                .await;
        }
        replicas
    }

    /// The log of replica `i` (from 0).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("replica-{}.log", i + 1))).unwrap_or_default()
    }

    /// Waits until replica `i` answers `/readyz` with 200.
    pub async fn wait_ready(&self, client: &reqwest::Client, i: usize, within: Duration) {
        let started = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", self.bases[i])).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                started.elapsed() < within,
                "replica {} not ready after {within:?}:\n{}",
                i + 1,
                self.log(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True while replica `i`'s process runs.
    pub fn running(&mut self, i: usize) -> bool {
        match &mut self.servers[i] {
            Some(s) => s.0.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// SIGKILLs replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut s) = self.servers[i].take() {
            s.0.kill().unwrap();
            s.0.wait().unwrap();
        }
    }

    /// The process id of replica `i`.
    pub fn pid(&self, i: usize) -> u32 {
        self.servers[i].as_ref().unwrap().0.id()
    }
}

/// Starts a task of `agent` through `base`: (task id, access token).
pub async fn start_task(client: &reqwest::Client, base: &str, agent: &str) -> (String, String) {
    let r = client
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(secret(agent))
        .json(&json!({ "agent_id": agent, "goal": "cluster test" }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    (
        body["task_id"].as_str().unwrap().to_owned(),
        body["access_token"].as_str().unwrap().to_owned(),
    )
}

/// One `POST /v1/tasks/{id}/calls`: (status, body), or the transport
/// error's text.
pub async fn call(
    client: &reqwest::Client,
    base: &str,
    task_id: &str,
    token: &str,
    tool: &str,
    arguments: Value,
) -> Result<(u16, Value), String> {
    let r = client
        .post(format!("{base}/v1/tasks/{task_id}/calls"))
        .bearer_auth(token)
        .json(&json!({ "tool": tool, "arguments": arguments }))
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    let status = r.status().as_u16();
    let bytes = r.bytes().await.map_err(|e| error_chain(&e))?;
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, body))
}

/// An error with its causes ("error sending request: connection closed
/// before message completed"), so a transport failure says what failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The reason code of an answer (`"allow"` for a 200).
pub fn outcome(answer: &(u16, Value)) -> String {
    if answer.0 == 200 {
        "allow".to_owned()
    } else {
        answer.1["error"]
            .as_str()
            .map_or_else(|| format!("http {}", answer.0), str::to_owned)
    }
}

/// Every audit record of `task_id` (all of them with `None`), through the
/// admin API of `base`, paged with `since_seq`.
pub async fn audit(client: &reqwest::Client, base: &str, task_id: Option<&str>) -> Vec<Value> {
    let mut all = Vec::new();
    let mut since = 0u64;
    loop {
        let filter = task_id.map(|t| format!("task_id={t}&")).unwrap_or_default();
        let r = client
            .get(format!(
                "{base}/v1/audit?{filter}since_seq={since}&limit=500"
            ))
            .bearer_auth(super::ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        let records = page["records"].as_array().unwrap().clone();
        let Some(next) = page["next_since_seq"].as_u64() else {
            all.extend(records);
            return all;
        };
        if records.is_empty() {
            return all;
        }
        since = next;
        all.extend(records);
    }
}

/// nginx in front of the replicas, configured as `examples/cluster/` does
/// (its `nginx.conf.in` and `healthcheck.sh`), in `dir/nginx`, with the
/// health checker running. Stopped (SIGTERM, then SIGKILL) when this drops.
pub struct Nginx {
    master: Child,
    checker: Option<Server>,
    pub dir: PathBuf,
    pub base: String,
}

/// The example's folder.
pub fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cluster")
}

/// Whether `nginx` is on the PATH; prints a `SKIP:` notice when not.
pub fn have_nginx(test: &str) -> bool {
    let ok = Command::new("nginx")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {test}: nginx not installed (apt-get install nginx-light)");
    }
    ok
}

impl Nginx {
    pub async fn start(dir: &Path, replicas: &[String]) -> Self {
        let nginx_dir = dir.join("nginx");
        std::fs::create_dir_all(nginx_dir.join("tmp")).unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned();
        let template = std::fs::read_to_string(example_dir().join("nginx.conf.in")).unwrap();
        let conf = template
            .replace("@NGINX_DIR@", nginx_dir.to_str().unwrap())
            .replace("@LISTEN@", &listen)
            .replace("@USER@", &user);
        std::fs::write(nginx_dir.join("nginx.conf"), conf).unwrap();
        let hosts: Vec<&str> = replicas
            .iter()
            .map(|b| b.trim_start_matches("http://"))
            .collect();
        let checker = example_dir().join("healthcheck.sh");
        let once = Command::new("bash")
            .arg(&checker)
            .arg("--once")
            .arg(&nginx_dir)
            .args(&hosts)
            .output()
            .unwrap();
        assert!(once.status.success(), "healthcheck --once: {once:?}");
        let master = Command::new("nginx")
            .arg("-p")
            .arg(&nginx_dir)
            .arg("-c")
            .arg(nginx_dir.join("nginx.conf"))
            .arg("-e")
            .arg(nginx_dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut nginx = Self {
            master,
            checker: None,
            dir: nginx_dir.clone(),
            base: format!("http://{listen}"),
        };
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Some(status) = nginx.master.try_wait().unwrap() {
                panic!(
                    "nginx exited ({status}):\n{}",
                    std::fs::read_to_string(nginx_dir.join("error.log")).unwrap_or_default()
                );
            }
            if let Ok(r) = client.get(format!("{}/readyz", nginx.base)).send().await
                && r.status() == 200
            {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(15), "nginx not up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = std::fs::File::create(dir.join("healthcheck.log")).unwrap();
        let child = Command::new("bash")
            .arg(&checker)
            .arg(&nginx_dir)
            .args(&hosts)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        nginx.checker = Some(Server(child));
        nginx
    }

    /// The upstream blocks the health checker wrote last.
    pub fn upstreams(&self) -> String {
        std::fs::read_to_string(self.dir.join("upstreams.conf")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        drop(self.checker.take());
        // SIGTERM: the master stops its workers (a SIGKILLed master would
        // leave them serving).
        let _ = Command::new("kill")
            .args(["-TERM", &self.master.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.master.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}

/// Serializes the tests of one binary that start whole clusters: on a
/// small machine, two clusters at once would make each other's timings
/// meaningless.
pub static HEAVY: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));
