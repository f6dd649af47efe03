//! The flow worker as the REST worker's [`FlowService`]: each call is the
//! worker's own method of the same name.

use crate::FlowWorker;
use braid_api::{EventLog, FlowService, Network, WorkerError};
use braid_storage::{FlowPage, FlowRecord, PackageRecord, Store, VnodeRecord};
use braid_types::{Checksum, ClientRequestId, FlowId, FlowInfo, FlowStatus, HoldingId, X500Name};
use std::sync::Arc;

#[async_trait::async_trait]
impl FlowService for FlowWorker {
    async fn start_flow(
        &self,
        holding: HoldingId,
        client_request_id: ClientRequestId,
        flow_name: String,
        request_body: String,
    ) -> Result<FlowRecord, WorkerError> {
        FlowWorker::start_flow(self, holding, client_request_id, flow_name, request_body).await
    }
    async fn kill(&self, flow: FlowId, reason: String) -> Result<FlowRecord, WorkerError> {
        FlowWorker::kill(self, flow, reason).await
    }
    async fn flow_by_client(
        &self,
        holding: &HoldingId,
        id: &ClientRequestId,
    ) -> Result<Option<FlowRecord>, WorkerError> {
        FlowWorker::flow_by_client(self, holding, id).await
    }
    async fn flow(&self, id: &FlowId) -> Result<Option<FlowRecord>, WorkerError> {
        FlowWorker::flow(self, id).await
    }
    async fn list_flows(
        &self,
        holding: &HoldingId,
        status: Option<FlowStatus>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<FlowPage, WorkerError> {
        FlowWorker::list_flows(self, holding, status, after, limit).await
    }
    async fn upload_package(&self, bytes: Vec<u8>) -> Result<(PackageRecord, bool), WorkerError> {
        FlowWorker::upload_package(self, bytes).await
    }
    fn packages(&self) -> Vec<PackageRecord> {
        FlowWorker::packages(self)
    }
    fn package(&self, checksum: &Checksum) -> Option<PackageRecord> {
        FlowWorker::package(self, checksum)
    }
    async fn delete_package(&self, checksum: Checksum) -> Result<(), WorkerError> {
        FlowWorker::delete_package(self, checksum).await
    }
    async fn create_vnode(
        &self,
        name: X500Name,
        package: Checksum,
    ) -> Result<VnodeRecord, WorkerError> {
        FlowWorker::create_vnode(self, name, package).await
    }
    fn vnodes(&self) -> Vec<VnodeRecord> {
        FlowWorker::vnodes(self)
    }
    fn vnode(&self, holding: &HoldingId) -> Option<VnodeRecord> {
        FlowWorker::vnode(self, holding)
    }
    fn vnode_flows(&self, holding: &HoldingId) -> Result<Vec<FlowInfo>, WorkerError> {
        FlowWorker::vnode_flows(self, holding)
    }
    async fn upgrade_vnode(
        &self,
        holding: HoldingId,
        package: Checksum,
    ) -> Result<VnodeRecord, WorkerError> {
        FlowWorker::upgrade_vnode(self, holding, package).await
    }
    async fn force_package(
        &self,
        holding: HoldingId,
        package: Checksum,
    ) -> Result<VnodeRecord, WorkerError> {
        FlowWorker::force_package(self, holding, package).await
    }
    async fn check_upgrade(
        &self,
        holding: HoldingId,
        package: Checksum,
    ) -> Result<Vec<braid_api::ReplayCheck>, WorkerError> {
        FlowWorker::check_upgrade(self, holding, package).await
    }
    async fn set_flow_starts(
        &self,
        holding: HoldingId,
        enabled: bool,
    ) -> Result<VnodeRecord, WorkerError> {
        FlowWorker::set_flow_starts(self, holding, enabled).await
    }
    fn events(&self) -> &EventLog {
        FlowWorker::events(self)
    }
    fn counts(&self) -> (usize, usize) {
        FlowWorker::counts(self)
    }
    fn store(&self) -> &Arc<dyn Store> {
        FlowWorker::store(self)
    }
    fn render_metrics(&self, out: &mut String) {
        FlowWorker::render_metrics(self, out)
    }
    fn network(&self) -> Option<&Arc<dyn Network>> {
        FlowWorker::network(self)
    }
    fn group(&self) -> &str {
        FlowWorker::group(self)
    }
}
