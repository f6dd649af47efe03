//! The body of a `POST /gateway/v1/packets` from a peer gateway. The batch
//! format is canonical: a batch that decodes re-encodes to the same bytes.
#![no_main]

use braid_gateway::wire::{decode_batch, encode_batch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode_batch(data) {
        assert!(!batch.is_empty(), "a decoded batch holds an envelope");
        assert_eq!(encode_batch(&batch), data, "batch re-encodes differently");
    }
});
