//! HTTPS for the REST API: a rustls server configuration loaded from PEM
//! files (the handshakes themselves run in [`braid_http`], one task per
//! connection, with a timeout).
//!
//! The development CA a node makes for itself on first start lives in
//! [`danger`]: it is convenient, never what an operator should run with in
//! production.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read or written; check the
    /// path and its permissions.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate (`-----BEGIN CERTIFICATE-----`);
    /// pass the server's certificate chain, leaf first.
    #[error("{0}: no PEM certificate in the file")]
    NoCertificate(PathBuf),
    /// The file holds no PEM private key (PKCS#8, PKCS#1 or SEC1); pass the
    /// key that belongs to the certificate.
    #[error("{path}: no usable PEM private key in the file: {reason}")]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// rustls refused the certificate and key (e.g. they do not belong
    /// together, or the key type is unsupported).
    #[error("the certificate and key are not usable: {0}")]
    Rustls(#[from] rustls::Error),
    /// Generating the development certificate failed.
    #[error("generating the development certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// A rustls server configuration (TLS 1.2 and 1.3, HTTP/1.1) from a PEM
/// certificate chain (leaf first) and a PEM private key.
pub fn server_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_bytes = std::fs::read(cert_pem).map_err(file_error(cert_pem))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert_pem.to_path_buf()));
    }
    let key_bytes = std::fs::read(key_pem).map_err(file_error(key_pem))?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::NoKey {
        path: key_pem.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Development-only TLS: a CA and server certificate the node makes for
/// itself. Clients must be handed `ca.pem` explicitly; nothing here turns
/// verification off.
pub mod danger {
    use super::{TlsError, file_error};
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// The files of a development certificate under `DATA_DIR/tls/`.
    #[derive(Debug, Clone)]
    pub struct DevCertificate {
        /// The development CA's certificate: what clients trust.
        pub ca_pem: PathBuf,
        /// The server's certificate chain (leaf, then the CA).
        pub cert_pem: PathBuf,
        /// The server's private key (mode 0600).
        pub key_pem: PathBuf,
    }

    fn ca_params() -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "braid");
        dn.push(DnType::CommonName, "braid development CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        params
    }

    /// Makes (first start) or reuses the development CA and a server
    /// certificate under `tls_dir`, valid for `localhost`, `127.0.0.1`,
    /// `::1` and `names` (host names or IP addresses). The CA is kept, so
    /// clients that trust `ca.pem` keep trusting the node; the server
    /// certificate is re-issued only when a name is added.
    pub fn dev_certificate(tls_dir: &Path, names: &[String]) -> Result<DevCertificate, TlsError> {
        std::fs::create_dir_all(tls_dir).map_err(file_error(tls_dir))?;
        let files = DevCertificate {
            ca_pem: tls_dir.join("ca.pem"),
            cert_pem: tls_dir.join("server.pem"),
            key_pem: tls_dir.join("server.key"),
        };
        let ca_key_path = tls_dir.join("ca.key");
        let names_path = tls_dir.join("server.names");
        let mut wanted: BTreeSet<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .map(String::from)
            .collect();
        wanted.extend(names.iter().filter(|n| !n.is_empty()).cloned());

        // The CA: made once, then reused.
        let (ca_key, ca_new) = match std::fs::read_to_string(&ca_key_path) {
            Ok(pem) if files.ca_pem.is_file() => (KeyPair::from_pem(&pem)?, false),
            _ => (KeyPair::generate()?, true),
        };
        if ca_new {
            let ca_cert = ca_params().self_signed(&ca_key)?;
            write(&ca_key_path, &ca_key.serialize_pem(), true)?;
            write(&files.ca_pem, &ca_cert.pem(), false)?;
        }

        let have: BTreeSet<String> = std::fs::read_to_string(&names_path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        let current = !ca_new
            && files.cert_pem.is_file()
            && files.key_pem.is_file()
            && wanted.is_subset(&have);
        if current {
            return Ok(files);
        }
        let all: Vec<String> = wanted.union(&have).cloned().collect();
        let mut params = CertificateParams::new(all.clone())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "braid");
        dn.push(DnType::CommonName, "braid node (development certificate)");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let key = KeyPair::generate()?;
        // The issuer is rebuilt from the same parameters and kept key: its
        // name and key identifier are what the CA certificate carries.
        let issuer = Issuer::new(ca_params(), &ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        let ca_pem = std::fs::read_to_string(&files.ca_pem).map_err(file_error(&files.ca_pem))?;
        write(&files.key_pem, &key.serialize_pem(), true)?;
        write(&files.cert_pem, &format!("{}{ca_pem}", cert.pem()), false)?;
        write(&names_path, &(all.join("\n") + "\n"), false)?;
        Ok(files)
    }

    /// Writes `text` to `path` atomically (temp file + rename); secrets
    /// get mode 0600 from their creation on.
    fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
        use std::io::Write as _;
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(if secret { 0o600 } else { 0o644 });
        }
        let mut f = options.open(&tmp).map_err(file_error(&tmp))?;
        f.write_all(text.as_bytes()).map_err(file_error(&tmp))?;
        f.sync_all().map_err(file_error(&tmp))?;
        std::fs::rename(&tmp, path).map_err(file_error(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certificate_is_made_once_and_loads() {
        let dir = std::env::temp_dir().join(format!("braid-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = danger::dev_certificate(&dir, &[]).unwrap();
        let ca = std::fs::read(&a.ca_pem).unwrap();
        let cert = std::fs::read(&a.cert_pem).unwrap();
        server_config(&a.cert_pem, &a.key_pem).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&a.key_pem).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Reused as is.
        let b = danger::dev_certificate(&dir, &["localhost".into()]).unwrap();
        assert_eq!(std::fs::read(&b.cert_pem).unwrap(), cert);
        // A new name: same CA, new server certificate.
        let c = danger::dev_certificate(&dir, &["node1.example".into()]).unwrap();
        assert_eq!(std::fs::read(&c.ca_pem).unwrap(), ca);
        assert_ne!(std::fs::read(&c.cert_pem).unwrap(), cert);
        server_config(&c.cert_pem, &c.key_pem).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
