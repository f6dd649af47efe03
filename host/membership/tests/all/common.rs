//! A bootstrapped dev network in a temporary directory, and member records.

use std::path::PathBuf;

use braid_membership::pki;
use braid_membership::{BootstrapOptions, MemberInfo, Network, SignedMemberInfo, bootstrap};
use tempfile::TempDir;

pub struct Net {
    pub _dir: TempDir,
    pub net: Network,
    pub ca_der: Vec<u8>,
    pub ca_pem: Vec<u8>,
    pub op_key: Vec<u8>,
    pub op_pub: Vec<u8>,
}

pub fn net(nodes: &[&str]) -> Net {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
    let net = bootstrap(
        &dir.path().join("net"),
        &nodes,
        &BootstrapOptions::default(),
    )
    .unwrap();
    let ca_pem = std::fs::read(&net.ca_cert).unwrap();
    Net {
        ca_der: pki::cert_from_pem_or_der(&ca_pem).unwrap(),
        ca_pem,
        op_key: pki::pkcs8_from_pem_or_der(&std::fs::read(&net.operator_key).unwrap()).unwrap(),
        op_pub: std::fs::read(&net.operator_public_key).unwrap(),
        net,
        _dir: dir,
    }
}

impl Net {
    /// (chain DER leaf first, key PKCS#8 DER) of node `i`.
    pub fn creds(&self, i: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        let c = &self.net.nodes[i].config;
        (
            pki::certs_from_pem_or_der(&std::fs::read(&c.cert).unwrap()).unwrap(),
            pki::pkcs8_from_pem_or_der(&std::fs::read(&c.key).unwrap()).unwrap(),
        )
    }

    pub fn info(&self, i: usize, name: &str, key_byte: u8, serial: u64) -> MemberInfo {
        let (chain, _) = self.creds(i);
        MemberInfo {
            name: name.parse().unwrap(),
            group: self.net.nodes[i].config.group.clone(),
            endpoint: self.net.nodes[i].config.gateway_endpoint.clone(),
            session_key: [key_byte; 32],
            tls_chain: chain,
            platform_version: 1,
            serial,
            issued_ms: pki::now_ms(),
        }
    }

    /// A record for a member hosted by node `i`, signed with its TLS key.
    pub fn member(&self, i: usize, name: &str, key_byte: u8, serial: u64) -> SignedMemberInfo {
        let (_, key) = self.creds(i);
        SignedMemberInfo::sign(&self.info(i, name, key_byte, serial), &key).unwrap()
    }

    pub fn state_path(&self) -> PathBuf {
        self.net.dir.join("map.state")
    }
}

pub const ALICE: &str = "O=Alice, L=London, C=GB";
pub const BOB: &str = "O=Bob, L=Paris, C=FR";
pub const CAROL: &str = "O=Carol, L=Rome, C=IT";
