//! Small helpers for the credentials this crate handles: PEM-or-DER input,
//! ECDSA P-256 signing and verification, atomic file writes, the clock.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::signature::{self, EcdsaKeyPair, KeyPair as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

use crate::MembershipError;

/// Milliseconds since the Unix epoch, by the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// Certificates from PEM (one or more `CERTIFICATE` blocks, in order) or a
/// single DER certificate.
pub fn certs_from_pem_or_der(bytes: &[u8]) -> Result<Vec<Vec<u8>>, MembershipError> {
    if looks_like_pem(bytes) {
        let certs = CertificateDer::pem_slice_iter(bytes)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MembershipError::credential("certificate PEM", e))?;
        if certs.is_empty() {
            return Err(MembershipError::credential(
                "certificate PEM",
                "no CERTIFICATE block found",
            ));
        }
        Ok(certs)
    } else if bytes.is_empty() {
        Err(MembershipError::credential("certificate", "empty input"))
    } else {
        Ok(vec![bytes.to_vec()])
    }
}

/// The first certificate of PEM or DER input (e.g. the network CA).
pub fn cert_from_pem_or_der(bytes: &[u8]) -> Result<Vec<u8>, MembershipError> {
    Ok(certs_from_pem_or_der(bytes)?.remove(0))
}

/// A PKCS#8 private key (DER) from PEM (`PRIVATE KEY`) or DER input.
pub fn pkcs8_from_pem_or_der(bytes: &[u8]) -> Result<Vec<u8>, MembershipError> {
    if looks_like_pem(bytes) {
        PrivatePkcs8KeyDer::from_pem_slice(bytes)
            .map(|k| k.secret_pkcs8_der().to_vec())
            .map_err(|e| MembershipError::credential("PKCS#8 private key PEM", e))
    } else {
        Ok(bytes.to_vec())
    }
}

/// A SubjectPublicKeyInfo (DER) from PEM (`PUBLIC KEY`) or DER input.
pub fn spki_from_pem_or_der(bytes: &[u8]) -> Result<Vec<u8>, MembershipError> {
    if looks_like_pem(bytes) {
        SubjectPublicKeyInfoDer::from_pem_slice(bytes)
            .map(|k| k.to_vec())
            .map_err(|e| MembershipError::credential("public key PEM", e))
    } else {
        Ok(bytes.to_vec())
    }
}

/// Signs `msg` with an ECDSA P-256 PKCS#8 key (SHA-256, ASN.1 signature).
pub fn sign_p256(pkcs8_der: &[u8], msg: &[u8]) -> Result<Vec<u8>, MembershipError> {
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8_der, &rng)
        .map_err(|e| MembershipError::credential("ECDSA P-256 PKCS#8 private key", e))?;
    key.sign(&rng, msg)
        .map(|s| s.as_ref().to_vec())
        .map_err(|e| MembershipError::crypto("signing", e))
}

/// The SubjectPublicKeyInfo (DER) of an ECDSA P-256 PKCS#8 key.
pub fn p256_spki_of(pkcs8_der: &[u8]) -> Result<Vec<u8>, MembershipError> {
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8_der, &rng)
        .map_err(|e| MembershipError::credential("ECDSA P-256 PKCS#8 private key", e))?;
    // SPKI = SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING point }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let point = key.public_key().as_ref();
    let mut spki = PREFIX.to_vec();
    spki.extend_from_slice(point);
    Ok(spki)
}

/// Verifies an ECDSA P-256 SHA-256 (ASN.1) signature with a public key
/// given as SubjectPublicKeyInfo DER. `false` for any failure, including a
/// key that is not P-256.
pub fn verify_p256(spki_der: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    let Ok((_, spki)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der) else {
        return false;
    };
    let point: &[u8] = &spki.subject_public_key.data;
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(msg, sig)
        .is_ok()
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, fsync, rename, then fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), MembershipError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| MembershipError::io("create directory", dir, e))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = std::fs::File::create(&tmp).map_err(|e| MembershipError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| MembershipError::io("write", &tmp, e))?;
    f.sync_all()
        .map_err(|e| MembershipError::io("fsync", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| MembershipError::io("rename into", path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Directory fsync makes the rename durable; not all platforms allow it.
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, MembershipError> {
    std::fs::read(path).map_err(|e| MembershipError::io("read", path, e))
}
