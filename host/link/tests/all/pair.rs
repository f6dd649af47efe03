//! A two-endpoint harness on virtual time (after quinn-proto's `Pair`): two
//! [`Link`]s joined by a channel that loses, duplicates and reorders packets
//! as a seeded RNG (or a fixed pattern) decides.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_link::{
    DeadLetterReason, Event, HandshakeError, Identity, Link, LinkConfig, MessageId, PacketError,
    StaticKeypair, StaticMembership,
};

/// SplitMix64: small, seeded, good enough to pick drops and delays.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// What happens to one packet on a patterned channel.
#[derive(Debug, Clone, Copy)]
pub enum Fate {
    Deliver,
    Drop,
    Duplicate,
    /// Held back this long (so later packets overtake it).
    Delay(Duration),
}

/// How the channel treats packets.
pub enum Channel {
    /// Random loss, duplication and delay (0..max_delay, so reordering).
    Lossy {
        loss: f64,
        dup: f64,
        max_delay: Duration,
        rng: Rng,
    },
    /// A fixed sequence of fates, then clean delivery.
    Pattern(std::vec::IntoIter<Fate>),
}

impl Channel {
    pub fn clean() -> Self {
        Self::lossy(0.0, 0.0, Duration::from_millis(5), 1)
    }

    pub fn lossy(loss: f64, dup: f64, max_delay: Duration, seed: u64) -> Self {
        Channel::Lossy {
            loss,
            dup,
            max_delay,
            rng: Rng::new(seed),
        }
    }

    /// The delays at which copies of a packet arrive (empty: lost).
    fn fates(&mut self) -> Vec<Duration> {
        const LATENCY: Duration = Duration::from_millis(5);
        match self {
            Channel::Lossy {
                loss,
                dup,
                max_delay,
                rng,
            } => {
                if rng.chance(*loss) {
                    return vec![];
                }
                let copies = if rng.chance(*dup) { 2 } else { 1 };
                (0..copies)
                    .map(|_| {
                        LATENCY + Duration::from_micros(rng.below(max_delay.as_micros() as u64 + 1))
                    })
                    .collect()
            }
            Channel::Pattern(fates) => match fates.next().unwrap_or(Fate::Deliver) {
                Fate::Deliver => vec![LATENCY],
                Fate::Drop => vec![],
                Fate::Duplicate => vec![LATENCY, LATENCY * 2],
                Fate::Delay(d) => vec![LATENCY + d],
            },
        }
    }
}

/// One end: its link and everything it reported.
pub struct Side {
    pub link: Link,
    pub delivered: Vec<(MessageId, Vec<u8>)>,
    pub acked: Vec<MessageId>,
    pub dead: Vec<(MessageId, DeadLetterReason)>,
    pub established: Vec<(u32, bool)>,
    pub handshake_failures: Vec<HandshakeError>,
    pub rejected: Vec<PacketError>,
    /// Every packet this side sent, in order (for tamper and replay tests).
    pub sent: Vec<Vec<u8>>,
    /// Mark delivered messages durable at once (as a store would).
    pub auto_durable: bool,
    /// Answer a packet under an unknown epoch with [`Link::resync`] (as the
    /// node's driver does).
    pub resync: bool,
}

impl Side {
    pub fn new(link: Link) -> Self {
        Self {
            link,
            delivered: vec![],
            acked: vec![],
            dead: vec![],
            established: vec![],
            handshake_failures: vec![],
            rejected: vec![],
            sent: vec![],
            auto_durable: true,
            resync: false,
        }
    }

    pub fn drain_events(&mut self, now: Instant) {
        while let Some(e) = self.link.poll_event() {
            match e {
                Event::Delivered { id, payload } => {
                    self.delivered.push((id, payload));
                    if self.auto_durable {
                        self.link.mark_durable(now, id).expect("just delivered");
                    }
                }
                Event::Acked(id) => self.acked.push(id),
                Event::DeadLettered { id, reason } => self.dead.push((id, reason)),
                Event::Established { epoch, rekey } => self.established.push((epoch, rekey)),
                Event::HandshakeFailed(e) => self.handshake_failures.push(e),
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum To {
    A,
    B,
}

/// Two sides and the channel between them, on virtual time.
pub struct Pair {
    pub now: Instant,
    pub a: Side,
    pub b: Side,
    pub channel: Channel,
    /// Packets in flight: (arrival, tie-breaker) -> (destination, bytes).
    in_flight: BTreeMap<(Instant, u64), (To, Vec<u8>)>,
    counter: u64,
    /// Steps taken without time moving: a livelock detector.
    stuck: u32,
}

/// Test identities and keys.
pub struct Cast {
    pub alice: Identity,
    pub bob: Identity,
    pub mallory: Identity,
    pub alice_keys: StaticKeypair,
    pub bob_keys: StaticKeypair,
    pub mallory_keys: StaticKeypair,
    /// Lists alice, bob and mallory with their keys.
    pub membership: Arc<StaticMembership>,
}

impl Cast {
    pub fn new() -> Self {
        let alice = Identity::from("O=Alice, L=London, C=GB");
        let bob = Identity::from("O=Bob, L=Paris, C=FR");
        let mallory = Identity::from("O=Mallory, L=Nowhere, C=XX");
        let alice_keys = StaticKeypair::generate().unwrap();
        let bob_keys = StaticKeypair::generate().unwrap();
        let mallory_keys = StaticKeypair::generate().unwrap();
        let mut m = StaticMembership::new();
        m.insert(alice.clone(), alice_keys.public())
            .insert(bob.clone(), bob_keys.public())
            .insert(mallory.clone(), mallory_keys.public());
        Self {
            alice,
            bob,
            mallory,
            alice_keys,
            bob_keys,
            mallory_keys,
            membership: Arc::new(m),
        }
    }

    /// Alice's link to Bob.
    pub fn alice(&self, config: LinkConfig) -> Link {
        Link::new(
            config,
            self.alice.clone(),
            self.alice_keys.clone(),
            self.bob.clone(),
            self.membership.clone(),
        )
    }

    /// Bob's link to Alice.
    pub fn bob(&self, config: LinkConfig) -> Link {
        Link::new(
            config,
            self.bob.clone(),
            self.bob_keys.clone(),
            self.alice.clone(),
            self.membership.clone(),
        )
    }

    /// Alice and Bob, on `channel`.
    pub fn pair(&self, config: LinkConfig, channel: Channel) -> Pair {
        Pair::new(self.alice(config.clone()), self.bob(config), channel)
    }
}

impl Pair {
    pub fn new(a: Link, b: Link, channel: Channel) -> Self {
        Self {
            now: Instant::now(),
            a: Side::new(a),
            b: Side::new(b),
            channel,
            in_flight: BTreeMap::new(),
            counter: 0,
            stuck: 0,
        }
    }

    /// Move packets into the channel and events into the sides.
    fn collect(&mut self) {
        for (from, to) in [(To::A, To::B), (To::B, To::A)] {
            let side = if from == To::A {
                &mut self.a
            } else {
                &mut self.b
            };
            side.drain_events(self.now);
            while let Some(p) = side.link.poll_transmit() {
                side.sent.push(p.clone());
                for delay in self.channel.fates() {
                    self.counter += 1;
                    self.in_flight
                        .insert((self.now + delay, self.counter), (to, p.clone()));
                }
            }
        }
    }

    /// Advance to the next thing that happens, but not past `end` (time
    /// moves to `end` instead). False when nothing happens by then.
    fn step_until(&mut self, end: Option<Instant>) -> bool {
        self.collect();
        let next = [
            self.in_flight.keys().next().map(|k| k.0),
            self.a.link.poll_timeout(),
            self.b.link.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let next = match (next, end) {
            (Some(next), Some(end)) if next > end => None,
            (next, _) => next,
        };
        let Some(next) = next else {
            if let Some(end) = end {
                self.now = self.now.max(end);
            }
            return false;
        };
        if next <= self.now {
            self.stuck += 1;
            assert!(self.stuck < 100_000, "livelock: time does not advance");
        } else {
            self.stuck = 0;
        }
        self.now = self.now.max(next);
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let (to, bytes) = entry.remove();
            let side = if to == To::A {
                &mut self.a
            } else {
                &mut self.b
            };
            if let Err(e) = side.link.handle_packet(self.now, &bytes) {
                if side.resync && matches!(e, PacketError::UnknownEpoch { .. }) {
                    side.link.resync(self.now);
                }
                side.rejected.push(e);
            }
            side.drain_events(self.now);
        }
        for side in [&mut self.a, &mut self.b] {
            if side.link.poll_timeout().is_some_and(|t| t <= self.now) {
                side.link.handle_timeout(self.now);
            }
            side.drain_events(self.now);
        }
        self.collect();
        true
    }

    /// Step until `done` holds or `limit` of virtual time has passed.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Pair) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if self.now >= end || !self.step_until(Some(end)) {
                return done(self);
            }
        }
    }

    /// Step for `span` of virtual time.
    pub fn run_for(&mut self, span: Duration) {
        let end = self.now + span;
        while self.now < end && self.step_until(Some(end)) {}
    }
}
