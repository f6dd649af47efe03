//! The embedded node: every worker in one process over the embedded store
//! and the in-process bus.

use anyhow::Context as _;
use braid_bus::InProcessBus;
use braid_flow::{FlowWorker, WorkerConfig};
use braid_rest::Auth;
use braid_runtime::{Limits, Runtime, RuntimeConfig};
use braid_storage::Store as _;
use braid_storage::embedded::EmbeddedStore;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Settings of an embedded node.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// Directory for the node's store, compiled-package cache and files
    /// (default with --network-config: the data_dir it names).
    #[arg(
        long,
        env = "BRAID_DATA_DIR",
        required_unless_present = "network_config"
    )]
    pub data_dir: Option<PathBuf>,
    /// Join an application network: the node.json that
    /// `braid network bootstrap` wrote for this node (gateway address and
    /// endpoint, TLS certificate and key, network CA and CRL, the map
    /// server's URL, and on the operator's node the map server's settings).
    /// Its group replaces --group.
    #[arg(long, env = "BRAID_NETWORK_CONFIG")]
    pub network_config: Option<PathBuf>,
    /// A message to another node not acknowledged within this many seconds
    /// is given up on and its flow's session fails.
    #[arg(long, env = "BRAID_MESSAGE_TTL_SECS", default_value_t = 86_400)]
    pub message_ttl_secs: u64,
    /// Re-key a link session after sealing this many packets (it is also
    /// re-keyed after an hour).
    #[arg(long, env = "BRAID_LINK_REKEY_PACKETS", default_value_t = 1 << 20)]
    pub link_rekey_packets: u64,
    /// Address of the REST API (port 0 picks a free port; the URL is
    /// written to DATA_DIR/rest.url). Default: the rest_addr of
    /// --network-config, else 127.0.0.1:8888.
    #[arg(long, env = "BRAID_REST_ADDR")]
    pub rest_addr: Option<SocketAddr>,
    /// Flows kept live (with a wasm instance) at once; the rest are
    /// evicted and resumed by replay.
    #[arg(long, env = "BRAID_MAX_LIVE_FLOWS", default_value_t = 2000)]
    pub max_live_flows: usize,
    /// Linear-memory cap per flow, MiB.
    #[arg(long, env = "BRAID_FLOW_MEMORY_MIB", default_value_t = 64)]
    pub flow_memory_mib: usize,
    /// CPU time one flow instance may use, ms.
    #[arg(long, env = "BRAID_FLOW_CPU_MS", default_value_t = 10_000)]
    pub flow_cpu_ms: u64,
    /// Wasm stack limit per flow, KiB.
    #[arg(long, env = "BRAID_FLOW_STACK_KIB", default_value_t = 512)]
    pub flow_stack_kib: usize,
    /// Messages a flow may send without suspending.
    #[arg(
        long,
        env = "BRAID_MAX_OUTBOUND_PER_CHECKPOINT",
        default_value_t = 10_000
    )]
    pub max_outbound_per_checkpoint: usize,
    /// How long a flow's `receive` waits before the session times out, ms.
    #[arg(long, env = "BRAID_SESSION_TIMEOUT_MS", default_value_t = 600_000)]
    pub session_timeout_ms: u64,
    /// Host calls (braid's and WASI's) a flow may make without suspending;
    /// beyond, it fails with HOST_CALL_LIMIT.
    #[arg(
        long,
        env = "BRAID_MAX_HOST_CALLS_PER_CHECKPOINT",
        default_value_t = 1_000_000
    )]
    pub max_host_calls_per_checkpoint: usize,
    /// Largest journal a flow may build up, MiB; beyond, it fails with
    /// JOURNAL_LIMIT.
    #[arg(long, env = "BRAID_FLOW_JOURNAL_MIB", default_value_t = 256)]
    pub flow_journal_mib: usize,
    /// Largest JSON result a flow may return, bytes (stored and served as
    /// is); a larger one fails the flow with RESULT_LIMIT.
    #[arg(long, env = "BRAID_MAX_RESULT_BYTES", default_value_t = 1 << 20)]
    pub max_result_bytes: usize,
    /// Longest failure text kept for a flow, bytes; longer ones are cut
    /// (saying so).
    #[arg(long, env = "BRAID_MAX_ERROR_BYTES", default_value_t = 4096)]
    pub max_error_bytes: usize,
    /// Log text one flow may write per second, bytes (bursts up to four
    /// times that); lines beyond are dropped and counted in the log.
    #[arg(long, env = "BRAID_FLOW_LOG_BYTES_PER_SEC", default_value_t = 16 << 10)]
    pub flow_log_bytes_per_sec: usize,
    /// How long finished flows (status, result, journal) are kept before
    /// they are deleted, seconds (default: 7 days).
    #[arg(long, env = "BRAID_FLOW_RETENTION_SECS", default_value_t = 7 * 86_400)]
    pub flow_retention_secs: u64,
    /// Name of the application network (part of every holding id).
    #[arg(long, env = "BRAID_GROUP", default_value = "default")]
    pub group: String,
    /// The REST API's certificate chain (PEM, leaf first). Without it the
    /// node makes a development CA and certificate under DATA_DIR/tls/
    /// (clients trust DATA_DIR/tls/ca.pem).
    #[arg(long, env = "BRAID_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "BRAID_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra host names or IP addresses clients use to reach the node; the
    /// development certificate is made valid for them (besides localhost,
    /// 127.0.0.1, ::1 and the REST address).
    #[arg(long, env = "BRAID_PUBLIC_HOST", value_delimiter = ',')]
    pub public_host: Vec<String>,
    /// Serve the REST API over plain HTTP instead of HTTPS. Only allowed
    /// when --rest-addr is a loopback address.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure_http: bool,
}

impl NodeArgs {
    /// Defaults for a node under `data_dir` on a free loopback port.
    pub fn local(data_dir: PathBuf) -> NodeArgs {
        NodeArgs {
            data_dir: Some(data_dir),
            network_config: None,
            message_ttl_secs: 86_400,
            link_rekey_packets: 1 << 20,
            rest_addr: Some("127.0.0.1:0".parse().expect("valid")),
            max_live_flows: 2000,
            flow_memory_mib: 64,
            flow_cpu_ms: 10_000,
            flow_stack_kib: 512,
            max_outbound_per_checkpoint: 10_000,
            session_timeout_ms: 600_000,
            max_host_calls_per_checkpoint: 1_000_000,
            flow_journal_mib: 256,
            max_result_bytes: 1 << 20,
            max_error_bytes: 4096,
            flow_log_bytes_per_sec: 16 << 10,
            flow_retention_secs: 7 * 86_400,
            group: "default".into(),
            tls_cert: None,
            tls_key: None,
            public_host: Vec::new(),
            insecure_http: false,
        }
    }
}

/// A started node.
pub struct Node {
    /// Base URL of the REST API.
    pub url: String,
    /// The flow worker.
    pub worker: FlowWorker,
    /// Where the REST server runs.
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The network services (link manager, gateway, map client), when the
    /// node is part of a network; dropping them stops them.
    pub _network: Option<crate::network::Running>,
    store: Arc<EmbeddedStore>,
    stop_rest: Option<tokio::sync::oneshot::Sender<()>>,
}

/// How long a graceful stop waits for REST requests in flight.
const REST_DRAIN: Duration = Duration::from_secs(5);

impl Node {
    /// Stops the node gracefully: the REST API stops accepting and lets
    /// requests in flight finish (for a few seconds), the network services
    /// stop, no flow starts or resumes any more, the commits already sent
    /// to the store finish and the store is closed cleanly, so the next
    /// start needs no repair. Flows resume from their last checkpoint.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop_rest.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(REST_DRAIN, &mut self.server).await {
            Ok(Ok(Err(e))) => tracing::warn!(cause = %e, "REST server ended with an error"),
            Ok(_) => {}
            Err(_) => {
                tracing::info!("REST connections still open after {REST_DRAIN:?}; closing them");
                self.server.abort();
            }
        }
        drop(self._network.take());
        self.worker.stop();
        self.store.close().await;
        tracing::info!("node stopped cleanly");
    }
}

/// Starts every worker; returns once the REST API listens and its URL is
/// in `DATA_DIR/rest.url`.
pub async fn start(args: &NodeArgs) -> anyhow::Result<Node> {
    let net = match &args.network_config {
        Some(path) => Some(
            braid_membership::NodeNetworkConfig::load(path)
                .with_context(|| format!("reading the network configuration {}", path.display()))?,
        ),
        None => None,
    };
    let mut args = args.clone();
    if let Some(n) = &net {
        if args.data_dir.is_none() {
            args.data_dir = Some(n.data_dir.clone());
        }
        args.group = n.group.clone();
        if args.rest_addr.is_none() {
            args.rest_addr = Some(n.rest_addr);
        }
    }
    let rest_addr = *args
        .rest_addr
        .get_or_insert(SocketAddr::from((Ipv4Addr::LOCALHOST, 8888)));
    let args = &args;
    let dir = args.data_dir.as_ref().context("--data-dir is required")?;
    if args.insecure_http && !rest_addr.ip().is_loopback() {
        anyhow::bail!(
            "refusing to serve plain HTTP on {}: --insecure-http is only allowed on a loopback \
             address (127.0.0.1 or ::1); drop --insecure-http to serve HTTPS",
            rest_addr
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let store = Arc::new(
        EmbeddedStore::open(&dir.join("braid.redb"))
            .with_context(|| format!("opening the store in {}", dir.display()))?,
    );
    let runtime = Arc::new(Runtime::new(RuntimeConfig {
        limits: Limits {
            memory_bytes: args.flow_memory_mib << 20,
            stack_bytes: args.flow_stack_kib << 10,
            cpu_budget: Duration::from_millis(args.flow_cpu_ms),
            max_outbound_per_checkpoint: args.max_outbound_per_checkpoint,
            max_host_calls_per_checkpoint: args.max_host_calls_per_checkpoint,
            max_journal_bytes: args.flow_journal_mib << 20,
            max_result_bytes: args.max_result_bytes,
            max_error_bytes: args.max_error_bytes.max(64),
            log_bytes_per_sec: args.flow_log_bytes_per_sec,
            session_timeout: Duration::from_millis(args.session_timeout_ms),
            ..Limits::default()
        },
        max_instances: (args.max_live_flows + 64) as u32,
        cache_dir: dir.join("compiled"),
    })?);
    let (bus, bus_rx) = InProcessBus::new();
    let joining = match &net {
        Some(n) => Some(crate::network::Joining::prepare(n, dir)?),
        None => None,
    };
    let worker = FlowWorker::start_with_remote(
        store.clone(),
        Arc::new(bus),
        bus_rx,
        runtime,
        WorkerConfig {
            max_live_flows: args.max_live_flows,
            group: args.group.clone(),
            retention: Duration::from_secs(args.flow_retention_secs),
        },
        joining.as_ref().map(|j| j.remote()),
    )
    .await?;
    let network = match (joining, &net) {
        (Some(j), Some(n)) => Some(
            j.start(
                n,
                worker.clone(),
                braid_p2p::P2pConfig {
                    ttl: Duration::from_secs(args.message_ttl_secs),
                    link: braid_link::LinkConfig {
                        rekey_after_packets: args.link_rekey_packets.max(1),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await?,
        ),
        _ => None,
    };
    let auth = Arc::new(
        Auth::init(
            store.clone(),
            std::env::var("BRAID_ADMIN_PASSWORD").ok(),
            &dir.join("admin-password"),
        )
        .await?,
    );
    let listener = tokio::net::TcpListener::bind(rest_addr)
        .await
        .with_context(|| format!("binding the REST API to {rest_addr}"))?;
    let mut local = listener.local_addr()?;
    // A wildcard address is not something to connect to; local clients
    // reach it on loopback.
    if local.ip().is_unspecified() {
        local.set_ip(match local {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let (stop_rest, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stopped.await;
    };
    let server = if args.insecure_http {
        tracing::warn!("serving the REST API over plain HTTP (--insecure-http)");
        tokio::spawn(braid_rest::run(listener, worker.clone(), auth, stopped))
    } else {
        let tls = tls_config(args)?;
        tokio::spawn(braid_rest::run_tls(
            listener,
            tls,
            worker.clone(),
            auth,
            stopped,
        ))
    };
    let scheme = if args.insecure_http { "http" } else { "https" };
    let url = format!("{scheme}://{local}");
    let tmp = dir.join("rest.url.tmp");
    std::fs::write(&tmp, &url)?;
    std::fs::rename(&tmp, dir.join("rest.url"))?;
    tracing::info!(%url, data_dir = %dir.display(), "node started");
    Ok(Node {
        url,
        worker,
        server,
        _network: network,
        store,
        stop_rest: Some(stop_rest),
    })
}

/// The REST API's TLS configuration: the operator's certificate, else the
/// development one under DATA_DIR/tls/ (made on first start).
fn tls_config(args: &NodeArgs) -> anyhow::Result<Arc<braid_rest::tls::ServerConfig>> {
    use braid_rest::tls;
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let mut names = args.public_host.clone();
            if let Some(addr) = args.rest_addr.filter(|a| !a.ip().is_unspecified()) {
                names.push(addr.ip().to_string());
            }
            let dir = args.data_dir.as_ref().context("--data-dir is required")?;
            let dev = tls::danger::dev_certificate(&dir.join("tls"), &names)
                .context("making the development TLS certificate")?;
            tracing::info!(
                ca = %dev.ca_pem.display(),
                "serving HTTPS with a development certificate; clients trust the CA file"
            );
            (dev.cert_pem, dev.key_pem)
        }
    };
    tls::server_config(&cert, &key).with_context(|| {
        format!(
            "loading the REST API's TLS certificate {} and key {}",
            cert.display(),
            key.display()
        )
    })
}
