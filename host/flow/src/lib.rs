//! The flow worker: starts flows, commits their checkpoints, releases their
//! messages, routes session messages to flows of this node, and keeps a
//! bounded set of flows live (the rest are evicted and resumed by replay).
//!
//! Ordering that makes crashes harmless:
//! - a checkpoint (journal entries + outbox + status) commits in one store
//!   transaction, and only then are its messages published;
//! - the router writes a delivered message to the receiver's inbox and
//!   deletes it from the outbox in one transaction, and only then wakes
//!   the receiver;
//! - a kill is durable before it is acknowledged and is carried out at
//!   start-up if the node stopped first;
//! - at start-up every outbox message is published again (receivers drop
//!   duplicates by sequence number) and every unfinished flow is resumed.
//!
//! Memory holds what running flows need: unfinished flows, vnodes and
//! packages. Finished flows are read from the store when asked for and
//! deleted after the retention (see [`WorkerConfig::retention`]).
//!
//! Modules: `state` (the in-memory state), `run` (scheduling, eviction,
//! checkpoints), `delivery` (messages into flows), `flows` (client
//! requests), `vnodes` (packages and vnodes), `retention`, [`metrics`],
//! [`cluster`] (cluster mode), `lifecycle` ([`run`]: the worker on its
//! own), `service` (the worker as the REST worker's
//! [`braid_api::FlowService`]), `settings` ([`FlowArgs`]). The status-change
//! log streams read, [`events`], is in `braid-api`.

use braid_bus::{Bus, BusReceiver};
use braid_runtime::Runtime;
use braid_storage::Store;
use braid_types::{SessionMessage, X500Name};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub mod cluster;
mod delivery;
mod flows;
mod lifecycle;
pub mod metrics;
mod retention;
mod run;
mod service;
mod settings;
mod state;
mod upgrade_check;
mod vnodes;

pub use braid_api::{
    EventLog, MemberSummary, Network, NetworkSummary, StatusChange, StatusEvent, WorkerError,
    events,
};
pub use delivery::MAX_EARLY_FLOWS;
pub use lifecycle::{DRAIN, FlowBus, FlowDeps, run, start};
pub use metrics::{FlowEvent, Histogram, Metrics};
pub use settings::FlowArgs;
use state::State;

/// Lines about store faults the worker retries through: one per flow and
/// retry would grow with the number of flows waiting, so they are few per
/// minute, saying how many were left out.
static FAULT_LOGS: braid_types::log_limit::LogLimiter =
    braid_types::log_limit::LogLimiter::new(10, Duration::from_secs(60));

/// The link manager, as the flow worker sees it: who is a member of the
/// network beyond this node, and where messages for vnodes of other nodes go.
pub trait Remote: Send + Sync + 'static {
    /// Whether `name` is a member of the network hosted by another node.
    fn is_member(&self, name: &X500Name) -> bool;
    /// Carries messages (already durable in the outbox) to vnodes of other
    /// nodes. The link manager calls [`FlowWorker::remote_delivered`] once
    /// the peer holds them durably, or [`FlowWorker::remote_failed`].
    fn send(&self, messages: Vec<SessionMessage>);
}

/// Flow worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Flows kept live (with an instance) at once.
    pub max_live_flows: usize,
    /// The application network's name (part of every holding id).
    pub group: String,
    /// How long finished flows are kept (record, journal, result) before
    /// they are deleted.
    pub retention: Duration,
    /// Status changes kept for status streams (see [`EventLog::new`]).
    pub status_events: usize,
    /// How long messages that arrived before their session-init wait for
    /// it (as long as senders retry: the message TTL); then they are
    /// deleted and the session's init, should it still come, is dropped.
    pub early_message_ttl: Duration,
}

/// The flow worker of one node.
#[derive(Clone)]
pub struct FlowWorker {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    runtime: Arc<Runtime>,
    config: WorkerConfig,
    state: Mutex<State>,
    events: EventLog,
    metrics: Metrics,
    remote: Option<Arc<dyn Remote>>,
    network: std::sync::OnceLock<Arc<dyn Network>>,
    /// Bumped whenever a vnode is created or changed.
    vnode_generation: tokio::sync::watch::Sender<u64>,
    /// Wakes the timer task when an earlier timer is set.
    timers_changed: tokio::sync::Notify,
    /// Partitions flows are spread over (1 in an embedded node: every flow
    /// is in [`PARTITION`]). Every checkpoint is fenced with the owner epoch
    /// of its flow's partition (`State::owned`).
    partitions: u16,
    /// How this worker meets the others (cluster mode only).
    cluster: Option<cluster::Cluster>,
    /// Becomes true when the worker stops (ends its bus subscriptions).
    stopped: tokio::sync::watch::Sender<bool>,
}

/// The flows' partition in a node that owns all its flows.
pub const PARTITION: u16 = 0;

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("flow worker state lock")
    }
}

impl FlowWorker {
    /// Loads the node's state, resumes unfinished flows, republishes the
    /// outbox and starts routing messages from `bus_rx`. Messages for
    /// vnodes of other nodes are dropped (a node without a network).
    pub async fn start(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        bus_rx: BusReceiver,
        runtime: Arc<Runtime>,
        config: WorkerConfig,
    ) -> anyhow::Result<FlowWorker> {
        Self::start_with_remote(store, bus, bus_rx, runtime, config, None).await
    }

    /// [`start`](Self::start), handing messages for vnodes of other nodes
    /// to `remote` (the link manager).
    pub async fn start_with_remote(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        bus_rx: BusReceiver,
        runtime: Arc<Runtime>,
        config: WorkerConfig,
        remote: Option<Arc<dyn Remote>>,
    ) -> anyhow::Result<FlowWorker> {
        let w = Self::assemble(store, bus, runtime, config, remote, None).await?;
        // Owning the only partition: from here on, a worker that claimed it
        // before us can no longer advance any flow.
        w.take_partitions(&[PARTITION]).await?;
        w.run_tasks(bus_rx);
        Ok(w)
    }

    /// A worker of a cluster: it meets the others on `cluster.bus` and the
    /// store. With [`cluster::ClusterRole::Flows`] it runs the flows of the
    /// event topic's partitions the group assigns it; with
    /// [`cluster::ClusterRole::Client`] it runs none and only serves
    /// clients (the REST worker).
    pub async fn start_cluster(
        store: Arc<dyn Store>,
        runtime: Arc<Runtime>,
        config: WorkerConfig,
        cluster: cluster::ClusterConfig,
    ) -> anyhow::Result<FlowWorker> {
        let (bus, bus_rx) = braid_bus::InProcessBus::new();
        let remote = cluster.remote.clone();
        let w = Self::assemble(
            store,
            Arc::new(bus),
            runtime,
            config,
            remote,
            Some(cluster::Cluster::new(cluster)),
        )
        .await?;
        w.reload_catalog().await?;
        w.run_tasks(bus_rx);
        cluster::start(&w).await?;
        Ok(w)
    }

    /// The worker, with no catalog (vnodes, packages) and no flows yet.
    async fn assemble(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        runtime: Arc<Runtime>,
        config: WorkerConfig,
        remote: Option<Arc<dyn Remote>>,
        cluster: Option<cluster::Cluster>,
    ) -> anyhow::Result<FlowWorker> {
        let events = EventLog::new(config.status_events);
        let partitions = cluster
            .as_ref()
            .map_or(1, |c| c.config.topics.event_partitions.max(1));
        let inner = Arc::new(Inner {
            store,
            bus,
            runtime,
            config,
            state: Mutex::new(State::default()),
            events,
            metrics: Metrics::default(),
            remote,
            network: std::sync::OnceLock::new(),
            vnode_generation: tokio::sync::watch::channel(0).0,
            timers_changed: tokio::sync::Notify::new(),
            partitions,
            cluster,
            stopped: tokio::sync::watch::channel(false).0,
        });
        // The catalog comes with the first partition's load (embedded) or
        // from the store at cluster start.
        Ok(FlowWorker { inner })
    }

    fn run_tasks(&self, bus_rx: BusReceiver) {
        tokio::spawn(delivery::route(self.clone(), bus_rx));
        tokio::spawn(run::timer_loop(self.clone()));
        if self
            .inner
            .cluster
            .as_ref()
            .is_none_or(|c| c.config.role == cluster::ClusterRole::Flows)
        {
            tokio::spawn(retention::sweeper(self.clone()));
        }
    }

    /// The log of status changes (for status streams).
    pub fn events(&self) -> &EventLog {
        &self.inner.events
    }

    /// Changes whenever a vnode is created or updated.
    pub fn subscribe_vnodes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.vnode_generation.subscribe()
    }

    /// Attaches the node's network services (once).
    pub fn set_network(&self, network: Arc<dyn Network>) {
        let _ = self.inner.network.set(network);
    }

    /// The node's network services, when it is part of a network.
    pub fn network(&self) -> Option<&Arc<dyn Network>> {
        self.inner.network.get()
    }

    /// The application network's name.
    pub fn group(&self) -> &str {
        &self.inner.config.group
    }

    /// The store behind this worker.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Stops running flows: nothing starts or resumes any more, and
    /// checkpoints are refused (flows stop at their next suspension and
    /// resume from their last checkpoint on the next start). Commits
    /// already sent to the store finish; close the store after this.
    pub fn stop(&self) {
        self.inner.stopped.send_replace(true);
        let mut st = self.inner.lock();
        st.stopping = true;
        st.queue.clear();
        st.queued.clear();
        for l in st.live.values() {
            let _ = l.events.send(braid_runtime::Event::Evict);
        }
    }

    /// Whether the worker has stopped running flows (shutting down, or its
    /// partition was claimed by another worker).
    pub fn stopped(&self) -> bool {
        self.inner.lock().stopping
    }

    /// The worker's metrics, with live and unfinished-flow gauges appended.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        self.inner.metrics.render(out);
        if let Some(n) = self.inner.network.get() {
            n.render_metrics(out);
        }
        let st = self.inner.lock();
        let unfinished = st.flows.len();
        let live = st.live.len();
        let suspended_live = st.lru.len();
        drop(st);
        let _ = writeln!(
            out,
            "# HELP braid_flows_live Flows with a wasm instance.\n# TYPE braid_flows_live gauge\nbraid_flows_live {live}\n\
             # HELP braid_flows_suspended_live Live flows waiting at a suspension.\n# TYPE braid_flows_suspended_live gauge\nbraid_flows_suspended_live {suspended_live}\n\
             # HELP braid_flows_unfinished Flows not yet ended (live or evicted).\n# TYPE braid_flows_unfinished gauge\nbraid_flows_unfinished {unfinished}"
        );
    }
}

pub use braid_types::retry::retry_until_ok;
