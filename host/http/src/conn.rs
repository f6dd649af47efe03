//! One connection: TLS handshake, then HTTP/1.1 under a watchdog that
//! closes it when the client stalls (see the crate documentation for the
//! timers).
//!
//! The watchdog's view of the connection is a [`Watch`]: its phase
//! (waiting for a request header, idle between requests, or busy with
//! one) and whether a write is blocked on the client. The I/O wrapper
//! [`Tracked`] and the request/response bodies move it from phase to
//! phase; the connection task sleeps until the earliest deadline, and a
//! phase change wakes it to look again.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::body::{RequestBody, ResponseBody};
use crate::{Handler, Limits, Peer, Shared};

/// Where a connection is, as far as its timers care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Receiving a request header, since the instant: the connection's
    /// start, or the first byte after an idle spell.
    Header(Instant),
    /// Nothing under way since the instant (the last response was sent).
    Idle(Instant),
    /// A request is being answered: no phase deadline (the body has its
    /// own, and a response may take as long as it takes).
    Busy,
}

/// Which timer ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    Header,
    Idle,
    Write,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Since when a write has been waiting for the client to read.
    write_blocked: Option<Instant>,
}

impl State {
    /// The earliest deadline and what it is for.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        let phase = match self.phase {
            Phase::Header(since) => Some((since + limits.header_timeout, Expiry::Header)),
            Phase::Idle(since) => Some((since + limits.idle_timeout, Expiry::Idle)),
            Phase::Busy => None,
        };
        let write = self
            .write_blocked
            .map(|since| (since + limits.write_timeout, Expiry::Write));
        match (phase, write) {
            (Some(p), Some(w)) => Some(if w.0 < p.0 { w } else { p }),
            (p, w) => p.or(w),
        }
    }
}

/// The connection's phase, shared by its I/O, its bodies and its task.
#[derive(Debug)]
pub(crate) struct Watch {
    state: Mutex<State>,
    changed: Notify,
}

impl Watch {
    /// A new connection, waiting for its first request header.
    pub(crate) fn new(now: Instant) -> Self {
        Watch {
            state: Mutex::new(State {
                phase: Phase::Header(now),
                write_blocked: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever a panicking holder did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
        self.changed.notify_one();
    }

    /// Bytes arrived: after an idle spell they start a request header.
    fn bytes_read(&self, now: Instant) {
        let mut s = self.lock();
        if let Phase::Idle(_) = s.phase {
            s.phase = Phase::Header(now);
            drop(s);
            self.changed.notify_one();
        }
    }

    /// A write could not proceed: the client is not reading (yet).
    fn write_blocked(&self, now: Instant) {
        let mut s = self.lock();
        if s.write_blocked.is_none() {
            s.write_blocked = Some(now);
            drop(s);
            self.changed.notify_one();
        }
    }

    /// A write went through.
    fn write_done(&self) {
        // No wake-up needed: a later deadline only makes the task look
        // again when the earlier one passes.
        self.lock().write_blocked = None;
    }

    /// A request header was read; the request is being answered.
    pub(crate) fn request_started(&self) {
        self.set_phase(Phase::Busy);
    }

    /// The response went out: the connection idles until the next request.
    pub(crate) fn response_done(&self) {
        self.set_phase(Phase::Idle(Instant::now()));
    }

    fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        self.lock().deadline(limits)
    }
}

/// An I/O stream that reports reads and blocked writes to its [`Watch`].
struct Tracked<IO> {
    io: IO,
    watch: Arc<Watch>,
}

impl<IO> Tracked<IO> {
    fn wrote<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match &r {
            Poll::Pending => self.watch.write_blocked(Instant::now()),
            Poll::Ready(_) => self.watch.write_done(),
        }
        r
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.watch.bytes_read(Instant::now());
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.wrote(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.wrote(r)
    }
}

/// Serves one accepted connection until it ends, a timer runs out, or
/// (after `stop` turns true) its last request is answered.
pub(crate) async fn connection<H: Handler>(
    shared: Arc<Shared<H>>,
    tcp: TcpStream,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    // Small responses go out at once rather than after Nagle's delay.
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &shared.tls else {
        let peer = Peer { addr, leaf: None };
        return serve_http(shared.clone(), peer, tcp, stop).await;
    };
    let limit = shared.limits.handshake_timeout;
    let accept = TlsAcceptor::from(tls()).accept(tcp);
    let stream = tokio::select! {
        r = tokio::time::timeout(limit, accept) => r,
        _ = stop.changed() => return,
    };
    let stream = match stream {
        Ok(Ok(stream)) => stream,
        // Closed before saying anything: port scans and load balancers'
        // TCP health checks do that all day; not worth a warning.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::debug!(peer = %addr, "{}: connection from {addr} closed before its TLS \
                handshake", shared.names.server);
            return;
        }
        Ok(Err(e)) => {
            if let Some(note) = shared.logs.allow("tls_handshake_failed") {
                tracing::warn!(peer = %addr,
                    "{}: rejecting connection from {addr}: TLS handshake failed: {e}{note}",
                    shared.names.server);
            }
            return;
        }
        Err(_) => {
            if let Some(note) = shared.logs.allow("tls_handshake_timeout") {
                tracing::warn!(peer = %addr,
                    "{}: closed the connection from {addr}: no TLS handshake within {limit:?} \
                     ({}){note}", shared.names.server, shared.flag("tls-handshake-timeout-secs"));
            }
            return;
        }
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| Arc::<[u8]>::from(c.as_ref()));
    let peer = Peer { addr, leaf };
    serve_http(shared.clone(), peer, stream, stop).await;
}

async fn serve_http<H, IO>(
    shared: Arc<Shared<H>>,
    peer: Peer,
    io: IO,
    mut stop: watch::Receiver<bool>,
) where
    H: Handler,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = Arc::new(Watch::new(Instant::now()));
    let io = TokioIo::new(Tracked {
        io,
        watch: watch.clone(),
    });
    let service = {
        let (shared, watch, peer) = (shared.clone(), watch.clone(), peer.clone());
        hyper::service::service_fn(move |req| {
            let (shared, watch, peer) = (shared.clone(), watch.clone(), peer.clone());
            // Boxed: polling the connection without its shutdown (below)
            // needs an Unpin future.
            Box::pin(async move { Ok::<_, Infallible>(request(&shared, req, &peer, watch).await) })
        })
    };
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // The watchdog below times headers (hyper's timer would also
        // count idle time as header time).
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(io, service);
    let limits = &shared.limits;
    let mut stopping = *stop.borrow();
    if stopping {
        Pin::new(&mut conn).graceful_shutdown();
    }
    loop {
        let deadline = watch.deadline(limits);
        tokio::select! {
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                if let Err(e) = result {
                    tracing::debug!(peer = %peer.addr, cause = %e,
                        "{}: connection ended with an error", shared.names.server);
                }
                // The answers are flushed; close so that they arrive.
                linger(conn.into_parts().io.into_inner().io).await;
                return;
            }
            () = sleep_until(deadline.map(|(at, _)| at)) => {
                // Look again: the phase may have moved on since.
                if let Some((at, expiry)) = watch.deadline(limits)
                    && at <= Instant::now()
                {
                    log_expiry(&shared, &peer, expiry);
                    return;
                }
            }
            () = watch.changed.notified() => {}
            _ = stop.changed(), if !stopping => {
                stopping = true;
                // Idle connections close now; busy ones after their answer.
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    }
}

/// How long a closing connection keeps reading what the client still
/// sends, and how much of it.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Closes a connection whose answers are written: shuts down the write
/// side (TLS close_notify, then FIN), then reads and drops what the client
/// still sends (say the rest of a body the server refused) until it
/// closes, for a bounded time. Closing with unread data would make the
/// kernel send a reset, which can destroy the answer before the client
/// reads it.
async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = tokio::time::timeout(LINGER, async {
        if io.shutdown().await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 16 << 10];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn log_expiry<H>(shared: &Shared<H>, peer: &Peer, expiry: Expiry) {
    let (server, addr, limits) = (shared.names.server, peer.addr, &shared.limits);
    match expiry {
        Expiry::Header => {
            if let Some(note) = shared.logs.allow("header_timeout") {
                let limit = limits.header_timeout;
                tracing::warn!(peer = %addr,
                    "{server}: closed the connection from {addr}: no complete request header \
                     within {limit:?} ({}){note}", shared.flag("header-timeout-secs"));
            }
        }
        Expiry::Idle => {
            // Routine for keep-alive clients, hence info, not warn.
            if let Some(note) = shared.logs.allow("idle_timeout") {
                let limit = limits.idle_timeout;
                tracing::info!(peer = %addr,
                    "{server}: closed an idle keep-alive connection from {addr} after \
                     {limit:?} ({}){note}", shared.flag("idle-timeout-secs"));
            }
        }
        Expiry::Write => {
            if let Some(note) = shared.logs.allow("write_timeout") {
                let limit = limits.write_timeout;
                tracing::warn!(peer = %addr,
                    "{server}: closed the connection from {addr}: it read nothing of its \
                     answer for {limit:?} ({}){note}", shared.flag("write-timeout-secs"));
            }
        }
    }
}

/// Answers one request, replacing the answer with a `408` when its body
/// did not arrive in time.
async fn request<H: Handler>(
    shared: &Shared<H>,
    req: Request<Incoming>,
    peer: &Peer,
    watch: Arc<Watch>,
) -> Response<ResponseBody> {
    watch.request_started();
    let limit = shared.limits.body_timeout;
    let timed_out = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| RequestBody::new(body, limit, timed_out.clone()));
    let mut res = shared.handler.call(req, peer).await;
    if timed_out.load(std::sync::atomic::Ordering::Relaxed) {
        let flag = shared.flag("body-timeout-secs");
        let addr = peer.addr;
        if let Some(note) = shared.logs.allow("body_timeout") {
            tracing::warn!(peer = %addr,
                "{}: cut off a request from {addr}: its body did not arrive within {limit:?} \
                 ({flag}){note}", shared.names.server);
        }
        res = shared.handler.body_timed_out(format!(
            "the request body did not arrive within {limit:?}; send it faster, or ask the \
             operator to raise {flag}"
        ));
        // The rest of the body is not worth waiting for.
        res.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    res.map(|body| ResponseBody::new(body, watch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            ..Limits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn phases_set_the_deadline() {
        let l = limits();
        let t0 = Instant::now();
        let w = Watch::new(t0);
        // A new connection owes a header.
        assert_eq!(
            w.deadline(&l),
            Some((t0 + l.header_timeout, Expiry::Header))
        );
        // Bytes of the header do not extend it (a slow header is cut off).
        w.bytes_read(t0 + Duration::from_secs(5));
        assert_eq!(
            w.deadline(&l),
            Some((t0 + l.header_timeout, Expiry::Header))
        );
        // Busy: no phase deadline, unless a write blocks.
        w.request_started();
        assert_eq!(w.deadline(&l), None);
        let t1 = t0 + Duration::from_secs(7);
        w.write_blocked(t1);
        w.write_blocked(t1 + Duration::from_secs(3));
        assert_eq!(w.deadline(&l), Some((t1 + l.write_timeout, Expiry::Write)));
        w.write_done();
        assert_eq!(w.deadline(&l), None);
        // Idle after the answer, from when it was sent.
        tokio::time::advance(Duration::from_secs(20)).await;
        let t2 = Instant::now();
        w.response_done();
        assert_eq!(w.deadline(&l), Some((t2 + l.idle_timeout, Expiry::Idle)));
        // The first byte of the next request starts its header timer.
        let t3 = t2 + Duration::from_secs(30);
        w.bytes_read(t3);
        assert_eq!(
            w.deadline(&l),
            Some((t3 + l.header_timeout, Expiry::Header))
        );
        // A blocked write that expires first wins.
        w.write_blocked(t3 - Duration::from_secs(25));
        assert_eq!(
            w.deadline(&l),
            Some((t3 + Duration::from_secs(5), Expiry::Write))
        );
    }
}
