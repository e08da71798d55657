//! The typed configuration model: one struct per TOML table of the file
//! format described in `docs/configuration.md` (DESIGN section 3).
//!
//! Every struct rejects unknown keys. Defaults are the secure choice where a
//! key is optional. Semantic checks (do the tools of an ACL exist, can every
//! state reach a final state, …) are not done here: they need the whole file
//! and live in `portcullis_core::check`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::Duration;

/// A whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP service.
    #[serde(default)]
    pub server: Server,
    /// The ledger.
    #[serde(default)]
    pub store: Store,
    /// Task tokens.
    #[serde(default)]
    pub tokens: Tokens,
    /// The audit log.
    #[serde(default)]
    pub audit: Audit,
    /// Callers of the admin API and CLI.
    #[serde(default)]
    pub admins: Vec<Admin>,
    /// The services tools are forwarded to.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// The tool registry.
    #[serde(default)]
    pub tools: Vec<Tool>,
    /// Workflow state machines, one per kind of agent.
    #[serde(default)]
    pub agent_types: Vec<AgentType>,
    /// The agents and their allowlists.
    #[serde(default)]
    pub agents: Vec<Agent>,
    /// Cedar policy files.
    #[serde(default)]
    pub policies: Policies,
    /// Anomaly rules.
    #[serde(default)]
    pub anomaly: Anomaly,
    /// Elevation requests.
    #[serde(default)]
    pub elevation: Elevation,
    /// Held approvals: how long a call that needs approval waits for it.
    #[serde(default)]
    pub approval: Approval,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Socket address to listen on.
    #[serde(default = "Server::default_listen")]
    pub listen: String,
    /// `iss` of minted tokens and the gateway's own audience.
    #[serde(default = "Server::default_issuer")]
    pub issuer: String,
    /// Largest accepted request body.
    #[serde(default = "Server::default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// TLS on the listener (default: plain HTTP).
    #[serde(default)]
    pub tls: Option<ServerTls>,
}

/// `[server] tls = { cert = "…", key = "…" }`: the listener's certificate
/// and key, PEM files relative to the configuration's folder, reloaded on
/// SIGHUP and when either file changes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// The certificate chain, end-entity certificate first.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

impl Server {
    fn default_listen() -> String {
        "127.0.0.1:8787".to_owned()
    }
    fn default_issuer() -> String {
        "http://127.0.0.1:8787".to_owned()
    }
    const fn default_max_body_bytes() -> u64 {
        1_048_576
    }
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: Self::default_listen(),
            issuer: Self::default_issuer(),
            max_body_bytes: Self::default_max_body_bytes(),
            tls: None,
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// `sqlite://PATH` (relative to the config file) or `postgres://…`.
    #[serde(default = "Store::default_url")]
    pub url: String,
}

impl Store {
    fn default_url() -> String {
        "sqlite://portcullis.db".to_owned()
    }
}

impl Default for Store {
    fn default() -> Self {
        Self {
            url: Self::default_url(),
        }
    }
}

/// `[tokens]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    /// Lifetime of an access token; must lie within 1m..=15m.
    #[serde(default = "Tokens::default_access_ttl")]
    pub access_ttl: Duration,
    /// Sliding idle window of a refresh token.
    #[serde(default = "Tokens::default_refresh_idle_ttl")]
    pub refresh_idle_ttl: Duration,
    /// Hard cap on a task's life; refresh never passes it.
    #[serde(default = "Tokens::default_task_max_lifetime")]
    pub task_max_lifetime: Duration,
    /// The Ed25519 signing key files (resolved against the config's folder):
    /// one path, or a list. The newest key signs; older ones keep verifying
    /// until every token they signed has expired.
    #[serde(
        default = "Tokens::default_signing_key",
        deserialize_with = "one_or_many"
    )]
    pub signing_key: Vec<String>,
}

impl Tokens {
    const fn default_access_ttl() -> Duration {
        Duration::from_secs(600)
    }
    const fn default_refresh_idle_ttl() -> Duration {
        Duration::from_secs(1800)
    }
    const fn default_task_max_lifetime() -> Duration {
        Duration::from_secs(8 * 3600)
    }
    fn default_signing_key() -> Vec<String> {
        vec!["keys/signing.ed25519".to_owned()]
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Self {
            access_ttl: Self::default_access_ttl(),
            refresh_idle_ttl: Self::default_refresh_idle_ttl(),
            task_max_lifetime: Self::default_task_max_lifetime(),
            signing_key: Self::default_signing_key(),
        }
    }
}

/// A string, or a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a path or a list of paths")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_owned()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_any(Visitor)
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// Optional JSON Lines mirror of every record.
    #[serde(default)]
    pub jsonl: Option<String>,
    /// Argument keys masked in audit records, at any depth, case-insensitively.
    #[serde(default = "Audit::default_redact")]
    pub redact: Vec<String>,
    /// Days a record stays in the queryable hot tier.
    #[serde(default = "Audit::default_hot_days")]
    pub hot_days: u32,
    /// Folder of compressed cold-tier segments.
    #[serde(default)]
    pub archive_dir: Option<String>,
    /// Folder of the append-only checkpoint witness, outside the store
    /// (`docs/audit-format.md`, "Witness"); `None` (the default): off.
    #[serde(default)]
    pub witness_dir: Option<String>,
    /// Days before a segment may be dropped.
    #[serde(default = "Audit::default_retention_days")]
    pub retention_days: u32,
    /// Share of allowed low-risk calls kept in full, in `0.0..=1.0`.
    #[serde(default = "Audit::default_sample")]
    pub sample_low_risk: f64,
    /// Optional URL POSTed on halts and anomalies.
    #[serde(default)]
    pub alert_webhook: Option<String>,
    /// An `https://` webhook: a PEM file of CA certificates trusted for it
    /// instead of the system roots.
    #[serde(default)]
    pub alert_ca_file: Option<String>,
    /// A signed checkpoint is written after this many new records…
    #[serde(default = "Audit::default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// …or when this much time has passed with new records, whichever first.
    #[serde(default = "Audit::default_checkpoint_interval")]
    pub checkpoint_interval: Duration,
    /// The body of alert webhook POSTs: `json` (the default, DESIGN
    /// section 9) or `slack` (a Slack-compatible `{"text": …}`).
    #[serde(default)]
    pub alert_format: AlertFormat,
    /// Whether a call's answer waits until its `call.completed` record is
    /// durable. `false` (the default): the record is queued behind the
    /// call's durable write-ahead record before the answer leaves and
    /// becomes durable with the next group commit (docs/operations.md,
    /// "Crash windows").
    #[serde(default)]
    pub durable_results: bool,
}

impl Audit {
    fn default_redact() -> Vec<String> {
        ["password", "secret", "token", "authorization"]
            .map(str::to_owned)
            .to_vec()
    }
    const fn default_hot_days() -> u32 {
        7
    }
    const fn default_retention_days() -> u32 {
        90
    }
    const fn default_sample() -> f64 {
        1.0
    }
    const fn default_checkpoint_every() -> u64 {
        1000
    }
    const fn default_checkpoint_interval() -> Duration {
        Duration::from_secs(60)
    }
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            jsonl: None,
            redact: Self::default_redact(),
            hot_days: Self::default_hot_days(),
            archive_dir: None,
            witness_dir: None,
            retention_days: Self::default_retention_days(),
            sample_low_risk: Self::default_sample(),
            alert_webhook: None,
            alert_ca_file: None,
            alert_format: AlertFormat::Json,
            checkpoint_every: Self::default_checkpoint_every(),
            checkpoint_interval: Self::default_checkpoint_interval(),
            durable_results: false,
        }
    }
}

/// `[[admins]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// A name for the audit log.
    pub name: String,
    /// What this caller may do.
    pub roles: Vec<Role>,
    /// SHA-256 of the bearer token, 64 lowercase or uppercase hex digits.
    pub token_sha256: String,
}

/// An admin role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Halt, resume, complete any task; introspect tokens.
    Admin,
    /// Decide elevation requests.
    Approver,
    /// Read the audit log.
    Auditor,
}

/// `[[upstreams]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Unique name; tools are federated as `<name>.<tool>`.
    pub name: String,
    /// How the gateway reaches it.
    pub transport: Transport,
    /// `stdio`: the server's command line.
    #[serde(default)]
    pub command: Vec<String>,
    /// `http`: the Streamable HTTP endpoint, `http://` or `https://`.
    #[serde(default)]
    pub url: Option<String>,
    /// `https`: a PEM file of CA certificates trusted for this upstream
    /// instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// `https`: a PEM client certificate (chain) presented to the upstream
    /// (mutual TLS), with `client_key`.
    #[serde(default)]
    pub client_cert: Option<String>,
    /// `https`: the PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<String>,
    /// The per-hop credential the upstream receives.
    #[serde(default)]
    pub credential: Credential,
    /// Whether an agent may trade its task token for a per-hop token of
    /// this upstream (RFC 8693 token exchange at `/oauth/token`) and then
    /// call it directly: around the gateway, so its arguments are never
    /// checked or recorded call by call. Default false: closed.
    #[serde(default)]
    pub token_exchange: bool,
    /// Which MCP session the upstream's calls go through (default
    /// `shared`).
    #[serde(default)]
    pub session: SessionScope,
    /// With `session = "per_task"`: the most task sessions open at once
    /// (default [`DEFAULT_MAX_TASK_SESSIONS`], at most
    /// [`MAX_TASK_SESSIONS`]); past it, the least recently used one is
    /// closed.
    #[serde(default)]
    pub max_task_sessions: Option<u32>,
}

/// Task sessions an upstream with `session = "per_task"` keeps open
/// without `max_task_sessions`.
pub const DEFAULT_MAX_TASK_SESSIONS: u32 = 64;
/// Largest accepted `max_task_sessions`.
pub const MAX_TASK_SESSIONS: u32 = 1024;

/// Whose MCP session a call to an upstream goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionScope {
    /// One session (one stdio process, or one Streamable HTTP session) for
    /// every task: state the server keeps per session is shared by all
    /// tasks.
    #[default]
    Shared,
    /// A session of its own for each task, opened on the task's first call
    /// and closed when the task ends: state the server keeps per session
    /// never crosses tasks. A stdio upstream runs one process per task.
    PerTask,
}

/// Upstream transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A child process speaking newline-delimited JSON-RPC on stdin/stdout.
    Stdio,
    /// A Streamable HTTP MCP server.
    Http,
}

/// The per-hop credential provider of an upstream: `kind` and the keys
/// that kind takes. Kept flat (not a tagged enum) so that a misplaced key is
/// reported at its own line; which keys go with which kind is checked by
/// `portcullis check`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// The provider.
    #[serde(default)]
    pub kind: CredentialKind,
    /// `static`: header name.
    #[serde(default)]
    pub header: Option<String>,
    /// `static`: environment variable holding the secret.
    #[serde(default)]
    pub env: Option<String>,
    /// `static`: file holding the secret.
    #[serde(default)]
    pub file: Option<String>,
    /// `postgres-role`: connection used to create roles; defaults to `store.url`.
    #[serde(default)]
    pub url: Option<String>,
    /// `postgres-role`: grants, in SQL's own words.
    #[serde(default)]
    pub grants: Option<Vec<String>>,
    /// `postgres-role`: role lifetime.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

/// Which per-hop credential an upstream receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// A short-lived JWT with `aud` = the upstream.
    #[default]
    Jwt,
    /// A secret read by the gateway and injected as a header.
    Static,
    /// A PostgreSQL role created per task.
    PostgresRole,
    /// No credential.
    None,
}

impl CredentialKind {
    /// The configured spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::Static => "static",
            Self::PostgresRole => "postgres-role",
            Self::None => "none",
        }
    }
}

/// `[[tools]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    /// The gateway name, `<upstream>.<tool>` unless `upstream_tool` is given.
    pub name: String,
    /// The upstream that serves it.
    pub upstream: String,
    /// The tool's name at the upstream, when it differs from the suffix of `name`.
    #[serde(default)]
    pub upstream_tool: Option<String>,
    /// Risk level.
    pub risk: Risk,
    /// Access kind.
    pub access: Access,
    /// JSON Schema of the arguments (an object schema).
    #[serde(default)]
    pub args_schema: Option<serde_json::Value>,
    /// Every call needs a human's (or an `auto_approve` policy's)
    /// approval, good for that one call.
    #[serde(default)]
    pub approval: bool,
}

/// A tool's risk level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    /// Routine.
    Low,
    /// Always audited in full; may require approval.
    High,
}

/// A tool's access kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Reads only.
    Read,
    /// Changes something.
    Write,
}

impl Risk {
    /// The string used in Cedar and in the audit log.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::High => "high",
        }
    }
}

impl Access {
    /// The string used in Cedar and in the audit log.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// `[[agent_types]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentType {
    /// Unique name.
    pub name: String,
    /// The state every task starts in.
    pub initial: String,
    /// The workflow's states.
    pub states: Vec<State>,
    /// A call to a tool of a `next` state moves the task there once every
    /// check has passed.
    #[serde(default)]
    pub auto_advance: bool,
    /// Entering any `reverify` state of this type needs approval.
    #[serde(default)]
    pub approval: bool,
}

/// One state of a workflow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Unique within its agent type.
    pub name: String,
    /// Tools callable in this state.
    #[serde(default)]
    pub tools: Vec<String>,
    /// States reachable from this one.
    #[serde(default)]
    pub next: Vec<String>,
    /// Entering this state rotates the access token.
    #[serde(default)]
    pub reverify: bool,
    /// A task in this state is finished.
    #[serde(default, rename = "final")]
    pub is_final: bool,
    /// Entering this state needs approval (the move waits as an elevation
    /// request until someone approves it).
    #[serde(default)]
    pub approval: bool,
}

/// `[[agents]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// Unique id; the `sub` of its tokens.
    pub id: String,
    /// Its agent type.
    #[serde(rename = "type")]
    pub agent_type: String,
    /// The allowlist.
    pub tools: Vec<String>,
    /// SHA-256 of the bootstrap secret.
    #[serde(default)]
    pub bootstrap_sha256: Option<String>,
    /// Alternative bootstrap: an OIDC identity.
    #[serde(default)]
    pub oidc: Option<Oidc>,
    /// Budgets.
    #[serde(default)]
    pub limits: Limits,
    /// Every call of a `risk = "high"` tool needs approval, per call.
    #[serde(default)]
    pub approve_high_risk: bool,
}

/// An OIDC identity accepted as an agent's bootstrap credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Oidc {
    /// The identity provider's issuer.
    pub issuer: String,
    /// Its JWKS URL or file.
    pub jwks: String,
    /// The expected `sub`.
    pub subject: String,
}

/// Budgets of one agent, per task.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Allowed calls per task, all tools together.
    #[serde(default)]
    pub max_calls_per_task: Option<u64>,
    /// Allowed calls per task, per tool.
    #[serde(default)]
    pub per_tool: BTreeMap<String, u64>,
}

/// `[policies]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policies {
    /// Cedar files; `*` may stand in the last path component.
    #[serde(default)]
    pub cedar: Vec<String>,
}

/// What an anomaly rule does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyAction {
    /// Deny this call.
    Deny,
    /// Hold this call as an elevation request.
    RequireApproval,
    /// Halt the task and revoke its tokens.
    Halt,
}

/// `[anomaly]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anomaly {
    /// First use of a tool the agent has never used.
    #[serde(default)]
    pub new_tool: Option<AnomalyAction>,
    /// Many distinct tools in a short window.
    #[serde(default)]
    pub distinct_tools: Option<WindowRule>,
    /// Denials within one task.
    #[serde(default)]
    pub denials: Option<CountRule>,
    /// Call rate.
    #[serde(default)]
    pub rate: Option<RateRule>,
}

/// `count` distinct tools within `seconds`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowRule {
    /// Threshold.
    pub count: u64,
    /// Window.
    pub seconds: u64,
    /// Action.
    pub action: AnomalyAction,
}

/// `count` occurrences within a task.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountRule {
    /// Threshold.
    pub count: u64,
    /// Action.
    pub action: AnomalyAction,
}

/// `calls` within `seconds`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateRule {
    /// Threshold.
    pub calls: u64,
    /// Window.
    pub seconds: u64,
    /// Action.
    pub action: AnomalyAction,
}

/// `[elevation]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Elevation {
    /// How long an approval lasts.
    #[serde(default = "Elevation::default_ttl")]
    pub ttl: Duration,
    /// Cedar file whose permits approve without a human.
    #[serde(default)]
    pub auto_approve: Option<String>,
}

impl Elevation {
    const fn default_ttl() -> Duration {
        Duration::from_secs(900)
    }
}

impl Default for Elevation {
    fn default() -> Self {
        Self {
            ttl: Self::default_ttl(),
            auto_approve: None,
        }
    }
}

/// `[audit] alert_format`: the body of an alert webhook POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertFormat {
    /// `{kind, task_id, agent_id, reason, detail, ts, url?}` (DESIGN section 9).
    #[default]
    Json,
    /// `{"text": …}`, as Slack's and Mattermost's incoming webhooks take it.
    Slack,
}

/// `[approval]`: held approvals (DESIGN section 14).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// How long a call that needs approval waits for a person's decision
    /// before it answers `approval_required`; `0s` (the default): at once.
    #[serde(default)]
    pub hold: Duration,
    /// Most calls of one task held at once; one more answers at once.
    #[serde(default = "Approval::default_max_held_per_task")]
    pub max_held_per_task: u32,
    /// Most calls held at once over all tasks.
    #[serde(default = "Approval::default_max_held")]
    pub max_held: u32,
}

impl Approval {
    /// The longest `hold` accepted.
    pub const MAX_HOLD: Duration = Duration::from_secs(600);
    /// The largest cap accepted for `max_held_per_task` and `max_held`.
    pub const MAX_HELD: u32 = 10_000;
    const fn default_max_held_per_task() -> u32 {
        4
    }
    const fn default_max_held() -> u32 {
        256
    }
}

impl Default for Approval {
    fn default() -> Self {
        Self {
            hold: Duration::from_millis(0),
            max_held_per_task: Self::default_max_held_per_task(),
            max_held: Self::default_max_held(),
        }
    }
}
