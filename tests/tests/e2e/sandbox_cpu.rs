//! The CPU budget charges the CPU time of a flow's own code: flows that
//! each need well under their budget alone all complete when they share
//! the machine's cores, however long they wait for a core.

use std::time::{Duration, Instant};

use braid_e2e::{Node, Pkg};
use serde_json::json;

const MALLORY: &str = "O=Mallory, L=Nowhere, C=GB";
/// The budget each flow gets.
const BUDGET_MS: u64 = 2000;
/// How long one flow's work takes alone (calibrated below): well inside
/// the budget, but more than a quarter of it, so that eight flows sharing
/// two cores would be charged more than the budget if waiting counted.
const ALONE: Duration = Duration::from_millis(700);

#[test]
fn contention_does_not_fail_flows_that_fit_their_cpu_budget() {
    let mut node = Node::options().flow_cpu_ms(BUDGET_MS).start();
    let mallory = node.vnode(MALLORY, Pkg::Hostile);
    let api = node.api().clone();

    // Find an amount of work that takes about ALONE on its own.
    let mut iterations: u64 = 1 << 22;
    let mut run = 0;
    let (took, expected) = loop {
        let id = format!("calibrate-{run}");
        run += 1;
        let t = Instant::now();
        api.start_flow(&mallory, &id, "burn", &json!({"iterations": iterations}));
        let st = api.wait_terminal(&mallory, &id);
        let took = t.elapsed();
        assert_eq!(st.status, "COMPLETED", "{}", st.describe());
        if took >= ALONE {
            break (took, st.result);
        }
        let factor = (ALONE.as_secs_f64() / took.as_secs_f64().max(0.01)).clamp(1.2, 8.0);
        iterations = (iterations as f64 * factor) as u64;
    };
    assert!(
        took < Duration::from_millis(BUDGET_MS * 3 / 4),
        "one flow alone took {took:?}: too close to its budget to test contention"
    );

    // Eight at once on this machine's cores (two in CI).
    let ids: Vec<String> = (0..8).map(|i| format!("burn-{i}")).collect();
    for id in &ids {
        api.start_flow(&mallory, id, "burn", &json!({"iterations": iterations}));
    }
    let flows = api.wait_all_terminal(&mallory, &ids, Duration::from_secs(120));
    for st in &flows {
        assert_eq!(
            st.status,
            "COMPLETED",
            "a flow that needs about {took:?} of CPU failed under contention: {}",
            st.describe()
        );
        assert_eq!(st.result, expected, "{}", st.describe());
    }
    node.assert_running();
}
