//! The `braid` binary: runs a node, builds packages, runs the demo and the
//! benchmark.

mod bench;
mod node;
mod package;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// braid: multi-party workflows as sandboxed WebAssembly flows.
#[derive(Parser)]
#[command(name = "braid", version, about, long_about = None)]
struct Cli {
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
    /// Build flow packages.
    Package {
        #[command(subcommand)]
        command: PackageCommand,
    },
    /// Start an embedded node with two example vnodes, run `ping` between
    /// them and print the result.
    ///
    /// Example: braid demo
    Demo {
        /// Keep the node's data here (default: a fresh temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
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
    Start(node::NodeArgs),
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,wasmtime=warn,cranelift=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Package {
            command: PackageCommand::Build { crate_dir, output },
        } => {
            let out = package::build(&crate_dir, &output)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Node {
            command: NodeCommand::Start(args),
        } => runtime()?.block_on(async {
            let node = node::start(&args).await?;
            tokio::select! {
                r = node.server => { r??; Ok(()) }
                _ = tokio::signal::ctrl_c() => { tracing::info!("stopping"); Ok(()) }
            }
        }),
        Command::Demo { data_dir } => runtime()?.block_on(demo(data_dir)),
        Command::Bench(args) => runtime()?.block_on(bench::run(args)),
    }
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
    eprintln!("building the ping package...");
    let wasm = package::build(&examples_dir().join("ping"), &dir.join("ping.wasm"))?;
    let password = "demo-password";
    // SAFETY of env: single-threaded at this point of the demo's start.
    if std::env::var("BRAID_ADMIN_PASSWORD").is_err() {
        #[allow(unsafe_code)]
        // SAFETY: no other thread reads or writes the environment yet.
        unsafe {
            std::env::set_var("BRAID_ADMIN_PASSWORD", password)
        };
    }
    let password = std::env::var("BRAID_ADMIN_PASSWORD")?;
    let node = node::start(&node::NodeArgs::local(dir.join("node"))).await?;
    eprintln!("node listening at {} (data in {})", node.url, dir.display());
    let http = reqwest::Client::new();
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
    let mut holding = Vec::new();
    for name in ["O=Alice, L=London, C=GB", "O=Bob, L=New York, C=US"] {
        let v: serde_json::Value = http
            .post(api("virtualnode"))
            .basic_auth("admin", Some(&password))
            .json(&serde_json::json!({"x500Name": name, "packageChecksum": checksum}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        eprintln!("vnode {name}: holdingId {}", v["holdingId"]);
        holding.push(v["holdingId"].as_str().context("no holdingId")?.to_owned());
    }
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
                return Ok(());
            }
            Some("FAILED") | Some("KILLED") => anyhow::bail!("ping ended badly: {s}"),
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}
