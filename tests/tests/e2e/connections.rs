//! The REST server's connection hygiene (issue 8, section 4): silent,
//! idle and slow clients are cut off after their timeout, the number of
//! open connections is bounded (extra ones are closed at once), a stalled
//! request body is cut off, and each of these logs a line that a flood of
//! bad clients cannot multiply — while the API keeps answering.
//!
//! The node runs with short timeouts set by flags; the clients are raw TCP
//! and TLS sockets, so the test controls every byte.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use braid_e2e::{
    ADMIN_PASSWORD, ADMIN_USER, Node, parse_complete_response, raw_request, tls_client_config,
    wait_until,
};

/// How long a connection may take to be closed after its timeout: generous,
/// the machine is shared; without the fix it is never closed.
const CLOSE_BOUND: Duration = Duration::from_secs(15);

/// A socket the test can read with a timeout: plain TCP or TLS over TCP.
trait Conn: Read + Write {
    fn tcp(&self) -> &TcpStream;
}

impl Conn for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl Conn for Tls {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

fn addr_of(base: &str) -> SocketAddr {
    base.strip_prefix("https://")
        .unwrap_or_else(|| panic!("an https:// node, got {base}"))
        .parse()
        .expect("rest.url holds IP:port")
}

/// A TLS connection to the node with its handshake completed.
fn tls_connect(base: &str) -> Tls {
    let tcp = TcpStream::connect(addr_of(base)).expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("a server name");
    let conn = rustls::ClientConnection::new(tls_client_config(base), name).expect("TLS client");
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .expect("the TLS handshake completes");
    }
    s
}

/// Reads once, waiting at most `wait`; appends what arrived to `out`.
/// Returns whether the server closed the connection (EOF or reset).
fn poll_closed(c: &mut impl Conn, wait: Duration, out: &mut Vec<u8>) -> bool {
    c.tcp()
        .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .expect("set_read_timeout");
    let mut buf = [0u8; 8192];
    match c.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => {
            out.extend_from_slice(&buf[..n]);
            false
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        // A reset, or TLS without close_notify: closed either way.
        Err(_) => true,
    }
}

/// Waits until the server closes `c`, at most `bound` from `since`;
/// returns how long after `since` it was closed, and what it sent.
fn wait_closed(
    c: &mut impl Conn,
    since: Instant,
    bound: Duration,
    what: &str,
) -> (Duration, Vec<u8>) {
    let mut out = Vec::new();
    loop {
        let left = bound.saturating_sub(since.elapsed());
        if left.is_zero() {
            panic!(
                "{what}: still open {bound:?} later; received {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        if poll_closed(c, left.min(Duration::from_millis(200)), &mut out) {
            return (since.elapsed(), out);
        }
    }
}

/// Sends `head`, then `trickle` one byte every 200 ms, round and round
/// (never finishing), until the server closes the connection; returns how
/// long after the first trickled byte that was, and what the server sent.
fn trickle(c: &mut impl Conn, head: &[u8], trickle: &[u8], what: &str) -> (Duration, Vec<u8>) {
    c.write_all(head).expect("write the head");
    c.flush().expect("flush");
    let start = Instant::now();
    let mut out = Vec::new();
    for b in trickle.iter().cycle() {
        if start.elapsed() > CLOSE_BOUND {
            panic!(
                "{what}: still open {CLOSE_BOUND:?} later; received {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        if c.write_all(&[*b]).and_then(|()| c.flush()).is_err()
            || poll_closed(c, Duration::from_millis(200), &mut out)
        {
            return (start.elapsed(), out);
        }
    }
    unreachable!("cycle never ends")
}

fn basic_auth() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN_USER}:{ADMIN_PASSWORD}"))
}

/// The node's log lines that contain `needle`.
fn log_lines(node: &Node, needle: &str) -> Vec<String> {
    std::fs::read_to_string(node.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

fn health_answers(base: &str) -> Result<(), String> {
    match raw_request(
        base,
        "GET",
        "/api/v1/health",
        "text/plain",
        Arc::new(Vec::new()),
    ) {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("health answered {}: {}", r.status, r.text)),
        Err(e) => Err(format!("health: {e}")),
    }
}

#[track_caller]
fn assert_after_timeout(took: Duration, timeout: Duration, what: &str) {
    // Not closed at once for some other reason: only once the timeout ran.
    assert!(
        took >= timeout.mul_f64(0.8),
        "{what}: closed after {took:?}, before its timeout of {timeout:?}"
    );
}

#[test]
fn silent_idle_and_slow_connections_are_closed_while_the_api_answers() {
    let timeout = Duration::from_secs(1);
    let node = Node::options()
        .arg("--rest-tls-handshake-timeout-secs=1")
        .arg("--rest-header-timeout-secs=1")
        .arg("--rest-idle-timeout-secs=1")
        .start();
    let base = node.api().base().to_owned();

    // Several of each, at once: each is cut off by its own timer.
    let mut slowloris = Vec::new();
    for i in 0..3 {
        let base = base.clone();
        slowloris.push(std::thread::spawn(move || {
            let mut c = tls_connect(&base);
            trickle(
                &mut c,
                b"GET /api/v1/health HTTP/1.1\r\nHost: node\r\nX-Slow: ",
                b"abcdefgh",
                &format!("slowloris header #{i}"),
            )
        }));
    }
    let opened = Instant::now();
    let mut no_handshake: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(addr_of(&base)).expect("connect"))
        .collect();
    let mut silent: Vec<Tls> = (0..3).map(|_| tls_connect(&base)).collect();
    let silent_since = Instant::now();

    // One keep-alive connection that made a request and then goes quiet.
    let mut kept = tls_connect(&base);
    kept.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: node\r\n\r\n")
        .expect("write a request");
    let mut got = Vec::new();
    while parse_complete_response(&got).is_none() {
        assert!(
            !poll_closed(&mut kept, Duration::from_secs(5), &mut got),
            "the keep-alive connection was closed before its answer: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let answered = Instant::now();
    let r = parse_complete_response(&got).expect("a complete response");
    assert_eq!(r.status, 200, "{}", r.text);

    // While all of those hang around, the API answers new clients.
    health_answers(&base).expect("the API answers while bad clients hold connections");

    for (i, c) in no_handshake.iter_mut().enumerate() {
        let (took, _) = wait_closed(c, opened, CLOSE_BOUND, &format!("no TLS handshake #{i}"));
        assert_after_timeout(took, timeout, "no TLS handshake");
    }
    for (i, c) in silent.iter_mut().enumerate() {
        let (took, _) = wait_closed(c, silent_since, CLOSE_BOUND, &format!("silent TLS #{i}"));
        assert_after_timeout(took, timeout, "silent TLS connection");
    }
    let (took, _) = wait_closed(&mut kept, answered, CLOSE_BOUND, "idle keep-alive");
    assert_after_timeout(took, timeout, "idle keep-alive connection");
    for t in slowloris {
        let (took, _) = t.join().expect("slowloris thread");
        assert_after_timeout(took, timeout, "slowloris header");
    }

    health_answers(&base).expect("the API answers after the bad clients are gone");
    // Each class says what happened and which flag sets its timeout.
    for flag in [
        "--rest-tls-handshake-timeout-secs",
        "--rest-header-timeout-secs",
        "--rest-idle-timeout-secs",
    ] {
        wait_until(&format!("a log line naming {flag}"), CLOSE_BOUND, || {
            if log_lines(&node, flag).is_empty() {
                Err(node.log_tail(20))
            } else {
                Ok(())
            }
        });
    }
}

#[test]
fn connections_over_the_limit_are_closed_at_once_and_logged_a_bounded_number_of_times() {
    let limit = 8;
    let node = Node::options()
        .arg(format!("--rest-max-connections={limit}"))
        // Held connections stay until the test lets them go.
        .arg("--rest-tls-handshake-timeout-secs=600")
        .start();
    let base = node.api().base().to_owned();
    let addr = addr_of(&base);

    // Fill the server up: each held connection is accepted and waits for
    // its TLS handshake. (The harness's own client may hold one too.)
    let mut held = Vec::new();
    let first_refused = loop {
        let mut c = TcpStream::connect(addr).expect("connect");
        let mut out = Vec::new();
        if poll_closed(&mut c, Duration::from_millis(500), &mut out) {
            break c;
        }
        held.push(c);
        assert!(
            held.len() <= limit,
            "{} connections are held open, more than --rest-max-connections={limit}",
            held.len()
        );
    };
    drop(first_refused);
    assert!(
        held.len() + 1 >= limit,
        "refused after only {} connections (limit {limit})",
        held.len()
    );

    // A flood of extra connections: each is closed at once.
    let flood = 200;
    for i in 0..flood {
        let since = Instant::now();
        let mut c = TcpStream::connect(addr).expect("connect: the backlog must not fill");
        wait_closed(
            &mut c,
            since,
            Duration::from_secs(5),
            &format!("extra connection #{i}"),
        );
    }
    assert!(
        health_answers(&base).is_err(),
        "a new client got an answer while the server is full"
    );

    // The refusals are logged, but not once per refused connection.
    let needle = "--rest-max-connections";
    wait_until("a log line about the limit", CLOSE_BOUND, || {
        if log_lines(&node, needle).is_empty() {
            Err(node.log_tail(20))
        } else {
            Ok(())
        }
    });
    let lines = log_lines(&node, needle);
    assert!(
        lines.len() <= 20,
        "{flood} refused connections logged {} lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(
        lines.iter().any(|l| l.contains("suppressed")),
        "the log does not say how many lines were suppressed:\n{}",
        lines.join("\n")
    );

    // Once the held connections go, the API answers again.
    drop(held);
    wait_until(
        "the API to answer once the held connections are gone",
        CLOSE_BOUND,
        || health_answers(&base),
    );
}

#[test]
fn a_trickled_request_body_is_cut_off_with_408() {
    let timeout = Duration::from_secs(1);
    let node = Node::options().arg("--rest-body-timeout-secs=1").start();
    let base = node.api().base().to_owned();
    let head = format!(
        "POST /api/v1/virtualnode HTTP/1.1\r\nHost: node\r\nAuthorization: Basic {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{",
        basic_auth()
    );

    // A body sent a byte at a time, and one that stops after its first byte.
    let mut stalled = tls_connect(&base);
    stalled
        .write_all(head.as_bytes())
        .expect("write the stalled request");
    stalled.flush().expect("flush");
    let stalled_since = Instant::now();
    let mut slow = tls_connect(&base);
    let (took, answer) = trickle(&mut slow, head.as_bytes(), b" ", "trickled body");
    assert_after_timeout(took, timeout, "trickled body");
    let (took_stalled, stalled_answer) =
        wait_closed(&mut stalled, stalled_since, CLOSE_BOUND, "stalled body");
    assert_after_timeout(took_stalled, timeout, "stalled body");

    for (what, answer) in [("trickled", answer), ("stalled", stalled_answer)] {
        let r = parse_complete_response(&answer).unwrap_or_else(|| {
            panic!(
                "{what} body: no complete answer before the close: {:?}",
                String::from_utf8_lossy(&answer)
            )
        });
        r.expect_problem(&[408], &format!("{what} request body"));
        assert!(
            r.text.contains("--rest-body-timeout-secs"),
            "{what}: the answer does not say which limit: {}",
            r.text
        );
    }
    health_answers(&base).expect("the API answers");
    wait_until("a log line about the body timeout", CLOSE_BOUND, || {
        if log_lines(&node, "--rest-body-timeout-secs").is_empty() {
            Err(node.log_tail(20))
        } else {
            Ok(())
        }
    });
}
