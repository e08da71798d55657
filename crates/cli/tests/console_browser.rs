//! The console in a real headless Chromium, as a person uses it: sign in,
//! watch a held call arrive while a real MCP client (the `mcp` Python SDK)
//! waits on it, approve it and see the client get the tool's result, halt a
//! task and watch the live stream show it, approve a drifted tool
//! definition, verify the chain. The steps are in `console_browser.py`
//! (Selenium); this test runs it against this build's `portcullis`.
//!
//! Prints `SKIP: …` and passes when Chromium, chromedriver, Selenium or the
//! MCP SDK is missing (`.ci/run` installs them).
#![allow(clippy::panic)]

use std::process::Command;
use std::time::Duration;

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_person_approves_halts_and_re_pins_in_the_console() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let driver =
        std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".to_owned());
    if !have(&chromium, "--version") || !have(&driver, "--version") {
        eprintln!("SKIP: chromium and chromium-driver are not installed (run .ci/run)");
        return;
    }
    for module in ["selenium", "mcp"] {
        if !python_has(module) {
            eprintln!("SKIP: the Python module {module} is not installed (run .ci/run)");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console_browser.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_portcullis"))
        .arg(dir.path())
        .env("CHROMIUM", &chromium)
        .env("CHROMEDRIVER", &driver)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    // A deadline, so a hung browser fails the test instead of the run.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while child.try_wait().ok().flatten().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let log = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "the browser scenario failed:\n{}\n{}\n--- gateway log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log("gateway.log"),
    );
}
