//! Prometheus counters of the gateway, in the text exposition format.
//!
//! Kept deliberately small and lock-free: one atomic per series, the series
//! known up front (decisions by outcome and reason, tokens by event).
//!
//! Two gauges come from the ledger, not from this process's counters
//! ([`LedgerGauges`]): the task counts by status, which must be right for a
//! cluster (replicas on one PostgreSQL start and end each other's tasks),
//! so they are read from the ledger, at most once per
//! [`TASK_COUNTS_TTL`] and for at most [`TASK_COUNTS_TIMEOUT`]; and the
//! depth of this process's ledger writer queue, an atomic read. A scrape
//! never fails because of the ledger: counts it could not read are left out.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use portcullis_core::Reason;
use portcullis_store::{Store, TaskCounts};

use crate::alerts::AlertCounters;

/// Upper bounds of the latency histogram buckets, in microseconds.
const BUCKETS_US: [u64; 18] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 5_000_000, 30_000_000,
];

/// A Prometheus histogram of durations, lock-free.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, elapsed: std::time::Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|&b| us <= b)
            && let Some(bucket) = self.buckets.get(i)
        {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (bound, bucket) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            // Bucket bounds in seconds, as Prometheus expects.
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// How long task counts read from the ledger are served again before the
/// next scrape reads them anew.
pub const TASK_COUNTS_TTL: Duration = Duration::from_secs(1);

/// Longest a scrape waits for the ledger's task counts.
pub const TASK_COUNTS_TIMEOUT: Duration = Duration::from_millis(500);

/// The last read of the ledger's task counts (`None` inside: that read
/// failed), shared by concurrent scrapes.
#[derive(Debug, Default)]
pub struct TaskCountsCache {
    last: tokio::sync::Mutex<Option<(Instant, Option<TaskCounts>)>>,
}

impl TaskCountsCache {
    /// The task counts, read from `store` unless the last read (failed or
    /// not) is younger than [`TASK_COUNTS_TTL`]; `None` when the ledger did
    /// not answer within [`TASK_COUNTS_TIMEOUT`]. Concurrent callers wait
    /// for one read instead of each sending its own.
    pub async fn read(&self, store: &dyn Store) -> Option<TaskCounts> {
        let mut last = self.last.lock().await;
        if let Some((at, counts)) = *last
            && at.elapsed() < TASK_COUNTS_TTL
        {
            return counts;
        }
        let counts = match tokio::time::timeout(TASK_COUNTS_TIMEOUT, store.task_counts()).await {
            Ok(Ok(counts)) => Some(counts),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "task counts unavailable: left out of /metrics");
                None
            }
            Err(_) => {
                tracing::warn!(
                    timeout = ?TASK_COUNTS_TIMEOUT,
                    "task counts: no answer from the ledger in time, left out of /metrics"
                );
                None
            }
        };
        *last = Some((Instant::now(), counts));
        counts
    }
}

/// What a scrape reads from the ledger.
#[derive(Debug, Clone, Copy, Default)]
pub struct LedgerGauges {
    /// Active and halted tasks, ledger-wide; `None` when unavailable (the
    /// series are then left out of the scrape).
    pub tasks: Option<TaskCounts>,
    /// Commits waiting for this process's ledger writer.
    pub queue_depth: u64,
}

/// The gateway's counters.
#[derive(Debug)]
pub struct Metrics {
    allowed: AtomicU64,
    denied: [AtomicU64; Reason::ALL.len()],
    issued: AtomicU64,
    refreshed: AtomicU64,
    revoked: AtomicU64,
    upstream_errors: AtomicU64,
    witness_failures: AtomicU64,
    /// Time of `Engine::decide` (with the token-scope check).
    pub decision_latency: Histogram,
    /// Time of a whole `POST …/calls`, from authentication to the answer.
    pub call_latency: Histogram,
    /// Time of a ledger commit (the write-ahead record included): the
    /// audit append latency.
    pub commit_latency: Histogram,
    /// The ledger's task counts, read at most once per [`TASK_COUNTS_TTL`].
    pub task_counts: TaskCountsCache,
    /// Alert webhook deliveries, shared with the delivery task.
    pub alerts: Arc<AlertCounters>,
    /// Whether each MCP upstream is connected.
    upstreams: std::sync::Mutex<std::collections::BTreeMap<String, bool>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            allowed: AtomicU64::new(0),
            denied: std::array::from_fn(|_| AtomicU64::new(0)),
            issued: AtomicU64::new(0),
            refreshed: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
            witness_failures: AtomicU64::new(0),
            decision_latency: Histogram::default(),
            call_latency: Histogram::default(),
            commit_latency: Histogram::default(),
            task_counts: TaskCountsCache::default(),
            alerts: Arc::default(),
            upstreams: std::sync::Mutex::default(),
        }
    }
}

/// A token lifecycle event.
#[derive(Debug, Clone, Copy)]
pub enum TokenEvent {
    /// Minted.
    Issued,
    /// Rotated through a refresh.
    Refreshed,
    /// Revoked.
    Revoked,
}

impl Metrics {
    /// Counts a decision.
    pub fn decision(&self, reason: Option<Reason>) {
        match reason {
            None => {
                self.allowed.fetch_add(1, Ordering::Relaxed);
            }
            Some(r) => {
                if let Some(i) = Reason::ALL.iter().position(|x| *x == r)
                    && let Some(c) = self.denied.get(i)
                {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Counts token events.
    pub fn tokens(&self, event: TokenEvent, n: u64) {
        let c = match event {
            TokenEvent::Issued => &self.issued,
            TokenEvent::Refreshed => &self.refreshed,
            TokenEvent::Revoked => &self.revoked,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a failed upstream call.
    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed append to the checkpoint witness.
    pub fn witness_failure(&self) {
        self.witness_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records whether upstream `name` is connected.
    pub fn upstream_connected(&self, name: &str, up: bool) {
        self.upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), up);
    }

    /// The exposition text, with the gauges read from the ledger.
    pub fn render(&self, ledger: &LedgerGauges) -> String {
        let mut out = String::new();
        if let Some(tasks) = ledger.tasks {
            out.push_str(
                "# HELP portcullis_tasks Tasks in the ledger by status (every replica's).\n",
            );
            out.push_str("# TYPE portcullis_tasks gauge\n");
            for (status, n) in [("active", tasks.active), ("halted", tasks.halted)] {
                let _ = writeln!(out, "portcullis_tasks{{status=\"{status}\"}} {n}");
            }
        }
        out.push_str(
            "# HELP portcullis_audit_queue_depth Commits (audit records and their batch) waiting \
             for this process's ledger writer.\n",
        );
        out.push_str("# TYPE portcullis_audit_queue_depth gauge\n");
        let _ = writeln!(out, "portcullis_audit_queue_depth {}", ledger.queue_depth);
        {
            let ups = self
                .upstreams
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !ups.is_empty() {
                out.push_str("# HELP portcullis_upstream_up Whether an MCP upstream is connected (1) or not (0).\n");
                out.push_str("# TYPE portcullis_upstream_up gauge\n");
                for (name, up) in ups.iter() {
                    let _ = writeln!(
                        out,
                        "portcullis_upstream_up{{upstream=\"{name}\"}} {}",
                        u8::from(*up)
                    );
                }
            }
        }
        out.push_str(
            "# HELP portcullis_decisions_total Tool-call decisions by outcome and reason.\n",
        );
        out.push_str("# TYPE portcullis_decisions_total counter\n");
        let _ = writeln!(
            out,
            "portcullis_decisions_total{{decision=\"allow\",reason=\"\"}} {}",
            self.allowed.load(Ordering::Relaxed)
        );
        for (r, c) in Reason::ALL.iter().zip(&self.denied) {
            let _ = writeln!(
                out,
                "portcullis_decisions_total{{decision=\"deny\",reason=\"{}\"}} {}",
                r.as_str(),
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP portcullis_tokens_total Token lifecycle events.\n");
        out.push_str("# TYPE portcullis_tokens_total counter\n");
        for (name, c) in [
            ("issued", &self.issued),
            ("refreshed", &self.refreshed),
            ("revoked", &self.revoked),
        ] {
            let _ = writeln!(
                out,
                "portcullis_tokens_total{{event=\"{name}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP portcullis_upstream_errors_total Forwarded calls that failed at the upstream.\n",
        );
        out.push_str("# TYPE portcullis_upstream_errors_total counter\n");
        let _ = writeln!(
            out,
            "portcullis_upstream_errors_total {}",
            self.upstream_errors.load(Ordering::Relaxed)
        );
        for (name, help, c) in [
            (
                "portcullis_alerts_delivered_total",
                "Alerts the webhook accepted (2xx).",
                &self.alerts.delivered,
            ),
            (
                "portcullis_alerts_failed_total",
                "Alerts given up after every delivery attempt failed.",
                &self.alerts.failed,
            ),
            (
                "portcullis_alerts_dropped_total",
                "Alerts dropped because the delivery queue was full.",
                &self.alerts.dropped,
            ),
            (
                "portcullis_audit_witness_failures_total",
                "Failed appends to the checkpoint witness (audit.witness_dir); retried every second.",
                &self.witness_failures,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", c.load(Ordering::Relaxed));
        }
        self.decision_latency.render(
            &mut out,
            "portcullis_decision_seconds",
            "Time to decide a call (engine and token scope).",
        );
        self.call_latency.render(
            &mut out,
            "portcullis_call_seconds",
            "Time of a whole tool call through the gateway.",
        );
        self.commit_latency.render(
            &mut out,
            "portcullis_ledger_commit_seconds",
            "Audit append latency: time of a ledger commit, its audit records included.",
        );
        out
    }
}
