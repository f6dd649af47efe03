//! The embedded store: one redb file, fsync'd on every commit, with group
//! commit across callers.
//!
//! One writer thread owns the write side. It takes every batch that is
//! waiting, applies them all in one transaction, commits once (one fsync)
//! and then answers each caller. Under load, many flows' checkpoints share
//! one fsync; when idle, a lone batch commits at once.
//!
//! Faults: after an I/O error (a full disk, say) redb refuses every further
//! transaction until the database is reopened. The writer then answers
//! callers with [`StoreError::Unavailable`], closes the database and reopens
//! it (redb repairs it) with backoff until that works, so the store comes
//! back by itself once the cause is gone; [`EmbeddedStore::health`] says
//! which state it is in.
//!
//! Besides the flow records, the store keeps indexes so that a node never
//! needs every flow in memory: by client request id, by vnode (creation
//! order, with the status), the unfinished flows (loaded at start) and the
//! finished ones by end time (for the retention sweep).

use crate::{
    FlowPage, FlowRecord, Op, PackageRecord, Snapshot, Store, StoreError, StoreHealth, StoreStats,
    VnodeRecord, status_code,
};
use braid_types::{Checksum, ClientRequestId, FlowId, FlowStart, FlowStatus, HoldingId};
use braid_types::{SessionMessage, now_millis};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::oneshot;

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

/// The layout version; older files get their indexes built on open.
const SCHEMA_KEY: &str = "store/schema";
const SCHEMA: &[u8] = b"2";

/// Largest number of batches folded into one commit.
const MAX_GROUP: usize = 4096;

/// Memory for redb's page cache. Its default (1 GiB) is memory a node
/// grows into as its store grows (finished flows stay for the retention);
/// the hot pages of the indexes fit in this, the rest is read through the
/// OS page cache.
const CACHE_BYTES: usize = 8 << 20;

type Reply = oneshot::Sender<Result<(), StoreError>>;

enum Msg {
    Write(Vec<Op>, Reply),
    /// Finish, close the file, then answer.
    Close(std_mpsc::Sender<()>),
}

/// The database, shared by readers and the writer; `None` while the writer
/// reopens it after a fault, or once closed.
type Shared = Arc<RwLock<Option<Arc<Database>>>>;

/// The embedded, file-backed store.
pub struct EmbeddedStore {
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

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
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

/// Whether a redb error means the database must be reopened.
fn needs_reopen(e: &redb::StorageError) -> bool {
    matches!(
        e,
        redb::StorageError::Io(_) | redb::StorageError::PreviousIo
    )
}

/// Opens (creating if needed) the database at `path`, telling a damaged
/// file from other failures.
fn open_db(path: &Path) -> Result<Database, StoreError> {
    let p = path.to_path_buf();
    // A new file is "repaired" into shape too; only say so for old ones.
    let existed = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
    // redb may panic on a file that is not a database it wrote (e.g. one
    // cut short); that is a damaged file, not a bug to crash on.
    let opened = std::panic::catch_unwind(move || {
        Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_repair_callback(move |s| {
                if existed && s.progress() == 0.0 {
                    tracing::warn!("the store was not closed cleanly; repairing it");
                }
            })
            .create(&p)
    });
    let damaged = |detail: String| StoreError::Damaged {
        path: path.to_path_buf(),
        detail,
    };
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(d)))) => Err(damaged(d)),
        Ok(Err(redb::DatabaseError::UpgradeRequired(v))) => Err(damaged(format!(
            "written in file format {v}, which this version cannot read"
        ))),
        Ok(Err(e)) => Err(db_err(format!("opening {}: {e}", path.display()))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the database library gave up on it".into());
            Err(damaged(what))
        }
    }
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
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let db = open_db(path)?;
        prepare(&db)?;
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
        };
        let writer = std::thread::Builder::new()
            .name("braid-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(db_err)?;
        Ok(EmbeddedStore {
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
        let r = db.begin_read().map_err(db_err)?;
        f(&r)
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
}

impl Writer {
    fn set_health(&self, ok: bool, error: Option<String>) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.ok != ok || h.error != error {
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
                Msg::Write(ops, reply) => group.push((ops, reply)),
                Msg::Close(done) => close = Some(done),
            }
            while close.is_none() && group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(Msg::Write(ops, reply)) => group.push((ops, reply)),
                    Ok(Msg::Close(done)) => close = Some(done),
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.commit(group, &rx);
            }
            if let Some(done) = close {
                self.close();
                let _ = done.send(());
                return;
            }
        }
        self.close();
    }

    fn commit(&self, group: Vec<(Vec<Op>, Reply)>, rx: &std_mpsc::Receiver<Msg>) {
        let Some(db) = self.current() else {
            for (_, reply) in group {
                let _ = reply.send(Err(StoreError::Closed));
            }
            return;
        };
        let t = std::time::Instant::now();
        let outcome = apply_group(&db, &group);
        drop(db);
        tracing::trace!(
            batches = group.len(),
            ops = group.iter().map(|(o, _)| o.len()).sum::<usize>(),
            micros = t.elapsed().as_micros() as u64,
            "group commit"
        );
        let reopen = matches!(&outcome, Err(Fault::Io(_)));
        for (_, reply) in group {
            let r = match &outcome {
                Ok(()) => Ok(()),
                Err(Fault::Io(e)) => Err(StoreError::Unavailable(e.clone())),
                Err(Fault::Other(e)) => Err(StoreError::Database(e.to_string())),
            };
            let _ = reply.send(r);
        }
        if let Err(Fault::Io(e)) = &outcome {
            tracing::error!(cause = %e, "store write failed; reopening the store until it works");
            self.set_health(false, Some(e.clone()));
        }
        if reopen {
            self.recover(rx);
        }
    }

    /// Closes and reopens the database until that works, answering writes
    /// that arrive meanwhile with `Unavailable`.
    fn recover(&self, rx: &std_mpsc::Receiver<Msg>) {
        let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(old) = old {
            // Readers hold clones only for the length of one read.
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(back) => {
                        old = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let error = match open_db(&self.path).and_then(|db| prepare(&db).map(|()| db)) {
                Ok(db) => {
                    *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db));
                    self.set_health(true, None);
                    tracing::info!("store recovered; writes go through again");
                    return;
                }
                Err(e) => e.to_string(),
            };
            self.set_health(false, Some(error));
            // Meanwhile, refuse writes (their callers retry) without
            // giving up the retry schedule.
            let until = std::time::Instant::now() + backoff;
            while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(Msg::Write(_, reply)) => {
                        let h = self
                            .health
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone();
                        let _ = reply.send(Err(StoreError::Unavailable(format!(
                            "{}; recovering",
                            h.error.unwrap_or_default()
                        ))));
                    }
                    Ok(Msg::Close(done)) => {
                        let _ = done.send(());
                        return;
                    }
                    Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Drops the database (after waiting for readers) so the file is
    /// closed cleanly.
    fn close(&self) {
        let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut old) = old {
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
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

/// Why a group commit failed.
enum Fault {
    /// An I/O error: the database must be reopened.
    Io(String),
    /// Anything else (the batch itself is bad).
    Other(StoreError),
}

impl From<StoreError> for Fault {
    fn from(e: StoreError) -> Fault {
        Fault::Other(e)
    }
}

fn storage_fault(e: redb::StorageError) -> Fault {
    if needs_reopen(&e) {
        Fault::Io(e.to_string())
    } else {
        Fault::Other(db_err(e))
    }
}

fn apply_group(db: &Database, group: &[(Vec<Op>, Reply)]) -> Result<(), Fault> {
    let w = db.begin_write().map_err(|e| match e {
        redb::TransactionError::Storage(s) => storage_fault(s),
        other => Fault::Other(db_err(other)),
    })?;
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
        let mut idx = Indexes::open(&w)?;
        let io = |e: redb::StorageError| storage_fault(e);
        for (ops, _) in group {
            for op in ops {
                match op {
                    Op::PutFlow(f) => {
                        flows
                            .insert(f.id.bytes().as_slice(), enc(f.as_ref()).as_slice())
                            .map_err(io)?;
                        idx.put(f)?;
                    }
                    Op::AppendJournal {
                        flow,
                        start,
                        entries,
                    } => {
                        for (i, e) in entries.iter().enumerate() {
                            let k = journal_key(flow, start + i as u32);
                            journal.insert(k.as_slice(), e.as_slice()).map_err(io)?;
                        }
                    }
                    Op::PutOutbox(m) => {
                        outbox
                            .insert(m.key().as_slice(), enc(m.as_ref()).as_slice())
                            .map_err(io)?;
                    }
                    Op::DeleteOutbox(k) => {
                        outbox.remove(k.as_slice()).map_err(io)?;
                    }
                    Op::PutInbox(m) => {
                        inbox
                            .insert(m.key().as_slice(), enc(m.as_ref()).as_slice())
                            .map_err(io)?;
                    }
                    Op::DeleteInbox(k) => {
                        inbox.remove(k.as_slice()).map_err(io)?;
                    }
                    Op::PutVnode(v) => {
                        vnodes
                            .insert(v.holding.bytes().as_slice(), enc(v).as_slice())
                            .map_err(io)?;
                    }
                    Op::PutPackage(p, bytes) => {
                        packages
                            .insert(p.checksum.bytes().as_slice(), enc(p).as_slice())
                            .map_err(io)?;
                        package_bytes
                            .insert(p.checksum.bytes().as_slice(), bytes.as_slice())
                            .map_err(io)?;
                    }
                    Op::DeletePackage(c) => {
                        packages.remove(c.bytes().as_slice()).map_err(io)?;
                        package_bytes.remove(c.bytes().as_slice()).map_err(io)?;
                    }
                    Op::PutMeta(k, v) => {
                        meta.insert(k.as_bytes(), v.as_slice()).map_err(io)?;
                    }
                    Op::PutKill(f, why) => {
                        kills
                            .insert(f.bytes().as_slice(), why.as_bytes())
                            .map_err(io)?;
                    }
                    Op::DeleteKill(f) => {
                        kills.remove(f.bytes().as_slice()).map_err(io)?;
                    }
                    Op::DeleteFlowInbox(f) => {
                        let (a, b) = prefix_range(f.bytes());
                        inbox
                            .retain_in(a.as_slice()..b.as_slice(), |_, _| false)
                            .map_err(io)?;
                    }
                    Op::DeleteFlow(r) => {
                        flows.remove(r.id.bytes().as_slice()).map_err(io)?;
                        idx.delete(r)?;
                        let (a, b) = (journal_key(&r.id, 0), journal_key(&r.id, u32::MAX));
                        journal
                            .retain_in(a.as_slice()..=b.as_slice(), |_, _| false)
                            .map_err(io)?;
                        let (a, b) = prefix_range(r.id.bytes());
                        inbox
                            .retain_in(a.as_slice()..b.as_slice(), |_, _| false)
                            .map_err(io)?;
                        kills.remove(r.id.bytes().as_slice()).map_err(io)?;
                    }
                }
            }
        }
    }
    w.commit().map_err(|e| match e {
        redb::CommitError::Storage(s) => storage_fault(s),
        other => Fault::Other(db_err(other)),
    })
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

    fn flow(holding: HoldingId, created_ms: u64, status: FlowStatus) -> FlowRecord {
        let mut r = FlowRecord::new(
            FlowId::random(),
            holding,
            "ping".into(),
            Checksum::of(b"p"),
            FlowStart::Client {
                client_request_id: format!("c{created_ms}").parse().unwrap(),
                request_body: String::new(),
            },
            created_ms,
            0,
        );
        r.status = status;
        r.updated_ms = created_ms + 1;
        r
    }

    /// Every page of `holding`'s flows with `status`, `limit` and `scan`.
    async fn all_pages(
        s: &EmbeddedStore,
        holding: &HoldingId,
        status: Option<FlowStatus>,
        limit: usize,
        scan: usize,
    ) -> (Vec<FlowId>, usize) {
        let (mut ids, mut pages, mut after) = (Vec::new(), 0, None::<Vec<u8>>);
        loop {
            let p = s
                .list_flows(holding, status, after.as_deref(), limit, scan)
                .await
                .unwrap();
            assert!(p.flows.len() <= limit);
            pages += 1;
            ids.extend(p.flows.iter().map(|f| f.id));
            match p.next {
                Some(n) => {
                    assert_eq!(n.len(), crate::LIST_POSITION_LEN);
                    after = Some(n);
                }
                None => return (ids, pages),
            }
        }
    }

    #[tokio::test]
    async fn pages_cover_every_flow_once_in_creation_order() {
        let dir = tmpdir("pages");
        let s = EmbeddedStore::open(&dir.join("db.redb")).unwrap();
        let name = |o: &str| -> X500Name { format!("O={o}, L=L, C=GB").parse().unwrap() };
        let (h, other) = (
            HoldingId::derive(&name("A"), "g"),
            HoldingId::derive(&name("B"), "g"),
        );
        let statuses = [
            FlowStatus::Completed,
            FlowStatus::Running,
            FlowStatus::Failed,
        ];
        // Written out of order; listed by creation time.
        let mut flows: Vec<FlowRecord> = (0..30u64)
            .map(|i| flow(h, 1000 + (i * 7) % 30, statuses[i as usize % 3]))
            .collect();
        let ops = flows
            .iter()
            .chain([flow(other, 1010, FlowStatus::Completed)].iter())
            .map(|f| Op::PutFlow(Box::new(f.clone())))
            .collect();
        s.write(ops).await.unwrap();
        flows.sort_by_key(|f| f.created_ms);
        let want: Vec<FlowId> = flows.iter().map(|f| f.id).collect();
        for limit in [1, 7, 30, 1000] {
            let (got, pages) = all_pages(&s, &h, None, limit, 10_000).await;
            assert_eq!(got, want, "limit {limit}");
            assert_eq!(pages, 30usize.div_ceil(limit).max(1), "limit {limit}");
        }
        // A filter that scans a few entries per call: short pages with a
        // cursor, and together exactly the matching flows.
        let completed: Vec<FlowId> = flows
            .iter()
            .filter(|f| f.status == FlowStatus::Completed)
            .map(|f| f.id)
            .collect();
        for (limit, scan) in [(1, 1), (2, 5), (100, 4), (100, 10_000)] {
            let (got, _) = all_pages(&s, &h, Some(FlowStatus::Completed), limit, scan).await;
            assert_eq!(got, completed, "limit {limit} scan {scan}");
        }
        let (got, _) = all_pages(&s, &h, Some(FlowStatus::Killed), 10, 3).await;
        assert!(got.is_empty());
        // After the last flow: an empty page, no cursor.
        let last = crate::list_position(flows.last().unwrap());
        let p = s.list_flows(&h, None, Some(&last), 10, 100).await.unwrap();
        assert!(p.flows.is_empty() && p.next.is_none());
        // Ended flows by end time; deleting them empties every index.
        let ended = s.finished_before(u64::MAX, 100).await.unwrap();
        assert_eq!(ended.len(), 21, "completed and failed ones");
        assert!(ended.windows(2).all(|w| w[0].updated_ms <= w[1].updated_ms));
        let before = s.stats().await.unwrap();
        s.write(
            ended
                .into_iter()
                .map(|f| Op::DeleteFlow(Box::new(f)))
                .collect(),
        )
        .await
        .unwrap();
        let after = s.stats().await.unwrap();
        assert_eq!((before.flows, after.flows), (31, 10));
        // by_client + by_vnode + unfinished for each of the 10 running ones.
        assert_eq!(after.index_entries, 30);
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
}
