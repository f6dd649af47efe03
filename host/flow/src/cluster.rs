//! The flow worker in cluster mode: its input from the `flow.event` topic
//! by partition, its status changes onto `flow.status`, and the catalog
//! (vnodes, packages) kept in step through the `state` topic.
//!
//! - A worker with [`ClusterRole::Flows`] joins the consumer group `flow` on
//!   the event topic. On `Assigned` it claims each partition in the store
//!   (a new owner epoch) and then loads that partition's unfinished flows,
//!   timers, kills and inboxes; on `Revoked` it drops them (live ones are
//!   evicted; a commit they still make is fenced by the store once the new
//!   owner has claimed the partition). A record's offset is committed once
//!   its effect is durable in the store.
//! - A worker with [`ClusterRole::Client`] owns no partition: the REST
//!   worker. A start or a kill is written to the store first and then
//!   published; status and lists come from the store; status streams from
//!   a watch on the status topic, so every REST worker streams the same.
//! - Whatever changes vnodes or packages publishes a notice on the state
//!   topic; every worker reloads its catalog from the store on each.

use crate::{FlowWorker, retry_until_ok};
use braid_bus::topics::{Delivery, From, MessageBus, Outgoing, Subscription, TopicSpec};
use braid_storage::{FlowRecord, Op};
use braid_types::{FlowId, FlowStatus, SessionMessage, now_millis};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The consumer group of flow workers.
pub const FLOW_GROUP: &str = "flow";

/// Names and layout of the flow worker's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowTopics {
    /// Input of flow workers, keyed by flow id (start, session message,
    /// kill).
    pub event: String,
    /// Status changes, keyed by flow id (compacted).
    pub status: String,
    /// Catalog notices: vnodes and packages changed (compacted).
    pub state: String,
    /// Session messages for vnodes of other nodes, from flow workers to
    /// the link manager (keyed by the pair of vnodes: a link's messages
    /// stay in order, and link managers can share the pairs).
    pub p2p_out: String,
    /// Sealed packets from the link manager to the gateways, to POST to
    /// peer gateways (keyed by the peer's endpoint).
    pub link_out: String,
    /// Sealed packets the gateways received, to the link manager.
    pub link_in: String,
    /// Requests of the operator's REST workers to the map server (which
    /// runs with a gateway): approve a member.
    pub membership_admin: String,
    /// Partitions of the event topic: the unit of flow ownership.
    pub event_partitions: u16,
    /// The consumer group of link managers on [`FlowTopics::p2p_out`]
    /// (`PREFIXlink`): they share the pairs of vnodes by its partitions.
    pub link_group: String,
    /// The consumer group of gateways on [`FlowTopics::link_out`]
    /// (`PREFIXgateway`): each POSTs what is on its partitions.
    pub gateway_group: String,
}

impl FlowTopics {
    /// `PREFIXflow.event`, `PREFIXflow.status`, `PREFIXstate.catalog`,
    /// `PREFIXp2p.out`, `PREFIXlink.out`, `PREFIXlink.in`,
    /// `PREFIXmembership.admin`.
    pub fn with_prefix(prefix: &str, event_partitions: u16) -> FlowTopics {
        FlowTopics {
            event: format!("{prefix}flow.event"),
            status: format!("{prefix}flow.status"),
            state: format!("{prefix}state.catalog"),
            p2p_out: format!("{prefix}p2p.out"),
            link_out: format!("{prefix}link.out"),
            link_in: format!("{prefix}link.in"),
            membership_admin: format!("{prefix}membership.admin"),
            event_partitions: event_partitions.max(1),
            link_group: format!("{prefix}link"),
            gateway_group: format!("{prefix}gateway"),
        }
    }

    /// The topics to create (or check) at start.
    pub fn specs(&self) -> Vec<TopicSpec> {
        vec![
            TopicSpec {
                name: self.event.clone(),
                partitions: self.event_partitions,
                compacted: false,
            },
            TopicSpec {
                name: self.status.clone(),
                partitions: self.event_partitions,
                compacted: true,
            },
            TopicSpec {
                name: self.state.clone(),
                partitions: 1,
                compacted: true,
            },
            TopicSpec {
                name: self.p2p_out.clone(),
                partitions: self.event_partitions,
                compacted: false,
            },
            TopicSpec {
                name: self.link_out.clone(),
                partitions: self.event_partitions,
                compacted: false,
            },
            TopicSpec {
                name: self.link_in.clone(),
                partitions: self.event_partitions,
                compacted: false,
            },
            TopicSpec {
                name: self.membership_admin.clone(),
                partitions: 1,
                compacted: false,
            },
        ]
    }
}

/// What a worker of the cluster does with flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterRole {
    /// Runs flows: takes partitions of the event topic in the group.
    Flows,
    /// Runs none (a REST worker): writes starts and kills to the store and
    /// publishes them.
    Client,
}

/// How a flow worker meets the others in cluster mode.
#[derive(Clone)]
pub struct ClusterConfig {
    /// The bus.
    pub bus: Arc<dyn MessageBus>,
    /// Its topics.
    pub topics: FlowTopics,
    /// This worker's role.
    pub role: ClusterRole,
    /// Who this worker is, in the store's partition-owner table (unique
    /// per process).
    pub owner: String,
    /// A flow worker that has not said it is alive (in the store) for this
    /// long counts as dead: if it still owns partitions, the others rejoin
    /// the group so that they are handed out again. Longer than the bus's
    /// session timeout.
    pub liveness: Duration,
    /// Where messages for vnodes of other nodes go (in a network): the
    /// membership and [`FlowTopics::p2p_out`].
    pub remote: Option<Arc<dyn crate::Remote>>,
    /// How often a flow worker looks in the store for work of its
    /// partitions that the event topic did not bring (see `sweeper`).
    pub sweep: Duration,
}

/// The usual [`ClusterConfig::sweep`].
pub const SWEEP: Duration = Duration::from_secs(5);

/// A record of [`FlowTopics::p2p_out`]: `m` (postcard), keyed by its pair
/// of vnodes.
pub fn p2p_record(m: &SessionMessage) -> Outgoing {
    Outgoing::new(
        braid_types::pair_key(&m.from.holding, m.to.name.as_str()),
        postcard::to_allocvec(m).expect("a session message always encodes"),
    )
}

/// The store setting under which flow worker `owner` says it is alive.
fn alive_key(owner: &str) -> String {
    format!("flow-worker/alive/{owner}")
}

/// One record of the event topic (postcard-encoded, keyed by the flow id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Input {
    /// A client started the flow (its record is in the store).
    Start(FlowId),
    /// A session message for the flow (also in its sender's outbox).
    Message(Box<SessionMessage>),
    /// A client asked to kill the flow (the kill is in the store).
    Kill(FlowId, String),
}

impl Input {
    /// The flow it is for (the record's key).
    pub fn flow(&self) -> FlowId {
        match self {
            Input::Start(id) | Input::Kill(id, _) => *id,
            Input::Message(m) => m.destination_flow(),
        }
    }

    /// The record to publish.
    pub fn record(&self) -> Outgoing {
        Outgoing::new(
            self.flow().bytes().to_vec(),
            postcard::to_stdvec(self).expect("an input encodes"),
        )
    }
}

/// The running parts of cluster mode inside a [`FlowWorker`].
pub(crate) struct Cluster {
    pub config: ClusterConfig,
    /// Records to publish, in order, retried until the bus takes them.
    out: mpsc::UnboundedSender<(String, Vec<Outgoing>)>,
    /// When the catalog was last reloaded for a name nobody knew.
    caught_up: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// The store's count of flows with early messages, and when it was
    /// taken.
    pub early_count: tokio::sync::Mutex<Option<(std::time::Instant, usize)>>,
}

/// How often an unknown name or vnode reloads the catalog at most.
const CATCH_UP: Duration = Duration::from_millis(100);

impl Cluster {
    /// Starts the publisher task.
    pub fn new(config: ClusterConfig) -> Cluster {
        let (out, rx) = mpsc::unbounded_channel();
        tokio::spawn(publisher(config.bus.clone(), rx));
        Cluster {
            config,
            out,
            caught_up: tokio::sync::Mutex::new(None),
            early_count: tokio::sync::Mutex::new(None),
        }
    }

    /// Queues records for `topic` (published in order, retried until the
    /// bus takes them).
    pub fn send(&self, topic: &str, records: Vec<Outgoing>) {
        if !records.is_empty() {
            let _ = self.out.send((topic.to_string(), records));
        }
    }

    /// Queues inputs for flow workers.
    pub fn send_inputs(&self, inputs: &[Input]) {
        self.send(
            &self.config.topics.event,
            inputs.iter().map(Input::record).collect(),
        );
    }
}

/// Publishes queued records, batching what has piled up per topic.
async fn publisher(
    bus: Arc<dyn MessageBus>,
    mut rx: mpsc::UnboundedReceiver<(String, Vec<Outgoing>)>,
) {
    while let Some((topic, mut records)) = rx.recv().await {
        let mut next = None;
        while let Ok((t, more)) = rx.try_recv() {
            if t == topic && records.len() < 4096 {
                records.extend(more);
            } else {
                next = Some((t, more));
                break;
            }
        }
        let publish = |topic: String, records: Vec<Outgoing>| {
            let bus = bus.clone();
            async move {
                retry_until_ok("publishing to the bus", || {
                    bus.publish(&topic, records.clone())
                })
                .await
            }
        };
        publish(topic, records).await;
        if let Some((t, r)) = next {
            publish(t, r).await;
        }
    }
}

impl FlowWorker {
    /// The partition a flow belongs to.
    pub(crate) fn partition(&self, id: &FlowId) -> u16 {
        match self.inner.partitions {
            0 | 1 => 0,
            n => braid_bus::topics::partition_of(id.bytes(), n),
        }
    }

    /// Records a status change: into the event log (embedded), or onto the
    /// status topic, from which every worker's event log is fed (cluster).
    pub(crate) fn status_changed(&self, rec: &FlowRecord) {
        match &self.inner.cluster {
            None => {
                self.inner.events.publish(rec);
            }
            Some(c) => {
                let change = crate::StatusChange::of(rec);
                c.send(
                    &c.config.topics.status,
                    vec![Outgoing::new(
                        rec.id.bytes().to_vec(),
                        postcard::to_stdvec(&change).expect("a status change encodes"),
                    )],
                );
            }
        }
    }

    /// Tells every worker that vnodes or packages changed.
    pub(crate) fn catalog_changed(&self) {
        if let Some(c) = &self.inner.cluster {
            c.send(
                &c.config.topics.state,
                vec![Outgoing::new(
                    b"catalog".to_vec(),
                    now_millis().to_be_bytes().to_vec(),
                )],
            );
        }
    }

    /// Reloads vnodes and packages from the store (another worker changed
    /// them), loading packages this worker has not compiled yet.
    pub(crate) async fn reload_catalog(&self) -> anyhow::Result<()> {
        let (vnodes, packages) = self.inner.store.catalog().await?;
        self.apply_catalog(vnodes, packages).await
    }

    /// Makes `vnodes` and `packages` (as read from the store) the catalog,
    /// compiling the packages not compiled yet. A package whose bytes are
    /// missing is an error; one that no longer loads is logged.
    async fn apply_catalog(
        &self,
        vnodes: Vec<braid_storage::VnodeRecord>,
        packages: Vec<braid_storage::PackageRecord>,
    ) -> anyhow::Result<()> {
        for p in &packages {
            if self.inner.runtime.cached(&p.checksum).is_some() {
                continue;
            }
            let bytes = self
                .inner
                .store
                .package_bytes(&p.checksum)
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!("package {} has metadata but no bytes", p.checksum)
                })?;
            if let Err(e) = self.inner.runtime.load(p.checksum, &bytes).await {
                tracing::error!(checksum = %p.checksum, cause = %e, "stored package no longer loads");
            }
        }
        {
            let mut st = self.inner.lock();
            st.vnodes.clear();
            st.names.clear();
            for v in vnodes {
                st.names.insert(v.name.clone(), v.holding);
                st.vnodes.insert(v.holding, v);
            }
            st.packages = packages.into_iter().map(|p| (p.checksum, p)).collect();
        }
        self.inner.vnode_generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Reloads the catalog for a name or vnode this worker does not know
    /// (created through another worker a moment ago, its notice not read
    /// yet): once a reload has started after the call, and at most once
    /// per [`CATCH_UP`] however many flows ask.
    pub(crate) async fn catch_up_catalog(&self) {
        let Some(c) = &self.inner.cluster else {
            return;
        };
        let asked = std::time::Instant::now();
        let mut last = c.caught_up.lock().await;
        if let Some(t) = *last {
            if t >= asked {
                // A reload started after we asked: it saw what we need.
                return;
            }
            if let Some(wait) = CATCH_UP.checked_sub(t.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        *last = Some(std::time::Instant::now());
        if let Err(e) = self.reload_catalog().await {
            tracing::warn!(cause = %e, "could not reload vnodes and packages");
        }
    }

    /// Partitions this worker owns now, in order.
    pub fn owned_partitions(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.inner.lock().owned.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Takes partitions over: claims each in the store (from here on their
    /// previous owner's commits are refused), then loads their unfinished
    /// flows, kills, inboxes and timers, and delivers the messages in the
    /// outbox addressed to them.
    pub(crate) async fn take_partitions(&self, parts: &[u16]) -> anyhow::Result<()> {
        let owner = self.inner.cluster.as_ref().map_or_else(
            || format!("braid flow worker, pid {}", std::process::id()),
            |c| c.config.owner.clone(),
        );
        let mut epochs = BTreeMap::new();
        for p in parts {
            epochs.insert(*p, self.inner.store.claim_partition(*p, &owner).await?);
        }
        let mut snap = self.inner.store.load_partitions(parts).await?;
        // The flows loaded may belong to vnodes created since the catalog
        // was last read: the snapshot's catalog is as new as its flows.
        self.apply_catalog(
            std::mem::take(&mut snap.vnodes),
            std::mem::take(&mut snap.packages),
        )
        .await?;
        let mine = |id: &FlowId| epochs.contains_key(&self.partition(id));
        let now = now_millis();
        let mut timers = Vec::new();
        let mut stale_kills = Vec::new();
        let mut resumed = 0usize;
        {
            let mut st = self.inner.lock();
            if st.stopping {
                return Ok(());
            }
            for (p, e) in &epochs {
                st.owned.insert(*p, *e);
            }
            let unfinished: HashSet<FlowId> = snap
                .flows
                .iter()
                .filter(|r| mine(&r.id))
                .map(|r| r.id)
                .collect();
            let mut kills = HashSet::new();
            for (id, why) in snap.kills.into_iter().filter(|(id, _)| mine(id)) {
                if unfinished.contains(&id) {
                    kills.insert(id);
                    st.kills.insert(id, why);
                } else {
                    stale_kills.push(id);
                }
            }
            let inbox: HashSet<FlowId> =
                snap.inbox_flows.into_iter().filter(|id| mine(id)).collect();
            for id in &inbox {
                if !unfinished.contains(id) {
                    st.early.entry(*id).or_insert(now);
                }
            }
            let mut ready = Vec::new();
            for r in snap.flows.into_iter().filter(|r| mine(&r.id)) {
                if st.flows.contains_key(&r.id) {
                    continue;
                }
                match r.wake_at_ms {
                    _ if r.status == FlowStatus::StartRequested
                        || inbox.contains(&r.id)
                        || kills.contains(&r.id) =>
                    {
                        ready.push((r.created_ms, r.id))
                    }
                    Some(w) if w <= now => ready.push((r.created_ms, r.id)),
                    Some(w) => timers.push((r.id, w)),
                    None => {}
                }
                st.insert_flow(r);
                resumed += 1;
            }
            ready.sort();
            for (_, id) in ready {
                if st.queued.insert(id) {
                    st.queue.push_back(id);
                }
            }
        }
        // From here on the partitions are this worker's: nothing below may
        // fail the take-over (a retry would claim them again, under the
        // feet of the flows just resumed).
        if !stale_kills.is_empty()
            && let Err(e) = self
                .inner
                .store
                .write(stale_kills.into_iter().map(Op::DeleteKill).collect())
                .await
        {
            // Harmless: the next take-over finds them again.
            tracing::warn!(cause = %e, "could not delete kill requests of ended flows");
        }
        for (id, at) in timers {
            self.wake_at(id, at);
        }
        // Messages still in an outbox for flows of these partitions (their
        // sender committed them, their delivery may not have happened).
        let outbox: Vec<SessionMessage> = snap
            .outbox
            .into_iter()
            .filter(|m| mine(&m.destination_flow()))
            .collect();
        tracing::info!(
            partitions = ?epochs,
            flows = resumed,
            outbox = outbox.len(),
            "took flow partitions over"
        );
        self.pump();
        if !outbox.is_empty() {
            crate::retry_until_ok("delivering the outbox of partitions taken over", || {
                crate::delivery::deliver(self, &outbox, false)
            })
            .await;
        }
        Ok(())
    }

    /// Gives partitions up: their flows stop here (live ones at their next
    /// suspension) and are forgotten; their new owner resumes them from
    /// their checkpoints.
    pub(crate) fn drop_partitions(&self, parts: &[u16]) {
        let parts: HashSet<u16> = parts.iter().copied().collect();
        let mut st = self.inner.lock();
        for p in &parts {
            st.owned.remove(p);
        }
        let gone: Vec<FlowId> = st
            .flows
            .keys()
            .filter(|id| parts.contains(&self.partition(id)))
            .copied()
            .collect();
        for id in &gone {
            st.evict(id);
            st.drop_flow(id);
        }
        st.early
            .retain(|id, _| !parts.contains(&self.partition(id)));
        tracing::info!(partitions = ?parts, flows = gone.len(), "gave flow partitions up");
    }

    /// A flow this worker should run (a start or kill arrived for it):
    /// read from the store if it is not in memory; `false` if it is not
    /// this worker's or has ended.
    async fn adopt(&self, id: FlowId) -> Result<bool, braid_storage::StoreError> {
        {
            let st = self.inner.lock();
            if !st.owned.contains_key(&self.partition(&id)) || st.finished.contains(&id) {
                return Ok(false);
            }
            if st.flows.contains_key(&id) {
                return Ok(true);
            }
        }
        let Some(rec) = self.inner.store.flow(&id).await? else {
            return Ok(false);
        };
        if rec.status.is_terminal() {
            self.inner.lock().finished.insert(id);
            return Ok(false);
        }
        if !self.inner.lock().vnodes.contains_key(&rec.holding) {
            // Created through another worker a moment ago.
            self.catch_up_catalog().await;
        }
        let mut st = self.inner.lock();
        if !st.owned.contains_key(&self.partition(&id)) {
            return Ok(false);
        }
        if !st.flows.contains_key(&id) {
            st.insert_flow(rec);
        }
        Ok(true)
    }

    /// Handles a batch of the event topic.
    async fn handle(&self, inputs: Vec<Input>) -> Result<(), braid_storage::StoreError> {
        let mut messages = Vec::new();
        for input in inputs {
            match input {
                Input::Message(m) => messages.push(*m),
                other => {
                    if !messages.is_empty() {
                        crate::delivery::deliver(self, &std::mem::take(&mut messages), false)
                            .await?;
                    }
                    match other {
                        Input::Start(id) => {
                            if self.adopt(id).await? {
                                self.schedule(id);
                            }
                        }
                        Input::Kill(id, reason) => {
                            if self.adopt(id).await? {
                                self.kill_here(id, reason);
                            }
                        }
                        Input::Message(_) => unreachable!("handled above"),
                    }
                }
            }
        }
        if !messages.is_empty() {
            crate::delivery::deliver(self, &messages, false).await?;
        }
        Ok(())
    }
}

/// What a sweep saw in the outbox, to deliver at the next one if still
/// there.
#[derive(Default)]
struct Seen {
    messages: HashSet<Vec<u8>>,
}

/// Every [`ClusterConfig::sweep`], looks in the store for work of this
/// worker's partitions that the event topic did not bring, and does it:
///
/// - messages in an outbox for flows of its partitions, still there at two
///   sweeps in a row (their record on the event topic was lost: the
///   process that committed them died before publishing it, or the bus
///   lost it);
/// - flows still `START_REQUESTED` older than a sweep that it does not
///   know (the REST worker died between writing the start and publishing
///   it);
/// - kills requested (in the store) that it has not heard of.
///
/// Doing one twice is harmless: receivers drop duplicate messages by
/// sequence number, and a flow already known is not started again.
async fn sweeper(w: FlowWorker) {
    let every = w.inner.cluster.as_ref().expect("cluster mode").config.sweep;
    let mut seen = Seen::default();
    loop {
        tokio::time::sleep(every).await;
        if w.stopped() {
            return;
        }
        if let Err(e) = w.sweep_once(&mut seen, every).await
            && let Some(note) = crate::FAULT_LOGS.allow("sweep")
        {
            tracing::warn!(cause = %e, "could not look for work the event topic did not bring{note}");
        }
    }
}

impl FlowWorker {
    async fn sweep_once(
        &self,
        seen: &mut Seen,
        every: Duration,
    ) -> Result<(), braid_storage::StoreError> {
        let owned: HashSet<u16> = self.inner.lock().owned.keys().copied().collect();
        if owned.is_empty() {
            *seen = Seen::default();
            return Ok(());
        }
        let outbox = self.inner.store.outbox().await?;
        let mut messages = HashSet::new();
        let mut due = Vec::new();
        {
            let st = self.inner.lock();
            for m in outbox {
                // Messages for other nodes are the link manager's.
                if !st.vnodes.contains_key(&m.to.holding)
                    || !owned.contains(&self.partition(&m.destination_flow()))
                {
                    continue;
                }
                let key = m.key();
                if seen.messages.contains(&key) {
                    due.push(m);
                }
                messages.insert(key);
            }
        }
        seen.messages = messages;
        if !due.is_empty() {
            tracing::info!(
                messages = due.len(),
                "delivering messages from the outbox that the event topic did not bring"
            );
            crate::delivery::deliver(self, &due, false).await?;
        }
        let cutoff = now_millis().saturating_sub(every.as_millis() as u64);
        let mut started = 0usize;
        for r in self.inner.store.stale_starts(cutoff, 10_000).await? {
            if !owned.contains(&self.partition(&r.id)) {
                continue;
            }
            if self.inner.lock().flows.contains_key(&r.id) {
                // Known but not begun for a sweep: make sure it is queued
                // (nothing if it is live or queued already).
                self.schedule(r.id);
                continue;
            }
            if self.adopt(r.id).await? {
                self.schedule(r.id);
                started += 1;
            }
        }
        if started > 0 {
            tracing::info!(
                flows = started,
                "starting flows whose start the event topic did not bring"
            );
        }
        let mut killed = 0usize;
        for (id, reason) in self.inner.store.kills().await? {
            if !owned.contains(&self.partition(&id)) || self.inner.lock().kills.contains_key(&id) {
                continue;
            }
            if self.adopt(id).await? {
                self.kill_here(id, reason);
                killed += 1;
            }
        }
        if killed > 0 {
            tracing::info!(
                flows = killed,
                "killing flows whose kill the event topic did not bring"
            );
        }
        Ok(())
    }
}

/// Says, in the store, that this flow worker is alive, every sixth of the
/// liveness period.
async fn heartbeat(w: FlowWorker) {
    let c = w.inner.cluster.as_ref().expect("cluster mode");
    let key = alive_key(&c.config.owner);
    let every = (c.config.liveness / 6).max(Duration::from_millis(200));
    loop {
        // The first record is written before the worker subscribes.
        tokio::time::sleep(every).await;
        if w.stopped() {
            return;
        }
        let op = Op::PutMeta(key.clone(), now_millis().to_be_bytes().to_vec());
        if let Err(e) = w.inner.store.write(vec![op]).await {
            tracing::warn!(cause = %e, "could not record that this flow worker is alive");
        }
    }
}

/// Whether a partition is owned, in the store, by a flow worker that has
/// not been alive for the liveness period (it died or hangs, and the
/// bus's group may not have handed its partitions to anyone).
async fn orphaned(w: &FlowWorker) -> Result<Option<(u16, String)>, braid_storage::StoreError> {
    let c = w.inner.cluster.as_ref().expect("cluster mode");
    let now = now_millis();
    let liveness = c.config.liveness.as_millis() as u64;
    let mut checked = std::collections::HashMap::new();
    for (p, _, owner) in w.inner.store.partition_owners().await? {
        if p >= w.inner.partitions || owner == c.config.owner {
            continue;
        }
        let alive = match checked.get(&owner) {
            Some(a) => *a,
            None => {
                let seen = w
                    .inner
                    .store
                    .meta(&alive_key(&owner))
                    .await?
                    .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                    .map(u64::from_be_bytes);
                let a = seen.is_some_and(|t| now.saturating_sub(t) < liveness);
                checked.insert(owner.clone(), a);
                a
            }
        };
        if !alive {
            return Ok(Some((p, owner)));
        }
    }
    Ok(None)
}

/// The partitions of `topic` among `tps`.
fn of_topic(tps: &[braid_bus::topics::TopicPartition], topic: &str) -> Vec<u16> {
    tps.iter()
        .filter(|t| &*t.topic == topic)
        .map(|t| t.partition)
        .collect()
}

/// Consumes the event topic as a member of the flow workers' group.
pub(crate) async fn consume(w: FlowWorker, mut sub: Box<dyn Subscription>) {
    let c = w.inner.cluster.as_ref().expect("cluster mode");
    let topic = c.config.topics.event.clone();
    let bus = c.config.bus.clone();
    let liveness = c.config.liveness;
    let mut stopped = w.inner.stopped.subscribe();
    let mut watchdog = tokio::time::interval((liveness / 3).max(Duration::from_millis(200)));
    let mut rejoined = tokio::time::Instant::now();
    loop {
        if w.stopped() {
            return;
        }
        let next = tokio::select! {
            d = sub.next() => Some(d),
            _ = stopped.wait_for(|s| *s) => return,
            _ = watchdog.tick() => None,
        };
        let Some(next) = next else {
            if rejoined.elapsed() < liveness {
                continue;
            }
            match orphaned(&w).await {
                Ok(Some((p, owner))) => {
                    // Rejoin: leaving and joining again makes the group
                    // hand every partition out among its live members
                    // (some brokers keep a dead member's assignment).
                    tracing::warn!(partition = p, %owner,
                        "a partition's owner has not been alive for {liveness:?}; \
                         rejoining the group so that its partitions are handed out");
                    w.drop_partitions(&w.owned_partitions());
                    drop(sub);
                    let topics = [topic.as_str()];
                    sub = retry_until_ok("joining the flow workers' group", || {
                        bus.subscribe(FLOW_GROUP, &topics)
                    })
                    .await;
                    rejoined = tokio::time::Instant::now();
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(cause = %e, "could not check partition owners"),
            }
            continue;
        };
        match next {
            Ok(Delivery::Assigned(tps)) => {
                let parts = of_topic(&tps, &topic);
                retry_until_ok("taking flow partitions over", || w.take_partitions(&parts)).await;
            }
            Ok(Delivery::Revoked(tps)) => w.drop_partitions(&of_topic(&tps, &topic)),
            Ok(Delivery::Records(records)) => {
                let mut last: BTreeMap<u16, i64> = BTreeMap::new();
                let mut inputs = Vec::with_capacity(records.len());
                for r in records {
                    last.insert(r.partition, r.offset);
                    match postcard::from_bytes::<Input>(&r.value) {
                        Ok(i) => inputs.push(i),
                        Err(e) => tracing::error!(
                            partition = r.partition,
                            offset = r.offset,
                            cause = %e,
                            "skipping an event record braid cannot read"
                        ),
                    }
                }
                retry_until_ok("handling flow events", || w.handle(inputs.clone())).await;
                for (p, off) in last {
                    if let Err(e) = sub.commit(&topic, p, off) {
                        tracing::warn!(partition = p, cause = %e, "could not commit an offset");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(cause = %e, "reading flow events failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Feeds the event log from the status topic (every REST worker streams
/// the same changes).
pub(crate) async fn follow_status(w: FlowWorker, mut sub: Box<dyn Subscription>) {
    loop {
        match sub.next().await {
            Ok(Delivery::Records(records)) => {
                for r in records {
                    match postcard::from_bytes::<crate::StatusChange>(&r.value) {
                        Ok(c) => {
                            w.inner.events.publish_change(c);
                        }
                        Err(e) => {
                            tracing::error!(cause = %e, "skipping a status record braid cannot read")
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if w.inner.events.is_closed() {
                    return;
                }
                tracing::warn!(cause = %e, "reading status changes failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if w.inner.events.is_closed() {
            return;
        }
    }
}

/// Reloads the catalog whenever the state topic says it changed.
pub(crate) async fn follow_catalog(w: FlowWorker, mut sub: Box<dyn Subscription>) {
    loop {
        match sub.next().await {
            Ok(Delivery::Records(_)) => {
                if let Err(e) = w.reload_catalog().await {
                    tracing::warn!(cause = %e, "could not reload vnodes and packages");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(cause = %e, "reading catalog notices failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if w.stopped() {
            return;
        }
    }
}

/// Subscribes what a worker of `role` reads.
pub(crate) async fn start(w: &FlowWorker) -> anyhow::Result<()> {
    let c = w.inner.cluster.as_ref().expect("cluster mode");
    let t = &c.config.topics;
    let bus = &c.config.bus;
    let status = bus.watch(&[t.status.as_str()], From::End).await?;
    tokio::spawn(follow_status(w.clone(), status));
    // From the beginning (a compacted topic of one record): a notice
    // published while the watch starts is not missed.
    let catalog = bus.watch(&[t.state.as_str()], From::Beginning).await?;
    tokio::spawn(follow_catalog(w.clone(), catalog));
    if c.config.role == ClusterRole::Flows {
        // Alive before it owns anything.
        let op = Op::PutMeta(
            alive_key(&c.config.owner),
            now_millis().to_be_bytes().to_vec(),
        );
        w.inner.store.write(vec![op]).await?;
        tokio::spawn(heartbeat(w.clone()));
        tokio::spawn(sweeper(w.clone()));
        let sub = bus.subscribe(FLOW_GROUP, &[t.event.as_str()]).await?;
        tokio::spawn(consume(w.clone(), sub));
    }
    Ok(())
}
