//! `braid bench`: ping flows between two vnodes of one embedded node, with
//! durable checkpoints, printed as one JSON line.
//!
//! - throughput and start-to-completion latency: `--flows` pings with no
//!   delay, at most `--in-flight` started and unfinished at once;
//! - resident memory per suspended flow, live (every flow keeps its
//!   instance) and evicted (a live budget of 16): `--suspended` pings whose
//!   responders sleep, RSS before and after divided by the flows created;
//! - recovery: a `braid node start` child with `--recover` pings whose
//!   responders sleep 1 s is SIGKILLed and restarted; the time from the
//!   restart until every flow completed.
//!
//! With `--network`, instead: ping flows between two nodes of one
//! application network in this process (Alice on the first, Bob on the
//! second), every message through the link manager and the gateways (HTTPS
//! with mutual TLS) on loopback.

use crate::node::{self, NodeArgs};
use anyhow::Context as _;
use braid_types::{ClientRequestId, FlowId, FlowStatus, HoldingId, X500Name};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod children;
mod embedded;

use children::*;
use embedded::*;

/// Benchmark settings.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Ping flows for the throughput and latency figures.
    #[arg(long, default_value_t = 5000)]
    pub flows: usize,
    /// Flows started and not yet finished at once.
    #[arg(long, default_value_t = 1000)]
    pub in_flight: usize,
    /// Suspended ping flows for the memory figures.
    #[arg(long, default_value_t = 1000)]
    pub suspended: usize,
    /// Suspended ping flows for the recovery figure (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub recover: usize,
    /// Working directory (default: a fresh temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Measure pings between two nodes of a network (bootstrapped in the
    /// working directory, mutual TLS) instead of within one node: `--flows`
    /// pings, at most `--in-flight` unfinished.
    #[arg(long)]
    pub network: bool,
    /// Soak mode instead: a `braid node start` child driven over HTTPS
    /// runs pings until N1, N2, ... of them have finished (e.g.
    /// `--soak 2000,20000`, at most `--in-flight` unfinished); after each
    /// point it prints the node's resident memory and CPU time per ping,
    /// stops it with SIGTERM and times a restart on the same data.
    #[arg(long, value_delimiter = ',')]
    pub soak: Option<Vec<usize>>,
    /// The store of the throughput figure's node: `embedded`, or an empty
    /// PostgreSQL database (`postgres://...`). The memory and recovery
    /// figures always use the embedded store.
    #[arg(long, default_value = "embedded")]
    pub store: String,
    /// Cluster mode instead: N flow workers and one REST worker, each a
    /// `braid node start` child, on `--store postgres://...` (an empty
    /// database) and `--bus kafka://...`; `--flows` pings driven over
    /// HTTPS, at most `--in-flight` unfinished, latency from each start to
    /// its end on the REST worker's status stream.
    #[arg(long, requires = "bus")]
    pub cluster: Option<usize>,
    /// The Kafka bus of `--cluster`.
    #[arg(long)]
    pub bus: Option<String>,
}

const ALICE: &str = "O=Alice, L=London, C=GB";
const BOB: &str = "O=Bob, L=New York, C=US";

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn body(n: usize, delay_ms: u64) -> String {
    serde_json::json!({"counterparty": BOB, "n": n, "delayMs": delay_ms}).to_string()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark and prints one JSON line.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("braid-bench-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let wasm = crate::package::build(&crate::examples_dir().join("ping"), &dir.join("ping.wasm"))?;
    if args.network {
        let out = between_nodes(&dir.join("network"), &wasm, args.flows, args.in_flight).await?;
        println!("{out}");
        return Ok(());
    }
    if let (Some(workers), Some(bus)) = (args.cluster, &args.bus) {
        let (dir, wasm, store, bus) = (
            dir.join("cluster"),
            wasm.clone(),
            args.store.clone(),
            bus.clone(),
        );
        let (flows, in_flight) = (args.flows, args.in_flight.max(1));
        let out = tokio::task::spawn_blocking(move || {
            cluster_over_rest(&dir, &wasm, workers.max(1), flows, in_flight, &store, &bus)
        })
        .await??;
        println!("{out}");
        return Ok(());
    }
    if let Some(points) = &args.soak {
        let out = soak(&dir.join("soak"), &wasm, points, args.in_flight).await?;
        println!("{out}");
        return Ok(());
    }

    // Throughput and latency.
    let p = pair(&dir.join("throughput"), &wasm, 2000, &args.store).await?;
    run_pings(&p, "warmup", 200.min(args.flows), args.in_flight).await?;
    let (wall, mut lat) = run_pings(&p, "bench", args.flows, args.in_flight).await?;
    lat.sort_by(f64::total_cmp);
    let per_sec = args.flows as f64 / wall.as_secs_f64();
    eprintln!("throughput: {per_sec:.0} flows/s");

    // Memory per suspended flow, live: every flow keeps its instance.
    let before = rss_bytes();
    suspend_pings(&p, "live", args.suspended).await?;
    let live_per_flow = rss_bytes().saturating_sub(before) as f64 / (2 * args.suspended) as f64;
    eprintln!("live suspended: {live_per_flow:.0} B/flow");

    // Memory per suspended flow, evicted: 16 instances for all of them.
    let e = pair(&dir.join("evicted"), &wasm, 16, "embedded").await?;
    run_pings(&e, "warmup", 100, 16).await?;
    let before = rss_bytes();
    suspend_pings(&e, "evicted", args.suspended).await?;
    let evicted_per_flow = rss_bytes().saturating_sub(before) as f64 / (2 * args.suspended) as f64;
    eprintln!("evicted suspended: {evicted_per_flow:.0} B/flow");

    let recovery = if args.recover > 0 {
        Some(recovery(&dir.join("recovery"), &wasm, args.recover).await?)
    } else {
        None
    };
    let out = serde_json::json!({
        "flows": args.flows,
        "inFlight": args.in_flight,
        "completedFlowsPerSec": per_sec.round(),
        "latencyMs": {"p50": percentile(&lat, 0.5), "p99": percentile(&lat, 0.99)},
        "suspendedFlows": 2 * args.suspended,
        "rssBytesPerSuspendedFlow": {"live": live_per_flow.round(), "evicted": evicted_per_flow.round()},
        "recovery": recovery,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    println!("{out}");
    Ok(())
}

/// User + system CPU time of this process, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}
