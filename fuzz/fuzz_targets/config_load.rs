//! The configuration loader on arbitrary text: `LoadedConfig::parse_text`
//! (TOML, the typed model, key positions; no file is read), then
//! `portcullis_core::check` and `portcullis_core::build` on whatever loads.
//!
//! The input is up to three texts separated by NUL bytes: the configuration
//! file, the Cedar policy file its first `[policies] cedar` entry is taken
//! to name, and the `[elevation] auto_approve` file. The policy and
//! auto-approve texts are handed over in memory, as if read from disk, and
//! only when the configuration names such files. Inputs over
//! [`MAX_INPUT`] bytes are skipped: the loader's own bound (4 MiB a file)
//! is tested elsewhere, and the fuzzer is more useful on many small inputs.
//!
//! Properties checked (beyond "no panic"):
//!
//! 1. A configuration that does not parse gives exactly one finding, and
//!    every finding, from parsing or from the checks, names its file and
//!    a line, within that file's text.
//! 2. `check` is empty exactly when `build` succeeds, and `build` reports
//!    exactly the findings of `check`.
//! 3. Parsing and checking are deterministic.

#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use portcullis_core::config::{Finding, LoadedConfig, PolicyFile};
use portcullis_core::{ManualClock, Timestamp};

const MAX_INPUT: usize = 64 * 1024;
const CONFIG_FILE: &str = "portcullis.toml";
const POLICY_FILE: &str = "policies/fuzz.cedar";

fn lines(text: &str) -> usize {
    text.split('\n').count()
}

/// Property 1 for one finding.
fn placed(finding: &Finding, config: &str, policies: &str, auto_approve: &str) {
    let line = finding
        .line
        .unwrap_or_else(|| panic!("finding without a line: {finding}"));
    assert!(line >= 1, "{finding}");
    let file = finding.file.to_str().unwrap_or_default();
    let text = match file {
        CONFIG_FILE => config,
        POLICY_FILE => policies,
        _ => panic!("finding in an unexpected file: {finding}"),
    };
    // An auto-approve finding is reported at its key in the configuration.
    let _ = auto_approve;
    assert!(
        line <= lines(text),
        "line past the end of {file}: {finding}"
    );
}

fn load(config: &str, policies: &str, auto_approve: &str) -> Option<LoadedConfig> {
    let mut loaded = match LoadedConfig::parse_text(config, Path::new(CONFIG_FILE)) {
        Ok(loaded) => loaded,
        Err(findings) => {
            assert_eq!(findings.0.len(), 1, "{findings}");
            for f in &findings.0 {
                placed(f, config, policies, auto_approve);
            }
            return None;
        }
    };
    assert!(loaded.policies.is_empty() && loaded.policy_findings.is_empty());
    assert!(loaded.auto_approve.is_none());
    if !loaded.config.policies.cedar.is_empty() {
        loaded.policies.push(PolicyFile {
            path: POLICY_FILE.into(),
            text: policies.to_owned(),
            entry: 0,
        });
    }
    if loaded.config.elevation.auto_approve.is_some() {
        loaded.auto_approve = Some(Ok(auto_approve.to_owned()));
    }
    Some(loaded)
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\0');
    let config = parts.next().unwrap_or_default();
    let policies = parts.next().unwrap_or_default();
    let auto_approve = parts.next().unwrap_or_default();

    let Some(loaded) = load(config, policies, auto_approve) else {
        return;
    };
    let findings = portcullis_core::check(&loaded);
    for f in &findings {
        placed(f, config, policies, auto_approve);
    }
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    match portcullis_core::build(&loaded, clock) {
        Ok(_) => assert!(findings.is_empty(), "built despite {findings:?}"),
        Err(built) => assert_eq!(built.0, findings),
    }
    let again = load(config, policies, auto_approve).expect("loads twice");
    assert_eq!(portcullis_core::check(&again), findings);
});
