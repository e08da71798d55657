//! `portcullis-load revocation`: how long a revocation made through one
//! gateway replica takes to be honoured by another (DESIGN section 8: within
//! one second).
//!
//! Each round:
//!
//! 1. starts a task on the *issuing* replica (`POST /v1/tasks` with the
//!    agent's bootstrap secret, read from an environment variable);
//! 2. has the *probing* replica serve the task's access token twice
//!    (`GET /v1/tasks/{id}`), so that it holds the token in its cache of
//!    live tokens — the state a revocation must reach;
//! 3. revokes on the issuing replica: the token alone (`POST /oauth/revoke`,
//!    RFC 7009) or the whole task (`POST /v1/tasks/{id}/complete`), and
//!    notes the instant its 200 arrived (the acknowledgement);
//! 4. probes the probing replica back to back on one keep-alive connection
//!    until it answers 401 `token_revoked`.
//!
//! The figure is the time from the acknowledgement to the first refusal's
//! answer: an upper bound of the propagation delay (it includes one probe's
//! round trip, reported separately), and 0 probes accepted means the probing
//! replica already refused the first probe. A round that sees the token
//! accepted for longer than `--timeout` after the acknowledgement fails the
//! run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{SendRequest, handshake};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::cli::parse_duration;

/// Largest answer body read.
const MAX_BODY: usize = 1 << 20;

/// Options of `portcullis-load revocation`.
#[derive(Debug, Args)]
pub struct RevocationArgs {
    /// Base URL of the replica that starts tasks and revokes
    /// (e.g. http://127.0.0.1:8801).
    #[arg(long, value_name = "URL")]
    pub issue: String,

    /// Base URL of the replica that is probed (e.g. http://127.0.0.1:8803).
    #[arg(long, value_name = "URL")]
    pub probe: String,

    /// The agent whose tasks are started.
    #[arg(long)]
    pub agent: String,

    /// Environment variable holding the agent's bootstrap secret.
    #[arg(long, value_name = "ENVVAR")]
    pub bootstrap_env: String,

    /// What is revoked: `token` (RFC 7009 revocation of the access token)
    /// or `task` (completing the task revokes all its tokens).
    #[arg(long, default_value = "token", value_parser = ["token", "task"])]
    pub revoke: String,

    /// Rounds, one task each.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub rounds: u32,

    /// Longest a revoked token may stay accepted before the run fails.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Also write every sample as a JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// One keep-alive HTTP/1.1 connection to one base URL.
struct Conn {
    host: String,
    port: u16,
    host_header: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    fn new(base: &str) -> Result<Self, String> {
        let uri: Uri = base.parse().map_err(|e| format!("bad URL {base:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("URL {base:?}: plain http:// only"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("URL {base:?}: no host"))?;
        Ok(Self {
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(80),
            host_header: HeaderValue::from_str(authority.as_str())
                .map_err(|e| format!("URL {base:?}: {e}"))?,
            sender: None,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("{}:{}: {e}", self.host, self.port))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, conn) = handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One request; the answer's status and body (parsed as JSON, `Null`
    /// when it is not).
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        bearer: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> Result<(StatusCode, Value), String> {
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        if sender.ready().await.is_err() {
            sender = self.connect().await?;
            sender.ready().await.map_err(|e| e.to_string())?;
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = path.parse().map_err(|e| format!("path {path:?}: {e}"))?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {bearer}"))
            .map_err(|_| "token is not a valid header value".to_owned())?;
        auth.set_sensitive(true);
        let h = req.headers_mut();
        h.insert(HOST, self.host_header.clone());
        h.insert(AUTHORIZATION, auth);
        h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        let answer = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = answer.status();
        let bytes = Limited::new(answer.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        self.sender = Some(sender);
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

/// `application/x-www-form-urlencoded` escaping of one value.
fn form_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One round's measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// From the revocation's acknowledgement to the first refusal's answer.
    ack_to_refused: Duration,
    /// From sending the revocation to the first refusal's answer.
    sent_to_refused: Duration,
    /// The revocation's own round trip.
    revoke_rtt: Duration,
    /// Probes answered 200 after the acknowledgement.
    accepted_after_ack: u32,
    /// The refused probe's round trip.
    probe_rtt: Duration,
}

async fn round(
    args: &RevocationArgs,
    secret: &str,
    issue: &mut Conn,
    probe: &mut Conn,
) -> Result<Sample, String> {
    let body = json!({ "agent_id": args.agent, "goal": "revocation delay" }).to_string();
    let (status, started) = issue
        .send(
            Method::POST,
            "/v1/tasks",
            secret,
            "application/json",
            Bytes::from(body),
        )
        .await?;
    if status != StatusCode::CREATED {
        return Err(format!("starting a task: HTTP {status}: {started}"));
    }
    let task_id = started
        .get("task_id")
        .and_then(Value::as_str)
        .ok_or("no task_id in the answer")?
        .to_owned();
    let token = started
        .get("access_token")
        .and_then(Value::as_str)
        .ok_or("no access_token in the answer")?
        .to_owned();
    let task_path = format!("/v1/tasks/{task_id}");
    for _ in 0..2 {
        let (status, v) = probe
            .send(
                Method::GET,
                &task_path,
                &token,
                "application/json",
                Bytes::new(),
            )
            .await?;
        if status != StatusCode::OK {
            return Err(format!(
                "the probing replica refused a live token: HTTP {status}: {v}"
            ));
        }
    }

    let sent = Instant::now();
    let (status, v) = if args.revoke == "token" {
        let form = format!("token={}", form_escape(&token));
        issue
            .send(
                Method::POST,
                "/oauth/revoke",
                &token,
                "application/x-www-form-urlencoded",
                Bytes::from(form),
            )
            .await?
    } else {
        issue
            .send(
                Method::POST,
                &format!("{task_path}/complete"),
                &token,
                "application/json",
                Bytes::from_static(b"{}"),
            )
            .await?
    };
    let acked = Instant::now();
    if status != StatusCode::OK {
        return Err(format!("revoking: HTTP {status}: {v}"));
    }
    let mut accepted_after_ack = 0u32;
    loop {
        let probe_sent = Instant::now();
        let (status, v) = probe
            .send(
                Method::GET,
                &task_path,
                &token,
                "application/json",
                Bytes::new(),
            )
            .await?;
        let answered = Instant::now();
        match status {
            StatusCode::OK => {
                accepted_after_ack += 1;
                if answered - acked > args.timeout {
                    return Err(format!(
                        "task {task_id}: the revoked token was still accepted {:?} after the revocation",
                        answered - acked
                    ));
                }
            }
            StatusCode::UNAUTHORIZED
                if v.get("error").and_then(Value::as_str) == Some("token_revoked") =>
            {
                return Ok(Sample {
                    ack_to_refused: answered - acked,
                    sent_to_refused: answered - sent,
                    revoke_rtt: acked - sent,
                    accepted_after_ack,
                    probe_rtt: answered - probe_sent,
                });
            }
            other => return Err(format!("probe: HTTP {other}: {v}")),
        }
    }
}

/// The nearest-rank percentile `p` (0–100) of sorted `v`, in µs.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn sorted(samples: &[Sample], f: fn(&Sample) -> Duration) -> Vec<Duration> {
    let mut v: Vec<Duration> = samples.iter().map(f).collect();
    v.sort();
    v
}

/// Runs the rounds and prints the report; the process's exit status.
pub async fn run(args: &RevocationArgs) -> std::process::ExitCode {
    let secret = match std::env::var(&args.bootstrap_env) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
        _ => {
            eprintln!(
                "portcullis-load revocation: environment variable {} not set",
                args.bootstrap_env
            );
            return std::process::ExitCode::from(2);
        }
    };
    let (mut issue, mut probe) = match (Conn::new(&args.issue), Conn::new(&args.probe)) {
        (Ok(i), Ok(p)) => (i, p),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("portcullis-load revocation: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let loadavg_start = crate::sys::loadavg();
    let mut samples = Vec::new();
    for n in 1..=args.rounds {
        match round(args, &secret, &mut issue, &mut probe).await {
            Ok(s) => samples.push(s),
            Err(e) => {
                eprintln!("portcullis-load revocation: round {n}: {e}");
                return std::process::ExitCode::from(1);
            }
        }
    }
    let loadavg_end = crate::sys::loadavg();
    let ack = sorted(&samples, |s| s.ack_to_refused);
    let sent = sorted(&samples, |s| s.sent_to_refused);
    let probe_rtt = sorted(&samples, |s| s.probe_rtt);
    let revoke_rtt = sorted(&samples, |s| s.revoke_rtt);
    let first_probe_refused = samples.iter().filter(|s| s.accepted_after_ack == 0).count();
    let max_accepted = samples
        .iter()
        .map(|s| s.accepted_after_ack)
        .max()
        .unwrap_or(0);
    println!(
        "revocation through {} (revoke {}), probed on {}: {} rounds",
        args.issue, args.revoke, args.probe, args.rounds
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10}",
        "µs", "p50", "p90", "p99", "max"
    );
    for (label, v) in [
        ("acknowledged -> refused on probe", &ack),
        ("revoke sent -> refused on probe", &sent),
        ("revoke round trip", &revoke_rtt),
        ("refused probe round trip", &probe_rtt),
    ] {
        println!(
            "{label:<34} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
            pct(v, 50.0),
            pct(v, 90.0),
            pct(v, 99.0),
            pct(v, 100.0)
        );
    }
    println!(
        "first probe after the acknowledgement already refused in {first_probe_refused} of {} rounds; \
         at most {max_accepted} probe(s) accepted after it",
        samples.len()
    );
    let fmt_load = |l: Option<[f64; 3]>| {
        l.map_or_else(
            || "unknown".to_owned(),
            |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"),
        )
    };
    println!(
        "load average: start {}, end {}",
        fmt_load(loadavg_start),
        fmt_load(loadavg_end)
    );
    if let Some(path) = &args.json {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let doc = json!({
            "issue": args.issue,
            "probe": args.probe,
            "revoke": args.revoke,
            "rounds": args.rounds,
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg_end,
            "summary_us": {
                "ack_to_refused": { "p50": pct(&ack, 50.0), "p90": pct(&ack, 90.0), "p99": pct(&ack, 99.0), "max": pct(&ack, 100.0) },
                "sent_to_refused": { "p50": pct(&sent, 50.0), "p90": pct(&sent, 90.0), "p99": pct(&sent, 99.0), "max": pct(&sent, 100.0) },
                "probe_rtt": { "p50": pct(&probe_rtt, 50.0), "p99": pct(&probe_rtt, 99.0) },
            },
            "first_probe_refused": first_probe_refused,
            "samples": samples.iter().map(|s| json!({
                "ack_to_refused_us": us(s.ack_to_refused),
                "sent_to_refused_us": us(s.sent_to_refused),
                "revoke_rtt_us": us(s.revoke_rtt),
                "probe_rtt_us": us(s.probe_rtt),
                "accepted_after_ack": s.accepted_after_ack,
            })).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!(
                "portcullis-load revocation: cannot write {}: {e}",
                path.display()
            );
            return std::process::ExitCode::from(1);
        }
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert!((pct(&v, 50.0) - 50.0).abs() < 1e-6);
        assert!((pct(&v, 99.0) - 99.0).abs() < 1e-6);
        assert!((pct(&v, 100.0) - 100.0).abs() < 1e-6);
        assert!((pct(&v[..1], 99.0) - 1.0).abs() < 1e-6);
        assert!(pct(&[], 50.0).abs() < 1e-6);
    }

    #[test]
    fn form_values_are_escaped() {
        assert_eq!(form_escape("a.b-c_d~e"), "a.b-c_d~e");
        assert_eq!(form_escape("a+b=c&d"), "a%2Bb%3Dc%26d");
    }
}
