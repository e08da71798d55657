//! Per-hop credential providers (DESIGN section 5): what an upstream
//! receives instead of the agent's token.
//!
//! Each upstream has one [`CredentialProvider`], chosen by its
//! `credential.kind`. A provider issues a credential for one call (or, for
//! token exchange, one set of tools) of one task, and returns the ledger
//! operations that record what it issued, so they commit in the same
//! transaction as the call's write-ahead record.
//!
//! | kind | provider | what the upstream gets |
//! |---|---|---|
//! | `jwt` | [`JwtProvider`] | a token with `aud` = the upstream, `scope` = the tool, ≤ 60 s, never past the task's deadline; reused for the calls made with the same access token until 80 % of its lifetime |
//! | `static` | [`StaticProvider`] | a configured secret as a header; the agent never sees it |
//! | `none` | [`NoCredential`] | nothing |
//! | `postgres-role` | [`crate::pgrole::PostgresRoleProvider`] | a database role for the task: `LOGIN`, random password, `VALID UNTIL`, only the configured grants; dropped when the task ends |

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use portcullis_config::{CredentialKind, LoadedConfig, Upstream as UpstreamConfig};
use portcullis_core::{Task, Timestamp};
use portcullis_store::{EventKind, NewEvent, Op, TokenKind, TokenRecord};
use portcullis_token::{Claims, KeyRing};
use zeroize::Zeroizing;

use crate::state::SetupError;
use crate::upstream::{HOP_TTL_SECS, HopCredential};

/// What a credential is asked for.
#[derive(Debug, Clone, Copy)]
pub struct HopRequest<'a> {
    /// The upstream that will receive it.
    pub upstream: &'a str,
    /// The task it is for.
    pub task: &'a Task,
    /// The tools it covers (one, for a forwarded call).
    pub tools: &'a [String],
    /// The task's hard end: nothing issued may outlive it.
    pub deadline: Timestamp,
    /// Now.
    pub now: Timestamp,
    /// The `jti` of the access token that made the call, when a credential
    /// issued for an earlier call made with it may be reused (a forwarded
    /// call); `None` for a fresh one.
    pub presented: Option<&'a str>,
}

/// A credential and the ledger operations that record it.
#[derive(Debug)]
pub struct Issued {
    /// The credential.
    pub credential: HopCredential,
    /// Seconds it is valid for, when it expires.
    pub ttl_secs: Option<u64>,
    /// Ledger operations to commit with the call.
    pub ops: Vec<Op>,
    /// A newly minted credential that later calls may reuse once `ops`
    /// are committed: the caller passes it to [`Reusable::keep`] then, and
    /// drops it when the commit fails (nothing unrecorded is ever reused).
    pub reuse: Option<Reusable>,
}

/// A per-hop token to keep for reuse once it is on record.
#[derive(Debug)]
pub struct Reusable {
    cache: Arc<HopCache>,
    presented: String,
    tool: String,
    kept: Kept,
}

impl Reusable {
    /// Keeps the token for the later calls of the same access token.
    pub fn keep(self) {
        let now = self.kept.minted;
        self.cache.put(&self.presented, &self.tool, self.kept, now);
    }
}

/// Why no credential could be issued; either way the call is not made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The provider cannot serve now (or at all, in this build).
    #[error("credential provider unavailable: {0}")]
    Unavailable(String),
    /// Something failed inside the gateway.
    #[error("credential provider failed: {0}")]
    Internal(String),
}

/// Issues the per-hop credentials of one upstream.
#[async_trait]
pub trait CredentialProvider: Send + Sync + std::fmt::Debug {
    /// The configured kind, for logs and audit.
    fn kind(&self) -> &'static str;

    /// A credential for `req`.
    async fn issue(&self, req: &HopRequest<'_>) -> Result<Issued, ProviderError>;

    /// The task ended (completed, halted): revoke what was issued for it
    /// that outlives the task on its own (database roles). Best effort; a
    /// sweeper catches what this misses.
    async fn release(&self, _task_id: &str) {}

    /// Revokes what was issued for tasks no longer active (after a crash,
    /// a timeout); returns how many. Called periodically.
    async fn sweep(&self, _store: &dyn portcullis_store::Store) -> usize {
        0
    }
}

/// Signed per-hop tokens, verifiable by the upstream through the JWKS.
#[derive(Debug, Clone)]
pub struct JwtProvider {
    ring: KeyRing,
    issuer: String,
    /// Tokens kept for reuse, when this provider serves forwarded calls.
    reuse: Option<Arc<HopCache>>,
}

/// Most per-hop tokens one upstream keeps for reuse.
pub const HOP_CACHE_MAX: usize = 4096;

/// Per-hop tokens minted for forwarded calls, kept for reuse: one per
/// (presented access token, tool), until 80 % of its lifetime. Minting one
/// per call cost a signature and two ledger records (the token and its
/// `token.issued` event) per call. Keyed on the presented token, so a
/// refresh, a rotation (`reverify`) or a resume — each a new access token —
/// gets a fresh per-hop token, on every replica; a token is never shared
/// between tasks or tools.
#[derive(Debug, Default)]
struct HopCache {
    by_key: Mutex<HashMap<(String, String), Kept>>,
}

#[derive(Debug, Clone)]
struct Kept {
    task_id: String,
    token: String,
    minted: Timestamp,
    reuse_until: Timestamp,
    expires: Timestamp,
}

impl HopCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Kept>> {
        // Entries are replaced whole: a panic cannot leave one half-written.
        self.by_key.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, presented: &str, tool: &str, now: Timestamp) -> Option<Kept> {
        let map = self.lock();
        let kept = map.get(&(presented.to_owned(), tool.to_owned()))?;
        (kept.minted <= now && now < kept.reuse_until).then(|| kept.clone())
    }

    fn put(&self, presented: &str, tool: &str, kept: Kept, now: Timestamp) {
        let mut map = self.lock();
        if map.len() >= HOP_CACHE_MAX {
            map.retain(|_, k| now < k.reuse_until);
            if map.len() >= HOP_CACHE_MAX {
                map.clear();
            }
        }
        map.insert((presented.to_owned(), tool.to_owned()), kept);
    }

    fn forget_task(&self, task_id: &str) {
        self.lock().retain(|_, k| k.task_id != task_id);
    }
}

/// The `aud` of a per-hop token from token exchange for `upstream`:
/// `exchange.<upstream>`. Upstream names contain no `.`, so it is never an
/// upstream's own name, which is the `aud` of what the gateway forwards.
pub fn exchange_audience(upstream: &str) -> String {
    format!("exchange.{upstream}")
}

impl JwtProvider {
    /// A provider signing with `ring` as `issuer`.
    pub fn new(ring: KeyRing, issuer: String) -> Self {
        Self {
            ring,
            issuer,
            reuse: None,
        }
    }

    /// The same signer, with a cache of its own for reusing the tokens of
    /// forwarded calls (one per upstream).
    pub fn reusing(&self) -> Self {
        Self {
            reuse: Some(Arc::new(HopCache::default())),
            ..self.clone()
        }
    }

    /// Mints the token the gateway forwards with a call (synchronously; no
    /// I/O): `aud` is the upstream's name.
    pub fn mint(&self, req: &HopRequest<'_>) -> Result<Issued, ProviderError> {
        self.mint_for(req, req.upstream.to_owned(), "per-hop")
    }

    /// Mints the token of a token exchange, which the agent presents to the
    /// upstream itself: `aud` is [`exchange_audience`], so an upstream
    /// tells it from what the gateway forwards, and one that accepts only
    /// its own name refuses it.
    pub fn mint_exchanged(&self, req: &HopRequest<'_>) -> Result<Issued, ProviderError> {
        self.mint_for(
            req,
            exchange_audience(req.upstream),
            "per-hop (token exchange)",
        )
    }

    fn mint_for(
        &self,
        req: &HopRequest<'_>,
        aud: String,
        what: &str,
    ) -> Result<Issued, ProviderError> {
        let jti = portcullis_token::random_id("hop_")
            .map_err(|e| ProviderError::Internal(e.to_string()))?;
        let expires = Timestamp(
            req.now
                .plus_millis(HOP_TTL_SECS * 1000)
                .0
                .min(req.deadline.0),
        );
        let task = req.task;
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: task.agent_id.clone(),
            aud,
            exp: expires.as_secs(),
            iat: req.now.as_secs(),
            nbf: req.now.as_secs(),
            jti: jti.clone(),
            client_id: task.agent_id.clone(),
            task_id: task.id.clone(),
            agent_type: task.agent_type.clone(),
            scope: req.tools.join(" "),
        };
        let token = portcullis_token::mint(&self.ring, &claims)
            .map_err(|e| ProviderError::Internal(e.to_string()))?;
        let record = TokenRecord {
            jti: jti.clone(),
            task_id: task.id.clone(),
            agent_id: task.agent_id.clone(),
            kind: TokenKind::Hop,
            issued_at: req.now,
            expires_at: expires,
            revoked_at: None,
            revoke_reason: None,
        };
        let mut event = NewEvent::new(req.now, EventKind::TokenIssued);
        event.task_id = Some(task.id.clone());
        event.agent_id = Some(task.agent_id.clone());
        event.jti = Some(jti);
        event.detail = Some(format!(
            "{what} for {}: {}",
            req.upstream,
            req.tools.join(" ")
        ));
        Ok(Issued {
            credential: HopCredential::Jwt { token },
            ttl_secs: Some(expires.as_secs().saturating_sub(req.now.as_secs())),
            ops: vec![Op::InsertToken(record), Op::Append(event)],
            reuse: None,
        })
    }
}

#[async_trait]
impl CredentialProvider for JwtProvider {
    fn kind(&self) -> &'static str {
        "jwt"
    }

    async fn issue(&self, req: &HopRequest<'_>) -> Result<Issued, ProviderError> {
        let (Some(cache), Some(presented), [tool]) = (&self.reuse, req.presented, req.tools) else {
            return self.mint(req);
        };
        if let Some(kept) = cache.get(presented, tool, req.now) {
            // Already on record (its `token.issued` event names the jti).
            return Ok(Issued {
                credential: HopCredential::Jwt { token: kept.token },
                ttl_secs: Some(kept.expires.as_secs().saturating_sub(req.now.as_secs())),
                ops: Vec::new(),
                reuse: None,
            });
        }
        let mut issued = self.mint(req)?;
        if let (HopCredential::Jwt { token }, Some(ttl)) = (&issued.credential, issued.ttl_secs) {
            let expires = req.now.plus_millis(ttl.saturating_mul(1000));
            let life = expires.0.saturating_sub(req.now.0);
            issued.reuse = Some(Reusable {
                cache: cache.clone(),
                presented: presented.to_owned(),
                tool: tool.clone(),
                kept: Kept {
                    task_id: req.task.id.clone(),
                    token: token.clone(),
                    minted: req.now,
                    reuse_until: Timestamp(req.now.0.saturating_add(life / 10 * 8)),
                    expires,
                },
            });
        }
        Ok(issued)
    }

    async fn release(&self, task_id: &str) {
        if let Some(cache) = &self.reuse {
            cache.forget_task(task_id);
        }
    }
}

/// A configured secret, injected as a header.
pub struct StaticProvider {
    header: String,
    value: Zeroizing<String>,
}

impl std::fmt::Debug for StaticProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticProvider({}: <redacted>)", self.header)
    }
}

#[async_trait]
impl CredentialProvider for StaticProvider {
    fn kind(&self) -> &'static str {
        "static"
    }

    async fn issue(&self, _req: &HopRequest<'_>) -> Result<Issued, ProviderError> {
        Ok(Issued {
            credential: HopCredential::Static {
                header: self.header.clone(),
                value: self.value.clone(),
            },
            ttl_secs: None,
            ops: Vec::new(),
            reuse: None,
        })
    }
}

/// No credential at all.
#[derive(Debug, Clone, Copy)]
pub struct NoCredential;

#[async_trait]
impl CredentialProvider for NoCredential {
    fn kind(&self) -> &'static str {
        "none"
    }

    async fn issue(&self, _req: &HopRequest<'_>) -> Result<Issued, ProviderError> {
        Ok(Issued {
            credential: HopCredential::None,
            ttl_secs: None,
            ops: Vec::new(),
            reuse: None,
        })
    }
}

/// A configured kind this build cannot issue: every call fails closed.
#[derive(Debug, Clone, Copy)]
pub struct NotAvailable(pub &'static str);

#[async_trait]
impl CredentialProvider for NotAvailable {
    fn kind(&self) -> &'static str {
        self.0
    }

    async fn issue(&self, _req: &HopRequest<'_>) -> Result<Issued, ProviderError> {
        Err(ProviderError::Unavailable(format!(
            "{} credentials are not available in this build",
            self.0
        )))
    }
}

/// The provider configured for `up`. Static secrets are read here, at
/// start-up, so a missing one stops the gateway instead of a call.
pub(crate) fn from_config(
    loaded: &LoadedConfig,
    up: &UpstreamConfig,
    jwt: &JwtProvider,
) -> Result<Arc<dyn CredentialProvider>, SetupError> {
    let c = &up.credential;
    Ok(match c.kind {
        CredentialKind::Jwt => Arc::new(jwt.reusing()),
        CredentialKind::None => Arc::new(NoCredential),
        CredentialKind::PostgresRole => {
            let url = c
                .url
                .clone()
                .unwrap_or_else(|| loaded.config.store.url.clone());
            Arc::new(
                crate::pgrole::PostgresRoleProvider::new(
                    &up.name,
                    &url,
                    c.grants.clone().unwrap_or_default(),
                    c.ttl.map(|t| t.to_std()),
                )
                .map_err(|e| SetupError(format!("upstream {}: {e}", up.name)))?,
            )
        }
        CredentialKind::Static => {
            let header = c.header.clone().unwrap_or_default();
            let value = match (&c.env, &c.file) {
                (Some(var), None) => std::env::var(var).map_err(|_| {
                    SetupError(format!(
                        "upstream {}: environment variable {var} is not set",
                        up.name
                    ))
                })?,
                (None, Some(path)) => std::fs::read_to_string(loaded.resolve(path))
                    .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                    .map_err(|e| {
                        SetupError(format!("upstream {}: cannot read {path}: {e}", up.name))
                    })?,
                _ => {
                    return Err(SetupError(format!(
                        "upstream {}: a static credential needs exactly one of env or file",
                        up.name
                    )));
                }
            };
            if value.is_empty() {
                return Err(SetupError(format!(
                    "upstream {}: the static secret is empty",
                    up.name
                )));
            }
            Arc::new(StaticProvider {
                header,
                value: Zeroizing::new(value),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn upstream_with(credential: &str, dir: &Path) -> (LoadedConfig, UpstreamConfig) {
        let text = format!(
            "[[upstreams]]\nname = \"u\"\ntransport = \"stdio\"\ncommand = [\"x\"]\ncredential = {credential}\n"
        );
        let loaded = LoadedConfig::parse(&text, &dir.join("p.toml")).unwrap();
        let up = loaded.config.upstreams[0].clone();
        (loaded, up)
    }

    fn request(task: &Task) -> HopRequest<'_> {
        HopRequest {
            upstream: "u",
            task,
            tools: &[],
            deadline: Timestamp(u64::MAX),
            now: Timestamp(0),
            presented: None,
        }
    }

    fn task() -> Task {
        Task {
            id: "t".into(),
            agent_id: "a".into(),
            agent_type: "ty".into(),
            goal: String::new(),
            state: "s".into(),
            status: portcullis_core::TaskStatus::Active,
            tools: Default::default(),
            grants: Vec::new(),
            calls: 0,
            tool_calls: Default::default(),
            version: 0,
            started_at: Timestamp(0),
            watch: Default::default(),
        }
    }

    fn jwt() -> JwtProvider {
        let key = portcullis_token::SigningKey::generate(0).unwrap();
        JwtProvider::new(KeyRing::new(vec![key], 900).unwrap(), "http://gw".into())
    }

    #[tokio::test]
    async fn static_secrets_come_from_files_and_never_show_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "s3cr3t-value\n").unwrap();
        let (loaded, up) = upstream_with(
            r#"{ kind = "static", header = "X-Api-Key", file = "secret" }"#,
            dir.path(),
        );
        let provider = from_config(&loaded, &up, &jwt()).unwrap();
        assert!(!format!("{provider:?}").contains("s3cr3t"));
        let t = task();
        let issued = provider.issue(&request(&t)).await.unwrap();
        match issued.credential {
            HopCredential::Static { header, value } => {
                assert_eq!(
                    (header.as_str(), value.as_str()),
                    ("X-Api-Key", "s3cr3t-value")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(issued.ops.is_empty());
    }

    #[tokio::test]
    async fn a_missing_secret_stops_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let (loaded, up) = upstream_with(
            r#"{ kind = "static", header = "X-Api-Key", env = "PORTCULLIS_TEST_SURELY_UNSET_VAR" }"#,
            dir.path(),
        );
        let err = from_config(&loaded, &up, &jwt()).unwrap_err();
        assert!(
            err.0.contains("PORTCULLIS_TEST_SURELY_UNSET_VAR"),
            "{}",
            err.0
        );
        let (loaded, up) = upstream_with(
            r#"{ kind = "static", header = "X-Api-Key", file = "nope" }"#,
            dir.path(),
        );
        assert!(from_config(&loaded, &up, &jwt()).is_err());
    }

    #[tokio::test]
    async fn unavailable_kinds_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (loaded, up) = upstream_with(
            r#"{ kind = "postgres-role", url = "postgres://x@127.0.0.1/db", grants = ["SELECT ON TABLE t"] }"#,
            dir.path(),
        );
        let provider = from_config(&loaded, &up, &jwt()).unwrap();
        assert_eq!(provider.kind(), "postgres-role");
        let t = task();
        assert!(matches!(
            provider.issue(&request(&t)).await,
            Err(ProviderError::Unavailable(_))
        ));
    }

    fn hop_request<'a>(
        task: &'a Task,
        now: u64,
        presented: Option<&'a str>,
        tools: &'a [String],
    ) -> HopRequest<'a> {
        HopRequest {
            upstream: "u",
            task,
            tools,
            deadline: Timestamp(u64::MAX),
            now: Timestamp(now),
            presented,
        }
    }

    fn token_of(issued: &Issued) -> String {
        match &issued.credential {
            HopCredential::Jwt { token } => token.clone(),
            other => panic!("{other:?}"),
        }
    }

    /// A per-hop token is reused only for the same access token and tool,
    /// only once it is on record, and only until 80 % of its lifetime; a
    /// task's end forgets it.
    #[tokio::test]
    async fn a_per_hop_token_is_reused_only_for_its_access_token_and_tool_while_young() {
        let provider = jwt().reusing();
        let t = task();
        let tools = &["u.read".to_owned()][..];
        let other_tools = &["u.write".to_owned()][..];
        let at = |now: u64, presented, tools| hop_request(&t, now, presented, tools);

        let first = provider
            .issue(&at(1_000, Some("at_1"), tools))
            .await
            .unwrap();
        assert_eq!(first.ops.len(), 2, "a new token is recorded");
        // Not on record yet: nothing to reuse.
        let again = provider
            .issue(&at(1_001, Some("at_1"), tools))
            .await
            .unwrap();
        assert_ne!(token_of(&again), token_of(&first));
        again.reuse.unwrap().keep();
        let kept = provider
            .issue(&at(2_000, Some("at_1"), tools))
            .await
            .unwrap();
        assert!(kept.ops.is_empty() && kept.reuse.is_none());
        let token = token_of(&kept);
        // 80 % of 60 s after minting (at 1,001 ms), still reused; then not.
        let late = provider
            .issue(&at(1_001 + 47_999, Some("at_1"), tools))
            .await
            .unwrap();
        assert_eq!(token_of(&late), token);
        let fresh = provider
            .issue(&at(1_001 + 48_000, Some("at_1"), tools))
            .await
            .unwrap();
        assert_ne!(token_of(&fresh), token);
        assert_eq!(fresh.ops.len(), 2);
        // Another access token, another tool, or no presented token: fresh.
        for (presented, tools) in [
            (Some("at_2"), tools),
            (Some("at_1"), other_tools),
            (None, tools),
        ] {
            let other = provider.issue(&at(2_000, presented, tools)).await.unwrap();
            assert_ne!(token_of(&other), token, "{presented:?} {tools:?}");
            assert_eq!(other.ops.len(), 2);
        }
        // A clock behind the minting never reuses.
        let behind = provider.issue(&at(500, Some("at_1"), tools)).await.unwrap();
        assert_ne!(token_of(&behind), token);
        // The task's end forgets it.
        provider.release("t").await;
        let after = provider
            .issue(&at(2_000, Some("at_1"), tools))
            .await
            .unwrap();
        assert_ne!(token_of(&after), token);
        // A provider without reuse (token exchange) never keeps one.
        let plain = jwt();
        let issued = plain.issue(&at(1_000, Some("at_1"), tools)).await.unwrap();
        assert!(issued.reuse.is_none());
    }
}
