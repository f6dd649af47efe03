//! Blocking WASI calls do not escape the sandbox: Rust std's sleep in a
//! flow becomes a durable sleep (the flow suspends, holds no live slot, can
//! be killed and survives restarts); the same sleep, or a busy loop, in a
//! package's `describe` is refused at upload; a flow busy in its own code
//! is killed at once, not when its CPU budget runs out.

use std::time::{Duration, Instant};

use braid_e2e::{DEADLINE, Node, Pkg, hostile_describe_bytes, wait_until};
use serde_json::json;

use crate::{ALICE, BOB, assert_pings_ok, start_pings};

const MALLORY: &str = "O=Mallory, L=Nowhere, C=GB";

#[test]
fn std_sleep_in_a_flow_is_a_durable_sleep() {
    // Four live slots; eight flows asleep in std::thread::sleep.
    let mut node = Node::options().max_live_flows(4).flow_cpu_ms(500).start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    node.vnode(BOB, Pkg::Ping);
    let mallory = node.vnode(MALLORY, Pkg::Hostile);
    let api = node.api().clone();
    for i in 0..8 {
        api.start_flow(
            &mallory,
            &format!("sleeper-{i}"),
            "std_sleep",
            &json!({"secs": 1_000_000}),
        );
    }
    // A short std sleep that must survive a restart in the middle.
    api.start_flow(&mallory, "short", "std_sleep", &json!({"secs": 3}));
    wait_until("the sleepers to be suspended", DEADLINE, || {
        let running = api.list_flows_where(&mallory, "status=RUNNING").len();
        if running == 9 {
            Ok(())
        } else {
            Err(format!("{running} of 9 running"))
        }
    });

    // The sleepers hold no live slot: pings still run.
    let ids = start_pings(&api, &alice, BOB, "p", 10, 0);
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(60));
    assert_pings_ok(&flows, &ids, BOB);

    // Neither the CPU budget (500 ms) nor anything else ended them.
    let sleeping = api.list_flows_where(&mallory, "status=RUNNING");
    assert_eq!(sleeping.len(), 9, "{sleeping:?}");

    // A sleeping flow can be killed.
    api.kill_flow(&mallory, "sleeper-0")
        .expect_status(&[200], "kill a sleeping flow");
    let st = api.wait_terminal(&mallory, "sleeper-0");
    assert_eq!(st.status, "KILLED", "{}", st.describe());

    // After a SIGKILL and restart: the short sleep still ends after its
    // full three seconds (its clock says so), the long ones still sleep,
    // pings still run, and a kill still works.
    let t = Instant::now();
    node.restart();
    let api = node.api().clone();
    let short = api.wait_terminal(&mallory, "short");
    assert_eq!(short.status, "COMPLETED", "{}", short.describe());
    assert_eq!(short.result, json!(3), "{}", short.describe());
    let ids = start_pings(&api, &alice, BOB, "after", 10, 0);
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(60));
    assert_pings_ok(&flows, &ids, BOB);
    assert!(t.elapsed() < Duration::from_secs(60));
    for i in 1..8 {
        let st = api.status(&mallory, &format!("sleeper-{i}"));
        assert_eq!(st.status, "RUNNING", "{}", st.describe());
    }
    api.kill_flow(&mallory, "sleeper-1")
        .expect_status(&[200], "kill a sleeping flow after a restart");
    let st = api.wait_terminal(&mallory, "sleeper-1");
    assert_eq!(st.status, "KILLED", "{}", st.describe());
    node.assert_running();
}

#[test]
fn waits_and_loops_in_describe_refuse_the_upload() {
    let mut node = Node::options().flow_cpu_ms(1000).start();
    let api = node.api().clone();
    for (variant, code_word) in [("sleep", "wait"), ("spin", "cpu"), ("invalid", "unique")] {
        let bytes = hostile_describe_bytes(variant);
        let t = Instant::now();
        let resp = api
            .post_bytes("/api/v1/package", "application/wasm", bytes)
            .expect("upload");
        resp.expect_problem(&[400], &format!("upload of the {variant} describe"));
        assert_eq!(resp.json["code"], "INVALID_PACKAGE", "{}", resp.text);
        let message = resp.json["message"].as_str().unwrap_or_default();
        assert!(
            message.to_lowercase().contains(code_word),
            "{variant}: the refusal should say why ({code_word}): {message}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{variant}: the upload took {:?}",
            t.elapsed()
        );
    }
    // Still serving, and a good package uploads.
    node.vnode(ALICE, Pkg::Ping);
    node.assert_running();
}

#[test]
fn a_flow_busy_in_its_own_code_is_killed_at_once() {
    let mut node = Node::options().flow_cpu_ms(60_000).start();
    let mallory = node.vnode(MALLORY, Pkg::Hostile);
    let api = node.api().clone();
    api.start_flow(&mallory, "spin", "loop_forever", &json!({}));
    wait_until("the spinner to run", DEADLINE, || {
        match api.status(&mallory, "spin").status.as_str() {
            "RUNNING" => Ok(()),
            s => Err(s.to_string()),
        }
    });
    let t = Instant::now();
    api.kill_flow(&mallory, "spin")
        .expect_status(&[200], "kill a busy flow");
    let st = api.wait_terminal(&mallory, "spin");
    assert_eq!(st.status, "KILLED", "{}", st.describe());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the kill took {:?} (the CPU budget is 60 s)",
        t.elapsed()
    );
    node.assert_running();
}
