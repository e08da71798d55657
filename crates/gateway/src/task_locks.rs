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
//! entry, made on first use. When the last caller that holds or awaits its
//! lock or waits for a commit it queued goes, the entry is dropped, unless
//! it holds the cached state of an active task and was not poisoned: then
//! it stays *idle*, so that the task's next call (one connection per task,
//! one call at a time) is planned without reading the ledger. At most
//! [`IDLE_CAP`] entries are idle; past that, idle entries are dropped until
//! half remain. Keeping the state is sound because this process is the
//! only one that changes a task on a ledger with a writer queue (`serve`
//! holds the SQLite file's serving lock, docs/operations.md), and every
//! change that is not a call takes the lock through
//! [`crate::pipeline`]'s `lock_task_for_change`, which forgets the cached
//! state. The kept state carries the ticket of the last commit it was
//! planned on: should that commit still be queued and fail, the next call
//! chained to it is refused by the writer, as with a call in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use portcullis_core::TaskStatus;
use portcullis_store::{TaskRecord, Ticket};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Most idle entries (tasks with no call in flight whose state is kept).
/// A kept state is a task record, a few kilobytes at most.
pub(crate) const IDLE_CAP: usize = 4096;

/// The per-task locks of one gateway.
#[derive(Debug, Default)]
pub(crate) struct TaskLocks {
    locks: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Each task's entry, with how many callers use it (0: idle).
    entries: HashMap<String, (Arc<Entry>, usize)>,
    /// Entries with no user.
    idle: usize,
}

#[derive(Debug, Default)]
struct Entry {
    slot: Arc<AsyncMutex<Slot>>,
    /// A commit queued from this slot failed: what is planned on it is
    /// refused by the writer, and the cached state must go.
    poisoned: AtomicBool,
    /// Idle: kept in the table with no user, for its cached state.
    kept: AtomicBool,
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
            let Table { entries, idle } = &mut *locks;
            let (entry, users) = entries.entry(task_id.to_owned()).or_default();
            if entry.kept.swap(false, Ordering::AcqRel) {
                // It was idle: it has a user again.
                *idle = idle.saturating_sub(1);
            }
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

    /// Tasks with an entry right now, and how many of them are idle.
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        let locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        (locks.entries.len(), locks.idle)
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
        let Table { entries, idle } = &mut *locks;
        let Some((entry, users)) = entries.get_mut(&self.task_id) else {
            return;
        };
        if !Arc::ptr_eq(entry, &self.entry) {
            return;
        }
        *users = users.saturating_sub(1);
        if *users > 0 {
            return;
        }
        if self.entry.worth_keeping() {
            self.entry.kept.store(true, Ordering::Release);
            *idle += 1;
            if *idle > IDLE_CAP {
                forget_idle(entries, idle, IDLE_CAP / 2);
            }
        } else {
            entries.remove(&self.task_id);
        }
    }
}

impl Entry {
    /// Whether this entry, its last user gone, holds state worth keeping:
    /// an active task's, not planned on a failed commit. (Nobody holds the
    /// slot's lock when its last user goes: lock holders are users.)
    fn worth_keeping(&self) -> bool {
        if self.poisoned.load(Ordering::Acquire) {
            return false;
        }
        self.slot.try_lock().is_ok_and(|slot| {
            slot.planned
                .as_ref()
                .is_some_and(|(record, _)| record.task.status == TaskStatus::Active)
        })
    }
}

/// Drops idle entries until at most `keep` remain.
fn forget_idle(entries: &mut HashMap<String, (Arc<Entry>, usize)>, idle: &mut usize, keep: usize) {
    entries.retain(|_, (_, users)| {
        if *users > 0 || *idle <= keep {
            return true;
        }
        *idle -= 1;
        false
    });
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
        assert_eq!(locks.len(), (0, 0), "every lock is forgotten once unused");
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
        assert_eq!(locks.len(), (0, 0), "nothing cached, nothing kept");
    }

    /// A call that queued a commit keeps its task's entry (and so the
    /// state the next call is planned on) while it waits with the lock
    /// released; a poisoned slot says so once, and its state is not kept
    /// once the last user goes.
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
        assert_eq!(locks.len(), (1, 0), "the pin still holds the entry");
        pin.poison();
        drop(pin);
        assert_eq!(locks.len(), (0, 0), "a poisoned state is not kept");
        let third = locks.lock("task_a").await;
        assert!(third.planned.is_none(), "the next call reads the ledger");
    }

    /// Regression (shape (b) of the call-path benchmark: one connection per
    /// task): a task's state went with its last call in flight, so every
    /// call of a task used one call at a time read the task from the ledger
    /// on the blocking pool. The state of an active task now stays, idle,
    /// for its next call.
    #[tokio::test]
    async fn an_idle_task_keeps_its_state_for_its_next_call() {
        let locks = TaskLocks::default();
        let mut first = locks.lock("task_a").await;
        first.planned = Some((portcullis_store::testsuite::sample_task("task_a"), None));
        drop(first);
        assert_eq!(locks.len(), (1, 1), "kept, idle");
        let second = locks.lock("task_a").await;
        assert!(second.planned.is_some(), "planned without the ledger");
        assert_eq!(locks.len(), (1, 0), "in use again");
        drop(second);
        assert_eq!(locks.len(), (1, 1));
    }

    /// An ended task's state, or no state, is not kept: the next call reads
    /// the ledger.
    #[tokio::test]
    async fn an_ended_task_is_not_kept() {
        let locks = TaskLocks::default();
        let mut guard = locks.lock("task_a").await;
        let mut record = portcullis_store::testsuite::sample_task("task_a");
        record.task.status = TaskStatus::Completed;
        guard.planned = Some((record, None));
        drop(guard);
        assert_eq!(locks.len(), (0, 0));
        let mut guard = locks.lock("task_b").await;
        guard.planned = Some((portcullis_store::testsuite::sample_task("task_b"), None));
        // A change that is not a call forgets the state under the lock.
        guard.planned = None;
        drop(guard);
        assert_eq!(locks.len(), (0, 0));
    }

    /// The idle entries are bounded: past the cap, they are dropped until
    /// half the cap remain; entries in use are never dropped.
    #[tokio::test]
    async fn idle_entries_are_bounded() {
        let locks = TaskLocks::default();
        let busy = locks.lock("task_busy").await;
        for i in 0..=IDLE_CAP {
            let id = format!("task_{i}");
            let mut guard = locks.lock(&id).await;
            guard.planned = Some((portcullis_store::testsuite::sample_task(&id), None));
        }
        let (entries, idle) = locks.len();
        assert_eq!(idle, IDLE_CAP / 2, "dropped down to half the cap");
        assert_eq!(entries, idle + 1, "the busy task stays");
        drop(busy);
    }
}
