//! The depth of a backend's writer queue, for [`Store::queue_depth`]
//! (`portcullis_audit_queue_depth` on the gateway's `/metrics`).
//!
//! A commit request carries a [`Queued`] ticket from the moment its caller
//! creates it until the writer takes it out of the queue to apply it: the
//! gauge counts the tickets alive, so it covers a caller still waiting for
//! room in a full queue as well as the requests already in it, and a
//! request dropped anywhere on the way (a closed queue, a caller that gave
//! up) leaves the count as the ticket's `Drop` does. One relaxed atomic
//! add and subtract per commit.
//!
//! [`Store::queue_depth`]: crate::Store::queue_depth

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Commit requests created and not yet taken by the writer.
#[derive(Debug, Default, Clone)]
pub(crate) struct QueueGauge(Arc<AtomicU64>);

impl QueueGauge {
    /// A ticket for one more waiting request.
    pub(crate) fn ticket(&self) -> Queued {
        self.0.fetch_add(1, Ordering::Relaxed);
        Queued(Arc::clone(&self.0))
    }

    /// How many requests wait now.
    pub(crate) fn depth(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One waiting commit request; taken off the gauge when dropped.
#[derive(Debug)]
pub(crate) struct Queued(Arc<AtomicU64>);

impl Drop for Queued {
    fn drop(&mut self) {
        // INVARIANT: every ticket was counted once by `ticket`, so this
        // never goes below zero.
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_count_until_dropped() {
        let gauge = QueueGauge::default();
        assert_eq!(gauge.depth(), 0);
        let a = gauge.ticket();
        let b = gauge.clone().ticket();
        assert_eq!(gauge.depth(), 2);
        drop(a);
        assert_eq!(gauge.depth(), 1);
        drop(b);
        assert_eq!(gauge.depth(), 0);
    }
}
