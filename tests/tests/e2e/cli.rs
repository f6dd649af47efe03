//! HTTPS by default, and the `braid` CLI as a client of a real node: init,
//! package upload, vnode create, `flow start --wait`, and the errors that
//! say what to do (wrong password, untrusted certificate, unreachable
//! node, insecure HTTP on a non-loopback address).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use braid_e2e::{ADMIN_PASSWORD, Node, Pkg, braid_bin, fresh_dir, package_bytes, wait_until};
use serde_json::{Value, json};

use crate::{ALICE, BOB};

/// Runs `braid args...` with no BRAID_* from the caller's environment but
/// `envs`; returns its output.
fn braid(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(braid_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BRAID_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn braid {args:?}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `braid` and expects success; returns stdout as JSON.
#[track_caller]
fn braid_json(args: &[&str], envs: &[(&str, &str)]) -> Value {
    let out = braid(args, envs);
    assert!(
        out.status.success(),
        "braid {args:?} failed: {}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("braid {args:?} printed no JSON ({e}): {}", describe(&out)))
}

/// Runs `braid` and expects it to fail with `needle` on stderr.
#[track_caller]
fn braid_fails(args: &[&str], envs: &[(&str, &str)], needle: &str) -> Output {
    let out = braid(args, envs);
    assert!(
        !out.status.success(),
        "braid {args:?} should have failed: {}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(needle),
        "braid {args:?}: stderr lacks {needle:?}: {}",
        describe(&out)
    );
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[test]
fn https_by_default_and_plain_http_only_on_loopback() {
    let node = Node::start();
    let base = node.api().base().to_string();
    assert!(
        base.starts_with("https://127.0.0.1:"),
        "rest.url is not https: {base}"
    );
    let tls = node.data_dir().join("tls");
    assert!(tls.join("ca.pem").is_file(), "no DATA_DIR/tls/ca.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(tls.join("server.key"))
            .expect("DATA_DIR/tls/server.key")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "server key is readable by others: {mode:o}"
        );
    }
    // The harness trusts the CA: HTTPS works.
    node.api()
        .get("/api/v1/health")
        .expect("health over HTTPS")
        .expect_status(&[200], "health over HTTPS");
    // A client that does not trust the CA gets no answer.
    let untrusted = reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let err = untrusted
        .get(format!("{base}/api/v1/health"))
        .send()
        .expect_err("a client that does not trust the node's CA must fail");
    let chain = {
        let mut s = String::new();
        let mut e: Option<&dyn std::error::Error> = Some(&err);
        while let Some(x) = e {
            s.push_str(&format!("{x}; "));
            e = x.source();
        }
        s
    };
    assert!(
        chain.to_lowercase().contains("certificate"),
        "untrusted client failed, but not for the certificate: {chain}"
    );
    // Plain HTTP over a TLS port gets nothing useful either.
    let plain = base.replacen("https://", "http://", 1);
    assert!(
        untrusted
            .get(format!("{plain}/api/v1/health"))
            .send()
            .and_then(|r| r.error_for_status())
            .is_err(),
        "plain HTTP got an answer from the HTTPS port"
    );

    // --insecure-http on a non-loopback address: refused before listening.
    let dir = fresh_dir("insecure");
    let mut child = Command::new(braid_bin())
        .args(["node", "start", "--data-dir", path_str(&dir)])
        .args(["--rest-addr", "0.0.0.0:0", "--insecure-http"])
        .env("BRAID_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn braid node start");
    let status = wait_until(
        "braid node start --insecure-http on 0.0.0.0 to exit",
        Duration::from_secs(30),
        || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err("still running".into()),
            Err(e) => Err(e.to_string()),
        },
    );
    let out = child.wait_with_output().expect("collect output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !status.success(),
        "insecure HTTP on 0.0.0.0 was not refused: {status} {stderr}"
    );
    assert!(
        stderr.contains("--insecure-http") && stderr.contains("loopback"),
        "the refusal does not say why: {stderr}"
    );
    assert!(
        !dir.join("rest.url").exists(),
        "a refused node wrote rest.url"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // ... and allowed on loopback when asked for.
    let insecure = Node::options().insecure_http().start();
    assert!(
        insecure.api().base().starts_with("http://127.0.0.1:"),
        "--insecure-http on loopback: {}",
        insecure.api().base()
    );
    insecure
        .api()
        .get("/api/v1/health")
        .expect("health over plain HTTP")
        .expect_status(&[200], "health over plain HTTP");
}

struct Cli {
    dir: PathBuf,
    config: String,
    ca: String,
    base: String,
}

impl Cli {
    fn new(node: &Node) -> Cli {
        let dir = fresh_dir("cli");
        Cli {
            config: path_str(&dir.join("config.toml")).to_string(),
            ca: path_str(&node.ca_path()).to_string(),
            base: node.api().base().to_string(),
            dir,
        }
    }

    /// As admin, through the profile written by `braid init`.
    fn admin(&self) -> Vec<(&str, &str)> {
        vec![
            ("BRAID_CONFIG", self.config.as_str()),
            ("BRAID_PASSWORD", ADMIN_PASSWORD),
        ]
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn cli_drives_a_node_over_https() {
    let node = Node::start();
    let cli = Cli::new(&node);
    let wasm = cli.dir.join("ping.wasm");
    std::fs::write(&wasm, package_bytes(Pkg::Ping)).unwrap();

    // braid init writes the profile.
    let out = braid(
        &[
            "init", "--url", &cli.base, "--ca", &cli.ca, "--user", "admin",
        ],
        &[("BRAID_CONFIG", &cli.config)],
    );
    assert!(out.status.success(), "braid init: {}", describe(&out));
    let profile = std::fs::read_to_string(&cli.config).expect("braid init wrote no profile");
    assert!(
        profile.contains(&cli.base) && profile.contains("admin"),
        "profile: {profile}"
    );

    // Upload, list, two vnodes.
    let admin = cli.admin();
    let pkg = braid_json(&["package", "upload", path_str(&wasm)], &admin);
    let checksum = pkg["checksum"].as_str().expect("checksum").to_string();
    let listed = braid_json(&["package", "list"], &admin);
    assert!(
        listed.to_string().contains(&checksum),
        "package list lacks {checksum}: {listed}"
    );
    let alice = braid_json(
        &["vnode", "create", "--name", ALICE, "--package", &checksum],
        &admin,
    )["holdingId"]
        .as_str()
        .expect("holdingId")
        .to_string();
    braid_json(
        &["vnode", "create", "--name", BOB, "--package", &checksum],
        &admin,
    );
    let vnodes = braid_json(&["vnode", "list"], &admin);
    assert!(vnodes.to_string().contains(&alice), "vnode list: {vnodes}");

    // flow start --wait: the result on stdout, exit 0.
    let body = json!({"counterparty": BOB, "n": 41, "delayMs": 50}).to_string();
    let out = braid(
        &[
            "flow", "start", &alice, "ping", "--body", &body, "--id", "cli-1", "--wait",
        ],
        &admin,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "flow start --wait: {}",
        describe(&out)
    );
    let st: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--wait printed no JSON ({e}): {}", describe(&out)));
    assert_eq!(st["status"], "COMPLETED", "{st}");
    assert_eq!(st["result"], json!({"n": 42, "responder": BOB}), "{st}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("COMPLETED"),
        "no progress on stderr: {}",
        describe(&out)
    );
    let st = braid_json(&["flow", "status", &alice, "cli-1"], &admin);
    assert_eq!(st["status"], "COMPLETED", "{st}");
    let list = braid_json(&["flow", "list", &alice, "--status", "COMPLETED"], &admin);
    assert!(list.to_string().contains("cli-1"), "flow list: {list}");
    let out = braid(&["flow", "watch", &alice, "cli-1"], &admin);
    assert_eq!(out.status.code(), Some(0), "flow watch: {}", describe(&out));
    // flow journal: what the ping did, and its responder on Bob, as text
    // (the JSON is the REST API's, tested in journal.rs).
    let out = braid(&["flow", "journal", &alice, "cli-1"], &admin);
    assert!(out.status.success(), "flow journal: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "ping on ",
        "started by a client with {",
        "initiate    O=Bob",
        "under ping (versions [1]) -> session 1",
        "send        session 1, ",
        "receive     session 1, ",
        "result: {\"n\":42,",
        "counterparty on this node:",
        &format!("started by a session-init from {ALICE} (protocol ping v1)"),
        "sleep       until ",
        "-> error: closed by the counterparty",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    let j = braid_json(&["flow", "journal", &alice, "cli-1", "--json"], &admin);
    assert_eq!(j["flow"]["status"]["clientRequestId"], "cli-1", "{j}");

    // Users and roles: a flow executor on Alice may start ping there; a
    // user without the role may not, and is told so.
    let pw = "cli-user-password-0123";
    let with_pw = |mut env: Vec<(&'static str, &'static str)>| {
        env.push(("NEW_PW", pw));
        env
    };
    let config: &'static str = cli.config.clone().leak();
    let admin_env = with_pw(vec![
        ("BRAID_CONFIG", config),
        ("BRAID_PASSWORD", ADMIN_PASSWORD),
    ]);
    for login in ["carol", "dave"] {
        braid_json(
            &["user", "create", login, "--password-env", "NEW_PW"],
            &admin_env,
        );
    }
    braid_json(
        &[
            "role",
            "create",
            "alice-pinger",
            "--template",
            "FLOW_EXECUTOR",
            "--holding-id",
            &alice,
            "--flow",
            "ping",
        ],
        &admin_env,
    );
    braid_json(&["user", "add-role", "carol", "alice-pinger"], &admin_env);
    let users = braid_json(&["user", "list"], &admin_env);
    assert!(users.to_string().contains("carol"), "user list: {users}");
    let roles = braid_json(&["role", "list"], &admin_env);
    assert!(
        roles.to_string().contains("alice-pinger"),
        "role list: {roles}"
    );
    let as_user = |login: &'static str| {
        vec![
            ("BRAID_CONFIG", config),
            ("BRAID_USER", login),
            ("BRAID_PASSWORD", pw),
        ]
    };
    let out = braid(
        &[
            "flow", "start", &alice, "ping", "--body", &body, "--id", "carol-1", "--wait",
        ],
        &as_user("carol"),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "flow executor's ping: {}",
        describe(&out)
    );
    let st: Value = serde_json::from_slice(&out.stdout).expect("JSON status");
    assert_eq!(st["result"], json!({"n": 42, "responder": BOB}), "{st}");
    braid_fails(
        &[
            "flow", "start", &alice, "ping", "--body", &body, "--id", "dave-1", "--wait",
        ],
        &as_user("dave"),
        "dave is not permitted",
    );

    // A refused request: non-zero, with the server's message.
    braid_fails(
        &[
            "flow",
            "start",
            "000000000000",
            "ping",
            "--body",
            &body,
            "--wait",
        ],
        &admin,
        "000000000000",
    );
    braid_fails(
        &["flow", "start", &alice, "ping", "--body", "{not json"],
        &admin,
        "--body is not valid JSON",
    );

    // Wrong password.
    braid_fails(
        &["flow", "start", &alice, "ping", "--body", &body, "--wait"],
        &[
            ("BRAID_CONFIG", cli.config.as_str()),
            ("BRAID_PASSWORD", "not-the-password"),
        ],
        &format!("wrong user or password for admin at {}", cli.base),
    );
    // No CA: the certificate is not trusted, and the message says what to
    // pass.
    let no_ca_config = path_str(&cli.dir.join("no-ca.toml")).to_string();
    let out = braid_fails(
        &["flow", "list", &alice],
        &[
            ("BRAID_CONFIG", no_ca_config.as_str()),
            ("BRAID_URL", cli.base.as_str()),
            ("BRAID_USER", "admin"),
            ("BRAID_PASSWORD", ADMIN_PASSWORD),
        ],
        "certificate is not trusted",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca"),
        "the certificate message does not say to pass --ca: {}",
        describe(&out)
    );
    // Nobody listening.
    braid_fails(
        &["flow", "list", &alice],
        &[
            ("BRAID_CONFIG", cli.config.as_str()),
            ("BRAID_URL", "https://127.0.0.1:1"),
            ("BRAID_PASSWORD", ADMIN_PASSWORD),
        ],
        "cannot reach https://127.0.0.1:1: is the node running?",
    );
}
