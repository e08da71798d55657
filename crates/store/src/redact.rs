//! What an audit record may hold of a call's arguments: secrets masked,
//! size bounded. The gateway and the embedded ledger apply these same
//! rules before an [`crate::Op::Append`] (a store never sees the raw
//! arguments of a call).

use serde_json::Value;
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Largest argument object kept whole in an audit record, in bytes of JSON.
pub const MAX_AUDIT_ARGS_BYTES: usize = 8 * 1024;

/// Arguments larger than [`MAX_AUDIT_ARGS_BYTES`] are recorded as
/// `{"sha256": <digest of their JSON>, "bytes": <length>, "prefix": <the
/// first bytes of it, cut at a character boundary>}`. Applied after
/// redaction: neither the digest nor the prefix sees a redacted secret.
pub fn bounded(args: Value) -> Value {
    // The text `args.to_string()` gives, without `fmt` (cannot fail).
    let text = serde_json::to_string(&args).unwrap_or_default();
    if text.len() <= MAX_AUDIT_ARGS_BYTES {
        return args;
    }
    let cut = (0..=MAX_AUDIT_ARGS_BYTES)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    serde_json::json!({
        "sha256": sha256_hex(text.as_bytes()),
        "bytes": text.len(),
        "prefix": text.get(..cut).unwrap_or_default(),
    })
}

/// `args` with, at any depth:
/// - every value under a key that contains a word of `redact` (lowercase;
///   matched case-insensitively, so `password` hides `db_password` and
///   `Password` alike) replaced by `"[redacted]"`;
/// - the user information of every URL in a string (`postgres://u:pw@h`)
///   replaced by `[redacted]`, whatever its key.
pub fn redact(args: &Value, redact: &[String]) -> Value {
    match args {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = k.to_lowercase();
                    let hidden = redact.iter().any(|r| key.contains(r.as_str()));
                    let v = if hidden {
                        Value::String("[redacted]".to_owned())
                    } else {
                        redact_value(v, redact)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        other => redact_value(other, redact),
    }
}

fn redact_value(v: &Value, keys: &[String]) -> Value {
    match v {
        Value::Object(_) => redact(v, keys),
        Value::Array(items) => Value::Array(items.iter().map(|i| redact_value(i, keys)).collect()),
        Value::String(s) => Value::String(scrub_userinfo(s)),
        other => other.clone(),
    }
}

/// `text` with the user information (`user:password@`) of every URL in it
/// replaced by `[redacted]@`. A URL is `scheme://authority…`; its
/// authority ends at `/`, `?`, `#` or white space, and its user
/// information is everything before the authority's last `@`.
pub fn scrub_userinfo(text: &str) -> String {
    if !text.contains("://") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // INVARIANT: every split is at a char boundary ("://" is ASCII, and
    // `find` returns boundaries), so `split_at_checked` never fails.
    while let Some((before, after)) = rest
        .find("://")
        .and_then(|at| rest.split_at_checked(at + 3))
    {
        out.push_str(before);
        let end = after
            .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
            .unwrap_or(after.len());
        let Some((authority, tail)) = after.split_at_checked(end) else {
            rest = after;
            break;
        };
        match authority.rfind('@') {
            Some(user_end) => {
                out.push_str("[redacted]");
                out.push_str(authority.get(user_end..).unwrap_or_default());
            }
            None => out.push_str(authority),
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}
