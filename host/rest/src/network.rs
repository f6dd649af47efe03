//! The application network as this node sees it, and the operator's
//! approval of registrations.

use crate::page::Page;
use crate::{ApiError, Ctx};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use braid_api::MemberSummary;
use braid_types::X500Name;
use serde::Serialize;
use std::collections::HashMap;
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
    /// A page of the members in that map, by name.
    pub members: Vec<Member>,
    /// Pass as `cursor` for the next page of members; `null` on the last.
    pub next_cursor: Option<String>,
}

/// A page of registrations waiting for approval, by name.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingList {
    /// The registrations.
    pub members: Vec<Member>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// One page of `members`, sorted by name.
fn page_of(
    mut members: Vec<MemberSummary>,
    page: &Page,
) -> Result<(Vec<Member>, Option<String>), ApiError> {
    members.sort_by(|a, b| a.name.cmp(&b.name));
    // Names are X.500 names: a cursor that is not one was not handed out.
    let after = page.after_parsed::<X500Name>()?.map(|n| n.to_string());
    let items = members
        .into_iter()
        .filter(|m| after.as_deref().is_none_or(|a| m.name.as_str() > a))
        .map(|m| (m.name.clone(), Member::from(m)));
    Ok(page.take(items))
}

/// The node's network services if it runs the network-map role.
fn operator(c: &Ctx) -> Result<&std::sync::Arc<dyn braid_api::Network>, ApiError> {
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
    summary = "The network map as this node holds it (members paginated, by name)",
    params(crate::page::PageParams),
    responses(
        (status = 200, description = "The node's view of its network", body = NetworkView),
        (status = 400, description = "Bad `limit` (`INVALID_LIMIT`) or `cursor` (`INVALID_CURSOR`)", body = crate::openapi::Problem),
        (status = 401, description = "Missing or wrong credentials", body = crate::openapi::Problem),
        (status = 403, description = "Not permitted", body = crate::openapi::Problem),
    ),
)]
pub(crate) async fn network(
    State(c): State<Ctx>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<NetworkView>, ApiError> {
    let page = Page::from_query(&q)?;
    Ok(Json(match c.worker.network() {
        None => NetworkView {
            configured: false,
            group: c.worker.group().to_owned(),
            map_version: 0,
            operator: false,
            members: Vec::new(),
            next_cursor: None,
        },
        Some(n) => {
            let s = n.summary();
            let (members, next_cursor) = page_of(s.members, &page)?;
            NetworkView {
                configured: true,
                group: s.group,
                map_version: s.map_version,
                operator: s.operator,
                members,
                next_cursor,
            }
        }
    }))
}

#[utoipa::path(
    get,
    path = "/api/v1/network/pending",
    tag = "network",
    summary = "Registrations waiting for the operator's approval (network-map node only; paginated, by name)",
    params(crate::page::PageParams),
    responses(
        (status = 200, description = "A page of pending registrations", body = PendingList),
        (status = 400, description = "Bad `limit` (`INVALID_LIMIT`) or `cursor` (`INVALID_CURSOR`)", body = crate::openapi::Problem),
        (status = 401, description = "Missing or wrong credentials", body = crate::openapi::Problem),
        (status = 403, description = "Not permitted", body = crate::openapi::Problem),
        (status = 409, description = "This node does not run the network-map role (`NOT_NETWORK_OPERATOR`)", body = crate::openapi::Problem),
        (status = 503, description = "In a cluster: the map server's state cannot be read now; retry", body = crate::openapi::Problem),
    ),
)]
pub(crate) async fn pending(
    State(c): State<Ctx>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<PendingList>, ApiError> {
    let page = Page::from_query(&q)?;
    let n = operator(&c)?;
    let (members, next_cursor) = page_of(n.pending()?, &page)?;
    Ok(Json(PendingList {
        members,
        next_cursor,
    }))
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
        (status = 503, description = "In a cluster: the map server (with a gateway) has not recorded the approval in time, or its state cannot be read; retry", body = crate::openapi::Problem),
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
