//! Runs the `scenarios.toml` of every example against its configuration:
//! each call must get exactly the decision the file says.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;

fn examples() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("scenarios.toml").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_example_has_scenarios() {
    let names: Vec<String> = examples()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for required in ["ingestion", "quickstart"] {
        assert!(
            names.iter().any(|n| n == required),
            "missing examples/{required}/scenarios.toml"
        );
    }
}

#[test]
fn scenarios_get_the_expected_decisions() {
    for dir in examples() {
        let outcomes = portcullis::scenario::run_files(
            &dir.join("portcullis.toml"),
            &dir.join("scenarios.toml"),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(
            outcomes.len() >= 5,
            "{}: too few steps to mean anything",
            dir.display()
        );
        let failures: Vec<String> = outcomes
            .iter()
            .filter(|o| !o.mismatches.is_empty())
            .map(|o| {
                format!(
                    "{} / {} step {} ({}): {}",
                    dir.display(),
                    o.scenario,
                    o.step,
                    o.action,
                    o.mismatches.join("; ")
                )
            })
            .collect();
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }
}

#[test]
fn a_wrong_expectation_is_reported() {
    // The runner itself must be able to fail: flip one expectation.
    let dir = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    for f in ["portcullis.toml", "policies/files.cedar"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("scenarios.toml"),
        r#"
[[scenario]]
name = "wrong on purpose"
agent = "helper-bot"
steps = [
  { tool = "files.read", args = { path = "/home/.env" }, expect = "allow", state = "done" },
  { tool = "files.read", args = { path = "/ok" }, transition = "done", expect = "allow" },
]
"#,
    )
    .unwrap();
    let outcomes = portcullis::scenario::run_files(
        &dir.path().join("portcullis.toml"),
        &dir.path().join("scenarios.toml"),
    )
    .unwrap();
    assert_eq!(outcomes.len(), 2);
    assert!(
        outcomes[0]
            .mismatches
            .iter()
            .any(|m| m.starts_with("expected allow, got policy_forbid"))
    );
    assert!(
        outcomes[0]
            .mismatches
            .iter()
            .any(|m| m.starts_with("expected state done"))
    );
    assert!(
        outcomes[1]
            .mismatches
            .iter()
            .any(|m| m.contains("exactly one of tool or transition"))
    );
}
