//! Storage faults on real nodes: a disk that fills up and frees again, a
//! damaged database file, and stops by signal.
//!
//! The disk-full test mounts a small tmpfs for the node's data directory,
//! so it needs root or CAP_SYS_ADMIN (as the tests have here and in CI).
//! Where that is not granted but user namespaces are, run the suite as
//! `unshare -rm cargo test -p braid-e2e ...`. Without either, it fails
//! saying so; it never skips.

use std::fs;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use braid_e2e::{ADMIN_PASSWORD, ADMIN_USER, Api, Node, Pkg, braid_bin, fresh_dir, wait_until};
use serde_json::{Value, json};

use crate::{ALICE, BOB, assert_ping_ok, assert_pings_ok, ping_body, start_pings};

/// What a node logs when it opens a store that was not closed cleanly.
const REPAIR_LINE: &str = "not closed cleanly";

// ---------------------------------------------------------------------------
// A small filesystem to fill
// ---------------------------------------------------------------------------

/// A tmpfs of a few MiB mounted on a fresh directory; unmounted (and the
/// directory removed) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(prefix: &str, size_mib: u64) -> Tmpfs {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = fresh_dir(prefix);
        let target = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("no NUL in path");
        let data = std::ffi::CString::new(format!("size={size_mib}m,mode=0755")).expect("no NUL");
        // SAFETY: mount(2) with valid NUL-terminated strings.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = fs::remove_dir(&dir);
            panic!(
                "this test fills a {size_mib} MiB tmpfs mounted at {}, and mounting it failed: \
                 {e}. It needs root or CAP_SYS_ADMIN (in a container: --cap-add SYS_ADMIN), or \
                 run the tests in a user and mount namespace: `unshare -rm cargo test -p \
                 braid-e2e -- storage_faults`",
                dir.display()
            );
        }
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt as _;
        let target = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: umount2(2) with a valid NUL-terminated path. A lazy
        // unmount if something still holds it (a node that outlived us).
        #[allow(unsafe_code)]
        unsafe {
            if libc::umount2(target.as_ptr(), 0) != 0 {
                libc::umount2(target.as_ptr(), libc::MNT_DETACH);
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Writes a file in `dir` until the filesystem is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).expect("create the filler");
    for size in [1 << 20, 4096, 1] {
        let chunk = vec![0xA5u8; size];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::StorageFull => break,
                Err(e) => panic!("writing the filler: {e}"),
            }
        }
    }
    let _ = f.sync_all();
    path
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `GET /api/v1/health` (open to all); panics if it does not answer 200.
fn health(api: &Api) -> Value {
    let r = api
        .client()
        .get(api.url("/api/v1/health"))
        .send()
        .expect("health answers");
    let status = r.status().as_u16();
    let body: Value = r.json().expect("health is JSON");
    assert_eq!(
        status, 200,
        "health must answer 200 (it is liveness): {body}"
    );
    body
}

/// `GET /api/v1/health/ready` (open to all): status and body.
fn ready(api: &Api) -> (u16, Value) {
    let r = api
        .client()
        .get(api.url("/api/v1/health/ready"))
        .send()
        .expect("readiness answers");
    let status = r.status().as_u16();
    (status, r.json().expect("readiness is JSON"))
}

/// The log of the node's last run (the harness marks each start).
fn last_run_log(node: &Node) -> String {
    let text = node.log_text();
    let at = text
        .rfind("===== [e2e] starting braid node =====")
        .expect("the harness marks each start in the log");
    text[at..].to_string()
}

#[track_caller]
fn assert_no_panic(log: &str, what: &str) {
    for bad in ["panicked at", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(
            !log.contains(bad),
            "{what}: the node panicked ({bad:?}):\n{log}"
        );
    }
}

/// Waits until every ping in `ids` completed and checks each result.
fn assert_all_pings_complete(api: &Api, alice: &str, ids: &[String]) {
    let flows = api.wait_all_terminal(alice, ids, Duration::from_secs(60));
    assert_pings_ok(&flows, ids, BOB);
}

// ---------------------------------------------------------------------------
// 1. Disk full, then space returns
// ---------------------------------------------------------------------------

#[test]
fn a_full_disk_refuses_writes_and_the_store_recovers_by_itself_when_space_returns() {
    // The log lives elsewhere, so that what the node says while its disk
    // is full is kept and checked.
    disk_full(true);
}

#[test]
fn a_full_disk_that_also_holds_the_log_does_not_bring_the_node_down() {
    // Writing the log fails too while the disk is full: the node must not
    // care.
    disk_full(false);
}

fn disk_full(log_elsewhere: bool) {
    let disk = Tmpfs::mount("disk-full", 48);
    let log_dir = fresh_dir("disk-full-log");
    let data = disk.path().join("node");
    fs::create_dir_all(&data).unwrap();
    if log_elsewhere {
        std::os::unix::fs::symlink(log_dir.join("braid.log"), data.join("braid.log")).unwrap();
    }
    let mut node = Node::options().data_dir(data).start();
    let api = node.api().clone();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    api.start_flow(&alice, "warm", "ping", &ping_body(BOB, 1, 0));
    assert_ping_ok(&api.wait_terminal(&alice, "warm"), 1, BOB);
    assert_eq!(health(&api)["status"], "UP");

    // In flight across the outage: their responders wake up and answer
    // while the disk is full.
    let before = start_pings(&api, &alice, BOB, "before", 5, 1500);
    let log_before = node.log_text().len();

    let filler = fill(disk.path());
    // Small flows may still fit in pages the file already has: each is
    // accepted (202) or refused (503), nothing else.
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..5 {
        let id = format!("full-{i}");
        let r = api
            .try_start_flow(&alice, &id, "ping", &ping_body(BOB, i, 0))
            .expect("the node answers while its disk is full");
        match r.status {
            202 => accepted.push(id),
            503 => {
                assert_eq!(r.json["code"], "STORE_UNAVAILABLE", "{}", r.text);
                refused = Some((id, ping_body(BOB, i, 0)));
                break;
            }
            other => panic!("start flow on a full disk: HTTP {other}: {}", r.text),
        }
    }
    // Flows whose records need new pages (a large request body): the
    // store must write, and at some point cannot.
    let pad = "p".repeat(200 << 10);
    for i in 5..300 {
        if refused.is_some() {
            break;
        }
        let id = format!("full-{i}");
        let mut body = ping_body(BOB, i, 0);
        body["pad"] = json!(pad);
        let r = api
            .try_start_flow(&alice, &id, "ping", &body)
            .expect("the node answers while its disk is full");
        match r.status {
            202 => accepted.push(id),
            503 => {
                assert_eq!(r.json["code"], "STORE_UNAVAILABLE", "{}", r.text);
                refused = Some((id, body));
            }
            other => panic!("start flow on a full disk: HTTP {other}: {}", r.text),
        }
    }
    let (refused_id, refused_body) =
        refused.expect("300 flows (of 200 KiB each) were all accepted on a full disk");
    eprintln!(
        "[e2e] {} flows accepted before the store refused",
        accepted.len()
    );

    // The node says so, and keeps saying so while the disk stays full.
    let h = health(&api);
    assert_eq!(
        h["status"], "DEGRADED",
        "health while the disk is full: {h}"
    );
    assert_eq!(h["ready"], false, "{h}");
    assert_eq!(h["store"]["status"], "FAILING", "{h}");
    let error = h["store"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("No space left on device"),
        "the store's error does not say the disk is full: {h}"
    );
    let (status, body) = ready(&api);
    assert_eq!(status, 503, "readiness while the disk is full: {body}");
    // Writes stay refused (no flapping) while the disk is full, even small
    // ones that would fit in pages the file already has.
    let r = api
        .try_start_flow(&alice, "small", "ping", &ping_body(BOB, 7, 0))
        .expect("the node answers");
    assert_eq!(r.status, 503, "a small write on a full disk: {}", r.text);
    assert_eq!(r.json["code"], "STORE_UNAVAILABLE", "{}", r.text);
    let message = r.json["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("No space left on device") && message.contains("retry"),
        "the refusal should say why and that a retry will do: {}",
        r.text
    );
    // The outage lasts a while (the flows in flight retry meanwhile, the
    // store retries): it stays failing all along.
    let full_since = Instant::now();
    while full_since.elapsed() < Duration::from_secs(3) {
        let h = health(&api);
        assert_eq!(
            h["store"]["status"], "FAILING",
            "the store said it works while the disk is still full: {h}"
        );
        std::thread::sleep(braid_e2e::POLL);
    }
    node.assert_running();

    // Space returns: the store comes back without a restart.
    fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    wait_until("health to be UP again", Duration::from_secs(20), || {
        let h = health(&api);
        if h["status"] == "UP" && h["store"]["status"] == "UP" && h["ready"] == true {
            Ok(())
        } else {
            Err(h.to_string())
        }
    });
    eprintln!(
        "[e2e] the store recovered {:?} after space returned",
        t.elapsed()
    );
    let (status, body) = ready(&api);
    assert_eq!(status, 200, "readiness after recovery: {body}");
    assert!(body["store"]["error"].is_null(), "{body}");

    // Nothing accepted is lost; what was refused can be sent again; new
    // flows run.
    assert_all_pings_complete(&api, &alice, &before);
    let flows = api.wait_all_terminal(&alice, &accepted, Duration::from_secs(60));
    for (st, id) in flows.iter().zip(&accepted) {
        let n: i64 = id.trim_start_matches("full-").parse().unwrap();
        assert_ping_ok(st, n, BOB);
    }
    for (id, body) in [
        (refused_id.as_str(), refused_body),
        ("small", ping_body(BOB, 7, 0)),
    ] {
        let r = api.try_start_flow(&alice, id, "ping", &body).unwrap();
        assert_eq!(
            r.status, 202,
            "a flow refused with 503 must not exist; sending it again: {}",
            r.text
        );
    }
    assert_ping_ok(&api.wait_terminal(&alice, "small"), 7, BOB);
    let st = api.wait_terminal(&alice, &refused_id);
    assert_eq!(st.status, "COMPLETED", "{}", st.describe());
    api.start_flow(&alice, "after", "ping", &ping_body(BOB, 9, 0));
    assert_ping_ok(&api.wait_terminal(&alice, "after"), 9, BOB);
    // Every responder finished too.
    api.wait_responders_terminal(
        &bob,
        accepted.len() + before.len() + 4,
        Duration::from_secs(60),
    );

    node.assert_running();
    let log = node.log_text();
    let outage = &log[log_before..];
    assert_no_panic(outage, "disk full");
    if !log_elsewhere {
        return;
    }
    // The failure is logged clearly, once, and without a flood.
    assert!(
        outage.contains("store write failed") && outage.contains("No space left on device"),
        "the node did not log the store's failure clearly:\n{outage}"
    );
    assert!(
        outage.contains("store recovered"),
        "the node did not log the recovery:\n{outage}"
    );
    eprintln!("[e2e] the log while the disk was full:\n{outage}");
    // The store says it once (and once more when it recovers), however
    // long the outage and however many flows retry.
    let store_lines: Vec<&str> = outage
        .lines()
        .filter(|l| l.contains("braid_storage"))
        .collect();
    assert!(
        store_lines.len() <= 3,
        "the store logged {} lines about one outage:\n{}",
        store_lines.len(),
        store_lines.join("\n")
    );
    // Each flow's retries back off: a few lines per flow, not one per try.
    let mut per_flow = std::collections::HashMap::<&str, usize>::new();
    for line in outage.lines() {
        if let Some(at) = line.find("flow_id") {
            let id = line[at..].split_whitespace().next().unwrap_or_default();
            *per_flow.entry(id).or_default() += 1;
        }
    }
    if let Some((id, n)) = per_flow.iter().max_by_key(|(_, n)| **n) {
        assert!(
            *n <= 12,
            "{id} was logged {n} times in a few seconds of full disk:\n{outage}"
        );
    }
    node.assert_running();
    drop(node);
    let _ = fs::remove_dir_all(&log_dir);
}

// ---------------------------------------------------------------------------
// 2. A damaged database file
// ---------------------------------------------------------------------------

/// Runs `braid node start` on `data_dir` until it exits (at most
/// `timeout`); returns its exit status and stderr.
fn start_until_exit(data_dir: &Path, timeout: Duration) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(braid_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BRAID_") {
            cmd.env_remove(key);
        }
    }
    let stderr = data_dir.join("stderr.txt");
    let mut child = cmd
        .args(["node", "start", "--rest-addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("BRAID_ADMIN_PASSWORD", ADMIN_PASSWORD)
        // A panic would print its backtrace: the test would see it.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn braid");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "braid node start on a damaged store still runs after {timeout:?}; stderr:\n{}",
                fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(braid_e2e::POLL);
    };
    (status, fs::read_to_string(&stderr).unwrap_or_default())
}

#[test]
fn a_damaged_database_file_stops_the_start_with_a_clear_error() {
    // A real store: vnodes, a package, a finished flow; closed cleanly.
    let mut node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    node.vnode(BOB, Pkg::Ping);
    let ids = start_pings(node.api(), &alice, BOB, "d", 3, 0);
    assert_all_pings_complete(node.api(), &alice, &ids);
    // (How it exits is the business of the signal tests below.)
    node.terminate(Duration::from_secs(20));
    let good = fs::read(node.data_dir().join("braid.redb")).expect("the store file");
    let len = good.len();
    assert!(len > 64 << 10, "the store is only {len} bytes");

    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = move |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut cases: Vec<(String, Vec<u8>)> = [0, 1, 100, 4096, 5000, len / 2, len - 1]
        .into_iter()
        .map(|at| (format!("cut to {at} bytes"), good[..at].to_vec()))
        .collect();
    let mut zeroed = good.clone();
    zeroed[..4096].fill(0);
    cases.push(("zeroed header".into(), zeroed));
    let mut overwritten = good.clone();
    overwritten[..512].copy_from_slice(&random(512));
    cases.push(("random header".into(), overwritten));
    cases.push(("random bytes".into(), random(len)));
    cases.push((
        "a text file".into(),
        b"this is not a database\n".repeat(1000),
    ));
    let mut grown = good.clone();
    grown.extend_from_slice(&random(12345));
    cases.push(("random bytes appended".into(), grown));

    for (what, bytes) in cases {
        let dir = fresh_dir("damaged");
        let file = dir.join("braid.redb");
        fs::write(&file, &bytes).unwrap();
        let t = Instant::now();
        let (status, stderr) = start_until_exit(&dir, Duration::from_secs(15));
        let took = t.elapsed();
        assert!(
            !status.success(),
            "{what}: the node started on a damaged store:\n{stderr}"
        );
        assert!(
            status.code().is_some(),
            "{what}: killed by a signal ({status}), not an exit:\n{stderr}"
        );
        assert_no_panic(&stderr, &what);
        let file_name = file.display().to_string();
        for needle in [
            file_name.as_str(),
            "damaged",
            "restore it from a backup",
            "move it away",
        ] {
            assert!(
                stderr.contains(needle),
                "{what}: the error should say {needle:?}:\n{stderr}"
            );
        }
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        let _ = fs::remove_dir_all(&dir);
    }
}

// ---------------------------------------------------------------------------
// 3. Stopping by signal
// ---------------------------------------------------------------------------

/// A `POST` whose headers the server has taken (it answered
/// `100 Continue`) and whose body is sent only once the node logs that it
/// is stopping: the request is in flight across the SIGTERM.
fn request_across_the_stop(
    base: &str,
    log: PathBuf,
    path: String,
    body: Value,
    taken: mpsc::Sender<()>,
) -> std::io::Result<braid_e2e::Resp> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let authority = base
        .strip_prefix("https://")
        .expect("an https node")
        .to_string();
    let config = braid_e2e::tls_client_config(base);
    let body = serde_json::to_vec(&body).unwrap();
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN_USER}:{ADMIN_PASSWORD}"))
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&authority).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        tls.write_all(head.as_bytes()).await?;
        tls.flush().await?;
        // The handler reads the body: hyper says 100 Continue.
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed before 100 Continue"));
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let interim = String::from_utf8_lossy(&raw[..end]).to_string();
        if !interim.starts_with("HTTP/1.1 100") {
            return Err(std::io::Error::other(format!(
                "expected 100 Continue, got {interim:?}"
            )));
        }
        raw.drain(..end + 4);
        let _ = taken.send(());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("stopping gracefully")
        {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("the node never said it is stopping"));
            }
            tokio::time::sleep(braid_e2e::POLL).await;
        }
        tls.write_all(&body).await?;
        tls.flush().await?;
        loop {
            if let Some(resp) = braid_e2e::parse_complete_response(&raw) {
                return Ok(resp);
            }
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::other(format!(
                    "closed without an answer; got {:?}",
                    String::from_utf8_lossy(&raw)
                )));
            }
            raw.extend_from_slice(&buf[..n]);
        }
    })
}

#[test]
fn sigterm_stops_gracefully_and_the_next_start_needs_no_repair_unlike_after_sigkill() {
    const N: usize = 20;
    let mut node = Node::start();
    let api = node.api().clone();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    // Suspended at the stop: every responder sleeps.
    let ids = start_pings(&api, &alice, BOB, "t", N, 3000);
    api.wait_responders(&bob, N, Duration::from_secs(60));

    let (taken_tx, taken) = mpsc::channel();
    let client = {
        let base = api.base().to_string();
        let log = node.log_path();
        let path = format!("/api/v1/flow/{alice}");
        let body = json!({
            "clientRequestId": "in-flight",
            "flowName": "ping",
            "requestBody": ping_body(BOB, 40, 0),
        });
        std::thread::spawn(move || request_across_the_stop(&base, log, path, body, taken_tx))
    };
    let completed = api
        .list_flows(&alice)
        .iter()
        .filter(|f| f.status == "COMPLETED")
        .count();
    assert!(
        completed < N,
        "every ping completed before the stop: it proves nothing"
    );
    if taken.recv_timeout(Duration::from_secs(30)).is_err() {
        panic!("the in-flight request never started: {:?}", client.join());
    }

    let t = Instant::now();
    let status = node.terminate(Duration::from_secs(15));
    let took = t.elapsed();
    let resp = client
        .join()
        .unwrap()
        .expect("the request in flight at SIGTERM gets its answer");
    assert_eq!(resp.status, 202, "in-flight start: {}", resp.text);
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");
    assert!(took < Duration::from_secs(10), "the stop took {took:?}");
    let log = last_run_log(&node);
    assert!(
        log.contains("stopped cleanly"),
        "no \"stopped cleanly\" line:\n{log}"
    );
    assert_no_panic(&log, "SIGTERM");
    let stopping = &log[log.find("stopping gracefully").expect("logged")..];
    let warnings: Vec<&str> = stopping.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warnings.len() <= 2,
        "a graceful stop should not warn about each flow:\n{}",
        warnings.join("\n")
    );

    node.start_again();
    let api = node.api().clone();
    let log = last_run_log(&node);
    assert!(
        !log.contains(REPAIR_LINE),
        "the start after SIGTERM repaired the store (the stop was not clean):\n{log}"
    );
    // Suspended flows resume and complete, and so does the one accepted
    // while stopping.
    assert_all_pings_complete(&api, &alice, &ids);
    assert_ping_ok(&api.wait_terminal(&alice, "in-flight"), 40, BOB);

    // The check can fail: after SIGKILL the store needs a repair.
    node.restart();
    let api = node.api().clone();
    let log = last_run_log(&node);
    assert!(
        log.contains(REPAIR_LINE),
        "the start after SIGKILL did not repair the store, so the check above proves \
         nothing:\n{log}"
    );
    assert_all_pings_complete(&api, &alice, &ids);
}

#[test]
fn sigint_stops_gracefully_too() {
    let mut node = Node::start();
    let api = node.api().clone();
    let alice = node.vnode(ALICE, Pkg::Ping);
    node.vnode(BOB, Pkg::Ping);
    let ids = start_pings(&api, &alice, BOB, "i", 5, 2000);
    let status = node.stop_with(libc::SIGINT, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "exit after SIGINT: {status}");
    let log = last_run_log(&node);
    assert!(log.contains("stopped cleanly"), "{log}");
    assert_no_panic(&log, "SIGINT");
    node.start_again();
    let api = node.api().clone();
    let log = last_run_log(&node);
    assert!(!log.contains(REPAIR_LINE), "repaired after SIGINT:\n{log}");
    assert_all_pings_complete(&api, &alice, &ids);
}
