//! The listener's certificate, reloadable while connections stay up.
//!
//! A [`ReloadingCert`] is rustls' certificate resolver: every handshake
//! takes the current [`CertifiedKey`] (an `Arc` clone under a read lock), so
//! a reload changes what *new* connections are shown and never touches an
//! established one. [`ReloadingCert::reload`] reads both files again and
//! swaps only when the new pair passes every check of
//! [`crate::certified_key`]; a bad pair (half-written, mismatched, expired)
//! keeps the old one serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::TlsError;

/// The listener's certificate and key files and the pair now served.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    pub(crate) current: RwLock<Served>,
}

#[derive(Debug)]
pub(crate) struct Served {
    pub(crate) key: Arc<CertifiedKey>,
    /// The files' (modification time, length) when last read.
    stamp: Option<Stamp>,
}

type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(cert: &Path, key: &Path) -> Option<Stamp> {
    let one = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    Some([one(cert)?, one(key)?])
}

impl ReloadingCert {
    /// Loads the pair, checked as [`crate::certified_key`] does.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamp = stamp(cert, key);
        let loaded = crate::certified_key(cert, key, SystemTime::now())?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Served {
                key: Arc::new(loaded),
                stamp,
            }),
        })
    }

    /// Reads the files again and serves the new pair from the next
    /// handshake on. On an error the old pair stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamp(&self.cert, &self.key);
        let loaded = crate::certified_key(&self.cert, &self.key, SystemTime::now())?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Served {
            key: Arc::new(loaded),
            stamp,
        };
        Ok(())
    }

    /// Reloads when either file's modification time or length changed since
    /// the last read. `Ok(true)`: a new pair is served.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.cert, &self.key);
        let last = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .stamp;
        if now.is_none() || now == last {
            return Ok(false);
        }
        match self.reload() {
            Ok(()) => Ok(true),
            Err(e) => {
                // Remember the stamp so that one bad pair is reported once,
                // not at every poll; the next change is tried again.
                self.current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .stamp = now;
                Err(e)
            }
        }
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .key
                .clone(),
        )
    }
}

/// A server configuration that shows `cert`'s current pair and offers
/// `alpn` (e.g. `h2`, `http/1.1`) in order of preference.
pub fn server_config(
    cert: Arc<ReloadingCert>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
