//! An MCP client of one upstream server, over stdio or Streamable HTTP,
//! in whichever era the server speaks.
//!
//! [`Session::connect`] starts the transport and negotiates the era: it
//! probes `server/discover` at the modern version and, when the server
//! answers with any error (a legacy server says "method not found"), falls
//! back to the `initialize` handshake. A session then lists tools and calls
//! them; everything the server sends is untrusted data, bounded in size.
//!
//! A session never restarts itself. It reports, through [`Session::events`],
//! that the server's tool list changed or that the connection closed; the
//! owner (the gateway's upstream supervisor) decides to re-list or to
//! reconnect with backoff.

mod http;
mod stdio;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::{Notify, oneshot};

use crate::era::{self, Era};
use crate::jsonrpc::{ErrorObject, Id, Message};

pub use http::{ClientTls, HttpOptions};
pub(crate) use stdio::read_line_bounded as read_line;

/// Largest message accepted from an upstream, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Most `tools/list` pages read before giving up on a server that never
/// stops paginating.
pub const MAX_TOOL_PAGES: usize = 64;
/// Most tools accepted from one server.
pub const MAX_TOOLS: usize = 4096;
/// How long the era probe and the handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How to reach an upstream.
#[derive(Debug, Clone)]
pub enum Transport {
    /// A child process speaking newline-delimited JSON-RPC on stdin/stdout.
    Stdio {
        /// The program and its arguments.
        command: Vec<String>,
        /// The working directory, if not the current one.
        cwd: Option<std::path::PathBuf>,
        /// Extra environment variables.
        env: Vec<(String, String)>,
    },
    /// A Streamable HTTP endpoint.
    Http {
        /// The endpoint URL, `http://` or `https://`.
        url: String,
        /// Connection settings.
        options: HttpOptions,
    },
}

/// Why a session failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The transport failed: the process died, the connection broke, or a
    /// message could not be read.
    #[error("{0}")]
    Transport(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with a JSON-RPC error.
    #[error("server error: {0}")]
    Server(ErrorObject),
    /// The server answered with something that is not what MCP says.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// What the client sends with one call besides the call itself: over HTTP,
/// extra headers (the per-hop credential); over stdio, extra `_meta`
/// entries (stdio has no headers).
#[derive(Debug, Clone, Default)]
pub struct CallExtras {
    /// HTTP headers (name, value).
    pub headers: Vec<(String, String)>,
    /// `_meta` entries for stdio.
    pub meta: Map<String, Value>,
}

/// Shared between a session and its transport's reader: the pending
/// requests and the signals the owner watches.
#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Value, ErrorObject>>>>,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
    list_changed: AtomicU64,
    wake: Notify,
}

impl Shared {
    fn complete(&self, id: &Id, outcome: Result<Value, ErrorObject>) {
        let Id::Num(n) = id else { return };
        let Some(n) = n.as_u64() else { return };
        let waiter = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&n);
        if let Some(tx) = waiter {
            let _ = tx.send(outcome);
        }
    }

    fn tools_changed(&self) {
        self.list_changed.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    fn close(&self, why: String) {
        {
            let mut reason = self
                .close_reason
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if reason.is_none() {
                *reason = Some(why);
            }
        }
        self.closed.store(true, Ordering::SeqCst);
        // Every waiter learns at once rather than at its timeout.
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.wake.notify_waiters();
    }

    /// Handles a message the server sent on its own: notifications, and
    /// requests (answered by the caller with the returned message).
    fn server_message(&self, message: Message) -> Option<Message> {
        match message {
            Message::Response { id, outcome } => {
                self.complete(&id, outcome);
                None
            }
            Message::Notification { method, .. } => {
                if method == "notifications/tools/list_changed" {
                    self.tools_changed();
                }
                None
            }
            Message::Request { id, method, .. } => Some(if method == "ping" {
                Message::result(id, json!({}))
            } else {
                // The gateway offers no client capabilities (sampling,
                // roots, elicitation): an upstream gets nothing from it.
                Message::error(
                    id,
                    ErrorObject::new(crate::jsonrpc::METHOD_NOT_FOUND, "Method not found"),
                )
            }),
        }
    }
}

/// Removes a pending request if its caller gives up (timeout, drop) and,
/// when it was still unanswered, tells the server with
/// `notifications/cancelled` so it can stop the work: a downstream client
/// that cancels (or disconnects) cancels upstream too.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
    conn: &'a Arc<Conn>,
    era: Era,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let unanswered = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id)
            .is_some();
        if !unanswered || self.shared.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = self.conn.clone();
        let era = self.era;
        let params = json!({ "requestId": self.id, "reason": "cancelled by the gateway's client" });
        let params = match era {
            Era::Modern => era::with_client_meta(
                Some(params),
                &era::client_meta("portcullis", env!("CARGO_PKG_VERSION")),
            ),
            Era::Legacy => params,
        };
        let message = Message::notification("notifications/cancelled", Some(params));
        rt.spawn(async move {
            let _ = match conn.as_ref() {
                Conn::Stdio(s) => s.send(&message).await,
                Conn::Http(h) => h.send(&message, era, &CallExtras::default()).await,
            };
        });
    }
}

#[derive(Debug)]
enum Conn {
    Stdio(Box<stdio::StdioConn>),
    Http(Box<http::HttpConn>),
}

/// A connected, negotiated session with one upstream.
#[derive(Debug)]
pub struct Session {
    conn: Arc<Conn>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    era: Era,
    meta: Value,
    server_info: Option<Value>,
}

/// A change the owner of a session should act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The server's tool list changed (generation counter).
    ToolsChanged(u64),
    /// The connection is gone, and why.
    Closed(String),
}

impl Session {
    /// Starts the transport and negotiates the era.
    pub async fn connect(name: &str, transport: &Transport) -> Result<Self, ClientError> {
        Self::open(name, transport, None).await
    }

    /// Starts the transport and speaks `era` without probing (a client
    /// that knows its server, or one that wants the handshake era).
    pub async fn connect_as(
        name: &str,
        transport: &Transport,
        era: Era,
    ) -> Result<Self, ClientError> {
        Self::open(name, transport, Some(era)).await
    }

    async fn open(
        name: &str,
        transport: &Transport,
        era: Option<Era>,
    ) -> Result<Self, ClientError> {
        let shared = Arc::new(Shared::default());
        let conn = match transport {
            Transport::Stdio { command, cwd, env } => Conn::Stdio(Box::new(
                stdio::StdioConn::spawn(name, command, cwd.as_deref(), env, shared.clone())?,
            )),
            Transport::Http { url, options } => Conn::Http(Box::new(http::HttpConn::new(
                url,
                options.clone(),
                shared.clone(),
            )?)),
        };
        let mut session = Self {
            conn: Arc::new(conn),
            shared,
            next_id: AtomicU64::new(1),
            era: Era::Modern,
            meta: era::client_meta("portcullis", env!("CARGO_PKG_VERSION")),
            server_info: None,
        };
        let negotiated = async {
            match era {
                None => session.negotiate().await,
                Some(Era::Legacy) => session.handshake().await,
                Some(Era::Modern) => Ok(()),
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, negotiated).await {
            Ok(Ok(())) => Ok(session),
            Ok(Err(e)) => {
                session.close().await;
                Err(e)
            }
            Err(_) => {
                session.close().await;
                Err(ClientError::Timeout(CONNECT_TIMEOUT))
            }
        }
    }

    async fn negotiate(&mut self) -> Result<(), ClientError> {
        match self
            .request("server/discover", None, &CallExtras::default())
            .await
        {
            Ok(result) => {
                let versions = result
                    .get("supportedVersions")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if !versions
                    .iter()
                    .any(|v| v.as_str() == Some(era::MODERN_VERSION))
                {
                    return Err(ClientError::Protocol(
                        "server/discover names no version this gateway speaks".to_owned(),
                    ));
                }
                self.server_info = result
                    .get("_meta")
                    .and_then(|m| m.get(era::META_SERVER_INFO))
                    .cloned();
                Ok(())
            }
            Err(ClientError::Server(_)) => self.handshake().await,
            Err(e) => Err(e),
        }
    }

    async fn handshake(&mut self) -> Result<(), ClientError> {
        self.era = Era::Legacy;
        let params = json!({
            "protocolVersion": era::LEGACY_VERSION,
            "capabilities": {},
            "clientInfo": { "name": "portcullis", "version": env!("CARGO_PKG_VERSION") },
        });
        let result = self
            .request("initialize", Some(params), &CallExtras::default())
            .await?;
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if Era::of(version) != Some(Era::Legacy) {
            return Err(ClientError::Protocol(format!(
                "initialize answered protocol version {version:?}, which this gateway does not speak"
            )));
        }
        if let Conn::Http(h) = self.conn.as_ref() {
            h.set_protocol_version(version);
        }
        self.server_info = result.get("serverInfo").cloned();
        self.notify("notifications/initialized", None).await?;
        if let Conn::Http(h) = self.conn.as_ref() {
            h.listen();
        }
        Ok(())
    }

    /// The era the server speaks.
    pub fn era(&self) -> Era {
        self.era
    }

    /// The server's name and version, as it reported them (untrusted).
    pub fn server_info(&self) -> Option<&Value> {
        self.server_info.as_ref()
    }

    /// Every tool the server advertises, as raw JSON objects (pages
    /// followed up to [`MAX_TOOL_PAGES`], at most [`MAX_TOOLS`] tools).
    pub async fn list_tools(&self) -> Result<Vec<Value>, ClientError> {
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_TOOL_PAGES {
            let params = cursor.as_ref().map(|c| json!({ "cursor": c }));
            let result = self
                .request("tools/list", params, &CallExtras::default())
                .await?;
            let Some(page) = result.get("tools").and_then(Value::as_array) else {
                return Err(ClientError::Protocol(
                    "tools/list result has no tools array".to_owned(),
                ));
            };
            tools.extend(page.iter().cloned());
            if tools.len() > MAX_TOOLS {
                return Err(ClientError::Protocol(format!(
                    "server advertises more than {MAX_TOOLS} tools"
                )));
            }
            match result.get("nextCursor").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => cursor = Some(next.to_owned()),
                _ => return Ok(tools),
            }
        }
        Err(ClientError::Protocol(format!(
            "tools/list did not end within {MAX_TOOL_PAGES} pages"
        )))
    }

    /// Calls a tool; the result is the server's `CallToolResult`, raw.
    pub async fn call_tool(
        &self,
        name: &str,
        arguments: &Value,
        extras: &CallExtras,
    ) -> Result<Value, ClientError> {
        let params = json!({ "name": name, "arguments": arguments });
        self.request("tools/call", Some(params), extras).await
    }

    /// Sends `ping`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.request("ping", None, &CallExtras::default())
            .await
            .map(|_| ())
    }

    /// Sends a request and waits for its answer.
    pub async fn request(
        &self,
        method: &str,
        params: Option<Value>,
        extras: &CallExtras,
    ) -> Result<Value, ClientError> {
        if let Some(why) = self.closed() {
            return Err(ClientError::Transport(why));
        }
        let params = self.envelope(method, params, extras);
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(n, tx);
        let _guard = PendingGuard {
            shared: &self.shared,
            id: n,
            conn: &self.conn,
            era: self.era,
        };
        let message = Message::request(Id::from(n), method, params);
        match self.conn.as_ref() {
            Conn::Stdio(s) => s.send(&message).await?,
            Conn::Http(h) => h.send(&message, self.era, extras).await?,
        }
        match rx.await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err(ClientError::Server(e)),
            Err(_) => Err(ClientError::Transport(
                self.closed()
                    .unwrap_or_else(|| "connection closed".to_owned()),
            )),
        }
    }

    /// Sends a notification.
    pub async fn notify(&self, method: &str, params: Option<Value>) -> Result<(), ClientError> {
        let params = match self.era {
            Era::Modern => Some(era::with_client_meta(params, &self.meta)),
            Era::Legacy => params,
        };
        let message = Message::notification(method, params);
        match self.conn.as_ref() {
            Conn::Stdio(s) => s.send(&message).await,
            Conn::Http(h) => h.send(&message, self.era, &CallExtras::default()).await,
        }
    }

    fn envelope(&self, method: &str, params: Option<Value>, extras: &CallExtras) -> Option<Value> {
        let mut params = match self.era {
            Era::Modern => Some(era::with_client_meta(params, &self.meta)),
            Era::Legacy => params,
        };
        if !extras.meta.is_empty() && matches!(self.conn.as_ref(), Conn::Stdio(_)) {
            let mut obj = match params.take() {
                Some(Value::Object(o)) => o,
                _ => Map::new(),
            };
            let meta = obj
                .entry("_meta".to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = meta {
                for (k, v) in &extras.meta {
                    m.insert(k.clone(), v.clone());
                }
            }
            params = Some(Value::Object(obj));
        }
        let _ = method;
        params
    }

    /// Why the session is closed, if it is.
    pub fn closed(&self) -> Option<String> {
        if self.shared.closed.load(Ordering::SeqCst) {
            Some(
                self.shared
                    .close_reason
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
                    .unwrap_or_else(|| "connection closed".to_owned()),
            )
        } else {
            None
        }
    }

    /// Waits until the tool list changes past generation `seen`, or the
    /// session closes.
    pub async fn next_event(&self, seen: u64) -> SessionEvent {
        loop {
            let notified = self.shared.wake.notified();
            if let Some(why) = self.closed() {
                return SessionEvent::Closed(why);
            }
            let generation = self.shared.list_changed.load(Ordering::SeqCst);
            if generation != seen {
                return SessionEvent::ToolsChanged(generation);
            }
            notified.await;
        }
    }

    /// The current tool-list generation (see [`Session::next_event`]).
    pub fn tools_generation(&self) -> u64 {
        self.shared.list_changed.load(Ordering::SeqCst)
    }

    /// Ends the session: a stdio child is killed, an HTTP session deleted.
    pub async fn close(&self) {
        match self.conn.as_ref() {
            Conn::Stdio(s) => s.kill().await,
            Conn::Http(h) => h.end_session().await,
        }
        self.shared.close("closed by the gateway".to_owned());
    }
}
