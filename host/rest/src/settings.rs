//! The REST worker's settings ([`RestArgs`], flags of `braid node start`).

use braid_http::Limits;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of the REST API: where it listens, its TLS, its connections.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RestArgs {
    /// Address of the REST API (port 0 picks a free port; the URL is
    /// written to DATA_DIR/rest.url). Default: the rest_addr of
    /// --network-config, else 127.0.0.1:8888.
    #[arg(long, env = "BRAID_REST_ADDR")]
    pub rest_addr: Option<SocketAddr>,
    /// The REST API's certificate chain (PEM, leaf first). Without it the
    /// node makes a development CA and certificate under DATA_DIR/tls/
    /// (clients trust DATA_DIR/tls/ca.pem).
    #[arg(long, env = "BRAID_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "BRAID_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Extra host names or IP addresses clients use to reach the node; the
    /// development certificate is made valid for them (besides localhost,
    /// 127.0.0.1, ::1 and the REST address).
    #[arg(long, env = "BRAID_PUBLIC_HOST", value_delimiter = ',')]
    pub public_host: Vec<String>,
    /// Serve the REST API over plain HTTP instead of HTTPS. Only allowed
    /// when --rest-addr is a loopback address.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure_http: bool,
    /// The most connections the REST API keeps open at once; further ones
    /// are closed at once. Default: from the file-descriptor limit (which
    /// the node raises to its hard limit at start): a quarter of it for
    /// each server, between 64 and 4096.
    #[arg(long, env = "BRAID_REST_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_max_connections: Option<u64>,
    /// Seconds a REST client has to complete its TLS handshake.
    #[arg(long, env = "BRAID_REST_TLS_HANDSHAKE_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_HANDSHAKE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_tls_handshake_timeout_secs: u64,
    /// Seconds a REST client has to send a request header (from the
    /// connection's start, or from the first byte of a later request).
    #[arg(long, env = "BRAID_REST_HEADER_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_HEADER_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_header_timeout_secs: u64,
    /// Seconds an idle keep-alive REST connection stays open.
    #[arg(long, env = "BRAID_REST_IDLE_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_IDLE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_idle_timeout_secs: u64,
    /// Seconds a REST client has to send a whole request body (a package
    /// upload included); a slower one is answered 408 and disconnected.
    #[arg(long, env = "BRAID_REST_BODY_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_BODY_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_body_timeout_secs: u64,
    /// Seconds a REST client may read nothing of what it is sent before it
    /// is disconnected.
    #[arg(long, env = "BRAID_REST_WRITE_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_WRITE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub rest_write_timeout_secs: u64,
    /// On shutdown, seconds the REST API lets requests under way finish
    /// (event streams are then closed).
    #[arg(long, env = "BRAID_REST_SHUTDOWN_GRACE_SECS", default_value_t = secs(Limits::DEFAULT_SHUTDOWN_GRACE))]
    pub rest_shutdown_grace_secs: u64,
}

const fn secs(d: Duration) -> u64 {
    d.as_secs()
}

impl Default for RestArgs {
    /// The flags' defaults.
    fn default() -> Self {
        braid_types::settings::defaults()
    }
}

impl RestArgs {
    /// The server's limits, for a process allowed `fd_limit` open files.
    pub fn limits(&self, fd_limit: u64) -> Limits {
        Limits {
            max_connections: usize::try_from(
                self.rest_max_connections
                    .unwrap_or_else(|| braid_http::default_max_connections(fd_limit)),
            )
            .unwrap_or(usize::MAX),
            handshake_timeout: Duration::from_secs(self.rest_tls_handshake_timeout_secs),
            header_timeout: Duration::from_secs(self.rest_header_timeout_secs),
            idle_timeout: Duration::from_secs(self.rest_idle_timeout_secs),
            body_timeout: Duration::from_secs(self.rest_body_timeout_secs),
            write_timeout: Duration::from_secs(self.rest_write_timeout_secs),
            shutdown_grace: Duration::from_secs(self.rest_shutdown_grace_secs),
        }
    }
}
