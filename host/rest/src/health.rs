//! Health, readiness and metrics.

use super::*;

#[utoipa::path(
    get,
    path = "/api/v1/health",
    tag = "node",
    summary = "Liveness (no credentials needed): 200 whenever the node answers; the body says whether its store works",
    responses(
        (status = 200, description = "The node is up (`status` is `DEGRADED` while its store fails)", body = openapi::Health),
    ),
)]
pub(crate) async fn health(State(c): State<Ctx>) -> Json<openapi::Health> {
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
pub(crate) async fn ready(State(c): State<Ctx>) -> Response {
    let Json(h) = health(State(c)).await;
    let status = if h.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h)).into_response()
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
pub(crate) async fn metrics(State(c): State<Ctx>) -> Response {
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
