//! What a flow did: its journal, entry by entry, and the journals of the
//! flows at the other end of its sessions that run on this node.

use super::*;
use crate::auth::Principal;
use braid_types::journal::{Entry, SessErr};
use braid_types::{SessionId, X500Name};

#[utoipa::path(
    get,
    path = "/api/v1/flow/{holding}/{client_request_id}/journal",
    tag = "flows",
    summary = "What a flow did: every journal entry in order, and its counterparties' flows on this node",
    description = "Allowed to whoever may read the flow (`GET /api/v1/flow/{holding}/...`). A counterparty flow is included when it runs on this node and the caller may read its virtual node's flows.",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
        ("client_request_id" = String, Path, description = "The clientRequestId the flow was started with"),
    ),
    responses(
        (status = 200, description = "The journal", body = openapi::FlowJournal),
        (status = 404, description = "No such flow", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn flow_journal(
    State(c): State<Ctx>,
    actor: Principal,
    Path((h, crid)): Path<(String, String)>,
) -> Result<Json<openapi::FlowJournal>, ApiError> {
    let h = holding(&h)?;
    let crid = flows::client_request(&crid)?;
    let record = flows::client_flow(&c, &h, &crid).await?;
    let (flow, entries) = journal_view(&c, &record).await?;
    let mut counterparties = Vec::new();
    for other in counterpart_flows(&c, &record, &entries) {
        let Some(r) = c.worker.flow(&other).await? else {
            continue; // not started yet, or its record is gone
        };
        let operation = format!("GET /api/v1/flow/{}/{}/journal", r.holding, r.id);
        if c.auth.authorize(&actor, &operation).is_err() {
            continue;
        }
        counterparties.push(journal_view(&c, &r).await?.0);
    }
    Ok(Json(openapi::FlowJournal {
        flow,
        counterparties,
    }))
}

/// The flows at the other end of `record`'s sessions that run on this
/// node: the responders of the sessions it opened, and the initiator of
/// the session it answers.
fn counterpart_flows(c: &Ctx, record: &FlowRecord, entries: &[Entry]) -> Vec<FlowId> {
    let local = |h: &HoldingId| c.worker.vnode(h).is_some();
    let mut out = Vec::new();
    if let FlowStart::Responder {
        session, initiator, ..
    } = &record.start
        && local(&initiator.holding)
    {
        out.push(session.initiator_flow);
    }
    for e in entries {
        if let Entry::Initiate {
            counterparty,
            result: Ok(handle),
            ..
        } = e
            && let Ok(name) = counterparty.parse::<X500Name>()
        {
            let holding = HoldingId::derive(&name, c.worker.group());
            if local(&holding) {
                let session = SessionId {
                    initiator_flow: record.id,
                    index: *handle,
                };
                out.push(FlowId::responder(&holding, &session));
            }
        }
    }
    out
}

/// `record` with its journal, and the journal's entries.
async fn journal_view(
    c: &Ctx,
    record: &FlowRecord,
) -> Result<(openapi::JournalView, Vec<Entry>), ApiError> {
    let raw = c
        .worker
        .store()
        .journal(&record.id)
        .await
        .map_err(WorkerError::Store)?;
    let mut entries = Vec::with_capacity(raw.len());
    let mut shown = Vec::with_capacity(raw.len());
    for (step, bytes) in raw.iter().enumerate() {
        let step = step as u32;
        match Entry::decode(bytes) {
            Ok(e) => {
                shown.push(entry_view(step, &e));
                entries.push(e);
            }
            Err(e) => shown.push(openapi::JournalEntry {
                error: Some(format!(
                    "this entry ({} bytes) does not decode: {e}; a newer braid wrote it?",
                    bytes.len()
                )),
                ..blank(step, "unknown")
            }),
        }
    }
    let started = match &record.start {
        FlowStart::Client { request_body, .. } => openapi::JournalStart {
            by: "CLIENT".into(),
            request_body: Some(
                serde_json::from_str(request_body)
                    .unwrap_or_else(|_| Value::String(request_body.clone())),
            ),
            initiator: None,
            protocol: None,
            version: None,
        },
        FlowStart::Responder {
            initiator,
            protocol,
            version,
            ..
        } => openapi::JournalStart {
            by: "SESSION_INIT".into(),
            request_body: None,
            initiator: Some(initiator.name.to_string()),
            protocol: Some(protocol.clone()),
            version: Some(*version),
        },
    };
    let failed_at_step = match (&record.status, &record.error) {
        // Where replay with the flow's (new) code diverged, as the
        // runtime's failure says ("... at step N: ...").
        (FlowStatus::Failed, Some(e)) if e.kind == braid_types::FailureKind::NonDeterminism => {
            braid_types::journal::diverged_at(&e.message).or(Some(raw.len() as u32))
        }
        (FlowStatus::Failed | FlowStatus::Killed, _) => Some(raw.len() as u32),
        _ => None,
    };
    Ok((
        openapi::JournalView {
            status: flows::flow_view(record),
            started,
            entries: shown,
            failed_at_step,
        },
        entries,
    ))
}

fn blank(step: u32, call: &str) -> openapi::JournalEntry {
    openapi::JournalEntry {
        step,
        call: call.into(),
        session: None,
        sessions: None,
        counterparty: None,
        protocol: None,
        versions: None,
        bytes: None,
        payload_hex: None,
        payload_text: None,
        digest: None,
        at: None,
        random_hex: None,
        error: None,
    }
}

fn session_error(e: &SessErr) -> String {
    match e {
        SessErr::CounterpartyUnknown(s) => format!("counterparty unknown: {s}"),
        SessErr::ProtocolUnsupported(s) => format!("protocol unsupported: {s}"),
        SessErr::Closed => "closed by the counterparty".into(),
        SessErr::CounterpartyFailed(s) => format!("the counterparty's flow failed: {s}"),
        SessErr::TimedOut => "timed out".into(),
        SessErr::InvalidSession => "no such session".into(),
        SessErr::TooLarge(n) => format!("too large ({n} bytes)"),
        SessErr::Other(s) => s.clone(),
    }
}

/// A payload as text, when all of it is printable UTF-8.
fn as_text(b: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(b).ok()?;
    s.chars()
        .all(|c| !c.is_control() || c == '\n' || c == '\t')
        .then(|| s.to_owned())
}

/// What a receive returned: the payload, or the session's error.
fn received(v: &mut openapi::JournalEntry, result: &Result<Vec<u8>, SessErr>) {
    match result {
        Ok(p) => {
            v.bytes = Some(p.len() as u64);
            v.payload_hex = Some(hex::encode(p));
            v.payload_text = as_text(p);
        }
        Err(e) => v.error = Some(session_error(e)),
    }
}

fn entry_view(step: u32, e: &Entry) -> openapi::JournalEntry {
    let mut v = blank(step, e.call_kind());
    match e {
        Entry::Initiate {
            counterparty,
            protocol,
            versions,
            result,
        } => {
            v.counterparty = Some(counterparty.clone());
            v.protocol = Some(protocol.clone());
            v.versions = Some(versions.clone());
            match result {
                Ok(h) => v.session = Some(*h),
                Err(e) => v.error = Some(session_error(e)),
            }
        }
        Entry::Send {
            handle,
            digest,
            result,
        } => {
            v.session = Some(*handle);
            v.digest = Some(format!("{digest:016x}"));
            v.error = result.as_ref().err().map(session_error);
        }
        Entry::Sent {
            handle,
            digest,
            len,
            result,
        } => {
            v.session = Some(*handle);
            v.digest = Some(format!("{digest:016x}"));
            v.bytes = Some(*len);
            v.error = result.as_ref().err().map(session_error);
        }
        Entry::Receive { handle, result, .. } | Entry::Received { handle, result, .. } => {
            v.session = Some(*handle);
            if let Entry::Received { at_ms, .. } = e {
                v.at = Some(timestamp(*at_ms));
            }
            received(&mut v, result);
        }
        Entry::ReceivedAny {
            handles,
            handle,
            result,
            at_ms,
            ..
        } => {
            v.session = Some(*handle);
            v.sessions = Some(handles.clone());
            v.at = Some(timestamp(*at_ms));
            received(&mut v, result);
        }
        Entry::Close { handle, result } => {
            v.session = Some(*handle);
            v.error = result.as_ref().err().map(session_error);
        }
        Entry::Sleep { wake_at_ms } => v.at = Some(timestamp(*wake_at_ms)),
        Entry::Now { ms } => v.at = Some(timestamp(*ms)),
        Entry::Random { bytes } => v.random_hex = Some(hex::encode(bytes)),
    }
    v
}
