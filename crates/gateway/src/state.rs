//! The gateway's shared state, and the small operations every handler
//! builds on: minting tokens with their ledger records, and turning a
//! decision into audit events.

use std::collections::HashMap;
use std::sync::Arc;

use portcullis_config::{LoadedConfig, Role};
use portcullis_core::{Clock, Decision, Engine, Task, Timestamp};
use portcullis_store::{
    Committed, EventKind, NewEvent, Op, RefreshRecord, Store, StoreError, TokenKind, TokenRecord,
};
use portcullis_token::{Claims, KeyRing, VerifyCache};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::alerts::{Alert, Alerts, QUEUE_CAPACITY, RetryPolicy};
use crate::credential::{CredentialProvider, JwtProvider};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// Most verified tokens kept in the signature cache.
const VERIFY_CACHE_CAPACITY: usize = 65_536;

/// Most access tokens remembered as live.
const LIVE_CACHE_CAPACITY: usize = 65_536;

/// Access tokens the ledger has confirmed live, so the per-call revocation
/// check need not ask the ledger again.
///
/// INVARIANT: enabled only when every revocation reaches this cache in
/// time. With the embedded SQLite store this process is the only writer:
/// every revocation goes through [`Gateway::commit`], which drops the
/// revoked `jti`s as soon as the revocation is durable, and entries live
/// until the token expires. With a shared store (replicas on PostgreSQL)
/// other replicas' revocations arrive by LISTEN/NOTIFY
/// ([`Gateway::follow_revocations`]), and each entry is also trusted for
/// at most [`SHARED_LIVE_MAX_AGE`]: a lost notification can leave a
/// revoked token usable here for no longer than that, and re-confirming an
/// entry needs the ledger (unreachable: denied).
#[derive(Debug)]
pub(crate) struct LiveTokens {
    /// On for a ledger only this process writes (SQLite), or once a shared
    /// ledger's revocations are followed (`Gateway::follow_revocations`).
    enabled: std::sync::atomic::AtomicBool,
    /// How long an entry is trusted; `None`: until the token expires.
    max_age: std::sync::Mutex<Option<std::time::Duration>>,
    map: std::sync::Mutex<HashMap<String, (u64, std::time::Instant)>>,
}

/// How long a shared ledger's live-token entry is trusted without asking
/// the ledger again (well under the one-second propagation bound).
pub(crate) const SHARED_LIVE_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(500);

impl LiveTokens {
    fn new(enabled: bool) -> Self {
        Self {
            enabled: std::sync::atomic::AtomicBool::new(enabled),
            max_age: std::sync::Mutex::new(None),
            map: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Bounds how long an entry is trusted.
    pub(crate) fn set_max_age(&self, age: Option<std::time::Duration>) {
        *self
            .max_age
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = age;
    }

    fn on(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Turns the cache on or off; off also forgets everything.
    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, std::sync::atomic::Ordering::SeqCst);
        if !on {
            self.lock().clear();
        }
    }

    /// Forgets everything (revocations may have been missed).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, std::time::Instant)>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True when `jti` is known live (its expiry is checked by the caller).
    pub(crate) fn contains(&self, jti: &str) -> bool {
        if !self.on() {
            return false;
        }
        let max_age = *self
            .max_age
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.lock().get(jti) {
            None => false,
            Some((_, at)) => max_age.is_none_or(|m| at.elapsed() < m),
        }
    }

    /// Remembers `jti` as live until `exp` (unix seconds).
    pub(crate) fn insert(&self, jti: &str, exp: u64, now: u64) {
        if !self.on() {
            return;
        }
        let mut map = self.lock();
        if map.len() >= LIVE_CACHE_CAPACITY {
            map.retain(|_, (e, _)| *e >= now);
            if map.len() >= LIVE_CACHE_CAPACITY {
                map.clear();
            }
        }
        map.insert(jti.to_owned(), (exp, std::time::Instant::now()));
    }

    /// Forgets revoked tokens.
    pub(crate) fn forget<'a>(&self, jtis: impl IntoIterator<Item = &'a String>) {
        if !self.on() {
            return;
        }
        let mut map = self.lock();
        for jti in jtis {
            map.remove(jti);
        }
    }
}

/// How an upstream is reached and what credential it gets.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamEntry {
    pub upstream: Arc<dyn Upstream>,
    pub provider: Arc<dyn CredentialProvider>,
    /// Open to RFC 8693 token exchange (`token_exchange` in its config).
    pub token_exchange: bool,
}

/// A configured admin.
#[derive(Debug, Clone)]
pub(crate) struct AdminEntry {
    pub name: String,
    pub roles: Vec<Role>,
    pub token_sha256: String,
}

/// Lifetimes, in milliseconds, and other settings read from the config.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub issuer: String,
    pub max_body_bytes: usize,
    pub access_ttl_ms: u64,
    pub refresh_idle_ms: u64,
    pub task_max_ms: u64,
    pub redact: Vec<String>,
    pub elevation_ttl_ms: u64,
    pub sample_low_risk: f64,
    pub durable_results: bool,
}

/// Most attempts at a compare-and-swap task update before giving up.
pub(crate) const CAS_ATTEMPTS: usize = 8;

/// Why one attempt at a compare-and-swap task update did not finish.
#[derive(Debug)]
pub(crate) enum CommitError {
    /// Another request changed the task first: load it and decide again.
    Lost,
    /// Anything else: the answer.
    Api(ApiError),
}

impl From<ApiError> for CommitError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<StoreError> for CommitError {
    /// A lost compare-and-swap is [`CommitError::Lost`]; any other ledger
    /// error fails closed (503).
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(_) => Self::Lost,
            e => Self::Api(ApiError::unavailable(e.to_string())),
        }
    }
}

/// Everything a request handler needs. Shared behind an `Arc`.
pub struct Gateway {
    pub(crate) engine: Engine,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) ring: KeyRing,
    pub(crate) cache: VerifyCache,
    pub(crate) upstreams: HashMap<String, UpstreamEntry>,
    pub(crate) admins: Vec<AdminEntry>,
    pub(crate) bootstrap: Vec<(String, String)>,
    pub(crate) settings: Settings,
    pub(crate) metrics: Metrics,
    pub(crate) live: LiveTokens,
    /// Per-task locks: calls of one task are decided one at a time in this
    /// process (see [`crate::task_locks`]).
    pub(crate) task_locks: crate::task_locks::TaskLocks,
    /// Per-hop tokens for token exchange, whatever an upstream's own kind.
    pub(crate) hop_jwt: JwtProvider,
    /// The alert webhook (`audit.alert_webhook`), if configured.
    pub(crate) alerts: Alerts,
    /// The MCP upstreams, for their supervisors.
    pub(crate) mcp: Vec<Arc<crate::federation::McpUpstream>>,
    /// The current definitions of federated tools, against their pins.
    pub(crate) pins: crate::federation::PinBook,
    /// Live legacy-era `/mcp` sessions.
    pub(crate) mcp_sessions: crate::mcp::Sessions,
    /// (agent, tool) pairs known to have been used (for `new_tool`).
    pub(crate) tool_uses: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    /// The checkpoint witness (`audit.witness_dir`), if configured.
    pub(crate) witness: Option<crate::witness::Witness>,
    /// Unauthenticated refusals, counted per source.
    pub(crate) refusals: Arc<crate::refusals::RefusalBook>,
    /// Calls held for a person's approval (`[approval] hold`).
    pub(crate) holds: crate::hold::Holds,
    /// Open `GET /v1/events` streams (bounded).
    pub(crate) event_streams: Arc<tokio::sync::Semaphore>,
    /// The web console's sessions, templates and last chain check.
    pub(crate) console: crate::console::Console,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("engine", &self.engine)
            .field("store", &self.store.backend())
            .field("upstreams", &self.upstreams.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The checkpoint witness of `audit.witness_dir` (resolved against the
/// configuration's folder), opened; `None` when the key is not set.
pub fn open_witness(loaded: &LoadedConfig) -> Result<Option<crate::witness::Witness>, SetupError> {
    loaded
        .config
        .audit
        .witness_dir
        .as_deref()
        .map(|dir| {
            crate::witness::Witness::open(&loaded.resolve(dir))
                .map_err(|e| SetupError(format!("audit.witness_dir: {e}")))
        })
        .transpose()
}

/// The first elevation id (`elv_…`) named in `text`.
fn elevation_named(text: &str) -> Option<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .find(|w| w.starts_with("elv_") && w.len() > 4)
}

/// Why the gateway could not be assembled.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(pub String);

impl Gateway {
    /// Assembles a gateway. Every configured upstream starts disconnected
    /// (calls are `upstream_unavailable`) until a transport is attached with
    /// [`Gateway::with_upstream`].
    pub fn new(
        loaded: &LoadedConfig,
        engine: Engine,
        store: Arc<dyn Store>,
        ring: KeyRing,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SetupError> {
        let cfg = &loaded.config;
        let single_writer = store.backend() == "sqlite";
        let mut upstreams = HashMap::new();
        let mut mcp = Vec::new();
        let hop_jwt = JwtProvider::new(ring.clone(), cfg.server.issuer.clone());
        for up in &cfg.upstreams {
            let provider = crate::credential::from_config(loaded, up, &hop_jwt)?;
            let mut client = crate::federation::McpUpstream::new(
                &up.name,
                crate::federation::transport_of(up, &loaded.base_dir),
            );
            if up.session == portcullis_config::SessionScope::PerTask {
                let max = up
                    .max_task_sessions
                    .unwrap_or(portcullis_config::DEFAULT_MAX_TASK_SESSIONS);
                client = client.with_task_sessions(usize::try_from(max).unwrap_or(usize::MAX));
            }
            let client = Arc::new(client);
            mcp.push(client.clone());
            let upstream: Arc<dyn Upstream> = client;
            upstreams.insert(
                up.name.clone(),
                UpstreamEntry {
                    upstream,
                    provider,
                    token_exchange: up.token_exchange,
                },
            );
        }
        let t = &cfg.tokens;
        let settings = Settings {
            issuer: cfg.server.issuer.clone(),
            max_body_bytes: usize::try_from(cfg.server.max_body_bytes).unwrap_or(usize::MAX),
            access_ttl_ms: t.access_ttl.as_millis(),
            refresh_idle_ms: t.refresh_idle_ttl.as_millis(),
            task_max_ms: t.task_max_lifetime.as_millis(),
            redact: cfg.audit.redact.iter().map(|k| k.to_lowercase()).collect(),
            elevation_ttl_ms: cfg.elevation.ttl.as_millis(),
            sample_low_risk: cfg.audit.sample_low_risk,
            durable_results: cfg.audit.durable_results,
        };
        let metrics = Metrics::default();
        // A configured witness that cannot be opened stops the start-up: it
        // is never silently off.
        let witness = open_witness(loaded)?;
        // A webhook CA file that cannot be read stops the start-up.
        let alerts = match &cfg.audit.alert_webhook {
            Some(hook) => Alerts::with_tls(
                hook,
                QUEUE_CAPACITY,
                RetryPolicy::default(),
                metrics.alerts.clone(),
                &portcullis_tls::ClientTls {
                    ca_file: cfg.audit.alert_ca_file.as_ref().map(|f| loaded.resolve(f)),
                    ..Default::default()
                },
            )?,
            None => Alerts::disabled(metrics.alerts.clone()),
        };
        alerts.set_format(cfg.audit.alert_format);
        Ok(Self {
            engine,
            clock,
            store,
            ring,
            cache: VerifyCache::new(VERIFY_CACHE_CAPACITY),
            upstreams,
            admins: cfg
                .admins
                .iter()
                .map(|a| AdminEntry {
                    name: a.name.clone(),
                    roles: a.roles.clone(),
                    token_sha256: a.token_sha256.clone(),
                })
                .collect(),
            bootstrap: cfg
                .agents
                .iter()
                .filter_map(|a| a.bootstrap_sha256.clone().map(|h| (a.id.clone(), h)))
                .collect(),
            settings,
            metrics,
            live: LiveTokens::new(single_writer),
            task_locks: crate::task_locks::TaskLocks::default(),
            hop_jwt,
            alerts,
            mcp,
            pins: crate::federation::PinBook::default(),
            mcp_sessions: crate::mcp::Sessions::default(),
            tool_uses: std::sync::Mutex::default(),
            witness,
            refusals: Arc::default(),
            holds: crate::hold::Holds::new(&cfg.approval),
            event_streams: Arc::new(tokio::sync::Semaphore::new(crate::events::MAX_STREAMS)),
            console: crate::console::Console::new(cfg),
        })
    }

    /// Releases, off the request path, what the gateway holds for an
    /// ended task: what every upstream's credential provider issued for it
    /// (database roles), and its own upstream sessions (`per_task`).
    pub(crate) fn release_task(&self, task_id: &str) {
        let providers: Vec<Arc<dyn CredentialProvider>> = self
            .upstreams
            .values()
            .map(|e| e.provider.clone())
            .collect();
        let mcp = self.mcp.clone();
        let task_id = task_id.to_owned();
        tokio::spawn(async move {
            for p in providers {
                p.release(&task_id).await;
            }
            for up in mcp {
                up.end_task_session(&task_id).await;
            }
        });
    }

    /// Periodically asks every credential provider to revoke what it issued
    /// for tasks no longer active (roles orphaned by a crash or a timeout),
    /// and closes the `per_task` upstream sessions of such tasks.
    pub fn start_credential_sweeper(self: &Arc<Self>, every: std::time::Duration) {
        let gw = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(g) = gw.upgrade() else { return };
                let providers: Vec<Arc<dyn CredentialProvider>> =
                    g.upstreams.values().map(|e| e.provider.clone()).collect();
                let store = g.store.clone();
                let mcp = g.mcp.clone();
                let now = g.now();
                drop(g);
                for p in providers {
                    p.sweep(store.as_ref()).await;
                }
                // Task sessions of tasks that ended without this replica
                // hearing of it (another replica, a timeout).
                for up in mcp {
                    for task_id in up.task_session_ids() {
                        let ended = match store.task(&task_id).await {
                            Ok(Some(r)) => {
                                r.task.status != portcullis_core::TaskStatus::Active
                                    || r.deadline <= now
                            }
                            Ok(None) => true,
                            Err(_) => false,
                        };
                        if ended {
                            up.end_task_session(&task_id).await;
                        }
                    }
                }
                tokio::time::sleep(every).await;
            }
        });
    }

    /// Follows a shared ledger's revocations (PostgreSQL LISTEN/NOTIFY):
    /// each revoked jti leaves the cache of live tokens at once, a possible
    /// gap clears it, and a closed feed turns the cache off (every token is
    /// then checked in the ledger again). The cache is on only while the
    /// feed runs.
    pub fn follow_revocations(
        self: &Arc<Self>,
        mut feed: tokio::sync::mpsc::Receiver<portcullis_store::Revocation>,
    ) {
        self.live.set_max_age(Some(SHARED_LIVE_MAX_AGE));
        self.live.set_enabled(true);
        let gw = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(event) = feed.recv().await {
                let Some(gw) = gw.upgrade() else { return };
                match event {
                    portcullis_store::Revocation::Token(jti) => gw.live.forget(&[jti]),
                    portcullis_store::Revocation::Resync => gw.live.clear(),
                }
            }
            if let Some(gw) = gw.upgrade() {
                tracing::warn!("revocation feed closed: checking every token in the ledger");
                gw.live.set_enabled(false);
            }
        });
    }

    /// Attaches the transport of upstream `name`.
    pub fn with_upstream(
        mut self,
        name: &str,
        upstream: Arc<dyn Upstream>,
    ) -> Result<Self, SetupError> {
        let entry = self
            .upstreams
            .get_mut(name)
            .ok_or_else(|| SetupError(format!("no upstream {name:?} in the configuration")))?;
        entry.upstream = upstream;
        // Replaced by another transport: no MCP supervisor for it.
        self.mcp.retain(|m| m.name() != name);
        Ok(self)
    }

    /// Sets how alert deliveries are retried (the default: 5 attempts of
    /// 5 s, backoff from 0.5 s). Takes effect only before the first alert.
    #[must_use]
    pub fn with_alert_policy(self, policy: RetryPolicy) -> Self {
        self.alerts.set_policy(policy);
        self
    }

    /// Queues `alert` for the webhook; never waits, never fails (see
    /// [`crate::alerts`]). A no-op when no webhook is configured.
    pub fn alert(&self, alert: Alert) {
        // A pending approval links to its place in the console.
        let url = (alert.kind == crate::elevations::ELEVATION_REQUESTED)
            .then(|| alert.detail.as_deref().and_then(elevation_named))
            .flatten()
            .map(|id| crate::hold::approval_url(&self.settings.issuer, id));
        self.alerts.send_linked(alert, url);
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The ledger.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Commits `ops` to the ledger; the tokens the batch revoked stop
    /// counting as live at once.
    pub(crate) async fn commit(&self, ops: Vec<Op>) -> Result<Committed, StoreError> {
        self.commit_after(ops, None).await
    }

    /// [`Gateway::commit`] of a batch planned on the queued batch `after`
    /// ([`Store::enqueue_after`]): refused if that one was not committed.
    pub(crate) async fn commit_after(
        &self,
        ops: Vec<Op>,
        after: Option<portcullis_store::Ticket>,
    ) -> Result<Committed, StoreError> {
        let started = std::time::Instant::now();
        let done = match after {
            None => self.store.commit(ops).await,
            Some(_) => match self.store.enqueue_after(ops, after).await {
                Ok(queued) => queued.pending.await,
                Err(e) => Err(e),
            },
        };
        self.settle(started, done)
    }

    /// What follows a commit started at `started`: its latency counted,
    /// and the tokens it revoked forgotten by the cache of live tokens.
    pub(crate) fn settle(
        &self,
        started: std::time::Instant,
        done: Result<Committed, StoreError>,
    ) -> Result<Committed, StoreError> {
        self.metrics.commit_latency.observe(started.elapsed());
        let done = done?;
        self.live.forget(&done.revoked);
        self.metrics.tokens(
            crate::metrics::TokenEvent::Revoked,
            u64::try_from(done.revoked.len()).unwrap_or(u64::MAX),
        );
        Ok(done)
    }

    /// The one retry loop of every compare-and-swap task update: runs
    /// `attempt` (load the task, decide, commit) again while its commit
    /// loses the race to another request ([`CommitError::Lost`]), at most
    /// [`CAS_ATTEMPTS`] times, then answers 503.
    pub(crate) async fn retry_on_conflict<T, F>(
        &self,
        mut attempt: impl FnMut() -> F,
    ) -> Result<T, ApiError>
    where
        F: std::future::Future<Output = Result<T, CommitError>>,
    {
        for _ in 0..CAS_ATTEMPTS {
            match attempt().await {
                Ok(done) => return Ok(done),
                Err(CommitError::Lost) => {}
                Err(CommitError::Api(e)) => return Err(e),
            }
        }
        Err(ApiError::unavailable(
            "task is changing too fast; try again",
        ))
    }

    /// Records a forwarded call's outcome (`call.completed`). With
    /// `audit.durable_results` it is durable on return. Otherwise it is in
    /// the ledger's queue on return — behind the call's write-ahead record,
    /// which is durable already — and becomes durable with the next group
    /// commit: the answer does not wait for a second fsync. A commit that
    /// fails after the answer left is logged; the write-ahead record
    /// stands (docs/operations.md, "Crash windows").
    pub(crate) async fn record_outcome(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if self.settings.durable_results {
            return self.commit(ops).await.map(|_| ());
        }
        let pending = self.store.enqueue(ops).await?;
        tokio::spawn(async move {
            if let Err(e) = pending.await {
                tracing::error!(error = %e, "a call's completion record was not committed");
            }
        });
        Ok(())
    }

    /// Mints an access token for `task`, scoped to `scope`, expiring at
    /// the access TTL or the task's deadline, whichever is first. Returns
    /// the token, its lifetime in seconds, and the ops that record it.
    pub(crate) fn mint_access(
        &self,
        task: &Task,
        scope: &[String],
        deadline: Timestamp,
        now: Timestamp,
    ) -> Result<(String, u64, Vec<Op>), ApiError> {
        let jti = portcullis_token::random_id("at_").map_err(internal)?;
        let expires = Timestamp(
            now.0
                .saturating_add(self.settings.access_ttl_ms)
                .min(deadline.0),
        );
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            sub: task.agent_id.clone(),
            aud: self.settings.issuer.clone(),
            exp: expires.as_secs(),
            iat: now.as_secs(),
            nbf: now.as_secs(),
            jti: jti.clone(),
            client_id: task.agent_id.clone(),
            task_id: task.id.clone(),
            agent_type: task.agent_type.clone(),
            scope: scope.join(" "),
        };
        let token = portcullis_token::mint(&self.ring, &claims).map_err(internal)?;
        let record = TokenRecord {
            jti: jti.clone(),
            task_id: task.id.clone(),
            agent_id: task.agent_id.clone(),
            kind: TokenKind::Access,
            issued_at: now,
            expires_at: expires,
            revoked_at: None,
            revoke_reason: None,
        };
        let mut event = NewEvent::new(now, EventKind::TokenIssued);
        event.task_id = Some(task.id.clone());
        event.agent_id = Some(task.agent_id.clone());
        event.jti = Some(jti);
        event.detail = Some("access".to_owned());
        let ttl = expires.as_secs().saturating_sub(now.as_secs());
        Ok((token, ttl, vec![Op::InsertToken(record), Op::Append(event)]))
    }

    /// A new refresh token for `task` and the ops that record its hash.
    pub(crate) fn mint_refresh(
        &self,
        task: &Task,
        deadline: Timestamp,
        now: Timestamp,
    ) -> Result<(Zeroizing<String>, Vec<Op>), ApiError> {
        let token = Zeroizing::new(portcullis_token::random_token("prt_").map_err(internal)?);
        let record = RefreshRecord {
            hash: portcullis_token::sha256_hex(token.as_bytes()),
            task_id: task.id.clone(),
            agent_id: task.agent_id.clone(),
            issued_at: now,
            idle_expires_at: Timestamp(
                now.0
                    .saturating_add(self.settings.refresh_idle_ms)
                    .min(deadline.0),
            ),
            spent_at: None,
        };
        Ok((token, vec![Op::InsertRefresh(record)]))
    }

    /// The scope of a token minted for `task` in its current state: the
    /// tools of this phase and later ones that the task was granted.
    pub(crate) fn phase_scope(&self, task: &Task) -> Vec<String> {
        self.engine
            .phase_tools(&task.agent_type, &task.state)
            .unwrap_or_default()
            .into_iter()
            .filter(|t| task.tools.contains(*t))
            .map(str::to_owned)
            .collect()
    }

    /// The audit event of a decided call.
    pub(crate) fn call_event(
        &self,
        task: &Task,
        decision: &Decision,
        args: &Value,
        now: Timestamp,
    ) -> NewEvent {
        // Allowed low-risk calls of tasks outside the sample keep the
        // compact form: every field but the arguments. Denials, high-risk
        // calls and transitions are always kept whole.
        let low_risk = self
            .engine
            .tool(&decision.tool)
            .is_some_and(|t| t.risk == portcullis_config::Risk::Low);
        let sampled_out = decision.is_allowed()
            && low_risk
            && !in_sample(&task.id, self.settings.sample_low_risk);
        let kept = (!sampled_out).then(|| bounded(redact(args, &self.settings.redact)));
        let mut event = portcullis_store::records::use_event(task, decision, kept, now);
        if sampled_out {
            event.detail = Some("arguments not kept (audit.sample_low_risk)".to_owned());
        }
        event
    }
}

/// The hard end of a task: `task_max_lifetime` after it started.
pub(crate) fn deadline_of(task: &Task, task_max_ms: u64) -> Timestamp {
    task.started_at.plus_millis(task_max_ms)
}

/// Whether the full records of task `task_id` are in the sample of share
/// `rate` (0.0–1.0): a deterministic function of the task id (the first 8
/// bytes of its SHA-256), so a task is in or out for its whole life and
/// every replica agrees.
pub(crate) fn in_sample(task_id: &str, rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate <= 0.0 {
        return false;
    }
    let digest = portcullis_token::sha256_hex(task_id.as_bytes());
    let head = digest
        .get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    // Compare in the integer domain: head / 2^64 < rate.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "rate is in (0, 1), so rate * 2^64 is within u64"
    )]
    let threshold = (rate * 18_446_744_073_709_551_616.0) as u64;
    head < threshold
}

// What an audit record may hold of a call's arguments lives with the
// record format, so the embedded ledger applies the very same rules.
pub(crate) use portcullis_store::redact::{bounded, redact};

/// The digest a one-use approval is bound to: SHA-256 (hex) of the
/// canonical JSON of `args` redacted with `redact` — what the approver saw
/// (secrets they could not see are not part of it, and no digest of a
/// secret is ever stored).
pub(crate) fn args_digest(args: &Value, redact_words: &[String]) -> String {
    portcullis_token::sha256_hex(
        portcullis_store::canonical_json(&redact(args, redact_words)).as_bytes(),
    )
}

/// An internal failure: a denial with `internal_error`, never an allow
/// (its cause is logged, not answered: see [`ApiError::new`]).
pub(crate) fn internal(err: impl std::fmt::Display) -> ApiError {
    ApiError::denied(portcullis_core::Reason::InternalError, err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_store::redact::MAX_AUDIT_ARGS_BYTES;
    use serde_json::json;

    /// What an approval binds to: the arguments as the approver saw them.
    /// Key order does not matter; a visible value does; a redacted secret
    /// is not part of it (no digest of a secret is stored).
    #[test]
    fn an_args_digest_covers_what_the_approver_saw() {
        let keys = vec!["password".to_owned()];
        let digest = |v: serde_json::Value| args_digest(&v, &keys);
        let seen = digest(json!({ "table": "t", "rows": [1, 2], "password": "a" }));
        assert_eq!(seen.len(), 64);
        assert_eq!(
            seen,
            digest(json!({ "password": "b", "rows": [1, 2], "table": "t" }))
        );
        assert_ne!(
            seen,
            digest(json!({ "table": "t", "rows": [1, 2, 3], "password": "a" }))
        );
        assert_ne!(seen, digest(json!({ "table": "t", "rows": [1, 2] })));
    }

    #[test]
    fn redaction_reaches_every_depth_and_ignores_case() {
        let keys = vec!["password".to_owned(), "token".to_owned()];
        let args = json!({
            "Password": "a", "db": { "TOKEN": "b", "rows": [{ "password": "c", "x": 1 }] }, "keep": "d"
        });
        let out = redact(&args, &keys);
        let text = out.to_string();
        for secret in ["\"a\"", "\"b\"", "\"c\""] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(out["keep"], "d");
        assert_eq!(out["db"]["rows"][0]["x"], 1);
    }

    /// Regression: only exact key names were redacted, so `db_password`
    /// and `api_token` went into the audit log in clear, as did the
    /// password inside a connection URL under any key.
    #[test]
    fn redaction_matches_words_inside_keys_and_scrubs_url_userinfo() {
        let keys = vec!["password".to_owned(), "token".to_owned()];
        let args = json!({
            "db_password": "p1",
            "API_Token": "t1",
            "nested": [{ "old_passwordHash": "p2" }],
            "dsn": "postgres://admin:p3@db.internal:5432/x?sslmode=require",
            "text": "see https://u:p4@example.test/a and ftp://anon@h/ and http://h/p@q",
            "plain": "no url here: a@b",
            "password": "p5",
            "keep": "ok"
        });
        let out = redact(&args, &keys);
        let text = out.to_string();
        for secret in ["p1", "t1", "p2", "p3", "p4", "p5", "admin:", "anon@"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(
            out["dsn"],
            "postgres://[redacted]@db.internal:5432/x?sslmode=require"
        );
        assert_eq!(
            out["text"],
            "see https://[redacted]@example.test/a and ftp://[redacted]@h/ and http://h/p@q"
        );
        assert_eq!(out["plain"], "no url here: a@b");
        assert_eq!(out["keep"], "ok");
    }

    #[test]
    fn sampling_is_deterministic_and_close_to_the_rate() {
        assert!(in_sample("any", 1.0));
        assert!(!in_sample("any", 0.0));
        let kept = (0..10_000)
            .filter(|i| in_sample(&format!("task_{i}"), 0.25))
            .count();
        assert!((2_200..2_800).contains(&kept), "{kept}");
        for i in 0..100 {
            let id = format!("task_{i}");
            assert_eq!(in_sample(&id, 0.5), in_sample(&id, 0.5));
        }
    }

    #[test]
    fn large_arguments_become_a_digest_and_a_prefix() {
        let small = json!({ "sql": "select 1" });
        assert_eq!(bounded(small.clone()), small);
        let big = json!({ "blob": "é".repeat(MAX_AUDIT_ARGS_BYTES) });
        let text = big.to_string();
        let out = bounded(big);
        assert_eq!(out["bytes"], text.len());
        assert_eq!(out["sha256"], portcullis_token::sha256_hex(text.as_bytes()));
        let prefix = out["prefix"].as_str().unwrap();
        assert!(prefix.len() <= MAX_AUDIT_ARGS_BYTES && text.starts_with(prefix));
    }
}
