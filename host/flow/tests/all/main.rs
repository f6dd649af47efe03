//! The flow worker on its own: a real store, real wasm (the `proposal`
//! example package), and the link manager stood in for by the test, so
//! that messages from another node can arrive in whatever order a test
//! needs.

use braid_bus::InProcessBus;
use braid_flow::{FlowWorker, Remote, WorkerConfig, WorkerError};
use braid_runtime::{Limits, Runtime, RuntimeConfig};
use braid_storage::embedded::EmbeddedStore;
use braid_storage::{FlowRecord, Store};
use braid_testkit::TempDir;
use braid_types::{
    Body, Endpoint, FlowId, FlowStatus, HoldingId, SessionId, SessionInit, SessionMessage, Side,
    X500Name,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

mod cluster;

const GROUP: &str = "test";

fn package() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| braid_testkit::example_package("proposal"))
}

/// The link manager as a test sees it: one member beyond this node, and
/// every message sent to it kept.
struct FakeRemote {
    member: X500Name,
    sent: Mutex<Vec<SessionMessage>>,
}

impl Remote for FakeRemote {
    fn is_member(&self, name: &X500Name) -> bool {
        *name == self.member
    }
    fn send(&self, messages: Vec<SessionMessage>) {
        self.sent.lock().unwrap().extend(messages);
    }
}

struct Harness {
    worker: FlowWorker,
    store: Arc<EmbeddedStore>,
    remote: Arc<FakeRemote>,
    _dir: TempDir,
}

async fn harness(early_ttl: Duration) -> Harness {
    let dir = TempDir::new("braid-flow-test");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("braid.redb")).unwrap());
    let runtime = Arc::new(
        Runtime::new(RuntimeConfig {
            limits: Limits::default(),
            max_instances: 64,
            cache_dir: dir.path().join("compiled"),
        })
        .unwrap(),
    );
    let (bus, rx) = InProcessBus::new();
    let remote = Arc::new(FakeRemote {
        member: "O=Remote, L=Oslo, C=NO".parse().unwrap(),
        sent: Mutex::new(Vec::new()),
    });
    let worker = FlowWorker::start_with_remote(
        store.clone(),
        Arc::new(bus),
        rx,
        runtime,
        WorkerConfig {
            max_live_flows: 16,
            group: GROUP.into(),
            retention: Duration::from_secs(3600),
            status_events: 1024,
            early_message_ttl: early_ttl,
        },
        Some(remote.clone() as Arc<dyn Remote>),
    )
    .await
    .unwrap();
    let (pkg, _) = worker.upload_package(package().to_vec()).await.unwrap();
    for name in ["O=Alice, L=London, C=GB", "O=Bob, L=Paris, C=FR"] {
        worker
            .create_vnode(name.parse().unwrap(), pkg.checksum)
            .await
            .unwrap();
    }
    Harness {
        worker,
        store,
        remote,
        _dir: dir,
    }
}

async fn until_ended(w: &FlowWorker, id: &FlowId) -> FlowRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = w.flow(id).await.unwrap()
            && r.status.is_terminal()
        {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "flow {id} did not end within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bob's side of a tally session opened by the remote member: the init
/// (the count) and `items` numbers.
fn remote_session(items: u32) -> Vec<SessionMessage> {
    let remote: X500Name = "O=Remote, L=Oslo, C=NO".parse().unwrap();
    let bob: X500Name = "O=Bob, L=Paris, C=FR".parse().unwrap();
    let session = SessionId {
        initiator_flow: FlowId::random(),
        index: 1,
    };
    let from = Endpoint {
        holding: HoldingId::derive(&remote, GROUP),
        name: remote,
        side: Side::Initiator,
    };
    let to = Endpoint {
        holding: HoldingId::derive(&bob, GROUP),
        name: bob,
        side: Side::Responder,
    };
    let msg = |seq: u64, body: Vec<u8>| SessionMessage {
        session,
        from: from.clone(),
        to: to.clone(),
        seq,
        init: (seq == 1).then(|| SessionInit {
            protocol: "proposal-tally".into(),
            versions: vec![1],
        }),
        body: Body::Data(body),
    };
    let mut out = vec![msg(1, postcard::to_stdvec(&items).unwrap())];
    for i in 0..items {
        out.push(msg(u64::from(i) + 2, postcard::to_stdvec(&i).unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_from_another_node_that_overtake_their_init_wait_for_it() {
    let h = harness(Duration::from_secs(3600)).await;
    let mut msgs = remote_session(15);
    msgs.reverse();
    // One at a time, as separate deliveries (separate packets), last first:
    // each is durable (so the link manager may acknowledge it) before the
    // init arrives.
    for m in &msgs {
        h.worker
            .deliver_inbound(std::slice::from_ref(m))
            .await
            .unwrap();
    }
    let responder = msgs[0].destination_flow();
    let r = until_ended(&h.worker, &responder).await;
    assert_eq!(r.status, FlowStatus::Completed, "{:?}", r.error);
    let sent = h.remote.sent.lock().unwrap().clone();
    let reply = sent
        .iter()
        .find_map(|m| match &m.body {
            Body::Data(d) if m.seq == 1 => Some(postcard::from_bytes::<Vec<u32>>(d).unwrap()),
            _ => None,
        })
        .expect("the responder answered");
    assert_eq!(reply, (0..15).collect::<Vec<u32>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn early_messages_whose_init_never_comes_are_bounded_and_expire() {
    let h = harness(Duration::ZERO).await;
    // Messages without their init, for many sessions: kept up to the bound
    // (durable, so they may be acknowledged), refused beyond it (not
    // acknowledged: the sender retries later).
    let sessions: Vec<Vec<SessionMessage>> = (0..10_001).map(|_| remote_session(1)).collect();
    let early: Vec<SessionMessage> = sessions.iter().map(|s| s[1].clone()).collect();
    h.worker.deliver_inbound(&early[..10_000]).await.unwrap();
    assert_eq!(h.store.stats().await.unwrap().inbox, 10_000);
    let e = h
        .worker
        .deliver_inbound(&early[10_000..])
        .await
        .expect_err("the 10,001st waiting session is refused");
    assert!(matches!(e, WorkerError::Busy(_)), "{e}");
    assert_eq!(
        h.store.stats().await.unwrap().inbox,
        10_000,
        "nothing half-stored"
    );
    // Past the TTL (zero here) they are deleted, and an init that comes
    // after that starts nothing.
    assert_eq!(h.worker.sweep_early().await.unwrap(), 10_000);
    assert_eq!(h.store.stats().await.unwrap().inbox, 0);
    h.worker
        .deliver_inbound(std::slice::from_ref(&sessions[0][0]))
        .await
        .unwrap();
    assert!(
        h.worker
            .flow(&sessions[0][0].destination_flow())
            .await
            .unwrap()
            .is_none(),
        "an init after its messages expired starts no flow"
    );
    // Room again: a new session's early message is kept.
    h.worker
        .deliver_inbound(std::slice::from_ref(&early[10_000]))
        .await
        .unwrap();
    assert_eq!(h.store.stats().await.unwrap().inbox, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_partition_was_claimed_by_another_advances_no_flow() {
    let h = harness(Duration::from_secs(3600)).await;
    let alice: X500Name = "O=Alice, L=London, C=GB".parse().unwrap();
    let started = h
        .worker
        .start_flow(
            HoldingId::derive(&alice, GROUP),
            "fenced-1".parse().unwrap(),
            "tally".into(),
            r#"{"counterparty": "O=Remote, L=Oslo, C=NO", "items": 3}"#.into(),
        )
        .await
        .unwrap();
    // The flow sends to the remote member and suspends in `receive`.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(m) = h.remote.sent.lock().unwrap().first().cloned() {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let before = loop {
        let r = h.store.flow(&started.id).await.unwrap().unwrap();
        if r.journal_len > 0 {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Another worker takes the partition over.
    let epoch = h.store.claim_partition(0, "another worker").await.unwrap();
    assert!(epoch >= 2, "the harness's worker claimed it first");
    // The reply arrives: the flow could now finish, but must not.
    let reply = SessionMessage {
        session: first.session,
        from: first.to.clone(),
        to: first.from.clone(),
        seq: 1,
        init: None,
        body: Body::Data(postcard::to_stdvec(&vec![0u32, 1, 2]).unwrap()),
    };
    h.worker
        .deliver_inbound(std::slice::from_ref(&reply))
        .await
        .unwrap();
    while !h.worker.stopped() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fenced worker did not stop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = h.store.flow(&started.id).await.unwrap().unwrap();
    assert_eq!(
        after.status,
        FlowStatus::Running,
        "the flow did not end here"
    );
    assert_eq!(after.journal_len, before.journal_len, "nor take a step");
    assert_eq!(
        h.store.inbox(&started.id).await.unwrap(),
        vec![reply],
        "the reply waits for the new owner"
    );
}
