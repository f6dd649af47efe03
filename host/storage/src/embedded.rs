//! The embedded store: one redb file, fsync'd on every commit, with group
//! commit across callers.
//!
//! One writer thread owns the write side. It takes every batch that is
//! waiting, applies them all in one transaction, commits once (one fsync)
//! and then answers each caller. Under load, many flows' checkpoints share
//! one fsync; when idle, a lone batch commits at once.

use crate::{FlowRecord, Op, PackageRecord, Snapshot, Store, StoreError, VnodeRecord};
use braid_types::{Checksum, FlowId, SessionMessage};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use tokio::sync::oneshot;

const FLOWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("flows");
const JOURNAL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("journal");
const OUTBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("outbox");
const INBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("inbox");
const VNODES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("vnodes");
const PACKAGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("packages");
const PACKAGE_BYTES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("package_bytes");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");

/// Largest number of batches folded into one commit.
const MAX_GROUP: usize = 4096;

type Reply = oneshot::Sender<Result<(), StoreError>>;

/// The embedded, file-backed store.
pub struct EmbeddedStore {
    db: Arc<Database>,
    tx: Option<std_mpsc::Sender<(Vec<Op>, Reply)>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer; joining it releases the
        // database file before anyone can open it again.
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
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

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let db = Arc::new(Database::create(path).map_err(db_err)?);
        {
            // Create every table so readers never see a missing one.
            let w = db.begin_write().map_err(db_err)?;
            for t in [
                FLOWS,
                JOURNAL,
                OUTBOX,
                INBOX,
                VNODES,
                PACKAGES,
                PACKAGE_BYTES,
                META,
            ] {
                w.open_table(t).map_err(db_err)?;
            }
            w.commit().map_err(db_err)?;
        }
        let (tx, rx) = std_mpsc::channel::<(Vec<Op>, Reply)>();
        let wdb = db.clone();
        let writer = std::thread::Builder::new()
            .name("braid-store-writer".into())
            .spawn(move || writer_loop(&wdb, rx))
            .map_err(db_err)?;
        Ok(EmbeddedStore {
            db,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        f(&r)
    }
}

fn writer_loop(db: &Database, rx: std_mpsc::Receiver<(Vec<Op>, Reply)>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(more) => group.push(more),
                Err(_) => break,
            }
        }
        let t = std::time::Instant::now();
        let outcome = apply_group(db, &group);
        tracing::trace!(
            batches = group.len(),
            ops = group.iter().map(|(o, _)| o.len()).sum::<usize>(),
            micros = t.elapsed().as_micros() as u64,
            "group commit"
        );
        for (_, reply) in group {
            let r = match &outcome {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Database(e.to_string())),
            };
            let _ = reply.send(r);
        }
    }
}

fn apply_group(db: &Database, group: &[(Vec<Op>, Reply)]) -> Result<(), StoreError> {
    let w = db.begin_write().map_err(db_err)?;
    {
        let mut flows = w.open_table(FLOWS).map_err(db_err)?;
        let mut journal = w.open_table(JOURNAL).map_err(db_err)?;
        let mut outbox = w.open_table(OUTBOX).map_err(db_err)?;
        let mut inbox = w.open_table(INBOX).map_err(db_err)?;
        let mut vnodes = w.open_table(VNODES).map_err(db_err)?;
        let mut packages = w.open_table(PACKAGES).map_err(db_err)?;
        let mut package_bytes = w.open_table(PACKAGE_BYTES).map_err(db_err)?;
        let mut meta = w.open_table(META).map_err(db_err)?;
        for (ops, _) in group {
            for op in ops {
                match op {
                    Op::PutFlow(f) => {
                        flows
                            .insert(f.id.bytes().as_slice(), enc(f.as_ref()).as_slice())
                            .map_err(db_err)?;
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
                    Op::PutMeta(k, v) => {
                        meta.insert(k.as_bytes(), v.as_slice()).map_err(db_err)?;
                    }
                }
            }
        }
    }
    w.commit().map_err(db_err)
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

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn write(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let (reply, wait) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send((ops, reply))
            .map_err(|_| StoreError::Closed)?;
        wait.await.map_err(|_| StoreError::Closed)?
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        self.read(|r| {
            let vnodes: Vec<VnodeRecord> = scan(r, VNODES, "vnodes")?;
            let packages: Vec<PackageRecord> = scan(r, PACKAGES, "packages")?;
            let flows: Vec<FlowRecord> = scan(r, FLOWS, "flows")?;
            let outbox: Vec<SessionMessage> = scan(r, OUTBOX, "outbox")?;
            let inbox_msgs: Vec<SessionMessage> = scan(r, INBOX, "inbox")?;
            let mut inbox_flows: Vec<FlowId> =
                inbox_msgs.iter().map(|m| m.destination_flow()).collect();
            inbox_flows.sort();
            inbox_flows.dedup();
            Ok(Snapshot {
                vnodes,
                packages,
                flows,
                outbox,
                inbox_flows,
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
}
