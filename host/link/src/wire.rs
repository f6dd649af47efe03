//! The wire format: packets (what crosses the gateway) and frames (what a
//! sealed packet carries), encoded by hand, big-endian, versioned.
//!
//! Every decoder here takes bytes from a peer and is total: any input gives a
//! value or a [`DecodeError`], never a panic, and no length read from the
//! input is trusted for an allocation before the bytes behind it are there.
//!
//! ```text
//! packet    = version:u8 (=1) kind:u8 epoch:u32 body
//!   kind 1  handshake message 1 (initiator -> responder): body = Noise message
//!   kind 2  handshake message 2 (responder -> initiator): body = Noise message
//!   kind 3  handshake message 3 (initiator -> responder): body = Noise message
//!   kind 4  transport: body = seq:u64 ciphertext (AEAD, nonce = seq, >= 16 bytes)
//! frame     = type:u8 fields          (the plaintext of a transport packet)
//!   type 1  data: msg_id:u64 total_len:u32 frag_index:u32 frag_count:u32 bytes
//!   type 2  ack:  count:u16 count * msg_id:u64
//! handshake payload = version:u8 (=1) max_packet:u32 max_message:u32
//! ```

use thiserror::Error;

/// The version byte that starts every packet and handshake payload.
pub const VERSION: u8 = 1;

/// Bytes a transport packet adds around its frame: the header
/// (version, kind, epoch, seq) and the AEAD tag.
pub const TRANSPORT_OVERHEAD: usize = 1 + 1 + 4 + 8 + TAG_LEN;

/// Bytes a data frame adds in front of its fragment.
pub const DATA_FRAME_OVERHEAD: usize = 1 + 8 + 4 + 4 + 4;

/// The AEAD tag length (ChaCha20-Poly1305).
pub const TAG_LEN: usize = 16;

/// Noise caps one message (ciphertext and tag) at 65535 bytes.
pub const NOISE_MAX_MESSAGE: usize = 65535;

/// The largest packet the protocol can produce: a Noise message of maximum
/// length behind the transport header.
pub const MAX_PACKET: usize = NOISE_MAX_MESSAGE + (TRANSPORT_OVERHEAD - TAG_LEN);

/// The smallest packet size a peer may ask for: room for a useful fragment.
pub const MIN_PACKET: usize = 256;

/// Why bytes from a peer could not be decoded. The packet is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended inside a field: a truncated or corrupt packet.
    #[error("truncated: needed {needed} more bytes")]
    Truncated {
        /// How many bytes were missing.
        needed: usize,
    },
    /// The peer speaks a protocol version this build does not: upgrade one side.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// An unknown packet kind byte.
    #[error("unknown packet kind {0}")]
    UnknownPacketKind(u8),
    /// An unknown frame type byte inside a sealed packet.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A field holds a value the protocol does not allow.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// Bytes left over after a complete value.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
}

/// A bounds-checked reader: every read either succeeds or says how much was missing.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated {
                needed: n - self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.bytes.len()))
        }
    }
}

/// Which of the three Noise XX handshake messages a packet carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeStep {
    /// `-> e`: from the initiator.
    First,
    /// `<- e, ee, s, es`: from the responder.
    Second,
    /// `-> s, se`: from the initiator.
    Third,
}

/// One packet as it crosses the gateway. Borrowed from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// A Noise handshake message for session `epoch`.
    Handshake {
        /// Which message of the handshake.
        step: HandshakeStep,
        /// The session this handshake establishes.
        epoch: u32,
        /// The Noise message.
        noise: &'a [u8],
    },
    /// A sealed frame under session `epoch`.
    Transport {
        /// The session whose keys sealed it.
        epoch: u32,
        /// The sequence number, also the AEAD nonce.
        seq: u64,
        /// The sealed frame and its tag.
        ciphertext: &'a [u8],
    },
}

impl<'a> Packet<'a> {
    /// Decode a packet. Total: never panics.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = r.u8()?;
        let epoch = r.u32()?;
        let step = match kind {
            1 => HandshakeStep::First,
            2 => HandshakeStep::Second,
            3 => HandshakeStep::Third,
            4 => {
                let seq = r.u64()?;
                let ciphertext = r.rest();
                if ciphertext.len() < TAG_LEN {
                    return Err(DecodeError::Malformed("ciphertext shorter than its tag"));
                }
                if ciphertext.len() > NOISE_MAX_MESSAGE {
                    return Err(DecodeError::Malformed("ciphertext longer than 65535 bytes"));
                }
                return Ok(Packet::Transport {
                    epoch,
                    seq,
                    ciphertext,
                });
            }
            other => return Err(DecodeError::UnknownPacketKind(other)),
        };
        let noise = r.rest();
        if noise.len() > NOISE_MAX_MESSAGE {
            return Err(DecodeError::Malformed(
                "handshake message longer than 65535 bytes",
            ));
        }
        Ok(Packet::Handshake { step, epoch, noise })
    }

    /// Encode the packet.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Packet::Handshake { step, epoch, noise } => {
                let mut out = header(
                    match step {
                        HandshakeStep::First => 1,
                        HandshakeStep::Second => 2,
                        HandshakeStep::Third => 3,
                    },
                    *epoch,
                    noise.len(),
                );
                out.extend_from_slice(noise);
                out
            }
            Packet::Transport {
                epoch,
                seq,
                ciphertext,
            } => {
                let mut out = header(4, *epoch, 8 + ciphertext.len());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(ciphertext);
                out
            }
        }
    }
}

/// The header of a packet, with room for `body` more bytes.
pub(crate) fn header(kind: u8, epoch: u32, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + body);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&epoch.to_be_bytes());
    out
}

/// What a sealed packet carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One fragment of a message (a message that fits is one fragment of one).
    Data {
        /// The message's id, chosen by the sender, unique per link direction.
        msg_id: u64,
        /// The whole message's length.
        total_len: u32,
        /// This fragment's index, `< frag_count`.
        frag_index: u32,
        /// How many fragments the message has, `>= 1`.
        frag_count: u32,
        /// The fragment's bytes.
        bytes: Vec<u8>,
    },
    /// The receiver holds these messages durably: stop resending them.
    Ack {
        /// The acknowledged message ids.
        ids: Vec<u64>,
    },
}

/// At most this many ids in one ack frame (the count is a u16).
pub const MAX_ACKS_PER_FRAME: usize = u16::MAX as usize;

impl Frame {
    /// Decode a frame (the plaintext of a transport packet). Total: never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let frame = match r.u8()? {
            1 => {
                let msg_id = r.u64()?;
                let total_len = r.u32()?;
                let frag_index = r.u32()?;
                let frag_count = r.u32()?;
                if frag_count == 0 {
                    return Err(DecodeError::Malformed("zero fragments"));
                }
                if frag_index >= frag_count {
                    return Err(DecodeError::Malformed("fragment index out of range"));
                }
                // Every fragment but a lone one of an empty message carries a byte.
                if frag_count > total_len.max(1) {
                    return Err(DecodeError::Malformed("more fragments than bytes"));
                }
                let bytes = r.rest().to_vec();
                if bytes.len() > total_len as usize {
                    return Err(DecodeError::Malformed("fragment longer than its message"));
                }
                Frame::Data {
                    msg_id,
                    total_len,
                    frag_index,
                    frag_count,
                    bytes,
                }
            }
            2 => {
                let count = r.u16()? as usize;
                // Checked against the input before allocating.
                let raw = r.take(count * 8)?;
                let ids = raw
                    .chunks_exact(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        u64::from_be_bytes(b)
                    })
                    .collect();
                Frame::Ack { ids }
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        };
        r.finish()?;
        Ok(frame)
    }

    /// Encode the frame. An ack frame must hold at most [`MAX_ACKS_PER_FRAME`] ids.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Frame::Data {
                msg_id,
                total_len,
                frag_index,
                frag_count,
                bytes,
            } => {
                let mut out = Vec::with_capacity(DATA_FRAME_OVERHEAD + bytes.len());
                out.push(1);
                out.extend_from_slice(&msg_id.to_be_bytes());
                out.extend_from_slice(&total_len.to_be_bytes());
                out.extend_from_slice(&frag_index.to_be_bytes());
                out.extend_from_slice(&frag_count.to_be_bytes());
                out.extend_from_slice(bytes);
                out
            }
            Frame::Ack { ids } => {
                debug_assert!(ids.len() <= MAX_ACKS_PER_FRAME);
                let n = ids.len().min(MAX_ACKS_PER_FRAME);
                let mut out = Vec::with_capacity(3 + 8 * n);
                out.push(2);
                out.extend_from_slice(&(n as u16).to_be_bytes());
                for id in &ids[..n] {
                    out.extend_from_slice(&id.to_be_bytes());
                }
                out
            }
        }
    }
}

/// What each side says about itself inside the handshake (authenticated by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakePayload {
    /// The largest packet this side accepts.
    pub max_packet: u32,
    /// The largest message (after reassembly) this side accepts.
    pub max_message: u32,
}

impl HandshakePayload {
    /// Encoded length.
    pub const LEN: usize = 1 + 4 + 4;

    /// Decode a handshake payload. Total: never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let max_packet = r.u32()?;
        let max_message = r.u32()?;
        r.finish()?;
        if (max_packet as usize) < MIN_PACKET {
            return Err(DecodeError::Malformed("max packet size below the minimum"));
        }
        Ok(Self {
            max_packet,
            max_message,
        })
    }

    /// Encode the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.push(VERSION);
        out.extend_from_slice(&self.max_packet.to_be_bytes());
        out.extend_from_slice(&self.max_message.to_be_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..64),
                1u32..8
            )
                .prop_flat_map(|(msg_id, bytes, count)| {
                    let total = (bytes.len() as u32).max(count).max(1) + 7;
                    (0..count).prop_map(move |index| Frame::Data {
                        msg_id,
                        total_len: total,
                        frag_index: index,
                        frag_count: count,
                        bytes: bytes.clone(),
                    })
                }),
            proptest::collection::vec(any::<u64>(), 0..40).prop_map(|ids| Frame::Ack { ids }),
        ]
    }

    fn packet() -> impl Strategy<Value = (u8, u32, u64, Vec<u8>)> {
        (
            1u8..=4,
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 16..128),
        )
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Packet::decode(&bytes);
            let _ = Frame::decode(&bytes);
            let _ = HandshakePayload::decode(&bytes);
        }

        #[test]
        fn decoding_near_valid_bytes_never_panics(f in frame(), cut in any::<usize>(), flip in any::<(usize, u8)>()) {
            let mut bytes = f.encode();
            let i = flip.0 % bytes.len();
            bytes[i] ^= flip.1;
            bytes.truncate(cut % (bytes.len() + 1));
            let _ = Frame::decode(&bytes);
        }

        #[test]
        fn frames_round_trip(f in frame()) {
            prop_assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }

        #[test]
        fn packets_round_trip((kind, epoch, seq, body) in packet()) {
            let p = match kind {
                1 => Packet::Handshake { step: HandshakeStep::First, epoch, noise: &body },
                2 => Packet::Handshake { step: HandshakeStep::Second, epoch, noise: &body },
                3 => Packet::Handshake { step: HandshakeStep::Third, epoch, noise: &body },
                _ => Packet::Transport { epoch, seq, ciphertext: &body },
            };
            let bytes = p.encode();
            prop_assert_eq!(Packet::decode(&bytes), Ok(p));
        }

        #[test]
        fn handshake_payloads_round_trip(max_packet in (MIN_PACKET as u32)..=u32::MAX, max_message in any::<u32>()) {
            let p = HandshakePayload { max_packet, max_message };
            prop_assert_eq!(HandshakePayload::decode(&p.encode()), Ok(p));
        }
    }

    #[test]
    fn huge_ack_count_is_truncated_not_allocated() {
        assert_eq!(
            Frame::decode(&[2, 0xff, 0xff]),
            Err(DecodeError::Truncated { needed: 0xffff * 8 })
        );
    }

    #[test]
    fn wrong_version_is_named() {
        assert_eq!(
            Packet::decode(&[9, 4, 0, 0, 0, 0]),
            Err(DecodeError::UnsupportedVersion(9))
        );
    }
}
