//! The application network as this node sees it, and the operator's
//! approval of registrations.

use crate::{ApiError, Ctx};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use braid_flow::MemberSummary;
use braid_types::X500Name;
use serde::Serialize;
use utoipa::ToSchema;

/// A member of the network map.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// X.500 name.
    pub name: String,
    /// Its gateway's HTTPS URL.
    pub endpoint: String,
    /// Its record's serial (grows with every republish).
    pub serial: u64,
    /// Its platform version.
    pub platform_version: u32,
}

impl From<MemberSummary> for Member {
    fn from(m: MemberSummary) -> Member {
        Member {
            name: m.name,
            endpoint: m.endpoint,
            serial: m.serial,
            platform_version: m.platform_version,
        }
    }
}

/// This node's view of its application network.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkView {
    /// Whether the node was started with a network configuration; when
    /// false the other fields are empty and only local vnodes can talk.
    pub configured: bool,
    /// The network's name.
    pub group: String,
    /// Version of the signed network map the node holds (0: none yet).
    pub map_version: u64,
    /// Whether this node runs the network-map (operator) role.
    pub operator: bool,
    /// The members in that map.
    pub members: Vec<Member>,
}

/// The node's network services if it runs the network-map role.
fn operator(c: &Ctx) -> Result<&std::sync::Arc<dyn braid_flow::Network>, ApiError> {
    c.worker
        .network()
        .filter(|n| n.summary().operator)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "NOT_NETWORK_OPERATOR",
                "this node does not run the network-map role; ask the network operator's node",
            )
        })
}

#[utoipa::path(
    get,
    path = "/api/v1/network",
    tag = "network",
    summary = "The network map as this node holds it",
    responses(
        (status = 200, description = "The node's view of its network", body = NetworkView),
        (status = 401, description = "Missing or wrong credentials", body = crate::openapi::Problem),
        (status = 403, description = "Not permitted", body = crate::openapi::Problem),
    ),
)]
pub(crate) async fn network(State(c): State<Ctx>) -> Result<Json<NetworkView>, ApiError> {
    Ok(Json(match c.worker.network() {
        None => NetworkView {
            configured: false,
            group: c.worker.group().to_owned(),
            map_version: 0,
            operator: false,
            members: Vec::new(),
        },
        Some(n) => {
            let s = n.summary();
            NetworkView {
                configured: true,
                group: s.group,
                map_version: s.map_version,
                operator: s.operator,
                members: s.members.into_iter().map(Member::from).collect(),
            }
        }
    }))
}

#[utoipa::path(
    get,
    path = "/api/v1/network/pending",
    tag = "network",
    summary = "Registrations waiting for the operator's approval (network-map node only)",
    responses(
        (status = 200, description = "Pending registrations", body = Vec<Member>),
        (status = 401, description = "Missing or wrong credentials", body = crate::openapi::Problem),
        (status = 403, description = "Not permitted", body = crate::openapi::Problem),
        (status = 409, description = "This node does not run the network-map role (`NOT_NETWORK_OPERATOR`)", body = crate::openapi::Problem),
    ),
)]
pub(crate) async fn pending(State(c): State<Ctx>) -> Result<Json<Vec<Member>>, ApiError> {
    let n = operator(&c)?;
    Ok(Json(n.pending()?.into_iter().map(Member::from).collect()))
}

#[utoipa::path(
    post,
    path = "/api/v1/network/members/{name}/approve",
    tag = "network",
    summary = "Approve a pending registration: the operator signs it into the map (network-map node only)",
    params(
        ("name" = String, Path, description = "The member's X.500 name, URL-encoded"),
    ),
    responses(
        (status = 204, description = "Approved; the new map is served"),
        (status = 401, description = "Missing or wrong credentials", body = crate::openapi::Problem),
        (status = 403, description = "Not permitted", body = crate::openapi::Problem),
        (status = 404, description = "No pending registration of that name, or the name is not an X.500 name", body = crate::openapi::Problem),
        (status = 409, description = "This node does not run the network-map role (`NOT_NETWORK_OPERATOR`)", body = crate::openapi::Problem),
    ),
)]
pub(crate) async fn approve(
    State(c): State<Ctx>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let n = operator(&c)?;
    let name: X500Name = name
        .parse()
        .map_err(|e: braid_types::ParseError| ApiError::not_found(e.0))?;
    n.approve(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
