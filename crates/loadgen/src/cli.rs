//! Command line, and its resolution into a checked [`Plan`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::Value;

use crate::client::Endpoint;

/// Most bearer tokens one target takes (`--token-env`).
pub const MAX_TOKENS: usize = 1024;

/// Command line of `portcullis-load`.
#[derive(Debug, Parser)]
#[command(
    name = "portcullis-load",
    version,
    about = "Drive MCP tools/call (Streamable HTTP, 2026-07-28) against one or two targets, \
             alternating between them, and report latency percentiles and throughput.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Another measurement instead of the load run.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// A target as NAME=URL (plain http only), e.g. direct=http://127.0.0.1:9000/mcp.
    /// Give it once or twice; with two, the second is compared against the first.
    #[arg(long = "target", value_name = "NAME=URL", required = true)]
    pub targets: Vec<String>,

    /// Send `Authorization: Bearer <token>` to target NAME, reading the token
    /// from environment variable ENVVAR (never from the command line). The
    /// variable may hold several tokens separated by whitespace (at most
    /// 1024): connection i then sends token i mod n, e.g. tokens of several
    /// tasks, whose calls a gateway can decide in parallel.
    #[arg(long = "token-env", value_name = "NAME=ENVVAR")]
    pub token_env: Vec<String>,

    /// Tool to call: TOOL for every target, or NAME=TOOL for one target.
    #[arg(long = "tool", value_name = "TOOL|NAME=TOOL", required = true)]
    pub tool: Vec<String>,

    /// Tool arguments, a JSON object: JSON for every target, or NAME=JSON for one target.
    #[arg(long = "args", value_name = "JSON|NAME=JSON")]
    pub args: Vec<String>,

    /// Fixed request rates in calls per second (open loop), comma separated.
    #[arg(long, value_delimiter = ',', value_name = "R,R,...")]
    pub rates: Vec<f64>,

    /// Also run the closed-loop full-speed mode (one back-to-back worker per connection).
    #[arg(long)]
    pub full_speed: bool,

    /// Measured duration of each phase (e.g. 10s, 500ms, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Warm-up before each measured phase, same load, results discarded.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Number of rounds; each round runs every mode on every target.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,

    /// Keep-alive connections per target (HTTP/1.1, one request in flight each);
    /// in full-speed mode, also the number of workers.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_connections: u32,

    /// Per-call timeout, counted from the scheduled send time; a timeout is an error.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Pause between two phases, so one target's tail does not spill into the next.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub pause: Duration,

    /// Cap on a response body, in bytes; a larger body is an error.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// How many error bodies to keep and print per phase.
    #[arg(long, default_value_t = 5)]
    pub error_samples: usize,

    /// Tokio worker threads of the harness (default: the number of cores).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Also write every number as a JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Measurements other than the load run.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// How long a revocation made through one gateway replica takes to be
    /// honoured by another (see `docs/load-harness.md`).
    Revocation(crate::revocation::RevocationArgs),
}

/// One load shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Open loop at this many calls per second.
    Rate(f64),
    /// Closed loop, every worker back to back.
    FullSpeed,
}

impl Mode {
    /// Short label for tables and JSON: `500/s` or `full`.
    pub fn label(self) -> String {
        match self {
            Mode::Rate(r) => format!("{}/s", fmt_rate(r)),
            Mode::FullSpeed => "full".to_owned(),
        }
    }
}

/// A rate printed without a useless fraction.
pub fn fmt_rate(r: f64) -> String {
    if r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r}")
    }
}

/// A target as resolved from the command line.
#[derive(Debug)]
pub struct TargetSpec {
    /// The name given with `--target`.
    pub name: String,
    /// The URL as given.
    pub url: String,
    /// The tool called on it.
    pub tool: String,
    /// The arguments object sent, serialised.
    pub args: String,
    /// How many bearer tokens the connections take turns with (0: none).
    pub tokens: usize,
    /// Everything a call needs.
    pub endpoint: Arc<Endpoint>,
}

/// The checked plan of a run.
#[derive(Debug)]
pub struct Plan {
    /// One or two targets; with two, the second is compared against the first.
    pub targets: Vec<TargetSpec>,
    /// Modes run in each round, rates first, full speed last.
    pub modes: Vec<Mode>,
    /// Measured duration of a phase.
    pub duration: Duration,
    /// Warm-up of a phase.
    pub warmup: Duration,
    /// Number of rounds.
    pub rounds: u32,
    /// Connections (and full-speed workers) per phase.
    pub max_connections: u32,
    /// Per-call timeout.
    pub timeout: Duration,
    /// Pause between phases.
    pub pause: Duration,
    /// Response body cap.
    pub max_body_bytes: usize,
    /// Error bodies kept per phase.
    pub error_samples: usize,
}

/// Parse `10s`, `500ms`, `250us`, `2m`, `1.5s`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 10s, 500ms, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        other => return Err(format!("bad duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// Split `NAME=VALUE` where NAME is one of `names`.
fn per_target<'a>(s: &'a str, names: &[String]) -> Option<(&'a str, &'a str)> {
    let (name, value) = s.split_once('=')?;
    names.iter().any(|n| n == name).then_some((name, value))
}

impl Cli {
    /// Check everything and build the endpoints.
    pub fn resolve(&self) -> Result<Plan, String> {
        if self.targets.len() > 2 {
            return Err("at most two --target".into());
        }
        let mut named: Vec<(String, String)> = Vec::new();
        for t in &self.targets {
            let (name, url) = t
                .split_once('=')
                .ok_or_else(|| format!("--target {t:?}: expected NAME=URL"))?;
            if name.is_empty() || named.iter().any(|(n, _)| n == name) {
                return Err(format!("--target {t:?}: empty or repeated name"));
            }
            named.push((name.to_owned(), url.to_owned()));
        }
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();

        let mut default_tool: Option<&str> = None;
        let mut tools: Vec<(&str, &str)> = Vec::new();
        for t in &self.tool {
            match per_target(t, &names) {
                Some(pair) => tools.push(pair),
                None => default_tool = Some(t.as_str()),
            }
        }
        let mut default_args: Option<&str> = None;
        let mut args: Vec<(&str, &str)> = Vec::new();
        for a in &self.args {
            if a.trim_start().starts_with('{') {
                default_args = Some(a.as_str());
            } else {
                let pair = per_target(a, &names).ok_or_else(|| {
                    format!("--args {a:?}: expected a JSON object or NAME=JSON for a target")
                })?;
                args.push(pair);
            }
        }
        let mut tokens: Vec<(&str, &str)> = Vec::new();
        for t in &self.token_env {
            let pair = per_target(t, &names)
                .ok_or_else(|| format!("--token-env {t:?}: expected NAME=ENVVAR for a target"))?;
            tokens.push(pair);
        }

        let mut targets = Vec::new();
        for (name, url) in named {
            let pick = |list: &[(&str, &str)]| {
                list.iter()
                    .rev()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            };
            let tool = pick(&tools)
                .or_else(|| default_tool.map(str::to_owned))
                .ok_or_else(|| format!("no --tool for target {name}"))?;
            if tool.is_empty() {
                return Err(format!("empty tool name for target {name}"));
            }
            let args_text = pick(&args)
                .or_else(|| default_args.map(str::to_owned))
                .unwrap_or_else(|| "{}".to_owned());
            let args_value: Value = serde_json::from_str(&args_text)
                .map_err(|e| format!("--args for {name}: not JSON: {e}"))?;
            if !args_value.is_object() {
                return Err(format!("--args for {name}: must be a JSON object"));
            }
            let token_list: Vec<String> = match pick(&tokens) {
                None => Vec::new(),
                Some(var) => {
                    let text = std::env::var(&var).map_err(|_| {
                        format!("--token-env {name}={var}: environment variable not set")
                    })?;
                    let list: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
                    if list.is_empty() {
                        return Err(format!("--token-env {name}={var}: empty token"));
                    }
                    if list.len() > MAX_TOKENS {
                        return Err(format!(
                            "--token-env {name}={var}: {} tokens, at most {MAX_TOKENS}",
                            list.len()
                        ));
                    }
                    list
                }
            };
            let endpoint = Endpoint::with_tokens(&url, &tool, &args_value, &token_list)
                .map_err(|e| format!("target {name}: {e}"))?;
            let endpoint = Arc::new(endpoint);
            targets.push(TargetSpec {
                name,
                url,
                tool,
                args: args_value.to_string(),
                tokens: token_list.len(),
                endpoint,
            });
        }

        let mut modes = Vec::new();
        for &r in &self.rates {
            if !(r.is_finite() && r > 0.0 && r <= 1_000_000.0) {
                return Err(format!("--rates: {r} is not a rate in (0, 1000000]"));
            }
            modes.push(Mode::Rate(r));
        }
        if self.full_speed {
            modes.push(Mode::FullSpeed);
        }
        if modes.is_empty() {
            return Err("nothing to run: give --rates and/or --full-speed".into());
        }
        if self.duration.is_zero() {
            return Err("--duration must be positive".into());
        }
        if self.timeout.is_zero() {
            return Err("--timeout must be positive".into());
        }
        Ok(Plan {
            targets,
            modes,
            duration: self.duration,
            warmup: self.warmup,
            rounds: self.rounds,
            max_connections: self.max_connections,
            timeout: self.timeout,
            pause: self.pause,
            max_body_bytes: self.max_body_bytes,
            error_samples: self.error_samples,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("").is_err());
    }

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["portcullis-load"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn per_target_tool_and_args() {
        let c = cli(&[
            "--target",
            "direct=http://127.0.0.1:9000/mcp",
            "--target",
            "gateway=http://127.0.0.1:8787/mcp",
            "--tool",
            "echo",
            "--tool",
            "gateway=demo.echo",
            "--args",
            r#"{"text":"hi"}"#,
            "--args",
            r#"direct={"text":"x"}"#,
            "--rates",
            "500,2000",
            "--full-speed",
        ]);
        let p = c.resolve().unwrap();
        assert_eq!(p.targets[0].tool, "echo");
        assert_eq!(p.targets[1].tool, "demo.echo");
        assert_eq!(p.targets[0].args, r#"{"text":"x"}"#);
        assert_eq!(p.targets[1].args, r#"{"text":"hi"}"#);
        assert_eq!(
            p.modes,
            vec![Mode::Rate(500.0), Mode::Rate(2000.0), Mode::FullSpeed]
        );
        assert_eq!(p.rounds, 3);
        assert_eq!(p.duration, Duration::from_secs(10));
    }

    #[test]
    fn rejects_bad_input() {
        let base = ["--target", "a=http://127.0.0.1:1/mcp", "--tool", "t"];
        let mut no_mode = base.to_vec();
        no_mode.push("--json");
        no_mode.push("x.json");
        assert!(cli(&no_mode).resolve().is_err());
        let mut bad_args = base.to_vec();
        bad_args.extend_from_slice(&["--rates", "1", "--args", "[1]"]);
        assert!(cli(&bad_args).resolve().is_err());
        let mut bad_rate = base.to_vec();
        bad_rate.extend_from_slice(&["--rates", "0"]);
        assert!(cli(&bad_rate).resolve().is_err());
        let mut missing_env = base.to_vec();
        missing_env.extend_from_slice(&[
            "--rates",
            "1",
            "--token-env",
            "a=PORTCULLIS_LOAD_TEST_SURELY_UNSET",
        ]);
        assert!(cli(&missing_env).resolve().is_err());
        let https = cli(&[
            "--target",
            "a=https://127.0.0.1:1/mcp",
            "--tool",
            "t",
            "--rates",
            "1",
        ]);
        assert!(https.resolve().is_err());
    }
}
