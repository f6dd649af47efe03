//! The client subcommands: thin calls onto the REST API (see `client`).

use crate::client::Client;
use anyhow::Context as _;
use serde_json::{Value, json};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `braid vnode ...`
#[derive(Debug, clap::Subcommand)]
pub enum VnodeCommand {
    /// Create a virtual node for an identity, running a package.
    ///
    /// Example: braid vnode create --name "O=Alice, L=London, C=GB" --package 3f2a…
    Create {
        /// The identity's X.500 name.
        #[arg(long)]
        name: String,
        /// Checksum of an uploaded package (see braid package list).
        #[arg(long)]
        package: String,
    },
    /// List virtual nodes.
    ///
    /// Example: braid vnode list
    List,
    /// Move a virtual node to another package: running flows finish on
    /// the version they started with, new flows use the new one.
    ///
    /// Example: braid vnode upgrade 1a2b3c4d5e6f --package 9e8d…
    Upgrade {
        /// The vnode's holding id.
        holding_id: String,
        /// Checksum of the uploaded package to run from now on.
        #[arg(long)]
        package: String,
    },
}

/// `braid flow ...`
#[derive(Debug, clap::Subcommand)]
pub enum FlowCommand {
    /// Start a flow on a virtual node.
    ///
    /// With --wait it shows progress on stderr until the flow ends, prints
    /// its status (with the result) as JSON on stdout and exits 0 when
    /// COMPLETED, 1 when FAILED, 2 when KILLED (3 for any other error).
    ///
    /// Example: braid flow start 1a2b3c4d5e6f ping --body '{"counterparty":"O=Bob, L=New York, C=US","n":1}' --wait
    Start {
        /// The vnode's holding id.
        holding_id: String,
        /// The flow to start (see braid vnode list / the package's flows).
        flow_name: String,
        /// The flow's request body, JSON.
        #[arg(long, default_value = "{}")]
        body: String,
        /// Client request id [default: a fresh one]. Starting again with
        /// the same id never starts a second flow.
        #[arg(long)]
        id: Option<String>,
        /// Wait until the flow ends; the exit code says how it ended.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit 3).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Show one flow's status (and result once it has one).
    ///
    /// Example: braid flow status 1a2b3c4d5e6f r1
    Status {
        /// The vnode's holding id.
        holding_id: String,
        /// The flow's client request id.
        client_request_id: String,
    },
    /// Show what a flow did: every journal entry in order (sessions
    /// opened, messages sent and received, sleeps, time and randomness
    /// taken), its result or the step it failed at, and the same for the
    /// flows at the other end of its sessions on this node.
    ///
    /// Example: braid flow journal 1a2b3c4d5e6f r1
    Journal {
        /// The vnode's holding id.
        holding_id: String,
        /// The flow's client request id.
        client_request_id: String,
        /// Print the REST API's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// List a virtual node's flows.
    ///
    /// Example: braid flow list 1a2b3c4d5e6f --status RUNNING
    List {
        /// The vnode's holding id.
        holding_id: String,
        /// Only flows with this status (START_REQUESTED, RUNNING,
        /// COMPLETED, FAILED, KILLED).
        #[arg(long)]
        status: Option<String>,
    },
    /// Kill a running flow; its counterparties are told and end too.
    ///
    /// Example: braid flow kill 1a2b3c4d5e6f r1
    Kill {
        /// The vnode's holding id.
        holding_id: String,
        /// The flow's client request id.
        client_request_id: String,
    },
    /// Follow a flow until it ends, printing each status change as a JSON
    /// line; exit code as for start --wait.
    ///
    /// Example: braid flow watch 1a2b3c4d5e6f r1
    Watch {
        /// The vnode's holding id.
        holding_id: String,
        /// The flow's client request id.
        client_request_id: String,
        /// Give up after this many seconds (exit 3).
        #[arg(long)]
        timeout: Option<u64>,
    },
}

/// `braid user ...`
#[derive(Debug, clap::Subcommand)]
pub enum UserCommand {
    /// Create a user. The new user's password is read from an environment
    /// variable, never from the command line.
    ///
    /// Example: NEW_PASSWORD=… braid user create carol --password-env NEW_PASSWORD
    Create {
        /// Login name.
        login: String,
        /// Environment variable holding the new user's password.
        #[arg(long, default_value = "BRAID_NEW_PASSWORD")]
        password_env: String,
    },
    /// List users.
    ///
    /// Example: braid user list
    List,
    /// Delete a user.
    ///
    /// Example: braid user delete carol
    Delete {
        /// Login name.
        login: String,
    },
    /// Give a user a role.
    ///
    /// Example: braid user add-role carol alice-pinger
    AddRole {
        /// Login name.
        login: String,
        /// Role name.
        role: String,
    },
    /// Take a role from a user.
    ///
    /// Example: braid user remove-role carol alice-pinger
    RemoveRole {
        /// Login name.
        login: String,
        /// Role name.
        role: String,
    },
}

/// `braid role ...`
#[derive(Debug, clap::Subcommand)]
pub enum RoleCommand {
    /// Create a role, empty or from a template.
    ///
    /// Example: braid role create alice-pinger --template FLOW_EXECUTOR --holding-id 1a2b3c4d5e6f --flow ping
    Create {
        /// Role name.
        name: String,
        /// A built-in template, e.g. FLOW_EXECUTOR (start and read the
        /// given flows on the given vnodes).
        #[arg(long)]
        template: Option<String>,
        /// With --template FLOW_EXECUTOR: a vnode the role may use
        /// (repeatable).
        #[arg(long = "holding-id")]
        holding_ids: Vec<String>,
        /// With --template FLOW_EXECUTOR: a flow the role may start
        /// (repeatable).
        #[arg(long = "flow")]
        flow_names: Vec<String>,
    },
    /// List roles.
    ///
    /// Example: braid role list
    List,
    /// Add a permission to a role.
    ///
    /// Example: braid role add-permission observers --type ALLOW --pattern "GET /api/v1/flow/*"
    AddPermission {
        /// Role name.
        role: String,
        /// ALLOW or DENY (DENY wins).
        #[arg(long = "type")]
        permission_type: String,
        /// What the permission matches, e.g. "GET /api/v1/flow/*".
        #[arg(long)]
        pattern: String,
    },
}

fn print(v: &Value) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(ExitCode::SUCCESS)
}

/// Path segments are ids and names; escape anything that is not plainly
/// safe so that a value cannot change the path.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `braid package upload FILE`
pub fn package_upload(c: &Client, file: &PathBuf) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    print(&c.post_bytes("/api/v1/package", "application/wasm", bytes)?)
}

/// `braid package check-upgrade FILE --vnode H`
pub fn check_upgrade(
    c: &Client,
    file: &PathBuf,
    vnode: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let pkg = c.post_bytes("/api/v1/package", "application/wasm", bytes)?;
    let checksum = pkg["checksum"]
        .as_str()
        .context("the node's upload answer has no checksum")?;
    let v = c.post(
        &format!("/api/v1/virtualnode/{}/check-upgrade", seg(vnode)),
        &json!({"packageChecksum": checksum}),
    )?;
    let check: braid_rest::openapi::UpgradeCheck = serde_json::from_value(v.clone())
        .context("the node's check answer is not what this braid reads")?;
    if json {
        print(&v)?;
    } else {
        println!(
            "{} against {} unfinished flow(s) of {vnode}:",
            check.package_checksum,
            check.flows.len()
        );
        for f in &check.flows {
            let who = f.client_request_id.as_deref().unwrap_or("(responder)");
            let what = match (f.verdict.as_str(), f.step) {
                ("CLEAN", _) => format!("replays cleanly ({} steps)", f.journal_steps),
                ("DIVERGES", Some(step)) => format!("diverges at step {step}"),
                (v, _) => v.to_lowercase(),
            };
            println!("  {} {who} (flow {}): {what}", f.flow_name, f.flow_id);
            if let Some(m) = &f.message {
                println!("      {m}");
            }
        }
    }
    Ok(if check.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `braid package list`
pub fn package_list(c: &Client) -> anyhow::Result<ExitCode> {
    print(&c.get_all("/api/v1/package", "packages")?)
}

/// `braid vnode ...`
pub fn vnode(c: &Client, cmd: VnodeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VnodeCommand::Create { name, package } => print(&c.post(
            "/api/v1/virtualnode",
            &json!({"x500Name": name, "packageChecksum": package}),
        )?),
        VnodeCommand::List => print(&c.get_all("/api/v1/virtualnode", "virtualNodes")?),
        VnodeCommand::Upgrade {
            holding_id,
            package,
        } => print(&c.put(
            &format!("/api/v1/virtualnode/{}/package", seg(&holding_id)),
            &json!({"packageChecksum": package}),
        )?),
    }
}

/// `braid flow ...`
pub fn flow(c: &Client, cmd: FlowCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        FlowCommand::Start {
            holding_id,
            flow_name,
            body,
            id,
            wait,
            timeout,
        } => {
            let request_body: Value = serde_json::from_str(&body)
                .with_context(|| format!("--body is not valid JSON: {body}"))?;
            let id = id.unwrap_or_else(|| {
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                format!("cli-{ms}-{:08x}", rand::random::<u32>())
            });
            let started = c.post(
                &format!("/api/v1/flow/{}", seg(&holding_id)),
                &json!({"clientRequestId": id, "flowName": flow_name, "requestBody": request_body}),
            )?;
            if !wait {
                return print(&started);
            }
            eprintln!("started {flow_name} as {id} on {holding_id}");
            follow(c, &holding_id, &id, timeout, false)
        }
        FlowCommand::Status {
            holding_id,
            client_request_id,
        } => print(&c.get(&flow_path(&holding_id, &client_request_id))?),
        FlowCommand::Journal {
            holding_id,
            client_request_id,
            json,
        } => {
            let v = c.get(&format!(
                "{}/journal",
                flow_path(&holding_id, &client_request_id)
            ))?;
            if json {
                return print(&v);
            }
            let j: braid_rest::openapi::FlowJournal = serde_json::from_value(v)
                .context("the node's journal answer is not what this braid reads")?;
            print!("{}", crate::journal::render(&j));
            Ok(ExitCode::SUCCESS)
        }
        FlowCommand::List { holding_id, status } => {
            let mut path = format!("/api/v1/flow/{}", seg(&holding_id));
            if let Some(status) = status {
                path.push_str(&format!("?status={}", seg(&status)));
            }
            print(&c.get_all(&path, "flows")?)
        }
        FlowCommand::Kill {
            holding_id,
            client_request_id,
        } => print(&c.post(
            &format!("{}/kill", flow_path(&holding_id, &client_request_id)),
            &json!({}),
        )?),
        FlowCommand::Watch {
            holding_id,
            client_request_id,
            timeout,
        } => follow(c, &holding_id, &client_request_id, timeout, true),
    }
}

fn flow_path(holding: &str, id: &str) -> String {
    format!("/api/v1/flow/{}/{}", seg(holding), seg(id))
}

/// How long a stream is followed when no timeout is given.
const FOREVER: Duration = Duration::from_secs(365 * 86_400);

/// Follows a flow until it is terminal, on its status stream. Progress
/// goes to stderr; with `lines`, every status change is also a JSON line
/// on stdout, else only the final status is printed. Exit code:
/// 0 COMPLETED, 1 FAILED, 2 KILLED.
fn follow(
    c: &Client,
    holding: &str,
    id: &str,
    timeout: Option<u64>,
    lines: bool,
) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let deadline = timeout.map(|s| t0 + Duration::from_secs(s));
    let path = format!("{}/events", flow_path(holding, id));
    let still = |status: &str| {
        anyhow::anyhow!(
            "flow {id} is still {status} after {}s; follow it with braid flow watch {holding} {id}",
            timeout.unwrap_or(0)
        )
    };
    let mut last_id: Option<String> = None;
    let mut last = String::from("?");
    let mut failures = 0u32;
    loop {
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => FOREVER,
        };
        if left.is_zero() {
            return Err(still(&last));
        }
        let stream = match c.events(&path, last_id.as_deref(), left) {
            Ok(s) => s,
            // The node may be restarting: retry a few times, then say why.
            Err(e) if last_id.is_some() && failures < 10 => {
                failures += 1;
                eprintln!("[{:>6.1}s] reconnecting: {e:#}", t0.elapsed().as_secs_f64());
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            Err(e) => return Err(e),
        };
        for ev in stream {
            let ev = match ev {
                Ok(ev) => ev,
                Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Err(still(&last));
                }
                // Cut off: resume after the last event.
                Err(_) => break,
            };
            failures = 0;
            if ev.id.is_some() {
                last_id.clone_from(&ev.id);
            }
            // `resync`: events were missed; the current status follows.
            if ev.event != "status" {
                continue;
            }
            let st: Value = serde_json::from_str(&ev.data)
                .with_context(|| format!("GET {path}: a status event is not JSON: {}", ev.data))?;
            let status = st["status"].as_str().unwrap_or("?").to_string();
            if status != last {
                eprintln!("[{:>6.1}s] {id}: {status}", t0.elapsed().as_secs_f64());
                if lines {
                    println!("{st}");
                    let _ = std::io::stdout().flush();
                }
                last.clone_from(&status);
            }
            let code = match status.as_str() {
                "COMPLETED" => 0,
                "FAILED" => 1,
                "KILLED" => 2,
                _ => continue,
            };
            if !lines {
                println!("{}", serde_json::to_string_pretty(&st)?);
            }
            if let Some(e) = st.get("error").filter(|e| !e.is_null()) {
                eprintln!("{id} ended {status}: {e}");
            }
            return Ok(ExitCode::from(code));
        }
        // The stream ended before the flow did (the node was restarted or
        // cut the connection): resume after the last event.
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(still(&last));
        }
        failures += 1;
        if failures > 10 {
            anyhow::bail!("GET {path}: the status stream keeps ending before the flow does");
        }
    }
}

/// `braid user ...`
pub fn user(c: &Client, cmd: UserCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        UserCommand::Create {
            login,
            password_env,
        } => {
            let password = std::env::var(&password_env).with_context(|| {
                format!(
                    "set {password_env} to the new user's password (or pass --password-env VAR)"
                )
            })?;
            print(&c.post(
                "/api/v1/user",
                &json!({"loginName": login, "password": password}),
            )?)
        }
        UserCommand::List => print(&c.get_all("/api/v1/user", "users")?),
        UserCommand::Delete { login } => {
            print(&c.delete(&format!("/api/v1/user/{}", seg(&login)))?)
        }
        UserCommand::AddRole { login, role } => print(&c.put(
            &format!("/api/v1/user/{}/role/{}", seg(&login), seg(&role)),
            &Value::Null,
        )?),
        UserCommand::RemoveRole { login, role } => {
            print(&c.delete(&format!("/api/v1/user/{}/role/{}", seg(&login), seg(&role)))?)
        }
    }
}

/// `braid role ...`
pub fn role(c: &Client, cmd: RoleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RoleCommand::Create {
            name,
            template,
            holding_ids,
            flow_names,
        } => {
            let body = match template {
                None => json!({"roleName": name}),
                Some(t) => json!({
                    "roleName": name,
                    "template": t,
                    "holdingIds": holding_ids,
                    "flowNames": flow_names,
                }),
            };
            print(&c.post("/api/v1/role", &body)?)
        }
        RoleCommand::List => print(&c.get_all("/api/v1/role", "roles")?),
        RoleCommand::AddPermission {
            role,
            permission_type,
            pattern,
        } => print(&c.post(
            &format!("/api/v1/role/{}/permission", seg(&role)),
            &json!({"permissionType": permission_type, "pattern": pattern}),
        )?),
    }
}
