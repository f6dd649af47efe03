//! The example apps of `examples-flows/`, tested with the flow authors'
//! kit: each example's behaviour, a restart mid-flow, a timeout, a kill,
//! a one-day sleep on virtual time, and a seed that replays a run.

use braid_flowtest::{Network, Outcome, Package};
use braid_types::FailureKind;
use braid_types::journal::Entry;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const ALICE: &str = "O=Alice, L=London, C=GB";
const BOB: &str = "O=Bob, L=Paris, C=FR";
const CAROL: &str = "O=Carol, L=Rome, C=IT";
const DAVE: &str = "O=Dave, L=Berlin, C=DE";
const ERIN: &str = "O=Erin, L=Madrid, C=ES";
const DAY_MS: u64 = 86_400_000;

fn ping() -> Package {
    Package::build("../../examples-flows/ping")
}

fn proposal() -> Package {
    Package::build("../../examples-flows/proposal")
}

fn ping_body(to: &str, n: u64, delay_ms: u64) -> Value {
    json!({"counterparty": to, "n": n, "delayMs": delay_ms})
}

#[test]
fn a_ping_gets_its_answer_and_its_responder_ends_once() {
    let net = Network::new();
    let (alice, bob) = (net.party(ALICE, &ping()), net.party(BOB, &ping()));
    let flow = net.start(&alice, "ping", ping_body(BOB, 41, 0));
    net.run_until_quiet();
    assert_eq!(
        net.result::<Value>(&flow),
        json!({"n": 42, "responder": BOB})
    );
    let responders = net.responders(&bob);
    assert_eq!(responders.len(), 1, "one responder");
    let (r, name) = &responders[0];
    assert_eq!(name, "ping_responder");
    // The responder insists that the close is all that follows its pong.
    assert_eq!(net.outcome(r), Outcome::Completed(Value::Null));
    let calls: Vec<&str> = net.journal(&flow).iter().map(Entry::call_kind).collect();
    assert_eq!(calls, ["initiate", "send", "receive", "close"]);
}

#[test]
fn a_flow_that_sleeps_a_day_finishes_at_once_on_virtual_time() {
    // The initiator waits for the pong as long as the responder sleeps:
    // a session timeout longer than a day.
    let limits = braid_flowtest::Limits {
        session_timeout: Duration::from_millis(2 * DAY_MS),
        ..Default::default()
    };
    let net = Network::with_limits(1, limits);
    let (alice, _bob) = (net.party(ALICE, &ping()), net.party(BOB, &ping()));
    // From here: no build, no compilation (the parties have their
    // packages), only the flows.
    let t = Instant::now();
    let flow = net.start(&alice, "ping", ping_body(BOB, 1, DAY_MS));
    net.run_until_quiet();
    let took = t.elapsed();
    assert_eq!(net.result::<Value>(&flow)["n"], 2);
    assert!(
        net.elapsed() >= Duration::from_millis(DAY_MS),
        "virtual time moved {:?}",
        net.elapsed()
    );
    eprintln!("a ping whose responder sleeps a day took {took:?} of wall time");
    // Well under a second (a generous bound on a busy machine; it takes
    // milliseconds).
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn a_party_restarted_mid_flow_resumes_from_its_journal_and_nothing_happens_twice() {
    for restarted in [BOB, ALICE] {
        let net = Network::new();
        let (alice, bob) = (net.party(ALICE, &ping()), net.party(BOB, &ping()));
        let flow = net.start(&alice, "ping", ping_body(BOB, 7, 60_000));
        // The responder has received the ping and sleeps.
        net.run_until("the responder to sleep", |net| {
            net.responders(&bob).first().is_some_and(|(r, _)| {
                net.journal(r)
                    .iter()
                    .any(|e| matches!(e, Entry::Sleep { .. }))
            })
        });
        let party = if restarted == BOB { &bob } else { &alice };
        net.restart(party);
        net.run_until_quiet();
        assert_eq!(
            net.result::<Value>(&flow),
            json!({"n": 8, "responder": BOB}),
            "restarting {restarted}"
        );
        // Exactly once: one responder, which saw one ping and then only the
        // close (a second ping would fail it), and sent one pong (the
        // initiator would not take two).
        let responders = net.responders(&bob);
        assert_eq!(responders.len(), 1, "restarting {restarted}");
        assert_eq!(
            net.outcome(&responders[0].0),
            Outcome::Completed(Value::Null)
        );
        let sends = net
            .journal(&responders[0].0)
            .iter()
            .filter(|e| e.call_kind() == "send")
            .count();
        assert_eq!(sends, 1, "restarting {restarted}");
    }
}

#[test]
fn a_ping_whose_answers_are_lost_times_out() {
    let net = Network::new();
    let (alice, bob) = (net.party(ALICE, &ping()), net.party(BOB, &ping()));
    net.drop_messages(&bob, &alice, usize::MAX);
    let flow = net.start(&alice, "ping", ping_body(BOB, 1, 0));
    net.run_until_quiet();
    let failure = net.failure(&flow);
    assert!(
        failure.message.contains("timed out") || failure.message.contains("TimedOut"),
        "{failure}"
    );
    // After the session timeout (10 minutes by default), virtually.
    assert!(
        net.elapsed() >= Duration::from_secs(600),
        "{:?}",
        net.elapsed()
    );
}

#[test]
fn held_back_answers_arrive_late_and_the_flow_still_completes() {
    let net = Network::new();
    let (alice, bob) = (net.party(ALICE, &ping()), net.party(BOB, &ping()));
    net.delay_messages(&bob, &alice, Duration::from_secs(120));
    let flow = net.start(&alice, "ping", ping_body(BOB, 1, 0));
    net.run_until_quiet();
    assert_eq!(net.result::<Value>(&flow)["n"], 2);
    assert!(net.elapsed() >= Duration::from_secs(120));
}

#[test]
fn a_killed_flow_ends_killed_and_its_counterparty_is_told() {
    let net = Network::new();
    let (alice, bob) = (net.party(ALICE, &ping()), net.party(BOB, &ping()));
    let flow = net.start(&alice, "ping", ping_body(BOB, 1, DAY_MS));
    net.run_until("the responder to start", |net| {
        !net.responders(&bob).is_empty()
    });
    net.kill(&flow, "the test had enough");
    net.run_until_quiet();
    let failure = net.failure(&flow);
    assert_eq!(failure.kind, FailureKind::Killed, "{failure}");
    // The responder learns it when it next talks to Alice, after its day.
    let responder = net.responders(&bob)[0].0;
    assert!(
        matches!(net.outcome(&responder), Outcome::Failed(_)),
        "{:?}",
        net.outcome(&responder)
    );
}

#[test]
fn a_three_party_proposal_is_accepted_or_rejected_by_both_voters() {
    let net = Network::new();
    let p = proposal();
    let carol = net.party(CAROL, &p);
    net.party(DAVE, &p);
    net.party(ERIN, &p);
    let yes = net.start(
        &carol,
        "propose",
        json!({"counterparties": [DAVE, ERIN], "proposal": "lunch at noon"}),
    );
    let no = net.start(
        &carol,
        "propose",
        json!({"counterparties": [DAVE, ERIN], "proposal": "please reject this"}),
    );
    net.run_until_quiet();
    assert_eq!(
        net.result::<Value>(&yes),
        json!({"accepted": true, "votes": {DAVE: true, ERIN: true}})
    );
    assert_eq!(
        net.result::<Value>(&no),
        json!({"accepted": false, "votes": {DAVE: false, ERIN: false}})
    );
}

#[test]
fn a_missing_counterparty_fails_the_flow_with_the_reason() {
    let net = Network::new();
    let alice = net.party(ALICE, &ping());
    let flow = net.start(&alice, "ping", ping_body("O=Nobody, L=Nowhere, C=GB", 1, 0));
    net.run_until_quiet();
    let failure = net.failure(&flow);
    assert!(failure.message.contains("not a member"), "{failure}");
}

/// Every flow's journal, by start order (ids follow the seed).
fn journals(net: &Network, flows: &[braid_flowtest::Flow]) -> Vec<Vec<Entry>> {
    flows.iter().map(|f| net.journal(f)).collect()
}

#[test]
fn one_seed_gives_one_run_and_another_may_interleave_otherwise() {
    let run = |seed: u64| {
        let net = Network::with_seed(seed);
        let p = proposal();
        let carol = net.party(CAROL, &p);
        let dave = net.party(DAVE, &p);
        let erin = net.party(ERIN, &p);
        let flows: Vec<_> = (0..3)
            .map(|i| {
                net.start(
                    &carol,
                    "propose",
                    json!({"counterparties": [DAVE, ERIN], "proposal": format!("item {i}")}),
                )
            })
            .collect();
        net.run_until_quiet();
        let mut all = journals(&net, &flows);
        for party in [&dave, &erin] {
            let r: Vec<_> = net.responders(party).into_iter().map(|(f, _)| f).collect();
            all.extend(journals(&net, &r));
        }
        assert_eq!(net.seed(), seed);
        all
    };
    assert_eq!(run(7), run(7), "the same seed, the same journals");
}
