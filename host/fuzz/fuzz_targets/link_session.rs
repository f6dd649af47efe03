//! The receive path of a link (`Link::handle_packet`), driven by a peer the
//! fuzzer controls. The peer holds a real session key listed in the
//! membership, so besides raw bytes it can complete handshakes and seal
//! frames of its choosing: the fuzzer reaches the frame decoder, reassembly,
//! acknowledgement and re-keying, not just the outer packet checks.
//!
//! Checked on every input:
//! * no panic, whatever arrives and in whatever order;
//! * nothing is delivered from bytes the peer did not seal in this step
//!   (raw bytes, replays and tampered copies of its packets);
//! * a message is delivered once: never again while awaiting durability,
//!   nor while the link still remembers it as durable;
//! * every packet the link emits decodes, and a sealed one carries a frame
//!   that decodes.
#![no_main]

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use braid_link::wire::{
    Frame, HandshakePayload, HandshakeStep, NOISE_MAX_MESSAGE, Packet, TAG_LEN,
};
use braid_link::{
    Event, Identity, Link, LinkConfig, MessageId, NOISE_PARAMS, StaticKeypair, StaticMembership,
};
use libfuzzer_sys::fuzz_target;
use snow::{HandshakeState, StatelessTransportState};

/// The link under test is Bob's end; the fuzzer plays Alice.
const LOCAL: &str = "O=Bob, L=Paris, C=FR";
const PEER: &str = "O=Alice, L=London, C=GB";

/// At most this many operations per input (bounds the time per run).
const MAX_OPS: usize = 64;

/// At most this many of the link's packets read per pump.
const MAX_PUMPED: usize = 256;

struct Fixture {
    start: Instant,
    local_keys: StaticKeypair,
    peer_keys: StaticKeypair,
    membership: Arc<StaticMembership>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let local_keys = StaticKeypair::generate().expect("keys");
        let peer_keys = StaticKeypair::generate().expect("keys");
        let mut membership = StaticMembership::new();
        membership.insert(Identity::from(PEER), peer_keys.public());
        membership.insert(Identity::from(LOCAL), local_keys.public());
        Fixture {
            start: Instant::now(),
            local_keys,
            peer_keys,
            membership: Arc::new(membership),
        }
    })
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Small limits (packets, messages, buffers, re-key interval) so the
    /// fuzzer reaches fragmentation, budget and re-key paths quickly.
    small: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Arbitrary bytes from the network.
    Raw(Vec<u8>),
    /// The peer opens a session as initiator: the next epoch, or one it picks.
    Handshake {
        epoch: Option<u32>,
        max_packet: u32,
        max_message: u32,
    },
    /// The peer reads what the link sent: answers its handshakes and, with
    /// `ack`, acknowledges the messages it received.
    Pump { ack: bool },
    /// Arbitrary plaintext sealed under the peer's current session, with
    /// the next sequence number or one the fuzzer picks.
    Sealed { seq: Option<u64>, plain: Vec<u8> },
    /// A data frame with chosen (possibly inconsistent) fields, sealed.
    Data {
        msg_id: u8,
        total_len: u16,
        frag_index: u8,
        frag_count: u8,
        bytes: Vec<u8>,
    },
    /// A whole message, as an honest peer sends it: fragments of at most
    /// `frag` bytes (at most 64 of them), each sealed, in order.
    Message {
        msg_id: u8,
        bytes: Vec<u8>,
        frag: u8,
    },
    /// An ack frame, sealed.
    Ack(Vec<u8>),
    /// The link's driver queues a message for the peer.
    Send { id: u8, len: u16, ttl_ms: u32 },
    /// The link's driver stores everything delivered so far.
    Durable,
    /// Time passes.
    Advance { ms: u32 },
    /// One of the peer's earlier packets, again.
    Replay(u8),
    /// One of the peer's earlier packets with one byte changed.
    Tamper { which: u8, at: u16, xor: u8 },
}

fn config(small: bool) -> LinkConfig {
    if !small {
        return LinkConfig::default();
    }
    LinkConfig {
        max_packet: 256,
        max_message: 4096,
        reassembly_budget: 8192,
        reassembly_timeout: Duration::from_secs(10),
        rekey_after_packets: 8,
        rekey_after: Duration::from_secs(60),
        rekey_grace: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        dead_peer_after: Duration::from_secs(10),
        delivered_memory: 4,
        ..LinkConfig::default()
    }
}

fn prologue(initiator: &str, responder: &str, epoch: u32) -> Vec<u8> {
    let mut p = b"braid-link/1\0".to_vec();
    for name in [initiator, responder] {
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name.as_bytes());
    }
    p.extend_from_slice(&epoch.to_be_bytes());
    p
}

fn noise(prologue: &[u8], initiator: bool) -> HandshakeState {
    let builder = snow::Builder::new(NOISE_PARAMS.parse().expect("params"))
        .local_private_key(fixture().peer_keys.private_bytes())
        .expect("key")
        .prologue(prologue)
        .expect("prologue");
    if initiator {
        builder.build_initiator().expect("initiator")
    } else {
        builder.build_responder().expect("responder")
    }
}

struct Session {
    epoch: u32,
    transport: StatelessTransportState,
    next_seq: u64,
}

struct Pending {
    epoch: u32,
    initiator: bool,
    state: HandshakeState,
}

/// Everything about one run: the link, the peer's state, the checks' memory.
struct Harness {
    link: Link,
    now: Instant,
    delivered_memory: usize,
    /// The peer's sessions, newest first (the link may still use an older one).
    sessions: VecDeque<Session>,
    pending: Option<Pending>,
    /// Every packet the peer sent, for replay and tampering.
    sent: Vec<Vec<u8>>,
    /// Delivered, not yet stored.
    awaiting: Vec<MessageId>,
    /// Stored, newest last (as many as the link remembers).
    durable: VecDeque<MessageId>,
    /// Ids the link sent that the peer has not acknowledged yet.
    to_ack: Vec<u64>,
    /// The highest epoch seen on either side.
    latest_epoch: u32,
}

impl Harness {
    fn new(small: bool) -> Self {
        let f = fixture();
        let config = config(small);
        let delivered_memory = config.delivered_memory;
        Self {
            link: Link::new(
                config,
                Identity::from(LOCAL),
                f.local_keys.clone(),
                Identity::from(PEER),
                f.membership.clone(),
            ),
            now: f.start,
            delivered_memory,
            sessions: VecDeque::new(),
            pending: None,
            sent: Vec::new(),
            awaiting: Vec::new(),
            durable: VecDeque::new(),
            to_ack: Vec::new(),
            latest_epoch: 0,
        }
    }

    /// Hands `bytes` to the link. `authentic`: the peer sealed or wrote it
    /// in this step, so it may deliver messages.
    fn deliver(&mut self, bytes: Vec<u8>, authentic: bool) {
        let _ = self.link.handle_packet(self.now, &bytes);
        if self.sent.len() < 256 {
            self.sent.push(bytes);
        }
        self.events(authentic);
    }

    fn events(&mut self, authentic: bool) {
        while let Some(event) = self.link.poll_event() {
            if trace() {
                eprintln!("link_session: {event:?}");
            }
            match event {
                Event::Delivered { id, .. } => {
                    assert!(authentic, "{id:?} delivered from unauthenticated bytes");
                    assert!(!self.awaiting.contains(&id), "{id:?} delivered twice");
                    assert!(
                        !self.durable.contains(&id),
                        "{id:?} delivered again while remembered as durable"
                    );
                    self.awaiting.push(id);
                }
                Event::Established { epoch, .. } => {
                    self.latest_epoch = self.latest_epoch.max(epoch);
                }
                _ => {}
            }
        }
    }

    fn seal(&mut self, seq: Option<u64>, plain: &[u8]) {
        let Some(s) = self.sessions.front_mut() else {
            return;
        };
        let plain = &plain[..plain.len().min(NOISE_MAX_MESSAGE - TAG_LEN)];
        let seq = seq.unwrap_or(s.next_seq);
        s.next_seq = s.next_seq.max(seq.saturating_add(1));
        let mut ciphertext = vec![0u8; plain.len() + TAG_LEN];
        let Ok(n) = s.transport.write_message(seq, plain, &mut ciphertext) else {
            return; // snow refuses nonce u64::MAX
        };
        ciphertext.truncate(n);
        let packet = Packet::Transport {
            epoch: s.epoch,
            seq,
            ciphertext: &ciphertext,
        }
        .encode();
        self.deliver(packet, true);
    }

    fn establish(&mut self, epoch: u32, state: HandshakeState) {
        let remote = state
            .get_remote_static()
            .expect("remote static key")
            .to_vec();
        assert_eq!(
            remote,
            fixture().local_keys.public().0,
            "the link proved another key"
        );
        let transport = state.into_stateless_transport_mode().expect("transport");
        self.sessions.push_front(Session {
            epoch,
            transport,
            next_seq: 0,
        });
        self.sessions.truncate(3);
        self.latest_epoch = self.latest_epoch.max(epoch);
    }

    fn handshake(&mut self, epoch: Option<u32>, payload: HandshakePayload) {
        let epoch = epoch.unwrap_or(
            self.latest_epoch
                .max(self.link.latest_epoch().unwrap_or(0))
                .saturating_add(1),
        );
        let mut state = noise(&prologue(PEER, LOCAL, epoch), true);
        let mut buf = vec![0u8; NOISE_MAX_MESSAGE];
        let n = state
            .write_message(&payload.encode(), &mut buf)
            .expect("message 1");
        self.pending = Some(Pending {
            epoch,
            initiator: true,
            state,
        });
        let first = Packet::Handshake {
            step: HandshakeStep::First,
            epoch,
            noise: &buf[..n],
        }
        .encode();
        self.deliver(first, true);
        self.pump(false);
    }

    /// Reads everything the link sent, answering as the peer would.
    fn pump(&mut self, ack: bool) {
        // Bounded: this peer answers every handshake message, even stale
        // ones a real link would refuse, so the two can play ping-pong
        // (each failed handshake makes the link start another). What is
        // left is lost in transit.
        for _ in 0..MAX_PUMPED {
            let Some(bytes) = self.link.poll_transmit() else {
                break;
            };
            self.receive(&bytes, ack);
        }
        while self.link.poll_transmit().is_some() {}
        if ack && !self.to_ack.is_empty() {
            let ids = std::mem::take(&mut self.to_ack);
            for chunk in ids.chunks(16) {
                self.seal(
                    None,
                    &Frame::Ack {
                        ids: chunk.to_vec(),
                    }
                    .encode(),
                );
            }
        }
    }

    fn receive(&mut self, bytes: &[u8], ack: bool) {
        let packet = Packet::decode(bytes).expect("the link sent an undecodable packet");
        if trace() {
            match &packet {
                Packet::Handshake { step, epoch, .. } => {
                    eprintln!("link_session: link sent {step:?} epoch {epoch}")
                }
                Packet::Transport { epoch, seq, .. } => {
                    eprintln!("link_session: link sent transport epoch {epoch} seq {seq}")
                }
            }
        }
        let ours = payload(4096, 1 << 20);
        match packet {
            Packet::Handshake {
                step: HandshakeStep::First,
                epoch,
                noise: msg,
            } => {
                // Both sides started at once: the higher epoch wins, and on a
                // tie the peer, whose name is lower, stays initiator.
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.initiator && p.epoch >= epoch)
                {
                    return;
                }
                let mut state = noise(&prologue(LOCAL, PEER, epoch), false);
                let mut buf = vec![0u8; NOISE_MAX_MESSAGE];
                let n = state.read_message(msg, &mut buf).expect("link's message 1");
                HandshakePayload::decode(&buf[..n]).expect("link's payload");
                let n = state
                    .write_message(&ours.encode(), &mut buf)
                    .expect("message 2");
                self.pending = Some(Pending {
                    epoch,
                    initiator: false,
                    state,
                });
                let second = Packet::Handshake {
                    step: HandshakeStep::Second,
                    epoch,
                    noise: &buf[..n],
                }
                .encode();
                self.deliver(second, true);
            }
            Packet::Handshake {
                step: HandshakeStep::Second,
                epoch,
                noise: msg,
            } => {
                let Some(mut p) = self.pending.take_if(|p| p.initiator && p.epoch == epoch) else {
                    return;
                };
                let mut buf = vec![0u8; NOISE_MAX_MESSAGE];
                let Ok(n) = p.state.read_message(msg, &mut buf) else {
                    return;
                };
                HandshakePayload::decode(&buf[..n]).expect("link's payload");
                let n = p.state.write_message(&[], &mut buf).expect("message 3");
                let third = Packet::Handshake {
                    step: HandshakeStep::Third,
                    epoch,
                    noise: &buf[..n],
                }
                .encode();
                self.establish(epoch, p.state);
                self.deliver(third, true);
            }
            Packet::Handshake {
                step: HandshakeStep::Third,
                epoch,
                noise: msg,
            } => {
                let Some(mut p) = self.pending.take_if(|p| !p.initiator && p.epoch == epoch) else {
                    return;
                };
                let mut buf = vec![0u8; NOISE_MAX_MESSAGE];
                if p.state.read_message(msg, &mut buf).is_ok() {
                    self.establish(epoch, p.state);
                }
            }
            Packet::Transport {
                epoch,
                seq,
                ciphertext,
            } => {
                let Some(s) = self.sessions.iter().find(|s| s.epoch == epoch) else {
                    return;
                };
                let mut plain = vec![0u8; ciphertext.len()];
                let Ok(n) = s.transport.read_message(seq, ciphertext, &mut plain) else {
                    return;
                };
                let frame =
                    Frame::decode(&plain[..n]).expect("the link sealed an undecodable frame");
                if let (true, Frame::Data { msg_id, .. }) = (ack, frame) {
                    if !self.to_ack.contains(&msg_id) {
                        self.to_ack.push(msg_id);
                    }
                }
            }
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Raw(bytes) => self.deliver(bytes, false),
            Op::Handshake {
                epoch,
                max_packet,
                max_message,
            } => self.handshake(epoch, payload(max_packet, max_message)),
            Op::Pump { ack } => self.pump(ack),
            Op::Sealed { seq, plain } => self.seal(seq, &plain),
            Op::Data {
                msg_id,
                total_len,
                frag_index,
                frag_count,
                bytes,
            } => {
                let frame = Frame::Data {
                    msg_id: u64::from(msg_id),
                    total_len: u32::from(total_len),
                    frag_index: u32::from(frag_index),
                    frag_count: u32::from(frag_count),
                    bytes,
                };
                self.seal(None, &frame.encode());
            }
            Op::Message {
                msg_id,
                bytes,
                frag,
            } => {
                let size = usize::from(frag.max(1)).max(bytes.len().div_ceil(64));
                let chunks: Vec<&[u8]> = if bytes.is_empty() {
                    vec![&[]]
                } else {
                    bytes.chunks(size).collect()
                };
                for (index, chunk) in chunks.iter().enumerate() {
                    let frame = Frame::Data {
                        msg_id: u64::from(msg_id),
                        total_len: bytes.len() as u32,
                        frag_index: index as u32,
                        frag_count: chunks.len() as u32,
                        bytes: chunk.to_vec(),
                    };
                    self.seal(None, &frame.encode());
                }
            }
            Op::Ack(ids) => {
                let ids = ids.into_iter().map(u64::from).collect();
                self.seal(None, &Frame::Ack { ids }.encode());
            }
            Op::Send { id, len, ttl_ms } => {
                let payload = vec![id; usize::from(len)];
                let ttl = Duration::from_millis(u64::from(ttl_ms));
                let _ = self
                    .link
                    .send(self.now, MessageId(u64::from(id)), payload, ttl);
                self.events(false);
            }
            Op::Durable => {
                for id in std::mem::take(&mut self.awaiting) {
                    self.link
                        .mark_durable(self.now, id)
                        .expect("a delivered message can be marked durable");
                    self.durable.push_back(id);
                    if self.durable.len() > self.delivered_memory {
                        self.durable.pop_front();
                    }
                }
                self.events(false);
            }
            Op::Advance { ms } => {
                // Up to two hours: past every timer, re-key included.
                self.now += Duration::from_millis(u64::from(ms % 7_200_000));
                self.link.handle_timeout(self.now);
                let _ = self.link.poll_timeout();
                self.events(false);
            }
            Op::Replay(which) => {
                if !self.sent.is_empty() {
                    let bytes = self.sent[usize::from(which) % self.sent.len()].clone();
                    self.deliver(bytes, false);
                }
            }
            Op::Tamper { which, at, xor } => {
                if !self.sent.is_empty() {
                    let mut bytes = self.sent[usize::from(which) % self.sent.len()].clone();
                    if !bytes.is_empty() {
                        let i = usize::from(at) % bytes.len();
                        bytes[i] ^= xor.max(1);
                        self.deliver(bytes, false);
                    }
                }
            }
        }
    }
}

/// `BRAID_FUZZ_TRACE=1`: print the link's events (to check what inputs reach).
fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var_os("BRAID_FUZZ_TRACE").is_some())
}

fn payload(max_packet: u32, max_message: u32) -> HandshakePayload {
    HandshakePayload {
        max_packet,
        max_message,
    }
}

fuzz_target!(|input: Input| {
    let mut h = Harness::new(input.small);
    for op in input.ops.into_iter().take(MAX_OPS) {
        h.step(op);
    }
    h.pump(true);
});
