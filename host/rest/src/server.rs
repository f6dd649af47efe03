//! Serving the API on a listener: [`serve`] (plain HTTP, loopback only by
//! [`crate::run`]'s rule) and [`serve_tls`] on [`braid_http`], which bounds the connections
//! and times out clients that stall (TLS handshake, request header, idle
//! keep-alive, request body, writes); see [`ServerLimits`].
//!
//! Every request handed to the router carries the client's address as
//! [`axum::extract::ConnectInfo<std::net::SocketAddr>`].

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse as _;
use braid_api::FlowService;
use braid_http::{Handler, Names, Peer, RequestBody, Server};
use tokio::net::TcpListener;

pub use braid_http::Limits as ServerLimits;

use crate::{ApiError, Auth, router};

/// What the REST server's log lines call it, and the prefix of its flags.
pub const NAMES: Names = Names {
    server: "REST API",
    flag_prefix: "--rest-",
};

struct Api(Router);

impl Handler for Api {
    async fn call(&self, req: Request<RequestBody>, peer: &Peer) -> Response<Body> {
        braid_http::call_router(&self.0, req, peer).await
    }

    fn body_timed_out(&self, message: String) -> Response<Body> {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "BODY_TIMEOUT", message).into_response()
    }
}

/// Serves the API over plain HTTP on `listener` until `shutdown`
/// completes, then shuts down gracefully (see [`braid_http`]).
pub async fn serve(
    listener: TcpListener,
    limits: ServerLimits,
    worker: Arc<dyn FlowService>,
    auth: Arc<Auth>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    Server::new(NAMES, limits, None, Api(router(worker, auth)))
        .serve(listener, shutdown)
        .await
}

/// Serves the API over HTTPS on `listener` until `shutdown` completes,
/// then shuts down gracefully; `tls` comes from
/// [`crate::tls::server_config`].
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: ServerLimits,
    worker: Arc<dyn FlowService>,
    auth: Arc<Auth>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let source: braid_http::TlsSource = Arc::new(move || tls.clone());
    Server::new(NAMES, limits, Some(source), Api(router(worker, auth)))
        .serve(listener, shutdown)
        .await
}
