//! The gateway's HTTPS server: receives packet batches from peer gateways.
//!
//! One TCP listener serves two things:
//! - `POST /gateway/v1/packets` ([`PACKETS_PATH`]): a batch in the
//!   [`wire`](crate::wire) format. Answers:
//!   - `202 Accepted`: the whole batch was queued (one [`Inbound`] on the
//!     channel);
//!   - `400 Bad Request`: the body is not a valid batch (text body: why);
//!   - `403 Forbidden`: [`PeerCheck`] refused the client (text body: why);
//!   - `413 Payload Too Large`: the body is over [`ServerConfig::max_body`];
//!   - `503 Service Unavailable` with `Retry-After: 1`: the inbound channel
//!     is full (back-pressure; the sender waits and retries).
//!
//!   Every refusal logs one warning naming the peer address and the reason,
//!   and delivers nothing.
//! - every other path: the caller's [`axum::Router`] (the network-map
//!   endpoints). Its requests carry a [`PeerInfo`] and an
//!   [`axum::extract::ConnectInfo<SocketAddr>`] extension.
//!
//! TLS is 1.3 only; under mutual TLS the client must present a certificate
//! from the network CA that is not revoked (see [`crate::tls`] for CRLs and
//! their reloading). A failed handshake logs a warning with the peer address
//! and rustls' error and closes the connection. Connections are HTTP/1.1
//! with keep-alive; a connection that sends no request headers for 30 s
//! (including an idle keep-alive one) is closed. At most
//! [`ServerConfig::max_connections`] are served at once (further ones wait
//! in the listen backlog).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use crate::tls::{Reloading, TlsError, TlsMaterial, describe_certificate};
use crate::wire::{Envelope, decode_batch};

/// The path packets are POSTed to.
pub const PACKETS_PATH: &str = "/gateway/v1/packets";

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This node's certificate, key, the network CA and CRLs.
    pub tls: TlsMaterial,
    /// Require and check client certificates (network policy).
    pub mutual_tls: bool,
    /// The largest accepted request body in bytes
    /// ([`ServerConfig::DEFAULT_MAX_BODY`] by default); larger ones get `413`.
    pub max_body: usize,
    /// The most connections served at once
    /// ([`ServerConfig::DEFAULT_MAX_CONNECTIONS`] by default; 0 counts as 1).
    pub max_connections: usize,
}

impl ServerConfig {
    /// Default [`ServerConfig::max_body`]: 4 MiB.
    pub const DEFAULT_MAX_BODY: usize = 4 << 20;
    /// Default [`ServerConfig::max_connections`].
    pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

    /// Settings with the default limits.
    pub fn new(tls: TlsMaterial, mutual_tls: bool) -> Self {
        Self {
            tls,
            mutual_tls,
            max_body: Self::DEFAULT_MAX_BODY,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// A batch received from a peer gateway, queued for the link manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The batch, in the order sent.
    pub envelopes: Vec<Envelope>,
    /// The TCP address the batch came from.
    pub peer_addr: SocketAddr,
    /// The client's leaf certificate (DER) under mutual TLS; `None` under
    /// one-way TLS.
    pub peer_leaf: Option<Vec<u8>>,
}

/// Decides whether a client may deliver packets, from its leaf certificate
/// (the membership: is this certificate a current member's?).
///
/// Called for every `POST /gateway/v1/packets` before the body is read.
/// `client_leaf_der` is `None` under one-way TLS. `Err(reason)` answers
/// `403` with the reason and logs it. Any
/// `Fn(Option<&[u8]>) -> Result<(), String> + Send + Sync` implements it.
pub trait PeerCheck: Send + Sync {
    /// `Ok(())` to accept the client, `Err(reason)` to refuse it.
    fn check(&self, client_leaf_der: Option<&[u8]>) -> Result<(), String>;
}

impl<F> PeerCheck for F
where
    F: Fn(Option<&[u8]>) -> Result<(), String> + Send + Sync,
{
    fn check(&self, client_leaf_der: Option<&[u8]>) -> Result<(), String> {
        self(client_leaf_der)
    }
}

/// Who is on the other end of a connection; a request extension on every
/// request the server handles (including those given to the extra router).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's TCP address.
    pub addr: SocketAddr,
    /// The client's leaf certificate (DER), under mutual TLS.
    pub leaf: Option<Arc<[u8]>>,
}

/// The gateway's HTTPS server. Cheap to clone (shared state); see the
/// module documentation for what it serves.
#[derive(Clone)]
pub struct GatewayServer {
    shared: Arc<Shared>,
}

struct Shared {
    tls: Reloading<rustls::ServerConfig>,
    max_body: usize,
    max_connections: usize,
    inbound: mpsc::Sender<Inbound>,
    peers: Arc<dyn PeerCheck>,
    extra: Router,
    accepted: AtomicU64,
}

impl GatewayServer {
    /// Builds the server: loads the CRLs (per the revocation mode) and the
    /// TLS configuration. Fails when the TLS material is unusable.
    pub fn new(
        config: ServerConfig,
        inbound: mpsc::Sender<Inbound>,
        peers: Arc<dyn PeerCheck>,
        extra: Router,
    ) -> Result<Self, TlsError> {
        let mutual = config.mutual_tls;
        let tls = Reloading::new(config.tls, move |m, crls| {
            crate::tls::server_config(m, mutual, crls)
        })?;
        Ok(Self {
            shared: Arc::new(Shared {
                tls,
                max_body: config.max_body,
                max_connections: config.max_connections.max(1),
                inbound,
                peers,
                extra,
                accepted: AtomicU64::new(0),
            }),
        })
    }

    /// How many TCP connections this server has accepted so far (including
    /// those whose TLS handshake then failed).
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Builds the server and serves `listener` until the future is dropped
    /// (or aborted). Fails at once (`InvalidInput`) when the TLS material is
    /// unusable; otherwise it runs forever: accept errors are logged and
    /// retried.
    pub fn serve(
        listener: TcpListener,
        config: ServerConfig,
        inbound: mpsc::Sender<Inbound>,
        peers: Arc<dyn PeerCheck>,
        extra: Router,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'static {
        let server = Self::new(config, inbound, peers, extra);
        async move {
            let server =
                server.map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            server.run(listener).await
        }
    }

    /// Serves `listener` until the future is dropped (or aborted); dropping
    /// it also closes every connection it opened.
    pub async fn run(self, listener: TcpListener) -> std::io::Result<()> {
        let limit = Arc::new(Semaphore::new(self.shared.max_connections));
        // Owned here, so dropping the future aborts the connection tasks.
        let mut connections = JoinSet::new();
        loop {
            let permit = limit
                .clone()
                .acquire_owned()
                .await
                .expect("the connection semaphore is never closed");
            while connections.try_join_next().is_some() {}
            let (tcp, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: wait a little rather than spin.
                    tracing::warn!(cause = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.shared.accepted.fetch_add(1, Ordering::Relaxed);
            let tls = self.shared.tls.current();
            let shared = self.shared.clone();
            connections.spawn(async move {
                let _permit = permit;
                shared.connection(tcp, addr, tls).await;
            });
        }
    }
}

impl Shared {
    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
    ) {
        let _ = tcp.set_nodelay(true);
        let stream =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(tls).accept(tcp)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::warn!(peer = %addr, cause = %e,
                        "rejecting connection from {addr}: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(peer = %addr,
                        "rejecting connection from {addr}: TLS handshake timed out");
                    return;
                }
            };
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|c| Arc::<[u8]>::from(c.as_ref()));
        let info = PeerInfo { addr, leaf };
        let shared = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            let info = info.clone();
            async move { Ok::<_, Infallible>(shared.handle(req, info).await) }
        });
        let result = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        if let Err(e) = result {
            tracing::debug!(peer = %addr, cause = %e, "gateway connection ended with an error");
        }
    }

    async fn handle(&self, mut req: Request<Incoming>, info: PeerInfo) -> Response<Body> {
        if req.uri().path() == PACKETS_PATH {
            if req.method() != Method::POST {
                let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "use POST");
                res.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("POST"));
                return res;
            }
            return self.packets(req, info).await;
        }
        req.extensions_mut().insert(ConnectInfo(info.addr));
        req.extensions_mut().insert(info);
        let mut router = self.extra.clone();
        // Router is always ready; poll anyway, as tower's contract asks.
        let ready =
            std::future::poll_fn(|cx| Service::<Request<Incoming>>::poll_ready(&mut router, cx));
        match ready.await {
            Ok(()) => match router.call(req).await {
                Ok(res) => res,
                Err(never) => match never {},
            },
            Err(never) => match never {},
        }
    }

    async fn packets(&self, req: Request<Incoming>, info: PeerInfo) -> Response<Body> {
        let addr = info.addr;
        let who = || {
            info.leaf
                .as_deref()
                .map_or_else(|| "no client certificate".to_owned(), describe_certificate)
        };
        if let Err(reason) = self.peers.check(info.leaf.as_deref()) {
            tracing::warn!(peer = %addr, cert = %who(), "rejecting packets from {addr}: {reason}");
            return text(StatusCode::FORBIDDEN, &reason);
        }
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return self.too_large(addr);
        }
        let body: Bytes = match Limited::new(req.into_body(), self.max_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => return self.too_large(addr),
            Err(e) => {
                tracing::warn!(peer = %addr, cause = %e,
                    "rejecting packets from {addr}: reading the body failed");
                return text(StatusCode::BAD_REQUEST, &format!("reading the body: {e}"));
            }
        };
        let envelopes = match decode_batch(&body) {
            Ok(envelopes) => envelopes,
            Err(e) => {
                tracing::warn!(peer = %addr, cert = %who(),
                    "rejecting packets from {addr}: malformed batch: {e}");
                return text(StatusCode::BAD_REQUEST, &e.to_string());
            }
        };
        let count = envelopes.len();
        let inbound = Inbound {
            envelopes,
            peer_addr: addr,
            peer_leaf: info.leaf.as_deref().map(<[u8]>::to_vec),
        };
        match self.inbound.try_send(inbound) {
            Ok(()) => {
                tracing::trace!(peer = %addr, count, "batch accepted");
                Response::builder()
                    .status(StatusCode::ACCEPTED)
                    .body(Body::empty())
                    .expect("static response parts are valid")
            }
            Err(e) => {
                let reason = match e {
                    mpsc::error::TrySendError::Full(_) => "overloaded (inbound queue full)",
                    mpsc::error::TrySendError::Closed(_) => "shutting down (inbound queue closed)",
                };
                tracing::warn!(peer = %addr, count, "rejecting packets from {addr}: {reason}");
                let mut res = text(StatusCode::SERVICE_UNAVAILABLE, reason);
                res.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                res
            }
        }
    }

    fn too_large(&self, addr: SocketAddr) -> Response<Body> {
        let reason = format!("batch larger than {} bytes", self.max_body);
        tracing::warn!(peer = %addr, "rejecting packets from {addr}: {reason}");
        text(StatusCode::PAYLOAD_TOO_LARGE, &reason)
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut res = Response::new(Body::from(body.to_owned()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}
