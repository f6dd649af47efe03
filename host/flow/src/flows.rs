//! What clients do with flows: start, kill, look up, list.

use crate::{FlowEvent, FlowWorker, WorkerError};
use braid_storage::{FlowPage, FlowRecord, LIST_POSITION_LEN, Op, list_position};
use braid_types::{ClientRequestId, FlowId, FlowStart, FlowStatus, HoldingId, now_millis};

/// Flows a listing looks at per request at most (a status filter that
/// matches little returns a short page with a cursor rather than scanning
/// everything).
const LIST_SCAN: usize = 10_000;

impl FlowWorker {
    /// Starts a flow for a client. The start is durable before this returns.
    pub async fn start_flow(
        &self,
        holding: HoldingId,
        client_request_id: ClientRequestId,
        flow_name: String,
        request_body: String,
    ) -> Result<FlowRecord, WorkerError> {
        let key = (holding, client_request_id.clone());
        let conflict = || {
            WorkerError::Conflict(format!(
                "clientRequestId {client_request_id} was already used on virtual node {holding}"
            ))
        };
        if self.inner.cluster.is_some() && !self.inner.lock().vnodes.contains_key(&holding) {
            // Perhaps created through another worker a moment ago.
            self.reload_catalog()
                .await
                .map_err(|e| WorkerError::Busy(format!("reading virtual nodes: {e:#}")))?;
        }
        let rec = {
            let mut st = self.inner.lock();
            let v = st.vnodes.get(&holding).ok_or_else(|| {
                WorkerError::NotFound(format!("no virtual node with holdingId {holding}"))
            })?;
            if !v.flow_starts_enabled {
                return Err(WorkerError::Conflict(format!(
                    "flow starts are disabled on virtual node {holding}; \
                     enable them with PUT /api/v1/virtualnode/{holding}/state"
                )));
            }
            let package = v.package;
            let flows = st
                .packages
                .get(&package)
                .map(|p| p.flows.as_slice())
                .unwrap_or(&[]);
            match flows.iter().find(|f| f.name == flow_name) {
                Some(f) if f.startable => {}
                Some(_) => {
                    return Err(WorkerError::Invalid(format!(
                        "flow {flow_name:?} is a responder flow and cannot be started by a client"
                    )));
                }
                None => {
                    let names: Vec<&str> = flows
                        .iter()
                        .filter(|f| f.startable)
                        .map(|f| f.name.as_str())
                        .collect();
                    return Err(WorkerError::NotFound(format!(
                        "virtual node {holding} has no flow named {flow_name:?}; startable flows: {names:?}"
                    )));
                }
            }
            if st.by_client.contains_key(&key) {
                return Err(conflict());
            }
            // Reserved while the store is asked about finished flows and
            // while the start commits.
            st.by_client.insert(key.clone(), None);
            FlowRecord::new(
                FlowId::random(),
                holding,
                flow_name,
                package,
                FlowStart::Client {
                    client_request_id: client_request_id.clone(),
                    request_body,
                },
                now_millis(),
                rand::random(),
            )
        };
        let release = || {
            self.inner.lock().by_client.remove(&key);
        };
        match self
            .inner
            .store
            .flow_by_client(&holding, &client_request_id)
            .await
        {
            Ok(None) => {}
            Ok(Some(_)) => {
                release();
                return Err(conflict());
            }
            Err(e) => {
                release();
                return Err(e.into());
            }
        }
        if let Err(e) = self
            .inner
            .store
            .write(vec![Op::PutFlow(Box::new(rec.clone()))])
            .await
        {
            release();
            return Err(e.into());
        }
        self.inner.metrics.count(holding, FlowEvent::Started);
        if let Some(c) = &self.inner.cluster {
            // The owner of the flow's partition runs it (or finds it in
            // the store when it takes the partition over).
            release();
            self.status_changed(&rec);
            c.send_inputs(&[crate::cluster::Input::Start(rec.id)]);
            return Ok(rec);
        }
        {
            let mut st = self.inner.lock();
            st.insert_flow(rec.clone());
            if st.queued.insert(rec.id) {
                st.queue.push_back(rec.id);
            }
        }
        self.status_changed(&rec);
        self.pump();
        Ok(rec)
    }

    /// Kills an unfinished flow: it ends KILLED and its counterparties'
    /// sessions fail. The kill is durable before this returns and is
    /// carried out whatever the flow is doing (running, waiting, evicted,
    /// sleeping), also after a restart.
    pub async fn kill(&self, flow: FlowId, reason: String) -> Result<FlowRecord, WorkerError> {
        if let Some(c) = &self.inner.cluster {
            // Durable first; the owner of the flow's partition carries it
            // out (or finds it in the store when it takes the partition).
            let rec = match self.inner.store.flow(&flow).await? {
                None => return Err(WorkerError::NotFound(format!("no flow {flow}"))),
                Some(r) if r.status.is_terminal() => {
                    return Err(WorkerError::Conflict(format!(
                        "flow {flow} has already ended ({:?})",
                        r.status
                    )));
                }
                Some(r) => r,
            };
            self.inner
                .store
                .write(vec![Op::PutKill(flow, reason.clone())])
                .await?;
            c.send_inputs(&[crate::cluster::Input::Kill(flow, reason)]);
            return Ok(rec);
        }
        let rec = {
            let mut st = self.inner.lock();
            match st.flows.get(&flow).cloned() {
                None => None,
                Some(_) if st.ending.contains(&flow) => {
                    return Err(WorkerError::Conflict(format!(
                        "flow {flow} is ending; its end is being recorded"
                    )));
                }
                Some(rec) => {
                    Self::signal_kill(&mut st, flow, &reason);
                    Some(rec)
                }
            }
        };
        let Some(rec) = rec else {
            return match self.inner.store.flow(&flow).await? {
                Some(r) => Err(WorkerError::Conflict(format!(
                    "flow {flow} has already ended ({:?})",
                    r.status
                ))),
                None => Err(WorkerError::NotFound(format!("no flow {flow}"))),
            };
        };
        self.inner
            .store
            .write(vec![Op::PutKill(flow, reason)])
            .await?;
        self.schedule(flow);
        Ok(rec)
    }

    /// Marks `flow` killed in memory and tells its live instance.
    fn signal_kill(st: &mut crate::state::State, flow: FlowId, reason: &str) {
        st.kills.entry(flow).or_insert_with(|| reason.to_string());
        if let Some(l) = st.live.get(&flow) {
            // Takes effect at the flow's next host call or epoch tick; the
            // event wakes it if it waits.
            let _ = l.kill.set(reason.to_string());
            let _ = l
                .events
                .send(braid_runtime::Event::Kill(reason.to_string()));
        }
    }

    /// Carries out a kill that is durable already (it came from another
    /// worker) on a flow this worker runs.
    pub(crate) fn kill_here(&self, flow: FlowId, reason: String) {
        {
            let mut st = self.inner.lock();
            if !st.flows.contains_key(&flow) || st.ending.contains(&flow) {
                return;
            }
            Self::signal_kill(&mut st, flow, &reason);
        }
        self.schedule(flow);
    }

    /// A client-started flow's record: the running flow's from memory, a
    /// finished one's from the store.
    pub async fn flow_by_client(
        &self,
        holding: &HoldingId,
        id: &ClientRequestId,
    ) -> Result<Option<FlowRecord>, WorkerError> {
        {
            let st = self.inner.lock();
            if let Some(Some(fid)) = st.by_client.get(&(*holding, id.clone()))
                && let Some(r) = st.flows.get(fid)
            {
                return Ok(Some(r.clone()));
            }
        }
        Ok(self.inner.store.flow_by_client(holding, id).await?)
    }

    /// A flow's record: the running flow's from memory (its status can be
    /// ahead of the store's), a finished one's from the store.
    pub async fn flow(&self, id: &FlowId) -> Result<Option<FlowRecord>, WorkerError> {
        if let Some(r) = self.inner.lock().flows.get(id) {
            return Ok(Some(r.clone()));
        }
        Ok(self.inner.store.flow(id).await?)
    }

    /// A page of a vnode's flows (responders included), oldest first,
    /// optionally only those with `status`; `after` is the previous page's
    /// `next` (a [`braid_storage::list_position`]).
    pub async fn list_flows(
        &self,
        holding: &HoldingId,
        status: Option<FlowStatus>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<FlowPage, WorkerError> {
        if let Some(s) = status
            && !s.is_terminal()
            && self.inner.cluster.is_none()
        {
            // Unfinished flows are all in memory, with their current
            // status (the store's can lag: a flow runs before its first
            // checkpoint). No need to scan the finished ones.
            return Ok(self.unfinished_page(holding, s, after, limit));
        }
        let mut page = self
            .inner
            .store
            .list_flows(holding, status, after, limit, LIST_SCAN)
            .await?;
        // A running flow's status in memory can be ahead of the store's
        // (START_REQUESTED flows that started running).
        let st = self.inner.lock();
        for f in &mut page.flows {
            if let Some(cur) = st.flows.get(&f.id)
                && cur.status != f.status
                && status.is_none()
            {
                f.status = cur.status;
            }
        }
        Ok(page)
    }

    /// A page of a vnode's unfinished flows with `status`, from memory.
    fn unfinished_page(
        &self,
        holding: &HoldingId,
        status: FlowStatus,
        after: Option<&[u8]>,
        limit: usize,
    ) -> FlowPage {
        let limit = limit.max(1);
        let st = self.inner.lock();
        let mut found: Vec<([u8; LIST_POSITION_LEN], &FlowRecord)> = st
            .flows
            .values()
            .filter(|r| r.holding == *holding && r.status == status)
            .map(|r| (list_position(r), r))
            .filter(|(k, _)| after.is_none_or(|a| k.as_slice() > a))
            .collect();
        let more = found.len() > limit;
        if more {
            // Only the first `limit` need sorting (and copying).
            found.select_nth_unstable_by_key(limit, |f| f.0);
            found.truncate(limit);
        }
        found.sort_unstable_by_key(|f| f.0);
        FlowPage {
            next: if more {
                found.last().map(|(k, _)| k.to_vec())
            } else {
                None
            },
            flows: found.into_iter().map(|(_, r)| r.clone()).collect(),
        }
    }

    /// The unfinished flows of a vnode (from memory).
    pub fn unfinished_of(&self, holding: &HoldingId) -> Vec<FlowRecord> {
        let st = self.inner.lock();
        let mut v: Vec<FlowRecord> = st
            .flows
            .values()
            .filter(|r| r.holding == *holding)
            .cloned()
            .collect();
        v.sort_by_key(|r| r.created_ms);
        v
    }

    /// How many of a vnode's flows have `status` (reads every page).
    pub async fn count_flows(
        &self,
        holding: &HoldingId,
        status: FlowStatus,
    ) -> Result<usize, WorkerError> {
        let mut n = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .inner
                .store
                .list_flows(holding, Some(status), after.as_deref(), 10_000, LIST_SCAN)
                .await?;
            n += page.flows.len();
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(n),
            }
        }
    }

    /// How many flows have an instance now, and how many are unfinished.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.inner.lock();
        (st.live.len(), st.flows.len())
    }
}
