//! Tool arguments: bounds, JSON Schema validation, and the typed view of the
//! arguments that Cedar policies see.
//!
//! Checks run in this order, and each failure is `args_invalid`:
//!
//! 1. **Bounds**, walked iteratively so no input can exhaust the stack:
//!    nesting depth ≤ [`MAX_DEPTH`], values ≤ [`MAX_NODES`], string and key
//!    bytes ≤ [`MAX_TEXT_BYTES`]. The arguments must be a JSON object.
//! 2. **The tool's JSON Schema**, compiled once when the engine is built.
//!    External `$ref`s are never fetched.
//! 3. **Conversion for Cedar.** Only properties the schema declares with a
//!    type Cedar can hold (`string`, `integer`, `boolean`, arrays of these,
//!    objects of these) are passed to policies, as `context.args`. A declared
//!    value Cedar cannot hold exactly (an integer outside `i64`) is a denial,
//!    never a silent omission: an omitted value would make a guarded
//!    `forbid` skip, which is a fail-open.
//!
//! Denial details name the JSON pointer and the schema keyword, never the
//! offending value, which may be a secret.

use cedar_policy::RestrictedExpression;
use serde_json::{Map, Value};

/// Deepest nesting of arrays and objects accepted in arguments.
pub const MAX_DEPTH: usize = 32;
/// Most JSON values (of any kind, nested ones included) in one call's arguments.
pub const MAX_NODES: usize = 10_000;
/// Most bytes of strings and object keys, summed, in one call's arguments.
pub const MAX_TEXT_BYTES: usize = 1 << 20;
/// Deepest schema nesting turned into Cedar types; deeper parts are not typed.
const MAX_SHAPE_DEPTH: usize = 16;

/// Checks the size bounds of `args`; the error says which bound.
pub fn check_bounds(args: &Value) -> Result<(), String> {
    let mut stack: Vec<(&Value, usize)> = vec![(args, 1)];
    let mut nodes = 0usize;
    let mut text = 0usize;
    while let Some((value, depth)) = stack.pop() {
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(format!("more than {MAX_NODES} values"));
        }
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        match value {
            Value::String(s) => text = text.saturating_add(s.len()),
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Value::Object(map) => {
                for (key, v) in map {
                    text = text.saturating_add(key.len());
                    stack.push((v, depth + 1));
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
        if text > MAX_TEXT_BYTES {
            return Err(format!("more than {MAX_TEXT_BYTES} bytes of text"));
        }
    }
    Ok(())
}

/// A Cedar type derived from a JSON Schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// `string` (or an `enum` of strings).
    String,
    /// `integer`.
    Long,
    /// `boolean`.
    Bool,
    /// `array` whose `items` have a shape.
    Set(Box<Shape>),
    /// `object`: its typed properties.
    Record(Vec<Field>),
}

/// One typed property of an object shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The property name.
    pub name: String,
    /// Listed in the schema's `required`.
    pub required: bool,
    /// Its type.
    pub shape: Shape,
}

impl Shape {
    /// The shape of an arguments schema: always a record; properties whose
    /// type Cedar cannot hold are left out.
    pub fn of_args(schema: &Value) -> Self {
        match Self::of(schema, 0) {
            Some(shape @ Self::Record(_)) => shape,
            _ => Self::Record(Vec::new()),
        }
    }

    fn of(schema: &Value, depth: usize) -> Option<Self> {
        if depth > MAX_SHAPE_DEPTH {
            return None;
        }
        let ty = schema.get("type").and_then(Value::as_str);
        match ty {
            Some("string") => Some(Self::String),
            Some("integer") => Some(Self::Long),
            Some("boolean") => Some(Self::Bool),
            Some("array") => {
                let items = schema.get("items")?;
                Some(Self::Set(Box::new(Self::of(items, depth + 1)?)))
            }
            Some("object") => {
                let required: Vec<&str> = schema
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let fields = schema
                    .get("properties")
                    .and_then(Value::as_object)
                    .map(|props| {
                        props
                            .iter()
                            .filter_map(|(name, prop)| {
                                Some(Field {
                                    name: name.clone(),
                                    required: required.contains(&name.as_str()),
                                    shape: Self::of(prop, depth + 1)?,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(Self::Record(fields))
            }
            None => {
                let all_strings = schema
                    .get("enum")
                    .and_then(Value::as_array)
                    .is_some_and(|e| !e.is_empty() && e.iter().all(Value::is_string));
                all_strings.then_some(Self::String)
            }
            Some(_) => None,
        }
    }

    /// This shape in Cedar's JSON schema syntax.
    pub fn to_cedar_schema(&self) -> Value {
        match self {
            Self::String => serde_json::json!({ "type": "String" }),
            Self::Long => serde_json::json!({ "type": "Long" }),
            Self::Bool => serde_json::json!({ "type": "Boolean" }),
            Self::Set(item) => {
                serde_json::json!({ "type": "Set", "element": item.to_cedar_schema() })
            }
            Self::Record(fields) => {
                let attributes: Map<String, Value> = fields
                    .iter()
                    .map(|f| {
                        let mut ty = f.shape.to_cedar_schema();
                        if let Some(obj) = ty.as_object_mut() {
                            obj.insert("required".to_owned(), Value::Bool(f.required));
                        }
                        (f.name.clone(), ty)
                    })
                    .collect();
                serde_json::json!({ "type": "Record", "attributes": attributes })
            }
        }
    }

    /// Converts call arguments, already validated against the schema this
    /// shape came from, into the Cedar record `context.args`. Undeclared
    /// properties are dropped, and so are declared top-level ones outside
    /// `keep` (when given): what no policy of the tool reads is not worth
    /// converting. The error names the JSON pointer, never the value.
    pub fn to_cedar_args(
        &self,
        value: &Value,
        keep: Option<&std::collections::HashSet<String>>,
    ) -> Result<RestrictedExpression, String> {
        let result = match (self, value) {
            (Self::Record(fields), Value::Object(map)) => {
                let kept = fields
                    .iter()
                    .filter(|f| keep.is_none_or(|k| k.contains(&f.name)));
                Self::record(kept, map)
            }
            _ => self.convert(value),
        };
        result.map_err(ConvError::describe)
    }

    /// Converts `value` (see [`Shape::to_cedar_args`]); every field kept.
    pub fn to_cedar(&self, value: &Value) -> Result<RestrictedExpression, String> {
        self.convert(value).map_err(ConvError::describe)
    }

    fn record<'f>(
        fields: impl Iterator<Item = &'f Field>,
        map: &Map<String, Value>,
    ) -> Result<RestrictedExpression, ConvError> {
        let mut out = Vec::new();
        for field in fields {
            match map.get(&field.name) {
                Some(v) => {
                    let converted = field
                        .shape
                        .convert(v)
                        .map_err(|e| e.under(field.name.replace('~', "~0").replace('/', "~1")))?;
                    out.push((field.name.clone(), converted));
                }
                None if field.required => {
                    return Err(ConvError::new("required property missing"));
                }
                None => {}
            }
        }
        RestrictedExpression::new_record(out).map_err(|e| ConvError::new(e.to_string()))
    }

    fn convert(&self, value: &Value) -> Result<RestrictedExpression, ConvError> {
        match (self, value) {
            (Self::String, Value::String(s)) => Ok(RestrictedExpression::new_string(s.clone())),
            (Self::Bool, Value::Bool(b)) => Ok(RestrictedExpression::new_bool(*b)),
            (Self::Long, Value::Number(n)) => exact_i64(n)
                .map(RestrictedExpression::new_long)
                .ok_or_else(|| {
                    ConvError::new(
                        "integer outside the range policies can evaluate (64-bit signed)",
                    )
                }),
            (Self::Set(item), Value::Array(values)) => {
                let mut out = Vec::with_capacity(values.len());
                for (i, v) in values.iter().enumerate() {
                    out.push(item.convert(v).map_err(|e| e.under(i.to_string()))?);
                }
                Ok(RestrictedExpression::new_set(out))
            }
            (Self::Record(fields), Value::Object(map)) => Self::record(fields.iter(), map),
            (Self::String, _) => Err(ConvError::new("expected a string")),
            (Self::Bool, _) => Err(ConvError::new("expected a boolean")),
            (Self::Long, _) => Err(ConvError::new("expected an integer")),
            (Self::Set(_), _) => Err(ConvError::new("expected an array")),
            (Self::Record(_), _) => Err(ConvError::new("expected an object")),
        }
    }
}

/// A conversion failure; the path is collected only on this (rare) path,
/// innermost segment first.
#[derive(Debug)]
struct ConvError {
    reversed_path: Vec<String>,
    what: String,
}

impl ConvError {
    fn new(what: impl Into<String>) -> Self {
        Self {
            reversed_path: Vec::new(),
            what: what.into(),
        }
    }

    fn under(mut self, segment: String) -> Self {
        self.reversed_path.push(segment);
        self
    }

    fn describe(self) -> String {
        let pointer: String = self
            .reversed_path
            .iter()
            .rev()
            .map(|s| format!("/{s}"))
            .collect();
        format!("{}: {}", display_pointer(&pointer), self.what)
    }
}

/// The JSON pointer for a denial detail; the root is shown as `/`.
pub(crate) fn display_pointer(pointer: &str) -> &str {
    if pointer.is_empty() { "/" } else { pointer }
}

/// `n` as an `i64` when it is exactly an integer in range (JSON Schema's
/// `integer` accepts `5.0`).
fn exact_i64(n: &serde_json::Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let f = n.as_f64()?;
    // -2^63 is exact in f64; 2^63 is the first value out of range.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    (f.fract() == 0.0 && (-LIMIT..LIMIT).contains(&f)).then(|| {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "range and integrality checked just above"
        )]
        let i = f as i64;
        i
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bounds_reject_deep_wide_and_long_inputs() {
        let mut deep = json!(1);
        for _ in 0..MAX_DEPTH {
            deep = json!([deep]);
        }
        assert!(check_bounds(&deep).unwrap_err().contains("nested deeper"));
        let wide = Value::Array(vec![json!(0); MAX_NODES]);
        assert!(check_bounds(&wide).unwrap_err().contains("values"));
        let long = json!({ "s": "x".repeat(MAX_TEXT_BYTES + 1) });
        assert!(check_bounds(&long).unwrap_err().contains("bytes"));
        assert!(check_bounds(&json!({"a": [1, 2, {"b": "c"}]})).is_ok());
    }

    #[test]
    fn shapes_follow_the_schema() {
        let schema = json!({
            "type": "object",
            "properties": {
                "sql": { "type": "string" },
                "limit": { "type": "integer" },
                "ratio": { "type": "number" },
                "tags": { "type": "array", "items": { "type": "string" } },
                "mode": { "enum": ["a", "b"] },
                "opts": { "type": "object", "properties": { "dry": { "type": "boolean" } } }
            },
            "required": ["sql"]
        });
        let Shape::Record(fields) = Shape::of_args(&schema) else {
            panic!("not a record")
        };
        let mut names: Vec<(&str, bool)> = fields
            .iter()
            .map(|f| (f.name.as_str(), f.required))
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                ("limit", false),
                ("mode", false),
                ("opts", false),
                ("sql", true),
                ("tags", false)
            ]
        );
    }

    #[test]
    fn integers_out_of_range_are_errors_not_omissions() {
        let shape = Shape::of_args(&json!({
            "type": "object", "properties": { "limit": { "type": "integer" } }
        }));
        assert!(shape.to_cedar(&json!({ "limit": 5.0 })).is_ok());
        let err = shape.to_cedar(&json!({ "limit": u64::MAX })).unwrap_err();
        assert!(err.starts_with("/limit: integer outside"), "{err}");
        assert!(
            !err.contains(&u64::MAX.to_string()),
            "detail must not echo the value"
        );
    }
}
