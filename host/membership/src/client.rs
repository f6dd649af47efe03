//! The member's side: fetch, verify, persist and watch the network map;
//! register and republish the node's own records.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{Notify, watch};

use crate::bootstrap::NodeNetworkConfig;
use crate::pki;
use crate::server::{MAP_PATH, MEMBERS_PATH};
use crate::{MapView, MembershipError, Registration, SignedMemberInfo, decode_signed_map};

/// Default interval between map polls.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Default interval between republications of the node's own records.
pub const DEFAULT_REPUBLISH_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
/// Timeout of one request to the map server.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of a [`MapClient`].
#[derive(Debug, Clone)]
pub struct MapClientConfig {
    /// The map server's base URL, `https://host:port` (its gateway).
    pub map_url: String,
    /// The network CA certificate (PEM or DER): the only TLS root trusted,
    /// and the issuer every member's certificate must chain to.
    pub network_ca_pem_or_der: Vec<u8>,
    /// The operator's public key (SPKI, PEM or DER) that signs the map.
    pub operator_public_key: Vec<u8>,
    /// This node's TLS certificate chain (DER, leaf first), presented to the
    /// map server as client certificate. Empty: no client certificate.
    pub client_cert_chain_der: Vec<Vec<u8>>,
    /// The private key of the leaf, PKCS#8 DER (PEM accepted too).
    pub client_key_pkcs8_der: Vec<u8>,
    /// File the last verified map is kept in (so a restart works while the
    /// map server is down).
    pub persist_path: PathBuf,
    /// Interval between map polls.
    pub poll_interval: Duration,
    /// Interval between republications of the node's own records.
    pub republish_interval: Duration,
    /// The application network (group) this node belongs to: a map for
    /// another group is refused.
    pub group: String,
}

impl MapClientConfig {
    /// A configuration from a bootstrapped node's [`NodeNetworkConfig`]:
    /// reads the CA, operator public key, certificate and key files; the map
    /// is persisted to `data_dir/network-map.bin`; the client certificate is
    /// presented only when the network uses mutual TLS.
    pub fn from_node(node: &NodeNetworkConfig) -> Result<Self, MembershipError> {
        let chain = pki::certs_from_pem_or_der(&pki::read_file(&node.cert)?)?;
        let key = pki::pkcs8_from_pem_or_der(&pki::read_file(&node.key)?)?;
        Ok(Self {
            map_url: node.map_url.clone(),
            network_ca_pem_or_der: pki::read_file(&node.network_ca)?,
            operator_public_key: pki::read_file(&node.operator_public_key)?,
            client_cert_chain_der: if node.mutual_tls { chain } else { Vec::new() },
            client_key_pkcs8_der: key,
            persist_path: node.data_dir.join("network-map.bin"),
            poll_interval: Duration::from_millis(node.poll_interval_ms),
            republish_interval: node
                .republish_secs
                .map_or(DEFAULT_REPUBLISH_INTERVAL, Duration::from_secs),
            group: node.group.clone(),
        })
    }
}

/// Keeps a verified copy of the network map and the node's records in it.
#[derive(Debug)]
pub struct MapClient {
    config: MapClientConfig,
    ca_der: Vec<u8>,
    operator_spki: Vec<u8>,
    http: reqwest::Client,
    tx: watch::Sender<Arc<MapView>>,
    own: Mutex<Vec<SignedMemberInfo>>,
    own_changed: Notify,
}

impl MapClient {
    /// Builds the client (no I/O): an HTTPS client that trusts only the
    /// network CA and presents the node's certificate.
    pub fn new(config: MapClientConfig) -> Result<Self, MembershipError> {
        let ca_der = pki::cert_from_pem_or_der(&config.network_ca_pem_or_der)?;
        let operator_spki = pki::spki_from_pem_or_der(&config.operator_public_key)?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.clone()))
            .map_err(|e| MembershipError::credential("network CA certificate", e))?;
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| MembershipError::crypto("configuring TLS", e))?
        .with_root_certificates(roots);
        let tls = if config.client_cert_chain_der.is_empty() {
            builder.with_no_client_auth()
        } else {
            let chain = config
                .client_cert_chain_der
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect();
            let key = pki::pkcs8_from_pem_or_der(&config.client_key_pkcs8_der)?;
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
                .map_err(|e| MembershipError::credential("client certificate or key", e))?
        };
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| MembershipError::crypto("building the HTTPS client", e))?;
        let (tx, _) = watch::channel(Arc::new(MapView::empty()));
        Ok(Self {
            config,
            ca_der,
            operator_spki,
            http,
            tx,
            own: Mutex::new(Vec::new()),
            own_changed: Notify::new(),
        })
    }

    /// Watches the current verified map (starts as [`MapView::empty`]).
    pub fn view(&self) -> watch::Receiver<Arc<MapView>> {
        self.tx.subscribe()
    }

    /// The current verified map.
    pub fn current(&self) -> Arc<MapView> {
        self.tx.borrow().clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.map_url.trim_end_matches('/'), path)
    }

    /// Publishes `view` if it is newer than the current one.
    fn offer(&self, view: MapView) -> bool {
        let newer = {
            let cur = self.tx.borrow();
            cur.version() == 0 || view.version() > cur.version()
        };
        if newer {
            self.tx.send_replace(Arc::new(view));
        }
        newer
    }

    /// Loads the persisted map, verifies it again and publishes it if newer
    /// than the current view. `None` if there is none or it does not verify
    /// (logged).
    pub fn load_persisted(&self) -> Option<Arc<MapView>> {
        let path = &self.config.persist_path;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e, "cannot read the persisted network map");
                return None;
            }
        };
        let verified = decode_signed_map(&bytes)
            .and_then(|m| m.verify(&self.operator_spki, &self.ca_der, pki::now_ms()))
            .and_then(|v| self.check_group(v));
        match verified {
            Ok(view) => {
                let view = Arc::new(view);
                if self.offer((*view).clone()) {
                    tracing::info!(version = view.version(), "loaded the persisted network map");
                }
                Some(view)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e, "persisted network map rejected");
                None
            }
        }
    }

    fn check_group(&self, view: MapView) -> Result<MapView, MembershipError> {
        if view.group() != self.config.group {
            return Err(MembershipError::WrongGroup {
                expected: self.config.group.clone(),
                got: view.group().to_owned(),
            });
        }
        Ok(view)
    }

    /// Fetches the map, verifies it, and if it is newer persists it
    /// atomically and publishes it. Returns the current view.
    pub async fn fetch_once(&self) -> Result<Arc<MapView>, MembershipError> {
        let url = self.url(MAP_PATH);
        let http_err = |reason: String| MembershipError::Http {
            url: url.clone(),
            reason,
        };
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| http_err(error_chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(http_err(format!("{status}: {text}")));
        }
        let bytes = resp.bytes().await.map_err(|e| http_err(error_chain(&e)))?;
        let view = self.check_group(decode_signed_map(&bytes)?.verify(
            &self.operator_spki,
            &self.ca_der,
            pki::now_ms(),
        )?)?;
        let newer = {
            let cur = self.tx.borrow();
            cur.version() == 0 || view.version() > cur.version()
        };
        if newer {
            let path = self.config.persist_path.clone();
            let data = bytes.to_vec();
            tokio::task::spawn_blocking(move || pki::write_atomic(&path, &data))
                .await
                .map_err(|e| MembershipError::crypto("persisting the network map", e))??;
            tracing::debug!(
                version = view.version(),
                members = view.members().len(),
                "new network map"
            );
            self.offer(view);
        } else if view.version() < self.current().version() {
            tracing::warn!(
                served = view.version(),
                held = self.current().version(),
                "map server serves an older map than the one held; keeping ours"
            );
        }
        Ok(self.current())
    }

    /// Registers (or republishes) one record with the map server.
    pub async fn register(
        &self,
        record: &SignedMemberInfo,
    ) -> Result<Registration, MembershipError> {
        let url = self.url(MEMBERS_PATH);
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(record.to_bytes())
            .send()
            .await
            .map_err(|e| MembershipError::Http {
                url: url.clone(),
                reason: error_chain(&e),
            })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        match status.as_u16() {
            200 => Ok(Registration::Approved),
            202 => Ok(Registration::Pending),
            400 | 409 => Err(MembershipError::Refused {
                url,
                status: status.as_u16(),
                reason: text,
            }),
            _ => Err(MembershipError::Http {
                url,
                reason: format!("{status}: {text}"),
            }),
        }
    }

    /// Replaces the node's own records (published by [`MapClient::run`]) and
    /// has the running loop publish them now.
    pub fn set_own(&self, records: Vec<SignedMemberInfo>) {
        *self.own.lock().unwrap_or_else(|p| p.into_inner()) = records;
        self.own_changed.notify_one();
    }

    /// The records last given to [`MapClient::set_own`].
    pub fn own(&self) -> Vec<SignedMemberInfo> {
        self.own.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Has the running loop republish now (e.g. after the source given to
    /// [`MapClient::run_with`] changed).
    pub fn own_changed(&self) {
        self.own_changed.notify_one();
    }

    /// [`MapClient::run_with`] publishing the records given to
    /// [`MapClient::set_own`].
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()> + Send) {
        let this = self.clone();
        self.run_with(move || this.own(), shutdown).await
    }

    /// The background loop until `shutdown`: loads the persisted map if no
    /// map is held; polls every `poll_interval` (when the server is down it
    /// logs and keeps the last good view); publishes `own()` at start, every
    /// `republish_interval` and after [`MapClient::set_own`] /
    /// [`MapClient::own_changed`], retrying at each poll while the server is
    /// unreachable.
    pub async fn run_with<F>(self: Arc<Self>, own: F, shutdown: impl Future<Output = ()> + Send)
    where
        F: Fn() -> Vec<SignedMemberInfo> + Send + Sync,
    {
        if self.current().version() == 0 {
            self.load_persisted();
        }
        let mut poll =
            tokio::time::interval(self.config.poll_interval.max(Duration::from_millis(10)));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let every = self.config.republish_interval.max(Duration::from_secs(1));
        let mut republish = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        republish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut need_publish = true;
        tokio::pin!(shutdown);
        loop {
            if need_publish {
                need_publish = !self.publish_all(&own()).await;
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = poll.tick() => {
                    if let Err(e) = self.fetch_once().await {
                        tracing::warn!(cause = %e, version = self.current().version(), "network map poll failed; keeping the last good map");
                    }
                }
                _ = republish.tick() => need_publish = true,
                _ = self.own_changed.notified() => need_publish = true,
            }
        }
    }

    /// Registers every record; false when the server could not be reached
    /// (retry later). Refusals are logged and not retried until next time.
    async fn publish_all(&self, records: &[SignedMemberInfo]) -> bool {
        let mut reached = true;
        for r in records {
            let name = r
                .info_unverified()
                .map(|i| i.name.to_string())
                .unwrap_or_else(|_| "<undecodable record>".into());
            match self.register(r).await {
                Ok(outcome) => tracing::debug!(member = %name, ?outcome, "own record published"),
                Err(e @ MembershipError::Http { .. }) => {
                    tracing::warn!(member = %name, cause = %e, "cannot publish own record; will retry");
                    reached = false;
                }
                Err(e) => {
                    tracing::error!(member = %name, cause = %e, "own record refused by the map server")
                }
            }
        }
        reached
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
