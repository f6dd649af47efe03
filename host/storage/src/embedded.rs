//! The embedded store: one redb file, fsync'd on every commit, with group
//! commit across callers.
//!
//! One writer thread owns the write side. It takes every batch that is
//! waiting, applies them all in one transaction, commits once (one fsync)
//! and then answers each caller. Under load, many flows' checkpoints share
//! one fsync; when idle, a lone batch commits at once.
//!
//! Faults: after an I/O error (a full disk, say) redb refuses every further
//! transaction until the database is reopened. The writer then closes the
//! database and, with backoff, reopens it (redb repairs it; reads work
//! again from then on) and checks that the disk takes new data (see
//! `faults::probe_space`); until both work it answers every write with
//! [`StoreError::Unavailable`] without trying it, so the store does not flap
//! between working and failing on a disk that is still full. It comes back
//! by itself once the cause is gone; [`EmbeddedStore::health`] says which
//! state it is in. It logs the failure once, a reminder every few minutes,
//! and the recovery once.
//!
//! A damaged file (cut short, overwritten, from an incompatible version) is
//! [`StoreError::Damaged`] wherever redb notices it, at open or later, and
//! never a panic: see the `faults` module.
//!
//! Besides the flow records, the store keeps indexes so that a node never
//! needs every flow in memory: by client request id, by vnode (creation
//! order, with the status), the unfinished flows (loaded at start) and the
//! finished ones by end time (for the retention sweep).

mod faults;

use crate::{
    FlowPage, FlowRecord, Op, PackageRecord, Snapshot, Store, StoreError, StoreHealth, StoreStats,
    VnodeRecord, status_code,
};
use braid_types::{Checksum, ClientRequestId, FlowId, FlowStart, FlowStatus, HoldingId};
use braid_types::{SessionMessage, now_millis};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use faults::{Opening, db_err, guarded, open_db, probe_space};

const FLOWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("flows");
const JOURNAL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("journal");
const OUTBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("outbox");
const INBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("inbox");
const VNODES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("vnodes");
const PACKAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("packages");
const PACKAGE_BYTES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("package_bytes");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");
/// holding (6) + client request id → flow id.
const BY_CLIENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("flows_by_client");
/// holding (6) + created ms (8, big-endian) + flow id (16) → status byte.
const BY_VNODE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("flows_by_vnode");
/// flow id → nothing: the flows that have not ended.
const UNFINISHED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("flows_unfinished");
/// end ms (8, big-endian) + flow id → nothing: ended flows, oldest first.
const FINISHED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("flows_finished");
/// flow id → reason: kills requested and not yet carried out.
const KILLS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kills");
/// partition (2, big-endian) → [`PartitionOwner`].
const PARTITIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("partitions");

/// Who owns a partition, since when, at which epoch.
#[derive(Debug, Serialize, Deserialize)]
struct PartitionOwner {
    epoch: u64,
    owner: String,
    claimed_ms: u64,
}

/// One caller's request in a group commit.
enum Job {
    Write(Vec<Op>, Reply),
    Claim(u16, String, ClaimReply),
}

impl Job {
    fn fail(self, e: StoreError) {
        match self {
            Job::Write(_, r) => {
                let _ = r.send(Err(e));
            }
            Job::Claim(_, _, r) => {
                let _ = r.send(Err(e));
            }
        }
    }
}

/// What one job came to, before the commit.
enum Outcome {
    Written,
    Claimed(u64),
    Failed(StoreError),
}

/// The layout version; older files get their indexes built on open.
const SCHEMA_KEY: &str = "store/schema";
const SCHEMA: &[u8] = b"2";

/// Largest number of batches folded into one commit.
const MAX_GROUP: usize = 4096;

/// Memory for redb's page cache. Its default (1 GiB) is memory a node
/// grows into as its store grows (finished flows stay for the retention);
/// the hot pages of the indexes fit in this, the rest is read through the
/// OS page cache.
pub(super) const CACHE_BYTES: usize = 8 << 20;

type Reply = oneshot::Sender<Result<(), StoreError>>;
type ClaimReply = oneshot::Sender<Result<u64, StoreError>>;

/// Answers a close request once the file is closed.
type Sender = std_mpsc::Sender<()>;

enum Msg {
    Write(Vec<Op>, Reply),
    Claim(u16, String, ClaimReply),
    /// Finish, close the file, then answer.
    Close(Sender),
}

/// The database, shared by readers and the writer; `None` while the writer
/// reopens it after a fault, or once closed.
type Shared = Arc<RwLock<Option<Arc<Database>>>>;

/// The embedded, file-backed store.
pub struct EmbeddedStore {
    path: PathBuf,
    db: Shared,
    health: Arc<Mutex<StoreHealth>>,
    tx: Mutex<Option<std_mpsc::Sender<Msg>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.shut_down();
    }
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encoding of an in-memory value cannot fail")
}

fn dec<T: DeserializeOwned>(table: &'static str, b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

fn journal_key(flow: &FlowId, idx: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(flow.bytes());
    k[16..].copy_from_slice(&idx.to_be_bytes());
    k
}

/// The range of keys beginning with `prefix`, as (start, end) bounds.
fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let start = prefix.to_vec();
    let mut end = prefix.to_vec();
    end.push(0xff);
    end.extend_from_slice(&[0xff; 32]);
    (start, end)
}

fn client_key(holding: &HoldingId, id: &ClientRequestId) -> Vec<u8> {
    let mut k = holding.bytes().to_vec();
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

fn vnode_key(r: &FlowRecord) -> Vec<u8> {
    [r.holding.bytes().as_slice(), &crate::list_position(r)].concat()
}

fn finished_key(r: &FlowRecord) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&r.updated_ms.to_be_bytes());
    k[8..].copy_from_slice(r.id.bytes());
    k
}

/// Creates every table and, for files of an older layout, the indexes.
fn prepare(db: &Database) -> Result<(), StoreError> {
    let w = db.begin_write().map_err(db_err)?;
    {
        for t in [
            FLOWS,
            JOURNAL,
            OUTBOX,
            INBOX,
            VNODES,
            PACKAGES,
            PACKAGE_BYTES,
            META,
            BY_CLIENT,
            BY_VNODE,
            UNFINISHED,
            FINISHED,
            KILLS,
            PARTITIONS,
        ] {
            w.open_table(t).map_err(db_err)?;
        }
        let mut meta = w.open_table(META).map_err(db_err)?;
        let current = meta
            .get(SCHEMA_KEY.as_bytes())
            .map_err(db_err)?
            .map(|v| v.value().to_vec());
        if current.as_deref() != Some(SCHEMA) {
            let flows = w.open_table(FLOWS).map_err(db_err)?;
            let mut idx = Indexes::open(&w)?;
            let mut n = 0u64;
            for row in flows.iter().map_err(db_err)? {
                let (_, v) = row.map_err(db_err)?;
                let r: FlowRecord = dec("flows", v.value())?;
                idx.put(&r)?;
                n += 1;
            }
            if n > 0 {
                tracing::info!(flows = n, "indexed the flows of an older store");
            }
            meta.insert(SCHEMA_KEY.as_bytes(), SCHEMA).map_err(db_err)?;
        }
    }
    w.commit().map_err(db_err)
}

/// The index tables, open in one write transaction.
struct Indexes<'t> {
    by_client: redb::Table<'t, &'static [u8], &'static [u8]>,
    by_vnode: redb::Table<'t, &'static [u8], &'static [u8]>,
    unfinished: redb::Table<'t, &'static [u8], &'static [u8]>,
    finished: redb::Table<'t, &'static [u8], &'static [u8]>,
}

impl<'t> Indexes<'t> {
    fn open(w: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Indexes {
            by_client: w.open_table(BY_CLIENT).map_err(db_err)?,
            by_vnode: w.open_table(BY_VNODE).map_err(db_err)?,
            unfinished: w.open_table(UNFINISHED).map_err(db_err)?,
            finished: w.open_table(FINISHED).map_err(db_err)?,
        })
    }

    /// Indexes a record as written (derived from the record alone: its
    /// creation time and ids never change, and it is written once ended).
    fn put(&mut self, r: &FlowRecord) -> Result<(), StoreError> {
        if let FlowStart::Client {
            client_request_id, ..
        } = &r.start
        {
            self.by_client
                .insert(
                    client_key(&r.holding, client_request_id).as_slice(),
                    r.id.bytes().as_slice(),
                )
                .map_err(db_err)?;
        }
        self.by_vnode
            .insert(vnode_key(r).as_slice(), [status_code(r.status)].as_slice())
            .map_err(db_err)?;
        if r.status.is_terminal() {
            self.unfinished
                .remove(r.id.bytes().as_slice())
                .map_err(db_err)?;
            self.finished
                .insert(finished_key(r).as_slice(), [].as_slice())
                .map_err(db_err)?;
        } else {
            self.unfinished
                .insert(r.id.bytes().as_slice(), [].as_slice())
                .map_err(db_err)?;
        }
        Ok(())
    }

    fn delete(&mut self, r: &FlowRecord) -> Result<(), StoreError> {
        if let FlowStart::Client {
            client_request_id, ..
        } = &r.start
        {
            let k = client_key(&r.holding, client_request_id);
            let same = self
                .by_client
                .get(k.as_slice())
                .map_err(db_err)?
                .is_some_and(|v| v.value() == r.id.bytes().as_slice());
            if same {
                self.by_client.remove(k.as_slice()).map_err(db_err)?;
            }
        }
        self.by_vnode
            .remove(vnode_key(r).as_slice())
            .map_err(db_err)?;
        self.unfinished
            .remove(r.id.bytes().as_slice())
            .map_err(db_err)?;
        self.finished
            .remove(finished_key(r).as_slice())
            .map_err(db_err)?;
        Ok(())
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`.
    ///
    /// A file that is not a usable database (cut short, overwritten, from
    /// an incompatible version) is [`StoreError::Damaged`].
    ///
    /// A file another process holds open is [`StoreError::InUse`].
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        // A probe a crash interrupted.
        let _ = std::fs::remove_file(faults::probe_path(path));
        let db = open_db(path, Opening::Start)?;
        guarded(path, || prepare(&db))?;
        let db: Shared = Arc::new(RwLock::new(Some(Arc::new(db))));
        let health = Arc::new(Mutex::new(StoreHealth {
            ok: true,
            error: None,
            since_ms: now_millis(),
        }));
        let (tx, rx) = std_mpsc::channel::<Msg>();
        let writer = Writer {
            db: db.clone(),
            health: health.clone(),
            path: path.to_path_buf(),
            last_recovery: std::cell::Cell::new(None),
        };
        let writer = std::thread::Builder::new()
            .name("braid-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(db_err)?;
        Ok(EmbeddedStore {
            path: path.to_path_buf(),
            db,
            health,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Whether writes are going through (see the module docs).
    pub fn health(&self) -> StoreHealth {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn database(&self) -> Result<Arc<Database>, StoreError> {
        let g = self.db.read().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(db) => Ok(db.clone()),
            None => Err(self.unavailable()),
        }
    }

    fn unavailable(&self) -> StoreError {
        let h = self.health();
        match (h.ok, h.error) {
            (false, Some(e)) => StoreError::Unavailable(format!("{e}; recovering")),
            _ => StoreError::Closed,
        }
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = self.database()?;
        guarded(&self.path, || {
            let r = db.begin_read().map_err(db_err)?;
            f(&r)
        })
    }

    /// Stops the writer after the batches already sent and closes the file
    /// cleanly (no repair on the next open). Blocks until done.
    fn shut_down(&self) {
        let (tx, writer) = self.take_writer();
        finish_writer(tx, writer);
    }

    fn take_writer(
        &self,
    ) -> (
        Option<std_mpsc::Sender<Msg>>,
        Option<std::thread::JoinHandle<()>>,
    ) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        (tx, writer)
    }
}

fn finish_writer(tx: Option<std_mpsc::Sender<Msg>>, writer: Option<std::thread::JoinHandle<()>>) {
    if let Some(tx) = tx {
        let (done, wait) = std_mpsc::channel();
        if tx.send(Msg::Close(done)).is_ok() {
            let _ = wait.recv();
        }
    }
    if let Some(w) = writer {
        let _ = w.join();
    }
}

/// The writer thread's side.
struct Writer {
    db: Shared,
    health: Arc<Mutex<StoreHealth>>,
    path: PathBuf,
    /// When the last recovery ended, and the backoff it had reached: a
    /// fault soon after carries on from there (a disk that fails every
    /// write again is retried ever more slowly, not every 50 ms).
    last_recovery: std::cell::Cell<Option<(Instant, Duration)>>,
}

/// A fault this soon after a recovery continues its backoff.
const FLAPPING: Duration = Duration::from_secs(30);

/// The store's failure and recovery lines, for a disk that keeps failing
/// and recovering.
static FAULT_LOG: braid_types::log_limit::LogLimiter =
    braid_types::log_limit::LogLimiter::new(5, Duration::from_secs(300));

/// How often a store that keeps failing says so again.
const FAILING_REMINDER: Duration = Duration::from_secs(300);

/// Backoff between recovery attempts.
const RECOVERY_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// Whether a failed write means the database must be reopened: after an
/// I/O error redb refuses every further transaction, and after a panic
/// (damage) its state is not to be trusted.
fn needs_reopen(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_) | StoreError::Damaged { .. })
}

impl Writer {
    fn set_health(&self, ok: bool, error: Option<String>) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.ok != ok {
            h.since_ms = now_millis();
        }
        h.ok = ok;
        h.error = error;
    }

    fn current(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn run(self, rx: std_mpsc::Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut group = Vec::new();
            let mut close = None;
            match first {
                Msg::Write(ops, reply) => group.push(Job::Write(ops, reply)),
                Msg::Claim(p, owner, reply) => group.push(Job::Claim(p, owner, reply)),
                Msg::Close(done) => close = Some(done),
            }
            while close.is_none() && group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(Msg::Write(ops, reply)) => group.push(Job::Write(ops, reply)),
                    Ok(Msg::Claim(p, owner, reply)) => group.push(Job::Claim(p, owner, reply)),
                    Ok(Msg::Close(done)) => close = Some(done),
                    Err(_) => break,
                }
            }
            if !group.is_empty()
                && let Err(fault) = self.commit(group)
                && close.is_none()
            {
                close = self.recover(&rx, fault);
            }
            if let Some(done) = close {
                self.close();
                let _ = done.send(());
                return;
            }
        }
        self.close();
    }

    /// Commits one group and answers its callers; `Err` (the failure) when
    /// the database must be reopened.
    fn commit(&self, group: Vec<Job>) -> Result<(), StoreError> {
        let Some(db) = self.current() else {
            for job in group {
                job.fail(StoreError::Closed);
            }
            return Ok(());
        };
        let t = Instant::now();
        let outcome = guarded(&self.path, || apply_group(&db, &group));
        drop(db);
        tracing::trace!(
            batches = group.len(),
            ops = group
                .iter()
                .map(|j| match j {
                    Job::Write(o, _) => o.len(),
                    Job::Claim(..) => 1,
                })
                .sum::<usize>(),
            micros = t.elapsed().as_micros() as u64,
            "group commit"
        );
        let fault = match &outcome {
            Err(StoreError::Unavailable(e)) => Some(e.clone()),
            Err(e) if needs_reopen(e) => Some(e.to_string()),
            _ => None,
        };
        if let Some(e) = &fault {
            // Say so before answering, so that whoever sees a refusal can
            // also see it in health.
            self.set_health(false, Some(e.clone()));
            if let Some(note) = FAULT_LOG.allow("store_failed") {
                tracing::error!(cause = %e,
                    "store write failed; refusing writes until the store is reopened and the \
                     disk takes data again (retrying by itself){note}");
            }
        }
        match outcome {
            Ok(outcomes) => {
                for (job, done) in group.into_iter().zip(outcomes) {
                    match (job, done) {
                        (job, Outcome::Failed(e)) => job.fail(e),
                        (Job::Write(_, reply), _) => {
                            let _ = reply.send(Ok(()));
                        }
                        (Job::Claim(_, _, reply), Outcome::Claimed(epoch)) => {
                            let _ = reply.send(Ok(epoch));
                        }
                        (job @ Job::Claim(..), Outcome::Written) => job.fail(StoreError::Database(
                            "internal: a claim came to no epoch".into(),
                        )),
                    }
                }
            }
            Err(e) => {
                for job in group {
                    job.fail(match &e {
                        StoreError::Unavailable(e) => StoreError::Unavailable(e.clone()),
                        StoreError::Damaged { path, detail } => StoreError::Damaged {
                            path: path.clone(),
                            detail: detail.clone(),
                        },
                        e => StoreError::Database(e.to_string()),
                    });
                }
            }
        }
        match fault {
            Some(e) => Err(StoreError::Unavailable(e)),
            None => Ok(()),
        }
    }

    /// After a failed write: closes the database, then with backoff reopens
    /// it (reads work again from then on) and probes that the disk takes
    /// new data, until both work. Meanwhile every write is refused with
    /// `Unavailable`, untried. Returns a close request that came meanwhile.
    fn recover(&self, rx: &std_mpsc::Receiver<Msg>, fault: StoreError) -> Option<Sender> {
        let failed_at = Instant::now();
        let mut error = match fault {
            StoreError::Unavailable(e) => e,
            other => other.to_string(),
        };
        self.close();
        let mut backoff = RECOVERY_BACKOFF.0;
        if let Some((at, reached)) = self.last_recovery.get()
            && at.elapsed() < FLAPPING
        {
            // It failed again soon after recovering: wait before trying.
            backoff = reached;
            match refuse_writes(rx, backoff, &error) {
                Waited::Elapsed => {}
                Waited::Close(done) => return Some(done),
                Waited::Disconnected => return None,
            }
            backoff = (backoff * 2).min(RECOVERY_BACKOFF.1);
        }
        let mut reminded = Instant::now();
        loop {
            if self.current().is_none() {
                let opened = open_db(&self.path, Opening::Recovery)
                    .and_then(|db| guarded(&self.path, || prepare(&db)).map(|()| db));
                match opened {
                    Ok(db) => {
                        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db))
                    }
                    Err(e) => error = e.to_string(),
                }
            }
            if self.current().is_some() {
                match probe_space(&self.path) {
                    Ok(()) => {
                        self.set_health(true, None);
                        self.last_recovery.set(Some((
                            Instant::now(),
                            (backoff * 2).min(RECOVERY_BACKOFF.1),
                        )));
                        if let Some(note) = FAULT_LOG.allow("store_recovered") {
                            tracing::info!(
                                failed_for_ms = failed_at.elapsed().as_millis() as u64,
                                "store recovered; writes go through again{note}"
                            );
                        }
                        return None;
                    }
                    Err(e) => {
                        error = format!(
                            "the disk holding {} does not take new data: {e}",
                            self.path.display()
                        )
                    }
                }
            }
            self.set_health(false, Some(error.clone()));
            if reminded.elapsed() >= FAILING_REMINDER {
                reminded = Instant::now();
                tracing::warn!(cause = %error,
                    failing_for_secs = failed_at.elapsed().as_secs(),
                    "the store is still failing; writes are refused until it recovers");
            }
            match refuse_writes(rx, backoff, &error) {
                Waited::Elapsed => {}
                Waited::Close(done) => return Some(done),
                Waited::Disconnected => return None,
            }
            backoff = (backoff * 2).min(RECOVERY_BACKOFF.1);
        }
    }

    /// Drops the database (after waiting for readers) so the file is
    /// closed cleanly.
    fn close(&self) {
        let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut old) = old {
            // Readers hold clones only for the length of one read.
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        // A database redb gave up on may panic as it closes.
                        let _ = guarded(&self.path, || {
                            drop(db);
                            Ok(())
                        });
                        return;
                    }
                    Err(back) => {
                        old = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    }
}

/// How [`refuse_writes`] ended.
enum Waited {
    Elapsed,
    Close(Sender),
    Disconnected,
}

/// For `wait`, answers every write with `Unavailable` (saying `error`),
/// untried; stops early for a close request or when every sender is gone.
fn refuse_writes(rx: &std_mpsc::Receiver<Msg>, wait: Duration, error: &str) -> Waited {
    let until = Instant::now() + wait;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(Msg::Write(_, reply)) => {
                let _ = reply.send(Err(StoreError::Unavailable(format!(
                    "{error}; the store recovers by itself once that is fixed"
                ))));
            }
            Ok(Msg::Claim(_, _, reply)) => {
                let _ = reply.send(Err(StoreError::Unavailable(format!(
                    "{error}; the store recovers by itself once that is fixed"
                ))));
            }
            Ok(Msg::Close(done)) => return Waited::Close(done),
            Err(std_mpsc::RecvTimeoutError::Timeout) => break,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return Waited::Disconnected,
        }
    }
    Waited::Elapsed
}

/// Why a batch must not commit, judged against the transaction so far
/// (earlier batches and claims of the group included): a stale fence, or a
/// client request id that would belong to two flows.
fn check_batch(
    ops: &[Op],
    partitions: &redb::Table<&[u8], &[u8]>,
    by_client: &redb::Table<&[u8], &[u8]>,
    meta: &redb::Table<&[u8], &[u8]>,
) -> Result<Option<StoreError>, StoreError> {
    for op in ops {
        if let Op::Fence { partition, epoch } = op {
            let current = partition_epoch(partitions, *partition)?;
            if current != *epoch {
                return Ok(Some(StoreError::Fenced {
                    partition: *partition,
                    epoch: *epoch,
                    current,
                }));
            }
        }
    }
    // Settings as the batch goes (an earlier op of it may set the key).
    let mut settings: HashMap<&str, Option<&[u8]>> = HashMap::new();
    for op in ops {
        match op {
            Op::PutMeta(k, v) => {
                settings.insert(k, Some(v));
            }
            Op::PutMetaIf {
                key,
                expected,
                value,
            } => {
                let current = match settings.get(key.as_str()) {
                    Some(v) => v.map(<[u8]>::to_vec),
                    None => meta
                        .get(key.as_bytes())
                        .map_err(db_err)?
                        .map(|v| v.value().to_vec()),
                };
                if current != *expected {
                    return Ok(Some(StoreError::Changed { key: key.clone() }));
                }
                settings.insert(key, Some(value));
            }
            _ => {}
        }
    }
    // Who holds each client key as the batch goes (deletes free keys).
    let mut holders: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    for op in ops {
        let (r, put) = match op {
            Op::PutFlow(r) => (r, true),
            Op::DeleteFlow(r) => (r, false),
            _ => continue,
        };
        let Some(crid) = r.client_request_id() else {
            continue;
        };
        let k = client_key(&r.holding, crid);
        let holder = match holders.get(&k) {
            Some(h) => h.clone(),
            None => by_client
                .get(k.as_slice())
                .map_err(db_err)?
                .map(|v| v.value().to_vec()),
        };
        let mine = holder.as_deref() == Some(r.id.bytes().as_slice());
        if put {
            if let Some(other) = holder.filter(|_| !mine) {
                let existing =
                    <[u8; 16]>::try_from(other.as_slice()).map_err(|_| StoreError::Corrupt {
                        table: "flows_by_client",
                        detail: format!("a flow id of {} bytes", other.len()),
                    })?;
                return Ok(Some(StoreError::Duplicate {
                    holding: r.holding,
                    client_request_id: crid.clone(),
                    existing: FlowId::from_bytes(existing),
                    flow: r.id,
                }));
            }
            holders.insert(k, Some(r.id.bytes().to_vec()));
        } else if mine {
            holders.insert(k, None);
        }
    }
    Ok(None)
}

fn partition_epoch(t: &redb::Table<&[u8], &[u8]>, partition: u16) -> Result<u64, StoreError> {
    match t.get(partition.to_be_bytes().as_slice()).map_err(db_err)? {
        Some(v) => Ok(dec::<PartitionOwner>("partitions", v.value())?.epoch),
        None => Ok(0),
    }
}

/// Applies a group in one transaction and commits it; what each job came
/// to. `Err` when the transaction failed (every job fails).
fn apply_group(db: &Database, group: &[Job]) -> Result<Vec<Outcome>, StoreError> {
    let w = db.begin_write().map_err(db_err)?;
    let mut outcomes = Vec::with_capacity(group.len());
    {
        let mut flows = w.open_table(FLOWS).map_err(db_err)?;
        let mut journal = w.open_table(JOURNAL).map_err(db_err)?;
        let mut outbox = w.open_table(OUTBOX).map_err(db_err)?;
        let mut inbox = w.open_table(INBOX).map_err(db_err)?;
        let mut vnodes = w.open_table(VNODES).map_err(db_err)?;
        let mut packages = w.open_table(PACKAGES).map_err(db_err)?;
        let mut package_bytes = w.open_table(PACKAGE_BYTES).map_err(db_err)?;
        let mut meta = w.open_table(META).map_err(db_err)?;
        let mut kills = w.open_table(KILLS).map_err(db_err)?;
        let mut partitions = w.open_table(PARTITIONS).map_err(db_err)?;
        let mut idx = Indexes::open(&w)?;
        for job in group {
            let ops = match job {
                Job::Write(ops, _) => ops,
                Job::Claim(partition, owner, _) => {
                    let epoch = partition_epoch(&partitions, *partition)? + 1;
                    let rec = PartitionOwner {
                        epoch,
                        owner: owner.clone(),
                        claimed_ms: now_millis(),
                    };
                    partitions
                        .insert(partition.to_be_bytes().as_slice(), enc(&rec).as_slice())
                        .map_err(db_err)?;
                    outcomes.push(Outcome::Claimed(epoch));
                    continue;
                }
            };
            if let Some(refused) = check_batch(ops, &partitions, &idx.by_client, &meta)? {
                outcomes.push(Outcome::Failed(refused));
                continue;
            }
            outcomes.push(Outcome::Written);
            for op in ops {
                match op {
                    Op::Fence { .. } => {}
                    Op::PutFlow(f) => {
                        flows
                            .insert(f.id.bytes().as_slice(), enc(f.as_ref()).as_slice())
                            .map_err(db_err)?;
                        idx.put(f)?;
                    }
                    Op::AppendJournal {
                        flow,
                        start,
                        entries,
                    } => {
                        for (i, e) in entries.iter().enumerate() {
                            let k = journal_key(flow, start + i as u32);
                            journal.insert(k.as_slice(), e.as_slice()).map_err(db_err)?;
                        }
                    }
                    Op::PutOutbox(m) => {
                        outbox
                            .insert(m.key().as_slice(), enc(m.as_ref()).as_slice())
                            .map_err(db_err)?;
                    }
                    Op::DeleteOutbox(k) => {
                        outbox.remove(k.as_slice()).map_err(db_err)?;
                    }
                    Op::PutInbox(m) => {
                        inbox
                            .insert(m.key().as_slice(), enc(m.as_ref()).as_slice())
                            .map_err(db_err)?;
                    }
                    Op::DeleteInbox(k) => {
                        inbox.remove(k.as_slice()).map_err(db_err)?;
                    }
                    Op::PutVnode(v) => {
                        vnodes
                            .insert(v.holding.bytes().as_slice(), enc(v).as_slice())
                            .map_err(db_err)?;
                    }
                    Op::PutPackage(p, bytes) => {
                        packages
                            .insert(p.checksum.bytes().as_slice(), enc(p).as_slice())
                            .map_err(db_err)?;
                        package_bytes
                            .insert(p.checksum.bytes().as_slice(), bytes.as_slice())
                            .map_err(db_err)?;
                    }
                    Op::DeletePackage(c) => {
                        packages.remove(c.bytes().as_slice()).map_err(db_err)?;
                        package_bytes.remove(c.bytes().as_slice()).map_err(db_err)?;
                    }
                    Op::PutMeta(k, v)
                    | Op::PutMetaIf {
                        key: k, value: v, ..
                    } => {
                        meta.insert(k.as_bytes(), v.as_slice()).map_err(db_err)?;
                    }
                    Op::PutKill(f, why) => {
                        kills
                            .insert(f.bytes().as_slice(), why.as_bytes())
                            .map_err(db_err)?;
                    }
                    Op::DeleteKill(f) => {
                        kills.remove(f.bytes().as_slice()).map_err(db_err)?;
                    }
                    Op::DeleteFlowInbox(f) => {
                        let (a, b) = prefix_range(f.bytes());
                        inbox
                            .retain_in(a.as_slice()..b.as_slice(), |_, _| false)
                            .map_err(db_err)?;
                    }
                    Op::DeleteFlow(r) => {
                        flows.remove(r.id.bytes().as_slice()).map_err(db_err)?;
                        idx.delete(r)?;
                        let (a, b) = (journal_key(&r.id, 0), journal_key(&r.id, u32::MAX));
                        journal
                            .retain_in(a.as_slice()..=b.as_slice(), |_, _| false)
                            .map_err(db_err)?;
                        let (a, b) = prefix_range(r.id.bytes());
                        inbox
                            .retain_in(a.as_slice()..b.as_slice(), |_, _| false)
                            .map_err(db_err)?;
                        kills.remove(r.id.bytes().as_slice()).map_err(db_err)?;
                    }
                }
            }
        }
    }
    w.commit().map_err(db_err)?;
    Ok(outcomes)
}

fn scan<T: DeserializeOwned>(
    r: &redb::ReadTransaction,
    def: TableDefinition<&[u8], &[u8]>,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    let t = r.open_table(def).map_err(db_err)?;
    let mut out = Vec::new();
    for row in t.iter().map_err(db_err)? {
        let (_, v) = row.map_err(db_err)?;
        out.push(dec(name, v.value())?);
    }
    Ok(out)
}

fn get_flow(r: &redb::ReadTransaction, id: &[u8]) -> Result<Option<FlowRecord>, StoreError> {
    let t = r.open_table(FLOWS).map_err(db_err)?;
    match t.get(id).map_err(db_err)? {
        Some(v) => Ok(Some(dec("flows", v.value())?)),
        None => Ok(None),
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let (reply, wait) = oneshot::channel();
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(Msg::Write(ops, reply))
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    async fn claim_partition(&self, partition: u16, owner: &str) -> Result<u64, StoreError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(Msg::Claim(partition, owner.to_owned(), reply))
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        self.read(|r| {
            let vnodes: Vec<VnodeRecord> = scan(r, VNODES, "vnodes")?;
            let packages: Vec<PackageRecord> = scan(r, PACKAGES, "packages")?;
            let mut flows = Vec::new();
            {
                let unfinished = r.open_table(UNFINISHED).map_err(db_err)?;
                for row in unfinished.iter().map_err(db_err)? {
                    let (k, _) = row.map_err(db_err)?;
                    if let Some(f) = get_flow(r, k.value())? {
                        flows.push(f);
                    }
                }
            }
            let outbox: Vec<SessionMessage> = scan(r, OUTBOX, "outbox")?;
            let mut inbox_flows: Vec<FlowId> = Vec::new();
            {
                // Keys start with the receiving flow's id: no need to
                // decode the messages.
                let t = r.open_table(INBOX).map_err(db_err)?;
                for row in t.iter().map_err(db_err)? {
                    let (k, _) = row.map_err(db_err)?;
                    let Some(id) = k.value().get(..16) else {
                        continue;
                    };
                    let id = FlowId::from_bytes(id.try_into().expect("16 bytes"));
                    if inbox_flows.last() != Some(&id) {
                        inbox_flows.push(id);
                    }
                }
            }
            let mut kills = Vec::new();
            {
                let t = r.open_table(KILLS).map_err(db_err)?;
                for row in t.iter().map_err(db_err)? {
                    let (k, v) = row.map_err(db_err)?;
                    let Ok(id) = <[u8; 16]>::try_from(k.value()) else {
                        continue;
                    };
                    kills.push((
                        FlowId::from_bytes(id),
                        String::from_utf8_lossy(v.value()).into_owned(),
                    ));
                }
            }
            Ok(Snapshot {
                vnodes,
                packages,
                flows,
                outbox,
                inbox_flows,
                kills,
            })
        })
    }

    async fn package_bytes(&self, checksum: &Checksum) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|r| {
            let t = r.open_table(PACKAGE_BYTES).map_err(db_err)?;
            Ok(t.get(checksum.bytes().as_slice())
                .map_err(db_err)?
                .map(|v| v.value().to_vec()))
        })
    }

    async fn journal(&self, flow: &FlowId) -> Result<Vec<Vec<u8>>, StoreError> {
        self.read(|r| {
            let t = r.open_table(JOURNAL).map_err(db_err)?;
            let (a, b) = (journal_key(flow, 0), journal_key(flow, u32::MAX));
            let mut out = Vec::new();
            for row in t.range(a.as_slice()..=b.as_slice()).map_err(db_err)? {
                let (_, v) = row.map_err(db_err)?;
                out.push(v.value().to_vec());
            }
            Ok(out)
        })
    }

    async fn inbox(&self, flow: &FlowId) -> Result<Vec<SessionMessage>, StoreError> {
        self.read(|r| {
            let t = r.open_table(INBOX).map_err(db_err)?;
            let (a, b) = prefix_range(flow.bytes());
            let mut out = Vec::new();
            for row in t.range(a.as_slice()..b.as_slice()).map_err(db_err)? {
                let (_, v) = row.map_err(db_err)?;
                out.push(dec("inbox", v.value())?);
            }
            Ok(out)
        })
    }

    async fn partition_owners(&self) -> Result<Vec<(u16, u64, String)>, StoreError> {
        self.read(|r| {
            let t = r.open_table(PARTITIONS).map_err(db_err)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let p = <[u8; 2]>::try_from(k.value()).map_err(|_| StoreError::Corrupt {
                    table: "partitions",
                    detail: format!("a key of {} bytes", k.value().len()),
                })?;
                let o = dec::<PartitionOwner>("partitions", v.value())?;
                out.push((u16::from_be_bytes(p), o.epoch, o.owner));
            }
            Ok(out)
        })
    }

    async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|r| {
            let t = r.open_table(META).map_err(db_err)?;
            Ok(t.get(key.as_bytes())
                .map_err(db_err)?
                .map(|v| v.value().to_vec()))
        })
    }

    async fn flow(&self, id: &FlowId) -> Result<Option<FlowRecord>, StoreError> {
        self.read(|r| get_flow(r, id.bytes()))
    }

    async fn flow_by_client(
        &self,
        holding: &HoldingId,
        client_request_id: &ClientRequestId,
    ) -> Result<Option<FlowRecord>, StoreError> {
        self.read(|r| {
            let t = r.open_table(BY_CLIENT).map_err(db_err)?;
            let id = match t
                .get(client_key(holding, client_request_id).as_slice())
                .map_err(db_err)?
            {
                Some(v) => v.value().to_vec(),
                None => return Ok(None),
            };
            get_flow(r, &id)
        })
    }

    async fn list_flows(
        &self,
        holding: &HoldingId,
        status: Option<FlowStatus>,
        after: Option<&[u8]>,
        limit: usize,
        scan: usize,
    ) -> Result<FlowPage, StoreError> {
        self.read(|r| {
            let t = r.open_table(BY_VNODE).map_err(db_err)?;
            let h = holding.bytes();
            let start: Vec<u8> = match after {
                // The cursor is the created-ms + flow-id part of the key.
                Some(a) => [h.as_slice(), a].concat(),
                None => h.to_vec(),
            };
            let (_, end) = prefix_range(h);
            let mut page = FlowPage::default();
            let mut scanned = 0;
            let mut last: Option<Vec<u8>> = None;
            let want = status.map(status_code);
            for row in t.range(start.as_slice()..end.as_slice()).map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let key = k.value();
                if after.is_some() && key == start.as_slice() {
                    continue; // the last item of the previous page
                }
                if page.flows.len() == limit || scanned == scan {
                    // More may follow.
                    page.next = last.map(|k| k[h.len()..].to_vec());
                    return Ok(page);
                }
                scanned += 1;
                last = Some(key.to_vec());
                if want.is_some_and(|w| v.value().first() != Some(&w)) {
                    continue;
                }
                if let Some(f) = get_flow(r, &key[h.len() + 8..])? {
                    page.flows.push(f);
                }
            }
            Ok(page)
        })
    }

    async fn finished_before(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<FlowRecord>, StoreError> {
        self.read(|r| {
            let t = r.open_table(FINISHED).map_err(db_err)?;
            let end = cutoff_ms.to_be_bytes();
            let mut out = Vec::new();
            for row in t.range(..end.as_slice()).map_err(db_err)? {
                if out.len() == limit {
                    break;
                }
                let (k, _) = row.map_err(db_err)?;
                if let Some(f) = get_flow(r, &k.value()[8..])? {
                    out.push(f);
                }
            }
            Ok(out)
        })
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.read(|r| {
            let n = |def: TableDefinition<&[u8], &[u8]>| -> Result<u64, StoreError> {
                r.open_table(def).map_err(db_err)?.len().map_err(db_err)
            };
            Ok(StoreStats {
                flows: n(FLOWS)?,
                unfinished: n(UNFINISHED)?,
                journal_entries: n(JOURNAL)?,
                inbox: n(INBOX)?,
                outbox: n(OUTBOX)?,
                kills: n(KILLS)?,
                index_entries: n(BY_CLIENT)? + n(BY_VNODE)? + n(UNFINISHED)? + n(FINISHED)?,
            })
        })
    }

    fn health(&self) -> StoreHealth {
        EmbeddedStore::health(self)
    }

    async fn close(&self) {
        let (tx, writer) = self.take_writer();
        // The writer finishes what was sent before; wait for it off the
        // async threads.
        let _ = tokio::task::spawn_blocking(move || finish_writer(tx, writer)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_types::*;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("braid-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn msg(to_flow: FlowId, seq: u64) -> SessionMessage {
        let name: X500Name = "O=A, L=L, C=GB".parse().unwrap();
        let holding = HoldingId::derive(&name, "g");
        SessionMessage {
            session: SessionId {
                initiator_flow: to_flow,
                index: 1,
            },
            from: Endpoint {
                holding,
                name: name.clone(),
                side: Side::Responder,
            },
            to: Endpoint {
                holding,
                name,
                side: Side::Initiator,
            },
            seq,
            init: None,
            body: Body::Data(vec![seq as u8]),
        }
    }

    #[tokio::test]
    async fn batches_commit_and_survive_reopen() {
        let dir = tmpdir("reopen");
        let path = dir.join("db.redb");
        let flow = FlowId::random();
        {
            let s = EmbeddedStore::open(&path).unwrap();
            // Many concurrent writers share commits; all must land.
            let s = Arc::new(s);
            let mut tasks = Vec::new();
            for i in 0..50u32 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    s.write(vec![Op::AppendJournal {
                        flow,
                        start: i,
                        entries: vec![vec![i as u8]],
                    }])
                    .await
                }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            s.write(vec![
                Op::PutInbox(Box::new(msg(flow, 1))),
                Op::PutInbox(Box::new(msg(flow, 2))),
            ])
            .await
            .unwrap();
            s.write(vec![Op::DeleteInbox(msg(flow, 1).key())])
                .await
                .unwrap();
        }
        let s = EmbeddedStore::open(&path).unwrap();
        let j = s.journal(&flow).await.unwrap();
        assert_eq!(j.len(), 50);
        assert!(j.iter().enumerate().all(|(i, e)| e == &vec![i as u8]));
        let inbox = s.inbox(&flow).await.unwrap();
        assert_eq!(inbox, vec![msg(flow, 2)]);
        assert!(s.inbox(&FlowId::random()).await.unwrap().is_empty());
        let snap = s.load().await.unwrap();
        assert_eq!(snap.inbox_flows, vec![flow]);
    }

    /// A store with flows, journals and an inbox, closed cleanly.
    async fn populated(path: &Path) {
        let s = EmbeddedStore::open(path).unwrap();
        let name: X500Name = "O=A, L=L, C=GB".parse().unwrap();
        let holding = HoldingId::derive(&name, "g");
        for i in 0..300u32 {
            let id = FlowId::random();
            let rec = FlowRecord::new(
                id,
                holding,
                "ping".into(),
                Checksum::of(b"pkg"),
                FlowStart::Client {
                    client_request_id: format!("r{i}").parse().unwrap(),
                    request_body: "{}".into(),
                },
                1000 + u64::from(i),
                7,
            );
            s.write(vec![
                Op::PutFlow(Box::new(rec)),
                Op::AppendJournal {
                    flow: id,
                    start: 0,
                    entries: vec![vec![i as u8; 200]; 5],
                },
                Op::PutInbox(Box::new(msg(id, 1))),
            ])
            .await
            .unwrap();
        }
        s.close().await;
    }

    /// Opens the store at `path` and reads everything a start and a run
    /// read; the first error, or how much it read.
    async fn read_all(path: &Path) -> Result<usize, StoreError> {
        let s = EmbeddedStore::open(path)?;
        let snap = s.load().await?;
        let mut n = 0;
        for f in &snap.flows {
            n += s.journal(&f.id).await?.len();
            n += s.inbox(&f.id).await?.len();
            s.flow(&f.id).await?;
        }
        s.write(vec![Op::PutMeta("k".into(), vec![1; 5000])])
            .await?;
        s.close().await;
        Ok(n)
    }

    #[tokio::test]
    async fn every_kind_of_damage_is_a_damaged_error_naming_the_file_never_a_panic() {
        let dir = tmpdir("damage");
        let good = dir.join("good.redb");
        populated(&good).await;
        let bytes = std::fs::read(&good).unwrap();
        let len = bytes.len();
        assert_eq!(read_all(&good).await.unwrap(), 300 * 6);

        let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
        for cut in [
            0,
            1,
            100,
            511,
            4095,
            4096,
            4097,
            20_000,
            len / 3,
            len / 2,
            len - 1,
        ] {
            cases.push((format!("cut at {cut}"), bytes[..cut].to_vec()));
        }
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        cases.push(("random bytes".into(), (0..len).map(|_| rnd()).collect()));
        for (what, from, to) in [("zeroed header", 0, 4096), ("zeroed magic", 0, 9)] {
            let mut b = bytes.clone();
            b[from..to].fill(0);
            cases.push((what.into(), b));
        }
        let mut b = bytes.clone();
        b[9..200].fill(0xAB);
        cases.push(("overwritten header fields".into(), b));
        let mut b = bytes.clone();
        b.extend_from_slice(&[0; 10_000]);
        cases.push(("grown by zeros".into(), b));
        // Pages within the data: damage in pages in use must be noticed;
        // in free pages it may go unnoticed (and harms nothing).
        let mut noticed = 0;
        let pages = (4096..len).step_by(len / 16).collect::<Vec<_>>();
        for &at in &pages {
            let mut b = bytes.clone();
            for v in &mut b[at..(at + 4096).min(len)] {
                *v = rnd();
            }
            cases.push((format!("random page at {at}"), b));
        }
        for (what, data) in cases {
            let path = dir.join("case.redb");
            std::fs::write(&path, &data).unwrap();
            match read_all(&path).await {
                Err(StoreError::Damaged { path: p, detail }) => {
                    assert_eq!(p, path, "{what}: names another file");
                    assert!(!detail.is_empty(), "{what}: says nothing about the damage");
                    let shown = StoreError::Damaged {
                        path: p,
                        detail: detail.clone(),
                    }
                    .to_string();
                    assert!(
                        shown.contains("case.redb")
                            && shown.contains("damaged")
                            && shown.contains("restore it from a backup")
                            && shown.contains("move it away"),
                        "{what}: {shown}"
                    );
                    if what.starts_with("random page") {
                        noticed += 1;
                    }
                }
                Ok(n) if what.starts_with("random page") => {
                    assert_eq!(n, 300 * 6, "{what}: read wrong data without an error")
                }
                other => panic!("{what}: expected Damaged, got {other:?}"),
            }
        }
        assert!(
            noticed > 0,
            "no damaged page was noticed: the test proves nothing"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_file_in_use_by_another_store_is_named_as_such() {
        let dir = tmpdir("in-use");
        let path = dir.join("db.redb");
        let first = EmbeddedStore::open(&path).unwrap();
        match EmbeddedStore::open(&path) {
            Err(e @ StoreError::InUse { .. }) => {
                assert!(e.to_string().contains("db.redb"), "{e}")
            }
            Err(other) => panic!("expected InUse, got {other}"),
            Ok(_) => panic!("opened a database another store holds"),
        }
        first.close().await;
        assert!(
            EmbeddedStore::open(&path).is_ok(),
            "the file is free once closed"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_new_store_appears_only_once_complete() {
        let dir = tmpdir("create");
        let path = dir.join("db.redb");
        // A crash during an earlier first start left half a file behind.
        std::fs::write(dir.join("db.redb.new"), b"half").unwrap();
        let s = EmbeddedStore::open(&path).unwrap();
        s.close().await;
        assert!(
            !dir.join("db.redb.new").exists(),
            "the temporary file is left"
        );
        assert!(EmbeddedStore::open(&path).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
