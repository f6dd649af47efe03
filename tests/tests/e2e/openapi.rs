//! The authorization matrix, driven by the served OpenAPI document: every
//! operation is called with no credentials (`401`), a wrong password
//! (`401`), as a user with no roles (`403`) and as admin (`2xx`, a status
//! the document lists). Open endpoints answer `2xx` to everyone. Then a
//! user holding only `UserAdmin` tries, on every operation that changes a
//! user's roles or credentials or a role's permissions, to give or take
//! more than it holds (`403 PRIVILEGE_ESCALATION`, nothing changes). The
//! served document must also equal the committed `docs/openapi.json`.

use std::collections::BTreeMap;

use braid_e2e::{Api, Node, Pkg, package_bytes, repo_root};
use serde_json::{Value, json};

use crate::{ALICE, BOB, ping_body};

/// Password of the role-less users.
const NO_ROLE_PASSWORD: &str = "no-role-password-1";
/// Each role-less user takes at most this many wrong-password attempts, so
/// the throttle (5 failures a minute per login and address) never answers
/// `429` instead.
const FAILURES_PER_USER: usize = 4;

enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

/// One concrete request for an operation.
struct Call {
    path: String,
    body: Option<Body>,
}

impl Call {
    fn get(path: impl Into<String>) -> Call {
        Call {
            path: path.into(),
            body: None,
        }
    }
    fn json(path: impl Into<String>, body: Value) -> Call {
        Call {
            path: path.into(),
            body: Some(Body::Json(body)),
        }
    }
}

/// Real objects to substitute into paths; destructive operations get
/// throwaway objects made just before they run.
struct World {
    api: Api,
    alice: String,
    ping: String,
    ping_v2: String,
    done_flow: String,
    seq: usize,
}

impl World {
    fn next(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}{}", self.seq)
    }

    fn admin_ok(&self, method: &str, path: &str, body: Value) -> Value {
        let resp = match method {
            "POST" => self.api.post_json(path, &body),
            "PUT" => self.api.put_json(path, &body),
            _ => unreachable!(),
        }
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        resp.expect_status(&[200, 201, 202], &format!("set-up {method} {path}"));
        resp.json.clone()
    }

    fn throwaway_user(&mut self) -> String {
        let login = self.next("throwaway-user-");
        self.admin_ok(
            "POST",
            "/api/v1/user",
            json!({"loginName": login, "password": "throwaway-password"}),
        );
        login
    }

    fn throwaway_role(&mut self, permissions: Value) -> String {
        let name = self.next("throwaway-role-");
        self.admin_ok(
            "POST",
            "/api/v1/role",
            json!({"roleName": name, "permissions": permissions}),
        );
        name
    }

    fn throwaway_vnode(&mut self) -> String {
        let x500 = format!("O={}, L=Paris, C=FR", self.next("Throwaway"));
        self.api.create_vnode(&x500, &self.ping)
    }

    /// The request for `operation_id`; `None` for an operation this test
    /// does not know yet (the test then fails, naming it).
    fn prepare(&mut self, operation_id: &str) -> Option<Call> {
        let a = self.alice.clone();
        let permission = json!({"permissionType": "ALLOW", "pattern": "GET /api/v1/nothing"});
        Some(match operation_id {
            "health" => Call::get("/api/v1/health"),
            "ready" => Call::get("/api/v1/health/ready"),
            "metrics" => Call::get("/metrics"),
            "openapi_json" => Call::get("/api/v1/openapi.json"),
            // Packages
            "list_packages" => Call::get("/api/v1/package"),
            "upload_package" => Call {
                path: "/api/v1/package".into(),
                body: Some(Body::Bytes(package_bytes(Pkg::Ping))),
            },
            "get_package" => Call::get(format!("/api/v1/package/{}", self.ping)),
            "delete_package" => {
                let unused = self.api.upload_package(&package_bytes(Pkg::Proposal));
                Call::get(format!("/api/v1/package/{unused}"))
            }
            // Virtual nodes
            "list_vnodes" => Call::get("/api/v1/virtualnode"),
            "create_vnode" => {
                let x500 = format!("O={}, L=Rome, C=IT", self.next("Created"));
                Call::json(
                    "/api/v1/virtualnode",
                    json!({"x500Name": x500, "packageChecksum": self.ping}),
                )
            }
            "get_vnode" => Call::get(format!("/api/v1/virtualnode/{a}")),
            "vnode_flows" => Call::get(format!("/api/v1/virtualnode/{a}/flows")),
            "upgrade_vnode" => Call::json(
                format!("/api/v1/virtualnode/{}/package", self.throwaway_vnode()),
                json!({"packageChecksum": self.ping_v2}),
            ),
            "check_upgrade" => Call::json(
                format!("/api/v1/virtualnode/{a}/check-upgrade"),
                json!({"packageChecksum": self.ping_v2}),
            ),
            "vnode_state" => Call::json(
                format!("/api/v1/virtualnode/{}/state", self.throwaway_vnode()),
                json!({"flowStartsEnabled": true}),
            ),
            "force_package" => Call::json(
                format!(
                    "/api/v1/maintenance/virtualnode/{}/package",
                    self.throwaway_vnode()
                ),
                json!({"packageChecksum": self.ping_v2}),
            ),
            // Flows
            "list_flows" => Call::get(format!("/api/v1/flow/{a}?status=COMPLETED")),
            "start_flow" => Call::json(
                format!("/api/v1/flow/{a}"),
                json!({
                    "clientRequestId": self.next("matrix-start-"),
                    "flowName": "ping",
                    "requestBody": ping_body(BOB, 1, 0),
                }),
            ),
            "flow_status" => Call::get(format!("/api/v1/flow/{a}/{}", self.done_flow)),
            "flow_journal" => Call::get(format!("/api/v1/flow/{a}/{}/journal", self.done_flow)),
            "flow_events" => Call::get(format!("/api/v1/flow/{a}/{}/events", self.done_flow)),
            "vnode_events" => Call::get(format!("/api/v1/flow/{a}/events")),
            "kill_flow" => {
                // Bob answers only after a minute: the ping stays suspended.
                let id = self.next("matrix-kill-");
                self.api
                    .start_flow(&a, &id, "ping", &ping_body(BOB, 1, 60_000));
                Call::json(format!("/api/v1/flow/{a}/{id}/kill"), json!({}))
            }
            // Users
            "list_users" => Call::get("/api/v1/user"),
            "create_user" => Call::json(
                "/api/v1/user",
                json!({"loginName": self.next("created-user-"), "password": "created-password"}),
            ),
            "get_user" => Call::get("/api/v1/user/admin"),
            "delete_user" => Call::get(format!("/api/v1/user/{}", self.throwaway_user())),
            "set_password" => Call::json(
                format!("/api/v1/user/{}/password", self.throwaway_user()),
                json!({"password": "another-password"}),
            ),
            "grant_role" => Call::json(
                format!("/api/v1/user/{}/role/ReadOnly", self.throwaway_user()),
                json!({}),
            ),
            "revoke_role" => {
                let login = self.throwaway_user();
                let path = format!("/api/v1/user/{login}/role/ReadOnly");
                self.admin_ok("PUT", &path, json!({}));
                Call::get(path)
            }
            "user_permissions" => Call::get("/api/v1/user/admin/permissions"),
            // Roles
            "list_roles" => Call::get("/api/v1/role"),
            "create_role" => Call::json(
                "/api/v1/role",
                json!({"roleName": self.next("created-role-"), "permissions": [permission]}),
            ),
            "get_role" => Call::get("/api/v1/role/ReadOnly"),
            "delete_role" => Call::get(format!("/api/v1/role/{}", self.throwaway_role(json!([])))),
            "add_permission" => Call::json(
                format!("/api/v1/role/{}/permission", self.throwaway_role(json!([]))),
                permission,
            ),
            "remove_permission" => Call::json(
                format!(
                    "/api/v1/role/{}/permission",
                    self.throwaway_role(json!([permission]))
                ),
                permission,
            ),
            // Network: this node has none, so the operator's operations
            // answer 409 NOT_NETWORK_OPERATOR (see ADMIN_CONFLICT); the
            // networked e2e tests cover them on an operator node.
            "network" => Call::get("/api/v1/network"),
            "pending" => Call::get("/api/v1/network/pending"),
            "approve" => Call::json(
                "/api/v1/network/members/O=Nobody,%20L=Paris,%20C=FR/approve",
                json!({}),
            ),
            _ => return None,
        })
    }
}

/// Operations that change a user's roles or credentials or a role's
/// permissions: each must refuse a caller that would give (or take) more
/// than it holds itself, so each has a case in [`escalation_cases`].
const PRIVILEGED_CHANGES: &[&str] = &[
    "grant_role",
    "revoke_role",
    "set_password",
    "delete_user",
    "add_permission",
    "remove_permission",
];

/// A user holding only `UserAdmin` may call every user and role endpoint,
/// but each attempt below gives or takes more than it holds: each must be
/// `403 PRIVILEGE_ESCALATION` (a documented status), and none may change
/// anything.
fn escalation_cases(
    world: &mut World,
    operations: &BTreeMap<String, (String, String, Value)>,
    problems: &mut Vec<String>,
) {
    let ua = world.next("matrix-user-admin-");
    let password = "matrix-user-admin-password";
    world.admin_ok(
        "POST",
        "/api/v1/user",
        json!({"loginName": ua, "password": password}),
    );
    world.admin_ok(
        "PUT",
        &format!("/api/v1/user/{ua}/role/UserAdmin"),
        json!({}),
    );
    // A role it holds, inside what it holds, and a DENY that fences it.
    let own = world.throwaway_role(json!([
        {"permissionType": "ALLOW", "pattern": "GET /api/v1/user/*"}
    ]));
    let fence = world.throwaway_role(json!([
        {"permissionType": "DENY", "pattern": "DELETE /api/v1/role/*/permission/x"}
    ]));
    for role in [&own, &fence] {
        world.admin_ok("PUT", &format!("/api/v1/user/{ua}/role/{role}"), json!({}));
    }
    let victim = world.throwaway_user();
    world.admin_ok(
        "PUT",
        &format!("/api/v1/user/{victim}/role/ReadOnly"),
        json!({}),
    );
    let allow_all = json!({"permissionType": "ALLOW", "pattern": "*"});
    let cases: Vec<(&str, &str, Call)> = vec![
        (
            "grant_role",
            "grant itself Admin",
            Call::json(format!("/api/v1/user/{ua}/role/Admin"), json!({})),
        ),
        (
            "grant_role",
            "grant ReadOnly to a user",
            Call::json(
                format!("/api/v1/user/{}/role/ReadOnly", world.throwaway_user()),
                json!({}),
            ),
        ),
        (
            "grant_role",
            "grant a role to admin",
            Call::json(format!("/api/v1/user/admin/role/{own}"), json!({})),
        ),
        (
            "set_password",
            "set admin's password",
            Call::json(
                "/api/v1/user/admin/password",
                json!({"password": "taken-over-password"}),
            ),
        ),
        (
            "set_password",
            "set a reader's password",
            Call::json(
                format!("/api/v1/user/{victim}/password"),
                json!({"password": "taken-over-password"}),
            ),
        ),
        (
            "delete_user",
            "delete admin",
            Call::get("/api/v1/user/admin"),
        ),
        (
            "revoke_role",
            "take Admin from admin",
            Call::get("/api/v1/user/admin/role/Admin"),
        ),
        (
            "revoke_role",
            "take its fence off itself",
            Call::get(format!("/api/v1/user/{ua}/role/{fence}")),
        ),
        (
            "add_permission",
            "widen a role it holds",
            Call::json(format!("/api/v1/role/{own}/permission"), allow_all),
        ),
        (
            "remove_permission",
            "lift its fence",
            Call::json(
                format!("/api/v1/role/{fence}/permission"),
                json!({"permissionType": "DENY", "pattern": "DELETE /api/v1/role/*/permission/x"}),
            ),
        ),
    ];
    for id in PRIVILEGED_CHANGES {
        if !cases.iter().any(|(op, _, _)| op == id) {
            problems.push(format!(
                "{id}: no privilege-escalation case in escalation_cases"
            ));
        }
    }
    for (id, what, call) in &cases {
        let Some((method, _, op)) = operations.get(*id) else {
            problems.push(format!("{id}: not in the OpenAPI document"));
            continue;
        };
        let (status, body) = send(&world.api, method, call, Some((&ua, password)));
        let code = serde_json::from_str::<Value>(&body).unwrap_or_default()["code"].clone();
        if status != 403 || code != "PRIVILEGE_ESCALATION" {
            problems.push(format!(
                "{method} {} ({id}) as a user admin ({what}): expected 403 \
                 PRIVILEGE_ESCALATION, got HTTP {status}: {body}",
                call.path
            ));
        } else if op["responses"].get("403").is_none() {
            problems.push(format!("{id}: 403 is not documented"));
        }
    }
    // Nothing changed.
    let r = world.api.get(&format!("/api/v1/user/{ua}")).unwrap();
    let mut expected = vec!["UserAdmin".to_string(), own.clone(), fence.clone()];
    expected.sort();
    if r.json["roles"] != json!(expected) {
        problems.push(format!("the user admin's roles changed: {}", r.text));
    }
    let r = world.api.get("/api/v1/user/admin").unwrap();
    if r.json["roles"] != json!(["Admin", "UserAdmin"]) {
        problems.push(format!("admin's roles changed: {}", r.text));
    }
    let r = world.api.get(&format!("/api/v1/role/{own}")).unwrap();
    if r.json["permissions"].as_array().map(Vec::len) != Some(1) {
        problems.push(format!("role {own} changed: {}", r.text));
    }
    let r = world.api.get(&format!("/api/v1/role/{fence}")).unwrap();
    if r.json["permissions"].as_array().map(Vec::len) != Some(1) {
        problems.push(format!("role {fence} changed: {}", r.text));
    }
    // admin's password was not changed: a fresh client still logs in.
    let fresh = braid_e2e::Api::new(world.api.base().to_string());
    let r = fresh.get("/api/v1/user/admin").unwrap();
    if r.status != 200 {
        problems.push(format!("admin cannot log in any more: HTTP {}", r.status));
    }
}

/// Operations that need a network-map node; on this plain node admin gets
/// `409 NOT_NETWORK_OPERATOR` instead of a 2xx.
const ADMIN_CONFLICT: &[&str] = &["pending", "approve"];

/// Sends `call` with `method`, as `who` (`None`: no credentials). Returns
/// the status and the body; an event stream's body is not read (a vnode's
/// stream never ends).
fn send(api: &Api, method: &str, call: &Call, who: Option<(&str, &str)>) -> (u16, String) {
    let m: reqwest::Method = method.parse().expect("method");
    let mut req = api.client().request(m, api.url(&call.path));
    if let Some((user, password)) = who {
        req = req.basic_auth(user, Some(password));
    }
    req = match &call.body {
        None => req,
        Some(Body::Json(v)) => req.json(v),
        // A refused upload is answered before its body is read and the
        // connection closed, which a client still sending megabytes may
        // see as a reset: refused callers send only the first bytes.
        Some(Body::Bytes(b)) => {
            let admin = who.is_some_and(|(u, _)| u == braid_e2e::ADMIN_USER);
            let b = if admin { b.clone() } else { b[..8].to_vec() };
            req.header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(b)
        }
    };
    let resp = req
        .send()
        .unwrap_or_else(|e| panic!("{method} {}: {e}", call.path));
    let status = resp.status().as_u16();
    let streaming = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if streaming {
        return (status, "<event stream>".into());
    }
    (status, resp.text().unwrap_or_default())
}

#[test]
fn every_operation_answers_401_403_and_2xx_as_documented() {
    let node = Node::start();
    let api = node.api().clone();

    // The served document is the committed one.
    let served = api
        .client()
        .get(api.url("/api/v1/openapi.json"))
        .send()
        .expect("GET openapi.json")
        .text()
        .expect("openapi.json body");
    let committed_path = repo_root().join("docs/openapi.json");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        served == committed,
        "the served OpenAPI document differs from {}; regenerate it with \
         `BRAID_UPDATE_OPENAPI=1 cargo test -p braid-rest openapi`",
        committed_path.display()
    );
    let doc: Value = serde_json::from_str(&served).expect("openapi.json is JSON");

    node.vnode(BOB, Pkg::Ping);
    let ping = api.upload_package(&package_bytes(Pkg::Ping));
    let alice = api.create_vnode(ALICE, &ping);
    let ping_v2 = api.upload_package(&package_bytes(Pkg::PingV2));
    api.start_flow(&alice, "matrix-done", "ping", &ping_body(BOB, 1, 0));
    let done = api.wait_terminal(&alice, "matrix-done");
    assert_eq!(done.status, "COMPLETED", "{}", done.describe());
    let mut world = World {
        api: api.clone(),
        alice,
        ping,
        ping_v2,
        done_flow: "matrix-done".into(),
        seq: 0,
    };

    let mut operations: BTreeMap<String, (String, String, Value)> = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let id = op["operationId"].as_str().expect("operationId").to_string();
            operations.insert(id, (method.to_uppercase(), path.clone(), op.clone()));
        }
    }
    assert!(operations.len() >= 30, "too few operations: {operations:?}");

    let mut no_role_users: Vec<String> = Vec::new();
    let mut problems = Vec::new();
    for (i, (id, (method, template, op))) in operations.iter().enumerate() {
        let Some(call) = world.prepare(id) else {
            problems.push(format!(
                "{method} {template} ({id}): no request for it in tests/tests/e2e/openapi.rs; \
                 add one to World::prepare"
            ));
            continue;
        };
        let open = op["security"].as_array().is_some_and(Vec::is_empty);
        let documented = |status: u16| op["responses"].get(status.to_string()).is_some();
        let what = format!("{method} {} ({id})", call.path);
        let mut expect = |who: &str, got: (u16, String), ok: &dyn Fn(u16) -> bool| {
            if !ok(got.0) {
                problems.push(format!("{what} as {who}: HTTP {}: {}", got.0, got.1));
            } else if !documented(got.0) {
                problems.push(format!("{what} as {who}: HTTP {} is not documented", got.0));
            }
        };
        if open {
            for who in [None, Some(("admin", "wrong-password"))] {
                let got = send(&api, method, &call, who);
                expect("anyone", got, &|s| (200..300).contains(&s));
            }
        } else {
            // A role-less user per FAILURES_PER_USER operations.
            let user_index = i / FAILURES_PER_USER;
            while no_role_users.len() <= user_index {
                let login = world.next("no-role-");
                world.admin_ok(
                    "POST",
                    "/api/v1/user",
                    json!({"loginName": login, "password": NO_ROLE_PASSWORD}),
                );
                no_role_users.push(login);
            }
            let user = no_role_users[user_index].as_str();
            let got = send(&api, method, &call, None);
            expect("nobody", got, &|s| s == 401);
            let got = send(&api, method, &call, Some((user, "wrong-password")));
            expect("a wrong password", got, &|s| s == 401);
            let got = send(&api, method, &call, Some((user, NO_ROLE_PASSWORD)));
            expect("a user with no roles", got, &|s| s == 403);
        }
        let got = send(
            &api,
            method,
            &call,
            Some((braid_e2e::ADMIN_USER, braid_e2e::ADMIN_PASSWORD)),
        );
        if ADMIN_CONFLICT.contains(&id.as_str()) {
            let conflict = got.0 == 409 && got.1.contains("NOT_NETWORK_OPERATOR");
            expect("admin", got, &|_| conflict);
        } else {
            expect("admin", got, &|s| (200..300).contains(&s));
        }
    }
    escalation_cases(&mut world, &operations, &mut problems);
    assert!(
        problems.is_empty(),
        "{} problem(s) in the authorization matrix:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
