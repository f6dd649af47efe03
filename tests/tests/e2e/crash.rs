//! SIGKILL the node and restart it on the same data directory: every flow
//! finishes, once, with the right result, and every message reaches its flow
//! once (the ping responder fails on a duplicate).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use braid_e2e::{Api, Node, Pkg, wait_until};
use rand::RngExt;

use crate::{ALICE, BOB, assert_pings_ok, ping_body, start_pings};

#[test]
fn suspended_flows_survive_sigkill() {
    const N: usize = 200;
    let mut node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);

    // Long enough that every responder is still asleep when we kill.
    let ids = start_pings(node.api(), &alice, BOB, "s", N, 3000);

    // Wait until every exchange is in flight: each initiator has run, and
    // Bob has a responder (asleep) for each.
    let api = node.api().clone();
    wait_until(
        "all pings to be suspended mid-exchange",
        Duration::from_secs(60),
        || {
            let started = api
                .list_flows(&alice)
                .iter()
                .filter(|f| f.status != "START_REQUESTED")
                .count();
            let responders = api
                .list_flows(&bob)
                .iter()
                .filter(|f| f.client_request_id.is_none())
                .count();
            if started == N && responders == N {
                Ok(())
            } else {
                Err(format!(
                    "{started}/{N} initiators started, {responders}/{N} responders exist"
                ))
            }
        },
    );
    let completed_before = api
        .list_flows(&alice)
        .iter()
        .filter(|f| f.status == "COMPLETED")
        .count();
    eprintln!("[e2e] killing with {completed_before}/{N} pings already completed");
    assert!(
        completed_before < N,
        "every ping completed before the kill, so the kill proved nothing"
    );

    node.kill();
    node.restart();
    let api = node.api().clone();

    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(120));
    assert_pings_ok(&flows, &ids, BOB);
    let listing = api.list_flows(&alice);
    assert_eq!(
        listing.len(),
        N,
        "Alice lists {} flows, expected {N}",
        listing.len()
    );

    let responders = api.wait_responders_terminal(&bob, N, Duration::from_secs(60));
    assert_eq!(
        responders.len(),
        N,
        "Bob has {} responder flows, expected {N}",
        responders.len()
    );
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");
    node.assert_running();
}

#[test]
fn sigkill_at_random_instants_while_submitting() {
    const N: usize = 500;
    const KILLS: usize = 3;
    let mut node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let ids: Vec<String> = (0..N).map(|i| format!("k-{i}")).collect();

    // The submitter follows restarts through the shared URL, retries what
    // failed in transit and counts a 409 as "accepted before the crash".
    let url: Arc<RwLock<String>> = node.shared_url();
    let done = Arc::new(AtomicBool::new(false));
    let submitter = {
        let ids = ids.clone();
        let alice = alice.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(180);
            let mut conflicts = 0usize;
            let mut retries = 0usize;
            let mut api = Api::new(url.read().unwrap().clone());
            for (i, id) in ids.iter().enumerate() {
                loop {
                    assert!(
                        Instant::now() < deadline,
                        "submitter stuck at {id} ({retries} retries)"
                    );
                    let current = url.read().unwrap().clone();
                    if current != api.base() {
                        api = Api::new(current);
                    }
                    match api.submit_flow(&alice, id, "ping", &ping_body(BOB, i as i64, 0)) {
                        Ok(true) => break,
                        Ok(false) => {
                            conflicts += 1;
                            break;
                        }
                        Err(_) => {
                            // The node is down or was killed mid-request.
                            retries += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            }
            done.store(true, Ordering::SeqCst);
            eprintln!("[e2e] submitted {N} pings ({retries} retries, {conflicts} conflicts)");
        })
    };

    let mut rng = rand::rng();
    for k in 0..KILLS {
        // Deliberate chaos timing, not synchronisation.
        let offset = Duration::from_millis(rng.random_range(100..600));
        std::thread::sleep(offset);
        let submitted_all = done.load(Ordering::SeqCst);
        eprintln!(
            "[e2e] kill {} after {offset:?} (submission finished: {submitted_all})",
            k + 1
        );
        node.kill();
        node.restart();
    }
    submitter.join().expect("submitter thread panicked");

    let api = node.api().clone();
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(120));
    assert_pings_ok(&flows, &ids, BOB);
    let listing = api.list_flows(&alice);
    assert_eq!(
        listing.len(),
        N,
        "Alice lists {} flows, expected {N}",
        listing.len()
    );

    let responders = api.wait_responders_terminal(&bob, N, Duration::from_secs(60));
    assert_eq!(
        responders.len(),
        N,
        "Bob has {} responder flows, expected {N}",
        responders.len()
    );
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");
    node.assert_running();
}
