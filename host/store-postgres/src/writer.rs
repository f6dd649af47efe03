//! The writer task: group commit with one savepoint per batch.
//!
//! It takes every batch waiting (up to `max_group`) and commits them in one
//! transaction. Each batch runs between `SAVEPOINT b` and `RELEASE
//! SAVEPOINT b`; the statements of the whole group are pipelined (sent
//! back to back, answered in order), so a group costs a round trip for
//! its statements and one for the `COMMIT`. When a statement of batch k
//! fails (stale fence, duplicate client request id), the server refuses
//! every later statement of the pipeline; the writer rolls back to k's
//! savepoint, answers k with its error and sends the batches after k
//! again. A failure of the connection fails the group: every batch not
//! refused is answered [`StoreError::Unavailable`] and the connection is
//! dropped, not reused.
//!
//! A connection lost while its `COMMIT` was on the way leaves the outcome
//! unknown: the server may have committed and the answer got lost. The
//! writer never answers such a group with a guess (a caller told "not
//! written" that was written would, for instance, never wake the receiver
//! of a message it delivered). Each group asks for its transaction id
//! (`txid_current()`, pipelined after `BEGIN`); after a lost `COMMIT` the
//! writer asks the server, on a new connection, what became of it
//! (`txid_status`), and answers from that.

use crate::rows::{FlowRest, enc, status_text};
use crate::{Shared, describe, is_connection_error, pool_err};
use braid_storage::{FlowRecord, Op, StoreError};
use braid_types::{ClientRequestId, FlowId, HoldingId};
use deadpool_postgres::Pool;
use futures_util::future::{MaybeDone, maybe_done};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

type Reply = oneshot::Sender<Result<(), StoreError>>;

pub(crate) enum Msg {
    Write(Vec<Op>, Reply),
    /// Finish what was sent before, then answer.
    Close(oneshot::Sender<()>),
}

/// The statements the writer runs, prepared once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Begin,
    /// The group's transaction id (answered as the value, not a count).
    Xid,
    Savepoint,
    Release,
    RollbackTo,
    Commit,
    Fence,
    PutFlow,
    AppendJournal,
    PutOutbox,
    DeleteOutbox,
    PutInbox,
    DeleteInbox,
    PutVnode,
    PutPackage,
    DeletePackage,
    PutMeta,
    MetaIf,
    PutKill,
    DeleteKill,
    DeleteFlowInbox,
    DeleteFlow,
}

impl Kind {
    fn sql(self) -> &'static str {
        match self {
            Kind::Begin => "BEGIN",
            Kind::Xid => "SELECT txid_current()",
            Kind::Savepoint => "SAVEPOINT b",
            Kind::Release => "RELEASE SAVEPOINT b",
            Kind::RollbackTo => "ROLLBACK TO SAVEPOINT b",
            Kind::Commit => "COMMIT",
            Kind::Fence => "SELECT braid_fence($1, $2)",
            Kind::PutFlow => {
                "INSERT INTO flows (flow_id, holding, client_request_id, flow_name, package, \
                 status, partition, created_ms, updated_ms, ended_ms, wake_at_ms, journal_len, \
                 rest, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 1) \
                 ON CONFLICT (flow_id) DO UPDATE SET holding = EXCLUDED.holding, \
                 client_request_id = EXCLUDED.client_request_id, flow_name = EXCLUDED.flow_name, \
                 package = EXCLUDED.package, status = EXCLUDED.status, \
                 partition = EXCLUDED.partition, created_ms = EXCLUDED.created_ms, \
                 updated_ms = EXCLUDED.updated_ms, ended_ms = EXCLUDED.ended_ms, \
                 wake_at_ms = EXCLUDED.wake_at_ms, journal_len = EXCLUDED.journal_len, \
                 rest = EXCLUDED.rest, version = flows.version + 1"
            }
            // Insert-only: an entry once written stays (a retried append
            // of the same entries is a no-op).
            Kind::AppendJournal => {
                "INSERT INTO journal (flow_id, idx, entry) \
                 SELECT $1, t.i, t.e FROM unnest($2::bigint[], $3::bytea[]) AS t(i, e) \
                 ON CONFLICT (flow_id, idx) DO NOTHING"
            }
            Kind::PutOutbox => {
                "INSERT INTO outbox (key, to_holding, message) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO UPDATE SET to_holding = EXCLUDED.to_holding, \
                 message = EXCLUDED.message"
            }
            Kind::DeleteOutbox => "DELETE FROM outbox WHERE key = $1",
            Kind::PutInbox => {
                "INSERT INTO inbox (key, flow_id, message) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO UPDATE SET flow_id = EXCLUDED.flow_id, \
                 message = EXCLUDED.message"
            }
            Kind::DeleteInbox => "DELETE FROM inbox WHERE key = $1",
            Kind::PutVnode => {
                "INSERT INTO vnodes (holding, name, package, created_ms, flow_starts_enabled) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (holding) DO UPDATE SET \
                 name = EXCLUDED.name, package = EXCLUDED.package, \
                 created_ms = EXCLUDED.created_ms, \
                 flow_starts_enabled = EXCLUDED.flow_starts_enabled"
            }
            Kind::PutPackage => {
                "WITH p AS (INSERT INTO packages (checksum, flows, size, uploaded_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (checksum) DO UPDATE SET \
                 flows = EXCLUDED.flows, size = EXCLUDED.size, uploaded_ms = EXCLUDED.uploaded_ms) \
                 INSERT INTO package_bytes (checksum, bytes) VALUES ($1, $5) \
                 ON CONFLICT (checksum) DO UPDATE SET bytes = EXCLUDED.bytes"
            }
            Kind::DeletePackage => {
                "WITH p AS (DELETE FROM packages WHERE checksum = $1) \
                 DELETE FROM package_bytes WHERE checksum = $1"
            }
            Kind::PutMeta => {
                "INSERT INTO meta (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            }
            Kind::MetaIf => "SELECT braid_meta_if($1, $2)",
            Kind::PutKill => {
                "INSERT INTO kills (flow_id, reason) VALUES ($1, $2) \
                 ON CONFLICT (flow_id) DO UPDATE SET reason = EXCLUDED.reason"
            }
            Kind::DeleteKill => "DELETE FROM kills WHERE flow_id = $1",
            Kind::DeleteFlowInbox => "DELETE FROM inbox WHERE flow_id = $1",
            Kind::DeleteFlow => {
                "WITH j AS (DELETE FROM journal WHERE flow_id = $1), \
                 i AS (DELETE FROM inbox WHERE flow_id = $1), \
                 k AS (DELETE FROM kills WHERE flow_id = $1) \
                 DELETE FROM flows WHERE flow_id = $1"
            }
        }
    }
}

const FIND_CLIENT: &str = "SELECT flow_id FROM flows WHERE holding = $1 AND client_request_id = $2";

type Param = Box<dyn ToSql + Sync + Send>;

/// What a statement's failure means.
enum Meta {
    None,
    Fence { partition: u16, epoch: u64 },
    SettingIf(String),
    Put(HoldingId, ClientRequestId, FlowId),
}

struct Stmt {
    kind: Kind,
    params: Vec<Param>,
    meta: Meta,
}

impl Stmt {
    fn new(kind: Kind, params: Vec<Param>) -> Stmt {
        Stmt {
            kind,
            params,
            meta: Meta::None,
        }
    }
}

static BEGIN: Stmt = Stmt::bare(Kind::Begin);
static XID: Stmt = Stmt::bare(Kind::Xid);
static SAVEPOINT: Stmt = Stmt::bare(Kind::Savepoint);
static RELEASE: Stmt = Stmt::bare(Kind::Release);
static ROLLBACK_TO: Stmt = Stmt::bare(Kind::RollbackTo);
static COMMIT: Stmt = Stmt::bare(Kind::Commit);

impl Stmt {
    const fn bare(kind: Kind) -> Stmt {
        Stmt {
            kind,
            params: Vec::new(),
            meta: Meta::None,
        }
    }
}

/// One caller's batch in a group.
struct Batch {
    reply: Reply,
    stmts: Vec<Stmt>,
    /// Set when the batch was refused.
    refused: Option<StoreError>,
}

pub(crate) async fn run(mut rx: mpsc::UnboundedReceiver<Msg>, pool: Pool, shared: Arc<Shared>) {
    let max = shared.options.max_group.max(1);
    while let Some(first) = rx.recv().await {
        let mut group = Vec::new();
        let mut close = None;
        match first {
            Msg::Write(ops, reply) => group.push((ops, reply)),
            Msg::Close(done) => close = Some(done),
        }
        while close.is_none() && group.len() < max {
            match rx.try_recv() {
                Ok(Msg::Write(ops, reply)) => group.push((ops, reply)),
                Ok(Msg::Close(done)) => close = Some(done),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            commit_group(&pool, &shared, group).await;
        }
        if let Some(done) = close {
            // Later writes find the sender gone: Closed.
            rx.close();
            while let Ok(m) = rx.try_recv() {
                match m {
                    Msg::Write(_, reply) => {
                        let _ = reply.send(Err(StoreError::Closed));
                    }
                    Msg::Close(d) => {
                        let _ = d.send(());
                    }
                }
            }
            let _ = done.send(());
            return;
        }
    }
}

async fn commit_group(pool: &Pool, shared: &Shared, group: Vec<(Vec<Op>, Reply)>) {
    let t = std::time::Instant::now();
    let n = group.len();
    let mut batches = Vec::with_capacity(group.len());
    for (ops, reply) in group {
        match encode(&ops, shared.options.flow_partitions) {
            Ok(stmts) => batches.push(Batch {
                reply,
                stmts,
                refused: None,
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
    if batches.is_empty() {
        return;
    }
    let outcome = run_group(pool, shared, &mut batches).await;
    tracing::trace!(
        batches = n,
        micros = t.elapsed().as_micros() as u64,
        "group commit"
    );
    match outcome {
        Ok(()) => {
            shared.set_health(true, None);
            for b in batches {
                let _ = b.reply.send(match b.refused {
                    Some(e) => Err(e),
                    None => Ok(()),
                });
            }
        }
        Err(fault) => {
            let text = fault.to_string();
            if !matches!(fault, StoreError::Closed) {
                shared.set_health(false, Some(text.clone()));
            }
            for b in batches {
                // A refused batch wrote nothing either way.
                let _ = b.reply.send(Err(match b.refused {
                    Some(e) => e,
                    None => match &fault {
                        StoreError::Closed => StoreError::Closed,
                        _ => StoreError::Unavailable(text.clone()),
                    },
                }));
            }
        }
    }
}

/// How far a group's transaction got: what the writer needs to find out,
/// after a lost connection, whether it committed.
#[derive(Default)]
struct Progress {
    /// The transaction's id, once the server said it.
    xid: Option<i64>,
    /// `COMMIT` was sent: from here on the outcome is the server's to say.
    commit_sent: bool,
}

/// How long the writer keeps asking what became of a transaction whose
/// `COMMIT` was lost, before it answers that the outcome is unknown.
const RESOLVE_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// Gets a connection and commits the group on it; the connection is
/// dropped (not pooled again) after a failure or a time-out.
async fn run_group(pool: &Pool, shared: &Shared, batches: &mut [Batch]) -> Result<(), StoreError> {
    let timeout = shared.options.io_timeout;
    let client = pool.get().await.map_err(pool_err)?;
    let mut progress = Progress::default();
    let fault = match tokio::time::timeout(timeout, transact(&client, batches, &mut progress)).await
    {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e,
        Err(_) => StoreError::Unavailable(format!("PostgreSQL did not commit within {timeout:?}")),
    };
    drop(deadpool_postgres::Object::take(client));
    match (progress.commit_sent, progress.xid) {
        (true, Some(xid)) => resolve(pool, shared, xid, fault).await,
        _ => Err(fault),
    }
}

/// Finds out, on new connections, whether transaction `xid` (whose
/// `COMMIT` was sent on a connection since lost) committed: `Ok` if it
/// did, `fault` if it did not.
async fn resolve(
    pool: &Pool,
    shared: &Shared,
    xid: i64,
    fault: StoreError,
) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + RESOLVE_FOR;
    let mut logged = false;
    loop {
        // `None`: no connection to ask on.
        let asked = async {
            let c = pool.get().await.map_err(|_| None)?;
            let r = c.query_one("SELECT txid_status($1)", &[&xid]).await;
            if r.is_err() {
                drop(deadpool_postgres::Object::take(c));
            }
            r.map_err(Some)
        };
        match tokio::time::timeout(shared.options.io_timeout, asked).await {
            Ok(Ok(row)) => match row.get::<_, Option<String>>(0).as_deref() {
                Some("committed") => {
                    tracing::info!(xid, "a transaction whose COMMIT was cut off had committed");
                    return Ok(());
                }
                Some("aborted") => return Err(fault),
                // Still in progress (its session not gone yet), or too
                // old to say (cannot be: it is seconds old).
                _ => {}
            },
            // After a crash, an id the server never made durable is "in
            // the future": that transaction did not commit.
            Ok(Err(Some(e))) if e.as_db_error().is_some_and(|d| d.code().code() == "22023") => {
                return Err(fault);
            }
            Ok(Err(_)) | Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::error!(xid, "could not find out whether a transaction committed");
            return Err(StoreError::Unavailable(format!(
                "PostgreSQL: the connection was lost while transaction {xid} committed, and \
                 whether it did is still unknown after {RESOLVE_FOR:?}"
            )));
        }
        if !logged {
            logged = true;
            tracing::warn!(xid, cause = %fault,
                "the connection was lost during a COMMIT; asking the server whether it committed");
        }
        tokio::time::sleep(shared.options.probe_interval).await;
    }
}

fn fault(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {}", describe(e)))
}

async fn transact(
    client: &deadpool_postgres::Object,
    batches: &mut [Batch],
    progress: &mut Progress,
) -> Result<(), StoreError> {
    let mut kinds: Vec<Kind> = vec![
        Kind::Begin,
        Kind::Xid,
        Kind::Savepoint,
        Kind::Release,
        Kind::RollbackTo,
        Kind::Commit,
    ];
    for b in batches.iter() {
        for s in &b.stmts {
            if !kinds.contains(&s.kind) {
                kinds.push(s.kind);
            }
        }
    }
    let mut prepared = HashMap::with_capacity(kinds.len());
    for k in kinds {
        let st = client
            .prepare_cached(k.sql())
            .await
            .map_err(|e| fault(&e))?;
        prepared.insert(k, st);
    }
    let mut from = 0;
    let mut begun = false;
    loop {
        let mut items: Vec<&Stmt> = Vec::new();
        // Which batch (and statement of it) each item belongs to.
        let mut owners: Vec<Option<(usize, Option<usize>)>> = Vec::new();
        if !begun {
            items.push(&BEGIN);
            owners.push(None);
            items.push(&XID);
            owners.push(None);
        }
        for (bi, b) in batches.iter().enumerate().skip(from) {
            items.push(&SAVEPOINT);
            owners.push(Some((bi, None)));
            for (si, s) in b.stmts.iter().enumerate() {
                items.push(s);
                owners.push(Some((bi, Some(si))));
            }
            items.push(&RELEASE);
            owners.push(Some((bi, None)));
        }
        if items.is_empty() {
            break;
        }
        let results = pipeline(client, &prepared, &items).await;
        if !begun && let Some(Ok(xid)) = results.get(1) {
            progress.xid = i64::try_from(*xid).ok();
        }
        begun = true;
        let Some(i) = results.iter().position(|r| r.is_err()) else {
            break;
        };
        let err = results[i].as_ref().expect_err("an error at i");
        let Some((bi, Some(si))) = owners[i] else {
            // BEGIN, SAVEPOINT or RELEASE failed: the connection is wrong.
            return Err(fault(err));
        };
        if is_connection_error(err) {
            return Err(fault(err));
        }
        let refusal = classify(err, &batches[bi].stmts[si]);
        for r in pipeline(client, &prepared, &[&ROLLBACK_TO, &RELEASE]).await {
            r.map_err(|e| fault(&e))?;
        }
        let refusal = match refusal {
            Refusal::Error(e) => e,
            Refusal::Duplicate(holding, client_request_id, flow) => {
                let rows = client
                    .query(
                        FIND_CLIENT,
                        &[&holding.bytes().as_slice(), &client_request_id.as_str()],
                    )
                    .await
                    .map_err(|e| fault(&e))?;
                match rows.first() {
                    Some(row) => StoreError::Duplicate {
                        holding,
                        client_request_id,
                        existing: crate::rows::flow_id("flows", row, 0)?,
                        flow,
                    },
                    // Deleted by another process meanwhile.
                    None => StoreError::Unavailable(format!(
                        "client request id {client_request_id} of vnode {holding} was taken and \
                         freed while flow {flow} was written; retry"
                    )),
                }
            }
        };
        batches[bi].refused = Some(refusal);
        from = bi + 1;
    }
    progress.commit_sent = true;
    for r in pipeline(client, &prepared, &[&COMMIT]).await {
        r.map_err(|e| fault(&e))?;
    }
    Ok(())
}

enum Refusal {
    Error(StoreError),
    Duplicate(HoldingId, ClientRequestId, FlowId),
}

fn classify(err: &tokio_postgres::Error, stmt: &Stmt) -> Refusal {
    let Some(db) = err.as_db_error() else {
        return Refusal::Error(fault(err));
    };
    let code = db.code().code();
    match (&stmt.meta, code) {
        (Meta::Fence { partition, epoch }, "BR001") => {
            match db.detail().and_then(|d| d.parse::<u64>().ok()) {
                Some(current) => Refusal::Error(StoreError::Fenced {
                    partition: *partition,
                    epoch: *epoch,
                    current,
                }),
                None => Refusal::Error(StoreError::Database(format!(
                    "a fence failed without the current epoch: {}",
                    describe(err)
                ))),
            }
        }
        (Meta::SettingIf(key), "BR002") => Refusal::Error(StoreError::Changed { key: key.clone() }),
        (Meta::Put(h, c, f), "23505") if db.constraint() == Some("flows_client_request_id_key") => {
            Refusal::Duplicate(*h, c.clone(), *f)
        }
        // Deadlock or serialization failure: this batch may be retried.
        (_, c) if c.starts_with("40") => Refusal::Error(StoreError::Unavailable(format!(
            "PostgreSQL: {}; retry",
            describe(err)
        ))),
        _ => Refusal::Error(StoreError::Database(format!(
            "PostgreSQL refused a {:?}: {}",
            stmt.kind,
            describe(err)
        ))),
    }
}

type Exec<'a> = Pin<Box<MaybeDone<Pin<Box<dyn Future<Output = ExecResult> + Send + 'a>>>>>;
type ExecResult = Result<u64, tokio_postgres::Error>;

/// Runs `items` pipelined: every request is sent, in order, before the
/// first answer is awaited. One result per item.
async fn pipeline(
    client: &tokio_postgres::Client,
    prepared: &HashMap<Kind, Statement>,
    items: &[&Stmt],
) -> Vec<ExecResult> {
    let mut futs: Vec<Exec<'_>> = items
        .iter()
        .map(|s| {
            let st = &prepared[&s.kind];
            let params = s.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync));
            let f: Pin<Box<dyn Future<Output = ExecResult> + Send + '_>> = if s.kind == Kind::Xid {
                // A value, not a count.
                Box::pin(async move {
                    let row = client.query_one(st, &[]).await?;
                    Ok(row.get::<_, i64>(0) as u64)
                })
            } else {
                Box::pin(client.execute_raw(st, params))
            };
            Box::pin(maybe_done(f))
        })
        .collect();
    // The first poll of each sends its request; answers come in order, so
    // later futures finish after earlier ones.
    let mut first_pending = 0;
    let mut sent = false;
    std::future::poll_fn(|cx| {
        let mut i = first_pending;
        while i < futs.len() {
            if futs[i].as_mut().poll(cx).is_pending() {
                if sent {
                    break;
                }
            } else if i == first_pending {
                first_pending += 1;
            }
            i += 1;
        }
        sent = true;
        // Catch up past futures that finished out of order.
        while first_pending < futs.len()
            && matches!(*futs[first_pending], MaybeDone::Done(_) | MaybeDone::Gone)
        {
            first_pending += 1;
        }
        if first_pending == futs.len() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    futs.iter_mut()
        .map(|f| f.as_mut().take_output().expect("every future finished"))
        .collect()
}

fn time(what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v)
        .ok()
        .filter(|v| *v < i64::MAX)
        .ok_or_else(|| {
            StoreError::Database(format!(
                "{what} {v} is beyond the times PostgreSQL's bigint holds"
            ))
        })
}

fn bytes(b: &[u8]) -> Param {
    Box::new(b.to_vec())
}

/// The statements of one batch: its fences first (so a stale batch fails
/// before it writes), then its ops in order. Refuses, without a round
/// trip, what the database would refuse for sure: two flows with one
/// client request id in the batch, times beyond bigint, NUL in text.
fn encode(ops: &[Op], partitions: u16) -> Result<Vec<Stmt>, StoreError> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        if let Op::Fence { partition, epoch } = op {
            // An epoch beyond bigint is never current: -1 matches no
            // stored epoch, and the server still says which one is.
            let e = i64::try_from(*epoch).unwrap_or(-1);
            out.push(Stmt {
                kind: Kind::Fence,
                params: vec![Box::new(i32::from(*partition)), Box::new(e)],
                meta: Meta::Fence {
                    partition: *partition,
                    epoch: *epoch,
                },
            });
        }
    }
    // Client keys held within the batch.
    let mut holders: HashMap<(HoldingId, ClientRequestId), Option<FlowId>> = HashMap::new();
    for op in ops {
        match op {
            Op::Fence { .. } => {}
            Op::PutFlow(r) => {
                let meta = match r.client_request_id() {
                    Some(c) => {
                        let k = (r.holding, c.clone());
                        if let Some(Some(other)) = holders.get(&k)
                            && *other != r.id
                        {
                            return Err(StoreError::Duplicate {
                                holding: r.holding,
                                client_request_id: c.clone(),
                                existing: *other,
                                flow: r.id,
                            });
                        }
                        holders.insert(k, Some(r.id));
                        Meta::Put(r.holding, c.clone(), r.id)
                    }
                    None => Meta::None,
                };
                out.push(Stmt {
                    kind: Kind::PutFlow,
                    params: put_flow(r, braid_bus::topics::partition_of(r.id.bytes(), partitions))?,
                    meta,
                });
            }
            Op::DeleteFlow(r) => {
                if let Some(c) = r.client_request_id() {
                    let k = (r.holding, c.clone());
                    if holders.get(&k) == Some(&Some(r.id)) {
                        holders.insert(k, None);
                    }
                }
                out.push(Stmt::new(Kind::DeleteFlow, vec![bytes(r.id.bytes())]));
            }
            Op::AppendJournal {
                flow,
                start,
                entries,
            } => {
                if entries.is_empty() {
                    continue;
                }
                let idx: Vec<i64> = (0..entries.len() as i64)
                    .map(|i| i64::from(*start) + i)
                    .collect();
                out.push(Stmt::new(
                    Kind::AppendJournal,
                    vec![
                        bytes(flow.bytes()),
                        Box::new(idx),
                        Box::new(entries.clone()),
                    ],
                ));
            }
            Op::PutOutbox(m) => out.push(Stmt::new(
                Kind::PutOutbox,
                vec![
                    Box::new(m.key()),
                    bytes(m.to.holding.bytes()),
                    Box::new(enc(m.as_ref())),
                ],
            )),
            Op::DeleteOutbox(k) => out.push(Stmt::new(Kind::DeleteOutbox, vec![bytes(k)])),
            Op::PutInbox(m) => {
                let key = m.key();
                let flow = key[..16].to_vec();
                out.push(Stmt::new(
                    Kind::PutInbox,
                    vec![Box::new(key), Box::new(flow), Box::new(enc(m.as_ref()))],
                ));
            }
            Op::DeleteInbox(k) => out.push(Stmt::new(Kind::DeleteInbox, vec![bytes(k)])),
            Op::PutVnode(v) => out.push(Stmt::new(
                Kind::PutVnode,
                vec![
                    bytes(v.holding.bytes()),
                    Box::new(v.name.as_str().to_owned()),
                    bytes(v.package.bytes()),
                    Box::new(time("vnode creation time", v.created_ms)?),
                    Box::new(v.flow_starts_enabled),
                ],
            )),
            Op::PutPackage(p, b) => out.push(Stmt::new(
                Kind::PutPackage,
                vec![
                    bytes(p.checksum.bytes()),
                    Box::new(enc(&p.flows)),
                    Box::new(time("package size", p.size)?),
                    Box::new(time("package upload time", p.uploaded_ms)?),
                    Box::new(b.clone()),
                ],
            )),
            Op::DeletePackage(c) => {
                out.push(Stmt::new(Kind::DeletePackage, vec![bytes(c.bytes())]))
            }
            Op::PutMeta(k, v) => {
                no_nul("meta key", k)?;
                out.push(Stmt::new(
                    Kind::PutMeta,
                    vec![Box::new(k.clone()), Box::new(v.clone())],
                ))
            }
            Op::PutMetaIf {
                key,
                expected,
                value,
            } => {
                no_nul("meta key", key)?;
                out.push(Stmt {
                    kind: Kind::MetaIf,
                    params: vec![Box::new(key.clone()), Box::new(expected.clone())],
                    meta: Meta::SettingIf(key.clone()),
                });
                out.push(Stmt::new(
                    Kind::PutMeta,
                    vec![Box::new(key.clone()), Box::new(value.clone())],
                ))
            }
            Op::PutKill(f, why) => out.push(Stmt::new(
                Kind::PutKill,
                vec![bytes(f.bytes()), Box::new(why.as_bytes().to_vec())],
            )),
            Op::DeleteKill(f) => out.push(Stmt::new(Kind::DeleteKill, vec![bytes(f.bytes())])),
            Op::DeleteFlowInbox(f) => {
                out.push(Stmt::new(Kind::DeleteFlowInbox, vec![bytes(f.bytes())]))
            }
        }
    }
    Ok(out)
}

fn no_nul(what: &str, s: &str) -> Result<(), StoreError> {
    if s.contains('\0') {
        return Err(StoreError::Database(format!(
            "{what} {s:?} holds a NUL character, which PostgreSQL text cannot"
        )));
    }
    Ok(())
}

fn put_flow(r: &FlowRecord, partition: u16) -> Result<Vec<Param>, StoreError> {
    no_nul("flow name", &r.flow_name)?;
    let rest = FlowRest {
        start: r.start.clone(),
        result: r.result.clone(),
        error: r.error.clone(),
        seed: r.seed,
        wake_at_ms: r.wake_at_ms,
    };
    let updated = time("flow update time", r.updated_ms)?;
    Ok(vec![
        bytes(r.id.bytes()),
        bytes(r.holding.bytes()),
        Box::new(r.client_request_id().map(|c| c.as_str().to_owned())),
        Box::new(r.flow_name.clone()),
        bytes(r.package.bytes()),
        Box::new(status_text(r.status).to_owned()),
        Box::new(i32::from(partition)),
        Box::new(time("flow creation time", r.created_ms)?),
        Box::new(updated),
        Box::new(r.status.is_terminal().then_some(updated)),
        // Capped: the column serves queries; `rest` holds the exact time.
        Box::new(r.wake_at_ms.map(|w| i64::try_from(w).unwrap_or(i64::MAX))),
        Box::new(i64::from(r.journal_len)),
        Box::new(enc(&rest)),
    ])
}
