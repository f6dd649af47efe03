//! Network-map records from a peer: a signed map (the map server's answer)
//! and a signed member record (a registration request), postcard-encoded,
//! and the records nested inside them (decoded before verification). Every
//! decoder must be total; a decoded value must survive a round trip.
#![no_main]

use braid_membership::{
    SignedMemberInfo, SignedNetworkMap, decode_signed_map, decode_signed_member,
};
use libfuzzer_sys::fuzz_target;

fn round_trip<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = postcard::to_allocvec(value).expect("a decoded value encodes");
    let again: T = postcard::from_bytes(&bytes).expect("an encoded value decodes");
    assert_eq!(&again, value);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = decode_signed_map(data) {
        round_trip(&signed);
        assert_eq!(
            decode_signed_map(&signed.to_bytes()).ok(),
            Some(signed.clone())
        );
        if let Ok(map) = signed.map_unverified() {
            round_trip(&map);
            for approved in &map.members {
                if let Ok(info) = approved.member.info_unverified() {
                    round_trip(&info);
                    let _ = info.tls_leaf();
                }
            }
        }
    }
    if let Ok(signed) = decode_signed_member(data) {
        round_trip(&signed);
        assert_eq!(
            decode_signed_member(&signed.to_bytes()).ok(),
            Some(signed.clone())
        );
        if let Ok(info) = signed.info_unverified() {
            round_trip(&info);
            let _ = info.tls_leaf();
        }
    }
    // The nested records straight from the input, as if a well-formed outer
    // record carried these bytes (the fuzzer need not build both layers).
    let signature = Vec::new();
    let outer = SignedNetworkMap {
        map: data.to_vec(),
        signature,
    };
    if let Ok(map) = outer.map_unverified() {
        round_trip(&map);
    }
    let outer = SignedMemberInfo {
        info: data.to_vec(),
        signature: outer.signature,
    };
    if let Ok(info) = outer.info_unverified() {
        round_trip(&info);
    }
});
