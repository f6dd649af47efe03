//! Figures of nodes in this process: a pair of vnodes on one node
//! (throughput, memory, recovery) and two nodes of a network.

use super::*;

pub(super) struct Pair {
    node: node::Node,
    alice: HoldingId,
}

pub(super) async fn pair(
    dir: &Path,
    wasm: &Path,
    max_live: usize,
    store: &str,
) -> anyhow::Result<Pair> {
    let mut args = NodeArgs::local(dir.to_path_buf());
    args.flow.max_live_flows = max_live;
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

/// Runs `count` pings with at most `in_flight` unfinished; returns the
/// wall time and each flow's start-to-completion latency.
pub(super) async fn run_pings(
    p: &Pair,
    prefix: &str,
    count: usize,
    in_flight: usize,
) -> anyhow::Result<(Duration, Vec<f64>)> {
    let events = p.node.worker.events();
    let mut watch = events.watch();
    let mut cursor = events.latest();
    let mut ready: std::collections::VecDeque<std::sync::Arc<braid_api::StatusChange>> =
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
pub(super) async fn suspend_pings(p: &Pair, prefix: &str, count: usize) -> anyhow::Result<()> {
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

/// The sum over `nodes` of the counters named `names`, from their
/// Prometheus text.
pub(super) fn counters(nodes: &[&node::Node], names: &[&str]) -> Vec<u64> {
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
pub(super) async fn completed_flows(
    node: &node::Node,
    holding: &HoldingId,
) -> anyhow::Result<usize> {
    Ok(node
        .worker
        .count_flows(holding, FlowStatus::Completed)
        .await?)
}

/// Cross-node figures: a 2-node network with mutual TLS on loopback, Alice
/// on node 1 pinging Bob on node 2.
pub(super) async fn between_nodes(
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
pub(super) async fn wait_responders(
    n: &node::Node,
    bob: &HoldingId,
    count: usize,
) -> anyhow::Result<()> {
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

/// Child-process recovery: start suspended flows, SIGKILL, restart, time
/// until all complete.
pub(super) async fn recovery(
    dir: &Path,
    wasm: &Path,
    count: usize,
) -> anyhow::Result<serde_json::Value> {
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
