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
//! - at start-up every outbox message is published again (receivers drop
//!   duplicates by sequence number) and every unfinished flow is resumed.

use braid_bus::{Bus, BusReceiver};
use braid_runtime::{Checkpoint, Event, FlowEnv, FlowInput, Package, RunOutcome, Runtime};
use braid_storage::{FlowRecord, Op, PackageRecord, Store, StoreError, VnodeRecord};
use braid_types::{
    Body, Checksum, ClientRequestId, FailureKind, FlowId, FlowInfo, FlowStart, FlowStatus,
    HoldingId, SessionFault, SessionMessage, X500Name, now_millis,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

pub mod metrics;
pub use metrics::{FlowEvent, Histogram, Metrics};

/// A request the worker refuses; each maps to a 4xx.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It exists already.
    #[error("{0}")]
    Conflict(String),
    /// The request is not acceptable as it stands.
    #[error("{0}")]
    Invalid(String),
    /// The store failed; retry later.
    #[error("{0}")]
    Store(#[from] StoreError),
}

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

/// One member of the network map, as the REST API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSummary {
    /// X.500 name.
    pub name: String,
    /// Its gateway.
    pub endpoint: String,
    /// Its record's serial.
    pub serial: u64,
    /// Its platform version.
    pub platform_version: u32,
}

/// This node's view of its application network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSummary {
    /// The network's name.
    pub group: String,
    /// Version of the network map this node holds (0: none yet).
    pub map_version: u64,
    /// Members in that map.
    pub members: Vec<MemberSummary>,
    /// Whether this node runs the network-map (operator) role.
    pub operator: bool,
}

/// The node's network services, for the REST API and metrics.
#[async_trait::async_trait]
pub trait Network: Send + Sync + 'static {
    /// The map as this node holds it.
    fn summary(&self) -> NetworkSummary;
    /// Registrations waiting for the operator's approval (operator only).
    fn pending(&self) -> Result<Vec<MemberSummary>, WorkerError>;
    /// Approves a pending registration (operator only).
    async fn approve(&self, name: &X500Name) -> Result<(), WorkerError>;
    /// Appends Prometheus metrics of the link manager and the gateway.
    fn render_metrics(&self, out: &mut String);
}

/// Flow worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Flows kept live (with an instance) at once.
    pub max_live_flows: usize,
    /// The application network's name (part of every holding id).
    pub group: String,
}

#[derive(Debug)]
struct Live {
    events: mpsc::UnboundedSender<Event>,
    evicting: bool,
}

#[derive(Default)]
struct State {
    vnodes: HashMap<HoldingId, VnodeRecord>,
    names: HashMap<X500Name, HoldingId>,
    packages: HashMap<Checksum, PackageRecord>,
    flows: HashMap<FlowId, FlowRecord>,
    by_client: HashMap<(HoldingId, ClientRequestId), Option<FlowId>>,
    by_vnode: HashMap<HoldingId, Vec<FlowId>>,
    live: HashMap<FlowId, Live>,
    /// Live flows at a suspension, oldest first: the eviction order.
    lru: BTreeMap<u64, FlowId>,
    lru_pos: HashMap<FlowId, u64>,
    tick: u64,
    queue: VecDeque<FlowId>,
    queued: HashSet<FlowId>,
    retries: HashMap<FlowId, u32>,
    /// Live flows told to evict that have not exited yet.
    evicting: usize,
    /// Kills requested and not yet carried out, with their reasons.
    kills: HashMap<FlowId, String>,
}

impl State {
    fn unsuspend(&mut self, f: &FlowId) {
        if let Some(t) = self.lru_pos.remove(f) {
            self.lru.remove(&t);
        }
    }

    fn mark_suspended(&mut self, f: FlowId) {
        self.unsuspend(&f);
        self.tick += 1;
        self.lru.insert(self.tick, f);
        self.lru_pos.insert(f, self.tick);
    }

    /// Tells a live flow to unload at its next suspension.
    fn evict(&mut self, f: &FlowId) -> bool {
        match self.live.get_mut(f) {
            Some(l) if !l.evicting => {
                l.evicting = true;
                self.evicting += 1;
                let _ = l.events.send(Event::Evict);
                true
            }
            _ => false,
        }
    }

    fn insert_flow(&mut self, r: FlowRecord) {
        if !self.flows.contains_key(&r.id) {
            self.by_vnode.entry(r.holding).or_default().push(r.id);
            if let FlowStart::Client {
                client_request_id, ..
            } = &r.start
            {
                self.by_client
                    .insert((r.holding, client_request_id.clone()), Some(r.id));
            }
        }
        self.flows.insert(r.id, r);
    }
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
    changes: broadcast::Sender<FlowRecord>,
    metrics: Metrics,
    remote: Option<Arc<dyn Remote>>,
    network: std::sync::OnceLock<Arc<dyn Network>>,
    /// Bumped whenever a vnode is created or changed.
    vnode_generation: tokio::sync::watch::Sender<u64>,
}

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
        let snap = store.load().await?;
        let (changes, _) = broadcast::channel(16384);
        let inner = Arc::new(Inner {
            store: store.clone(),
            bus,
            runtime: runtime.clone(),
            config,
            state: Mutex::new(State::default()),
            changes,
            metrics: Metrics::default(),
            remote,
            network: std::sync::OnceLock::new(),
            vnode_generation: tokio::sync::watch::channel(0).0,
        });
        for p in &snap.packages {
            let bytes = store.package_bytes(&p.checksum).await?.ok_or_else(|| {
                anyhow::anyhow!("package {} has metadata but no bytes", p.checksum)
            })?;
            if let Err(e) = runtime.load(p.checksum, &bytes).await {
                tracing::error!(checksum = %p.checksum, cause = %e, "stored package no longer loads");
            }
        }
        let now = now_millis();
        let mut timers = Vec::new();
        {
            let mut st = inner.lock();
            for v in snap.vnodes {
                st.names.insert(v.name.clone(), v.holding);
                st.vnodes.insert(v.holding, v);
            }
            for p in snap.packages {
                st.packages.insert(p.checksum, p);
            }
            let inbox: HashSet<FlowId> = snap.inbox_flows.into_iter().collect();
            let mut ready = Vec::new();
            for r in snap.flows {
                if !r.status.is_terminal() {
                    match r.wake_at_ms {
                        _ if r.status == FlowStatus::StartRequested || inbox.contains(&r.id) => {
                            ready.push((r.created_ms, r.id))
                        }
                        Some(w) if w <= now => ready.push((r.created_ms, r.id)),
                        Some(w) => timers.push((r.id, w)),
                        None => {}
                    }
                }
                st.insert_flow(r);
            }
            ready.sort();
            for (_, id) in ready {
                if st.queued.insert(id) {
                    st.queue.push_back(id);
                }
            }
            tracing::info!(
                flows = st.flows.len(),
                resuming = st.queue.len(),
                timers = timers.len(),
                outbox = snap.outbox.len(),
                "flow worker state loaded"
            );
        }
        let w = FlowWorker { inner };
        for (id, at) in timers {
            w.wake_at(id, at);
        }
        tokio::spawn(route(w.clone(), bus_rx));
        if !snap.outbox.is_empty() {
            let _ = w.inner.bus.publish(snap.outbox);
        }
        w.pump();
        Ok(w)
    }

    /// Status changes as they commit.
    pub fn subscribe(&self) -> broadcast::Receiver<FlowRecord> {
        self.inner.changes.subscribe()
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

    /// Delivers messages that arrived from other nodes: each goes into its
    /// receiver's inbox (or starts the responder its session-init names),
    /// all in one durable transaction. Returns once durable, so the link
    /// manager may then acknowledge them. Messages for vnodes this node
    /// does not host are refused.
    pub async fn deliver_inbound(&self, batch: &[SessionMessage]) -> Result<(), WorkerError> {
        let mut d = Delivery::default();
        {
            let st = self.inner.lock();
            for m in batch {
                if !st.vnodes.contains_key(&m.to.holding) {
                    return Err(WorkerError::NotFound(format!(
                        "no vnode {} ({}) on this node",
                        m.to.name, m.to.holding
                    )));
                }
                d.plan(self, &st, m);
            }
        }
        self.inner.store.write(std::mem::take(&mut d.ops)).await?;
        d.apply(self);
        Ok(())
    }

    /// The peer holds these messages (outbox keys) durably: forget them.
    pub async fn remote_delivered(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.inner
            .store
            .write(keys.into_iter().map(Op::DeleteOutbox).collect())
            .await
    }

    /// The link manager gave up on `m`: its sender's session ends with
    /// `reason` (a sequence-0 error into the sender's inbox, in the same
    /// transaction that drops `m` from the outbox).
    pub async fn remote_failed(
        &self,
        m: &SessionMessage,
        reason: String,
    ) -> Result<(), StoreError> {
        let notice = SessionMessage {
            session: m.session,
            from: m.to.clone(),
            to: m.from.clone(),
            seq: 0,
            init: None,
            body: Body::Error(SessionFault::Undeliverable(format!(
                "to {}: {reason}",
                m.to.name
            ))),
        };
        let mut d = Delivery::default();
        d.ops.push(Op::DeleteOutbox(m.key()));
        {
            let st = self.inner.lock();
            d.plan(self, &st, &notice);
        }
        self.inner.store.write(std::mem::take(&mut d.ops)).await?;
        d.apply(self);
        Ok(())
    }

    /// Stores a package after checking it is a braid flow package.
    /// Uploading the same bytes again returns the existing record.
    pub async fn upload_package(
        &self,
        bytes: Vec<u8>,
    ) -> Result<(PackageRecord, bool), WorkerError> {
        let checksum = Checksum::of(&bytes);
        if let Some(p) = self.inner.lock().packages.get(&checksum) {
            return Ok((p.clone(), false));
        }
        let pkg = self
            .inner
            .runtime
            .load(checksum, &bytes)
            .await
            .map_err(|e| WorkerError::Invalid(e.to_string()))?;
        let rec = PackageRecord {
            checksum,
            flows: pkg.flows.clone(),
            size: bytes.len() as u64,
            uploaded_ms: now_millis(),
        };
        self.inner
            .store
            .write(vec![Op::PutPackage(rec.clone(), bytes)])
            .await?;
        self.inner.lock().packages.insert(checksum, rec.clone());
        Ok((rec, true))
    }

    /// Packages stored.
    pub fn packages(&self) -> Vec<PackageRecord> {
        self.inner.lock().packages.values().cloned().collect()
    }

    /// Creates a vnode running `package`.
    pub async fn create_vnode(
        &self,
        name: X500Name,
        package: Checksum,
    ) -> Result<VnodeRecord, WorkerError> {
        let holding = HoldingId::derive(&name, &self.inner.config.group);
        let rec = {
            let st = self.inner.lock();
            if !st.packages.contains_key(&package) {
                return Err(WorkerError::NotFound(format!(
                    "no package with checksum {package}; upload it first (POST /api/v1/package)"
                )));
            }
            if st.vnodes.contains_key(&holding) {
                return Err(WorkerError::Conflict(format!(
                    "a virtual node named {name} exists already (holdingId {holding})"
                )));
            }
            VnodeRecord {
                holding,
                name: name.clone(),
                package,
                created_ms: now_millis(),
                flow_starts_enabled: true,
            }
        };
        self.inner
            .store
            .write(vec![Op::PutVnode(rec.clone())])
            .await?;
        {
            let mut st = self.inner.lock();
            st.names.insert(name, holding);
            st.vnodes.insert(holding, rec.clone());
        }
        self.inner.vnode_generation.send_modify(|g| *g += 1);
        Ok(rec)
    }

    /// All vnodes.
    pub fn vnodes(&self) -> Vec<VnodeRecord> {
        let mut v: Vec<_> = self.inner.lock().vnodes.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One vnode.
    pub fn vnode(&self, holding: &HoldingId) -> Option<VnodeRecord> {
        self.inner.lock().vnodes.get(holding).cloned()
    }

    /// The flows a vnode's package offers.
    pub fn vnode_flows(&self, holding: &HoldingId) -> Result<Vec<FlowInfo>, WorkerError> {
        let st = self.inner.lock();
        let v = st.vnodes.get(holding).ok_or_else(|| {
            WorkerError::NotFound(format!("no virtual node with holdingId {holding}"))
        })?;
        Ok(st
            .packages
            .get(&v.package)
            .map(|p| p.flows.clone())
            .unwrap_or_default())
    }

    /// A package's record.
    pub fn package(&self, checksum: &Checksum) -> Option<PackageRecord> {
        self.inner.lock().packages.get(checksum).cloned()
    }

    /// Deletes a package no vnode and no unfinished flow uses.
    pub async fn delete_package(&self, checksum: Checksum) -> Result<(), WorkerError> {
        {
            let st = self.inner.lock();
            if !st.packages.contains_key(&checksum) {
                return Err(WorkerError::NotFound(format!(
                    "no package with checksum {checksum}"
                )));
            }
            if let Some(v) = st.vnodes.values().find(|v| v.package == checksum) {
                return Err(WorkerError::Conflict(format!(
                    "package {checksum} is in use by virtual node {} ({}); upgrade it first",
                    v.holding, v.name
                )));
            }
            if st
                .flows
                .values()
                .any(|f| f.package == checksum && !f.status.is_terminal())
            {
                return Err(WorkerError::Conflict(format!(
                    "package {checksum} still runs unfinished flows; wait for them to finish"
                )));
            }
        }
        self.inner
            .store
            .write(vec![Op::DeletePackage(checksum)])
            .await?;
        self.inner.lock().packages.remove(&checksum);
        Ok(())
    }

    /// Points a vnode at another package: new flows run it, flows already
    /// running finish on the package they started with.
    pub async fn upgrade_vnode(
        &self,
        holding: HoldingId,
        package: Checksum,
    ) -> Result<VnodeRecord, WorkerError> {
        self.update_vnode(holding, |st, v| {
            if !st.packages.contains_key(&package) {
                return Err(WorkerError::NotFound(format!(
                    "no package with checksum {package}; upload it first"
                )));
            }
            v.package = package;
            Ok(())
        })
        .await
    }

    /// Enables or disables client flow starts on a vnode.
    pub async fn set_flow_starts(
        &self,
        holding: HoldingId,
        enabled: bool,
    ) -> Result<VnodeRecord, WorkerError> {
        self.update_vnode(holding, |_, v| {
            v.flow_starts_enabled = enabled;
            Ok(())
        })
        .await
    }

    async fn update_vnode(
        &self,
        holding: HoldingId,
        change: impl FnOnce(&State, &mut VnodeRecord) -> Result<(), WorkerError>,
    ) -> Result<VnodeRecord, WorkerError> {
        let rec = {
            let st = self.inner.lock();
            let mut v = st.vnodes.get(&holding).cloned().ok_or_else(|| {
                WorkerError::NotFound(format!("no virtual node with holdingId {holding}"))
            })?;
            change(&st, &mut v)?;
            v
        };
        self.inner
            .store
            .write(vec![Op::PutVnode(rec.clone())])
            .await?;
        self.inner.lock().vnodes.insert(holding, rec.clone());
        Ok(rec)
    }

    /// Kills an unfinished flow: it ends KILLED and its counterparties'
    /// sessions fail. A flow that is not live is resumed to be killed.
    pub fn kill(&self, flow: FlowId, reason: String) -> Result<FlowRecord, WorkerError> {
        let rec = {
            let mut st = self.inner.lock();
            let rec = st
                .flows
                .get(&flow)
                .cloned()
                .ok_or_else(|| WorkerError::NotFound(format!("no flow {flow}")))?;
            if rec.status.is_terminal() {
                return Err(WorkerError::Conflict(format!(
                    "flow {flow} has already ended ({:?})",
                    rec.status
                )));
            }
            st.kills.insert(flow, reason.clone());
            if let Some(l) = st.live.get(&flow) {
                let _ = l.events.send(Event::Kill(reason));
            }
            rec
        };
        self.schedule(flow);
        Ok(rec)
    }

    /// Development only: switches a vnode, and every unfinished flow of it,
    /// to another package. Live flows are evicted so they resume on the new
    /// code by replay; a replay that diverges fails that flow.
    pub async fn force_package(
        &self,
        holding: HoldingId,
        package: Checksum,
    ) -> Result<VnodeRecord, WorkerError> {
        let (vrec, flows) = {
            let st = self.inner.lock();
            if !st.packages.contains_key(&package) {
                return Err(WorkerError::NotFound(format!(
                    "no package with checksum {package}"
                )));
            }
            let mut v = st.vnodes.get(&holding).cloned().ok_or_else(|| {
                WorkerError::NotFound(format!("no virtual node with holdingId {holding}"))
            })?;
            v.package = package;
            let flows: Vec<FlowRecord> = st
                .by_vnode
                .get(&holding)
                .into_iter()
                .flatten()
                .filter_map(|id| st.flows.get(id))
                .filter(|r| !r.status.is_terminal())
                .map(|r| FlowRecord {
                    package,
                    ..r.clone()
                })
                .collect();
            (v, flows)
        };
        let mut ops = vec![Op::PutVnode(vrec.clone())];
        ops.extend(flows.iter().cloned().map(|r| Op::PutFlow(Box::new(r))));
        self.inner.store.write(ops).await?;
        let mut st = self.inner.lock();
        st.vnodes.insert(holding, vrec.clone());
        for r in flows {
            st.evict(&r.id);
            st.unsuspend(&r.id);
            if let Some(cur) = st.flows.get_mut(&r.id) {
                cur.package = package;
            }
        }
        Ok(vrec)
    }

    /// Starts a flow for a client. The start is durable before this returns.
    pub async fn start_flow(
        &self,
        holding: HoldingId,
        client_request_id: ClientRequestId,
        flow_name: String,
        request_body: String,
    ) -> Result<FlowRecord, WorkerError> {
        let key = (holding, client_request_id.clone());
        let rec = {
            let mut st = self.inner.lock();
            let v = st.vnodes.get(&holding).ok_or_else(|| {
                WorkerError::NotFound(format!("no virtual node with holdingId {holding}"))
            })?;
            if !v.flow_starts_enabled {
                return Err(WorkerError::Conflict(format!(
                    "flow starts are disabled on virtual node {holding}; \
                     enable them with PUT /api/v1/virtualnode/{holding}/state"
                )));
            }
            let package = v.package;
            let flows = st
                .packages
                .get(&package)
                .map(|p| p.flows.as_slice())
                .unwrap_or(&[]);
            match flows.iter().find(|f| f.name == flow_name) {
                Some(f) if f.startable => {}
                Some(_) => {
                    return Err(WorkerError::Invalid(format!(
                        "flow {flow_name:?} is a responder flow and cannot be started by a client"
                    )));
                }
                None => {
                    let names: Vec<&str> = flows
                        .iter()
                        .filter(|f| f.startable)
                        .map(|f| f.name.as_str())
                        .collect();
                    return Err(WorkerError::NotFound(format!(
                        "virtual node {holding} has no flow named {flow_name:?}; startable flows: {names:?}"
                    )));
                }
            }
            if st.by_client.contains_key(&key) {
                return Err(WorkerError::Conflict(format!(
                    "clientRequestId {client_request_id} was already used on virtual node {holding}"
                )));
            }
            st.by_client.insert(key.clone(), None);
            FlowRecord::new(
                FlowId::random(),
                holding,
                flow_name,
                package,
                FlowStart::Client {
                    client_request_id,
                    request_body,
                },
                now_millis(),
                rand::random(),
            )
        };
        if let Err(e) = self
            .inner
            .store
            .write(vec![Op::PutFlow(Box::new(rec.clone()))])
            .await
        {
            self.inner.lock().by_client.remove(&key);
            return Err(e.into());
        }
        {
            let mut st = self.inner.lock();
            st.insert_flow(rec.clone());
            if st.queued.insert(rec.id) {
                st.queue.push_back(rec.id);
            }
        }
        self.inner.metrics.count(holding, FlowEvent::Started);
        let _ = self.inner.changes.send(rec.clone());
        self.pump();
        Ok(rec)
    }

    /// A client-started flow's record.
    pub fn flow_by_client(&self, holding: &HoldingId, id: &ClientRequestId) -> Option<FlowRecord> {
        let st = self.inner.lock();
        let fid = st.by_client.get(&(*holding, id.clone()))?.as_ref()?;
        st.flows.get(fid).cloned()
    }

    /// Every flow of a vnode, oldest first.
    pub fn flows_of(&self, holding: &HoldingId) -> Vec<FlowRecord> {
        let st = self.inner.lock();
        st.by_vnode
            .get(holding)
            .into_iter()
            .flatten()
            .filter_map(|id| st.flows.get(id).cloned())
            .collect()
    }

    /// The worker's metrics, with live and unfinished-flow gauges appended.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        self.inner.metrics.render(out);
        if let Some(n) = self.inner.network.get() {
            n.render_metrics(out);
        }
        let st = self.inner.lock();
        let unfinished = st
            .flows
            .values()
            .filter(|f| !f.status.is_terminal())
            .count();
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

    /// How many flows have an instance now, and how many are known.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.inner.lock();
        (st.live.len(), st.flows.len())
    }

    fn wake_at(&self, id: FlowId, at_ms: u64) {
        let w = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(now_millis()))).await;
            w.schedule(id);
        });
    }

    /// Makes sure a flow will run: queued unless it is live or finished.
    fn schedule(&self, id: FlowId) {
        {
            let mut st = self.inner.lock();
            let terminal = st.flows.get(&id).is_none_or(|r| r.status.is_terminal());
            if terminal || st.live.contains_key(&id) || !st.queued.insert(id) {
                return;
            }
            st.queue.push_back(id);
        }
        self.pump();
    }

    /// Starts queued flows while there is room; makes room by evicting the
    /// longest-suspended live flows.
    fn pump(&self) {
        let mut st = self.inner.lock();
        let max = self.inner.config.max_live_flows.max(1);
        while st.live.len() < max {
            let Some(id) = st.queue.pop_front() else {
                break;
            };
            st.queued.remove(&id);
            let Some(rec) = st.flows.get_mut(&id) else {
                continue;
            };
            if rec.status.is_terminal() {
                continue;
            }
            if rec.status == FlowStatus::StartRequested {
                rec.status = FlowStatus::Running;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            st.live.insert(
                id,
                Live {
                    events: tx,
                    evicting: false,
                },
            );
            tokio::spawn(drive(self.clone(), id, rx));
        }
        let mut want = st.queue.len().saturating_sub(st.evicting);
        while want > 0 {
            let Some((_, id)) = st.lru.pop_first() else {
                break;
            };
            st.lru_pos.remove(&id);
            if st.evict(&id) {
                want -= 1;
            }
        }
    }

    fn publish(&self, msgs: Vec<SessionMessage>) {
        if let Err(e) = self.inner.bus.publish(msgs) {
            // The messages stay in the outbox and are published on restart.
            tracing::warn!(cause = %e, "could not publish messages");
        }
    }

    /// Commits a flow's checkpoint in one transaction: journal entries,
    /// consumed inbox entries, the flow record and its outbound messages.
    /// A message for a vnode of this node goes straight into the
    /// receiver's inbox in the same transaction (and the receiver is woken
    /// after the commit); anything else goes to the outbox and is published
    /// after the commit.
    async fn commit_checkpoint(&self, rec: &FlowRecord, cp: Checkpoint) -> Result<(), StoreError> {
        let mut ops = Vec::with_capacity(cp.outbound.len() + cp.consumed.len() + 2);
        if !cp.entries.is_empty() {
            ops.push(Op::AppendJournal {
                flow: rec.id,
                start: cp.first_index,
                entries: cp.entries,
            });
        }
        ops.extend(cp.consumed.into_iter().map(Op::DeleteInbox));
        ops.push(Op::PutFlow(Box::new(rec.clone())));
        let mut local = Delivery::default();
        let mut remote = Vec::new();
        {
            let st = self.inner.lock();
            for m in cp.outbound {
                if st.vnodes.contains_key(&m.to.holding) {
                    local.plan(self, &st, &m);
                } else {
                    ops.push(Op::PutOutbox(Box::new(m.clone())));
                    remote.push(m);
                }
            }
        }
        ops.append(&mut local.ops);
        let t = std::time::Instant::now();
        self.inner.store.write(ops).await?;
        self.inner.metrics.checkpoint_commit.observe(t.elapsed());
        // The record first, so that anything the receivers do next sees it.
        self.inner.lock().flows.insert(rec.id, rec.clone());
        local.apply(self);
        if !remote.is_empty() {
            self.publish(remote);
        }
        Ok(())
    }
}

struct Env {
    worker: FlowWorker,
}

#[async_trait::async_trait]
impl FlowEnv for Env {
    async fn checkpoint(&self, flow: FlowId, cp: Checkpoint) -> anyhow::Result<()> {
        let inner = &self.worker.inner;
        let rec = {
            let st = inner.lock();
            let mut r = st
                .flows
                .get(&flow)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("flow {flow} vanished"))?;
            if r.status != FlowStatus::Running {
                r.updated_ms = now_millis();
            }
            r.status = FlowStatus::Running;
            r.wake_at_ms = cp.wake_at_ms;
            r.journal_len = cp.first_index + cp.entries.len() as u32;
            r
        };
        self.worker.commit_checkpoint(&rec, cp).await?;
        {
            let mut st = inner.lock();
            st.flows.insert(flow, rec.clone());
            st.retries.remove(&flow);
            if st.live.get(&flow).is_some_and(|l| !l.evicting) {
                st.mark_suspended(flow);
            }
        }
        let _ = inner.changes.send(rec);
        // A flow just suspended: if others wait for room, evict now.
        if !inner.lock().queue.is_empty() {
            self.worker.pump();
        }
        Ok(())
    }

    fn resolve(&self, name: &X500Name) -> Option<HoldingId> {
        let inner = &self.worker.inner;
        if let Some(h) = inner.lock().names.get(name).copied() {
            return Some(h);
        }
        match &inner.remote {
            Some(r) if r.is_member(name) => Some(HoldingId::derive(name, &inner.config.group)),
            _ => None,
        }
    }

    fn derive(&self, name: &X500Name) -> HoldingId {
        HoldingId::derive(name, &self.worker.inner.config.group)
    }
}

async fn load_input(w: &FlowWorker, id: FlowId) -> anyhow::Result<(Arc<Package>, FlowInput)> {
    let (rec, name) = {
        let st = w.inner.lock();
        let rec = st
            .flows
            .get(&id)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("unknown flow {id}"))?;
        let name = st
            .vnodes
            .get(&rec.holding)
            .map(|v| v.name.clone())
            .ok_or_else(|| anyhow::anyhow!("flow {id} belongs to unknown vnode {}", rec.holding))?;
        (rec, name)
    };
    let pkg = match w.inner.runtime.cached(&rec.package) {
        Some(p) => p,
        None => {
            let bytes = w
                .inner
                .store
                .package_bytes(&rec.package)
                .await?
                .ok_or_else(|| anyhow::anyhow!("package {} missing", rec.package))?;
            w.inner.runtime.load(rec.package, &bytes).await?
        }
    };
    let journal = w.inner.store.journal(&id).await?;
    let inbox = w.inner.store.inbox(&id).await?;
    Ok((
        pkg,
        FlowInput {
            id,
            holding: rec.holding,
            name,
            flow_name: rec.flow_name.clone(),
            start: rec.start.clone(),
            seed: rec.seed,
            created_ms: rec.created_ms,
            journal,
            inbox,
        },
    ))
}

/// Runs one flow instance until it ends, is evicted or hits a host fault.
async fn drive(w: FlowWorker, id: FlowId, events: mpsc::UnboundedReceiver<Event>) {
    let outcome = match load_input(&w, id).await {
        Ok((pkg, input)) => {
            let env = Arc::new(Env { worker: w.clone() });
            w.inner.runtime.run(pkg, input, env, events).await
        }
        Err(e) => RunOutcome::Fault(format!("{e:#}")),
    };
    let mut retry_after = None;
    match outcome {
        RunOutcome::Finished { result, checkpoint } => {
            let rec = {
                let st = w.inner.lock();
                st.flows.get(&id).cloned()
            };
            if let Some(mut rec) = rec {
                rec.updated_ms = now_millis();
                rec.wake_at_ms = None;
                rec.journal_len = checkpoint.first_index + checkpoint.entries.len() as u32;
                match result {
                    Ok(json) => {
                        rec.status = FlowStatus::Completed;
                        rec.result = Some(json);
                    }
                    Err(f) => {
                        tracing::info!(flow_id = %id, kind = ?f.kind, reason = %f.message, "flow failed");
                        rec.status = if f.kind == FailureKind::Killed {
                            FlowStatus::Killed
                        } else {
                            FlowStatus::Failed
                        };
                        rec.error = Some(f);
                    }
                }
                match w.commit_checkpoint(&rec, checkpoint).await {
                    Ok(()) => {
                        let ev = match rec.status {
                            FlowStatus::Completed => FlowEvent::Completed,
                            FlowStatus::Killed => FlowEvent::Killed,
                            _ => FlowEvent::Failed,
                        };
                        w.inner.metrics.count(rec.holding, ev);
                        w.inner.lock().flows.insert(id, rec.clone());
                        let _ = w.inner.changes.send(rec);
                    }
                    Err(e) => {
                        tracing::warn!(flow_id = %id, cause = %e, "could not commit flow end; will rerun");
                        retry_after = Some(());
                    }
                }
            }
        }
        RunOutcome::Evicted { .. } => {}
        RunOutcome::Fault(f) => {
            tracing::warn!(flow_id = %id, cause = %f, "host fault while running flow; will retry");
            retry_after = Some(());
        }
    }
    let (wake, delay) = {
        let mut st = w.inner.lock();
        if st.live.remove(&id).is_some_and(|l| l.evicting) {
            st.evicting -= 1;
        }
        st.unsuspend(&id);
        let rec = st.flows.get(&id);
        let wake = rec
            .filter(|r| !r.status.is_terminal())
            .map(|r| r.wake_at_ms);
        if wake.is_none() {
            st.kills.remove(&id);
        }
        let delay = retry_after.map(|_| {
            let n = st.retries.entry(id).or_insert(0);
            *n += 1;
            Duration::from_millis((50u64 << (*n).min(8)).min(10_000))
        });
        (wake, delay)
    };
    if let Some(wake) = wake {
        if let Some(d) = delay {
            w.wake_at(id, now_millis() + d.as_millis() as u64);
        } else {
            // Evicted: resume when a message is waiting (one may have raced
            // the eviction) or when its timer is due.
            match w.inner.store.inbox(&id).await {
                Ok(msgs) if !msgs.is_empty() => w.schedule(id),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(flow_id = %id, cause = %e, "could not read inbox; resuming");
                    w.schedule(id);
                }
            }
            if let Some(at) = wake {
                w.wake_at(id, at);
            }
        }
    }
    w.pump();
}

/// Runs `op` until it succeeds, waiting 10 ms after the first failure and
/// doubling to 5 s; each failure is logged as `what ... failed; retrying`.
/// For store writes that must happen eventually (a failing disk stalls the
/// caller rather than losing the write).
pub async fn retry_until_ok<T, E, F, Fut>(what: &str, mut op: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = 10u64;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(cause = %e, "{what} failed; retrying");
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                backoff = (backoff * 2).min(5_000);
            }
        }
    }
}

/// Delivers published messages to flows of this node.
async fn route(w: FlowWorker, mut rx: BusReceiver) {
    while let Some(mut batch) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
            if batch.len() > 4096 {
                break;
            }
        }
        retry_until_ok("message delivery", || deliver(&w, &batch)).await;
    }
}

/// The store writes and follow-ups that deliver messages to flows of this
/// node. Planned under the state lock, written in one transaction (with
/// whatever else the caller commits), applied after the commit.
#[derive(Default)]
struct Delivery {
    ops: Vec<Op>,
    created: HashMap<FlowId, FlowRecord>,
    wake: Vec<SessionMessage>,
    replies: Vec<SessionMessage>,
}

impl Delivery {
    /// Plans delivery of `m`: into the receiver's inbox, starting the
    /// responder flow its session-init names, or a protocol error back.
    fn plan(&mut self, w: &FlowWorker, st: &State, m: &SessionMessage) {
        let dest = m.destination_flow();
        let known = st.flows.get(&dest).or_else(|| self.created.get(&dest));
        match known {
            Some(r) if r.status.is_terminal() => {
                tracing::debug!(flow_id = %dest, "dropping message for finished flow");
            }
            Some(_) => {
                self.ops.push(Op::PutInbox(Box::new(m.clone())));
                self.wake.push(m.clone());
            }
            None => {
                let Some(init) = &m.init else {
                    tracing::warn!(flow_id = %dest, session = %m.session, "dropping message for unknown flow (no session-init)");
                    return;
                };
                let Some(v) = st.vnodes.get(&m.to.holding) else {
                    tracing::warn!(holding = %m.to.holding, "dropping session-init for unknown vnode");
                    return;
                };
                let responder = w
                    .inner
                    .runtime
                    .cached(&v.package)
                    .and_then(|p| p.responder_for(&init.protocol, &init.versions));
                let Some((flow_name, version)) = responder else {
                    let reply = SessionMessage {
                        session: m.session,
                        from: m.to.clone(),
                        to: m.from.clone(),
                        seq: 1,
                        init: None,
                        body: Body::Error(SessionFault::ProtocolUnsupported(format!(
                            "{} has no responder for protocol {:?} versions {:?}",
                            v.name, init.protocol, init.versions
                        ))),
                    };
                    self.ops.push(Op::PutOutbox(Box::new(reply.clone())));
                    self.replies.push(reply);
                    return;
                };
                let rec = FlowRecord::new(
                    dest,
                    v.holding,
                    flow_name,
                    v.package,
                    FlowStart::Responder {
                        session: m.session,
                        initiator: m.from.clone(),
                        protocol: init.protocol.clone(),
                        version,
                    },
                    now_millis(),
                    rand::random(),
                );
                self.ops.push(Op::PutFlow(Box::new(rec.clone())));
                self.ops.push(Op::PutInbox(Box::new(m.clone())));
                self.created.insert(dest, rec);
                self.wake.push(m.clone());
            }
        }
    }

    /// After the commit: registers new flows and wakes receivers.
    fn apply(self, w: &FlowWorker) {
        let mut to_schedule = Vec::new();
        {
            let mut st = w.inner.lock();
            for (_, rec) in self.created {
                w.inner.metrics.count(rec.holding, FlowEvent::Started);
                st.insert_flow(rec);
            }
            for m in self.wake {
                let dest = m.destination_flow();
                match st.live.get(&dest) {
                    Some(l) => {
                        let _ = l.events.send(Event::Message(m));
                        st.unsuspend(&dest);
                    }
                    None => to_schedule.push(dest),
                }
            }
        }
        for id in to_schedule {
            w.schedule(id);
        }
        if !self.replies.is_empty() {
            w.publish(self.replies);
        }
    }
}

/// Delivers a batch taken from the bus: each message moves from the
/// outbox to its receiver's inbox in one transaction.
async fn deliver(w: &FlowWorker, batch: &[SessionMessage]) -> Result<(), StoreError> {
    let mut d = Delivery::default();
    let mut remote = Vec::new();
    {
        let st = w.inner.lock();
        for m in batch {
            if w.inner.remote.is_some() && !st.vnodes.contains_key(&m.to.holding) {
                remote.push(m.clone());
                continue;
            }
            d.ops.push(Op::DeleteOutbox(m.key()));
            d.plan(w, &st, m);
        }
    }
    if let (Some(r), false) = (&w.inner.remote, remote.is_empty()) {
        r.send(remote);
    }
    if d.ops.is_empty() {
        return Ok(());
    }
    w.inner.store.write(std::mem::take(&mut d.ops)).await?;
    d.apply(w);
    Ok(())
}
