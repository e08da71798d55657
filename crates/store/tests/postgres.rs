//! The PostgreSQL backend: the shared contract suite, each test on a fresh
//! schema of the database at `PORTCULLIS_TEST_POSTGRES_URL`, plus what only
//! a shared server can show: two replicas racing on one task and appending
//! to one chain, revocations crossing replicas through LISTEN/NOTIFY,
//! concurrent migrations.
//!
//! Without `PORTCULLIS_TEST_POSTGRES_URL` every test prints
//! `SKIP: PORTCULLIS_TEST_POSTGRES_URL not set` and passes. With it, each
//! test creates a schema `pc_test_<unique>` (and uses it as its
//! revocation channel, so parallel tests never hear each other) and drops
//! it at the end, even when the test fails.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portcullis_core::Timestamp;
use portcullis_store::postgres::{Revocation, SCHEMA_VERSION};
use portcullis_store::testsuite::{self, T0, sample_event, sample_pin, sample_task, sample_token};
use portcullis_store::{
    AuditQuery, EventKind, MAX_AUDIT_LIMIT, Op, PostgresOptions, PostgresStore, Store, StoreError,
    chain,
};
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};

const SKIP: &str = "SKIP: PORTCULLIS_TEST_POSTGRES_URL not set";

fn url() -> Option<String> {
    std::env::var("PORTCULLIS_TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// The test database's URL, or skip the test.
macro_rules! require_postgres {
    () => {
        match url() {
            Some(url) => url,
            None => {
                println!("{SKIP}");
                return;
            }
        }
    };
}

/// A plain connection for the test's own SQL.
async fn admin(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A fresh schema, dropped (with everything in it) when this is dropped.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    async fn create(url: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "pc_test_{:x}_{}_{}",
            nanos,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        admin(url)
            .await
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap();
        Self {
            url: url.to_owned(),
            name,
        }
    }

    fn options(&self) -> PostgresOptions {
        PostgresOptions {
            schema: Some(self.name.clone()),
            notify_channel: self.name.clone(),
            ..PostgresOptions::default()
        }
    }

    async fn store(&self) -> PostgresStore {
        PostgresStore::connect(&self.url, &self.options())
            .await
            .unwrap()
    }

    /// A connection whose `search_path` is this schema.
    async fn admin(&self) -> Client {
        let client = admin(&self.url).await;
        client
            .batch_execute(&format!("SET search_path = {}", self.name))
            .await
            .unwrap();
        client
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot block: use a
        // runtime of its own on another thread.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                admin(&url)
                    .await
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop schema {}: {dropped:?}", self.name);
        }
    }
}

async fn fresh(url: &str) -> (Schema, PostgresStore) {
    let schema = Schema::create(url).await;
    let store = schema.store().await;
    (schema, store)
}

macro_rules! suite {
    ($($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let url = require_postgres!();
                let (_schema, store) = fresh(&url).await;
                testsuite::$check(&store).await;
                store.close().await;
            }
        )*
    };
}

suite!(
    ping,
    task_round_trip,
    update_task_compare_and_swap,
    token_round_trip,
    batch_is_atomic,
    refresh_spends_once,
    revoke_task_tokens,
    audit_seqs_are_gap_free,
    queued_batches_land_in_queue_order,
    audit_query_filters,
    audit_query_limits,
    concurrent_commits,
    audit_chain_is_valid,
    chain_head_follows_commits,
    checkpoints_round_trip,
    elevation_round_trip,
    elevation_insert_unknown_task,
    elevation_list_by_status,
    elevation_list_limits,
    elevation_decided_once,
    elevation_decide_unknown,
    elevation_decide_pending,
    elevation_decision_checks,
    elevation_decisions_race,
    pin_round_trip,
    tool_use_is_remembered,
    task_counts_follow_status,
    queue_depth_returns_to_zero,
    pin_upsert_replaces,
    pins_ordered_by_tool,
    pin_invalid_rolls_back,
    prune_audit_segments,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_one_store() {
    let url = require_postgres!();
    let (_schema, store) = fresh(&url).await;
    testsuite::run_all(&store).await;
    assert_eq!(store.backend(), "postgres");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_from_spawned_tasks() {
    let url = require_postgres!();
    let (_schema, store) = fresh(&url).await;
    let store: Arc<dyn Store> = Arc::new(store);
    testsuite::concurrent_commits_spawned(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elevation_decisions_race_from_spawned_tasks() {
    let url = require_postgres!();
    let (_schema, store) = fresh(&url).await;
    let store: Arc<dyn Store> = Arc::new(store);
    testsuite::elevation_decisions_race_spawned(store).await;
}

/// Every record of the log, paged.
async fn all_records(store: &dyn Store) -> Vec<portcullis_store::AuditEvent> {
    let mut all: Vec<portcullis_store::AuditEvent> = Vec::new();
    loop {
        let page = store
            .audit(&AuditQuery {
                since_seq: all.last().map(|e| e.seq),
                limit: Some(MAX_AUDIT_LIMIT),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Two replicas (two stores on one schema) race compare-and-swap updates of
/// one task from the same version: each round exactly one wins, the other
/// conflicts, and the task ends at the version of the number of rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_a_task_update_exactly_one_wins() {
    let url = require_postgres!();
    let schema = Schema::create(&url).await;
    let a = Arc::new(schema.store().await);
    let b = Arc::new(schema.store().await);
    let task = sample_task("raced");
    a.commit(vec![Op::InsertTask(task.clone())]).await.unwrap();

    const ROUNDS: u64 = 40;
    let mut wins = [0_u32; 2];
    for round in 0..ROUNDS {
        let from = task.task.version + round;
        let update = |replica: &str| {
            let mut next = task.clone();
            next.task.version = from + 1;
            next.task.state = format!("{replica}-{round}");
            Op::UpdateTask {
                record: next,
                expected_version: from,
            }
        };
        let (ops_a, ops_b) = (vec![update("a")], vec![update("b")]);
        let (store_a, store_b) = (Arc::clone(&a), Arc::clone(&b));
        let left = tokio::spawn(async move { store_a.commit(ops_a).await });
        let right = tokio::spawn(async move { store_b.commit(ops_b).await });
        let (left, right) = (left.await.unwrap(), right.await.unwrap());
        let winner = match (&left, &right) {
            (Ok(_), Err(StoreError::Conflict(_))) => 0,
            (Err(StoreError::Conflict(_)), Ok(_)) => 1,
            other => panic!("round {round}: exactly one replica must win: {other:?}"),
        };
        wins[winner] += 1;
        let stored = b.task("raced").await.unwrap().unwrap();
        assert_eq!(stored.task.version, from + 1);
        let expected_state = format!("{}-{round}", ["a", "b"][winner]);
        assert_eq!(stored.task.state, expected_state, "the winner's update");
    }
    assert_eq!(
        a.task("raced").await.unwrap().unwrap().task.version,
        task.task.version + ROUNDS
    );
    println!("CAS wins: replica a {}, replica b {}", wins[0], wins[1]);
    a.close().await;
    b.close().await;
}

/// Both replicas append concurrently (several callers each, batches of one
/// to three records): every seq is distinct, the seqs are exactly
/// 1..=n (gap-free across replicas), each caller's seqs increase, and the
/// whole log is one chain that verifies, read from either replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_two_replicas_make_one_chain() {
    let url = require_postgres!();
    let schema = Schema::create(&url).await;
    let replicas = [
        Arc::new(schema.store().await),
        Arc::new(schema.store().await),
    ];
    const CALLERS_PER_REPLICA: usize = 4;
    const BATCHES_PER_CALLER: usize = 60;
    let mut handles = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        for caller in 0..CALLERS_PER_REPLICA {
            let store = Arc::clone(replica);
            handles.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..BATCHES_PER_CALLER {
                    let ops = (0..=(i % 3))
                        .map(|n| {
                            let mut event =
                                sample_event(EventKind::CallAllowed, &format!("r{r}-c{caller}"));
                            event.detail = Some(format!("{i}/{n}"));
                            Op::Append(event)
                        })
                        .collect::<Vec<_>>();
                    let expected = ops.len();
                    let committed = store.commit(ops).await.unwrap();
                    assert_eq!(committed.seqs.len(), expected);
                    assert!(
                        committed.seqs.windows(2).all(|w| w[1] == w[0] + 1),
                        "one batch's seqs are consecutive: {:?}",
                        committed.seqs
                    );
                    seqs.extend(committed.seqs);
                }
                seqs
            }));
        }
    }
    let mut all = Vec::new();
    for handle in handles {
        let seqs = handle.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "a caller's seqs increase"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    let total = all.len();
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), total, "distinct seqs");
    assert_eq!(
        all,
        (1..=u64::try_from(total).unwrap()).collect::<Vec<_>>(),
        "gap-free across replicas"
    );
    for replica in &replicas {
        let records = all_records(replica.as_ref()).await;
        assert_eq!(records.len(), total);
        let report = chain::verify(records.into_iter().map(Ok), &[], &|_| false);
        assert!(report.is_ok(), "{report:?}");
        testsuite::assert_log_is_valid(replica.as_ref()).await;
    }
    let head_a = replicas[0].chain_head().await.unwrap();
    assert_eq!(head_a, replicas[1].chain_head().await.unwrap());
    assert_eq!(
        head_a.map(|(seq, _)| seq),
        Some(u64::try_from(total).unwrap())
    );
    for replica in &replicas {
        replica.close().await;
    }
}

/// Waits for `want` on `receiver`, skipping anything else; panics after
/// `limit`. Returns how long it took.
async fn wait_for(
    receiver: &mut mpsc::Receiver<Revocation>,
    want: &Revocation,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    let deadline = started + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, receiver.recv()).await {
            Ok(Some(got)) if &got == want => return started.elapsed(),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the listener stopped while waiting for {want:?}"),
            Err(_) => panic!("{want:?} did not arrive within {limit:?}"),
        }
    }
}

/// A revocation committed on replica A reaches replica B's listener within
/// one second; so does every jti of a task revocation; a rolled-back batch
/// announces nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_reaches_the_other_within_a_second() {
    let url = require_postgres!();
    let schema = Schema::create(&url).await;
    let a = schema.store().await;
    let b = schema.store().await;
    let mut heard = b.listen_revocations().await.unwrap();

    let tokens: Vec<_> = (0..3)
        .map(|i| sample_token(&format!("jti-{i}"), "revoked-task"))
        .collect();
    let mut ops = vec![Op::InsertTask(sample_task("revoked-task"))];
    ops.extend(tokens.iter().cloned().map(Op::InsertToken));
    a.commit(ops).await.unwrap();

    // One token.
    let committed = a
        .commit(vec![Op::RevokeToken {
            jti: "jti-0".into(),
            at: T0.plus_millis(1),
            reason: "logout".into(),
        }])
        .await
        .unwrap();
    assert_eq!(committed.revoked, vec!["jti-0".to_owned()]);
    let took = wait_for(
        &mut heard,
        &Revocation::Token("jti-0".into()),
        Duration::from_secs(1),
    )
    .await;
    println!("revocation propagated in {took:?}");

    // A batch that revokes, then fails: rolled back, never announced.
    let result = a
        .commit(vec![
            Op::RevokeToken {
                jti: "jti-1".into(),
                at: T0.plus_millis(2),
                reason: "never".into(),
            },
            Op::SpendRefresh {
                hash: "no-such-hash".into(),
                at: T0,
            },
        ])
        .await;
    assert!(
        matches!(result, Err(StoreError::RefreshUnknown)),
        "{result:?}"
    );

    // The whole task: the other two tokens, in one transaction.
    let committed = a
        .commit(vec![Op::RevokeTaskTokens {
            task_id: "revoked-task".into(),
            at: T0.plus_millis(3),
            reason: "task.halted".into(),
        }])
        .await
        .unwrap();
    assert_eq!(
        committed.revoked,
        vec!["jti-1".to_owned(), "jti-2".to_owned()]
    );
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1);
    while got.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, heard.recv()).await {
            Ok(Some(Revocation::Token(jti))) => got.push(jti),
            other => panic!("expected the task's revocations within 1 s: {other:?} after {got:?}"),
        }
    }
    got.sort();
    // jti-1 once: from the committed batch, not the rolled-back one.
    assert_eq!(got, vec!["jti-1".to_owned(), "jti-2".to_owned()]);

    // The revoking replica hears its own revocations too.
    let mut own = a.listen_revocations().await.unwrap();
    a.commit(vec![
        Op::InsertToken(sample_token("jti-3", "revoked-task")),
        Op::RevokeToken {
            jti: "jti-3".into(),
            at: T0.plus_millis(4),
            reason: "rotated".into(),
        },
    ])
    .await
    .unwrap();
    let want = Revocation::Token("jti-3".into());
    wait_for(&mut own, &want, Duration::from_secs(1)).await;
    wait_for(&mut heard, &want, Duration::from_secs(1)).await;

    // Closing the store stops its listeners.
    b.close().await;
    let end = tokio::time::timeout(Duration::from_secs(5), heard.recv()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    a.close().await;
}

/// The listening connection is killed by the server: the listener tells
/// the receiver to resync, listens again, and later revocations arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_and_asks_for_a_resync() {
    let url = require_postgres!();
    let schema = Schema::create(&url).await;
    let options = PostgresOptions {
        // Long, so the listening session's last statement stays `LISTEN`.
        listen_heartbeat: Duration::from_secs(60),
        ..schema.options()
    };
    let store = PostgresStore::connect(&url, &options).await.unwrap();
    let mut heard = store.listen_revocations().await.unwrap();
    store
        .commit(vec![
            Op::InsertTask(sample_task("t")),
            Op::InsertToken(sample_token("before", "t")),
            Op::InsertToken(sample_token("after", "t")),
        ])
        .await
        .unwrap();

    let killed: Vec<bool> = admin(&url)
        .await
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = $1",
            &[&format!("LISTEN {}", schema.name)],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(killed, vec![true], "one listening session");

    wait_for(&mut heard, &Revocation::Resync, Duration::from_secs(5)).await;
    store
        .commit(vec![Op::RevokeToken {
            jti: "after".into(),
            at: T0,
            reason: "x".into(),
        }])
        .await
        .unwrap();
    wait_for(
        &mut heard,
        &Revocation::Token("after".into()),
        Duration::from_secs(1),
    )
    .await;
    store.close().await;
}

/// Migrations run once however many replicas start together, and again
/// change nothing; every replica then works on the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_concurrent_starts_are_safe() {
    let url = require_postgres!();
    let schema = Schema::create(&url).await;
    let mut starts = Vec::new();
    for _ in 0..6 {
        let (url, options) = (url.clone(), schema.options());
        starts.push(tokio::spawn(async move {
            PostgresStore::connect(&url, &options).await
        }));
    }
    let mut stores = Vec::new();
    for start in starts {
        stores.push(start.await.unwrap().expect("a concurrent start succeeds"));
    }
    let rows = |client: Client| async move {
        client
            .query(
                "SELECT version, name FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get::<_, i64>(0), row.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };
    let expected: Vec<(i64, String)> = vec![
        (1, "ledger".to_owned()),
        (2, "agent tool use".to_owned()),
        (3, "task status index".to_owned()),
        (4, "held calls".to_owned()),
    ];
    assert_eq!(expected.len(), usize::try_from(SCHEMA_VERSION).unwrap());
    assert_eq!(rows(schema.admin().await).await, expected);

    stores[0]
        .commit(vec![
            Op::InsertTask(sample_task("shared")),
            Op::Append(sample_event(EventKind::TaskStarted, "shared")),
        ])
        .await
        .unwrap();
    for store in &stores {
        assert!(store.task("shared").await.unwrap().is_some());
        store.ping().await.unwrap();
    }
    // Starting again applies nothing and keeps the data.
    let again = schema.store().await;
    assert_eq!(rows(schema.admin().await).await, expected);
    assert!(again.task("shared").await.unwrap().is_some());
    let one_head: i64 = schema
        .admin()
        .await
        .query_one("SELECT count(*) FROM chain_head", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one_head, 1);
    for store in stores.iter().chain([&again]) {
        store.close().await;
    }
}

/// A schema written by a newer build is refused at connect, and a running
/// store's ping fails once the schema moved past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let url = require_postgres!();
    let (schema, store) = fresh(&url).await;
    schema
        .admin()
        .await
        .execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, 'future', 0)",
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    match PostgresStore::connect(&url, &schema.options()).await {
        Err(StoreError::Unavailable(message)) => assert!(message.contains("newer"), "{message}"),
        other => panic!("a newer schema must be refused: {other:?}"),
    }
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    store.close().await;
}

/// Bad settings and unreachable servers are `Unavailable`, and no error
/// ever repeats the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_unavailable_and_never_show_the_password() {
    let url = require_postgres!();
    let secret = "s3cret-Pa55word";
    let unreachable = format!("postgres://portcullis:{secret}@127.0.0.1:1/ledger");
    let options = PostgresOptions {
        connect_timeout: Duration::from_secs(2),
        ..PostgresOptions::default()
    };
    for bad in [
        unreachable.clone(),
        format!("postgres://portcullis:{secret}@127.0.0.1:notaport/ledger"),
        format!("host=127.0.0.1 password={secret} bogus_option=1"),
    ] {
        match PostgresStore::connect(&bad, &options).await {
            Err(StoreError::Unavailable(message)) => {
                assert!(!message.contains(secret), "{message}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    // Options that cannot be used.
    for options in [
        PostgresOptions {
            schema: Some("Not-An-Identifier".into()),
            ..PostgresOptions::default()
        },
        PostgresOptions {
            notify_channel: "bad channel".into(),
            ..PostgresOptions::default()
        },
        PostgresOptions {
            statement_timeout: Duration::ZERO,
            ..PostgresOptions::default()
        },
        PostgresOptions {
            schema: Some("pc_test_no_such_schema".into()),
            ..PostgresOptions::default()
        },
    ] {
        let result = PostgresStore::connect(&url, &options).await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{options:?}: {result:?}"
        );
    }
    // The debug form of a store shows no connection settings.
    let (_schema, store) = fresh(&url).await;
    let debug = format!("{store:?}");
    assert!(!debug.contains("127.0.0.1"), "{debug}");
    store.close().await;
}

/// A closed store refuses every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_store_is_unavailable() {
    let url = require_postgres!();
    let (_schema, store) = fresh(&url).await;
    store
        .commit(vec![Op::InsertTask(sample_task("kept"))])
        .await
        .unwrap();
    store.close().await;
    assert!(matches!(
        store.commit(vec![]).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.task("kept").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.listen_revocations().await,
        Err(StoreError::Unavailable(_))
    ));
}

/// Values PostgreSQL cannot hold are refused, never wrapped or truncated;
/// a lookup of such a key finds nothing; stored rows that do not decode
/// are `Corrupt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_values_and_corrupt_rows_are_errors_not_panics() {
    let url = require_postgres!();
    let (schema, store) = fresh(&url).await;
    let mut huge = sample_task("huge");
    huge.deadline = Timestamp(u64::MAX);
    let result = store.commit(vec![Op::InsertTask(huge)]).await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    let result = store
        .commit(vec![Op::InsertTask(sample_task("nul\0id"))])
        .await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    assert_eq!(store.task("nul\0id").await.unwrap(), None);
    assert_eq!(store.token("nul\0").await.unwrap(), None);
    assert_eq!(store.pin("nul\0").await.unwrap(), None);
    assert!(
        store
            .audit(&AuditQuery {
                task_id: Some("nul\0".into()),
                ..AuditQuery::default()
            })
            .await
            .unwrap()
            .is_empty()
    );

    store
        .commit(vec![
            Op::InsertTask(sample_task("bent")),
            Op::Append(sample_event(EventKind::TaskStarted, "bent")),
            Op::PinTool(sample_pin("bent.tool", "first-use")),
        ])
        .await
        .unwrap();
    schema
        .admin()
        .await
        .batch_execute(
            "UPDATE tasks SET body = '{\"goal\": 3}' WHERE id = 'bent';
             UPDATE audit_events SET event = 'not json';
             UPDATE tool_pins SET definition = '[1]';",
        )
        .await
        .unwrap();
    assert!(matches!(
        store.task("bent").await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.audit(&AuditQuery::default()).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(store.pins().await, Err(StoreError::Corrupt(_))));
    store.ping().await.unwrap();
    store.close().await;
}

/// A caller that stops waiting does not cancel its batch (it is queued to
/// the writer task): the batch is applied whole or not at all, and later
/// commits go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_commit_is_applied_whole_or_not_at_all() {
    let url = require_postgres!();
    let (_schema, store) = fresh(&url).await;
    let big: Vec<Op> = (0..2_000)
        .map(|_| Op::Append(sample_event(EventKind::CallAllowed, "dropped")))
        .collect();
    let dropped = tokio::time::timeout(Duration::from_millis(5), store.commit(big)).await;
    assert!(dropped.is_err(), "the big batch must still be running");
    let next = store
        .commit(vec![Op::Append(sample_event(EventKind::Anomaly, "next"))])
        .await
        .unwrap();
    let kept = store
        .audit(&AuditQuery {
            task_id: Some("dropped".into()),
            limit: Some(MAX_AUDIT_LIMIT),
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .len();
    assert!(
        (kept == 0 && next.seqs == vec![1]) || (kept == 1_000 && next.seqs == vec![2_001]),
        "whole or nothing: {kept} records, next {:?}",
        next.seqs
    );
    testsuite::assert_log_is_valid(&store).await;
    store.close().await;
}

/// A group that overruns the operation timeout is abandoned: its caller
/// gets `Unavailable`, its connection is closed so the server rolls it back
/// (releasing the chain lock), nothing of it is kept, and the next commit
/// goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overrunning_group_is_abandoned_and_leaves_no_lock_behind() {
    let url = require_postgres!();
    let schema = Schema::create(&url).await;
    let options = PostgresOptions {
        operation_timeout: Duration::from_millis(300),
        ..schema.options()
    };
    let store = PostgresStore::connect(&url, &options).await.unwrap();
    let big: Vec<Op> = (0..50_000)
        .map(|_| Op::Append(sample_event(EventKind::CallAllowed, "overrun")))
        .collect();
    let result = store.commit(big).await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    let started = Instant::now();
    let next = loop {
        match store
            .commit(vec![Op::Append(sample_event(EventKind::Anomaly, "next"))])
            .await
        {
            Ok(next) => break next,
            // The server may need a moment to notice the closed connection.
            Err(StoreError::Unavailable(why)) if started.elapsed() < Duration::from_secs(10) => {
                println!("retrying after: {why}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("the chain lock was not released: {other:?}"),
        }
    };
    println!(
        "next append after an abandoned group: {:?}",
        started.elapsed()
    );
    assert_eq!(
        next.seqs,
        vec![1],
        "nothing of the abandoned group was kept"
    );
    testsuite::assert_log_is_valid(&store).await;
    store.close().await;
}

/// A batch that deadlocks with another session (here an outside client
/// locking the same rows in the opposite order) and is chosen by the
/// server as the victim is rolled back to its savepoint and tried again:
/// it commits, exactly once, and the log stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlocked_batch_is_retried() {
    let url = require_postgres!();
    let (schema, store) = fresh(&url).await;
    let store = Arc::new(store);
    let (x, y) = (
        sample_pin("x.tool", "first-use"),
        sample_pin("y.tool", "first-use"),
    );
    store
        .commit(vec![Op::PinTool(x.clone()), Op::PinTool(y.clone())])
        .await
        .unwrap();

    // The outside session holds y.
    let outside = schema.admin().await;
    outside
        .batch_execute("BEGIN; UPDATE tool_pins SET approved_by = 'outside' WHERE tool = 'y.tool'")
        .await
        .unwrap();
    // The store's batch locks x, then waits for y.
    let mut x2 = x.clone();
    x2.approved_by = "store".into();
    let mut y2 = y.clone();
    y2.approved_by = "store".into();
    let batch = vec![
        Op::Append(sample_event(EventKind::ConfigLoaded, "deadlock")),
        Op::PinTool(x2.clone()),
        Op::PinTool(y2.clone()),
    ];
    let committing = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.commit(batch).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The outside session now wants x: a cycle. The store's batch has
    // waited longer, so its deadlock check runs first and it is the victim.
    let outside_x = outside
        .batch_execute("UPDATE tool_pins SET approved_by = 'outside' WHERE tool = 'x.tool'")
        .await;
    let outside_won = outside_x.is_ok();
    if outside_won {
        outside.batch_execute("COMMIT").await.unwrap();
    } else {
        outside.batch_execute("ROLLBACK").await.unwrap();
    }
    let committed = committing.await.unwrap().unwrap();
    assert_eq!(committed.seqs.len(), 1);
    assert!(outside_won, "the outside session was the deadlock victim");
    assert_eq!(store.pin("x.tool").await.unwrap(), Some(x2));
    assert_eq!(store.pin("y.tool").await.unwrap(), Some(y2));
    let records = store
        .audit(&AuditQuery {
            task_id: Some("deadlock".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(records.len(), 1, "applied once");
    testsuite::assert_log_is_valid(store.as_ref()).await;
    store.close().await;
}

/// Commit throughput (printed, not asserted): sequential and concurrent
/// single-append batches, as the gateway commits a call's record. Every
/// appending transaction of the cluster commits alone (the chain lock), so
/// this is about one WAL flush per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_throughput() {
    let url = require_postgres!();
    let (_schema, store) = fresh(&url).await;
    let store = Arc::new(store);
    const SEQUENTIAL: usize = 300;
    let started = Instant::now();
    for _ in 0..SEQUENTIAL {
        store
            .commit(vec![Op::Append(sample_event(
                EventKind::CallAllowed,
                "seq",
            ))])
            .await
            .unwrap();
    }
    let sequential = started.elapsed();

    let mut concurrent = Vec::new();
    for callers in [8_usize, 64] {
        let per_caller = 1_600 / callers;
        let started = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..callers {
            let store = Arc::clone(&store);
            handles.push(tokio::spawn(async move {
                for _ in 0..per_caller {
                    store
                        .commit(vec![Op::Append(sample_event(
                            EventKind::CallAllowed,
                            "par",
                        ))])
                        .await
                        .unwrap();
                }
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        concurrent.push((callers, callers * per_caller, started.elapsed()));
    }

    let rate = |n: usize, took: Duration| n as f64 / took.as_secs_f64();
    let mut report = format!(
        "PostgreSQL commits of one audit record: sequential {:.0}/s ({SEQUENTIAL} in {sequential:?})",
        rate(SEQUENTIAL, sequential)
    );
    for (callers, n, took) in concurrent {
        report.push_str(&format!(
            ", {callers} concurrent callers {:.0}/s ({n} in {took:?})",
            rate(n, took)
        ));
    }
    println!("{report}");
    testsuite::assert_log_is_valid(store.as_ref()).await;
    store.close().await;
}

/// The same batches appended to SQLite and to PostgreSQL give the very
/// same records, byte for byte: seqs, events, `prev_hash` and `hash` (one
/// chain format, whatever the backend), and the same checkpoints verify
/// both logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_is_the_same_as_sqlites() {
    let url = require_postgres!();
    let (_schema, postgres) = fresh(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = portcullis_store::SqliteStore::open(&dir.path().join("ledger.db")).unwrap();

    let mut rich = sample_event(EventKind::CallCompleted, "same");
    rich.agent_id = Some("agent é".into());
    rich.tool = Some("db.read".into());
    rich.policy_ids = vec!["p2".into(), "p1".into()];
    rich.args = Some(serde_json::json!({
        "z": [1, -1, u64::MAX, i64::MIN, 0.1, 1e-7, -0.0, f64::MAX],
        "text": "quote\" backslash\\ nl\n nul\u{0} 日本 😀",
        "日本": {"nested": [null, true, {}]},
    }));
    rich.latency_us = Some(u64::MAX);
    rich.detail = Some("line one\nline two".into());
    let batches: Vec<Vec<Op>> = vec![
        vec![
            Op::InsertTask(sample_task("same")),
            Op::Append(sample_event(EventKind::TaskStarted, "same")),
        ],
        vec![
            Op::Append(rich),
            Op::Append(sample_event(EventKind::Anomaly, "same")),
        ],
        EventKind::ALL
            .iter()
            .map(|kind| Op::Append(sample_event(*kind, "same")))
            .collect(),
    ];
    for batch in batches {
        let a = sqlite.commit(batch.clone()).await.unwrap();
        let b = postgres.commit(batch).await.unwrap();
        assert_eq!(a, b);
    }
    let from_sqlite = all_records(&sqlite).await;
    let from_postgres = all_records(&postgres).await;
    assert_eq!(from_postgres, from_sqlite);
    assert_eq!(
        serde_json::to_string(&from_postgres).unwrap(),
        serde_json::to_string(&from_sqlite).unwrap()
    );
    let (seq, hash) = postgres.chain_head().await.unwrap().unwrap();
    assert_eq!(
        sqlite.chain_head().await.unwrap(),
        Some((seq, hash.clone()))
    );
    let checkpoint = testsuite::test_checkpoint(seq, &hash);
    for store in [&sqlite as &dyn Store, &postgres] {
        store
            .commit(vec![Op::AppendCheckpoint(checkpoint.clone())])
            .await
            .unwrap();
        let report = testsuite::verify_log(store).await;
        assert!(
            report.is_ok() && report.checkpoints_verified == 1,
            "{report:?}"
        );
    }
    sqlite.close().await;
    postgres.close().await;
}
