//! Replacing the code under a suspended flow: replay of the old journal with
//! new code diverges and the flow fails with a clear non-determinism error;
//! new flows then run the new code.

use std::time::Duration;

use braid_e2e::{Node, Pkg, package_bytes, wait_until};
use serde_json::json;

use crate::{ALICE, BOB, ping_body, start_pings};

#[test]
fn replaying_with_changed_code_fails_with_non_determinism() {
    const N: usize = 5;
    let node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();
    let v2 = api.upload_package(&package_bytes(Pkg::PingV2));

    let ids = start_pings(&api, &alice, BOB, "nd", N, 4000);
    // Suspended: every initiator has sent its ping and waits for the pong,
    // every responder sleeps.
    wait_until("pings to be suspended", Duration::from_secs(60), || {
        let flows = api.list_flows(&alice);
        let finished: Vec<String> = flows
            .iter()
            .filter(|f| f.is_terminal())
            .map(|f| f.describe())
            .collect();
        assert!(
            finished.is_empty(),
            "pings finished before the package switch (too slow to catch them suspended?): {finished:?}"
        );
        let running = flows.iter().filter(|f| f.status == "RUNNING").count();
        let responders = api
            .list_flows(&bob)
            .iter()
            .filter(|f| f.client_request_id.is_none())
            .count();
        if running == N && responders == N {
            Ok(())
        } else {
            Err(format!(
                "{running}/{N} initiators running, {responders}/{N} responders"
            ))
        }
    });

    let resp = api
        .put_json(
            &format!("/api/v1/maintenance/virtualnode/{alice}/package"),
            &json!({"packageChecksum": v2}),
        )
        .expect("force-switch package");
    resp.expect_status(&[200], "force-switch Alice to ping-v2");

    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(60));
    for st in &flows {
        assert_eq!(
            st.status,
            "FAILED",
            "replay with v2 should diverge: {}",
            st.describe()
        );
        let err = st
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("no error: {}", st.describe()));
        assert_eq!(err.kind, "NON_DETERMINISM", "{}", st.describe());
        assert!(
            err.message.to_lowercase().contains("step"),
            "the non-determinism message should name the diverging step: {:?}",
            err.message
        );
    }

    // Its journal shows what it did before the switch, and where replay
    // with the new code stopped.
    let j = api
        .get(&format!("/api/v1/flow/{alice}/{}/journal", ids[0]))
        .expect("journal");
    j.expect_status(&[200], "journal of a flow that failed NON_DETERMINISM");
    let flow = &j.json["flow"];
    assert_eq!(
        flow["status"]["error"]["type"], "NON_DETERMINISM",
        "{}",
        j.text
    );
    let calls: Vec<&str> = flow["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["call"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(calls, ["initiate", "send"], "{}", j.text);
    // ping-v2 takes the time first, where the journal holds the
    // initiate: replay diverged at the first entry.
    assert_eq!(flow["failedAtStep"], 0, "{}", j.text);
    // Its responder on Bob is shown beside it (still asleep, or failed
    // since: its counterparty did).
    assert_eq!(
        j.json["counterparties"].as_array().unwrap().len(),
        1,
        "{}",
        j.text
    );

    // New flows run v2 from scratch.
    api.start_flow(&alice, "v2", "ping", &ping_body(BOB, 10, 0));
    let st = api.wait_terminal(&alice, "v2");
    assert_eq!(st.status, "COMPLETED", "{}", st.describe());
    assert_eq!(
        st.result["version"],
        2,
        "not the v2 result: {}",
        st.describe()
    );
    assert_eq!(st.result["n"], 11, "{}", st.describe());
    assert_eq!(st.result["responder"], BOB, "{}", st.describe());
    assert!(
        st.result["startedAtMs"].is_u64(),
        "v2 result lacks startedAtMs: {}",
        st.describe()
    );
}

#[test]
fn check_upgrade_says_which_flows_replay_cleanly_and_where_the_others_diverge() {
    const N: usize = 3;
    let node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();
    let ids = start_pings(&api, &alice, BOB, "cu", N, 8000);
    wait_until("pings to be suspended", Duration::from_secs(60), || {
        let running = api
            .list_flows(&alice)
            .iter()
            .filter(|f| f.status == "RUNNING")
            .count();
        let responders = api
            .list_flows(&bob)
            .iter()
            .filter(|f| f.client_request_id.is_none() && f.status == "RUNNING")
            .count();
        if running == N && responders == N {
            Ok(())
        } else {
            Err(format!(
                "{running}/{N} initiators, {responders}/{N} responders"
            ))
        }
    });

    // Through the CLI: it uploads ping-v2 and checks Bob's flows. ping-v2
    // keeps ping's responder: Bob's sleeping responders replay cleanly.
    let dir = braid_e2e::fresh_dir("check-upgrade");
    let wasm = dir.join("ping-v2.wasm");
    std::fs::write(&wasm, package_bytes(Pkg::PingV2)).unwrap();
    let ca = node.ca_path();
    let cli = |vnode: &str| {
        let mut cmd = std::process::Command::new(braid_e2e::braid_bin());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BRAID_") {
                cmd.env_remove(key);
            }
        }
        cmd.args([
            "package",
            "check-upgrade",
            wasm.to_str().unwrap(),
            "--vnode",
            vnode,
        ])
        .env("BRAID_URL", api.base())
        .env("BRAID_CA", &ca)
        .env("BRAID_USER", "admin")
        .env("BRAID_PASSWORD", braid_e2e::ADMIN_PASSWORD)
        .output()
        .expect("run braid package check-upgrade")
    };
    let out = cli(&bob);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("replays cleanly").count(), N, "{text}");
    // ping-v2's initiator takes the time first: Alice's pings diverge at
    // their first entry, and the CLI says so with exit code 1.
    let out = cli(&alice);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.matches("diverges at step 0").count(), N, "{text}");

    // The REST answer, in detail.
    let v2 = api.upload_package(&package_bytes(Pkg::PingV2));
    let check = |h: &str| {
        let r = api
            .post_json(
                &format!("/api/v1/virtualnode/{h}/check-upgrade"),
                &json!({"packageChecksum": v2}),
            )
            .expect("check-upgrade");
        r.expect_status(&[200], "check-upgrade");
        r.json
    };
    let on_bob = check(&bob);
    assert_eq!(on_bob["clean"], true, "{on_bob}");
    let flows = on_bob["flows"].as_array().unwrap();
    assert_eq!(flows.len(), N, "{on_bob}");
    for f in flows {
        assert_eq!(f["verdict"], "CLEAN", "{f}");
        assert_eq!(f["flowName"], "ping_responder", "{f}");
        assert!(f["journalSteps"].as_u64().is_some_and(|n| n >= 2), "{f}");
    }
    let on_alice = check(&alice);
    assert_eq!(on_alice["clean"], false, "{on_alice}");
    let flows = on_alice["flows"].as_array().unwrap();
    assert_eq!(flows.len(), N, "{on_alice}");
    for f in flows {
        assert_eq!(f["verdict"], "DIVERGES", "{f}");
        assert_eq!(f["step"], 0, "{f}");
        let m = f["message"].as_str().unwrap_or_default();
        assert!(m.contains("initiate") && m.contains("now-millis"), "{f}");
    }
    // A package or a vnode that does not exist.
    api.post_json(
        &format!("/api/v1/virtualnode/{bob}/check-upgrade"),
        &json!({"packageChecksum": "00".repeat(32)}),
    )
    .expect("check-upgrade")
    .expect_problem(&[404], "check against an unknown package");

    // The checks ran nothing live: every ping completes, once, on ping.
    let done = api.wait_all_terminal(&alice, &ids, Duration::from_secs(60));
    for (i, st) in done.iter().enumerate() {
        crate::assert_ping_ok(st, i as i64, BOB);
    }
    let responders = api.wait_responders_terminal(&bob, N, Duration::from_secs(60));
    braid_e2e::assert_all_completed(&responders, "Bob's responders after the checks");
    let _ = std::fs::remove_dir_all(&dir);
}
