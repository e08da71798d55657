//! The read side: a small pool of read-only connections, each query run on
//! tokio's blocking pool so it never stalls an async worker.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use super::sql_error;
use crate::{Result, StoreError};

/// Read-only connections to one database file.
#[derive(Debug)]
pub struct ReadPool {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    // INVARIANT: at most `size` permits, so at most `size` connections are
    // in use; `idle` may be short after a lost connection and is refilled on
    // demand.
    permits: Arc<Semaphore>,
}

impl ReadPool {
    /// Opens `size` (at least 1) read-only connections now, so a bad path
    /// fails at open rather than at the first request.
    pub fn open(path: PathBuf, size: usize, busy_timeout: Duration) -> Result<Self> {
        let size = size.max(1);
        let mut idle = Vec::with_capacity(size);
        for _ in 0..size {
            idle.push(open_reader(&path, busy_timeout)?);
        }
        Ok(Self {
            path,
            busy_timeout,
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(size)),
        })
    }

    /// Runs `query` on a pooled connection on the blocking pool.
    pub async fn run<T, F>(self: &Arc<Self>, query: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| StoreError::Unavailable(format!("no tokio runtime: {e}")))?;
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("store closed".into()))?;
        let pool = Arc::clone(self);
        runtime
            .spawn_blocking(move || {
                let _permit = permit;
                let conn = pool.take()?;
                let result = query(&conn);
                pool.give_back(conn);
                result
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("read failed: {e}")))?
    }

    /// Refuses every later read and closes the idle connections.
    pub fn close(&self) {
        self.permits.close();
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    fn take(&self) -> Result<Connection> {
        let pooled = self
            .idle
            .lock()
            .map_err(|_| StoreError::Unavailable("read pool poisoned".into()))?
            .pop();
        match pooled {
            Some(conn) => Ok(conn),
            None => open_reader(&self.path, self.busy_timeout),
        }
    }

    fn give_back(&self, conn: Connection) {
        if self.permits.is_closed() {
            return;
        }
        // A poisoned pool drops the connection; the next `take` reports it.
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
    }
}

fn open_reader(path: &std::path::Path, busy_timeout: Duration) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sql_error(&format!("open {} read-only", path.display()), &e))?;
    conn.busy_timeout(busy_timeout)
        .map_err(|e| sql_error("set busy timeout", &e))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}
