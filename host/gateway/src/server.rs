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
//! their reloading). Connections are HTTP/1.1 with keep-alive, served by
//! [`braid_http`]: at most [`braid_http::Limits::max_connections`] at once
//! (further ones are closed at once), with timeouts on the TLS handshake,
//! request headers, idle keep-alive, request bodies (a stalled batch is
//! answered `408` and the connection closed) and writes. Failed handshakes,
//! timeouts and every refusal above are logged with the peer address and
//! the reason, rate-limited per kind of line ([`braid_http::LOG_LINES`] per
//! [`braid_http::LOG_INTERVAL`]): anyone can cause them, so a flood must
//! not become a flood of log lines.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use braid_http::{BodyError, Handler, Limits, Names, Peer, RequestBody, Stats};
use braid_types::log_limit::LogLimiter;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::tls::{Reloading, TlsError, TlsMaterial, describe_certificate};
use crate::wire::{Envelope, decode_batch};

/// The path packets are POSTed to.
pub const PACKETS_PATH: &str = "/gateway/v1/packets";

/// What the gateway's log lines call it and the prefix of its flags.
pub const NAMES: Names = Names {
    server: "gateway",
    flag_prefix: "--gateway-",
};

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
    /// Connection limit and timeouts ([`Limits::default`] by default).
    pub limits: Limits,
}

impl ServerConfig {
    /// Default [`ServerConfig::max_body`]: 4 MiB.
    pub const DEFAULT_MAX_BODY: usize = 4 << 20;

    /// Settings with the default limits.
    pub fn new(tls: TlsMaterial, mutual_tls: bool) -> Self {
        Self {
            tls,
            mutual_tls,
            max_body: Self::DEFAULT_MAX_BODY,
            limits: Limits::default(),
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
    limits: Limits,
    inbound: mpsc::Sender<Inbound>,
    peers: Arc<dyn PeerCheck>,
    extra: Router,
    stats: Arc<Stats>,
    /// For the refusals below the connection level (those of braid-http
    /// are limited there).
    logs: LogLimiter,
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
                limits: config.limits,
                inbound,
                peers,
                extra,
                stats: Arc::default(),
                logs: LogLimiter::new(braid_http::LOG_LINES, braid_http::LOG_INTERVAL),
            }),
        })
    }

    /// How many TCP connections this server has accepted so far (including
    /// those whose TLS handshake then failed, and those refused at the
    /// connection limit).
    pub fn accepted_connections(&self) -> u64 {
        self.shared.stats.accepted()
    }

    /// How many connections were closed at once because the connection
    /// limit was reached.
    pub fn refused_connections(&self) -> u64 {
        self.shared.stats.refused()
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
        self.run_until(listener, std::future::pending()).await
    }

    /// Serves `listener` until `shutdown` completes, then stops accepting,
    /// lets requests under way finish (for at most the limits'
    /// `shutdown_grace`) and returns.
    pub async fn run_until(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let shared = self.shared;
        let for_tls = shared.clone();
        let source: braid_http::TlsSource = Arc::new(move || for_tls.tls.current());
        braid_http::Server::with_stats(
            NAMES,
            shared.limits.clone(),
            Some(source),
            Gateway(shared.clone()),
            shared.stats.clone(),
        )
        .serve(listener, shutdown)
        .await
    }
}

/// The gateway's [`Handler`].
struct Gateway(Arc<Shared>);

impl Handler for Gateway {
    async fn call(&self, mut req: Request<RequestBody>, peer: &Peer) -> Response<Body> {
        let info = PeerInfo {
            addr: peer.addr,
            leaf: peer.leaf.clone(),
        };
        if req.uri().path() == PACKETS_PATH {
            if req.method() != Method::POST {
                let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "use POST");
                res.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("POST"));
                return res;
            }
            return self.0.packets(req, info).await;
        }
        req.extensions_mut().insert(info);
        braid_http::call_router(&self.0.extra, req, peer).await
    }

    fn body_timed_out(&self, message: String) -> Response<Body> {
        text(StatusCode::REQUEST_TIMEOUT, &message)
    }
}

impl Shared {
    async fn packets(&self, req: Request<RequestBody>, info: PeerInfo) -> Response<Body> {
        let addr = info.addr;
        let who = || {
            info.leaf
                .as_deref()
                .map_or_else(|| "no client certificate".to_owned(), describe_certificate)
        };
        if let Err(reason) = self.peers.check(info.leaf.as_deref()) {
            if let Some(note) = self.logs.allow("peer_refused") {
                tracing::warn!(peer = %addr, cert = %who(),
                    "rejecting packets from {addr}: {reason}{note}");
            }
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
                // A timeout is answered and logged by braid-http.
                let timed_out = e
                    .downcast_ref::<BodyError>()
                    .is_some_and(BodyError::is_timeout);
                if !timed_out && let Some(note) = self.logs.allow("body_failed") {
                    tracing::warn!(peer = %addr, cause = %e,
                        "rejecting packets from {addr}: reading the body failed{note}");
                }
                return text(StatusCode::BAD_REQUEST, &format!("reading the body: {e}"));
            }
        };
        let envelopes = match decode_batch(&body) {
            Ok(envelopes) => envelopes,
            Err(e) => {
                if let Some(note) = self.logs.allow("malformed_batch") {
                    tracing::warn!(peer = %addr, cert = %who(),
                        "rejecting packets from {addr}: malformed batch: {e}{note}");
                }
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
                if let Some(note) = self.logs.allow("overloaded") {
                    tracing::warn!(peer = %addr, count,
                        "rejecting packets from {addr}: {reason}{note}");
                }
                let mut res = text(StatusCode::SERVICE_UNAVAILABLE, reason);
                res.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                res
            }
        }
    }

    fn too_large(&self, addr: SocketAddr) -> Response<Body> {
        let reason = format!("batch larger than {} bytes", self.max_body);
        if let Some(note) = self.logs.allow("too_large") {
            tracing::warn!(peer = %addr, "rejecting packets from {addr}: {reason}{note}");
        }
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
