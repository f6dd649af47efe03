//! Virtual nodes: create, list, get, upgrade, flow starts on/off, the
//! vnode's startable flows and its status stream.

use super::*;

pub(crate) fn vnode_view(v: &VnodeRecord) -> openapi::Vnode {
    openapi::Vnode {
        holding_id: v.holding.to_string(),
        x500_name: v.name.to_string(),
        package_checksum: v.package.to_string(),
        flow_starts_enabled: v.flow_starts_enabled,
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/virtualnode",
    tag = "virtual nodes",
    summary = "Create a virtual node",
    request_body = openapi::CreateVnode,
    responses(
        (status = 201, description = "Created", body = openapi::Vnode),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 404, description = "No such package", body = openapi::Problem),
        (status = 409, description = "A virtual node with that name exists", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn create_vnode(
    State(c): State<Ctx>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = parse_json(&body.map_err(body_error)?)?;
    let name: X500Name = str_field(&v, "x500Name")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_X500_NAME", e.0))?;
    let checksum: Checksum = str_field(&v, "packageChecksum")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_CHECKSUM", e.0))?;
    let rec = c.worker.create_vnode(name, checksum).await?;
    Ok((StatusCode::CREATED, Json(vnode_view(&rec))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/virtualnode",
    tag = "virtual nodes",
    summary = "List virtual nodes (paginated, by X.500 name)",
    params(page::PageParams),
    responses(
        (status = 200, description = "A page of virtual nodes", body = openapi::VnodeList),
        (status = 400, description = "Bad `limit` (`INVALID_LIMIT`) or `cursor` (`INVALID_CURSOR`)", body = openapi::Problem),
    ),
)]
pub(crate) async fn list_vnodes(
    State(c): State<Ctx>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<openapi::VnodeList>, ApiError> {
    let page = Page::from_query(&q)?;
    let after = page.after_parsed::<X500Name>()?.map(|n| n.to_string());
    // Sorted by name, as `vnodes()` returns them.
    let all = c.worker.vnodes();
    let items = all
        .iter()
        .map(|v| (v.name.to_string(), v))
        .filter(|(k, _)| after.as_deref().is_none_or(|a| k.as_str() > a));
    let (vs, next_cursor) = page.take(items);
    Ok(Json(openapi::VnodeList {
        virtual_nodes: vs.into_iter().map(vnode_view).collect(),
        next_cursor,
    }))
}

#[utoipa::path(
    get,
    path = "/api/v1/virtualnode/{holding}",
    tag = "virtual nodes",
    summary = "Get a virtual node",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
    ),
    responses(
        (status = 200, description = "The virtual node", body = openapi::Vnode),
        (status = 404, description = "No such virtual node", body = openapi::Problem),
    ),
)]
pub(crate) async fn get_vnode(
    State(c): State<Ctx>,
    Path(h): Path<String>,
) -> Result<Json<openapi::Vnode>, ApiError> {
    let h = holding(&h)?;
    let v = c
        .worker
        .vnode(&h)
        .ok_or_else(|| ApiError::not_found(format!("no virtual node with holdingId {h}")))?;
    Ok(Json(vnode_view(&v)))
}

#[utoipa::path(
    get,
    path = "/api/v1/virtualnode/{holding}/flows",
    tag = "virtual nodes",
    summary = "List the flows of a virtual node's package",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
    ),
    responses(
        (status = 200, description = "The flows of the package the virtual node runs", body = openapi::FlowInfoList),
        (status = 404, description = "No such virtual node", body = openapi::Problem),
    ),
)]
pub(crate) async fn vnode_flows(
    State(c): State<Ctx>,
    Path(h): Path<String>,
) -> Result<Json<openapi::FlowInfoList>, ApiError> {
    let flows = c.worker.vnode_flows(&holding(&h)?)?;
    Ok(Json(openapi::FlowInfoList { flows }))
}

#[utoipa::path(
    put,
    path = "/api/v1/maintenance/virtualnode/{holding}/package",
    tag = "virtual nodes",
    summary = "Development only: switch a virtual node and its unfinished flows to another package",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
    ),
    request_body = openapi::SetPackage,
    responses(
        (status = 200, description = "Switched", body = openapi::Vnode),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 404, description = "No such virtual node or package", body = openapi::Problem),
        (status = 409, description = "Conflicts with the virtual node's state", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn force_package(
    State(c): State<Ctx>,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<openapi::Vnode>, ApiError> {
    let h = holding(&h)?;
    let checksum = package_checksum(body)?;
    let rec = c.worker.force_package(h, checksum).await?;
    Ok(Json(vnode_view(&rec)))
}

#[utoipa::path(
    put,
    path = "/api/v1/virtualnode/{holding}/package",
    tag = "virtual nodes",
    summary = "Upgrade a virtual node to another package: new flows run it, running flows finish on theirs",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
    ),
    request_body = openapi::SetPackage,
    responses(
        (status = 200, description = "Upgraded", body = openapi::Vnode),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 404, description = "No such virtual node or package", body = openapi::Problem),
        (status = 409, description = "Conflicts with the virtual node's state", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn upgrade_vnode(
    State(c): State<Ctx>,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<openapi::Vnode>, ApiError> {
    let h = holding(&h)?;
    let checksum = package_checksum(body)?;
    Ok(Json(vnode_view(
        &c.worker.upgrade_vnode(h, checksum).await?,
    )))
}

#[utoipa::path(
    post,
    path = "/api/v1/virtualnode/{holding}/check-upgrade",
    tag = "virtual nodes",
    summary = "Replay the virtual node's unfinished flows against another package, running nothing live",
    description = "Each unfinished flow's journal is replayed against the package's code until its end: the answer says, per flow, whether the new code replays it cleanly or where it diverges. Nothing is sent, committed or changed.",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
    ),
    request_body = openapi::SetPackage,
    responses(
        (status = 200, description = "The check, per flow", body = openapi::UpgradeCheck),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 404, description = "No such virtual node or package", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn check_upgrade(
    State(c): State<Ctx>,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<openapi::UpgradeCheck>, ApiError> {
    use braid_api::ReplayVerdict;
    let h = holding(&h)?;
    let checksum = package_checksum(body)?;
    let checks = c.worker.check_upgrade(h, checksum).await?;
    let flows: Vec<openapi::FlowReplay> = checks
        .into_iter()
        .map(|r| {
            let (verdict, step, message) = match r.verdict {
                ReplayVerdict::Clean => ("CLEAN", None, None),
                ReplayVerdict::Diverges { step, message } => ("DIVERGES", step, Some(message)),
                ReplayVerdict::Fails(f) => ("FAILS", None, Some(f.message)),
            };
            let view = flows::flow_view(&r.flow);
            openapi::FlowReplay {
                flow_id: view.flow_id,
                client_request_id: view.client_request_id,
                flow_name: view.flow_name,
                journal_steps: r.journal_len,
                verdict: verdict.into(),
                step,
                message,
            }
        })
        .collect();
    Ok(Json(openapi::UpgradeCheck {
        package_checksum: checksum.to_string(),
        clean: flows.iter().all(|f| f.verdict == "CLEAN"),
        flows,
    }))
}

#[utoipa::path(
    put,
    path = "/api/v1/virtualnode/{holding}/state",
    tag = "virtual nodes",
    summary = "Enable or disable client flow starts on a virtual node",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
    ),
    request_body = openapi::VnodeState,
    responses(
        (status = 200, description = "Changed", body = openapi::Vnode),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 404, description = "No such virtual node", body = openapi::Problem),
        (status = 409, description = "Conflicts with the virtual node's state", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
pub(crate) async fn vnode_state(
    State(c): State<Ctx>,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<openapi::Vnode>, ApiError> {
    let h = holding(&h)?;
    let v = parse_json(&body.map_err(body_error)?)?;
    let enabled = field(&v, "flowStartsEnabled")?.as_bool().ok_or_else(|| {
        ApiError::bad(
            "INVALID_FIELD",
            "field \"flowStartsEnabled\" must be true or false",
        )
    })?;
    Ok(Json(vnode_view(
        &c.worker.set_flow_starts(h, enabled).await?,
    )))
}

#[utoipa::path(
    get,
    path = "/api/v1/flow/{holding}/events",
    tag = "flows",
    summary = "Stream the status changes of a virtual node's flows (Server-Sent Events; never ends)",
    description = "Each `status` event's data is a Flow; its `id` can be sent back as \
        `Last-Event-ID` to resume after a reconnect. A `resync` event means events were missed \
        (the client fell too far behind, or resumed from an id the node no longer holds): list \
        the flows again (`GET /api/v1/flow/{holding}`) and carry on with the stream.",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received, to resume after it"),
    ),
    responses(
        (status = 200, description = "An event stream of `status` and `resync` events", content_type = "text/event-stream", body = openapi::StatusEvent),
        (status = 404, description = "No such virtual node", body = openapi::Problem),
    ),
)]
pub(crate) async fn vnode_events(
    State(c): State<Ctx>,
    headers: axum::http::HeaderMap,
    Path(h): Path<String>,
) -> Result<axum::response::Sse<axum::response::sse::KeepAliveStream<stream::SseStream>>, ApiError>
{
    let h = holding(&h)?;
    if c.worker.vnode(&h).is_none() {
        return Err(ApiError::not_found(format!(
            "no virtual node with holdingId {h}"
        )));
    }
    let resume = stream::resume_point(&headers, c.worker.events());
    Ok(stream::follow_vnode(c.worker.clone(), h, resume))
}

/// The `packageChecksum` of a `SetPackage` body.
fn package_checksum(body: Result<Bytes, BytesRejection>) -> Result<Checksum, ApiError> {
    let v = parse_json(&body.map_err(body_error)?)?;
    str_field(&v, "packageChecksum")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_CHECKSUM", e.0))
}
