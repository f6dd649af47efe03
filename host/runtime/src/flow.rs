//! One flow's host-side state and the host functions it calls.
//!
//! Each call either replays the next journal entry (checking that it is
//! the same call) or, past the end of the journal, does the work and
//! appends the outcome. A call that must wait (`receive` with nothing
//! queued, `sleep`) first asks the environment to commit the checkpoint,
//! then waits for an event.

use crate::bindings::braid::flow::{host, types};
use crate::journal::{Entry, SessErr, digest};
use crate::{Checkpoint, Event, FlowEnv, Limits};
use braid_types::{
    Body, Endpoint, FlowId, FlowStart, HoldingId, SessionFault, SessionId, SessionInit,
    SessionMessage, Side, X500Name,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Why a flow was stopped from the host side (the trap's cause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    Evicted,
    Killed(String),
    NonDeterminism(String),
    Cpu,
    Outbound,
    Fault(String),
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

pub(crate) struct FlowState {
    pub id: FlowId,
    pub holding: HoldingId,
    pub name: X500Name,
    pub journal: Vec<Entry>,
    pub cursor: usize,
    pub committed: usize,
    pub outbound: Vec<SessionMessage>,
    pub consumed: Vec<Vec<u8>>,
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
    pub cpu_used: Duration,
    pub cpu_mark: Instant,
    pub wake_at: Option<u64>,
    /// A message arrived that the flow has not consumed yet.
    pub pending_delivery: bool,
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

impl FlowState {
    pub(crate) fn charge_cpu(&mut self) {
        let now = Instant::now();
        self.cpu_used += now.saturating_duration_since(self.cpu_mark);
        self.cpu_mark = now;
    }

    fn replaying(&self) -> bool {
        self.cursor < self.journal.len()
    }

    fn set_virtual_now(&self, ms: u64) {
        self.virtual_now.fetch_max(ms, Ordering::Relaxed);
    }

    /// Takes the next journal entry during replay, or `None` when live.
    /// A call of another kind than the journal holds is a divergence.
    fn replay(&mut self, call: &Entry) -> wasmtime::Result<Option<Entry>> {
        if !self.replaying() {
            return Ok(None);
        }
        let e = self.journal[self.cursor].clone();
        if std::mem::discriminant(&e) != std::mem::discriminant(call) || !same_call(&e, call) {
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
        Ok(Some(e))
    }

    fn record(&mut self, e: Entry) {
        self.journal.push(e);
        self.cursor = self.journal.len();
    }

    pub(crate) fn halt(&mut self, s: Stop) -> wasmtime::Error {
        self.stop = Some(s.clone());
        wasmtime::Error::new(s)
    }

    /// The new journal entries, outbound messages and consumed inbox keys
    /// since the last commit.
    pub(crate) fn take_checkpoint(&mut self) -> Checkpoint {
        let entries = self.journal[self.committed..]
            .iter()
            .map(Entry::encode)
            .collect();
        let first_index = self.committed as u32;
        self.committed = self.journal.len();
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
            self.sessions.insert(
                1,
                Sess {
                    id: *session,
                    me,
                    peer: initiator.clone(),
                    protocol: protocol.clone(),
                    versions: vec![*version],
                    next_send: 1,
                    next_recv: 1,
                    ended: None,
                    closed_by_me: false,
                },
            );
            self.by_session.insert(*session, 1);
            self.next_handle = 2;
        }
    }

    pub(crate) fn accept(&mut self, m: SessionMessage) {
        self.inbox
            .entry(m.session)
            .or_default()
            .insert((m.seq, m.from.holding), m);
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
        s.next_send += 1;
        self.outbound.push(m);
        Ok(())
    }

    /// Messages to send when the flow ends: a close (or an error) on every
    /// session this flow has not closed.
    pub(crate) fn end_sessions(&mut self, failure: Option<&str>) {
        let mut handles: Vec<u64> = self.sessions.keys().copied().collect();
        handles.sort();
        for h in handles {
            let s = &self.sessions[&h];
            if s.closed_by_me || (failure.is_none() && s.ended.is_some()) {
                continue;
            }
            let body = match failure {
                None => Body::Close,
                Some(r) => Body::Error(SessionFault::CounterpartyFailed(r.to_owned())),
            };
            // Ending messages are never refused by the outbound limit.
            let s = self.sessions.get_mut(&h).expect("present");
            s.closed_by_me = true;
            let init = (s.me.side == Side::Initiator && s.next_send == 1).then(|| SessionInit {
                protocol: s.protocol.clone(),
                versions: s.versions.clone(),
            });
            self.outbound.push(SessionMessage {
                session: s.id,
                from: s.me.clone(),
                to: s.peer.clone(),
                seq: s.next_send,
                init,
                body,
            });
            s.next_send += 1;
        }
    }

    /// Commits what is new, then waits for one event. Returns after a
    /// message was queued or the deadline passed.
    async fn suspend(&mut self, deadline_ms: Option<u64>) -> wasmtime::Result<()> {
        self.charge_cpu();
        self.wake_at = deadline_ms;
        let cp = self.take_checkpoint();
        if let Err(e) = self.env.checkpoint(self.id, cp).await {
            return Err(self.halt(Stop::Fault(format!("checkpoint failed: {e:#}"))));
        }
        self.pending_delivery = false;
        let r = self.wait_event(deadline_ms).await;
        self.cpu_mark = Instant::now();
        r
    }

    async fn wait_event(&mut self, deadline_ms: Option<u64>) -> wasmtime::Result<()> {
        let sleep = async {
            match deadline_ms {
                Some(d) => {
                    let now = braid_types::now_millis();
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
        let q = self.inbox.get_mut(&id)?;
        while let Some((&(seq, _), _)) = q.first_key_value() {
            if seq != 0 && seq > want {
                return None;
            }
            let (_, m) = q.pop_first().expect("non-empty");
            self.consumed.push(m.key());
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
        None
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
}

fn same_call(journal: &Entry, call: &Entry) -> bool {
    match (journal, call) {
        (
            Entry::Initiate {
                counterparty: a,
                protocol: p,
                versions: v,
                ..
            },
            Entry::Initiate {
                counterparty: b,
                protocol: q,
                versions: w,
                ..
            },
        ) => a == b && p == q && v == w,
        (
            Entry::Send {
                handle: a,
                digest: d,
                ..
            },
            Entry::Send {
                handle: b,
                digest: e,
                ..
            },
        ) => a == b && d == e,
        (Entry::Receive { handle: a, .. }, Entry::Receive { handle: b, .. }) => a == b,
        (Entry::Close { handle: a, .. }, Entry::Close { handle: b, .. }) => a == b,
        (Entry::Random { bytes: a }, Entry::Random { bytes: b }) => a.len() == b.len(),
        _ => true,
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
        let call = Entry::Initiate {
            counterparty: counterparty.clone(),
            protocol: protocol.clone(),
            versions: versions.clone(),
            result: Ok(0),
        };
        let result = match st.replay(&call)? {
            Some(Entry::Initiate { result, .. }) => result,
            Some(_) => unreachable!("replay checks the kind"),
            None => {
                let r = match counterparty.parse::<X500Name>() {
                    Err(e) => Err(SessErr::CounterpartyUnknown(e.0)),
                    Ok(name) => match st.env.resolve(&name) {
                        None => Err(SessErr::CounterpartyUnknown(format!(
                            "{name} is not a member of this network"
                        ))),
                        Some(_) if versions.is_empty() => {
                            Err(SessErr::Other("no protocol versions offered".into()))
                        }
                        Some(_) => Ok(st.next_handle),
                    },
                };
                st.record(Entry::Initiate {
                    counterparty: counterparty.clone(),
                    protocol: protocol.clone(),
                    versions: versions.clone(),
                    result: r.clone(),
                });
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
            st.sessions.insert(
                handle,
                Sess {
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
                },
            );
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
        let call = Entry::Send {
            handle: s,
            digest: digest(&payload),
            result: Ok(()),
        };
        if let Some(Entry::Send { result, .. }) = st.replay(&call)? {
            if result.is_ok() {
                st.sessions.get_mut(&s).expect("journaled").next_send += 1;
            }
            return Ok(wit_result(result));
        }
        let result = match st.session(s) {
            Err(e) => Err(e),
            Ok(sess) if sess.closed_by_me => Err(SessErr::Closed),
            Ok(sess) if sess.ended.is_some() => Err(sess.ended.clone().expect("checked")),
            Ok(_) if payload.len() > st.limits.max_message_bytes => {
                Err(SessErr::TooLarge(st.limits.max_message_bytes as u64))
            }
            Ok(_) => Ok(()),
        };
        if result.is_ok() {
            st.push_outbound(s, Body::Data(payload))?;
        }
        st.record(Entry::Send {
            handle: s,
            digest: call_digest(&call),
            result: result.clone(),
        });
        Ok(wit_result(result))
    }

    async fn receive(&mut self, s: u64) -> wasmtime::Result<Result<Vec<u8>, types::SessionError>> {
        let st = &mut self.st;
        let call = Entry::Receive {
            handle: s,
            consumed: false,
            result: Ok(vec![]),
        };
        if let Some(Entry::Receive {
            consumed, result, ..
        }) = st.replay(&call)?
        {
            st.apply_receive(s, consumed, &result);
            return Ok(wit_result(result));
        }
        let deadline = braid_types::now_millis() + st.limits.session_timeout.as_millis() as u64;
        let (consumed, result) = loop {
            match st.session(s) {
                Err(e) => break (false, Err(e)),
                Ok(sess) if sess.ended.is_some() => {
                    break (false, Err(sess.ended.clone().expect("checked")));
                }
                Ok(_) => {}
            }
            if let Some(m) = st.take_next(s) {
                let r = match m.body {
                    Body::Data(p) => Ok(p),
                    Body::Close => Err(SessErr::Closed),
                    Body::Error(SessionFault::CounterpartyFailed(why)) => {
                        Err(SessErr::CounterpartyFailed(why))
                    }
                    Body::Error(SessionFault::ProtocolUnsupported(why)) => {
                        Err(SessErr::ProtocolUnsupported(why))
                    }
                    Body::Error(SessionFault::Undeliverable(why)) => {
                        Err(SessErr::Other(format!("message undeliverable: {why}")))
                    }
                };
                break (true, r);
            }
            if braid_types::now_millis() >= deadline {
                break (false, Err(SessErr::TimedOut));
            }
            st.suspend(Some(deadline)).await?;
        };
        st.apply_receive(s, consumed, &result);
        st.set_virtual_now(braid_types::now_millis());
        st.record(Entry::Receive {
            handle: s,
            consumed,
            result: result.clone(),
        });
        Ok(wit_result(result))
    }

    async fn close(&mut self, s: u64) -> wasmtime::Result<Result<(), types::SessionError>> {
        let st = &mut self.st;
        let call = Entry::Close {
            handle: s,
            result: Ok(()),
        };
        let result = match st.replay(&call)? {
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
                });
                r
            }
        };
        Ok(wit_result(result))
    }

    async fn counterparty(
        &mut self,
        s: u64,
    ) -> wasmtime::Result<Result<String, types::SessionError>> {
        Ok(wit_result(
            self.st.session(s).map(|x| x.peer.name.to_string()),
        ))
    }

    async fn protocol_version(
        &mut self,
        s: u64,
    ) -> wasmtime::Result<Result<u32, types::SessionError>> {
        Ok(wit_result(
            self.st
                .session(s)
                .map(|x| x.versions.iter().copied().max().unwrap_or(0)),
        ))
    }

    async fn sleep(&mut self, millis: u64) -> wasmtime::Result<()> {
        let st = &mut self.st;
        let wake = match st.replay(&Entry::Sleep { wake_at_ms: 0 })? {
            Some(Entry::Sleep { wake_at_ms }) => wake_at_ms,
            Some(_) => unreachable!("replay checks the kind"),
            None => {
                let w = braid_types::now_millis().saturating_add(millis);
                st.record(Entry::Sleep { wake_at_ms: w });
                w
            }
        };
        // Past entries mean the sleep already ended in an earlier run.
        while !st.replaying() && braid_types::now_millis() < wake {
            st.suspend(Some(wake)).await?;
        }
        st.set_virtual_now(wake);
        Ok(())
    }

    async fn now_millis(&mut self) -> wasmtime::Result<u64> {
        let st = &mut self.st;
        let ms = match st.replay(&Entry::Now { ms: 0 })? {
            Some(Entry::Now { ms }) => ms,
            Some(_) => unreachable!("replay checks the kind"),
            None => {
                let ms = braid_types::now_millis();
                st.record(Entry::Now { ms });
                ms
            }
        };
        st.set_virtual_now(ms);
        Ok(ms)
    }

    async fn random_bytes(&mut self, len: u32) -> wasmtime::Result<Vec<u8>> {
        let st = &mut self.st;
        let len = len.min(1 << 20) as usize;
        match st.replay(&Entry::Random {
            bytes: vec![0; len],
        })? {
            Some(Entry::Random { bytes }) => Ok(bytes),
            Some(_) => unreachable!("replay checks the kind"),
            None => {
                let mut bytes = vec![0u8; len];
                rand::fill(&mut bytes[..]);
                st.record(Entry::Random {
                    bytes: bytes.clone(),
                });
                Ok(bytes)
            }
        }
    }

    async fn log(&mut self, level: types::Level, message: String) -> wasmtime::Result<()> {
        let st = &mut self.st;
        let message: String = message.chars().take(4096).collect();
        if let Some(p) = message.strip_prefix("panic: ") {
            st.panic_message = Some(p.to_owned());
        }
        if st.replaying() {
            return Ok(());
        }
        let flow = st.id.to_string();
        match level {
            types::Level::Trace => tracing::trace!(flow_id = %flow, "{message}"),
            types::Level::Debug => tracing::debug!(flow_id = %flow, "{message}"),
            types::Level::Info => tracing::info!(flow_id = %flow, "{message}"),
            types::Level::Warn => tracing::warn!(flow_id = %flow, "{message}"),
            types::Level::Error => tracing::error!(flow_id = %flow, "{message}"),
        }
        Ok(())
    }

    async fn whoami(&mut self) -> wasmtime::Result<String> {
        Ok(self.st.name.to_string())
    }
}

fn call_digest(e: &Entry) -> u64 {
    match e {
        Entry::Send { digest, .. } => *digest,
        _ => 0,
    }
}
