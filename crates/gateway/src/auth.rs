//! Authentication: the first step of every request.
//!
//! Three kinds of caller, each with its own credential:
//!
//! - an **agent's task** presents an access token (`Authorization: Bearer`):
//!   the signature is verified (cached until `exp`), then the ledger is asked
//!   on every request whether the token is still live — revocation is never
//!   cached;
//! - an **orchestrator** starting a task presents the agent's bootstrap
//!   secret, compared by SHA-256 in constant time against every agent;
//! - an **admin** presents a token whose SHA-256 is configured, compared in
//!   constant time against every admin, with roles checked after.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use portcullis_config::Role;
use portcullis_core::Reason;
use portcullis_store::TokenKind;
use portcullis_token::{Claims, Expect};

use crate::error::{ApiError, Kind};
use crate::pipeline::{ledger_deadline, within_deadline};
use crate::state::{AdminEntry, Gateway};

/// The bearer credential of a request: `None` when there is no
/// `Authorization` header; `token_invalid` when it is not `Bearer <token>`.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::denied(
            Reason::TokenInvalid,
            "more than one Authorization header",
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| ApiError::denied(Reason::TokenInvalid, "Authorization header is not ASCII"))?;
    let (scheme, token) = text.split_once(' ').ok_or_else(|| {
        ApiError::denied(
            Reason::TokenInvalid,
            "expected Authorization: Bearer <token>",
        )
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(ApiError::denied(
            Reason::TokenInvalid,
            "expected Authorization: Bearer <token>",
        ));
    }
    Ok(Some(token))
}

impl Gateway {
    /// Verifies an access token of this gateway and checks the ledger that
    /// it is live, within
    /// [`LEDGER_DEADLINE`](crate::pipeline::LEDGER_DEADLINE). Hop tokens
    /// (other audiences) are `wrong_audience`.
    pub async fn authenticate_token(&self, token: &str) -> Result<Claims, ApiError> {
        self.authenticate_token_until(token, ledger_deadline())
            .await
    }

    /// [`Self::authenticate_token`], with the ledger's answer due by
    /// `deadline`.
    async fn authenticate_token_until(
        &self,
        token: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Claims, ApiError> {
        within_deadline("checking the token", deadline, self.authenticate_now(token)).await
    }

    async fn authenticate_now(&self, token: &str) -> Result<Claims, ApiError> {
        let now = self.now();
        let expect = Expect {
            issuer: &self.settings.issuer,
            audience: &self.settings.issuer,
            now: now.as_secs(),
        };
        let claims = self
            .cache
            .verify(&self.ring, token, &expect)
            .map_err(|e| ApiError::denied(e.reason(), e.to_string()))?;
        if self.live.contains(&claims.jti) {
            return Ok(claims);
        }
        let record = self
            .store
            .token(&claims.jti)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        match record {
            None => Err(ApiError::denied(
                Reason::TokenRevoked,
                "token is not in the ledger",
            )),
            // A revoked token of a task that is halted says so (only an
            // admin can resume it): told by the task's typed status, never
            // by the wording of the revocation. After a resume it is just a
            // revoked token.
            Some(r) if r.revoked_at.is_some() => {
                let why = r.revoke_reason.unwrap_or_default();
                let halted = matches!(
                    self.store.task(&r.task_id).await,
                    Ok(Some(t)) if t.task.status == portcullis_core::TaskStatus::Halted
                );
                if halted {
                    Err(ApiError::denied(
                        Reason::AnomalyHalt,
                        format!("the task is halted: {why}"),
                    ))
                } else {
                    Err(ApiError::denied(
                        Reason::TokenRevoked,
                        format!("token revoked: {why}"),
                    ))
                }
            }
            Some(r) if r.kind != TokenKind::Access => Err(ApiError::denied(
                Reason::TokenInvalid,
                "not an access token",
            )),
            Some(_) => {
                self.live.insert(&claims.jti, claims.exp, now.as_secs());
                Ok(claims)
            }
        }
    }

    /// Whether `token` is an access token this gateway signed (signature and
    /// claims only; revocation does not matter to the question).
    fn is_task_token(&self, token: &str) -> bool {
        let expect = Expect {
            issuer: &self.settings.issuer,
            audience: &self.settings.issuer,
            now: self.now().as_secs(),
        };
        self.cache.verify(&self.ring, token, &expect).is_ok()
    }

    /// Authenticates the bearer access token of a request.
    /// The ledger's answer is due by `deadline` ([`ledger_deadline`]; a
    /// refusal's record shares it).
    pub(crate) async fn authenticate(
        &self,
        headers: &HeaderMap,
        deadline: tokio::time::Instant,
    ) -> Result<Claims, ApiError> {
        let token = bearer(headers)?
            .ok_or_else(|| ApiError::denied(Reason::TokenMissing, "no bearer token"))?;
        self.authenticate_token_until(token, deadline).await
    }

    /// The admin whose token the request carries, if any (constant time
    /// over all admins).
    pub(crate) fn admin_of(&self, headers: &HeaderMap) -> Result<Option<&AdminEntry>, ApiError> {
        let Some(token) = bearer(headers)? else {
            return Ok(None);
        };
        let mut found = None;
        for admin in &self.admins {
            if portcullis_token::matches_sha256(token.as_bytes(), &admin.token_sha256) {
                found = Some(admin);
            }
        }
        Ok(found)
    }

    /// Requires an admin token with `role`.
    pub(crate) fn require_admin(
        &self,
        headers: &HeaderMap,
        role: Role,
    ) -> Result<&AdminEntry, ApiError> {
        match self.admin_of(headers)? {
            Some(admin) if admin.roles.contains(&role) => Ok(admin),
            Some(admin) => Err(ApiError::new(
                Kind::Forbidden,
                format!("admin {} lacks the {role:?} role", admin.name).to_lowercase(),
            )),
            None => match bearer(headers)? {
                None => Err(ApiError::denied(Reason::TokenMissing, "no bearer token")),
                // A genuine task token is authenticated, just not allowed
                // here: 403, so an agent can never act as an admin (and in
                // particular never approve its own elevation).
                Some(token) if self.is_task_token(token) => Err(ApiError::new(
                    Kind::Forbidden,
                    "a task token cannot call the admin API",
                )),
                Some(_) => Err(ApiError::denied(Reason::TokenInvalid, "not an admin token")),
            },
        }
    }

    /// The agent whose bootstrap secret the request carries, if any
    /// (constant time over all agents).
    pub(crate) fn bootstrap_agent(&self, headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
        let Some(secret) = bearer(headers)? else {
            return Ok(None);
        };
        let mut found = None;
        for (agent, hash) in &self.bootstrap {
            if portcullis_token::matches_sha256(secret.as_bytes(), hash) {
                found = Some(agent.as_str());
            }
        }
        Ok(found)
    }
}
