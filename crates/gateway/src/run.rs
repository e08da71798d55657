//! `portcullis serve` and `portcullis keygen`: everything between a
//! configuration file and a listening gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis::SystemClock;
use portcullis_config::LoadedConfig;
use portcullis_core::Clock;
use portcullis_store::{
    EventKind, NewEvent, Op, PostgresOptions, PostgresStore, SqliteOptions, SqliteStore, Store,
};
use portcullis_token::{KeyRing, LEEWAY_SECS, SigningKey};

use crate::state::Gateway;

/// Why the gateway could not start. Every variant stops start-up: the
/// gateway never runs on a half-loaded configuration.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration has findings.
    #[error("the configuration has problems:\n{0}")]
    Config(#[from] portcullis_config::Findings),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(String),
    /// A signing key could not be read.
    #[error("signing key {path}: {why}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// After the shutdown signal, the last checkpoint or the ledger's close
    /// did not finish within [`SHUTDOWN_BOUND`].
    #[error("shutdown stalled: the ledger did not close within {0:?}")]
    ShutdownStalled(std::time::Duration),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Opens the store named by `store.url`, without the JSON Lines mirror (for
/// tools that only read the ledger: `audit verify`, `export`, `tail`).
pub async fn open_store(loaded: &LoadedConfig) -> Result<Arc<dyn Store>, RunError> {
    Ok(open_ledger(loaded, false).await?.store())
}

/// The ledger a gateway runs on: the embedded SQLite file, or PostgreSQL
/// shared by a cluster of replicas.
#[derive(Debug, Clone)]
pub enum Ledger {
    /// `sqlite://…`
    Sqlite(Arc<SqliteStore>),
    /// `postgres://…` (or `postgresql://…`)
    Postgres(Arc<PostgresStore>),
}

impl Ledger {
    /// The store behind the ledger.
    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Self::Sqlite(s) => s.clone(),
            Self::Postgres(p) => p.clone(),
        }
    }

    /// Flushes what is queued and stops the backend's tasks.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(s) => {
                s.close().await;
                if s.mirror_failures() > 0 {
                    tracing::warn!(
                        failures = s.mirror_failures(),
                        last_error = s.mirror_last_error().unwrap_or_default(),
                        "the audit JSON Lines mirror had write failures"
                    );
                }
            }
            Self::Postgres(p) => p.close().await,
        }
    }
}

/// Opens the ledger of `store.url`. With `serving` (a gateway that will
/// serve on it), SQLite's `audit.jsonl` mirror is opened too (PostgreSQL
/// has none: export or tail the log), and the SQLite file is locked for
/// this process alone ([`SqliteOptions::exclusive_serving`]).
pub async fn open_ledger(loaded: &LoadedConfig, serving: bool) -> Result<Ledger, RunError> {
    let mirror = serving;
    let url = &loaded.config.store.url;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        if mirror && loaded.config.audit.jsonl.is_some() {
            tracing::warn!(
                "audit.jsonl is ignored on PostgreSQL: ship the log with `portcullis audit tail` or `export`"
            );
        }
        let store = PostgresStore::connect(url, &PostgresOptions::default())
            .await
            .map_err(|e| RunError::Store(e.to_string()))?;
        return Ok(Ledger::Postgres(Arc::new(store)));
    }
    Ok(Ledger::Sqlite(open_sqlite(loaded, mirror)?))
}

/// Opens the SQLite ledger of `store.url`; with `serving`, also the
/// `audit.jsonl` mirror (resolved against the configuration's folder), and
/// with the file locked for this process alone.
pub fn open_sqlite(loaded: &LoadedConfig, serving: bool) -> Result<Arc<SqliteStore>, RunError> {
    let mirror = serving;
    let url = &loaded.config.store.url;
    let Some(path) = url.strip_prefix("sqlite://") else {
        return Err(RunError::Store(format!(
            "{} is not supported (use sqlite:// or postgres://)",
            url.split("://").next().unwrap_or("this scheme")
        )));
    };
    let path = loaded.resolve(path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| RunError::Store(format!("{}: {e}", dir.display())))?;
    }
    let options = SqliteOptions {
        jsonl_mirror: mirror
            .then(|| {
                loaded
                    .config
                    .audit
                    .jsonl
                    .as_deref()
                    .map(|p| loaded.resolve(p))
            })
            .flatten(),
        exclusive_serving: serving,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(&path, &options)
        .map_err(|e| RunError::Store(format!("{}: {e}", path.display())))?;
    Ok(Arc::new(store))
}

/// Reads the configured signing keys into a ring. Older keys verify until
/// every access token they could have signed has expired.
pub fn load_keys(loaded: &LoadedConfig) -> Result<KeyRing, RunError> {
    let mut keys = Vec::new();
    for name in &loaded.config.tokens.signing_key {
        let path = loaded.resolve(name);
        let text =
            zeroize::Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| RunError::Key {
                path: path.clone(),
                why: format!("{e} (create one with `portcullis keygen --out {name}`)"),
            })?);
        check_key_permissions(&path)?;
        let key = SigningKey::from_file_text(&text).map_err(|e| RunError::Key {
            path: path.clone(),
            why: e.to_string(),
        })?;
        keys.push(key);
    }
    let lifetime = loaded
        .config
        .tokens
        .access_ttl
        .as_secs()
        .max(crate::upstream::HOP_TTL_SECS);
    KeyRing::new(keys, lifetime).map_err(|e| RunError::Other(format!("signing keys: {e}")))
}

#[cfg(unix)]
fn check_key_permissions(path: &Path) -> Result<(), RunError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|e| RunError::Key {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(RunError::Key {
            path: path.to_path_buf(),
            why: format!(
                "readable by others (mode {:o}); run chmod 600",
                mode & 0o777
            ),
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_path: &Path) -> Result<(), RunError> {
    Ok(())
}

/// Writes a new signing key to `out` with mode 0600 and returns its `kid`.
/// Refuses to overwrite an existing file.
pub fn keygen(out: &Path) -> Result<String, RunError> {
    let now = SystemClock.now().as_secs();
    let key = SigningKey::generate(now).map_err(|e| RunError::Other(e.to_string()))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| RunError::Key {
            path: out.to_path_buf(),
            why: e.to_string(),
        })?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(out).map_err(|e| RunError::Key {
        path: out.to_path_buf(),
        why: e.to_string(),
    })?;
    std::io::Write::write_all(&mut file, key.to_file_text().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| RunError::Key {
            path: out.to_path_buf(),
            why: e.to_string(),
        })?;
    Ok(key.kid().to_owned())
}

/// Builds the gateway of the configuration at `config` (engine, store,
/// keys), and records `config.loaded` in the ledger.
pub async fn build(config: &Path) -> Result<(Arc<Gateway>, LoadedConfig, Ledger), RunError> {
    let loaded = LoadedConfig::load(config)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let engine = portcullis_core::build(&loaded, clock.clone())?;
    let ledger = open_ledger(&loaded, true).await?;
    let store: Arc<dyn Store> = ledger.store();
    let ring = load_keys(&loaded)?;
    let gateway = Gateway::new(&loaded, engine, store.clone(), ring, clock.clone())
        .map_err(|e| RunError::Other(e.to_string()))?;
    let mut event = NewEvent::new(clock.now(), EventKind::ConfigLoaded);
    event.detail = Some(format!(
        "{} ({} tools, {} agents, {} policies, signing key {}, leeway {LEEWAY_SECS}s)",
        config.display(),
        loaded.config.tools.len(),
        loaded.config.agents.len(),
        gateway.engine().policy_count(),
        gateway.ring.signing_kid(),
    ));
    // Through the gateway, so the commit is timed like every other.
    gateway
        .commit(vec![Op::Append(event)])
        .await
        .map_err(|e| RunError::Store(e.to_string()))?;
    let gateway = Arc::new(gateway);
    // A shared ledger: other replicas revoke tokens too. Their revocations
    // arrive by LISTEN/NOTIFY and clear this replica's cache of live tokens
    // (which is off until the listener runs).
    if let Ledger::Postgres(pg) = &ledger {
        let revocations = pg
            .listen_revocations()
            .await
            .map_err(|e| RunError::Store(e.to_string()))?;
        gateway.follow_revocations(revocations);
    }
    gateway.start_credential_sweeper(crate::pgrole::SWEEP_EVERY);
    // Connect to the MCP upstreams (each tries once before serving; a slow
    // or dead one keeps retrying in the background).
    gateway.start_upstreams(UPSTREAM_FIRST_WAIT).await;
    Ok((gateway, loaded, ledger))
}

/// How long `serve` waits for each upstream's first connection attempt.
const UPSTREAM_FIRST_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs `portcullis serve --config F` until Ctrl-C or SIGTERM.
pub async fn serve_config(config: &Path) -> Result<(), RunError> {
    let (gateway, loaded, ledger) = build(config).await?;
    let listen = &loaded.config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| RunError::Other(format!("cannot listen on {listen}: {e}")))?;
    let tls = match &loaded.config.server.tls {
        None => None,
        Some(t) => {
            let cert = std::sync::Arc::new(
                portcullis_tls::ReloadingCert::load(
                    &loaded.resolve(&t.cert),
                    &loaded.resolve(&t.key),
                )
                .map_err(|e| RunError::Other(format!("server.tls: {e}")))?,
            );
            let config = portcullis_tls::server_config(cert.clone(), &crate::server::ALPN)
                .map_err(|e| RunError::Other(format!("server.tls: {e}")))?;
            tokio::spawn(reload_certificate(cert));
            Some(tokio_rustls::TlsAcceptor::from(config))
        }
    };
    tracing::info!(
        %listen,
        tls = tls.is_some(),
        store = gateway.store().backend(),
        "portcullis serving"
    );
    // One shutdown signal, heard by both the server and the checkpointer,
    // which signs the chain's head one last time on the way out.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let audit = &loaded.config.audit;
    let checkpoints = tokio::spawn(crate::audit::run_checkpoints(
        gateway.clone(),
        audit.checkpoint_every,
        audit.checkpoint_interval.to_std(),
        wait_for(stop_rx.clone()),
    ));
    let tiering = tokio::spawn(crate::tiering::run_passes(
        gateway.clone(),
        crate::tiering::Tiers::from_config(&loaded),
        wait_for(stop_rx.clone()),
    ));
    let refusals = tokio::spawn(crate::refusals::run_flushes(
        gateway.clone(),
        wait_for(stop_rx.clone()),
    ));
    let served =
        crate::server::serve_with(listener, crate::server::router(gateway), tls, async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        })
        .await;
    // The last checkpoint first, then flush the ledger (and bring SQLite's
    // JSON Lines mirror in sync), all within SHUTDOWN_BOUND: a store that
    // hangs (a frozen PostgreSQL, a stalled close) must not hold the
    // process, and with it a restart or a deployment, forever.
    let finish = async {
        // The counted unauthenticated refusals are written on the way out
        // too, before the ledger closes.
        let _ = refusals.await;
        let _ = checkpoints.await;
        let _ = tiering.await;
        ledger.close().await;
    };
    if tokio::time::timeout(SHUTDOWN_BOUND, finish).await.is_err() {
        tracing::error!(
            bound_secs = SHUTDOWN_BOUND.as_secs(),
            "shutdown: the last checkpoint or the ledger's close did not finish in time; \
             exiting without it (records not yet committed are not acknowledged)"
        );
        return Err(RunError::ShutdownStalled(SHUTDOWN_BOUND));
    }
    served.map_err(|e| RunError::Other(e.to_string()))
}

/// How often the listener's certificate files are looked at for a change.
pub const CERT_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Reloads the listener's certificate on SIGHUP and whenever its files
/// change (checked every [`CERT_POLL`]). New connections get the new pair;
/// established ones keep theirs. A pair that fails its checks is logged and
/// the old one stays.
async fn reload_certificate(cert: std::sync::Arc<portcullis_tls::ReloadingCert>) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut poll = tokio::time::interval(CERT_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<bool>();
        let result = tokio::select! {
            true = signalled => cert.reload().map(|()| true),
            _ = poll.tick() => cert.reload_if_changed(),
        };
        match result {
            Ok(true) => {
                tracing::info!(cert = %cert.cert_path().display(), "listener certificate reloaded")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "listener certificate not reloaded; the previous one is still served")
            }
        }
    }
}

/// How long `serve` waits, after SIGTERM or Ctrl-C, for its last checkpoint
/// and for the ledger to close before it gives up and exits non-zero.
pub const SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

async fn wait_for(mut stop: tokio::sync::watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
