use std::collections::HashMap;
use std::time::Duration;

use braid_link::{DeadLetterReason, LinkConfig, MessageId, PacketError, ReassemblyError};

use crate::pair::{Cast, Channel, Pair, Side};

const TTL: Duration = Duration::from_secs(3600);

fn payload(side: u8, i: u64) -> Vec<u8> {
    format!("{side}:{i}:")
        .repeat(1 + (i % 7) as usize)
        .into_bytes()
}

/// Every message sent by `from` reached `to` exactly once, intact.
pub fn assert_exactly_once(from: &Side, to: &Side, sent: &HashMap<MessageId, Vec<u8>>) {
    let mut seen = HashMap::new();
    for (id, bytes) in &to.delivered {
        assert_eq!(
            Some(bytes),
            sent.get(id),
            "message {id} corrupted or unknown"
        );
        *seen.entry(*id).or_insert(0) += 1;
    }
    for id in sent.keys() {
        assert_eq!(
            seen.get(id),
            Some(&1),
            "message {id} delivered {:?} times",
            seen.get(id)
        );
    }
    assert_eq!(
        from.acked.len(),
        sent.len(),
        "every message acknowledged once"
    );
    assert!(from.dead.is_empty(), "dead letters: {:?}", from.dead);
}

fn send_both_ways(
    pair: &mut Pair,
    n: u64,
) -> (HashMap<MessageId, Vec<u8>>, HashMap<MessageId, Vec<u8>>) {
    let (mut from_a, mut from_b) = (HashMap::new(), HashMap::new());
    for i in 0..n {
        let now = pair.now;
        pair.a
            .link
            .send(now, MessageId(i), payload(0, i), TTL)
            .unwrap();
        pair.b
            .link
            .send(now, MessageId(i), payload(1, i), TTL)
            .unwrap();
        from_a.insert(MessageId(i), payload(0, i));
        from_b.insert(MessageId(i), payload(1, i));
        // Spread the sends over time, so they interleave with resends.
        pair.run_for(Duration::from_millis(10));
    }
    (from_a, from_b)
}

#[test]
fn exactly_once_under_loss_duplication_and_reordering() {
    let cast = Cast::new();
    let channel = Channel::lossy(0.30, 0.20, Duration::from_millis(80), 7);
    let mut pair = cast.pair(LinkConfig::default(), channel);
    let (from_a, from_b) = send_both_ways(&mut pair, 200);
    assert!(pair.run_until(Duration::from_secs(600), |p| {
        p.a.link.in_flight() == 0 && p.b.link.in_flight() == 0
    }));
    // Let stray duplicates and resends drain.
    pair.run_for(Duration::from_secs(30));
    assert_exactly_once(&pair.a, &pair.b, &from_a);
    assert_exactly_once(&pair.b, &pair.a, &from_b);
    // The channel really did duplicate: the replay window saw copies.
    assert!(
        pair.b
            .rejected
            .iter()
            .any(|e| matches!(e, PacketError::Replayed { .. }))
    );
}

#[test]
fn rekey_mid_stream_loses_nothing() {
    let cast = Cast::new();
    let config = LinkConfig {
        rekey_after_packets: 40,
        ..LinkConfig::default()
    };
    let channel = Channel::lossy(0.20, 0.10, Duration::from_millis(50), 11);
    let mut pair = cast.pair(config, channel);
    let (from_a, from_b) = send_both_ways(&mut pair, 300);
    assert!(pair.run_until(Duration::from_secs(600), |p| {
        p.a.link.in_flight() == 0 && p.b.link.in_flight() == 0
    }));
    pair.run_for(Duration::from_secs(30));
    assert_exactly_once(&pair.a, &pair.b, &from_a);
    assert_exactly_once(&pair.b, &pair.a, &from_b);
    let rekeys = pair
        .a
        .established
        .iter()
        .filter(|(_, rekey)| *rekey)
        .count();
    assert!(
        rekeys >= 5,
        "only {rekeys} re-keys: {:?}",
        pair.a.established
    );
    assert_eq!(pair.a.link.epoch(), pair.b.link.epoch());
}

#[test]
fn rekey_by_age() {
    let cast = Cast::new();
    let config = LinkConfig {
        rekey_after: Duration::from_secs(5),
        ..LinkConfig::default()
    };
    let mut pair = cast.pair(config, Channel::clean());
    for i in 0..20 {
        let now = pair.now;
        pair.a
            .link
            .send(now, MessageId(i), payload(0, i), TTL)
            .unwrap();
        pair.run_for(Duration::from_secs(1));
    }
    assert!(pair.run_until(Duration::from_secs(60), |p| p.a.link.in_flight() == 0));
    assert!(
        pair.a.established.len() >= 3,
        "{:?} {:?} {:?} {:?}",
        pair.a.established,
        pair.b.established,
        pair.a.handshake_failures,
        pair.b.rejected
    );
    assert_eq!(pair.b.delivered.len(), 20);
}

#[test]
fn a_message_past_its_ttl_is_dead_lettered() {
    let cast = Cast::new();
    // Everything is lost: Bob is unreachable.
    let mut pair = cast.pair(
        LinkConfig::default(),
        Channel::lossy(1.0, 0.0, Duration::ZERO, 1),
    );
    let now = pair.now;
    pair.a
        .link
        .send(
            now,
            MessageId(9),
            b"too late".to_vec(),
            Duration::from_secs(5),
        )
        .unwrap();
    pair.run_for(Duration::from_secs(10));
    assert_eq!(pair.a.dead, vec![(MessageId(9), DeadLetterReason::Expired)]);
    assert_eq!(pair.a.link.in_flight(), 0);
    assert!(pair.b.delivered.is_empty());
}

#[test]
fn unacknowledged_until_durable() {
    let cast = Cast::new();
    let mut pair = cast.pair(LinkConfig::default(), Channel::clean());
    pair.b.auto_durable = false;
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(3), b"store me".to_vec(), TTL)
        .unwrap();
    pair.run_for(Duration::from_secs(20));
    // Resent many times, delivered once, never acknowledged.
    assert_eq!(pair.b.delivered.len(), 1);
    assert!(pair.a.acked.is_empty());
    let now = pair.now;
    pair.b.link.mark_durable(now, MessageId(3)).unwrap();
    assert!(pair.b.link.mark_durable(now, MessageId(3)).is_err());
    assert!(pair.run_until(Duration::from_secs(20), |p| !p.a.acked.is_empty()));
    assert_eq!(pair.b.delivered.len(), 1);
}

#[test]
fn one_mib_is_fragmented_and_reassembled() {
    let cast = Cast::new();
    let big: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let channel = Channel::lossy(0.30, 0.20, Duration::from_millis(30), 3);
    let mut pair = cast.pair(LinkConfig::default(), channel);
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(1), big.clone(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(120), |p| !p.a.acked.is_empty()));
    assert_eq!(pair.b.delivered.len(), 1);
    assert!(pair.b.delivered[0].1 == big, "reassembled payload differs");
    // 32 KiB packets: 33+ fragments per attempt, so it was split.
    assert!(pair.a.sent.len() > 33);
    assert!(pair.a.sent.iter().all(|p| p.len() <= 32 * 1024));
}

#[test]
fn reassembly_beyond_the_budget_is_refused() {
    let cast = Cast::new();
    let small = LinkConfig {
        reassembly_budget: 100_000,
        ..LinkConfig::default()
    };
    let mut pair = Pair::new(
        cast.alice(LinkConfig::default()),
        cast.bob(small),
        Channel::clean(),
    );
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(1), vec![7; 200_000], Duration::from_secs(5))
        .unwrap();
    pair.run_for(Duration::from_secs(6));
    assert!(pair.b.delivered.is_empty());
    assert!(pair.b.rejected.iter().any(|e| matches!(
        e,
        PacketError::Reassembly(ReassemblyError::BufferFull {
            needed: 200_000,
            ..
        })
    )));
    assert_eq!(pair.a.dead, vec![(MessageId(1), DeadLetterReason::Expired)]);
}

#[test]
fn maximum_message_size_is_negotiated() {
    let cast = Cast::new();
    let small = LinkConfig {
        max_message: 1000,
        max_packet: 512,
        ..LinkConfig::default()
    };
    let mut pair = Pair::new(
        cast.alice(LinkConfig::default()),
        cast.bob(small),
        Channel::clean(),
    );
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(1), vec![1; 2000], TTL)
        .unwrap();
    pair.a
        .link
        .send(now, MessageId(2), vec![2; 1000], TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(10), |p| p.a.link.in_flight() == 0));
    assert_eq!(
        pair.a.dead,
        vec![(
            MessageId(1),
            DeadLetterReason::TooLargeForPeer {
                len: 2000,
                max: 1000
            }
        )]
    );
    assert_eq!(pair.b.delivered, vec![(MessageId(2), vec![2; 1000])]);
    // The smaller packet size was used for the 1000-byte message.
    assert!(pair.a.sent.iter().all(|p| p.len() <= 512));
}

#[test]
fn a_restarted_peer_is_reached_again() {
    let cast = Cast::new();
    let mut pair = cast.pair(LinkConfig::default(), Channel::clean());
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(1), b"one".to_vec(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(5), |p| p.a.acked.len() == 1));
    // Bob restarts and loses the session (his durable store kept message 1).
    pair.b = Side::new(cast.bob(LinkConfig::default()));
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(2), b"two".to_vec(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(120), |p| p.a.acked.len() == 2));
    assert_eq!(pair.b.delivered, vec![(MessageId(2), b"two".to_vec())]);
    assert!(
        pair.b
            .rejected
            .iter()
            .any(|e| matches!(e, PacketError::UnknownEpoch { .. }))
    );
}

#[test]
fn a_restarted_receiver_resyncs_at_once() {
    let cast = Cast::new();
    let mut pair = cast.pair(LinkConfig::default(), Channel::clean());
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(1), b"one".to_vec(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(5), |p| p.a.acked.len() == 1));
    // Bob restarts (a higher epoch base, as the driver's boot counter gives)
    // and answers Alice's packets under the old session with a handshake.
    pair.b = Side::new(cast.bob(LinkConfig {
        initial_epoch: 1 << 16,
        ..LinkConfig::default()
    }));
    pair.b.resync = true;
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(2), b"two".to_vec(), TTL)
        .unwrap();
    // Well inside dead_peer_after (30 s), which is what Alice would
    // otherwise wait before a handshake of her own.
    assert!(pair.run_until(Duration::from_secs(3), |p| p.a.acked.len() == 2));
    assert_eq!(pair.b.delivered, vec![(MessageId(2), b"two".to_vec())]);
    assert!(pair.b.established.iter().any(|(e, _)| *e > 1 << 16));
}

#[test]
fn a_peer_that_restarts_with_an_old_epoch_is_resynchronised() {
    let cast = Cast::new();
    let mut pair = cast.pair(LinkConfig::default(), Channel::clean());
    let now = pair.now;
    pair.b
        .link
        .send(now, MessageId(1), b"one".to_vec(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(5), |p| p.b.acked.len() == 1));
    // Bob restarts without advancing his epoch and initiates again.
    pair.b = Side::new(cast.bob(LinkConfig::default()));
    let now = pair.now;
    pair.b
        .link
        .send(now, MessageId(2), b"two".to_vec(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(60), |p| p.b.acked.len() == 1));
    assert_eq!(pair.a.delivered.len(), 2);
    assert!(
        pair.a
            .rejected
            .iter()
            .any(|e| matches!(e, PacketError::StaleHandshake { .. }))
    );
}

#[test]
fn resend_timer_follows_the_measured_round_trip() {
    // Up to 300 ms each way: the round trip is often longer than the
    // initial resend delay (200 ms). With a timer from the measured round
    // trip, messages after the first few are sent once.
    let cast = Cast::new();
    let mut pair = cast.pair(
        LinkConfig::default(),
        Channel::lossy(0.0, 0.0, Duration::from_millis(300), 7),
    );
    const N: u64 = 100;
    for i in 0..N {
        let now = pair.now;
        pair.a
            .link
            .send(now, MessageId(i), vec![i as u8; 16], TTL)
            .unwrap();
        pair.run_for(Duration::from_millis(50));
    }
    assert!(pair.run_until(Duration::from_secs(60), |p| p.a.acked.len() == N as usize));
    assert_eq!(pair.b.delivered.len(), N as usize);
    // Every packet Alice sent: handshake, N messages, and resends.
    let sent = pair.a.sent.len() as u64;
    eprintln!("alice sent {sent} packets for {N} messages");
    assert!(
        sent < N + N / 5,
        "{sent} packets for {N} messages: the resend timer ignores the round trip"
    );
}
