//! Deleting finished flows once their retention has passed: their records,
//! journals, inbox entries and index entries.

use crate::FlowWorker;
use braid_storage::Op;
use braid_types::now_millis;
use std::time::Duration;

/// Flows deleted per transaction.
const BATCH: usize = 512;

impl FlowWorker {
    /// Deletes every flow that ended more than the retention ago; returns
    /// how many.
    pub async fn sweep_finished(&self) -> Result<usize, braid_storage::StoreError> {
        let retention = self.inner.config.retention;
        let cutoff = now_millis().saturating_sub(retention.as_millis() as u64);
        let mut deleted = 0;
        loop {
            let old = self.inner.store.finished_before(cutoff, BATCH).await?;
            if old.is_empty() {
                break;
            }
            let n = old.len();
            // Their ids stay in the recent-finished set: a late duplicate
            // session-init must not start a deleted responder again.
            self.inner
                .store
                .write(
                    old.into_iter()
                        .map(|r| Op::DeleteFlow(Box::new(r)))
                        .collect(),
                )
                .await?;
            deleted += n;
            if n < BATCH {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(
                deleted,
                retention_secs = retention.as_secs(),
                "deleted finished flows past their retention"
            );
        }
        Ok(deleted)
    }
}

/// Sweeps now and then: every tenth of the retention, at least every
/// second and at most every minute.
pub(crate) async fn sweeper(w: FlowWorker) {
    let every =
        (w.inner.config.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        if w.inner.lock().stopping {
            return;
        }
        if let Err(e) = w.sweep_finished().await
            && let Some(note) = crate::FAULT_LOGS.allow("retention")
        {
            tracing::warn!(cause = %e, "could not delete finished flows; will retry{note}");
        }
        tokio::time::sleep(every).await;
    }
}
