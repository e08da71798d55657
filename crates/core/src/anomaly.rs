//! Anomaly rules (DESIGN sections 3 and 7): the last check before a call is
//! forwarded, and the count of a task's denials.
//!
//! | rule | fires on | |
//! |---|---|---|
//! | `rate = { calls, seconds }` | the call that would be the `calls + 1`-th allowed call within the last `seconds` | |
//! | `distinct_tools = { count, seconds }` | the call that would make `count` distinct tools within the last `seconds` | |
//! | `new_tool` | the first call of a tool this agent has never called (per the ledger, across tasks) | |
//! | `denials = { count }` | the task's `count`-th denial (the denial itself is already an answer; the action adds to it) | |
//!
//! Each rule's action is `deny` (this call), `require_approval` (this call is
//! held as an elevation request; a live approval for the tool satisfies it)
//! or `halt` (the task stops and every token of it is revoked).
//!
//! The state is a [`Watch`] kept *in the task* — fixed-size counters of
//! the allowed calls in the windows, and the denial count — so it is
//! written in the same compare-and-swap as the call itself: a restart
//! neither forgets nor double-counts, and two racing calls cannot both slip
//! under a threshold. Its size does not grow with the call rate (it is
//! rewritten with every call):
//!
//! - `rate` counts allowed calls in [`SLOTS`] slots of `seconds / SLOTS`
//!   each ([`Slots`]). The window is judged by whole slots, rounding out:
//!   a call is counted from when it is made until up to one slot after it
//!   left the window. The rule never fires later than an exact count would,
//!   and at most one slot (1/32 of the window) earlier.
//! - `distinct_tools` keeps, per tool, when it was last allowed (bounded by
//!   the registry), which is exact.
//!
//! Task records written before these counters hold a list of recent calls
//! instead; it is still read, counted, and folded into the counters at the
//! task's next allowed call.

use std::collections::{BTreeMap, BTreeSet};

use portcullis_config::{Anomaly, AnomalyAction};
use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Slots of the `rate` window.
pub const SLOTS: u64 = 32;

/// One allowed call, as task records written before the counters kept it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// When.
    pub at: Timestamp,
    /// Which tool.
    pub tool: String,
}

/// Allowed calls counted per time slot: slot `i` holds the calls made in
/// `[i * width_ms, (i + 1) * width_ms)`. `counts[0]` is slot `newest`,
/// `counts[k]` slot `newest - k`; at most [`SLOTS`] + 1 are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    /// Width of a slot, in milliseconds.
    pub width_ms: u64,
    /// Index of the newest slot.
    pub newest: u64,
    /// Calls per slot, newest first.
    pub counts: Vec<u64>,
}

impl Slots {
    /// Whether no call is counted.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }

    /// Counts `n` calls at `at` in slots of `width_ms`.
    fn add(&mut self, at: Timestamp, width_ms: u64, n: u64) {
        let width_ms = width_ms.max(1);
        if self.width_ms != width_ms {
            self.rescale(width_ms);
        }
        let slot = at.0 / width_ms;
        if self.counts.is_empty() {
            self.newest = slot;
            self.counts.push(0);
        }
        if slot > self.newest {
            let keep = usize::try_from(SLOTS + 1).unwrap_or(usize::MAX);
            let zeros = usize::try_from(slot - self.newest)
                .unwrap_or(usize::MAX)
                .min(keep);
            self.counts.splice(0..0, std::iter::repeat_n(0, zeros));
            self.counts.truncate(keep);
            self.newest = slot;
        }
        // A call older than the newest slot (a clock that stepped back, a
        // replica behind) goes in its own slot, or in the oldest one kept:
        // dated later than it was, so never under-counted.
        let back = usize::try_from(self.newest - slot.min(self.newest)).unwrap_or(usize::MAX);
        let last = self.counts.len().saturating_sub(1);
        if let Some(c) = self.counts.get_mut(back.min(last)) {
            *c = c.saturating_add(n);
        }
    }

    /// Re-slots the counts at a new width (the configured window changed):
    /// each old slot's calls move to the new slot holding its last
    /// millisecond, so none is dated earlier than it was.
    fn rescale(&mut self, width_ms: u64) {
        let old = std::mem::take(self);
        self.width_ms = width_ms;
        if old.width_ms == 0 {
            return;
        }
        for (k, &n) in old.counts.iter().enumerate().rev() {
            let slot = old.newest.saturating_sub(k as u64);
            let end = slot.saturating_add(1).saturating_mul(old.width_ms) - 1;
            if n > 0 {
                self.add(Timestamp(end), width_ms, n);
            }
        }
    }

    /// Calls in the slots that overlap `(now - window_ms, now]`, and in any
    /// slot after `now` (written by a replica whose clock is ahead).
    fn count(&self, now: Timestamp, window_ms: u64) -> u64 {
        if self.width_ms == 0 {
            return 0;
        }
        let first = now.0.saturating_add(1).saturating_sub(window_ms) / self.width_ms;
        self.counts
            .iter()
            .enumerate()
            .take_while(|(k, _)| (*k as u64) <= self.newest && self.newest - *k as u64 >= first)
            .map(|(_, &c)| c)
            .fold(0, u64::saturating_add)
    }
}

/// What the anomaly rules remember of one task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    /// Allowed calls, counted for the `rate` rule.
    #[serde(default, skip_serializing_if = "Slots::is_empty")]
    pub calls: Slots,
    /// When each tool was last allowed, for the `distinct_tools` rule
    /// (tools allowed within its window).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub last_use: BTreeMap<String, Timestamp>,
    /// Allowed calls as task records written before the counters listed
    /// them: still counted, folded into the counters at the next allowed
    /// call, never written again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent: Vec<Stamp>,
    /// Denials so far.
    #[serde(default)]
    pub denials: u64,
}

/// A rule that fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// `rate`, `distinct_tools`, `new_tool` or `denials`.
    pub rule: &'static str,
    /// What to do.
    pub action: AnomalyAction,
    /// A human explanation.
    pub detail: String,
}

/// The `[anomaly]` rules of a configuration.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    cfg: Anomaly,
    /// The longest window of any rule, in milliseconds.
    horizon_ms: u64,
}

impl Rules {
    /// The rules of `[anomaly]`.
    pub fn new(cfg: &Anomaly) -> Self {
        let horizon_s = [
            cfg.rate.as_ref().map(|r| r.seconds),
            cfg.distinct_tools.as_ref().map(|r| r.seconds),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
        Self {
            cfg: cfg.clone(),
            horizon_ms: horizon_s.saturating_mul(1000),
        }
    }

    /// Whether denials are counted (a `denials` rule is configured).
    pub fn counts_denials(&self) -> bool {
        self.cfg.denials.is_some()
    }

    /// Whether the `new_tool` rule is on (the caller then looks the
    /// agent's history up in the ledger).
    pub fn watches_new_tools(&self) -> bool {
        self.cfg.new_tool.is_some()
    }

    /// Checks a call that passed every other step. `first_use`: the agent
    /// has never called `tool` (only asked for when
    /// [`Rules::watches_new_tools`]). `approved(rule)`: the task holds a
    /// live grant that answers `rule` for `tool`
    /// ([`crate::Task::anomaly_approved`]). Such a grant satisfies that
    /// rule's `require_approval` — and nothing else: every rule is judged,
    /// a rule the grant does not answer still holds the call, and a `deny`
    /// or `halt` rule that fires still decides. Of several rules that
    /// fire, the strictest action wins (`halt`, then `deny`, then
    /// `require_approval`), the first in rule order among equals.
    pub fn check_call(
        &self,
        watch: &Watch,
        tool: &str,
        now: Timestamp,
        first_use: bool,
        approved: impl Fn(&str) -> bool,
    ) -> Option<Fired> {
        let new_tool = match &self.cfg.new_tool {
            Some(action) if first_use => Some(Fired {
                rule: "new_tool",
                action: *action,
                detail: format!("first use of {tool} by this agent"),
            }),
            _ => None,
        };
        [
            self.rate(watch, now),
            self.distinct(watch, tool, now),
            new_tool,
        ]
        .into_iter()
        .flatten()
        .filter(|f| !(f.action == AnomalyAction::RequireApproval && approved(f.rule)))
        .min_by_key(|f| strictness(f.action))
    }

    fn rate(&self, watch: &Watch, now: Timestamp) -> Option<Fired> {
        let r = self.cfg.rate.as_ref()?;
        let window = r.seconds.saturating_mul(1000);
        let legacy = in_window(watch, now, window).count() as u64;
        let n = watch.calls.count(now, window).saturating_add(legacy);
        (n >= r.calls).then(|| Fired {
            rule: "rate",
            action: r.action,
            detail: format!("more than {} calls within {} s", r.calls, r.seconds),
        })
    }

    fn distinct(&self, watch: &Watch, tool: &str, now: Timestamp) -> Option<Fired> {
        let r = self.cfg.distinct_tools.as_ref()?;
        let window = r.seconds.saturating_mul(1000);
        let mut tools: BTreeSet<&str> = in_window(watch, now, window)
            .map(|s| s.tool.as_str())
            .collect();
        tools.extend(
            watch
                .last_use
                .iter()
                .filter(|(_, at)| at.0.saturating_add(window) > now.0)
                .map(|(t, _)| t.as_str()),
        );
        tools.insert(tool);
        (tools.len() as u64 >= r.count).then(|| Fired {
            rule: "distinct_tools",
            action: r.action,
            detail: format!("{} distinct tools within {} s", tools.len(), r.seconds),
        })
    }

    /// Records an allowed call (and folds a record's old list of calls
    /// into the counters).
    pub fn record_call(&self, watch: &mut Watch, tool: &str, now: Timestamp) {
        for stamp in std::mem::take(&mut watch.recent) {
            self.note(watch, &stamp.tool, stamp.at);
        }
        self.note(watch, tool, now);
        let horizon = self.horizon_ms;
        watch
            .last_use
            .retain(|_, at| at.0.saturating_add(horizon) > now.0);
        if self.cfg.rate.is_none() {
            watch.calls = Slots::default();
        }
    }

    fn note(&self, watch: &mut Watch, tool: &str, at: Timestamp) {
        if let Some(r) = &self.cfg.rate {
            let window = r.seconds.saturating_mul(1000);
            watch.calls.add(at, window.div_ceil(SLOTS), 1);
        }
        if self.cfg.distinct_tools.is_some() {
            match watch.last_use.get_mut(tool) {
                Some(last) => *last = (*last).max(at),
                None => {
                    watch.last_use.insert(tool.to_owned(), at);
                }
            }
        }
    }

    /// Counts a denial; fires when the count reaches the `denials` rule's
    /// threshold (exactly once).
    pub fn record_denial(&self, watch: &mut Watch) -> Option<Fired> {
        watch.denials = watch.denials.saturating_add(1);
        let r = self.cfg.denials.as_ref()?;
        (watch.denials == r.count).then(|| Fired {
            rule: "denials",
            action: r.action,
            detail: format!("{} denials in this task", watch.denials),
        })
    }
}

/// Orders actions strictest first: a halt outranks a denial, which
/// outranks holding the call for approval.
fn strictness(action: AnomalyAction) -> u8 {
    match action {
        AnomalyAction::Halt => 0,
        AnomalyAction::Deny => 1,
        AnomalyAction::RequireApproval => 2,
    }
}

fn in_window(watch: &Watch, now: Timestamp, window_ms: u64) -> impl Iterator<Item = &Stamp> {
    watch
        .recent
        .iter()
        .filter(move |s| s.at.0.saturating_add(window_ms) > now.0 && s.at <= now)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use portcullis_config::{CountRule, RateRule, WindowRule};

    fn rules() -> Rules {
        Rules::new(&Anomaly {
            new_tool: Some(AnomalyAction::RequireApproval),
            distinct_tools: Some(WindowRule {
                count: 3,
                seconds: 30,
                action: AnomalyAction::Halt,
            }),
            denials: Some(CountRule {
                count: 2,
                action: AnomalyAction::Halt,
            }),
            rate: Some(RateRule {
                calls: 4,
                seconds: 10,
                action: AnomalyAction::Deny,
            }),
        })
    }

    /// Regression: the rules were judged first-fired-wins, and an approval
    /// for the tool cleared the first rule that fired when it asked for
    /// approval — so a lasting grant from approving one hold also skipped
    /// every rule after it, a `halt` included. Every rule is now judged;
    /// the grant satisfies `require_approval` only, and the strictest
    /// action that remains decides.
    #[test]
    fn an_approval_never_switches_off_a_deny_or_halt_rule() {
        let r = Rules::new(&Anomaly {
            rate: Some(RateRule {
                calls: 1,
                seconds: 10,
                action: AnomalyAction::RequireApproval,
            }),
            distinct_tools: Some(WindowRule {
                count: 2,
                seconds: 10,
                action: AnomalyAction::Halt,
            }),
            ..Anomaly::default()
        });
        let mut w = Watch::default();
        r.record_call(&mut w, "a", Timestamp(0));
        // Both fire on a second, different tool: approved or not, the halt.
        for approved in [false, true] {
            let fired = r
                .check_call(&w, "b", Timestamp(1), false, |_| approved)
                .unwrap();
            assert_eq!(fired.rule, "distinct_tools", "approved: {approved}");
            assert_eq!(fired.action, AnomalyAction::Halt);
        }
        // Only the rate rule fires on the same tool: an approval satisfies it.
        let fired = r
            .check_call(&w, "a", Timestamp(1), false, |_| false)
            .unwrap();
        assert_eq!(fired.rule, "rate");
        assert_eq!(r.check_call(&w, "a", Timestamp(1), false, |_| true), None);
    }

    #[test]
    fn rate_fires_on_the_call_after_the_limit_and_slides() {
        let r = rules();
        let mut w = Watch::default();
        for i in 0..4 {
            let now = Timestamp(1_000 + i);
            assert_eq!(
                r.check_call(&w, "a", now, false, |_| false),
                None,
                "call {i}"
            );
            r.record_call(&mut w, "a", now);
        }
        let fired = r
            .check_call(&w, "a", Timestamp(1_004), false, |_| false)
            .unwrap();
        assert_eq!((fired.rule, fired.action), ("rate", AnomalyAction::Deny));
        // Still within ten seconds of the first call: the window is full.
        assert!(
            r.check_call(&w, "a", Timestamp(10_999), false, |_| false)
                .is_some()
        );
        // Ten seconds and one slot (10 s / 32, rounded up) after the last
        // call, the window is empty again.
        assert_eq!(
            r.check_call(&w, "a", Timestamp(1_003 + 10_000 + 313), false, |_| false),
            None
        );
    }

    #[test]
    fn distinct_tools_fire_at_exactly_the_count() {
        let r = rules();
        let mut w = Watch::default();
        r.record_call(&mut w, "a", Timestamp(0));
        r.record_call(&mut w, "b", Timestamp(1));
        assert_eq!(
            r.check_call(&w, "a", Timestamp(2), false, |_| false),
            None,
            "still two tools"
        );
        let fired = r
            .check_call(&w, "c", Timestamp(2), false, |_| false)
            .unwrap();
        assert_eq!(
            (fired.rule, fired.action),
            ("distinct_tools", AnomalyAction::Halt)
        );
        assert_eq!(
            r.check_call(&w, "c", Timestamp(30_000), false, |_| false),
            None,
            "a left the window"
        );
    }

    /// A grant from approving one rule's hold answers that rule only:
    /// another `require_approval` rule that fires still holds the call.
    #[test]
    fn an_approval_of_one_rule_leaves_the_other_rules_in_force() {
        let r = Rules::new(&Anomaly {
            rate: Some(RateRule {
                calls: 1,
                seconds: 10,
                action: AnomalyAction::RequireApproval,
            }),
            new_tool: Some(AnomalyAction::RequireApproval),
            ..Anomaly::default()
        });
        let mut w = Watch::default();
        r.record_call(&mut w, "a", Timestamp(0));
        let fired = r
            .check_call(&w, "a", Timestamp(1), true, |rule| rule == "rate")
            .unwrap();
        assert_eq!(
            (fired.rule, fired.action),
            ("new_tool", AnomalyAction::RequireApproval)
        );
        let fired = r
            .check_call(&w, "a", Timestamp(1), true, |rule| rule == "new_tool")
            .unwrap();
        assert_eq!(fired.rule, "rate");
        assert_eq!(
            r.check_call(&w, "a", Timestamp(1), true, |_| true),
            None,
            "both answered"
        );
    }

    #[test]
    fn new_tool_needs_approval_unless_approved() {
        let r = rules();
        let w = Watch::default();
        let fired = r
            .check_call(&w, "a", Timestamp(0), true, |_| false)
            .unwrap();
        assert_eq!(
            (fired.rule, fired.action),
            ("new_tool", AnomalyAction::RequireApproval)
        );
        assert_eq!(r.check_call(&w, "a", Timestamp(0), true, |_| true), None);
        assert_eq!(r.check_call(&w, "a", Timestamp(0), false, |_| false), None);
    }

    #[test]
    fn denials_fire_once_at_the_threshold() {
        let r = rules();
        let mut w = Watch::default();
        assert_eq!(r.record_denial(&mut w), None);
        assert_eq!(r.record_denial(&mut w).unwrap().rule, "denials");
        assert_eq!(r.record_denial(&mut w), None);
        assert_eq!(w.denials, 3);
    }

    /// Regression (the call path's cost): the windows were a list of every
    /// allowed call of the longest window (up to 4,096 stamps with their
    /// tool names), rewritten into the task record with every call. The
    /// counters stay the same size however many calls are made.
    #[test]
    fn the_windows_stay_the_same_size_however_many_calls() {
        let r = Rules::new(&Anomaly {
            rate: Some(RateRule {
                calls: 1_000_000,
                seconds: 3600,
                action: AnomalyAction::Deny,
            }),
            distinct_tools: Some(WindowRule {
                count: 1_000,
                seconds: 3600,
                action: AnomalyAction::Deny,
            }),
            ..Anomaly::default()
        });
        let mut w = Watch::default();
        for i in 0..100_000u64 {
            r.record_call(&mut w, ["a", "b", "c"][(i % 3) as usize], Timestamp(i * 97));
        }
        assert!(
            w.calls.counts.len() as u64 <= SLOTS + 1,
            "{}",
            w.calls.counts.len()
        );
        assert_eq!(w.last_use.len(), 3);
        assert!(serde_json::to_string(&w).unwrap().len() < 600);
        // Every call of the last hour is still counted.
        let now = Timestamp(99_999 * 97);
        let exact = (0..100_000u64)
            .filter(|i| i * 97 + 3_600_000 > now.0)
            .count() as u64;
        assert!(w.calls.count(now, 3_600_000) >= exact);
        assert_eq!(Rules::default().horizon_ms, 0);
    }

    /// Task records written before the counters list their recent calls;
    /// those calls still count, and the next allowed call folds them into
    /// the counters.
    #[test]
    fn a_task_record_with_the_old_list_of_calls_is_still_counted() {
        let r = rules();
        let old = r#"{"recent":[{"at":1000,"tool":"a"},{"at":1001,"tool":"b"},{"at":1002,"tool":"a"},{"at":1003,"tool":"a"}],"denials":1}"#;
        let mut w: Watch = serde_json::from_str(old).unwrap();
        let fired = r
            .check_call(&w, "a", Timestamp(1_004), false, |_| false)
            .unwrap();
        assert_eq!(fired.rule, "rate");
        let fired = r
            .check_call(&w, "c", Timestamp(20_000), false, |_| false)
            .unwrap();
        assert_eq!(fired.rule, "distinct_tools");
        r.record_call(&mut w, "a", Timestamp(1_004));
        assert!(w.recent.is_empty());
        assert_eq!(w.calls.count(Timestamp(1_004), 10_000), 5);
        assert_eq!(w.last_use.len(), 2);
        assert_eq!(w.denials, 1);
        let text = serde_json::to_string(&w).unwrap();
        assert!(!text.contains("recent"), "{text}");
    }

    /// A configuration reload that changes the window re-slots the counts
    /// without dating any call earlier than it was.
    #[test]
    fn a_new_window_never_forgets_a_counted_call() {
        let mut slots = Slots::default();
        for at in [0u64, 400, 900, 1_300, 5_000] {
            slots.add(Timestamp(at), 125, 1);
        }
        assert_eq!(slots.count(Timestamp(5_000), 4_000), 2);
        slots.add(Timestamp(5_001), 313, 1);
        assert_eq!(slots.width_ms, 313);
        // Only the calls of the old window were kept (33 slots of 125 ms),
        // and each of them still counts in the new one.
        assert_eq!(slots.count(Timestamp(5_001), 10_000), 3);
        assert_eq!(slots.count(Timestamp(5_001), 4_000), 3);
    }
}

#[cfg(test)]
mod model {
    //! The windowed rules against a naive model that keeps every call:
    //! `distinct_tools` exactly, `rate` within one slot, never late.
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use portcullis_config::{RateRule, WindowRule};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn rules_never_fire_later_than_a_model_that_forgets_nothing(
            calls in 1u64..6,
            distinct in 2u64..5,
            seconds in 1u64..5,
            steps in proptest::collection::vec((0u64..1500, 0usize..4), 1..80),
        ) {
            let rules = Rules::new(&Anomaly {
                rate: Some(RateRule { calls, seconds, action: AnomalyAction::Deny }),
                distinct_tools: Some(WindowRule { count: distinct, seconds, action: AnomalyAction::Deny }),
                ..Anomaly::default()
            });
            let window = seconds * 1000;
            let width = window.div_ceil(SLOTS);
            let mut watch = Watch::default();
            let mut history: Vec<(u64, usize)> = Vec::new();
            let mut now = 0u64;
            for (dt, tool) in steps {
                now += dt;
                let name = format!("t{tool}");
                let recent: Vec<&(u64, usize)> = history.iter().filter(|(at, _)| at + window > now).collect();
                let mut tools: BTreeSet<usize> = recent.iter().map(|(_, t)| *t).collect();
                tools.insert(tool);
                let too_many_tools = tools.len() as u64 >= distinct;
                // The rate rule fires no later than an exact count, and
                // no earlier than a count over the window plus one slot.
                let exact = recent.len() as u64 >= calls || too_many_tools;
                let widened = history.iter().filter(|(at, _)| at + window + width > now).count() as u64;
                let loose = widened >= calls || too_many_tools;
                let fired = rules.check_call(&watch, &name, Timestamp(now), false, |_| false);
                if exact {
                    prop_assert!(fired.is_some(), "under-counted at {} tool {}", now, tool);
                }
                if fired.is_some() {
                    prop_assert!(loose, "fired more than a slot early at {} tool {}", now, tool);
                }
                if fired.is_none() {
                    rules.record_call(&mut watch, &name, Timestamp(now));
                    history.push((now, tool));
                }
            }
        }
    }
}
