//! Between nodes: networks from `braid network bootstrap`, flows across
//! nodes through the link manager and the gateways (mutual TLS), crashes,
//! an unreachable peer, a lossy proxy, a capture of the wire, and the
//! gateway's rejections.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use braid_e2e::network::{Network, ProxyPolicy, TcpProxy};
use braid_e2e::{Api, Node, Pkg, wait_until};
use serde_json::json;

use crate::{ALICE, BOB, assert_pings_ok, start_pings};

const CAROL: &str = "O=Carol, L=Paris, C=FR";
const DAVE: &str = "O=Dave, L=Berlin, C=DE";
const ERIN: &str = "O=Erin, L=Madrid, C=ES";

/// Counts the responder flows (not started by a client) on `holding`.
fn responders(api: &Api, holding: &str) -> usize {
    api.list_flows(holding)
        .iter()
        .filter(|f| f.client_request_id.is_none())
        .count()
}

/// The value of a Prometheus counter or gauge on `api`'s node (0 if absent).
fn metric(api: &Api, name: &str) -> f64 {
    let resp = api.get("/metrics").expect("GET /metrics");
    resp.text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k == name)
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

#[test]
fn ping_and_three_party_proposal_across_three_nodes() {
    let net = Network::bootstrap(&["alpha", "beta", "gamma"], &[]);
    let n1 = net.start("alpha");
    let n2 = net.start("beta");
    let n3 = net.start("gamma");
    let alice = n1.vnode(ALICE, Pkg::Ping);
    let carol = n1.vnode(CAROL, Pkg::Proposal);
    let bob = n2.vnode(BOB, Pkg::Ping);
    n2.vnode(DAVE, Pkg::Proposal);
    n3.vnode(ERIN, Pkg::Proposal);
    let everyone = [ALICE, BOB, CAROL, DAVE, ERIN];
    for n in [&n1, &n2, &n3] {
        Network::wait_members(n.api(), &everyone);
    }
    let view = n1.api().get("/api/v1/network").expect("GET network");
    assert_eq!(view.json["configured"], true, "{}", view.text);
    assert_eq!(
        view.json["operator"], true,
        "the first node runs the map: {}",
        view.text
    );
    let view = n2.api().get("/api/v1/network").expect("GET network");
    assert_eq!(view.json["operator"], false, "{}", view.text);

    // Two parties on two nodes.
    let ids = start_pings(n1.api(), &alice, BOB, "x", 20, 0);
    let flows = n1
        .api()
        .wait_all_terminal(&alice, &ids, Duration::from_secs(120));
    assert_pings_ok(&flows, &ids, BOB);
    let done = n2
        .api()
        .wait_responders_terminal(&bob, 20, Duration::from_secs(60));
    braid_e2e::assert_all_completed(&done, "Bob's responders");
    assert_eq!(done.len(), 20, "Bob: {done:?}");

    // Three parties on three nodes: Carol (alpha) asks Dave (beta) and
    // Erin (gamma).
    let api = n1.api();
    crate::proposals_yes_and_no(api, &carol, DAVE, ERIN);

    // A 300 KB proposal: the link splits it into fragments (packets are at
    // most 32 KiB) and reassembles it on each side.
    let big = "lunch at noon; ".repeat(20_000);
    api.start_flow(
        &carol,
        "big",
        "propose",
        &json!({"counterparties": [DAVE, ERIN], "proposal": big}),
    );
    let st = api.wait_terminal(&carol, "big");
    assert_eq!(
        st.result,
        json!({"accepted": true, "votes": {DAVE: true, ERIN: true}}),
        "{}",
        st.describe()
    );

    // A counterparty nobody hosts: the flow fails with a clear error.
    api.start_flow(
        &alice,
        "nobody",
        "ping",
        &json!({"counterparty": "O=Nobody, L=Nowhere, C=NZ", "n": 1}),
    );
    let st = api.wait_terminal(&alice, "nobody");
    assert_eq!(st.status, "FAILED", "{}", st.describe());
    assert!(
        st.describe().contains("not a member"),
        "unclear error: {}",
        st.describe()
    );
}

#[test]
fn peer_sigkill_and_unreachable_peer_lose_nothing() {
    const N: usize = 150;
    let net = Network::bootstrap(&["alpha", "beta"], &[]);
    let mut n1 = net.start("alpha");
    let mut n2 = net.start("beta");
    let alice = n1.vnode(ALICE, Pkg::Ping);
    let bob = n2.vnode(BOB, Pkg::Ping);
    for n in [&n1, &n2] {
        Network::wait_members(n.api(), &[ALICE, BOB]);
    }

    // 1. SIGKILL the peer with every exchange in flight: Bob's responders
    //    sleep 2 s before answering.
    let ids = start_pings(n1.api(), &alice, BOB, "k", N, 2000);
    let api2 = n2.api().clone();
    wait_until(
        "every ping to reach Bob's node",
        Duration::from_secs(120),
        || match responders(&api2, &bob) {
            n if n >= N => Ok(()),
            n => Err(format!("{n}/{N} responders exist")),
        },
    );
    let completed = n1
        .api()
        .list_flows(&alice)
        .iter()
        .filter(|f| f.status == "COMPLETED")
        .count();
    assert!(
        completed < 100,
        "{completed} pings completed before the kill; fewer than 100 were in flight"
    );
    n2.kill();
    n2.restart();
    let flows = n1
        .api()
        .wait_all_terminal(&alice, &ids, Duration::from_secs(180));
    assert_pings_ok(&flows, &ids, BOB);
    let done = n2
        .api()
        .wait_responders_terminal(&bob, N, Duration::from_secs(60));
    assert_eq!(
        done.len(),
        N,
        "Bob has {} responders, expected {N}",
        done.len()
    );
    braid_e2e::assert_all_completed(&done, "Bob's responders");

    // 2. The peer's gateway unreachable for a while: stop Bob's node,
    //    start pings, wait until Alice's node has failed to reach it
    //    several times, then bring it back.
    n2.kill();
    let failures_before = metric(n1.api(), "braid_gateway_send_failures_total");
    let ids2 = start_pings(n1.api(), &alice, BOB, "u", 100, 0);
    let api1 = n1.api().clone();
    wait_until(
        "Alice's node to fail sending to the stopped peer",
        Duration::from_secs(60),
        || {
            let f = metric(&api1, "braid_gateway_send_failures_total");
            if f >= failures_before + 3.0 {
                Ok(())
            } else {
                Err(format!("{f} send failures"))
            }
        },
    );
    let running = api1
        .list_flows(&alice)
        .iter()
        .filter(|f| f.status == "RUNNING")
        .count();
    assert_eq!(running, 100, "pings finished while the peer was down");
    n2.restart();
    let flows = n1
        .api()
        .wait_all_terminal(&alice, &ids2, Duration::from_secs(180));
    assert_pings_ok(&flows, &ids2, BOB);
    let done = n2
        .api()
        .wait_responders_terminal(&bob, N + 100, Duration::from_secs(60));
    assert_eq!(done.len(), N + 100, "Bob: {} responders", done.len());
    braid_e2e::assert_all_completed(&done, "Bob's responders");

    // 3. The initiators' node is SIGKILLed while Bob's responders are
    //    asleep: their answers arrive under a session Alice's node no longer
    //    holds, and it must re-establish the link rather than drop them.
    let ids3 = start_pings(n1.api(), &alice, BOB, "i", 100, 2000);
    wait_until(
        "the new pings to reach Bob's node",
        Duration::from_secs(120),
        || match responders(n2.api(), &bob) {
            n if n >= N + 200 => Ok(()),
            n => Err(format!("{n}/{} responders exist", N + 200)),
        },
    );
    n1.kill();
    n1.restart();
    let t = std::time::Instant::now();
    let flows = n1
        .api()
        .wait_all_terminal(&alice, &ids3, Duration::from_secs(180));
    assert_pings_ok(&flows, &ids3, BOB);
    eprintln!(
        "[e2e] pings completed {:?} after the initiators' node restarted",
        t.elapsed()
    );
    let done = n2
        .api()
        .wait_responders_terminal(&bob, N + 200, Duration::from_secs(60));
    assert_eq!(done.len(), N + 200, "Bob: {} responders", done.len());
    braid_e2e::assert_all_completed(&done, "Bob's responders");
}

/// Puts a proxy in front of `node`'s gateway: the membership advertises the
/// proxy's address (same certificate, valid for 127.0.0.1).
fn proxied(net: &Network, node: &str, policy: ProxyPolicy) -> TcpProxy {
    let upstream = net.gateway_addr(node);
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), upstream, policy);
    let endpoint = format!("https://{}", proxy.addr);
    net.edit_config(node, |v| v["gateway_endpoint"] = json!(endpoint));
    proxy
}

#[test]
fn lossy_proxy_between_gateways_and_no_payload_in_clear() {
    const N: usize = 100;
    const SECRET: &str = "braid-secret-proposal-7f3a9c";
    let net = Network::bootstrap(&["alpha", "beta"], &[]);
    let lossy = ProxyPolicy {
        drop_permille: 300,
        max_delay_ms: 200,
    };
    // alpha is the map server: the map traffic goes direct, the gateways'
    // packets to each other through the proxies.
    let p1 = proxied(&net, "alpha", lossy);
    let p2 = proxied(&net, "beta", lossy);
    // Re-key every 40 packets: the pings cross many re-keys, under loss.
    let rekey = || Node::options().arg("--link-rekey-packets").arg("40");
    let n1 = net.start_with("alpha", rekey());
    let n2 = net.start_with("beta", rekey());
    let alice = n1.vnode(ALICE, Pkg::Ping);
    let bob = n2.vnode(BOB, Pkg::Ping);
    let carol = n1.vnode(CAROL, Pkg::Proposal);
    n2.vnode(DAVE, Pkg::Proposal);
    for n in [&n1, &n2] {
        Network::wait_members(n.api(), &[ALICE, BOB, CAROL, DAVE]);
    }

    let ids = start_pings(n1.api(), &alice, BOB, "p", N, 0);
    n1.api().start_flow(
        &carol,
        "secret",
        "propose",
        &json!({"counterparties": [DAVE], "proposal": SECRET}),
    );
    let flows = n1
        .api()
        .wait_all_terminal(&alice, &ids, Duration::from_secs(240));
    assert_pings_ok(&flows, &ids, BOB);
    let done = n2
        .api()
        .wait_responders_terminal(&bob, N, Duration::from_secs(60));
    assert_eq!(done.len(), N, "Bob: {} responders", done.len());
    braid_e2e::assert_all_completed(&done, "Bob's responders");
    let st = n1.api().wait_terminal(&carol, "secret");
    assert_eq!(st.status, "COMPLETED", "{}", st.describe());
    let sessions = metric(n1.api(), "braid_link_sessions_established_total")
        + metric(n2.api(), "braid_link_sessions_established_total");
    assert!(
        sessions >= 6.0,
        "only {sessions} link sessions: the pings did not cross re-keys"
    );
    let cut = p1.cut.load(Ordering::SeqCst) + p2.cut.load(Ordering::SeqCst);
    assert!(
        cut > 0,
        "the proxies cut no connection; the test proved nothing"
    );
    eprintln!(
        "[e2e] proxies accepted {} connections and cut {cut}",
        p1.accepted.load(Ordering::SeqCst) + p2.accepted.load(Ordering::SeqCst)
    );

    // The capture holds TLS records, none of the payloads or names.
    let mut capture = p1.captured();
    capture.extend(p2.captured());
    assert!(
        capture.len() > 10_000,
        "capture too small: {}",
        capture.len()
    );
    assert!(
        capture.windows(3).any(|w| w == [0x17, 0x03, 0x03]),
        "no TLS application-data records in the capture"
    );
    let contains = |needle: &[u8]| capture.windows(needle.len()).any(|w| w == needle);
    for needle in [SECRET, "lunch", "O=Bob", "Dave", "ping", "responder"] {
        assert!(
            !contains(needle.as_bytes()),
            "the capture between the gateways contains {needle:?} in clear"
        );
    }
}

/// A blocking HTTPS client presenting `cert_pem` + `key_pem`, trusting
/// `ca_pem`.
fn client_with(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> reqwest::blocking::Client {
    let mut identity = key_pem.to_vec();
    identity.extend_from_slice(cert_pem);
    reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).expect("CA PEM"))
        .identity(reqwest::Identity::from_pem(&identity).expect("identity PEM"))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A well-formed one-packet batch (gateway wire format v1) from `from` to `to`.
fn batch(from: &str, to: &str, packet: &[u8]) -> Vec<u8> {
    let mut b = vec![1u8, 0, 1];
    b.extend_from_slice(&(from.len() as u16).to_be_bytes());
    b.extend_from_slice(from.as_bytes());
    b.extend_from_slice(&(to.len() as u16).to_be_bytes());
    b.extend_from_slice(to.as_bytes());
    b.extend_from_slice(&(packet.len() as u32).to_be_bytes());
    b.extend_from_slice(packet);
    b
}

#[test]
fn gateway_rejects_other_ca_revoked_and_non_members() {
    let net = Network::bootstrap(&["alpha", "beta", "gamma"], &[]);
    let n1 = net.start("alpha");
    let n2 = net.start("beta");
    let bob = n2.vnode(BOB, Pkg::Ping);
    n1.vnode(ALICE, Pkg::Ping);
    Network::wait_members(n2.api(), &[ALICE, BOB]);
    let url = format!("https://{}/gateway/v1/packets", net.gateway_addr("beta"));
    let read = |p: &str| std::fs::read(net.dir.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let ca = read("ca/ca.pem");
    let body = batch(CAROL, BOB, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

    // A member-looking client with a certificate from another CA.
    let other = Network::bootstrap(&["mallory"], &[]);
    let read_other =
        |p: &str| std::fs::read(other.dir.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let c = client_with(
        &ca,
        &read_other("mallory/tls/cert.pem"),
        &read_other("mallory/tls/key.pem"),
    );
    let r = c.post(&url).body(body.clone()).send();
    assert!(
        r.is_err(),
        "a certificate from another CA was accepted: {r:?}"
    );

    // gamma's certificate is from the network CA, but gamma never joined.
    let c = client_with(&ca, &read("gamma/tls/cert.pem"), &read("gamma/tls/key.pem"));
    let r = c
        .post(&url)
        .body(body.clone())
        .send()
        .expect("POST as gamma");
    assert_eq!(r.status().as_u16(), 403, "a non-member was not refused");

    // Revoked: the CRL lists gamma's certificate; the gateway re-reads it.
    let out = net.cli(&["revoke", "--node", "gamma"]);
    assert!(
        out.status.success(),
        "braid network revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "the revoked certificate to be refused",
        Duration::from_secs(30),
        || {
            // A new client each time: revocation is checked at the handshake.
            let c = client_with(&ca, &read("gamma/tls/cert.pem"), &read("gamma/tls/key.pem"));
            match c.post(&url).body(body.clone()).send() {
                Err(_) => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
            }
        },
    );

    // Each with a log line (the server may log just after the client saw
    // the refusal), and nothing delivered.
    // The other network's CA has the same name as ours, so rustls finds a
    // candidate issuer and reports its signature as bad.
    for (what, needles) in [
        (
            "other CA",
            &["invalid peer certificate: BadSignature", "UnknownIssuer"][..],
        ),
        ("non-member", &["not a current member"][..]),
        ("revoked", &["invalid peer certificate: Revoked"][..]),
    ] {
        wait_until(
            &format!("beta's log line for the {what} rejection"),
            Duration::from_secs(10),
            || {
                let log = std::fs::read_to_string(n2.log_path()).unwrap_or_default();
                if needles.iter().any(|n| log.contains(n)) {
                    Ok(())
                } else {
                    Err(format!("no line with {needles:?}:\n{}", n2.log_tail(20)))
                }
            },
        );
    }
    assert_eq!(
        responders(n2.api(), &bob),
        0,
        "something was delivered to Bob"
    );
    let _: &Node = &n1;
}

#[test]
fn manual_approval_and_restart_while_the_map_server_is_down() {
    let net = Network::bootstrap(&["alpha", "beta", "gamma"], &["--manual-approval"]);
    let mut n1 = net.start("alpha");
    let mut n2 = net.start("beta");
    let n3 = net.start("gamma");
    let alice = n2.vnode(ALICE, Pkg::Ping);
    n3.vnode(BOB, Pkg::Ping);

    // Both registrations wait for the operator; nobody is in the map.
    let op = n1.api().clone();
    wait_until(
        "both registrations to be pending",
        braid_e2e::DEADLINE,
        || {
            let r = op
                .get("/api/v1/network/pending")
                .map_err(|e| e.to_string())?;
            let names: Vec<&str> = r.json["members"]
                .as_array()
                .map(|a| a.iter().filter_map(|m| m["name"].as_str()).collect())
                .unwrap_or_default();
            if names.contains(&ALICE) && names.contains(&BOB) {
                Ok(())
            } else {
                Err(format!("pending: {}", r.text))
            }
        },
    );
    let view = n2.api().get("/api/v1/network").expect("GET network");
    assert_eq!(
        view.json["members"],
        json!([]),
        "members before approval: {}",
        view.text
    );
    // Only the operator's node approves.
    let not_op = n2
        .api()
        .get("/api/v1/network/pending")
        .expect("GET pending on beta");
    not_op.expect_problem(&[409], "pending on a node without the map role");

    for name in [ALICE, BOB] {
        let path = format!(
            "/api/v1/network/members/{}/approve",
            name.replace(' ', "%20")
        );
        op.post_json(&path, &json!({}))
            .expect("approve")
            .expect_status(&[204], "approve");
    }
    for n in [&n2, &n3] {
        Network::wait_members(n.api(), &[ALICE, BOB]);
    }
    n2.api()
        .start_flow(&alice, "a1", "ping", &crate::ping_body(BOB, 1, 0));
    crate::assert_ping_ok(&n2.api().wait_terminal(&alice, "a1"), 1, BOB);

    // The map server goes down; beta restarts from its persisted map and
    // still reaches gamma.
    n1.kill();
    n2.restart();
    let view = n2.api().get("/api/v1/network").expect("GET network");
    let listed = view.json["members"].as_array().map_or(0, Vec::len);
    assert_eq!(
        listed, 2,
        "beta lost the map across a restart: {}",
        view.text
    );
    // The members are paginated like every list.
    let one = crate::pagination::walk(n2.api(), "/api/v1/network", "members", 1, true);
    let names: Vec<&str> = one.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names.len(), 2, "members a page at a time: {one:?}");
    assert!(names.contains(&ALICE) && names.contains(&BOB), "{names:?}");
    n2.api()
        .start_flow(&alice, "a2", "ping", &crate::ping_body(BOB, 2, 0));
    crate::assert_ping_ok(&n2.api().wait_terminal(&alice, "a2"), 2, BOB);
}

#[test]
fn one_way_tls_network_and_dead_lettered_messages() {
    // One-way TLS: gateways ask for no client certificate; the links still
    // authenticate every packet by the members' session keys.
    let net = Network::bootstrap(&["alpha", "beta"], &["--one-way-tls"]);
    let n1 = net.start_with("alpha", Node::options().arg("--message-ttl-secs").arg("3"));
    let mut n2 = net.start("beta");
    let alice = n1.vnode(ALICE, Pkg::Ping);
    n2.vnode(BOB, Pkg::Ping);
    for n in [&n1, &n2] {
        Network::wait_members(n.api(), &[ALICE, BOB]);
    }
    let ids = start_pings(n1.api(), &alice, BOB, "o", 5, 0);
    let flows = n1
        .api()
        .wait_all_terminal(&alice, &ids, Duration::from_secs(60));
    assert_pings_ok(&flows, &ids, BOB);

    // Bob's node stays down past the messages' time-to-live: the ping's
    // session fails with a clear error instead of waiting for ever.
    n2.kill();
    n1.api()
        .start_flow(&alice, "late", "ping", &crate::ping_body(BOB, 1, 0));
    let st = n1.api().wait_terminal(&alice, "late");
    assert_eq!(st.status, "FAILED", "{}", st.describe());
    assert!(
        st.describe().contains("undeliverable") && st.describe().contains("time-to-live"),
        "unclear error for a dead-lettered message: {}",
        st.describe()
    );
    assert!(
        metric(n1.api(), "braid_link_messages_dead_lettered_total") >= 1.0,
        "no dead letter counted"
    );
}

/// The README's first command: `braid demo` runs a ping between two nodes
/// of a freshly bootstrapped network and prints the result.
#[test]
fn the_demo_pings_across_a_two_node_network() {
    let dir = braid_e2e::fresh_dir("demo");
    let mut cmd = std::process::Command::new(braid_e2e::braid_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BRAID_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .arg("demo")
        .arg("--data-dir")
        .arg(dir.join("demo"))
        .env("CARGO_TARGET_DIR", braid_e2e::wasm_target_dir())
        .output()
        .expect("run braid demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "braid demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let result: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("braid demo printed no JSON ({e}):\n{stdout}"));
    assert_eq!(result["status"], "COMPLETED", "{stdout}");
    assert_eq!(
        result["result"],
        json!({"n": 42, "responder": BOB}),
        "{stdout}"
    );
    assert_eq!(
        stderr.matches("gateway https://127.0.0.1:").count(),
        2,
        "the demo should run two nodes:\n{stderr}"
    );
    // What a person reads: what it does, then the result; the nodes' logs
    // are in the file it names.
    assert!(
        !stderr.contains(" INFO "),
        "log lines on the demo's stderr:\n{stderr}"
    );
    let log = dir.join("demo").join("braid.log");
    assert!(
        stderr.contains(&format!("the nodes' logs: {}", log.display())),
        "{stderr}"
    );
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("node started"), "{logged}");
    let _ = std::fs::remove_dir_all(&dir);
}
