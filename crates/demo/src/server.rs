//! The protocol core both transports share: one request in, one result or
//! JSON-RPC error out, in either era.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portcullis_mcp::era::{self, Era};
use portcullis_mcp::jsonrpc::{INVALID_PARAMS, METHOD_NOT_FOUND};
use portcullis_mcp::{ErrorObject, Id, Message};
use serde_json::{Map, Value, json};

use crate::files::Files;
use crate::tools::{self, ToolId, ToolOutput, ToolSet};
use crate::warehouse::Warehouse;
use crate::{DemoError, Kind, Options};

/// How long one tool call may run before it is stopped.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest tool name quoted back in an error.
const MAX_TOOL_NAME: usize = 128;

#[derive(Debug)]
struct Inner {
    kind: Kind,
    tools: ToolSet,
    /// The `tools` array of `tools/list`, built once.
    definitions: Value,
    /// `{name, version}`.
    server_info: Value,
}

/// A demo server: its tool set and the protocol logic over it. Cheap to
/// clone (shared state).
#[derive(Debug, Clone)]
pub struct DemoServer {
    inner: Arc<Inner>,
}

impl DemoServer {
    /// Opens the tool set's state (the database, or the root) and builds
    /// the tool definitions.
    pub fn new(options: &Options) -> Result<Self, DemoError> {
        let tools = match options.kind {
            Kind::Warehouse => {
                ToolSet::Warehouse(Box::new(Warehouse::open(options.db.as_deref())?))
            }
            Kind::Files => {
                let root = options.root.clone().unwrap_or_else(|| PathBuf::from("."));
                ToolSet::Files(
                    Files::open(&root).map_err(|source| DemoError::Root { path: root, source })?,
                )
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                kind: options.kind,
                tools,
                definitions: Value::Array(tools::definitions(options.kind, options.drift)),
                server_info: json!({
                    "name": format!("portcullis-demo-{}", options.kind.name()),
                    "version": env!("CARGO_PKG_VERSION"),
                }),
            }),
        })
    }

    /// The tool set.
    pub fn kind(&self) -> Kind {
        self.inner.kind
    }

    /// The tool definitions, as `tools/list` returns them.
    pub fn definitions(&self) -> &Value {
        &self.inner.definitions
    }

    /// Answers one request in `era`. The caller has already checked a
    /// modern request's envelope ([`era::check_modern`]).
    pub async fn handle(
        &self,
        era: Era,
        method: &str,
        params: Option<&Value>,
    ) -> Result<Value, ErrorObject> {
        let mut result = match (era, method) {
            (Era::Legacy, "initialize") => return Ok(self.initialize(params)),
            (Era::Modern, "server/discover") => return Ok(self.discover()),
            (_, "ping") => Map::new(),
            (_, "tools/list") => {
                let mut m = Map::with_capacity(4);
                m.insert("tools".to_owned(), self.inner.definitions.clone());
                if era == Era::Modern {
                    m.insert("cacheScope".to_owned(), Value::from("private"));
                    m.insert("ttlMs".to_owned(), Value::from(0));
                }
                m
            }
            (_, "tools/call") => self.call(params).await?.into_result(),
            _ => {
                return Err(ErrorObject::new(
                    METHOD_NOT_FOUND,
                    format!(
                        "Method not found: {}",
                        method.chars().take(MAX_TOOL_NAME).collect::<String>()
                    ),
                ));
            }
        };
        if era == Era::Modern {
            result.insert("resultType".to_owned(), Value::from("complete"));
        }
        Ok(Value::Object(result))
    }

    /// Answers one request whose era is read from itself: a request whose
    /// `params._meta` carries the protocol-version key, and any
    /// `server/discover`, is modern (and its envelope is checked without
    /// routing headers); anything else is legacy. This is the stdio rule.
    pub async fn handle_request(&self, id: Id, method: &str, params: Option<&Value>) -> Message {
        let modern = method == "server/discover"
            || params
                .and_then(|p| p.get("_meta"))
                .and_then(|m| m.get(era::META_PROTOCOL_VERSION))
                .is_some();
        let outcome = if modern {
            match era::check_modern(method, params, None) {
                Ok(_) => self.handle(Era::Modern, method, params).await,
                Err(e) => Err(e),
            }
        } else {
            self.handle(Era::Legacy, method, params).await
        };
        match outcome {
            Ok(result) => Message::result(id, result),
            Err(error) => Message::error(id, error),
        }
    }

    fn initialize(&self, params: Option<&Value>) -> Value {
        let version = params
            .and_then(|p| p.get("protocolVersion"))
            .and_then(Value::as_str)
            .filter(|v| era::LEGACY_VERSIONS.contains(v))
            .unwrap_or(era::LEGACY_VERSION);
        json!({
            "protocolVersion": version,
            "capabilities": { "tools": { "listChanged": true } },
            "serverInfo": self.inner.server_info,
        })
    }

    fn discover(&self) -> Value {
        json!({
            "supportedVersions": era::MODERN_VERSIONS,
            "capabilities": { "tools": { "listChanged": true } },
            "cacheScope": "private",
            "ttlMs": 0,
            "resultType": "complete",
            "_meta": { era::META_SERVER_INFO: self.inner.server_info },
        })
    }

    /// `tools/call`: an unknown tool is a protocol error; anything that
    /// goes wrong inside a tool is a result with `isError`.
    async fn call(&self, params: Option<&Value>) -> Result<ToolOutput, ErrorObject> {
        let Some(name) = params.and_then(|p| p.get("name")).and_then(Value::as_str) else {
            return Err(ErrorObject::new(
                INVALID_PARAMS,
                "tools/call needs params.name (a string)",
            ));
        };
        let Some(id) = self.inner.tools.lookup(name) else {
            return Err(ErrorObject::new(
                INVALID_PARAMS,
                format!(
                    "Unknown tool: {}",
                    name.chars().take(MAX_TOOL_NAME).collect::<String>()
                ),
            ));
        };
        let empty = Value::Object(Map::new());
        let args = match params.and_then(|p| p.get("arguments")) {
            None | Some(Value::Null) => &empty,
            Some(v @ Value::Object(_)) => v,
            Some(_) => {
                return Err(ErrorObject::new(
                    INVALID_PARAMS,
                    "tools/call params.arguments must be an object",
                ));
            }
        };
        Ok(self.run(id, args).await)
    }

    /// Runs a tool: cheap ones in place, the rest on the blocking pool
    /// under [`CALL_TIMEOUT`].
    async fn run(&self, id: ToolId, args: &Value) -> ToolOutput {
        if id.is_inline() {
            return self.inner.tools.run(id, args);
        }
        let inner = Arc::clone(&self.inner);
        let args = args.clone();
        let job = tokio::task::spawn_blocking(move || inner.tools.run(id, &args));
        match tokio::time::timeout(CALL_TIMEOUT, job).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                tracing::error!("a tool call failed: {e}");
                ToolOutput::error("the tool failed unexpectedly")
            }
            Err(_) => {
                self.inner.tools.interrupt();
                ToolOutput::error(format!(
                    "the tool call took longer than {} s and was stopped",
                    CALL_TIMEOUT.as_secs()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;

    fn server(kind: Kind) -> DemoServer {
        DemoServer::new(&Options::new(kind)).unwrap()
    }

    fn outcome(m: Message) -> Result<Value, ErrorObject> {
        match m {
            Message::Response { outcome, .. } => outcome,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn legacy_and_modern_answers() {
        let s = server(Kind::Warehouse);
        let init = s
            .handle(
                Era::Legacy,
                "initialize",
                Some(&json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}})),
            )
            .await
            .unwrap();
        assert_eq!(init["protocolVersion"], "2025-06-18");
        assert_eq!(init["serverInfo"]["name"], "portcullis-demo-warehouse");
        let init = s
            .handle(
                Era::Legacy,
                "initialize",
                Some(&json!({"protocolVersion": "1999-01-01"})),
            )
            .await
            .unwrap();
        assert_eq!(init["protocolVersion"], era::LEGACY_VERSION);

        let list = s.handle(Era::Legacy, "tools/list", None).await.unwrap();
        assert!(list.get("resultType").is_none());
        assert_eq!(list["tools"].as_array().unwrap().len(), 6);
        let list = s.handle(Era::Modern, "tools/list", None).await.unwrap();
        assert_eq!(list["resultType"], "complete");
        assert_eq!(list["cacheScope"], "private");
        assert_eq!(list["ttlMs"], 0);

        let d = s
            .handle(Era::Modern, "server/discover", None)
            .await
            .unwrap();
        assert_eq!(d["supportedVersions"], json!(["2026-07-28"]));
        assert_eq!(
            d["_meta"][era::META_SERVER_INFO]["name"],
            "portcullis-demo-warehouse"
        );
        assert_eq!(
            s.handle(Era::Legacy, "ping", None).await.unwrap(),
            json!({})
        );
        let e = s.handle(Era::Legacy, "nope/nope", None).await.unwrap_err();
        assert_eq!(e.code, METHOD_NOT_FOUND);
    }

    #[tokio::test]
    async fn calls_unknown_tools_and_tool_errors() {
        let s = server(Kind::Warehouse);
        let meta = era::client_meta("t", "1");
        let echo = s
            .handle_request(
                Id::from(1),
                "tools/call",
                Some(&json!({"name": "echo", "arguments": {"text": "hi"}, "_meta": meta})),
            )
            .await;
        let r = outcome(echo).unwrap();
        assert_eq!(r["content"][0]["text"], "hi");
        assert_eq!(r["isError"], false);
        assert_eq!(r["resultType"], "complete");

        let q = outcome(
            s.handle_request(
                Id::from(2),
                "tools/call",
                Some(&json!({"name": "query", "arguments": {"sql": "DELETE FROM customers"}})),
            )
            .await,
        )
        .unwrap();
        assert_eq!(q["isError"], true);
        assert!(q.get("resultType").is_none());

        let e = outcome(
            s.handle_request(Id::from(3), "tools/call", Some(&json!({"name": "read"})))
                .await,
        )
        .unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        assert_eq!(e.message, "Unknown tool: read");

        // A discover without the envelope is refused, not answered.
        let e = outcome(s.handle_request(Id::from(4), "server/discover", None).await).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
    }

    #[tokio::test]
    async fn files_server_has_its_own_tools() {
        let dir = tempfile::tempdir().unwrap();
        let s = DemoServer::new(&Options {
            root: Some(dir.path().to_owned()),
            drift: true,
            ..Options::new(Kind::Files)
        })
        .unwrap();
        let names: Vec<&str> = s
            .definitions()
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["read", "list", "echo"]);
        let r = s
            .handle(
                Era::Legacy,
                "tools/call",
                Some(&json!({"name": "read", "arguments": {"path": "/../etc/passwd"}})),
            )
            .await
            .unwrap();
        assert_eq!(r["isError"], true);
        assert!(
            DemoServer::new(&Options {
                root: Some(dir.path().join("missing")),
                ..Options::new(Kind::Files)
            })
            .is_err()
        );
    }
}
