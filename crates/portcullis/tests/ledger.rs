//! The embedded ledger (`Portcullis::open`): what a call path records, in
//! order, redacted, on a hash chain that verifies; a tool runs only when
//! allowed; a denial's record is durable before the decision returns.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};

use portcullis::{CallError, Portcullis};
use portcullis_store::{AuditEvent, AuditQuery, SqliteStore, Store, chain};
use serde_json::{Value, json};

/// The quickstart configuration, on a ledger in `dir`.
fn config(dir: &Path) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::copy(
        root.join("policies/files.cedar"),
        dir.join("policies/files.cedar"),
    )
    .unwrap();
    let text = std::fs::read_to_string(root.join("portcullis.toml")).unwrap();
    let text = format!(
        "[store]\nurl = \"sqlite://ledger.db\"\n\n[audit]\nredact = [\"secret\"]\n\n{text}"
    );
    let path = dir.join("portcullis.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn records(db: &Path) -> Vec<AuditEvent> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = SqliteStore::open(db).unwrap();
        let events = store.audit(&AuditQuery::default()).await.unwrap();
        store.close().await;
        events
    })
}

#[test]
fn the_call_path_is_recorded_and_the_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Portcullis::open(config(dir.path())).unwrap();
    let task = gate.start_task("helper-bot", "ledger test", None).unwrap();

    let mut ran = 0;
    let result = gate.call(
        &task.id,
        "files.read",
        &json!({ "path": "docs/a.txt" }),
        |_| -> Result<Value, String> {
            ran += 1;
            Ok(json!({ "text": "hello" }))
        },
    );
    assert_eq!(result.unwrap(), json!({ "text": "hello" }));
    let denied = gate.call(
        &task.id,
        "files.read",
        &json!({ "path": "docs/.env" }),
        |_| -> Result<Value, String> {
            ran += 1;
            Ok(Value::Null)
        },
    );
    let Err(CallError::Denied(d)) = denied else {
        panic!("not denied: {denied:?}");
    };
    assert_eq!(d.reason.map(|r| r.as_str()), Some("policy_forbid"));
    let failed = gate.call(
        &task.id,
        "files.list",
        &json!({ "dir": "docs" }),
        |_| -> Result<Value, String> { Err("disk on fire".to_owned()) },
    );
    assert!(matches!(failed, Err(CallError::Tool(_))));
    assert_eq!(ran, 1);
    gate.complete(&task.id).unwrap();
    gate.close();

    let events = records(&dir.path().join("ledger.db"));
    let kinds: Vec<&str> = events.iter().map(|e| e.event.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "task.started",
            "call.allowed",
            "call.completed",
            "call.denied",
            "call.allowed",
            "call.completed",
            "task.completed",
        ]
    );
    let done = &events[2].event;
    assert_eq!(done.decision.as_deref(), Some("allow"));
    assert_eq!(
        done.result_digest.as_deref(),
        Some(sha256_hex(json!({ "text": "hello" }).to_string().as_bytes()).as_str())
    );
    assert_eq!(events[3].event.policy_ids, ["no-dotfiles"]);
    assert_eq!(events[5].event.decision.as_deref(), Some("error"));
    assert_eq!(events[5].event.detail.as_deref(), Some("the tool failed"));
    let report = chain::verify(events.into_iter().map(Ok), &[], &|_| false);
    assert!(report.is_ok(), "{report:?}");
}

#[test]
fn recorded_arguments_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path());
    // A tool whose schema allows a secret-looking argument.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "properties = { path = { type = \"string\" } }, required = [\"path\"]",
        "properties = { path = { type = \"string\" }, client_secret = { type = \"string\" } }, required = [\"path\"]",
    );
    std::fs::write(&path, text).unwrap();
    let gate = Portcullis::open(&path).unwrap();
    let task = gate.start_task("helper-bot", "redaction", None).unwrap();
    let d = gate.decide(
        &task.id,
        "files.read",
        &json!({ "path": "a", "client_secret": "hunter2" }),
    );
    assert!(d.is_allowed(), "{d:?}");
    gate.close();
    let events = records(&dir.path().join("ledger.db"));
    assert_eq!(
        events[1].event.args,
        Some(json!({ "path": "a", "client_secret": "[redacted]" }))
    );
}

#[test]
fn a_postgres_store_is_not_an_embedded_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path());
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("sqlite://ledger.db", "postgres://127.0.0.1/x");
    std::fs::write(&path, text).unwrap();
    let err = Portcullis::open(&path).unwrap_err();
    assert!(matches!(err, portcullis::Error::Ledger(_)), "{err}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
