//! The outside check: tokens of a running gateway verified by PyJWT against
//! the gateway's own JWKS endpoint (`tests/pyjwt_check.py`), so our hand-made
//! JWS is what an independent, widely used implementation accepts.
//!
//! Skipped, with a notice, where `python3` or PyJWT is missing; CI installs
//! them (`pip install pyjwt cryptography`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;
use serde_json::json;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pyjwt_check.py")
}

fn pyjwt_available() -> bool {
    Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn check(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script())
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn describe(o: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyjwt_verifies_access_and_per_hop_tokens() {
    if !pyjwt_available() {
        println!("SKIPPED: PyJWT not installed (pip install pyjwt cryptography)");
        return;
    }
    let h = Harness::start().await;
    let s = h.start_task(None).await;
    h.call_ok(
        &s.access,
        &s.task_id,
        "warehouse.connect",
        json!({ "database": "analytics" }),
    )
    .await;
    let hop = Harness::hop_token(&h.warehouse.calls()[0]);
    let jwks = h.url("/.well-known/jwks.json");

    let o = check(vec![jwks.clone(), s.access.clone(), h.issuer.clone()]).await;
    assert!(o.status.success(), "access token: {}", describe(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "OK");

    let o = check(vec![
        jwks.clone(),
        hop.clone(),
        h.issuer.clone(),
        "warehouse".to_owned(),
    ])
    .await;
    assert!(o.status.success(), "per-hop token: {}", describe(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "OK");

    // The check is not a rubber stamp: a per-hop token is no access token,
    // and a changed signature fails.
    let o = check(vec![jwks.clone(), hop, h.issuer.clone()]).await;
    assert!(!o.status.success(), "hop token as access token passed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("InvalidAudienceError"), "{}", describe(&o));
    let sig_at = s.access.rfind('.').unwrap() + 10;
    let flipped = if &s.access[sig_at..=sig_at] == "A" {
        "B"
    } else {
        "A"
    };
    let forged = format!(
        "{}{flipped}{}",
        &s.access[..sig_at],
        &s.access[sig_at + 1..]
    );
    let o = check(vec![jwks, forged, h.issuer.clone()]).await;
    assert!(!o.status.success(), "a forged signature passed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("InvalidSignatureError"), "{}", describe(&o));
}
