//! Test helpers: real services started on loopback for the tests that need
//! them, installed by the project's own scripts on first use.
//!
//! [`Broker`] is a Kafka-API broker (tansu, built once per machine by
//! `scripts/ensure-tansu.sh`), on a free loopback port, storing in an SQLite
//! file that survives [`Broker::restart`]. (Not tansu's `memory://`
//! storage: there, a fetch from an offset inside a record batch returns
//! nothing, so a consumer that resumes after a commit in the middle of a
//! batch never gets the rest; seen with tansu 0.6.0.)

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository's root: the nearest directory holding `scripts/test.sh`
/// above the running test's package (cargo sets `CARGO_MANIFEST_DIR` for
/// it), its working directory, or where this crate was compiled. Not the
/// compile-time path alone: a build cache shared by several checkouts may
/// hold this crate compiled in another one.
pub fn repo_root() -> PathBuf {
    let candidates = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        std::env::current_dir().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    candidates
        .iter()
        .flatten()
        .flat_map(|start| start.ancestors())
        .find(|d| d.join("scripts/test.sh").is_file() && d.join("Cargo.toml").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            panic!("no repository root (a directory with scripts/test.sh) above {candidates:?}")
        })
}

/// Runs one of the repository's scripts and returns its standard output
/// (trimmed); panics with its standard error when it fails.
pub fn script(name: &str, args: &[&str]) -> String {
    script_with(name, args, &[])
}

/// [`script`] with extra environment variables.
pub fn script_with(name: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let path = repo_root().join("scripts").join(name);
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}); see its output above",
        path.display(),
        out.status
    );
    String::from_utf8(out.stdout)
        .expect("script output is UTF-8")
        .trim()
        .to_string()
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A Kafka-API broker on loopback, killed when dropped.
pub struct Broker {
    bin: PathBuf,
    addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Builds the broker if this machine has none yet, then starts one.
    pub fn start() -> Broker {
        let bin = PathBuf::from(script("ensure-tansu.sh", &[]));
        let dir = std::env::temp_dir().join(format!(
            "braid-broker-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("broker directory");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("loopback address");
        let mut b = Broker {
            bin,
            addr,
            dir,
            child: None,
        };
        b.spawn();
        b
    }

    /// `kafka://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("kafka://{}", self.addr)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn spawn(&mut self) {
        let listener = format!("tcp://{}", self.addr);
        // tansu opens an SQLite URL's host as a path under its working
        // directory: the broker's directory.
        let engine = "sqlite://tansu.db";
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .expect("broker log");
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", engine])
            // BRAID_BROKER_LOG=info (or debug) to see the broker's side.
            .env(
                "RUST_LOG",
                std::env::var("BRAID_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("broker log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.await_listening();
    }

    fn await_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "the broker exited ({status}) before listening on {}; log:\n{}",
                    self.addr,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not listen on {} within 60 s; log:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    /// Kills the broker with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the broker and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Stops the broker with SIGSTOP (it holds its connections but answers
    /// nothing) until [`Broker::resume`].
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "STOP");
        }
    }

    /// Resumes a paused broker.
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "CONT");
        }
    }
}

/// Sends `SIG<name>` to `pid` (kill(1): the workspace has no unsafe code).
pub fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{name} {pid} failed");
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Kept for inspection, like a failed test's node.
            eprintln!(
                "[testkit] broker log kept: {}",
                self.dir.join("broker.log").display()
            );
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Target directory of the wasm builds: `$BRAID_WASM_TARGET_DIR`, else
/// `$HOME/.cache/braid/wasm-target` (apart from the host's, which `cargo
/// test` holds locked while tests run).
pub fn wasm_target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BRAID_WASM_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/braid/wasm-target"),
        None => std::env::temp_dir().join("braid-wasm-target"),
    }
}

/// The bytes of an example flow package (`examples-flows/<name>`), built
/// for wasm32-wasip2 in release mode (cargo makes a rebuild cheap; one
/// build at a time per target directory, cargo's lock sees to that).
pub fn example_package(name: &str) -> Vec<u8> {
    script("ensure-wasm-target.sh", &[]);
    let manifest = repo_root().join("examples-flows/Cargo.toml");
    let target = wasm_target_dir();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            name,
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target)
        .stderr(Stdio::inherit())
        .status()
        .expect("running cargo for the example packages");
    assert!(status.success(), "building examples-flows/{name} failed");
    let wasm = target
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&wasm).unwrap_or_else(|e| panic!("reading {}: {e}", wasm.display()))
}

/// A fresh, empty directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new directory whose name starts with `prefix`.
    pub fn new(prefix: &str) -> TempDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The URL of the test PostgreSQL server's `postgres` database, started
/// once per test binary by `scripts/postgres.sh up` (installed and
/// initialised on first use); panics with the script's error when it
/// cannot be started.
pub fn postgres_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        let out = script("postgres.sh", &["up"]);
        out.lines()
            .rev()
            .find(|l| l.starts_with("postgres://"))
            .unwrap_or_else(|| panic!("scripts/postgres.sh up printed no URL: {out}"))
            .to_string()
    })
}

/// A new, empty database on the test server: its URL. Dropped by
/// [`drop_database`] (tests that fail keep theirs for inspection).
pub fn fresh_database() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!(
        "braid_e_{}_{nanos}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    admin_sql(&format!("CREATE DATABASE {name}"));
    let base = postgres_url()
        .rsplit_once('/')
        .map(|(b, _)| b)
        .expect("a URL with a database");
    format!("{base}/{name}")
}

/// Drops the database of a URL from [`fresh_database`].
pub fn drop_database(url: &str) {
    if let Some((_, name)) = url.rsplit_once('/') {
        admin_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }
}

/// A PostgreSQL server of its own (not the shared test server), for tests
/// that stop and start it: `scripts/postgres.sh` on a temporary directory.
/// Stopped and removed on drop.
pub struct PrivatePostgres {
    dir: PathBuf,
    url: String,
}

impl PrivatePostgres {
    /// Initialises and starts a server (a few seconds).
    pub fn start() -> PrivatePostgres {
        Self::start_with(&[])
    }

    /// [`start`](Self::start), the server also speaking TLS with the
    /// certificate and key in these PEM files.
    pub fn start_tls(cert: &Path, key: &Path) -> PrivatePostgres {
        let (c, k) = (cert.to_string_lossy(), key.to_string_lossy());
        Self::start_with(&[("BRAID_PG_TLS_CERT", &c), ("BRAID_PG_TLS_KEY", &k)])
    }

    fn start_with(env: &[(&str, &str)]) -> PrivatePostgres {
        // Readable by the server's user when the tests run as root.
        let dir = PathBuf::from("/var/tmp").join(format!(
            "braid-pg-private-{}-{}",
            std::process::id(),
            free_port()
        ));
        let d = dir.to_string_lossy().to_string();
        let mut vars = vec![("BRAID_PG_DIR", d.as_str())];
        vars.extend_from_slice(env);
        let out = script_with("postgres.sh", &["up"], &vars);
        let base = out
            .lines()
            .rev()
            .find(|l| l.starts_with("postgres://"))
            .unwrap_or_else(|| panic!("scripts/postgres.sh up printed no URL: {out}"))
            .to_string();
        PrivatePostgres { dir, url: base }
    }

    /// Its `postgres://` URL (database `postgres`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server (fast shutdown: sessions are cut) and starts it
    /// again on the same data and port.
    pub fn restart(&self) {
        let d = self.dir.to_string_lossy().to_string();
        script_with("postgres.sh", &["down"], &[("BRAID_PG_DIR", &d)]);
        script_with("postgres.sh", &["up"], &[("BRAID_PG_DIR", &d)]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let d = self.dir.to_string_lossy().to_string();
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/postgres.sh"))
            .arg("down")
            .env("BRAID_PG_DIR", &d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("lock"));
    }
}

fn admin_sql(sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the admin connection");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(postgres_url(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL: {e}"));
        let task = tokio::spawn(conn);
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        drop(client);
        let _ = task.await;
    });
}
