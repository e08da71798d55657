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
//! 3. **Conversion for Cedar.** Properties the schema declares with a type
//!    Cedar can hold are passed to policies, as `context.args`: `string`,
//!    `integer` and `number` (as `Long`), `boolean`, arrays and objects of
//!    these, and unions (`type` lists, `anyOf`, `oneOf`, `enum`, `const`)
//!    whose non-null members share one of these types. A value Cedar cannot
//!    hold exactly (an integer outside `i64`, a number with a fraction, a
//!    `null`) is a denial when a policy reads it, never a silent omission:
//!    an omitted value would make a guarded `forbid` skip, a fail-open.
//!    [`Shape::sight`] tells where a policy's read lands, so the engine can
//!    refuse calls that carry an argument a policy reads but Cedar never
//!    sees (undeclared, or declared without such a type).
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
    /// `string` (or an `enum`/`const` of strings).
    String,
    /// `integer`, or `number`: whole numbers in the signed 64-bit range.
    Long,
    /// `boolean`.
    Bool,
    /// `array` whose `items` have a shape.
    Set(Box<Shape>),
    /// `object`: its properties.
    Record(Record),
}

/// An object shape: its declared properties, and whether others may be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The declared properties, typed or not.
    pub fields: Vec<Field>,
    /// Undeclared properties pass the schema (no `additionalProperties =
    /// false`, or `patternProperties`): Cedar never sees them.
    pub open: bool,
}

/// One declared property of an object shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The property name.
    pub name: String,
    /// Listed in the schema's `required`.
    pub required: bool,
    /// Its Cedar type, or why it has none (the property is then not passed
    /// to Cedar).
    pub shape: Result<Shape, Untyped>,
}

/// Why a declared property has no Cedar type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untyped {
    /// No `type` (nor an `enum`, `const`, `anyOf` or `oneOf` that gives one).
    NoType,
    /// Only `null`.
    Null,
    /// A union (`type` list, `anyOf`, `oneOf`) of different Cedar types.
    MixedUnion,
    /// An `enum` or `const` not all strings, all integers or all booleans.
    MixedEnum,
    /// An `array` without one schema for its `items`.
    UntypedItems,
    /// Nested deeper than the typed part of a schema goes.
    TooDeep,
    /// A `type` name JSON Schema does not define.
    UnknownType,
}

impl std::fmt::Display for Untyped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NoType => "its schema gives no type",
            Self::Null => "it can only be null",
            Self::MixedUnion => "it is a union of different types",
            Self::MixedEnum => "it is an enum of mixed or non-scalar values",
            Self::UntypedItems => "it is an array without one schema for its items",
            Self::TooDeep => "it is nested too deep",
            Self::UnknownType => "its type is not a JSON Schema type",
        })
    }
}

/// Where a policy's read of `context.args` lands in a tool's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sight {
    /// Cedar sees what is read.
    Seen,
    /// A typed record or set used as a whole, with parts Cedar never sees
    /// (undeclared or untyped properties, at any depth).
    Partial(Shape),
    /// An argument that can be sent but that Cedar never sees.
    Unseen(Unseen),
    /// The schema rejects every call that carries it.
    Unsendable,
}

/// Why an argument that can be sent is never shown to Cedar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unseen {
    /// Not declared, and the object admits undeclared properties.
    Undeclared,
    /// Declared without a Cedar type.
    Untyped(Untyped),
}

impl std::fmt::Display for Unseen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Undeclared => {
                f.write_str("it is not declared and the schema admits undeclared properties")
            }
            Self::Untyped(why) => why.fmt(f),
        }
    }
}

impl Unseen {
    /// What makes the argument visible to policies.
    pub(crate) fn remedy(self) -> &'static str {
        match self {
            Self::Undeclared => {
                "declare it with a type policies can see, or set additionalProperties = false"
            }
            Self::Untyped(_) => "give it one type policies can see",
        }
    }
}

/// Whether `schema` accepts only `null`.
fn is_null_schema(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("null")
}

impl Shape {
    /// The shape of an arguments schema: always a record; a root that is
    /// not an object schema gives an open record with no typed property.
    pub fn of_args(schema: &Value) -> Self {
        match Self::of(schema, 0) {
            Ok(shape @ Self::Record(_)) => shape,
            _ => Self::Record(Record {
                fields: Vec::new(),
                open: true,
            }),
        }
    }

    fn of(schema: &Value, depth: usize) -> Result<Self, Untyped> {
        if depth > MAX_SHAPE_DEPTH {
            return Err(Untyped::TooDeep);
        }
        match schema.get("type") {
            Some(Value::String(ty)) => Self::of_type(ty, schema, depth),
            // `type = ["integer", "null"]`: the non-null members must agree.
            Some(Value::Array(types)) => Self::common(
                types
                    .iter()
                    .filter(|t| t.as_str() != Some("null"))
                    .map(|t| match t.as_str() {
                        Some(ty) => Self::of_type(ty, schema, depth),
                        None => Err(Untyped::UnknownType),
                    }),
            ),
            Some(_) => Err(Untyped::UnknownType),
            None => {
                let branches = schema
                    .get("anyOf")
                    .or_else(|| schema.get("oneOf"))
                    .and_then(Value::as_array);
                if let Some(branches) = branches {
                    return Self::common(
                        branches
                            .iter()
                            .filter(|b| !is_null_schema(b))
                            .map(|b| Self::of(b, depth + 1)),
                    );
                }
                if let Some(values) = schema.get("enum").and_then(Value::as_array) {
                    return Self::of_values(values.iter());
                }
                if let Some(value) = schema.get("const") {
                    return Self::of_values(std::iter::once(value));
                }
                Err(Untyped::NoType)
            }
        }
    }

    /// The one shape every member has; a union of nothing is `null` only.
    fn common(mut shapes: impl Iterator<Item = Result<Self, Untyped>>) -> Result<Self, Untyped> {
        let first = shapes.next().ok_or(Untyped::Null)??;
        for other in shapes {
            if other.map_err(|_| Untyped::MixedUnion)? != first {
                return Err(Untyped::MixedUnion);
            }
        }
        Ok(first)
    }

    /// The shape of an `enum`/`const`: all strings, all integers or all
    /// booleans (a `null` member is left to the conversion, which refuses it).
    fn of_values<'v>(values: impl Iterator<Item = &'v Value>) -> Result<Self, Untyped> {
        Self::common(values.filter(|v| !v.is_null()).map(|v| match v {
            Value::String(_) => Ok(Self::String),
            Value::Bool(_) => Ok(Self::Bool),
            Value::Number(n) if exact_i64(n).is_some() => Ok(Self::Long),
            _ => Err(Untyped::MixedEnum),
        }))
        .map_err(|e| match e {
            Untyped::MixedUnion => Untyped::MixedEnum,
            other => other,
        })
    }

    fn of_type(ty: &str, schema: &Value, depth: usize) -> Result<Self, Untyped> {
        match ty {
            "string" => Ok(Self::String),
            // Cedar has no fractions: a `number` is shown as a Long when it
            // is a whole number, and refused otherwise (see `convert`).
            "integer" | "number" => Ok(Self::Long),
            "boolean" => Ok(Self::Bool),
            "null" => Err(Untyped::Null),
            "array" => match schema.get("items") {
                Some(items @ Value::Object(_)) => {
                    Ok(Self::Set(Box::new(Self::of(items, depth + 1)?)))
                }
                _ => Err(Untyped::UntypedItems),
            },
            "object" => {
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
                            .map(|(name, prop)| Field {
                                name: name.clone(),
                                required: required.contains(&name.as_str()),
                                shape: Self::of(prop, depth + 1),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let closed = schema.get("additionalProperties") == Some(&Value::Bool(false))
                    && schema
                        .get("patternProperties")
                        .and_then(Value::as_object)
                        .is_none_or(Map::is_empty);
                Ok(Self::Record(Record {
                    fields,
                    open: !closed,
                }))
            }
            _ => Err(Untyped::UnknownType),
        }
    }

    /// This shape in Cedar's JSON schema syntax; untyped properties are left
    /// out.
    pub fn to_cedar_schema(&self) -> Value {
        match self {
            Self::String => serde_json::json!({ "type": "String" }),
            Self::Long => serde_json::json!({ "type": "Long" }),
            Self::Bool => serde_json::json!({ "type": "Boolean" }),
            Self::Set(item) => {
                serde_json::json!({ "type": "Set", "element": item.to_cedar_schema() })
            }
            Self::Record(record) => {
                let attributes: Map<String, Value> = record
                    .fields
                    .iter()
                    .filter_map(|f| {
                        let mut ty = f.shape.as_ref().ok()?.to_cedar_schema();
                        if let Some(obj) = ty.as_object_mut() {
                            obj.insert("required".to_owned(), Value::Bool(f.required));
                        }
                        Some((f.name.clone(), ty))
                    })
                    .collect();
                serde_json::json!({ "type": "Record", "attributes": attributes })
            }
        }
    }

    /// Whether Cedar sees all of a value of this shape.
    fn fully_seen(&self) -> bool {
        match self {
            Self::String | Self::Long | Self::Bool => true,
            Self::Set(item) => item.fully_seen(),
            Self::Record(record) => {
                !record.open
                    && record
                        .fields
                        .iter()
                        .all(|f| f.shape.as_ref().is_ok_and(Self::fully_seen))
            }
        }
    }

    /// Where a read of `path` (attribute names below this value) lands;
    /// `presence` when the last step is a `has` test, which reads no value.
    pub(crate) fn sight(&self, path: &[String], presence: bool) -> Sight {
        let Some((first, rest)) = path.split_first() else {
            return if presence || self.fully_seen() {
                Sight::Seen
            } else {
                Sight::Partial(self.clone())
            };
        };
        let Self::Record(record) = self else {
            // An attribute of a non-record: the validator reports it.
            return Sight::Seen;
        };
        match record.fields.iter().find(|f| &f.name == first) {
            Some(Field { shape: Ok(s), .. }) => s.sight(rest, presence),
            Some(Field {
                shape: Err(why), ..
            }) => Sight::Unseen(Unseen::Untyped(*why)),
            None if record.open => Sight::Unseen(Unseen::Undeclared),
            None => Sight::Unsendable,
        }
    }

    /// The JSON pointer (below `value`) of the first part of `value` that
    /// Cedar does not see: a property not typed by this shape.
    pub(crate) fn first_unseen(&self, value: &Value) -> Option<String> {
        let escape = |s: &str| s.replace('~', "~0").replace('/', "~1");
        match (self, value) {
            (Self::Set(item), Value::Array(values)) => values
                .iter()
                .enumerate()
                .find_map(|(i, v)| item.first_unseen(v).map(|rest| format!("/{i}{rest}"))),
            (Self::Record(record), Value::Object(map)) => map.iter().find_map(|(key, v)| {
                match record.fields.iter().find(|f| &f.name == key) {
                    Some(Field { shape: Ok(s), .. }) => s
                        .first_unseen(v)
                        .map(|rest| format!("/{}{rest}", escape(key))),
                    _ => Some(format!("/{}", escape(key))),
                }
            }),
            _ => None,
        }
    }

    /// Converts call arguments, already validated against the schema this
    /// shape came from, into the Cedar record `context.args`. Undeclared
    /// and untyped properties are dropped (the engine refuses a call whose
    /// dropped properties a policy reads before it gets here), and so are
    /// declared top-level ones outside `keep` (when given): what no policy
    /// of the tool reads is not worth converting. The error names the JSON
    /// pointer, never the value.
    pub fn to_cedar_args(
        &self,
        value: &Value,
        keep: Option<&std::collections::HashSet<String>>,
    ) -> Result<RestrictedExpression, String> {
        let result = match (self, value) {
            (Self::Record(record), Value::Object(map)) => {
                let kept = record
                    .fields
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
            let Ok(shape) = &field.shape else { continue };
            match map.get(&field.name) {
                Some(v) => {
                    let converted = shape
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
                    ConvError::new(if n.as_f64().is_some_and(|f| f.fract() != 0.0) {
                        "not a whole number: policies see numbers as 64-bit integers only"
                    } else {
                        "integer outside the range policies can evaluate (64-bit signed)"
                    })
                }),
            (Self::Set(item), Value::Array(values)) => {
                let mut out = Vec::with_capacity(values.len());
                for (i, v) in values.iter().enumerate() {
                    out.push(item.convert(v).map_err(|e| e.under(i.to_string()))?);
                }
                Ok(RestrictedExpression::new_set(out))
            }
            (Self::Record(record), Value::Object(map)) => Self::record(record.fields.iter(), map),
            (_, Value::Null) => Err(ConvError::new("null, which policies cannot see")),
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
        let Shape::Record(record) = Shape::of_args(&schema) else {
            panic!("not a record")
        };
        assert!(record.open);
        let mut names: Vec<(&str, bool)> = record
            .fields
            .iter()
            .filter(|f| f.shape.is_ok())
            .map(|f| (f.name.as_str(), f.required))
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                ("limit", false),
                ("mode", false),
                ("opts", false),
                ("ratio", false),
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

    fn field(shape: &Shape, name: &str) -> Result<Shape, Untyped> {
        let Shape::Record(record) = shape else {
            panic!("not a record")
        };
        record
            .fields
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.shape.clone())
            .unwrap()
    }

    #[test]
    fn numbers_unions_and_enums_get_one_cedar_type_or_none() {
        let shape = Shape::of_args(&json!({
            "type": "object",
            "properties": {
                "n": { "type": "number" },
                "opt": { "type": ["integer", "null"] },
                "any": { "anyOf": [{ "type": "string" }, { "type": "null" }] },
                "one": { "oneOf": [{ "type": "integer", "maximum": 1 }, { "type": "integer", "minimum": 9 }] },
                "mixed": { "anyOf": [{ "type": "integer" }, { "type": "string" }] },
                "ints": { "enum": [1, 2, 3] },
                "flag": { "const": true },
                "odd": { "enum": [1, "a"] },
                "none": {},
                "null": { "type": "null" },
                "all": { "allOf": [{ "type": "string" }] },
                "bare": { "type": "array" }
            }
        }));
        assert_eq!(field(&shape, "n"), Ok(Shape::Long));
        assert_eq!(field(&shape, "opt"), Ok(Shape::Long));
        assert_eq!(field(&shape, "any"), Ok(Shape::String));
        assert_eq!(field(&shape, "one"), Ok(Shape::Long));
        assert_eq!(field(&shape, "mixed"), Err(Untyped::MixedUnion));
        assert_eq!(field(&shape, "ints"), Ok(Shape::Long));
        assert_eq!(field(&shape, "flag"), Ok(Shape::Bool));
        assert_eq!(field(&shape, "odd"), Err(Untyped::MixedEnum));
        assert_eq!(field(&shape, "none"), Err(Untyped::NoType));
        assert_eq!(field(&shape, "null"), Err(Untyped::Null));
        assert_eq!(field(&shape, "all"), Err(Untyped::NoType));
        assert_eq!(field(&shape, "bare"), Err(Untyped::UntypedItems));
        // A whole number reaches Cedar; a fraction and null are refused.
        assert!(shape.to_cedar(&json!({ "n": 1e3 })).is_ok());
        let err = shape.to_cedar(&json!({ "n": 2.5 })).unwrap_err();
        assert!(err.starts_with("/n: not a whole number"), "{err}");
        let err = shape.to_cedar(&json!({ "opt": null })).unwrap_err();
        assert!(err.starts_with("/opt: null"), "{err}");
    }

    #[test]
    fn sight_tells_what_policies_see() {
        let shape = Shape::of_args(&json!({
            "type": "object",
            "properties": {
                "limit": { "type": "integer" },
                "mixed": { "type": ["integer", "string"] },
                "opts": { "type": "object", "properties": { "dry": { "type": "boolean" } } },
                "closed": {
                    "type": "object",
                    "properties": { "a": { "type": "string" } },
                    "additionalProperties": false
                }
            },
            "additionalProperties": false
        }));
        let at = |path: &[&str], presence| {
            let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
            shape.sight(&path, presence)
        };
        assert_eq!(at(&["limit"], false), Sight::Seen);
        assert_eq!(at(&["limit"], true), Sight::Seen);
        assert_eq!(at(&["other"], true), Sight::Unsendable);
        assert_eq!(
            at(&["mixed"], true),
            Sight::Unseen(Unseen::Untyped(Untyped::MixedUnion))
        );
        assert_eq!(at(&["opts", "dry"], false), Sight::Seen);
        assert_eq!(
            at(&["opts", "wet"], true),
            Sight::Unseen(Unseen::Undeclared)
        );
        assert_eq!(at(&["closed", "b"], true), Sight::Unsendable);
        assert_eq!(at(&["closed"], false), Sight::Seen);
        assert!(matches!(at(&["opts"], false), Sight::Partial(_)));
        assert!(matches!(at(&[], false), Sight::Partial(_)));
        let Sight::Partial(opts) = at(&["opts"], false) else {
            panic!()
        };
        assert_eq!(opts.first_unseen(&json!({ "dry": true })), None);
        assert_eq!(
            opts.first_unseen(&json!({ "dry": true, "w/x": 1 }))
                .as_deref(),
            Some("/w~1x")
        );
    }
}
