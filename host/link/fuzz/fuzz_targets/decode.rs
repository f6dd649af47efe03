//! Bytes from a peer into every decoder and into the receive path of a link.
//! Run with `cargo +nightly fuzz run decode` from `host/link/fuzz`.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use braid_link::wire::{Frame, HandshakePayload, Packet};
use braid_link::{Identity, Link, LinkConfig, StaticKeypair, StaticMembership};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    now: Instant,
    keys: StaticKeypair,
    peer: StaticKeypair,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        now: Instant::now(),
        keys: StaticKeypair::generate().expect("keys"),
        peer: StaticKeypair::generate().expect("keys"),
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = Packet::decode(data);
    let _ = Frame::decode(data);
    let _ = HandshakePayload::decode(data);

    // The receive path of a fresh link: a packet, then the same bytes split
    // in two, as a peer could send them.
    let f = fixture();
    let (local, remote) = (
        Identity::from("O=Bob, L=Paris, C=FR"),
        Identity::from("O=Alice, L=London, C=GB"),
    );
    let mut membership = StaticMembership::new();
    membership.insert(remote.clone(), f.peer.public());
    let mut link = Link::new(
        LinkConfig::default(),
        local,
        f.keys.clone(),
        remote,
        Arc::new(membership),
    );
    let _ = link.handle_packet(f.now, data);
    let mid = data.len() / 2;
    let _ = link.handle_packet(f.now, &data[..mid]);
    let _ = link.handle_packet(f.now, &data[mid..]);
    link.handle_timeout(f.now);
    while link.poll_transmit().is_some() {}
    while let Some(event) = link.poll_event() {
        assert!(
            !matches!(event, braid_link::Event::Delivered { .. }),
            "delivered from unauthenticated bytes"
        );
    }
});
