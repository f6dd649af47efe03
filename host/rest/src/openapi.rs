//! The OpenAPI document of the REST API, generated from the code.
//!
//! Every handler carries a `#[utoipa::path]` annotation and is registered
//! with `utoipa_axum::routes!`, which takes method and path from that
//! annotation: a route cannot be served without being documented. The
//! types below describe the JSON bodies the handlers send and accept (the
//! handlers build `serde_json::Value`s; these mirror them field by field).
//!
//! [`document`] is served at `GET /api/v1/openapi.json`; a copy is kept in
//! `docs/openapi.json` and a unit test fails when the two differ. Rewrite
//! the copy with
//!
//! ```sh
//! BRAID_UPDATE_OPENAPI=1 cargo test -p braid-rest openapi
//! ```

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::LazyLock;
use utoipa::ToSchema;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{self, OpenApi, RefOr, SecurityRequirement};

/// Name of the HTTP basic security scheme in the document.
pub const BASIC_AUTH: &str = "basicAuth";

/// The document: every route of [`crate::router`], the schemas, HTTP basic
/// security (except on the open endpoints), and the answers the
/// authentication layer gives on every guarded operation.
pub fn document() -> OpenApi {
    let (_, mut api) = crate::api_routes().split_for_parts();
    api.info = openapi::InfoBuilder::new()
        .title("braid REST API")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Packages, virtual nodes, flows, users and roles of a braid node. Every \
             endpoint except /api/v1/health, /metrics and /api/v1/openapi.json needs HTTP \
             basic auth and a role that allows its `<METHOD> <path>` operation. Errors are \
             JSON problem documents {\"code\", \"message\"}.",
        ))
        .license(Some(openapi::License::new("Apache-2.0")))
        .build();
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BASIC_AUTH,
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()),
    );
    let basic = SecurityRequirement::new::<_, _, &str>(BASIC_AUTH, []);
    for (path, item) in api.paths.paths.iter_mut() {
        let open = crate::auth::OPEN_PATHS.contains(&path.as_str());
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            if open {
                op.security = Some(Vec::new());
                continue;
            }
            op.security = Some(vec![basic.clone()]);
            let guard_answers = [
                (
                    "400",
                    "Malformed request (e.g. the path has malformed %-escapes)",
                ),
                (
                    "401",
                    "No, malformed or wrong credentials (`UNAUTHORIZED`), or an expired \
                     password (`PASSWORD_EXPIRED`)",
                ),
                (
                    "403",
                    "The caller's roles do not allow this operation (`FORBIDDEN`)",
                ),
                (
                    "429",
                    "Too many failed logins for this user from this address, or from \
                     this address (`TOO_MANY_FAILED_LOGINS`); retry after `Retry-After` \
                     seconds",
                ),
                (
                    "503",
                    "Too many logins are being checked at once (`AUTH_BUSY`); retry \
                     after `Retry-After` seconds",
                ),
            ];
            for (status, description) in guard_answers {
                match op.responses.responses.entry(status.to_string()) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(problem_response(description));
                    }
                    // The operation's own 503 (its store) and the guard's.
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if status == "503"
                            && let RefOr::T(r) = o.get_mut()
                            && !r.description.contains("AUTH_BUSY")
                        {
                            r.description.push_str(
                                "; or too many logins are being checked at once \
                                 (`AUTH_BUSY`, with `Retry-After`)",
                            );
                        }
                    }
                }
            }
        }
    }
    api
}

fn problem_response(description: &str) -> RefOr<openapi::Response> {
    RefOr::T(
        openapi::ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                openapi::ContentBuilder::new()
                    .schema(Some(openapi::Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

/// [`document`] as pretty-printed JSON with a final newline: the body of
/// `GET /api/v1/openapi.json` and the content of `docs/openapi.json`.
pub fn document_json() -> String {
    let mut s = document()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    s.push('\n');
    s
}

static DOCUMENT_JSON: LazyLock<String> = LazyLock::new(document_json);

/// Serves [`document`].
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "node",
    responses(
        (status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json", body = Object),
    ),
)]
pub(crate) async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT_JSON.as_str(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// Schemas. Field names are the JSON names; `Option` fields may be `null`.
// FlowStatus, FailureKind, FlowInfo and Protocol come from braid-types.
// ---------------------------------------------------------------------------

pub use braid_types::{FailureKind, FlowInfo, FlowStatus, Protocol};

/// An error: a stable code and a message that says what to do.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// Stable, machine-readable code, e.g. `NOT_FOUND`, `INVALID_FIELD`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

/// An uploaded package.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Package {
    /// SHA-256 of the package bytes, 64 lower-case hex digits.
    pub checksum: String,
    /// The flows it offers.
    pub flows: Vec<FlowInfo>,
    /// Size in bytes.
    pub size: u64,
    /// Upload time (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub uploaded: String,
}

/// A page of packages, by checksum.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageList {
    /// The packages.
    pub packages: Vec<Package>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// A package's bytes: a braid WebAssembly component (`braid package build`).
#[derive(Debug, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct PackageBytes(pub Vec<u8>);

/// Request: create a virtual node.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateVnode {
    /// Its identity, e.g. `O=Alice, L=London, C=GB`.
    pub x500_name: String,
    /// The package its flows run.
    pub package_checksum: String,
}

/// A virtual node.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Vnode {
    /// Short id, 12 hex digits.
    pub holding_id: String,
    /// Identity.
    pub x500_name: String,
    /// The package new flows run.
    pub package_checksum: String,
    /// Whether clients may start flows (see `PUT .../state`).
    pub flow_starts_enabled: bool,
}

/// A page of virtual nodes, by X.500 name.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VnodeList {
    /// The virtual nodes.
    pub virtual_nodes: Vec<Vnode>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The flows of a virtual node's package.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FlowInfoList {
    /// The flows.
    pub flows: Vec<FlowInfo>,
}

/// Request: the package a virtual node runs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetPackage {
    /// Checksum of an uploaded package.
    pub package_checksum: String,
}

/// Request: whether clients may start flows on a virtual node.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VnodeState {
    /// `false` pauses client flow starts; running flows carry on.
    pub flow_starts_enabled: bool,
}

/// Request: start a flow.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StartFlow {
    /// The client's id for this request, unique per virtual node; starting
    /// the same id again answers `409`.
    pub client_request_id: String,
    /// A startable flow of the virtual node's package.
    pub flow_name: String,
    /// The flow's input (any JSON); `null` when absent.
    #[schema(value_type = Option<Value>)]
    pub request_body: Option<Value>,
}

/// Why a flow failed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FlowError {
    /// The class, a stable code.
    #[serde(rename = "type")]
    pub kind: FailureKind,
    /// What happened.
    pub message: String,
}

/// A flow's status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// The virtual node it runs for.
    pub holding_id: String,
    /// The client's request id; `null` for responder flows.
    pub client_request_id: Option<String>,
    /// The flow's id.
    pub flow_id: String,
    /// The flow's name.
    pub flow_name: String,
    /// Status.
    pub status: FlowStatus,
    /// The flow's JSON result once `COMPLETED`, else `null`.
    #[schema(value_type = Option<Value>)]
    pub result: Option<Value>,
    /// Why it failed or was killed, else `null`.
    pub error: Option<FlowError>,
    /// When the status last changed (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub timestamp: String,
}

/// How a virtual node's unfinished flows fare when their journals are
/// replayed against another package.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeCheck {
    /// The package checked.
    pub package_checksum: String,
    /// Whether every flow replays cleanly.
    pub clean: bool,
    /// One per unfinished flow, oldest first.
    pub flows: Vec<FlowReplay>,
}

/// One flow's replay against the new package.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowReplay {
    /// The flow's id.
    pub flow_id: String,
    /// The client's request id; `null` for responder flows.
    pub client_request_id: Option<String>,
    /// The flow's name.
    pub flow_name: String,
    /// Its journal's length: the steps replayed.
    pub journal_steps: u32,
    /// `CLEAN` (the new code does what the journal says), `DIVERGES` (it
    /// called something else at `step`) or `FAILS` (it failed otherwise).
    pub verdict: String,
    /// `DIVERGES`: the journal entry where it diverged.
    pub step: Option<u32>,
    /// `DIVERGES` and `FAILS`: what happened.
    pub message: Option<String>,
}

/// What a flow did: its status, how it started, every journal entry in
/// order, and the same for each counterparty flow of its sessions that
/// runs on this node (and that the caller may read).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowJournal {
    /// The flow.
    pub flow: JournalView,
    /// The flows at the other end of its sessions that run on this node,
    /// in the order of its sessions.
    pub counterparties: Vec<JournalView>,
}

/// One flow's journal.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JournalView {
    /// The flow's status.
    pub status: Flow,
    /// How it started: by a client (with its request body) or by a
    /// session-init (from whom, under which protocol version).
    pub started: JournalStart,
    /// Every host call it made, in order.
    pub entries: Vec<JournalEntry>,
    /// For a failed or killed flow, the step it failed at: for
    /// `NON_DETERMINISM`, the entry where replaying with its code diverged
    /// from the journal; else the entry after the last one it completed.
    pub failed_at_step: Option<u32>,
}

/// How a flow started.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JournalStart {
    /// `CLIENT` or `SESSION_INIT`.
    pub by: String,
    /// A client's JSON request body.
    #[schema(value_type = Option<Value>)]
    pub request_body: Option<Value>,
    /// A responder's initiator (X.500 name).
    pub initiator: Option<String>,
    /// A responder's protocol.
    pub protocol: Option<String>,
    /// A responder's agreed protocol version.
    pub version: Option<u32>,
}

/// One journal entry: a host call and what it returned.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JournalEntry {
    /// Its position, from 0.
    pub step: u32,
    /// The call: `initiate`, `send`, `receive`, `receive-any`, `close`,
    /// `sleep`, `now-millis` or `random-bytes`.
    pub call: String,
    /// The session it concerns (its handle in this flow); for
    /// `receive-any`, the one that answered.
    pub session: Option<u64>,
    /// `receive-any`: the sessions it waited on.
    pub sessions: Option<Vec<u64>>,
    /// `initiate`: the counterparty as the flow named it.
    pub counterparty: Option<String>,
    /// `initiate`: the protocol.
    pub protocol: Option<String>,
    /// `initiate`: the versions offered.
    pub versions: Option<Vec<u32>>,
    /// `send` and `receive`: the payload's size in bytes (`null` for sends
    /// journaled before sizes were).
    pub bytes: Option<u64>,
    /// `receive`: the payload, hex.
    pub payload_hex: Option<String>,
    /// `receive`: the payload as text, when all of it is printable UTF-8.
    pub payload_text: Option<String>,
    /// `send`: the payload's digest (FNV-1a, hex), as replay checks it.
    pub digest: Option<String>,
    /// `sleep`: when it ends; `now-millis`: the time returned; `receive`:
    /// when it returned (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub at: Option<String>,
    /// `random-bytes`: the bytes returned, hex.
    pub random_hex: Option<String>,
    /// Why the call failed (a session error), if it did.
    pub error: Option<String>,
}

/// A page of a virtual node's flows, oldest first. With a status filter a
/// page may hold fewer than `limit` flows (even none) and still have a
/// `nextCursor`: follow it until it is `null`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowList {
    /// The flows (responders included), oldest first.
    pub flows: Vec<Flow>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Liveness and readiness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `UP`, or `DEGRADED` while the store is failing (the node answers
    /// and recovers by itself).
    pub status: String,
    /// Whether the node can take requests that write (the readiness
    /// signal; `GET /api/v1/health/ready` answers 503 when not).
    pub ready: bool,
    /// Flows with a wasm instance now.
    pub live_flows: u64,
    /// Flows not yet ended.
    pub flows: u64,
    /// The store.
    pub store: StoreState,
}

/// How the store is doing.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreState {
    /// `UP`, or `FAILING` (e.g. the disk is full): writes are refused with
    /// 503 and the store retries until they go through again.
    pub status: String,
    /// The last failure while `FAILING`.
    pub error: Option<String>,
    /// Since when it is in this state (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub since: String,
}

/// When a password stops being accepted: an RFC 3339 date-time or
/// milliseconds since 1970.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PasswordExpiry {
    /// RFC 3339, e.g. `2030-01-31T00:00:00Z`, until the end of year 9999.
    #[schema(format = DateTime)]
    DateTime(String),
    /// Milliseconds since 1970-01-01, at most 9999-12-31T23:59:59.999Z.
    Millis(u64),
}

/// Request: create a user (with no roles).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateUser {
    /// 1-64 characters from `A-Z a-z 0-9 . _ @ -`.
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    pub login_name: String,
    /// At least 8 characters, at most 1024 bytes.
    #[schema(min_length = 8)]
    pub password: String,
    /// When the password expires; never when absent or `null`.
    pub password_expiry: Option<PasswordExpiry>,
}

/// Request: a new password.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetPassword {
    /// At least 8 characters, at most 1024 bytes.
    #[schema(min_length = 8)]
    pub password: String,
    /// When the password expires; never when absent or `null`.
    pub password_expiry: Option<PasswordExpiry>,
}

/// A user.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// Login name.
    pub login_name: String,
    /// Names of the roles held.
    pub roles: Vec<String>,
    /// When the password expires (RFC 3339), or `null`.
    #[schema(format = DateTime)]
    pub password_expiry: Option<String>,
    /// Whether it has expired.
    pub password_expired: bool,
    /// Creation time (RFC 3339).
    #[schema(format = DateTime)]
    pub created: String,
}

/// One page of users, by login name.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserList {
    /// The users.
    pub users: Vec<User>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Grant or forbid.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PermissionType {
    /// Grants the operations the pattern matches.
    Allow,
    /// Forbids them, whatever else allows them.
    Deny,
}

/// A permission: `ALLOW` or `DENY` with a glob (`*` = any run of
/// characters) over an operation, `"<METHOD> <path>"` or
/// `"flow:start:<holdingId>:<flowName>"`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Permission {
    /// Grant or forbid.
    pub permission_type: PermissionType,
    /// 1-512 printable characters, e.g. `GET /api/v1/flow/*`.
    #[schema(min_length = 1, max_length = 512)]
    pub pattern: String,
}

/// A user's permission and the role it comes from.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserPermission {
    /// The role granting it.
    pub role: String,
    /// Grant or forbid.
    pub permission_type: PermissionType,
    /// The glob.
    pub pattern: String,
}

/// A user's effective permissions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserPermissions {
    /// Login name.
    pub login_name: String,
    /// Names of the roles held.
    pub roles: Vec<String>,
    /// A page of the permissions of those roles, role by role.
    pub permissions: Vec<UserPermission>,
    /// Pass as `cursor` for the next page of permissions; `null` on the
    /// last page.
    pub next_cursor: Option<String>,
}

/// Role templates.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RoleTemplate {
    /// Start `flowNames` on `holdingIds` and read those vnodes and flows.
    FlowExecutor,
}

/// Request: create a role, from explicit permissions or a template.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateRole {
    /// 1-64 characters from `A-Z a-z 0-9 . _ @ -`.
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    pub role_name: String,
    /// A template; when set, `permissions` is ignored.
    pub template: Option<RoleTemplate>,
    /// The role's permissions (without a template); none when absent.
    #[schema(max_items = 1000)]
    pub permissions: Option<Vec<Permission>>,
    /// `FLOW_EXECUTOR`: the virtual nodes (required with the template).
    pub holding_ids: Option<Vec<String>>,
    /// `FLOW_EXECUTOR`: the flows, or `"*"` for every flow (required with
    /// the template).
    pub flow_names: Option<Vec<String>>,
}

/// A role.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Role {
    /// Name.
    pub role_name: String,
    /// Built-in roles can be neither deleted nor changed.
    pub built_in: bool,
    /// Permissions, in the order they were added.
    pub permissions: Vec<Permission>,
    /// Creation time (RFC 3339).
    #[schema(format = DateTime)]
    pub created: String,
}

/// One Server-Sent Event of a status stream: `event: status` with `data:`
/// a [`Flow`] as JSON, or `event: resync` (events were missed; re-read the
/// state) with `data:` a JSON object saying what to do. Every event has an
/// `id` to send back as `Last-Event-ID` when reconnecting.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusEvent {
    /// `status` or `resync`.
    #[schema(pattern = "^(status|resync)$")]
    pub event: String,
    /// The event's id, `<run>-<number>`.
    pub id: String,
    /// A `Flow` as JSON text (`status`), or `{"reason", "do"}` (`resync`).
    pub data: String,
}

/// One page of roles, by name.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleList {
    /// The roles.
    pub roles: Vec<Role>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn committed_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
    }

    #[test]
    fn openapi_committed_copy_is_current() {
        let generated = document_json();
        let path = committed_path();
        if std::env::var_os("BRAID_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json differs from the OpenAPI document the code generates \
             (an endpoint, parameter, status or schema changed). Regenerate it with\n\
             \n    BRAID_UPDATE_OPENAPI=1 cargo test -p braid-rest openapi\n\n\
             and commit the result."
        );
    }

    /// Routes are only added through `routes!` (which documents them): a
    /// plain axum `.route(` would serve an undocumented endpoint.
    #[test]
    fn openapi_routes_are_only_added_through_routes_macro() {
        for (file, text) in [
            ("lib.rs", include_str!("lib.rs")),
            ("rbac/handlers.rs", include_str!("rbac/handlers.rs")),
        ] {
            assert!(
                !text.contains(concat!(".route", "(")),
                "{file} adds a route with `.route(`: register it with \
                 `utoipa_axum::routes!` and annotate its handler with \
                 `#[utoipa::path]` so that it is in the OpenAPI document"
            );
        }
    }
}
