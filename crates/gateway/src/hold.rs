//! Held approvals (`[approval] hold`, DESIGN section 14): a call that needs
//! a person's approval waits for the decision instead of failing at once.
//!
//! The hold wraps the one call path ([`Gateway::authorize`]); it decides
//! nothing itself:
//!
//! ```text
//! authorize ─ allowed ──────────────────────────────────────────► forward
//!     │
//!     └ approval_required, filed as elevation E for this call
//!         → take a hold slot (per-task and total caps; none free: answer now)
//!         → wait, holding no ledger lock and no task lock, until E is decided,
//!           the hold runs out, or the caller goes away
//!         → approved: authorize again — the one-use grant of E, bound to the
//!           tool and the digest of these arguments, is spent by the normal path
//!         → denied / timed out: approval_required, E's id in `detail`
//! ```
//!
//! The decision is read from the ledger (the elevation row), so an approval
//! given by another replica, or by `portcullis elevations approve` on the
//! same SQLite file, releases the hold: the row is polled every
//! [`POLL_EVERY`], well inside the one-second bound. An approval given in
//! this process wakes its holds at once ([`Holds::decided`]).
//!
//! INVARIANT: a hold only ever *waits*. Every call it lets through passed
//! `authorize` afresh after the approval, with the task as it is then; an
//! approval for other arguments files no grant this call can spend, so the
//! second `authorize` holds it again (a new elevation) rather than
//! forwarding it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use portcullis_core::Reason;
use portcullis_store::ElevationStatus;
use portcullis_token::Claims;
use serde_json::Value;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::pipeline::Authorized;
use crate::state::Gateway;

/// How often a hold reads its elevation's row: the bound on how late an
/// approval given elsewhere (another replica, the CLI) is seen.
pub const POLL_EVERY: Duration = Duration::from_millis(200);

/// How often a holder hears that the call still waits (MCP progress
/// notifications).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Most rounds of hold-then-decide for one call: a call can need more than
/// one approval (entering a state that needs one with a high-risk tool is
/// filed once; a task changed meanwhile may need another), never many.
const MAX_ROUNDS: usize = 3;

/// The calls held now, per task and in total, and the signal that wakes
/// them when this process decides an elevation.
#[derive(Debug)]
pub(crate) struct Holds {
    hold: Duration,
    max_per_task: usize,
    max_total: usize,
    held: Mutex<HashMap<String, usize>>,
    decided: watch::Sender<u64>,
}

/// One held call's slot; dropping it frees the slot.
#[derive(Debug)]
struct Slot<'a> {
    holds: &'a Holds,
    task_id: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut held = self.holds.lock();
        if let Some(n) = held.get_mut(&self.task_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.task_id);
            }
        }
    }
}

/// Why a call that needs approval was not held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    Task(usize),
    Total(usize),
}

impl Holds {
    pub(crate) fn new(cfg: &portcullis_config::Approval) -> Self {
        Self {
            hold: cfg.hold.to_std(),
            max_per_task: usize::try_from(cfg.max_held_per_task).unwrap_or(usize::MAX),
            max_total: usize::try_from(cfg.max_held).unwrap_or(usize::MAX),
            held: Mutex::new(HashMap::new()),
            decided: watch::Sender::new(0),
        }
    }

    /// The configured hold; zero: answer at once.
    pub(crate) fn hold(&self) -> Duration {
        self.hold
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls held now, over all tasks.
    pub(crate) fn count(&self) -> usize {
        self.lock().values().sum()
    }

    fn take(&self, task_id: &str) -> Result<Slot<'_>, Full> {
        let mut held = self.lock();
        let total: usize = held.values().sum();
        if total >= self.max_total {
            return Err(Full::Total(self.max_total));
        }
        let n = held.entry(task_id.to_owned()).or_insert(0);
        if *n >= self.max_per_task {
            return Err(Full::Task(self.max_per_task));
        }
        *n += 1;
        Ok(Slot {
            holds: self,
            task_id: task_id.to_owned(),
        })
    }

    /// Wakes every hold of this process to read its elevation now: called
    /// after an elevation is decided here.
    pub(crate) fn decided(&self) {
        self.decided.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What a holder is told while its call waits.
#[derive(Debug, Clone)]
pub(crate) struct Waiting {
    /// The elevation the call waits on.
    pub elevation_id: String,
    /// How long it has waited.
    pub waited: Duration,
    /// The most it will wait.
    pub hold: Duration,
}

/// Where a holder hears of the wait. A closed channel means the caller is
/// gone: the hold ends (and answers `approval_required` to nobody).
pub(crate) type Progress = tokio::sync::mpsc::Sender<Waiting>;

/// The id of the elevation request `e` filed for the call, if it is an
/// `approval_required` denial that filed one.
fn filed_elevation(e: &ApiError) -> Option<String> {
    if e.reason() != Some(Reason::ApprovalRequired) {
        return None;
    }
    e.elevation_id().map(str::to_owned)
}

/// The console page of elevation request `id`, for people (alerts,
/// progress messages).
pub(crate) fn approval_url(issuer: &str, id: &str) -> String {
    format!("{}/console/approvals#{id}", issuer.trim_end_matches('/'))
}

/// How one wait ended.
enum Ended {
    Approved,
    Denied(String),
    TimedOut,
    Gone,
}

impl Gateway {
    /// Calls held for approval now, over all tasks.
    pub fn held_calls(&self) -> usize {
        self.holds.count()
    }

    /// [`Gateway::authorize`], holding a call that needs approval for up to
    /// `[approval] hold` until a person decides (module doc). `progress`,
    /// when given, hears of the wait every [`PROGRESS_EVERY`], the first
    /// time as soon as the call is held.
    pub(crate) async fn authorize_held(
        &self,
        claims: &Claims,
        task_id: &str,
        tool: &str,
        args: &Value,
        forward: bool,
        progress: Option<&Progress>,
    ) -> Result<Authorized, ApiError> {
        let hold = self.holds.hold();
        let first = self.authorize(claims, task_id, tool, args, forward).await;
        if hold.is_zero() {
            return first;
        }
        let deadline = tokio::time::Instant::now() + hold;
        let mut answer = first;
        for _ in 0..MAX_ROUNDS {
            let e = match answer {
                Ok(done) => return Ok(done),
                Err(e) => e,
            };
            let Some(id) = filed_elevation(&e) else {
                return Err(e);
            };
            // The request must be the one this call filed: this task, this
            // tool, a one-use approval of these very arguments. Anything
            // else (a detail this code misread) answers at once.
            if !self.is_request_for(&id, task_id, tool, args).await {
                return Err(e);
            }
            let _slot = match self.holds.take(task_id) {
                Ok(slot) => slot,
                Err(full) => {
                    let why = match full {
                        Full::Task(n) => format!("the task already has {n} calls held"),
                        Full::Total(n) => format!("{n} calls are held already"),
                    };
                    let detail = format!("{}; not held: {why}", e.detail());
                    return Err(e.with_detail(detail));
                }
            };
            let ended = self.wait_for(&id, deadline, hold, progress).await;
            match ended {
                Ended::Approved => {}
                Ended::Denied(why) => {
                    return Err(ApiError::denied(
                        Reason::ApprovalRequired,
                        format!("elevation request {id} was denied: {why}"),
                    )
                    .with_elevation(id));
                }
                Ended::TimedOut => {
                    return Err(ApiError::denied(
                        Reason::ApprovalRequired,
                        format!(
                            "held as elevation request {id}; no decision within {}s (it stays \
                             pending: approved, the same call goes through)",
                            hold.as_secs()
                        ),
                    )
                    .with_elevation(id));
                }
                Ended::Gone => return Err(e),
            }
            // Approved: decided afresh, with the task as it is now; the
            // approval's one-use grant is spent by this call (and only by a
            // call with these arguments).
            answer = self.authorize(claims, task_id, tool, args, forward).await;
        }
        answer
    }

    /// Whether elevation `id` is a request filed for this very call — its
    /// task, its tool, the digest of its arguments — by a configured
    /// approval or an anomaly rule's `require_approval`.
    async fn is_request_for(&self, id: &str, task_id: &str, tool: &str, args: &Value) -> bool {
        let Ok(Some(e)) = self.store.elevation(id).await else {
            return false;
        };
        let Some(held) = &e.held else {
            return false;
        };
        let digest = crate::state::args_digest(args, &self.settings.redact);
        e.task_id == task_id
            && e.tool == tool
            && held.args_digest.as_deref() == Some(digest.as_str())
    }

    /// Waits until elevation `id` is decided, `deadline` passes, or the
    /// holder's progress channel closes. A ledger that cannot be read is
    /// asked again at the next poll; past the deadline it is a timeout,
    /// never an approval.
    async fn wait_for(
        &self,
        id: &str,
        deadline: tokio::time::Instant,
        hold: Duration,
        progress: Option<&Progress>,
    ) -> Ended {
        let started = tokio::time::Instant::now();
        let mut decided = self.holds.decided.subscribe();
        let mut next_progress = started;
        loop {
            match self.store.elevation(id).await {
                Ok(Some(e)) => match e.status {
                    ElevationStatus::Approved => return Ended::Approved,
                    ElevationStatus::Denied => {
                        let by = e.decided_by.unwrap_or_default();
                        return Ended::Denied(match e.note {
                            Some(note) if !note.is_empty() => format!("by {by}: {note}"),
                            _ => format!("by {by}"),
                        });
                    }
                    ElevationStatus::Pending => {}
                },
                Ok(None) => return Ended::Denied("the request is gone".to_owned()),
                Err(err) => {
                    tracing::warn!(elevation = id, error = %err, "held call: ledger read failed")
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ended::TimedOut;
            }
            if let Some(p) = progress {
                if p.is_closed() {
                    return Ended::Gone;
                }
                if now >= next_progress {
                    let waiting = Waiting {
                        elevation_id: id.to_owned(),
                        waited: now.saturating_duration_since(started),
                        hold,
                    };
                    // A full channel drops this tick; the next one follows.
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
                        p.try_send(waiting)
                    {
                        return Ended::Gone;
                    }
                    next_progress = now + PROGRESS_EVERY;
                }
            }
            let wake = (now + POLL_EVERY).min(deadline);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                changed = decided.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(wake).await;
                    }
                }
                () = closed(progress) => return Ended::Gone,
            }
        }
    }
}

/// Resolves when the holder's progress channel closes (never without one).
async fn closed(progress: Option<&Progress>) {
    match progress {
        Some(p) => p.closed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_filed_elevation_is_read_from_the_typed_field_never_from_the_text() {
        let filed = ApiError::denied(Reason::ApprovalRequired, "approval required")
            .with_elevation("elv_AbC-12_x");
        assert_eq!(filed_elevation(&filed).as_deref(), Some("elv_AbC-12_x"));
        // A detail that merely says so (text an agent may have chosen) is
        // no filed request.
        let text_only = ApiError::denied(
            Reason::ApprovalRequired,
            "approval required; held as elevation request elv_AbC-12_x",
        );
        assert_eq!(filed_elevation(&text_only), None);
        let other = ApiError::denied(Reason::PolicyForbid, "no").with_elevation("elv_x");
        assert_eq!(filed_elevation(&other), None);
    }

    #[test]
    fn slots_are_capped_per_task_and_in_total_and_freed_on_drop() {
        let holds = Holds::new(&portcullis_config::Approval {
            hold: portcullis_config::Duration::from_secs(1),
            max_held_per_task: 2,
            max_held: 3,
        });
        let a1 = holds.take("a").unwrap();
        let _a2 = holds.take("a").unwrap();
        assert_eq!(holds.take("a").unwrap_err(), Full::Task(2));
        let _b1 = holds.take("b").unwrap();
        assert_eq!(holds.take("c").unwrap_err(), Full::Total(3));
        assert_eq!(holds.count(), 3);
        drop(a1);
        assert_eq!(holds.count(), 2);
        let _c1 = holds.take("c").unwrap();
    }
}
