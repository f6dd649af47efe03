//! The two layers every request passes.
//!
//! [`authenticate`] (all but the open paths; `401` before anything else)
//! puts the [`Principal`] in the request's extensions; then the router
//! picks the route; then [`authorize`] (only for a request that matched a
//! route and one of its methods) checks the `"<METHOD> <path>"` operation
//! against the caller's roles (see [`crate::rbac`]). So an authenticated
//! caller gets `404` for a path that does not exist, `405` for a method a
//! path does not have, and `403` only for an operation its roles do not
//! allow.

use super::{Auth, OPEN_PATHS, Principal, unauthorized};
use crate::ApiError;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

/// Decodes `%XX` escapes so that an operation names what the router will
/// route to (`/api/v1/flow/%30…` is `/api/v1/flow/0…`).
fn decode_path(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The methods each route template serves, from the OpenAPI document's
/// paths (the same routes the router serves).
static ROUTE_METHODS: LazyLock<HashMap<String, BTreeSet<&'static str>>> = LazyLock::new(|| {
    let (_, api) = crate::api_routes().split_for_parts();
    api.paths
        .paths
        .iter()
        .map(|(path, item)| {
            let methods = [
                ("GET", item.get.is_some()),
                ("PUT", item.put.is_some()),
                ("POST", item.post.is_some()),
                ("DELETE", item.delete.is_some()),
                ("PATCH", item.patch.is_some()),
            ]
            .into_iter()
            .filter_map(|(m, has)| has.then_some(m))
            .collect();
            (path.clone(), methods)
        })
        .collect()
});

/// The first layer: authenticates every request except the open paths
/// and puts the [`Principal`] in its extensions.
pub(crate) async fn authenticate(
    State(auth): State<Arc<Auth>>,
    mut req: Request,
    next: Next,
) -> Response {
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    match auth.authenticate(req.headers(), peer).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The route layer: runs once a request matched a route. Authorizes its
/// `"<METHOD> <path>"` operation (percent-decoded, so it names what the
/// handler serves); a method the route does not serve passes on to the
/// router's `405`.
pub(crate) async fn authorize(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let Some(principal) = req.extensions().get::<Principal>().cloned() else {
        if OPEN_PATHS.contains(&req.uri().path()) {
            return next.run(req).await;
        }
        return unauthorized("credentials required: use HTTP basic auth").into_response();
    };
    // HEAD is answered by the GET handler: it needs the same permission.
    let method = match req.method() {
        &axum::http::Method::HEAD => "GET",
        m => m.as_str(),
    };
    let served = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|t| ROUTE_METHODS.get(t.as_str()))
        .is_some_and(|ms| ms.contains(method));
    if !served {
        return next.run(req).await;
    }
    let Some(path) = decode_path(req.uri().path()) else {
        return ApiError::bad("INVALID_PATH", "the request path has malformed %-escapes")
            .into_response();
    };
    if let Err(e) = auth.authorize(&principal, &format!("{method} {path}"))
        && !is_own_password(&req, &principal)
    {
        return e.into_response();
    }
    next.run(req).await
}

/// The route on which everyone may change their own password, whatever
/// their roles (the handler keeps the expiry out of their reach).
pub(crate) const OWN_PASSWORD_ROUTE: &str = "/api/v1/user/{login}/password";

/// Whether `req` is `principal` setting its own password.
fn is_own_password(req: &Request, principal: &Principal) -> bool {
    req.method() == axum::http::Method::PUT
        && req
            .extensions()
            .get::<MatchedPath>()
            .is_some_and(|t| t.as_str() == OWN_PASSWORD_ROUTE)
        && decode_path(req.uri().path())
            .is_some_and(|p| p == format!("/api/v1/user/{}/password", principal.login))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_percent_decoded() {
        assert_eq!(
            decode_path("/api/v1/flow/%30123").as_deref(),
            Some("/api/v1/flow/0123")
        );
        assert_eq!(decode_path("/a%2Fb").as_deref(), Some("/a/b"));
        assert_eq!(decode_path("/a%2"), None);
        assert_eq!(decode_path("/a%zz"), None);
        assert_eq!(decode_path("/a%ff"), None);
    }

    #[test]
    fn every_route_template_has_its_methods() {
        assert_eq!(
            ROUTE_METHODS["/api/v1/user/{login}/role/{role}"],
            BTreeSet::from(["DELETE", "PUT"])
        );
        assert!(ROUTE_METHODS["/api/v1/flow/{holding}"].contains("POST"));
        assert!(ROUTE_METHODS[OWN_PASSWORD_ROUTE].contains("PUT"));
    }
}
