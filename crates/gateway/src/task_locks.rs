//! One lock per task, for the calls of that task in flight in this process.
//!
//! Calls of one task are decided one at a time here, so they do not spin on
//! the ledger's compare-and-swap (which still decides races with other
//! replicas). The lock is held while the decision's ledger commit runs, so
//! it must never be shared between tasks: with a fixed set of stripes, a
//! task that floods itself would hold up every task hashed to its stripe,
//! past their ledger deadline. Here each task has its own lock, made on
//! first use and dropped with the last caller that holds or awaits it, so
//! the table holds only tasks with calls in flight (bounded by the
//! connection limit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// The per-task locks of one gateway.
#[derive(Debug, Default)]
pub(crate) struct TaskLocks {
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

/// Holds one task's lock; dropping it releases the lock, and forgets the
/// lock when nobody else holds or awaits it.
#[derive(Debug)]
pub(crate) struct TaskGuard<'a> {
    locks: &'a TaskLocks,
    task_id: String,
    lock: Arc<AsyncMutex<()>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl TaskLocks {
    /// Waits for `task_id`'s lock. Other tasks never wait for it.
    pub(crate) async fn lock(&self, task_id: &str) -> TaskGuard<'_> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(locks.entry(task_id.to_owned()).or_default())
        };
        // The guard exists before the wait: a caller that gives up waiting
        // (its deadline passed) still cleans up after itself on drop.
        let mut guard = TaskGuard {
            locks: self,
            task_id: task_id.to_owned(),
            lock,
            held: None,
        };
        guard.held = Some(Arc::clone(&guard.lock).lock_owned().await);
        guard
    }

    /// Tasks with a lock right now (held or awaited).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for TaskGuard<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut locks = self
            .locks
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Two references left — the table's and ours — mean nobody else
        // holds or awaits this task's lock.
        let unused = locks
            .get(&self.task_id)
            .is_some_and(|l| Arc::ptr_eq(l, &self.lock) && Arc::strong_count(&self.lock) == 2);
        if unused {
            locks.remove(&self.task_id);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Regression: the per-task locks were 64 stripes chosen by a hash of
    /// the task id and held across the ledger commit, so a task flooding
    /// itself held up every task of its stripe, past their deadline. With
    /// one task's lock held, every other task's lock is free.
    #[tokio::test]
    async fn a_busy_task_never_holds_up_another() {
        let locks = TaskLocks::default();
        let busy = locks.lock("task_busy").await;
        for i in 0..500 {
            let other = format!("task_{i}");
            let got = tokio::time::timeout(Duration::from_millis(200), locks.lock(&other)).await;
            assert!(got.is_ok(), "{other} waited for task_busy's lock");
        }
        // The same task does wait.
        let again = tokio::time::timeout(Duration::from_millis(50), locks.lock("task_busy")).await;
        assert!(again.is_err());
        drop(busy);
        assert_eq!(locks.len(), 0, "every lock is forgotten once unused");
    }

    #[tokio::test]
    async fn calls_of_one_task_take_turns_and_the_table_empties() {
        let locks = Arc::new(TaskLocks::default());
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..16 {
            let (locks, inside) = (Arc::clone(&locks), Arc::clone(&inside));
            handles.push(tokio::spawn(async move {
                let _g = locks.lock("task_a").await;
                let n = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                assert_eq!(n, 0, "two calls of one task inside at once");
                tokio::task::yield_now().await;
                inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(locks.len(), 0);
    }
}
