//! The link manager on its own: two of them ([`braid_p2p::run`]), each
//! with a stand-in for its node's flows and the gateway replaced by a
//! channel between them, carry a session message from one node's vnode to
//! the other's: delivered there, acknowledged back, and a stop ends each.

use braid_link::{Identity, Membership, PublicKey, StaticMembership};
use braid_p2p::{
    Counters, DeliverError, Deps, FlowSide, InboundBatch, KeyStore, LinkArgs, Packet, PeerAddr,
    Peers, Transport, TransportError,
};
use braid_storage::embedded::EmbeddedStore;
use braid_storage::{Store, StoreError};
use braid_types::{
    Body, Endpoint, FlowId, HoldingId, SessionId, SessionInit, SessionMessage, Side, X500Name,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};

const GROUP: &str = "test";

/// A node's flows as the link manager sees them: one vnode, and what
/// arrives and what is acknowledged kept.
struct Flows {
    store: Arc<dyn Store>,
    vnode: (String, HoldingId),
    vnodes: watch::Sender<u64>,
    arrived: Mutex<Vec<SessionMessage>>,
    acknowledged: Mutex<Vec<Vec<u8>>>,
    changed: Notify,
}

#[async_trait::async_trait]
impl FlowSide for Flows {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
    fn group(&self) -> String {
        GROUP.into()
    }
    fn local_vnodes(&self) -> Vec<(String, HoldingId)> {
        vec![self.vnode.clone()]
    }
    fn vnodes_changed(&self) -> watch::Receiver<u64> {
        self.vnodes.subscribe()
    }
    async fn deliver(&self, batch: &[SessionMessage]) -> Result<(), DeliverError> {
        self.arrived.lock().unwrap().extend_from_slice(batch);
        self.changed.notify_waiters();
        Ok(())
    }
    async fn delivered(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        self.acknowledged.lock().unwrap().extend(keys);
        self.changed.notify_waiters();
        Ok(())
    }
    async fn failed(&self, m: &SessionMessage, reason: String) -> Result<(), StoreError> {
        panic!("{} given up on: {reason}", m.session);
    }
}

/// Both nodes' vnodes, their session keys and their "gateways".
struct Members {
    keys: StaticMembership,
    endpoints: HashMap<String, String>,
}

impl Membership for Members {
    fn session_key(&self, identity: &Identity) -> Option<PublicKey> {
        self.keys.session_key(identity)
    }
    fn identity_of(&self, key: &PublicKey) -> Option<Identity> {
        self.keys.identity_of(key)
    }
}

impl Peers for Members {
    fn is_member(&self, name: &str) -> bool {
        self.endpoints.contains_key(name)
    }
    fn address(&self, name: &str) -> Option<PeerAddr> {
        Some(PeerAddr {
            endpoint: self.endpoints.get(name)?.clone(),
            tls_leaf: None,
        })
    }
    fn tls_matches(&self, _: &str, _: &[u8]) -> bool {
        true
    }
}

/// The gateways: a packet for an endpoint goes into its link manager's
/// inbound channel.
struct Wire(HashMap<String, mpsc::Sender<InboundBatch>>);

#[async_trait::async_trait]
impl Transport for Wire {
    async fn send(&self, to: &PeerAddr, batch: Vec<Packet>) -> Result<(), TransportError> {
        let tx = self
            .0
            .get(&to.endpoint)
            .ok_or_else(|| TransportError::Failed(format!("no gateway {}", to.endpoint)))?;
        tx.send(InboundBatch {
            packets: batch,
            peer: "the test's wire".into(),
            peer_leaf: None,
        })
        .await
        .map_err(|_| TransportError::Failed("the peer stopped".into()))
    }
}

fn endpoint(name: &X500Name, side: Side) -> Endpoint {
    Endpoint {
        holding: HoldingId::derive(name, GROUP),
        name: name.clone(),
        side,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_link_managers_alone_carry_a_message_and_its_acknowledgement() {
    let dir = braid_testkit::TempDir::new("braid-p2p-alone");
    let names: [X500Name; 2] = [
        "O=Alice, L=London, C=GB".parse().unwrap(),
        "O=Bob, L=Paris, C=FR".parse().unwrap(),
    ];
    let mut flows = Vec::new();
    let mut keys = StaticMembership::new();
    let mut endpoints = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join(format!("node{i}.redb"))).unwrap());
        let holding = HoldingId::derive(name, GROUP);
        let kp = KeyStore::new(store.clone()).ensure(holding).await.unwrap();
        keys.insert(Identity::from(name.as_str()), kp.public());
        endpoints.insert(name.as_str().to_string(), format!("gateway-{i}"));
        flows.push(Arc::new(Flows {
            store,
            vnode: (name.as_str().to_string(), holding),
            vnodes: watch::channel(0).0,
            arrived: Mutex::new(Vec::new()),
            acknowledged: Mutex::new(Vec::new()),
            changed: Notify::new(),
        }));
    }
    let members: Arc<dyn Peers> = Arc::new(Members { keys, endpoints });
    let (in_tx, in_rx): (Vec<_>, Vec<_>) = (0..2).map(|_| mpsc::channel(16)).unzip();
    let wire = Arc::new(Wire(
        in_tx
            .into_iter()
            .enumerate()
            .map(|(i, tx)| (format!("gateway-{i}"), tx))
            .collect(),
    ));
    let mut ports = Vec::new();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for (f, inbound) in flows.iter().zip(in_rx) {
        let peers = watch::channel(members.clone()).1;
        let (port, outbound) = braid_p2p::remote_port(peers.clone());
        let deps = Deps {
            worker: f.clone(),
            keys: KeyStore::new(f.store.clone()),
            peers,
            transport: wire.clone(),
            inbound,
            outbound,
            counters: Arc::new(Counters::default()),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tasks.push(tokio::spawn(braid_p2p::run(
            LinkArgs::default(),
            deps,
            async move {
                let _ = stopped.await;
            },
        )));
        ports.push(port);
        stops.push(stop);
    }
    assert!(ports[0].is_member(&names[1]), "Bob is a member");
    let m = SessionMessage {
        session: SessionId {
            initiator_flow: FlowId::random(),
            index: 1,
        },
        from: endpoint(&names[0], Side::Initiator),
        to: endpoint(&names[1], Side::Responder),
        seq: 1,
        init: Some(SessionInit {
            protocol: "ping".into(),
            versions: vec![1],
        }),
        body: Body::Data(b"hello".to_vec()),
    };
    ports[0].send(vec![m.clone()]);
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let waiting = flows[1].changed.notified();
            let seen = flows[0].acknowledged.lock().unwrap().contains(&m.key());
            if seen {
                break;
            }
            // Woken by either side's change, or checked again soon.
            let _ = tokio::time::timeout(Duration::from_millis(50), waiting).await;
        }
    })
    .await
    .expect("acknowledged within 30 s");
    assert_eq!(
        *flows[1].arrived.lock().unwrap(),
        vec![m],
        "delivered once, intact"
    );
    assert!(flows[0].arrived.lock().unwrap().is_empty());
    for (stop, task) in stops.into_iter().zip(tasks) {
        stop.send(()).unwrap();
        task.await.unwrap().expect("a clean stop");
    }
}
