//! The embedded node: every worker in one process over the embedded store
//! and the in-process bus.

use anyhow::Context as _;
use braid_bus::InProcessBus;
use braid_flow::cluster::ClusterRole;
use braid_flow::{FlowWorker, WorkerConfig};
use braid_http::Limits as ServerLimits;
use braid_rest::Auth;
use braid_runtime::{Limits, Runtime, RuntimeConfig};
use braid_storage::Store;
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
    /// Where the node keeps its state: `embedded` (the default: a file
    /// database under DATA_DIR) or a PostgreSQL database
    /// (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`; its schema is
    /// created and migrated at start; one node per database).
    #[arg(long, env = "BRAID_STORE", default_value = "embedded")]
    pub store: String,
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
    /// Status changes kept for event streams: how far a stream's client may
    /// fall behind (or how old a Last-Event-ID it may resume from) before
    /// it gets a `resync` event. About 300 bytes each, 16 MiB at most.
    #[arg(long, env = "BRAID_STATUS_EVENTS", default_value_t = braid_flow::events::DEFAULT_CAPACITY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub status_events: usize,
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
    /// Connection limits and timeouts of the REST API and the gateway
    /// (boxed: they would make every command's enum variant large).
    #[command(flatten)]
    pub connections: Box<ConnectionArgs>,
    /// Cluster mode: the bus and this process's roles.
    #[command(flatten)]
    pub cluster: Box<ClusterArgs>,
}

/// Cluster mode: workers in separate processes that meet on a Kafka bus
/// and a PostgreSQL store (see docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ClusterArgs {
    /// The bus between workers: `embedded` (the default: every worker in
    /// this process) or Kafka, `kafka://HOST:PORT[,HOST:PORT...]` (needs a
    /// PostgreSQL --store, which every worker of the cluster shares).
    #[arg(long, env = "BRAID_BUS", default_value = "embedded")]
    pub bus: String,
    /// A librdkafka setting for every Kafka client, `KEY=VALUE`
    /// (`security.protocol=SASL_SSL`, `sasl.mechanism=SCRAM-SHA-512`,
    /// `ssl.ca.location=...`); repeat for several.
    #[arg(long = "bus-option", env = "BRAID_BUS_OPTIONS", value_delimiter = ';', value_parser = parse_option)]
    pub bus_options: Vec<(String, String)>,
    /// The workers this process runs, comma-separated, from `rest`,
    /// `flow`, `link`, `gateway`, `membership`; `all` (the default) is the
    /// embedded node. With --bus kafka:// only `rest` and `flow` run as
    /// separate workers so far.
    #[arg(
        long,
        env = "BRAID_ROLES",
        default_value = "all",
        value_delimiter = ','
    )]
    pub roles: Vec<Role>,
    /// Partitions of the flow-event topic: the unit in which flow workers
    /// share flows (more than the flow workers you will ever run). Fixed
    /// once the topic exists.
    #[arg(long, env = "BRAID_FLOW_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub flow_partitions: u16,
    /// Prefix of the topics braid creates and uses (several clusters can
    /// share brokers with different prefixes).
    #[arg(long, env = "BRAID_TOPIC_PREFIX", default_value = "braid.")]
    pub topic_prefix: String,
    /// Replication factor of topics braid creates (production: 3, with the
    /// brokers' min.insync.replicas=2).
    #[arg(long, env = "BRAID_BUS_REPLICATION", default_value_t = 1, value_parser = clap::value_parser!(i16).range(1..))]
    pub bus_replication: i16,
    /// How long a flow worker may go silent before the group hands its
    /// partitions to the others, ms (Kafka's session.timeout.ms).
    #[arg(long, env = "BRAID_BUS_SESSION_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1000..))]
    pub bus_session_timeout_ms: u64,
}

/// A worker role of `--roles`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Every role (the embedded node).
    All,
    /// The REST API.
    Rest,
    /// The flow worker.
    Flow,
    /// The link manager.
    Link,
    /// The gateway.
    Gateway,
    /// The network-map client (and server, on the operator's node).
    Membership,
}

fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

impl Default for ClusterArgs {
    /// The flags' defaults.
    fn default() -> Self {
        ClusterArgs {
            bus: "embedded".into(),
            bus_options: Vec::new(),
            roles: vec![Role::All],
            flow_partitions: 16,
            topic_prefix: "braid.".into(),
            bus_replication: 1,
            bus_session_timeout_ms: 10_000,
        }
    }
}

impl ClusterArgs {
    /// Whether this process runs `role`.
    pub fn runs(&self, role: Role) -> bool {
        self.roles.iter().any(|r| *r == Role::All || *r == role)
    }
}

/// How many connections the REST API and the gateway keep open, and how
/// long a client may stall before it is disconnected. Timeouts are in
/// seconds and at least 1.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ConnectionArgs {
    /// The most connections the REST API keeps open at once; further ones
    /// are closed at once. Default: from the file-descriptor limit (which
    /// the node raises to its hard limit at start): a quarter of it for
    /// each server, between 64 and 4096.
    #[arg(long, env = "BRAID_REST_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_max_connections: Option<u64>,
    /// Seconds a REST client has to complete its TLS handshake.
    #[arg(long, env = "BRAID_REST_TLS_HANDSHAKE_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_HANDSHAKE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_tls_handshake_timeout_secs: u64,
    /// Seconds a REST client has to send a request header (from the
    /// connection's start, or from the first byte of a later request).
    #[arg(long, env = "BRAID_REST_HEADER_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_HEADER_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_header_timeout_secs: u64,
    /// Seconds an idle keep-alive REST connection stays open.
    #[arg(long, env = "BRAID_REST_IDLE_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_IDLE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_idle_timeout_secs: u64,
    /// Seconds a REST client has to send a whole request body (a package
    /// upload included); a slower one is answered 408 and disconnected.
    #[arg(long, env = "BRAID_REST_BODY_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_BODY_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_body_timeout_secs: u64,
    /// Seconds a REST client may read nothing of what it is sent before it
    /// is disconnected.
    #[arg(long, env = "BRAID_REST_WRITE_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_WRITE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_write_timeout_secs: u64,
    /// On shutdown, seconds the REST API lets requests under way finish
    /// (event streams are then closed).
    #[arg(long, env = "BRAID_REST_SHUTDOWN_GRACE_SECS", default_value_t = secs(ServerLimits::DEFAULT_SHUTDOWN_GRACE))]
    pub rest_shutdown_grace_secs: u64,
    /// The most connections the gateway keeps open at once; further ones
    /// are closed at once. Default: as for --rest-max-connections.
    #[arg(long, env = "BRAID_GATEWAY_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_max_connections: Option<u64>,
    /// Seconds a peer gateway has to complete its TLS handshake.
    #[arg(long, env = "BRAID_GATEWAY_TLS_HANDSHAKE_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_HANDSHAKE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_tls_handshake_timeout_secs: u64,
    /// Seconds a peer gateway has to send a request header.
    #[arg(long, env = "BRAID_GATEWAY_HEADER_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_HEADER_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_header_timeout_secs: u64,
    /// Seconds an idle keep-alive gateway connection stays open.
    #[arg(long, env = "BRAID_GATEWAY_IDLE_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_IDLE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_idle_timeout_secs: u64,
    /// Seconds a peer gateway has to send a whole batch; a slower one is
    /// answered 408 and disconnected.
    #[arg(long, env = "BRAID_GATEWAY_BODY_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_BODY_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_body_timeout_secs: u64,
    /// Seconds a peer gateway may read nothing of its answer before it is
    /// disconnected.
    #[arg(long, env = "BRAID_GATEWAY_WRITE_TIMEOUT_SECS", default_value_t = secs(ServerLimits::DEFAULT_WRITE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_write_timeout_secs: u64,
}

const fn secs(d: std::time::Duration) -> u64 {
    d.as_secs()
}

impl Default for ConnectionArgs {
    /// The flags' defaults.
    fn default() -> Self {
        let s = |d| secs(d);
        ConnectionArgs {
            rest_max_connections: None,
            rest_tls_handshake_timeout_secs: s(ServerLimits::DEFAULT_HANDSHAKE_TIMEOUT),
            rest_header_timeout_secs: s(ServerLimits::DEFAULT_HEADER_TIMEOUT),
            rest_idle_timeout_secs: s(ServerLimits::DEFAULT_IDLE_TIMEOUT),
            rest_body_timeout_secs: s(ServerLimits::DEFAULT_BODY_TIMEOUT),
            rest_write_timeout_secs: s(ServerLimits::DEFAULT_WRITE_TIMEOUT),
            rest_shutdown_grace_secs: s(ServerLimits::DEFAULT_SHUTDOWN_GRACE),
            gateway_max_connections: None,
            gateway_tls_handshake_timeout_secs: s(ServerLimits::DEFAULT_HANDSHAKE_TIMEOUT),
            gateway_header_timeout_secs: s(ServerLimits::DEFAULT_HEADER_TIMEOUT),
            gateway_idle_timeout_secs: s(ServerLimits::DEFAULT_IDLE_TIMEOUT),
            gateway_body_timeout_secs: s(ServerLimits::DEFAULT_BODY_TIMEOUT),
            gateway_write_timeout_secs: s(ServerLimits::DEFAULT_WRITE_TIMEOUT),
        }
    }
}

/// File descriptors kept back for everything but client connections (the
/// store, compiled packages, outgoing connections, logs).
const RESERVED_FDS: u64 = 256;

impl ConnectionArgs {
    /// The default connection limit of each server for a process allowed
    /// `fd_limit` open files: a quarter of what is left after
    /// [`RESERVED_FDS`], between 64 and 4096 (a few KiB of buffers per
    /// connection; past that, memory rather than descriptors is the bound).
    pub fn default_max_connections(fd_limit: u64) -> u64 {
        (fd_limit.saturating_sub(RESERVED_FDS) / 4).clamp(64, 4096)
    }

    /// The REST API's limits, for a process allowed `fd_limit` open files.
    pub fn rest(&self, fd_limit: u64) -> ServerLimits {
        ServerLimits {
            max_connections: to_usize(
                self.rest_max_connections
                    .unwrap_or_else(|| Self::default_max_connections(fd_limit)),
            ),
            handshake_timeout: Duration::from_secs(self.rest_tls_handshake_timeout_secs),
            header_timeout: Duration::from_secs(self.rest_header_timeout_secs),
            idle_timeout: Duration::from_secs(self.rest_idle_timeout_secs),
            body_timeout: Duration::from_secs(self.rest_body_timeout_secs),
            write_timeout: Duration::from_secs(self.rest_write_timeout_secs),
            shutdown_grace: Duration::from_secs(self.rest_shutdown_grace_secs),
        }
    }

    /// The gateway's limits, for a process allowed `fd_limit` open files.
    pub fn gateway(&self, fd_limit: u64) -> ServerLimits {
        ServerLimits {
            max_connections: to_usize(
                self.gateway_max_connections
                    .unwrap_or_else(|| Self::default_max_connections(fd_limit)),
            ),
            handshake_timeout: Duration::from_secs(self.gateway_tls_handshake_timeout_secs),
            header_timeout: Duration::from_secs(self.gateway_header_timeout_secs),
            idle_timeout: Duration::from_secs(self.gateway_idle_timeout_secs),
            body_timeout: Duration::from_secs(self.gateway_body_timeout_secs),
            write_timeout: Duration::from_secs(self.gateway_write_timeout_secs),
            ..ServerLimits::default()
        }
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Raises the soft limit on open files to the hard limit (every connection
/// is a file descriptor, and the usual soft default of 1024 is small for a
/// server) and returns the soft limit now in force.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(cause = %e, "cannot read the open-file limit; assuming 1024");
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            let e = std::io::Error::last_os_error();
            tracing::info!(cause = %e, soft = lim.rlim_cur, hard = lim.rlim_max,
                "cannot raise the open-file limit to its hard limit; keeping the soft one");
        }
    }
    lim.rlim_cur
}

/// Where there is no RLIMIT_NOFILE: a conservative guess.
#[cfg(not(unix))]
pub fn raise_fd_limit() -> u64 {
    1024
}

impl NodeArgs {
    /// Defaults for a node under `data_dir` on a free loopback port.
    pub fn local(data_dir: PathBuf) -> NodeArgs {
        NodeArgs {
            data_dir: Some(data_dir),
            network_config: None,
            store: "embedded".into(),
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
            status_events: braid_flow::events::DEFAULT_CAPACITY,
            group: "default".into(),
            tls_cert: None,
            tls_key: None,
            public_host: Vec::new(),
            insecure_http: false,
            connections: Box::default(),
            cluster: Box::default(),
        }
    }
}

/// How often a REST worker of a cluster reloads users and roles (a change
/// made through one is enforced by all within this time).
const RBAC_RELOAD: Duration = Duration::from_secs(2);

/// How long a graceful stop waits for live flows to reach a suspension.
const FLOW_DRAIN: Duration = Duration::from_secs(3);

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
    store: Arc<dyn Store>,
    stop_rest: Option<tokio::sync::oneshot::Sender<()>>,
    /// How long a graceful stop waits for the REST server: its own grace
    /// for requests under way, and a little to close what is left.
    rest_drain: Duration,
}

impl Node {
    /// Stops the node gracefully: the REST API stops accepting and lets
    /// requests in flight finish (for a few seconds), the network services
    /// stop, no flow starts or resumes any more, the commits already sent
    /// to the store finish and the store is closed cleanly, so the next
    /// start needs no repair. Flows resume from their last checkpoint.
    pub async fn shutdown(mut self) {
        // Status streams never end by themselves: end them first so that
        // the REST server can drain at once.
        self.worker.events().close();
        match self.stop_rest.take() {
            Some(stop) => {
                let _ = stop.send(());
                let drain = self.rest_drain;
                match tokio::time::timeout(drain, &mut self.server).await {
                    Ok(Ok(Err(e))) => {
                        tracing::warn!(cause = %e, "REST server ended with an error")
                    }
                    Ok(_) => {}
                    Err(_) => {
                        tracing::info!("REST connections still open after {drain:?}; closing them");
                        self.server.abort();
                    }
                }
            }
            // No REST API in this process.
            None => self.server.abort(),
        }
        drop(self._network.take());
        self.worker.stop();
        // Live flows are told to stop at their next suspension; let them
        // (they read the store as they go) before the store closes.
        let stopped = tokio::time::timeout(FLOW_DRAIN, async {
            while self.worker.counts().0 > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if stopped.is_err() {
            tracing::info!(
                live = self.worker.counts().0,
                "flows still running after {FLOW_DRAIN:?}; they resume from their last \
                 checkpoint at the next start"
            );
        }
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
    let fd_limit = raise_fd_limit();
    let rest_limits = args.connections.rest(fd_limit);
    let rest_drain = rest_limits.shutdown_grace + Duration::from_secs(2);
    let gateway_limits = args.connections.gateway(fd_limit);
    let wanted = (rest_limits.max_connections as u64).saturating_add(if net.is_some() {
        gateway_limits.max_connections as u64
    } else {
        0
    });
    if wanted.saturating_add(RESERVED_FDS) > fd_limit {
        tracing::warn!(
            fd_limit,
            rest = rest_limits.max_connections,
            gateway = gateway_limits.max_connections,
            "the connection limits add up to more than the open-file limit allows: \
             past it, connections fail with \"too many open files\"; lower \
             --rest-max-connections / --gateway-max-connections or raise the limit"
        );
    }
    tracing::info!(
        fd_limit,
        rest_max_connections = rest_limits.max_connections,
        gateway_max_connections = gateway_limits.max_connections,
        "connection limits"
    );
    let store = open_store(&args.store, dir).await?;
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
    let config = WorkerConfig {
        max_live_flows: args.max_live_flows,
        group: args.group.clone(),
        retention: Duration::from_secs(args.flow_retention_secs),
        status_events: args.status_events,
        early_message_ttl: Duration::from_secs(args.message_ttl_secs),
    };
    let cluster = cluster_config(args, net.is_some()).await?;
    let joining = match (&net, &cluster) {
        (Some(n), None) => Some(crate::network::Joining::prepare(n, dir)?),
        _ => None,
    };
    // In a cluster: the bus and topics the network services use, and the
    // tasks that keep them.
    let mut services: Option<crate::network::Running> = None;
    let cluster_bus = cluster.as_ref().map(|c| (c.bus.clone(), c.topics.clone()));
    let worker = match cluster {
        Some(mut c) => {
            if let (Some(n), ClusterRole::Flows) = (&net, c.role) {
                let (remote, running) = crate::network::cluster_remote(
                    n,
                    dir,
                    c.bus.clone(),
                    c.topics.p2p_out.clone(),
                )?;
                c.remote = Some(remote);
                services = Some(running);
            }
            FlowWorker::start_cluster(store.clone(), runtime, config, c).await?
        }
        None => {
            let (bus, bus_rx) = InProcessBus::new();
            FlowWorker::start_with_remote(
                store.clone(),
                Arc::new(bus),
                bus_rx,
                runtime,
                config,
                joining.as_ref().map(|j| j.remote()),
            )
            .await?
        }
    };
    let p2p_config = braid_p2p::P2pConfig {
        ttl: Duration::from_secs(args.message_ttl_secs),
        link: braid_link::LinkConfig {
            rekey_after_packets: args.link_rekey_packets.max(1),
            ..Default::default()
        },
        ..Default::default()
    };
    if let (Some((bus, topics)), Some(n)) = (&cluster_bus, &net)
        && (args.cluster.runs(Role::Link) || args.cluster.runs(Role::Gateway))
    {
        // This cluster's link manager and membership client (fed from the
        // p2p.out topic; what arrives goes onto flow.event) and gateway:
        // in one process, or the gateway apart (they meet on link.out and
        // link.in).
        let gateway = args.cluster.runs(Role::Gateway);
        let mut running = if !args.cluster.runs(Role::Link) {
            let r = crate::network::run_gateway(
                n,
                dir,
                store.clone(),
                gateway_limits.clone(),
                bus.clone(),
                topics,
            )
            .await?;
            tracing::info!("gateway started");
            r
        } else {
            let j = crate::network::Joining::prepare(n, dir)?;
            let port = j.remote();
            let mut r = if gateway {
                j.start(
                    n,
                    worker.clone(),
                    gateway_limits.clone(),
                    p2p_config.clone(),
                )
                .await?
            } else {
                j.start_links_on_bus(n, worker.clone(), p2p_config.clone(), bus.clone(), topics)
                    .await?
            };
            r.keep(
                crate::network::feed_links(
                    worker.clone(),
                    port,
                    bus.clone(),
                    topics.p2p_out.clone(),
                )
                .await?,
            );
            tracing::info!(gateway, "link manager and membership client started");
            r
        };
        if let Some(s) = services.take() {
            running.absorb(s);
        }
        services = Some(running);
    }
    if let (Some(_), Some(n), true, None) = (
        &cluster_bus,
        &net,
        args.cluster.runs(Role::Rest),
        worker.network(),
    ) {
        let r = crate::network::cluster_rest_network(n, dir, &worker)?;
        match services.as_mut() {
            Some(s) => s.absorb(r),
            None => services = Some(r),
        }
    }
    if !args.cluster.runs(Role::Rest) {
        if args.cluster.runs(Role::Flow) {
            tracing::info!(
                partitions = args.cluster.flow_partitions,
                "flow worker started (no REST API in this process)"
            );
        } else {
            tracing::info!(
                roles = ?args.cluster.roles,
                "network worker started (no REST API in this process)"
            );
        }
        return Ok(Node {
            url: String::new(),
            worker,
            server: tokio::spawn(std::future::pending()),
            _network: services,
            store,
            stop_rest: None,
            rest_drain,
        });
    }
    let network = match (joining, &net) {
        (Some(j), Some(n)) => Some(
            j.start(n, worker.clone(), gateway_limits, p2p_config)
                .await?,
        ),
        _ => services,
    };
    let auth = Arc::new(
        Auth::init(
            store.clone(),
            std::env::var("BRAID_ADMIN_PASSWORD").ok(),
            &dir.join("admin-password"),
        )
        .await?,
    );
    if args.cluster.bus != "embedded" {
        // Other REST workers change users and roles too.
        Auth::follow_store(&auth, RBAC_RELOAD);
    }
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
        tokio::spawn(braid_rest::run(
            listener,
            rest_limits,
            worker.clone(),
            auth,
            stopped,
        ))
    } else {
        let tls = tls_config(args)?;
        tokio::spawn(braid_rest::run_tls(
            listener,
            tls,
            rest_limits,
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
        rest_drain,
    })
}

/// The cluster settings of `--bus` and `--roles`: `None` for the
/// embedded node (every role in this process, on the in-process bus).
async fn cluster_config(
    args: &NodeArgs,
    networked: bool,
) -> anyhow::Result<Option<braid_flow::cluster::ClusterConfig>> {
    use braid_flow::cluster::{ClusterConfig, ClusterRole, FlowTopics};
    let c = &args.cluster;
    if c.bus == "embedded" {
        if !c.runs(Role::Rest)
            || !c.runs(Role::Flow)
            || (networked && !(c.runs(Role::Link) && c.runs(Role::Gateway)))
        {
            anyhow::bail!(
                "--roles other than `all` need a bus between the workers: --bus kafka://HOST:PORT"
            );
        }
        return Ok(None);
    }
    let mut kafka = braid_bus_kafka::KafkaConfig::parse(&c.bus).context("--bus")?;
    if args.store == "embedded" {
        anyhow::bail!(
            "--bus {} needs a store every worker shares: --store postgres://...",
            c.bus
        );
    }
    if c.roles.contains(&Role::All) {
        anyhow::bail!(
            "--roles all is the embedded node; with --bus {} name the workers this process \
             runs: rest, flow, and (in a network) link,gateway,membership",
            c.bus
        );
    }
    if c.runs(Role::Link) != c.runs(Role::Membership) {
        anyhow::bail!(
            "the link manager and the membership client (which publishes the vnodes' session \
             keys) run in one process: --roles link,membership (see docs/cluster.md)"
        );
    }
    if (c.runs(Role::Link) || c.runs(Role::Gateway)) && !networked {
        anyhow::bail!(
            "--roles link,membership and --roles gateway connect this cluster to a network: \
             they need --network-config"
        );
    }
    kafka.options = c.bus_options.clone();
    kafka.replication = c.bus_replication;
    kafka.session_timeout = Duration::from_millis(c.bus_session_timeout_ms);
    let topics = FlowTopics::with_prefix(&c.topic_prefix, c.flow_partitions);
    let bus = braid_bus_kafka::KafkaBus::connect(kafka, topics.specs())
        .await
        .context("connecting to the bus (--bus)")?;
    let role = if c.runs(Role::Flow) {
        ClusterRole::Flows
    } else {
        ClusterRole::Client
    };
    Ok(Some(ClusterConfig {
        bus: Arc::new(bus),
        topics,
        role,
        liveness: Duration::from_millis(2 * c.bus_session_timeout_ms),
        owner: format!(
            "braid {:?} worker, pid {}, {}",
            c.roles,
            std::process::id(),
            args.data_dir
                .as_ref()
                .map_or_else(String::new, |d| d.display().to_string())
        ),
        remote: None,
    }))
}

/// Opens the store `--store` names.
async fn open_store(spec: &str, dir: &std::path::Path) -> anyhow::Result<Arc<dyn Store>> {
    if spec == "embedded" {
        let s = EmbeddedStore::open(&dir.join("braid.redb"))
            .with_context(|| format!("opening the store in {}", dir.display()))?;
        return Ok(Arc::new(s));
    }
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        let s = braid_store_postgres::PostgresStore::connect(
            spec,
            braid_store_postgres::PostgresOptions::default(),
        )
        .await
        .context("opening the PostgreSQL store (--store)")?;
        return Ok(Arc::new(s));
    }
    anyhow::bail!(
        "--store must be `embedded` or a PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        connections: ConnectionArgs,
    }

    #[test]
    fn connection_defaults_match_the_flags_and_zero_timeouts_are_refused() {
        // `NodeArgs::local` uses `ConnectionArgs::default()`: it must be
        // what the flags default to.
        let parsed = Cli::try_parse_from(["braid"]).expect("no flags");
        assert_eq!(parsed.connections, ConnectionArgs::default());
        let e = Cli::try_parse_from(["braid", "--rest-idle-timeout-secs", "0"])
            .err()
            .expect("a zero timeout is refused");
        assert!(e.to_string().contains("rest-idle-timeout-secs"), "{e}");
        let set = Cli::try_parse_from(["braid", "--gateway-body-timeout-secs=7"]).unwrap();
        assert_eq!(
            set.connections.gateway(1024).body_timeout,
            Duration::from_secs(7)
        );
    }

    #[test]
    fn the_default_connection_limit_follows_the_file_limit_within_bounds() {
        assert_eq!(ConnectionArgs::default_max_connections(1024), 192);
        assert_eq!(ConnectionArgs::default_max_connections(100), 64);
        assert_eq!(ConnectionArgs::default_max_connections(1 << 20), 4096);
        let args = ConnectionArgs {
            rest_max_connections: Some(10),
            ..ConnectionArgs::default()
        };
        assert_eq!(args.rest(1 << 20).max_connections, 10);
        assert_eq!(args.gateway(1 << 20).max_connections, 4096);
    }

    #[tokio::test]
    async fn worker_roles_that_cannot_run_together_are_refused_with_the_reason() {
        let dir = std::env::temp_dir();
        let refused = async |bus: &str, store: &str, roles: &[Role], networked: bool| {
            let mut args = NodeArgs::local(dir.clone());
            args.cluster.bus = bus.into();
            args.store = store.into();
            args.cluster.roles = roles.to_vec();
            match cluster_config(&args, networked).await {
                Ok(_) => panic!("{roles:?} on {bus} was accepted"),
                Err(e) => format!("{e:#}"),
            }
        };
        let kafka = "kafka://127.0.0.1:1";
        let pg = "postgres://braid@127.0.0.1:1/braid";
        let e = refused("embedded", "embedded", &[Role::Rest], false).await;
        assert!(e.contains("need a bus"), "{e}");
        let e = refused(kafka, "embedded", &[Role::Flow], false).await;
        assert!(e.contains("--store postgres://"), "{e}");
        let e = refused(kafka, pg, &[Role::All], false).await;
        assert!(e.contains("--roles all is the embedded node"), "{e}");
        for roles in [
            &[Role::Link][..],
            &[Role::Membership],
            &[Role::Link, Role::Gateway],
        ] {
            let e = refused(kafka, pg, roles, true).await;
            assert!(e.contains("--roles link,membership"), "{roles:?}: {e}");
        }
        for roles in [&[Role::Gateway][..], &[Role::Link, Role::Membership]] {
            let e = refused(kafka, pg, roles, false).await;
            assert!(e.contains("need --network-config"), "{roles:?}: {e}");
        }
    }

    #[test]
    fn raising_the_file_limit_reports_a_usable_limit_and_is_idempotent() {
        let soft = raise_fd_limit();
        assert!(soft >= 64, "{soft}");
        // Raising again changes nothing.
        assert_eq!(raise_fd_limit(), soft);
    }
}
