//! MapClient against MapServer::router over real HTTPS (mutual TLS) on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use braid_membership::pki;
use braid_membership::{
    Approval, MapClient, MapClientConfig, MapServer, MapServerConfig, MembershipError, Registration,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use crate::common::{ALICE, BOB, Net, net};

/// Serves `router` over TLS requiring client certificates from the network CA.
async fn serve_tls(router: axum::Router, n: &Net) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(n.ca_der.clone())).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let (chain, key) = n.creds(0);
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(router),
                    )
                    .await;
            });
        }
    });
    (addr, task)
}

fn client_config(
    n: &Net,
    node: usize,
    addr: SocketAddr,
    persist: &std::path::Path,
) -> MapClientConfig {
    let mut c = MapClientConfig::from_node(&n.net.nodes[node].config).unwrap();
    c.map_url = format!("https://{addr}");
    c.persist_path = persist.to_owned();
    c.poll_interval = Duration::from_millis(50);
    c
}

fn server(n: &Net, approval: Approval) -> Arc<MapServer> {
    Arc::new(
        MapServer::open(MapServerConfig {
            state: std::sync::Arc::new(braid_membership::FileState::new(n.state_path())),
            group: "braid-dev".into(),
            operator_key_pkcs8_der: std::fs::read(&n.net.operator_key).unwrap(),
            network_ca_der: n.ca_pem.clone(),
            approval,
            event_horizon: Duration::from_secs(3600),
        })
        .unwrap(),
    )
}

async fn wait_for<F: Fn(&braid_membership::MapView) -> bool>(client: &MapClient, f: F) {
    let mut rx = client.view();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|v| f(v)))
        .await
        .expect("condition not reached in time")
        .unwrap();
}

#[tokio::test]
async fn register_fetch_persist_and_restart_with_server_down() {
    let n = net(&["alice", "bob"]);
    let srv = server(&n, Approval::Auto);
    let (addr, task) = serve_tls(srv.clone().router(), &n).await;
    let persist = n.net.dir.join("bob-map.bin");

    let client = MapClient::new(client_config(&n, 1, addr, &persist)).unwrap();
    assert!(client.load_persisted().is_none());
    assert_eq!(
        client.register(&n.member(1, BOB, 2, 1)).await.unwrap(),
        Registration::Approved
    );
    let view = client.fetch_once().await.unwrap();
    assert_eq!(view.members().len(), 1);
    assert_eq!(view.members()[0].name.as_str(), BOB);
    assert_eq!(client.view().borrow().version(), srv.version());
    assert!(persist.is_file());

    // Refusals come back as such.
    let err = client.register(&n.member(1, BOB, 2, 0)).await.unwrap_err();
    assert!(
        matches!(err, MembershipError::Refused { status: 409, .. }),
        "{err}"
    );
    let mut garbage = n.member(1, ALICE, 3, 1);
    garbage.signature = vec![1, 2, 3];
    let err = client.register(&garbage).await.unwrap_err();
    assert!(
        matches!(err, MembershipError::Refused { status: 400, .. }),
        "{err}"
    );

    // Server down: a new client starts from the persisted map.
    task.abort();
    let _ = task.await;
    let restarted = MapClient::new(client_config(&n, 1, addr, &persist)).unwrap();
    assert!(matches!(
        restarted.fetch_once().await,
        Err(MembershipError::Http { .. })
    ));
    let view = restarted.load_persisted().unwrap();
    assert_eq!(view.members()[0].name.as_str(), BOB);
    assert_eq!(restarted.current().version(), view.version());
    // A failed poll keeps the last good view.
    assert!(restarted.fetch_once().await.is_err());
    assert_eq!(restarted.current().members().len(), 1);
}

#[tokio::test]
async fn client_without_certificate_is_refused_by_mutual_tls() {
    let n = net(&["alice", "bob"]);
    let srv = server(&n, Approval::Auto);
    let (addr, task) = serve_tls(srv.router(), &n).await;
    let mut cfg = client_config(&n, 1, addr, &n.net.dir.join("x.bin"));
    cfg.client_cert_chain_der.clear();
    let client = MapClient::new(cfg).unwrap();
    assert!(matches!(
        client.fetch_once().await,
        Err(MembershipError::Http { .. })
    ));
    // And a server certificate from another network is not trusted.
    let foreign = net(&["mallory"]);
    let client =
        MapClient::new(client_config(&foreign, 0, addr, &n.net.dir.join("y.bin"))).unwrap();
    assert!(matches!(
        client.fetch_once().await,
        Err(MembershipError::Http { .. })
    ));
    task.abort();
}

#[tokio::test]
async fn run_loop_publishes_own_records_and_follows_the_map() {
    let n = net(&["alice", "bob"]);
    let srv = server(&n, Approval::Manual);
    let (addr, task) = serve_tls(srv.clone().router(), &n).await;
    let client =
        Arc::new(MapClient::new(client_config(&n, 1, addr, &n.net.dir.join("run.bin"))).unwrap());
    client.set_own(vec![n.member(1, BOB, 2, 1)]);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(client.clone().run(async {
        let _ = stop_rx.await;
    }));

    // Registered but pending: wait until the server holds it, approve.
    tokio::time::timeout(Duration::from_secs(20), async {
        while srv.pending().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    srv.approve(&BOB.parse().unwrap()).unwrap();
    wait_for(&client, |v| v.member(&BOB.parse().unwrap()).is_some()).await;

    // Changing the own records publishes them at once.
    client.set_own(vec![n.member(1, BOB, 9, 2)]);
    wait_for(&client, |v| {
        v.member(&BOB.parse().unwrap()).map(|m| m.session_key) == Some([9; 32])
    })
    .await;

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap();
    task.abort();
    let _ = pki::now_ms();
}

#[tokio::test]
async fn a_map_for_another_group_is_refused() {
    let n = net(&["alice", "bob"]);
    let srv = server(&n, Approval::Auto);
    let (addr, task) = serve_tls(srv.router(), &n).await;
    let persist = n.net.dir.join("other-group.bin");
    let mut cfg = client_config(&n, 1, addr, &persist);
    cfg.group = "another-network".into();
    let client = MapClient::new(cfg).unwrap();
    let err = client.fetch_once().await.unwrap_err();
    assert!(
        matches!(&err, MembershipError::WrongGroup { got, .. } if got == "braid-dev"),
        "{err}"
    );
    assert!(!persist.exists(), "a map for another group was persisted");
    assert_eq!(client.current().version(), 0);
    task.abort();
}

/// Records a stand-in node publishes: what `records` holds, with a change
/// counter the worker follows.
struct Own {
    records: std::sync::Mutex<Vec<braid_membership::SignedMemberInfo>>,
    changed: tokio::sync::watch::Sender<u64>,
}

#[async_trait::async_trait]
impl braid_membership::OwnRecords for Own {
    async fn records(&self) -> Result<Vec<braid_membership::SignedMemberInfo>, String> {
        Ok(self.records.lock().unwrap().clone())
    }
    fn changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[tokio::test]
async fn the_membership_worker_alone_publishes_its_records_follows_changes_and_stops() {
    use braid_membership::{MembershipArgs, MembershipDeps};
    let n = net(&["alice", "bob"]);
    let srv = server(&n, Approval::Auto);
    let (addr, _task) = serve_tls(srv.clone().router(), &n).await;
    // The settings land in the configuration the map client is made from.
    let args: MembershipArgs =
        braid_types::settings::parse(["--map-poll-ms", "50", "--map-republish-secs", "7"]).unwrap();
    let mut node = n.net.nodes[1].config.clone();
    node.map_url = format!("https://{addr}");
    args.apply(&mut node);
    let mut config = MapClientConfig::from_node(&node).unwrap();
    assert_eq!(config.poll_interval, Duration::from_millis(50));
    assert_eq!(config.republish_interval, Duration::from_secs(7));
    config.persist_path = n.net.dir.join("bob-map.bin");
    let map = Arc::new(MapClient::new(config).unwrap());
    let own = Arc::new(Own {
        records: std::sync::Mutex::new(vec![n.member(1, BOB, 2, 1)]),
        changed: tokio::sync::watch::channel(0).0,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(braid_membership::run(
        MembershipDeps {
            map: map.clone(),
            own: own.clone(),
        },
        async move {
            let _ = stopped.await;
        },
    ));
    wait_for(&map, |v| v.members().iter().any(|m| m.name.as_str() == BOB)).await;
    // A new vnode: published on the change, without waiting a day.
    own.records
        .lock()
        .unwrap()
        .push(n.member(1, "O=Bob Two, L=New York, C=US", 3, 1));
    own.changed.send_modify(|c| *c += 1);
    wait_for(&map, |v| v.members().len() == 2).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .expect("stops on shutdown")
        .unwrap()
        .unwrap();
}
