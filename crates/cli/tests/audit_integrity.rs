//! Regression tests of the audit log's integrity checks on the real
//! binary, each named after the weakness it closes:
//!
//! * `audit verify --jsonl` read lines leniently: it skipped any line that
//!   began `{"segment"`, ignored extra members of a checkpoint line, and
//!   kept the last of two equal keys. Every line must now be exactly a
//!   record or a checkpoint as the gateway writes them.
//! * Checkpoints lived only in the database they protect: deleting them
//!   and rewriting the records with recomputed hashes went unnoticed.
//!   `audit.witness_dir` keeps them outside the store as well, and
//!   `audit verify --witness` holds the store (or an export) against it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{BOOTSTRAP, free_port, portcullis, start_server, stop_server, write_config};
use serde_json::{Value, json};

fn text(out: &Output) -> String {
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
        .json(&json!({ "agent_id": "ingest-bot", "goal": "integrity" }))
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

/// A gateway in `d` (its `[audit]` table `audit`) that ran `tasks` tasks
/// and stopped cleanly; its JWKS is saved as `jwks.json`. Returns the
/// export's lines.
async fn ledger(d: &Path, audit: &str, tasks: usize) -> Vec<String> {
    let keygen = Command::new(common::BIN)
        .args(["keygen", "--out"])
        .arg(d.join("keys/k1.ed25519"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen));
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(d, &listen, audit);
    let base = format!("http://{listen}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut server = start_server(d, &base, &client, "serve.log").await;
    for _ in 0..tasks {
        one_task(&client, &base).await;
    }
    let jwks = client
        .get(format!("{base}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    std::fs::write(d.join("jwks.json"), jwks).unwrap();
    let log = d.join("serve.log");
    stop_server(&mut server, &|| {
        std::fs::read_to_string(&log).unwrap_or_default()
    })
    .await;
    let export = portcullis(d, &["audit", "export", "--config", "portcullis.toml"]);
    assert!(export.status.success(), "{}", text(&export));
    let lines: Vec<String> = String::from_utf8(export.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("{\"checkpoint\"")),
        "{lines:?}"
    );
    lines
}

/// `audit verify --jsonl FILE --jwks jwks.json` on `lines` written to FILE.
fn verify_lines(d: &Path, lines: &[String]) -> Output {
    std::fs::write(d.join("export.jsonl"), lines.join("\n") + "\n").unwrap();
    portcullis(
        d,
        &[
            "audit",
            "verify",
            "--jsonl",
            "export.jsonl",
            "--jwks",
            "jwks.json",
            "--quiet",
        ],
    )
}

/// Fails, and names line `line` (1-based) of the file.
fn assert_fails_at_line(out: &Output, line: usize) {
    assert!(!out.status.success(), "accepted:\n{}", text(out));
    assert!(
        text(out).contains(&format!("line {line}:")),
        "line {line} not named:\n{}",
        text(out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_verify_rejects_a_stray_segment_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut lines = ledger(d, "", 1).await;
    let intact = verify_lines(d, &lines);
    assert!(intact.status.success(), "{}", text(&intact));
    // A segment header belongs on the first line of a segment file, not in
    // an export: one in the middle (any content at all was skipped).
    lines.insert(
        2,
        r#"{"segment":{"format":"portcullis-audit-segment-v1","first_seq":1,"last_seq":1,"records":1,"last_ts":0}}"#
            .to_owned(),
    );
    assert_fails_at_line(&verify_lines(d, &lines), 3);
    // Nor anything else that merely starts like one.
    lines[2] = r#"{"segment": "whatever I like"}"#.to_owned();
    assert_fails_at_line(&verify_lines(d, &lines), 3);
    // Nor a blank line.
    lines[2] = String::new();
    assert_fails_at_line(&verify_lines(d, &lines), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_verify_rejects_extra_fields_on_a_copied_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut lines = ledger(d, "", 1).await;
    let at = lines
        .iter()
        .position(|l| l.starts_with("{\"checkpoint\""))
        .unwrap();
    // A copy of a real, validly signed checkpoint that carries a member of
    // its own: it used to be read as the checkpoint and the member ignored.
    let copy = lines[at].replacen("{\"checkpoint\":{", "{\"checkpoint\":{\"note\":\"x\",", 1);
    assert_ne!(copy, lines[at]);
    lines.insert(at + 1, copy);
    assert_fails_at_line(&verify_lines(d, &lines), at + 2);
    // A member beside the checkpoint, outside it.
    let original = &lines[at];
    let beside = format!("{},\"note\":\"x\"}}", &original[..original.len() - 1]);
    assert!(beside.ends_with(",\"note\":\"x\"}"), "{beside}");
    lines[at + 1] = beside;
    assert_fails_at_line(&verify_lines(d, &lines), at + 2);
    // Spacing the gateway never writes.
    lines[at + 1] = lines[at].replacen(':', ": ", 1);
    assert_fails_at_line(&verify_lines(d, &lines), at + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_verify_rejects_duplicate_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut lines = ledger(d, "", 1).await;
    let at = lines
        .iter()
        .position(|l| l.contains("\"kind\":\"task.started\""))
        .unwrap();
    // A second `kind` in front of the real one: a reader that keeps the
    // first sees a halted task, one that keeps the last (as serde_json
    // does) sees the record that hashes right.
    let doubled = lines[at].replacen('{', "{\"kind\":\"task.halted\",", 1);
    lines[at] = doubled;
    assert_fails_at_line(&verify_lines(d, &lines), at + 1);
    let out = verify_lines(d, &lines);
    assert!(text(&out).contains("\"kind\""), "{}", text(&out));

    // In a checkpoint line too.
    let mut lines = ledger_lines_again(d);
    let cp = lines
        .iter()
        .position(|l| l.starts_with("{\"checkpoint\""))
        .unwrap();
    lines[cp] = lines[cp].replacen("{\"checkpoint\":{", "{\"checkpoint\":{\"seq\":0,", 1);
    assert_fails_at_line(&verify_lines(d, &lines), cp + 1);
}

/// The export of the ledger in `d` again.
fn ledger_lines_again(d: &Path) -> Vec<String> {
    let export = portcullis(d, &["audit", "export", "--config", "portcullis.toml"]);
    String::from_utf8(export.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Rewrites the ledger in `d` as an attacker with the database file alone
/// can: every checkpoint deleted, record `edit` changed, and it and every
/// later record re-hashed so that the chain links again.
fn rewrite_history(d: &Path, edit: u64) {
    let db = rusqlite::Connection::open(d.join("ledger.db")).unwrap();
    db.execute("DELETE FROM checkpoints", []).unwrap();
    let mut read = db
        .prepare("SELECT event FROM audit_events ORDER BY seq")
        .unwrap();
    let records: Vec<String> = read
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    drop(read);
    let mut prev = portcullis_store::chain::GENESIS.to_owned();
    for text in records {
        let mut record: portcullis_store::AuditEvent = serde_json::from_str(&text).unwrap();
        if record.seq == edit {
            record.event.detail = Some("nothing happened here".into());
        }
        record.prev_hash.clone_from(&prev);
        let stored = portcullis_store::chain::seal(&mut record);
        db.execute(
            "UPDATE audit_events SET event = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
            rusqlite::params![
                stored,
                record.prev_hash,
                record.hash,
                i64::try_from(record.seq).unwrap()
            ],
        )
        .unwrap();
        prev = record.hash;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_detects_deleted_checkpoints_and_rehashed_records() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ledger(d, "witness_dir = \"witness\"\ncheckpoint_every = 3", 3).await;
    let check = portcullis(d, &["check", "--config", "portcullis.toml"]);
    assert!(check.status.success(), "{}", text(&check));

    let witness = std::fs::read_to_string(d.join("witness/checkpoints.jsonl")).unwrap();
    assert!(witness.ends_with('\n'), "{witness}");
    assert!(witness.lines().count() >= 1, "{witness}");
    for line in witness.lines() {
        assert!(line.starts_with("{\"checkpoint\":{\"seq\":"), "{line}");
    }
    let store = ["audit", "verify", "--config", "portcullis.toml", "--quiet"];
    let with_witness = [
        "audit",
        "verify",
        "--config",
        "portcullis.toml",
        "--witness",
        "witness",
        "--quiet",
    ];
    let intact = portcullis(d, &with_witness);
    assert!(intact.status.success(), "{}", text(&intact));
    assert!(text(&intact).contains("witness"), "{}", text(&intact));

    rewrite_history(d, 2);
    // Without the witness the store alone cannot tell: no checkpoint is
    // left to contradict the re-hashed chain.
    let blind = portcullis(d, &store);
    assert!(blind.status.success(), "{}", text(&blind));
    // With it, the rewrite is found where the first witnessed checkpoint
    // no longer matches its record.
    let caught = portcullis(d, &with_witness);
    assert!(!caught.status.success(), "{}", text(&caught));
    assert!(
        text(&caught).starts_with("FAILED at seq "),
        "{}",
        text(&caught)
    );
    let first_witnessed: Value = serde_json::from_str(witness.lines().next().unwrap()).unwrap();
    let seq = first_witnessed["checkpoint"]["seq"].as_u64().unwrap();
    assert!(
        text(&caught).starts_with(&format!("FAILED at seq {seq}:")),
        "{}",
        text(&caught)
    );

    // An export of the rewritten store, offline, against the witness.
    let lines = ledger_lines_again(d);
    std::fs::write(d.join("rewritten.jsonl"), lines.join("\n") + "\n").unwrap();
    let offline = |file: &str| {
        portcullis(
            d,
            &[
                "audit",
                "verify",
                "--jsonl",
                file,
                "--jwks",
                "jwks.json",
                "--witness",
                "witness",
                "--quiet",
            ],
        )
    };
    let caught = offline("rewritten.jsonl");
    assert!(!caught.status.success(), "{}", text(&caught));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_detects_deleted_checkpoints_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ledger(d, "witness_dir = \"witness\"\ncheckpoint_every = 3", 2).await;
    let db = rusqlite::Connection::open(d.join("ledger.db")).unwrap();
    let deleted = db
        .execute(
            "DELETE FROM checkpoints WHERE seq = (SELECT min(seq) FROM checkpoints)",
            [],
        )
        .unwrap();
    assert_eq!(deleted, 1);
    drop(db);
    let out = portcullis(
        d,
        &[
            "audit",
            "verify",
            "--config",
            "portcullis.toml",
            "--witness",
            "witness",
            "--quiet",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not in the log"), "{}", text(&out));
}
