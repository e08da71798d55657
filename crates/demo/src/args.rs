//! Reading a tool's `arguments` object: the checks its `inputSchema`
//! promises (`additionalProperties: false`, required keys, types, bounds),
//! done by hand so a bad call is a tool error that says what is wrong.

use serde_json::{Map, Value};

/// The longest name of an unknown argument quoted back in an error.
const QUOTE_MAX: usize = 64;

/// Why a tool call failed; it becomes a result with `isError: true`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ToolError {
    /// `arguments` is not an object.
    #[error("arguments must be a JSON object")]
    NotObject,
    /// An argument the schema does not declare.
    #[error("unknown argument {0:?}")]
    Unknown(String),
    /// A required argument is absent.
    #[error("missing required argument {0:?}")]
    Missing(&'static str),
    /// An argument of the wrong type or out of range.
    #[error("argument {key:?} must be {expected}")]
    Invalid {
        /// The argument.
        key: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// A string or array over its bound.
    #[error("argument {key:?} is over its limit of {max} {unit}")]
    TooLong {
        /// The argument.
        key: &'static str,
        /// The bound.
        max: usize,
        /// Bytes or items.
        unit: &'static str,
    },
    /// The call was understood and refused (read-only SQL, a path outside
    /// the root, an unknown table, ...).
    #[error("{0}")]
    Refused(String),
    /// SQLite said no.
    #[error("SQL error: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The file system said no.
    #[error("{0}")]
    Io(String),
}

/// Cuts a peer-chosen string for quoting in a message.
pub(crate) fn quote(s: &str) -> String {
    s.chars().take(QUOTE_MAX).collect()
}

/// A tool's arguments, checked against the names it accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Args<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Args<'a> {
    /// Reads `arguments`, refusing any key outside `allowed`.
    pub(crate) fn new(value: &'a Value, allowed: &[&str]) -> Result<Self, ToolError> {
        let Value::Object(map) = value else {
            return Err(ToolError::NotObject);
        };
        if let Some(key) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ToolError::Unknown(quote(key)));
        }
        Ok(Self { map })
    }

    /// A required string of at most `max` bytes.
    pub(crate) fn str(&self, key: &'static str, max: usize) -> Result<&'a str, ToolError> {
        self.opt_str(key, max)?.ok_or(ToolError::Missing(key))
    }

    /// An optional string of at most `max` bytes.
    pub(crate) fn opt_str(
        &self,
        key: &'static str,
        max: usize,
    ) -> Result<Option<&'a str>, ToolError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.len() <= max => Ok(Some(s)),
            Some(Value::String(_)) => Err(ToolError::TooLong {
                key,
                max,
                unit: "bytes",
            }),
            Some(_) => Err(ToolError::Invalid {
                key,
                expected: "a string",
            }),
        }
    }

    /// An optional integer of at least 1.
    pub(crate) fn opt_positive(&self, key: &'static str) -> Result<Option<u64>, ToolError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Ok(Some(n)),
                _ => Err(ToolError::Invalid {
                    key,
                    expected: "an integer of at least 1",
                }),
            },
        }
    }

    /// A required array of at most `max` items.
    pub(crate) fn array(&self, key: &'static str, max: usize) -> Result<&'a [Value], ToolError> {
        match self.map.get(key) {
            None => Err(ToolError::Missing(key)),
            Some(Value::Array(items)) if items.len() <= max => Ok(items),
            Some(Value::Array(_)) => Err(ToolError::TooLong {
                key,
                max,
                unit: "items",
            }),
            Some(_) => Err(ToolError::Invalid {
                key,
                expected: "an array",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_keys_types_and_bounds_are_refused() {
        let v = json!({"sql": "select 1", "limit": 0, "rows": [1, 2, 3]});
        assert!(matches!(
            Args::new(&v, &["sql"]),
            Err(ToolError::Unknown(k)) if k == "limit"
        ));
        let a = Args::new(&v, &["sql", "limit", "rows"]).unwrap();
        assert_eq!(a.str("sql", 8).unwrap(), "select 1");
        assert!(matches!(a.str("sql", 7), Err(ToolError::TooLong { .. })));
        assert!(matches!(a.str("nope", 7), Err(ToolError::Missing("nope"))));
        assert!(matches!(
            a.opt_positive("limit"),
            Err(ToolError::Invalid { .. })
        ));
        assert!(matches!(a.array("rows", 2), Err(ToolError::TooLong { .. })));
        assert_eq!(a.array("rows", 3).unwrap().len(), 3);
        assert!(matches!(
            Args::new(&json!([1]), &[]),
            Err(ToolError::NotObject)
        ));
    }
}
