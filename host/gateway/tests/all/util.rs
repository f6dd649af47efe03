//! Starting servers, clients, raw requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::{Extension, Router};
use braid_gateway::{
    ClientConfig, Envelope, GatewayClient, GatewayServer, Inbound, PeerCheck, PeerInfo,
    ServerConfig, TlsMaterial,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A server on 127.0.0.1, stopped when dropped.
pub struct Running {
    pub endpoint: String,
    pub addr: SocketAddr,
    pub server: GatewayServer,
    pub rx: mpsc::Receiver<Inbound>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Running {
    /// Asserts that nothing was delivered.
    pub fn assert_nothing_delivered(&mut self) {
        assert!(self.rx.try_recv().is_err(), "a batch was delivered");
    }
}

async fn whoami(
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Extension(info): Extension<PeerInfo>,
) -> String {
    format!("{} leaf={}", addr.ip(), info.leaf.is_some())
}

pub async fn start(config: ServerConfig, capacity: usize, peers: Arc<dyn PeerCheck>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(capacity);
    let extra = Router::new().route("/network/v1/whoami", get(whoami));
    let server = GatewayServer::new(config, tx, peers, extra).unwrap();
    let task = tokio::spawn(server.clone().run(listener));
    Running {
        endpoint: format!("https://{addr}"),
        addr,
        server,
        rx,
        task,
    }
}

pub fn allow_all() -> Arc<dyn PeerCheck> {
    Arc::new(|_: Option<&[u8]>| Ok(()))
}

pub fn client(tls: TlsMaterial, present_client_cert: bool) -> GatewayClient {
    let mut config = ClientConfig::new(tls, present_client_cert);
    config.request_timeout = Duration::from_secs(10);
    config.connect_timeout = Duration::from_secs(10);
    GatewayClient::new(config).unwrap()
}

pub fn batch(n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| Envelope {
            from: "O=Alice, L=London, C=GB".into(),
            to: "O=Bob, L=Paris, C=FR".into(),
            packet: vec![i as u8; 10 + i],
        })
        .collect()
}

/// A TLS connection to `addr` with the handshake done; presents the
/// material's certificate when `present`.
pub async fn tls_connect(
    addr: SocketAddr,
    tls: &TlsMaterial,
    present: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for r in &tls.roots {
        roots.add(r.clone()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let config = if present {
        builder
            .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
}

/// Sends raw HTTP/1.1 bytes over TLS and returns the whole response text
/// (the request should say `Connection: close`).
pub async fn raw(addr: SocketAddr, tls: &TlsMaterial, present: bool, request: &[u8]) -> String {
    let mut stream = tls_connect(addr, tls, present).await.unwrap();
    stream.write_all(request).await.unwrap();
    stream.flush().await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw response.
pub fn status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}
