//! A node: the workers this process runs (all of them: the embedded node;
//! or those `--roles` names, in a cluster), wired together.
//!
//! Modules: `settings` (the flags), `cluster` (cluster mode's checks and
//! bus), `system` (open files, the store).

use anyhow::Context as _;
use braid_flow::cluster::ClusterRole;
use braid_flow::{FlowBus, FlowDeps, FlowWorker};
use braid_rest::Auth;
use braid_storage::Store;
use std::sync::Arc;
use std::time::Duration;

mod cluster;
mod settings;
mod system;

use cluster::cluster_config;
pub use settings::{NodeArgs, Role};
use system::open_store;
pub use system::raise_fd_limit;

/// How often a REST worker of a cluster reloads users and roles (a change
/// made through one is enforced by all within this time).
const RBAC_RELOAD: Duration = Duration::from_secs(2);

/// A started node.
pub struct Node {
    /// Base URL of the REST API.
    pub url: String,
    /// The flow worker.
    pub worker: FlowWorker,
    /// Where the REST server runs.
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The network services (link manager, gateway, map client), when the
    /// node is part of a network; dropping them stops them.
    pub _network: Option<crate::network::Running>,
    store: Arc<dyn Store>,
    stop_rest: Option<tokio::sync::oneshot::Sender<()>>,
    /// Where the flow worker runs ([`braid_flow::run`]), and its stop.
    flows: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop_flows: tokio::sync::oneshot::Sender<()>,
    /// How long a graceful stop waits for the REST server: its own grace
    /// for requests under way, and a little to close what is left.
    rest_drain: Duration,
}

impl Node {
    /// Stops the node gracefully: the REST API stops accepting and lets
    /// requests in flight finish (for a few seconds), the network services
    /// stop, no flow starts or resumes any more, the commits already sent
    /// to the store finish and the store is closed cleanly, so the next
    /// start needs no repair. Flows resume from their last checkpoint.
    pub async fn shutdown(mut self) {
        // Status streams never end by themselves: end them first so that
        // the REST server can drain at once.
        self.worker.events().close();
        match self.stop_rest.take() {
            Some(stop) => {
                let _ = stop.send(());
                let drain = self.rest_drain;
                match tokio::time::timeout(drain, &mut self.server).await {
                    Ok(Ok(Err(e))) => {
                        tracing::warn!(cause = %e, "REST server ended with an error")
                    }
                    Ok(_) => {}
                    Err(_) => {
                        tracing::info!("REST connections still open after {drain:?}; closing them");
                        self.server.abort();
                    }
                }
            }
            // No REST API in this process.
            None => self.server.abort(),
        }
        drop(self._network.take());
        // Live flows are told to stop at their next suspension; let them
        // (they read the store as they go) before the store closes.
        let _ = self.stop_flows.send(());
        match (&mut self.flows).await {
            Ok(Err(e)) => tracing::warn!(cause = %e, "the flow worker ended with an error"),
            Err(e) => tracing::warn!(cause = %e, "the flow worker's task failed"),
            Ok(Ok(())) => {}
        }
        self.store.close().await;
        tracing::info!("node stopped cleanly");
    }
}

/// Starts every worker; returns once the REST API listens and its URL is
/// in `DATA_DIR/rest.url`.
pub async fn start(args: &NodeArgs) -> anyhow::Result<Node> {
    let net = match &args.network_config {
        Some(path) => {
            let mut n = braid_membership::NodeNetworkConfig::load(path)
                .with_context(|| format!("reading the network configuration {}", path.display()))?;
            args.membership.apply(&mut n);
            Some(n)
        }
        None => None,
    };
    let mut args = args.clone();
    if let Some(n) = &net {
        if args.data_dir.is_none() {
            args.data_dir = Some(n.data_dir.clone());
        }
        args.group = n.group.clone();
        if args.rest.rest_addr.is_none() {
            args.rest.rest_addr = Some(n.rest_addr);
        }
    }
    let args = &args;
    let dir = args.data_dir.as_ref().context("--data-dir is required")?;
    args.rest.check()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let fd_limit = raise_fd_limit();
    let rest_limits = args.rest.limits(fd_limit);
    let rest_drain = rest_limits.shutdown_grace + Duration::from_secs(2);
    let gateway_limits = args.gateway.limits(fd_limit);
    let gateway_setup = crate::network::GatewaySetup {
        args: (*args.gateway).clone(),
        fd_limit,
    };
    let wanted = (rest_limits.max_connections as u64).saturating_add(if net.is_some() {
        gateway_limits.max_connections as u64
    } else {
        0
    });
    if wanted.saturating_add(braid_http::RESERVED_FDS) > fd_limit {
        tracing::warn!(
            fd_limit,
            rest = rest_limits.max_connections,
            gateway = gateway_limits.max_connections,
            "the connection limits add up to more than the open-file limit allows: \
             past it, connections fail with \"too many open files\"; lower \
             --rest-max-connections / --gateway-max-connections or raise the limit"
        );
    }
    tracing::info!(
        fd_limit,
        rest_max_connections = rest_limits.max_connections,
        gateway_max_connections = gateway_limits.max_connections,
        "connection limits"
    );
    // Flows are spread over the event topic's partitions in a cluster,
    // all in one in an embedded node.
    let partitions = if args.cluster.bus == "embedded" {
        1
    } else {
        args.cluster.flow_partitions
    };
    let store = open_store(&args.store, dir, partitions).await?;
    let cluster = cluster_config(args, net.is_some()).await?;
    let joining = match (&net, &cluster) {
        (Some(n), None) => Some(crate::network::Joining::prepare(n, dir)?),
        _ => None,
    };
    // In a cluster: the bus and topics the network services use, and the
    // tasks that keep them.
    let mut services: Option<crate::network::Running> = None;
    let cluster_bus = cluster.as_ref().map(|c| (c.bus.clone(), c.topics.clone()));
    let bus = match cluster {
        Some(mut c) => {
            if let (Some(n), ClusterRole::Flows) = (&net, c.role) {
                let (remote, running) = crate::network::cluster_remote(
                    n,
                    dir,
                    c.bus.clone(),
                    c.topics.p2p_out.clone(),
                )?;
                c.remote = Some(remote);
                services = Some(running);
            }
            FlowBus::Cluster(Box::new(c))
        }
        None => FlowBus::InProcess {
            remote: joining.as_ref().map(|j| j.remote()),
        },
    };
    let (ready, started) = tokio::sync::oneshot::channel();
    let deps = FlowDeps {
        store: store.clone(),
        cache_dir: dir.join("compiled"),
        group: args.group.clone(),
        early_message_ttl: args.link.ttl(),
        bus,
        ready: Some(ready),
    };
    let (stop_flows, flows_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut flows = tokio::spawn(braid_flow::run((*args.flow).clone(), deps, async move {
        let _ = flows_stopped.await;
    }));
    let worker = match started.await {
        Ok(w) => w,
        // It ended before it ran: say why.
        Err(_) => return Err(ended_early(&mut flows, "the flow worker").await),
    };
    let p2p_config = args.link.config();
    if let (Some((bus, topics)), Some(n)) = (&cluster_bus, &net)
        && (args.cluster.runs(Role::Link) || args.cluster.runs(Role::Gateway))
    {
        // This cluster's link manager and membership client (fed from the
        // p2p.out topic; what arrives goes onto flow.event) and gateway:
        // in one process, or the gateway apart (they meet on link.out and
        // link.in).
        let gateway = args.cluster.runs(Role::Gateway);
        // This process as a member of the gateways' or the link managers'
        // group (they share the partitions of link.out or p2p.out).
        let member = |group: &str, topic: &str| braid_bus::live::LiveGroup {
            bus: bus.clone(),
            store: store.clone(),
            group: group.to_string(),
            topics: vec![topic.to_string()],
            id: format!(
                "{:?} pid {} started {}",
                args.cluster.roles,
                std::process::id(),
                braid_types::now_millis()
            ),
            liveness: Duration::from_millis(2 * args.cluster.bus_session_timeout_ms),
        };
        let mut running = if !args.cluster.runs(Role::Link) {
            let r = crate::network::run_gateway(
                n,
                dir,
                store.clone(),
                &gateway_setup,
                bus.clone(),
                topics,
                member(&topics.gateway_group, &topics.link_out),
            )
            .await?;
            tracing::info!("gateway started");
            r
        } else {
            let j = crate::network::Joining::prepare(n, dir)?;
            let port = j.remote();
            let (mut r, share) = if gateway {
                // Its gateway receives for every pair: it carries them all
                // (one such process per cluster).
                let r = j
                    .start(
                        n,
                        worker.clone(),
                        &gateway_setup,
                        p2p_config.clone(),
                        Some((bus.clone(), topics.membership_admin.clone())),
                    )
                    .await?;
                (r, crate::network::LinkShare::All)
            } else {
                // Any number: they share the pairs; what every gateway
                // receives reaches each (link.in), and each takes its own.
                let (share, carried) = tokio::sync::watch::channel(braid_p2p::Share::Partitions {
                    partitions: topics.event_partitions,
                    held: Default::default(),
                });
                let r = j
                    .start_links_on_bus(
                        n,
                        worker.clone(),
                        p2p_config.clone(),
                        bus.clone(),
                        topics,
                        carried,
                    )
                    .await?;
                let member = member(&topics.link_group, &topics.p2p_out);
                (r, crate::network::LinkShare::Group { share, member })
            };
            r.keep(
                crate::network::feed_links(
                    worker.clone(),
                    port,
                    bus.clone(),
                    topics.p2p_out.clone(),
                    share,
                )
                .await?,
            );
            tracing::info!(gateway, "link manager and membership client started");
            r
        };
        if let Some(s) = services.take() {
            running.absorb(s);
        }
        services = Some(running);
    }
    if let (Some((bus, topics)), Some(n), true, None) = (
        &cluster_bus,
        &net,
        args.cluster.runs(Role::Rest),
        worker.network(),
    ) {
        let r = crate::network::cluster_rest_network(
            n,
            dir,
            &worker,
            store.clone(),
            (bus.clone(), topics.membership_admin.clone()),
        )?;
        match services.as_mut() {
            Some(s) => s.absorb(r),
            None => services = Some(r),
        }
    }
    if !args.cluster.runs(Role::Rest) {
        if args.cluster.runs(Role::Flow) {
            tracing::info!(
                partitions = args.cluster.flow_partitions,
                "flow worker started (no REST API in this process)"
            );
        } else {
            tracing::info!(
                roles = ?args.cluster.roles,
                "network worker started (no REST API in this process)"
            );
        }
        return Ok(Node {
            url: String::new(),
            worker,
            server: tokio::spawn(std::future::pending()),
            _network: services,
            store,
            stop_rest: None,
            rest_drain,
            flows,
            stop_flows,
        });
    }
    let network = match (joining, &net) {
        (Some(j), Some(n)) => Some(
            j.start(n, worker.clone(), &gateway_setup, p2p_config, None)
                .await?,
        ),
        _ => services,
    };
    let auth = Arc::new(
        Auth::init(
            store.clone(),
            std::env::var("BRAID_ADMIN_PASSWORD").ok(),
            &dir.join("admin-password"),
        )
        .await?,
    );
    if args.cluster.bus != "embedded" {
        // Other REST workers change users and roles too.
        Auth::follow_store(&auth, RBAC_RELOAD);
    }
    let (stop_rest, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stopped.await;
    };
    let (ready, listening) = tokio::sync::oneshot::channel();
    let deps = braid_rest::RestDeps {
        flows: Arc::new(worker.clone()),
        auth,
        data_dir: dir.clone(),
        fd_limit,
        ready: Some(ready),
    };
    let mut server = tokio::spawn(braid_rest::run((*args.rest).clone(), deps, stopped));
    let url = match listening.await {
        Ok(url) => url,
        // It ended before it listened: say why.
        Err(_) => return Err(ended_early(&mut server, "the REST API").await),
    };
    tracing::info!(%url, data_dir = %dir.display(), "node started");
    Ok(Node {
        url,
        worker,
        server,
        _network: network,
        store,
        stop_rest: Some(stop_rest),
        rest_drain,
        flows,
        stop_flows,
    })
}

/// Why a worker's task ended before it said it was running.
async fn ended_early(
    task: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
    what: &str,
) -> anyhow::Error {
    match task.await {
        Ok(Err(e)) => e,
        Ok(Ok(())) => anyhow::anyhow!("{what} stopped before it started"),
        Err(e) => anyhow::anyhow!("{what}'s task failed: {e}"),
    }
}
