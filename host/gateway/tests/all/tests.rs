//! The gateway's behaviour over real TLS connections.

use std::sync::Arc;
use std::time::Duration;

use braid_gateway::{RevocationMode, SendError, ServerConfig, TlsMaterial, encode_batch};

use crate::pki::{Ca, Cert};
use crate::util::{allow_all, batch, client, raw, start, status};

/// A network: CA, a server node, a client node, a CRL file revoking nothing.
pub(crate) struct Net {
    pub(crate) ca: Ca,
    pub(crate) server: Cert,
    pub(crate) alice: Cert,
    dir: tempfile::TempDir,
}

impl Net {
    pub(crate) fn new() -> Self {
        let ca = Ca::new("braid test network CA");
        let server = ca.node("Bob", 2);
        let alice = ca.node("Alice", 3);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("crl.pem"), ca.crl(1, &[])).unwrap();
        Self {
            ca,
            server,
            alice,
            dir,
        }
    }

    pub(crate) fn crl(&self) -> std::path::PathBuf {
        self.dir.path().join("crl.pem")
    }

    pub(crate) fn server_config(&self, mutual_tls: bool, mode: RevocationMode) -> ServerConfig {
        ServerConfig::new(
            self.server.material(&self.ca, Some(&self.crl()), mode),
            mutual_tls,
        )
    }

    pub(crate) fn client_tls(&self, cert: &Cert) -> TlsMaterial {
        cert.material(&self.ca, Some(&self.crl()), RevocationMode::Hard)
    }
}

#[tokio::test]
async fn round_trip_over_one_reused_connection() {
    let net = Net::new();
    let mut srv = start(
        net.server_config(true, RevocationMode::Hard),
        16,
        allow_all(),
    )
    .await;
    let c = client(net.client_tls(&net.alice), true);
    for n in 1..=3 {
        let b = batch(n);
        c.send(&srv.endpoint, Some(net.server.der.as_ref()), &b)
            .await
            .unwrap();
        let got = srv.rx.recv().await.unwrap();
        assert_eq!(got.envelopes, b);
        assert_eq!(got.peer_leaf.as_deref(), Some(net.alice.der.as_ref()));
        assert!(got.peer_addr.ip().is_loopback());
    }
    // A clone shares the pool.
    c.clone()
        .send(&srv.endpoint, None, &batch(1))
        .await
        .unwrap();
    srv.rx.recv().await.unwrap();
    assert_eq!(srv.server.accepted_connections(), 1);
}

#[tokio::test]
async fn concurrent_sends_are_bounded_per_peer() {
    let net = Net::new();
    let mut srv = start(
        net.server_config(false, RevocationMode::Hard),
        64,
        allow_all(),
    )
    .await;
    let mut config = braid_gateway::ClientConfig::new(net.client_tls(&net.alice), false);
    config.per_peer_concurrency = 2;
    let c = braid_gateway::GatewayClient::new(config).unwrap();
    let sends = (0..10).map(|_| {
        let c = c.clone();
        let endpoint = srv.endpoint.clone();
        tokio::spawn(async move { c.send(&endpoint, None, &batch(2)).await })
    });
    for s in sends.collect::<Vec<_>>() {
        s.await.unwrap().unwrap();
    }
    for _ in 0..10 {
        srv.rx.recv().await.unwrap();
    }
    let accepted = srv.server.accepted_connections();
    assert!((1..=2).contains(&accepted), "{accepted} connections");
}

#[tokio::test]
async fn one_way_tls_delivers_without_client_certificate() {
    let net = Net::new();
    let mut srv = start(
        net.server_config(false, RevocationMode::Hard),
        4,
        allow_all(),
    )
    .await;
    let c = client(net.client_tls(&net.alice), false);
    c.send(&srv.endpoint, None, &batch(2)).await.unwrap();
    let got = srv.rx.recv().await.unwrap();
    assert_eq!(got.peer_leaf, None);
}

#[tokio::test]
async fn malformed_batch_is_400_and_delivers_nothing() {
    let net = Net::new();
    let mut srv = start(
        net.server_config(true, RevocationMode::Hard),
        4,
        allow_all(),
    )
    .await;
    let body = b"\x01\x00\x01garbage";
    let mut req = format!(
        "POST /gateway/v1/packets HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let res = raw(srv.addr, &net.client_tls(&net.alice), true, &req).await;
    assert_eq!(status(&res), 400, "{res}");
    assert!(res.contains("from name is 26465 bytes"), "{res}");
    srv.assert_nothing_delivered();
}

#[tokio::test]
async fn too_large_is_413_by_length_and_by_stream() {
    let net = Net::new();
    let mut config = net.server_config(true, RevocationMode::Hard);
    config.max_body = 1024;
    let mut srv = start(config, 4, allow_all()).await;
    let tls = net.client_tls(&net.alice);

    // Content-Length over the limit (the client always sends one).
    let mut big = batch(1);
    big[0].packet = vec![7; 2000];
    let c = client(tls.clone(), true);
    assert_eq!(
        c.send(&srv.endpoint, None, &big).await,
        Err(SendError::TooLarge)
    );

    // Chunked, no length: caught while streaming.
    let body = encode_batch(&big);
    let mut req =
        b"POST /gateway/v1/packets HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for chunk in body.chunks(500) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let res = raw(srv.addr, &tls, true, &req).await;
    assert_eq!(status(&res), 413, "{res}");
    srv.assert_nothing_delivered();

    // Under the limit still works.
    c.send(&srv.endpoint, None, &batch(2)).await.unwrap();
    assert_eq!(srv.rx.recv().await.unwrap().envelopes.len(), 2);
}

#[tokio::test]
async fn full_channel_is_503_overloaded() {
    let net = Net::new();
    let mut srv = start(
        net.server_config(true, RevocationMode::Hard),
        1,
        allow_all(),
    )
    .await;
    let c = client(net.client_tls(&net.alice), true);
    c.send(&srv.endpoint, None, &batch(1)).await.unwrap();
    assert_eq!(
        c.send(&srv.endpoint, None, &batch(2)).await,
        Err(SendError::Overloaded {
            retry_after: Duration::from_secs(1)
        })
    );
    // Only the first batch is there; once drained, sending works again.
    assert_eq!(srv.rx.recv().await.unwrap().envelopes.len(), 1);
    srv.assert_nothing_delivered();
    c.send(&srv.endpoint, None, &batch(3)).await.unwrap();
    assert_eq!(srv.rx.recv().await.unwrap().envelopes.len(), 3);
}

#[tokio::test]
async fn extra_router_serves_other_paths_with_peer_info() {
    let net = Net::new();
    let srv = start(
        net.server_config(true, RevocationMode::Hard),
        1,
        allow_all(),
    )
    .await;
    let tls = net.client_tls(&net.alice);
    let res = raw(
        srv.addr,
        &tls,
        true,
        b"GET /network/v1/whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 200, "{res}");
    assert!(res.ends_with("127.0.0.1 leaf=true"), "{res}");
    let res = raw(
        srv.addr,
        &tls,
        true,
        b"GET /gateway/v1/packets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 405, "{res}");
    let res = raw(
        srv.addr,
        &tls,
        true,
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), 404, "{res}");
}

fn assert_unreachable(r: Result<(), SendError>) -> String {
    match r {
        Err(SendError::Unreachable(msg)) => msg,
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let net = Net::new();
    let mut srv = start(
        net.server_config(true, RevocationMode::Hard),
        4,
        allow_all(),
    )
    .await;
    let rogue_ca = Ca::new("rogue CA");
    let mallory = rogue_ca.node("Mallory", 9);
    // Mallory trusts the real network CA (to reach the server) but her own
    // certificate is from another CA.
    let tls = mallory.material(&net.ca, Some(&net.crl()), RevocationMode::Hard);
    let msg = assert_unreachable(client(tls, true).send(&srv.endpoint, None, &batch(1)).await);
    assert!(
        msg.to_lowercase().contains("alert") || msg.contains("reset"),
        "{msg}"
    );
    srv.assert_nothing_delivered();
}

#[tokio::test]
async fn revoked_client_cert_is_refused_in_hard_mode() {
    let net = Net::new();
    let carol = net.ca.node("Carol", 42);
    std::fs::write(net.crl(), net.ca.crl(2, &[42])).unwrap();
    let mut srv = start(
        net.server_config(true, RevocationMode::Hard),
        4,
        allow_all(),
    )
    .await;
    // The client itself does not check its own certificate: Off on its side
    // is irrelevant, the server refuses.
    assert_unreachable(
        client(net.client_tls(&carol), true)
            .send(&srv.endpoint, None, &batch(1))
            .await,
    );
    srv.assert_nothing_delivered();
    // Alice (not revoked) still gets through.
    client(net.client_tls(&net.alice), true)
        .send(&srv.endpoint, None, &batch(1))
        .await
        .unwrap();
    srv.rx.recv().await.unwrap();
}

#[tokio::test]
async fn non_member_is_forbidden() {
    let net = Net::new();
    let alice = net.alice.der.to_vec();
    let only_alice = Arc::new(move |leaf: Option<&[u8]>| {
        if leaf == Some(alice.as_slice()) {
            Ok(())
        } else {
            Err("not a member of the network".to_owned())
        }
    });
    let mut srv = start(net.server_config(true, RevocationMode::Hard), 4, only_alice).await;
    let dave = net.ca.node("Dave", 5);
    assert_eq!(
        client(net.client_tls(&dave), true)
            .send(&srv.endpoint, None, &batch(1))
            .await,
        Err(SendError::Forbidden("not a member of the network".into()))
    );
    srv.assert_nothing_delivered();
    client(net.client_tls(&net.alice), true)
        .send(&srv.endpoint, None, &batch(1))
        .await
        .unwrap();
    srv.rx.recv().await.unwrap();
}

#[tokio::test]
async fn missing_client_cert_under_mutual_tls_is_refused() {
    let net = Net::new();
    let mut srv = start(
        net.server_config(true, RevocationMode::Hard),
        4,
        allow_all(),
    )
    .await;
    assert_unreachable(
        client(net.client_tls(&net.alice), false)
            .send(&srv.endpoint, None, &batch(1))
            .await,
    );
    srv.assert_nothing_delivered();
}

#[tokio::test]
async fn crl_not_covering_the_issuer_fails_hard_passes_soft() {
    let net = Net::new();
    let other = Ca::new("other CA");
    std::fs::write(net.crl(), other.crl(1, &[])).unwrap();

    let mut hard = start(
        net.server_config(true, RevocationMode::Hard),
        4,
        allow_all(),
    )
    .await;
    // The client side must not be the one failing: it runs with mode off.
    let tls = net.alice.material(&net.ca, None, RevocationMode::Off);
    assert_unreachable(
        client(tls.clone(), true)
            .send(&hard.endpoint, None, &batch(1))
            .await,
    );
    hard.assert_nothing_delivered();

    let mut soft = start(
        net.server_config(true, RevocationMode::Soft),
        4,
        allow_all(),
    )
    .await;
    client(tls, true)
        .send(&soft.endpoint, None, &batch(1))
        .await
        .unwrap();
    soft.rx.recv().await.unwrap();
}

#[tokio::test]
async fn client_in_hard_mode_refuses_server_whose_status_is_unknown() {
    let net = Net::new();
    let srv = start(
        net.server_config(false, RevocationMode::Off),
        4,
        allow_all(),
    )
    .await;
    let other = Ca::new("other CA");
    let crl = net.dir.path().join("other.pem");
    std::fs::write(&crl, other.crl(1, &[])).unwrap();
    let hard = net
        .alice
        .material(&net.ca, Some(&crl), RevocationMode::Hard);
    assert_unreachable(
        client(hard, false)
            .send(&srv.endpoint, None, &batch(1))
            .await,
    );
    let soft = net
        .alice
        .material(&net.ca, Some(&crl), RevocationMode::Soft);
    client(soft, false)
        .send(&srv.endpoint, None, &batch(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn revoking_after_start_refuses_the_next_connection() {
    let net = Net::new();
    let mut srv = start(
        net.server_config(true, RevocationMode::Hard),
        64,
        allow_all(),
    )
    .await;
    let tls = net.client_tls(&net.alice);
    client(tls.clone(), true)
        .send(&srv.endpoint, None, &batch(1))
        .await
        .unwrap();
    srv.rx.recv().await.unwrap();

    std::fs::write(net.crl(), net.ca.crl(2, &[3])).unwrap();
    // The server looks at the file at most once a second, at accept time:
    // await the first refused new connection (each client is new, so each
    // send opens a new connection).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The client runs in mode off so that only the server can refuse.
        let c = client(net.alice.material(&net.ca, None, RevocationMode::Off), true);
        match c.send(&srv.endpoint, None, &batch(1)).await {
            Ok(()) => {
                srv.rx.recv().await.unwrap();
                assert!(tokio::time::Instant::now() < deadline, "never refused");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(SendError::Unreachable(_)) => break,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    srv.assert_nothing_delivered();
}

#[tokio::test]
async fn server_cert_from_another_ca_is_unreachable() {
    let net = Net::new();
    let rogue_ca = Ca::new("rogue CA");
    let rogue = rogue_ca.node("Bob", 2);
    let config = ServerConfig::new(rogue.material(&rogue_ca, None, RevocationMode::Off), false);
    let mut srv = start(config, 4, allow_all()).await;
    let msg = assert_unreachable(
        client(net.client_tls(&net.alice), false)
            .send(&srv.endpoint, None, &batch(1))
            .await,
    );
    assert!(msg.contains("UnknownIssuer"), "{msg}");
    srv.assert_nothing_delivered();
}

#[tokio::test]
async fn server_cert_not_the_expected_leaf_is_wrong_peer() {
    let net = Net::new();
    let mut srv = start(
        net.server_config(false, RevocationMode::Hard),
        4,
        allow_all(),
    )
    .await;
    let c = client(net.client_tls(&net.alice), true);
    let listed = net.ca.node("Bob", 77); // what the membership says
    match c
        .send(&srv.endpoint, Some(listed.der.as_ref()), &batch(1))
        .await
    {
        Err(SendError::WrongPeer(msg)) => assert!(msg.contains("Bob"), "{msg}"),
        other => panic!("expected WrongPeer, got {other:?}"),
    }
    srv.assert_nothing_delivered();
    // With the right leaf it goes through.
    c.send(&srv.endpoint, Some(net.server.der.as_ref()), &batch(1))
        .await
        .unwrap();
    srv.rx.recv().await.unwrap();
}

#[tokio::test]
async fn material_loads_from_pem_files() {
    let net = Net::new();
    let d = net.dir.path();
    std::fs::write(d.join("node.pem"), &net.alice.pem).unwrap();
    std::fs::write(d.join("node.key"), &net.alice.key_pem).unwrap();
    std::fs::write(d.join("ca.pem"), net.ca.pem()).unwrap();
    let m = TlsMaterial::from_pem_files(
        &d.join("node.pem"),
        &d.join("node.key"),
        &d.join("ca.pem"),
        Some(&net.crl()),
        RevocationMode::Hard,
    )
    .unwrap();
    assert_eq!(m.chain, vec![net.alice.der.clone()]);
    assert_eq!(m.roots, vec![net.ca.der()]);
    assert!(
        TlsMaterial::from_pem_files(
            &d.join("missing.pem"),
            &d.join("node.key"),
            &d.join("ca.pem"),
            None,
            RevocationMode::Off,
        )
        .is_err()
    );
    // Hard mode needs a CRL file.
    let no_crl = TlsMaterial {
        crl_path: None,
        ..m.clone()
    };
    assert!(
        braid_gateway::GatewayClient::new(braid_gateway::ClientConfig::new(no_crl, true)).is_err()
    );
}

/// The process-wide log capture. Scoped subscribers (`set_default`) race
/// with other tests over tracing's global callsite cache, so one global
/// subscriber records every line with its thread name (the test's name), and a test (on a
/// current-thread runtime, where the server's tasks run too) reads its own.
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    pub(crate) fn global() -> &'static Logs {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .with_thread_names(true)
                .with_writer(move || writer.clone())
                .init();
            logs
        })
    }

    /// This thread's warning lines logged since the last call.
    pub(crate) fn take_warnings(&self) -> Vec<String> {
        let me = std::thread::current().name().unwrap_or_default().to_owned();
        let mut buf = self.0.lock().unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (mine, others): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| l.contains(&me));
        let mut rest = others.join("\n").into_bytes();
        if !rest.is_empty() {
            rest.push(b'\n');
        }
        *buf = rest;
        mine.into_iter()
            .filter(|l| l.contains("WARN"))
            .map(str::to_owned)
            .collect()
    }
}

/// Waits until exactly one warning was logged, and returns it.
async fn one_warning(logs: &Logs) -> String {
    for _ in 0..100 {
        let lines = logs.take_warnings();
        if !lines.is_empty() {
            assert_eq!(lines.len(), 1, "{lines:#?}");
            return lines.into_iter().next().unwrap();
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no warning logged");
}

#[tokio::test(flavor = "current_thread")]
async fn each_rejection_logs_one_line_with_peer_and_reason() {
    let logs = Logs::global();
    logs.take_warnings();
    let net = Net::new();
    let carol = net.ca.node("Carol", 42);
    std::fs::write(net.crl(), net.ca.crl(2, &[42])).unwrap();
    let no_dave = Arc::new(|leaf: Option<&[u8]>| match leaf {
        Some(der) if braid_gateway::tls::describe_certificate(der).contains("Dave") => {
            Err("not a member".to_owned())
        }
        _ => Ok(()),
    });
    let srv = start(net.server_config(true, RevocationMode::Hard), 4, no_dave).await;

    let rogue_ca = Ca::new("rogue CA");
    let cases: Vec<(TlsMaterial, bool, &str)> = vec![
        (
            rogue_ca
                .node("Mallory", 9)
                .material(&net.ca, None, RevocationMode::Off),
            true,
            "UnknownIssuer",
        ),
        (net.client_tls(&carol), true, "Revoked"),
        (net.client_tls(&net.alice), false, "no certificates"),
        (
            net.client_tls(&net.ca.node("Dave", 6)),
            true,
            "not a member",
        ),
    ];
    for (tls, present, reason) in cases {
        let r = client(tls, present)
            .send(&srv.endpoint, None, &batch(1))
            .await;
        println!("client saw: {r:?}");
        assert!(r.is_err());
        let line = one_warning(logs).await;
        println!("server logged: {line}");
        assert!(line.contains("127.0.0.1:"), "{line}");
        assert!(line.contains(reason), "{line}");
    }
}

#[tokio::test]
async fn the_gateway_alone_serves_until_shutdown_and_refuses_an_address_in_use() {
    let net = Net::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let (ready, listening) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let tls = net
        .server
        .material(&net.ca, Some(&net.crl()), RevocationMode::Hard);
    let deps = |tls, inbound, ready| braid_gateway::GatewayDeps {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls,
        mutual_tls: true,
        inbound,
        peers: allow_all(),
        extra: axum::Router::new(),
        fd_limit: 1024,
        ready,
    };
    let server = tokio::spawn(braid_gateway::run(
        braid_gateway::GatewayArgs::default(),
        deps(tls.clone(), tx.clone(), Some(ready)),
        async move {
            let _ = stopped.await;
        },
    ));
    let addr = listening.await.expect("it listens");
    let c = client(net.client_tls(&net.alice), true);
    let b = batch(2);
    c.send(
        &format!("https://{addr}"),
        Some(net.server.der.as_ref()),
        &b,
    )
    .await
    .unwrap();
    assert_eq!(rx.recv().await.unwrap().envelopes, b);
    // A second one on the same address fails at once, saying why.
    let mut taken = deps(tls, tx, None);
    taken.addr = addr;
    let e = braid_gateway::run(
        braid_gateway::GatewayArgs::default(),
        taken,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("binding the gateway"), "{e}");
    stop.send(()).unwrap();
    server.await.unwrap().expect("a clean stop");
}
