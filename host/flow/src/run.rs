//! Running flows: which flow runs next, the bounded live set and eviction,
//! committing checkpoints and ends, and the environment the runtime calls.

use crate::delivery::Delivery;
use crate::state::Live;
use crate::{FlowEvent, FlowWorker};
use braid_runtime::{Checkpoint, Event, FlowEnv, FlowInput, Package, RunOutcome};
use braid_storage::{FlowRecord, Op, StoreError};
use braid_types::{
    FailureKind, FlowFailure, FlowId, FlowStatus, HoldingId, SessionMessage, X500Name, now_millis,
};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

pub(crate) struct Env {
    pub worker: FlowWorker,
    /// The instance this environment serves (see `Live::instance`).
    pub instance: u64,
}

#[async_trait::async_trait]
impl FlowEnv for Env {
    async fn checkpoint(&self, flow: FlowId, cp: Checkpoint) -> anyhow::Result<()> {
        let inner = &self.worker.inner;
        let (rec, changed) = {
            let st = inner.lock();
            if st.stopping {
                anyhow::bail!("the node is shutting down");
            }
            if st
                .live
                .get(&flow)
                .is_none_or(|l| l.instance != self.instance)
            {
                anyhow::bail!("flow {flow} is no longer this instance's (its partition moved)");
            }
            let mut r = st
                .flows
                .get(&flow)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("flow {flow} vanished"))?;
            // The store may still say START_REQUESTED (the status in
            // memory moves to RUNNING when the flow gets an instance).
            let changed = r.journal_len == 0 || r.status != FlowStatus::Running;
            if changed {
                r.updated_ms = now_millis();
            }
            r.status = FlowStatus::Running;
            r.wake_at_ms = cp.wake_at_ms;
            r.journal_len = cp.first_index + cp.entries.len() as u32;
            (r, changed)
        };
        self.worker.commit_checkpoint(&rec, cp, Vec::new()).await?;
        {
            let mut st = inner.lock();
            st.retries.remove(&flow);
            if st.live.get(&flow).is_some_and(|l| !l.evicting) {
                st.mark_suspended(flow);
            }
        }
        // Status changes only: a flow that suspends again is still RUNNING.
        if changed {
            self.worker.status_changed(&rec);
        }
        // A flow just suspended: if others wait for room, evict now.
        if !inner.lock().queue.is_empty() {
            self.worker.pump();
        }
        Ok(())
    }

    fn resolve(&self, name: &X500Name) -> Option<HoldingId> {
        resolve_member(&self.worker, name)
    }

    fn derive(&self, name: &X500Name) -> HoldingId {
        HoldingId::derive(name, &self.worker.inner.config.group)
    }

    async fn resolve_fresh(&self, name: &X500Name) -> Option<HoldingId> {
        if self.worker.inner.cluster.is_some() {
            self.worker.catch_up_catalog().await;
        }
        self.resolve(name)
    }
}

/// The holding id of `name` if it is a vnode of this node or a member of
/// its network.
pub(crate) fn resolve_member(w: &FlowWorker, name: &X500Name) -> Option<HoldingId> {
    let inner = &w.inner;
    if let Some(h) = inner.lock().names.get(name).copied() {
        return Some(h);
    }
    match &inner.remote {
        Some(r) if r.is_member(name) => Some(HoldingId::derive(name, &inner.config.group)),
        _ => None,
    }
}

async fn load_input(
    w: &FlowWorker,
    id: FlowId,
    kill: Arc<OnceLock<String>>,
) -> anyhow::Result<(Arc<Package>, FlowInput)> {
    if w.inner.cluster.is_some() && {
        let st = w.inner.lock();
        st.flows
            .get(&id)
            .is_some_and(|r| !st.vnodes.contains_key(&r.holding))
    } {
        // A vnode created through another worker a moment ago.
        w.catch_up_catalog().await;
    }
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
    let pkg = w.compiled_package(&rec.package).await?;
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
            kill,
        },
    ))
}

/// Runs one flow instance until it ends, is evicted or hits a host fault.
async fn drive(
    w: FlowWorker,
    id: FlowId,
    instance: u64,
    events: mpsc::UnboundedReceiver<Event>,
    kill: Arc<OnceLock<String>>,
) {
    let outcome = match load_input(&w, id, kill.clone()).await {
        Ok((pkg, input)) => {
            let env = Arc::new(Env {
                worker: w.clone(),
                instance,
            });
            w.inner.runtime.run(pkg, input, env, events).await
        }
        // A flow that cannot even be loaded can still be killed (its
        // counterparties are not told: its sessions are unknown).
        Err(e) if kill.get().is_some() => RunOutcome::Finished {
            result: Err(FlowFailure {
                kind: FailureKind::Killed,
                message: format!(
                    "{} (the flow could not be loaded: {e:#})",
                    kill.get().expect("checked")
                ),
            }),
            checkpoint: Checkpoint::default(),
        },
        Err(e) => RunOutcome::Fault(format!("{e:#}")),
    };
    let mut retry = false;
    match outcome {
        RunOutcome::Finished { result, checkpoint } => {
            if w.finish(id, instance, result, checkpoint).await.is_err() {
                retry = true;
            }
        }
        RunOutcome::Evicted { .. } => {}
        RunOutcome::Fault(f) => {
            if let Some(note) = crate::FAULT_LOGS.allow("flow_fault") {
                tracing::warn!(flow_id = %id, cause = %f, "host fault while running flow; will retry{note}");
            }
            retry = true;
        }
    }
    let (wake, delay) = {
        let mut st = w.inner.lock();
        if st.live.get(&id).is_none_or(|l| l.instance != instance) {
            // The flow went to another worker (and perhaps came back, with
            // a new instance): nothing more of this one.
            drop(st);
            w.pump();
            return;
        }
        if st.live.remove(&id).is_some_and(|l| l.evicting) {
            st.evicting -= 1;
        }
        st.unsuspend(&id);
        let wake = st.flows.get(&id).map(|r| r.wake_at_ms);
        let delay = retry.then(|| {
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
            // the eviction), a kill is pending, or its timer is due.
            let (kill_pending, stopping) = {
                let st = w.inner.lock();
                (st.kills.contains_key(&id), st.stopping)
            };
            if stopping {
                return;
            }
            match w.inner.store.inbox(&id).await {
                Ok(msgs) if !msgs.is_empty() || kill_pending => w.schedule(id),
                Ok(_) => {}
                Err(e) => {
                    if let Some(note) = crate::FAULT_LOGS.allow("inbox_read") {
                        tracing::warn!(flow_id = %id, cause = %e, "could not read inbox; resuming{note}");
                    }
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

impl FlowWorker {
    /// A package compiled: from the runtime's cache, else from its bytes in
    /// the store.
    pub(crate) async fn compiled_package(
        &self,
        checksum: &braid_types::Checksum,
    ) -> anyhow::Result<Arc<Package>> {
        if let Some(p) = self.inner.runtime.cached(checksum) {
            return Ok(p);
        }
        let bytes = self
            .inner
            .store
            .package_bytes(checksum)
            .await?
            .ok_or_else(|| anyhow::anyhow!("package {checksum} has metadata but no bytes"))?;
        Ok(self.inner.runtime.load(*checksum, &bytes).await?)
    }

    /// Commits a flow's end: its record (final status, result or failure),
    /// the last checkpoint, the removal of what is left in its inbox and of
    /// its kill request, all in one transaction. A kill requested before
    /// this point wins over the end the flow reached.
    async fn finish(
        &self,
        id: FlowId,
        instance: u64,
        mut result: Result<String, FlowFailure>,
        checkpoint: Checkpoint,
    ) -> Result<(), StoreError> {
        let rec = {
            let mut st = self.inner.lock();
            if st.live.get(&id).is_none_or(|l| l.instance != instance) {
                return Ok(());
            }
            let Some(mut rec) = st.flows.get(&id).cloned() else {
                return Ok(());
            };
            if let Some(why) = st.kills.get(&id)
                && !matches!(&result, Err(f) if f.kind == FailureKind::Killed)
            {
                result = Err(FlowFailure {
                    kind: FailureKind::Killed,
                    message: why.clone(),
                });
            }
            st.ending.insert(id);
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
            rec
        };
        let extra = vec![Op::DeleteFlowInbox(id), Op::DeleteKill(id)];
        match self.commit_checkpoint(&rec, checkpoint, extra).await {
            Ok(()) => {
                let ev = match rec.status {
                    FlowStatus::Completed => FlowEvent::Completed,
                    FlowStatus::Killed => FlowEvent::Killed,
                    _ => FlowEvent::Failed,
                };
                self.inner.metrics.count(rec.holding, ev);
                // Published first: whoever finds the flow ended (no longer
                // in memory) finds its last change in the event log too.
                self.status_changed(&rec);
                self.inner.lock().forget_flow(&id);
                Ok(())
            }
            Err(e) => {
                if let Some(note) = crate::FAULT_LOGS.allow("flow_end") {
                    tracing::warn!(flow_id = %id, cause = %e, "could not commit flow end; will rerun{note}");
                }
                self.inner.lock().ending.remove(&id);
                Err(e)
            }
        }
    }

    /// Schedules `id` at `at_ms` (one timer per flow: a later call
    /// replaces an earlier one; a flow that ends loses its timer).
    pub(crate) fn wake_at(&self, id: FlowId, at_ms: u64) {
        let first = {
            let mut st = self.inner.lock();
            st.set_timer(id, at_ms);
            st.timers.first().map(|(at, _)| *at)
        };
        if first == Some(at_ms) {
            self.inner.timers_changed.notify_one();
        }
    }

    /// Makes sure a flow will run: queued unless it is live or finished.
    pub(crate) fn schedule(&self, id: FlowId) {
        {
            let mut st = self.inner.lock();
            if st.stopping
                || !st.flows.contains_key(&id)
                || st.live.contains_key(&id)
                || !st.queued.insert(id)
            {
                return;
            }
            st.queue.push_back(id);
        }
        self.pump();
    }

    /// Starts queued flows while there is room; makes room by evicting the
    /// longest-suspended live flows.
    pub(crate) fn pump(&self) {
        let mut st = self.inner.lock();
        if st.stopping {
            return;
        }
        let max = self.inner.config.max_live_flows.max(1);
        while st.live.len() < max {
            let Some(id) = st.queue.pop_front() else {
                break;
            };
            st.queued.remove(&id);
            let pending_kill = st.kills.get(&id).cloned();
            let Some(rec) = st.flows.get_mut(&id) else {
                continue;
            };
            if rec.status == FlowStatus::StartRequested {
                rec.status = FlowStatus::Running;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let kill = Arc::new(OnceLock::new());
            if let Some(why) = pending_kill {
                let _ = kill.set(why);
            }
            st.instances += 1;
            let instance = st.instances;
            // An instance of a partition given up and taken again may
            // still be on its way out: it can no longer commit (it is not
            // the flow's instance any more), and its eviction no longer
            // counts.
            if let Some(old) = st.live.insert(
                id,
                Live {
                    events: tx,
                    evicting: false,
                    kill: kill.clone(),
                    instance,
                },
            ) && old.evicting
            {
                st.evicting -= 1;
            }
            tokio::spawn(drive(self.clone(), id, instance, rx, kill));
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

    /// The store refused a commit: another worker claimed `partition`.
    /// Advance nothing more of it (its flows resume there from their
    /// checkpoints): in an embedded node that is every flow, so the worker
    /// stops; in a cluster the partition is given up.
    pub(crate) fn lost_partition(&self, partition: u16, epoch: u64, current: u64) {
        // Only if the refused epoch is the one this worker holds: a commit
        // begun before this worker claimed the partition again (after a
        // rebalance) is refused by its own newer claim, and that flow
        // merely runs again.
        if self.inner.lock().owned.get(&partition) != Some(&epoch) {
            return;
        }
        if self.inner.cluster.is_some() {
            tracing::warn!(
                partition,
                current,
                epoch,
                "another flow worker claimed a partition of this worker; giving it up"
            );
            self.drop_partitions(&[partition]);
            return;
        }
        if !self.inner.lock().stopping {
            tracing::error!(
                partition,
                current,
                epoch,
                "another flow worker claimed this worker's partition; stopping its flows"
            );
        }
        self.stop();
    }

    pub(crate) fn publish(&self, msgs: Vec<SessionMessage>) {
        if let Err(e) = self.inner.bus.publish(msgs) {
            // The messages stay in the outbox and are published on restart.
            if let Some(note) = crate::FAULT_LOGS.allow("publish") {
                tracing::warn!(cause = %e, "could not publish messages{note}");
            }
        }
    }

    /// Commits a flow's checkpoint in one transaction: journal entries,
    /// consumed inbox entries, the flow record, its outbound messages and
    /// `extra`. A message for a vnode of this node goes straight into the
    /// receiver's inbox in the same transaction (and the receiver is woken
    /// after the commit); anything else goes to the outbox and is published
    /// after the commit.
    pub(crate) async fn commit_checkpoint(
        &self,
        rec: &FlowRecord,
        cp: Checkpoint,
        extra: Vec<Op>,
    ) -> Result<(), StoreError> {
        let mut ops = Vec::with_capacity(cp.outbound.len() + cp.consumed.len() + 3 + extra.len());
        let partition = self.partition(&rec.id);
        // Only while this worker owns the flow's partition (and those of
        // the receivers it delivers to in the same transaction).
        let mut fences = std::collections::BTreeMap::new();
        {
            let mut st = self.inner.lock();
            let Some(epoch) = st.owned.get(&partition).copied() else {
                // The partition went to another worker: forget the flow
                // here (its new owner resumes it from its checkpoint).
                st.evict(&rec.id);
                st.drop_flow(&rec.id);
                return Err(StoreError::Fenced {
                    partition,
                    epoch: 0,
                    current: 0,
                });
            };
            fences.insert(partition, epoch);
        }
        if !cp.entries.is_empty() {
            ops.push(Op::AppendJournal {
                flow: rec.id,
                start: cp.first_index,
                entries: cp.entries,
            });
        }
        ops.extend(cp.consumed.into_iter().map(Op::DeleteInbox));
        ops.push(Op::PutFlow(Box::new(rec.clone())));
        ops.extend(extra);
        let mut local = Delivery::default();
        let mut remote = Vec::new();
        {
            let mut st = self.inner.lock();
            for m in cp.outbound {
                let dest = self.partition(&m.destination_flow());
                let owned = st.owned.get(&dest).copied();
                if let (true, Some(epoch)) = (st.vnodes.contains_key(&m.to.holding), owned) {
                    fences.insert(dest, epoch);
                    // Unbounded: messages of this node's own flows.
                    let _ = local.plan(self, &mut st, &m, false);
                } else {
                    // Another node's vnode, or a flow of another worker's
                    // partition: the router takes it on from the outbox.
                    ops.push(Op::PutOutbox(Box::new(m.clone())));
                    remote.push(m);
                }
            }
        }
        ops.append(&mut local.ops);
        ops.extend(
            fences
                .into_iter()
                .map(|(partition, epoch)| Op::Fence { partition, epoch }),
        );
        let t = std::time::Instant::now();
        if let Err(e) = self.inner.store.write(ops).await {
            local.abandon(self);
            if let StoreError::Fenced {
                partition,
                current,
                epoch,
            } = &e
            {
                self.lost_partition(*partition, *epoch, *current);
            }
            return Err(e);
        }
        self.inner.metrics.checkpoint_commit.observe(t.elapsed());
        // The record first, so that anything the receivers do next sees it.
        if let Some(cur) = self.inner.lock().flows.get_mut(&rec.id) {
            *cur = rec.clone();
        }
        local.apply(self);
        if !remote.is_empty() {
            self.publish(remote);
        }
        Ok(())
    }
}

/// Schedules flows whose timers are due: one task for all of them.
pub(crate) async fn timer_loop(w: FlowWorker) {
    loop {
        let (due, next) = {
            let mut st = w.inner.lock();
            if st.stopping {
                return;
            }
            let due = st.due_timers(now_millis());
            (due, st.timers.first().map(|(at, _)| *at))
        };
        for id in due {
            w.schedule(id);
        }
        let notified = w.inner.timers_changed.notified();
        match next {
            Some(at) => {
                let wait = Duration::from_millis(at.saturating_sub(now_millis()));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = notified => {}
                }
            }
            None => notified.await,
        }
    }
}
