//! What clients can ask of a node's flows, as the REST worker sees it: the
//! [`FlowService`] trait and the shapes of its answers.
//!
//! The REST worker depends on this crate only, never on the flow worker:
//! in an embedded node the flow worker itself implements [`FlowService`];
//! in a cluster a flow worker that runs no flows (its client role) does,
//! writing starts and kills to the store and publishing them on the bus,
//! answering from the store, and streaming from the status topic. The
//! binary wires one or the other.
//!
//! Modules: [`events`] (the log of status changes streams read),
//! [`histogram`].

use braid_storage::{FlowPage, FlowRecord, PackageRecord, Store, StoreError, VnodeRecord};
use braid_types::{Checksum, ClientRequestId, FlowId, FlowInfo, FlowStatus, HoldingId, X500Name};
use std::sync::Arc;

pub mod events;
pub mod histogram;

pub use events::{EventLog, StatusChange, StatusEvent};
pub use histogram::Histogram;

/// A request the node refuses; each maps to a 4xx (or, for the store and
/// `Busy`, a 503 with a time to retry).
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
    /// The worker cannot take this now; retry later.
    #[error("{0}")]
    Busy(String),
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

/// How one unfinished flow fares when its journal is replayed against
/// another package ([`FlowService::check_upgrade`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayCheck {
    /// The flow.
    pub flow: FlowRecord,
    /// Its journal's length: the steps replayed.
    pub journal_len: u32,
    /// The outcome.
    pub verdict: ReplayVerdict,
}

/// What replaying a flow's journal against another package showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayVerdict {
    /// Every entry replayed: the new code does what the journal says.
    Clean,
    /// The new code called something else at `step`.
    Diverges {
        /// The journal entry where it diverged.
        step: Option<u32>,
        /// What the journal holds and what the new code called.
        message: String,
    },
    /// The new code failed otherwise during the replay (a trap, a flow the
    /// package does not have).
    Fails(braid_types::FlowFailure),
}

/// What the REST worker asks of the node's flows, packages and vnodes.
///
/// Every change is durable when the call returns `Ok`. Reads of the
/// catalog (`vnodes`, `packages`, ...) answer from memory kept in step
/// with the store; reads of flows from memory or the store.
#[async_trait::async_trait]
pub trait FlowService: Send + Sync + 'static {
    /// Starts a flow for a client; a second start with the same
    /// `client_request_id` answers the first one's record.
    async fn start_flow(
        &self,
        holding: HoldingId,
        client_request_id: ClientRequestId,
        flow_name: String,
        request_body: String,
    ) -> Result<FlowRecord, WorkerError>;
    /// Kills a flow (durably; carried out by whoever runs it).
    async fn kill(&self, flow: FlowId, reason: String) -> Result<FlowRecord, WorkerError>;
    /// The flow a client started under `id`.
    async fn flow_by_client(
        &self,
        holding: &HoldingId,
        id: &ClientRequestId,
    ) -> Result<Option<FlowRecord>, WorkerError>;
    /// A flow by id.
    async fn flow(&self, id: &FlowId) -> Result<Option<FlowRecord>, WorkerError>;
    /// A page of a vnode's flows, optionally of one status, after the
    /// cursor `after`.
    async fn list_flows(
        &self,
        holding: &HoldingId,
        status: Option<FlowStatus>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<FlowPage, WorkerError>;
    /// Stores a package (checked and compiled first); `true` if it is new.
    async fn upload_package(&self, bytes: Vec<u8>) -> Result<(PackageRecord, bool), WorkerError>;
    /// Every package.
    fn packages(&self) -> Vec<PackageRecord>;
    /// One package.
    fn package(&self, checksum: &Checksum) -> Option<PackageRecord>;
    /// Deletes a package no vnode runs.
    async fn delete_package(&self, checksum: Checksum) -> Result<(), WorkerError>;
    /// Creates a vnode running `package`.
    async fn create_vnode(
        &self,
        name: X500Name,
        package: Checksum,
    ) -> Result<VnodeRecord, WorkerError>;
    /// Every vnode, by name.
    fn vnodes(&self) -> Vec<VnodeRecord>;
    /// One vnode.
    fn vnode(&self, holding: &HoldingId) -> Option<VnodeRecord>;
    /// The flows a vnode's package offers.
    fn vnode_flows(&self, holding: &HoldingId) -> Result<Vec<FlowInfo>, WorkerError>;
    /// Moves a vnode to another package, if its flows in flight allow.
    async fn upgrade_vnode(
        &self,
        holding: HoldingId,
        package: Checksum,
    ) -> Result<VnodeRecord, WorkerError>;
    /// Moves a vnode to another package whatever its flows in flight.
    async fn force_package(
        &self,
        holding: HoldingId,
        package: Checksum,
    ) -> Result<VnodeRecord, WorkerError>;
    /// Replays the journal of each of a vnode's unfinished flows against
    /// `package` (nothing live: no message, no commit) and says how each
    /// fares.
    async fn check_upgrade(
        &self,
        holding: HoldingId,
        package: Checksum,
    ) -> Result<Vec<ReplayCheck>, WorkerError>;
    /// Lets clients start flows on a vnode, or stops them.
    async fn set_flow_starts(
        &self,
        holding: HoldingId,
        enabled: bool,
    ) -> Result<VnodeRecord, WorkerError>;
    /// The log of status changes status streams read.
    fn events(&self) -> &EventLog;
    /// Flows live here (with an instance) and unfinished (for health).
    fn counts(&self) -> (usize, usize);
    /// The store behind this node (its health).
    fn store(&self) -> &Arc<dyn Store>;
    /// Appends Prometheus metrics.
    fn render_metrics(&self, out: &mut String);
    /// The node's network services, when it is part of a network.
    fn network(&self) -> Option<&Arc<dyn Network>>;
    /// The application network's name.
    fn group(&self) -> &str;
}
