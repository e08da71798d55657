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
//! | `jwt` | [`JwtProvider`] | a token with `aud` = the upstream, `scope` = the tool, ≤ 60 s, never past the task's deadline |
//! | `static` | [`StaticProvider`] | a configured secret as a header; the agent never sees it |
//! | `none` | [`NoCredential`] | nothing |
//! | `postgres-role` | [`crate::pgrole::PostgresRoleProvider`] | a database role for the task: `LOGIN`, random password, `VALID UNTIL`, only the configured grants; dropped when the task ends |

use std::sync::Arc;

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
        Self { ring, issuer }
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
        })
    }
}

#[async_trait]
impl CredentialProvider for JwtProvider {
    fn kind(&self) -> &'static str {
        "jwt"
    }

    async fn issue(&self, req: &HopRequest<'_>) -> Result<Issued, ProviderError> {
        self.mint(req)
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
        CredentialKind::Jwt => Arc::new(jwt.clone()),
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
}
