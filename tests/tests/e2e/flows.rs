//! Happy paths on one node: a two-party ping, a three-party proposal with
//! sub-flows, and idempotent starts.

use braid_e2e::{Node, Pkg, package_bytes};
use serde_json::json;

use crate::{ALICE, BOB, assert_ping_ok, ping_body};

const CAROL: &str = "O=Carol, L=Paris, C=FR";
const DAVE: &str = "O=Dave, L=Berlin, C=DE";
const ERIN: &str = "O=Erin, L=Madrid, C=ES";

#[test]
fn ping_proposal_and_idempotent_start() {
    let node = Node::start();
    let api = node.api();

    // Upload: the answer describes the package; the same bytes again give
    // the same checksum.
    let bytes = package_bytes(Pkg::Ping);
    let resp = api
        .post_bytes("/api/v1/package", "application/wasm", bytes.clone())
        .expect("upload ping");
    resp.expect_status(&[201], "first upload of ping");
    let checksum = resp.json["checksum"]
        .as_str()
        .expect("checksum")
        .to_string();
    let flows = resp.json["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("no flows: {}", resp.text));
    assert!(
        flows
            .iter()
            .any(|f| f["name"] == "ping" && f["startable"] == true && f.get("initiates").is_some()),
        "package description lacks a startable `ping`: {}",
        resp.text
    );
    assert!(
        flows.iter().any(|f| !f["respondsTo"].is_null()),
        "package description lacks the ping responder: {}",
        resp.text
    );
    assert_eq!(
        api.upload_package(&bytes),
        checksum,
        "same bytes, different checksum"
    );

    let resp = api
        .post_json(
            "/api/v1/virtualnode",
            &json!({"x500Name": ALICE, "packageChecksum": checksum}),
        )
        .expect("create Alice");
    resp.expect_status(&[201], "create Alice");
    assert_eq!(resp.json["x500Name"], ALICE);
    assert_eq!(resp.json["packageChecksum"], checksum.as_str());
    let alice = resp.json["holdingId"]
        .as_str()
        .expect("holdingId")
        .to_string();
    let bob = api.create_vnode(BOB, &checksum);
    assert_ne!(alice, bob, "two vnodes share a holding id");

    // Two-party ping.
    api.start_flow(&alice, "p1", "ping", &json!({"counterparty": BOB, "n": 41}));
    let st = api.wait_terminal(&alice, "p1");
    assert_ping_ok(&st, 41, BOB);
    assert_eq!(st.flow_name.as_deref(), Some("ping"));
    assert!(!st.timestamp.is_null(), "no timestamp: {}", st.describe());
    assert!(
        st.flow_id.as_deref().is_some_and(|id| !id.is_empty()),
        "no flowId: {}",
        st.describe()
    );

    // Bob's listing shows the responder flow, finished cleanly.
    let responders = api.wait_responders_terminal(&bob, 1, braid_e2e::DEADLINE);
    assert_eq!(
        responders.len(),
        1,
        "Bob has more than one responder: {responders:?}"
    );
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");
    assert!(
        api.list_flows(&bob)
            .iter()
            .all(|f| f.client_request_id.is_none()),
        "Bob started nothing himself"
    );

    // Repeated clientRequestId: 409, never a second flow, while running
    // and after completion.
    api.start_flow(&alice, "dup", "ping", &ping_body(BOB, 7, 300));
    let again = api
        .try_start_flow(&alice, "dup", "ping", &ping_body(BOB, 8, 0))
        .expect("repeat start");
    again.expect_problem(&[409], "repeated clientRequestId while running");
    let st = api.wait_terminal(&alice, "dup");
    assert_ping_ok(&st, 7, BOB);
    let again = api
        .try_start_flow(&alice, "dup", "ping", &ping_body(BOB, 9, 0))
        .expect("repeat start");
    again.expect_problem(&[409], "repeated clientRequestId after completion");
    let listing = api.list_flows(&alice);
    let dups = listing
        .iter()
        .filter(|f| f.client_request_id.as_deref() == Some("dup"))
        .count();
    assert_eq!(dups, 1, "flow `dup` listed {dups} times: {listing:?}");
    assert_eq!(
        listing.len(),
        2,
        "Alice should have exactly p1 and dup: {listing:?}"
    );
    assert_ping_ok(&api.status(&alice, "dup"), 7, BOB);
    // The responder count on Bob proves the repeats started nothing.
    let responders = api.wait_responders_terminal(&bob, 2, braid_e2e::DEADLINE);
    assert_eq!(responders.len(), 2, "Bob: {responders:?}");

    // Three parties, sub-flow per counterparty.
    let carol = node.vnode(CAROL, Pkg::Proposal);
    node.vnode(DAVE, Pkg::Proposal);
    node.vnode(ERIN, Pkg::Proposal);

    crate::proposals_yes_and_no(api, &carol, DAVE, ERIN);
}
