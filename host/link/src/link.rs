//! [`Link`]: the protocol state machine for one pair of identities.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snow::{HandshakeState, StatelessTransportState};

use crate::error::{
    DeadLetterReason, HandshakeError, MessageId, NotDelivered, PacketError, ReassemblyError,
    SendError,
};
use crate::identity::{Identity, Membership, PublicKey, StaticKeypair, noise_params};
use crate::replay::{Refusal, ReplayWindow};
use crate::wire::{
    DATA_FRAME_OVERHEAD, Frame, HandshakePayload, HandshakeStep, MAX_ACKS_PER_FRAME, MAX_PACKET,
    MIN_PACKET, NOISE_MAX_MESSAGE, Packet, TAG_LEN, TRANSPORT_OVERHEAD,
};

/// Transport packets held for a handshake that has not finished (responder).
const MAX_EARLY: usize = 16;

/// Tunables of a link. The defaults suit the gateway (HTTPS POSTs).
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Largest packet this side accepts (and sends); the smaller of the two
    /// sides' values is used. Clamped to `256..=65549` (a Noise message).
    pub max_packet: usize,
    /// Largest message (after reassembly) this side accepts and sends.
    pub max_message: usize,
    /// Bytes of partially received messages held at once.
    pub reassembly_budget: usize,
    /// A partial message not completed within this is dropped (its sender
    /// resends or dead-letters it).
    pub reassembly_timeout: Duration,
    /// First resend delay of an unacknowledged message or handshake message.
    pub retry_initial: Duration,
    /// The resend delay doubles up to this.
    pub retry_max: Duration,
    /// Re-key after sealing this many packets under one session.
    pub rekey_after_packets: u64,
    /// Re-key a session older than this (at its next use).
    pub rekey_after: Duration,
    /// After a re-key, packets under the previous session are still
    /// accepted for this long (they were in flight).
    pub rekey_grace: Duration,
    /// A handshake not completed within this is abandoned (and retried).
    pub handshake_timeout: Duration,
    /// With messages unacknowledged and nothing authenticated heard from the
    /// peer for this long, a new handshake is started (the peer may have
    /// restarted and lost the session).
    pub dead_peer_after: Duration,
    /// How many delivered message ids are remembered to drop duplicates.
    pub delivered_memory: usize,
    /// Epochs up to this one are taken as used: this side's first handshake
    /// uses a higher one. The driver passes a value that grows across restarts
    /// (a persisted counter, or seconds since an epoch) so a peer that kept
    /// its state does not take the new handshake for a replay.
    pub initial_epoch: u32,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            max_packet: 32 * 1024,
            max_message: 16 * 1024 * 1024,
            reassembly_budget: 64 * 1024 * 1024,
            reassembly_timeout: Duration::from_secs(600),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            rekey_after_packets: 1 << 20,
            rekey_after: Duration::from_secs(3600),
            rekey_grace: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(30),
            dead_peer_after: Duration::from_secs(30),
            delivered_memory: 65536,
            initial_epoch: 0,
        }
    }
}

/// What the link tells its driver.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A session is established (`rekey`: it replaced an earlier one).
    Established {
        /// The session's epoch.
        epoch: u32,
        /// Whether this replaced an earlier session.
        rekey: bool,
    },
    /// A handshake failed; see the reason. Messages keep waiting (until
    /// their time-to-live) for a later handshake.
    HandshakeFailed(HandshakeError),
    /// A message arrived, for the first time. Store it, then call
    /// [`Link::mark_durable`]: only then is it acknowledged.
    Delivered {
        /// Its id.
        id: MessageId,
        /// Its payload, reassembled.
        payload: Vec<u8>,
    },
    /// The peer holds our message durably: delete it from the outbox.
    Acked(MessageId),
    /// A message was given up on; the sending flow's session fails.
    DeadLettered {
        /// Its id.
        id: MessageId,
        /// Why.
        reason: DeadLetterReason,
    },
}

struct Session {
    epoch: u32,
    transport: StatelessTransportState,
    next_seq: u64,
    window: ReplayWindow,
    established_at: Instant,
    sealed: u64,
    /// Negotiated: the smaller of the two sides' maximum packet sizes.
    max_packet: usize,
    peer_max_message: usize,
    /// When a previous session stops being accepted.
    retire_at: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Initiator,
    Responder,
}

struct Pending {
    epoch: u32,
    role: Role,
    state: Box<HandshakeState>,
    /// The responder learns the initiator's payload from message 1.
    peer: Option<HandshakePayload>,
    /// The responder's message 1, to tell a duplicate from a new attempt.
    first: Vec<u8>,
    /// Transport packets of this epoch that overtook message 3 (responder):
    /// opened once the session is up, instead of waiting for their resend.
    early: Vec<(u64, Vec<u8>)>,
    /// The last handshake packet we sent, resent until answered.
    last_sent: Vec<u8>,
    resend_at: Instant,
    backoff: Duration,
    started: Instant,
}

struct Outbound {
    payload: Vec<u8>,
    deadline: Instant,
    /// `None`: not sent yet (goes out as soon as there is a session).
    next_attempt: Option<Instant>,
    backoff: Duration,
    /// Fragment size, fixed at the first transmission so every resend
    /// splits the message the same way.
    chunk: Option<usize>,
    /// When it was first transmitted, and how many times: an ack of a
    /// message sent once is a round-trip sample (Karn's rule).
    first_sent: Option<Instant>,
    sends: u32,
}

struct Partial {
    total_len: usize,
    frag_count: u32,
    frags: BTreeMap<u32, Vec<u8>>,
    received: usize,
    started: Instant,
}

/// The session protocol between one local and one remote identity, without
/// I/O: feed it packets ([`handle_packet`](Self::handle_packet)), messages
/// ([`send`](Self::send)), durability ([`mark_durable`](Self::mark_durable))
/// and time ([`handle_timeout`](Self::handle_timeout)); take out packets
/// ([`poll_transmit`](Self::poll_transmit)), events
/// ([`poll_event`](Self::poll_event)) and the next deadline
/// ([`poll_timeout`](Self::poll_timeout)). Time is whatever `Instant`s the
/// caller passes; the link never reads a clock.
pub struct Link {
    config: LinkConfig,
    local: Identity,
    keys: StaticKeypair,
    remote: Identity,
    membership: Arc<dyn Membership>,

    current: Option<Session>,
    previous: Option<Session>,
    pending: Option<Pending>,
    /// Message 3 of the current session, if we initiated it: answered again
    /// when message 2 is repeated (our message 3 was lost).
    sent_third: Option<(u32, Vec<u8>)>,
    /// Message 1 of the last sessions we responded to: their duplicates are
    /// ignored, while a different message 1 for an old epoch is stale.
    answered: VecDeque<(u32, Vec<u8>)>,
    latest_epoch: Option<u32>,
    next_handshake_at: Option<Instant>,
    handshake_backoff: Duration,
    /// Smoothed round trip (send to durable ack) and its variation
    /// (RFC 6298); the first resend waits `srtt + 4 * rttvar`.
    srtt: Option<Duration>,
    rttvar: Duration,
    /// Karn's backoff: after a resend, first transmissions wait at least
    /// this long until a message acked on its first send gives a sample.
    rto_floor: Duration,
    last_heard: Option<Instant>,
    /// When [`Link::resync`] last started a handshake.
    last_resync: Option<Instant>,

    outbox: BTreeMap<MessageId, Outbound>,
    pending_acks: Vec<MessageId>,
    awaiting_durable: HashSet<MessageId>,
    durable: HashSet<MessageId>,
    durable_order: VecDeque<MessageId>,
    partials: HashMap<MessageId, Partial>,
    partial_bytes: usize,

    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("epoch", &self.epoch())
            .field("in_flight", &self.outbox.len())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link from `local` (holding `keys`, its session key pair) to `remote`,
    /// trusting the keys `membership` lists.
    pub fn new(
        mut config: LinkConfig,
        local: Identity,
        keys: StaticKeypair,
        remote: Identity,
        membership: Arc<dyn Membership>,
    ) -> Self {
        config.max_packet = config.max_packet.clamp(MIN_PACKET, MAX_PACKET);
        config.max_message = config.max_message.min(u32::MAX as usize);
        config.retry_max = config.retry_max.max(config.retry_initial);
        config.delivered_memory = config.delivered_memory.max(1);
        let handshake_backoff = config.retry_initial;
        Self {
            config,
            local,
            keys,
            remote,
            membership,
            current: None,
            previous: None,
            pending: None,
            sent_third: None,
            answered: VecDeque::new(),
            latest_epoch: None,
            next_handshake_at: None,
            handshake_backoff,
            last_heard: None,
            last_resync: None,
            srtt: None,
            rttvar: Duration::ZERO,
            rto_floor: Duration::ZERO,
            outbox: BTreeMap::new(),
            pending_acks: Vec::new(),
            awaiting_durable: HashSet::new(),
            durable: HashSet::new(),
            durable_order: VecDeque::new(),
            partials: HashMap::new(),
            partial_bytes: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The local identity.
    pub fn local(&self) -> &Identity {
        &self.local
    }

    /// The remote identity.
    pub fn remote(&self) -> &Identity {
        &self.remote
    }

    /// The current session's epoch, if one is established.
    pub fn epoch(&self) -> Option<u32> {
        self.current.as_ref().map(|s| s.epoch)
    }

    /// The highest epoch this link has used or accepted (persist it and pass
    /// it back as [`LinkConfig::initial_epoch`] after a restart).
    pub fn latest_epoch(&self) -> Option<u32> {
        self.latest_epoch
    }

    /// Messages sent and not yet acknowledged nor dead-lettered.
    pub fn in_flight(&self) -> usize {
        self.outbox.len()
    }

    /// Queue `payload` for the peer under `id`, to be acknowledged within
    /// `ttl` or dead-lettered. Starts a handshake if there is no session.
    pub fn send(
        &mut self,
        now: Instant,
        id: MessageId,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), SendError> {
        if payload.len() > self.config.max_message {
            return Err(SendError::TooLarge {
                len: payload.len(),
                max: self.config.max_message,
            });
        }
        if self.outbox.contains_key(&id) {
            return Err(SendError::DuplicateId(id));
        }
        self.outbox.insert(
            id,
            Outbound {
                payload,
                deadline: now + ttl,
                next_attempt: None,
                backoff: self.config.retry_initial,
                chunk: None,
                first_sent: None,
                sends: 0,
            },
        );
        self.flush(now);
        Ok(())
    }

    /// The message `id` (from [`Event::Delivered`]) is durable on this side:
    /// acknowledge it.
    pub fn mark_durable(&mut self, now: Instant, id: MessageId) -> Result<(), NotDelivered> {
        if !self.awaiting_durable.remove(&id) {
            return Err(NotDelivered(id));
        }
        self.durable.insert(id);
        self.durable_order.push_back(id);
        while self.durable_order.len() > self.config.delivered_memory {
            if let Some(old) = self.durable_order.pop_front() {
                self.durable.remove(&old);
            }
        }
        self.pending_acks.push(id);
        self.flush(now);
        Ok(())
    }

    /// The peer sent under a session this side does not hold (typically:
    /// this side restarted and the peer kept its session). Starts a new
    /// handshake at once, rather than leaving the peer to notice after
    /// [`LinkConfig::dead_peer_after`]; at most once a second, and not while
    /// a handshake is in progress or backing off.
    pub fn resync(&mut self, now: Instant) {
        if self.pending.is_some()
            || self.next_handshake_at.is_some_and(|t| t > now)
            || self
                .last_resync
                .is_some_and(|t| now < t + Duration::from_secs(1))
        {
            return;
        }
        self.last_resync = Some(now);
        self.start_handshake(now);
    }

    /// The next packet to hand to the gateway.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |i: Instant| t = Some(t.map_or(i, |t| t.min(i)));
        let established = self.current.is_some();
        for m in self.outbox.values() {
            at(m.deadline);
            if let (true, Some(next)) = (established, m.next_attempt) {
                at(next);
            }
        }
        if let Some(retire) = self.previous.as_ref().and_then(|s| s.retire_at) {
            at(retire);
        }
        for p in self.partials.values() {
            at(p.started + self.config.reassembly_timeout);
        }
        match &self.pending {
            Some(p) => {
                at(p.resend_at);
                at(p.started + self.config.handshake_timeout);
            }
            None if self.needs_session() => {
                if !established {
                    if let Some(next) = self.next_handshake_at {
                        at(next);
                    }
                } else {
                    if let Some(heard) = self.last_heard
                        && self.outbox.values().any(|m| m.next_attempt.is_some())
                    {
                        at(heard + self.config.dead_peer_after);
                    }
                    // A re-key held back by the handshake backoff: due when
                    // both the backoff and the re-key condition are.
                    if let (Some(next), Some(cur)) = (self.next_handshake_at, &self.current) {
                        if cur.sealed >= self.config.rekey_after_packets {
                            at(next);
                        } else {
                            at(next.max(cur.established_at + self.config.rekey_after));
                        }
                    }
                }
            }
            None => {}
        }
        t
    }

    /// Time has passed: resend, expire, retire and re-key as due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<MessageId> = self
            .outbox
            .iter()
            .filter(|(_, m)| m.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.outbox.remove(&id);
            self.events.push_back(Event::DeadLettered {
                id,
                reason: DeadLetterReason::Expired,
            });
        }
        if self
            .previous
            .as_ref()
            .and_then(|s| s.retire_at)
            .is_some_and(|r| r <= now)
        {
            self.previous = None;
        }
        let timeout = self.config.reassembly_timeout;
        let stale: Vec<MessageId> = self
            .partials
            .iter()
            .filter(|(_, p)| p.started + timeout <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.drop_partial(id);
        }
        if let Some(p) = &mut self.pending {
            if p.started + self.config.handshake_timeout <= now {
                let epoch = p.epoch;
                self.pending = None;
                self.handshake_failed(now, HandshakeError::TimedOut { epoch });
            } else if p.resend_at <= now {
                self.transmits.push_back(p.last_sent.clone());
                p.resend_at = now + p.backoff;
                p.backoff = (p.backoff * 2).min(self.config.retry_max);
            }
        }
        if self.pending.is_none()
            && self.current.is_some()
            && self.outbox.values().any(|m| m.next_attempt.is_some())
            && self
                .last_heard
                .is_some_and(|h| h + self.config.dead_peer_after <= now)
        {
            self.start_handshake(now);
        }
        self.flush(now);
    }

    /// A packet from the peer's gateway. `Err` says why it was dropped;
    /// nothing from a dropped packet is delivered.
    pub fn handle_packet(&mut self, now: Instant, bytes: &[u8]) -> Result<(), PacketError> {
        if bytes.len() > self.config.max_packet {
            return Err(PacketError::Oversized {
                len: bytes.len(),
                max: self.config.max_packet,
            });
        }
        let result = match Packet::decode(bytes)? {
            Packet::Handshake {
                step: HandshakeStep::First,
                epoch,
                noise,
            } => self.on_first(now, epoch, noise),
            Packet::Handshake {
                step: HandshakeStep::Second,
                epoch,
                noise,
            } => self.on_second(now, epoch, noise),
            Packet::Handshake {
                step: HandshakeStep::Third,
                epoch,
                noise,
            } => self.on_third(now, epoch, noise),
            Packet::Transport {
                epoch,
                seq,
                ciphertext,
            } => self.on_transport(now, epoch, seq, ciphertext),
        };
        self.flush(now);
        result
    }

    // --- handshake -------------------------------------------------------

    fn prologue(&self, role: Role, epoch: u32) -> Vec<u8> {
        let (initiator, responder) = match role {
            Role::Initiator => (&self.local, &self.remote),
            Role::Responder => (&self.remote, &self.local),
        };
        let mut p = b"braid-link/1\0".to_vec();
        for name in [initiator, responder] {
            p.extend_from_slice(&(name.as_bytes().len() as u32).to_be_bytes());
            p.extend_from_slice(name.as_bytes());
        }
        p.extend_from_slice(&epoch.to_be_bytes());
        p
    }

    fn our_payload(&self) -> HandshakePayload {
        HandshakePayload {
            max_packet: self.config.max_packet as u32,
            max_message: self.config.max_message as u32,
        }
    }

    fn build(&self, role: Role, epoch: u32) -> Result<HandshakeState, snow::Error> {
        let prologue = self.prologue(role, epoch);
        let builder = snow::Builder::new(noise_params()?)
            .local_private_key(self.keys.private())?
            .prologue(&prologue)?;
        match role {
            Role::Initiator => builder.build_initiator(),
            Role::Responder => builder.build_responder(),
        }
    }

    fn start_handshake(&mut self, now: Instant) {
        let base = self
            .latest_epoch
            .unwrap_or(0)
            .max(self.config.initial_epoch);
        let epoch = base.saturating_add(1);
        let noise_err = |e: snow::Error| HandshakeError::Noise {
            epoch,
            reason: e.to_string(),
        };
        let first = self.build(Role::Initiator, epoch).and_then(|mut state| {
            let mut buf = vec![0u8; NOISE_MAX_MESSAGE];
            let n = state.write_message(&self.our_payload().encode(), &mut buf)?;
            buf.truncate(n);
            Ok((state, buf))
        });
        match first {
            Ok((state, noise)) => {
                let packet = Packet::Handshake {
                    step: HandshakeStep::First,
                    epoch,
                    noise: &noise,
                }
                .encode();
                self.latest_epoch = Some(epoch);
                self.transmits.push_back(packet.clone());
                self.pending = Some(Pending {
                    epoch,
                    role: Role::Initiator,
                    state: Box::new(state),
                    peer: None,
                    first: Vec::new(),
                    early: Vec::new(),
                    last_sent: packet,
                    resend_at: now + self.config.retry_initial,
                    backoff: (self.config.retry_initial * 2).min(self.config.retry_max),
                    started: now,
                });
            }
            Err(e) => self.handshake_failed(now, noise_err(e)),
        }
    }

    fn handshake_failed(&mut self, now: Instant, err: HandshakeError) {
        self.events.push_back(Event::HandshakeFailed(err));
        self.next_handshake_at = Some(now + self.handshake_backoff);
        self.handshake_backoff = (self.handshake_backoff * 2).min(self.config.retry_max);
    }

    /// Fail the pending handshake with `err`, report it, and return it.
    fn fail_pending(&mut self, now: Instant, err: HandshakeError) -> PacketError {
        self.pending = None;
        self.handshake_failed(now, err.clone());
        PacketError::Handshake(err)
    }

    /// Accept the peer's static key only if the membership lists it for `remote`.
    fn verify_peer(&self, remote_static: Option<&[u8]>) -> Result<(), HandshakeError> {
        let identity = self.remote.clone();
        let Some(listed) = self.membership.session_key(&identity) else {
            return Err(HandshakeError::PeerNotListed { identity });
        };
        let key = remote_static
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(PublicKey)
            .ok_or_else(|| HandshakeError::Noise {
                epoch: self.pending.as_ref().map_or(0, |p| p.epoch),
                reason: "the peer sent no 32-byte static key".into(),
            })?;
        if key == listed {
            return Ok(());
        }
        Err(match self.membership.identity_of(&key) {
            Some(listed_for) => HandshakeError::KeyMismatch {
                identity,
                key,
                listed_for,
            },
            None => HandshakeError::UnknownKey { identity, key },
        })
    }

    fn on_first(&mut self, now: Instant, epoch: u32, noise: &[u8]) -> Result<(), PacketError> {
        let mut retry_of_pending = false;
        if let Some(p) = &mut self.pending {
            match p.role {
                Role::Responder if p.epoch == epoch && p.first == noise => {
                    // Our message 2 was lost (or this is a duplicate): answer again.
                    self.transmits.push_back(p.last_sent.clone());
                    return Ok(());
                }
                // The peer started over with the same epoch (it restarted).
                Role::Responder if p.epoch == epoch => retry_of_pending = true,
                // Both sides started at once: the higher epoch wins, and on a
                // tie the side with the lower name stays initiator.
                Role::Initiator
                    if epoch < p.epoch || (epoch == p.epoch && self.local < self.remote) =>
                {
                    return Ok(());
                }
                _ => {}
            }
        }
        if self
            .answered
            .iter()
            .any(|(e, first)| *e == epoch && first == noise)
        {
            return Ok(()); // a late duplicate of a handshake we completed
        }
        if let Some(latest) = self.latest_epoch {
            let stale = epoch <= latest
                && !retry_of_pending
                && self
                    .pending
                    .as_ref()
                    .is_none_or(|p| p.role == Role::Responder);
            if stale {
                // A replay, or a peer that restarted with an old epoch: answer
                // with a fresh handshake of our own, which it will accept.
                if self.pending.is_none() {
                    self.start_handshake(now);
                }
                return Err(PacketError::StaleHandshake { epoch, latest });
            }
        }
        let noise_err = |e: snow::Error| HandshakeError::Noise {
            epoch,
            reason: e.to_string(),
        };
        let mut state = self.build(Role::Responder, epoch).map_err(noise_err)?;
        let mut payload = vec![0u8; noise.len()];
        let n = state.read_message(noise, &mut payload).map_err(noise_err)?;
        let peer = HandshakePayload::decode(&payload[..n]).map_err(HandshakeError::Payload)?;
        let mut buf = vec![0u8; NOISE_MAX_MESSAGE];
        let n = state
            .write_message(&self.our_payload().encode(), &mut buf)
            .map_err(noise_err)?;
        let packet = Packet::Handshake {
            step: HandshakeStep::Second,
            epoch,
            noise: &buf[..n],
        }
        .encode();
        self.transmits.push_back(packet.clone());
        self.latest_epoch = Some(self.latest_epoch.map_or(epoch, |l| l.max(epoch)));
        // Replaces our own handshake if we lost the collision.
        self.pending = Some(Pending {
            epoch,
            role: Role::Responder,
            state: Box::new(state),
            peer: Some(peer),
            first: noise.to_vec(),
            early: Vec::new(),
            last_sent: packet,
            resend_at: now + self.config.retry_initial,
            backoff: (self.config.retry_initial * 2).min(self.config.retry_max),
            started: now,
        });
        Ok(())
    }

    fn on_second(&mut self, now: Instant, epoch: u32, noise: &[u8]) -> Result<(), PacketError> {
        let ours =
            matches!(&self.pending, Some(p) if p.role == Role::Initiator && p.epoch == epoch);
        if !ours {
            if let Some((e, third)) = &self.sent_third
                && *e == epoch
            {
                // The responder did not get our message 3: send it again.
                self.transmits.push_back(third.clone());
                return Ok(());
            }
            return Err(PacketError::UnexpectedHandshake {
                epoch,
                step: HandshakeStep::Second,
            });
        }
        let noise_err = |e: snow::Error| HandshakeError::Noise {
            epoch,
            reason: e.to_string(),
        };
        let Some(p) = self.pending.as_mut() else {
            return Ok(());
        };
        let mut payload = vec![0u8; noise.len()];
        let read = p.state.read_message(noise, &mut payload);
        let n = match read {
            Ok(n) => n,
            Err(e) => return Err(self.fail_pending(now, noise_err(e))),
        };
        let remote_static = p.state.get_remote_static().map(<[u8]>::to_vec);
        if let Err(e) = self.verify_peer(remote_static.as_deref()) {
            return Err(self.fail_pending(now, e));
        }
        let peer = match HandshakePayload::decode(&payload[..n]) {
            Ok(peer) => peer,
            Err(e) => return Err(self.fail_pending(now, HandshakeError::Payload(e))),
        };
        let Some(mut p) = self.pending.take() else {
            return Ok(());
        };
        let mut buf = vec![0u8; NOISE_MAX_MESSAGE];
        let third = p
            .state
            .write_message(&[], &mut buf)
            .and_then(|n| Ok((n, p.state.into_stateless_transport_mode()?)));
        let (n, transport) = match third {
            Ok(ok) => ok,
            Err(e) => return Err(self.fail_pending(now, noise_err(e))),
        };
        let packet = Packet::Handshake {
            step: HandshakeStep::Third,
            epoch,
            noise: &buf[..n],
        }
        .encode();
        self.transmits.push_back(packet.clone());
        self.sent_third = Some((epoch, packet));
        self.establish(now, epoch, transport, peer);
        Ok(())
    }

    fn on_third(&mut self, now: Instant, epoch: u32, noise: &[u8]) -> Result<(), PacketError> {
        let ours =
            matches!(&self.pending, Some(p) if p.role == Role::Responder && p.epoch == epoch);
        if !ours {
            if self.current.as_ref().is_some_and(|s| s.epoch == epoch) {
                return Ok(()); // a duplicate
            }
            return Err(PacketError::UnexpectedHandshake {
                epoch,
                step: HandshakeStep::Third,
            });
        }
        let noise_err = |e: snow::Error| HandshakeError::Noise {
            epoch,
            reason: e.to_string(),
        };
        let Some(p) = self.pending.as_mut() else {
            return Ok(());
        };
        let mut payload = vec![0u8; noise.len()];
        if let Err(e) = p.state.read_message(noise, &mut payload) {
            return Err(self.fail_pending(now, noise_err(e)));
        }
        let remote_static = p.state.get_remote_static().map(<[u8]>::to_vec);
        if let Err(e) = self.verify_peer(remote_static.as_deref()) {
            return Err(self.fail_pending(now, e));
        }
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let Some(peer) = p.peer else {
            return Ok(());
        };
        self.answered.push_back((epoch, p.first));
        if self.answered.len() > 2 {
            self.answered.pop_front();
        }
        match p.state.into_stateless_transport_mode() {
            Ok(transport) => {
                self.sent_third = None;
                self.establish(now, epoch, transport, peer);
                for (seq, ciphertext) in p.early {
                    // A failure here is a dropped packet, as it would have
                    // been on arrival; the sender resends what matters.
                    let _ = self.on_transport(now, epoch, seq, &ciphertext);
                }
                Ok(())
            }
            Err(e) => Err(self.fail_pending(now, noise_err(e))),
        }
    }

    fn establish(
        &mut self,
        now: Instant,
        epoch: u32,
        transport: StatelessTransportState,
        peer: HandshakePayload,
    ) {
        let session = Session {
            epoch,
            transport,
            next_seq: 0,
            window: ReplayWindow::default(),
            established_at: now,
            sealed: 0,
            max_packet: (peer.max_packet as usize).clamp(MIN_PACKET, self.config.max_packet),
            peer_max_message: peer.max_message as usize,
            retire_at: None,
        };
        let rekey = match self.current.replace(session) {
            Some(mut old) => {
                old.retire_at = Some(now + self.config.rekey_grace);
                self.previous = Some(old);
                true
            }
            None => false,
        };
        self.pending = None;
        self.next_handshake_at = None;
        self.handshake_backoff = self.config.retry_initial;
        self.last_heard = Some(now);
        self.events.push_back(Event::Established { epoch, rekey });
    }

    // --- transport -------------------------------------------------------

    fn on_transport(
        &mut self,
        now: Instant,
        epoch: u32,
        seq: u64,
        ciphertext: &[u8],
    ) -> Result<(), PacketError> {
        let session = match (&mut self.current, &mut self.previous) {
            (Some(s), _) if s.epoch == epoch => s,
            (_, Some(s)) if s.epoch == epoch && s.retire_at.is_none_or(|r| now < r) => s,
            _ => {
                if let Some(p) = self.pending.as_mut()
                    && p.role == Role::Responder
                    && p.epoch == epoch
                    && p.early.len() < MAX_EARLY
                {
                    p.early.push((seq, ciphertext.to_vec()));
                    return Ok(());
                }
                return Err(PacketError::UnknownEpoch { epoch });
            }
        };
        let refused = |r| match r {
            Refusal::Replayed => PacketError::Replayed { epoch, seq },
            Refusal::TooOld { highest } => PacketError::TooOld {
                epoch,
                seq,
                highest,
            },
        };
        session.window.check(seq).map_err(refused)?;
        let mut plain = vec![0u8; ciphertext.len()];
        let n = session
            .transport
            .read_message(seq, ciphertext, &mut plain)
            .map_err(|_| PacketError::AuthenticationFailed { epoch, seq })?;
        // Only an authenticated packet moves the window.
        session.window.accept(seq).map_err(refused)?;
        self.last_heard = Some(now);
        match Frame::decode(&plain[..n])? {
            Frame::Data {
                msg_id,
                total_len,
                frag_index,
                frag_count,
                bytes,
            } => self.on_fragment(
                now,
                MessageId(msg_id),
                total_len as usize,
                frag_index,
                frag_count,
                bytes,
            )?,
            Frame::Ack { ids } => {
                for id in ids.into_iter().map(MessageId) {
                    if let Some(m) = self.outbox.remove(&id) {
                        if let (1, Some(sent)) = (m.sends, m.first_sent) {
                            self.rtt_sample(now.saturating_duration_since(sent));
                        }
                        self.events.push_back(Event::Acked(id));
                    }
                }
            }
        }
        Ok(())
    }

    /// RFC 6298's estimator.
    fn rtt_sample(&mut self, r: Duration) {
        self.rto_floor = Duration::ZERO;
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + r) / 8);
            }
        }
    }

    /// The first resend delay: from the measured round trip once there is
    /// one, within `retry_initial..=retry_max`.
    fn rto(&self) -> Duration {
        let estimate = match self.srtt {
            None => self.config.retry_initial,
            Some(srtt) => srtt + (self.rttvar * 4).max(Duration::from_millis(10)),
        };
        estimate
            .max(self.rto_floor)
            .clamp(self.config.retry_initial, self.config.retry_max)
    }

    fn on_fragment(
        &mut self,
        now: Instant,
        id: MessageId,
        total_len: usize,
        index: u32,
        count: u32,
        bytes: Vec<u8>,
    ) -> Result<(), ReassemblyError> {
        if self.durable.contains(&id) {
            // Our ack was lost: acknowledge again.
            if !self.pending_acks.contains(&id) {
                self.pending_acks.push(id);
            }
            return Ok(());
        }
        if self.awaiting_durable.contains(&id) {
            return Ok(()); // acknowledged once durable
        }
        if total_len > self.config.max_message {
            return Err(ReassemblyError::MessageTooLarge {
                id,
                len: total_len,
                max: self.config.max_message,
            });
        }
        if count == 1 {
            if bytes.len() != total_len {
                return Err(ReassemblyError::Inconsistent { id });
            }
            self.deliver(id, bytes);
            return Ok(());
        }
        if !self.partials.contains_key(&id) {
            let available = self.config.reassembly_budget - self.partial_bytes;
            if total_len > available {
                return Err(ReassemblyError::BufferFull {
                    id,
                    needed: total_len,
                    available,
                });
            }
            self.partial_bytes += total_len;
            self.partials.insert(
                id,
                Partial {
                    total_len,
                    frag_count: count,
                    frags: BTreeMap::new(),
                    received: 0,
                    started: now,
                },
            );
        }
        let Some(p) = self.partials.get_mut(&id) else {
            return Ok(());
        };
        if p.total_len != total_len || p.frag_count != count {
            return Err(ReassemblyError::Inconsistent { id });
        }
        if p.frags.contains_key(&index) {
            return Ok(()); // a duplicate fragment
        }
        p.received += bytes.len();
        if p.received > p.total_len {
            self.drop_partial(id);
            return Err(ReassemblyError::Inconsistent { id });
        }
        p.frags.insert(index, bytes);
        if p.frags.len() == count as usize {
            let complete = p.received == p.total_len;
            let payload = complete.then(|| p.frags.values().flatten().copied().collect());
            self.drop_partial(id);
            match payload {
                Some(payload) => self.deliver(id, payload),
                None => return Err(ReassemblyError::Inconsistent { id }),
            }
        }
        Ok(())
    }

    fn drop_partial(&mut self, id: MessageId) {
        if let Some(p) = self.partials.remove(&id) {
            self.partial_bytes -= p.total_len;
        }
    }

    fn deliver(&mut self, id: MessageId, payload: Vec<u8>) {
        self.awaiting_durable.insert(id);
        self.events.push_back(Event::Delivered { id, payload });
    }

    fn needs_session(&self) -> bool {
        !self.outbox.is_empty() || !self.pending_acks.is_empty()
    }

    /// Send what is due under the current session; start a handshake when
    /// there is traffic and no session, or the session is due a re-key.
    fn flush(&mut self, now: Instant) {
        let rto = self.rto();
        let Some(session) = self.current.as_mut() else {
            if self.pending.is_none()
                && self.needs_session()
                && self.next_handshake_at.is_none_or(|t| t <= now)
            {
                self.start_handshake(now);
            }
            return;
        };
        let per_frame = (session.max_packet - TRANSPORT_OVERHEAD - 3) / 8;
        for ids in std::mem::take(&mut self.pending_acks).chunks(per_frame.min(MAX_ACKS_PER_FRAME))
        {
            let frame = Frame::Ack {
                ids: ids.iter().map(|id| id.0).collect(),
            };
            self.transmits.extend(seal(session, &frame));
        }
        let mut too_large = Vec::new();
        for (id, m) in self.outbox.iter_mut() {
            if m.next_attempt.is_some_and(|t| t > now) {
                continue;
            }
            if m.payload.len() > session.peer_max_message {
                too_large.push((*id, m.payload.len()));
                continue;
            }
            let chunk = *m
                .chunk
                .get_or_insert(session.max_packet - TRANSPORT_OVERHEAD - DATA_FRAME_OVERHEAD);
            let count = m.payload.len().div_ceil(chunk).max(1);
            for (index, part) in m
                .payload
                .chunks(chunk)
                .chain(
                    // An empty message is one empty fragment.
                    m.payload.is_empty().then_some(&[][..]),
                )
                .enumerate()
            {
                let frame = Frame::Data {
                    msg_id: id.0,
                    total_len: m.payload.len() as u32,
                    frag_index: index as u32,
                    frag_count: count as u32,
                    bytes: part.to_vec(),
                };
                self.transmits.extend(seal(session, &frame));
            }
            if m.first_sent.is_none() {
                m.first_sent = Some(now);
                m.backoff = rto;
            } else {
                // A resend: the round trip is longer than we thought.
                self.rto_floor = self.rto_floor.max(m.backoff);
            }
            m.sends = m.sends.saturating_add(1);
            m.next_attempt = Some(now + m.backoff);
            m.backoff = (m.backoff * 2).min(self.config.retry_max);
        }
        let max = session.peer_max_message;
        let rekey_due = session.sealed >= self.config.rekey_after_packets
            || session.established_at + self.config.rekey_after <= now;
        for (id, len) in too_large {
            self.outbox.remove(&id);
            self.events.push_back(Event::DeadLettered {
                id,
                reason: DeadLetterReason::TooLargeForPeer { len, max },
            });
        }
        // A failed re-key (even one a forged packet aborted) waits out the
        // handshake backoff like any other handshake.
        if rekey_due
            && self.pending.is_none()
            && self.needs_session()
            && self.next_handshake_at.is_none_or(|t| t <= now)
        {
            self.start_handshake(now);
        }
    }
}

/// Seal `frame` as the session's next packet. `None` only if the frame does
/// not fit a Noise message, which the fragment and ack sizes rule out.
fn seal(session: &mut Session, frame: &Frame) -> Option<Vec<u8>> {
    let plain = frame.encode();
    let seq = session.next_seq;
    let mut ciphertext = vec![0u8; plain.len() + TAG_LEN];
    let n = session
        .transport
        .write_message(seq, &plain, &mut ciphertext)
        .ok()?;
    session.next_seq += 1;
    session.sealed += 1;
    Some(
        Packet::Transport {
            epoch: session.epoch,
            seq,
            ciphertext: &ciphertext[..n],
        }
        .encode(),
    )
}
