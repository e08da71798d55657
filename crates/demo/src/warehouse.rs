//! The `warehouse` tool set: a small SQLite database.
//!
//! Two connections share one database: a writer (seeding and `insert`)
//! and a reader opened read-only with `PRAGMA query_only = ON` (every
//! other tool), so `query` cannot write whatever SQL it is given. A single
//! mutex serialises them: the demo's statements are short, and it keeps
//! SQLite's own locking out of the way. Without `--db` the database lives
//! in memory (one named, shared-cache database per server).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::limits::Limit;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, InterruptHandle, OpenFlags};
use serde_json::{Map, Number, Value, json};

use crate::args::{Args, ToolError, quote};
use crate::tools::ToolOutput;

/// Longest SQL text `query` accepts, in bytes.
pub(crate) const MAX_SQL: usize = 4096;
/// Most rows `query` returns, `validate` checks and `insert` writes.
pub(crate) const MAX_ROWS: usize = 1000;
/// Longest table or column name, in bytes.
pub(crate) const MAX_IDENT: usize = 64;
/// Most steps `transform` takes.
pub(crate) const MAX_STEPS: usize = 32;
/// Most rows `transform` reads.
const MAX_SCAN: usize = 10_000;
/// Most problems `validate` lists.
const MAX_PROBLEMS: usize = 100;
/// Largest text or blob SQLite may build on the reader, in bytes.
const MAX_VALUE: i32 = 1 << 20;
/// Roughly the most bytes of cell data one `query` result carries.
const MAX_RESULT_BYTES: usize = 4 << 20;

/// Tells one server's in-memory database from another's in this process.
static MEMORY_DBS: AtomicU64 = AtomicU64::new(0);

struct Db {
    writer: Connection,
    reader: Connection,
}

/// The warehouse: the database and the tools over it.
pub(crate) struct Warehouse {
    db: Mutex<Db>,
    interrupt: InterruptHandle,
}

impl std::fmt::Debug for Warehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warehouse").finish_non_exhaustive()
    }
}

impl Warehouse {
    /// Opens `path` (creating and seeding the demo tables if absent), or a
    /// fresh seeded in-memory database.
    pub(crate) fn open(path: Option<&Path>) -> rusqlite::Result<Self> {
        let (writer, reader) = match path {
            Some(path) => {
                let writer = Connection::open(path)?;
                seed(&writer)?;
                let reader = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                (writer, reader)
            }
            None => {
                let uri = format!(
                    "file:portcullis-demo-{}-{}?mode=memory&cache=shared",
                    std::process::id(),
                    MEMORY_DBS.fetch_add(1, Ordering::Relaxed)
                );
                let flags = OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let writer = Connection::open_with_flags(
                    &uri,
                    flags | OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
                )?;
                seed(&writer)?;
                let reader =
                    Connection::open_with_flags(&uri, flags | OpenFlags::SQLITE_OPEN_READ_ONLY)?;
                (writer, reader)
            }
        };
        reader.pragma_update(None, "query_only", true)?;
        reader.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE)?;
        reader.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        let interrupt = reader.get_interrupt_handle();
        Ok(Self {
            db: Mutex::new(Db { writer, reader }),
            interrupt,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock leaves SQLite consistent (each
        // write is one transaction), so a poisoned lock is still usable.
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the statement running on the reader, if any.
    pub(crate) fn interrupt(&self) {
        self.interrupt.interrupt();
    }

    /// `connect {database, password?}`: the demo has one database.
    pub(crate) fn connect(&self, args: &Value) -> Result<ToolOutput, ToolError> {
        let a = Args::new(args, &["database", "password"])?;
        let database = a.str("database", 64)?;
        a.opt_str("password", 256)?;
        Ok(ToolOutput::ok(format!("connected to {database}"))
            .with_structured(json!({ "database": database, "connected": true })))
    }

    /// `query {sql, limit?}`: one read-only statement on the reader.
    pub(crate) fn query(&self, args: &Value) -> Result<ToolOutput, ToolError> {
        let a = Args::new(args, &["sql", "limit"])?;
        let sql = a.str("sql", MAX_SQL)?;
        let limit = a
            .opt_positive("limit")?
            .map_or(MAX_ROWS, |l| usize::try_from(l).unwrap_or(MAX_ROWS))
            .min(MAX_ROWS);
        let keyword = first_keyword(sql).to_ascii_uppercase();
        if !matches!(keyword.as_str(), "SELECT" | "WITH" | "VALUES") {
            return Err(ToolError::Refused(format!(
                "query runs read-only SQL only (SELECT, WITH or VALUES), not {:?}; use insert to write",
                quote(&keyword)
            )));
        }
        let db = self.lock();
        let mut stmt = db.reader.prepare(sql).map_err(|e| match e {
            rusqlite::Error::MultipleStatement => {
                ToolError::Refused("query runs exactly one SQL statement".to_owned())
            }
            other => ToolError::Sql(other),
        })?;
        if !stmt.readonly() {
            return Err(ToolError::Refused(
                "query is read-only: this statement would write".to_owned(),
            ));
        }
        let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut truncated = false;
        while let Some(row) = rows.next()? {
            if out.len() >= limit || bytes > MAX_RESULT_BYTES {
                truncated = true;
                break;
            }
            let mut obj = Map::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let cell = row.get_ref(i)?;
                bytes = bytes.saturating_add(cell_size(cell));
                obj.insert(name.clone(), to_json(cell));
            }
            out.push(Value::Object(obj));
        }
        let row_count = out.len();
        let rows = Value::Array(out);
        Ok(ToolOutput::ok(rows.to_string()).with_structured(json!({
            "rows": rows,
            "row_count": row_count,
            "truncated": truncated,
        })))
    }

    /// The columns of a user table, in order; an error if there is none.
    fn columns(conn: &Connection, table: &str) -> Result<Vec<String>, ToolError> {
        check_ident(table)?;
        let mut stmt = conn.prepare_cached(
            "SELECT name FROM pragma_table_info(?1) WHERE EXISTS \
             (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
        )?;
        let columns = stmt
            .query_map([table], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        if columns.is_empty() {
            return Err(ToolError::Refused(format!("no such table: {table}")));
        }
        Ok(columns)
    }

    /// `validate {table, rows}`: lists the problems, changes nothing.
    pub(crate) fn validate(&self, args: &Value) -> Result<ToolOutput, ToolError> {
        let a = Args::new(args, &["table", "rows"])?;
        let table = a.str("table", MAX_IDENT)?;
        let rows = a.array("rows", MAX_ROWS)?;
        let columns = Self::columns(&self.lock().reader, table)?;
        let mut problems = Vec::new();
        let mut total = 0usize;
        let mut note = |p: String| {
            total += 1;
            if problems.len() < MAX_PROBLEMS {
                problems.push(Value::String(p));
            }
        };
        for (i, row) in rows.iter().enumerate() {
            let Value::Object(row) = row else {
                note(format!("row {i}: not an object"));
                continue;
            };
            for (key, value) in row {
                if !columns.iter().any(|c| c == key) {
                    note(format!("row {i}: unknown column {:?}", quote(key)));
                } else if value.is_object() || value.is_array() {
                    note(format!("row {i}: column {key}: value must be a scalar"));
                }
            }
        }
        let valid = total == 0;
        let text = if valid {
            format!("all {} rows fit {table}", rows.len())
        } else {
            let mut t = format!("{total} problems in {} rows for {table}:", rows.len());
            for p in problems.iter().filter_map(Value::as_str) {
                t.push_str("\n- ");
                t.push_str(p);
            }
            t
        };
        Ok(ToolOutput::ok(text).with_structured(json!({
            "valid": valid,
            "table": table,
            "columns": columns,
            "rows_checked": rows.len(),
            "problem_count": total,
            "problems": problems,
        })))
    }

    /// `transform {table, steps}`: a dry run of the cleaning steps over the
    /// table's rows.
    pub(crate) fn transform(&self, args: &Value) -> Result<ToolOutput, ToolError> {
        let a = Args::new(args, &["table", "steps"])?;
        let table = a.str("table", MAX_IDENT)?;
        let steps = a
            .array("steps", MAX_STEPS)?
            .iter()
            .map(|s| match s.as_str() {
                Some(s @ ("trim" | "lowercase" | "dedupe" | "drop_nulls")) => Ok(s),
                _ => Err(ToolError::Invalid {
                    key: "steps",
                    expected: "a list of trim, lowercase, dedupe or drop_nulls",
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (mut rows, scanned_all) = {
            let db = self.lock();
            let columns = Self::columns(&db.reader, table)?;
            let sql = format!(
                "SELECT {} FROM {} LIMIT {}",
                columns
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                quote_ident(table),
                MAX_SCAN + 1
            );
            let mut stmt = db.reader.prepare(&sql)?;
            let mut rows = stmt
                .query_map([], |r| {
                    (0..columns.len())
                        .map(|i| r.get::<_, SqlValue>(i))
                        .collect::<Result<Vec<_>, _>>()
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let all = rows.len() <= MAX_SCAN;
            rows.truncate(MAX_SCAN);
            (rows, all)
        };
        let before = rows.len();
        let mut report = Vec::with_capacity(steps.len());
        let mut text = format!("dry run on {table} ({before} rows");
        if !scanned_all {
            text.push_str(", the first ones only");
        }
        text.push_str("):");
        for step in steps {
            let affected = apply(step, &mut rows);
            let what = match step {
                "trim" | "lowercase" => "values would change",
                _ => "rows would be dropped",
            };
            text.push_str(&format!("\n- {step}: {affected} {what}"));
            report.push(json!({ "step": step, "affected": affected }));
        }
        text.push_str(&format!("\n{} rows would remain", rows.len()));
        Ok(ToolOutput::ok(text).with_structured(json!({
            "table": table,
            "dry_run": true,
            "rows_before": before,
            "rows_after": rows.len(),
            "complete_scan": scanned_all,
            "steps": report,
        })))
    }

    /// `insert {table, rows}`: all rows in one transaction, or none.
    pub(crate) fn insert(&self, args: &Value) -> Result<ToolOutput, ToolError> {
        let a = Args::new(args, &["table", "rows"])?;
        let table = a.str("table", MAX_IDENT)?;
        let rows = a.array("rows", MAX_ROWS)?;
        let mut db = self.lock();
        let columns = Self::columns(&db.writer, table)?;
        let mut planned = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let Value::Object(row) = row else {
                return Err(ToolError::Refused(format!("row {i}: not an object")));
            };
            let mut names = Vec::with_capacity(row.len());
            let mut values = Vec::with_capacity(row.len());
            for (key, value) in row {
                let Some(column) = columns.iter().find(|c| *c == key) else {
                    return Err(ToolError::Refused(format!(
                        "row {i}: unknown column {:?} in {table}",
                        quote(key)
                    )));
                };
                let Some(value) = to_sql(value) else {
                    return Err(ToolError::Refused(format!(
                        "row {i}: column {column}: value must be a scalar"
                    )));
                };
                names.push(quote_ident(column));
                values.push(value);
            }
            let sql = if names.is_empty() {
                format!("INSERT INTO {} DEFAULT VALUES", quote_ident(table))
            } else {
                let marks: Vec<String> = (1..=names.len()).map(|n| format!("?{n}")).collect();
                format!(
                    "INSERT INTO {} ({}) VALUES ({})",
                    quote_ident(table),
                    names.join(", "),
                    marks.join(", ")
                )
            };
            planned.push((sql, values));
        }
        let tx = db.writer.transaction()?;
        for (sql, values) in &planned {
            tx.prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(values.iter()))?;
        }
        tx.commit()?;
        let inserted = planned.len();
        Ok(
            ToolOutput::ok(format!("inserted {inserted} rows into {table}"))
                .with_structured(json!({ "inserted": inserted, "table": table })),
        )
    }
}

/// Applies one cleaning step to the rows in memory; returns how many
/// values (trim, lowercase) or rows (dedupe, drop_nulls) it touched.
fn apply(step: &str, rows: &mut Vec<Vec<SqlValue>>) -> usize {
    let mut text_step = |f: fn(&str) -> String| {
        let mut n = 0;
        for cell in rows.iter_mut().flatten() {
            if let SqlValue::Text(s) = cell {
                let new = f(s);
                if new != *s {
                    *s = new;
                    n += 1;
                }
            }
        }
        n
    };
    match step {
        "trim" => text_step(|s| s.trim().to_owned()),
        "lowercase" => text_step(str::to_lowercase),
        "dedupe" => {
            let before = rows.len();
            let mut seen = HashSet::with_capacity(before);
            rows.retain(|r| seen.insert(format!("{r:?}")));
            before - rows.len()
        }
        "drop_nulls" => {
            let before = rows.len();
            rows.retain(|r| !r.iter().any(|c| matches!(c, SqlValue::Null)));
            before - rows.len()
        }
        _ => 0,
    }
}

/// The first word of a SQL text, after blanks and comments.
fn first_keyword(sql: &str) -> &str {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, after)| after);
        } else {
            break;
        }
    }
    let end = rest
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    rest.get(..end).unwrap_or("")
}

/// A table or column name the demo accepts: `[A-Za-z_][A-Za-z0-9_]*`,
/// not SQLite's own.
fn check_ident(name: &str) -> Result<(), ToolError> {
    let mut chars = name.chars();
    let ok = name.len() <= MAX_IDENT
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.to_ascii_lowercase().starts_with("sqlite_");
    if ok {
        Ok(())
    } else {
        Err(ToolError::Refused(format!(
            "{:?} is not a table name this server accepts",
            quote(name)
        )))
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn to_json(cell: ValueRef<'_>) -> Value {
    match cell {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        ValueRef::Real(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => {
            let mut hex = String::with_capacity(2 + b.len() * 2);
            hex.push_str("0x");
            for byte in b {
                hex.push_str(&format!("{byte:02x}"));
            }
            Value::String(hex)
        }
    }
}

fn cell_size(cell: ValueRef<'_>) -> usize {
    match cell {
        ValueRef::Text(b) | ValueRef::Blob(b) => b.len().saturating_mul(2),
        _ => 8,
    }
}

fn to_sql(v: &Value) -> Option<SqlValue> {
    Some(match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64()?),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Array(_) | Value::Object(_) => return None,
    })
}

const FIRST: [&str; 20] = [
    "Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kemi", "Luca", "Maya", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara",
];
const LAST: [&str; 20] = [
    "Martin", "Silva", "Dubois", "Petrov", "Rossi", "Haddad", "Kim", "Tanaka", "Garcia", "Berg",
    "Adeyemi", "Bianchi", "Cohen", "Rao", "Ivanova", "Santos", "Walsh", "Lopez", "Larsen", "Singh",
];
const REGIONS: [&str; 3] = ["emea", "amer", "apac"];
const STATUSES: [&str; 3] = ["paid", "shipped", "refunded"];

/// Creates the demo tables if absent, and seeds `customers` and `orders`
/// when they are empty.
fn seed(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS customers (
             id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT, region TEXT);
         CREATE TABLE IF NOT EXISTS staging_customers (
             id INTEGER, name TEXT, email TEXT, region TEXT);
         CREATE TABLE IF NOT EXISTS orders (
             id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
             amount_cents INTEGER NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL);",
    )?;
    let empty: bool = conn.query_row("SELECT NOT EXISTS (SELECT 1 FROM customers)", [], |r| {
        r.get(0)
    })?;
    if !empty {
        return Ok(());
    }
    let tx = conn.unchecked_transaction()?;
    {
        let mut customer =
            tx.prepare("INSERT INTO customers (id, name, email, region) VALUES (?1, ?2, ?3, ?4)")?;
        let mut order = tx.prepare(
            "INSERT INTO orders (customer_id, amount_cents, status, created_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (i, (first, last)) in FIRST.iter().zip(LAST).enumerate() {
            let id = i64::try_from(i).unwrap_or(0) + 1;
            let email = format!(
                "{}.{}@example.com",
                first.to_lowercase(),
                last.to_lowercase()
            );
            let region = REGIONS.get(i % REGIONS.len()).copied().unwrap_or("emea");
            customer.execute(rusqlite::params![
                id,
                format!("{first} {last}"),
                email,
                region
            ])?;
            for k in 0..(i % 3 + 1) {
                let amount = 1_000 + (id * 737 + i64::try_from(k).unwrap_or(0) * 311) % 9_000;
                let status = STATUSES
                    .get((i + k) % STATUSES.len())
                    .copied()
                    .unwrap_or("paid");
                let day = (i * 3 + k) % 28 + 1;
                order.execute(rusqlite::params![
                    id,
                    amount,
                    status,
                    format!("2026-01-{day:02}")
                ])?;
            }
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn wh() -> Warehouse {
        Warehouse::open(None).unwrap()
    }

    fn count(w: &Warehouse, table: &str) -> i64 {
        let out = w
            .query(&json!({ "sql": format!("SELECT count(*) AS n FROM {table}") }))
            .unwrap();
        out.structured.unwrap()["rows"][0]["n"].as_i64().unwrap()
    }

    #[test]
    fn seeded_and_queryable() {
        let w = wh();
        assert_eq!(count(&w, "customers"), 20);
        assert_eq!(count(&w, "staging_customers"), 0);
        assert!(count(&w, "orders") > 20);
        let out = w
            .query(&json!({ "sql": "SELECT id, name FROM customers ORDER BY id", "limit": 3 }))
            .unwrap();
        assert!(!out.is_error);
        let s = out.structured.unwrap();
        assert_eq!(s["row_count"], 3);
        assert_eq!(s["truncated"], true);
        assert_eq!(s["rows"][0], json!({"id": 1, "name": "Alice Martin"}));
        let text: Value = serde_json::from_str(&out.text).unwrap();
        assert_eq!(text, s["rows"]);
    }

    #[test]
    fn query_is_read_only() {
        let w = wh();
        for sql in [
            "INSERT INTO customers (name) VALUES ('x')",
            "DELETE FROM customers",
            "  -- sneaky\n  /* c */ DROP TABLE customers",
            "WITH x AS (SELECT 1) DELETE FROM customers",
            "SELECT 1; DELETE FROM customers",
            "PRAGMA query_only = OFF",
            "ATTACH DATABASE '/tmp/x.db' AS x",
        ] {
            let err = w.query(&json!({ "sql": sql })).unwrap_err();
            assert!(
                matches!(err, ToolError::Refused(_) | ToolError::Sql(_)),
                "{sql}: {err}"
            );
        }
        assert_eq!(count(&w, "customers"), 20);
        // The reader itself refuses writes, whatever gets past the checks.
        let db = w.lock();
        assert!(db.reader.execute("DELETE FROM customers", []).is_err());
        assert!(
            db.reader
                .execute("INSERT INTO staging_customers (id) VALUES (1)", [])
                .is_err()
        );
        drop(db);
        assert_eq!(count(&w, "customers"), 20);
        // A bad statement is an error, a huge value is refused by the limit.
        assert!(
            w.query(&json!({ "sql": "SELECT nope FROM customers" }))
                .is_err()
        );
        assert!(
            w.query(&json!({ "sql": "SELECT zeroblob(100000000)" }))
                .is_err()
        );
    }

    #[test]
    fn a_runaway_query_can_be_interrupted() {
        let w = std::sync::Arc::new(wh());
        let stopper = std::sync::Arc::clone(&w);
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            stopper.interrupt();
        });
        let err = w
            .query(&json!({
                "sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
            }))
            .unwrap_err();
        assert!(err.to_string().contains("interrupt"), "{err}");
        t.join().unwrap();
        // The connection is usable again.
        assert_eq!(count(&w, "customers"), 20);
    }

    #[test]
    fn limit_is_capped_at_1000() {
        let w = wh();
        let out = w
            .query(&json!({
                "sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5000) SELECT x FROM c",
                "limit": 100000
            }))
            .unwrap();
        assert_eq!(out.structured.unwrap()["row_count"], 1000);
    }

    #[test]
    fn insert_validate_and_transform() {
        let w = wh();
        let rows = json!([
            {"id": 1, "name": "  Ada ", "email": "ADA@EXAMPLE.COM", "region": "emea"},
            {"id": 1, "name": "  Ada ", "email": "ADA@EXAMPLE.COM", "region": "emea"},
            {"id": 2, "name": "Bob", "email": null, "region": "amer"},
        ]);
        let v = w
            .validate(&json!({"table": "staging_customers", "rows": rows}))
            .unwrap();
        assert_eq!(v.structured.unwrap()["valid"], true);
        let v = w
            .validate(
                &json!({"table": "staging_customers", "rows": [{"nope": 1}, {"name": [1]}, 3]}),
            )
            .unwrap();
        assert!(!v.is_error);
        let s = v.structured.unwrap();
        assert_eq!(s["valid"], false);
        assert_eq!(s["problem_count"], 3);

        let out = w
            .insert(&json!({"table": "staging_customers", "rows": rows}))
            .unwrap();
        assert_eq!(out.structured.unwrap()["inserted"], 3);
        assert_eq!(count(&w, "staging_customers"), 3);

        // All or nothing: one bad row inserts none.
        assert!(
            w.insert(&json!({"table": "staging_customers", "rows": [{"id": 9}, {"bad": 1}]}))
                .is_err()
        );
        assert!(w.insert(&json!({"table": "nope", "rows": []})).is_err());
        assert!(
            w.insert(&json!({"table": "customers\"; DROP TABLE customers; --", "rows": []}))
                .is_err()
        );
        assert!(
            w.insert(&json!({"table": "sqlite_schema", "rows": []}))
                .is_err()
        );
        assert_eq!(count(&w, "staging_customers"), 3);

        let t = w
            .transform(&json!({"table": "staging_customers", "steps": ["trim", "lowercase", "dedupe", "drop_nulls"]}))
            .unwrap();
        let s = t.structured.unwrap();
        assert_eq!(s["rows_before"], 3);
        assert_eq!(s["steps"][0]["affected"], 2);
        assert_eq!(s["steps"][1]["affected"], 5);
        assert_eq!(s["steps"][2]["affected"], 1);
        assert_eq!(s["steps"][3]["affected"], 1);
        assert_eq!(s["rows_after"], 1);
        // A dry run: nothing changed.
        assert_eq!(count(&w, "staging_customers"), 3);
        assert!(
            w.transform(&json!({"table": "staging_customers", "steps": ["explode"]}))
                .is_err()
        );
    }

    #[test]
    fn a_database_file_is_seeded_once_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        {
            let w = Warehouse::open(Some(&path)).unwrap();
            w.insert(&json!({"table": "staging_customers", "rows": [{"id": 1}]}))
                .unwrap();
        }
        let w = Warehouse::open(Some(&path)).unwrap();
        assert_eq!(count(&w, "customers"), 20);
        assert_eq!(count(&w, "staging_customers"), 1);
        assert!(w.query(&json!({"sql": "DELETE FROM customers"})).is_err());
    }

    #[test]
    fn keywords_skip_comments() {
        assert_eq!(first_keyword("  -- c\n /* d */select 1"), "select");
        assert_eq!(first_keyword("/* unterminated"), "");
        assert_eq!(first_keyword("WITH(x)"), "WITH");
    }
}
