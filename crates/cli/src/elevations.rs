//! `portcullis elevations list|approve|deny`: the approver's side of
//! elevation, as a client of a running gateway's API (`GET /v1/elevations`,
//! `POST /v1/elevations/{id}/approve|deny`). The gateway's address is the
//! configuration's `server.issuer`; the approver's admin token comes from
//! `PORTCULLIS_ADMIN_TOKEN` (or `--token`). Going through the API, not the
//! ledger, keeps one writer and one set of rules: the same checks, the
//! same audit records, the same 409 for a request already decided.

// `Value[&str]` reads a missing key as `Null`; it never panics on reads.
#![allow(
    clippy::indexing_slicing,
    reason = "serde_json string indexing does not panic on reads"
)]

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use portcullis::LoadedConfig;
use serde_json::{Value, json};

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// How often `list --watch` asks.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Requests asked for per page (the gateway's largest page).
const PAGE: &str = "500";

/// Most pages one listing follows: 100,000 requests. A list longer than
/// that is cut, and says so.
const MAX_PAGES: usize = 200;

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(config: &Path, token: &str) -> anyhow::Result<Self> {
        let loaded = LoadedConfig::load(config)?;
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            base: loaded.config.server.issuer.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    async fn answer(r: reqwest::Response) -> anyhow::Result<Value> {
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "HTTP {status}: {} {}",
                body["error"].as_str().unwrap_or_default(),
                body["detail"].as_str().unwrap_or_default()
            );
        }
        Ok(body)
    }

    /// Every request with `status`, oldest first, following the `next`
    /// cursor page by page (at most [`MAX_PAGES`]); `true` when the list
    /// was cut there.
    async fn list(&self, status: &str) -> anyhow::Result<(Vec<Value>, bool)> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut query = vec![("status", status), ("limit", PAGE)];
            if let Some(cursor) = after.as_deref() {
                query.push(("after", cursor));
            }
            let r = self
                .http
                .get(format!("{}/v1/elevations", self.base))
                .query(&query)
                .bearer_auth(&self.token)
                .send()
                .await
                .with_context(|| format!("reaching the gateway at {}", self.base))?;
            let body = Self::answer(r).await?;
            all.extend(body["elevations"].as_array().cloned().unwrap_or_default());
            match body["next"].as_str() {
                // A cursor that does not move would loop: stop.
                Some(next) if after.as_deref() != Some(next) => after = Some(next.to_owned()),
                _ => return Ok((all, false)),
            }
        }
        Ok((all, true))
    }

    async fn decide(&self, id: &str, verb: &str, note: Option<&str>) -> anyhow::Result<Value> {
        let body = note.map_or_else(|| json!({}), |n| json!({ "note": n }));
        let r = self
            .http
            .post(format!("{}/v1/elevations/{id}/{verb}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("reaching the gateway at {}", self.base))?;
        Self::answer(r).await
    }
}

/// One request as the approver reads it: the request, and for a call the
/// gateway held, the rule and the call's (redacted) arguments with their
/// digest, which an approval is bound to. Text an agent chose is printed
/// with its control characters escaped, so it cannot drive the terminal.
fn line(e: &Value) -> String {
    let text = |k: &str| printable(e[k].as_str().unwrap_or("?"));
    let mut out = format!(
        "{}  {:8}  task {}  agent {}  tool {}  {}",
        text("id"),
        text("status"),
        text("task_id"),
        text("agent_id"),
        text("tool"),
        printable(e["reason"].as_str().unwrap_or_default()),
    );
    let held = &e["held"];
    if let Some(rule) = held["rule"].as_str() {
        out.push_str(&format!("\n    held by rule {}", printable(rule)));
        if !held["args"].is_null() {
            // JSON text: control characters are already escaped.
            out.push_str(&format!("; arguments {}", held["args"]));
        }
        if let Some(digest) = held["args_digest"].as_str() {
            out.push_str(&format!(" (sha256 {})", printable(digest)));
        }
    }
    out
}

/// `text` with control characters escaped (`\u{1b}` for ESC).
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_unicode().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// `elevations list [--status S] [--watch]`.
pub async fn list(config: &Path, token: &str, status: &str, watch: bool) -> anyhow::Result<()> {
    let api = Api::new(config, token)?;
    // The ids listed last round: a request still listed is not shown again.
    // Only the last round is kept, so the set stays as small as the list.
    let mut seen = std::collections::HashSet::new();
    loop {
        let (list, cut) = api.list(status).await?;
        let mut now_listed = std::collections::HashSet::with_capacity(list.len());
        for e in list {
            let id = e["id"].as_str().unwrap_or_default().to_owned();
            if !seen.contains(&id) {
                say!("{}", line(&e));
            }
            now_listed.insert(id);
        }
        seen = now_listed;
        if cut {
            let _ = writeln!(
                std::io::stderr(),
                "(more requests than {MAX_PAGES} pages of {PAGE}: the newest are not shown)"
            );
        }
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// `elevations approve|deny ID [--note N]`.
pub async fn decide(
    config: &Path,
    token: &str,
    id: &str,
    approve: bool,
    note: Option<&str>,
) -> anyhow::Result<()> {
    let api = Api::new(config, token)?;
    let verb = if approve { "approve" } else { "deny" };
    let done = api.decide(id, verb, note).await?;
    say!(
        "{}  {}  task {}  tool {}{}",
        done["elevation_id"].as_str().unwrap_or(id),
        done["status"].as_str().unwrap_or("?"),
        done["task_id"].as_str().unwrap_or("?"),
        done["tool"].as_str().unwrap_or("?"),
        done["expires_at"]
            .as_u64()
            .map(|t| format!("  until {t} (unix ms)"))
            .unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the reason an agent wrote was printed raw, so escape
    /// sequences in it could rewrite the approver's terminal. The approver
    /// also sees what a held call would do and the digest it is bound to.
    #[test]
    fn an_approver_sees_the_held_call_and_no_terminal_control() {
        let e = json!({
            "id": "elv_1", "status": "pending", "task_id": "tsk_1", "agent_id": "bot",
            "tool": "warehouse.insert", "reason": "fine\u{1b}[2K\rapproved by alice",
            "held": {
                "rule": "approval",
                "args": { "table": "t\u{1b}[2K" },
                "args_digest": "ab".repeat(32),
            },
        });
        let text = line(&e);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(
            text.contains("fine\\u{1b}[2K\\u{d}approved by alice"),
            "{text}"
        );
        assert!(text.contains("held by rule approval"), "{text}");
        assert!(
            text.contains(r#"arguments {"table":"t\u001b[2K"}"#),
            "{text}"
        );
        assert!(
            text.contains(&format!("(sha256 {})", "ab".repeat(32))),
            "{text}"
        );
        let plain =
            json!({ "id": "elv_2", "status": "pending", "tool": "files.read", "reason": "r" });
        assert!(!line(&plain).contains('\n'));
    }
}
