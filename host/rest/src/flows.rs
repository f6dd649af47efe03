//! Flows: start, status, list, kill, status streams; how a flow is shown.

use super::*;

pub(crate) fn flow_view(r: &FlowRecord) -> openapi::Flow {
    let client_request_id = match &r.start {
        FlowStart::Client {
            client_request_id, ..
        } => Some(client_request_id.as_str()),
        FlowStart::Responder { .. } => None,
    };
    view(
        r.holding,
        client_request_id,
        r.id,
        &r.flow_name,
        r.status,
        r.result.as_deref(),
        r.error.as_ref(),
        r.updated_ms,
    )
}

/// A flow as a status event shows it.
pub(crate) fn change_view(c: &StatusChange) -> openapi::Flow {
    view(
        c.holding,
        c.client_request_id.as_ref().map(ClientRequestId::as_str),
        c.flow,
        &c.flow_name,
        c.status,
        c.result.as_deref(),
        c.error.as_ref(),
        c.updated_ms,
    )
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn view(
    holding: HoldingId,
    client_request_id: Option<&str>,
    flow: FlowId,
    flow_name: &str,
    status: FlowStatus,
    result: Option<&str>,
    error: Option<&FlowFailure>,
    updated_ms: u64,
) -> openapi::Flow {
    openapi::Flow {
        holding_id: holding.to_string(),
        client_request_id: client_request_id.map(str::to_owned),
        flow_id: flow.to_string(),
        flow_name: flow_name.to_owned(),
        status,
        result: result.map(|s| serde_json::from_str(s).unwrap_or(Value::String(s.to_owned()))),
        error: error.map(|e| openapi::FlowError {
            kind: e.kind,
            message: e.message.clone(),
        }),
        timestamp: timestamp(updated_ms),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/flow/{holding}",
    tag = "flows",
    summary = "Start a flow",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
    ),
    request_body = openapi::StartFlow,
    responses(
        (status = 202, description = "Accepted", body = openapi::Flow),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 403, description = "The caller may not start this flow on this virtual node (`flow:start:<holdingId>:<flowName>`)", body = openapi::Problem),
        (status = 404, description = "No such virtual node", body = openapi::Problem),
        (status = 409, description = "The clientRequestId was used before, or flow starts are disabled", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn start_flow(
    State(c): State<Ctx>,
    principal: Principal,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let h = holding(&h)?;
    let v = parse_json(&body.map_err(body_error)?)?;
    let crid: ClientRequestId = str_field(&v, "clientRequestId")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_CLIENT_REQUEST_ID", e.0))?;
    let flow_name = str_field(&v, "flowName")?.to_owned();
    // The guard checked `POST /api/v1/flow/{h}`; the flow itself needs
    // its own permission.
    c.auth
        .authorize(&principal, &format!("flow:start:{h}:{flow_name}"))?;
    let request_body = v
        .get("requestBody")
        .cloned()
        .unwrap_or(Value::Null)
        .to_string();
    let rec = c
        .worker
        .start_flow(h, crid, flow_name, request_body)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(flow_view(&rec))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/flow/{holding}",
    tag = "flows",
    summary = "List the flows of a virtual node (paginated)",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
        ("status" = Option<openapi::FlowStatus>, Query, description = "Only flows with this status"),
        page::PageParams,
    ),
    responses(
        (status = 200, description = "A page of the flows, oldest first (by creation); with `status`, each flow's current status", body = openapi::FlowList),
        (status = 400, description = "Unknown status (`INVALID_STATUS`), bad `limit` (`INVALID_LIMIT`) or `cursor` (`INVALID_CURSOR`)", body = openapi::Problem),
        (status = 404, description = "No such virtual node", body = openapi::Problem),
    ),
)]
pub(crate) async fn list_flows(
    State(c): State<Ctx>,
    Path(h): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<openapi::FlowList>, ApiError> {
    let h = holding(&h)?;
    if c.worker.vnode(&h).is_none() {
        return Err(ApiError::not_found(format!(
            "no virtual node with holdingId {h}"
        )));
    }
    let page = Page::from_query(&q)?;
    let want = match q.get("status") {
        None => None,
        Some(s) => Some(
            serde_json::from_value::<braid_types::FlowStatus>(Value::String(s.clone())).map_err(|_| {
                ApiError::bad(
                    "INVALID_STATUS",
                    format!("unknown status {s:?}; use START_REQUESTED, RUNNING, COMPLETED, FAILED or KILLED"),
                )
            })?,
        ),
    };
    let after = page.after_bytes(braid_storage::LIST_POSITION_LEN)?;
    let p = c.worker.list_flows(&h, want, after, page.limit).await?;
    Ok(Json(openapi::FlowList {
        flows: p.flows.iter().map(flow_view).collect(),
        next_cursor: p.next.as_deref().map(page::encode_cursor),
    }))
}

#[utoipa::path(
    get,
    path = "/api/v1/flow/{holding}/{client_request_id}",
    tag = "flows",
    summary = "Get a flow's status",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
        ("client_request_id" = String, Path, description = "The clientRequestId the flow was started with"),
    ),
    responses(
        (status = 200, description = "The flow", body = openapi::Flow),
        (status = 404, description = "No such flow", body = openapi::Problem),
    ),
)]
pub(crate) async fn flow_status(
    State(c): State<Ctx>,
    Path((h, crid)): Path<(String, String)>,
) -> Result<Json<openapi::Flow>, ApiError> {
    let h = holding(&h)?;
    let crid = client_request(&crid)?;
    Ok(Json(flow_view(&client_flow(&c, &h, &crid).await?)))
}

/// The flow started with `crid` on `h`, or a 404.
pub(crate) async fn client_flow(
    c: &Ctx,
    h: &HoldingId,
    crid: &ClientRequestId,
) -> Result<FlowRecord, ApiError> {
    c.worker.flow_by_client(h, crid).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no flow with clientRequestId {crid} on virtual node {h}"
        ))
    })
}

pub(crate) fn client_request(s: &str) -> Result<ClientRequestId, ApiError> {
    s.parse()
        .map_err(|e: braid_types::ParseError| ApiError::not_found(e.0))
}

#[utoipa::path(
    post,
    path = "/api/v1/flow/{holding}/{client_request_id}/kill",
    tag = "flows",
    summary = "Kill a running flow; its counterparties are told",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
        ("client_request_id" = String, Path, description = "The clientRequestId the flow was started with"),
    ),
    responses(
        (status = 200, description = "Kill requested; the flow ends `KILLED` (its status as it was)", body = openapi::Flow),
        (status = 404, description = "No such flow", body = openapi::Problem),
        (status = 409, description = "The flow has already ended", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn kill_flow(
    State(c): State<Ctx>,
    Path((h, crid)): Path<(String, String)>,
) -> Result<Json<openapi::Flow>, ApiError> {
    let h = holding(&h)?;
    let crid = client_request(&crid)?;
    let rec = client_flow(&c, &h, &crid).await?;
    let rec = c
        .worker
        .kill(
            rec.id,
            format!("killed by an operator (clientRequestId {crid})"),
        )
        .await?;
    Ok(Json(flow_view(&rec)))
}

#[utoipa::path(
    get,
    path = "/api/v1/flow/{holding}/{client_request_id}/events",
    tag = "flows",
    summary = "Stream a flow's status changes (Server-Sent Events; ends when the flow ends)",
    description = "Each `status` event's data is a Flow; its `id` can be sent back as \
        `Last-Event-ID` to resume after a reconnect. The stream starts with the flow's current \
        status and ends after its terminal one. Resuming gives exactly the events after the id \
        (for a flow that has ended: its end if the client had not had it, else nothing). A \
        `resync` event means events were missed (the client fell too far behind, or resumed \
        from an id the node no longer holds): it is followed by the flow's current status.",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
        ("client_request_id" = String, Path, description = "The clientRequestId the flow was started with"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received, to resume after it"),
    ),
    responses(
        (status = 200, description = "An event stream of `status` and `resync` events", content_type = "text/event-stream", body = openapi::StatusEvent),
        (status = 404, description = "No such flow", body = openapi::Problem),
    ),
)]
pub(crate) async fn flow_events(
    State(c): State<Ctx>,
    headers: axum::http::HeaderMap,
    Path((h, crid)): Path<(String, String)>,
) -> Result<axum::response::Sse<axum::response::sse::KeepAliveStream<stream::SseStream>>, ApiError>
{
    let h = holding(&h)?;
    let crid = client_request(&crid)?;
    // The cursor before the current status, so no change is missed.
    let resume = stream::resume_point(&headers, c.worker.events());
    let rec = client_flow(&c, &h, &crid).await?;
    Ok(stream::follow_flow(c.worker.clone(), rec, resume))
}
