//! `portcullis elevations list|approve|deny` against a running gateway (the
//! real binary twice), with the approver's token from the environment.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN, BIN, BOOTSTRAP, free_port, portcullis, start_server, write_config};
use serde_json::{Value, json};

fn cli(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("PORTCULLIS_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn approvers_list_approve_deny_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(dir.path(), &listen, "");
    let cfg = dir.path().join("portcullis.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        r#"roles = ["admin", "auditor"]"#,
        r#"roles = ["admin", "approver", "auditor"]"#,
    );
    std::fs::write(&cfg, text).unwrap();
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
        .json(&json!({"agent_id": "ingest-bot", "goal": "g", "tools": ["warehouse.connect"]}))
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
    let call = || async {
        http.post(format!("{base}/v1/tasks/{task_id}/calls")).bearer_auth(token)
            .json(&json!({"tool": "warehouse.query", "arguments": {"sql": "select id from customers"}}))
            .send().await.unwrap()
    };
    assert_eq!(
        call().await.json::<Value>().await.unwrap()["error"],
        "tool_not_granted"
    );
    let ask = || async {
        let r: Value = http
            .post(format!("{base}/v1/tasks/{task_id}/elevations"))
            .bearer_auth(token)
            .json(&json!({"tool": "warehouse.query", "reason": "need to read customers"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["elevation_id"].as_str().unwrap().to_owned()
    };
    let first = ask().await;

    let (ok, out) = cli(
        dir.path(),
        &["elevations", "list", "--config", "portcullis.toml"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&first) && out.contains("pending") && out.contains("need to read customers"),
        "{out}"
    );

    let (ok, out) = cli(
        dir.path(),
        &[
            "elevations",
            "approve",
            &first,
            "--config",
            "portcullis.toml",
            "--note",
            "ok for today",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("approved"), "{out}");
    assert_eq!(
        call().await.status(),
        200,
        "the grant lets the call through"
    );
    // Decided once: a second decision is 409.
    let (ok, out) = cli(
        dir.path(),
        &["elevations", "deny", &first, "--config", "portcullis.toml"],
    );
    assert!(!ok);
    assert!(out.contains("409"), "{out}");

    let second = ask().await;
    let (ok, out) = cli(
        dir.path(),
        &["elevations", "deny", &second, "--config", "portcullis.toml"],
    );
    assert!(ok && out.contains("denied"), "{out}");

    // --watch prints a request made after it started.
    let mut watch = Command::new(BIN)
        .args([
            "elevations",
            "list",
            "--config",
            "portcullis.toml",
            "--watch",
        ])
        .current_dir(dir.path())
        .env("PORTCULLIS_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let third = ask().await;
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let started = Instant::now();
    let mut seen = false;
    while started.elapsed() < Duration::from_secs(15) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200))
            && line.contains(&third)
        {
            seen = true;
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen, "--watch never printed {third}");

    // An agent's token is not an approver's: 403, and the request stays pending.
    let r = http
        .post(format!("{base}/v1/elevations/{third}/approve"))
        .bearer_auth(token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (_, out) = cli(
        dir.path(),
        &["elevations", "list", "--config", "portcullis.toml"],
    );
    assert!(out.contains(&third), "{out}");
}
