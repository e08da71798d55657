//! Summaries across rounds, the comparison of the second target against the
//! first, the table on stdout and the JSON document.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::cli::{Mode, Plan};
use crate::client::{ErrorKind, PROTOCOL_VERSION};
use crate::phase::PhaseResult;

/// One finished phase with where it stood in the run.
#[derive(Debug)]
pub struct Record {
    /// Round, from 1.
    pub round: u32,
    /// 1 or 2: whether this target ran first or second for this mode in
    /// this round.
    pub position: usize,
    /// Index into the plan's modes.
    pub mode: usize,
    /// Index into the plan's targets.
    pub target: usize,
    /// What was measured.
    pub result: PhaseResult,
    /// CPU used by the harness during the phase, percent of one core.
    pub harness_cpu_pct: Option<f64>,
    /// Busy share of all cores during the phase, percent.
    pub machine_busy_pct: Option<f64>,
}

/// Facts about the machine and the run.
#[derive(Debug)]
pub struct Facts {
    /// Cores.
    pub nproc: usize,
    /// Tokio worker threads of the harness.
    pub harness_threads: usize,
    /// Load average before the first phase.
    pub loadavg_start: Option<[f64; 3]>,
    /// Load average after the last phase.
    pub loadavg_end: Option<[f64; 3]>,
    /// Wall clock at start, ms since the Unix epoch.
    pub started_unix_ms: u128,
    /// Wall clock at the end, ms since the Unix epoch.
    pub finished_unix_ms: u128,
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pcts {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Pcts {
    /// Percentiles of a nanosecond histogram; `None` when it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Self {
            count: h.len(),
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        })
    }

    fn json(p: Option<Self>) -> Value {
        match p {
            None => Value::Null,
            Some(p) => json!({
                "count": p.count,
                "p50": round1(p.p50),
                "p90": round1(p.p90),
                "p99": round1(p.p99),
                "p999": round1(p.p999),
                "max": round1(p.max),
                "mean": round1(p.mean),
            }),
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Median; the mean of the two middle values for an even count.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return None;
    }
    let hi = v.get(n / 2).copied()?;
    if n % 2 == 1 {
        Some(hi)
    } else {
        let lo = v.get(n / 2 - 1).copied()?;
        Some((lo + hi) / 2.0)
    }
}

/// Per target and mode: medians across rounds and totals.
#[derive(Debug)]
pub struct Summary {
    /// Index into the plan's modes.
    pub mode: usize,
    /// Index into the plan's targets.
    pub target: usize,
    /// Rounds seen.
    pub rounds: usize,
    /// OK calls, all rounds.
    pub ok: u64,
    /// Failed calls, all rounds, by kind.
    pub errors: [u64; ErrorKind::COUNT],
    /// Failed warm-up calls, all rounds.
    pub warmup_errors: u64,
    /// Median across rounds of the latency percentiles.
    pub latency: Option<Pcts>,
    /// Median across rounds of the service-time percentiles.
    pub service: Option<Pcts>,
    /// Median achieved rate.
    pub achieved_rate: Option<f64>,
    /// Median harness CPU, percent of one core.
    pub harness_cpu_pct: Option<f64>,
    /// Median machine busy share, percent.
    pub machine_busy_pct: Option<f64>,
}

fn median_pcts(list: &[Pcts]) -> Option<Pcts> {
    if list.is_empty() {
        return None;
    }
    let m = |f: fn(&Pcts) -> f64| median(list.iter().map(f).collect()).unwrap_or(0.0);
    Some(Pcts {
        count: list.iter().map(|p| p.count).sum(),
        p50: m(|p| p.p50),
        p90: m(|p| p.p90),
        p99: m(|p| p.p99),
        p999: m(|p| p.p999),
        max: m(|p| p.max),
        mean: m(|p| p.mean),
    })
}

/// Summaries for every (mode, target), modes in plan order.
pub fn summarize(plan: &Plan, records: &[Record]) -> Vec<Summary> {
    let mut out = Vec::new();
    for mode in 0..plan.modes.len() {
        for target in 0..plan.targets.len() {
            let rs: Vec<&Record> = records
                .iter()
                .filter(|r| r.mode == mode && r.target == target)
                .collect();
            let mut errors = [0u64; ErrorKind::COUNT];
            for r in &rs {
                for (a, b) in errors.iter_mut().zip(r.result.errors) {
                    *a += b;
                }
            }
            let lat: Vec<Pcts> = rs
                .iter()
                .filter_map(|r| Pcts::of(&r.result.latency))
                .collect();
            let svc: Vec<Pcts> = rs
                .iter()
                .filter_map(|r| Pcts::of(&r.result.service))
                .collect();
            out.push(Summary {
                mode,
                target,
                rounds: rs.len(),
                ok: rs.iter().map(|r| r.result.ok).sum(),
                errors,
                warmup_errors: rs.iter().map(|r| r.result.warmup_errors).sum(),
                latency: median_pcts(&lat),
                service: median_pcts(&svc),
                achieved_rate: median(rs.iter().map(|r| r.result.achieved_rate).collect()),
                harness_cpu_pct: median(rs.iter().filter_map(|r| r.harness_cpu_pct).collect()),
                machine_busy_pct: median(rs.iter().filter_map(|r| r.machine_busy_pct).collect()),
            });
        }
    }
    out
}

/// Per-round values and their median.
#[derive(Debug, Default)]
pub struct Series {
    /// One value per round where both targets had a value.
    pub per_round: Vec<f64>,
    /// Median of `per_round`.
    pub median: Option<f64>,
}

impl Series {
    fn from(per_round: Vec<f64>) -> Self {
        let median = median(per_round.clone());
        Self { per_round, median }
    }

    fn json(&self, digits: fn(f64) -> f64) -> Value {
        json!({
            "per_round": self.per_round.iter().map(|&x| digits(x)).collect::<Vec<_>>(),
            "median": self.median.map(digits),
        })
    }
}

/// Second target against the first, for one mode.
#[derive(Debug)]
pub struct Comparison {
    /// Index into the plan's modes.
    pub mode: usize,
    /// Latency p50 difference, µs.
    pub p50_diff: Series,
    /// Latency p99 difference, µs.
    pub p99_diff: Series,
    /// Service-time p50 difference, µs.
    pub service_p50_diff: Series,
    /// Service-time p99 difference, µs.
    pub service_p99_diff: Series,
    /// Achieved-rate ratio second/first (reported for full speed).
    pub throughput_ratio: Option<Series>,
}

/// Comparisons of target 2 against target 1 for every mode; empty with one target.
pub fn compare(plan: &Plan, records: &[Record]) -> Vec<Comparison> {
    if plan.targets.len() != 2 {
        return Vec::new();
    }
    let find = |round: u32, mode: usize, target: usize| {
        records
            .iter()
            .find(|r| r.round == round && r.mode == mode && r.target == target)
    };
    let mut out = Vec::new();
    for (mode_idx, mode) in plan.modes.iter().enumerate() {
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut s50 = Vec::new();
        let mut s99 = Vec::new();
        let mut ratio = Vec::new();
        for round in 1..=plan.rounds {
            let (Some(a), Some(b)) = (find(round, mode_idx, 0), find(round, mode_idx, 1)) else {
                continue;
            };
            if let (Some(pa), Some(pb)) = (Pcts::of(&a.result.latency), Pcts::of(&b.result.latency))
            {
                p50.push(pb.p50 - pa.p50);
                p99.push(pb.p99 - pa.p99);
            }
            if let (Some(pa), Some(pb)) = (Pcts::of(&a.result.service), Pcts::of(&b.result.service))
            {
                s50.push(pb.p50 - pa.p50);
                s99.push(pb.p99 - pa.p99);
            }
            if a.result.achieved_rate > 0.0 {
                ratio.push(b.result.achieved_rate / a.result.achieved_rate);
            }
        }
        out.push(Comparison {
            mode: mode_idx,
            p50_diff: Series::from(p50),
            p99_diff: Series::from(p99),
            service_p50_diff: Series::from(s50),
            service_p99_diff: Series::from(s99),
            throughput_ratio: (*mode == Mode::FullSpeed).then(|| Series::from(ratio)),
        });
    }
    out
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
}

fn signed(x: f64) -> String {
    format!("{x:+.1}")
}

fn load_text(l: Option<[f64; 3]>) -> String {
    l.map_or_else(
        || "unknown".to_owned(),
        |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"),
    )
}

fn error_breakdown(errors: &[u64; ErrorKind::COUNT]) -> String {
    ErrorKind::ALL
        .iter()
        .zip(errors)
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{}={n}", k.label()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The human-readable report.
pub fn text(plan: &Plan, facts: &Facts, records: &[Record]) -> String {
    let mut s = String::new();
    let summaries = summarize(plan, records);
    let comparisons = compare(plan, records);
    let names: Vec<&str> = plan.targets.iter().map(|t| t.name.as_str()).collect();
    let name = |i: usize| names.get(i).copied().unwrap_or("?");
    let mode_label = |i: usize| plan.modes.get(i).map_or_else(String::new, |m| m.label());

    let _ = writeln!(
        s,
        "portcullis-load: MCP tools/call, protocol {PROTOCOL_VERSION}; {} round(s) of {:?} measured after {:?} warm-up; {} connection(s) per target",
        plan.rounds, plan.duration, plan.warmup, plan.max_connections
    );
    for t in &plan.targets {
        let _ = writeln!(
            s,
            "  target {:<10} {}  tool {} args {}{}",
            t.name,
            t.url,
            t.tool,
            t.args,
            match t.tokens {
                0 => String::new(),
                1 => "  (bearer token)".to_owned(),
                n => format!("  ({n} bearer tokens, one per connection in turn)"),
            }
        );
    }
    let _ = writeln!(
        s,
        "  machine: {} cores, harness {} threads; load average at start {}, at end {}",
        facts.nproc,
        facts.harness_threads,
        load_text(facts.loadavg_start),
        load_text(facts.loadavg_end)
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Latency in µs from the intended send time, median across rounds (svc = service time from the actual send)"
    );
    let _ = writeln!(
        s,
        "{:<8} {:<12} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>6} {:>6}",
        "mode",
        "target",
        "ok",
        "errors",
        "rate/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "svc p50",
        "svc p99",
        "cpu%",
        "busy%"
    );
    for sm in &summaries {
        let l = sm.latency;
        let _ = writeln!(
            s,
            "{:<8} {:<12} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>6} {:>6}",
            mode_label(sm.mode),
            name(sm.target),
            sm.ok,
            sm.errors.iter().sum::<u64>(),
            opt(sm.achieved_rate, 1),
            opt(l.map(|p| p.p50), 1),
            opt(l.map(|p| p.p90), 1),
            opt(l.map(|p| p.p99), 1),
            opt(l.map(|p| p.p999), 1),
            opt(l.map(|p| p.max), 1),
            opt(sm.service.map(|p| p.p50), 1),
            opt(sm.service.map(|p| p.p99), 1),
            opt(sm.harness_cpu_pct, 0),
            opt(sm.machine_busy_pct, 0),
        );
    }

    if !comparisons.is_empty() {
        let (a, b) = (name(0), name(1));
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{b} − {a}: per round (r1 r2 …) → median of the per-round values"
        );
        let series = |x: &Series, f: fn(f64) -> String| {
            let rounds: Vec<String> = x.per_round.iter().map(|&v| f(v)).collect();
            format!(
                "{} → {}",
                rounds.join(" "),
                x.median.map_or_else(|| "-".to_owned(), f)
            )
        };
        for c in &comparisons {
            let m = mode_label(c.mode);
            let _ = writeln!(s, "  {m:<8} Δp50 µs      {}", series(&c.p50_diff, signed));
            let _ = writeln!(s, "  {m:<8} Δp99 µs      {}", series(&c.p99_diff, signed));
            let _ = writeln!(
                s,
                "  {m:<8} Δsvc p50 µs  {}",
                series(&c.service_p50_diff, signed)
            );
            if let Some(r) = &c.throughput_ratio {
                let _ = writeln!(
                    s,
                    "  {m:<8} calls/s {b}/{a}  {}",
                    series(r, |v| format!("{v:.3}"))
                );
            }
        }
    }

    let _ = writeln!(s);
    let _ = writeln!(s, "Phases in the order run");
    let _ = writeln!(
        s,
        "{:>5} {:>3} {:<8} {:<12} {:>9} {:>6} {:>9} {:>9} {:>9} {:>10} {:>5} {:>6} {:>6}  errors",
        "round",
        "pos",
        "mode",
        "target",
        "ok",
        "warm",
        "rate/s",
        "p50",
        "p99",
        "max",
        "conns",
        "cpu%",
        "busy%"
    );
    for r in records {
        let p = Pcts::of(&r.result.latency);
        let mut errs = error_breakdown(&r.result.errors);
        if r.result.warmup_errors > 0 {
            let _ = write!(errs, " warm-up={}", r.result.warmup_errors);
        }
        let _ = writeln!(
            s,
            "{:>5} {:>3} {:<8} {:<12} {:>9} {:>6} {:>9.1} {:>9} {:>9} {:>10} {:>5} {:>6} {:>6}  {}",
            r.round,
            r.position,
            mode_label(r.mode),
            name(r.target),
            r.result.ok,
            r.result.warmup_ok,
            r.result.achieved_rate,
            opt(p.map(|p| p.p50), 1),
            opt(p.map(|p| p.p99), 1),
            opt(p.map(|p| p.max), 1),
            r.result.connects,
            opt(r.harness_cpu_pct, 0),
            opt(r.machine_busy_pct, 0),
            if errs.is_empty() { "0" } else { errs.trim() }
        );
    }

    let total_errors: u64 = records
        .iter()
        .map(|r| r.result.error_total() + r.result.warmup_errors)
        .sum();
    if total_errors > 0 {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "ERRORS: {total_errors} failed call(s) (including warm-up). First error bodies:"
        );
        let mut shown = 0;
        for r in records {
            for sample in &r.result.samples {
                if shown < plan.error_samples.max(1) {
                    let _ = writeln!(
                        s,
                        "  round {} {} {}: {sample}",
                        r.round,
                        mode_label(r.mode),
                        name(r.target)
                    );
                    shown += 1;
                }
            }
        }
    }
    s
}

/// The JSON document with every number.
pub fn json_doc(plan: &Plan, facts: &Facts, records: &[Record]) -> Value {
    let names: Vec<&str> = plan.targets.iter().map(|t| t.name.as_str()).collect();
    let name = |i: usize| names.get(i).copied().unwrap_or("?");
    let mode_label = |i: usize| plan.modes.get(i).map_or_else(String::new, |m| m.label());
    let rate_of = |i: usize| match plan.modes.get(i) {
        Some(Mode::Rate(r)) => Some(*r),
        _ => None,
    };
    let errors_obj = |errors: &[u64; ErrorKind::COUNT]| {
        let mut m = serde_json::Map::new();
        for (k, n) in ErrorKind::ALL.iter().zip(errors) {
            m.insert(k.label().to_owned(), json!(n));
        }
        Value::Object(m)
    };

    let phases: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "round": r.round,
                "position": r.position,
                "mode": mode_label(r.mode),
                "rate": rate_of(r.mode),
                "target": name(r.target),
                "ok": r.result.ok,
                "error_total": r.result.error_total(),
                "errors": errors_obj(&r.result.errors),
                "warmup_ok": r.result.warmup_ok,
                "warmup_errors": r.result.warmup_errors,
                "elapsed_s": round3(r.result.elapsed.as_secs_f64()),
                "achieved_rate": round1(r.result.achieved_rate),
                "connections_opened": r.result.connects,
                "latency_us": Pcts::json(Pcts::of(&r.result.latency)),
                "service_us": Pcts::json(Pcts::of(&r.result.service)),
                "harness_cpu_pct": r.harness_cpu_pct.map(round1),
                "machine_busy_pct": r.machine_busy_pct.map(round1),
                "error_samples": r.result.samples,
            })
        })
        .collect();

    let summary: Vec<Value> = summarize(plan, records)
        .iter()
        .map(|sm| {
            json!({
                "mode": mode_label(sm.mode),
                "rate": rate_of(sm.mode),
                "target": name(sm.target),
                "rounds": sm.rounds,
                "ok": sm.ok,
                "error_total": sm.errors.iter().sum::<u64>(),
                "errors": errors_obj(&sm.errors),
                "warmup_errors": sm.warmup_errors,
                "median_latency_us": Pcts::json(sm.latency),
                "median_service_us": Pcts::json(sm.service),
                "median_achieved_rate": sm.achieved_rate.map(round1),
                "median_harness_cpu_pct": sm.harness_cpu_pct.map(round1),
                "median_machine_busy_pct": sm.machine_busy_pct.map(round1),
            })
        })
        .collect();

    let comparisons = compare(plan, records);
    let comparison = if comparisons.is_empty() {
        Value::Null
    } else {
        json!({
            "baseline": name(0),
            "subject": name(1),
            "note": "differences are subject minus baseline, in µs; ratio is subject/baseline",
            "modes": comparisons.iter().map(|c| json!({
                "mode": mode_label(c.mode),
                "p50_diff_us": c.p50_diff.json(round1),
                "p99_diff_us": c.p99_diff.json(round1),
                "service_p50_diff_us": c.service_p50_diff.json(round1),
                "service_p99_diff_us": c.service_p99_diff.json(round1),
                "throughput_ratio": c.throughput_ratio.as_ref().map(|r| r.json(round3)),
            })).collect::<Vec<_>>(),
        })
    };

    json!({
        "harness": {
            "name": "portcullis-load",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol_version": PROTOCOL_VERSION,
        },
        "started_unix_ms": facts.started_unix_ms as u64,
        "finished_unix_ms": facts.finished_unix_ms as u64,
        "machine": {
            "nproc": facts.nproc,
            "harness_threads": facts.harness_threads,
            "loadavg_start": facts.loadavg_start,
            "loadavg_end": facts.loadavg_end,
        },
        "config": {
            "modes": plan.modes.iter().map(|m| m.label()).collect::<Vec<_>>(),
            "duration_s": plan.duration.as_secs_f64(),
            "warmup_s": plan.warmup.as_secs_f64(),
            "rounds": plan.rounds,
            "max_connections": plan.max_connections,
            "timeout_s": plan.timeout.as_secs_f64(),
            "pause_s": plan.pause.as_secs_f64(),
            "max_body_bytes": plan.max_body_bytes,
        },
        "targets": plan.targets.iter().map(|t| json!({
            "name": t.name,
            "url": t.url,
            "tool": t.tool,
            "args": t.args,
            "bearer_token": t.tokens > 0,
            "bearer_tokens": t.tokens,
        })).collect::<Vec<_>>(),
        "phases": phases,
        "summary": summary,
        "comparison": comparison,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0]), Some(3.0));
        assert_eq!(median(vec![5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn percentiles_in_microseconds() {
        let mut h = crate::phase::new_histogram(std::time::Duration::from_secs(5)).unwrap();
        assert!(Pcts::of(&h).is_none());
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let p = Pcts::of(&h).unwrap();
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.max - 1000.0).abs() < 1.0, "{p:?}");
    }
}
