//! Who may change which user or role.
//!
//! The endpoint guard already decided that the caller (the *actor*) may
//! call the endpoint at all. These rules decide whether the change itself
//! stays within what the actor holds, so that nobody ends up able to do
//! more than the actor could do itself:
//!
//! - granting a role needs the actor to hold every `ALLOW` of it;
//! - nothing about a user *more privileged* than the actor (one holding
//!   an `ALLOW` pattern the actor does not hold) may be changed: password,
//!   expiry, roles, existence; everyone may change their own password;
//! - taking a role away lifts its `DENY`s from the user, so the actor must
//!   hold each of them;
//! - changing a role needs the actor to hold every `ALLOW` of it before
//!   and after, to hold every `DENY` it removes, and no other holder of the
//!   role may be more privileged than the actor;
//! - no change may leave nobody holding the `Admin` role.
//!
//! "Holds" is [`matcher::holds`]: conservative, so a doubtful case is
//! refused.

use super::matcher::{self, Lack};
use super::{Permission, PermissionType, ROLE_ADMIN, RbacState, Role};
use crate::ApiError;
use axum::http::StatusCode;

/// At most this many lacking permissions are named in one message.
const NAMED: usize = 5;

fn escalation(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "PRIVILEGE_ESCALATION", message)
}

/// The permissions `login` has, from every role it holds.
fn perms_of<'a>(s: &'a RbacState, login: &str) -> Vec<&'a Permission> {
    s.permissions_of(login)
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// The permissions among `wanted` that `actor` does not hold, with why.
fn lacking<'a>(
    s: &RbacState,
    actor: &str,
    wanted: impl IntoIterator<Item = &'a Permission>,
) -> Vec<(&'a Permission, Lack)> {
    let have = perms_of(s, actor);
    let mut out: Vec<(&Permission, Lack)> = Vec::new();
    for p in wanted {
        if out.iter().any(|(q, _)| *q == p) {
            continue;
        }
        if let Err(why) = matcher::holds(have.iter().copied(), &p.pattern) {
            out.push((p, why));
        }
    }
    out
}

/// `ALLOW "x" (no ALLOW of its roles covers it), DENY "y" (...)`.
fn describe(actor: &str, lacks: &[(&Permission, Lack)]) -> String {
    let mut parts: Vec<String> = lacks
        .iter()
        .take(NAMED)
        .map(|(p, why)| {
            let why = match why {
                Lack::NotCovered => format!("no ALLOW of {actor:?}'s roles covers it"),
                Lack::Denied(d) => format!("{actor:?}'s own DENY {d:?} overlaps it"),
            };
            format!("{} {:?} ({why})", p.kind.as_str(), p.pattern)
        })
        .collect();
    if lacks.len() > NAMED {
        parts.push(format!("and {} more", lacks.len() - NAMED));
    }
    parts.join(", ")
}

/// Refuses unless `actor` holds every `ALLOW` of `target` (or is it).
fn not_more_privileged(
    s: &RbacState,
    actor: &str,
    target: &str,
    change: &str,
) -> Result<(), ApiError> {
    if actor == target {
        return Ok(());
    }
    let target_allows = perms_of(s, target)
        .into_iter()
        .filter(|p| p.kind == PermissionType::Allow);
    let lacks = lacking(s, actor, target_allows);
    if lacks.is_empty() {
        return Ok(());
    }
    Err(escalation(format!(
        "user {actor:?} may not {change}: user {target:?} holds {}, which {actor:?} does not \
         hold; only a user who holds every permission of another user may change it \
         (ask an administrator)",
        describe(actor, &lacks)
    )))
}

/// Setting `target`'s password or expiry, or deleting it.
pub(crate) fn may_change_user(
    s: &RbacState,
    actor: &str,
    target: &str,
    change: &str,
) -> Result<(), ApiError> {
    not_more_privileged(s, actor, target, &format!("{change} of user {target:?}"))
}

/// Granting `role` to `target`.
pub(crate) fn may_grant(
    s: &RbacState,
    actor: &str,
    target: &str,
    role: &Role,
) -> Result<(), ApiError> {
    let change = format!("grant role {:?} to user {target:?}", role.name);
    not_more_privileged(s, actor, target, &change)?;
    let allows = role
        .permissions
        .iter()
        .filter(|p| p.kind == PermissionType::Allow);
    let lacks = lacking(s, actor, allows);
    if lacks.is_empty() {
        return Ok(());
    }
    Err(escalation(format!(
        "user {actor:?} may not {change}: the role allows what {actor:?} does not hold \
         itself: {}; only a user who holds every permission of a role may grant it \
         (ask an administrator)",
        describe(actor, &lacks)
    )))
}

/// Taking `role` from `target`: its `DENY`s stop applying to `target`.
pub(crate) fn may_revoke(
    s: &RbacState,
    actor: &str,
    target: &str,
    role: &Role,
) -> Result<(), ApiError> {
    let change = format!("take role {:?} from user {target:?}", role.name);
    not_more_privileged(s, actor, target, &change)?;
    let denies = role
        .permissions
        .iter()
        .filter(|p| p.kind == PermissionType::Deny);
    let lacks = lacking(s, actor, denies);
    if lacks.is_empty() {
        return Ok(());
    }
    Err(escalation(format!(
        "user {actor:?} may not {change}: that lifts what the role forbids, which \
         {actor:?} is not allowed itself: {} (ask an administrator)",
        describe(actor, &lacks)
    )))
}

/// Changing role `before` into `after` (adding or removing permissions).
pub(crate) fn may_change_role(
    s: &RbacState,
    actor: &str,
    before: &Role,
    after: &Role,
) -> Result<(), ApiError> {
    let change = format!("change role {:?}", before.name);
    for holder in s.holders(&before.name) {
        not_more_privileged(s, actor, holder, &format!("{change}, which it holds"))?;
    }
    let allows = before
        .permissions
        .iter()
        .chain(&after.permissions)
        .filter(|p| p.kind == PermissionType::Allow);
    let lacks = lacking(s, actor, allows);
    if !lacks.is_empty() {
        return Err(escalation(format!(
            "user {actor:?} may not {change}: the role (before or after the change) allows \
             what {actor:?} does not hold itself: {}; only a user who holds every \
             permission of a role may change it (ask an administrator)",
            describe(actor, &lacks)
        )));
    }
    let lifted = before
        .permissions
        .iter()
        .filter(|p| p.kind == PermissionType::Deny && !after.permissions.contains(p));
    let lacks = lacking(s, actor, lifted);
    if !lacks.is_empty() {
        return Err(escalation(format!(
            "user {actor:?} may not {change}: removing what the role forbids needs \
             {actor:?} to be allowed it itself: {} (ask an administrator)",
            describe(actor, &lacks)
        )));
    }
    Ok(())
}

/// `409 LAST_ADMIN` when `after` leaves nobody holding `Admin` while
/// `before` had someone.
pub(crate) fn an_admin_remains(before: &RbacState, after: &RbacState) -> Result<(), ApiError> {
    let had = before.holders(ROLE_ADMIN).next().is_some();
    if !had || after.holders(ROLE_ADMIN).next().is_some() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "LAST_ADMIN",
        format!(
            "this would leave no user holding the {ROLE_ADMIN} role, and nobody could \
             manage the node any more; grant {ROLE_ADMIN} to another user first \
             (PUT /api/v1/user/<login>/role/{ROLE_ADMIN})"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::{ROLE_READ_ONLY, ROLE_USER_ADMIN, User};
    use super::*;
    use std::collections::BTreeSet;

    fn state() -> RbacState {
        let mut s = RbacState::bootstrap("h".into(), 0);
        for (login, roles) in [
            ("ua", &[ROLE_USER_ADMIN][..]),
            ("reader", &[ROLE_READ_ONLY][..]),
            ("plain", &[][..]),
        ] {
            s.users.insert(
                login.into(),
                User {
                    login: login.into(),
                    hash: "h".into(),
                    password_expiry_ms: None,
                    roles: roles.iter().map(|r| r.to_string()).collect(),
                    created_ms: 0,
                },
            );
        }
        s
    }

    fn role(name: &str, perms: &[(PermissionType, &str)]) -> Role {
        Role {
            name: name.into(),
            permissions: perms
                .iter()
                .map(|(kind, pattern)| Permission {
                    kind: *kind,
                    pattern: (*pattern).into(),
                })
                .collect(),
            builtin: false,
            created_ms: 0,
        }
    }

    fn code(r: Result<(), ApiError>) -> &'static str {
        r.err().map_or("OK", |e| e.code)
    }

    use PermissionType::{Allow, Deny};

    #[test]
    fn grants_need_every_allow_of_the_role() {
        let s = state();
        let admin = s.roles[ROLE_ADMIN].clone();
        let ro = s.roles[ROLE_READ_ONLY].clone();
        assert_eq!(
            code(may_grant(&s, "ua", "ua", &admin)),
            "PRIVILEGE_ESCALATION"
        );
        assert_eq!(
            code(may_grant(&s, "ua", "plain", &ro)),
            "PRIVILEGE_ESCALATION"
        );
        assert_eq!(code(may_grant(&s, "admin", "plain", &admin)), "OK");
        let inside = role("inside", &[(Allow, "GET /api/v1/user/*"), (Deny, "*")]);
        assert_eq!(code(may_grant(&s, "ua", "plain", &inside)), "OK");
        // To a more privileged user: refused even for a harmless role.
        assert_eq!(
            code(may_grant(&s, "ua", "reader", &inside)),
            "PRIVILEGE_ESCALATION"
        );
        let e = may_grant(&s, "ua", "ua", &admin).unwrap_err();
        assert!(e.message.contains(r#"ALLOW "*""#), "{}", e.message);
    }

    #[test]
    fn more_privileged_users_are_out_of_reach_but_oneself_is_not() {
        let s = state();
        let c = |actor, target| code(may_change_user(&s, actor, target, "set the password"));
        assert_eq!(c("ua", "admin"), "PRIVILEGE_ESCALATION");
        assert_eq!(c("ua", "reader"), "PRIVILEGE_ESCALATION");
        assert_eq!(c("ua", "plain"), "OK");
        assert_eq!(c("ua", "ua"), "OK");
        assert_eq!(c("plain", "plain"), "OK");
        assert_eq!(c("admin", "ua"), "OK");
        assert_eq!(c("reader", "ua"), "PRIVILEGE_ESCALATION");
        let e = may_change_user(&s, "ua", "admin", "set the password").unwrap_err();
        assert!(e.message.contains(r#"ALLOW "*""#), "{}", e.message);
    }

    #[test]
    fn revoking_lifts_denies_so_they_must_be_held() {
        let mut s = state();
        let fence = role("fence", &[(Deny, "DELETE /api/v1/user/*")]);
        s.roles.insert("fence".into(), fence.clone());
        s.users.get_mut("ua").unwrap().roles.insert("fence".into());
        assert_eq!(
            code(may_revoke(&s, "ua", "ua", &fence)),
            "PRIVILEGE_ESCALATION"
        );
        assert_eq!(code(may_revoke(&s, "admin", "ua", &fence)), "OK");
        let ro = s.roles[ROLE_READ_ONLY].clone();
        assert_eq!(
            code(may_revoke(&s, "ua", "reader", &ro)),
            "PRIVILEGE_ESCALATION"
        );
        assert_eq!(code(may_revoke(&s, "admin", "reader", &ro)), "OK");
    }

    #[test]
    fn role_changes_stay_within_what_the_actor_holds() {
        let mut s = state();
        let own = role("own", &[(Allow, "GET /api/v1/user/*")]);
        s.roles.insert("own".into(), own.clone());
        s.users.get_mut("ua").unwrap().roles.insert("own".into());
        let mut wider = own.clone();
        wider.permissions.push(Permission::allow("*"));
        assert_eq!(
            code(may_change_role(&s, "ua", &own, &wider)),
            "PRIVILEGE_ESCALATION"
        );
        let mut narrower = own.clone();
        narrower
            .permissions
            .push(Permission::allow("GET /api/v1/user/x*"));
        assert_eq!(code(may_change_role(&s, "ua", &own, &narrower)), "OK");
        // Removing a DENY the actor itself is subject to.
        let fenced = role("fenced", &[(Deny, "DELETE /api/v1/role/*")]);
        s.roles.insert("fenced".into(), fenced.clone());
        s.users.get_mut("ua").unwrap().roles.insert("fenced".into());
        let lifted = role("fenced", &[]);
        assert_eq!(
            code(may_change_role(&s, "ua", &fenced, &lifted)),
            "PRIVILEGE_ESCALATION"
        );
        assert_eq!(code(may_change_role(&s, "admin", &fenced, &lifted)), "OK");
        // A role admin holds is out of reach for a user admin.
        s.users.get_mut("admin").unwrap().roles.insert("own".into());
        assert_eq!(
            code(may_change_role(&s, "ua", &own, &narrower)),
            "PRIVILEGE_ESCALATION"
        );
    }

    #[test]
    fn the_last_admin_stays() {
        let before = state();
        let mut after = before.clone();
        after.users.get_mut("admin").unwrap().roles = BTreeSet::new();
        assert_eq!(code(an_admin_remains(&before, &after)), "LAST_ADMIN");
        let mut deleted = before.clone();
        deleted.users.remove("admin");
        assert_eq!(code(an_admin_remains(&before, &deleted)), "LAST_ADMIN");
        let mut two = before.clone();
        two.users
            .get_mut("ua")
            .unwrap()
            .roles
            .insert(ROLE_ADMIN.into());
        let mut one = two.clone();
        one.users.remove("admin");
        assert_eq!(code(an_admin_remains(&two, &one)), "OK");
        assert_eq!(code(an_admin_remains(&before, &before)), "OK");
    }
}
