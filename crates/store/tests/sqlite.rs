//! The SQLite backend: the shared contract suite on a fresh database per
//! test, plus what only a file on disk can show (durability across close and
//! `kill -9`, migrations, WAL).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_store::sqlite::SCHEMA_VERSION;
use portcullis_store::testsuite::{
    self, T0, sample_event, sample_refresh, sample_task, sample_token,
};
use portcullis_store::{
    AuditQuery, EventKind, MAX_AUDIT_LIMIT, Op, SqliteOptions, SqliteStore, Store, StoreError,
};
use tempfile::TempDir;

/// A fresh directory under Cargo's target tmp dir (a real disk, so fsync
/// costs what it costs in production).
fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("portcullis-store-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn fresh() -> (TempDir, SqliteStore) {
    let dir = temp_dir();
    let store = SqliteStore::open(&dir.path().join("ledger.db")).unwrap();
    (dir, store)
}

macro_rules! suite {
    ($($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (_dir, store) = fresh();
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
    audit_query_filters,
    audit_query_limits,
    concurrent_commits,
    elevation_round_trip,
    elevation_insert_unknown_task,
    elevation_list_by_status,
    elevation_list_limits,
    elevation_decided_once,
    elevation_decide_unknown,
    elevation_decide_pending,
    elevation_decision_checks,
    elevation_decisions_race,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_one_store() {
    let (_dir, store) = fresh();
    testsuite::run_all(&store).await;
    assert_eq!(store.backend(), "sqlite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_from_spawned_tasks() {
    let (_dir, store) = fresh();
    let store: Arc<dyn Store> = Arc::new(store);
    testsuite::concurrent_commits_spawned(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elevation_decisions_race_from_spawned_tasks() {
    let (_dir, store) = fresh();
    let store: Arc<dyn Store> = Arc::new(store);
    testsuite::elevation_decisions_race_spawned(store).await;
}

/// Batches that share one group transaction: the failing ones roll back
/// alone, the others all commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_batches_roll_back_alone_within_a_group() {
    let (_dir, store) = fresh();
    let store = Arc::new(store);
    let mut handles = Vec::new();
    for n in 0..256_u32 {
        let store = Arc::clone(&store);
        handles.push(tokio::spawn(async move {
            let id = format!("group-{n}");
            let mut ops = vec![
                Op::InsertTask(sample_task(&id)),
                Op::Append(sample_event(EventKind::TaskStarted, &id)),
            ];
            if n % 3 == 0 {
                ops.push(Op::SpendRefresh {
                    hash: "no-such-hash".into(),
                    at: T0,
                });
            }
            (n, id, store.commit(ops).await)
        }));
    }
    let mut committed = Vec::new();
    for handle in handles {
        let (n, id, result) = handle.await.unwrap();
        if n % 3 == 0 {
            assert!(
                matches!(result, Err(StoreError::RefreshUnknown)),
                "{result:?}"
            );
            assert_eq!(store.task(&id).await.unwrap(), None);
        } else {
            let seqs = result.unwrap().seqs;
            assert!(store.task(&id).await.unwrap().is_some());
            committed.extend(seqs);
        }
    }
    committed.sort_unstable();
    let all: Vec<u64> = store
        .audit(&AuditQuery {
            limit: Some(MAX_AUDIT_LIMIT),
            ..AuditQuery::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(all, committed, "exactly the successful batches' events");
    assert_eq!(
        all,
        (1..=u64::try_from(all.len()).unwrap()).collect::<Vec<_>>(),
        "gap-free"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_data_survives_close_and_reopen() {
    let dir = temp_dir();
    let path = dir.path().join("ledger.db");
    let task = sample_task("durable");
    let token = sample_token("jti-durable", "durable");
    let refresh = sample_refresh("hash-durable", "durable");
    let event = sample_event(EventKind::TaskStarted, "durable");

    let store = SqliteStore::open(&path).unwrap();
    let seqs = store
        .commit(vec![
            Op::InsertTask(task.clone()),
            Op::InsertToken(token.clone()),
            Op::InsertRefresh(refresh.clone()),
            Op::Append(event.clone()),
        ])
        .await
        .unwrap()
        .seqs;
    store.close().await;
    assert!(
        matches!(store.commit(vec![]).await, Err(StoreError::Unavailable(_))),
        "a closed store refuses commits"
    );
    assert!(matches!(
        store.task("durable").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    drop(store);

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.task("durable").await.unwrap(), Some(task));
    assert_eq!(store.token("jti-durable").await.unwrap(), Some(token));
    assert_eq!(store.refresh("hash-durable").await.unwrap(), Some(refresh));
    let events = store.audit(&AuditQuery::default()).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].seq, seqs[0]);
    assert_eq!(events[0].event, event);

    // Seqs continue after a reopen; dropping without close also persists.
    let next = store
        .commit(vec![Op::Append(event.clone())])
        .await
        .unwrap()
        .seqs;
    assert_eq!(next, vec![seqs[0] + 1]);
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    let events = store.audit(&AuditQuery::default()).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![seqs[0], next[0]]
    );
}

fn migration_rows(path: &Path) -> Vec<(i64, String)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT version, name FROM schema_migrations ORDER BY version")
        .unwrap();
    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_on_reopen() {
    let dir = temp_dir();
    let path = dir.path().join("ledger.db");
    let store = SqliteStore::open(&path).unwrap();
    store
        .commit(vec![Op::InsertTask(sample_task("kept"))])
        .await
        .unwrap();
    store.close().await;
    let applied = migration_rows(&path);
    assert_eq!(applied.len(), usize::try_from(SCHEMA_VERSION).unwrap());
    assert_eq!(applied.last().map(|(v, _)| *v), Some(SCHEMA_VERSION));

    for _ in 0..3 {
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.task("kept").await.unwrap().is_some());
        store.close().await;
    }
    assert_eq!(
        migration_rows(&path),
        applied,
        "reopening applies nothing twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_version_2_with_elevations() {
    assert_eq!(SCHEMA_VERSION, 2);
    let dir = temp_dir();
    let path = dir.path().join("ledger.db");
    SqliteStore::open(&path).unwrap().close().await;
    assert_eq!(
        migration_rows(&path),
        vec![(1, "ledger".to_owned()), (2, "elevations".to_owned())]
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let indexes: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'elevations' \
             AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(indexes, ["elevations_status", "elevations_task"]);
    // STRICT: a column holds only its declared type.
    conn.execute_batch(
        "PRAGMA foreign_keys = OFF;
         INSERT INTO elevations (id, task_id, agent_id, tool, reason, status, requested_at)
         VALUES ('e', 't', 'a', 'x', 'r', 'pending', 'yesterday');",
    )
    .unwrap_err();
}

/// The table's own checks back the op's: a row cannot be decided without a
/// decider, or approved without an expiry, even by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elevation_rows_are_checked_by_the_schema() {
    let (dir, store) = fresh();
    store
        .commit(vec![
            Op::InsertTask(sample_task("t")),
            Op::InsertElevation(testsuite::sample_elevation("e", "t")),
        ])
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
    for bad in [
        "UPDATE elevations SET status = 'approved', decided_at = 1, decided_by = 'x'",
        "UPDATE elevations SET status = 'denied', decided_at = 1",
        "UPDATE elevations SET status = 'denied', decided_at = 1, decided_by = 'x', expires_at = 2",
        "UPDATE elevations SET status = 'withdrawn', decided_at = 1, decided_by = 'x'",
        "UPDATE elevations SET expires_at = 2",
    ] {
        conn.execute_batch(bad).unwrap_err();
    }
    assert_eq!(
        store.elevation("e").await.unwrap(),
        Some(testsuite::sample_elevation("e", "t"))
    );
    // A row that decodes badly is an error, not a panic.
    conn.execute_batch("UPDATE elevations SET requested_at = -5")
        .unwrap();
    assert!(matches!(
        store.elevation("e").await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.elevations(None, 10).await,
        Err(StoreError::Corrupt(_))
    ));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_is_refused() {
    let dir = temp_dir();
    let path = dir.path().join("ledger.db");
    SqliteStore::open(&path).unwrap().close().await;
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, 'future', 0)",
            [SCHEMA_VERSION + 1],
        )
        .unwrap();
    }
    match SqliteStore::open(&path) {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains("newer"), "{message}");
        }
        other => panic!("a newer schema must be refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_database_is_refused() {
    let dir = temp_dir();
    let path = dir.path().join("ledger.db");
    std::fs::write(&path, vec![0x5a_u8; 8192]).unwrap();
    assert!(SqliteStore::open(&path).is_err());
    assert!(SqliteStore::open(&dir.path().join("missing-dir/ledger.db")).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_mode_is_active() {
    let (dir, store) = fresh();
    let path = dir.path().join("ledger.db");
    store
        .commit(vec![Op::Append(sample_event(
            EventKind::ConfigLoaded,
            "wal",
        ))])
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert!(dir.path().join("ledger.db-wal").exists());
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_rows_are_errors_not_panics() {
    let (dir, store) = fresh();
    store
        .commit(vec![
            Op::InsertTask(sample_task("bent")),
            Op::Append(sample_event(EventKind::TaskStarted, "bent")),
        ])
        .await
        .unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
        conn.execute_batch(
            "UPDATE tasks SET body = '{\"goal\": 3}' WHERE id = 'bent';
             UPDATE tasks SET version = -1 WHERE id = 'bent';
             UPDATE audit_events SET event = 'not json';",
        )
        .unwrap_err(); // version >= 0 is a CHECK: the whole batch fails there
        conn.execute_batch(
            "UPDATE tasks SET body = '{\"goal\": 3}' WHERE id = 'bent';
             UPDATE audit_events SET event = 'not json';",
        )
        .unwrap();
    }
    assert!(matches!(
        store.task("bent").await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.audit(&AuditQuery::default()).await,
        Err(StoreError::Corrupt(_))
    ));
    store.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_beyond_i64_are_refused_not_wrapped() {
    let (_dir, store) = fresh();
    let mut task = sample_task("huge");
    task.deadline = portcullis_core::Timestamp(u64::MAX);
    let result = store.commit(vec![Op::InsertTask(task)]).await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    assert_eq!(store.task("huge").await.unwrap(), None);
    store
        .commit(vec![
            Op::InsertTask(sample_task("small")),
            Op::InsertElevation(testsuite::sample_elevation("e", "small")),
        ])
        .await
        .unwrap();
    let mut late = testsuite::sample_elevation("late", "small");
    late.requested_at = portcullis_core::Timestamp(u64::MAX);
    let result = store.commit(vec![Op::InsertElevation(late)]).await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    let result = store
        .commit(vec![Op::DecideElevation {
            id: "e".into(),
            status: portcullis_store::ElevationStatus::Approved,
            by: "alice".into(),
            at: T0,
            note: None,
            expires_at: Some(portcullis_core::Timestamp(u64::MAX)),
        }])
        .await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    assert_eq!(
        store.elevation("e").await.unwrap(),
        Some(testsuite::sample_elevation("e", "small"))
    );
    // A since_seq beyond the range is simply past the end.
    let events = store
        .audit(&AuditQuery {
            since_seq: Some(u64::MAX),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert!(events.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_tokens_returns_the_latest_thousand_in_issue_order() {
    let (_dir, store) = fresh();
    let mut ops = vec![Op::InsertTask(sample_task("busy"))];
    for i in 0..1_010_u64 {
        let mut token = sample_token(&format!("jti-{i:05}"), "busy");
        token.issued_at = T0.plus_millis(i);
        ops.push(Op::InsertToken(token));
    }
    store.commit(ops).await.unwrap();
    let tokens = store.task_tokens("busy").await.unwrap();
    assert_eq!(tokens.len(), portcullis_store::MAX_ROWS);
    assert_eq!(tokens.first().map(|t| t.jti.as_str()), Some("jti-00010"));
    assert_eq!(tokens.last().map(|t| t.jti.as_str()), Some("jti-01009"));
}

// ---------------------------------------------------------------------------
// Crash safety: a child process commits in a loop and prints each
// acknowledged seq; it is killed with SIGKILL mid-stream; every acknowledged
// seq must be in the database afterwards.

const CRASH_DB_ENV: &str = "PORTCULLIS_STORE_CRASH_DB";
const CHILD_WRITERS: usize = 4;

/// Not a test: the child process of `acknowledged_commits_survive_kill_9`.
#[test]
#[ignore = "child process of acknowledged_commits_survive_kill_9"]
fn crash_child() {
    let Some(path) = std::env::var_os(CRASH_DB_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Arc::new(SqliteStore::open(Path::new(&path)).unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut writers = Vec::new();
        for w in 0..CHILD_WRITERS {
            let store = Arc::clone(&store);
            writers.push(tokio::spawn(async move {
                let mut i = 0_u64;
                // Bounded, so an orphaned child cannot run forever.
                while Instant::now() < deadline {
                    let id = format!("crash-{w}-{i}");
                    let committed = store
                        .commit(vec![
                            Op::InsertTask(sample_task(&id)),
                            Op::Append(sample_event(EventKind::TaskStarted, &id)),
                        ])
                        .await
                        .unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {} {id}", committed.seqs[0]).unwrap();
                    out.flush().unwrap();
                    i += 1;
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
    });
}

/// Kills the child on every exit path of the parent.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_kill_9() {
    let dir = temp_dir();
    let path: PathBuf = dir.path().join("ledger.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DB_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);

    let acked = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut acked = BTreeMap::new();
        let record = |acked: &mut BTreeMap<u64, String>, line: &str| {
            if let Some(rest) = line.strip_prefix("ACK ") {
                let (seq, id) = rest.split_once(' ').unwrap();
                acked.insert(seq.parse::<u64>().unwrap(), id.to_owned());
            }
        };
        for line in lines.by_ref() {
            record(&mut acked, &line.unwrap());
            if acked.len() >= 2_000 {
                break;
            }
        }
        // SIGKILL mid-stream: no destructor, no flush, no final commit.
        child.0.kill().unwrap();
        let status = child.0.wait().unwrap();
        // Lines already in the pipe were acknowledged before the kill.
        for line in lines {
            match line {
                Ok(line) => record(&mut acked, &line),
                Err(_) => break,
            }
        }
        (acked, status)
    })
    .await
    .unwrap();
    let (acked, status) = acked;
    assert!(!status.success(), "the child was killed, not finished");
    assert!(
        acked.len() >= 2_000,
        "the child acknowledged only {} commits",
        acked.len()
    );

    let store = SqliteStore::open(&path).unwrap();
    let mut stored = BTreeMap::new();
    let mut since = 0;
    loop {
        let page = store
            .audit(&AuditQuery {
                since_seq: Some(since),
                limit: Some(MAX_AUDIT_LIMIT),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        since = last.seq;
        for event in page {
            stored.insert(event.seq, event.event.task_id.unwrap());
        }
    }
    for (seq, id) in &acked {
        assert_eq!(stored.get(seq), Some(id), "acknowledged seq {seq} lost");
        assert!(
            store.task(id).await.unwrap().is_some(),
            "acknowledged task {id} lost"
        );
    }
    let max = stored.keys().next_back().copied().unwrap_or(0);
    assert_eq!(
        stored.keys().copied().collect::<Vec<_>>(),
        (1..=max).collect::<Vec<_>>(),
        "the log has no holes after a crash"
    );
    println!(
        "kill -9: {} acknowledged, {} stored (commits in flight at the kill may land unacknowledged)",
        acked.len(),
        stored.len()
    );
}

// ---------------------------------------------------------------------------
// Throughput: prints the rate, asserts nothing about it.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_rate() {
    for (label, options) in [
        ("synchronous=FULL", SqliteOptions::default()),
        (
            "synchronous=NORMAL",
            SqliteOptions {
                synchronous_full: false,
                ..SqliteOptions::default()
            },
        ),
    ] {
        let dir = temp_dir();
        let store =
            Arc::new(SqliteStore::open_with(&dir.path().join("ledger.db"), &options).unwrap());
        for (callers, per_caller) in [(1_usize, 300_usize), (64, 200)] {
            let started = Instant::now();
            let mut handles = Vec::with_capacity(callers);
            for c in 0..callers {
                let store = Arc::clone(&store);
                handles.push(tokio::spawn(async move {
                    for i in 0..per_caller {
                        let mut event = sample_event(EventKind::CallAllowed, "rate");
                        event.tool = Some("db.read".into());
                        event.detail = Some(format!("{c}/{i}"));
                        store.commit(vec![Op::Append(event)]).await.unwrap();
                    }
                }));
            }
            for handle in handles {
                handle.await.unwrap();
            }
            let elapsed = started.elapsed();
            let total = callers * per_caller;
            #[expect(clippy::cast_precision_loss, reason = "a printed rate")]
            let rate = total as f64 / elapsed.as_secs_f64();
            println!(
                "group commit ({label}): {total} single-op batches from {callers} concurrent \
                 callers in {elapsed:.2?} = {rate:.0} commits/s"
            );
        }
        store.close().await;
    }
}
