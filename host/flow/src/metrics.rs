//! Counters and histograms for `GET /metrics` (Prometheus text format).

use braid_types::HoldingId;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of histogram buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends the histogram in Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}\n{name}_count{braces} {cum}");
    }
}

/// What a flow did, for the per-vnode counters.
#[derive(Debug, Clone, Copy)]
pub enum FlowEvent {
    /// Created (client start or session-init).
    Started,
    /// Ended COMPLETED.
    Completed,
    /// Ended FAILED.
    Failed,
    /// Ended KILLED.
    Killed,
}

/// The flow worker's metrics.
#[derive(Default)]
pub struct Metrics {
    by_vnode: Mutex<BTreeMap<HoldingId, [u64; 4]>>,
    /// Checkpoint commit latency.
    pub checkpoint_commit: Histogram,
}

impl Metrics {
    /// Counts a flow event for a vnode.
    pub fn count(&self, holding: HoldingId, e: FlowEvent) {
        let mut m = self.by_vnode.lock().expect("metrics lock");
        m.entry(holding).or_default()[e as usize] += 1;
    }

    /// Appends the per-vnode counters and the checkpoint histogram.
    pub fn render(&self, out: &mut String) {
        let m = self.by_vnode.lock().expect("metrics lock");
        for (i, (name, help)) in [
            ("braid_flows_started_total", "Flows started, by vnode."),
            ("braid_flows_completed_total", "Flows completed, by vnode."),
            ("braid_flows_failed_total", "Flows failed, by vnode."),
            ("braid_flows_killed_total", "Flows killed, by vnode."),
        ]
        .iter()
        .enumerate()
        {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (h, c) in m.iter() {
                let _ = writeln!(out, "{name}{{holding_id=\"{h}\"}} {}", c[i]);
            }
        }
        drop(m);
        self.checkpoint_commit.render(
            out,
            "braid_checkpoint_commit_seconds",
            "Time to commit a flow checkpoint (journal, outbox, status).",
            "",
        );
    }
}
