//! The flow worker's in-memory state: what running flows need, and nothing
//! about the history (finished flows live in the store).

use braid_runtime::Event;
use braid_storage::{FlowRecord, PackageRecord, VnodeRecord};
use braid_types::{Checksum, ClientRequestId, FlowId, FlowStart, HoldingId, X500Name};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;

/// Recently finished flows remembered in memory (so that late messages for
/// them are dropped without a store read).
const RECENT_FINISHED: usize = 65_536;

#[derive(Debug)]
pub(crate) struct Live {
    pub events: mpsc::UnboundedSender<Event>,
    pub evicting: bool,
    /// The instance's kill switch (see `braid_runtime::FlowInput::kill`).
    pub kill: Arc<OnceLock<String>>,
    /// Which instance of the flow this is: one that lost its flow (its
    /// partition went to another worker and perhaps came back) must not
    /// commit for a later one.
    pub instance: u64,
}

/// A bounded set that forgets its oldest members.
#[derive(Default)]
pub(crate) struct RecentSet {
    order: VecDeque<FlowId>,
    set: HashSet<FlowId>,
}

impl RecentSet {
    pub fn insert(&mut self, id: FlowId) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > RECENT_FINISHED
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    pub fn contains(&self, id: &FlowId) -> bool {
        self.set.contains(id)
    }

    /// Forgets `id` (its order slot is dropped when it comes up).
    pub fn remove(&mut self, id: &FlowId) {
        self.set.remove(id);
    }
}

#[derive(Default)]
pub(crate) struct State {
    pub vnodes: HashMap<HoldingId, VnodeRecord>,
    pub names: HashMap<X500Name, HoldingId>,
    pub packages: HashMap<Checksum, PackageRecord>,
    /// Flows that have not ended.
    pub flows: HashMap<FlowId, FlowRecord>,
    /// Client request ids of unfinished flows, and ids reserved by starts
    /// in progress (`None`).
    pub by_client: HashMap<(HoldingId, ClientRequestId), Option<FlowId>>,
    pub live: HashMap<FlowId, Live>,
    /// Live flows at a suspension, oldest first: the eviction order.
    pub lru: BTreeMap<u64, FlowId>,
    pub lru_pos: HashMap<FlowId, u64>,
    pub tick: u64,
    pub queue: VecDeque<FlowId>,
    pub queued: HashSet<FlowId>,
    pub retries: HashMap<FlowId, u32>,
    /// Live flows told to evict that have not exited yet.
    pub evicting: usize,
    /// Kills requested and not yet carried out, with their reasons.
    pub kills: HashMap<FlowId, String>,
    /// Flows whose end is being committed (a kill now is too late).
    pub ending: HashSet<FlowId>,
    /// Responder flows planned by a delivery that has not committed yet.
    pub creating: HashSet<FlowId>,
    pub finished: RecentSet,
    /// When to schedule flows that are not live (timer, retry), one entry
    /// per flow, earliest first.
    pub timers: BTreeSet<(u64, FlowId)>,
    pub timer_of: HashMap<FlowId, u64>,
    /// Flows not started yet whose inbox holds messages that arrived
    /// before their session-init, with when the first arrived (ms).
    pub early: HashMap<FlowId, u64>,
    /// Set at shutdown: no flow starts running any more.
    pub stopping: bool,
    /// The partitions this worker owns, with their owner epochs.
    pub owned: HashMap<u16, u64>,
    /// The last instance number handed out.
    pub instances: u64,
}

impl State {
    pub fn unsuspend(&mut self, f: &FlowId) {
        if let Some(t) = self.lru_pos.remove(f) {
            self.lru.remove(&t);
        }
    }

    pub fn mark_suspended(&mut self, f: FlowId) {
        self.unsuspend(&f);
        self.tick += 1;
        self.lru.insert(self.tick, f);
        self.lru_pos.insert(f, self.tick);
    }

    /// Tells a live flow to unload at its next suspension.
    pub fn evict(&mut self, f: &FlowId) -> bool {
        match self.live.get_mut(f) {
            Some(l) if !l.evicting => {
                l.evicting = true;
                self.evicting += 1;
                let _ = l.events.send(Event::Evict);
                true
            }
            _ => false,
        }
    }

    /// Registers an unfinished flow.
    pub fn insert_flow(&mut self, r: FlowRecord) {
        if let FlowStart::Client {
            client_request_id, ..
        } = &r.start
        {
            self.by_client
                .insert((r.holding, client_request_id.clone()), Some(r.id));
        }
        self.flows.insert(r.id, r);
    }

    /// Sets the time to schedule `id` (replacing an earlier one).
    pub fn set_timer(&mut self, id: FlowId, at_ms: u64) {
        if let Some(old) = self.timer_of.insert(id, at_ms) {
            self.timers.remove(&(old, id));
        }
        self.timers.insert((at_ms, id));
    }

    /// Removes and returns the flows whose time has come.
    pub fn due_timers(&mut self, now_ms: u64) -> Vec<FlowId> {
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.timers.first() {
            if at > now_ms {
                break;
            }
            self.timers.pop_first();
            self.timer_of.remove(&id);
            due.push(id);
        }
        due
    }

    /// Forgets a flow this worker no longer runs (its partition went to
    /// another worker); a live instance must have been told to evict.
    pub fn drop_flow(&mut self, id: &FlowId) {
        self.forget_flow(id);
        self.finished.remove(id);
        self.queued.remove(id);
        self.unsuspend(id);
        self.early.remove(id);
    }

    /// Forgets a flow that ended (its record is in the store).
    pub fn forget_flow(&mut self, id: &FlowId) {
        if let Some(at) = self.timer_of.remove(id) {
            self.timers.remove(&(at, *id));
        }
        if let Some(r) = self.flows.remove(id)
            && let FlowStart::Client {
                client_request_id, ..
            } = &r.start
        {
            self.by_client
                .remove(&(r.holding, client_request_id.clone()));
        }
        self.kills.remove(id);
        self.ending.remove(id);
        self.retries.remove(id);
        self.finished.insert(*id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_timer_per_flow_earliest_first() {
        let mut st = State::default();
        let a = FlowId::from_bytes([1; 16]);
        let b = FlowId::from_bytes([2; 16]);
        st.set_timer(a, 50);
        st.set_timer(b, 20);
        st.set_timer(a, 10); // replaces 50
        assert_eq!(st.timers.len(), 2);
        assert_eq!(st.due_timers(5), Vec::<FlowId>::new());
        assert_eq!(st.due_timers(30), vec![a, b]);
        assert!(st.timers.is_empty() && st.timer_of.is_empty());
        st.set_timer(a, 100);
        st.forget_flow(&a);
        assert!(st.timers.is_empty());
    }

    #[test]
    fn recent_set_is_bounded_and_forgets_the_oldest() {
        let mut s = RecentSet::default();
        let id = |i: u32| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&i.to_be_bytes());
            FlowId::from_bytes(b)
        };
        for i in 0..(RECENT_FINISHED as u32 + 5) {
            s.insert(id(i));
        }
        assert!(!s.contains(&id(0)));
        assert!(!s.contains(&id(4)));
        assert!(s.contains(&id(5)));
        assert!(s.contains(&id(RECENT_FINISHED as u32 + 4)));
        assert_eq!(s.set.len(), RECENT_FINISHED);
    }
}
