//! Audit append throughput with the hash chain, through
//! [`SqliteStore::commit`] and its group commit (DESIGN section 11:
//! ≥ 100,000 records/s batched).
//!
//! Every record is a realistic `call.allowed` (task, agent, tool, decision,
//! SQL arguments with a redacted key): about 490 bytes of stored JSON
//! with its `seq`, `prev_hash` and `hash` (the size is printed at start).
//! The writer hashes each one (canonical JSON, SHA-256) and inserts it in
//! commit order.
//!
//! Criterion groups, each with `synchronous = FULL` (the default: durable
//! across power loss) and `NORMAL` (durable across `kill -9` only), each on
//! a fresh database, throughput in records per second:
//!
//! - `append/{full,normal}/1_caller`: one caller, one `Op::Append` per
//!   commit, each awaited before the next;
//! - `append/{full,normal}/64_callers`: 64 concurrent callers, one append
//!   per commit (what group commit is for: many callers share one
//!   transaction and one fsync);
//! - `append/{full,normal}/8_callers_x100`: 8 concurrent callers, 100
//!   appends per commit (the "batched" figure of the target).
//!
//! `chain/hash_and_encode` is the writer's CPU work per record without
//! SQLite ([`chain::seal`]: the canonical text, its hash, the stored JSON;
//! building the event is not timed), to read the groups against.
//!
//! After the groups, a latency pass times `PORTCULLIS_BENCH_COMMITS`
//! (default 5,000) single-caller commits of one `call.allowed` record —
//! what write-ahead auditing adds to a call, which waits for its record to
//! be durable before it is forwarded — and prints p50/p90/p99/p99.9/max. It
//! is skipped in criterion's smoke mode (`-- --test`, or `cargo test
//! --benches`), with `--list` or `--profile-time`, and with
//! `PORTCULLIS_BENCH_COMMITS=0`.
//!
//! Run: `cargo bench -p portcullis-store --bench append`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "a benchmark harness: a panic is a failed run"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use portcullis_core::Timestamp;
use portcullis_store::{
    AuditEvent, EventKind, NewEvent, Op, SqliteOptions, SqliteStore, Store, chain,
};
use serde_json::json;
use tokio::runtime::Runtime;

/// Concurrent callers of the unbatched concurrent group.
const MANY_CALLERS: u64 = 64;
/// Callers of the batched group.
const BATCH_CALLERS: u64 = 8;
/// Appends per commit in the batched group.
const BATCH: u64 = 100;

/// A `call.allowed` record as the gateway writes it ahead of forwarding.
fn call_allowed(n: u64) -> NewEvent {
    let mut event = NewEvent::new(
        Timestamp(1_700_000_000_000 + n / 16),
        EventKind::CallAllowed,
    );
    event.task_id = Some(format!("task_{:022x}", n / 64));
    event.agent_id = Some("ingest-bot".to_owned());
    event.tool = Some("warehouse.query".to_owned());
    event.decision = Some("allow".to_owned());
    event.args = Some(json!({
        "sql": format!(
            "SELECT o.id, o.customer_id, o.total_cents FROM orders o \
             WHERE o.region = 'eu-west' AND o.id > {n} ORDER BY o.id"
        ),
        "database": "sales",
        "password": "[redacted]",
    }));
    event
}

/// The stored size of one record, hash chain fields included.
fn record_bytes() -> usize {
    let mut record = AuditEvent {
        seq: 1_000_000,
        event: call_allowed(1_000_000),
        prev_hash: chain::GENESIS.to_owned(),
        hash: String::new(),
    };
    chain::seal(&mut record).len()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn options(full: bool) -> SqliteOptions {
    SqliteOptions {
        synchronous_full: full,
        ..SqliteOptions::default()
    }
}

/// A fresh store in its own folder (kept alive by the returned guard).
fn fresh_store(full: bool) -> (tempfile::TempDir, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(&dir.path().join("ledger.db"), &options(full)).unwrap();
    (dir, Arc::new(store))
}

/// `commits` commits of `per_commit` appends each, from `callers`
/// concurrent callers; returns the wall time.
async fn append_many(
    store: &Arc<SqliteStore>,
    next: &Arc<AtomicU64>,
    commits: u64,
    callers: u64,
    per_commit: u64,
) -> Duration {
    let callers = callers.clamp(1, commits.max(1));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(usize::try_from(callers).unwrap());
    for c in 0..callers {
        let share = commits / callers + u64::from(c < commits % callers);
        let store = store.clone();
        let next = next.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..share {
                let first = next.fetch_add(per_commit, Ordering::Relaxed);
                let ops = (first..first + per_commit)
                    .map(|n| Op::Append(call_allowed(n)))
                    .collect();
                let done = store.commit(ops).await.unwrap();
                assert_eq!(done.seqs.len() as u64, per_commit);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    started.elapsed()
}

fn bench_append(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("append");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(6));
    for (full, mode) in [(true, "full"), (false, "normal")] {
        for (name, callers, per_commit) in [
            ("1_caller", 1, 1),
            ("64_callers", MANY_CALLERS, 1),
            ("8_callers_x100", BATCH_CALLERS, BATCH),
        ] {
            let (dir, store) = fresh_store(full);
            let next = Arc::new(AtomicU64::new(0));
            group.throughput(Throughput::Elements(per_commit));
            group.bench_function(format!("{mode}/{name}"), |b| {
                b.iter_custom(|commits| {
                    rt.block_on(append_many(&store, &next, commits, callers, per_commit))
                });
            });
            // Every record that was appended is in the chain, in order.
            let appended = next.load(Ordering::Relaxed);
            let head = rt.block_on(store.chain_head()).unwrap();
            assert_eq!(head.map(|(seq, _)| seq), Some(appended).filter(|&n| n > 0));
            rt.block_on(store.close());
            drop(dir);
        }
    }
    group.finish();
}

/// The writer's CPU work per record without SQLite: the record's hash
/// (canonical JSON, SHA-256) and its stored JSON.
fn bench_chain(c: &mut Criterion) {
    let mut group = c.benchmark_group("chain");
    group.throughput(Throughput::Elements(1));
    let mut n = 0u64;
    group.bench_function("hash_and_encode", |b| {
        b.iter_batched(
            || {
                n += 1;
                AuditEvent {
                    seq: n,
                    event: call_allowed(n),
                    prev_hash: chain::GENESIS.to_owned(),
                    hash: String::new(),
                }
            },
            |mut record| chain::seal(&mut record),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// Single-caller commits of one `call.allowed` each, timed one by one.
fn latency(rt: &Runtime, full: bool, commits: usize) {
    let (_dir, store) = fresh_store(full);
    let label = if full { "full" } else { "normal" };
    let mut ns = Vec::with_capacity(commits);
    rt.block_on(async {
        // Warm up: prepared statements, the WAL file, the page cache.
        for n in 0..200 {
            store
                .commit(vec![Op::Append(call_allowed(n))])
                .await
                .unwrap();
        }
        for n in 0..commits as u64 {
            let event = call_allowed(1_000 + n);
            let started = Instant::now();
            store.commit(vec![Op::Append(event)]).await.unwrap();
            ns.push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        store.close().await;
    });
    ns.sort_unstable();
    let at = |q: f64| {
        // Nearest-rank percentile.
        let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len());
        Duration::from_nanos(ns[rank - 1])
    };
    let mean = Duration::from_nanos(ns.iter().sum::<u64>() / ns.len() as u64);
    println!(
        "write-ahead commit latency ({label:<6}) n={commits} mean={mean:>9.2?} p10={:>9.2?} \
         p50={:>9.2?} p90={:>9.2?} p99={:>9.2?} p99.9={:>9.2?} max={:>9.2?}",
        at(0.10),
        at(0.50),
        at(0.90),
        at(0.99),
        at(0.999),
        Duration::from_nanos(ns[ns.len() - 1]),
    );
}

/// How many commits the latency pass times; 0 when not benchmarking.
fn latency_commits() -> usize {
    let args: Vec<String> = std::env::args().collect();
    let benchmarking = args.iter().any(|a| a == "--bench")
        && !args
            .iter()
            .any(|a| a == "--test" || a == "--list" || a.starts_with("--profile-time"));
    if !benchmarking {
        return 0;
    }
    std::env::var("PORTCULLIS_BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rt = runtime();
    let commits = latency_commits();
    if commits > 0 {
        println!("record size: {} bytes of stored JSON", record_bytes());
    }
    bench_append(&mut c, &rt);
    bench_chain(&mut c);
    if commits > 0 {
        latency(&rt, true, commits);
        latency(&rt, false, commits);
    }
    c.final_summary();
}
