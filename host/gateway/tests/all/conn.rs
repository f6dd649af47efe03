//! The gateway's connection hygiene: clients that stall (a body, a header,
//! a handshake, or nothing at all) are cut off, connections over the limit
//! are closed at once, and what anyone can make the server log is
//! rate-limited.

use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_gateway::{PeerCheck, RevocationMode, ServerConfig};
use braid_http::{LOG_LINES, Limits};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pki::Ca;
use crate::tests::{Logs, Net};
use crate::util::{allow_all, batch, client, raw, start, status, tls_connect};

/// How long a connection may take to be closed after a 1 s timeout
/// (generous: the machine is shared; without the fix it is 30 s or never).
const BOUND: Duration = Duration::from_secs(10);

/// Every timeout 1 s.
fn short(config: ServerConfig) -> ServerConfig {
    let second = Duration::from_secs(1);
    ServerConfig {
        limits: Limits {
            handshake_timeout: second,
            header_timeout: second,
            idle_timeout: second,
            body_timeout: second,
            write_timeout: second,
            ..Limits::default()
        },
        ..config
    }
}

/// Reads until the server closes `s`; returns how long after `since` it
/// did, and what it sent.
async fn closed(
    s: &mut (impl AsyncRead + Unpin),
    since: Instant,
    what: &str,
) -> (Duration, String) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = BOUND.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "{what}: still open {BOUND:?} later; received {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    (since.elapsed(), String::from_utf8_lossy(&out).into_owned())
}

/// Sends `head`, then `trickle` a byte every 100 ms, round and round, until
/// the server closes the connection; returns how long after the head that
/// was, and what the server sent.
async fn trickle(
    s: &mut (impl AsyncRead + AsyncWrite + Unpin),
    head: &[u8],
    trickle: &[u8],
    what: &str,
) -> (Duration, String) {
    s.write_all(head).await.unwrap();
    s.flush().await.unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    for b in trickle.iter().cycle() {
        assert!(
            start.elapsed() < BOUND,
            "{what}: still open {BOUND:?} later; received {:?}",
            String::from_utf8_lossy(&out)
        );
        if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    (start.elapsed(), String::from_utf8_lossy(&out).into_owned())
}

#[track_caller]
fn assert_after_timeout(took: Duration, what: &str) {
    assert!(
        took >= Duration::from_millis(800),
        "{what}: closed after {took:?}, before its 1 s timeout"
    );
}

const STALLED_POST: &[u8] =
    b"POST /gateway/v1/packets HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n\x01\x00";

#[tokio::test]
async fn a_stalled_or_trickled_body_is_cut_off_with_408() {
    let net = Net::new();
    let mut srv = start(
        short(net.server_config(true, RevocationMode::Hard)),
        4,
        allow_all(),
    )
    .await;
    let tls = net.client_tls(&net.alice);

    let mut stalled = tls_connect(srv.addr, &tls, true).await.unwrap();
    stalled.write_all(STALLED_POST).await.unwrap();
    stalled.flush().await.unwrap();
    let (took, stalled_answer) = closed(&mut stalled, Instant::now(), "stalled body").await;
    assert_after_timeout(took, "stalled body");

    let mut slow = tls_connect(srv.addr, &tls, true).await.unwrap();
    let (took, slow_answer) = trickle(&mut slow, STALLED_POST, b"\x00", "trickled body").await;
    assert_after_timeout(took, "trickled body");

    for answer in [stalled_answer, slow_answer] {
        assert_eq!(status(&answer), 408, "{answer}");
        assert!(answer.contains("--gateway-body-timeout-secs"), "{answer}");
    }
    srv.assert_nothing_delivered();
    // The server goes on serving members.
    client(tls, true)
        .send(&srv.endpoint, None, &batch(1))
        .await
        .unwrap();
    srv.rx.recv().await.unwrap();
}

#[tokio::test]
async fn silent_idle_and_slow_header_connections_are_closed() {
    let net = Net::new();
    let srv = start(
        short(net.server_config(true, RevocationMode::Hard)),
        4,
        allow_all(),
    )
    .await;
    let tls = net.client_tls(&net.alice);

    let since = Instant::now();
    let mut no_tls = TcpStream::connect(srv.addr).await.unwrap();
    let (took, _) = closed(&mut no_tls, since, "no TLS handshake").await;
    assert_after_timeout(took, "no TLS handshake");

    let mut silent = tls_connect(srv.addr, &tls, true).await.unwrap();
    let (took, _) = closed(&mut silent, Instant::now(), "silent TLS connection").await;
    assert_after_timeout(took, "silent TLS connection");

    let mut kept = tls_connect(srv.addr, &tls, true).await.unwrap();
    kept.write_all(b"GET /network/v1/whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("leaf=true") {
        let n = kept.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before its answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let (took, _) = closed(&mut kept, Instant::now(), "idle keep-alive connection").await;
    assert_after_timeout(took, "idle keep-alive connection");

    let mut slowloris = tls_connect(srv.addr, &tls, true).await.unwrap();
    let (took, _) = trickle(
        &mut slowloris,
        b"POST /gateway/v1/packets HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        b"abcdef",
        "slow header",
    )
    .await;
    assert_after_timeout(took, "slow header");
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let net = Net::new();
    let limit = 4;
    let mut config = net.server_config(true, RevocationMode::Hard);
    config.limits.max_connections = limit;
    let mut srv = start(config, 4, allow_all()).await;

    // Held in their TLS handshake (10 s by default: plenty).
    let mut held = Vec::new();
    for _ in 0..limit {
        held.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    let deadline = Instant::now() + BOUND;
    while srv.server.accepted_connections() < limit as u64 {
        assert!(
            Instant::now() < deadline,
            "the held connections were not accepted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..50 {
        let mut extra = TcpStream::connect(srv.addr).await.unwrap();
        let (took, _) = closed(
            &mut extra,
            Instant::now(),
            &format!("extra connection #{i}"),
        )
        .await;
        assert!(
            took < Duration::from_secs(2),
            "extra connection #{i} took {took:?} to be closed"
        );
    }
    assert_eq!(srv.server.refused_connections(), 50);

    // Once they go, members get through again.
    drop(held);
    let c = client(net.client_tls(&net.alice), true);
    let deadline = Instant::now() + BOUND;
    while let Err(e) = c.send(&srv.endpoint, None, &batch(1)).await {
        assert!(
            Instant::now() < deadline,
            "still refused after the held connections went: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.rx.recv().await.unwrap();
}

fn count(lines: &[String], needle: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn floods_of_failed_handshakes_and_refused_peers_log_a_bounded_number_of_lines() {
    let logs = Logs::global();
    logs.take_warnings();
    let net = Net::new();
    let refuse: Arc<dyn PeerCheck> = Arc::new(|_: Option<&[u8]>| Err("not a member".to_owned()));
    let srv = start(net.server_config(true, RevocationMode::Hard), 4, refuse).await;

    // 1,000 connections that do not speak TLS at all.
    for _ in 0..1000 {
        let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
        let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    }
    // 100 handshakes with a certificate from another CA.
    let rogue = Ca::new("rogue CA")
        .node("Mallory", 9)
        .material(&net.ca, None, RevocationMode::Off);
    for _ in 0..100 {
        raw(
            srv.addr,
            &rogue,
            true,
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
    }
    // 200 batches from a certificate the membership refuses.
    let post = b"POST /gateway/v1/packets HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let tls = net.client_tls(&net.alice);
    for _ in 0..200 {
        let res = raw(srv.addr, &tls, true, post).await;
        assert_eq!(status(&res), 403, "{res}");
    }

    let lines = logs.take_warnings();
    for (needle, floods) in [("TLS handshake failed", 1100), ("not a member", 200)] {
        let mine = count(&lines, needle);
        assert!(
            (1..=LOG_LINES as usize).contains(&mine.len()),
            "{floods} events logged {} lines about {needle:?}:\n{}",
            mine.len(),
            mine.join("\n")
        );
        assert!(
            mine.last().is_some_and(|l| l.contains("suppressed")),
            "the last line about {needle:?} does not say the rest are suppressed:\n{}",
            mine.join("\n")
        );
    }
    assert!(
        lines.len() <= 2 * LOG_LINES as usize,
        "{} warning lines in all:\n{}",
        lines.len(),
        lines.join("\n")
    );
}
