//! Task starts per second on the embedded SQLite store (DESIGN section 11:
//! ≥ 5,000/s on 2 cores), and the token check on the call path with the
//! signature cached and revocation checked (≤ 2 µs after first use).
//!
//! A task start is the whole library call behind `POST /v1/tasks`: the
//! engine's start, minting an access token (Ed25519) and a refresh token,
//! and one ledger transaction with the task, both tokens and two audit
//! events, durable (`synchronous = FULL`) before it returns. Starts run
//! from 64 concurrent callers, as an orchestrator fleet would, so the
//! store's group commit can share one fsync among many.
//!
//! Run: `cargo bench -p portcullis-gateway --bench task_start`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "a benchmark harness: a panic is a failed run"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::SystemClock;
use portcullis_config::LoadedConfig;
use portcullis_core::Clock;
use portcullis_gateway::Gateway;

const CONFIG: &str = r#"
[store]
url = "sqlite://ledger.db"

[tokens]
signing_key = "keys/k.ed25519"

[[upstreams]]
name = "wh"
transport = "stdio"
command = ["wh"]

[[tools]]
name = "wh.query"
upstream = "wh"
risk = "low"
access = "read"

[[agent_types]]
name = "t"
initial = "work"
states = [
  { name = "work", tools = ["wh.query"], next = ["done"] },
  { name = "done", final = true },
]

[[agents]]
id = "bot"
type = "t"
tools = ["wh.query"]
bootstrap_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

fn gateway(dir: &std::path::Path) -> Arc<Gateway> {
    std::fs::write(dir.join("portcullis.toml"), CONFIG).unwrap();
    portcullis_gateway::run::keygen(&dir.join("keys/k.ed25519")).unwrap();
    let loaded = LoadedConfig::load(&dir.join("portcullis.toml")).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let engine = portcullis_core::build(&loaded, clock.clone()).unwrap();
    let store: Arc<dyn portcullis_store::Store> =
        portcullis_gateway::run::open_sqlite(&loaded, false).unwrap();
    let ring = portcullis_gateway::run::load_keys(&loaded).unwrap();
    Arc::new(Gateway::new(&loaded, engine, store, ring, clock).unwrap())
}

/// Starts `n` tasks from `callers` concurrent loops; returns the wall time.
async fn start_many(gw: &Arc<Gateway>, n: u64, callers: u64) -> Duration {
    let started = Instant::now();
    let mut handles = Vec::new();
    for c in 0..callers {
        let gw = gw.clone();
        let share = n / callers + u64::from(c < n % callers);
        handles.push(tokio::spawn(async move {
            for _ in 0..share {
                gw.start_task("bot", "bench", None).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    started.elapsed()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gw = gateway(dir.path());

    let mut group = c.benchmark_group("task_start");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));
    for callers in [1u64, 64] {
        group.bench_function(format!("sqlite_full/{callers}_callers"), |b| {
            b.iter_custom(|iters| rt.block_on(start_many(&gw, iters, callers.min(iters.max(1)))));
        });
    }
    group.finish();

    // The token check on the call path: signature (cached after first use),
    // claims, then revocation (the ledger-confirmed live set; the ledger
    // itself is asked on first use only, every commit forgets what it
    // revokes). Includes one `block_on` per check.
    let started = rt.block_on(gw.start_task("bot", "bench", None)).unwrap();
    let token = started.access.clone();
    rt.block_on(gw.authenticate_token(&token)).unwrap();
    let mut group = c.benchmark_group("token_check");
    group.bench_function("cached_signature_plus_revocation_check", |b| {
        b.iter(|| rt.block_on(gw.authenticate_token(&token)).unwrap());
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
