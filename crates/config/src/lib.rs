//! The Portcullis configuration file.
//!
//! One TOML file describes a gateway: its server, store, tokens, audit log,
//! admins, upstreams, the tool registry, workflows, agents, policies, anomaly
//! rules and elevation. This crate turns that file into typed structs
//! ([`Config`]), keeps where every key came from ([`SourceMap`]) so that every
//! problem can be reported as `FILE:LINE KEY.PATH: message` ([`Finding`]), and
//! reads the Cedar files it names ([`LoadedConfig`]).
//!
//! Unknown keys are errors. Relative paths resolve from the folder of the
//! configuration file. Whole-file checks (references between sections,
//! reachability of workflow states, policy validation) belong to
//! `portcullis_core::check`, which reports through the same [`Finding`] type.

mod duration;
mod finding;
mod load;
mod model;
mod source;

pub use duration::{Duration, DurationError};
pub use finding::{Finding, Findings, Reporter};
pub use load::{LoadedConfig, MAX_FILE_BYTES, MAX_POLICY_FILES, PolicyFile, line_of};
pub use model::*;
pub use source::{KeyPath, Segment, SourceMap};
