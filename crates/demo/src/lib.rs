//! The built-in demo MCP server that `portcullis demo-server NAME` runs.
//!
//! Two tool sets, chosen by name:
//!
//! - **`warehouse`**: a SQLite database (a file given with `--db`, or an
//!   in-memory one seeded with demo customers and orders) behind the tools
//!   `connect`, `query` (read-only SQL), `validate`, `transform` (a dry
//!   run), `insert` and `echo`.
//! - **`files`**: a directory tree rooted at `--root`, behind `read`,
//!   `list` and `echo`. Paths look absolute (`/data/in.csv`) and resolve
//!   under the root; nothing outside it is ever read.
//!
//! The server speaks both MCP protocol eras (see [`portcullis_mcp::era`]):
//! the 2025-11-25 handshake era (`initialize`, sessions over HTTP) and the
//! stateless 2026-07-28 era (`server/discover`, a `_meta` envelope on every
//! request, routing headers over HTTP). It serves either newline-delimited
//! JSON-RPC on stdin/stdout ([`stdio`]) or Streamable HTTP on one endpoint,
//! `/mcp` ([`http`]).
//!
//! It exists to be put behind the gateway in examples and tests, and to be
//! the "direct" baseline of the load benchmark, so it is small but honest:
//! every input is bounded, tool failures are tool results with `isError`,
//! and `echo` touches no shared state. With `--drift` one tool's
//! description changes, which a gateway pinning tool definitions must
//! notice.

mod args;
mod files;
pub mod http;
mod server;
pub mod stdio;
mod tools;
mod warehouse;

use std::path::PathBuf;
use std::str::FromStr;

pub use server::DemoServer;
pub use tools::ToolOutput;

/// Which tool set the server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The SQLite warehouse: `connect`, `query`, `validate`, `transform`,
    /// `insert`, `echo`.
    Warehouse,
    /// The rooted file tree: `read`, `list`, `echo`.
    Files,
}

impl Kind {
    /// The name used on the command line and in `serverInfo`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Warehouse => "warehouse",
            Self::Files => "files",
        }
    }
}

impl FromStr for Kind {
    type Err = DemoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "warehouse" => Ok(Self::Warehouse),
            "files" => Ok(Self::Files),
            other => Err(DemoError::UnknownKind(other.chars().take(64).collect())),
        }
    }
}

/// How to build a demo server.
#[derive(Debug, Clone)]
pub struct Options {
    /// The tool set.
    pub kind: Kind,
    /// The warehouse's SQLite file; `None` for a seeded in-memory database.
    /// A file without the demo tables gets them (and the seed rows).
    pub db: Option<PathBuf>,
    /// The files server's root; `None` for the current directory.
    pub root: Option<PathBuf>,
    /// Change one tool's description (`query` for the warehouse, `read` for
    /// files), to simulate a changed tool definition.
    pub drift: bool,
}

impl Options {
    /// Options for `kind` with every default.
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            db: None,
            root: None,
            drift: false,
        }
    }
}

/// Why the server could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The name is not `warehouse` or `files`.
    #[error("unknown demo server {0:?} (expected warehouse or files)")]
    UnknownKind(String),
    /// The warehouse database could not be opened or seeded.
    #[error("opening the warehouse database: {0}")]
    Database(#[from] rusqlite::Error),
    /// The files root is missing or not a directory.
    #[error("files root {path}: {source}")]
    Root {
        /// The root as given.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Binding the HTTP address, or reading stdin / writing stdout.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Builds the server and serves it: on `http` (an address such as
/// `127.0.0.1:8080`) as Streamable HTTP at `/mcp`, or else on stdin and
/// stdout until stdin ends.
pub async fn run(options: &Options, http: Option<&str>) -> Result<(), DemoError> {
    let server = DemoServer::new(options)?;
    match http {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DemoError::Io {
                    context: format!("binding {addr}"),
                    source,
                })?;
            if let Ok(local) = listener.local_addr() {
                tracing::info!(
                    "portcullis-demo-{} listening on http://{local}/mcp",
                    options.kind.name()
                );
            }
            http::serve(server, listener).await
        }
        None => stdio::serve(server).await,
    }
}
