//! Hostile flows hit each sandbox limit and fail with the matching error,
//! while well-behaved flows next to them complete and the node keeps
//! answering.

use std::time::Duration;

use braid_e2e::{Node, Pkg};
use serde_json::json;

use crate::{ALICE, BOB, assert_ping_ok, assert_pings_ok, ping_body, start_pings};

const MALLORY: &str = "O=Mallory, L=Nowhere, C=GB";
const TRUDY: &str = "O=Trudy, L=Nowhere, C=GB";

#[test]
fn hostile_flows_fail_with_the_limit_they_hit() {
    let mut node = Node::options()
        .flow_memory_mib(32)
        .flow_cpu_ms(500)
        .flow_stack_kib(256)
        .max_outbound_per_checkpoint(1000)
        .start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    node.vnode(BOB, Pkg::Ping);
    let mallory = node.vnode(MALLORY, Pkg::Hostile);
    // The flood goes to another hostile vnode, so whatever responder the
    // package has for it exists at the other end.
    node.vnode(TRUDY, Pkg::Hostile);
    let api = node.api().clone();

    // (flow, body, expected error type, word the message must contain)
    let hostile = [
        ("loop_forever", json!({}), "CPU_LIMIT", "cpu"),
        ("grow_memory", json!({}), "MEMORY_LIMIT", "memory"),
        ("recurse", json!({}), "STACK_LIMIT", "stack"),
        (
            "send_flood",
            json!({"counterparty": TRUDY}),
            "OUTBOUND_LIMIT",
            "outbound",
        ),
    ];
    for (flow, body, _, _) in &hostile {
        api.start_flow(&mallory, flow, flow, body);
    }
    // Well-behaved neighbours, started while the hostile flows run.
    let ids = start_pings(&api, &alice, BOB, "n", 10, 0);

    for (flow, _, code, word) in &hostile {
        let st = api.wait_terminal(&mallory, flow);
        assert_eq!(st.status, "FAILED", "{flow} should fail: {}", st.describe());
        let err = st
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{flow} failed without an error: {}", st.describe()));
        assert_eq!(
            err.kind,
            *code,
            "{flow}: wrong error type: {}",
            st.describe()
        );
        assert!(
            err.message.to_lowercase().contains(word),
            "{flow}: error message should name the {word} limit: {:?}",
            err.message
        );
    }

    // A panic is the flow's own failure, explained by the panic message.
    api.start_flow(&mallory, "panic", "panic", &json!({}));
    let st = api.wait_terminal(&mallory, "panic");
    assert_eq!(st.status, "FAILED", "panic should fail: {}", st.describe());
    let err = st.error.as_ref().expect("panic failed without an error");
    assert!(
        ["FLOW_FAILED", "TRAP"].contains(&err.kind.as_str()),
        "panic: wrong error type: {}",
        st.describe()
    );
    assert!(
        err.message.contains("deliberate panic"),
        "panic: the message should carry the panic message: {:?}",
        err.message
    );

    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(60));
    assert_pings_ok(&flows, &ids, BOB);

    // The node survived and still runs flows.
    node.assert_running();
    api.start_flow(&alice, "after", "ping", &ping_body(BOB, 99, 0));
    assert_ping_ok(&api.wait_terminal(&alice, "after"), 99, BOB);
    node.assert_running();
}
