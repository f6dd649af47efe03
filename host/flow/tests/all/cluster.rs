//! The flow worker in cluster mode on the in-process topic bus: flows
//! spread over the partitions of two workers, a client worker (the REST
//! worker's part) that owns none, takeover when a worker leaves, and a
//! session's messages arriving on the event topic in reverse order.

use braid_bus::memory::MemoryBus;
use braid_bus::topics::MessageBus;
use braid_flow::cluster::{ClusterConfig, ClusterRole, FlowTopics, Input};
use braid_flow::{FlowWorker, WorkerConfig};
use braid_runtime::{Limits, Runtime, RuntimeConfig};
use braid_storage::Store;
use braid_storage::embedded::EmbeddedStore;
use braid_testkit::TempDir;
use braid_types::{Body, FlowId, FlowStatus, HoldingId, SessionMessage, X500Name};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::{GROUP, package, remote_session};

const PARTITIONS: u16 = 8;
/// How often the workers look for work the event topic did not bring.
const SWEEP: Duration = Duration::from_millis(200);
const ALICE: &str = "O=Alice, L=London, C=GB";
const BOB: &str = "O=Bob, L=Paris, C=FR";
const CAROL: &str = "O=Carol, L=Rome, C=IT";

struct Cluster {
    store: Arc<EmbeddedStore>,
    bus: Arc<MemoryBus>,
    topics: FlowTopics,
    dir: TempDir,
    client: FlowWorker,
}

impl Cluster {
    async fn new() -> Cluster {
        let dir = TempDir::new("braid-flow-cluster");
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("braid.redb")).unwrap());
        let topics = FlowTopics::with_prefix("test.", PARTITIONS);
        let bus = Arc::new(MemoryBus::new(topics.specs()));
        let c = Cluster {
            client: FlowWorker::start_cluster(
                store.clone(),
                runtime(&dir, "client"),
                config(),
                ClusterConfig {
                    bus: bus.clone(),
                    topics: topics.clone(),
                    role: ClusterRole::Client,
                    owner: "client".into(),
                    liveness: Duration::from_secs(3),
                    remote: None,
                    sweep: SWEEP,
                },
            )
            .await
            .unwrap(),
            store,
            bus,
            topics,
            dir,
        };
        let (pkg, _) = c.client.upload_package(package().to_vec()).await.unwrap();
        for name in [ALICE, BOB, CAROL] {
            c.client
                .create_vnode(name.parse().unwrap(), pkg.checksum)
                .await
                .unwrap();
        }
        c
    }

    async fn worker(&self, name: &str) -> FlowWorker {
        FlowWorker::start_cluster(
            self.store.clone(),
            runtime(&self.dir, name),
            config(),
            ClusterConfig {
                bus: self.bus.clone(),
                topics: self.topics.clone(),
                role: ClusterRole::Flows,
                owner: name.into(),
                liveness: Duration::from_secs(3),
                remote: None,
                sweep: SWEEP,
            },
        )
        .await
        .unwrap()
    }

    /// A cluster with two flow workers that both own partitions.
    async fn with_two_workers() -> (Cluster, FlowWorker, FlowWorker) {
        let c = Cluster::new().await;
        let w1 = c.worker("w1").await;
        let w2 = c.worker("w2").await;
        until("both workers own partitions", async || {
            !w1.owned_partitions().is_empty() && !w2.owned_partitions().is_empty()
        })
        .await;
        (c, w1, w2)
    }

    async fn propose(&self, prefix: &str, n: usize) -> Vec<FlowId> {
        let mut ids = Vec::new();
        for i in 0..n {
            let r = self
                .client
                .start_flow(
                    holding(ALICE),
                    format!("{prefix}-{i}").parse().unwrap(),
                    "propose".into(),
                    serde_json::json!({"counterparties": [BOB, CAROL], "proposal": format!("lunch {i}")})
                        .to_string(),
                )
                .await
                .unwrap();
            ids.push(r.id);
        }
        ids
    }
}

fn holding(name: &str) -> HoldingId {
    HoldingId::derive(&name.parse::<X500Name>().unwrap(), GROUP)
}

fn runtime(dir: &TempDir, name: &str) -> Arc<Runtime> {
    Arc::new(
        Runtime::new(RuntimeConfig {
            limits: Limits::default(),
            max_instances: 128,
            cache_dir: dir.path().join(format!("compiled-{name}")),
        })
        .unwrap(),
    )
}

fn config() -> WorkerConfig {
    WorkerConfig {
        max_live_flows: 64,
        group: GROUP.into(),
        retention: Duration::from_secs(3600),
        status_events: 100_000,
        early_message_ttl: Duration::from_secs(3600),
    }
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The proposal ended COMPLETED, accepted by both counterparties.
async fn assert_accepted(c: &Cluster, id: &FlowId) {
    let r = c.store.flow(id).await.unwrap().unwrap();
    assert_eq!(r.status, FlowStatus::Completed, "{id}: {:?}", r.error);
    let v: serde_json::Value = serde_json::from_str(r.result.as_deref().unwrap()).unwrap();
    assert_eq!(v["accepted"], true, "{v}");
}

/// The tally responder's answer (the items it counted) in the inbox of
/// the initiator flow `initiator`, once there.
async fn answer(c: &Cluster, initiator: &FlowId) -> Option<Vec<u32>> {
    c.store
        .inbox(initiator)
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match &m.body {
            Body::Data(d) if m.seq == 1 => Some(postcard::from_bytes::<Vec<u32>>(d).unwrap()),
            _ => None,
        })
}

/// Every proposal ended COMPLETED, accepted by both counterparties; each
/// counterparty ran exactly one vote and one receipt per proposal.
async fn assert_all_accepted(c: &Cluster, ids: &[FlowId]) {
    for id in ids {
        assert_accepted(c, id).await;
    }
    for who in [BOB, CAROL] {
        let page = c
            .store
            .list_flows(&holding(who), None, None, 100_000, 100_000)
            .await
            .unwrap();
        // A vote and a receipt per proposal.
        for name in ["vote", "sign_receipt"] {
            let n = page.flows.iter().filter(|f| f.flow_name == name).count();
            assert_eq!(n, ids.len(), "{who}: one {name} per proposal");
        }
        assert_eq!(page.flows.len(), 2 * ids.len(), "{who}: nothing else");
        assert!(page.flows.iter().all(|f| f.status == FlowStatus::Completed));
    }
}

async fn all_ended(c: &Cluster, ids: &[FlowId]) -> bool {
    for id in ids {
        if !c
            .store
            .flow(id)
            .await
            .unwrap()
            .is_some_and(|r| r.status.is_terminal())
        {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_the_partitions_and_the_client_streams_every_change() {
    let (c, w1, w2) = Cluster::with_two_workers().await;
    let a: BTreeSet<u16> = w1.owned_partitions().into_iter().collect();
    let b: BTreeSet<u16> = w2.owned_partitions().into_iter().collect();
    assert!(a.is_disjoint(&b), "{a:?} {b:?}");
    assert_eq!(a.union(&b).count(), PARTITIONS as usize);
    let ids = c.propose("p", 40).await;
    until("every proposal ended", async || all_ended(&c, &ids).await).await;
    assert_all_accepted(&c, &ids).await;
    // Both workers ran flows (the flows' ids spread over the partitions).
    let (_, unfinished) = c.client.counts();
    assert_eq!(unfinished, 0, "the client runs nothing");
    // The client's event log is fed from the status topic: it saw every
    // proposal complete, though it ran none of them.
    until("the client saw every completion", async || {
        let done: BTreeSet<FlowId> = c
            .client
            .events()
            .read(0, usize::MAX, |s| s.status == FlowStatus::Completed)
            .events
            .iter()
            .map(|e| e.change.flow)
            .collect();
        ids.iter().all(|id| done.contains(id))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_leaves_hands_its_partitions_over_and_every_flow_completes_once() {
    let (c, w1, w2) = Cluster::with_two_workers().await;
    let ids = c.propose("t", 120).await;
    // Some have ended, the rest are in flight when w2 goes.
    until("some proposals ended", async || {
        let mut n = 0;
        for id in &ids {
            if c.store
                .flow(id)
                .await
                .unwrap()
                .unwrap()
                .status
                .is_terminal()
            {
                n += 1;
            }
        }
        n >= 5
    })
    .await;
    w2.stop();
    until("w1 owns every partition", async || {
        w1.owned_partitions().len() == PARTITIONS as usize
    })
    .await;
    until("every proposal ended", async || all_ended(&c, &ids).await).await;
    assert_all_accepted(&c, &ids).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_messages_on_the_event_topic_in_reverse_order_wait_for_their_init() {
    let c = Cluster::new().await;
    let _w1 = c.worker("w1").await;
    let _w2 = c.worker("w2").await;
    // A session of Alice's (this cluster's vnode) to Bob: the init and 15
    // items, published last first, each on its own.
    let mut msgs = remote_session(15);
    let alice: X500Name = ALICE.parse().unwrap();
    for m in &mut msgs {
        m.from.holding = holding(ALICE);
        m.from.name = alice.clone();
    }
    let initiator = msgs[0].session.initiator_flow;
    msgs.reverse();
    for m in &msgs {
        c.bus
            .publish(
                &c.topics.event,
                vec![Input::Message(Box::new(m.clone())).record()],
            )
            .await
            .unwrap();
    }
    let responder = msgs[0].destination_flow();
    until("the responder ended", async || {
        c.store
            .flow(&responder)
            .await
            .unwrap()
            .is_some_and(|r| r.status.is_terminal())
    })
    .await;
    let r = c.store.flow(&responder).await.unwrap().unwrap();
    assert_eq!(r.status, FlowStatus::Completed, "{:?}", r.error);
    // Its answer, every item in order, waits in the inbox of Alice's
    // (never started) initiator flow.
    let mut reply = None;
    until("the answer arrived", async || {
        reply = answer(&c, &initiator).await;
        reply.is_some()
    })
    .await;
    assert_eq!(reply.unwrap(), (0..15).collect::<Vec<u32>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn work_that_is_only_in_the_store_is_found_and_done_by_the_sweep() {
    let c = Cluster::new().await;
    let w1 = c.worker("w1").await;
    // Taken over (store read) before the work below is written.
    until("the worker owns every partition", async || {
        w1.owned_partitions().len() == usize::from(PARTITIONS)
    })
    .await;
    // A session of Alice's to Bob committed to the outbox, and a start
    // written to the store, as by a process that died before publishing
    // either on the event topic: nothing on the bus says they exist.
    let mut msgs = remote_session(4);
    let alice: X500Name = ALICE.parse().unwrap();
    for m in &mut msgs {
        m.from.holding = holding(ALICE);
        m.from.name = alice.clone();
    }
    let initiator = msgs[0].session.initiator_flow;
    let responder = msgs[0].destination_flow();
    let package = c.client.vnode(&holding(ALICE)).unwrap().package;
    let start = braid_storage::FlowRecord::new(
        FlowId::random(),
        holding(ALICE),
        "propose".into(),
        package,
        braid_types::FlowStart::Client {
            client_request_id: "lost-start".parse().unwrap(),
            request_body: serde_json::json!({"counterparties": [BOB, CAROL], "proposal": "tea"})
                .to_string(),
        },
        braid_types::now_millis() - 60_000,
        7,
    );
    // And a kill of a flow just written, as by a REST worker that died
    // before publishing either (too new for the sweep to start it: the
    // kill's sweep finds it).
    let mut doomed = start.clone();
    doomed.id = FlowId::random();
    doomed.start = braid_types::FlowStart::Client {
        client_request_id: "lost-kill".parse().unwrap(),
        request_body: serde_json::json!({"counterparties": [BOB], "proposal": "no"}).to_string(),
    };
    doomed.created_ms = braid_types::now_millis();
    let mut ops: Vec<braid_storage::Op> = msgs
        .iter()
        .map(|m| braid_storage::Op::PutOutbox(Box::new(m.clone())))
        .collect();
    ops.push(braid_storage::Op::PutFlow(Box::new(start.clone())));
    ops.push(braid_storage::Op::PutFlow(Box::new(doomed.clone())));
    ops.push(braid_storage::Op::PutKill(doomed.id, "lost kill".into()));
    c.store.write(ops).await.unwrap();
    until("the responder and the proposals ended", async || {
        all_ended(&c, &[responder, start.id, doomed.id]).await
    })
    .await;
    let d = c.store.flow(&doomed.id).await.unwrap().unwrap();
    assert_eq!(d.status, FlowStatus::Killed, "{:?}", d.error);
    assert!(
        c.store.kills().await.unwrap().is_empty(),
        "the kill was carried out"
    );
    let r = c.store.flow(&responder).await.unwrap().unwrap();
    assert_eq!(r.status, FlowStatus::Completed, "{:?}", r.error);
    assert_accepted(&c, &start.id).await;
    for who in [BOB, CAROL] {
        let page = c
            .store
            .list_flows(&holding(who), None, None, 1000, 1000)
            .await
            .unwrap();
        let votes = page
            .flows
            .iter()
            .filter(|f| {
                f.flow_name == "vote"
                    && matches!(&f.start, braid_types::FlowStart::Responder { session, .. }
                        if session.initiator_flow == start.id)
            })
            .count();
        assert_eq!(votes, 1, "{who}: the proposal started once");
    }
    // Every message left the outbox, and the responder's answer (every
    // item, in order) waits for Alice's never-started initiator.
    until("the outbox is empty", async || {
        c.store.outbox().await.unwrap().is_empty()
    })
    .await;
    let reply = answer(&c, &initiator).await.expect("the answer");
    assert_eq!(reply, vec![0, 1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_bound_messages_from_other_nodes_that_would_wait_for_their_init_are_refused() {
    let c = Cluster::new().await;
    // As many sessions with messages waiting for an init as a node keeps,
    // as a hostile peer would leave them (the owners are other workers:
    // the store holds them).
    let early = |seq: u64| {
        let mut m = remote_session(0).remove(0);
        m.init = None;
        m.seq = seq;
        m
    };
    let left: Vec<SessionMessage> = (0..braid_flow::MAX_EARLY_FLOWS).map(|_| early(2)).collect();
    c.store
        .write(
            left.iter()
                .map(|m| braid_storage::Op::PutInbox(Box::new(m.clone())))
                .collect(),
        )
        .await
        .unwrap();
    // One more such message is refused (its sender retries)...
    let e = c.client.deliver_inbound(&[early(2)]).await.unwrap_err();
    assert!(matches!(e, braid_flow::WorkerError::Busy(_)), "{e}");
    // ...but not a session whose init comes with it, nor a message for a
    // flow that exists.
    c.client.deliver_inbound(&remote_session(2)).await.unwrap();
    let known = early(3);
    let rec = braid_storage::FlowRecord::new(
        known.destination_flow(),
        holding(BOB),
        "tally".into(),
        c.client.vnode(&holding(BOB)).unwrap().package,
        braid_types::FlowStart::Client {
            client_request_id: "known".parse().unwrap(),
            request_body: "{}".into(),
        },
        braid_types::now_millis(),
        1,
    );
    c.store
        .write(vec![braid_storage::Op::PutFlow(Box::new(rec))])
        .await
        .unwrap();
    c.client.deliver_inbound(&[known]).await.unwrap();
    // Once they are gone (expired), such messages are taken again.
    c.store
        .write(
            left.iter()
                .map(|m| braid_storage::Op::DeleteFlowInbox(m.destination_flow()))
                .collect(),
        )
        .await
        .unwrap();
    until("an early message is taken again", async || {
        c.client.deliver_inbound(&[early(2)]).await.is_ok()
    })
    .await;
}
