//! `credential.kind = "postgres-role"` against the real PostgreSQL: the
//! upstream of a call receives a freshly minted role that can INSERT into
//! its one table and do nothing else, and that cannot log in once the task
//! has ended. Skips with a notice unless `PORTCULLIS_TEST_POSTGRES_URL` is
//! set (`.ci/run` sets it).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use portcullis_core::ManualClock;
use portcullis_gateway::Gateway;
use portcullis_gateway::upstream::{HopCredential, InProcess};
use serde_json::{Value, json};

const SECRET: &str = "pgrole-test-bootstrap-secret";

fn config(listen: &str, pg: &str, table: &str) -> String {
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
name = "db"
transport = "stdio"
command = ["not-started-in-this-test"]
credential = {{ kind = "postgres-role", url = "{pg}", grants = ["INSERT ON TABLE {table}"], ttl = "10m" }}
[[tools]]
name = "db.insert"
upstream = "db"
risk = "high"
access = "write"
[[agent_types]]
name = "t"
initial = "work"
states = [ {{ name = "work", tools = ["db.insert"], next = ["done"] }}, {{ name = "done", final = true }} ]
[[agents]]
id = "bot"
type = "t"
tools = ["db.insert"]
bootstrap_sha256 = "{sha}"
"#
    )
}

async fn login(
    pg: &str,
    role: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg: tokio_postgres::Config = pg.parse().unwrap();
    cfg.user(role).password(password);
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minted_role_can_insert_into_its_table_and_nothing_else() {
    let Ok(pg) = std::env::var("PORTCULLIS_TEST_POSTGRES_URL") else {
        eprintln!("SKIP: PORTCULLIS_TEST_POSTGRES_URL not set");
        return;
    };
    let tag = portcullis_token::random_id("")
        .unwrap()
        .to_lowercase()
        .replace(['-', '_'], "");
    let (table, other) = (format!("pc_t_{tag}_staging"), format!("pc_t_{tag}_other"));
    let psql = |sql: &str| {
        let out = std::process::Command::new("psql")
            .args([&pg, "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql(&format!(
        "CREATE TABLE {table} (id int); CREATE TABLE {other} (id int); INSERT INTO {table} VALUES (0);"
    ));

    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap().to_string();
    let cfg = dir.path().join("portcullis.toml");
    std::fs::write(&cfg, config(&listen, &pg, &table)).unwrap();
    portcullis_gateway::run::keygen(&dir.path().join("keys/k.ed25519")).unwrap();
    let loaded = portcullis_config::LoadedConfig::load(&cfg).unwrap();
    let clock = Arc::new(ManualClock::new(portcullis_core::Clock::now(
        &portcullis::SystemClock,
    )));
    let engine = portcullis_core::build(&loaded, clock.clone()).unwrap();
    let store = portcullis_gateway::run::open_store(&loaded).await.unwrap();
    let ring = portcullis_gateway::run::load_keys(&loaded).unwrap();
    let db = Arc::new(InProcess::echo(&["insert"]));
    let gw = Gateway::new(&loaded, engine, store.clone(), ring, clock)
        .unwrap()
        .with_upstream("db", db.clone())
        .unwrap();
    tokio::spawn(portcullis_gateway::serve(
        listener,
        portcullis_gateway::router(Arc::new(gw)),
        std::future::pending(),
    ));
    let base = format!("http://{listen}");
    let http = reqwest::Client::new();
    let task: Value = http
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(SECRET)
        .json(&json!({"agent_id": "bot", "goal": "load"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (task_id, token) = (
        task["task_id"].as_str().unwrap(),
        task["access_token"].as_str().unwrap(),
    );
    for _ in 0..2 {
        let r = http
            .post(format!("{base}/v1/tasks/{task_id}/calls"))
            .bearer_auth(token)
            .json(&json!({"tool": "db.insert", "arguments": {"id": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    // What the upstream received: a Basic credential for a role, the same
    // for both calls of the task; never the agent's token.
    let calls = db.calls();
    assert_eq!(calls.len(), 2);
    let creds: Vec<String> = calls
        .iter()
        .map(|c| match &c.credential {
            HopCredential::Static { header, value } => {
                assert_eq!(header, "authorization");
                assert!(!value.contains(token));
                value.strip_prefix("Basic ").unwrap().to_owned()
            }
            other => panic!("not a role credential: {other:?}"),
        })
        .collect();
    assert_eq!(creds[0], creds[1], "one role per task");
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(&creds[0])
            .unwrap(),
    )
    .unwrap();
    let (role, password) = decoded.split_once(':').unwrap();
    assert!(role.starts_with("pc_"), "{role}");

    // As that role: INSERT into its table, nothing else.
    let c = login(&pg, role, password).await.unwrap();
    c.batch_execute(&format!("INSERT INTO {table} VALUES (42)"))
        .await
        .unwrap();
    for sql in [
        format!("SELECT * FROM {table}"),
        format!("UPDATE {table} SET id = 7"),
        format!("DELETE FROM {table}"),
        format!("INSERT INTO {other} VALUES (1)"),
        format!("SELECT * FROM {other}"),
        format!("CREATE TABLE {table}_x (id int)"),
    ] {
        let err = c.batch_execute(&sql).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err:?}"
        );
    }
    drop(c);
    // The audit names the role, never the password.
    let audit = store
        .audit(&portcullis_store::AuditQuery {
            task_id: Some(task_id.to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    let text = serde_json::to_string(&audit).unwrap();
    assert!(text.contains(role) && !text.contains(password));

    // The task ends: the role is dropped, no login any more.
    let r = http
        .post(format!("{base}/v1/tasks/{task_id}/complete"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut gone = false;
    for _ in 0..100 {
        if login(&pg, role, password).await.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "role {role} can still log in after the task ended");
    psql(&format!("DROP TABLE {table}; DROP TABLE {other};"));
}
