//! One phase: one target under one load shape for warm-up + duration.
//!
//! Both shapes use the same workers, one per connection. In the open loop a
//! scheduler thread hands each intended send instant to an idle worker, or,
//! when every connection is busy, queues it for the next worker to finish,
//! so that wait is part of the call's latency. In the closed loop each
//! worker calls back to back and a call's intended send instant is simply
//! when its worker got to it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use crate::cli::Mode;
use crate::client::{Caller, Endpoint, ErrorKind, Failure};

/// What a phase is asked to do.
#[derive(Debug, Clone)]
pub struct PhaseSpec {
    /// Load shape.
    pub mode: Mode,
    /// Warm-up, same load, not measured.
    pub warmup: Duration,
    /// Measured window.
    pub duration: Duration,
    /// Connections, and workers.
    pub connections: u32,
    /// Per-call timeout from the intended send instant.
    pub timeout: Duration,
    /// Response body cap.
    pub max_body: usize,
    /// Error bodies kept.
    pub error_samples: usize,
}

/// What a phase measured. Latencies are in nanoseconds.
#[derive(Debug)]
pub struct PhaseResult {
    /// OK calls whose intended send instant fell in the measured window.
    pub ok: u64,
    /// Failed calls in the measured window, by [`ErrorKind::index`].
    pub errors: [u64; ErrorKind::COUNT],
    /// OK calls during warm-up.
    pub warmup_ok: u64,
    /// Failed calls during warm-up.
    pub warmup_errors: u64,
    /// Latency of OK calls from the intended send instant (open loop: the
    /// schedule; closed loop: when the worker was free).
    pub latency: Histogram<u64>,
    /// Service time of OK calls: from handing the request to a ready
    /// connection until the whole answer was read.
    pub service: Histogram<u64>,
    /// Time the measured calls took: from the window's start to the last
    /// completion, at least the window's length.
    pub elapsed: Duration,
    /// OK calls per second over `elapsed`.
    pub achieved_rate: f64,
    /// Connections opened.
    pub connects: u64,
    /// The first few error descriptions (warm-up ones marked).
    pub samples: Vec<String>,
}

impl PhaseResult {
    /// All failed calls in the measured window.
    pub fn error_total(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// An empty latency histogram able to hold values up to `timeout` (and
/// beyond, clamped), 3 significant digits.
pub fn new_histogram(timeout: Duration) -> Result<Histogram<u64>, String> {
    let high = (timeout.as_nanos() as u64)
        .saturating_mul(2)
        .max(1_000_000_000);
    Histogram::new_with_bounds(1, high, 3).map_err(|e| format!("histogram: {e:?}"))
}

#[derive(Debug)]
struct Shared {
    samples: Mutex<Vec<String>>,
    cap: usize,
}

impl Shared {
    fn sample(&self, f: &Failure, measured: bool) {
        if let Ok(mut s) = self.samples.lock()
            && s.len() < self.cap
        {
            let when = if measured { "" } else { " (warm-up)" };
            s.push(format!("[{}]{when} {}", f.kind.label(), f.detail));
        }
    }
}

/// Open-loop hand-out: the most recently idle connection takes the next
/// call (a LIFO, as connection pools do, so that few connections stay hot);
/// when none is idle the call waits in the backlog.
#[derive(Debug)]
struct Dispatch {
    idle: Vec<usize>,
    backlog: VecDeque<Instant>,
}

impl Dispatch {
    fn lock(this: &Mutex<Self>) -> std::sync::MutexGuard<'_, Self> {
        this.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Scheduler side: give the call intended at `due` to an idle worker,
    /// or queue it.
    fn hand_out(this: &Mutex<Self>, senders: &[mpsc::UnboundedSender<Instant>], due: Instant) {
        let mut d = Self::lock(this);
        if let Some(i) = d.idle.pop() {
            drop(d);
            if let Some(tx) = senders.get(i)
                && tx.send(due).is_ok()
            {
                return;
            }
            d = Self::lock(this);
        }
        d.backlog.push_back(due);
    }

    /// Worker side: the oldest waiting call, or `None` after putting worker
    /// `i` on the idle stack.
    fn next_or_idle(this: &Mutex<Self>, i: usize) -> Option<Instant> {
        let mut d = Self::lock(this);
        let next = d.backlog.pop_front();
        if next.is_none() {
            d.idle.push(i);
        }
        next
    }
}

#[derive(Debug)]
struct Worker {
    caller: Caller,
    measure_start: Instant,
    timeout: Duration,
    shared: Arc<Shared>,
    next_id: u64,
    ok: u64,
    errors: [u64; ErrorKind::COUNT],
    warmup_ok: u64,
    warmup_errors: u64,
    latency: Histogram<u64>,
    service: Histogram<u64>,
    last_done: Option<Instant>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Worker {
    /// One call intended to be sent at `scheduled`.
    async fn one(&mut self, scheduled: Instant) {
        let deadline = scheduled + self.timeout;
        let measured = scheduled >= self.measure_start;
        let id = self.next_id;
        self.next_id += 1;
        let res = if Instant::now() >= deadline {
            Err(Failure::new(
                ErrorKind::Timeout,
                format!(
                    "waited for a free connection past the {:?} timeout",
                    self.timeout
                ),
            ))
        } else {
            match tokio::time::timeout_at(deadline.into(), self.caller.call(id)).await {
                Ok(r) => r,
                Err(_) => Err(Failure::new(
                    ErrorKind::Timeout,
                    format!("no complete answer within {:?}", self.timeout),
                )),
            }
        };
        let done = Instant::now();
        match res {
            Ok(sent) if measured => {
                self.ok += 1;
                self.latency
                    .saturating_record(nanos(done.saturating_duration_since(scheduled)));
                self.service
                    .saturating_record(nanos(done.saturating_duration_since(sent)));
                self.last_done = Some(done);
            }
            Ok(_) => self.warmup_ok += 1,
            Err(f) => {
                if measured {
                    if let Some(c) = self.errors.get_mut(f.kind.index()) {
                        *c += 1;
                    }
                    self.last_done = Some(done);
                } else {
                    self.warmup_errors += 1;
                }
                self.shared.sample(&f, measured);
            }
        }
    }
}

/// Run one phase against `ep`.
pub async fn run_phase(ep: &Arc<Endpoint>, spec: &PhaseSpec) -> Result<PhaseResult, String> {
    let proto = new_histogram(spec.timeout)?;
    let shared = Arc::new(Shared {
        samples: Mutex::new(Vec::new()),
        cap: spec.error_samples,
    });
    // A short lead so that every worker is parked before the first instant.
    let start = Instant::now() + Duration::from_millis(20);
    let measure_start = start + spec.warmup;
    let end = measure_start + spec.duration;
    let make_worker = |i: u32| Worker {
        caller: Caller::in_slot(Arc::clone(ep), spec.max_body, i as usize),
        measure_start,
        timeout: spec.timeout,
        shared: Arc::clone(&shared),
        // Ids unique across the phase's workers.
        next_id: u64::from(i) << 40,
        ok: 0,
        errors: [0; ErrorKind::COUNT],
        warmup_ok: 0,
        warmup_errors: 0,
        latency: proto.clone(),
        service: proto.clone(),
        last_done: None,
    };

    let mut handles = Vec::with_capacity(spec.connections as usize);
    let mut scheduler = None;
    match spec.mode {
        Mode::Rate(rate) => {
            let dispatch = Arc::new(Mutex::new(Dispatch {
                // Worker 0 on top of the stack.
                idle: (0..spec.connections as usize).rev().collect(),
                backlog: VecDeque::new(),
            }));
            let mut senders = Vec::with_capacity(spec.connections as usize);
            for i in 0..spec.connections {
                let mut w = make_worker(i);
                let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
                senders.push(tx);
                let dispatch = Arc::clone(&dispatch);
                handles.push(tokio::spawn(async move {
                    // Ends when the scheduler drops the senders.
                    while let Some(scheduled) = rx.recv().await {
                        w.one(scheduled).await;
                        // Calls that found every connection busy, oldest
                        // first, before going back on the idle stack.
                        while let Some(next) = Dispatch::next_or_idle(&dispatch, i as usize) {
                            w.one(next).await;
                        }
                    }
                    w
                }));
            }
            let total = ((spec.warmup + spec.duration).as_secs_f64() * rate).floor() as u64;
            // A plain thread sleeps with microsecond precision, where the
            // runtime's timer wheel has millisecond ticks.
            scheduler = Some(tokio::task::spawn_blocking(move || {
                crate::sys::tighten_timer_slack();
                for i in 0..total {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    Dispatch::hand_out(&dispatch, &senders, due);
                }
            }));
        }
        Mode::FullSpeed => {
            for i in 0..spec.connections {
                let mut w = make_worker(i);
                handles.push(tokio::spawn(async move {
                    if let Some(wait) = start.checked_duration_since(Instant::now()) {
                        tokio::time::sleep(wait).await;
                    }
                    loop {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        w.one(now).await;
                    }
                    w
                }));
            }
        }
    }
    if let Some(s) = scheduler {
        s.await.map_err(|e| format!("scheduler failed: {e}"))?;
    }

    let mut out = PhaseResult {
        ok: 0,
        errors: [0; ErrorKind::COUNT],
        warmup_ok: 0,
        warmup_errors: 0,
        latency: proto.clone(),
        service: proto,
        elapsed: spec.duration,
        achieved_rate: 0.0,
        connects: 0,
        samples: Vec::new(),
    };
    let mut last_done = measure_start;
    for h in handles {
        let w = h.await.map_err(|e| format!("worker failed: {e}"))?;
        out.ok += w.ok;
        for (a, b) in out.errors.iter_mut().zip(w.errors) {
            *a += b;
        }
        out.warmup_ok += w.warmup_ok;
        out.warmup_errors += w.warmup_errors;
        out.latency
            .add(&w.latency)
            .map_err(|e| format!("histogram: {e:?}"))?;
        out.service
            .add(&w.service)
            .map_err(|e| format!("histogram: {e:?}"))?;
        out.connects += w.caller.connects;
        if let Some(d) = w.last_done {
            last_done = last_done.max(d);
        }
    }
    out.elapsed = last_done
        .saturating_duration_since(measure_start)
        .max(spec.duration);
    out.achieved_rate = out.ok as f64 / out.elapsed.as_secs_f64();
    out.samples = shared
        .samples
        .lock()
        .map(|mut s| std::mem::take(&mut *s))
        .unwrap_or_default();
    Ok(out)
}
