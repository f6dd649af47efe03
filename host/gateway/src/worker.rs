//! The gateway on its own: [`run`] binds, serves peer gateways with the
//! limits its [`crate::GatewayArgs`] set, until `shutdown`.

/// What the gateway needs from the rest of the node.
pub struct GatewayDeps {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Its certificate and key, the network CA and CRLs.
    pub tls: crate::TlsMaterial,
    /// Whether peers must show a client certificate.
    pub mutual_tls: bool,
    /// Where the packets peers POST go (to the link manager).
    pub inbound: tokio::sync::mpsc::Sender<crate::Inbound>,
    /// Which client certificates belong to members.
    pub peers: std::sync::Arc<dyn crate::PeerCheck>,
    /// More routes on the same listener (the map server's, on the
    /// operator's node).
    pub extra: axum::Router,
    /// The process's open-file limit (the default connection limit
    /// follows it).
    pub fd_limit: u64,
    /// Gets the address it listens on once it does.
    pub ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
}

/// Serves peer gateways until `shutdown` completes, then lets requests
/// under way finish. Fails at once, with the reason, if the address cannot
/// be bound or the TLS material is unusable.
pub async fn run(
    args: crate::GatewayArgs,
    deps: GatewayDeps,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let server = crate::GatewayServer::new(
        crate::ServerConfig {
            limits: args.limits(deps.fd_limit),
            ..crate::ServerConfig::new(deps.tls, deps.mutual_tls)
        },
        deps.inbound,
        deps.peers,
        deps.extra,
    )
    .map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("configuring the gateway's HTTPS server: {e}"),
        )
    })?;
    let listener = tokio::net::TcpListener::bind(deps.addr)
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("binding the gateway to {}: {e}", deps.addr),
            )
        })?;
    if let Some(ready) = deps.ready {
        let _ = ready.send(listener.local_addr()?);
    }
    server.run_until(listener, shutdown).await
}
