//! Cluster mode: REST workers and flow workers as separate `braid`
//! processes on a real Kafka-API broker (tansu) and a real PostgreSQL.
//! Flows run across both flow workers and every REST worker answers the
//! same; a SIGKILLed flow worker's partitions are taken over and every
//! flow completes exactly once.

use std::time::Duration;

use braid_e2e::{Node, NodeOptions, Pkg};
use braid_testkit::Broker;

use crate::{ALICE, BOB, assert_pings_ok, proposals_yes_and_no, start_pings};

/// How soon a user or role change made through one REST worker must be
/// enforced by the others (they reload every 2 s).
const RBAC: Duration = Duration::from_secs(10);

/// A cluster's shared services and its worker processes.
struct Cluster {
    broker: Broker,
    /// A server of the cluster's own, when the test restarts it.
    pg: Option<braid_testkit::PrivatePostgres>,
    db: String,
    url: String,
    rest: Vec<Node>,
    flow: Vec<Node>,
}

impl Cluster {
    fn options(&self, roles: &str) -> NodeOptions {
        Node::options()
            .arg("--store")
            .arg(self.db.clone())
            .arg("--bus")
            .arg(self.url.clone())
            .arg("--roles")
            .arg(roles)
            .arg("--flow-partitions")
            .arg("8")
            // A dead flow worker's partitions move after this long.
            .arg("--bus-session-timeout-ms")
            .arg("6000")
    }

    fn start(rest: usize, flow: usize) -> Cluster {
        Self::start_on(rest, flow, None)
    }

    fn start_on(rest: usize, flow: usize, pg: Option<braid_testkit::PrivatePostgres>) -> Cluster {
        let broker = Broker::start();
        let db = match &pg {
            Some(p) => p.url().to_string(),
            None => braid_testkit::fresh_database(),
        };
        let mut c = Cluster {
            url: broker.url(),
            broker,
            pg,
            db,
            rest: Vec::new(),
            flow: Vec::new(),
        };
        for _ in 0..flow {
            let n = c.options("flow").no_rest().start();
            c.flow.push(n);
        }
        for _ in 0..rest {
            let n = c.options("rest").start();
            c.rest.push(n);
        }
        c
    }

    /// One REST and two flow workers, Alice and Bob, and `n` pings from
    /// Alice whose responders sleep `delay_ms`, all of them started (their
    /// responders exist). Returns the cluster, the REST client, the two
    /// holding ids and the client request ids.
    fn with_pings(
        pg: Option<braid_testkit::PrivatePostgres>,
        prefix: &str,
        n: usize,
        delay_ms: u64,
    ) -> (Cluster, braid_e2e::Api, String, String, Vec<String>) {
        let c = Cluster::start_on(1, 2, pg);
        let api = c.rest[0].api().clone();
        let alice = c.rest[0].vnode(ALICE, Pkg::Ping);
        let bob = c.rest[0].vnode(BOB, Pkg::Ping);
        let ids = start_pings(&api, &alice, BOB, prefix, n, delay_ms);
        api.wait_responders(&bob, n, Duration::from_secs(120));
        (c, api, alice, bob, ids)
    }

    /// How many partitions flow worker `i` took at its last assignment
    /// (from its log line `took flow partitions over partitions={0: 2, ...}`).
    fn last_taken(&self, i: usize) -> usize {
        let log = self.flow[i].log_text();
        log.lines()
            .rev()
            .find(|l| l.contains("took flow partitions over"))
            // The map is the line's first `{...}` (the log may be coloured).
            .and_then(|l| l.split_once('{'))
            .map_or(0, |(_, rest)| {
                rest.split('}').next().unwrap_or("").matches(':').count()
            })
    }

    /// How many times flow worker `i` has taken partitions over.
    fn takeovers(&self, i: usize) -> usize {
        self.flow[i]
            .log_text()
            .matches("took flow partitions over")
            .count()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.rest.clear();
        self.flow.clear();
        if self.pg.is_none() {
            braid_testkit::drop_database(&self.db);
        }
    }
}

/// The status changes a stream shows for each of the client request ids
/// `ids`, read until every one of them has completed.
fn streamed(
    rx: &std::sync::mpsc::Receiver<crate::streams::Item>,
    ids: &[String],
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut per: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    while !ids.iter().all(|id| {
        per.get(id)
            .and_then(|v| v.last())
            .is_some_and(|s| s == "COMPLETED")
    }) {
        let e = crate::streams::next_event(rx, Duration::from_secs(60), "a status change");
        if e.event == "status" {
            let st = e.status();
            per.entry(st.client_request_id.unwrap_or_default())
                .or_default()
                .push(st.status);
        }
    }
    per.retain(|id, _| ids.contains(id));
    per
}

#[test]
fn a_cluster_of_separate_rest_and_flow_workers_runs_pings_and_the_three_party_flow() {
    let c = Cluster::start(2, 2);
    let (a, b) = (c.rest[0].api(), c.rest[1].api());
    // Vnodes made through one REST worker are usable through the other.
    let alice = c.rest[0].vnode(ALICE, Pkg::Ping);
    let _bob = c.rest[1].vnode(BOB, Pkg::Ping);
    // Both REST workers stream Alice's flows.
    let stream = |api: &braid_e2e::Api| {
        let path = format!("/api/v1/flow/{alice}/events");
        crate::streams::open_stream(api, &path, None, Default::default())
            .unwrap_or_else(|(status, body)| panic!("{path}: {status} {body}"))
    };
    let (sa, sb) = (stream(a), stream(b));
    let mut ids = start_pings(a, &alice, BOB, "a", 20, 0);
    ids.extend(start_pings(b, &alice, BOB, "b", 20, 0));
    let flows = b.wait_all_terminal(&alice, &ids, Duration::from_secs(120));
    assert_pings_ok(&flows[..20], &ids[..20], BOB);
    for (st, id) in flows[20..].iter().zip(&ids[20..]) {
        assert_eq!(st.status, "COMPLETED", "{}", st.describe());
        assert_eq!(st.client_request_id.as_deref(), Some(id.as_str()));
    }
    // Both streamed the same changes of every flow, in the same order.
    assert_eq!(
        streamed(&sa, &ids),
        streamed(&sb, &ids),
        "the two REST workers' streams"
    );
    // Both REST workers answer the same for every flow.
    for id in &ids {
        let (x, y) = (a.status(&alice, id), b.status(&alice, id));
        assert_eq!(x.status, y.status, "{id}");
        assert_eq!(x.result, y.result, "{id}");
        assert_eq!(x.flow_id, y.flow_id, "{id}");
    }
    // A client request id used through one REST worker is refused by the
    // other.
    let dup = b
        .try_start_flow(&alice, "a-0", "ping", &crate::ping_body(BOB, 0, 0))
        .expect("the REST worker answers");
    dup.expect_problem(
        &[409],
        "a repeated clientRequestId through the other REST worker",
    );
    // Both flow workers own partitions and ran flows.
    assert!(c.takeovers(0) >= 1 && c.takeovers(1) >= 1);
    // A user made through one REST worker is known to the other within
    // seconds, and a password change through that one is enforced by the
    // first. (Waited for through the admin's view, not by logging in:
    // failed logins would trip the login throttle.)
    let (pw1, pw2) = ("reader-password-one", "reader-password-two");
    crate::rbac::create_user(a, "reader", pw1, &[]);
    let knows = |api: &braid_e2e::Api, login: &str| {
        api.get(&format!("/api/v1/user/{login}"))
            .map(|r| r.status == 200)
            .unwrap_or(false)
    };
    braid_e2e::wait_until("the second REST worker knows the user", RBAC, || {
        if knows(b, "reader") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    let status = |api: &braid_e2e::Api, pw: &str| {
        crate::rbac::as_user(api, "reader", pw, "GET", "/api/v1/virtualnode", None).status
    };
    // Known, holds no role: 403 (an unknown user or a wrong password: 401).
    assert_eq!(status(b, pw1), 403);
    b.put_json(
        "/api/v1/user/reader/password",
        &serde_json::json!({"password": pw2}),
    )
    .expect("change the password")
    .expect_status(&[200], "password change through the second REST worker");
    // A change made after it, through the same worker: once the first
    // knows this user, it has the password change too.
    crate::rbac::create_user(b, "marker", "marker-password-1", &[]);
    braid_e2e::wait_until("the first REST worker reloads", RBAC, || {
        if knows(a, "marker") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    assert_eq!(
        status(a, pw2),
        403,
        "the new password works on the first worker"
    );
    assert_eq!(status(a, pw1), 401, "the old one no longer does");
    let carol = c.rest[1].vnode("O=Carol, L=Rome, C=IT", Pkg::Proposal);
    let _dave = c.rest[0].vnode("O=Dave, L=Oslo, C=NO", Pkg::Proposal);
    let _erin = c.rest[1].vnode("O=Erin, L=Lima, C=PE", Pkg::Proposal);
    proposals_yes_and_no(a, &carol, "O=Dave, L=Oslo, C=NO", "O=Erin, L=Lima, C=PE");
}

#[test]
fn a_sigkilled_flow_workers_partitions_are_taken_over_and_every_flow_completes_once() {
    const N: usize = 500;
    // Responders sleep 2 s, so the kill finds exchanges in flight on both
    // workers.
    let (mut c, api, alice, bob, ids) = Cluster::with_pings(None, "k", N, 2000);
    assert!(c.takeovers(1) >= 1, "the worker to kill owns partitions");
    let before = c.takeovers(0);
    c.flow[1].kill();
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(300));
    assert_pings_ok(&flows, &ids, BOB);
    let responders = api.wait_responders_terminal(&bob, N, Duration::from_secs(120));
    assert_eq!(responders.len(), N, "one responder per ping");
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");
    assert!(
        c.takeovers(0) > before && c.last_taken(0) == 8,
        "the survivor took the dead worker's partitions over"
    );
    c.flow[0].assert_running();
}

#[test]
fn the_cluster_carries_on_across_a_broker_restart() {
    const N: usize = 200;
    // Responders sleep 1 s: the restart finds exchanges in flight.
    let (mut c, api, alice, bob, ids) = Cluster::with_pings(None, "r", N, 1000);
    // SIGKILL and start again on its durable storage.
    c.broker.restart();
    // Flows started while the broker is back, too.
    let mut ids2 = start_pings(&api, &alice, BOB, "s", 20, 0);
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(300));
    assert_pings_ok(&flows, &ids, BOB);
    let more = api.wait_all_terminal(&alice, &ids2, Duration::from_secs(120));
    braid_e2e::assert_all_completed(&more, "pings started after the restart");
    ids2.clear();
    let responders = api.wait_responders_terminal(&bob, N + 20, Duration::from_secs(120));
    assert_eq!(responders.len(), N + 20, "one responder per ping");
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");
    for n in c.flow.iter_mut().chain(c.rest.iter_mut()) {
        n.assert_running();
    }
}

#[test]
fn the_cluster_carries_on_across_a_postgresql_restart() {
    const N: usize = 100;
    let pg = braid_testkit::PrivatePostgres::start();
    let (mut c, api, alice, bob, ids) = Cluster::with_pings(Some(pg), "p", N, 1000);
    c.pg.as_ref().expect("its own server").restart();
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(300));
    assert_pings_ok(&flows, &ids, BOB);
    let responders = api.wait_responders_terminal(&bob, N, Duration::from_secs(120));
    assert_eq!(responders.len(), N, "one responder per ping");
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");
    // New work after the restart too.
    let more = start_pings(&api, &alice, BOB, "q", 10, 0);
    let more = api.wait_all_terminal(&alice, &more, Duration::from_secs(120));
    braid_e2e::assert_all_completed(&more, "pings started after the restart");
    for n in c.flow.iter_mut().chain(c.rest.iter_mut()) {
        n.assert_running();
    }
}

#[test]
fn a_flow_worker_paused_past_its_session_timeout_advances_no_flow_it_lost() {
    const N: usize = 300;
    let (mut c, api, alice, bob, ids) = Cluster::with_pings(None, "z", N, 2000);
    assert!(c.takeovers(1) >= 1, "the worker to pause owns partitions");
    let before = c.takeovers(0);
    braid_testkit::signal(c.flow[1].pid(), "STOP");
    // Past the session timeout and the liveness period: the other takes
    // the paused worker's partitions over (and claims them in the store).
    braid_e2e::wait_until(
        "the other worker takes over",
        Duration::from_secs(120),
        || {
            if c.takeovers(0) > before && c.last_taken(0) == 8 {
                Ok(())
            } else {
                Err(format!("it holds {} partitions", c.last_taken(0)))
            }
        },
    );
    let gave_up = c.flow[1]
        .log_text()
        .matches("gave flow partitions up")
        .count();
    braid_testkit::signal(c.flow[1].pid(), "CONT");
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(300));
    assert_pings_ok(&flows, &ids, BOB);
    let responders = api.wait_responders_terminal(&bob, N, Duration::from_secs(120));
    assert_eq!(responders.len(), N, "one responder per ping");
    braid_e2e::assert_all_completed(&responders, "Bob's responder flows");
    // Resumed, it gave the partitions it lost up: when it learnt of the
    // revocation, or when the store fenced a commit it tried first (which
    // comes first is a race; `host/flow/tests` shows the fence itself
    // deterministically). Either way nothing above was duplicated.
    braid_e2e::wait_until(
        "the resumed worker gives its partitions up",
        Duration::from_secs(60),
        || {
            if c.flow[1]
                .log_text()
                .matches("gave flow partitions up")
                .count()
                > gave_up
            {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    );
    c.flow[1].assert_running();
}

/// Starts `flow` with `body` on `from` (one at a time) until one
/// completes: the workers poll the network map, so a name another node
/// just published may not be a member to them yet.
fn until_completes(api: &braid_e2e::Api, from: &str, flow: &str, body: &serde_json::Value) {
    // Request ids unique within the test process.
    static PROBES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    braid_e2e::wait_until(
        &format!("{flow} {body} to complete on {from}"),
        Duration::from_secs(90),
        || {
            let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let id = format!("probe-{flow}-{n}");
            api.start_flow(from, &id, flow, body);
            let st = api.wait_terminal(from, &id);
            if st.status == "COMPLETED" {
                Ok(())
            } else {
                Err(st.describe())
            }
        },
    );
}

/// A worker of a cluster in an application network: `roles` on database
/// `db` and `broker`, with `config` (its node.json) and `partitions`
/// flow partitions.
fn networked_worker(
    db: &str,
    broker: &Broker,
    config: &str,
    roles: &str,
    partitions: u16,
) -> NodeOptions {
    Node::options()
        .arg("--store")
        .arg(db)
        .arg("--bus")
        .arg(broker.url())
        .arg("--roles")
        .arg(roles)
        .arg("--flow-partitions")
        .arg(partitions.to_string())
        .arg("--network-config")
        .arg(config)
}

/// `n` loopback addresses for the gateways of `node`'s cluster, and a TCP
/// balancer spreading the gateway address its network map lists over them.
fn balanced_gateways(
    net: &braid_e2e::network::Network,
    node: &str,
    n: usize,
) -> (braid_e2e::balancer::Balancer, Vec<std::net::SocketAddr>) {
    let gateways: Vec<std::net::SocketAddr> = (0..n)
        .map(|_| {
            format!("127.0.0.1:{}", braid_testkit::free_port())
                .parse()
                .unwrap()
        })
        .collect();
    let balancer = braid_e2e::balancer::Balancer::start(net.gateway_addr(node), gateways.clone());
    (balancer, gateways)
}

/// A gateway worker (`opts` of `--roles gateway`) listening on `addr`.
fn gateway_at(opts: NodeOptions, addr: &std::net::SocketAddr) -> Node {
    opts.arg("--gateway-listen")
        .arg(addr.to_string())
        .no_rest()
        .start()
}

/// The partitions a link manager or gateway said last (`said ... held=`)
/// that it holds.
fn last_held(worker: &Node, said: &str) -> Vec<u16> {
    let log = worker.log_text();
    let Some(line) = log.lines().rev().find(|l| l.contains(said)) else {
        return Vec::new();
    };
    // Without the log's colours.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let held = plain.rsplit("held=").next().unwrap_or_default();
    held.trim_matches(|c: char| !c.is_ascii_digit())
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn a_cluster_with_its_own_link_managers_and_gateways_and_an_embedded_node_ping_each_other() {
    use braid_e2e::network::Network;
    const CAROL: &str = "O=Carol, L=Paris, C=FR";
    const DAVE: &str = "O=Dave, L=Berlin, C=DE";
    const ERIN: &str = "O=Erin, L=Madrid, C=ES";
    const N: usize = 20;
    // alpha: an embedded node, the network's operator (map server).
    // beta: a cluster (its own broker and database) of two REST workers,
    // two flow workers, two link managers (each with the map client) and
    // two gateways behind a TCP load balancer at the address the map
    // lists, each its own process.
    let net = Network::bootstrap(&["alpha", "beta"], &[]);
    let alpha = net.start("alpha");
    let broker = Broker::start();
    let db = braid_testkit::fresh_database();
    let beta = net.config_path("beta").to_string_lossy().into_owned();
    let (_balancer, gateways) = balanced_gateways(&net, "beta", 2);
    let opts = |roles: &str| networked_worker(&db, &broker, &beta, roles, 8);
    let gateway = |addr: &std::net::SocketAddr| gateway_at(opts("gateway"), addr);
    let mut workers = vec![
        opts("flow").no_rest().start(),
        opts("flow").no_rest().start(),
        opts("link,membership").no_rest().start(),
        opts("link,membership").no_rest().start(),
        gateway(&gateways[0]),
        gateway(&gateways[1]),
    ];
    let rest = opts("rest").start();
    let rest2 = opts("rest").start();
    let api = rest.api().clone();

    let alice = alpha.vnode(ALICE, Pkg::Ping);
    alpha.vnode(DAVE, Pkg::Proposal);
    let bob = rest.vnode(BOB, Pkg::Ping);
    let carol = rest.vnode(CAROL, Pkg::Proposal);
    rest.vnode(ERIN, Pkg::Proposal);
    let everyone = [ALICE, BOB, CAROL, DAVE, ERIN];
    Network::wait_members(alpha.api(), &everyone);
    // The cluster's REST workers show the map too (a read-only copy: the
    // operator is the embedded node).
    for r in [&api, rest2.api()] {
        Network::wait_members(r, &everyone);
        let view = r.get("/api/v1/network").expect("GET network");
        assert_eq!(view.json["configured"], true, "{}", view.text);
        assert_eq!(view.json["operator"], false, "{}", view.text);
    }
    until_completes(alpha.api(), &alice, "ping", &crate::ping_body(BOB, 0, 0));
    until_completes(&api, &bob, "ping", &crate::ping_body(ALICE, 0, 0));

    // Both directions at once; both REST workers stream Bob's flows.
    let stream = |api: &braid_e2e::Api| {
        let path = format!("/api/v1/flow/{bob}/events");
        crate::streams::open_stream(api, &path, None, Default::default())
            .unwrap_or_else(|(status, body)| panic!("{path}: {status} {body}"))
    };
    let (sa, sb) = (stream(&api), stream(rest2.api()));
    let to_bob = start_pings(alpha.api(), &alice, BOB, "to-bob", N, 0);
    let to_alice = start_pings(&api, &bob, ALICE, "to-alice", N, 0);
    let flows = alpha
        .api()
        .wait_all_terminal(&alice, &to_bob, Duration::from_secs(120));
    assert_pings_ok(&flows, &to_bob, BOB);
    let flows = api.wait_all_terminal(&bob, &to_alice, Duration::from_secs(120));
    assert_pings_ok(&flows, &to_alice, ALICE);
    assert_eq!(
        streamed(&sa, &to_alice),
        streamed(&sb, &to_alice),
        "the two REST workers' streams"
    );
    for id in &to_alice {
        let (x, y) = (api.status(&bob, id), rest2.api().status(&bob, id));
        assert_eq!(
            (x.status, x.result, x.flow_id),
            (y.status, y.result, y.flow_id),
            "{id}"
        );
    }
    // One responder per ping on each side (the probes' too), each done.
    let probes_b = api.wait_responders_terminal(&bob, N + 1, Duration::from_secs(60));
    braid_e2e::assert_all_completed(&probes_b, "Bob's responders (in the cluster)");
    let on_alice = alpha
        .api()
        .wait_responders_terminal(&alice, N + 1, Duration::from_secs(60));
    braid_e2e::assert_all_completed(&on_alice, "Alice's responders (embedded)");

    // Three parties: Carol (cluster) asks Dave (embedded) and Erin
    // (cluster).
    until_completes(
        &api,
        &carol,
        "propose",
        &serde_json::json!({"counterparties": [DAVE, ERIN], "proposal": "a first one"}),
    );
    proposals_yes_and_no(&api, &carol, DAVE, ERIN);

    // Each link manager carries some of the pairs, each gateway sends
    // what is on some of link.out's partitions; Bob and Alice's pair and
    // Alice's gateway (link.out is keyed by endpoint) are on one each.
    const LINKS: &str = "link manager: the partitions of pairs it carries";
    const GATEWAYS: &str = "gateway: the partitions of link.out it sends";
    let pair =
        braid_bus::topics::partition_of(&braid_types::pair_key(&bob.parse().unwrap(), ALICE), 8);
    let to_alpha = net.config("alpha")["gateway_endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    let to_alpha = braid_bus::topics::partition_of(to_alpha.as_bytes(), 8);
    let holder = |of: &[Node], said: &str, p: u16| -> usize {
        let held: Vec<Vec<u16>> = of.iter().map(|w| last_held(w, said)).collect();
        assert!(
            held.iter().all(|h| !h.is_empty()),
            "each holds some partitions: {held:?}"
        );
        held.iter()
            .position(|h| h.contains(&p))
            .unwrap_or_else(|| panic!("nobody holds partition {p}: {held:?}"))
    };
    let link = 2 + holder(&workers[2..4], LINKS, pair);
    let gateway = 4 + holder(&workers[4..6], GATEWAYS, to_alpha);

    // The link manager that carries Bob and Alice's pair and the gateway
    // that sends to Alice's SIGKILLed with exchanges in flight both ways
    // (responders sleep 1 s), and not started again: the other link
    // manager takes the pair over, the other gateway its share of
    // link.out (the balancer sends peers to the one alive), and every
    // ping completes, exactly once (each responder insists on one message
    // after its pong).
    let k_bob = start_pings(alpha.api(), &alice, BOB, "k-bob", N, 1000);
    let k_alice = start_pings(&api, &bob, ALICE, "k-alice", N, 1000);
    api.wait_responders(&bob, 2 * N + 1, Duration::from_secs(60));
    workers[link].kill();
    workers[gateway].kill();
    let flows = alpha
        .api()
        .wait_all_terminal(&alice, &k_bob, Duration::from_secs(180));
    assert_pings_ok(&flows, &k_bob, BOB);
    let flows = api.wait_all_terminal(&bob, &k_alice, Duration::from_secs(180));
    assert_pings_ok(&flows, &k_alice, ALICE);
    let done = api.wait_responders_terminal(&bob, 2 * N + 1, Duration::from_secs(60));
    braid_e2e::assert_all_completed(&done, "Bob's responders after the kills");
    let done = alpha
        .api()
        .wait_responders_terminal(&alice, 2 * N + 1, Duration::from_secs(60));
    braid_e2e::assert_all_completed(&done, "Alice's responders after the kills");
    // The survivors hold what the dead held; new exchanges run on them.
    let (other_link, other_gateway) = (5 - link, 9 - gateway);
    assert!(last_held(&workers[other_link], LINKS).contains(&pair));
    assert!(last_held(&workers[other_gateway], GATEWAYS).contains(&to_alpha));
    until_completes(&api, &bob, "ping", &crate::ping_body(ALICE, 0, 0));
    until_completes(alpha.api(), &alice, "ping", &crate::ping_body(BOB, 0, 0));

    // Each worker did its own part: the link managers ran no gateway and
    // no flow, the gateways no link, the flow workers neither.
    for w in &workers[2..4] {
        let links = w.log_text();
        assert!(
            links.contains("link manager starting"),
            "{}",
            w.log_tail(40)
        );
        assert!(!links.contains("gateway listening"));
        assert!(!links.contains("took flow partitions over"));
    }
    for w in &workers[4..6] {
        let gateway = w.log_text();
        assert!(gateway.contains("gateway listening"), "{}", w.log_tail(40));
        assert!(!gateway.contains("link manager starting"));
    }
    for w in &workers[..2] {
        let log = w.log_text();
        assert!(log.contains("took flow partitions over"));
        assert!(!log.contains("gateway listening") && !log.contains("link manager starting"));
    }
    for (i, n) in workers.iter_mut().enumerate() {
        if i != link && i != gateway {
            n.assert_running();
        }
    }
    drop(workers);
    drop((rest, rest2));
    braid_testkit::drop_database(&db);
}

#[test]
fn an_operator_cluster_approves_members_through_any_of_its_rest_workers() {
    use braid_e2e::network::Network;
    use serde_json::json;
    // beta: a cluster that is the network's operator (each of its two
    // gateways, behind a load balancer, runs a map server on the state in
    // the store), with manual approval; alpha: an embedded member.
    let net = Network::bootstrap(&["beta", "alpha"], &["--manual-approval"]);
    let broker = Broker::start();
    let db = braid_testkit::fresh_database();
    let beta = net.config_path("beta").to_string_lossy().into_owned();
    let (_balancer, gateways) = balanced_gateways(&net, "beta", 2);
    let opts = |roles: &str| networked_worker(&db, &broker, &beta, roles, 4);
    let gateway = |addr: &std::net::SocketAddr| gateway_at(opts("gateway"), addr);
    let mut workers = [
        gateway(&gateways[0]),
        gateway(&gateways[1]),
        opts("flow").no_rest().start(),
        opts("link,membership").no_rest().start(),
    ];
    let rest = [opts("rest").start(), opts("rest").start()];
    let alpha = net.start("alpha");
    let alice = alpha.vnode(ALICE, Pkg::Ping);
    let bob = rest[0].vnode(BOB, Pkg::Ping);
    for r in &rest {
        let view = r.api().get("/api/v1/network").expect("GET network");
        assert_eq!(view.json["operator"], true, "{}", view.text);
    }
    // Both registrations wait for approval; either REST worker lists them.
    let pending = |api: &braid_e2e::Api| -> Vec<String> {
        let r = api.get("/api/v1/network/pending").expect("GET pending");
        r.json["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    braid_e2e::wait_until(
        "both registrations to be pending",
        braid_e2e::DEADLINE,
        || {
            let names = pending(rest[1].api());
            if names.iter().any(|n| n == ALICE) && names.iter().any(|n| n == BOB) {
                Ok(())
            } else {
                Err(format!("pending: {names:?}"))
            }
        },
    );
    let approve = |api: &braid_e2e::Api, name: &str| {
        let path = format!(
            "/api/v1/network/members/{}/approve",
            name.replace(' ', "%20")
        );
        api.post_json(&path, &json!({})).expect("approve")
    };
    // One gateway dies: the other's map server carries on, on the state
    // both kept in the store (the registrations may have reached either).
    workers[0].kill();
    // Approved through one REST worker each; answered once recorded.
    approve(rest[0].api(), ALICE).expect_status(&[204], "approve Alice");
    approve(rest[1].api(), BOB).expect_status(&[204], "approve Bob");
    assert!(
        pending(rest[0].api()).is_empty(),
        "nothing pending any more"
    );
    // Approving again, or someone who never registered: 404.
    approve(rest[1].api(), ALICE).expect_problem(&[404], "approve Alice again");
    approve(rest[0].api(), "O=Nobody, L=Nowhere, C=GB")
        .expect_problem(&[404], "approve a stranger");
    for api in [alpha.api(), rest[0].api(), rest[1].api()] {
        Network::wait_members(api, &[ALICE, BOB]);
    }
    until_completes(alpha.api(), &alice, "ping", &crate::ping_body(BOB, 0, 0));
    until_completes(rest[1].api(), &bob, "ping", &crate::ping_body(ALICE, 0, 0));
    for w in &mut workers[1..] {
        w.assert_running();
    }
}
