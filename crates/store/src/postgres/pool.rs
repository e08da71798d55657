//! A small connection pool: at most `size` connections, each with its own
//! cache of prepared statements. A connection goes back to the pool only
//! when the operation that borrowed it finished cleanly (see
//! [`Pooled::done`]); one abandoned mid-operation (a timeout, a dropped
//! future) is closed, so it never carries a half-finished transaction to
//! the next caller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, Config, Statement};

use super::TlsConnector;

use super::{describe, unavailable};
use crate::{Result, StoreError};

/// One pooled connection and its prepared statements.
pub(super) struct Conn {
    pub(super) client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("closed", &self.client.is_closed())
            .field("statements", &self.statements.len())
            .finish()
    }
}

impl Conn {
    /// The prepared form of `sql` on this connection (prepared once, then
    /// cached: one round trip saved per later use).
    pub(super) async fn statement(
        &mut self,
        sql: &'static str,
    ) -> std::result::Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// What every new connection must satisfy, checked right after connecting.
#[derive(Debug, Clone)]
pub(super) struct Checks {
    /// The schema `search_path` must resolve to (its name, for the error).
    pub(super) schema: Option<String>,
}

/// The pool.
pub(super) struct Pool {
    config: Config,
    tls: TlsConnector,
    checks: Checks,
    idle: Mutex<Vec<Conn>>,
    // INVARIANT: at most `size` permits, so at most `size` connections are
    // lent out; `idle` holds at most that many.
    permits: Arc<Semaphore>,
    acquire_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the config: it holds the password.
        f.debug_struct("Pool")
            .field("available", &self.permits.available_permits())
            .field("acquire_timeout", &self.acquire_timeout)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of at most `size` (at least 1) connections made with
    /// `config`. Connects lazily.
    pub(super) fn new(
        config: Config,
        tls: TlsConnector,
        checks: Checks,
        size: usize,
        acquire_timeout: Duration,
    ) -> Self {
        Self {
            config,
            tls,
            checks,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size.max(1))),
            acquire_timeout,
        }
    }

    /// A connection: an idle one that is still open, or a new one. Waits at
    /// most the acquire timeout for a free slot.
    pub(super) async fn get(&self) -> Result<Pooled<'_>> {
        let permit = tokio::time::timeout(
            self.acquire_timeout,
            Arc::clone(&self.permits).acquire_owned(),
        )
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "no PostgreSQL connection free within {:?}",
                self.acquire_timeout
            ))
        })?
        .map_err(|_| StoreError::Unavailable("store closed".into()))?;
        let reused = loop {
            let conn = self
                .idle
                .lock()
                .map_err(|_| StoreError::Unavailable("connection pool poisoned".into()))?
                .pop();
            match conn {
                Some(conn) if conn.client.is_closed() => {}
                other => break other,
            }
        };
        let conn = match reused {
            Some(conn) => conn,
            None => connect(&self.config, &self.tls, &self.checks).await?,
        };
        Ok(Pooled {
            pool: self,
            conn: Some(conn),
            reusable: false,
            _permit: permit,
        })
    }

    /// Refuses every later `get` and closes the idle connections.
    pub(super) fn close(&self) {
        self.permits.close();
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

/// A borrowed connection. Dropped without [`done`](Self::done), it is
/// closed rather than returned.
pub(super) struct Pooled<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
    reusable: bool,
    _permit: OwnedSemaphorePermit,
}

impl Pooled<'_> {
    /// The connection. `None` never happens before drop.
    pub(super) fn conn(&mut self) -> Result<&mut Conn> {
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("connection already returned".into()))
    }

    /// The operation finished cleanly (no transaction left open): the
    /// connection may serve the next caller.
    pub(super) fn done(&mut self) {
        self.reusable = true;
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if !self.reusable || conn.client.is_closed() || self.pool.permits.is_closed() {
            return;
        }
        // A poisoned pool drops the connection; the next `get` reports it.
        if let Ok(mut idle) = self.pool.idle.lock() {
            idle.push(conn);
        }
    }
}

/// Opens one connection, drives it on a tokio task, and checks what every
/// connection must satisfy: a UTF-8 database (text is stored as given, and
/// `COLLATE "C"` then orders it by bytes like Rust does), the configured
/// schema present, durable commits.
pub(super) async fn connect(config: &Config, tls: &TlsConnector, checks: &Checks) -> Result<Conn> {
    let (client, connection) = config
        .connect(tls.make())
        .await
        .map_err(|e| unavailable("connect to PostgreSQL", &e))?;
    // The task ends when the connection closes (the client dropped, or an
    // error); `client.is_closed()` then reports it.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let row = client
        .query_one(
            "SELECT current_setting('server_encoding'), current_setting('synchronous_commit'), \
             current_schema()",
            &[],
        )
        .await
        .map_err(|e| unavailable("check the PostgreSQL session", &e))?;
    let read = |idx: usize| -> Result<Option<String>> {
        row.try_get::<_, Option<String>>(idx).map_err(|e| {
            StoreError::Unavailable(format!("check the PostgreSQL session: {}", describe(&e)))
        })
    };
    let encoding = read(0)?.unwrap_or_default();
    if !encoding.eq_ignore_ascii_case("UTF8") {
        return Err(StoreError::Unavailable(format!(
            "the PostgreSQL database encoding is {encoding}, UTF8 is required"
        )));
    }
    if read(2)?.is_none() {
        return Err(StoreError::Unavailable(match &checks.schema {
            Some(schema) => format!("the PostgreSQL schema {schema:?} does not exist"),
            None => "no PostgreSQL schema on the search_path exists".to_owned(),
        }));
    }
    // An acknowledged commit must survive a server crash: never accept
    // `synchronous_commit = off` (`local`, `on`, `remote_write` and
    // `remote_apply` all flush the local WAL first).
    if read(1)?.as_deref() == Some("off") {
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .map_err(|e| unavailable("set synchronous_commit", &e))?;
    }
    Ok(Conn {
        client,
        statements: HashMap::new(),
    })
}
