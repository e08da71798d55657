//! `portcullis audit verify | archive | export | tail`: the audit log from
//! the command line (library side: `portcullis_gateway::audit` and
//! `portcullis_gateway::tiering`).

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Subcommand;
use portcullis::LoadedConfig;
use portcullis_gateway::audit as log;
use portcullis_gateway::tiering;
use portcullis_gateway::witness::WitnessSummary;

fn out(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain and every checkpoint signature; exit 1 on the
    /// first bad record.
    Verify {
        /// The configuration (its store and keys); or use --jsonl or
        /// --archive with --jwks, offline.
        #[arg(long, required_unless_present_any = ["jsonl", "archive"])]
        config: Option<PathBuf>,
        /// An exported JSON Lines file to verify offline (with --jwks).
        #[arg(long, requires = "jwks", conflicts_with_all = ["config", "archive"])]
        jsonl: Option<PathBuf>,
        /// Verify the archive too: its segment files, then the store's
        /// records after them, as one log. The folder defaults to the
        /// configuration's `audit.archive_dir`; without --config, give the
        /// folder and --jwks to verify the archive alone, offline.
        #[arg(long, num_args = 0..=1, value_name = "DIR")]
        archive: Option<Option<PathBuf>>,
        /// The gateway's JWKS (a copy of /.well-known/jwks.json).
        #[arg(long)]
        jwks: Option<PathBuf>,
        /// Hold the log against the checkpoint witness in this folder (the
        /// gateway's `audit.witness_dir`): every witnessed checkpoint must
        /// be in the log, and the records must chain to it.
        #[arg(long, value_name = "DIR")]
        witness: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Run the tiering pass now: move records older than `hot_days` to
    /// the archive, drop what is older than `retention_days` (`serve` does
    /// this every ten minutes).
    Archive {
        /// The configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the log as JSON Lines, checkpoints included.
    Export {
        /// The configuration.
        #[arg(long)]
        config: PathBuf,
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        since_seq: u64,
    },
    /// Follow the log as it grows.
    Tail {
        /// The configuration.
        #[arg(long)]
        config: PathBuf,
        /// Only this task.
        #[arg(long)]
        task: Option<String>,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only this kind (e.g. call.denied).
        #[arg(long)]
        kind: Option<String>,
        /// Only this decision (allow, deny, error).
        #[arg(long)]
        decision: Option<String>,
        /// Start after this sequence number (default: the last 20 records).
        #[arg(long)]
        since_seq: Option<u64>,
    },
}

/// Runs one `audit` subcommand.
pub fn run(command: AuditCommand) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    match command {
        AuditCommand::Verify {
            config,
            jsonl,
            archive,
            jwks,
            witness,
            quiet,
        } => {
            let mut bar = Progress::new(!quiet && std::io::stderr().is_terminal());
            let witnessed = witness
                .as_deref()
                .map(portcullis_gateway::witness::read_witness)
                .transpose()?;
            let sources = Sources {
                config,
                jsonl,
                archive,
                jwks,
            };
            let (report, summary) = rt.block_on(verify(
                sources,
                witnessed.as_deref().unwrap_or_default(),
                &mut bar,
            ))?;
            bar.finish();
            let code = print_report(&report);
            if witnessed.is_some() {
                out(&witness_line(&summary));
            }
            Ok(code)
        }
        AuditCommand::Archive { config } => rt.block_on(async {
            let loaded = LoadedConfig::load(&config)?;
            let store = portcullis_gateway::run::open_store(&loaded).await?;
            let ring = portcullis_gateway::run::load_keys(&loaded)?;
            let tiers = tiering::Tiers::from_config(&loaded);
            let now = portcullis_core::Clock::now(&portcullis::SystemClock);
            let report = tiering::run_pass(store.as_ref(), &ring, &tiers, now)
                .await
                .map_err(anyhow::Error::msg)?;
            // The checkpoints the pass signed go to the witness too.
            if let Some(witness) = portcullis_gateway::open_witness(&loaded)? {
                witness.catch_up(store.as_ref(), &ring).await?;
            }
            for m in &report.archived {
                out(&format!(
                    "archived records {}..={} to {} (recorded at seq {})",
                    m.first_seq,
                    m.last_seq,
                    m.file.as_deref().unwrap_or("?"),
                    m.recorded_at
                ));
            }
            for m in &report.dropped {
                out(&format!(
                    "dropped records {}..={}{} (recorded at seq {})",
                    m.first_seq,
                    m.last_seq,
                    m.file
                        .as_deref()
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default(),
                    m.recorded_at
                ));
            }
            if report.archived.is_empty() && report.dropped.is_empty() {
                out("nothing to move or drop");
            }
            if report.raced {
                out("another replica moved the same records first");
            }
            Ok(ExitCode::SUCCESS)
        }),
        AuditCommand::Export { config, since_seq } => rt.block_on(async {
            let loaded = LoadedConfig::load(&config)?;
            let store = portcullis_gateway::run::open_store(&loaded).await?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            log::export(store.as_ref(), since_seq, &mut out)
                .await
                .map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }),
        AuditCommand::Tail {
            config,
            task,
            agent,
            kind,
            decision,
            since_seq,
        } => rt.block_on(async {
            let loaded = LoadedConfig::load(&config)?;
            let store = portcullis_gateway::run::open_store(&loaded).await?;
            let filter = log::TailFilter {
                task,
                agent,
                kind,
                decision,
            };
            log::tail(store.as_ref(), since_seq, &filter, &mut |line| out(line))
                .await
                .map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }),
    }
}

fn read_jwks(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))
}

/// Where `audit verify` reads the log.
struct Sources {
    config: Option<PathBuf>,
    jsonl: Option<PathBuf>,
    archive: Option<Option<PathBuf>>,
    jwks: Option<PathBuf>,
}

async fn verify(
    sources: Sources,
    witness: &[portcullis_store::Checkpoint],
    bar: &mut Progress,
) -> anyhow::Result<(portcullis_store::chain::Report, WitnessSummary)> {
    let Sources {
        config,
        jsonl,
        archive,
        jwks,
    } = sources;
    if let (Some(file), Some(jwks)) = (&jsonl, &jwks) {
        let jwks = read_jwks(jwks)?;
        bar.total = std::fs::metadata(file).ok().map(|m| m.len());
        bar.unit = Unit::Bytes;
        return log::verify_jsonl(file, &jwks, witness, &mut |n| bar.records(n))
            .map_err(anyhow::Error::msg);
    }
    let Some(config) = config else {
        let (Some(Some(dir)), Some(jwks)) = (&archive, &jwks) else {
            anyhow::bail!("give --config, --jsonl FILE --jwks F, or --archive DIR --jwks F");
        };
        let jwks = read_jwks(jwks)?;
        let check = log::jwks_check(&jwks);
        bar.total = archive_span(dir)?;
        return tiering::verify_archive_witnessed(dir, None, &check, witness, &mut |n| {
            bar.records(n)
        })
        .await
        .map_err(anyhow::Error::msg);
    };
    let loaded = LoadedConfig::load(&config)?;
    let store = portcullis_gateway::run::open_store(&loaded).await?;
    let ring = portcullis_gateway::run::load_keys(&loaded)?;
    let head = store
        .chain_head()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .map_or(0, |(seq, _)| seq);
    let Some(archive) = archive else {
        let floor = tiering::store_floor(store.as_ref())
            .await
            .map_err(anyhow::Error::msg)?;
        bar.total = Some(head.saturating_sub(floor));
        return log::verify_store_witnessed(store.as_ref(), &ring, witness, &mut |n| {
            bar.records(n)
        })
        .await
        .map_err(anyhow::Error::msg);
    };
    let dir = match archive {
        Some(dir) => dir,
        None => tiering::Tiers::from_config(&loaded)
            .archive_dir
            .context("--archive without a folder needs audit.archive_dir in the configuration")?,
    };
    let first = tiering::list_segments(&dir)
        .map_err(anyhow::Error::msg)?
        .first()
        .map_or(head, |f| f.first_seq.saturating_sub(1));
    bar.total = Some(head.saturating_sub(first));
    let check = log::ring_check(&ring);
    tiering::verify_archive_witnessed(&dir, Some(store.as_ref()), &check, witness, &mut |n| {
        bar.records(n)
    })
    .await
    .map_err(anyhow::Error::msg)
}

/// What the witness added to the verification, in one line.
fn witness_line(summary: &WitnessSummary) -> String {
    let mut line = format!(
        "witness: {} checkpoints (newest seq {}) held against the log",
        summary.witnessed, summary.newest
    );
    if summary.below_log > 0 {
        line.push_str(&format!(
            "; {} of them precede the log's start (archived or dropped), signatures checked",
            summary.below_log
        ));
    }
    if summary.unwitnessed > 0 {
        line.push_str(&format!(
            "; WARNING: {} of the log's checkpoints are newer than the witness's newest and not \
             witnessed (a failed or pending witness append: see \
             portcullis_audit_witness_failures_total)",
            summary.unwitnessed
        ));
    }
    line
}

/// Records in the archive's files, by their names.
fn archive_span(dir: &std::path::Path) -> anyhow::Result<Option<u64>> {
    let files = tiering::list_segments(dir).map_err(anyhow::Error::msg)?;
    Ok(files
        .first()
        .zip(files.last())
        .map(|(a, b)| b.last_seq.saturating_sub(a.first_seq) + 1))
}

fn print_report(report: &portcullis_store::chain::Report) -> ExitCode {
    match &report.first_bad {
        None => {
            let mut line = format!(
                "ok: {} records, {} checkpoints verified",
                report.records, report.checkpoints_verified
            );
            if report.anchor > 0 {
                line.push_str(&format!(
                    "; the log starts after the signed checkpoint of seq {}",
                    report.anchor
                ));
                match report.floor_declared_at {
                    Some(at) => line.push_str(&format!(
                        " (older records archived or dropped, as record {at} says)"
                    )),
                    None => line.push_str(
                        " (the record that says why is not in the archive: verify with --config \
                         to include the store)",
                    ),
                }
            }
            if report.uncovered > 0 {
                line.push_str(&format!(
                    "; {} newest records not yet covered by a checkpoint",
                    report.uncovered
                ));
            }
            out(&line);
            ExitCode::SUCCESS
        }
        Some(problem) => {
            out(&format!("FAILED at seq {}: {}", problem.seq, problem.what));
            out(&format!(
                "({} records read, {} checkpoints verified before it)",
                report.records, report.checkpoints_verified
            ));
            ExitCode::FAILURE
        }
    }
}

/// What the progress bar counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Records,
    /// A JSON Lines file: the bar follows records, the total is in bytes,
    /// so it shows a count only.
    Bytes,
}

/// A progress bar on stderr, drawn only on a terminal and at most ten
/// times a second.
struct Progress {
    enabled: bool,
    total: Option<u64>,
    unit: Unit,
    drawn: Option<Instant>,
    done: u64,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            total: None,
            unit: Unit::Records,
            drawn: None,
            done: 0,
        }
    }

    fn records(&mut self, done: u64) {
        self.done = done;
        if !self.enabled
            || self
                .drawn
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.drawn = Some(Instant::now());
        let total = if self.unit == Unit::Records {
            self.total
        } else {
            None
        };
        eprint!("\r{}", render(done, total, 30));
    }

    fn finish(&mut self) {
        if self.enabled && self.drawn.is_some() {
            let total = (self.unit == Unit::Records).then_some(self.done);
            eprintln!("\r{}", render(self.done, total, 30));
        }
    }
}

/// One line of the bar: `[#####.....]  50%  500/1000 records`, or a count
/// when the total is unknown.
fn render(done: u64, total: Option<u64>, width: usize) -> String {
    let Some(total) = total.filter(|&t| t > 0) else {
        return format!("verified {done} records");
    };
    let done = done.min(total);
    let filled = usize::try_from(done.saturating_mul(width as u64) / total).unwrap_or(width);
    let percent = done.saturating_mul(100) / total;
    format!(
        "[{}{}] {percent:>3}%  {done}/{total} records",
        "#".repeat(filled),
        ".".repeat(width.saturating_sub(filled))
    )
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn the_bar_fills_with_the_count() {
        assert_eq!(render(0, Some(10), 10), "[..........]   0%  0/10 records");
        assert_eq!(render(5, Some(10), 10), "[#####.....]  50%  5/10 records");
        assert_eq!(render(10, Some(10), 10), "[##########] 100%  10/10 records");
        // Never past full, whatever the count says.
        assert_eq!(render(12, Some(10), 10), "[##########] 100%  10/10 records");
        assert_eq!(render(7, None, 10), "verified 7 records");
        assert_eq!(render(7, Some(0), 10), "verified 7 records");
    }
}
