//! Session messages into flows of this node: into the receiver's inbox, or
//! starting the responder flow a session-init names, each in one durable
//! transaction with whatever the caller commits alongside.

use crate::state::State;
use crate::{FlowEvent, FlowWorker, WorkerError};
use braid_bus::BusReceiver;
use braid_runtime::Event;
use braid_storage::{FlowRecord, Op, StoreError};
use braid_types::{Body, FlowId, FlowStart, SessionFault, SessionMessage, now_millis};
use std::collections::HashMap;

/// Flows of this node with messages that arrived before their session-init
/// (their inbox waits for the init): beyond this many, further such
/// messages from other nodes are refused (not acknowledged, so their
/// sender retries), so that a peer cannot fill the disk with messages for
/// sessions that never start. Messages from this node's own flows are
/// always kept.
pub const MAX_EARLY_FLOWS: usize = 10_000;

/// How long a cluster's count of flows with early messages is used
/// before it is counted again.
pub(crate) const EARLY_RECOUNT: std::time::Duration = std::time::Duration::from_secs(1);

/// A delivery that must wait: too many flows have early messages waiting.
#[derive(Debug)]
pub(crate) struct TooManyEarly;

/// The store writes and follow-ups that deliver messages to flows of this
/// node. Planned under the state lock, written in one transaction (with
/// whatever else the caller commits), applied after the commit.
#[derive(Default)]
pub(crate) struct Delivery {
    pub ops: Vec<Op>,
    created: HashMap<FlowId, FlowRecord>,
    wake: Vec<SessionMessage>,
    replies: Vec<SessionMessage>,
}

impl Delivery {
    /// Plans delivery of `m`: into the receiver's inbox, starting the
    /// responder flow its session-init names, or a protocol error back.
    /// Flows that ended get nothing; a session-init for a flow id that is
    /// neither running nor known to have ended must have been checked
    /// against the store first ([`FlowWorker::learn_finished`]).
    ///
    /// A message that arrives before its session's init (messages of one
    /// session may overtake each other between nodes) goes into the inbox
    /// of the flow the init will start, and waits there; when the init
    /// arrives, the new flow reads them in sequence order. With `bounded`
    /// (messages from other nodes) that is refused once
    /// [`MAX_EARLY_FLOWS`] flows have early messages waiting.
    pub fn plan(
        &mut self,
        w: &FlowWorker,
        st: &mut State,
        m: &SessionMessage,
        bounded: bool,
    ) -> Result<(), TooManyEarly> {
        let dest = m.destination_flow();
        if st.flows.contains_key(&dest) || self.created.contains_key(&dest) {
            self.ops.push(Op::PutInbox(Box::new(m.clone())));
            self.wake.push(m.clone());
            return Ok(());
        }
        if st.finished.contains(&dest) {
            tracing::debug!(flow_id = %dest, "dropping message for finished flow");
            return Ok(());
        }
        if st.creating.contains(&dest) {
            // Another delivery is creating it: the message waits in its
            // inbox, which the flow reads when it first runs.
            self.ops.push(Op::PutInbox(Box::new(m.clone())));
            return Ok(());
        }
        if !st.vnodes.contains_key(&m.to.holding) {
            tracing::warn!(holding = %m.to.holding, "dropping message for unknown vnode");
            return Ok(());
        }
        // The vnode is known from here on.
        let Some(init) = &m.init else {
            if !st.early.contains_key(&dest) {
                if bounded && st.early.len() >= MAX_EARLY_FLOWS {
                    return Err(TooManyEarly);
                }
                st.early.insert(dest, now_millis());
            }
            tracing::debug!(flow_id = %dest, session = %m.session, seq = m.seq,
                "message before its session-init: kept until the init arrives");
            self.ops.push(Op::PutInbox(Box::new(m.clone())));
            return Ok(());
        };
        let v = &st.vnodes[&m.to.holding];
        let responder = w
            .inner
            .runtime
            .cached(&v.package)
            .and_then(|p| p.responder_for(&init.protocol, &init.versions));
        let Some((flow_name, version)) = responder else {
            let reply = m.fault_reply(SessionFault::ProtocolUnsupported(format!(
                "{} has no responder for protocol {:?} versions {:?}",
                v.name, init.protocol, init.versions
            )));
            self.ops.push(Op::PutOutbox(Box::new(reply.clone())));
            self.replies.push(reply);
            return Ok(());
        };
        let rec = FlowRecord::new(
            dest,
            v.holding,
            flow_name,
            v.package,
            FlowStart::Responder {
                session: m.session,
                initiator: m.from.clone(),
                protocol: init.protocol.clone(),
                version,
            },
            now_millis(),
            rand::random(),
        );
        self.ops.push(Op::PutFlow(Box::new(rec.clone())));
        self.ops.push(Op::PutInbox(Box::new(m.clone())));
        st.creating.insert(dest);
        st.early.remove(&dest);
        self.created.insert(dest, rec);
        self.wake.push(m.clone());
        Ok(())
    }

    /// The commit failed: forget what was planned.
    pub fn abandon(self, w: &FlowWorker) {
        let mut st = w.inner.lock();
        for id in self.created.keys() {
            st.creating.remove(id);
        }
    }

    /// After the commit: registers new flows and wakes receivers.
    pub fn apply(self, w: &FlowWorker) {
        let mut to_schedule = Vec::new();
        let mut created = Vec::new();
        {
            let mut st = w.inner.lock();
            for (id, rec) in self.created {
                st.creating.remove(&id);
                w.inner.metrics.count(rec.holding, FlowEvent::Started);
                created.push(rec.clone());
                // Its partition may have gone to another worker while the
                // commit ran: that worker runs it (it is in the store).
                if st.owned.contains_key(&w.partition(&id)) {
                    st.insert_flow(rec);
                }
            }
            for m in self.wake {
                let dest = m.destination_flow();
                match st.live.get(&dest) {
                    Some(l) => {
                        let _ = l.events.send(Event::Message(m));
                        st.unsuspend(&dest);
                    }
                    None => to_schedule.push(dest),
                }
            }
        }
        for rec in &created {
            w.status_changed(rec);
        }
        for id in to_schedule {
            w.schedule(id);
        }
        if !self.replies.is_empty() {
            w.publish(self.replies);
        }
    }

    /// Writes the plan (plus nothing else) and applies it.
    pub async fn commit(mut self, w: &FlowWorker) -> Result<(), StoreError> {
        let ops = std::mem::take(&mut self.ops);
        if let Err(e) = w.inner.store.write(ops).await {
            self.abandon(w);
            return Err(e);
        }
        self.apply(w);
        Ok(())
    }
}

impl FlowWorker {
    /// Makes sure every session-init in `batch` for a flow this node does
    /// not run is known to be new or finished: flows that ended are not in
    /// memory, and a late duplicate of their session-init must not start
    /// them again.
    pub(crate) async fn learn_finished(&self, batch: &[SessionMessage]) -> Result<(), StoreError> {
        let unknown: Vec<FlowId> = {
            let st = self.inner.lock();
            batch
                .iter()
                .filter(|m| m.init.is_some())
                .map(SessionMessage::destination_flow)
                .filter(|d| {
                    !st.flows.contains_key(d)
                        && !st.finished.contains(d)
                        && !st.creating.contains(d)
                })
                .collect()
        };
        for id in unknown {
            if self.inner.store.flow(&id).await?.is_some() {
                self.inner.lock().finished.insert(id);
            }
        }
        Ok(())
    }

    /// Delivers messages that arrived from other nodes: each goes into its
    /// receiver's inbox (or starts the responder its session-init names),
    /// all in one durable transaction. Returns once durable, so the link
    /// manager may then acknowledge them. Messages for vnodes this node
    /// does not host are refused.
    ///
    /// In a cluster they go, durably, onto the event topic, whose owners
    /// deliver them.
    pub async fn deliver_inbound(&self, batch: &[SessionMessage]) -> Result<(), WorkerError> {
        if let Some(c) = &self.inner.cluster {
            if batch
                .iter()
                .any(|m| !self.inner.lock().vnodes.contains_key(&m.to.holding))
            {
                self.catch_up_catalog().await;
            }
            if let Some(m) = batch
                .iter()
                .find(|m| !self.inner.lock().vnodes.contains_key(&m.to.holding))
            {
                return Err(WorkerError::NotFound(format!(
                    "no vnode {} ({}) on this node",
                    m.to.name, m.to.holding
                )));
            }
            self.refuse_early_past_bound(batch).await?;
            let records = batch
                .iter()
                .map(|m| crate::cluster::Input::Message(Box::new(m.clone())).record())
                .collect();
            return c
                .config
                .bus
                .publish(&c.config.topics.event, records)
                .await
                .map_err(|e| WorkerError::Store(StoreError::Unavailable(format!("the bus: {e}"))));
        }
        self.learn_finished(batch).await?;
        let mut d = Delivery::default();
        {
            let mut st = self.inner.lock();
            for m in batch {
                if !st.vnodes.contains_key(&m.to.holding) {
                    drop(st);
                    d.abandon(self);
                    return Err(WorkerError::NotFound(format!(
                        "no vnode {} ({}) on this node",
                        m.to.name, m.to.holding
                    )));
                }
                if d.plan(self, &mut st, m, true).is_err() {
                    drop(st);
                    d.abandon(self);
                    return Err(WorkerError::Busy(format!(
                        "{MAX_EARLY_FLOWS} sessions have messages waiting for their \
                         session-init; retry later"
                    )));
                }
            }
        }
        d.commit(self).await?;
        Ok(())
    }

    /// In a cluster the flows with early messages from other nodes are in
    /// the partitions of several workers: the store counts them (at most
    /// once per [`EARLY_RECOUNT`]). Past [`MAX_EARLY_FLOWS`], a message of
    /// `batch` that would wait for its session-init (none in the batch, no
    /// flow in the store) is refused, `Busy`, so its sender retries, as in
    /// an embedded node.
    async fn refuse_early_past_bound(&self, batch: &[SessionMessage]) -> Result<(), WorkerError> {
        let Some(c) = &self.inner.cluster else {
            return Ok(());
        };
        let early = {
            let mut count = c.early_count.lock().await;
            match *count {
                Some((at, n)) if at.elapsed() < EARLY_RECOUNT => n,
                _ => {
                    let n = self.inner.store.early_flows().await?;
                    *count = Some((std::time::Instant::now(), n));
                    n
                }
            }
        };
        if early < MAX_EARLY_FLOWS {
            return Ok(());
        }
        for m in batch.iter().filter(|m| m.init.is_none()) {
            let dest = m.destination_flow();
            if batch
                .iter()
                .any(|i| i.init.is_some() && i.destination_flow() == dest)
            {
                continue;
            }
            if self.inner.store.flow(&dest).await?.is_none() {
                return Err(WorkerError::Busy(format!(
                    "{early} sessions have messages waiting for their session-init; retry later"
                )));
            }
        }
        Ok(())
    }

    /// The peer holds these messages (outbox keys) durably: forget them.
    pub async fn remote_delivered(&self, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.inner
            .store
            .write(keys.into_iter().map(Op::DeleteOutbox).collect())
            .await
    }

    /// The link manager gave up on `m`: its sender's session ends with
    /// `reason` (a sequence-0 error into the sender's inbox, in the same
    /// transaction that drops `m` from the outbox).
    pub async fn remote_failed(
        &self,
        m: &SessionMessage,
        reason: String,
    ) -> Result<(), StoreError> {
        let notice = SessionMessage {
            session: m.session,
            from: m.to.clone(),
            to: m.from.clone(),
            seq: 0,
            init: None,
            body: Body::Error(SessionFault::Undeliverable(format!(
                "to {}: {reason}",
                m.to.name
            ))),
        };
        if let Some(c) = &self.inner.cluster {
            // To the sender's owner first; then out of the outbox (a crash
            // between the two sends the message once more).
            let record = crate::cluster::Input::Message(Box::new(notice)).record();
            c.config
                .bus
                .publish(&c.config.topics.event, vec![record])
                .await
                .map_err(|e| StoreError::Unavailable(format!("the bus: {e}")))?;
            return self
                .inner
                .store
                .write(vec![Op::DeleteOutbox(m.key())])
                .await;
        }
        let mut d = Delivery::default();
        d.ops.push(Op::DeleteOutbox(m.key()));
        {
            let mut st = self.inner.lock();
            // Unbounded: a notice for one of this node's own flows.
            let _ = d.plan(self, &mut st, &notice, false);
        }
        d.commit(self).await
    }
}

/// Delivers published messages to flows of this node.
pub(crate) async fn route(w: FlowWorker, mut rx: BusReceiver) {
    while let Some(mut batch) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
            if batch.len() > 4096 {
                break;
            }
        }
        crate::retry_until_ok("message delivery", || deliver(&w, &batch, true)).await;
    }
}

/// Delivers a batch of messages committed to an outbox: each moves from
/// the outbox to its receiver's inbox in one transaction, fenced with the
/// owner epoch of the receiver's partition. Messages for vnodes of other
/// nodes go to the link manager. In a cluster, messages for flows of a
/// partition another worker owns are handed to the event topic when
/// `forward` (from the outbox router), and left to the owner otherwise
/// (records of the event topic for a partition just given up).
pub(crate) async fn deliver(
    w: &FlowWorker,
    batch: &[SessionMessage],
    forward: bool,
) -> Result<(), StoreError> {
    if w.inner.cluster.is_some() && {
        let st = w.inner.lock();
        batch.iter().any(|m| !st.vnodes.contains_key(&m.to.holding))
    } {
        // Perhaps a vnode created through another worker a moment ago.
        w.catch_up_catalog().await;
    }
    w.learn_finished(batch).await?;
    let mut d = Delivery::default();
    let mut remote = Vec::new();
    let mut others = Vec::new();
    let mut fences = std::collections::BTreeMap::new();
    let mut mine = Vec::new();
    {
        let mut st = w.inner.lock();
        for m in batch {
            if !st.vnodes.contains_key(&m.to.holding) {
                if w.inner.remote.is_some() {
                    remote.push(m.clone());
                    continue;
                }
                if w.inner.cluster.is_some() {
                    // Perhaps a vnode created through another worker a
                    // moment ago: it goes to the event topic, whose owner
                    // knows more (or drops it).
                    if forward {
                        others.push(crate::cluster::Input::Message(Box::new(m.clone())));
                    }
                    continue;
                }
            }
            let dest = w.partition(&m.destination_flow());
            let Some(epoch) = st.owned.get(&dest).copied() else {
                if forward {
                    others.push(crate::cluster::Input::Message(Box::new(m.clone())));
                }
                continue;
            };
            fences.insert(dest, epoch);
            mine.push(m);
            d.ops.push(Op::DeleteOutbox(m.key()));
            // Unbounded: messages of this node's own flows.
            let _ = d.plan(w, &mut st, m, false);
        }
    }
    if let (Some(r), false) = (&w.inner.remote, remote.is_empty()) {
        r.send(remote);
    }
    if let (Some(c), false) = (&w.inner.cluster, others.is_empty()) {
        c.send_inputs(&others);
    }
    if d.ops.is_empty() {
        return Ok(());
    }
    d.ops.extend(
        fences
            .into_iter()
            .map(|(partition, epoch)| Op::Fence { partition, epoch }),
    );
    let r = d.commit(w).await;
    if let Err(StoreError::Fenced {
        partition,
        epoch,
        current,
    }) = &r
    {
        w.lost_partition(*partition, *epoch, *current);
        // Whoever owns it now may have loaded the outbox before these were
        // committed to it: hand them over on the event topic.
        if let Some(c) = &w.inner.cluster {
            let inputs: Vec<_> = mine
                .into_iter()
                .map(|m| crate::cluster::Input::Message(Box::new(m.clone())))
                .collect();
            c.send_inputs(&inputs);
            return Ok(());
        }
    }
    r
}
