//! Counters and histograms for `GET /metrics` (Prometheus text format).

use braid_types::HoldingId;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

pub use braid_api::Histogram;

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
