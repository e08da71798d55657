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

use portcullis_core::{TaskStatus, Timestamp};
use portcullis_store::chain::{self, Report};
use portcullis_store::sqlite::SCHEMA_VERSION;
use portcullis_store::testsuite::{
    self, T0, sample_event, sample_refresh, sample_task, sample_token, test_checkpoint,
};
use portcullis_store::{
    AuditQuery, Checkpoint, EventKind, MAX_AUDIT_LIMIT, Op, SqliteOptions, SqliteStore, Store,
    StoreError,
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
    // Rolled-back batches inside shared transactions left the chain whole.
    testsuite::assert_log_is_valid(store.as_ref()).await;
}

/// Regression (planning on queued commits): a task's next change is
/// planned on the state its previous, still queued, change will produce.
/// If that change failed, the next one's compare-and-swap could still
/// match a version some other writer produced meanwhile, and commit a
/// state planned on a change that never happened (un-halting a halted
/// task). A batch chained with `enqueue_after` is refused unless the
/// batch it was planned on committed, and so is every batch after it in
/// the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_planned_on_a_failed_batch_is_never_committed() {
    let (_dir, store) = fresh();
    let record = sample_task("chained");
    store
        .commit(vec![Op::InsertTask(record.clone())])
        .await
        .unwrap();
    assert!(store.writer_queue());
    let update = |version: u64, status: TaskStatus, expected: u64| {
        let mut next = record.clone();
        next.task.version = version;
        next.task.status = status;
        Op::UpdateTask {
            record: next,
            expected_version: expected,
        }
    };
    // Planned on a stale version: fails at the writer.
    let a = store
        .enqueue_after(vec![update(2, TaskStatus::Active, 9)], None)
        .await
        .unwrap();
    // Another writer halts the task: version 1 → 2.
    let halt = store
        .enqueue_after(vec![update(2, TaskStatus::Halted, 1)], None)
        .await
        .unwrap();
    // Planned on `a`'s outcome (version 2, active): its compare-and-swap
    // would match the halt's version.
    let b = store
        .enqueue_after(vec![update(3, TaskStatus::Active, 2)], Some(a.ticket))
        .await
        .unwrap();
    // And one planned on `b`, an audit record only.
    let c = store
        .enqueue_after(
            vec![Op::Append(sample_event(EventKind::CallAllowed, "chained"))],
            Some(b.ticket),
        )
        .await
        .unwrap();
    // A batch planned on the halt goes ahead.
    let d = store
        .enqueue_after(
            vec![Op::Append(sample_event(EventKind::TaskHalted, "chained"))],
            Some(halt.ticket),
        )
        .await
        .unwrap();
    assert!(matches!(a.pending.await, Err(StoreError::Conflict(_))));
    halt.pending.await.unwrap();
    for refused in [b.pending.await, c.pending.await] {
        match refused {
            Err(StoreError::Conflict(why)) => {
                assert_eq!(why, portcullis_store::DEPENDENCY_FAILED);
            }
            other => panic!("a batch planned on a failed one: {other:?}"),
        }
    }
    d.pending.await.unwrap();
    let now = store.task("chained").await.unwrap().unwrap();
    assert_eq!(now.task.status, TaskStatus::Halted);
    assert_eq!(now.task.version, 2);
    let kinds: Vec<EventKind> = store
        .audit(&AuditQuery::default())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event.kind)
        .collect();
    assert_eq!(kinds, vec![EventKind::TaskHalted]);
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
    // The chain continued across both reopens.
    assert_eq!(events[1].prev_hash, events[0].hash);
    assert_eq!(
        store.chain_head().await.unwrap(),
        Some((next[0], events[1].hash.clone()))
    );
    testsuite::assert_log_is_valid(&store).await;
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

/// The task counts (`/metrics`' `portcullis_tasks`) are read from the
/// `tasks_status` index, never by a scan of every task ever run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_counts_use_the_status_index() {
    let dir = temp_dir();
    let path = dir.path().join("ledger.db");
    SqliteStore::open(&path).unwrap().close().await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let plan: Vec<String> = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT (SELECT count(*) FROM tasks WHERE status = 'active'), \
             (SELECT count(*) FROM tasks WHERE status = 'halted')",
        )
        .unwrap()
        .query_map([], |row| row.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let scans: Vec<&String> = plan.iter().filter(|l| l.contains("tasks")).collect();
    assert_eq!(scans.len(), 2, "{plan:?}");
    assert!(
        scans
            .iter()
            .all(|l| l.contains("USING COVERING INDEX tasks_status")),
        "{plan:?}"
    );
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
async fn schema_is_version_7_with_elevations_the_audit_chain_tool_pins_tool_use_task_status_and_held_calls()
 {
    assert_eq!(SCHEMA_VERSION, 7);
    let dir = temp_dir();
    let path = dir.path().join("ledger.db");
    SqliteStore::open(&path).unwrap().close().await;
    assert_eq!(
        migration_rows(&path),
        vec![
            (1, "ledger".to_owned()),
            (2, "elevations".to_owned()),
            (3, "audit chain".to_owned()),
            (4, "tool pins".to_owned()),
            (5, "agent tool use".to_owned()),
            (6, "task status index".to_owned()),
            (7, "held calls".to_owned())
        ]
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let held: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('elevations') WHERE name = 'held'")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(held, ["held"]);
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
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('audit_events') ORDER BY cid")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        columns,
        ["seq", "ts", "kind", "task_id", "event", "prev_hash", "hash"]
    );
    let hash = "0".repeat(64);
    conn.execute(
        "INSERT INTO checkpoints (seq, hash, ts, kid, sig) VALUES (1, ?1, 0, 'k', 's')",
        [&hash[..63]],
    )
    .unwrap_err();
    conn.execute(
        "INSERT INTO checkpoints (seq, hash, ts, kid, sig) VALUES (0, ?1, 0, 'k', 's')",
        [&hash],
    )
    .unwrap_err();
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('tool_pins') ORDER BY cid")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        columns,
        [
            "tool",
            "upstream",
            "hash",
            "definition",
            "pinned_at",
            "approved_by"
        ]
    );
    conn.execute(
        "INSERT INTO tool_pins (tool, upstream, hash, definition, pinned_at, approved_by) \
         VALUES ('u.t', 'u', ?1, '{}', 0, 'x')",
        [&hash[..63]],
    )
    .unwrap_err();
    conn.execute(
        "INSERT INTO tool_pins (tool, upstream, hash, definition, pinned_at, approved_by) \
         VALUES ('u.t', 'u', ?1, '{}', 'now', 'x')",
        [&hash],
    )
    .unwrap_err();
}

/// Pins survive close and reopen; a stored pin row that does not decode is
/// an error, never a panic or a default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_survive_close_and_reopen() {
    let dir = temp_dir();
    let path = dir.path().join("ledger.db");
    let first = testsuite::sample_pin("warehouse.query", "first-use");
    let other = testsuite::sample_pin("files.read", "alice");
    let store = SqliteStore::open(&path).unwrap();
    store
        .commit(vec![Op::PinTool(first.clone()), Op::PinTool(other.clone())])
        .await
        .unwrap();
    store.close().await;
    drop(store);

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.pins().await.unwrap(),
        vec![other.clone(), first.clone()]
    );
    let mut approved = first.clone();
    approved.approved_by = "alice".into();
    approved.pinned_at = T0.plus_millis(1);
    store
        .commit(vec![Op::PinTool(approved.clone())])
        .await
        .unwrap();
    // Dropping without close persists too.
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.pin("warehouse.query").await.unwrap(),
        Some(approved.clone())
    );

    let conn = rusqlite::Connection::open(&path).unwrap();
    for bad in [
        "UPDATE tool_pins SET definition = '[]' WHERE tool = 'files.read'",
        "UPDATE tool_pins SET definition = '{' WHERE tool = 'files.read'",
        "UPDATE tool_pins SET pinned_at = -5 WHERE tool = 'files.read'",
    ] {
        conn.execute_batch(&format!(
            "UPDATE tool_pins SET definition = '{{}}', pinned_at = 0 WHERE tool = 'files.read'; \
             {bad}"
        ))
        .unwrap();
        assert!(
            matches!(store.pin("files.read").await, Err(StoreError::Corrupt(_))),
            "{bad}"
        );
        assert!(
            matches!(store.pins().await, Err(StoreError::Corrupt(_))),
            "{bad}"
        );
        assert_eq!(
            store.pin("warehouse.query").await.unwrap(),
            Some(approved.clone())
        );
    }
    store.close().await;
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
        store.elevations(None, None, 10).await,
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
// Tampering with the database file behind the store's back: each test writes
// a log of 20 records (checkpoints at seqs 5 and 15 unless told otherwise),
// closes the store, edits the file with plain SQL, reopens it and verifies
// the whole log as `audit verify` would (`testsuite::verify_log`).

const LOG_LEN: u64 = 20;

/// A closed database holding a log of [`LOG_LEN`] records with a checkpoint
/// after each seq of `checkpoints`.
async fn written_log(checkpoints: &[u64]) -> (TempDir, PathBuf) {
    let dir = temp_dir();
    let path = dir.path().join("ledger.db");
    let store = SqliteStore::open(&path).unwrap();
    for i in 1..=LOG_LEN {
        let mut event = sample_event(EventKind::CallAllowed, &format!("task-{}", i % 3));
        event.ts = T0.plus_millis(i);
        event.tool = Some("db.read".into());
        event.args = Some(serde_json::json!({"row": i, "ratio": 0.25, "who": "é"}));
        event.detail = Some(format!("call {i}"));
        let seq = store.commit(vec![Op::Append(event)]).await.unwrap().seqs[0];
        assert_eq!(seq, i);
        if checkpoints.contains(&seq) {
            let (head, hash) = store.chain_head().await.unwrap().unwrap();
            assert_eq!(head, seq);
            store
                .commit(vec![Op::AppendCheckpoint(test_checkpoint(seq, &hash))])
                .await
                .unwrap();
        }
    }
    let report = testsuite::verify_log(&store).await;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, LOG_LEN);
    assert_eq!(
        report.checkpoints_verified,
        u64::try_from(checkpoints.len()).unwrap()
    );
    store.close().await;
    (dir, path)
}

/// Applies `sql` to the file, then verifies the reopened store.
async fn tamper(path: &Path, sql: &str) -> Report {
    {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch(sql).unwrap();
    }
    let store = SqliteStore::open(path).unwrap();
    let report = testsuite::verify_log(&store).await;
    store.close().await;
    report
}

fn bad_seq(report: &Report) -> Option<u64> {
    report.first_bad.as_ref().map(|p| p.seq)
}

fn record_json(path: &Path, seq: u64) -> serde_json::Value {
    let conn = rusqlite::Connection::open(path).unwrap();
    let text: String = conn
        .query_row(
            "SELECT event FROM audit_events WHERE seq = ?1",
            [i64::try_from(seq).unwrap()],
            |row| row.get(0),
        )
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_edit_of_a_field_is_found_at_its_seq() {
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(
        &path,
        "UPDATE audit_events SET event = json_set(event, '$.detail', 'nothing to see') \
         WHERE seq = 9",
    )
    .await;
    assert_eq!(bad_seq(&report), Some(9), "{report:?}");
    assert_eq!(report.records, 9);
    assert_eq!(report.checkpoints_verified, 1);

    // An edit inside the arguments, and one of ts: the same.
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(
        &path,
        "UPDATE audit_events SET event = json_set(event, '$.args.ratio', 0.5) WHERE seq = 3",
    )
    .await;
    assert_eq!(bad_seq(&report), Some(3), "{report:?}");
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(
        &path,
        "UPDATE audit_events SET event = json_set(event, '$.ts', 1) WHERE seq = 20",
    )
    .await;
    assert_eq!(bad_seq(&report), Some(20), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_deleting_a_middle_record_is_found_at_its_seq() {
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(&path, "DELETE FROM audit_events WHERE seq = 11").await;
    let problem = report.first_bad.clone().unwrap();
    assert_eq!(problem.seq, 11, "{report:?}");
    assert!(problem.what.contains("missing"), "{problem:?}");
    assert_eq!(report.records, 11, "records 1-10, then 12");

    // Deleting the first record.
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(&path, "DELETE FROM audit_events WHERE seq = 1").await;
    assert_eq!(bad_seq(&report), Some(1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_inserting_a_forged_record_is_found() {
    // Later records moved up one seq to make room at 8, and a forged record
    // put there, correctly hashed and linked to record 7 (anyone can compute
    // SHA-256): it is the moved record after it that no longer fits.
    let (_dir, path) = written_log(&[5, 15]).await;
    let mut forged: portcullis_store::AuditEvent =
        serde_json::from_value(record_json(&path, 8)).unwrap();
    forged.event.detail = Some("approved by nobody".into());
    forged.prev_hash = record_json(&path, 7)["hash"].as_str().unwrap().to_owned();
    forged.hash = chain::record_hash(&forged);
    let forged_json = serde_json::to_string(&forged).unwrap().replace('\'', "''");
    let report = tamper(
        &path,
        &format!(
            "UPDATE audit_events SET seq = -seq WHERE seq >= 8;
             UPDATE audit_events SET seq = 1 - seq WHERE seq < 0;
             INSERT INTO audit_events (seq, ts, kind, task_id, event, prev_hash, hash)
             VALUES (8, 0, 'call.allowed', NULL, '{forged_json}', '{}', '{}');",
            forged.prev_hash, forged.hash
        ),
    )
    .await;
    assert_eq!(bad_seq(&report), Some(9), "{report:?}");

    // A forged record that is not even hashed right is found where it is.
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(
        &path,
        "UPDATE audit_events SET seq = -seq WHERE seq >= 8;
         UPDATE audit_events SET seq = 1 - seq WHERE seq < 0;
         INSERT INTO audit_events (seq, ts, kind, task_id, event, prev_hash, hash)
         SELECT 8, ts, kind, task_id, json_set(event, '$.detail', 'forged'), prev_hash, hash
         FROM audit_events WHERE seq = 9;",
    )
    .await;
    assert_eq!(bad_seq(&report), Some(8), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_swapping_two_records_is_found() {
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(
        &path,
        "UPDATE audit_events SET seq = -1 WHERE seq = 12;
         UPDATE audit_events SET seq = 12 WHERE seq = 17;
         UPDATE audit_events SET seq = 17 WHERE seq = -1;",
    )
    .await;
    assert_eq!(bad_seq(&report), Some(12), "{report:?}");

    // The contents swapped, each row keeping its seq: the same.
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(
        &path,
        "UPDATE audit_events SET event = CASE seq
             WHEN 2 THEN (SELECT event FROM audit_events WHERE seq = 3)
             ELSE (SELECT event FROM audit_events WHERE seq = 2) END
         WHERE seq IN (2, 3);",
    )
    .await;
    assert_eq!(bad_seq(&report), Some(2), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_rewriting_the_chain_is_found_at_the_next_checkpoint() {
    // Record 7 edited and every hash from there re-computed: the chain is
    // consistent again, but the checkpoint of seq 15 signed another record.
    let (_dir, path) = written_log(&[5, 15]).await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut prev = record_json(&path, 6)["hash"].as_str().unwrap().to_owned();
    for seq in 7..=LOG_LEN {
        let mut record: portcullis_store::AuditEvent =
            serde_json::from_value(record_json(&path, seq)).unwrap();
        if seq == 7 {
            record.event.decision = Some("deny".into());
        }
        record.prev_hash = prev;
        record.hash = chain::record_hash(&record);
        conn.execute(
            "UPDATE audit_events SET event = ?2, prev_hash = ?3, hash = ?4 WHERE seq = ?1",
            rusqlite::params![
                i64::try_from(seq).unwrap(),
                serde_json::to_string(&record).unwrap(),
                record.prev_hash,
                record.hash
            ],
        )
        .unwrap();
        prev = record.hash;
    }
    drop(conn);
    let report = tamper(&path, "").await;
    let problem = report.first_bad.clone().unwrap();
    assert_eq!(problem.seq, 15, "{report:?}");
    assert!(problem.what.contains("checkpoint"), "{problem:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_truncating_past_a_checkpoint_is_found() {
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(&path, "DELETE FROM audit_events WHERE seq > 12").await;
    let problem = report.first_bad.clone().unwrap();
    assert_eq!(problem.seq, 13, "{report:?}");
    assert!(problem.what.contains("truncated"), "{problem:?}");
    assert_eq!(report.records, 12);
    assert_eq!(report.checkpoints_verified, 1);

    // Down to nothing: still found.
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(&path, "DELETE FROM audit_events").await;
    assert_eq!(bad_seq(&report), Some(1), "{report:?}");
}

/// The documented limit: records after the newest checkpoint can be cut off
/// without trace until the next checkpoint is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_truncating_after_the_last_checkpoint_is_not_detectable() {
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(&path, "DELETE FROM audit_events WHERE seq > 17").await;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 17);
    assert_eq!(report.last_seq, 17);
    assert_eq!(report.checkpoints_verified, 2);
    assert_eq!(report.uncovered, 2, "the window the cut hid in");

    // But the store never re-uses the cut seqs: the next record leaves a
    // gap a verifier sees (unless the attacker also reset sqlite_sequence).
    let store = SqliteStore::open(&path).unwrap();
    let next = store
        .commit(vec![Op::Append(sample_event(EventKind::Anomaly, "after"))])
        .await
        .unwrap();
    assert_eq!(next.seqs, vec![LOG_LEN + 1]);
    let report = testsuite::verify_log(&store).await;
    assert_eq!(bad_seq(&report), Some(18), "{report:?}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_a_checkpoint_with_a_bad_signature_is_found() {
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(&path, "UPDATE checkpoints SET sig = 'AAAA' WHERE seq = 15").await;
    let problem = report.first_bad.clone().unwrap();
    assert_eq!(problem.seq, 15, "{report:?}");
    assert!(problem.what.contains("signature"), "{problem:?}");
    assert_eq!(report.checkpoints_verified, 1);

    // A checkpoint moved to another record (hash and seq changed, the
    // signature kept): the signature no longer fits.
    let (_dir, path) = written_log(&[5, 15]).await;
    let report = tamper(
        &path,
        "UPDATE checkpoints SET seq = 16, \
         hash = (SELECT hash FROM audit_events WHERE seq = 16) WHERE seq = 15",
    )
    .await;
    assert_eq!(bad_seq(&report), Some(16), "{report:?}");

    // The store stores what it is given; the signature is the verifier's
    // business.
    let (_dir, path) = written_log(&[]).await;
    let store = SqliteStore::open(&path).unwrap();
    let (seq, hash) = store.chain_head().await.unwrap().unwrap();
    let mut forged = test_checkpoint(seq, &hash);
    forged.sig = "forged".into();
    store
        .commit(vec![Op::AppendCheckpoint(forged)])
        .await
        .unwrap();
    let report = testsuite::verify_log(&store).await;
    assert_eq!(bad_seq(&report), Some(LOG_LEN), "{report:?}");
    store.close().await;
}

/// The store reads a record's seq from its row: the copy inside the JSON
/// is not what a reader sees, so editing it alone changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seq_of_a_record_is_its_row() {
    let (_dir, path) = written_log(&[5]).await;
    let report = tamper(
        &path,
        "UPDATE audit_events SET event = json_set(event, '$.seq', 99) WHERE seq = 4",
    )
    .await;
    assert!(report.is_ok(), "{report:?}");
}

// ---------------------------------------------------------------------------
// Crash safety: a child process commits in a loop and prints each
// acknowledged seq; it is killed with SIGKILL mid-stream; every acknowledged
// seq must be in the database afterwards.

const CRASH_DB_ENV: &str = "PORTCULLIS_STORE_CRASH_DB";
/// Set: the child also writes a JSON Lines mirror there.
const CRASH_MIRROR_ENV: &str = "PORTCULLIS_STORE_CRASH_MIRROR";
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
        let options = std::env::var_os(CRASH_MIRROR_ENV)
            .map_or_else(SqliteOptions::default, |m| with_mirror(Path::new(&m)));
        let store = Arc::new(SqliteStore::open_with(Path::new(&path), &options).unwrap());
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

// ---------------------------------------------------------------------------
// The JSON Lines mirror (`SqliteOptions::jsonl_mirror`).

fn with_mirror(mirror: &Path) -> SqliteOptions {
    SqliteOptions {
        jsonl_mirror: Some(mirror.to_path_buf()),
        ..SqliteOptions::default()
    }
}

/// The mirror's text; it must end with a newline (or be empty).
fn mirror_text(mirror: &Path) -> String {
    let text = std::fs::read_to_string(mirror).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the mirror ends mid-line: {text:?}"
    );
    text
}

/// The ledger's records (seq and stored JSON, in seq order) and checkpoints
/// (in seq order), read from the file directly.
fn ledger_contents(db: &Path) -> (Vec<(u64, String)>, Vec<Checkpoint>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let records = conn
        .prepare("SELECT seq, event FROM audit_events ORDER BY seq")
        .unwrap()
        .query_map([], |row| {
            Ok((
                u64::try_from(row.get::<_, i64>(0)?).unwrap(),
                row.get::<_, String>(1)?,
            ))
        })
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap();
    let checkpoints = conn
        .prepare("SELECT seq, hash, ts, kid, sig FROM checkpoints ORDER BY seq")
        .unwrap()
        .query_map([], |row| {
            Ok(Checkpoint {
                seq: u64::try_from(row.get::<_, i64>(0)?).unwrap(),
                hash: row.get(1)?,
                ts: Timestamp(u64::try_from(row.get::<_, i64>(2)?).unwrap()),
                kid: row.get(3)?,
                sig: row.get(4)?,
            })
        })
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap();
    (records, checkpoints)
}

/// A mirror line: a record's seq, or a checkpoint's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MirrorLine {
    R(u64),
    C(u64),
}

/// Checks the mirror against the ledger: its record lines are the stored
/// JSON of every record, byte for byte, in seq order; each stored
/// checkpoint is one line, built as `audit export` builds it, after its
/// record's line; the records verify as a chain against those checkpoints
/// (as `audit verify --jsonl` does). Lines that are not JSON (a terminated
/// partial line) are returned, not checked; so is the order of the lines.
fn check_mirror(db: &Path, mirror: &Path) -> (Vec<MirrorLine>, Vec<String>) {
    let (records, checkpoints) = ledger_contents(db);
    let text = mirror_text(mirror);
    let mut order = Vec::new();
    let mut junk = Vec::new();
    let mut record_lines: Vec<(u64, String)> = Vec::new();
    let mut checkpoint_lines: Vec<Checkpoint> = Vec::new();
    for line in text.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            junk.push(line.to_owned());
            continue;
        };
        if let Some(checkpoint) = value.get("checkpoint") {
            assert!(line.starts_with("{\"checkpoint\""), "{line}");
            let checkpoint: Checkpoint = serde_json::from_value(checkpoint.clone()).unwrap();
            assert_eq!(
                line,
                serde_json::json!({ "checkpoint": checkpoint }).to_string(),
                "a checkpoint line is an export line"
            );
            assert!(
                record_lines.iter().any(|(seq, _)| *seq == checkpoint.seq),
                "checkpoint {} before its record",
                checkpoint.seq
            );
            order.push(MirrorLine::C(checkpoint.seq));
            checkpoint_lines.push(checkpoint);
        } else {
            let seq = value["seq"].as_u64().unwrap();
            order.push(MirrorLine::R(seq));
            record_lines.push((seq, line.to_owned()));
        }
    }
    assert_eq!(
        record_lines, records,
        "the record lines are the stored records"
    );
    checkpoint_lines.sort_by_key(|c| c.seq);
    assert_eq!(
        checkpoint_lines, checkpoints,
        "one line per stored checkpoint"
    );

    let report = chain::verify_json(
        record_lines
            .iter()
            .map(|(_, line)| serde_json::from_str(line).map_err(|e| e.to_string())),
        &checkpoint_lines,
        &testsuite::test_check_sig,
    );
    assert!(report.is_ok(), "the mirror does not verify: {report:?}");
    assert_eq!(report.records, u64::try_from(records.len()).unwrap());
    assert_eq!(
        report.checkpoints_verified,
        u64::try_from(checkpoints.len()).unwrap()
    );
    (order, junk)
}

/// Appends `count` records, one commit each, and a checkpoint of the
/// chain head (its own commit) after each seq that `checkpoint_at` accepts.
async fn append_records(store: &SqliteStore, count: u64, checkpoint_at: impl Fn(u64) -> bool) {
    for _ in 0..count {
        let mut event = sample_event(EventKind::CallAllowed, "mirrored");
        event.tool = Some("db.read".into());
        event.args = Some(serde_json::json!({"ratio": 0.1, "who": "é\u{1}", "n": [1, 2.5e-7]}));
        let seq = store.commit(vec![Op::Append(event)]).await.unwrap().seqs[0];
        if checkpoint_at(seq) {
            let (head, hash) = store.chain_head().await.unwrap().unwrap();
            store
                .commit(vec![Op::AppendCheckpoint(test_checkpoint(head, &hash))])
                .await
                .unwrap();
        }
    }
}

fn assert_no_mirror_failure(store: &SqliteStore) {
    assert_eq!(
        (store.mirror_failures(), store.mirror_last_error()),
        (0, None)
    );
}

/// Each committed record is a line, its stored JSON exactly; each newly
/// stored checkpoint a line after its record's; rolled-back batches and a
/// repeated checkpoint write nothing; a reopen writes nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_lines_are_the_committed_records_and_checkpoints() {
    use MirrorLine::{C, R};
    let dir = temp_dir();
    let db = dir.path().join("ledger.db");
    let mirror = dir.path().join("audit.jsonl");
    let store = SqliteStore::open_with(&db, &with_mirror(&mirror)).unwrap();
    assert_eq!(store.mirror_seq(), Some(0));

    store
        .commit(vec![
            Op::InsertTask(sample_task("m")),
            Op::Append(sample_event(EventKind::TaskStarted, "m")),
        ])
        .await
        .unwrap();
    append_records(&store, 2, |_| false).await;
    // A failed batch: rolled back, no line.
    let failed = store
        .commit(vec![
            Op::Append(sample_event(EventKind::CallDenied, "m")),
            Op::SpendRefresh {
                hash: "no-such-hash".into(),
                at: T0,
            },
        ])
        .await;
    assert!(
        matches!(failed, Err(StoreError::RefreshUnknown)),
        "{failed:?}"
    );
    let (head, hash) = store.chain_head().await.unwrap().unwrap();
    assert_eq!(head, 3);
    let checkpoint = test_checkpoint(head, &hash);
    store
        .commit(vec![Op::AppendCheckpoint(checkpoint.clone())])
        .await
        .unwrap();
    // A record and, in the same batch, a checkpoint of an older record.
    append_records(&store, 1, |_| false).await;
    let (_, hash4) = store.chain_head().await.unwrap().unwrap();
    store
        .commit(vec![
            Op::Append(sample_event(EventKind::TaskCompleted, "m")),
            Op::AppendCheckpoint(test_checkpoint(4, &hash4)),
            // Repeated: a no-op, so no line.
            Op::AppendCheckpoint(checkpoint),
        ])
        .await
        .unwrap();
    store.ping().await.unwrap();

    let (order, junk) = check_mirror(&db, &mirror);
    assert!(junk.is_empty(), "{junk:?}");
    assert_eq!(order, vec![R(1), R(2), R(3), C(3), R(4), R(5), C(4)]);
    assert_eq!(store.mirror_seq(), Some(5));
    assert_no_mirror_failure(&store);
    store.close().await;

    let before = mirror_text(&mirror);
    let store = SqliteStore::open_with(&db, &with_mirror(&mirror)).unwrap();
    store.close().await;
    assert_eq!(
        mirror_text(&mirror),
        before,
        "a mirror in sync is left alone"
    );
    assert_eq!(store.mirror_seq(), Some(5));
    assert_no_mirror_failure(&store);
}

/// Commits racing from many tasks, with checkpoints among them, land in
/// the mirror in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_keeps_seq_order_under_concurrent_commits() {
    let dir = temp_dir();
    let db = dir.path().join("ledger.db");
    let mirror = dir.path().join("audit.jsonl");
    let store = Arc::new(SqliteStore::open_with(&db, &with_mirror(&mirror)).unwrap());
    let mut handles = Vec::new();
    for caller in 0..8 {
        let store = Arc::clone(&store);
        handles.push(tokio::spawn(async move {
            for i in 0..100 {
                let mut event = sample_event(EventKind::CallAllowed, "race");
                event.detail = Some(format!("{caller}/{i}"));
                store.commit(vec![Op::Append(event)]).await.unwrap();
            }
        }));
    }
    let checkpointer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            for _ in 0..20 {
                if let Some((head, hash)) = store.chain_head().await.unwrap() {
                    store
                        .commit(vec![Op::AppendCheckpoint(test_checkpoint(head, &hash))])
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for handle in handles {
        handle.await.unwrap();
    }
    checkpointer.await.unwrap();
    store.close().await;

    let (order, junk) = check_mirror(&db, &mirror);
    assert!(junk.is_empty(), "{junk:?}");
    let seqs: Vec<u64> = order
        .iter()
        .filter_map(|line| match line {
            MirrorLine::R(seq) => Some(*seq),
            MirrorLine::C(_) => None,
        })
        .collect();
    assert_eq!(seqs, (1..=800).collect::<Vec<_>>());
    assert_no_mirror_failure(&store);
}

/// A closed store with a mirror: 30 records, a checkpoint after 10 and 20,
/// then record 31 and, in a later commit, a checkpoint of 30 (after a
/// newer record). Returns the mirror's text.
async fn mirrored_log(db: &Path, mirror: &Path) -> String {
    let store = SqliteStore::open_with(db, &with_mirror(mirror)).unwrap();
    append_records(&store, 30, |seq| seq % 10 == 0 && seq < 30).await;
    let (_, hash30) = store.chain_head().await.unwrap().unwrap();
    append_records(&store, 1, |_| false).await;
    store
        .commit(vec![Op::AppendCheckpoint(test_checkpoint(30, &hash30))])
        .await
        .unwrap();
    store.close().await;
    assert_no_mirror_failure(&store);
    let (order, junk) = check_mirror(db, mirror);
    assert!(junk.is_empty());
    assert_eq!(order.len(), 34);
    assert_eq!(
        order.get(31..),
        Some(&[MirrorLine::R(30), MirrorLine::R(31), MirrorLine::C(30)][..])
    );
    mirror_text(mirror)
}

/// Keeps the first `keep` lines of `text`, then `partial`.
fn cut(mirror: &Path, text: &str, keep: usize, partial: &str) {
    let mut kept: String = text.split_inclusive('\n').take(keep).collect();
    kept.push_str(partial);
    std::fs::write(mirror, kept).unwrap();
}

async fn reopen_and_close(db: &Path, mirror: &Path) -> SqliteStore {
    let store = SqliteStore::open_with(db, &with_mirror(mirror)).unwrap();
    store.close().await;
    store
}

/// The process died between COMMITs and their mirror writes: the lines
/// missing from the end (checkpoint lines included) are appended on open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_lagging_behind_the_ledger_catches_up_on_open() {
    let dir = temp_dir();
    let db = dir.path().join("ledger.db");
    let mirror = dir.path().join("audit.jsonl");
    let full = mirrored_log(&db, &mirror).await;
    let lines = full.lines().count();
    for lost in [1, 2, 3, 4, 5, 12, 33] {
        cut(&mirror, &full, lines - lost, "");
        let store = reopen_and_close(&db, &mirror).await;
        assert_no_mirror_failure(&store);
        let (_, junk) = check_mirror(&db, &mirror);
        assert!(junk.is_empty(), "{junk:?}");
        if lost == 1 {
            // Only the checkpoint of 30, committed after record 31: written
            // back where it was.
            assert!(mirror_text(&mirror) == full, "{lost} lines lost");
        }
    }
}

/// A partial last line: completed when it is the start of a line the
/// catch-up writes (a write cut short), else ended and left as one
/// unreadable line, the stream going on after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_partial_last_line_is_repaired_on_open() {
    let dir = temp_dir();
    let db = dir.path().join("ledger.db");
    let mirror = dir.path().join("audit.jsonl");
    let full = mirrored_log(&db, &mirror).await;
    let all: Vec<&str> = full.lines().collect();
    let count = all.len();

    // A write cut in the middle of a record line, of a checkpoint line,
    // right before its newline, in the first line; `true` when the lines
    // lost are written back in their original order.
    for (keep, partial, same_order) in [
        (count - 3, &all[count - 3][..40], false),
        (count - 1, &all[count - 1][..20], true),
        (count - 2, all[count - 2], true),
        (0, &all[0][..1], false),
    ] {
        cut(&mirror, &full, keep, partial);
        let store = reopen_and_close(&db, &mirror).await;
        assert_no_mirror_failure(&store);
        let (order, junk) = check_mirror(&db, &mirror);
        assert!(junk.is_empty(), "{partial:?} not completed: {junk:?}");
        assert_eq!(order.len(), count);
        let text = mirror_text(&mirror);
        // What was in the file stays: the partial line is completed.
        let before: String = full.split_inclusive('\n').take(keep).collect::<String>() + partial;
        assert!(text.starts_with(&before), "{partial:?}");
        if same_order {
            assert!(text == full, "{partial:?} completed in place");
        }
    }

    // Half of a line that the catch-up does not write (here, of a line
    // already there): ended, and the stream goes on after it.
    let half = &all[5][..all[5].len() / 2];
    let mut text = full.clone();
    text.push_str(half);
    std::fs::write(&mirror, &text).unwrap();
    let store = SqliteStore::open_with(&db, &with_mirror(&mirror)).unwrap();
    append_records(&store, 2, |_| false).await;
    store.close().await;
    assert_no_mirror_failure(&store);
    let (order, junk) = check_mirror(&db, &mirror);
    assert_eq!(junk, vec![half.to_owned()]);
    let text = mirror_text(&mirror);
    assert!(text.starts_with(&format!("{full}{half}\n")), "{text}");
    assert_eq!(order.len(), count + 2);

    // The same with the ledger further ahead than the mirror.
    let shorter: String = full.split_inclusive('\n').take(count - 3).collect();
    std::fs::write(&mirror, format!("{shorter}{half}")).unwrap();
    reopen_and_close(&db, &mirror).await;
    let (_, junk) = check_mirror(&db, &mirror);
    assert_eq!(junk, vec![half.to_owned()]);
}

/// A mirror enabled on an existing ledger starts with the whole log; one
/// deleted while the store is closed is rebuilt whole on open, across
/// catch-up pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_deleted_while_closed_is_rebuilt_on_open() {
    let dir = temp_dir();
    let db = dir.path().join("ledger.db");
    let mirror = dir.path().join("audit.jsonl");
    let store = SqliteStore::open(&db).unwrap();
    let total = u64::try_from(portcullis_store::sqlite::CATCH_UP_PAGE).unwrap() * 2 + 500;
    let checkpoints = [1000, 1001, 2000, 2500];
    let mut appended = 0;
    while appended < total {
        let batch: Vec<Op> = (0..100)
            .map(|_| Op::Append(sample_event(EventKind::CallAllowed, "many")))
            .collect();
        let seqs = store.commit(batch).await.unwrap().seqs;
        appended = *seqs.last().unwrap();
        for seq in seqs.into_iter().filter(|s| checkpoints.contains(s)) {
            let hash = testsuite::record_at(&store, seq).await.hash;
            store
                .commit(vec![Op::AppendCheckpoint(test_checkpoint(seq, &hash))])
                .await
                .unwrap();
        }
    }
    // 1001 was checkpointed after the batch that holds it.
    store.close().await;

    let store = reopen_and_close(&db, &mirror).await;
    assert_no_mirror_failure(&store);
    assert_eq!(store.mirror_seq(), Some(total));
    let (order, junk) = check_mirror(&db, &mirror);
    assert!(junk.is_empty());
    assert_eq!(
        order.len(),
        usize::try_from(total).unwrap() + checkpoints.len()
    );
    let built = mirror_text(&mirror);

    // Reopened, the whole file is found in sync.
    let store = reopen_and_close(&db, &mirror).await;
    assert_no_mirror_failure(&store);
    assert!(mirror_text(&mirror) == built);

    std::fs::remove_file(&mirror).unwrap();
    let store = reopen_and_close(&db, &mirror).await;
    assert_no_mirror_failure(&store);
    assert!(mirror_text(&mirror) == built, "rebuilt the same");
}

/// Rotation while open: by rename (or delete), the next group creates the
/// file again at the path; by copytruncate, it goes on in the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_rotated_while_open_goes_on_at_the_path() {
    let dir = temp_dir();
    let db = dir.path().join("ledger.db");
    let mirror = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let store = SqliteStore::open_with(&db, &with_mirror(&mirror)).unwrap();
    let seqs_in = |path: &Path| -> Vec<u64> {
        mirror_text(path)
            .lines()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };

    append_records(&store, 3, |_| false).await;
    store.ping().await.unwrap();
    std::fs::rename(&mirror, &rotated).unwrap();
    append_records(&store, 2, |_| false).await;
    store.ping().await.unwrap();
    assert_eq!(seqs_in(&rotated), vec![1, 2, 3]);
    assert_eq!(seqs_in(&mirror), vec![4, 5]);

    std::fs::remove_file(&mirror).unwrap();
    append_records(&store, 1, |_| false).await;
    store.ping().await.unwrap();
    assert_eq!(seqs_in(&mirror), vec![6]);

    // copytruncate: copied, then truncated in place.
    std::fs::copy(&mirror, &rotated).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mirror)
        .unwrap()
        .set_len(0)
        .unwrap();
    append_records(&store, 1, |_| false).await;
    store.ping().await.unwrap();
    assert_eq!(seqs_in(&mirror), vec![7], "no hole, no old lines");
    store.close().await;
    assert_no_mirror_failure(&store);

    // A restart finds the stream's end in the current file.
    let store = reopen_and_close(&db, &mirror).await;
    assert_eq!(seqs_in(&mirror), vec![7]);
    assert_eq!(store.mirror_seq(), Some(7));
}

/// A mirror that cannot be written never fails a commit: the failures are
/// counted, and once the path is writable the next group catches it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_mirror_never_fails_a_commit() {
    let dir = temp_dir();
    let db = dir.path().join("ledger.db");
    let mirror = dir.path().join("audit.jsonl");
    std::fs::create_dir(&mirror).unwrap();
    let store = SqliteStore::open_with(&db, &with_mirror(&mirror)).unwrap();
    append_records(&store, 5, |seq| seq == 3).await;
    store.ping().await.unwrap();
    let failures = store.mirror_failures();
    assert!(failures > 0);
    let error = store.mirror_last_error().unwrap();
    assert!(error.contains("audit.jsonl"), "{error}");
    assert_eq!(store.mirror_seq(), Some(0));
    testsuite::assert_log_is_valid(&store).await;
    // Each group tries again.
    append_records(&store, 1, |_| false).await;
    store.ping().await.unwrap();
    assert!(store.mirror_failures() > failures);

    std::fs::remove_dir(&mirror).unwrap();
    append_records(&store, 1, |_| false).await;
    store.close().await;
    assert_eq!(store.mirror_seq(), Some(7));
    let (order, junk) = check_mirror(&db, &mirror);
    assert!(junk.is_empty());
    assert_eq!(order.len(), 8);
}

/// A mirror whose last record is not the ledger's (a database restored
/// from an older backup, a file of another ledger) is reported, and goes on
/// after the last record both hold: no record of the ledger is left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_ahead_of_the_ledger_is_reported_and_goes_on() {
    let dir = temp_dir();
    let mirror = dir.path().join("audit.jsonl");
    let db = dir.path().join("ledger.db");
    let backup = dir.path().join("backup.db");
    let last_line = || {
        let text = mirror_text(&mirror);
        let line = text.lines().last().unwrap().to_owned();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let store = SqliteStore::open_with(&db, &with_mirror(&mirror)).unwrap();
    append_records(&store, 3, |_| false).await;
    store.close().await;
    std::fs::copy(&db, &backup).unwrap();
    let store = SqliteStore::open_with(&db, &with_mirror(&mirror)).unwrap();
    append_records(&store, 2, |_| false).await;
    store.close().await;
    assert_eq!(mirror_text(&mirror).lines().count(), 5);

    // Restored from the backup: records 4 and 5 are gone from the ledger,
    // and its next record 4 is another one.
    std::fs::rename(&backup, &db).unwrap();
    let store = SqliteStore::open_with(&db, &with_mirror(&mirror)).unwrap();
    let mut event = sample_event(EventKind::CallDenied, "restored");
    event.detail = Some("after the restore".into());
    store.commit(vec![Op::Append(event)]).await.unwrap();
    store.close().await;
    assert!(store.mirror_failures() > 0);
    let error = store.mirror_last_error().unwrap();
    assert!(
        error.contains("seq 5") && error.contains("after seq 3"),
        "{error}"
    );
    assert_eq!(mirror_text(&mirror).lines().count(), 6);
    assert_eq!(last_line()["seq"], 4);
    assert_eq!(last_line()["detail"], "after the restore");

    // Another ledger altogether: its whole log follows.
    let store =
        SqliteStore::open_with(&dir.path().join("other.db"), &with_mirror(&mirror)).unwrap();
    let mut event = sample_event(EventKind::TaskStarted, "other");
    event.detail = Some("another ledger".into());
    store.commit(vec![Op::Append(event)]).await.unwrap();
    store.close().await;
    assert!(store.mirror_failures() > 0);
    let error = store.mirror_last_error().unwrap();
    assert!(error.contains("after seq 0"), "{error}");
    assert_eq!(mirror_text(&mirror).lines().count(), 7);
    assert_eq!(last_line()["detail"], "another ledger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_cannot_be_the_database() {
    let dir = temp_dir();
    let db = dir.path().join("ledger.db");
    SqliteStore::open(&db).unwrap().close().await;
    for mirror in [db.clone(), dir.path().join("ledger.db-wal")] {
        assert!(
            matches!(
                SqliteStore::open_with(&db, &with_mirror(&mirror)),
                Err(StoreError::Unavailable(_))
            ),
            "{}",
            mirror.display()
        );
    }
}

/// `kill -9` of a process writing a mirror: reopened, the mirror holds
/// every committed record (and nothing twice), and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_is_complete_after_kill_9() {
    let dir = temp_dir();
    let db = dir.path().join("ledger.db");
    let mirror = dir.path().join("audit.jsonl");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DB_ENV, &db)
        .env(CRASH_MIRROR_ENV, &mirror)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let acked = tokio::task::spawn_blocking(move || {
        let acked = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter(|line| line.starts_with("ACK "))
            .take(500)
            .count();
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        acked
    })
    .await
    .unwrap();
    assert_eq!(acked, 500, "the child acknowledged too few commits");

    let store = reopen_and_close(&db, &mirror).await;
    assert_no_mirror_failure(&store);
    let (order, junk) = check_mirror(&db, &mirror);
    assert!(junk.is_empty(), "{junk:?}");
    assert!(order.len() >= 500);
}
