//! `credential.kind = "postgres-role"`: a real PostgreSQL role per task, as
//! the per-hop credential of an upstream that writes to a database
//! (DESIGN section 5).
//!
//! For the first call of a task to such an upstream, the provider connects
//! with `credential.url` (an account allowed to `CREATE ROLE`) and, in one
//! transaction:
//!
//! ```sql
//! CREATE ROLE "pc_<random>" LOGIN PASSWORD '<random>' VALID UNTIL '<until>';
//! COMMENT ON ROLE "pc_<random>" IS 'portcullis task <task id>';
//! GRANT <each configured grant> TO "pc_<random>";   -- e.g. INSERT ON TABLE staging
//! ```
//!
//! `<until>` is now + `credential.ttl` (default 15 minutes), never past the
//! task's deadline; later calls of the task reuse the role while it has at
//! least a minute left. The upstream receives the role as
//! `Authorization: Basic base64(role:password)` (over stdio, in
//! `_meta["io.portcullis/authorization"]`); the agent never sees it. When
//! the task completes or halts the role is dropped (`DROP OWNED BY`, then
//! `DROP ROLE`); a sweeper every minute drops roles whose task is no longer
//! active or whose `VALID UNTIL` has passed — roles orphaned by a crash
//! included. Issuance is audited (`token.issued`, role name and expiry,
//! never the password).
//!
//! Grants come from the configuration (trusted) but are still checked to be
//! one `PRIVILEGES ON object` clause: letters, digits, `_ , . ( ) "` and
//! spaces only, no `;`, no `TO`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use portcullis_core::Timestamp;
use portcullis_store::{EventKind, NewEvent, Store};
use zeroize::Zeroizing;

use crate::credential::{CredentialProvider, HopRequest, Issued, ProviderError};
use crate::upstream::HopCredential;

/// Default role lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
/// A role with less than this left is replaced rather than reused.
const REUSE_MARGIN_MS: u64 = 60_000;
/// How often orphaned roles are swept.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// The prefix of every role this provider creates.
pub const ROLE_PREFIX: &str = "pc_";
/// How long a database operation may take.
const DB_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Minted {
    role: String,
    password: Zeroizing<String>,
    until: Timestamp,
}

/// Mints PostgreSQL roles for the tasks calling one upstream.
pub struct PostgresRoleProvider {
    upstream: String,
    url: Zeroizing<String>,
    grants: Vec<String>,
    ttl: Duration,
    roles: Mutex<HashMap<String, Minted>>,
}

impl std::fmt::Debug for PostgresRoleProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresRoleProvider")
            .field("upstream", &self.upstream)
            .field("grants", &self.grants)
            .finish_non_exhaustive()
    }
}

/// Checks one configured grant: `PRIVILEGES ON object`, nothing more.
pub fn check_grant(grant: &str) -> Result<(), String> {
    let ok_chars = grant
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b" _,.()\"".contains(&b));
    let upper = grant.to_ascii_uppercase();
    let words: Vec<&str> = upper.split_whitespace().collect();
    if grant.trim().is_empty() || !ok_chars {
        return Err(format!(
            "grant {grant:?}: only letters, digits, spaces and _ , . ( ) \" are allowed"
        ));
    }
    if !words.contains(&"ON") || words.contains(&"TO") || words.first() == Some(&"ON") {
        return Err(format!(
            "grant {grant:?}: write it as PRIVILEGES ON object (e.g. INSERT ON TABLE staging)"
        ));
    }
    Ok(())
}

fn random_hex(bytes: usize) -> Result<String, ProviderError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| ProviderError::Internal(format!("randomness: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn db_err(e: impl std::fmt::Display) -> ProviderError {
    // Never the URL: it may carry a password.
    ProviderError::Unavailable(format!("the role database: {e}"))
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, ProviderError> {
    // The same sslmode/sslrootcert handling as the ledger's.
    let (config, tls) = portcullis_store::postgres::configure(url).map_err(db_err)?;
    let (client, conn) = tokio::time::timeout(DB_TIMEOUT, config.connect(tls.make()))
        .await
        .map_err(|_| db_err("no connection within 10 s"))?
        .map_err(db_err)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The RFC 3339 form PostgreSQL reads for `VALID UNTIL`.
fn timestamp_literal(t: Timestamp) -> String {
    let secs = t.0 / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}+00")
}

impl PostgresRoleProvider {
    /// A provider for `upstream`, creating roles through `url`.
    pub fn new(
        upstream: &str,
        url: &str,
        grants: Vec<String>,
        ttl: Option<Duration>,
    ) -> Result<Self, String> {
        for g in &grants {
            check_grant(g)?;
        }
        if grants.is_empty() {
            return Err("a postgres-role credential needs at least one grant".to_owned());
        }
        Ok(Self {
            upstream: upstream.to_owned(),
            url: Zeroizing::new(url.to_owned()),
            grants,
            ttl: ttl.unwrap_or(DEFAULT_TTL),
            roles: Mutex::new(HashMap::new()),
        })
    }

    async fn mint(&self, task_id: &str, until: Timestamp) -> Result<Minted, ProviderError> {
        if !task_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ProviderError::Internal(
                "task id not fit for a role comment".to_owned(),
            ));
        }
        let role = format!("{ROLE_PREFIX}{}", random_hex(12)?);
        let password = Zeroizing::new(random_hex(24)?);
        let mut sql = format!(
            "BEGIN; CREATE ROLE \"{role}\" LOGIN PASSWORD '{}' VALID UNTIL '{}'; \
             COMMENT ON ROLE \"{role}\" IS 'portcullis task {task_id}';",
            password.as_str(),
            timestamp_literal(until)
        );
        for g in &self.grants {
            sql.push_str(&format!(" GRANT {g} TO \"{role}\";"));
        }
        sql.push_str(" COMMIT;");
        let sql = Zeroizing::new(sql);
        let client = connect(&self.url).await?;
        tokio::time::timeout(DB_TIMEOUT, client.batch_execute(&sql))
            .await
            .map_err(|_| db_err("role creation timed out"))?
            .map_err(db_err)?;
        tracing::info!(upstream = %self.upstream, task_id, %role, "postgres role minted");
        Ok(Minted {
            role,
            password,
            until,
        })
    }

    /// Drops the role of `task_id`, if one was minted here.
    pub async fn release(&self, task_id: &str) {
        let minted = self
            .roles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(task_id);
        if let Some(m) = minted
            && let Err(e) = self.drop_role(&m.role).await
        {
            tracing::warn!(role = %m.role, error = %e, "could not drop a task's role; the sweeper will retry");
        }
    }

    async fn drop_role(&self, role: &str) -> Result<(), ProviderError> {
        if !role.starts_with(ROLE_PREFIX)
            || !role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(ProviderError::Internal("not one of our roles".to_owned()));
        }
        let client = connect(&self.url).await?;
        let sql =
            format!("BEGIN; DROP OWNED BY \"{role}\"; DROP ROLE IF EXISTS \"{role}\"; COMMIT;");
        tokio::time::timeout(DB_TIMEOUT, client.batch_execute(&sql))
            .await
            .map_err(|_| db_err("dropping the role timed out"))?
            .map_err(db_err)
    }

    /// Drops every role of ours whose task is not active in `store`, or
    /// whose `VALID UNTIL` has passed. Returns how many were dropped.
    pub async fn sweep(&self, store: &dyn Store) -> Result<usize, ProviderError> {
        let client = connect(&self.url).await?;
        let rows = tokio::time::timeout(
            DB_TIMEOUT,
            client.query(
                "SELECT r.rolname, shobj_description(r.oid, 'pg_authid'), \
                 (r.rolvaliduntil IS NOT NULL AND r.rolvaliduntil < now()) \
                 FROM pg_roles r WHERE r.rolname LIKE 'pc\\_%'",
                &[],
            ),
        )
        .await
        .map_err(|_| db_err("listing roles timed out"))?
        .map_err(db_err)?;
        let mut dropped = 0;
        for row in rows {
            let role: String = row.get(0);
            let comment: Option<String> = row.get(1);
            let expired: bool = row.get(2);
            let Some(task_id) = comment
                .as_deref()
                .and_then(|c| c.strip_prefix("portcullis task "))
            else {
                continue; // not ours
            };
            let active = matches!(
                store.task(task_id).await,
                Ok(Some(t)) if t.task.status == portcullis_core::TaskStatus::Active
            );
            if expired || !active {
                self.roles
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|_, m| m.role != role);
                if self.drop_role(&role).await.is_ok() {
                    dropped += 1;
                }
            }
        }
        Ok(dropped)
    }
}

#[async_trait]
impl CredentialProvider for PostgresRoleProvider {
    fn kind(&self) -> &'static str {
        "postgres-role"
    }

    async fn issue(&self, req: &HopRequest<'_>) -> Result<Issued, ProviderError> {
        let task_id = req.task.id.as_str();
        let reuse = self
            .roles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(task_id)
            .filter(|m| m.until.0 > req.now.0.saturating_add(REUSE_MARGIN_MS))
            .cloned();
        let (minted, fresh) = match reuse {
            Some(m) => (m, false),
            None => {
                let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
                let until = Timestamp(req.now.0.saturating_add(ttl_ms).min(req.deadline.0));
                let m = self.mint(task_id, until).await?;
                let old = self
                    .roles
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(task_id.to_owned(), m.clone());
                if let Some(old) = old {
                    // Replaced before it ran out: its login ends with it.
                    let _ = self.drop_role(&old.role).await;
                }
                (m, true)
            }
        };
        let mut ops = Vec::new();
        if fresh {
            let mut e = NewEvent::new(req.now, EventKind::TokenIssued);
            e.task_id = Some(task_id.to_owned());
            e.agent_id = Some(req.task.agent_id.clone());
            e.detail = Some(format!(
                "postgres role {} for upstream {} until {} (unix ms); grants: {}",
                minted.role,
                req.upstream,
                minted.until.0,
                self.grants.join("; ")
            ));
            ops.push(portcullis_store::Op::Append(e));
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            minted.role,
            minted.password.as_str()
        ));
        Ok(Issued {
            credential: HopCredential::Static {
                header: "authorization".to_owned(),
                value: Zeroizing::new(format!("Basic {basic}")),
            },
            ttl_secs: Some(minted.until.0.saturating_sub(req.now.0) / 1000),
            ops,
            reuse: None,
        })
    }

    async fn release(&self, task_id: &str) {
        PostgresRoleProvider::release(self, task_id).await;
    }

    async fn sweep(&self, store: &dyn Store) -> usize {
        match PostgresRoleProvider::sweep(self, store).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(upstream = %self.upstream, dropped = n, "orphaned postgres roles dropped");
                }
                n
            }
            Err(e) => {
                tracing::warn!(upstream = %self.upstream, error = %e, "postgres role sweep failed");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn grants_are_one_clause() {
        check_grant("INSERT ON TABLE staging_customers").unwrap();
        check_grant("SELECT, INSERT ON TABLE public.\"Orders\"").unwrap();
        for bad in [
            "",
            "INSERT ON t; DROP TABLE x",
            "ALL ON t TO PUBLIC",
            "ON t",
            "INSERT ON t -- x",
            "INSERT 'x' ON t",
        ] {
            assert!(check_grant(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_are_utc_civil_times() {
        assert_eq!(timestamp_literal(Timestamp(0)), "1970-01-01 00:00:00+00");
        assert_eq!(
            timestamp_literal(Timestamp(1_798_761_600_000)),
            "2027-01-01 00:00:00+00"
        );
        assert_eq!(
            timestamp_literal(Timestamp(951_825_600_000)),
            "2000-02-29 12:00:00+00"
        );
    }
}
