//! The flow worker on its own: [`run`] builds the runtime its
//! [`FlowArgs`] ask for, starts the worker on the bus its [`FlowDeps`]
//! name, runs flows until `shutdown`, then stops them at their next
//! suspension ([`FlowWorker::drain`]).

use crate::cluster::ClusterConfig;
use crate::{FlowArgs, FlowWorker, Remote};
use braid_runtime::Runtime;
use braid_storage::Store;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How the flow worker meets the other workers.
pub enum FlowBus {
    /// In this process (the embedded node): the in-process bus, and the
    /// link manager as `remote` when the node is part of a network.
    InProcess {
        /// Where messages for vnodes of other nodes go.
        remote: Option<Arc<dyn Remote>>,
    },
    /// On a cluster's bus and shared store.
    Cluster(Box<ClusterConfig>),
}

/// What the flow worker needs from the rest of the node.
pub struct FlowDeps {
    /// Where flows, journals, inboxes and the catalog are kept.
    pub store: Arc<dyn Store>,
    /// Where compiled packages are cached.
    pub cache_dir: PathBuf,
    /// The application network's name (part of every holding id).
    pub group: String,
    /// How long messages that came before their session-init wait for it
    /// (the senders' message TTL).
    pub early_message_ttl: Duration,
    /// The bus.
    pub bus: FlowBus,
    /// Gets the worker once it runs, for the workers of this process that
    /// call it (the REST API, the link manager).
    pub ready: Option<tokio::sync::oneshot::Sender<FlowWorker>>,
}

/// How long a stop waits for live flows to reach a suspension.
pub const DRAIN: Duration = Duration::from_secs(3);

/// Starts the flow worker: loads what it owns, resumes unfinished flows
/// and routes messages (see [`FlowWorker::start_with_remote`] and
/// [`FlowWorker::start_cluster`]).
pub async fn start(args: &FlowArgs, deps: FlowDeps) -> anyhow::Result<FlowWorker> {
    let runtime = Arc::new(Runtime::new(args.runtime_config(&deps.cache_dir))?);
    let config = args.worker_config(&deps.group, deps.early_message_ttl);
    let w = match deps.bus {
        FlowBus::InProcess { remote } => {
            let (bus, bus_rx) = braid_bus::InProcessBus::new();
            FlowWorker::start_with_remote(
                deps.store,
                Arc::new(bus),
                bus_rx,
                runtime,
                config,
                remote,
            )
            .await?
        }
        FlowBus::Cluster(c) => FlowWorker::start_cluster(deps.store, runtime, config, *c).await?,
    };
    if let Some(ready) = deps.ready {
        let _ = ready.send(w.clone());
    }
    Ok(w)
}

/// Runs the flow worker until `shutdown` completes, then stops its flows
/// (they resume from their last checkpoint at the next start, here or on
/// another worker). Fails at once if it cannot start (the store, a
/// package that no longer loads, the bus).
pub async fn run(
    args: FlowArgs,
    deps: FlowDeps,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let w = start(&args, deps).await?;
    shutdown.await;
    w.drain(DRAIN).await;
    Ok(())
}

impl FlowWorker {
    /// Stops running flows ([`FlowWorker::stop`]) and waits up to `within`
    /// for the live ones to reach a suspension (they read the store as
    /// they go: close it after this).
    pub async fn drain(&self, within: Duration) {
        self.stop();
        let stopped = tokio::time::timeout(within, async {
            while self.counts().0 > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if stopped.is_err() {
            tracing::info!(
                live = self.counts().0,
                "flows still running after {within:?}; they resume from their last \
                 checkpoint at the next start"
            );
        }
    }
}
