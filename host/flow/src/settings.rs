//! The flow worker's settings ([`FlowArgs`], flags of `braid node start`)
//! and what they make: the runtime's limits and the worker's config.

use crate::WorkerConfig;
use braid_runtime::{Limits, RuntimeConfig};
use std::path::Path;
use std::time::Duration;

/// Settings of the flow worker and the flows it runs.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct FlowArgs {
    /// Flows kept live (with a wasm instance) at once; the rest are
    /// evicted and resumed by replay.
    #[arg(long, env = "BRAID_MAX_LIVE_FLOWS", default_value_t = 2000)]
    pub max_live_flows: usize,
    /// Linear-memory cap per flow, MiB.
    #[arg(long, env = "BRAID_FLOW_MEMORY_MIB", default_value_t = 64)]
    pub flow_memory_mib: usize,
    /// CPU time one flow instance may use, ms.
    #[arg(long, env = "BRAID_FLOW_CPU_MS", default_value_t = 10_000)]
    pub flow_cpu_ms: u64,
    /// Wasm stack limit per flow, KiB.
    #[arg(long, env = "BRAID_FLOW_STACK_KIB", default_value_t = 512)]
    pub flow_stack_kib: usize,
    /// Messages a flow may send without suspending.
    #[arg(
        long,
        env = "BRAID_MAX_OUTBOUND_PER_CHECKPOINT",
        default_value_t = 10_000
    )]
    pub max_outbound_per_checkpoint: usize,
    /// How long a flow's `receive` waits before the session times out, ms.
    #[arg(long, env = "BRAID_SESSION_TIMEOUT_MS", default_value_t = 600_000)]
    pub session_timeout_ms: u64,
    /// Host calls (braid's and WASI's) a flow may make without suspending;
    /// beyond, it fails with HOST_CALL_LIMIT.
    #[arg(
        long,
        env = "BRAID_MAX_HOST_CALLS_PER_CHECKPOINT",
        default_value_t = 1_000_000
    )]
    pub max_host_calls_per_checkpoint: usize,
    /// Largest journal a flow may build up, MiB; beyond, it fails with
    /// JOURNAL_LIMIT.
    #[arg(long, env = "BRAID_FLOW_JOURNAL_MIB", default_value_t = 256)]
    pub flow_journal_mib: usize,
    /// Largest JSON result a flow may return, bytes (stored and served as
    /// is); a larger one fails the flow with RESULT_LIMIT.
    #[arg(long, env = "BRAID_MAX_RESULT_BYTES", default_value_t = 1 << 20)]
    pub max_result_bytes: usize,
    /// Longest failure text kept for a flow, bytes; longer ones are cut
    /// (saying so).
    #[arg(long, env = "BRAID_MAX_ERROR_BYTES", default_value_t = 4096)]
    pub max_error_bytes: usize,
    /// Log text one flow may write per second, bytes (bursts up to four
    /// times that); lines beyond are dropped and counted in the log.
    #[arg(long, env = "BRAID_FLOW_LOG_BYTES_PER_SEC", default_value_t = 16 << 10)]
    pub flow_log_bytes_per_sec: usize,
    /// How long finished flows (status, result, journal) are kept before
    /// they are deleted, seconds (default: 7 days).
    #[arg(long, env = "BRAID_FLOW_RETENTION_SECS", default_value_t = 7 * 86_400)]
    pub flow_retention_secs: u64,
    /// Status changes kept for event streams: how far a stream's client may
    /// fall behind (or how old a Last-Event-ID it may resume from) before
    /// it gets a `resync` event. About 300 bytes each, 16 MiB at most.
    #[arg(long, env = "BRAID_STATUS_EVENTS", default_value_t = braid_api::events::DEFAULT_CAPACITY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub status_events: usize,
}

impl Default for FlowArgs {
    /// The flags' defaults.
    fn default() -> Self {
        braid_types::settings::defaults()
    }
}

impl FlowArgs {
    /// The runtime these settings ask for, caching compiled packages in
    /// `cache_dir`.
    pub fn runtime_config(&self, cache_dir: &Path) -> RuntimeConfig {
        RuntimeConfig {
            limits: Limits {
                memory_bytes: self.flow_memory_mib << 20,
                stack_bytes: self.flow_stack_kib << 10,
                cpu_budget: Duration::from_millis(self.flow_cpu_ms),
                max_outbound_per_checkpoint: self.max_outbound_per_checkpoint,
                max_host_calls_per_checkpoint: self.max_host_calls_per_checkpoint,
                max_journal_bytes: self.flow_journal_mib << 20,
                max_result_bytes: self.max_result_bytes,
                max_error_bytes: self.max_error_bytes.max(64),
                log_bytes_per_sec: self.flow_log_bytes_per_sec,
                session_timeout: Duration::from_millis(self.session_timeout_ms),
                ..Limits::default()
            },
            max_instances: (self.max_live_flows + 64) as u32,
            cache_dir: cache_dir.to_path_buf(),
        }
    }

    /// The worker's config in application network `group`, keeping
    /// messages that came before their session-init for `early_message_ttl`
    /// (the senders' message TTL).
    pub fn worker_config(&self, group: &str, early_message_ttl: Duration) -> WorkerConfig {
        WorkerConfig {
            max_live_flows: self.max_live_flows,
            group: group.to_string(),
            retention: Duration::from_secs(self.flow_retention_secs),
            status_events: self.status_events,
            early_message_ttl,
        }
    }
}
