//! The link manager's driver: runs one [`braid_link::Link`] per pair of
//! (local vnode, remote vnode), fed by the flow worker's outbox and by the
//! gateway, with its timers on tokio.
//!
//! The order of things that makes crashes harmless:
//! - a message for a remote vnode is durable in the sender's outbox before
//!   the flow worker hands it here ([`RemotePort::send`]); its link
//!   message id is a hash of its outbox key, so the copy republished after a
//!   restart is the same message to the peer;
//! - an arriving message is made durable where its receiver reads it
//!   ([`FlowSide::deliver`]: the receiver's inbox, one transaction per
//!   batch, or a cluster's event topic) before [`Link::mark_durable`] lets
//!   the link acknowledge it;
//! - the sender deletes it from its outbox only when the acknowledgement
//!   arrives ([`FlowSide::delivered`]); a message past its time-to-live
//!   ends the sending flow's session ([`FlowSide::failed`]).
//!
//! The link manager knows the flows only through [`FlowSide`] (this crate
//! does not depend on the flow worker's).
//!
//! Each node start takes the next value of a persisted boot counter and
//! starts every link's epochs above `boot << 16`, so a peer that kept its
//! session state never mistakes a new handshake for a replay.
//!
//! The driver talks to the membership through [`Peers`] and to the gateway
//! through [`Transport`]; the `braid` binary implements them over the
//! network map and the HTTPS gateway.

use braid_link::{
    Event, Identity, Link, LinkConfig, Membership, MessageId, PublicKey, SendError, StaticKeypair,
};
use braid_storage::Store;
use braid_storage::{Op, StoreError};
use braid_types::retry::retry_until_ok;
use braid_types::{HoldingId, SessionMessage, X500Name};
use sha2::Digest as _;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Arrived messages could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliverError {
    /// Not now (the store is unavailable, the receivers are busy): the
    /// link manager tries again.
    #[error("{0}")]
    Retry(String),
    /// Never (for instance: no such vnode here): they are dropped, not
    /// acknowledged.
    #[error("{0}")]
    Refused(String),
}

/// The flows' side of the link manager: which vnodes are this node's,
/// where arrived messages go, and where acknowledgements and failures of
/// sent ones are recorded.
#[async_trait::async_trait]
pub trait FlowSide: Send + Sync + 'static {
    /// The store (session keys, the boot counter).
    fn store(&self) -> Arc<dyn Store>;
    /// The application network's group (holding ids derive from it).
    fn group(&self) -> String;
    /// This node's vnodes: X.500 name and holding id.
    fn local_vnodes(&self) -> Vec<(String, HoldingId)>;
    /// Changes whenever the vnodes may have changed.
    fn vnodes_changed(&self) -> watch::Receiver<u64>;
    /// Makes arrived messages durable where their receivers read them;
    /// returns once they are.
    async fn deliver(&self, batch: &[SessionMessage]) -> Result<(), DeliverError>;
    /// The peer holds these sent messages (outbox keys): forget them.
    async fn delivered(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError>;
    /// `m` was given up on: its sender's session ends with `reason`.
    async fn failed(&self, m: &SessionMessage, reason: String) -> Result<(), StoreError>;
}

/// Where a member's gateway is, as the membership lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// The gateway's HTTPS URL.
    pub endpoint: String,
    /// The TLS leaf certificate (DER) the gateway must present.
    pub tls_leaf: Option<Vec<u8>>,
}

/// The membership as the link manager needs it.
pub trait Peers: Membership + Send + Sync + 'static {
    /// Whether `name` is a current member.
    fn is_member(&self, name: &str) -> bool;
    /// Where to send packets for `name`.
    fn address(&self, name: &str) -> Option<PeerAddr>;
    /// Whether `leaf` (a TLS client certificate, DER) is the one the
    /// membership lists for `name`.
    fn tls_matches(&self, name: &str, leaf: &[u8]) -> bool;
}

/// One sealed packet between two identities (X.500 names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Sending identity.
    pub from: String,
    /// Receiving identity.
    pub to: String,
    /// The sealed link packet.
    pub bytes: Vec<u8>,
}

/// Packets that arrived at the gateway in one request.
#[derive(Debug)]
pub struct InboundBatch {
    /// The packets.
    pub packets: Vec<Packet>,
    /// The sending gateway's address (for log lines).
    pub peer: String,
    /// Its TLS client certificate (DER), under mutual TLS.
    pub peer_leaf: Option<Vec<u8>>,
}

/// Sending packets to a peer gateway failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The peer is overloaded: wait before sending it more.
    #[error("peer overloaded; retry after {retry_after:?}")]
    Overloaded {
        /// How long to wait.
        retry_after: Duration,
    },
    /// Anything else (unreachable, refused, rejected); the links resend.
    #[error("{0}")]
    Failed(String),
}

/// Carries packets to peer gateways.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// POSTs `batch` to the gateway at `to`.
    async fn send(&self, to: &PeerAddr, batch: Vec<Packet>) -> Result<(), TransportError>;
}

/// What the link manager and gateway did, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets accepted by peer gateways.
    pub packets_sent: AtomicU64,
    /// POSTs accepted by peer gateways.
    pub requests_sent: AtomicU64,
    /// POSTs that failed (unreachable, refused, TLS).
    pub send_failures: AtomicU64,
    /// POSTs a peer answered with 503 (overloaded).
    pub overloaded: AtomicU64,
    /// Packets that arrived at this gateway.
    pub packets_received: AtomicU64,
    /// Arrived packets dropped (not a member, bad TLS binding, failed
    /// authentication, replayed, malformed).
    pub packets_rejected: AtomicU64,
    /// Messages stored for flows of this node.
    pub messages_delivered: AtomicU64,
    /// Sent messages the peer acknowledged.
    pub messages_acked: AtomicU64,
    /// Messages given up on.
    pub messages_dead_lettered: AtomicU64,
    /// Link handshakes that failed.
    pub handshakes_failed: AtomicU64,
    /// Link sessions established (first ones and re-keys).
    pub sessions_established: AtomicU64,
}

impl Counters {
    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let rows: [(&str, &str, &AtomicU64); 11] = [
            (
                "braid_gateway_packets_sent_total",
                "Packets accepted by peer gateways.",
                &self.packets_sent,
            ),
            (
                "braid_gateway_requests_sent_total",
                "POSTs accepted by peer gateways.",
                &self.requests_sent,
            ),
            (
                "braid_gateway_send_failures_total",
                "POSTs to peer gateways that failed (unreachable, refused, TLS).",
                &self.send_failures,
            ),
            (
                "braid_gateway_overloaded_total",
                "POSTs peer gateways answered with 503.",
                &self.overloaded,
            ),
            (
                "braid_gateway_packets_received_total",
                "Packets that arrived at this gateway.",
                &self.packets_received,
            ),
            (
                "braid_link_packets_rejected_total",
                "Arrived packets dropped (not a member, wrong TLS binding, failed authentication, replay, malformed).",
                &self.packets_rejected,
            ),
            (
                "braid_link_messages_delivered_total",
                "Messages from other nodes stored for flows here.",
                &self.messages_delivered,
            ),
            (
                "braid_link_messages_acked_total",
                "Messages to other nodes they acknowledged.",
                &self.messages_acked,
            ),
            (
                "braid_link_messages_dead_lettered_total",
                "Messages to other nodes given up on.",
                &self.messages_dead_lettered,
            ),
            (
                "braid_link_handshakes_failed_total",
                "Link handshakes that failed.",
                &self.handshakes_failed,
            ),
            (
                "braid_link_sessions_established_total",
                "Link sessions established (first ones and re-keys).",
                &self.sessions_established,
            ),
        ];
        for (name, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// Settings of the link manager.
#[derive(Debug, Clone)]
pub struct P2pConfig {
    /// Per-link protocol settings (`initial_epoch` is set from the boot
    /// counter).
    pub link: LinkConfig,
    /// A message not acknowledged within this is dead-lettered and the
    /// sending flow's session fails.
    pub ttl: Duration,
    /// Largest request body the driver builds for one POST.
    pub max_batch_bytes: usize,
    /// Most packets in one POST. With `per_peer_requests` POSTs in flight,
    /// packets can arrive up to their product out of order, which must stay
    /// well inside the receiver's replay window
    /// ([`braid_link::REPLAY_WINDOW`]).
    pub max_batch_packets: usize,
    /// POSTs in flight to one peer gateway at once.
    pub per_peer_requests: usize,
    /// Packets queued for one peer gateway before the oldest are dropped
    /// (the links resend them).
    pub per_peer_queue: usize,
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self {
            link: LinkConfig::default(),
            ttl: Duration::from_secs(DEFAULT_TTL_SECS),
            max_batch_bytes: 1 << 20,
            max_batch_packets: 256,
            per_peer_requests: 8,
            per_peer_queue: 65536,
        }
    }
}

/// A message's default time to live, seconds (a day).
pub const DEFAULT_TTL_SECS: u64 = 86_400;

/// The link manager's settings (flags of `braid node start`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LinkArgs {
    /// A message to another node not acknowledged within this many seconds
    /// is given up on and its flow's session fails.
    #[arg(long, env = "BRAID_MESSAGE_TTL_SECS", default_value_t = DEFAULT_TTL_SECS)]
    pub message_ttl_secs: u64,
    /// Re-key a link session after sealing this many packets (it is also
    /// re-keyed after an hour).
    #[arg(long, env = "BRAID_LINK_REKEY_PACKETS", default_value_t = 1 << 20)]
    pub link_rekey_packets: u64,
}

impl Default for LinkArgs {
    /// The flags' defaults.
    fn default() -> Self {
        braid_types::settings::defaults()
    }
}

impl LinkArgs {
    /// A message's time to live.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.message_ttl_secs)
    }

    /// The link manager's config: these settings, the rest at their
    /// defaults.
    pub fn config(&self) -> P2pConfig {
        P2pConfig {
            ttl: self.ttl(),
            link: LinkConfig {
                rekey_after_packets: self.link_rekey_packets.max(1),
                ..LinkConfig::default()
            },
            ..P2pConfig::default()
        }
    }
}

/// The membership view the links consult; swapped when the map changes.
struct SharedPeers(RwLock<Arc<dyn Peers>>);

impl SharedPeers {
    fn get(&self) -> Arc<dyn Peers> {
        self.0.read().expect("peers lock").clone()
    }
}

impl Membership for SharedPeers {
    fn session_key(&self, identity: &Identity) -> Option<PublicKey> {
        self.get().session_key(identity)
    }
    fn identity_of(&self, key: &PublicKey) -> Option<Identity> {
        self.get().identity_of(key)
    }
}

/// The flow worker's way into the link manager.
#[derive(Clone)]
pub struct RemotePort {
    tx: mpsc::UnboundedSender<Vec<SessionMessage>>,
    peers: watch::Receiver<Arc<dyn Peers>>,
}

impl RemotePort {
    /// Whether `name` is a current member.
    pub fn is_member(&self, name: &X500Name) -> bool {
        self.peers.borrow().is_member(name.as_str())
    }

    /// Hands messages (durable in their senders' outbox) to the links.
    pub fn send(&self, messages: Vec<SessionMessage>) {
        // Closed only while the node stops; the messages stay in the outbox.
        let _ = self.tx.send(messages);
    }
}

/// The receiving end of a [`RemotePort`], for [`LinkManager::spawn`].
pub struct Outbound(mpsc::UnboundedReceiver<Vec<SessionMessage>>);

/// A port for the flow worker and the queue it feeds.
pub fn remote_port(peers: watch::Receiver<Arc<dyn Peers>>) -> (RemotePort, Outbound) {
    let (tx, rx) = mpsc::unbounded_channel();
    (RemotePort { tx, peers }, Outbound(rx))
}

/// The vnodes' session key pairs, kept in the store (`p2p/session-key/…`).
#[derive(Clone)]
pub struct KeyStore {
    store: Arc<dyn Store>,
    keys: Arc<tokio::sync::Mutex<HashMap<HoldingId, StaticKeypair>>>,
}

impl KeyStore {
    /// Keys kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            keys: Default::default(),
        }
    }

    /// The session key pair of vnode `holding`, made and stored on first use.
    pub async fn ensure(&self, holding: HoldingId) -> anyhow::Result<StaticKeypair> {
        let mut keys = self.keys.lock().await;
        if let Some(k) = keys.get(&holding) {
            return Ok(k.clone());
        }
        let name = format!("p2p/session-key/{holding}");
        let store = &self.store;
        let decode = |b: &[u8]| {
            (b.len() == 64)
                .then(|| StaticKeypair::from_parts(&b[..32], &b[32..]))
                .flatten()
                .ok_or_else(|| anyhow::anyhow!("stored session key {name} is malformed"))
        };
        let kp = match store.meta(&name).await? {
            Some(b) => decode(&b)?,
            None => {
                let kp = StaticKeypair::generate()
                    .map_err(|e| anyhow::anyhow!("generating a session key: {e}"))?;
                let mut b = kp.private_bytes().to_vec();
                b.extend_from_slice(&kp.public().0);
                // Only if no other process (another link manager or
                // membership client of a cluster) made one meanwhile: then
                // its key is the vnode's.
                let put = Op::PutMetaIf {
                    key: name.clone(),
                    expected: None,
                    value: b,
                };
                match store.write(vec![put]).await {
                    Ok(()) => kp,
                    Err(StoreError::Changed { .. }) => match store.meta(&name).await? {
                        Some(b) => decode(&b)?,
                        None => anyhow::bail!("session key {name} changed and then vanished"),
                    },
                    Err(e) => return Err(e.into()),
                }
            }
        };
        keys.insert(holding, kp.clone());
        Ok(kp)
    }
}

/// Takes the next boot number (persisted before use). Every caller gets
/// a value of its own, also when several processes (a cluster's link
/// managers) take one at once: the write is conditional on the value read.
pub async fn next_boot(store: &dyn Store) -> Result<u32, StoreError> {
    const KEY: &str = "p2p/boot";
    loop {
        let read = store.meta(KEY).await?;
        let prev = read
            .as_deref()
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0);
        let next = prev.wrapping_add(1) & 0xffff;
        let put = Op::PutMetaIf {
            key: KEY.into(),
            expected: read,
            value: next.to_be_bytes().to_vec(),
        };
        match store.write(vec![put]).await {
            Ok(()) => return Ok(next),
            Err(StoreError::Changed { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The link message id of a session message: a hash of its outbox key, so
/// the same message republished after a restart has the same id.
pub fn message_id(m: &SessionMessage) -> MessageId {
    let d = sha2::Sha256::digest(m.key());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    MessageId(u64::from_be_bytes(b))
}

type Pair = (String, String);

/// Which pairs of vnodes (one of this node's, a remote one) a link
/// manager carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Share {
    /// Every pair: the embedded node, or a cluster's only link manager.
    All,
    /// The pairs whose [`braid_types::pair_key`] falls on one of `held`
    /// of `partitions` partitions: a cluster's link managers share the
    /// partitions of the topic that brings them messages.
    Partitions {
        /// The topic's partition count.
        partitions: u16,
        /// Those this link manager holds.
        held: BTreeSet<u16>,
    },
}

impl Share {
    /// Every pair, for good (nothing will change it).
    pub fn everything() -> watch::Receiver<Share> {
        watch::channel(Share::All).1
    }

    /// Whether the pair of local vnode `local` and remote vnode `remote`
    /// is carried.
    pub fn carries(&self, local: &HoldingId, remote: &str) -> bool {
        match self {
            Share::All => true,
            Share::Partitions { partitions, held } => {
                held.contains(&braid_bus::topics::partition_of(
                    &braid_types::pair_key(local, remote),
                    *partitions,
                ))
            }
        }
    }

    /// Whether `self` carries a pair that `before` did not.
    fn gains_on(&self, before: &Share) -> bool {
        match (before, self) {
            (Share::All, _) => false,
            (Share::Partitions { .. }, Share::All) => true,
            (
                Share::Partitions {
                    partitions: a,
                    held: x,
                },
                Share::Partitions {
                    partitions: b,
                    held: y,
                },
            ) => a != b || !y.is_subset(x),
        }
    }
}

/// What the link manager works with.
pub struct Deps {
    /// The flows whose messages it carries.
    pub worker: Arc<dyn FlowSide>,
    /// The vnodes' session keys.
    pub keys: KeyStore,
    /// The membership, updated as the map changes.
    pub peers: watch::Receiver<Arc<dyn Peers>>,
    /// The gateway client.
    pub transport: Arc<dyn Transport>,
    /// Packets from the gateway's server.
    pub inbound: mpsc::Receiver<InboundBatch>,
    /// Messages from the flow worker's [`RemotePort`].
    pub outbound: Outbound,
    /// Counters for `/metrics`.
    pub counters: Arc<Counters>,
    /// The pairs it carries ([`Share::everything`] unless several link
    /// managers share them). When it changes, the links of pairs no longer
    /// carried are dropped, and links started from then on take a new
    /// boot number, so that their epochs are above those of any link
    /// manager that carried the pair before.
    pub share: watch::Receiver<Share>,
}

/// A running link manager.
pub struct LinkManager {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LinkManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Done {
    Durable(Vec<(Pair, MessageId)>),
    Sent {
        endpoint: String,
        result: Result<(), TransportError>,
    },
}

struct PeerQueue {
    addr: PeerAddr,
    packets: VecDeque<Packet>,
    in_flight: usize,
    paused_until: Option<Instant>,
}

/// Packets waiting for each peer gateway, batched into POSTs with a bound
/// on the POSTs in flight per peer; a peer that answered `503` is paused
/// for its `Retry-After`.
struct Queues {
    peers: HashMap<String, PeerQueue>,
    per_peer_requests: usize,
    per_peer_queue: usize,
    max_batch_bytes: usize,
    max_batch_packets: usize,
}

impl Queues {
    fn new(c: &P2pConfig) -> Self {
        Self {
            peers: HashMap::new(),
            per_peer_requests: c.per_peer_requests.max(1),
            per_peer_queue: c.per_peer_queue.max(1),
            max_batch_bytes: c.max_batch_bytes,
            max_batch_packets: c.max_batch_packets.max(1),
        }
    }

    /// Queues `packet` for the gateway at `addr`; beyond the queue bound the
    /// oldest packet is dropped (its link resends it).
    fn push(&mut self, addr: PeerAddr, packet: Packet) {
        let q = self
            .peers
            .entry(addr.endpoint.clone())
            .or_insert_with(|| PeerQueue {
                addr: addr.clone(),
                packets: VecDeque::new(),
                in_flight: 0,
                paused_until: None,
            });
        q.addr = addr;
        if q.packets.len() >= self.per_peer_queue {
            q.packets.pop_front();
        }
        q.packets.push_back(packet);
    }

    /// A POST to `endpoint` finished.
    fn sent(&mut self, endpoint: &str, result: &Result<(), TransportError>, now: Instant) {
        let Some(q) = self.peers.get_mut(endpoint) else {
            return;
        };
        q.in_flight = q.in_flight.saturating_sub(1);
        match result {
            Ok(()) => {}
            Err(TransportError::Overloaded { retry_after }) => {
                tracing::debug!(%endpoint, ?retry_after, "peer gateway overloaded; pausing");
                q.paused_until = Some(now + *retry_after);
            }
            Err(TransportError::Failed(e)) => {
                tracing::debug!(%endpoint, cause = %e, "sending to peer gateway failed; the links resend");
            }
        }
    }

    /// The batches to POST now (each counted in flight until
    /// [`sent`](Self::sent)).
    fn ready(&mut self, now: Instant) -> Vec<(String, PeerAddr, Vec<Packet>)> {
        let mut out = Vec::new();
        for (endpoint, q) in &mut self.peers {
            match q.paused_until {
                Some(t) if t > now => continue,
                Some(_) => q.paused_until = None,
                None => {}
            }
            while q.in_flight < self.per_peer_requests && !q.packets.is_empty() {
                let mut batch = Vec::new();
                let mut bytes = 0;
                while let Some(p) = q.packets.front() {
                    let len = p.bytes.len() + p.from.len() + p.to.len() + 8;
                    if !batch.is_empty()
                        && (bytes + len > self.max_batch_bytes
                            || batch.len() >= self.max_batch_packets)
                    {
                        break;
                    }
                    bytes += len;
                    batch.push(q.packets.pop_front().expect("front exists"));
                }
                q.in_flight += 1;
                out.push((endpoint.clone(), q.addr.clone(), batch));
            }
        }
        out
    }

    /// When a paused peer may be sent to again.
    fn next_resume(&self) -> Option<Instant> {
        self.peers.values().filter_map(|q| q.paused_until).min()
    }
}

/// For the lines about refused inbound packets: whoever can reach the
/// gateway can cause them (anyone, under one-way TLS), so a flood must not
/// become a flood of log lines. Ten a minute per kind.
static INBOUND_LOGS: braid_types::log_limit::LogLimiter =
    braid_types::log_limit::LogLimiter::new(10, std::time::Duration::from_secs(60));

struct Driver {
    worker: Arc<dyn FlowSide>,
    keys: KeyStore,
    config: P2pConfig,
    shared: Arc<SharedPeers>,
    transport: Arc<dyn Transport>,
    links: HashMap<Pair, Link>,
    /// Links touched since the last `process`: only they are polled.
    dirty: HashSet<Pair>,
    /// Each link's next timeout, indexed by time (so the loop never scans
    /// every link).
    timers: BTreeSet<(std::time::Instant, Pair)>,
    timer_of: HashMap<Pair, std::time::Instant>,
    outgoing: HashMap<(Pair, MessageId), SessionMessage>,
    local: HashMap<String, HoldingId>,
    queues: Queues,
    done_tx: mpsc::UnboundedSender<Done>,
    counters: Arc<Counters>,
    share: Share,
}

impl LinkManager {
    /// Starts the driver.
    pub async fn spawn(deps: Deps, mut config: P2pConfig) -> anyhow::Result<LinkManager> {
        let Deps {
            worker,
            keys,
            mut peers,
            transport,
            mut inbound,
            outbound,
            counters,
            mut share,
        } = deps;
        let boot = next_boot(&*worker.store()).await?;
        config.link.initial_epoch = boot << 16;
        tracing::info!(boot, "link manager starting");
        let shared = Arc::new(SharedPeers(RwLock::new(peers.borrow_and_update().clone())));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut vnodes = worker.vnodes_changed();
        let mut d = Driver {
            worker,
            keys,
            queues: Queues::new(&config),
            config,
            shared,
            transport,
            links: HashMap::new(),
            dirty: HashSet::new(),
            timers: BTreeSet::new(),
            timer_of: HashMap::new(),
            outgoing: HashMap::new(),
            local: HashMap::new(),
            done_tx,
            counters,
            share: share.borrow_and_update().clone(),
        };
        d.refresh_local();
        let mut outbound = outbound.0;
        let task = tokio::spawn(async move {
            loop {
                let deadline = d.next_deadline();
                tokio::select! {
                    Some(mut batch) = outbound.recv() => {
                        // A change of share published before these came
                        // applies to them.
                        if share.has_changed().unwrap_or(false) {
                            let now = share.borrow_and_update().clone();
                            d.reshare(now).await;
                        }
                        while batch.len() < 4096 {
                            match outbound.try_recv() {
                                Ok(more) => batch.extend(more),
                                Err(_) => break,
                            }
                        }
                        for m in batch {
                            d.send_message(m).await;
                        }
                    }
                    Some(b) = inbound.recv() => d.on_inbound(b).await,
                    Some(done) = done_rx.recv() => d.on_done(done),
                    Ok(()) = peers.changed() => {
                        let view = peers.borrow_and_update().clone();
                        *d.shared.0.write().expect("peers lock") = view;
                    }
                    Ok(()) = vnodes.changed() => d.refresh_local(),
                    Ok(()) = share.changed() => {
                        let now = share.borrow_and_update().clone();
                        d.reshare(now).await;
                    }
                    // At least 1 ms ahead: a timer a link cannot clear must
                    // not spin the loop.
                    _ = sleep_until(deadline.map(|t| t.max(Instant::now() + Duration::from_millis(1)))) => d.on_timers(),
                }
                d.process();
            }
        });
        Ok(LinkManager { task })
    }
}

/// Runs the link manager with `args` until `shutdown` completes (see
/// [`LinkManager::spawn`], which a caller that keeps the handle uses
/// instead). Fails at once if it cannot start (the boot counter in the
/// store).
pub async fn run(
    args: LinkArgs,
    deps: Deps,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let links = LinkManager::spawn(deps, args.config()).await?;
    shutdown.await;
    drop(links);
    Ok(())
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Driver {
    fn refresh_local(&mut self) {
        self.local = self.worker.local_vnodes().into_iter().collect();
    }

    /// Whether this link manager carries `pair`.
    fn carries(&self, pair: &Pair) -> bool {
        match self.local.get(&pair.0) {
            Some(h) => self.share.carries(h, &pair.1),
            None => matches!(self.share, Share::All),
        }
    }

    /// Carries the pairs of `share` from now on (see [`Deps::share`]).
    async fn reshare(&mut self, share: Share) {
        let gains = share.gains_on(&self.share);
        self.share = share;
        let gone: Vec<Pair> = self
            .links
            .keys()
            .filter(|p| !self.carries(p))
            .cloned()
            .collect();
        for pair in &gone {
            self.links.remove(pair);
            self.dirty.remove(pair);
            if let Some(t) = self.timer_of.remove(pair) {
                self.timers.remove(&(t, pair.clone()));
            }
        }
        let before = self.outgoing.len();
        self.outgoing.retain(|(p, _), _| !gone.contains(p));
        tracing::info!(
            links_dropped = gone.len(),
            messages_dropped = before - self.outgoing.len(),
            "the pairs this link manager carries changed"
        );
        if gains {
            let store = self.worker.store();
            let boot = retry_until_ok("taking a boot number", || next_boot(&*store)).await;
            self.config.link.initial_epoch = boot << 16;
            tracing::info!(
                boot,
                "links of the pairs taken over start above this boot number"
            );
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let links = self.timers.first().map(|(t, _)| Instant::from_std(*t));
        links.into_iter().chain(self.queues.next_resume()).min()
    }

    async fn link(&mut self, pair: &Pair) -> Option<&mut Link> {
        if !self.links.contains_key(pair) {
            let holding = *self.local.get(&pair.0)?;
            let keys = match self.keys.ensure(holding).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(vnode = %pair.0, cause = %e, "no session key");
                    return None;
                }
            };
            let link = Link::new(
                self.config.link.clone(),
                Identity::from(pair.0.as_str()),
                keys,
                Identity::from(pair.1.as_str()),
                self.shared.clone(),
            );
            self.links.insert(pair.clone(), link);
        }
        self.dirty.insert(pair.clone());
        self.links.get_mut(pair)
    }

    async fn send_message(&mut self, m: SessionMessage) {
        if !self.share.carries(&m.from.holding, m.to.name.as_str()) {
            return; // another link manager's
        }
        let pair: Pair = (m.from.name.as_str().into(), m.to.name.as_str().into());
        let id = message_id(&m);
        if self.outgoing.contains_key(&(pair.clone(), id)) {
            return; // republished while still in flight
        }
        let payload = match postcard::to_allocvec(&m) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(cause = %e, "cannot encode a session message");
                return;
            }
        };
        let ttl = self.config.ttl;
        let Some(link) = self.link(&pair).await else {
            tracing::warn!(from = %pair.0, "message from a vnode this node does not host; dropped");
            return;
        };
        match link.send(Instant::now().into_std(), id, payload, ttl) {
            Ok(()) => {
                self.outgoing.insert((pair, id), m);
            }
            Err(SendError::DuplicateId(_)) => {}
            Err(e) => {
                tracing::warn!(from = %pair.0, to = %pair.1, cause = %e, "message refused by the link");
                self.fail(m, e.to_string());
            }
        }
    }

    fn fail(&self, m: SessionMessage, reason: String) {
        let w = self.worker.clone();
        tokio::spawn(async move {
            retry_until_ok("recording an undeliverable message", || {
                w.failed(&m, reason.clone())
            })
            .await;
        });
    }

    async fn on_inbound(&mut self, b: InboundBatch) {
        let now = Instant::now().into_std();
        let c = self.counters.clone();
        let mut packets = b.packets;
        if !matches!(self.share, Share::All) {
            // Those of pairs another link manager carries are its own.
            packets.retain(|p| match self.local.get(&p.to) {
                Some(h) => self.share.carries(h, &p.from),
                None => true,
            });
        }
        c.packets_received
            .fetch_add(packets.len() as u64, Ordering::Relaxed);
        let reject = || c.packets_rejected.fetch_add(1, Ordering::Relaxed);
        for p in packets {
            if !self.local.contains_key(&p.to) {
                reject();
                if let Some(note) = INBOUND_LOGS.allow("not_hosted") {
                    tracing::warn!(peer = %b.peer, from = %p.from, to = %p.to, "dropping packet for a vnode this node does not host{note}");
                }
                continue;
            }
            let peers = self.shared.get();
            if !peers.is_member(&p.from) {
                reject();
                if let Some(note) = INBOUND_LOGS.allow("not_member") {
                    tracing::warn!(peer = %b.peer, from = %p.from, to = %p.to, "dropping packet from a sender that is not in the network map{note}");
                }
                continue;
            }
            if let Some(leaf) = &b.peer_leaf
                && !peers.tls_matches(&p.from, leaf)
            {
                reject();
                if let Some(note) = INBOUND_LOGS.allow("wrong_certificate") {
                    tracing::warn!(peer = %b.peer, from = %p.from, to = %p.to, "dropping packet: the sending gateway's TLS certificate is not the one the network map lists for the sender{note}");
                }
                continue;
            }
            let pair: Pair = (p.to.clone(), p.from.clone());
            let Some(link) = self.link(&pair).await else {
                continue;
            };
            if let Err(e) = link.handle_packet(now, &p.bytes) {
                reject();
                if matches!(e, braid_link::PacketError::UnknownEpoch { .. }) {
                    // The peer holds a session we lost (we restarted).
                    link.resync(now);
                }
                if let Some(note) = INBOUND_LOGS.allow("rejected_packet") {
                    tracing::warn!(peer = %b.peer, from = %p.from, to = %p.to, cause = %e, "rejected packet{note}");
                }
            }
        }
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Durable(ids) => {
                let now = Instant::now().into_std();
                for (pair, id) in ids {
                    if let Some(l) = self.links.get_mut(&pair) {
                        let _ = l.mark_durable(now, id);
                        self.dirty.insert(pair);
                    }
                }
            }
            Done::Sent { endpoint, result } => {
                self.queues.sent(&endpoint, &result, Instant::now());
            }
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        while let Some((t, _)) = self.timers.first()
            && *t <= now.into_std()
        {
            let (_, pair) = self.timers.pop_first().expect("non-empty");
            self.timer_of.remove(&pair);
            if let Some(l) = self.links.get_mut(&pair) {
                l.handle_timeout(now.into_std());
                self.dirty.insert(pair);
            }
        }
    }

    /// Collects what the links produced: packets to send, messages to make
    /// durable, acknowledgements and dead letters.
    fn process(&mut self) {
        let peers = self.shared.get();
        let mut delivered: Vec<(Pair, MessageId, SessionMessage)> = Vec::new();
        let mut acked = Vec::new();
        let mut dead = Vec::new();
        for pair in std::mem::take(&mut self.dirty) {
            let Some(link) = self.links.get_mut(&pair) else {
                continue;
            };
            let pair = &pair;
            while let Some(bytes) = link.poll_transmit() {
                let Some(addr) = peers.address(&pair.1) else {
                    tracing::debug!(to = %pair.1, "no gateway address for peer; packet dropped (resent later)");
                    continue;
                };
                self.queues.push(
                    addr,
                    Packet {
                        from: pair.0.clone(),
                        to: pair.1.clone(),
                        bytes,
                    },
                );
            }
            while let Some(ev) = link.poll_event() {
                match ev {
                    Event::Established { epoch, rekey } => {
                        self.counters
                            .sessions_established
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(local = %pair.0, remote = %pair.1, epoch, rekey, "link session established");
                    }
                    Event::HandshakeFailed(e) => {
                        self.counters
                            .handshakes_failed
                            .fetch_add(1, Ordering::Relaxed);
                        if let Some(note) = INBOUND_LOGS.allow("handshake_failed") {
                            tracing::warn!(local = %pair.0, remote = %pair.1, cause = %e, "link handshake failed{note}");
                        }
                    }
                    Event::Delivered { id, payload } => match decode_inbound(pair, &payload) {
                        Ok(m) => delivered.push((pair.clone(), id, m)),
                        Err(e) => {
                            if let Some(note) = INBOUND_LOGS.allow("foreign_message") {
                                tracing::warn!(local = %pair.0, remote = %pair.1, cause = %e, "dropping a message that does not belong to this link{note}");
                            }
                        }
                    },
                    Event::Acked(id) => acked.push((pair.clone(), id)),
                    Event::DeadLettered { id, reason } => dead.push((pair.clone(), id, reason)),
                    _ => {}
                }
            }
            // Re-index the link's next timeout.
            let next = link.poll_timeout();
            if let Some(old) = self.timer_of.remove(pair) {
                self.timers.remove(&(old, pair.clone()));
            }
            if let Some(t) = next {
                self.timers.insert((t, pair.clone()));
                self.timer_of.insert(pair.clone(), t);
            }
        }
        let group = self.worker.group();
        delivered.retain(|(pair, _, m)| {
            let ok = self.local.get(&pair.0) == Some(&m.to.holding)
                && m.from.holding == HoldingId::derive(&m.from.name, &group);
            if !ok && let Some(note) = INBOUND_LOGS.allow("wrong_holding_ids") {
                tracing::warn!(local = %pair.0, remote = %pair.1, "dropping a message with holding ids that do not match its names{note}");
            }
            ok
        });
        if !delivered.is_empty() {
            self.counters
                .messages_delivered
                .fetch_add(delivered.len() as u64, Ordering::Relaxed);
            let w = self.worker.clone();
            let tx = self.done_tx.clone();
            tokio::spawn(async move {
                let msgs: Vec<SessionMessage> =
                    delivered.iter().map(|(_, _, m)| m.clone()).collect();
                // Store failures and a busy worker (too many sessions
                // with messages waiting for their init) are retried; a
                // refusal is final.
                let outcome = retry_until_ok("storing arrived messages", || async {
                    match w.deliver(&msgs).await {
                        Err(DeliverError::Retry(e)) => Err(e),
                        other => Ok(other),
                    }
                })
                .await;
                if let Err(e) = outcome {
                    tracing::warn!(cause = %e, "arrived messages refused");
                    return;
                }
                let ids = delivered.into_iter().map(|(p, id, _)| (p, id)).collect();
                let _ = tx.send(Done::Durable(ids));
            });
        }
        if !acked.is_empty() {
            self.counters
                .messages_acked
                .fetch_add(acked.len() as u64, Ordering::Relaxed);
            let keys: Vec<Vec<u8>> = acked
                .into_iter()
                .filter_map(|k| self.outgoing.remove(&k))
                .map(|m| m.key())
                .collect();
            let w = self.worker.clone();
            tokio::spawn(async move {
                // If this never succeeds the messages stay in the outbox and
                // are sent again after a restart; the peer drops them.
                retry_until_ok("removing acknowledged messages from the outbox", || {
                    w.delivered(keys.clone())
                })
                .await;
            });
        }
        for (pair, id, reason) in dead {
            if let Some(m) = self.outgoing.remove(&(pair.clone(), id)) {
                self.counters
                    .messages_dead_lettered
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(from = %pair.0, to = %pair.1, flow_id = %m.session.initiator_flow, cause = %reason, "message dead-lettered; its session fails");
                self.fail(m, reason.to_string());
            }
        }
        self.pump_sends();
    }

    fn pump_sends(&mut self) {
        for (endpoint, addr, batch) in self.queues.ready(Instant::now()) {
            let transport = self.transport.clone();
            let tx = self.done_tx.clone();
            tokio::spawn(async move {
                let result = transport.send(&addr, batch).await;
                let _ = tx.send(Done::Sent { endpoint, result });
            });
        }
    }
}

/// Decodes a delivered payload and checks it travels between the link's
/// two identities (a member cannot speak for another).
fn decode_inbound(pair: &Pair, payload: &[u8]) -> Result<SessionMessage, String> {
    let m: SessionMessage =
        postcard::from_bytes(payload).map_err(|e| format!("undecodable message: {e}"))?;
    if m.to.name.as_str() != pair.0 || m.from.name.as_str() != pair.1 {
        return Err(format!(
            "message from {} to {} arrived on the link {} <- {}",
            m.from.name, m.to.name, pair.0, pair.1
        ));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_types::{Body, Endpoint, FlowId, SessionId, Side};

    fn msg(from: &str, to: &str, seq: u64) -> SessionMessage {
        let (from, to): (X500Name, X500Name) = (from.parse().unwrap(), to.parse().unwrap());
        SessionMessage {
            session: SessionId {
                initiator_flow: FlowId::random(),
                index: 1,
            },
            from: Endpoint {
                holding: HoldingId::derive(&from, "g"),
                name: from,
                side: Side::Initiator,
            },
            to: Endpoint {
                holding: HoldingId::derive(&to, "g"),
                name: to,
                side: Side::Responder,
            },
            seq,
            init: None,
            body: Body::Data(vec![1, 2, 3]),
        }
    }

    const A: &str = "O=Alice, L=London, C=GB";
    const B: &str = "O=Bob, L=New York, C=US";
    const C: &str = "O=Carol, L=Paris, C=FR";

    #[test]
    fn message_ids_name_the_outbox_entry() {
        let m = msg(A, B, 1);
        assert_eq!(message_id(&m), message_id(&m.clone()), "not stable");
        let mut next = m.clone();
        next.seq = 2;
        assert_ne!(message_id(&m), message_id(&next));
        let mut other_session = m.clone();
        other_session.session.index = 2;
        assert_ne!(message_id(&m), message_id(&other_session));
    }

    #[test]
    fn a_link_carries_only_its_own_two_identities() {
        let m = msg(A, B, 1);
        let bytes = postcard::to_allocvec(&m).unwrap();
        // Arrived at Bob from Alice: accepted.
        let pair: Pair = (B.into(), A.into());
        assert_eq!(decode_inbound(&pair, &bytes).unwrap(), m);
        // The same bytes on Bob's link with Carol: Carol speaking for Alice.
        let err = decode_inbound(&(B.into(), C.into()), &bytes).unwrap_err();
        assert!(err.contains("arrived on the link"), "{err}");
        // Addressed to someone else than the link's local end.
        let err = decode_inbound(&(C.into(), A.into()), &bytes).unwrap_err();
        assert!(err.contains("arrived on the link"), "{err}");
        // Not a session message at all.
        let err = decode_inbound(&pair, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.contains("undecodable"), "{err}");
    }

    fn packet(i: usize) -> Packet {
        Packet {
            from: A.into(),
            to: B.into(),
            bytes: vec![i as u8; 100],
        }
    }

    fn addr() -> PeerAddr {
        PeerAddr {
            endpoint: "https://127.0.0.1:1".into(),
            tls_leaf: None,
        }
    }

    #[test]
    fn sends_are_batched_bounded_per_peer_and_paused_when_overloaded() {
        let config = P2pConfig {
            per_peer_requests: 2,
            max_batch_packets: 10,
            per_peer_queue: 1000,
            ..P2pConfig::default()
        };
        let mut q = Queues::new(&config);
        for i in 0..100 {
            q.push(addr(), packet(i));
        }
        let t0 = Instant::now();
        let ready = q.ready(t0);
        assert_eq!(ready.len(), 2, "at most 2 POSTs in flight per peer");
        assert!(ready.iter().all(|(_, _, b)| b.len() == 10));
        assert_eq!(ready[0].2[0].bytes[0], 0, "oldest packets first");
        assert!(q.ready(t0).is_empty(), "both request slots are taken");

        // The peer answers 503: nothing more until its Retry-After passed,
        // even with a free slot.
        let endpoint = ready[0].0.clone();
        let overloaded = Err(TransportError::Overloaded {
            retry_after: Duration::from_secs(1),
        });
        q.sent(&endpoint, &overloaded, t0);
        assert!(q.ready(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(q.next_resume(), Some(t0 + Duration::from_secs(1)));
        let resumed = q.ready(t0 + Duration::from_secs(1));
        assert_eq!(resumed.len(), 1, "one slot free after the pause");
        assert_eq!(q.next_resume(), None);

        // A failed POST frees its slot at once (the links resend).
        q.sent(
            &endpoint,
            &Err(TransportError::Failed("refused".into())),
            t0,
        );
        assert_eq!(q.ready(t0 + Duration::from_secs(1)).len(), 1);
    }

    #[test]
    fn a_full_queue_drops_its_oldest_packets() {
        let config = P2pConfig {
            per_peer_queue: 5,
            max_batch_packets: 100,
            ..P2pConfig::default()
        };
        let mut q = Queues::new(&config);
        for i in 0..8 {
            q.push(addr(), packet(i));
        }
        let ready = q.ready(Instant::now());
        let firsts: Vec<u8> = ready[0].2.iter().map(|p| p.bytes[0]).collect();
        assert_eq!(firsts, vec![3, 4, 5, 6, 7]);
    }

    #[test]
    fn counters_render_as_prometheus_text() {
        let c = Counters::default();
        c.send_failures.fetch_add(3, Ordering::Relaxed);
        let mut out = String::new();
        c.render(&mut out);
        assert!(
            out.contains("\nbraid_gateway_send_failures_total 3\n"),
            "{out}"
        );
        assert!(out.contains("# TYPE braid_link_sessions_established_total counter"));
    }
}
