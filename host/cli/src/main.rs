//! The `braid` binary: runs a node, builds packages, runs the demo and the
//! benchmark, and is a client of a node's REST API (packages, vnodes,
//! flows, users, roles).

mod bench;
mod client;
mod commands;
mod journal;
mod network;
mod node;
mod p2p_adapters;
mod package;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code of a command that failed (request refused, node unreachable,
/// bad input...). `flow start --wait` and `flow watch` use 0, 1 and 2 for
/// how the flow ended.
const ERROR_EXIT: u8 = 3;

/// braid: multi-party workflows as sandboxed WebAssembly flows.
///
/// Client commands (package upload/list, vnode, flow, user, role) talk to a
/// node's REST API over HTTPS. Say where once with braid init, or per
/// command with --url/--ca/--user or BRAID_URL, BRAID_CA, BRAID_USER; the
/// password always comes from the environment (BRAID_PASSWORD).
///
/// Example:
///   braid init --url https://127.0.0.1:8888 --ca node1/tls/ca.pem --user admin
///   export BRAID_PASSWORD=secret
///   braid package upload ping.wasm
///   braid flow start 1a2b3c4d5e6f ping --body '{"counterparty":"O=Bob, L=New York, C=US","n":1}' --wait
#[derive(Parser)]
#[command(name = "braid", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    conn: client::ConnArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run and manage nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Write the client profile (URL, CA, user) used by the client
    /// commands, to ~/.config/braid/config.toml or $BRAID_CONFIG.
    ///
    /// Example: braid init --url https://127.0.0.1:8888 --ca ./node1/tls/ca.pem --user admin
    Init {
        /// Read the password from this environment variable instead of
        /// BRAID_PASSWORD (BRAID_PASSWORD still wins when set).
        #[arg(long)]
        password_env: Option<String>,
    },
    /// Build, upload and list flow packages.
    Package {
        #[command(subcommand)]
        command: PackageCommand,
    },
    /// Create, list and upgrade virtual nodes.
    Vnode {
        #[command(subcommand)]
        command: commands::VnodeCommand,
    },
    /// Start, follow, list and kill flows.
    Flow {
        #[command(subcommand)]
        command: commands::FlowCommand,
    },
    /// Manage users (and their roles).
    User {
        #[command(subcommand)]
        command: commands::UserCommand,
    },
    /// Manage roles (and their permissions).
    Role {
        #[command(subcommand)]
        command: commands::RoleCommand,
    },
    /// Start an embedded demo network (two nodes from a freshly bootstrapped
    /// network, mutual TLS between their gateways), create Alice on one and
    /// Bob on the other, run `ping` between them and print the result.
    ///
    /// Example: braid demo
    Demo {
        /// Keep the node's data here (default: a fresh temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Create development networks and manage their certificates.
    Network {
        #[command(subcommand)]
        command: network::NetworkCommand,
    },
    /// Measure ping flows between two vnodes of one embedded node and print
    /// the figures as one JSON line.
    ///
    /// Example: braid bench --flows 20000
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Run an embedded node (every worker in one process) until killed.
    ///
    /// Example: braid node start --data-dir ./node1 --rest-addr 127.0.0.1:0
    // Boxed: the node's settings would make every command's variant large.
    Start(Box<node::NodeArgs>),
}

#[derive(Subcommand)]
enum PackageCommand {
    /// Build an app crate into a flow package (a wasm component).
    ///
    /// Example: braid package build examples-flows/ping -o ping.wasm
    Build {
        /// The app crate's directory (holding its Cargo.toml).
        crate_dir: PathBuf,
        /// Where to write the package.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Upload a package to the node; prints its checksum and flows.
    ///
    /// Example: braid package upload ping.wasm
    Upload {
        /// The package (.wasm) file.
        file: PathBuf,
    },
    /// List the node's packages.
    ///
    /// Example: braid package list
    List,
    /// Before an upgrade: upload a package and replay the journals of a
    /// virtual node's unfinished flows against it, running nothing live.
    /// Prints, per flow, whether it replays cleanly or where it diverges;
    /// exits 0 when all replay cleanly, 1 when one does not.
    ///
    /// Example: braid package check-upgrade ping-v2.wasm --vnode 1a2b3c4d5e6f
    CheckUpgrade {
        /// The new package (.wasm) file.
        file: PathBuf,
        /// The virtual node whose flows to replay.
        #[arg(long)]
        vnode: String,
        /// Print the REST API's JSON instead.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The demo prints what it does and its result; its nodes' logs go to a
    // file it names.
    let demo_log = match &mut cli.command {
        Command::Demo { data_dir } => {
            let dir = data_dir
                .get_or_insert_with(|| {
                    std::env::temp_dir().join(format!("braid-demo-{}", std::process::id()))
                })
                .clone();
            let file = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::File::create(dir.join("braid.log")));
            match file {
                Ok(f) => Some((dir.join("braid.log"), f)),
                Err(e) => {
                    eprintln!(
                        "error: cannot write the demo's log in {}: {e}",
                        dir.display()
                    );
                    return ExitCode::from(ERROR_EXIT);
                }
            }
        }
        _ => None,
    };
    let local = matches!(
        cli.command,
        Command::Node { .. } | Command::Demo { .. } | Command::Bench(_) | Command::Network { .. }
    );
    // Client commands print what they fetched; keep their stderr quiet.
    let default_filter = if local {
        "info,wasmtime=warn,cranelift=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // When the log cannot be written (its file is on a full disk), the line
    // is lost; by default tracing would report that with `eprintln!`, which
    // panics on the same error in whatever thread logged (the store's
    // writer, a flow), taking it down.
    match demo_log {
        Some((path, file)) => {
            eprintln!("the nodes' logs: {}", path.display());
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .log_internal_errors(false)
                .init();
        }
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .init(),
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(ERROR_EXIT)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let conn = cli.conn;
    match cli.command {
        Command::Package {
            command: PackageCommand::Build { crate_dir, output },
        } => {
            let out = package::build(&crate_dir, &output)?;
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Package {
            command: PackageCommand::Upload { file },
        } => commands::package_upload(&conn.client()?, &file),
        Command::Package {
            command: PackageCommand::List,
        } => commands::package_list(&conn.client()?),
        Command::Package {
            command: PackageCommand::CheckUpgrade { file, vnode, json },
        } => commands::check_upgrade(&conn.client()?, &file, &vnode, json),
        Command::Init { password_env } => {
            let path = conn.init(password_env)?;
            eprintln!("wrote {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Vnode { command } => commands::vnode(&conn.client()?, command),
        Command::Flow { command } => commands::flow(&conn.client()?, command),
        Command::User { command } => commands::user(&conn.client()?, command),
        Command::Role { command } => commands::role(&conn.client()?, command),
        Command::Node {
            command: NodeCommand::Start(args),
        } => {
            let rt = runtime()?;
            let code = rt.block_on(run_node(*args));
            // Tasks still running (flows, connections) are abandoned: their
            // state is in the store, which is closed by now.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
        Command::Network { command } => network::run(command).map(|()| ExitCode::SUCCESS),
        Command::Demo { data_dir } => runtime()?
            .block_on(demo(data_dir))
            .map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => runtime()?
            .block_on(bench::run(args))
            .map(|()| ExitCode::SUCCESS),
    }
}

/// Runs a node until SIGTERM or SIGINT (Ctrl-C), then stops it gracefully
/// (see [`node::Node::shutdown`]); a second signal exits at once.
async fn run_node(args: node::NodeArgs) -> anyhow::Result<ExitCode> {
    // Listen before starting: a stop requested while the node starts (a
    // repair of a large store can take a while) is a stop, not a crash.
    let mut stop = Box::pin(stop_signal()?);
    let node = tokio::select! {
        node = node::start(&args) => node?,
        why = &mut stop => {
            // Dropping the half-started node closes the store cleanly.
            tracing::info!("{why} while starting: stopped");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let mut node = node;
    let why = tokio::select! {
        r = &mut node.server => {
            r??;
            anyhow::bail!("the REST server stopped");
        }
        why = &mut stop => why,
    };
    tracing::info!("{why}: stopping gracefully (send it again to stop at once)");
    let again = stop_signal()?;
    tokio::spawn(async move {
        let why = again.await;
        tracing::warn!("{why} again: exiting without finishing the graceful stop");
        std::process::exit(i32::from(ERROR_EXIT));
    });
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Completes with the signal's name at the next SIGTERM or SIGINT.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The repository's example apps, as found from this binary's sources.
fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples-flows")
}

async fn demo(data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = data_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("braid-demo-{}", std::process::id())));
    if dir.join("network").exists() {
        anyhow::bail!(
            "{} already holds a demo network; give a new --data-dir (or none for a fresh \
             temporary one)",
            dir.display()
        );
    }
    eprintln!("building the ping package...");
    let wasm = package::build(&examples_dir().join("ping"), &dir.join("ping.wasm"))?;
    if std::env::var("BRAID_ADMIN_PASSWORD").is_err() {
        #[allow(unsafe_code)]
        // SAFETY: no other thread reads or writes the environment yet.
        unsafe {
            std::env::set_var("BRAID_ADMIN_PASSWORD", "demo-password")
        };
    }
    let password = std::env::var("BRAID_ADMIN_PASSWORD")?;

    // A two-node network, as `braid network bootstrap` makes it: its own CA,
    // mutual TLS between the gateways, the first node runs the network map.
    let (net, started) =
        network::start_local_network(&dir.join("network"), &["alpha", "beta"]).await?;
    let parties = ["O=Alice, L=London, C=GB", "O=Bob, L=New York, C=US"];
    let mut nodes = Vec::new();
    let mut holding = Vec::new();
    for ((name, n), node) in parties.into_iter().zip(&net.nodes).zip(started) {
        eprintln!(
            "node {}: REST {}, gateway {}",
            n.name, node.url, n.config.gateway_endpoint
        );
        let http = client::async_client(&n.config.data_dir.join("tls/ca.pem"))?;
        let api = |path: &str| format!("{}/api/v1/{path}", node.url);
        let pkg: serde_json::Value = http
            .post(api("package"))
            .basic_auth("admin", Some(&password))
            .header("content-type", "application/wasm")
            .body(std::fs::read(&wasm)?)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let checksum = pkg["checksum"].as_str().context("no checksum")?.to_owned();
        let v: serde_json::Value = http
            .post(api("virtualnode"))
            .basic_auth("admin", Some(&password))
            .json(&serde_json::json!({"x500Name": name, "packageChecksum": checksum}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        eprintln!("  vnode {name}: holdingId {}", v["holdingId"]);
        holding.push(v["holdingId"].as_str().context("no holdingId")?.to_owned());
        nodes.push((node, http));
    }

    // Wait until each node's copy of the network map lists both vnodes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for (node, http) in &nodes {
        loop {
            let v: serde_json::Value = http
                .get(format!("{}/api/v1/network", node.url))
                .basic_auth("admin", Some(&password))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let listed = v["members"].as_array().map_or(0, Vec::len);
            if listed >= parties.len() {
                break;
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("the network map did not list both vnodes within 60 s: {v}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    eprintln!("both nodes hold the network map; Alice (alpha) pings Bob (beta)...");

    let (alpha, http) = &nodes[0];
    let api = |path: &str| format!("{}/api/v1/{path}", alpha.url);
    let request = serde_json::json!({
        "clientRequestId": "demo-1",
        "flowName": "ping",
        "requestBody": {"counterparty": "O=Bob, L=New York, C=US", "n": 41, "delayMs": 250}
    });
    http.post(api(&format!("flow/{}", holding[0])))
        .basic_auth("admin", Some(&password))
        .json(&request)
        .send()
        .await?
        .error_for_status()?;
    loop {
        let s: serde_json::Value = http
            .get(api(&format!("flow/{}/demo-1", holding[0])))
            .basic_auth("admin", Some(&password))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        match s["status"].as_str() {
            Some("COMPLETED") => {
                println!("{}", serde_json::to_string_pretty(&s)?);
                eprintln!("(data in {})", dir.display());
                return Ok(());
            }
            Some("FAILED") | Some("KILLED") => anyhow::bail!("ping ended badly: {s}"),
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}
