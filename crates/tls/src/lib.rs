//! TLS for Portcullis, in one place: every TLS connection the gateway makes
//! or accepts is configured here, so the choices below hold everywhere.
//!
//! - **rustls with the `ring` provider**, no OpenSSL and no `aws-lc` build.
//!   TLS 1.2 and 1.3, rustls' safe defaults (no renegotiation, no
//!   compression, no RC4/CBC-SHA1 suites).
//! - **Trust roots**: the operating system's store by default, read once by
//!   `rustls-native-certs` (which honours `SSL_CERT_FILE` and
//!   `SSL_CERT_DIR`). The system store is what operators already manage —
//!   a private CA added there is trusted here too — whereas a compiled-in
//!   bundle (`webpki-roots`) changes only with a new build. A `ca_file`
//!   *replaces* the system roots for that one connection (trust exactly
//!   that CA, as `curl --cacert` does), it never adds to them.
//! - **No switch to skip verification.** An upstream or webhook is verified
//!   (chain, validity, host name) or not connected to. The one exception is
//!   PostgreSQL's `sslmode=require`/`prefer`, whose libpq meaning is
//!   "encrypt, do not verify"; see [`postgres`].
//!
//! [`client_config`] builds a client configuration; [`ReloadingCert`] is the
//! listener's certificate, reloaded from its files while connections stay
//! up; [`check_identity`] and [`check_certificates`] are the checks
//! `portcullis check` runs on certificate files.
//!
//! Files are PEM. A certificate file holds the end-entity certificate first,
//! then any intermediates; a key file holds one PKCS#8, PKCS#1 (RSA) or SEC1
//! (EC) private key. Each file is read with a size bound
//! ([`MAX_PEM_BYTES`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

pub use rustls;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};

pub mod postgres;
pub(crate) mod server;
#[cfg(feature = "test-pki")]
pub mod testpki;

pub use server::{ReloadingCert, server_config};

/// Largest certificate or key file read, in bytes.
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// A TLS setting that cannot be used. Messages name files, never their
/// contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: cannot read: {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's words.
        why: String,
    },
    /// A certificate file with no certificate in it, or one that is not PEM.
    #[error("{path}: {why}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A key file with no usable key in it.
    #[error("{path}: {why}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A certificate outside its validity period.
    #[error("{path}: {why}")]
    Validity {
        /// The file.
        path: PathBuf,
        /// Expired or not yet valid, with the date.
        why: String,
    },
    /// The key is not the certificate's.
    #[error("{key}: the private key does not match the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every configuration uses: rustls' `ring`.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    // rustls deprecates `ring` for lacking post-quantum key exchange; it is
    // chosen anyway so that no C toolchain or cmake build (aws-lc) is
    // needed. Classical X25519/P-256 key exchange still applies.
    #[allow(deprecated, reason = "ring is the chosen provider, see above")]
    let ring = rustls::crypto::ring::default_provider;
    PROVIDER.get_or_init(|| Arc::new(ring())).clone()
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |why: String| TlsError::Read {
        path: path.to_path_buf(),
        why,
    };
    let file = std::fs::File::open(path).map_err(|e| read(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| read(e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(read(format!("larger than {MAX_PEM_BYTES} bytes")));
    }
    Ok(bytes)
}

/// The certificates of a PEM file, in order; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_bounded(path)?;
    let bad = |why: String| TlsError::Certificate {
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in the file".to_owned()));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_bounded(path)?;
    // The parser's error could quote the file; say only what kind of
    // problem it is.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Key {
        path: path.to_path_buf(),
        why: "no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file".to_owned(),
    })
}

/// The roots of a CA file: every certificate in it is a trust anchor.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Certificate {
            path: path.to_path_buf(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The operating system's trust roots, read once per process. Certificates
/// the platform store holds but rustls cannot parse are skipped, and
/// logged once.
pub fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system trust roots");
            }
            let mut roots = RootCertStore::empty();
            let (added, skipped) = roots.add_parsable_certificates(found.certs);
            if skipped > 0 {
                tracing::warn!(
                    added,
                    skipped,
                    "some system trust roots could not be parsed"
                );
            }
            if added == 0 {
                tracing::warn!("no system trust roots found: only a ca_file can verify servers");
            }
            Arc::new(roots)
        })
        .clone()
}

/// Where a client's trust and identity come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA certificates that replace the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for mutual TLS (with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// A verifying client configuration: `tls.ca_file`'s roots (else the
/// system's), the client identity when both files are given, and `alpn`
/// offered in order.
pub fn client_config(tls: &ClientTls, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match &tls.ca_file {
        Some(path) => Arc::new(load_roots(path)?),
        None => system_roots(),
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = load_certs(cert)?;
            let der = load_key(key)?;
            builder
                .with_client_auth_cert(chain, der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                    e => TlsError::Rustls(e),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client configuration that trusts no server: for a connector that
/// must have one but only ever carries plain `http://` (any TLS handshake
/// through it fails).
pub fn trusting_nothing() -> Result<Arc<ClientConfig>, TlsError> {
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    ))
}

/// A certificate chain and its key, checked: both readable, the key the
/// certificate's, the end-entity certificate valid at `now`.
pub fn certified_key(cert: &Path, key: &Path, now: SystemTime) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    check_validity(cert, &chain, now)?;
    let der = load_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|_| TlsError::Key {
            path: key.to_path_buf(),
            why: "the private key's algorithm is not supported".to_owned(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }),
        Err(e) => Err(TlsError::Certificate {
            path: cert.to_path_buf(),
            why: format!("not a usable certificate: {e}"),
        }),
    }
}

/// Every certificate of a chain is within its validity period at `now`.
fn check_validity(
    path: &Path,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<(), TlsError> {
    let now = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    };
    for (n, der) in chain.iter().enumerate() {
        let which = if n == 0 {
            "the certificate".to_owned()
        } else {
            format!("certificate {} of the chain", n + 1)
        };
        let (_, parsed) =
            x509_parser::parse_x509_certificate(der).map_err(|_| TlsError::Certificate {
                path: path.to_path_buf(),
                why: format!("{which} is not a valid X.509 certificate"),
            })?;
        let validity = parsed.validity();
        if now > validity.not_after.timestamp() {
            return Err(TlsError::Validity {
                path: path.to_path_buf(),
                why: format!("{which} expired on {}", validity.not_after),
            });
        }
        if now < validity.not_before.timestamp() {
            return Err(TlsError::Validity {
                path: path.to_path_buf(),
                why: format!("{which} is not valid before {}", validity.not_before),
            });
        }
    }
    Ok(())
}

/// The checks `portcullis check` runs on a certificate file alone (a CA
/// file, or a chain whose key is elsewhere): readable, PEM, every
/// certificate within its validity period.
pub fn check_certificates(path: &Path, now: SystemTime) -> Result<(), TlsError> {
    let chain = load_certs(path)?;
    check_validity(path, &chain, now)
}

/// The checks `portcullis check` runs on a certificate and its key: see
/// [`certified_key`].
pub fn check_identity(cert: &Path, key: &Path, now: SystemTime) -> Result<(), TlsError> {
    certified_key(cert, key, now).map(|_| ())
}

/// An error and its causes, outermost first: hyper's own text ("client
/// error (Connect)") hides the reason a TLS handshake failed (an unknown
/// issuer, an expired certificate, a wrong host name) in its sources.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    let mut depth = 0;
    while let Some(cause) = next {
        if depth == 8 {
            break;
        }
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = cause.source();
        depth += 1;
    }
    text
}

#[cfg(test)]
mod tests;
