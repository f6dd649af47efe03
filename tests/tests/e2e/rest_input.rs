//! Bad REST input is answered with a 4xx JSON problem document, never obeyed
//! and never a 5xx; the node keeps running.

use std::sync::Arc;

use braid_e2e::{Node, Pkg, package_bytes, raw_request};
use serde_json::json;

use crate::{ALICE, BOB, assert_ping_ok, ping_body};

#[test]
fn bad_input_gets_a_clear_4xx_and_the_node_survives() {
    let mut node = Node::start();
    let checksum = node.api().upload_package(&package_bytes(Pkg::Ping));
    let alice = node.api().create_vnode(ALICE, &checksum);
    node.api().create_vnode(BOB, &checksum);
    let api = node.api().clone();
    let flow_path = format!("/api/v1/flow/{alice}");

    // Malformed JSON.
    let r = api
        .post_bytes(
            "/api/v1/virtualnode",
            "application/json",
            b"{\"x500Name\": ".to_vec(),
        )
        .unwrap();
    r.expect_problem(&[400], "malformed JSON (vnode)");
    let r = api
        .post_bytes(&flow_path, "application/json", b"not json at all".to_vec())
        .unwrap();
    r.expect_problem(&[400], "malformed JSON (flow start)");
    let r = api.post_json(&flow_path, &json!(["an", "array"])).unwrap();
    r.expect_problem(&[400], "JSON of the wrong shape (flow start)");

    // Missing fields.
    let r = api
        .post_json(
            "/api/v1/virtualnode",
            &json!({"x500Name": "O=Zed, L=Oslo, C=NO"}),
        )
        .unwrap();
    r.expect_problem(&[400], "vnode without packageChecksum");
    let r = api
        .post_json("/api/v1/virtualnode", &json!({"packageChecksum": checksum}))
        .unwrap();
    r.expect_problem(&[400], "vnode without x500Name");
    let r = api
        .post_json(&flow_path, &json!({"flowName": "ping", "requestBody": {}}))
        .unwrap();
    r.expect_problem(&[400], "flow start without clientRequestId");
    let r = api
        .post_json(
            &flow_path,
            &json!({"clientRequestId": "m1", "requestBody": {}}),
        )
        .unwrap();
    r.expect_problem(&[400], "flow start without flowName");

    // Bad values.
    let r = api
        .post_json(
            "/api/v1/virtualnode",
            &json!({"x500Name": "this is not an X.500 name", "packageChecksum": checksum}),
        )
        .unwrap();
    r.expect_problem(&[400], "vnode with an invalid X.500 name");
    let r = api
        .post_json(
            "/api/v1/virtualnode",
            &json!({"x500Name": "O=Zed, L=Oslo, C=NO", "packageChecksum": "00".repeat(32)}),
        )
        .unwrap();
    r.expect_problem(&[400, 404], "vnode on an unknown package");

    // Unknown vnode.
    let r = api
        .try_start_flow("abcdefabcdef", "u1", "ping", &ping_body(BOB, 1, 0))
        .unwrap();
    r.expect_problem(&[404], "flow start on an unknown vnode");
    api.get("/api/v1/flow/abcdefabcdef")
        .unwrap()
        .expect_problem(&[404], "list on an unknown vnode");
    api.get("/api/v1/flow/abcdefabcdef/u1")
        .unwrap()
        .expect_problem(&[404], "status on an unknown vnode");
    api.get(&format!("{flow_path}/never-started"))
        .unwrap()
        .expect_problem(&[404], "status of an unknown request id");
    api.get("/api/v1/flow/not-a-holding-id")
        .unwrap()
        .expect_problem(&[400, 404], "malformed holding id");

    // Unknown flow name.
    let r = api
        .try_start_flow(&alice, "u2", "no_such_flow", &json!({}))
        .unwrap();
    r.expect_problem(&[400, 404], "unknown flow name");

    // Not wasm; a core module instead of a component; a truncated component.
    for (what, bytes) in [
        ("text bytes", b"definitely not a wasm component".to_vec()),
        ("empty body", Vec::new()),
        ("a core wasm module", b"\0asm\x01\0\0\0".to_vec()),
        ("a truncated component", {
            let mut b = package_bytes(Pkg::Ping);
            b.truncate(b.len() / 2);
            b
        }),
    ] {
        let r = api
            .post_bytes("/api/v1/package", "application/wasm", bytes)
            .unwrap();
        r.expect_problem(&[400], &format!("package upload of {what}"));
    }

    // Oversized bodies.
    // Sent over a raw connection that reads while it writes: the node
    // answers 413 before the body is all sent and may close the
    // connection, which a client that only reads afterwards can miss.
    let big = json!({
        "clientRequestId": "big",
        "flowName": "ping",
        "requestBody": {"counterparty": BOB, "n": 1, "pad": "x".repeat(2 << 20)},
    });
    let r = raw_request(
        api.base(),
        "POST",
        &format!("/api/v1/flow/{alice}"),
        "application/json",
        Arc::new(serde_json::to_vec(&big).unwrap()),
    )
    .expect("2 MiB flow start got no HTTP answer");
    r.expect_problem(&[413], "2 MiB flow start body");
    let mut huge = vec![0u8; 64 << 20];
    huge[..8].copy_from_slice(b"\0asm\x0d\0\x01\0");
    let r = raw_request(
        api.base(),
        "POST",
        "/api/v1/package",
        "application/wasm",
        Arc::new(huge),
    )
    .expect("64 MiB package upload got no HTTP answer");
    r.expect_problem(&[413], "64 MiB package upload");

    // Credentials.
    let r = api
        .client()
        .get(api.url(&flow_path))
        .basic_auth("admin", Some("wrong-password"))
        .send()
        .expect("wrong password request");
    let status = r.status().as_u16();
    let body = r.text().unwrap_or_default();
    check_problem(status, &body, 401, "wrong password");
    let r = api
        .client()
        .get(api.url(&flow_path))
        .send()
        .expect("no credentials request");
    let status = r.status().as_u16();
    let body = r.text().unwrap_or_default();
    check_problem(status, &body, 401, "no credentials");
    let r = api
        .client()
        .get(api.url(&flow_path))
        .basic_auth("mallory", Some(braid_e2e::ADMIN_PASSWORD))
        .send()
        .expect("unknown user request");
    let status = r.status().as_u16();
    let body = r.text().unwrap_or_default();
    check_problem(status, &body, 401, "unknown user");
    // A request refused for credentials does nothing.
    let r = api
        .client()
        .post(api.url(&flow_path))
        .basic_auth("admin", Some("wrong-password"))
        .json(&json!({"clientRequestId": "sneaky", "flowName": "ping", "requestBody": ping_body(BOB, 1, 0)}))
        .send()
        .expect("unauthenticated start");
    assert_eq!(r.status().as_u16(), 401, "unauthenticated flow start");
    assert!(
        api.try_status(&alice, "sneaky").unwrap().is_none(),
        "an unauthenticated request started a flow"
    );

    // Nothing above created a flow, and the node still works.
    node.assert_running();
    assert!(
        api.list_flows(&alice).is_empty(),
        "bad requests created flows"
    );
    api.start_flow(&alice, "ok", "ping", &ping_body(BOB, 5, 0));
    assert_ping_ok(&api.wait_terminal(&alice, "ok"), 5, BOB);
    node.assert_running();
}

#[track_caller]
fn check_problem(status: u16, body: &str, expected: u16, what: &str) {
    assert_eq!(status, expected, "{what}: body {body}");
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {body:?}"));
    assert!(
        v["code"].as_str().is_some_and(|c| !c.is_empty())
            && v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: error body lacks code/message: {body}"
    );
}
