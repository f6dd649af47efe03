use std::time::Duration;

use braid_link::{HandshakeError, Identity, Link, LinkConfig, MessageId, StaticKeypair};

use crate::pair::{Cast, Channel, Pair};

const TTL: Duration = Duration::from_secs(3600);

#[test]
fn handshake_succeeds_with_the_listed_keys() {
    let cast = Cast::new();
    let mut pair = cast.pair(LinkConfig::default(), Channel::clean());
    pair.a
        .link
        .send(pair.now, MessageId(1), b"hello".to_vec(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(5), |p| !p.a.acked.is_empty()));
    assert_eq!(pair.a.established, vec![(1, false)]);
    assert_eq!(pair.b.established, vec![(1, false)]);
    assert_eq!(pair.b.delivered, vec![(MessageId(1), b"hello".to_vec())]);
    assert_eq!(pair.a.acked, vec![MessageId(1)]);
    assert!(
        pair.a.rejected.is_empty() && pair.b.rejected.is_empty(),
        "{:?} {:?}",
        pair.a.rejected,
        pair.b.rejected
    );
}

#[test]
fn simultaneous_handshakes_settle_on_one_session() {
    let cast = Cast::new();
    let mut pair = cast.pair(LinkConfig::default(), Channel::clean());
    let now = pair.now;
    pair.a
        .link
        .send(now, MessageId(1), b"from a".to_vec(), TTL)
        .unwrap();
    pair.b
        .link
        .send(now, MessageId(1), b"from b".to_vec(), TTL)
        .unwrap();
    assert!(pair.run_until(Duration::from_secs(10), |p| {
        p.a.acked.len() == 1 && p.b.acked.len() == 1
    }));
    assert_eq!(pair.a.delivered.len(), 1);
    assert_eq!(pair.b.delivered.len(), 1);
    assert_eq!(pair.a.link.epoch(), pair.b.link.epoch());
}

/// Alice's link uses a key the membership lists for nobody.
#[test]
fn an_unlisted_key_is_refused_by_the_responder() {
    let cast = Cast::new();
    let outsider = StaticKeypair::generate().unwrap();
    let a = Link::new(
        LinkConfig::default(),
        cast.alice.clone(),
        outsider.clone(),
        cast.bob.clone(),
        cast.membership.clone(),
    );
    let mut pair = Pair::new(a, cast.bob(LinkConfig::default()), Channel::clean());
    pair.a
        .link
        .send(pair.now, MessageId(1), b"let me in".to_vec(), TTL)
        .unwrap();
    pair.run_for(Duration::from_secs(5));
    assert!(pair.b.delivered.is_empty());
    assert!(pair.b.established.is_empty());
    let failure = pair.b.handshake_failures.first().expect("bob refused");
    assert_eq!(
        failure,
        &HandshakeError::UnknownKey {
            identity: cast.alice.clone(),
            key: outsider.public()
        }
    );
    assert!(failure.to_string().contains("does not list"), "{failure}");
}

/// Bob's end answers with a key the membership does not list for Bob.
#[test]
fn an_unlisted_key_is_refused_by_the_initiator() {
    let cast = Cast::new();
    let outsider = StaticKeypair::generate().unwrap();
    let b = Link::new(
        LinkConfig::default(),
        cast.bob.clone(),
        outsider.clone(),
        cast.alice.clone(),
        cast.membership.clone(),
    );
    let mut pair = Pair::new(cast.alice(LinkConfig::default()), b, Channel::clean());
    pair.a
        .link
        .send(pair.now, MessageId(1), b"secret".to_vec(), TTL)
        .unwrap();
    pair.run_for(Duration::from_secs(5));
    assert!(pair.a.established.is_empty());
    assert!(pair.b.delivered.is_empty());
    assert!(matches!(
        pair.a.handshake_failures.first(),
        Some(HandshakeError::UnknownKey { identity, .. }) if identity == &cast.bob
    ));
}

/// Mallory, a member, presents her own key while claiming to be Alice.
#[test]
fn a_key_of_another_identity_is_refused() {
    let cast = Cast::new();
    let impostor = Link::new(
        LinkConfig::default(),
        cast.alice.clone(),
        cast.mallory_keys.clone(),
        cast.bob.clone(),
        cast.membership.clone(),
    );
    let mut pair = Pair::new(impostor, cast.bob(LinkConfig::default()), Channel::clean());
    pair.a
        .link
        .send(pair.now, MessageId(1), b"i am alice".to_vec(), TTL)
        .unwrap();
    pair.run_for(Duration::from_secs(5));
    assert!(pair.b.delivered.is_empty());
    let failure = pair.b.handshake_failures.first().expect("bob refused");
    assert_eq!(
        failure,
        &HandshakeError::KeyMismatch {
            identity: cast.alice.clone(),
            key: cast.mallory_keys.public(),
            listed_for: cast.mallory.clone(),
        }
    );
    assert!(failure.to_string().contains("O=Mallory"), "{failure}");
}

/// Mallory answers a handshake meant for Bob.
#[test]
fn a_responder_with_another_identitys_key_is_refused() {
    let cast = Cast::new();
    let impostor = Link::new(
        LinkConfig::default(),
        cast.bob.clone(),
        cast.mallory_keys.clone(),
        cast.alice.clone(),
        cast.membership.clone(),
    );
    let mut pair = Pair::new(
        cast.alice(LinkConfig::default()),
        impostor,
        Channel::clean(),
    );
    pair.a
        .link
        .send(pair.now, MessageId(1), b"for bob".to_vec(), TTL)
        .unwrap();
    pair.run_for(Duration::from_secs(5));
    assert!(pair.b.delivered.is_empty());
    assert!(matches!(
        pair.a.handshake_failures.first(),
        Some(HandshakeError::KeyMismatch { listed_for, .. }) if listed_for == &cast.mallory
    ));
}

/// The identities are bound into the handshake: a peer that thinks it talks
/// to someone else (here Bob's link believes the peer is Mallory) does not
/// complete it, even with every key genuine.
#[test]
fn identities_are_bound_into_the_handshake() {
    let cast = Cast::new();
    let confused = Link::new(
        LinkConfig::default(),
        cast.bob.clone(),
        cast.bob_keys.clone(),
        cast.mallory.clone(),
        cast.membership.clone(),
    );
    let mut pair = Pair::new(
        cast.alice(LinkConfig::default()),
        confused,
        Channel::clean(),
    );
    pair.a
        .link
        .send(pair.now, MessageId(1), b"x".to_vec(), TTL)
        .unwrap();
    pair.run_for(Duration::from_secs(5));
    assert!(pair.b.delivered.is_empty());
    assert!(pair.a.established.is_empty() && pair.b.established.is_empty());
    assert!(matches!(
        pair.a.handshake_failures.first(),
        Some(HandshakeError::Noise { .. })
    ));
}

#[test]
fn a_peer_missing_from_the_membership_is_refused() {
    let cast = Cast::new();
    let stranger = Identity::from("O=Stranger, L=Far, C=ZZ");
    let a = Link::new(
        LinkConfig::default(),
        cast.alice.clone(),
        cast.alice_keys.clone(),
        stranger.clone(),
        cast.membership.clone(),
    );
    let b = Link::new(
        LinkConfig::default(),
        stranger.clone(),
        StaticKeypair::generate().unwrap(),
        cast.alice.clone(),
        cast.membership.clone(),
    );
    let mut pair = Pair::new(a, b, Channel::clean());
    pair.a
        .link
        .send(pair.now, MessageId(1), b"x".to_vec(), TTL)
        .unwrap();
    pair.run_for(Duration::from_secs(2));
    assert_eq!(
        pair.a.handshake_failures.first(),
        Some(&HandshakeError::PeerNotListed { identity: stranger })
    );
}
