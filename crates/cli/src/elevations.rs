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

    async fn list(&self, status: &str) -> anyhow::Result<Vec<Value>> {
        let r = self
            .http
            .get(format!("{}/v1/elevations", self.base))
            .query(&[("status", status), ("limit", "1000")])
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("reaching the gateway at {}", self.base))?;
        let body = Self::answer(r).await?;
        Ok(body["elevations"].as_array().cloned().unwrap_or_default())
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

fn line(e: &Value) -> String {
    format!(
        "{}  {:8}  task {}  agent {}  tool {}  {}",
        e["id"].as_str().unwrap_or("?"),
        e["status"].as_str().unwrap_or("?"),
        e["task_id"].as_str().unwrap_or("?"),
        e["agent_id"].as_str().unwrap_or("?"),
        e["tool"].as_str().unwrap_or("?"),
        e["reason"].as_str().unwrap_or_default(),
    )
}

/// `elevations list [--status S] [--watch]`.
pub async fn list(config: &Path, token: &str, status: &str, watch: bool) -> anyhow::Result<()> {
    let api = Api::new(config, token)?;
    let mut seen = std::collections::HashSet::new();
    loop {
        for e in api.list(status).await? {
            let id = e["id"].as_str().unwrap_or_default().to_owned();
            if seen.insert(id) {
                say!("{}", line(&e));
            }
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
