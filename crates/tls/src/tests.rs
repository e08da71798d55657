#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::time::SystemTime;

use portcullis_tls::testpki::{TestCa, Validity};

use super::*;

#[test]
fn a_matching_current_pair_loads_and_an_expired_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test ca");
    let (cert, key) = ca
        .issue(&["localhost"], Validity::Current)
        .write(dir.path(), "ok");
    check_identity(&cert, &key, SystemTime::now()).unwrap();
    let (cert, key) = ca
        .issue(&["localhost"], Validity::Expired)
        .write(dir.path(), "old");
    let e = check_identity(&cert, &key, SystemTime::now()).unwrap_err();
    assert!(e.to_string().contains("expired on"), "{e}");
}

#[test]
fn a_key_of_another_certificate_is_a_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test ca");
    let (cert, _) = ca
        .issue(&["localhost"], Validity::Current)
        .write(dir.path(), "a");
    let (_, key) = ca
        .issue(&["localhost"], Validity::Current)
        .write(dir.path(), "b");
    let e = check_identity(&cert, &key, SystemTime::now()).unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    let e = client_config(
        &ClientTls {
            ca_file: None,
            client_cert: Some(cert),
            client_key: Some(key),
        },
        &[],
    )
    .unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
}

#[test]
fn unreadable_and_non_pem_files_are_reported_without_their_contents() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.crt");
    let e = check_certificates(&missing, SystemTime::now()).unwrap_err();
    assert!(matches!(e, TlsError::Read { .. }), "{e}");
    let junk = dir.path().join("junk.key");
    std::fs::write(&junk, "secret-looking text").unwrap();
    let e = load_key(&junk).unwrap_err().to_string();
    assert!(!e.contains("secret-looking"), "{e}");
    let e = check_certificates(&junk, SystemTime::now()).unwrap_err();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}

#[test]
fn a_reload_serves_the_new_pair_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test ca");
    let (cert, key) = ca
        .issue(&["localhost"], Validity::Current)
        .write(dir.path(), "srv");
    let served = ReloadingCert::load(&cert, &key).unwrap();
    let first = served.current.read().unwrap().key.cert.clone();
    ca.issue(&["localhost"], Validity::Current)
        .write(dir.path(), "srv");
    served.reload().unwrap();
    let second = served.current.read().unwrap().key.cert.clone();
    assert_ne!(first, second);
    std::fs::write(&key, "half written").unwrap();
    assert!(served.reload().is_err());
    assert_eq!(served.current.read().unwrap().key.cert, second);
    let _ = &served as &dyn rustls::server::ResolvesServerCert;
}
