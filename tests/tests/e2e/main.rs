//! End-to-end tests: each starts one or more real `braid` nodes and drives
//! them over REST. Helpers shared by the modules live here; the harness
//! (nodes, packages, REST client) is the `braid_e2e` library.

mod cli;
mod cluster;
mod connections;
mod crash;
mod eviction;
mod flows;
mod journal;
mod kills;
mod management;
mod network;
mod network_attacks;
mod nondeterminism;
mod openapi;
mod pagination;
mod postgres;
mod rbac;
mod rbac_logins;
mod rest_input;
mod retention;
mod sandbox;
mod sandbox_cpu;
mod sandbox_limits;
mod sandbox_waits;
mod storage_faults;
mod streams;

use braid_e2e::{Api, FlowStatus};
use serde_json::{Value, json};

/// Alice: initiates pings.
pub const ALICE: &str = "O=Alice, L=London, C=GB";
/// Bob: answers pings.
pub const BOB: &str = "O=Bob, L=New York, C=US";

/// The request body of a `ping`.
pub fn ping_body(counterparty: &str, n: i64, delay_ms: u64) -> Value {
    json!({"counterparty": counterparty, "n": n, "delayMs": delay_ms})
}

/// Asserts that `st` is a COMPLETED v1 ping with exactly the expected result.
#[track_caller]
pub fn assert_ping_ok(st: &FlowStatus, n: i64, responder: &str) {
    assert_eq!(
        st.status,
        "COMPLETED",
        "ping did not complete: {}",
        st.describe()
    );
    assert_eq!(
        st.result,
        json!({"n": n + 1, "responder": responder}),
        "wrong ping result: {}",
        st.describe()
    );
    assert!(
        st.error.is_none(),
        "completed flow carries an error: {}",
        st.describe()
    );
}

/// Starts `count` pings `prefix-0..` from `from` to `to` with `n = i`;
/// returns their client request ids.
pub fn start_pings(
    api: &Api,
    from: &str,
    to: &str,
    prefix: &str,
    count: usize,
    delay_ms: u64,
) -> Vec<String> {
    (0..count)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            api.start_flow(from, &id, "ping", &ping_body(to, i as i64, delay_ms));
            id
        })
        .collect()
}

/// Asserts every ping `prefix-i` in `flows` (same order as started)
/// completed with `n = i + 1` from `responder`.
#[track_caller]
pub fn assert_pings_ok(flows: &[FlowStatus], ids: &[String], responder: &str) {
    braid_e2e::assert_all_completed(flows, "pings");
    for (i, (st, id)) in flows.iter().zip(ids).enumerate() {
        assert_eq!(st.client_request_id.as_deref(), Some(id.as_str()));
        assert_ping_ok(st, i as i64, responder);
    }
}

/// Runs two `propose` flows from `carol` to `dave` and `erin`: one they
/// accept, one they reject; asserts both results exactly.
#[track_caller]
pub fn proposals_yes_and_no(api: &Api, carol: &str, dave: &str, erin: &str) {
    api.start_flow(
        carol,
        "yes",
        "propose",
        &json!({"counterparties": [dave, erin], "proposal": "lunch at noon"}),
    );
    api.start_flow(
        carol,
        "no",
        "propose",
        &json!({"counterparties": [dave, erin], "proposal": "please reject this"}),
    );
    for (id, accepted) in [("yes", true), ("no", false)] {
        let st = api.wait_terminal(carol, id);
        assert_eq!(st.status, "COMPLETED", "{}", st.describe());
        assert_eq!(
            st.result,
            json!({"accepted": accepted, "votes": {dave: accepted, erin: accepted}}),
            "{}",
            st.describe()
        );
    }
}
