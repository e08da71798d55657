//! The Portcullis service: `portcullis serve`.
//!
//! An axum application over the decision engine (`portcullis-core`), the
//! token crate (`portcullis-token`) and the ledger (`portcullis-store`).
//! Every request runs the steps of DESIGN section 1 in order, each a small
//! unit that can be read top to bottom:
//!
//! | step | where |
//! |---|---|
//! | request id | [`server`] middleware |
//! | authenticate (token, bootstrap secret, admin) | `layers::authenticate` over `auth` |
//! | unauthenticated refusals: counted per source, rate-limited, recorded in aggregate | [`refusals`] |
//! | task binding | `layers::bind_task` |
//! | load the task, token scope | `pipeline` |
//! | decision: ACL, state, budgets, args, Cedar | `portcullis_core::Engine` |
//! | per-hop credential | [`credential`] (one `CredentialProvider` per upstream) |
//! | write-ahead record (with the task update) | `pipeline` (`commit_allowed`) |
//! | forward, record the outcome | `pipeline` (`forward`) |
//! | MCP upstreams, pinned definitions | [`federation`] |
//!
//! People in the loop sit beside that path, never inside it: `hold` waits
//! for a person's decision around `Gateway::authorize` (`[approval]
//! hold`), [`events`] streams the audit log (`GET /v1/events`), and
//! `console` serves the web console at `/console` on the same functions
//! as the API.
//!
//! Request bodies are read strictly (`body`): bounded size, depth and time,
//! no duplicate keys, no unknown fields. Errors have one shape (`error`).
//! Halts (and, later, anomalies) are POSTed to the alert webhook by
//! [`alerts`], off the request path.

mod admin;
pub mod alerts;
pub mod audit;
mod auth;
pub mod body;
mod console;
pub mod credential;
pub mod elevations;
pub mod error;
pub mod events;
pub mod federation;
mod hold;
mod layers;
mod mcp;
mod metrics;
mod oauth;
pub mod pgrole;
mod pipeline;
pub mod refusals;
pub mod run;
pub mod server;
mod sse;
mod state;
mod task_locks;
mod tasks;
pub mod tiering;
pub mod tls;
pub mod upstream;
pub mod witness;

pub use pipeline::UPSTREAM_TIMEOUT;
pub use server::{router, serve};
pub use state::{Gateway, SetupError, open_witness};
pub use tasks::StartedTask;
