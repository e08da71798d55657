//! The forward step: upstreams, and the per-hop credential each receives.
//!
//! An [`Upstream`] takes a call that has passed every check, with the
//! per-hop credential its provider minted, and returns the tool's result.
//! The agent's own token never reaches it: an [`UpstreamCall`] has no field
//! that could carry it.
//!
//! Providers (DESIGN section 5), chosen per upstream by `credential.kind`:
//! `jwt` (a token with `aud` = the upstream, `scope` = the tool, ≤ 60 s),
//! `static` (a secret from an env var or file, injected as a header) and
//! `none`. `postgres-role` is not available yet: an upstream configured with
//! it cannot be called (`upstream_unavailable`), never called without it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use serde_json::Value;
use zeroize::Zeroizing;

/// Longest life of a per-hop credential, in seconds.
pub const HOP_TTL_SECS: u64 = 60;

/// The credential attached to one forwarded call.
#[derive(Clone)]
pub enum HopCredential {
    /// A signed per-hop token.
    Jwt {
        /// The compact JWT.
        token: String,
    },
    /// A configured secret sent as a header.
    Static {
        /// The header name.
        header: String,
        /// The secret.
        value: Zeroizing<String>,
    },
    /// Nothing.
    None,
}

impl std::fmt::Debug for HopCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Jwt { .. } => f.write_str("HopCredential::Jwt(<redacted>)"),
            Self::Static { header, .. } => write!(f, "HopCredential::Static({header}: <redacted>)"),
            Self::None => f.write_str("HopCredential::None"),
        }
    }
}

/// One call, as the upstream sees it.
#[derive(Debug, Clone)]
pub struct UpstreamCall {
    /// The tool's name at the upstream.
    pub tool: String,
    /// The arguments, exactly as the agent sent them.
    pub arguments: Value,
    /// The task the call belongs to.
    pub task_id: String,
    /// The per-hop credential.
    pub credential: HopCredential,
}

/// Why an upstream call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream could not be reached, timed out or crashed.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
}

/// A service tools are forwarded to.
#[async_trait]
pub trait Upstream: Send + Sync + std::fmt::Debug {
    /// Calls a tool.
    async fn call(&self, call: UpstreamCall) -> Result<Value, UpstreamError>;
}

/// An upstream whose transport is not connected in this build: every call
/// is `upstream_unavailable`.
#[derive(Debug)]
pub struct Disconnected {
    /// Why.
    pub why: String,
}

#[async_trait]
impl Upstream for Disconnected {
    async fn call(&self, _call: UpstreamCall) -> Result<Value, UpstreamError> {
        Err(UpstreamError::Unavailable(self.why.clone()))
    }
}

/// An in-process upstream that runs a Rust closure per tool, and records
/// every call it receives, so tests can assert what reached it — and that a
/// denied call did not.
pub struct InProcess {
    tools: BTreeMap<String, Handler>,
    seen: Mutex<Vec<UpstreamCall>>,
}

type Handler = Arc<dyn Fn(&Value) -> Result<Value, UpstreamError> + Send + Sync>;

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("tools", &self.tools.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for InProcess {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcess {
    /// An upstream with no tools.
    pub fn new() -> Self {
        Self {
            tools: BTreeMap::new(),
            seen: Mutex::new(Vec::new()),
        }
    }

    /// Adds a tool.
    #[must_use]
    pub fn tool(
        mut self,
        name: &str,
        handler: impl Fn(&Value) -> Result<Value, UpstreamError> + Send + Sync + 'static,
    ) -> Self {
        self.tools.insert(name.to_owned(), Arc::new(handler));
        self
    }

    /// An upstream whose every tool in `names` echoes its arguments.
    pub fn echo(names: &[&str]) -> Self {
        names.iter().fold(Self::new(), |up, name| {
            up.tool(name, |args| Ok(serde_json::json!({ "echo": args })))
        })
    }

    /// Every call received so far.
    pub fn calls(&self) -> Vec<UpstreamCall> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[async_trait]
impl Upstream for InProcess {
    async fn call(&self, call: UpstreamCall) -> Result<Value, UpstreamError> {
        let handler = self.tools.get(&call.tool).cloned();
        let args = call.arguments.clone();
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(call);
        match handler {
            Some(h) => h(&args),
            None => Err(UpstreamError::Unavailable(
                "no such tool upstream".to_owned(),
            )),
        }
    }
}
