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

impl FlowWorker {
    /// Deletes messages that have waited longer than
    /// [`WorkerConfig::early_message_ttl`](crate::WorkerConfig) for their
    /// session-init; the init, should it still come, is then dropped (its
    /// sender has given up on the session by then). Returns how many flows'
    /// inboxes were deleted.
    pub async fn sweep_early(&self) -> Result<usize, braid_storage::StoreError> {
        let ttl = self.inner.config.early_message_ttl.as_millis() as u64;
        let now = now_millis();
        let expired: Vec<_> = {
            let mut st = self.inner.lock();
            let ids: Vec<_> = st
                .early
                .iter()
                .filter(|(_, first)| first.saturating_add(ttl) <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                st.early.remove(id);
                st.finished.insert(*id);
            }
            ids
        };
        for chunk in expired.chunks(BATCH) {
            self.inner
                .store
                .write(chunk.iter().map(|id| Op::DeleteFlowInbox(*id)).collect())
                .await?;
        }
        if !expired.is_empty() {
            tracing::info!(
                flows = expired.len(),
                "deleted messages whose session-init never arrived"
            );
        }
        Ok(expired.len())
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
        if let Err(e) = w.sweep_early().await
            && let Some(note) = crate::FAULT_LOGS.allow("retention")
        {
            tracing::warn!(cause = %e, "could not delete expired early messages; will retry{note}");
        }
        tokio::time::sleep(every).await;
    }
}
