//! What a flow of the test network sees of its node.

use crate::{GROUP, Shared};
use braid_runtime::{Checkpoint, FlowEnv};
use braid_types::{FlowId, HoldingId, X500Name};
use std::sync::Arc;

/// One run of one flow's environment.
pub(crate) struct Env {
    pub(crate) shared: Arc<Shared>,
    pub(crate) flow: FlowId,
    pub(crate) run: u64,
}

#[async_trait::async_trait]
impl FlowEnv for Env {
    async fn checkpoint(&self, flow: FlowId, cp: Checkpoint) -> anyhow::Result<()> {
        debug_assert_eq!(flow, self.flow);
        let mut st = self.shared.state();
        if !self.shared.commit(&mut st, flow, self.run, cp) {
            anyhow::bail!("this run of flow {flow} was stopped (its party restarted)");
        }
        Ok(())
    }

    fn resolve(&self, name: &X500Name) -> Option<HoldingId> {
        let h = HoldingId::derive(name, GROUP);
        self.shared.state().parties.contains_key(&h).then_some(h)
    }

    fn derive(&self, name: &X500Name) -> HoldingId {
        HoldingId::derive(name, GROUP)
    }

    fn now_millis(&self) -> u64 {
        self.shared.now_millis()
    }
}
