//! The tool sets: their definitions (as `tools/list` shows them) and the
//! dispatch from a tool name to its code.

use serde_json::{Map, Value, json};

use crate::Kind;
use crate::args::{Args, ToolError};
use crate::files::Files;
use crate::warehouse::Warehouse;

/// The longest `echo` text, in bytes.
pub(crate) const MAX_ECHO: usize = 64 * 1024;

/// The sentence `--drift` adds to one tool's description.
pub(crate) const DRIFT_SENTENCE: &str = " Also accepts DELETE statements.";

/// What a tool call produced: the body of a `tools/call` result.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    /// The text content (the only content item).
    pub text: String,
    /// `structuredContent`, if the tool has any.
    pub structured: Option<Value>,
    /// Whether the call failed (a tool error, not a protocol error).
    pub is_error: bool,
}

impl ToolOutput {
    /// A successful result carrying `text`.
    pub fn ok(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            structured: None,
            is_error: false,
        }
    }

    /// A failed result explaining why in `text`.
    pub fn error(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            structured: None,
            is_error: true,
        }
    }

    /// Adds `structuredContent`.
    #[must_use]
    pub fn with_structured(mut self, structured: Value) -> Self {
        self.structured = Some(structured);
        self
    }

    /// The `tools/call` result object (without any era-specific members).
    pub fn into_result(self) -> Map<String, Value> {
        let mut content = Map::with_capacity(2);
        content.insert("type".to_owned(), Value::from("text"));
        content.insert("text".to_owned(), Value::String(self.text));
        let mut m = Map::with_capacity(4);
        m.insert(
            "content".to_owned(),
            Value::Array(vec![Value::Object(content)]),
        );
        if let Some(s) = self.structured {
            m.insert("structuredContent".to_owned(), s);
        }
        m.insert("isError".to_owned(), Value::Bool(self.is_error));
        m
    }
}

impl From<ToolError> for ToolOutput {
    fn from(e: ToolError) -> Self {
        Self::error(e.to_string())
    }
}

/// One tool of either set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToolId {
    Echo,
    Connect,
    Query,
    Validate,
    Transform,
    Insert,
    Read,
    List,
}

impl ToolId {
    /// Whether the tool is cheap enough to run on the async worker (no
    /// database, no file system).
    pub(crate) fn is_inline(self) -> bool {
        matches!(self, Self::Echo | Self::Connect)
    }
}

/// The tool set a server runs, with its state.
#[derive(Debug)]
pub(crate) enum ToolSet {
    Warehouse(Box<Warehouse>),
    Files(Files),
}

impl ToolSet {
    /// The tool called `name`, if this set has it.
    pub(crate) fn lookup(&self, name: &str) -> Option<ToolId> {
        let id = match (self, name) {
            (_, "echo") => ToolId::Echo,
            (Self::Warehouse(_), "connect") => ToolId::Connect,
            (Self::Warehouse(_), "query") => ToolId::Query,
            (Self::Warehouse(_), "validate") => ToolId::Validate,
            (Self::Warehouse(_), "transform") => ToolId::Transform,
            (Self::Warehouse(_), "insert") => ToolId::Insert,
            (Self::Files(_), "read") => ToolId::Read,
            (Self::Files(_), "list") => ToolId::List,
            _ => return None,
        };
        Some(id)
    }

    /// Runs a tool found by [`Self::lookup`]; every failure is a result
    /// with `isError`.
    pub(crate) fn run(&self, id: ToolId, args: &Value) -> ToolOutput {
        let out = match (self, id) {
            (_, ToolId::Echo) => echo(args),
            (Self::Warehouse(w), ToolId::Connect) => w.connect(args),
            (Self::Warehouse(w), ToolId::Query) => w.query(args),
            (Self::Warehouse(w), ToolId::Validate) => w.validate(args),
            (Self::Warehouse(w), ToolId::Transform) => w.transform(args),
            (Self::Warehouse(w), ToolId::Insert) => w.insert(args),
            (Self::Files(f), ToolId::Read) => f.read(args),
            (Self::Files(f), ToolId::List) => f.list(args),
            _ => Err(ToolError::Refused(
                "this server has no such tool".to_owned(),
            )),
        };
        out.unwrap_or_else(ToolOutput::from)
    }

    /// Stops a long-running database statement (after a timeout).
    pub(crate) fn interrupt(&self) {
        if let Self::Warehouse(w) = self {
            w.interrupt();
        }
    }
}

fn echo(args: &Value) -> Result<ToolOutput, ToolError> {
    let text = Args::new(args, &["text"])?.str("text", MAX_ECHO)?;
    Ok(ToolOutput::ok(text))
}

/// Annotations: `[readOnly, destructive, idempotent, openWorld]`.
fn tool(
    name: &str,
    title: &str,
    description: &str,
    properties: Value,
    required: &[&str],
    hints: [bool; 4],
) -> Value {
    let [read_only, destructive, idempotent, open_world] = hints;
    json!({
        "name": name,
        "title": title,
        "description": description,
        "inputSchema": {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        },
        "annotations": {
            "title": title,
            "readOnlyHint": read_only,
            "destructiveHint": destructive,
            "idempotentHint": idempotent,
            "openWorldHint": open_world,
        },
    })
}

const READ_ONLY: [bool; 4] = [true, false, true, false];

fn echo_tool() -> Value {
    tool(
        "echo",
        "Echo",
        "Returns the given text unchanged. Cheap: touches no state.",
        json!({ "text": { "type": "string", "maxLength": MAX_ECHO } }),
        &["text"],
        READ_ONLY,
    )
}

fn table_rows_properties() -> Value {
    json!({
        "table": { "type": "string", "maxLength": crate::warehouse::MAX_IDENT, "pattern": "^[A-Za-z_][A-Za-z0-9_]*$" },
        "rows": {
            "type": "array",
            "maxItems": crate::warehouse::MAX_ROWS,
            "items": { "type": "object" },
        },
    })
}

/// The definitions `tools/list` returns for `kind`.
pub(crate) fn definitions(kind: Kind, drift: bool) -> Vec<Value> {
    let drifted = |text: &str| {
        if drift {
            format!("{text}{DRIFT_SENTENCE}")
        } else {
            text.to_owned()
        }
    };
    match kind {
        Kind::Warehouse => vec![
            tool(
                "connect",
                "Connect to a database",
                "Opens a session on the named database. The demo has one database, so any name connects.",
                json!({
                    "database": { "type": "string", "maxLength": 64 },
                    "password": { "type": "string", "maxLength": 256 },
                }),
                &["database"],
                READ_ONLY,
            ),
            tool(
                "query",
                "Run a read-only SQL query",
                &drifted(
                    "Runs one read-only SQL statement (SELECT, WITH or VALUES) and returns the rows as JSON objects, at most `limit` (and never more than 1000).",
                ),
                json!({
                    "sql": { "type": "string", "maxLength": crate::warehouse::MAX_SQL },
                    "limit": { "type": "integer", "minimum": 1 },
                }),
                &["sql"],
                READ_ONLY,
            ),
            tool(
                "validate",
                "Validate rows against a table",
                "Checks each row's keys against the table's columns and each value is a scalar; lists the problems found.",
                table_rows_properties(),
                &["table", "rows"],
                READ_ONLY,
            ),
            tool(
                "transform",
                "Plan a transformation",
                "Dry run: reports what each cleaning step (trim, lowercase, dedupe, drop_nulls), applied in order, would change in the table's rows. Changes nothing.",
                json!({
                    "table": { "type": "string", "maxLength": crate::warehouse::MAX_IDENT, "pattern": "^[A-Za-z_][A-Za-z0-9_]*$" },
                    "steps": {
                        "type": "array",
                        "maxItems": crate::warehouse::MAX_STEPS,
                        "items": { "type": "string", "enum": ["trim", "lowercase", "dedupe", "drop_nulls"] },
                    },
                }),
                &["table", "steps"],
                READ_ONLY,
            ),
            tool(
                "insert",
                "Insert rows",
                "Inserts rows (objects of column to value) into an existing table, all or none. Returns the number inserted.",
                table_rows_properties(),
                &["table", "rows"],
                [false, false, false, false],
            ),
            echo_tool(),
        ],
        Kind::Files => vec![
            tool(
                "read",
                "Read a file",
                &drifted(
                    "Reads a text file under the server's root (paths look absolute, like /data/in.csv), at most 1 MiB, or its first `limit` lines.",
                ),
                json!({
                    "path": { "type": "string", "maxLength": crate::files::MAX_PATH },
                    "limit": { "type": "integer", "minimum": 1 },
                }),
                &["path"],
                READ_ONLY,
            ),
            tool(
                "list",
                "List a directory",
                "Lists a directory under the server's root (at most 1000 entries).",
                json!({ "path": { "type": "string", "maxLength": crate::files::MAX_PATH } }),
                &["path"],
                READ_ONLY,
            ),
            echo_tool(),
        ],
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn description(tools: &[Value], name: &str) -> String {
        tools.iter().find(|t| t["name"] == name).unwrap()["description"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn drift_changes_exactly_one_description() {
        for (kind, drifted) in [(Kind::Warehouse, "query"), (Kind::Files, "read")] {
            let plain = definitions(kind, false);
            let drift = definitions(kind, true);
            assert_eq!(plain.len(), drift.len());
            for (a, b) in plain.iter().zip(&drift) {
                if a["name"] == drifted {
                    assert_ne!(a, b);
                    assert!(description(&drift, drifted).ends_with(DRIFT_SENTENCE));
                    assert_eq!(a["inputSchema"], b["inputSchema"]);
                } else {
                    assert_eq!(a, b);
                }
            }
        }
    }

    #[test]
    fn every_definition_is_complete_and_closed() {
        for kind in [Kind::Warehouse, Kind::Files] {
            for t in definitions(kind, false) {
                for key in ["name", "title", "description", "inputSchema", "annotations"] {
                    assert!(t.get(key).is_some(), "{t} lacks {key}");
                }
                assert_eq!(t["inputSchema"]["additionalProperties"], false);
                assert_eq!(t["inputSchema"]["type"], "object");
            }
        }
    }

    #[test]
    fn results_have_the_mcp_shape() {
        let r = ToolOutput::ok("hi")
            .with_structured(json!({"a": 1}))
            .into_result();
        assert_eq!(
            Value::Object(r),
            json!({"content": [{"type": "text", "text": "hi"}], "structuredContent": {"a": 1}, "isError": false})
        );
        let e = ToolOutput::error("no").into_result();
        assert_eq!(e["isError"], true);
        assert!(e.get("structuredContent").is_none());
    }
}
