//! `kill -9` under load (DESIGN section 6: "an acknowledged call is never
//! missing from the log, even after `kill -9`").
//!
//! The built binary serves a configuration with a file ledger; 16 client
//! tasks call tools of 8 tasks as fast as they can while a lifecycle loop
//! starts, uses and completes more tasks. About a second in, the server is
//! SIGKILLed with requests in flight. Every answer a client got before the
//! kill is an acknowledgement, and each must be in the log:
//!
//! * an allowed call (answered 200 with the demo upstream's result, or 403
//!   `upstream_unavailable` if the upstream failed) has its write-ahead
//!   `call.allowed` record for that task and tool, and its
//!   `call.completed` record: always with `audit.durable_results = true`;
//!   by default, every one but those of calls answered in the last
//!   [`CRASH_WINDOW`] before the kill (the completion record is queued
//!   before the answer and durable with the next group commit);
//! * a denied call (403 with a reason) has a `call.denied` record with that
//!   task, tool and reason;
//! * per task and per (kind, tool, reason), records ≥ acknowledged answers;
//! * a started task (201) has its `task.started` record, a completed task
//!   (200) its `task.completed` record.
//!
//! On the ledger the kill left behind: `audit verify` passes (the chain and
//! every checkpoint), every exported line parses and seqs run 1, 2, 3, …
//! without a gap. After a restart on the same configuration and ledger: the
//! tokens of completed tasks stay revoked (401 `token_revoked`, and their
//! refresh tokens are refused), tokens of tasks still running still work,
//! `GET /v1/audit` paged with `since_seq` returns what the export holds,
//! and a new task starts and is served.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test: a panic is a failed assertion"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::{ADMIN, BOOTSTRAP, free_port, portcullis, start_server};

/// Long-lived tasks the call clients share.
const TASKS: usize = 8;
/// Concurrent call clients.
const CLIENTS: usize = 16;
/// When the server is killed, after the load starts: at the earliest…
const KILL_AFTER: Duration = Duration::from_millis(1000);
/// …once this many calls were answered (so each task has more than a page
/// of records, however busy the machine)…
const ANSWERS_BEFORE_KILL: u64 = 400;
/// …and at the latest.
const KILL_BY: Duration = Duration::from_secs(10);
/// The longest the load runs (it stops at the kill).
const LOAD_FOR: Duration = Duration::from_secs(12);
/// Without `audit.durable_results`, the completion records a kill may take
/// with it are of calls answered at most this long before it (in practice
/// the last group commit: milliseconds).
const CRASH_WINDOW: Duration = Duration::from_secs(1);

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A started task, as the client saw it.
#[derive(Debug, Clone)]
struct Started {
    task_id: String,
    access: String,
    refresh: String,
}

async fn start_task(client: &reqwest::Client, base: &str) -> reqwest::Result<(u16, Value)> {
    let r = client
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(BOOTSTRAP)
        .json(&json!({ "agent_id": "ingest-bot", "goal": "crash test" }))
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

fn started(body: &Value) -> Started {
    Started {
        task_id: body["task_id"].as_str().unwrap().to_owned(),
        access: body["access_token"].as_str().unwrap().to_owned(),
        refresh: body["refresh_token"].as_str().unwrap().to_owned(),
    }
}

/// What an answered call must have left in the log: the record kind, the
/// tool and the reason (empty for `call.allowed`).
type Key = (String, &'static str, String, String);

/// Everything the clients saw.
#[derive(Debug, Default)]
struct Seen {
    /// Acknowledged call answers, by (task, kind, tool, reason).
    acked: BTreeMap<Key, u64>,
    /// Acknowledged call answers per task.
    acked_per_task: BTreeMap<String, u64>,
    /// Acknowledged outcomes of allowed calls (their `call.completed`
    /// records), with when the answer came.
    completions: Vec<(Key, Instant)>,
    /// Tasks whose start was acknowledged (201).
    started: Vec<Started>,
    /// Tasks whose completion was acknowledged (200).
    completed: Vec<Started>,
    /// Answers that are not call decisions (401 and the like), by status.
    other: BTreeMap<u16, u64>,
    /// Requests that got no answer: sent before the kill and failed.
    in_flight_at_kill: u64,
    /// Requests that failed after the kill (refused, reset) or answered 503.
    unacknowledged: u64,
}

impl Seen {
    fn ack(&mut self, task_id: &str, kind: &'static str, tool: &str, reason: &str) {
        *self
            .acked
            .entry((task_id.to_owned(), kind, tool.to_owned(), reason.to_owned()))
            .or_default() += 1;
    }

    fn complete(&mut self, task_id: &str, tool: &str, reason: &str) {
        let key = (
            task_id.to_owned(),
            "call.completed",
            tool.to_owned(),
            reason.to_owned(),
        );
        self.completions.push((key, Instant::now()));
    }

    fn merge(&mut self, other: Self) {
        for (k, n) in other.acked {
            *self.acked.entry(k).or_default() += n;
        }
        for (k, n) in other.acked_per_task {
            *self.acked_per_task.entry(k).or_default() += n;
        }
        self.completions.extend(other.completions);
        self.started.extend(other.started);
        self.completed.extend(other.completed);
        for (k, n) in other.other {
            *self.other.entry(k).or_default() += n;
        }
        self.in_flight_at_kill += other.in_flight_at_kill;
        self.unacknowledged += other.unacknowledged;
    }
}

/// The flags the load loops watch.
#[derive(Debug, Default)]
struct Flags {
    /// Set just before the SIGKILL.
    killing: AtomicBool,
    /// Requests answered (any status), for the report.
    answered: AtomicU64,
}

/// One call; returns whether the loop should go on.
async fn call(
    client: &reqwest::Client,
    base: &str,
    task: &Started,
    tool: &str,
    arguments: Value,
    flags: &Flags,
    seen: &mut Seen,
) -> bool {
    let sent_before_kill = !flags.killing.load(Ordering::SeqCst);
    let answer = async {
        let r = client
            .post(format!("{base}/v1/tasks/{}/calls", task.task_id))
            .bearer_auth(&task.access)
            .json(&json!({ "tool": tool, "arguments": arguments }))
            .send()
            .await?;
        let status = r.status().as_u16();
        let body: Value = r.json().await?;
        Ok::<_, reqwest::Error>((status, body))
    }
    .await;
    let (status, body) = match answer {
        Ok(a) => a,
        Err(_) => {
            // Connection reset or refused: not acknowledged.
            if sent_before_kill {
                seen.in_flight_at_kill += 1;
            } else {
                seen.unacknowledged += 1;
            }
            return !flags.killing.load(Ordering::SeqCst);
        }
    };
    flags.answered.fetch_add(1, Ordering::Relaxed);
    let error = body["error"].as_str().unwrap_or_default();
    match status {
        200 => {
            // Allowed, recorded, forwarded, and the outcome recorded: both
            // records precede this answer.
            assert_eq!(body["decision"], "allow", "{body}");
            seen.ack(&task.task_id, "call.allowed", tool, "");
            seen.complete(&task.task_id, tool, "");
        }
        403 if error == "upstream_unavailable" => {
            // Allowed, recorded, forwarded to a disconnected upstream, and
            // the failure recorded: both records precede this answer.
            seen.ack(&task.task_id, "call.allowed", tool, "");
            seen.complete(&task.task_id, tool, "upstream_unavailable");
        }
        403 => {
            assert!(!error.is_empty(), "a denial names its reason: {body}");
            seen.ack(&task.task_id, "call.denied", tool, error);
        }
        503 => {
            // The ledger could not answer: nothing is promised.
            seen.unacknowledged += 1;
            return true;
        }
        s => {
            *seen.other.entry(s).or_default() += 1;
            return true;
        }
    }
    *seen.acked_per_task.entry(task.task_id.clone()).or_default() += 1;
    true
}

/// The calls client `n` makes, in turn: allowed, denied by the workflow or
/// the schema, denied by a policy.
fn next_call(n: usize, k: usize) -> (&'static str, Value) {
    match (n + k) % 4 {
        0 => ("warehouse.connect", json!({ "database": "sales" })),
        1 => (
            "warehouse.query",
            json!({ "sql": format!("select id from orders where n = {k}") }),
        ),
        2 => ("warehouse.query", json!({ "sql": "select * from orders" })),
        _ => ("warehouse.connect", json!({ "database": k })),
    }
}

async fn call_client(
    n: usize,
    client: reqwest::Client,
    base: String,
    task: Started,
    flags: Arc<Flags>,
    until: Instant,
) -> Seen {
    let mut seen = Seen::default();
    let mut k = 0;
    while Instant::now() < until {
        let (tool, args) = next_call(n, k);
        k += 1;
        if !call(&client, &base, &task, tool, args, &flags, &mut seen).await {
            break;
        }
    }
    seen
}

/// Starts a task, makes one call, completes it; again and again.
async fn lifecycle_client(
    client: reqwest::Client,
    base: String,
    flags: Arc<Flags>,
    until: Instant,
) -> Seen {
    let mut seen = Seen::default();
    while Instant::now() < until {
        let Ok((201, body)) = start_task(&client, &base).await else {
            if flags.killing.load(Ordering::SeqCst) {
                break;
            }
            continue;
        };
        let task = started(&body);
        seen.started.push(task.clone());
        let (tool, args) = next_call(1, 0);
        if !call(&client, &base, &task, tool, args, &flags, &mut seen).await {
            break;
        }
        let done = async {
            let r = client
                .post(format!("{base}/v1/tasks/{}/complete", task.task_id))
                .bearer_auth(&task.access)
                .send()
                .await?;
            let status = r.status().as_u16();
            let body: Value = r.json().await?;
            Ok::<_, reqwest::Error>((status, body))
        }
        .await;
        match done {
            Ok((200, body)) => {
                assert_eq!(body["status"], "completed", "{body}");
                seen.completed.push(task);
            }
            Ok((status, body)) => panic!("complete answered {status}: {body}"),
            Err(_) => break,
        }
    }
    seen
}

/// Every audit record of `task_id` through `GET /v1/audit`, paged with
/// `since_seq`.
async fn audit_of(client: &reqwest::Client, base: &str, task_id: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut since = 0u64;
    loop {
        let r = client
            .get(format!(
                "{base}/v1/audit?task_id={task_id}&since_seq={since}&limit=50"
            ))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        let records = page["records"].as_array().unwrap().clone();
        if records.is_empty() {
            assert_eq!(page["next_since_seq"], Value::Null, "{page}");
            return all;
        }
        let next = page["next_since_seq"].as_u64().unwrap();
        assert_eq!(next, records.last().unwrap()["seq"].as_u64().unwrap());
        assert!(next > since);
        since = next;
        all.extend(records);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_calls_survive_kill_9() {
    kill_9_under_load(true).await;
}

/// The default (`audit.durable_results = false`): an answer waits for its
/// call's write-ahead record only; the completion record rides on the next
/// group commit, so a kill loses at most those of the last moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_loses_no_write_ahead_record_and_only_the_last_completions() {
    kill_9_under_load(false).await;
}

async fn kill_9_under_load(durable_results: bool) {
    let test_started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let keygen = portcullis(
        dir,
        &[
            "keygen",
            "--out",
            dir.join("keys/k1.ed25519").to_str().unwrap(),
        ],
    );
    assert!(keygen.status.success(), "keygen: {}", text(&keygen));
    let listen = format!("127.0.0.1:{}", free_port());
    common::write_config(
        dir,
        &listen,
        &format!(
            "checkpoint_every = 200\ncheckpoint_interval = \"1s\"\ndurable_results = {durable_results}"
        ),
    );
    let base = format!("http://{listen}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let mut server = start_server(dir, &base, &client, "serve-1.log").await;

    // The tasks the call clients share.
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (status, body) = start_task(&client, &base).await.unwrap();
        assert_eq!(status, 201, "{body}");
        tasks.push(started(&body));
    }

    // The load, then SIGKILL in the middle of it.
    let flags = Arc::new(Flags::default());
    let load_started = Instant::now();
    let until = load_started + LOAD_FOR;
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
        clients.push(tokio::spawn(call_client(
            n,
            client.clone(),
            base.clone(),
            tasks[n % TASKS].clone(),
            flags.clone(),
            until,
        )));
    }
    let lifecycle = tokio::spawn(lifecycle_client(
        client.clone(),
        base.clone(),
        flags.clone(),
        until,
    ));
    tokio::time::sleep(KILL_AFTER).await;
    while flags.answered.load(Ordering::SeqCst) < ANSWERS_BEFORE_KILL
        && load_started.elapsed() < KILL_BY
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answered_before_kill = flags.answered.load(Ordering::SeqCst);
    flags.killing.store(true, Ordering::SeqCst);
    let kill_instant = Instant::now();
    server.0.kill().unwrap();
    let status = server.0.wait().unwrap();
    assert!(!status.success(), "killed, not exited: {status}");
    let killed_at = load_started.elapsed();

    let mut seen = Seen::default();
    for c in clients {
        seen.merge(c.await.unwrap());
    }
    seen.merge(lifecycle.await.unwrap());
    let acked_calls: u64 = seen.acked_per_task.values().sum();
    eprintln!(
        "load: {acked_calls} acknowledged calls ({answered_before_kill} answers before the \
         kill at {killed_at:?}), {} tasks started and {} completed by the lifecycle loop, \
         {} requests in flight at the kill, {} unacknowledged, other answers {:?}",
        seen.started.len(),
        seen.completed.len(),
        seen.in_flight_at_kill,
        seen.unacknowledged,
        seen.other
    );
    assert!(
        seen.in_flight_at_kill >= 1,
        "the kill must hit requests in flight"
    );
    let allowed: u64 = seen
        .acked
        .iter()
        .filter(|(k, _)| k.1 == "call.allowed")
        .map(|(_, n)| n)
        .sum();
    let denied: u64 = seen
        .acked
        .iter()
        .filter(|(k, _)| k.1 == "call.denied")
        .map(|(_, n)| n)
        .sum();
    assert!(allowed >= 10 && denied >= 10, "{:?}", seen.acked);
    assert!(!seen.completed.is_empty(), "no task was completed");

    // The ledger as the kill left it: the chain and its checkpoints verify.
    let out = portcullis(
        dir,
        &["audit", "verify", "--config", "portcullis.toml", "--quiet"],
    );
    assert!(out.status.success(), "verify after kill: {}", text(&out));
    eprintln!(
        "verify after kill: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );

    // Every line of the export parses; seqs run 1, 2, 3, … with no gap.
    let out = portcullis(dir, &["audit", "export", "--config", "portcullis.toml"]);
    assert!(out.status.success(), "export: {}", text(&out));
    let export = String::from_utf8(out.stdout).unwrap();
    assert!(export.ends_with('\n'), "the export ends with a whole line");
    let mut records: Vec<Value> = Vec::new();
    let mut checkpoints = 0;
    for (i, line) in export.lines().enumerate() {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("export line {} does not parse ({e}): {line}", i + 1));
        if value.get("checkpoint").is_some() {
            checkpoints += 1;
            continue;
        }
        let seq = value["seq"].as_u64().unwrap();
        assert_eq!(seq, records.len() as u64 + 1, "seq gap at line {}", i + 1);
        for field in ["prev_hash", "hash"] {
            let h = value[field].as_str().unwrap();
            assert!(
                h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()),
                "{line}"
            );
        }
        if let Some(prev) = records.last() {
            assert_eq!(value["prev_hash"], prev["hash"], "chain link at seq {seq}");
        }
        records.push(value);
    }
    assert!(checkpoints >= 1, "the load crossed a checkpoint");

    // Every acknowledged answer has its record.
    let mut found: BTreeMap<Key, u64> = BTreeMap::new();
    let mut calls_per_task: BTreeMap<String, u64> = BTreeMap::new();
    let mut kinds_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &records {
        let kind = r["kind"].as_str().unwrap();
        let Some(task_id) = r["task_id"].as_str() else {
            continue;
        };
        kinds_of
            .entry(task_id.to_owned())
            .or_default()
            .insert(kind.to_owned());
        let key_kind = match kind {
            "call.allowed" => "call.allowed",
            "call.denied" => "call.denied",
            "call.completed" => "call.completed",
            _ => continue,
        };
        if key_kind != "call.completed" {
            *calls_per_task.entry(task_id.to_owned()).or_default() += 1;
        }
        let tool = r["tool"].as_str().unwrap().to_owned();
        let reason = r["reason"].as_str().unwrap_or_default().to_owned();
        *found
            .entry((task_id.to_owned(), key_kind, tool, reason))
            .or_default() += 1;
    }
    let mut missing = Vec::new();
    for (key, &acked) in &seen.acked {
        let recorded = found.get(key).copied().unwrap_or(0);
        if recorded < acked {
            missing.push(format!(
                "{key:?}: {acked} acknowledged, {recorded} recorded"
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged calls missing from the log:\n{}",
        missing.join("\n")
    );
    // Completion records: all of them, or all but those of the last moment.
    let mut acked_completions: BTreeMap<&Key, (u64, u64)> = BTreeMap::new();
    for (key, at) in &seen.completions {
        let entry = acked_completions.entry(key).or_default();
        entry.0 += 1;
        if *at + CRASH_WINDOW > kill_instant {
            entry.1 += 1;
        }
    }
    let mut lost = 0;
    for (key, &(acked, late)) in &acked_completions {
        let recorded = found.get(*key).copied().unwrap_or(0);
        let may_lose = if durable_results { 0 } else { late };
        assert!(
            recorded + may_lose >= acked,
            "{key:?}: {acked} acknowledged outcomes ({late} in the last {CRASH_WINDOW:?}), \
             {recorded} call.completed records (durable_results = {durable_results})"
        );
        lost += acked.saturating_sub(recorded);
    }
    eprintln!(
        "completion records: {} acknowledged, {lost} lost to the kill (durable_results = {durable_results})",
        seen.completions.len()
    );
    for (task_id, &acked) in &seen.acked_per_task {
        let recorded = calls_per_task.get(task_id).copied().unwrap_or(0);
        assert!(
            recorded >= acked,
            "task {task_id}: {acked} acknowledged calls, {recorded} call records"
        );
    }
    for t in &seen.started {
        let kinds = kinds_of.get(&t.task_id).cloned().unwrap_or_default();
        assert!(
            kinds.contains("task.started") && kinds.contains("token.issued"),
            "acknowledged start of {} not recorded: {kinds:?}",
            t.task_id
        );
    }
    for t in &seen.completed {
        let kinds = kinds_of.get(&t.task_id).cloned().unwrap_or_default();
        assert!(
            kinds.contains("task.completed") && kinds.contains("token.revoked"),
            "acknowledged completion of {} not recorded: {kinds:?}",
            t.task_id
        );
    }

    // Restart on the same configuration and ledger (and a new client: the
    // old one's pooled connections died with the server).
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let server = start_server(dir, &base, &client, "serve-2.log").await;

    // Completed tasks stay completed, their tokens revoked.
    for t in &seen.completed {
        let r = client
            .get(format!("{base}/v1/tasks/{}", t.task_id))
            .bearer_auth(&t.access)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "task {}", t.task_id);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "token_revoked", "{body}");
        let r = client
            .post(format!("{base}/oauth/token"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", t.refresh.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "refresh of completed task {}", t.task_id);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "invalid_grant", "{body}");
    }
    let first = &seen.completed[0];
    let r = client
        .post(format!("{base}/v1/tasks/{}/calls", first.task_id))
        .bearer_auth(&first.access)
        .json(&json!({ "tool": "warehouse.query", "arguments": { "sql": "select 1" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "token_revoked", "{body}");

    // Tasks still running keep working with their tokens.
    for t in &tasks {
        let r = client
            .get(format!("{base}/v1/tasks/{}", t.task_id))
            .bearer_auth(&t.access)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "task {}", t.task_id);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "active", "{body}");
    }

    // The admin API pages through what the export holds.
    let exported_max = records.len() as u64;
    for t in &tasks[..2] {
        let via_api: Vec<Value> = audit_of(&client, &base, &t.task_id)
            .await
            .into_iter()
            .filter(|r| r["seq"].as_u64().unwrap() <= exported_max)
            .collect();
        let via_export: Vec<Value> = records
            .iter()
            .filter(|r| r["task_id"] == t.task_id.as_str())
            .cloned()
            .collect();
        assert!(via_export.len() > 50, "more than one page");
        assert_eq!(via_api, via_export, "task {}", t.task_id);
    }

    // A new task starts, and its call is decided and recorded.
    let (status, body) = start_task(&client, &base).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let fresh = started(&body);
    let r = client
        .post(format!("{base}/v1/tasks/{}/calls", fresh.task_id))
        .bearer_auth(&fresh.access)
        .json(&json!({ "tool": "warehouse.connect", "arguments": { "database": "sales" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["decision"], "allow", "{body}");
    let log = audit_of(&client, &base, &fresh.task_id).await;
    let kinds: Vec<&str> = log.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"task.started") && kinds.contains(&"call.allowed"),
        "{kinds:?}"
    );
    let first_new = log[0]["seq"].as_u64().unwrap();
    assert!(
        first_new > exported_max,
        "the chain continues after the crash"
    );

    // The whole log, crash and restart included, still verifies.
    let out = portcullis(
        dir,
        &["audit", "verify", "--config", "portcullis.toml", "--quiet"],
    );
    assert!(out.status.success(), "verify after restart: {}", text(&out));
    drop(server);
    eprintln!("crash test took {:?}", test_started.elapsed());
}
