//! `portcullis demo`: the whole story on one machine, in a few seconds.
//!
//! It writes the ingestion example into a temporary folder, makes a signing
//! key, and starts the gateway there on the embedded store, with the two
//! built-in demo upstreams (`portcullis demo-server warehouse|files`, child
//! processes of this very binary). A scripted agent then runs the ingestion
//! journey over MCP — the modern (2026-07-28) era for its own task, the
//! legacy (2025-11-25) era for the session another task opens — printing
//! each decision. It ends by completing the task (every token revoked) and
//! verifying the audit chain, and prints the console's address and sign-in
//! token (`--keep` leaves the gateway running for a look). No network,
//! nothing outside the repository.

// `Value[&str]` reads a missing key as `Null` and never panics; the one
// write (`body["tools"]`) is into an object built just above it.
#![allow(
    clippy::indexing_slicing,
    reason = "serde_json string indexing does not panic on reads"
)]

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use portcullis_mcp::client::{CallExtras, HttpOptions, Session, Transport};
use portcullis_mcp::era::Era;
use serde_json::{Value, json};

/// `println!` that ignores a closed stdout.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

const FILES: [(&str, &str); 2] = [
    (
        "portcullis.toml",
        include_str!("../../../examples/ingestion/portcullis.toml"),
    ),
    (
        "policies/ingestion.cedar",
        include_str!("../../../examples/ingestion/policies/ingestion.cedar"),
    ),
];

/// The example's demo secrets (documented in its portcullis.toml).
const BOOTSTRAP: &str = "demo-ingest-secret";
const ADMIN: &str = "demo-admin-token";

const CUSTOMERS_CSV: &str = "id,name,email,region\n101,Ada Lovelace,ada@example.com,eu\n102,Alan Turing,alan@example.com,eu\n103,Grace Hopper,grace@example.com,us\n";

/// Runs the demo; `Ok(false)` when a step did not go as scripted. With
/// `keep`, the gateway and its console stay up after the script until
/// Ctrl-C.
pub async fn run(keep: bool) -> anyhow::Result<bool> {
    let dir = tempfile::Builder::new()
        .prefix("portcullis-demo-")
        .tempdir()
        .context("creating a temporary folder")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a local port")?;
    let addr = listener.local_addr()?.to_string();
    write_example(dir.path(), &addr)?;
    portcullis_gateway::run::keygen(&dir.path().join("keys/signing.ed25519"))?;

    say!("Portcullis demo: the ingestion agent through the gateway, over MCP.");
    say!(
        "  gateway  http://{addr}/mcp (embedded store in {})",
        dir.path().display()
    );
    let (gateway, loaded, sqlite) =
        portcullis_gateway::run::build(&dir.path().join("portcullis.toml")).await?;
    say!(
        "  upstreams warehouse, files: `portcullis demo-server` child processes, tool definitions pinned on first use"
    );
    let (cp_tx, cp_rx) = tokio::sync::oneshot::channel::<()>();
    let checkpoints = tokio::spawn(portcullis_gateway::audit::run_checkpoints(
        gateway.clone(),
        loaded.config.audit.checkpoint_every,
        loaded.config.audit.checkpoint_interval.to_std(),
        async move {
            let _ = cp_rx.await;
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(portcullis_gateway::serve(
        listener,
        portcullis_gateway::router(gateway.clone()),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let script = Script {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
        base: format!("http://{addr}"),
        failures: 0,
    };
    let outcome = script.journey().await;
    say!("\nconsole  http://{addr}/console");
    say!("  sign in with the admin token: {ADMIN}");
    if keep {
        say!(
            "  the gateway keeps running (--keep): look around, then stop it with Ctrl-C \
             (agent bootstrap secret: {BOOTSTRAP})"
        );
        let _ = tokio::signal::ctrl_c().await;
    }

    let _ = stop_tx.send(());
    let _ = server.await;
    // The checkpointer signs the chain's head on its way out.
    let _ = cp_tx.send(());
    let _ = checkpoints.await;
    let ok = match outcome {
        Ok(failures) => {
            let report = portcullis_gateway::audit::verify_store(
                gateway.store().as_ref(),
                &portcullis_gateway::run::load_keys(&loaded)?,
                &mut |_| {},
            )
            .await
            .map_err(anyhow::Error::msg)?;
            match &report.first_bad {
                None => say!(
                    "\naudit chain verified: {} records, hash chain intact{}",
                    report.records,
                    if report.checkpoints_verified > 0 {
                        format!(", {} signed checkpoints", report.checkpoints_verified)
                    } else {
                        String::new()
                    }
                ),
                Some(bad) => say!("\naudit chain BROKEN: {bad:?}"),
            }
            failures == 0 && report.first_bad.is_none()
        }
        Err(e) => {
            say!("\nthe demo stopped: {e:#}");
            false
        }
    };
    sqlite.close().await;
    drop(gateway);
    Ok(ok)
}

fn write_example(dir: &Path, addr: &str) -> anyhow::Result<()> {
    for (name, text) in FILES {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let text = text.replace("127.0.0.1:8787", addr);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    // The files upstream serves the configuration's folder: /data/… is here.
    std::fs::create_dir_all(dir.join("data"))?;
    std::fs::write(dir.join("data/customers.csv"), CUSTOMERS_CSV)?;
    Ok(())
}

struct Script {
    http: reqwest::Client,
    base: String,
    failures: u32,
}

/// A started task.
struct Task {
    id: String,
    access: String,
}

impl Script {
    async fn start(&self, tools: Option<&[&str]>) -> anyhow::Result<Task> {
        let mut body = json!({"agent_id": "ingest-bot", "goal": "load today's customers"});
        if let Some(t) = tools {
            body["tools"] = json!(t);
        }
        let r = self
            .http
            .post(format!("{}/v1/tasks", self.base))
            .bearer_auth(BOOTSTRAP)
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if status != 201 {
            bail!("starting a task: HTTP {status}: {v}");
        }
        Ok(Task {
            id: v["task_id"].as_str().unwrap_or_default().to_owned(),
            access: v["access_token"].as_str().unwrap_or_default().to_owned(),
        })
    }

    async fn connect(&self, token: &str, era: Option<Era>) -> anyhow::Result<Session> {
        let transport = Transport::Http {
            url: format!("{}/mcp", self.base),
            options: HttpOptions {
                headers: vec![("authorization".to_owned(), format!("Bearer {token}"))],
                ..HttpOptions::default()
            },
        };
        Ok(match era {
            None => Session::connect("gateway", &transport).await?,
            Some(era) => Session::connect_as("gateway", &transport, era).await?,
        })
    }

    /// One scripted call: prints it and its decision, and checks it against
    /// what the policies say should happen (`expect`: "allow" or a reason).
    async fn call(
        &mut self,
        session: &Session,
        tool: &str,
        args: Value,
        expect: &str,
        why: &str,
    ) -> anyhow::Result<Value> {
        let shown = args.to_string();
        let answer = session.call_tool(tool, &args, &CallExtras::default()).await;
        let (got, text, result) = match answer {
            Ok(r) if r["isError"] == json!(true) => {
                let reason = r["_meta"]["portcullis/reason"]
                    .as_str()
                    .unwrap_or("error")
                    .to_owned();
                let text = r["content"][0]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                (reason, text, r)
            }
            Ok(r) => {
                let text = r["content"][0]["text"].as_str().unwrap_or_default();
                ("allow".to_owned(), first_line(text), r)
            }
            Err(portcullis_mcp::client::ClientError::Server(e)) => {
                let reason = e
                    .data
                    .as_ref()
                    .and_then(|d| d["reason"].as_str())
                    .unwrap_or("error")
                    .to_owned();
                (
                    reason,
                    format!("JSON-RPC {}: {}", e.code, e.message),
                    Value::Null,
                )
            }
            Err(e) => return Err(e.into()),
        };
        let mark = if got == expect { "ok " } else { "!! " };
        if got != expect {
            self.failures += 1;
        }
        let verdict = if got == "allow" {
            "ALLOWED".to_owned()
        } else {
            format!("DENIED {got}")
        };
        say!(
            "{mark} {tool} {}\n      -> {verdict}: {}\n      ({why})",
            clip(&shown, 90),
            clip(&text, 110)
        );
        Ok(result)
    }

    async fn journey(mut self) -> anyhow::Result<u32> {
        say!("\n-- task 1: a 2026-07-28 (stateless) MCP client --");
        let task = self.start(None).await?;
        say!(
            "task {} started for ingest-bot; its token is bound to it",
            task.id
        );
        let session = self.connect(&task.access, None).await?;
        let tools = session.list_tools().await?;
        let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
        say!("tools/list ({:?} era): {}", session.era(), names.join(", "));

        self.call(
            &session,
            "warehouse.connect",
            json!({"database": "analytics"}),
            "allow",
            "state connect: allowed",
        )
        .await?;
        self.call(
            &session,
            "warehouse.insert",
            json!({"table": "staging_customers", "rows": [{"id": 1}]}),
            "state_violation",
            "a write before validate and transform: out of order",
        )
        .await?;
        self.call(
            &session,
            "warehouse.query",
            json!({"sql": "SELECT * FROM customers"}),
            "policy_forbid",
            "policy no-sql-wildcards",
        )
        .await?;
        self.call(
            &session,
            "warehouse.query",
            json!({"sql": "SELECT id, name, region FROM customers ORDER BY id", "limit": 3}),
            "allow",
            "a bounded, explicit read; the result is the warehouse's real rows",
        )
        .await?;
        self.call(
            &session,
            "files.read",
            json!({"path": "/data/../../etc/passwd"}),
            "policy_forbid",
            "policy no-path-traversal",
        )
        .await?;
        self.call(
            &session,
            "files.read",
            json!({"path": "/data/customers.csv"}),
            "allow",
            "under /data, no traversal",
        )
        .await?;
        let rows = json!([{"id": 101, "name": "Ada Lovelace", "email": "ada@example.com", "region": "eu"}]);
        self.call(
            &session,
            "warehouse.validate",
            json!({"table": "staging_customers", "rows": rows}),
            "allow",
            "validate",
        )
        .await?;
        self.call(
            &session,
            "warehouse.transform",
            json!({"table": "staging_customers", "steps": ["trim", "dedupe"]}),
            "allow",
            "auto-advance to transform",
        )
        .await?;
        self.call(
            &session,
            "warehouse.insert",
            json!({"table": "customers", "rows": rows}),
            "policy_forbid",
            "policy insert-into-staging-only",
        )
        .await?;
        let inserted = self.call(&session, "warehouse.insert", json!({"table": "staging_customers", "rows": rows}), "allow", "state write is `reverify`: every earlier token of the task is revoked, a new one comes back").await?;
        let fresh = inserted["_meta"]["portcullis/access_token"]
            .as_str()
            .map(str::to_owned);
        session.close().await;

        say!("\n-- task 2: a 2025-11-25 client, and a token reused across tasks --");
        let other = self
            .start(Some(&["warehouse.connect", "warehouse.query"]))
            .await?;
        say!(
            "task {} started with only warehouse.connect and warehouse.query",
            other.id
        );
        let legacy = self.connect(&other.access, Some(Era::Legacy)).await?;
        say!(
            "session opened ({:?} era), bound to task {}",
            legacy.era(),
            other.id
        );
        self.call(
            &legacy,
            "files.read",
            json!({"path": "/data/customers.csv"}),
            "tool_not_granted",
            "on the agent's ACL, but not granted to this task",
        )
        .await?;
        legacy.close().await;
        // Task 1's (old, revoked) token and a fresh one, on task 2's path.
        let reuse = self
            .http
            .post(format!("{}/v1/tasks/{}/calls", self.base, other.id))
            .bearer_auth(fresh.as_deref().unwrap_or(&task.access))
            .json(&json!({"tool": "warehouse.connect", "arguments": {"database": "analytics"}}))
            .send()
            .await?;
        let status = reuse.status();
        let body: Value = reuse.json().await?;
        let got = body["error"].as_str().unwrap_or("allow");
        let mark = if got == "task_mismatch" {
            "ok "
        } else {
            self.failures += 1;
            "!! "
        };
        say!("{mark} task 1's token on task 2's path\n      -> HTTP {status} {got}");

        say!("\n-- completing task 1 revokes every token of it --");
        let token = fresh.unwrap_or(task.access);
        let done = self
            .http
            .post(format!("{}/v1/tasks/{}/complete", self.base, task.id))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await?;
        say!("task {} completed (HTTP {})", task.id, done.status());
        let after = self
            .http
            .post(format!("{}/mcp", self.base))
            .bearer_auth(&token)
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/list")
            .json(
                &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}}}),
            )
            .send()
            .await?;
        let status = after.status();
        let body: Value = after.json().await.unwrap_or(Value::Null);
        let got = body["error"].as_str().unwrap_or("?");
        let mark = if got == "token_revoked" {
            "ok "
        } else {
            self.failures += 1;
            "!! "
        };
        say!("{mark} the task's token after completion\n      -> HTTP {status} {got}");

        let audit = self
            .http
            .get(format!(
                "{}/v1/audit?task_id={}&limit=1000",
                self.base, task.id
            ))
            .bearer_auth(ADMIN)
            .send()
            .await?;
        let records: Value = audit.json().await?;
        let n = records["records"].as_array().map_or(0, Vec::len);
        say!("\naudit: {n} records for task 1 (every attempt, denials included)");
        Ok(self.failures)
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

fn clip(s: &str, n: usize) -> String {
    let one = s.replace('\n', " ");
    if one.chars().count() > n {
        format!("{}…", one.chars().take(n).collect::<String>())
    } else {
        one
    }
}
