//! The body of a `POST /gateway/v1/packets`: a batch of [`Envelope`]s.
//!
//! ```text
//! version u8 (= 1) | count u16 BE | count × envelope
//! envelope = from_len u16 BE | from (UTF-8) | to_len u16 BE | to (UTF-8)
//!          | packet_len u32 BE | packet
//! ```
//!
//! Names are at most [`MAX_NAME_LEN`] bytes of UTF-8, a batch holds at least
//! one envelope, and nothing may follow the last one. The decoder is total:
//! it never panics and never allocates more than the input it was given
//! (every length is checked against the bytes that remain first), because
//! its input comes from the network.

use thiserror::Error;

/// The only format version this crate reads and writes.
pub const VERSION: u8 = 1;

/// The longest `from` / `to` name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// One packet and the identities it travels between.
///
/// The packet is opaque here: the link layer has already sealed it end to
/// end (Noise); the gateway only carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The sender's X.500 name, e.g. `O=Alice, L=London, C=GB`.
    pub from: String,
    /// The recipient's X.500 name.
    pub to: String,
    /// The sealed packet.
    pub packet: Vec<u8>,
}

/// Why a batch could not be decoded. The server answers `400` with this
/// text; the sender has a bug or is hostile, retrying will not help.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The body is empty.
    #[error("empty batch body")]
    Empty,
    /// The first byte is not [`VERSION`].
    #[error("unsupported batch version {0} (expected {VERSION})")]
    Version(u8),
    /// The batch declares zero envelopes.
    #[error("batch holds no envelopes")]
    NoEnvelopes,
    /// The body ends before the field named.
    #[error("batch truncated in envelope {index}: {field} needs {needed} bytes, {remaining} left")]
    Truncated {
        /// Which envelope (0-based; the header counts as envelope 0).
        index: usize,
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        remaining: usize,
    },
    /// A name is longer than [`MAX_NAME_LEN`].
    #[error("envelope {index}: {field} name is {len} bytes (at most {MAX_NAME_LEN})")]
    NameTooLong {
        /// Which envelope.
        index: usize,
        /// `from` or `to`.
        field: &'static str,
        /// Its declared length.
        len: usize,
    },
    /// A name is not UTF-8.
    #[error("envelope {index}: {field} name is not UTF-8")]
    NotUtf8 {
        /// Which envelope.
        index: usize,
        /// `from` or `to`.
        field: &'static str,
    },
    /// Bytes follow the last envelope.
    #[error("{0} trailing bytes after the last envelope")]
    Trailing(usize),
}

/// Why a batch could not be encoded (a caller bug: the link layer builds
/// envelopes from valid names and bounded packets).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// More than `u16::MAX` envelopes, or none.
    #[error("a batch holds 1..=65535 envelopes, not {0}")]
    Count(usize),
    /// A name longer than [`MAX_NAME_LEN`].
    #[error("name of {0} bytes is longer than {MAX_NAME_LEN}")]
    NameTooLong(usize),
    /// A packet longer than `u32::MAX`.
    #[error("packet of {0} bytes is too long")]
    PacketTooLong(usize),
}

/// Checks that `batch` can be encoded (see [`try_encode_batch`]).
fn check_batch(batch: &[Envelope]) -> Result<(), EncodeError> {
    if batch.is_empty() || batch.len() > usize::from(u16::MAX) {
        return Err(EncodeError::Count(batch.len()));
    }
    for e in batch {
        for name in [&e.from, &e.to] {
            if name.len() > MAX_NAME_LEN {
                return Err(EncodeError::NameTooLong(name.len()));
            }
        }
        if u32::try_from(e.packet.len()).is_err() {
            return Err(EncodeError::PacketTooLong(e.packet.len()));
        }
    }
    Ok(())
}

/// Encodes a batch, or says why it cannot be encoded.
pub fn try_encode_batch(batch: &[Envelope]) -> Result<Vec<u8>, EncodeError> {
    check_batch(batch)?;
    let size = 3 + batch
        .iter()
        .map(|e| 8 + e.from.len() + e.to.len() + e.packet.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(VERSION);
    // Lengths were checked by `check_batch`, so these casts cannot truncate.
    out.extend_from_slice(&(batch.len() as u16).to_be_bytes());
    for e in batch {
        out.extend_from_slice(&(e.from.len() as u16).to_be_bytes());
        out.extend_from_slice(e.from.as_bytes());
        out.extend_from_slice(&(e.to.len() as u16).to_be_bytes());
        out.extend_from_slice(e.to.as_bytes());
        out.extend_from_slice(&(e.packet.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.packet);
    }
    Ok(out)
}

/// Encodes a batch.
///
/// # Panics
///
/// When the batch is not encodable: empty, more than 65535 envelopes, a
/// name over [`MAX_NAME_LEN`] bytes or a packet over 4 GiB. Use
/// [`try_encode_batch`] when the input is not known to be valid.
pub fn encode_batch(batch: &[Envelope]) -> Vec<u8> {
    match try_encode_batch(batch) {
        Ok(bytes) => bytes,
        Err(e) => panic!("encode_batch: {e}"),
    }
}

/// A cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
    index: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Truncated {
                index: self.index,
                field,
                needed: n,
                remaining: self.rest.len(),
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn name(&mut self, field: &'static str, len_field: &'static str) -> Result<String, WireError> {
        let len = usize::from(self.u16(len_field)?);
        if len > MAX_NAME_LEN {
            return Err(WireError::NameTooLong {
                index: self.index,
                field,
                len,
            });
        }
        let bytes = self.take(len, field)?;
        let s = std::str::from_utf8(bytes).map_err(|_| WireError::NotUtf8 {
            index: self.index,
            field,
        })?;
        Ok(s.to_owned())
    }
}

/// Decodes a batch from untrusted bytes.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Envelope>, WireError> {
    let (&version, rest) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let mut r = Reader { rest, index: 0 };
    let count = usize::from(r.u16("count")?);
    if count == 0 {
        return Err(WireError::NoEnvelopes);
    }
    // Each envelope takes at least 8 bytes, so this bounds the allocation by
    // the input size.
    let mut out = Vec::with_capacity(count.min(r.rest.len() / 8));
    for index in 0..count {
        r.index = index;
        let from = r.name("from", "from_len")?;
        let to = r.name("to", "to_len")?;
        let len = r.u32("packet_len")? as usize;
        let packet = r.take(len, "packet")?.to_vec();
        out.push(Envelope { from, to, packet });
    }
    if !r.rest.is_empty() {
        return Err(WireError::Trailing(r.rest.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn envelope() -> impl Strategy<Value = Envelope> {
        (
            "[a-zA-Z0-9=, é]{0,40}",
            "[a-zA-Z0-9=, ü]{0,40}",
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(from, to, packet)| Envelope { from, to, packet })
    }

    fn batch() -> impl Strategy<Value = Vec<Envelope>> {
        proptest::collection::vec(envelope(), 1..8)
    }

    proptest! {
        #[test]
        fn round_trip(b in batch()) {
            let bytes = encode_batch(&b);
            prop_assert_eq!(decode_batch(&bytes).unwrap(), b);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_batch(&bytes);
        }

        #[test]
        fn arbitrary_bytes_after_valid_header_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![VERSION];
            bytes.extend_from_slice(&tail);
            let _ = decode_batch(&bytes);
        }

        #[test]
        fn every_truncation_is_an_error(b in batch(), cut in any::<proptest::sample::Index>()) {
            let bytes = encode_batch(&b);
            let cut = cut.index(bytes.len());
            prop_assert!(decode_batch(&bytes[..cut]).is_err());
        }

        #[test]
        fn trailing_bytes_are_an_error(b in batch(), extra in proptest::collection::vec(any::<u8>(), 1..10)) {
            let mut bytes = encode_batch(&b);
            bytes.extend_from_slice(&extra);
            prop_assert!(decode_batch(&bytes).is_err());
        }
    }

    #[test]
    fn rejects_bad_headers_and_names() {
        assert_eq!(decode_batch(&[]), Err(WireError::Empty));
        assert_eq!(decode_batch(&[2, 0, 1]), Err(WireError::Version(2)));
        assert_eq!(decode_batch(&[1, 0, 0]), Err(WireError::NoEnvelopes));
        // A huge declared count with no bytes behind it: an error, no big allocation.
        assert!(matches!(
            decode_batch(&[1, 0xff, 0xff]),
            Err(WireError::Truncated { .. })
        ));
        // A name over the limit.
        let mut long = vec![1, 0, 1];
        long.extend_from_slice(&2000u16.to_be_bytes());
        long.extend(std::iter::repeat_n(b'a', 2000));
        assert!(matches!(
            decode_batch(&long),
            Err(WireError::NameTooLong { len: 2000, .. })
        ));
        // Not UTF-8.
        let bad = [1, 0, 1, 0, 1, 0xff, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            decode_batch(&bad),
            Err(WireError::NotUtf8 { field: "from", .. })
        ));
        // A huge packet length with nothing behind it.
        let huge = [1, 0, 1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_batch(&huge),
            Err(WireError::Truncated {
                field: "packet",
                ..
            })
        ));
    }

    #[test]
    fn encoder_rejects_invalid_batches() {
        assert_eq!(try_encode_batch(&[]), Err(EncodeError::Count(0)));
        let e = Envelope {
            from: "x".repeat(MAX_NAME_LEN + 1),
            to: String::new(),
            packet: vec![],
        };
        assert!(matches!(
            try_encode_batch(&[e]),
            Err(EncodeError::NameTooLong(_))
        ));
    }
}
