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

use crate::node::{self, NodeArgs};
use anyhow::Context as _;
use braid_types::{ClientRequestId, FlowId, FlowStatus, HoldingId, X500Name};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

struct Pair {
    node: node::Node,
    alice: HoldingId,
}

async fn pair(dir: &Path, wasm: &Path, max_live: usize) -> anyhow::Result<Pair> {
    let mut args = NodeArgs::local(dir.to_path_buf());
    args.max_live_flows = max_live;
    let node = node::start(&args).await?;
    let (pkg, _) = node.worker.upload_package(std::fs::read(wasm)?).await?;
    let a = node
        .worker
        .create_vnode(ALICE.parse()?, pkg.checksum)
        .await?;
    node.worker.create_vnode(BOB.parse()?, pkg.checksum).await?;
    Ok(Pair {
        node,
        alice: a.holding,
    })
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

/// Runs `count` pings with at most `in_flight` unfinished; returns the
/// wall time and each flow's start-to-completion latency.
async fn run_pings(
    p: &Pair,
    prefix: &str,
    count: usize,
    in_flight: usize,
) -> anyhow::Result<(Duration, Vec<f64>)> {
    let mut changes = p.node.worker.subscribe();
    let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let started: Arc<
        std::sync::Mutex<HashMap<FlowId, (Instant, tokio::sync::OwnedSemaphorePermit)>>,
    > = Arc::default();
    let t0 = Instant::now();
    let starter = {
        let worker = p.node.worker.clone();
        let (sem, started, alice, prefix) =
            (sem.clone(), started.clone(), p.alice, prefix.to_owned());
        tokio::spawn(async move {
            for i in 0..count {
                let permit = sem.clone().acquire_owned().await?;
                let crid: ClientRequestId = format!("{prefix}-{i}").parse()?;
                let (worker, started) = (worker.clone(), started.clone());
                // Starts run concurrently so their durable writes share commits.
                tokio::spawn(async move {
                    let t = Instant::now();
                    let rec = worker
                        .start_flow(alice, crid, "ping".into(), body(i, 0))
                        .await?;
                    started.lock().expect("lock").insert(rec.id, (t, permit));
                    anyhow::Ok(())
                });
            }
            anyhow::Ok(())
        })
    };
    let mut latencies = Vec::with_capacity(count);
    let mut early: HashMap<FlowId, Instant> = HashMap::new();
    while latencies.len() < count {
        let rec = match changes.recv().await {
            Ok(r) => r,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                anyhow::bail!("benchmark fell {n} status changes behind; lower --in-flight")
            }
            Err(e) => return Err(e.into()),
        };
        if rec.holding != p.alice || !rec.status.is_terminal() {
            continue;
        }
        anyhow::ensure!(
            rec.status == FlowStatus::Completed,
            "flow failed: {:?}",
            rec.error
        );
        let now = Instant::now();
        early.insert(rec.id, now);
        let mut s = started.lock().expect("lock");
        let done: Vec<FlowId> = early
            .keys()
            .filter(|id| s.contains_key(id))
            .copied()
            .collect();
        for id in done {
            let end = early.remove(&id).expect("present");
            let (t, _permit) = s.remove(&id).expect("present");
            latencies.push(end.duration_since(t).as_secs_f64() * 1000.0);
        }
    }
    starter.await??;
    Ok((t0.elapsed(), latencies))
}

/// Starts `count` pings whose responders sleep, and waits until every
/// responder is suspended in its sleep.
async fn suspend_pings(p: &Pair, prefix: &str, count: usize) -> anyhow::Result<()> {
    for i in 0..count {
        let crid: ClientRequestId = format!("{prefix}-{i}").parse()?;
        p.node
            .worker
            .start_flow(p.alice, crid, "ping".into(), body(i, 3_600_000))
            .await?;
    }
    let bob = HoldingId::derive(&BOB.parse::<X500Name>()?, "default");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let sleeping = p
            .node
            .worker
            .flows_of(&bob)
            .iter()
            .filter(|r| {
                r.wake_at_ms
                    .is_some_and(|w| w > braid_types::now_millis() + 3_000_000)
            })
            .count();
        if sleeping >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {sleeping} of {count} responders suspended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the benchmark and prints one JSON line.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("braid-bench-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let wasm = crate::package::build(&crate::examples_dir().join("ping"), &dir.join("ping.wasm"))?;

    // Throughput and latency.
    let p = pair(&dir.join("throughput"), &wasm, 2000).await?;
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
    let e = pair(&dir.join("evicted"), &wasm, 16).await?;
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

/// Child-process recovery: start suspended flows, SIGKILL, restart, time
/// until all complete.
async fn recovery(dir: &Path, wasm: &Path, count: usize) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let password = "bench-password";
    let spawn = |dir: &Path| -> anyhow::Result<std::process::Child> {
        let _ = std::fs::remove_file(dir.join("rest.url"));
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))?;
        Ok(std::process::Command::new(&exe)
            .args(["node", "start", "--data-dir"])
            .arg(dir)
            .args(["--rest-addr", "127.0.0.1:0"])
            .env("BRAID_ADMIN_PASSWORD", password)
            .stderr(log)
            .spawn()?)
    };
    async fn url(dir: &Path) -> anyhow::Result<String> {
        for _ in 0..3000 {
            if let Ok(u) = std::fs::read_to_string(dir.join("rest.url")) {
                return Ok(u);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("node did not start; see {}/node.log", dir.display())
    }
    let mut child = spawn(dir)?;
    let base = url(dir).await?;
    // The node made its development CA on this first start.
    let http = crate::client::async_client(&dir.join("tls/ca.pem"))?;
    let api = |u: &str, p: &str| format!("{u}/api/v1/{p}");
    let pkg: serde_json::Value = http
        .post(api(&base, "package"))
        .basic_auth("admin", Some(password))
        .body(std::fs::read(wasm)?)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut alice = String::new();
    for name in [ALICE, BOB] {
        let v: serde_json::Value = http
            .post(api(&base, "virtualnode"))
            .basic_auth("admin", Some(password))
            .json(&serde_json::json!({"x500Name": name, "packageChecksum": pkg["checksum"]}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if name == ALICE {
            alice = v["holdingId"].as_str().context("holdingId")?.to_owned();
        }
    }
    for i in 0..count {
        http.post(api(&base, &format!("flow/{alice}")))
            .basic_auth("admin", Some(password))
            .json(&serde_json::json!({"clientRequestId": format!("r{i}"), "flowName": "ping", "requestBody": {"counterparty": BOB, "n": i, "delayMs": 1000}}))
            .send()
            .await?
            .error_for_status()?;
    }
    // Kill once every initiator is durably RUNNING.
    let bob = HoldingId::derive(&BOB.parse::<X500Name>()?, "default").to_string();
    loop {
        let l: serde_json::Value = http
            .get(api(&base, &format!("flow/{bob}")))
            .basic_auth("admin", Some(password))
            .send()
            .await?
            .json()
            .await?;
        if l["flows"].as_array().map_or(0, |a| a.len()) >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill()?;
    child.wait()?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t0 = Instant::now();
    let mut child = spawn(dir)?;
    let base = url(dir).await?;
    let started = t0.elapsed();
    loop {
        let l: serde_json::Value = http
            .get(api(&base, &format!("flow/{alice}")))
            .basic_auth("admin", Some(password))
            .send()
            .await?
            .json()
            .await?;
        let done = l["flows"].as_array().map_or(0, |a| {
            a.iter().filter(|f| f["status"] == "COMPLETED").count()
        });
        if done >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = t0.elapsed();
    child.kill()?;
    child.wait()?;
    Ok(
        serde_json::json!({"flows": count, "restartToListeningMs": started.as_millis(), "restartToAllCompletedMs": total.as_millis()}),
    )
}
