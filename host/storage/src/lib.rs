//! The durable `Store`: checkpoints (journals), outbox, inbox, packages,
//! vnodes and flow records.
//!
//! The flow worker writes through [`Store::write`], one atomic, durable batch
//! per call. Implementations commit many callers' batches together (group
//! commit) so durable throughput is not bounded by one fsync per flow.
//! [`embedded::EmbeddedStore`] keeps everything in one redb file under the
//! node's data directory; a PostgreSQL implementation slots in behind the
//! same trait (the `braid-store-postgres` crate).
//!
//! Two guards make the store safe to share between processes (cluster
//! mode): an [`Op::Fence`] makes a batch commit only while its writer still
//! owns a partition ([`Store::claim_partition`] takes it over), and a
//! client request id belongs to at most one flow of a vnode at a time
//! ([`StoreError::Duplicate`]). A batch that fails either fails alone: the
//! other callers' batches in the same group commit.
//!
//! With the `conformance` feature, [`conformance`] holds the test suite
//! every implementation must pass.

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod embedded;

use braid_types::{
    Checksum, ClientRequestId, FlowFailure, FlowId, FlowInfo, FlowStart, FlowStatus, HoldingId,
    SessionMessage, X500Name,
};
use serde::{Deserialize, Serialize};

/// A store operation failed. Callers treat this as a host fault: retry, or
/// stop the flow without committing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database reported an error; check disk space and permissions.
    #[error("store: {0}")]
    Database(String),
    /// A stored record could not be decoded: the data directory is corrupt
    /// or was written by an incompatible version.
    #[error("store: corrupt record in {table}: {detail}")]
    Corrupt {
        /// Which table.
        table: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// The store has shut down.
    #[error("store is closed")]
    Closed,
    /// The database file is not a usable database: cut short, overwritten,
    /// or written by an incompatible version. Restore it from a backup, or
    /// move it away to start with an empty store.
    #[error(
        "the store's database file {} is damaged ({detail}); restore it from a backup, or move \
         it away to start the node with an empty store",
        path.display()
    )]
    Damaged {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Another process has the database file open (another node on the
    /// same data directory?). Stop it, or give this node its own data
    /// directory.
    #[error(
        "the store's database file {} is in use by another process (another braid node on \
         this data directory?); stop that process or use another data directory",
        path.display()
    )]
    InUse {
        /// The file.
        path: std::path::PathBuf,
    },
    /// The store failed and is recovering (e.g. the disk was full, or the
    /// database server is unreachable); it retries by itself. Retry the
    /// request later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The batch carried an [`Op::Fence`] for a partition that has been
    /// claimed by another owner since: nothing of the batch was written.
    /// The writer has lost the partition and must stop advancing its flows.
    #[error(
        "store: partition {partition} is owned at epoch {current}, not {epoch}: this worker lost \
         it and must stop advancing its flows"
    )]
    Fenced {
        /// The partition.
        partition: u16,
        /// The epoch the batch was fenced with.
        epoch: u64,
        /// The partition's owner epoch in the store.
        current: u64,
    },
    /// The batch wrote a client-started flow whose (vnode, client request
    /// id) already belongs to another flow: nothing of the batch was
    /// written. Answer the client with the existing flow.
    #[error(
        "store: client request id {client_request_id} of vnode {holding} already belongs to \
         flow {existing}, not {flow}"
    )]
    Duplicate {
        /// The vnode.
        holding: HoldingId,
        /// The client request id.
        client_request_id: ClientRequestId,
        /// The flow that has it.
        existing: FlowId,
        /// The flow the batch tried to give it to.
        flow: FlowId,
    },
    /// An [`Op::PutMetaIf`] found its setting changed since it was read:
    /// nothing of the batch was written. Read again and retry.
    #[error("store: setting {key:?} changed since it was read")]
    Changed {
        /// The setting.
        key: String,
    },
    /// The store's configuration is not usable (e.g. a malformed database
    /// URL). Fix the setting named in the message.
    #[error("store configuration: {0}")]
    Config(String),
}

/// How the store is doing, for health and readiness checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    /// Whether writes are going through.
    pub ok: bool,
    /// The last failure while not ok.
    pub error: Option<String>,
    /// Since when (ms since epoch) the store has been in this state.
    pub since_ms: u64,
}

/// Rows per table, for operators and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Flow records.
    pub flows: u64,
    /// Flows not yet ended.
    pub unfinished: u64,
    /// Journal entries of all flows.
    pub journal_entries: u64,
    /// Messages waiting in inboxes.
    pub inbox: u64,
    /// Messages waiting in the outbox.
    pub outbox: u64,
    /// Kills requested and not yet carried out.
    pub kills: u64,
    /// Entries of the flow indexes: for every flow one by vnode and one by
    /// state (unfinished, or finished by end time), plus one by client
    /// request id for every client-started flow.
    pub index_entries: u64,
}

/// One page of a vnode's flows, oldest first.
#[derive(Debug, Clone, Default)]
pub struct FlowPage {
    /// The flows on this page.
    pub flows: Vec<FlowRecord>,
    /// Where the next page starts (pass as `after`), if there may be more.
    pub next: Option<Vec<u8>>,
}

/// A virtual node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnodeRecord {
    /// Short id.
    pub holding: HoldingId,
    /// Identity.
    pub name: X500Name,
    /// The package new flows run.
    pub package: Checksum,
    /// Creation time, ms since epoch.
    pub created_ms: u64,
    /// Whether clients may start flows (operators pause starts for
    /// maintenance; running flows carry on).
    pub flow_starts_enabled: bool,
}

/// A package's metadata (its bytes are stored apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    /// SHA-256 of the bytes.
    pub checksum: Checksum,
    /// The flows it offers.
    pub flows: Vec<FlowInfo>,
    /// Size in bytes.
    pub size: u64,
    /// Upload time.
    pub uploaded_ms: u64,
}

/// Everything durable about one flow except its journal and inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Id.
    pub id: FlowId,
    /// The vnode it runs for.
    pub holding: HoldingId,
    /// Flow name within the package.
    pub flow_name: String,
    /// The package it runs.
    pub package: Checksum,
    /// How it was started.
    pub start: FlowStart,
    /// Status.
    pub status: FlowStatus,
    /// JSON result once completed.
    pub result: Option<String>,
    /// Failure once failed or killed.
    pub error: Option<FlowFailure>,
    /// Created, ms since epoch.
    pub created_ms: u64,
    /// Last status change, ms since epoch.
    pub updated_ms: u64,
    /// When a suspended flow wants to be woken (sleep end or receive timeout).
    pub wake_at_ms: Option<u64>,
    /// Seed for the flow's virtual WASI randomness.
    pub seed: u64,
    /// Number of journal entries committed.
    pub journal_len: u32,
}

impl FlowRecord {
    /// A new flow, `START_REQUESTED`, created now with a fresh seed.
    pub fn new(
        id: FlowId,
        holding: HoldingId,
        flow_name: String,
        package: Checksum,
        start: FlowStart,
        now_ms: u64,
        seed: u64,
    ) -> FlowRecord {
        FlowRecord {
            id,
            holding,
            flow_name,
            package,
            start,
            status: FlowStatus::StartRequested,
            result: None,
            error: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            wake_at_ms: None,
            seed,
            journal_len: 0,
        }
    }

    /// The client request id of a client-started flow.
    pub fn client_request_id(&self) -> Option<&ClientRequestId> {
        match &self.start {
            FlowStart::Client {
                client_request_id, ..
            } => Some(client_request_id),
            FlowStart::Responder { .. } => None,
        }
    }
}

/// One write; a batch of them commits atomically.
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert or replace a flow record.
    PutFlow(Box<FlowRecord>),
    /// Append journal entries starting at index `start`.
    AppendJournal {
        /// The flow.
        flow: FlowId,
        /// Index of the first entry.
        start: u32,
        /// Encoded entries.
        entries: Vec<Vec<u8>>,
    },
    /// Queue a message for release (the transactional outbox).
    PutOutbox(Box<SessionMessage>),
    /// A released message is durable at its destination.
    DeleteOutbox(Vec<u8>),
    /// A message delivered to a flow of this node.
    PutInbox(Box<SessionMessage>),
    /// A flow consumed (or dropped) an inbox message.
    DeleteInbox(Vec<u8>),
    /// Insert or replace a vnode.
    PutVnode(VnodeRecord),
    /// Store a package.
    PutPackage(PackageRecord, Vec<u8>),
    /// Remove a package (metadata and bytes).
    DeletePackage(Checksum),
    /// Node-level settings (admin credentials, ...).
    PutMeta(String, Vec<u8>),
    /// [`Op::PutMeta`] only if the setting's value is still `expected`
    /// (`None`: absent); otherwise the batch fails with
    /// [`StoreError::Changed`] and writes nothing. For settings several
    /// processes change (users and roles): read, change, put if unchanged.
    PutMetaIf {
        /// The setting.
        key: String,
        /// The value the writer read.
        expected: Option<Vec<u8>>,
        /// The new value.
        value: Vec<u8>,
    },
    /// A kill was requested: durable before it is acknowledged.
    PutKill(FlowId, String),
    /// A requested kill was carried out (or is moot).
    DeleteKill(FlowId),
    /// Drops every message still waiting in a flow's inbox (it ended).
    DeleteFlowInbox(FlowId),
    /// Deletes a finished flow: its record, journal, inbox and indexes.
    DeleteFlow(Box<FlowRecord>),
    /// The batch commits only if `partition`'s owner epoch in the store is
    /// `epoch` (0 for a partition never claimed); otherwise the batch fails
    /// with [`StoreError::Fenced`] and writes nothing. Put it in every batch
    /// a partition's owner writes for that partition's flows.
    Fence {
        /// The partition.
        partition: u16,
        /// The epoch [`Store::claim_partition`] returned to the writer.
        epoch: u64,
    },
}

/// What a node loads when it starts: what running flows need, not the
/// history (finished flows are read from the store when asked for).
#[derive(Debug, Default)]
pub struct Snapshot {
    /// All vnodes.
    pub vnodes: Vec<VnodeRecord>,
    /// All package metadata.
    pub packages: Vec<PackageRecord>,
    /// The flows that have not ended.
    pub flows: Vec<FlowRecord>,
    /// Messages committed but perhaps not delivered.
    pub outbox: Vec<SessionMessage>,
    /// Flows with inbox messages waiting.
    pub inbox_flows: Vec<FlowId>,
    /// Kills requested and not yet carried out.
    pub kills: Vec<(FlowId, String)>,
}

/// Durable state behind a node.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies `ops` atomically and durably; returns once committed.
    ///
    /// Fails with [`StoreError::Fenced`] or [`StoreError::Duplicate`] (and
    /// writes nothing of `ops`) when a condition of the batch does not
    /// hold; the batches of other callers are not affected.
    async fn write(&self, ops: Vec<Op>) -> Result<(), StoreError>;
    /// Takes `partition` over for `owner`: increments its owner epoch
    /// (from 0, so the first claim returns 1), durably, and returns the new
    /// epoch. Once this returns, no batch fenced with an older epoch
    /// commits (a batch in flight either committed before, or fails).
    async fn claim_partition(&self, partition: u16, owner: &str) -> Result<u64, StoreError>;
    /// Every partition ever claimed: (partition, epoch, owner), by
    /// partition.
    async fn partition_owners(&self) -> Result<Vec<(u16, u64, String)>, StoreError>;
    /// Everything needed at start-up.
    async fn load(&self) -> Result<Snapshot, StoreError>;
    /// Vnodes and package metadata (what every worker of a cluster keeps
    /// in memory; reloaded when another worker changes them).
    async fn catalog(&self) -> Result<(Vec<VnodeRecord>, Vec<PackageRecord>), StoreError> {
        let s = self.load().await?;
        Ok((s.vnodes, s.packages))
    }
    /// [`load`](Self::load), with at least the unfinished flows of
    /// `partitions` (of the flow-event topic; the rest of the snapshot
    /// whole): what a flow worker taking them over needs. A store that
    /// cannot tell partitions apart returns every unfinished flow.
    async fn load_partitions(&self, partitions: &[u16]) -> Result<Snapshot, StoreError> {
        let _ = partitions;
        self.load().await
    }
    /// Every message in the outbox (committed, not yet delivered or
    /// acknowledged), in key order.
    async fn outbox(&self) -> Result<Vec<SessionMessage>, StoreError> {
        Ok(self.load().await?.outbox)
    }
    /// Up to `limit` flows still `START_REQUESTED` that were created
    /// before `before_ms`, oldest first: starts a flow worker may not have
    /// heard of (the notice on the bus was lost with the process that
    /// wrote the flow).
    async fn stale_starts(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<FlowRecord>, StoreError> {
        let mut v: Vec<FlowRecord> = self
            .load()
            .await?
            .flows
            .into_iter()
            .filter(|r| r.status == FlowStatus::StartRequested && r.created_ms < before_ms)
            .collect();
        v.sort_by_key(|r| (r.created_ms, r.id));
        v.truncate(limit);
        Ok(v)
    }
    /// How many flows have messages in their inbox but no record (the
    /// messages came before their session-init).
    async fn early_flows(&self) -> Result<usize, StoreError> {
        let snap = self.load().await?;
        let known: std::collections::HashSet<FlowId> = snap.flows.iter().map(|r| r.id).collect();
        Ok(snap
            .inbox_flows
            .iter()
            .filter(|id| !known.contains(id))
            .count())
    }
    /// Every kill requested and not yet carried out (flow, reason), by
    /// flow id.
    async fn kills(&self) -> Result<Vec<(FlowId, String)>, StoreError> {
        Ok(self.load().await?.kills)
    }
    /// A package's bytes.
    async fn package_bytes(&self, checksum: &Checksum) -> Result<Option<Vec<u8>>, StoreError>;
    /// A flow's committed journal.
    async fn journal(&self, flow: &FlowId) -> Result<Vec<Vec<u8>>, StoreError>;
    /// Messages waiting for a flow.
    async fn inbox(&self, flow: &FlowId) -> Result<Vec<SessionMessage>, StoreError>;
    /// A node-level setting.
    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// One flow's record.
    async fn flow(&self, id: &FlowId) -> Result<Option<FlowRecord>, StoreError>;
    /// The flow a client started with `client_request_id` on `holding`.
    async fn flow_by_client(
        &self,
        holding: &HoldingId,
        client_request_id: &ClientRequestId,
    ) -> Result<Option<FlowRecord>, StoreError>;
    /// A page of `holding`'s flows, oldest first, starting after the
    /// `after` of the previous page, keeping those with `status` (when
    /// given): at most `limit` flows, looking at no more than `scan` flows.
    async fn list_flows(
        &self,
        holding: &HoldingId,
        status: Option<FlowStatus>,
        after: Option<&[u8]>,
        limit: usize,
        scan: usize,
    ) -> Result<FlowPage, StoreError>;
    /// Up to `limit` flows that ended before `cutoff_ms`, oldest first.
    async fn finished_before(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<FlowRecord>, StoreError>;
    /// Rows per table.
    async fn stats(&self) -> Result<StoreStats, StoreError>;
    /// Whether writes are going through.
    fn health(&self) -> StoreHealth;
    /// Finishes the writes in flight and closes the store cleanly; later
    /// calls fail with [`StoreError::Closed`].
    async fn close(&self);
}

/// Length of a [`list_position`].
pub const LIST_POSITION_LEN: usize = 24;

/// Where a flow stands in its vnode's list, oldest first: its creation
/// time (ms, big-endian), then its id. A [`FlowPage::next`] is the
/// position of the last flow of the page.
pub fn list_position(r: &FlowRecord) -> [u8; LIST_POSITION_LEN] {
    let mut k = [0u8; LIST_POSITION_LEN];
    k[..8].copy_from_slice(&r.created_ms.to_be_bytes());
    k[8..].copy_from_slice(r.id.bytes());
    k
}

/// The byte that stands for a status in the store's indexes.
pub fn status_code(s: FlowStatus) -> u8 {
    match s {
        FlowStatus::StartRequested => 0,
        FlowStatus::Running => 1,
        FlowStatus::Completed => 2,
        FlowStatus::Failed => 3,
        FlowStatus::Killed => 4,
    }
}
