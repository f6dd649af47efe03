//! Bytes from a peer into the link's hand-written decoders: the packet (what
//! crosses the gateway), the frame (what a sealed packet carries) and the
//! handshake payload. Each must be total, and each format is canonical: a
//! value that decodes re-encodes to exactly the bytes it came from.
#![no_main]

use braid_link::wire::{Frame, HandshakePayload, Packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = Packet::decode(data) {
        assert_eq!(
            packet.encode(),
            data,
            "packet {packet:?} re-encodes differently"
        );
    }
    if let Ok(frame) = Frame::decode(data) {
        assert_eq!(
            frame.encode(),
            data,
            "frame {frame:?} re-encodes differently"
        );
    }
    if let Ok(payload) = HandshakePayload::decode(data) {
        assert_eq!(
            payload.encode(),
            data,
            "payload {payload:?} re-encodes differently"
        );
    }
});
