//! Rate-limited log lines, for events that anyone on the network can cause
//! (failed TLS handshakes, refused connections, timeouts): a flood of bad
//! clients must not become a flood of log lines.
//!
//! A [`LogLimiter`] lets through at most `lines` lines per `interval` for
//! each key (one key per kind of event) and counts the rest. The line it
//! lets through next says how many were suppressed, and the last line
//! before it starts suppressing says that it does, so the log never hides
//! that something was left out:
//!
//! ```
//! # use braid_types::log_limit::LogLimiter;
//! # use std::time::Duration;
//! static LIMIT: LogLimiter = LogLimiter::new(10, Duration::from_secs(60));
//! # let peer = "192.0.2.1:4000";
//! if let Some(note) = LIMIT.allow("handshake_failed") {
//!     eprintln!("TLS handshake with {peer} failed{note}");
//! }
//! ```

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets through at most `lines` log lines per `interval` per key.
///
/// Keys are `&'static str` on purpose: one per kind of event, so the
/// limiter's memory is bounded by the program text, whatever clients do
/// (a key per peer address would grow with the attacker's address space).
#[derive(Debug)]
pub struct LogLimiter {
    lines: u32,
    interval: Duration,
    windows: Mutex<Vec<(&'static str, Window)>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// A line may be logged; its [`Display`](fmt::Display) is the note to
/// append to the line (empty when there is nothing to say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "log the line, with this note appended"]
pub struct Allowed {
    /// How many lines of this key were suppressed since the last one let
    /// through.
    pub suppressed: u64,
    /// Whether this is the last line let through in the current interval
    /// (the next ones will be suppressed until it ends).
    pub last: bool,
    interval: Duration,
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.suppressed > 0 {
            write!(
                f,
                " ({} similar lines suppressed before this one)",
                self.suppressed
            )?;
        }
        if self.last {
            write!(
                f,
                " (further similar lines suppressed for up to {} s)",
                self.interval.as_secs().max(1)
            )?;
        }
        Ok(())
    }
}

impl LogLimiter {
    /// At most `lines` lines (at least 1) per `interval` per key.
    pub const fn new(lines: u32, interval: Duration) -> LogLimiter {
        LogLimiter {
            lines: if lines == 0 { 1 } else { lines },
            interval,
            windows: Mutex::new(Vec::new()),
        }
    }

    /// Whether a line of kind `key` may be logged now: `Some(note)` to log
    /// it (with the note appended), `None` to drop it (it is counted).
    pub fn allow(&self, key: &'static str) -> Option<Allowed> {
        self.allow_at(key, Instant::now())
    }

    /// [`LogLimiter::allow`] at the instant `now` (for tests).
    pub fn allow_at(&self, key: &'static str, now: Instant) -> Option<Allowed> {
        // A poisoned lock only means another thread panicked while
        // counting; the counts are still usable.
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let i = match windows.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                windows.push((
                    key,
                    Window {
                        start: now,
                        logged: 0,
                        suppressed: 0,
                    },
                ));
                windows.len() - 1
            }
        };
        let w = &mut windows[i].1;
        if now.saturating_duration_since(w.start) >= self.interval {
            w.start = now;
            w.logged = 0;
        }
        if w.logged >= self.lines {
            w.suppressed += 1;
            return None;
        }
        w.logged += 1;
        let suppressed = std::mem::take(&mut w.suppressed);
        Some(Allowed {
            suppressed,
            last: w.logged == self.lines,
            interval: self.interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn lets_n_lines_per_interval_per_key_through_and_reports_the_rest() {
        let limit = LogLimiter::new(3, MIN);
        let t0 = Instant::now();
        let first: Vec<_> = (0..3).map(|_| limit.allow_at("a", t0)).collect();
        assert!(first.iter().all(Option::is_some));
        assert_eq!(first[0].unwrap().suppressed, 0);
        assert!(!first[1].unwrap().last);
        assert!(
            first[2].unwrap().last,
            "the third line says more are dropped"
        );
        assert!(
            first[2]
                .unwrap()
                .to_string()
                .contains("suppressed for up to 60 s")
        );
        // Over the limit: dropped and counted, whatever the number.
        for _ in 0..1000 {
            assert_eq!(limit.allow_at("a", t0 + Duration::from_secs(59)), None);
        }
        // Another key has its own budget.
        assert!(limit.allow_at("b", t0).is_some());
        // The next interval: the first line reports what was dropped, once.
        let next = limit.allow_at("a", t0 + MIN).expect("a new interval");
        assert_eq!(next.suppressed, 1000);
        assert!(!next.last);
        assert!(next.to_string().contains("1000 similar lines suppressed"));
        let after = limit.allow_at("a", t0 + MIN).expect("second line");
        assert_eq!(after.suppressed, 0);
        assert_eq!(after.to_string(), "");
    }

    #[test]
    fn a_zero_budget_still_lets_one_line_through() {
        let limit = LogLimiter::new(0, MIN);
        let t0 = Instant::now();
        assert!(limit.allow_at("a", t0).is_some_and(|a| a.last));
        assert_eq!(limit.allow_at("a", t0), None);
    }

    #[test]
    fn time_going_backwards_does_not_reset_or_panic() {
        let limit = LogLimiter::new(1, MIN);
        let t0 = Instant::now() + MIN;
        assert!(limit.allow_at("a", t0).is_some());
        assert_eq!(limit.allow_at("a", t0 - Duration::from_secs(30)), None);
    }
}
