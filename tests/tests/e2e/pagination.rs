//! Every list endpoint is paginated: pages of at most `limit` items that
//! together hold every item exactly once, in the list's order, the last
//! with `nextCursor: null`; a bad `limit` or `cursor` is a `400` that says
//! which; the OpenAPI document shows both parameters.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use braid_e2e::{Api, Node, Pkg, package_bytes, wait_until};
use serde_json::{Value, json};

use crate::{ALICE, BOB, ping_body};

/// Walks a list from its first page with `limit`, following `nextCursor`;
/// returns the items and the page sizes. Panics on a page larger than
/// `limit`, or a short page before the last one when `full` (lists without
/// a filter fill their pages).
pub fn walk(api: &Api, path: &str, items: &str, limit: usize, full: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    let mut sizes = Vec::new();
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut p = format!("{path}{sep}limit={limit}");
        if let Some(c) = &cursor {
            p.push_str("&cursor=");
            p.push_str(c);
        }
        let resp = api.get(&p).expect("list");
        resp.expect_status(&[200], &format!("GET {p}"));
        let page = resp.json[items]
            .as_array()
            .unwrap_or_else(|| panic!("GET {p}: no {items:?} list: {}", resp.text))
            .clone();
        assert!(
            page.len() <= limit,
            "GET {p}: {} items on a page of at most {limit}",
            page.len()
        );
        sizes.push(page.len());
        out.extend(page);
        let next = resp
            .json
            .get("nextCursor")
            .unwrap_or_else(|| panic!("GET {p}: the answer has no nextCursor: {}", resp.text));
        match next {
            Value::Null => break,
            Value::String(c) => {
                assert!(
                    cursor.as_deref() != Some(c.as_str()),
                    "GET {p}: the same cursor again"
                );
                cursor = Some(c.clone());
            }
            other => panic!("GET {p}: nextCursor is {other}"),
        }
        assert!(sizes.len() < 10_000, "GET {path}: pages never end");
    }
    if full {
        let (last, rest) = sizes.split_last().expect("a page");
        assert!(
            rest.iter().all(|&n| n == limit) && *last <= limit,
            "GET {path} with limit {limit}: page sizes {sizes:?}"
        );
        assert!(
            *last > 0 || rest.is_empty(),
            "GET {path} with limit {limit}: an empty last page after full ones ({sizes:?}): \
             the page before it should have had no nextCursor"
        );
    }
    out
}

fn field(items: &[Value], name: &str) -> Vec<String> {
    items
        .iter()
        .map(|v| {
            v[name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in {v}"))
                .to_string()
        })
        .collect()
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// What each of Alice's flows is made to end as (or stay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completed,
    Running,
    Failed,
    Killed,
}

impl Kind {
    fn status(self) -> &'static str {
        match self {
            Kind::Completed => "COMPLETED",
            Kind::Running => "RUNNING",
            Kind::Failed => "FAILED",
            Kind::Killed => "KILLED",
        }
    }
}

const KINDS: [Kind; 7] = [
    Kind::Completed,
    Kind::Running,
    Kind::Completed,
    Kind::Failed,
    Kind::Completed,
    Kind::Killed,
    Kind::Running,
];

/// Every list, with several page sizes, with and without a status filter.
#[test]
fn every_list_pages_through_every_item_once_in_order() {
    const FLOWS: usize = 49;
    let node = Node::start();
    let api = node.api().clone();
    let mut checksums: Vec<String> = Pkg::ALL
        .iter()
        .map(|p| api.upload_package(&package_bytes(*p)))
        .collect();
    checksums.sort();
    let ping = api.upload_package(&package_bytes(Pkg::Ping));
    let alice = api.create_vnode(ALICE, &ping);
    let bob = api.create_vnode(BOB, &ping);
    let mut names = vec![ALICE.to_string(), BOB.to_string()];
    for i in 0..6 {
        let name = format!("O=Vnode {i}, L=Zurich, C=CH");
        api.create_vnode(&name, &ping);
        names.push(name);
    }
    names.sort();
    let mut logins = vec!["admin".to_string()];
    for i in 0..5 {
        let login = format!("user-{i}");
        api.post_json(
            "/api/v1/user",
            &json!({"loginName": login, "password": "pagination-password-0123"}),
        )
        .expect("create user")
        .expect_status(&[201], "create user");
        logins.push(login);
    }
    logins.sort();
    for i in 0..5 {
        api.post_json("/api/v1/role", &json!({"roleName": format!("role-{i}")}))
            .expect("create role")
            .expect_status(&[201], "create role");
    }

    // Alice's flows, each created in a later millisecond than the one
    // before, so that their order is known: oldest first.
    let mut ids = Vec::new();
    for i in 0..FLOWS {
        let id = format!("f-{i:02}");
        let body = match KINDS[i % KINDS.len()] {
            Kind::Completed => ping_body(BOB, i as i64, 0),
            Kind::Running | Kind::Killed => ping_body(BOB, i as i64, 600_000),
            Kind::Failed => ping_body("O=Nobody, L=Nowhere, C=GB", i as i64, 0),
        };
        api.start_flow(&alice, &id, "ping", &body);
        let t = now_ms();
        wait_until("the next millisecond", Duration::from_secs(1), || {
            (now_ms() > t).then_some(()).ok_or_else(String::new)
        });
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        let kind = KINDS[i % KINDS.len()];
        let want = match kind {
            Kind::Killed => "RUNNING",
            k => k.status(),
        };
        wait_until(
            &format!("{id} to be {want}"),
            Duration::from_secs(60),
            || {
                let st = api.status(&alice, id);
                (st.status == want).then_some(()).ok_or(st.describe())
            },
        );
        if kind == Kind::Killed {
            api.kill_flow(&alice, id).expect_status(&[200], "kill");
            api.wait_terminal(&alice, id);
        }
    }

    for limit in [1, 2, 7, 1000] {
        let flows = walk(&api, &format!("/api/v1/flow/{alice}"), "flows", limit, true);
        assert_eq!(
            field(&flows, "clientRequestId"),
            ids,
            "Alice's flows, limit {limit}"
        );
        for (i, f) in flows.iter().enumerate() {
            assert_eq!(f["status"], KINDS[i % KINDS.len()].status(), "{f}");
        }
        for kind in [Kind::Completed, Kind::Running, Kind::Failed, Kind::Killed] {
            let want: Vec<String> = ids
                .iter()
                .enumerate()
                .filter(|(i, _)| KINDS[i % KINDS.len()] == kind)
                .map(|(_, id)| id.clone())
                .collect();
            let path = format!("/api/v1/flow/{alice}?status={}", kind.status());
            let got = walk(&api, &path, "flows", limit, false);
            assert_eq!(
                field(&got, "clientRequestId"),
                want,
                "GET {path}, limit {limit}"
            );
            assert!(got.iter().all(|f| f["status"] == kind.status()));
        }
        let none = walk(
            &api,
            &format!("/api/v1/flow/{alice}?status=START_REQUESTED"),
            "flows",
            limit,
            false,
        );
        assert!(none.is_empty(), "{none:?}");
        // Bob's responders: each once, the same as in one page.
        let bobs = field(
            &walk(&api, &format!("/api/v1/flow/{bob}"), "flows", limit, true),
            "flowId",
        );
        let one = field(
            &walk(&api, &format!("/api/v1/flow/{bob}"), "flows", 1000, true),
            "flowId",
        );
        assert_eq!(bobs, one, "Bob's flows, limit {limit}");
        let mut unique = bobs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), bobs.len(), "a responder listed twice");

        let pkgs = walk(&api, "/api/v1/package", "packages", limit, true);
        assert_eq!(
            field(&pkgs, "checksum"),
            checksums,
            "packages, limit {limit}"
        );
        let vnodes = walk(&api, "/api/v1/virtualnode", "virtualNodes", limit, true);
        assert_eq!(field(&vnodes, "x500Name"), names, "vnodes, limit {limit}");
        let users = walk(&api, "/api/v1/user", "users", limit, true);
        assert_eq!(field(&users, "loginName"), logins, "users, limit {limit}");
        let roles = field(
            &walk(&api, "/api/v1/role", "roles", limit, true),
            "roleName",
        );
        let mut sorted = roles.clone();
        sorted.sort();
        assert_eq!(roles, sorted, "roles in order, limit {limit}");
        assert_eq!(roles.len(), 4 + 5, "built-in and created roles: {roles:?}");
        let path = "/api/v1/user/admin/permissions";
        let all_perms = walk(&api, path, "permissions", 1000, true);
        assert!(all_perms.len() >= 5, "admin's permissions: {all_perms:?}");
        assert_eq!(
            walk(&api, path, "permissions", limit, true),
            all_perms,
            "admin's permissions, limit {limit}"
        );
    }
    // Without a limit: 100 per page.
    let resp = api.get("/api/v1/package").expect("list");
    assert_eq!(resp.json["packages"].as_array().map(Vec::len), Some(4));
    assert_eq!(resp.json["nextCursor"], Value::Null);
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Bad `limit` and `cursor` values are refused with `400` and a code that
/// says which, on every list; the OpenAPI document shows both parameters
/// and `nextCursor`.
#[test]
fn bad_limits_and_cursors_are_refused_and_documented() {
    let node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let api = node.api().clone();
    api.start_flow(&alice, "one", "ping", &ping_body(BOB, 1, 0));
    let flows = format!("/api/v1/flow/{alice}");
    let lists = [
        flows.as_str(),
        "/api/v1/package",
        "/api/v1/virtualnode",
        "/api/v1/user",
        "/api/v1/role",
    ];
    let huge = "A".repeat(2000);
    for path in lists {
        for limit in [
            "0",
            "-1",
            "1001",
            "x",
            "",
            "1.5",
            "18446744073709551617",
            "%20",
        ] {
            let p = format!("{path}?limit={limit}");
            let r = api.get(&p).expect("list");
            r.expect_problem(&[400], &format!("GET {p}"));
            assert_eq!(r.json["code"], "INVALID_LIMIT", "GET {p}: {}", r.text);
            let msg = r.json["message"].as_str().unwrap_or_default();
            assert!(
                msg.contains("1000"),
                "GET {p}: the message does not say the range: {msg}"
            );
        }
        let not_utf8 = b64(&[0xff, 0xfe, 0xfd]);
        for cursor in ["", "!!", "a%20b", huge.as_str(), "%FF", not_utf8.as_str()] {
            let p = format!("{path}?cursor={cursor}");
            let r = api.get(&p).expect("list");
            r.expect_problem(&[400], &format!("GET {p}"));
            assert_eq!(r.json["code"], "INVALID_CURSOR", "GET {p}: {}", r.text);
        }
    }
    // Cursors that are no key of the list they are given to: another
    // list's, or made up.
    let pkg_cursor = {
        api.upload_package(&package_bytes(Pkg::PingV2));
        let r = api.get("/api/v1/package?limit=1").expect("list");
        r.json["nextCursor"]
            .as_str()
            .expect("a second page")
            .to_string()
    };
    let flow_cursor = {
        api.start_flow(&alice, "two", "ping", &ping_body(BOB, 2, 0));
        let r = api.get(&format!("{flows}?limit=1")).expect("list");
        r.json["nextCursor"]
            .as_str()
            .expect("a second page")
            .to_string()
    };
    for (path, cursor) in [
        (flows.as_str(), pkg_cursor.clone()),
        (flows.as_str(), b64(b"abc")),
        (flows.as_str(), b64(&[0; 25])),
        ("/api/v1/package", flow_cursor.clone()),
        ("/api/v1/package", b64(b"not a checksum")),
        ("/api/v1/virtualnode", pkg_cursor.clone()),
        ("/api/v1/virtualnode", b64(b"O=Alice")),
    ] {
        let p = format!("{path}?cursor={cursor}");
        let r = api.get(&p).expect("list");
        r.expect_problem(&[400], &format!("GET {p}"));
        assert_eq!(r.json["code"], "INVALID_CURSOR", "GET {p}: {}", r.text);
    }
    let r = api.get(&format!("{flows}?status=DONE")).expect("list");
    r.expect_problem(&[400], "unknown status");
    assert_eq!(r.json["code"], "INVALID_STATUS", "{}", r.text);

    // The OpenAPI document: limit and cursor on every list, nextCursor in
    // every page.
    let doc = api.get("/api/v1/openapi.json").expect("openapi").json;
    for (path, page) in [
        ("/api/v1/flow/{holding}", "FlowList"),
        ("/api/v1/package", "PackageList"),
        ("/api/v1/virtualnode", "VnodeList"),
        ("/api/v1/user", "UserList"),
        ("/api/v1/role", "RoleList"),
    ] {
        let params = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("GET {path} has no parameters in the OpenAPI document"));
        for name in ["limit", "cursor"] {
            assert!(
                params
                    .iter()
                    .any(|p| p["name"] == name && p["in"] == "query"),
                "GET {path}: no query parameter {name} in the OpenAPI document"
            );
        }
        assert!(
            doc["components"]["schemas"][page]["properties"]["nextCursor"].is_object(),
            "{page} has no nextCursor in the OpenAPI document"
        );
    }
}

/// Runs the `braid` CLI against `node` as admin (no BRAID_* from the
/// caller's environment, no profile file).
fn cli(node: &Node, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(braid_e2e::braid_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("BRAID_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args)
        .env("BRAID_URL", node.api().base())
        .env("BRAID_CA", node.ca_path())
        .env("BRAID_USER", braid_e2e::ADMIN_USER)
        .env("BRAID_PASSWORD", braid_e2e::ADMIN_PASSWORD)
        .env("BRAID_CONFIG", node.data_dir().join("no-such-profile.toml"))
        .stdin(std::process::Stdio::null());
    cmd
}

fn run(node: &Node, args: &[&str]) -> std::process::Output {
    cli(node, args)
        .output()
        .unwrap_or_else(|e| panic!("spawn braid {args:?}: {e}"))
}

fn describe(out: &std::process::Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
fn run_json(node: &Node, args: &[&str]) -> Value {
    let out = run(node, args);
    assert!(out.status.success(), "braid {args:?}: {}", describe(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("braid {args:?} printed no JSON ({e}): {}", describe(&out)))
}

/// `braid ... list` shows every item, page after page (whatever the page
/// size), and `braid flow watch` follows a flow's status stream to its
/// end.
#[test]
fn cli_lists_show_every_item_and_watch_follows_the_stream() {
    // More flows than one page of the node's default size (100).
    const PINGS: usize = 150;
    let node = Node::start();
    let api = node.api().clone();
    let mut checksums: Vec<String> = Pkg::ALL
        .iter()
        .map(|p| api.upload_package(&package_bytes(*p)))
        .collect();
    checksums.sort();
    let alice = api.create_vnode(ALICE, &checksums_of(&api, Pkg::Ping));
    let _bob = api.create_vnode(BOB, &checksums_of(&api, Pkg::Ping));
    let mut names = vec![ALICE.to_string(), BOB.to_string()];
    for i in 0..3 {
        let name = format!("O=Cli {i}, L=Oslo, C=NO");
        api.create_vnode(&name, &checksums_of(&api, Pkg::Ping));
        names.push(name);
    }
    names.sort();
    for i in 0..3 {
        api.post_json(
            "/api/v1/user",
            &json!({"loginName": format!("cli-{i}"), "password": "pagination-password-0123"}),
        )
        .expect("create user")
        .expect_status(&[201], "create user");
        api.post_json(
            "/api/v1/role",
            &json!({"roleName": format!("cli-role-{i}")}),
        )
        .expect("create role")
        .expect_status(&[201], "create role");
    }
    let mut ids = Vec::new();
    for i in 0..PINGS {
        let id = format!("p-{i:03}");
        let delay = if i % 50 == 7 { 600_000 } else { 0 };
        api.start_flow(&alice, &id, "ping", &ping_body(BOB, i as i64, delay));
        ids.push(id);
    }
    let running: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 50 == 7)
        .map(|(_, id)| id.clone())
        .collect();
    for id in &running {
        wait_until(&format!("{id} to run"), Duration::from_secs(60), || {
            let st = api.status(&alice, id);
            (st.status == "RUNNING").then_some(()).ok_or(st.describe())
        });
    }
    let done: Vec<String> = ids
        .iter()
        .filter(|id| !running.contains(id))
        .cloned()
        .collect();
    api.wait_all_terminal(&alice, &done, Duration::from_secs(120));

    // The default page size, and pages of one or two items.
    let all = run_json(&node, &["flow", "list", &alice]);
    let mut listed = field(all["flows"].as_array().expect("flows"), "clientRequestId");
    listed.sort();
    assert_eq!(listed, ids, "braid flow list");
    for size in ["1", "2"] {
        let all = run_json(&node, &["--page-size", size, "flow", "list", &alice]);
        let mut listed = field(all["flows"].as_array().expect("flows"), "clientRequestId");
        listed.sort();
        assert_eq!(listed, ids, "braid --page-size {size} flow list");
    }
    let r = run_json(
        &node,
        &[
            "--page-size",
            "1",
            "flow",
            "list",
            &alice,
            "--status",
            "RUNNING",
        ],
    );
    assert_eq!(
        field(r["flows"].as_array().expect("flows"), "clientRequestId"),
        running,
        "braid flow list --status RUNNING"
    );
    let r = run_json(&node, &["--page-size", "1", "package", "list"]);
    assert_eq!(
        field(r["packages"].as_array().expect("packages"), "checksum"),
        checksums
    );
    let r = run_json(&node, &["--page-size", "2", "vnode", "list"]);
    assert_eq!(
        field(r["virtualNodes"].as_array().expect("vnodes"), "x500Name"),
        names
    );
    let r = run_json(&node, &["--page-size", "2", "user", "list"]);
    assert_eq!(
        field(r["users"].as_array().expect("users"), "loginName"),
        ["admin", "cli-0", "cli-1", "cli-2"]
    );
    let r = run_json(&node, &["--page-size", "2", "role", "list"]);
    let roles = field(r["roles"].as_array().expect("roles"), "roleName");
    assert_eq!(roles.len(), 4 + 3, "{roles:?}");
    // Refusals say why.
    let out = run(&node, &["flow", "list", &alice, "--status", "DONE"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown status"),
        "{}",
        describe(&out)
    );
    let out = run(&node, &["--page-size", "0", "flow", "list", &alice]);
    assert!(!out.status.success(), "{}", describe(&out));

    // watch: every change as a JSON line, exit 0 when it completes.
    api.start_flow(&alice, "watched", "ping", &ping_body(BOB, 41, 1500));
    let out = run(&node, &["flow", "watch", &alice, "watched"]);
    assert_eq!(out.status.code(), Some(0), "flow watch: {}", describe(&out));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 2, "one line per change: {}", describe(&out));
    assert_eq!(
        lines.last().unwrap()["result"],
        json!({"n": 42, "responder": BOB})
    );
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l["status"] != "COMPLETED")
    );
    // A flow killed while watched: exit 2.
    let mut child = cli(&node, &["flow", "watch", &alice, &running[0]])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn braid flow watch");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).expect("watch prints the status");
    assert!(first.contains("RUNNING"), "{first}");
    api.kill_flow(&alice, &running[0])
        .expect_status(&[200], "kill");
    let status = wait_until("flow watch to exit", Duration::from_secs(60), || {
        child
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(String::new)
    });
    assert_eq!(status.code(), Some(2), "flow watch of a killed flow");
    // --timeout on a flow that does not end: exit 3, saying so.
    let out = run(
        &node,
        &["flow", "watch", &alice, &running[1], "--timeout", "1"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still RUNNING after 1s"),
        "{}",
        describe(&out)
    );
}

fn checksums_of(api: &Api, pkg: Pkg) -> String {
    api.upload_package(&package_bytes(pkg))
}
