//! `GET /api/v1/flow/{holding}/{clientRequestId}/journal`: what a finished
//! ping, a three-party proposal and a failed flow did, with the flows at
//! the other end of their sessions on the same node, under RBAC.

use braid_e2e::{Node, Pkg};
use serde_json::{Value, json};

use crate::rbac::{as_user, create_user};
use crate::{ALICE, BOB, ping_body};

const CAROL: &str = "O=Carol, L=Paris, C=FR";
const DAVE: &str = "O=Dave, L=Berlin, C=DE";
const ERIN: &str = "O=Erin, L=Madrid, C=ES";

/// The calls of a journal view, in order.
fn calls(view: &Value) -> Vec<String> {
    view["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {view}"))
        .iter()
        .map(|e| e["call"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The entries of `view` making `call`.
fn of<'a>(view: &'a Value, call: &str) -> Vec<&'a Value> {
    view["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["call"] == call)
        .collect()
}

#[test]
fn the_journal_shows_what_a_ping_a_proposal_and_a_failed_flow_did() {
    let node = Node::start();
    let api = node.api().clone();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let carol = node.vnode(CAROL, Pkg::Proposal);
    node.vnode(DAVE, Pkg::Proposal);
    node.vnode(ERIN, Pkg::Proposal);

    // A ping whose responder sleeps: initiator and responder, step by step.
    api.start_flow(&alice, "p1", "ping", &ping_body(BOB, 5, 20));
    assert_eq!(api.wait_terminal(&alice, "p1").status, "COMPLETED");
    let r = api
        .get(&format!("/api/v1/flow/{alice}/p1/journal"))
        .unwrap();
    r.expect_status(&[200], "journal of a finished ping");
    let j = &r.json;
    let ping = &j["flow"];
    assert_eq!(ping["status"]["status"], "COMPLETED", "{j}");
    assert_eq!(ping["status"]["result"], json!({"n": 6, "responder": BOB}));
    assert_eq!(ping["started"]["by"], "CLIENT");
    assert_eq!(ping["started"]["requestBody"], ping_body(BOB, 5, 20));
    assert!(ping["failedAtStep"].is_null());
    assert_eq!(calls(ping), ["initiate", "send", "receive", "close"], "{j}");
    let init = of(ping, "initiate")[0];
    assert_eq!(
        (
            &init["counterparty"],
            &init["protocol"],
            &init["versions"],
            &init["session"]
        ),
        (&json!(BOB), &json!("ping"), &json!([1]), &json!(1)),
        "{init}"
    );
    let counterparties = j["counterparties"].as_array().unwrap();
    assert_eq!(counterparties.len(), 1, "{j}");
    let responder = &counterparties[0];
    assert_eq!(responder["status"]["holdingId"], bob.as_str());
    assert_eq!(responder["status"]["flowName"], "ping_responder");
    assert_eq!(responder["status"]["status"], "COMPLETED");
    assert_eq!(
        (
            &responder["started"]["by"],
            &responder["started"]["initiator"],
            &responder["started"]["protocol"],
            &responder["started"]["version"]
        ),
        (
            &json!("SESSION_INIT"),
            &json!(ALICE),
            &json!("ping"),
            &json!(1)
        ),
        "{responder}"
    );
    assert_eq!(
        calls(responder),
        ["receive", "sleep", "send", "receive"],
        "{responder}"
    );
    // What one side sent is what the other received, byte for byte in
    // size; the responder's last receive saw the close.
    let (sent, got) = (of(ping, "send")[0], of(responder, "receive")[0]);
    assert_eq!(sent["bytes"], got["bytes"], "{sent} / {got}");
    assert!(got["payloadHex"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(
        of(responder, "send")[0]["bytes"],
        of(ping, "receive")[0]["bytes"]
    );
    assert_eq!(
        of(responder, "receive")[1]["error"],
        "closed by the counterparty"
    );
    assert!(of(responder, "sleep")[0]["at"].as_str().is_some());

    // Three parties: two sessions opened, both counterparties shown.
    api.start_flow(
        &carol,
        "prop",
        "propose",
        &json!({"counterparties": [DAVE, ERIN], "proposal": "lunch at noon"}),
    );
    assert_eq!(api.wait_terminal(&carol, "prop").status, "COMPLETED");
    let j = api
        .get(&format!("/api/v1/flow/{carol}/prop/journal"))
        .unwrap()
        .json;
    // Asked both, took the votes as they came (receive-any over both
    // sessions), then a receipt from each (the sub-flow's own protocol).
    let opened: Vec<(&Value, &Value)> = of(&j["flow"], "initiate")
        .into_iter()
        .map(|e| (&e["counterparty"], &e["protocol"]))
        .collect();
    let (proposal, receipt) = (json!("proposal"), json!("proposal-receipt"));
    assert_eq!(
        opened,
        [
            (&json!(DAVE), &proposal),
            (&json!(ERIN), &proposal),
            (&json!(DAVE), &receipt),
            (&json!(ERIN), &receipt)
        ],
        "{j}"
    );
    let votes = of(&j["flow"], "receive-any");
    assert_eq!(votes.len(), 2, "{j}");
    assert_eq!(votes[0]["sessions"], json!([1, 2]), "{j}");
    assert_eq!(
        votes[1]["sessions"].as_array().map(Vec::len),
        Some(1),
        "{j}"
    );
    let sides: Vec<(&Value, &Value)> = j["counterparties"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (&c["started"]["protocol"], &c["started"]["initiator"]))
        .collect();
    assert_eq!(sides.len(), 4, "{j}");
    assert!(sides.iter().all(|(_, from)| **from == json!(CAROL)), "{j}");
    assert_eq!(
        sides.iter().filter(|(p, _)| **p == proposal).count(),
        2,
        "{j}"
    );

    // A failed flow: the step it failed at, and why.
    api.start_flow(
        &alice,
        "f1",
        "ping",
        &ping_body("O=Nobody, L=Nowhere, C=GB", 1, 0),
    );
    assert_eq!(api.wait_terminal(&alice, "f1").status, "FAILED");
    let j = api
        .get(&format!("/api/v1/flow/{alice}/f1/journal"))
        .unwrap()
        .json;
    let failed = &j["flow"];
    assert_eq!(failed["failedAtStep"], json!(calls(failed).len()), "{j}");
    let init = of(failed, "initiate")[0];
    assert!(
        init["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("counterparty unknown")),
        "{init}"
    );
    assert!(j["counterparties"].as_array().unwrap().is_empty());

    // No such flow; a malformed id.
    api.get(&format!("/api/v1/flow/{alice}/nope/journal"))
        .unwrap()
        .expect_problem(&[404], "journal of no flow");

    // RBAC: who may read Alice's flows sees their journals, but not the
    // flows on Bob's vnode at the other end, nor Bob's own journals.
    api.post_json(
        "/api/v1/role",
        &json!({"roleName": "alice-reader", "template": "FLOW_EXECUTOR",
                "holdingIds": [alice], "flowNames": ["ping"]}),
    )
    .unwrap()
    .expect_status(&[201], "create FLOW_EXECUTOR role");
    let pw = "journal-reader-password";
    create_user(&api, "reader", pw, &["alice-reader"]);
    let r = as_user(
        &api,
        "reader",
        pw,
        "GET",
        &format!("/api/v1/flow/{alice}/p1/journal"),
        None,
    );
    r.expect_status(&[200], "Alice's reader reads Alice's journal");
    assert_eq!(
        calls(&r.json["flow"]),
        ["initiate", "send", "receive", "close"]
    );
    assert!(
        r.json["counterparties"].as_array().unwrap().is_empty(),
        "Bob's responder shown to a reader of Alice's flows: {}",
        r.text
    );
    api.start_flow(&bob, "b1", "ping", &ping_body(ALICE, 1, 0));
    assert_eq!(api.wait_terminal(&bob, "b1").status, "COMPLETED");
    as_user(
        &api,
        "reader",
        pw,
        "GET",
        &format!("/api/v1/flow/{bob}/b1/journal"),
        None,
    )
    .expect_problem(&[403], "Alice's reader reads Bob's journal");
}
