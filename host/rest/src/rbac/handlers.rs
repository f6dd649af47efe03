//! The `/api/v1/user` and `/api/v1/role` endpoints: input validation,
//! the changes (each checked by [`super::policy`] against the caller and
//! persisted through [`crate::Auth::update`]), and their JSON bodies.
//!
//! Authentication and the `"<METHOD> <path>"` check are done by the guard
//! layers in [`crate::router`]; the caller arrives as a [`Principal`].

use super::{Permission, PermissionType, RbacState, Role, User, policy};
use crate::auth::Principal;
use crate::openapi;
use crate::page::Page;
use crate::{ApiError, Ctx, body_error, parse_json, str_field, timestamp};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use braid_types::HoldingId;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Largest JSON body the user/role endpoints accept.
const MAX_BODY: usize = 64 << 10;
/// Shortest password accepted.
pub(crate) const MIN_PASSWORD: usize = 8;
/// Longest password accepted (bounds the hashing work per request).
pub(crate) const MAX_PASSWORD: usize = 1024;
/// Latest password expiry: 9999-12-31T23:59:59.999Z, ms since the epoch.
pub(crate) const MAX_EXPIRY_MS: u64 = 253_402_300_799_999;
/// Longest permission pattern.
const MAX_PATTERN: usize = 512;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Parses an RFC 3339 date-time (`2026-01-31T12:00:00Z`,
/// `2026-01-31T12:00:00.250+02:00`) into ms since the epoch; `None` for
/// anything else and for instants before 1970.
pub(crate) fn parse_rfc3339(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// Whether `s` can be a login or role name: 1-64 of `A-Z a-z 0-9 . _ @ -`.
pub(crate) fn is_valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

fn valid_name(kind: &str, s: &str) -> Result<(), ApiError> {
    if is_valid_name(s) {
        Ok(())
    } else {
        Err(ApiError::bad(
            "INVALID_NAME",
            format!("{kind} {s:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ @ -"),
        ))
    }
}

pub(crate) fn valid_password(p: &str) -> Result<(), ApiError> {
    if p.chars().count() < MIN_PASSWORD {
        return Err(ApiError::bad(
            "WEAK_PASSWORD",
            format!("the password must be at least {MIN_PASSWORD} characters long"),
        ));
    }
    if p.len() > MAX_PASSWORD {
        return Err(ApiError::bad(
            "INVALID_PASSWORD",
            format!("the password must be at most {MAX_PASSWORD} bytes long"),
        ));
    }
    Ok(())
}

/// `passwordExpiry`: absent/null, RFC 3339 string or ms since the epoch.
fn expiry_field(v: &Value) -> Result<Option<u64>, ApiError> {
    let bad = || {
        ApiError::bad(
            "INVALID_FIELD",
            "field \"passwordExpiry\" must be an RFC 3339 date-time \
             (e.g. \"2030-01-31T00:00:00Z\") or milliseconds since 1970",
        )
    };
    // Later instants would not render as RFC 3339 (four-digit years).
    let in_range = |ms: u64| (ms <= MAX_EXPIRY_MS).then_some(ms);
    match v.get("passwordExpiry") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_rfc3339(s)
            .and_then(in_range)
            .map(Some)
            .ok_or_else(bad),
        Some(Value::Number(n)) => n.as_u64().and_then(in_range).map(Some).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

fn permission_field(v: &Value) -> Result<Permission, ApiError> {
    let kind = match str_field(v, "permissionType")? {
        "ALLOW" => PermissionType::Allow,
        "DENY" => PermissionType::Deny,
        other => {
            return Err(ApiError::bad(
                "INVALID_FIELD",
                format!("permissionType {other:?} must be \"ALLOW\" or \"DENY\""),
            ));
        }
    };
    let pattern = str_field(v, "pattern")?;
    if pattern.is_empty() || pattern.len() > MAX_PATTERN || pattern.chars().any(char::is_control) {
        return Err(ApiError::bad(
            "INVALID_FIELD",
            format!(
                "pattern must be 1-{MAX_PATTERN} printable characters, e.g. \
                 \"GET /api/v1/flow/*\" or \"flow:start:<holdingId>:<flowName>\""
            ),
        ));
    }
    Ok(Permission {
        kind,
        pattern: pattern.to_owned(),
    })
}

fn string_list<'a>(v: &'a Value, name: &str) -> Result<Vec<&'a str>, ApiError> {
    let bad = || {
        ApiError::bad(
            "INVALID_FIELD",
            format!("field {name:?} must be a non-empty array of strings"),
        )
    };
    let arr = v
        .get(name)
        .ok_or_else(|| ApiError::bad("MISSING_FIELD", format!("field {name:?} is required")))?
        .as_array()
        .ok_or_else(bad)?;
    if arr.is_empty() || arr.len() > 1000 {
        return Err(bad());
    }
    arr.iter().map(|x| x.as_str().ok_or_else(bad)).collect()
}

/// The permissions of a `FLOW_EXECUTOR` role: start `flows` on `holdings`
/// and read those vnodes and their flows, nothing else.
fn flow_executor(v: &Value) -> Result<Vec<Permission>, ApiError> {
    let mut holdings = Vec::new();
    for h in string_list(v, "holdingIds")? {
        let id: HoldingId = h.parse().map_err(|e: braid_types::ParseError| {
            ApiError::bad("INVALID_HOLDING_ID", format!("holdingId {h:?}: {}", e.0))
        })?;
        holdings.push(id.to_string());
    }
    let flows = string_list(v, "flowNames")?;
    for f in &flows {
        let ok = *f == "*"
            || (f.len() <= 128
                && !f.is_empty()
                && f.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')));
        if !ok {
            return Err(ApiError::bad(
                "INVALID_FIELD",
                format!(
                    "flowName {f:?} is invalid: use a flow's name (A-Z a-z 0-9 . _ -) \
                     or \"*\" for every flow"
                ),
            ));
        }
    }
    let mut perms = Vec::new();
    for h in &holdings {
        perms.push(Permission::allow(format!("POST /api/v1/flow/{h}")));
        for f in &flows {
            perms.push(Permission::allow(format!("flow:start:{h}:{f}")));
        }
        perms.push(Permission::allow(format!("GET /api/v1/flow/{h}")));
        perms.push(Permission::allow(format!("GET /api/v1/flow/{h}/*")));
        perms.push(Permission::allow(format!("GET /api/v1/virtualnode/{h}")));
        perms.push(Permission::allow(format!("GET /api/v1/virtualnode/{h}/*")));
    }
    perms.dedup();
    Ok(perms)
}

// ---------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------

fn user_body(u: &User, now: u64) -> openapi::User {
    openapi::User {
        login_name: u.login.clone(),
        roles: u.roles.iter().cloned().collect(),
        password_expiry: u.password_expiry_ms.map(timestamp),
        password_expired: u.password_expiry_ms.is_some_and(|e| now >= e),
        created: timestamp(u.created_ms),
    }
}

fn permission_type(k: PermissionType) -> openapi::PermissionType {
    match k {
        PermissionType::Allow => openapi::PermissionType::Allow,
        PermissionType::Deny => openapi::PermissionType::Deny,
    }
}

fn role_body(r: &Role) -> openapi::Role {
    openapi::Role {
        role_name: r.name.clone(),
        built_in: r.builtin,
        permissions: r
            .permissions
            .iter()
            .map(|p| openapi::Permission {
                permission_type: permission_type(p.kind),
                pattern: p.pattern.clone(),
            })
            .collect(),
        created: timestamp(r.created_ms),
    }
}

fn not_found(what: &str, name: &str) -> ApiError {
    ApiError::not_found(format!("no {what} {name:?}"))
}

fn conflict(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "CONFLICT", m)
}

fn user<'a>(s: &'a RbacState, login: &str) -> Result<&'a User, ApiError> {
    s.users.get(login).ok_or_else(|| not_found("user", login))
}

fn user_mut<'a>(s: &'a mut RbacState, login: &str) -> Result<&'a mut User, ApiError> {
    s.users
        .get_mut(login)
        .ok_or_else(|| not_found("user", login))
}

fn role<'a>(s: &'a RbacState, name: &str) -> Result<&'a Role, ApiError> {
    s.roles.get(name).ok_or_else(|| not_found("role", name))
}

/// A role that may be changed (not built in).
fn custom_role<'a>(s: &'a RbacState, name: &str) -> Result<&'a Role, ApiError> {
    let r = role(s, name)?;
    if r.builtin {
        return Err(conflict(format!(
            "role {name:?} is built in and cannot be changed; create a role of your own"
        )));
    }
    Ok(r)
}

/// `?limit=&cursor=` of a list of names.
fn page(q: Result<Query<HashMap<String, String>>, QueryRejection>) -> Result<Page, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::bad(
            "INVALID_QUERY",
            format!("the query string is malformed: {e}; use ?limit=N&cursor=C"),
        )
    })?;
    Page::from_query(&q)
}

/// The entries of `map` after the page's cursor, in key order.
fn after<'a, V>(
    map: &'a std::collections::BTreeMap<String, V>,
    page: &Page,
) -> Result<impl Iterator<Item = (&'a String, &'a V)>, ApiError> {
    let start = match page.after_str()? {
        Some(k) => Bound::Excluded(k.to_owned()),
        None => Bound::Unbounded,
    };
    Ok(map.range((start, Bound::Unbounded)))
}

// ---------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------

/// The user and role endpoints.
pub(crate) fn routes() -> OpenApiRouter<Ctx> {
    OpenApiRouter::new()
        .routes(routes!(create_user, list_users))
        .routes(routes!(get_user, delete_user))
        .routes(routes!(set_password))
        .routes(routes!(grant_role, revoke_role))
        .routes(routes!(user_permissions))
        .routes(routes!(create_role, list_roles))
        .routes(routes!(get_role, delete_role))
        .routes(routes!(add_permission, remove_permission))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

type Body = Result<Bytes, BytesRejection>;

#[utoipa::path(
    post,
    path = "/api/v1/user",
    tag = "users",
    summary = "Create a user (with no roles)",
    request_body = openapi::CreateUser,
    responses(
        (status = 201, description = "Created", body = openapi::User),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 409, description = "The user exists", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable, or password hashing is busy (`AUTH_BUSY`); retry later", body = openapi::Problem),
    ),
)]
async fn create_user(State(c): State<Ctx>, body: Body) -> Result<Response, ApiError> {
    let v = parse_json(&body.map_err(body_error)?)?;
    let login = str_field(&v, "loginName")?.to_owned();
    valid_name("loginName", &login)?;
    let password = str_field(&v, "password")?.to_owned();
    valid_password(&password)?;
    let expiry = expiry_field(&v)?;
    if c.auth.snapshot().users.contains_key(&login) {
        return Err(conflict(format!("user {login:?} already exists")));
    }
    let hash = c.auth.hash_password(password).await?;
    let now = now_ms();
    let u = c
        .auth
        .update(|s| {
            if s.users.contains_key(&login) {
                return Err(conflict(format!("user {login:?} already exists")));
            }
            let u = User {
                login: login.clone(),
                hash: hash.clone(),
                password_expiry_ms: expiry,
                roles: BTreeSet::new(),
                created_ms: now,
            };
            s.users.insert(login.clone(), u.clone());
            Ok(u)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(user_body(&u, now))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/user",
    tag = "users",
    summary = "List users, by login name",
    params(crate::page::PageParams),
    responses(
        (status = 200, description = "One page of users", body = openapi::UserList),
        (status = 400, description = "Bad `limit` (`INVALID_LIMIT`) or `cursor` (`INVALID_CURSOR`)", body = openapi::Problem),
    ),
)]
async fn list_users(
    State(c): State<Ctx>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<openapi::UserList>, ApiError> {
    let page = page(q)?;
    let s = c.auth.snapshot();
    let now = now_ms();
    let (users, next_cursor) =
        page.take(after(&s.users, &page)?.map(|(k, u)| (k, user_body(u, now))));
    Ok(Json(openapi::UserList { users, next_cursor }))
}

#[utoipa::path(
    get,
    path = "/api/v1/user/{login}",
    tag = "users",
    summary = "Get a user",
    params(
        ("login" = String, Path, description = "Login name"),
    ),
    responses(
        (status = 200, description = "The user", body = openapi::User),
        (status = 404, description = "No such user", body = openapi::Problem),
    ),
)]
async fn get_user(
    State(c): State<Ctx>,
    Path(login): Path<String>,
) -> Result<Json<openapi::User>, ApiError> {
    let s = c.auth.snapshot();
    Ok(Json(user_body(user(&s, &login)?, now_ms())))
}

#[utoipa::path(
    delete,
    path = "/api/v1/user/{login}",
    tag = "users",
    summary = "Delete a user",
    params(
        ("login" = String, Path, description = "Login name"),
    ),
    responses(
        (status = 200, description = "Deleted; the user as it was", body = openapi::User),
        (status = 403, description = "The caller's roles do not allow this (`FORBIDDEN`), or the user holds a permission the caller does not (`PRIVILEGE_ESCALATION`)", body = openapi::Problem),
        (status = 404, description = "No such user", body = openapi::Problem),
        (status = 409, description = "The user is the last one holding the Admin role (`LAST_ADMIN`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
async fn delete_user(
    State(c): State<Ctx>,
    actor: Principal,
    Path(login): Path<String>,
) -> Result<Json<openapi::User>, ApiError> {
    let u = c
        .auth
        .update(|s| {
            user(s, &login)?;
            policy::may_change_user(s, &actor.login, &login, "delete")?;
            s.users
                .remove(&login)
                .ok_or_else(|| not_found("user", &login))
        })
        .await?;
    Ok(Json(user_body(&u, now_ms())))
}

#[utoipa::path(
    put,
    path = "/api/v1/user/{login}/password",
    tag = "users",
    summary = "Set a user's password and its expiry (everyone may set their own password)",
    params(
        ("login" = String, Path, description = "Login name"),
    ),
    request_body = openapi::SetPassword,
    responses(
        (status = 200, description = "Changed", body = openapi::User),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 403, description = "The caller's roles do not allow this (`FORBIDDEN`), or the user holds a permission the caller does not (`PRIVILEGE_ESCALATION`). Everyone may change their own password; its expiry only with a role that allows this call", body = openapi::Problem),
        (status = 404, description = "No such user", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable, or password hashing is busy (`AUTH_BUSY`); retry later", body = openapi::Problem),
    ),
)]
async fn set_password(
    State(c): State<Ctx>,
    actor: Principal,
    Path(login): Path<String>,
    body: Body,
) -> Result<Json<openapi::User>, ApiError> {
    let v = parse_json(&body.map_err(body_error)?)?;
    let password = str_field(&v, "password")?.to_owned();
    valid_password(&password)?;
    let expiry = expiry_field(&v)?;
    let change = "set the password";
    let operation = format!("PUT /api/v1/user/{login}/password");
    let check = |s: &RbacState| {
        let target = user(s, &login)?;
        policy::may_change_user(s, &actor.login, &login, change)?;
        // Everyone may change their own password (the guard let them
        // through); the expiry is for those whose roles allow the call.
        if !s.allows(&actor.login, &operation) && target.password_expiry_ms != expiry {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                format!(
                    "user {:?} may change its own password but not its expiry: that needs \
                     permission for {operation}; leave passwordExpiry as it is ({}) or ask a \
                     user admin",
                    actor.login,
                    target
                        .password_expiry_ms
                        .map_or_else(|| "null".to_owned(), timestamp)
                ),
            ));
        }
        Ok(())
    };
    // Checked before the (costly) hashing, and again in the update.
    check(&c.auth.snapshot())?;
    let hash = c.auth.hash_password(password).await?;
    let u = c
        .auth
        .update(|s| {
            check(s)?;
            let u = user_mut(s, &login)?;
            u.hash = hash.clone();
            u.password_expiry_ms = expiry;
            Ok(u.clone())
        })
        .await?;
    Ok(Json(user_body(&u, now_ms())))
}

#[utoipa::path(
    put,
    path = "/api/v1/user/{login}/role/{role}",
    tag = "users",
    summary = "Grant a role to a user",
    params(
        ("login" = String, Path, description = "Login name"),
        ("role" = String, Path, description = "Role name"),
    ),
    responses(
        (status = 200, description = "Granted", body = openapi::User),
        (status = 403, description = "The caller's roles do not allow this (`FORBIDDEN`); or the role allows something the caller does not hold itself, or the user holds a permission the caller does not (`PRIVILEGE_ESCALATION`)", body = openapi::Problem),
        (status = 404, description = "No such user or role", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
async fn grant_role(
    State(c): State<Ctx>,
    actor: Principal,
    Path((login, role_name)): Path<(String, String)>,
) -> Result<Json<openapi::User>, ApiError> {
    let u = c
        .auth
        .update(|s| {
            let r = role(s, &role_name)?;
            user(s, &login)?;
            policy::may_grant(s, &actor.login, &login, r)?;
            let u = user_mut(s, &login)?;
            u.roles.insert(role_name.clone());
            Ok(u.clone())
        })
        .await?;
    Ok(Json(user_body(&u, now_ms())))
}

#[utoipa::path(
    delete,
    path = "/api/v1/user/{login}/role/{role}",
    tag = "users",
    summary = "Take a role from a user",
    params(
        ("login" = String, Path, description = "Login name"),
        ("role" = String, Path, description = "Role name"),
    ),
    responses(
        (status = 200, description = "Taken", body = openapi::User),
        (status = 403, description = "The caller's roles do not allow this (`FORBIDDEN`); or the user holds a permission the caller does not, or the role forbids something the caller is not allowed itself (`PRIVILEGE_ESCALATION`)", body = openapi::Problem),
        (status = 404, description = "No such user, or the user does not hold the role", body = openapi::Problem),
        (status = 409, description = "The user is the last one holding the Admin role (`LAST_ADMIN`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
async fn revoke_role(
    State(c): State<Ctx>,
    actor: Principal,
    Path((login, role_name)): Path<(String, String)>,
) -> Result<Json<openapi::User>, ApiError> {
    let u = c
        .auth
        .update(|s| {
            if !user(s, &login)?.roles.contains(&role_name) {
                return Err(not_found(
                    &format!("role of user {login:?} named"),
                    &role_name,
                ));
            }
            // A role deleted meanwhile has no permissions left to check.
            if let Some(r) = s.roles.get(&role_name) {
                policy::may_revoke(s, &actor.login, &login, r)?;
            }
            let u = user_mut(s, &login)?;
            u.roles.remove(&role_name);
            Ok(u.clone())
        })
        .await?;
    Ok(Json(user_body(&u, now_ms())))
}

#[utoipa::path(
    get,
    path = "/api/v1/user/{login}/permissions",
    tag = "users",
    summary = "A user's effective permissions (paginated)",
    params(
        ("login" = String, Path, description = "Login name"),
        crate::page::PageParams,
    ),
    responses(
        (status = 200, description = "A page of the permissions of every role the user holds", body = openapi::UserPermissions),
        (status = 400, description = "Bad `limit` (`INVALID_LIMIT`) or `cursor` (`INVALID_CURSOR`)", body = openapi::Problem),
        (status = 404, description = "No such user", body = openapi::Problem),
    ),
)]
async fn user_permissions(
    State(c): State<Ctx>,
    Path(login): Path<String>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Json<openapi::UserPermissions>, ApiError> {
    let page = crate::page::Page::from_query(&q)?;
    // Position in the list (role by role, in order), as 4 bytes.
    let after = page
        .after_bytes(4)?
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize);
    let s = c.auth.snapshot();
    let u = user(&s, &login)?;
    let items = s
        .permissions_of(&login)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| after.is_none_or(|a| *i > a))
        .map(|(i, (role, p))| {
            (
                (i as u32).to_be_bytes(),
                openapi::UserPermission {
                    role: role.to_owned(),
                    permission_type: permission_type(p.kind),
                    pattern: p.pattern.clone(),
                },
            )
        });
    let (permissions, next_cursor) = page.take(items);
    Ok(Json(openapi::UserPermissions {
        login_name: u.login.clone(),
        roles: u.roles.iter().cloned().collect(),
        permissions,
        next_cursor,
    }))
}

#[utoipa::path(
    post,
    path = "/api/v1/role",
    tag = "roles",
    summary = "Create a role",
    request_body = openapi::CreateRole,
    responses(
        (status = 201, description = "Created", body = openapi::Role),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 409, description = "The role exists", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
async fn create_role(State(c): State<Ctx>, body: Body) -> Result<Response, ApiError> {
    let v = parse_json(&body.map_err(body_error)?)?;
    let name = str_field(&v, "roleName")?.to_owned();
    valid_name("roleName", &name)?;
    let permissions = match v.get("template") {
        None | Some(Value::Null) => match v.get("permissions") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(ps)) if ps.len() <= 1000 => {
                ps.iter().map(permission_field).collect::<Result<_, _>>()?
            }
            Some(_) => {
                return Err(ApiError::bad(
                    "INVALID_FIELD",
                    "field \"permissions\" must be an array of \
                     {\"permissionType\": \"ALLOW\"|\"DENY\", \"pattern\": \"...\"}",
                ));
            }
        },
        Some(Value::String(t)) if t == "FLOW_EXECUTOR" => flow_executor(&v)?,
        Some(other) => {
            return Err(ApiError::bad(
                "INVALID_FIELD",
                format!("unknown template {other}; the only template is \"FLOW_EXECUTOR\""),
            ));
        }
    };
    let now = now_ms();
    // A new role is held by nobody: creating it gives nobody anything
    // (granting it is checked).
    let r = c
        .auth
        .update(|s| {
            if s.roles.contains_key(&name) {
                return Err(conflict(format!("role {name:?} already exists")));
            }
            let r = Role {
                name: name.clone(),
                permissions: permissions.clone(),
                builtin: false,
                created_ms: now,
            };
            s.roles.insert(name.clone(), r.clone());
            Ok(r)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(role_body(&r))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/role",
    tag = "roles",
    summary = "List roles, by name",
    params(crate::page::PageParams),
    responses(
        (status = 200, description = "One page of roles", body = openapi::RoleList),
        (status = 400, description = "Bad `limit` (`INVALID_LIMIT`) or `cursor` (`INVALID_CURSOR`)", body = openapi::Problem),
    ),
)]
async fn list_roles(
    State(c): State<Ctx>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<openapi::RoleList>, ApiError> {
    let page = page(q)?;
    let s = c.auth.snapshot();
    let (roles, next_cursor) = page.take(after(&s.roles, &page)?.map(|(k, r)| (k, role_body(r))));
    Ok(Json(openapi::RoleList { roles, next_cursor }))
}

#[utoipa::path(
    get,
    path = "/api/v1/role/{role}",
    tag = "roles",
    summary = "Get a role",
    params(
        ("role" = String, Path, description = "Role name"),
    ),
    responses(
        (status = 200, description = "The role", body = openapi::Role),
        (status = 404, description = "No such role", body = openapi::Problem),
    ),
)]
async fn get_role(
    State(c): State<Ctx>,
    Path(name): Path<String>,
) -> Result<Json<openapi::Role>, ApiError> {
    let s = c.auth.snapshot();
    Ok(Json(role_body(role(&s, &name)?)))
}

#[utoipa::path(
    delete,
    path = "/api/v1/role/{role}",
    tag = "roles",
    summary = "Delete a role no user holds",
    params(
        ("role" = String, Path, description = "Role name"),
    ),
    responses(
        (status = 200, description = "Deleted; the role as it was", body = openapi::Role),
        (status = 404, description = "No such role", body = openapi::Problem),
        (status = 409, description = "The role is built in or held by a user", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
async fn delete_role(
    State(c): State<Ctx>,
    Path(name): Path<String>,
) -> Result<Json<openapi::Role>, ApiError> {
    // Only a role nobody holds goes: deleting it takes nothing from anyone.
    let r = c
        .auth
        .update(|s| {
            custom_role(s, &name)?;
            let holders: Vec<&str> = s.holders(&name).collect();
            if !holders.is_empty() {
                return Err(conflict(format!(
                    "role {name:?} is held by {holders:?}; remove it from them first \
                     (DELETE /api/v1/user/<login>/role/{name})"
                )));
            }
            s.roles
                .remove(&name)
                .ok_or_else(|| not_found("role", &name))
        })
        .await?;
    Ok(Json(role_body(&r)))
}

/// Changes role `name` with `edit`, as `actor` may (see
/// [`policy::may_change_role`]).
async fn change_role(
    c: &Ctx,
    actor: &Principal,
    name: &str,
    mut edit: impl FnMut(&mut Role) -> Result<(), ApiError>,
) -> Result<Role, ApiError> {
    c.auth
        .update(|s| {
            let before = custom_role(s, name)?.clone();
            let mut after = before.clone();
            edit(&mut after)?;
            policy::may_change_role(s, &actor.login, &before, &after)?;
            s.roles.insert(name.to_owned(), after.clone());
            Ok(after)
        })
        .await
}

#[utoipa::path(
    post,
    path = "/api/v1/role/{role}/permission",
    tag = "roles",
    summary = "Add a permission to a role",
    params(
        ("role" = String, Path, description = "Role name"),
    ),
    request_body = openapi::Permission,
    responses(
        (status = 200, description = "Added (or already there)", body = openapi::Role),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 403, description = "The caller's roles do not allow this (`FORBIDDEN`); or the role (before or after) allows something the caller does not hold, or a holder of the role holds a permission the caller does not (`PRIVILEGE_ESCALATION`)", body = openapi::Problem),
        (status = 404, description = "No such role", body = openapi::Problem),
        (status = 409, description = "The role is built in", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
async fn add_permission(
    State(c): State<Ctx>,
    actor: Principal,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<openapi::Role>, ApiError> {
    let p = permission_field(&parse_json(&body.map_err(body_error)?)?)?;
    let r = change_role(&c, &actor, &name, |r| {
        if !r.permissions.contains(&p) {
            r.permissions.push(p.clone());
        }
        Ok(())
    })
    .await?;
    Ok(Json(role_body(&r)))
}

#[utoipa::path(
    delete,
    path = "/api/v1/role/{role}/permission",
    tag = "roles",
    summary = "Remove a permission from a role",
    params(
        ("role" = String, Path, description = "Role name"),
    ),
    request_body = openapi::Permission,
    responses(
        (status = 200, description = "Removed", body = openapi::Role),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = openapi::Problem),
        (status = 403, description = "The caller's roles do not allow this (`FORBIDDEN`); or the role allows something the caller does not hold, the removed `DENY` forbids something the caller is not allowed itself, or a holder of the role holds a permission the caller does not (`PRIVILEGE_ESCALATION`)", body = openapi::Problem),
        (status = 404, description = "No such role, or the role has no such permission", body = openapi::Problem),
        (status = 409, description = "The role is built in", body = openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = openapi::Problem),
    ),
)]
async fn remove_permission(
    State(c): State<Ctx>,
    actor: Principal,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<openapi::Role>, ApiError> {
    let p = permission_field(&parse_json(&body.map_err(body_error)?)?)?;
    let r = change_role(&c, &actor, &name, |r| {
        let before = r.permissions.len();
        r.permissions.retain(|q| q != &p);
        if r.permissions.len() == before {
            return Err(ApiError::not_found(format!(
                "role {name:?} has no permission {} {:?}",
                p.kind.as_str(),
                p.pattern
            )));
        }
        Ok(())
    })
    .await?;
    Ok(Json(role_body(&r)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flow_executor_is_scoped_to_its_vnodes_and_flows() {
        let a = "0123456789ab";
        let b = "ba9876543210";
        let perms = flow_executor(&json!({"holdingIds": [a], "flowNames": ["ping"]})).unwrap();
        let ok = |op: &str| super::super::decide(&perms, op);
        assert!(ok(&format!("POST /api/v1/flow/{a}")));
        assert!(ok(&format!("flow:start:{a}:ping")));
        assert!(ok(&format!("GET /api/v1/flow/{a}")));
        assert!(ok(&format!("GET /api/v1/flow/{a}/r1")));
        assert!(ok(&format!("GET /api/v1/virtualnode/{a}")));
        assert!(ok(&format!("GET /api/v1/virtualnode/{a}/flows")));
        assert!(!ok(&format!("flow:start:{a}:other")));
        assert!(!ok(&format!("POST /api/v1/flow/{b}")));
        assert!(!ok(&format!("flow:start:{b}:ping")));
        assert!(!ok(&format!("GET /api/v1/flow/{b}")));
        assert!(!ok(&format!("GET /api/v1/flow/{b}/r1")));
        assert!(!ok("GET /api/v1/virtualnode"));
        assert!(!ok("GET /api/v1/package"));
        assert!(!ok("POST /api/v1/user"));
        assert!(flow_executor(&json!({"holdingIds": ["nope"], "flowNames": ["ping"]})).is_err());
        assert!(flow_executor(&json!({"holdingIds": [a], "flowNames": ["pi*ng"]})).is_err());
        assert!(flow_executor(&json!({"holdingIds": [], "flowNames": ["ping"]})).is_err());
    }

    #[test]
    fn rfc3339_parses() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2025-11-25T00:00:00.123Z"),
            Some(1_764_028_800_123)
        );
        assert_eq!(
            parse_rfc3339("2025-11-25T02:00:00.123+02:00"),
            Some(1_764_028_800_123)
        );
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        assert_eq!(parse_rfc3339("2001-02-29T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2025-11-25"), None);
        assert_eq!(parse_rfc3339("2025-11-25T00:00:00"), None);
        assert_eq!(parse_rfc3339("2025-13-25T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2025-11-25T00:00:00.Z"), None);
        assert_eq!(parse_rfc3339("garbage-in-garbage-out"), None);
        assert_eq!(parse_rfc3339("2025-11-25T00:00:00Zé"), None);
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), None);
        for ms in [0, 951_782_400_000, 1_764_028_800_123] {
            assert_eq!(parse_rfc3339(&timestamp(ms)), Some(ms));
        }
    }

    #[test]
    fn password_expiry_stays_within_four_digit_years() {
        let e = |v: Value| expiry_field(&json!({ "passwordExpiry": v }));
        assert_eq!(e(json!(MAX_EXPIRY_MS)).unwrap(), Some(MAX_EXPIRY_MS));
        assert_eq!(timestamp(MAX_EXPIRY_MS), "9999-12-31T23:59:59.999Z");
        assert!(e(json!(MAX_EXPIRY_MS + 1)).is_err());
        assert!(e(json!(u64::MAX)).is_err());
        assert!(e(json!("9999-12-31T23:59:59-01:00")).is_err());
        assert_eq!(e(json!("1970-01-01T00:00:00Z")).unwrap(), Some(0));
        assert_eq!(e(Value::Null).unwrap(), None);
    }

    #[test]
    fn names_are_validated() {
        assert!(valid_name("loginName", "alice.smith@example-1_x").is_ok());
        assert!(valid_name("loginName", "").is_err());
        assert!(valid_name("loginName", "a b").is_err());
        assert!(valid_name("loginName", "a:b").is_err());
        assert!(valid_name("loginName", &"a".repeat(65)).is_err());
        assert!(valid_password("short").is_err());
        assert!(valid_password("long enough").is_ok());
    }
}
