//! Replaying unfinished flows' journals against another package before an
//! upgrade (`braid package check-upgrade`).

use crate::{FlowWorker, WorkerError};
use braid_api::{ReplayCheck, ReplayVerdict};
use braid_runtime::{Checkpoint, FlowEnv, FlowInput, RunOutcome};
use braid_storage::FlowRecord;
use braid_types::{Checksum, FailureKind, FlowFailure, FlowId, FlowStatus, HoldingId, X500Name};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;

/// Flows read from the store per page.
const PAGE: usize = 500;

/// A replay's environment: the node's names, and no commit ever (the
/// runtime stops at the first call past the journal).
struct ReplayEnv {
    worker: FlowWorker,
}

#[async_trait::async_trait]
impl FlowEnv for ReplayEnv {
    async fn checkpoint(&self, flow: FlowId, _: Checkpoint) -> anyhow::Result<()> {
        anyhow::bail!("a replay check of flow {flow} tried to commit")
    }

    fn resolve(&self, name: &X500Name) -> Option<HoldingId> {
        crate::run::resolve_member(&self.worker, name)
    }

    fn derive(&self, name: &X500Name) -> HoldingId {
        HoldingId::derive(name, &self.worker.inner.config.group)
    }

    fn replay_only(&self) -> bool {
        true
    }
}

impl FlowWorker {
    /// See [`braid_api::FlowService::check_upgrade`].
    pub async fn check_upgrade(
        &self,
        holding: HoldingId,
        package: Checksum,
    ) -> Result<Vec<ReplayCheck>, WorkerError> {
        let name = {
            let st = self.inner.lock();
            if !st.packages.contains_key(&package) {
                return Err(WorkerError::NotFound(format!(
                    "no package with checksum {package}; upload it first"
                )));
            }
            st.vnodes
                .get(&holding)
                .map(|v| v.name.clone())
                .ok_or_else(|| {
                    WorkerError::NotFound(format!("no virtual node with holdingId {holding}"))
                })?
        };
        let pkg = self
            .compiled_package(&package)
            .await
            .map_err(|e| WorkerError::Busy(format!("compiling package {package}: {e:#}")))?;
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .list_flows(&holding, Some(FlowStatus::Running), after.as_deref(), PAGE)
                .await?;
            for rec in page.flows {
                out.push(self.check_one(&pkg, &name, rec).await?);
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        Ok(out)
    }

    async fn check_one(
        &self,
        pkg: &Arc<braid_runtime::Package>,
        name: &X500Name,
        flow: FlowRecord,
    ) -> Result<ReplayCheck, WorkerError> {
        let journal = self.inner.store.journal(&flow.id).await?;
        let inbox = self.inner.store.inbox(&flow.id).await?;
        let journal_len = journal.len() as u32;
        let input = FlowInput {
            id: flow.id,
            holding: flow.holding,
            name: name.clone(),
            flow_name: flow.flow_name.clone(),
            start: flow.start.clone(),
            seed: flow.seed,
            created_ms: flow.created_ms,
            journal,
            inbox,
            kill: Arc::new(OnceLock::new()),
        };
        let (events, rx) = mpsc::unbounded_channel();
        let env = Arc::new(ReplayEnv {
            worker: self.clone(),
        });
        let outcome = self.inner.runtime.run(pkg.clone(), input, env, rx).await;
        drop(events);
        let verdict = match outcome {
            // It stopped past the journal, or ended within it.
            RunOutcome::Evicted { .. } | RunOutcome::Finished { result: Ok(_), .. } => {
                ReplayVerdict::Clean
            }
            RunOutcome::Finished { result: Err(f), .. }
                if f.kind == FailureKind::NonDeterminism =>
            {
                ReplayVerdict::Diverges {
                    step: braid_types::journal::diverged_at(&f.message),
                    message: f.message,
                }
            }
            RunOutcome::Finished { result: Err(f), .. } => ReplayVerdict::Fails(f),
            RunOutcome::Fault(m) => ReplayVerdict::Fails(FlowFailure {
                kind: FailureKind::Trap,
                message: m,
            }),
        };
        Ok(ReplayCheck {
            flow,
            journal_len,
            verdict,
        })
    }
}
