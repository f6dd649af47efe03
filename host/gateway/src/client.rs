//! The gateway's HTTPS client: POSTs packet batches to peer gateways.
//!
//! Each send checks the server: its certificate must chain to the network
//! CA, pass the CRLs (per the revocation mode; see [`crate::tls`]) and be
//! valid for the endpoint's host (an IP SAN for `https://127.0.0.1:7001`);
//! when the membership lists a certificate for that endpoint, the server's
//! leaf must be exactly that one, checked right after the handshake and
//! before any byte of the batch is sent.
//!
//! Connections are kept alive and reused per endpoint; at most
//! [`ClientConfig::per_peer_concurrency`] requests (hence connections) are
//! in flight per endpoint, further sends wait for a slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

use crate::server::PACKETS_PATH;
use crate::tls::{Reloading, TlsError, TlsMaterial, describe_certificate};
use crate::wire::{Envelope, try_encode_batch};

/// How long an idle pooled connection is kept: below the server's default
/// idle timeout (60 s, `--gateway-idle-timeout-secs`), so we rarely pick a
/// connection the server is closing (a stale one is retried anyway).
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// The most response-body bytes read (error texts are short).
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// This node's certificate, key, the network CA and CRLs.
    pub tls: TlsMaterial,
    /// Present our certificate (mutual TLS, per network policy).
    pub present_client_cert: bool,
    /// Requests in flight per endpoint, at most
    /// ([`ClientConfig::DEFAULT_PER_PEER_CONCURRENCY`] by default; 0 counts as 1).
    pub per_peer_concurrency: usize,
    /// Limit for one request, from sending it to reading the response.
    pub request_timeout: Duration,
    /// Limit for opening a connection: TCP connect and TLS handshake.
    pub connect_timeout: Duration,
}

impl ClientConfig {
    /// Default [`ClientConfig::per_peer_concurrency`].
    pub const DEFAULT_PER_PEER_CONCURRENCY: usize = 8;
    /// Default [`ClientConfig::request_timeout`].
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default [`ClientConfig::connect_timeout`].
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Settings with the default limits.
    pub fn new(tls: TlsMaterial, present_client_cert: bool) -> Self {
        Self {
            tls,
            present_client_cert,
            per_peer_concurrency: Self::DEFAULT_PER_PEER_CONCURRENCY,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Why a batch was not delivered. Nothing of the batch was accepted by the
/// peer unless the variant says otherwise.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// The peer is overloaded (`503`): wait `retry_after`, then resend.
    #[error("peer overloaded; retry after {retry_after:?}")]
    Overloaded {
        /// How long the peer asked us to wait (`Retry-After`, default 1 s).
        retry_after: Duration,
    },
    /// The batch is larger than the peer accepts (`413`): send smaller
    /// batches.
    #[error("batch too large for the peer")]
    TooLarge,
    /// The peer could not decode the batch (`400`), or it could not be
    /// encoded; the text says why. A bug: resending will not help.
    #[error("malformed batch: {0}")]
    Malformed(String),
    /// The peer refused us (`403`, e.g. not a member); the text is its
    /// reason. Check the membership.
    #[error("refused by the peer: {0}")]
    Forbidden(String),
    /// The peer answered an unexpected status.
    #[error("unexpected status {0} from the peer")]
    UnexpectedStatus(u16),
    /// No answer: connect, TLS (e.g. the server's certificate is not from
    /// the network CA, or is revoked), I/O failure or timeout. Retry later.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The server's certificate is valid but is not the one the membership
    /// lists for this endpoint. Nothing was sent.
    #[error("wrong peer: {0}")]
    WrongPeer(String),
    /// The endpoint is not an `https://host[:port]` URL.
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
}

/// The gateway client; cheap to clone (connection pools are shared).
#[derive(Clone)]
pub struct GatewayClient {
    inner: Arc<Inner>,
}

struct Inner {
    tls: Reloading<rustls::ClientConfig>,
    per_peer_concurrency: usize,
    request_timeout: Duration,
    connect_timeout: Duration,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
}

/// One endpoint's concurrency slots and idle connections.
struct Peer {
    slots: Semaphore,
    idle: Mutex<Vec<Pooled>>,
}

struct Pooled {
    sender: SendRequest<Full<Bytes>>,
    leaf: Vec<u8>,
    idle_since: Instant,
}

/// A parsed `https://host[:port]` endpoint.
struct Target {
    key: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    uri: Uri,
}

fn parse_endpoint(endpoint: &str) -> Result<Target, SendError> {
    let bad = |why: &str| SendError::InvalidEndpoint(format!("{endpoint:?}: {why}"));
    let uri: Uri = endpoint.trim().parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let server_name = ServerName::try_from(host.clone()).map_err(|_| bad("invalid host name"))?;
    let authority = uri.authority().ok_or_else(|| bad("no host"))?.as_str();
    let key = format!("{host}:{port}");
    let uri = Uri::builder()
        .scheme("https")
        .authority(authority)
        .path_and_query(PACKETS_PATH)
        .build()
        .map_err(|e| bad(&e.to_string()))?;
    Ok(Target {
        key,
        host,
        port,
        server_name,
        uri,
    })
}

impl GatewayClient {
    /// Builds the client: loads the CRLs (per the revocation mode) and the
    /// TLS configuration. Fails when the TLS material is unusable.
    pub fn new(config: ClientConfig) -> Result<Self, TlsError> {
        let present = config.present_client_cert;
        let tls = Reloading::new(config.tls, move |m, crls| {
            crate::tls::client_config(m, present, crls)
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                tls,
                per_peer_concurrency: config.per_peer_concurrency.max(1),
                request_timeout: config.request_timeout,
                connect_timeout: config.connect_timeout,
                peers: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// POSTs `batch` to the gateway at `endpoint` (`https://host[:port]`).
    ///
    /// `expected_leaf` is the server certificate (DER) the membership lists
    /// for that endpoint; when given, any other (even valid) certificate is
    /// [`SendError::WrongPeer`]. `Ok(())` means the peer accepted (queued)
    /// the whole batch.
    pub async fn send(
        &self,
        endpoint: &str,
        expected_leaf: Option<&[u8]>,
        batch: &[Envelope],
    ) -> Result<(), SendError> {
        let target = parse_endpoint(endpoint)?;
        let body =
            Bytes::from(try_encode_batch(batch).map_err(|e| SendError::Malformed(e.to_string()))?);
        let peer = self.peer(&target.key);
        let _slot = peer
            .slots
            .acquire()
            .await
            .expect("the slot semaphore is never closed");

        let (mut conn, mut pooled) = match self.take_idle(&peer, expected_leaf) {
            Some(conn) => (conn, true),
            None => (self.connect(&target, expected_leaf).await?, false),
        };
        loop {
            match self.request(&mut conn, &target, body.clone()).await {
                Ok((reusable, result)) => {
                    if reusable && !conn.sender.is_closed() {
                        conn.idle_since = Instant::now();
                        let mut idle = peer.idle.lock().unwrap_or_else(|p| p.into_inner());
                        if idle.len() < self.inner.per_peer_concurrency {
                            idle.push(conn);
                        }
                    }
                    return result;
                }
                // A pooled connection the server had already closed: the
                // request was not sent, so a fresh connection may retry it.
                Err(e) if pooled && (e.is_canceled() || e.is_closed()) => {
                    tracing::debug!(endpoint, cause = %e, "stale pooled connection; reconnecting");
                    conn = self.connect(&target, expected_leaf).await?;
                    pooled = false;
                }
                Err(e) => {
                    return Err(SendError::Unreachable(format!(
                        "request to {endpoint} failed: {}",
                        error_chain(&e)
                    )));
                }
            }
        }
    }

    fn peer(&self, key: &str) -> Arc<Peer> {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Peer {
                    slots: Semaphore::new(self.inner.per_peer_concurrency),
                    idle: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }

    /// A live idle connection to the expected server, if there is one.
    fn take_idle(&self, peer: &Peer, expected_leaf: Option<&[u8]>) -> Option<Pooled> {
        let mut idle = peer.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            let fresh = conn.idle_since.elapsed() < IDLE_TIMEOUT;
            // A connection to a certificate the membership no longer lists
            // is dropped, not reused.
            let right_peer = expected_leaf.is_none_or(|leaf| leaf == conn.leaf.as_slice());
            // Not `is_ready()`: right after a response the connection task may
            // not have flagged readiness yet; `request` awaits `ready()`.
            if fresh && right_peer && !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    async fn connect(
        &self,
        target: &Target,
        expected_leaf: Option<&[u8]>,
    ) -> Result<Pooled, SendError> {
        let endpoint = &target.key;
        let tls = self.inner.tls.current();
        let handshake = async {
            let tcp = TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|e| SendError::Unreachable(format!("connecting to {endpoint}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            TlsConnector::from(tls)
                .connect(target.server_name.clone(), tcp)
                .await
                .map_err(|e| {
                    SendError::Unreachable(format!("TLS handshake with {endpoint} failed: {e}"))
                })
        };
        let stream = tokio::time::timeout(self.inner.connect_timeout, handshake)
            .await
            .map_err(|_| {
                SendError::Unreachable(format!("connecting to {endpoint}: timed out"))
            })??;

        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|c| c.as_ref().to_vec())
            .ok_or_else(|| {
                SendError::Unreachable(format!("{endpoint} presented no certificate"))
            })?;
        if let Some(expected) = expected_leaf
            && expected != leaf.as_slice()
        {
            let msg = format!(
                "{endpoint} presented {}, but the membership lists {}",
                describe_certificate(&leaf),
                describe_certificate(expected)
            );
            tracing::warn!(endpoint = %endpoint, "not sending packets: wrong peer: {msg}");
            return Err(SendError::WrongPeer(msg));
        }

        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                SendError::Unreachable(format!(
                    "HTTP handshake with {endpoint}: {}",
                    error_chain(&e)
                ))
            })?;
        let key = endpoint.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(endpoint = %key, cause = %e, "gateway client connection ended");
            }
        });
        Ok(Pooled {
            sender,
            leaf,
            idle_since: Instant::now(),
        })
    }

    /// Sends one request on `conn`. The outer error is hyper's (the
    /// connection failed); otherwise whether the connection can be reused
    /// and the peer's answer.
    async fn request(
        &self,
        conn: &mut Pooled,
        target: &Target,
        body: Bytes,
    ) -> Result<(bool, Result<(), SendError>), hyper::Error> {
        let timeout = self.inner.request_timeout;
        let endpoint = &target.key;
        let exchange = async {
            conn.sender.ready().await?;
            let host = target
                .uri
                .authority()
                .map(|a| a.as_str())
                .unwrap_or(endpoint);
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(target.uri.path())
                .body(Full::new(body))
                .expect("request parts are valid");
            if let Ok(host) = HeaderValue::from_str(host) {
                req.headers_mut().insert(HOST, host);
            }
            req.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let res = conn.sender.send_request(req).await?;
            let status = res.status();
            let retry_after = res
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(Duration::from_secs(1), Duration::from_secs);
            // Read the whole (short) body so the connection can be reused.
            let text = match Limited::new(res.into_body(), MAX_RESPONSE_BODY)
                .collect()
                .await
            {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                Err(e) => format!("(unreadable response body: {e})"),
            };
            Ok((
                true,
                match status {
                    StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(()),
                    StatusCode::SERVICE_UNAVAILABLE => Err(SendError::Overloaded { retry_after }),
                    StatusCode::PAYLOAD_TOO_LARGE => Err(SendError::TooLarge),
                    StatusCode::BAD_REQUEST => Err(SendError::Malformed(text)),
                    StatusCode::FORBIDDEN => Err(SendError::Forbidden(text)),
                    other => Err(SendError::UnexpectedStatus(other.as_u16())),
                },
            ))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            // The connection is mid-request: not reusable.
            Err(_) => Ok((
                false,
                Err(SendError::Unreachable(format!(
                    "request to {endpoint} timed out after {timeout:?}"
                ))),
            )),
        }
    }
}

/// An error and its sources, `: `-separated (hyper's own text is terse,
/// e.g. "connection error"; the TLS alert is in the sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let t = parse_endpoint("https://127.0.0.1:7001").unwrap();
        assert_eq!(t.key, "127.0.0.1:7001");
        assert_eq!(t.uri.path(), PACKETS_PATH);
        assert!(matches!(t.server_name, ServerName::IpAddress(_)));
        let t = parse_endpoint("https://gw.example.com/").unwrap();
        assert_eq!(t.port, 443);
        assert!(matches!(t.server_name, ServerName::DnsName(_)));
        let t = parse_endpoint("https://[::1]:9").unwrap();
        assert_eq!(t.host, "::1");
        assert!(matches!(
            parse_endpoint("http://127.0.0.1:1"),
            Err(SendError::InvalidEndpoint(_))
        ));
        assert!(matches!(
            parse_endpoint("not a url"),
            Err(SendError::InvalidEndpoint(_))
        ));
    }
}
