//! The cluster shape with real processes (DESIGN section 8): replicas of
//! the built `portcullis` binary on one PostgreSQL ledger, the demo
//! warehouse as their one HTTP upstream, and nginx in front of them as
//! `examples/cluster/` configures it.
//!
//! * a task started on replica 1 is served by replicas 2 and 3;
//! * replicas racing on one task (two branches of its workflow, or the
//!   last call of a budget) never both win, and the audit log agrees;
//! * a token revoked through replica 1 is refused by replica 3 within one
//!   second, although replica 3 had served it;
//! * a replica SIGKILLed under load behind nginx: the others keep serving
//!   and nginx routes around the dead one;
//! * PostgreSQL stopped: every replica fails closed (`/readyz` 503, calls
//!   503 `internal_error`, the upstream sees nothing), then recovers
//!   without a restart when PostgreSQL is back;
//! * PostgreSQL restarted (`-m fast`) and crashed (`-m immediate`) under
//!   load: every call a client saw acknowledged has its `call.allowed` and
//!   `call.completed` records, and the chain verifies;
//! * PostgreSQL frozen (it hangs instead of refusing): `/readyz` still
//!   answers 503 within seconds (a past bug: it waited the store's whole
//!   30 s operation timeout).
//!
//! Every test skips with a `SKIP:` notice unless
//! `PORTCULLIS_TEST_POSTGRES_URL` is set (`.ci/run` sets it); the nginx
//! test also needs `nginx`, the PostgreSQL restart tests PostgreSQL's
//! server binaries (`initdb`, `pg_ctl`) for a private server of their own
//! (the shared one is never stopped). One cluster runs at a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test: a panic is a failed assertion"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;

use common::cluster::{
    HEAVY, Nginx, PrivatePostgres, Replicas, Schema, Upstream, audit, call, have_nginx, outcome,
    postgres_url, start_task,
};
use common::portcullis;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn out_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `portcullis audit verify` on the shared ledger (through replica 1's
/// configuration) must pass.
fn assert_chain_verifies(dir: &std::path::Path) {
    let out = portcullis(
        dir,
        &["audit", "verify", "--config", "replica-1.toml", "--quiet"],
    );
    assert!(out.status.success(), "audit verify: {}", out_text(&out));
}

/// Probes `base` with `token` until it refuses it, from the moment the
/// revocation was acknowledged (`revoked_at`). Every probe sent more than
/// one second after it must be refused (DESIGN section 8); returns how
/// long after `revoked_at` the first refusal was answered.
async fn refused_within_a_second(
    client: &reqwest::Client,
    base: &str,
    task_id: &str,
    token: &str,
    revoked_at: Instant,
) -> Duration {
    loop {
        let sent = revoked_at.elapsed();
        let answer = call(
            client,
            base,
            task_id,
            token,
            "warehouse.echo",
            json!({"text": "probe"}),
        )
        .await
        .unwrap();
        if answer.0 == 401 {
            assert_eq!(answer.1["error"], "token_revoked", "{}", answer.1);
            let refused = revoked_at.elapsed();
            // Refused for good: never accepted again.
            for _ in 0..3 {
                let again = call(
                    client,
                    base,
                    task_id,
                    token,
                    "warehouse.echo",
                    json!({"text": "probe"}),
                )
                .await
                .unwrap();
                assert_eq!(outcome(&again), "token_revoked");
            }
            return refused;
        }
        assert!(
            sent < Duration::from_secs(1),
            "a probe sent {sent:?} after the revocation was accepted: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_started_on_one_replica_is_served_by_the_others() {
    let Some(base_url) = postgres_url("cluster a_task_started_on_one_replica") else {
        return;
    };
    let _heavy = HEAVY.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let schema = Schema::create(&base_url);
    let upstream = Upstream::start(dir).await;
    let replicas = Replicas::start(dir, 3, &schema.url, upstream.port).await;
    let (r1, r2, r3) = (&replicas.bases[0], &replicas.bases[1], &replicas.bases[2]);
    let http = client();

    let (task_id, token) = start_task(&http, r1, "race-bot").await;
    let connect = call(
        &http,
        r2,
        &task_id,
        &token,
        "warehouse.connect",
        json!({"database": "sales"}),
    )
    .await
    .unwrap();
    assert_eq!(connect.0, 200, "{}", connect.1);
    assert_eq!(connect.1["result"]["structuredContent"]["connected"], true);
    // Replica 3 moves the task to `left`...
    let query = call(
        &http,
        r3,
        &task_id,
        &token,
        "warehouse.query",
        json!({"sql": "SELECT count(*) AS n FROM customers"}),
    )
    .await
    .unwrap();
    assert_eq!(query.0, 200, "{}", query.1);
    // ...which replica 2 sees: the other branch is closed there.
    let other_branch = call(
        &http,
        r2,
        &task_id,
        &token,
        "warehouse.validate",
        json!({"table": "staging_customers", "rows": []}),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome(&other_branch),
        "state_violation",
        "{other_branch:?}"
    );
    // The budget is shared too: one insert per task, whichever replica.
    let insert = |base: String, name: &'static str| {
        let (http, task_id, token) = (http.clone(), task_id.clone(), token.clone());
        async move {
            call(
                &http,
                &base,
                &task_id,
                &token,
                "warehouse.insert",
                json!({"table": "staging_customers", "rows": [{"id": 1, "name": name}]}),
            )
            .await
            .unwrap()
        }
    };
    let first = insert(r2.clone(), "a-first").await;
    assert_eq!(first.0, 200, "{}", first.1);
    let second = insert(r3.clone(), "a-second").await;
    assert_eq!(outcome(&second), "limit_exceeded", "{second:?}");
    assert_eq!(upstream.staged("a-first").await, 1);
    assert_eq!(
        upstream.staged("a-second").await,
        0,
        "a denied call is never forwarded"
    );

    // Replica 1 reports what the others did.
    let status: Value = http
        .get(format!("{r1}/v1/tasks/{task_id}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["state"], "left", "{status}");
    // A refresh on replica 3 gives a token replica 1 accepts.
    let refresh = {
        let r: Value = http
            .post(format!("{r1}/v1/tasks"))
            .bearer_auth(common::cluster::secret("load-bot"))
            .json(&json!({"agent_id": "load-bot", "goal": "refresh"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r
    };
    let rotated: Value = http
        .post(format!("{r3}/oauth/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh["refresh_token"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_token = rotated["access_token"].as_str().unwrap();
    let echoed = call(
        &http,
        r1,
        refresh["task_id"].as_str().unwrap(),
        new_token,
        "warehouse.echo",
        json!({"text": "hi"}),
    )
    .await
    .unwrap();
    assert_eq!(echoed.0, 200, "{}", echoed.1);
    // The spent refresh token is spent everywhere.
    let reused = http
        .post(format!("{r2}/oauth/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh["refresh_token"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), 400);

    // One log, whichever replica wrote each record.
    let log = audit(&http, r1, Some(&task_id)).await;
    let calls: Vec<(String, String, String)> = log
        .iter()
        .filter(|r| r["kind"] == "call.allowed" || r["kind"] == "call.denied")
        .map(|r| {
            (
                r["tool"].as_str().unwrap().to_owned(),
                r["kind"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("warehouse.connect", "call.allowed", ""),
        ("warehouse.query", "call.allowed", ""),
        ("warehouse.validate", "call.denied", "state_violation"),
        ("warehouse.insert", "call.allowed", ""),
        ("warehouse.insert", "call.denied", "limit_exceeded"),
    ]
    .iter()
    .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
    .collect();
    assert_eq!(calls, expected);
    assert_chain_verifies(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_racing_on_one_task_never_both_win() {
    const ROUNDS: usize = 30;
    let Some(base_url) = postgres_url("cluster replicas_racing_on_one_task") else {
        return;
    };
    let _heavy = HEAVY.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let schema = Schema::create(&base_url);
    let upstream = Upstream::start(dir).await;
    let replicas = Replicas::start(dir, 3, &schema.url, upstream.port).await;
    let (r1, r2, r3) = (&replicas.bases[0], &replicas.bases[1], &replicas.bases[2]);
    let http = client();
    let mut branch_wins: BTreeMap<&str, usize> = BTreeMap::new();
    let mut branches: BTreeMap<&str, usize> = BTreeMap::new();
    let mut insert_wins: BTreeMap<&str, usize> = BTreeMap::new();

    for round in 0..ROUNDS {
        let (task_id, token) = start_task(&http, r3, "race-bot").await;
        // Two branches of the workflow at once, on two replicas: one task
        // can take only one (which replica gets which swaps every round).
        // A jitter of 0-3 ms on one side varies who gets there first.
        let (left_at, right_at) = if round % 2 == 0 { (r1, r2) } else { (r2, r1) };
        let jitter = Duration::from_micros((round as u64 * 7919) % 3000);
        let (left_delay, right_delay) = if round % 4 < 2 {
            (jitter, Duration::ZERO)
        } else {
            (Duration::ZERO, jitter)
        };
        let (left, right) = tokio::join!(
            async {
                tokio::time::sleep(left_delay).await;
                call(
                    &http,
                    left_at,
                    &task_id,
                    &token,
                    "warehouse.query",
                    json!({"sql": "SELECT 1 AS one"}),
                )
                .await
            },
            async {
                tokio::time::sleep(right_delay).await;
                call(
                    &http,
                    right_at,
                    &task_id,
                    &token,
                    "warehouse.validate",
                    json!({"table": "staging_customers", "rows": []}),
                )
                .await
            },
        );
        let (left, right) = (left.unwrap(), right.unwrap());
        let outcomes = [outcome(&left), outcome(&right)];
        let winner = match (outcomes[0].as_str(), outcomes[1].as_str()) {
            ("allow", "state_violation") => "left",
            ("state_violation", "allow") => "right",
            _ => panic!("round {round}: branches {left:?} / {right:?}: exactly one must win"),
        };
        let branch_winner = if (winner == "left") == (left_at == r1) {
            "replica 1"
        } else {
            "replica 2"
        };
        *branch_wins.entry(branch_winner).or_default() += 1;
        *branches.entry(winner).or_default() += 1;

        // The task's last insert, twice at once: one wins, one is over
        // budget, and the upstream sees exactly one.
        let name = format!("race-{round}");
        let rows = json!({"table": "staging_customers", "rows": [{"id": round, "name": name}]});
        let (a, b) = tokio::join!(
            call(
                &http,
                r1,
                &task_id,
                &token,
                "warehouse.insert",
                rows.clone()
            ),
            call(
                &http,
                r2,
                &task_id,
                &token,
                "warehouse.insert",
                rows.clone()
            ),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let insert_winner = match (outcome(&a).as_str(), outcome(&b).as_str()) {
            ("allow", "limit_exceeded") => "replica 1",
            ("limit_exceeded", "allow") => "replica 2",
            _ => panic!("round {round}: inserts {a:?} / {b:?}: exactly one must win"),
        };
        *insert_wins.entry(insert_winner).or_default() += 1;
        assert_eq!(upstream.staged(&name).await, 1, "round {round}");

        // The log (read through the third replica) tells the same story.
        let log = audit(&http, r3, Some(&task_id)).await;
        let count = |kind: &str, tool: &str, reason: Option<&str>| {
            log.iter()
                .filter(|r| {
                    r["kind"] == kind
                        && r["tool"] == tool
                        && reason.is_none_or(|why| r["reason"] == why)
                })
                .count()
        };
        let (won, lost) = if winner == "left" {
            ("warehouse.query", "warehouse.validate")
        } else {
            ("warehouse.validate", "warehouse.query")
        };
        assert_eq!(
            count("call.allowed", won, None),
            1,
            "round {round}: {log:#?}"
        );
        assert_eq!(count("call.allowed", lost, None), 0, "round {round}");
        assert_eq!(
            count("call.denied", lost, Some("state_violation")),
            1,
            "round {round}"
        );
        let moves: Vec<&Value> = log
            .iter()
            .filter(|r| r["kind"] == "state.transition")
            .collect();
        assert_eq!(moves.len(), 1, "round {round}: one move: {moves:#?}");
        assert_eq!(moves[0]["state_from"], "start");
        assert_eq!(moves[0]["state_to"], winner);
        assert_eq!(count("call.allowed", "warehouse.insert", None), 1);
        assert_eq!(count("call.completed", "warehouse.insert", None), 1);
        assert_eq!(
            count("call.denied", "warehouse.insert", Some("limit_exceeded")),
            1
        );
    }
    eprintln!(
        "branch races won by {branch_wins:?} (branches taken {branches:?}), insert races won by \
         {insert_wins:?}, over {ROUNDS} rounds"
    );
    assert_chain_verifies(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_replica_1_is_honoured_on_replica_3_within_a_second() {
    const ROUNDS: usize = 6;
    let Some(base_url) = postgres_url("cluster a_revocation_on_replica_1") else {
        return;
    };
    let _heavy = HEAVY.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let schema = Schema::create(&base_url);
    let upstream = Upstream::start(dir).await;
    let replicas = Replicas::start(dir, 3, &schema.url, upstream.port).await;
    let (r1, r3) = (&replicas.bases[0], &replicas.bases[2]);
    let http = client();
    let mut delays = Vec::new();
    for round in 0..ROUNDS {
        let (task_id, token) = start_task(&http, r1, "load-bot").await;
        // Replica 3 serves the token, so it is in its cache of live tokens.
        for _ in 0..2 {
            let ok = call(
                &http,
                r3,
                &task_id,
                &token,
                "warehouse.echo",
                json!({"text": "cached"}),
            )
            .await
            .unwrap();
            assert_eq!(ok.0, 200, "{}", ok.1);
        }
        // Replica 1 revokes: the token alone (RFC 7009), or the whole task.
        let revoked = if round % 2 == 0 {
            http.post(format!("{r1}/oauth/revoke"))
                .form(&[("token", token.as_str())])
                .send()
                .await
                .unwrap()
        } else {
            http.post(format!("{r1}/v1/tasks/{task_id}/complete"))
                .bearer_auth(&token)
                .json(&json!({}))
                .send()
                .await
                .unwrap()
        };
        assert_eq!(revoked.status(), 200);
        let revoked_at = Instant::now();
        delays.push(refused_within_a_second(&http, r3, &task_id, &token, revoked_at).await);
    }
    eprintln!("replica 3 refused the revoked token after {delays:?}");
    assert_chain_verifies(dir);
}

/// What the load clients saw through nginx.
#[derive(Debug, Default)]
struct LoadSeen {
    /// (sent, since the kill or None before it; the answer's status, 0
    /// when there was none)
    calls: Vec<(Option<Duration>, u16)>,
    /// Failed answers by status (0: transport error).
    errors: BTreeMap<u16, usize>,
    /// Transport errors: (the call's text argument, the error with causes).
    transport: Vec<(String, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_behind_nginx_is_routed_around() {
    const TASKS: usize = 6;
    const CLIENTS: usize = 12;
    let test = "cluster a_replica_killed_under_load_behind_nginx";
    let Some(base_url) = postgres_url(test) else {
        return;
    };
    if !have_nginx(test) {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let schema = Schema::create(&base_url);
    let upstream = Upstream::start(dir).await;
    let mut replicas = Replicas::start(dir, 3, &schema.url, upstream.port).await;
    let nginx = Nginx::start(dir, &replicas.bases).await;
    let lb = nginx.base.clone();
    let http = client();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        tasks.push(start_task(&http, &lb, "load-bot").await);
    }

    let killed_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
        let (task_id, token) = tasks[n % TASKS].clone();
        let (http, lb, killed_at, stop) =
            (http.clone(), lb.clone(), killed_at.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = LoadSeen::default();
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                k += 1;
                let sent = killed_at.lock().unwrap().map(|at| at.elapsed());
                let text = format!("c{n}-{k}");
                let answer = call(
                    &http,
                    &lb,
                    &task_id,
                    &token,
                    "warehouse.echo",
                    json!({ "text": text }),
                )
                .await;
                let status = answer.as_ref().map_or(0, |a| a.0);
                if status != 200 {
                    *seen.errors.entry(status).or_default() += 1;
                }
                if let Err(e) = answer {
                    seen.transport.push((text, e));
                }
                seen.calls.push((sent, status));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = replicas.pid(1);
    *killed_at.lock().unwrap() = Some(Instant::now());
    replicas.kill(1);
    let kill = Instant::now();
    // The health checker marks it down (it polls every second).
    let marked_down = loop {
        if nginx.upstreams().contains(&format!(
            "server {} down;",
            replicas.bases[1].trim_start_matches("http://")
        )) {
            break kill.elapsed();
        }
        assert!(
            kill.elapsed() < Duration::from_secs(5),
            "the health checker did not mark the dead replica down:\n{}",
            nginx.upstreams()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = LoadSeen::default();
    for c in clients {
        let s = c.await.unwrap();
        seen.calls.extend(s.calls);
        seen.transport.extend(s.transport);
        for (status, n) in s.errors {
            *seen.errors.entry(status).or_default() += n;
        }
    }
    let before = seen.calls.iter().filter(|(s, _)| s.is_none()).count();
    let after_ok = seen
        .calls
        .iter()
        .filter(|(s, status)| s.is_some() && *status == 200)
        .count();
    let errors: usize = seen.errors.values().sum();
    // Calls sent once the dead replica is out of rotation (passive checks
    // already route around it at once; the active check rewrites the
    // configuration within about a second).
    let late_window = marked_down + Duration::from_millis(500);
    let late: Vec<u16> = seen
        .calls
        .iter()
        .filter(|(s, _)| s.is_some_and(|s| s > late_window))
        .map(|(_, status)| *status)
        .collect();
    eprintln!(
        "replica 2 (pid {pid}) killed: {before} calls before, {after_ok} OK after, errors by status {:?}, \
         marked down after {marked_down:?}, {} calls after {late_window:?} of which {} failed",
        seen.errors,
        late.len(),
        late.iter().filter(|status| **status != 200).count()
    );
    assert!(before >= 20, "load before the kill: {before}");
    assert!(
        after_ok >= 50,
        "the other replicas keep serving: {after_ok}"
    );
    // Two kinds of failure, at most about one per client each:
    // - 502: requests in flight to the dead replica (nginx never re-sends
    //   a POST it had sent); their outcome is unknown;
    // - a transport error (no answer): the checker's reload makes nginx's
    //   old worker close its idle keep-alive connections, and a request
    //   written onto one at that instant is never read. Such a request
    //   never reached a replica, which the ledger must confirm below.
    assert!(errors <= 2 * CLIENTS, "errors {:?}", seen.errors);
    assert!(
        seen.errors.keys().all(|s| *s == 502 || *s == 0),
        "failures are nginx's 502 or a closed keep-alive connection: {:?} {:?}",
        seen.errors,
        seen.transport
    );
    // Once the dead replica is out of rotation nothing is routed to it:
    // no 502 (nor any other answer but 200). A connection closed by the
    // reload can still land here on a slow machine; the ledger check below
    // covers it.
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|status| *status == 200 || *status == 0),
        "failed answers after {late_window:?}: {:?}",
        late.iter()
            .filter(|status| **status != 200)
            .collect::<Vec<_>>()
    );
    for i in [0, 2] {
        assert!(replicas.running(i), "replica {} still runs", i + 1);
    }
    assert!(!nginx.upstreams().contains(&format!(
        "server {} down;",
        replicas.bases[0].trim_start_matches("http://")
    )));
    drop(nginx);
    assert_chain_verifies(dir);
    let recorded = recorded_texts(dir);
    for (text, error) in &seen.transport {
        assert!(
            !recorded.contains(text),
            "call {text} failed without an answer ({error}) yet reached a replica"
        );
    }
}

/// The `text` argument of every call the ledger recorded (any kind).
fn recorded_texts(dir: &std::path::Path) -> BTreeSet<String> {
    let out = portcullis(dir, &["audit", "export", "--config", "replica-1.toml"]);
    assert!(out.status.success(), "export: {}", out_text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let r: Value = serde_json::from_str(line).unwrap();
            r["args"]["text"].as_str().map(str::to_owned)
        })
        .collect()
}

/// A call's answer as the fail-closed contract says it must look when the
/// ledger is unreachable: 503, `internal_error`, a detail, and the
/// request id of the `x-request-id` header.
async fn assert_internal_error(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), 503, "{what}");
    let header = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "internal_error", "{what}: {body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert_eq!(body["request_id"].as_str(), Some(header.as_str()), "{body}");
    assert!(header.starts_with("req_"), "{header}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_fail_closed_without_postgres_and_recover_without_a_restart() {
    let test = "cluster replicas_fail_closed_without_postgres";
    if postgres_url(test).is_none() {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let Some(pg) = PrivatePostgres::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let upstream = Upstream::start(dir).await;
    let mut replicas = Replicas::start(dir, 3, &pg.url, upstream.port).await;
    let pids: Vec<u32> = (0..3).map(|i| replicas.pid(i)).collect();
    let bases = replicas.bases.clone();
    let http = client();
    let (task_id, token) = start_task(&http, &bases[0], "load-bot").await;
    let insert = |base: String, name: String| {
        let (http, task_id, token) = (http.clone(), task_id.clone(), token.clone());
        async move {
            http.post(format!("{base}/v1/tasks/{task_id}/calls"))
                .bearer_auth(&token)
                .json(&json!({
                    "tool": "warehouse.insert",
                    "arguments": {"table": "staging_customers", "rows": [{"id": 1, "name": name}]}
                }))
                .send()
                .await
                .unwrap()
        }
    };
    for (i, base) in bases.iter().enumerate() {
        let r = insert(base.clone(), format!("before-{i}")).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        assert_eq!(upstream.staged(&format!("before-{i}")).await, 1);
    }

    pg.stop_server("fast");
    let stopped = Instant::now();
    for (i, base) in bases.iter().enumerate() {
        // Not ready: a load balancer drops the replica.
        loop {
            let r = http.get(format!("{base}/readyz")).send().await.unwrap();
            if r.status() == 503 {
                break;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(15),
                "replica {} still ready without its ledger",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Fails closed: the call is denied and never forwarded, a task
        // cannot start, a token cannot be refreshed.
        let r = insert(base.clone(), format!("during-{i}")).await;
        assert_internal_error(r, &format!("a call on replica {}", i + 1)).await;
        let r = http
            .post(format!("{base}/v1/tasks"))
            .bearer_auth(common::cluster::secret("load-bot"))
            .json(&json!({"agent_id": "load-bot", "goal": "no ledger"}))
            .send()
            .await
            .unwrap();
        assert_internal_error(r, &format!("a task start on replica {}", i + 1)).await;
        let r = http
            .get(format!("{base}/v1/tasks/{task_id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_internal_error(r, &format!("a task read on replica {}", i + 1)).await;
        assert_eq!(
            http.get(format!("{base}/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "alive, only not ready"
        );
    }
    // And stays closed while the ledger is away (the pools keep trying).
    let mut k = 0;
    while stopped.elapsed() < Duration::from_secs(3) {
        k += 1;
        let base = &bases[k % 3];
        let r = insert(base.clone(), format!("during-{}", k % 3)).await;
        assert_internal_error(r, "a call while PostgreSQL is down").await;
        assert_eq!(
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .unwrap()
                .status(),
            503
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..3 {
        assert_eq!(
            upstream.staged(&format!("during-{i}")).await,
            0,
            "the upstream never saw a call made without a ledger"
        );
    }

    pg.start_server();
    let restarted = Instant::now();
    for i in 0..3 {
        replicas.wait_ready(&http, i, Duration::from_secs(30)).await;
    }
    eprintln!(
        "PostgreSQL down {:?}; every replica ready again {:?} after it came back",
        restarted - stopped,
        restarted.elapsed()
    );
    for (i, base) in bases.iter().enumerate() {
        assert!(replicas.running(i), "replica {} still runs", i + 1);
        assert_eq!(replicas.pid(i), pids[i], "the same process, not a restart");
        let r = insert(base.clone(), format!("after-{i}")).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        assert_eq!(upstream.staged(&format!("after-{i}")).await, 1);
    }
    // Revocations flow again (the listeners reconnected).
    let done = http
        .post(format!("{}/v1/tasks/{task_id}/complete", bases[0]))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let revoked_at = Instant::now();
    refused_within_a_second(&http, &bases[2], &task_id, &token, revoked_at).await;
    assert_chain_verifies(dir);
}

/// An acknowledged call: its task, the unique text it echoed, and the
/// SHA-256 of the result the client got (the `result_digest` of its
/// `call.completed` record).
type Acked = (String, String, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_call_is_lost_when_postgres_restarts_under_load() {
    const TASKS: usize = 6;
    const CLIENTS: usize = 8;
    let test = "cluster no_acknowledged_call_is_lost_when_postgres_restarts";
    if postgres_url(test).is_none() {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let Some(pg) = PrivatePostgres::start(test) else {
        return;
    };
    let pg = Arc::new(pg);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let upstream = Upstream::start(dir).await;
    let mut replicas = Replicas::start(dir, 2, &pg.url, upstream.port).await;
    let bases = replicas.bases.clone();
    let http = client();
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        tasks.push(start_task(&http, &bases[i % 2], "load-bot").await);
    }

    // Which restart the load is in: 0 before any, 1 after `-m fast`,
    // 2 after `-m immediate`.
    let phase = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
        let (task_id, token) = tasks[n % TASKS].clone();
        let (http, bases, phase, stop) = (http.clone(), bases.clone(), phase.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut acked: Vec<(usize, Acked)> = Vec::new();
            let mut refused: BTreeMap<String, usize> = BTreeMap::new();
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                k += 1;
                let text = format!("c{n}-{k}");
                let at = phase.load(Ordering::SeqCst);
                let base = &bases[k % bases.len()];
                match call(
                    &http,
                    base,
                    &task_id,
                    &token,
                    "warehouse.echo",
                    json!({ "text": text }),
                )
                .await
                {
                    Ok((200, body)) => {
                        let digest =
                            portcullis_token::sha256_hex(body["result"].to_string().as_bytes());
                        acked.push((at, (task_id.clone(), text, digest)));
                    }
                    Ok((status, body)) => {
                        // Not acknowledged: nothing is promised, but it
                        // must be the fail-closed answer.
                        assert_eq!(status, 503, "{body}");
                        assert_eq!(body["error"], "internal_error", "{body}");
                        *refused.entry("503 internal_error".to_owned()).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        *refused.entry(format!("transport: {e}")).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (acked, refused)
        }));
    }

    let ready_again = |what: &'static str| {
        let (http, replicas_bases) = (http.clone(), bases.clone());
        async move {
            let started = Instant::now();
            for base in &replicas_bases {
                loop {
                    if let Ok(r) = http.get(format!("{base}/readyz")).send().await
                        && r.status() == 200
                    {
                        break;
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "{base} not ready after {what}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            started.elapsed()
        }
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (n, mode) in ["fast", "immediate"].into_iter().enumerate() {
        let pg2 = pg.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || pg2.restart_server(mode))
            .await
            .unwrap();
        phase.store(n + 1, Ordering::SeqCst);
        let took = t.elapsed();
        let ready = ready_again(mode).await;
        eprintln!("pg_ctl restart -m {mode}: {took:?}; replicas ready {ready:?} later");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut acked: Vec<(usize, Acked)> = Vec::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for c in clients {
        let (a, r) = c.await.unwrap();
        acked.extend(a);
        for (k, n) in r {
            *refused.entry(k).or_default() += n;
        }
    }
    let per_phase: Vec<usize> = (0..3)
        .map(|p| acked.iter().filter(|(at, _)| *at == p).count())
        .collect();
    eprintln!("acknowledged calls per phase {per_phase:?}; not acknowledged {refused:?}");
    assert!(
        per_phase.iter().all(|n| *n >= 10),
        "calls are served before, between and after the restarts: {per_phase:?}"
    );
    for i in 0..2 {
        assert!(replicas.running(i), "replica {} still runs", i + 1);
    }

    // The ledger: every acknowledged call has both records, and the chain
    // (both replicas' records, across both restarts) verifies.
    let out = portcullis(dir, &["audit", "export", "--config", "replica-1.toml"]);
    assert!(out.status.success(), "export: {}", out_text(&out));
    let mut allowed: BTreeSet<(String, String)> = BTreeSet::new();
    let mut completed: BTreeSet<(String, String)> = BTreeSet::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let Some(task) = r["task_id"].as_str() else {
            continue;
        };
        match r["kind"].as_str() {
            Some("call.allowed") => {
                if let Some(text) = r["args"]["text"].as_str() {
                    allowed.insert((task.to_owned(), text.to_owned()));
                }
            }
            Some("call.completed") => {
                if let Some(d) = r["result_digest"].as_str() {
                    completed.insert((task.to_owned(), d.to_owned()));
                }
            }
            _ => {}
        }
    }
    let mut missing = Vec::new();
    for (_, (task, text, digest)) in &acked {
        if !allowed.contains(&(task.clone(), text.clone())) {
            missing.push(format!("call.allowed of {task} {text}"));
        }
        if !completed.contains(&(task.clone(), digest.clone())) {
            missing.push(format!("call.completed of {task} {text}"));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged calls lack records: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    assert_chain_verifies(dir);
}

/// Regression: with PostgreSQL hanging rather than down (SIGSTOPped: the
/// connections stay open, nothing answers), `/readyz` waited for the
/// store's 30 s operation timeout before answering 503, far longer than a
/// load balancer's check waits. It now answers 503 within its own bound
/// (`server::READY_TIMEOUT`, 2 s); a call fails closed within the ledger
/// deadline (`pipeline::LEDGER_DEADLINE`, 5 s) where it waited 30 s or
/// more; and the replica is ready again, without a restart, once
/// PostgreSQL answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_promptly_when_postgres_hangs() {
    let test = "cluster readyz_answers_promptly_when_postgres_hangs";
    if postgres_url(test).is_none() {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let Some(pg) = PrivatePostgres::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let upstream = Upstream::start(dir).await;
    let mut replicas = Replicas::start(dir, 1, &pg.url, upstream.port).await;
    let base = replicas.bases[0].clone();
    let http = client();
    let (task_id, token) = start_task(&http, &base, "load-bot").await;
    let echo = |text: &'static str| {
        let (http, base, task_id, token) =
            (http.clone(), base.clone(), task_id.clone(), token.clone());
        async move {
            call(
                &http,
                &base,
                &task_id,
                &token,
                "warehouse.echo",
                json!({ "text": text }),
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(echo("before").await.0, 200);

    pg.freeze();
    for _ in 0..2 {
        let asked = Instant::now();
        let r = http.get(format!("{base}/readyz")).send().await.unwrap();
        let took = asked.elapsed();
        assert_eq!(r.status(), 503);
        assert!(
            took < Duration::from_secs(5),
            "/readyz took {took:?} with PostgreSQL hanging"
        );
        eprintln!("/readyz with PostgreSQL frozen: 503 after {took:?}");
    }
    // A call meanwhile fails closed within the gateway's ledger deadline
    // (5 s) instead of waiting out the store's 30 s operation timeout.
    let asked = Instant::now();
    let r = http
        .post(format!("{base}/v1/tasks/{task_id}/calls"))
        .bearer_auth(&token)
        .json(&json!({ "tool": "warehouse.echo", "arguments": { "text": "frozen" } }))
        .send()
        .await
        .unwrap();
    let took = asked.elapsed();
    assert_internal_error(r, "a call with PostgreSQL frozen").await;
    assert!(
        took < Duration::from_secs(8),
        "a call took {took:?} with PostgreSQL hanging"
    );
    eprintln!("a call with PostgreSQL frozen: 503 after {took:?}");
    pg.thaw();
    replicas.wait_ready(&http, 0, Duration::from_secs(30)).await;
    assert!(replicas.running(0));
    assert_eq!(echo("after").await.0, 200);
    assert_chain_verifies(dir);
}

/// Regression: a store that hangs at shutdown (here PostgreSQL SIGSTOPped,
/// so the last checkpoint and the ledger's flush never answer) held
/// `serve` after SIGTERM for as long as the store's timeouts ran, or
/// forever on a close that deadlocked, blocking restarts and deployments.
/// `serve` now gives up after `run::SHUTDOWN_BOUND` (10 s), says so in its
/// log, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_in_bounded_time_when_the_ledger_hangs() {
    let test = "cluster sigterm_exits_in_bounded_time_when_the_ledger_hangs";
    if postgres_url(test).is_none() {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let Some(pg) = PrivatePostgres::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let upstream = Upstream::start(dir).await;
    let mut replicas = Replicas::start(dir, 1, &pg.url, upstream.port).await;
    let base = replicas.bases[0].clone();
    let http = client();
    let (task_id, token) = start_task(&http, &base, "load-bot").await;
    let answer = call(
        &http,
        &base,
        &task_id,
        &token,
        "warehouse.echo",
        json!({ "text": "before" }),
    )
    .await
    .unwrap();
    assert_eq!(answer.0, 200);

    pg.freeze();
    let mut server = replicas.servers[0].take().unwrap();
    let (status, took) =
        common::sigterm_and_wait(&mut server, Duration::from_secs(20), &|| replicas.log(0)).await;
    pg.thaw();
    eprintln!("SIGTERM with PostgreSQL frozen: exited {status} after {took:?}");
    assert!(
        !status.success(),
        "a shutdown that could not close the ledger must not exit 0"
    );
    assert!(
        took >= Duration::from_secs(9),
        "serve waited its bound for the ledger ({took:?})"
    );
    let log = replicas.log(0);
    assert!(log.contains("shutdown stalled"), "log says why:\n{log}");
}

/// The value of the HTML form field `name` in `html`.
fn form_field(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let at = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} field in {html}"));
    let rest = &html[at + marker.len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

/// The `name=value` of the `Set-Cookie` header for cookie `name`.
fn cookie_of(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no {name} cookie"))
}

/// Regression guard: the example's nginx sent `/console` round robin,
/// while a console session lives in the memory of the replica that signed
/// the person in, so most pages sent a signed-in person back to sign-in.
/// Now `/console` sticks to one replica per client address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_session_behind_nginx_stays_signed_in() {
    let test = "cluster a_console_session_behind_nginx_stays_signed_in";
    let Some(base_url) = postgres_url(test) else {
        return;
    };
    if !have_nginx(test) {
        return;
    }
    let _heavy = HEAVY.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let schema = Schema::create(&base_url);
    let upstream = Upstream::start(dir).await;
    let replicas = Replicas::start(dir, 3, &schema.url, upstream.port).await;
    let nginx = Nginx::start(dir, &replicas.bases).await;
    let lb = nginx.base.clone();
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = browser
        .get(format!("{lb}/console/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let login_cookie = cookie_of(&page, "portcullis_console_login");
    let login_csrf = form_field(&page.text().await.unwrap(), "login_csrf");
    let signed_in = browser
        .post(format!("{lb}/console/login"))
        .header("cookie", &login_cookie)
        .form(&[
            ("token", common::ADMIN),
            ("login_csrf", login_csrf.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303, "sign-in through nginx");
    let session = cookie_of(&signed_in, "portcullis_console");
    for i in 0..12 {
        let r = browser
            .get(format!("{lb}/console/tasks"))
            .header("cookie", &session)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "page {i} through nginx sent a signed-in person to {:?}",
            r.headers().get("location")
        );
    }
    drop(nginx);
}
