//! Test braid flow packages with `cargo test`.
//!
//! A [`Network`] runs real packages in braid's real runtime, in process:
//! no REST, no disk, no network. Each named party is a vnode running a
//! package; flows are started, run until they end (or until a condition
//! holds) and their results and failures read as typed values.
//!
//! - **Virtual time.** Durable sleeps and session timeouts run on a clock
//!   that moves only when every flow is waiting, straight to the next
//!   deadline: a flow that sleeps a day finishes in milliseconds.
//! - **Faults.** [`Network::restart`] stops a party's flows where they are
//!   and resumes them from their journals, as a node does after a crash;
//!   [`Network::drop_messages`] and [`Network::delay_messages`] lose or hold
//!   back what one party sends another; [`Network::kill`] kills a flow.
//! - **Deterministic.** One thread runs everything, and messages in flight
//!   are delivered one at a time, while every flow waits, in an order a
//!   seed chooses. The seed is printed when a test fails; set
//!   `BRAID_TEST_SEED` to run that interleaving again.
//!
//! ```no_run
//! use braid_flowtest::{Network, Package};
//! use serde_json::json;
//!
//! let ping = Package::build("examples-flows/ping");
//! let net = Network::new();
//! let alice = net.party("O=Alice, L=London, C=GB", &ping);
//! let bob = net.party("O=Bob, L=Paris, C=FR", &ping);
//! let flow = net.start(&alice, "ping", json!({"counterparty": bob.name(), "n": 1}));
//! net.run_until_quiet();
//! let answer: serde_json::Value = net.result(&flow);
//! assert_eq!(answer["n"], 2);
//! ```

#![warn(missing_docs)]

mod build;
mod env;

pub use braid_runtime::Limits;
pub use build::{Package, build_component, ensure_target};

use braid_runtime::{Event, Runtime, RuntimeConfig};
use braid_types::journal::Entry;
use braid_types::{
    Checksum, ClientRequestId, FailureKind, FlowFailure, FlowId, FlowStart, HoldingId,
    SessionFault, SessionMessage, X500Name,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, mpsc};

/// The application network the parties' holding ids derive from.
const GROUP: &str = "braid-flowtest";

/// How long nothing may happen before a run gives up (virtual time): no
/// flow woke, no message was delivered.
const STUCK: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The virtual clock starts here (2030-01-01T00:00:00Z), the same in every
/// run.
const EPOCH_MS: u64 = 1_893_456_000_000;

/// A party of the network: a vnode with its package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    name: X500Name,
    holding: HoldingId,
}

impl Party {
    /// Its X.500 name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// Its holding id.
    pub fn holding(&self) -> HoldingId {
        self.holding
    }
}

/// A flow of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow(FlowId);

impl Flow {
    /// Its id.
    pub fn id(&self) -> FlowId {
        self.0
    }
}

/// Where a flow is.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Not ended yet.
    Running,
    /// Ended with this JSON result.
    Completed(serde_json::Value),
    /// Failed or was killed.
    Failed(FlowFailure),
}

/// A network of parties running flow packages on virtual time.
pub struct Network {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
}

/// What the flows' environment and the network share.
pub(crate) struct Shared {
    runtime: Runtime,
    seed: u64,
    state: Mutex<State>,
    /// Something happened: a flow checkpointed or ended.
    changed: Notify,
    /// The tokio instant the virtual clock counts from.
    t0: tokio::time::Instant,
}

#[derive(Default)]
struct State {
    parties: BTreeMap<HoldingId, PartyState>,
    flows: BTreeMap<FlowId, FlowState>,
    /// Messages sent and not yet delivered, in the order they were sent.
    in_flight: Vec<InFlight>,
    /// What the test asked to lose or hold back.
    rules: Vec<Rule>,
    rng: SplitMix,
    clients: u64,
}

struct PartyState {
    party: Party,
    package: Arc<braid_runtime::Package>,
}

struct FlowState {
    holding: HoldingId,
    flow_name: String,
    start: FlowStart,
    seed: u64,
    created_ms: u64,
    journal: Vec<Vec<u8>>,
    /// Delivered and not consumed.
    inbox: Vec<SessionMessage>,
    outcome: Outcome,
    live: Option<Live>,
    /// Runs started so far (a restart starts another).
    runs: u64,
}

struct Live {
    events: mpsc::UnboundedSender<Event>,
    task: tokio::task::JoinHandle<()>,
    kill: Arc<OnceLock<String>>,
    /// Which run of the flow this is (a restart starts another).
    run: u64,
    /// Waiting since its last checkpoint, until this deadline if any;
    /// `None` while it runs.
    waiting: Option<Option<u64>>,
}

struct InFlight {
    message: SessionMessage,
    /// Not before this virtual time.
    not_before_ms: u64,
}

enum Rule {
    Drop {
        from: HoldingId,
        to: HoldingId,
        left: usize,
    },
    Delay {
        from: HoldingId,
        to: HoldingId,
        by_ms: u64,
    },
}

/// A small deterministic generator (SplitMix64): the seed alone chooses
/// the order of deliveries.
#[derive(Default)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

impl Default for Network {
    fn default() -> Self {
        Network::new()
    }
}

/// Prints the seed of a test that fails, so that it can be run again.
struct SeedOnPanic(u64);

impl Drop for SeedOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "braid-flowtest: this run's seed is {0}; run it again with BRAID_TEST_SEED={0}",
                self.0
            );
        }
    }
}

impl Network {
    /// A network with the seed `BRAID_TEST_SEED` names, else a fresh one.
    pub fn new() -> Network {
        let seed = match std::env::var("BRAID_TEST_SEED") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("BRAID_TEST_SEED={s:?} is not a number")),
            Err(_) => SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
        };
        Network::with_seed(seed)
    }

    /// A network whose deliveries follow `seed`.
    pub fn with_seed(seed: u64) -> Network {
        Network::with_limits(seed, Limits::default())
    }

    /// A network whose deliveries follow `seed`, its flows running under
    /// `limits` (a session timeout longer than a test's sleeps, say).
    pub fn with_limits(seed: u64, limits: Limits) -> Network {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime for the test network");
        let runtime = Runtime::new(RuntimeConfig {
            limits,
            max_instances: 64,
            cache_dir: std::env::temp_dir().join("braid-flowtest-compiled"),
        })
        .expect("braid's runtime");
        let t0 = rt.block_on(async { tokio::time::Instant::now() });
        let shared = Arc::new(Shared {
            runtime,
            seed,
            state: Mutex::new(State {
                rng: SplitMix(seed),
                ..State::default()
            }),
            changed: Notify::new(),
            t0,
        });
        Network { rt, shared }
    }

    /// The seed this network's deliveries follow.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// Adds a party named `name` (an X.500 name) running `package`.
    pub fn party(&self, name: &str, package: &Package) -> Party {
        let name: X500Name = name
            .parse()
            .unwrap_or_else(|e| panic!("{name:?} is not an X.500 name: {e:?}"));
        let holding = HoldingId::derive(&name, GROUP);
        let checksum = Checksum::of(package.bytes());
        let compiled = self
            .rt
            .block_on(self.shared.runtime.load(checksum, package.bytes()))
            .unwrap_or_else(|e| panic!("{} is not a flow package: {e}", package.path_display()));
        let party = Party { name, holding };
        let mut st = self.shared.state();
        if st.parties.contains_key(&holding) {
            panic!("{} is a party already", party.name());
        }
        st.parties.insert(
            holding,
            PartyState {
                party: party.clone(),
                package: compiled,
            },
        );
        party
    }

    /// Starts flow `flow_name` on `party` with the request body `body`.
    pub fn start(&self, party: &Party, flow_name: &str, body: impl serde::Serialize) -> Flow {
        let body = serde_json::to_string(&body).expect("a request body that serializes");
        // The runtime's context: its (paused) clock, and its tasks.
        let _guard = self.rt.enter();
        let mut st = self.shared.state();
        let p = st
            .parties
            .get(&party.holding)
            .unwrap_or_else(|| panic!("{} is not a party of this network", party.name()));
        let offered = p
            .package
            .flows
            .iter()
            .any(|f| f.name == flow_name && f.startable);
        if !offered {
            let names: Vec<&str> = p
                .package
                .flows
                .iter()
                .filter(|f| f.startable)
                .map(|f| f.name.as_str())
                .collect();
            panic!(
                "{}'s package has no startable flow {flow_name:?}; it has {names:?}",
                party.name()
            );
        }
        st.clients += 1;
        let client_request_id: ClientRequestId = format!("test-{}", st.clients)
            .parse()
            .expect("a valid client request id");
        let id = st.flow_id();
        let seed = st.rng.next();
        let created_ms = self.shared.now_millis();
        st.flows.insert(
            id,
            FlowState {
                holding: party.holding,
                flow_name: flow_name.to_string(),
                start: FlowStart::Client {
                    client_request_id,
                    request_body: body,
                },
                seed,
                created_ms,
                journal: Vec::new(),
                inbox: Vec::new(),
                outcome: Outcome::Running,
                live: None,
                runs: 0,
            },
        );
        Shared::spawn(&self.shared, &mut st, id);
        Flow(id)
    }

    /// Runs until every flow has ended. Panics if nothing can happen any
    /// more while some flow has not (it waits for a message that is never
    /// sent).
    pub fn run_until_quiet(&self) {
        self.run_until("every flow to end", |net| {
            net.shared
                .state()
                .flows
                .values()
                .all(|f| f.outcome != Outcome::Running)
        });
    }

    /// Runs until `done` holds (checked whenever something happened).
    pub fn run_until(&self, what: &str, mut done: impl FnMut(&Network) -> bool) {
        let _seed = SeedOnPanic(self.seed());
        loop {
            if done(self) {
                return;
            }
            let delivered = {
                let mut st = self.shared.state();
                let _guard = self.rt.enter();
                Shared::deliver_one(&self.shared, &mut st)
            };
            if delivered {
                self.rt.block_on(tokio::task::yield_now());
                continue;
            }
            let progressed = self.rt.block_on(async {
                tokio::select! {
                    _ = self.shared.changed.notified() => true,
                    // Held-back messages become deliverable with time.
                    _ = tokio::time::sleep(self.shared.next_release()) => true,
                    _ = tokio::time::sleep(STUCK) => false,
                }
            });
            if !progressed {
                let st = self.shared.state();
                let running: Vec<String> = st
                    .flows
                    .iter()
                    .filter(|(_, f)| f.outcome == Outcome::Running)
                    .map(|(id, f)| format!("{} ({id})", f.flow_name))
                    .collect();
                panic!(
                    "waiting for {what}: nothing happened for {} days of virtual time; \
                     flows still running: {running:?}; messages in flight: {}",
                    STUCK.as_secs() / 86_400,
                    st.in_flight.len()
                );
            }
        }
    }

    /// Where `flow` is.
    pub fn outcome(&self, flow: &Flow) -> Outcome {
        self.shared
            .state()
            .flows
            .get(&flow.0)
            .map(|f| f.outcome.clone())
            .unwrap_or_else(|| panic!("no flow {}", flow.0))
    }

    /// The result of `flow`, which must have completed, as a `T`.
    pub fn result<T: serde::de::DeserializeOwned>(&self, flow: &Flow) -> T {
        match self.outcome(flow) {
            Outcome::Completed(v) => serde_json::from_value(v.clone()).unwrap_or_else(|e| {
                panic!(
                    "the result {v} is not a {}: {e}",
                    std::any::type_name::<T>()
                )
            }),
            Outcome::Failed(f) => panic!("flow {} failed: {f}", flow.0),
            Outcome::Running => panic!("flow {} has not ended", flow.0),
        }
    }

    /// The failure of `flow`, which must have failed.
    pub fn failure(&self, flow: &Flow) -> FlowFailure {
        match self.outcome(flow) {
            Outcome::Failed(f) => f,
            other => panic!("flow {} did not fail: {other:?}", flow.0),
        }
    }

    /// The flows of `party` that a session-init started, oldest first by
    /// creation, with their flow names.
    pub fn responders(&self, party: &Party) -> Vec<(Flow, String)> {
        let st = self.shared.state();
        let mut v: Vec<(u64, Flow, String)> = st
            .flows
            .iter()
            .filter(|(_, f)| {
                f.holding == party.holding && matches!(f.start, FlowStart::Responder { .. })
            })
            .map(|(id, f)| (f.created_ms, Flow(*id), f.flow_name.clone()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, f, n)| (f, n)).collect()
    }

    /// The journal of `flow`: every host call it made, in order.
    pub fn journal(&self, flow: &Flow) -> Vec<Entry> {
        let st = self.shared.state();
        let f = st
            .flows
            .get(&flow.0)
            .unwrap_or_else(|| panic!("no flow {}", flow.0));
        f.journal
            .iter()
            .map(|b| Entry::decode(b).expect("an entry braid wrote"))
            .collect()
    }

    /// Stops `party`'s flows where they are and runs them again from their
    /// journals, as a node does after a crash: what they committed stays,
    /// what they had not is done again.
    pub fn restart(&self, party: &Party) {
        let mut st = self.shared.state();
        let ids: Vec<FlowId> = st
            .flows
            .iter()
            .filter(|(_, f)| f.holding == party.holding && f.outcome == Outcome::Running)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(live) = st.flows.get_mut(id).and_then(|f| f.live.take()) {
                live.task.abort();
            }
        }
        let _guard = self.rt.enter();
        for id in ids {
            Shared::spawn(&self.shared, &mut st, id);
        }
    }

    /// Kills `flow` with `reason`.
    pub fn kill(&self, flow: &Flow, reason: &str) {
        let mut st = self.shared.state();
        let f = st
            .flows
            .get_mut(&flow.0)
            .unwrap_or_else(|| panic!("no flow {}", flow.0));
        if let Some(live) = f.live.as_mut() {
            let _ = live.kill.set(reason.to_string());
            let _ = live.events.send(Event::Kill(reason.to_string()));
            live.waiting = None; // it runs, to end
        }
    }

    /// Loses the next `n` messages `from` sends `to`.
    pub fn drop_messages(&self, from: &Party, to: &Party, n: usize) {
        self.shared.state().rules.push(Rule::Drop {
            from: from.holding,
            to: to.holding,
            left: n,
        });
    }

    /// Holds every message `from` sends `to` from now on back by `by`.
    pub fn delay_messages(&self, from: &Party, to: &Party, by: Duration) {
        self.shared.state().rules.push(Rule::Delay {
            from: from.holding,
            to: to.holding,
            by_ms: by.as_millis() as u64,
        });
    }

    /// The virtual time.
    pub fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.clock_ms())
    }

    /// How long the network has run, in virtual time.
    pub fn elapsed(&self) -> Duration {
        Duration::from_millis(self.clock_ms() - EPOCH_MS)
    }

    /// The virtual clock, read in the runtime's context (outside it,
    /// tokio's clock is the real one).
    fn clock_ms(&self) -> u64 {
        let _guard = self.rt.enter();
        self.shared.now_millis()
    }
}

impl State {
    /// A flow id from the seed (so that runs with one seed are alike).
    fn flow_id(&mut self) -> FlowId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.rng.next().to_be_bytes());
        b[8..].copy_from_slice(&self.rng.next().to_be_bytes());
        FlowId::from_bytes(b)
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The virtual clock, ms since the Unix epoch.
    pub(crate) fn now_millis(&self) -> u64 {
        EPOCH_MS + (tokio::time::Instant::now() - self.t0).as_millis() as u64
    }

    /// How long until the first held-back message may go.
    fn next_release(&self) -> Duration {
        let now = self.now_millis();
        self.state()
            .in_flight
            .iter()
            .filter(|m| m.not_before_ms > now)
            .map(|m| Duration::from_millis(m.not_before_ms - now))
            .min()
            .unwrap_or(STUCK)
    }

    /// Runs flow `id` (again) from what it committed.
    fn spawn(this: &Arc<Shared>, st: &mut State, id: FlowId) {
        let f = st.flows.get_mut(&id).expect("a known flow");
        let p = &st.parties[&f.holding];
        let (tx, rx) = mpsc::unbounded_channel();
        let kill = Arc::new(OnceLock::new());
        f.runs += 1;
        let run = f.runs;
        let input = braid_runtime::FlowInput {
            id,
            holding: f.holding,
            name: p.party.name.clone(),
            flow_name: f.flow_name.clone(),
            start: f.start.clone(),
            seed: f.seed,
            created_ms: f.created_ms,
            journal: f.journal.clone(),
            inbox: f.inbox.clone(),
            kill: kill.clone(),
        };
        let package = p.package.clone();
        let env = Arc::new(env::Env {
            shared: this.clone(),
            flow: id,
            run,
        });
        let shared = this.clone();
        let task = tokio::spawn(async move {
            let outcome = shared.runtime.run(package, input, env, rx).await;
            shared.ended(id, run, outcome);
        });
        f.live = Some(Live {
            events: tx,
            task,
            kill,
            run,
            waiting: None,
        });
    }

    /// Commits what a run of flow `id` hands over at a suspension or at its
    /// end; false if that run was stopped (a restart) meanwhile.
    fn commit(&self, st: &mut State, id: FlowId, run: u64, cp: braid_runtime::Checkpoint) -> bool {
        let now = self.now_millis();
        let Some(f) = st.flows.get_mut(&id) else {
            return false;
        };
        if f.live.as_ref().is_none_or(|l| l.run != run) {
            return false;
        }
        assert_eq!(
            cp.first_index as usize,
            f.journal.len(),
            "flow {id}: a checkpoint that does not follow the journal"
        );
        f.journal.extend(cp.entries);
        f.inbox.retain(|m| !cp.consumed.contains(&m.key()));
        if let Some(l) = f.live.as_mut() {
            l.waiting = Some(cp.wake_at_ms);
        }
        for m in cp.outbound {
            let mut not_before_ms = now;
            let mut lost = false;
            for r in st.rules.iter_mut() {
                match r {
                    Rule::Drop { from, to, left }
                        if *from == m.from.holding && *to == m.to.holding && *left > 0 =>
                    {
                        *left -= 1;
                        lost = true;
                    }
                    Rule::Delay { from, to, by_ms }
                        if *from == m.from.holding && *to == m.to.holding =>
                    {
                        not_before_ms = now + *by_ms;
                    }
                    _ => {}
                }
            }
            if !lost {
                st.in_flight.push(InFlight {
                    message: m,
                    not_before_ms,
                });
            }
        }
        self.changed.notify_one();
        true
    }

    fn ended(&self, id: FlowId, run: u64, outcome: braid_runtime::RunOutcome) {
        let mut st = self.state();
        match outcome {
            braid_runtime::RunOutcome::Finished { result, checkpoint } => {
                if !self.commit(&mut st, id, run, checkpoint) {
                    return;
                }
                let f = st.flows.get_mut(&id).expect("committed");
                f.live = None;
                f.inbox.clear();
                f.outcome = match result {
                    Ok(json) => Outcome::Completed(
                        serde_json::from_str(&json).unwrap_or(serde_json::Value::String(json)),
                    ),
                    Err(e) => Outcome::Failed(e),
                };
            }
            braid_runtime::RunOutcome::Evicted { .. } => {
                unreachable!("the test network never evicts a flow")
            }
            braid_runtime::RunOutcome::Fault(why) => {
                if let Some(f) = st.flows.get_mut(&id)
                    && f.live.as_ref().is_some_and(|l| l.run == run)
                {
                    f.live = None;
                    f.outcome = Outcome::Failed(FlowFailure {
                        kind: FailureKind::Trap,
                        message: format!("host fault in the test network: {why}"),
                    });
                }
            }
        }
        self.changed.notify_one();
    }

    /// Whether every live flow waits (for an event, or a deadline not yet
    /// reached).
    fn all_waiting(&self, st: &State) -> bool {
        let now = self.now_millis();
        st.flows
            .values()
            .filter_map(|f| f.live.as_ref())
            .all(|l| match l.waiting {
                None => false,
                Some(None) => true,
                Some(Some(deadline)) => deadline > now,
            })
    }

    /// Delivers one message in flight, chosen by the seed, if every flow
    /// waits and one may go; true if it did.
    fn deliver_one(this: &Arc<Shared>, st: &mut State) -> bool {
        if !this.all_waiting(st) {
            return false;
        }
        let now = this.now_millis();
        // In a canonical order (by message key), not in the order the
        // flows' checkpoints happened to come in: the seed alone decides.
        let mut ready: Vec<(Vec<u8>, usize)> = st
            .in_flight
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.not_before_ms <= now && {
                    let dest = m.message.destination_flow();
                    st.flows.contains_key(&dest) || m.message.init.is_some()
                }
            })
            .map(|(i, m)| (m.message.key(), i))
            .collect();
        if ready.is_empty() {
            return false;
        }
        ready.sort();
        let pick = ready[st.rng.below(ready.len())].1;
        let m = st.in_flight.remove(pick).message;
        Shared::deliver(this, st, m);
        true
    }

    fn deliver(this: &Arc<Shared>, st: &mut State, m: SessionMessage) {
        let dest = m.destination_flow();
        if let Some(f) = st.flows.get_mut(&dest) {
            if f.outcome != Outcome::Running || f.inbox.iter().any(|x| x.key() == m.key()) {
                return; // ended, or a duplicate
            }
            f.inbox.push(m.clone());
            if let Some(l) = f.live.as_mut() {
                l.waiting = None;
                let _ = l.events.send(Event::Message(m));
            }
            return;
        }
        let Some(p) = st.parties.get(&m.to.holding) else {
            return; // not a party: nobody hears it
        };
        let init = m.init.clone().expect("checked by deliver_one");
        let Some((flow_name, version)) = p.package.responder_for(&init.protocol, &init.versions)
        else {
            let reply = m.fault_reply(SessionFault::ProtocolUnsupported(format!(
                "{} has no responder for protocol {:?} versions {:?}",
                p.party.name(),
                init.protocol,
                init.versions
            )));
            let now = this.now_millis();
            st.in_flight.push(InFlight {
                message: reply,
                not_before_ms: now,
            });
            return;
        };
        let seed = st.rng.next();
        st.flows.insert(
            dest,
            FlowState {
                holding: m.to.holding,
                flow_name,
                start: FlowStart::Responder {
                    session: m.session,
                    initiator: m.from.clone(),
                    protocol: init.protocol.clone(),
                    version,
                },
                seed,
                created_ms: this.now_millis(),
                journal: Vec::new(),
                inbox: vec![m],
                outcome: Outcome::Running,
                live: None,
                runs: 0,
            },
        );
        Shared::spawn(this, st, dest);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let mut st = self.shared.state();
        for f in st.flows.values_mut() {
            if let Some(l) = f.live.take() {
                l.task.abort();
            }
        }
    }
}
