//! The link manager's session protocol, without I/O.
//!
//! A [`Link`] is a plain state machine for one pair of identities (a local
//! vnode and a remote one): bytes, messages and time go in; packets to hand to
//! the gateway, delivered messages, acknowledgements and decisions come out.
//! It opens no socket and reads no clock: the caller passes `Instant`s, so
//! tests drive it on virtual time (see `tests/all/pair.rs`, after quinn's
//! `Pair` harness). `braid-p2p` drives links over the flow worker's outbox
//! and the gateway (`braid-gateway`), with the membership from
//! `braid-membership`.
//!
//! # The protocol
//!
//! * **Handshake.** `Noise_XX_25519_ChaChaPoly_BLAKE2s` (the `snow` crate),
//!   each side's static key being its vnode's *session key*. The prologue
//!   binds both X.500 names (initiator, responder) and the session's *epoch*,
//!   so a handshake cannot be replayed to another pair or session. Each side
//!   accepts the peer only if the static key it proved it holds is the one
//!   the caller's [`Membership`] lists for the identity the link is for;
//!   otherwise [`HandshakeError::PeerNotListed`], [`HandshakeError::UnknownKey`]
//!   or [`HandshakeError::KeyMismatch`] (a key listed for another member). The
//!   handshake payloads carry each side's maximum packet and message sizes; the
//!   smaller packet size is used. Handshake messages are resent on the same
//!   backoff as data until answered; if both sides start at once the higher
//!   epoch wins, and on a tie the side with the lower name stays initiator.
//! * **Transport.** Every later packet is `version, kind, epoch, seq,
//!   ciphertext`: one frame sealed with the session's ChaCha20-Poly1305 keys
//!   (snow's `StatelessTransportState`) using the 64-bit sequence number as
//!   the nonce, so header tampering fails authentication too. A packet is
//!   refused, with a typed [`PacketError`], when it fails authentication,
//!   repeats a sequence number (an 8192-wide sliding window: batches POSTed concurrently by the gateway arrive out of order), falls behind the
//!   window, or names an unknown epoch. Only authenticated packets move the
//!   window.
//! * **Reliable delivery.** Messages carry caller-chosen ids
//!   ([`MessageId`], the flow layer's outbox id, so resends after a restart
//!   are recognised). The receiver emits [`Event::Delivered`] once; the caller
//!   stores the message and calls [`Link::mark_durable`], and only then is an
//!   ack sent. The sender resends unacked messages on a capped exponential
//!   backoff: the first resend waits the measured round trip (send to
//!   durable ack; RFC 6298's `srtt + 4·rttvar`, Karn's rule, at least
//!   200 ms), doubling to 10 s; it dead-letters a message past its
//!   time-to-live ([`Event::DeadLettered`]) so the flow's session fails with a
//!   clear reason. Duplicates are dropped: a message awaiting durability is
//!   ignored, a durable one is acked again (its ack was lost). The receiver
//!   remembers the last [`LinkConfig::delivered_memory`] durable ids; the flow
//!   layer's per-session sequence numbers are the second line of defence.
//! * **Re-key** after [`LinkConfig::rekey_after_packets`] packets or
//!   [`LinkConfig::rekey_after`], by a new handshake with the next epoch. The
//!   old session keeps sending until the new one is up, and is still accepted
//!   for [`LinkConfig::rekey_grace`] afterwards, so packets in flight across
//!   the switch decrypt; anything lost is resent under the new keys by the
//!   reliability layer, so no message is lost. A peer silent for
//!   [`LinkConfig::dead_peer_after`] while messages are unacked gets a fresh
//!   handshake too (it may have restarted and lost the session).
//! * **Fragmentation.** A message larger than one packet is split into
//!   fragments (`msg_id, total_len, index, count`), resent together, and
//!   reassembled within a bounded buffer ([`ReassemblyError`] when exceeded).
//! * **Wire format** ([`wire`]): by hand, big-endian, version byte first. Every
//!   decoder of peer bytes is total (proptests here; cargo-fuzz targets in `host/fuzz`).
//!
//! # Not done yet
//!
//! * Selective acknowledgement of fragments (a lost fragment resends the
//!   whole message; the receiver keeps the fragments it has) and congestion
//!   control (the gateway's `503` back-pressure and a bounded number of
//!   requests per peer pace the driver).
//! * The duplicate memory ([`LinkConfig::delivered_memory`]) is in memory
//!   only: after a restart the receiving flows' sequence numbers drop the
//!   resent duplicates.

mod error;
mod identity;
mod link;
mod replay;
pub mod wire;

pub use error::{
    DeadLetterReason, HandshakeError, MessageId, NotDelivered, PacketError, ReassemblyError,
    SendError,
};
pub use identity::{
    Identity, Membership, NOISE_PARAMS, PublicKey, StaticKeypair, StaticMembership,
};
pub use link::{Event, Link, LinkConfig};
pub use replay::{Refusal, ReplayWindow, WINDOW as REPLAY_WINDOW};
