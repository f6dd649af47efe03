//! A node's network services: the map client (and on the operator's node
//! the map server), the gateway's HTTPS server and client, and the link
//! manager; plus `braid network bootstrap|revoke`.

use crate::p2p_adapters::{GatewayTransport, MapPeers};
use anyhow::Context as _;
use braid_flow::{FlowWorker, MemberSummary, Network, NetworkSummary, Remote, WorkerError};
use braid_gateway::{ClientConfig, GatewayClient, GatewayServer, RevocationMode, ServerConfig};
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

/// The map server's state in the node's store (meta key
/// [`MAP_STATE_KEY`]), so that it lives with everything else the node keeps
/// (in PostgreSQL, in cluster mode). A state file left by an older version
/// (`map_state_path` of node.json) is imported on first use and left in
/// place.
pub struct StoreMapState {
    store: Arc<dyn braid_storage::Store>,
    legacy_file: PathBuf,
}

impl std::fmt::Debug for StoreMapState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreMapState")
            .field("key", &MAP_STATE_KEY)
            .field("legacy_file", &self.legacy_file)
            .finish()
    }
}

/// The store's meta key for the map server's state.
pub const MAP_STATE_KEY: &str = "membership/map-server";

impl StoreMapState {
    /// State in `store`, importing `legacy_file` when the store has none.
    pub fn new(store: Arc<dyn braid_storage::Store>, legacy_file: &Path) -> StoreMapState {
        StoreMapState {
            store,
            legacy_file: legacy_file.to_path_buf(),
        }
    }

    /// Runs a store call from the map server's synchronous code (it runs
    /// on the node's multi-threaded runtime, in handlers and blocking
    /// tasks).
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
    }

    fn store_error(&self, e: braid_storage::StoreError) -> braid_membership::MembershipError {
        braid_membership::MembershipError::Config {
            path: braid_membership::MapStateStore::location(self),
            reason: format!("the store failed: {e}"),
        }
    }
}

impl braid_membership::MapStateStore for StoreMapState {
    fn load(&self) -> Result<Option<Vec<u8>>, braid_membership::MembershipError> {
        if let Some(b) = self
            .block_on(self.store.meta(MAP_STATE_KEY))
            .map_err(|e| self.store_error(e))?
        {
            return Ok(Some(b));
        }
        let Some(b) = braid_membership::FileState::new(&self.legacy_file).load()? else {
            return Ok(None);
        };
        self.save(&b)?;
        tracing::info!(file = %self.legacy_file.display(),
            "imported the network-map server's state file into the store (the file is no longer used)");
        Ok(Some(b))
    }

    fn save(&self, bytes: &[u8]) -> Result<(), braid_membership::MembershipError> {
        self.block_on(self.store.write(vec![braid_storage::Op::PutMeta(
            MAP_STATE_KEY.into(),
            bytes.to_vec(),
        )]))
        .map_err(|e| self.store_error(e))
    }

    fn location(&self) -> PathBuf {
        PathBuf::from(format!("store meta {MAP_STATE_KEY}"))
    }
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
        gateway_limits: braid_http::Limits,
        p2p: P2pConfig,
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
            serve_gateway(cfg, &map, worker.store().clone(), gateway_limits, in_tx).await?;
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

    /// A cluster's link manager and map client without the gateway: the
    /// packets go out on the `link.out` topic and come in on `link.in`
    /// (see [`run_gateway`]).
    pub async fn start_links_on_bus(
        self,
        cfg: &NodeNetworkConfig,
        worker: FlowWorker,
        p2p: P2pConfig,
        bus: Arc<dyn braid_bus::topics::MessageBus>,
        topics: &braid_flow::cluster::FlowTopics,
    ) -> anyhow::Result<Running> {
        use braid_bus::topics::{Delivery, From};
        let Joining {
            map,
            peers,
            peers_tx,
            port: _,
            outbound,
        } = self;
        let mut tasks = vec![follow_map(&map, peers_tx)];
        let counters = Arc::new(Counters::default());
        let (in_tx, in_rx) = mpsc::channel::<InboundBatch>(16);
        // What the gateways received: read from the end (packets that
        // arrived while this process was down are resent by their links).
        let mut sub = bus
            .watch(&[topics.link_in.as_str()], From::End)
            .await
            .context("reading the packets the gateways receive")?;
        tasks.push(tokio::spawn(async move {
            loop {
                match sub.next().await {
                    Ok(Delivery::Records(records)) => {
                        for r in records {
                            match postcard::from_bytes::<ArrivedPackets>(&r.value) {
                                Ok(a) => {
                                    if in_tx.send(a.into_batch()).await.is_err() {
                                        return;
                                    }
                                }
                                Err(e) => tracing::error!(cause = %e,
                                    "skipping a link.in record braid cannot read"),
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(cause = %e, "reading arrived packets failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }));
        let transport = Arc::new(BusTransport {
            bus,
            topic: topics.link_out.clone(),
            counters: counters.clone(),
        });
        let (links, more) = start_links(
            cfg, &map, peers, worker, transport, in_rx, outbound, p2p, counters,
        )
        .await?;
        tasks.extend(more);
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

/// Starts the gateway's HTTPS server (and, on the operator's node, the
/// map server on its listener): packets that arrive go to `to_links`.
async fn serve_gateway(
    cfg: &NodeNetworkConfig,
    map: &Arc<MapClient>,
    store: Arc<dyn braid_storage::Store>,
    gateway_limits: braid_http::Limits,
    to_links: mpsc::Sender<InboundBatch>,
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

    // The operator's map server, on this node's gateway listener.
    let map_server = match (cfg.map_server, &cfg.operator_key, &cfg.map_state_path) {
        (true, Some(key), Some(state)) => {
            let server = Arc::new(
                MapServer::open(MapServerConfig {
                    state: Arc::new(StoreMapState::new(store, state)),
                    group: cfg.group.clone(),
                    operator_key_pkcs8_der: pki::read_file(key)?,
                    network_ca_der: pki::read_file(&cfg.network_ca)?,
                    approval: cfg.approval,
                    event_horizon: cfg.event_horizon(),
                })
                .context("opening the network-map server's state")?,
            );
            tasks.push(tokio::spawn(server.clone().run_expiry()));
            Some(server)
        }
        (true, _, _) => anyhow::bail!(
            "the network configuration says map_server but names no operator_key or \
             map_state_path"
        ),
        _ => None,
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
    let listener = tokio::net::TcpListener::bind(cfg.gateway_addr)
        .await
        .with_context(|| format!("binding the gateway to {}", cfg.gateway_addr))?;
    let server = GatewayServer::new(
        ServerConfig {
            limits: gateway_limits,
            ..ServerConfig::new(tls, cfg.mutual_tls)
        },
        gw_tx,
        Arc::new(check),
        extra,
    )
    .context("configuring the gateway's HTTPS server")?;
    tasks.push(tokio::spawn(async move {
        if let Err(e) = server.run(listener).await {
            tracing::error!(cause = %e, "the gateway stopped");
        }
    }));
    tracing::info!(addr = %cfg.gateway_addr, endpoint = %cfg.gateway_endpoint, mutual_tls = cfg.mutual_tls, "gateway listening");
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
    map.set_own(publisher.records().await?);
    {
        let (map, mut vnodes) = (map.clone(), worker.subscribe_vnodes());
        tasks.push(tokio::spawn(async move {
            while vnodes.changed().await.is_ok() {
                match publisher.records().await {
                    Ok(r) => map.set_own(r),
                    Err(e) => {
                        tracing::error!(cause = %e, "cannot publish the vnodes' member records")
                    }
                }
            }
        }));
    }
    tasks.push(tokio::spawn(map.clone().run(std::future::pending())));
    Ok((links, tasks))
}

/// Packets for one peer gateway, on the `link.out` topic (link manager
/// to gateway).
#[derive(serde::Serialize, serde::Deserialize)]
struct PacketsOut {
    endpoint: String,
    tls_leaf: Option<Vec<u8>>,
    /// (from, to, sealed packet).
    packets: Vec<(String, String, Vec<u8>)>,
}

/// Packets one POST brought, on the `link.in` topic (gateway to link
/// manager).
#[derive(serde::Serialize, serde::Deserialize)]
struct ArrivedPackets {
    peer: String,
    peer_leaf: Option<Vec<u8>>,
    packets: Vec<(String, String, Vec<u8>)>,
}

impl ArrivedPackets {
    fn into_batch(self) -> InboundBatch {
        InboundBatch {
            packets: self
                .packets
                .into_iter()
                .map(|(from, to, bytes)| Packet { from, to, bytes })
                .collect(),
            peer: self.peer,
            peer_leaf: self.peer_leaf,
        }
    }
}

/// The link manager's transport in a cluster whose gateway runs apart:
/// batches go onto `link.out` for the gateways to POST. Sent means
/// published; what the peer answers is the gateway's to handle (the links
/// resend what is lost).
struct BusTransport {
    bus: Arc<dyn braid_bus::topics::MessageBus>,
    topic: String,
    counters: Arc<Counters>,
}

#[async_trait::async_trait]
impl braid_p2p::Transport for BusTransport {
    async fn send(
        &self,
        to: &braid_p2p::PeerAddr,
        batch: Vec<Packet>,
    ) -> Result<(), braid_p2p::TransportError> {
        use std::sync::atomic::Ordering;
        let n = batch.len() as u64;
        let rec = PacketsOut {
            endpoint: to.endpoint.clone(),
            tls_leaf: to.tls_leaf.clone(),
            packets: batch.into_iter().map(|p| (p.from, p.to, p.bytes)).collect(),
        };
        let value = postcard::to_allocvec(&rec)
            .map_err(|e| braid_p2p::TransportError::Failed(format!("encoding packets: {e}")))?;
        let out = braid_bus::topics::Outgoing::new(to.endpoint.as_bytes().to_vec(), value);
        match self.bus.publish(&self.topic, vec![out]).await {
            Ok(()) => {
                self.counters.packets_sent.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters.send_failures.fetch_add(1, Ordering::Relaxed);
                Err(braid_p2p::TransportError::Failed(format!("the bus: {e}")))
            }
        }
    }
}

/// A cluster's gateway, in a process of its own: serves peer gateways
/// (packets that arrive go onto `link.in`, and, on the operator's node,
/// the map server) and POSTs what the link manager puts on `link.out`.
/// Stateless: it keeps nothing but a read-only network map for its TLS
/// checks.
pub async fn run_gateway(
    cfg: &NodeNetworkConfig,
    data_dir: &Path,
    store: Arc<dyn braid_storage::Store>,
    gateway_limits: braid_http::Limits,
    bus: Arc<dyn braid_bus::topics::MessageBus>,
    topics: &braid_flow::cluster::FlowTopics,
) -> anyhow::Result<Running> {
    use braid_bus::topics::{Delivery, From};
    let (map, poll) = read_only_map(cfg, data_dir)?;
    let mut tasks = vec![poll];
    let (in_tx, mut in_rx) = mpsc::channel::<InboundBatch>(64);
    let (_server, more) = serve_gateway(cfg, &map, store, gateway_limits, in_tx).await?;
    tasks.extend(more);
    {
        let (bus, topic) = (bus.clone(), topics.link_in.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(b) = in_rx.recv().await {
                let key = b
                    .packets
                    .first()
                    .map(|p| format!("{}|{}", p.from, p.to))
                    .unwrap_or_default();
                let rec = ArrivedPackets {
                    peer: b.peer,
                    peer_leaf: b.peer_leaf,
                    packets: b.packets.into_iter().map(|p| (p.from, p.to, p.bytes)).collect(),
                };
                let Ok(value) = postcard::to_allocvec(&rec) else {
                    continue;
                };
                // Lost if the bus refuses them: their links resend.
                if let Err(e) = bus
                    .publish(&topic, vec![braid_bus::topics::Outgoing::new(key, value)])
                    .await
                {
                    tracing::warn!(cause = %e, "could not pass arrived packets on; their links resend");
                }
            }
        }));
    }
    let client = GatewayClient::new(ClientConfig::new(tls_material(cfg)?, cfg.mutual_tls))
        .context("configuring the gateway's HTTPS client")?;
    let transport = Arc::new(GatewayTransport::new(client, Arc::new(Counters::default())));
    let mut sub = bus
        .watch(&[topics.link_out.as_str()], From::End)
        .await
        .context("reading the packets to send")?;
    // POSTs in flight at once, over all peers.
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    tasks.push(tokio::spawn(async move {
        loop {
            match sub.next().await {
                Ok(Delivery::Records(records)) => {
                    for r in records {
                        let out = match postcard::from_bytes::<PacketsOut>(&r.value) {
                            Ok(o) => o,
                            Err(e) => {
                                tracing::error!(cause = %e, "skipping a link.out record braid cannot read");
                                continue;
                            }
                        };
                        let Ok(slot) = slots.clone().acquire_owned().await else {
                            return;
                        };
                        let transport = transport.clone();
                        tokio::spawn(async move {
                            let to = braid_p2p::PeerAddr {
                                endpoint: out.endpoint,
                                tls_leaf: out.tls_leaf,
                            };
                            let batch = out
                                .packets
                                .into_iter()
                                .map(|(from, to, bytes)| Packet { from, to, bytes })
                                .collect();
                            // Failures are the links' to repair (they
                            // resend); the transport logs them.
                            let _ = braid_p2p::Transport::send(&*transport, &to, batch).await;
                            drop(slot);
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(cause = %e, "reading packets to send failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }));
    Ok(Running {
        tasks,
        _links: None,
    })
}

/// The way of a cluster's flow workers to other nodes: who is a member,
/// from the network map (polled, read-only: the link manager's process
/// publishes the vnodes), and the `p2p.out` topic to the link manager.
struct ClusterRemote {
    map: Arc<MapClient>,
    tx: mpsc::UnboundedSender<Vec<braid_types::SessionMessage>>,
}

impl Remote for ClusterRemote {
    fn is_member(&self, name: &X500Name) -> bool {
        self.map.current().member(name).is_some()
    }

    fn send(&self, messages: Vec<braid_types::SessionMessage>) {
        // Closed only while the process stops; the messages stay in the
        // outbox.
        let _ = self.tx.send(messages);
    }
}

/// A copy of the network map that is only read (polled like the
/// embedded node's, kept in `data_dir`, publishing nothing): for the
/// workers of a cluster other than the link manager's process. Returns
/// the client and its polling task.
fn read_only_map(
    cfg: &NodeNetworkConfig,
    data_dir: &Path,
) -> anyhow::Result<(Arc<MapClient>, tokio::task::JoinHandle<()>)> {
    let mut mc = MapClientConfig::from_node(cfg).context("loading the network credentials")?;
    mc.persist_path = data_dir.join("network-map.bin");
    let map = Arc::new(MapClient::new(mc).context("configuring the network-map client")?);
    map.load_persisted();
    let poll = tokio::spawn(map.clone().run_with(Vec::new, std::future::pending()));
    Ok((map, poll))
}

/// The network as a cluster's REST worker shows it (`GET
/// /api/v1/network`, the map's gauges on `/metrics`): a read-only copy of
/// the map. It is not the operator here: members are approved where the
/// map server runs.
pub fn cluster_rest_network(
    cfg: &NodeNetworkConfig,
    data_dir: &Path,
    worker: &FlowWorker,
) -> anyhow::Result<Running> {
    let (map, poll) = read_only_map(cfg, data_dir)?;
    worker.set_network(Arc::new(NodeNetwork {
        map,
        server: None,
        counters: None,
        group: cfg.group.clone(),
    }));
    Ok(Running {
        tasks: vec![poll],
        _links: None,
    })
}

/// A cluster flow worker's [`Remote`] (see [`ClusterRemote`]) and the
/// tasks that keep it (stopped when [`Running`] is dropped).
pub fn cluster_remote(
    cfg: &NodeNetworkConfig,
    data_dir: &Path,
    bus: Arc<dyn braid_bus::topics::MessageBus>,
    topic: String,
) -> anyhow::Result<(Arc<dyn Remote>, Running)> {
    let (map, poll) = read_only_map(cfg, data_dir)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<braid_types::SessionMessage>>();
    let mut tasks = vec![poll];
    tasks.push(tokio::spawn(async move {
        while let Some(mut batch) = rx.recv().await {
            while let Ok(more) = rx.try_recv() {
                batch.extend(more);
                if batch.len() >= 4096 {
                    break;
                }
            }
            let records: Vec<_> = batch.iter().map(braid_flow::cluster::p2p_record).collect();
            braid_flow::retry_until_ok("publishing messages for other nodes", || {
                bus.publish(&topic, records.clone())
            })
            .await;
        }
    }));
    Ok((
        Arc::new(ClusterRemote { map, tx }),
        Running {
            tasks,
            _links: None,
        },
    ))
}

/// How often a cluster's link manager reads the outbox for messages to
/// other nodes it may not have (see [`feed_links`]).
const OUTBOX_SWEEP: Duration = Duration::from_secs(5);

/// Feeds a cluster's link manager: the messages for other nodes that
/// flow workers publish on `topic` (read from its end, by this process
/// alone), and every [`OUTBOX_SWEEP`] those in the outbox, which holds
/// every such message until the peer acknowledges it. The sweep makes up
/// for whatever the topic did not bring: messages published while this
/// process was down, or before its reading began. A message the links
/// already carry is not sent twice (they know it by its id).
///
/// One such process per cluster: two would each run a link to every
/// peer for the same pair of vnodes.
pub async fn feed_links(
    worker: FlowWorker,
    port: Arc<dyn Remote>,
    bus: Arc<dyn braid_bus::topics::MessageBus>,
    topic: String,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use braid_bus::topics::{Delivery, From};
    let mut sub = bus
        .watch(&[topic.as_str()], From::End)
        .await
        .context("reading the messages for other nodes")?;
    let reader = {
        let port = port.clone();
        tokio::spawn(async move {
            loop {
                match sub.next().await {
                    Ok(Delivery::Records(records)) => {
                        let batch: Vec<_> = records
                            .iter()
                            .filter_map(|r| match braid_flow::cluster::decode_p2p(&r.value) {
                                Ok(m) => Some(m),
                                Err(e) => {
                                    tracing::error!(
                                        partition = r.partition,
                                        offset = r.offset,
                                        cause = %e,
                                        "skipping a p2p.out record braid cannot read"
                                    );
                                    None
                                }
                            })
                            .collect();
                        port.send(batch);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(cause = %e, "reading messages for other nodes failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        })
    };
    let sweeper = tokio::spawn(async move {
        let mut every = tokio::time::interval(OUTBOX_SWEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            every.tick().await;
            let outbox = match worker.store().outbox().await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(cause = %e, "could not read the outbox; trying again");
                    continue;
                }
            };
            let local: std::collections::HashSet<_> =
                worker.vnodes().iter().map(|v| v.holding).collect();
            let pending: Vec<_> = outbox
                .into_iter()
                .filter(|m| !local.contains(&m.to.holding))
                .collect();
            if first {
                first = false;
                tracing::info!(
                    messages = pending.len(),
                    "link manager: messages for other nodes in the outbox"
                );
            }
            if !pending.is_empty() {
                port.send(pending);
            }
        }
    });
    Ok(vec![reader, sweeper])
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

impl Publisher {
    async fn records(&self) -> anyhow::Result<Vec<SignedMemberInfo>> {
        let now = now_millis();
        let mut out = Vec::new();
        for v in self.worker.vnodes() {
            let kp = self.keys.ensure(v.holding).await?;
            let info = MemberInfo {
                name: v.name.clone(),
                group: self.group.clone(),
                endpoint: self.endpoint.clone(),
                session_key: kp.public().0,
                tls_chain: self.chain.clone(),
                platform_version: PLATFORM_VERSION,
                serial: now,
                issued_ms: now,
            };
            out.push(
                SignedMemberInfo::sign(&info, &self.tls_key)
                    .with_context(|| format!("signing the member record of {}", v.name))?,
            );
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
        let v = self.map.current();
        NetworkSummary {
            group: self.group.clone(),
            map_version: v.version(),
            members: v.members().iter().map(summary).collect(),
            operator: self.server.is_some(),
        }
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
        use std::fmt::Write as _;
        if let Some(c) = &self.counters {
            c.render(out);
        }
        let v = self.map.current();
        let _ = writeln!(
            out,
            "# HELP braid_network_map_version Version of the network map this node holds.\n# TYPE braid_network_map_version gauge\nbraid_network_map_version {}\n# HELP braid_network_members Members in that map.\n# TYPE braid_network_members gauge\nbraid_network_members {}",
            v.version(),
            v.members().len()
        );
    }
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
