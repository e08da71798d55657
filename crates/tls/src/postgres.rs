//! PostgreSQL's `sslmode` and `sslrootcert`, with libpq's meanings.
//!
//! tokio-postgres understands `sslmode=disable|prefer|require` only and has
//! no `sslrootcert`. [`PgTls::from_url`] takes both out of a
//! `postgres://` URL's query (leaving the rest for tokio-postgres) and says
//! what the connection must do:
//!
//! | `sslmode` | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (the default, as in libpq) | if the server offers it | not verified |
//! | `require` | always | not verified; with `sslrootcert`, verified as `verify-ca` (libpq does the same when a root file is given) |
//! | `verify-ca` | always | chain to `sslrootcert`'s roots; the host name is not checked |
//! | `verify-full` | always | chain and host name |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the
//! operating system's roots (as in libpq 16). `verify-ca` and `verify-full`
//! need it: libpq would read `~/.postgresql/root.crt`, a file the gateway's
//! operator may not know about, so here the root is always explicit.
//! `prefer` and `require` without a root encrypt against passive listening
//! only — an active attacker can present any certificate — which is exactly
//! libpq's meaning of those words; say `verify-full` to be safe against both.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use crate::TlsError;

/// `sslmode`, in libpq's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, unverified.
    #[default]
    Prefer,
    /// TLS, unverified unless a root is given.
    Require,
    /// TLS, chain verified, host name not.
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }
}

/// Where `sslrootcert` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// The operating system's roots (`sslrootcert=system`).
    System,
    /// A PEM file of CA certificates.
    File(PathBuf),
}

/// What a PostgreSQL URL asks of TLS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgTls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root: Option<RootCert>,
}

/// A URL `PgTls` cannot use; the message never repeats the URL (it may
/// hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

impl PgTls {
    /// Splits `sslmode` and `sslrootcert` off a `postgres://` or
    /// `postgresql://` URL: the URL for tokio-postgres (the other
    /// parameters untouched) and what they ask. A URL in another form is
    /// returned unchanged, with the default (`prefer`).
    pub fn from_url(url: &str) -> Result<(String, Self), UrlError> {
        let mut tls = Self::default();
        let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
            return Ok((url.to_owned(), tls));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => {
                    let value = percent_decode(value);
                    tls.mode = SslMode::parse(&value).ok_or_else(|| {
                        UrlError(format!(
                            "sslmode {value:?} is not one of disable, prefer, require, verify-ca, verify-full"
                        ))
                    })?;
                }
                "sslrootcert" => {
                    let value = percent_decode(value);
                    if value.is_empty() {
                        return Err(UrlError("sslrootcert is empty".to_owned()));
                    }
                    tls.root = Some(if value == "system" {
                        RootCert::System
                    } else {
                        RootCert::File(PathBuf::from(value))
                    });
                }
                _ => kept.push(pair),
            }
        }
        if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root.is_none() {
            return Err(UrlError(format!(
                "sslmode={} needs sslrootcert (a PEM file of CA certificates, or \"system\")",
                tls.mode.as_str()
            )));
        }
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((url, tls))
    }

    /// The rustls client configuration for this mode (`None` for
    /// `disable`).
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        let roots = match &self.root {
            None => None,
            Some(RootCert::System) => Some(crate::system_roots()),
            Some(RootCert::File(path)) => Some(Arc::new(crate::load_roots(path)?)),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, roots) {
            (SslMode::Disable, _) => return Ok(None),
            (SslMode::VerifyFull, Some(roots)) => {
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    crate::provider(),
                )
                .build()
                .map_err(|e| TlsError::Rustls(Error::General(e.to_string())))?
            }
            (SslMode::VerifyCa | SslMode::Require, Some(roots)) => Arc::new(ChainOnly { roots }),
            (SslMode::Prefer, _) | (SslMode::Require, None) => Arc::new(Unverified),
            // `from_url` refuses these; never connect unverified for them.
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(TlsError::Rustls(Error::General(
                    "verify-ca and verify-full need sslrootcert".to_owned(),
                )));
            }
        };
        let config = ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Some(Arc::new(config)))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |j: usize| {
            bytes
                .get(j)
                .and_then(|c| char::from(*c).to_digit(16))
                .and_then(|d| u8::try_from(d).ok())
        };
        match (b, hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn schemes() -> Vec<SignatureScheme> {
    crate::provider()
        .signature_verification_algorithms
        .supported_schemes()
}

fn tls12(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify_tls12_signature(
        message,
        cert,
        dss,
        &crate::provider().signature_verification_algorithms,
    )
}

fn tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    verify_tls13_signature(
        message,
        cert,
        dss,
        &crate::provider().signature_verification_algorithms,
    )
}

/// `verify-ca`: the chain must lead to a root and be valid now; the name
/// the server answers to is not checked.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            crate::provider().signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// `prefer` and `require` without a root: libpq encrypts and does not
/// verify. The handshake signature is still checked against the presented
/// certificate.
#[derive(Debug)]
struct Unverified;

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let (url, tls) = PgTls::from_url(
            "postgres://u:p@db:5432/x?connect_timeout=5&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(url, "postgres://u:p@db:5432/x?connect_timeout=5");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root, Some(RootCert::File("/etc/ca.pem".into())));
        let (url, tls) = PgTls::from_url("postgres://u@db/x").unwrap();
        assert_eq!(
            (url.as_str(), tls.mode),
            ("postgres://u@db/x", SslMode::Prefer)
        );
        let (_, tls) =
            PgTls::from_url("postgres://u@db/x?sslmode=verify-ca&sslrootcert=system").unwrap();
        assert_eq!(tls.root, Some(RootCert::System));
    }

    #[test]
    fn verify_modes_without_a_root_and_unknown_modes_are_refused() {
        let e = PgTls::from_url("postgres://u:secret@db/x?sslmode=verify-full").unwrap_err();
        assert!(e.to_string().contains("needs sslrootcert"), "{e}");
        assert!(!e.to_string().contains("secret"));
        assert!(PgTls::from_url("postgres://u@db/x?sslmode=allowish").is_err());
    }
}
