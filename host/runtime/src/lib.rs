//! The wasmtime engine that runs flow packages.
//!
//! It knows neither bus nor storage: it takes a package, a flow's journal
//! and its queued messages, runs the flow (replaying the journal first) and
//! reports, through [`FlowEnv::checkpoint`], each suspension's new journal
//! entries and outbound messages; at the end it returns the result and the
//! last checkpoint. The flow worker decides what to commit and when to send.
//!
//! Sandboxing: the pooling allocator with a per-flow memory budget that
//! covers the flow's linear memory *and* everything the host holds on its
//! behalf (checked before the host allocates), a wasm stack limit, a CPU
//! budget that charges the CPU time of the flow's own code (thread CPU
//! clock, not wall time) enforced with epoch interruption (a busy flow
//! yields every tick so it cannot starve the others), a bound on host calls
//! between suspensions and on the journal's size, bounded results, error
//! texts and log volume, NaN canonicalisation and deterministic relaxed
//! SIMD, no threads, and WASI imports that are present but virtual: no
//! files, environment, arguments or sockets; clocks that show the flow's
//! journaled time, with clock waits turned into durable sleeps; randomness
//! seeded per flow. A kill stops a flow whatever it is doing: at its next
//! host call, suspension or epoch tick once its replay is over.

mod budget;
pub mod describe;
mod flow;
pub mod journal;
mod wasi;

use anyhow::Context as _;
use braid_types::{
    Checksum, FailureKind, FlowFailure, FlowId, FlowInfo, FlowStart, HoldingId, Protocol,
    SessionMessage, X500Name,
};
use budget::{CpuMeter, LogBucket, MemBudget, Metered};
use flow::{FlowState, Stop, bounded_text};
use journal::Entry;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "flow-package",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// How often the epoch advances: the preemption and CPU-accounting tick.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Per-flow limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Memory budget per flow instance, bytes: its linear memory plus what
    /// the host holds for it (uncommitted journal entries, outbound and
    /// unread messages, sessions).
    pub memory_bytes: usize,
    /// Wasm stack limit, bytes.
    pub stack_bytes: usize,
    /// CPU time the flow's own code may use in one instance (replay
    /// included).
    pub cpu_budget: Duration,
    /// Messages a flow may send between two checkpoints.
    pub max_outbound_per_checkpoint: usize,
    /// Host calls (braid's and WASI's) a flow may make between two
    /// suspensions.
    pub max_host_calls_per_checkpoint: usize,
    /// Largest message payload.
    pub max_message_bytes: usize,
    /// Largest journal (all entries a flow ever recorded), bytes.
    pub max_journal_bytes: usize,
    /// Largest JSON result a flow may return, bytes.
    pub max_result_bytes: usize,
    /// Longest failure text kept for a flow, bytes (longer ones are cut).
    pub max_error_bytes: usize,
    /// Log text one flow may write per second, bytes (bursts up to four
    /// times that); lines beyond are dropped and counted.
    pub log_bytes_per_sec: usize,
    /// How long `receive` waits before `timed-out`.
    pub session_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            stack_bytes: 512 << 10,
            cpu_budget: Duration::from_secs(10),
            max_outbound_per_checkpoint: 10_000,
            max_host_calls_per_checkpoint: 1_000_000,
            max_message_bytes: 1 << 20,
            max_journal_bytes: 256 << 20,
            max_result_bytes: 1 << 20,
            max_error_bytes: 4 << 10,
            log_bytes_per_sec: 16 << 10,
            session_timeout: Duration::from_secs(600),
        }
    }
}

/// Log text all flows of a node together may write per second, bytes.
const NODE_LOG_BYTES_PER_SEC: usize = 1 << 20;
/// CPU time `describe` may use.
const DESCRIBE_CPU: Duration = Duration::from_secs(2);
/// Wall-clock time `describe` may take (it cannot wait on anything, so
/// this only matters on a machine that is very busy).
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Host resources (pollables, streams...) a flow may hold at once.
const MAX_RESOURCES: usize = 10_000;

/// Engine configuration.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Per-flow limits.
    pub limits: Limits,
    /// Flow instances that may exist at once (sizes the instance pool).
    pub max_instances: u32,
    /// Where compiled components are cached, by checksum.
    pub cache_dir: PathBuf,
}

/// Something went wrong loading a package.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The bytes are not a valid component, or it does not fit braid's
    /// contract (imports the host does not provide, missing exports).
    #[error("invalid package: {0}")]
    InvalidPackage(String),
    /// The engine could not be set up.
    #[error("engine: {0}")]
    Engine(String),
}

/// What a suspension hands to the environment to commit.
#[derive(Debug, Default, Clone)]
pub struct Checkpoint {
    /// Index of the first new entry.
    pub first_index: u32,
    /// New journal entries, encoded.
    pub entries: Vec<Vec<u8>>,
    /// New outbound messages, to commit to the outbox and release after.
    pub outbound: Vec<SessionMessage>,
    /// Inbox keys consumed.
    pub consumed: Vec<Vec<u8>>,
    /// When to wake the flow if nothing arrives.
    pub wake_at_ms: Option<u64>,
}

/// What a running flow needs from its worker.
#[async_trait::async_trait]
pub trait FlowEnv: Send + Sync + 'static {
    /// Durably commits a suspension's checkpoint and then releases its
    /// outbound messages. An error is a host fault.
    async fn checkpoint(&self, flow: FlowId, cp: Checkpoint) -> anyhow::Result<()>;
    /// The holding id of a counterparty, if it is a known member.
    fn resolve(&self, name: &X500Name) -> Option<HoldingId>;
    /// [`resolve`](Self::resolve) for a name it did not know, after
    /// catching up with membership changes the worker may not have seen
    /// yet (a vnode created through another worker a moment ago). Asked
    /// only live, before the answer is journaled.
    async fn resolve_fresh(&self, name: &X500Name) -> Option<HoldingId> {
        self.resolve(name)
    }
    /// The holding id `name` has in this network, member or not (replay
    /// rebuilds sessions with members that have since left).
    fn derive(&self, name: &X500Name) -> HoldingId {
        HoldingId::derive(name, "")
    }
    /// The wall clock flows see live (ms since the Unix epoch): what
    /// `now-millis` returns, and what sleeps and session timeouts are
    /// measured on. Waits are `tokio::time` sleeps, so a clock that moves
    /// with tokio's (paused, in tests) makes virtual time.
    fn now_millis(&self) -> u64 {
        braid_types::now_millis()
    }
    /// Whether the flow is only to be replayed (checking new code against
    /// its journal): its first call past the journal ends the run as
    /// [`RunOutcome::Evicted`], nothing live is done.
    fn replay_only(&self) -> bool {
        false
    }
}

/// Delivered to a live flow.
#[derive(Debug)]
pub enum Event {
    /// A message, already durable in the flow's inbox.
    Message(SessionMessage),
    /// Unload at the next suspension; the flow resumes later by replay.
    Evict,
    /// Stop the flow as KILLED.
    Kill(String),
}

/// Everything needed to run (or resume) one flow.
#[derive(Debug)]
pub struct FlowInput {
    /// Flow id.
    pub id: FlowId,
    /// Its vnode.
    pub holding: HoldingId,
    /// Its vnode's name.
    pub name: X500Name,
    /// The flow to run.
    pub flow_name: String,
    /// How it started.
    pub start: FlowStart,
    /// Seed for WASI randomness.
    pub seed: u64,
    /// Creation time (initial virtual time).
    pub created_ms: u64,
    /// Committed journal, encoded.
    pub journal: Vec<Vec<u8>>,
    /// Messages waiting in the inbox.
    pub inbox: Vec<SessionMessage>,
    /// Set (once, with the reason) to kill the flow; the worker keeps a
    /// clone and may set it while the flow runs.
    pub kill: Arc<OnceLock<String>>,
}

/// How a run ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// The flow ended; commit `checkpoint` with the result.
    Finished {
        /// JSON result or failure.
        result: Result<String, FlowFailure>,
        /// Everything not yet committed, plus closes/errors for open sessions.
        checkpoint: Checkpoint,
    },
    /// The flow was unloaded at a suspension (its state is committed).
    Evicted {
        /// A message arrived that it did not consume: resume it soon.
        pending_delivery: bool,
        /// When it wants to be woken.
        wake_at_ms: Option<u64>,
    },
    /// A host fault (store down, ...): nothing was committed past the last
    /// checkpoint; retry later.
    Fault(String),
}

/// A compiled package, ready to instantiate.
pub struct Package {
    pre: bindings::FlowPackagePre<FlowCtx>,
    /// What the package offers.
    pub flows: Vec<FlowInfo>,
}

impl Package {
    /// The responder flow for `protocol` speaking one of `versions`, and
    /// the version agreed (the highest common one).
    pub fn responder_for(&self, protocol: &str, versions: &[u32]) -> Option<(String, u32)> {
        self.flows.iter().find_map(|f| {
            let p = f.responds_to.as_ref()?;
            if p.name != protocol {
                return None;
            }
            let v = p.versions.iter().filter(|v| versions.contains(v)).max()?;
            Some((f.name.clone(), *v))
        })
    }
}

/// Store data of one flow instance.
pub struct FlowCtx {
    wasi: WasiCtx,
    table: ResourceTable,
    st: FlowState,
}

impl WasiView for FlowCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The wall clock WASI shows a flow: its journaled virtual time.
struct VirtualWall(Arc<AtomicU64>);

impl wasmtime_wasi::HostWallClock for VirtualWall {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

/// The engine and its package cache.
pub struct Runtime {
    engine: Engine,
    linker: Linker<FlowCtx>,
    config: RuntimeConfig,
    packages: Mutex<HashMap<Checksum, Arc<Package>>>,
    /// Log volume of all flows together.
    node_log: Arc<Mutex<LogBucket>>,
}

/// The environment used while asking a package what it offers: it never
/// suspends (describe must not call the host).
struct NoEnv;

#[async_trait::async_trait]
impl FlowEnv for NoEnv {
    async fn checkpoint(&self, _: FlowId, _: Checkpoint) -> anyhow::Result<()> {
        anyhow::bail!("describe() may not suspend")
    }
    fn resolve(&self, _: &X500Name) -> Option<HoldingId> {
        None
    }
}

impl Runtime {
    /// Builds the engine, the linker and the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let l = &config.limits;
        let mut cfg = wasmtime::Config::new();
        cfg.wasm_component_model(true)
            .epoch_interruption(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            // No `threads` feature is compiled in: shared memory and atomics
            // waits are rejected at validation.
            .max_wasm_stack(l.stack_bytes)
            // The async (fiber) stack holds the wasm stack plus host frames.
            .async_stack_size(l.stack_bytes + (256 << 10))
            // A trap then carries the store's globals, which tell a shadow
            // stack overflow from any other out-of-bounds access.
            .coredump_on_trap(true);
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        let n = config.max_instances.max(8);
        pool.total_component_instances(n)
            .total_core_instances(n * 8)
            .total_memories(n * 2)
            .total_tables(n * 4)
            .total_stacks(n)
            .max_memory_size(l.memory_bytes);
        cfg.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        cfg.memory_reservation(l.memory_bytes as u64)
            .memory_guard_size(64 << 10);
        let engine = Engine::new(&cfg).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        wasi::shadow_blocking_imports(&mut linker)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        bindings::FlowPackage::add_to_linker::<FlowCtx, HasSelf<FlowCtx>>(&mut linker, |c| c)
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("braid-epoch".into())
            .spawn(move || {
                while let Some(e) = weak.upgrade() {
                    e.increment_epoch();
                    drop(e);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        std::fs::create_dir_all(&config.cache_dir)
            .map_err(|e| RuntimeError::Engine(format!("cache dir: {e}")))?;
        Ok(Runtime {
            engine,
            linker,
            config,
            packages: Mutex::new(HashMap::new()),
            node_log: Arc::new(Mutex::new(LogBucket::new(
                NODE_LOG_BYTES_PER_SEC,
                NODE_LOG_BYTES_PER_SEC * 4,
            ))),
        })
    }

    /// The limits flows run under.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// A package already loaded.
    pub fn cached(&self, checksum: &Checksum) -> Option<Arc<Package>> {
        self.packages
            .lock()
            .expect("package cache lock")
            .get(checksum)
            .cloned()
    }

    /// Compiles (or loads the cached compilation of) a package, checks it
    /// is a braid flow package and learns its flows.
    pub async fn load(
        &self,
        checksum: Checksum,
        bytes: &[u8],
    ) -> Result<Arc<Package>, RuntimeError> {
        if let Some(p) = self.cached(&checksum) {
            return Ok(p);
        }
        let component = self.compile(checksum, bytes).await?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| RuntimeError::InvalidPackage(format!("{e:#}")))?;
        let pre = bindings::FlowPackagePre::new(pre).map_err(|e| {
            RuntimeError::InvalidPackage(format!("not a braid flow package: {e:#}"))
        })?;
        let flows = self.describe(&pre).await?;
        let pkg = Arc::new(Package { pre, flows });
        self.packages
            .lock()
            .expect("package cache lock")
            .insert(checksum, pkg.clone());
        Ok(pkg)
    }

    async fn compile(&self, checksum: Checksum, bytes: &[u8]) -> Result<Component, RuntimeError> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        let path = self
            .config
            .cache_dir
            .join(format!("{checksum}-{:016x}.cwasm", h.finish()));
        if path.exists() {
            match load_cached(&self.engine, &path) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(path = %path.display(), cause = %e, "ignoring unusable compiled package cache entry")
                }
            }
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(RuntimeError::InvalidPackage(
                "not a WebAssembly binary (missing \\0asm magic)".into(),
            ));
        }
        let engine = self.engine.clone();
        let owned = bytes.to_vec();
        let component = tokio::task::spawn_blocking(move || Component::new(&engine, &owned))
            .await
            .map_err(|e| RuntimeError::Engine(e.to_string()))?
            .map_err(|e| RuntimeError::InvalidPackage(format!("{e:#}")))?;
        match component.serialize() {
            Ok(ser) => {
                let tmp = path.with_extension("tmp");
                if let Err(e) = std::fs::write(&tmp, ser).and_then(|_| std::fs::rename(&tmp, &path))
                {
                    tracing::warn!(cause = %e, "could not cache compiled package");
                }
            }
            Err(e) => tracing::warn!(cause = %e, "could not serialise compiled package"),
        }
        Ok(component)
    }

    fn new_store(&self, st: FlowState, cpu_budget: Duration) -> Store<FlowCtx> {
        let mut b = WasiCtx::builder();
        b.wall_clock(VirtualWall(st.virtual_now.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let ctx = FlowCtx {
            wasi: b.build(),
            table,
            st,
        };
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|c| &mut c.st.mem);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            let st = &mut ctx.data_mut().st;
            if st.cpu.used() > cpu_budget {
                return Err(st.halt(Stop::Cpu));
            }
            // A kill takes effect once replay is over (so every session
            // the flow had is known and told).
            if !st.replaying()
                && let Some(why) = st.kill.get()
            {
                let why = why.clone();
                return Err(st.halt(Stop::Killed(why)));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }

    fn state(
        &self,
        input: &FlowInput,
        env: Arc<dyn FlowEnv>,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> anyhow::Result<FlowState> {
        use rand::SeedableRng;
        let l = &self.config.limits;
        let journal_bytes: usize = input.journal.iter().map(Vec::len).sum();
        let journal = input
            .journal
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Entry::decode(b)
                    .with_context(|| format!("journal entry {i} of flow {} is corrupt", input.id))
            })
            .collect::<anyhow::Result<VecDeque<_>>>()?;
        let loaded = journal.len();
        let mut st = FlowState {
            id: input.id,
            holding: input.holding,
            name: input.name.clone(),
            created_ms: input.created_ms,
            seed: input.seed,
            journal,
            base: 0,
            cursor: 0,
            loaded,
            committed: loaded,
            journal_bytes,
            outbound: Vec::new(),
            consumed: Vec::new(),
            pending_bytes: 0,
            sessions: HashMap::new(),
            by_session: HashMap::new(),
            next_handle: 1,
            inbox: HashMap::new(),
            events,
            env,
            limits: l.clone(),
            stop: None,
            panic_message: None,
            virtual_now: Arc::new(AtomicU64::new(input.created_ms)),
            wake_at: None,
            pending_delivery: false,
            mem: MemBudget::new(l.memory_bytes),
            cpu: Arc::new(CpuMeter::default()),
            kill: input.kill.clone(),
            calls: 0,
            log: LogBucket::new(l.log_bytes_per_sec, l.log_bytes_per_sec.saturating_mul(4)),
            node_log: self.node_log.clone(),
            deadlines: HashMap::new(),
            wasi_rng: rand::rngs::StdRng::seed_from_u64(input.seed),
            wasi_insecure_rng: rand::rngs::StdRng::seed_from_u64(input.seed ^ 0x5eed),
        };
        st.open_responder_session(&input.start);
        for m in &input.inbox {
            st.accept(m.clone());
        }
        Ok(st)
    }

    async fn describe(
        &self,
        pre: &bindings::FlowPackagePre<FlowCtx>,
    ) -> Result<Vec<FlowInfo>, RuntimeError> {
        let (_tx, rx) = mpsc::unbounded_channel();
        let name: X500Name = "O=Describe, L=Nowhere, C=GB".parse().expect("valid");
        let input = FlowInput {
            id: FlowId::from_bytes([0; 16]),
            holding: HoldingId::derive(&name, ""),
            name,
            flow_name: String::new(),
            start: FlowStart::Client {
                client_request_id: "describe".parse().expect("valid"),
                request_body: "null".into(),
            },
            seed: 0,
            created_ms: 0,
            journal: vec![],
            inbox: vec![],
            kill: Arc::new(OnceLock::new()),
        };
        let st = self
            .state(&input, Arc::new(NoEnv), rx)
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        let cpu = st.cpu.clone();
        let mut store = self.new_store(st, DESCRIBE_CPU.min(self.config.limits.cpu_budget));
        let call = async {
            let inst = pre.instantiate_async(&mut store).await?;
            inst.braid_flow_guest().call_describe(&mut store).await
        };
        let outcome = tokio::time::timeout(DESCRIBE_TIMEOUT, Metered::new(call, cpu)).await;
        let flows = match outcome {
            Err(_) => {
                return Err(RuntimeError::InvalidPackage(format!(
                    "describe() did not return within {} s",
                    DESCRIBE_TIMEOUT.as_secs()
                )));
            }
            Ok(Ok(flows)) => flows,
            Ok(Err(err)) => {
                let why = match &store.data().st.stop {
                    Some(Stop::Cpu) => format!(
                        "describe() used more than {} ms of CPU time",
                        DESCRIBE_CPU.min(self.config.limits.cpu_budget).as_millis()
                    ),
                    Some(Stop::Fault(_)) | Some(Stop::Refused(_)) => {
                        "describe() tried to wait (sleep, receive or a WASI clock wait); it must \
                         only list the package's flows"
                            .to_string()
                    }
                    Some(Stop::Memory(m)) => format!("describe() hit its {m}"),
                    _ if store.data().st.mem.hit.is_some() => {
                        "describe() exceeded the flow memory limit".to_string()
                    }
                    _ => format!("describe() failed: {}", root_cause(&err)),
                };
                return Err(RuntimeError::InvalidPackage(why));
            }
        };
        let flows: Vec<FlowInfo> = flows
            .into_iter()
            .map(|f| FlowInfo {
                name: f.name,
                startable: f.startable,
                initiates: f.initiates.map(|p| Protocol {
                    name: p.name,
                    versions: p.versions,
                }),
                responds_to: f.responds_to.map(|p| Protocol {
                    name: p.name,
                    versions: p.versions,
                }),
            })
            .collect();
        describe::validate(&flows).map_err(RuntimeError::InvalidPackage)?;
        Ok(flows)
    }

    /// Runs a flow: replays its journal, then continues live until it ends
    /// or is evicted. Suspensions are committed through `env`.
    pub async fn run(
        &self,
        package: Arc<Package>,
        input: FlowInput,
        env: Arc<dyn FlowEnv>,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> RunOutcome {
        let l = &self.config.limits;
        let st = match self.state(&input, env, events) {
            Ok(s) => s,
            Err(e) => {
                return RunOutcome::Finished {
                    result: Err(FlowFailure {
                        kind: FailureKind::Trap,
                        message: format!("{e:#}"),
                    }),
                    checkpoint: Checkpoint::default(),
                };
            }
        };
        let cpu = st.cpu.clone();
        let mut store = self.new_store(st, l.cpu_budget);
        let start = match &input.start {
            FlowStart::Client { request_body, .. } => {
                bindings::exports::braid::flow::guest::Start::Client(request_body.clone())
            }
            FlowStart::Responder { .. } => {
                bindings::exports::braid::flow::guest::Start::Responder(1)
            }
        };
        let call = async {
            let inst = package.pre.instantiate_async(&mut store).await?;
            inst.braid_flow_guest()
                .call_run(&mut store, &input.flow_name, &start)
                .await
        };
        let outcome = Metered::new(call, cpu).await;
        let overflowed = match &outcome {
            Err(err) => shadow_stack_overflowed(&mut store, err),
            Ok(_) => false,
        };
        let st = &mut store.data_mut().st;
        let mem_hit = st.mem.hit.clone();
        let memory_failure = |m: Option<String>| FlowFailure {
            kind: FailureKind::MemoryLimit,
            message: m.unwrap_or_else(|| {
                format!(
                    "memory limit exceeded: the flow went beyond its {} MiB budget",
                    l.memory_bytes >> 20
                )
            }),
        };
        let result = match outcome {
            Ok(Ok(json)) if json.len() > l.max_result_bytes => Err(FlowFailure {
                kind: FailureKind::ResultLimit,
                message: format!(
                    "result limit exceeded: the flow returned a result of {} bytes, more than \
                     the {} bytes a result may have",
                    json.len(),
                    l.max_result_bytes
                ),
            }),
            Ok(Ok(json)) => Ok(json),
            Ok(Err(reason)) => Err(FlowFailure {
                kind: FailureKind::FlowFailed,
                message: reason,
            }),
            Err(err) => match st.stop.clone() {
                Some(Stop::Evicted) => {
                    return RunOutcome::Evicted {
                        pending_delivery: st.pending_delivery,
                        wake_at_ms: st.wake_at,
                    };
                }
                Some(Stop::Fault(f)) => return RunOutcome::Fault(f),
                Some(Stop::Killed(why)) => Err(FlowFailure {
                    kind: FailureKind::Killed,
                    message: why,
                }),
                Some(Stop::NonDeterminism(m)) => Err(FlowFailure {
                    kind: FailureKind::NonDeterminism,
                    message: m,
                }),
                Some(Stop::Cpu) => Err(FlowFailure {
                    kind: FailureKind::CpuLimit,
                    message: format!(
                        "CPU budget exceeded: the flow's code used more than {} ms of CPU time",
                        l.cpu_budget.as_millis()
                    ),
                }),
                Some(Stop::Outbound) => Err(FlowFailure {
                    kind: FailureKind::OutboundLimit,
                    message: format!(
                        "outbound message limit exceeded: more than {} messages sent without suspending",
                        l.max_outbound_per_checkpoint
                    ),
                }),
                Some(Stop::HostCalls) => Err(FlowFailure {
                    kind: FailureKind::HostCallLimit,
                    message: format!(
                        "host-call limit exceeded: more than {} host calls without suspending \
                         (each call to braid or WASI counts; a receive or sleep that waits \
                         starts a new count)",
                        l.max_host_calls_per_checkpoint
                    ),
                }),
                Some(Stop::Journal(m)) => Err(FlowFailure {
                    kind: FailureKind::JournalLimit,
                    message: m,
                }),
                Some(Stop::Memory(m)) => Err(memory_failure(Some(m))),
                Some(Stop::Refused(m)) => Err(FlowFailure {
                    kind: FailureKind::Trap,
                    message: m,
                }),
                None if mem_hit.is_some() => Err(memory_failure(mem_hit.clone())),
                None if overflowed
                    || err.downcast_ref::<wasmtime::Trap>()
                        == Some(&wasmtime::Trap::StackOverflow) =>
                {
                    Err(FlowFailure {
                        kind: FailureKind::StackLimit,
                        message: if overflowed {
                            "stack limit exceeded: the flow overflowed its shadow stack (the \
                             stack its compiler keeps in linear memory, 1 MiB for Rust by \
                             default; build with a larger `-z stack-size` or recurse less)"
                                .to_string()
                        } else {
                            format!(
                                "stack limit exceeded: the flow overflowed its {} KiB wasm stack",
                                l.stack_bytes >> 10
                            )
                        },
                    })
                }
                None => Err(FlowFailure {
                    kind: FailureKind::Trap,
                    message: match &st.panic_message {
                        Some(p) => format!("the flow panicked: {p}"),
                        None => format!("the flow trapped: {}", root_cause(&err)),
                    },
                }),
            },
        };
        // The memory limit is reported even if the guest turned the failed
        // allocation into its own abort.
        let result = match result {
            Err(f) if mem_hit.is_some() && f.kind == FailureKind::Trap => {
                Err(memory_failure(mem_hit))
            }
            r => r,
        };
        // A kill requested before the end is committed wins over the end.
        let result = match (result, st.kill.get()) {
            (Err(f), _) if f.kind == FailureKind::Killed => Err(f),
            (_, Some(why)) => Err(FlowFailure {
                kind: FailureKind::Killed,
                message: why.clone(),
            }),
            (r, None) => r,
        };
        let result = result.map_err(|f| FlowFailure {
            message: bounded_text(&f.message, l.max_error_bytes),
            ..f
        });
        st.end_sessions(result.as_ref().err().map(|f| f.message.as_str()));
        st.wake_at = None;
        RunOutcome::Finished {
            result,
            checkpoint: st.take_checkpoint(),
        }
    }
}

/// Whether a trap came from overflowing the shadow stack: compilers for
/// wasm32 keep the stack in linear memory below a `__stack_pointer`
/// global, and Rust puts that stack first, so an overflow wraps the
/// pointer past the end of memory and the next access traps as out of
/// bounds. The core dump of the trap holds the globals.
fn shadow_stack_overflowed(store: &mut Store<FlowCtx>, err: &wasmtime::Error) -> bool {
    use wasmtime::{Mutability, Val, ValType};
    if err.downcast_ref::<wasmtime::Trap>() != Some(&wasmtime::Trap::MemoryOutOfBounds) {
        return false;
    }
    let Some(dump) = err.downcast_ref::<wasmtime::WasmCoreDump>() else {
        return false;
    };
    let largest = dump
        .memories()
        .iter()
        .map(|m| m.data_size(&*store))
        .max()
        .unwrap_or(0);
    dump.globals().iter().any(|g| {
        let ty = g.ty(&*store);
        ty.mutability() == Mutability::Var
            && matches!(ty.content(), ValType::I32)
            && matches!(g.get(&mut *store), Val::I32(v) if (v as u32 as usize) > largest)
    })
}

fn root_cause(err: &wasmtime::Error) -> String {
    if let Some(t) = err.downcast_ref::<wasmtime::Trap>() {
        return t.to_string();
    }
    format!("{err:#}")
}

#[allow(unsafe_code)]
fn load_cached(engine: &Engine, path: &std::path::Path) -> anyhow::Result<Component> {
    // SAFETY: the file was written by `Component::serialize` of this
    // engine configuration (the name carries the engine's compatibility
    // hash) into the node's own data directory.
    let c = unsafe { Component::deserialize_file(engine, path) }?;
    Ok(c)
}
