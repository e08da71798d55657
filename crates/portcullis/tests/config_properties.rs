//! Property smoke for the configuration and policy loaders: whatever the
//! bytes, loading and building return findings or an engine, never a panic.
//! CI runs these as its fuzz smoke.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis::LoadedConfig;
use portcullis_core::ManualClock;
use proptest::prelude::*;

fn example(name: &str) -> (String, String) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/ingestion");
    (
        std::fs::read_to_string(dir.join("portcullis.toml")).unwrap(),
        std::fs::read_to_string(dir.join(name)).unwrap(),
    )
}

/// Loads `config` with `policy` as its only policy file and builds it.
fn load_and_build(dir: &Path, config: &str, policy: &str) {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/ingestion.cedar"), policy).unwrap();
    let file = dir.join("portcullis.toml");
    std::fs::write(&file, config).unwrap();
    if let Ok(loaded) = LoadedConfig::load(&file) {
        let result = portcullis_core::build(&loaded, Arc::new(ManualClock::default()));
        if let Err(findings) = result {
            // Every finding names a file.
            assert!(findings.0.iter().all(|f| !f.file.as_os_str().is_empty()));
        }
    }
}

/// Applies `edits` (position, replacement byte) to `text`, keeping it UTF-8.
fn mutate(text: &str, edits: &[(usize, u8)]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for &(pos, b) in edits {
        if bytes.is_empty() {
            break;
        }
        let i = pos % bytes.len();
        match b % 4 {
            0 => bytes[i] = b"[]{}=\",.#\n*\\"[usize::from(b) % 12],
            1 => {
                bytes.remove(i);
            }
            2 => bytes.insert(i, b"\"[{=\n"[usize::from(b) % 5]),
            _ => bytes.truncate(i),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `PROPTEST_CASES` when set (CI raises it), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_configs_never_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let (config, policy) = example("policies/ingestion.cedar");
        let dir = tempfile::tempdir().unwrap();
        load_and_build(dir.path(), &mutate(&config, &edits), &policy);
    }

    #[test]
    fn mutated_policies_never_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let (config, policy) = example("policies/ingestion.cedar");
        let dir = tempfile::tempdir().unwrap();
        load_and_build(dir.path(), &config, &mutate(&policy, &edits));
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = LoadedConfig::parse(&text, Path::new("x.toml"));
    }
}

#[test]
fn deeply_nested_toml_is_an_error_not_a_crash() {
    let deep = format!("x = {}1{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let err = LoadedConfig::parse(&deep, Path::new("deep.toml")).unwrap_err();
    assert!(err.to_string().starts_with("deep.toml"), "{err}");
    let deep_tables = format!("x = {}1{}\n", "{a = ".repeat(50_000), "}".repeat(50_000));
    assert!(LoadedConfig::parse(&deep_tables, Path::new("deep.toml")).is_err());
}
