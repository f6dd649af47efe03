//! A node's network services: the map client (and on the operator's node
//! the map server), the gateway's HTTPS server and client, and the link
//! manager; plus `braid network bootstrap|revoke`.

use crate::p2p_adapters::{GatewayTransport, MapPeers};
use anyhow::Context as _;
use braid_api::{MemberSummary, Network, NetworkSummary, WorkerError};
use braid_flow::{FlowWorker, Remote};
use braid_gateway::{ClientConfig, GatewayClient, RevocationMode};
use braid_membership::{
    MapClient, MapClientConfig, MapServer, MapServerConfig, MapView, MemberInfo, NodeNetworkConfig,
    Revocation, SignedMemberInfo, pki,
};
use braid_p2p::{
    Counters, Deps, InboundBatch, KeyStore, LinkManager, Outbound, P2pConfig, Packet, Peers,
    RemotePort,
};
use braid_types::{X500Name, now_millis};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};

/// The version of the platform members publish.
const PLATFORM_VERSION: u32 = 1;

/// How often a cluster gateway's map server reads the state the others
/// may have changed (it serves the map from its copy).
const MAP_REFRESH: Duration = Duration::from_secs(1);

mod cluster;
mod map_state;
mod operator;

pub use cluster::{LinkShare, cluster_remote, cluster_rest_network, feed_links, run_gateway};
pub use map_state::StoreMapState;

/// The gateway's settings, and the process's open-file limit (its
/// default connection limit follows it).
#[derive(Debug, Clone)]
pub struct GatewaySetup {
    /// `--gateway-*` flags.
    pub args: braid_gateway::GatewayArgs,
    /// The process's open-file limit.
    pub fd_limit: u64,
}

/// What a node prepares before its flow worker starts.
pub struct Joining {
    map: Arc<MapClient>,
    peers: watch::Receiver<Arc<dyn Peers>>,
    peers_tx: watch::Sender<Arc<dyn Peers>>,
    port: RemotePort,
    outbound: Outbound,
}

/// The running network services; dropping them stops them.
pub struct Running {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _links: Option<LinkManager>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn revocation_mode(r: Revocation) -> RevocationMode {
    match r {
        Revocation::Hard => RevocationMode::Hard,
        Revocation::Soft => RevocationMode::Soft,
        Revocation::Off => RevocationMode::Off,
    }
}

impl Joining {
    /// Loads the persisted map (so a restart works while the map server is
    /// down) and makes the flow worker's port to the link manager.
    pub fn prepare(cfg: &NodeNetworkConfig, data_dir: &Path) -> anyhow::Result<Joining> {
        let mut mc = MapClientConfig::from_node(cfg).context("loading the network credentials")?;
        mc.persist_path = data_dir.join("network-map.bin");
        let map = Arc::new(MapClient::new(mc).context("configuring the network-map client")?);
        if let Some(v) = map.load_persisted() {
            tracing::info!(
                version = v.version(),
                members = v.members().len(),
                "loaded the persisted network map"
            );
        }
        let current: Arc<dyn Peers> = Arc::new(MapPeers(map.current()));
        let (peers_tx, peers) = watch::channel(current);
        let (port, outbound) = braid_p2p::remote_port(peers.clone());
        Ok(Joining {
            map,
            peers,
            peers_tx,
            port,
            outbound,
        })
    }

    /// The flow worker's port to the link manager.
    pub fn remote(&self) -> Arc<dyn Remote> {
        Arc::new(LinkPort(self.port.clone()))
    }

    /// Starts the gateway, the link manager, the map client (and server),
    /// and publishes the node's vnodes as members.
    pub async fn start(
        self,
        cfg: &NodeNetworkConfig,
        worker: FlowWorker,
        gateway: &GatewaySetup,
        p2p: P2pConfig,
        admin: Option<Admin>,
    ) -> anyhow::Result<Running> {
        let Joining {
            map,
            peers,
            peers_tx,
            port: _,
            outbound,
        } = self;
        let mut tasks = vec![follow_map(&map, peers_tx)];
        let counters = Arc::new(Counters::default());
        // The gateway's server: packets go to the link manager.
        let (in_tx, in_rx) = mpsc::channel::<InboundBatch>(16);
        let (map_server, more) =
            serve_gateway(cfg, &map, worker.store().clone(), gateway, in_tx, admin).await?;
        tasks.extend(more);
        let client = GatewayClient::new(ClientConfig::new(tls_material(cfg)?, cfg.mutual_tls))
            .context("configuring the gateway's HTTPS client")?;
        let transport = Arc::new(GatewayTransport::new(client, counters.clone()));
        let (links, more) = start_links(
            cfg,
            &map,
            peers,
            worker.clone(),
            transport,
            in_rx,
            outbound,
            p2p,
            counters.clone(),
            braid_p2p::Share::everything(),
        )
        .await?;
        tasks.extend(more);
        worker.set_network(Arc::new(NodeNetwork {
            map,
            server: map_server,
            counters: Some(counters),
            group: cfg.group.clone(),
        }));
        Ok(Running {
            tasks,
            _links: Some(links),
        })
    }
}

/// The gateway's TLS material, from the node's network configuration.
fn tls_material(cfg: &NodeNetworkConfig) -> anyhow::Result<braid_gateway::TlsMaterial> {
    braid_gateway::TlsMaterial::from_pem_files(
        &cfg.cert,
        &cfg.key,
        &cfg.network_ca,
        Some(&cfg.crl),
        revocation_mode(cfg.revocation),
    )
    .context("loading the gateway's TLS material")
}

/// Passes every new map view on to the link manager's `peers`.
fn follow_map(
    map: &Arc<MapClient>,
    peers_tx: watch::Sender<Arc<dyn Peers>>,
) -> tokio::task::JoinHandle<()> {
    let mut views = map.view();
    tokio::spawn(async move {
        while views.changed().await.is_ok() {
            let v: Arc<MapView> = views.borrow_and_update().clone();
            tracing::info!(
                version = v.version(),
                members = v.members().len(),
                "network map updated"
            );
            let _ = peers_tx.send(Arc::new(MapPeers(v)));
        }
    })
}

/// Where a cluster's REST workers ask the map server to approve members:
/// the bus and the topic.
pub type Admin = (Arc<dyn braid_bus::topics::MessageBus>, String);

/// Starts the gateway's HTTPS server (and, on the operator's node, the
/// map server on its listener, following `admin` in a cluster): packets
/// that arrive go to `to_links`.
async fn serve_gateway(
    cfg: &NodeNetworkConfig,
    map: &Arc<MapClient>,
    store: Arc<dyn braid_storage::Store>,
    gateway: &GatewaySetup,
    to_links: mpsc::Sender<InboundBatch>,
    admin: Option<Admin>,
) -> anyhow::Result<(Option<Arc<MapServer>>, Vec<tokio::task::JoinHandle<()>>)> {
    let mut tasks = Vec::new();
    let tls = tls_material(cfg)?;
    // A client certificate we do not know may belong to a member that
    // joined since our last poll: fetch the map now (at most once a
    // second).
    let refresh = Arc::new(Notify::new());
    {
        let (map, refresh) = (map.clone(), refresh.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                refresh.notified().await;
                if let Err(e) = map.fetch_once().await {
                    tracing::debug!(cause = %e, "network map refresh failed");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }

    // The operator's map server, on this node's gateway listener; in a
    // cluster, it also carries out the REST workers' approvals.
    let map_server = match operator::map_server_config(cfg, store)? {
        Some(config) => {
            let server = Arc::new(
                MapServer::open(config).context("opening the network-map server's state")?,
            );
            tasks.push(tokio::spawn(server.clone().run_expiry()));
            if let Some((bus, topic)) = admin {
                // In a cluster: the other gateways' map servers change the
                // state too.
                tasks.push(tokio::spawn(server.clone().run_refresh(MAP_REFRESH)));
                tasks.push(operator::follow_admin(server.clone(), bus, topic).await?);
            }
            Some(server)
        }
        None => None,
    };
    let extra = match &map_server {
        Some(s) => s.clone().router(),
        None => axum::Router::new(),
    };

    let (gw_tx, mut gw_rx) = mpsc::channel::<braid_gateway::Inbound>(256);
    tasks.push(tokio::spawn(async move {
        while let Some(b) = gw_rx.recv().await {
            let batch = InboundBatch {
                packets: b
                    .envelopes
                    .into_iter()
                    .map(|e| Packet {
                        from: e.from,
                        to: e.to,
                        bytes: e.packet,
                    })
                    .collect(),
                peer: b.peer_addr.to_string(),
                peer_leaf: b.peer_leaf,
            };
            if to_links.send(batch).await.is_err() {
                return;
            }
        }
    }));
    let check = {
        let (map, refresh) = (map.clone(), refresh.clone());
        move |leaf: Option<&[u8]>| -> Result<(), String> {
            let Some(leaf) = leaf else {
                return Ok(()); // one-way TLS: the link layer authenticates
            };
            if map.current().is_member_tls_cert(leaf).is_some() {
                return Ok(());
            }
            refresh.notify_one();
            Err(format!(
                "client certificate {} is not a current member's",
                braid_gateway::tls::describe_certificate(leaf)
            ))
        }
    };
    let (ready, listening) = tokio::sync::oneshot::channel();
    let deps = braid_gateway::GatewayDeps {
        addr: gateway.args.gateway_listen.unwrap_or(cfg.gateway_addr),
        tls,
        mutual_tls: cfg.mutual_tls,
        inbound: gw_tx,
        peers: Arc::new(check),
        extra,
        fd_limit: gateway.fd_limit,
        ready: Some(ready),
    };
    let mut server = tokio::spawn(braid_gateway::run(
        gateway.args.clone(),
        deps,
        std::future::pending(),
    ));
    if listening.await.is_err() {
        // It ended before it listened: say why.
        return Err(match (&mut server).await {
            Ok(Err(e)) => anyhow::Error::new(e),
            Ok(Ok(())) => anyhow::anyhow!("the gateway stopped before it listened"),
            Err(e) => anyhow::anyhow!("the gateway's task failed: {e}"),
        });
    }
    tasks.push(tokio::spawn(async move {
        match server.await {
            Ok(Err(e)) => tracing::error!(cause = %e, "the gateway stopped"),
            Err(e) if !e.is_cancelled() => tracing::error!(cause = %e, "the gateway's task failed"),
            _ => {}
        }
    }));
    tracing::info!(addr = %gateway.args.gateway_listen.unwrap_or(cfg.gateway_addr), endpoint = %cfg.gateway_endpoint, mutual_tls = cfg.mutual_tls, "gateway listening");
    Ok((map_server, tasks))
}

/// Starts the link manager and publishes the node's vnodes as members
/// (now, on every new vnode, and by the map client daily).
#[allow(clippy::too_many_arguments)]
async fn start_links(
    cfg: &NodeNetworkConfig,
    map: &Arc<MapClient>,
    peers: watch::Receiver<Arc<dyn Peers>>,
    worker: FlowWorker,
    transport: Arc<dyn braid_p2p::Transport>,
    inbound: mpsc::Receiver<InboundBatch>,
    outbound: Outbound,
    p2p: P2pConfig,
    counters: Arc<Counters>,
    share: watch::Receiver<braid_p2p::Share>,
) -> anyhow::Result<(LinkManager, Vec<tokio::task::JoinHandle<()>>)> {
    let mut tasks = Vec::new();
    let keys = KeyStore::new(worker.store().clone());
    let links = LinkManager::spawn(
        Deps {
            worker: Arc::new(FlowPort(worker.clone())),
            keys: keys.clone(),
            peers,
            transport,
            inbound,
            outbound,
            counters,
            share,
        },
        p2p,
    )
    .await?;
    let chain = pki::certs_from_pem_or_der(&pki::read_file(&cfg.cert)?)?;
    let tls_key = pki::pkcs8_from_pem_or_der(&pki::read_file(&cfg.key)?)?;
    let publisher = Publisher {
        worker: worker.clone(),
        keys,
        endpoint: cfg.gateway_endpoint.clone(),
        group: cfg.group.clone(),
        chain,
        tls_key,
    };
    // Made once here, so that a node that cannot make them does not start.
    publisher.records().await?;
    let deps = braid_membership::MembershipDeps {
        map: map.clone(),
        own: Arc::new(publisher),
    };
    tasks.push(tokio::spawn(async move {
        if let Err(e) = braid_membership::run(deps, std::future::pending()).await {
            tracing::error!(cause = %e, "the membership client stopped");
        }
    }));
    Ok((links, tasks))
}

impl Running {
    /// Keeps `tasks` running as long as this does.
    pub fn keep(&mut self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        self.tasks.extend(tasks);
    }

    /// Keeps `other`'s services running as long as this does.
    pub fn absorb(&mut self, mut other: Running) {
        self.tasks.append(&mut other.tasks);
        if self._links.is_none() {
            self._links = other._links.take();
        }
    }
}

/// The flow worker as the link manager sees it ([`braid_p2p::FlowSide`]):
/// the two meet here, not in each other's crates.
struct FlowPort(FlowWorker);

#[async_trait::async_trait]
impl braid_p2p::FlowSide for FlowPort {
    fn store(&self) -> Arc<dyn braid_storage::Store> {
        self.0.store().clone()
    }

    fn group(&self) -> String {
        self.0.group().to_owned()
    }

    fn local_vnodes(&self) -> Vec<(String, braid_types::HoldingId)> {
        self.0
            .vnodes()
            .into_iter()
            .map(|v| (v.name.as_str().to_owned(), v.holding))
            .collect()
    }

    fn vnodes_changed(&self) -> watch::Receiver<u64> {
        self.0.subscribe_vnodes()
    }

    async fn deliver(
        &self,
        batch: &[braid_types::SessionMessage],
    ) -> Result<(), braid_p2p::DeliverError> {
        match self.0.deliver_inbound(batch).await {
            Ok(()) => Ok(()),
            Err(e @ (WorkerError::Store(_) | WorkerError::Busy(_))) => {
                Err(braid_p2p::DeliverError::Retry(e.to_string()))
            }
            Err(e) => Err(braid_p2p::DeliverError::Refused(e.to_string())),
        }
    }

    async fn delivered(&self, keys: Vec<Vec<u8>>) -> Result<(), braid_storage::StoreError> {
        self.0.remote_delivered(keys).await
    }

    async fn failed(
        &self,
        m: &braid_types::SessionMessage,
        reason: String,
    ) -> Result<(), braid_storage::StoreError> {
        self.0.remote_failed(m, reason).await
    }
}

/// The link manager as the flow worker sees it ([`braid_flow::Remote`]).
struct LinkPort(RemotePort);

impl Remote for LinkPort {
    fn is_member(&self, name: &X500Name) -> bool {
        self.0.is_member(name)
    }

    fn send(&self, messages: Vec<braid_types::SessionMessage>) {
        self.0.send(messages);
    }
}

/// Signs a member record per vnode.
struct Publisher {
    worker: FlowWorker,
    keys: KeyStore,
    endpoint: String,
    group: String,
    chain: Vec<Vec<u8>>,
    tls_key: Vec<u8>,
}

#[async_trait::async_trait]
impl braid_membership::OwnRecords for Publisher {
    async fn records(&self) -> Result<Vec<SignedMemberInfo>, String> {
        Publisher::records(self).await.map_err(|e| format!("{e:#}"))
    }

    fn changed(&self) -> watch::Receiver<u64> {
        self.worker.subscribe_vnodes()
    }
}

impl Publisher {
    /// The vnodes' signed member records. Each is kept in the store once
    /// made, and used again while what it says still holds: the processes
    /// of a cluster that publish the node's records (several link managers,
    /// each with the map client) all publish the same bytes, which the map
    /// server takes as a refresh, not as a record with an older serial.
    async fn records(&self) -> anyhow::Result<Vec<SignedMemberInfo>> {
        let store = self.worker.store();
        let mut out = Vec::new();
        for v in self.worker.vnodes() {
            let kp = self.keys.ensure(v.holding).await?;
            let key = format!("membership/own/{}", v.holding);
            let wanted = |serial: u64| MemberInfo {
                name: v.name.clone(),
                group: self.group.clone(),
                endpoint: self.endpoint.clone(),
                session_key: kp.public().0,
                tls_chain: self.chain.clone(),
                platform_version: PLATFORM_VERSION,
                serial,
                issued_ms: serial,
            };
            // The stored record, if it still says what this one would.
            let current = |stored: &Option<Vec<u8>>| {
                let signed = braid_membership::decode_signed_member(stored.as_deref()?).ok()?;
                let info = signed.info_unverified().ok()?;
                (info == wanted(info.serial)).then_some(signed)
            };
            let record = loop {
                let stored = store.meta(&key).await?;
                if let Some(signed) = current(&stored) {
                    break signed;
                }
                let signed = SignedMemberInfo::sign(&wanted(now_millis()), &self.tls_key)
                    .with_context(|| format!("signing the member record of {}", v.name))?;
                let put = braid_storage::Op::PutMetaIf {
                    key: key.clone(),
                    expected: stored,
                    value: signed.to_bytes(),
                };
                match store.write(vec![put]).await {
                    Ok(()) => break signed,
                    // Another process made one meanwhile: use it.
                    Err(braid_storage::StoreError::Changed { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            out.push(record);
        }
        Ok(out)
    }
}

struct NodeNetwork {
    map: Arc<MapClient>,
    server: Option<Arc<MapServer>>,
    /// The link manager's and gateway's, where they run in this process.
    counters: Option<Arc<Counters>>,
    group: String,
}

fn summary(m: &MemberInfo) -> MemberSummary {
    MemberSummary {
        name: m.name.to_string(),
        endpoint: m.endpoint.clone(),
        serial: m.serial,
        platform_version: m.platform_version,
    }
}

impl NodeNetwork {
    fn map_server(&self) -> Result<&MapServer, WorkerError> {
        self.server.as_deref().ok_or_else(|| {
            WorkerError::Conflict("this node does not run the network-map role".into())
        })
    }
}

#[async_trait::async_trait]
impl Network for NodeNetwork {
    fn summary(&self) -> NetworkSummary {
        network_summary(&self.map, &self.group, self.server.is_some())
    }

    fn pending(&self) -> Result<Vec<MemberSummary>, WorkerError> {
        Ok(self.map_server()?.pending().iter().map(summary).collect())
    }

    async fn approve(&self, name: &X500Name) -> Result<(), WorkerError> {
        self.map_server()?
            .approve(name)
            .map_err(|e| WorkerError::NotFound(e.to_string()))
    }

    fn render_metrics(&self, out: &mut String) {
        if let Some(c) = &self.counters {
            c.render(out);
        }
        map_gauges(&self.map.current(), out);
    }
}

/// The network as `map` shows it.
fn network_summary(map: &MapClient, group: &str, operator: bool) -> NetworkSummary {
    let v = map.current();
    NetworkSummary {
        group: group.to_string(),
        map_version: v.version(),
        members: v.members().iter().map(summary).collect(),
        operator,
    }
}

/// The map's gauges on `/metrics`.
fn map_gauges(v: &MapView, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP braid_network_map_version Version of the network map this node holds.\n# TYPE braid_network_map_version gauge\nbraid_network_map_version {}\n# HELP braid_network_members Members in that map.\n# TYPE braid_network_members gauge\nbraid_network_members {}",
        v.version(),
        v.members().len()
    );
}

/// Loopback ports `base..base + 10 * nodes + 2` (each node's REST and
/// gateway ports as `braid network bootstrap` assigns them) that are all
/// free now.
fn free_base_port(nodes: usize) -> anyhow::Result<u16> {
    let span = 10 * nodes as u16 + 2;
    (17_000u16..60_000)
        .step_by(20)
        .find(|&base| {
            (base..base + span).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        })
        .with_context(|| {
            format!("no {span} consecutive free loopback ports between 17000 and 60000")
        })
}

/// Bootstraps a development network of `names` under `dir` on free
/// loopback ports (nodes poll the map every 250 ms, so membership converges
/// quickly) and starts every node in this process; used by `braid demo`
/// and `braid bench --network`.
pub async fn start_local_network(
    dir: &Path,
    names: &[&str],
) -> anyhow::Result<(braid_membership::Network, Vec<crate::node::Node>)> {
    let opts = braid_membership::BootstrapOptions {
        base_port: free_base_port(names.len())?,
        poll_interval: Duration::from_millis(250),
        ..Default::default()
    };
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let net = braid_membership::bootstrap(dir, &names, &opts)?;
    let mut nodes = Vec::new();
    for n in &net.nodes {
        let args = crate::node::NodeArgs {
            network_config: Some(n.config_path.clone()),
            ..crate::node::NodeArgs::local(n.config.data_dir.clone())
        };
        nodes.push(crate::node::start(&args).await?);
    }
    Ok((net, nodes))
}

/// `braid network …`
#[derive(Debug, clap::Subcommand)]
pub enum NetworkCommand {
    /// Create a development network in one step: a network CA and CRL, the
    /// operator's key, and per node a TLS certificate, key and node.json to
    /// start it with (`braid node start --network-config DIR/NODE/node.json`).
    /// The first node runs the network map. Nodes listen on loopback ports
    /// from --base-port (REST base+10i, gateway base+10i+1).
    ///
    /// Example: braid network bootstrap --dir ./net --nodes alice,bob,carol
    Bootstrap {
        /// Where to write the network.
        #[arg(long)]
        dir: PathBuf,
        /// Short node names, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// First port.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        /// The application network's name (part of every holding id).
        #[arg(long, default_value = "braid-dev")]
        group: String,
        /// Gateways do not ask for client certificates (the link layer
        /// still authenticates every packet).
        #[arg(long)]
        one_way_tls: bool,
        /// How gateways treat a certificate whose revocation status the CRL
        /// does not decide: hard (refuse), soft (accept) or off (no CRL).
        #[arg(long, default_value = "hard")]
        revocation: String,
        /// The operator approves each registration
        /// (POST /api/v1/network/members/{name}/approve) instead of
        /// approving valid ones automatically.
        #[arg(long)]
        manual_approval: bool,
        /// Members not heard from for this many seconds are dropped.
        #[arg(long, default_value_t = 30 * 24 * 3600)]
        event_horizon_secs: u64,
        /// Replace an existing network in --dir.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a node's TLS certificate: add it to the network CRL (gateways
    /// re-read it within a second).
    ///
    /// Example: braid network revoke --dir ./net --node carol
    Revoke {
        /// The network's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The node whose certificate to revoke.
        #[arg(long)]
        node: String,
    },
}

/// Runs a `braid network` command.
pub fn run(command: NetworkCommand) -> anyhow::Result<()> {
    match command {
        NetworkCommand::Bootstrap {
            dir,
            nodes,
            base_port,
            group,
            one_way_tls,
            revocation,
            manual_approval,
            event_horizon_secs,
            force,
        } => {
            let opts = braid_membership::BootstrapOptions {
                base_port,
                group,
                mutual_tls: !one_way_tls,
                revocation: revocation.parse()?,
                approval: if manual_approval {
                    braid_membership::Approval::Manual
                } else {
                    braid_membership::Approval::Auto
                },
                event_horizon: Duration::from_secs(event_horizon_secs),
                force,
                ..Default::default()
            };
            let net = braid_membership::bootstrap(&dir, &nodes, &opts)?;
            println!("network CA:  {}", net.ca_cert.display());
            println!("CRL:         {}", net.crl.display());
            for n in &net.nodes {
                println!(
                    "node {:<10} REST https://{}  gateway {}{}\n  braid node start --network-config {}",
                    n.name,
                    n.config.rest_addr,
                    n.config.gateway_endpoint,
                    if n.config.map_server {
                        "  (network map)"
                    } else {
                        ""
                    },
                    n.config_path.display()
                );
            }
            Ok(())
        }
        NetworkCommand::Revoke { dir, node } => {
            braid_membership::revoke(&dir, &node)?;
            println!(
                "revoked {node}'s certificate in {}",
                dir.join("ca/crl.pem").display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::map_state::MAP_STATE_KEY;
    use super::*;
    use braid_membership::MapStateStore as _;
    use braid_storage::Store as _;

    #[tokio::test(flavor = "multi_thread")]
    async fn the_map_servers_state_lives_in_the_store_and_an_old_file_is_imported_once() {
        let dir = braid_testkit::TempDir::new("braid-map-state");
        let store = Arc::new(
            braid_storage::embedded::EmbeddedStore::open(&dir.path().join("braid.redb")).unwrap(),
        );
        let file = dir.path().join("network-map-server.state");
        let state = StoreMapState::new(store.clone(), &file);
        assert_eq!(state.load().unwrap(), None, "nothing yet");
        std::fs::write(&file, b"old state").unwrap();
        assert_eq!(state.load().unwrap().as_deref(), Some(&b"old state"[..]));
        assert_eq!(
            store.meta(MAP_STATE_KEY).await.unwrap().as_deref(),
            Some(&b"old state"[..]),
            "imported into the store"
        );
        state.save(b"new state").unwrap();
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"old state",
            "the file is not written"
        );
        assert_eq!(state.load().unwrap().as_deref(), Some(&b"new state"[..]));
        // A restart: the store's state wins over the old file.
        let again = StoreMapState::new(store.clone(), &file);
        assert_eq!(again.load().unwrap().as_deref(), Some(&b"new state"[..]));
    }
}
