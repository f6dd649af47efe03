//! braid-http over real sockets (plain HTTP on 127.0.0.1): write stalls,
//! bodies, and graceful shutdown. The TLS paths, the connection limit and
//! the other timers are exercised by the gateway's tests and the e2e suite.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use braid_http::{Handler, Limits, Names, Peer, RequestBody, Server};
use bytes::Bytes;
use http_body::Frame;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

const NAMES: Names = Names {
    server: "test server",
    flag_prefix: "--test-",
};

/// Generous: the machine is shared.
const BOUND: Duration = Duration::from_secs(10);

/// A response body that never ends; `dropped` fires when the server lets
/// go of it.
struct Forever {
    _dropped: oneshot::Sender<()>,
}

impl http_body::Body for Forever {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 64 << 10])))))
    }
}

/// `/forever`: an endless body (its drop reported on `dropped`);
/// `/slow`: answers once `release` is notified; `/body`: reads the whole
/// body; anything else: `ok`.
struct Test {
    dropped: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    release: Arc<Notify>,
    started: Arc<Notify>,
}

impl Handler for Test {
    async fn call(&self, req: Request<RequestBody>, _: &Peer) -> Response<Body> {
        match req.uri().path() {
            "/forever" => {
                let tx = self.dropped.lock().unwrap().take().expect("one /forever");
                Response::new(Body::new(Forever { _dropped: tx }))
            }
            "/slow" => {
                self.started.notify_one();
                self.release.notified().await;
                Response::new(Body::from("done"))
            }
            "/body" => {
                use http_body_util::BodyExt as _;
                match req.into_body().collect().await {
                    Ok(b) => Response::new(Body::from(format!("{} bytes", b.to_bytes().len()))),
                    Err(e) => {
                        let mut r = Response::new(Body::from(e.to_string()));
                        *r.status_mut() = StatusCode::BAD_REQUEST;
                        r
                    }
                }
            }
            _ => Response::new(Body::from("ok")),
        }
    }

    fn body_timed_out(&self, message: String) -> Response<Body> {
        let mut r = Response::new(Body::from(message));
        *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
        r
    }
}

struct Started {
    addr: SocketAddr,
    dropped: oneshot::Receiver<()>,
    release: Arc<Notify>,
    started: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(limits: Limits) -> Started {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, dropped) = oneshot::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let release = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let handler = Test {
        dropped: std::sync::Mutex::new(Some(tx)),
        release: release.clone(),
        started: started.clone(),
    };
    let serving = tokio::spawn(
        Server::new(NAMES, limits, None, handler).serve(listener, async {
            let _ = stopped.await;
        }),
    );
    Started {
        addr,
        dropped,
        release,
        started,
        stop: Some(stop),
        serving,
    }
}

/// Reads until EOF (or a reset), at most [`BOUND`]; the text received.
async fn read_to_close(s: &mut TcpStream, what: &str) -> String {
    let mut out = Vec::new();
    match tokio::time::timeout(BOUND, s.read_to_end(&mut out)).await {
        Ok(_) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => panic!(
            "{what}: still open after {BOUND:?}; got {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_disconnected_after_the_write_timeout() {
    let srv = start(Limits {
        write_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    c.write_all(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The client never reads: the server's writes block once the socket
    // buffers are full, and after the write timeout it lets go.
    let t = Instant::now();
    tokio::time::timeout(BOUND, srv.dropped)
        .await
        .expect("the endless answer to a client that reads nothing was never dropped")
        .ok();
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    drop(c);
}

#[tokio::test]
async fn a_whole_body_within_the_timeout_is_read_and_a_slow_one_gets_408() {
    let srv = start(Limits {
        body_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    c.write_all(
        b"POST /body HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut c, "a prompt body").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("5 bytes"), "{answer}");

    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    c.write_all(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe")
        .await
        .unwrap();
    let answer = read_to_close(&mut c, "a stalled body").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains("--test-body-timeout-secs"), "{answer}");
}

#[tokio::test]
async fn shutdown_stops_accepting_finishes_requests_under_way_and_bounds_the_rest() {
    let grace = Duration::from_secs(2);
    let mut srv = start(Limits {
        shutdown_grace: grace,
        ..Limits::default()
    })
    .await;
    // An idle keep-alive connection.
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
    // A request under way.
    let mut slow = TcpStream::connect(srv.addr).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    srv.started.notified().await;
    // A response that never ends, read as it comes.
    let mut endless = TcpStream::connect(srv.addr).await.unwrap();
    endless
        .write_all(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = vec![0u8; 1 << 16];
    let n = endless.read(&mut sink).await.unwrap();
    assert!(
        String::from_utf8_lossy(&sink[..n]).starts_with("HTTP/1.1 200"),
        "the endless answer started"
    );
    let drain = tokio::spawn(async move {
        loop {
            match endless.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });

    let t = Instant::now();
    srv.stop.take().unwrap().send(()).unwrap();
    // The idle connection is closed at once, and nothing new is accepted.
    let rest = read_to_close(&mut idle, "the idle connection").await;
    assert_eq!(rest, "");
    let deadline = Instant::now() + BOUND;
    while TcpStream::connect(srv.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The request under way gets its answer, then the connection closes.
    srv.release.notify_one();
    let answer = read_to_close(&mut slow, "the request under way").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("done"), "{answer}");
    // The endless one is cut after the grace period, and serve returns.
    tokio::time::timeout(BOUND, srv.serving)
        .await
        .expect("serve returns after the grace period")
        .unwrap()
        .unwrap();
    assert!(t.elapsed() >= grace.mul_f64(0.8), "{:?}", t.elapsed());
    tokio::time::timeout(BOUND, srv.dropped)
        .await
        .expect("the endless answer was dropped")
        .ok();
    tokio::time::timeout(BOUND, drain)
        .await
        .expect("the endless stream's client saw the close")
        .unwrap();
}
