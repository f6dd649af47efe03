//! Packages and virtual nodes: upload, create, upgrade, pause, delete.

use crate::state::State;
use crate::{FlowWorker, WorkerError};
use braid_storage::{FlowRecord, Op, PackageRecord, VnodeRecord};
use braid_types::{Checksum, FlowInfo, HoldingId, X500Name, now_millis};

impl FlowWorker {
    /// Stores a package after checking it is a braid flow package.
    /// Uploading the same bytes again returns the existing record.
    pub async fn upload_package(
        &self,
        bytes: Vec<u8>,
    ) -> Result<(PackageRecord, bool), WorkerError> {
        let checksum = Checksum::of(&bytes);
        self.refresh_catalog().await?;
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
        self.catalog_changed();
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
        self.refresh_catalog().await?;
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
        self.catalog_changed();
        Ok(rec)
    }

    /// In a cluster, reloads vnodes and packages before a change to them
    /// (another worker may have changed them a moment ago).
    async fn refresh_catalog(&self) -> Result<(), WorkerError> {
        if self.inner.cluster.is_some() {
            self.reload_catalog()
                .await
                .map_err(|e| WorkerError::Busy(format!("reading virtual nodes: {e:#}")))?;
        }
        Ok(())
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
        self.refresh_catalog().await?;
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
            if st.flows.values().any(|f| f.package == checksum) {
                return Err(WorkerError::Conflict(format!(
                    "package {checksum} still runs unfinished flows; wait for them to finish"
                )));
            }
        }
        if self.inner.cluster.is_some()
            && self
                .inner
                .store
                .load()
                .await?
                .flows
                .iter()
                .any(|f| f.package == checksum)
        {
            // Flows of other workers are not in this one's memory.
            return Err(WorkerError::Conflict(format!(
                "package {checksum} still runs unfinished flows; wait for them to finish"
            )));
        }
        self.inner
            .store
            .write(vec![Op::DeletePackage(checksum)])
            .await?;
        self.inner.lock().packages.remove(&checksum);
        self.catalog_changed();
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
        self.refresh_catalog().await?;
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
        self.catalog_changed();
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
        if self.inner.cluster.is_some() {
            return Err(WorkerError::Invalid(
                "forcing a package onto running flows is for embedded development nodes; \
                 a cluster does not support it"
                    .into(),
            ));
        }
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
                .flows
                .values()
                .filter(|r| r.holding == holding)
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
}
