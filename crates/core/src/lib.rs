//! The Portcullis decision engine.
//!
//! Given a task (agent, workflow state, counters, grants) and a call (tool
//! and arguments), [`Engine::decide`] returns a [`Decision`]: allow or deny,
//! the stable [`Reason`] code, a human detail, the Cedar policy ids that
//! decided, and the workflow [`Transition`] the call makes.
//!
//! The crate is pure: no async runtime, no sockets, no files, no wall clock.
//! Configuration comes in as a [`portcullis_config::LoadedConfig`], time
//! through a [`Clock`]. The token checks that come before the engine and the
//! audit, credential and forwarding steps after it live in other crates; see
//! `docs/architecture.md`.
//!
//! ```
//! use std::sync::Arc;
//! use portcullis_config::LoadedConfig;
//! use portcullis_core::{Engine, ManualClock, Reason, Timestamp};
//! use serde_json::json;
//!
//! let toml = r#"
//! [[upstreams]]
//! name = "wh"
//! transport = "stdio"
//! command = ["wh-server"]
//!
//! [[tools]]
//! name = "wh.query"
//! upstream = "wh"
//! risk = "low"
//! access = "read"
//! args_schema = { type = "object", properties = { limit = { type = "integer" } } }
//!
//! [[agent_types]]
//! name = "reader"
//! initial = "read"
//! states = [
//!   { name = "read", tools = ["wh.query"], next = ["done"] },
//!   { name = "done", final = true },
//! ]
//!
//! [[agents]]
//! id = "bot"
//! type = "reader"
//! tools = ["wh.query"]
//! bootstrap_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
//! "#;
//! let loaded = LoadedConfig::parse(toml, "portcullis.toml".as_ref()).unwrap();
//! let clock = Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)));
//! let engine = portcullis_core::build(&loaded, clock).unwrap();
//!
//! let mut task = engine.start_task("t1", "bot", "count rows", None).unwrap();
//! let ok = engine.decide(&task, "wh.query", &json!({ "limit": 10 }));
//! assert!(ok.is_allowed());
//! task.apply(&ok);
//!
//! let bad = engine.decide(&task, "wh.query", &json!({ "limit": "ten" }));
//! assert_eq!(bad.reason, Some(Reason::ArgsInvalid));
//! ```

pub mod anomaly;
pub mod args;
mod auto_approve;
mod build;
mod clock;
mod decision;
mod engine;
pub mod plan;
mod policy;
mod reason;
mod task;

pub use build::{ACCESS_TTL_RANGE, build, check};
pub use clock::{Clock, ManualClock, Timestamp};
pub use decision::{Decision, MAX_TOOL_NAME_BYTES, Outcome, Transition, bounded_tool_name};
pub use engine::{Denial, Engine, PinStatus, ToolDef};
pub use portcullis_config as config;
pub use reason::{Reason, UnknownReason};
pub use task::{Grant, GrantFor, Task, TaskStatus};
