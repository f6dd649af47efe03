//! The conformance suite of the [`Store`] trait: what every store must do,
//! as one async function per case, each taking a fresh, empty store.
//!
//! An implementation runs the whole suite with [`conformance_tests!`]
//! (crate::conformance_tests), which makes one `#[tokio::test]` per case:
//!
//! ```ignore
//! async fn fresh() -> (Arc<dyn Store>, braid_storage::conformance::Cleanup) { ... }
//! braid_storage::conformance_tests!(fresh);
//! ```
//!
//! The cases assert exact results (rows, orders, cursors, errors and their
//! fields), so two stores that pass behave the same to the flow worker.

use crate::{
    FlowRecord, LIST_POSITION_LEN, Op, PackageRecord, Snapshot, Store, StoreError, StoreStats,
    VnodeRecord, list_position,
};
use braid_types::{
    Body, Checksum, ClientRequestId, Endpoint, FailureKind, FlowFailure, FlowId, FlowInfo,
    FlowStart, FlowStatus, HoldingId, Protocol, SessionId, SessionMessage, Side, X500Name,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// What to do once a case has passed (remove a directory, drop a
/// database). A failed case leaves its store behind for a look.
pub type Cleanup = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One `#[tokio::test]` per conformance case, each on a fresh store from
/// `$fresh`: an `async fn() -> (Arc<dyn Store>, Cleanup)`.
#[macro_export]
macro_rules! conformance_tests {
    ($fresh:path) => {
        $crate::conformance_tests!(@cases $fresh;
            every_op_round_trips,
            a_refused_batch_writes_nothing,
            load_returns_only_what_running_flows_need,
            pages_cover_every_flow_once_in_creation_order,
            pages_and_cursors_are_exact,
            finished_before_lists_ended_flows_by_end_time,
            stale_starts_are_the_old_unstarted_flows,
            early_flows_are_inboxes_without_a_flow,
            flow_by_client_finds_client_started_flows,
            delete_flow_removes_everything_and_frees_the_client_id,
            a_client_request_id_belongs_to_one_flow,
            racing_starts_with_one_client_request_id_give_one_flow,
            fences_refuse_stale_epochs,
            fenced_batches_fail_alone_in_concurrent_groups,
            a_claim_cuts_off_the_writers_of_the_old_epoch,
            concurrent_writers_all_commit,
            stats_count_rows,
            conditional_puts_lose_no_update,
            a_closed_store_answers_closed,
        );
    };
    (@cases $fresh:path; $($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let (store, cleanup) = $fresh().await;
            $crate::conformance::$case(store.clone()).await;
            store.close().await;
            drop(store);
            cleanup.await;
        }
    )*};
}

fn name(o: &str) -> X500Name {
    format!("O={o}, L=London, C=GB")
        .parse()
        .expect("a valid name")
}

fn holding(o: &str) -> HoldingId {
    HoldingId::derive(&name(o), "group")
}

fn crid(s: &str) -> ClientRequestId {
    s.parse().expect("a valid client request id")
}

/// A client-started flow of `holding`, created at `created_ms`, last
/// changed a millisecond later.
fn flow(holding: HoldingId, created_ms: u64, status: FlowStatus, client: &str) -> FlowRecord {
    let mut r = FlowRecord::new(
        FlowId::random(),
        holding,
        "ping".into(),
        Checksum::of(b"package"),
        FlowStart::Client {
            client_request_id: crid(client),
            request_body: "{\"to\":\"O=B, L=L, C=GB\"}".into(),
        },
        created_ms,
        created_ms ^ 0x5eed,
    );
    r.status = status;
    r.updated_ms = created_ms + 1;
    r
}

/// A flow a session-init started at `holding`.
fn responder(holding: HoldingId, created_ms: u64) -> FlowRecord {
    let session = SessionId {
        initiator_flow: FlowId::random(),
        index: 3,
    };
    let mut r = FlowRecord::new(
        FlowId::responder(&holding, &session),
        holding,
        "pong".into(),
        Checksum::of(b"package"),
        FlowStart::Responder {
            session,
            initiator: Endpoint {
                holding: self::holding("Initiator"),
                name: name("Initiator"),
                side: Side::Initiator,
            },
            protocol: "ping".into(),
            version: 2,
        },
        created_ms,
        7,
    );
    r.status = FlowStatus::Running;
    r
}

/// A message to the initiator end of a session of `to_flow`.
fn msg(to_flow: FlowId, seq: u64) -> SessionMessage {
    let h = holding("A");
    SessionMessage {
        session: SessionId {
            initiator_flow: to_flow,
            index: 1,
        },
        from: Endpoint {
            holding: holding("B"),
            name: name("B"),
            side: Side::Responder,
        },
        to: Endpoint {
            holding: h,
            name: name("A"),
            side: Side::Initiator,
        },
        seq,
        init: None,
        body: Body::Data(vec![seq as u8; 3]),
    }
}

fn put(r: &FlowRecord) -> Op {
    Op::PutFlow(Box::new(r.clone()))
}

fn ids(flows: &[FlowRecord]) -> Vec<FlowId> {
    flows.iter().map(|f| f.id).collect()
}

async fn ok(s: &Arc<dyn Store>, ops: Vec<Op>) {
    s.write(ops).await.expect("the batch commits");
}

/// Every page of `holding`'s flows: the ids, and the number of pages.
async fn all_pages(
    s: &Arc<dyn Store>,
    holding: &HoldingId,
    status: Option<FlowStatus>,
    limit: usize,
    scan: usize,
) -> (Vec<FlowId>, usize) {
    let (mut ids, mut pages, mut after) = (Vec::new(), 0, None::<Vec<u8>>);
    loop {
        let p = s
            .list_flows(holding, status, after.as_deref(), limit, scan)
            .await
            .expect("list_flows");
        assert!(p.flows.len() <= limit);
        pages += 1;
        assert!(pages < 10_000, "the pages never end");
        ids.extend(p.flows.iter().map(|f| f.id));
        match p.next {
            Some(n) => {
                assert_eq!(n.len(), LIST_POSITION_LEN);
                after = Some(n);
            }
            None => return (ids, pages),
        }
    }
}

fn sorted_by_key(mut m: Vec<SessionMessage>) -> Vec<SessionMessage> {
    m.sort_by_key(|m| m.key());
    m
}

/// Every kind of [`Op`] writes what it says, and reads give it back
/// exactly; a second batch replaces and deletes.
pub async fn every_op_round_trips(s: Arc<dyn Store>) {
    let h = holding("A");
    let bytes = b"\0asm package bytes".to_vec();
    let pkg = PackageRecord {
        checksum: Checksum::of(&bytes),
        flows: vec![FlowInfo {
            name: "ping".into(),
            startable: true,
            initiates: Some(Protocol {
                name: "ping".into(),
                versions: vec![1, 2],
            }),
            responds_to: None,
        }],
        size: bytes.len() as u64,
        uploaded_ms: 1_700_000_000_123,
    };
    let vnode = VnodeRecord {
        holding: h,
        name: name("A"),
        package: pkg.checksum,
        created_ms: 1_700_000_000_000,
        flow_starts_enabled: true,
    };
    let mut done = flow(h, 1_700_000_000_500, FlowStatus::Completed, "r1");
    done.result = Some("{\"pong\":1}".into());
    done.journal_len = 3;
    done.seed = u64::MAX;
    let mut failed = flow(h, 1_700_000_000_501, FlowStatus::Failed, "r2");
    failed.error = Some(FlowFailure {
        kind: FailureKind::CpuLimit,
        message: "ran out of fuel".into(),
    });
    let mut waiting = responder(h, 1_700_000_000_502);
    waiting.wake_at_ms = Some(u64::MAX);
    let mut sleeping = flow(h, 1_700_000_000_503, FlowStatus::Running, "r3");
    sleeping.wake_at_ms = Some(1_700_000_009_000);
    let (o1, o2) = (msg(FlowId::random(), 1), msg(FlowId::random(), 2));
    let (i1, i2, i3) = (msg(done.id, 1), msg(waiting.id, 1), msg(waiting.id, 2));
    s.write(Vec::new()).await.expect("an empty batch is fine");
    ok(
        &s,
        vec![
            Op::PutPackage(pkg.clone(), bytes.clone()),
            Op::PutVnode(vnode.clone()),
            put(&done),
            put(&failed),
            put(&waiting),
            put(&sleeping),
            Op::AppendJournal {
                flow: done.id,
                start: 0,
                entries: vec![vec![1, 2], vec![]],
            },
            Op::AppendJournal {
                flow: done.id,
                start: 2,
                entries: vec![vec![0xff; 300]],
            },
            Op::PutOutbox(Box::new(o1.clone())),
            Op::PutOutbox(Box::new(o2.clone())),
            Op::PutInbox(Box::new(i1.clone())),
            Op::PutInbox(Box::new(i2.clone())),
            Op::PutInbox(Box::new(i3.clone())),
            Op::PutMeta("settings/a".into(), b"one".to_vec()),
            Op::PutMeta("settings/empty".into(), Vec::new()),
            Op::PutKill(waiting.id, "operator said so".into()),
            Op::Fence {
                partition: 3,
                epoch: 0,
            },
        ],
    )
    .await;
    for f in [&done, &failed, &waiting, &sleeping] {
        assert_eq!(s.flow(&f.id).await.unwrap().as_ref(), Some(f));
    }
    assert_eq!(s.flow(&FlowId::random()).await.unwrap(), None);
    assert_eq!(
        s.journal(&done.id).await.unwrap(),
        vec![vec![1, 2], vec![], vec![0xff; 300]]
    );
    assert!(s.journal(&waiting.id).await.unwrap().is_empty());
    assert_eq!(s.inbox(&done.id).await.unwrap(), vec![i1.clone()]);
    assert_eq!(
        s.inbox(&waiting.id).await.unwrap(),
        sorted_by_key(vec![i2.clone(), i3.clone()])
    );
    assert_eq!(
        s.meta("settings/a").await.unwrap().as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(
        s.meta("settings/empty").await.unwrap().as_deref(),
        Some(&[][..])
    );
    assert_eq!(s.meta("settings/none").await.unwrap(), None);
    assert_eq!(
        s.package_bytes(&pkg.checksum).await.unwrap(),
        Some(bytes.clone())
    );
    assert_eq!(s.package_bytes(&Checksum::of(b"x")).await.unwrap(), None);
    let snap = s.load().await.unwrap();
    assert_eq!(snap.vnodes, vec![vnode.clone()]);
    assert_eq!(snap.packages, vec![pkg.clone()]);
    assert_eq!(
        s.catalog().await.unwrap(),
        (vec![vnode.clone()], vec![pkg.clone()]),
        "the catalog is the snapshot's"
    );
    let mut unfinished = vec![waiting.clone(), sleeping.clone()];
    unfinished.sort_by_key(|f| f.id);
    assert_eq!(snap.flows, unfinished);
    assert_eq!(snap.outbox, sorted_by_key(vec![o1.clone(), o2.clone()]));
    let mut inbox_flows = vec![done.id, waiting.id];
    inbox_flows.sort();
    assert_eq!(snap.inbox_flows, inbox_flows);
    assert_eq!(snap.kills, vec![(waiting.id, "operator said so".into())]);

    // Replace, delete.
    let mut vnode2 = vnode.clone();
    vnode2.flow_starts_enabled = false;
    vnode2.package = Checksum::of(b"another");
    let mut sleeping2 = sleeping.clone();
    sleeping2.status = FlowStatus::Completed;
    sleeping2.wake_at_ms = None;
    sleeping2.result = Some("null".into());
    sleeping2.updated_ms += 10;
    ok(
        &s,
        vec![
            Op::PutMeta("settings/a".into(), b"two".to_vec()),
            Op::DeleteOutbox(o1.key()),
            Op::DeleteInbox(i1.key()),
            Op::DeleteFlowInbox(waiting.id),
            Op::DeleteKill(waiting.id),
            Op::DeletePackage(pkg.checksum),
            Op::PutVnode(vnode2.clone()),
            put(&sleeping2),
            // Deleting what is not there is fine.
            Op::DeleteOutbox(vec![1, 2, 3]),
            Op::DeleteKill(FlowId::random()),
        ],
    )
    .await;
    assert_eq!(
        s.meta("settings/a").await.unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert!(s.inbox(&done.id).await.unwrap().is_empty());
    assert!(s.inbox(&waiting.id).await.unwrap().is_empty());
    assert_eq!(s.package_bytes(&pkg.checksum).await.unwrap(), None);
    assert_eq!(s.flow(&sleeping.id).await.unwrap(), Some(sleeping2));
    let snap = s.load().await.unwrap();
    assert_eq!(snap.vnodes, vec![vnode2.clone()]);
    assert!(snap.packages.is_empty());
    assert_eq!(s.catalog().await.unwrap(), (vec![vnode2], Vec::new()));
    assert_eq!(snap.flows, vec![waiting]);
    assert_eq!(snap.outbox, vec![o2]);
    assert!(snap.inbox_flows.is_empty());
    assert!(snap.kills.is_empty());
}

/// A batch refused for a stale fence or a duplicate client request id
/// writes none of its ops.
pub async fn a_refused_batch_writes_nothing(s: Arc<dyn Store>) {
    let h = holding("A");
    let first = flow(h, 100, FlowStatus::Running, "taken");
    ok(&s, vec![put(&first)]).await;
    assert_eq!(s.claim_partition(0, "worker-1").await.unwrap(), 1);
    let victim = flow(h, 200, FlowStatus::Running, "free");
    let batch = |fence_epoch: u64, f: &FlowRecord| {
        vec![
            Op::PutMeta("m".into(), vec![1]),
            put(f),
            Op::AppendJournal {
                flow: f.id,
                start: 0,
                entries: vec![vec![9]],
            },
            Op::PutInbox(Box::new(msg(f.id, 1))),
            Op::PutOutbox(Box::new(msg(FlowId::random(), 1))),
            Op::PutKill(f.id, "k".into()),
            Op::DeleteFlow(Box::new(first.clone())),
            Op::Fence {
                partition: 0,
                epoch: fence_epoch,
            },
        ]
    };
    match s.write(batch(0, &victim)).await {
        Err(StoreError::Fenced {
            partition: 0,
            epoch: 0,
            current: 1,
        }) => {}
        other => panic!("expected Fenced(0, 0, 1), got {other:?}"),
    }
    let dup = flow(h, 300, FlowStatus::Running, "taken");
    let mut ops = batch(1, &dup);
    ops.retain(|op| !matches!(op, Op::DeleteFlow(_)));
    match s.write(ops).await {
        Err(StoreError::Duplicate {
            holding,
            client_request_id,
            existing,
            flow,
        }) => {
            assert_eq!(holding, h);
            assert_eq!(client_request_id, crid("taken"));
            assert_eq!((existing, flow), (first.id, dup.id));
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    assert_eq!(s.meta("m").await.unwrap(), None);
    for f in [&victim, &dup] {
        assert_eq!(s.flow(&f.id).await.unwrap(), None);
        assert!(s.journal(&f.id).await.unwrap().is_empty());
        assert!(s.inbox(&f.id).await.unwrap().is_empty());
    }
    assert_eq!(s.flow(&first.id).await.unwrap(), Some(first.clone()));
    let snap = s.load().await.unwrap();
    assert_eq!(ids(&snap.flows), vec![first.id]);
    assert!(snap.outbox.is_empty() && snap.kills.is_empty() && snap.inbox_flows.is_empty());
    // The same batch with the current epoch commits, whole.
    ok(&s, batch(1, &victim)).await;
    assert_eq!(s.flow(&victim.id).await.unwrap(), Some(victim.clone()));
    assert_eq!(s.flow(&first.id).await.unwrap(), None);
    assert_eq!(s.meta("m").await.unwrap(), Some(vec![1]));
}

/// `load` returns the vnodes, packages, unfinished flows (by id), the
/// outbox (by key), the flows with inbox messages (by id, once each) and
/// the kills (by flow id); not the finished flows.
pub async fn load_returns_only_what_running_flows_need(s: Arc<dyn Store>) {
    let empty: Snapshot = s.load().await.unwrap();
    assert!(
        empty.vnodes.is_empty()
            && empty.packages.is_empty()
            && empty.flows.is_empty()
            && empty.outbox.is_empty()
            && empty.inbox_flows.is_empty()
            && empty.kills.is_empty()
    );
    let (a, b) = (holding("A"), holding("B"));
    let statuses = [
        FlowStatus::StartRequested,
        FlowStatus::Running,
        FlowStatus::Completed,
        FlowStatus::Failed,
        FlowStatus::Killed,
    ];
    let mut flows = Vec::new();
    for i in 0..25u64 {
        let h = if i % 2 == 0 { a } else { b };
        flows.push(flow(
            h,
            1000 + i,
            statuses[i as usize % 5],
            &format!("c{i}"),
        ));
    }
    flows.push(responder(a, 2000));
    let mut ops: Vec<Op> = flows.iter().map(put).collect();
    let mut outbox = Vec::new();
    let mut inbox_flows = Vec::new();
    let mut kills = Vec::new();
    for (i, f) in flows.iter().enumerate() {
        if i % 3 == 0 {
            let m = msg(FlowId::random(), i as u64);
            outbox.push(m.clone());
            ops.push(Op::PutOutbox(Box::new(m)));
        }
        if i % 4 == 0 {
            inbox_flows.push(f.id);
            ops.push(Op::PutInbox(Box::new(msg(f.id, 1))));
            ops.push(Op::PutInbox(Box::new(msg(f.id, 2))));
        }
        if i % 5 == 1 {
            kills.push((f.id, format!("kill {i}")));
            ops.push(Op::PutKill(f.id, format!("kill {i}")));
        }
    }
    ok(&s, ops).await;
    let snap = s.load().await.unwrap();
    let mut unfinished: Vec<FlowRecord> = flows
        .iter()
        .filter(|f| !f.status.is_terminal())
        .cloned()
        .collect();
    unfinished.sort_by_key(|f| f.id);
    assert_eq!(unfinished.len(), 11);
    assert_eq!(snap.flows, unfinished);
    assert_eq!(snap.outbox, sorted_by_key(outbox));
    assert_eq!(s.outbox().await.unwrap(), snap.outbox, "the outbox alone");
    inbox_flows.sort();
    assert_eq!(snap.inbox_flows, inbox_flows);
    kills.sort();
    assert_eq!(snap.kills, kills);
}

/// Paging walks every flow of a vnode once, oldest first, whatever the
/// page size; a status filter with a scan bound gives short pages with a
/// cursor and, together, exactly the matching flows.
pub async fn pages_cover_every_flow_once_in_creation_order(s: Arc<dyn Store>) {
    let (h, other) = (holding("A"), holding("B"));
    let statuses = [
        FlowStatus::Completed,
        FlowStatus::Running,
        FlowStatus::Failed,
    ];
    // Written out of order; listed by creation time (then id).
    let mut flows: Vec<FlowRecord> = (0..30u64)
        .map(|i| {
            flow(
                h,
                1000 + (i * 7) % 30,
                statuses[i as usize % 3],
                &format!("c{i}"),
            )
        })
        .collect();
    // Two flows created in the same millisecond.
    flows.push(flow(h, 1015, FlowStatus::Completed, "same-ms"));
    let ops = flows
        .iter()
        .chain([flow(other, 1010, FlowStatus::Completed, "o")].iter())
        .map(put)
        .collect();
    ok(&s, ops).await;
    flows.sort_by_key(list_position);
    let want = ids(&flows);
    for limit in [1, 7, 31, 1000] {
        let (got, pages) = all_pages(&s, &h, None, limit, 10_000).await;
        assert_eq!(got, want, "limit {limit}");
        assert_eq!(pages, 31usize.div_ceil(limit).max(1), "limit {limit}");
    }
    let completed: Vec<FlowId> = flows
        .iter()
        .filter(|f| f.status == FlowStatus::Completed)
        .map(|f| f.id)
        .collect();
    for (limit, scan) in [(1, 1), (2, 5), (100, 4), (100, 10_000)] {
        let (got, _) = all_pages(&s, &h, Some(FlowStatus::Completed), limit, scan).await;
        assert_eq!(got, completed, "limit {limit} scan {scan}");
    }
    let (got, _) = all_pages(&s, &h, Some(FlowStatus::Killed), 10, 3).await;
    assert!(got.is_empty());
    let (got, _) = all_pages(&s, &holding("Nobody"), None, 10, 100).await;
    assert!(got.is_empty());
    // After the last flow: an empty page, no cursor.
    let last = list_position(flows.last().unwrap());
    let p = s.list_flows(&h, None, Some(&last), 10, 100).await.unwrap();
    assert!(p.flows.is_empty() && p.next.is_none());
    // Pages carry the full records.
    let p = s.list_flows(&h, None, None, 3, 100).await.unwrap();
    assert_eq!(p.flows, flows[..3].to_vec());
}

/// The exact pages and cursors of a small list: the cursor is the
/// position of the last flow looked at, given only when more may follow.
pub async fn pages_and_cursors_are_exact(s: Arc<dyn Store>) {
    use FlowStatus::{Completed as C, Running as R};
    let h = holding("A");
    let f: Vec<FlowRecord> = [C, R, C, R, R]
        .iter()
        .enumerate()
        .map(|(i, st)| flow(h, 10 + i as u64, *st, &format!("c{i}")))
        .collect();
    ok(&s, f.iter().map(put).collect()).await;
    let pos = |i: usize| Some(list_position(&f[i]).to_vec());
    let page = |status, after: Option<Vec<u8>>, limit, scan| {
        let s = s.clone();
        async move {
            let p = s
                .list_flows(&h, status, after.as_deref(), limit, scan)
                .await
                .unwrap();
            (ids(&p.flows), p.next)
        }
    };
    let id = |is: &[usize]| is.iter().map(|&i| f[i].id).collect::<Vec<_>>();
    // No filter.
    assert_eq!(page(None, None, 5, 100).await, (id(&[0, 1, 2, 3, 4]), None));
    assert_eq!(page(None, None, 4, 100).await, (id(&[0, 1, 2, 3]), pos(3)));
    assert_eq!(page(None, pos(3), 4, 100).await, (id(&[4]), None));
    assert_eq!(page(None, None, 2, 1).await, (id(&[0]), pos(0)));
    assert_eq!(page(None, pos(4), 2, 1).await, (id(&[]), None));
    assert_eq!(page(None, None, 0, 100).await, (id(&[]), None));
    // Completed, one per page.
    assert_eq!(page(Some(C), None, 1, 10).await, (id(&[0]), pos(0)));
    assert_eq!(page(Some(C), pos(0), 1, 10).await, (id(&[2]), pos(2)));
    assert_eq!(page(Some(C), pos(2), 1, 10).await, (id(&[]), None));
    // Running, looking at two flows per page.
    assert_eq!(page(Some(R), None, 10, 2).await, (id(&[1]), pos(1)));
    assert_eq!(page(Some(R), pos(1), 10, 2).await, (id(&[3]), pos(3)));
    assert_eq!(page(Some(R), pos(3), 10, 2).await, (id(&[4]), None));
    // A scan bound that finds nothing still moves the cursor.
    assert_eq!(page(Some(R), None, 10, 1).await, (id(&[]), pos(0)));
    assert_eq!(
        page(Some(FlowStatus::Killed), None, 10, 3).await,
        (id(&[]), pos(2))
    );
    // A cursor between flows (a position no flow has) starts after it.
    let mut between = list_position(&f[1]);
    between[8..].fill(0xff);
    assert_eq!(
        page(None, Some(between.to_vec()), 10, 100).await,
        (id(&[2, 3, 4]), None)
    );
    // Cursors of other lengths compare as byte strings with the
    // positions: a prefix (here a creation time alone) starts at it, a
    // longer one after its first 24 bytes.
    let created_12 = 12u64.to_be_bytes().to_vec();
    assert_eq!(
        page(None, Some(created_12), 10, 100).await,
        (id(&[2, 3, 4]), None)
    );
    let mut longer = list_position(&f[1]).to_vec();
    longer.push(0);
    assert_eq!(
        page(None, Some(longer), 10, 100).await,
        (id(&[2, 3, 4]), None)
    );
    assert_eq!(
        page(None, Some(vec![]), 2, 100).await,
        (id(&[0, 1]), pos(1))
    );
    assert_eq!(
        page(None, Some(vec![0xff; 24]), 10, 100).await,
        (id(&[]), None)
    );
}

/// `finished_before` lists the flows that ended before the cutoff
/// (exclusive) by end time, then id, at most `limit`.
pub async fn finished_before_lists_ended_flows_by_end_time(s: Arc<dyn Store>) {
    let h = holding("A");
    let mut flows = Vec::new();
    for (i, (status, ended)) in [
        (FlowStatus::Completed, 500),
        (FlowStatus::Failed, 100),
        (FlowStatus::Killed, 300),
        (FlowStatus::Running, 50),
        (FlowStatus::Completed, 300),
        (FlowStatus::StartRequested, 10),
        (FlowStatus::Completed, 900),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = flow(h, i as u64, status, &format!("c{i}"));
        f.updated_ms = ended;
        flows.push(f);
    }
    ok(&s, flows.iter().map(put).collect()).await;
    let mut ended: Vec<FlowRecord> = flows
        .iter()
        .filter(|f| f.status.is_terminal())
        .cloned()
        .collect();
    ended.sort_by_key(|f| (f.updated_ms, f.id));
    assert_eq!(s.finished_before(u64::MAX, 100).await.unwrap(), ended);
    assert_eq!(s.finished_before(900, 100).await.unwrap(), ended[..4]);
    assert_eq!(s.finished_before(901, 2).await.unwrap(), ended[..2]);
    assert_eq!(s.finished_before(300, 100).await.unwrap(), ended[..1]);
    assert!(s.finished_before(100, 100).await.unwrap().is_empty());
    assert!(s.finished_before(u64::MAX, 0).await.unwrap().is_empty());
}

/// `stale_starts` lists the flows still `START_REQUESTED` created before
/// the cutoff, oldest first, of every vnode, responders included; nothing
/// that ran or ended. `kills` lists the kills requested, by flow id.
pub async fn stale_starts_are_the_old_unstarted_flows(s: Arc<dyn Store>) {
    let (a, b) = (holding("A"), holding("B"));
    let mut flows = Vec::new();
    for (i, (h, status, created)) in [
        (a, FlowStatus::StartRequested, 40),
        (b, FlowStatus::StartRequested, 10),
        (a, FlowStatus::Running, 5),
        (a, FlowStatus::Completed, 7),
        (b, FlowStatus::StartRequested, 90),
        (a, FlowStatus::Failed, 8),
    ]
    .into_iter()
    .enumerate()
    {
        flows.push(flow(h, created, status, &format!("c{i}")));
    }
    let mut r = responder(b, 20);
    r.status = FlowStatus::StartRequested;
    flows.push(r.clone());
    ok(&s, flows.iter().map(put).collect()).await;
    let want = vec![flows[1].clone(), r, flows[0].clone()];
    assert_eq!(s.stale_starts(50, 100).await.unwrap(), want);
    assert_eq!(s.stale_starts(50, 2).await.unwrap(), want[..2]);
    assert_eq!(s.stale_starts(11, 100).await.unwrap(), want[..1]);
    assert!(s.stale_starts(10, 100).await.unwrap().is_empty());
    let all = s.stale_starts(u64::MAX, 100).await.unwrap();
    assert_eq!(all.len(), 4, "{all:?}");
    assert_eq!(all[3], flows[4]);
    // Kills requested, as the sweep reads them.
    ok(
        &s,
        vec![
            Op::PutKill(flows[0].id, "first".into()),
            Op::PutKill(flows[4].id, "second".into()),
        ],
    )
    .await;
    let mut want = vec![
        (flows[0].id, "first".to_string()),
        (flows[4].id, "second".to_string()),
    ];
    want.sort();
    assert_eq!(s.kills().await.unwrap(), want);
    ok(&s, vec![Op::DeleteKill(flows[0].id)]).await;
    assert_eq!(
        s.kills().await.unwrap(),
        vec![(flows[4].id, "second".to_string())]
    );
}

/// `early_flows` counts the flows with messages in their inbox and no
/// record: not the messages, and not flows that exist.
pub async fn early_flows_are_inboxes_without_a_flow(s: Arc<dyn Store>) {
    assert_eq!(s.early_flows().await.unwrap(), 0);
    let known = flow(holding("A"), 1, FlowStatus::Running, "known");
    let (x, y) = (FlowId::random(), FlowId::random());
    ok(
        &s,
        vec![
            put(&known),
            Op::PutInbox(Box::new(msg(known.id, 1))),
            Op::PutInbox(Box::new(msg(x, 1))),
            Op::PutInbox(Box::new(msg(x, 2))),
            Op::PutInbox(Box::new(msg(y, 5))),
        ],
    )
    .await;
    assert_eq!(s.early_flows().await.unwrap(), 2);
    // The init came for x: its flow exists now.
    let mut started = flow(holding("A"), 2, FlowStatus::StartRequested, "x");
    started.id = x;
    ok(&s, vec![put(&started)]).await;
    assert_eq!(s.early_flows().await.unwrap(), 1);
    ok(&s, vec![Op::DeleteFlowInbox(y)]).await;
    assert_eq!(s.early_flows().await.unwrap(), 0);
}

/// `flow_by_client` finds a client-started flow by vnode and client
/// request id, and nothing for another vnode or id.
pub async fn flow_by_client_finds_client_started_flows(s: Arc<dyn Store>) {
    let (a, b) = (holding("A"), holding("B"));
    let fa = flow(a, 1, FlowStatus::Running, "r1");
    let fb = flow(b, 2, FlowStatus::Completed, "r1");
    let fa2 = flow(a, 3, FlowStatus::Failed, "r2");
    let resp = responder(a, 4);
    ok(&s, vec![put(&fa), put(&fb), put(&fa2), put(&resp)]).await;
    assert_eq!(s.flow_by_client(&a, &crid("r1")).await.unwrap(), Some(fa));
    assert_eq!(s.flow_by_client(&b, &crid("r1")).await.unwrap(), Some(fb));
    assert_eq!(
        s.flow_by_client(&a, &crid("r2")).await.unwrap(),
        Some(fa2.clone())
    );
    assert_eq!(s.flow_by_client(&b, &crid("r2")).await.unwrap(), None);
    assert_eq!(s.flow_by_client(&a, &crid("R1")).await.unwrap(), None);
    // A rewrite is found as rewritten.
    let mut fa2b = fa2.clone();
    fa2b.status = FlowStatus::Completed;
    fa2b.result = Some("1".into());
    ok(&s, vec![put(&fa2b)]).await;
    assert_eq!(s.flow_by_client(&a, &crid("r2")).await.unwrap(), Some(fa2b));
}

/// `DeleteFlow` removes the record, journal, inbox, kill and index
/// entries of that flow only, and frees its client request id.
pub async fn delete_flow_removes_everything_and_frees_the_client_id(s: Arc<dyn Store>) {
    let h = holding("A");
    let gone = flow(h, 10, FlowStatus::Completed, "r1");
    let kept = flow(h, 11, FlowStatus::Completed, "r2");
    let mut ops = Vec::new();
    for f in [&gone, &kept] {
        ops.extend([
            put(f),
            Op::AppendJournal {
                flow: f.id,
                start: 0,
                entries: vec![vec![1], vec![2]],
            },
            Op::PutInbox(Box::new(msg(f.id, 1))),
            Op::PutKill(f.id, "k".into()),
        ]);
    }
    ok(&s, ops).await;
    let before = s.stats().await.unwrap();
    ok(&s, vec![Op::DeleteFlow(Box::new(gone.clone()))]).await;
    assert_eq!(s.flow(&gone.id).await.unwrap(), None);
    assert!(s.journal(&gone.id).await.unwrap().is_empty());
    assert!(s.inbox(&gone.id).await.unwrap().is_empty());
    assert_eq!(s.flow_by_client(&h, &crid("r1")).await.unwrap(), None);
    let snap = s.load().await.unwrap();
    assert_eq!(snap.kills, vec![(kept.id, "k".to_string())]);
    assert_eq!(snap.inbox_flows, vec![kept.id]);
    assert_eq!(all_pages(&s, &h, None, 10, 10).await.0, vec![kept.id]);
    assert_eq!(
        s.finished_before(u64::MAX, 10).await.unwrap(),
        vec![kept.clone()]
    );
    assert_eq!(s.flow(&kept.id).await.unwrap(), Some(kept.clone()));
    assert_eq!(s.journal(&kept.id).await.unwrap().len(), 2);
    let after = s.stats().await.unwrap();
    assert_eq!(
        after,
        StoreStats {
            flows: before.flows - 1,
            unfinished: 0,
            journal_entries: before.journal_entries - 2,
            inbox: before.inbox - 1,
            outbox: 0,
            kills: before.kills - 1,
            index_entries: before.index_entries - 3,
        }
    );
    // The id is free again.
    let again = flow(h, 12, FlowStatus::Running, "r1");
    ok(&s, vec![put(&again)]).await;
    assert_eq!(
        s.flow_by_client(&h, &crid("r1")).await.unwrap(),
        Some(again)
    );
}

fn expect_duplicate(r: Result<(), StoreError>, h: HoldingId, c: &str, existing: FlowId, f: FlowId) {
    match r {
        Err(StoreError::Duplicate {
            holding,
            client_request_id,
            existing: e,
            flow,
        }) => {
            assert_eq!(holding, h);
            assert_eq!(client_request_id, crid(c));
            assert_eq!(e, existing, "the existing flow");
            assert_eq!(flow, f, "the refused flow");
        }
        other => panic!("expected Duplicate of {c}, got {other:?}"),
    }
}

/// A (vnode, client request id) belongs to one flow: another flow id is
/// refused, also within one batch; rewriting the same flow is fine; a
/// batch that deletes the holder first may give the id to another flow.
pub async fn a_client_request_id_belongs_to_one_flow(s: Arc<dyn Store>) {
    let (a, b) = (holding("A"), holding("B"));
    let first = flow(a, 1, FlowStatus::Running, "r");
    ok(&s, vec![put(&first)]).await;
    let mut rewritten = first.clone();
    rewritten.status = FlowStatus::Completed;
    rewritten.updated_ms = 50;
    ok(&s, vec![put(&rewritten), put(&rewritten)]).await;
    let second = flow(a, 2, FlowStatus::Running, "r");
    expect_duplicate(
        s.write(vec![put(&second)]).await,
        a,
        "r",
        first.id,
        second.id,
    );
    // Another vnode may use the same id.
    ok(&s, vec![put(&flow(b, 3, FlowStatus::Running, "r"))]).await;
    // Within one batch.
    let (c1, c2) = (
        flow(a, 4, FlowStatus::Running, "s"),
        flow(a, 5, FlowStatus::Running, "s"),
    );
    expect_duplicate(
        s.write(vec![put(&c1), put(&c2)]).await,
        a,
        "s",
        c1.id,
        c2.id,
    );
    assert_eq!(s.flow(&c1.id).await.unwrap(), None);
    assert_eq!(s.flow_by_client(&a, &crid("s")).await.unwrap(), None);
    // Delete, then reuse, in one batch.
    ok(
        &s,
        vec![Op::DeleteFlow(Box::new(rewritten.clone())), put(&second)],
    )
    .await;
    assert_eq!(
        s.flow_by_client(&a, &crid("r")).await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(s.flow(&first.id).await.unwrap(), None);
    // Responder flows have no client request id: any number.
    ok(&s, vec![put(&responder(a, 6)), put(&responder(a, 7))]).await;
    assert_eq!(s.stats().await.unwrap().flows, 4);
}

/// Many concurrent batches start a flow with the same client request id
/// (each its own flow id) beside batches that do not: exactly one racer
/// wins, the others are refused naming it, and the rest all commit.
pub async fn racing_starts_with_one_client_request_id_give_one_flow(s: Arc<dyn Store>) {
    let h = holding("A");
    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let s = s.clone();
        let racer = i % 2 == 0;
        let f = flow(
            h,
            i,
            FlowStatus::Running,
            &if racer {
                "race".into()
            } else {
                format!("own{i}")
            },
        );
        tasks.push(tokio::spawn(async move {
            let r = s
                .write(vec![
                    put(&f),
                    Op::AppendJournal {
                        flow: f.id,
                        start: 0,
                        entries: vec![vec![i as u8]],
                    },
                ])
                .await;
            (racer, f, r)
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for t in tasks {
        let (racer, f, r) = t.await.expect("task");
        match (racer, r) {
            (_, Ok(())) => {
                assert_eq!(s.journal(&f.id).await.unwrap().len(), 1);
                if racer {
                    winners.push(f);
                }
            }
            (true, Err(StoreError::Duplicate { existing, flow, .. })) => {
                assert_eq!(flow, f.id);
                assert_eq!(s.flow(&f.id).await.unwrap(), None);
                assert!(s.journal(&f.id).await.unwrap().is_empty());
                losers.push(existing);
            }
            (racer, Err(e)) => panic!("racer {racer}: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one racer wins");
    assert_eq!(losers.len(), 29);
    assert!(losers.iter().all(|e| *e == winners[0].id));
    assert_eq!(
        s.flow_by_client(&h, &crid("race")).await.unwrap(),
        Some(winners[0].clone())
    );
    assert_eq!(s.stats().await.unwrap().flows, 31);
}

fn expect_fenced(r: Result<(), StoreError>, p: u16, e: u64, c: u64) {
    match r {
        Err(StoreError::Fenced {
            partition,
            epoch,
            current,
        }) => assert_eq!((partition, epoch, current), (p, e, c)),
        other => panic!("expected Fenced({p}, {e}, {c}), got {other:?}"),
    }
}

/// Claims count up from 1 per partition; a fence passes only with the
/// partition's current epoch (0 before any claim).
pub async fn fences_refuse_stale_epochs(s: Arc<dyn Store>) {
    let fence = |partition, epoch| vec![Op::Fence { partition, epoch }];
    ok(&s, fence(1, 0)).await;
    expect_fenced(s.write(fence(1, 1)).await, 1, 1, 0);
    assert_eq!(s.claim_partition(1, "worker-a").await.unwrap(), 1);
    assert_eq!(s.claim_partition(1, "worker-b").await.unwrap(), 2);
    assert_eq!(s.claim_partition(u16::MAX, "worker-a").await.unwrap(), 1);
    expect_fenced(s.write(fence(1, 0)).await, 1, 0, 2);
    expect_fenced(s.write(fence(1, 1)).await, 1, 1, 2);
    expect_fenced(s.write(fence(1, 3)).await, 1, 3, 2);
    ok(&s, fence(1, 2)).await;
    ok(&s, fence(u16::MAX, 1)).await;
    ok(&s, fence(2, 0)).await;
    // Every fence of a batch must hold.
    let mut two = fence(1, 2);
    two.extend(fence(2, 5));
    two.push(Op::PutMeta("x".into(), vec![1]));
    expect_fenced(s.write(two).await, 2, 5, 0);
    assert_eq!(s.meta("x").await.unwrap(), None);
    // A fenced batch writes like any other.
    let f = flow(holding("A"), 1, FlowStatus::Running, "r");
    let mut ops = fence(1, 2);
    ops.push(put(&f));
    ok(&s, ops).await;
    assert_eq!(s.flow(&f.id).await.unwrap(), Some(f));
    assert_eq!(s.claim_partition(1, "worker-a").await.unwrap(), 3);
    // Who owns what: claimed partitions only (a fence claims nothing).
    assert_eq!(
        s.partition_owners().await.unwrap(),
        vec![
            (1, 3, "worker-a".to_string()),
            (u16::MAX, 1, "worker-a".to_string())
        ]
    );
}

/// Many concurrent batches, some fenced with a stale epoch: those fail,
/// alone, and every other commits (they share group commits).
pub async fn fenced_batches_fail_alone_in_concurrent_groups(s: Arc<dyn Store>) {
    assert_eq!(s.claim_partition(7, "old").await.unwrap(), 1);
    assert_eq!(s.claim_partition(7, "new").await.unwrap(), 2);
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut ops = vec![Op::PutMeta(format!("m{i}"), i.to_be_bytes().to_vec())];
            match i % 3 {
                0 => ops.push(Op::Fence {
                    partition: 7,
                    epoch: 1,
                }),
                1 => ops.push(Op::Fence {
                    partition: 7,
                    epoch: 2,
                }),
                _ => {} // unfenced
            }
            (i, s.write(ops).await)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.expect("task");
        if i % 3 == 0 {
            expect_fenced(r, 7, 1, 2);
        } else {
            r.unwrap_or_else(|e| panic!("batch {i}: {e}"));
        }
    }
    for i in 0..300u32 {
        let want = (i % 3 != 0).then(|| i.to_be_bytes().to_vec());
        assert_eq!(s.meta(&format!("m{i}")).await.unwrap(), want, "m{i}");
    }
}

/// Writers fenced with one epoch keep writing while another owner claims
/// the partition: every write answered Ok is there, every write refused
/// left nothing, and none that started after the claim returned commits.
pub async fn a_claim_cuts_off_the_writers_of_the_old_epoch(s: Arc<dyn Store>) {
    let old = s.claim_partition(4, "old").await.unwrap();
    assert_eq!(old, 1);
    let claimed = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..8u32 {
        let (s, claimed, written) = (s.clone(), claimed.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for n in 0..20_000u32 {
                let after_claim = claimed.load(Ordering::SeqCst);
                let key = format!("w{w}-{n}");
                let r = s
                    .write(vec![
                        Op::Fence {
                            partition: 4,
                            epoch: old,
                        },
                        Op::PutMeta(key.clone(), vec![1]),
                    ])
                    .await;
                let fenced = match r {
                    Ok(()) => {
                        assert!(!after_claim, "{key} committed after the claim returned");
                        written.fetch_add(1, Ordering::SeqCst);
                        false
                    }
                    Err(e) => {
                        expect_fenced(Err(e), 4, old, 2);
                        true
                    }
                };
                answers.push((key, fenced));
                if fenced {
                    return answers;
                }
            }
            panic!("writer {w} was never fenced");
        }));
    }
    // Claim while the writers are busy.
    while written.load(Ordering::SeqCst) < 50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(s.claim_partition(4, "new").await.unwrap(), 2);
    claimed.store(true, Ordering::SeqCst);
    for w in writers {
        for (key, fenced) in w.await.expect("writer") {
            let got = s.meta(&key).await.unwrap();
            assert_eq!(
                got.is_none(),
                fenced,
                "{key}: fenced {fenced}, stored {got:?}"
            );
        }
    }
}

/// Many concurrent writers (sharing group commits) all commit.
pub async fn concurrent_writers_all_commit(s: Arc<dyn Store>) {
    let flow = FlowId::random();
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.write(vec![
                Op::AppendJournal {
                    flow,
                    start: i,
                    entries: vec![vec![i as u8]],
                },
                Op::PutInbox(Box::new(msg(flow, u64::from(i)))),
            ])
            .await
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("write");
    }
    let j = s.journal(&flow).await.unwrap();
    assert_eq!(j, (0..64u8).map(|i| vec![i]).collect::<Vec<_>>());
    assert_eq!(s.inbox(&flow).await.unwrap().len(), 64);
    assert_eq!(s.load().await.unwrap().inbox_flows, vec![flow]);
}

/// `stats` counts rows exactly.
pub async fn stats_count_rows(s: Arc<dyn Store>) {
    assert_eq!(s.stats().await.unwrap(), StoreStats::default());
    let h = holding("A");
    let (a, b, r) = (
        flow(h, 1, FlowStatus::Running, "a"),
        flow(h, 2, FlowStatus::Completed, "b"),
        responder(h, 3),
    );
    ok(
        &s,
        vec![
            put(&a),
            put(&b),
            put(&r),
            Op::AppendJournal {
                flow: a.id,
                start: 0,
                entries: vec![vec![1]; 3],
            },
            Op::AppendJournal {
                flow: r.id,
                start: 0,
                entries: vec![vec![2]; 2],
            },
            Op::PutInbox(Box::new(msg(a.id, 1))),
            Op::PutInbox(Box::new(msg(r.id, 1))),
            Op::PutOutbox(Box::new(msg(FlowId::random(), 1))),
            Op::PutKill(a.id, "k".into()),
            Op::PutMeta("m".into(), vec![]),
        ],
    )
    .await;
    assert_eq!(
        s.stats().await.unwrap(),
        StoreStats {
            flows: 3,
            unfinished: 2,
            journal_entries: 5,
            inbox: 2,
            outbox: 1,
            kills: 1,
            // 2 client ids, and per flow one by vnode and one by state.
            index_entries: 2 + 3 * 2,
        }
    );
}

/// `PutMetaIf` commits only on the value its writer read (absent
/// included) and otherwise fails alone, writing nothing of its batch;
/// writers racing read-modify-write on one setting, retrying on
/// `Changed`, lose no update.
pub async fn conditional_puts_lose_no_update(s: Arc<dyn Store>) {
    let put_if = |expected: Option<&[u8]>, value: &[u8]| Op::PutMetaIf {
        key: "rbac".into(),
        expected: expected.map(<[u8]>::to_vec),
        value: value.to_vec(),
    };
    ok(&s, vec![put_if(None, b"one")]).await;
    assert!(matches!(
        s.write(vec![put_if(None, b"again"), Op::PutMeta("side".into(), vec![1])]).await,
        Err(StoreError::Changed { key }) if key == "rbac"
    ));
    assert!(matches!(
        s.write(vec![put_if(Some(b"two"), b"three")]).await,
        Err(StoreError::Changed { .. })
    ));
    assert_eq!(s.meta("side").await.unwrap(), None, "a refused batch wrote");
    assert_eq!(s.meta("rbac").await.unwrap().as_deref(), Some(&b"one"[..]));
    ok(&s, vec![put_if(Some(b"one"), b"two")]).await;
    // Within a batch, an earlier op counts.
    ok(
        &s,
        vec![
            Op::PutMeta("rbac".into(), b"x".to_vec()),
            put_if(Some(b"x"), b"y"),
        ],
    )
    .await;
    assert_eq!(s.meta("rbac").await.unwrap().as_deref(), Some(&b"y"[..]));
    // Counters incremented by racing writers.
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                loop {
                    let cur = s.meta("counter").await.unwrap();
                    let n = cur
                        .as_deref()
                        .map_or(0u32, |b| u32::from_be_bytes(b.try_into().unwrap()));
                    let r = s
                        .write(vec![Op::PutMetaIf {
                            key: "counter".into(),
                            expected: cur,
                            value: (n + 1).to_be_bytes().to_vec(),
                        }])
                        .await;
                    match r {
                        Ok(()) => break,
                        Err(StoreError::Changed { .. }) => continue,
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        s.meta("counter").await.unwrap(),
        Some(80u32.to_be_bytes().to_vec()),
        "every increment counted once"
    );
}

/// After `close`, writes, claims and reads fail with `Closed`.
pub async fn a_closed_store_answers_closed(s: Arc<dyn Store>) {
    ok(&s, vec![Op::PutMeta("k".into(), vec![1])]).await;
    s.close().await;
    assert!(matches!(
        s.write(vec![Op::PutMeta("k".into(), vec![2])]).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        s.claim_partition(0, "w").await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(s.meta("k").await, Err(StoreError::Closed)));
    assert!(matches!(s.load().await, Err(StoreError::Closed)));
    assert!(matches!(
        s.flow(&FlowId::random()).await,
        Err(StoreError::Closed)
    ));
    // Closing again is fine.
    s.close().await;
}
