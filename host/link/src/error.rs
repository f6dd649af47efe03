//! Typed errors and decisions: each says what failed, so the driver can log
//! one clear line (`cause = %err`) and carry on.

use crate::identity::{Identity, PublicKey};
use crate::wire::{DecodeError, HandshakeStep};
use thiserror::Error;

/// A message id, chosen by the sending side and unique per link direction
/// (the flow layer's outbox entry id): duplicates are recognised by it,
/// including resends after the sender restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a handshake did not establish a session. The peer is not trusted;
/// nothing from it is delivered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The identity this link is for has no session key in the membership:
    /// the peer is not (or no longer) a member. Check the network map.
    #[error("{identity} is not in the membership")]
    PeerNotListed {
        /// The identity the link was opened for.
        identity: Identity,
    },
    /// The peer proved a key that the membership lists for nobody: an
    /// outsider, or a member whose key rotation has not reached our map yet.
    #[error(
        "peer claiming to be {identity} presented key {key}, which the membership does not list"
    )]
    UnknownKey {
        /// The identity the peer claimed.
        identity: Identity,
        /// The key it proved it holds.
        key: PublicKey,
    },
    /// The peer proved a key that the membership lists for another member:
    /// that member is impersonating `identity`.
    #[error("peer claiming to be {identity} presented the session key of {listed_for}")]
    KeyMismatch {
        /// The identity the peer claimed.
        identity: Identity,
        /// The key it proved it holds.
        key: PublicKey,
        /// Whose key it is.
        listed_for: Identity,
    },
    /// The Noise handshake failed: a tampered or corrupt handshake message,
    /// or a peer that binds different identities (prologue mismatch).
    #[error("noise handshake for epoch {epoch} failed: {reason}")]
    Noise {
        /// The session being established.
        epoch: u32,
        /// What snow reported.
        reason: String,
    },
    /// The peer's handshake payload could not be decoded (version skew?).
    #[error("bad handshake payload: {0}")]
    Payload(DecodeError),
    /// No answer within the handshake timeout; a new attempt follows while
    /// there is traffic for the peer.
    #[error("handshake for epoch {epoch} timed out")]
    TimedOut {
        /// The session that was not established.
        epoch: u32,
    },
}

/// Why a received packet was dropped. Nothing from it was delivered.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PacketError {
    /// Larger than the maximum packet size this side announced: a peer that
    /// ignores the negotiation, or a hostile one.
    #[error("packet of {len} bytes exceeds the maximum {max}")]
    Oversized {
        /// Its length.
        len: usize,
        /// This side's maximum packet size.
        max: usize,
    },
    /// Not a well-formed packet or frame.
    #[error("undecodable packet: {0}")]
    Decode(#[from] DecodeError),
    /// The handshake it carried failed; see the cause.
    #[error("handshake rejected: {0}")]
    Handshake(#[from] HandshakeError),
    /// A handshake for a session older than the latest one: a replayed or
    /// very late packet, or a peer that restarted without advancing its epoch.
    /// A fresh handshake with a newer epoch is started in answer.
    #[error("stale handshake for epoch {epoch} (latest {latest})")]
    StaleHandshake {
        /// The epoch the packet named.
        epoch: u32,
        /// The latest epoch this link knows.
        latest: u32,
    },
    /// A handshake message that fits no handshake in progress.
    #[error("unexpected handshake message {step:?} for epoch {epoch}")]
    UnexpectedHandshake {
        /// The epoch the packet named.
        epoch: u32,
        /// Which handshake message it was.
        step: HandshakeStep,
    },
    /// Sealed under a session this link does not hold (never established,
    /// or retired after a re-key): it will be resent under the current one.
    #[error("no session with epoch {epoch}")]
    UnknownEpoch {
        /// The epoch the packet named.
        epoch: u32,
    },
    /// The packet failed authentication: tampered with, or forged.
    #[error("packet {seq} of epoch {epoch} failed authentication (tampered or forged)")]
    AuthenticationFailed {
        /// The epoch the packet named.
        epoch: u32,
        /// Its sequence number.
        seq: u64,
    },
    /// A sequence number already received: a replayed (or duplicated) packet.
    #[error("packet {seq} of epoch {epoch} replayed")]
    Replayed {
        /// The epoch.
        epoch: u32,
        /// The repeated sequence number.
        seq: u64,
    },
    /// A sequence number behind the replay window: cannot be told from a replay.
    #[error("packet {seq} of epoch {epoch} too old (highest seen {highest})")]
    TooOld {
        /// The epoch.
        epoch: u32,
        /// Its sequence number.
        seq: u64,
        /// The highest sequence number received.
        highest: u64,
    },
    /// A fragment could not be taken into reassembly.
    #[error(transparent)]
    Reassembly(#[from] ReassemblyError),
}

/// Why a fragment was refused by reassembly.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReassemblyError {
    /// The message is larger than this side accepts (it said so in the handshake).
    #[error("message {id} of {len} bytes exceeds the maximum {max}")]
    MessageTooLarge {
        /// The message.
        id: MessageId,
        /// Its announced length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The reassembly buffer is full; the sender will resend later.
    #[error("reassembly buffer full: message {id} needs {needed} bytes, {available} free")]
    BufferFull {
        /// The message.
        id: MessageId,
        /// Bytes it needs.
        needed: usize,
        /// Bytes free.
        available: usize,
    },
    /// Fragments of one message disagree (length, count, or content size).
    #[error("inconsistent fragments for message {id}")]
    Inconsistent {
        /// The message.
        id: MessageId,
    },
}

/// Why [`Link::send`](crate::Link::send) refused a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SendError {
    /// Larger than the configured maximum message size.
    #[error("message of {len} bytes exceeds the maximum {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A message with this id is already in flight.
    #[error("message {0} is already in flight")]
    DuplicateId(MessageId),
}

/// [`Link::mark_durable`](crate::Link::mark_durable) named a message that is
/// not waiting to be made durable (never delivered, or already acknowledged).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("message {0} is not awaiting durability")]
pub struct NotDelivered(pub MessageId);

/// Why a message was given up on. The sending flow's session fails with it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// Not acknowledged within its time-to-live: the peer is unreachable,
    /// or not accepting our handshake.
    #[error("not acknowledged within its time-to-live")]
    Expired,
    /// The peer accepts smaller messages than this one.
    #[error("{len} bytes exceeds the peer's maximum message size {max}")]
    TooLargeForPeer {
        /// Its length.
        len: usize,
        /// The peer's maximum.
        max: usize,
    },
}
