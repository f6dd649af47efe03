//! Role-based access control: users, roles, permissions, the matcher that
//! decides whether an operation is allowed, the failed-login throttle, and
//! the `/api/v1/user` and `/api/v1/role` endpoints.
//!
//! An *operation* is a string: `"<METHOD> <path>"` for every request
//! (e.g. `GET /api/v1/flow/0123456789ab/r1`) and, for a flow start, also
//! `"flow:start:<holdingId>:<flowName>"`. A permission is `ALLOW` or `DENY`
//! with a glob pattern (`*` matches any run of characters) over the whole
//! operation. `DENY` wins; when nothing matches, the operation is denied.
//!
//! The whole state lives under one store meta key ([`STATE_KEY`]) and is
//! written through `Store::write` before an endpoint answers.

use crate::{ApiError, Ctx, body_error, parse_json, str_field, timestamp};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use braid_types::HoldingId;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The store meta key holding the serialized [`RbacState`].
pub(crate) const STATE_KEY: &str = "rbac/v1";
/// The user created on first start.
pub(crate) const ADMIN_USER: &str = "admin";
/// Built-in role: full access (`ALLOW *`), held by `admin`.
pub(crate) const ROLE_ADMIN: &str = "Admin";
/// Built-in role: manage users and roles.
pub(crate) const ROLE_USER_ADMIN: &str = "UserAdmin";
/// Built-in role: upload packages, create and manage virtual nodes.
pub(crate) const ROLE_VNODE_CREATOR: &str = "VNodeCreator";
/// Built-in role: `GET` anything under `/api/v1`.
pub(crate) const ROLE_READ_ONLY: &str = "ReadOnly";
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

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

/// Whether a permission grants or forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PermissionType {
    /// Grants operations matching the pattern.
    Allow,
    /// Forbids operations matching the pattern, whatever else allows them.
    Deny,
}

impl PermissionType {
    fn as_str(self) -> &'static str {
        match self {
            PermissionType::Allow => "ALLOW",
            PermissionType::Deny => "DENY",
        }
    }
}

/// `ALLOW`/`DENY` + a glob over the operation string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Permission {
    /// Grant or forbid.
    pub kind: PermissionType,
    /// Glob (`*` = any run of characters) over the whole operation.
    pub pattern: String,
}

impl Permission {
    fn allow(pattern: impl Into<String>) -> Permission {
        Permission {
            kind: PermissionType::Allow,
            pattern: pattern.into(),
        }
    }
    fn json(&self) -> Value {
        json!({"permissionType": self.kind.as_str(), "pattern": self.pattern})
    }
}

/// A named set of permissions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Name.
    pub name: String,
    /// Permissions, in the order they were added.
    pub permissions: Vec<Permission>,
    /// Built-in roles can be neither deleted nor changed.
    pub builtin: bool,
    /// Creation time, ms since epoch.
    pub created_ms: u64,
}

/// A user who may call the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Login name.
    pub login: String,
    /// Argon2id PHC string.
    pub hash: String,
    /// When the password stops being accepted, ms since epoch.
    pub password_expiry_ms: Option<u64>,
    /// Names of the roles held.
    pub roles: BTreeSet<String>,
    /// Creation time, ms since epoch.
    pub created_ms: u64,
}

/// Everything RBAC keeps durable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbacState {
    /// Users by login name.
    pub users: BTreeMap<String, User>,
    /// Roles by name.
    pub roles: BTreeMap<String, Role>,
}

fn builtin_roles(now: u64) -> Vec<Role> {
    let role = |name: &str, patterns: &[&str]| Role {
        name: name.into(),
        permissions: patterns.iter().map(|p| Permission::allow(*p)).collect(),
        builtin: true,
        created_ms: now,
    };
    vec![
        role(ROLE_ADMIN, &["*"]),
        role(
            ROLE_USER_ADMIN,
            &[
                "* /api/v1/user",
                "* /api/v1/user/*",
                "* /api/v1/role",
                "* /api/v1/role/*",
            ],
        ),
        role(
            ROLE_VNODE_CREATOR,
            &[
                "* /api/v1/package",
                "* /api/v1/package/*",
                "* /api/v1/virtualnode",
                "* /api/v1/virtualnode/*",
                "* /api/v1/maintenance/virtualnode/*",
            ],
        ),
        role(ROLE_READ_ONLY, &["GET /api/v1/*"]),
    ]
}

impl RbacState {
    /// A fresh state: the built-in roles and `admin` with `admin_hash`.
    pub(crate) fn bootstrap(admin_hash: String, now: u64) -> RbacState {
        let mut s = RbacState::default();
        s.ensure_builtins(now);
        s.users.insert(
            ADMIN_USER.into(),
            User {
                login: ADMIN_USER.into(),
                hash: admin_hash,
                password_expiry_ms: None,
                roles: [ROLE_ADMIN.to_string(), ROLE_USER_ADMIN.to_string()].into(),
                created_ms: now,
            },
        );
        s
    }

    /// Adds (or restores) the built-in roles; true when something changed.
    pub(crate) fn ensure_builtins(&mut self, now: u64) -> bool {
        let mut changed = false;
        for r in builtin_roles(now) {
            match self.roles.get(&r.name) {
                Some(old) if old.builtin && old.permissions == r.permissions => {}
                _ => {
                    self.roles.insert(r.name.clone(), r);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Every permission `login` holds, with the role it comes from.
    pub(crate) fn permissions_of(&self, login: &str) -> Vec<(&str, &Permission)> {
        let Some(user) = self.users.get(login) else {
            return Vec::new();
        };
        user.roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.permissions.iter().map(move |p| (r.name.as_str(), p)))
            .collect()
    }

    /// Whether `login` may perform `operation`.
    pub(crate) fn allows(&self, login: &str, operation: &str) -> bool {
        decide(
            self.permissions_of(login).into_iter().map(|(_, p)| p),
            operation,
        )
    }
}

/// `DENY` wins; no match means denied.
pub(crate) fn decide<'a>(perms: impl IntoIterator<Item = &'a Permission>, operation: &str) -> bool {
    let mut allowed = false;
    for p in perms {
        if glob(&p.pattern, operation) {
            match p.kind {
                PermissionType::Deny => return false,
                PermissionType::Allow => allowed = true,
            }
        }
    }
    allowed
}

/// Whether `text` matches `pattern` as a whole; `*` matches any run of
/// characters (including none, `/` and spaces). Linear-time greedy match
/// with backtracking to the last star only.
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

// ---------------------------------------------------------------------------
// Throttle
// ---------------------------------------------------------------------------

/// Failed logins allowed within [`Throttle::WINDOW_MS`] before a lock.
const MAX_FAILURES: usize = 5;

#[derive(Debug, Default)]
struct Failures {
    recent: Vec<u64>,
    locks: u32,
    locked_until: u64,
    last_failure: u64,
}

/// Per-user failed-login throttle on an explicit clock (ms). After
/// [`MAX_FAILURES`] failures within a minute the user is locked out for
/// 5 s; every further failure after a lock doubles it (up to 15 min). A
/// success forgets the user; so does 15 min without failures. Locks never
/// affect other users.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    users: HashMap<String, Failures>,
}

impl Throttle {
    const WINDOW_MS: u64 = 60_000;
    const BASE_LOCK_MS: u64 = 5_000;
    const MAX_LOCK_MS: u64 = 15 * 60_000;
    const FORGET_MS: u64 = 15 * 60_000;

    /// `Err(ms to wait)` while `user` is locked out.
    pub(crate) fn check(&self, user: &str, now: u64) -> Result<(), u64> {
        match self.users.get(user) {
            Some(f) if now < f.locked_until => Err(f.locked_until - now),
            _ => Ok(()),
        }
    }

    /// Records a failed login.
    pub(crate) fn failure(&mut self, user: &str, now: u64) {
        let f = self.users.entry(user.to_owned()).or_default();
        if now.saturating_sub(f.last_failure) > Self::FORGET_MS {
            *f = Failures::default();
        }
        f.last_failure = now;
        f.recent
            .retain(|&t| now.saturating_sub(t) < Self::WINDOW_MS);
        f.recent.push(now);
        if f.locks > 0 || f.recent.len() >= MAX_FAILURES {
            let lock = Self::BASE_LOCK_MS
                .saturating_mul(1 << f.locks.min(20))
                .min(Self::MAX_LOCK_MS);
            f.locks += 1;
            f.locked_until = now + lock;
            f.recent.clear();
        }
    }

    /// A successful login forgets earlier failures.
    pub(crate) fn success(&mut self, user: &str) {
        self.users.remove(user);
    }
}

// ---------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an RFC 3339 date-time (`2026-01-31T12:00:00Z`,
/// `2026-01-31T12:00:00.250+02:00`) into ms since the epoch.
pub(crate) fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mdays = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > mdays[(mo - 1) as usize] {
        return None;
    }
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 3)];
        frac_ms = digits.parse::<i64>().ok()? * 10i64.pow(3 - digits.len() as u32);
    }
    let offset_min = match &s[i..] {
        "Z" | "z" => 0,
        rest if rest.len() == 6 && matches!(rest.as_bytes()[0], b'+' | b'-') => {
            if rest.as_bytes()[3] != b':' {
                return None;
            }
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let sign = if rest.as_bytes()[0] == b'-' { -1 } else { 1 };
            sign * (oh * 60 + om)
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + frac_ms).ok()
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

fn valid_name(kind: &str, s: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    if ok {
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
// JSON
// ---------------------------------------------------------------------------

fn user_json(u: &User, now: u64) -> Value {
    json!({
        "loginName": u.login,
        "roles": u.roles,
        "passwordExpiry": u.password_expiry_ms.map(timestamp),
        "passwordExpired": u.password_expiry_ms.is_some_and(|e| now >= e),
        "created": timestamp(u.created_ms),
    })
}

fn role_json(r: &Role) -> Value {
    json!({
        "roleName": r.name,
        "builtIn": r.builtin,
        "permissions": r.permissions.iter().map(Permission::json).collect::<Vec<_>>(),
        "created": timestamp(r.created_ms),
    })
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

fn role_mut<'a>(s: &'a mut RbacState, name: &str) -> Result<&'a mut Role, ApiError> {
    let r = s
        .roles
        .get_mut(name)
        .ok_or_else(|| not_found("role", name))?;
    if r.builtin {
        return Err(conflict(format!(
            "role {name:?} is built in and cannot be changed; create a role of your own"
        )));
    }
    Ok(r)
}

// ---------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------

/// The user and role endpoints. Authentication and the method+path check
/// are done by the guard layer in `router()`.
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
    request_body = crate::openapi::CreateUser,
    responses(
        (status = 201, description = "Created", body = crate::openapi::User),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = crate::openapi::Problem),
        (status = 409, description = "The user exists", body = crate::openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = crate::openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = crate::openapi::Problem),
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
    let hash = crate::auth::hash_password(password).await?;
    let now = now_ms();
    let u = c
        .auth
        .update(|s| {
            if s.users.contains_key(&login) {
                return Err(conflict(format!("user {login:?} already exists")));
            }
            let u = User {
                login: login.clone(),
                hash,
                password_expiry_ms: expiry,
                roles: BTreeSet::new(),
                created_ms: now,
            };
            s.users.insert(login.clone(), u.clone());
            Ok(u)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(user_json(&u, now))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/user",
    tag = "users",
    summary = "List users",
    responses(
        (status = 200, description = "Every user", body = crate::openapi::UserList),
    ),
)]
async fn list_users(State(c): State<Ctx>) -> Json<Value> {
    let s = c.auth.snapshot();
    let now = now_ms();
    let users: Vec<Value> = s.users.values().map(|u| user_json(u, now)).collect();
    Json(json!({ "users": users }))
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
        (status = 200, description = "The user", body = crate::openapi::User),
        (status = 404, description = "No such user", body = crate::openapi::Problem),
    ),
)]
async fn get_user(
    State(c): State<Ctx>,
    Path(login): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = c.auth.snapshot();
    Ok(Json(user_json(user(&s, &login)?, now_ms())))
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
        (status = 200, description = "Deleted; the user as it was", body = crate::openapi::User),
        (status = 404, description = "No such user", body = crate::openapi::Problem),
        (status = 409, description = "The built-in admin user cannot be deleted", body = crate::openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = crate::openapi::Problem),
    ),
)]
async fn delete_user(
    State(c): State<Ctx>,
    Path(login): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if login == ADMIN_USER {
        return Err(conflict(
            "the built-in admin user cannot be deleted; change its password instead",
        ));
    }
    let u = c
        .auth
        .update(|s| {
            s.users
                .remove(&login)
                .ok_or_else(|| not_found("user", &login))
        })
        .await?;
    Ok(Json(user_json(&u, now_ms())))
}

#[utoipa::path(
    put,
    path = "/api/v1/user/{login}/password",
    tag = "users",
    summary = "Set a user's password and its expiry",
    params(
        ("login" = String, Path, description = "Login name"),
    ),
    request_body = crate::openapi::SetPassword,
    responses(
        (status = 200, description = "Changed", body = crate::openapi::User),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = crate::openapi::Problem),
        (status = 404, description = "No such user", body = crate::openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = crate::openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = crate::openapi::Problem),
    ),
)]
async fn set_password(
    State(c): State<Ctx>,
    Path(login): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let v = parse_json(&body.map_err(body_error)?)?;
    let password = str_field(&v, "password")?.to_owned();
    valid_password(&password)?;
    let expiry = expiry_field(&v)?;
    user(&c.auth.snapshot(), &login)?;
    let hash = crate::auth::hash_password(password).await?;
    let u = c
        .auth
        .update(|s| {
            let u = user_mut(s, &login)?;
            u.hash = hash;
            u.password_expiry_ms = expiry;
            Ok(u.clone())
        })
        .await?;
    Ok(Json(user_json(&u, now_ms())))
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
        (status = 200, description = "Granted", body = crate::openapi::User),
        (status = 404, description = "No such user or role", body = crate::openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = crate::openapi::Problem),
    ),
)]
async fn grant_role(
    State(c): State<Ctx>,
    Path((login, role)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let u = c
        .auth
        .update(|s| {
            if !s.roles.contains_key(&role) {
                return Err(not_found("role", &role));
            }
            let u = user_mut(s, &login)?;
            u.roles.insert(role.clone());
            Ok(u.clone())
        })
        .await?;
    Ok(Json(user_json(&u, now_ms())))
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
        (status = 200, description = "Taken", body = crate::openapi::User),
        (status = 404, description = "No such user, or the user does not hold the role", body = crate::openapi::Problem),
        (status = 409, description = "The built-in admin user keeps its roles", body = crate::openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = crate::openapi::Problem),
    ),
)]
async fn revoke_role(
    State(c): State<Ctx>,
    Path((login, role)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if login == ADMIN_USER && (role == ROLE_ADMIN || role == ROLE_USER_ADMIN) {
        return Err(conflict(format!(
            "the built-in admin user always keeps role {role:?}"
        )));
    }
    let u = c
        .auth
        .update(|s| {
            let u = user_mut(s, &login)?;
            if !u.roles.remove(&role) {
                return Err(not_found(&format!("role of user {login:?} named"), &role));
            }
            Ok(u.clone())
        })
        .await?;
    Ok(Json(user_json(&u, now_ms())))
}

#[utoipa::path(
    get,
    path = "/api/v1/user/{login}/permissions",
    tag = "users",
    summary = "A user's effective permissions",
    params(
        ("login" = String, Path, description = "Login name"),
    ),
    responses(
        (status = 200, description = "The permissions of every role the user holds", body = crate::openapi::UserPermissions),
        (status = 404, description = "No such user", body = crate::openapi::Problem),
    ),
)]
async fn user_permissions(
    State(c): State<Ctx>,
    Path(login): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = c.auth.snapshot();
    let u = user(&s, &login)?;
    let perms: Vec<Value> = s
        .permissions_of(&login)
        .into_iter()
        .map(|(role, p)| json!({"role": role, "permissionType": p.kind.as_str(), "pattern": p.pattern}))
        .collect();
    Ok(Json(
        json!({"loginName": u.login, "roles": u.roles, "permissions": perms}),
    ))
}

#[utoipa::path(
    post,
    path = "/api/v1/role",
    tag = "roles",
    summary = "Create a role",
    request_body = crate::openapi::CreateRole,
    responses(
        (status = 201, description = "Created", body = crate::openapi::Role),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = crate::openapi::Problem),
        (status = 409, description = "The role exists", body = crate::openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = crate::openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = crate::openapi::Problem),
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
    let r = c
        .auth
        .update(|s| {
            if s.roles.contains_key(&name) {
                return Err(conflict(format!("role {name:?} already exists")));
            }
            let r = Role {
                name: name.clone(),
                permissions,
                builtin: false,
                created_ms: now,
            };
            s.roles.insert(name.clone(), r.clone());
            Ok(r)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(role_json(&r))).into_response())
}

#[utoipa::path(
    get,
    path = "/api/v1/role",
    tag = "roles",
    summary = "List roles",
    responses(
        (status = 200, description = "Every role", body = crate::openapi::RoleList),
    ),
)]
async fn list_roles(State(c): State<Ctx>) -> Json<Value> {
    let s = c.auth.snapshot();
    let roles: Vec<Value> = s.roles.values().map(role_json).collect();
    Json(json!({ "roles": roles }))
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
        (status = 200, description = "The role", body = crate::openapi::Role),
        (status = 404, description = "No such role", body = crate::openapi::Problem),
    ),
)]
async fn get_role(State(c): State<Ctx>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let s = c.auth.snapshot();
    let r = s.roles.get(&name).ok_or_else(|| not_found("role", &name))?;
    Ok(Json(role_json(r)))
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
        (status = 200, description = "Deleted; the role as it was", body = crate::openapi::Role),
        (status = 404, description = "No such role", body = crate::openapi::Problem),
        (status = 409, description = "The role is built in or held by a user", body = crate::openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = crate::openapi::Problem),
    ),
)]
async fn delete_role(
    State(c): State<Ctx>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let r = c
        .auth
        .update(|s| {
            role_mut(s, &name)?;
            let holders: Vec<&str> = s
                .users
                .values()
                .filter(|u| u.roles.contains(&name))
                .map(|u| u.login.as_str())
                .collect();
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
    Ok(Json(role_json(&r)))
}

#[utoipa::path(
    post,
    path = "/api/v1/role/{role}/permission",
    tag = "roles",
    summary = "Add a permission to a role",
    params(
        ("role" = String, Path, description = "Role name"),
    ),
    request_body = crate::openapi::Permission,
    responses(
        (status = 200, description = "Added (or already there)", body = crate::openapi::Role),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = crate::openapi::Problem),
        (status = 404, description = "No such role", body = crate::openapi::Problem),
        (status = 409, description = "The role is built in", body = crate::openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = crate::openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = crate::openapi::Problem),
    ),
)]
async fn add_permission(
    State(c): State<Ctx>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let p = permission_field(&parse_json(&body.map_err(body_error)?)?)?;
    let r = c
        .auth
        .update(|s| {
            let r = role_mut(s, &name)?;
            if !r.permissions.contains(&p) {
                r.permissions.push(p);
            }
            Ok(r.clone())
        })
        .await?;
    Ok(Json(role_json(&r)))
}

#[utoipa::path(
    delete,
    path = "/api/v1/role/{role}/permission",
    tag = "roles",
    summary = "Remove a permission from a role",
    params(
        ("role" = String, Path, description = "Role name"),
    ),
    request_body = crate::openapi::Permission,
    responses(
        (status = 200, description = "Removed", body = crate::openapi::Role),
        (status = 400, description = "Malformed JSON, a missing or invalid field", body = crate::openapi::Problem),
        (status = 404, description = "No such role, or the role has no such permission", body = crate::openapi::Problem),
        (status = 409, description = "The role is built in", body = crate::openapi::Problem),
        (status = 413, description = "The request body is too large (`BODY_TOO_LARGE`)", body = crate::openapi::Problem),
        (status = 503, description = "The store is unavailable; retry later", body = crate::openapi::Problem),
    ),
)]
async fn remove_permission(
    State(c): State<Ctx>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let p = permission_field(&parse_json(&body.map_err(body_error)?)?)?;
    let r = c
        .auth
        .update(|s| {
            let r = role_mut(s, &name)?;
            let before = r.permissions.len();
            r.permissions.retain(|q| q != &p);
            if r.permissions.len() == before {
                return Err(ApiError::not_found(format!(
                    "role {name:?} has no permission {} {:?}",
                    p.kind.as_str(),
                    p.pattern
                )));
            }
            Ok(r.clone())
        })
        .await?;
    Ok(Json(role_json(&r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kind: PermissionType, pattern: &str) -> Permission {
        Permission {
            kind,
            pattern: pattern.into(),
        }
    }
    use PermissionType::{Allow, Deny};

    #[test]
    fn globs_match_whole_operations() {
        assert!(glob("*", ""));
        assert!(glob("*", "GET /api/v1/flow/x"));
        assert!(glob("GET /api/v1/*", "GET /api/v1/flow/abc/def"));
        assert!(!glob("GET /api/v1/*", "POST /api/v1/flow/abc"));
        assert!(glob("* /api/v1/user", "DELETE /api/v1/user"));
        assert!(!glob("* /api/v1/user", "DELETE /api/v1/user/bob"));
        assert!(glob("GET /api/v1/flow/*/r1", "GET /api/v1/flow/abc/r1"));
        assert!(!glob("GET /api/v1/flow/*/r1", "GET /api/v1/flow/abc/r12"));
        assert!(glob("a*b*c", "aXXbYYbZc"));
        assert!(!glob("a*b*c", "aXXbYYbZ"));
        assert!(glob("flow:start:*:ping", "flow:start:0123456789ab:ping"));
        assert!(!glob(
            "flow:start:*:ping",
            "flow:start:0123456789ab:pingpong"
        ));
        assert!(!glob("exact", "exactly"));
        assert!(!glob("exactly", "exact"));
        assert!(glob("**", "x"));
    }

    #[test]
    fn deny_wins_and_no_match_denies() {
        let perms = [
            p(Allow, "GET /api/v1/*"),
            p(Deny, "GET /api/v1/flow/bbbbbbbbbbbb*"),
        ];
        assert!(decide(&perms, "GET /api/v1/flow/aaaaaaaaaaaa"));
        assert!(!decide(&perms, "GET /api/v1/flow/bbbbbbbbbbbb"));
        assert!(!decide(&perms, "GET /api/v1/flow/bbbbbbbbbbbb/r1"));
        assert!(!decide(&perms, "POST /api/v1/flow/aaaaaaaaaaaa"));
        assert!(!decide(&[], "GET /api/v1/health"));
        // Order does not matter.
        let reversed = [perms[1].clone(), perms[0].clone()];
        assert!(!decide(&reversed, "GET /api/v1/flow/bbbbbbbbbbbb"));
        assert!(decide(&reversed, "GET /api/v1/package"));
    }

    #[test]
    fn flow_executor_is_scoped_to_its_vnodes_and_flows() {
        let a = "0123456789ab";
        let b = "ba9876543210";
        let perms = flow_executor(&json!({"holdingIds": [a], "flowNames": ["ping"]})).unwrap();
        let ok = |op: &str| decide(&perms, op);
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
    fn builtin_roles() {
        let s = RbacState::bootstrap("hash".into(), 0);
        assert!(s.allows(ADMIN_USER, "DELETE /api/v1/anything"));
        assert!(s.allows(ADMIN_USER, "flow:start:0123456789ab:ping"));
        let ro = &s.roles[ROLE_READ_ONLY].permissions;
        assert!(decide(ro, "GET /api/v1/virtualnode"));
        assert!(!decide(ro, "POST /api/v1/virtualnode"));
        let vc = &s.roles[ROLE_VNODE_CREATOR].permissions;
        assert!(decide(vc, "POST /api/v1/package"));
        assert!(decide(vc, "POST /api/v1/virtualnode"));
        assert!(!decide(vc, "POST /api/v1/flow/0123456789ab"));
        let ua = &s.roles[ROLE_USER_ADMIN].permissions;
        assert!(decide(ua, "PUT /api/v1/user/bob/role/ReadOnly"));
        assert!(!decide(ua, "GET /api/v1/virtualnode"));
        assert!(!s.allows("nobody", "GET /api/v1/virtualnode"));
    }

    #[test]
    fn throttle_locks_one_user_with_growing_backoff() {
        let mut t = Throttle::default();
        let now = 1_000_000;
        for i in 0..4 {
            t.failure("x", now + i);
            assert!(
                t.check("x", now + i).is_ok(),
                "locked after {} failures",
                i + 1
            );
        }
        t.failure("x", now + 4);
        let wait = t.check("x", now + 5).unwrap_err();
        assert!(wait > 4_000 && wait <= 5_000, "first lock {wait} ms");
        // Other users are unaffected.
        assert!(t.check("y", now + 5).is_ok());
        // The lock ends; the next failure locks again, for longer.
        let later = now + 4 + 5_000;
        assert!(t.check("x", later).is_ok());
        t.failure("x", later);
        let wait2 = t.check("x", later).unwrap_err();
        assert_eq!(wait2, 10_000);
        // A success forgets everything.
        t.success("x");
        assert!(t.check("x", later).is_ok());
        t.failure("x", later + 1);
        assert!(t.check("x", later + 1).is_ok());
    }

    #[test]
    fn throttle_forgets_old_failures() {
        let mut t = Throttle::default();
        for i in 0..4 {
            t.failure("x", i * 1000);
        }
        // The window has moved on: these four are old.
        t.failure("x", 61_000 + 3000);
        assert!(t.check("x", 64_000).is_ok());
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
