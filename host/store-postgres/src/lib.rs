//! The PostgreSQL [`Store`] for cluster mode: every worker process of a
//! cluster points at the same database (`--store postgres://...`), so a
//! surviving flow worker finds a dead one's checkpoints and takes over its
//! partitions.
//!
//! - **Tables, not blobs**: `flows` (one row per flow with the columns
//!   queries need, a UNIQUE (holding, client_request_id) constraint, a
//!   `version` bumped on every write), `journal` (insert-only), `inbox`,
//!   `outbox`, `vnodes`, `packages` + `package_bytes`, `kills`, `meta` and
//!   `partitions` (see `migrations/`). Pages of `list_flows` and their
//!   cursors are the embedded store's, exactly ([`braid_storage::list_position`]).
//! - **Migrations** are numbered SQL files compiled in, applied at
//!   [`PostgresStore::connect`] under an advisory lock (two processes
//!   starting at once do not both migrate) and recorded in
//!   `schema_migrations`; applying them again is a no-op.
//! - **Group commit**: one writer task takes every batch waiting (up to
//!   [`PostgresOptions::max_group`]) and commits them in one transaction,
//!   each batch under its own `SAVEPOINT`, so a batch refused (stale fence,
//!   duplicate client request id) is rolled back alone. The statements of
//!   a group are pipelined: a group costs two round trips and one commit
//!   (one WAL flush), however many batches it holds. Reads go through the
//!   pool.
//! - **Fencing**: an [`Op::Fence`](braid_storage::Op::Fence) runs
//!   `braid_fence`, which locks the partition's row `FOR SHARE` inside the
//!   group transaction; [`Store::claim_partition`] is an
//!   `UPDATE ... RETURNING` of that row, so a claim waits for the fenced
//!   batches in flight, and none fenced with an older epoch commits after.
//! - **Faults**: while the server is unreachable writes fail with
//!   [`StoreError::Unavailable`] and [`Store::health`] says so; the pool
//!   reconnects by itself once the server is back.

#![warn(missing_docs)]

mod migrate;
mod rows;
mod writer;

use braid_storage::{
    FlowPage, FlowRecord, LIST_POSITION_LEN, Snapshot, Store, StoreError, StoreHealth, StoreStats,
};
use braid_types::{
    Checksum, ClientRequestId, FlowId, FlowStatus, HoldingId, SessionMessage, now_millis,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

pub use migrate::MIGRATIONS;

/// How a [`PostgresStore`] connects and commits.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// Connections in the pool (reads, claims, health probes and the
    /// writer share it).
    pub pool_size: usize,
    /// Most batches committed in one transaction.
    pub max_group: usize,
    /// How long to wait for a connection to the server.
    pub connect_timeout: Duration,
    /// How long one group commit (or one read) may take before it is
    /// given up as unavailable (a hung server or network).
    pub io_timeout: Duration,
    /// How often health is checked while writes fail (and, five times as
    /// rarely, while they go through).
    pub probe_interval: Duration,
    /// How long a session of this store may sit in an open transaction
    /// without sending anything before the server ends it
    /// (`idle_in_transaction_session_timeout`): a worker paused or hung
    /// mid-commit would otherwise hold its locks (a partition's row among
    /// them) and stall every other worker of the cluster.
    pub idle_in_transaction_timeout: Duration,
    /// Partitions flows are spread over (the flow-event topic's: 1 for an
    /// embedded node): each flow's row records its own
    /// (`braid_bus::topics::partition_of` of its id), which
    /// [`Store::load_partitions`] selects by. When it changes, the rows of
    /// unfinished flows are updated at connect.
    pub flow_partitions: u16,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 8,
            max_group: 1024,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            probe_interval: Duration::from_secs(1),
            idle_in_transaction_timeout: Duration::from_secs(10),
            flow_partitions: 1,
        }
    }
}

/// The meta key under which the partition count of the `partition`
/// column is kept.
const PARTITIONS_KEY: &str = "flows/partitions";

/// Makes every unfinished flow's `partition` its own for `partitions`
/// partitions, if the store's rows were written for another count (or
/// before the column was the flow's own).
async fn align_partitions(
    client: &mut tokio_postgres::Client,
    partitions: u16,
) -> Result<(), StoreError> {
    let failed = |e: tokio_postgres::Error| {
        StoreError::Unavailable(format!("updating flow partitions: {}", describe(&e)))
    };
    let want = partitions.max(1).to_be_bytes().to_vec();
    let rows = client
        .query("SELECT value FROM meta WHERE key = $1", &[&PARTITIONS_KEY])
        .await
        .map_err(failed)?;
    if let Some(r) = rows.first()
        && r.try_get::<_, Vec<u8>>(0).ok().as_deref() == Some(want.as_slice())
    {
        return Ok(());
    }
    let tx = client.transaction().await.map_err(failed)?;
    let ids = tx
        .query("SELECT flow_id FROM flows WHERE ended_ms IS NULL", &[])
        .await
        .map_err(failed)?;
    let update = tx
        .prepare("UPDATE flows SET partition = $2 WHERE flow_id = $1")
        .await
        .map_err(failed)?;
    for row in &ids {
        let id: Vec<u8> = row.try_get(0).map_err(|e| rows::corrupt("flows", e))?;
        let p = i32::from(braid_bus::topics::partition_of(&id, partitions.max(1)));
        tx.execute(&update, &[&id, &p]).await.map_err(failed)?;
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        &[&PARTITIONS_KEY, &want],
    )
    .await
    .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    if !ids.is_empty() {
        tracing::info!(
            flows = ids.len(),
            partitions,
            "recorded each unfinished flow's own partition"
        );
    }
    Ok(())
}

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Pool,
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::UnboundedSender<writer::Msg>>>,
    stop_probe: watch::Sender<bool>,
}

/// What the writer, the health probe and the store share.
pub(crate) struct Shared {
    pub(crate) health: Mutex<StoreHealth>,
    pub(crate) closed: AtomicBool,
    pub(crate) options: PostgresOptions,
}

impl Shared {
    pub(crate) fn set_health(&self, ok: bool, error: Option<String>) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.ok != ok {
            h.since_ms = now_millis();
            if ok {
                tracing::info!("PostgreSQL store reachable again; writes go through");
            } else if let Some(e) = &error {
                tracing::error!(cause = %e, "PostgreSQL store failing; writes are refused until it is back (retrying by itself)");
            }
        }
        h.ok = ok;
        h.error = error;
    }
}

/// Splits libpq's `sslrootcert=PATH` off the URL's parameters (the driver
/// does not know it): the URL without it, and the path.
fn take_root_cert(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut root = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("sslrootcert=") {
            Some(path) => {
                root = Some(path.to_string());
                false
            }
            None => true,
        })
        .collect();
    if rest.is_empty() {
        (base.to_string(), root)
    } else {
        (format!("{base}?{}", rest.join("&")), root)
    }
}

/// How the store talks to its server. With `sslrootcert=PATH` it speaks
/// TLS (rustls) and verifies the server's certificate against the CA
/// certificates in PATH and its name against the URL's host, whatever
/// `sslmode` says short of `disable` (`prefer`, the default, then insists
/// like `require`: a store that was given a CA wants it used). Without
/// one: plain, and `sslmode=require` is refused (braid does not speak TLS
/// to a server it cannot verify).
fn tls_connector(
    config: &mut tokio_postgres::Config,
    root_cert: Option<&str>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use tokio_postgres::config::SslMode;
    let mut roots = rustls::RootCertStore::empty();
    match (root_cert, config.get_ssl_mode()) {
        (_, SslMode::Disable) => {}
        (None, SslMode::Require) => {
            return Err(StoreError::Config(
                "the PostgreSQL URL says sslmode=require but names no sslrootcert=PATH: braid \
                 verifies the server's certificate, so it needs the CA that signed it (PEM)"
                    .into(),
            ));
        }
        (None, _) => {
            config.ssl_mode(SslMode::Disable);
        }
        (Some(path), _) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| StoreError::Config(format!("reading sslrootcert {path}: {e}")))?;
            if certs.is_empty() {
                return Err(StoreError::Config(format!(
                    "sslrootcert {path} holds no PEM certificate"
                )));
            }
            for c in certs {
                roots.add(c).map_err(|e| {
                    StoreError::Config(format!(
                        "sslrootcert {path}: a certificate rustls refuses: {e}"
                    ))
                })?;
            }
            config.ssl_mode(SslMode::Require);
        }
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Config(format!("TLS to PostgreSQL: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(client))
}

/// A driver error as text: the server's SQLSTATE and message when it has
/// one, else the error and its causes.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} ({})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(": ");
            s.push_str(d);
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Whether an error means the connection (or the server) is gone, rather
/// than that one statement was refused.
pub(crate) fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        // 08: connection exception; 57P: operator intervention (shutdown,
        // crash, cannot connect now); 53: insufficient resources.
        Some(db) => {
            let c = db.code().code();
            c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")
        }
        None => true,
    }
}

/// A failed read or write on `e`, as a [`StoreError`].
pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    if is_connection_error(&e) {
        StoreError::Unavailable(format!("PostgreSQL: {}", describe(&e)))
    } else {
        StoreError::Database(format!("PostgreSQL: {}", describe(&e)))
    }
}

pub(crate) fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => {
            StoreError::Unavailable(format!("cannot connect to PostgreSQL: {}", describe(&e)))
        }
        PoolError::Closed => StoreError::Closed,
        PoolError::Timeout(t) => StoreError::Unavailable(format!(
            "no PostgreSQL connection within the timeout ({t:?}): is the server reachable?"
        )),
        other => StoreError::Unavailable(format!("PostgreSQL connection pool: {other}")),
    }
}

/// Where `config` points, for messages (never the password).
fn target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports = config.get_ports();
    let db = config.get_dbname().unwrap_or("(default database)");
    let hosts = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{h}:{port}")
        })
        .collect::<Vec<_>>()
        .join(",");
    format!("{hosts}/{db}")
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`),
    /// applies the schema migrations it lacks and starts the writer.
    ///
    /// A malformed URL is [`StoreError::Config`]; a server that cannot be
    /// reached (or refuses the login) is [`StoreError::Unavailable`]
    /// naming host, port and database; a database whose schema is newer
    /// than this build is [`StoreError::Config`].
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        let (url, root_cert) = take_root_cert(url);
        // The driver's message says what is wrong without echoing the URL
        // (which may hold a password).
        let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| {
            StoreError::Config(format!(
                "invalid PostgreSQL URL ({e}); expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            ))
        })?;
        if config.get_hosts().is_empty() {
            return Err(StoreError::Config(
                "the PostgreSQL URL names no host; expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"
                    .into(),
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let idle = format!(
            "-c idle_in_transaction_session_timeout={}",
            options.idle_in_transaction_timeout.as_millis().max(1)
        );
        let session_options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {idle}"),
            _ => idle,
        };
        config.options(&session_options);
        if config.get_application_name().is_none() {
            config.application_name("braid");
        }
        let tls = tls_connector(&mut config, root_cert.as_deref())?;
        let where_ = target(&config);
        let unavailable = |e: tokio_postgres::Error| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {where_}: {}",
                describe(&e)
            ))
        };
        // Migrate on a connection of its own: the advisory lock is the
        // connection's.
        {
            let (mut client, conn) = config.connect(tls.clone()).await.map_err(unavailable)?;
            let driver = tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(cause = %e, "migration connection ended");
                }
            });
            let mut r = migrate::migrate(&mut client).await;
            if r.is_ok() {
                r = align_partitions(&mut client, options.flow_partitions).await;
            }
            drop(client);
            let _ = driver.await;
            r?;
        }
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                // A connection the server closed is dropped when handed
                // back; a group commit that fails drops its connection.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(options.connect_timeout))
            .wait_timeout(Some(options.io_timeout))
            .build()
            .map_err(|e| StoreError::Config(format!("PostgreSQL connection pool: {e}")))?;
        let shared = Arc::new(Shared {
            health: Mutex::new(StoreHealth {
                ok: true,
                error: None,
                since_ms: now_millis(),
            }),
            closed: AtomicBool::new(false),
            options: options.clone(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer::run(rx, pool.clone(), shared.clone()));
        let (stop_probe, stopped) = watch::channel(false);
        tokio::spawn(probe(pool.clone(), shared.clone(), stopped));
        Ok(PostgresStore {
            pool,
            shared,
            tx: Mutex::new(Some(tx)),
            stop_probe,
        })
    }

    /// The snapshot of `load`, the unfinished flows only of `partitions`
    /// when given.
    async fn load_some(&self, partitions: Option<&[u16]>) -> Result<Snapshot, StoreError> {
        let parts: Option<Vec<i32>> = partitions.map(|p| p.iter().map(|&x| i32::from(x)).collect());
        self.read(async |c| {
            // One snapshot of every table (rolled back when dropped).
            let c = &Self::snapshot(c).await?;
            {
                let mut snap = Snapshot::default();
                (snap.vnodes, snap.packages) = Self::catalog_in(c).await?;
                let flows = match &parts {
                    None => {
                        let sql = format!(
                            "SELECT {FLOW_COLUMNS} FROM flows WHERE ended_ms IS NULL ORDER BY flow_id"
                        );
                        Self::rows(c, &sql, &[]).await?
                    }
                    Some(p) => {
                        let sql = format!(
                            "SELECT {FLOW_COLUMNS} FROM flows WHERE ended_ms IS NULL \
                             AND partition = ANY($1) ORDER BY flow_id"
                        );
                        Self::rows(c, &sql, &[p]).await?
                    }
                };
                for row in flows {
                    snap.flows.push(rows::flow(&row)?);
                }
                for row in Self::rows(c, "SELECT message FROM outbox ORDER BY key", &[]).await? {
                    snap.outbox.push(rows::message("outbox", &row)?);
                }
                for row in Self::rows(
                    c,
                    "SELECT DISTINCT flow_id FROM inbox ORDER BY flow_id",
                    &[],
                )
                .await?
                {
                    snap.inbox_flows.push(rows::flow_id("inbox", &row, 0)?);
                }
                for row in
                    Self::rows(c, "SELECT flow_id, reason FROM kills ORDER BY flow_id", &[]).await?
                {
                    let reason: Vec<u8> = row.try_get(1).map_err(|e| rows::corrupt("kills", e))?;
                    snap.kills.push((
                        rows::flow_id("kills", &row, 0)?,
                        String::from_utf8_lossy(&reason).into_owned(),
                    ));
                }
                Ok(snap)
            }
        })
        .await
    }

    /// Whether writes are going through.
    pub fn health(&self) -> StoreHealth {
        self.shared
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A pooled connection, for reads.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        self.pool.get().await.map_err(pool_err)
    }

    /// Runs `f` on a pooled connection within the I/O timeout.
    async fn read<T>(
        &self,
        f: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let timeout = self.shared.options.io_timeout;
        let work = async {
            let mut c = self.client().await?;
            let r = f(&mut c).await;
            if r.is_err() && c.is_closed() {
                // Not back into the pool.
                drop(deadpool_postgres::Object::take(c));
            }
            r
        };
        tokio::time::timeout(timeout, work).await.map_err(|_| {
            StoreError::Unavailable(format!("PostgreSQL did not answer within {timeout:?}"))
        })?
    }

    /// The rows of `sql` with `params`, as a prepared statement.
    /// A read-only transaction that sees one snapshot of every table
    /// (rolled back when dropped).
    async fn snapshot(
        c: &mut deadpool_postgres::Object,
    ) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
        c.build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_err)
    }

    /// Every vnode and package record, read on `c`.
    async fn catalog_in(
        c: &impl deadpool_postgres::GenericClient,
    ) -> Result<
        (
            Vec<braid_storage::VnodeRecord>,
            Vec<braid_storage::PackageRecord>,
        ),
        StoreError,
    > {
        let mut vnodes = Vec::new();
        for row in Self::rows(
            c,
            "SELECT holding, name, package, created_ms, flow_starts_enabled \
             FROM vnodes ORDER BY holding",
            &[],
        )
        .await?
        {
            vnodes.push(rows::vnode(&row)?);
        }
        let mut packages = Vec::new();
        for row in Self::rows(
            c,
            "SELECT checksum, flows, size, uploaded_ms FROM packages ORDER BY checksum",
            &[],
        )
        .await?
        {
            packages.push(rows::package(&row)?);
        }
        Ok((vnodes, packages))
    }

    async fn rows(
        c: &impl deadpool_postgres::GenericClient,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let st = c.prepare_cached(sql).await.map_err(pg_err)?;
        c.query(&st, params).await.map_err(pg_err)
    }
}

/// Checks the server now and then, so health says the truth also while
/// no writes come (and comes back once the server does).
async fn probe(pool: Pool, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let ok = shared.health.lock().unwrap_or_else(|e| e.into_inner()).ok;
        let every = shared.options.probe_interval * if ok { 5 } else { 1 };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        let check = async {
            let c = pool.get().await.map_err(pool_err)?;
            c.simple_query("SELECT 1").await.map_err(pg_err)?;
            Ok::<(), StoreError>(())
        };
        match tokio::time::timeout(shared.options.connect_timeout, check).await {
            Ok(Ok(())) => shared.set_health(true, None),
            Ok(Err(StoreError::Closed)) => return,
            Ok(Err(e)) => shared.set_health(false, Some(e.to_string())),
            Err(_) => shared.set_health(
                false,
                Some(format!(
                    "PostgreSQL did not answer within {:?}",
                    shared.options.connect_timeout
                )),
            ),
        }
    }
}

const FLOW_COLUMNS: &str =
    "flow_id, holding, flow_name, package, status, created_ms, updated_ms, journal_len, rest";

/// Where a list continues: after (or, for a cursor shorter than a
/// position, at) `created_ms`, `id`.
struct Cursor {
    created_ms: i64,
    id: Vec<u8>,
    inclusive: bool,
}

/// Reads a cursor as the embedded store's key range does: a full position
/// continues after it; a shorter one is a prefix (everything at or after
/// it, zero-padded); a longer one continues after its first 24 bytes.
/// `None` inside: the cursor is beyond every flow.
fn cursor(after: &[u8]) -> Option<Cursor> {
    let mut pos = [0u8; LIST_POSITION_LEN];
    let n = after.len().min(LIST_POSITION_LEN);
    pos[..n].copy_from_slice(&after[..n]);
    let created = u64::from_be_bytes(pos[..8].try_into().expect("8 bytes"));
    let created_ms = i64::try_from(created).ok()?;
    Some(Cursor {
        created_ms,
        id: pos[8..].to_vec(),
        inclusive: after.len() < LIST_POSITION_LEN,
    })
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn write(&self, ops: Vec<braid_storage::Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let (reply, wait) = oneshot::channel();
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(writer::Msg::Write(ops, reply))
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    async fn claim_partition(&self, partition: u16, owner: &str) -> Result<u64, StoreError> {
        let rows = self
            .read(async |c| {
                Self::rows(
                    c,
                    "INSERT INTO partitions (partition, epoch, owner, claimed_at) \
                     VALUES ($1, 1, $2, now()) \
                     ON CONFLICT (partition) DO UPDATE SET epoch = partitions.epoch + 1, \
                     owner = EXCLUDED.owner, claimed_at = now() RETURNING epoch",
                    &[&i32::from(partition), &owner],
                )
                .await
            })
            .await?;
        let epoch: i64 = rows
            .first()
            .ok_or_else(|| StoreError::Database("a claim returned no row".into()))?
            .try_get(0)
            .map_err(|e| rows::corrupt("partitions", e))?;
        Ok(epoch as u64)
    }

    async fn partition_owners(&self) -> Result<Vec<(u16, u64, String)>, StoreError> {
        let rows = self
            .read(async |c| {
                Self::rows(
                    c,
                    "SELECT partition, epoch, owner FROM partitions WHERE owner <> '' \
                     ORDER BY partition",
                    &[],
                )
                .await
            })
            .await?;
        rows.iter()
            .map(|r| {
                let p: i32 = r.try_get(0).map_err(|e| rows::corrupt("partitions", e))?;
                let e: i64 = r.try_get(1).map_err(|e| rows::corrupt("partitions", e))?;
                let o: String = r.try_get(2).map_err(|e| rows::corrupt("partitions", e))?;
                Ok((p as u16, e as u64, o))
            })
            .collect()
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        self.load_some(None).await
    }

    async fn load_partitions(&self, partitions: &[u16]) -> Result<Snapshot, StoreError> {
        self.load_some(Some(partitions)).await
    }

    async fn catalog(
        &self,
    ) -> Result<
        (
            Vec<braid_storage::VnodeRecord>,
            Vec<braid_storage::PackageRecord>,
        ),
        StoreError,
    > {
        self.read(async |c| Self::catalog_in(&Self::snapshot(c).await?).await)
            .await
    }

    async fn outbox(&self) -> Result<Vec<braid_types::SessionMessage>, StoreError> {
        let rows = self
            .read(async |c| Self::rows(c, "SELECT message FROM outbox ORDER BY key", &[]).await)
            .await?;
        rows.iter().map(|r| rows::message("outbox", r)).collect()
    }

    async fn early_flows(&self) -> Result<usize, StoreError> {
        let rows = self
            .read(async |c| {
                Self::rows(
                    c,
                    "SELECT count(DISTINCT i.flow_id) FROM inbox i \
                     WHERE NOT EXISTS (SELECT 1 FROM flows f WHERE f.flow_id = i.flow_id)",
                    &[],
                )
                .await
            })
            .await?;
        let n: i64 = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| rows::corrupt("inbox", e))?
            .unwrap_or(0);
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn kills(&self) -> Result<Vec<(FlowId, String)>, StoreError> {
        let rows = self
            .read(async |c| {
                Self::rows(c, "SELECT flow_id, reason FROM kills ORDER BY flow_id", &[]).await
            })
            .await?;
        rows.iter()
            .map(|row| {
                let reason: Vec<u8> = row.try_get(1).map_err(|e| rows::corrupt("kills", e))?;
                Ok((
                    rows::flow_id("kills", row, 0)?,
                    String::from_utf8_lossy(&reason).into_owned(),
                ))
            })
            .collect()
    }

    async fn stale_starts(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<FlowRecord>, StoreError> {
        // Among unfinished flows only (their partial index): as many as
        // are in flight, not every flow kept.
        let sql = format!(
            "SELECT {FLOW_COLUMNS} FROM flows WHERE ended_ms IS NULL \
             AND status = 'START_REQUESTED' AND created_ms < $1 \
             ORDER BY created_ms, flow_id LIMIT $2"
        );
        let before = i64::try_from(before_ms).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .read(async |c| Self::rows(c, &sql, &[&before, &limit]).await)
            .await?;
        rows.iter().map(rows::flow).collect()
    }

    async fn package_bytes(&self, checksum: &Checksum) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self
            .read(async |c| {
                Self::rows(
                    c,
                    "SELECT bytes FROM package_bytes WHERE checksum = $1",
                    &[&checksum.bytes().as_slice()],
                )
                .await
            })
            .await?;
        match rows.first() {
            Some(r) => Ok(Some(
                r.try_get(0)
                    .map_err(|e| rows::corrupt("package_bytes", e))?,
            )),
            None => Ok(None),
        }
    }

    async fn journal(&self, flow: &FlowId) -> Result<Vec<Vec<u8>>, StoreError> {
        let rows = self
            .read(async |c| {
                Self::rows(
                    c,
                    "SELECT entry FROM journal WHERE flow_id = $1 ORDER BY idx",
                    &[&flow.bytes().as_slice()],
                )
                .await
            })
            .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(|e| rows::corrupt("journal", e)))
            .collect()
    }

    async fn inbox(&self, flow: &FlowId) -> Result<Vec<SessionMessage>, StoreError> {
        let rows = self
            .read(async |c| {
                Self::rows(
                    c,
                    "SELECT message FROM inbox WHERE flow_id = $1 ORDER BY key",
                    &[&flow.bytes().as_slice()],
                )
                .await
            })
            .await?;
        rows.iter().map(|r| rows::message("inbox", r)).collect()
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self
            .read(async |c| Self::rows(c, "SELECT value FROM meta WHERE key = $1", &[&key]).await)
            .await?;
        match rows.first() {
            Some(r) => Ok(Some(r.try_get(0).map_err(|e| rows::corrupt("meta", e))?)),
            None => Ok(None),
        }
    }

    async fn flow(&self, id: &FlowId) -> Result<Option<FlowRecord>, StoreError> {
        let sql = format!("SELECT {FLOW_COLUMNS} FROM flows WHERE flow_id = $1");
        let rows = self
            .read(async |c| Self::rows(c, &sql, &[&id.bytes().as_slice()]).await)
            .await?;
        rows.first().map(rows::flow).transpose()
    }

    async fn flow_by_client(
        &self,
        holding: &HoldingId,
        client_request_id: &ClientRequestId,
    ) -> Result<Option<FlowRecord>, StoreError> {
        let sql = format!(
            "SELECT {FLOW_COLUMNS} FROM flows WHERE holding = $1 AND client_request_id = $2"
        );
        let rows = self
            .read(async |c| {
                Self::rows(
                    c,
                    &sql,
                    &[&holding.bytes().as_slice(), &client_request_id.as_str()],
                )
                .await
            })
            .await?;
        rows.first().map(rows::flow).transpose()
    }

    async fn list_flows(
        &self,
        holding: &HoldingId,
        status: Option<FlowStatus>,
        after: Option<&[u8]>,
        limit: usize,
        scan: usize,
    ) -> Result<FlowPage, StoreError> {
        let cursor = match after {
            None => None,
            Some(a) => match cursor(a) {
                Some(c) => Some(c),
                None => return Ok(FlowPage::default()),
            },
        };
        // The embedded store's walk looks at up to `scan` entries (up to
        // `limit` without a filter) and one more to know whether more
        // follow: fetch that many positions, then the matching records.
        let looked = if status.is_none() {
            limit.min(scan)
        } else {
            scan
        };
        let fetch = i64::try_from(looked.saturating_add(1)).unwrap_or(i64::MAX);
        let h = holding.bytes().as_slice();
        let positions = self
            .read(async |c| match &cursor {
                None => {
                    Self::rows(
                        c,
                        "SELECT created_ms, flow_id, status FROM flows WHERE holding = $1 \
                         ORDER BY created_ms, flow_id LIMIT $2",
                        &[&h, &fetch],
                    )
                    .await
                }
                Some(cur) => {
                    let sql = if cur.inclusive {
                        "SELECT created_ms, flow_id, status FROM flows WHERE holding = $1 \
                         AND (created_ms, flow_id) >= ($2, $3) ORDER BY created_ms, flow_id LIMIT $4"
                    } else {
                        "SELECT created_ms, flow_id, status FROM flows WHERE holding = $1 \
                         AND (created_ms, flow_id) > ($2, $3) ORDER BY created_ms, flow_id LIMIT $4"
                    };
                    Self::rows(c, sql, &[&h, &cur.created_ms, &cur.id, &fetch]).await
                }
            })
            .await?;
        let want = status.map(rows::status_text);
        let mut matched: Vec<Vec<u8>> = Vec::new();
        let mut last: Option<[u8; LIST_POSITION_LEN]> = None;
        let mut next = None;
        // `scanned`: how many positions the walk has looked at.
        for (scanned, row) in positions.iter().enumerate() {
            if matched.len() == limit || scanned == scan {
                next = last.map(|l| l.to_vec());
                break;
            }
            let created: i64 = row.try_get(0).map_err(|e| rows::corrupt("flows", e))?;
            let id = rows::flow_id("flows", row, 1)?;
            let mut pos = [0u8; LIST_POSITION_LEN];
            pos[..8].copy_from_slice(&(created as u64).to_be_bytes());
            pos[8..].copy_from_slice(id.bytes());
            last = Some(pos);
            let st: &str = row.try_get(2).map_err(|e| rows::corrupt("flows", e))?;
            if want.is_some_and(|w| w != st) {
                continue;
            }
            matched.push(id.bytes().to_vec());
        }
        let mut flows = Vec::with_capacity(matched.len());
        if !matched.is_empty() {
            let sql = format!(
                "SELECT {FLOW_COLUMNS} FROM flows WHERE flow_id = ANY($1) \
                 ORDER BY created_ms, flow_id"
            );
            let rows = self
                .read(async |c| Self::rows(c, &sql, &[&matched]).await)
                .await?;
            for r in &rows {
                flows.push(rows::flow(r)?);
            }
        }
        Ok(FlowPage { flows, next })
    }

    async fn finished_before(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<FlowRecord>, StoreError> {
        // Stored times are below i64::MAX (the writer refuses others).
        let cutoff = i64::try_from(cutoff_ms).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {FLOW_COLUMNS} FROM flows WHERE ended_ms < $1 \
             ORDER BY ended_ms, flow_id LIMIT $2"
        );
        let rows = self
            .read(async |c| Self::rows(c, &sql, &[&cutoff, &limit]).await)
            .await?;
        rows.iter().map(rows::flow).collect()
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let rows = self
            .read(async |c| {
                Self::rows(
                    c,
                    "SELECT (SELECT count(*) FROM flows), \
                     (SELECT count(*) FROM flows WHERE ended_ms IS NULL), \
                     (SELECT count(*) FROM journal), (SELECT count(*) FROM inbox), \
                     (SELECT count(*) FROM outbox), (SELECT count(*) FROM kills), \
                     (SELECT count(*) FROM flows WHERE client_request_id IS NOT NULL)",
                    &[],
                )
                .await
            })
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Database("stats returned no row".into()))?;
        let n = |i: usize| -> Result<u64, StoreError> {
            let v: i64 = row.try_get(i).map_err(|e| rows::corrupt("stats", e))?;
            Ok(v as u64)
        };
        let flows = n(0)?;
        Ok(StoreStats {
            flows,
            unfinished: n(1)?,
            journal_entries: n(2)?,
            inbox: n(3)?,
            outbox: n(4)?,
            kills: n(5)?,
            index_entries: n(6)? + 2 * flows,
        })
    }

    fn health(&self) -> StoreHealth {
        PostgresStore::health(self)
    }

    async fn close(&self) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let (done, wait) = oneshot::channel();
            if tx.send(writer::Msg::Close(done)).is_ok() {
                let _ = wait.await;
            }
        }
        self.shared.closed.store(true, Ordering::SeqCst);
        let _ = self.stop_probe.send(true);
        self.pool.close();
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The writer finishes what was sent, then ends.
        let _ = self.stop_probe.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_as_the_embedded_key_range_does() {
        let mut pos = [0u8; LIST_POSITION_LEN];
        pos[..8].copy_from_slice(&12u64.to_be_bytes());
        pos[8..].fill(7);
        let c = cursor(&pos).unwrap();
        assert_eq!(
            (c.created_ms, c.id.as_slice(), c.inclusive),
            (12, &[7u8; 16][..], false)
        );
        // A prefix: inclusive, zero-padded.
        let c = cursor(&pos[..9]).unwrap();
        assert_eq!(c.created_ms, 12);
        assert_eq!(c.id[0], 7);
        assert!(c.id[1..].iter().all(|b| *b == 0) && c.inclusive);
        // Longer: after the first 24 bytes.
        let mut long = pos.to_vec();
        long.push(1);
        let c = cursor(&long).unwrap();
        assert_eq!((c.id.as_slice(), c.inclusive), (&[7u8; 16][..], false));
        // Beyond every stored time.
        assert!(cursor(&[0x80; 24]).is_none());
        assert!(cursor(&[]).is_some_and(|c| c.created_ms == 0 && c.inclusive));
    }
}
