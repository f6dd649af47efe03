//! A node on the PostgreSQL store (`--store postgres://...`) on a real
//! PostgreSQL server: flows run as on the embedded store, and a SIGKILL
//! while they are in flight loses nothing and duplicates nothing.

use std::time::Duration;

use braid_e2e::{Node, Pkg};

use crate::{ALICE, BOB, assert_pings_ok, proposals_yes_and_no, start_pings};

#[test]
fn a_node_on_postgresql_survives_sigkill_with_every_flow_completed_once() {
    const N: usize = 100;
    let db = braid_testkit::fresh_database();
    let mut node = Node::options().arg("--store").arg(db.clone()).start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    // Responders sleep 2 s, so the kill finds every exchange in flight.
    let ids = start_pings(node.api(), &alice, BOB, "pg", N, 2000);
    let api = node.api().clone();
    api.wait_responders(&bob, N, Duration::from_secs(60));
    node.kill();
    node.restart();
    let api = node.api().clone();
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(120));
    assert_pings_ok(&flows, &ids, BOB);
    let responders = api.wait_responders_terminal(&bob, N, Duration::from_secs(60));
    assert_eq!(responders.len(), N, "one responder per ping");
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");
    node.assert_running();
    drop(node);
    braid_testkit::drop_database(&db);
}

#[test]
fn the_three_party_proposal_runs_on_postgresql() {
    let db = braid_testkit::fresh_database();
    let node = Node::options().arg("--store").arg(db.clone()).start();
    let carol = node.vnode("O=Carol, L=Rome, C=IT", Pkg::Proposal);
    let _dave = node.vnode("O=Dave, L=Oslo, C=NO", Pkg::Proposal);
    let _erin = node.vnode("O=Erin, L=Lima, C=PE", Pkg::Proposal);
    proposals_yes_and_no(
        node.api(),
        &carol,
        "O=Dave, L=Oslo, C=NO",
        "O=Erin, L=Lima, C=PE",
    );
    drop(node);
    braid_testkit::drop_database(&db);
}
