//! End-to-end test harness: starts the real `braid` binary and talks to it
//! over REST.
//!
//! The e2e test binary (`tests/e2e/main.rs`) uses this crate to
//! - locate the `braid` binary built by `cargo build -p braid-cli`
//!   ([`braid_bin`]),
//! - build the example flow packages once per test process with
//!   `braid package build` ([`package_bytes`]),
//! - run embedded nodes on a loopback port with a private data directory,
//!   kill them with SIGKILL and restart them on the same directory ([`Node`]),
//! - drive the REST API with a small blocking client ([`Api`]) over HTTPS,
//!   trusting the development CA each node makes under `DATA_DIR/tls/`
//!   ([`trust_ca`]),
//! - wait for conditions by polling with a deadline ([`wait_until`]).
//!
//! Nothing here sleeps to synchronise: every wait polls a condition and fails
//! with the last observed state when its deadline passes.

#![warn(missing_docs)]

pub mod balancer;
pub mod network;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

/// Password of the `admin` user of every node the tests start.
pub const ADMIN_PASSWORD: &str = "e2e-admin-password-0123";
/// Name of the admin user.
pub const ADMIN_USER: &str = "admin";

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(25);
/// Default deadline for a condition that should hold "soon".
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The statuses a flow can never leave.
pub const TERMINAL: [&str; 3] = ["COMPLETED", "FAILED", "KILLED"];
/// Every status the REST API may report.
pub const STATUSES: [&str; 5] = [
    "START_REQUESTED",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "KILLED",
];

// ---------------------------------------------------------------------------
// Locating things
// ---------------------------------------------------------------------------

/// The repository root.
pub fn repo_root() -> PathBuf {
    braid_testkit::repo_root()
}

/// The `braid` binary: `$BRAID_BIN`, else `<target>/debug/braid` next to
/// the running test executable (`<target>/debug/deps/e2e-…`).
pub fn braid_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = match std::env::var_os("BRAID_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let exe = std::env::current_exe().expect("current_exe");
                // …/debug/deps/e2e-xxxx → …/debug/braid
                let profile_dir = exe
                    .parent()
                    .and_then(Path::parent)
                    .expect("test executable lives in <target>/<profile>/deps");
                profile_dir.join(format!("braid{}", std::env::consts::EXE_SUFFIX))
            }
        };
        assert!(
            path.is_file(),
            "the braid binary is missing at {}: run `cargo build -p braid-cli` first \
             (or set BRAID_BIN)",
            path.display()
        );
        path
    })
    .clone()
}

/// Target directory for the nested wasm builds that `braid package build`
/// runs: `$BRAID_WASM_TARGET_DIR`, else `$HOME/.cache/braid/wasm-target`.
///
/// It must differ from the target directory of the `cargo test` that runs
/// us, whose build lock may still be held.
pub fn wasm_target_dir() -> PathBuf {
    braid_testkit::wasm_target_dir()
}

/// A fresh, empty directory under the system temp dir. The caller removes
/// it (see [`Node`]'s `Drop`).
pub fn fresh_dir(prefix: &str) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "braid-e2e-{prefix}-{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

// ---------------------------------------------------------------------------
// Example packages
// ---------------------------------------------------------------------------

/// The example flow packages under `examples-flows/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pkg {
    /// `examples-flows/ping`: flow `ping` and its responder.
    Ping,
    /// `examples-flows/ping-v2`: flow `ping`, with an extra `now` call.
    PingV2,
    /// `examples-flows/proposal`: flow `propose` with sub-flows.
    Proposal,
    /// `examples-flows/hostile`: flows that attack the sandbox.
    Hostile,
}

impl Pkg {
    /// Every package, in build order.
    pub const ALL: [Pkg; 4] = [Pkg::Ping, Pkg::PingV2, Pkg::Proposal, Pkg::Hostile];

    /// The crate directory name under `examples-flows/`.
    pub fn crate_dir(self) -> &'static str {
        match self {
            Pkg::Ping => "ping",
            Pkg::PingV2 => "ping-v2",
            Pkg::Proposal => "proposal",
            Pkg::Hostile => "hostile",
        }
    }
}

struct Built {
    bytes: Vec<(Pkg, Vec<u8>)>,
}

/// The bytes of the component for `pkg`, built (once per test process,
/// always freshly: cargo makes a rebuild cheap) with `braid package build`.
pub fn package_bytes(pkg: Pkg) -> Vec<u8> {
    static BUILT: OnceLock<Built> = OnceLock::new();
    let built = BUILT.get_or_init(build_packages);
    built
        .bytes
        .iter()
        .find(|(p, _)| *p == pkg)
        .map(|(_, bytes)| bytes.clone())
        .expect("every package is built")
}

/// The `hostile-describe` package built with `BRAID_HOSTILE_DESCRIBE` set
/// to `variant` (`sleep`, `spin`, `invalid`), built once per variant.
pub fn hostile_describe_bytes(variant: &str) -> Vec<u8> {
    static BUILT: OnceLock<std::sync::Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = built.get(variant) {
        return b.clone();
    }
    let out = fresh_dir("describe-package");
    let file = out.join(format!("hostile-describe-{variant}.wasm"));
    let crate_dir = repo_root().join("examples-flows/hostile-describe");
    let output = Command::new(braid_bin())
        .arg("package")
        .arg("build")
        .arg(&crate_dir)
        .arg("-o")
        .arg(&file)
        .env("CARGO_TARGET_DIR", wasm_target_dir())
        .env("BRAID_HOSTILE_DESCRIBE", variant)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", braid_bin().display()));
    assert!(
        output.status.success(),
        "building hostile-describe ({variant}) failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let _ = fs::remove_dir_all(&out);
    built.insert(variant.to_string(), bytes.clone());
    bytes
}

fn build_packages() -> Built {
    let bin = braid_bin();
    let out = fresh_dir("packages");
    let wasm_target = wasm_target_dir();
    let mut packages = Vec::new();
    for pkg in Pkg::ALL {
        let crate_dir = repo_root().join("examples-flows").join(pkg.crate_dir());
        let file = out.join(format!("{}.wasm", pkg.crate_dir()));
        let started = Instant::now();
        let output = Command::new(&bin)
            .arg("package")
            .arg("build")
            .arg(&crate_dir)
            .arg("-o")
            .arg(&file)
            .env("CARGO_TARGET_DIR", &wasm_target)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        assert!(
            output.status.success(),
            "`braid package build {} -o {}` failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            crate_dir.display(),
            file.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        let len = fs::metadata(&file)
            .unwrap_or_else(|e| panic!("package build wrote no {}: {e}", file.display()))
            .len();
        assert!(len > 8, "{} is empty", file.display());
        eprintln!(
            "[e2e] built {} ({len} bytes) in {:.1?}",
            file.display(),
            started.elapsed()
        );
        let bytes = fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        packages.push((pkg, bytes));
    }
    // Kept in memory, so nothing is left behind in the temp dir.
    let _ = fs::remove_dir_all(&out);
    Built { bytes: packages }
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `check` every [`POLL`] until it returns `Ok(value)`; panics after
/// `timeout` with `what` and the last `Err` state it returned.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(state) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last state: {state}");
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// The resident memory of process `pid` in KiB: `VmRSS` in
/// `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}: {status}"))
}

/// Options of `braid node start` beyond the data dir and REST address.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    args: Vec<String>,
    data_dir: Option<PathBuf>,
    /// The process serves no REST API (a cluster's flow worker).
    no_rest: bool,
}

impl NodeOptions {
    /// Extra command-line arguments.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
    /// Use `dir` as the data directory (default: a fresh one).
    pub fn data_dir(mut self, dir: PathBuf) -> Self {
        self.data_dir = Some(dir);
        self
    }
    fn flag(mut self, name: &str, value: u64) -> Self {
        self.args.push(name.to_string());
        self.args.push(value.to_string());
        self
    }
    /// `--max-live-flows N`
    pub fn max_live_flows(self, n: u64) -> Self {
        self.flag("--max-live-flows", n)
    }
    /// `--flow-memory-mib N`
    pub fn flow_memory_mib(self, n: u64) -> Self {
        self.flag("--flow-memory-mib", n)
    }
    /// `--flow-cpu-ms N`
    pub fn flow_cpu_ms(self, n: u64) -> Self {
        self.flag("--flow-cpu-ms", n)
    }
    /// `--flow-stack-kib N`
    pub fn flow_stack_kib(self, n: u64) -> Self {
        self.flag("--flow-stack-kib", n)
    }
    /// `--max-outbound-per-checkpoint N`
    pub fn max_outbound_per_checkpoint(self, n: u64) -> Self {
        self.flag("--max-outbound-per-checkpoint", n)
    }
    /// `--insecure-http`: plain HTTP (the node accepts it on loopback
    /// only).
    pub fn insecure_http(mut self) -> Self {
        self.args.push("--insecure-http".to_string());
        self
    }
    /// The process runs no REST API (`--roles flow` in a cluster): start
    /// waits for the worker's start line in its log instead.
    pub fn no_rest(mut self) -> Self {
        self.no_rest = true;
        self
    }
    /// Starts a node with these options.
    pub fn start(self) -> Node {
        Node::start_with(self)
    }
}

/// One embedded `braid node start` process with its own data directory.
///
/// `Drop` kills the process; the data directory is removed unless the
/// thread is panicking, in which case the log tail is printed and the
/// directory kept for inspection.
pub struct Node {
    data_dir: PathBuf,
    options: NodeOptions,
    child: Option<Child>,
    api: Api,
    /// Shared so that threads submitting requests can follow restarts.
    shared_url: Arc<RwLock<String>>,
}

impl Node {
    /// Starts a node with default options.
    pub fn start() -> Node {
        Self::start_with(NodeOptions::default())
    }

    /// Options to start a node with.
    pub fn options() -> NodeOptions {
        NodeOptions::default()
    }

    fn start_with(options: NodeOptions) -> Node {
        let data_dir = match &options.data_dir {
            Some(d) => {
                fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
                d.clone()
            }
            None => fresh_dir("node"),
        };
        let mut node = Node {
            data_dir,
            options,
            child: None,
            api: Api::new(String::new()),
            shared_url: Arc::new(RwLock::new(String::new())),
        };
        node.spawn();
        node
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file the node's stdout and stderr go to.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("braid.log")
    }

    /// The development CA's certificate, which clients trust:
    /// `DATA_DIR/tls/ca.pem`.
    pub fn ca_path(&self) -> PathBuf {
        self.data_dir.join("tls/ca.pem")
    }

    /// The REST client for the running process.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The current base URL, shared: it is updated on every restart.
    pub fn shared_url(&self) -> Arc<RwLock<String>> {
        self.shared_url.clone()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let url_file = self.data_dir.join("rest.url");
        // A stale file from the previous run would point at a dead port.
        match fs::remove_file(&url_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove {}: {e}", url_file.display()),
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open node log");
        let mut marker = log.try_clone().expect("clone log handle");
        let _ = writeln!(marker, "\n===== [e2e] starting braid node =====");
        let started = self
            .log_text()
            .matches("worker started (no REST API in this process)")
            .count();
        let mut cmd = Command::new(braid_bin());
        // Only the options the test asks for: no BRAID_* from the caller's
        // environment (they are clap fallbacks of the node's flags).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BRAID_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .arg("node")
            .arg("start")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--rest-addr")
            .arg("127.0.0.1:0")
            .args(&self.options.args)
            .env("BRAID_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", braid_bin().display()));
        self.child = Some(child);
        if self.options.no_rest {
            wait_until("the flow worker to start", Duration::from_secs(60), || {
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!(
                        "braid node exited while starting ({status}); log tail:\n{}",
                        self.log_tail(60)
                    );
                }
                if self
                    .log_text()
                    .matches("worker started (no REST API in this process)")
                    .count()
                    > started
                {
                    Ok(())
                } else {
                    Err("no start line in the log yet".to_string())
                }
            });
            return;
        }

        let url = wait_until(
            "the node to write rest.url",
            Duration::from_secs(60),
            || {
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!(
                        "braid node exited before writing rest.url ({status}); log tail:\n{}",
                        self.log_tail(60)
                    );
                }
                match fs::read_to_string(&url_file) {
                    Ok(s) if s.trim().starts_with("http") => Ok(s.trim().to_string()),
                    Ok(s) => Err(format!("rest.url holds {s:?}")),
                    Err(e) => Err(format!("{}: {e}", url_file.display())),
                }
            },
        );
        assert!(!url.ends_with('/'), "rest.url has a trailing slash: {url}");
        if url.starts_with("https://") {
            let ca = self.ca_path();
            let pem = fs::read(&ca).unwrap_or_else(|e| {
                panic!(
                    "the node serves HTTPS but {} is unreadable: {e}",
                    ca.display()
                )
            });
            trust_ca(&url, pem);
        }
        self.api = Api::new(url.clone());
        *self.shared_url.write().unwrap() = url;

        // The URL file is written once listening; make sure the API answers.
        let api = self.api.clone();
        wait_until(
            "the REST API to answer",
            Duration::from_secs(60),
            || match api.get("/api/v1/flow/000000000000") {
                Ok(resp) => Ok(resp),
                Err(e) => Err(e.to_string()),
            },
        );
    }

    /// SIGKILLs the process (std's `Child::kill` sends SIGKILL on Unix) and
    /// reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if let Ok(mut log) = OpenOptions::new().append(true).open(self.log_path()) {
                let _ = writeln!(log, "\n===== [e2e] SIGKILLed braid node =====");
            }
        }
    }

    /// Kills the process if it runs and starts it again on the same data
    /// directory; returns once the REST API answers.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts the process again after it stopped (see [`Node::terminate`]).
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the process to exit;
    /// returns its exit status. Panics if it does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.stop_with(libc::SIGTERM, timeout)
    }

    /// Sends `signal` (e.g. `libc::SIGINT`) and waits (up to `timeout`) for
    /// the process to exit; returns its exit status. Panics if it does not
    /// exit in time.
    pub fn stop_with(&mut self, signal: i32, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node running");
        // SAFETY: plain kill(2) on our own child's pid.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill(signal {signal}) failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait for node") {
                if let Ok(mut log) = OpenOptions::new().append(true).open(self.log_path()) {
                    let _ = writeln!(
                        log,
                        "\n===== [e2e] node exited after signal {signal}: {status} ====="
                    );
                }
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the node did not exit within {timeout:?} of signal {signal}; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The process id of the running node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node running").id()
    }

    /// A `kB` field of `/proc/<pid>/status` (e.g. `VmRSS`, `VmHWM`), bytes.
    pub fn proc_status_bytes(&self, field: &str) -> u64 {
        let text = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(field)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
            * 1024
    }

    /// The whole log of the node (every run on this data directory).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The node's resident memory in KiB (see [`rss_kib`]).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics (with the log tail) unless the process is still running.
    pub fn assert_running(&mut self) {
        if !self.is_running() {
            panic!(
                "braid node is not running any more; log tail:\n{}",
                self.log_tail(80)
            );
        }
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Uploads `pkg` and creates a vnode named `x500` on it; returns the
    /// holding id.
    pub fn vnode(&self, x500: &str, pkg: Pkg) -> String {
        let checksum = self.api.upload_package(&package_bytes(pkg));
        self.api.create_vnode(x500, &checksum)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "[e2e] test failed; node data dir kept at {}\n[e2e] last lines of {}:\n{}",
                self.data_dir.display(),
                self.log_path().display(),
                self.log_tail(60)
            );
        } else {
            let _ = fs::remove_dir_all(&self.data_dir);
        }
    }
}

// ---------------------------------------------------------------------------
// REST client
// ---------------------------------------------------------------------------

/// An HTTP response: status code and body (parsed as JSON when it is JSON).
#[derive(Debug, Clone)]
pub struct Resp {
    /// HTTP status code.
    pub status: u16,
    /// Raw body text.
    pub text: String,
    /// The body as JSON, or `Value::Null` when it is not JSON.
    pub json: Value,
}

impl Resp {
    fn from_parts(status: u16, text: String) -> Resp {
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp { status, text, json }
    }

    /// Panics unless the status is `expected`.
    #[track_caller]
    pub fn expect_status(&self, expected: &[u16], what: &str) -> &Self {
        assert!(
            expected.contains(&self.status),
            "{what}: expected HTTP {expected:?}, got {} with body {}",
            self.status,
            self.text
        );
        self
    }

    /// Panics unless this is a 4xx answer whose body is a JSON problem
    /// document with a non-empty string `code` and `message`.
    #[track_caller]
    pub fn expect_problem(&self, expected: &[u16], what: &str) -> &Self {
        self.expect_status(expected, what);
        assert!(
            (400..500).contains(&self.status),
            "{what}: not a 4xx: {}",
            self.status
        );
        let code = self.json.get("code").and_then(Value::as_str);
        let message = self.json.get("message").and_then(Value::as_str);
        assert!(
            code.is_some_and(|c| !c.is_empty()) && message.is_some_and(|m| !m.is_empty()),
            "{what}: error body must be JSON with string `code` and `message`, got: {}",
            self.text
        );
        self
    }
}

/// A flow's error as reported by REST.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct FlowError {
    /// Stable error code, e.g. `CPU_LIMIT`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Human-readable reason.
    pub message: String,
}

/// A flow status as reported by REST.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowStatus {
    /// The vnode the flow runs for.
    pub holding_id: String,
    /// The client's request id; `None` for responder flows.
    pub client_request_id: Option<String>,
    /// The flow's id (may be absent while only requested).
    #[serde(default)]
    pub flow_id: Option<String>,
    /// The flow's name.
    #[serde(default)]
    pub flow_name: Option<String>,
    /// One of [`STATUSES`].
    pub status: String,
    /// The JSON result once `COMPLETED`.
    #[serde(default)]
    pub result: Value,
    /// Why it failed, if it did.
    #[serde(default)]
    pub error: Option<FlowError>,
    /// When the status last changed.
    #[serde(default)]
    pub timestamp: Value,
}

impl FlowStatus {
    /// Whether the flow can no longer change.
    pub fn is_terminal(&self) -> bool {
        TERMINAL.contains(&self.status.as_str())
    }

    /// Short one-line description for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "{}/{} flow={:?} name={:?} status={} result={} error={:?}",
            self.holding_id,
            self.client_request_id.as_deref().unwrap_or("<responder>"),
            self.flow_id,
            self.flow_name,
            self.status,
            self.result,
            self.error
        )
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FlowList {
    flows: Vec<Value>,
    next_cursor: Option<String>,
}

fn parse_status(v: &Value) -> FlowStatus {
    let st: FlowStatus = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("flow status does not match the contract ({e}): {v}"));
    assert!(
        STATUSES.contains(&st.status.as_str()),
        "unknown flow status {:?} in {v}",
        st.status
    );
    st
}

/// The CA certificate (PEM) to trust for each node base URL the tests
/// know; [`Node`] registers its node's `DATA_DIR/tls/ca.pem` here before
/// building its [`Api`], so that `Api::new(url)` and [`raw_request`] trust
/// the right CA from the URL alone.
fn trusted_cas() -> &'static RwLock<HashMap<String, Vec<u8>>> {
    static CAS: OnceLock<RwLock<HashMap<String, Vec<u8>>>> = OnceLock::new();
    CAS.get_or_init(Default::default)
}

/// Trusts the CA in `ca_pem` (PEM bytes) for the node at `base`.
pub fn trust_ca(base: &str, ca_pem: Vec<u8>) {
    trusted_cas()
        .write()
        .unwrap()
        .insert(base.to_string(), ca_pem);
}

/// The CA trusted for `base`, if any.
pub fn ca_for(base: &str) -> Option<Vec<u8>> {
    trusted_cas().read().unwrap().get(base).cloned()
}

/// A blocking REST client for one node, authenticated as admin (or as
/// the user given to [`Api::as_user`]).
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    client: reqwest::blocking::Client,
    login: String,
    password: String,
}

/// A transport error (connection refused, reset, timeout…).
pub type NetError = reqwest::Error;

impl Api {
    /// A client for the node at `base` (e.g. `https://127.0.0.1:41234`),
    /// trusting only the CA registered for it with [`trust_ca`] (no
    /// built-in roots).
    pub fn new(base: String) -> Api {
        let client = Self::client_for(&base, None);
        Api {
            base,
            client,
            login: ADMIN_USER.to_string(),
            password: ADMIN_PASSWORD.to_string(),
        }
    }

    fn client_for(base: &str, local: Option<std::net::IpAddr>) -> reqwest::blocking::Client {
        let mut builder = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(4)
            // Below the node's idle timeout (60 s by default), so a pooled
            // connection is not reused just as the node closes it.
            .pool_idle_timeout(Duration::from_secs(30))
            .tls_built_in_root_certs(false)
            .local_address(local);
        if let Some(pem) = ca_for(base) {
            builder = builder.add_root_certificate(
                reqwest::Certificate::from_pem(&pem).expect("the node's ca.pem is PEM"),
            );
        }
        builder.build().expect("build reqwest client")
    }

    /// The same node, with `login` and `password` as credentials.
    pub fn as_user(&self, login: &str, password: &str) -> Api {
        Api {
            login: login.to_string(),
            password: password.to_string(),
            ..self.clone()
        }
    }

    /// The same node and credentials, over a fresh client whose
    /// connections come from the local address `ip` (any `127.x.y.z` is
    /// local on Linux): a client on another source address.
    pub fn bound_to(&self, ip: std::net::IpAddr) -> Api {
        Api {
            client: Self::client_for(&self.base, Some(ip)),
            ..self.clone()
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The underlying client, for hand-made requests.
    pub fn client(&self) -> &reqwest::blocking::Client {
        &self.client
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request built by `build` (auth added) and reads the answer.
    pub fn send(
        &self,
        build: impl FnOnce(&reqwest::blocking::Client) -> reqwest::blocking::RequestBuilder,
    ) -> Result<Resp, NetError> {
        let resp = build(&self.client)
            .basic_auth(&self.login, Some(&self.password))
            .send()?;
        let status = resp.status().as_u16();
        let text = resp.text()?;
        Ok(Resp::from_parts(status, text))
    }

    /// Authenticated `GET`.
    pub fn get(&self, path: &str) -> Result<Resp, NetError> {
        let url = self.url(path);
        self.send(|c| c.get(url))
    }

    /// Authenticated `POST` of a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Resp, NetError> {
        let url = self.url(path);
        self.send(|c| c.post(url).json(body))
    }

    /// Authenticated `PUT` of a JSON body.
    pub fn put_json(&self, path: &str, body: &Value) -> Result<Resp, NetError> {
        let url = self.url(path);
        self.send(|c| c.put(url).json(body))
    }

    /// Authenticated `POST` of raw bytes with a content type.
    pub fn post_bytes(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Resp, NetError> {
        let url = self.url(path);
        self.send(|c| {
            c.post(url)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body)
        })
    }

    /// Uploads a package; returns its checksum. Panics unless `201`/`200`.
    pub fn upload_package(&self, bytes: &[u8]) -> String {
        let resp = self
            .post_bytes("/api/v1/package", "application/wasm", bytes.to_vec())
            .expect("upload package");
        resp.expect_status(&[200, 201], "upload package");
        let checksum = resp
            .json
            .get("checksum")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("upload answer has no checksum: {}", resp.text));
        assert!(
            checksum.len() == 64 && checksum.bytes().all(|b| b.is_ascii_hexdigit()),
            "checksum is not hex sha256: {checksum}"
        );
        checksum.to_string()
    }

    /// Creates a vnode; returns its holding id. Panics unless `201`.
    pub fn create_vnode(&self, x500: &str, checksum: &str) -> String {
        let resp = self
            .post_json(
                "/api/v1/virtualnode",
                &json!({"x500Name": x500, "packageChecksum": checksum}),
            )
            .expect("create vnode");
        resp.expect_status(&[201], &format!("create vnode {x500}"));
        let id = resp
            .json
            .get("holdingId")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("vnode answer has no holdingId: {}", resp.text));
        assert!(
            id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "holdingId is not 12 hex digits: {id}"
        );
        id.to_string()
    }

    /// `POST /api/v1/flow/{holding}`: the raw answer.
    pub fn try_start_flow(
        &self,
        holding: &str,
        client_request_id: &str,
        flow_name: &str,
        body: &Value,
    ) -> Result<Resp, NetError> {
        self.post_json(
            &format!("/api/v1/flow/{holding}"),
            &json!({
                "clientRequestId": client_request_id,
                "flowName": flow_name,
                "requestBody": body,
            }),
        )
    }

    /// Starts a flow, idempotently: `Ok(true)` on `202`, `Ok(false)` on
    /// `409` (the request was accepted earlier, e.g. before a crash lost the
    /// answer), `Err` when the request did not get through (retry it);
    /// panics on any other answer.
    pub fn submit_flow(
        &self,
        holding: &str,
        client_request_id: &str,
        flow_name: &str,
        body: &Value,
    ) -> Result<bool, NetError> {
        let resp = self.try_start_flow(holding, client_request_id, flow_name, body)?;
        match resp.status {
            202 => Ok(true),
            409 => Ok(false),
            other => panic!(
                "start flow {flow_name} {client_request_id}: unexpected HTTP {other}: {}",
                resp.text
            ),
        }
    }

    /// Kills a flow (`POST .../kill`): the raw answer.
    pub fn kill_flow(&self, holding: &str, client_request_id: &str) -> Resp {
        self.post_json(
            &format!("/api/v1/flow/{holding}/{client_request_id}/kill"),
            &json!({}),
        )
        .expect("kill flow")
    }

    /// Starts a flow; panics unless `202`.
    pub fn start_flow(
        &self,
        holding: &str,
        client_request_id: &str,
        flow_name: &str,
        body: &Value,
    ) {
        let resp = self
            .try_start_flow(holding, client_request_id, flow_name, body)
            .expect("start flow");
        resp.expect_status(
            &[202],
            &format!("start flow {flow_name} {client_request_id}"),
        );
        let st = parse_status(&resp.json);
        assert_eq!(st.holding_id, holding, "202 body names another vnode");
        assert_eq!(
            st.client_request_id.as_deref(),
            Some(client_request_id),
            "202 body names another request"
        );
    }

    /// The status of one flow; `None` on `404`.
    pub fn try_status(
        &self,
        holding: &str,
        client_request_id: &str,
    ) -> Result<Option<FlowStatus>, NetError> {
        let resp = self.get(&format!("/api/v1/flow/{holding}/{client_request_id}"))?;
        if resp.status == 404 {
            return Ok(None);
        }
        resp.expect_status(&[200], "get flow status");
        Ok(Some(parse_status(&resp.json)))
    }

    /// The status of one flow; panics unless it exists.
    pub fn status(&self, holding: &str, client_request_id: &str) -> FlowStatus {
        self.try_status(holding, client_request_id)
            .expect("get flow status")
            .unwrap_or_else(|| panic!("flow {holding}/{client_request_id} does not exist (404)"))
    }

    /// Every flow of a vnode, responders included (every page).
    pub fn list_flows(&self, holding: &str) -> Vec<FlowStatus> {
        self.list_flows_where(holding, "")
    }

    /// Every flow of a vnode matching `query` (e.g. `status=RUNNING`),
    /// following `nextCursor` through every page.
    pub fn list_flows_where(&self, holding: &str, query: &str) -> Vec<FlowStatus> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/flow/{holding}?limit=1000");
            if !query.is_empty() {
                path.push('&');
                path.push_str(query);
            }
            if let Some(c) = &cursor {
                path.push_str("&cursor=");
                path.push_str(c);
            }
            let resp = self.get(&path).expect("list flows");
            resp.expect_status(&[200], "list flows");
            let list: FlowList = serde_json::from_value(resp.json.clone()).unwrap_or_else(|e| {
                panic!(
                    "flow listing does not match the contract ({e}): {}",
                    resp.text
                )
            });
            out.extend(list.flows.iter().map(parse_status));
            match list.next_cursor {
                Some(c) => cursor = Some(c),
                None => return out,
            }
        }
    }

    /// Waits until one flow is terminal; returns its status.
    pub fn wait_terminal(&self, holding: &str, client_request_id: &str) -> FlowStatus {
        wait_until(
            &format!("flow {holding}/{client_request_id} to finish"),
            DEADLINE,
            || match self.try_status(holding, client_request_id) {
                Ok(Some(st)) if st.is_terminal() => Ok(st),
                Ok(Some(st)) => Err(st.describe()),
                Ok(None) => Err("404".into()),
                Err(e) => Err(e.to_string()),
            },
        )
    }

    /// Waits (polling the vnode's listing) until every flow named in
    /// `client_request_ids` exists and is terminal; returns them in order.
    pub fn wait_all_terminal(
        &self,
        holding: &str,
        client_request_ids: &[String],
        timeout: Duration,
    ) -> Vec<FlowStatus> {
        wait_until(
            &format!("{} flows of {holding} to finish", client_request_ids.len()),
            timeout,
            || {
                let flows = self.list_flows(holding);
                let mut by_id = std::collections::HashMap::new();
                for f in flows {
                    if let Some(id) = f.client_request_id.clone() {
                        by_id.insert(id, f);
                    }
                }
                let mut out = Vec::with_capacity(client_request_ids.len());
                let mut missing = 0;
                let mut pending = Vec::new();
                for id in client_request_ids {
                    match by_id.get(id) {
                        None => missing += 1,
                        Some(f) if !f.is_terminal() => pending.push(f.describe()),
                        Some(f) => out.push(f.clone()),
                    }
                }
                if missing == 0 && pending.is_empty() {
                    Ok(out)
                } else {
                    Err(format!(
                        "{missing} missing, {} not finished, e.g. {:?}",
                        pending.len(),
                        pending.iter().take(3).collect::<Vec<_>>()
                    ))
                }
            },
        )
    }

    /// Waits until `holding` has `count` responder flows, in any state.
    pub fn wait_responders(&self, holding: &str, count: usize, timeout: Duration) {
        wait_until(
            &format!("{count} responder flows on {holding}"),
            timeout,
            || {
                let responders = self
                    .list_flows(holding)
                    .iter()
                    .filter(|f| f.client_request_id.is_none())
                    .count();
                if responders == count {
                    Ok(())
                } else {
                    Err(format!("{responders}/{count} responders"))
                }
            },
        );
    }

    /// Waits until the vnode has at least `count` responder flows and
    /// all of them are terminal; returns them.
    pub fn wait_responders_terminal(
        &self,
        holding: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<FlowStatus> {
        wait_until(
            &format!("{count} responder flows of {holding} to finish"),
            timeout,
            || {
                let responders: Vec<FlowStatus> = self
                    .list_flows(holding)
                    .into_iter()
                    .filter(|f| f.client_request_id.is_none())
                    .collect();
                let unfinished: Vec<_> = responders.iter().filter(|f| !f.is_terminal()).collect();
                if responders.len() >= count && unfinished.is_empty() {
                    Ok(responders)
                } else {
                    Err(format!(
                        "{} responders, {} unfinished, e.g. {:?}",
                        responders.len(),
                        unfinished.len(),
                        unfinished
                            .iter()
                            .take(3)
                            .map(|f| f.describe())
                            .collect::<Vec<_>>()
                    ))
                }
            },
        )
    }
}

/// Asserts that `flows` are all `COMPLETED` and distinct flows (no flow id
/// twice); `what` names them in the failure message.
pub fn assert_all_completed(flows: &[FlowStatus], what: &str) {
    let failed: Vec<String> = flows
        .iter()
        .filter(|f| f.status != "COMPLETED")
        .map(FlowStatus::describe)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} {what} did not complete, e.g.:\n{}",
        failed.len(),
        flows.len(),
        failed
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut ids = HashSet::new();
    for f in flows {
        if let Some(id) = &f.flow_id {
            assert!(ids.insert(id.clone()), "{what}: flow id {id} listed twice");
        }
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP, for bodies too large to send reliably through a client that
// stops reading when the server answers early
// ---------------------------------------------------------------------------

/// Sends one HTTP/1.1 request over a raw connection (TLS for `https://`
/// bases, trusting the CA registered with [`trust_ca`]), writing the body
/// while reading the answer, so an early answer (e.g. `413` before the body
/// is read) is seen even if the server then drops the connection. Returns
/// the status code and body.
pub fn raw_request(
    base: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: Arc<Vec<u8>>,
) -> std::io::Result<Resp> {
    let (tls, authority) = match (base.strip_prefix("https://"), base.strip_prefix("http://")) {
        (Some(a), _) => (true, a),
        (None, Some(a)) => (false, a),
        _ => panic!("raw_request needs an http:// or https:// base, got {base}"),
    };
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN_USER}:{ADMIN_PASSWORD}"));
    let mut head = String::new();
    let _ = write!(
        head,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(authority).await?;
        if tls {
            let config = tls_client_config(base);
            let host = authority
                .rsplit_once(':')
                .map_or(authority, |(h, _)| h)
                .trim_matches(['[', ']']);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(std::io::Error::other)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            exchange(stream, head, body).await
        } else {
            exchange(tcp, head, body).await
        }
    })
}

/// A rustls client configuration trusting only the CA registered for
/// `base` with [`trust_ca`].
pub fn tls_client_config(base: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_for(base) {
        use rustls::pki_types::pem::PemObject as _;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(cert.expect("the node's ca.pem is PEM"))
                .expect("a usable CA certificate");
        }
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Writes `head` and `body` on one task while reading the answer on
/// another (over the same stream, split), returning as soon as a complete
/// response has arrived.
async fn exchange<S>(stream: S, head: String, body: Arc<Vec<u8>>) -> std::io::Result<Resp>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        // Errors are expected when the server refuses the body early.
        for chunk in body.chunks(64 * 1024) {
            wr.write_all(chunk).await?;
        }
        wr.flush().await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    raw.extend_from_slice(&buf[..n]);
                    if parse_complete_response(&raw).is_some() {
                        return Ok(());
                    }
                }
                Err(e) if raw.is_empty() => return Err(e),
                Err(_) => return Ok(()),
            }
        }
    })
    .await;
    writer.abort();
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) if raw.is_empty() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in 60 s",
            ));
        }
        Err(_) => {}
    }
    parse_complete_response(&raw).ok_or_else(|| {
        std::io::Error::other(format!(
            "incomplete HTTP response: {:?}",
            String::from_utf8_lossy(&raw)
        ))
    })
}

/// Parses `raw` if it holds a complete response (content-length or
/// chunked); `None` if more bytes are needed.
pub fn parse_complete_response(raw: &[u8]) -> Option<Resp> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        if k == "content-length" {
            content_length = v.parse::<usize>().ok();
        } else if k == "transfer-encoding" && v.contains("chunked") {
            chunked = true;
        }
    }
    if chunked {
        let mut out = Vec::new();
        let mut rest = body;
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_str = String::from_utf8_lossy(&rest[..nl]).to_string();
            let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size + 2 {
                return None;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        return Some(Resp::from_parts(
            status,
            String::from_utf8_lossy(&out).into(),
        ));
    }
    let len = content_length.unwrap_or(0);
    if body.len() < len {
        return None;
    }
    Some(Resp::from_parts(
        status,
        String::from_utf8_lossy(&body[..len]).into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked_responses() {
        let r = parse_complete_response(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\n{}",
        )
        .expect("complete");
        assert_eq!(r.status, 413);
        assert_eq!(r.json, json!({}));
        assert!(
            parse_complete_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{}").is_none()
        );
        let r = parse_complete_response(
            b"HTTP/1.1 400 Bad\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        )
        .expect("complete");
        assert_eq!(r.status, 400);
        assert_eq!(r.text, "{}");
    }
}
