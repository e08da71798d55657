//! Prometheus counters of the gateway, in the text exposition format.
//!
//! Kept deliberately small and lock-free: one atomic per series, the series
//! known up front (decisions by outcome and reason, tokens by event).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use portcullis_core::Reason;

/// The gateway's counters.
#[derive(Debug)]
pub struct Metrics {
    allowed: AtomicU64,
    denied: [AtomicU64; Reason::ALL.len()],
    issued: AtomicU64,
    refreshed: AtomicU64,
    revoked: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            allowed: AtomicU64::new(0),
            denied: std::array::from_fn(|_| AtomicU64::new(0)),
            issued: AtomicU64::new(0),
            refreshed: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
        }
    }
}

/// A token lifecycle event.
#[derive(Debug, Clone, Copy)]
pub enum TokenEvent {
    /// Minted.
    Issued,
    /// Rotated through a refresh.
    Refreshed,
    /// Revoked.
    Revoked,
}

impl Metrics {
    /// Counts a decision.
    pub fn decision(&self, reason: Option<Reason>) {
        match reason {
            None => {
                self.allowed.fetch_add(1, Ordering::Relaxed);
            }
            Some(r) => {
                if let Some(i) = Reason::ALL.iter().position(|x| *x == r)
                    && let Some(c) = self.denied.get(i)
                {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Counts token events.
    pub fn tokens(&self, event: TokenEvent, n: u64) {
        let c = match event {
            TokenEvent::Issued => &self.issued,
            TokenEvent::Refreshed => &self.refreshed,
            TokenEvent::Revoked => &self.revoked,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP portcullis_decisions_total Tool-call decisions by outcome and reason.\n",
        );
        out.push_str("# TYPE portcullis_decisions_total counter\n");
        let _ = writeln!(
            out,
            "portcullis_decisions_total{{decision=\"allow\",reason=\"\"}} {}",
            self.allowed.load(Ordering::Relaxed)
        );
        for (r, c) in Reason::ALL.iter().zip(&self.denied) {
            let _ = writeln!(
                out,
                "portcullis_decisions_total{{decision=\"deny\",reason=\"{}\"}} {}",
                r.as_str(),
                c.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP portcullis_tokens_total Token lifecycle events.\n");
        out.push_str("# TYPE portcullis_tokens_total counter\n");
        for (name, c) in [
            ("issued", &self.issued),
            ("refreshed", &self.refreshed),
            ("revoked", &self.revoked),
        ] {
            let _ = writeln!(
                out,
                "portcullis_tokens_total{{event=\"{name}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        out
    }
}
