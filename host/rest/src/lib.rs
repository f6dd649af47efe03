//! The REST worker: the flow and management API over HTTP (JSON).
//!
//! Every request needs HTTP basic auth. Errors are JSON documents
//! `{"code": "<STABLE_CODE>", "message": "<what to do>"}`; bad input gets a
//! 4xx, never a 5xx, and never takes the process down.
//!
//! Modules per resource: `packages`, `vnodes`, `flows` (with `stream`,
//! the status streams), `network`, `health`; `auth` (authentication,
//! password hashing, login throttling), `rbac` (model, policy, matcher,
//! handlers); [`page`] (pagination), [`openapi`] (the document), `server`
//! and [`tls`].

use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use braid_api::{FlowService, StatusChange, WorkerError};
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
mod flows;
mod health;
mod journal;
mod network;
pub mod openapi;
mod packages;
pub mod page;
mod rbac;
mod server;
mod settings;
mod stream;
pub mod tls;
mod vnodes;
mod worker;
pub use auth::{Auth, AuthStore, Principal};
pub use server::{NAMES, ServerLimits, serve, serve_tls};
pub use settings::RestArgs;
pub use worker::{DEFAULT_ADDR, RestDeps, run};

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
            // Another start with the same client request id won a race.
            WorkerError::Store(e @ braid_storage::StoreError::Duplicate { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "CONFLICT", e.to_string())
            }
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
    worker: Arc<dyn FlowService>,
    auth: Arc<Auth>,
}

/// Every route with its OpenAPI description. Routes are added only with
/// `routes!`, which takes method and path from the handler's
/// `#[utoipa::path]`: what is served is what is documented.
pub(crate) fn api_routes() -> OpenApiRouter<Ctx> {
    let json_routes = OpenApiRouter::new()
        .routes(routes!(packages::list_packages))
        .routes(routes!(vnodes::create_vnode, vnodes::list_vnodes))
        .routes(routes!(vnodes::get_vnode))
        .routes(routes!(vnodes::vnode_flows))
        .routes(routes!(vnodes::upgrade_vnode))
        .routes(routes!(vnodes::check_upgrade))
        .routes(routes!(vnodes::vnode_state))
        .routes(routes!(packages::get_package, packages::delete_package))
        .routes(routes!(vnodes::vnode_events))
        .routes(routes!(flows::flow_events))
        .routes(routes!(flows::kill_flow))
        .routes(routes!(health::metrics))
        .routes(routes!(vnodes::force_package))
        .routes(routes!(flows::start_flow, flows::list_flows))
        .routes(routes!(flows::flow_status))
        .routes(routes!(journal::flow_journal))
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .routes(routes!(network::network))
        .routes(routes!(network::pending))
        .routes(routes!(network::approve))
        .routes(routes!(openapi::openapi_json))
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES));
    let upload = OpenApiRouter::new()
        .routes(routes!(packages::upload_package))
        .layer(DefaultBodyLimit::max(MAX_PACKAGE_BYTES));
    upload.merge(json_routes).merge(rbac::routes())
}

/// Builds the API router: authentication first (`401`), then routing
/// (`404`, `405`), then authorization of the matched operation (`403`).
/// Serve it with connect info (`into_make_service_with_connect_info::<SocketAddr>`)
/// so that failed logins are throttled per source address.
pub fn router(worker: Arc<dyn FlowService>, auth: Arc<Auth>) -> Router {
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

static REST_LATENCY: std::sync::LazyLock<braid_api::Histogram> =
    std::sync::LazyLock::new(braid_api::Histogram::default);

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
