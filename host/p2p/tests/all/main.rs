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

/// A node's flows as the link manager sees them: its vnodes, and what
/// arrives and what is acknowledged kept.
struct Flows {
    store: Arc<dyn Store>,
    vnodes_here: Vec<(String, HoldingId)>,
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
        self.vnodes_here.clone()
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
            vnodes_here: vec![(name.as_str().to_string(), holding)],
            vnodes: watch::channel(0).0,
            arrived: Mutex::new(Vec::new()),
            acknowledged: Mutex::new(Vec::new()),
            changed: Notify::new(),
        }));
    }
    let members: Arc<dyn Peers> = Arc::new(Members { keys, endpoints });
    let (in_tx, in_rx): (Vec<_>, Vec<_>) = (0..2).map(|_| mpsc::channel(16)).unzip();
    let wire = Arc::new(Fanout(
        in_tx
            .into_iter()
            .enumerate()
            .map(|(i, tx)| (format!("gateway-{i}"), vec![tx]))
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
            share: braid_p2p::Share::everything(),
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

/// The gateways: the packets for a node's endpoint go to each of its link
/// managers, as a cluster's do (every link manager reads all of
/// `link.in`).
struct Fanout(HashMap<String, Vec<mpsc::Sender<InboundBatch>>>);

#[async_trait::async_trait]
impl Transport for Fanout {
    async fn send(&self, to: &PeerAddr, batch: Vec<Packet>) -> Result<(), TransportError> {
        let txs = self
            .0
            .get(&to.endpoint)
            .ok_or_else(|| TransportError::Failed(format!("no gateway {}", to.endpoint)))?;
        for tx in txs {
            tx.send(InboundBatch {
                packets: batch.clone(),
                peer: "the test's wire".into(),
                peer_leaf: None,
            })
            .await
            .map_err(|_| TransportError::Failed("the peer stopped".into()))?;
        }
        Ok(())
    }
}

/// Waits until `flows` holds an acknowledgement of every one of `keys`.
async fn acknowledged(flows: &Flows, keys: &[Vec<u8>]) {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let waiting = flows.changed.notified();
            let acks = flows.acknowledged.lock().unwrap().clone();
            if keys.iter().all(|k| acks.contains(k)) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), waiting).await;
        }
    })
    .await
    .expect("acknowledged within 30 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn link_managers_that_share_the_pairs_carry_each_once_and_hand_pairs_over() {
    use braid_p2p::{LinkManager, Share};
    use std::collections::BTreeSet;
    let dir = braid_testkit::TempDir::new("braid-p2p-share");
    let alice: X500Name = "O=Alice, L=London, C=GB".parse().unwrap();
    let bobs: Vec<X500Name> = (0..8)
        .map(|i| format!("O=Bob {i}, L=Paris, C=FR").parse().unwrap())
        .collect();
    let mut keys = StaticMembership::new();
    let mut endpoints = HashMap::new();
    let node = |i: usize, names: Vec<&X500Name>| {
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join(format!("node{i}.redb"))).unwrap());
        Arc::new(Flows {
            store,
            vnodes_here: names
                .iter()
                .map(|n| (n.as_str().to_string(), HoldingId::derive(n, GROUP)))
                .collect(),
            vnodes: watch::channel(0).0,
            arrived: Mutex::new(Vec::new()),
            acknowledged: Mutex::new(Vec::new()),
            changed: Notify::new(),
        })
    };
    let (a, b) = (node(0, vec![&alice]), node(1, bobs.iter().collect()));
    for (flows, gateway) in [(&a, "gateway-a"), (&b, "gateway-b")] {
        for (name, holding) in &flows.vnodes_here {
            let kp = KeyStore::new(flows.store.clone())
                .ensure(*holding)
                .await
                .unwrap();
            keys.insert(Identity::from(name.as_str()), kp.public());
            endpoints.insert(name.clone(), gateway.to_string());
        }
    }
    let members: Arc<dyn Peers> = Arc::new(Members { keys, endpoints });
    // Alice's node runs two link managers over two partitions of pairs;
    // Bob's one, carrying everything.
    let (in_tx, in_rx): (Vec<_>, Vec<_>) = (0..3).map(|_| mpsc::channel(16)).unzip();
    let wire = Arc::new(Fanout(HashMap::from([
        (
            "gateway-a".to_string(),
            vec![in_tx[0].clone(), in_tx[1].clone()],
        ),
        ("gateway-b".to_string(), vec![in_tx[2].clone()]),
    ])));
    let held = |p: &[u16]| Share::Partitions {
        partitions: 2,
        held: p.iter().copied().collect::<BTreeSet<u16>>(),
    };
    let shares = [watch::channel(held(&[0])), watch::channel(held(&[1]))];
    let mut ports = Vec::new();
    let mut counters = Vec::new();
    let mut managers = Vec::new();
    // The first link manager takes the lower boot number: when it takes
    // the other's pairs over, its links must still start above the
    // other's epochs.
    for (i, inbound) in in_rx.into_iter().enumerate() {
        let (flows, share) = match i {
            0 | 1 => (a.clone(), shares[i].1.clone()),
            _ => (b.clone(), Share::everything()),
        };
        let peers = watch::channel(members.clone()).1;
        let (port, outbound) = braid_p2p::remote_port(peers.clone());
        let c = Arc::new(Counters::default());
        let deps = Deps {
            worker: flows.clone(),
            keys: KeyStore::new(flows.store.clone()),
            peers,
            transport: wire.clone(),
            inbound,
            outbound,
            counters: c.clone(),
            share,
        };
        managers.push(
            LinkManager::spawn(deps, LinkArgs::default().config())
                .await
                .unwrap(),
        );
        ports.push(port);
        counters.push(c);
    }
    let message = |to: &X500Name, n: u64| SessionMessage {
        session: SessionId {
            initiator_flow: FlowId::random(),
            index: 1,
        },
        from: endpoint(&alice, Side::Initiator),
        to: endpoint(to, Side::Responder),
        seq: n,
        init: Some(SessionInit {
            protocol: "ping".into(),
            versions: vec![1],
        }),
        body: Body::Data(format!("hello {n}").into_bytes()),
    };
    let holding = HoldingId::derive(&alice, GROUP);
    let on_first: usize = bobs
        .iter()
        .filter(|b| held(&[0]).carries(&holding, b.as_str()))
        .count();
    assert!(
        on_first > 0 && on_first < bobs.len(),
        "the test's pairs fall on both partitions"
    );
    let acked = |i: usize| {
        counters[i]
            .messages_acked
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    // Every message reaches both of Alice's link managers (as the outbox
    // sweep brings them); each pair is carried by one.
    let first: Vec<SessionMessage> = bobs.iter().map(|b| message(b, 1)).collect();
    ports[0].send(first.clone());
    ports[1].send(first.clone());
    let keys: Vec<Vec<u8>> = first.iter().map(SessionMessage::key).collect();
    acknowledged(&a, &keys).await;
    assert_eq!(
        (acked(0), acked(1)),
        (on_first as u64, (bobs.len() - on_first) as u64)
    );
    let mut arrived = b.arrived.lock().unwrap().clone();
    arrived.sort_by_key(|m| m.to.name.as_str().to_string());
    let mut sent = first.clone();
    sent.sort_by_key(|m| m.to.name.as_str().to_string());
    assert_eq!(arrived, sent, "each delivered once");

    // The first takes every pair over, the second gives its up.
    shares[1].0.send(held(&[])).unwrap();
    shares[0].0.send(held(&[0, 1])).unwrap();
    let second: Vec<SessionMessage> = bobs.iter().map(|b| message(b, 2)).collect();
    ports[1].send(second.clone());
    ports[0].send(second.clone());
    let keys: Vec<Vec<u8>> = second.iter().map(SessionMessage::key).collect();
    acknowledged(&a, &keys).await;
    assert_eq!(
        (acked(0), acked(1)),
        (
            (on_first + bobs.len()) as u64,
            (bobs.len() - on_first) as u64
        ),
        "the first carried every pair, the second none"
    );
    assert_eq!(b.arrived.lock().unwrap().len(), 2 * bobs.len());
    // The links it took over started above the epochs of those it took
    // them from, so Bob's side refused no handshake as stale.
    assert_eq!(
        counters[2]
            .packets_rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "packets Bob's link manager rejected"
    );
    drop(managers);
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_that_take_boot_numbers_and_session_keys_at_once_agree() {
    let dir = braid_testkit::TempDir::new("braid-p2p-boot");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
    // Boot numbers: each taker gets its own.
    let takers: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { braid_p2p::next_boot(&*store).await.unwrap() })
        })
        .collect();
    let mut boots = Vec::new();
    for t in takers {
        boots.push(t.await.unwrap());
    }
    boots.sort();
    assert_eq!(boots, (1..=16).collect::<Vec<u32>>(), "one number each");
    // Session keys: every key store (each its own cache, as in separate
    // processes) ends up with the same key for a vnode.
    let holding = HoldingId::derive(&"O=Alice, L=London, C=GB".parse().unwrap(), GROUP);
    let makers: Vec<_> = (0..8)
        .map(|_| {
            let keys = KeyStore::new(store.clone());
            tokio::spawn(async move { keys.ensure(holding).await.unwrap().public() })
        })
        .collect();
    let mut public = Vec::new();
    for m in makers {
        public.push(m.await.unwrap());
    }
    assert!(
        public.windows(2).all(|w| w[0] == w[1]),
        "one key for the vnode"
    );
    assert_eq!(
        KeyStore::new(store).ensure(holding).await.unwrap().public(),
        public[0]
    );
}
