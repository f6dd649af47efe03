//! The management API: upgrading a vnode's package under suspended flows,
//! killing a flow (and its counterparty hearing of it), disabling flow
//! starts, getting and deleting packages, the status filter of the flow
//! listing, the Server-Sent Events status streams, `/metrics` and
//! `/api/v1/health`.

use std::io::{BufRead as _, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use braid_e2e::{Api, FlowStatus, Node, Pkg, Resp, package_bytes, wait_until};
use serde_json::{Value, json};

use crate::{ALICE, BOB, assert_ping_ok, assert_pings_ok, ping_body, start_pings};

/// A well-formed checksum no package has.
const UNKNOWN_CHECKSUM: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Waits until the `n` pings of `alice` have all started and Bob has a
/// responder for each, none of them finished: every exchange is suspended
/// mid-way (initiator waiting for the pong, responder asleep).
fn wait_suspended(api: &Api, alice: &str, bob: &str, n: usize) {
    wait_until("pings to be suspended", Duration::from_secs(60), || {
        let flows = api.list_flows(alice);
        let finished: Vec<String> = flows
            .iter()
            .filter(|f| f.is_terminal())
            .map(FlowStatus::describe)
            .collect();
        assert!(
            finished.is_empty(),
            "pings finished before they could be caught suspended: {finished:?}"
        );
        let running = flows.iter().filter(|f| f.status == "RUNNING").count();
        let responders: Vec<FlowStatus> = api
            .list_flows(bob)
            .into_iter()
            .filter(|f| f.client_request_id.is_none())
            .collect();
        assert!(
            responders.iter().all(|f| !f.is_terminal()),
            "a responder finished before it could be caught asleep: {responders:?}"
        );
        if running == n && responders.len() == n {
            Ok(())
        } else {
            Err(format!(
                "{running}/{n} initiators running, {}/{n} responders",
                responders.len()
            ))
        }
    });
}

/// `PUT /api/v1/virtualnode/{holding}/package`; panics unless `200` with
/// the vnode now on `checksum`.
fn upgrade(api: &Api, holding: &str, checksum: &str) {
    let resp = api
        .put_json(
            &format!("/api/v1/virtualnode/{holding}/package"),
            &json!({"packageChecksum": checksum}),
        )
        .expect("upgrade vnode");
    resp.expect_status(&[200], &format!("upgrade {holding} to {checksum}"));
    assert_eq!(resp.json["holdingId"], holding, "{}", resp.text);
    assert_eq!(resp.json["packageChecksum"], checksum, "{}", resp.text);
    let resp = api
        .get(&format!("/api/v1/virtualnode/{holding}"))
        .expect("get vnode");
    resp.expect_status(&[200], "get vnode after upgrade");
    assert_eq!(
        resp.json["packageChecksum"], checksum,
        "the vnode does not show the package it was upgraded to: {}",
        resp.text
    );
}

/// Asserts `st` is a COMPLETED `ping` that ran ping-v2's code.
#[track_caller]
fn assert_ping_v2(st: &FlowStatus, n: i64, responder: &str) {
    assert_eq!(st.status, "COMPLETED", "{}", st.describe());
    assert_eq!(
        st.result["version"],
        2,
        "not the v2 result: {}",
        st.describe()
    );
    assert_eq!(st.result["n"], n + 1, "{}", st.describe());
    assert_eq!(st.result["responder"], responder, "{}", st.describe());
}

/// `PUT /api/v1/virtualnode/{holding}/state`.
fn set_flow_starts(api: &Api, holding: &str, enabled: bool) -> Resp {
    api.put_json(
        &format!("/api/v1/virtualnode/{holding}/state"),
        &json!({"flowStartsEnabled": enabled}),
    )
    .expect("set vnode state")
}

/// Authenticated `DELETE`.
fn delete(api: &Api, path: &str) -> Resp {
    let url = api.url(path);
    api.send(|c| c.delete(url)).expect("DELETE")
}

/// `GET /api/v1/flow/{holding}?status=…`: the raw answer.
fn list_with_status(api: &Api, holding: &str, status: &str) -> Resp {
    api.get(&format!("/api/v1/flow/{holding}?status={status}"))
        .expect("list flows by status")
}

/// The flows of a `200` listing.
fn listed(resp: &Resp, what: &str) -> Vec<FlowStatus> {
    resp.expect_status(&[200], what);
    resp.json["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no `flows` array: {}", resp.text))
        .iter()
        .map(|v| {
            serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("{what}: not a flow status ({e}): {v}"))
        })
        .collect()
}

/// The client request ids of `flows` (`<responder>` for responders),
/// sorted.
fn ids(flows: &[FlowStatus]) -> Vec<String> {
    let mut ids: Vec<String> = flows
        .iter()
        .map(|f| {
            f.client_request_id
                .clone()
                .unwrap_or_else(|| "<responder>".into())
        })
        .collect();
    ids.sort();
    ids
}

// ---------------------------------------------------------------------------
// Upgrade
// ---------------------------------------------------------------------------

/// Starts `N` slow pings, catches them suspended and upgrades Alice to
/// ping-v2; with `restart`, the node is SIGKILLed and restarted right after
/// the upgrade so the old flows resume by replay. The old pings must finish
/// on v1 (exactly the v1 result), new ones run v2.
fn upgrade_while_suspended(restart: bool) {
    const N: usize = 5;
    let mut node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();
    let v1 = api.upload_package(&package_bytes(Pkg::Ping));
    let v2 = api.upload_package(&package_bytes(Pkg::PingV2));
    assert_ne!(v1, v2, "ping and ping-v2 have the same checksum");

    // Long enough to upgrade (and restart) while every responder sleeps.
    let delay = if restart { 8000 } else { 3000 };
    let old = start_pings(&api, &alice, BOB, "old", N, delay);
    wait_suspended(&api, &alice, &bob, N);

    upgrade(&api, &alice, &v2);

    let api = if restart {
        let unfinished = api
            .list_flows(&alice)
            .iter()
            .filter(|f| !f.is_terminal())
            .count();
        assert_eq!(
            unfinished, N,
            "old pings finished before the restart, so it proves nothing"
        );
        node.kill();
        node.restart();
        node.api().clone()
    } else {
        // New flows run the new code even while the old ones still run.
        api.start_flow(&alice, "new-0", "ping", &ping_body(BOB, 100, 0));
        let st = api.wait_terminal(&alice, "new-0");
        assert_ping_v2(&st, 100, BOB);
        api
    };

    let flows = api.wait_all_terminal(&alice, &old, Duration::from_secs(120));
    // Exactly `{"n", "responder"}`: no `version`, so v1's code ran them.
    assert_pings_ok(&flows, &old, BOB);

    api.start_flow(&alice, "new-1", "ping", &ping_body(BOB, 200, 0));
    let st = api.wait_terminal(&alice, "new-1");
    assert_ping_v2(&st, 200, BOB);
    assert!(
        st.result["startedAtMs"].is_u64(),
        "v2 result lacks startedAtMs: {}",
        st.describe()
    );

    let expected = if restart { N + 1 } else { N + 2 };
    let responders = api.wait_responders_terminal(&bob, expected, Duration::from_secs(60));
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");

    // Upgrade errors: unknown package, malformed checksum, unknown vnode.
    let resp = api
        .put_json(
            &format!("/api/v1/virtualnode/{alice}/package"),
            &json!({"packageChecksum": UNKNOWN_CHECKSUM}),
        )
        .expect("upgrade to unknown package");
    resp.expect_problem(&[404], "upgrade to a package never uploaded");
    let resp = api
        .put_json(
            &format!("/api/v1/virtualnode/{alice}/package"),
            &json!({"packageChecksum": "not-a-checksum"}),
        )
        .expect("upgrade with malformed checksum");
    resp.expect_problem(&[400], "upgrade with a malformed checksum");
    let resp = api
        .put_json(
            "/api/v1/virtualnode/000000000000/package",
            &json!({"packageChecksum": v1}),
        )
        .expect("upgrade unknown vnode");
    resp.expect_problem(&[404], "upgrade an unknown vnode");
    node.assert_running();
}

#[test]
fn upgrade_while_suspended_old_flows_finish_on_old_code() {
    upgrade_while_suspended(false);
}

#[test]
fn upgrade_while_suspended_survives_restart() {
    upgrade_while_suspended(true);
}

// ---------------------------------------------------------------------------
// Kill
// ---------------------------------------------------------------------------

#[test]
fn kill_ends_flow_and_its_counterparty() {
    let node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();

    // The responder sleeps long enough to be asleep at the kill; it only
    // sees the session error when it next uses the session, after waking.
    api.start_flow(&alice, "victim", "ping", &ping_body(BOB, 1, 20_000));
    wait_suspended(&api, &alice, &bob, 1);

    let resp = api
        .post_json(&format!("/api/v1/flow/{alice}/victim/kill"), &json!({}))
        .expect("kill");
    resp.expect_status(&[200], "kill a suspended flow");
    assert_eq!(resp.json["clientRequestId"], "victim", "{}", resp.text);
    assert_eq!(resp.json["holdingId"], alice.as_str(), "{}", resp.text);
    assert!(
        resp.json["status"].is_string(),
        "kill answer has no status: {}",
        resp.text
    );
    let killed_at = Instant::now();

    let st = api.wait_terminal(&alice, "victim");
    assert_eq!(st.status, "KILLED", "{}", st.describe());
    let err = st
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("killed flow has no error: {}", st.describe()));
    assert_eq!(err.kind, "KILLED", "{}", st.describe());
    assert!(!err.message.is_empty(), "{}", st.describe());
    assert!(st.result.is_null(), "{}", st.describe());

    // Bob's responder is told through its session and ends too.
    let responders = api.wait_responders_terminal(&bob, 1, Duration::from_secs(120));
    assert_eq!(responders.len(), 1, "{responders:?}");
    let r = &responders[0];
    assert!(
        r.status == "FAILED" || r.status == "KILLED",
        "the killed flow's counterparty should fail: {}",
        r.describe()
    );
    let err = r
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("the counterparty ended without an error: {}", r.describe()));
    let msg = err.message.to_lowercase();
    assert!(
        msg.contains("counterparty") || msg.contains("session"),
        "the counterparty's error should say its session failed: {}",
        r.describe()
    );
    eprintln!(
        "[e2e] responder ended {:.1?} after the kill: {}",
        killed_at.elapsed(),
        r.describe()
    );

    // Killing it again, or a flow that completed: 409. Unknown: 404.
    let again = api
        .post_json(&format!("/api/v1/flow/{alice}/victim/kill"), &json!({}))
        .expect("kill again");
    again.expect_problem(&[409], "kill a killed flow");
    api.start_flow(&alice, "done", "ping", &ping_body(BOB, 5, 0));
    assert_ping_ok(&api.wait_terminal(&alice, "done"), 5, BOB);
    let resp = api
        .post_json(&format!("/api/v1/flow/{alice}/done/kill"), &json!({}))
        .expect("kill completed");
    resp.expect_problem(&[409], "kill a completed flow");
    assert_ping_ok(&api.status(&alice, "done"), 5, BOB);
    let resp = api
        .post_json(&format!("/api/v1/flow/{alice}/nosuch/kill"), &json!({}))
        .expect("kill unknown");
    resp.expect_problem(&[404], "kill an unknown flow");
    assert_eq!(
        api.status(&alice, "victim").status,
        "KILLED",
        "a second kill changed the flow"
    );
}

// ---------------------------------------------------------------------------
// Disable flow starts
// ---------------------------------------------------------------------------

#[test]
fn disabled_vnode_refuses_starts_and_running_flows_continue() {
    let node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();

    api.start_flow(&alice, "running", "ping", &ping_body(BOB, 1, 3000));
    wait_suspended(&api, &alice, &bob, 1);

    let resp = set_flow_starts(&api, &alice, false);
    resp.expect_status(&[200], "disable flow starts");
    assert_eq!(resp.json["holdingId"], alice.as_str(), "{}", resp.text);
    assert_eq!(resp.json["flowStartsEnabled"], false, "{}", resp.text);

    let resp = api
        .try_start_flow(&alice, "refused", "ping", &ping_body(BOB, 2, 0))
        .expect("start while disabled");
    resp.expect_problem(&[409], "start a flow on a vnode with starts disabled");
    assert!(
        api.try_status(&alice, "refused")
            .expect("status of refused")
            .is_none(),
        "a refused start left a flow behind"
    );
    // Only client starts are refused: Bob's ping still gets an answer from
    // a responder flow on Alice.
    api.start_flow(&bob, "bob-ok", "ping", &ping_body(ALICE, 3, 0));

    // The flow already running finishes normally.
    assert_ping_ok(&api.wait_terminal(&alice, "running"), 1, BOB);
    assert_ping_ok(&api.wait_terminal(&bob, "bob-ok"), 3, ALICE);

    // Still refused after the running flow ended; accepted once enabled,
    // under the same clientRequestId the refusal did not use up.
    let resp = api
        .try_start_flow(&alice, "refused", "ping", &ping_body(BOB, 2, 0))
        .expect("start while disabled");
    resp.expect_problem(&[409], "start again while disabled");
    set_flow_starts(&api, &alice, true).expect_status(&[200], "enable flow starts");
    api.start_flow(&alice, "refused", "ping", &ping_body(BOB, 2, 0));
    assert_ping_ok(&api.wait_terminal(&alice, "refused"), 2, BOB);

    // Bad requests.
    let resp = api
        .put_json(
            &format!("/api/v1/virtualnode/{alice}/state"),
            &json!({"flowStartsEnabled": "no"}),
        )
        .expect("bad state");
    resp.expect_problem(&[400], "flowStartsEnabled not a boolean");
    let resp = api
        .put_json(&format!("/api/v1/virtualnode/{alice}/state"), &json!({}))
        .expect("missing field");
    resp.expect_problem(&[400], "flowStartsEnabled missing");
    let resp = set_flow_starts(&api, "000000000000", false);
    resp.expect_problem(&[404], "disable starts on an unknown vnode");
}

// ---------------------------------------------------------------------------
// Packages: get and delete
// ---------------------------------------------------------------------------

#[test]
fn package_get_and_delete_only_when_unused() {
    let node = Node::start();
    let api = node.api().clone();
    let v1_bytes = package_bytes(Pkg::Ping);
    let v1 = api.upload_package(&v1_bytes);
    let v2 = api.upload_package(&package_bytes(Pkg::PingV2));
    let alice = api.create_vnode(ALICE, &v1);
    let bob = api.create_vnode(BOB, &v1);

    // Get.
    let resp = api.get(&format!("/api/v1/package/{v1}")).expect("get v1");
    resp.expect_status(&[200], "get a package");
    assert_eq!(resp.json["checksum"], v1.as_str(), "{}", resp.text);
    let flows = resp.json["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("package has no flows: {}", resp.text));
    assert!(
        flows.iter().any(|f| f["name"] == "ping"),
        "package lacks `ping`: {}",
        resp.text
    );
    if let Some(size) = resp.json.get("size") {
        assert_eq!(size, &json!(v1_bytes.len()), "{}", resp.text);
    }
    api.get(&format!("/api/v1/package/{UNKNOWN_CHECKSUM}"))
        .expect("get unknown")
        .expect_problem(&[404], "get an unknown package");
    api.get("/api/v1/package/not-a-checksum")
        .expect("get malformed")
        .expect_problem(&[400, 404], "get a malformed checksum");

    // In use by vnodes: 409.
    delete(&api, &format!("/api/v1/package/{v1}"))
        .expect_problem(&[409], "delete a package vnodes use");

    // Move both vnodes to v2 while a v1 ping is suspended: v1 is now only
    // used by unfinished flows, still 409.
    api.start_flow(&alice, "old", "ping", &ping_body(BOB, 1, 3000));
    wait_suspended(&api, &alice, &bob, 1);
    upgrade(&api, &alice, &v2);
    upgrade(&api, &bob, &v2);
    let resp = delete(&api, &format!("/api/v1/package/{v1}"));
    let unfinished = api
        .list_flows(&alice)
        .iter()
        .chain(api.list_flows(&bob).iter())
        .filter(|f| !f.is_terminal())
        .count();
    assert!(
        unfinished > 0,
        "the v1 flows finished too early to test deleting their package"
    );
    resp.expect_problem(&[409], "delete a package unfinished flows run");
    api.get(&format!("/api/v1/package/{v1}"))
        .expect("get v1")
        .expect_status(&[200], "a refused delete kept the package");

    // Once they are done: 204, then gone.
    assert_ping_ok(&api.wait_terminal(&alice, "old"), 1, BOB);
    let responders = api.wait_responders_terminal(&bob, 1, Duration::from_secs(60));
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");
    let resp = delete(&api, &format!("/api/v1/package/{v1}"));
    resp.expect_status(&[204], "delete an unused package");
    assert!(resp.text.is_empty(), "204 with a body: {}", resp.text);
    api.get(&format!("/api/v1/package/{v1}"))
        .expect("get deleted")
        .expect_problem(&[404], "get a deleted package");
    let listing = api.get("/api/v1/package").expect("list packages");
    listing.expect_status(&[200], "list packages");
    assert!(
        !listing.text.contains(&v1),
        "the deleted package is still listed: {}",
        listing.text
    );
    assert!(listing.text.contains(&v2), "{}", listing.text);
    delete(&api, &format!("/api/v1/package/{v1}"))
        .expect_problem(&[404], "delete a deleted package");
    delete(&api, &format!("/api/v1/package/{UNKNOWN_CHECKSUM}"))
        .expect_problem(&[404], "delete an unknown package");
    delete(&api, &format!("/api/v1/package/{v2}"))
        .expect_problem(&[409], "delete the package vnodes now use");

    // The vnodes still work on v2, and v1 can be uploaded again.
    api.start_flow(&alice, "after", "ping", &ping_body(BOB, 2, 0));
    assert_ping_v2(&api.wait_terminal(&alice, "after"), 2, BOB);
    assert_eq!(api.upload_package(&v1_bytes), v1);
}

// ---------------------------------------------------------------------------
// Status filter
// ---------------------------------------------------------------------------

#[test]
fn flow_listing_filters_by_status() {
    let node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();

    api.start_flow(&alice, "done", "ping", &ping_body(BOB, 1, 0));
    assert_ping_ok(&api.wait_terminal(&alice, "done"), 1, BOB);
    api.start_flow(
        &alice,
        "failed",
        "ping",
        &ping_body("O=Nobody, L=Nowhere, C=XX", 1, 0),
    );
    let st = api.wait_terminal(&alice, "failed");
    assert_eq!(st.status, "FAILED", "{}", st.describe());
    api.start_flow(&alice, "slow", "ping", &ping_body(BOB, 1, 5000));
    wait_until(
        "`slow` and its responder to run",
        Duration::from_secs(30),
        || {
            let st = api.status(&alice, "slow");
            let responders = api
                .list_flows(&bob)
                .into_iter()
                .filter(|f| f.client_request_id.is_none() && f.status == "RUNNING")
                .count();
            if st.status == "RUNNING" && responders == 1 {
                Ok(())
            } else {
                Err(format!(
                    "{}; {responders} running responders",
                    st.describe()
                ))
            }
        },
    );

    let running = listed(&list_with_status(&api, &alice, "RUNNING"), "RUNNING");
    let completed = listed(&list_with_status(&api, &alice, "COMPLETED"), "COMPLETED");
    let failed = listed(&list_with_status(&api, &alice, "FAILED"), "FAILED");
    let killed = listed(&list_with_status(&api, &alice, "KILLED"), "KILLED");
    let all_done = api.status(&alice, "slow").is_terminal();
    assert!(!all_done, "`slow` finished before the listings were taken");
    assert_eq!(ids(&running), ["slow"], "RUNNING: {running:?}");
    assert_eq!(ids(&completed), ["done"], "COMPLETED: {completed:?}");
    assert_eq!(ids(&failed), ["failed"], "FAILED: {failed:?}");
    assert!(killed.is_empty(), "KILLED: {killed:?}");
    for (flows, status) in [(&running, "RUNNING"), (&completed, "COMPLETED")] {
        for f in flows {
            assert_eq!(f.status, status, "{}", f.describe());
            assert_eq!(f.holding_id, alice, "{}", f.describe());
        }
    }
    // Responder flows are filtered too.
    let bob_running = listed(&list_with_status(&api, &bob, "RUNNING"), "Bob RUNNING");
    assert_eq!(
        ids(&bob_running),
        ["<responder>"],
        "Bob RUNNING: {bob_running:?}"
    );

    list_with_status(&api, &alice, "SLEEPING").expect_problem(&[400], "an unknown status");
    list_with_status(&api, &alice, "").expect_problem(&[400], "an empty status");

    assert_ping_ok(&api.wait_terminal(&alice, "slow"), 1, BOB);
    let running = listed(&list_with_status(&api, &alice, "RUNNING"), "RUNNING");
    assert!(running.is_empty(), "RUNNING after the end: {running:?}");
    let completed = listed(&list_with_status(&api, &alice, "COMPLETED"), "COMPLETED");
    assert_eq!(ids(&completed), ["done", "slow"], "{completed:?}");
}

// ---------------------------------------------------------------------------
// Metrics and health
// ---------------------------------------------------------------------------

/// The value of the sample `name` (with its labels, exactly as rendered,
/// e.g. `braid_flows_live` or `x{holding_id="…"}`), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of every sample of the metric family `name` (any labels).
fn sample_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_and_health() {
    let node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();

    let ids = start_pings(&api, &alice, BOB, "m", 3, 0);
    api.start_flow(
        &alice,
        "nobody",
        "ping",
        &ping_body("O=Nobody, L=Nowhere, C=XX", 1, 0),
    );
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(60));
    assert_pings_ok(&flows, &ids, BOB);
    let st = api.wait_terminal(&alice, "nobody");
    assert_eq!(st.status, "FAILED", "{}", st.describe());
    api.wait_responders_terminal(&bob, 3, Duration::from_secs(60));

    // No credentials needed.
    let resp = api
        .client()
        .get(api.url("/metrics"))
        .send()
        .expect("GET /metrics");
    assert_eq!(resp.status().as_u16(), 200, "/metrics without credentials");
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ctype.starts_with("text/plain"), "content type {ctype:?}");
    let text = resp.text().expect("metrics body");
    let get = |name: &str| {
        sample(&text, name).unwrap_or_else(|| panic!("no sample {name} in /metrics:\n{text}"))
    };
    let by = |family: &str, holding: &str| get(&format!("{family}{{holding_id=\"{holding}\"}}"));

    assert_eq!(by("braid_flows_started_total", &alice), 4.0, "\n{text}");
    assert_eq!(by("braid_flows_completed_total", &alice), 3.0, "\n{text}");
    assert_eq!(by("braid_flows_failed_total", &alice), 1.0, "\n{text}");
    // Bob's responders count as started and completed flows of Bob.
    assert_eq!(by("braid_flows_started_total", &bob), 3.0, "\n{text}");
    assert_eq!(by("braid_flows_completed_total", &bob), 3.0, "\n{text}");
    assert_eq!(by("braid_flows_failed_total", &bob), 0.0, "\n{text}");
    assert!(
        sample_sum(&text, "braid_checkpoint_commit_seconds_bucket") > 0.0,
        "no checkpoint commit was observed:\n{text}"
    );
    let inf = get("braid_checkpoint_commit_seconds_bucket{le=\"+Inf\"}");
    assert_eq!(
        get("braid_checkpoint_commit_seconds_count"),
        inf,
        "count differs from the +Inf bucket:\n{text}"
    );
    assert!(get("braid_flows_live") >= 0.0);
    assert!(
        get("braid_rest_request_seconds_count") > 0.0,
        "no REST request was observed:\n{text}"
    );
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().unwrap_or_default();
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "malformed sample line {line:?}"
        );
    }

    // Health: no credentials, 200, UP.
    let resp = api
        .client()
        .get(api.url("/api/v1/health"))
        .send()
        .expect("GET health");
    assert_eq!(resp.status().as_u16(), 200, "health without credentials");
    let body: Value = resp.json().expect("health is JSON");
    assert_eq!(body["status"], "UP", "{body}");
}

// ---------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------

/// One `status` event of a stream.
#[derive(Debug)]
struct SseEvent {
    event: String,
    data: Value,
}

/// Reads SSE events from `body` and sends each to `tx` until the stream
/// ends (then sends `None`) or the receiver hangs up.
fn pump_events(body: reqwest::blocking::Response, tx: mpsc::Sender<Option<SseEvent>>) {
    let mut reader = BufReader::new(body);
    let mut event = String::new();
    let mut data = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => {
                let _ = tx.send(None);
                return;
            }
            Ok(_) => {}
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if !data.is_empty() || !event.is_empty() {
                let parsed = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data:?}"));
                let ev = SseEvent {
                    event: std::mem::take(&mut event),
                    data: parsed,
                };
                data.clear();
                if tx.send(Some(ev)).is_err() {
                    return;
                }
            }
        } else if l.starts_with(':') {
            // Keep-alive comment.
        } else if let Some(v) = l.strip_prefix("event:") {
            event = v.trim_start().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
}

/// Opens an SSE stream (authenticated) and pumps it on a thread; returns
/// once the response head arrived, i.e. once the node subscribed.
fn open_stream(api: &Api, path: &str) -> mpsc::Receiver<Option<SseEvent>> {
    let resp = api
        .client()
        .get(api.url(path))
        .basic_auth(braid_e2e::ADMIN_USER, Some(braid_e2e::ADMIN_PASSWORD))
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .timeout(Duration::from_secs(120))
        .send()
        .expect("open event stream");
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ctype.starts_with("text/event-stream"),
        "GET {path}: content type {ctype:?}"
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || pump_events(resp, tx));
    rx
}

/// The next item of a stream within `timeout`; panics on a timeout.
fn next_event(
    rx: &mpsc::Receiver<Option<SseEvent>>,
    timeout: Duration,
    seen: &[String],
) -> Option<SseEvent> {
    rx.recv_timeout(timeout)
        .unwrap_or_else(|e| panic!("no event within {timeout:?} ({e}); seen so far: {seen:?}"))
}

#[test]
fn status_events_for_one_flow_and_one_vnode() {
    let node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let _bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();

    // The vnode stream, opened first: it must show the flow's changes.
    let vnode_rx = open_stream(&api, &format!("/api/v1/flow/{alice}/events"));

    // One flow's stream: the current status first, then changes, closing
    // after the terminal one.
    api.start_flow(&alice, "sse", "ping", &ping_body(BOB, 7, 500));
    let rx = open_stream(&api, &format!("/api/v1/flow/{alice}/sse/events"));
    let mut seen: Vec<String> = Vec::new();
    let mut last = None;
    while let Some(ev) = next_event(&rx, Duration::from_secs(60), &seen) {
        assert_eq!(ev.event, "status", "unexpected event: {ev:?}");
        let st: FlowStatus = serde_json::from_value(ev.data.clone())
            .unwrap_or_else(|e| panic!("event data is not a flow status ({e}): {}", ev.data));
        assert_eq!(st.client_request_id.as_deref(), Some("sse"), "{ev:?}");
        assert_eq!(st.holding_id, alice, "{ev:?}");
        assert!(
            !last.as_ref().is_some_and(FlowStatus::is_terminal),
            "an event after the terminal one: {seen:?} then {}",
            st.describe()
        );
        seen.push(st.status.clone());
        last = Some(st);
    }
    let last = last.expect("the stream sent no event");
    assert!(
        seen.len() >= 2 && !braid_e2e::TERMINAL.contains(&seen[0].as_str()),
        "expected a non-terminal status and then the end, got {seen:?}"
    );
    assert_ping_ok(&last, 7, BOB);

    // A stream opened after the end: the terminal status, then the end.
    let rx = open_stream(&api, &format!("/api/v1/flow/{alice}/sse/events"));
    let ev = next_event(&rx, Duration::from_secs(30), &[]).expect("one event");
    assert_eq!(ev.data["status"], "COMPLETED", "{ev:?}");
    assert!(
        next_event(&rx, Duration::from_secs(30), &[]).is_none(),
        "the stream of an ended flow did not close after its status"
    );

    // The vnode stream saw the same flow end, and only Alice's flows.
    let mut vnode_seen = Vec::new();
    loop {
        let ev = next_event(&vnode_rx, Duration::from_secs(60), &vnode_seen)
            .unwrap_or_else(|| panic!("the vnode stream closed: {vnode_seen:?}"));
        assert_eq!(ev.event, "status", "{ev:?}");
        assert_eq!(
            ev.data["holdingId"],
            alice.as_str(),
            "another vnode's flow: {ev:?}"
        );
        vnode_seen.push(format!(
            "{} {}",
            ev.data["clientRequestId"], ev.data["status"]
        ));
        if ev.data["clientRequestId"] == "sse" && ev.data["status"] == "COMPLETED" {
            assert_eq!(ev.data["result"], json!({"n": 8, "responder": BOB}));
            break;
        }
    }

    // Unknown flow or vnode: 404; no credentials: 401.
    api.get(&format!("/api/v1/flow/{alice}/nosuch/events"))
        .expect("events of unknown flow")
        .expect_problem(&[404], "events of an unknown flow");
    api.get("/api/v1/flow/000000000000/events")
        .expect("events of unknown vnode")
        .expect_problem(&[404], "events of an unknown vnode");
    let resp = api
        .client()
        .get(api.url(&format!("/api/v1/flow/{alice}/sse/events")))
        .send()
        .expect("events without credentials");
    assert_eq!(resp.status().as_u16(), 401, "events without credentials");
}
