//! `portcullis serve` end to end: the built binary, a key made by `portcullis
//! keygen`, a configuration on a free port, and a client talking HTTP to it —
//! start a task, read the JWKS, get a call denied, complete the task, and see
//! its token refused as revoked.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

mod common;

use common::{ADMIN, BIN, BOOTSTRAP, Server, free_port, stop_server, write_config};

fn b64url_json(segment: &str) -> Value {
    // Tiny base64url decoder, to read the token header without a dependency.
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in segment.bytes() {
        let v = alphabet.iter().position(|&a| a == c).unwrap() as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    serde_json::from_slice(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_a_task_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let keygen = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(dir.path().join("keys/k1.ed25519"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "keygen: {keygen:?}");
    let kid = String::from_utf8(keygen.stdout).unwrap().trim().to_owned();
    assert!(!kid.is_empty());

    let listen = format!("127.0.0.1:{}", free_port());
    write_config(dir.path(), &listen, "jsonl = \"mirror.jsonl\"");
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.path().join("portcullis.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let base = format!("http://{listen}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let server_log = || std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();

    // Ready within 30 s, or the test says why not.
    let mut ready = false;
    for _ in 0..300 {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("serve exited early ({status}):\n{}", server_log());
        }
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "not ready after 30 s:\n{}", server_log());

    // Start a task.
    let r = client
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(BOOTSTRAP)
        .json(&json!({ "agent_id": "ingest-bot", "goal": "serve test" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let started: Value = r.json().await.unwrap();
    let task_id = started["task_id"].as_str().unwrap().to_owned();
    let access = started["access_token"].as_str().unwrap().to_owned();
    assert_eq!(started["state"], "connect");
    assert_eq!(started["token_type"], "Bearer");

    // The JWKS publishes the key made by keygen, which signed the token.
    let jwks: Value = client
        .get(format!("{base}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], kid.as_str(), "{jwks}");
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    let header = b64url_json(access.split('.').next().unwrap());
    assert_eq!(header["kid"], kid.as_str());
    assert_eq!(header["typ"], "at+jwt");

    // A denied call: a policy forbids it.
    let r = client
        .post(format!("{base}/v1/tasks/{task_id}/calls"))
        .bearer_auth(&access)
        .json(&json!({ "tool": "warehouse.query", "arguments": { "sql": "select * from t" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let denied: Value = r.json().await.unwrap();
    assert_eq!(denied["error"], "policy_forbid", "{denied}");
    assert_eq!(denied["policy_ids"], json!(["no-sql-wildcards"]));
    assert!(denied["request_id"].is_string());

    // Complete the task; its token is revoked from then on.
    let r = client
        .post(format!("{base}/v1/tasks/{task_id}/complete"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    let r = client
        .get(format!("{base}/v1/tasks/{task_id}"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_revoked", "{body}");

    // The audit log, through the admin API.
    let r = client
        .get(format!("{base}/v1/audit?task_id={task_id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let audit: Value = r.json().await.unwrap();
    let kinds: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"call.denied"), "{kinds:?}");
    assert!(kinds.contains(&"task.completed"), "{kinds:?}");

    // Still running: it did not crash on the way.
    assert!(server.0.try_wait().unwrap().is_none(), "{}", server_log());

    // A clean stop (SIGTERM) signs the head of the audit chain.
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    stop_server(&mut server, &server_log).await;

    let portcullis = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = portcullis(&["audit", "verify", "--config", "portcullis.toml", "--quiet"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("ok: "), "{text}");
    assert!(
        !text.contains(" 0 checkpoints"),
        "a checkpoint was signed at shutdown: {text}"
    );

    // Export, and verify the copy offline against the saved JWKS.
    let out = portcullis(&["audit", "export", "--config", "portcullis.toml"]);
    assert!(out.status.success());
    let export = String::from_utf8(out.stdout).unwrap();
    assert!(
        export.lines().any(|l| l.starts_with("{\"checkpoint\"")),
        "{export}"
    );
    std::fs::write(dir.path().join("audit.jsonl"), &export).unwrap();
    let verify_copy = || {
        portcullis(&[
            "audit",
            "verify",
            "--jsonl",
            "audit.jsonl",
            "--jwks",
            "jwks.json",
            "--quiet",
        ])
    };
    let out = verify_copy();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The JSON Lines mirror, written as the ledger committed, is the same
    // log, line for line, and verifies the same way.
    let mirror = std::fs::read_to_string(dir.path().join("mirror.jsonl")).unwrap();
    assert_eq!(mirror, export, "the mirror must equal the export");
    let out = portcullis(&[
        "audit",
        "verify",
        "--jsonl",
        "mirror.jsonl",
        "--jwks",
        "jwks.json",
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Edit one record of the copy: verify names its seq and fails.
    let edited: Vec<String> = export
        .lines()
        .map(|l| {
            if l.contains("\"kind\":\"call.denied\"") {
                l.replace("select * from t", "select 1")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert_ne!(
        edited.join("\n") + "\n",
        export,
        "the edit must change something"
    );
    std::fs::write(dir.path().join("audit.jsonl"), edited.join("\n") + "\n").unwrap();
    let out = verify_copy();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "an edited record must fail: {text}");
    assert!(text.starts_with("FAILED at seq "), "{text}");

    // Cut the copy before its last checkpoint: truncation is detected.
    let lines: Vec<&str> = export.lines().collect();
    let cut: Vec<&str> = lines[..lines.len() - 3].to_vec();
    let last_checkpoint = lines
        .iter()
        .rposition(|l| l.starts_with("{\"checkpoint\""))
        .unwrap();
    let mut kept: Vec<&str> = cut
        .iter()
        .copied()
        .filter(|l| !l.starts_with("{\"checkpoint\""))
        .collect();
    kept.push(lines[last_checkpoint]);
    std::fs::write(dir.path().join("audit.jsonl"), kept.join("\n") + "\n").unwrap();
    let out = verify_copy();
    assert!(
        !out.status.success(),
        "a truncated log must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A password argument, redacted by `audit.redact`, appears nowhere the
/// gateway writes: not in its answers, the audit API, the JSON Lines
/// mirror, nor its logs (`--log-format json` at `debug`) — for an allowed
/// call, a call denied on that very argument, and a call denied by policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redacted_password_is_in_no_answer_record_mirror_or_log() {
    const ALLOWED: &str = "pw-ok-7c1e9b";
    const TOO_LONG: &str = "pw-denied-for-its-length-0a4f3d5e8b";
    const POLICY: &str = "pw-pol-93b2aa";
    let dir = tempfile::tempdir().unwrap();
    let keygen = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(dir.path().join("keys/k1.ed25519"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "keygen: {keygen:?}");
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(
        dir.path(),
        &listen,
        "redact = [\"password\"]\njsonl = \"mirror.jsonl\"",
    );
    // Both tools take a password (at most 16 characters).
    let path = dir.path().join("portcullis.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    let password = "password = { type = \"string\", maxLength = 16 }";
    let patched = config
        .replace(
            "properties = { database = { type = \"string\" } }",
            &format!("properties = {{ database = {{ type = \"string\" }}, {password} }}"),
        )
        .replace(
            "properties = { sql = { type = \"string\" } }",
            &format!("properties = {{ sql = {{ type = \"string\" }}, {password} }}"),
        );
    assert_eq!(patched.matches(password).count(), 2, "{patched}");
    std::fs::write(&path, patched).unwrap();

    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--config",
            "portcullis.toml",
            "--log-format",
            "json",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let base = format!("http://{listen}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let server_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut ready = false;
    for _ in 0..300 {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("serve exited early ({status}):\n{}", server_log());
        }
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "not ready after 30 s:\n{}", server_log());

    let mut answers = Vec::new();
    let r = client
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(BOOTSTRAP)
        .json(&json!({ "agent_id": "ingest-bot", "goal": "redaction test" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let started: Value = r.json().await.unwrap();
    let task_id = started["task_id"].as_str().unwrap().to_owned();
    let access = started["access_token"].as_str().unwrap().to_owned();
    let call = |tool: &str, arguments: Value| {
        client
            .post(format!("{base}/v1/tasks/{task_id}/calls"))
            .bearer_auth(&access)
            .json(&json!({ "tool": tool, "arguments": arguments }))
            .send()
    };

    // Allowed: forwarded (the demo upstream may refuse an argument it does
    // not know, which is its business); the answer's `result` is the
    // upstream's own and is not checked here.
    let r = call(
        "warehouse.connect",
        json!({ "database": "analytics", "password": ALLOWED }),
    )
    .await
    .unwrap();
    let mut body: Value = r.json().await.unwrap();
    if let Some(obj) = body.as_object_mut() {
        obj.remove("result");
    }
    answers.push(body.to_string());
    // Denied on the password itself: the detail names the argument, never
    // its value.
    let r = call(
        "warehouse.connect",
        json!({ "database": "analytics", "password": TOO_LONG }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    let denied: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(denied["error"], "args_invalid", "{text}");
    answers.push(text);
    // Denied by a policy, with a password along.
    let r = call(
        "warehouse.query",
        json!({ "sql": "select * from t", "password": POLICY }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(text.contains("policy_forbid"), "{text}");
    answers.push(text);

    // The audit API: every call recorded, each password redacted.
    let r = client
        .get(format!("{base}/v1/audit?task_id={task_id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let audit = r.text().await.unwrap();
    let records: Value = serde_json::from_str(&audit).unwrap();
    let redacted = records["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["args"]["password"] == "[redacted]")
        .count();
    assert_eq!(redacted, 3, "{audit}");
    answers.push(audit);
    let r = client
        .get(format!("{base}/v1/tasks/{task_id}"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    answers.push(r.text().await.unwrap());

    // Stop (SIGTERM), so the mirror and the logs are complete.
    stop_server(&mut server, &server_log).await;

    let mirror = std::fs::read_to_string(dir.path().join("mirror.jsonl")).unwrap();
    assert!(mirror.contains("[redacted]"), "{mirror}");
    let logs = server_log();
    // JSON logs: one object per line, request lines with their id.
    assert!(
        logs.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v.is_object())),
        "{logs}"
    );
    assert!(logs.contains("\"request_id\":\"req_"), "{logs}");
    for secret in [ALLOWED, TOO_LONG, POLICY] {
        for (what, text) in answers
            .iter()
            .map(|a| ("an answer", a.as_str()))
            .chain([("the mirror", mirror.as_str()), ("the logs", logs.as_str())])
        {
            assert!(!text.contains(secret), "{secret} in {what}:\n{text}");
        }
    }
}

/// SIGTERM while 16 clients are calling: `serve` exits 0 within its
/// shutdown bound (`run::SHUTDOWN_BOUND`, 10 s, plus the moment the
/// runtime gets to stop), every call it acknowledged is in the audit log,
/// and the chain verifies with the checkpoint signed on the way out.
/// (Closing the embedded ledger while reads were in flight could deadlock
/// the process on SQLite 3.51.1; see `crates/store/tests/close_churn.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_exits_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::portcullis(dir.path(), &["keygen", "--out", "keys/k1.ed25519"]);
    assert!(out.status.success(), "keygen: {out:?}");
    let listen = format!("127.0.0.1:{}", free_port());
    write_config(dir.path(), &listen, "");
    let base = format!("http://{listen}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let mut server = common::start_server(dir.path(), &base, &client, "serve.log").await;
    let server_log = || std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();

    let r = client
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(BOOTSTRAP)
        .json(&json!({ "agent_id": "ingest-bot", "goal": "shutdown under load" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let started: Value = r.json().await.unwrap();
    let task_id = started["task_id"].as_str().unwrap().to_owned();
    let access = started["access_token"].as_str().unwrap().to_owned();

    // 16 clients call until the gateway stops answering (bounded: 30 s).
    let stop_at = std::time::Instant::now() + Duration::from_secs(30);
    let mut clients = Vec::new();
    for c in 0..16 {
        let (client, base, task_id, access) = (
            client.clone(),
            base.clone(),
            task_id.clone(),
            access.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                if std::time::Instant::now() > stop_at {
                    break;
                }
                let sql = format!("select {c} as client, {i} as call");
                let sent = client
                    .post(format!("{base}/v1/tasks/{task_id}/calls"))
                    .bearer_auth(&access)
                    .json(&json!({ "tool": "warehouse.query", "arguments": { "sql": sql } }))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => acked.push(sql),
                    Ok(_) => {}
                    // Connection refused or reset: the gateway is gone.
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, took) =
        common::sigterm_and_wait(&mut server, Duration::from_secs(13), &server_log).await;
    eprintln!("SIGTERM under load: {status} after {took:?}");
    assert!(status.success(), "{status}:\n{}", server_log());
    let mut acked = Vec::new();
    for c in clients {
        acked.extend(c.await.unwrap());
    }
    assert!(!acked.is_empty(), "calls were answered before the stop");

    let out = common::portcullis(
        dir.path(),
        &["audit", "verify", "--config", "portcullis.toml", "--quiet"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = common::portcullis(
        dir.path(),
        &["audit", "export", "--config", "portcullis.toml"],
    );
    assert!(export.status.success());
    let log = String::from_utf8_lossy(&export.stdout);
    let missing: Vec<&String> = acked
        .iter()
        .filter(|sql| !log.contains(sql.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged calls are not in the audit log: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Regression: two `serve` processes on one SQLite ledger shared it
/// without coordination, so a halt or revocation through one left the
/// task's tokens live on the other (its cache of live tokens) for up to
/// 15 minutes. The second now refuses to start, saying why; once the first
/// has stopped, it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_one_sqlite_ledger_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::portcullis(dir.path(), &["keygen", "--out", "keys/k1.ed25519"]);
    assert!(out.status.success(), "keygen: {out:?}");
    let first_listen = format!("127.0.0.1:{}", free_port());
    write_config(dir.path(), &first_listen, "");
    let second_listen = format!("127.0.0.1:{}", free_port());
    let text = std::fs::read_to_string(dir.path().join("portcullis.toml")).unwrap();
    std::fs::write(
        dir.path().join("second.toml"),
        text.replace(&first_listen, &second_listen),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let first_base = format!("http://{first_listen}");
    let mut first = common::start_server(dir.path(), &first_base, &client, "first.log").await;

    let second = Command::new(BIN)
        .args(["serve", "--config", "second.toml"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(!second.status.success(), "{said}");
    assert!(
        said.contains("in use by another `portcullis serve`"),
        "{said}"
    );
    // The first is unharmed.
    let r = client
        .get(format!("{first_base}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let first_log = || std::fs::read_to_string(dir.path().join("first.log")).unwrap_or_default();
    stop_server(&mut first, &first_log).await;
    let second_base = format!("http://{second_listen}");
    let mut second = common::start_server_within(
        dir.path(),
        std::path::Path::new("second.toml"),
        &second_base,
        &client,
        "second.log",
        Duration::from_secs(15),
    )
    .await;
    let second_log = || std::fs::read_to_string(dir.path().join("second.log")).unwrap_or_default();
    stop_server(&mut second, &second_log).await;
}
