//! A strict reading of a JSON object for token headers and claims.
//!
//! `serde_json` (like most JSON parsers) silently keeps the *last* of two
//! equal keys, while other parsers keep the first or fail. A token whose
//! header says `"alg":"EdDSA"` to one parser and `"alg":"none"` to another is
//! the classic parser differential, so here a repeated key at any depth makes
//! the whole object unacceptable. Keys are compared after JSON unescaping
//! (`"alg"` and `"a\u006cg"` are equal), which is what every parser acts on.
//!
//! Values are reduced to what a token needs: strings, non-negative integers,
//! and "something else". Nesting depth is bounded by `serde_json`'s recursion
//! limit (128) and size by [`crate::MAX_TOKEN_BYTES`].

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// One JSON value, reduced to the shapes a token field can have.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Json {
    /// A JSON string.
    Str(String),
    /// A JSON integer with no sign, fraction or exponent that fits a `u64`.
    UInt(u64),
    /// Any other value (`null`, `true`, `false`, a negative or fractional
    /// number, an array, an object) free of duplicate keys.
    Other,
    /// An array or object that contains a duplicate key somewhere inside.
    Duplicate,
}

/// A top-level JSON object with every key, and whether any key anywhere in
/// it (at this level or nested) was repeated.
#[derive(Debug)]
pub(crate) struct Object {
    pub(crate) fields: BTreeMap<String, Json>,
    pub(crate) duplicate: bool,
}

/// Why bytes are not an acceptable object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ObjectError {
    /// Not JSON, or JSON but not an object, or trailing data.
    NotAnObject,
    /// A key is repeated somewhere.
    DuplicateKey,
}

/// Parses `bytes` as exactly one JSON object with no duplicate keys at any
/// depth.
pub(crate) fn parse_object(bytes: &[u8]) -> Result<BTreeMap<String, Json>, ObjectError> {
    let object: Object = serde_json::from_slice(bytes).map_err(|_| ObjectError::NotAnObject)?;
    if object.duplicate {
        return Err(ObjectError::DuplicateKey);
    }
    Ok(object.fields)
}

fn read_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Object, A::Error> {
    let mut fields = BTreeMap::new();
    let mut duplicate = false;
    // Every entry is read even after a duplicate is seen: the input must
    // still be well-formed JSON, and the work is bounded by the token size.
    while let Some(key) = map.next_key::<String>()? {
        let value: Json = map.next_value()?;
        duplicate |= value == Json::Duplicate;
        duplicate |= fields.insert(key, value).is_some();
    }
    Ok(Object { fields, duplicate })
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Json, E> {
        Ok(Json::Other)
    }

    // serde_json calls this only for negative integers.
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Json, E> {
        Ok(Json::Other)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        Ok(Json::UInt(v))
    }

    // Anything with a fraction or an exponent (`1.5e9`, `1e9`, `10.0`), and
    // integers too large for a u64.
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Json, E> {
        Ok(Json::Other)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
        Ok(Json::Str(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut duplicate = false;
        while let Some(item) = seq.next_element::<Json>()? {
            duplicate |= item == Json::Duplicate;
        }
        Ok(if duplicate {
            Json::Duplicate
        } else {
            Json::Other
        })
    }

    // NOTE: with serde_json's `arbitrary_precision` feature (not enabled in
    // this workspace) numbers arrive here as one-key maps; they would then be
    // read as `Other`, which rejects valid tokens (fails closed). The tests
    // for integer claims would catch that.
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Json, A::Error> {
        let object = read_map(map)?;
        Ok(if object.duplicate {
            Json::Duplicate
        } else {
            Json::Other
        })
    }
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectVisitor)
    }
}

struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Object;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object, A::Error> {
        read_map(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<BTreeMap<String, Json>, ObjectError> {
        parse_object(s.as_bytes())
    }

    #[test]
    fn reads_the_shapes_a_token_needs() {
        let o =
            parse(r#"{"s":"x","n":17,"big":18446744073709551615,"o":{"a":[1,{"b":2}]}}"#).unwrap();
        assert_eq!(o.get("s"), Some(&Json::Str("x".into())));
        assert_eq!(o.get("n"), Some(&Json::UInt(17)));
        assert_eq!(o.get("big"), Some(&Json::UInt(u64::MAX)));
        assert_eq!(o.get("o"), Some(&Json::Other));
    }

    #[test]
    fn numbers_that_are_not_plain_unsigned_integers_are_other() {
        for n in [
            "1.5e9",
            "1e9",
            "1700000000.0",
            "-1",
            "-0",
            "18446744073709551616",
            "true",
            "null",
            "\"17\"",
        ] {
            let o = parse(&format!(r#"{{"n":{n}}}"#)).unwrap();
            assert_ne!(o.get("n"), Some(&Json::UInt(17)), "{n}");
            assert!(!matches!(o.get("n"), Some(Json::UInt(_))), "{n}");
        }
    }

    #[test]
    fn duplicate_keys_are_rejected_at_any_depth() {
        for s in [
            r#"{"alg":"EdDSA","alg":"none"}"#,
            r#"{"alg":"EdDSA","a\u006cg":"none"}"#,
            r#"{"x":{"k":1,"k":2}}"#,
            r#"{"x":[{"k":1,"k":2}]}"#,
            r#"{"x":[[{"y":{"k":1,"k":1}}]]}"#,
        ] {
            assert_eq!(parse(s).unwrap_err(), ObjectError::DuplicateKey, "{s}");
        }
        // The same key in two different objects is fine.
        parse(r#"{"a":{"k":1},"b":{"k":1}}"#).unwrap();
    }

    #[test]
    fn only_one_object_is_accepted() {
        for s in [
            "",
            "[]",
            "\"x\"",
            "17",
            "null",
            "{",
            "{}{}",
            "{} x",
            "\u{feff}{}",
            r#"{"a":1,}"#,
            r#"{'a':1}"#,
            r#"{"a":"\ud800"}"#,
        ] {
            assert_eq!(parse(s).unwrap_err(), ObjectError::NotAnObject, "{s:?}");
        }
        assert!(parse(" {} \n").unwrap().is_empty());
        assert_eq!(
            parse_object(b"{\"a\":\"\xff\"}").unwrap_err(),
            ObjectError::NotAnObject
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!(r#"{{"a":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(parse(&deep).unwrap_err(), ObjectError::NotAnObject);
    }
}
