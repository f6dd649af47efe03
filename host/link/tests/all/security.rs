use std::time::Duration;

use braid_link::wire::{DecodeError, Packet, TRANSPORT_OVERHEAD};
use braid_link::{LinkConfig, MessageId, PacketError};

use crate::pair::{Cast, Channel, Pair};

const TTL: Duration = Duration::from_secs(3600);

/// Alice and Bob with a session and one message exchanged.
fn established(cast: &Cast) -> Pair {
    let mut pair = cast.pair(LinkConfig::default(), Channel::clean());
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(0), b"warm-up".to_vec(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(5), |p| p.a.acked.len() == 1));
    pair
}

/// Queue a message on Alice's side and take its packet straight off the link.
fn packet_for(pair: &mut Pair, id: u64, body: &[u8]) -> Vec<u8> {
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(id), body.to_vec(), TTL)
        .unwrap();
    let p = pair.a.link.poll_transmit().expect("a sealed packet");
    assert!(matches!(Packet::decode(&p), Ok(Packet::Transport { .. })));
    p
}

#[test]
fn tampered_packets_are_rejected_and_nothing_is_delivered() {
    let cast = Cast::new();
    let mut pair = established(&cast);
    let now = pair.now;
    let secret = b"the secret payload";
    let packet = packet_for(&mut pair, 1, secret);
    assert!(
        !packet.windows(secret.len()).any(|w| w == secret),
        "payload visible in clear"
    );
    let b = &mut pair.b;
    let flip = |i: usize| {
        let mut p = packet.clone();
        p[i] ^= if i == 6 { 0x80 } else { 0x01 };
        p
    };
    // Ciphertext or tag: authentication fails.
    for i in [TRANSPORT_OVERHEAD, packet.len() - 1, packet.len() / 2] {
        assert!(matches!(
            b.link.handle_packet(now, &flip(i)),
            Err(PacketError::AuthenticationFailed { .. })
        ));
    }
    // The sequence number is the nonce: changing it fails authentication too.
    assert!(matches!(
        b.link.handle_packet(now, &flip(6)),
        Err(PacketError::AuthenticationFailed { .. })
    ));
    // Another epoch: no such session.
    assert!(matches!(
        b.link.handle_packet(now, &flip(5)),
        Err(PacketError::UnknownEpoch { .. })
    ));
    // The version byte.
    assert!(matches!(
        b.link.handle_packet(now, &flip(0)),
        Err(PacketError::Decode(DecodeError::UnsupportedVersion(0)))
    ));
    // Truncated.
    assert!(
        b.link
            .handle_packet(now, &packet[..packet.len() - 20])
            .is_err()
    );
    b.drain_events(now);
    assert_eq!(b.delivered.len(), 1, "only the warm-up was delivered");
    // Forged packets did not poison the replay window: the real one goes through.
    b.link.handle_packet(now, &packet).unwrap();
    b.drain_events(now);
    assert_eq!(b.delivered.last(), Some(&(MessageId(1), secret.to_vec())));
}

#[test]
fn replayed_packets_are_rejected() {
    let cast = Cast::new();
    let mut pair = established(&cast);
    let now = pair.now;
    let packet = packet_for(&mut pair, 1, b"once only");
    pair.b.link.handle_packet(now, &packet).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            pair.b.link.handle_packet(now, &packet),
            Err(PacketError::Replayed { .. })
        ));
    }
    pair.b.drain_events(now);
    assert_eq!(pair.b.delivered.len(), 2);
}

#[test]
fn packets_behind_the_replay_window_are_rejected() {
    let cast = Cast::new();
    let mut pair = established(&cast);
    let now = pair.now;
    let first = packet_for(&mut pair, 1, b"held back");
    for i in 2..(2 + braid_link::REPLAY_WINDOW) {
        let p = packet_for(&mut pair, i, b"x");
        pair.b.link.handle_packet(now, &p).unwrap();
    }
    assert!(matches!(
        pair.b.link.handle_packet(now, &first),
        Err(PacketError::TooOld { .. })
    ));
    pair.b.drain_events(now);
    assert!(!pair.b.delivered.iter().any(|(id, _)| *id == MessageId(1)));
}

/// A session's packets are not accepted by another session of the same pair
/// (nor after its grace period): the epoch picks the keys.
#[test]
fn old_session_packets_are_refused_after_the_grace_period() {
    let cast = Cast::new();
    let config = LinkConfig {
        rekey_after_packets: 4,
        rekey_grace: Duration::from_secs(2),
        ..LinkConfig::default()
    };
    let mut pair = cast.pair(config, Channel::clean());
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(0), b"first".to_vec(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(5), |p| p.a.acked.len() == 1));
    let old = packet_for(&mut pair, 1, b"sealed under epoch 1");
    for i in 2..10 {
        let now = pair.now;
        pair.a
            .link
            .send(now, MessageId(i), b"more".to_vec(), TTL)
            .unwrap();
        pair.run_for(Duration::from_millis(100));
    }
    assert!(pair.run_until(Duration::from_secs(10), |p| p.a.link.in_flight() == 0));
    pair.run_for(Duration::from_secs(5));
    assert!(pair.b.link.epoch() > Some(1));
    let now = pair.now;
    assert!(matches!(
        pair.b.link.handle_packet(now, &old),
        Err(PacketError::UnknownEpoch { epoch: 1 })
    ));
}

#[test]
fn oversized_packets_are_refused_before_decoding() {
    let cast = Cast::new();
    let mut pair = established(&cast);
    let now = pair.now;
    let huge = vec![1u8; 32 * 1024 + 1];
    assert!(matches!(
        pair.b.link.handle_packet(now, &huge),
        Err(PacketError::Oversized {
            len: 32769,
            max: 32768
        })
    ));
}
