//! The cluster shape: two gateway replicas on one PostgreSQL ledger. A
//! token revoked through one replica is refused by the other within one
//! second, although the other had cached it as live (LISTEN/NOTIFY clears
//! the cache); both replicas append to one audit chain that verifies.
//! Skips with a notice unless `PORTCULLIS_TEST_POSTGRES_URL` is set
//! (`.ci/run` sets it).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

const SECRET: &str = "cluster-test-bootstrap-secret";

fn config(listen: &str, url: &str, dead: u16) -> String {
    let sha = portcullis_token::sha256_hex(SECRET.as_bytes());
    format!(
        r#"
[server]
listen = "{listen}"
issuer = "http://gateway.cluster.test"
[store]
url = "{url}"
[tokens]
signing_key = "keys/k.ed25519"
[[upstreams]]
name = "wh"
transport = "http"
url = "http://127.0.0.1:{dead}/mcp"
credential = {{ kind = "none" }}
[[tools]]
name = "wh.read"
upstream = "wh"
risk = "low"
access = "read"
[[agent_types]]
name = "t"
initial = "work"
states = [ {{ name = "work", tools = ["wh.read"], next = ["done"] }}, {{ name = "done", final = true }} ]
[[agents]]
id = "bot"
type = "t"
tools = ["wh.read"]
bootstrap_sha256 = "{sha}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_reaches_the_other_within_a_second() {
    let Some(schema) = common::PgSchema::create("pc_gw") else {
        return;
    };
    let url = schema.url.clone();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let dir = tempfile::tempdir().unwrap();
    portcullis_gateway::run::keygen(&dir.path().join("keys/k.ed25519")).unwrap();
    let mut bases = Vec::new();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap().to_string();
        let cfg = dir.path().join(format!("replica-{}.toml", bases.len()));
        std::fs::write(&cfg, config(&listen, &url, dead)).unwrap();
        let (gw, _, ledger) = portcullis_gateway::run::build(&cfg).await.unwrap();
        assert!(matches!(
            ledger,
            portcullis_gateway::run::Ledger::Postgres(_)
        ));
        gateways.push(gw.clone());
        tokio::spawn(portcullis_gateway::serve(
            listener,
            portcullis_gateway::router(gw),
            std::future::pending(),
        ));
        bases.push(format!("http://{listen}"));
    }
    let (a, b) = (&bases[0], &bases[1]);
    let http = reqwest::Client::new();
    let started: Value = http
        .post(format!("{a}/v1/tasks"))
        .bearer_auth(SECRET)
        .json(&json!({"agent_id": "bot", "goal": "g"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let task_id = started["task_id"].as_str().unwrap();
    let token = started["access_token"].as_str().unwrap();
    let call = |base: String| {
        let http = http.clone();
        async move {
            let r = http
                .post(format!("{base}/v1/tasks/{task_id}/calls"))
                .bearer_auth(token)
                .json(&json!({"tool": "wh.read", "arguments": {}}))
                .send()
                .await
                .unwrap();
            let v: Value = r.json().await.unwrap();
            v["error"].as_str().unwrap_or("allow").to_owned()
        }
    };
    // B knows the token (authenticated: the call reaches the dead upstream).
    assert_eq!(call(b.clone()).await, "upstream_unavailable");
    assert_eq!(
        call(b.clone()).await,
        "upstream_unavailable",
        "and caches it as live"
    );

    // A completes the task: every token revoked, in the shared ledger.
    let done = http
        .post(format!("{a}/v1/tasks/{task_id}/complete"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let revoked_at = Instant::now();
    loop {
        let got = call(b.clone()).await;
        if got == "token_revoked" {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "replica B still accepts a revoked token: {got}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // One chain, appended by both replicas, verifies.
    let store = gateways[0].store().clone();
    let ring = portcullis_gateway::run::load_keys(
        &portcullis_config::LoadedConfig::load(&dir.path().join("replica-0.toml")).unwrap(),
    )
    .unwrap();
    let report = portcullis_gateway::audit::verify_store(store.as_ref(), &ring, &mut |_| {})
        .await
        .unwrap();
    assert!(report.first_bad.is_none(), "{report:?}");
    assert!(report.records >= 6, "{report:?}");
}
