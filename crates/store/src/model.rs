//! The records the ledger holds and the operations that change them. These
//! types are backend-independent; each backend maps them to its own layout.
//! The checks every backend applies to an op before touching storage live
//! here too, so backends refuse the same things with the same messages.

use std::fmt;
use std::str::FromStr;

use portcullis_core::{Task, Timestamp};
use serde::{Deserialize, Serialize};

/// Default number of audit events an [`AuditQuery`] returns.
pub const DEFAULT_AUDIT_LIMIT: usize = 100;
/// Most audit events one [`AuditQuery`] returns, whatever it asks for.
pub const MAX_AUDIT_LIMIT: usize = 1000;
/// Most rows any paged or capped list query returns
/// ([`crate::Store::task_tokens`], [`crate::Store::elevations`],
/// [`crate::Store::checkpoints`]). [`crate::Store::pins`] is not capped: a
/// pin left out would read as a tool never pinned.
pub const MAX_ROWS: usize = 1000;

/// The [`crate::StoreError::Conflict`] message of an
/// [`Op::DecideElevation`] on an elevation that is no longer pending.
pub const ELEVATION_ALREADY_DECIDED: &str = "elevation already decided";
/// The [`crate::StoreError::Conflict`] message of an
/// [`Op::DecideElevation`] on an id the ledger does not hold.
pub const NO_SUCH_ELEVATION: &str = "no such elevation";

/// A task and the ledger's bookkeeping for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// The task as the engine sees it; `task.version` is the compare-and-swap
    /// version.
    pub task: Task,
    /// The task's maximum lifetime ends here (`task_max_lifetime` after
    /// start): no token or refresh outlives it.
    pub deadline: Timestamp,
}

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// An agent's access token for a task.
    Access,
    /// A per-hop credential minted for one upstream.
    Hop,
}

impl TokenKind {
    /// The stored form: `"access"` or `"hop"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Access => "access",
            Self::Hop => "hop",
        }
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a [`TokenKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown token kind {0:?}")]
pub struct UnknownTokenKind(String);

impl FromStr for TokenKind {
    type Err = UnknownTokenKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "access" => Ok(Self::Access),
            "hop" => Ok(Self::Hop),
            other => Err(UnknownTokenKind(other.chars().take(64).collect())),
        }
    }
}

/// Metadata of one issued token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The token's unique id (`jti` claim).
    pub jti: String,
    /// The task it is bound to.
    pub task_id: String,
    /// The agent it was issued to.
    pub agent_id: String,
    /// Access token or per-hop credential.
    pub kind: TokenKind,
    /// When it was issued (`iat`).
    pub issued_at: Timestamp,
    /// When it expires (`exp`).
    pub expires_at: Timestamp,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
    /// Why it was revoked, if it was.
    pub revoke_reason: Option<String>,
}

/// One refresh token, stored only as its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    /// SHA-256 of the opaque token, lowercase hex.
    pub hash: String,
    /// The task it refreshes.
    pub task_id: String,
    /// The agent it was issued to.
    pub agent_id: String,
    /// When it was issued.
    pub issued_at: Timestamp,
    /// It must be spent before this instant (sliding idle window, already
    /// capped at the task's deadline by the issuer).
    pub idle_expires_at: Timestamp,
    /// When it was spent (or revoked with its task), if it was.
    pub spent_at: Option<Timestamp>,
}

/// Where an elevation request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElevationStatus {
    /// Waiting for an approver.
    Pending,
    /// Approved: the tool is granted to the task until
    /// [`ElevationRecord::expires_at`].
    Approved,
    /// Denied.
    Denied,
}

impl ElevationStatus {
    /// Every status.
    pub const ALL: [Self; 3] = [Self::Pending, Self::Approved, Self::Denied];

    /// The stored and serialized form: `"pending"`, `"approved"` or
    /// `"denied"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
        }
    }
}

impl fmt::Display for ElevationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not an [`ElevationStatus`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown elevation status {0:?}")]
pub struct UnknownElevationStatus(String);

impl FromStr for ElevationStatus {
    type Err = UnknownElevationStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(Self::Pending),
            "approved" => Ok(Self::Approved),
            "denied" => Ok(Self::Denied),
            other => Err(UnknownElevationStatus(other.chars().take(64).collect())),
        }
    }
}

/// An agent's request, mid-task, for a tool outside its allowlist, and its
/// decision (DESIGN section 7).
///
/// The record is the request and its outcome only. What a task may call is
/// [`Task::grants`](portcullis_core::Task::grants): an approval is committed
/// in one batch with the [`Op::UpdateTask`] that adds the grant (and the
/// `elevation.approved` audit event), so the two never disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ElevationRecord {
    /// Unique id, chosen by the caller.
    pub id: String,
    /// The task the elevation is scoped to.
    pub task_id: String,
    /// The agent that asked.
    pub agent_id: String,
    /// The tool asked for.
    pub tool: String,
    /// Why the agent asked.
    pub reason: String,
    /// Pending until decided; decided exactly once.
    pub status: ElevationStatus,
    /// When the agent asked.
    pub requested_at: Timestamp,
    /// When it was decided; `None` while pending.
    pub decided_at: Option<Timestamp>,
    /// Who decided (an approver, or the auto-approve policy); `None` while
    /// pending.
    pub decided_by: Option<String>,
    /// The approver's note, if any.
    pub note: Option<String>,
    /// For an approval: when the grant lapses. `None` otherwise.
    pub expires_at: Option<Timestamp>,
    /// For a request the gateway filed for a call it held: the rule that
    /// held it and the arguments the approver is asked about. `None` for a
    /// request an agent made for a tool beyond its allowlist.
    pub held: Option<HeldCall>,
}

/// The call behind an elevation request the gateway filed for a held call
/// ([`ElevationRecord::held`]): what the approver sees, and what an
/// approval is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldCall {
    /// The rule that held it: `approval` (the configuration asks for an
    /// approval of the tool, or of the state it enters) or the name of an
    /// anomaly rule (`rate`, `distinct_tools`, `new_tool`).
    pub rule: String,
    /// SHA-256 (hex) of the canonical JSON of the call's redacted
    /// arguments; `None` when the use has no arguments (entering a state
    /// through the transition endpoint). A one-use approval is good only
    /// for a call with the same digest.
    pub args_digest: Option<String>,
    /// The call's redacted arguments, as the audit log keeps them (large
    /// ones by digest and prefix); `None` when the use has none.
    pub args: Option<serde_json::Value>,
}

impl HeldCall {
    /// Longest stored form, in bytes of JSON: the audit's bound on
    /// arguments with room for the rule and digest.
    pub const MAX_BYTES: usize = 16 * 1024;

    /// The stored form (JSON text), or `None` past [`HeldCall::MAX_BYTES`].
    pub fn encode(&self) -> Option<String> {
        serde_json::to_string(self)
            .ok()
            .filter(|text| text.len() <= Self::MAX_BYTES)
    }

    /// The stored form read back.
    pub fn decode(id: &str, text: &str) -> Result<Self, crate::StoreError> {
        serde_json::from_str(text).map_err(|e| {
            crate::StoreError::Corrupt(format!("elevation {id}: held call does not decode: {e}"))
        })
    }
}

/// Where a page of [`crate::Store::elevations`] ends: the `requested_at`
/// and `id` of its last request. The next page holds the requests after it
/// in the list's order (`requested_at`, then `id`), so paging visits every
/// request that stays in the list exactly once, however many arrive while
/// it runs (new requests sort after the pages already read, or into pages
/// not yet read).
///
/// Its text form ([`ElevationCursor::encode`], [`ElevationCursor::parse`])
/// is what the HTTP API hands out as `next`: opaque to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElevationCursor {
    /// The last request's `requested_at`.
    pub requested_at: Timestamp,
    /// The last request's id.
    pub id: String,
}

/// Longest id an [`ElevationCursor`] carries, in bytes.
pub const MAX_CURSOR_ID_BYTES: usize = 128;

impl ElevationCursor {
    /// The cursor just after `record`.
    pub fn after(record: &ElevationRecord) -> Self {
        Self {
            requested_at: record.requested_at,
            id: record.id.clone(),
        }
    }

    /// The text form: `<requested_at ms>.<id>`.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.requested_at.0, self.id)
    }

    /// Reads [`Self::encode`]'s text; `None` for anything else (an id that
    /// is empty, longer than [`MAX_CURSOR_ID_BYTES`] or not made of ASCII
    /// letters, digits, `_` and `-`).
    pub fn parse(text: &str) -> Option<Self> {
        let (at, id) = text.split_once('.')?;
        if at.is_empty() || !at.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let requested_at = Timestamp(at.parse().ok()?);
        let id_ok = !id.is_empty()
            && id.len() <= MAX_CURSOR_ID_BYTES
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        id_ok.then(|| Self {
            requested_at,
            id: id.to_owned(),
        })
    }
}

/// Refuses an [`Op::InsertElevation`] that is not a fresh request.
pub(crate) fn check_new_elevation(record: &ElevationRecord) -> Result<(), crate::StoreError> {
    let held_fits = record.held.as_ref().is_none_or(|h| h.encode().is_some());
    let undecided = held_fits
        && record.decided_at.is_none()
        && record.decided_by.is_none()
        && record.note.is_none()
        && record.expires_at.is_none();
    if record.status == ElevationStatus::Pending && undecided {
        Ok(())
    } else {
        Err(crate::StoreError::Conflict(format!(
            "insert elevation {:?}: a new elevation must be pending, with no decision, note or \
             expiry, and a held call of at most {} bytes",
            record.id,
            HeldCall::MAX_BYTES
        )))
    }
}

/// [`Op::PruneAudit`]: the span itself, before the database is read.
pub(crate) fn check_prune_span(after_seq: u64, through_seq: u64) -> crate::Result<(u64, u64)> {
    if through_seq <= after_seq {
        return Err(crate::StoreError::Conflict(format!(
            "cannot prune through seq {through_seq}: it is not after seq {after_seq}"
        )));
    }
    Ok((after_seq, through_seq))
}

/// [`Op::PruneAudit`]: the span against the stored log (`oldest` and
/// `newest` record, whether a checkpoint of the stored record covers
/// `through`). The same checks, in the same order, for every backend.
pub(crate) fn check_prune_bounds(
    after: i64,
    through: i64,
    oldest: Option<i64>,
    newest: Option<i64>,
    anchored: bool,
) -> crate::Result<()> {
    if oldest.is_none() || oldest != after.checked_add(1) {
        return Err(crate::StoreError::Conflict(PRUNE_MOVED.to_owned()));
    }
    if newest.is_none_or(|newest| newest <= through) {
        return Err(crate::StoreError::Conflict(PRUNE_HEAD.to_owned()));
    }
    if !anchored {
        return Err(crate::StoreError::Conflict(PRUNE_NOT_ANCHORED.to_owned()));
    }
    Ok(())
}

/// Refuses an [`Op::DecideElevation`] that is not a valid decision, before
/// the stored record is looked at.
pub(crate) fn check_decision(
    id: &str,
    status: ElevationStatus,
    at: Timestamp,
    expires_at: Option<Timestamp>,
) -> Result<(), crate::StoreError> {
    let refuse = |why: &str| {
        Err(crate::StoreError::Conflict(format!(
            "decide elevation {id:?}: {why}"
        )))
    };
    match (status, expires_at) {
        (ElevationStatus::Pending, _) => refuse("a decision must be approved or denied"),
        (ElevationStatus::Approved, None) => refuse("an approval must expire"),
        (ElevationStatus::Approved, Some(expires_at)) if expires_at <= at => {
            refuse("an approval must expire after it is decided")
        }
        (ElevationStatus::Denied, Some(_)) => refuse("a denial has no expiry"),
        (ElevationStatus::Approved, Some(_)) | (ElevationStatus::Denied, None) => Ok(()),
    }
}

/// The kind of an audit event (DESIGN section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// `task.started`
    #[serde(rename = "task.started")]
    TaskStarted,
    /// `task.completed`
    #[serde(rename = "task.completed")]
    TaskCompleted,
    /// `task.halted`
    #[serde(rename = "task.halted")]
    TaskHalted,
    /// `token.issued`
    #[serde(rename = "token.issued")]
    TokenIssued,
    /// `token.refreshed`
    #[serde(rename = "token.refreshed")]
    TokenRefreshed,
    /// `token.revoked`
    #[serde(rename = "token.revoked")]
    TokenRevoked,
    /// `call.denied`
    #[serde(rename = "call.denied")]
    CallDenied,
    /// `call.allowed`
    #[serde(rename = "call.allowed")]
    CallAllowed,
    /// `call.completed`
    #[serde(rename = "call.completed")]
    CallCompleted,
    /// `state.transition`
    #[serde(rename = "state.transition")]
    StateTransition,
    /// `elevation.requested`
    #[serde(rename = "elevation.requested")]
    ElevationRequested,
    /// `elevation.approved`
    #[serde(rename = "elevation.approved")]
    ElevationApproved,
    /// `elevation.denied`
    #[serde(rename = "elevation.denied")]
    ElevationDenied,
    /// `anomaly`
    #[serde(rename = "anomaly")]
    Anomaly,
    /// `config.loaded`
    #[serde(rename = "config.loaded")]
    ConfigLoaded,
    /// `audit.archived`: the oldest records moved from the store to a
    /// segment file of the archive (`args`: `first_seq`, `through_seq`,
    /// `records`, `file`).
    #[serde(rename = "audit.archived")]
    AuditArchived,
    /// `audit.dropped`: the oldest records deleted for good, older than the
    /// retention window (`args`: `first_seq`, `through_seq`, `records`,
    /// `from` = `"store"` or `"archive"`, `file` for the archive).
    #[serde(rename = "audit.dropped")]
    AuditDropped,
}

impl EventKind {
    /// Every kind, in the order of DESIGN section 6, then the tiering
    /// records (`docs/audit-format.md`, "Tiers").
    pub const ALL: [Self; 17] = [
        Self::TaskStarted,
        Self::TaskCompleted,
        Self::TaskHalted,
        Self::TokenIssued,
        Self::TokenRefreshed,
        Self::TokenRevoked,
        Self::CallDenied,
        Self::CallAllowed,
        Self::CallCompleted,
        Self::StateTransition,
        Self::ElevationRequested,
        Self::ElevationApproved,
        Self::ElevationDenied,
        Self::Anomaly,
        Self::ConfigLoaded,
        Self::AuditArchived,
        Self::AuditDropped,
    ];

    /// The stable string form, e.g. `"call.denied"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TaskStarted => "task.started",
            Self::TaskCompleted => "task.completed",
            Self::TaskHalted => "task.halted",
            Self::TokenIssued => "token.issued",
            Self::TokenRefreshed => "token.refreshed",
            Self::TokenRevoked => "token.revoked",
            Self::CallDenied => "call.denied",
            Self::CallAllowed => "call.allowed",
            Self::CallCompleted => "call.completed",
            Self::StateTransition => "state.transition",
            Self::ElevationRequested => "elevation.requested",
            Self::ElevationApproved => "elevation.approved",
            Self::ElevationDenied => "elevation.denied",
            Self::Anomaly => "anomaly",
            Self::ConfigLoaded => "config.loaded",
            Self::AuditArchived => "audit.archived",
            Self::AuditDropped => "audit.dropped",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not an [`EventKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown audit event kind {0:?}")]
pub struct UnknownEventKind(String);

impl FromStr for EventKind {
    type Err = UnknownEventKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownEventKind(s.chars().take(64).collect()))
    }
}

/// One audit event before it has a sequence number. Serialized with the
/// field names of DESIGN section 6; `None` and empty fields are omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// When it happened.
    pub ts: Timestamp,
    /// What happened.
    pub kind: EventKind,
    /// The task concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The agent concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The tool called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// `allow` or `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// The reason code (DESIGN section 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The Cedar policies that decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
    /// The call's arguments, already redacted by the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Value>,
    /// Digest of the upstream result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_digest: Option<String>,
    /// Upstream latency in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Workflow state before a transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_from: Option<String>,
    /// Workflow state after a transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_to: Option<String>,
    /// The token concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Free-form detail (e.g. the anomaly rule, the config digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl NewEvent {
    /// An event with only its time and kind; callers fill the other fields
    /// directly.
    pub const fn new(ts: Timestamp, kind: EventKind) -> Self {
        Self {
            ts,
            kind,
            task_id: None,
            agent_id: None,
            tool: None,
            decision: None,
            reason: None,
            policy_ids: Vec::new(),
            args: None,
            result_digest: None,
            latency_us: None,
            state_from: None,
            state_to: None,
            jti: None,
            detail: None,
        }
    }
}

/// A stored audit event: one record of `docs/audit-format.md`. Serializes
/// as one flat JSON object:
/// `{"seq": .., "ts": .., "kind": .., ...the NewEvent fields..., "prev_hash": .., "hash": ..}`.
///
/// `prev_hash` and `hash` are computed by the store when the event is
/// appended (see [`crate::chain`]); they are never chosen by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Its position in the log: strictly increasing, gap-free, never reused.
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub event: NewEvent,
    /// The `hash` of the record before, 64 lowercase hex digits;
    /// [`crate::chain::GENESIS`] (64 `0`s) for the first record.
    pub prev_hash: String,
    /// This record's hash: lowercase hex SHA-256 of `prev_hash` followed by
    /// the canonical JSON of the record without `hash`
    /// ([`crate::chain::record_hash`]).
    pub hash: String,
}

/// A signed checkpoint of the audit hash chain (`docs/audit-format.md`,
/// "Checkpoints"): the gateway's signature over the text
/// [`checkpoint_message`]`(seq, hash, ts)`. The store checks that `seq`
/// and `hash` name a stored record; the signature is the gateway's business
/// (and a verifier's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last record covered.
    pub seq: u64,
    /// That record's `hash`.
    pub hash: String,
    /// When it was signed, Unix milliseconds.
    pub ts: Timestamp,
    /// The signing key's id (an Ed25519 key of the gateway's JWKS).
    pub kid: String,
    /// The Ed25519 signature, base64url without padding.
    pub sig: String,
}

/// The exact text a [`Checkpoint`] signs (`docs/audit-format.md`): ASCII
/// `portcullis-audit-checkpoint-v1\n<seq>\n<hash>\n<ts>`, with `seq` and
/// `ts` in decimal and no trailing newline.
pub fn checkpoint_message(seq: u64, hash: &str, ts: Timestamp) -> String {
    format!("portcullis-audit-checkpoint-v1\n{seq}\n{hash}\n{}", ts.0)
}

/// The [`crate::StoreError::Conflict`] message of an
/// [`Op::AppendCheckpoint`] whose `seq` names no stored record.
pub const CHECKPOINT_NO_SUCH_RECORD: &str = "checkpoint names no stored record";
/// The [`crate::StoreError::Conflict`] message of an
/// [`Op::AppendCheckpoint`] whose `hash` is not the stored record's.
pub const CHECKPOINT_HASH_MISMATCH: &str = "checkpoint hash is not the record's hash";
/// The [`crate::StoreError::Conflict`] message of an
/// [`Op::AppendCheckpoint`] for a `seq` that already has a different
/// checkpoint.
pub const CHECKPOINT_EXISTS: &str = "a different checkpoint of this seq exists";

/// Largest [`ToolPin::definition`] the ledger stores, in bytes of its
/// serialized JSON (1 MiB). A larger definition is refused
/// ([`crate::StoreError::Conflict`]).
pub const MAX_PIN_DEFINITION_BYTES: usize = 1024 * 1024;

/// A pinned tool definition: what an admin (or first use) approved.
///
/// The gateway pins each upstream tool's full definition when it first sees
/// it and compares later listings against [`hash`](Self::hash); a changed
/// definition is not used until re-approved ([`Op::PinTool`] again, which
/// replaces the pin). Serializes as one flat JSON object with these field
/// names (`pinned_at` in Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolPin {
    /// The gateway's tool name (`<upstream>.<tool>`).
    pub tool: String,
    /// The upstream it comes from.
    pub upstream: String,
    /// SHA-256 hex of the canonical JSON of `definition`: 64 lowercase hex
    /// digits. The store checks the form, not the digest; computing it is
    /// the caller's business.
    pub hash: String,
    /// The definition as pinned (name, title, description, inputSchema,
    /// outputSchema, annotations): a JSON object of at most
    /// [`MAX_PIN_DEFINITION_BYTES`] serialized.
    pub definition: serde_json::Value,
    /// When it was pinned or last re-approved.
    pub pinned_at: Timestamp,
    /// Who approved it: "first-use" or an admin's name.
    pub approved_by: String,
}

/// Refuses an [`Op::PinTool`] that cannot be a pin; returns the
/// definition's serialized JSON (what backends store) when it can.
pub(crate) fn check_pin(pin: &ToolPin) -> Result<String, crate::StoreError> {
    let refuse = |why: String| {
        Err(crate::StoreError::Conflict(format!(
            "pin tool {:?}: {why}",
            pin.tool.chars().take(128).collect::<String>()
        )))
    };
    if pin.tool.is_empty() {
        return refuse("the tool name is empty".into());
    }
    if pin.upstream.is_empty() {
        return refuse("the upstream is empty".into());
    }
    if pin.approved_by.is_empty() {
        return refuse("approved_by is empty".into());
    }
    let hex = pin.hash.len() == 64
        && pin
            .hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return refuse("the hash is not 64 lowercase hex digits".into());
    }
    if !pin.definition.is_object() {
        return refuse("the definition is not a JSON object".into());
    }
    let json = match serde_json::to_string(&pin.definition) {
        Ok(json) => json,
        Err(e) => return refuse(format!("the definition does not serialize: {e}")),
    };
    if json.len() > MAX_PIN_DEFINITION_BYTES {
        return refuse(format!(
            "the definition is {} bytes, more than {MAX_PIN_DEFINITION_BYTES}",
            json.len()
        ));
    }
    Ok(json)
}

/// Which audit events to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only events of this task.
    pub task_id: Option<String>,
    /// Only events of this kind.
    pub kind: Option<EventKind>,
    /// Only events after this seq (exclusive), for paging.
    pub since_seq: Option<u64>,
    /// At most this many events: [`DEFAULT_AUDIT_LIMIT`] when `None`, never
    /// more than [`MAX_AUDIT_LIMIT`].
    pub limit: Option<usize>,
}

impl AuditQuery {
    /// The number of events this query may return, after default and cap.
    pub fn effective_limit(&self) -> usize {
        self.limit
            .unwrap_or(DEFAULT_AUDIT_LIMIT)
            .min(MAX_AUDIT_LIMIT)
    }
}

/// One mutation inside an atomic batch ([`crate::Store::commit`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Inserts a new task; a duplicate id is a [`crate::StoreError::Conflict`].
    InsertTask(TaskRecord),
    /// Replaces a task if its stored version equals `expected_version`, else
    /// [`crate::StoreError::Conflict`]. The record carries the NEW version,
    /// which must be greater than `expected_version`.
    UpdateTask {
        /// The task after the change, with its new version.
        record: TaskRecord,
        /// The version the change was computed from.
        expected_version: u64,
    },
    /// Records an issued token; its task must exist, its jti must be new.
    InsertToken(TokenRecord),
    /// Revokes one token; a no-op when it is already revoked or unknown.
    RevokeToken {
        /// The token.
        jti: String,
        /// When.
        at: Timestamp,
        /// Why (stored with the token).
        reason: String,
    },
    /// Revokes every unrevoked token of a task and marks every unspent
    /// refresh token of it spent.
    RevokeTaskTokens {
        /// The task.
        task_id: String,
        /// When.
        at: Timestamp,
        /// Why (stored with each token).
        reason: String,
    },
    /// Records an issued refresh token; its task must exist, its hash must be
    /// new.
    InsertRefresh(RefreshRecord),
    /// Spends a refresh token: it must exist
    /// ([`crate::StoreError::RefreshUnknown`]), be unspent
    /// ([`crate::StoreError::RefreshSpent`]) and have `idle_expires_at > at`
    /// ([`crate::StoreError::RefreshExpired`]).
    SpendRefresh {
        /// SHA-256 hex of the presented token.
        hash: String,
        /// When.
        at: Timestamp,
    },
    /// Appends an audit event; its seq is returned in [`Committed::seqs`].
    /// The store gives it its `prev_hash` and `hash` (the hash chain, in
    /// commit order).
    Append(NewEvent),
    /// Stores a signed checkpoint of the hash chain. A
    /// [`crate::StoreError::Conflict`] (and the whole batch rolls back) when
    /// no stored record has its `seq` (message [`CHECKPOINT_NO_SUCH_RECORD`]),
    /// when that record's hash is not its `hash`
    /// ([`CHECKPOINT_HASH_MISMATCH`]), or when a different checkpoint of the
    /// same `seq` is stored ([`CHECKPOINT_EXISTS`]). Storing the very same
    /// checkpoint again is a no-op, so a retry after an unknown outcome is
    /// safe. The signature is not checked here.
    AppendCheckpoint(Checkpoint),
    /// Records an elevation request. It must be a fresh request (status
    /// [`ElevationStatus::Pending`], no `decided_at`, `decided_by`, `note` or
    /// `expires_at`), its task must exist and its id must be new; anything
    /// else is a [`crate::StoreError::Conflict`].
    InsertElevation(ElevationRecord),
    /// A guard: the whole batch fails with
    /// [`crate::StoreError::TooManyPending`] (nothing of it is kept) when
    /// the task has `max` or more pending elevation requests at this point
    /// of the batch. Put before an [`Op::InsertElevation`] to cap a task's
    /// pending requests; the count and the insert are one transaction
    /// (PostgreSQL locks the task's row first, so replicas racing on one
    /// task cannot both pass it).
    CapPendingElevations {
        /// The task.
        task_id: String,
        /// Most pending requests the task may already have.
        max: u32,
    },
    /// Records that `agent_id` has called `tool` (for the `new_tool`
    /// anomaly rule); a no-op when it already has.
    RecordToolUse {
        /// The agent.
        agent_id: String,
        /// The tool.
        tool: String,
        /// When (kept only for the first use).
        at: Timestamp,
    },
    /// Decides a pending elevation, exactly once. A
    /// [`crate::StoreError::Conflict`] (and the whole batch rolls back) when:
    ///
    /// * `status` is [`ElevationStatus::Pending`];
    /// * an approval has no `expires_at`, or one not after `at`; a denial
    ///   has an `expires_at`;
    /// * no elevation has this id (message [`NO_SUCH_ELEVATION`]);
    /// * the stored elevation is no longer pending (message
    ///   [`ELEVATION_ALREADY_DECIDED`]): of two approvers racing on one
    ///   request, exactly one wins;
    /// * an approval whose `by` is the requesting agent: an agent never
    ///   approves its own request.
    ///
    /// Backends implement it as one conditional update (`… WHERE id = ? AND
    /// status = 'pending'`), so the race is decided by the database.
    DecideElevation {
        /// The elevation.
        id: String,
        /// [`ElevationStatus::Approved`] or [`ElevationStatus::Denied`].
        status: ElevationStatus,
        /// Who decides (stored as `decided_by`).
        by: String,
        /// When (stored as `decided_at`).
        at: Timestamp,
        /// The approver's note.
        note: Option<String>,
        /// For an approval: when the grant lapses (required, after `at`);
        /// `None` for a denial.
        expires_at: Option<Timestamp>,
    },
    /// Stores a pinned tool definition, replacing the stored pin of the same
    /// [`ToolPin::tool`] if there is one (an upsert: re-approval replaces
    /// the pin whole). A [`crate::StoreError::Conflict`] (and the whole
    /// batch rolls back) when `tool`, `upstream` or `approved_by` is empty,
    /// `hash` is not 64 lowercase hex digits, or `definition` is not a JSON
    /// object of at most [`MAX_PIN_DEFINITION_BYTES`] serialized.
    PinTool(ToolPin),
    /// Deletes the oldest audit records, `after_seq + 1 ..= through_seq`,
    /// and the checkpoints below `through_seq` (the one at `through_seq`
    /// stays: it anchors the chain that remains). For tiering and
    /// retention; the caller appends, in the same batch, the
    /// `audit.archived` or `audit.dropped` record that says so. A
    /// [`crate::StoreError::Conflict`] (and the whole batch rolls back)
    /// when:
    ///
    /// * `through_seq <= after_seq`;
    /// * the oldest stored record is not `after_seq + 1` (message
    ///   [`PRUNE_MOVED`]): another pass pruned first, so of two replicas
    ///   racing on one segment exactly one wins;
    /// * no checkpoint is stored at `through_seq` with that record's hash
    ///   (message [`PRUNE_NOT_ANCHORED`]): only whole checkpoint segments
    ///   go;
    /// * `through_seq` is the newest record (message [`PRUNE_HEAD`]): the
    ///   chain's head always stays in the store.
    PruneAudit {
        /// The seq below the oldest stored record (0 before any pruning).
        after_seq: u64,
        /// The last record to delete; a checkpoint must cover exactly it.
        through_seq: u64,
    },
}

/// The [`crate::StoreError::Conflict`] message of an [`Op::PruneAudit`]
/// whose `after_seq` is not where the stored log starts.
pub const PRUNE_MOVED: &str = "the oldest audit records were pruned or moved meanwhile";
/// The [`crate::StoreError::Conflict`] message of an [`Op::PruneAudit`]
/// whose `through_seq` has no checkpoint of the stored record.
pub const PRUNE_NOT_ANCHORED: &str = "no checkpoint covers the last record to prune";
/// The [`crate::StoreError::Conflict`] message of an [`Op::PruneAudit`]
/// that would delete the chain's head.
pub const PRUNE_HEAD: &str = "the newest audit record cannot be pruned";

/// What a committed batch produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// The seq given to each [`Op::Append`], in op order.
    pub seqs: Vec<u64>,
    /// The jtis revoked by this batch (only tokens that were unrevoked).
    pub revoked: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kind_strings_round_trip() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), kind);
        }
        assert!("task.unknown".parse::<EventKind>().is_err());
    }

    #[test]
    fn token_kind_strings_round_trip() {
        for kind in [TokenKind::Access, TokenKind::Hop] {
            assert_eq!(kind.as_str().parse::<TokenKind>(), Ok(kind));
        }
        assert!("refresh".parse::<TokenKind>().is_err());
    }

    #[test]
    fn audit_event_is_one_flat_object_without_empty_fields() {
        let mut event = NewEvent::new(Timestamp(5), EventKind::CallDenied);
        event.task_id = Some("t1".into());
        event.reason = Some("tool_not_allowed".into());
        event.latency_us = Some(u64::MAX);
        let stored = AuditEvent {
            seq: 7,
            event,
            prev_hash: "0".repeat(64),
            hash: "ab".repeat(32),
        };
        let json = serde_json::to_value(&stored).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "seq": 7, "ts": 5, "kind": "call.denied", "task_id": "t1",
                "reason": "tool_not_allowed", "latency_us": u64::MAX,
                "prev_hash": "0".repeat(64), "hash": "ab".repeat(32),
            })
        );
        // The chain fields come last, after the event's.
        let text = serde_json::to_string(&stored).unwrap();
        assert!(
            text.starts_with(r#"{"seq":7,"ts":5,"kind":"call.denied","task_id":"t1","#),
            "{text}"
        );
        assert!(
            text.ends_with(&format!(
                r#""latency_us":{},"prev_hash":"{}","hash":"{}"}}"#,
                u64::MAX,
                "0".repeat(64),
                "ab".repeat(32)
            )),
            "{text}"
        );
        let back: AuditEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, stored);
        // A record without its chain fields does not decode.
        let bare = serde_json::json!({"seq": 7, "ts": 5, "kind": "call.denied"});
        assert!(serde_json::from_value::<AuditEvent>(bare).is_err());
    }

    #[test]
    fn checkpoint_message_is_the_documented_text() {
        assert_eq!(
            checkpoint_message(42, &"a1".repeat(32), Timestamp(1_700_000_000_123)),
            format!(
                "portcullis-audit-checkpoint-v1\n42\n{}\n1700000000123",
                "a1".repeat(32)
            )
        );
        let checkpoint = Checkpoint {
            seq: 3,
            hash: "h".into(),
            ts: Timestamp(9),
            kid: "k1".into(),
            sig: "s".into(),
        };
        let json = serde_json::to_value(&checkpoint).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"seq": 3, "hash": "h", "ts": 9, "kid": "k1", "sig": "s"})
        );
        assert_eq!(
            serde_json::from_value::<Checkpoint>(json).unwrap(),
            checkpoint
        );
    }

    #[test]
    fn elevation_status_strings_round_trip() {
        for status in ElevationStatus::ALL {
            assert_eq!(status.as_str().parse::<ElevationStatus>(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
            assert_eq!(
                serde_json::from_str::<ElevationStatus>(&json).unwrap(),
                status
            );
        }
        assert!("Pending".parse::<ElevationStatus>().is_err());
        assert!("revoked".parse::<ElevationStatus>().is_err());
    }

    #[test]
    fn elevation_record_serializes_flat() {
        let record = ElevationRecord {
            id: "e1".into(),
            task_id: "t1".into(),
            agent_id: "a1".into(),
            tool: "s3.get".into(),
            reason: "need the manifest".into(),
            status: ElevationStatus::Approved,
            requested_at: Timestamp(5),
            decided_at: Some(Timestamp(6)),
            decided_by: Some("alice".into()),
            note: None,
            expires_at: Some(Timestamp(9)),
            held: Some(HeldCall {
                rule: "approval".into(),
                args_digest: Some("ab".repeat(32)),
                args: Some(serde_json::json!({"key": "k"})),
            }),
        };
        assert_eq!(
            serde_json::to_value(&record).unwrap(),
            serde_json::json!({
                "id": "e1", "task_id": "t1", "agent_id": "a1", "tool": "s3.get",
                "reason": "need the manifest", "status": "approved", "requested_at": 5,
                "decided_at": 6, "decided_by": "alice", "note": null, "expires_at": 9,
                "held": {"rule": "approval", "args_digest": "ab".repeat(32), "args": {"key": "k"}},
            })
        );
    }

    #[test]
    fn decisions_are_checked_before_storage() {
        let at = Timestamp(10);
        let ok = |status, expires_at| check_decision("e", status, at, expires_at).is_ok();
        assert!(ok(ElevationStatus::Approved, Some(Timestamp(11))));
        assert!(ok(ElevationStatus::Denied, None));
        assert!(!ok(ElevationStatus::Pending, None));
        assert!(!ok(ElevationStatus::Pending, Some(Timestamp(11))));
        assert!(!ok(ElevationStatus::Approved, None));
        assert!(!ok(ElevationStatus::Approved, Some(at)));
        assert!(!ok(ElevationStatus::Denied, Some(Timestamp(11))));
    }

    fn sample_pin() -> ToolPin {
        ToolPin {
            tool: "warehouse.query".into(),
            upstream: "warehouse".into(),
            hash: "0123456789abcdef".repeat(4),
            definition: serde_json::json!({
                "name": "query",
                "inputSchema": {"type": "object"},
            }),
            pinned_at: Timestamp(7),
            approved_by: "first-use".into(),
        }
    }

    #[test]
    fn tool_pin_serializes_flat() {
        let pin = sample_pin();
        let json = serde_json::to_value(&pin).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "tool": "warehouse.query", "upstream": "warehouse",
                "hash": "0123456789abcdef".repeat(4),
                "definition": {"name": "query", "inputSchema": {"type": "object"}},
                "pinned_at": 7, "approved_by": "first-use",
            })
        );
        assert_eq!(serde_json::from_value::<ToolPin>(json).unwrap(), pin);
    }

    #[test]
    fn pins_are_checked_before_storage() {
        let ok = sample_pin();
        assert_eq!(
            check_pin(&ok).unwrap(),
            serde_json::to_string(&ok.definition).unwrap()
        );
        let bad = |change: fn(&mut ToolPin)| {
            let mut pin = sample_pin();
            change(&mut pin);
            match check_pin(&pin) {
                Err(crate::StoreError::Conflict(message)) => message,
                other => panic!("{pin:?} must be refused: {other:?}"),
            }
        };
        assert!(bad(|p| p.tool.clear()).contains("tool name is empty"));
        assert!(bad(|p| p.upstream.clear()).contains("upstream is empty"));
        assert!(bad(|p| p.approved_by.clear()).contains("approved_by"));
        for hash in [
            String::new(),
            "0".repeat(63),
            "0".repeat(65),
            "A".repeat(64),
            "g".repeat(64),
            format!("{}é", "0".repeat(62)),
        ] {
            let mut pin = sample_pin();
            pin.hash = hash;
            assert!(
                matches!(check_pin(&pin), Err(crate::StoreError::Conflict(_))),
                "{:?}",
                pin.hash
            );
        }
        for definition in [
            serde_json::json!(null),
            serde_json::json!([1]),
            serde_json::json!("tool"),
        ] {
            let mut pin = sample_pin();
            pin.definition = definition;
            assert!(check_pin(&pin).unwrap_err().to_string().contains("object"));
        }
        // The size bound is on the serialized JSON, inclusive.
        let mut pin = sample_pin();
        let overhead = r#"{"d":""}"#.len();
        pin.definition = serde_json::json!({"d": "x".repeat(MAX_PIN_DEFINITION_BYTES - overhead)});
        assert_eq!(check_pin(&pin).unwrap().len(), MAX_PIN_DEFINITION_BYTES);
        pin.definition =
            serde_json::json!({"d": "x".repeat(MAX_PIN_DEFINITION_BYTES - overhead + 1)});
        assert!(check_pin(&pin).unwrap_err().to_string().contains("bytes"));
    }

    #[test]
    fn audit_limit_defaults_and_caps() {
        assert_eq!(AuditQuery::default().effective_limit(), DEFAULT_AUDIT_LIMIT);
        let huge = AuditQuery {
            limit: Some(usize::MAX),
            ..AuditQuery::default()
        };
        assert_eq!(huge.effective_limit(), MAX_AUDIT_LIMIT);
    }
}
