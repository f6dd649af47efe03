//! A cluster's network workers: the link manager and the gateway apart,
//! meeting on `link.out` and `link.in`; the flow workers' way to other
//! nodes (`p2p.out`); the feed of the link manager (that topic and the
//! outbox); read-only copies of the map for the other workers.

use super::*;

impl Joining {
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
        share: watch::Receiver<braid_p2p::Share>,
    ) -> anyhow::Result<Running> {
        use braid_bus::topics::From;
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
        let pauses = Arc::new(Pauses::default());
        // What the gateways received: read from the end (packets that
        // arrived while this process was down are resent by their links).
        let sub = bus
            .watch(&[topics.link_in.as_str()], From::End)
            .await
            .context("reading the packets the gateways receive")?;
        tasks.push(tokio::spawn(read_records(sub, "link.in", {
            let pauses = pauses.clone();
            async move |batch: Vec<FromGateways>| {
                for r in batch {
                    match r {
                        FromGateways::Arrived(a) => {
                            if in_tx.send(a.into_batch()).await.is_err() {
                                return false;
                            }
                        }
                        FromGateways::Overloaded {
                            endpoint,
                            retry_after_ms,
                        } => pauses.pause(endpoint, Duration::from_millis(retry_after_ms)),
                    }
                }
                true
            }
        })));
        let transport = Arc::new(BusTransport {
            bus,
            topic: topics.link_out.clone(),
            counters: counters.clone(),
            pauses,
        });
        let (links, more) = start_links(
            cfg, &map, peers, worker, transport, in_rx, outbound, p2p, counters, share,
        )
        .await?;
        tasks.extend(more);
        Ok(Running {
            tasks,
            _links: Some(links),
        })
    }
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

/// A record of the `link.in` topic: what the gateways tell the link
/// manager.
#[derive(serde::Serialize, serde::Deserialize)]
enum FromGateways {
    /// Packets a peer POSTed.
    Arrived(ArrivedPackets),
    /// A peer gateway answered `503` with `Retry-After`: send it nothing
    /// for that long.
    Overloaded {
        endpoint: String,
        retry_after_ms: u64,
    },
}

/// Peer gateways that asked for a pause (`Retry-After`), and until when.
#[derive(Default)]
struct Pauses(std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>);

impl Pauses {
    fn pause(&self, endpoint: String, retry_after: Duration) {
        let until = std::time::Instant::now() + retry_after;
        let mut m = self.0.lock().expect("pauses lock");
        let t = m.entry(endpoint).or_insert(until);
        *t = (*t).max(until);
    }

    /// How long `endpoint` is still paused, if it is.
    fn remaining(&self, endpoint: &str) -> Option<Duration> {
        let mut m = self.0.lock().expect("pauses lock");
        let now = std::time::Instant::now();
        match m.get(endpoint) {
            Some(t) if *t > now => Some(*t - now),
            Some(_) => {
                m.remove(endpoint);
                None
            }
            None => None,
        }
    }
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
    /// Peers whose gateway asked for a pause: what is sent to them while
    /// paused is refused as `Overloaded` (the links resend it later).
    pauses: Arc<Pauses>,
}

#[async_trait::async_trait]
impl braid_p2p::Transport for BusTransport {
    async fn send(
        &self,
        to: &braid_p2p::PeerAddr,
        batch: Vec<Packet>,
    ) -> Result<(), braid_p2p::TransportError> {
        use std::sync::atomic::Ordering;
        if let Some(retry_after) = self.pauses.remaining(&to.endpoint) {
            self.counters.overloaded.fetch_add(1, Ordering::Relaxed);
            return Err(braid_p2p::TransportError::Overloaded { retry_after });
        }
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
    gateway: &GatewaySetup,
    bus: Arc<dyn braid_bus::topics::MessageBus>,
    topics: &braid_flow::cluster::FlowTopics,
    member: braid_bus::live::LiveGroup,
) -> anyhow::Result<Running> {
    let (map, poll) = read_only_map(cfg, data_dir)?;
    let mut tasks = vec![poll];
    let (in_tx, mut in_rx) = mpsc::channel::<InboundBatch>(64);
    let (_server, more) = serve_gateway(
        cfg,
        &map,
        store,
        gateway,
        in_tx,
        Some((bus.clone(), topics.membership_admin.clone())),
    )
    .await?;
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
                let rec = FromGateways::Arrived(ArrivedPackets {
                    peer: b.peer,
                    peer_leaf: b.peer_leaf,
                    packets: b.packets.into_iter().map(|p| (p.from, p.to, p.bytes)).collect(),
                });
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
    // The gateways share the partitions of link.out: each POSTs what is
    // on its own.
    let member = member.join().await.context("joining the gateways' group")?;
    // POSTs in flight at once, over all peers.
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    let (paced, link_in) = (bus.clone(), topics.link_in.clone());
    tasks.push(tokio::spawn(read_as_member(
        member,
        "link.out",
        |member| {
            let held: Vec<u16> = member.held().iter().map(|tp| tp.partition).collect();
            tracing::info!(?held, "gateway: the partitions of link.out it sends");
        },
        async move |batch: Vec<PacketsOut>| {
            for out in batch {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return false;
                };
                let transport = transport.clone();
                let (bus, link_in) = (paced.clone(), link_in.clone());
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
                    // Failures are the links' to repair (they resend); the
                    // transport logs them. A peer that asks for a pause:
                    // the link manager is told, and pauses it.
                    let sent = braid_p2p::Transport::send(&*transport, &to, batch).await;
                    drop(slot);
                    if let Err(braid_p2p::TransportError::Overloaded { retry_after }) = sent {
                        let rec = FromGateways::Overloaded {
                            endpoint: to.endpoint.clone(),
                            retry_after_ms: retry_after.as_millis() as u64,
                        };
                        let value = postcard::to_allocvec(&rec).expect("a pause encodes");
                        let out = braid_bus::topics::Outgoing::new(to.endpoint.into_bytes(), value);
                        if let Err(e) = bus.publish(&link_in, vec![out]).await {
                            tracing::debug!(cause = %e, "could not pass a peer's pause on");
                        }
                    }
                });
            }
            true
        },
    )));
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
/// the map; in an operator cluster also the pending registrations (from
/// the map server's state in `store`) and approvals (asked of the map
/// server on `admin`).
pub fn cluster_rest_network(
    cfg: &NodeNetworkConfig,
    data_dir: &Path,
    worker: &FlowWorker,
    store: Arc<dyn braid_storage::Store>,
    admin: Admin,
) -> anyhow::Result<Running> {
    let (map, poll) = read_only_map(cfg, data_dir)?;
    let network: Arc<dyn Network> = match operator::map_server_config(cfg, store)? {
        Some(server) => Arc::new(operator::ClusterOperator {
            map,
            group: cfg.group.clone(),
            server,
            bus: admin.0,
            topic: admin.1,
        }),
        None => Arc::new(NodeNetwork {
            map,
            server: None,
            counters: None,
            group: cfg.group.clone(),
        }),
    };
    worker.set_network(network);
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

/// How a cluster's link manager takes its share of the pairs of vnodes.
pub enum LinkShare {
    /// It carries every pair, reading all of `p2p.out` (the link manager
    /// whose gateway runs in its process: only one per cluster).
    All,
    /// It is one of the link managers whose gateways run apart: they share
    /// the partitions of `p2p.out` as the group `link` (a pair's messages
    /// are keyed by it), and each carries the pairs of its partitions.
    Group {
        /// Where the pairs it carries are published for its driver.
        share: watch::Sender<braid_p2p::Share>,
        /// The group's liveness settings.
        member: braid_bus::live::LiveGroup,
    },
}

/// Feeds a cluster's link manager: the messages for other nodes that
/// flow workers publish on `topic` (by [`LinkShare`]), and every
/// [`OUTBOX_SWEEP`], and at once when it takes pairs over, those in the
/// outbox, which holds every such message until the peer acknowledges
/// it. The sweep makes up for whatever the topic did not bring: messages
/// published while no link manager read them, or to one that died. A
/// message the links already carry is not sent twice (they know it by its
/// id), and one of a pair it does not carry is ignored.
pub async fn feed_links(
    worker: FlowWorker,
    port: Arc<dyn Remote>,
    bus: Arc<dyn braid_bus::topics::MessageBus>,
    topic: String,
    share: LinkShare,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use braid_bus::topics::From;
    let sweep_now = Arc::new(Notify::new());
    let (reader, share) = match share {
        LinkShare::All => {
            let sub = bus
                .watch(&[topic.as_str()], From::End)
                .await
                .context("reading the messages for other nodes")?;
            let port = port.clone();
            let reader = tokio::spawn(read_records(
                sub,
                "p2p.out",
                async move |batch: Vec<braid_types::SessionMessage>| {
                    port.send(batch);
                    true
                },
            ));
            (reader, watch::channel(braid_p2p::Share::All).1)
        }
        LinkShare::Group { share, member } => {
            let partitions = bus.partitions(&topic)?;
            let member = member
                .join()
                .await
                .context("joining the link managers' group")?;
            let watching = share.subscribe();
            let (port, sweep_now) = (port.clone(), sweep_now.clone());
            let reader = tokio::spawn(read_as_member(
                member,
                "p2p.out",
                move |member| {
                    let held = member.held().iter().map(|tp| tp.partition).collect();
                    tracing::info!(?held, "link manager: the partitions of pairs it carries");
                    share.send_replace(braid_p2p::Share::Partitions { partitions, held });
                    sweep_now.notify_one();
                },
                async move |batch: Vec<braid_types::SessionMessage>| {
                    // Handed to the links; the outbox keeps each until
                    // its acknowledgement.
                    port.send(batch);
                    true
                },
            ));
            (reader, watching)
        }
    };
    let sweeper = tokio::spawn(async move {
        let mut every = tokio::time::interval(OUTBOX_SWEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = sweep_now.notified() => {}
            }
            let outbox = match worker.store().outbox().await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(cause = %e, "could not read the outbox; trying again");
                    continue;
                }
            };
            let local: std::collections::HashSet<_> =
                worker.vnodes().iter().map(|v| v.holding).collect();
            let carried = share.borrow().clone();
            let pending: Vec<_> = outbox
                .into_iter()
                .filter(|m| {
                    !local.contains(&m.to.holding)
                        && carried.carries(&m.from.holding, m.to.name.as_str())
                })
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

/// Reads as a member of a group until `each` returns false: every batch
/// of records, each decoded as a `T` (one braid cannot read is logged and
/// skipped), committed once `each` has taken it; `changed` is called at
/// each assignment change. A failed read is logged and retried after half
/// a second.
async fn read_as_member<T: serde::de::DeserializeOwned>(
    mut member: braid_bus::live::LiveMember,
    label: &'static str,
    mut changed: impl FnMut(&braid_bus::live::LiveMember),
    mut each: impl AsyncFnMut(Vec<T>) -> bool,
) {
    use braid_bus::topics::Delivery;
    loop {
        match member.next().await {
            Ok(Delivery::Assigned(_) | Delivery::Revoked(_)) => changed(&member),
            Ok(Delivery::Records(records)) => {
                let mut last = std::collections::BTreeMap::new();
                let batch = records
                    .iter()
                    .filter_map(|r| {
                        last.insert((r.topic.clone(), r.partition), r.offset);
                        match postcard::from_bytes::<T>(&r.value) {
                            Ok(v) => Some(v),
                            Err(e) => {
                                tracing::error!(topic = label, partition = r.partition, offset = r.offset,
                                    cause = %e, "skipping a record braid cannot read");
                                None
                            }
                        }
                    })
                    .collect();
                if !each(batch).await {
                    return;
                }
                for ((topic, p), offset) in last {
                    if let Err(e) = member.commit(&topic, p, offset) {
                        tracing::warn!(topic = label, partition = p, cause = %e, "could not commit an offset");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(topic = label, cause = %e, "reading the topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Reads `sub` until `each` returns false: every batch of records, each
/// decoded as a `T` (one braid cannot read is logged and skipped), in
/// order; a failed read is logged and retried after half a second.
pub(super) async fn read_records<T: serde::de::DeserializeOwned>(
    mut sub: Box<dyn braid_bus::topics::Subscription>,
    topic: &'static str,
    mut each: impl AsyncFnMut(Vec<T>) -> bool,
) {
    loop {
        match sub.next().await {
            Ok(braid_bus::topics::Delivery::Records(records)) => {
                let batch = records
                    .iter()
                    .filter_map(|r| match postcard::from_bytes::<T>(&r.value) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            tracing::error!(topic, partition = r.partition, offset = r.offset,
                                cause = %e, "skipping a record braid cannot read");
                            None
                        }
                    })
                    .collect();
                if !each(batch).await {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(topic, cause = %e, "reading the topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_bus::topics::{From, MessageBus as _};

    fn packets() -> Vec<Packet> {
        vec![Packet {
            from: "O=Alice, L=London, C=GB".into(),
            to: "O=Bob, L=Paris, C=FR".into(),
            bytes: vec![1, 2, 3],
        }]
    }

    #[tokio::test]
    async fn a_peer_that_asked_for_a_pause_gets_nothing_until_it_ends() {
        let topics = braid_flow::cluster::FlowTopics::with_prefix("t.", 2);
        let bus = Arc::new(braid_bus::memory::MemoryBus::new(topics.specs()));
        let mut out = bus
            .watch(&[topics.link_out.as_str()], From::Beginning)
            .await
            .unwrap();
        let pauses = Arc::new(Pauses::default());
        let t = BusTransport {
            bus: bus.clone(),
            topic: topics.link_out.clone(),
            counters: Arc::new(Counters::default()),
            pauses: pauses.clone(),
        };
        let bob = braid_p2p::PeerAddr {
            endpoint: "https://bob:1".into(),
            tls_leaf: None,
        };
        let carol = braid_p2p::PeerAddr {
            endpoint: "https://carol:1".into(),
            tls_leaf: None,
        };
        // As the link-in reader does with a gateway's `Overloaded`.
        let rec = FromGateways::Overloaded {
            endpoint: bob.endpoint.clone(),
            retry_after_ms: 300,
        };
        let decoded: FromGateways =
            postcard::from_bytes(&postcard::to_allocvec(&rec).unwrap()).unwrap();
        let FromGateways::Overloaded {
            endpoint,
            retry_after_ms,
        } = decoded
        else {
            panic!("a pause decodes as a pause");
        };
        pauses.pause(endpoint, Duration::from_millis(retry_after_ms));
        match braid_p2p::Transport::send(&t, &bob, packets()).await {
            Err(braid_p2p::TransportError::Overloaded { retry_after }) => {
                assert!(retry_after <= Duration::from_millis(300), "{retry_after:?}")
            }
            other => panic!("sent to a paused peer: {other:?}"),
        }
        // Others are not paused; what is sent is on link.out.
        braid_p2p::Transport::send(&t, &carol, packets())
            .await
            .unwrap();
        let first = loop {
            if let braid_bus::topics::Delivery::Records(r) = out.next().await.unwrap() {
                break r;
            }
        };
        assert_eq!(first.len(), 1);
        let rec: PacketsOut = postcard::from_bytes(&first[0].value).unwrap();
        assert_eq!(rec.endpoint, carol.endpoint, "nothing for the paused peer");
        // Once the pause is over, the peer gets packets again.
        while pauses.remaining(&bob.endpoint).is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        braid_p2p::Transport::send(&t, &bob, packets())
            .await
            .unwrap();
        let next = loop {
            if let braid_bus::topics::Delivery::Records(r) = out.next().await.unwrap() {
                break r;
            }
        };
        let rec: PacketsOut = postcard::from_bytes(&next[0].value).unwrap();
        assert_eq!(rec.endpoint, bob.endpoint);
    }
}
