//! The two MCP protocol eras and how a peer tells them apart.
//!
//! **2025-11-25 (legacy, "handshake" era).** The client opens with
//! `initialize` (params `protocolVersion`, `capabilities`, `clientInfo`),
//! then sends `notifications/initialized`. Over Streamable HTTP the server
//! answers `initialize` with an `Mcp-Session-Id` header that every later
//! request carries, along with `MCP-Protocol-Version`; GET opens a stream
//! of server messages and DELETE ends the session.
//!
//! **2026-07-28 (modern, stateless).** No handshake and no session. Every
//! request carries, in `params._meta`, the keys
//! `io.modelcontextprotocol/protocolVersion` and
//! `io.modelcontextprotocol/clientCapabilities` (and, optionally,
//! `io.modelcontextprotocol/clientInfo`). `server/discover` returns the
//! server's capabilities and `supportedVersions`. Over HTTP each POST also
//! carries `MCP-Protocol-Version`, `Mcp-Method` (the body's method) and, for
//! `tools/call`, `prompts/get` and `resources/read`, `Mcp-Name` (the body's
//! `name` or `uri`); a header that disagrees with the body is refused with
//! HTTP 400 and JSON-RPC error -32020. Results carry `resultType`.
//!
//! **Detection.** A client probes with `server/discover` at the modern
//! version; a legacy server answers "method not found" (or an invalid
//! params / unsupported version error), and the client falls back to
//! `initialize`. An HTTP server routes a POST whose `MCP-Protocol-Version`
//! header names a modern version to the stateless path, and everything
//! else to the session path.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::jsonrpc::{ErrorObject, HEADER_MISMATCH, INVALID_PARAMS, UNSUPPORTED_PROTOCOL_VERSION};

/// The handshake-era revision this crate speaks.
pub const LEGACY_VERSION: &str = "2025-11-25";
/// Every handshake-era revision a peer may ask for (oldest first).
pub const LEGACY_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];
/// The stateless revision this crate speaks.
pub const MODERN_VERSION: &str = "2026-07-28";
/// Every stateless revision this crate speaks.
pub const MODERN_VERSIONS: &[&str] = &[MODERN_VERSION];

/// `_meta` key: the request's protocol version (modern era).
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key: the client's capabilities (modern era).
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key: the client's name and version (modern era, optional).
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
/// `_meta` key: the server's name and version on results (modern era).
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";

/// HTTP header: the protocol version.
pub const HEADER_PROTOCOL_VERSION: &str = "mcp-protocol-version";
/// HTTP header: the JSON-RPC method (modern era).
pub const HEADER_METHOD: &str = "mcp-method";
/// HTTP header: the tool, prompt or resource named by the body (modern era).
pub const HEADER_NAME: &str = "mcp-name";
/// HTTP header: the session (legacy era).
pub const HEADER_SESSION: &str = "mcp-session-id";

/// Which era a connection or request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Era {
    /// 2025-11-25 and earlier: `initialize`, sessions.
    Legacy,
    /// 2026-07-28: stateless.
    Modern,
}

impl Era {
    /// The revision string this crate sends for the era.
    pub fn version(self) -> &'static str {
        match self {
            Self::Legacy => LEGACY_VERSION,
            Self::Modern => MODERN_VERSION,
        }
    }

    /// The era of a revision string, if it is one this crate knows.
    pub fn of(version: &str) -> Option<Self> {
        if MODERN_VERSIONS.contains(&version) {
            Some(Self::Modern)
        } else if LEGACY_VERSIONS.contains(&version) {
            Some(Self::Legacy)
        } else {
            None
        }
    }
}

/// The body param that a name-bearing method mirrors in `Mcp-Name`.
pub fn name_param(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

/// The `_meta` a modern-era client puts in every request's params.
pub fn client_meta(name: &str, version: &str) -> Value {
    json!({
        META_PROTOCOL_VERSION: MODERN_VERSION,
        META_CLIENT_CAPABILITIES: {},
        META_CLIENT_INFO: { "name": name, "version": version },
    })
}

/// Adds the modern-era `_meta` envelope to request params (creating them).
pub fn with_client_meta(params: Option<Value>, meta: &Value) -> Value {
    let mut obj = match params {
        Some(Value::Object(o)) => o,
        _ => Map::new(),
    };
    let entry = obj
        .entry("_meta".to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if let (Value::Object(into), Value::Object(from)) = (entry, meta) {
        for (k, v) in from {
            into.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    Value::Object(obj)
}

/// The routing headers of one HTTP request, as received. A header that
/// appeared more than once is recorded in `duplicated` (first and last
/// readers would disagree, so it can never match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingHeaders {
    /// `MCP-Protocol-Version`.
    pub protocol_version: Option<String>,
    /// `Mcp-Method`.
    pub method: Option<String>,
    /// `Mcp-Name`.
    pub name: Option<String>,
    /// The first routing header that appeared twice, if any.
    pub duplicated: Option<&'static str>,
}

/// What a modern-era request declared about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ModernEnvelope {
    /// The protocol version of the request.
    pub protocol_version: String,
    /// The client's capabilities.
    pub client_capabilities: Value,
    /// The client's name and version, if sent.
    pub client_info: Option<Value>,
}

/// Checks a modern-era request's envelope and, over HTTP, its routing
/// headers, in this order (first failure wins):
///
/// 1. `params._meta` carries the protocol version and client capabilities
///    (else -32602);
/// 2. with `headers`: no routing header twice, `MCP-Protocol-Version`
///    equals the envelope's version, `Mcp-Method` equals the method, and
///    `Mcp-Name` equals the named param (else -32020);
/// 3. the version is one this crate speaks (else -32022 with
///    `data = {supported, requested}`).
pub fn check_modern(
    method: &str,
    params: Option<&Value>,
    headers: Option<&RoutingHeaders>,
) -> Result<ModernEnvelope, ErrorObject> {
    let meta = params
        .and_then(|p| p.get("_meta"))
        .and_then(Value::as_object)
        .ok_or_else(|| {
            ErrorObject::new(
                INVALID_PARAMS,
                format!(
                    "params._meta must be an object carrying {META_PROTOCOL_VERSION} and {META_CLIENT_CAPABILITIES}"
                ),
            )
        })?;
    let (Some(version), Some(caps)) = (
        meta.get(META_PROTOCOL_VERSION),
        meta.get(META_CLIENT_CAPABILITIES),
    ) else {
        return Err(ErrorObject::new(
            INVALID_PARAMS,
            format!(
                "params._meta is missing {META_PROTOCOL_VERSION} or {META_CLIENT_CAPABILITIES}"
            ),
        ));
    };
    if let Some(h) = headers {
        if let Some(dup) = h.duplicated {
            return Err(mismatch(format!("{dup} header appears more than once")));
        }
        if h.protocol_version.as_deref() != version.as_str() || h.protocol_version.is_none() {
            return Err(mismatch(
                "MCP-Protocol-Version header does not match the request's protocol version".into(),
            ));
        }
        if h.method.as_deref() != Some(method) {
            return Err(mismatch(
                "Mcp-Method header does not match the request body's method".into(),
            ));
        }
        if let Some(key) = name_param(method)
            && let Some(body) = params.and_then(|p| p.get(key)).filter(|v| !v.is_null())
        {
            let header = h.name.as_deref().and_then(decode_header_value);
            if header.as_deref() != body.as_str() {
                return Err(mismatch(format!(
                    "Mcp-Name header does not match the request body's {key:?}"
                )));
            }
        }
    }
    let Some(version) = version.as_str() else {
        return Err(ErrorObject::new(
            INVALID_PARAMS,
            "the protocol version must be a string",
        ));
    };
    if !MODERN_VERSIONS.contains(&version) {
        return Err(unsupported_version(version));
    }
    Ok(ModernEnvelope {
        protocol_version: version.to_owned(),
        client_capabilities: caps.clone(),
        client_info: meta.get(META_CLIENT_INFO).cloned(),
    })
}

fn mismatch(message: String) -> ErrorObject {
    ErrorObject::new(HEADER_MISMATCH, message)
}

/// The -32022 error for a version this crate does not speak.
pub fn unsupported_version(requested: &str) -> ErrorObject {
    ErrorObject::new(UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version")
        .with_data(json!({ "supported": MODERN_VERSIONS, "requested": requested }))
}

/// Reads a header value, decoding the `=?base64?…?=` form that carries
/// values which are not visible ASCII. A malformed or non-canonical
/// encoding reads as `None`, so it never matches a body value.
pub fn decode_header_value(raw: &str) -> Option<String> {
    let Some(payload) = raw
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    else {
        return Some(raw.to_owned());
    };
    let engine = base64::engine::general_purpose::STANDARD;
    let bytes = engine.decode(payload).ok()?;
    if engine.encode(&bytes) != payload {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// Writes a value for `Mcp-Name`: as is when it is visible ASCII without
/// leading or trailing spaces, else in the `=?base64?…?=` form.
pub fn encode_header_value(value: &str) -> String {
    let plain = value.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !value.starts_with(' ')
        && !value.ends_with(' ')
        && (!value.starts_with("=?base64?") || !value.ends_with("?="));
    if plain {
        value.to_owned()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(value)
        )
    }
}

/// The HTTP status that carries a JSON-RPC error code on the modern
/// path: 400 for request and envelope errors, 404 for an unknown method,
/// 200 otherwise.
pub fn http_status_for(code: i64) -> u16 {
    use crate::jsonrpc::{
        INVALID_REQUEST, METHOD_NOT_FOUND, MISSING_REQUIRED_CLIENT_CAPABILITY, PARSE_ERROR,
    };
    match code {
        PARSE_ERROR
        | INVALID_REQUEST
        | INVALID_PARAMS
        | HEADER_MISMATCH
        | MISSING_REQUIRED_CLIENT_CAPABILITY
        | UNSUPPORTED_PROTOCOL_VERSION => 400,
        METHOD_NOT_FOUND => 404,
        _ => 200,
    }
}

/// Whether a browser's `Origin` may reach a Streamable HTTP endpoint whose
/// own origin is `own` (`http://host:port`, a trailing `/` ignored): that
/// origin, or a loopback one (`localhost`, `127.0.0.1`, `[::1]`, any port).
/// The MCP transport asks servers to check `Origin`, so that a web page a
/// user visits cannot drive a local server (DNS rebinding); a request
/// without the header is not from a browser and is not judged here.
pub fn origin_allowed(origin: &str, own: &str) -> bool {
    let own = own.trim_end_matches('/');
    if origin == own {
        return true;
    }
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = if let Some(v6) = rest.strip_prefix('[') {
        v6.split(']').next().map(|h| format!("[{h}]"))
    } else {
        rest.split(':').next().map(str::to_owned)
    };
    matches!(host.as_deref(), Some("localhost" | "127.0.0.1" | "[::1]"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn params(name: &str) -> Value {
        json!({"name": name, "arguments": {}, "_meta": client_meta("t", "1")})
    }

    fn headers(method: &str, name: Option<&str>) -> RoutingHeaders {
        RoutingHeaders {
            protocol_version: Some(MODERN_VERSION.into()),
            method: Some(method.into()),
            name: name.map(str::to_owned),
            duplicated: None,
        }
    }

    #[test]
    fn a_coherent_request_passes() {
        let p = params("fs.read");
        let env = check_modern(
            "tools/call",
            Some(&p),
            Some(&headers("tools/call", Some("fs.read"))),
        )
        .unwrap();
        assert_eq!(env.protocol_version, MODERN_VERSION);
    }

    #[test]
    fn each_mismatch_is_32020() {
        let p = params("fs.read");
        for h in [
            headers("tools/list", Some("fs.read")),
            headers("tools/call", Some("fs.write")),
            headers("tools/call", None),
            RoutingHeaders {
                protocol_version: Some(LEGACY_VERSION.into()),
                ..headers("tools/call", Some("fs.read"))
            },
            RoutingHeaders {
                duplicated: Some("mcp-name"),
                ..headers("tools/call", Some("fs.read"))
            },
        ] {
            let e = check_modern("tools/call", Some(&p), Some(&h)).unwrap_err();
            assert_eq!(e.code, HEADER_MISMATCH, "{h:?}");
            assert_eq!(http_status_for(e.code), 400);
        }
    }

    #[test]
    fn envelope_errors_come_first_and_versions_are_checked() {
        let e = check_modern("tools/list", Some(&json!({})), None).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        let mut p = params("x");
        p["_meta"][META_PROTOCOL_VERSION] = json!("2099-01-01");
        let e = check_modern("tools/call", Some(&p), None).unwrap_err();
        assert_eq!(e.code, UNSUPPORTED_PROTOCOL_VERSION);
        assert_eq!(e.data.unwrap()["supported"], json!([MODERN_VERSION]));
    }

    #[test]
    fn header_values_round_trip() {
        for v in ["plain.tool", "naïve", " spaced", "=?base64?eA==?="] {
            assert_eq!(
                decode_header_value(&encode_header_value(v)).as_deref(),
                Some(v)
            );
        }
        assert_eq!(decode_header_value("=?base64?not base64?="), None);
        assert_eq!(
            decode_header_value("=?base64?eB==?="),
            None,
            "non-canonical"
        );
    }
}
