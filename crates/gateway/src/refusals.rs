//! Unauthenticated refusals, counted per source and recorded in aggregate.
//!
//! A request refused before its caller is known (no token, a forged,
//! expired or revoked one) used to commit one `call.denied` record of its
//! own through the single ledger writer. A flood of such requests then grew
//! the audit log by one record per request and queued ahead of real calls.
//! Here they are counted instead:
//!
//! - **Per source.** The source is the peer IP of the connection (no
//!   forwarding header is trusted: any client can write one). At most
//!   [`MAX_SOURCES`] sources are tracked per window; refusals from any
//!   further source are counted under one "other sources" tally, so memory
//!   stays bounded whatever the number of addresses a flood comes from.
//! - **One record per source per window.** Each tally becomes one
//!   `call.denied` record (`detail` "N refused requests from SOURCE in the
//!   last Ws: reasons …") when its window of [`WINDOW_MS`] ends: by the
//!   ticker of `portcullis serve` ([`crate::Gateway::flush_due_refusals`]),
//!   lazily at the next refusal after the end, and on shutdown
//!   ([`crate::Gateway::flush_refusals`]). Counts are exact: a flush that
//!   the ledger refuses puts its counts back, to be written with the next.
//! - **Over the rate, no ledger at all.** A source refused more than
//!   [`RATE_PER_SECOND`] times within one second is answered `rate_limited`
//!   (HTTP 403, `Retry-After: 1`) from memory; those refusals are still
//!   counted in the source's tally under `rate_limited`.
//!
//! The request path never waits for the ledger here, so a flood cannot
//! delay authenticated calls. What a crash loses is bounded: the counts of
//! the current window (at most [`WINDOW_MS`]) of refusals that were never
//! acknowledged as recorded; no authenticated call's record is affected.
//!
//! The bookkeeping ([`RefusalBook`]) is synchronous and takes the time as an
//! argument, so it is tested without a runtime or a clock.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use portcullis_core::{Reason, Timestamp};
use portcullis_store::{EventKind, NewEvent, Op, Store};

use crate::error::ApiError;

/// Length of one counting window, in milliseconds.
pub const WINDOW_MS: u64 = 10_000;
/// Most refusals per source per second that are answered with their own
/// reason; beyond it, `rate_limited`.
pub const RATE_PER_SECOND: u32 = 50;
/// Most sources tracked one by one per window; more share one tally.
pub const MAX_SOURCES: usize = 1024;
/// Most distinct task ids named in one tally's record.
const MAX_TASKS_NAMED: usize = 4;
/// Longest task id kept (the path is the caller's input).
const MAX_TASK_ID_CHARS: usize = 128;

tokio::task_local! {
    /// The source of the request being served (set by the router's outer
    /// layer from the connection's peer address).
    static CURRENT: Source;
}

/// Where unauthenticated requests come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The peer IP address of the connection.
    Peer(IpAddr),
    /// No peer address is known (the router served without a listener).
    Unknown,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Peer(ip) => write!(f, "{ip}"),
            Self::Unknown => f.write_str("an unknown source"),
        }
    }
}

/// Runs `fut` with `source` as the current request's source.
pub(crate) async fn with_source<F: std::future::Future>(source: Source, fut: F) -> F::Output {
    CURRENT.scope(source, fut).await
}

/// The source of the request being served.
pub(crate) fn current_source() -> Source {
    CURRENT.try_with(|s| *s).unwrap_or(Source::Unknown)
}

/// The refusals of one source (or of the "other sources") in one window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tally {
    count: u64,
    reasons: BTreeMap<Reason, u64>,
    /// Distinct task ids the refused requests named, at most
    /// [`MAX_TASKS_NAMED`]; `more_tasks` says whether others were left out.
    tasks: Vec<String>,
    more_tasks: bool,
    /// The second (`ms / 1000`) of `in_second`.
    second: u64,
    in_second: u32,
}

impl Tally {
    fn add(&mut self, reason: Reason, count: u64, task_id: Option<&str>) {
        self.count = self.count.saturating_add(count);
        let n = self.reasons.entry(reason).or_insert(0);
        *n = n.saturating_add(count);
        if let Some(task) = task_id {
            self.name_task(task);
        }
    }

    fn name_task(&mut self, task: &str) {
        if self.tasks.iter().any(|t| t == task) {
            return;
        }
        if self.tasks.len() < MAX_TASKS_NAMED {
            self.tasks
                .push(task.chars().take(MAX_TASK_ID_CHARS).collect());
        } else {
            self.more_tasks = true;
        }
    }

    fn merge(&mut self, other: &Self) {
        for (reason, n) in &other.reasons {
            self.add(*reason, *n, None);
        }
        for task in &other.tasks {
            self.name_task(task);
        }
        self.more_tasks |= other.more_tasks;
    }

    /// Counts one refusal at `now` for the rate; whether it is over it.
    fn over_rate(&mut self, now: Timestamp) -> bool {
        let second = now.0 / 1000;
        if second != self.second {
            self.second = second;
            self.in_second = 0;
        }
        self.in_second = self.in_second.saturating_add(1);
        self.in_second > RATE_PER_SECOND
    }
}

/// Who a tally is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    One(Source),
    Others,
}

/// A window's tallies taken out of the book, to be written; put back with
/// [`RefusalBook::restore`] when the ledger refuses them.
#[derive(Debug, Default)]
pub(crate) struct Flush {
    started: Timestamp,
    tallies: Vec<(Counted, Tally)>,
}

impl Flush {
    /// Whether there is nothing to write.
    pub(crate) fn is_empty(&self) -> bool {
        self.tallies.is_empty()
    }

    /// The `call.denied` records of this flush at `now`, one per tally.
    pub(crate) fn events(&self, now: Timestamp) -> Vec<NewEvent> {
        let secs = now.0.saturating_sub(self.started.0).div_ceil(1000).max(1);
        self.tallies
            .iter()
            .map(|(who, tally)| {
                let mut event = NewEvent::new(now, EventKind::CallDenied);
                event.decision = Some("deny".to_owned());
                // The most frequent reason (the first in code order on a tie).
                let mut top: Option<(Reason, u64)> = None;
                for (reason, n) in &tally.reasons {
                    if top.is_none_or(|(_, m)| *n > m) {
                        top = Some((*reason, *n));
                    }
                }
                event.reason = top.map(|(r, _)| r.as_str().to_owned());
                // One task named by every refusal: the record is on it.
                if let ([task], false) = (tally.tasks.as_slice(), tally.more_tasks) {
                    event.task_id = Some(task.clone());
                }
                let source = match who {
                    Counted::One(s) => s.to_string(),
                    Counted::Others => "other sources".to_owned(),
                };
                let reasons = tally
                    .reasons
                    .iter()
                    .map(|(r, n)| format!("{} {n}", r.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut detail = format!(
                    "{} refused requests from {source} in the last {secs}s: reasons {reasons}",
                    tally.count
                );
                if !tally.tasks.is_empty() {
                    detail.push_str("; tasks named: ");
                    detail.push_str(&tally.tasks.join(", "));
                    if tally.more_tasks {
                        detail.push_str(", …");
                    }
                }
                event.detail = Some(detail);
                event
            })
            .collect()
    }
}

/// What the book says of one refusal.
#[derive(Debug, Default)]
pub(crate) struct Noted {
    /// The source is over [`RATE_PER_SECOND`]: answer `rate_limited`.
    pub over_rate: bool,
    /// A window ended before this refusal: its tallies, to be written.
    pub ended: Option<Flush>,
}

#[derive(Debug)]
struct Window {
    started: Timestamp,
    sources: HashMap<Source, Tally>,
    others: Tally,
}

impl Window {
    fn new(started: Timestamp) -> Self {
        Self {
            started,
            sources: HashMap::new(),
            others: Tally::default(),
        }
    }

    fn tally(&mut self, source: Source) -> &mut Tally {
        // INVARIANT: at most MAX_SOURCES entries; the rest share `others`.
        if self.sources.len() < MAX_SOURCES || self.sources.contains_key(&source) {
            self.sources.entry(source).or_default()
        } else {
            &mut self.others
        }
    }

    fn take(&mut self, now: Timestamp) -> Flush {
        let old = std::mem::replace(self, Self::new(now));
        let mut tallies: Vec<(Counted, Tally)> = old
            .sources
            .into_iter()
            .filter(|(_, t)| t.count > 0)
            .map(|(s, t)| (Counted::One(s), t))
            .collect();
        if old.others.count > 0 {
            tallies.push((Counted::Others, old.others));
        }
        // Keep the rate state of the current second across the window's end.
        for (who, t) in &tallies {
            if let Counted::One(s) = who
                && t.second == now.0 / 1000
            {
                let fresh = self.tally(*s);
                fresh.second = t.second;
                fresh.in_second = t.in_second;
            }
        }
        Flush {
            started: old.started,
            tallies,
        }
    }
}

/// The counts of unauthenticated refusals (see the module docs).
#[derive(Debug)]
pub struct RefusalBook {
    window: Mutex<Window>,
}

impl Default for RefusalBook {
    fn default() -> Self {
        Self {
            window: Mutex::new(Window::new(Timestamp(0))),
        }
    }
}

impl RefusalBook {
    fn lock(&self) -> MutexGuard<'_, Window> {
        // A panic while holding the lock cannot leave the counts half
        // changed in a way that matters more than losing them.
        self.window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one refusal from `source` with `reason`, naming `task_id`.
    pub(crate) fn note(
        &self,
        source: Source,
        task_id: Option<&str>,
        reason: Reason,
        now: Timestamp,
    ) -> Noted {
        let mut window = self.lock();
        let ended = if now.0 >= window.started.0.saturating_add(WINDOW_MS) {
            Some(window.take(now)).filter(|f| !f.is_empty())
        } else {
            None
        };
        let tally = window.tally(source);
        let over_rate = tally.over_rate(now);
        let counted = if over_rate {
            Reason::RateLimited
        } else {
            reason
        };
        tally.add(counted, 1, task_id);
        Noted { over_rate, ended }
    }

    /// Takes every tally, ended or not.
    pub(crate) fn take_all(&self, now: Timestamp) -> Flush {
        self.lock().take(now)
    }

    /// Takes the tallies if their window has ended.
    pub(crate) fn take_due(&self, now: Timestamp) -> Flush {
        let mut window = self.lock();
        if now.0 >= window.started.0.saturating_add(WINDOW_MS) {
            window.take(now)
        } else {
            Flush::default()
        }
    }

    /// Puts the counts of a flush that could not be written back into the
    /// current window (they are written with its records).
    pub(crate) fn restore(&self, flush: Flush) {
        let mut window = self.lock();
        if flush.started.0 < window.started.0 {
            window.started = flush.started;
        }
        for (who, tally) in flush.tallies {
            let into = match who {
                Counted::One(source) => window.tally(source),
                Counted::Others => &mut window.others,
            };
            into.merge(&tally);
        }
    }
}

/// Writes `flush` as its `call.denied` records; on failure its counts go
/// back into `book`. Returns how many records were written.
pub(crate) async fn write(
    book: &RefusalBook,
    store: &dyn Store,
    flush: Flush,
    now: Timestamp,
) -> usize {
    if flush.is_empty() {
        return 0;
    }
    let ops: Vec<Op> = flush.events(now).into_iter().map(Op::Append).collect();
    let n = ops.len();
    match store.commit(ops).await {
        Ok(_) => n,
        Err(e) => {
            tracing::warn!(error = %e, "unauthenticated refusals not recorded yet; kept for the next flush");
            book.restore(flush);
            0
        }
    }
}

/// Writes `flush` off the request path.
pub(crate) fn write_later(
    book: Arc<RefusalBook>,
    store: Arc<dyn Store>,
    flush: Flush,
    now: Timestamp,
) {
    if flush.is_empty() {
        return;
    }
    tokio::spawn(async move {
        write(&book, store.as_ref(), flush, now).await;
    });
}

impl crate::state::Gateway {
    /// Counts a refusal of a request whose caller is unknown (no valid
    /// credential) against the current request's source, naming the task
    /// its path names, and returns the answer: `refusal` itself, or
    /// `rate_limited` (403) when the source is over [`RATE_PER_SECOND`].
    /// Never waits for the ledger: a window that has ended is written off
    /// the request path.
    pub(crate) fn count_refusal(&self, task_id: Option<&str>, refusal: &ApiError) -> ApiError {
        let now = self.now();
        let noted = self
            .refusals
            .note(current_source(), task_id, refusal.code(), now);
        if let Some(ended) = noted.ended {
            write_later(self.refusals.clone(), self.store.clone(), ended, now);
        }
        if noted.over_rate {
            ApiError::throttled(
                format!("more than {RATE_PER_SECOND} refused requests per second from this source"),
                1,
            )
        } else {
            refusal.clone()
        }
    }

    /// Writes every counted refusal now, ended window or not (on shutdown;
    /// tests). Returns how many records were written.
    pub async fn flush_refusals(&self) -> usize {
        let now = self.now();
        let flush = self.refusals.take_all(now);
        write(&self.refusals, self.store.as_ref(), flush, now).await
    }

    /// Writes the counted refusals if their window has ended.
    pub async fn flush_due_refusals(&self) -> usize {
        let now = self.now();
        let flush = self.refusals.take_due(now);
        write(&self.refusals, self.store.as_ref(), flush, now).await
    }
}

/// Writes ended windows every second until `stop` resolves, then writes
/// what is left.
pub async fn run_flushes(
    gw: Arc<crate::state::Gateway>,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    let mut stop = std::pin::pin!(stop);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = tick.tick() => {
                gw.flush_due_refusals().await;
            }
        }
    }
    gw.flush_refusals().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Source {
        Source::Peer(IpAddr::from([10, 0, 0, last]))
    }

    fn count_of(event: &NewEvent) -> u64 {
        event
            .detail
            .as_deref()
            .and_then(|d| d.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn one_record_per_source_per_window_with_exact_counts() {
        let book = RefusalBook::default();
        let t0 = Timestamp(1_000_000);
        for i in 0..120u64 {
            let noted = book.note(
                ip(1),
                Some("t1"),
                Reason::TokenInvalid,
                Timestamp(t0.0 + i * 10),
            );
            assert!(noted.ended.is_none() || i == 0);
        }
        book.note(ip(2), None, Reason::TokenMissing, t0);
        let flush = book.take_all(Timestamp(t0.0 + 2_000));
        let events = flush.events(Timestamp(t0.0 + 2_000));
        assert_eq!(events.len(), 2);
        assert_eq!(events.iter().map(count_of).sum::<u64>(), 121);
        let one = events
            .iter()
            .find(|e| e.detail.as_deref().is_some_and(|d| d.contains("10.0.0.1")))
            .expect("a record for 10.0.0.1");
        assert_eq!(one.task_id.as_deref(), Some("t1"));
        assert_eq!(one.reason.as_deref(), Some("token_invalid"));
        assert!(book.take_all(Timestamp(t0.0 + 3_000)).is_empty());
    }

    #[test]
    fn over_the_rate_is_rate_limited_and_still_counted() {
        let book = RefusalBook::default();
        let now = Timestamp(5_000);
        let limited = (0..80)
            .filter(|_| book.note(ip(1), None, Reason::TokenInvalid, now).over_rate)
            .count();
        assert_eq!(limited, 80 - RATE_PER_SECOND as usize);
        // Another source is not affected, nor the next second.
        assert!(!book.note(ip(2), None, Reason::TokenInvalid, now).over_rate);
        assert!(
            !book
                .note(ip(1), None, Reason::TokenInvalid, Timestamp(6_000))
                .over_rate
        );
        let events = book.take_all(Timestamp(6_000)).events(Timestamp(6_000));
        assert_eq!(events.iter().map(count_of).sum::<u64>(), 82);
        assert!(events.iter().any(|e| {
            e.detail
                .as_deref()
                .is_some_and(|d| d.contains("rate_limited 30"))
        }));
    }

    #[test]
    fn sources_beyond_the_cap_share_one_tally() {
        let book = RefusalBook::default();
        let now = Timestamp(0);
        let sources = MAX_SOURCES + 500;
        for i in 0..sources {
            let bytes = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
            book.note(
                Source::Peer(IpAddr::from(bytes)),
                None,
                Reason::TokenMissing,
                now,
            );
        }
        let events = book.take_all(now).events(now);
        assert_eq!(events.len(), MAX_SOURCES + 1);
        assert_eq!(events.iter().map(count_of).sum::<u64>(), sources as u64);
        assert!(events.iter().any(|e| {
            e.detail
                .as_deref()
                .is_some_and(|d| d.starts_with("500 refused requests from other sources"))
        }));
    }

    #[test]
    fn a_window_ends_lazily_at_the_next_refusal_and_a_failed_flush_is_restored() {
        let book = RefusalBook::default();
        book.note(ip(1), Some("a"), Reason::TokenExpired, Timestamp(1_000));
        book.note(ip(1), Some("b"), Reason::TokenExpired, Timestamp(1_500));
        assert!(book.take_due(Timestamp(2_000)).is_empty());
        let noted = book.note(ip(1), None, Reason::TokenMissing, Timestamp(20_000));
        let ended = noted.ended.expect("the first window ended");
        let events = ended.events(Timestamp(20_000));
        assert_eq!(events.iter().map(count_of).sum::<u64>(), 2);
        // Two tasks named: the record is on neither, and names both.
        assert_eq!(events.first().and_then(|e| e.task_id.clone()), None);
        // The ledger refused it: the counts come back, nothing lost.
        book.restore(ended);
        let events = book.take_all(Timestamp(21_000)).events(Timestamp(21_000));
        assert_eq!(events.len(), 1);
        assert_eq!(events.iter().map(count_of).sum::<u64>(), 3);
    }
}
