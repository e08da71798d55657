//! One lock per task, for the calls of that task in flight in this process,
//! and under it the task as this process's queued ledger commits will leave
//! it.
//!
//! Calls of one task are decided one at a time here, so they do not spin on
//! the ledger's compare-and-swap (which still decides races with other
//! replicas). With a ledger that has a writer queue (SQLite,
//! [`portcullis_store::Store::writer_queue`]), a call holds the lock only
//! while it is decided and its records are queued: the next call is
//! planned on the state the queued commit will produce ([`Slot::planned`]),
//! chained to it ([`portcullis_store::Store::enqueue_after`]) so that the
//! writer refuses it if that commit fails, and each call waits for its own
//! commit with the lock released. A call whose commit failed poisons the
//! slot ([`TaskPin::poison`]): the next holder waits for the queue to drain
//! and reads the task afresh. Without a writer queue (PostgreSQL) the lock
//! is held through the commit and nothing is cached: other replicas change
//! the task too.
//!
//! The lock must never be shared between tasks: with a fixed set of
//! stripes, a task that floods itself would hold up every task hashed to
//! its stripe, past their ledger deadline. Here each task has its own
//! entry, made on first use and dropped with the last caller that holds or
//! awaits its lock or waits for a commit it queued, so the table holds only
//! tasks with calls in flight (bounded by the connection limit), and a
//! task's cached state never outlives its last call in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use portcullis_store::{TaskRecord, Ticket};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// The per-task locks of one gateway.
#[derive(Debug, Default)]
pub(crate) struct TaskLocks {
    /// Each task's entry, with how many callers use it.
    locks: Mutex<HashMap<String, (Arc<Entry>, usize)>>,
}

#[derive(Debug, Default)]
struct Entry {
    slot: Arc<AsyncMutex<Slot>>,
    /// A commit queued from this slot failed: what is planned on it is
    /// refused by the writer, and the cached state must go.
    poisoned: AtomicBool,
}

/// What the holder of a task's lock may use.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// The task as the ledger holds it once every commit queued for it by
    /// this process is applied, and the last such commit if one may still
    /// be in the writer's queue; `None`: read it from the ledger.
    pub planned: Option<(TaskRecord, Option<Ticket>)>,
}

/// Keeps a task's entry (and so its cached state) in the table while a
/// commit queued under its lock is awaited; dropping the last user forgets
/// the entry.
#[derive(Debug)]
pub(crate) struct TaskPin<'a> {
    locks: &'a TaskLocks,
    task_id: String,
    entry: Arc<Entry>,
}

/// Holds one task's lock; dropping it releases the lock, and forgets the
/// entry when nobody else uses it.
#[derive(Debug)]
pub(crate) struct TaskGuard<'a> {
    // Field order matters: the lock is released before the pin goes.
    held: OwnedMutexGuard<Slot>,
    pin: TaskPin<'a>,
}

impl TaskLocks {
    /// Waits for `task_id`'s lock. Other tasks never wait for it.
    pub(crate) async fn lock(&self, task_id: &str) -> TaskGuard<'_> {
        let entry = {
            let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            let (entry, users) = locks.entry(task_id.to_owned()).or_default();
            *users += 1;
            Arc::clone(entry)
        };
        // The pin exists before the wait: a caller that gives up waiting
        // (its deadline passed) still cleans up after itself on drop.
        let pin = TaskPin {
            locks: self,
            task_id: task_id.to_owned(),
            entry,
        };
        let held = Arc::clone(&pin.entry.slot).lock_owned().await;
        TaskGuard { held, pin }
    }

    /// Tasks with an entry right now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl<'a> TaskGuard<'a> {
    /// Releases the lock, keeping the entry while the returned pin lives
    /// (the caller awaits a commit it queued).
    pub(crate) fn unlock(self) -> TaskPin<'a> {
        let TaskGuard { held, pin } = self;
        drop(held);
        pin
    }

    /// Whether a commit queued from this slot failed since the last call
    /// (and forgets that it did).
    pub(crate) fn take_poison(&self) -> bool {
        self.pin.entry.poisoned.swap(false, Ordering::AcqRel)
    }
}

impl std::ops::Deref for TaskGuard<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        &self.held
    }
}

impl std::ops::DerefMut for TaskGuard<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        &mut self.held
    }
}

impl TaskPin<'_> {
    /// Marks the task's cached state as planned on a commit that failed.
    pub(crate) fn poison(&self) {
        self.entry.poisoned.store(true, Ordering::Release);
    }
}

impl Drop for TaskPin<'_> {
    fn drop(&mut self) {
        let mut locks = self
            .locks
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((entry, users)) = locks.get_mut(&self.task_id)
            && Arc::ptr_eq(entry, &self.entry)
        {
            *users = users.saturating_sub(1);
            if *users == 0 {
                locks.remove(&self.task_id);
            }
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

    /// A call that queued a commit keeps its task's entry (and so the
    /// state the next call is planned on) while it waits with the lock
    /// released; the entry goes with the last user, and a poisoned slot
    /// says so once.
    #[tokio::test]
    async fn a_pin_keeps_the_planned_state_until_the_last_user_goes() {
        let locks = TaskLocks::default();
        let mut first = locks.lock("task_a").await;
        assert!(first.planned.is_none());
        first.planned = Some((portcullis_store::testsuite::sample_task("task_a"), None));
        let pin = first.unlock();
        let second = locks.lock("task_a").await;
        assert!(
            second.planned.is_some(),
            "the next call sees what was queued"
        );
        pin.poison();
        assert!(second.take_poison());
        assert!(!second.take_poison());
        drop(second);
        assert_eq!(locks.len(), 1, "the pin still holds the entry");
        drop(pin);
        assert_eq!(locks.len(), 0);
        let third = locks.lock("task_a").await;
        assert!(third.planned.is_none(), "nothing cached outlives its calls");
    }
}
