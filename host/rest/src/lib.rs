//! The REST worker: the flow and management API over HTTP (JSON).
//!
//! Every request needs HTTP basic auth. Errors are JSON documents
//! `{"code": "<STABLE_CODE>", "message": "<what to do>"}`; bad input gets a
//! 4xx, never a 5xx, and never takes the process down.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use braid_flow::{FlowWorker, WorkerError};
use braid_storage::{FlowRecord, PackageRecord, VnodeRecord};
use braid_types::{Checksum, ClientRequestId, FlowStart, HoldingId, X500Name};
use serde_json::{Value, json};
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod auth;
mod network;
pub mod openapi;
pub mod page;
mod rbac;
mod server;
pub mod tls;
pub use auth::{Auth, AuthStore, Principal};
pub use server::{NAMES, ServerLimits, run, run_tls};

/// Largest package upload.
pub const MAX_PACKAGE_BYTES: usize = 32 << 20;
/// Largest JSON request body.
pub const MAX_JSON_BYTES: usize = 1 << 20;

/// A REST error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
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
        }
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
        (
            self.status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response()
    }
}

impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> ApiError {
        match e {
            WorkerError::NotFound(m) => ApiError::not_found(m),
            WorkerError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "CONFLICT", m),
            WorkerError::Invalid(m) => ApiError::bad("INVALID_REQUEST", m),
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

/// Builds the API router.
pub fn router(worker: FlowWorker, auth: Arc<Auth>) -> Router {
    let ctx = Ctx { worker, auth };
    let (routes, _) = api_routes().split_for_parts();
    routes
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NO_SUCH_ENDPOINT",
                "no such endpoint; see /api/v1/openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "this endpoint does not support that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            ctx.auth.clone(),
            auth::guard,
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

fn timestamp(ms: u64) -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

fn flow_json(r: &FlowRecord) -> Value {
    let client_request_id = match &r.start {
        FlowStart::Client {
            client_request_id, ..
        } => Value::String(client_request_id.to_string()),
        FlowStart::Responder { .. } => Value::Null,
    };
    let result = r
        .result
        .as_deref()
        .map(|s| serde_json::from_str(s).unwrap_or(Value::String(s.to_owned())))
        .unwrap_or(Value::Null);
    json!({
        "holdingId": r.holding.to_string(),
        "clientRequestId": client_request_id,
        "flowId": r.id.to_string(),
        "flowName": r.flow_name,
        "status": r.status,
        "result": result,
        "error": r.error,
        "timestamp": timestamp(r.updated_ms),
    })
}

fn package_json(p: &PackageRecord) -> Value {
    json!({"checksum": p.checksum.to_string(), "flows": p.flows, "size": p.size, "uploaded": timestamp(p.uploaded_ms)})
}

fn vnode_json(v: &VnodeRecord) -> Value {
    json!({
        "holdingId": v.holding.to_string(),
        "x500Name": v.name.to_string(),
        "packageChecksum": v.package.to_string(),
        "flowStartsEnabled": v.flow_starts_enabled,
    })
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
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    c.auth.check(&headers)?;
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
    Ok((status, Json(package_json(&rec))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/package",
    tag = "packages",
    summary = "List packages",
    responses(
        (status = 200, description = "Every package", body = openapi::PackageList),
    ),
)]
async fn list_packages(State(c): State<Ctx>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let ps: Vec<Value> = c.worker.packages().iter().map(package_json).collect();
    Ok(Json(json!({ "packages": ps })))
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
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    c.auth.check(&headers)?;
    let v = parse_json(&body.map_err(body_error)?)?;
    let name: X500Name = str_field(&v, "x500Name")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_X500_NAME", e.0))?;
    let checksum: Checksum = str_field(&v, "packageChecksum")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_CHECKSUM", e.0))?;
    let rec = c.worker.create_vnode(name, checksum).await?;
    Ok((StatusCode::CREATED, Json(vnode_json(&rec))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/virtualnode",
    tag = "virtual nodes",
    summary = "List virtual nodes",
    responses(
        (status = 200, description = "Every virtual node", body = openapi::VnodeList),
    ),
)]
async fn list_vnodes(State(c): State<Ctx>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let vs: Vec<Value> = c.worker.vnodes().iter().map(vnode_json).collect();
    Ok(Json(json!({ "virtualNodes": vs })))
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
    headers: HeaderMap,
    Path(h): Path<String>,
) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    let v = c
        .worker
        .vnode(&h)
        .ok_or_else(|| ApiError::not_found(format!("no virtual node with holdingId {h}")))?;
    Ok(Json(vnode_json(&v)))
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
    headers: HeaderMap,
    Path(h): Path<String>,
) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let flows = c.worker.vnode_flows(&holding(&h)?)?;
    Ok(Json(json!({ "flows": flows })))
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
    headers: HeaderMap,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    let v = parse_json(&body.map_err(body_error)?)?;
    let checksum: Checksum = str_field(&v, "packageChecksum")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_CHECKSUM", e.0))?;
    let rec = c.worker.force_package(h, checksum).await?;
    Ok(Json(vnode_json(&rec)))
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
    headers: HeaderMap,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    let v = parse_json(&body.map_err(body_error)?)?;
    let crid: ClientRequestId = str_field(&v, "clientRequestId")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_CLIENT_REQUEST_ID", e.0))?;
    let flow_name = str_field(&v, "flowName")?.to_owned();
    c.auth
        .permit(&headers, &format!("flow:start:{h}:{flow_name}"))?;
    let request_body = v
        .get("requestBody")
        .cloned()
        .unwrap_or(Value::Null)
        .to_string();
    let rec = c
        .worker
        .start_flow(h, crid, flow_name, request_body)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(flow_json(&rec))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/flow/{holding}",
    tag = "flows",
    summary = "List the flows of a virtual node",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
        ("status" = Option<openapi::FlowStatus>, Query, description = "Only flows with this status"),
    ),
    responses(
        (status = 200, description = "The flows", body = openapi::FlowList),
        (status = 400, description = "Unknown status (`INVALID_STATUS`)", body = openapi::Problem),
        (status = 404, description = "No such virtual node", body = openapi::Problem),
    ),
)]
async fn list_flows(
    State(c): State<Ctx>,
    headers: HeaderMap,
    Path(h): Path<String>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    if c.worker.vnode(&h).is_none() {
        return Err(ApiError::not_found(format!(
            "no virtual node with holdingId {h}"
        )));
    }
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
    let flows: Vec<Value> = c
        .worker
        .flows_of(&h)
        .iter()
        .filter(|r| want.is_none_or(|w| r.status == w))
        .map(flow_json)
        .collect();
    Ok(Json(json!({ "flows": flows })))
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
    headers: HeaderMap,
    Path((h, crid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    let crid: ClientRequestId = crid
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::not_found(e.0))?;
    let rec = c.worker.flow_by_client(&h, &crid).ok_or_else(|| {
        ApiError::not_found(format!(
            "no flow with clientRequestId {crid} on virtual node {h}"
        ))
    })?;
    Ok(Json(flow_json(&rec)))
}

#[utoipa::path(
    get,
    path = "/api/v1/health",
    tag = "node",
    summary = "Liveness and readiness (no credentials needed)",
    responses(
        (status = 200, description = "The node is up", body = openapi::Health),
    ),
)]
async fn health(State(c): State<Ctx>) -> Json<Value> {
    let (live, known) = c.worker.counts();
    Json(json!({"status": "UP", "liveFlows": live, "flows": known}))
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
    headers: HeaderMap,
    Path(cs): Path<String>,
) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let cs = checksum_path(&cs)?;
    let p = c
        .worker
        .package(&cs)
        .ok_or_else(|| ApiError::not_found(format!("no package with checksum {cs}")))?;
    Ok(Json(package_json(&p)))
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
    headers: HeaderMap,
    Path(cs): Path<String>,
) -> Result<StatusCode, ApiError> {
    c.auth.check(&headers)?;
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
    headers: HeaderMap,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    let v = parse_json(&body.map_err(body_error)?)?;
    let checksum: Checksum = str_field(&v, "packageChecksum")?
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::bad("INVALID_CHECKSUM", e.0))?;
    Ok(Json(vnode_json(
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
    headers: HeaderMap,
    Path(h): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    let v = parse_json(&body.map_err(body_error)?)?;
    let enabled = field(&v, "flowStartsEnabled")?.as_bool().ok_or_else(|| {
        ApiError::bad(
            "INVALID_FIELD",
            "field \"flowStartsEnabled\" must be true or false",
        )
    })?;
    Ok(Json(vnode_json(
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
    headers: HeaderMap,
    Path((h, crid)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    let crid = client_request(&crid)?;
    let rec = c.worker.flow_by_client(&h, &crid).ok_or_else(|| {
        ApiError::not_found(format!(
            "no flow with clientRequestId {crid} on virtual node {h}"
        ))
    })?;
    let rec = c.worker.kill(
        rec.id,
        format!("killed by an operator (clientRequestId {crid})"),
    )?;
    Ok(Json(flow_json(&rec)))
}

type SseStream = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<axum::response::sse::Event, std::convert::Infallible>,
            > + Send,
    >,
>;

fn status_stream(
    rx: tokio::sync::broadcast::Receiver<FlowRecord>,
    first: Option<FlowRecord>,
    keep: impl Fn(&FlowRecord) -> bool + Send + Sync + 'static,
    stop_at_end: bool,
) -> SseStream {
    use axum::response::sse::Event;
    use tokio::sync::broadcast::error::RecvError;
    let keep = Arc::new(keep);
    let s = futures_util::stream::unfold((rx, first, false), move |(mut rx, first, done)| {
        let keep = keep.clone();
        async move {
            if done {
                return None;
            }
            let r = match first {
                Some(r) => r,
                None => loop {
                    match rx.recv().await {
                        Ok(r) if keep(&r) => break r,
                        Ok(_) | Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return None,
                    }
                },
            };
            let end = stop_at_end && r.status.is_terminal();
            let ev = Event::default()
                .event("status")
                .json_data(flow_json(&r))
                .ok()?;
            Some((Ok(ev), (rx, None, end)))
        }
    });
    Box::pin(s)
}

#[utoipa::path(
    get,
    path = "/api/v1/flow/{holding}/{client_request_id}/events",
    tag = "flows",
    summary = "Stream a flow's status changes (Server-Sent Events `status`, each a Flow; ends when the flow ends)",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
        ("client_request_id" = String, Path, description = "The clientRequestId the flow was started with"),
    ),
    responses(
        (status = 200, description = "An event stream; each `status` event's data is a Flow", content_type = "text/event-stream", body = openapi::StatusEvent),
        (status = 404, description = "No such flow", body = openapi::Problem),
    ),
)]
async fn flow_events(
    State(c): State<Ctx>,
    headers: HeaderMap,
    Path((h, crid)): Path<(String, String)>,
) -> Result<axum::response::Sse<axum::response::sse::KeepAliveStream<SseStream>>, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    let crid = client_request(&crid)?;
    // Subscribe before reading the current status so no change is missed.
    let rx = c.worker.subscribe();
    let rec = c.worker.flow_by_client(&h, &crid).ok_or_else(|| {
        ApiError::not_found(format!(
            "no flow with clientRequestId {crid} on virtual node {h}"
        ))
    })?;
    let id = rec.id;
    Ok(
        axum::response::Sse::new(status_stream(rx, Some(rec), move |r| r.id == id, true))
            .keep_alive(axum::response::sse::KeepAlive::default()),
    )
}

#[utoipa::path(
    get,
    path = "/api/v1/flow/{holding}/events",
    tag = "flows",
    summary = "Stream the status changes of a virtual node's flows (Server-Sent Events `status`, each a Flow; never ends)",
    params(
        ("holding" = String, Path, description = "The virtual node's holdingId (12 hex digits)"),
    ),
    responses(
        (status = 200, description = "An event stream; each `status` event's data is a Flow", content_type = "text/event-stream", body = openapi::StatusEvent),
        (status = 404, description = "No such virtual node", body = openapi::Problem),
    ),
)]
async fn vnode_events(
    State(c): State<Ctx>,
    headers: HeaderMap,
    Path(h): Path<String>,
) -> Result<axum::response::Sse<axum::response::sse::KeepAliveStream<SseStream>>, ApiError> {
    c.auth.check(&headers)?;
    let h = holding(&h)?;
    if c.worker.vnode(&h).is_none() {
        return Err(ApiError::not_found(format!(
            "no virtual node with holdingId {h}"
        )));
    }
    let rx = c.worker.subscribe();
    Ok(
        axum::response::Sse::new(status_stream(rx, None, move |r| r.holding == h, false))
            .keep_alive(axum::response::sse::KeepAlive::default()),
    )
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
