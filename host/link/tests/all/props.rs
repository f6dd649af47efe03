//! Properties over arbitrary channel behaviour and arbitrary peer bytes.

use std::collections::HashMap;
use std::time::Duration;

use braid_link::{LinkConfig, MessageId};
use proptest::prelude::*;

use crate::delivery::assert_exactly_once;
use crate::pair::{Cast, Channel, Fate};

const TTL: Duration = Duration::from_secs(3600);

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        3 => Just(Fate::Deliver),
        3 => Just(Fate::Drop),
        2 => Just(Fate::Duplicate),
        2 => (0u64..500).prop_map(|ms| Fate::Delay(Duration::from_millis(ms))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever the channel drops, duplicates or delays, every message in
    /// both directions is delivered exactly once and acknowledged.
    #[test]
    fn exactly_once_for_any_loss_and_duplication(
        fates in proptest::collection::vec(fate(), 0..300),
        n_a in 1u64..12,
        n_b in 0u64..12,
        rekey in 3u64..50,
    ) {
        let cast = Cast::new();
        let config = LinkConfig { rekey_after_packets: rekey, ..LinkConfig::default() };
        let mut pair = cast.pair(config, Channel::Pattern(fates.into_iter()));
        let (mut from_a, mut from_b) = (HashMap::new(), HashMap::new());
        for i in 0..n_a.max(n_b) {
            let now = pair.now;
            if i < n_a {
                let body = vec![i as u8; 1 + i as usize * 3];
                pair.a.link.send(now, MessageId(i), body.clone(), TTL).unwrap();
                from_a.insert(MessageId(i), body);
            }
            if i < n_b {
                let body = vec![!(i as u8); 2 + i as usize];
                pair.b.link.send(now, MessageId(i), body.clone(), TTL).unwrap();
                from_b.insert(MessageId(i), body);
            }
            pair.run_for(Duration::from_millis(20));
        }
        let drained = pair.run_until(Duration::from_secs(900), |p| {
            p.a.link.in_flight() == 0 && p.b.link.in_flight() == 0
        });
        prop_assert!(drained);
        pair.run_for(Duration::from_secs(5));
        assert_exactly_once(&pair.a, &pair.b, &from_a);
        assert_exactly_once(&pair.b, &pair.a, &from_b);
    }

    /// Arbitrary bytes into the receive path of a fresh and of an
    /// established link: never a panic, never a delivery.
    #[test]
    fn arbitrary_packets_never_panic_or_deliver(
        packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20),
    ) {
        let cast = Cast::new();
        let mut pair = cast.pair(LinkConfig::default(), Channel::clean());
        let now = pair.now;
        let _ = pair.a.link.send(now, MessageId(0), b"x".to_vec(), TTL);
        prop_assert!(pair.run_until(Duration::from_secs(5), |p| p.a.acked.len() == 1));
        let mut fresh = cast.bob(LinkConfig::default());
        for p in &packets {
            let mut p = p.clone();
            // Often make the header plausible so decoding gets further.
            if p.len() > 6 && p[0] % 2 == 0 {
                p[0] = braid_link::wire::VERSION;
                p[1] = 1 + p[1] % 4;
                p[2..6].copy_from_slice(&1u32.to_be_bytes());
            }
            let _ = pair.b.link.handle_packet(now, &p);
            let _ = fresh.handle_packet(now, &p);
        }
        pair.b.drain_events(now);
        prop_assert_eq!(pair.b.delivered.len(), 1);
        while let Some(e) = fresh.poll_event() {
            let delivered = matches!(e, braid_link::Event::Delivered { .. });
            prop_assert!(!delivered);
        }
    }
}
