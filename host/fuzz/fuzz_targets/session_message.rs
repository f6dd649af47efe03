//! What the link manager decodes from a delivered payload: a postcard
//! `SessionMessage` (host/p2p `decode_inbound`). Decoding must be total, and
//! a decoded message must survive an encode/decode round trip unchanged.
//! Postcard accepts over-long varints, so the bytes themselves need not
//! round-trip; the re-encoding must be a fixed point.
#![no_main]

use braid_types::SessionMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = postcard::from_bytes::<SessionMessage>(data) else {
        return;
    };
    let bytes = postcard::to_allocvec(&message).expect("a decoded message encodes");
    let again: SessionMessage = postcard::from_bytes(&bytes).expect("an encoded message decodes");
    assert_eq!(again, message);
    assert_eq!(postcard::to_allocvec(&again).expect("encodes"), bytes);
    // What the receiver computes from it next.
    let _ = message.destination_flow();
    let _ = message.key();
});
