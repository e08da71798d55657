//! Regression for a deadlock in SQLite's unix VFS when connections close
//! concurrently (SQLite 3.51.1, fixed in 3.51.2: "an obscure deadlock in the
//! new broken-posix-lock detection logic").
//!
//! The hang that was seen: a test thread dropped a store, closing its read
//! connections (`unixClose`: the global VFS mutex, then the file's inode
//! mutex), while that store's writer thread closed the WAL connection
//! (`unixLock(EXCLUSIVE)` → `unixIsSharingShmNode`: the inode mutex, then
//! the global VFS mutex). Both waited forever, and so did every other store
//! of the process.
//!
//! This file is its own test binary on purpose: it counts the process's
//! store writer threads to prove every close finished, and no other test's
//! stores may be open meanwhile (a test added here must open none). It must fail, not hang: the work runs on
//! worker threads and the test thread only waits, with a deadline.
//!
//! `PORTCULLIS_CLOSE_CHURN_SECS` sets how long the threads churn (default
//! 3 s; `.ci/run`'s stress smoke runs it longer).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a panic is a failed test"
)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use portcullis_store::testsuite::{sample_event, sample_task};
use portcullis_store::{AuditQuery, EventKind, Op, SqliteOptions, SqliteStore, Store};

/// Threads that open and close stores at once: half share one database
/// file (the inode mutex the deadlock needs), half have a file each.
const THREADS: usize = 8;
/// How long the whole test may take beyond its churn time before it is a
/// hang: generous for a loaded 2-core machine, far below any CI limit.
const GRACE: Duration = Duration::from_secs(60);

fn churn_time() -> Duration {
    let secs = std::env::var("PORTCULLIS_CLOSE_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(3);
    Duration::from_secs(secs.clamp(1, 600))
}

/// The store writer threads alive in this process (`/proc/self/task/*/comm`
/// holds the first 15 bytes of the thread name).
#[cfg(target_os = "linux")]
fn writer_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| "portcullis-store-writer".starts_with(comm.trim_end()))
        .count()
}

#[cfg(not(target_os = "linux"))]
fn writer_threads() -> usize {
    0
}

/// One thread's loop: open a store (writer and a read pool of two), write,
/// read through the pool, then end it — by `close` on even rounds and by a
/// plain drop on odd ones (the drop closes the readers on this thread while
/// the writer thread closes the WAL connection on its own: the deadlock's
/// shape).
fn churn(path: &Path, id: usize, until: Instant) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let options = SqliteOptions {
        // The lock-order bug is in closing, not in fsync: keep rounds fast.
        synchronous_full: false,
        readers: 2,
        ..SqliteOptions::default()
    };
    let mut rounds = 0;
    while Instant::now() < until {
        let store = SqliteStore::open_with(path, &options).unwrap();
        let task_id = format!("churn-{id}-{rounds}");
        runtime.block_on(async {
            store
                .commit(vec![
                    Op::InsertTask(sample_task(&task_id)),
                    Op::Append(sample_event(EventKind::TaskStarted, &task_id)),
                ])
                .await
                .unwrap();
            // Two reads at once, so both pooled connections are used.
            let query = AuditQuery {
                task_id: Some(task_id.clone()),
                ..AuditQuery::default()
            };
            let (task, events) = tokio::join!(store.task(&task_id), store.audit(&query));
            assert!(task.unwrap().is_some());
            assert!(!events.unwrap().is_empty());
            if rounds % 2 == 0 {
                store.close().await;
            }
        });
        drop(store);
        rounds += 1;
    }
    rounds
}

#[test]
fn closing_stores_concurrently_never_deadlocks_the_vfs() {
    let dir = tempfile::Builder::new()
        .prefix("portcullis-close-churn-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let shared = dir.path().join("shared.db");
    let churn_for = churn_time();
    let until = Instant::now() + churn_for;
    let deadline = until + GRACE;

    let (done_tx, done_rx) = mpsc::channel::<(usize, usize)>();
    for id in 0..THREADS {
        let path: PathBuf = if id % 2 == 0 {
            shared.clone()
        } else {
            dir.path().join(format!("own-{id}.db"))
        };
        let done = done_tx.clone();
        std::thread::Builder::new()
            .name(format!("churn-{id}"))
            .spawn(move || {
                let rounds = churn(&path, id, until);
                let _ = done.send((id, rounds));
            })
            .unwrap();
    }
    drop(done_tx);

    let mut finished = vec![None; THREADS];
    while finished.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok((id, rounds)) => finished[id] = Some(rounds),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let stuck: Vec<usize> = (0..THREADS).filter(|i| finished[*i].is_none()).collect();
                panic!(
                    "threads {stuck:?} did not finish opening and closing stores within \
                     {GRACE:?} after a {churn_for:?} churn: a close stalled (deadlock?)"
                );
            }
            // A churn thread panicked (its sender dropped unsent): the
            // others' results no longer matter.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("a churn thread failed; finished: {finished:?}")
            }
        }
    }

    // Dropped stores close in the background: every writer thread must
    // still be gone before the deadline.
    loop {
        let alive = writer_threads();
        if alive == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{alive} store writer threads still closing {GRACE:?} after the churn ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rounds: usize = finished.iter().flatten().sum();
    eprintln!("{rounds} stores opened and closed by {THREADS} threads in {churn_for:?}");
    assert!(rounds >= THREADS, "each thread ran at least one round");
}

/// SQLite 3.51.1 (bundled by rusqlite 0.38) deadlocks when connections to
/// one file close on two threads at once; 3.51.2 fixed it. The bundled
/// library must never go back below that.
#[test]
fn bundled_sqlite_has_the_close_deadlock_fix() {
    let version = rusqlite::version_number();
    assert!(
        version >= 3_051_002,
        "bundled SQLite {} predates 3.51.2's fix of the close deadlock",
        rusqlite::version()
    );
}
