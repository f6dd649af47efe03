//! The journal: every host-call outcome a flow observed, in order.
//!
//! Replay (the runtime's) answers each call from the journal; a call that
//! does not match the entry at its position is a divergence and fails the
//! flow. The REST API shows journals as they are (`GET
//! /api/v1/flow/{holdingId}/{clientRequestId}/journal`).

use serde::{Deserialize, Serialize};

/// A session error as journaled (mirrors the WIT `session-error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessErr {
    /// Counterparty not known.
    CounterpartyUnknown(String),
    /// No responder for the protocol.
    ProtocolUnsupported(String),
    /// Closed by the counterparty.
    Closed,
    /// Counterparty flow failed.
    CounterpartyFailed(String),
    /// Session timeout.
    TimedOut,
    /// Bad handle.
    InvalidSession,
    /// Payload too large.
    TooLarge(u64),
    /// Other.
    Other(String),
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// `initiate`.
    Initiate {
        /// Counterparty as given.
        counterparty: String,
        /// Protocol.
        protocol: String,
        /// Versions offered.
        versions: Vec<u32>,
        /// Outcome.
        result: Result<u64, SessErr>,
    },
    /// `send`; the payload is in the outbox, the journal keeps a digest.
    Send {
        /// Handle.
        handle: u64,
        /// Digest of the payload.
        digest: u64,
        /// Outcome.
        result: Result<(), SessErr>,
    },
    /// `receive`.
    Receive {
        /// Handle.
        handle: u64,
        /// Whether a session message was consumed to produce the outcome.
        consumed: bool,
        /// Outcome.
        result: Result<Vec<u8>, SessErr>,
    },
    /// `close`.
    Close {
        /// Handle.
        handle: u64,
        /// Outcome.
        result: Result<(), SessErr>,
    },
    /// `sleep`: the instant it ends.
    Sleep {
        /// Wake time, ms since epoch.
        wake_at_ms: u64,
    },
    /// `now-millis`.
    Now {
        /// The time returned.
        ms: u64,
    },
    /// `random-bytes`.
    Random {
        /// The bytes returned.
        bytes: Vec<u8>,
    },
    /// `receive`, with the time it returned (the flow's virtual time moves
    /// to it, in replay as live). Journals written before this variant hold
    /// [`Entry::Receive`], which leaves the virtual time where it was.
    Received {
        /// Handle.
        handle: u64,
        /// Whether a session message was consumed to produce the outcome.
        consumed: bool,
        /// Outcome.
        result: Result<Vec<u8>, SessErr>,
        /// When it returned, ms since epoch.
        at_ms: u64,
    },
    /// `send`, with the payload's size. Journals written before this
    /// variant hold [`Entry::Send`]; both replay the same.
    Sent {
        /// Handle.
        handle: u64,
        /// Digest of the payload.
        digest: u64,
        /// The payload's size in bytes.
        len: u64,
        /// Outcome.
        result: Result<(), SessErr>,
    },
    /// `receive-any`: which of the sessions answered, and how.
    ReceivedAny {
        /// The sessions it waited on, in the order given.
        handles: Vec<u64>,
        /// The one that answered.
        handle: u64,
        /// Whether a session message was consumed to produce the outcome.
        consumed: bool,
        /// Outcome.
        result: Result<Vec<u8>, SessErr>,
        /// When it returned, ms since epoch.
        at_ms: u64,
    },
}

/// Bookkeeping bytes of one entry beyond its variable-size parts.
const ENTRY_OVERHEAD: usize = 48;

impl SessErr {
    fn held_bytes(&self) -> usize {
        match self {
            SessErr::CounterpartyUnknown(s)
            | SessErr::ProtocolUnsupported(s)
            | SessErr::CounterpartyFailed(s)
            | SessErr::Other(s) => s.len(),
            _ => 0,
        }
    }
}

impl Entry {
    /// The host call an entry records; the two forms of `receive` are one.
    pub fn call_kind(&self) -> &'static str {
        match self {
            Entry::Initiate { .. } => "initiate",
            Entry::Send { .. } | Entry::Sent { .. } => "send",
            Entry::Receive { .. } | Entry::Received { .. } => "receive",
            Entry::ReceivedAny { .. } => "receive-any",
            Entry::Close { .. } => "close",
            Entry::Sleep { .. } => "sleep",
            Entry::Now { .. } => "now-millis",
            Entry::Random { .. } => "random-bytes",
        }
    }

    /// About how many bytes the entry occupies in memory (for the flow's
    /// memory budget).
    pub fn held_bytes(&self) -> usize {
        ENTRY_OVERHEAD
            + match self {
                Entry::Initiate {
                    counterparty,
                    protocol,
                    versions,
                    result,
                } => {
                    counterparty.len()
                        + protocol.len()
                        + versions.len() * 4
                        + result.as_ref().err().map_or(0, SessErr::held_bytes)
                }
                Entry::Send { result, .. }
                | Entry::Sent { result, .. }
                | Entry::Close { result, .. } => {
                    result.as_ref().err().map_or(0, SessErr::held_bytes)
                }
                Entry::Receive { result, .. } | Entry::Received { result, .. } => match result {
                    Ok(p) => p.len(),
                    Err(e) => e.held_bytes(),
                },
                Entry::ReceivedAny {
                    handles, result, ..
                } => {
                    handles.len() * 8
                        + match result {
                            Ok(p) => p.len(),
                            Err(e) => e.held_bytes(),
                        }
                }
                Entry::Sleep { .. } | Entry::Now { .. } => 0,
                Entry::Random { bytes } => bytes.len(),
            }
    }

    /// A short description naming the call, for divergence errors.
    pub fn describe(&self) -> String {
        match self {
            Entry::Initiate {
                counterparty,
                protocol,
                ..
            } => format!("initiate({counterparty:?}, {protocol:?})"),
            Entry::Send { handle, .. } | Entry::Sent { handle, .. } => {
                format!("send(session {handle})")
            }
            Entry::Receive { handle, .. } | Entry::Received { handle, .. } => {
                format!("receive(session {handle})")
            }
            Entry::Close { handle, .. } => format!("close(session {handle})"),
            Entry::ReceivedAny { handles, .. } => format!("receive-any(sessions {handles:?})"),
            Entry::Sleep { .. } => "sleep".into(),
            Entry::Now { .. } => "now-millis".into(),
            Entry::Random { bytes } => format!("random-bytes({})", bytes.len()),
        }
    }

    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding an entry cannot fail")
    }

    /// Decodes from the store.
    pub fn decode(b: &[u8]) -> Result<Entry, postcard::Error> {
        postcard::from_bytes(b)
    }
}

/// The step a `NON_DETERMINISM` failure names ("... at step N: ..."), as
/// the runtime words it.
pub fn diverged_at(message: &str) -> Option<u32> {
    let (_, rest) = message.split_once("at step ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// FNV-1a: a stable digest of a sent payload, so replay notices a flow
/// that sends something different at the same step.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_err() -> impl Strategy<Value = SessErr> {
        prop_oneof![
            Just(SessErr::Closed),
            Just(SessErr::TimedOut),
            any::<String>().prop_map(SessErr::CounterpartyFailed),
            any::<u64>().prop_map(SessErr::TooLarge),
        ]
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            (
                any::<String>(),
                any::<String>(),
                any::<Vec<u32>>(),
                prop::result::maybe_ok(any::<u64>(), arb_err())
            )
                .prop_map(|(counterparty, protocol, versions, result)| {
                    Entry::Initiate {
                        counterparty,
                        protocol,
                        versions,
                        result,
                    }
                }),
            (any::<u64>(), any::<u64>()).prop_map(|(handle, digest)| Entry::Send {
                handle,
                digest,
                result: Ok(())
            }),
            (
                any::<u64>(),
                any::<bool>(),
                prop::result::maybe_ok(any::<Vec<u8>>(), arb_err())
            )
                .prop_map(|(handle, consumed, result)| Entry::Receive {
                    handle,
                    consumed,
                    result
                }),
            any::<u64>().prop_map(|wake_at_ms| Entry::Sleep { wake_at_ms }),
            any::<u64>().prop_map(|ms| Entry::Now { ms }),
            any::<Vec<u8>>().prop_map(|bytes| Entry::Random { bytes }),
            (
                any::<u64>(),
                any::<bool>(),
                prop::result::maybe_ok(any::<Vec<u8>>(), arb_err()),
                any::<u64>()
            )
                .prop_map(|(handle, consumed, result, at_ms)| Entry::Received {
                    handle,
                    consumed,
                    result,
                    at_ms
                }),
            (
                any::<Vec<u64>>(),
                any::<u64>(),
                any::<bool>(),
                prop::result::maybe_ok(any::<Vec<u8>>(), arb_err()),
                any::<u64>()
            )
                .prop_map(|(handles, handle, consumed, result, at_ms)| {
                    Entry::ReceivedAny {
                        handles,
                        handle,
                        consumed,
                        result,
                        at_ms,
                    }
                }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(handle, digest, len)| {
                Entry::Sent {
                    handle,
                    digest,
                    len,
                    result: Ok(()),
                }
            }),
        ]
    }

    #[test]
    fn journals_written_before_received_existed_still_decode() {
        // postcard of Entry::Receive { handle: 1, consumed: true, result: Ok(vec![7]) }
        // as the previous release wrote it: variant 2, varint 1, true, Ok, len 1, 7.
        let old = [2u8, 1, 1, 0, 1, 7];
        assert_eq!(
            Entry::decode(&old).unwrap(),
            Entry::Receive {
                handle: 1,
                consumed: true,
                result: Ok(vec![7])
            }
        );
        assert_eq!(Entry::Random { bytes: vec![0; 10] }.encode()[0], 6);
        // New variants go at the end: old entries keep their tags.
        let sent = Entry::Sent {
            handle: 1,
            digest: 2,
            len: 3,
            result: Ok(()),
        };
        assert_eq!(sent.encode()[0], 8);
        let any = Entry::ReceivedAny {
            handles: vec![1, 2],
            handle: 2,
            consumed: true,
            result: Ok(vec![]),
            at_ms: 0,
        };
        assert_eq!(any.encode()[0], 9);
    }

    proptest! {
        #[test]
        fn entries_round_trip(e in arb_entry()) {
            prop_assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        }

        #[test]
        fn decoding_garbage_never_panics(b in any::<Vec<u8>>()) {
            let _ = Entry::decode(&b);
        }

        #[test]
        fn digest_distinguishes_single_byte_changes(mut b in prop::collection::vec(any::<u8>(), 1..64), i in any::<prop::sample::Index>()) {
            let d = digest(&b);
            let i = i.index(b.len());
            b[i] ^= 1;
            prop_assert_ne!(d, digest(&b));
        }
    }
}
