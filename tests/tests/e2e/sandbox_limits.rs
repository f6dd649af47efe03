//! What a flow can make the host hold or do is bounded by the flow's
//! limits, each failure names its limit, and a flow that failed a limit
//! stays failed across restarts (no crash loop): error texts copied to many
//! sessions, random bytes, version lists, large sends, results, log volume,
//! host calls; the payload size in `too-large`; a shadow-stack overflow is
//! `STACK_LIMIT`.

use std::time::Duration;

use braid_e2e::{Node, Pkg};
use serde_json::{Value, json};

const MALLORY: &str = "O=Mallory, L=Nowhere, C=GB";
const TRUDY: &str = "O=Trudy, L=Nowhere, C=GB";

/// Peak resident memory the node may reach in these tests. The hostile
/// flows below would each make an unbounded host allocate gigabytes.
const MAX_PEAK_RSS: u64 = 1 << 30;

#[track_caller]
fn expect_failure(st: &braid_e2e::FlowStatus, kind: &str, word: &str) {
    assert_eq!(st.status, "FAILED", "{}", st.describe());
    let e = st
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("failed without an error: {}", st.describe()));
    assert_eq!(e.kind, kind, "{}", st.describe());
    assert!(
        e.message.to_lowercase().contains(word),
        "the message should name {word:?}: {}",
        e.message
    );
}

#[test]
fn host_memory_and_host_work_are_bounded_by_the_flows_limits() {
    let mut node = Node::options()
        .arg("--max-host-calls-per-checkpoint")
        .arg("100000")
        .arg("--max-result-bytes")
        .arg("3000000")
        .arg("--flow-log-bytes-per-sec")
        .arg("8192")
        .flow_cpu_ms(20_000)
        .start();
    let mallory = node.vnode(MALLORY, Pkg::Hostile);
    let trudy = node.vnode(TRUDY, Pkg::Hostile);
    let api = node.api().clone();

    // (clientRequestId, flow, body)
    let cases: Vec<(&str, &str, Value)> = vec![
        // 400 sessions, then a 4 MiB failure reason (copied to each).
        (
            "wide",
            "fail_wide",
            json!({"counterparty": TRUDY, "sessions": 400, "errorBytes": 4 << 20}),
        ),
        // 1 MiB of random bytes 300 times before any checkpoint.
        (
            "random",
            "random_flood",
            json!({"bytes": 1 << 20, "calls": 300}),
        ),
        // One call asking for ~4 GB.
        (
            "random-huge",
            "random_exact",
            json!({"bytes": 4_000_000_000u64}),
        ),
        // A million versions, offered 1000 times.
        (
            "versions",
            "many_versions",
            json!({"counterparty": TRUDY, "versions": 1_000_000}),
        ),
        // 4000 sends of 512 KiB without suspending (2 GB).
        (
            "sends",
            "send_big",
            json!({"counterparty": TRUDY, "bytes": 512 << 10, "count": 4000}),
        ),
        ("calls", "host_call_spin", json!({})),
        ("frames", "deep_frames", json!({})),
        ("result-big", "big_result", json!({"bytes": 4_000_000})),
        ("result-ok", "big_result", json!({"bytes": 2_000_000})),
        ("random-2m", "random_exact", json!({"bytes": 2 << 20})),
        (
            "oversized",
            "send_oversized",
            json!({"counterparty": TRUDY, "bytes": 3 << 20}),
        ),
        ("logs", "log_flood", json!({"lines": 50_000, "bytes": 1000})),
    ];
    for (id, flow, body) in &cases {
        api.start_flow(&mallory, id, flow, body);
    }
    let check = |api: &braid_e2e::Api| {
        let wide = api.wait_terminal(&mallory, "wide");
        assert_eq!(wide.status, "FAILED", "{}", wide.describe());
        let reason = &wide.error.as_ref().expect("error").message;
        assert!(
            reason.len() <= 4096 && reason.contains("more bytes cut"),
            "a failure reason is stored cut to --max-error-bytes (4096), saying so: {} bytes",
            reason.len()
        );
        expect_failure(
            &api.wait_terminal(&mallory, "random"),
            "MEMORY_LIMIT",
            "random-bytes",
        );
        expect_failure(
            &api.wait_terminal(&mallory, "random-huge"),
            "MEMORY_LIMIT",
            "random-bytes",
        );
        let v = api.wait_terminal(&mallory, "versions");
        assert_eq!(v.status, "COMPLETED", "{}", v.describe());
        assert!(
            v.result.as_str().is_some_and(|s| s.contains("at most 64")),
            "a huge version list is refused, saying the limit: {}",
            v.describe()
        );
        expect_failure(
            &api.wait_terminal(&mallory, "sends"),
            "MEMORY_LIMIT",
            "outbound message",
        );
        expect_failure(
            &api.wait_terminal(&mallory, "calls"),
            "HOST_CALL_LIMIT",
            "host-call limit",
        );
        expect_failure(
            &api.wait_terminal(&mallory, "frames"),
            "STACK_LIMIT",
            "shadow stack",
        );
        expect_failure(
            &api.wait_terminal(&mallory, "result-big"),
            "RESULT_LIMIT",
            "4000002 bytes",
        );
        let ok = api.wait_terminal(&mallory, "result-ok");
        assert_eq!(ok.status, "COMPLETED", "{}", ok.describe());
        assert_eq!(
            ok.result.as_str().map(str::len),
            Some(2_000_000),
            "a result within --max-result-bytes is stored and served whole"
        );
        let r = api.wait_terminal(&mallory, "random-2m");
        assert_eq!(
            r.result,
            json!(2 << 20),
            "random-bytes returns what was asked"
        );
        let o = api.wait_terminal(&mallory, "oversized");
        assert_eq!(o.status, "COMPLETED", "{}", o.describe());
        let carried = o.result.as_u64().expect("a size");
        assert!(
            carried >= 3 << 20,
            "too-large carries the payload's size ({carried}), not the limit's (1 MiB)"
        );
        let logs = api.wait_terminal(&mallory, "logs");
        assert_eq!(logs.status, "COMPLETED", "{}", logs.describe());
    };
    check(&api);

    // The counterparties of the wide failure got a bounded reason each.
    let responders = api.wait_responders_terminal(&trudy, 400, Duration::from_secs(60));
    for r in &responders {
        if let Some(e) = &r.error {
            assert!(
                e.message.len() < 4096,
                "a responder stored a {}-byte reason",
                e.message.len()
            );
        }
    }
    node.assert_running();
    let peak = node.proc_status_bytes("VmHWM");
    assert!(
        peak < MAX_PEAK_RSS,
        "the node's resident memory peaked at {} MiB",
        peak >> 20
    );

    // The log flood was cut down and the cut was reported.
    let log = node.log_text();
    let flood_lines = log.matches("log-flood-marker").count();
    assert!(
        flood_lines < 1000,
        "{flood_lines} of 50000 log lines of one flow reached the node's log"
    );
    assert!(
        log.contains("over the log rate limit"),
        "dropped log lines are reported"
    );

    // Failed stays failed: a restart neither reruns them nor crashes.
    node.restart();
    check(node.api());
    node.assert_running();
}
