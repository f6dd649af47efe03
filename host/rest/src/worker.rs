//! The REST worker on its own: [`run`] binds the address its
//! [`RestArgs`] name, serves the API (HTTPS, or plain HTTP on loopback)
//! until `shutdown`, and says where it listens.

use crate::{Auth, RestArgs};
use anyhow::Context as _;
use braid_api::FlowService;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

/// What the REST worker needs from the rest of the node.
pub struct RestDeps {
    /// The flows, packages and vnodes it serves.
    pub flows: Arc<dyn FlowService>,
    /// Users, roles and passwords.
    pub auth: Arc<Auth>,
    /// Where the development TLS certificate is kept (`tls/`) and the URL
    /// is written (`rest.url`).
    pub data_dir: PathBuf,
    /// The process's open-file limit (the default connection limit
    /// follows it).
    pub fd_limit: u64,
    /// Gets the API's base URL once it listens (and `rest.url` holds it).
    pub ready: Option<tokio::sync::oneshot::Sender<String>>,
}

/// Where the API listens when `--rest-addr` is not given.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8888);

impl RestArgs {
    /// Refuses settings [`run`] would refuse, before anything else of the
    /// node starts: plain HTTP on an address that is not loopback.
    pub fn check(&self) -> anyhow::Result<()> {
        let addr = self.rest_addr.unwrap_or(DEFAULT_ADDR);
        if self.insecure_http && !addr.ip().is_loopback() {
            anyhow::bail!(
                "refusing to serve plain HTTP on {addr}: --insecure-http is only allowed on a \
                 loopback address (127.0.0.1 or ::1); drop --insecure-http to serve HTTPS"
            );
        }
        Ok(())
    }
}

/// Serves the REST API until `shutdown` completes, then lets requests
/// under way finish (`--rest-shutdown-grace-secs`). Fails at once, with
/// the reason, if the address cannot be bound, plain HTTP is asked for on
/// an address that is not loopback, or the TLS certificate does not load.
pub async fn run(
    args: RestArgs,
    deps: RestDeps,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.check()?;
    let addr = args.rest_addr.unwrap_or(DEFAULT_ADDR);
    let limits = args.limits(deps.fd_limit);
    let tls = if args.insecure_http {
        tracing::warn!("serving the REST API over plain HTTP (--insecure-http)");
        None
    } else {
        Some(tls_config(&args, &deps.data_dir)?)
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the REST API to {addr}"))?;
    let mut local = listener.local_addr()?;
    // A wildcard address is not something to connect to; local clients
    // reach it on loopback.
    if local.ip().is_unspecified() {
        local.set_ip(match local {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{local}");
    let tmp = deps.data_dir.join("rest.url.tmp");
    std::fs::write(&tmp, &url).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, deps.data_dir.join("rest.url"))?;
    tracing::info!(%url, max_connections = limits.max_connections, "REST API listening");
    if let Some(ready) = deps.ready {
        let _ = ready.send(url);
    }
    match tls {
        Some(tls) => {
            crate::serve_tls(listener, tls, limits, deps.flows, deps.auth, shutdown).await?
        }
        None => crate::serve(listener, limits, deps.flows, deps.auth, shutdown).await?,
    }
    Ok(())
}

/// The REST API's TLS configuration: the operator's certificate, else the
/// development one under DATA_DIR/tls/ (made on first start).
fn tls_config(
    args: &RestArgs,
    data_dir: &std::path::Path,
) -> anyhow::Result<Arc<crate::tls::ServerConfig>> {
    use crate::tls;
    let (cert, key) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let mut names = args.public_host.clone();
            if let Some(addr) = args.rest_addr.filter(|a| !a.ip().is_unspecified()) {
                names.push(addr.ip().to_string());
            }
            let dev = tls::danger::dev_certificate(&data_dir.join("tls"), &names)
                .context("making the development TLS certificate")?;
            tracing::info!(
                ca = %dev.ca_pem.display(),
                "serving HTTPS with a development certificate; clients trust the CA file"
            );
            (dev.cert_pem, dev.key_pem)
        }
    };
    tls::server_config(&cert, &key).with_context(|| {
        format!(
            "loading the REST API's TLS certificate {} and key {}",
            cert.display(),
            key.display()
        )
    })
}

#[cfg(test)]
mod tests {
    //! The REST worker started alone, on a stand-in for the flows (the
    //! flow worker is another crate): what it serves comes from the
    //! service it is given.

    use super::*;
    use braid_api::{EventLog, Network, WorkerError};
    use braid_storage::{FlowPage, FlowRecord, PackageRecord, Store, VnodeRecord};
    use braid_types::{
        Checksum, ClientRequestId, FlowId, FlowInfo, FlowStatus, HoldingId, X500Name,
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Flows that answer health with fixed counts and refuse the rest.
    struct Fixed {
        store: Arc<dyn Store>,
        events: EventLog,
    }

    fn refused<T>() -> Result<T, WorkerError> {
        Err(WorkerError::Invalid("not in this test".into()))
    }

    #[async_trait::async_trait]
    impl FlowService for Fixed {
        async fn start_flow(
            &self,
            _: HoldingId,
            _: ClientRequestId,
            _: String,
            _: String,
        ) -> Result<FlowRecord, WorkerError> {
            refused()
        }
        async fn kill(&self, _: FlowId, _: String) -> Result<FlowRecord, WorkerError> {
            refused()
        }
        async fn flow_by_client(
            &self,
            _: &HoldingId,
            _: &ClientRequestId,
        ) -> Result<Option<FlowRecord>, WorkerError> {
            Ok(None)
        }
        async fn flow(&self, _: &FlowId) -> Result<Option<FlowRecord>, WorkerError> {
            Ok(None)
        }
        async fn list_flows(
            &self,
            _: &HoldingId,
            _: Option<FlowStatus>,
            _: Option<&[u8]>,
            _: usize,
        ) -> Result<FlowPage, WorkerError> {
            refused()
        }
        async fn upload_package(&self, _: Vec<u8>) -> Result<(PackageRecord, bool), WorkerError> {
            refused()
        }
        fn packages(&self) -> Vec<PackageRecord> {
            Vec::new()
        }
        fn package(&self, _: &Checksum) -> Option<PackageRecord> {
            None
        }
        async fn delete_package(&self, _: Checksum) -> Result<(), WorkerError> {
            refused()
        }
        async fn create_vnode(&self, _: X500Name, _: Checksum) -> Result<VnodeRecord, WorkerError> {
            refused()
        }
        fn vnodes(&self) -> Vec<VnodeRecord> {
            Vec::new()
        }
        fn vnode(&self, _: &HoldingId) -> Option<VnodeRecord> {
            None
        }
        fn vnode_flows(&self, _: &HoldingId) -> Result<Vec<FlowInfo>, WorkerError> {
            refused()
        }
        async fn upgrade_vnode(
            &self,
            _: HoldingId,
            _: Checksum,
        ) -> Result<VnodeRecord, WorkerError> {
            refused()
        }
        async fn force_package(
            &self,
            _: HoldingId,
            _: Checksum,
        ) -> Result<VnodeRecord, WorkerError> {
            refused()
        }
        async fn set_flow_starts(&self, _: HoldingId, _: bool) -> Result<VnodeRecord, WorkerError> {
            refused()
        }
        async fn check_upgrade(
            &self,
            _: HoldingId,
            _: Checksum,
        ) -> Result<Vec<braid_api::ReplayCheck>, WorkerError> {
            refused()
        }
        fn events(&self) -> &EventLog {
            &self.events
        }
        fn counts(&self) -> (usize, usize) {
            (3, 5)
        }
        fn store(&self) -> &Arc<dyn Store> {
            &self.store
        }
        fn render_metrics(&self, _: &mut String) {}
        fn network(&self) -> Option<&Arc<dyn Network>> {
            None
        }
        fn group(&self) -> &str {
            "test"
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("braid-rest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn deps(dir: &std::path::Path) -> (RestDeps, tokio::sync::oneshot::Receiver<String>) {
        let store: Arc<dyn Store> =
            Arc::new(braid_storage::embedded::EmbeddedStore::open(&dir.join("s.redb")).unwrap());
        let auth = Auth::init(
            store.clone(),
            Some("pw-for-the-test".into()),
            &dir.join("pw"),
        )
        .await
        .unwrap();
        let (ready, listening) = tokio::sync::oneshot::channel();
        let deps = RestDeps {
            flows: Arc::new(Fixed {
                store,
                events: EventLog::new(16),
            }),
            auth: Arc::new(auth),
            data_dir: dir.to_path_buf(),
            fd_limit: 1024,
            ready: Some(ready),
        };
        (deps, listening)
    }

    #[tokio::test]
    async fn the_rest_worker_alone_serves_what_its_flow_service_answers_and_stops_on_shutdown() {
        let dir = temp_dir("alone");
        let (deps, listening) = deps(&dir).await;
        let args = RestArgs {
            rest_addr: Some("127.0.0.1:0".parse().unwrap()),
            insecure_http: true,
            ..RestArgs::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(args, deps, async move {
            let _ = stopped.await;
        }));
        let url = listening.await.expect("it listens");
        assert_eq!(std::fs::read_to_string(dir.join("rest.url")).unwrap(), url);
        let addr = url.strip_prefix("http://").expect("plain HTTP as asked");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The counts come from the service it was given.
        assert!(answer.contains("\"liveFlows\":3"), "{answer}");
        assert!(answer.contains("\"flows\":5"), "{answer}");
        stop.send(()).unwrap();
        server.await.unwrap().expect("a clean stop");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_rest_worker_refuses_plain_http_off_loopback_and_an_address_in_use() {
        let dir = temp_dir("refuse");
        let (deps1, _) = deps(&dir).await;
        let args = RestArgs {
            rest_addr: Some("0.0.0.0:0".parse().unwrap()),
            insecure_http: true,
            ..RestArgs::default()
        };
        let e = run(args, deps1, std::future::pending()).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("refusing to serve plain HTTP"),
            "{e:#}"
        );
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (deps2, _) = deps(&dir).await;
        let args = RestArgs {
            rest_addr: Some(taken.local_addr().unwrap()),
            insecure_http: true,
            ..RestArgs::default()
        };
        let e = run(args, deps2, std::future::pending()).await.unwrap_err();
        assert!(format!("{e:#}").contains("binding the REST API"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
