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

struct Pair {
    node: node::Node,
    alice: HoldingId,
}

async fn pair(dir: &Path, wasm: &Path, max_live: usize, store: &str) -> anyhow::Result<Pair> {
    let mut args = NodeArgs::local(dir.to_path_buf());
    args.max_live_flows = max_live;
    args.store = store.to_string();
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
    let events = p.node.worker.events();
    let mut watch = events.watch();
    let mut cursor = events.latest();
    let mut ready: std::collections::VecDeque<std::sync::Arc<braid_flow::StatusChange>> =
        Default::default();
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
        let Some(rec) = ready.pop_front() else {
            watch.borrow_and_update();
            let r = events.read(cursor, 4096, |_| true);
            anyhow::ensure!(
                !r.gap,
                "benchmark fell behind the status changes; lower --in-flight"
            );
            cursor = r.cursor;
            if r.events.is_empty() {
                watch.changed().await?;
            }
            ready.extend(r.events.into_iter().map(|e| e.change));
            continue;
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
        early.insert(rec.flow, now);
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
            .unfinished_of(&bob)
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

/// Resident memory of process `pid`, bytes (`VmRSS`).
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Soak figures: a `braid node start` child driven over its REST API
/// (HTTPS), completions counted from its status stream; after each point
/// N of `points` finished pings, the child's resident memory and CPU time,
/// then a graceful stop and a timed restart on the same data.
async fn soak(
    dir: &Path,
    wasm: &Path,
    points: &[usize],
    in_flight: usize,
) -> anyhow::Result<serde_json::Value> {
    let (dir, wasm, points) = (dir.to_path_buf(), wasm.to_path_buf(), points.to_vec());
    tokio::task::spawn_blocking(move || soak_over_rest(&dir, &wasm, &points, in_flight.max(1)))
        .await?
}

const SOAK_PASSWORD: &str = "bench-password";

/// A `braid node start` child on `dir`.
struct ChildNode {
    child: std::process::Child,
    url: String,
    /// From spawning until its health check answered.
    startup: Duration,
}

impl ChildNode {
    fn start(dir: &Path) -> anyhow::Result<ChildNode> {
        Self::start_with(dir, &[])
    }

    /// A node with extra `braid node start` arguments.
    fn start_with(dir: &Path, extra: &[String]) -> anyhow::Result<ChildNode> {
        let exe = std::env::current_exe()?;
        let _ = std::fs::remove_file(dir.join("rest.url"));
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))?;
        let t0 = Instant::now();
        let mut child = std::process::Command::new(&exe)
            .args(["node", "start", "--data-dir"])
            .arg(dir)
            .args(["--rest-addr", "127.0.0.1:0"])
            .args(extra)
            .env("BRAID_ADMIN_PASSWORD", SOAK_PASSWORD)
            .stderr(log)
            .spawn()?;
        let url = loop {
            if let Ok(u) = std::fs::read_to_string(dir.join("rest.url")) {
                break u.trim().to_string();
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("the node exited ({status}); see {}/node.log", dir.display());
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(120),
                "the node did not start; see {}/node.log",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let c = soak_client(&url, dir)?;
        while c.get("/api/v1/health").is_err() {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(ChildNode {
            child,
            url,
            startup: t0.elapsed(),
        })
    }

    /// SIGTERM, and wait for it to exit.
    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let status = self.child.wait()?;
        anyhow::ensure!(
            status.success(),
            "the node exited with {status} after SIGTERM"
        );
        Ok(())
    }
}

/// Pings through a cluster: `workers` flow workers and one REST worker as
/// children on `store` and `bus`.
fn cluster_over_rest(
    dir: &Path,
    wasm: &Path,
    workers: usize,
    flows: usize,
    in_flight: usize,
    store: &str,
    bus: &str,
) -> anyhow::Result<serde_json::Value> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    anyhow::ensure!(
        store.starts_with("postgres"),
        "--cluster needs --store postgres://... (an empty database the workers share)"
    );
    let common = |roles: &str| -> Vec<String> {
        [
            "--roles",
            roles,
            "--store",
            store,
            "--bus",
            bus,
            "--topic-prefix",
            &format!("bench-{}.", std::process::id()),
            "--flow-partitions",
            "8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let exe = std::env::current_exe()?;
    let mut flow = Vec::new();
    for i in 0..workers {
        let d = dir.join(format!("flow-{i}"));
        std::fs::create_dir_all(&d)?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(d.join("node.log"))?;
        flow.push(
            std::process::Command::new(&exe)
                .args(["node", "start", "--data-dir"])
                .arg(&d)
                .args(common("flow"))
                .stderr(log)
                .spawn()?,
        );
    }
    let rest_dir = dir.join("rest");
    let rest = ChildNode::start_with(&rest_dir, &common("rest"))?;
    let alice = ping_vnodes(&soak_client(&rest.url, &rest_dir)?, wasm)?;
    // Start and end times by client request id; ends counted.
    let started: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let ends: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let (ended, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    {
        let (c, alice) = (soak_client(&rest.url, &rest_dir)?, alice.clone());
        let (ended, failed, ends) = (ended.clone(), failed.clone(), ends.clone());
        std::thread::spawn(move || count_ends(&c, &alice, &ended, &failed, Some(&ends)));
    }
    let warmup = 200.min(flows);
    let run = |prefix: &str, from: usize, to: usize| -> anyhow::Result<Duration> {
        let t = Instant::now();
        submit_pings(
            &rest.url,
            &rest_dir,
            &alice,
            prefix,
            from..to,
            in_flight,
            &ended,
            Some(&started),
        )?;
        await_ends(&ended, to, t)?;
        Ok(t.elapsed())
    };
    run("warmup-", 0, warmup)?;
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds_of(*p)).sum::<f64>();
    let flow_pids: Vec<u32> = flow.iter().map(std::process::Child::id).collect();
    let (rest_cpu0, flow_cpu0) = (cpu(&[rest.child.id()]), cpu(&flow_pids));
    let wall = run("bench-", warmup, warmup + flows)?;
    let (rest_cpu, flow_cpu) = (
        cpu(&[rest.child.id()]) - rest_cpu0,
        cpu(&flow_pids) - flow_cpu0,
    );
    let (starts, ends) = (
        started.lock().expect("starts").clone(),
        ends.lock().expect("ends").clone(),
    );
    let mut lat: Vec<f64> = starts
        .iter()
        .filter(|(k, _)| k.starts_with("bench-"))
        .filter_map(|(id, t0)| ends.get(id).map(|t1| t1.saturating_duration_since(*t0)))
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    let failed = failed.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} pings did not complete");
    rest.stop()?;
    for mut f in flow {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(f.id() as libc::pid_t, libc::SIGTERM);
        }
        f.wait()?;
    }
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let per_ping = |s: f64| (s / flows as f64 * 1e6).round() / 1e3;
    Ok(serde_json::json!({
        "mode": "cluster",
        "flowWorkers": workers,
        "flows": flows,
        "inFlight": in_flight,
        "completedFlowsPerSec": (flows as f64 / wall.as_secs_f64()).round(),
        "latencyMs": {"p50": round2(percentile(&lat, 0.5)), "p99": round2(percentile(&lat, 0.99))},
        "cpuMsPerPing": {"rest": per_ping(rest_cpu), "flowWorkers": per_ping(flow_cpu)},
    }))
}

fn soak_client(url: &str, dir: &Path) -> anyhow::Result<crate::client::Client> {
    crate::client::Client::new(
        url.to_string(),
        Some(&dir.join("tls/ca.pem")),
        "admin".into(),
        SOAK_PASSWORD.into(),
    )
}

/// User + system CPU time of process `pid`, from /proc/<pid>/stat.
fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Uploads the ping package and creates Alice and Bob; returns Alice's
/// holding id.
fn ping_vnodes(c: &crate::client::Client, wasm: &Path) -> anyhow::Result<String> {
    let pkg = c.post_bytes("/api/v1/package", "application/wasm", std::fs::read(wasm)?)?;
    let checksum = pkg["checksum"].as_str().context("checksum")?.to_string();
    let mut alice = String::new();
    for name in [ALICE, BOB] {
        let v = c.post(
            "/api/v1/virtualnode",
            &serde_json::json!({"x500Name": name, "packageChecksum": checksum}),
        )?;
        if name == ALICE {
            alice = v["holdingId"].as_str().context("holdingId")?.to_string();
        }
    }
    Ok(alice)
}

/// Starts pings `PREFIXi` for every `i` of `range` from a few threads
/// (each request waits for its answer), keeping ping `i` back until no
/// more than `in_flight` before it are unfinished (`ended` counts every
/// end so far); notes each start time in `started` when given.
#[allow(clippy::too_many_arguments)]
fn submit_pings(
    url: &str,
    dir: &Path,
    alice: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    in_flight: usize,
    ended: &Arc<std::sync::atomic::AtomicUsize>,
    started: Option<&Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>>,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = Arc::new(AtomicUsize::new(range.start));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (next, ended, started) = (next.clone(), ended.clone(), started.cloned());
            let (c, alice, prefix, end) = (
                soak_client(url, dir),
                alice.to_string(),
                prefix.to_string(),
                range.end,
            );
            std::thread::spawn(move || -> anyhow::Result<()> {
                let c = c?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        return Ok(());
                    }
                    while i >= ended.load(Ordering::Relaxed) + in_flight {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    let id = format!("{prefix}{i}");
                    if let Some(s) = &started {
                        s.lock()
                            .expect("start times")
                            .insert(id.clone(), Instant::now());
                    }
                    c.post(
                        &format!("/api/v1/flow/{alice}"),
                        &serde_json::json!({
                            "clientRequestId": id,
                            "flowName": "ping",
                            "requestBody": {"counterparty": BOB, "n": i, "delayMs": 0},
                        }),
                    )?;
                }
            })
        })
        .collect();
    for th in threads {
        th.join()
            .map_err(|_| anyhow::anyhow!("a submitting thread panicked"))??;
    }
    Ok(())
}

/// Waits until `ended` reaches `n` (30 minutes at most from `since`).
fn await_ends(
    ended: &std::sync::atomic::AtomicUsize,
    n: usize,
    since: Instant,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    while ended.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(1800),
            "only {} of {n} pings ended",
            ended.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Counts Alice's pings that ended, from her vnode's status stream (a
/// `resync` recounts from the listing).
fn count_ends(
    c: &crate::client::Client,
    alice: &str,
    ended: &std::sync::atomic::AtomicUsize,
    failed: &std::sync::atomic::AtomicUsize,
    end_times: Option<&std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    let path = format!("/api/v1/flow/{alice}/events");
    for ev in c.events(&path, None, Duration::from_secs(3600))? {
        let ev = match ev {
            Ok(e) => e,
            // The node stopped: the stream ends.
            Err(_) => return Ok(()),
        };
        match ev.event.as_str() {
            "status" => {
                let v: serde_json::Value = serde_json::from_str(&ev.data)?;
                let st = v["status"].as_str().unwrap_or_default();
                if let (Some(id), true) = (
                    v["clientRequestId"].as_str(),
                    ["COMPLETED", "FAILED", "KILLED"].contains(&st),
                ) {
                    if let Some(t) = end_times {
                        t.lock()
                            .expect("end times")
                            .insert(id.to_string(), Instant::now());
                    }
                    ended.fetch_add(1, Ordering::Relaxed);
                    if st != "COMPLETED" {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            "resync" => {
                let mut n = 0;
                for status in ["COMPLETED", "FAILED", "KILLED"] {
                    let all =
                        c.get_all(&format!("/api/v1/flow/{alice}?status={status}"), "flows")?;
                    n += all["flows"].as_array().map_or(0, Vec::len);
                }
                ended.store(n, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    Ok(())
}

fn soak_over_rest(
    dir: &Path,
    wasm: &Path,
    points: &[usize],
    in_flight: usize,
) -> anyhow::Result<serde_json::Value> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut node = ChildNode::start(dir)?;
    let alice = ping_vnodes(&soak_client(&node.url, dir)?, wasm)?;
    let ended = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut out = Vec::new();
    let mut submitted = 0usize;
    for &n in points {
        anyhow::ensure!(
            n > submitted,
            "--soak takes growing numbers of pings, e.g. --soak 2000,20000 (got {points:?})"
        );
        // A fresh stream per run of the node (it ends when the node stops).
        let watcher = {
            let (c, alice, ended, failed) = (
                soak_client(&node.url, dir)?,
                alice.clone(),
                ended.clone(),
                failed.clone(),
            );
            std::thread::spawn(move || count_ends(&c, &alice, &ended, &failed, None))
        };
        let pid = node.child.id();
        let cpu0 = cpu_seconds_of(pid);
        let t = Instant::now();
        submit_pings(
            &node.url,
            dir,
            &alice,
            "soak-",
            submitted..n,
            in_flight,
            &ended,
            None,
        )?;
        await_ends(&ended, n, t)?;
        let wall = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds_of(pid) - cpu0;
        let pings = n - submitted;
        submitted = n;
        let rss = rss_of(pid);
        eprintln!("soak: {n} pings finished, node resident {} MiB", rss >> 20);
        node.stop()?;
        watcher
            .join()
            .map_err(|_| anyhow::anyhow!("the stream reader panicked"))??;
        node = ChildNode::start(dir)?;
        let restart_rss = rss_of(node.child.id());
        eprintln!(
            "soak: restarted after {n} pings: answering in {} ms, resident {} MiB",
            node.startup.as_millis(),
            restart_rss >> 20
        );
        out.push(serde_json::json!({
            "finishedPings": n,
            "finishedFlows": 2 * n,
            "nodeRssBytes": rss,
            "pingsPerSec": (pings as f64 / wall).round(),
            "nodeCpuSecondsPerPing": (cpu / pings as f64 * 1e6).round() / 1e6,
            "restart": {"startupMs": node.startup.as_millis(), "nodeRssBytes": restart_rss},
            "storeFileBytes": std::fs::metadata(dir.join("braid.redb")).map(|m| m.len()).unwrap_or(0),
        }));
    }
    node.stop()?;
    anyhow::ensure!(
        failed.load(Ordering::Relaxed) == 0,
        "{} pings did not complete",
        failed.load(Ordering::Relaxed)
    );
    Ok(serde_json::json!({
        "mode": "soak",
        "inFlight": in_flight,
        "points": out,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    }))
}

/// The sum over `nodes` of the counters named `names`, from their
/// Prometheus text.
fn counters(nodes: &[&node::Node], names: &[&str]) -> Vec<u64> {
    let mut sums = vec![0; names.len()];
    for n in nodes {
        let mut text = String::new();
        n.worker.render_metrics(&mut text);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            if let Some(i) = names.iter().position(|n| *n == name) {
                sums[i] += value.parse::<u64>().unwrap_or(0);
            }
        }
    }
    sums
}

/// Completed responder flows on `node`.
async fn completed_flows(node: &node::Node, holding: &HoldingId) -> anyhow::Result<usize> {
    Ok(node
        .worker
        .count_flows(holding, FlowStatus::Completed)
        .await?)
}

/// Cross-node figures: a 2-node network with mutual TLS on loopback, Alice
/// on node 1 pinging Bob on node 2.
async fn between_nodes(
    dir: &Path,
    wasm: &Path,
    flows: usize,
    in_flight: usize,
) -> anyhow::Result<serde_json::Value> {
    const WARMUP: usize = 200;
    let (net, mut nodes) = crate::network::start_local_network(dir, &["n1", "n2"]).await?;
    let mutual_tls = net.nodes.iter().all(|n| n.config.mutual_tls);
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let bytes = std::fs::read(wasm)?;
    let (pkg, _) = n1.worker.upload_package(bytes.clone()).await?;
    let alice = n1.worker.create_vnode(ALICE.parse()?, pkg.checksum).await?;
    let (pkg, _) = n2.worker.upload_package(bytes).await?;
    let bob = n2.worker.create_vnode(BOB.parse()?, pkg.checksum).await?;

    // Both nodes must know both vnodes before the first ping.
    let want: Vec<X500Name> = vec![ALICE.parse()?, BOB.parse()?];
    let t = Instant::now();
    loop {
        let known = |n: &node::Node| {
            let members: Vec<X500Name> = n
                .worker
                .network()
                .map(|net| net.summary().members)
                .unwrap_or_default()
                .iter()
                .filter_map(|m| m.name.parse().ok())
                .collect();
            want.iter().all(|w| members.contains(w))
        };
        if known(n1) && known(n2) {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the two nodes did not learn each other's vnodes within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let membership_ms = t.elapsed().as_millis();
    eprintln!("membership converged in {membership_ms} ms");

    let p = Pair {
        node: nodes.remove(0),
        alice: alice.holding,
    };
    let n2 = &nodes[0];
    // The warm-up also opens the link sessions (handshakes).
    run_pings(&p, "warmup", WARMUP.min(flows), in_flight).await?;
    let settled = WARMUP.min(flows);
    wait_responders(n2, &bob.holding, settled).await?;

    const NAMES: [&str; 5] = [
        "braid_link_messages_delivered_total",
        "braid_link_messages_acked_total",
        "braid_gateway_requests_sent_total",
        "braid_gateway_packets_sent_total",
        "braid_link_packets_rejected_total",
    ];
    let before = counters(&[&p.node, n2], &NAMES);
    let cpu_before = cpu_seconds();
    let t0 = Instant::now();
    let (wall, mut lat) = run_pings(&p, "bench", flows, in_flight).await?;
    // The initiators are done; the closes may still be on their way.
    wait_responders(n2, &bob.holding, settled + flows).await?;
    let all_done = t0.elapsed();
    let cpu = cpu_seconds() - cpu_before;
    let after = counters(&[&p.node, n2], &NAMES);
    let d: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    lat.sort_by(f64::total_cmp);
    let per_sec = flows as f64 / wall.as_secs_f64();
    eprintln!("between nodes: {per_sec:.0} pings/s");
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    Ok(serde_json::json!({
        "mode": "betweenNodes",
        "flows": flows,
        "inFlight": in_flight,
        "mutualTls": mutual_tls,
        "seconds": round2(wall.as_secs_f64()),
        "completedFlowsPerSec": per_sec.round(),
        "latencyMs": {"p50": round2(percentile(&lat, 0.5)), "p99": round2(percentile(&lat, 0.99))},
        // Counted by the receiving link managers (each message once, after
        // de-duplication), over the time until every responder completed.
        "crossNodeMessagesDelivered": d[0],
        "crossNodeMessagesAcked": d[1],
        "secondsUntilRespondersCompleted": round2(all_done.as_secs_f64()),
        "crossNodeMessagesPerSec": (d[0] as f64 / all_done.as_secs_f64()).round(),
        "gatewayPostsSent": d[2],
        "gatewayPacketsSent": d[3],
        "gatewayPostsPerSec": (d[2] as f64 / all_done.as_secs_f64()).round(),
        "gatewayPacketsPerPost": round2(d[3] as f64 / d[2].max(1) as f64),
        "packetsRejected": d[4],
        "processCpuSecondsPerPing": (cpu / flows as f64 * 1e6).round() / 1e6,
        "membershipConvergedMs": membership_ms,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    }))
}

/// Waits until `count` responder flows of `bob` completed.
async fn wait_responders(n: &node::Node, bob: &HoldingId, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = completed_flows(n, bob).await?;
        if done >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {count} responders completed on the second node within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
    while rest_count(&http, &base, password, &bob, None).await? < count {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill()?;
    child.wait()?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let t0 = Instant::now();
    let mut child = spawn(dir)?;
    let base = url(dir).await?;
    let started = t0.elapsed();
    while rest_count(&http, &base, password, &alice, Some("COMPLETED")).await? < count {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = t0.elapsed();
    child.kill()?;
    child.wait()?;
    Ok(
        serde_json::json!({"flows": count, "restartToListeningMs": started.as_millis(), "restartToAllCompletedMs": total.as_millis()}),
    )
}

/// How many flows of `holding` (with `status`, when given) the node at
/// `base` lists, following the pages.
async fn rest_count(
    http: &reqwest::Client,
    base: &str,
    password: &str,
    holding: &str,
    status: Option<&str>,
) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut q: Vec<(&str, String)> = vec![("limit", "1000".into())];
        if let Some(s) = status {
            q.push(("status", s.into()));
        }
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page: serde_json::Value = http
            .get(format!("{base}/api/v1/flow/{holding}"))
            .query(&q)
            .basic_auth("admin", Some(password))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        n += page["flows"].as_array().map_or(0, Vec::len);
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(n),
        }
    }
}
