use std::time::Duration;

use braid_membership::pki;
use braid_membership::{BootstrapOptions, MembershipError, NodeNetworkConfig, bootstrap, revoke};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use x509_parser::prelude::FromDer;

#[test]
fn bootstrap_writes_loadable_configs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("net");
    let nodes: Vec<String> = ["alice", "bob", "carol"].map(String::from).to_vec();
    let net = bootstrap(&out, &nodes, &BootstrapOptions::default()).unwrap();
    for (i, node) in nodes.iter().enumerate() {
        let path = out.join(node).join("node.json");
        let c = NodeNetworkConfig::load(&path).unwrap();
        assert_eq!(&c, &net.nodes[i].config);
        assert_eq!(&c.node_name, node);
        assert_eq!(c.rest_addr.port(), 7000 + 10 * i as u16);
        assert_eq!(c.gateway_addr.port(), 7001 + 10 * i as u16);
        assert_eq!(
            c.gateway_endpoint,
            format!("https://127.0.0.1:{}", 7001 + 10 * i)
        );
        assert_eq!(c.map_url, "https://127.0.0.1:7001");
        assert_eq!(c.map_server, i == 0);
        assert_eq!(c.operator_key.is_some(), i == 0);
        assert_eq!(c.map_state_path.is_some(), i == 0);
        assert!(c.mutual_tls);
        assert_eq!(c.poll_interval_ms, 2000);
        assert!(c.cert.is_absolute() && c.data_dir.is_dir());
        for p in [
            &c.network_ca,
            &c.crl,
            &c.cert,
            &c.key,
            &c.operator_public_key,
        ] {
            assert!(p.is_file(), "{}", p.display());
        }
        // Leaf + CA; subject and SANs.
        let chain = pki::certs_from_pem_or_der(&std::fs::read(&c.cert).unwrap()).unwrap();
        assert_eq!(chain.len(), 2);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let cn = leaf
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(&cn, node);
        let sans = format!(
            "{:?}",
            leaf.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(
            sans.contains("[127, 0, 0, 1]") && sans.contains("localhost"),
            "{sans}"
        );
        assert_eq!(leaf.raw_serial().len(), 16);
        // The leaf verifies against the network CA for both TLS usages.
        let ca = CertificateDer::from(
            pki::cert_from_pem_or_der(&std::fs::read(&c.network_ca).unwrap()).unwrap(),
        );
        let anchors = [webpki::anchor_from_trusted_cert(&ca).unwrap()];
        let leaf_der = CertificateDer::from(chain[0].clone());
        let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            ee.verify_for_usage(
                &[webpki::ring::ECDSA_P256_SHA256],
                &anchors,
                &[],
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .unwrap();
        }
    }
    // Refuses to overwrite, unless forced.
    let err = bootstrap(&out, &nodes, &BootstrapOptions::default()).unwrap_err();
    assert!(
        matches!(err, MembershipError::AlreadyExists { .. }),
        "{err}"
    );
    let forced = BootstrapOptions {
        force: true,
        base_port: 8000,
        event_horizon: Duration::from_secs(60),
        ..Default::default()
    };
    let old_ca = std::fs::read(&net.ca_cert).unwrap();
    let again = bootstrap(&out, &nodes, &forced).unwrap();
    assert_eq!(again.nodes[0].config.event_horizon_secs, 60);
    assert_ne!(old_ca, std::fs::read(&again.ca_cert).unwrap());
    // Bad input.
    let bad = |nodes: &[&str]| {
        let nodes: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
        bootstrap(
            &dir.path().join("other"),
            &nodes,
            &BootstrapOptions::default(),
        )
        .unwrap_err()
    };
    assert!(matches!(bad(&[]), MembershipError::Bootstrap(_)));
    assert!(matches!(bad(&["a", "a"]), MembershipError::Bootstrap(_)));
    assert!(matches!(bad(&["../x"]), MembershipError::Bootstrap(_)));
    assert!(matches!(bad(&["ca"]), MembershipError::Bootstrap(_)));
    let err = NodeNetworkConfig::load(&dir.path().join("missing.json")).unwrap_err();
    assert!(matches!(err, MembershipError::Io { .. }));
    std::fs::write(dir.path().join("bad.json"), "{}").unwrap();
    let err = NodeNetworkConfig::load(&dir.path().join("bad.json")).unwrap_err();
    assert!(err.to_string().contains("node_name"), "{err}");
}

fn crl(path: &std::path::Path) -> (Vec<Vec<u8>>, u64, CertificateRevocationListDer<'static>) {
    let der = CertificateRevocationListDer::from_pem_slice(&std::fs::read(path).unwrap()).unwrap();
    let (_, parsed) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
    let serials = parsed
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect();
    let number = parsed.crl_number().unwrap().to_u64_digits()[0];
    (serials, number, der)
}

#[test]
fn revoke_adds_the_serial_to_the_crl() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("net");
    let nodes: Vec<String> = ["alice", "bob"].map(String::from).to_vec();
    let net = bootstrap(&out, &nodes, &BootstrapOptions::default()).unwrap();
    let (serials, number, _) = crl(&net.crl);
    assert!(serials.is_empty());
    assert_eq!(number, 1);

    revoke(&out, "bob").unwrap();
    let leaf_of = |i: usize| {
        pki::certs_from_pem_or_der(&std::fs::read(&net.nodes[i].config.cert).unwrap())
            .unwrap()
            .remove(0)
    };
    let bob_leaf = leaf_of(1);
    let (_, bob) = x509_parser::parse_x509_certificate(&bob_leaf).unwrap();
    let (serials, number, der) = crl(&net.crl);
    assert_eq!(serials, vec![bob.raw_serial().to_vec()]);
    assert_eq!(number, 2);
    revoke(&out, "bob").unwrap();
    assert_eq!(crl(&net.crl).1, 2, "revoking twice changes nothing");
    assert!(revoke(&out, "nobody").is_err());

    // webpki (what the gateway uses) accepts the CRL: Bob is revoked, Alice is not.
    let ca = CertificateDer::from(
        pki::cert_from_pem_or_der(&std::fs::read(&net.ca_cert).unwrap()).unwrap(),
    );
    let anchors = [webpki::anchor_from_trusted_cert(&ca).unwrap()];
    let crl = webpki::CertRevocationList::from(
        webpki::BorrowedCertRevocationList::from_der(&der).unwrap(),
    );
    let crls = [&crl];
    let check = |leaf: &[u8]| {
        let leaf = CertificateDer::from(leaf);
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        let opts = webpki::RevocationOptionsBuilder::new(&crls)
            .unwrap()
            .build();
        ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &anchors,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            Some(opts),
            None,
        )
        .map(|_| ())
    };
    assert!(matches!(check(&bob_leaf), Err(webpki::Error::CertRevoked)));
    check(&leaf_of(0)).unwrap();
}
