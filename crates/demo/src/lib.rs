//! The built-in demo MCP server.
