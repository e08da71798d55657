//! `portcullis audit archive` and `audit verify --archive` on the real
//! binary: a gateway's log is moved to the archive (`hot_days = 0`: every
//! signed segment is old enough), the gateway serves again and extends the
//! same chain, and the three ways of verifying (the store alone, archive +
//! store, the archive alone offline with the JWKS) agree; a lost segment
//! file fails the archive's verification.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{BOOTSTRAP, free_port, portcullis, start_server, stop_server, write_config};
use serde_json::{Value, json};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts a task and completes it.
async fn one_task(client: &reqwest::Client, base: &str) {
    let r = client
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(BOOTSTRAP)
        .json(&json!({ "agent_id": "ingest-bot", "goal": "tiers" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let started: Value = r.json().await.unwrap();
    let task_id = started["task_id"].as_str().unwrap();
    let token = started["access_token"].as_str().unwrap();
    let r = client
        .post(format!("{base}/v1/tasks/{task_id}/complete"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_logs_verify_three_ways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keygen = Command::new(common::BIN)
        .args(["keygen", "--out"])
        .arg(d.join("keys/k1.ed25519"))
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(
        d,
        &listen,
        "hot_days = 0\nretention_days = 30\narchive_dir = \"archive\"",
    );
    let base = format!("http://{listen}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let mut server = start_server(d, &base, &client, "serve-1.log").await;
    one_task(&client, &base).await;
    let jwks = client
        .get(format!("{base}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    std::fs::write(d.join("jwks.json"), jwks).unwrap();
    // The checkpoint signed at shutdown closes the segment.
    stop_server(&mut server, &String::new).await;

    let out = portcullis(d, &["audit", "archive", "--config", "portcullis.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).starts_with("archived records 1..="),
        "{}",
        text(&out)
    );
    let files: Vec<_> = std::fs::read_dir(d.join("archive"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("segment-00000000000000000001-"),
        "{files:?}"
    );

    // The gateway serves again on the tiered ledger; the chain goes on.
    let mut server = start_server(d, &base, &client, "serve-2.log").await;
    one_task(&client, &base).await;
    stop_server(&mut server, &String::new).await;

    let verify = |args: &[&str]| {
        let mut all = vec!["audit", "verify"];
        all.extend_from_slice(args);
        all.push("--quiet");
        portcullis(d, &all)
    };
    let hot = verify(&["--config", "portcullis.toml"]);
    assert!(hot.status.success(), "{}", text(&hot));
    assert!(
        text(&hot).contains("the log starts after the signed checkpoint of seq"),
        "{}",
        text(&hot)
    );
    let both = verify(&["--config", "portcullis.toml", "--archive"]);
    assert!(both.status.success(), "{}", text(&both));
    assert!(
        !text(&both).contains("starts after"),
        "archive + store is the whole log from seq 1: {}",
        text(&both)
    );
    let alone = verify(&["--archive", "archive", "--jwks", "jwks.json"]);
    assert!(alone.status.success(), "{}", text(&alone));

    // The archived records are gone from the store's API, kept in the file.
    let export = portcullis(d, &["audit", "export", "--config", "portcullis.toml"]);
    let first_record: Value = String::from_utf8(export.stdout)
        .unwrap()
        .lines()
        .find(|l| !l.starts_with("{\"checkpoint\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    assert!(first_record["seq"].as_u64().unwrap() > 1, "{first_record}");

    // Losing the segment file is caught where the store is checked with it.
    std::fs::remove_file(d.join("archive").join(&files[0])).unwrap();
    let lost = verify(&["--config", "portcullis.toml", "--archive"]);
    assert!(!lost.status.success(), "{}", text(&lost));
    assert!(text(&lost).starts_with("FAILED at seq "), "{}", text(&lost));
}
