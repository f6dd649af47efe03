//! What only the PostgreSQL store does: migrations, connection errors,
//! outages and recovery, the claim's wait for fenced batches in flight,
//! the real columns, and a throughput figure.

use crate::support::{connect, fresh_database, fresh_store, server_url};
use braid_storage::{FlowRecord, Op, Store, StoreError};
use braid_store_postgres::{MIGRATIONS, PostgresOptions, PostgresStore};
use braid_types::{Checksum, FlowId, FlowStart, FlowStatus, HoldingId, X500Name};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

fn client_flow(client: &str, status: FlowStatus) -> FlowRecord {
    let name: X500Name = "O=A, L=London, C=GB".parse().unwrap();
    let mut r = FlowRecord::new(
        FlowId::random(),
        HoldingId::derive(&name, "g"),
        "ping".into(),
        Checksum::of(b"p"),
        FlowStart::Client {
            client_request_id: client.parse().unwrap(),
            request_body: "{}".into(),
        },
        1000,
        1,
    );
    r.status = status;
    r
}

/// Waits (bounded) until `cond` holds.
async fn until<F: AsyncFnMut() -> bool>(what: &str, limit: Duration, mut cond: F) {
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_even_when_processes_start_together() {
    let (url, cleanup) = fresh_database().await;
    let mut starts = JoinSet::new();
    for _ in 0..4 {
        let url = url.clone();
        starts.spawn(async move { PostgresStore::connect(&url, PostgresOptions::default()).await });
    }
    let mut stores = Vec::new();
    while let Some(s) = starts.join_next().await {
        stores.push(
            s.unwrap()
                .unwrap_or_else(|e| panic!("a concurrent start failed: {e}")),
        );
    }
    let c = connect(&url).await;
    let applied =
        async |c: &tokio_postgres::Client| {
            {
                c.query(
                "SELECT version, name, applied_at::text FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1), r.get::<_, String>(2)))
            .collect::<Vec<_>>()
            }
        };
    let first = applied(&c).await;
    let want: Vec<(i32, String)> = MIGRATIONS
        .iter()
        .map(|(v, n, _)| (*v, n.to_string()))
        .collect();
    assert_eq!(
        first
            .iter()
            .map(|(v, n, _)| (*v, n.clone()))
            .collect::<Vec<_>>(),
        want
    );
    // Again: a no-op.
    let again = PostgresStore::connect(&url, PostgresOptions::default())
        .await
        .unwrap();
    assert_eq!(applied(&c).await, first);
    // A schema newer than this build is refused, clearly.
    c.execute(
        "INSERT INTO schema_migrations (version, name) VALUES (999, 'future')",
        &[],
    )
    .await
    .unwrap();
    match PostgresStore::connect(&url, PostgresOptions::default()).await {
        Err(StoreError::Config(m)) => assert!(m.contains("999"), "{m}"),
        Err(e) => panic!("expected Config, got {e}"),
        Ok(_) => panic!("started on a schema from the future"),
    }
    again.close().await;
    for s in stores {
        s.close().await;
    }
    drop(c);
    cleanup.await;
}

#[tokio::test]
async fn a_bad_url_or_an_unreachable_server_is_a_clear_error() {
    for bad in [
        "not a url",
        "postgres://u:secret@host:notaport/db",
        "postgres://u:secret@/db",
    ] {
        match PostgresStore::connect(bad, PostgresOptions::default()).await {
            Err(StoreError::Config(m)) => {
                assert!(m.contains("PostgreSQL URL"), "{bad}: {m}");
                assert!(
                    !m.contains("secret"),
                    "{bad}: the message shows the password: {m}"
                );
            }
            Err(e) => panic!("{bad}: expected Config, got {e}"),
            Ok(_) => panic!("{bad}: connected"),
        }
    }
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("postgres://braid:secret@127.0.0.1:{port}/braid");
    let t = Instant::now();
    match PostgresStore::connect(&url, PostgresOptions::default()).await {
        Err(StoreError::Unavailable(m)) => {
            assert!(m.contains(&format!("127.0.0.1:{port}/braid")), "{m}");
            assert!(!m.contains("secret"), "{m}");
        }
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    // A wrong password: reachable, but refused; says so.
    let wrong = server_url().replacen("braid:", "braid:wrong", 1);
    match PostgresStore::connect(&wrong, PostgresOptions::default()).await {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("password"), "{m}"),
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!("connected with a wrong password"),
    }
}

/// A TCP proxy in front of the server that can be cut (every connection
/// dropped, nothing listening) and restored on the same port.
struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    tasks: Option<JoinSet<()>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut p = Proxy {
            addr,
            target,
            tasks: None,
        };
        p.serve(listener);
        p
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        self.tasks = Some(tasks);
    }

    /// Drops every connection and stops listening.
    async fn cut(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.shutdown().await;
        }
    }

    async fn restore(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_while_the_server_is_unreachable_and_recover_by_themselves() {
    let (url, cleanup) = fresh_database().await;
    // host:port of the server, from its URL.
    let hostport = url
        .rsplit_once('@')
        .and_then(|(_, r)| r.split_once('/'))
        .map(|(hp, _)| hp.to_string())
        .unwrap();
    let mut proxy = Proxy::start(hostport.parse().unwrap()).await;
    let via = url.replacen(&hostport, &proxy.addr.to_string(), 1);
    let mut opts = PostgresOptions::default();
    opts.probe_interval = Duration::from_millis(100);
    opts.connect_timeout = Duration::from_secs(2);
    let store = Arc::new(PostgresStore::connect(&via, opts).await.unwrap());
    let put = |n: u32| vec![Op::PutMeta(format!("k{n}"), vec![n as u8])];
    store.write(put(0)).await.unwrap();
    assert!(store.health().ok);

    proxy.cut().await;
    match store.write(put(1)).await {
        Err(StoreError::Unavailable(m)) => assert!(!m.is_empty()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let h = store.health();
    assert!(!h.ok && h.error.is_some(), "{h:?}");
    assert!(matches!(
        store.meta("k0").await,
        Err(StoreError::Unavailable(_))
    ));

    proxy.restore().await;
    // Back by itself: health first (the probe), then writes and reads.
    until("health is ok again", Duration::from_secs(20), async || {
        store.health().ok
    })
    .await;
    store.write(put(2)).await.unwrap();
    assert_eq!(store.meta("k0").await.unwrap(), Some(vec![0]));
    assert_eq!(store.meta("k1").await.unwrap(), None);
    assert_eq!(store.meta("k2").await.unwrap(), Some(vec![2]));
    store.close().await;
    proxy.cut().await;
    cleanup.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_for_a_fenced_batch_in_flight() {
    let (store, url, cleanup) = fresh_store().await;
    assert_eq!(store.claim_partition(5, "old").await.unwrap(), 1);
    // A group transaction of the old owner, fenced, not yet committed:
    // what braid_fence does, held open.
    let mut other = connect(&url).await;
    let tx = other.transaction().await.unwrap();
    tx.execute("SELECT braid_fence(5, 1)", &[]).await.unwrap();
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('in-flight', '\\x01')",
        &[],
    )
    .await
    .unwrap();
    let store = Arc::new(store);
    let claim = {
        let store = store.clone();
        tokio::spawn(async move { store.claim_partition(5, "new").await })
    };
    // The claim is blocked on the partition's row lock.
    let watcher = connect(&url).await;
    until(
        "the claim waits on the lock",
        Duration::from_secs(20),
        async || {
            let n: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO partitions%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n == 1
        },
    )
    .await;
    assert!(!claim.is_finished());
    tx.commit().await.unwrap();
    assert_eq!(claim.await.unwrap().unwrap(), 2);
    // The batch in flight committed before the claim; the next one with
    // the old epoch does not.
    assert_eq!(store.meta("in-flight").await.unwrap(), Some(vec![1]));
    match store
        .write(vec![
            Op::Fence {
                partition: 5,
                epoch: 1,
            },
            Op::PutMeta("late".into(), vec![1]),
        ])
        .await
    {
        Err(StoreError::Fenced {
            partition: 5,
            epoch: 1,
            current: 2,
        }) => {}
        other => panic!("expected Fenced, got {other:?}"),
    }
    let owner: String = watcher
        .query_one("SELECT owner FROM partitions WHERE partition = 5", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "new");
    store.close().await;
    drop((watcher, other));
    cleanup.await;
}

#[tokio::test]
async fn flows_are_rows_with_real_columns_and_a_version() {
    let (store, url, cleanup) = fresh_store().await;
    let c = connect(&url).await;
    let mut f = client_flow("r1", FlowStatus::Running);
    f.wake_at_ms = Some(u64::MAX);
    store
        .write(vec![Op::PutFlow(Box::new(f.clone()))])
        .await
        .unwrap();
    let id = f.id.bytes().to_vec();
    let row = async |c: &tokio_postgres::Client| {
        let r = c
            .query_one(
                "SELECT status, partition, client_request_id, version, ended_ms, wake_at_ms, \
                     encode(holding, 'hex') FROM flows WHERE flow_id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, Option<String>>(2),
            r.get::<_, i64>(3),
            r.get::<_, Option<i64>>(4),
            r.get::<_, Option<i64>>(5),
            r.get::<_, String>(6),
        )
    };
    assert_eq!(
        row(&c).await,
        (
            "RUNNING".into(),
            0,
            Some("r1".into()),
            1,
            None,
            Some(i64::MAX),
            f.holding.to_string()
        )
    );
    // A fenced rewrite: the version follows; the partition is the flow's
    // own (of one here), not the fence's.
    assert_eq!(store.claim_partition(9, "w").await.unwrap(), 1);
    f.status = FlowStatus::Completed;
    f.updated_ms = 2000;
    store
        .write(vec![
            Op::PutFlow(Box::new(f.clone())),
            Op::Fence {
                partition: 9,
                epoch: 1,
            },
        ])
        .await
        .unwrap();
    let (status, partition, _, version, ended, _, _) = row(&c).await;
    assert_eq!(
        (status.as_str(), partition, version, ended),
        ("COMPLETED", 0, 2, Some(2000))
    );
    // The exact wake time comes back from the record.
    assert_eq!(store.flow(&f.id).await.unwrap(), Some(f.clone()));
    // Times beyond bigint are refused, for that batch only.
    let mut far = client_flow("r2", FlowStatus::Running);
    far.created_ms = u64::MAX;
    match store.write(vec![Op::PutFlow(Box::new(far))]).await {
        Err(StoreError::Database(m)) => assert!(m.contains("bigint"), "{m}"),
        other => panic!("expected Database, got {other:?}"),
    }
    store.close().await;
    drop(c);
    cleanup.await;
}

/// Commits per second with 64 concurrent writers, each writing a small
/// checkpoint (record, two journal entries, an outbox message) per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_throughput_with_64_writers() {
    let (store, _, cleanup) = fresh_store().await;
    let store = Arc::new(store);
    let per_writer = 40u32;
    let t = Instant::now();
    let mut tasks = JoinSet::new();
    for w in 0..64u32 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut f = client_flow(&format!("w{w}"), FlowStatus::Running);
            for i in 0..per_writer {
                f.journal_len = 2 * (i + 1);
                store
                    .write(vec![
                        Op::PutFlow(Box::new(f.clone())),
                        Op::AppendJournal {
                            flow: f.id,
                            start: 2 * i,
                            entries: vec![vec![1; 64], vec![2; 64]],
                        },
                        Op::PutMeta(format!("w{w}"), i.to_be_bytes().to_vec()),
                    ])
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let took = t.elapsed();
    let n = 64 * per_writer;
    println!(
        "postgres group commit: {n} batches from 64 writers in {took:?}: {:.0} batches/s",
        f64::from(n) / took.as_secs_f64()
    );
    assert_eq!(
        store.stats().await.unwrap().journal_entries,
        u64::from(n) * 2
    );
    store.close().await;
    cleanup.await;
}

/// Where a [`CommitCutter`] cuts the connection of the next `COMMIT`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Before the server sees the `COMMIT`: nothing is written.
    Request,
    /// After the server committed, before its answer reaches the store.
    Answer,
}

/// A TCP proxy that, when armed, cuts the connection carrying the next
/// `COMMIT`: either the request or its answer is dropped.
struct CommitCutter {
    addr: SocketAddr,
    armed: Arc<std::sync::Mutex<Option<Cut>>>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
}

/// Whether the cutter is armed for `cut` and `seen()` says this is the
/// place; if so it is disarmed (one cut per arming).
fn disarm(armed: &std::sync::Mutex<Option<Cut>>, cut: Cut, seen: impl FnOnce() -> bool) -> bool {
    let mut g = armed.lock().unwrap();
    let hit = *g == Some(cut) && seen();
    if hit {
        *g = None;
    }
    hit
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl CommitCutter {
    async fn start(target: SocketAddr) -> CommitCutter {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed: Arc<std::sync::Mutex<Option<Cut>>> = Arc::default();
        let cuts: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let (a, n) = (armed.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(out) = TcpStream::connect(target).await else {
                    continue;
                };
                let (a, n) = (a.clone(), n.clone());
                tokio::spawn(async move {
                    let (mut ci, mut co) = inbound.into_split();
                    let (mut si, mut so) = out.into_split();
                    // The name of this connection's prepared COMMIT, from
                    // its Parse message ('P', length, name\0, query\0).
                    let name: Arc<std::sync::Mutex<Option<Vec<u8>>>> = Arc::default();
                    let (a2, n2, name2) = (a.clone(), n.clone(), name.clone());
                    let up = tokio::spawn(async move {
                        let mut seen = Vec::new();
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let Ok(k) = ci.read(&mut buf).await else {
                                return;
                            };
                            if k == 0 {
                                return;
                            }
                            seen.extend_from_slice(&buf[..k]);
                            if name2.lock().unwrap().is_none()
                                && let Some(at) = find(&seen, b"\0COMMIT\0")
                            {
                                let start = seen[..at]
                                    .iter()
                                    .rposition(|b| *b == 0)
                                    .map_or(0, |p| p + 1);
                                // Skip the type byte and the length.
                                let start = start.max(at.saturating_sub(64));
                                let head = &seen[start..at];
                                let nm = head
                                    .iter()
                                    .rposition(|b| !b.is_ascii_alphanumeric())
                                    .map_or(head, |p| &head[p + 1..]);
                                *name2.lock().unwrap() = Some(nm.to_vec());
                                seen.clear();
                            }
                            let bind = name2.lock().unwrap().clone().map(|nm| {
                                let mut p = b"\0".to_vec();
                                p.extend_from_slice(&nm);
                                p.push(0);
                                p
                            });
                            let cut_here = disarm(&a2, Cut::Request, || {
                                bind.is_some_and(|p| find(&buf[..k], &p).is_some())
                            });
                            if cut_here {
                                n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                return;
                            }
                            if so.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                            if seen.len() > 1 << 20 {
                                seen.clear();
                            }
                        }
                    });
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let k = tokio::select! {
                            r = si.read(&mut buf) => match r { Ok(k) if k > 0 => k, _ => break },
                            _ = async { while !up.is_finished() { tokio::time::sleep(Duration::from_millis(5)).await } } => break,
                        };
                        // CommandComplete of a COMMIT: 'C', length 11, "COMMIT\0".
                        let hit = disarm(&a, Cut::Answer, || {
                            find(&buf[..k], b"C\0\0\0\x0bCOMMIT\0").is_some()
                        });
                        if hit {
                            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            break;
                        }
                        if co.write_all(&buf[..k]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        CommitCutter { addr, armed, cuts }
    }

    fn arm(&self, cut: Cut) {
        *self.armed.lock().unwrap() = Some(cut);
    }

    fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A connection lost while its COMMIT was on the way: the store answers
/// what the server did (written, or not), never a guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_answered_by_what_the_server_did() {
    let (url, cleanup) = fresh_database().await;
    let hostport = url
        .rsplit_once('@')
        .and_then(|(_, r)| r.split_once('/'))
        .map(|(hp, _)| hp.to_string())
        .unwrap();
    let proxy = CommitCutter::start(hostport.parse().unwrap()).await;
    let via = url.replacen(&hostport, &proxy.addr.to_string(), 1);
    let mut opts = PostgresOptions::default();
    opts.probe_interval = Duration::from_millis(100);
    let store = PostgresStore::connect(&via, opts).await.unwrap();
    let put = |n: u32| vec![Op::PutMeta(format!("k{n}"), vec![n as u8])];
    store.write(put(0)).await.unwrap();

    // Committed, and the answer lost: the write went through.
    proxy.arm(Cut::Answer);
    store
        .write(put(1))
        .await
        .expect("the server committed: the write is Ok");
    assert_eq!(proxy.cuts(), 1, "the answer of the COMMIT was cut");
    assert_eq!(store.meta("k1").await.unwrap(), Some(vec![1]));

    // The COMMIT never reached the server: not written, and said so.
    proxy.arm(Cut::Request);
    match store.write(put(2)).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(proxy.cuts(), 2, "the COMMIT request was cut");
    assert_eq!(store.meta("k2").await.unwrap(), None);

    // And on it goes.
    store.write(put(3)).await.unwrap();
    assert_eq!(store.meta("k3").await.unwrap(), Some(vec![3]));
    store.close().await;
    cleanup.await;
}

/// A CA and a certificate for 127.0.0.1 it signed, as PEM files in `dir`:
/// (CA, certificate, key).
fn tls_files(dir: &std::path::Path, ca_name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    };
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    params.subject_alt_names = vec![SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (c, s, k) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&c, issuer.pem()).unwrap();
    std::fs::write(&s, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, s, k)
}

/// `sslrootcert=` makes the store speak TLS and verify the server against
/// that CA; a server it cannot verify, a missing CA file and
/// `sslmode=require` without a CA are clear errors, and nothing is sent in
/// the clear when TLS was asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_server_is_verified_against_the_ca_it_is_given() {
    let dir = std::env::temp_dir().join(format!("braid-pg-tls-{}", std::process::id()));
    let (ca, cert, key) = tls_files(&dir, "braid test CA");
    let (other_ca, _, _) = tls_files(&dir.join("other"), "another CA");
    let pg = braid_testkit::PrivatePostgres::start_tls(&cert, &key);
    let url = |q: &str| format!("{}?{q}", pg.url());

    let store = PostgresStore::connect(
        &url(&format!("sslmode=require&sslrootcert={}", ca.display())),
        PostgresOptions::default(),
    )
    .await
    .expect("a TLS connection to the server its CA vouches for");
    store
        .write(vec![Op::PutMeta("k".into(), vec![1])])
        .await
        .unwrap();
    assert_eq!(store.meta("k").await.unwrap(), Some(vec![1]));
    store.close().await;
    // The server saw TLS on the store's sessions.
    let (admin, conn) = tokio_postgres::connect(pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let store = PostgresStore::connect(
        &url(&format!("sslrootcert={}", ca.display())),
        PostgresOptions::default(),
    )
    .await
    .expect("sslrootcert alone asks for TLS");
    store
        .write(vec![Op::PutMeta("k".into(), vec![2])])
        .await
        .unwrap();
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'braid'",
            &[],
        )
        .await
        .unwrap();
    let (tls, clear): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        tls >= 1 && clear == 0,
        "tls sessions {tls}, in the clear {clear}"
    );
    store.close().await;

    // A CA that did not sign the server's certificate: refused, saying why.
    match PostgresStore::connect(
        &url(&format!(
            "sslmode=require&sslrootcert={}",
            other_ca.display()
        )),
        PostgresOptions::default(),
    )
    .await
    {
        Err(StoreError::Unavailable(m)) => assert!(m.to_lowercase().contains("certificate"), "{m}"),
        Err(e) => panic!("expected Unavailable naming the certificate, got {e}"),
        Ok(_) => panic!("connected to a server its CA does not vouch for"),
    }
    // sslmode=require without a CA, and a CA file that is not there.
    match PostgresStore::connect(&url("sslmode=require"), PostgresOptions::default()).await {
        Err(StoreError::Config(m)) => assert!(m.contains("sslrootcert"), "{m}"),
        Err(e) => panic!("expected Config, got {e}"),
        Ok(_) => panic!("sslmode=require without a CA was accepted"),
    }
    match PostgresStore::connect(
        &url("sslrootcert=/nonexistent/ca.pem"),
        PostgresOptions::default(),
    )
    .await
    {
        Err(StoreError::Config(m)) => assert!(m.contains("/nonexistent/ca.pem"), "{m}"),
        Err(e) => panic!("expected Config, got {e}"),
        Ok(_) => panic!("a missing CA file was accepted"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_reads_its_partitions_flows_and_a_new_partition_count_is_applied_at_connect() {
    use braid_bus::topics::partition_of;
    use std::collections::BTreeSet;
    let (url, cleanup) = fresh_database().await;
    let with = |partitions: u16| {
        let mut o = PostgresOptions::default();
        o.flow_partitions = partitions;
        o
    };
    // Unfinished flows written while the store counted one partition, and
    // one that ended.
    let s = PostgresStore::connect(&url, with(1)).await.unwrap();
    let flows: Vec<FlowRecord> = (0..40)
        .map(|i| client_flow(&format!("c{i}"), FlowStatus::Running))
        .collect();
    let mut ops: Vec<Op> = flows
        .iter()
        .map(|f| Op::PutFlow(Box::new(f.clone())))
        .collect();
    ops.push(Op::PutFlow(Box::new(client_flow(
        "done",
        FlowStatus::Completed,
    ))));
    s.write(ops).await.unwrap();
    assert_eq!(s.load_partitions(&[0]).await.unwrap().flows.len(), 40);
    s.close().await;
    drop(s);
    // Opened for four: each unfinished flow's row now names its own.
    let s = PostgresStore::connect(&url, with(4)).await.unwrap();
    let ids = |snap: braid_storage::Snapshot| -> BTreeSet<FlowId> {
        snap.flows.iter().map(|f| f.id).collect()
    };
    let of = |p: u16| -> BTreeSet<FlowId> {
        flows
            .iter()
            .filter(|f| partition_of(f.id.bytes(), 4) == p)
            .map(|f| f.id)
            .collect()
    };
    let mut seen = 0;
    for p in 0..4 {
        let got = ids(s.load_partitions(&[p]).await.unwrap());
        assert_eq!(got, of(p), "partition {p}");
        seen += got.len();
    }
    assert_eq!(seen, 40, "every unfinished flow in exactly one partition");
    let both: BTreeSet<FlowId> = of(1).union(&of(3)).copied().collect();
    assert_eq!(ids(s.load_partitions(&[1, 3]).await.unwrap()), both);
    // A flow written now is in its own partition, whatever else the
    // batch holds.
    let new = client_flow("new", FlowStatus::Running);
    let p = partition_of(new.id.bytes(), 4);
    s.write(vec![Op::PutFlow(Box::new(new.clone()))])
        .await
        .unwrap();
    assert!(ids(s.load_partitions(&[p]).await.unwrap()).contains(&new.id));
    assert!(!ids(s.load_partitions(&[(p + 1) % 4]).await.unwrap()).contains(&new.id));
    // `load` still has them all.
    assert_eq!(s.load().await.unwrap().flows.len(), 41);
    s.close().await;
    drop(s);
    cleanup.await;
}
