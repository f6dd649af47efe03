//! Users, roles and permissions: a flow executor for one vnode can neither
//! start nor read another vnode's flows; credentials are checked (401),
//! roles are enforced (403), failed logins are throttled per user (429) and
//! expired passwords are refused.

use braid_e2e::{Api, DEADLINE, Node, Pkg, Resp, wait_until};
use serde_json::{Value, json};

use crate::{ALICE, BOB, assert_ping_ok, ping_body};

/// A request as `user` (not admin).
fn as_user(
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

fn create_user(api: &Api, login: &str, password: &str, roles: &[&str]) {
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
