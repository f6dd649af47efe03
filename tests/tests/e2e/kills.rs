//! A kill, once answered, is durable and carried out whatever the flow is
//! doing: waiting (and evicted), sleeping, queued without a live slot,
//! busy in its own code, and across a crash before it could act.

use braid_e2e::{DEADLINE, Node, Pkg, wait_until};
use serde_json::json;

use crate::{ALICE, BOB, ping_body};

const MALLORY: &str = "O=Mallory, L=Nowhere, C=GB";

#[track_caller]
fn assert_killed(st: &braid_e2e::FlowStatus) {
    assert_eq!(st.status, "KILLED", "{}", st.describe());
    let e = st.error.as_ref().expect("a killed flow says why");
    assert_eq!(e.kind, "KILLED", "{}", st.describe());
}

#[test]
fn kills_of_flows_that_are_not_live_are_carried_out() {
    // One live slot: of the flows below only one has an instance at a time.
    let mut node = Node::options().max_live_flows(1).start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    node.vnode(BOB, Pkg::Ping);
    let mallory = node.vnode(MALLORY, Pkg::Hostile);
    let api = node.api().clone();

    // Pings whose responders sleep an hour: each initiator waits in
    // receive, and with one slot they are evicted in turn.
    for i in 0..4 {
        api.start_flow(
            &alice,
            &format!("waiting-{i}"),
            "ping",
            &ping_body(BOB, i, 3_600_000),
        );
    }
    // Flows asleep (braid's durable sleep via std).
    for i in 0..3 {
        api.start_flow(
            &mallory,
            &format!("asleep-{i}"),
            "std_sleep",
            &json!({"secs": 3600}),
        );
    }
    wait_until("every flow to be suspended", DEADLINE, || {
        let a = api.list_flows_where(&alice, "status=RUNNING").len();
        let m = api.list_flows_where(&mallory, "status=RUNNING").len();
        if a == 4 && m == 3 {
            Ok(())
        } else {
            Err(format!("{a}/4 pings and {m}/3 sleepers running"))
        }
    });
    for id in ["waiting-0", "waiting-1"] {
        api.kill_flow(&alice, id)
            .expect_status(&[200], "kill a waiting flow");
    }
    for id in ["asleep-0", "asleep-1"] {
        api.kill_flow(&mallory, id)
            .expect_status(&[200], "kill a sleeping flow");
    }
    for id in ["waiting-0", "waiting-1"] {
        assert_killed(&api.wait_terminal(&alice, id));
    }
    for id in ["asleep-0", "asleep-1"] {
        assert_killed(&api.wait_terminal(&mallory, id));
    }
    // A second kill of an ended flow is refused; the others carry on.
    api.kill_flow(&alice, "waiting-0")
        .expect_problem(&[409], "kill an ended flow");
    assert_eq!(api.status(&alice, "waiting-2").status, "RUNNING");
    assert_eq!(api.status(&mallory, "asleep-2").status, "RUNNING");

    // After a crash: the flows resumed by replay are killed too.
    node.restart();
    let api = node.api().clone();
    api.kill_flow(&alice, "waiting-2")
        .expect_status(&[200], "kill a flow resumed after a restart");
    api.kill_flow(&mallory, "asleep-2")
        .expect_status(&[200], "kill a sleeping flow after a restart");
    assert_killed(&api.wait_terminal(&alice, "waiting-2"));
    assert_killed(&api.wait_terminal(&mallory, "asleep-2"));
    assert_eq!(api.status(&alice, "waiting-3").status, "RUNNING");
    node.assert_running();
}

#[test]
fn a_kill_answered_before_a_crash_is_carried_out_after_it() {
    // One live slot, taken by a flow spinning in its own code (a long CPU
    // budget): a ping started after it waits in the queue, never live.
    let mut node = Node::options()
        .max_live_flows(1)
        .flow_cpu_ms(120_000)
        .start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    node.vnode(BOB, Pkg::Ping);
    let mallory = node.vnode(MALLORY, Pkg::Hostile);
    let api = node.api().clone();
    api.start_flow(&mallory, "spin", "loop_forever", &json!({}));
    wait_until("the spinner to take the slot", DEADLINE, || {
        match api.status(&mallory, "spin").status.as_str() {
            "RUNNING" => Ok(()),
            s => Err(s.to_string()),
        }
    });
    api.start_flow(&alice, "queued", "ping", &ping_body(BOB, 1, 0));
    api.kill_flow(&alice, "queued")
        .expect_status(&[200], "kill a queued flow");
    // The kill is durable once answered: crash at once.
    node.restart();
    let api = node.api().clone();
    // After the restart the spinner has the slot again; kill it (a flow
    // busy in its own code), which frees the slot for the queued ping,
    // which must then end KILLED, not complete.
    api.kill_flow(&mallory, "spin")
        .expect_status(&[200], "kill a spinning flow");
    assert_killed(&api.wait_terminal(&mallory, "spin"));
    assert_killed(&api.wait_terminal(&alice, "queued"));
    // The ping's counterparty never ran (the ping was killed before it
    // sent anything) and the node is fine.
    api.start_flow(&alice, "after", "ping", &ping_body(BOB, 2, 0));
    let st = api.wait_terminal(&alice, "after");
    assert_eq!(st.status, "COMPLETED", "{}", st.describe());
    node.assert_running();
}
