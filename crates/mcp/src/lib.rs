//! The MCP wire protocol, as Portcullis speaks it on both sides.
//!
//! - [`jsonrpc`]: JSON-RPC 2.0 messages, parsed from bounded input.
//! - [`era`]: the two protocol eras — 2025-11-25 (`initialize`, sessions)
//!   and 2026-07-28 (stateless, per-request `_meta`, routing headers) — and
//!   the checks a server runs to tell them apart.
//! - [`sse`]: Server-Sent Events framing, incremental and bounded.
//! - [`client`]: the upstream client (stdio, Streamable HTTP, both eras).
//! - [`bridge`]: `portcullis connect`, stdio in front of the gateway's `/mcp`.
//!
//! Everything that arrives from a peer is untrusted: every parser here has
//! a size bound and never panics.

pub mod bridge;
pub mod client;
pub mod era;
pub mod jsonrpc;
pub mod sse;

pub use jsonrpc::{ErrorObject, Id, Message, ParseError};
