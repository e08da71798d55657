//! The `portcullis` command. Thin: parse flags, call the library, print.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod audit;
mod demo;
mod elevations;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use portcullis::LoadedConfig;
use portcullis::scenario::{self, StepOutcome};

/// `println!` that ignores a closed stdout instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A zero-trust gateway between AI agents and the tools they call"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration and its policies; exit 1 with one line per finding.
    Check {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a scenario file against a configuration and print every decision.
    Scenarios {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The scenario file (default: scenarios.toml beside the configuration).
        #[arg(long)]
        scenarios: Option<PathBuf>,
    },
    /// Start the gateway on a temporary embedded store with the built-in
    /// demo upstreams, and run a scripted agent over MCP through it.
    Demo {
        /// Keep the gateway (and its console) running after the script,
        /// until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Run the gateway service.
    Serve {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Log format on stderr: `text` or `json` (one object per line, with
        /// the request's `request_id` on every line logged while serving it).
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Verify, export or follow the audit log.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Compare each tool's pinned definition with what its upstream
    /// advertises now; exit 1 if any changed, vanished or cannot be read.
    Drift {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Re-approve (pin) the definition the upstream advertises now for
        /// this tool; repeatable.
        #[arg(long, value_name = "TOOL")]
        approve: Vec<String>,
        /// Who approves, as recorded in the ledger and the audit log.
        #[arg(long, default_value = "admin-cli")]
        by: String,
    },
    /// List, approve or deny elevation requests through a running gateway's
    /// API (its address is the configuration's `server.issuer`).
    Elevations {
        #[command(subcommand)]
        command: ElevationsCommand,
    },
    /// Serve MCP on stdio, relaying to a gateway's /mcp with a task token
    /// (for desktop clients that only start MCP servers as processes).
    Connect {
        /// The gateway's MCP endpoint, e.g. http://127.0.0.1:8787/mcp.
        #[arg(long)]
        url: String,
        /// The task's access token (default: the PORTCULLIS_TOKEN
        /// environment variable, which keeps it out of process listings).
        #[arg(long, env = "PORTCULLIS_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Write a new Ed25519 signing key (mode 0600) and print its kid.
    Keygen {
        /// Where to write it; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a built-in demo MCP server on stdio (or Streamable HTTP with --http).
    DemoServer {
        /// Which tool set: `warehouse` (SQLite) or `files` (a directory tree).
        #[arg(value_parser = ["warehouse", "files"])]
        name: String,
        /// The warehouse's SQLite file (default: an in-memory database seeded with demo data).
        #[arg(long)]
        db: Option<PathBuf>,
        /// The root of the files server's tree (default: the current directory).
        #[arg(long)]
        root: Option<PathBuf>,
        /// Serve Streamable HTTP at http://ADDR/mcp instead of stdio.
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
        /// Change one tool's description, to simulate a changed tool definition.
        #[arg(long)]
        drift: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ElevationsCommand {
    /// Print elevation requests (pending ones by default).
    List {
        /// The configuration file (for the gateway's address).
        #[arg(long)]
        config: PathBuf,
        /// pending, approved or denied.
        #[arg(long, default_value = "pending", value_parser = ["pending", "approved", "denied"])]
        status: String,
        /// Keep watching: print each new request as it arrives.
        #[arg(long)]
        watch: bool,
        /// An approver's admin token (default: PORTCULLIS_ADMIN_TOKEN).
        #[arg(long, env = "PORTCULLIS_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Approve a pending request: the task may use the tool until `elevation.ttl`.
    Approve {
        /// The elevation id.
        id: String,
        /// The configuration file (for the gateway's address).
        #[arg(long)]
        config: PathBuf,
        /// A note kept with the decision.
        #[arg(long)]
        note: Option<String>,
        /// An approver's admin token (default: PORTCULLIS_ADMIN_TOKEN).
        #[arg(long, env = "PORTCULLIS_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Deny a pending request.
    Deny {
        /// The elevation id.
        id: String,
        /// The configuration file (for the gateway's address).
        #[arg(long)]
        config: PathBuf,
        /// A note kept with the decision.
        #[arg(long)]
        note: Option<String>,
        /// An approver's admin token (default: PORTCULLIS_ADMIN_TOKEN).
        #[arg(long, env = "PORTCULLIS_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Scenarios { config, scenarios } => {
            let scenarios = scenarios.unwrap_or_else(|| config.with_file_name("scenarios.toml"));
            run_scenarios(&config, &scenarios)
        }
        Command::Demo { keep } => demo(keep),
        Command::Serve { config, log_format } => serve(&config, log_format == "json"),
        Command::Audit { command } => audit::run(command),
        Command::Keygen { out } => portcullis_gateway::run::keygen(&out)
            .map(|kid| {
                outln!("{kid}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Elevations { command } => runtime().and_then(|rt| {
            rt.block_on(async {
                match command {
                    ElevationsCommand::List {
                        config,
                        status,
                        watch,
                        token,
                    } => elevations::list(&config, &token, &status, watch).await,
                    ElevationsCommand::Approve {
                        id,
                        config,
                        note,
                        token,
                    } => elevations::decide(&config, &token, &id, true, note.as_deref()).await,
                    ElevationsCommand::Deny {
                        id,
                        config,
                        note,
                        token,
                    } => elevations::decide(&config, &token, &id, false, note.as_deref()).await,
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Connect { url, token } => runtime()
            .and_then(|rt| Ok(rt.block_on(portcullis_mcp::bridge::run(&url, &token))?))
            .map(|()| ExitCode::SUCCESS),
        Command::Drift {
            config,
            approve,
            by,
        } => drift(&config, &approve, &by),
        Command::DemoServer {
            name,
            db,
            root,
            http,
            drift,
        } => demo_server(&name, db, root, http.as_deref(), drift),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("portcullis: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: &Path, json_logs: bool) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json_logs {
        logs.json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        logs.init();
    }
    let rt = runtime()?;
    let served = rt.block_on(portcullis_gateway::run::serve_config(config));
    // Dropping a runtime waits for every blocking task, a stalled store
    // close included; the shutdown bound is already spent, so give the
    // runtime a moment and then leave it behind.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    served?;
    Ok(ExitCode::SUCCESS)
}

fn demo_server(
    name: &str,
    db: Option<PathBuf>,
    root: Option<PathBuf>,
    http: Option<&str>,
    drift: bool,
) -> anyhow::Result<ExitCode> {
    // Logs go to stderr: on stdio, stdout carries the protocol.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let options = portcullis_demo::Options {
        db,
        root,
        drift,
        ..portcullis_demo::Options::new(name.parse()?)
    };
    runtime()?.block_on(portcullis_demo::run(&options, http))?;
    Ok(ExitCode::SUCCESS)
}

fn drift(config: &Path, approve: &[String], by: &str) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let lines = rt.block_on(async {
        let loaded = LoadedConfig::load(config)?;
        let store = portcullis_gateway::run::open_store(&loaded).await?;
        let now = portcullis_core::Clock::now(&portcullis::SystemClock);
        let lines =
            portcullis_gateway::federation::drift(&loaded, store.as_ref(), approve, by, now)
                .await
                .map_err(anyhow::Error::msg)?;
        anyhow::Ok(lines)
    })?;
    let width = lines.iter().map(|l| l.tool.len()).max().unwrap_or(0);
    for l in &lines {
        outln!("{:width$}  {:11}  {}", l.tool, l.status, l.detail);
    }
    Ok(if lines.iter().any(|l| l.is_drift()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn check(config: &Path) -> anyhow::Result<ExitCode> {
    let findings = match LoadedConfig::load(config) {
        Ok(loaded) => {
            let mut findings = portcullis_core::check(&loaded);
            // The TLS files: read here, beside the pure checks.
            findings.extend(portcullis_gateway::tls::findings(
                &loaded,
                std::time::SystemTime::now(),
            ));
            if findings.is_empty() {
                let c = &loaded.config;
                outln!(
                    "{}: ok ({} upstreams, {} tools, {} agent types, {} agents, {} policy files)",
                    config.display(),
                    c.upstreams.len(),
                    c.tools.len(),
                    c.agent_types.len(),
                    c.agents.len(),
                    loaded.policies.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            findings
        }
        Err(findings) => findings.0,
    };
    // A closed pipe (`check … | head`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    for finding in &findings {
        if writeln!(out, "{finding}").is_err() {
            break;
        }
    }
    Ok(ExitCode::FAILURE)
}

fn run_scenarios(config: &Path, scenarios: &Path) -> anyhow::Result<ExitCode> {
    let outcomes = scenario::run_files(config, scenarios)?;
    Ok(print_outcomes(&outcomes))
}

fn print_outcomes(outcomes: &[StepOutcome]) -> ExitCode {
    let mut current = "";
    let mut failed = 0usize;
    for o in outcomes {
        if o.scenario != current {
            outln!("\n== {}", o.scenario);
            current = &o.scenario;
        }
        let verdict = match o.decision.reason {
            None => "ALLOW".to_owned(),
            Some(reason) => format!("DENY  {reason}"),
        };
        let mut line = format!(
            "  {:>2}. {:<22} {:<24} state={}",
            o.step, o.action, verdict, o.state
        );
        if let Some(t) = &o.decision.transition {
            line.push_str(&format!(
                "  ({} -> {}{})",
                t.from,
                t.to,
                if t.reverify { ", reverify" } else { "" }
            ));
        }
        if !o.decision.policy_ids.is_empty() {
            line.push_str(&format!("  policies={}", o.decision.policy_ids.join(",")));
        }
        outln!("{line}");
        if o.decision.reason.is_some() && !o.decision.detail.is_empty() {
            outln!("      {}", o.decision.detail);
        }
        for m in &o.mismatches {
            failed += 1;
            outln!("      MISMATCH: {m}");
        }
    }
    outln!("\n{} steps, {} mismatches", outcomes.len(), failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The ingestion example, compiled in so the demo runs from anywhere.
fn demo(keep: bool) -> anyhow::Result<ExitCode> {
    let ok = runtime()?.block_on(demo::run(keep))?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
