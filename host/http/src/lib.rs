//! The HTTP/1.1 server core shared by braid's REST API and its gateway:
//! the part of a server that faces clients who may be hostile.
//!
//! [`Server::serve`] accepts TCP connections, runs each one in its own task
//! (TLS handshake included, so a slow client never holds up the accept
//! loop) and hands every request to a [`Handler`]. It bounds what a client
//! can hold on to:
//!
//! - **connections**: at most [`Limits::max_connections`] are open at once
//!   (handshaking ones included); a connection over the limit is accepted
//!   and closed at once, so the listen backlog never fills up and the
//!   server answers again as soon as connections go;
//! - **TLS handshake**: must complete within [`Limits::handshake_timeout`];
//! - **request header**: a new connection must deliver its first request
//!   header within [`Limits::header_timeout`], and so must a keep-alive
//!   connection from the first byte of its next request (a header sent a
//!   byte a second is cut off);
//! - **idle keep-alive**: a connection with no request under way and no
//!   byte received for [`Limits::idle_timeout`] is closed;
//! - **request body**: once the handler starts reading a body, the whole
//!   body must arrive within [`Limits::body_timeout`]; otherwise the read
//!   fails, the client gets `408` ([`Handler::body_timed_out`]) and the
//!   connection is closed;
//! - **writes**: a client that reads nothing of what it is sent for
//!   [`Limits::write_timeout`] is disconnected (a response that is merely
//!   slow to produce, like an event stream, is not a stall).
//!
//! hyper's own header timer is not used: it starts when a connection
//! becomes idle, so it cannot tell an idle keep-alive connection from a
//! slow header. The timers here run per connection in its task.
//!
//! Every refusal and timeout logs one line per class of event, rate-limited
//! with [`braid_types::log_limit::LogLimiter`]: a flood of bad clients
//! yields a few lines a minute that say how many were suppressed. Lines
//! name the server ([`Names::server`]) and the flag that sets the limit
//! ([`Names::flag_prefix`]), so an operator knows what to change.
//!
//! When the shutdown future given to [`Server::serve`] completes, the
//! server stops accepting, lets requests under way finish (idle
//! connections close at once), and after [`Limits::shutdown_grace`] closes
//! whatever is left (event streams never end by themselves).

#![warn(missing_docs)]

mod body;
mod conn;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use braid_types::log_limit::LogLimiter;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use body::{BodyError, RequestBody};

/// How many lines of one kind a server logs per [`LOG_INTERVAL`].
pub const LOG_LINES: u32 = 10;
/// The interval of [`LOG_LINES`].
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What a client may hold on to; see the crate documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The most connections open at once (0 counts as 1).
    pub max_connections: usize,
    /// Time to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to send a request header: from the connection's start for its
    /// first request, from the first byte of each later one.
    pub header_timeout: Duration,
    /// Time a keep-alive connection may sit with nothing under way.
    pub idle_timeout: Duration,
    /// Time to send a whole request body, from when the server starts
    /// reading it.
    pub body_timeout: Duration,
    /// Time a client may read nothing while the server has data for it.
    pub write_timeout: Duration,
    /// On shutdown, how long requests under way may go on.
    pub shutdown_grace: Duration,
}

impl Limits {
    /// Default [`Limits::max_connections`] (the binary derives its own from
    /// the file-descriptor limit).
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
    /// Default [`Limits::handshake_timeout`].
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default [`Limits::header_timeout`].
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default [`Limits::idle_timeout`].
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default [`Limits::body_timeout`].
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default [`Limits::write_timeout`].
    pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default [`Limits::shutdown_grace`].
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
}

/// File descriptors a process keeps back for everything but client
/// connections (the store, compiled packages, outgoing connections, logs).
pub const RESERVED_FDS: u64 = 256;

/// The default connection limit of each server in a process allowed
/// `fd_limit` open files: a quarter of what is left after
/// [`RESERVED_FDS`], between 64 and 4096 (a few KiB of buffers per
/// connection; past that, memory rather than descriptors is the bound).
pub fn default_max_connections(fd_limit: u64) -> u64 {
    (fd_limit.saturating_sub(RESERVED_FDS) / 4).clamp(64, 4096)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            body_timeout: Self::DEFAULT_BODY_TIMEOUT,
            write_timeout: Self::DEFAULT_WRITE_TIMEOUT,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// What log lines and error messages call the server and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Names {
    /// The server, e.g. `"REST API"`.
    pub server: &'static str,
    /// The prefix of the flags that set [`Limits`], e.g. `"--rest-"`: the
    /// flags are `{prefix}max-connections`, `{prefix}tls-handshake-timeout-secs`,
    /// `{prefix}header-timeout-secs`, `{prefix}idle-timeout-secs`,
    /// `{prefix}body-timeout-secs` and `{prefix}write-timeout-secs`.
    pub flag_prefix: &'static str,
}

/// The client on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its TCP address.
    pub addr: SocketAddr,
    /// Its TLS leaf certificate (DER), when it presented one.
    pub leaf: Option<Arc<[u8]>>,
}

/// Answers requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from `peer`. Reading the body fails with a
    /// [`BodyError`] once [`Limits::body_timeout`] has passed; the answer
    /// is then replaced by [`Handler::body_timed_out`].
    fn call(
        &self,
        req: Request<RequestBody>,
        peer: &Peer,
    ) -> impl Future<Output = Response<Body>> + Send;

    /// The `408 Request Timeout` answer when a request body did not arrive
    /// in time; `message` says so and names the flag (the server adds
    /// `Connection: close`).
    fn body_timed_out(&self, message: String) -> Response<Body>;
}

/// Serves an [`axum::Router`] from a [`Handler`]: inserts the peer's
/// address as [`axum::extract::ConnectInfo<SocketAddr>`] and the [`Peer`]
/// as request extensions, then calls the router.
pub async fn call_router(
    router: &axum::Router,
    mut req: Request<RequestBody>,
    peer: &Peer,
) -> Response<Body> {
    use tower_service::Service as _;
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(peer.addr));
    req.extensions_mut().insert(peer.clone());
    let mut router = router.clone();
    // A Router is always ready; poll anyway, as tower's contract asks.
    match std::future::poll_fn(|cx| {
        tower_service::Service::<Request<RequestBody>>::poll_ready(&mut router, cx)
    })
    .await
    {
        Ok(()) => {}
        Err(never) => match never {},
    }
    match router.call(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    }
}

/// Produces the TLS configuration for each new connection (so that a
/// reloaded configuration applies to the next one).
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// Counters of a server, shared with its owner.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl Stats {
    /// TCP connections accepted so far (refused ones and failed handshakes
    /// included).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Connections closed at once because [`Limits::max_connections`] were
    /// open.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// An HTTP/1.1 server; see the crate documentation.
pub struct Server<H> {
    shared: Arc<Shared<H>>,
}

pub(crate) struct Shared<H> {
    pub(crate) names: Names,
    pub(crate) limits: Limits,
    pub(crate) tls: Option<TlsSource>,
    pub(crate) handler: H,
    pub(crate) stats: Arc<Stats>,
    pub(crate) logs: LogLimiter,
}

impl<H> Shared<H> {
    /// `{prefix}{name}`: the flag that sets a limit.
    pub(crate) fn flag(&self, name: &str) -> String {
        format!("{}{name}", self.names.flag_prefix)
    }
}

impl<H: Handler> Server<H> {
    /// A server answering with `handler`, over TLS when `tls` is given.
    pub fn new(names: Names, limits: Limits, tls: Option<TlsSource>, handler: H) -> Self {
        Self::with_stats(names, limits, tls, handler, Arc::default())
    }

    /// [`Server::new`], counting into `stats`.
    pub fn with_stats(
        names: Names,
        limits: Limits,
        tls: Option<TlsSource>,
        handler: H,
        stats: Arc<Stats>,
    ) -> Self {
        Server {
            shared: Arc::new(Shared {
                names,
                limits,
                tls,
                handler,
                stats,
                logs: LogLimiter::new(LOG_LINES, LOG_INTERVAL),
            }),
        }
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// Serves `listener` until `shutdown` completes, then shuts down
    /// gracefully (see the crate documentation) and returns. Dropping the
    /// future closes every connection at once. Accept errors (out of file
    /// descriptors, say) are logged and retried; they never end the server.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let shared = self.shared;
        let limit = Arc::new(Semaphore::new(shared.limits.max_connections.max(1)));
        let (stop_tx, stop_rx) = watch::channel(false);
        // Owned here, so dropping this future aborts the connection tasks.
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            while let Some(done) = connections.try_join_next() {
                log_panic(&shared, done);
            }
            let (tcp, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if let Some(note) = shared.logs.allow("accept_failed") {
                        tracing::warn!(cause = %e, "{}: accepting a connection failed: {e}; \
                            if it says too many open files, raise the process's file limit \
                            or lower {}{note}", shared.names.server, shared.flag("max-connections"));
                    }
                    // EMFILE and the like: back off instead of spinning.
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            };
            shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
            match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let shared = shared.clone();
                    let stop = stop_rx.clone();
                    connections.spawn(async move {
                        let _permit = permit;
                        conn::connection(shared, tcp, addr, stop).await;
                    });
                }
                Err(_) => {
                    // Close at once: the client learns now, and the backlog
                    // does not fill up behind it.
                    drop(tcp);
                    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                    if let Some(note) = shared.logs.allow("connection_limit") {
                        tracing::warn!(peer = %addr,
                            "{}: refused a connection from {addr}: {} connections are open, \
                             the limit ({}){note}", shared.names.server,
                            shared.limits.max_connections.max(1), shared.flag("max-connections"));
                    }
                }
            }
        }
        drop(listener);
        let _ = stop_tx.send(true);
        let grace = shared.limits.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = connections.join_next().await {
                log_panic(&shared, done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                "{}: {} connections still busy {grace:?} after shutdown began; closing them",
                shared.names.server,
                connections.len()
            );
            connections.shutdown().await;
        }
        Ok(())
    }
}

fn log_panic<H>(shared: &Shared<H>, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(cause = %e, "{}: a connection task panicked", shared.names.server);
    }
}
