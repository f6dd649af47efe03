//! Many more suspended flows than may be kept live: the rest are evicted and
//! resumed by replaying their journals, and all finish correctly.

use std::time::Duration;

use braid_e2e::{Node, Pkg};

use crate::{ALICE, BOB, assert_pings_ok, start_pings};

#[test]
fn flows_beyond_the_live_limit_are_evicted_and_resumed() {
    const N: usize = 500;
    let mut node = Node::options().max_live_flows(4).start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();

    let ids = start_pings(&api, &alice, BOB, "e", N, 1500);

    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(120));
    assert_pings_ok(&flows, &ids, BOB);
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
