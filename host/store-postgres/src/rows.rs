//! Rows to records and records to column values.

use braid_storage::{FlowRecord, PackageRecord, StoreError, VnodeRecord};
use braid_types::{
    Checksum, FlowFailure, FlowId, FlowStart, FlowStatus, HoldingId, SessionMessage,
};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

/// The parts of a [`FlowRecord`] no query needs, as the `rest` column.
#[derive(Serialize, Deserialize)]
pub(crate) struct FlowRest {
    pub(crate) start: FlowStart,
    pub(crate) result: Option<String>,
    pub(crate) error: Option<FlowFailure>,
    pub(crate) seed: u64,
    pub(crate) wake_at_ms: Option<u64>,
}

pub(crate) fn corrupt(table: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        detail: e.to_string(),
    }
}

pub(crate) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encoding of an in-memory value cannot fail")
}

fn dec<T: serde::de::DeserializeOwned>(table: &'static str, b: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| corrupt(table, e))
}

fn fixed<const N: usize>(table: &'static str, row: &Row, i: usize) -> Result<[u8; N], StoreError> {
    let v: &[u8] = row.try_get(i).map_err(|e| corrupt(table, e))?;
    <[u8; N]>::try_from(v)
        .map_err(|_| corrupt(table, format!("an id of {} bytes, not {N}", v.len())))
}

pub(crate) fn flow_id(table: &'static str, row: &Row, i: usize) -> Result<FlowId, StoreError> {
    Ok(FlowId::from_bytes(fixed(table, row, i)?))
}

pub(crate) fn status_text(s: FlowStatus) -> &'static str {
    match s {
        FlowStatus::StartRequested => "START_REQUESTED",
        FlowStatus::Running => "RUNNING",
        FlowStatus::Completed => "COMPLETED",
        FlowStatus::Failed => "FAILED",
        FlowStatus::Killed => "KILLED",
    }
}

fn status(s: &str) -> Result<FlowStatus, StoreError> {
    Ok(match s {
        "START_REQUESTED" => FlowStatus::StartRequested,
        "RUNNING" => FlowStatus::Running,
        "COMPLETED" => FlowStatus::Completed,
        "FAILED" => FlowStatus::Failed,
        "KILLED" => FlowStatus::Killed,
        other => return Err(corrupt("flows", format!("unknown status {other:?}"))),
    })
}

fn ms(table: &'static str, row: &Row, i: usize) -> Result<u64, StoreError> {
    let v: i64 = row.try_get(i).map_err(|e| corrupt(table, e))?;
    u64::try_from(v).map_err(|_| corrupt(table, format!("a negative time {v}")))
}

/// A flow from the columns of `FLOW_COLUMNS`.
pub(crate) fn flow(row: &Row) -> Result<FlowRecord, StoreError> {
    let t = "flows";
    let rest: FlowRest = dec(t, row.try_get(8).map_err(|e| corrupt(t, e))?)?;
    let journal_len: i64 = row.try_get(7).map_err(|e| corrupt(t, e))?;
    Ok(FlowRecord {
        id: flow_id(t, row, 0)?,
        holding: HoldingId::from_bytes(fixed(t, row, 1)?),
        flow_name: row.try_get(2).map_err(|e| corrupt(t, e))?,
        package: Checksum::from_bytes(fixed(t, row, 3)?),
        start: rest.start,
        status: status(row.try_get(4).map_err(|e| corrupt(t, e))?)?,
        result: rest.result,
        error: rest.error,
        created_ms: ms(t, row, 5)?,
        updated_ms: ms(t, row, 6)?,
        wake_at_ms: rest.wake_at_ms,
        seed: rest.seed,
        journal_len: u32::try_from(journal_len)
            .map_err(|_| corrupt(t, format!("journal_len {journal_len}")))?,
    })
}

pub(crate) fn vnode(row: &Row) -> Result<VnodeRecord, StoreError> {
    let t = "vnodes";
    let name: &str = row.try_get(1).map_err(|e| corrupt(t, e))?;
    Ok(VnodeRecord {
        holding: HoldingId::from_bytes(fixed(t, row, 0)?),
        name: name.parse().map_err(|e| corrupt(t, e))?,
        package: Checksum::from_bytes(fixed(t, row, 2)?),
        created_ms: ms(t, row, 3)?,
        flow_starts_enabled: row.try_get(4).map_err(|e| corrupt(t, e))?,
    })
}

pub(crate) fn package(row: &Row) -> Result<PackageRecord, StoreError> {
    let t = "packages";
    let size: i64 = row.try_get(2).map_err(|e| corrupt(t, e))?;
    Ok(PackageRecord {
        checksum: Checksum::from_bytes(fixed(t, row, 0)?),
        flows: dec(t, row.try_get(1).map_err(|e| corrupt(t, e))?)?,
        size: size as u64,
        uploaded_ms: ms(t, row, 3)?,
    })
}

pub(crate) fn message(table: &'static str, row: &Row) -> Result<SessionMessage, StoreError> {
    dec(table, row.try_get(0).map_err(|e| corrupt(table, e))?)
}
