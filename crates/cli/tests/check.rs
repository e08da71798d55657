//! `portcullis check` end to end: the built binary against the broken
//! configurations under `tests/broken/`, the shipped examples, and hostile
//! inputs.
//!
//! # The broken-configuration corpus
//!
//! Every folder `tests/broken/<case>/` holds a `portcullis.toml` (and, where
//! the case needs them, `policies/*.cedar`) next to an `expected.txt` with
//! the exact lines `check` must print. The binary runs with the case folder
//! as its working directory and `--config portcullis.toml`, so findings read
//! `portcullis.toml:LINE …` and `policies/x.cedar:LINE …`. A case passes when
//! `check` exits 1, prints exactly `expected.txt` on stdout, and does not
//! panic. Adding a case is adding a folder: no code changes.
//!
//! `expected.txt` holds what `check` *should* print, which is not always what
//! it prints today: a wrong line, path or message is a bug to fix in `check`,
//! never something to copy into the expectation.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest a single `check` run may take before the test gives up on it.
const TIMEOUT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What one run of the binary did.
struct Run {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The exit code, or a description of how the process ended without one.
    fn describe_status(&self) -> String {
        match self.status {
            None => format!("still running after {TIMEOUT:?} (killed)"),
            Some(s) => match s.code() {
                Some(code) => format!("exit code {code}"),
                None => format!("killed by a signal ({s})"),
            },
        }
    }

    fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    fn crashed(&self) -> bool {
        self.stderr.contains("panicked") || self.stderr.contains("overflowed its stack")
    }
}

/// Runs `portcullis check --config portcullis.toml` in `dir`, with a timeout.
fn run_check(dir: &Path) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config", "portcullis.toml"])
        .current_dir(dir)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portcullis");
    // Drain both pipes while waiting, so a large output cannot block the child.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for portcullis") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The case folders under `tests/broken/`, sorted.
fn cases() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/broken");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases under {}", dir.display());
    cases
}

/// A line diff of `expected` against `actual` (longest common subsequence):
/// `-` lines are expected but missing, `+` lines are printed but not expected.
fn diff(expected: &[&str], actual: &[&str]) -> String {
    let (n, m) = (expected.len(), actual.len());
    // common[i][j]: length of the longest common subsequence of expected[i..] and actual[j..].
    let mut common = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            common[i][j] = if expected[i] == actual[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let mut out = String::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && expected[i] == actual[j] {
            let _ = writeln!(out, "      {}", expected[i]);
            i += 1;
            j += 1;
        } else if i < n && (j == m || common[i + 1][j] >= common[i][j + 1]) {
            let _ = writeln!(out, "    - {}", expected[i]);
            i += 1;
        } else {
            let _ = writeln!(out, "    + {}", actual[j]);
            j += 1;
        }
    }
    out
}

/// Checks one case; the error explains every way it failed.
fn check_case(case: &Path) -> Result<(), String> {
    let name = case.file_name().unwrap().to_string_lossy().into_owned();
    if !case.join("portcullis.toml").is_file() {
        return Err(format!("{name}: no portcullis.toml"));
    }
    let expected = std::fs::read_to_string(case.join("expected.txt"))
        .map_err(|e| format!("{name}: cannot read expected.txt: {e}"))?;
    let expected: Vec<&str> = expected.lines().collect();
    if expected.is_empty() {
        return Err(format!(
            "{name}: expected.txt is empty; a broken configuration has findings"
        ));
    }

    let run = run_check(case);
    let actual: Vec<&str> = run.stdout.lines().collect();
    let mut problems = Vec::new();
    if run.code() != Some(1) {
        problems.push(format!(
            "expected exit code 1, got {}",
            run.describe_status()
        ));
    }
    if run.crashed() {
        problems.push(format!("crashed; stderr:\n{}", indent(&run.stderr)));
    }
    if actual != expected {
        problems.push(format!(
            "stdout differs from expected.txt (- expected, + printed):\n{}",
            diff(&expected, &actual)
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{name}: {}", problems.join("\n  ")))
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

#[test]
fn broken_configurations_print_exactly_the_expected_findings() {
    let cases = cases();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| check_case(case).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases under tests/broken failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// Regression: a forbid that reads an argument Cedar is never shown (an
/// undeclared one, a union of types) was proven impossible by validation
/// and left out without a word, so the calls it forbids passed. `check`
/// names every such policy/tool pair at the policy's file and line, and a
/// tool-scoped rule that can never match its tool.
#[test]
fn check_reports_a_rule_that_can_never_apply_with_file_and_line() {
    let case = repo_root().join("tests/broken/cedar-rule-never-applies");
    if let Err(problem) = check_case(&case) {
        panic!("{problem}");
    }
}

#[test]
fn examples_are_clean() {
    for example in ["quickstart", "ingestion", "cluster"] {
        let run = run_check(&repo_root().join("examples").join(example));
        let lines: Vec<&str> = run.stdout.lines().collect();
        assert!(
            run.code() == Some(0) && !run.crashed(),
            "examples/{example}: {}\nstdout:\n{}stderr:\n{}",
            run.describe_status(),
            indent(&run.stdout),
            indent(&run.stderr)
        );
        assert_eq!(
            lines.len(),
            1,
            "examples/{example}: expected one line, got:\n{}",
            run.stdout
        );
        assert!(
            lines[0].starts_with("portcullis.toml: ok"),
            "examples/{example}: expected an `ok` line, got {:?}",
            lines[0]
        );
    }
}

/// A small valid configuration that hostile policy files are checked against.
const BASE: &str = r#"
[[upstreams]]
name = "wh"
transport = "stdio"
command = ["wh-server"]

[[tools]]
name = "wh.query"
upstream = "wh"
risk = "low"
access = "read"
args_schema = { type = "object", properties = { sql = { type = "string" }, limit = { type = "integer" } }, required = ["sql"] }

[policies]
cedar = ["policies/*.cedar"]
"#;

/// One hostile input: a configuration, perhaps a policy file, and the exit
/// code `check` must end with.
struct Hostile {
    name: &'static str,
    config: Vec<u8>,
    policy: Option<Vec<u8>>,
    exit: i32,
}

fn hostile_inputs() -> Vec<Hostile> {
    const DEEP: usize = 100_000;
    let toml = |name, config: String, exit| Hostile {
        name,
        config: config.into_bytes(),
        policy: None,
        exit,
    };
    let cedar = |name, condition: String| Hostile {
        name,
        config: BASE.as_bytes().to_vec(),
        policy: Some(
            format!(
                "@id(\"hostile\")\nforbid(principal, action, resource)\nwhen {{ {condition} }};\n"
            )
            .into_bytes(),
        ),
        exit: 1,
    };
    vec![
        toml("empty file", String::new(), 0),
        toml("only a byte order mark", "\u{feff}".to_owned(), 0),
        toml(
            "deeply nested array",
            format!("x = {}{}\n", "[".repeat(DEEP), "]".repeat(DEEP)),
            1,
        ),
        toml(
            "deeply nested array, unclosed",
            format!("x = {}\n", "[".repeat(DEEP)),
            1,
        ),
        toml(
            "deeply nested inline table",
            format!("x = {}1{}\n", "{ a = ".repeat(DEEP), " }".repeat(DEEP)),
            1,
        ),
        toml(
            "deeply nested args_schema",
            format!(
                "[[tools]]\nname = \"wh.q\"\nupstream = \"wh\"\nrisk = \"low\"\naccess = \"read\"\nargs_schema = {}1{}\n",
                "{ a = ".repeat(DEEP),
                " }".repeat(DEEP)
            ),
            1,
        ),
        toml(
            "deeply dotted key",
            format!("a{} = 1\n", ".a".repeat(DEEP)),
            1,
        ),
        toml(
            "deeply nested table header",
            format!("[a{}]\n", ".a".repeat(DEEP)),
            1,
        ),
        toml(
            "args_schema nested 70 levels (within TOML's own limit)",
            format!(
                "[[tools]]\nname = \"wh.q\"\nupstream = \"wh\"\nrisk = \"low\"\naccess = \"read\"\nargs_schema = {{ type = \"object\", properties = {}1{} }}\n",
                "{ a = ".repeat(70),
                " }".repeat(70)
            ),
            1,
        ),
        toml("5 MB file", format!("# {}\n", "x".repeat(5 << 20)), 1),
        toml(
            "a value just under the 4 MiB file limit",
            format!("[server]\nlisten = \"{}\"\n", "x".repeat((4 << 20) - 64)),
            1,
        ),
        Hostile {
            name: "non-UTF-8 bytes",
            config: b"[server]\nlisten = \"\xff\xfe\"\n".to_vec(),
            policy: None,
            exit: 1,
        },
        Hostile {
            name: "NUL byte",
            config: b"[server]\0\n".to_vec(),
            policy: None,
            exit: 1,
        },
        Hostile {
            name: "non-UTF-8 policy file",
            config: BASE.as_bytes().to_vec(),
            policy: Some(b"// caf\xe9\n".to_vec()),
            exit: 1,
        },
        cedar(
            "1,000 nested parentheses in a policy",
            format!("{}true{}", "(".repeat(1000), ")".repeat(1000)),
        ),
        cedar(
            "1,000 nested set literals in a policy",
            format!("{}{} == []", "[".repeat(1000), "]".repeat(1000)),
        ),
        cedar(
            "3,000 nested if-then-else in a policy",
            format!(
                "{}true{}",
                "if true then ".repeat(3000),
                " else false".repeat(3000)
            ),
        ),
        // Not a crash today but a silent pass: Cedar's validator gives up on
        // deep expressions without reporting an error, so `check` must bound
        // policy depth itself.
        cedar(
            "3,000-long attribute chain in a policy",
            format!("context{} == 1", ".a".repeat(3000)),
        ),
    ]
}

#[test]
fn hostile_inputs_are_findings_not_crashes() {
    let mut failures = Vec::new();
    for input in hostile_inputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("portcullis.toml"), &input.config).unwrap();
        let exit = input.exit;
        if let Some(policy) = &input.policy {
            std::fs::create_dir(dir.path().join("policies")).unwrap();
            std::fs::write(dir.path().join("policies/rules.cedar"), policy).unwrap();
        }
        let run = run_check(dir.path());
        let lines: Vec<&str> = run.stdout.lines().collect();
        let mut problems = Vec::new();
        if run.code() != Some(exit) {
            problems.push(format!(
                "expected exit code {exit}, got {}",
                run.describe_status()
            ));
        }
        if run.crashed() {
            problems.push(format!("crashed; stderr:\n{}", indent(&run.stderr)));
        }
        if exit == 0 {
            if lines.len() != 1 || !lines[0].starts_with("portcullis.toml: ok") {
                problems.push(format!(
                    "expected one `ok` line, got:\n{}",
                    indent(&run.stdout)
                ));
            }
        } else if lines.is_empty() {
            problems.push("printed no finding".to_owned());
        } else if let Some(line) = lines
            .iter()
            .find(|l| !(l.starts_with("portcullis.toml") || l.starts_with("policies/")))
        {
            problems.push(format!("a finding that names no input file: {line:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", input.name, problems.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `portcullis check … | head -1` closes the pipe while findings are still
/// being printed; that must end the run quietly, not with a panic.
#[test]
fn check_survives_a_closed_stdout() {
    let dir = tempfile::tempdir().unwrap();
    // About 250 KB of findings: far more than a pipe buffers.
    let acl: Vec<String> = (0..5000).map(|i| format!("\"nope.t{i}\"")).collect();
    let config = format!(
        "[[agent_types]]\nname = \"r\"\ninitial = \"a\"\nstates = [{{ name = \"a\", final = true }}]\n\n\
         [[agents]]\nid = \"b\"\ntype = \"r\"\nbootstrap_sha256 = \"{}\"\ntools = [{}]\n",
        "a".repeat(64),
        acl.join(", ")
    );
    std::fs::write(dir.path().join("portcullis.toml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config", "portcullis.toml"])
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portcullis");
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    let read = stdout.read(&mut first).unwrap();
    assert!(read > 0, "no output at all");
    drop(stdout);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked"),
        "check panicked when its stdout was closed ({}):\n{}",
        output.status,
        indent(&stderr)
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit status after a closed stdout"
    );
}
