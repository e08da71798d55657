//! `portcullis demo` — the README's first command — runs the whole journey
//! and every step goes as scripted (its exit status says so).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[test]
fn the_demo_tells_the_whole_story() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("demo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("\n!! "), "{text}");
    for expected in [
        "DENIED state_violation",
        "forbidden by no-sql-wildcards",
        "forbidden by no-path-traversal",
        "task_mismatch",
        "token_revoked",
        "audit chain verified",
        "/console",
        "sign in with the admin token: demo-admin-token",
    ] {
        assert!(text.contains(expected), "missing {expected:?}:\n{text}");
    }
}
