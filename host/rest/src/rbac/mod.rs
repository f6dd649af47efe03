//! Role-based access control: users, roles and permissions.
//!
//! An *operation* is a string: `"<METHOD> <path>"` for every request
//! (e.g. `GET /api/v1/flow/0123456789ab/r1`) and, for a flow start, also
//! `"flow:start:<holdingId>:<flowName>"`. A permission is `ALLOW` or `DENY`
//! with a glob pattern (`*` matches any run of characters) over the whole
//! operation. `DENY` wins; when nothing matches, the operation is denied.
//!
//! The whole state lives under one store meta key ([`STATE_KEY`]) and is
//! written through `Store::write` before an endpoint answers.
//!
//! - this module: the model ([`RbacState`] and what it is made of);
//! - [`matcher`]: globs, and whether one pattern covers or meets another;
//! - [`policy`]: who may change which user or role (no privilege
//!   escalation, an Admin always remains);
//! - [`handlers`]: the `/api/v1/user` and `/api/v1/role` endpoints.

pub(crate) mod handlers;
pub(crate) mod matcher;
pub(crate) mod policy;

pub(crate) use handlers::routes;
pub(crate) use matcher::decide;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

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
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn allow(pattern: impl Into<String>) -> Permission {
        Permission {
            kind: PermissionType::Allow,
            pattern: pattern.into(),
        }
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

    /// Logins of the users holding `role`.
    pub(crate) fn holders<'a>(&'a self, role: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.users
            .values()
            .filter(move |u| u.roles.contains(role))
            .map(|u| u.login.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(s.holders(ROLE_ADMIN).collect::<Vec<_>>(), [ADMIN_USER]);
    }
}
