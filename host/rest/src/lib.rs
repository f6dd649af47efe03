//! The REST worker: the flow and management API over HTTP (JSON).
//!
//! Every request needs HTTP basic auth. Errors are JSON documents
//! `{"code": "<STABLE_CODE>", "message": "<what to do>"}`; bad input gets a
//! 4xx, never a 5xx, and never takes the process down.

use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use braid_flow::{FlowWorker, StatusChange, WorkerError};
use braid_storage::{FlowRecord, PackageRecord, VnodeRecord};
use braid_types::{
    Checksum, ClientRequestId, FlowFailure, FlowId, FlowStart, FlowStatus, HoldingId, X500Name,
};
use page::Page;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod auth;
mod network;
pub mod openapi;
pub mod page;
mod rbac;
mod server;
mod stream;
pub mod tls;
pub use auth::{Auth, AuthStore, Principal};
pub use server::{NAMES, ServerLimits, run, run_tls};

/// Largest package upload.
pub const MAX_PACKAGE_BYTES: usize = 32 << 20;
/// Largest JSON request body.
pub const MAX_JSON_BYTES: usize = 1 << 20;

/// A REST error: status, stable code, message (and, for `429`/`503`,
/// when to retry).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }
    /// Adds a `Retry-After: secs` header.
    pub(crate) fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after_secs = Some(secs);
        self
    }
    fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// `404 NOT_FOUND` with `message`.
    pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response();
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> ApiError {
        match e {
            WorkerError::NotFound(m) => ApiError::not_found(m),
            WorkerError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "CONFLICT", m),
            WorkerError::Invalid(m) => ApiError::bad("INVALID_REQUEST", m),
            // Damage does not go away by waiting: the operator must act.
            WorkerError::Store(e @ braid_storage::StoreError::Damaged { .. }) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "STORE_DAMAGED",
                e.to_string(),
            ),
            WorkerError::Store(e) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "STORE_UNAVAILABLE",
                format!("{e}; retry later"),
            ),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                other.to_string(),
            ),
        }
    }
}

fn body_error(r: BytesRejection) -> ApiError {
    let status = r.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "BODY_TOO_LARGE",
            format!("request body too large: {}", r.body_text()),
        )
    } else {
        ApiError::new(status, "BAD_BODY", r.body_text())
    }
}

#[derive(Clone)]
struct Ctx {
    worker: FlowWorker,
    auth: Arc<Auth>,
}

/// Every route with its OpenAPI description. Routes are added only with
/// `routes!`, which takes method and path from the handler's
/// `#[utoipa::path]`: what is served is what is documented.
pub(crate) fn api_routes() -> OpenApiRouter<Ctx> {
    let json_routes = OpenApiRouter::new()
        .routes(routes!(list_packages))
        .routes(routes!(create_vnode, list_vnodes))
        .routes(routes!(get_vnode))
        .routes(routes!(vnode_flows))
        .routes(routes!(upgrade_vnode))
        .routes(routes!(vnode_state))
        .routes(routes!(get_package, delete_package))
        .routes(routes!(vnode_events))
        .routes(routes!(flow_events))
        .routes(routes!(kill_flow))
        .routes(routes!(metrics))
        .routes(routes!(force_package))
        .routes(routes!(start_flow, list_flows))
        .routes(routes!(flow_status))
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(network::network))
        .routes(routes!(network::pending))
        .routes(routes!(network::approve))
        .routes(routes!(openapi::openapi_json))
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES));
    let upload = OpenApiRouter::new()
        .routes(routes!(upload_package))
        .layer(DefaultBodyLimit::max(MAX_PACKAGE_BYTES));
    upload.merge(json_routes).merge(rbac::routes())
}

/// Builds the API router: authentication first (`401`), then routing
/// (`404`, `405`), then authorization of the matched operation (`403`).
/// Serve it with connect info (`into_make_service_with_connect_info::<SocketAddr>`)
/// so that failed logins are throttled per source address.
pub fn router(worker: FlowWorker, auth: Arc<Auth>) -> Router {
    let ctx = Ctx { worker, auth };
    let (routes, _) = api_routes().split_for_parts();
    routes
        // Before the route layer, which then wraps it: the layer lets a
        // method the route does not serve through to this 405.
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "this endpoint does not support that method; see /api/v1/openapi.json",
            )
        })
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.auth.clone(),
            auth::authorize,
        ))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NO_SUCH_ENDPOINT",
                "no such endpoint; see /api/v1/openapi.json",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            ctx.auth.clone(),
            auth::authenticate,
        ))
        .layer(axum::middleware::from_fn(observe_latency))
        .with_state(ctx)
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(
            "MALFORMED_JSON",
            format!("request body is not valid JSON: {e}"),
        )
    })
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value, ApiError> {
    v.get(name)
        .ok_or_else(|| ApiError::bad("MISSING_FIELD", format!("field {name:?} is required")))
}

fn str_field<'a>(v: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    field(v, name)?
        .as_str()
        .ok_or_else(|| ApiError::bad("INVALID_FIELD", format!("field {name:?} must be a string")))
}

fn holding(s: &str) -> Result<HoldingId, ApiError> {
    s.parse().map_err(|e: braid_types::ParseError| {
        ApiError::not_found(format!("no virtual node {s:?}: {e}"))
    })
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-11-25T00:00:00.123Z`.
fn timestamp(ms: u64) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| format!("{ms} ms after 1970"))
}

fn flow_view(r: &FlowRecord) -> openapi::Flow {
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
fn change_view(c: &StatusChange) -> openapi::Flow {
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
fn view(
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

fn package_view(p: &PackageRecord) -> openapi::Package {
    openapi::Package {
        checksum: p.checksum.to_string(),
        flows: p.flows.clone(),
        size: p.size,
        uploaded: timestamp(p.uploaded_ms),
    }
}

fn vnode_view(v: &VnodeRecord) -> openapi::Vnode {
    openapi::Vnode {
        holding_id: v.holding.to_string(),
        x500_name: v.name.to_string(),
        package_checksum: v.package.to_string(),
        flow_starts_enabled: v.flow_starts_enabled,
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/package",
    tag = "packages",
    summary = "Upload a package",
    request_body(content = openapi::PackageBytes, content_type = "application/octet-stream", description = "The package's .wasm bytes (`braid package build`)"),
    responses(
        (status = 201, description = "Uploaded", body = openapi::Package),
        (status = 200, description = "The same bytes were uploaded before", body = openapi::Package),
        (status = 400, description = "Empty body (`EMPTY_PACKAGE`) or not a braid package (`INVALID_PACKAGE`)", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
async fn upload_package(
    State(c): State<Ctx>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    if body.is_empty() {
        return Err(ApiError::bad(
            "EMPTY_PACKAGE",
            "the request body must be the package's .wasm bytes",
        ));
    }
    let (rec, created) = c
        .worker
        .upload_package(body.to_vec())
        .await
        .map_err(|e| match e {
            WorkerError::Invalid(m) => ApiError::bad("INVALID_PACKAGE", m),
            e => e.into(),
        })?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(package_view(&rec))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/package",
    tag = "packages",
    summary = "List packages (paginated, by checksum)",
    params(page::PageParams),
    responses(
        (status = 200, description = "A page of packages", body = openapi::PackageList),
        (status = 400, description = "Bad `limit` (`INVALID_LIMIT`) or `cursor` (`INVALID_CURSOR`)", body = openapi::Problem),
    ),
)]
async fn list_packages(
    State(c): State<Ctx>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<openapi::PackageList>, ApiError> {
    let page = Page::from_query(&q)?;
    let mut all = c.worker.packages();
    all.sort_by_key(|p| p.checksum.to_string());
    let after = page.after_parsed::<Checksum>()?.map(|c| c.to_string());
    let items = all
        .iter()
        .map(|p| (p.checksum.to_string(), p))
        .filter(|(k, _)| after.as_deref().is_none_or(|a| k.as_str() > a));
    let (ps, next_cursor) = page.take(items);
    Ok(Json(openapi::PackageList {
        packages: ps.into_iter().map(package_view).collect(),
        next_cursor,
    }))
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
async fn create_vnode(
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
async fn list_vnodes(
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
async fn get_vnode(
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
async fn vnode_flows(
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
async fn force_package(
    State(c): State<Ctx>,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<openapi::Vnode>, ApiError> {
    let h = holding(&h)?;
    let v = parse_json(&body.map_err(body_error)?)?;
    let checksum: Checksum = str_field(&v, "packageChecksum")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_CHECKSUM", e.0))?;
    let rec = c.worker.force_package(h, checksum).await?;
    Ok(Json(vnode_view(&rec)))
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
async fn start_flow(
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
async fn list_flows(
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
async fn flow_status(
    State(c): State<Ctx>,
    Path((h, crid)): Path<(String, String)>,
) -> Result<Json<openapi::Flow>, ApiError> {
    let h = holding(&h)?;
    let crid = client_request(&crid)?;
    Ok(Json(flow_view(&client_flow(&c, &h, &crid).await?)))
}

/// The flow started with `crid` on `h`, or a 404.
async fn client_flow(
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

#[utoipa::path(
    get,
    path = "/api/v1/health",
    tag = "node",
    summary = "Liveness (no credentials needed): 200 whenever the node answers; the body says whether its store works",
    responses(
        (status = 200, description = "The node is up (`status` is `DEGRADED` while its store fails)", body = openapi::Health),
    ),
)]
async fn health(State(c): State<Ctx>) -> Json<openapi::Health> {
    let (live, unfinished) = c.worker.counts();
    let store = c.worker.store().health();
    Json(openapi::Health {
        status: if store.ok { "UP" } else { "DEGRADED" }.into(),
        ready: store.ok,
        live_flows: live as u64,
        flows: unfinished as u64,
        store: openapi::StoreState {
            status: if store.ok { "UP" } else { "FAILING" }.into(),
            error: store.error,
            since: timestamp(store.since_ms),
        },
    })
}

#[utoipa::path(
    get,
    path = "/api/v1/health/ready",
    tag = "node",
    summary = "Readiness (no credentials needed): 200 when the node can take requests, 503 while its store is failing",
    responses(
        (status = 200, description = "Ready", body = openapi::Health),
        (status = 503, description = "Not ready: the store is failing (e.g. the disk is full) and recovering by itself", body = openapi::Health),
    ),
)]
async fn ready(State(c): State<Ctx>) -> Response {
    let Json(h) = health(State(c)).await;
    let status = if h.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h)).into_response()
}

fn checksum_path(s: &str) -> Result<Checksum, ApiError> {
    s.parse()
        .map_err(|e: braid_types::ParseError| ApiError::not_found(format!("no package {s:?}: {e}")))
}

fn client_request(s: &str) -> Result<ClientRequestId, ApiError> {
    s.parse()
        .map_err(|e: braid_types::ParseError| ApiError::not_found(e.0))
}

#[utoipa::path(
    get,
    path = "/api/v1/package/{checksum}",
    tag = "packages",
    summary = "Get a package",
    params(
        ("checksum" = String, Path, description = "The package's SHA-256 checksum (64 hex digits)"),
    ),
    responses(
        (status = 200, description = "The package", body = openapi::Package),
        (status = 404, description = "No such package", body = openapi::Problem),
    ),
)]
async fn get_package(
    State(c): State<Ctx>,
    Path(cs): Path<String>,
) -> Result<Json<openapi::Package>, ApiError> {
    let cs = checksum_path(&cs)?;
    let p = c
        .worker
        .package(&cs)
        .ok_or_else(|| ApiError::not_found(format!("no package with checksum {cs}")))?;
    Ok(Json(package_view(&p)))
}

#[utoipa::path(
    delete,
    path = "/api/v1/package/{checksum}",
    tag = "packages",
    summary = "Delete a package no virtual node or unfinished flow uses",
    params(
        ("checksum" = String, Path, description = "The package's SHA-256 checksum (64 hex digits)"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such package", body = openapi::Problem),
        (status = 409, description = "The package is in use", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
async fn delete_package(
    State(c): State<Ctx>,
    Path(cs): Path<String>,
) -> Result<StatusCode, ApiError> {
    c.worker.delete_package(checksum_path(&cs)?).await?;
    Ok(StatusCode::NO_CONTENT)
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
async fn upgrade_vnode(
    State(c): State<Ctx>,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<openapi::Vnode>, ApiError> {
    let h = holding(&h)?;
    let v = parse_json(&body.map_err(body_error)?)?;
    let checksum: Checksum = str_field(&v, "packageChecksum")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_CHECKSUM", e.0))?;
    Ok(Json(vnode_view(
        &c.worker.upgrade_vnode(h, checksum).await?,
    )))
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
async fn vnode_state(
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
async fn kill_flow(
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
async fn flow_events(
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
async fn vnode_events(
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

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "node",
    summary = "Prometheus metrics (no credentials needed)",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain", body = String),
    ),
)]
async fn metrics(State(c): State<Ctx>) -> Response {
    let mut out = String::new();
    c.worker.render_metrics(&mut out);
    REST_LATENCY.render(
        &mut out,
        "braid_rest_request_seconds",
        "REST request latency.",
        "",
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

static REST_LATENCY: std::sync::LazyLock<braid_flow::Histogram> =
    std::sync::LazyLock::new(braid_flow::Histogram::default);

async fn observe_latency(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let t = std::time::Instant::now();
    let resp = next.run(req).await;
    REST_LATENCY.observe(t.elapsed());
    resp
}

#[cfg(test)]
mod tests {
    use super::timestamp;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_764_028_800_123), "2025-11-25T00:00:00.123Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
