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
//! The state is a [`Watch`] kept *in the task* — the allowed calls of the
//! longest window (at most [`MAX_RECENT`]) and the denial count — so it is
//! written in the same compare-and-swap as the call itself: a restart
//! neither forgets nor double-counts, and two racing calls cannot both slip
//! under a threshold.

use std::collections::BTreeSet;

use portcullis_config::{Anomaly, AnomalyAction};
use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Most recent calls a task remembers for the windowed rules.
pub const MAX_RECENT: usize = 4096;

/// One allowed call, as the windowed rules see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// When.
    pub at: Timestamp,
    /// Which tool.
    pub tool: String,
}

/// What the anomaly rules remember of one task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    /// Allowed calls within the longest window, oldest first.
    #[serde(default)]
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
        let n = in_window(watch, now, window).count() as u64;
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
        tools.insert(tool);
        (tools.len() as u64 >= r.count).then(|| Fired {
            rule: "distinct_tools",
            action: r.action,
            detail: format!("{} distinct tools within {} s", tools.len(), r.seconds),
        })
    }

    /// Records an allowed call.
    pub fn record_call(&self, watch: &mut Watch, tool: &str, now: Timestamp) {
        if self.horizon_ms == 0 {
            watch.recent.clear();
            return;
        }
        let horizon = self.horizon_ms;
        watch
            .recent
            .retain(|s| s.at.0.saturating_add(horizon) > now.0);
        if watch.recent.len() >= MAX_RECENT {
            watch.recent.remove(0);
        }
        watch.recent.push(Stamp {
            at: now,
            tool: tool.to_owned(),
        });
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
        // Ten seconds after the first call, one slot frees.
        assert_eq!(
            r.check_call(&w, "a", Timestamp(11_000), false, |_| false),
            None
        );
        assert!(
            r.check_call(&w, "a", Timestamp(10_999), false, |_| false)
                .is_some()
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

    #[test]
    fn memory_is_bounded() {
        let r = Rules::new(&Anomaly {
            rate: Some(RateRule {
                calls: 1_000_000,
                seconds: 3600,
                action: AnomalyAction::Deny,
            }),
            ..Anomaly::default()
        });
        let mut w = Watch::default();
        for i in 0..(MAX_RECENT as u64 + 10) {
            r.record_call(&mut w, "a", Timestamp(i));
        }
        assert_eq!(w.recent.len(), MAX_RECENT);
        assert_eq!(Rules::default().horizon_ms, 0);
    }
}

#[cfg(test)]
mod model {
    //! The windowed rules against a naive model that keeps every call.
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use portcullis_config::{RateRule, WindowRule};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn rules_agree_with_a_model_that_forgets_nothing(
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
            let mut watch = Watch::default();
            let mut history: Vec<(u64, usize)> = Vec::new();
            let mut now = 0u64;
            for (dt, tool) in steps {
                now += dt;
                let name = format!("t{tool}");
                let recent: Vec<&(u64, usize)> = history.iter().filter(|(at, _)| at + window > now).collect();
                let mut tools: BTreeSet<usize> = recent.iter().map(|(_, t)| *t).collect();
                tools.insert(tool);
                let model_denies = recent.len() as u64 >= calls || tools.len() as u64 >= distinct;
                let fired = rules.check_call(&watch, &name, Timestamp(now), false, |_| false);
                prop_assert_eq!(fired.is_some(), model_denies, "at {} tool {}", now, tool);
                if fired.is_none() {
                    rules.record_call(&mut watch, &name, Timestamp(now));
                    history.push((now, tool));
                }
            }
        }
    }
}
