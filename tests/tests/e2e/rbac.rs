//! Users, roles and permissions: a flow executor for one vnode can neither
//! start nor read another vnode's flows; credentials are checked (401),
//! roles are enforced (403), failed logins are throttled (429) and expired
//! passwords are refused; nobody can grant or change more than they hold;
//! unknown paths are 404 after authentication; user and role lists are
//! paginated. Throttling under attack: `rbac_logins`.

use braid_e2e::{Api, DEADLINE, Node, Pkg, Resp, wait_until};
use serde_json::{Value, json};

use crate::{ALICE, BOB, assert_ping_ok, ping_body};

/// A request as `user` (not admin).
pub(crate) fn as_user(
    api: &Api,
    user: &str,
    password: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Resp {
    let method: reqwest::Method = method.parse().expect("method");
    let mut req = api
        .client()
        .request(method, api.url(path))
        .basic_auth(user, Some(password));
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp { status, text, json }
}

pub(crate) fn create_user(api: &Api, login: &str, password: &str, roles: &[&str]) {
    api.post_json(
        "/api/v1/user",
        &json!({"loginName": login, "password": password}),
    )
    .expect("create user")
    .expect_status(&[201], &format!("create user {login}"));
    for role in roles {
        api.put_json(&format!("/api/v1/user/{login}/role/{role}"), &json!({}))
            .expect("grant role")
            .expect_status(&[200], &format!("grant {role} to {login}"));
    }
}

#[track_caller]
fn expect_forbidden(r: &Resp, operation: &str, what: &str) {
    r.expect_problem(&[403], what);
    assert_eq!(r.json["code"], "FORBIDDEN", "{what}: {}", r.text);
    let message = r.json["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(operation),
        "{what}: the 403 should name the operation {operation:?}: {message}"
    );
}

#[test]
fn a_flow_executor_can_neither_start_nor_read_another_vnodes_flows() {
    let node = Node::start();
    let api = node.api().clone();
    let a = node.vnode(ALICE, Pkg::Ping);
    let b = node.vnode(BOB, Pkg::Ping);

    // A flow on B, started by admin, that the executor must not see.
    api.start_flow(&b, "b-1", "ping", &ping_body(ALICE, 1, 0));
    assert_ping_ok(&api.wait_terminal(&b, "b-1"), 1, ALICE);

    let r = api
        .post_json(
            "/api/v1/role",
            &json!({"roleName": "alice-ping", "template": "FLOW_EXECUTOR",
                    "holdingIds": [a], "flowNames": ["ping"]}),
        )
        .unwrap();
    r.expect_status(&[201], "create FLOW_EXECUTOR role");
    let pw = "executor-password";
    create_user(&api, "exec", pw, &["alice-ping"]);

    // Allowed: start ping on A and follow it to completion.
    let start = |h: &str, crid: &str, flow: &str| {
        as_user(
            &api,
            "exec",
            pw,
            "POST",
            &format!("/api/v1/flow/{h}"),
            Some(&json!({"clientRequestId": crid, "flowName": flow,
                         "requestBody": ping_body(BOB, 7, 0)})),
        )
    };
    start(&a, "a-1", "ping").expect_status(&[202], "executor starts ping on A");
    let done = wait_until("the executor's ping to finish", DEADLINE, || {
        let r = as_user(
            &api,
            "exec",
            pw,
            "GET",
            &format!("/api/v1/flow/{a}/a-1"),
            None,
        );
        if r.status != 200 {
            return Err(format!("status {}: {}", r.status, r.text));
        }
        match r.json["status"].as_str() {
            Some("COMPLETED") => Ok(r.json.clone()),
            s => Err(format!("status {s:?}")),
        }
    });
    assert_eq!(done["result"], json!({"n": 8, "responder": BOB}));
    as_user(&api, "exec", pw, "GET", &format!("/api/v1/flow/{a}"), None)
        .expect_status(&[200], "executor lists A's flows");
    as_user(
        &api,
        "exec",
        pw,
        "GET",
        &format!("/api/v1/virtualnode/{a}"),
        None,
    )
    .expect_status(&[200], "executor reads vnode A");

    // Refused: anything on B, other flows on A, and the vnode listing.
    expect_forbidden(
        &start(&b, "b-2", "ping"),
        &format!("POST /api/v1/flow/{b}"),
        "executor starts ping on B",
    );
    expect_forbidden(
        &start(&a, "a-2", "other"),
        &format!("flow:start:{a}:other"),
        "executor starts another flow on A",
    );
    expect_forbidden(
        &as_user(
            &api,
            "exec",
            pw,
            "GET",
            &format!("/api/v1/flow/{b}/b-1"),
            None,
        ),
        &format!("GET /api/v1/flow/{b}/b-1"),
        "executor reads a flow of B",
    );
    expect_forbidden(
        &as_user(&api, "exec", pw, "GET", &format!("/api/v1/flow/{b}"), None),
        &format!("GET /api/v1/flow/{b}"),
        "executor lists B's flows",
    );
    // Percent-escapes do not sneak past the check.
    let escaped = format!("/api/v1/flow/%{:02X}{}", b.as_bytes()[0], &b[1..]);
    as_user(&api, "exec", pw, "GET", &escaped, None)
        .expect_problem(&[403], "executor lists B's flows with an escaped path");
    expect_forbidden(
        &as_user(&api, "exec", pw, "GET", "/api/v1/virtualnode", None),
        "GET /api/v1/virtualnode",
        "executor lists vnodes",
    );
    expect_forbidden(
        &as_user(&api, "exec", pw, "POST", "/api/v1/user", Some(&json!({}))),
        "POST /api/v1/user",
        "executor creates a user",
    );
    // Nothing was started by the refused requests.
    assert!(api.try_status(&b, "b-2").unwrap().is_none());
    assert!(api.try_status(&a, "a-2").unwrap().is_none());

    // The effective permissions are visible to an admin.
    let r = api.get("/api/v1/user/exec/permissions").unwrap();
    r.expect_status(&[200], "effective permissions");
    let perms = r.json["permissions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        perms
            .iter()
            .any(|p| p["pattern"] == format!("flow:start:{a}:ping")),
        "effective permissions lack the flow start: {}",
        r.text
    );
}

#[test]
fn credentials_roles_throttling_and_expiry() {
    let node = Node::start();
    let api = node.api().clone();
    let health = "/api/v1/health";
    let vnodes = "/api/v1/virtualnode";

    // Health is open; everything else needs credentials.
    let r = api.client().get(api.url(health)).send().unwrap();
    assert_eq!(r.status().as_u16(), 200, "health without credentials");
    let r = api.client().get(api.url(vnodes)).send().unwrap();
    assert_eq!(r.status().as_u16(), 401, "no credentials");

    create_user(&api, "nobody", "nobody-password", &[]);
    create_user(&api, "reader", "reader-password", &["ReadOnly"]);
    create_user(&api, "victim", "victim-password", &["ReadOnly"]);

    // Bad input to the user and role endpoints: 4xx problems.
    let bad = [
        (
            json!({"loginName": "reader", "password": "long-enough"}),
            409,
        ),
        (
            json!({"loginName": "bad name", "password": "long-enough"}),
            400,
        ),
        (json!({"loginName": "shorty", "password": "short"}), 400),
        (
            json!({"loginName": "x", "password": "long-enough", "passwordExpiry": "soon"}),
            400,
        ),
        (json!({"password": "long-enough"}), 400),
    ];
    for (body, status) in bad {
        api.post_json("/api/v1/user", &body)
            .unwrap()
            .expect_problem(&[status], &format!("create user {body}"));
    }
    api.put_json("/api/v1/user/ghost/role/ReadOnly", &json!({}))
        .unwrap()
        .expect_problem(&[404], "role for an unknown user");
    api.put_json("/api/v1/user/reader/role/NoSuchRole", &json!({}))
        .unwrap()
        .expect_problem(&[404], "unknown role");
    api.send(|c| c.delete(api.url("/api/v1/role/ReadOnly")))
        .unwrap()
        .expect_problem(&[409], "delete a built-in role");

    let wrong = as_user(&api, "reader", "not-the-password", "GET", vnodes, None);
    wrong.expect_problem(&[401], "wrong password");
    let unknown = as_user(&api, "mallory", "whatever-password", "GET", vnodes, None);
    unknown.expect_problem(&[401], "unknown user");

    expect_forbidden(
        &as_user(&api, "nobody", "nobody-password", "GET", vnodes, None),
        "GET /api/v1/virtualnode",
        "user without roles",
    );
    for path in [
        vnodes,
        "/api/v1/package",
        "/api/v1/role",
        "/api/v1/user/reader",
    ] {
        as_user(&api, "reader", "reader-password", "GET", path, None)
            .expect_status(&[200], &format!("read-only GET {path}"));
    }
    expect_forbidden(
        &as_user(
            &api,
            "reader",
            "reader-password",
            "POST",
            vnodes,
            Some(&json!({"x500Name": ALICE, "packageChecksum": "00"})),
        ),
        "POST /api/v1/virtualnode",
        "read-only POST",
    );

    // Throttling: the victim's password is guessed; the victim is locked
    // out, the reader is not.
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(as_user(&api, "victim", "guess-password", "GET", vnodes, None).status);
    }
    assert_eq!(&statuses[..5], &[401; 5], "first guesses: {statuses:?}");
    assert_eq!(&statuses[5..], &[429; 2], "later guesses: {statuses:?}");
    let r = as_user(&api, "victim", "victim-password", "GET", vnodes, None);
    r.expect_problem(&[429], "the right password while locked out");
    as_user(&api, "reader", "reader-password", "GET", vnodes, None)
        .expect_status(&[200], "another user while the victim is locked out");

    // A password change takes effect at once (the credential cache forgets
    // the old one).
    api.put_json(
        "/api/v1/user/reader/password",
        &json!({"password": "reader-password-2"}),
    )
    .unwrap()
    .expect_status(&[200], "reset reader's password");
    as_user(&api, "reader", "reader-password", "GET", vnodes, None)
        .expect_problem(&[401], "the old password after a reset");
    as_user(&api, "reader", "reader-password-2", "GET", vnodes, None)
        .expect_status(&[200], "the new password");

    // Expired password: refused with a message that says what to do.
    api.post_json(
        "/api/v1/user",
        &json!({"loginName": "old", "password": "old-password",
                "passwordExpiry": "2001-01-01T00:00:00Z"}),
    )
    .unwrap()
    .expect_status(&[201], "create a user with an expired password");
    api.put_json("/api/v1/user/old/role/ReadOnly", &json!({}))
        .unwrap()
        .expect_status(&[200], "grant ReadOnly");
    let r = as_user(&api, "old", "old-password", "GET", vnodes, None);
    r.expect_problem(&[401], "expired password");
    let message = r.json["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("expired") && message.contains("administrator"),
        "the expiry message should say the password expired and who can reset it: {message}"
    );
    // An admin resets it with a future expiry: the user is back.
    api.put_json(
        "/api/v1/user/old/password",
        &json!({"password": "new-password", "passwordExpiry": "2999-01-01T00:00:00Z"}),
    )
    .unwrap()
    .expect_status(&[200], "reset the expired password");
    as_user(&api, "old", "new-password", "GET", vnodes, None)
        .expect_status(&[200], "after the reset");

    // Deleting a user ends its access.
    api.send(|c| c.delete(api.url("/api/v1/user/nobody")))
        .unwrap()
        .expect_status(&[200], "delete user");
    as_user(&api, "nobody", "nobody-password", "GET", vnodes, None)
        .expect_problem(&[401], "a deleted user");
}

#[track_caller]
fn expect_escalation(r: &Resp, lacking: &str, what: &str) {
    r.expect_problem(&[403], what);
    assert_eq!(r.json["code"], "PRIVILEGE_ESCALATION", "{what}: {}", r.text);
    let message = r.json["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("{lacking:?}")),
        "{what}: the 403 should name the permission {lacking:?} the caller lacks: {message}"
    );
}

fn create_role(api: &Api, name: &str, permissions: &[(&str, &str)]) {
    let permissions: Vec<Value> = permissions
        .iter()
        .map(|(kind, pattern)| json!({"permissionType": kind, "pattern": pattern}))
        .collect();
    api.post_json(
        "/api/v1/role",
        &json!({"roleName": name, "permissions": permissions}),
    )
    .expect("create role")
    .expect_status(&[201], &format!("create role {name}"));
}

/// A user admin may hand out only what it holds itself and may not touch
/// users who hold more; role changes cannot widen what anyone holds; the
/// last Admin cannot go.
#[test]
fn nobody_can_grant_or_take_more_than_they_hold() {
    let node = Node::start();
    let admin = node.api().clone();
    let pw = "user-admin-password";
    create_user(&admin, "ua", pw, &["UserAdmin"]);
    create_user(&admin, "reader", "reader-password", &["ReadOnly"]);
    create_user(&admin, "plain", "plain-password", &[]);
    let ua = admin.as_user("ua", pw);

    // Roles it does not hold: refused, naming a permission it lacks.
    for (role, lacking) in [
        ("Admin", "*"),
        ("ReadOnly", "GET /api/v1/*"),
        ("VNodeCreator", "* /api/v1/package"),
    ] {
        for target in ["ua", "plain"] {
            let r = ua
                .put_json(&format!("/api/v1/user/{target}/role/{role}"), &json!({}))
                .unwrap();
            expect_escalation(
                &r,
                lacking,
                &format!("user admin grants {role} to {target}"),
            );
        }
    }
    // Wider than any one of its patterns, though each looks alike: refused.
    // Inside one of them: granted.
    for (i, (pattern, inside)) in [
        ("* /api/v1/user*", false),
        ("*/api/v1/user/*", false),
        ("* /api/v1/*", false),
        ("* /api/v1/user/*/x", true),
        ("GET /api/v1/user/*/*x*", true),
        ("DELETE /api/v1/role", true),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("pattern-{i}");
        create_role(&admin, &name, &[("ALLOW", pattern)]);
        let r = ua
            .put_json(&format!("/api/v1/user/plain/role/{name}"), &json!({}))
            .unwrap();
        if inside {
            r.expect_status(&[200], &format!("grant a role allowing {pattern:?}"));
        } else {
            expect_escalation(&r, pattern, &format!("grant a role allowing {pattern:?}"));
        }
    }
    // A role inside what it holds can be granted, to others and itself.
    create_role(&admin, "user-reader", &[("ALLOW", "GET /api/v1/user/*")]);
    for target in ["plain", "ua"] {
        ua.put_json(
            &format!("/api/v1/user/{target}/role/user-reader"),
            &json!({}),
        )
        .unwrap()
        .expect_status(&[200], &format!("grant user-reader to {target}"));
    }

    // Users who hold more than it: nothing about them can change.
    let attempts: [(&str, &str, Option<Value>); 5] = [
        (
            "PUT",
            "/api/v1/user/admin/password",
            Some(json!({"password": "taken-over-1"})),
        ),
        ("DELETE", "/api/v1/user/admin", None),
        ("DELETE", "/api/v1/user/admin/role/Admin", None),
        (
            "PUT",
            "/api/v1/user/admin/role/user-reader",
            Some(json!({})),
        ),
        (
            "PUT",
            "/api/v1/user/reader/password",
            Some(json!({"password": "taken-over-2"})),
        ),
    ];
    for (method, path, body) in attempts {
        let r = as_user(&admin, "ua", pw, method, path, body.as_ref());
        let lacking = if path.starts_with("/api/v1/user/reader/") {
            "GET /api/v1/*"
        } else {
            "*"
        };
        expect_escalation(&r, lacking, &format!("user admin: {method} {path}"));
    }
    // Its own password it may always change; a user with less, too.
    ua.put_json(
        "/api/v1/user/plain/password",
        &json!({"password": "plain-password-2"}),
    )
    .unwrap()
    .expect_status(
        &[200],
        "user admin resets a less privileged user's password",
    );
    let pw2 = "user-admin-password-2";
    ua.put_json("/api/v1/user/ua/password", &json!({"password": pw2}))
        .unwrap()
        .expect_status(&[200], "user admin changes its own password");
    let ua = admin.as_user("ua", pw2);
    // So may a user whose roles allow no user endpoint at all, but not
    // its expiry, and nobody else's password.
    let plain = admin.as_user("plain", "plain-password-2");
    plain
        .put_json(
            "/api/v1/user/plain/password",
            &json!({"password": "plain-password-3"}),
        )
        .unwrap()
        .expect_status(&[200], "a user changes its own password");
    let plain = admin.as_user("plain", "plain-password-3");
    let r = plain
        .put_json(
            "/api/v1/user/plain/password",
            &json!({"password": "plain-password-4", "passwordExpiry": "2999-01-01T00:00:00Z"}),
        )
        .unwrap();
    r.expect_problem(&[403], "a user sets its own password's expiry");
    expect_forbidden(
        &plain
            .put_json(
                "/api/v1/user/ua/password",
                &json!({"password": "plain-password-5"}),
            )
            .unwrap(),
        "PUT /api/v1/user/ua/password",
        "a user sets another user's password",
    );
    plain
        .put_json(
            "/api/v1/user/plain/password",
            &json!({"password": "plain-password-6"}),
        )
        .unwrap()
        .expect_status(&[200], "the refused requests changed nothing");
    // Nothing of the refused requests happened.
    admin
        .get("/api/v1/user/admin")
        .unwrap()
        .expect_status(&[200], "admin's password unchanged");
    let r = admin.get("/api/v1/user/ua").unwrap();
    assert_eq!(
        r.json["roles"],
        json!(["UserAdmin", "user-reader"]),
        "the user admin's roles: {}",
        r.text
    );

    // Role changes: only by a user holding the role before and after.
    create_role(&admin, "ua-extra", &[("ALLOW", "GET /api/v1/user/*")]);
    ua.put_json("/api/v1/user/ua/role/ua-extra", &json!({}))
        .unwrap()
        .expect_status(&[200], "grant ua-extra to itself");
    let widen = json!({"permissionType": "ALLOW", "pattern": "GET /api/v1/*"});
    let r = ua
        .post_json("/api/v1/role/ua-extra/permission", &widen)
        .unwrap();
    expect_escalation(&r, "GET /api/v1/*", "widen a role it holds");
    let narrow = json!({"permissionType": "ALLOW", "pattern": "GET /api/v1/user/x*"});
    ua.post_json("/api/v1/role/ua-extra/permission", &narrow)
        .unwrap()
        .expect_status(&[200], "add a permission it holds to a role");
    // A DENY fences a user admin in: it can neither lift it from the role
    // nor take the role off itself.
    create_role(&admin, "fence", &[("DENY", "DELETE /api/v1/user/plain")]);
    create_user(
        &admin,
        "ua3",
        "user-admin-3-password",
        &["UserAdmin", "fence"],
    );
    let ua3 = admin.as_user("ua3", "user-admin-3-password");
    expect_forbidden(
        &ua3.send(|c| c.delete(ua3.url("/api/v1/user/plain")))
            .unwrap(),
        "DELETE /api/v1/user/plain",
        "the fence holds",
    );
    let r = ua3
        .send(|c| {
            c.delete(ua3.url("/api/v1/role/fence/permission"))
                .json(&json!({"permissionType": "DENY", "pattern": "DELETE /api/v1/user/plain"}))
        })
        .unwrap();
    expect_escalation(&r, "DELETE /api/v1/user/plain", "lift a DENY from a role");
    let r = ua3
        .send(|c| c.delete(ua3.url("/api/v1/user/ua3/role/fence")))
        .unwrap();
    expect_escalation(
        &r,
        "DELETE /api/v1/user/plain",
        "take a fencing role off itself",
    );
    // A role held by a more privileged user cannot be changed: adding a
    // DENY would lock the admin out.
    create_role(&admin, "admins-extra", &[("ALLOW", "GET /api/v1/user/*")]);
    admin
        .put_json("/api/v1/user/admin/role/admins-extra", &json!({}))
        .unwrap()
        .expect_status(&[200], "admin takes admins-extra");
    let deny_all = json!({"permissionType": "DENY", "pattern": "*"});
    let r = ua
        .post_json("/api/v1/role/admins-extra/permission", &deny_all)
        .unwrap();
    expect_escalation(&r, "*", "change a role the admin holds");
    admin
        .get("/api/v1/virtualnode")
        .unwrap()
        .expect_status(&[200], "admin still has full access");

    // An actor's own DENY counts: a user admin fenced off roles cannot
    // hand out UserAdmin.
    create_role(&admin, "no-roles", &[("DENY", "* /api/v1/role/*")]);
    create_user(
        &admin,
        "ua2",
        "user-admin-2-password",
        &["UserAdmin", "no-roles"],
    );
    let r = as_user(
        &admin,
        "ua2",
        "user-admin-2-password",
        "PUT",
        "/api/v1/user/plain/role/UserAdmin",
        Some(&json!({})),
    );
    expect_escalation(&r, "* /api/v1/role/*", "fenced user admin grants UserAdmin");

    // The last Admin stays.
    let r = admin
        .send(|c| c.delete(admin.url("/api/v1/user/admin/role/Admin")))
        .unwrap();
    r.expect_problem(&[409], "revoke the last Admin");
    assert_eq!(r.json["code"], "LAST_ADMIN", "{}", r.text);
    let r = admin
        .send(|c| c.delete(admin.url("/api/v1/user/admin")))
        .unwrap();
    r.expect_problem(&[409], "delete the last Admin");
    assert_eq!(r.json["code"], "LAST_ADMIN", "{}", r.text);
    // With a second Admin, the first may step down.
    create_user(&admin, "admin2", "second-admin-password", &["Admin"]);
    admin
        .send(|c| c.delete(admin.url("/api/v1/user/admin/role/Admin")))
        .unwrap()
        .expect_status(&[200], "an Admin steps down while another remains");
    let admin2 = admin.as_user("admin2", "second-admin-password");
    let r = admin2
        .send(|c| c.delete(admin2.url("/api/v1/user/admin2/role/Admin")))
        .unwrap();
    r.expect_problem(&[409], "the last Admin steps down");
    assert_eq!(r.json["code"], "LAST_ADMIN", "{}", r.text);
}

/// After authentication, routing decides: a path that does not exist is
/// `404`, a known path with another method `405`, and only a real
/// operation the caller's roles do not allow is `403`. Without valid
/// credentials everything but the open paths is `401`.
#[test]
fn unknown_paths_are_404_after_authentication() {
    let node = Node::start();
    let admin = node.api().clone();
    create_user(&admin, "plain", "plain-password", &[]);
    create_user(&admin, "reader", "reader-password", &["ReadOnly"]);
    let callers = [
        ("admin", admin.clone()),
        (
            "a user with no roles",
            admin.as_user("plain", "plain-password"),
        ),
        ("a reader", admin.as_user("reader", "reader-password")),
    ];
    let unknown = [
        ("GET", "/api/v1/nope"),
        ("GET", "/nope"),
        ("POST", "/api/v1/virtualnode/0123456789ab/nope"),
        ("DELETE", "/api/v1/user/admin/role/Admin/extra"),
        ("GET", "/api/v1/us%65r"),
        ("GET", "/"),
    ];
    for (who, api) in &callers {
        for (method, path) in unknown {
            let m: reqwest::Method = method.parse().unwrap();
            let r = api.send(|c| c.request(m, api.url(path))).unwrap();
            r.expect_problem(&[404], &format!("{who}: {method} {path}"));
            assert_eq!(r.json["code"], "NO_SUCH_ENDPOINT", "{who}: {}", r.text);
        }
        for (method, path) in [
            ("PATCH", "/api/v1/virtualnode"),
            ("DELETE", "/api/v1/virtualnode"),
            ("POST", "/api/v1/user/admin"),
            ("PUT", "/api/v1/role"),
        ] {
            let m: reqwest::Method = method.parse().unwrap();
            let r = api.send(|c| c.request(m, api.url(path))).unwrap();
            r.expect_problem(&[405], &format!("{who}: {method} {path}"));
        }
    }
    // A real operation the roles do not allow: 403.
    let plain = &callers[1].1;
    let r = plain.get("/api/v1/virtualnode").unwrap();
    expect_forbidden(&r, "GET /api/v1/virtualnode", "no roles: list vnodes");
    let reader = &callers[2].1;
    let r = reader.post_json("/api/v1/user", &json!({})).unwrap();
    expect_forbidden(&r, "POST /api/v1/user", "reader: create a user");

    // No or wrong credentials: 401 for real and unknown paths alike.
    let wrong = admin.as_user("admin", "not-the-admin-password");
    for path in ["/api/v1/nope", "/nope", "/api/v1/virtualnode", "/"] {
        let r = admin.client().get(admin.url(path)).send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "no credentials: GET {path}");
        wrong
            .get(path)
            .unwrap()
            .expect_problem(&[401], &format!("wrong password: GET {path}"));
    }
    let r = admin
        .client()
        .patch(admin.url("/api/v1/virtualnode"))
        .send()
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "no credentials: PATCH a known path"
    );
    // Open paths stay open.
    for path in ["/api/v1/health", "/metrics", "/api/v1/openapi.json"] {
        let r = admin.client().get(admin.url(path)).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "no credentials: GET {path}");
    }
}

/// Reads every page of `path` (`?limit=`), checking each page's size.
fn all_pages(api: &Api, path: &str, field: &str, key: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let url = match &cursor {
            None => format!("{path}?limit={limit}"),
            Some(c) => format!("{path}?limit={limit}&cursor={c}"),
        };
        let r = api.get(&url).unwrap();
        r.expect_status(&[200], &format!("GET {url}"));
        let items = r.json[field].as_array().cloned().unwrap_or_default();
        assert!(items.len() <= limit, "{url}: {} items", items.len());
        out.extend(
            items
                .iter()
                .map(|i| i[key].as_str().expect("name").to_string()),
        );
        match &r.json["nextCursor"] {
            Value::Null => return out,
            Value::String(c) => {
                assert!(!items.is_empty(), "{url}: an empty page with a next cursor");
                cursor = Some(c.clone());
            }
            other => panic!("{url}: nextCursor is {other}"),
        }
    }
    panic!("{path}: more than 1000 pages");
}

/// `GET /api/v1/user` and `GET /api/v1/role` are paginated: the pages
/// cover every item exactly once, in order; bad limits and cursors are
/// `400`.
#[test]
fn users_and_roles_are_paginated() {
    let node = Node::start();
    let api = node.api().clone();
    let mut users: Vec<String> = vec!["admin".into()];
    for i in 0..23 {
        let login = format!("user-{i:02}");
        api.post_json(
            "/api/v1/user",
            &json!({"loginName": login, "password": "paged-password"}),
        )
        .unwrap()
        .expect_status(&[201], "create user");
        users.push(login);
    }
    let mut roles: Vec<String> = ["Admin", "ReadOnly", "UserAdmin", "VNodeCreator"]
        .map(String::from)
        .to_vec();
    for i in 0..11 {
        let name = format!("role-{i:02}");
        create_role(&api, &name, &[]);
        roles.push(name);
    }
    users.sort();
    roles.sort();
    for limit in [1, 5, 7, 24, 1000] {
        assert_eq!(
            all_pages(&api, "/api/v1/user", "users", "loginName", limit),
            users,
            "users, limit {limit}"
        );
        assert_eq!(
            all_pages(&api, "/api/v1/role", "roles", "roleName", limit),
            roles,
            "roles, limit {limit}"
        );
    }
    // Without a limit: the first page of up to 100 covers them all.
    let r = api.get("/api/v1/user").unwrap();
    assert_eq!(r.json["users"].as_array().map(Vec::len), Some(users.len()));
    assert_eq!(r.json["nextCursor"], Value::Null);
    for path in ["/api/v1/user", "/api/v1/role"] {
        for (query, code) in [
            ("limit=0", "INVALID_LIMIT"),
            ("limit=1001", "INVALID_LIMIT"),
            ("limit=-1", "INVALID_LIMIT"),
            ("limit=ten", "INVALID_LIMIT"),
            ("cursor=!!!", "INVALID_CURSOR"),
            ("cursor=", "INVALID_CURSOR"),
            ("cursor=_w", "INVALID_CURSOR"),
        ] {
            let r = api.get(&format!("{path}?{query}")).unwrap();
            r.expect_problem(&[400], &format!("GET {path}?{query}"));
            assert_eq!(r.json["code"], code, "{path}?{query}: {}", r.text);
        }
    }
}
