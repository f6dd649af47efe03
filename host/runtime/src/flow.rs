//! One flow's host-side state and the host functions it calls.
//!
//! Each call either replays the next journal entry (checking that it is
//! the same call) or, past the end of the journal, does the work and
//! appends the outcome. A call that must wait (`receive` with nothing
//! queued, `sleep`, a WASI clock wait) first asks the environment to commit
//! the checkpoint, then waits for an event.
//!
//! Everything the host keeps for the flow (new journal entries, outbound
//! messages, delivered messages, sessions) is charged to the flow's memory
//! budget before it is allocated; journal entries that are committed or
//! replayed are dropped from memory.

use crate::bindings::braid::flow::{host, types};
use crate::budget::{CpuMeter, LogBucket, MemBudget};
use crate::journal::{Entry, SessErr, digest};
use crate::{Checkpoint, Event, FlowEnv, Limits};
use braid_types::{
    Body, Endpoint, FlowId, FlowStart, HoldingId, SessionFault, SessionId, SessionInit,
    SessionMessage, Side, X500Name,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Longest protocol name `initiate` accepts.
pub(crate) const MAX_PROTOCOL_NAME: usize = 128;
/// Most protocol versions `initiate` accepts.
pub(crate) const MAX_VERSIONS: usize = 64;
/// Longest log line kept (characters).
const MAX_LOG_CHARS: usize = 4096;
/// Longest failure text sent to each counterparty when a flow fails.
const MAX_SESSION_ERROR_BYTES: usize = 1024;
/// Host bytes charged per session beyond its names and versions.
const SESSION_OVERHEAD: usize = 256;
/// Host bytes charged per message beyond its payload.
const MESSAGE_OVERHEAD: usize = 160;

/// Why a flow was stopped from the host side (the trap's cause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    Evicted,
    Killed(String),
    NonDeterminism(String),
    Cpu,
    Outbound,
    Fault(String),
    /// The memory budget; the text says what needed the memory.
    Memory(String),
    /// Too many host calls without suspending.
    HostCalls,
    /// The journal would exceed its size limit.
    Journal(String),
    /// A call the host refuses to carry out in a flow.
    Refused(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flow stopped by host: {self:?}")
    }
}

impl std::error::Error for Stop {}

#[derive(Debug, Clone)]
pub(crate) struct Sess {
    pub id: SessionId,
    pub me: Endpoint,
    pub peer: Endpoint,
    pub protocol: String,
    pub versions: Vec<u32>,
    pub next_send: u64,
    pub next_recv: u64,
    /// Set when the peer's close or error has been consumed.
    pub ended: Option<SessErr>,
    pub closed_by_me: bool,
}

impl Sess {
    fn held_bytes(&self) -> usize {
        SESSION_OVERHEAD
            + self.protocol.len()
            + self.versions.len() * 4
            + self.me.name.as_str().len()
            + self.peer.name.as_str().len()
    }
}

/// Host bytes a message occupies while the host holds it for a flow.
pub(crate) fn message_bytes(m: &SessionMessage) -> usize {
    let body = match &m.body {
        Body::Data(p) => p.len(),
        Body::Close => 0,
        Body::Error(f) => match f {
            SessionFault::CounterpartyFailed(s)
            | SessionFault::ProtocolUnsupported(s)
            | SessionFault::Undeliverable(s) => s.len(),
        },
    };
    let init = m
        .init
        .as_ref()
        .map_or(0, |i| i.protocol.len() + i.versions.len() * 4);
    MESSAGE_OVERHEAD + body + init + m.from.name.as_str().len() + m.to.name.as_str().len()
}

/// The part of `s` that fits in `max` bytes, cut at a character boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` cut to `max` bytes, saying how much was cut.
pub(crate) fn bounded_text(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let note = format!(" ... ({} more bytes cut)", s.len() - max);
    let keep = truncate_str(s, max.saturating_sub(note.len()));
    format!("{keep}{note}")
}

pub(crate) struct FlowState {
    pub id: FlowId,
    pub holding: HoldingId,
    pub name: X500Name,
    pub created_ms: u64,
    pub seed: u64,
    /// Journal entries not yet replayed (while replaying) or not yet
    /// committed (live); `journal[0]` has absolute index `base`.
    pub journal: VecDeque<Entry>,
    pub base: usize,
    /// Absolute index of the next entry a call reads or writes.
    pub cursor: usize,
    /// Entries loaded from the store: calls below this index replay.
    pub loaded: usize,
    /// Entries committed to the store.
    pub committed: usize,
    /// Encoded bytes of the whole journal (committed and new).
    pub journal_bytes: usize,
    pub outbound: Vec<SessionMessage>,
    pub consumed: Vec<Vec<u8>>,
    /// Budget bytes charged for what the next checkpoint hands on.
    pub pending_bytes: usize,
    pub sessions: HashMap<u64, Sess>,
    pub by_session: HashMap<SessionId, u64>,
    pub next_handle: u64,
    /// Delivered, not yet consumed, by session and seq.
    /// Keyed by sequence number and sender: a message claiming another
    /// sender cannot displace the genuine one with the same number.
    pub inbox: HashMap<SessionId, BTreeMap<(u64, HoldingId), SessionMessage>>,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub env: Arc<dyn FlowEnv>,
    pub limits: Limits,
    pub stop: Option<Stop>,
    pub panic_message: Option<String>,
    /// The flow's virtual time: what the WASI clocks show.
    pub virtual_now: Arc<AtomicU64>,
    pub wake_at: Option<u64>,
    /// A message arrived that the flow has not consumed yet.
    pub pending_delivery: bool,
    pub mem: MemBudget,
    pub cpu: Arc<CpuMeter>,
    /// Set (once) when the flow is to be killed; checked at every host
    /// call and epoch tick once replay is over.
    pub kill: Arc<OnceLock<String>>,
    /// Host calls since the last suspension.
    pub calls: usize,
    pub log: LogBucket,
    pub node_log: Arc<Mutex<LogBucket>>,
    /// Clock pollables (by resource rep): their deadlines, virtual ns.
    pub deadlines: HashMap<u32, u64>,
    pub wasi_rng: rand::rngs::StdRng,
    pub wasi_insecure_rng: rand::rngs::StdRng,
}

fn to_wit(e: &SessErr) -> types::SessionError {
    use types::SessionError as W;
    match e.clone() {
        SessErr::CounterpartyUnknown(s) => W::CounterpartyUnknown(s),
        SessErr::ProtocolUnsupported(s) => W::ProtocolUnsupported(s),
        SessErr::Closed => W::Closed,
        SessErr::CounterpartyFailed(s) => W::CounterpartyFailed(s),
        SessErr::TimedOut => W::TimedOut,
        SessErr::InvalidSession => W::InvalidSession,
        SessErr::TooLarge(n) => W::TooLarge(n),
        SessErr::Other(s) => W::Other(s),
    }
}

fn wit_result<T>(r: Result<T, SessErr>) -> Result<T, types::SessionError> {
    r.map_err(|e| to_wit(&e))
}

/// What a `receive` of a message with `body` returns.
fn received(body: Body) -> Result<Vec<u8>, SessErr> {
    match body {
        Body::Data(p) => Ok(p),
        Body::Close => Err(SessErr::Closed),
        Body::Error(SessionFault::CounterpartyFailed(why)) => Err(SessErr::CounterpartyFailed(why)),
        Body::Error(SessionFault::ProtocolUnsupported(why)) => {
            Err(SessErr::ProtocolUnsupported(why))
        }
        Body::Error(SessionFault::Undeliverable(why)) => {
            Err(SessErr::Other(format!("message undeliverable: {why}")))
        }
    }
}

/// What `receive-any` returns: the session that answered, with its message
/// or its error.
type AnyResult = Result<(u64, Vec<u8>), (u64, types::SessionError)>;

fn any_result(handle: u64, r: Result<Vec<u8>, SessErr>) -> AnyResult {
    r.map(|p| (handle, p)).map_err(|e| (handle, to_wit(&e)))
}

impl FlowState {
    pub(crate) fn replaying(&self) -> bool {
        self.cursor < self.loaded
    }

    pub(crate) fn virtual_now_ms(&self) -> u64 {
        self.virtual_now.load(Ordering::Relaxed)
    }

    fn set_virtual_now(&self, ms: u64) {
        self.virtual_now.fetch_max(ms, Ordering::Relaxed);
    }

    /// Every live host call passes here: a pending kill stops the flow,
    /// and the calls between two suspensions are bounded.
    pub(crate) fn count_host_call(&mut self) -> wasmtime::Result<()> {
        if self.replaying() {
            return Ok(());
        }
        if let Some(why) = self.kill.get() {
            let why = why.clone();
            return Err(self.halt(Stop::Killed(why)));
        }
        self.calls += 1;
        if self.calls > self.limits.max_host_calls_per_checkpoint {
            return Err(self.halt(Stop::HostCalls));
        }
        Ok(())
    }

    /// Charges `bytes` to the memory budget, or stops the flow.
    pub(crate) fn charge(&mut self, bytes: usize, what: &str) -> wasmtime::Result<()> {
        match self.mem.charge(bytes, what) {
            Ok(()) => Ok(()),
            Err(why) => Err(self.halt(Stop::Memory(why))),
        }
    }

    /// Takes the next journal entry during replay, or `None` when live.
    /// A call of another kind than the journal holds is a divergence.
    fn replay(&mut self, call: &Call<'_>) -> wasmtime::Result<Option<Entry>> {
        if !self.replaying() {
            if self.env.replay_only() {
                // The journal replayed cleanly up to here: a check stops.
                return Err(self.halt(Stop::Evicted));
            }
            self.count_host_call()?;
            return Ok(None);
        }
        let e = self.journal.pop_front().expect("replaying: entries remain");
        if !call.matches(&e) {
            let msg = format!(
                "replay diverged from the journal at step {}: the journal has {} but the flow called {}; \
                 the package code changed under a running flow or the flow is not deterministic",
                self.cursor,
                e.describe(),
                call.describe()
            );
            return Err(self.halt(Stop::NonDeterminism(msg)));
        }
        self.cursor += 1;
        self.base = self.cursor;
        Ok(Some(e))
    }

    /// Appends a new entry (live only), charging it to the memory budget
    /// and the journal's size limit.
    fn record(&mut self, e: Entry) -> wasmtime::Result<()> {
        let bytes = e.held_bytes();
        if self.journal_bytes.saturating_add(bytes) > self.limits.max_journal_bytes {
            let why = format!(
                "journal limit exceeded: {} would grow the flow's journal beyond {} MiB",
                e.describe(),
                self.limits.max_journal_bytes >> 20
            );
            return Err(self.halt(Stop::Journal(why)));
        }
        self.charge(bytes, &format!("journaling {}", e.describe()))?;
        self.pending_bytes += bytes;
        self.journal_bytes += bytes;
        self.journal.push_back(e);
        self.cursor += 1;
        Ok(())
    }

    pub(crate) fn halt(&mut self, s: Stop) -> wasmtime::Error {
        self.stop = Some(s.clone());
        wasmtime::Error::new(s)
    }

    /// The new journal entries, outbound messages and consumed inbox keys
    /// since the last commit.
    pub(crate) fn take_checkpoint(&mut self) -> Checkpoint {
        let first_index = self.committed as u32;
        let entries = if self.replaying() {
            Vec::new()
        } else {
            let e: Vec<Vec<u8>> = self.journal.drain(..).map(|e| e.encode()).collect();
            self.committed = self.cursor;
            self.base = self.cursor;
            e
        };
        self.mem.release(std::mem::take(&mut self.pending_bytes));
        Checkpoint {
            first_index,
            entries,
            outbound: std::mem::take(&mut self.outbound),
            consumed: std::mem::take(&mut self.consumed),
            wake_at_ms: self.wake_at,
        }
    }

    /// Registers the responder's inbound session as handle 1.
    pub(crate) fn open_responder_session(&mut self, start: &FlowStart) {
        if let FlowStart::Responder {
            session,
            initiator,
            protocol,
            version,
        } = start
        {
            let me = Endpoint {
                holding: self.holding,
                name: self.name.clone(),
                side: Side::Responder,
            };
            let s = Sess {
                id: *session,
                me,
                peer: initiator.clone(),
                protocol: protocol.clone(),
                versions: vec![*version],
                next_send: 1,
                next_recv: 1,
                ended: None,
                closed_by_me: false,
            };
            self.mem.charge_anyway(s.held_bytes());
            self.sessions.insert(1, s);
            self.by_session.insert(*session, 1);
            self.next_handle = 2;
        }
    }

    /// A delivered message: held for the flow until it reads it. It is
    /// durable already, so it is charged even past the budget; the flow
    /// then fails at its next allocation.
    pub(crate) fn accept(&mut self, m: SessionMessage) {
        self.mem.charge_anyway(message_bytes(&m));
        if let Some(old) = self
            .inbox
            .entry(m.session)
            .or_default()
            .insert((m.seq, m.from.holding), m)
        {
            self.mem.release(message_bytes(&old));
        }
    }

    fn consume_key(&mut self, key: Vec<u8>) {
        // Keys are small; they are charged anyway (the message they name
        // was just released).
        let n = key.len() + 24;
        self.mem.charge_anyway(n);
        self.pending_bytes += n;
        self.consumed.push(key);
    }

    fn push_outbound(&mut self, handle: u64, body: Body) -> wasmtime::Result<()> {
        if self.outbound.len() >= self.limits.max_outbound_per_checkpoint {
            return Err(self.halt(Stop::Outbound));
        }
        let s = self.sessions.get_mut(&handle).expect("checked by caller");
        let init = (s.me.side == Side::Initiator && s.next_send == 1).then(|| SessionInit {
            protocol: s.protocol.clone(),
            versions: s.versions.clone(),
        });
        let m = SessionMessage {
            session: s.id,
            from: s.me.clone(),
            to: s.peer.clone(),
            seq: s.next_send,
            init,
            body,
        };
        let bytes = message_bytes(&m);
        self.charge(bytes, "an outbound message")?;
        self.pending_bytes += bytes;
        self.sessions.get_mut(&handle).expect("present").next_send += 1;
        self.outbound.push(m);
        Ok(())
    }

    /// Messages to send when the flow ends: a close (or an error) on every
    /// session this flow has not closed. Each counterparty gets at most
    /// [`MAX_SESSION_ERROR_BYTES`] of the failure text, and only while the
    /// budget has room; past it, a short fixed text.
    pub(crate) fn end_sessions(&mut self, failure: Option<&str>) {
        let mut handles: Vec<u64> = self.sessions.keys().copied().collect();
        handles.sort();
        let full = failure.map(|r| bounded_text(r, MAX_SESSION_ERROR_BYTES));
        for h in handles {
            let s = &self.sessions[&h];
            if s.closed_by_me || (failure.is_none() && s.ended.is_some()) {
                continue;
            }
            let body = match &full {
                None => Body::Close,
                Some(r) if self.mem.room() >= r.len() + MESSAGE_OVERHEAD * 2 => {
                    Body::Error(SessionFault::CounterpartyFailed(r.clone()))
                }
                Some(_) => Body::Error(SessionFault::CounterpartyFailed(
                    "the counterparty flow failed (its reason did not fit in its memory budget; \
                     see its status on its node)"
                        .into(),
                )),
            };
            // Ending messages are never refused by the outbound limit.
            let s = self.sessions.get_mut(&h).expect("present");
            s.closed_by_me = true;
            let init = (s.me.side == Side::Initiator && s.next_send == 1).then(|| SessionInit {
                protocol: s.protocol.clone(),
                versions: s.versions.clone(),
            });
            let m = SessionMessage {
                session: s.id,
                from: s.me.clone(),
                to: s.peer.clone(),
                seq: s.next_send,
                init,
                body,
            };
            s.next_send += 1;
            let bytes = message_bytes(&m);
            self.mem.charge_anyway(bytes);
            self.pending_bytes += bytes;
            self.outbound.push(m);
        }
    }

    /// Commits what is new, then waits for one event. Returns after a
    /// message was queued or the deadline passed.
    async fn suspend(&mut self, deadline_ms: Option<u64>) -> wasmtime::Result<()> {
        if let Some(why) = self.kill.get() {
            let why = why.clone();
            return Err(self.halt(Stop::Killed(why)));
        }
        if self.env.replay_only() {
            // Past the journal (a sleep or receive it ended on): a check
            // stops here.
            return Err(self.halt(Stop::Evicted));
        }
        self.wake_at = deadline_ms;
        let cp = self.take_checkpoint();
        if let Err(e) = self.env.checkpoint(self.id, cp).await {
            return Err(self.halt(Stop::Fault(format!("checkpoint failed: {e:#}"))));
        }
        self.calls = 0;
        self.pending_delivery = false;
        self.wait_event(deadline_ms).await
    }

    async fn wait_event(&mut self, deadline_ms: Option<u64>) -> wasmtime::Result<()> {
        let sleep = async {
            match deadline_ms {
                Some(d) => {
                    let now = self.env.now_millis();
                    tokio::time::sleep(Duration::from_millis(d.saturating_sub(now))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = self.events.recv() => match ev {
                Some(Event::Message(m)) => { self.accept(m); self.pending_delivery = true; Ok(()) }
                Some(Event::Evict) => Err(self.halt(Stop::Evicted)),
                Some(Event::Kill(why)) => Err(self.halt(Stop::Killed(why))),
                None => Err(self.halt(Stop::Evicted)),
            },
            _ = sleep => Ok(()),
        }
    }

    /// A durable sleep until `wake_ms` (wall clock): journaled, so a replay
    /// sees the same wake time; the flow is suspended (killable, evictable)
    /// meanwhile; afterwards the flow's virtual time is the wake time.
    pub(crate) async fn durable_sleep_until(&mut self, wake_ms: u64) -> wasmtime::Result<()> {
        let wake = match self.replay(&Call::Sleep)? {
            Some(Entry::Sleep { wake_at_ms }) => wake_at_ms,
            Some(_) => unreachable!("replay checks the kind"),
            None => {
                self.record(Entry::Sleep {
                    wake_at_ms: wake_ms,
                })?;
                wake_ms
            }
        };
        // Past entries mean the sleep already ended in an earlier run.
        while !self.replaying() && self.env.now_millis() < wake {
            self.suspend(Some(wake)).await?;
        }
        self.set_virtual_now(wake);
        Ok(())
    }

    fn session(&self, handle: u64) -> Result<&Sess, SessErr> {
        self.sessions.get(&handle).ok_or(SessErr::InvalidSession)
    }

    /// The next message for `handle`, if queued; stale duplicates, and
    /// messages from anyone but the session's counterparty, are dropped on
    /// the way. Sequence number 0 is the link manager's notice that the
    /// session is broken; it overtakes whatever is still expected.
    fn take_next(&mut self, handle: u64) -> Option<SessionMessage> {
        let s = self.sessions.get(&handle)?;
        let (id, want, peer) = (s.id, s.next_recv, s.peer.clone());
        loop {
            let q = self.inbox.get_mut(&id)?;
            let (&(seq, _), _) = q.first_key_value()?;
            if seq != 0 && seq > want {
                return None;
            }
            let (_, m) = q.pop_first().expect("non-empty");
            self.mem.release(message_bytes(&m));
            self.consume_key(m.key());
            if seq != 0 && seq < want {
                continue; // a stale duplicate
            }
            if m.from != peer {
                tracing::warn!(
                    flow_id = %self.id,
                    session = %m.session,
                    from = %m.from.name,
                    counterparty = %peer.name,
                    "dropping a message on a session from someone other than its counterparty"
                );
                continue;
            }
            return Some(m);
        }
    }

    /// Applies a receive outcome to the session state (live and replay alike).
    fn apply_receive(&mut self, handle: u64, consumed: bool, result: &Result<Vec<u8>, SessErr>) {
        if let Some(s) = self.sessions.get_mut(&handle)
            && consumed
        {
            s.next_recv += 1;
            if let Err(e) = result {
                s.ended = Some(e.clone());
            }
        }
    }

    /// Writes a line of the flow's log, within its rate limit and the
    /// node's.
    fn write_log(&mut self, level: types::Level, message: &str) {
        let now = Instant::now();
        let Some(mut dropped) = self.log.admit(message.len(), now) else {
            return;
        };
        match self
            .node_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(message.len(), now)
        {
            Some(n) => dropped += n,
            None => return,
        }
        let flow = self.id.to_string();
        if dropped > 0 {
            tracing::warn!(
                flow_id = %flow,
                dropped,
                "{dropped} log lines of flows were dropped: over the log rate limit"
            );
        }
        match level {
            types::Level::Trace => tracing::trace!(flow_id = %flow, "{message}"),
            types::Level::Debug => tracing::debug!(flow_id = %flow, "{message}"),
            types::Level::Info => tracing::info!(flow_id = %flow, "{message}"),
            types::Level::Warn => tracing::warn!(flow_id = %flow, "{message}"),
            types::Level::Error => tracing::error!(flow_id = %flow, "{message}"),
        }
    }
}

/// An argument as journaled: cut one byte past `max`, so a replay compares
/// the same text and an over-long argument still reads as over-long.
fn journaled_arg(s: &str, max: usize) -> String {
    truncate_str(s, max + 1).to_owned()
}

/// Why `initiate` refuses its arguments, if it does.
fn check_initiate_args(protocol: &str, versions: &[u32]) -> Result<(), SessErr> {
    if protocol.is_empty() || protocol.len() > MAX_PROTOCOL_NAME {
        return Err(SessErr::Other(format!(
            "protocol name must be 1 to {MAX_PROTOCOL_NAME} bytes, not {}",
            protocol.len()
        )));
    }
    if versions.is_empty() {
        return Err(SessErr::Other("no protocol versions offered".into()));
    }
    if versions.len() > MAX_VERSIONS {
        return Err(SessErr::Other(format!(
            "at most {MAX_VERSIONS} protocol versions may be offered, not {}",
            versions.len()
        )));
    }
    Ok(())
}

/// A host call as replay checks it against the journal: what the flow
/// asked for, without what the host answered.
pub(crate) enum Call<'a> {
    Initiate {
        counterparty: &'a str,
        protocol: &'a str,
        versions: &'a [u32],
    },
    Send {
        handle: u64,
        digest: u64,
    },
    Receive {
        handle: u64,
    },
    ReceiveAny {
        handles: &'a [u64],
    },
    Close {
        handle: u64,
    },
    Sleep,
    Now,
    Random {
        len: usize,
    },
}

impl Call<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Call::Initiate { .. } => "initiate",
            Call::Send { .. } => "send",
            Call::Receive { .. } => "receive",
            Call::ReceiveAny { .. } => "receive-any",
            Call::Close { .. } => "close",
            Call::Sleep => "sleep",
            Call::Now => "now-millis",
            Call::Random { .. } => "random-bytes",
        }
    }

    /// Whether the journal entry records this same call.
    fn matches(&self, e: &Entry) -> bool {
        if self.kind() != e.call_kind() {
            return false;
        }
        match (self, e) {
            (
                Call::Initiate {
                    counterparty,
                    protocol,
                    versions,
                },
                Entry::Initiate {
                    counterparty: a,
                    protocol: p,
                    versions: v,
                    ..
                },
            ) => counterparty == a && protocol == p && versions == &v.as_slice(),
            (
                Call::Send { handle, digest },
                Entry::Send {
                    handle: a,
                    digest: d,
                    ..
                }
                | Entry::Sent {
                    handle: a,
                    digest: d,
                    ..
                },
            ) => handle == a && digest == d,
            (Call::Receive { handle }, Entry::Receive { handle: a, .. })
            | (Call::Receive { handle }, Entry::Received { handle: a, .. }) => handle == a,
            (Call::ReceiveAny { handles }, Entry::ReceivedAny { handles: a, .. }) => {
                *handles == a.as_slice()
            }
            (Call::Close { handle }, Entry::Close { handle: a, .. }) => handle == a,
            (Call::Random { len }, Entry::Random { bytes }) => *len == bytes.len(),
            _ => true,
        }
    }

    fn describe(&self) -> String {
        match self {
            Call::Initiate {
                counterparty,
                protocol,
                ..
            } => format!("initiate({counterparty:?}, {protocol:?})"),
            Call::Send { handle, .. } => format!("send(session {handle})"),
            Call::Receive { handle } => format!("receive(session {handle})"),
            Call::ReceiveAny { handles } => format!("receive-any(sessions {handles:?})"),
            Call::Close { handle } => format!("close(session {handle})"),
            Call::Sleep => "sleep".into(),
            Call::Now => "now-millis".into(),
            Call::Random { len } => format!("random-bytes({len})"),
        }
    }
}

impl types::Host for crate::FlowCtx {}

impl host::Host for crate::FlowCtx {
    async fn initiate(
        &mut self,
        counterparty: String,
        protocol: String,
        versions: Vec<u32>,
    ) -> wasmtime::Result<Result<u64, types::SessionError>> {
        let st = &mut self.st;
        // Checked on the arguments as passed; what is journaled (and
        // compared in replay) is bounded whatever the flow passes.
        let args_ok = check_initiate_args(&protocol, &versions);
        let counterparty = journaled_arg(&counterparty, 512);
        let protocol = journaled_arg(&protocol, MAX_PROTOCOL_NAME);
        let versions: Vec<u32> = versions.into_iter().take(MAX_VERSIONS + 1).collect();
        let call = Call::Initiate {
            counterparty: &counterparty,
            protocol: &protocol,
            versions: &versions,
        };
        let result = match st.replay(&call)? {
            Some(Entry::Initiate { result, .. }) => result,
            Some(_) => unreachable!("replay checks the kind"),
            None => {
                let r = match counterparty.parse::<X500Name>() {
                    Err(e) => Err(SessErr::CounterpartyUnknown(e.0)),
                    Ok(name) => match args_ok {
                        Err(e) => Err(e),
                        Ok(()) => match match st.env.resolve(&name) {
                            Some(h) => Some(h),
                            None => st.env.resolve_fresh(&name).await,
                        } {
                            None => Err(SessErr::CounterpartyUnknown(format!(
                                "{name} is not a member of this network"
                            ))),
                            Some(_) => Ok(st.next_handle),
                        },
                    },
                };
                st.record(Entry::Initiate {
                    counterparty: counterparty.clone(),
                    protocol: protocol.clone(),
                    versions: versions.clone(),
                    result: r.clone(),
                })?;
                r
            }
        };
        if let Ok(handle) = result {
            // Rebuild the session the same way live and in replay.
            let name: X500Name = counterparty.parse().expect("validated when journaled");
            let holding = st
                .env
                .resolve(&name)
                .unwrap_or_else(|| st.env.derive(&name));
            let id = SessionId {
                initiator_flow: st.id,
                index: handle,
            };
            let s = Sess {
                id,
                me: Endpoint {
                    holding: st.holding,
                    name: st.name.clone(),
                    side: Side::Initiator,
                },
                peer: Endpoint {
                    holding,
                    name,
                    side: Side::Responder,
                },
                protocol,
                versions,
                next_send: 1,
                next_recv: 1,
                ended: None,
                closed_by_me: false,
            };
            st.charge(s.held_bytes(), "a new session")?;
            st.sessions.insert(handle, s);
            st.by_session.insert(id, handle);
            st.next_handle = handle + 1;
        }
        Ok(wit_result(result))
    }

    async fn send(
        &mut self,
        s: u64,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<(), types::SessionError>> {
        let st = &mut self.st;
        let d = digest(&payload);
        let payload_len = payload.len() as u64;
        if let Some(Entry::Send { result, .. } | Entry::Sent { result, .. }) =
            st.replay(&Call::Send {
                handle: s,
                digest: d,
            })?
        {
            if result.is_ok() {
                st.sessions.get_mut(&s).expect("journaled").next_send += 1;
            }
            return Ok(wit_result(result));
        }
        let result = match st.session(s) {
            Err(e) => Err(e),
            Ok(sess) if sess.closed_by_me => Err(SessErr::Closed),
            Ok(sess) if sess.ended.is_some() => Err(sess.ended.clone().expect("checked")),
            // The payload's size: what the flow tried to send.
            Ok(_) if payload.len() > st.limits.max_message_bytes => {
                Err(SessErr::TooLarge(payload.len() as u64))
            }
            Ok(_) => Ok(()),
        };
        if result.is_ok() {
            st.push_outbound(s, Body::Data(payload))?;
        }
        st.record(Entry::Sent {
            handle: s,
            digest: d,
            len: payload_len,
            result: result.clone(),
        })?;
        Ok(wit_result(result))
    }

    async fn receive(&mut self, s: u64) -> wasmtime::Result<Result<Vec<u8>, types::SessionError>> {
        let st = &mut self.st;
        match st.replay(&Call::Receive { handle: s })? {
            Some(Entry::Receive {
                consumed, result, ..
            }) => {
                st.apply_receive(s, consumed, &result);
                return Ok(wit_result(result));
            }
            Some(Entry::Received {
                consumed,
                result,
                at_ms,
                ..
            }) => {
                st.apply_receive(s, consumed, &result);
                st.set_virtual_now(at_ms);
                return Ok(wit_result(result));
            }
            Some(_) => unreachable!("replay checks the kind"),
            None => {}
        }
        let deadline = st.env.now_millis() + st.limits.session_timeout.as_millis() as u64;
        let (consumed, result) = loop {
            match st.session(s) {
                Err(e) => break (false, Err(e)),
                Ok(sess) if sess.ended.is_some() => {
                    break (false, Err(sess.ended.clone().expect("checked")));
                }
                Ok(_) => {}
            }
            if let Some(m) = st.take_next(s) {
                break (true, received(m.body));
            }
            if st.env.now_millis() >= deadline {
                break (false, Err(SessErr::TimedOut));
            }
            st.suspend(Some(deadline)).await?;
        };
        st.apply_receive(s, consumed, &result);
        let at_ms = st.env.now_millis();
        st.set_virtual_now(at_ms);
        st.record(Entry::Received {
            handle: s,
            consumed,
            result: result.clone(),
            at_ms,
        })?;
        Ok(wit_result(result))
    }

    async fn receive_any(&mut self, handles: Vec<u64>) -> wasmtime::Result<AnyResult> {
        let st = &mut self.st;
        if let Some(Entry::ReceivedAny {
            handle,
            consumed,
            result,
            at_ms,
            ..
        }) = st.replay(&Call::ReceiveAny { handles: &handles })?
        {
            st.apply_receive(handle, consumed, &result);
            st.set_virtual_now(at_ms);
            return Ok(any_result(handle, result));
        }
        let deadline = st.env.now_millis() + st.limits.session_timeout.as_millis() as u64;
        let (handle, consumed, result) = loop {
            let Some(&first) = handles.first() else {
                break (0, false, Err(SessErr::InvalidSession));
            };
            let mut answer = None;
            for &h in &handles {
                let ended = match st.session(h) {
                    Err(e) => Some(e),
                    Ok(sess) => sess.ended.clone(),
                };
                if let Some(e) = ended {
                    answer = Some((h, false, Err(e)));
                } else if let Some(m) = st.take_next(h) {
                    answer = Some((h, true, received(m.body)));
                }
                if answer.is_some() {
                    break;
                }
            }
            if let Some(a) = answer {
                break a;
            }
            if st.env.now_millis() >= deadline {
                break (first, false, Err(SessErr::TimedOut));
            }
            st.suspend(Some(deadline)).await?;
        };
        st.apply_receive(handle, consumed, &result);
        let at_ms = st.env.now_millis();
        st.set_virtual_now(at_ms);
        st.record(Entry::ReceivedAny {
            handles,
            handle,
            consumed,
            result: result.clone(),
            at_ms,
        })?;
        Ok(any_result(handle, result))
    }

    async fn close(&mut self, s: u64) -> wasmtime::Result<Result<(), types::SessionError>> {
        let st = &mut self.st;
        let result = match st.replay(&Call::Close { handle: s })? {
            Some(Entry::Close { result, .. }) => {
                if result.is_ok() {
                    let sess = st.sessions.get_mut(&s).expect("journaled");
                    sess.closed_by_me = true;
                    sess.next_send += 1;
                }
                result
            }
            Some(_) => unreachable!("replay checks the kind"),
            None => {
                let r = match st.session(s) {
                    Err(e) => Err(e),
                    Ok(sess) if sess.closed_by_me => Err(SessErr::Closed),
                    Ok(_) => Ok(()),
                };
                if r.is_ok() {
                    st.push_outbound(s, Body::Close)?;
                    st.sessions.get_mut(&s).expect("checked").closed_by_me = true;
                }
                st.record(Entry::Close {
                    handle: s,
                    result: r.clone(),
                })?;
                r
            }
        };
        Ok(wit_result(result))
    }

    async fn counterparty(
        &mut self,
        s: u64,
    ) -> wasmtime::Result<Result<String, types::SessionError>> {
        self.st.count_host_call()?;
        Ok(wit_result(
            self.st.session(s).map(|x| x.peer.name.to_string()),
        ))
    }

    async fn protocol_version(
        &mut self,
        s: u64,
    ) -> wasmtime::Result<Result<u32, types::SessionError>> {
        self.st.count_host_call()?;
        Ok(wit_result(
            self.st
                .session(s)
                .map(|x| x.versions.iter().copied().max().unwrap_or(0)),
        ))
    }

    async fn sleep(&mut self, millis: u64) -> wasmtime::Result<()> {
        let wake = self.st.env.now_millis().saturating_add(millis);
        self.st.durable_sleep_until(wake).await
    }

    async fn now_millis(&mut self) -> wasmtime::Result<u64> {
        let st = &mut self.st;
        let ms = match st.replay(&Call::Now)? {
            Some(Entry::Now { ms }) => ms,
            Some(_) => unreachable!("replay checks the kind"),
            None => {
                let ms = st.env.now_millis();
                st.record(Entry::Now { ms })?;
                ms
            }
        };
        st.set_virtual_now(ms);
        Ok(ms)
    }

    async fn random_bytes(&mut self, len: u32) -> wasmtime::Result<Vec<u8>> {
        let st = &mut self.st;
        let len = len as usize;
        match st.replay(&Call::Random { len })? {
            Some(Entry::Random { bytes }) => Ok(bytes),
            Some(_) => unreachable!("replay checks the kind"),
            None => {
                // Two copies live until the next checkpoint: the journal's
                // and the one handed to the flow. Check before allocating.
                let need = len.saturating_mul(2).saturating_add(64);
                if need > st.mem.room() {
                    let why = format!(
                        "memory limit exceeded: random-bytes({len}) needs {need} bytes, but only \
                         {} of the flow's {} MiB are left",
                        st.mem.room(),
                        st.mem.cap() >> 20
                    );
                    st.mem.hit = Some(why.clone());
                    return Err(st.halt(Stop::Memory(why)));
                }
                let mut bytes = vec![0u8; len];
                rand::fill(&mut bytes[..]);
                st.record(Entry::Random {
                    bytes: bytes.clone(),
                })?;
                Ok(bytes)
            }
        }
    }

    async fn log(&mut self, level: types::Level, message: String) -> wasmtime::Result<()> {
        let st = &mut self.st;
        st.count_host_call()?;
        let message = match message.char_indices().nth(MAX_LOG_CHARS) {
            Some((cut, _)) => &message[..cut],
            None => message.as_str(),
        };
        if let Some(p) = message.strip_prefix("panic: ") {
            st.panic_message = Some(bounded_text(p, st.limits.max_error_bytes));
        }
        if st.replaying() {
            return Ok(());
        }
        st.write_log(level, message);
        Ok(())
    }

    async fn whoami(&mut self) -> wasmtime::Result<String> {
        self.st.count_host_call()?;
        Ok(self.st.name.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_cut_at_character_boundaries_and_say_so() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("héllo", 3), "hé");
        assert_eq!(bounded_text("short", 100), "short");
        let long = "é".repeat(5000);
        let b = bounded_text(&long, 1000);
        assert!(b.len() <= 1000, "{}", b.len());
        assert!(b.ends_with("more bytes cut)"), "{b}");
    }

    #[test]
    fn initiate_arguments_are_bounded() {
        assert!(check_initiate_args("ping", &[1]).is_ok());
        assert!(check_initiate_args("", &[1]).is_err());
        assert!(check_initiate_args(&"p".repeat(MAX_PROTOCOL_NAME + 1), &[1]).is_err());
        assert!(check_initiate_args("ping", &[]).is_err());
        let many: Vec<u32> = (0..MAX_VERSIONS as u32 + 1).collect();
        assert!(check_initiate_args("ping", &many).is_err());
        assert!(check_initiate_args("ping", &many[..MAX_VERSIONS]).is_ok());
        // What is journaled stays over the limit when the argument was.
        let j = journaled_arg(&"p".repeat(1 << 20), MAX_PROTOCOL_NAME);
        assert_eq!(j.len(), MAX_PROTOCOL_NAME + 1);
        assert!(check_initiate_args(&j, &[1]).is_err());
    }
}
