//! Federation: the configured MCP servers behind the gateway, and the pins
//! of their tool definitions.
//!
//! Each `[[upstreams]]` entry gets an [`McpUpstream`] and a supervisor task
//! ([`Gateway::start_upstreams`]) that connects (stdio child or Streamable
//! HTTP, either era — see `portcullis_mcp::client`), lists the tools and
//! reconciles them with the ledger's pins, then waits: a
//! `notifications/tools/list_changed` re-lists, a closed connection
//! reconnects with exponential backoff (0.25 s doubling to 30 s). While an
//! upstream is down its calls are `upstream_unavailable`.
//!
//! **Pinning.** Of every registered tool, the definition the upstream
//! advertises — `name`, `title`, `description`, `inputSchema`,
//! `outputSchema`, `annotations` — is hashed (SHA-256 of its canonical
//! JSON, the audit chain's canonical form). The first time a tool is seen,
//! the definition is pinned in the ledger (`approved_by = "first-use"`,
//! audited as `config.loaded`). Afterwards a different hash, or a tool the
//! upstream no longer advertises, blocks the tool
//! (`tool_definition_changed`, audited as `anomaly` and alerted once per
//! new definition) until an admin re-approves the new definition with
//! `portcullis drift --approve NAME`; a running gateway notices the
//! approval at the next call to the tool (the ledger is read at most once
//! per second per blocked tool). Tools an upstream advertises that are not
//! registered are not federated: the registry, not the upstream, decides
//! what exists.
//!
//! Tool descriptions and results are untrusted data: they are hashed,
//! stored and relayed, never interpreted.
//!
//! **Sessions.** By default every task's calls go through the supervisor's
//! one session (`session = "shared"`). With `session = "per_task"` each
//! task gets a session of its own, opened on its first call (while the
//! supervisor's session is up: it still lists and pins the tools) and
//! closed when the task ends, when the sweeper finds the task no longer
//! active, or — past `max_task_sessions` — when it is the least recently
//! used.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use portcullis_core::{PinStatus, Timestamp};
use portcullis_mcp::client::{CallExtras, ClientError, Session, SessionEvent, Transport};
use portcullis_store::{EventKind, NewEvent, Op, ToolPin};
use serde_json::{Map, Value, json};

use crate::alerts::Alert;
use crate::state::Gateway;
use crate::upstream::{HopCredential, Upstream, UpstreamCall, UpstreamError};

/// Shortest wait before reconnecting.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait before reconnecting.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a blocked tool's pin is re-read from the ledger.
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// Alert kind for a changed definition.
pub const TOOL_DEFINITION_CHANGED: &str = "tool_definition_changed";
/// `_meta` key carrying the per-hop credential to a stdio upstream (stdio
/// has no headers).
pub const STDIO_CREDENTIAL_META: &str = "io.portcullis/authorization";

/// The fields of a tool definition that are pinned.
pub const PINNED_FIELDS: &[&str] = &[
    "name",
    "title",
    "description",
    "inputSchema",
    "outputSchema",
    "annotations",
];

/// The pinned view of an advertised tool: only [`PINNED_FIELDS`].
pub fn pinned_view(tool: &Value) -> Value {
    let mut out = Map::new();
    for field in PINNED_FIELDS {
        if let Some(v) = tool.get(*field) {
            out.insert((*field).to_owned(), v.clone());
        }
    }
    Value::Object(out)
}

/// The hash of a pinned view: SHA-256 hex of its canonical JSON.
pub fn definition_hash(view: &Value) -> String {
    portcullis_token::sha256_hex(portcullis_store::canonical::canonical_json(view).as_bytes())
}

/// Which pinned fields differ between two views.
pub fn changed_fields(pinned: &Value, current: &Value) -> Vec<&'static str> {
    PINNED_FIELDS
        .iter()
        .copied()
        .filter(|f| pinned.get(*f) != current.get(*f))
        .collect()
}

/// One task's session with a `per_task` upstream: connected once (by the
/// first call that needs it), and when it was last used.
#[derive(Debug)]
struct TaskSlot {
    session: Arc<tokio::sync::OnceCell<Arc<Session>>>,
    used: u64,
}

/// The task sessions of a `per_task` upstream, at most `max`.
#[derive(Debug)]
struct TaskSessions {
    max: usize,
    open: HashMap<String, TaskSlot>,
    tick: u64,
}

impl TaskSessions {
    /// The slot of `task_id`, made (and the least recently used slot
    /// evicted, when full) if it has none or its session closed. Returns
    /// the slot's cell and the sessions to close.
    fn slot(
        &mut self,
        task_id: &str,
    ) -> (Arc<tokio::sync::OnceCell<Arc<Session>>>, Vec<Arc<Session>>) {
        self.tick = self.tick.saturating_add(1);
        let tick = self.tick;
        let mut to_close = Vec::new();
        if let Some(slot) = self.open.get_mut(task_id) {
            match slot.session.get() {
                Some(s) if s.closed().is_some() => {
                    to_close.push(s.clone());
                    self.open.remove(task_id);
                }
                _ => {
                    slot.used = tick;
                    return (slot.session.clone(), to_close);
                }
            }
        }
        while self.open.len() >= self.max {
            let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(slot) = self.open.remove(&oldest)
                && let Some(s) = slot.session.get()
            {
                to_close.push(s.clone());
            }
        }
        let cell = Arc::new(tokio::sync::OnceCell::new());
        self.open.insert(
            task_id.to_owned(),
            TaskSlot {
                session: cell.clone(),
                used: tick,
            },
        );
        (cell, to_close)
    }

    /// Forgets `task_id`'s slot if it still holds `cell`; its session, if
    /// any, to close.
    fn forget(
        &mut self,
        task_id: &str,
        cell: Option<&Arc<tokio::sync::OnceCell<Arc<Session>>>>,
    ) -> Option<Arc<Session>> {
        let same = match (self.open.get(task_id), cell) {
            (Some(slot), Some(cell)) => Arc::ptr_eq(&slot.session, cell),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !same {
            return None;
        }
        self.open
            .remove(task_id)
            .and_then(|slot| slot.session.get().cloned())
    }
}

/// One MCP server behind the gateway.
#[derive(Debug)]
pub struct McpUpstream {
    name: String,
    transport: Transport,
    session: RwLock<Option<Arc<Session>>>,
    /// `session = "per_task"`: each task's own session.
    task_sessions: Option<Mutex<TaskSessions>>,
    last_error: Mutex<Option<String>>,
    connected_once: tokio::sync::Notify,
    attempted: std::sync::atomic::AtomicBool,
}

impl McpUpstream {
    /// An upstream reached through `transport`; not connected until its
    /// supervisor runs.
    pub fn new(name: &str, transport: Transport) -> Self {
        Self {
            name: name.to_owned(),
            transport,
            session: RwLock::new(None),
            task_sessions: None,
            last_error: Mutex::new(None),
            connected_once: tokio::sync::Notify::new(),
            attempted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Gives each task a session of its own (`session = "per_task"`), at
    /// most `max` open at once.
    #[must_use]
    pub fn with_task_sessions(mut self, max: usize) -> Self {
        self.task_sessions = Some(Mutex::new(TaskSessions {
            max: max.max(1),
            open: HashMap::new(),
            tick: 0,
        }));
        self
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The session a call of `task_id` goes through: the shared one, or
    /// for a `per_task` upstream the task's own, connected on first use.
    /// Either way only while the shared session is up.
    async fn session_for(&self, task_id: &str) -> Result<Arc<Session>, UpstreamError> {
        let shared = self.session().ok_or_else(|| self.unavailable())?;
        let Some(sessions) = &self.task_sessions else {
            return Ok(shared);
        };
        let (cell, to_close) = sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .slot(task_id);
        for s in to_close {
            s.close().await;
        }
        let connected = cell
            .get_or_try_init(|| async {
                Session::connect(&self.name, &self.transport)
                    .await
                    .map(Arc::new)
            })
            .await;
        match connected {
            Ok(s) => Ok(s.clone()),
            Err(e) => {
                let stale = sessions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .forget(task_id, Some(&cell));
                if let Some(s) = stale {
                    s.close().await;
                }
                Err(UpstreamError::Unavailable(format!(
                    "upstream {}: opening the task's session: {e}",
                    self.name
                )))
            }
        }
    }

    /// Closes `task_id`'s own session, if it has one (a `per_task`
    /// upstream): its state at the server ends with the task.
    pub async fn end_task_session(&self, task_id: &str) {
        let Some(sessions) = &self.task_sessions else {
            return;
        };
        let session = sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(task_id, None);
        if let Some(s) = session {
            s.close().await;
        }
    }

    /// The tasks with a session of their own open.
    pub fn task_session_ids(&self) -> Vec<String> {
        self.task_sessions.as_ref().map_or_else(Vec::new, |s| {
            s.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .open
                .keys()
                .cloned()
                .collect()
        })
    }

    /// The live session, if connected.
    pub fn session(&self) -> Option<Arc<Session>> {
        self.session
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|s| s.closed().is_none())
    }

    fn set_session(&self, s: Option<Arc<Session>>) {
        *self.session.write().unwrap_or_else(PoisonError::into_inner) = s;
    }

    fn fail(&self, why: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(why);
    }

    fn unavailable(&self) -> UpstreamError {
        let why = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "not connected yet".to_owned());
        UpstreamError::Unavailable(format!("upstream {} is down: {why}", self.name))
    }

    fn mark_attempted(&self) {
        self.attempted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.connected_once.notify_waiters();
    }

    /// Waits until the supervisor's first connection attempt ended (either
    /// way), or `timeout`.
    pub async fn first_attempt(&self, timeout: Duration) {
        let wait = async {
            loop {
                let notified = self.connected_once.notified();
                if self.attempted.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }
}

/// The per-hop credential as the transport carries it.
fn extras(credential: &HopCredential) -> CallExtras {
    let mut extras = CallExtras::default();
    match credential {
        HopCredential::Jwt { token } => {
            let bearer = format!("Bearer {token}");
            extras
                .headers
                .push(("authorization".to_owned(), bearer.clone()));
            extras
                .meta
                .insert(STDIO_CREDENTIAL_META.to_owned(), Value::String(bearer));
        }
        HopCredential::Static { header, value } => {
            extras
                .headers
                .push((header.to_lowercase(), value.as_str().to_owned()));
            extras.meta.insert(
                STDIO_CREDENTIAL_META.to_owned(),
                json!({ header.to_lowercase(): value.as_str() }),
            );
        }
        HopCredential::None => {}
    }
    extras
}

#[async_trait]
impl Upstream for McpUpstream {
    async fn call(&self, call: UpstreamCall) -> Result<Value, UpstreamError> {
        let session = self.session_for(&call.task_id).await?;
        match session
            .call_tool(&call.tool, &call.arguments, &extras(&call.credential))
            .await
        {
            Ok(result) => Ok(result),
            // A JSON-RPC error from the server is the tool's answer, not an
            // outage: relay it as an error result.
            Err(ClientError::Server(e)) => Ok(json!({
                "content": [{ "type": "text", "text": format!("upstream error: {}", e.message) }],
                "isError": true,
            })),
            Err(e) => Err(UpstreamError::Unavailable(format!(
                "upstream {}: {e}",
                self.name
            ))),
        }
    }
}

/// The transport of a configured upstream. `command[0] == "portcullis"`
/// means this very binary (so `portcullis demo-server …` works without the
/// binary on `PATH`); the child runs in the configuration's folder.
pub fn transport_of(up: &portcullis_config::Upstream, base: &std::path::Path) -> Transport {
    match up.transport {
        portcullis_config::Transport::Stdio => {
            let mut command = up.command.clone();
            if command.first().map(String::as_str) == Some("portcullis")
                && let Ok(me) = std::env::current_exe()
                && let Some(first) = command.first_mut()
            {
                *first = me.display().to_string();
            }
            // `--config portcullis.toml` (a bare file name) leaves `base`
            // empty, and a child started in the directory "" fails with
            // ENOENT ("cannot start \"node\": No such file or directory"):
            // an empty base is the current directory, which the child
            // inherits anyway.
            let cwd = (!base.as_os_str().is_empty()).then(|| base.to_path_buf());
            Transport::Stdio {
                command,
                cwd,
                env: Vec::new(),
            }
        }
        portcullis_config::Transport::Http => {
            // Relative TLS files resolve from the configuration's folder.
            let path = |p: &Option<String>| p.as_ref().map(|p| base.join(p));
            Transport::Http {
                url: up.url.clone().unwrap_or_default(),
                options: portcullis_mcp::client::HttpOptions {
                    tls: portcullis_mcp::client::ClientTls {
                        ca_file: path(&up.ca_file),
                        client_cert: path(&up.client_cert),
                        client_key: path(&up.client_key),
                    },
                    ..Default::default()
                },
            }
        }
    }
}

/// What the gateway remembers of each federated tool's current definition.
#[derive(Debug, Default)]
pub(crate) struct PinBook {
    current: Mutex<HashMap<String, Current>>,
}

#[derive(Debug, Clone)]
struct Current {
    /// Hash of the advertised definition (`None`: not advertised).
    hash: Option<String>,
    view: Value,
    /// The hash last alerted about, so one change alerts once.
    alerted: Option<String>,
    blocked: bool,
    checked: Option<Instant>,
}

impl PinBook {
    /// What `tools/list` shows of `tool`: its advertised definition (an
    /// empty one when no upstream listing was seen), or `None` while the
    /// tool is blocked.
    pub(crate) fn listing(&self, tool: &str) -> Option<Value> {
        let book = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        match book.get(tool) {
            None => Some(Value::Object(Map::new())),
            Some(c) if c.blocked => None,
            Some(c) => Some(c.view.clone()),
        }
    }
}

impl Gateway {
    /// Spawns the supervisor of every MCP upstream and waits (up to
    /// `wait`) for each one's first connection attempt.
    pub async fn start_upstreams(self: &Arc<Self>, wait: Duration) {
        let ups: Vec<Arc<McpUpstream>> = self.mcp.clone();
        for up in &ups {
            tokio::spawn(supervise(self.clone(), up.clone()));
        }
        for up in &ups {
            up.first_attempt(wait).await;
        }
    }

    /// Compares what `upstream` advertises with the pins, pins first-seen
    /// tools, and tells the engine the status of each of its tools.
    pub(crate) async fn reconcile(&self, upstream: &str, advertised: &[Value]) {
        let now = self.now();
        let tools: Vec<(String, String)> = self
            .engine
            .tools()
            .filter(|t| t.upstream == upstream)
            .map(|t| (t.name.clone(), t.upstream_tool.clone()))
            .collect();
        for (tool, upstream_tool) in tools {
            let found = advertised
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some(upstream_tool.as_str()));
            let status = match found {
                None => self.advertised_none(&tool, upstream, now).await,
                Some(def) => {
                    self.advertised(&tool, upstream, &pinned_view(def), now)
                        .await
                }
            };
            self.engine.set_pin(&tool, status);
        }
    }

    async fn advertised_none(&self, tool: &str, upstream: &str, now: Timestamp) -> PinStatus {
        let detail = format!("upstream {upstream} no longer advertises this tool");
        self.remember(tool, None, Value::Null, true);
        self.definition_changed(tool, None, &detail, now).await;
        PinStatus::Changed { detail }
    }

    async fn advertised(
        &self,
        tool: &str,
        upstream: &str,
        view: &Value,
        now: Timestamp,
    ) -> PinStatus {
        let hash = definition_hash(view);
        let pinned = match self.store.pin(tool).await {
            Ok(p) => p,
            Err(e) => {
                // Fail closed: a pin that cannot be read cannot be matched.
                let detail = format!("the pin cannot be read: {e}");
                self.remember(tool, Some(hash), view.clone(), true);
                return PinStatus::Changed { detail };
            }
        };
        match pinned {
            None => {
                let pin = ToolPin {
                    tool: tool.to_owned(),
                    upstream: upstream.to_owned(),
                    hash: hash.clone(),
                    definition: view.clone(),
                    pinned_at: now,
                    approved_by: "first-use".to_owned(),
                };
                let mut event = NewEvent::new(now, EventKind::ConfigLoaded);
                event.tool = Some(tool.to_owned());
                event.detail = Some(format!("pinned {tool} (first use), sha256 {hash}"));
                if let Err(e) = self.commit(vec![Op::PinTool(pin), Op::Append(event)]).await {
                    let detail = format!("the first-use pin could not be stored: {e}");
                    self.remember(tool, Some(hash), view.clone(), true);
                    return PinStatus::Changed { detail };
                }
                tracing::info!(tool, %hash, "tool definition pinned (first use)");
                self.pinned(tool, hash, view)
            }
            Some(p) if p.hash == hash => self.pinned(tool, hash, view),
            Some(p) => {
                let fields = changed_fields(&p.definition, view);
                let detail = format!(
                    "the upstream's definition changed since it was pinned ({}); an admin must re-approve it (portcullis drift --approve {tool})",
                    if fields.is_empty() {
                        "hash".to_owned()
                    } else {
                        fields.join(", ")
                    }
                );
                self.remember(tool, Some(hash.clone()), view.clone(), true);
                self.definition_changed(tool, Some(&hash), &detail, now)
                    .await;
                PinStatus::Changed { detail }
            }
        }
    }

    fn pinned(&self, tool: &str, hash: String, view: &Value) -> PinStatus {
        self.remember(tool, Some(hash), view.clone(), false);
        PinStatus::Pinned {
            input_schema: view.get("inputSchema").cloned(),
        }
    }

    fn remember(&self, tool: &str, hash: Option<String>, view: Value, blocked: bool) {
        let mut book = self
            .pins
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = book.entry(tool.to_owned()).or_insert(Current {
            hash: None,
            view: Value::Null,
            alerted: None,
            blocked,
            checked: None,
        });
        entry.hash = hash;
        entry.view = view;
        entry.blocked = blocked;
        entry.checked = Some(Instant::now());
    }

    /// Audits and alerts a change, once per distinct new definition.
    async fn definition_changed(
        &self,
        tool: &str,
        hash: Option<&str>,
        detail: &str,
        now: Timestamp,
    ) {
        let key = hash.unwrap_or("absent").to_owned();
        {
            let mut book = self
                .pins
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = book.get_mut(tool) {
                if entry.alerted.as_deref() == Some(key.as_str()) {
                    return;
                }
                entry.alerted = Some(key);
            }
        }
        tracing::warn!(tool, detail, "tool definition changed: blocked");
        let mut event = NewEvent::new(now, EventKind::Anomaly);
        event.tool = Some(tool.to_owned());
        event.decision = Some("deny".to_owned());
        event.reason = Some(
            portcullis_core::Reason::ToolDefinitionChanged
                .as_str()
                .to_owned(),
        );
        event.detail = Some(detail.to_owned());
        if let Err(e) = self.commit(vec![Op::Append(event)]).await {
            tracing::error!(tool, error = %e, "could not audit a changed tool definition");
        }
        self.alert(Alert {
            kind: TOOL_DEFINITION_CHANGED,
            task_id: None,
            agent_id: None,
            reason: Some(
                portcullis_core::Reason::ToolDefinitionChanged
                    .as_str()
                    .to_owned(),
            ),
            detail: Some(format!("{tool}: {detail}")),
            ts: now.0,
        });
    }

    /// A blocked tool's pin is read again (at most once per
    /// [`RECHECK_EVERY`]): an admin may have re-approved the definition the
    /// upstream advertises now. True when the tool was unblocked.
    pub(crate) async fn recheck_pin(&self, tool: &str) -> bool {
        let (hash, view) = {
            let mut book = self
                .pins
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(entry) = book.get_mut(tool) else {
                return false;
            };
            if !entry.blocked || entry.checked.is_some_and(|t| t.elapsed() < RECHECK_EVERY) {
                return false;
            }
            entry.checked = Some(Instant::now());
            let Some(hash) = entry.hash.clone() else {
                return false;
            };
            (hash, entry.view.clone())
        };
        match self.store.pin(tool).await {
            Ok(Some(p)) if p.hash == hash => {
                let status = self.pinned(tool, hash, &view);
                let applied = self.engine.set_pin(tool, status);
                tracing::info!(tool, "re-approved tool definition in force");
                matches!(applied, Some(PinStatus::Pinned { .. }))
            }
            _ => false,
        }
    }
}

/// What the gateway sees of one federated tool now, for the console's
/// pins page.
#[derive(Debug, Clone)]
pub(crate) struct SeenDefinition {
    /// Hash of the advertised definition (`None`: not advertised).
    pub hash: Option<String>,
    /// The advertised definition, as pinned views are kept.
    pub view: Value,
    /// Whether calls of the tool are blocked.
    pub blocked: bool,
}

impl Gateway {
    /// What the upstream advertises now for `tool`, as this process last
    /// saw it; `None` before any listing.
    pub(crate) fn seen_definition(&self, tool: &str) -> Option<SeenDefinition> {
        let book = self
            .pins
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        book.get(tool).map(|c| SeenDefinition {
            hash: c.hash.clone(),
            view: c.view.clone(),
            blocked: c.blocked,
        })
    }

    /// Re-approves the definition of `tool` the upstream advertises now —
    /// what `portcullis drift --approve TOOL` does: the pin and its
    /// `config.loaded` record in one commit, recording `by`. `expected` is
    /// the hash the admin was shown: a definition that changed again since
    /// is refused (`tool_definition_changed`), never approved unseen.
    pub(crate) async fn approve_definition(
        &self,
        tool: &str,
        expected: &str,
        by: &str,
    ) -> Result<(), crate::error::ApiError> {
        use crate::error::ApiError;
        let def = self.engine.tool(tool).ok_or_else(|| {
            ApiError::denied(portcullis_core::Reason::ToolUnknown, "no such tool")
        })?;
        let upstream = def.upstream.clone();
        let seen = self.seen_definition(tool).ok_or_else(|| {
            ApiError::denied(
                portcullis_core::Reason::UpstreamUnavailable,
                "the upstream has not listed its tools yet",
            )
        })?;
        let Some(hash) = seen.hash.clone() else {
            return Err(ApiError::denied(
                portcullis_core::Reason::ToolDefinitionChanged,
                "the upstream no longer advertises this tool: there is nothing to approve",
            ));
        };
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            hash.as_bytes(),
            expected.as_bytes(),
        )) {
            return Err(ApiError::denied(
                portcullis_core::Reason::ToolDefinitionChanged,
                "the definition changed again since it was shown; look at it again",
            ));
        }
        let now = self.now();
        let record = ToolPin {
            tool: tool.to_owned(),
            upstream,
            hash: hash.clone(),
            definition: seen.view.clone(),
            pinned_at: now,
            approved_by: by.to_owned(),
        };
        let mut event = NewEvent::new(now, EventKind::ConfigLoaded);
        event.tool = Some(tool.to_owned());
        event.detail = Some(format!("re-approved {tool} by {by}, sha256 {hash}"));
        self.commit(vec![Op::PinTool(record), Op::Append(event)])
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        let status = self.pinned(tool, hash, &seen.view);
        self.engine.set_pin(tool, status);
        tracing::info!(tool, by, "tool definition re-approved");
        Ok(())
    }
}

/// Keeps one upstream connected for the life of the process.
async fn supervise(gw: Arc<Gateway>, up: Arc<McpUpstream>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let session = match Session::connect(up.name(), &up.transport).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::warn!(upstream = up.name(), error = %e, retry_in = ?backoff, "upstream connection failed");
                up.fail(e.to_string());
                up.mark_attempted();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        tracing::info!(upstream = up.name(), era = ?session.era(), "upstream connected");
        let mut generation = session.tools_generation();
        if let Err(e) = relist(&gw, &up, &session).await {
            up.fail(e.to_string());
            up.mark_attempted();
            session.close().await;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        up.set_session(Some(session.clone()));
        up.mark_attempted();
        gw.metrics.upstream_connected(up.name(), true);
        let connected_at = Instant::now();
        let why = loop {
            match session.next_event(generation).await {
                SessionEvent::ToolsChanged(g) => {
                    generation = g;
                    if let Err(e) = relist(&gw, &up, &session).await {
                        break e.to_string();
                    }
                }
                SessionEvent::Closed(why) => break why,
            }
        };
        up.set_session(None);
        up.fail(why.clone());
        gw.metrics.upstream_connected(up.name(), false);
        session.close().await;
        // A connection that lived a while earns a quick retry; one that
        // dies at once backs off further each time.
        if connected_at.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(upstream = up.name(), reason = %why, retry_in = ?backoff, "upstream disconnected");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn relist(gw: &Gateway, up: &McpUpstream, session: &Session) -> Result<(), ClientError> {
    let tools = session.list_tools().await?;
    gw.reconcile(up.name(), &tools).await;
    Ok(())
}

/// One line of `portcullis drift`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftLine {
    /// The gateway's tool name.
    pub tool: String,
    /// `ok`, `changed`, `missing` (not advertised), `unpinned` (first use
    /// will pin it), `approved` (re-approved by this run) or `unreachable`.
    pub status: &'static str,
    /// What changed, who pinned it, or why the upstream could not be read.
    pub detail: String,
}

impl DriftLine {
    /// True when the line blocks calls (changed, missing, unreachable).
    pub fn is_drift(&self) -> bool {
        matches!(self.status, "changed" | "missing" | "unreachable")
    }
}

/// Compares every registered tool's pin with what its upstream advertises
/// now; re-approves (pins the current definition of) each tool in
/// `approve`, recording who did it. Connects to each upstream once.
pub async fn drift(
    loaded: &portcullis_config::LoadedConfig,
    store: &dyn portcullis_store::Store,
    approve: &[String],
    by: &str,
    now: Timestamp,
) -> Result<Vec<DriftLine>, String> {
    let cfg = &loaded.config;
    for name in approve {
        if !cfg.tools.iter().any(|t| &t.name == name) {
            return Err(format!(
                "--approve {name}: no such tool in the configuration"
            ));
        }
    }
    let mut lines = Vec::new();
    for up in &cfg.upstreams {
        let tools: Vec<&portcullis_config::Tool> =
            cfg.tools.iter().filter(|t| t.upstream == up.name).collect();
        if tools.is_empty() {
            continue;
        }
        let advertised = match Session::connect(&up.name, &transport_of(up, &loaded.base_dir)).await
        {
            Ok(s) => {
                let listed = s.list_tools().await;
                s.close().await;
                listed.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        let advertised = match advertised {
            Ok(a) => a,
            Err(why) => {
                for t in tools {
                    lines.push(DriftLine {
                        tool: t.name.clone(),
                        status: "unreachable",
                        detail: format!("upstream {}: {why}", up.name),
                    });
                }
                continue;
            }
        };
        for t in tools {
            let upstream_tool = t
                .upstream_tool
                .clone()
                .or_else(|| {
                    t.name
                        .strip_prefix(&format!("{}.", up.name))
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            let found = advertised
                .iter()
                .find(|d| d.get("name").and_then(Value::as_str) == Some(upstream_tool.as_str()))
                .map(pinned_view);
            let pin = store.pin(&t.name).await.map_err(|e| e.to_string())?;
            let line = match (found, pin) {
                (None, _) => DriftLine {
                    tool: t.name.clone(),
                    status: "missing",
                    detail: format!("upstream {} does not advertise {upstream_tool:?}", up.name),
                },
                (Some(view), pin) => {
                    let hash = definition_hash(&view);
                    let same = pin.as_ref().is_some_and(|p| p.hash == hash);
                    if approve.contains(&t.name) && !same {
                        let record = ToolPin {
                            tool: t.name.clone(),
                            upstream: up.name.clone(),
                            hash: hash.clone(),
                            definition: view.clone(),
                            pinned_at: now,
                            approved_by: by.to_owned(),
                        };
                        let mut event = NewEvent::new(now, EventKind::ConfigLoaded);
                        event.tool = Some(t.name.clone());
                        event.detail =
                            Some(format!("re-approved {} by {by}, sha256 {hash}", t.name));
                        store
                            .commit(vec![Op::PinTool(record), Op::Append(event)])
                            .await
                            .map_err(|e| e.to_string())?;
                        DriftLine {
                            tool: t.name.clone(),
                            status: "approved",
                            detail: format!("now pinned: sha256 {hash}"),
                        }
                    } else {
                        match pin {
                            None => DriftLine {
                                tool: t.name.clone(),
                                status: "unpinned",
                                detail: "first use will pin it".to_owned(),
                            },
                            Some(p) if p.hash == hash => DriftLine {
                                tool: t.name.clone(),
                                status: "ok",
                                detail: format!("pinned by {}", p.approved_by),
                            },
                            Some(p) => DriftLine {
                                tool: t.name.clone(),
                                status: "changed",
                                detail: describe_change(&p.definition, &view),
                            },
                        }
                    }
                }
            };
            lines.push(line);
        }
    }
    Ok(lines)
}

/// A readable account of what changed between two pinned views.
pub fn describe_change(pinned: &Value, current: &Value) -> String {
    let mut parts = Vec::new();
    for field in changed_fields(pinned, current) {
        let show = |v: Option<&Value>| -> String {
            let s = v.map_or_else(|| "(absent)".to_owned(), Value::to_string);
            if s.chars().count() > 160 {
                format!("{}…", s.chars().take(160).collect::<String>())
            } else {
                s
            }
        };
        parts.push(format!(
            "{field}: {} -> {}",
            show(pinned.get(field)),
            show(current.get(field))
        ));
    }
    if parts.is_empty() {
        "hash differs".to_owned()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn stdio_upstream() -> portcullis_config::Upstream {
        portcullis_config::Upstream {
            name: "fs".to_owned(),
            transport: portcullis_config::Transport::Stdio,
            command: vec!["node".to_owned(), "server.js".to_owned()],
            url: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            credential: portcullis_config::Credential::default(),
            token_exchange: false,
            session: portcullis_config::SessionScope::Shared,
            max_task_sessions: None,
        }
    }

    /// Regression: `--config portcullis.toml` (a bare file name) gives an
    /// empty base directory; the child must then inherit the current one,
    /// not be started in "" (which fails with ENOENT).
    #[test]
    fn an_empty_base_directory_is_the_current_one() {
        match transport_of(&stdio_upstream(), std::path::Path::new("")) {
            Transport::Stdio { cwd, command, .. } => {
                assert_eq!(cwd, None);
                assert_eq!(command, ["node", "server.js"]);
            }
            Transport::Http { .. } => panic!("stdio expected"),
        }
        match transport_of(&stdio_upstream(), std::path::Path::new("/etc/portcullis")) {
            Transport::Stdio { cwd, .. } => {
                assert_eq!(cwd, Some(std::path::PathBuf::from("/etc/portcullis")));
            }
            Transport::Http { .. } => panic!("stdio expected"),
        }
    }

    /// And a child started that way really runs.
    #[tokio::test]
    async fn a_stdio_child_starts_with_an_empty_base_directory() {
        let up = portcullis_config::Upstream {
            command: vec!["sh".to_owned(), "-c".to_owned(), "exit 0".to_owned()],
            ..stdio_upstream()
        };
        let err = Session::connect("sh", &transport_of(&up, std::path::Path::new("")))
            .await
            .unwrap_err()
            .to_string();
        // It started (and then closed its stdout without answering).
        assert!(!err.contains("cannot start"), "{err}");
    }
}
