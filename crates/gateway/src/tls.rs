//! The TLS files and settings a configuration names, checked as `serve`
//! would use them, for `portcullis check`: the core's checks are pure and
//! never read a file, so these run beside them (same findings, same
//! `file:line key: message` form).
//!
//! What is reported: a certificate, key or CA file that cannot be read or
//! holds no PEM certificate or key; a certificate outside its validity
//! period (expired or not yet valid); a key that is not its certificate's;
//! a PostgreSQL URL whose `sslmode` is unknown, or `verify-ca`/
//! `verify-full` without `sslrootcert`.

use std::path::Path;
use std::time::SystemTime;

use portcullis_config::{Finding, KeyPath, LoadedConfig};
use portcullis_tls::TlsError;
use portcullis_tls::postgres::{PgTls, RootCert};

/// Every TLS finding of `loaded`, judged at `now`.
pub fn findings(loaded: &LoadedConfig, now: SystemTime) -> Vec<Finding> {
    let cfg = &loaded.config;
    let mut out = Vec::new();
    let mut at = |path: &KeyPath, message: String| {
        out.push(Finding::new(&loaded.file, loaded.line(path), path, message));
    };
    let root = KeyPath::root;
    if let Some(tls) = &cfg.server.tls {
        let at_tls = root().key("server").key("tls");
        identity(
            &mut at,
            &at_tls,
            &loaded.resolve(&tls.cert),
            &loaded.resolve(&tls.key),
            now,
        );
    }
    for (i, up) in cfg.upstreams.iter().enumerate() {
        let at_up = root().key("upstreams").index(i);
        if let Some(url) = &up.credential.url {
            postgres(&mut at, &at_up.key("credential").key("url"), url, now);
        }
        // TLS keys on anything but an https upstream are the core's
        // finding already; their files are not read.
        if !up.url.as_deref().is_some_and(|u| u.starts_with("https://")) {
            continue;
        }
        if let Some(ca) = &up.ca_file {
            certificates(&mut at, &at_up.key("ca_file"), &loaded.resolve(ca), now);
        }
        if let (Some(cert), Some(key)) = (&up.client_cert, &up.client_key) {
            let (cert, key) = (loaded.resolve(cert), loaded.resolve(key));
            match portcullis_tls::check_identity(&cert, &key, now) {
                Ok(()) => {}
                Err(e) => {
                    let which = if matches!(e, TlsError::Key { .. } | TlsError::KeyMismatch { .. })
                    {
                        "client_key"
                    } else {
                        "client_cert"
                    };
                    at(&at_up.key(which), e.to_string());
                }
            }
        }
    }
    if cfg.store.url.starts_with("postgres") {
        postgres(
            &mut at,
            &root().key("store").key("url"),
            &cfg.store.url,
            now,
        );
    }
    if let Some(ca) = &cfg.audit.alert_ca_file {
        let at_ca = root().key("audit").key("alert_ca_file");
        if !cfg
            .audit
            .alert_webhook
            .as_deref()
            .is_some_and(|h| h.starts_with("https://"))
        {
            at(&at_ca, "needs an https:// alert_webhook".to_owned());
        }
        certificates(&mut at, &at_ca, &loaded.resolve(ca), now);
    }
    out
}

fn identity(
    at: &mut impl FnMut(&KeyPath, String),
    table: &KeyPath,
    cert: &Path,
    key: &Path,
    now: SystemTime,
) {
    if let Err(e) = portcullis_tls::check_identity(cert, key, now) {
        let which = if matches!(e, TlsError::Key { .. } | TlsError::KeyMismatch { .. }) {
            "key"
        } else {
            "cert"
        };
        at(&table.key(which), e.to_string());
    }
}

fn certificates(
    at: &mut impl FnMut(&KeyPath, String),
    path: &KeyPath,
    file: &Path,
    now: SystemTime,
) {
    if let Err(e) = portcullis_tls::check_certificates(file, now) {
        at(path, e.to_string());
    }
}

fn postgres(at: &mut impl FnMut(&KeyPath, String), path: &KeyPath, url: &str, now: SystemTime) {
    match PgTls::from_url(url) {
        Err(e) => at(path, e.to_string()),
        // Read as the connection reads it: relative to the working
        // directory, as libpq does.
        Ok((
            _,
            PgTls {
                root: Some(RootCert::File(file)),
                ..
            },
        )) => {
            if let Err(e) = portcullis_tls::check_certificates(&file, now) {
                at(path, format!("sslrootcert {e}"));
            }
        }
        Ok(_) => {}
    }
}
