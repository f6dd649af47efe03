//! `braid network bootstrap`: a development application network in one step.
//!
//! [`bootstrap`] writes, under `out_dir`:
//!
//! ```text
//! ca/ca.pem                  network CA certificate (self-signed, CA constraints)
//! ca/ca.key.pem              its PKCS#8 key
//! ca/crl.pem                 CRL signed by the CA (number 1, empty; see revoke)
//! operator/operator.key.pem  operator key (PKCS#8, ECDSA P-256): signs the map
//! operator/operator.pub.pem  its public key (SPKI)
//! <node>/tls/cert.pem        node certificate + CA certificate (leaf first)
//! <node>/tls/key.pem         node key (PKCS#8)
//! <node>/node.json           NodeNetworkConfig (paths in it are absolute)
//! <node>/data/               the node's data directory (created empty)
//! ```
//!
//! Every certificate and key is generated for this network; nothing else
//! is trusted by its nodes. The first node runs the map server.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::pki;
use crate::{Approval, MembershipError};

/// Organisation name in every certificate bootstrap issues.
pub const DEV_ORGANISATION: &str = "braid dev network";
/// Validity of the CA, the node certificates and the CRL's next update.
pub const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// How a node checks peers' certificates against the network CRL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Revocation {
    /// A certificate whose status cannot be determined is refused.
    #[default]
    Hard,
    /// A certificate whose status cannot be determined is accepted.
    Soft,
    /// No revocation checks.
    Off,
}

impl FromStr for Revocation {
    type Err = MembershipError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hard" => Ok(Self::Hard),
            "soft" => Ok(Self::Soft),
            "off" => Ok(Self::Off),
            _ => Err(MembershipError::Bootstrap(format!(
                "revocation mode {s:?}: expected hard, soft or off"
            ))),
        }
    }
}

impl std::fmt::Display for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hard => "hard",
            Self::Soft => "soft",
            Self::Off => "off",
        })
    }
}

/// Options of [`bootstrap`].
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// Node `i` gets REST port `base_port + 10*i` and gateway port
    /// `base_port + 10*i + 1`. Default 7000.
    pub base_port: u16,
    /// Gateways require client certificates. Default true.
    pub mutual_tls: bool,
    /// CRL checking mode. Default hard.
    pub revocation: Revocation,
    /// Approval of registrations by the map server. Default auto.
    pub approval: Approval,
    /// Members not heard from within this are dropped. Default 30 days.
    pub event_horizon: Duration,
    /// IP address the nodes listen on and are reached at. Default 127.0.0.1.
    pub host: String,
    /// The application network's group name. Default "braid-dev".
    pub group: String,
    /// Map poll interval of the nodes. Default 2 s.
    pub poll_interval: Duration,
    /// Overwrite an existing network in `out_dir` (deletes its `ca/`,
    /// `operator/` and the listed nodes' directories first). Default false.
    pub force: bool,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        Self {
            base_port: 7000,
            mutual_tls: true,
            revocation: Revocation::Hard,
            approval: Approval::Auto,
            event_horizon: Duration::from_secs(30 * 24 * 60 * 60),
            host: "127.0.0.1".into(),
            group: "braid-dev".into(),
            poll_interval: Duration::from_millis(2000),
            force: false,
        }
    }
}

/// One node's network configuration, written to `<node>/node.json`.
/// Every path is absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeNetworkConfig {
    /// The short node name given to bootstrap.
    pub node_name: String,
    /// The node's data directory.
    pub data_dir: PathBuf,
    /// Where the REST API listens.
    pub rest_addr: SocketAddr,
    /// Where the gateway (HTTPS) listens.
    pub gateway_addr: SocketAddr,
    /// The gateway's URL as other members reach it (`https://ip:port`).
    pub gateway_endpoint: String,
    /// The application network's group name.
    pub group: String,
    /// The map server's URL (the first node's gateway).
    pub map_url: String,
    /// True on the node that runs the map server (the first).
    pub map_server: bool,
    /// The network CA certificate (PEM).
    pub network_ca: PathBuf,
    /// The network CRL (PEM).
    pub crl: PathBuf,
    /// The node's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The node's private key (PKCS#8 PEM).
    pub key: PathBuf,
    /// The operator's public key (SPKI PEM) that signs the map.
    pub operator_public_key: PathBuf,
    /// The operator's private key (PKCS#8 PEM); only on the map server node.
    #[serde(default)]
    pub operator_key: Option<PathBuf>,
    /// Gateways require client certificates.
    pub mutual_tls: bool,
    /// CRL checking mode.
    pub revocation: Revocation,
    /// Approval mode of the map server.
    pub approval: Approval,
    /// The map server's event horizon, in seconds.
    pub event_horizon_secs: u64,
    /// On the map server node: set, to say so. The map server's state is
    /// kept in the node's store; a file at this path (written by versions
    /// before that) is imported on first start.
    #[serde(default)]
    pub map_state_path: Option<PathBuf>,
    /// Interval between map polls, in milliseconds.
    pub poll_interval_ms: u64,
    /// Interval between republications of the node's member records, in
    /// seconds (absent: a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub republish_secs: Option<u64>,
}

impl NodeNetworkConfig {
    /// Reads a `node.json`, naming the file and the problem on error.
    pub fn load(path: &Path) -> Result<Self, MembershipError> {
        let bytes = pki::read_file(path)?;
        serde_json::from_slice(&bytes).map_err(|e| MembershipError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Writes it as pretty JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<(), MembershipError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| MembershipError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        pki::write_atomic(path, &json)
    }

    /// The event horizon as a duration.
    pub fn event_horizon(&self) -> Duration {
        Duration::from_secs(self.event_horizon_secs)
    }
}

/// One bootstrapped node.
#[derive(Debug, Clone)]
pub struct BootstrapNode {
    /// Its short name.
    pub name: String,
    /// Its `node.json`.
    pub config_path: PathBuf,
    /// The configuration written there.
    pub config: NodeNetworkConfig,
}

/// What [`bootstrap`] created (absolute paths).
#[derive(Debug, Clone)]
pub struct Network {
    /// The network directory.
    pub dir: PathBuf,
    /// `ca/ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca/ca.key.pem`.
    pub ca_key: PathBuf,
    /// `ca/crl.pem`.
    pub crl: PathBuf,
    /// `operator/operator.key.pem`.
    pub operator_key: PathBuf,
    /// `operator/operator.pub.pem`.
    pub operator_public_key: PathBuf,
    /// The nodes, in the order given.
    pub nodes: Vec<BootstrapNode>,
}

fn crypto(context: &'static str) -> impl Fn(rcgen::Error) -> MembershipError {
    move |e| MembershipError::crypto(context, e)
}

fn random_serial() -> Result<SerialNumber, MembershipError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|e| MembershipError::crypto("generating a serial number", e))?;
    // Positive and exactly 16 bytes: top bit clear, first byte non-zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - time::Duration::hours(1), now + VALIDITY)
}

fn ca_params() -> Result<CertificateParams, MembershipError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "braid dev network CA");
    dn.push(DnType::OrganizationName, DEV_ORGANISATION);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(random_serial()?);
    (p.not_before, p.not_after) = validity();
    Ok(p)
}

fn node_params(node: &str, host: IpAddr) -> Result<CertificateParams, MembershipError> {
    let mut sans = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    if host.to_string() != "127.0.0.1" {
        sans.push(host.to_string());
    }
    let mut p = CertificateParams::new(sans).map_err(crypto("building a node certificate"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    dn.push(DnType::OrganizationName, DEV_ORGANISATION);
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial()?);
    (p.not_before, p.not_after) = validity();
    Ok(p)
}

fn crl_pem(
    issuer: &Issuer<'_, KeyPair>,
    number: u64,
    revoked: Vec<RevokedCertParams>,
) -> Result<String, MembershipError> {
    let now = OffsetDateTime::now_utc();
    CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(5),
        next_update: now + VALIDITY,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(issuer)
    .map_err(crypto("signing the CRL"))?
    .pem()
    .map_err(crypto("encoding the CRL"))
}

fn write_secret(path: &Path, contents: &str) -> Result<(), MembershipError> {
    pki::write_atomic(path, contents.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| MembershipError::io("restrict permissions of", path, e))?;
    }
    Ok(())
}

fn validate_nodes(nodes: &[String]) -> Result<(), MembershipError> {
    if nodes.is_empty() {
        return Err(MembershipError::Bootstrap("no nodes given".into()));
    }
    for (i, n) in nodes.iter().enumerate() {
        let ok = !n.is_empty()
            && n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !n.starts_with('-');
        if !ok {
            return Err(MembershipError::Bootstrap(format!(
                "node name {n:?}: use 1-64 letters, digits, '-' or '_'"
            )));
        }
        if n == "ca" || n == "operator" {
            return Err(MembershipError::Bootstrap(format!(
                "node name {n:?} is reserved (a directory of the network)"
            )));
        }
        if nodes[..i].contains(n) {
            return Err(MembershipError::Bootstrap(format!(
                "node name {n:?} given twice"
            )));
        }
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), MembershipError> {
    std::fs::create_dir_all(path).map_err(|e| MembershipError::io("create directory", path, e))
}

/// Creates a development network for `nodes` under `out_dir`: the network
/// CA and CRL, the operator key, and per node a TLS certificate, key and
/// `node.json` (see the module docs for the layout). The first node runs
/// the map server. Refuses to overwrite an existing network (`ca/` exists)
/// unless `opts.force`.
pub fn bootstrap(
    out_dir: &Path,
    nodes: &[String],
    opts: &BootstrapOptions,
) -> Result<Network, MembershipError> {
    validate_nodes(nodes)?;
    let host: IpAddr = opts.host.parse().map_err(|_| {
        MembershipError::Bootstrap(format!("host {:?} is not an IP address", opts.host))
    })?;
    let last_port = u32::from(opts.base_port) + 10 * (nodes.len() as u32 - 1) + 1;
    if opts.base_port == 0 || last_port > u32::from(u16::MAX) {
        return Err(MembershipError::Bootstrap(format!(
            "base port {} leaves no room for {} nodes (ports base+10*i and base+10*i+1)",
            opts.base_port,
            nodes.len()
        )));
    }
    if out_dir.join("ca").exists() {
        if !opts.force {
            return Err(MembershipError::AlreadyExists {
                path: out_dir.to_owned(),
            });
        }
        for sub in ["ca", "operator"]
            .iter()
            .map(|s| s.to_string())
            .chain(nodes.iter().cloned())
        {
            let p = out_dir.join(sub);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| MembershipError::io("remove", &p, e))?;
            }
        }
    }
    create_dir(out_dir)?;
    let dir = out_dir
        .canonicalize()
        .map_err(|e| MembershipError::io("resolve", out_dir, e))?;

    // Network CA and CRL.
    let ca_key = KeyPair::generate().map_err(crypto("generating the CA key"))?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = ca_params()?;
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(crypto("signing the CA certificate"))?;
    let issuer = Issuer::new(ca, ca_key);
    let ca_dir = dir.join("ca");
    create_dir(&ca_dir)?;
    let ca_cert_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key.pem");
    let crl_path = ca_dir.join("crl.pem");
    pki::write_atomic(&ca_cert_path, ca_cert.pem().as_bytes())?;
    write_secret(&ca_key_path, &ca_key_pem)?;
    pki::write_atomic(&crl_path, crl_pem(&issuer, 1, Vec::new())?.as_bytes())?;

    // Operator key.
    let op_key = KeyPair::generate().map_err(crypto("generating the operator key"))?;
    let op_dir = dir.join("operator");
    create_dir(&op_dir)?;
    let op_key_path = op_dir.join("operator.key.pem");
    let op_pub_path = op_dir.join("operator.pub.pem");
    write_secret(&op_key_path, &op_key.serialize_pem())?;
    pki::write_atomic(&op_pub_path, op_key.public_key_pem().as_bytes())?;

    let gateway_url = |i: usize| {
        let port = opts.base_port + 10 * i as u16 + 1;
        format!("https://{}", SocketAddr::new(host, port))
    };
    let map_url = gateway_url(0);
    let mut out = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let node_dir = dir.join(node);
        let tls_dir = node_dir.join("tls");
        let data_dir = node_dir.join("data");
        create_dir(&tls_dir)?;
        create_dir(&data_dir)?;
        let key = KeyPair::generate().map_err(crypto("generating a node key"))?;
        let cert = node_params(node, host)?
            .signed_by(&key, &issuer)
            .map_err(crypto("signing a node certificate"))?;
        let cert_path = tls_dir.join("cert.pem");
        let key_path = tls_dir.join("key.pem");
        pki::write_atomic(
            &cert_path,
            format!("{}{}", cert.pem(), ca_cert.pem()).as_bytes(),
        )?;
        write_secret(&key_path, &key.serialize_pem())?;
        let rest_port = opts.base_port + 10 * i as u16;
        let first = i == 0;
        let config = NodeNetworkConfig {
            node_name: node.clone(),
            data_dir: data_dir.clone(),
            rest_addr: SocketAddr::new(host, rest_port),
            gateway_addr: SocketAddr::new(host, rest_port + 1),
            gateway_endpoint: gateway_url(i),
            group: opts.group.clone(),
            map_url: map_url.clone(),
            map_server: first,
            network_ca: ca_cert_path.clone(),
            crl: crl_path.clone(),
            cert: cert_path,
            key: key_path,
            operator_public_key: op_pub_path.clone(),
            operator_key: first.then(|| op_key_path.clone()),
            mutual_tls: opts.mutual_tls,
            revocation: opts.revocation,
            approval: opts.approval,
            event_horizon_secs: opts.event_horizon.as_secs(),
            map_state_path: first.then(|| data_dir.join("network-map-server.state")),
            poll_interval_ms: opts.poll_interval.as_millis() as u64,
            republish_secs: None,
        };
        let config_path = node_dir.join("node.json");
        config.save(&config_path)?;
        out.push(BootstrapNode {
            name: node.clone(),
            config_path,
            config,
        });
    }
    tracing::info!(dir = %dir.display(), nodes = nodes.len(), "development network created");
    Ok(Network {
        dir,
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        crl: crl_path,
        operator_key: op_key_path,
        operator_public_key: op_pub_path,
        nodes: out,
    })
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|&&x| x == 0).count();
    &b[n..]
}

/// Revokes `node`'s certificate: adds its serial to `out_dir/ca/crl.pem`,
/// re-signed by the CA with the CRL number incremented. Revoking twice
/// changes nothing.
pub fn revoke(out_dir: &Path, node: &str) -> Result<(), MembershipError> {
    use x509_parser::prelude::FromDer;
    let ca_dir = out_dir.join("ca");
    let ca_der = pki::cert_from_pem_or_der(&pki::read_file(&ca_dir.join("ca.pem"))?)?;
    let ca_key_pem = String::from_utf8(pki::read_file(&ca_dir.join("ca.key.pem"))?)
        .map_err(|e| MembershipError::credential("CA key PEM", e))?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).map_err(|e| MembershipError::credential("CA key", e))?;
    let issuer = Issuer::from_ca_cert_der(&ca_der.as_slice().into(), ca_key)
        .map_err(|e| MembershipError::credential("CA certificate", e))?;

    let cert_path = out_dir.join(node).join("tls").join("cert.pem");
    let leaf = pki::cert_from_pem_or_der(&pki::read_file(&cert_path)?)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| MembershipError::credential("node certificate", e))?;
    let serial = strip_zeros(leaf.raw_serial()).to_vec();

    let crl_path = ca_dir.join("crl.pem");
    let crl_der = {
        use rustls::pki_types::CertificateRevocationListDer;
        use rustls::pki_types::pem::PemObject;
        CertificateRevocationListDer::from_pem_slice(&pki::read_file(&crl_path)?)
            .map_err(|e| MembershipError::credential("CRL PEM", e))?
    };
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&crl_der)
        .map_err(|e| MembershipError::credential("CRL", e))?;
    let number = crl
        .crl_number()
        .map(|n| n.to_u64_digits().first().copied().unwrap_or(0))
        .unwrap_or(0);
    let mut revoked = Vec::new();
    for r in crl.iter_revoked_certificates() {
        if strip_zeros(r.raw_serial()) == serial.as_slice() {
            return Ok(());
        }
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(strip_zeros(r.raw_serial())),
            revocation_time: r.revocation_date.to_datetime(),
            reason_code: None,
            invalidity_date: None,
        });
    }
    revoked.push(RevokedCertParams {
        serial_number: SerialNumber::from_slice(&serial),
        revocation_time: OffsetDateTime::now_utc(),
        reason_code: None,
        invalidity_date: None,
    });
    let pem = crl_pem(&issuer, number + 1, revoked)?;
    pki::write_atomic(&crl_path, pem.as_bytes())?;
    tracing::info!(node, crl_number = number + 1, "node certificate revoked");
    Ok(())
}
