//! Figures of `braid node start` children driven over their REST API
//! (HTTPS): the soak, cluster mode, and the counts they read.

use super::*;

/// Resident memory of process `pid`, bytes (`VmRSS`).
pub(super) fn rss_of(pid: u32) -> u64 {
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
pub(super) async fn soak(
    dir: &Path,
    wasm: &Path,
    points: &[usize],
    in_flight: usize,
) -> anyhow::Result<serde_json::Value> {
    let (dir, wasm, points) = (dir.to_path_buf(), wasm.to_path_buf(), points.to_vec());
    tokio::task::spawn_blocking(move || soak_over_rest(&dir, &wasm, &points, in_flight.max(1)))
        .await?
}

pub(super) const SOAK_PASSWORD: &str = "bench-password";

/// A `braid node start` child on `dir`.
pub(super) struct ChildNode {
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
pub(super) fn cluster_over_rest(
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

pub(super) fn soak_client(url: &str, dir: &Path) -> anyhow::Result<crate::client::Client> {
    crate::client::Client::new(
        url.to_string(),
        Some(&dir.join("tls/ca.pem")),
        "admin".into(),
        SOAK_PASSWORD.into(),
    )
}

/// User + system CPU time of process `pid`, from /proc/<pid>/stat.
pub(super) fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Uploads the ping package and creates Alice and Bob; returns Alice's
/// holding id.
pub(super) fn ping_vnodes(c: &crate::client::Client, wasm: &Path) -> anyhow::Result<String> {
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
pub(super) fn submit_pings(
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
pub(super) fn await_ends(
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
pub(super) fn count_ends(
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

pub(super) fn soak_over_rest(
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

/// How many flows of `holding` (with `status`, when given) the node at
/// `base` lists, following the pages.
pub(super) async fn rest_count(
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
