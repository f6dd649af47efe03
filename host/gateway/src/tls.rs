//! TLS material and the rustls configurations built from it.
//!
//! Both ends speak TLS 1.3 only, ALPN `http/1.1`, with the ring provider.
//! Certificates are checked against the *network CA* ([`TlsMaterial::roots`]),
//! never against system roots.
//!
//! # Revocation
//!
//! Revocation uses CRLs (a PEM file of one or more `X509 CRL` blocks, or a
//! single DER CRL) at [`TlsMaterial::crl_path`], in the [`RevocationMode`]
//! the network policy asks for. Only end-entity certificates are checked.
//!
//! **CRL reloading.** Server and client watch `crl_path`: at most once a
//! second, when a connection is accepted (server) or opened (client), they
//! look at the file's modification time and size; when those changed they
//! re-read the CRLs and rebuild their rustls configuration. So rewriting the
//! file (what `braid network revoke` does) takes effect for the next new
//! connection without a restart. Connections already open are not cut. If
//! the new file cannot be read or parsed, the previous configuration stays
//! in force and a warning is logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use thiserror::Error;

/// How certificate revocation (CRLs) is enforced, per network policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RevocationMode {
    /// Hard fail: a certificate is accepted only when a CRL from its issuer
    /// says it is not revoked. A CRL file is required; a certificate whose
    /// issuer no CRL covers is refused.
    #[default]
    Hard,
    /// Soft fail: a certificate listed in a CRL is refused, but one whose
    /// status is unknown (no CRL from its issuer, or no CRL file at all) is
    /// accepted.
    Soft,
    /// No revocation checks; the CRL file is not read.
    Off,
}

impl FromStr for RevocationMode {
    type Err = ParseRevocationModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hard" => Ok(Self::Hard),
            "soft" => Ok(Self::Soft),
            "off" => Ok(Self::Off),
            _ => Err(ParseRevocationModeError(s.to_owned())),
        }
    }
}

impl fmt::Display for RevocationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hard => "hard",
            Self::Soft => "soft",
            Self::Off => "off",
        })
    }
}

/// A revocation mode other than `hard`, `soft` or `off`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("unknown revocation mode {0:?}: expected hard, soft or off")]
pub struct ParseRevocationModeError(pub String);

/// What is wrong with the TLS material. Each variant names the file at
/// fault where there is one; fix or regenerate that file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not valid PEM of the expected kind.
    #[error("{path}: not a valid PEM {what}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected (certificate, private key, CRL).
        what: &'static str,
        /// The parser's complaint.
        detail: String,
    },
    /// A certificate file holds no certificate.
    #[error("{0}: no certificate found")]
    NoCertificate(PathBuf),
    /// No network CA certificate was given, or none was usable.
    #[error("no usable network CA certificate: {0}")]
    NoRoots(String),
    /// A CRL could not be parsed.
    #[error("CRL {path}: {detail}")]
    Crl {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Revocation mode `hard` needs a CRL file and none was configured.
    #[error(
        "revocation mode hard needs a CRL file (the network CA's CRL); configure one or use mode soft/off"
    )]
    CrlRequired,
    /// rustls refused the configuration (e.g. the key does not match the
    /// certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// rustls refused to build a certificate verifier.
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A node's TLS identity and the network's trust anchors.
#[derive(Debug)]
pub struct TlsMaterial {
    /// This node's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The network CA certificate(s): the only trust anchors.
    pub roots: Vec<CertificateDer<'static>>,
    /// The network CA's CRL file (PEM or DER), watched for changes.
    pub crl_path: Option<PathBuf>,
    /// How revocation is enforced.
    pub revocation: RevocationMode,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            crl_path: self.crl_path.clone(),
            revocation: self.revocation,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

impl TlsMaterial {
    /// Reads a node's certificate chain (`cert`, leaf first), its private
    /// key (`key`, PKCS#8, PKCS#1 or SEC1 PEM), the network CA (`ca`) and
    /// optionally the network CRL file (`crl`; only its path is kept, it is
    /// read when configurations are built and re-read when it changes).
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        ca: &Path,
        crl: Option<&Path>,
        mode: RevocationMode,
    ) -> Result<Self, TlsError> {
        let chain = pem_certs(cert)?;
        let key_bytes = read(key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Pem {
            path: key.to_owned(),
            what: "private key",
            detail: e.to_string(),
        })?;
        let roots = pem_certs(ca)?;
        Ok(Self {
            chain,
            key,
            roots,
            crl_path: crl.map(Path::to_owned),
            revocation: mode,
        })
    }

    /// The leaf certificate this node presents.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain.first()
    }

    fn root_store(&self) -> Result<Arc<RootCertStore>, TlsError> {
        if self.roots.is_empty() {
            return Err(TlsError::NoRoots("none given".into()));
        }
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| TlsError::NoRoots(e.to_string()))?;
        }
        Ok(Arc::new(store))
    }
}

/// Reads CRLs from a PEM file (one or more `X509 CRL` blocks) or a DER file.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let crl_err = |detail: String| TlsError::Crl {
        path: path.to_owned(),
        detail,
    };
    let crls = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| crl_err(e.to_string()))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if crls.is_empty() {
        return Err(crl_err("no CRL found in the file".into()));
    }
    Ok(crls)
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) type Crls = Vec<CertificateRevocationListDer<'static>>;

/// Builds the server configuration: TLS 1.3, ALPN http/1.1, client
/// certificates required (and checked against the CA and CRLs) when
/// `mutual_tls`.
pub(crate) fn server_config(
    m: &TlsMaterial,
    mutual_tls: bool,
    crls: Crls,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier: Arc<dyn ClientCertVerifier> = if mutual_tls {
        let mut b = WebPkiClientVerifier::builder_with_provider(m.root_store()?, provider.clone());
        if m.revocation != RevocationMode::Off {
            b = b.with_crls(crls).only_check_end_entity_revocation();
        }
        if m.revocation == RevocationMode::Soft {
            b = b.allow_unknown_revocation_status();
        }
        b.build()?
    } else {
        WebPkiClientVerifier::no_client_auth()
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Builds the client configuration: TLS 1.3, ALPN http/1.1, the server
/// checked against the CA, CRLs and the server name; our certificate
/// presented when `present_client_cert`.
pub(crate) fn client_config(
    m: &TlsMaterial,
    present_client_cert: bool,
    crls: Crls,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let mut b = rustls::client::WebPkiServerVerifier::builder_with_provider(
        m.root_store()?,
        provider.clone(),
    );
    if m.revocation != RevocationMode::Off {
        b = b.with_crls(crls).only_check_end_entity_revocation();
    }
    if m.revocation == RevocationMode::Soft {
        b = b.allow_unknown_revocation_status();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(b.build()?);
    let mut config = if present_client_cert {
        builder.with_client_auth_cert(m.chain.clone(), m.key.clone_key())?
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How often the CRL file's modification time is looked at, at most.
pub(crate) const CRL_CHECK_INTERVAL: Duration = Duration::from_secs(1);

type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

type Build<T> = Box<dyn Fn(&TlsMaterial, Crls) -> Result<Arc<T>, TlsError> + Send + Sync>;

/// A rustls configuration rebuilt when the CRL file changes (see the
/// module documentation).
pub(crate) struct Reloading<T> {
    material: TlsMaterial,
    build: Build<T>,
    state: Mutex<ReloadState<T>>,
}

struct ReloadState<T> {
    current: Arc<T>,
    stamp: Option<Stamp>,
    last_check: Instant,
}

impl<T> Reloading<T> {
    /// Reads the CRLs per the material's mode and builds the first
    /// configuration. Hard mode needs a readable CRL file; soft mode goes
    /// on without one (with a warning).
    pub(crate) fn new(
        material: TlsMaterial,
        build: impl Fn(&TlsMaterial, Crls) -> Result<Arc<T>, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let mut stamp_now = None;
        let crls = match (material.revocation, &material.crl_path) {
            (RevocationMode::Off, _) => Vec::new(),
            (RevocationMode::Hard, None) => return Err(TlsError::CrlRequired),
            (RevocationMode::Soft, None) => Vec::new(),
            (mode, Some(path)) => {
                stamp_now = stamp(path);
                match load_crls(path) {
                    Ok(crls) => crls,
                    Err(e) if mode == RevocationMode::Soft => {
                        tracing::warn!(cause = %e, "revocation mode soft: going on without CRLs");
                        Vec::new()
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let current = build(&material, crls)?;
        Ok(Self {
            material,
            build: Box::new(build),
            state: Mutex::new(ReloadState {
                current,
                stamp: stamp_now,
                last_check: Instant::now(),
            }),
        })
    }

    /// The configuration to use for a new connection, rebuilt first if the
    /// CRL file changed (checked at most once per [`CRL_CHECK_INTERVAL`]).
    pub(crate) fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.material.crl_path else {
            return state.current.clone();
        };
        if self.material.revocation == RevocationMode::Off
            || state.last_check.elapsed() < CRL_CHECK_INTERVAL
        {
            return state.current.clone();
        }
        state.last_check = Instant::now();
        let now = stamp(path);
        if now == state.stamp {
            return state.current.clone();
        }
        state.stamp = now;
        match load_crls(path).and_then(|crls| (self.build)(&self.material, crls)) {
            Ok(config) => {
                tracing::info!(path = %path.display(), "CRL file changed: TLS configuration reloaded");
                state.current = config;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), cause = %e,
                    "CRL file changed but could not be loaded: keeping the previous CRLs");
            }
        }
        state.current.clone()
    }
}

/// A short description of a certificate for log lines: its subject and
/// serial number, or why it could not be parsed.
pub fn describe_certificate(der: &[u8]) -> String {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => format!(
            "subject \"{}\", serial {}",
            cert.subject(),
            cert.raw_serial_as_string()
        ),
        Err(e) => format!("unparsable certificate ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_mode_parses() {
        assert_eq!("hard".parse(), Ok(RevocationMode::Hard));
        assert_eq!("Soft".parse(), Ok(RevocationMode::Soft));
        assert_eq!("off".parse(), Ok(RevocationMode::Off));
        assert!("maybe".parse::<RevocationMode>().is_err());
        assert_eq!(RevocationMode::Soft.to_string(), "soft");
    }
}
