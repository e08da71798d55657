//! Reading request bodies strictly.
//!
//! Every JSON body goes through [`read_json`]:
//!
//! 1. at most `server.max_body_bytes`, read within [`BODY_TIMEOUT`] (413 /
//!    400 otherwise);
//! 2. nesting depth at most [`MAX_JSON_DEPTH`], checked on the raw bytes
//!    before parsing (400);
//! 3. no object with the same key twice, at any depth (400): a second
//!    `"tool"` must not be able to mean one thing to us and another to
//!    whoever reads the log;
//! 4. the target type rejects unknown fields (400).
//!
//! Form bodies (`/oauth/*`) get the same size and time bounds, and a
//! parameter given twice is rejected (RFC 6749 section 3.2).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ApiError, Kind};

/// Deepest nesting of arrays and objects accepted in a JSON body.
pub const MAX_JSON_DEPTH: usize = 64;
/// Longest a client may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the whole body within `limit` bytes and [`BODY_TIMEOUT`].
pub async fn read_bytes(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let limited = Limited::new(body, limit);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ApiError::bad_request("request body not received in time")),
        Ok(Err(err)) => {
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError::new(
                    Kind::TooLarge,
                    format!("body larger than {limit} bytes"),
                ))
            } else {
                Err(ApiError::bad_request("could not read the request body"))
            }
        }
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Parses `bytes` as JSON under the rules above, into `T`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    check_depth(bytes)?;
    let value = parse_value(bytes)?;
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

/// Parses `bytes` as a JSON value under the rules above (depth, duplicate
/// keys), without a target type.
pub fn parse_any(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    check_depth(bytes)?;
    parse_value(bytes)
}

/// Reads and parses a JSON body.
pub async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = read_bytes(body, limit).await?;
    parse_json(&bytes)
}

/// Rejects JSON nested deeper than [`MAX_JSON_DEPTH`], scanning bytes and
/// skipping string contents. Linear, no recursion.
fn check_depth(bytes: &[u8]) -> Result<(), ApiError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(ApiError::bad_request(format!(
                        "JSON nested deeper than {MAX_JSON_DEPTH} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Parses JSON into a `Value`, failing on a duplicate key in any object.
fn parse_value(bytes: &[u8]) -> Result<Value, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde::Deserialize::deserialize(NoDuplicates(&mut de))
        .map(|NoDupValue(v)| v)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    Ok(value)
}

struct NoDuplicates<D>(D);

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for NoDuplicates<D> {
    type Error = D::Error;
    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

/// A JSON value built by a visitor that refuses duplicate object keys.
struct NoDupValue(Value);

impl<'de> serde::Deserialize<'de> for NoDupValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NoDupVisitor).map(NoDupValue)
    }
}

struct NoDupVisitor;

impl<'de> serde::de::Visitor<'de> for NoDupVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(NoDupValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key {:?}",
                    key.chars().take(64).collect::<String>()
                )));
            }
            let NoDupValue(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Reads and parses a form body (see [`parse_form`]).
pub async fn read_form(body: Body, limit: usize) -> Result<BTreeMap<String, String>, ApiError> {
    let bytes = read_bytes(body, limit).await?;
    parse_form(&bytes)
}

/// Parses an `application/x-www-form-urlencoded` body; a parameter given
/// twice, or more than 32 parameters, is a bad request.
pub fn parse_form(bytes: &[u8]) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for (n, (k, v)) in form_urlencoded(bytes).enumerate() {
        if n >= 32 {
            return Err(ApiError::bad_request("too many form parameters"));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(ApiError::bad_request(format!(
                "parameter {:?} given more than once",
                k.chars().take(64).collect::<String>()
            )));
        }
    }
    Ok(out)
}

/// Splits and percent-decodes a form body.
fn form_urlencoded(bytes: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    bytes
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut it = pair.splitn(2, |&b| b == b'=');
            let k = it.next().unwrap_or_default();
            let v = it.next().unwrap_or_default();
            (decode(k), decode(v))
        })
}

fn decode(part: &[u8]) -> String {
    let mut out = Vec::with_capacity(part.len());
    let mut i = 0;
    while let Some(&b) = part.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = part
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Call {
        tool: String,
        #[allow(dead_code)]
        arguments: Value,
    }

    #[test]
    fn duplicate_keys_are_rejected_at_any_depth() {
        assert!(parse_json::<Call>(br#"{"tool":"a","arguments":{},"tool":"b"}"#).is_err());
        assert!(parse_json::<Call>(br#"{"tool":"a","arguments":{"x":1,"x":2}}"#).is_err());
        assert!(parse_json::<Call>(br#"{"tool":"a","arguments":[{"y":1,"y":1}]}"#).is_err());
        let ok = parse_json::<Call>(br#"{"tool":"a","arguments":{"x":{"x":1}}}"#).unwrap();
        assert_eq!(ok.tool, "a");
    }

    #[test]
    fn unknown_fields_and_trailing_bytes_are_rejected() {
        assert!(parse_json::<Call>(br#"{"tool":"a","arguments":{},"extra":1}"#).is_err());
        assert!(parse_json::<Call>(br#"{"tool":"a","arguments":{}} x"#).is_err());
    }

    #[test]
    fn depth_is_bounded_and_strings_do_not_count() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(check_depth(deep.as_bytes()).is_err());
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(check_depth(ok.as_bytes()).is_ok());
        let in_string = format!("\"{}\"", "[".repeat(1000));
        assert!(check_depth(in_string.as_bytes()).is_ok());
        assert!(check_depth(br#""\"[[[""#).is_ok());
    }

    #[test]
    fn forms() {
        let f = parse_form(b"grant_type=refresh_token&refresh_token=a%2Bb+c").unwrap();
        assert_eq!(f["refresh_token"], "a+b c");
        assert!(parse_form(b"a=1&a=2").is_err());
    }
}
