//! The signed records of the network map and their wire encoding.
//!
//! A member describes itself in a [`MemberInfo`] and signs its postcard
//! encoding with the private key of its leaf TLS certificate
//! ([`SignedMemberInfo`]). The operator collects approved records into a
//! [`NetworkMap`] and signs its encoding with the operator key
//! ([`SignedNetworkMap`]). Both signatures are ECDSA P-256 with SHA-256,
//! ASN.1 (DER) encoded: the key type rcgen generates by default.
//!
//! # What binds a record to its member
//!
//! There is **no subject rule**: the TLS certificate's subject (CN/O) need
//! not spell the member's X.500 name, because one node's certificate serves
//! every vnode it hosts. The binding is the signature: a record is accepted
//! only when it is signed by the key of a leaf certificate that chains to the
//! network CA and is valid for TLS server or client authentication. The map
//! server then keeps a name bound to the leaf key that first registered it
//! (a later record for that name signed by another leaf is a conflict), and
//! the gateway accepts a peer only when the TLS certificate it presents is
//! the leaf its record lists ([`crate::MapView::is_member_tls_cert`]).

use std::time::Duration;

use braid_types::X500Name;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use webpki::{EndEntityCert, KeyUsage};

use crate::MapView;
use crate::MembershipError;
use crate::pki;

/// At most this many certificates in a member's TLS chain.
pub const MAX_CHAIN_LEN: usize = 8;

/// What a member says about itself (one vnode of a node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The member's X.500 name.
    pub name: X500Name,
    /// The application network (group) it belongs to.
    pub group: String,
    /// The member's gateway, e.g. `https://127.0.0.1:7001`.
    pub endpoint: String,
    /// The X25519 Noise static public key of its link sessions.
    pub session_key: [u8; 32],
    /// Its TLS certificate chain, DER, leaf first, issued by the network CA.
    pub tls_chain: Vec<Vec<u8>>,
    /// The braid platform version the member runs.
    pub platform_version: u32,
    /// Grows with each change the member publishes.
    pub serial: u64,
    /// When the member signed this record (ms since the Unix epoch).
    pub issued_ms: u64,
}

impl MemberInfo {
    /// The leaf TLS certificate (DER), if the chain is not empty.
    pub fn tls_leaf(&self) -> Option<&[u8]> {
        self.tls_chain.first().map(Vec::as_slice)
    }
}

/// A [`MemberInfo`] signed by the member's leaf TLS certificate key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedMemberInfo {
    /// `postcard(MemberInfo)`: the exact bytes signed.
    pub info: Vec<u8>,
    /// ECDSA P-256 SHA-256 (ASN.1) signature of `info`.
    pub signature: Vec<u8>,
}

impl SignedMemberInfo {
    /// Encodes `info` and signs it with the PKCS#8 DER of the private key of
    /// `info.tls_chain[0]`.
    pub fn sign(info: &MemberInfo, tls_key_pkcs8_der: &[u8]) -> Result<Self, MembershipError> {
        let bytes = postcard::to_allocvec(info)
            .map_err(|e| MembershipError::crypto("encoding member info", e))?;
        let signature = pki::sign_p256(tls_key_pkcs8_der, &bytes)?;
        Ok(Self {
            info: bytes,
            signature,
        })
    }

    /// The record's content, decoded but **not verified**.
    pub fn info_unverified(&self) -> Result<MemberInfo, MembershipError> {
        decode_exact("member info", &self.info)
    }

    /// Verifies the record: its leaf (with any intermediates) chains to the
    /// network CA (`network_ca` PEM or DER) at `now_ms` and is valid for TLS
    /// server or client authentication, and the signature verifies with the
    /// leaf's key. Returns the content. No subject rule: see the module docs.
    pub fn verify(&self, network_ca: &[u8], now_ms: u64) -> Result<MemberInfo, MembershipError> {
        let ca = pki::cert_from_pem_or_der(network_ca)?;
        self.verify_with_ca_der(&ca, now_ms)
    }

    pub(crate) fn verify_with_ca_der(
        &self,
        ca_der: &[u8],
        now_ms: u64,
    ) -> Result<MemberInfo, MembershipError> {
        let info = self.info_unverified()?;
        let member = info.name.to_string();
        if info.tls_chain.is_empty() {
            return Err(MembershipError::InvalidRecord {
                member,
                reason: "empty TLS certificate chain".into(),
            });
        }
        if info.tls_chain.len() > MAX_CHAIN_LEN {
            return Err(MembershipError::InvalidRecord {
                member,
                reason: format!(
                    "TLS chain of {} certificates (at most {MAX_CHAIN_LEN})",
                    info.tls_chain.len()
                ),
            });
        }
        let ca_cert = CertificateDer::from(ca_der);
        let anchor = webpki::anchor_from_trusted_cert(&ca_cert)
            .map_err(|e| MembershipError::credential("network CA certificate", format!("{e:?}")))?;
        let anchors = [anchor];
        let leaf_der = CertificateDer::from(info.tls_chain[0].as_slice());
        let leaf = EndEntityCert::try_from(&leaf_der).map_err(|e| {
            MembershipError::UntrustedCertificate {
                member: member.clone(),
                reason: format!("leaf certificate does not parse: {e:?}"),
            }
        })?;
        let intermediates: Vec<CertificateDer<'_>> = info.tls_chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let time = UnixTime::since_unix_epoch(Duration::from_millis(now_ms));
        let server = leaf.verify_for_usage(
            SIG_ALGS,
            &anchors,
            &intermediates,
            time,
            KeyUsage::server_auth(),
            None,
            None,
        );
        if let Err(server_err) = server {
            leaf.verify_for_usage(
                SIG_ALGS,
                &anchors,
                &intermediates,
                time,
                KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|_| MembershipError::UntrustedCertificate {
                member: member.clone(),
                reason: format!("{server_err:?}"),
            })?;
        }
        leaf.verify_signature(webpki::ring::ECDSA_P256_SHA256, &self.info, &self.signature)
            .map_err(|_| MembershipError::BadMemberSignature { member })?;
        Ok(info)
    }

    /// The postcard encoding sent on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }
}

static SIG_ALGS: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// A member the operator approved, as listed in the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovedMember {
    /// The member's own signed record.
    pub member: SignedMemberInfo,
    /// When the operator approved it (ms since the Unix epoch).
    pub approved_ms: u64,
    /// When the operator last heard from it (ms since the Unix epoch).
    pub last_seen_ms: u64,
}

/// The network map: every approved member of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMap {
    /// The application network (group).
    pub group: String,
    /// Grows with every change the operator makes.
    pub version: u64,
    /// When the operator signed this version (ms since the Unix epoch).
    pub issued_ms: u64,
    /// The approved members.
    pub members: Vec<ApprovedMember>,
}

/// A [`NetworkMap`] signed by the operator key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedNetworkMap {
    /// `postcard(NetworkMap)`: the exact bytes signed.
    pub map: Vec<u8>,
    /// ECDSA P-256 SHA-256 (ASN.1) signature of `map` by the operator key.
    pub signature: Vec<u8>,
}

impl SignedNetworkMap {
    /// Encodes and signs `map` with the operator's PKCS#8 DER key.
    pub fn sign(map: &NetworkMap, operator_key_pkcs8_der: &[u8]) -> Result<Self, MembershipError> {
        let bytes = postcard::to_allocvec(map)
            .map_err(|e| MembershipError::crypto("encoding network map", e))?;
        let signature = pki::sign_p256(operator_key_pkcs8_der, &bytes)?;
        Ok(Self {
            map: bytes,
            signature,
        })
    }

    /// The map, decoded but **not verified**.
    pub fn map_unverified(&self) -> Result<NetworkMap, MembershipError> {
        decode_exact("network map", &self.map)
    }

    /// Verifies the operator signature with `operator_public_key` (SPKI, PEM
    /// or DER) and every member's record against `network_ca` (PEM or DER) at
    /// `now_ms` (see [`SignedMemberInfo::verify`]); every member must belong
    /// to the map's group. The first member failing is named in the error.
    pub fn verify(
        &self,
        operator_public_key: &[u8],
        network_ca: &[u8],
        now_ms: u64,
    ) -> Result<MapView, MembershipError> {
        let map = self.map_unverified()?;
        let spki = pki::spki_from_pem_or_der(operator_public_key)?;
        if !pki::verify_p256(&spki, &self.map, &self.signature) {
            return Err(MembershipError::BadMapSignature {
                version: map.version,
            });
        }
        let ca = pki::cert_from_pem_or_der(network_ca)?;
        let mut members = Vec::with_capacity(map.members.len());
        for m in &map.members {
            let info = m.member.verify_with_ca_der(&ca, now_ms)?;
            if info.group != map.group {
                return Err(MembershipError::InvalidRecord {
                    member: info.name.to_string(),
                    reason: format!(
                        "group {:?} differs from the map's group {:?}",
                        info.group, map.group
                    ),
                });
            }
            members.push(info);
        }
        Ok(MapView::new(map.group, map.version, map.issued_ms, members))
    }

    /// The postcard encoding sent on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }
}

fn decode_exact<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, MembershipError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| MembershipError::Malformed {
            what,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(MembershipError::Malformed {
            what,
            reason: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

/// Decodes a [`SignedNetworkMap`] from its postcard wire bytes (a peer's
/// answer: total, never panics). Verify it before use.
pub fn decode_signed_map(bytes: &[u8]) -> Result<SignedNetworkMap, MembershipError> {
    decode_exact("signed network map", bytes)
}

/// Decodes a [`SignedMemberInfo`] from its postcard wire bytes (a peer's
/// request: total, never panics). Verify it before use.
pub fn decode_signed_member(bytes: &[u8]) -> Result<SignedMemberInfo, MembershipError> {
    decode_exact("signed member info", bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info(serial: u64) -> MemberInfo {
        MemberInfo {
            name: "O=Alice, L=London, C=GB".parse().unwrap(),
            group: "g".into(),
            endpoint: "https://127.0.0.1:7001".into(),
            session_key: [7; 32],
            tls_chain: vec![vec![1, 2, 3], vec![4]],
            platform_version: 1,
            serial,
            issued_ms: 5,
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_signed_map(&bytes);
            let _ = decode_signed_member(&bytes);
            if let Ok(m) = decode_signed_map(&bytes) {
                let _ = m.map_unverified();
            }
            if let Ok(m) = decode_signed_member(&bytes) {
                let _ = m.info_unverified();
            }
        }

        #[test]
        fn signed_member_round_trips(info_b in proptest::collection::vec(any::<u8>(), 0..300),
                                     sig in proptest::collection::vec(any::<u8>(), 0..100)) {
            let s = SignedMemberInfo { info: info_b, signature: sig };
            prop_assert_eq!(decode_signed_member(&s.to_bytes()).unwrap(), s);
        }

        #[test]
        fn signed_map_round_trips(serial in any::<u64>(), version in any::<u64>(),
                                  sig in proptest::collection::vec(any::<u8>(), 0..100)) {
            let member = SignedMemberInfo { info: postcard::to_allocvec(&info(serial)).unwrap(), signature: sig.clone() };
            prop_assert_eq!(member.info_unverified().unwrap(), info(serial));
            let map = NetworkMap { group: "g".into(), version, issued_ms: 9,
                members: vec![ApprovedMember { member, approved_ms: 1, last_seen_ms: 2 }] };
            let s = SignedNetworkMap { map: postcard::to_allocvec(&map).unwrap(), signature: sig };
            let back = decode_signed_map(&s.to_bytes()).unwrap();
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(back.map_unverified().unwrap(), map);
        }

        #[test]
        fn truncated_encodings_are_errors(cut in 0usize..200) {
            let member = SignedMemberInfo { info: postcard::to_allocvec(&info(3)).unwrap(), signature: vec![1; 70] };
            let bytes = member.to_bytes();
            let cut = cut.min(bytes.len().saturating_sub(1));
            prop_assert!(decode_signed_member(&bytes[..cut]).is_err());
        }
    }
}
