//! The gateway's settings ([`GatewayArgs`], flags of `braid node start`).

use braid_http::Limits;
use std::time::Duration;

/// How many connections the gateway keeps open, and how long a peer may
/// stall before it is disconnected. Timeouts are in seconds and at least 1.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct GatewayArgs {
    /// The address the gateway listens on, instead of the network
    /// configuration's `gateway_addr`: for several gateways of a cluster
    /// on one host, behind a TCP load balancer at the address the network
    /// map lists (`gateway_endpoint`).
    #[arg(long, env = "BRAID_GATEWAY_LISTEN")]
    pub gateway_listen: Option<std::net::SocketAddr>,
    /// The most connections the gateway keeps open at once; further ones
    /// are closed at once. Default: as for --rest-max-connections.
    #[arg(long, env = "BRAID_GATEWAY_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_max_connections: Option<u64>,
    /// Seconds a peer gateway has to complete its TLS handshake.
    #[arg(long, env = "BRAID_GATEWAY_TLS_HANDSHAKE_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_HANDSHAKE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_tls_handshake_timeout_secs: u64,
    /// Seconds a peer gateway has to send a request header.
    #[arg(long, env = "BRAID_GATEWAY_HEADER_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_HEADER_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_header_timeout_secs: u64,
    /// Seconds an idle keep-alive gateway connection stays open.
    #[arg(long, env = "BRAID_GATEWAY_IDLE_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_IDLE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_idle_timeout_secs: u64,
    /// Seconds a peer gateway has to send a whole batch; a slower one is
    /// answered 408 and disconnected.
    #[arg(long, env = "BRAID_GATEWAY_BODY_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_BODY_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_body_timeout_secs: u64,
    /// Seconds a peer gateway may read nothing of its answer before it is
    /// disconnected.
    #[arg(long, env = "BRAID_GATEWAY_WRITE_TIMEOUT_SECS", default_value_t = secs(Limits::DEFAULT_WRITE_TIMEOUT), value_parser = clap::value_parser!(u64).range(1..))]
    pub gateway_write_timeout_secs: u64,
}

const fn secs(d: Duration) -> u64 {
    d.as_secs()
}

impl Default for GatewayArgs {
    /// The flags' defaults.
    fn default() -> Self {
        braid_types::settings::defaults()
    }
}

impl GatewayArgs {
    /// The server's limits, for a process allowed `fd_limit` open files.
    pub fn limits(&self, fd_limit: u64) -> Limits {
        Limits {
            max_connections: usize::try_from(
                self.gateway_max_connections
                    .unwrap_or_else(|| braid_http::default_max_connections(fd_limit)),
            )
            .unwrap_or(usize::MAX),
            handshake_timeout: Duration::from_secs(self.gateway_tls_handshake_timeout_secs),
            header_timeout: Duration::from_secs(self.gateway_header_timeout_secs),
            idle_timeout: Duration::from_secs(self.gateway_idle_timeout_secs),
            body_timeout: Duration::from_secs(self.gateway_body_timeout_secs),
            write_timeout: Duration::from_secs(self.gateway_write_timeout_secs),
            ..Limits::default()
        }
    }
}
