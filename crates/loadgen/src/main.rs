//! `portcullis-load`: the load harness for Portcullis.
//!
//! It drives MCP `tools/call` over Streamable HTTP in the stateless
//! 2026-07-28 era (no handshake, no session: every request is a POST carrying
//! `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name` and the per-request
//! `_meta`) against one or two targets, typically the upstream MCP server
//! directly and the same server through the gateway, and reports latency
//! percentiles and throughput of both and the difference between them.
//!
//! # Method
//!
//! **Open loop (fixed rate).** Calls are scheduled at exact intervals
//! (`1/R` seconds apart), independently of how fast answers come back, by a
//! dedicated scheduler thread (a plain thread sleeps with microsecond
//! precision, with the thread's timer slack lowered where the kernel allows;
//! the async runtime's timer has millisecond ticks). Each call goes to the
//! most recently idle of `--max-connections` workers, each owning one
//! keep-alive HTTP/1.1 connection with at most one request in flight (a
//! connection the server closed is reopened, and counted). When every
//! connection is busy, the call waits in a queue.
//!
//! **Coordinated omission.** A closed-loop client that waits for an answer
//! before sending the next request silently stops sending while the server
//! stalls, so the stall shows up in one sample instead of in every request
//! that a real client would have sent meanwhile. Here latency is measured
//! from the *intended* send time of the schedule, so time spent waiting for a
//! free connection (or behind a stalled one) counts in full. The service time
//! (from the actual send to the end of the answer) is recorded too, as a
//! diagnostic: the gap between the two is queueing plus scheduler lateness.
//!
//! **Closed loop (full speed).** `--max-connections` workers call back to
//! back; the number that matters is calls per second (the latency then is
//! the service time at that concurrency).
//!
//! **Alternation.** Machines shared with other work drift. For every round
//! and every mode the two targets run one after the other, first A then B,
//! and the order flips in the next round (A-B, B-A, …), so both see the same
//! conditions on average; numbers are reported per round and as the median
//! across rounds, and the comparison (second target minus first, and the
//! full-speed throughput ratio) is made within each round before taking the
//! median. Every phase has a warm-up at the same load whose results are
//! discarded (but whose errors are still counted and shown).
//!
//! **Counting.** A call is OK when the answer is HTTP 200 with a JSON-RPC
//! response (as `application/json`, or as a `data:` event of a
//! `text/event-stream`) that has this request's id and a `result` whose
//! `isError` is not true. Anything else, including a call that has no
//! complete answer within `--timeout` of its intended send time, is an
//! error, counted by kind, and the first error bodies are printed.
//!
//! # Efficiency
//!
//! The harness shares the cores with what it measures, so it keeps its own
//! cost low: connections are reused, the request body is serialised once and
//! only the id is patched in (into a per-connection buffer that is reused),
//! latencies go into per-worker HDR histograms (merged at the end of a
//! phase), and response bodies are read up to a cap.
//!
//! Exit status: 0 when every measured call succeeded, 3 when some failed
//! (the report is still written), 2 for a bad command line or a failed
//! first call to a target, 1 for other failures.
//!
//! `portcullis-load revocation …` measures something else: how long a
//! revocation through one gateway replica takes to reach another
//! ([`revocation`]).

mod cli;
mod client;
mod phase;
mod report;
mod revocation;
mod sys;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;

use crate::cli::{Cli, Command, Plan};
use crate::client::Caller;
use crate::phase::{PhaseSpec, run_phase};
use crate::report::{Facts, Pcts, Record};
use crate::sys::CpuSnapshot;

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Revocation(args)) = &cli.command {
        // One probe at a time: a small runtime is enough.
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(revocation::run(args)),
            Err(e) => {
                eprintln!("portcullis-load: cannot start the runtime: {e}");
                ExitCode::from(1)
            }
        };
    }
    let plan = match cli.resolve() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("portcullis-load: {e}");
            return ExitCode::from(2);
        }
    };
    let threads = cli.threads.unwrap_or_else(sys::nproc).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portcullis-load: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(&cli, &plan, threads))
}

/// One call per target before anything else, so that a wrong URL, token or
/// tool name fails at once with the answer shown.
async fn preflight(plan: &Plan) -> Result<(), String> {
    for t in &plan.targets {
        let ep = Arc::clone(&t.endpoint);
        let mut caller = Caller::new(ep, plan.max_body_bytes);
        let started = Instant::now();
        match tokio::time::timeout(plan.timeout, caller.call(0)).await {
            Ok(Ok(_)) => eprintln!(
                "preflight {}: OK in {:.1} ms",
                t.name,
                started.elapsed().as_secs_f64() * 1e3
            ),
            Ok(Err(f)) => {
                return Err(format!(
                    "preflight call to {} ({}) failed [{}]: {}",
                    t.name,
                    t.url,
                    f.kind.label(),
                    f.detail
                ));
            }
            Err(_) => {
                return Err(format!(
                    "preflight call to {} ({}) had no answer within {:?}",
                    t.name, t.url, plan.timeout
                ));
            }
        }
    }
    Ok(())
}

async fn run(cli: &Cli, plan: &Plan, threads: usize) -> ExitCode {
    if let Err(e) = preflight(plan).await {
        eprintln!("portcullis-load: {e}");
        return ExitCode::from(2);
    }
    let started_unix_ms = unix_ms();
    let loadavg_start = sys::loadavg();

    let mut records = Vec::new();
    let mut first = true;
    for round in 1..=plan.rounds {
        for (mode_idx, &mode) in plan.modes.iter().enumerate() {
            let mut order: Vec<usize> = (0..plan.targets.len()).collect();
            if round % 2 == 0 {
                order.reverse();
            }
            for (pos, &target) in order.iter().enumerate() {
                if !first && !plan.pause.is_zero() {
                    tokio::time::sleep(plan.pause).await;
                }
                first = false;
                let Some(t) = plan.targets.get(target) else {
                    continue;
                };
                let spec = PhaseSpec {
                    mode,
                    warmup: plan.warmup,
                    duration: plan.duration,
                    connections: plan.max_connections,
                    timeout: plan.timeout,
                    max_body: plan.max_body_bytes,
                    error_samples: plan.error_samples,
                };
                let cpu0 = CpuSnapshot::now();
                let wall0 = Instant::now();
                let result = match run_phase(&t.endpoint, &spec).await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("portcullis-load: {e}");
                        return ExitCode::from(1);
                    }
                };
                let wall = wall0.elapsed().as_secs_f64();
                let cpu1 = CpuSnapshot::now();
                let rec = Record {
                    round,
                    position: pos + 1,
                    mode: mode_idx,
                    target,
                    harness_cpu_pct: cpu1.own_pct_since(&cpu0, wall),
                    machine_busy_pct: cpu1.machine_busy_pct_since(&cpu0),
                    result,
                };
                progress(plan, &rec, &t.name);
                records.push(rec);
            }
        }
    }

    let facts = Facts {
        nproc: sys::nproc(),
        harness_threads: threads,
        loadavg_start,
        loadavg_end: sys::loadavg(),
        started_unix_ms,
        finished_unix_ms: unix_ms(),
    };
    print!("{}", report::text(plan, &facts, &records));
    if let Some(path) = &cli.json {
        let doc = report::json_doc(plan, &facts, &records);
        let text = match serde_json::to_string_pretty(&doc) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("portcullis-load: cannot serialise the report: {e}");
                return ExitCode::from(1);
            }
        };
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("portcullis-load: cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    let measured_errors: u64 = records.iter().map(|r| r.result.error_total()).sum();
    if measured_errors > 0 {
        eprintln!("portcullis-load: {measured_errors} measured call(s) failed");
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

/// One line on stderr per finished phase, with its error bodies.
fn progress(plan: &Plan, rec: &Record, target: &str) {
    let r = &rec.result;
    let p = Pcts::of(&r.latency);
    let us = |f: fn(&Pcts) -> f64| {
        p.as_ref()
            .map_or_else(|| "-".to_owned(), |p| format!("{:.1}", f(p)))
    };
    eprintln!(
        "round {}/{} {:<8} {:<12} ok {:>8}  errors {:>4} (warm-up {})  {:>9.1}/s  p50 {} µs  p99 {} µs  max {} µs  conns {}",
        rec.round,
        plan.rounds,
        plan.modes
            .get(rec.mode)
            .map_or_else(String::new, |m| m.label()),
        target,
        r.ok,
        r.error_total(),
        r.warmup_errors,
        r.achieved_rate,
        us(|p| p.p50),
        us(|p| p.p99),
        us(|p| p.max),
        r.connects,
    );
    for s in &r.samples {
        eprintln!("    {s}");
    }
}
