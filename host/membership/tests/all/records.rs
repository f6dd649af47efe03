use braid_membership::pki;
use braid_membership::{
    ApprovedMember, MembershipError, NetworkMap, SignedMemberInfo, SignedNetworkMap,
};

use crate::common::{ALICE, BOB, net};

fn map_of(members: Vec<SignedMemberInfo>) -> NetworkMap {
    NetworkMap {
        group: "braid-dev".into(),
        version: 3,
        issued_ms: pki::now_ms(),
        members: members
            .into_iter()
            .map(|member| ApprovedMember {
                member,
                approved_ms: 1,
                last_seen_ms: 2,
            })
            .collect(),
    }
}

#[test]
fn sign_verify_round_trip() {
    let n = net(&["alice"]);
    let info = n.info(0, ALICE, 1, 1);
    let (_, key) = n.creds(0);
    let signed = SignedMemberInfo::sign(&info, &key).unwrap();
    assert_eq!(signed.verify(&n.ca_der, pki::now_ms()).unwrap(), info);
    assert_eq!(signed.verify(&n.ca_pem, pki::now_ms()).unwrap(), info);
    let back = braid_membership::decode_signed_member(&signed.to_bytes()).unwrap();
    assert_eq!(back, signed);
}

#[test]
fn tampered_info_is_rejected() {
    let n = net(&["alice"]);
    let mut signed = n.member(0, ALICE, 1, 1);
    let mut info = signed.info_unverified().unwrap();
    info.endpoint = "https://10.0.0.1:1".into();
    signed.info = postcard::to_allocvec(&info).unwrap();
    let err = signed.verify(&n.ca_der, pki::now_ms()).unwrap_err();
    assert!(
        matches!(&err, MembershipError::BadMemberSignature { member } if member == ALICE),
        "{err}"
    );
    // A flipped byte anywhere fails (as a signature or decode error).
    let mut signed = n.member(0, ALICE, 1, 1);
    let last = signed.info.len() - 1;
    signed.info[last] ^= 1;
    assert!(signed.verify(&n.ca_der, pki::now_ms()).is_err());
}

#[test]
fn certificate_of_another_ca_is_rejected() {
    let n = net(&["alice"]);
    let foreign = net(&["mallory"]);
    let signed = foreign.member(0, ALICE, 1, 1);
    let err = signed.verify(&n.ca_der, pki::now_ms()).unwrap_err();
    assert!(
        matches!(&err, MembershipError::UntrustedCertificate { member, .. } if member == ALICE),
        "{err}"
    );
    // A foreign chain signed with our node's key: still untrusted.
    let mut info = foreign.info(0, ALICE, 1, 1);
    info.tls_chain = foreign.creds(0).0;
    let signed = SignedMemberInfo::sign(&info, &n.creds(0).1).unwrap();
    assert!(matches!(
        signed.verify(&n.ca_der, pki::now_ms()),
        Err(MembershipError::UntrustedCertificate { .. })
    ));
}

#[test]
fn expired_view_of_time_is_rejected() {
    let n = net(&["alice"]);
    let signed = n.member(0, ALICE, 1, 1);
    // Far in the future: the certificate has expired.
    let err = signed
        .verify(&n.ca_der, pki::now_ms() + 20 * 365 * 24 * 3600 * 1000)
        .unwrap_err();
    assert!(
        matches!(err, MembershipError::UntrustedCertificate { .. }),
        "{err}"
    );
}

#[test]
fn map_round_trip_and_operator_signature() {
    let n = net(&["alice", "bob"]);
    let map = map_of(vec![n.member(0, ALICE, 1, 1), n.member(1, BOB, 2, 1)]);
    let signed = SignedNetworkMap::sign(&map, &n.op_key).unwrap();
    let view = signed.verify(&n.op_pub, &n.ca_pem, pki::now_ms()).unwrap();
    assert_eq!(view.version(), 3);
    assert_eq!(view.members().len(), 2);
    let wire = braid_membership::decode_signed_map(&signed.to_bytes()).unwrap();
    assert_eq!(wire, signed);

    // Signed by a key that is not the operator's (a node's P-256 key).
    let forged = SignedNetworkMap::sign(&map, &n.creds(0).1).unwrap();
    let err = forged
        .verify(&n.op_pub, &n.ca_der, pki::now_ms())
        .unwrap_err();
    assert!(
        matches!(err, MembershipError::BadMapSignature { version: 3 }),
        "{err}"
    );

    // Operator-signed map, content altered afterwards.
    let mut altered = signed.clone();
    let mut m = altered.map_unverified().unwrap();
    m.version = 4;
    altered.map = postcard::to_allocvec(&m).unwrap();
    assert!(matches!(
        altered.verify(&n.op_pub, &n.ca_der, pki::now_ms()),
        Err(MembershipError::BadMapSignature { .. })
    ));
}

#[test]
fn invalid_member_inside_operator_signed_map_is_named() {
    let n = net(&["alice", "bob"]);
    let mut bad = n.member(1, BOB, 2, 1);
    let last = bad.signature.len() - 1;
    bad.signature[last] ^= 0x55;
    let map = map_of(vec![n.member(0, ALICE, 1, 1), bad]);
    let signed = SignedNetworkMap::sign(&map, &n.op_key).unwrap();
    let err = signed
        .verify(&n.op_pub, &n.ca_der, pki::now_ms())
        .unwrap_err();
    assert!(
        matches!(&err, MembershipError::BadMemberSignature { member } if member == BOB),
        "{err}"
    );
    assert!(err.to_string().contains("Bob"));
}

#[test]
fn view_lookups_and_link_membership() {
    use braid_link::{Identity, Membership, PublicKey};
    let n = net(&["alice", "bob"]);
    let map = map_of(vec![n.member(0, ALICE, 1, 1), n.member(1, BOB, 2, 1)]);
    let view = SignedNetworkMap::sign(&map, &n.op_key)
        .unwrap()
        .verify(&n.op_pub, &n.ca_der, pki::now_ms())
        .unwrap();
    let alice = ALICE.parse().unwrap();
    assert_eq!(view.member(&alice).unwrap().session_key, [1; 32]);
    let bob_ep = &n.net.nodes[1].config.gateway_endpoint;
    assert_eq!(
        view.member_by_endpoint(&format!("{bob_ep}/"))
            .unwrap()
            .name
            .as_str(),
        BOB
    );
    let bob_leaf = &n.creds(1).0[0];
    assert_eq!(
        view.is_member_tls_cert(bob_leaf).unwrap().name.as_str(),
        BOB
    );
    assert!(view.is_member_tls_cert(&n.creds(1).0[1]).is_none()); // the CA is not a member
    assert_eq!(
        view.session_key(&Identity::from(ALICE)),
        Some(PublicKey([1; 32]))
    );
    assert_eq!(
        view.identity_of(&PublicKey([2; 32])),
        Some(Identity::from(BOB))
    );
    assert_eq!(view.identity_of(&PublicKey([9; 32])), None);
    assert!(braid_membership::MapView::empty().members().is_empty());
}
